//! The tar of a unit: written from the live file system, read back safely.
//!
//! Paths inside are relative to the volume root, so units restored side by
//! side rebuild the volume. Modes, mtimes and numeric owners are kept;
//! symlinks are stored as links, hard links within a unit as links to the
//! first path, empty directories as directories.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};
use tar::{EntryType, Header, HeaderMode};

use crate::fswalk::{self, Kind};
use crate::units::{self, Unit};

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
    /// they are, but `zonevault restore` refuses them (see [`extract`]).
    pub escaping_links: Vec<PathBuf>,
}

/// Writes the tar of `unit` to `out`, reading the volume through
/// [`units::walk`] (descriptors, never following a link). An unreadable
/// entry fails naming its path; one that vanished or changed during the walk
/// is skipped and listed.
pub fn write_unit<W: Write>(
    unit: &Unit,
    exclude: &globset::GlobSet,
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
    };
    units::walk(unit, exclude, &mut writer)?;
    let UnitWriter {
        root,
        builder,
        mut stats,
        links,
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

    fn file(&mut self, entry: &fswalk::Entry<'_>) -> Result<()> {
        let rel = entry.rel;
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
                    tracing::warn!(path = %path.display(), target = %target.display(), "symlink points outside the volume: stored, but zonevault restore will refuse it");
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

/// A directory whose mode and mtime are set after everything inside it was
/// written (writing into a directory changes its mtime).
#[derive(Debug, Clone)]
pub struct DirMeta {
    pub path: PathBuf,
    pub mode: u32,
    pub mtime: i64,
    /// Numeric owner, applied when restoring as root.
    pub owner: Option<(u32, u32)>,
}

/// Extracts a unit's tar under `dest` (the volume's restore directory).
/// Refuses, and fails on, any entry that would land outside `dest`: absolute
/// paths, `..`, and links whose target leaves `dest`. Returns the number of
/// entries; directories' metadata is pushed to `dirs` for [`finish_dirs`].
pub fn extract<R: Read>(reader: R, dest: &Path, dirs: &mut Vec<DirMeta>) -> Result<u64> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    archive.set_preserve_ownerships(root);
    let mut count = 0;
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let rel = safe_relative(&path).with_context(|| {
            format!(
                "refused entry {:?}: it would land outside the restore directory",
                path
            )
        })?;
        if rel.as_os_str().is_empty() {
            continue; // "./": the volume root, which restore creates
        }
        refuse_linked_ancestors(dest, &rel)?;
        match entry.header().entry_type() {
            EntryType::Symlink | EntryType::Link => {
                let target = entry
                    .link_name()?
                    .with_context(|| format!("link {} has no target", path.display()))?
                    .into_owned();
                let escapes = if entry.header().entry_type() == EntryType::Link {
                    safe_relative(&target).is_err()
                } else {
                    link_escapes(&rel, &target)
                };
                if escapes {
                    bail!(
                        "refused link {} -> {}: its target is outside the restore directory",
                        path.display(),
                        target.display()
                    );
                }
            }
            EntryType::Directory => {
                std::fs::create_dir_all(dest.join(&rel))
                    .with_context(|| format!("cannot create {}", dest.join(&rel).display()))?;
                dirs.push(DirMeta {
                    path: dest.join(&rel),
                    mode: entry.header().mode()?,
                    mtime: entry.header().mtime()? as i64,
                    owner: if root {
                        Some((entry.header().uid()? as u32, entry.header().gid()? as u32))
                    } else {
                        None
                    },
                });
                count += 1;
                continue;
            }
            _ => {}
        }
        if let Some(parent) = dest.join(&rel).parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let unpacked = entry
            .unpack_in(dest)
            .with_context(|| format!("cannot write {}", dest.join(&rel).display()))?;
        if !unpacked {
            bail!(
                "refused entry {}: it would land outside the restore directory",
                path.display()
            );
        }
        count += 1;
    }
    Ok(count)
}

/// Refuses an entry when a directory on its way inside `dest` is a symlink:
/// writing through it could land anywhere, whatever the path's text says.
fn refuse_linked_ancestors(dest: &Path, rel: &Path) -> Result<()> {
    let mut at = dest.to_path_buf();
    let parts: Vec<_> = rel.components().collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => bail!(
                "refused entry {}: {} is a symlink, and nothing is written through links",
                rel.display(),
                at.display()
            ),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => bail!("cannot inspect {}: {e}", at.display()),
        }
    }
    Ok(())
}

/// Sets the mode and mtime of restored directories, deepest first.
pub fn finish_dirs(mut dirs: Vec<DirMeta>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    dirs.sort_by_key(|d| std::cmp::Reverse(d.path.components().count()));
    for d in dirs {
        // never follow a link that replaced a directory meanwhile
        if !std::fs::symlink_metadata(&d.path).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        if let Some((uid, gid)) = d.owner {
            std::os::unix::fs::lchown(&d.path, Some(uid), Some(gid))
                .with_context(|| format!("cannot set the owner of {}", d.path.display()))?;
        }
        std::fs::set_permissions(&d.path, std::fs::Permissions::from_mode(d.mode & 0o7777))
            .with_context(|| format!("cannot set the mode of {}", d.path.display()))?;
        filetime::set_file_mtime(&d.path, filetime::FileTime::from_unix_time(d.mtime, 0))
            .with_context(|| format!("cannot set the mtime of {}", d.path.display()))?;
    }
    Ok(())
}

/// Whether a symlink at `rel` (relative to the volume root) pointing to
/// `target` leaves the volume. One rule for backup's warning and restore's refusal.
fn link_escapes(rel: &Path, target: &Path) -> bool {
    target.is_absolute()
        || safe_relative(&rel.parent().unwrap_or(Path::new("")).join(target)).is_err()
}

/// `path` with `.` parts removed, if it is relative and has no `..`.
fn safe_relative(path: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    bail!("{} leaves the directory", path.display());
                }
            }
            Component::RootDir | Component::Prefix(_) => bail!("{} is absolute", path.display()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_checked() {
        assert_eq!(
            safe_relative(Path::new("a/./b")).unwrap(),
            PathBuf::from("a/b")
        );
        assert_eq!(
            safe_relative(Path::new("a/../b")).unwrap(),
            PathBuf::from("b")
        );
        assert!(safe_relative(Path::new("../etc/passwd")).is_err());
        assert!(safe_relative(Path::new("a/../../b")).is_err());
        assert!(safe_relative(Path::new("/etc/passwd")).is_err());
        assert_eq!(safe_relative(Path::new("a/..")).unwrap(), PathBuf::new());
    }

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
