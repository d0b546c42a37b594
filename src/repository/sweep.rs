//! What no committed snapshot references, removed: unfinished multipart
//! uploads, objects and manifests left by runs that never committed, or
//! that retention made unreferenced; and the intents of earlier writes and
//! deletions that have no outcome on record. Only the core that owns a
//! target's objects sweeps them, under its run lock.

use std::collections::HashSet;

use anyhow::Context;

use crate::audit::Event;
use crate::repository::layout;
use crate::residency::Writable;
use crate::storage::WriteBackend;

/// Aborts every unfinished multipart upload of `core` on a target.
pub async fn abort_uploads<S: WriteBackend>(
    target: &Writable<S>,
    core: &str,
    reason: &str,
) -> anyhow::Result<usize> {
    let uploads = target
        .store()
        .list_uploads(&target.key(&layout::objects_dir(core)))
        .await?;
    // Every upload is aborted even when one abort (or its record) fails:
    // what is left is the next run's to remove.
    let mut first_error = None;
    for upload in &uploads {
        // a listing under the prefix names keys under it
        let Some(rel) = target.relative(&upload.key) else {
            continue;
        };
        if let Err(e) = target.abort_upload(&rel, &upload.upload_id, reason).await {
            first_error.get_or_insert(e);
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok(uploads.len())
}

/// Every unit object of `core` on a target. Object names start with a
/// random hex digit ([`layout::new_object_key`]), so the listing runs as
/// sixteen listings at once, one per first digit: a listing answers 1,000
/// keys a round trip, and 100,000 units one after the other took seconds
/// (far more on a distant store). A key there that zonevault did not name
/// is not listed, and so never deleted.
async fn list_objects<S: WriteBackend>(
    target: &Writable<S>,
    core: &str,
) -> anyhow::Result<Vec<crate::storage::ObjectInfo>> {
    let dir = target.key(&layout::objects_dir(core));
    let shards = (0..16u8).map(|digit| {
        let prefix = format!("{dir}{digit:x}");
        async move { target.store().list(&prefix).await }
    });
    let mut objects = Vec::new();
    for shard in futures::future::join_all(shards).await {
        objects.extend(shard?);
    }
    Ok(objects)
}

/// Removes what runs that never committed left on a target: unfinished
/// multipart uploads, objects and manifests that no index references.
/// Never touches anything a committed snapshot references. Returns how many
/// it removed and the object keys (relative) that committed indexes reference.
pub async fn clean_uncommitted<S: WriteBackend>(
    target: &Writable<S>,
    core: &str,
) -> anyhow::Result<(usize, HashSet<String>)> {
    let referenced = super::references(target.store(), target.target(), core)
        .await
        .context("listing the committed snapshots")?;
    let removed = sweep(
        target,
        core,
        &referenced,
        "no committed snapshot references it (left by an unfinished run)",
    )
    .await?;
    Ok((removed, referenced))
}

/// Deletes, on one target, every unfinished upload of `core` and every
/// object and manifest of `core` that `referenced` (keys relative to the
/// target prefix) does not hold, recording `reason`. Only for this core's
/// own targets under its run lock: nothing else may be writing there.
pub async fn sweep<S: WriteBackend>(
    target: &Writable<S>,
    core: &str,
    referenced: &HashSet<String>,
    reason: &str,
) -> anyhow::Result<usize> {
    let store = target.store();
    let mut removed = abort_uploads(target, core, reason).await?;
    let listed = store
        .list(&target.key(&layout::snapshots_dir(core)))
        .await?;
    // An index that could not be read (damaged, or of a newer format) was
    // skipped by the listing, so `referenced` lacks what it needs: sweep
    // nothing until an operator repairs or removes it.
    let unreadable: Vec<layout::Key> = listed
        .iter()
        .filter_map(|f| target.relative(&f.key))
        .filter(|rel| {
            layout::snapshot_of_index(rel).is_some_and(|id| {
                layout::is_snapshot_id(id)
                    && !referenced.contains(layout::manifest_key(core, id).as_str())
            })
        })
        .collect();
    if !unreadable.is_empty() {
        let unreadable: Vec<&str> = unreadable.iter().map(|k| k.as_str()).collect();
        tracing::warn!(target = %target.target().name, "not deleting unreferenced objects: {} cannot be read as snapshot indexes, and the objects they reference are unknown; repair or remove them (see `zonevault snapshots`)", unreadable.join(", "));
        return Ok(removed);
    }
    let objects = list_objects(target, core).await?;
    // every key on the target under this core's dirs, before any deletion
    let present: HashSet<String> = listed
        .iter()
        .chain(&objects)
        .map(|f| f.key.clone())
        .collect();
    let manifests: Vec<_> = listed
        .into_iter()
        .filter(|f| f.key.ends_with(".manifest.age") || f.key.ends_with(crate::signing::SUFFIX))
        .collect();
    for f in objects.iter().chain(&manifests) {
        let Some(rel) = target.relative(&f.key) else {
            continue;
        };
        if !referenced.contains(rel.as_str()) {
            tracing::debug!(target = %target.target().name, key = %f.key, reason, "deleting");
            target.delete(&rel, reason).await?;
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(target = %target.target().name, removed, reason, "deleted unreferenced objects");
    }
    // Writes and deletions of earlier runs that have no outcome on record
    // and left nothing (a crash before the object landed, a deletion whose
    // record failed): end their intents, so `audit where` stops counting
    // them. Present ones were deleted above when unreferenced.
    // (every unfinished upload was aborted above, on record, and none can
    // start meanwhile under the run lock: no need to list them again)
    let audit = target.audit();
    let path = audit.path().to_path_buf();
    let name = target.target().name.clone();
    let open = crate::blocking::run("reading the audit log", move || {
        crate::audit::query::open_intents(&path, &name)
    })
    .await??;
    let ours = [
        target.key(&layout::objects_dir(core)),
        target.key(&layout::snapshots_dir(core)),
    ];
    for key in open {
        if ours.iter().any(|dir| key.starts_with(dir.as_str())) && !present.contains(&key) {
            audit
                .record(Event::ObjectAbsent {
                    place: target.place(),
                    key,
                    reason: "its write or deletion has no outcome on record, and the target holds no object under its key".into(),
                })
                .await?;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::ObjectKind;
    use crate::residency::Contents;
    use crate::testing;

    const CORE: &str = "core-ch-1";
    const ID: &str = "20261201T023000Z-00aa";

    fn rel(key: &str) -> String {
        format!("{CORE}/{key}")
    }

    #[tokio::test]
    async fn the_sweep_deletes_only_what_no_index_references() {
        let w = testing::World::new().await;
        let t = &w.targets[0];
        let store = t.store();
        let keep = [
            rel("objects/kept.tar.zst.age"),
            layout::manifest_key(CORE, ID).to_string(),
            layout::signature_key(&layout::manifest_key(CORE, ID)).to_string(),
        ];
        let orphans = [
            rel("objects/0a0f.tar.zst.age"),
            layout::manifest_key(CORE, "20261201T000000Z-00bb").to_string(),
            rel("snapshots/20261201T000000Z-00bb.manifest.age.minisig"),
        ];
        for k in keep.iter().chain(&orphans) {
            store.insert(&t.key(k), b"x");
        }
        // another core's object, and something outside the prefix
        store.insert(&t.key("core-ch-2/objects/theirs.tar.zst.age"), b"x");
        // a key that zonevault did not name (object names start with a hex
        // digit): never listed, so never deleted
        store.insert(&t.key(&rel("objects/not-ours.bin")), b"x");
        store.insert("outside/core-ch-1/objects/o.tar.zst.age", b"x");
        let id = t
            .create_upload(
                &layout::new_object_key(CORE),
                &Contents::of(ObjectKind::Unit),
            )
            .await
            .unwrap();
        assert!(!id.is_empty());
        let referenced: HashSet<String> = keep.iter().cloned().collect();
        // open intents of an earlier run: a deletion whose outcome was not
        // recorded (the object is gone), and the write of an index that is
        // there (a crash before its object_put)
        let gone = t.key(&rel("objects/gone.tar.zst.age"));
        let index = t.key(&layout::index_key(CORE, ID));
        store.insert(&index, b"{}");
        w.audit
            .record(Event::DeleteStarted {
                place: t.place(),
                key: gone.clone(),
                reason: "earlier".into(),
            })
            .await
            .unwrap();
        w.audit
            .record(Event::UploadStarted {
                place: t.place(),
                key: index.clone(),
                kind: ObjectKind::Index,
                multipart: false,
                snapshot: None,
                users: vec![],
            })
            .await
            .unwrap();
        let removed = sweep(t, CORE, &referenced, "test sweep").await.unwrap();
        assert_eq!(removed, orphans.len() + 1, "three objects and one upload");
        let left = store.keys();
        for k in &keep {
            assert!(left.contains(&t.key(k)), "{k} was deleted");
        }
        for k in &orphans {
            assert!(!left.contains(&t.key(k)), "{k} was kept");
        }
        assert!(left.contains(&t.key("core-ch-2/objects/theirs.tar.zst.age")));
        assert!(left.contains(&"outside/core-ch-1/objects/o.tar.zst.age".to_string()));
        assert!(left.contains(&t.key(&rel("objects/not-ours.bin"))));
        assert_eq!(store.pending_uploads(), 0);
        let events = testing::events(&w.audit);
        assert_eq!(events.iter().filter(|e| *e == "object_deleted").count(), 3);
        assert_eq!(events.iter().filter(|e| *e == "upload_aborted").count(), 1);
        let open = crate::audit::query::open_intents(w.audit.path(), &t.target().name).unwrap();
        assert!(!open.contains(&gone), "the unconfirmed deletion is settled");
        assert!(
            open.contains(&index),
            "an index that is there is not called absent"
        );
    }

    #[tokio::test]
    async fn an_unreadable_index_stops_the_sweep() {
        let w = testing::World::new().await;
        let t = &w.targets[0];
        let orphan = rel("objects/0b0b.tar.zst.age");
        t.store().insert(&t.key(&orphan), b"x");
        // id-shaped, but not an index: what it references is unknown
        t.store().insert(
            &t.key(&layout::index_key(CORE, "20261201T000000Z-00cc")),
            b"{damaged",
        );
        let removed = sweep(t, CORE, &HashSet::new(), "test").await.unwrap();
        assert_eq!(removed, 0);
        assert!(t.store().keys().contains(&t.key(&orphan)));
    }
}
