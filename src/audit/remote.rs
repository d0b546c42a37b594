//! The copies of the log off the core: `<prefix>/<core>/audit/<first>-<last>.jsonl.age`
//! on every target of the zone, encrypted to the zone's recipients.
//!
//! At the end of every run that writes, the records that a target does not
//! hold yet go to it as one copy; `<state_dir>/audit.copied.json` remembers,
//! per target, the last record copied. A log rewritten on the core, chain and
//! all, no longer matches the copies (`audit verify --remote`), and a lost
//! log can be rebuilt from them (`audit pull`).
//!
//! A core whose targets hold copies of records that its own log never copied
//! is not the machine that wrote them (a reinstalled core, say): it refuses
//! to run before writing anything, so it never overwrites them with a new
//! chain. `audit pull` brings the log back first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use super::chain;
use super::log::{self, AuditLog, Line, Position};
use super::record::{Stored, canonical};
use crate::config::Target;
use crate::repository::audit_copies;
use crate::residency::Writable;
use crate::storage::{ReadBackend, WriteBackend};

const COPIED_FILE: &str = "audit.copied.json";

/// The last record copied to a target: its seq and hash. The hash ties the
/// local log to what the zone holds: a log that lost or rewrote copied
/// records no longer has it at that seq.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mark {
    pub seq: u64,
    pub hash: String,
    /// Where that record's line starts in the local log, so that a run reads
    /// the log from there and not from its start (absent in marks that
    /// `audit pull` made, or that an older zonevault wrote).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Position>,
}

impl Mark {
    /// Whether the log at `path` holds this mark's record where the mark
    /// says; `false` when the mark has no position or the line there is
    /// not that record.
    fn holds_at(&self, path: &Path) -> Result<bool> {
        let Some(at) = self.at else {
            return Ok(false);
        };
        Ok(log::record_at(path, at)?
            .is_some_and(|r| r.seq() == Some(self.seq) && r.hash() == Some(self.hash.as_str())))
    }
}

/// Per target, the last record copied to it.
pub type Copied = BTreeMap<String, Mark>;

fn copied_path(state_dir: &Path) -> PathBuf {
    state_dir.join(COPIED_FILE)
}

/// What `<state_dir>/audit.copied.json` says was copied (nothing when absent).
pub fn load_copied(state_dir: &Path) -> Result<Copied> {
    let path = copied_path(state_dir);
    match std::fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).with_context(|| format!("{} is damaged", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Copied::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn save_copied(state_dir: &Path, copied: &Copied) -> Result<()> {
    crate::state::write_atomic(&copied_path(state_dir), &serde_json::to_vec_pretty(copied)?)
}

/// Whether the log at `path` still holds every record that was copied, as
/// copied: `Some` names the first line where it does not.
pub fn marks_break(path: &Path, copied: &Copied) -> Result<Option<chain::Break>> {
    // Each mark read where it says it is: one line per target, not the
    // whole log. Only when one is not there is the log read whole, to name
    // the first line that breaks.
    let mut all_held = true;
    for mark in copied.values() {
        if !mark.holds_at(path)? {
            all_held = false;
            break;
        }
    }
    if all_held {
        return Ok(None);
    }
    let mut wanted: BTreeMap<u64, (&String, &Mark)> = BTreeMap::new();
    for (target, mark) in copied {
        wanted.entry(mark.seq).or_insert((target, mark));
    }
    let mut count = 0;
    for line in log::lines(path)? {
        let line = line?;
        count = line.number;
        let Some(record) = Stored::parse(&line.text) else {
            continue;
        };
        if let Some((target, mark)) = record.seq().and_then(|s| wanted.remove(&s))
            && record.hash() != Some(mark.hash.as_str())
        {
            return Ok(Some(chain::Break {
                line: line.number,
                what: format!(
                    "differs from the record {} that was copied to target {target}: the log was rewritten after the copy",
                    mark.seq
                ),
            }));
        }
    }
    Ok(wanted.into_iter().next().map(|(seq, (target, _))| chain::Break {
        line: count + 1,
        what: format!(
            "missing: the log ends at record {count}, but records up to {seq} were copied to target {target} (records were removed from the end, or the log was replaced)"
        ),
    }))
}

/// Refuses a run whose log would start a second chain next to the zone's
/// copies: see the module docs. Call before the first write of a run.
pub async fn check_continuity<S: WriteBackend>(
    audit: &AuditLog,
    state_dir: &Path,
    targets: &[Writable<S>],
) -> Result<()> {
    let repair = "Move it and audit.copied.json aside and rebuild it from the zone's copies with `zonevault audit pull --identity FILE` (an operator's identity), then run again";
    // Reading the log (it can be long) is blocking work.
    let (path, dir) = (audit.path().to_path_buf(), state_dir.to_path_buf());
    let (copied, broken) = crate::blocking::run("checking the audit log's continuity", move || {
        let copied = load_copied(&dir)?;
        let broken = marks_break(&path, &copied)?;
        anyhow::Ok((copied, broken))
    })
    .await??;
    if let Some(b) = broken {
        bail!(
            "the audit log {} is not the log whose records were copied to the zone: line {}: {}. {repair}",
            audit.path().display(),
            b.line,
            b.what
        );
    }
    for t in targets {
        let remote = audit_copies::highest(t.store(), t.target(), audit.core()).await?;
        let local = copied.get(&t.target().name).map_or(0, |m| m.seq);
        if remote > local {
            bail!(
                "target {} holds copies of audit records up to {remote} of core {}, but this machine's audit log ({}) copied only up to {local}: it is not the log that wrote them. {repair}",
                t.target().name,
                audit.core(),
                audit.path().display()
            );
        }
    }
    Ok(())
}

/// Copies the records that each target lacks to it. Call at the end of a run,
/// after its last record.
///
/// A stop (`cancel`) is honoured between targets: the copy in flight ends,
/// the next targets wait for the next run (which copies what they lack), and
/// the result says [`CopyOutcome::Stopped`].
pub async fn copy<S: WriteBackend>(
    audit: &AuditLog,
    state_dir: &Path,
    targets: &[Writable<S>],
    recipients: &[age::x25519::Recipient],
    cancel: &CancellationToken,
) -> Result<CopyOutcome> {
    copy_in_chunks(audit, state_dir, targets, recipients, cancel, COPY_CHUNK).await
}

/// The most plain bytes of records in one copy: a run of 100,000 units
/// writes several copies rather than holding its records whole.
const COPY_CHUNK: usize = 4 << 20;

async fn copy_in_chunks<S: WriteBackend>(
    audit: &AuditLog,
    state_dir: &Path,
    targets: &[Writable<S>],
    recipients: &[age::x25519::Recipient],
    cancel: &CancellationToken,
    chunk: usize,
) -> Result<CopyOutcome> {
    let dir = state_dir.to_path_buf();
    let mut copied =
        crate::blocking::run("reading the audit copy marks", move || load_copied(&dir)).await??;
    // Per target, the last record it holds: the mark, or less when a run
    // stopped between saving the mark and writing the copy (copied again now).
    let mut done = Vec::new();
    for t in targets {
        let mark = copied.get(&t.target().name).map_or(0, |m| m.seq);
        let held = audit_copies::highest(t.store(), t.target(), audit.core()).await?;
        done.push(mark.min(held));
    }
    let from = done.iter().copied().min().unwrap_or(0);
    // Read from the mark of record `from` when one knows where it is: the
    // log grows with every run, and a run copies only its own records.
    let start = copied
        .values()
        .find(|m| m.seq == from)
        .and_then(|m| m.at)
        .filter(|_| from > 0);
    // Only what the log holds now: the copies' own records (written as they
    // go) wait for the next run's copy, so the loop ends.
    let end = std::fs::metadata(audit.path()).map_or(0, |m| m.len());
    let mut cursor = (from, start);
    loop {
        let path = audit.path().to_path_buf();
        let (after, at) = cursor;
        let Some(news) = crate::blocking::run("reading the audit log", move || {
            records_after(&path, after, at, chunk, end)
        })
        .await??
        else {
            return Ok(CopyOutcome::Done);
        };
        for (t, done) in targets.iter().zip(done.iter_mut()) {
            if cancel.is_cancelled() {
                return Ok(CopyOutcome::Stopped);
            }
            let records: Vec<&(u64, String)> =
                news.lines.iter().filter(|(seq, _)| *seq > *done).collect();
            let Some(&&(first, _)) = records.first() else {
                continue;
            };
            let mut plain = String::with_capacity(records.iter().map(|(_, l)| l.len() + 1).sum());
            for (_, line) in &records {
                plain.push_str(line);
                plain.push('\n');
            }
            copy_to(
                audit,
                state_dir,
                t,
                &mut copied,
                (first, &news.last),
                &plain,
                recipients,
            )
            .await?;
            *done = news.last.seq;
        }
        cursor = (news.last.seq, news.last.at);
    }
}

/// Writes one copy (records `first` to `last.seq`, as `plain`) to `t`.
async fn copy_to<S: WriteBackend>(
    audit: &AuditLog,
    state_dir: &Path,
    t: &Writable<S>,
    copied: &mut Copied,
    (first, last): (u64, &Mark),
    plain: &str,
    recipients: &[age::x25519::Recipient],
) -> Result<()> {
    // The mark goes first: a mark ahead of the zone is healed by the next
    // copy, a zone ahead of the mark would look like another machine's log.
    let name = t.target().name.clone();
    let before = copied.insert(name.clone(), last.clone());
    save_marks(state_dir, copied).await?;
    let put = audit_copies::write(t, audit.core(), (first, last.seq), plain, recipients).await;
    if let Err(e) = put {
        // Take the mark back only when the target surely lacks the copy:
        // a write can land and still fail (its record could not be
        // written, the answer was lost), and a zone ahead of the mark
        // would block every later run. A mark left ahead heals.
        let landed = audit_copies::highest(t.store(), t.target(), audit.core()).await;
        if matches!(landed, Ok(held) if held < last.seq) {
            match before {
                Some(mark) => copied.insert(name.clone(), mark),
                None => copied.remove(&name),
            };
            if let Err(undo) = save_marks(state_dir, copied).await {
                tracing::warn!(error = %format!("{undo:#}"), "cannot take back the audit copy mark; the next run copies the records again");
            }
        }
        return Err(e.context(format!("copying the audit log to target {name}")));
    }
    Ok(())
}

/// [`save_copied`] on the blocking pool (it fsyncs).
async fn save_marks(state_dir: &Path, copied: &Copied) -> Result<()> {
    let (dir, copied) = (state_dir.to_path_buf(), copied.clone());
    crate::blocking::run("saving the audit copy marks", move || {
        save_copied(&dir, &copied)
    })
    .await?
}

/// The whole records of the log after record `from`, up to about `max`
/// bytes, and the mark of the last one; `None` when there are none.
struct News {
    lines: Vec<(u64, String)>,
    last: Mark,
}

/// Reads the records after `from`, starting at `start` (the line of record
/// `from`) when it is known and still holds that record, else at the top;
/// stops after about `max` bytes, or at byte `end` of the log.
fn records_after(
    path: &Path,
    from: u64,
    start: Option<Position>,
    max: usize,
    end: u64,
) -> Result<Option<News>> {
    let lines = match start {
        Some(at) if log::record_at(path, at)?.is_some_and(|r| r.seq() == Some(from)) => {
            log::lines_at(path, at)?
        }
        _ => log::lines(path)?,
    };
    let mut news: Vec<(u64, String)> = Vec::new();
    let mut last: Option<Mark> = None;
    let mut bytes = 0;
    for line in lines {
        if bytes >= max {
            break;
        }
        let line = line?;
        if line.at.offset >= end {
            break;
        }
        let record = Stored::parse(&line.text);
        match record.as_ref().and_then(|r| r.seq().zip(r.hash())) {
            Some((seq, hash)) if seq > from && line.complete => {
                last = Some(Mark {
                    seq,
                    hash: hash.to_string(),
                    at: Some(line.at),
                });
                bytes += line.text.len() + 1;
                news.push((seq, line.text));
            }
            Some(_) => {}
            None => bail!(
                "line {} of the audit log {} is not a record; `zonevault audit verify` tells more",
                line.number,
                path.display()
            ),
        }
    }
    Ok(last.map(|last| News { lines: news, last }))
}

/// How far [`copy`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyOutcome {
    /// Every target holds every record.
    Done,
    /// Stopped between targets: some wait for the next run.
    Stopped,
}

/// One record as a copy holds it.
#[derive(Debug, Clone)]
struct CopiedRecord {
    target: String,
    key: String,
    fields: Map<String, Value>,
}

/// Every record that the copies on `stores` hold, by seq. Copies that
/// overlap must agree; a copy must be a chain of its own.
async fn fetch<S: ReadBackend>(
    stores: &[(Target, S)],
    core: &str,
    identities: &[Box<dyn age::Identity + Send + Sync>],
    identity_file: &Path,
) -> Result<(BTreeMap<u64, CopiedRecord>, BTreeMap<String, u64>)> {
    let mut merged: BTreeMap<u64, CopiedRecord> = BTreeMap::new();
    let mut highest: BTreeMap<String, u64> = BTreeMap::new();
    for (target, store) in stores {
        for object in audit_copies::list(store, target, core).await? {
            let (first, last) = (object.first, object.last);
            let where_ = format!("copy {} on target {}", object.key, target.name);
            let text = audit_copies::read(store, target, &object, identities)
                .await
                .map_err(|e| match e {
                    audit_copies::ReadError::NoMatchingKeys => anyhow::anyhow!(
                        "{} cannot decrypt {where_}: give an identity of this core's zone",
                        identity_file.display()
                    ),
                    audit_copies::ReadError::Other(e) => e,
                })?;
            let mut prev_hash: Option<String> = None;
            let mut expected = first;
            for line in text.lines() {
                let record = Stored::parse(line)
                    .filter(Stored::hash_holds)
                    .with_context(|| format!("{where_} holds a damaged record"))?;
                if record.seq() != Some(expected)
                    || prev_hash
                        .as_deref()
                        .is_some_and(|h| record.prev() != Some(h))
                {
                    bail!("{where_} is not a chain of records {first} to {last}");
                }
                prev_hash = record.hash().map(str::to_string);
                let copy = CopiedRecord {
                    target: target.name.clone(),
                    key: object.key.clone(),
                    fields: record.fields,
                };
                if let Some(other) = merged.get(&expected) {
                    if other.fields != copy.fields {
                        bail!(
                            "the copies disagree on record {expected}: {where_} and copy {} on target {}",
                            other.key,
                            other.target
                        );
                    }
                } else {
                    merged.insert(expected, copy);
                }
                expected += 1;
            }
            if expected != last + 1 {
                bail!("{where_} is not a chain of records {first} to {last}");
            }
            let h = highest.entry(target.name.clone()).or_insert(0);
            *h = (*h).max(last);
        }
    }
    Ok((merged, highest))
}

/// What `audit verify --remote` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RemoteReport {
    /// Records in the local log.
    pub local: u64,
    /// Per target, the highest record it holds a copy of.
    pub copied: BTreeMap<String, u64>,
}

/// Checks that the local log agrees with every copy in the zone. `Ok(Err)`
/// names the first line that does not.
pub async fn verify<S: ReadBackend>(
    state_dir: &Path,
    stores: &[(Target, S)],
    core: &str,
    identities: &[Box<dyn age::Identity + Send + Sync>],
    identity: &Path,
) -> Result<Result<RemoteReport, chain::Break>> {
    let path = &state_dir.join(log::FILE_NAME);
    let holds = match chain::verify_file(path)? {
        Ok(h) => h,
        Err(b) => return Ok(Err(b)),
    };
    let (remote, copied) = fetch(stores, core, identities, identity).await?;
    // copies deleted from a target since this machine wrote them
    for (target, mark) in load_copied(state_dir)? {
        let held = copied.get(&target).copied().unwrap_or(0);
        if held < mark.seq {
            return Ok(Err(chain::Break {
                line: mark.seq,
                what: format!(
                    "its copy is gone: target {target} holds copies up to record {held}, but records up to {} were copied to it (copies were deleted, or a run stopped while copying: the next backup copies them again)",
                    mark.seq
                ),
            }));
        }
    }
    let mut count = 0;
    for line in log::lines(path)? {
        let Line { number, text, .. } = line?;
        count = number;
        // The chain held when it was verified above, but the file may have
        // changed since (another process, an editor): a line that does not
        // parse now is a break, not a panic.
        let Some(local) = Stored::parse(&text) else {
            return Ok(Err(chain::Break {
                line: number,
                what:
                    "is not a record (the log changed while it was being compared with the copies)"
                        .into(),
            }));
        };
        if let Some(copy) = local.seq().and_then(|s| remote.get(&s))
            && copy.fields != local.fields
        {
            return Ok(Err(chain::Break {
                line: number,
                what: format!(
                    "differs from copy {} on target {}: the local log was rewritten",
                    copy.key, copy.target
                ),
            }));
        }
    }
    if let Some((&highest, copy)) = remote.last_key_value()
        && highest > count
    {
        return Ok(Err(chain::Break {
            line: count + 1,
            what: format!(
                "missing: the local log ends at record {count}, but copy {} on target {} holds records up to {highest} (records were removed from the end)",
                copy.key, copy.target
            ),
        }));
    }
    Ok(Ok(RemoteReport {
        local: holds.records,
        copied,
    }))
}

/// Rebuilds the local log from the zone's copies. Returns the number of
/// records the log holds afterwards.
///
/// A local log is either missing, or one that a fresh machine started and
/// never copied (its `check`, `restore` ...): its records are kept,
/// re-chained after the pulled ones. A log that was copied is the core's
/// own and is never replaced.
pub async fn pull<S: ReadBackend>(
    state_dir: &Path,
    stores: &[(Target, S)],
    core: &str,
    identities: &[Box<dyn age::Identity + Send + Sync>],
    identity: &Path,
) -> Result<u64> {
    let path = state_dir.join(log::FILE_NAME);
    if !load_copied(state_dir)?.is_empty() {
        bail!(
            "{} holds records that were copied to the zone: it is this core's log, not a lost one, and `audit pull` never replaces it; `zonevault audit verify --remote` compares it with the copies",
            path.display()
        );
    }
    let local_len = std::fs::metadata(&path).map_or(0, |m| m.len());
    let local: Vec<Map<String, Value>> = match chain::verify_file(&path)? {
        Ok(_) => log::read_lines(&path)?
            .into_iter()
            .filter_map(|l| Stored::parse(&l.text).map(|r| r.fields))
            .collect(),
        Err(b) => bail!(
            "{} is damaged (line {}: {}); move it aside, then pull again",
            path.display(),
            b.line,
            b.what
        ),
    };
    let (remote, highest) = fetch(stores, core, identities, identity).await?;
    if remote.is_empty() {
        bail!("the zone holds no audit copy of core {core}");
    }
    let mut lines: Vec<String> = remote
        .iter()
        .enumerate()
        .map(|(i, (seq, copy))| {
            if *seq != i as u64 + 1 {
                bail!(
                    "record {} is in no copy: the copies do not cover the whole log",
                    i + 1
                );
            }
            Ok(canonical(&Value::Object(copy.fields.clone())))
        })
        .collect::<Result<_>>()?;
    let check = lines.iter().enumerate().map(|(i, text)| {
        Ok(Line {
            number: i as u64 + 1,
            text: text.clone(),
            complete: true,
            at: Position::default(),
        })
    });
    if let Err(b) = chain::verify(check)? {
        bail!(
            "the copies do not form a valid chain: record {}: {}",
            b.line,
            b.what
        );
    }
    let copied: Copied = highest
        .into_iter()
        .map(|(target, seq)| {
            let hash = remote[&seq].fields["hash"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            (
                target,
                Mark {
                    seq,
                    hash,
                    at: None,
                },
            )
        })
        .collect();
    let mut prev = remote
        .last_key_value()
        .and_then(|(_, c)| c.fields["hash"].as_str())
        .unwrap_or_default()
        .to_string();
    for fields in local {
        let (line, hash) = super::record::reseal(fields, lines.len() as u64 + 1, &prev);
        lines.push(line);
        prev = hash;
    }
    crate::state::create_dir(state_dir)?;
    log::replace(&path, local_len, &lines)?;
    save_copied(state_dir, &copied)?;
    Ok(lines.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Event;
    use crate::testing::World;

    async fn records(w: &World, n: usize) {
        for i in 0..n {
            w.audit
                .record(Event::RunFailed {
                    command: "test".into(),
                    exit: 1,
                    failure: "other".into(),
                    reason: format!("record {i}"),
                })
                .await
                .unwrap();
        }
    }

    async fn copy_all(w: &World) -> CopyOutcome {
        copy_until(w, &CancellationToken::new()).await
    }

    async fn copy_until(w: &World, cancel: &CancellationToken) -> CopyOutcome {
        copy(
            &w.audit,
            &w.config.core.state_dir,
            &w.targets,
            &w.config.zone().recipients,
            cancel,
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_stop_ends_the_copy_between_targets_and_the_next_run_catches_up() {
        let w = World::new().await;
        records(&w, 3).await;
        let stop = CancellationToken::new();
        stop.cancel();
        assert_eq!(copy_until(&w, &stop).await, CopyOutcome::Stopped);
        for t in &w.targets {
            assert_eq!(
                audit_copies::highest(t.store(), t.target(), "core-ch-1")
                    .await
                    .unwrap(),
                0
            );
        }
        assert_eq!(copy_all(&w).await, CopyOutcome::Done);
        for t in &w.targets {
            assert!(
                audit_copies::highest(t.store(), t.target(), "core-ch-1")
                    .await
                    .unwrap()
                    >= 3
            );
        }
    }

    #[tokio::test]
    async fn a_run_copies_only_its_own_records_read_from_the_last_mark() {
        let w = World::new().await;
        records(&w, 3).await;
        copy_all(&w).await;
        let state = &w.config.core.state_dir;
        let first = load_copied(state).unwrap();
        let mark = first["ch-primary"].clone();
        assert!(mark.at.is_some(), "{mark:?}");
        assert!(mark.holds_at(w.audit.path()).unwrap());
        records(&w, 2).await;
        copy_all(&w).await;
        let second = load_copied(state).unwrap();
        for t in &w.targets {
            let copies = audit_copies::list(t.store(), t.target(), "core-ch-1")
                .await
                .unwrap();
            let ranges: Vec<(u64, u64)> = copies.iter().map(|c| (c.first, c.last)).collect();
            // the second copy starts after the first one's last record
            assert_eq!(ranges.len(), 2, "{ranges:?}");
            assert_eq!(ranges[1].0, ranges[0].1 + 1, "{ranges:?}");
            assert_eq!(ranges[1].1, second[&t.target().name].seq);
        }
        // the records after the first mark, read from its line, are the
        // ones read from the top
        let path = w.audit.path();
        let from_mark = records_after(path, mark.seq, mark.at, usize::MAX, u64::MAX)
            .unwrap()
            .unwrap();
        let from_top = records_after(path, mark.seq, None, usize::MAX, u64::MAX)
            .unwrap()
            .unwrap();
        assert_eq!(from_mark.lines, from_top.lines);
        assert_eq!(from_mark.last, from_top.last);
        assert!(marks_break(path, &second).unwrap().is_none());
    }

    #[tokio::test]
    async fn a_long_run_is_copied_in_bounded_chunks_that_chain() {
        let w = World::new().await;
        records(&w, 40).await;
        let state = &w.config.core.state_dir;
        let outcome = copy_in_chunks(
            &w.audit,
            state,
            &w.targets,
            &w.config.zone().recipients,
            &CancellationToken::new(),
            1000,
        )
        .await
        .unwrap();
        assert_eq!(outcome, CopyOutcome::Done);
        let marks = load_copied(state).unwrap();
        for t in &w.targets {
            let copies = audit_copies::list(t.store(), t.target(), "core-ch-1")
                .await
                .unwrap();
            assert!(copies.len() > 3, "{} copies", copies.len());
            // each copy starts where the one before ended, from record 1 to the mark
            let mut next = 1;
            for c in &copies {
                assert_eq!(c.first, next, "{copies:?}");
                next = c.last + 1;
            }
            assert_eq!(next - 1, marks[&t.target().name].seq);
        }
        // the next run goes on from there, in chunks again
        records(&w, 5).await;
        copy_all(&w).await;
        let marks = load_copied(state).unwrap();
        for t in &w.targets {
            let copies = audit_copies::list(t.store(), t.target(), "core-ch-1")
                .await
                .unwrap();
            let last = copies.iter().map(|c| c.last).max().unwrap();
            assert_eq!(last, marks[&t.target().name].seq);
        }
        assert!(marks_break(w.audit.path(), &marks).unwrap().is_none());
    }

    #[tokio::test]
    async fn a_mark_whose_line_moved_is_looked_for_in_the_whole_log() {
        let w = World::new().await;
        records(&w, 4).await;
        copy_all(&w).await;
        let path = w.audit.path();
        let mut copied = load_copied(&w.config.core.state_dir).unwrap();
        let mark = copied.get_mut("ch-primary").unwrap();
        let right = mark.clone();
        // a position that holds another record (the first line)
        mark.at = Some(Position { offset: 0, line: 1 });
        assert!(!mark.holds_at(path).unwrap());
        let wrong = mark.clone();
        // still no break: the record is in the log, found by the full read
        assert!(marks_break(path, &copied).unwrap().is_none());
        // and the records after it are the same as from the right position
        let lines = |m: &Mark| {
            records_after(path, m.seq, m.at, usize::MAX, u64::MAX)
                .unwrap()
                .map(|n| n.lines)
        };
        let after = lines(&right);
        assert!(after.is_some(), "the copy's own records come after it");
        assert_eq!(lines(&wrong), after);
        // a mark of a record the log does not hold is a break either way
        let gone = copied.get_mut("ch-primary").unwrap();
        gone.seq += 100;
        let broken = marks_break(path, &copied).unwrap().unwrap();
        assert!(broken.what.contains("missing"), "{}", broken.what);
    }
}
