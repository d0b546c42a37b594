//! A snapshot's commit: once every unit is stored, its manifest (encrypted to
//! the zone), the signatures, and last its index go to every target.
//!
//! The index is what makes a snapshot exist (restore, retention and the
//! sweep see only committed indexes), so it is the last write, and it lands
//! on every target or on none. Every object of a commit is new: a run never
//! replaces what another one committed (ids do not collide; the index and
//! the signatures are conditional writes after a read, and the manifest,
//! sent by parts, starts only where a HEAD finds no object under its key).

use std::io::{Seek, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

use super::layout::{self, Key};
use super::snapshot::{IndexObject, IndexRef, ManifestRef, Totals, UnitRecord};
use crate::audit::{Event, ObjectKind};
use crate::budget::Budget;
use crate::error::Result;
use crate::pipeline::{self, Digest, HashingWriter, Part, PartSink};
use crate::residency::{Contents, Writable};
use crate::signing::{self, Signer, Statement};
use crate::storage::{StoreError, WriteBackend};

/// A snapshot whose units are stored, ready to commit.
#[derive(Debug)]
pub struct Draft<'a> {
    pub id: &'a str,
    pub time: DateTime<Utc>,
    pub core: &'a str,
    pub zone: &'a str,
    /// The units, in a stable order (by volume, then kind); shared with the
    /// thread that seals the manifest.
    pub units: Arc<Vec<UnitRecord>>,
    /// The key object of the key the manifest is encrypted to (the core's).
    pub data_key: &'a str,
}

impl Draft<'_> {
    fn index<'a>(&'a self, manifest: &Key, manifest_size: u64) -> IndexRef<'a> {
        IndexRef {
            format: layout::FORMAT,
            id: self.id,
            time: self.time,
            core: self.core,
            zone: self.zone,
            tool_version: env!("CARGO_PKG_VERSION"),
            manifest: IndexObject {
                key: manifest.to_string(),
                size: manifest_size,
                data_key: Some(self.data_key.to_string()),
            },
            objects: &self.units,
            totals: Totals::of(&self.units),
        }
    }
}

/// How the commit sends the manifest, which names every unit (tens of
/// megabytes at 100,000 units): sealed into an unlinked file in `dir` (the
/// state dir), then read back to sign it and sent by parts of `part_size`
/// within the run's budget, like a unit. The run never holds it whole.
#[derive(Debug)]
pub struct Spool<'a> {
    pub dir: &'a Path,
    pub budget: &'a Arc<Budget>,
    pub part_size: usize,
    pub part_jobs: usize,
}

/// Commits `draft` on every target: the manifest sealed to `recipients`,
/// the signatures when the core signs, then the index, and a
/// `snapshot_committed` record per target. Returns what the index counts.
pub async fn commit<S: WriteBackend>(
    targets: &[Writable<S>],
    draft: &Draft<'_>,
    recipients: &[age::x25519::Recipient],
    signer: Option<&Signer>,
    spool: &Spool<'_>,
) -> Result<Totals> {
    let manifest_key = layout::manifest_key(draft.core, draft.id);
    let sealed = seal_manifest(draft, recipients, signer, spool.dir).await?;
    let index = draft.index(&manifest_key, sealed.digest.bytes);
    // sized for the objects (about 100 bytes each, pretty-printed): no
    // doubling of megabytes at 100,000 units
    let mut index_json = Vec::with_capacity(4096 + 112 * index.object_count());
    serde_json::to_writer_pretty(&mut index_json, &index).map_err(anyhow::Error::from)?;
    let index_json = Bytes::from(index_json);
    let of_snapshot = |kind| Contents {
        kind,
        snapshot: Some(draft.id),
        users: &[],
        ranges: &[],
        packed: 0,
    };
    put_manifest(
        targets,
        &manifest_key,
        &sealed,
        spool,
        &of_snapshot(ObjectKind::Manifest),
    )
    .await?;
    let index_key = layout::index_key(draft.core, draft.id);
    if let (Some(signer), Some(manifest_signature)) = (signer, sealed.signature) {
        // Signatures before the index: a committed snapshot is signed whole.
        let index_signature = signer.sign(
            &index_json[..],
            &Statement {
                core: draft.core,
                zone: draft.zone,
                snapshot: draft.id,
                file: signing::file_name(&index_key),
            },
        )?;
        for (key, signature) in [
            (&manifest_key, manifest_signature),
            (&index_key, index_signature),
        ] {
            put_new_everywhere(
                targets,
                &layout::signature_key(key),
                &Bytes::from(signature),
                &of_snapshot(ObjectKind::Signature),
            )
            .await?;
        }
    }
    put_index(
        targets,
        &index_key,
        &index_json,
        &of_snapshot(ObjectKind::Index),
    )
    .await?;
    let totals = index.totals;
    for t in targets {
        t.audit()
            .record(Event::SnapshotCommitted {
                place: t.place(),
                snapshot: draft.id.to_string(),
                key: t.key(&index_key),
                units: totals.units,
                plain_bytes: totals.plain_bytes,
                stored_bytes: totals.stored_bytes,
            })
            .await?;
    }
    Ok(totals)
}

/// The sealed manifest: an unlinked file (gone with the process, whatever
/// happens), the digest of its bytes and, when the core signs, its
/// signature.
struct SealedManifest {
    file: std::fs::File,
    digest: Digest,
    signature: Option<Vec<u8>>,
}

impl SealedManifest {
    /// A reader of the whole file from its start.
    fn reader(&self) -> anyhow::Result<std::fs::File> {
        let mut file = self.file.try_clone()?;
        file.rewind()?;
        Ok(file)
    }
}

/// Serializes the manifest straight into its encryption, into an unlinked
/// file in `dir`, and signs that file, on the blocking pool: the plain
/// manifest (it names every unit) is never held, nor written anywhere.
async fn seal_manifest(
    draft: &Draft<'_>,
    recipients: &[age::x25519::Recipient],
    signer: Option<&Signer>,
    dir: &Path,
) -> Result<SealedManifest> {
    let (id, core, zone, time) = (
        draft.id.to_string(),
        draft.core.to_string(),
        draft.zone.to_string(),
        draft.time,
    );
    let (units, recipients, signer, dir) = (
        Arc::clone(&draft.units),
        recipients.to_vec(),
        signer.cloned(),
        dir.to_path_buf(),
    );
    let sealed = crate::blocking::run("sealing the manifest", move || {
        let manifest = ManifestRef {
            format: layout::FORMAT,
            snapshot: &id,
            time,
            core: &core,
            zone: &zone,
            units: &units,
        };
        let file = tempfile::tempfile_in(&dir)
            .with_context(|| format!("cannot create a file in {}", dir.display()))?;
        let written = || -> anyhow::Result<_> {
            let out = HashingWriter::new(std::io::BufWriter::with_capacity(256 << 10, file));
            let out = pipeline::encrypt_into(&recipients, out, |w| {
                serde_json::to_writer(w, &manifest).map_err(std::io::Error::other)
            })?;
            let (mut out, blake3, bytes) = out.finish()?;
            out.flush()?;
            Ok((out.into_inner().map_err(|e| e.into_error())?, blake3, bytes))
        };
        let (file, blake3, bytes) = written().with_context(|| {
            format!("writing the sealed manifest to a file in {}", dir.display())
        })?;
        let mut sealed = SealedManifest {
            file,
            digest: Digest { bytes, blake3 },
            signature: None,
        };
        if let Some(signer) = signer {
            let key = layout::manifest_key(&core, &id);
            let statement = Statement {
                core: &core,
                zone: &zone,
                snapshot: &id,
                file: signing::file_name(&key),
            };
            let read = std::io::BufReader::with_capacity(256 << 10, sealed.reader()?);
            sealed.signature = Some(signer.sign(read, &statement)?);
        }
        anyhow::Ok(sealed)
    })
    .await??;
    Ok(sealed)
}

/// Sends the sealed manifest to every target, by parts read from its file.
/// A manifest is always new (its key holds the snapshot's random id); a key
/// already taken on any target stops the commit before anything is sent.
async fn put_manifest<S: WriteBackend>(
    targets: &[Writable<S>],
    key: &Key,
    sealed: &SealedManifest,
    spool: &Spool<'_>,
    contents: &Contents<'_>,
) -> anyhow::Result<()> {
    for t in targets {
        let full = t.key(key);
        if t.store().exists(&full).await? {
            return Err(
                anyhow::Error::new(StoreError::Exists { key: full }).context(format!(
                    "writing the manifest to target {}",
                    t.target().name
                )),
            );
        }
    }
    let (tx, rx) = mpsc::channel::<Part>(1);
    let sink = PartSink::new(tx, spool.part_size, Arc::clone(spool.budget));
    let mut file = sealed.reader()?;
    let producer = crate::blocking::spawn(move || {
        let mut sink = sink;
        std::io::copy(&mut file, &mut sink)?;
        sink.finish()
    });
    let uploaded =
        crate::upload::upload(targets, key, rx, spool.part_jobs, contents, spool.budget).await;
    let read = producer
        .await
        .map_err(|e| anyhow::anyhow!("reading back the sealed manifest: {e}"))?;
    // A read that stopped because the upload did ("broken pipe") is not
    // the cause; any other read error is.
    let digest = match (uploaded, read) {
        (Ok(digest), Ok(_)) => digest,
        (_, Err(e)) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(anyhow::Error::from(e).context("reading back the sealed manifest"));
        }
        (Err(e), _) => return Err(e),
        (Ok(_), Err(e)) => return Err(e.into()),
    };
    // the bytes sent are the bytes sealed (and signed)
    anyhow::ensure!(
        digest == sealed.digest,
        "the manifest sent differs from the one sealed"
    );
    Ok(())
}

/// Writes the index on every target, never over an existing one; if any
/// target fails, takes back the copies this run wrote (and only those).
async fn put_index<S: WriteBackend>(
    targets: &[Writable<S>],
    key: &Key,
    body: &Bytes,
    contents: &Contents<'_>,
) -> Result<()> {
    let results = put_new_on_all(targets, key, body, contents).await;
    if results.iter().any(Result::is_err) {
        for (t, r) in targets.iter().zip(&results) {
            // where the write may have landed (a timeout after the server
            // stored it), but never where another run's index is
            if !r.as_ref().is_err_and(is_exists)
                && let Err(undo) = t.delete(key, "taking back a partial commit").await
            {
                tracing::warn!(target = %t.target().name, error = %format!("{undo:#}"), "could not take back a partial commit");
            }
        }
    }
    crate::upload::settle(results)?;
    Ok(())
}

fn is_exists(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<StoreError>(),
            Some(StoreError::Exists { .. })
        )
    })
}

/// Writes a new object to every target (never over an existing one).
async fn put_new_everywhere<S: WriteBackend>(
    targets: &[Writable<S>],
    key: &Key,
    body: &Bytes,
    contents: &Contents<'_>,
) -> Result<()> {
    crate::upload::settle(put_new_on_all(targets, key, body, contents).await)?;
    Ok(())
}

/// Writes one new object to every target at once (only where none exists
/// under `key`); one result per target, in order.
async fn put_new_on_all<S: WriteBackend>(
    targets: &[Writable<S>],
    key: &Key,
    body: &Bytes,
    contents: &Contents<'_>,
) -> Vec<anyhow::Result<()>> {
    let puts = targets.iter().map(|t| async move {
        t.put_new(key, body.clone(), contents)
            .await
            .with_context(|| format!("writing {} to target {}", t.key(key), t.target().name))
    });
    futures::future::join_all(puts).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::snapshot::Index;
    use crate::storage::memory::Op;
    use crate::testing;

    const CORE: &str = "core-ch-1";
    const ID: &str = "20261201T023000Z-00aa";

    #[tokio::test]
    async fn a_partial_commit_is_taken_back_but_never_another_run_s_index() {
        let w = testing::World::new().await;
        let key = layout::index_key(CORE, ID);
        let body = Bytes::from_static(b"{}");
        let contents = Contents::of(ObjectKind::Index);
        // the second target fails: the first one's copy is taken back
        w.targets[1]
            .store()
            .fail(Op::PutNew, 1, StoreError::Other("injected".into()));
        let e = put_index(&w.targets, &key, &body, &contents)
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("ch-secondary"), "{e:#}");
        for t in &w.targets {
            assert!(t.store().keys().is_empty(), "{}", t.target().name);
        }
        // the second target holds another run's index under that key: the
        // first one's copy is taken back, the other run's is left alone
        let theirs = &w.targets[1];
        theirs.store().insert(&theirs.key(&key), b"another run");
        put_index(&w.targets, &key, &body, &contents)
            .await
            .unwrap_err();
        assert!(w.targets[0].store().keys().is_empty());
        assert_eq!(
            theirs.store().object(&theirs.key(&key)).unwrap(),
            "another run"
        );
        // both fine: both committed
        theirs.store().insert(&theirs.key(&key), b"");
        let fresh = layout::index_key(CORE, "20261201T023001Z-00ab");
        put_index(&w.targets, &fresh, &body, &contents)
            .await
            .unwrap();
        for t in &w.targets {
            assert_eq!(t.store().object(&t.key(&fresh)).unwrap(), "{}");
        }
    }

    fn draft(units: Arc<Vec<UnitRecord>>) -> Draft<'static> {
        Draft {
            id: ID,
            time: Utc::now(),
            core: CORE,
            zone: "ch",
            units,
            data_key: "core-ch-1/keys/00.age",
        }
    }

    /// Parts of 4 KiB: a manifest of a few hundred units takes several.
    fn spool<'a>(w: &'a testing::World, budget: &'a Arc<Budget>) -> Spool<'a> {
        Spool {
            dir: w.config.core.state_dir.as_path(),
            budget,
            part_size: 4096,
            part_jobs: 2,
        }
    }

    #[tokio::test]
    async fn a_manifest_key_already_taken_stops_the_commit_before_anything_is_sent() {
        let w = testing::World::new().await;
        let recipient = age::x25519::Identity::generate().to_public();
        let draft = draft(Arc::new(Vec::new()));
        let budget = Budget::new(Default::default());
        let spool = spool(&w, &budget);
        let theirs = &w.targets[1];
        let taken = theirs.key(&layout::manifest_key(CORE, ID));
        theirs.store().insert(&taken, b"another run");
        let e = commit(
            &w.targets,
            &draft,
            std::slice::from_ref(&recipient),
            None,
            &spool,
        )
        .await
        .unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.contains("ch-secondary") && text.contains("already exists"),
            "{text}"
        );
        assert_eq!(theirs.store().object(&taken).unwrap(), "another run");
        assert!(w.targets[0].store().keys().is_empty());
    }

    #[tokio::test]
    async fn a_commit_writes_the_index_last_and_records_it_on_every_target() {
        let w = testing::World::new().await;
        let identity = age::x25519::Identity::generate();
        let recipient = identity.to_public();
        // enough units for a manifest of many parts; units 100.. are in
        // four packs of 25
        let packed = |i: u64| i >= 100;
        let units: Vec<UnitRecord> = (0..200)
            .map(|i| UnitRecord {
                volume: "users".into(),
                kind: crate::units::UnitKind::User(format!("u{i}")),
                object: match packed(i) {
                    true => format!("core-ch-1/objects/{:032x}.pack", i / 25).into(),
                    false => format!("core-ch-1/objects/{i:032x}.tar.zst.age").into(),
                },
                offset: packed(i).then_some((i % 25) * 1000),
                object_size: packed(i).then_some(25_000 + i / 25),
                plain_size: 10 + i,
                stored_size: 20 + i,
                blake3: crate::hash::Blake3::of(b""),
                files: 1,
                fingerprint: Some(crate::hash::Blake3::of(b"f")),
                dirs: vec![format!("a/b/c/u{i}").into()],
                data_key: None,
            })
            .collect();
        let draft = draft(Arc::new(units.clone()));
        let budget = Budget::new(Default::default());
        let spool = spool(&w, &budget);
        // the manifest fails on the second target: no index anywhere
        w.targets[1]
            .store()
            .fail(Op::CreateUpload, 1, StoreError::Other("injected".into()));
        commit(
            &w.targets,
            &draft,
            std::slice::from_ref(&recipient),
            None,
            &spool,
        )
        .await
        .unwrap_err();
        let index_key = layout::index_key(CORE, ID);
        for t in &w.targets {
            assert!(t.store().object(&t.key(&index_key)).is_none());
        }
        let id2 = "20261201T023001Z-00ab";
        let draft = Draft { id: id2, ..draft };
        let totals = commit(
            &w.targets,
            &draft,
            std::slice::from_ref(&recipient),
            None,
            &spool,
        )
        .await
        .unwrap();
        assert_eq!(totals, Totals::of(&units));
        // the manifest, sealed into a file and sent by parts, reads back as
        // a Manifest of the units
        let manifest_key = layout::manifest_key(CORE, id2);
        let sealed = w.targets[0]
            .store()
            .object(&w.targets[0].key(&manifest_key))
            .unwrap();
        assert!(sealed.len() > 3 * 4096, "{} bytes", sealed.len());
        let identities: Vec<Box<dyn age::Identity + Send + Sync>> = vec![Box::new(identity)];
        let plain = pipeline::decrypt_small(&sealed, &identities).unwrap();
        let manifest: crate::repository::snapshot::Manifest =
            serde_json::from_slice(&plain).unwrap();
        assert_eq!(
            (manifest.snapshot.as_str(), manifest.core.as_str()),
            (id2, CORE)
        );
        assert_eq!(manifest.units, units);
        // the index, written from borrowed units, reads back as an Index
        for t in &w.targets {
            let key = t.key(&layout::index_key(CORE, id2));
            let stored: Index = serde_json::from_slice(&t.store().object(&key).unwrap()).unwrap();
            assert_eq!(stored.manifest.key, manifest_key.to_string());
            assert_eq!(stored.manifest.size, sealed.len() as u64);
            // each object once, a pack with its own size
            assert_eq!(stored.objects.len(), 100 + 4);
            assert_eq!(
                (stored.objects[7].key.as_str(), stored.objects[7].size),
                (&*units[7].object, units[7].stored_size)
            );
            let packs: Vec<(&str, u64)> = stored.objects[100..]
                .iter()
                .map(|o| (o.key.as_str(), o.size))
                .collect();
            let want: Vec<(&str, u64)> = [100, 125, 150, 175]
                .iter()
                .map(|&i| (&*units[i].object, 25_000 + i as u64 / 25))
                .collect();
            assert_eq!(packs, want);
            assert_eq!(
                (stored.units, stored.plain_bytes, stored.stored_bytes),
                (totals.units, totals.plain_bytes, totals.stored_bytes)
            );
        }
        let committed = testing::events(&w.audit)
            .iter()
            .filter(|e| e.as_str() == "snapshot_committed")
            .count();
        assert_eq!(committed, 2);
        // nothing of the sealed manifest stays in the state dir
        let left: Vec<_> = std::fs::read_dir(&w.config.core.state_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
