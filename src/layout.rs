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
