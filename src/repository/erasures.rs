//! The erasure ledger on the targets: `<core>/erasures/<time>-<random>.json.age`,
//! one entry per `zonevault erase` that touched the core's backups,
//! encrypted to the zone's recipients (it names users).
//!
//! Why on the targets, beside the `user_erased` records that travel with the
//! audit copies: a restore runs on a machine that has no audit log, and must
//! still never bring an erased user back from a snapshot taken before the
//! erasure. Reading one small object per erasure is what it costs. Entries
//! are never deleted (they outlive every snapshot they apply to).

use std::collections::HashMap;

use anyhow::{Context, Result};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::layout::{self, Key};
use crate::audit::ObjectKind;
use crate::config::Target;
use crate::datakeys::Identity;
use crate::pipeline;
use crate::residency::{Contents, Writable};
use crate::storage::{ReadBackend, WriteBackend};

/// One erasure: who, when, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub format: u32,
    pub core: String,
    pub zone: String,
    pub time: DateTime<Utc>,
    pub users: Vec<String>,
    pub reason: String,
}

/// Writes `entry` to `target`, sealed to `recipients`.
pub async fn write<S: WriteBackend>(
    target: &Writable<S>,
    entry: &Entry,
    recipients: &[age::x25519::Recipient],
) -> Result<Key> {
    let plain = serde_json::to_vec(entry)?;
    let sealed = pipeline::encrypt_small(recipients, &plain)?;
    let key = layout::new_erasure_key(&entry.core, entry.time);
    target
        .put(
            &key,
            Bytes::from(sealed),
            &Contents::of(ObjectKind::Erasure),
        )
        .await?;
    Ok(key)
}

/// The ledger of `core` on one target: each entry's key and, when it can be
/// opened with `identities`, the entry.
pub async fn read<S: ReadBackend>(
    store: &S,
    target: &Target,
    core: &str,
    identities: &[Identity],
) -> Result<Vec<(Key, Result<Entry>)>> {
    let listed = store
        .list(&target.key(&layout::erasures_dir(core)))
        .await
        .with_context(|| {
            format!(
                "listing the erasure ledger of {core} on target {}",
                target.name
            )
        })?;
    let mut entries = Vec::new();
    for object in listed {
        let Some(key) = Key::listed(target, &object.key) else {
            continue;
        };
        let entry = async {
            let sealed = store
                .get(&object.key)
                .await?
                .with_context(|| format!("{} vanished", object.key))?;
            let plain = pipeline::decrypt_small(&sealed, identities)
                .map_err(|e| anyhow::anyhow!("cannot be opened: {e}"))?;
            let entry: Entry = serde_json::from_slice(&plain).context("not a ledger entry")?;
            anyhow::Ok(entry)
        }
        .await
        .with_context(|| {
            format!(
                "erasure ledger entry {} on target {}",
                object.key, target.name
            )
        });
        entries.push((key, entry));
    }
    Ok(entries)
}

/// When each user was last erased, by the entries of `core`.
pub fn erased_at<'a>(
    entries: impl IntoIterator<Item = &'a Entry>,
) -> HashMap<String, DateTime<Utc>> {
    let mut at: HashMap<String, DateTime<Utc>> = HashMap::new();
    for e in entries {
        for u in &e.users {
            let t = at.entry(u.clone()).or_insert(e.time);
            *t = (*t).max(e.time);
        }
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_erasure_of_a_user_counts() {
        let entry = |t: &str, users: &[&str]| Entry {
            format: 1,
            core: "c".into(),
            zone: "z".into(),
            time: t.parse().unwrap(),
            users: users.iter().map(|u| u.to_string()).collect(),
            reason: "art. 17".into(),
        };
        let entries = [
            entry("2026-12-01T00:00:00Z", &["a", "b"]),
            entry("2026-12-03T00:00:00Z", &["a"]),
        ];
        let at = erased_at(&entries);
        assert_eq!(
            at["a"],
            "2026-12-03T00:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert_eq!(
            at["b"],
            "2026-12-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert!(!at.contains_key("c"));
    }
}
