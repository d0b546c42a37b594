//! The tar of a unit, written from the live file system ([`crate::unpack`]
//! reads it back).
//!
//! Paths inside are relative to the volume root, so units restored side by
//! side rebuild the volume. Modes, mtimes and numeric owners are kept;
//! symlinks are stored as links, hard links within a unit as links to the
//! first path, empty directories as directories.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tar::{EntryType, Header, HeaderMode};

use crate::fswalk::{self, Kind};
use crate::sqlite;
use crate::units::{self, Unit};

/// How a unit's SQLite databases are captured (`sqlite = "consistent"`):
/// through [`crate::sqlite`], copied into `tmp` one at a time.
#[derive(Debug, Clone)]
pub struct Databases {
    /// `<state_dir>/tmp` (see [`sqlite::prepare_tmp`]).
    pub tmp: PathBuf,
    pub busy_timeout: Duration,
}

/// The files beside a database that belong to it: not archived once the
/// database is captured consistently.
const COMPANIONS: [&str; 3] = ["-wal", "-shm", "-journal"];

/// What writing a unit's tar found.
#[derive(Debug, Default, Clone)]
pub struct WriteStats {
    /// Entries written (files, directories, links).
    pub files: u64,
    /// Files whose size or mtime changed while they were read: stored as read.
    pub changed: Vec<PathBuf>,
    /// Entries that disappeared during the walk: skipped.
    pub vanished: Vec<PathBuf>,
    /// Entries that were no longer what the walk saw when it opened them
    /// (swapped with a link, a FIFO or another file; a directory replaced):
    /// skipped, never followed. See [`crate::fswalk`].
    pub changed_during_walk: Vec<PathBuf>,
    /// Regular files with more hard links than the unit holds names for:
    /// the same bytes may also live outside the unit (stored, not refused).
    pub hard_links: Vec<PathBuf>,
    /// Symlinks whose target is absolute or leaves the volume: stored as
    /// they are; restore recreates them as links ([`crate::unpack`]).
    pub escaping_links: Vec<PathBuf>,
    /// SQLite databases captured through the online backup.
    pub databases: u64,
    /// Files with the SQLite header that SQLite cannot read as a database:
    /// stored as plain files, each named in a warning.
    pub not_databases: Vec<PathBuf>,
}

/// Writes the tar of `unit` to `out`, reading the volume through
/// [`units::walk`] (descriptors, never following a link). An unreadable
/// entry fails naming its path; one that vanished or changed during the walk
/// is skipped and listed. With `databases`, every SQLite database (by its
/// header) is stored as one consistent, self-contained copy and its
/// `-wal`/`-shm`/`-journal` are left out; without, databases are files.
pub fn write_unit<W: Write>(
    unit: &Unit,
    exclude: &globset::GlobSet,
    databases: Option<&Databases>,
    out: W,
) -> Result<(W, WriteStats)> {
    let mut builder = tar::Builder::new(out);
    builder.mode(HeaderMode::Complete);
    builder.follow_symlinks(false);
    let mut writer = UnitWriter {
        root: &unit.root,
        builder,
        stats: WriteStats::default(),
        links: HashMap::new(),
        databases,
        captured: HashSet::new(),
    };
    units::walk(unit, exclude, &mut writer)?;
    let UnitWriter {
        root,
        builder,
        mut stats,
        links,
        ..
    } = writer;
    let mut outside: Vec<PathBuf> = links
        .into_values()
        .filter(|l| l.names < l.nlink)
        .map(|l| root.join(l.first))
        .collect();
    outside.sort();
    for path in &outside {
        tracing::warn!(path = %path.display(), "has hard links outside this unit: the same file may also live elsewhere");
    }
    stats.hard_links = outside;
    let out = builder.into_inner()?;
    Ok((out, stats))
}

/// Writes a tar of one regular file `name` (relative to the volume root) of
/// `size` bytes read from `data`, mode 0600, owned by this process, mtime
/// now: the unit of a `layout = "command"` volume. `data` is cut or padded
/// to `size` so the header stays true (a short read fails the unit).
pub fn write_file<W: Write>(
    name: &Path,
    size: u64,
    data: impl Read,
    out: W,
) -> Result<(W, WriteStats)> {
    let mut builder = tar::Builder::new(out);
    let mut header = Header::new_gnu();
    header.set_entry_type(EntryType::Regular);
    header.set_mode(0o600);
    // SAFETY: plain getters.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    header.set_uid(u64::from(uid));
    header.set_gid(u64::from(gid));
    header.set_mtime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    );
    header.set_size(size);
    let mut reader = ExactSize::new(data, size);
    builder
        .append_data(&mut header, name, &mut reader)
        .with_context(|| format!("storing {}", name.display()))?;
    if reader.short {
        bail!(
            "{}: the spooled dump was shorter than its {size} bytes",
            name.display()
        );
    }
    let out = builder.into_inner()?;
    Ok((
        out,
        WriteStats {
            files: 1,
            ..WriteStats::default()
        },
    ))
}

/// A file with several links, as the walk of a unit met it.
struct Linked {
    /// The first name stored (relative to the volume root).
    first: PathBuf,
    nlink: u64,
    /// Names of it in the unit.
    names: u64,
}

/// The tar of one unit, fed by the walk.
struct UnitWriter<'a, W: Write> {
    root: &'a Path,
    builder: tar::Builder<W>,
    stats: WriteStats,
    /// Stored files with more than one link, by (device, inode).
    links: HashMap<(u64, u64), Linked>,
    databases: Option<&'a Databases>,
    /// Databases captured consistently (relative paths): their companions
    /// (which the walk gives after them, their names sorting after) are left out.
    captured: HashSet<PathBuf>,
}

impl<W: Write> UnitWriter<'_, W> {
    /// Notes an entry skipped by the walk, or fails on an I/O error.
    fn skip(&mut self, rel: &Path, problem: &fswalk::Problem) -> Result<()> {
        let path = self.root.join(rel);
        match problem {
            fswalk::Problem::Vanished => {
                tracing::debug!(path = %path.display(), "vanished during the backup; skipped");
                self.stats.vanished.push(path);
            }
            fswalk::Problem::Changed(why) => {
                tracing::warn!(path = %path.display(), why = %why, "changed during the walk; skipped, not followed");
                self.stats.changed_during_walk.push(path);
            }
            fswalk::Problem::Io(e) => bail!("cannot read {}: {e}", path.display()),
        }
        Ok(())
    }

    /// Whether `rel` is the `-wal`, `-shm` or `-journal` of a database
    /// captured consistently.
    fn is_companion(&self, rel: &Path) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let bytes = rel.as_os_str().as_bytes();
        COMPANIONS.iter().any(|suffix| {
            bytes.strip_suffix(suffix.as_bytes()).is_some_and(|db| {
                self.captured
                    .contains(Path::new(std::ffi::OsStr::from_bytes(db)))
            })
        })
    }

    /// A database (by its header) captured through SQLite's backup: the
    /// copy stored under `rel` with the original's header. `Ok(false)`: not a
    /// database (or not one SQLite reads), to be stored as a file.
    fn database(
        &mut self,
        entry: &fswalk::Entry<'_>,
        file: &std::fs::File,
        meta: &fswalk::Meta,
    ) -> Result<bool> {
        let Some(dbs) = self.databases else {
            return Ok(false);
        };
        let rel = entry.rel;
        let path = self.root.join(rel);
        let head = sqlite::is_database(file, meta.size)
            .with_context(|| format!("reading {}", path.display()))?;
        if !head {
            if sqlite::has_magic(file).unwrap_or(false) {
                tracing::warn!(path = %path.display(), "starts with the SQLite header but is not a database: stored as a plain file");
                self.stats.not_databases.push(path);
            }
            return Ok(false);
        }
        let mut wal_name = rel.file_name().unwrap_or_default().to_os_string();
        wal_name.push("-wal");
        let wal = || entry.sibling(&wal_name).map(|m| (m.dev, m.ino));
        let source = sqlite::Source {
            path: &path,
            id: (meta.dev, meta.ino),
            wal: &wal,
        };
        match sqlite::capture(&source, &dbs.tmp, dbs.busy_timeout)? {
            sqlite::Capture::Copied(copy) => {
                let mut header = header_of(meta);
                header.set_size(copy.size);
                let mut reader = ExactSize::new(copy.reader(), copy.size);
                self.builder
                    .append_data(&mut header, rel, &mut reader)
                    .with_context(|| format!("storing {}", path.display()))?;
                drop(copy); // the temp copy goes as soon as the tar has it
                self.captured.insert(rel.to_path_buf());
                self.stats.databases += 1;
                Ok(true)
            }
            sqlite::Capture::NotADatabase(why) => {
                tracing::warn!(path = %path.display(), why = %why, "starts with the SQLite header but SQLite cannot read it as a database: stored as a plain file");
                self.stats.not_databases.push(path);
                Ok(false)
            }
            sqlite::Capture::Changed(why) => {
                self.skip(rel, &fswalk::Problem::Changed(why))?;
                Err(Skipped.into())
            }
        }
    }

    fn file(&mut self, entry: &fswalk::Entry<'_>) -> Result<()> {
        let rel = entry.rel;
        if self.is_companion(rel) {
            return Ok(());
        }
        let id = (entry.meta.dev, entry.meta.ino);
        if entry.meta.nlink > 1
            && let Some(linked) = self.links.get_mut(&id)
        {
            linked.names += 1;
            let mut header = header_of(&entry.meta);
            header.set_entry_type(EntryType::Link);
            header.set_size(0);
            let first = linked.first.clone();
            self.builder
                .append_link(&mut header, rel, first)
                .with_context(|| format!("storing {}", self.root.join(rel).display()))?;
            self.stats.files += 1;
            return Ok(());
        }
        let (file, meta) = match entry.open_file() {
            Ok(opened) => opened,
            Err(p) => return self.skip(rel, &p),
        };
        match self.database(entry, &file, &meta) {
            Ok(true) => return self.stored(rel, &meta),
            Ok(false) => {}
            Err(e) if e.is::<Skipped>() => return Ok(()),
            Err(e) => return Err(e),
        }
        // the header tells what was opened (the same inode the walk saw)
        let mut header = header_of(&meta);
        let path = self.root.join(rel);
        let mut reader = ExactSize::new(&file, meta.size);
        self.builder
            .append_data(&mut header, rel, &mut reader)
            .with_context(|| format!("storing {}", path.display()))?;
        let after = file.metadata().ok();
        let changed = reader.short
            || after.is_none_or(|a| {
                a.len() != meta.size || a.mtime() != meta.mtime || a.mtime_nsec() != meta.mtime_nsec
            });
        if changed {
            tracing::warn!(path = %path.display(), "changed while read; stored as read");
            self.stats.changed.push(path);
        }
        self.stored(rel, &meta)
    }

    /// Counts a stored file, and notes it for its hard links.
    fn stored(&mut self, rel: &Path, meta: &fswalk::Meta) -> Result<()> {
        let id = (meta.dev, meta.ino);
        if meta.nlink > 1 {
            // only now: a later name may link to this one since it is stored
            self.links.insert(
                id,
                Linked {
                    first: rel.to_path_buf(),
                    nlink: meta.nlink,
                    names: 1,
                },
            );
        }
        self.stats.files += 1;
        Ok(())
    }
}

impl<W: Write> fswalk::Visitor for UnitWriter<'_, W> {
    fn entry(&mut self, entry: &fswalk::Entry<'_>) -> Result<()> {
        let rel = entry.rel;
        let mut header = header_of(&entry.meta);
        match entry.kind() {
            Kind::Dir => {
                header.set_size(0);
                self.builder
                    .append_data(&mut header, rel, io::empty())
                    .with_context(|| format!("storing {}", self.root.join(rel).display()))?;
            }
            Kind::Symlink => {
                let target = match entry.read_link() {
                    Ok(t) => t,
                    Err(p) => return self.skip(rel, &p),
                };
                header.set_size(0);
                if link_escapes(rel, &target) {
                    let path = self.root.join(rel);
                    tracing::warn!(path = %path.display(), target = %target.display(), "symlink points outside the volume: stored as a link (restore recreates the link and never writes through it; check that it still points where it should after a restore)");
                    self.stats.escaping_links.push(path);
                }
                self.builder
                    .append_link(&mut header, rel, &target)
                    .with_context(|| format!("storing {}", self.root.join(rel).display()))?;
            }
            Kind::File => return self.file(entry),
            Kind::Other => {
                tracing::warn!(path = %self.root.join(rel).display(), "not a file, directory or link; skipped");
                return Ok(());
            }
        }
        self.stats.files += 1;
        Ok(())
    }

    fn skipped(&mut self, rel: &Path, problem: &fswalk::Problem) {
        // never an I/O error: the walk fails on those itself
        let _ = self.skip(rel, problem);
    }
}

/// A database the walk skipped (changed under it).
#[derive(Debug)]
struct Skipped;

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("skipped")
    }
}

impl std::error::Error for Skipped {}

/// A tar header for an entry: type, mode, numeric owner, mtime, size (what
/// `tar`'s `HeaderMode::Complete` takes from a `Metadata`).
fn header_of(meta: &fswalk::Meta) -> Header {
    let mut h = Header::new_gnu();
    h.set_mode(meta.mode);
    h.set_uid(u64::from(meta.uid));
    h.set_gid(u64::from(meta.gid));
    h.set_mtime(meta.mtime.max(0) as u64);
    h.set_entry_type(match meta.kind() {
        Kind::Dir => EntryType::Directory,
        Kind::Symlink => EntryType::Symlink,
        _ => EntryType::Regular,
    });
    h.set_size(if meta.kind() == Kind::File {
        meta.size
    } else {
        0
    });
    if let Some(gnu) = h.as_gnu_mut() {
        gnu.set_device_major(0);
        gnu.set_device_minor(0);
    }
    h
}

/// Reads exactly `size` bytes: a file that grew is cut at `size`, one that
/// shrank is padded with zeros (and flagged), so the tar header stays true.
struct ExactSize<R> {
    inner: R,
    remaining: u64,
    short: bool,
}

impl<R: Read> ExactSize<R> {
    fn new(inner: R, size: u64) -> Self {
        ExactSize {
            inner,
            remaining: size,
            short: false,
        }
    }
}

impl<R: Read> Read for ExactSize<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.remaining as usize);
        let n = if self.short {
            0
        } else {
            self.inner.read(&mut buf[..want])?
        };
        let n = if n == 0 {
            self.short = true;
            buf[..want].fill(0);
            want
        } else {
            n
        };
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Whether a symlink at `rel` (relative to the volume root) pointing to
/// `target` leaves the volume. One rule for backup's warning and restore's refusal.
fn link_escapes(rel: &Path, target: &Path) -> bool {
    target.is_absolute()
        || crate::unpack::safe_relative(&rel.parent().unwrap_or(Path::new("")).join(target))
            .is_err()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_size_pads_and_cuts() {
        let mut r = ExactSize::new(&b"abc"[..], 5);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abc\0\0");
        assert!(r.short);
        let mut r = ExactSize::new(&b"abcdef"[..], 2);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"ab");
        assert!(!r.short);
    }
}
