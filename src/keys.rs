//! age X25519 identities: generating them and reading identity files.
//!
//! The file format is the one `age-keygen` writes, so the reference `age`
//! CLI and zonevault read each other's files.

use std::path::Path;

use age::secrecy::ExposeSecret;

/// A new identity, as the text of an identity file, and its recipient.
pub struct NewIdentity {
    /// The whole identity file (comment lines and the `AGE-SECRET-KEY-1...` line).
    pub file_text: String,
    /// The public `age1...` recipient.
    pub recipient: String,
}

/// Generates a new X25519 identity.
pub fn generate() -> NewIdentity {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let created = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ");
    let file_text = format!(
        "# created: {created}\n# public key: {recipient}\n{}\n",
        identity.to_string().expose_secret()
    );
    NewIdentity {
        file_text,
        recipient,
    }
}

/// Reads the identities of an identity file (as written by `zonevault keygen`
/// or `age-keygen`).
pub fn load_identities(path: &Path) -> anyhow::Result<Vec<Box<dyn age::Identity + Send + Sync>>> {
    use anyhow::Context as _;
    let file = age::IdentityFile::from_file(path.to_string_lossy().into_owned())
        .with_context(|| format!("cannot read identity file {}", path.display()))?;
    let identities = file
        .into_identities()
        .with_context(|| format!("{} holds no usable age identity", path.display()))?;
    if identities.is_empty() {
        anyhow::bail!("{} holds no age identity", path.display());
    }
    Ok(identities
        .into_iter()
        .map(|i| i as Box<dyn age::Identity + Send + Sync>)
        .collect())
}
