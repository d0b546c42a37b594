//! Incremental runs: the units of the last committed snapshot, with their
//! fingerprints, kept in `<state_dir>/units.json`.
//!
//! A unit whose fingerprint equals the one recorded here is not uploaded
//! again: the new manifest references the object that the earlier snapshot
//! stored, provided a committed index on every target still references it
//! (which is also what keeps retention and cleanup from removing it). With
//! no state (a fresh machine, or `backup --full`) every unit is uploaded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::repository::snapshot::UnitRecord;
use crate::units::UnitKind;

const FILE_NAME: &str = "units.json";

/// What the last committed snapshot of this core stored.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Previous {
    pub core: String,
    pub snapshot: String,
    /// BLAKE3 of the zone's recipients when the snapshot was taken: after a
    /// key rotation, a unit encrypted to them directly (written before data
    /// keys) is never reused; one encrypted to a data key is.
    #[serde(default)]
    pub recipients: String,
    pub units: Vec<UnitRecord>,
}

/// The digest of a recipient list, order-independent.
pub fn recipients_digest(recipients: &[age::x25519::Recipient]) -> String {
    let mut keys: Vec<String> = recipients.iter().map(ToString::to_string).collect();
    keys.sort();
    blake3::hash(keys.join("\n").as_bytes())
        .to_hex()
        .to_string()
}

impl Previous {
    /// The record of a unit, by volume and kind.
    pub fn lookup(&self) -> HashMap<(&str, &UnitKind), &UnitRecord> {
        self.units
            .iter()
            .map(|u| ((&*u.volume, &u.kind), u))
            .collect()
    }
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// The previous snapshot of `core` encrypted to `recipients`, if the state
/// dir knows one. A damaged state file means a full run (with a warning),
/// never a failed one.
pub fn load(state_dir: &Path, core: &str, recipients: &str) -> Option<Previous> {
    let path = path(state_dir);
    // read as a stream: the state of 100,000 units is never held twice
    let file = match std::fs::File::open(&path) {
        Ok(f) => std::io::BufReader::with_capacity(256 << 10, f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the unit state; this run uploads every unit");
            return None;
        }
    };
    match serde_json::from_reader::<_, Previous>(file) {
        Ok(mut p) if p.core == core && p.recipients == recipients => {
            // read by doubling: up to half of the list's room is unused
            p.units.shrink_to_fit();
            Some(p)
        }
        Ok(mut p) if p.core == core => {
            // units encrypted to a data key only need their key objects
            // rewrapped (`zonevault rewrap`); older ones go again
            p.units.retain(|u| u.data_key.is_some());
            p.units.shrink_to_fit();
            tracing::info!(
                "the zone's recipients changed since the last snapshot: the units encrypted to them directly (before data keys) are encrypted and uploaded again"
            );
            Some(p)
        }
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the unit state is damaged; this run uploads every unit");
            None
        }
    }
}

/// Records the units of a committed snapshot (atomically), as a
/// [`Previous`].
pub fn save(
    state_dir: &Path,
    core: &str,
    snapshot: &str,
    recipients: &str,
    units: &[UnitRecord],
) -> Result<()> {
    #[derive(Serialize)]
    struct PreviousRef<'a> {
        core: &'a str,
        snapshot: &'a str,
        recipients: &'a str,
        units: &'a [UnitRecord],
    }
    let previous = PreviousRef {
        core,
        snapshot,
        recipients,
        units,
    };
    crate::state::write_atomic_with(&path(state_dir), |w| {
        serde_json::to_writer(w, &previous).map_err(std::io::Error::other)
    })
}

/// Drops `users`' units from the state (an erasure): their objects are
/// gone, so the next backup uploads them again, under new keys.
pub fn forget_users(state_dir: &Path, users: &[String]) -> Result<()> {
    use anyhow::Context as _;
    let path = path(state_dir);
    let file = match std::fs::File::open(&path) {
        Ok(f) => std::io::BufReader::with_capacity(256 << 10, f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let Ok(mut previous) = serde_json::from_reader::<_, Previous>(file) else {
        // a damaged state means a full run anyway: remove it
        return std::fs::remove_file(&path)
            .with_context(|| format!("cannot remove the damaged {}", path.display()));
    };
    let before = previous.units.len();
    previous
        .units
        .retain(|u| !matches!(&u.kind, UnitKind::User(id) if users.contains(id)));
    if previous.units.len() == before {
        return Ok(());
    }
    crate::state::write_atomic_with(&path, |w| {
        serde_json::to_writer(w, &previous).map_err(std::io::Error::other)
    })
}
