//! Where things live inside a target (bucket + prefix), as DESIGN.md fixes it.

use crate::config::Target;

/// Key of the marker, relative to the target's prefix.
pub const MARKER: &str = "zonevault.json";

/// A key relative to a target's prefix: the only kind of key that a writer
/// ([`crate::residency::Writable`]) accepts, so every write and deletion
/// stays under the prefix of the target that passed the gate. Made by the
/// functions of this module, from a snapshot's index ([`Key::parse`]) or
/// from a listing of the target ([`Key::listed`]). A clone shares the
/// text (the records of a pack's units all name it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(std::sync::Arc<str>);

impl Key {
    /// A relative key as an index or manifest names it; `None` when it is
    /// empty or absolute.
    pub fn parse(rel: &str) -> Option<Key> {
        (!rel.is_empty() && !rel.starts_with('/')).then(|| Key(rel.into()))
    }

    /// The relative key of `full`, a key listed on `target`; `None` when it
    /// is not under the target's prefix.
    pub fn listed(target: &Target, full: &str) -> Option<Key> {
        let rel = if target.prefix.is_empty() {
            full
        } else {
            full.strip_prefix(target.prefix.as_str())?
                .strip_prefix('/')?
        };
        Key::parse(rel)
    }

    /// The marker's key.
    pub fn marker() -> Key {
        Key(MARKER.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The text, shared (for a record that names the object).
    pub fn shared(&self) -> std::sync::Arc<str> {
        std::sync::Arc::clone(&self.0)
    }
}

impl std::ops::Deref for Key {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The version of the layout that this zonevault writes and reads.
pub const FORMAT: u32 = 1;

/// `<core>/objects/` (relative to the target's prefix).
pub fn objects_dir(core: &str) -> String {
    format!("{core}/objects/")
}

/// `<core>/snapshots/`.
pub fn snapshots_dir(core: &str) -> String {
    format!("{core}/snapshots/")
}

/// A new object key for one unit: random, so that it never carries a user id.
pub fn new_object_key(core: &str) -> Key {
    Key(format!("{core}/objects/{}.tar.zst.age", random_name()).into())
}

/// A new key for a pack of small units ([`crate::pack`]): random like a
/// unit's; `.pack` because the object is several `age` files end to end,
/// not one.
pub fn new_pack_key(core: &str) -> Key {
    Key(format!("{core}/objects/{}.pack", random_name()).into())
}

/// `<core>/keys/`: the core's data keys ([`crate::datakeys`]).
pub fn keys_dir(core: &str) -> String {
    format!("{core}/keys/")
}

/// A new data key object: random, so that it never carries a user id.
pub fn new_data_key(core: &str) -> Key {
    Key(format!("{core}/keys/{}.age", random_name()).into())
}

/// The random part of a data key object's name (`<core>/keys/<32 hex>.age`),
/// as a number: what a backup keeps of the 100,000 key objects it lists.
pub fn data_key_id(rel: &str) -> Option<u128> {
    let name = rel.rsplit('/').next()?.strip_suffix(".age")?;
    (name.len() == 32)
        .then(|| u128::from_str_radix(name, 16).ok())
        .flatten()
}

/// `<core>/erasures/`: the erasure ledger ([`crate::repository::erasures`]).
pub fn erasures_dir(core: &str) -> String {
    format!("{core}/erasures/")
}

/// A new ledger entry, named by its time (they list in order) and a random
/// part; no user id.
pub fn new_erasure_key(core: &str, time: chrono::DateTime<chrono::Utc>) -> Key {
    Key(format!(
        "{core}/erasures/{}-{}.json.age",
        time.format("%Y%m%dT%H%M%SZ"),
        &random_name()[..12]
    )
    .into())
}

/// 32 random hex digits.
fn random_name() -> String {
    use rand::RngCore;
    let mut id = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut id);
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// `<core>/snapshots/<id>.manifest.age`.
pub fn manifest_key(core: &str, snapshot: &str) -> Key {
    Key(format!("{core}/snapshots/{snapshot}.manifest.age").into())
}

/// `<core>/snapshots/<id>.json`: the cleartext index, written last.
pub fn index_key(core: &str, snapshot: &str) -> Key {
    Key(format!("{core}/snapshots/{snapshot}.json").into())
}

/// The snapshot id of an index key, if `key` (relative) is one.
pub fn snapshot_of_index(key: &str) -> Option<&str> {
    let name = key.rsplit('/').next()?;
    name.strip_suffix(".json")
}

/// Whether `s` has the shape of a snapshot id (`YYYYMMDDTHHMMSSZ-<hex>`).
pub fn is_snapshot_id(s: &str) -> bool {
    let Some((time, random)) = s.split_once('-') else {
        return false;
    };
    let t = time.as_bytes();
    t.len() == 16
        && t[8] == b'T'
        && t[15] == b'Z'
        && t[..8].iter().chain(&t[9..15]).all(u8::is_ascii_digit)
        && (1..=16).contains(&random.len())
        && random.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `<core>/audit/`: the encrypted copies of the core's audit log.
pub fn audit_dir(core: &str) -> String {
    format!("{core}/audit/")
}

/// `<core>/audit/<first>-<last>.jsonl.age`: a copy of records `first..=last`.
/// Sequence numbers are zero-padded to 12 digits so the copies list in order.
pub fn audit_copy_key(core: &str, first: u64, last: u64) -> Key {
    Key(format!("{core}/audit/{first:012}-{last:012}.jsonl.age").into())
}

/// `<key>.minisig`: the detached signature of the object under `key`.
pub fn signature_key(key: &str) -> Key {
    Key(format!("{key}{}", crate::signing::SUFFIX).into())
}

/// The record range of an audit copy's key (relative or full), if it is one.
pub fn audit_copy_range(key: &str) -> Option<(u64, u64)> {
    let name = key.rsplit('/').next()?.strip_suffix(".jsonl.age")?;
    let (first, last) = name.split_once('-')?;
    let (first, last) = (first.parse().ok()?, last.parse().ok()?);
    (first >= 1 && first <= last).then_some((first, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_ids_are_recognised() {
        assert!(is_snapshot_id("20261126T023000Z-3f9a"));
        assert!(is_snapshot_id("20261126T023000Z-3f9a01c2d4e5"));
        for bad in [
            "empty",
            "20261126T023000Z",
            "20261126X023000Z-3f",
            "20261126T023000Z-xyz",
            "2026112T023000Z-3f",
        ] {
            assert!(!is_snapshot_id(bad), "{bad}");
        }
    }

    #[test]
    fn listed_keys_are_relative_to_the_prefix_or_refused() {
        let mut t = crate::config::Target {
            name: "t".into(),
            zone: "ch".into(),
            endpoint: "http://127.0.0.1:1".into(),
            region: "r".into(),
            bucket: "b".into(),
            prefix: "zv".into(),
            path_style: true,
        };
        assert_eq!(
            Key::listed(&t, "zv/c/objects/a").map(|k| k.to_string()),
            Some("c/objects/a".into())
        );
        for outside in ["zvx/c/objects/a", "other/zv/a", "zv", "zv/", "zv//a"] {
            assert_eq!(Key::listed(&t, outside), None, "{outside}");
        }
        t.prefix.clear();
        assert_eq!(Key::listed(&t, "c/a").unwrap().as_str(), "c/a");
        assert_eq!(Key::parse(""), None);
        assert_eq!(Key::parse("/abs"), None);
    }

    #[test]
    fn audit_copy_keys_round_trip_and_sort() {
        let key = audit_copy_key("core-ch-1", 7, 1234);
        assert_eq!(
            key.as_str(),
            "core-ch-1/audit/000000000007-000000001234.jsonl.age"
        );
        assert_eq!(audit_copy_range(&key), Some((7, 1234)));
        assert_eq!(
            audit_copy_range(&format!("zonevault/{key}")),
            Some((7, 1234))
        );
        assert!(audit_copy_key("c", 9, 9) < audit_copy_key("c", 10, 10));
        for bad in [
            "c/audit/5-4.jsonl.age",
            "c/audit/0-4.jsonl.age",
            "c/audit/x-4.jsonl.age",
            "c/audit/4.jsonl.age",
            "c/audit/1-2.json",
        ] {
            assert_eq!(audit_copy_range(bad), None, "{bad}");
        }
    }
}
