//! The repository: what lives under a target's prefix, and the one place
//! that knows it. Reads take any [`ReadBackend`]; writes go through the
//! gate's [`crate::residency::Writable`], so nothing here can write to a
//! target that did not pass.
//!
//! - [`layout`]: the keys (`Key`, relative to the prefix) of everything below.
//! - [`marker`]: `zonevault.json`, which zone the target holds.
//! - [`snapshot`]: the formats of a snapshot's manifest (encrypted) and
//!   index (cleartext); [`indexes`] lists a core's committed snapshots.
//! - [`commit`]: a snapshot's manifest, signatures and index, written last.
//! - [`sweep`]: what no committed snapshot references goes, on record.
//! - [`audit_copies`]: the encrypted copies of the audit log.
//! - [`erasures`]: the erasure ledger, which restores honour.

pub mod audit_copies;
pub mod commit;
pub mod erasures;
pub mod layout;
pub mod marker;
pub mod snapshot;
pub mod sweep;

pub use sweep::{abort_uploads, clean_uncommitted, sweep};

use crate::repository::snapshot::Index;
use crate::storage::ReadBackend;

/// Index reads in flight at once: an index of 100,000 units is megabytes,
/// and a far store answers each after a round trip.
const INDEX_READS: usize = 4;

/// Every committed snapshot index of `core` on one target, oldest first
/// (so `latest` is the last). An object under `snapshots/` that is not an
/// index of this core (empty, foreign, named for another id) is skipped
/// with a warning: it must not stop the restore of an intact snapshot, nor
/// the next backup.
pub async fn indexes<S: ReadBackend>(
    store: &S,
    target: &crate::config::Target,
    core: &str,
) -> anyhow::Result<Vec<Index>> {
    let mut indexes = Vec::new();
    each_index(store, target, core, |index| indexes.push(index)).await?;
    // By time (ids of the same second differ only in their random part).
    indexes.sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
    Ok(indexes)
}

/// Every key (relative to the target prefix) that the committed snapshots
/// of `core` on one target need ([`snapshot::references`]), read index by
/// index: a core with many snapshots of many units never holds them all.
pub async fn references<S: ReadBackend>(
    store: &S,
    target: &crate::config::Target,
    core: &str,
) -> anyhow::Result<std::collections::HashSet<String>> {
    let mut keys = std::collections::HashSet::new();
    each_index(store, target, core, |index| {
        keys.extend(snapshot::references([&index]));
    })
    .await?;
    Ok(keys)
}

/// Reads the committed indexes of `core` on one target, a few at once, and
/// gives each to `take` as it is parsed (in no particular order).
async fn each_index<S: ReadBackend>(
    store: &S,
    target: &crate::config::Target,
    core: &str,
    mut take: impl FnMut(Index),
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let listed = store
        .list(&target.key(&layout::snapshots_dir(core)))
        .await?;
    let mut reads = futures::stream::iter(listed.into_iter().filter_map(|f| {
        let id = layout::snapshot_of_index(&f.key)?.to_string();
        Some(async move {
            let bytes = store.get(&f.key).await?;
            anyhow::Ok((f.key, id, bytes))
        })
    }))
    .buffer_unordered(INDEX_READS);
    while let Some(read) = reads.next().await {
        let (key, id, Some(bytes)) = read? else {
            continue;
        };
        let parsed = crate::blocking::run("parsing a snapshot index", move || {
            serde_json::from_slice::<Index>(&bytes)
        })
        .await?;
        match parsed {
            Ok(index) if index.id == id && index.core == core => take(index),
            Ok(index) => {
                tracing::warn!(target = %target.name, key = %key, "skipping {key}: it names snapshot {} of core {}, not the snapshot its name says", index.id, index.core);
            }
            Err(e) => {
                tracing::warn!(target = %target.name, key = %key, "skipping {key}: not a snapshot index ({e})");
            }
        }
    }
    Ok(())
}
