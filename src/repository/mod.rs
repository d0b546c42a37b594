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

pub mod audit_copies;
pub mod commit;
pub mod layout;
pub mod marker;
pub mod snapshot;
pub mod sweep;

pub use sweep::{abort_uploads, clean_uncommitted, sweep};

use crate::repository::snapshot::Index;
use crate::storage::ReadBackend;

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
    for f in store
        .list(&target.key(&layout::snapshots_dir(core)))
        .await?
    {
        let Some(id) = layout::snapshot_of_index(&f.key) else {
            continue;
        };
        let Some(bytes) = store.get(&f.key).await? else {
            continue;
        };
        let index = match serde_json::from_slice::<Index>(&bytes) {
            Ok(index) if index.id == id && index.core == core => index,
            Ok(index) => {
                tracing::warn!(target = %target.name, key = %f.key, "skipping {}: it names snapshot {} of core {}, not the snapshot its name says", f.key, index.id, index.core);
                continue;
            }
            Err(e) => {
                tracing::warn!(target = %target.name, key = %f.key, "skipping {}: not a snapshot index ({e})", f.key);
                continue;
            }
        };
        indexes.push(index);
    }
    // By time (ids of the same second differ only in their random part).
    indexes.sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
    Ok(indexes)
}
