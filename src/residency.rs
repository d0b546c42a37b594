//! The residency gate: the only way to get a handle that can write to a target.
//!
//! [`verify`] checks, in this process and against the server itself, that a
//! target may hold this core's backups:
//!
//! 1. the target belongs to this core's zone;
//! 2. its configured `region` is one of the zone's `regions`;
//! 3. the region the server reports for the bucket (GetBucketLocation, or the
//!    region a server names when it refuses a request signed for another
//!    region) equals the configured `region`;
//! 4. the marker `zonevault.json` is absent or names this zone.
//!
//! Only a target that passes becomes a [`Writable`]. Writing to storage needs
//! a [`WritePermit`]; its only constructor is private to this module and the
//! permit never leaves the `Writable` that holds it. So no code path can write
//! to a target that has not passed the check: the compiler enforces it.
//! [`verify`] opens the client it checks and then writes through itself,
//! from the [`Target`] ([`Connect`]), so a `Writable` cannot pair one
//! target's record with another bucket; and its writes take [`Key`]s
//! relative to the target's prefix, so they stay under it.
//!
//! Neither a permit nor a writer can be made anywhere else:
//!
//! ```compile_fail
//! # async fn forge(store: zonevault::storage::s3::S3Store) {
//! use zonevault::storage::WriteBackend;
//! let permit = zonevault::residency::WritePermit(()); // private field
//! store.delete(&permit, "zv/core/objects/x").await.unwrap();
//! # }
//! ```
//!
//! ```compile_fail
//! # fn forge(
//! #     target: zonevault::config::Target,
//! #     store: zonevault::storage::s3::S3Store,
//! #     audit: std::sync::Arc<zonevault::audit::AuditLog>,
//! #     permit: zonevault::residency::WritePermit,
//! # ) {
//! let writer = zonevault::residency::Writable {
//!     target,
//!     store,
//!     reported_region: "ch-gva-2".into(),
//!     marker_present: true,
//!     audit,
//!     permit,
//! }; // private fields
//! # }
//! ```
//!
//! The gate is also where the audit log learns of every verdict and of every
//! object written or deleted, ahead of the fact: a `Writable` records the
//! start of each write before it starts (`upload_started`: nothing reaches a
//! target that the log does not know is coming) and of each deletion before
//! it is asked for (`delete_started`); then the outcome (`object_put`,
//! `object_absent`, `upload_aborted`, `object_deleted`). `audit where` counts
//! an object from its intent until its deletion or absence is confirmed, so
//! no crash hides a copy. A write whose record cannot be written is deleted
//! again and reported failed.

use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;

use crate::audit::{AuditLog, Event, ObjectKind, Place, UserRange};
use crate::config::{Config, Target};
use crate::pipeline::Digest;
use crate::repository::layout::Key;
use crate::repository::marker::{self, Found, Marker};
use crate::storage::{Connect, StoreError, WriteBackend};

/// What an object holds, for its audit record.
#[derive(Debug, Clone, Copy)]
pub struct Contents<'a> {
    pub kind: ObjectKind,
    /// The snapshot it belongs to.
    pub snapshot: Option<&'a str>,
    /// The users whose data it holds.
    pub users: &'a [String],
    /// In a pack: where each user's unit is.
    pub ranges: &'a [UserRange],
    /// In a pack: how many units it holds that are still readable (user
    /// units and shared ones); 0 for an object that is not a pack.
    pub packed: u64,
}

impl Contents<'_> {
    /// Whether the object holds users' data (a unit or pack of users).
    pub fn holds_user_data(&self) -> bool {
        self.kind == ObjectKind::Unit && !self.users.is_empty()
    }

    /// An object of `kind` that belongs to no snapshot and holds no user's data.
    pub fn of(kind: ObjectKind) -> Contents<'static> {
        Contents {
            kind,
            snapshot: None,
            users: &[],
            ranges: &[],
            packed: 0,
        }
    }
}

/// Proof that the residency check passed. Needed by every write of a
/// [`WriteBackend`]; it cannot be created outside this module, and it never
/// leaves the [`Writable`] that holds it.
#[derive(Debug)]
pub struct WritePermit(());

/// A target that passed the residency check in this process, with its store.
/// The only value through which zonevault writes.
#[derive(Debug)]
pub struct Writable<S> {
    target: Target,
    store: S,
    reported_region: String,
    marker_present: bool,
    audit: Arc<AuditLog>,
    permit: WritePermit,
}

impl<S: WriteBackend> Writable<S> {
    /// The target.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The region the server reported for the bucket.
    pub fn reported_region(&self) -> &str {
        &self.reported_region
    }

    /// Whether the target already carried this zone's marker at the check.
    pub fn marker_present(&self) -> bool {
        self.marker_present
    }

    /// Read access to the store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The full key of `rel` (relative to the target's prefix).
    pub fn key(&self, rel: &str) -> String {
        self.target.key(rel)
    }

    /// The relative key of `full`, as listed on this target; `None` when it
    /// is not under the target's prefix (such a key is never written to).
    pub fn relative(&self, full: &str) -> Option<Key> {
        Key::listed(&self.target, full)
    }

    /// The audit log that this target's writes are recorded in.
    pub fn audit(&self) -> &Arc<AuditLog> {
        &self.audit
    }

    /// Where this target is, for audit records.
    pub fn place(&self) -> Place {
        Place::from(&self.target)
    }

    /// Writes a whole object under the target's prefix (`rel` is relative
    /// to it) and records it.
    pub async fn put(&self, rel: &Key, body: Bytes, contents: &Contents<'_>) -> anyhow::Result<()> {
        let digest = Digest::of(&body);
        self.put_digested(rel, body, contents, &digest).await
    }

    /// [`Writable::put`] of a body whose digest the caller already has.
    /// The start of the write is recorded before it starts, the object once
    /// it is written; a write whose start cannot be recorded never starts.
    pub async fn put_digested(
        &self,
        rel: &Key,
        body: Bytes,
        contents: &Contents<'_>,
        digest: &Digest,
    ) -> anyhow::Result<()> {
        self.record_start(rel, contents, false).await?;
        if let Err(e) = self.store.put(&self.permit, &self.key(rel), body).await {
            return Err(self.write_failed(rel, e).await);
        }
        crate::failpoint::hit("after-object-write", contents.holds_user_data());
        self.record_put(rel, contents, digest).await
    }

    /// Writes a whole object that must not exist yet (a snapshot's index:
    /// a commit never replaces another). Checks first, then writes with a
    /// conditional PUT, so a server that ignores the condition still cannot
    /// make a run overwrite what an earlier run committed.
    pub async fn put_new(
        &self,
        rel: &Key,
        body: Bytes,
        contents: &Contents<'_>,
    ) -> anyhow::Result<()> {
        let key = self.key(rel);
        if self.store.get(&key).await?.is_some() {
            return Err(StoreError::Exists { key }.into());
        }
        let digest = Digest::of(&body);
        self.record_start(rel, contents, false).await?;
        if let Err(e) = self.store.put_new(&self.permit, &key, body).await {
            return Err(self.write_failed(rel, e).await);
        }
        self.record_put(rel, contents, &digest).await
    }

    /// A write of `rel` failed after its start was recorded. When the
    /// target shows no object under the key, that is recorded
    /// (`object_absent`) and ends the intent; otherwise (a write that may
    /// have landed, or a target that does not answer) the intent stays open
    /// and the object counts as present until a cleanup deletes it.
    async fn write_failed(&self, rel: &Key, e: StoreError) -> anyhow::Error {
        let key = self.key(rel);
        // Exists: another object is there. Unreachable (a timeout): the
        // write may still land after the check. Both leave the intent open.
        if matches!(
            e,
            StoreError::Exists { .. } | StoreError::Unreachable { .. }
        ) || !matches!(self.store.exists(&key).await, Ok(false))
        {
            return e.into();
        }
        let recorded = self
            .audit
            .record(Event::ObjectAbsent {
                place: self.place(),
                key: key.clone(),
                reason: format!("the write failed: {e}"),
            })
            .await;
        if let Err(r) = recorded {
            tracing::warn!(%key, error = %format!("{r:#}"), "could not record that a failed write left nothing");
        }
        e.into()
    }

    /// Records that `rel` is about to be written.
    async fn record_start(
        &self,
        rel: &Key,
        contents: &Contents<'_>,
        multipart: bool,
    ) -> anyhow::Result<()> {
        self.audit
            .record(Event::UploadStarted {
                place: self.place(),
                key: self.key(rel),
                kind: contents.kind,
                multipart,
                snapshot: contents.snapshot.map(str::to_string),
                users: contents.users.to_vec(),
            })
            .await
            .map(|_| ())
            .with_context(|| {
                format!(
                    "recording the start of the write of {} (nothing was written)",
                    self.key(rel)
                )
            })
    }

    /// Records a written object. When the record cannot be written, the
    /// object is deleted again: a write is never reported done, nor left in
    /// place, without its record.
    async fn record_put(
        &self,
        rel: &Key,
        contents: &Contents<'_>,
        digest: &Digest,
    ) -> anyhow::Result<()> {
        let key = self.key(rel);
        let recorded = self
            .audit
            .record(Event::ObjectPut {
                place: self.place(),
                key: key.clone(),
                kind: contents.kind,
                bytes: digest.bytes,
                blake3: digest.blake3.to_string(),
                snapshot: contents.snapshot.map(str::to_string),
                users: contents.users.to_vec(),
                ranges: contents.ranges.to_vec(),
                packed: contents.packed,
            })
            .await;
        let Err(e) = recorded else {
            return Ok(());
        };
        let undone = match self.store.delete(&self.permit, &key).await {
            Ok(()) => {
                let deleted = self
                    .audit
                    .record(Event::ObjectDeleted {
                        place: self.place(),
                        key: key.clone(),
                        reason: "its write could not be recorded".into(),
                    })
                    .await;
                match deleted {
                    Ok(_) => "it was deleted again".to_string(),
                    Err(_) => {
                        "it was deleted again (unrecorded: the log has its start)".to_string()
                    }
                }
            }
            Err(d) => format!(
                "it could not be deleted again ({d}); the log has its start, and the next run's cleanup deletes it"
            ),
        };
        Err(e.context(format!(
            "{key} was written to target {}, but its record could not be written: {undone}",
            self.target.name
        )))
    }

    /// Starts a multipart upload of `rel`, recorded before it is created;
    /// returns its id.
    pub async fn create_upload(
        &self,
        rel: &Key,
        contents: &Contents<'_>,
    ) -> anyhow::Result<String> {
        self.record_start(rel, contents, true).await?;
        match self.store.create_upload(&self.permit, &self.key(rel)).await {
            Ok(id) => Ok(id),
            Err(e) => Err(self.write_failed(rel, e).await),
        }
    }

    /// Uploads part `number` of `rel`; returns its ETag.
    pub async fn upload_part(
        &self,
        rel: &Key,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<String, StoreError> {
        self.store
            .upload_part(&self.permit, &self.key(rel), upload_id, number, body)
            .await
    }

    /// Completes a multipart upload of `rel`, whose parts hash to `digest`,
    /// and records the object.
    pub async fn complete_upload(
        &self,
        rel: &Key,
        upload_id: &str,
        parts: Vec<(i32, String)>,
        contents: &Contents<'_>,
        digest: &Digest,
    ) -> anyhow::Result<()> {
        self.store
            .complete_upload(&self.permit, &self.key(rel), upload_id, parts)
            .await?;
        crate::failpoint::hit("after-object-write", contents.holds_user_data());
        self.record_put(rel, contents, digest).await
    }

    /// Abandons a multipart upload of `rel` and records it, with `reason`.
    pub async fn abort_upload(
        &self,
        rel: &Key,
        upload_id: &str,
        reason: &str,
    ) -> anyhow::Result<()> {
        let key = self.key(rel);
        self.store
            .abort_upload(&self.permit, &key, upload_id)
            .await?;
        self.audit
            .record(Event::UploadAborted {
                place: self.place(),
                key: key.to_string(),
                upload_id: upload_id.to_string(),
                reason: reason.to_string(),
            })
            .await
            .map(|_| ())
            .with_context(|| format!("recording the abort of the upload of {key}"))
    }

    /// Deletes the object under `rel` and records why.
    /// The intent is recorded first (`delete_started`): until the target
    /// confirms and `object_deleted` is on record, the object counts as
    /// present.
    pub async fn delete(&self, rel: &Key, reason: &str) -> anyhow::Result<()> {
        let key = self.key(rel);
        self.audit
            .record(Event::DeleteStarted {
                place: self.place(),
                key: key.clone(),
                reason: reason.to_string(),
            })
            .await
            .with_context(|| {
                format!("recording the start of the deletion of {key} (nothing was deleted)")
            })?;
        self.store.delete(&self.permit, &key).await?;
        crate::failpoint::hit("after-delete", true);
        self.audit
            .record(Event::ObjectDeleted {
                place: self.place(),
                key: key.to_string(),
                reason: reason.to_string(),
            })
            .await
            .map(|_| ())
            .with_context(|| format!("recording the deletion of {key}"))
    }

    /// Records that there is no object under `rel` (`object_absent`, with
    /// `reason`) after a HEAD confirms it: what ends the intent of a write
    /// or deletion that has no outcome on record. Nothing is recorded when
    /// the object is there.
    pub async fn settle_absent(&self, rel: &Key, reason: &str) -> anyhow::Result<bool> {
        let key = self.key(rel);
        if self.store.exists(&key).await? {
            return Ok(false);
        }
        self.audit
            .record(Event::ObjectAbsent {
                place: self.place(),
                key,
                reason: format!("{reason}: the target holds no object under its key"),
            })
            .await?;
        Ok(true)
    }

    /// Writes this zone's marker if the target had none at the check.
    pub async fn ensure_marker(&self) -> anyhow::Result<()> {
        if self.marker_present {
            return Ok(());
        }
        self.put(
            &Key::marker(),
            Bytes::from(Marker::new(&self.target.zone).to_bytes()),
            &Contents::of(ObjectKind::Marker),
        )
        .await
    }
}

/// Why a target was refused. Every refusal ends the command with exit code 3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The region the server reported, when it reported one.
    pub reported_region: Option<String>,
    /// One sentence for the operator.
    pub reason: String,
}

/// The outcome of checking one target.
#[derive(Debug)]
pub enum Verdict<S> {
    /// The target may be written to.
    Passed(Writable<S>),
    /// The target is outside the zone, or claims to be: nothing may be written.
    Refused(Refusal),
    /// The check could not be made (unreachable, credentials, no bucket ...).
    Unavailable(StoreError),
}

/// Checks `target` for this core's zone, asking the server through a client
/// that `connect` opens for the target itself (signing for the target's
/// configured region), so the `Writable` it returns writes to the bucket
/// that passed and no other; records the
/// verdict in `audit`. A verdict that cannot be recorded makes the target
/// unavailable: nothing is written that the log does not show was allowed.
pub async fn verify<C: Connect>(
    config: &Config,
    connect: &C,
    audit: &Arc<AuditLog>,
    target: &Target,
) -> Verdict<C::Backend> {
    let store = connect.connect(target).await;
    let verdict = judge(config, audit, target, store).await;
    let place = Place::from(target);
    let event = match &verdict {
        Verdict::Passed(w) => Event::ResidencyPassed {
            place,
            reported_region: w.reported_region.clone(),
        },
        Verdict::Refused(r) => Event::ResidencyRefused {
            place,
            reported_region: r.reported_region.clone(),
            reason: r.reason.clone(),
        },
        Verdict::Unavailable(e) => Event::TargetUnavailable {
            place,
            reason: e.to_string(),
        },
    };
    match (audit.record(event).await, verdict) {
        (Ok(_), verdict) => verdict,
        // A refusal stays a refusal (exit 3) even when it cannot be recorded.
        (Err(e), Verdict::Refused(mut r)) => {
            r.reason = format!(
                "{} (and the refusal could not be recorded: {e:#})",
                r.reason
            );
            Verdict::Refused(r)
        }
        (Err(e), _) => Verdict::Unavailable(StoreError::Other(format!("{e:#}"))),
    }
}

async fn judge<S: WriteBackend>(
    config: &Config,
    audit: &Arc<AuditLog>,
    target: &Target,
    store: S,
) -> Verdict<S> {
    let zone = config.zone();
    let refuse = |reported_region: Option<String>, reason: String| {
        Verdict::Refused(Refusal {
            reported_region,
            reason,
        })
    };
    if target.zone != zone.id || !zone.targets.contains(target) {
        return refuse(
            None,
            format!(
                "target {} belongs to zone {}, but this core ({}) is in zone {}",
                target.name, target.zone, config.core.core_id, zone.id
            ),
        );
    }
    if !zone.regions.contains(&target.region) {
        return refuse(
            None,
            format!(
                "configured region {} is not one of zone {}'s regions {:?}",
                target.region, zone.id, zone.regions
            ),
        );
    }

    let reported = match store.bucket_location().await {
        Ok(region) => region,
        Err(StoreError::WrongRegion { reported }) => reported,
        Err(e) => return Verdict::Unavailable(e),
    };
    if reported != target.region {
        let inside = if zone.regions.contains(&reported) {
            format!(
                "{reported} is in zone {}, but the target is configured as {}",
                zone.id, target.region
            )
        } else {
            format!(
                "{reported} is outside zone {} ({:?})",
                zone.id, zone.regions
            )
        };
        return refuse(
            Some(reported.clone()),
            format!(
                "the server reports the bucket in region {reported}, not {}: {inside}",
                target.region
            ),
        );
    }

    let marker_present = match marker::read(&store, target, &zone.id).await {
        Ok(found) => match found.refusal(target) {
            Some(reason) => return refuse(Some(reported), reason),
            None => found == Found::Ours,
        },
        Err(StoreError::WrongRegion { reported }) => {
            return refuse(
                Some(reported.clone()),
                format!(
                    "the server reports the bucket in region {reported}, not {}",
                    target.region
                ),
            );
        }
        Err(e) => return Verdict::Unavailable(e),
    };

    Verdict::Passed(Writable {
        target: target.clone(),
        store,
        reported_region: reported,
        marker_present,
        audit: Arc::clone(audit),
        permit: WritePermit(()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::Memory;
    use zonevault_testkit::tmpfs::{Tmpfs, fill};

    fn target() -> Target {
        Target {
            name: "t".into(),
            zone: "z".into(),
            endpoint: "http://127.0.0.1:9".into(),
            region: "r".into(),
            bucket: "b".into(),
            prefix: "p".into(),
            path_style: true,
        }
    }

    fn writable(store: Memory, audit: &Arc<AuditLog>) -> Writable<Memory> {
        Writable {
            target: target(),
            store,
            reported_region: "r".into(),
            marker_present: true,
            audit: Arc::clone(audit),
            permit: WritePermit(()),
        }
    }

    fn key(rel: &str) -> Key {
        Key::parse(rel).unwrap()
    }

    fn events(audit: &AuditLog) -> Vec<String> {
        crate::audit::log::read_lines(audit.path())
            .unwrap()
            .iter()
            .map(|l| {
                crate::audit::record::Stored::parse(&l.text)
                    .unwrap()
                    .event()
                    .to_string()
            })
            .collect()
    }

    #[tokio::test]
    async fn a_write_whose_record_cannot_be_written_is_deleted_again_and_fails() {
        let dir = tempfile::tempdir().unwrap();
        let _fs = Tmpfs::mount(dir.path(), "128k");
        let audit = Arc::new(AuditLog::open(dir.path(), "c", "z").unwrap());
        let store = Memory::new("r");
        let full = dir.path().to_path_buf();
        store.after_put(move |_| {
            fill(&full, 0);
        });
        let t = writable(store, &audit);
        // users enough that the start record nearly fills a page of the
        // tmpfs: the object_put, as long, needs another one
        let mut users: Vec<String> = Vec::new();
        let start_len = |users: &[String]| {
            let event = Event::UploadStarted {
                place: Place::from(&t.target),
                key: t.key("objects/a"),
                kind: ObjectKind::Unit,
                multipart: false,
                snapshot: None,
                users: users.to_vec(),
            };
            let time = "2026-01-01T00:00:00.000Z";
            crate::audit::record::seal(&event, 1, time, "c", "z", crate::audit::record::GENESIS)
                .0
                .len()
                + 1
        };
        while start_len(&users) < 3_950 {
            users.push(format!("user{:04}", users.len()));
        }
        assert!(start_len(&users) < 4_096);
        let contents = Contents {
            kind: ObjectKind::Unit,
            snapshot: None,
            users: &users,
            ranges: &[],
            packed: 0,
        };
        let e = t
            .put(&key("objects/a"), Bytes::from_static(b"data"), &contents)
            .await
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("p/objects/a was written to target t, but its record could not be written"),
            "{e}"
        );
        assert!(e.contains("it was deleted again"), "{e}");
        assert!(e.contains("No space left on device"), "{e}");
        assert!(t.store.keys().is_empty(), "the object is gone");
        // the log knew it was coming, and is whole
        assert_eq!(events(&audit), ["upload_started"]);
        assert!(
            crate::audit::chain::verify_file(audit.path())
                .unwrap()
                .is_ok()
        );
        std::fs::remove_file(dir.path().join("ballast")).unwrap();

        // a write whose start cannot be recorded never starts
        fill(dir.path(), 0);
        let t = writable(Memory::new("r"), &audit);
        let e = t
            .put(
                &key("objects/b"),
                Bytes::from_static(b"data"),
                &Contents::of(ObjectKind::Unit),
            )
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("nothing was written"), "{e:#}");
        assert!(t.store.keys().is_empty());
        std::fs::remove_file(dir.path().join("ballast")).unwrap();

        // with space, both records, in order
        t.put(
            &key("objects/c"),
            Bytes::from_static(b"data"),
            &Contents::of(ObjectKind::Unit),
        )
        .await
        .unwrap();
        assert_eq!(
            events(&audit),
            ["upload_started", "upload_started", "object_put"]
        );
    }

    /// The gate's verdict for `name` with its bucket prepared by `prepare`.
    async fn verdict_of(
        name: &str,
        prepare: impl FnOnce(&Memory),
    ) -> (Verdict<Memory>, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::testing::config(dir.path());
        let audit = crate::testing::audit(&config);
        let buckets = crate::storage::memory::Buckets::default();
        let target = crate::testing::target(&config, name);
        prepare(&buckets.of(target));
        let verdict = verify(&config, &buckets, &audit, target).await;
        (verdict, crate::testing::events(&audit))
    }

    #[tokio::test]
    async fn the_gate_s_verdicts() {
        let marker = |zone: &str, format: u32| format!(r#"{{"format":{format},"zone":"{zone}"}}"#);
        // (target, what the bucket does, verdict, words of the reason)
        type Prepare = Box<dyn FnOnce(&Memory)>;
        let cases: Vec<(&str, Prepare, &str, &str)> = vec![
            ("ch-primary", Box::new(|_| {}), "passed", ""),
            (
                "ch-primary",
                Box::new(move |m| m.insert("zv/zonevault.json", marker("ch", 1).as_bytes())),
                "passed",
                "",
            ),
            (
                "ch-primary",
                Box::new(|m| m.set_region("de-fra-1")),
                "refused",
                "reports the bucket in region de-fra-1, not ch-gva-2: de-fra-1 is outside zone ch",
            ),
            (
                "ch-primary",
                Box::new(|m| m.set_region("ch-dk-2")),
                "refused",
                "ch-dk-2 is in zone ch, but the target is configured as ch-gva-2",
            ),
            (
                "ch-primary",
                Box::new(|m| {
                    m.fail(
                        crate::storage::memory::Op::Location,
                        1,
                        StoreError::WrongRegion {
                            reported: "us-east-1".into(),
                        },
                    )
                }),
                "refused",
                "us-east-1 is outside zone ch",
            ),
            (
                "ch-primary",
                Box::new(move |m| m.insert("zv/zonevault.json", marker("de", 1).as_bytes())),
                "refused",
                "names zone \"de\": this bucket holds another zone's backups",
            ),
            (
                "ch-primary",
                Box::new(move |m| m.insert("zv/zonevault.json", marker("ch", 99).as_bytes())),
                "refused",
                "has format 99",
            ),
            (
                "ch-primary",
                Box::new(|m| m.insert("zv/zonevault.json", b"not json")),
                "refused",
                "zonevault.json",
            ),
            (
                "de-primary",
                Box::new(|_| {}),
                "refused",
                "target de-primary belongs to zone de, but this core (core-ch-1) is in zone ch",
            ),
            (
                "ch-secondary",
                Box::new(|m| {
                    m.fail(
                        crate::storage::memory::Op::Location,
                        1,
                        StoreError::Unreachable {
                            endpoint: "http://127.0.0.1:2".into(),
                            cause: "connection refused".into(),
                        },
                    )
                }),
                "unavailable",
                "cannot reach http://127.0.0.1:2",
            ),
            (
                "ch-secondary",
                Box::new(|m| {
                    m.fail(
                        crate::storage::memory::Op::Get,
                        1,
                        StoreError::Credentials {
                            cause: "InvalidAccessKeyId".into(),
                        },
                    )
                }),
                "unavailable",
                "refused the credentials",
            ),
        ];
        for (name, prepare, expect, words) in cases {
            let (verdict, events) = verdict_of(name, prepare).await;
            let (got, reason, event) = match &verdict {
                Verdict::Passed(_) => ("passed", String::new(), "residency_passed"),
                Verdict::Refused(r) => ("refused", r.reason.clone(), "residency_refused"),
                Verdict::Unavailable(e) => ("unavailable", e.to_string(), "target_unavailable"),
            };
            assert_eq!(got, expect, "{name}: {reason}");
            assert!(
                reason.contains(words),
                "{name}: {words:?} not in {reason:?}"
            );
            assert_eq!(
                events.last().map(String::as_str),
                Some(event),
                "{name}: {events:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_writer_writes_only_to_the_bucket_that_passed() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::testing::config(dir.path());
        let audit = crate::testing::audit(&config);
        let buckets = crate::storage::memory::Buckets::default();
        let writers = crate::testing::writers(&config, &audit, &buckets).await;
        let (a, b) = (&writers[0], &writers[1]);
        assert_eq!(a.target().name, "ch-primary");
        a.put(
            &key("c/objects/x"),
            Bytes::from_static(b"x"),
            &Contents::of(ObjectKind::Unit),
        )
        .await
        .unwrap();
        a.ensure_marker().await.unwrap();
        let primary = buckets.of(crate::testing::target(&config, "ch-primary"));
        let secondary = buckets.of(crate::testing::target(&config, "ch-secondary"));
        // under A's prefix, in A's bucket; nothing in B's
        assert_eq!(primary.keys(), ["zv/c/objects/x", "zv/zonevault.json"]);
        assert!(secondary.keys().is_empty());
        // a key listed on A that is not under its prefix is not A's to delete
        primary.insert("elsewhere/y", b"y");
        assert!(a.relative("elsewhere/y").is_none());
        assert_eq!(
            a.relative("zv/c/objects/x").unwrap().as_str(),
            "c/objects/x"
        );
        b.delete(&key("c/objects/x"), "test").await.unwrap();
        assert_eq!(
            primary.keys().len(),
            3,
            "B's delete cannot reach A's objects"
        );
    }
}
