//! Questions asked of the local log: where is a user's data (`audit where`),
//! and which records match (`audit show`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Result;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

use super::log;
use super::record::{Event, ObjectKind, Place, Stored};

/// One object that holds a user's data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Location {
    pub zone: String,
    #[serde(flatten)]
    pub place: Place,
    pub key: String,
    pub snapshot: Option<String>,
    /// When the object was written (or, unconfirmed, when its write started).
    pub time: String,
    pub bytes: u64,
    pub status: Status,
    /// Shredded: why the ciphertext is still there (e.g. locked until D).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What the log knows of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Written and recorded (`object_put`).
    Stored,
    /// Its write started and never ended on record (a crash, a write that
    /// failed and may have landed): it may be on the target until a cleanup
    /// deletes it or confirms it absent.
    Unconfirmed,
    /// The user was erased: the key that decrypts it is destroyed, but the
    /// ciphertext could not be removed yet (`note` says why). Unreadable.
    Shredded,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Stored => "stored",
            Status::Unconfirmed => "unconfirmed",
            Status::Shredded => "shredded, unreadable",
        }
    }
}

/// What became of an object that held a user's data (or key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Written and recorded.
    Stored,
    /// Its write started, with no outcome on record.
    Unconfirmed,
    /// Deleted, or confirmed absent, on record.
    Gone,
    /// Written again without the user's unit (an erasure overwrote their
    /// range of a pack).
    Scrubbed,
    /// Still there after the user's erasure, which could not remove it.
    Shredded,
}

/// An object of kind `unit` or `key` that the log records for a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    pub zone: String,
    pub place: Place,
    pub key: String,
    pub kind: ObjectKind,
    pub snapshot: Option<String>,
    /// The seq and time of the start of its write (of the write itself when
    /// the log has no start).
    pub seq: u64,
    pub time: String,
    /// Size and BLAKE3 of the stored object, as its last write recorded.
    pub bytes: u64,
    pub blake3: String,
    /// Every user whose data the object holds, as its last write recorded.
    pub users: Vec<String>,
    /// The user's ranges when the object is a pack: (offset, length).
    pub mine: Vec<(u64, u64)>,
    /// Every user's range in the pack, as its last write recorded.
    pub ranges: Vec<super::record::UserRange>,
    /// In a pack: the units it holds that are still readable (0: not a
    /// pack, or a pack recorded before this was).
    pub packed: u64,
    pub fate: Fate,
    /// Why an erasure could not remove it.
    pub note: Option<String>,
}

/// Which object a record names, and when.
struct At {
    zone: String,
    place: Place,
    key: String,
    kind: ObjectKind,
    snapshot: Option<String>,
    seq: u64,
    time: String,
}

impl At {
    /// A holding of this object whose write started, nothing more known.
    fn holding(self) -> Holding {
        Holding {
            zone: self.zone,
            place: self.place,
            key: self.key,
            kind: self.kind,
            snapshot: self.snapshot,
            seq: self.seq,
            time: self.time,
            bytes: 0,
            blake3: String::new(),
            users: Vec::new(),
            mine: Vec::new(),
            ranges: Vec::new(),
            packed: 0,
            fate: Fate::Unconfirmed,
            note: None,
        }
    }
}

impl Holding {
    /// Whether the object may still be on the target, readable.
    pub fn live(&self) -> bool {
        matches!(self.fate, Fate::Stored | Fate::Unconfirmed)
    }
}

/// Every object of kind `unit` or `key` that the log ever recorded for
/// `user`, in the order their writes started, with what became of each:
/// counted from the write's intent (`upload_started`), so a crash between a
/// write and its record hides nothing. A `user_erased` of the user turns
/// what it could not remove into [`Fate::Shredded`].
pub fn holdings(path: &Path, user: &str) -> Result<Vec<Holding>> {
    // (target, key) → holding: a deletion on one target leaves the copies
    // on the others.
    let mut held: BTreeMap<(String, String), Holding> = BTreeMap::new();
    for line in log::lines(path)? {
        let line = line?;
        let Some(record) = Stored::parse(&line.text) else {
            continue;
        };
        if !matches!(
            record.event(),
            "upload_started"
                | "object_put"
                | "upload_aborted"
                | "object_absent"
                | "object_deleted"
                | "user_erased"
        ) {
            continue;
        }
        let seq = record.seq().unwrap_or(0);
        let time = record.str("time").unwrap_or_default().to_string();
        let zone = record.str("zone").unwrap_or_default().to_string();
        match record.typed() {
            Some(Event::UploadStarted {
                place,
                key,
                kind: kind @ (ObjectKind::Unit | ObjectKind::Key),
                snapshot,
                users,
                ..
            }) if users.iter().any(|u| u == user) => {
                let id = (place.target.clone(), key.clone());
                // an object written again (an erasure zeroing another
                // user's range): it is there whatever this write does
                if held.get(&id).is_some_and(Holding::live) {
                    continue;
                }
                let at = At {
                    zone,
                    place,
                    key,
                    kind,
                    snapshot,
                    seq,
                    time,
                };
                held.insert(
                    id,
                    Holding {
                        users,
                        ..at.holding()
                    },
                );
            }
            Some(Event::ObjectPut {
                place,
                key,
                kind: kind @ (ObjectKind::Unit | ObjectKind::Key),
                bytes,
                blake3,
                snapshot,
                users,
                ranges,
                packed,
            }) => {
                let id = (place.target.clone(), key.clone());
                if !users.iter().any(|u| u == user) {
                    // a pack written again without the user (a key object
                    // written again, by `rewrap`, is still the user's)
                    if let Some(h) = held
                        .get_mut(&id)
                        .filter(|h| h.live() && kind == ObjectKind::Unit)
                    {
                        h.fate = Fate::Scrubbed;
                    }
                    continue;
                }
                let mine = ranges
                    .iter()
                    .filter(|r| r.user == user)
                    .map(|r| (r.at, r.len))
                    .collect();
                // ordered by the start of its write when that is on record;
                // an object written again keeps its first write's place
                let (seq, time, snapshot) = match held.get(&id) {
                    Some(h) if h.live() => (h.seq, h.time.clone(), h.snapshot.clone()),
                    _ => (seq, time, snapshot),
                };
                let at = At {
                    zone,
                    place,
                    key,
                    kind,
                    snapshot,
                    seq,
                    time,
                };
                let stored = Holding {
                    bytes,
                    blake3,
                    users,
                    mine,
                    ranges,
                    packed,
                    fate: Fate::Stored,
                    ..at.holding()
                };
                held.insert(id, stored);
            }
            Some(
                Event::ObjectDeleted { place, key, .. } | Event::ObjectAbsent { place, key, .. },
            ) => {
                if let Some(h) = held.get_mut(&(place.target, key)) {
                    h.fate = Fate::Gone;
                }
            }
            // an abort ends a write that never completed, never a stored object
            Some(Event::UploadAborted { place, key, .. }) => {
                if let Some(h) = held
                    .get_mut(&(place.target, key))
                    .filter(|h| h.fate == Fate::Unconfirmed)
                {
                    h.fate = Fate::Gone;
                }
            }
            Some(Event::UserErased {
                users,
                pending,
                shredded,
                ..
            }) if users.iter().any(|u| u == user) => {
                for p in pending {
                    let Some(h) = held
                        .get_mut(&(p.target.clone(), p.key.clone()))
                        .filter(|h| h.live() && h.kind == ObjectKind::Unit)
                    else {
                        continue;
                    };
                    // unreadable only where the user's key is gone and the
                    // object is encrypted to it (a pack recorded with
                    // ranges; older objects are encrypted to the zone)
                    let keyed = !h.key.ends_with(".pack") || !h.ranges.is_empty();
                    if keyed && shredded.iter().any(|e| e.target == p.target) {
                        h.fate = Fate::Shredded;
                    }
                    h.note = Some(format!("not erased: {}", p.reason));
                }
            }
            _ => {}
        }
    }
    let mut found: Vec<Holding> = held.into_values().collect();
    found.sort_by_key(|h| h.seq);
    Ok(found)
}

/// Every unit object that holds `user`'s data and whose deletion (or
/// absence) is not confirmed, in the order their writes started; after the
/// user's erasure, only what it could not remove, as shredded.
pub fn locations(path: &Path, user: &str) -> Result<Vec<Location>> {
    Ok(holdings(path, user)?
        .into_iter()
        .filter(|h| h.kind == ObjectKind::Unit)
        .filter_map(|h| {
            let status = match h.fate {
                Fate::Stored => Status::Stored,
                Fate::Unconfirmed => Status::Unconfirmed,
                Fate::Shredded => Status::Shredded,
                Fate::Gone | Fate::Scrubbed => return None,
            };
            Some(Location {
                zone: h.zone,
                place: h.place,
                key: h.key,
                snapshot: h.snapshot,
                time: h.time,
                bytes: h.bytes,
                status,
                note: h.note,
            })
        })
        .collect())
}

/// The open intents of every target as of one record of the log, kept in
/// `<state_dir>/audit.intents.json` so that the next reading starts there:
/// the log grows with every run, and a sweep must not read it whole each
/// time. A cache: when it is missing, damaged, or its record is not where it
/// says (a log rebuilt by `audit pull`), the log is read from the top.
#[derive(Debug, Default, Serialize, serde::Deserialize)]
struct Intents {
    /// The last record read: its seq, hash and line.
    seq: u64,
    hash: String,
    at: log::Position,
    /// Per target, the full keys with an open intent.
    open: BTreeMap<String, BTreeSet<String>>,
}

const INTENTS_FILE: &str = "audit.intents.json";

impl Intents {
    /// The checkpoint beside the log at `path`, if it still fits the log.
    fn load(path: &Path) -> Option<Intents> {
        let bytes = std::fs::read(path.with_file_name(INTENTS_FILE)).ok()?;
        let saved: Intents = serde_json::from_slice(&bytes).ok()?;
        let record = log::record_at(path, saved.at).ok()??;
        (record.seq() == Some(saved.seq) && record.hash() == Some(saved.hash.as_str()))
            .then_some(saved)
    }

    /// Reads the log from this checkpoint on (the top for a new one).
    fn read_on(&mut self, path: &Path) -> Result<()> {
        let start = if self.seq == 0 {
            log::Position { offset: 0, line: 1 }
        } else {
            self.at
        };
        for line in log::lines_at(path, start)? {
            let line = line?;
            let Some(record) = Stored::parse(&line.text).filter(|_| line.complete) else {
                continue;
            };
            let Some(seq) = record.seq().filter(|s| *s > self.seq) else {
                continue;
            };
            (self.seq, self.at) = (seq, line.at);
            self.hash = record.hash().unwrap_or_default().to_string();
            let (Some(target), Some(key)) = (record.str("target"), record.str("key")) else {
                continue;
            };
            let open = self.open.entry(target.to_string()).or_default();
            match record.event() {
                "upload_started" | "delete_started" => {
                    open.insert(key.to_string());
                }
                "object_put" | "object_absent" | "upload_aborted" | "object_deleted" => {
                    open.remove(key);
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The full keys on `target` whose write or deletion started and has no
/// outcome on record (`object_put`, `object_absent`, `upload_aborted`,
/// `object_deleted`): what a crash, a failed write or a deletion whose
/// record could not be written may have left. Reads the log from where the
/// last call ended (see [`Intents`]).
pub fn open_intents(path: &Path, target: &str) -> Result<Vec<String>> {
    let mut intents = Intents::load(path).unwrap_or_default();
    intents.read_on(path)?;
    if intents.seq > 0 {
        let saved = serde_json::to_vec(&intents)?;
        if let Err(e) = crate::state::write_atomic(&path.with_file_name(INTENTS_FILE), &saved) {
            tracing::debug!(error = %format!("{e:#}"), "cannot keep the open intents; the next sweep reads the whole log");
        }
    }
    Ok(intents
        .open
        .remove(target)
        .map(|keys| keys.into_iter().collect())
        .unwrap_or_default())
}

/// Which records `audit show` prints.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only records at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only records of these event kinds (all when empty).
    pub events: Vec<String>,
}

/// The records of the log that pass `filter`, as stored.
pub fn records(path: &Path, filter: &Filter) -> Result<Vec<Map<String, Value>>> {
    let mut out = Vec::new();
    for line in log::lines(path)? {
        let line = line?;
        let Some(record) = Stored::parse(&line.text) else {
            continue;
        };
        if !filter.events.is_empty() && !filter.events.iter().any(|e| e == record.event()) {
            continue;
        }
        if let Some(since) = filter.since {
            let time = record
                .str("time")
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok());
            if time.is_none_or(|t| t < since) {
                continue;
            }
        }
        out.push(record.fields);
    }
    Ok(out)
}

/// Parses `--since`: an RFC 3339 time, a date (midnight UTC), or a duration
/// back from `now` (`36h`, `7d`).
pub fn parse_since(text: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Some(d.and_hms_opt(0, 0, 0)?.and_utc());
    }
    let ago = humantime::parse_duration(text).ok()?;
    now.checked_sub_signed(chrono::Duration::from_std(ago).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_times_dates_and_durations() {
        let now = DateTime::parse_from_rfc3339("2026-11-26T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let at = |s: &str| parse_since(s, now).map(|t| t.to_rfc3339());
        assert_eq!(
            at("2026-11-25T10:00:00+01:00").unwrap(),
            "2026-11-25T09:00:00+00:00"
        );
        assert_eq!(at("2026-11-20").unwrap(), "2026-11-20T00:00:00+00:00");
        assert_eq!(at("36h").unwrap(), "2026-11-25T00:00:00+00:00");
        assert_eq!(at("2d").unwrap(), "2026-11-24T12:00:00+00:00");
        for bad in ["yesterday", "2026-13-01", "", "5 parsecs"] {
            assert_eq!(at(bad), None, "{bad}");
        }
    }

    #[test]
    fn where_counts_from_the_intent_until_deletion_or_absence_is_confirmed() {
        use crate::audit::log::AuditLog;
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), "c", "z").unwrap();
        let place = Place {
            target: "t".into(),
            endpoint: "e".into(),
            bucket: "b".into(),
            region: "r".into(),
        };
        let user = || vec!["u1".to_string()];
        let started = Event::UploadStarted {
            place: place.clone(),
            key: "k".into(),
            kind: ObjectKind::Unit,
            multipart: true,
            snapshot: None,
            users: user(),
        };
        let statuses = |log: &AuditLog| -> Vec<Status> {
            locations(log.path(), "u1")
                .unwrap()
                .iter()
                .map(|l| l.status)
                .collect()
        };
        // read on from the last checkpoint, and the same as a whole reading
        let open = |log: &AuditLog| {
            let on = open_intents(log.path(), "t").unwrap();
            let kept = log.path().with_file_name(INTENTS_FILE);
            let saved = std::fs::read(&kept).unwrap();
            std::fs::remove_file(&kept).unwrap();
            assert_eq!(on, open_intents(log.path(), "t").unwrap());
            std::fs::write(&kept, saved).unwrap();
            on
        };
        log.append(&started).unwrap();
        assert_eq!(statuses(&log), [Status::Unconfirmed]);
        assert_eq!(open(&log), ["k"]);
        log.append(&Event::ObjectPut {
            place: place.clone(),
            key: "k".into(),
            kind: ObjectKind::Unit,
            bytes: 3,
            blake3: "h".into(),
            snapshot: None,
            users: user(),
            ranges: Vec::new(),
            packed: 0,
        })
        .unwrap();
        assert_eq!(statuses(&log), [Status::Stored]);
        assert!(open(&log).is_empty());
        // an abort (of another target's copy, or too late) never hides a stored object
        log.append(&Event::UploadAborted {
            place: place.clone(),
            key: "k".into(),
            upload_id: "x".into(),
            reason: "r".into(),
        })
        .unwrap();
        assert_eq!(statuses(&log), [Status::Stored]);
        // a deletion counts once confirmed; until then it is an open intent
        log.append(&Event::DeleteStarted {
            place: place.clone(),
            key: "k".into(),
            reason: "r".into(),
        })
        .unwrap();
        assert_eq!(statuses(&log), [Status::Stored]);
        assert_eq!(open(&log), ["k"]);
        log.append(&Event::ObjectAbsent {
            place: place.clone(),
            key: "k".into(),
            reason: "r".into(),
        })
        .unwrap();
        assert!(statuses(&log).is_empty());
        assert!(open(&log).is_empty());
        // an aborted write that never completed is gone
        log.append(&started).unwrap();
        log.append(&Event::UploadAborted {
            place,
            key: "k".into(),
            upload_id: "y".into(),
            reason: "r".into(),
        })
        .unwrap();
        assert!(statuses(&log).is_empty());
        assert!(open(&log).is_empty());
        // a checkpoint that does not fit the log (a log rebuilt, a hand
        // edit) is not trusted: the log is read from the top
        let kept = log.path().with_file_name(INTENTS_FILE);
        let mut forged: Intents = serde_json::from_slice(&std::fs::read(&kept).unwrap()).unwrap();
        forged.hash = "0".repeat(64);
        forged
            .open
            .entry("t".into())
            .or_default()
            .insert("ghost".into());
        std::fs::write(&kept, serde_json::to_vec(&forged).unwrap()).unwrap();
        assert!(open_intents(log.path(), "t").unwrap().is_empty());
    }
}
