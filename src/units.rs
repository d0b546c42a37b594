//! Units: the granularity of backup, restore and erasure.
//!
//! `layout = "pryv"`: each `<volume>/<a>/<b>/<c>/<userId>/` directory, where a,
//! b, c are the last, second-to-last and third-to-last characters of the
//! userId, is one user unit; everything else is the volume's shared unit.
//! `layout = "plain"`: the whole volume is one unit.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Layout, Volume};

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
}

impl Unit {
    /// A short name for messages: `users/user c123…`, `users/shared`, `etc`.
    pub fn label(&self) -> String {
        label(&self.volume, &self.kind)
    }

    /// The directory, relative to the volume root, that holds the unit's files
    /// (`None` for shared and whole-volume units, which start at the root).
    pub fn user_dir(&self) -> Option<PathBuf> {
        match &self.kind {
            UnitKind::User(id) => Some(user_dir(id)),
            _ => None,
        }
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

/// The units of a volume, users sorted by id, the shared unit last.
pub fn units_of(volume: &Volume) -> std::io::Result<Vec<Unit>> {
    let unit = |kind| Unit {
        volume: volume.name.clone(),
        root: volume.path.clone(),
        kind,
    };
    match volume.layout {
        Layout::Plain => Ok(vec![unit(UnitKind::Volume)]),
        Layout::Pryv => {
            let mut users = Vec::new();
            for entry in walkdir::WalkDir::new(&volume.path)
                .min_depth(4)
                .max_depth(4)
                .follow_links(false)
            {
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) if is_vanished(&e) => continue,
                    Err(e) => return Err(walk_error(e)),
                };
                if !entry.file_type().is_dir() {
                    continue;
                }
                let rel = entry
                    .path()
                    .strip_prefix(&volume.path)
                    .unwrap_or(entry.path());
                if volume.exclude.is_match(rel) {
                    continue;
                }
                if let Some(id) = is_user_dir(rel) {
                    users.push(id);
                }
            }
            users.sort();
            let mut units: Vec<Unit> = users
                .into_iter()
                .map(|id| unit(UnitKind::User(id)))
                .collect();
            units.push(unit(UnitKind::Shared));
            Ok(units)
        }
    }
}

/// The walk of one unit: every entry it holds, relative to the volume root,
/// in a stable order. Excluded paths, user directories (for the shared unit)
/// and the volume root itself are left out.
pub fn walk(
    unit: &Unit,
    exclude: &globset::GlobSet,
) -> impl Iterator<Item = walkdir::Result<walkdir::DirEntry>> {
    let start = match unit.user_dir() {
        Some(dir) => unit.root.join(dir),
        None => unit.root.clone(),
    };
    let root = unit.root.clone();
    let shared = unit.kind == UnitKind::Shared;
    let exclude = exclude.clone();
    walkdir::WalkDir::new(start)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(move |e| {
            let rel = e.path().strip_prefix(&root).unwrap_or(e.path());
            if rel.as_os_str().is_empty() {
                return true;
            }
            if exclude.is_match(rel) {
                return false;
            }
            !(shared && in_user_dir(rel, e.file_type().is_dir()))
        })
}

/// The change fingerprint of a unit: BLAKE3 over the relative path, size,
/// mtime, ctime, inode and mode of every entry of its walk. Equal
/// fingerprints mean an unchanged unit (ctime catches what a touch-up of
/// mtime would hide: chmod, chown, rename, replace). Entries that vanish
/// during the walk are left out, like the archive leaves them out.
pub fn fingerprint(unit: &Unit, exclude: &globset::GlobSet) -> std::io::Result<String> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let mut hasher = blake3::Hasher::new();
    for entry in walk(unit, exclude) {
        let entry = match entry {
            Ok(e) => e,
            Err(e) if is_vanished(&e) => continue,
            Err(e) => return Err(walk_error(e)),
        };
        let rel = entry
            .path()
            .strip_prefix(&unit.root)
            .unwrap_or(entry.path());
        if rel.as_os_str().is_empty() {
            continue;
        }
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) if is_vanished(&e) => continue,
            Err(e) => return Err(walk_error(e)),
        };
        hasher.update(rel.as_os_str().as_bytes());
        hasher.update(
            format!(
                "\0{} {}.{} {}.{} {} {:o}\n",
                meta.size(),
                meta.mtime(),
                meta.mtime_nsec(),
                meta.ctime(),
                meta.ctime_nsec(),
                meta.ino(),
                meta.mode()
            )
            .as_bytes(),
        );
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// A walk error that only means the entry disappeared meanwhile.
pub fn is_vanished(e: &walkdir::Error) -> bool {
    e.io_error()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
}

fn walk_error(e: walkdir::Error) -> std::io::Error {
    let path = e
        .path()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let kind = e
        .io_error()
        .map_or(std::io::ErrorKind::Other, |io| io.kind());
    std::io::Error::new(kind, format!("{path}: {e}"))
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
    }
}
