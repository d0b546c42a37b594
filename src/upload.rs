//! Uploading one object to every target of the zone, part by part.
//!
//! Parts arrive on a channel from the pipeline. An object that fits in one
//! part is a single PUT; a larger one is a multipart upload on each target,
//! up to `concurrency` parts in flight. On any failure every started multipart upload is
//! aborted, so a failed run leaves no half object behind.

use anyhow::Result;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;

use crate::residency::Writable;
use crate::storage::Store;

/// Receives the parts of object `key` and writes it to every target.
pub async fn upload<S: Store>(
    targets: &[Writable<S>],
    key: &str,
    mut parts: mpsc::Receiver<Bytes>,
    concurrency: usize,
) -> Result<()> {
    let first = next_part(&mut parts, key).await?;
    if first.is_empty() {
        anyhow::bail!("the pipeline produced no data for {key}");
    }
    let second = next_part(&mut parts, key).await?;
    if second.is_empty() {
        let puts = targets.iter().map(|t| {
            let body = first.clone();
            async move {
                t.put(key, body)
                    .await
                    .map_err(|e| context(e, "writing", t, key))
            }
        });
        futures::future::try_join_all(puts).await?;
        return Ok(());
    };

    let ids = futures::future::join_all(targets.iter().map(|t| t.create_upload(key))).await;
    let mut uploads = Vec::new();
    let mut failure = None;
    for (t, id) in targets.iter().zip(ids) {
        match id {
            Ok(id) => uploads.push((t, id)),
            Err(e) => {
                failure.get_or_insert(context(e, "starting the upload of", t, key));
            }
        }
    }
    if failure.is_none() {
        match send_parts(&uploads, key, [first, second], parts, concurrency).await {
            Ok(()) => return Ok(()),
            Err(e) => failure = Some(e),
        }
    }
    for (t, id) in &uploads {
        if let Err(e) = t.abort_upload(&t.key(key), id).await {
            tracing::warn!(target = %t.target().name, error = %e, "could not abort an upload; the next run removes it");
        }
    }
    Err(failure.expect("a failure was recorded"))
}

/// Sends every part to every upload, at most `concurrency` parts at a time,
/// then completes the uploads.
async fn send_parts<S: Store>(
    uploads: &[(&Writable<S>, String)],
    key: &str,
    first: [Bytes; 2],
    mut parts: mpsc::Receiver<Bytes>,
    concurrency: usize,
) -> Result<()> {
    let mut done: Vec<Vec<(i32, String)>> = vec![Vec::new(); uploads.len()];
    let mut inflight = FuturesUnordered::new();
    let mut number = 0;
    let mut exhausted = false;
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
            part = next_part(&mut parts, key), if !exhausted && inflight.len() < limit => {
                let part = part?;
                if part.is_empty() {
                    exhausted = true;
                } else {
                    number += 1;
                    inflight.extend(send(number, part));
                }
            }
            Some(r) = inflight.next(), if !inflight.is_empty() => {
                let (i, number, etag) = r?;
                done[i].push((number, etag));
            }
            else => break,
        }
    }
    for ((t, id), mut parts) in uploads.iter().zip(done) {
        parts.sort_by_key(|(n, _)| *n);
        t.complete_upload(key, id, parts)
            .await
            .map_err(|e| context(e, "completing the upload of", t, key))?;
    }
    Ok(())
}

/// The next part; an empty part is the end marker. A channel closed without
/// it means the producer failed: the object is incomplete.
async fn next_part(parts: &mut mpsc::Receiver<Bytes>, key: &str) -> Result<Bytes> {
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
    anyhow::Error::new(e).context(format!(
        "{what} {} to target {}",
        t.key(key),
        t.target().name
    ))
}
