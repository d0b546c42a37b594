//! The copies of a core's audit log on a target:
//! `<core>/audit/<first>-<last>.jsonl.age`, each a run of records encrypted
//! to the zone's recipients. What they mean (marks, continuity, `verify
//! --remote`, `pull`) is [`crate::audit::remote`]'s; this module only lists,
//! reads and writes them.

use anyhow::{Context, Result};
use bytes::Bytes;

use super::layout;
use crate::audit::ObjectKind;
use crate::config::Target;
use crate::pipeline;
use crate::residency::{Contents, Writable};
use crate::storage::{ReadBackend, WriteBackend};

/// One copy on a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// The full key, as listed.
    pub key: String,
    /// The first and last record it holds.
    pub first: u64,
    pub last: u64,
}

/// The copies of `core`'s log on `target`, by key (so by first record). A
/// key that is not named as a copy is skipped.
pub async fn list<S: ReadBackend>(store: &S, target: &Target, core: &str) -> Result<Vec<Copy>> {
    let listed = store
        .list(&target.key(&layout::audit_dir(core)))
        .await
        .with_context(|| format!("listing the audit copies on target {}", target.name))?;
    Ok(listed
        .into_iter()
        .filter_map(|o| {
            let (first, last) = layout::audit_copy_range(&o.key)?;
            Some(Copy {
                key: o.key,
                first,
                last,
            })
        })
        .collect())
}

/// The highest record that `target` holds a copy of for `core` (0 for none).
pub async fn highest<S: ReadBackend>(store: &S, target: &Target, core: &str) -> Result<u64> {
    Ok(list(store, target, core)
        .await?
        .iter()
        .map(|c| c.last)
        .max()
        .unwrap_or(0))
}

/// Why a copy could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("none of the identities can decrypt it")]
    NoMatchingKeys,
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// The records of `copy` on `target`, decrypted: one JSON record per line.
pub async fn read<S: ReadBackend>(
    store: &S,
    target: &Target,
    copy: &Copy,
    identities: &[Box<dyn age::Identity + Send + Sync>],
) -> std::result::Result<String, ReadError> {
    let where_ = format!("copy {} on target {}", copy.key, target.name);
    let sealed = store
        .get(&copy.key)
        .await
        .with_context(|| format!("reading {where_}"))?
        .with_context(|| format!("{where_} vanished while read"))?;
    let plain = pipeline::decrypt_small(&sealed, identities).map_err(|e| match e {
        pipeline::OpenError::NoMatchingKeys => ReadError::NoMatchingKeys,
        other => ReadError::Other(anyhow::anyhow!("{where_} cannot be decrypted: {other}")),
    })?;
    Ok(String::from_utf8(plain).with_context(|| format!("{where_} is not text"))?)
}

/// Writes records `first..=last` of `core`'s log (`records`, one per line,
/// each ending in a newline) to `target`, sealed to `recipients`.
pub async fn write<S: WriteBackend>(
    target: &Writable<S>,
    core: &str,
    (first, last): (u64, u64),
    records: &str,
    recipients: &[age::x25519::Recipient],
) -> Result<()> {
    let key = layout::audit_copy_key(core, first, last);
    let sealed = pipeline::encrypt_small(recipients, records.as_bytes())?;
    target
        .put(
            &key,
            Bytes::from(sealed),
            &Contents::of(ObjectKind::AuditCopy),
        )
        .await
}
