//! `zonevault keygen --out FILE`: a new identity file, mode 0600; with
//! `--signing`, a core's snapshot-signing key instead.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::keys;

/// What keygen makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An age identity (decrypts); prints its recipient.
    Identity,
    /// A minisign key for signing a core's snapshots; prints its public key.
    Signing,
}

/// Writes a new key to `out` (never overwriting a file) and returns its
/// public half: the recipient of an identity, the public key of a signing key.
pub fn run(out: &Path, kind: Kind) -> Result<String> {
    let (text, public) = match kind {
        Kind::Identity => {
            let identity = keys::generate();
            (identity.file_text, identity.recipient)
        }
        Kind::Signing => crate::signing::Signer::generate()?,
    };
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
                "{} already exists; keygen never overwrites a key: choose another --out or move the file away",
                out.display()
            )),
            std::io::ErrorKind::NotFound => Error::failed(format!(
                "cannot create {}: its directory does not exist; create it first (mode 0700)",
                out.display()
            )),
            _ => Error::failed(format!("cannot create {}: {e}", out.display())),
        })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::failed(format!("cannot write {}: {e}", out.display())))?;
    Ok(public)
}
