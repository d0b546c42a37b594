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
    /// Symlinks whose target is absolute or leaves the volume: stored as
    /// they are, but `zonevault restore` refuses them (see [`extract`]).
    pub escaping_links: Vec<PathBuf>,
}

/// Writes the tar of `unit` to `out`. An unreadable file fails naming its path.
pub fn write_unit<W: Write>(
    unit: &Unit,
    exclude: &globset::GlobSet,
    out: W,
) -> Result<(W, WriteStats)> {
    let mut builder = tar::Builder::new(out);
    builder.mode(HeaderMode::Complete);
    builder.follow_symlinks(false);
    let mut stats = WriteStats::default();
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();

    for entry in units::walk(unit, exclude) {
        let entry = match entry {
            Ok(e) => e,
            Err(e) if units::is_vanished(&e) => {
                let path = e.path().map(Path::to_path_buf).unwrap_or_default();
                tracing::debug!(path = %path.display(), "vanished during the backup; skipped");
                stats.vanished.push(path);
                continue;
            }
            Err(e) => {
                let path = e
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                bail!(
                    "cannot read {path}: {}",
                    e.io_error().map_or(e.to_string(), |io| io.to_string())
                );
            }
        };
        let path = entry.path();
        let rel = path.strip_prefix(&unit.root).unwrap_or(path);
        if rel.as_os_str().is_empty() {
            continue; // the volume root itself: restore creates it
        }
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::debug!(path = %path.display(), "vanished during the backup; skipped");
                stats.vanished.push(path.to_path_buf());
                continue;
            }
            Err(e) => bail!("cannot read {}: {e}", path.display()),
        };
        let mut header = Header::new_gnu();
        header.set_metadata_in_mode(&meta, HeaderMode::Complete);
        let ft = meta.file_type();
        if ft.is_dir() {
            header.set_size(0);
            builder.append_data(&mut header, rel, io::empty())?;
        } else if ft.is_symlink() {
            let target = match std::fs::read_link(path) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    stats.vanished.push(path.to_path_buf());
                    continue;
                }
                Err(e) => bail!("cannot read link {}: {e}", path.display()),
            };
            header.set_size(0);
            if link_escapes(rel, &target) {
                tracing::warn!(path = %path.display(), target = %target.display(), "symlink points outside the volume: stored, but zonevault restore will refuse it");
                stats.escaping_links.push(path.to_path_buf());
            }
            builder.append_link(&mut header, rel, &target)?;
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                let id = (meta.dev(), meta.ino());
                if let Some(first) = links.get(&id) {
                    header.set_entry_type(EntryType::Link);
                    header.set_size(0);
                    builder.append_link(&mut header, rel, first)?;
                    stats.files += 1;
                    continue;
                }
            }
            let file = match std::fs::File::open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tracing::debug!(path = %path.display(), "vanished during the backup; skipped");
                    stats.vanished.push(path.to_path_buf());
                    continue;
                }
                Err(e) => bail!("cannot read {}: {e}", path.display()),
            };
            let size = meta.len();
            let mut reader = ExactSize::new(&file, size);
            builder
                .append_data(&mut header, rel, &mut reader)
                .with_context(|| format!("storing {}", path.display()))?;
            let after = file.metadata().ok();
            let changed = reader.short
                || after.is_none_or(|a| {
                    a.len() != size
                        || a.mtime() != meta.mtime()
                        || a.mtime_nsec() != meta.mtime_nsec()
                });
            if changed {
                tracing::warn!(path = %path.display(), "changed while read; stored as read");
                stats.changed.push(path.to_path_buf());
            }
            if meta.nlink() > 1 {
                // only now: a later name may link to this one since it is stored
                links.insert((meta.dev(), meta.ino()), rel.to_path_buf());
            }
        } else {
            tracing::warn!(path = %path.display(), "not a file, directory or link; skipped");
            continue;
        }
        stats.files += 1;
    }
    let out = builder.into_inner()?;
    Ok((out, stats))
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
