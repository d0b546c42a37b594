//! Uploading one object to every target of the zone, part by part.
//!
//! Parts arrive on a channel from the pipeline. An object that fits in one
//! part is a single PUT; a larger one is a multipart upload on each target,
//! up to `concurrency` parts in flight. On any failure every started multipart upload is
//! aborted, so a failed run leaves no half object behind. Each target
//! records the object in the audit log as it completes.

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;

use crate::pipeline::{Digest, Part};
use crate::residency::{Contents, Writable};
use crate::storage::Store;

/// Receives the parts of object `key` and writes it to every target.
/// Returns the stored object's digest.
pub async fn upload<S: Store>(
    targets: &[Writable<S>],
    key: &str,
    mut parts: mpsc::Receiver<Part>,
    concurrency: usize,
    contents: &Contents<'_>,
) -> Result<Digest> {
    let first = match next_part(&mut parts, key).await? {
        Part::Data(first) => first,
        Part::End(_) => anyhow::bail!("the pipeline produced no data for {key}"),
    };
    let second = match next_part(&mut parts, key).await? {
        Part::Data(second) => second,
        Part::End(digest) => {
            let puts = targets.iter().map(|t| {
                let (body, digest) = (first.clone(), &digest);
                async move {
                    t.put_digested(key, body, contents, digest)
                        .await
                        .with_context(|| describe("writing", t, key))
                }
            });
            // Every started write settles, so none lands unrecorded after
            // the run has given up on it.
            settle(futures::future::join_all(puts).await)?;
            return Ok(digest);
        }
    };

    let ids =
        futures::future::join_all(targets.iter().map(|t| t.create_upload(key, contents))).await;
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
    if failure.is_none() {
        match send_parts(&uploads, key, [first, second], parts, concurrency, contents).await {
            Ok(digest) => return Ok(digest),
            Err(e) => failure = Some(e),
        }
    }
    let failure = failure.expect("a failure was recorded");
    let reason = format!("the upload failed: {failure}");
    for (t, id) in &uploads {
        if let Err(e) = t.abort_upload(&t.key(key), id, &reason).await {
            tracing::warn!(target = %t.target().name, error = %format!("{e:#}"), "could not abort an upload; the next run removes it");
        }
    }
    Err(failure)
}

/// Sends every part to every upload, at most `concurrency` parts at a time,
/// then completes the uploads.
async fn send_parts<S: Store>(
    uploads: &[(&Writable<S>, String)],
    key: &str,
    first: [Bytes; 2],
    mut parts: mpsc::Receiver<Part>,
    concurrency: usize,
    contents: &Contents<'_>,
) -> Result<Digest> {
    let mut done: Vec<Vec<(i32, String)>> = vec![Vec::new(); uploads.len()];
    let mut inflight = FuturesUnordered::new();
    let mut number = 0;
    let mut end: Option<Digest> = None;
    // One future per part and target; receiving the next part and finishing
    // uploads go on at the same time.
    let limit = concurrency.max(1) * uploads.len();
    let send = |number: i32, part: Bytes| {
        uploads.iter().enumerate().map(move |(i, (t, id))| {
            let body = part.clone();
            async move {
                let etag = t
                    .upload_part(key, id, number, body)
                    .await
                    .map_err(|e| context(e, &format!("uploading part {number} of"), t, key))?;
                Ok::<_, anyhow::Error>((i, number, etag))
            }
        })
    };
    for part in first {
        number += 1;
        inflight.extend(send(number, part));
    }
    loop {
        tokio::select! {
            part = next_part(&mut parts, key), if end.is_none() && inflight.len() < limit => {
                match part? {
                    Part::Data(part) => {
                        number += 1;
                        inflight.extend(send(number, part));
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
    for ((t, id), mut parts) in uploads.iter().zip(done) {
        parts.sort_by_key(|(n, _)| *n);
        t.complete_upload(key, id, parts, contents, &digest)
            .await
            .with_context(|| describe("completing the upload of", t, key))?;
    }
    Ok(digest)
}

/// The next part. A channel closed before [`Part::End`] means the producer
/// failed: the object is incomplete.
async fn next_part(parts: &mut mpsc::Receiver<Part>, key: &str) -> Result<Part> {
    parts
        .recv()
        .await
        .ok_or_else(|| anyhow::anyhow!("the data of {key} stopped before its end"))
}

fn context<S: Store>(
    e: crate::storage::StoreError,
    what: &str,
    t: &Writable<S>,
    key: &str,
) -> anyhow::Error {
    anyhow::Error::new(e).context(describe(what, t, key))
}

fn describe<S: Store>(what: &str, t: &Writable<S>, key: &str) -> String {
    format!("{what} {} to target {}", t.key(key), t.target().name)
}

/// The first error of writes that all ran to their end.
pub fn settle(results: Vec<Result<()>>) -> Result<()> {
    results.into_iter().collect()
}
