//! The core config: which core this is, where its zone map and state are,
//! which volumes it backs up, and credentials per target.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    #[serde(default)]
    pub transfer: TransferFile,
}

/// `[transfer]`: what a run may have in flight (see [`crate::budget`]).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TransferFile {
    /// Bytes of parts in flight, e.g. "64MiB".
    in_flight: Option<String>,
    /// Requests open to the object store at once.
    requests: Option<u32>,
    /// Upload rate cap, e.g. "20MB/s".
    upload_rate: Option<String>,
    /// Largest pack of small units, e.g. "8MiB"; "0": no packs.
    pack_size: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct VolumeFile {
    name: String,
    path: Option<PathBuf>,
    layout: LayoutFile,
    #[serde(default)]
    exclude: Vec<String>,
    #[serde(default)]
    sqlite: SqliteMode,
    sqlite_busy_timeout: Option<String>,
    /// `layout = "command"`: the argv whose stdout is the volume's one file.
    command: Option<Vec<String>>,
    /// `layout = "command"`: that file's name.
    file: Option<String>,
    /// `layout = "command"`: how long the command may run.
    timeout: Option<String>,
    before: Option<Vec<String>>,
    after: Option<Vec<String>>,
    hook_timeout: Option<String>,
}

/// `layout` as written: `command` volumes become [`Volume::dump`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum LayoutFile {
    Pryv,
    Plain,
    Command,
}

/// How long a dump command may run unless `timeout` says.
pub const DEFAULT_DUMP_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// How long a hook may run unless `hook_timeout` says.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// The command of a `layout = "command"` volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dump {
    /// argv (never run through a shell).
    pub command: Vec<String>,
    /// The one file of the unit, e.g. `pryv-node.dump`.
    pub file: String,
    pub timeout: Duration,
}

/// A volume's `before` / `after` hooks (argv each).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hooks {
    pub before: Option<Vec<String>>,
    pub after: Option<Vec<String>>,
    pub timeout: Duration,
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
    /// `layout = "command"`: the volume is the stdout of this command, one
    /// file in one unit; `path` is then empty and `layout` is `Plain`
    /// (unused: nothing is scanned).
    pub dump: Option<Dump>,
    pub hooks: Hooks,
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
    /// What a run may have in flight (`[transfer]`).
    pub transfer: crate::budget::Limits,
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
        let duration = |field: &str, text: &Option<String>, default: Duration| match text {
            None => Ok(default),
            Some(t) => match super::parse_duration(t) {
                Ok(d) if !d.is_zero() => Ok(d),
                _ => Err(err(&at(field), format!("{t:?} is not a duration"))
                    .help("write e.g. \"30s\", \"5m\" or \"1h\"")),
            },
        };
        let argv = |field: &str, a: &Option<Vec<String>>| {
            match a {
            Some(a) if a.is_empty() || a[0].is_empty() => Err(err(&at(field), "is empty".into())
                .help("give the program and its arguments, e.g. [\"pg_dump\", \"-Fc\", \"pryv-node\"] (never run through a shell)")),
            _ => Ok(a.clone()),
        }
        };
        let hooks = Hooks {
            before: argv("before", &v.before)?,
            after: argv("after", &v.after)?,
            timeout: duration("hook_timeout", &v.hook_timeout, DEFAULT_HOOK_TIMEOUT)?,
        };
        let dump = if v.layout == LayoutFile::Command {
            if v.path.is_some() {
                return Err(err(&at("path"), "is not used by a layout = \"command\" volume".into())
                    .help("remove it: the volume is the command's stdout, stored as one file named by `file`"));
            }
            if !v.exclude.is_empty() {
                return Err(err(
                    &at("exclude"),
                    "is not used by a layout = \"command\" volume".into(),
                )
                .help("remove it"));
            }
            let Some(command) = argv("command", &v.command)? else {
                return Err(err(&at("command"), "is missing".into())
                    .help("a layout = \"command\" volume needs command = [\"program\", \"arg\", ...], e.g. [\"pg_dump\", \"-Fc\", \"pryv-node\"]"));
            };
            let Some(file) = &v.file else {
                return Err(err(&at("file"), "is missing".into()).help(
                    "name the file that holds the command's stdout, e.g. file = \"pryv-node.dump\"",
                ));
            };
            let plain = !file.is_empty()
                && file != "."
                && file != ".."
                && !file.contains('/')
                && !file.contains('\0');
            if !plain {
                return Err(err(&at("file"), format!("{file:?} is not a plain file name"))
                    .help("a name without '/', e.g. \"pryv-node.dump\"; restore writes it to DIR/<volume>/<file>"));
            }
            Some(Dump {
                command,
                file: file.clone(),
                timeout: duration("timeout", &v.timeout, DEFAULT_DUMP_TIMEOUT)?,
            })
        } else {
            for (field, given) in [
                ("command", v.command.is_some()),
                ("file", v.file.is_some()),
                ("timeout", v.timeout.is_some()),
            ] {
                if given {
                    return Err(err(
                        &at(field),
                        "is only for layout = \"command\" volumes".into(),
                    )
                    .help("remove it, or set layout = \"command\""));
                }
            }
            None
        };
        if let Some(dump) = dump {
            volumes.push(Volume {
                name: v.name.clone(),
                path: PathBuf::new(),
                layout: Layout::Plain,
                exclude: globset::GlobSet::empty(),
                exclude_patterns: Vec::new(),
                sqlite: SqliteMode::default(),
                sqlite_busy_timeout: DEFAULT_SQLITE_BUSY_TIMEOUT,
                dump: Some(dump),
                hooks,
            });
            continue;
        }
        let Some(path) = &v.path else {
            return Err(err(&at("path"), "is missing".into())
                .help("set it to the volume's data directory, e.g. \"/var/pryv/data/users\""));
        };
        if path.as_os_str().is_empty() {
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
            path: dir.join(path),
            layout: match v.layout {
                LayoutFile::Pryv => Layout::Pryv,
                _ => Layout::Plain,
            },
            exclude,
            exclude_patterns: v.exclude.clone(),
            sqlite: v.sqlite,
            sqlite_busy_timeout,
            dump: None,
            hooks,
        });
    }

    let transfer = transfer(&f.transfer)
        .map_err(|(field, problem, help)| err(&format!("transfer.{field}"), problem).help(help))?;

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
        transfer,
    })
}

/// The most requests in flight that `[transfer] requests` allows.
pub const MAX_REQUESTS: u32 = 1024;

/// `[transfer]` checked; an error names the field, the problem and a help.
fn transfer(
    f: &TransferFile,
) -> Result<crate::budget::Limits, (&'static str, String, &'static str)> {
    let mut limits = crate::budget::Limits::default();
    if let Some(text) = &f.in_flight {
        limits.bytes = match parse_size(text) {
            Some(n) if (1 << 20..=4 << 30).contains(&n) => n as usize,
            Some(_) => {
                return Err((
                    "in_flight",
                    format!("{text:?} is out of range"),
                    "give between 1MiB and 4GiB, e.g. \"64MiB\" (the default)",
                ));
            }
            None => {
                return Err((
                    "in_flight",
                    format!("{text:?} is not a size"),
                    "write a number with a unit, e.g. \"64MiB\" or \"200MB\"",
                ));
            }
        };
    }
    if let Some(n) = f.requests {
        if !(1..=MAX_REQUESTS).contains(&n) {
            return Err((
                "requests",
                format!("{n} is out of range"),
                "give between 1 and 1024; 32 is the default",
            ));
        }
        limits.requests = n as usize;
    }
    if let Some(text) = &f.upload_rate {
        let size = text.trim().strip_suffix("/s").and_then(parse_size);
        limits.upload_rate = match size {
            Some(n) if n >= 1024 => Some(n),
            Some(_) => {
                return Err((
                    "upload_rate",
                    format!("{text:?} is too low"),
                    "give at least 1KiB/s, e.g. \"20MB/s\"",
                ));
            }
            None => {
                return Err((
                    "upload_rate",
                    format!("{text:?} is not a rate"),
                    "write bytes per second with a unit, e.g. \"20MB/s\" or \"5MiB/s\"",
                ));
            }
        };
    }
    if let Some(text) = &f.pack_size {
        limits.pack_size = match parse_size(text) {
            Some(n)
                if n == 0 || (64 << 10..=crate::budget::DEFAULT_PACK_SIZE as u64).contains(&n) =>
            {
                n as usize
            }
            Some(_) => {
                return Err((
                    "pack_size",
                    format!("{text:?} is out of range"),
                    "give between 64KiB and 8MiB (the default, one part), or \"0\" for one object per unit",
                ));
            }
            None => {
                return Err((
                    "pack_size",
                    format!("{text:?} is not a size"),
                    "write a number with a unit, e.g. \"8MiB\", or \"0\" for one object per unit",
                ));
            }
        };
    }
    Ok(limits)
}

/// `"64MiB"`, `"200 MB"`, `"4096"` → bytes; `None` when it is not a size.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let unit = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "GiB" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(unit)
}

/// The checks of the live data, for the commands that read it (`backup`,
/// `check`, `daemon`): every volume path exists and is a directory, and no
/// volume contains another. Paths become canonical. `restore`,
/// `snapshots`, `forget` and `audit` skip them: after a disk loss the paths
/// do not exist, and that machine is the one that must restore.
pub(super) fn check_live(path: &Path, volumes: &mut [Volume]) -> Result<(), ConfigError> {
    let err = |field: &str, problem: String| ConfigError::field(path, field, problem);
    for i in 0..volumes.len() {
        if volumes[i].dump.is_some() {
            continue; // a command's stdout: no path
        }
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
            .filter(|(_, o)| o.dump.is_none())
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

#[cfg(test)]
mod size_tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        for (text, bytes) in [
            ("4096", Some(4096)),
            ("64MiB", Some(64 << 20)),
            (" 200 MB ", Some(200_000_000)),
            ("1GiB", Some(1 << 30)),
            ("2kB", Some(2000)),
            ("1.5MiB", None),
            ("MiB", None),
            ("12 parsecs", None),
            ("-1", None),
            ("99999999999999999999GiB", None),
        ] {
            assert_eq!(parse_size(text), bytes, "{text}");
        }
    }
}
