//! Configuration: the fleet-wide zone map and the core config that names it.
//!
//! [`Config::load`] reads both files and runs every config-time check of
//! DESIGN.md; a [`Config`] that exists is valid. Any problem is a
//! [`ConfigError`] (exit code 2) naming the file, the line:column or field
//! path, and what to do.

mod core;
mod credentials;
mod error;
mod file;
mod zonemap;

use std::path::{Path, PathBuf};

pub use self::core::{
    CoreConfig, DEFAULT_SQLITE_BUSY_TIMEOUT, DEFAULT_ZSTD_LEVEL, Dump, Hooks, Layout, SqliteMode,
    Volume,
};
pub use credentials::{Secret, StaticCredentials};
pub use error::{ConfigError, Place};
pub use zonemap::{Retention, Schedule, Target, Zone, ZoneMap, parse_duration};

/// Where the core config is looked for when neither `--config` nor
/// `$ZONEVAULT_CONFIG` names it.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/zonevault/core.toml";

/// A validated pair of core config and zone map.
#[derive(Debug, Clone)]
pub struct Config {
    /// Path of the core config file as given.
    pub path: PathBuf,
    pub core: CoreConfig,
    pub map: ZoneMap,
    /// BLAKE3 of the two files as read, for the audit log.
    pub digests: Digests,
    zone: String,
}

/// BLAKE3 (hex) of the configuration files a [`Config`] was loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    pub core: String,
    pub zone_map: String,
}

impl Config {
    /// Reads the core config at `path`, then the zone map it names, and
    /// validates both.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let (file, core_text) = file::read_toml::<core::CoreFile>(path, "core config")?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let mut core = core::validate(path, &dir, &file)?;
        let (map, map_text) = ZoneMap::read(&core.zone_map)?;
        let zone = map.zone_of_core(&core.core_id).ok_or_else(|| {
            ConfigError::field(
                path,
                "core_id",
                format!(
                    "core {:?} is in no zone of {}",
                    core.core_id,
                    core.zone_map.display()
                ),
            )
            .help("add it to the cores of its zone in the zone map, or fix core_id")
        })?;
        core.credentials = core::resolve_credentials(path, &dir, zone, &map, file.credentials)?;
        let zone = zone.id.clone();
        Ok(Config {
            path: path.to_path_buf(),
            core,
            map,
            digests: Digests {
                core: blake3::hash(core_text.as_bytes()).to_hex().to_string(),
                zone_map: blake3::hash(map_text.as_bytes()).to_hex().to_string(),
            },
            zone,
        })
    }

    /// [`Config::load`], then the checks of the live data that `backup`,
    /// `check` and `daemon` read: every volume path exists, is a directory,
    /// and contains no other volume.
    pub fn load_live(path: &Path) -> Result<Config, ConfigError> {
        let mut config = Config::load(path)?;
        core::check_live(path, &mut config.core.volumes)?;
        Ok(config)
    }

    /// The zone this core belongs to.
    pub fn zone(&self) -> &Zone {
        &self.map.zones[&self.zone]
    }

    /// The static credentials for `target`, if the core config has any.
    pub fn credentials(&self, target: &str) -> Option<&StaticCredentials> {
        self.core.credentials.get(target)
    }
}
