//! `zonevault keygen --out FILE`: a new identity file, mode 0600.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::keys;

/// Writes a new identity to `out` (never overwriting a file) and returns its recipient.
pub fn run(out: &Path) -> Result<String> {
    let identity = keys::generate();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| match e.kind() {
            _ if out.is_dir() => Error::Usage(format!(
                "{} is a directory; --out takes the path of the identity file to create",
                out.display()
            )),
            std::io::ErrorKind::AlreadyExists => Error::Usage(format!(
                "{} already exists; keygen never overwrites an identity: choose another --out or move the file away",
                out.display()
            )),
            std::io::ErrorKind::NotFound => Error::failed(format!(
                "cannot create {}: its directory does not exist; create it first (mode 0700)",
                out.display()
            )),
            _ => Error::failed(format!("cannot create {}: {e}", out.display())),
        })?;
    file.write_all(identity.file_text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::failed(format!("cannot write {}: {e}", out.display())))?;
    Ok(identity.recipient)
}
