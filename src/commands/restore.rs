//! `zonevault restore`: a snapshot (or some of its volumes or users) back
//! into a directory, on any machine that has the configs, credentials and an
//! identity. Needs no local state.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use tokio_util::io::SyncIoBridge;

use crate::archive::{self, DirMeta};
use crate::audit::{AuditLog, Event, Place};
use crate::config::{Config, Target};
use crate::error::{Error, Result};
use crate::keys;
use crate::pipeline::{self, HashingReader, OpenError};
use crate::progress::Progress;
use crate::snapshot::{Index, Manifest, UnitRecord};
use crate::storage::{Store, s3::S3Store};
use crate::targets;
use crate::units::{self, UnitKind};

use super::snapshots;

/// What to restore, and where.
#[derive(Debug, Clone)]
pub struct Options {
    /// A snapshot id, or `latest`.
    pub snapshot: String,
    pub to: PathBuf,
    pub identity: PathBuf,
    pub users: Vec<String>,
    pub volumes: Vec<String>,
    pub core: Option<String>,
    pub force: bool,
    pub jobs: usize,
    pub progress: bool,
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub snapshot: String,
    pub core: String,
    pub zone: String,
    pub to: PathBuf,
    pub units: usize,
    pub files: u64,
    pub plain_bytes: u64,
    pub stored_bytes: u64,
    pub seconds: f64,
    pub users: Vec<String>,
}

/// Runs a restore. Every object read, the restore done or its failure, is
/// recorded in `audit` (each read before it starts).
pub async fn run(config: &Config, audit: &Arc<AuditLog>, options: &Options) -> Result<Report> {
    let report = restore(config, audit, options)
        .await
        .inspect_err(|e| audit.run_failed("restore", e))?;
    let (os_user, host) = crate::audit::who();
    audit
        .record(Event::RestoreDone {
            snapshot: report.snapshot.clone(),
            source_core: report.core.clone(),
            to: report.to.display().to_string(),
            users: report.users.clone(),
            volumes: options.volumes.clone(),
            units: report.units,
            files: report.files,
            os_user,
            host,
        })
        .await?;
    Ok(report)
}

async fn restore(config: &Config, audit: &Arc<AuditLog>, options: &Options) -> Result<Report> {
    let started = Instant::now();
    let identities = Arc::new(
        keys::load_identities(&options.identity).map_err(|e| Error::Usage(format!("{e:#}")))?,
    );
    let core = snapshots::resolve_core(config, options.core.as_deref())?;
    check_destination(&options.to, options.force)?;
    let zone = config.zone();

    let (indexes, store, target) = snapshots::list(config, &core).await?;
    let index: Index =
        if options.snapshot == "latest" {
            indexes.last().cloned().ok_or_else(|| {
                Error::failed(format!(
                    "core {core} has no snapshot in zone {} yet",
                    zone.id
                ))
            })?
        } else {
            indexes.iter().find(|i| i.id == options.snapshot).cloned().ok_or_else(|| {
            Error::failed(format!(
                "no snapshot {} of core {core} in zone {}; `zonevault snapshots` lists them",
                options.snapshot, zone.id
            ))
        })?
        };
    if index.zone != zone.id || index.core != core {
        return Err(Error::Residency(format!(
            "snapshot {} says it belongs to core {} of zone {}, not core {core} of zone {}: refused",
            index.id, index.core, index.zone, zone.id
        )));
    }

    let reads = Reads::new(audit, &index.id);
    reads
        .record(&target, target.key(&index.manifest.key), Vec::new())
        .await?;
    let sealed = store
        .get(&target.key(&index.manifest.key))
        .await
        .map_err(anyhow::Error::from)?
        .ok_or_else(|| {
            Error::failed(format!("the manifest of snapshot {} is missing", index.id))
        })?;
    let manifest: Manifest = match pipeline::decrypt_small(&sealed, &identities) {
        Ok(plain) => serde_json::from_slice(&plain)
            .with_context(|| format!("the manifest of snapshot {} is damaged", index.id))?,
        Err(OpenError::NoMatchingKeys) => {
            return Err(Error::failed(format!(
                "this identity cannot decrypt snapshot {} of zone {}",
                index.id, zone.id
            )));
        }
        Err(e) => {
            return Err(Error::failed(format!(
                "the manifest of snapshot {} is damaged: {e}",
                index.id
            )));
        }
    };

    if manifest.snapshot != index.id || manifest.core != index.core || manifest.zone != index.zone {
        return Err(Error::failed(format!(
            "the manifest of snapshot {} does not match its index (it names snapshot {} of core {} in zone {})",
            index.id, manifest.snapshot, manifest.core, manifest.zone
        )));
    }
    let selected = select(&manifest, &options.volumes, &options.users)?;
    std::fs::create_dir_all(&options.to)
        .with_context(|| format!("cannot create {}", options.to.display()))?;
    let progress = Progress::new(options.progress, selected.len() as u64, "restore");
    // Every target of the zone holds every object: the one that listed the
    // snapshot first, the others as fallbacks for a missing or damaged copy.
    let first = target.name.clone();
    let mut sources = vec![(target, store)];
    sources.extend(
        targets::open(config)
            .await
            .into_iter()
            .filter(|(t, _)| t.name != first),
    );
    let results: Vec<(u64, Vec<DirMeta>)> = futures::stream::iter(selected.iter())
        .map(|rec| {
            let (sources, identities, progress, reads) = (&sources, &identities, &progress, &reads);
            async move {
                let label = units::label(&rec.volume, &rec.kind);
                let mut first_error = None;
                for (target, store) in sources {
                    let read = reads.record(target, target.key(&rec.object), rec.kind.users());
                    let restored = match read.await {
                        Ok(()) => restore_from(store, target, rec, identities, &options.to).await,
                        Err(e) => Err(e),
                    };
                    match restored {
                        Ok((files, bytes, dirs)) => {
                            progress.unit_done(bytes);
                            return Ok((files, dirs));
                        }
                        Err(e) => {
                            tracing::warn!(unit = %label, target = %target.name, error = %format!("{e:#}"), "cannot restore from this target; trying the next");
                            first_error.get_or_insert(e);
                        }
                    }
                }
                let e = first_error.expect("the zone has at least one target");
                Err(Error::Failed(e.context(format!("restoring {label}"))))
            }
        })
        .buffer_unordered(options.jobs.max(1))
        .try_collect()
        .await?;
    progress.finish();
    let mut dirs = Vec::new();
    let mut files = 0;
    for (n, d) in results {
        files += n;
        dirs.extend(d);
    }
    archive::finish_dirs(dirs)?;

    Ok(Report {
        snapshot: index.id,
        core,
        zone: zone.id.clone(),
        to: options.to.clone(),
        units: selected.len(),
        files,
        plain_bytes: selected.iter().map(|r| r.plain_size).sum(),
        stored_bytes: selected.iter().map(|r| r.stored_size).sum(),
        seconds: started.elapsed().as_secs_f64(),
        users: selected
            .iter()
            .filter_map(|r| match &r.kind {
                UnitKind::User(id) => Some(id.clone()),
                _ => None,
            })
            .collect(),
    })
}

/// Records each object read, before the read.
struct Reads<'a> {
    audit: &'a Arc<AuditLog>,
    snapshot: String,
    os_user: String,
    host: String,
}

impl<'a> Reads<'a> {
    fn new(audit: &'a Arc<AuditLog>, snapshot: &str) -> Reads<'a> {
        let (os_user, host) = crate::audit::who();
        Reads {
            audit,
            snapshot: snapshot.to_string(),
            os_user,
            host,
        }
    }

    async fn record(&self, target: &Target, key: String, users: Vec<String>) -> anyhow::Result<()> {
        self.audit
            .record(Event::ObjectRead {
                place: Place::from(target),
                key,
                snapshot: self.snapshot.clone(),
                users,
                os_user: self.os_user.clone(),
                host: self.host.clone(),
            })
            .await?;
        Ok(())
    }
}

/// Fetches one unit's object from one target and restores it.
async fn restore_from(
    store: &S3Store,
    target: &Target,
    rec: &UnitRecord,
    identities: &Arc<Vec<Box<dyn age::Identity + Send + Sync>>>,
    to: &Path,
) -> anyhow::Result<(u64, u64, Vec<DirMeta>)> {
    let body = store
        .get_stream(&target.key(&rec.object))
        .await?
        .with_context(|| format!("object {} is missing on target {}", rec.object, target.name))?;
    let reader = SyncIoBridge::new(body);
    let dest = to.join(&rec.volume);
    let (rec, identities) = (rec.clone(), Arc::clone(identities));
    tokio::task::spawn_blocking(move || restore_unit(reader, &identities, &dest, &rec)).await?
}

/// Extracts one unit and checks its BLAKE3. Returns (entries, plain bytes, dirs).
fn restore_unit(
    reader: impl std::io::Read,
    identities: &[Box<dyn age::Identity + Send + Sync>],
    dest: &std::path::Path,
    rec: &UnitRecord,
) -> anyhow::Result<(u64, u64, Vec<DirMeta>)> {
    let plain = pipeline::open(reader, identities)
        .map_err(|e| anyhow::anyhow!("object {} cannot be opened: {e}", rec.object))?;
    let mut hashing = HashingReader::new(plain);
    let mut dirs = Vec::new();
    std::fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let files = archive::extract(
        std::io::BufReader::with_capacity(256 << 10, &mut hashing),
        dest,
        &mut dirs,
    )?;
    let (blake3, size) = hashing.finish().context("reading the end of the object")?;
    if blake3 != rec.blake3 || size != rec.plain_size {
        anyhow::bail!(
            "integrity check failed: BLAKE3 {blake3} ({size} bytes) differs from the manifest's {} ({} bytes)",
            rec.blake3,
            rec.plain_size
        );
    }
    Ok((files, size, dirs))
}

/// A non-empty destination is refused without `--force`.
fn check_destination(to: &std::path::Path, force: bool) -> Result<()> {
    match std::fs::read_dir(to) {
        Ok(mut entries) => {
            if entries.next().is_some() && !force {
                return Err(Error::Usage(format!(
                    "{} is not empty; restore into an empty directory, or pass --force to overwrite files in it",
                    to.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            Err(Error::Usage(format!("{} is not a directory", to.display())))
        }
        Err(e) => Err(Error::failed(format!("cannot read {}: {e}", to.display()))),
    }
}

/// The units to restore: all, or those of some volumes, or some users' units.
fn select(manifest: &Manifest, volumes: &[String], users: &[String]) -> Result<Vec<UnitRecord>> {
    // The volume name becomes a directory under DIR: one plain name only.
    for u in &manifest.units {
        let plain = !u.volume.is_empty()
            && !u.volume.starts_with('.')
            && u.volume
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !plain {
            return Err(Error::failed(format!(
                "the manifest of snapshot {} names volume {:?}, which is not a valid volume name: refusing to restore it",
                manifest.snapshot, u.volume
            )));
        }
    }
    for v in volumes {
        if !manifest.units.iter().any(|u| &u.volume == v) {
            return Err(Error::failed(format!(
                "snapshot {} has no volume {v:?}",
                manifest.snapshot
            )));
        }
    }
    for user in users {
        if !manifest
            .units
            .iter()
            .any(|u| u.kind == UnitKind::User(user.clone()))
        {
            return Err(Error::failed(format!(
                "user {user} is not in snapshot {}",
                manifest.snapshot
            )));
        }
    }
    let selected: Vec<UnitRecord> = manifest
        .units
        .iter()
        .filter(|u| volumes.is_empty() || volumes.contains(&u.volume))
        .filter(|u| users.is_empty() || matches!(&u.kind, UnitKind::User(id) if users.contains(id)))
        .cloned()
        .collect();
    if selected.is_empty() {
        return Err(Error::failed(format!(
            "nothing in snapshot {} matches --volume {volumes:?} --user {users:?}",
            manifest.snapshot
        )));
    }
    Ok(selected)
}
