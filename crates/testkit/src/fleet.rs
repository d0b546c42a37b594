//! A local two-zone fleet on Garage, and the configuration files that
//! describe it:
//!
//! | zone | region   | target         | bucket     |
//! |------|----------|----------------|------------|
//! | ch   | ch-gva-2 | ch-primary     | zv-ch-gva  |
//! | ch   | ch-dk-2  | ch-secondary   | zv-ch-dk   |
//! | de   | de-fra-1 | de-primary     | zv-de-fra  |
//!
//! Cores: `core-ch-1` (zone ch) and `core-de-1` (zone de). Each zone has its
//! own identity file under `keys/`.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::garage::Garage;

/// One target of a zone, with the key that opens it.
#[derive(Debug, Clone)]
pub struct TargetSpec {
    pub name: String,
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub prefix: String,
    pub key_id: String,
    pub secret: String,
}

/// One zone of the zone map.
#[derive(Debug, Clone)]
pub struct ZoneSpec {
    pub id: String,
    pub name: String,
    pub jurisdiction: String,
    pub regions: Vec<String>,
    pub recipients: Vec<String>,
    pub cores: Vec<String>,
    /// `[zones.<id>.signing_keys]`: (core, public key) pairs; each core's
    /// secret key is `keys/<core>.signing.key` (its `signing_key`).
    pub signing_keys: Vec<(String, String)>,
    pub targets: Vec<TargetSpec>,
    /// The zone's `retention` table, as TOML lines (`keep_last = 2`); empty: none.
    pub retention: String,
    /// The zone's `schedule` table, as TOML lines; empty: none.
    pub schedule: String,
}

/// A running fleet: its Garages, its zones and the folder it lives in.
pub struct Fleet {
    pub dir: PathBuf,
    pub garages: Vec<Garage>,
    pub zones: Vec<ZoneSpec>,
    /// Extra top-level lines of a core's config (`metrics_listen = "..."`), by core id.
    pub core_extra: std::collections::BTreeMap<String, String>,
}

const LAYOUT: [(&str, &str, &str, &str); 3] = [
    ("ch", "ch-gva-2", "ch-primary", "zv-ch-gva"),
    ("ch", "ch-dk-2", "ch-secondary", "zv-ch-dk"),
    ("de", "de-fra-1", "de-primary", "zv-de-fra"),
];

impl Fleet {
    /// Starts the fleet's Garages in `dir` (stopped when the fleet is dropped),
    /// writes an identity per zone and a small sample volume.
    pub fn start(dir: &Path) -> Result<Fleet> {
        Self::start_with(dir, false)
    }

    /// Like [`Fleet::start`], but the Garages outlive this process.
    pub fn start_detached(dir: &Path) -> Result<Fleet> {
        Self::start_with(dir, true)
    }

    fn start_with(dir: &Path, detached: bool) -> Result<Fleet> {
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let mut garages = Vec::new();
        for (_, region, _, bucket) in LAYOUT {
            let gdir = dir.join(format!("garage-{region}"));
            let g = if detached {
                Garage::start_detached(&gdir, region, bucket)?
            } else {
                Garage::start(&gdir, region, bucket)?
            };
            garages.push(g);
        }
        let keys = dir.join("keys");
        std::fs::create_dir_all(&keys)?;
        let mut zones: Vec<ZoneSpec> = Vec::new();
        for (zone, name, jurisdiction, core) in [
            ("ch", "Switzerland", "CH", "core-ch-1"),
            ("de", "Germany", "DE", "core-de-1"),
        ] {
            let identity = zonevault::keys::generate();
            let key_path = keys.join(format!("{zone}.key"));
            std::fs::write(&key_path, &identity.file_text)?;
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
            let (signing_text, signing_public) = zonevault::signing::Signer::generate()?;
            let signing_path = keys.join(format!("{core}.signing.key"));
            std::fs::write(&signing_path, signing_text)?;
            std::fs::set_permissions(&signing_path, std::fs::Permissions::from_mode(0o600))?;
            let targets: Vec<TargetSpec> = LAYOUT
                .iter()
                .zip(&garages)
                .filter(|((z, ..), _)| *z == zone)
                .map(|((_, region, target, bucket), g)| TargetSpec {
                    name: target.to_string(),
                    endpoint: g.endpoint.clone(),
                    region: region.to_string(),
                    bucket: bucket.to_string(),
                    prefix: "zonevault".to_string(),
                    key_id: g.key_id.clone(),
                    secret: g.secret.clone(),
                })
                .collect();
            zones.push(ZoneSpec {
                id: zone.to_string(),
                name: name.to_string(),
                jurisdiction: jurisdiction.to_string(),
                regions: targets.iter().map(|t| t.region.clone()).collect(),
                recipients: vec![identity.recipient],
                cores: vec![core.to_string()],
                signing_keys: vec![(core.to_string(), signing_public)],
                targets,
                retention: String::new(),
                schedule: String::new(),
            });
        }
        let fleet = Fleet {
            dir,
            garages,
            zones,
            core_extra: Default::default(),
        };
        fleet.write_sample_volumes()?;
        Ok(fleet)
    }

    /// The Garage that reports `region`.
    pub fn garage(&self, region: &str) -> &Garage {
        self.garages
            .iter()
            .find(|g| g.region == region)
            .unwrap_or_else(|| panic!("the fleet has no Garage for region {region}"))
    }

    /// The Garage that reports `region`, to stop it.
    pub fn garage_mut(&mut self, region: &str) -> &mut Garage {
        self.garages
            .iter_mut()
            .find(|g| g.region == region)
            .unwrap_or_else(|| panic!("the fleet has no Garage for region {region}"))
    }

    /// The zone `id`.
    pub fn zone(&self, id: &str) -> &ZoneSpec {
        self.zones
            .iter()
            .find(|z| z.id == id)
            .unwrap_or_else(|| panic!("the fleet has no zone {id}"))
    }

    /// Mutable access to zone `id`, for tests that bend the map.
    pub fn zone_mut(&mut self, id: &str) -> &mut ZoneSpec {
        self.zones
            .iter_mut()
            .find(|z| z.id == id)
            .unwrap_or_else(|| panic!("the fleet has no zone {id}"))
    }

    /// The identity file of zone `id`.
    pub fn identity(&self, zone: &str) -> PathBuf {
        self.dir.join("keys").join(format!("{zone}.key"))
    }

    /// The root of the sample volumes of `core`.
    pub fn volumes_dir(&self, core: &str) -> PathBuf {
        self.dir.join("volumes").join(core)
    }

    /// Replaces the `users` volume of `core` with a generated Pryv-like
    /// volume; returns its user ids.
    pub fn users_fixture(&self, core: &str, spec: &crate::fixture::Spec) -> Result<Vec<String>> {
        let users = self.volumes_dir(core).join("users");
        std::fs::remove_dir_all(&users)?;
        crate::fixture::write_pryv_volume(&users, spec)
    }

    /// The zone map as TOML.
    pub fn zonemap_toml(&self) -> String {
        let mut s = String::from(
            "# written by zv-testkit: a local two-zone fleet on Garage\nversion = 1\n",
        );
        for z in &self.zones {
            let _ = write!(
                s,
                "\n[zones.{}]\nname = {:?}\njurisdiction = {:?}\nregions = {:?}\nrecipients = {:?}\ncores = {:?}\n",
                z.id, z.name, z.jurisdiction, z.regions, z.recipients, z.cores
            );
            if !z.signing_keys.is_empty() {
                let _ = writeln!(s, "\n[zones.{}.signing_keys]", z.id);
                for (core, key) in &z.signing_keys {
                    let _ = writeln!(s, "{core:?} = {key:?}");
                }
            }
            for t in &z.targets {
                let _ = write!(
                    s,
                    "\n[[zones.{}.targets]]\nname = {:?}\nendpoint = {:?}\nregion = {:?}\nbucket = {:?}\nprefix = {:?}\n",
                    z.id, t.name, t.endpoint, t.region, t.bucket, t.prefix
                );
            }
            if !z.retention.is_empty() {
                let _ = write!(s, "\n[zones.{}.retention]\n{}\n", z.id, z.retention.trim());
            }
            if !z.schedule.is_empty() {
                let _ = write!(s, "\n[zones.{}.schedule]\n{}\n", z.id, z.schedule.trim());
            }
        }
        s
    }

    /// The core config of `core` as TOML; secrets are read from files under `secrets/`.
    pub fn core_toml(&self, core: &str) -> String {
        let zone = self
            .zones
            .iter()
            .find(|z| z.cores.iter().any(|c| c == core))
            .unwrap_or_else(|| panic!("core {core} is in no zone"));
        let volumes = self.volumes_dir(core);
        let extra = self
            .core_extra
            .get(core)
            .map_or(String::new(), |e| format!("{}\n", e.trim()));
        let mut s = format!(
            "# written by zv-testkit\ncore_id = {core:?}\nzone_map = \"zonemap.toml\"\nstate_dir = \"state/{core}\"\nsigning_key = \"keys/{core}.signing.key\"\n{extra}\n\
             [[volumes]]\nname = \"users\"\npath = {:?}\nlayout = \"pryv\"\nexclude = [\"*.tmp\"]\n\n\
             [[volumes]]\nname = \"etc\"\npath = {:?}\nlayout = \"plain\"\n",
            volumes.join("users").display().to_string(),
            volumes.join("etc").display().to_string(),
        );
        for t in &zone.targets {
            let _ = write!(
                s,
                "\n[credentials.{}]\naccess_key_id_file = \"secrets/{}.key-id\"\nsecret_access_key_file = \"secrets/{}.secret\"\n",
                t.name, t.name, t.name
            );
        }
        s
    }

    /// Writes `zonemap.toml`, `core-<id>.toml` for every core, and the secret
    /// files (mode 0600). Returns the path of `core-ch-1.toml`.
    pub fn write_configs(&self) -> Result<PathBuf> {
        std::fs::write(self.dir.join("zonemap.toml"), self.zonemap_toml())?;
        let secrets = self.dir.join("secrets");
        std::fs::create_dir_all(&secrets)?;
        for z in &self.zones {
            for t in &z.targets {
                for (suffix, value) in [("key-id", &t.key_id), ("secret", &t.secret)] {
                    let p = secrets.join(format!("{}.{suffix}", t.name));
                    std::fs::write(&p, format!("{value}\n"))?;
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
                }
            }
            for core in &z.cores {
                std::fs::write(self.dir.join(format!("{core}.toml")), self.core_toml(core))?;
            }
        }
        Ok(self.dir.join("core-ch-1.toml"))
    }

    /// Adds `core` to zone `zone`, with its signing key and sample volumes,
    /// and writes the configs; returns the path of `<core>.toml`.
    pub fn add_core(&mut self, zone: &str, core: &str) -> Result<PathBuf> {
        let (signing_text, signing_public) = zonevault::signing::Signer::generate()?;
        let signing_path = self.dir.join("keys").join(format!("{core}.signing.key"));
        std::fs::write(&signing_path, signing_text)?;
        std::fs::set_permissions(&signing_path, std::fs::Permissions::from_mode(0o600))?;
        let z = self.zone_mut(zone);
        z.cores.push(core.to_string());
        z.signing_keys.push((core.to_string(), signing_public));
        self.write_sample_volume(core)?;
        self.write_configs()?;
        Ok(self.dir.join(format!("{core}.toml")))
    }

    fn write_sample_volumes(&self) -> Result<()> {
        for z in &self.zones {
            for core in &z.cores {
                self.write_sample_volume(core)?;
            }
        }
        Ok(())
    }

    fn write_sample_volume(&self, core: &str) -> Result<()> {
        let root = self.volumes_dir(core);
        for user in ["c123456789abc", "ckx8f2a9b0001"] {
            let n = user.len();
            let (a, b, c) = (&user[n - 1..], &user[n - 2..n - 1], &user[n - 3..n - 2]);
            let udir = root.join("users").join(a).join(b).join(c).join(user);
            std::fs::create_dir_all(&udir)?;
            std::fs::write(
                udir.join("events.jsonl"),
                format!("{{\"user\":\"{user}\"}}\n"),
            )?;
        }
        std::fs::create_dir_all(root.join("users/_shared"))?;
        std::fs::write(root.join("users/user-index.db"), b"index")?;
        std::fs::create_dir_all(root.join("etc"))?;
        std::fs::write(root.join("etc/core.yml"), format!("core: {core}\n"))
            .context("writing the sample volume")
    }
}
