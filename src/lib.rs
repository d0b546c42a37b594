//! zonevault: compliance-aware backups that stay in their zone.
//!
//! A byte of user data travels: volume → unit (tar) → zstd → age (the zone's
//! recipients) → a target that passed the residency check. The modules, in
//! that order of concern:
//!
//! - [`config`]: the zone map and the core config, validated on load.
//! - [`keys`]: age identities (keygen, identity files); [`datakeys`]: the
//!   per-user and per-core keys that units are encrypted to, wrapped to the
//!   zone in key objects (what `erase` shreds).
//! - [`units`], [`archive`]: a volume cut into units; a unit as a tar; both
//!   read the file system through [`fswalk`], a walk by open descriptors.
//! - [`pipeline`]: tar → BLAKE3 → zstd → age → parts, and back.
//! - [`storage`]: the object-store trait and its S3 implementation.
//! - [`residency`]: the gate; the only source of a writable target, which
//!   records every write in the [`audit`] log.
//! - [`upload`]: parts to every target; [`layout`]: where things live there.
//! - [`snapshot`], [`incremental`], [`retention`]: what a snapshot holds, what
//!   an unchanged unit reuses, what a policy keeps.
//! - [`commands`]: one module per command; [`daemon`]: the scheduled runs.
//! - [`output`]: human and `--json` output.
//!
//! `docs/architecture.md` tells the same story for a new maintainer.

pub mod archive;
pub mod audit;
pub mod blocking;
pub mod budget;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod datakeys;
pub mod dump;
pub mod error;
#[doc(hidden)]
pub mod failpoint;
pub mod fswalk;
pub mod hash;
pub mod hooks;
pub mod incremental;
pub mod keys;
pub mod lock;
pub mod logging;
pub mod output;
pub mod pack;
pub mod pipeline;
pub mod pool;
pub mod progress;
pub mod pryv;
pub mod repository;
pub mod residency;
pub mod retention;
pub mod scan;
pub mod signing;
pub mod sqlite;
pub mod state;
pub mod storage;
pub mod targets;
#[cfg(test)]
pub(crate) mod testing;
pub mod units;
pub mod unpack;
pub mod upload;

pub use error::{Error, Exit, Result};
