//! Questions asked of the local log: where is a user's data (`audit where`),
//! and which records match (`audit show`).

use std::collections::BTreeMap;
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
    /// When the object was written.
    pub time: String,
    pub bytes: u64,
}

/// Every unit object that holds `user`'s data and has not been deleted,
/// in the order they were written.
pub fn locations(path: &Path, user: &str) -> Result<Vec<Location>> {
    // (target, key) → (seq, location): a deletion on one target leaves the
    // copies on the others.
    let mut live: BTreeMap<(String, String), (u64, Location)> = BTreeMap::new();
    for line in log::lines(path)? {
        let line = line?;
        let Some(record) = Stored::parse(&line.text) else {
            continue;
        };
        if !matches!(record.event(), "object_put" | "object_deleted") {
            continue;
        }
        match record.typed() {
            Some(Event::ObjectPut {
                place,
                key,
                kind: ObjectKind::Unit,
                bytes,
                snapshot,
                users,
                ..
            }) if users.iter().any(|u| u == user) => {
                let location = Location {
                    zone: record.str("zone").unwrap_or_default().to_string(),
                    place: place.clone(),
                    key: key.clone(),
                    snapshot,
                    time: record.str("time").unwrap_or_default().to_string(),
                    bytes,
                };
                live.insert((place.target, key), (record.seq().unwrap_or(0), location));
            }
            Some(Event::ObjectDeleted { place, key, .. }) => {
                live.remove(&(place.target, key));
            }
            _ => {}
        }
    }
    let mut found: Vec<(u64, Location)> = live.into_values().collect();
    found.sort_by_key(|(seq, _)| *seq);
    Ok(found.into_iter().map(|(_, l)| l).collect())
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
}
