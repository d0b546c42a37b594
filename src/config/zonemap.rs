//! The fleet-wide zone map: zones, their regions, recipients, cores and targets.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// The most recipients a zone may list. Each one adds a stanza to every
/// object and a key agreement to every unit a restore opens: 10,001
/// recipients made a restore of 6 units take 97 s.
pub const MAX_RECIPIENTS: usize = 64;

/// The zone map file as written (before validation).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ZoneMapFile {
    version: u32,
    zones: BTreeMap<String, ZoneFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ZoneFile {
    name: String,
    jurisdiction: String,
    regions: Vec<String>,
    recipients: Vec<String>,
    #[serde(default)]
    cores: Vec<String>,
    /// Each core's snapshot-signing public keys (minisign), by core id.
    #[serde(default)]
    signing_keys: BTreeMap<String, OneOrMany>,
    #[serde(default)]
    targets: Vec<TargetFile>,
    #[serde(default)]
    retention: RetentionFile,
    schedule: Option<ScheduleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetFile {
    name: String,
    endpoint: String,
    region: String,
    bucket: String,
    #[serde(default)]
    prefix: String,
    #[serde(default = "default_path_style")]
    path_style: bool,
}

/// A key, or a list of keys (during a rotation: the new one and the old one).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

fn default_path_style() -> bool {
    true
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionFile {
    keep_last: Option<u32>,
    keep_hourly: Option<u32>,
    keep_daily: Option<u32>,
    keep_weekly: Option<u32>,
    keep_monthly: Option<u32>,
    keep_yearly: Option<u32>,
    max_age: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleFile {
    backup: String,
    #[serde(default = "default_timezone")]
    timezone: String,
}

fn default_timezone() -> String {
    "UTC".to_string()
}

/// The validated zone map.
#[derive(Debug, Clone)]
pub struct ZoneMap {
    /// Zones by id (the key under `[zones.<id>]`).
    pub zones: BTreeMap<String, Zone>,
}

/// One compliance zone.
#[derive(Debug, Clone)]
pub struct Zone {
    /// The zone id, e.g. `ch`.
    pub id: String,
    /// Human name, e.g. `Switzerland`.
    pub name: String,
    /// Jurisdiction code, e.g. `CH`.
    pub jurisdiction: String,
    /// Bucket locations that count as inside the zone.
    pub regions: Vec<String>,
    /// Who can decrypt this zone's backups.
    pub recipients: Vec<age::x25519::Recipient>,
    /// The cores that belong to the zone.
    pub cores: Vec<String>,
    /// Each core's snapshot-signing public keys (`[zones.<id>.signing_keys]`).
    pub signing_keys: BTreeMap<String, Vec<minisign::PublicKey>>,
    /// Where the zone's backups go; every object goes to each.
    pub targets: Vec<Target>,
    /// How long snapshots are kept.
    pub retention: Retention,
    /// When the daemon backs up, if at all.
    pub schedule: Option<Schedule>,
}

/// One bucket (plus prefix) on one S3 endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Unique across the map.
    pub name: String,
    /// The zone the target belongs to.
    pub zone: String,
    /// `http(s)://host[:port]`.
    pub endpoint: String,
    /// The bucket location the target claims.
    pub region: String,
    /// The bucket.
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/` ("" = bucket root).
    pub prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`).
    pub path_style: bool,
}

impl Target {
    /// The full key of `rel` under the target's prefix.
    pub fn key(&self, rel: &str) -> String {
        if self.prefix.is_empty() {
            rel.to_string()
        } else {
            format!("{}/{rel}", self.prefix)
        }
    }
}

/// Retention rules of a zone; every field optional. An empty policy keeps everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    /// Nothing older is kept, whatever the other rules say.
    pub max_age: Option<Duration>,
}

/// The backup schedule of a zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The cron expression as written (seconds first).
    pub expression: String,
    /// The parsed expression.
    pub backup: cron::Schedule,
    /// The timezone the expression is read in.
    pub timezone: chrono_tz::Tz,
}

impl ZoneMap {
    /// Reads and validates the zone map at `path`.
    pub fn load(path: &Path) -> Result<ZoneMap, ConfigError> {
        Ok(ZoneMap::read(path)?.0)
    }

    /// [`ZoneMap::load`], also returning the file's text.
    pub fn read(path: &Path) -> Result<(ZoneMap, String), ConfigError> {
        let (file, text) = super::file::read_toml::<ZoneMapFile>(path, "zone map")?;
        Ok((validate(path, file)?, text))
    }

    /// The zone that `core` belongs to.
    pub fn zone_of_core(&self, core: &str) -> Option<&Zone> {
        self.zones
            .values()
            .find(|z| z.cores.iter().any(|c| c == core))
    }
}

fn validate(path: &Path, file: ZoneMapFile) -> Result<ZoneMap, ConfigError> {
    let err = |field: String, problem: String| ConfigError::field(path, field, problem);
    if file.version != 1 {
        return Err(err(
            "version".into(),
            format!("version {} is not supported", file.version),
        )
        .help("this zonevault reads zone maps of version 1; set version = 1"));
    }
    if file.zones.is_empty() {
        return Err(ConfigError::file(path, "the zone map defines no zone")
            .help("add a [zones.<id>] table; config/zonemap.toml is an example"));
    }

    let mut core_zone: HashMap<String, String> = HashMap::new();
    let mut target_zone: HashMap<String, String> = HashMap::new();
    let mut region_zone: HashMap<String, String> = HashMap::new();
    let mut places: Vec<(String, String, String, String, String)> = Vec::new();
    let mut zones = BTreeMap::new();

    for (id, zf) in file.zones {
        let at = |field: &str| format!("zones.{id}.{field}");
        if !is_identifier(&id, false) {
            return Err(err(
                format!("zones.{id}"),
                format!("zone id {id:?} is not valid"),
            )
            .help("use lower-case letters, digits and '-', e.g. [zones.ch]"));
        }
        for (field, value) in [("name", &zf.name), ("jurisdiction", &zf.jurisdiction)] {
            if value.trim().is_empty() {
                return Err(err(at(field), "is empty".into()));
            }
        }
        if zf.regions.is_empty() {
            return Err(err(at("regions"), "lists no region".into()).help(
                "list the bucket locations that count as inside the zone, e.g. [\"ch-gva-2\"]",
            ));
        }
        for (i, region) in zf.regions.iter().enumerate() {
            if !is_region(region) {
                return Err(err(
                    at(&format!("regions[{i}]")),
                    format!("{region:?} is not a region name"),
                )
                .help("write the bucket location exactly as the provider names it: lower-case letters, digits and '-', e.g. \"ch-gva-2\""));
            }
            if let Some(other) = region_zone.insert(region.clone(), id.clone())
                && other != id
            {
                return Err(err(
                    at(&format!("regions[{i}]")),
                    format!("region {region:?} is also a region of zone {other}"),
                )
                .help("a bucket location can count for one zone only, or a bucket there would pass the residency check of both"));
            }
            if zf.regions[..i].contains(region) {
                return Err(err(
                    at(&format!("regions[{i}]")),
                    format!("region {region:?} is listed twice"),
                ));
            }
        }

        if zf.recipients.is_empty() {
            return Err(err(at("recipients"), "lists no recipient".into())
                .help("add the age1... public keys that may decrypt this zone's backups (zonevault keygen prints one)"));
        }
        if zf.recipients.len() > MAX_RECIPIENTS {
            return Err(err(
                at("recipients"),
                format!(
                    "lists {} recipients; a zone has at most {MAX_RECIPIENTS}",
                    zf.recipients.len()
                ),
            )
            .help("every object carries one stanza per recipient and a restore tries its identity on each: give the zone a few keys (operations, escrow) and share an identity among the people who hold the same role"));
        }
        let mut recipients = Vec::new();
        for (i, r) in zf.recipients.iter().enumerate() {
            if r.trim().to_ascii_uppercase().starts_with("AGE-SECRET-KEY-") {
                return Err(err(
                    at(&format!("recipients[{i}]")),
                    "is an age SECRET key (AGE-SECRET-KEY-...), not a recipient".into(),
                )
                .help("remove it now and treat that identity as compromised: the zone map is copied to every core. Put its public key (`age-keygen -y KEYFILE`) here instead"));
            }
            let recipient = age::x25519::Recipient::from_str(r.trim()).map_err(|e| {
                err(
                    at(&format!("recipients[{i}]")),
                    format!("{r:?} is not a valid age X25519 recipient ({e})"),
                )
                .help("a recipient is the age1... line printed by `zonevault keygen` or `age-keygen -y KEYFILE`")
            })?;
            recipients.push(recipient);
        }

        for (i, core) in zf.cores.iter().enumerate() {
            let field = at(&format!("cores[{i}]"));
            if !is_identifier(core, true) {
                return Err(err(field, format!("core id {core:?} is not valid"))
                    .help("use letters, digits, '.', '_' and '-'"));
            }
            if let Some(other) = core_zone.insert(core.clone(), id.clone()) {
                let problem = if other == id {
                    format!("core {core:?} is listed twice in zone {id}")
                } else {
                    format!("core {core:?} is in zone {other} and in zone {id}")
                };
                let help = if other == id {
                    "list each core once"
                } else {
                    "a core belongs to exactly one zone; remove it from the other"
                };
                return Err(err(field, problem).help(help));
            }
        }

        let mut signing_keys = BTreeMap::new();
        for (core, keys) in zf.signing_keys {
            let field = |suffix: &str| at(&format!("signing_keys.{core}{suffix}"));
            if !zf.cores.contains(&core) {
                return Err(
                    err(field(""), format!("{core:?} is not a core of zone {id}"))
                        .help("list signing keys only for the zone's own cores"),
                );
            }
            let keys = keys.into_vec();
            if keys.is_empty() || keys.len() > 4 {
                return Err(err(field(""), format!("lists {} keys", keys.len()))
                    .help("list the core's signing key, and during a rotation its previous one too (at most 4)"));
            }
            let mut parsed = Vec::new();
            for (i, key) in keys.iter().enumerate() {
                let key = crate::signing::parse_public_key(key).map_err(|e| {
                    err(
                        field(&format!("[{i}]")),
                        format!("{key:?} is not a minisign public key ({e})"),
                    )
                    .help("it is the RW... line printed by `zonevault keygen --signing --out FILE`")
                })?;
                parsed.push(key);
            }
            signing_keys.insert(core, parsed);
        }

        if zf.targets.is_empty() {
            return Err(err(at("targets"), "zone has no target".into())
                .help("add at least one [[zones.<id>.targets]] bucket inside the zone"));
        }
        let mut targets = Vec::new();
        for (i, tf) in zf.targets.into_iter().enumerate() {
            let t_at = |field: &str| at(&format!("targets[{i}].{field}"));
            if !is_identifier(&tf.name, true) {
                return Err(err(
                    t_at("name"),
                    format!("target name {:?} is not valid", tf.name),
                )
                .help("use letters, digits, '.', '_' and '-'"));
            }
            if let Some(other) = target_zone.insert(tf.name.clone(), id.clone()) {
                return Err(err(
                    t_at("name"),
                    format!("target name {:?} is already used in zone {other}", tf.name),
                )
                .help("target names are unique across the whole zone map"));
            }
            if tf.endpoint.contains('@') {
                return Err(err(t_at("endpoint"), "holds credentials (user:password@)".into())
                    .help("write only scheme://host[:port] here; credentials belong in [credentials.<target>] of core.toml"));
            }
            let endpoint = normalize_endpoint(&tf.endpoint).ok_or_else(|| {
                err(
                    t_at("endpoint"),
                    format!("{:?} is not of the form http(s)://host[:port]", tf.endpoint),
                )
                .help("write the S3 endpoint as scheme://host[:port] (ASCII host, port 1-65535, no path or query), e.g. \"https://sos-ch-gva-2.exo.io\"")
            })?;
            if !zf.regions.contains(&tf.region) {
                return Err(err(
                    t_at("region"),
                    format!(
                        "region {:?} is not one of zone {id}'s regions {:?}",
                        tf.region, zf.regions
                    ),
                )
                .help(format!(
                    "if the bucket really lies in {}, add {:?} to zones.{id}.regions; otherwise move the target to the zone it lies in",
                    zf.name, tf.region
                )));
            }
            if !is_bucket_name(&tf.bucket) {
                return Err(err(
                    t_at("bucket"),
                    format!("{:?} is not a valid bucket name", tf.bucket),
                )
                .help("S3 bucket names have 3 to 63 characters: a-z, 0-9, '.' and '-'"));
            }
            let prefix = normalize_prefix(&tf.prefix).ok_or_else(|| {
                err(
                    t_at("prefix"),
                    format!("{:?} is not a valid key prefix", tf.prefix),
                )
                .help("use '/'-separated names without empty, '.' or '..' parts, e.g. \"zonevault/ch\"")
            })?;
            // One bucket+prefix holds one zone's backups: no two targets may
            // share a place, nor nest one inside the other.
            if let Some((_, _, other_prefix, other_zone, other_target)) =
                places.iter().find(|(e, b, p, _, _)| {
                    *e == endpoint && *b == tf.bucket && prefixes_overlap(p, &prefix)
                })
            {
                let how = if *other_prefix == prefix {
                    "same endpoint, bucket and prefix"
                } else {
                    "same endpoint and bucket, with nested prefixes"
                };
                let problem = if *other_zone == id {
                    format!("{how} as target {other_target:?}")
                } else {
                    format!("{how} as target {other_target:?} of zone {other_zone}")
                };
                return Err(err(t_at("bucket"), problem)
                    .help("one bucket+prefix holds the backups of one zone only; give each target its own bucket or a prefix that does not contain another"));
            }
            places.push((
                endpoint.clone(),
                tf.bucket.clone(),
                prefix.clone(),
                id.clone(),
                tf.name.clone(),
            ));
            targets.push(Target {
                name: tf.name,
                zone: id.clone(),
                endpoint,
                region: tf.region,
                bucket: tf.bucket,
                prefix,
                path_style: tf.path_style,
            });
        }

        let retention = validate_retention(path, &id, zf.retention)?;
        let schedule = match zf.schedule {
            Some(s) => Some(validate_schedule(path, &id, s)?),
            None => None,
        };

        zones.insert(
            id.clone(),
            Zone {
                id,
                name: zf.name,
                jurisdiction: zf.jurisdiction,
                regions: zf.regions,
                recipients,
                cores: zf.cores,
                signing_keys,
                targets,
                retention,
                schedule,
            },
        );
    }
    Ok(ZoneMap { zones })
}

fn validate_retention(path: &Path, id: &str, r: RetentionFile) -> Result<Retention, ConfigError> {
    let max_age = match r.max_age {
        None => None,
        Some(text) => {
            let field = format!("zones.{id}.retention.max_age");
            let d = parse_duration(&text).map_err(|e| {
                ConfigError::field(path, &field, format!("{text:?} is not a duration ({e})"))
                    .help("write a duration such as \"90d\", \"6months\" or \"10y\"")
            })?;
            if d.is_zero() {
                return Err(ConfigError::field(path, field, "is zero").help(
                    "a max_age of zero would delete every snapshot; remove it to keep everything",
                ));
            }
            Some(d)
        }
    };
    // `keep_x = 0` keeps nothing, yet turns "no rule: keep everything" into
    // "delete everything": a typo must not wipe a zone's backups.
    for (rule, value) in [
        ("keep_last", r.keep_last),
        ("keep_hourly", r.keep_hourly),
        ("keep_daily", r.keep_daily),
        ("keep_weekly", r.keep_weekly),
        ("keep_monthly", r.keep_monthly),
        ("keep_yearly", r.keep_yearly),
    ] {
        if value == Some(0) {
            return Err(
                ConfigError::field(path, format!("zones.{id}.retention.{rule}"), "is 0")
                    .help("a rule that keeps nothing is left out, not set to 0; remove the line"),
            );
        }
    }
    Ok(Retention {
        keep_last: r.keep_last,
        keep_hourly: r.keep_hourly,
        keep_daily: r.keep_daily,
        keep_weekly: r.keep_weekly,
        keep_monthly: r.keep_monthly,
        keep_yearly: r.keep_yearly,
        max_age,
    })
}

fn validate_schedule(path: &Path, id: &str, s: ScheduleFile) -> Result<Schedule, ConfigError> {
    let backup = cron::Schedule::from_str(&s.backup).map_err(|e| {
        ConfigError::field(
            path,
            format!("zones.{id}.schedule.backup"),
            format!(
                "{:?} is not a valid cron expression ({})",
                s.backup,
                e.to_string().lines().next().unwrap_or("").trim()
            ),
        )
        .help("use 6 or 7 fields, seconds first: \"0 30 2 * * *\" is 02:30:00 every day")
    })?;
    let timezone = s.timezone.parse::<chrono_tz::Tz>().map_err(|_| {
        ConfigError::field(
            path,
            format!("zones.{id}.schedule.timezone"),
            format!("{:?} is not a known timezone", s.timezone),
        )
        .help("use an IANA timezone name such as \"Europe/Zurich\" or \"UTC\"")
    })?;
    // A valid expression may still never fire (30 February): a core on it
    // would silently never back up.
    if backup.upcoming(timezone).next().is_none() {
        return Err(ConfigError::field(
            path,
            format!("zones.{id}.schedule.backup"),
            format!("{:?} never fires", s.backup),
        )
        .help("check the day and month fields: \"0 30 2 * * *\" is 02:30:00 every day"));
    }
    Ok(Schedule {
        expression: s.backup,
        backup,
        timezone,
    })
}

/// Parses a duration such as `90d`, `6months`, `10y` or `1y 6months`.
pub fn parse_duration(text: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(text.trim())
}

/// Lower-case identifier for zones (`strict`=false) or the looser
/// `[A-Za-z0-9._-]` set for core and target names.
fn is_identifier(s: &str, loose: bool) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars().all(|c| {
            c.is_ascii_digit()
                || c == '-'
                || c.is_ascii_lowercase()
                || (loose && (c.is_ascii_uppercase() || c == '.' || c == '_'))
        })
}

fn is_region(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// Whether two normalised prefixes name the same place or one lies inside the other.
fn prefixes_overlap(a: &str, b: &str) -> bool {
    a.is_empty()
        || b.is_empty()
        || a == b
        || b.starts_with(&format!("{a}/"))
        || a.starts_with(&format!("{b}/"))
}

fn is_bucket_name(s: &str) -> bool {
    (3..=63).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && !s.starts_with(['.', '-'])
        && !s.ends_with(['.', '-'])
}

/// `scheme://host[:port][/path]` with scheme http or https; returns it
/// lower-cased in scheme and host and without a trailing `/`, so that two
/// spellings of one endpoint compare equal.
fn normalize_endpoint(s: &str) -> Option<String> {
    let s = s.trim();
    let (scheme, rest) = s.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']');
    if authority.is_empty() || !authority.chars().all(valid) {
        return None;
    }
    if let Some((host, port)) = authority.rsplit_once(':')
        && !authority.ends_with(']')
        && (host.is_empty() || port.parse::<u16>().is_err())
    {
        return None;
    }
    Some(format!("{scheme}://{}", authority.to_ascii_lowercase()))
}

fn normalize_prefix(s: &str) -> Option<String> {
    let p = s.trim().trim_matches('/');
    if p.is_empty() {
        return Some(String::new());
    }
    if p.split('/').any(|part| {
        part.is_empty()
            || part == "."
            || part == ".."
            || part.chars().any(|c| c.is_control() || c == '\\')
    }) {
        return None;
    }
    Some(p.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_normalize() {
        assert_eq!(
            normalize_endpoint("HTTPS://S3.Example.com/").as_deref(),
            Some("https://s3.example.com")
        );
        assert_eq!(
            normalize_endpoint("http://127.0.0.1:3900").as_deref(),
            Some("http://127.0.0.1:3900")
        );
        assert_eq!(normalize_endpoint("ftp://x"), None);
        assert_eq!(normalize_endpoint("s3.example.com"), None);
        assert_eq!(normalize_endpoint("http://:3900"), None);
        assert_eq!(normalize_endpoint("http://host:99999"), None);
        assert_eq!(normalize_endpoint("http://host/path"), None);
        assert_eq!(normalize_endpoint("http://exämple.ch"), None);
    }

    #[test]
    fn prefixes_normalize() {
        assert_eq!(
            normalize_prefix("/zonevault/ch/").as_deref(),
            Some("zonevault/ch")
        );
        assert_eq!(normalize_prefix("").as_deref(), Some(""));
        assert_eq!(normalize_prefix("a//b"), None);
        assert_eq!(normalize_prefix("a/../b"), None);
        assert_eq!(normalize_prefix("a\u{0}b"), None);
        assert!(prefixes_overlap("zonevault", "zonevault/sub"));
        assert!(prefixes_overlap("", "x"));
        assert!(!prefixes_overlap("zonevault", "zonevault-de"));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(
            parse_duration("90d").unwrap(),
            Duration::from_secs(90 * 86400)
        );
        assert!(parse_duration("10y").unwrap() > Duration::from_secs(10 * 365 * 86400));
        assert!(parse_duration("ten years").is_err());
    }

    #[test]
    fn target_keys_join_prefix() {
        let mut t = Target {
            name: "t".into(),
            zone: "ch".into(),
            endpoint: "http://x".into(),
            region: "r".into(),
            bucket: "b".into(),
            prefix: String::new(),
            path_style: true,
        };
        assert_eq!(t.key("zonevault.json"), "zonevault.json");
        t.prefix = "a/b".into();
        assert_eq!(t.key("zonevault.json"), "a/b/zonevault.json");
    }
}
