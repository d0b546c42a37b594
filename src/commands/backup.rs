//! `zonevault backup`: one snapshot of the core's volumes, in every target of
//! its zone.
//!
//! Order of writes, which is what makes a snapshot atomic: the marker (first
//! use of a target), then every unit object, then the encrypted manifest,
//! then the cleartext index, last. Until the index exists nothing of the run
//! is visible; the next run removes what an uncommitted run left.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::archive;
use crate::audit::{AuditLog, Event, ObjectKind};
use crate::budget::Budget;
use crate::config::{Config, Dump, Volume};
use crate::datakeys::{KeyRef, RunKeys};
use crate::error::{Error, Result};
use crate::hooks;
use crate::incremental;
use crate::pack::{Packer, Placement};
use crate::pipeline::{self, Part, PartSink};
use crate::progress::Progress;
use crate::repository::commit;
use crate::repository::layout::{self, Key};
use crate::repository::snapshot::{self, Totals, UnitRecord};
use crate::residency::{Contents, Writable};
use crate::scan;
use crate::signing::{self, Signer};
use crate::storage::ReadBackend;
use crate::storage::s3::S3Store;
use crate::units::{self, Unit};
use crate::upload::{self, Head};

use super::session::Session;

/// How a backup runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Only these volumes (all when empty).
    pub volumes: Vec<String>,
    /// Units processed at once.
    pub jobs: usize,
    /// Parts in flight per unit.
    pub part_jobs: usize,
    /// Size of an upload part.
    pub part_size: usize,
    /// Show a progress bar.
    pub progress: bool,
    /// Upload every unit, even unchanged ones.
    pub full: bool,
    /// Wait for another run of this core to end (else fail as busy).
    pub wait: bool,
    /// Cancelled: stop before the commit (the daemon's SIGTERM). Uploads in
    /// flight are aborted, no unit starts, and the run fails without
    /// committing; once the commit has begun it runs to its end.
    pub cancel: CancellationToken,
}

/// 8 MiB parts: objects up to 80 GB (S3's 10,000-part limit) with a few parts
/// per unit in memory.
pub const DEFAULT_PART_SIZE: usize = 8 << 20;

impl Options {
    /// Defaults: every volume, as many units at once as the run's request
    /// budget (`[transfer] requests`, 32) lets wait on the store, 2 parts in
    /// flight per unit. The CPU stages run on two threads per CPU, and the
    /// bytes in flight are bounded by the budget (`[transfer] in_flight`,
    /// 64 MiB) whatever `jobs` is: see [`crate::budget`].
    pub fn new() -> Options {
        Options {
            volumes: Vec::new(),
            jobs: default_jobs(),
            part_jobs: 2,
            part_size: DEFAULT_PART_SIZE,
            progress: false,
            full: false,
            wait: true,
            cancel: CancellationToken::new(),
        }
    }
}

/// The most units in flight that `--jobs` allows.
pub const MAX_JOBS: usize = 256;

/// The most parts in flight per unit that `--part-jobs` allows.
pub const MAX_PART_JOBS: usize = 32;

/// Units at once by default: the default request budget. What bounds a run
/// is its budget, not this: a unit waiting for a request slot or a CPU holds
/// no buffer.
pub fn default_jobs() -> usize {
    crate::budget::DEFAULT_REQUESTS.min(MAX_JOBS)
}

impl Default for Options {
    fn default() -> Self {
        Options::new()
    }
}

/// What a backup did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub snapshot: String,
    pub core: String,
    pub zone: String,
    pub targets: Vec<String>,
    pub units: usize,
    /// Units uploaded by this run.
    pub uploaded: usize,
    /// Unchanged units whose object from an earlier snapshot is referenced again.
    pub reused: usize,
    pub files: u64,
    pub plain_bytes: u64,
    pub stored_bytes: u64,
    /// Stored bytes of the objects this run uploaded (each object counted
    /// once, whatever the number of targets).
    pub uploaded_bytes: u64,
    /// Plain bytes of the units this run uploaded.
    pub uploaded_plain_bytes: u64,
    pub seconds: f64,
    /// Files that changed while read (stored as read).
    pub changed: Vec<String>,
    /// Entries that vanished during the walk (skipped).
    pub vanished: Vec<String>,
    /// Entries that were no longer what the walk saw when it opened them
    /// (swapped with a link, a FIFO or another file): skipped, never followed.
    pub changed_during_walk: Vec<String>,
    /// Files with hard links that this unit does not hold: the same bytes may
    /// also live outside the unit (stored; an operator should know).
    pub hard_links: Vec<String>,
    /// Directories of a pryv volume that look like user directories but are
    /// not where their name puts them: backed up in the shared unit.
    pub misplaced: Vec<String>,
    /// Symlinks pointing outside their volume: stored and restored as links
    /// (whose targets may not exist on a restore machine).
    pub escaping_links: Vec<String>,
    /// SQLite databases captured through the online backup.
    pub databases: u64,
    /// Files with the SQLite header that SQLite cannot read: stored as files.
    pub not_databases: Vec<String>,
    /// Leftovers of uncommitted runs removed before this one.
    pub cleaned: usize,
}

/// Runs one backup. Every step is in `audit`, a failure included; at the
/// end, success or failure, the run's records are copied to the targets.
pub async fn run(config: &Config, audit: &Arc<AuditLog>, options: &Options) -> Result<Report> {
    let started = Instant::now();
    let volumes = audit
        .failing("backup", select_volumes(config, &options.volumes))
        .await?;
    let signer = audit
        .failing("backup", signing::core_signer(config))
        .await?;
    let stage = Stages::new();
    let session = Session::begin(config, audit, "backup", options.wait, &options.cancel).await?;
    stage.done("session begin");
    let result = snapshot(
        config,
        audit,
        options,
        session.targets(),
        &volumes,
        signer.as_ref(),
        started,
    )
    .await;
    stage.done("snapshot");
    let finished = session.finish(result).await;
    stage.done("session finish");
    finished
}

fn stopped() -> Error {
    Error::failed(
        "stopped before its commit (the daemon is shutting down); uploads in flight were aborted, and the next run cleans up",
    )
}

/// The volumes named (all when none is).
fn select_volumes(config: &Config, names: &[String]) -> Result<Vec<Volume>> {
    Ok(if names.is_empty() {
        config.core.volumes.clone()
    } else {
        names
            .iter()
            .map(|name| {
                config
                    .core
                    .volumes
                    .iter()
                    .find(|v| &v.name == name)
                    .cloned()
                    .ok_or_else(|| {
                        let known: Vec<&str> = config
                            .core
                            .volumes
                            .iter()
                            .map(|v| v.name.as_str())
                            .collect();
                        Error::Usage(format!("no volume named {name:?}; this core has {known:?}"))
                    })
            })
            .collect::<Result<_>>()?
    })
}

/// Takes the snapshot into `targets`, which passed the gate: the stages of a
/// run, in order.
async fn snapshot(
    config: &Config,
    audit: &Arc<AuditLog>,
    options: &Options,
    targets: &[Writable<S3Store>],
    volumes: &[Volume],
    signer: Option<&Signer>,
    started: Instant,
) -> Result<Report> {
    let core = &config.core.core_id;
    let zone = config.zone();
    let stage = Stages::new();
    let Prepared {
        cleaned,
        reusable,
        keys: present_keys,
    } = prepare_targets(targets, core).await?;
    stage.done("prepare targets");
    let databases = database_capture(config, volumes).await?;
    let now = chrono::Utc::now();
    let id = snapshot::new_id(now);
    // An upload starts once it holds a unit's first two parts: producers
    // are capped so that two parts each always fit in the byte budget, or
    // producers waiting for bytes could hold all of it and wait forever.
    // The open pack holds its bytes too.
    let mut limits = config.core.transfer;
    limits.cpus = limits.cpus.min(
        (limits.bytes.saturating_sub(limits.pack_size) / (2 * options.part_size.max(1))).max(1),
    );
    let budget = Budget::new(limits);
    let keys = {
        let (dir, core) = (config.core.state_dir.clone(), core.clone());
        crate::blocking::run("reading the data keys", move || {
            crate::datakeys::Keys::load(&dir, &core)
        })
        .await??
    };
    let keys = keys.present_on_targets(&present_keys);
    let (keys, key_queue) = RunKeys::new(keys, targets, &id, &zone.recipients, &budget);
    // the core's own key: its shared units and its manifest
    let own = keys.own().await?;
    let mut tally = {
        // the previous snapshot's units are needed by the reads only: they
        // are gone before the commit, which holds the new ones
        let previous = previous_units(config, options.full).await?;
        let previous = previous.as_ref().map(|p| p.lookup()).unwrap_or_default();
        stage.done("previous units");
        // a pack is one part: a unit that needs several parts is never packed
        let pack_size = limits.pack_size.min(options.part_size.saturating_sub(1));
        let packer = Packer::new(targets, core, &id, &budget, pack_size);
        let run = UnitRun {
            targets,
            budget: &budget,
            core,
            snapshot: &id,
            keys: &keys,
            own: &own,
            level: config.core.zstd_level,
            options,
            previous: &previous,
            reusable: &reusable,
            present_keys: &present_keys,
            databases: &databases,
            audit,
            state_dir: &config.core.state_dir,
            packer: &packer,
        };
        // the new data keys are written alongside the units
        let read = async {
            let read = read_with_hooks(&run, volumes).await;
            keys.close();
            read
        };
        let (read, keys_written) = tokio::join!(read, keys.write(key_queue));
        // whether the read succeeded or not: the daemon lives on between runs
        crate::pipeline::release_contexts();
        // the keys written to the targets, whether the read succeeded or not
        remember_keys(config, &keys).await;
        // a key that could not be written is the cause of the units that
        // failed for want of it
        keys_written.map_err(Error::Failed)?;
        read?
    };
    stage.done("read volumes");
    // The last point where a stop leaves nothing: from here the commit runs
    // to its end.
    if options.cancel.is_cancelled() {
        return Err(stopped());
    }
    let units = Arc::new(std::mem::take(&mut tally.records));
    let draft = commit::Draft {
        id: &id,
        time: now,
        core,
        zone: &zone.id,
        units: Arc::clone(&units),
        data_key: &own.object,
    };
    let spool = commit::Spool {
        dir: &config.core.state_dir,
        budget: &budget,
        part_size: options.part_size,
        part_jobs: options.part_jobs,
    };
    let totals = commit::commit(
        targets,
        &draft,
        std::slice::from_ref(&own.recipient),
        signer,
        &spool,
    )
    .await?;
    drop(draft);
    stage.done("commit");
    let report = tally.report(config, targets, &id, totals, cleaned, started);
    remember_units(config, &id, units).await;
    stage.done("remember units");
    Ok(report)
}

/// Times the stages of a run, for `--log-level zonevault::timing=debug`.
struct Stages(std::sync::Mutex<Instant>);

impl Stages {
    fn new() -> Stages {
        Stages(std::sync::Mutex::new(Instant::now()))
    }

    fn done(&self, stage: &str) {
        let now = Instant::now();
        let last = std::mem::replace(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()), now);
        let seconds = (now - last).as_secs_f64();
        tracing::debug!(target: "zonevault::timing", stage, seconds, "stage done");
    }
}

/// What the targets hold before the run writes its first unit.
struct Prepared {
    /// Leftovers of uncommitted runs removed.
    cleaned: usize,
    /// Objects that a committed snapshot references on every target: the
    /// only ones an unchanged unit may point to again.
    reusable: HashSet<String>,
    /// The key objects of this core on every target: a data key whose
    /// object is gone (an erasure run elsewhere, `erase --all-cores`) is
    /// never encrypted to again, nor a unit under it reused.
    keys: HashSet<u128>,
}

/// Writes the marker where it is missing and removes what uncommitted runs
/// left on every target.
async fn prepare_targets(targets: &[Writable<S3Store>], core: &str) -> Result<Prepared> {
    for t in targets {
        t.ensure_marker()
            .await
            .with_context(|| format!("writing the marker of target {}", t.target().name))?;
    }
    let mut cleaned = 0;
    let mut reusable: Option<HashSet<String>> = None;
    let mut keys: Option<HashSet<u128>> = None;
    for t in targets {
        let listed = t
            .store()
            .list(&t.key(&layout::keys_dir(core)))
            .await
            .with_context(|| format!("listing the data keys on target {}", t.target().name))?;
        let here: HashSet<u128> = listed
            .iter()
            .filter_map(|o| layout::data_key_id(&o.key))
            .collect();
        keys = Some(match keys {
            None => here,
            Some(k) => k.intersection(&here).cloned().collect(),
        });
    }
    for t in targets {
        let (removed, referenced) = crate::repository::clean_uncommitted(t, core)
            .await
            .with_context(|| format!("cleaning up target {}", t.target().name))?;
        cleaned += removed;
        reusable = Some(match reusable {
            None => referenced,
            Some(r) => r.intersection(&referenced).cloned().collect(),
        });
    }
    Ok(Prepared {
        cleaned,
        reusable: reusable.unwrap_or_default(),
        keys: keys.unwrap_or_default(),
    })
}

/// The units of the last committed snapshot (none for a full run, or when
/// the zone's recipients changed since).
async fn previous_units(config: &Config, full: bool) -> Result<Option<incremental::Previous>> {
    if full {
        return Ok(None);
    }
    let (dir, core, digest) = (
        config.core.state_dir.clone(),
        config.core.core_id.clone(),
        incremental::recipients_digest(&config.zone().recipients),
    );
    crate::blocking::run("reading the units of the last snapshot", move || {
        incremental::load(&dir, &core, &digest)
    })
    .await
    .map_err(Error::from)
}

/// How each volume's SQLite databases are captured (`None`: as files), with
/// the temp dir for large copies emptied of a crashed run's leftovers.
async fn database_capture(
    config: &Config,
    volumes: &[Volume],
) -> Result<HashMap<String, Option<archive::Databases>>> {
    let dir = config.core.state_dir.clone();
    let (tmp, _) = crate::blocking::run("preparing the temp dir", move || {
        crate::sqlite::prepare_tmp(&dir)
    })
    .await??;
    Ok(volumes
        .iter()
        .map(|v| {
            let dbs =
                (v.sqlite == crate::config::SqliteMode::Consistent).then(|| archive::Databases {
                    tmp: tmp.clone(),
                    busy_timeout: v.sqlite_busy_timeout,
                });
            (v.name.clone(), dbs)
        })
        .collect())
}

/// Reads the volumes between their hooks: every `before` (volumes in order)
/// before any volume is read; every `after` of a volume whose `before` was
/// started (or that has none), in reverse order, once all units are done,
/// failed or not.
async fn read_with_hooks(run: &UnitRun<'_>, volumes: &[Volume]) -> Result<Tally> {
    let (audit, id, cancel) = (run.audit, run.snapshot, &run.options.cancel);
    let mut entered: Vec<&Volume> = Vec::new();
    let mut before_failed = None;
    for v in volumes {
        entered.push(v);
        if let Some(argv) = &v.hooks.before
            && let Err(e) = run_hook(audit, v, "before", argv, id, Some(cancel.clone())).await
        {
            before_failed = Some(e);
            break;
        }
    }
    let read = match before_failed {
        Some(e) => Err(e),
        None => read_volumes(run, volumes).await,
    };
    let mut after_failed = None;
    for v in entered.iter().rev() {
        if let Some(argv) = &v.hooks.after
            && let Err(e) = run_hook(audit, v, "after", argv, id, None).await
        {
            after_failed.get_or_insert(e);
        }
    }
    match (read, after_failed) {
        (Err(e), Some(after)) => {
            tracing::error!(error = %after, "an after hook failed too");
            Err(e)
        }
        (Err(e), None) | (Ok(_), Some(e)) => Err(e),
        (Ok(r), None) => Ok(r),
    }
}

/// The units of a run and what the walks noticed, summed for the report.
#[derive(Default)]
struct Tally {
    /// By volume, then kind.
    records: Vec<UnitRecord>,
    uploaded: usize,
    uploaded_bytes: u64,
    uploaded_plain_bytes: u64,
    files: u64,
    databases: u64,
    changed: Vec<String>,
    vanished: Vec<String>,
    changed_during_walk: Vec<String>,
    hard_links: Vec<String>,
    escaping_links: Vec<String>,
    not_databases: Vec<String>,
    misplaced: Vec<String>,
}

impl Tally {
    /// Adds one stored unit; its walk's lists are kept as text, the rest of
    /// its stats dropped (a run of 100,000 units keeps one record each).
    fn add(&mut self, stored: Stored) {
        let shown = |paths: &[std::path::PathBuf]| -> Vec<String> {
            paths.iter().map(|p| p.display().to_string()).collect()
        };
        let Stored {
            record,
            stats,
            reused,
        } = stored;
        if !reused {
            self.uploaded += 1;
            self.uploaded_bytes += record.stored_size;
            self.uploaded_plain_bytes += record.plain_size;
        }
        self.files += record.files;
        self.databases += stats.databases;
        self.changed.extend(shown(&stats.changed));
        self.vanished.extend(shown(&stats.vanished));
        self.changed_during_walk
            .extend(shown(&stats.changed_during_walk));
        self.hard_links.extend(shown(&stats.hard_links));
        self.escaping_links.extend(shown(&stats.escaping_links));
        self.not_databases.extend(shown(&stats.not_databases));
        self.records.push(record);
    }

    /// Once every unit is in: the records in their stable order, and the
    /// warnings of the walk.
    fn done(mut self) -> Tally {
        let t = &mut self;
        t.records
            .sort_by(|a, b| (&a.volume, &a.kind).cmp(&(&b.volume, &b.kind)));
        if !t.vanished.is_empty() {
            tracing::warn!(
                "{} entries vanished during the backup and were skipped",
                t.vanished.len()
            );
        }
        if !t.changed_during_walk.is_empty() {
            tracing::warn!(
                "{} entries changed during the walk (swapped or replaced) and were skipped, never followed",
                t.changed_during_walk.len()
            );
        }
        self
    }

    fn report(
        self,
        config: &Config,
        targets: &[Writable<S3Store>],
        snapshot: &str,
        totals: Totals,
        cleaned: usize,
        started: Instant,
    ) -> Report {
        let units = totals.units;
        Report {
            snapshot: snapshot.to_string(),
            core: config.core.core_id.clone(),
            zone: config.zone().id.clone(),
            targets: targets.iter().map(|t| t.target().name.clone()).collect(),
            units,
            uploaded: self.uploaded,
            reused: units - self.uploaded,
            files: self.files,
            plain_bytes: totals.plain_bytes,
            stored_bytes: totals.stored_bytes,
            uploaded_bytes: self.uploaded_bytes,
            uploaded_plain_bytes: self.uploaded_plain_bytes,
            seconds: started.elapsed().as_secs_f64(),
            changed: self.changed,
            vanished: self.vanished,
            changed_during_walk: self.changed_during_walk,
            hard_links: self.hard_links,
            misplaced: self.misplaced,
            escaping_links: self.escaping_links,
            databases: self.databases,
            not_databases: self.not_databases,
            cleaned,
        }
    }
}

/// Records the units of the committed snapshot for the next run. A failure
/// costs only time: the next run uploads every unit.
/// Writes `keys.json` when the run made new data keys. A failure is a
/// warning: the next run makes new keys for those users (the objects of the
/// lost ones stay named in the audit log, for `erase`).
async fn remember_keys(config: &Config, keys: &RunKeys<'_, S3Store>) {
    let Some(keys) = keys.take_added() else {
        return;
    };
    let dir = config.core.state_dir.clone();
    let saved = crate::blocking::run("recording the data keys", move || keys.save(&dir))
        .await
        .and_then(|r| r);
    if let Err(e) = saved {
        tracing::warn!(error = %format!("{e:#}"), "cannot record the new data keys; the next run makes new ones for these users");
    }
}

async fn remember_units(config: &Config, id: &str, records: Arc<Vec<UnitRecord>>) {
    let (core, snapshot) = (config.core.core_id.clone(), id.to_string());
    let recipients = incremental::recipients_digest(&config.zone().recipients);
    let dir = config.core.state_dir.clone();
    let saved = crate::blocking::run("recording the units of this snapshot", move || {
        incremental::save(&dir, &core, &snapshot, &recipients, &records)
    })
    .await
    .and_then(|r| r);
    if let Err(e) = saved {
        tracing::warn!(error = %format!("{e:#}"), "cannot record the units of this snapshot; the next run uploads every unit");
    }
}

/// Scans the volumes and stores their units (a command volume: one unit, its
/// command's stdout). On failure, aborts the uploads left open.
async fn read_volumes(run: &UnitRun<'_>, volumes: &[Volume]) -> Result<Tally> {
    let (options, targets, core) = (run.options, run.targets, run.core);
    // The scans are kept as they are and their units taken one by one (no
    // second list of 100,000 units while they are in flight), each with its
    // volume's one exclude set (a compiled glob set cloned per unit costs
    // kilobytes: hundreds of MB for 100,000 users).
    let mut found: Vec<Box<dyn Iterator<Item = Pending> + Send>> = Vec::new();
    let mut count = 0;
    let (mut misplaced, mut changed_during_walk) = (Vec::new(), Vec::new());
    for v in volumes {
        if let Some(dump) = &v.dump {
            let unit = Unit {
                volume: v.name.as_str().into(),
                root: v.path.as_path().into(),
                kind: units::UnitKind::Volume,
                dirs: Vec::new(),
            };
            let exclude = Arc::new(v.exclude.clone());
            let origin = Origin::Dump(Box::new(dump.clone()));
            found.push(Box::new(std::iter::once((unit, exclude, origin))));
            count += 1;
            continue;
        }
        let volume = v.clone();
        let scan = crate::blocking::run("scanning a volume", move || scan::units_of(&volume))
            .await?
            .with_context(|| format!("reading volume {} ({})", v.name, v.path.display()))?;
        misplaced.extend(scan.misplaced.iter().map(|p| p.display().to_string()));
        changed_during_walk.extend(scan.changed.iter().map(|p| p.display().to_string()));
        count += scan.units.len();
        let exclude = Arc::new(v.exclude.clone());
        found.push(Box::new(scan.units.into_iter().map(move |s| {
            (s.unit, Arc::clone(&exclude), Origin::Walk(s.fingerprint))
        })));
    }
    let units = found.into_iter().flatten();

    tracing::debug!(target: "zonevault::timing", units = count, "volumes scanned");
    let progress = Progress::new(options.progress, count as u64, "backup");
    let tally = Tally {
        // one record per unit: no doubling of 100,000 records while the
        // units are in flight
        records: Vec::with_capacity(count),
        misplaced,
        changed_during_walk,
        ..Tally::default()
    };
    // A failed unit ends the run, but the units in flight are awaited, not
    // dropped: a dump command must reach its record (`hook_finished`), and
    // every started write settles. Units not yet started are skipped.
    let failed = std::sync::atomic::AtomicBool::new(false);
    let (tally, first_error) = futures::stream::iter(units)
        .map(|(unit, exclude, origin)| {
            let (progress, failed) = (&progress, &failed);
            async move {
                if failed.load(std::sync::atomic::Ordering::Relaxed) {
                    return None;
                }
                let r = if matches!(origin, Origin::Dump(_)) {
                    // a dump command watches the stop token itself (and
                    // its end is on record); its upload is stopped below
                    store_unit(run, unit, exclude, origin).await
                } else {
                    tokio::select! {
                        r = store_unit(run, unit, exclude, origin) => r,
                        () = options.cancel.cancelled() => Err(stopped()),
                    }
                };
                match &r {
                    Ok(stored) => progress.unit_done(stored.record.plain_size),
                    Err(_) => failed.store(true, std::sync::atomic::Ordering::Relaxed),
                }
                Some(r)
            }
        })
        .buffer_unordered(options.jobs.max(1))
        .fold(
            (tally, None),
            |(mut tally, mut first_error), r| async move {
                match r {
                    Some(Ok(stored)) => tally.add(stored),
                    Some(Err(e)) => {
                        first_error.get_or_insert(e);
                    }
                    None => {}
                }
                (tally, first_error)
            },
        )
        .await;
    let results = match first_error {
        Some(e) => Err(e),
        None => finish_packs(run, tally).await,
    };
    progress.finish();
    match results {
        Ok(tally) => Ok(tally.done()),
        Err(e) => {
            // Units still in flight were dropped with their uploads open:
            // abort every upload of this core (the run lock makes them ours).
            for t in targets {
                if let Err(abort) = crate::repository::abort_uploads(
                    t,
                    core,
                    "the run failed before the object was complete",
                )
                .await
                {
                    tracing::warn!(target = %t.target().name, error = %abort, "could not abort unfinished uploads; the next run removes them");
                }
            }
            Err(e)
        }
    }
}

/// Writes the last pack, and gives each unit packed by this run the size of
/// its pack (the index lists it).
async fn finish_packs(run: &UnitRun<'_>, mut tally: Tally) -> Result<Tally> {
    let sizes = run
        .packer
        .finish()
        .await
        .map_err(|e| Error::Failed(e.context("writing the last pack of small units")))?;
    for r in &mut tally.records {
        if r.offset.is_some() && r.object_size.is_none() {
            let size = sizes.get(&*r.object).ok_or_else(|| {
                Error::failed(format!(
                    "the pack {} of {} was not written",
                    r.object, r.volume
                ))
            })?;
            r.object_size = Some(*size);
        }
    }
    Ok(tally)
}

/// The environment of a volume's hooks and dump command.
fn hook_env(volume: &Volume, phase: &str, snapshot: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ZONEVAULT_VOLUME", volume.name.clone()),
        ("ZONEVAULT_SNAPSHOT", snapshot.to_string()),
        ("ZONEVAULT_PHASE", phase.to_string()),
    ]
}

/// Runs a volume's `before` or `after` hook, on the record: fails the run
/// when it does not exit with status 0.
async fn run_hook(
    audit: &Arc<AuditLog>,
    volume: &Volume,
    phase: &'static str,
    argv: &[String],
    snapshot: &str,
    stop: Option<CancellationToken>,
) -> Result<()> {
    audit
        .record(Event::HookStarted {
            volume: volume.name.clone(),
            phase: phase.into(),
            command: argv.to_vec(),
            snapshot: snapshot.into(),
        })
        .await?;
    tracing::info!(volume = %volume.name, phase, command = ?argv, "running hook");
    let (owned, env, timeout) = (
        argv.to_vec(),
        hook_env(volume, phase, snapshot),
        volume.hooks.timeout,
    );
    let ran = crate::blocking::run("a hook", move || {
        hooks::run(
            &hooks::Spec {
                argv: &owned,
                env,
                timeout,
                stop,
            },
            None,
        )
    })
    .await?;
    let what = format!("the {phase} hook of volume {} ({argv:?})", volume.name);
    finished(audit, volume, phase, argv, snapshot, ran.as_ref().ok()).await?;
    let outcome = ran.map_err(|e| Error::failed(format!("{what}: {e}")))?;
    tracing::info!(volume = %volume.name, phase, status = %outcome.status, stdout = %outcome.stdout.trim(), stderr = %outcome.stderr.trim(), "hook finished");
    if !outcome.status.success() {
        return Err(Error::failed(outcome.describe(&what)));
    }
    Ok(())
}

/// The `hook_finished` record of a hook or dump command (`None`: it could
/// not be started or its output not be kept).
async fn finished(
    audit: &Arc<AuditLog>,
    volume: &Volume,
    phase: &str,
    argv: &[String],
    snapshot: &str,
    outcome: Option<&hooks::Outcome>,
) -> Result<()> {
    audit
        .record(Event::HookFinished {
            volume: volume.name.clone(),
            phase: phase.into(),
            command: argv.to_vec(),
            snapshot: snapshot.into(),
            status: outcome.map_or("error".into(), |o| o.status.code()),
            millis: outcome.map_or(0, |o| o.elapsed.as_millis() as u64),
        })
        .await?;
    Ok(())
}

/// What every unit of a run shares.
struct UnitRun<'a> {
    targets: &'a [Writable<S3Store>],
    /// What the run may have in flight, shared by every unit.
    budget: &'a Arc<Budget>,
    core: &'a str,
    snapshot: &'a str,
    /// The data keys: each user's, made on first use.
    keys: &'a RunKeys<'a, S3Store>,
    /// The core's own data key (shared and volume units).
    own: &'a KeyRef,
    level: i32,
    options: &'a Options,
    /// The units of the previous committed snapshot (none for a full run).
    previous: &'a HashMap<(&'a str, &'a units::UnitKind), &'a UnitRecord>,
    /// Object keys referenced by a committed snapshot on every target.
    reusable: &'a HashSet<String>,
    /// The core's key objects on every target.
    present_keys: &'a HashSet<u128>,
    /// How each volume's SQLite databases are captured (none: as files).
    databases: &'a HashMap<String, Option<archive::Databases>>,
    audit: &'a Arc<AuditLog>,
    /// Where a dump is spooled (encrypted).
    state_dir: &'a std::path::Path,
    /// Where small units go.
    packer: &'a Packer<'a, S3Store>,
}

/// A unit in the new snapshot.
struct Stored {
    record: UnitRecord,
    stats: archive::WriteStats,
    /// Unchanged: the object of an earlier snapshot is referenced again.
    reused: bool,
}

/// Where a unit comes from.
enum Origin {
    /// Found by the scan, with its fingerprint.
    Walk(crate::hash::Blake3),
    /// A command volume's command.
    Dump(Box<Dump>),
}

/// A unit waiting for its turn: the unit, its volume's excludes, where it
/// comes from.
type Pending = (Unit, Arc<globset::GlobSet>, Origin);

/// One unit: referenced again when its fingerprint is unchanged and its
/// object is still committed on every target, else uploaded. The
/// fingerprint was taken by the scan, before the tar, so a change during
/// the run makes the next run upload the unit again, never miss it.
async fn store_unit(
    run: &UnitRun<'_>,
    unit: Unit,
    exclude: Arc<globset::GlobSet>,
    origin: Origin,
) -> Result<Stored> {
    let fingerprint = match origin {
        // A dump has no fingerprint: it is uploaded on every run.
        Origin::Dump(dump) => {
            let (record, stats) = store_dump(run, unit, &dump).await?;
            return Ok(Stored {
                record,
                stats,
                reused: false,
            });
        }
        Origin::Walk(fingerprint) => fingerprint,
    };
    if let Some(previous) = run.previous.get(&(&*unit.volume, &unit.kind))
        && previous.fingerprint == Some(fingerprint)
        && run.reusable.contains(&*previous.object)
        // an object encrypted to a data key that is still on every target:
        // one from before data keys (encrypted to the zone) is uploaded
        // again once, so that erasing its user can shred it
        && previous
            .data_key
            .as_ref()
            .and_then(|k| layout::data_key_id(k))
            .is_some_and(|id| run.present_keys.contains(&id))
    {
        return Ok(Stored {
            record: reused(previous, unit),
            stats: archive::WriteStats::default(),
            reused: true,
        });
    }
    let (mut record, stats) = backup_unit(run, unit, Source::Walk(exclude)).await?;
    // A unit that lost an entry to a change during the walk is uploaded
    // again by the next run, whatever its fingerprint then.
    if stats.changed_during_walk.is_empty() {
        record.fingerprint = Some(fingerprint);
    }
    Ok(Stored {
        record,
        stats,
        reused: false,
    })
}

/// The record of an unchanged unit: the previous one, with the names taken
/// from the scan's unit (equal to the previous ones: the fingerprint covers
/// them) rather than copied, so 100,000 reused records do not hold their
/// strings twice while the previous snapshot's are held too.
fn reused(previous: &UnitRecord, unit: Unit) -> UnitRecord {
    let Unit { kind, dirs, .. } = unit;
    UnitRecord {
        volume: previous.volume.clone(),
        kind,
        object: previous.object.clone(),
        offset: previous.offset,
        object_size: previous.object_size,
        plain_size: previous.plain_size,
        stored_size: previous.stored_size,
        blake3: previous.blake3,
        files: previous.files,
        fingerprint: previous.fingerprint,
        data_key: previous.data_key.clone(),
        // an older record may name no directories: it stays as it was
        dirs: if dirs == previous.dirs {
            dirs
        } else {
            previous.dirs.clone()
        },
    }
}

/// The unit of a command volume: the command runs to its end, its stdout
/// spooled encrypted ([`dump`]); only then, if it exited with status 0, is
/// the unit's tar (one file) uploaded. A failed command uploads nothing.
async fn store_dump(
    run: &UnitRun<'_>,
    unit: Unit,
    dump: &Dump,
) -> Result<(UnitRecord, archive::WriteStats)> {
    let volume = Volume {
        name: unit.volume.to_string(),
        path: unit.root.to_path_buf(),
        layout: crate::config::Layout::Plain,
        exclude: globset::GlobSet::empty(),
        exclude_patterns: Vec::new(),
        sqlite: Default::default(),
        sqlite_busy_timeout: crate::config::DEFAULT_SQLITE_BUSY_TIMEOUT,
        dump: Some(dump.clone()),
        hooks: Default::default(),
    };
    let argv = &dump.command;
    run.audit
        .record(Event::HookStarted {
            volume: unit.volume.to_string(),
            phase: "command".into(),
            command: argv.clone(),
            snapshot: run.snapshot.into(),
        })
        .await?;
    tracing::info!(volume = %unit.volume, command = ?argv, "running the dump command");
    let (owned, env, timeout, state_dir, stop) = (
        argv.clone(),
        hook_env(&volume, "command", run.snapshot),
        dump.timeout,
        run.state_dir.to_path_buf(),
        run.options.cancel.clone(),
    );
    let ran = crate::blocking::run("a dump command", move || {
        crate::dump::spool(
            &state_dir,
            &hooks::Spec {
                argv: &owned,
                env,
                timeout,
                stop: Some(stop),
            },
        )
    })
    .await?;
    let what = format!("the command of volume {} ({argv:?})", unit.volume);
    let outcome = ran.as_ref().ok().map(|(_, o)| o);
    finished(run.audit, &volume, "command", argv, run.snapshot, outcome).await?;
    let (spool, outcome) = ran.map_err(|e| Error::Failed(e.context(what.clone())))?;
    let Some(spool) = spool else {
        return Err(Error::failed(outcome.describe(&what)));
    };
    tracing::info!(volume = %unit.volume, bytes = spool.size, seconds = outcome.elapsed.as_secs_f64(), "dump spooled");
    tokio::select! {
        r = backup_unit(run, unit, Source::Dump(spool, dump.file.clone())) => r,
        () = run.options.cancel.cancelled() => Err(stopped()),
    }
}

/// What a unit's tar is made of.
enum Source {
    /// The files of the unit, read through the walk.
    Walk(Arc<globset::GlobSet>),
    /// A command volume's spooled stdout, as the file of that name.
    Dump(crate::dump::Spool, String),
}

/// One unit: tar → zstd → age → parts on a blocking thread, parts uploaded
/// to every target as they come.
async fn backup_unit(
    run: &UnitRun<'_>,
    unit: Unit,
    source: Source,
) -> Result<(UnitRecord, archive::WriteStats)> {
    let data_key = match &unit.kind {
        units::UnitKind::User(id) => run.keys.user(id).await?,
        _ => run.own.clone(),
    };
    let key = layout::new_object_key(run.core);
    let (tx, rx) = mpsc::channel::<Part>(1);
    let sink = PartSink::new(tx, run.options.part_size, Arc::clone(run.budget));
    let budget = Arc::clone(run.budget);
    let (recipients, level) = (vec![data_key.recipient.clone()], run.level);
    let label = unit.label();
    let producer_unit = unit.clone();
    let databases = run.databases.get(&*unit.volume).cloned().flatten();
    let producer = crate::blocking::spawn(move || {
        // the CPU stages run on two threads per CPU at most (see budget)
        let _cpu = budget.cpu_blocking();
        pipeline::seal(&recipients, level, sink, |w| {
            let (_, stats) = match source {
                Source::Walk(exclude) => {
                    archive::write_unit(&producer_unit, &exclude, databases.as_ref(), w)?
                }
                Source::Dump(spool, file) => {
                    let size = spool.size;
                    archive::write_file(std::path::Path::new(&file), size, spool.reader()?, w)?
                }
            };
            Ok(stats)
        })
    });
    let users = unit.kind.users();
    let contents = Contents {
        kind: ObjectKind::Unit,
        snapshot: Some(run.snapshot),
        users: &users,
        ranges: &[],
        packed: 0,
    };
    let uploaded = store_object(run, &key, rx, &contents).await;
    let sealed = producer
        .await
        .map_err(|e| Error::failed(format!("{label}: {e}")))?;
    // The producer's error is the cause when it failed first (the upload then
    // only saw the channel close); otherwise the upload's error is.
    let sealed = match (sealed, uploaded) {
        // The producer saw the upload stop: the upload's error is the cause.
        (Err(p), Err(u)) if is_broken_pipe(&p) => {
            return Err(Error::Failed(u.context(format!("backing up {label}"))));
        }
        (Err(e), _) => return Err(Error::Failed(e.context(format!("backing up {label}")))),
        (Ok(_), Err(e)) => return Err(Error::Failed(e.context(format!("backing up {label}")))),
        (Ok(s), Ok(placed)) => (s, placed),
    };
    let (sealed, placed) = sealed;
    let (key, offset) = match placed {
        Some(p) => (p.key, Some(p.offset)),
        None => (key, None),
    };
    tracing::debug!(unit = %label, %key, ?offset, plain = sealed.plain_size, stored = sealed.stored_size, "unit stored");
    let Unit {
        volume, kind, dirs, ..
    } = unit;
    let record = UnitRecord {
        volume,
        kind,
        object: key.shared(),
        offset,
        // set once the pack is written (`Packer::finish`)
        object_size: None,
        plain_size: sealed.plain_size,
        stored_size: sealed.stored_size,
        blake3: sealed.blake3,
        files: sealed.extra.files,
        fingerprint: None,
        dirs,
        data_key: Some(data_key.object),
    };
    Ok((record, sealed.extra))
}

/// Stores a unit's object: appended to the run's pack when it is small
/// (returns where), else written as its own object under `key`.
async fn store_object(
    run: &UnitRun<'_>,
    key: &Key,
    mut parts: mpsc::Receiver<Part>,
    contents: &Contents<'_>,
) -> anyhow::Result<Option<Placement>> {
    match upload::head(&mut parts, key).await? {
        Head::Whole(body, held, _) if run.packer.takes(body.len()) => {
            Ok(Some(run.packer.add(body, held, contents.users).await?))
        }
        head => {
            let (jobs, budget) = (run.options.part_jobs, run.budget);
            upload::upload_head(run.targets, key, head, parts, jobs, contents, budget).await?;
            Ok(None)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
