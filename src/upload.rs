//! Uploading one object to every target of the zone, part by part.
//!
//! Parts arrive on a channel from the pipeline. An object that fits in one
//! part is a single PUT; a larger one is a multipart upload on each target,
//! up to `concurrency` parts in flight. Every request takes a slot of the
//! run's [`Budget`] (and waits for the upload rate, when one is set); a part
//! gives its bytes back to the budget once every target stored it. On any
//! failure every started multipart upload is aborted, so a failed run leaves
//! no half object behind. Each target records the object in the audit log as
//! it completes.

use std::future::Future;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;

use crate::budget::{Budget, Held};
use crate::pipeline::{Digest, Part};
use crate::repository::layout::Key;
use crate::residency::{Contents, Writable};
use crate::storage::WriteBackend;

/// Runs `request` in a request slot of `budget`, after pacing `bytes`.
async fn in_slot<T>(budget: &Budget, bytes: usize, request: impl Future<Output = T>) -> T {
    budget.pace(bytes).await;
    let _slot = budget.request().await;
    request.await
}

/// Receives the parts of object `key` and writes it to every target.
/// Returns the stored object's digest.
pub async fn upload<S: WriteBackend>(
    targets: &[Writable<S>],
    key: &Key,
    mut parts: mpsc::Receiver<Part>,
    concurrency: usize,
    contents: &Contents<'_>,
    budget: &Budget,
) -> Result<Digest> {
    let head = head(&mut parts, key).await?;
    upload_head(targets, key, head, parts, concurrency, contents, budget).await
}

/// The start of an object: all of it when it is one part, so that the
/// caller can choose how to store it (a small unit goes to a pack).
#[derive(Debug)]
pub enum Head {
    /// The whole object in one part, and its digest.
    Whole(Bytes, Held, Digest),
    /// The first two parts of a larger object.
    Parts([(Bytes, Arc<Held>); 2]),
}

/// Receives the first parts of object `key`: one part and the end, or two.
pub async fn head(parts: &mut mpsc::Receiver<Part>, key: &Key) -> Result<Head> {
    let first = match next_part(parts, key).await? {
        Part::Data(bytes, held) => (bytes, held),
        Part::End(_) => anyhow::bail!("the pipeline produced no data for {key}"),
    };
    Ok(match next_part(parts, key).await? {
        Part::Data(bytes, held) => {
            Head::Parts([(first.0, Arc::new(first.1)), (bytes, Arc::new(held))])
        }
        Part::End(digest) => Head::Whole(first.0, first.1, digest),
    })
}

/// [`upload`] of an object whose [`head`] was received: one PUT per target
/// for a whole object, else a multipart upload of the rest of `parts`.
pub async fn upload_head<S: WriteBackend>(
    targets: &[Writable<S>],
    key: &Key,
    head: Head,
    parts: mpsc::Receiver<Part>,
    concurrency: usize,
    contents: &Contents<'_>,
    budget: &Budget,
) -> Result<Digest> {
    let [first, second] = match head {
        Head::Whole(body, held, digest) => {
            put_whole(targets, key, body, contents, &digest, budget).await?;
            drop(held);
            return Ok(digest);
        }
        Head::Parts(parts) => parts,
    };

    let ids = futures::future::join_all(
        targets
            .iter()
            .map(|t| in_slot(budget, 0, t.create_upload(key, contents))),
    )
    .await;
    let mut uploads = Vec::new();
    let mut failure = None;
    for (t, id) in targets.iter().zip(ids) {
        match id {
            Ok(id) => uploads.push((t, id)),
            Err(e) => {
                failure.get_or_insert(e.context(describe("starting the upload of", t, key)));
            }
        }
    }
    // Uploads completed before a failure are objects now: not aborted (the
    // next run's sweep removes them, unreferenced), only the others.
    let mut completed = 0;
    if failure.is_none() {
        match send_parts(&uploads, key, [first, second], parts, concurrency, budget).await {
            Ok((digest, done)) => {
                for ((t, id), mut parts) in uploads.iter().zip(done) {
                    parts.sort_by_key(|(n, _)| *n);
                    let completing = t.complete_upload(key, id, parts, contents, &digest);
                    if let Err(e) = in_slot(budget, 0, completing).await {
                        failure = Some(e.context(describe("completing the upload of", t, key)));
                        break;
                    }
                    completed += 1;
                }
                if failure.is_none() {
                    return Ok(digest);
                }
            }
            Err(e) => failure = Some(e),
        }
    }
    let failure = failure.expect("a failure was recorded");
    let reason = format!("the upload failed: {failure}");
    for (t, id) in &uploads[completed..] {
        if let Err(e) = t.abort_upload(key, id, &reason).await {
            tracing::warn!(target = %t.target().name, error = %format!("{e:#}"), "could not abort an upload; the next run removes it");
        }
    }
    Err(failure)
}

/// Writes a whole object held in memory to every target, one PUT each in a
/// request slot of `budget`.
pub async fn put_whole<S: WriteBackend>(
    targets: &[Writable<S>],
    key: &Key,
    body: Bytes,
    contents: &Contents<'_>,
    digest: &Digest,
    budget: &Budget,
) -> Result<()> {
    let puts = targets.iter().map(|t| {
        let body = body.clone();
        async move {
            in_slot(
                budget,
                body.len(),
                t.put_digested(key, body, contents, digest),
            )
            .await
            .with_context(|| describe("writing", t, key))
        }
    });
    // Every started write settles, so none lands unrecorded after the run
    // has given up on it.
    settle(futures::future::join_all(puts).await)
}

/// The parts sent to each upload: (number, etag).
type Sent = Vec<Vec<(i32, String)>>;

/// Sends every part to every upload, at most `concurrency` parts at a time;
/// returns the object's digest and, per upload, the parts it holds. A part's
/// budget bytes go back when its last target has it.
async fn send_parts<S: WriteBackend>(
    uploads: &[(&Writable<S>, String)],
    key: &Key,
    first: [(Bytes, Arc<Held>); 2],
    mut parts: mpsc::Receiver<Part>,
    concurrency: usize,
    budget: &Budget,
) -> Result<(Digest, Sent)> {
    let mut done: Sent = vec![Vec::new(); uploads.len()];
    let mut inflight = FuturesUnordered::new();
    let mut number = 0;
    let mut end: Option<Digest> = None;
    // One future per part and target; receiving the next part and finishing
    // uploads go on at the same time.
    let limit = concurrency.max(1) * uploads.len();
    let send = |number: i32, part: Bytes, held: Arc<Held>| {
        uploads.iter().enumerate().map(move |(i, (t, id))| {
            let (body, held) = (part.clone(), Arc::clone(&held));
            async move {
                let etag = in_slot(budget, body.len(), t.upload_part(key, id, number, body))
                    .await
                    .map_err(|e| context(e, &format!("uploading part {number} of"), t, key))?;
                drop(held);
                Ok::<_, anyhow::Error>((i, number, etag))
            }
        })
    };
    for (part, held) in first {
        number += 1;
        inflight.extend(send(number, part, held));
    }
    loop {
        tokio::select! {
            part = next_part(&mut parts, key), if end.is_none() && inflight.len() < limit => {
                match part? {
                    Part::Data(part, held) => {
                        number += 1;
                        inflight.extend(send(number, part, Arc::new(held)));
                    }
                    Part::End(digest) => end = Some(digest),
                }
            }
            Some(r) = inflight.next(), if !inflight.is_empty() => {
                let (i, number, etag) = r?;
                done[i].push((number, etag));
            }
            else => break,
        }
    }
    let digest = end.expect("the loop ends after the end marker");
    Ok((digest, done))
}

/// The next part. A channel closed before [`Part::End`] means the producer
/// failed: the object is incomplete.
async fn next_part(parts: &mut mpsc::Receiver<Part>, key: &Key) -> Result<Part> {
    parts
        .recv()
        .await
        .ok_or_else(|| anyhow::anyhow!("the data of {key} stopped before its end"))
}

fn context<S: WriteBackend>(
    e: crate::storage::StoreError,
    what: &str,
    t: &Writable<S>,
    key: &Key,
) -> anyhow::Error {
    anyhow::Error::new(e).context(describe(what, t, key))
}

fn describe<S: WriteBackend>(what: &str, t: &Writable<S>, key: &Key) -> String {
    format!("{what} {} to target {}", t.key(key), t.target().name)
}

/// The first error of writes that all ran to their end.
pub fn settle(results: Vec<Result<()>>) -> Result<()> {
    results.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::ObjectKind;
    use crate::storage::StoreError;
    use crate::storage::memory::{Buckets, Memory, Op};
    use crate::testing;

    /// Where an upload of three parts to both targets breaks.
    #[derive(Debug, Clone, Copy)]
    enum Break {
        Create,
        Part(usize),
        LostPart,
        Complete,
        ProducerDies,
    }

    /// Uploads three parts to both targets with `brk` on the second one;
    /// returns the error, the buckets and the audit events.
    async fn upload_broken(brk: Break) -> (anyhow::Error, Vec<Memory>, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let config = testing::config(dir.path());
        let audit = testing::audit(&config);
        let buckets = Buckets::default();
        let targets = testing::writers(&config, &audit, &buckets).await;
        let stores: Vec<Memory> = targets.iter().map(|t| t.store().clone()).collect();
        let failing = &stores[1];
        let fault = || StoreError::Other("injected".into());
        match brk {
            Break::Create => failing.fail(Op::CreateUpload, 1, fault()),
            Break::Part(n) => failing.fail(Op::UploadPart, n, fault()),
            Break::LostPart => failing.lose_part(2),
            Break::Complete => failing.fail(Op::CompleteUpload, 1, fault()),
            Break::ProducerDies => {}
        }
        let (tx, rx) = mpsc::channel(1);
        let parts: Vec<Bytes> = (0..3u8).map(|i| Bytes::from(vec![i; 1000])).collect();
        let whole: Vec<u8> = parts.iter().flat_map(|p| p.to_vec()).collect();
        let producer = tokio::spawn(async move {
            for p in parts {
                if tx.send(Part::Data(p, Held::nothing())).await.is_err() {
                    return;
                }
            }
            if !matches!(brk, Break::ProducerDies) {
                let _ = tx.send(Part::End(Digest::of(&whole))).await;
            }
        });
        let key = crate::repository::layout::new_object_key("core-ch-1");
        let contents = Contents::of(ObjectKind::Unit);
        let budget = Budget::new(Default::default());
        let e = upload(&targets, &key, rx, 2, &contents, &budget)
            .await
            .unwrap_err();
        producer.await.unwrap();
        (e, stores, testing::events(&audit))
    }

    #[tokio::test]
    async fn every_failure_point_aborts_every_started_upload() {
        for brk in [
            Break::Create,
            Break::Part(1),
            Break::Part(3),
            Break::LostPart,
            Break::Complete,
            Break::ProducerDies,
        ] {
            let (e, stores, events) = upload_broken(brk).await;
            for (i, s) in stores.iter().enumerate() {
                assert_eq!(
                    s.pending_uploads(),
                    0,
                    "{brk:?}: target {i} keeps an upload"
                );
            }
            let started = events.iter().filter(|e| *e == "upload_started").count();
            let aborted = events.iter().filter(|e| *e == "upload_aborted").count();
            let put = events.iter().filter(|e| *e == "object_put").count();
            match brk {
                // the first target completed before the second failed: its
                // object is recorded (the next run's sweep removes it)
                Break::Complete | Break::LostPart => {
                    assert_eq!((started, aborted, put), (2, 1, 1), "{brk:?}: {events:?}");
                    assert_eq!(stores[0].keys().len(), 1);
                    // a completed upload is an object: it is not aborted
                    assert_eq!(stores[0].calls(Op::AbortUpload), 0, "{brk:?}");
                }
                Break::Create => {
                    assert_eq!((started, aborted, put), (2, 1, 0), "{brk:?}: {events:?}");
                }
                _ => assert_eq!((started, aborted, put), (2, 2, 0), "{brk:?}: {events:?}"),
            }
            if !matches!(brk, Break::Complete | Break::LostPart) {
                assert!(
                    stores
                        .iter()
                        .all(|s| s.keys().iter().all(|k| k.ends_with(".json"))),
                    "{brk:?}: no object"
                );
            }
            let e = format!("{e:#}");
            match brk {
                Break::ProducerDies => assert!(e.contains("stopped before its end"), "{e}"),
                _ => assert!(e.contains("ch-secondary"), "{brk:?}: {e}"),
            }
        }
    }

    #[tokio::test]
    async fn a_small_object_is_one_put_per_target() {
        let dir = tempfile::tempdir().unwrap();
        let config = testing::config(dir.path());
        let audit = testing::audit(&config);
        let buckets = Buckets::default();
        let targets = testing::writers(&config, &audit, &buckets).await;
        let (tx, rx) = mpsc::channel(2);
        tx.send(Part::Data(Bytes::from_static(b"small"), Held::nothing()))
            .await
            .unwrap();
        tx.send(Part::End(Digest::of(b"small"))).await.unwrap();
        let key = crate::repository::layout::new_object_key("core-ch-1");
        let budget = Budget::new(Default::default());
        let digest = upload(
            &targets,
            &key,
            rx,
            2,
            &Contents::of(ObjectKind::Unit),
            &budget,
        )
        .await
        .unwrap();
        assert_eq!(digest.bytes, 5);
        for t in &targets {
            assert_eq!(t.store().calls(Op::Put), 1);
            assert_eq!(t.store().calls(Op::CreateUpload), 0);
            assert_eq!(t.store().object(&t.key(&key)).unwrap(), "small");
        }
    }
}
