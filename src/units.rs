//! Units: the granularity of backup, restore and erasure.
//!
//! `layout = "pryv"`: each `<volume>/<a>/<b>/<c>/<userId>/` directory, where a,
//! b, c are the last, second-to-last and third-to-last characters of the
//! userId, is one user unit; everything else is the volume's shared unit.
//! `layout = "plain"`: the whole volume is one unit.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
    /// The volume's name (shared by the volume's units: 100,000 users are
    /// not 100,000 copies).
    pub volume: std::sync::Arc<str>,
    /// The volume's root.
    pub root: std::sync::Arc<Path>,
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
pub(crate) fn is_misplaced_user_dir(rel: &Path) -> bool {
    let parts: Vec<&str> = rel.iter().map(|p| p.to_str().unwrap_or("")).collect();
    let [a, b, c, id] = parts.as_slice() else {
        return false;
    };
    [a, b, c].iter().all(|p| p.chars().count() == 1)
        && id.chars().count() >= 3
        && is_user_dir(rel).is_none()
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
pub fn fingerprint(unit: &Unit, exclude: &globset::GlobSet) -> anyhow::Result<crate::hash::Blake3> {
    struct Hash(blake3::Hasher);
    impl fswalk::Visitor for Hash {
        fn entry(&mut self, entry: &fswalk::Entry<'_>) -> anyhow::Result<()> {
            hash_entry(&mut self.0, entry);
            Ok(())
        }
    }
    let mut hash = Hash(blake3::Hasher::new());
    walk(unit, exclude, &mut hash)?;
    Ok(hash.0.finalize().into())
}

/// Adds one entry of a walk to a change fingerprint (see [`fingerprint`]).
pub(crate) fn hash_entry(hash: &mut blake3::Hasher, entry: &fswalk::Entry<'_>) {
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;
    let m = &entry.meta;
    hash.update(entry.rel.as_os_str().as_bytes());
    // A `-shm` is SQLite's shared-memory index, rewritten by every
    // reader (the backup's own included), never data: its times
    // would make every run upload the unit again.
    if entry.kind() == Kind::File && entry.rel.as_os_str().as_bytes().ends_with(b"-shm") {
        let _ = writeln!(hash, "\0shm {} {:o}", m.ino, m.mode);
        return;
    }
    // A `-wal` counts by its content's size and mtime: SQLite, run as
    // root, chowns it to the database's owner on every open (its
    // ctime moves while nothing changed).
    let ctime = if entry.rel.as_os_str().as_bytes().ends_with(b"-wal") {
        (0, 0)
    } else {
        (m.ctime, m.ctime_nsec)
    };
    // (a hasher's writes cannot fail)
    let _ = writeln!(
        hash,
        "\0{} {}.{} {}.{} {} {:o}",
        m.size, m.mtime, m.mtime_nsec, ctime.0, ctime.1, m.ino, m.mode
    );
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
