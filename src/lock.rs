//! One run at a time per core: an exclusive lock on `<state_dir>/lock`,
//! shared by the commands and the daemon.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{Context, Result};

/// Held for the length of a run; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Takes the lock, waiting while another zonevault process holds it.
    pub fn acquire(state_dir: &Path) -> Result<RunLock> {
        RunLock::take(state_dir, true)
    }

    /// Takes the lock; when another run holds it, waits for it (`wait`) or
    /// fails at once as busy.
    pub fn take(state_dir: &Path, wait: bool) -> Result<RunLock> {
        crate::state::create_dir(state_dir)?;
        let path = state_dir.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        if flock(&file, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            if !wait {
                anyhow::bail!(
                    "busy: another zonevault run of this core holds {} (without --no-wait, zonevault waits for it)",
                    path.display()
                );
            }
            tracing::warn!(lock = %path.display(), "another zonevault run holds the lock; waiting");
            flock(&file, libc::LOCK_EX)
                .with_context(|| format!("cannot lock {}", path.display()))?;
        }
        Ok(RunLock { _file: file })
    }
}

/// `flock(2)` on `file`: `op` is `LOCK_EX`, `LOCK_UN`, ... (with `LOCK_NB`).
/// The lock belongs to the open file, and the kernel drops it when the
/// process dies, so a killed run never leaves a stale lock behind.
pub fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    // SAFETY: flock on a file descriptor that `file` keeps open.
    if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
