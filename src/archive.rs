//! The tar of a unit, written from the live file system ([`crate::unpack`]
//! reads it back).
//!
//! Paths inside are relative to the volume root, so units restored side by
//! side rebuild the volume. Modes, mtimes and numeric owners are kept;
//! symlinks are stored as links, hard links within a unit as links to the
//! first path, empty directories as directories.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

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
