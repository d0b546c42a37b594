//! Crash points for the tests that prove what a crash leaves behind.
//!
//! `ZONEVAULT_FAILPOINT=<name>` makes the process kill itself with SIGKILL
//! (no destructor, no flush: as a power cut or the OOM killer would) the
//! first time it reaches the point of that name with `armed` true. Unset,
//! a point costs one cached lookup. Points: `after-object-write` (a unit
//! object holding users' data is on the target, its `object_put` record not
//! yet written), `after-delete` (an object is deleted, its `object_deleted`
//! not yet written), `erase-after-delete` (an erasure deleted its first
//! object and has not finished).

use std::sync::OnceLock;

/// Kills the process if `ZONEVAULT_FAILPOINT` names `name` and `armed`.
pub fn hit(name: &str, armed: bool) {
    static POINT: OnceLock<Option<String>> = OnceLock::new();
    let point = POINT.get_or_init(|| std::env::var("ZONEVAULT_FAILPOINT").ok());
    if armed && point.as_deref() == Some(name) {
        tracing::error!(failpoint = name, "failpoint reached: killing the process");
        // SAFETY: plain syscalls on our own pid.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
