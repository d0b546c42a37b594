//! Walks a directory tree through open descriptors, so that no entry can be
//! swapped for something else between the look and the open.
//!
//! A walk that `lstat`s a path and later opens it *by path* follows whatever
//! is there at the open: a local user who can write in a directory of the
//! volume can exchange an entry with a symlink (`renameat2(RENAME_EXCHANGE)`
//! in a loop) and get `/etc/shadow`, or another user's directory, read into
//! a unit; a FIFO swapped in makes the open block forever. Here:
//!
//! - the root is opened once (`O_DIRECTORY`; the configured path itself is
//!   the operator's and is followed if it holds symlinks); every directory
//!   below it is opened relative to its parent's descriptor with
//!   `O_DIRECTORY | O_NOFOLLOW`, every regular file with
//!   `O_NOFOLLOW | O_NONBLOCK | O_NOCTTY`, and a symlink is read through an
//!   `O_PATH | O_NOFOLLOW` descriptor of the link itself;
//! - what was opened must be what the walk saw: the descriptor's `fstat`
//!   (device, inode, file type) equals the entry's `fstatat`
//!   (`AT_SYMLINK_NOFOLLOW`). Anything else ([`Problem::Changed`]: another
//!   inode, a link where a file was, `ELOOP`, `ENOTDIR`…) is skipped, never
//!   followed and never waited on;
//! - only regular files are ever opened for reading: a FIFO, socket or device
//!   is never opened (one swapped in at the last moment is opened
//!   non-blocking, seen by `fstat`, and closed);
//! - names are resolved one at a time relative to a descriptor, so neither
//!   depth nor path length is limited by `PATH_MAX`. Open descriptors are one
//!   per level of the directory being walked.
//!
//! Entries come depth first, each directory before its contents, the
//! entries of a directory sorted by name (bytes).

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Result, bail};
use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};
use rustix::io::Errno;

/// What an entry is (never following a link).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    /// A FIFO, socket or device: never opened.
    Other,
}

/// The stat data of an entry, as `fstatat(AT_SYMLINK_NOFOLLOW)` or the
/// `fstat` of an opened descriptor gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub dev: u64,
    pub ino: u64,
    /// File type and permission bits (`st_mode`).
    pub mode: u32,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: i64,
    pub ctime: i64,
    pub ctime_nsec: i64,
}

impl Meta {
    fn of(st: &rustix::fs::Stat) -> Meta {
        Meta {
            dev: st.st_dev,
            ino: st.st_ino,
            mode: st.st_mode,
            nlink: st.st_nlink,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size.max(0) as u64,
            mtime: st.st_mtime,
            mtime_nsec: st.st_mtime_nsec as i64,
            ctime: st.st_ctime,
            ctime_nsec: st.st_ctime_nsec as i64,
        }
    }

    pub fn kind(&self) -> Kind {
        match FileType::from_raw_mode(self.mode) {
            FileType::Directory => Kind::Dir,
            FileType::RegularFile => Kind::File,
            FileType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        }
    }

    /// Whether `other` is the same file system object, of the same type.
    fn same_object(&self, other: &Meta) -> bool {
        self.dev == other.dev && self.ino == other.ino && self.kind() == other.kind()
    }
}

/// Why an entry could not be taken.
#[derive(Debug)]
pub enum Problem {
    /// It no longer exists (`ENOENT`): skipped, like a file deleted before
    /// the walk reached it.
    Vanished,
    /// It is no longer what the walk saw (replaced, swapped with a link or a
    /// FIFO, moved): skipped, never followed.
    Changed(String),
    /// Any other error: the walk fails naming the path.
    Io(io::Error),
}

impl Problem {
    fn of(errno: Errno) -> Problem {
        match errno {
            Errno::NOENT => Problem::Vanished,
            Errno::LOOP => Problem::Changed("it became a symlink".into()),
            Errno::NOTDIR => Problem::Changed("it is no longer a directory".into()),
            Errno::NXIO => Problem::Changed("it became a socket or a device".into()),
            Errno::AGAIN => {
                Problem::Changed("another process holds a lease on it (being written)".into())
            }
            e => Problem::Io(e.into()),
        }
    }

    fn changed(what: &str, seen: &Meta, found: &Meta) -> Problem {
        Problem::Changed(format!(
            "the {what} opened is not the one the walk saw (inode {} {:?}, then inode {} {:?})",
            seen.ino,
            seen.kind(),
            found.ino,
            found.kind()
        ))
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Vanished => f.write_str("vanished during the walk"),
            Problem::Changed(why) => write!(f, "changed during the walk: {why}"),
            Problem::Io(e) => e.fmt(f),
        }
    }
}

/// One entry of a walk, with the descriptor of its directory.
pub struct Entry<'a> {
    parent: BorrowedFd<'a>,
    name: &'a CStr,
    /// The path relative to the walk's root.
    pub rel: &'a Path,
    /// Components of `rel`: 1 for an entry of the root.
    pub depth: usize,
    /// What `fstatat(AT_SYMLINK_NOFOLLOW)` saw.
    pub meta: Meta,
}

impl Entry<'_> {
    pub fn kind(&self) -> Kind {
        self.meta.kind()
    }

    /// Opens the entry, a regular file, for reading: relative to its
    /// directory, never following a link, never blocking, and only if the
    /// opened file is the one the walk saw. Returns it (blocking mode
    /// restored) with its `fstat`.
    pub fn open_file(&self) -> Result<(File, Meta), Problem> {
        if self.kind() != Kind::File {
            return Err(Problem::Changed("not a regular file".into()));
        }
        let fd = rustix::fs::openat(
            self.parent,
            self.name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(Problem::of)?;
        let found = fstat(&fd)?;
        if !self.meta.same_object(&found) {
            return Err(Problem::changed("file", &self.meta, &found));
        }
        let flags = rustix::fs::fcntl_getfl(&fd).map_err(|e| Problem::Io(e.into()))?;
        rustix::fs::fcntl_setfl(&fd, flags - OFlags::NONBLOCK)
            .map_err(|e| Problem::Io(e.into()))?;
        Ok((File::from(fd), found))
    }

    /// The stat of `name` in the entry's directory (never following a
    /// link), if it is there now: e.g. a database's `-wal` beside it.
    pub fn sibling(&self, name: &OsStr) -> Option<Meta> {
        let name = CString::new(name.as_bytes()).ok()?;
        statat_fd(self.parent, &name).ok()
    }

    /// The target of the entry, a symlink, read through a descriptor of the
    /// link itself (so it is the link the walk saw).
    pub fn read_link(&self) -> Result<PathBuf, Problem> {
        if self.kind() != Kind::Symlink {
            return Err(Problem::Changed("not a symlink".into()));
        }
        let fd = rustix::fs::openat(
            self.parent,
            self.name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(Problem::of)?;
        let found = fstat(&fd)?;
        if !self.meta.same_object(&found) {
            return Err(Problem::changed("link", &self.meta, &found));
        }
        let target = rustix::fs::readlinkat(&fd, c"", Vec::new()).map_err(Problem::of)?;
        Ok(PathBuf::from(OsStr::from_bytes(target.as_bytes())))
    }
}

/// What a walk does with what it finds.
pub trait Visitor {
    /// Whether to take the entry at `rel` (and, for a directory, walk into
    /// it). Called before anything is opened.
    fn keep(&mut self, rel: &Path, kind: Kind) -> bool {
        let _ = (rel, kind);
        true
    }

    /// An entry that `keep` took. A directory is given once it is open,
    /// before its contents.
    fn entry(&mut self, entry: &Entry<'_>) -> Result<()>;

    /// An entry the walk skipped: `Problem::Vanished` or `Problem::Changed`
    /// (never `Io`, which fails the walk).
    fn skipped(&mut self, rel: &Path, problem: &Problem) {
        let _ = (rel, problem);
    }
}

/// Walks `start` (relative to `root`; empty for the root itself) and
/// everything below it, down to `max_depth` components below `root` (an
/// entry at that depth is given but not entered).
///
/// `start`'s own components are opened without following links; `start`
/// itself, unless it is the root, is the first entry. A `start` that is gone
/// or not a directory is skipped (given to [`Visitor::skipped`]). Any error
/// other than a vanished or changed entry fails the walk, naming the path.
pub fn walk(
    root: &Path,
    start: &Path,
    max_depth: Option<usize>,
    visitor: &mut impl Visitor,
) -> Result<()> {
    let root_fd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| anyhow::anyhow!("cannot open {}: {}", root.display(), io::Error::from(e)))?;
    let mut names = Vec::new();
    for c in start.components() {
        match c {
            Component::Normal(n) => names.push(cstring(n, root)?),
            Component::CurDir => {}
            _ => bail!("{} is not a path below {}", start.display(), root.display()),
        }
    }
    let mut walk = Walk {
        root,
        max_depth,
        visitor,
    };
    let mut rel = PathBuf::new();
    let first = match names.split_last() {
        None => walk.frame(root_fd, &rel, 0)?,
        Some((last, parents)) => {
            // down to the start, each directory opened without following
            let mut dir = root_fd;
            for name in parents {
                rel.push(OsStr::from_bytes(name.to_bytes()));
                match open_dir(&dir, name, None) {
                    Ok(fd) => dir = fd,
                    Err(p) => return walk.skip(&rel, p),
                }
            }
            rel.push(OsStr::from_bytes(last.to_bytes()));
            walk.take(&dir, last, &rel, names.len(), true)?
        }
    };
    let start_depth = names.len();
    let mut stack: Vec<Frame> = first.into_iter().collect();
    while let Some(frame) = stack.last_mut() {
        let Some(name) = frame.names.get_mut(frame.next).map(std::mem::take) else {
            if stack.pop().is_some_and(|f| f.depth > start_depth) {
                rel.pop();
            }
            continue;
        };
        frame.next += 1;
        rel.push(OsStr::from_bytes(name.to_bytes()));
        match walk.take(&frame.dir, &name, &rel, frame.depth + 1, false)? {
            Some(child) => stack.push(child), // rel stays: it is the child's path
            None => {
                rel.pop();
            }
        }
    }
    Ok(())
}

/// One walk's settings and visitor.
struct Walk<'a, V> {
    root: &'a Path,
    max_depth: Option<usize>,
    visitor: &'a mut V,
}

impl<V: Visitor> Walk<'_, V> {
    /// Takes the entry `name` of `dir` (at `rel`, `depth` components below
    /// the root): its stat, the visitor's `keep`, and for a directory to walk
    /// into, the directory opened and verified. Returns that directory.
    fn take(
        &mut self,
        dir: &OwnedFd,
        name: &CStr,
        rel: &Path,
        depth: usize,
        must_be_dir: bool,
    ) -> Result<Option<Frame>> {
        let meta = match statat(dir, name) {
            Ok(m) => m,
            Err(p) => return self.skip(rel, p).map(|()| None),
        };
        let kind = meta.kind();
        if must_be_dir && kind != Kind::Dir {
            let p = Problem::Changed(format!("expected a directory, found a {kind:?}"));
            return self.skip(rel, p).map(|()| None);
        }
        if !self.visitor.keep(rel, kind) {
            return Ok(None);
        }
        let entry = |visitor: &mut V| {
            visitor.entry(&Entry {
                parent: dir.as_fd(),
                name,
                rel,
                depth,
                meta,
            })
        };
        if kind != Kind::Dir || self.max_depth.is_some_and(|m| depth >= m) {
            entry(self.visitor)?;
            return Ok(None);
        }
        let fd = match open_dir(dir, name, Some(&meta)) {
            Ok(fd) => fd,
            Err(p) => return self.skip(rel, p).map(|()| None),
        };
        entry(self.visitor)?;
        self.frame(fd, rel, depth)
    }

    /// An opened directory to walk, with its names; none past `max_depth`.
    fn frame(&self, dir: OwnedFd, rel: &Path, depth: usize) -> Result<Option<Frame>> {
        if self.max_depth.is_some_and(|m| depth >= m) {
            return Ok(None);
        }
        let names = list(&dir).map_err(|e| self.failed(rel, &e))?;
        Ok(Some(Frame {
            dir,
            names,
            next: 0,
            depth,
        }))
    }

    /// Hands a vanished or changed entry to the visitor; fails on any other.
    fn skip(&mut self, rel: &Path, problem: Problem) -> Result<()> {
        match problem {
            Problem::Io(e) => Err(self.failed(rel, &e)),
            p => {
                self.visitor.skipped(rel, &p);
                Ok(())
            }
        }
    }

    fn failed(&self, rel: &Path, e: &io::Error) -> anyhow::Error {
        anyhow::anyhow!("cannot read {}: {e}", self.root.join(rel).display())
    }
}

/// An open directory being walked.
struct Frame {
    dir: OwnedFd,
    /// Its entries, sorted.
    names: Vec<CString>,
    next: usize,
    /// Components from the root to this directory.
    depth: usize,
}

fn cstring(name: &OsStr, root: &Path) -> Result<CString> {
    CString::new(name.as_bytes())
        .map_err(|_| anyhow::anyhow!("a path below {} holds a NUL byte", root.display()))
}

fn fstat(fd: &OwnedFd) -> Result<Meta, Problem> {
    rustix::fs::fstat(fd)
        .map(|st| Meta::of(&st))
        .map_err(|e| Problem::Io(e.into()))
}

fn statat(dir: &OwnedFd, name: &CStr) -> Result<Meta, Problem> {
    statat_fd(dir.as_fd(), name)
}

fn statat_fd(dir: BorrowedFd<'_>, name: &CStr) -> Result<Meta, Problem> {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .map(|st| Meta::of(&st))
        .map_err(Problem::of)
}

/// Opens the directory `name` in `dir` without following a link; with
/// `seen`, only if it is that directory.
fn open_dir(dir: &OwnedFd, name: &CStr, seen: Option<&Meta>) -> Result<OwnedFd, Problem> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(Problem::of)?;
    if let Some(seen) = seen {
        let found = fstat(&fd)?;
        if !seen.same_object(&found) {
            return Err(Problem::changed("directory", seen, &found));
        }
    }
    Ok(fd)
}

/// The names in an open directory, sorted, without `.` and `..`.
fn list(dir: &OwnedFd) -> io::Result<Vec<CString>> {
    let mut names = Vec::new();
    for entry in Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what a walk gives.
    #[derive(Default)]
    struct Seen {
        entries: Vec<(PathBuf, Kind, usize)>,
        skipped: Vec<(PathBuf, String)>,
    }

    impl Visitor for Seen {
        fn entry(&mut self, e: &Entry<'_>) -> Result<()> {
            self.entries.push((e.rel.to_path_buf(), e.kind(), e.depth));
            Ok(())
        }
        fn skipped(&mut self, rel: &Path, problem: &Problem) {
            self.skipped.push((rel.to_path_buf(), problem.to_string()));
        }
    }

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir_all(p.join("b/inner")).unwrap();
        std::fs::create_dir_all(p.join("a")).unwrap();
        std::fs::write(p.join("b/inner/f"), b"f").unwrap();
        std::fs::write(p.join("b/z"), b"z").unwrap();
        std::fs::write(p.join("c"), b"c").unwrap();
        std::os::unix::fs::symlink("/etc", p.join("b/link")).unwrap();
        dir
    }

    #[test]
    fn depth_first_sorted_and_links_not_followed() {
        let dir = tree();
        let mut seen = Seen::default();
        walk(dir.path(), Path::new(""), None, &mut seen).unwrap();
        let got: Vec<_> = seen
            .entries
            .iter()
            .map(|(p, k, d)| (p.to_str().unwrap(), *k, *d))
            .collect();
        assert_eq!(
            got,
            [
                ("a", Kind::Dir, 1),
                ("b", Kind::Dir, 1),
                ("b/inner", Kind::Dir, 2),
                ("b/inner/f", Kind::File, 3),
                ("b/link", Kind::Symlink, 2),
                ("b/z", Kind::File, 2),
                ("c", Kind::File, 1),
            ]
        );
        assert!(seen.skipped.is_empty());
    }

    #[test]
    fn a_start_below_the_root_is_the_first_entry_and_depth_is_capped() {
        let dir = tree();
        let mut seen = Seen::default();
        walk(dir.path(), Path::new("b"), Some(2), &mut seen).unwrap();
        let got: Vec<_> = seen
            .entries
            .iter()
            .map(|(p, _, _)| p.to_str().unwrap())
            .collect();
        assert_eq!(got, ["b", "b/inner", "b/link", "b/z"]);

        // a start that is a link, or gone: skipped, never followed
        for (start, why) in [("b/link", "changed"), ("nope/x", "vanished")] {
            let mut seen = Seen::default();
            walk(dir.path(), Path::new(start), None, &mut seen).unwrap();
            assert!(seen.entries.is_empty(), "{start}: {:?}", seen.entries);
            assert!(
                seen.skipped.len() == 1 && seen.skipped[0].1.contains(why),
                "{start}: {:?}",
                seen.skipped
            );
        }
    }

    /// Walks the test tree; when the walk gives `rel`, runs `replace` on its
    /// path, then `read` on the entry. Returns what `read` said.
    fn replaced_at_the_last_moment(
        rel: &str,
        replace: impl Fn(&Path),
        read: impl Fn(&Entry<'_>) -> Result<String, Problem>,
    ) -> String {
        struct Race<'a> {
            rel: &'a str,
            race: &'a dyn Fn(&Entry<'_>) -> String,
            said: Option<String>,
        }
        impl Visitor for Race<'_> {
            fn entry(&mut self, e: &Entry<'_>) -> Result<()> {
                if e.rel == Path::new(self.rel) {
                    self.said = Some((self.race)(e));
                }
                Ok(())
            }
        }
        let dir = tree();
        let race = |e: &Entry<'_>| {
            std::fs::remove_file(dir.path().join(rel)).unwrap();
            replace(&dir.path().join(rel));
            match read(e) {
                Ok(read) => format!("read {read}"),
                Err(problem) => problem.to_string(),
            }
        };
        let mut v = Race {
            rel,
            race: &race,
            said: None,
        };
        walk(dir.path(), Path::new(""), None, &mut v).unwrap();
        v.said.expect("the walk gave the entry")
    }

    #[test]
    fn what_is_opened_must_be_what_was_seen() {
        let open = |e: &Entry<'_>| e.open_file().map(|_| "the file".to_string());
        // a file replaced by a link between the look and the open
        let link = |p: &Path| std::os::unix::fs::symlink("/etc/passwd", p).unwrap();
        let said = replaced_at_the_last_moment("c", link, open);
        assert!(said.contains("became a symlink"), "{said}");
        // by a FIFO: opened non-blocking, seen, refused
        let fifo = |p: &Path| {
            let mode = Mode::from_raw_mode(0o600);
            rustix::fs::mknodat(rustix::fs::CWD, p, FileType::Fifo, mode, 0).unwrap();
        };
        let said = replaced_at_the_last_moment("b/z", fifo, open);
        assert!(said.contains("not the one the walk saw"), "{said}");
        // a link replaced by a file: not read as a link
        let file = |p: &Path| std::fs::write(p, b"x").unwrap();
        let said = replaced_at_the_last_moment("b/link", file, |e| {
            e.read_link().map(|t| t.display().to_string())
        });
        assert!(said.contains("changed during the walk"), "{said}");
    }

    #[test]
    fn deeper_than_path_max() {
        let dir = tempfile::tempdir().unwrap();
        let name = "n".repeat(200);
        let mut fd = rustix::fs::open(dir.path(), OFlags::DIRECTORY, Mode::empty()).unwrap();
        for _ in 0..25 {
            rustix::fs::mkdirat(&fd, name.as_str(), Mode::from_raw_mode(0o755)).unwrap();
            fd = rustix::fs::openat(&fd, name.as_str(), OFlags::DIRECTORY, Mode::empty()).unwrap();
        }
        let f = rustix::fs::openat(
            &fd,
            "deep",
            OFlags::CREATE | OFlags::WRONLY,
            Mode::from_raw_mode(0o644),
        )
        .unwrap();
        rustix::io::write(&f, b"bottom").unwrap();
        let mut seen = Seen::default();
        walk(dir.path(), Path::new(""), None, &mut seen).unwrap();
        let (deep, kind, depth) = seen.entries.last().unwrap();
        assert_eq!((*kind, *depth), (Kind::File, 26));
        assert!(deep.as_os_str().len() > 5000 && deep.ends_with("deep"));
    }
}
