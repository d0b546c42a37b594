//! Snapshots: the encrypted manifest (what is in each unit) and the cleartext
//! index (object keys and sizes only), written last.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::units::UnitKind;

/// A new snapshot id: UTC time, then 12 random hex digits
/// (`20261126T023000Z-3f9a01c2d4e5`). Ids sort by time; 48 random bits make
/// two runs of one second collide about once in 10^14 pairs, and a commit
/// never overwrites an index anyway ([`crate::residency::Writable::put_new`]).
pub fn new_id(now: DateTime<Utc>) -> String {
    use rand::Rng;
    format!(
        "{}-{:012x}",
        now.format("%Y%m%dT%H%M%SZ"),
        rand::thread_rng().r#gen::<u64>() & 0xffff_ffff_ffff
    )
}

/// One unit in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitRecord {
    /// Shared with the run's other records of the volume.
    pub volume: std::sync::Arc<str>,
    #[serde(flatten)]
    pub kind: UnitKind,
    /// Object key relative to the target prefix (shared by the units of a
    /// pack).
    pub object: std::sync::Arc<str>,
    /// Where the unit starts in its object, when the object is a pack of
    /// small units ([`crate::pack`]); absent: the unit is the whole object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// The size of the whole object, when it is a pack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_size: Option<u64>,
    pub plain_size: u64,
    /// The unit's stored bytes: the object, or its range of the pack.
    pub stored_size: u64,
    /// BLAKE3 of the plain tar.
    pub blake3: crate::hash::Blake3,
    /// Entries in the tar.
    pub files: u64,
    /// The unit's change fingerprint when it was stored ([`crate::units::fingerprint`]).
    #[serde(default, with = "crate::hash::or_empty")]
    pub fingerprint: Option<crate::hash::Blake3>,
    /// The directories (relative to the volume root) the unit holds beyond
    /// what its kind implies: a user's (`<a>/<b>/<c>/<userId>`, and on Pryv
    /// v2 `<x>/<y>/<z>/user.<username>`), or the user-shaped directories
    /// that no user claims, held by the shared unit. Names hold usernames:
    /// only in the encrypted manifest. Empty in older manifests (a user unit
    /// then holds its userId directory).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dirs: Vec<std::path::PathBuf>,
    /// The key object whose identity decrypts the unit (relative to the
    /// target prefix): the user's for a user unit, the core's otherwise
    /// ([`crate::datakeys`]). Absent in older manifests: the unit is then
    /// encrypted to the zone's recipients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_key: Option<std::sync::Arc<str>>,
}

impl UnitRecord {
    /// The bytes of its object that are the unit: `None` for the whole
    /// object, else the range in the pack.
    pub fn range(&self) -> Option<std::ops::Range<u64>> {
        self.offset.map(|o| o..o + self.stored_size)
    }
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

/// A manifest to write, borrowing its units: serializes exactly as
/// [`Manifest`] (a run of 100,000 units does not copy them to write it).
#[derive(Debug, Serialize)]
pub struct ManifestRef<'a> {
    pub format: u32,
    pub snapshot: &'a str,
    pub time: DateTime<Utc>,
    pub core: &'a str,
    pub zone: &'a str,
    pub units: &'a [UnitRecord],
}

/// An index to write, borrowing the units it lists: serializes exactly as
/// [`Index`] (the objects of 100,000 units are not copied to write it).
#[derive(Debug, Serialize)]
pub struct IndexRef<'a> {
    pub format: u32,
    pub id: &'a str,
    pub time: DateTime<Utc>,
    pub core: &'a str,
    pub zone: &'a str,
    pub tool_version: &'a str,
    pub manifest: IndexObject,
    #[serde(serialize_with = "objects_of")]
    pub objects: &'a [UnitRecord],
    #[serde(flatten)]
    pub totals: Totals,
}

/// How much a snapshot holds, as its index says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub units: usize,
    pub plain_bytes: u64,
    pub stored_bytes: u64,
}

impl Totals {
    pub fn of(units: &[UnitRecord]) -> Totals {
        Totals {
            units: units.len(),
            plain_bytes: units.iter().map(|r| r.plain_size).sum(),
            stored_bytes: units.iter().map(|r| r.stored_size).sum(),
        }
    }
}

/// The index's `objects`: each object the units are in, once (a pack holds
/// many units), with its size.
fn objects_of<S: serde::Serializer>(units: &&[UnitRecord], s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Object<'a> {
        key: &'a str,
        size: u64,
    }
    s.collect_seq(distinct_objects(units).map(|u| Object {
        key: &u.object,
        size: u.object_size.unwrap_or(u.stored_size),
    }))
}

/// One unit of each object the units are in: every unit that is a whole
/// object, the first unit of each pack.
fn distinct_objects(units: &[UnitRecord]) -> impl Iterator<Item = &UnitRecord> {
    let mut seen = HashSet::new();
    units
        .iter()
        .filter(move |u| u.offset.is_none() || seen.insert(&*u.object))
}

impl IndexRef<'_> {
    /// How many objects the index lists.
    pub fn object_count(&self) -> usize {
        distinct_objects(self.objects).count()
    }
}

/// An object referenced by an index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexObject {
    pub key: String,
    pub size: u64,
    /// For the manifest: the key object whose identity decrypts it (the
    /// core's data key); absent in older indexes (encrypted to the zone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_key: Option<String>,
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

impl Index {
    /// The keys of the detached signatures of this snapshot's index and
    /// manifest (present when the core signs its commits).
    pub fn signatures(&self) -> [crate::repository::layout::Key; 2] {
        [
            crate::repository::layout::signature_key(&crate::repository::layout::index_key(
                &self.core, &self.id,
            )),
            crate::repository::layout::signature_key(&self.manifest.key),
        ]
    }
}

/// Every key (relative to the target prefix) that `indexes` need: what a
/// sweep must not delete.
pub fn references<'a>(indexes: impl IntoIterator<Item = &'a Index>) -> HashSet<String> {
    indexes
        .into_iter()
        .flat_map(|i| {
            i.references()
                .map(str::to_string)
                .chain(i.signatures().map(|k| k.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_of_one_second_do_not_collide() {
        let now = Utc::now();
        let ids: HashSet<String> = (0..100_000).map(|_| new_id(now)).collect();
        assert_eq!(ids.len(), 100_000);
        let id = ids.iter().next().unwrap();
        assert_eq!(id.len(), "20261126T023000Z-".len() + 12, "{id}");
    }
}
