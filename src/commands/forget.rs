//! `zonevault forget`: applies the zone's retention to a core's snapshots.
//!
//! Order of deletions, on every target: the cleartext index of each
//! snapshot no longer kept (from then on the snapshot does not exist), its
//! manifest, then every object that no remaining snapshot references —
//! references counted across incremental snapshots, which share objects.
//! Each deletion is in the audit log. A crash in the middle leaves
//! snapshots that either exist whole or not at all; what a crashed run left
//! unreferenced is removed by the next `forget` or `backup` of the core.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::audit::{AuditLog, Event};
use crate::config::Config;
use crate::error::Result;
use crate::layout;
use crate::residency::Writable;
use crate::retention::{self, Decision};
use crate::snapshot::Index;
use crate::storage::s3::S3Store;

use super::backup::clean_uncommitted;
use super::session::Session;
use super::snapshots;

/// What to forget.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Print the plan; change nothing.
    pub dry_run: bool,
    /// Another core of the same zone.
    pub core: Option<String>,
}

/// What `forget` decided and did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub core: String,
    pub zone: String,
    pub dry_run: bool,
    /// The timezone periods were taken in.
    pub timezone: String,
    /// Every snapshot, newest first: kept (and by which rules) or removed (and why).
    pub snapshots: Vec<Decision>,
    pub kept: usize,
    pub forgotten: usize,
    /// Objects and manifests deleted, summed over targets.
    pub deleted: usize,
    /// Rules that `max_age` makes impossible to honour.
    pub warnings: Vec<String>,
}

/// The plan for `core`'s snapshots, from the indexes of the first target
/// that answers. Reads only.
pub async fn plan(config: &Config, options: &Options) -> Result<Report> {
    let core = snapshots::resolve_core(config, options.core.as_deref())?;
    let (indexes, ..) = snapshots::list(config, &core).await?;
    let times: Vec<(String, DateTime<Utc>)> =
        indexes.iter().map(|i| (i.id.clone(), i.time)).collect();
    Ok(report(config, &core, &times, true, 0))
}

fn report(
    config: &Config,
    core: &str,
    times: &[(String, DateTime<Utc>)],
    dry_run: bool,
    deleted: usize,
) -> Report {
    let zone = config.zone();
    let tz = retention::timezone(zone);
    let snapshots = retention::plan(times, &zone.retention, tz, Utc::now());
    let kept = snapshots.iter().filter(|d| d.keep).count();
    Report {
        core: core.to_string(),
        zone: zone.id.clone(),
        dry_run,
        timezone: tz.name().to_string(),
        kept,
        forgotten: snapshots.len() - kept,
        snapshots,
        deleted,
        warnings: retention::never_honoured(&zone.retention),
    }
}

/// Applies the retention to `core`'s snapshots on every target of the zone.
pub async fn run(config: &Config, audit: &Arc<AuditLog>, options: &Options) -> Result<Report> {
    let core = snapshots::resolve_core(config, options.core.as_deref())
        .inspect_err(|e| audit.run_failed("forget", e))?;
    let session = Session::begin(config, audit, "forget").await?;
    let result = forget(config, session.targets(), &core).await;
    session.finish(result).await
}

async fn forget(config: &Config, targets: &[Writable<S3Store>], core: &str) -> Result<Report> {
    // Every target's indexes: a crashed run may have left a snapshot on
    // some targets only; the plan covers the union.
    let mut on_target: Vec<Vec<Index>> = Vec::new();
    let mut times: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
    for t in targets {
        let indexes = snapshots::indexes(t.store(), t.target(), core)
            .await
            .with_context(|| format!("listing the snapshots on target {}", t.target().name))?;
        times.extend(indexes.iter().map(|i| (i.id.clone(), i.time)));
        on_target.push(indexes);
    }
    let times: Vec<(String, DateTime<Utc>)> = times.into_iter().collect();
    let mut report = report(config, core, &times, false, 0);
    let removed: BTreeMap<&str, String> = report
        .snapshots
        .iter()
        .filter(|d| !d.keep)
        .map(|d| (d.id.as_str(), d.reasons.join(", ")))
        .collect();

    let mut deleted = 0;
    for (t, indexes) in targets.iter().zip(&on_target) {
        // 1. the indexes, then the manifests, of the snapshots not kept
        for index in indexes {
            let Some(reason) = removed.get(index.id.as_str()) else {
                continue;
            };
            let why = format!("snapshot {} forgotten: {reason}", index.id);
            t.delete(&t.key(&layout::index_key(core, &index.id)), &why)
                .await?;
            t.audit()
                .record(Event::SnapshotForgotten {
                    place: t.place(),
                    snapshot: index.id.clone(),
                    reason: reason.clone(),
                })
                .await?;
            t.delete(&t.key(&index.manifest.key), &why).await?;
            deleted += 1;
        }
        // 2. the objects that no remaining snapshot references
        let forgotten = |i: &Index| removed.contains_key(i.id.as_str());
        for key in unreferenced(indexes, forgotten) {
            t.delete(&t.key(key), "no kept snapshot references it")
                .await?;
            deleted += 1;
        }
        // 3. on this core's own targets, what earlier crashed runs left
        if core == config.core.core_id {
            let (swept, _) = clean_uncommitted(t, core)
                .await
                .with_context(|| format!("cleaning up target {}", t.target().name))?;
            deleted += swept;
        }
    }
    report.deleted = deleted;
    Ok(report)
}

/// The unit objects of the forgotten snapshots that no other snapshot in
/// `indexes` references: what may be deleted. Incremental snapshots share
/// objects, so an object goes only when its last reference goes.
pub fn unreferenced(indexes: &[Index], forgotten: impl Fn(&Index) -> bool) -> Vec<&str> {
    let kept: HashSet<&str> = indexes
        .iter()
        .filter(|i| !forgotten(i))
        .flat_map(Index::references)
        .collect();
    let mut gone: Vec<&str> = indexes
        .iter()
        .filter(|i| forgotten(i))
        .flat_map(|i| i.objects.iter().map(|o| o.key.as_str()))
        .filter(|k| !kept.contains(k))
        .collect();
    gone.sort_unstable();
    gone.dedup();
    gone
}
