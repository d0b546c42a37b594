//! Where things live inside a target (bucket + prefix), as DESIGN.md fixes it.

use serde::{Deserialize, Serialize};

/// Key of the marker, relative to the target's prefix.
pub const MARKER: &str = "zonevault.json";

/// The version of the layout that this zonevault writes and reads.
pub const FORMAT: u32 = 1;

/// `<prefix>/zonevault.json`: which zone a target holds backups of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub format: u32,
    pub zone: String,
}

impl Marker {
    /// The marker of `zone`.
    pub fn new(zone: &str) -> Marker {
        Marker {
            format: FORMAT,
            zone: zone.to_string(),
        }
    }
}

/// `<core>/objects/` (relative to the target's prefix).
pub fn objects_dir(core: &str) -> String {
    format!("{core}/objects/")
}

/// `<core>/snapshots/`.
pub fn snapshots_dir(core: &str) -> String {
    format!("{core}/snapshots/")
}

/// A new object key: random, so that it never carries a user id.
pub fn new_object_key(core: &str) -> String {
    use rand::RngCore;
    let mut id = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut id);
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!("{core}/objects/{hex}.tar.zst.age")
}

/// `<core>/snapshots/<id>.manifest.age`.
pub fn manifest_key(core: &str, snapshot: &str) -> String {
    format!("{core}/snapshots/{snapshot}.manifest.age")
}

/// `<core>/snapshots/<id>.json`: the cleartext index, written last.
pub fn index_key(core: &str, snapshot: &str) -> String {
    format!("{core}/snapshots/{snapshot}.json")
}

/// The snapshot id of an index key, if `key` (relative) is one.
pub fn snapshot_of_index(key: &str) -> Option<&str> {
    let name = key.rsplit('/').next()?;
    name.strip_suffix(".json")
}
