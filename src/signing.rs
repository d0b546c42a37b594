//! Snapshot signatures: each core signs what it commits, so that whoever can
//! write to a bucket cannot forge a snapshot.
//!
//! Why: the zone's recipients are public and age has no sender
//! authentication, so anyone with write access to a target can encrypt a
//! manifest of their own. A core therefore signs its index and its
//! (encrypted) manifest with an Ed25519 key kept in its state dir — a signing
//! key reads nothing, so cores stay write-only — and the zone map lists each
//! core's public keys. Restore checks both signatures before it trusts a
//! byte of the snapshot; the manifest holds every unit's BLAKE3, so the
//! units are covered too.
//!
//! The format is minisign's (detached `<file>.minisig`, prehashed Ed25519),
//! so `minisign -V -P KEY -m FILE` checks a snapshot with the reference tool.
//! The trusted comment names core, zone, snapshot and file: a signature
//! cannot be moved to another snapshot or file.

use std::io::Cursor;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use minisign::{KeyPair, PublicKey, PublicKeyBox, SecretKey, SecretKeyBox, SignatureBox};

/// The suffix of a detached signature's key.
pub const SUFFIX: &str = ".minisig";

/// Secret key files are a few hundred bytes; anything larger is not one.
const MAX_KEY_FILE: u64 = 4096;

/// The file name a signature's statement names: the last part of `key`.
pub fn file_name(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

/// What a signature vouches for; its text is minisign's trusted comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement<'a> {
    pub core: &'a str,
    pub zone: &'a str,
    pub snapshot: &'a str,
    /// The signed object's file name (`<id>.json`, `<id>.manifest.age`).
    pub file: &'a str,
}

impl Statement<'_> {
    fn comment(&self) -> String {
        format!(
            "zonevault core={} zone={} snapshot={} file={}",
            self.core, self.zone, self.snapshot, self.file
        )
    }
}

/// A core's signing key.
#[derive(Clone)]
pub struct Signer {
    secret: std::sync::Arc<SecretKey>,
    public: std::sync::Arc<PublicKey>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.public_key())
    }
}

impl Signer {
    /// A new key: the text of its key file and its public key, the line the
    /// zone map lists. `zonevault keygen --signing` writes the file.
    pub fn generate() -> Result<(String, String)> {
        let pair = KeyPair::generate_unencrypted_keypair().context("cannot generate a key")?;
        let text = pair
            .sk
            .to_box(Some("zonevault signing key (unencrypted)"))
            .context("cannot encode the key")?
            .into_string();
        Ok((text, pair.pk.to_base64()))
    }

    /// Reads a key file: a regular, private file of at most 4 KiB.
    pub fn load(path: &Path) -> Result<Signer> {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let file = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .with_context(|| format!("cannot open the signing key {}", path.display()))?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            bail!("the signing key {} is not a regular file", path.display());
        }
        if meta.mode() & 0o077 != 0 {
            bail!(
                "the signing key {} is readable by others (mode {:04o}); chmod 600 it",
                path.display(),
                meta.mode() & 0o7777
            );
        }
        if meta.len() > MAX_KEY_FILE {
            bail!("{} is too large to be a signing key", path.display());
        }
        let mut text = String::new();
        file.take(MAX_KEY_FILE)
            .read_to_string(&mut text)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let secret = SecretKeyBox::from_string(&text)
            .and_then(SecretKey::from_unencrypted_box)
            .map_err(|e| {
                anyhow::anyhow!(
                    "{} is not an unencrypted minisign secret key ({e}); `zonevault keygen --signing --out FILE` makes one",
                    path.display()
                )
            })?;
        let public = PublicKey::from_secret_key(&secret)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(Signer {
            secret: secret.into(),
            public: public.into(),
        })
    }

    /// The public key (base64), as the zone map lists it.
    pub fn public_key(&self) -> String {
        self.public.to_base64()
    }

    /// The detached signature (a `.minisig` file) of `data`.
    pub fn sign(&self, data: impl std::io::Read, what: &Statement<'_>) -> Result<Vec<u8>> {
        let sig = minisign::sign(
            Some(&self.public),
            &self.secret,
            data,
            Some(&what.comment()),
            Some(&format!("signature from zonevault core {}", what.core)),
        )
        .map_err(|e| anyhow::anyhow!("cannot sign {}: {e}", what.file))?;
        Ok(sig.into_string().into_bytes())
    }
}

/// The key this core signs its snapshots with, checked against the zone
/// map: a key that the zone map does not list (or a listed key that is
/// missing) is a configuration error, since restore would refuse what it
/// signs. Without a key and without listed keys the core commits unsigned
/// snapshots, with a warning.
pub fn core_signer(config: &crate::config::Config) -> crate::Result<Option<Signer>> {
    use crate::Error;
    let core = &config.core.core_id;
    let zone = config.zone();
    let path = &config.core.signing_key;
    let listed = zone.signing_keys.get(core);
    let field = format!("zones.{}.signing_keys.{core}", zone.id);
    let exists = match std::fs::symlink_metadata(path) {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            return Err(Error::Usage(format!(
                "cannot read the signing key {}: {e}",
                path.display()
            )));
        }
    };
    match (exists, listed) {
        (false, None) => {
            tracing::warn!(
                "core {core} has no signing key ({}): its snapshots are not signed, so restore cannot tell them from forgeries; `zonevault keygen --signing --out {}` makes one (docs/operations.md)",
                path.display(),
                path.display()
            );
            Ok(None)
        }
        (false, Some(_)) => Err(Error::Usage(format!(
            "{} lists signing keys for core {core} ({field}), but its signing key {} does not exist; restore it from the key backup, or make a new one with `zonevault keygen --signing --out {}` and list its public key",
            config.core.zone_map.display(),
            path.display(),
            path.display()
        ))),
        (true, listed) => {
            let signer = Signer::load(path).map_err(|e| Error::Usage(format!("{e:#}")))?;
            let known = listed.is_some_and(|keys| {
                keys.iter().any(|k| {
                    k.keynum() == signer.public.keynum() && k.to_bytes() == signer.public.to_bytes()
                })
            });
            if !known {
                return Err(Error::Usage(format!(
                    "the signing key {} (public key {}) is not listed in {} under {field}; add it there (and to every core's copy of the zone map), or restore would refuse this core's snapshots",
                    path.display(),
                    signer.public_key(),
                    config.core.zone_map.display()
                )));
            }
            Ok(Some(signer))
        }
    }
}

/// A public key from the zone map (`RW...`, minisign's base64 form).
pub fn parse_public_key(text: &str) -> Result<PublicKey, String> {
    PublicKey::from_base64(text.trim())
        .or_else(|_| PublicKeyBox::from_string(text.trim()).and_then(PublicKeyBox::into_public_key))
        .map_err(|e| e.to_string())
}

/// Why a signature did not check out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadSignature {
    #[error("its signature is not a minisign signature")]
    Malformed,
    #[error(
        "it is signed by key {key}, which the zone map does not list for core {core} (it lists {listed})"
    )]
    UnknownKey {
        core: String,
        key: String,
        listed: String,
    },
    #[error("its signature does not match its contents")]
    Mismatch,
    #[error("its signature was made for another object ({0:?})")]
    WrongStatement(String),
}

/// Checks a detached signature of `data` against `keys`, and that it
/// vouches for exactly `what`.
pub fn verify(
    data: &[u8],
    signature: &[u8],
    keys: &[PublicKey],
    what: &Statement<'_>,
) -> Result<(), BadSignature> {
    let text = std::str::from_utf8(signature).map_err(|_| BadSignature::Malformed)?;
    let sig = SignatureBox::from_string(text).map_err(|_| BadSignature::Malformed)?;
    let key_id = |keynum: &[u8]| {
        keynum
            .iter()
            .rev()
            .map(|b| format!("{b:02X}"))
            .collect::<String>()
    };
    let candidates: Vec<&PublicKey> = keys.iter().filter(|k| k.keynum() == sig.keynum()).collect();
    if candidates.is_empty() {
        return Err(BadSignature::UnknownKey {
            core: what.core.to_string(),
            key: key_id(sig.keynum()),
            listed: keys
                .iter()
                .map(|k| key_id(k.keynum()))
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    // key ids are 8 random bytes: a clash is unlikely, but try each
    if !candidates
        .iter()
        .any(|key| minisign::verify(key, &sig, Cursor::new(data), true, false, false).is_ok())
    {
        return Err(BadSignature::Mismatch);
    }
    let comment = sig.trusted_comment().map_err(|_| BadSignature::Malformed)?;
    if comment != what.comment() {
        return Err(BadSignature::WrongStatement(comment));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_key(path: &Path) -> String {
        use std::os::unix::fs::PermissionsExt;
        let (text, public) = Signer::generate().unwrap();
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
        public
    }

    fn statement(file: &str) -> Statement<'_> {
        Statement {
            core: "core-ch-1",
            zone: "ch",
            snapshot: "20261201T000000Z-00",
            file,
        }
    }

    #[test]
    fn signatures_bind_key_contents_and_statement() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        let public = write_key(&path);
        let signer = Signer::load(&path).unwrap();
        assert_eq!(signer.public_key(), public);
        let keys = vec![parse_public_key(&public).unwrap()];
        let sig = signer.sign(&b"index"[..], &statement("a.json")).unwrap();
        assert_eq!(verify(b"index", &sig, &keys, &statement("a.json")), Ok(()));
        assert_eq!(
            verify(b"indeX", &sig, &keys, &statement("a.json")),
            Err(BadSignature::Mismatch)
        );
        assert!(matches!(
            verify(b"index", &sig, &keys, &statement("b.json")),
            Err(BadSignature::WrongStatement(_))
        ));
        let other = dir.path().join("other.key");
        let other_public = write_key(&other);
        let other_keys = vec![parse_public_key(&other_public).unwrap()];
        assert!(matches!(
            verify(b"index", &sig, &other_keys, &statement("a.json")),
            Err(BadSignature::UnknownKey { .. })
        ));
        assert_eq!(
            verify(b"index", b"junk", &keys, &statement("a.json")),
            Err(BadSignature::Malformed)
        );
    }

    #[test]
    fn key_files_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        write_key(&path);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Signer::load(&path).unwrap_err().to_string();
        assert!(e.contains("readable by others"), "{e}");
    }
}
