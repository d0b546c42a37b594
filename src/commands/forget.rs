//! `zonevault forget`: applies the zone's retention to a core's snapshots.
//!
//! Order of deletions, on every target: the cleartext index of each
//! snapshot no longer kept (from then on the snapshot does not exist), its
//! manifest, then every object that no remaining snapshot references —
//! references counted across incremental snapshots, which share objects —
//! by the same sweep that removes what unfinished backups left.
//! Each deletion is in the audit log. A crash in the middle leaves
//! snapshots that either exist whole or not at all; what a crashed run left
//! unreferenced is removed by the next `forget` or `backup` of the core.
//!
//! With `--core`, another core's snapshots are forgotten (indexes and
//! manifests) but its objects are left to that core's own next run: only
//! the owner, under its run lock, knows which objects a backup in progress
//! is about to reference again.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditLog, Event};
use crate::config::{Config, Target};
use crate::error::{Error, Result};
use crate::repository::layout;
use crate::repository::snapshot::{self, Index};
use crate::residency::Writable;
use crate::retention::{self, Decision};
use crate::storage::{ReadBackend, WriteBackend, s3::S3Store};

use super::session::Session;
use super::snapshots;
use crate::repository::sweep;

/// What to forget.
#[derive(Debug, Clone)]
pub struct Options {
    /// Print the plan; change nothing.
    pub dry_run: bool,
    /// Another core of the same zone.
    pub core: Option<String>,
    /// Wait for another run of this core to end (else fail as busy).
    pub wait: bool,
    /// Cancelled: stop before the next snapshot's deletion (the daemon's
    /// SIGTERM). What is left is consistent: every snapshot is whole or
    /// gone, and the next run deletes what is then unreferenced.
    pub cancel: CancellationToken,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            dry_run: false,
            core: None,
            wait: true,
            cancel: CancellationToken::new(),
        }
    }
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
    /// Objects deleted (indexes, manifests, unit objects), summed over targets.
    pub deleted: usize,
    /// Rules that `max_age` makes impossible to honour.
    pub warnings: Vec<String>,
}

/// The plan for `core`'s snapshots, from the indexes of every target of
/// the zone, as `forget` would make it. Reads only.
pub async fn plan(config: &Config, options: &Options) -> Result<Report> {
    let core = snapshots::resolve_core(config, options.core.as_deref())?;
    let stores = crate::targets::open(config).await;
    let sources: Vec<(&Target, &S3Store)> = stores.iter().map(|(t, s)| (t, s)).collect();
    let on_target = gather(&sources, &core).await?;
    Ok(report(config, &core, &on_target, true, 0))
}

/// Every target's indexes of `core`.
async fn gather<S: ReadBackend>(sources: &[(&Target, &S)], core: &str) -> Result<Vec<Vec<Index>>> {
    let mut on_target = Vec::new();
    for (target, store) in sources {
        let indexes = crate::repository::indexes(*store, target, core)
            .await
            .with_context(|| format!("listing the snapshots on target {}", target.name))?;
        on_target.push(indexes);
    }
    Ok(on_target)
}

fn times(indexes: &[Index]) -> Vec<(String, DateTime<Utc>)> {
    indexes.iter().map(|i| (i.id.clone(), i.time)).collect()
}

/// The report: the plan over the snapshots of all targets together.
fn report(
    config: &Config,
    core: &str,
    on_target: &[Vec<Index>],
    dry_run: bool,
    deleted: usize,
) -> Report {
    let zone = config.zone();
    let tz = retention::timezone(zone);
    let union: BTreeMap<String, DateTime<Utc>> = on_target.iter().flat_map(|i| times(i)).collect();
    let union: Vec<(String, DateTime<Utc>)> = union.into_iter().collect();
    let snapshots = retention::plan(&union, &zone.retention, tz, Utc::now());
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
    let core = audit
        .failing(
            "forget",
            snapshots::resolve_core(config, options.core.as_deref()),
        )
        .await?;
    let session = Session::begin(config, audit, "forget", options.wait, &options.cancel).await?;
    let result = forget(config, session.targets(), &core, &options.cancel).await;
    session.finish(result).await
}

async fn forget<S: WriteBackend>(
    config: &Config,
    targets: &[Writable<S>],
    core: &str,
    cancel: &CancellationToken,
) -> Result<Report> {
    let stopped = || {
        Error::failed(
            "forget stopped (the daemon is shutting down): the snapshots already forgotten are gone, the others whole; the next run goes on",
        )
    };
    let sources: Vec<(&Target, &S)> = targets.iter().map(|t| (t.target(), t.store())).collect();
    let on_target = gather(&sources, core).await?;
    let zone = config.zone();
    let tz = retention::timezone(zone);
    let now = Utc::now();
    // Objects are deleted only by the core that owns them, under its run
    // lock: another core's backup may be about to reference them again.
    // `--core` forgets that core's snapshots; its own next run sweeps.
    let own = core == config.core.core_id;

    let mut deleted = 0;
    for (t, indexes) in targets.iter().zip(&on_target) {
        // Each target by its own snapshots: a target that missed a commit
        // still keeps its own newest.
        let removed: BTreeMap<String, String> =
            retention::plan(&times(indexes), &zone.retention, tz, now)
                .into_iter()
                .filter(|d| !d.keep)
                .map(|d| (d.id, d.reasons.join(", ")))
                .collect();
        // 1. the indexes, then the manifests, of the snapshots not kept
        for index in indexes {
            let Some(reason) = removed.get(&index.id) else {
                continue;
            };
            if cancel.is_cancelled() {
                return Err(stopped());
            }
            let why = format!("snapshot {} forgotten: {reason}", index.id);
            t.delete(&layout::index_key(core, &index.id), &why).await?;
            t.audit()
                .record(Event::SnapshotForgotten {
                    place: t.place(),
                    snapshot: index.id.clone(),
                    reason: reason.clone(),
                })
                .await?;
            // the manifest of this id, whatever the (cleartext) index says:
            // a damaged index must not make forget delete another object
            let manifest = layout::manifest_key(core, &index.id);
            if index.manifest.key != manifest.as_str() {
                tracing::warn!(target = %t.target().name, snapshot = %index.id, named = %index.manifest.key, "the index names another manifest key; deleting {manifest} only (the sweep takes what no snapshot references)");
            }
            t.delete(&manifest, &why).await?;
            deleted += 2;
        }
        if !own {
            continue;
        }
        // 2. the objects that no kept snapshot references (counted across
        // incremental snapshots, which share objects), with what crashed
        // runs left. The indexes read above are all there are: this core's
        // run lock keeps any other writer away.
        if cancel.is_cancelled() {
            return Err(stopped());
        }
        let kept = snapshot::references(indexes.iter().filter(|i| !removed.contains_key(&i.id)));
        deleted += sweep(t, core, &kept, "no kept snapshot references it")
            .await
            .with_context(|| {
                format!(
                    "deleting unreferenced objects on target {}",
                    t.target().name
                )
            })?;
    }
    Ok(report(config, core, &on_target, false, deleted))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::Buckets;
    use crate::testing;

    const CORE: &str = "core-ch-1";

    /// Three snapshots on every target, each with its manifest and object.
    async fn three_snapshots(targets: &[Writable<crate::storage::memory::Memory>]) -> Vec<String> {
        let mut ids = Vec::new();
        for i in 1..=3 {
            let id = format!("20261201T00000{i}Z-00a{i}");
            let object = format!("{CORE}/objects/{i}.tar.zst.age");
            let index = Index {
                format: layout::FORMAT,
                id: id.clone(),
                time: format!("2026-12-01T00:00:0{i}Z").parse().unwrap(),
                core: CORE.into(),
                zone: "ch".into(),
                tool_version: "test".into(),
                manifest: snapshot::IndexObject {
                    key: layout::manifest_key(CORE, &id).to_string(),
                    size: 1,
                    data_key: None,
                },
                objects: vec![snapshot::IndexObject {
                    key: object.clone(),
                    size: 1,
                    data_key: None,
                }],
                units: 1,
                plain_bytes: 1,
                stored_bytes: 1,
            };
            for t in targets {
                let s = t.store();
                s.insert(
                    &t.key(&layout::index_key(CORE, &id)),
                    &serde_json::to_vec(&index).unwrap(),
                );
                s.insert(&t.key(&layout::manifest_key(CORE, &id)), b"m");
                s.insert(&t.key(&object), b"o");
            }
            ids.push(id);
        }
        ids
    }

    #[tokio::test]
    async fn forget_keeps_the_policy_and_a_stop_deletes_nothing_more() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = testing::config(dir.path());
        let zone = config.zone().id.clone();
        config.map.zones.get_mut(&zone).unwrap().retention.keep_last = Some(1);
        let audit = testing::audit(&config);
        let targets = testing::writers(&config, &audit, &Buckets::default()).await;
        three_snapshots(&targets).await;
        let before: Vec<usize> = targets.iter().map(|t| t.store().keys().len()).collect();

        // stopped before it starts deleting: nothing goes
        let cancel = CancellationToken::new();
        cancel.cancel();
        let e = forget(&config, &targets, CORE, &cancel).await.unwrap_err();
        assert!(e.to_string().contains("forget stopped"), "{e}");
        let after: Vec<usize> = targets.iter().map(|t| t.store().keys().len()).collect();
        assert_eq!(before, after);

        // not stopped: the two older snapshots and their objects go
        let report = forget(&config, &targets, CORE, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!((report.kept, report.forgotten), (1, 2));
        for t in &targets {
            let keys = t.store().keys();
            assert_eq!(keys.len(), 3, "{}: {keys:?}", t.target().name);
            assert!(keys.iter().any(|k| k.ends_with("/objects/3.tar.zst.age")));
        }
    }
}
