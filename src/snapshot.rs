//! Snapshots: the encrypted manifest (what is in each unit) and the cleartext
//! index (object keys and sizes only), written last.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::units::UnitKind;

/// A new snapshot id: UTC time, then 4 random hex digits (`20261126T023000Z-3f9a`).
/// Ids sort by time.
pub fn new_id(now: DateTime<Utc>) -> String {
    use rand::Rng;
    format!(
        "{}-{:04x}",
        now.format("%Y%m%dT%H%M%SZ"),
        rand::thread_rng().r#gen::<u16>()
    )
}

/// One unit in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitRecord {
    pub volume: String,
    #[serde(flatten)]
    pub kind: UnitKind,
    /// Object key relative to the target prefix.
    pub object: String,
    pub plain_size: u64,
    pub stored_size: u64,
    /// BLAKE3 of the plain tar, hex.
    pub blake3: String,
    /// Entries in the tar.
    pub files: u64,
    /// The unit's change fingerprint when it was stored ([`crate::units::fingerprint`]).
    #[serde(default)]
    pub fingerprint: String,
}

/// `<id>.manifest.age`: encrypted to the zone's recipients; holds user ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub snapshot: String,
    pub time: DateTime<Utc>,
    pub core: String,
    pub zone: String,
    pub units: Vec<UnitRecord>,
}

/// An object referenced by an index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexObject {
    pub key: String,
    pub size: u64,
}

/// `<id>.json`: cleartext, no personal data. Lets a core that cannot decrypt
/// list snapshots and apply retention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    pub format: u32,
    pub id: String,
    pub time: DateTime<Utc>,
    pub core: String,
    pub zone: String,
    pub tool_version: String,
    pub manifest: IndexObject,
    pub objects: Vec<IndexObject>,
    pub units: usize,
    pub plain_bytes: u64,
    pub stored_bytes: u64,
}

impl Index {
    /// The keys (relative to the target prefix) this snapshot needs: its
    /// manifest and every unit object, including those of earlier snapshots.
    pub fn references(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.manifest.key.as_str())
            .chain(self.objects.iter().map(|o| o.key.as_str()))
    }
}

/// Every key (relative to the target prefix) that `indexes` need: what a
/// sweep must not delete.
pub fn references<'a>(indexes: impl IntoIterator<Item = &'a Index>) -> HashSet<String> {
    indexes
        .into_iter()
        .flat_map(|i| i.references().map(str::to_string))
        .collect()
}
