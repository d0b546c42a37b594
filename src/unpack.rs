//! Restoring a unit's tar without ever writing outside the restore directory.
//!
//! Why it is built on descriptors: a path is read again by the kernel at
//! every call, so a link placed anywhere on it — before the run or while it
//! runs, by the tar itself or by another local user — redirects a
//! path-based write. Here the restore directory is opened once
//! ([`Destination::open`]), and every directory below it is created with
//! `mkdirat` and opened with `O_DIRECTORY | O_NOFOLLOW` relative to its
//! parent's descriptor; files are created with `O_CREAT | O_EXCL |
//! O_NOFOLLOW`. No link at any level is ever followed. Links from the tar
//! are created *as links* (`symlinkat`): a link is harmless as long as
//! nothing is written through it, which the rule above guarantees.
//!
//! Why a unit is staged: the BLAKE3 of a unit is known only once its whole
//! tar is read, and an object replaced in the bucket by another valid age
//! file must not put a single file in place. So a unit is unpacked into its
//! own directory under `DIR/.zonevault-staging/` (the same file system, so
//! moving is a rename), checked, and only then merged into `DIR/<volume>/`
//! ([`Staged::commit`]). A unit that fails is removed whole
//! ([`Staged::discard`], or on drop), also when another target's copy of it
//! succeeds afterwards.
//!
//! What a unit may hold is checked entry by entry ([`Scope`]): a user unit
//! only its user's directory, the shared unit no user directory. A unit that
//! breaks its scope is refused whole. What cannot be placed (an existing
//! file without `--force`, a directory where a file is) is refused per entry
//! and listed; the rest is restored.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, Timespec, Timestamps};
use rustix::io::Errno;
use tar::EntryType;

use crate::pool::Pool;
use crate::units;

/// The directory that holds staged units, inside the restore directory.
pub const STAGING: &str = ".zonevault-staging";

/// Why the restore directory cannot be used. Each is the operator's to fix
/// (exit 2): nothing has been written.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error(
        "{0} is a symbolic link; restore into a real directory (nothing is written through links)"
    )]
    Symlink(PathBuf),
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error(
        "{path} is writable by other users (mode {mode:04o}): another local user could plant links in it while restore runs; restore into a directory only you can write to (chmod go-w, or a new directory)"
    )]
    WritableByOthers { path: PathBuf, mode: u32 },
    #[error(
        "{path} belongs to uid {owner}, not to the user running restore (uid {euid}); restore into a directory of your own"
    )]
    Owner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error(
        "{0} is not empty; restore into an empty directory, or pass --force to overwrite files in it"
    )]
    NotEmpty(PathBuf),
    #[error("cannot use {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// The restore directory, opened once; every write goes below this descriptor.
#[derive(Debug)]
pub struct Destination {
    root: OwnedFd,
    path: PathBuf,
    force: bool,
    /// Restoring as root: numeric owners are applied.
    owners: bool,
}

impl Destination {
    /// Opens `path` (creating it, owner-only, when it does not exist).
    /// Refuses a symlink, a directory that other users can write to or that
    /// belongs to someone else, and a non-empty one without `force`.
    pub fn open(path: &Path, force: bool) -> Result<Destination, DestinationError> {
        let io_err = |source: io::Error| DestinationError::Io {
            path: path.to_path_buf(),
            source,
        };
        match rustix::fs::mkdir(path, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(io_err(e.into())),
        }
        let root = match rustix::fs::open(path, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::LOOP) => return Err(DestinationError::Symlink(path.to_path_buf())),
            Err(Errno::NOTDIR) => {
                let link = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink());
                return Err(if link {
                    DestinationError::Symlink(path.to_path_buf())
                } else {
                    DestinationError::NotADirectory(path.to_path_buf())
                });
            }
            Err(e) => return Err(io_err(e.into())),
        };
        let st = rustix::fs::fstat(&root).map_err(|e| io_err(e.into()))?;
        let euid = rustix::process::geteuid().as_raw();
        if st.st_uid != euid {
            return Err(DestinationError::Owner {
                path: path.to_path_buf(),
                owner: st.st_uid,
                euid,
            });
        }
        let mode = st.st_mode & 0o7777;
        if mode & 0o022 != 0 {
            return Err(DestinationError::WritableByOthers {
                path: path.to_path_buf(),
                mode,
            });
        }
        let dest = Destination {
            root,
            path: path.to_path_buf(),
            force,
            owners: euid == 0,
        };
        let names = list(dest.root.as_fd()).map_err(io_err)?;
        if !force && names.iter().any(|n| n.as_bytes() != STAGING.as_bytes()) {
            return Err(DestinationError::NotEmpty(path.to_path_buf()));
        }
        // What a crashed restore left is ours: DIR belongs to us alone.
        if names.iter().any(|n| n.as_bytes() == STAGING.as_bytes()) {
            remove_tree(dest.root.as_fd(), Path::new(STAGING)).map_err(io_err)?;
        }
        Ok(dest)
    }

    /// The restore directory's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A new staging directory for one unit of `volume`, whose entries must
    /// stay within `scope`.
    pub fn stage(&self, volume: &str, label: &str, scope: Scope) -> Result<Staged<'_>> {
        let staging = ensure_dir(self.root.as_fd(), Path::new(STAGING))
            .with_context(|| format!("cannot create {}/{STAGING}", self.path.display()))?;
        let name = format!("{:016x}", rand::random::<u64>());
        rustix::fs::mkdirat(&staging, name.as_str(), Mode::from_raw_mode(0o700))
            .map_err(io::Error::from)
            .with_context(|| {
                format!(
                    "cannot create a staging directory in {}",
                    self.path.display()
                )
            })?;
        let dir = open_dir(staging.as_fd(), Path::new(&name))?;
        // a unit of one directory is staged as that directory, so that its
        // commit is one rename, not a walk down the volume's shard directories
        let root = match &scope {
            Scope::Under(dirs) if dirs.len() == 1 => dirs[0].clone(),
            _ => PathBuf::new(),
        };
        Ok(Staged {
            dest: self,
            staging,
            name,
            dir: Some(dir),
            root,
            volume: volume.to_string(),
            label: label.to_string(),
            scope,
            dirs: Vec::new(),
            refused: Vec::new(),
            files: 0,
            cached: None,
        })
    }

    /// Sets the mode, owner and mtime of restored directories, deepest first
    /// (writing into a directory changes its mtime). A directory that is no
    /// longer a directory is left alone; nothing is followed. What cannot be
    /// set is returned as refused, not an error: the files are in place.
    pub fn finish_dirs(&self, mut dirs: Vec<DirMeta>) -> Vec<Refused> {
        dirs.sort_by_key(|d| std::cmp::Reverse(d.path.components().count()));
        let mut refused = Vec::new();
        for d in dirs {
            let full = Path::new(&d.volume).join(&d.path);
            let Ok(fd) = open_dir(self.root.as_fd(), &full) else {
                continue;
            };
            let set = (|| -> io::Result<()> {
                if let Some((uid, gid)) = d.owner.filter(|_| self.owners) {
                    set_owner(fd.as_fd(), uid, gid)?;
                }
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(d.mode & 0o7777))?;
                rustix::fs::futimens(&fd, &times(d.mtime))?;
                Ok(())
            })();
            if let Err(e) = set {
                refused.push(Refused {
                    path: full.display().to_string(),
                    reason: format!("restored, but its owner, mode or mtime could not be set: {e}"),
                });
            }
        }
        refused
    }

    /// Removes the (empty) staging directory at the end of a restore.
    pub fn finish(&self) {
        match rustix::fs::unlinkat(&self.root, STAGING, AtFlags::REMOVEDIR) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => tracing::warn!(
                "cannot remove {}/{STAGING}: {}; it holds nothing restored, delete it",
                self.path.display(),
                io::Error::from(e)
            ),
        }
    }
}

/// What a unit may hold, relative to its volume's root.
#[derive(Debug, Clone)]
pub enum Scope {
    /// A user unit: only entries at or below these directories.
    Under(Vec<PathBuf>),
    /// The shared unit of a pryv volume: no user directory, but for the
    /// user-shaped directories no user claims, which it holds.
    NoUserDirs(Vec<PathBuf>),
    /// A plain volume: anything inside the volume.
    Volume,
}

impl Scope {
    /// The scope of a unit of `kind` holding `dirs` (its manifest record's):
    /// what its backup put in it.
    pub fn of(kind: &units::UnitKind, dirs: &[PathBuf]) -> Scope {
        match kind {
            units::UnitKind::User(id) if dirs.is_empty() => Scope::Under(vec![units::user_dir(id)]),
            units::UnitKind::User(_) => Scope::Under(dirs.to_vec()),
            units::UnitKind::Shared => Scope::NoUserDirs(dirs.to_vec()),
            units::UnitKind::Volume => Scope::Volume,
        }
    }

    fn allows(&self, rel: &Path, is_dir: bool) -> bool {
        match self {
            Scope::Under(dirs) => dirs.iter().any(|d| rel.starts_with(d)),
            Scope::NoUserDirs(held) => {
                !units::in_user_dir(rel, is_dir) || held.iter().any(|d| rel.starts_with(d))
            }
            Scope::Volume => true,
        }
    }
}

/// A directory whose metadata is applied after every unit is in place.
#[derive(Debug, Clone)]
pub struct DirMeta {
    pub volume: String,
    /// Relative to the volume's root.
    pub path: PathBuf,
    pub mode: u32,
    pub mtime: i64,
    pub owner: Option<(u32, u32)>,
}

/// One entry that restore did not write, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Refused {
    /// `<volume>/<path>`.
    pub path: String,
    pub reason: String,
}

/// One unit, unpacked into its staging directory and not yet in place.
pub struct Staged<'d> {
    dest: &'d Destination,
    staging: OwnedFd,
    name: String,
    /// The unit's staging directory; `None` once committed or discarded.
    dir: Option<OwnedFd>,
    /// What the staging directory stands for, relative to the volume's
    /// root: the unit's one directory, or the volume root itself (empty).
    root: PathBuf,
    volume: String,
    label: String,
    scope: Scope,
    dirs: Vec<DirMeta>,
    refused: Vec<Refused>,
    files: u64,
    /// The parent directory of the last entry: tar entries come in walk order.
    cached: Option<(PathBuf, OwnedFd)>,
}

/// What a committed unit put in place.
#[derive(Debug, Default)]
pub struct Placed {
    pub files: u64,
    pub dirs: Vec<DirMeta>,
    pub refused: Vec<Refused>,
}

impl Staged<'_> {
    /// Unpacks a unit's tar into the staging directory. Fails, refusing the
    /// unit, on an entry outside its scope or the volume, or on a damaged tar.
    pub fn unpack(&mut self, reader: impl Read) -> Result<()> {
        let mut archive = tar::Archive::new(reader);
        for entry in archive.entries()? {
            let mut entry = entry?;
            let raw = entry.path()?.into_owned();
            let rel = safe_relative(&raw).map_err(|e| {
                anyhow!(
                    "{} holds the entry {:?}, which {e}: refused",
                    self.label,
                    raw
                )
            })?;
            if rel.as_os_str().is_empty() {
                continue; // "./": the volume root, which restore creates
            }
            let is_dir = entry.header().entry_type() == EntryType::Directory;
            if !self.scope.allows(&rel, is_dir) {
                bail!(
                    "{} holds {}, which is not this unit's to hold ({}): refused",
                    self.label,
                    rel.display(),
                    match self.scope {
                        Scope::Under(_) => "not under its user's directories",
                        Scope::NoUserDirs(_) => "a user's directory in the shared unit",
                        Scope::Volume => "outside the volume",
                    }
                );
            }
            let local = rel
                .strip_prefix(&self.root)
                .expect("in scope, so under the root")
                .to_path_buf();
            if let Err(reason) = self.unpack_entry(&mut entry, &rel, &local) {
                self.refuse(&rel, format!("{reason:#}"));
            }
        }
        self.cached = None;
        Ok(())
    }

    fn refuse(&mut self, rel: &Path, reason: String) {
        tracing::warn!(unit = %self.label, path = %rel.display(), %reason, "entry not restored");
        self.refused.push(Refused {
            path: format!("{}/{}", self.volume, rel.display()),
            reason,
        });
    }

    /// Unpacks one entry: `rel` is its path in the volume, `local` in the
    /// staging directory.
    fn unpack_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        rel: &Path,
        local: &Path,
    ) -> Result<()> {
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode()?;
        let mtime = header.mtime()? as i64;
        let owner = (header.uid()? as u32, header.gid()? as u32);
        let owners = self.dest.owners;
        let name = rel
            .file_name()
            .context("an entry without a name")?
            .to_owned();
        if local.as_os_str().is_empty() && kind != EntryType::Directory {
            bail!("the unit's own directory is not a directory in the snapshot");
        }
        if kind == EntryType::Directory {
            if !local.as_os_str().is_empty() {
                // the next entries are likely inside it: it becomes the cached parent
                let fd =
                    child_dir(self.parent(local)?, &name, true).map_err(|e| e.describe(rel))?;
                self.cached = Some((local.to_path_buf(), fd));
            }
            self.dirs.push(DirMeta {
                volume: self.volume.clone(),
                path: rel.to_path_buf(),
                mode,
                mtime,
                owner: Some(owner),
            });
            self.files += 1;
            return Ok(());
        }
        let parent = self.parent(local)?;
        match kind {
            EntryType::Regular | EntryType::Continuous => {
                let fd = rustix::fs::openat(
                    parent,
                    name.as_os_str(),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(io::Error::from)
                .context("cannot create it")?;
                let mut file = std::fs::File::from(fd);
                let written = (|| -> Result<()> {
                    copy_file(entry, &mut file).context("cannot write it")?;
                    if owners {
                        set_owner(file.as_fd(), owner.0, owner.1)?;
                    }
                    // after the owner: chown clears set-id bits
                    rustix::fs::fchmod(&file, Mode::from_raw_mode(mode & 0o7777))?;
                    rustix::fs::futimens(&file, &times(mtime))?;
                    Ok(())
                })();
                // a refused entry must not be moved into place half made
                written.inspect_err(|_| unlink(parent, &name))?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()?
                    .context("a link without a target")?
                    .into_owned();
                rustix::fs::symlinkat(target.as_os_str(), parent, name.as_os_str())
                    .map_err(io::Error::from)
                    .context("cannot create the link")?;
                let finished = (|| -> io::Result<()> {
                    if owners {
                        rustix::fs::chownat(
                            parent,
                            name.as_os_str(),
                            Some(rustix::fs::Uid::from_raw(owner.0)),
                            Some(rustix::fs::Gid::from_raw(owner.1)),
                            AtFlags::SYMLINK_NOFOLLOW,
                        )?;
                    }
                    rustix::fs::utimensat(
                        parent,
                        name.as_os_str(),
                        &times(mtime),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )?;
                    Ok(())
                })();
                finished.inspect_err(|_| unlink(parent, &name))?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name()?
                    .context("a hard link without a target")?
                    .into_owned();
                let target = safe_relative(&target).map_err(|e| anyhow!("its target {e}"))?;
                let in_unit = target
                    .strip_prefix(&self.root)
                    .ok()
                    .filter(|t| self.scope.allows(&target, false) && !t.as_os_str().is_empty());
                let Some(local_target) = in_unit else {
                    bail!("its target {} is not in this unit", target.display());
                };
                let target_name = local_target
                    .file_name()
                    .context("a hard link to the volume root")?;
                let target_parent =
                    open_dir(self.dir()?, local_target.parent().unwrap_or(Path::new("")))
                        .with_context(|| {
                            format!("its target {} is not in this unit", target.display())
                        })?;
                let parent = self.parent(local)?;
                rustix::fs::linkat(
                    &target_parent,
                    target_name,
                    parent,
                    name.as_os_str(),
                    AtFlags::empty(),
                )
                .map_err(io::Error::from)
                .with_context(|| format!("cannot link it to {}", target.display()))?;
            }
            other => bail!("a {other:?} entry: only files, directories and links are restored"),
        }
        self.files += 1;
        Ok(())
    }

    fn dir(&self) -> Result<BorrowedFd<'_>> {
        self.dir
            .as_ref()
            .map(|d| d.as_fd())
            .context("the unit was already committed")
    }

    /// The staged parent directory of `rel`, created as needed.
    fn parent(&mut self, rel: &Path) -> Result<BorrowedFd<'_>> {
        let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if self.cached.as_ref().is_none_or(|(p, _)| *p != parent) {
            // errors name the path in the volume, not in the staging directory
            let fd = walk_dirs(self.dir()?, &parent, true, &self.root)?;
            self.cached = Some((parent, fd));
        }
        Ok(self
            .cached
            .as_ref()
            .map(|(_, fd)| fd.as_fd())
            .expect("just set"))
    }

    /// Moves the checked unit into `DIR/<volume>/`: what does not exist there
    /// is renamed into place; directories that exist are merged; an existing
    /// file is replaced only with `--force`, and never through a link.
    pub fn commit(mut self) -> Result<Placed> {
        let volume =
            ensure_dir(self.dest.root.as_fd(), Path::new(&self.volume)).with_context(|| {
                format!(
                    "cannot open {}/{} as a directory (a link or a file there is not followed)",
                    self.dest.path.display(),
                    self.volume
                )
            })?;
        let staged = self.dir.take().context("the unit was already committed")?;
        let mut refused = std::mem::take(&mut self.refused);
        match self.root.file_name() {
            None => merge(
                staged.as_fd(),
                volume.as_fd(),
                Path::new(""),
                self.dest.force,
                &self.volume,
                &mut refused,
            ),
            // a unit that staged nothing places nothing, not an empty directory
            Some(_) if self.files == 0 => {}
            Some(root_name) => {
                // the staging directory itself becomes the unit's directory
                let above = self.root.parent().unwrap_or(Path::new(""));
                let placed = ensure_dir(volume.as_fd(), above)
                    .map_err(|e| format!("{e:#}"))
                    .and_then(|parent| {
                        let entry = Entry {
                            from: (self.staging.as_fd(), OsStr::new(&self.name)),
                            to: (parent.as_fd(), root_name),
                            here: &self.root,
                        };
                        place(&entry, self.dest.force, &self.volume, &mut refused)
                    });
                if let Err(reason) = placed {
                    refuse_entry(&mut refused, &self.volume, &self.root, reason);
                }
            }
        }
        drop(staged);
        self.remove();
        Ok(Placed {
            files: self.files,
            dirs: std::mem::take(&mut self.dirs),
            refused,
        })
    }

    /// Removes everything of this unit from staging.
    pub fn discard(mut self) {
        self.dir = None;
        self.remove();
    }

    fn remove(&mut self) {
        self.cached = None;
        self.dir = None;
        if self.name.is_empty() {
            return;
        }
        if let Err(e) = remove_tree(self.staging.as_fd(), Path::new(&self.name)) {
            tracing::warn!(unit = %self.label, error = %e, "cannot remove the staged copy of this unit");
        }
        self.name.clear();
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Merges the tree under `src` into `dst` (both open directories). Never
/// stops half way: whatever cannot be placed is refused, entry by entry, and
/// the rest goes on (the unit was verified, another copy would not help).
fn merge(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    rel: &Path,
    force: bool,
    volume: &str,
    refused: &mut Vec<Refused>,
) {
    let names = match list(src) {
        Ok(names) => names,
        Err(e) => {
            return refuse_entry(
                refused,
                volume,
                rel,
                format!("cannot read the staged copy: {e}"),
            );
        }
    };
    for name in names {
        let here = rel.join(&name);
        let entry = Entry {
            from: (src, &name),
            to: (dst, &name),
            here: &here,
        };
        if let Err(reason) = place(&entry, force, volume, refused) {
            refuse_entry(refused, volume, &here, reason);
        }
    }
}

fn refuse_entry(refused: &mut Vec<Refused>, volume: &str, here: &Path, reason: String) {
    let path = format!("{volume}/{}", here.display());
    tracing::warn!(%path, %reason, "entry not restored");
    refused.push(Refused { path, reason });
}

/// One staged entry to move into place: from (directory, name) to
/// (directory, name); `here` is its path in the volume.
struct Entry<'a> {
    from: (BorrowedFd<'a>, &'a OsStr),
    to: (BorrowedFd<'a>, &'a OsStr),
    here: &'a Path,
}

/// Moves one staged entry into place; `Err` is why it was not.
fn place(
    entry: &Entry<'_>,
    force: bool,
    volume: &str,
    refused: &mut Vec<Refused>,
) -> Result<(), String> {
    let ((src, src_name), (dst, dst_name)) = (entry.from, entry.to);
    let moved = |e: Errno| {
        match e {
        Errno::XDEV => "cannot be moved into place: the restore directory spans file systems (a mount point inside it); restore into a directory on one file system".to_string(),
        Errno::INVAL => "cannot be moved into place: this file system does not support renameat2(RENAME_NOREPLACE)".to_string(),
        e => format!("cannot be moved into place: {}", io::Error::from(e)),
    }
    };
    match rustix::fs::renameat_with(src, src_name, dst, dst_name, RenameFlags::NOREPLACE) {
        Ok(()) => return Ok(()),
        Err(Errno::EXIST) => {}
        Err(e) => return Err(moved(e)),
    }
    let is_dir = |fd, name| {
        rustix::fs::statat(fd, name, AtFlags::SYMLINK_NOFOLLOW)
            .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
            .map_err(|e| format!("cannot inspect it: {}", io::Error::from(e)))
    };
    match (is_dir(src, src_name)?, is_dir(dst, dst_name)?) {
        (true, true) => {
            let s = open_dir(src, Path::new(src_name)).map_err(|e| format!("{e:#}"))?;
            let d = open_dir(dst, Path::new(dst_name)).map_err(|e| format!("{e:#}"))?;
            merge(s.as_fd(), d.as_fd(), entry.here, force, volume, refused);
            Ok(())
        }
        (false, false) if force => {
            rustix::fs::renameat(src, src_name, dst, dst_name).map_err(moved)
        }
        (false, false) => Err("exists in the restore directory; not overwritten (--force replaces files)".into()),
        (true, false) => Err("a directory in the snapshot, but something else (a file or a link) exists there; not replaced".into()),
        (false, true) => Err("a directory exists there; not replaced by the snapshot's file".into()),
    }
}

/// Opens `rel` below `base`, every component a real directory (no link is followed).
fn open_dir(base: BorrowedFd<'_>, rel: &Path) -> Result<OwnedFd> {
    walk_dirs(base, rel, false, Path::new(""))
}

/// Like [`open_dir`], creating missing directories (owner-only until
/// [`Destination::finish_dirs`] sets their modes).
fn ensure_dir(base: BorrowedFd<'_>, rel: &Path) -> Result<OwnedFd> {
    walk_dirs(base, rel, true, Path::new(""))
}

/// Opens (or creates) `rel` below `base`; errors name `shown_under/rel`.
fn walk_dirs(
    base: BorrowedFd<'_>,
    rel: &Path,
    create: bool,
    shown_under: &Path,
) -> Result<OwnedFd> {
    let mut at: Option<OwnedFd> = None;
    for (i, part) in rel.components().enumerate() {
        let Component::Normal(name) = part else {
            bail!("{} is not a plain relative path", rel.display());
        };
        let parent = at.as_ref().map_or(base, |fd| fd.as_fd());
        let fd = child_dir(parent, name, create).map_err(|e| {
            e.describe(&shown_under.join(rel.iter().take(i + 1).collect::<PathBuf>()))
        })?;
        at = Some(fd);
    }
    match at {
        Some(fd) => Ok(fd),
        None => Ok(rustix::fs::openat(base, ".", DIR_FLAGS, Mode::empty())?),
    }
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Why a directory could not be opened (or created).
enum DirError {
    Create(Errno),
    NotADirectory,
    Open(Errno),
}

impl DirError {
    /// The error, naming the directory (relative to where the walk started).
    fn describe(self, path: &Path) -> anyhow::Error {
        match self {
            DirError::Create(e) => anyhow::Error::new(io::Error::from(e))
                .context(format!("cannot create {}", path.display())),
            DirError::NotADirectory => anyhow!(
                "{} is not a directory (a link or a file there is never followed)",
                path.display()
            ),
            DirError::Open(e) => anyhow::Error::new(io::Error::from(e))
                .context(format!("cannot open {}", path.display())),
        }
    }
}

/// Opens the directory `name` in `parent`, creating it first (owner-only)
/// when `create`; a link or a file there is never followed.
fn child_dir(
    parent: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    create: bool,
) -> Result<OwnedFd, DirError> {
    if create {
        match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(DirError::Create(e)),
        }
    }
    match rustix::fs::openat(parent, name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => Ok(fd),
        Err(Errno::LOOP | Errno::NOTDIR) => Err(DirError::NotADirectory),
        Err(e) => Err(DirError::Open(e)),
    }
}

/// Copies a file's bytes from the tar in writes of up to [`COPY_BLOCK`]:
/// few system calls, and whole pages, which the file system does not have
/// to zero before they are filled (`io::copy` writes 8 KiB at a time).
fn copy_file(from: &mut impl Read, to: &mut std::fs::File) -> io::Result<()> {
    static BUFFERS: Pool<Vec<u8>> = Pool::new(|| vec![0; COPY_BLOCK]);
    let mut buf = BUFFERS.take();
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match from.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        to.write_all(&buf[..filled])?;
        if filled < buf.len() {
            return Ok(());
        }
    }
}

const COPY_BLOCK: usize = 256 << 10;

/// The names in an open directory (without `.` and `..`).
fn list(dir: BorrowedFd<'_>) -> io::Result<Vec<std::ffi::OsString>> {
    use std::os::unix::ffi::OsStringExt;
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(std::ffi::OsString::from_vec(name.to_vec()));
        }
    }
    Ok(names)
}

/// Removes `rel` below `base` and everything in it, never following a link.
fn remove_tree(base: BorrowedFd<'_>, rel: &Path) -> io::Result<()> {
    let dir = match rustix::fs::openat(
        base,
        rel,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(Errno::NOTDIR | Errno::LOOP) => {
            return Ok(rustix::fs::unlinkat(base, rel, AtFlags::empty())?);
        }
        Err(e) => return Err(e.into()),
    };
    for name in list(dir.as_fd())? {
        match rustix::fs::unlinkat(&dir, name.as_os_str(), AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(Errno::ISDIR) => remove_tree(dir.as_fd(), Path::new(&name))?,
            Err(e) => return Err(e.into()),
        }
    }
    drop(dir);
    match rustix::fs::unlinkat(base, rel, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Removes a staged entry that could not be made whole (best effort: the
/// staging directory is removed at the end of the unit anyway).
fn unlink(parent: BorrowedFd<'_>, name: &std::ffi::OsStr) {
    let _ = rustix::fs::unlinkat(parent, name, AtFlags::empty());
}

fn set_owner(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    rustix::fs::fchown(
        fd,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
    )?;
    Ok(())
}

fn times(mtime: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// `path` with `.` parts removed, if it is relative and stays inside.
pub fn safe_relative(path: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    bail!("leaves the directory");
                }
            }
            Component::RootDir | Component::Prefix(_) => bail!("is absolute"),
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

    /// A tar of raw entries: (path, kind, content or link target).
    fn tar_of(entries: &[(&str, EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, content) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mode(if *kind == EntryType::Directory {
                0o755
            } else {
                0o640
            });
            h.set_mtime(1_700_000_000);
            match kind {
                EntryType::Symlink | EntryType::Link => {
                    h.set_size(0);
                    b.append_link(&mut h, path, content).unwrap();
                }
                _ => {
                    h.set_size(content.len() as u64);
                    b.append_data(&mut h, path, content.as_bytes()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    /// Unpacks `tar` as one unit of volume `v` into a new DIR and commits
    /// it; returns DIR, the unit's outcome, and a directory outside DIR.
    fn restore(
        scope: Scope,
        tar: &[u8],
        prepare: impl FnOnce(&Path),
        force: bool,
    ) -> (tempfile::TempDir, PathBuf, Result<Placed>) {
        let top = tempfile::tempdir().unwrap();
        let to = top.path().join("restore");
        std::fs::create_dir(&to).unwrap();
        std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let outside = top.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        prepare(&to);
        let dest = Destination::open(&to, force).unwrap();
        let mut staged = dest.stage("v", "v/unit", scope).unwrap();
        let outcome = staged.unpack(tar).and_then(|()| staged.commit());
        dest.finish();
        (top, to, outcome)
    }

    fn nothing_outside(top: &Path) {
        assert_eq!(std::fs::read_dir(top.join("outside")).unwrap().count(), 0);
    }

    #[test]
    fn entries_that_leave_the_volume_refuse_the_unit() {
        for entries in [
            &[("../escape", EntryType::Regular, "x")][..],
            &[("a/../../escape", EntryType::Regular, "x")][..],
            &[("/abs", EntryType::Regular, "x")][..],
        ] {
            let (top, to, outcome) = restore(Scope::Volume, &tar_of_raw(entries), |_| {}, false);
            let e = outcome.unwrap_err().to_string();
            assert!(e.contains("refused"), "{e}");
            nothing_outside(top.path());
            assert!(!to.join("v").exists());
        }
    }

    /// Like [`tar_of`], but writes the path bytes as they are (the tar
    /// crate refuses `..` and absolute paths when building).
    fn tar_of_raw(entries: &[(&str, EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, content) in entries {
            let mut h = tar::Header::new_gnu();
            h.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_size(content.len() as u64);
            h.set_cksum();
            b.append(&h, content.as_bytes()).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn links_are_created_as_links_and_never_written_through() {
        let tar = tar_of(&[
            ("up", EntryType::Symlink, "../../outside"),
            ("up/planted", EntryType::Regular, "x"),
            ("abs", EntryType::Symlink, "/etc"),
            ("abs/planted", EntryType::Regular, "x"),
            ("kept", EntryType::Regular, "data"),
        ]);
        let (top, to, outcome) = restore(Scope::Volume, &tar, |_| {}, false);
        let placed = outcome.unwrap();
        nothing_outside(top.path());
        assert_eq!(
            std::fs::read_link(to.join("v/up")).unwrap(),
            Path::new("../../outside")
        );
        assert_eq!(
            std::fs::read_link(to.join("v/abs")).unwrap(),
            Path::new("/etc")
        );
        assert_eq!(std::fs::read_to_string(to.join("v/kept")).unwrap(), "data");
        let refused: Vec<&str> = placed.refused.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(refused, ["v/up/planted", "v/abs/planted"]);
        assert!(!Path::new("/etc/planted").exists());
    }

    #[test]
    fn hard_links_stay_inside_the_unit() {
        let tar = tar_of(&[
            ("c/b/a/xabc/f", EntryType::Regular, "mine"),
            ("c/b/a/xabc/same", EntryType::Link, "c/b/a/xabc/f"),
        ]);
        let user = || Scope::of(&units::UnitKind::User("xabc".into()), &[]);
        let (_top, to, outcome) = restore(user(), &tar, |_| {}, false);
        let refused = outcome.unwrap().refused;
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(
            std::fs::read_to_string(to.join("v/c/b/a/xabc/same")).unwrap(),
            "mine"
        );
        // a link to another user's file, or out of the volume, is refused
        for target in ["c/b/a/yabc/f", "../../../etc/passwd"] {
            let tar = tar_of_raw(&[("c/b/a/xabc/x", EntryType::Regular, "")]);
            let mut tar = tar[..tar.len() - 1024].to_vec(); // drop the end marker
            let mut h = tar::Header::new_gnu();
            h.as_gnu_mut().unwrap().name[..14].copy_from_slice(b"c/b/a/xabc/lnk");
            h.as_gnu_mut().unwrap().linkname[..target.len()].copy_from_slice(target.as_bytes());
            h.set_entry_type(EntryType::Link);
            h.set_uid(0);
            h.set_gid(0);
            h.set_size(0);
            h.set_cksum();
            tar.extend_from_slice(h.as_bytes());
            tar.extend_from_slice(&[0; 1024]);
            let (top, to, outcome) = restore(user(), &tar, |_| {}, false);
            let placed = outcome.unwrap();
            assert_eq!(placed.refused.len(), 1, "{target}");
            assert!(!to.join("v/c/b/a/xabc/lnk").exists());
            nothing_outside(top.path());
        }
    }

    #[test]
    fn names_longer_than_path_max_are_restored() {
        let name = "n".repeat(200);
        let deep: Vec<&str> = std::iter::repeat_n(name.as_str(), 25).collect();
        let deep = deep.join("/");
        let file = format!("{deep}/leaf");
        let tar = tar_of(&[(file.as_str(), EntryType::Regular, "deep")]);
        let (_top, to, outcome) = restore(Scope::Volume, &tar, |_| {}, false);
        let refused = outcome.unwrap().refused;
        assert!(refused.is_empty(), "{refused:?}");
        // read it back through descriptors too: the path is over PATH_MAX
        let dir = open_dir(
            rustix::fs::open(&to, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
                .unwrap()
                .as_fd(),
            &Path::new("v").join(&deep),
        )
        .unwrap();
        let fd = rustix::fs::openat(&dir, "leaf", OFlags::RDONLY, Mode::empty()).unwrap();
        let mut text = String::new();
        std::fs::File::from(fd).read_to_string(&mut text).unwrap();
        assert_eq!(text, "deep");
    }

    #[test]
    fn force_replaces_files_never_directories_and_follows_no_link_in_dir() {
        let tar = tar_of(&[
            ("d", EntryType::Directory, ""),
            ("d/new", EntryType::Regular, "new"),
            ("d/file", EntryType::Regular, "snapshot"),
            ("d/dir", EntryType::Regular, "a file where a directory is"),
            ("l", EntryType::Directory, ""),
            ("l/x", EntryType::Regular, "x"),
        ]);
        let prepare = |to: &Path| {
            std::fs::create_dir_all(to.join("v/d/dir")).unwrap();
            std::fs::write(to.join("v/d/file"), "old").unwrap();
            std::os::unix::fs::symlink(to.parent().unwrap().join("outside"), to.join("v/l"))
                .unwrap();
        };
        let (top, to, outcome) = restore(Scope::Volume, &tar, prepare, true);
        let placed = outcome.unwrap();
        nothing_outside(top.path());
        assert_eq!(std::fs::read_to_string(to.join("v/d/new")).unwrap(), "new");
        assert_eq!(
            std::fs::read_to_string(to.join("v/d/file")).unwrap(),
            "snapshot"
        );
        assert!(to.join("v/d/dir").is_dir());
        let mut refused: Vec<&str> = placed.refused.iter().map(|r| r.path.as_str()).collect();
        refused.sort();
        assert_eq!(refused, ["v/d/dir", "v/l"]);
        assert!(!to.join(STAGING).exists());
    }

    #[test]
    fn without_force_a_file_another_unit_placed_is_kept() {
        let top = tempfile::tempdir().unwrap();
        let to = top.path().join("r");
        let dest = Destination::open(&to, false).unwrap();
        for content in ["first", "second"] {
            let mut staged = dest.stage("v", "v/unit", Scope::Volume).unwrap();
            staged
                .unpack(&tar_of(&[("f", EntryType::Regular, content)])[..])
                .unwrap();
            let placed = staged.commit().unwrap();
            assert_eq!(placed.refused.len(), usize::from(content == "second"));
        }
        assert_eq!(std::fs::read_to_string(to.join("v/f")).unwrap(), "first");
    }

    #[test]
    fn a_user_unit_is_moved_in_whole_or_merged_into_what_is_there() {
        let tar = |content| {
            tar_of(&[
                ("c/b/a/xabc", EntryType::Directory, ""),
                ("c/b/a/xabc/f", EntryType::Regular, content),
                ("c/b/a/xabc/sub", EntryType::Directory, ""),
                ("c/b/a/xabc/sub/g", EntryType::Regular, content),
            ])
        };
        let user = || Scope::of(&units::UnitKind::User("xabc".into()), &[]);
        let top = tempfile::tempdir().unwrap();
        let to = top.path().join("r");
        let dest = Destination::open(&to, false).unwrap();
        let commit = |content| {
            let mut staged = dest.stage("v", "v/user:xabc", user()).unwrap();
            staged.unpack(&tar(content)[..]).unwrap();
            staged.commit().unwrap()
        };
        // into nothing: the shard directories are made, the unit moved in
        let placed = commit("first");
        assert!(placed.refused.is_empty(), "{:?}", placed.refused);
        assert_eq!(placed.files, 4);
        assert_eq!(
            std::fs::read_to_string(to.join("v/c/b/a/xabc/sub/g")).unwrap(),
            "first"
        );
        // into its own earlier copy: merged, the existing files kept
        std::fs::remove_file(to.join("v/c/b/a/xabc/f")).unwrap();
        let placed = commit("second");
        let refused: Vec<_> = placed.refused.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(refused, ["v/c/b/a/xabc/sub/g"]);
        assert_eq!(
            std::fs::read_to_string(to.join("v/c/b/a/xabc/f")).unwrap(),
            "second"
        );
        assert_eq!(
            std::fs::read_to_string(to.join("v/c/b/a/xabc/sub/g")).unwrap(),
            "first"
        );
        // a file where a shard directory goes: the unit is refused, nothing followed
        std::fs::remove_dir_all(to.join("v/c")).unwrap();
        std::fs::create_dir_all(to.join("v/c")).unwrap();
        std::fs::write(to.join("v/c/b"), "in the way").unwrap();
        let placed = commit("third");
        assert_eq!(placed.refused.len(), 1, "{:?}", placed.refused);
        assert!(
            placed.refused[0].reason.contains("c/b is not a directory"),
            "{:?}",
            placed.refused
        );
        assert_eq!(
            std::fs::read_to_string(to.join("v/c/b")).unwrap(),
            "in the way"
        );
        // a link in the unit where a directory goes: refused by its path in the volume
        std::fs::remove_file(to.join("v/c/b")).unwrap();
        let mut staged = dest.stage("v", "v/user:xabc", user()).unwrap();
        let linked = tar_of(&[
            ("c/b/a/xabc/sub", EntryType::Symlink, "/tmp"),
            ("c/b/a/xabc/sub/g", EntryType::Regular, "x"),
        ]);
        staged.unpack(&linked[..]).unwrap();
        let placed = staged.commit().unwrap();
        assert_eq!(placed.refused.len(), 1, "{:?}", placed.refused);
        assert!(
            placed.refused[0]
                .reason
                .contains("c/b/a/xabc/sub is not a directory"),
            "{:?}",
            placed.refused
        );
        // a unit that stages nothing places nothing
        std::fs::remove_dir_all(to.join("v/c")).unwrap();
        let mut staged = dest.stage("v", "v/user:xabc", user()).unwrap();
        staged.unpack(&tar_of(&[])[..]).unwrap();
        assert!(staged.commit().unwrap().refused.is_empty());
        assert!(!to.join("v/c").exists(), "no empty user directory is made");
        dest.finish();
        assert!(!to.join(STAGING).exists(), "nothing is left in staging");
    }

    #[test]
    fn scopes_hold_what_they_should() {
        let user = Scope::of(&units::UnitKind::User("xabc".into()), &[]);
        assert!(user.allows(Path::new("c/b/a/xabc"), true));
        assert!(user.allows(Path::new("c/b/a/xabc/f.sqlite"), false));
        assert!(!user.allows(Path::new("c/b/a/xabcd"), true));
        assert!(!user.allows(Path::new("user-index.db"), false));
        let shared = Scope::NoUserDirs(vec![PathBuf::from("1/0/0/user.nobody")]);
        assert!(shared.allows(Path::new("c/b/a"), true));
        assert!(shared.allows(Path::new("_shared/x/y/z"), true));
        assert!(!shared.allows(Path::new("c/b/a/xabc"), true));
        assert!(!shared.allows(Path::new("c/b/a/xabc/f"), false));
        // a link or file with a user directory's name is the shared unit's
        assert!(shared.allows(Path::new("c/b/a/xabc"), false));
        // and so is a user-shaped directory no user claims
        assert!(shared.allows(Path::new("1/0/0/user.nobody/series.sqlite"), false));
        // a Pryv v2 user holds both of their directories
        let v2 = Scope::of(
            &units::UnitKind::User("xabc".into()),
            &[
                PathBuf::from("c/b/a/xabc"),
                PathBuf::from("1/0/0/user.alice001"),
            ],
        );
        assert!(v2.allows(Path::new("1/0/0/user.alice001/series-1.0.0.sqlite"), false));
        assert!(!v2.allows(Path::new("1/0/0/user.bob001"), true));
    }
}
