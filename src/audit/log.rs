//! The local log, `<state_dir>/audit.jsonl`: appending a record, durably and
//! safely beside other zonevault processes, and reading the lines back.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{Context, Result, bail};
use chrono::SecondsFormat;

use super::record::{self, Event, GENESIS, Stored};
use crate::config::Config;
use crate::lock::flock;

/// The file name of the log inside the state dir.
pub const FILE_NAME: &str = "audit.jsonl";

/// An open audit log. Appends are serialized inside the process and between
/// processes by `flock` on the file, so records of concurrent zonevault
/// processes never interleave, tear or share a `seq`.
///
/// Appends made at the same time share one write and one fsync (group
/// commit): the first caller writes every record queued so far, the others
/// wait for it. A backup of thousands of units thus pays for a few hundred
/// fsyncs, not thousands, and each record is still on disk before its
/// `append` returns.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    core: String,
    zone: String,
    file: File,
    queue: Mutex<Queue>,
    written: Condvar,
}

/// Records waiting to be written, and the outcome of those written.
#[derive(Debug, Default)]
struct Queue {
    next_ticket: u64,
    pending: Vec<(u64, Event)>,
    /// Whether a caller is writing a batch now.
    writing: bool,
    /// Ticket → seq of the record, or why it could not be written.
    done: HashMap<u64, Result<u64, String>>,
}

impl AuditLog {
    /// Opens (creating it, and the state dir, if needed) the log of `core`.
    pub fn open(state_dir: &Path, core: &str, zone: &str) -> Result<AuditLog> {
        crate::state::create_dir(state_dir)?;
        let path = state_dir.join(FILE_NAME);
        let existed = path.exists();
        let file = File::options()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open the audit log {}", path.display()))?;
        if !existed {
            crate::state::sync_parent(&path)?;
        }
        Ok(AuditLog {
            path,
            core: core.to_string(),
            zone: zone.to_string(),
            file,
            queue: Mutex::new(Queue::default()),
            written: Condvar::new(),
        })
    }

    /// Opens the log of the configured core and records that `command`
    /// loaded this configuration (with the BLAKE3 of both files).
    pub fn start(config: &Config, command: &str) -> Result<AuditLog> {
        let log = AuditLog::open(
            &config.core.state_dir,
            &config.core.core_id,
            &config.zone().id,
        )?;
        log.append(&Event::ConfigLoaded {
            command: command.to_string(),
            core_config: config.path.display().to_string(),
            core_config_blake3: config.digests.core.clone(),
            zone_map: config.core.zone_map.display().to_string(),
            zone_map_blake3: config.digests.zone_map.clone(),
        })?;
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn core(&self) -> &str {
        &self.core
    }

    /// Appends one record and returns its `seq` once it is on disk (fsync).
    /// Callers report an action done only after its record is appended.
    /// Blocks: from async code, use [`AuditLog::record`].
    pub fn append(&self, event: &Event) -> Result<u64> {
        let mut queue = self.queue();
        let ticket = queue.next_ticket;
        queue.next_ticket += 1;
        queue.pending.push((ticket, event.clone()));
        loop {
            if let Some(done) = queue.done.remove(&ticket) {
                return done.map_err(anyhow::Error::msg);
            }
            if queue.writing {
                queue = self.written.wait(queue).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // Nobody is writing: write everything queued, ours included.
            queue.writing = true;
            let batch = std::mem::take(&mut queue.pending);
            drop(queue);
            // A panic while writing must not leave the others waiting forever.
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.write_batch(&batch)))
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the audit writer panicked")))
                    .map_err(|e| format!("{e:#}"));
            queue = self.queue();
            for (i, (t, _)) in batch.iter().enumerate() {
                let seq = outcome.as_ref().map(|first| first + i as u64);
                queue.done.insert(*t, seq.map_err(Clone::clone));
            }
            queue.writing = false;
            self.written.notify_all();
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves a queue that is still consistent.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// [`AuditLog::append`] on a blocking thread, for async code: the fsync
    /// never stalls the runtime.
    pub async fn record(self: &Arc<Self>, event: Event) -> Result<u64> {
        let log = Arc::clone(self);
        crate::blocking::run("the audit writer", move || log.append(&event)).await?
    }

    /// Records that `command` failed with `error` (its kind, exit code and
    /// message). A failure to record is logged: the command's own error is
    /// what the operator must see.
    pub async fn record_failure(self: &Arc<Self>, command: &str, error: &crate::Error) {
        let event = Event::RunFailed {
            command: command.to_string(),
            exit: error.exit().code(),
            failure: error.reason().as_str().to_string(),
            reason: error.to_string(),
        };
        if let Err(e) = self.record(event).await {
            tracing::error!(error = %format!("{e:#}"), "cannot record the failure in the audit log");
        }
    }

    /// `result`, with its failure on record (see [`AuditLog::record_failure`]).
    pub async fn failing<T>(
        self: &Arc<Self>,
        command: &str,
        result: crate::Result<T>,
    ) -> crate::Result<T> {
        if let Err(e) = &result {
            self.record_failure(command, e).await;
        }
        result
    }

    /// Writes `batch` under the file lock; returns the seq of its first record.
    fn write_batch(&self, batch: &[(u64, Event)]) -> Result<u64> {
        flock(&self.file, libc::LOCK_EX)
            .with_context(|| format!("cannot lock the audit log {}", self.path.display()))?;
        let written = self.write_locked(batch);
        // The lock also goes when the file is closed; unlocking now lets the
        // other processes go on.
        let _ = flock(&self.file, libc::LOCK_UN);
        written
    }

    fn write_locked(&self, batch: &[(u64, Event)]) -> Result<u64> {
        let (first, mut prev) = match last_record(&self.file, &self.path)? {
            Some((seq, hash)) => (seq + 1, hash),
            None => (1, GENESIS.to_string()),
        };
        let time = chrono::Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        let mut lines = String::new();
        for (i, (_, event)) in batch.iter().enumerate() {
            let seq = first + i as u64;
            let (line, hash) = record::seal(event, seq, &time, &self.core, &self.zone, &prev);
            lines.push_str(&line);
            lines.push('\n');
            prev = hash;
        }
        // The length before the batch: a failed write is cut back to it, so
        // the log never ends in a torn line and no record of the batch (none
        // of which is reported written) stays behind.
        let before = self
            .file
            .metadata()
            .with_context(|| format!("cannot read the audit log {}", self.path.display()))?
            .len();
        let written = (&self.file)
            .write_all(lines.as_bytes())
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            let state_dir = self.path.parent().unwrap_or(Path::new("."));
            let hint = if e.raw_os_error() == Some(libc::ENOSPC) {
                format!(
                    "; free space in the state directory {}: the next run goes on from there",
                    state_dir.display()
                )
            } else {
                String::new()
            };
            return match self.cut_back(before) {
                Ok(()) => Err(anyhow::Error::new(e).context(format!(
                    "cannot write to the audit log {} (the log was cut back to its last whole record{hint})",
                    self.path.display()
                ))),
                Err(cut) => Err(anyhow::Error::new(e).context(format!(
                    "cannot write to the audit log {}, nor cut it back to its last whole record ({cut}): `zonevault audit verify` names the damaged line",
                    self.path.display()
                ))),
            };
        }
        Ok(first)
    }

    /// Cuts the log back to `len` bytes, durably: what a failed batch left.
    fn cut_back(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)?;
        self.file.sync_all()
    }
}

/// The `seq` and `hash` of the last record of the log, `None` when empty.
fn last_record(file: &File, path: &Path) -> Result<Option<(u64, String)>> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    // Read backwards until the line before the last one ends.
    let mut tail: Vec<u8> = Vec::new();
    let mut pos = len;
    loop {
        let chunk = pos.min(64 << 10);
        pos -= chunk;
        let mut buf = vec![0; chunk as usize];
        file.read_exact_at(&mut buf, pos)?;
        buf.extend_from_slice(&tail);
        tail = buf;
        if pos == 0 || tail[..tail.len() - 1].contains(&b'\n') {
            break;
        }
    }
    let damaged = |what: &str| {
        anyhow::anyhow!(
            "the audit log {} {what}; nothing is appended to a damaged log: `zonevault audit verify` names the bad line; move the log aside and rebuild it with `zonevault audit pull --identity FILE`",
            path.display()
        )
    };
    if tail.last() != Some(&b'\n') {
        return Err(damaged("ends in a partial line"));
    }
    let body = &tail[..tail.len() - 1];
    let start = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let last = std::str::from_utf8(&body[start..])
        .ok()
        .and_then(Stored::parse)
        .ok_or_else(|| damaged("ends in a line that is not a record"))?;
    match (last.seq(), last.hash()) {
        (Some(seq), Some(hash)) => Ok(Some((seq, hash.to_string()))),
        _ => Err(damaged("ends in a record without seq or hash")),
    }
}

/// One line of a log as read back.
#[derive(Debug)]
pub struct Line {
    /// 1-based line number.
    pub number: u64,
    pub text: String,
    /// Whether the line ended with a newline (the last one may not).
    pub complete: bool,
    /// Where the line starts.
    pub at: Position,
}

/// Where a line of the log starts: its byte offset and line number. The
/// log only grows (a torn tail is cut back to the last whole record), so a
/// position once read stays the position of that line; a reader checks
/// that the line there is the record it expects before it trusts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub offset: u64,
    /// The number of the line (1-based).
    pub line: u64,
}

/// The lines of the log at `path`, in order, streamed. A missing log has none.
/// Holds a shared lock on the log until the iterator is dropped: do not
/// append from the same thread meanwhile.
pub fn lines(path: &Path) -> Result<Lines> {
    lines_at(path, Position { offset: 0, line: 1 })
}

/// The lines of the log at `path` from `at` on (see [`lines`]).
pub fn lines_at(path: &Path, at: Position) -> Result<Lines> {
    let reader = match File::open(path) {
        Ok(f) => {
            // A shared lock: appends (exclusive) wait until the reading is
            // done, so a half-written batch is never read as a torn line.
            flock(&f, libc::LOCK_SH)
                .with_context(|| format!("cannot lock the audit log {}", path.display()))?;
            let mut reader = BufReader::with_capacity(256 << 10, f);
            reader
                .seek(std::io::SeekFrom::Start(at.offset))
                .with_context(|| format!("cannot read the audit log {}", path.display()))?;
            Some(reader)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read the audit log {}", path.display()));
        }
    };
    Ok(Lines {
        reader,
        path: path.to_path_buf(),
        next: at,
    })
}

/// The whole record on the line at `at`, if that line is one.
pub fn record_at(path: &Path, at: Position) -> Result<Option<Stored>> {
    let Some(line) = lines_at(path, at)?.next().transpose()? else {
        return Ok(None);
    };
    Ok(Stored::parse(&line.text).filter(|_| line.complete))
}

/// Iterator over the lines of a log; see [`lines`].
pub struct Lines {
    reader: Option<BufReader<File>>,
    path: PathBuf,
    /// Where the next line starts.
    next: Position,
}

impl Iterator for Lines {
    type Item = Result<Line>;

    fn next(&mut self) -> Option<Result<Line>> {
        let reader = self.reader.as_mut()?;
        let mut buf = Vec::new();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => None,
            Ok(n) => {
                let at = self.next;
                self.next = Position {
                    offset: at.offset + n as u64,
                    line: at.line + 1,
                };
                let complete = buf.last() == Some(&b'\n');
                if complete {
                    buf.pop();
                }
                Some(Ok(Line {
                    number: at.line,
                    text: String::from_utf8_lossy(&buf).into_owned(),
                    complete,
                    at,
                }))
            }
            Err(e) => {
                self.reader = None;
                Some(Err(anyhow::Error::new(e).context(format!(
                    "cannot read the audit log {}",
                    self.path.display()
                ))))
            }
        }
    }
}

/// Every line of the log at `path`.
pub fn read_lines(path: &Path) -> Result<Vec<Line>> {
    lines(path)?.collect()
}

/// Replaces the log at `path` (which was `expected_len` bytes long when its
/// records were read, 0 when missing) with `lines`, each without its newline.
/// Holds the log's lock meanwhile, so no append is lost between the read and
/// the replacement. Used by `audit pull`.
pub fn replace(path: &Path, expected_len: u64, lines: &[String]) -> Result<()> {
    let current = File::options()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    flock(&current, libc::LOCK_EX).with_context(|| format!("cannot lock {}", path.display()))?;
    if current.metadata()?.len() != expected_len {
        bail!(
            "{} changed while the copies were read; run `audit pull` again",
            path.display()
        );
    }
    let mut text = String::new();
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    crate::state::write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use zonevault_testkit::tmpfs::{Tmpfs, fill};

    fn failed(n: u8) -> Event {
        Event::RunFailed {
            command: "test".into(),
            exit: n,
            failure: "other".into(),
            reason: format!("reason {n}"),
        }
    }

    #[test]
    fn appends_chain_records_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), "core-1", "ch").unwrap();
        assert_eq!(log.append(&failed(1)).unwrap(), 1);
        assert_eq!(log.append(&failed(2)).unwrap(), 2);
        drop(log);
        let log = AuditLog::open(dir.path(), "core-1", "ch").unwrap();
        assert_eq!(log.append(&failed(3)).unwrap(), 3);
        let lines = read_lines(log.path()).unwrap();
        let records: Vec<Stored> = lines
            .iter()
            .map(|l| Stored::parse(&l.text).unwrap())
            .collect();
        assert_eq!(records[0].prev(), Some(GENESIS));
        for pair in records.windows(2) {
            assert_eq!(pair[1].prev(), pair[0].hash());
        }
        assert!(records.iter().all(Stored::hash_holds));
        assert_eq!(records[2].str("core"), Some("core-1"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(log.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn threads_appending_at_once_get_distinct_consecutive_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), "c", "z").unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let log = &log;
                s.spawn(move || {
                    for _ in 0..50 {
                        log.append(&failed(t)).unwrap();
                    }
                });
            }
        });
        let lines = read_lines(log.path()).unwrap();
        assert_eq!(lines.len(), 200);
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(Stored::parse(&l.text).unwrap().seq(), Some(i as u64 + 1));
        }
    }

    #[test]
    fn a_full_disk_never_tears_the_log_and_freeing_space_is_enough() {
        let dir = tempfile::tempdir().unwrap();
        let _fs = Tmpfs::mount(dir.path(), "256k");
        let log = Arc::new(AuditLog::open(dir.path(), "c", "z").unwrap());
        log.append(&failed(0)).unwrap();
        let ballast = fill(dir.path(), 8 << 10);
        // appends from several threads at once (so batches of several
        // records fail together) until the disk is full
        let results: Vec<Result<u64>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    let log = &log;
                    s.spawn(move || (0..200).map(|_| log.append(&failed(t))).collect::<Vec<_>>())
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let ok: Vec<u64> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        let errors: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| format!("{e:#}")))
            .collect();
        assert!(
            !ok.is_empty() && !errors.is_empty(),
            "the disk filled partway"
        );
        let e = &errors[0];
        assert!(e.contains("No space left on device"), "{e}");
        assert!(e.contains("cut back to its last whole record"), "{e}");
        assert!(
            e.contains(&dir.path().display().to_string()),
            "names the state dir: {e}"
        );
        // the chain holds, and holds exactly the records reported written
        let holds = crate::audit::chain::verify_file(log.path())
            .unwrap()
            .unwrap();
        assert_eq!(holds.records, ok.len() as u64 + 1);
        let lines = read_lines(log.path()).unwrap();
        let mut seqs: Vec<u64> = ok.clone();
        seqs.sort();
        let on_disk: Vec<u64> = lines[1..]
            .iter()
            .map(|l| Stored::parse(&l.text).unwrap().seq().unwrap())
            .collect();
        assert_eq!(on_disk, seqs, "every reported seq is on disk, no other");
        // space freed: the same log (and a new process's) goes on
        std::fs::remove_file(ballast).unwrap();
        let next = log.append(&failed(9)).unwrap();
        assert_eq!(next, ok.len() as u64 + 2);
        drop(log);
        let log = AuditLog::open(dir.path(), "c", "z").unwrap();
        log.append(&failed(10)).unwrap();
        assert!(
            crate::audit::chain::verify_file(log.path())
                .unwrap()
                .is_ok()
        );
    }

    #[test]
    fn a_log_ending_in_a_partial_line_takes_no_more_records() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), "c", "z").unwrap();
        log.append(&failed(1)).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(log.path())
            .unwrap()
            .write_all(b"{\"seq\":2,")
            .unwrap();
        let e = format!("{:#}", log.append(&failed(2)).unwrap_err());
        assert!(e.contains("ends in a partial line"), "{e}");
    }
}
