//! One audit record: the events zonevault records, and how a record is hashed.
//!
//! A record is a JSON object: `seq`, `time`, `core`, `zone`, `event`, the
//! event's fields, `prev` and `hash`. `hash` is BLAKE3 over the bytes of
//! `prev` (hex) followed by the canonical JSON of the record without `hash`:
//! keys sorted at every level, no whitespace. The line on disk is the
//! canonical JSON of the whole record, so a record hashes the same whoever
//! re-serializes it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::Target;

/// `prev` of the first record of a log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Where an object lives: enough for an auditor to find it without the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Place {
    pub target: String,
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
}

impl From<&Target> for Place {
    fn from(t: &Target) -> Place {
        Place {
            target: t.name.clone(),
            endpoint: t.endpoint.clone(),
            bucket: t.bucket.clone(),
            region: t.region.clone(),
        }
    }
}

/// What an object written to a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    /// One unit: `age(zstd(tar))` of user data.
    Unit,
    /// A snapshot's encrypted manifest.
    Manifest,
    /// A snapshot's cleartext index.
    Index,
    /// A detached signature of an index or a manifest.
    Signature,
    /// The zone marker of a target.
    Marker,
    /// An encrypted copy of audit records.
    AuditCopy,
    /// A data key: a user's (or the core's) age identity, wrapped to the
    /// zone's recipients ([`crate::datakeys`]). Deleting it shreds what
    /// was encrypted to it.
    Key,
    /// An erasure ledger entry: which users were erased, and when.
    Erasure,
}

/// An object an erasure made unreadable or removed, on one target.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Erased {
    pub target: String,
    pub key: String,
}

/// What an erasure could not do, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotErased {
    pub target: String,
    pub key: String,
    pub reason: String,
}

/// Where one user's unit is in a pack: recorded with the pack, so that an
/// erasure can overwrite exactly that range without reading any manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRange {
    pub user: String,
    /// Where the unit starts in the pack, and its stored size.
    pub at: u64,
    pub len: u64,
}

/// Everything zonevault records. The tag is the record's `event` field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A command loaded its configuration.
    ConfigLoaded {
        command: String,
        core_config: String,
        core_config_blake3: String,
        zone_map: String,
        zone_map_blake3: String,
    },
    /// A configuration was read and refused (a daemon reload): the old one stays.
    ConfigRejected { command: String, reason: String },
    /// A target passed the residency check.
    ResidencyPassed {
        #[serde(flatten)]
        place: Place,
        reported_region: String,
    },
    /// A target failed the residency check: nothing is written to it.
    ResidencyRefused {
        #[serde(flatten)]
        place: Place,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        reported_region: Option<String>,
        reason: String,
    },
    /// The residency check of a target could not be made.
    TargetUnavailable {
        #[serde(flatten)]
        place: Place,
        reason: String,
    },
    /// An object is about to be written to a target: recorded before the
    /// write starts (a PUT, or the creation of a multipart upload), so that
    /// nothing reaches a target that the log does not know is coming. Its
    /// `object_put` follows once it is written; without one, the object may
    /// exist until the next run's cleanup deletes it (recorded).
    UploadStarted {
        #[serde(flatten)]
        place: Place,
        key: String,
        kind: ObjectKind,
        /// A multipart upload (else a single PUT).
        multipart: bool,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        snapshot: Option<String>,
        #[serde(skip_serializing_if = "Vec::is_empty", default)]
        users: Vec<String>,
    },
    /// A multipart upload was abandoned: the target removed its parts.
    UploadAborted {
        #[serde(flatten)]
        place: Place,
        key: String,
        upload_id: String,
        reason: String,
    },
    /// An object was written. `bytes` and `blake3` are those of the stored
    /// (encrypted) object; `users` are the users whose data it holds.
    ObjectPut {
        #[serde(flatten)]
        place: Place,
        key: String,
        kind: ObjectKind,
        bytes: u64,
        blake3: String,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        snapshot: Option<String>,
        #[serde(skip_serializing_if = "Vec::is_empty", default)]
        users: Vec<String>,
        /// A pack's users' units: where each is (absent for a unit alone).
        #[serde(skip_serializing_if = "Vec::is_empty", default)]
        ranges: Vec<UserRange>,
        /// A pack: the units in it still readable, the users' and the
        /// shared ones (absent for a unit alone, and in older records).
        #[serde(skip_serializing_if = "is_zero", default)]
        packed: u64,
    },
    /// A snapshot's index was written to a target: the snapshot exists there.
    SnapshotCommitted {
        #[serde(flatten)]
        place: Place,
        snapshot: String,
        key: String,
        units: usize,
        plain_bytes: u64,
        stored_bytes: u64,
    },
    /// An object was read for a restore, by `os_user` on `host`.
    ObjectRead {
        #[serde(flatten)]
        place: Place,
        key: String,
        snapshot: String,
        #[serde(skip_serializing_if = "Vec::is_empty", default)]
        users: Vec<String>,
        os_user: String,
        host: String,
    },
    /// A restore finished.
    RestoreDone {
        snapshot: String,
        source_core: String,
        to: String,
        #[serde(skip_serializing_if = "Vec::is_empty", default)]
        users: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty", default)]
        volumes: Vec<String>,
        units: usize,
        files: u64,
        os_user: String,
        host: String,
    },
    /// Users were erased from the backups (`zonevault erase`): their key
    /// objects deleted (which makes every copy of their units unreadable),
    /// their unit objects deleted, their ranges of packs overwritten; what
    /// could not be done is `pending`, with why. Travels with the audit
    /// copies, and restores honour it.
    UserErased {
        users: Vec<String>,
        reason: String,
        /// `complete`, or `incomplete` when something is pending.
        outcome: String,
        #[serde(skip_serializing_if = "Vec::is_empty", default)]
        shredded: Vec<Erased>,
        #[serde(skip_serializing_if = "Vec::is_empty", default)]
        deleted: Vec<Erased>,
        #[serde(skip_serializing_if = "Vec::is_empty", default)]
        scrubbed: Vec<Erased>,
        #[serde(skip_serializing_if = "Vec::is_empty", default)]
        pending: Vec<NotErased>,
        os_user: String,
        host: String,
    },
    /// An object is about to be deleted: recorded before the deletion is
    /// asked for; `object_deleted` follows once the target confirmed it.
    /// Until then the object counts as present.
    DeleteStarted {
        #[serde(flatten)]
        place: Place,
        key: String,
        reason: String,
    },
    /// A write whose `upload_started` is on record failed, and the target
    /// confirmed that no object is under its key: it ends that intent.
    ObjectAbsent {
        #[serde(flatten)]
        place: Place,
        key: String,
        reason: String,
    },
    /// An object was deleted.
    ObjectDeleted {
        #[serde(flatten)]
        place: Place,
        key: String,
        reason: String,
    },
    /// A snapshot was forgotten by retention.
    SnapshotForgotten {
        #[serde(flatten)]
        place: Place,
        snapshot: String,
        reason: String,
    },
    /// A volume's hook (`phase` `before` or `after`) or dump command
    /// (`phase` `command`) is about to run.
    HookStarted {
        volume: String,
        phase: String,
        command: Vec<String>,
        snapshot: String,
    },
    /// A hook or dump command ended: `status` is `exit N`, `signal N`,
    /// `timeout` or `error` (could not be started).
    HookFinished {
        volume: String,
        phase: String,
        command: Vec<String>,
        snapshot: String,
        status: String,
        millis: u64,
    },
    /// A command failed.
    RunFailed {
        command: String,
        exit: u8,
        /// The failure's kind ([`crate::error::Reason`]): `residency`,
        /// `unavailable`, `credentials`, `config`, `integrity`, `other`.
        failure: String,
        reason: String,
    },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Event {
    /// Every event kind, as it appears in the `event` field.
    pub const KINDS: &'static [&'static str] = &[
        "config_loaded",
        "config_rejected",
        "residency_passed",
        "residency_refused",
        "target_unavailable",
        "upload_started",
        "upload_aborted",
        "object_put",
        "snapshot_committed",
        "object_read",
        "restore_done",
        "user_erased",
        "delete_started",
        "object_absent",
        "object_deleted",
        "snapshot_forgotten",
        "run_failed",
        "hook_started",
        "hook_finished",
    ];
}

/// The hash of a record: BLAKE3 over `prev` then the canonical JSON of the
/// record without its `hash` field.
pub fn hash(prev: &str, record_without_hash: &Map<String, Value>) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(prev.as_bytes());
    hasher.update(canonical(&Value::Object(record_without_hash.clone())).as_bytes());
    hasher.finalize().to_hex().to_string()
}

/// Canonical JSON: object keys sorted at every level, no whitespace. Written
/// here rather than left to `serde_json`'s map order, which a feature flag
/// anywhere in the build could change.
pub fn canonical(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Builds the record that follows (`seq - 1`, `prev`): returns its line
/// (without the newline) and its hash.
pub fn seal(
    event: &Event,
    seq: u64,
    time: &str,
    core: &str,
    zone: &str,
    prev: &str,
) -> (String, String) {
    let Value::Object(mut map) = serde_json::to_value(event).expect("events serialize") else {
        unreachable!("an event serializes to an object")
    };
    map.insert("time".into(), time.into());
    map.insert("core".into(), core.into());
    map.insert("zone".into(), zone.into());
    reseal(map, seq, prev)
}

/// Gives a record (its own fields, time and all) a new place in a chain:
/// `seq`, `prev`, and the hash that follows. Returns its line and hash.
pub fn reseal(mut map: Map<String, Value>, seq: u64, prev: &str) -> (String, String) {
    map.remove("hash");
    map.insert("seq".into(), seq.into());
    map.insert("prev".into(), prev.into());
    let hash = hash(prev, &map);
    map.insert("hash".into(), hash.clone().into());
    (canonical(&Value::Object(map)), hash)
}

/// A record read back from a log or a copy.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The whole record, `hash` included.
    pub fields: Map<String, Value>,
}

impl Stored {
    /// Parses one line. `None` when it is not a JSON object.
    pub fn parse(line: &str) -> Option<Stored> {
        match serde_json::from_str(line) {
            Ok(Value::Object(fields)) => Some(Stored { fields }),
            _ => None,
        }
    }

    pub fn seq(&self) -> Option<u64> {
        self.fields.get("seq")?.as_u64()
    }

    pub fn str(&self, field: &str) -> Option<&str> {
        self.fields.get(field)?.as_str()
    }

    pub fn event(&self) -> &str {
        self.str("event").unwrap_or("")
    }

    pub fn hash(&self) -> Option<&str> {
        self.str("hash")
    }

    pub fn prev(&self) -> Option<&str> {
        self.str("prev")
    }

    /// Whether `hash` is what the rest of the record hashes to.
    pub fn hash_holds(&self) -> bool {
        let (Some(hash), Some(prev)) = (self.hash(), self.prev()) else {
            return false;
        };
        let mut rest = self.fields.clone();
        rest.remove("hash");
        self::hash(prev, &rest) == hash
    }

    /// The event, typed; `None` for a kind this version does not know.
    pub fn typed(&self) -> Option<Event> {
        serde_json::from_value(Value::Object(self.fields.clone())).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place() -> Place {
        Place {
            target: "ch-primary".into(),
            endpoint: "https://s3.example".into(),
            bucket: "b".into(),
            region: "ch-gva-2".into(),
        }
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let v: Value =
            serde_json::from_str(r#"{"b":1,"a":{"z":[{"y":1,"x":2}],"c":"é\"q"}}"#).unwrap();
        assert_eq!(
            canonical(&v),
            r#"{"a":{"c":"é\"q","z":[{"x":2,"y":1}]},"b":1}"#
        );
    }

    #[test]
    fn a_sealed_record_verifies_and_any_edit_breaks_it() {
        let event = Event::ObjectPut {
            place: place(),
            key: "zonevault/core/objects/x.tar.zst.age".into(),
            kind: ObjectKind::Unit,
            bytes: 42,
            blake3: "ab".into(),
            snapshot: Some("20261126T000000Z-0001".into()),
            users: vec!["u1".into()],
            ranges: Vec::new(),
            packed: 0,
        };
        let (line, hash) = seal(&event, 7, "2026-11-26T00:00:00.000Z", "core", "ch", GENESIS);
        let stored = Stored::parse(&line).unwrap();
        assert!(stored.hash_holds());
        assert_eq!(stored.hash(), Some(hash.as_str()));
        assert_eq!(stored.seq(), Some(7));
        assert_eq!(stored.typed(), Some(event));
        let edited = Stored::parse(&line.replace("\"bytes\":42", "\"bytes\":43")).unwrap();
        assert!(!edited.hash_holds());
    }

    #[test]
    fn every_kind_is_listed() {
        let events = [
            Event::HookStarted {
                volume: "v".into(),
                phase: "before".into(),
                command: vec!["true".into()],
                snapshot: "s".into(),
            },
            Event::HookFinished {
                volume: "v".into(),
                phase: "after".into(),
                command: vec!["true".into()],
                snapshot: "s".into(),
                status: "exit 0".into(),
                millis: 3,
            },
            Event::RunFailed {
                command: "backup".into(),
                exit: 1,
                failure: "unavailable".into(),
                reason: "r".into(),
            },
            Event::TargetUnavailable {
                place: place(),
                reason: "r".into(),
            },
            Event::UploadStarted {
                place: place(),
                key: "k".into(),
                kind: ObjectKind::Unit,
                multipart: true,
                snapshot: None,
                users: vec![],
            },
            Event::UploadAborted {
                place: place(),
                key: "k".into(),
                upload_id: "u".into(),
                reason: "r".into(),
            },
            Event::DeleteStarted {
                place: place(),
                key: "k".into(),
                reason: "r".into(),
            },
            Event::ObjectAbsent {
                place: place(),
                key: "k".into(),
                reason: "r".into(),
            },
        ];
        for e in events {
            let v = serde_json::to_value(&e).unwrap();
            assert!(Event::KINDS.contains(&v["event"].as_str().unwrap()));
        }
    }
}
