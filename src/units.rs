//! Units: the granularity of backup, restore and erasure.
//!
//! `layout = "pryv"`: each `<volume>/<a>/<b>/<c>/<userId>/` directory, where a,
//! b, c are the last, second-to-last and third-to-last characters of the
//! userId, is one user unit; everything else is the volume's shared unit.
//! `layout = "plain"`: the whole volume is one unit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Layout, Volume};
use crate::fswalk::{self, Kind, Problem};

/// What a unit holds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "user", rename_all = "lowercase")]
pub enum UnitKind {
    /// One user's directory (pryv layout).
    User(String),
    /// Everything in a pryv volume that is not a user directory.
    Shared,
    /// A whole plain volume.
    Volume,
}

impl UnitKind {
    /// The users whose data a unit of this kind holds.
    pub fn users(&self) -> Vec<String> {
        match self {
            UnitKind::User(id) => vec![id.clone()],
            _ => Vec::new(),
        }
    }
}

/// One unit of one volume: becomes one object.
#[derive(Debug, Clone)]
pub struct Unit {
    /// The volume's name.
    pub volume: String,
    /// The volume's root.
    pub root: PathBuf,
    pub kind: UnitKind,
    /// Relative to the root. A user unit: the user's directories (the
    /// userId directory and, on Pryv v2, the `user.<username>` directory
    /// of its series). The shared unit: directories shaped like a user's
    /// that no user claims, which it holds. Empty for a plain volume.
    pub dirs: Vec<PathBuf>,
}

impl Unit {
    /// A short name for messages: `users/user c123…`, `users/shared`, `etc`.
    pub fn label(&self) -> String {
        label(&self.volume, &self.kind)
    }
}

/// A short name for a unit in messages.
pub fn label(volume: &str, kind: &UnitKind) -> String {
    match kind {
        UnitKind::User(id) => format!("{volume}/user {id}"),
        UnitKind::Shared => format!("{volume}/shared"),
        UnitKind::Volume => volume.to_string(),
    }
}

/// Whether `id` can name a user directory: at least 3 characters, letters,
/// digits, `.`, `_` and `-`, not starting with `.` (a manifest is checked
/// with this before any of its ids becomes a path).
pub fn is_valid_user_id(id: &str) -> bool {
    id.chars().count() >= 3
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// `<a>/<b>/<c>/<userId>` for a user id, relative to the volume root.
pub fn user_dir(id: &str) -> PathBuf {
    let chars: Vec<char> = id.chars().collect();
    let n = chars.len();
    let mut p = PathBuf::new();
    for i in 1..=3 {
        p.push(chars[n - i].to_string());
    }
    p.push(id);
    p
}

/// Whether `rel` (relative to a pryv volume root) is a user directory.
pub fn is_user_dir(rel: &Path) -> Option<String> {
    let parts: Vec<&str> = rel.iter().map(|p| p.to_str().unwrap_or("")).collect();
    let [a, b, c, id] = parts.as_slice() else {
        return None;
    };
    let chars: Vec<char> = id.chars().collect();
    let n = chars.len();
    if n < 3 {
        return None;
    }
    let ok = [a, b, c]
        .iter()
        .enumerate()
        .all(|(i, part)| part.chars().count() == 1 && part.starts_with(chars[n - 1 - i]));
    ok.then(|| id.to_string())
}

/// Whether an entry at `rel` belongs to a user unit rather than to the
/// shared unit: a user directory itself, or anything below one. A file or
/// link that merely has a user directory's name stays shared. Backup's walk
/// and restore's scope check use this one rule.
pub fn in_user_dir(rel: &Path, is_dir: bool) -> bool {
    let head: PathBuf = rel.components().take(4).collect();
    is_user_dir(&head).is_some() && (is_dir || rel.components().count() > 4)
}

/// Whether a directory at `rel`, four levels below a pryv volume root, looks
/// like a user directory (three one-character parents, a name of three or
/// more characters) that is not where its name puts it: `x/y/z/abc123`.
fn is_misplaced_user_dir(rel: &Path) -> bool {
    let parts: Vec<&str> = rel.iter().map(|p| p.to_str().unwrap_or("")).collect();
    let [a, b, c, id] = parts.as_slice() else {
        return false;
    };
    [a, b, c].iter().all(|p| p.chars().count() == 1)
        && id.chars().count() >= 3
        && is_user_dir(rel).is_none()
}

/// What the scan of a volume found.
#[derive(Debug, Clone)]
pub struct Scan {
    /// Users sorted by id, the shared unit last (pryv); the whole volume (plain).
    pub units: Vec<Unit>,
    /// Directories (full paths) that look like user directories but are not
    /// where their name puts them (pryv): backed up in the shared unit, each
    /// named in a warning.
    pub misplaced: Vec<PathBuf>,
    /// Directories (full paths) that changed while the scan looked at them
    /// (swapped with a link, replaced): skipped, never followed; the users
    /// below them are in no unit of this run.
    pub changed: Vec<PathBuf>,
}

/// The units of a volume, users sorted by id, the shared unit last. The
/// pryv scan looks four levels deep, through [`fswalk`] like every walk.
pub fn units_of(volume: &Volume) -> anyhow::Result<Scan> {
    let unit = |kind, dirs| Unit {
        volume: volume.name.clone(),
        root: volume.path.clone(),
        kind,
        dirs,
    };
    match volume.layout {
        Layout::Plain => Ok(Scan {
            units: vec![unit(UnitKind::Volume, Vec::new())],
            misplaced: Vec::new(),
            changed: Vec::new(),
        }),
        Layout::Pryv => {
            let mut scan = UserScan {
                root: &volume.path,
                exclude: &volume.exclude,
                users: Vec::new(),
                misplaced: Vec::new(),
                changed: Vec::new(),
            };
            fswalk::walk(&volume.path, Path::new(""), Some(4), &mut scan)?;
            let UserScan {
                users: found,
                mut misplaced,
                changed,
                ..
            } = scan;
            for path in &misplaced {
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                tracing::warn!(path = %path.display(), "looks like a user directory, but user {name} would live in {}: backed up in the shared unit", user_dir(&name).display());
            }
            let index = crate::pryv::read_user_index(&volume.path)?;
            let (users, unclaimed) = claim(found, index.as_ref());
            for rel in &unclaimed {
                let path = volume.path.join(rel);
                tracing::warn!(path = %path.display(), "looks like a user directory, but no user in user-index.db has that id or username: backed up in the shared unit");
                misplaced.push(path);
            }
            let mut units: Vec<Unit> = users
                .into_iter()
                .map(|(id, dirs)| unit(UnitKind::User(id), dirs))
                .collect();
            units.push(unit(UnitKind::Shared, unclaimed));
            Ok(Scan {
                units,
                misplaced,
                changed,
            })
        }
    }
}

/// Which user each user-shaped directory belongs to: without a user index
/// (Pryv v1), each directory is the user its name says; with one (Pryv v2,
/// `id4name`), a userId directory and a `user.<username>` directory belong
/// to that userId, and a directory that matches neither is unclaimed (the
/// shared unit holds it). Returns the users, sorted, with their directories,
/// and the unclaimed directories.
fn claim(
    found: Vec<(String, PathBuf)>,
    index: Option<&crate::pryv::UserIndex>,
) -> (BTreeMap<String, Vec<PathBuf>>, Vec<PathBuf>) {
    let mut users: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let mut unclaimed = Vec::new();
    for (name, rel) in found {
        let owner = match index {
            None => Some(name),
            Some(index) => index.owner_of_dir(&name),
        };
        match owner {
            Some(id) => users.entry(id).or_default().push(rel),
            None => unclaimed.push(rel),
        }
    }
    for dirs in users.values_mut() {
        dirs.sort();
    }
    unclaimed.sort();
    (users, unclaimed)
}

/// The pryv scan: directories four levels down.
struct UserScan<'a> {
    root: &'a Path,
    exclude: &'a globset::GlobSet,
    /// (directory name, path relative to the root) of every user-shaped directory.
    users: Vec<(String, PathBuf)>,
    misplaced: Vec<PathBuf>,
    changed: Vec<PathBuf>,
}

impl fswalk::Visitor for UserScan<'_> {
    fn keep(&mut self, rel: &Path, kind: Kind) -> bool {
        // as ever, the excludes count for the user directories themselves only
        kind == Kind::Dir && (rel.iter().count() < 4 || !self.exclude.is_match(rel))
    }

    fn entry(&mut self, entry: &fswalk::Entry<'_>) -> anyhow::Result<()> {
        if entry.depth == 4 {
            if let Some(name) = is_user_dir(entry.rel) {
                self.users.push((name, entry.rel.to_path_buf()));
            } else if is_misplaced_user_dir(entry.rel) {
                self.misplaced.push(self.root.join(entry.rel));
            }
        }
        Ok(())
    }

    fn skipped(&mut self, rel: &Path, problem: &Problem) {
        if let Problem::Changed(why) = problem {
            let path = self.root.join(rel);
            tracing::warn!(path = %path.display(), why = %why, "changed during the walk; skipped, not followed");
            self.changed.push(path);
        }
    }
}

/// Walks one unit, giving `visitor` every entry it holds, relative to the
/// volume root, in a stable order (see [`fswalk`]). Excluded paths, user
/// directories (for the shared unit) and the volume root itself are left out.
pub fn walk(
    unit: &Unit,
    exclude: &globset::GlobSet,
    visitor: &mut impl fswalk::Visitor,
) -> anyhow::Result<()> {
    let shared = unit.kind == UnitKind::Shared;
    let mut rules = UnitRules {
        exclude,
        shared,
        held: &unit.dirs,
        inner: visitor,
    };
    match unit.kind {
        // each of the user's directories, in order
        UnitKind::User(_) => unit
            .dirs
            .iter()
            .try_for_each(|dir| fswalk::walk(&unit.root, dir, None, &mut rules)),
        UnitKind::Shared | UnitKind::Volume => {
            fswalk::walk(&unit.root, Path::new(""), None, &mut rules)
        }
    }
}

/// A unit's rules around the visitor of its walk.
struct UnitRules<'a, V> {
    exclude: &'a globset::GlobSet,
    shared: bool,
    /// The user-shaped directories the shared unit holds anyway.
    held: &'a [PathBuf],
    inner: &'a mut V,
}

impl<V: fswalk::Visitor> fswalk::Visitor for UnitRules<'_, V> {
    fn keep(&mut self, rel: &Path, kind: Kind) -> bool {
        let user_dir_in_shared = self.shared
            && in_user_dir(rel, kind == Kind::Dir)
            && !self.held.iter().any(|d| rel.starts_with(d));
        !self.exclude.is_match(rel) && !user_dir_in_shared && self.inner.keep(rel, kind)
    }

    fn entry(&mut self, entry: &fswalk::Entry<'_>) -> anyhow::Result<()> {
        self.inner.entry(entry)
    }

    fn skipped(&mut self, rel: &Path, problem: &Problem) {
        self.inner.skipped(rel, problem);
    }
}

/// The change fingerprint of a unit: BLAKE3 over the relative path, size,
/// mtime, ctime, inode and mode of every entry of its walk. Equal
/// fingerprints mean an unchanged unit (ctime catches what a touch-up of
/// mtime would hide: chmod, chown, rename, replace). Entries that vanish or
/// change during the walk are left out, like the archive leaves them out.
/// A `-shm` file counts by inode and mode only, a `-wal` without its ctime. A database whose only
/// change is in its `-wal` is changed: the `-wal` is walked (though not
/// archived beside a captured database).
pub fn fingerprint(unit: &Unit, exclude: &globset::GlobSet) -> anyhow::Result<String> {
    struct Hash(blake3::Hasher);
    impl fswalk::Visitor for Hash {
        fn entry(&mut self, entry: &fswalk::Entry<'_>) -> anyhow::Result<()> {
            use std::os::unix::ffi::OsStrExt;
            let m = &entry.meta;
            self.0.update(entry.rel.as_os_str().as_bytes());
            // A `-shm` is SQLite's shared-memory index, rewritten by every
            // reader (the backup's own included), never data: its times
            // would make every run upload the unit again.
            if entry.kind() == Kind::File && entry.rel.as_os_str().as_bytes().ends_with(b"-shm") {
                self.0
                    .update(format!("\0shm {} {:o}\n", m.ino, m.mode).as_bytes());
                return Ok(());
            }
            // A `-wal` counts by its content's size and mtime: SQLite, run as
            // root, chowns it to the database's owner on every open (its
            // ctime moves while nothing changed).
            let ctime = if entry.rel.as_os_str().as_bytes().ends_with(b"-wal") {
                (0, 0)
            } else {
                (m.ctime, m.ctime_nsec)
            };
            self.0.update(
                format!(
                    "\0{} {}.{} {}.{} {} {:o}\n",
                    m.size, m.mtime, m.mtime_nsec, ctime.0, ctime.1, m.ino, m.mode
                )
                .as_bytes(),
            );
            Ok(())
        }
    }
    let mut hash = Hash(blake3::Hasher::new());
    walk(unit, exclude, &mut hash)?;
    Ok(hash.0.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_dirs_follow_the_pryv_rule() {
        assert_eq!(
            user_dir("c123456789abc"),
            PathBuf::from("c/b/a/c123456789abc")
        );
        assert_eq!(
            is_user_dir(Path::new("c/b/a/c123456789abc")).as_deref(),
            Some("c123456789abc")
        );
        assert_eq!(is_user_dir(Path::new("a/b/c/c123456789abc")), None);
        assert_eq!(is_user_dir(Path::new("c/b/a")), None);
        assert_eq!(is_user_dir(Path::new("_shared/x/y/z")), None);
        assert!(is_misplaced_user_dir(Path::new("x/y/z/abc123")));
        assert!(!is_misplaced_user_dir(Path::new("c/b/a/c123456789abc")));
        assert!(!is_misplaced_user_dir(Path::new("_shared/x/y/z")));
        assert!(!is_misplaced_user_dir(Path::new("x/y/z/ab")));
    }
}
