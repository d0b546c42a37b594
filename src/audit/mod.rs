//! The audit log: every location of every backup on record, hash-chained.
//!
//! - [`record`]: the events, and how a record is hashed (`prev` + canonical JSON).
//! - [`log`]: `<state_dir>/audit.jsonl`, appended durably (fsync) under a lock
//!   shared by every zonevault process of the core.
//! - [`chain`]: `audit verify`, which names the first bad line.
//! - [`query`]: `audit where` and `audit show`.
//! - [`remote`]: the encrypted copies in the zone's targets, `audit verify
//!   --remote` and `audit pull`.
//!
//! Who writes what: the residency gate records its verdicts and every write
//! or deletion made through a [`crate::residency::Writable`] records itself,
//! so no object reaches or leaves a target unrecorded; the commands record
//! what only they know (config loaded, snapshot committed, objects read,
//! restore done, run failed).

pub mod chain;
pub mod log;
pub mod query;
pub mod record;
pub mod remote;

pub use log::AuditLog;
pub use record::{Erased, Event, NotErased, ObjectKind, Place, UserRange};

/// The OS user and host name of this process, for records of reads.
pub fn who() -> (String, String) {
    // SAFETY: getuid cannot fail; getpwuid returns a pointer into static
    // storage or null, read at once.
    let user = unsafe {
        let uid = libc::getuid();
        let pw = libc::getpwuid(uid);
        if pw.is_null() || (*pw).pw_name.is_null() {
            format!("uid {uid}")
        } else {
            std::ffi::CStr::from_ptr((*pw).pw_name)
                .to_string_lossy()
                .into_owned()
        }
    };
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let host = if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "unknown".to_string()
    };
    (user, host)
}
