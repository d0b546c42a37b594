//! The dump of a `layout = "command"` volume: the command's stdout becomes
//! one file in a one-unit tar.
//!
//! A tar header carries the size before the data, and a dump's size is
//! known only at its end. So the stdout is spooled first — never in
//! plaintext: into an unnamed file (`O_TMPFILE`) in `<state_dir>`, mode
//! 0600, age-encrypted to an X25519 identity generated for this one dump and
//! held only in memory. Once the command exited well, the spool is read back
//! decrypted, straight into the unit's tar (and from there zstd → age → the
//! targets). The file has no name, so it vanishes when its descriptor is
//! closed, a crash included; its key dies with the process, so even a copy
//! of the disk blocks taken meanwhile reads as noise. Memory stays at
//! age's 64 KiB chunks. See docs/threat-model.md.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result};

use crate::hooks::{self, Outcome, Spec};

/// A finished dump, encrypted on disk.
pub struct Spool {
    file: File,
    identity: age::x25519::Identity,
    /// Plain bytes of the dump.
    pub size: u64,
}

impl Spool {
    /// The plain dump, read back (decrypted) from the start.
    pub fn reader(mut self) -> Result<impl Read> {
        self.file.rewind()?;
        let decryptor = age::Decryptor::new_buffered(BufReader::with_capacity(64 << 10, self.file))
            .context("reading back the dump's spool")?;
        let reader = decryptor
            .decrypt(std::iter::once(&self.identity as &dyn age::Identity))
            .context("decrypting the dump's spool")?;
        Ok(reader)
    }
}

/// Opens an unnamed, owner-only file in `dir`.
fn unnamed_file(dir: &Path) -> io::Result<File> {
    std::fs::create_dir_all(dir)?;
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir);
    match opened {
        Ok(f) => Ok(f),
        // A file system without O_TMPFILE: a named file, unlinked at once
        // (what it holds is encrypted anyway).
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => {
            let path = dir.join(format!(".dump-{:016x}.tmp", rand::random::<u64>()));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            std::fs::remove_file(&path)?;
            Ok(f)
        }
        Err(e) => Err(e),
    }
}

/// Counts the bytes written through it.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Runs the dump command, its stdout spooled encrypted into `state_dir`.
/// The spool is `None` unless the command exited with status 0.
pub fn spool(state_dir: &Path, spec: &Spec<'_>) -> Result<(Option<Spool>, Outcome)> {
    let file = unnamed_file(state_dir).with_context(|| {
        format!(
            "cannot create the dump's temporary file in {}",
            state_dir.display()
        )
    })?;
    let identity = age::x25519::Identity::generate();
    // the identity's secret never leaves this process
    let recipient = identity.to_public();
    let encryptor =
        age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
            .context("no recipient for the spool")?;
    let writer =
        encryptor.wrap_output(io::BufWriter::with_capacity(64 << 10, file.try_clone()?))?;
    let mut counting = Counting {
        inner: writer,
        bytes: 0,
    };
    let outcome = hooks::run(spec, Some(&mut counting))
        .with_context(|| format!("running {:?}", spec.argv))?;
    let size = counting.bytes;
    let buffered = counting.inner.finish()?;
    drop(buffered.into_inner().map_err(|e| e.into_error())?);
    if !outcome.status.success() {
        return Ok((None, outcome));
    }
    Ok((
        Some(Spool {
            file,
            identity,
            size,
        }),
        outcome,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spooled_bytes_come_back_and_are_not_on_disk_in_plain() {
        let dir = tempfile::tempdir().unwrap();
        let argv: Vec<String> = [
            "sh",
            "-c",
            "for i in $(seq 1 20000); do echo secret-row-$i; done",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let spec = Spec {
            argv: &argv,
            env: vec![],
            timeout: std::time::Duration::from_secs(20),
            stop: None,
        };
        let (spool, outcome) = spool(dir.path(), &spec).unwrap();
        assert!(outcome.status.success());
        let spool = spool.unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // what is on disk is age, not the rows
        let mut raw = Vec::new();
        (&spool.file).rewind().unwrap();
        (&spool.file).read_to_end(&mut raw).unwrap();
        assert!(raw.starts_with(b"age-encryption.org/v1"));
        assert!(!raw.windows(10).any(|w| w == b"secret-row"));
        let size = spool.size;
        let mut plain = String::new();
        spool.reader().unwrap().read_to_string(&mut plain).unwrap();
        assert_eq!(plain.len() as u64, size);
        assert!(plain.ends_with("secret-row-20000\n"));
    }
}
