//! One job: capture one live SQLite database as one self-contained,
//! transaction-consistent file, through SQLite's own online backup API.
//!
//! - A database is recognised by its 16-byte header `SQLite format 3\0`
//!   ([`is_database`]), never by its name.
//! - The source is opened read-only by its path (SQLite finds the `-wal` and
//!   `-shm` beside a database by name, so a descriptor path such as
//!   `/proc/self/fd/N` would lose the commits still in the `-wal`), with
//!   `SQLITE_OPEN_NOFOLLOW` (a path with a symlink in it is refused; the
//!   bundled SQLite opens every file `O_NOFOLLOW`). Then the descriptor
//!   SQLite holds is checked: its (device, inode) must be the file the walk
//!   opened through descriptors, and the `-wal` SQLite opened must be the
//!   `-wal` entry of the walk's verified directory. Anything else is
//!   "changed during the walk": skipped, never read.
//! - A WAL database is read inside one read transaction (writers are never
//!   blocked by a WAL reader; passive checkpoints go on up to it); a
//!   rollback-journal database is copied in steps, each holding its shared
//!   lock for one step only.
//! - The copy goes to a 0600 file in `<state_dir>/tmp` (0700), is switched to
//!   `journal_mode = DELETE` (no `-wal` needed to open it), and is deleted
//!   when the [`TempCopy`] is dropped, right after the tar has it.
//! - A database busy (`SQLITE_BUSY`/`SQLITE_LOCKED`) for longer than the
//!   volume's `sqlite_busy_timeout` fails the capture naming the file.
//! - A file with the header that SQLite cannot read as a database
//!   (`SQLITE_NOTADB`, `SQLITE_CORRUPT`) is [`Capture::NotADatabase`]: the
//!   caller stores it as a plain file, with a warning.

use std::ffi::c_void;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::BorrowedFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, ErrorCode, OpenFlags, ffi};

/// The first 16 bytes of every SQLite database file.
pub const HEADER: &[u8; 16] = b"SQLite format 3\0";

/// Pages copied per backup step (4 MiB at 4 KiB pages).
const PAGES_PER_STEP: i32 = 1024;

/// A database up to this size (pages × page size, read in its transaction)
/// is copied into memory rather than into `<state_dir>/tmp`: no file to
/// create, write and remove. Memory stays bounded: a unit in flight holds
/// one copy at a time, so at most `--jobs` × this.
pub const IN_MEMORY_MAX: u64 = 4 << 20;

/// A rollback-journal database that keeps changing is restarted this many
/// times in steps, then copied in one step (one shared lock).
const MAX_RESTARTS: u32 = 8;

/// Whether the open regular file `file` of `size` bytes starts with a
/// SQLite database header (read at offset 0: the file position is left alone).
pub fn is_database(file: &File, size: u64) -> io::Result<bool> {
    if size < 512 {
        return Ok(false);
    }
    let mut head = [0u8; 24];
    let mut read = 0;
    while read < head.len() {
        match file.read_at(&mut head[read..], read as u64)? {
            0 => return Ok(false),
            n => read += n,
        }
    }
    // the rest of what every database's header holds: a page size (a power
    // of two from 512 to 65536, 1 meaning 65536) and the fixed payload
    // fractions 64, 32, 32. A file that only starts with the magic string is
    // never handed to SQLite (which would create a -shm beside it).
    let page = u32::from(u16::from_be_bytes([head[16], head[17]]));
    let page_ok = page == 1 || (page.is_power_of_two() && (512..=32768).contains(&page));
    Ok(&head[..16] == HEADER && page_ok && head[21..24] == [64, 32, 32])
}

/// Whether `file` starts with the 16-byte magic string.
pub fn has_magic(file: &File) -> io::Result<bool> {
    let mut head = [0u8; 16];
    let n = file.read_at(&mut head, 0)?;
    Ok(n == 16 && &head == HEADER)
}

/// `<state_dir>/tmp`, where the copies of databases live while they are archived.
pub fn tmp_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("tmp")
}

/// Creates `<state_dir>/tmp` (0700) and removes what a crashed run left in
/// it. Returns the directory and the number of leftovers removed.
pub fn prepare_tmp(state_dir: &Path) -> Result<(PathBuf, usize)> {
    let dir = tmp_dir(state_dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting the mode of {}", dir.display()))?;
    let mut removed = 0;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        let gone = if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        gone.with_context(|| format!("removing the leftover {}", path.display()))?;
        removed += 1;
    }
    if removed > 0 {
        tracing::info!(dir = %dir.display(), removed, "removed the temporary copies a crashed run left");
    }
    Ok((dir, removed))
}

/// A consistent copy of a database: in memory (small ones) or a file in the
/// temp dir, deleted when dropped.
#[derive(Debug)]
pub struct TempCopy {
    /// The file copy (none for one in memory).
    path: Option<PathBuf>,
    file: Option<File>,
    image: Vec<u8>,
    pub size: u64,
}

impl TempCopy {
    /// The copy's bytes, from the start.
    pub fn reader(&self) -> CopyReader<'_> {
        match &self.file {
            Some(f) => CopyReader::File(f),
            None => CopyReader::Memory(&self.image),
        }
    }

    /// Whether the copy is a file in the temp dir.
    pub fn on_disk(&self) -> bool {
        self.file.is_some()
    }
}

/// Reads a [`TempCopy`].
pub enum CopyReader<'a> {
    File(&'a File),
    Memory(&'a [u8]),
}

impl Read for CopyReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            CopyReader::File(f) => f.read(buf),
            CopyReader::Memory(m) => m.read(buf),
        }
    }
}

impl Drop for TempCopy {
    fn drop(&mut self) {
        let Some(path) = &self.path else {
            return;
        };
        for p in [
            path.clone(),
            with_suffix(path, "-journal"),
            with_suffix(path, "-wal"),
            with_suffix(path, "-shm"),
        ] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// What capturing a file with the SQLite header gave.
#[derive(Debug)]
pub enum Capture {
    Copied(TempCopy),
    /// SQLite cannot read it as a database: why.
    NotADatabase(String),
    /// The file SQLite opened is not the one the walk saw: why.
    Changed(String),
}

/// Where the source is and what the walk verified about it.
pub struct Source<'a> {
    /// Full path of the database.
    pub path: &'a Path,
    /// (device, inode) of the database as the walk opened it.
    pub id: (u64, u64),
    /// (device, inode) of its `-wal` in the walk's directory now, if there
    /// is one (asked once SQLite has opened it).
    pub wal: &'a dyn Fn() -> Option<(u64, u64)>,
}

/// A database copied into memory grew past twice [`IN_MEMORY_MAX`] while
/// copied (a rollback-journal database written to between steps): the copy
/// starts again, into the temp dir.
#[derive(Debug, thiserror::Error)]
#[error("the database grew past the in-memory bound while copied")]
struct GrewPastMemory;

/// Copies the database at `source` into memory or a new file of `tmp`.
pub fn capture(source: &Source<'_>, tmp: &Path, busy_timeout: Duration) -> Result<Capture> {
    let path = source.path;
    let copied = match copy(source, tmp, busy_timeout, IN_MEMORY_MAX) {
        Err(e) if e.is::<GrewPastMemory>() => copy(source, tmp, busy_timeout, 0),
        other => other,
    };
    match copied {
        Ok(c) => Ok(c),
        Err(e) => {
            let code = e.chain().find_map(|c| {
                c.downcast_ref::<rusqlite::Error>()
                    .and_then(|e| e.sqlite_error_code())
            });
            match code {
                Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
                    Ok(Capture::NotADatabase(format!("{e:#}")))
                }
                Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Err(e.context(
                    format!(
                        "{} stayed busy (locked by another process) for longer than sqlite_busy_timeout = {}",
                        path.display(),
                        humantime::format_duration(busy_timeout)
                    ),
                )),
                _ => Err(e.context(format!(
                    "cannot copy the SQLite database {}",
                    path.display()
                ))),
            }
        }
    }
}

/// Copies the database: into memory when it is at most `memory_max` bytes
/// when the copy starts (and stays within twice that), else into `tmp`.
fn copy(
    source: &Source<'_>,
    tmp: &Path,
    busy_timeout: Duration,
    memory_max: u64,
) -> Result<Capture> {
    let deadline = Instant::now() + busy_timeout;
    let src = Connection::open_with_flags(
        source.path,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NOFOLLOW
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    src.busy_timeout(busy_timeout)?;
    if let Some(why) = check_fd(
        &src,
        ffi::SQLITE_FCNTL_FILE_POINTER,
        Some(source.id),
        "database",
    ) {
        return Ok(Capture::Changed(why));
    }
    // The journal mode as the file says; a WAL database is read in one read
    // transaction (which never blocks a writer).
    let mode: String = retry(deadline, || {
        src.query_row("PRAGMA journal_mode", [], |r| r.get(0))
    })?;
    let wal = mode.eq_ignore_ascii_case("wal");
    if wal {
        retry(deadline, || {
            src.execute_batch("BEGIN; SELECT count(*) FROM sqlite_schema;")
        })?;
        if let Some(why) = check_fd(
            &src,
            ffi::SQLITE_FCNTL_JOURNAL_POINTER,
            (source.wal)(),
            "-wal",
        ) {
            return Ok(Capture::Changed(why));
        }
    }

    let (size, page_size): (i64, i64) = retry(deadline, || {
        src.query_row(
            "SELECT page_count * page_size, page_size FROM pragma_page_count(), pragma_page_size()",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    })?;
    let mut copy = TempCopy {
        path: None,
        file: None,
        image: Vec::new(),
        size: 0,
    };
    let in_memory = u64::try_from(size).is_ok_and(|s| s <= memory_max);
    let mut dest = if in_memory {
        Connection::open_in_memory()?
    } else {
        let dest_path = tmp.join(format!("{}.db", random_name()));
        let copy_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&dest_path)
            .with_context(|| format!("creating {}", dest_path.display()))?;
        copy.path = Some(dest_path.clone());
        copy.file = Some(copy_file);
        Connection::open_with_flags(
            &dest_path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_NOFOLLOW
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?
    };
    dest.execute_batch("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;")?;
    {
        let backup = rusqlite::backup::Backup::new(&src, &mut dest)?;
        let (mut restarts, mut last_remaining) = (0u32, i32::MAX);
        let mut busy_since: Option<Instant> = None;
        loop {
            // In memory, the copy holds every page: a database that grew
            // meanwhile goes to disk instead (the pages to copy are the
            // source's page count, known after the first step).
            let pages_now = u64::try_from(backup.progress().pagecount).unwrap_or(0);
            if in_memory
                && pages_now * u64::try_from(page_size).unwrap_or(0) > memory_max.saturating_mul(2)
            {
                return Err(GrewPastMemory.into());
            }
            let pages = if restarts >= MAX_RESTARTS {
                -1
            } else {
                PAGES_PER_STEP
            };
            use rusqlite::backup::StepResult;
            match backup.step(pages)? {
                StepResult::Done => break,
                StepResult::More => {
                    busy_since = None;
                    let remaining = backup.progress().remaining;
                    if remaining > last_remaining {
                        restarts += 1; // another process changed it: started over
                    }
                    last_remaining = remaining;
                }
                StepResult::Busy | StepResult::Locked => {
                    let since = *busy_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= busy_timeout {
                        return Err(rusqlite::Error::SqliteFailure(
                            ffi::Error::new(ffi::SQLITE_BUSY),
                            Some("the backup step stayed busy".into()),
                        )
                        .into());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => bail!("unexpected backup step result"),
            }
        }
    }
    if wal {
        src.execute_batch("COMMIT")?;
    }
    drop(src);
    if copy.file.is_none() {
        let mut image = dest.serialize(rusqlite::MAIN_DB)?.to_vec();
        // The copy carries the source's header. Bytes 18 and 19 are the
        // file format's write and read versions: 2 is WAL, 1 a rollback
        // journal. The copy is whole (no -wal), so it says 1 — what
        // `PRAGMA journal_mode = DELETE` writes for a copy on disk.
        if image.len() < 100 || &image[..16] != HEADER {
            bail!(
                "the in-memory copy of {} is not a database image",
                source.path.display()
            );
        }
        if image[18] == 2 && image[19] == 2 {
            image[18] = 1;
            image[19] = 1;
        }
        copy.size = image.len() as u64;
        copy.image = image;
        return Ok(Capture::Copied(copy));
    }
    // the copy carries the source's header: make it a rollback-journal
    // database that needs no -wal, and check it reads back so
    let mode: String = dest.query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("delete") {
        bail!(
            "the copy of {} stays in journal mode {mode}",
            source.path.display()
        );
    }
    dest.close().map_err(|(_, e)| e)?;
    let file = copy.file.as_ref().expect("a copy on disk");
    copy.size = file.metadata()?.len();
    Ok(Capture::Copied(copy))
}

/// Runs `f`, again while SQLite says busy or locked, until `deadline`.
fn retry<T>(deadline: Instant, mut f: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    loop {
        match f() {
            Err(e)
                if matches!(
                    e.sqlite_error_code(),
                    Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// The head of SQLite's `unixFile` (os_unix.c of the bundled SQLite): what
/// `SQLITE_FCNTL_FILE_POINTER` / `_JOURNAL_POINTER` point to.
#[repr(C)]
struct UnixFileHead {
    methods: *const c_void,
    vfs: *const c_void,
    inode: *const c_void,
    h: std::ffi::c_int,
}

/// Checks that the file SQLite holds (`op`: the database or its journal/WAL)
/// is `want`; `None` wants no such file open. Returns why not, if not.
fn check_fd(conn: &Connection, op: i32, want: Option<(u64, u64)>, what: &str) -> Option<String> {
    let mut ptr: *mut ffi::sqlite3_file = std::ptr::null_mut();
    // SAFETY: the handle is valid while `conn` lives; the file control
    // writes one pointer to `ptr`.
    let rc = unsafe {
        ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            op,
            (&raw mut ptr).cast::<c_void>(),
        )
    };
    // SAFETY: a non-null pointer is SQLite's open file of the default unix
    // VFS, whose head is `UnixFileHead`; `methods` is null when not open.
    let fd = (rc == ffi::SQLITE_OK && !ptr.is_null())
        .then(|| unsafe { &*ptr.cast::<UnixFileHead>() })
        .filter(|f| !f.methods.is_null() && f.h >= 0)
        .map(|f| f.h);
    let found = fd.and_then(|fd| {
        // SAFETY: SQLite keeps the descriptor open while `conn` lives.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        rustix::fs::fstat(fd).ok().map(|st| (st.st_dev, st.st_ino))
    });
    match (want, found) {
        (Some(w), Some(f)) if w == f => None,
        (None, None) => None,
        (w, f) => Some(format!(
            "the {what} SQLite opened ({f:?}) is not the one the walk saw ({w:?})"
        )),
    }
}

fn random_name() -> String {
    use rand::Rng;
    let n: u128 = rand::thread_rng().r#gen();
    format!("{n:032x}")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A WAL database of `rows` rows of 1 kB, its last rows only in the
    /// `-wal` (kept open by the returned writer).
    fn wal_db(path: &Path, rows: i64) -> Connection {
        let c = Connection::open(path).unwrap();
        c.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;
             CREATE TABLE t (id INTEGER PRIMARY KEY, pad BLOB);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
             INSERT INTO t SELECT i, randomblob(1000) FROM n;"
        ))
        .unwrap();
        c
    }

    fn id(path: &Path) -> Option<(u64, u64)> {
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }

    #[test]
    fn small_databases_are_copied_in_memory_large_ones_to_the_temp_dir() {
        let dir = tempfile::tempdir().unwrap();
        let (tmp, _) = prepare_tmp(dir.path()).unwrap();
        for (rows, in_memory) in [(200, true), (6_000, false)] {
            let path = dir.path().join(format!("db-{rows}.sqlite"));
            let _writer = wal_db(&path, rows);
            let wal_path = with_suffix(&path, "-wal");
            assert!(
                std::fs::metadata(&wal_path).unwrap().len() > 0,
                "data in the -wal"
            );
            let wal = || id(&wal_path);
            let source = Source {
                path: &path,
                id: id(&path).unwrap(),
                wal: &wal,
            };
            let Capture::Copied(copy) = capture(&source, &tmp, Duration::from_secs(5)).unwrap()
            else {
                panic!("not copied");
            };
            assert_eq!(copy.on_disk(), !in_memory, "{rows} rows");
            let mut image = Vec::new();
            copy.reader().read_to_end(&mut image).unwrap();
            assert_eq!(image.len() as u64, copy.size);
            // the copy alone, with no -wal beside it, is the whole database
            let restored = dir.path().join(format!("restored-{rows}.sqlite"));
            std::fs::write(&restored, &image).unwrap();
            let c =
                Connection::open_with_flags(&restored, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
            let (check, count, mode): (String, i64, String) = c
                .query_row(
                    "SELECT (SELECT integrity_check FROM pragma_integrity_check()), (SELECT count(*) FROM t), (SELECT journal_mode FROM pragma_journal_mode())",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .unwrap();
            assert_eq!(
                (check.as_str(), count, mode.as_str()),
                ("ok", rows, "delete")
            );
            assert!(!with_suffix(&restored, "-wal").exists());
            drop(copy);
            assert_eq!(
                std::fs::read_dir(&tmp).unwrap().count(),
                0,
                "the copy is gone"
            );
        }
    }
}
