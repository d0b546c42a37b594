//! `zonevault restore`: a snapshot (or some of its volumes or users) back
//! into a directory, on any machine that has the configs, credentials and an
//! identity. Needs no local state.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use futures::StreamExt;
use serde::Serialize;
use tokio_util::io::SyncIoBridge;

use crate::audit::{AuditLog, Event, Place};
use crate::config::{Config, Target};
use crate::datakeys::{self, Identity, Keyring};
use crate::error::{Error, Failure, Reason, Result, reason_of};
use crate::keys;
use crate::pack::Span;
use crate::pipeline::{self, HashingReader, OpenError};
use crate::progress::Progress;
use crate::repository::erasures;
use crate::repository::layout;
use crate::repository::snapshot::{Index, Manifest, UnitRecord};
use crate::signing::{self, Statement};
use crate::storage::{ReadBackend, s3::S3Store};
use crate::targets;
use crate::units::{self, UnitKind};
use crate::unpack::{Destination, DestinationError, Placed, Refused, Scope};

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
    /// Refuse a snapshot that is not signed (by default: a warning).
    pub require_signed: bool,
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
    /// Whether the snapshot's signatures were checked (false: unsigned).
    pub signed: bool,
    /// Units that could not be restored from any target (nothing of them is in DIR).
    pub failed: Vec<FailedUnit>,
    /// Entries that were not written, and why.
    pub refused: Vec<Refused>,
    /// Users of the snapshot that were erased after it was taken: not
    /// restored ([`crate::repository::erasures`]).
    pub erased: Vec<ErasedUser>,
}

/// A user left out of a restore because they were erased.
#[derive(Debug, Clone, Serialize)]
pub struct ErasedUser {
    pub user: String,
    /// When the erasure was (the last one, if several).
    pub erased: chrono::DateTime<chrono::Utc>,
}

/// A unit that no target could restore.
#[derive(Debug, Clone, Serialize)]
pub struct FailedUnit {
    pub unit: String,
    pub error: String,
    /// Why it failed (`integrity`: a copy failed its check, and no other
    /// target had an intact one).
    pub reason: Reason,
}

impl Report {
    /// What was not restored, in one sentence; `None` when everything was.
    pub fn incomplete(&self) -> Option<String> {
        if self.failed.is_empty() && self.refused.is_empty() {
            return None;
        }
        Some(format!(
            "restore of snapshot {} is incomplete: {} of {} units failed, {} entries refused (listed above); everything else is restored in {}",
            self.snapshot,
            self.failed.len(),
            self.units,
            self.refused.len(),
            self.to.display()
        ))
    }

    /// [`Report::incomplete`] as the error the restore ends with: its reason
    /// is `integrity` when a failed unit's reason is, else the failed
    /// units' common reason, else `other`.
    pub fn failure(&self) -> Option<Error> {
        let incomplete = self.incomplete()?;
        let refused = (!self.refused.is_empty()).then_some(Reason::Other);
        let reason = Reason::of_all(self.failed.iter().map(|f| f.reason).chain(refused));
        Some(Error::because(reason, incomplete))
    }
}

/// Runs a restore. Every object read, the restore done or its failure, is
/// recorded in `audit` (each read before it starts).
pub async fn run(config: &Config, audit: &Arc<AuditLog>, options: &Options) -> Result<Report> {
    let report = match restore(config, audit, options).await {
        Ok(report) => report,
        Err(e) => {
            audit.record_failure("restore", &e).await;
            return Err(e);
        }
    };
    let (os_user, host) = crate::audit::who();
    audit
        .record(Event::RestoreDone {
            snapshot: report.snapshot.clone(),
            source_core: report.core.clone(),
            to: report.to.display().to_string(),
            users: report.users.clone(),
            volumes: options.volumes.clone(),
            units: report.units - report.failed.len(),
            files: report.files,
            os_user,
            host,
        })
        .await?;
    if let Some(failure) = report.failure() {
        audit.record_failure("restore", &failure).await;
    }
    Ok(report)
}

async fn restore(config: &Config, audit: &Arc<AuditLog>, options: &Options) -> Result<Report> {
    let started = Instant::now();
    let identities = Arc::new(
        keys::load_identities(&options.identity).map_err(|e| Error::Usage(format!("{e:#}")))?,
    );
    let core = snapshots::resolve_core(config, options.core.as_deref())?;
    let dest = Arc::new(open_destination(&options.to, options.force)?);
    let zone = config.zone();

    let (indexes, store, target) = snapshots::list(config, &core).await?;
    let keys = zone
        .signing_keys
        .get(&core)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let index: Index =
        if options.snapshot == "latest" {
            latest(&indexes, &store, &target, keys)
                .await?
                .ok_or_else(|| {
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
        return Err(Error::refused(format!(
            "snapshot {} says it belongs to core {} of zone {}, not core {core} of zone {}: refused",
            index.id, index.core, index.zone, zone.id
        )));
    }

    let reads = Reads::new(audit, &index.id);
    let signed = Signatures {
        store: &store,
        target: &target,
        index: &index,
        keys,
        require: options.require_signed,
    };
    // The index as stored, checked against its signature; from here on only
    // the checked bytes count.
    let index_key = target.key(&layout::index_key(&core, &index.id));
    let raw_index = store
        .get(&index_key)
        .await
        .with_context(|| format!("reading {index_key} on target {}", target.name))?
        .ok_or_else(|| Error::failed(format!("the index of snapshot {} vanished", index.id)))?;
    let is_signed = signed
        .check(&layout::index_key(&core, &index.id), &raw_index, false)
        .await?;
    let checked: Index = serde_json::from_slice(&raw_index).with_context(|| {
        format!(
            "{index_key} on target {} is not a snapshot index",
            target.name
        )
    })?;
    if checked != index {
        return Err(Error::failed(format!(
            "the index of snapshot {} changed while it was read; try again",
            index.id
        )));
    }

    let manifest_key = target.key(&index.manifest.key);
    reads
        .record(&target, manifest_key.clone(), Vec::new())
        .await?;
    let sealed = store
        .get(&manifest_key)
        .await
        .with_context(|| format!("reading {manifest_key} on target {}", target.name))?
        .ok_or_else(|| {
            Error::failed(format!(
                "the manifest of snapshot {} ({manifest_key}) is missing on target {}",
                index.id, target.name
            ))
        })?;
    if signed
        .check(&index.manifest.key, &sealed, is_signed)
        .await?
        != is_signed
    {
        return Err(Error::because(
            Reason::Integrity,
            format!(
                "snapshot {}: its index and its manifest are not both signed: refused",
                index.id
            ),
        ));
    }
    // Every target of the zone holds every object: the one that listed the
    // snapshot first, the others as fallbacks for a missing or damaged copy.
    let first = target.name.clone();
    let mut sources = vec![(target.clone(), store.clone())];
    sources.extend(
        targets::open(config)
            .await
            .into_iter()
            .filter(|(t, _)| t.name != first),
    );
    let mut keyring = Keyring::new(Arc::clone(&identities));
    if let Some(object) = &index.manifest.data_key {
        let object: Arc<str> = object.as_str().into();
        let key = fetch_key(&sources, &reads, &object, Vec::new(), &identities).await;
        if let Err(e) = &key
            && e.no_matching_keys
        {
            return Err(Error::failed(format!(
                "this identity cannot decrypt snapshot {} of zone {}",
                index.id, zone.id
            )));
        }
        keyring.insert(Arc::clone(&object), key.map_err(|e| e.message));
    }
    let manifest_ids = keyring
        .for_key(index.manifest.data_key.as_deref())
        .map_err(|e| {
            Error::because(
                Reason::Integrity,
                format!(
                    "the manifest of snapshot {} cannot be opened: {e:#}",
                    index.id
                ),
            )
        })?;
    let manifest: Manifest = match pipeline::decrypt_small(&sealed, &manifest_ids) {
        Ok(plain) => serde_json::from_slice(&plain).with_context(|| {
            Failure::new(
                Reason::Integrity,
                format!(
                    "the manifest of snapshot {} ({manifest_key} on target {}) is damaged",
                    index.id, target.name
                ),
            )
        })?,
        Err(OpenError::NoMatchingKeys) => {
            return Err(Error::failed(format!(
                "this identity cannot decrypt snapshot {} of zone {}",
                index.id, zone.id
            )));
        }
        Err(e) => {
            return Err(Error::because(
                Reason::Integrity,
                format!(
                    "the manifest of snapshot {} ({manifest_key} on target {}) cannot be decrypted: {e}",
                    index.id, target.name
                ),
            ));
        }
    };

    if manifest.snapshot != index.id || manifest.core != index.core || manifest.zone != index.zone {
        return Err(Error::because(
            Reason::Integrity,
            format!(
                "the manifest of snapshot {} does not match its index (it names snapshot {} of core {} in zone {})",
                index.id, manifest.snapshot, manifest.core, manifest.zone
            ),
        ));
    }
    let selected = select(&manifest, &options.volumes, &options.users)?;
    let (selected, erased) = honour_erasures(
        &sources,
        &core,
        &identities,
        &index,
        selected,
        &options.users,
    )
    .await?;
    fetch_keys(&sources, &reads, &selected, &mut keyring).await;
    // a unit whose data key could not be had is not read at all
    let (selected, keyless): (Vec<UnitRecord>, Vec<UnitRecord>) = selected
        .into_iter()
        .partition(|u| keyring.for_key(u.data_key.as_deref()).is_ok());
    let keyring = Arc::new(keyring);
    let progress = Progress::new(options.progress, selected.len() as u64, "restore");
    let budget = crate::budget::Budget::new(config.core.transfer);
    let from = Sources {
        sources: &sources,
        keyring: &keyring,
        reads: &reads,
        dest: &dest,
        budget: &budget,
    };
    let results: Vec<(UnitRecord, anyhow::Result<Placed>)> =
        futures::stream::iter(crate::pack::spans(&selected))
            .map(|span| from.restore(span, &progress))
            .buffer_unordered(options.jobs.max(1))
            .flat_map(futures::stream::iter)
            .collect()
            .await;
    progress.finish();
    pipeline::release_contexts();
    let (mut dirs, mut files, mut refused, mut failed) = (Vec::new(), 0, Vec::new(), Vec::new());
    let mut restored = Vec::new();
    let keyless_count = keyless.len();
    let keyless = keyless.into_iter().map(|rec| {
        let e = keyring
            .for_key(rec.data_key.as_deref())
            .err()
            .unwrap_or_else(|| anyhow::anyhow!("no data key"));
        (rec, Err(e))
    });
    for (rec, result) in results.into_iter().chain(keyless) {
        match result {
            Ok(placed) => {
                files += placed.files;
                dirs.extend(placed.dirs);
                refused.extend(placed.refused);
                restored.push(rec);
            }
            Err(e) => failed.push(FailedUnit {
                unit: units::label(&rec.volume, &rec.kind),
                error: format!("{e:#}"),
                reason: reason_of(&e),
            }),
        }
    }
    let finish = Arc::clone(&dest);
    refused.extend(
        crate::blocking::spawn(move || {
            let refused = finish.finish_dirs(dirs);
            finish.finish();
            refused
        })
        .await
        .map_err(Error::failed)?,
    );
    failed.sort_by(|a, b| a.unit.cmp(&b.unit));

    Ok(Report {
        snapshot: index.id,
        core,
        zone: zone.id.clone(),
        to: options.to.clone(),
        units: selected.len() + keyless_count,
        files,
        plain_bytes: restored.iter().map(|r| r.plain_size).sum(),
        stored_bytes: restored.iter().map(|r| r.stored_size).sum(),
        seconds: started.elapsed().as_secs_f64(),
        users: restored
            .iter()
            .filter_map(|r| match &r.kind {
                UnitKind::User(id) => Some(id.clone()),
                _ => None,
            })
            .collect(),
        signed: is_signed,
        failed,
        refused,
        erased,
    })
}

/// The newest snapshot; where the zone map lists signing keys for the core,
/// the newest *signed* one, so that an unsigned index planted with a time in
/// the future does not become `latest` (none signed: the newest).
async fn latest(
    indexes: &[Index],
    store: &S3Store,
    target: &Target,
    keys: &[minisign::PublicKey],
) -> Result<Option<Index>> {
    if !keys.is_empty() {
        for index in indexes.iter().rev() {
            let key = target.key(&layout::signature_key(&layout::index_key(
                &index.core,
                &index.id,
            )));
            if store
                .get(&key)
                .await
                .with_context(|| format!("reading {key} on target {}", target.name))?
                .is_some()
            {
                return Ok(Some(index.clone()));
            }
        }
    }
    Ok(indexes.last().cloned())
}

/// The restore directory, opened once (see [`crate::unpack`]).
fn open_destination(to: &Path, force: bool) -> Result<Destination> {
    if let Some(parent) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    Destination::open(to, force).map_err(|e| match e {
        DestinationError::Io { .. } => Error::failed(e),
        other => Error::Usage(other.to_string()),
    })
}

/// Checks a snapshot's detached signatures against the keys the zone map
/// lists for its core.
struct Signatures<'a> {
    store: &'a S3Store,
    target: &'a Target,
    index: &'a Index,
    keys: &'a [minisign::PublicKey],
    require: bool,
}

impl Signatures<'_> {
    /// Checks the signature of `body`, stored under `rel`. Returns whether
    /// it was signed; an unsigned object is accepted with a warning unless
    /// signatures are required (or `must`: its index was signed); a bad
    /// signature is always refused.
    async fn check(&self, rel: &str, body: &[u8], must: bool) -> Result<bool> {
        let id = &self.index.id;
        let sig_key = self.target.key(&layout::signature_key(rel));
        let signature = self
            .store
            .get(&sig_key)
            .await
            .with_context(|| format!("reading {sig_key} on target {}", self.target.name))?;
        let file = signing::file_name(rel);
        let Some(signature) = signature else {
            if must {
                return Err(Error::because(
                    Reason::Integrity,
                    format!(
                        "snapshot {id}: its index is signed but {file} is not: refused (someone who can write to the bucket may have replaced it)"
                    ),
                ));
            }
            if self.require {
                return Err(Error::because(
                    Reason::Integrity,
                    format!(
                        "snapshot {id}: {file} is not signed, and --require-signed was given: refused"
                    ),
                ));
            }
            tracing::warn!(
                "snapshot {id}: {file} is not signed (made before signing, or its signature was removed); restoring it unverified (--require-signed refuses it)"
            );
            return Ok(false);
        };
        if self.keys.is_empty() {
            return Err(Error::because(
                Reason::Integrity,
                format!(
                    "snapshot {id}: {file} is signed, but the zone map lists no signing key for core {} (zones.{}.signing_keys): refused",
                    self.index.core, self.index.zone
                ),
            ));
        }
        let statement = Statement {
            core: &self.index.core,
            zone: &self.index.zone,
            snapshot: id,
            file,
        };
        signing::verify(body, &signature, self.keys, &statement).map_err(|e| {
            Error::because(Reason::Integrity, format!(
                "snapshot {id}: {file} on target {} fails its signature check: {e}; refused (someone who can write to the bucket may have replaced it)",
                self.target.name
            ))
        })?;
        Ok(true)
    }
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

/// Where a unit is stored: its object and its offset there (none: alone).
type UnitAt = (Arc<str>, Option<u64>);

/// Where a restore reads from and writes to, for every span.
struct Sources<'a> {
    /// Every target of the zone, the one that listed the snapshot first.
    sources: &'a [(Target, S3Store)],
    keyring: &'a Arc<Keyring>,
    reads: &'a Reads<'a>,
    dest: &'a Arc<Destination>,
    budget: &'a Arc<crate::budget::Budget>,
}

impl Sources<'_> {
    /// Restores a span's units: all with one read from the first target,
    /// then the units that failed there from the next target, in spans of
    /// their own, and so on until each has been restored from an intact
    /// copy or every target failed it. Every unit's result.
    async fn restore(
        &self,
        span: Span,
        progress: &Progress,
    ) -> Vec<(UnitRecord, anyhow::Result<Placed>)> {
        let mut results = Vec::with_capacity(span.units.len());
        // each failed unit's errors and their reasons, target by target
        let mut failures: HashMap<UnitAt, (Vec<String>, Vec<Reason>)> = HashMap::new();
        let mut spans = vec![span];
        for (target, store) in self.sources {
            let mut failed = Vec::new();
            for span in spans {
                for (rec, result) in self.restore_from(store, target, span).await {
                    match result {
                        Ok(placed) => {
                            progress.unit_done(rec.plain_size);
                            results.push((rec, Ok(placed)));
                        }
                        Err(e) => {
                            let label = units::label(&rec.volume, &rec.kind);
                            tracing::warn!(unit = %label, target = %target.name, error = %format!("{e:#}"), "cannot restore from this target; trying the next");
                            let (errors, reasons) = failures
                                .entry((rec.object.clone(), rec.offset))
                                .or_default();
                            errors.push(format!("{e:#}"));
                            reasons.push(reason_of(&e));
                            failed.push(rec);
                        }
                    }
                }
            }
            spans = crate::pack::spans(&failed);
        }
        for span in spans {
            for rec in span.units {
                let (errors, reasons) = failures
                    .remove(&(rec.object.clone(), rec.offset))
                    .unwrap_or_default();
                let failure = Failure::new(Reason::of_all(reasons), errors.join("; "));
                results.push((rec, Err(failure.into())));
            }
        }
        results
    }

    /// Reads a span from one target with one GET and restores each of its
    /// units from its range of the stream. A failed GET fails every unit.
    async fn restore_from(
        &self,
        store: &S3Store,
        target: &Target,
        span: Span,
    ) -> Vec<(UnitRecord, anyhow::Result<Placed>)> {
        let key = target.key(&span.object);
        let body = async {
            // one read, on the record with every user whose unit it fetches
            let users = span.units.iter().flat_map(|u| u.kind.users()).collect();
            self.reads.record(target, key.clone(), users).await?;
            // A span holds its bytes from the budget until its units are
            // unpacked: with 8 MiB packs, 8 spans at once by default. More
            // only made the unpacking threads take turns on the CPUs (on
            // 2 CPUs and 2 GB: 32 at once cost 20 % more CPU time than 8,
            // and no wall time at 20 ms round trips). A unit stored alone
            // is streamed: it holds at most a span's worth.
            let held = self
                .budget
                .hold(span.bytes().min(crate::pack::MAX_SPAN) as usize)
                .await;
            let slot = (held, self.budget.request().await);
            let body = store
                .get_stream(&key, span.range.clone())
                .await
                .with_context(|| format!("reading {key} on target {}", target.name))?
                .with_context(|| format!("object {key} is missing on target {}", target.name))?;
            anyhow::Ok((body, slot))
        }
        .await;
        let (body, _slot) = match body {
            Ok(body) => body,
            Err(e) => return fail_all(span.units, Failure::new(reason_of(&e), format!("{e:#}"))),
        };
        let (keyring, dest) = (Arc::clone(self.keyring), Arc::clone(self.dest));
        let budget = Arc::clone(self.budget);
        let name = target.name.clone();
        let units = span.units.clone();
        crate::blocking::spawn(move || {
            // unpacking is CPU work: two spans per CPU at once; the others
            // wait with their first bytes in the socket
            let _cpu = budget.cpu_blocking();
            let (mut reader, fetch_failed) = Noted::new(SyncIoBridge::new(body));
            units
                .into_iter()
                .map(|rec| {
                    let restored = if fetch_failed.get() {
                        // the stream broke off in an earlier unit
                        Err(anyhow::anyhow!("the read broke off before this unit"))
                    } else {
                        cut(&mut reader, &rec, |part| {
                            let identities = keyring.for_key(rec.data_key.as_deref())?;
                            restore_unit(part, &identities, &dest, &rec)
                        })
                    };
                    (
                        rec,
                        restored.with_context(|| format!("object {key} on target {name}")),
                    )
                })
                .collect()
        })
        .await
        .unwrap_or_else(|e| {
            let failure = Failure::new(
                Reason::Other,
                format!("restoring from {}: {e}", target.name),
            );
            fail_all(span.units, failure)
        })
    }
}

/// Every unit failed with the same `failure`.
fn fail_all(units: Vec<UnitRecord>, failure: Failure) -> Vec<(UnitRecord, anyhow::Result<Placed>)> {
    units
        .into_iter()
        .map(|rec| (rec, Err(failure.clone().into())))
        .collect()
}

/// Gives `restore` exactly `rec`'s bytes of a span's stream, which is at
/// the unit's start ([`crate::pack::spans`]: the units of a span touch),
/// then reads past whatever of it `restore` left unread, so that the next
/// unit starts where it should.
fn cut<R: std::io::Read>(
    reader: &mut R,
    rec: &UnitRecord,
    restore: impl FnOnce(&mut std::io::Take<&mut R>) -> anyhow::Result<Placed>,
) -> anyhow::Result<Placed> {
    if rec.offset.is_none() {
        // a unit stored alone is the whole stream
        return restore(&mut std::io::Read::take(reader, u64::MAX));
    }
    let mut part = std::io::Read::take(reader, rec.stored_size);
    let restored = restore(&mut part);
    let rest = std::io::copy(&mut part, &mut std::io::sink());
    let placed = restored?;
    rest.context("reading the end of the unit")?;
    Ok(placed)
}

/// A reader that notes whether a read of the reader it wraps failed.
struct Noted<R> {
    inner: R,
    failed: std::rc::Rc<std::cell::Cell<bool>>,
}

impl<R: std::io::Read> Noted<R> {
    fn new(inner: R) -> (Noted<R>, std::rc::Rc<std::cell::Cell<bool>>) {
        let failed = std::rc::Rc::new(std::cell::Cell::new(false));
        let noted = Noted {
            inner,
            failed: std::rc::Rc::clone(&failed),
        };
        (noted, failed)
    }
}

impl<R: std::io::Read> std::io::Read for Noted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(buf);
        if read
            .as_ref()
            .is_err_and(|e| e.kind() != std::io::ErrorKind::Interrupted)
        {
            self.failed.set(true);
        }
        read
    }
}

/// Unpacks one unit into staging, checks its BLAKE3, and only then moves it
/// into place. A unit that fails leaves nothing in the restore directory.
/// An object that does not decrypt or decompress while the object itself
/// was read without error fails with reason `integrity`.
fn restore_unit(
    reader: impl std::io::Read,
    identities: &[Box<dyn age::Identity + Send + Sync>],
    dest: &Destination,
    rec: &UnitRecord,
) -> anyhow::Result<Placed> {
    let (reader, fetch_failed) = Noted::new(reader);
    let mut zstd = pipeline::decompressor();
    let plain = pipeline::open(reader, identities, &mut zstd).map_err(|e| match e {
        // its own data key must open it: another object is in its place
        OpenError::NoMatchingKeys if rec.data_key.is_some() => Failure::new(
            Reason::Integrity,
            "cannot be opened: it is not encrypted to its data key (not the object the manifest names: swapped or replaced)",
        ),
        OpenError::NoMatchingKeys => Failure::new(Reason::Other, format!("cannot be opened: {e}")),
        _ if fetch_failed.get() => Failure::new(Reason::Other, format!("cannot be opened: {e}")),
        _ => Failure::new(Reason::Integrity, format!("cannot be opened: {e}")),
    })?;
    let (plain, open_failed) = Noted::new(plain);
    // a failed read of the plain stream that is not a failed fetch: damaged
    let damaged = |e: anyhow::Error| {
        if open_failed.get() && !fetch_failed.get() {
            Failure::new(Reason::Integrity, format!("{e:#}")).into()
        } else {
            e
        }
    };
    // never more than the manifest says: a swapped object must not fill the disk
    let mut hashing = HashingReader::new(std::io::Read::take(plain, rec.plain_size + 1));
    let label = units::label(&rec.volume, &rec.kind);
    let mut staged = dest.stage(&rec.volume, &label, Scope::of(&rec.kind, &rec.dirs))?;
    staged
        .unpack(std::io::BufReader::with_capacity(256 << 10, &mut hashing))
        .map_err(damaged)?;
    let (blake3, size) = hashing
        .finish()
        .context("reading the end of the object")
        .map_err(damaged)?;
    if blake3 != rec.blake3 || size != rec.plain_size {
        staged.discard();
        return Err(Failure::new(
            Reason::Integrity,
            format!(
                "integrity check failed: BLAKE3 {blake3} ({size} bytes) differs from the manifest's {} ({} bytes); nothing of it was restored",
                rec.blake3, rec.plain_size
            ),
        )
        .into());
    }
    staged.commit()
}

/// The units to restore: all, or those of some volumes, or some users' units.
/// Why a key object gave no key.
struct KeyFailure {
    message: String,
    /// Every copy opened, and none with these identities.
    no_matching_keys: bool,
}

/// The data key in the key object `object`, from the first target that has
/// an intact copy (each read on the record, for `users`).
async fn fetch_key(
    sources: &[(Target, S3Store)],
    reads: &Reads<'_>,
    object: &str,
    users: Vec<String>,
    zone: &[Identity],
) -> std::result::Result<age::x25519::Identity, KeyFailure> {
    let mut errors = Vec::new();
    let mut no_matching_keys = true;
    for (target, store) in sources {
        let key = target.key(object);
        let got = async {
            reads.record(target, key.clone(), users.clone()).await?;
            store
                .get(&key)
                .await?
                .ok_or_else(|| anyhow::anyhow!("missing"))
        }
        .await;
        let sealed = match got {
            Ok(sealed) => sealed,
            Err(e) => {
                no_matching_keys = false;
                errors.push(format!("target {}: {e:#}", target.name));
                continue;
            }
        };
        match datakeys::unwrap(&sealed, zone) {
            Ok(identity) => return Ok(identity),
            Err(e) => {
                no_matching_keys &= matches!(e, datakeys::UnwrapError::NoMatchingKeys);
                errors.push(format!("target {}: {e}", target.name));
            }
        }
    }
    Err(KeyFailure {
        message: format!("cannot be had ({})", errors.join("; ")),
        no_matching_keys: no_matching_keys && !errors.is_empty(),
    })
}

/// Key reads in flight at once: each is one small GET.
const KEY_READS: usize = 32;

/// Fetches the data keys of `units` into `keyring`.
async fn fetch_keys(
    sources: &[(Target, S3Store)],
    reads: &Reads<'_>,
    units: &[UnitRecord],
    keyring: &mut Keyring,
) {
    let mut wanted: HashMap<Arc<str>, Vec<String>> = HashMap::new();
    for u in units {
        if let Some(k) = &u.data_key
            && !keyring.has(k)
        {
            wanted
                .entry(Arc::clone(k))
                .or_default()
                .extend(u.kind.users());
        }
    }
    let ids: &[Identity] = keyring.zone();
    let fetched: Vec<(Arc<str>, std::result::Result<age::x25519::Identity, String>)> =
        futures::stream::iter(wanted)
            .map(|(object, users)| async move {
                let key = fetch_key(sources, reads, &object, users, ids)
                    .await
                    .map_err(|e| e.message);
                (object, key)
            })
            .buffer_unordered(KEY_READS)
            .collect()
            .await;
    for (object, key) in fetched {
        keyring.insert(object, key);
    }
}

/// Leaves out of `selected` the users erased after the snapshot was taken
/// (by the ledger on every target); a restore that names one of them is
/// refused, saying when they were erased.
async fn honour_erasures(
    sources: &[(Target, S3Store)],
    core: &str,
    identities: &[Identity],
    index: &Index,
    selected: Vec<UnitRecord>,
    asked: &[String],
) -> Result<(Vec<UnitRecord>, Vec<ErasedUser>)> {
    // Fails closed: a ledger that cannot be read could hide an erasure.
    let mut listed = 0;
    let mut read: HashMap<String, std::result::Result<erasures::Entry, String>> = HashMap::new();
    for (target, store) in sources {
        match erasures::read(store, target, core, identities).await {
            Ok(found) => {
                listed += 1;
                for (key, entry) in found {
                    let slot = read
                        .entry(key.to_string())
                        .or_insert_with(|| Err(String::new()));
                    match entry {
                        Ok(e) => *slot = Ok(e),
                        Err(e) if slot.is_err() => *slot = Err(format!("{e:#}")),
                        Err(_) => {}
                    }
                }
            }
            Err(e) => {
                tracing::warn!(target = %target.name, error = %format!("{e:#}"), "cannot list the erasure ledger on this target");
            }
        }
    }
    if listed == 0 {
        return Err(Error::failed(format!(
            "the erasure ledger of core {core} could not be listed on any target: a restore could bring back an erased user; refused"
        )));
    }
    let mut entries = Vec::new();
    for (key, entry) in read {
        match entry {
            Ok(e) => entries.push(e),
            Err(why) => {
                return Err(Error::because(
                    Reason::Integrity,
                    format!(
                        "erasure ledger entry {key} of core {core} cannot be read ({why}): a restore could bring back an erased user; refused"
                    ),
                ));
            }
        }
    }
    let at = erasures::erased_at(&entries);
    let erased_after = |user: &str| at.get(user).copied().filter(|t| *t >= index.time);
    if let Some((user, when)) = asked.iter().find_map(|u| erased_after(u).map(|t| (u, t))) {
        return Err(Error::failed(format!(
            "user {user} was erased on {} (after snapshot {} was taken): its backups are gone, and zonevault never restores an erased user; nothing was restored",
            when.format("%Y-%m-%d %H:%M:%S UTC"),
            index.id
        )));
    }
    let mut erased = Vec::new();
    let kept = selected
        .into_iter()
        .filter(|u| match &u.kind {
            UnitKind::User(id) => match erased_after(id) {
                Some(t) => {
                    erased.push(ErasedUser {
                        user: id.clone(),
                        erased: t,
                    });
                    false
                }
                None => true,
            },
            _ => true,
        })
        .collect();
    erased.sort_by(|a, b| a.user.cmp(&b.user));
    Ok((kept, erased))
}

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
    for u in &manifest.units {
        if let UnitKind::User(id) = &u.kind
            && !units::is_valid_user_id(id)
        {
            return Err(Error::failed(format!(
                "the manifest of snapshot {} names user {id:?}, which is not a valid user id: refusing to restore it",
                manifest.snapshot
            )));
        }
        // a unit's directories are user-shaped directories of its volume
        if let Some(bad) = u.dirs.iter().find(|d| units::is_user_dir(d).is_none()) {
            return Err(Error::failed(format!(
                "the manifest of snapshot {} gives {} the directory {:?}, which is not a user directory: refusing to restore it",
                manifest.snapshot,
                units::label(&u.volume, &u.kind),
                bad
            )));
        }
    }
    for v in volumes {
        if !manifest.units.iter().any(|u| &*u.volume == v.as_str()) {
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
        .filter(|u| volumes.is_empty() || volumes.iter().any(|v| *v == *u.volume))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::unit_record;
    use std::io::Read;

    /// What `cut` gives the unit: its bytes, read to the end.
    fn read_all(reader: &mut &[u8], rec: &UnitRecord) -> anyhow::Result<Vec<u8>> {
        let mut got = Vec::new();
        cut(reader, rec, |part| {
            part.read_to_end(&mut got)?;
            Ok(Placed::default())
        })?;
        Ok(got)
    }

    #[test]
    fn each_unit_of_a_stream_gets_exactly_its_bytes_whatever_the_one_before_read() {
        let mut reader = &b"aaaaBBBBBBcc"[..];
        // the first unit reads one byte of its four and fails
        let failed = cut(&mut reader, &unit_record("o", Some(0), 4), |part| {
            part.read_exact(&mut [0; 1])?;
            anyhow::bail!("damaged")
        });
        assert_eq!(failed.unwrap_err().to_string(), "damaged");
        assert_eq!(
            read_all(&mut reader, &unit_record("o", Some(4), 6)).unwrap(),
            b"BBBBBB"
        );
        assert_eq!(
            read_all(&mut reader, &unit_record("o", Some(10), 2)).unwrap(),
            b"cc"
        );
        // a unit stored alone is the whole stream
        let mut whole = &b"all of it"[..];
        assert_eq!(
            read_all(&mut whole, &unit_record("o", None, 3)).unwrap(),
            b"all of it"
        );
    }
}
