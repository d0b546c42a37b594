//! `<prefix>/zonevault.json`: which zone a target holds the backups of.
//!
//! The marker is the first object zonevault writes to a target and the
//! last word of the gate (check 4 of [`crate::residency`]): a bucket that
//! holds another zone's backups, or data in a format this zonevault does not
//! know, is never written to.

use serde::{Deserialize, Serialize};

use super::layout::{self, FORMAT, MARKER};
use crate::config::Target;
use crate::storage::{ReadBackend, StoreError};

/// The marker's contents.
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

    /// The marker as it is written.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a marker serializes")
    }
}

/// What a target's marker says about writing there for `zone`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// No marker: a new target (the first run writes it).
    Absent,
    /// This zone's marker.
    Ours,
    /// The marker of another zone (its id, cut to 64 characters).
    OtherZone(String),
    /// A marker of a format this zonevault does not know.
    UnknownFormat(u32),
    /// An object under the marker's key that is not a marker.
    NotAMarker(String),
}

impl Found {
    /// Why writing next to this marker is refused; `None` when it may be.
    pub fn refusal(&self, target: &Target) -> Option<String> {
        let key = target.key(MARKER);
        match self {
            Found::Absent | Found::Ours => None,
            Found::OtherZone(zone) => Some(format!(
                "the marker {key} names zone {zone:?}: this bucket holds another zone's backups"
            )),
            Found::UnknownFormat(format) => Some(format!(
                "the marker {key} has format {format}; this zonevault knows format {FORMAT}: refusing to write next to data it does not understand"
            )),
            Found::NotAMarker(e) => Some(format!(
                "{key} is not a zonevault marker ({e}); refusing to write next to unknown data"
            )),
        }
    }
}

/// Reads the marker of `target` and judges it for `zone`.
pub async fn read<S: ReadBackend>(
    store: &S,
    target: &Target,
    zone: &str,
) -> Result<Found, StoreError> {
    let Some(bytes) = store.get(&target.key(layout::MARKER)).await? else {
        return Ok(Found::Absent);
    };
    Ok(match serde_json::from_slice::<Marker>(&bytes) {
        Ok(marker) if marker.format != FORMAT => Found::UnknownFormat(marker.format),
        Ok(marker) if marker.zone == zone => Found::Ours,
        Ok(marker) => Found::OtherZone(marker.zone.chars().take(64).collect()),
        Err(e) => Found::NotAMarker(e.to_string()),
    })
}
