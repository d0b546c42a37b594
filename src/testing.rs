//! Shared by the unit tests: a valid two-zone config on disk, the gate's
//! writers on in-memory buckets, and the audit records they wrote.

use std::path::Path;
use std::sync::Arc;

use crate::audit::AuditLog;
use crate::config::{Config, Target};
use crate::residency::{self, Verdict, Writable};
use crate::storage::memory::{Buckets, Memory};

/// A config in `dir`: core `core-ch-1` of zone `ch` (regions ch-gva-2 and
/// ch-dk-2; targets `ch-primary`, prefix `zv`, and `ch-secondary`), and a
/// zone `de` with target `de-primary`.
pub fn config(dir: &Path) -> Config {
    let recipient = age::x25519::Identity::generate().to_public();
    std::fs::write(
        dir.join("zonemap.toml"),
        format!(
            r#"version = 1

[zones.ch]
name = "Switzerland"
jurisdiction = "CH"
regions = ["ch-gva-2", "ch-dk-2"]
recipients = ["{recipient}"]
cores = ["core-ch-1"]

[[zones.ch.targets]]
name = "ch-primary"
endpoint = "http://127.0.0.1:1"
region = "ch-gva-2"
bucket = "b-gva"
prefix = "zv"

[[zones.ch.targets]]
name = "ch-secondary"
endpoint = "http://127.0.0.1:2"
region = "ch-dk-2"
bucket = "b-dk"

[zones.de]
name = "Germany"
jurisdiction = "DE"
regions = ["de-fra-1"]
recipients = ["{recipient}"]
cores = ["core-de-1"]

[[zones.de.targets]]
name = "de-primary"
endpoint = "http://127.0.0.1:3"
region = "de-fra-1"
bucket = "b-fra"
"#
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    std::fs::write(
        dir.join("core.toml"),
        format!(
            "core_id = \"core-ch-1\"\nzone_map = \"zonemap.toml\"\nstate_dir = {:?}\n\n[[volumes]]\nname = \"etc\"\npath = {:?}\nlayout = \"plain\"\n",
            dir.join("state"),
            dir.join("vol"),
        ),
    )
    .unwrap();
    Config::load(&dir.join("core.toml")).unwrap()
}

/// The audit log of `config`.
pub fn audit(config: &Config) -> Arc<AuditLog> {
    Arc::new(AuditLog::start(config, "test").unwrap())
}

/// The target named `name` in `config`'s map.
pub fn target<'a>(config: &'a Config, name: &str) -> &'a Target {
    config
        .map
        .zones
        .values()
        .flat_map(|z| &z.targets)
        .find(|t| t.name == name)
        .unwrap()
}

/// Every target of the core's zone through the gate, on `buckets`.
pub async fn writers(
    config: &Config,
    audit: &Arc<AuditLog>,
    buckets: &Buckets,
) -> Vec<Writable<Memory>> {
    let mut out = Vec::new();
    for t in &config.zone().targets {
        match residency::verify(config, buckets, audit, t).await {
            Verdict::Passed(w) => out.push(w),
            other => panic!("{}: {other:?}", t.name),
        }
    }
    out
}

/// The event names of the log, in order.
pub fn events(audit: &AuditLog) -> Vec<String> {
    crate::audit::log::read_lines(audit.path())
        .unwrap()
        .iter()
        .filter_map(|l| crate::audit::record::Stored::parse(&l.text))
        .map(|r| r.event().to_string())
        .collect()
}

/// A config, its audit log and the zone's targets through the gate, on
/// in-memory buckets.
pub struct World {
    _dir: tempfile::TempDir,
    pub config: Config,
    pub audit: Arc<AuditLog>,
    pub targets: Vec<Writable<Memory>>,
}

impl World {
    pub async fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let audit = audit(&config);
        let targets = writers(&config, &audit, &Buckets::default()).await;
        World {
            _dir: dir,
            config,
            audit,
            targets,
        }
    }
}

/// A record of a unit of `size` stored (and plain) bytes at `offset` of
/// `object` (`None`: stored alone), for tests of how units are read.
pub fn unit_record(
    object: &str,
    offset: Option<u64>,
    size: u64,
) -> crate::repository::snapshot::UnitRecord {
    crate::repository::snapshot::UnitRecord {
        volume: "users".into(),
        kind: crate::units::UnitKind::User(format!("u{}", offset.unwrap_or(0))),
        object: object.into(),
        offset,
        object_size: offset.map(|_| 100 << 20),
        plain_size: size,
        stored_size: size,
        blake3: crate::hash::Blake3::of(b""),
        files: 1,
        fingerprint: None,
        dirs: Vec::new(),
        data_key: None,
    }
}
