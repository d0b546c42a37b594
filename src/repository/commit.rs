//! A snapshot's commit: once every unit is stored, its manifest (encrypted to
//! the zone), the signatures, and last its index go to every target.
//!
//! The index is what makes a snapshot exist (restore, retention and the
//! sweep see only committed indexes), so it is the last write, and it lands
//! on every target or on none. Every object of a commit is new: a run never
//! replaces what another one committed (ids do not collide, and the
//! conditional writes check it).

use anyhow::Context;
use bytes::Bytes;
use chrono::{DateTime, Utc};

use super::layout::{self, Key};
use super::snapshot::{Index, IndexObject, ManifestRef, UnitRecord};
use crate::audit::{Event, ObjectKind};
use crate::error::Result;
use crate::pipeline;
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
    /// The units, in a stable order (by volume, then kind).
    pub units: &'a [UnitRecord],
}

impl Draft<'_> {
    fn manifest(&self) -> ManifestRef<'_> {
        ManifestRef {
            format: layout::FORMAT,
            snapshot: self.id,
            time: self.time,
            core: self.core,
            zone: self.zone,
            units: self.units,
        }
    }

    fn index(&self, manifest: &Key, manifest_size: u64) -> Index {
        Index {
            format: layout::FORMAT,
            id: self.id.to_string(),
            time: self.time,
            core: self.core.to_string(),
            zone: self.zone.to_string(),
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: IndexObject {
                key: manifest.to_string(),
                size: manifest_size,
            },
            objects: self
                .units
                .iter()
                .map(|r| IndexObject {
                    key: r.object.clone(),
                    size: r.stored_size,
                })
                .collect(),
            units: self.units.len(),
            plain_bytes: self.units.iter().map(|r| r.plain_size).sum(),
            stored_bytes: self.units.iter().map(|r| r.stored_size).sum(),
        }
    }
}

/// Commits `draft` on every target: the manifest sealed to `recipients`,
/// the signatures when the core signs, then the index, and a
/// `snapshot_committed` record per target. Returns the index.
pub async fn commit<S: WriteBackend>(
    targets: &[Writable<S>],
    draft: &Draft<'_>,
    recipients: &[age::x25519::Recipient],
    signer: Option<&Signer>,
) -> Result<Index> {
    // written straight into the encryption: the plain manifest (it names
    // every unit) is never held whole
    let manifest = draft.manifest();
    let sealed = Bytes::from(pipeline::encrypt_with(recipients, |w| {
        serde_json::to_writer(w, &manifest).map_err(std::io::Error::other)
    })?);
    let manifest_key = layout::manifest_key(draft.core, draft.id);
    let index = draft.index(&manifest_key, sealed.len() as u64);
    let index_json = Bytes::from(serde_json::to_vec_pretty(&index).map_err(anyhow::Error::from)?);
    let of_snapshot = |kind| Contents {
        kind,
        snapshot: Some(draft.id),
        users: &[],
    };
    put_new_everywhere(
        targets,
        &manifest_key,
        &sealed,
        &of_snapshot(ObjectKind::Manifest),
    )
    .await?;
    let index_key = layout::index_key(draft.core, draft.id);
    if let Some(signer) = signer {
        // Signatures before the index: a committed snapshot is signed whole.
        for (key, body) in [(&manifest_key, &sealed), (&index_key, &index_json)] {
            let statement = Statement {
                core: draft.core,
                zone: draft.zone,
                snapshot: draft.id,
                file: signing::file_name(key),
            };
            let signature = Bytes::from(signer.sign(body, &statement)?);
            put_new_everywhere(
                targets,
                &layout::signature_key(key),
                &signature,
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
    for t in targets {
        t.audit()
            .record(Event::SnapshotCommitted {
                place: t.place(),
                snapshot: draft.id.to_string(),
                key: t.key(&index_key),
                units: index.units,
                plain_bytes: index.plain_bytes,
                stored_bytes: index.stored_bytes,
            })
            .await?;
    }
    Ok(index)
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

    #[tokio::test]
    async fn a_commit_writes_the_index_last_and_records_it_on_every_target() {
        let w = testing::World::new().await;
        let identity = age::x25519::Identity::generate();
        let recipient = identity.to_public();
        let units = [UnitRecord {
            volume: "users".into(),
            kind: crate::units::UnitKind::User("u1".into()),
            object: "core-ch-1/objects/ab.tar.zst.age".into(),
            plain_size: 10,
            stored_size: 20,
            blake3: "0".repeat(64),
            files: 1,
            fingerprint: "f".into(),
            dirs: vec!["a/b/c/u1".into()],
        }];
        let draft = Draft {
            id: ID,
            time: Utc::now(),
            core: CORE,
            zone: "ch",
            units: &units,
        };
        // the manifest fails on the second target: no index anywhere
        w.targets[1]
            .store()
            .fail(Op::PutNew, 1, StoreError::Other("injected".into()));
        commit(&w.targets, &draft, std::slice::from_ref(&recipient), None)
            .await
            .unwrap_err();
        let index_key = layout::index_key(CORE, ID);
        for t in &w.targets {
            assert!(t.store().object(&t.key(&index_key)).is_none());
        }
        let id2 = "20261201T023001Z-00ab";
        let draft = Draft { id: id2, ..draft };
        let index = commit(&w.targets, &draft, std::slice::from_ref(&recipient), None)
            .await
            .unwrap();
        assert_eq!(index.id, id2);
        // the manifest, written from borrowed units, reads back as a Manifest
        let sealed = w.targets[0]
            .store()
            .object(&w.targets[0].key(&layout::manifest_key(CORE, id2)))
            .unwrap();
        let identities: Vec<Box<dyn age::Identity + Send + Sync>> = vec![Box::new(identity)];
        let plain = pipeline::decrypt_small(&sealed, &identities).unwrap();
        let manifest: crate::repository::snapshot::Manifest =
            serde_json::from_slice(&plain).unwrap();
        assert_eq!(
            (manifest.snapshot.as_str(), manifest.core.as_str()),
            (id2, CORE)
        );
        assert_eq!(manifest.units, units);
        for t in &w.targets {
            let key = t.key(&layout::index_key(CORE, id2));
            let stored: Index = serde_json::from_slice(&t.store().object(&key).unwrap()).unwrap();
            assert_eq!(
                stored.manifest.key,
                layout::manifest_key(CORE, id2).to_string()
            );
        }
        let committed = testing::events(&w.audit)
            .iter()
            .filter(|e| e.as_str() == "snapshot_committed")
            .count();
        assert_eq!(committed, 2);
    }
}
