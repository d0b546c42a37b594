//! The core config: which core this is, where its zone map and state are,
//! which volumes it backs up, and credentials per target.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;
use super::credentials::{self, CredentialsFile, StaticCredentials};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CoreFile {
    pub core_id: String,
    pub zone_map: PathBuf,
    pub state_dir: PathBuf,
    pub zstd_level: Option<i32>,
    pub metrics_listen: Option<String>,
    pub signing_key: Option<PathBuf>,
    #[serde(default)]
    pub volumes: Vec<VolumeFile>,
    #[serde(default)]
    pub credentials: BTreeMap<String, CredentialsFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct VolumeFile {
    name: String,
    path: PathBuf,
    layout: Layout,
    #[serde(default)]
    exclude: Vec<String>,
    #[serde(default)]
    sqlite: SqliteMode,
    sqlite_busy_timeout: Option<String>,
}

/// How a volume's SQLite databases are read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SqliteMode {
    /// Through SQLite's online backup: one consistent, self-contained file.
    #[default]
    Consistent,
    /// As plain files (only for volumes known to be quiescent).
    Files,
}

/// How long a database may stay locked before its unit fails.
pub const DEFAULT_SQLITE_BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The signing key's file name in the state dir, when `signing_key` is not set.
pub const DEFAULT_SIGNING_KEY: &str = "signing.key";

/// How a volume is cut into units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// One unit per user directory `<a>/<b>/<c>/<userId>/`, plus a shared unit.
    Pryv,
    /// The whole volume is one unit.
    Plain,
}

/// A data volume of the core.
#[derive(Debug, Clone)]
pub struct Volume {
    pub name: String,
    /// The volume root: as configured (relative to core.toml) after
    /// [`super::Config::load`], canonical after [`super::Config::load_live`],
    /// which also checks that it exists.
    pub path: PathBuf,
    pub layout: Layout,
    /// Globs relative to `path`.
    pub exclude: globset::GlobSet,
    /// The globs as written, for display.
    pub exclude_patterns: Vec<String>,
    pub sqlite: SqliteMode,
    /// `sqlite_busy_timeout` (default 30 s).
    pub sqlite_busy_timeout: std::time::Duration,
}

/// The validated core config.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub core_id: String,
    /// Absolute path of the zone map.
    pub zone_map: PathBuf,
    /// Where the audit log and local state live.
    pub state_dir: PathBuf,
    pub zstd_level: i32,
    pub metrics_listen: Option<SocketAddr>,
    /// The core's snapshot-signing key (default `<state_dir>/signing.key`).
    pub signing_key: PathBuf,
    pub volumes: Vec<Volume>,
    /// Static credentials by target name; a target without an entry uses the
    /// standard AWS chain.
    pub credentials: BTreeMap<String, StaticCredentials>,
}

/// The default zstd level.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Validates everything in the core file that does not need the zone map.
/// `dir` is the directory of the core file (relative paths start there).
/// Credentials are resolved later, once the zone map says which targets exist.
pub(super) fn validate(path: &Path, dir: &Path, f: &CoreFile) -> Result<CoreConfig, ConfigError> {
    let err = |field: &str, problem: String| ConfigError::field(path, field, problem);
    if f.core_id.trim().is_empty() {
        return Err(err("core_id", "is empty".into())
            .help("set it to this core's id as listed in the zone map, e.g. \"core-ch-1\""));
    }
    let zstd_level = f.zstd_level.unwrap_or(DEFAULT_ZSTD_LEVEL);
    if !(1..=22).contains(&zstd_level) {
        return Err(err("zstd_level", format!("{zstd_level} is out of range"))
            .help("zstd levels go from 1 (fastest) to 22 (smallest); 3 is the default"));
    }
    let metrics_listen = match &f.metrics_listen {
        None => None,
        Some(s) => Some(s.parse::<SocketAddr>().map_err(|_| {
            err("metrics_listen", format!("{s:?} is not an address:port"))
                .help("write e.g. \"127.0.0.1:9464\"")
        })?),
    };
    if f.zone_map.as_os_str().is_empty() {
        return Err(err("zone_map", "is empty".into())
            .help("set it to the fleet's zone map, e.g. \"/etc/zonevault/zonemap.toml\""));
    }
    if dir.join(&f.state_dir).exists() && !dir.join(&f.state_dir).is_dir() {
        return Err(err(
            "state_dir",
            format!(
                "{} exists and is not a directory",
                dir.join(&f.state_dir).display()
            ),
        ));
    }
    if f.state_dir.as_os_str().is_empty() {
        return Err(err("state_dir", "is empty".into())
            .help("set it to a directory writable by zonevault, e.g. \"/var/lib/zonevault\""));
    }

    if f.volumes.is_empty() {
        return Err(ConfigError::file(path, "no [[volumes]] to back up")
            .help("add at least one [[volumes]] table; config/core.toml is an example"));
    }
    let mut volumes: Vec<Volume> = Vec::new();
    for (i, v) in f.volumes.iter().enumerate() {
        let at = |field: &str| format!("volumes[{i}].{field}");
        let valid_name = !v.name.is_empty()
            && v.name.len() <= 64
            && v.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            && !v.name.starts_with('.');
        if !valid_name {
            return Err(err(
                &at("name"),
                format!("volume name {:?} is not valid", v.name),
            )
            .help(
                "use letters, digits, '.', '_' and '-' (it becomes a directory name on restore)",
            ));
        }
        if let Some(j) = volumes.iter().position(|o| o.name == v.name) {
            return Err(err(
                &at("name"),
                format!("volume name {:?} is already used by volumes[{j}]", v.name),
            ));
        }
        if v.path.as_os_str().is_empty() {
            return Err(err(&at("path"), "is empty".into())
                .help("set it to the volume's data directory, e.g. \"/var/pryv/data/users\""));
        }
        let mut builder = globset::GlobSetBuilder::new();
        for (k, pattern) in v.exclude.iter().enumerate() {
            let glob = globset::Glob::new(pattern).map_err(|e| {
                err(
                    &at(&format!("exclude[{k}]")),
                    format!("{pattern:?} is not a valid glob ({})", e.kind()),
                )
            })?;
            builder.add(glob);
        }
        let exclude = builder
            .build()
            .map_err(|e| err(&at("exclude"), format!("invalid globs: {e}")))?;
        let sqlite_busy_timeout = match &v.sqlite_busy_timeout {
            None => DEFAULT_SQLITE_BUSY_TIMEOUT,
            Some(t) => humantime::parse_duration(t).map_err(|e| {
                err(
                    &at("sqlite_busy_timeout"),
                    format!("{t:?} is not a duration ({e})"),
                )
                .help("write e.g. \"30s\" or \"2m\"")
            })?,
        };
        volumes.push(Volume {
            name: v.name.clone(),
            path: dir.join(&v.path),
            layout: v.layout,
            exclude,
            exclude_patterns: v.exclude.clone(),
            sqlite: v.sqlite,
            sqlite_busy_timeout,
        });
    }

    Ok(CoreConfig {
        core_id: f.core_id.clone(),
        zone_map: dir.join(&f.zone_map),
        state_dir: dir.join(&f.state_dir),
        zstd_level,
        metrics_listen,
        signing_key: match &f.signing_key {
            Some(p) => dir.join(p),
            None => dir.join(&f.state_dir).join(DEFAULT_SIGNING_KEY),
        },
        volumes,
        credentials: BTreeMap::new(),
    })
}

/// The checks of the live data, for the commands that read it (`backup`,
/// `check`, `daemon`): every volume path exists and is a directory, and no
/// volume contains another. Paths become canonical. `restore`,
/// `snapshots`, `forget` and `audit` skip them: after a disk loss the paths
/// do not exist, and that machine is the one that must restore.
pub(super) fn check_live(path: &Path, volumes: &mut [Volume]) -> Result<(), ConfigError> {
    let err = |field: &str, problem: String| ConfigError::field(path, field, problem);
    for i in 0..volumes.len() {
        let at = |field: &str| format!("volumes[{i}].{field}");
        let full = volumes[i].path.clone();
        let canonical = std::fs::canonicalize(&full).map_err(|e| {
            let why = if e.kind() == std::io::ErrorKind::NotFound {
                "does not exist".to_string()
            } else {
                format!("cannot be opened: {e}")
            };
            err(&at("path"), format!("{} {why}", full.display()))
                .help("point the volume at an existing data directory")
        })?;
        if !canonical.is_dir() {
            return Err(err(
                &at("path"),
                format!("{} is not a directory", full.display()),
            ));
        }
        if let Some((j, other)) = volumes[..i]
            .iter()
            .enumerate()
            .find(|(_, o)| o.path.starts_with(&canonical) || canonical.starts_with(&o.path))
        {
            return Err(err(
                &at("path"),
                format!(
                    "{} overlaps volume {:?} ({}, volumes[{j}])",
                    canonical.display(),
                    other.name,
                    other.path.display()
                ),
            )
            .help(
                "volumes must not contain one another; use exclude = [...] to leave a part out",
            ));
        }
        volumes[i].path = canonical;
    }
    Ok(())
}

/// Resolves `[credentials.*]` now that the zone's targets are known.
pub(super) fn resolve_credentials(
    path: &Path,
    dir: &Path,
    zone: &super::Zone,
    map: &super::ZoneMap,
    files: BTreeMap<String, CredentialsFile>,
) -> Result<BTreeMap<String, StaticCredentials>, ConfigError> {
    let mut out = BTreeMap::new();
    for (target, file) in files {
        if !zone.targets.iter().any(|t| t.name == target) {
            let elsewhere = map
                .zones
                .values()
                .find(|z| z.targets.iter().any(|t| t.name == target));
            let problem = match elsewhere {
                Some(z) => format!(
                    "target {target:?} belongs to zone {}, not to this core's zone {}",
                    z.id, zone.id
                ),
                None => format!("the zone map has no target named {target:?}"),
            };
            let names: Vec<&str> = zone.targets.iter().map(|t| t.name.as_str()).collect();
            return Err(
                ConfigError::field(path, format!("credentials.{target}"), problem).help(format!(
                    "this core writes to the targets {names:?}; name the table after one of them"
                )),
            );
        }
        let creds = credentials::resolve(path, dir, &target, file)?;
        out.insert(target, creds);
    }
    Ok(out)
}
