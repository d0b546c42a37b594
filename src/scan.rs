//! The scan of a volume: its units and their change fingerprints, in one
//! walk.
//!
//! A pryv volume of 100,000 users has 100,000 units: walking the tree once
//! to find them and once more per unit to fingerprint it opened every
//! user's parent directories again and crossed to the blocking pool per
//! unit, which made an unchanged run mostly that. Here one walk (split by
//! the root's directories over a few threads, which also keeps several
//! reads waiting on a cold disk) gives each entry to the fingerprint of the
//! unit that holds it: the user whose directory it is in, or the shared
//! unit. The rules are those of [`crate::units::walk`], which the tar of a
//! unit uses: an excluded entry is in no unit (and an excluded directory is
//! not entered by the shared unit, though users below it are found); a
//! user-shaped directory that no user claims belongs to the shared unit.
//!
//! A user unit's fingerprint is BLAKE3 over each of its directories (sorted)
//! and that directory's BLAKE3 over its entries ([`units::hash_entry`]);
//! the shared unit's is BLAKE3 over the root's own entries and then each
//! root directory's share, in order. Any change of an entry's path, size,
//! times, inode or mode changes the fingerprint of the unit that holds it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::{Layout, Volume};
use crate::fswalk::{self, Kind, Problem};
use crate::pryv::UserIndex;
use crate::units::{self, Unit, UnitKind};

/// A unit found by a scan, with its change fingerprint.
#[derive(Debug, Clone)]
pub struct Scanned {
    pub unit: Unit,
    /// Equal fingerprints mean an unchanged unit.
    pub fingerprint: crate::hash::Blake3,
}

/// What the scan of a volume found.
#[derive(Debug, Clone)]
pub struct Scan {
    /// Users sorted by id, the shared unit last (pryv); the whole volume (plain).
    pub units: Vec<Scanned>,
    /// Directories (full paths) that look like user directories but are not
    /// where their name puts them (pryv): backed up in the shared unit, each
    /// named in a warning.
    pub misplaced: Vec<PathBuf>,
    /// Directories (full paths) that changed while the scan looked at them
    /// (swapped with a link, replaced): skipped, never followed; the users
    /// below them are in no unit of this run.
    pub changed: Vec<PathBuf>,
}

/// The most threads a scan walks with: enough to keep a disk busy, few
/// enough not to crowd a core.
const MAX_THREADS: usize = 8;

/// The units of a volume, users sorted by id, the shared unit last, each
/// with its fingerprint.
pub fn units_of(volume: &Volume) -> anyhow::Result<Scan> {
    let (name, root): (Arc<str>, Arc<Path>) =
        (volume.name.as_str().into(), volume.path.as_path().into());
    let unit = |kind, dirs| Unit {
        volume: Arc::clone(&name),
        root: Arc::clone(&root),
        kind,
        dirs,
    };
    if volume.layout == Layout::Plain {
        let whole = unit(UnitKind::Volume, Vec::new());
        let fingerprint = units::fingerprint(&whole, &volume.exclude)?;
        return Ok(Scan {
            units: vec![Scanned {
                unit: whole,
                fingerprint,
            }],
            misplaced: Vec::new(),
            changed: Vec::new(),
        });
    }
    let index = crate::pryv::read_user_index(&volume.path)?;
    let found = walk_pryv(volume, index.as_ref())?;
    for path in &found.misplaced {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        tracing::warn!(path = %path.display(), "looks like a user directory, but user {name} would live in {}: backed up in the shared unit", units::user_dir(&name).display());
    }
    let mut misplaced = found.misplaced;
    for rel in &found.unclaimed {
        let path = volume.path.join(rel);
        tracing::warn!(path = %path.display(), "looks like a user directory, but no user in user-index.db has that id or username: backed up in the shared unit");
        misplaced.push(path);
    }
    // Sorted by user, then path: each user's directories are neighbours,
    // grouped into one unit as they are taken (no map of 100,000 lists).
    let mut dirs = found.users;
    dirs.sort_unstable_by(|a, b| (&a.owner, &a.rel).cmp(&(&b.owner, &b.rel)));
    let mut units: Vec<Scanned> = Vec::with_capacity(dirs.len() + 1);
    let mut dirs = dirs.into_iter().peekable();
    while let Some(UserDir { owner, rel, digest }) = dirs.next() {
        use std::os::unix::ffi::OsStrExt;
        let mut hash = blake3::Hasher::new();
        let mut held = Vec::with_capacity(1);
        let mut add = |rel: PathBuf, digest: blake3::Hash| {
            hash.update(rel.as_os_str().as_bytes());
            hash.update(b"\0");
            hash.update(digest.as_bytes());
            held.push(rel);
        };
        add(rel, digest);
        while let Some(next) = dirs.next_if(|d| d.owner == owner) {
            add(next.rel, next.digest);
        }
        units.push(Scanned {
            unit: unit(UnitKind::User(owner), held),
            fingerprint: hash.finalize().into(),
        });
    }
    let mut unclaimed = found.unclaimed;
    unclaimed.sort();
    units.push(Scanned {
        unit: unit(UnitKind::Shared, unclaimed),
        fingerprint: found.shared.into(),
    });
    Ok(Scan {
        units,
        misplaced,
        changed: found.changed,
    })
}

/// A user directory found, with the digest of its entries.
struct UserDir {
    owner: String,
    rel: PathBuf,
    digest: blake3::Hash,
}

/// What the walk of a pryv volume found.
struct Found {
    users: Vec<UserDir>,
    /// User-shaped directories that no user claims: the shared unit's.
    unclaimed: Vec<PathBuf>,
    shared: blake3::Hash,
    misplaced: Vec<PathBuf>,
    changed: Vec<PathBuf>,
}

/// The root's own entries first (its directories are not entered), then
/// each root directory on its own, on up to [`MAX_THREADS`] threads.
fn walk_pryv(volume: &Volume, index: Option<&UserIndex>) -> anyhow::Result<Found> {
    let mut top = Share::new(volume, index, true);
    fswalk::walk(&volume.path, Path::new(""), Some(1), &mut top)?;
    let dirs = std::mem::take(&mut top.top_dirs);
    let shares: Vec<Mutex<Option<anyhow::Result<Share>>>> =
        dirs.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let threads = dirs.len().clamp(1, MAX_THREADS);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(dir) = dirs.get(i) else { break };
                    let mut share = Share::new(volume, index, false);
                    let walked = fswalk::walk(&volume.path, dir, None, &mut share).map(|()| {
                        share.close_user();
                        share
                    });
                    *shares[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(walked);
                }
            });
        }
    });
    let mut shared = blake3::Hasher::new();
    shared.update(top.shared.finalize().as_bytes());
    let (mut users, mut unclaimed, mut misplaced, mut changed) =
        (Vec::new(), top.unclaimed, top.misplaced, top.changed);
    for share in shares {
        let share = share
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .expect("every root directory was walked")?;
        shared.update(share.shared.finalize().as_bytes());
        users.extend(share.users);
        unclaimed.extend(share.unclaimed);
        misplaced.extend(share.misplaced);
        changed.extend(share.changed);
    }
    Ok(Found {
        users,
        unclaimed,
        shared: shared.finalize(),
        misplaced,
        changed,
    })
}

/// Where the entry that `keep` took goes, once it is given.
#[derive(Clone, Copy)]
enum Sink {
    /// The shared unit's fingerprint.
    Shared,
    /// A new user directory (then its entries go to it).
    NewUser,
    /// The current user directory.
    User,
    /// No fingerprint: a directory entered only to find the users below.
    Nothing,
    /// A root directory, walked on its own (the root's walk only).
    Top,
}

/// One part of a volume's walk: the root's own entries, or one root
/// directory and everything below it.
struct Share<'a> {
    root: &'a Path,
    exclude: &'a globset::GlobSet,
    index: Option<&'a UserIndex>,
    /// The root's walk: directories are listed, not hashed.
    top: bool,
    top_dirs: Vec<PathBuf>,
    /// By depth: whether the shared unit's walk stops at this directory (it
    /// or a parent is excluded). Index 0 is the root.
    shut: Vec<bool>,
    /// Whether the entries below the current four-level directory go to a
    /// user (else to the shared unit).
    in_user: bool,
    pending: Sink,
    pending_user: Option<(String, PathBuf)>,
    shared: blake3::Hasher,
    /// The user directory being walked. A hasher is kilobytes: each is
    /// finished as soon as its directory is (100,000 users at once would
    /// be hundreds of MB).
    current: Option<(String, PathBuf, blake3::Hasher)>,
    users: Vec<UserDir>,
    unclaimed: Vec<PathBuf>,
    misplaced: Vec<PathBuf>,
    changed: Vec<PathBuf>,
}

impl<'a> Share<'a> {
    fn new(volume: &'a Volume, index: Option<&'a UserIndex>, top: bool) -> Share<'a> {
        Share {
            root: &volume.path,
            exclude: &volume.exclude,
            index,
            top,
            top_dirs: Vec::new(),
            shut: vec![false],
            in_user: false,
            pending: Sink::Nothing,
            pending_user: None,
            shared: blake3::Hasher::new(),
            current: None,
            users: Vec::new(),
            unclaimed: Vec::new(),
            misplaced: Vec::new(),
            changed: Vec::new(),
        }
    }

    /// Finishes the user directory being walked, if any: the walk has left it.
    fn close_user(&mut self) {
        if let Some((owner, rel, hash)) = self.current.take() {
            self.users.push(UserDir {
                owner,
                rel,
                digest: hash.finalize(),
            });
        }
    }

    /// Whether the shared unit's walk takes an entry at `depth`, and, for a
    /// directory, remembers whether it goes on below it.
    fn shared_takes(&mut self, depth: usize, excluded: bool, kind: Kind) -> bool {
        let shut = excluded || self.shut[depth - 1];
        if kind == Kind::Dir {
            self.shut.truncate(depth);
            self.shut.push(shut);
        }
        !shut
    }
}

impl fswalk::Visitor for Share<'_> {
    fn keep(&mut self, rel: &Path, kind: Kind) -> bool {
        let depth = rel.iter().count();
        if depth <= 4 {
            // depth first: the walk is out of the last user's directory
            self.close_user();
        }
        let excluded = self.exclude.is_match(rel);
        let dir = kind == Kind::Dir;
        self.pending = if depth < 4 {
            // the three levels above the users: always entered (users
            // below an excluded directory are still found)
            let shared = self.shared_takes(depth, excluded, kind);
            match (self.top && dir, shared, dir) {
                (true, _, _) => Sink::Top,
                (false, true, _) => Sink::Shared,
                (false, false, true) => Sink::Nothing,
                (false, false, false) => return false,
            }
        } else if depth == 4 {
            let user = if dir { units::is_user_dir(rel) } else { None };
            match user {
                Some(_) if excluded => return false,
                Some(name) => {
                    let owner = match self.index {
                        None => Some(name),
                        Some(index) => index.owner_of_dir(&name),
                    };
                    match owner {
                        Some(owner) => {
                            self.in_user = true;
                            self.pending_user = Some((owner, rel.to_path_buf()));
                            Sink::NewUser
                        }
                        None => {
                            // held by the shared unit, which names it
                            self.unclaimed.push(rel.to_path_buf());
                            self.in_user = false;
                            if !self.shared_takes(depth, false, kind) {
                                return false;
                            }
                            Sink::Shared
                        }
                    }
                }
                None => {
                    self.in_user = false;
                    if dir && !excluded && units::is_misplaced_user_dir(rel) {
                        self.misplaced.push(self.root.join(rel));
                    }
                    if !self.shared_takes(depth, excluded, kind) {
                        return false;
                    }
                    Sink::Shared
                }
            }
        } else if self.in_user {
            if excluded {
                return false;
            }
            Sink::User
        } else {
            if !self.shared_takes(depth, excluded, kind) {
                return false;
            }
            Sink::Shared
        };
        true
    }

    fn entry(&mut self, entry: &fswalk::Entry<'_>) -> anyhow::Result<()> {
        match self.pending {
            Sink::Shared => units::hash_entry(&mut self.shared, entry),
            Sink::NewUser => {
                let (owner, rel) = self.pending_user.take().expect("keep named the user");
                let mut hash = blake3::Hasher::new();
                units::hash_entry(&mut hash, entry);
                self.current = Some((owner, rel, hash));
            }
            Sink::User => {
                let (_, _, hash) = self.current.as_mut().expect("inside a user directory");
                units::hash_entry(hash, entry);
            }
            Sink::Top => self.top_dirs.push(entry.rel.to_path_buf()),
            Sink::Nothing => {}
        }
        Ok(())
    }

    fn skipped(&mut self, rel: &Path, problem: &Problem) {
        // below a user's directory, a change is the unit's (its tar skips
        // and names it); above, it hides users from this run
        if let Problem::Changed(why) = problem
            && rel.iter().count() <= 4
        {
            let path = self.root.join(rel);
            tracing::warn!(path = %path.display(), why = %why, "changed during the walk; skipped, not followed");
            self.changed.push(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(root: &Path, exclude: &[&str]) -> Volume {
        let mut set = globset::GlobSetBuilder::new();
        for pattern in exclude {
            set.add(globset::Glob::new(pattern).unwrap());
        }
        Volume {
            name: "users".into(),
            path: root.to_path_buf(),
            layout: Layout::Pryv,
            exclude: set.build().unwrap(),
            exclude_patterns: exclude.iter().map(|p| p.to_string()).collect(),
            sqlite: Default::default(),
            sqlite_busy_timeout: crate::config::DEFAULT_SQLITE_BUSY_TIMEOUT,
            dump: None,
            hooks: Default::default(),
        }
    }

    fn write(root: &Path, rel: &str, text: &str) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// (unit label, fingerprint) of every unit, in the scan's order.
    fn fingerprints(volume: &Volume) -> Vec<(String, String)> {
        units_of(volume)
            .unwrap()
            .units
            .into_iter()
            .map(|s| (s.unit.label(), s.fingerprint.to_string()))
            .collect()
    }

    /// The labels whose fingerprint differs between two scans of the same units.
    fn changed(before: &[(String, String)], after: &[(String, String)]) -> Vec<String> {
        assert_eq!(
            before.iter().map(|b| &b.0).collect::<Vec<_>>(),
            after.iter().map(|a| &a.0).collect::<Vec<_>>()
        );
        before
            .iter()
            .zip(after)
            .filter(|(b, a)| b.1 != a.1)
            .map(|(b, _)| b.0.clone())
            .collect()
    }

    #[test]
    fn a_change_moves_the_fingerprint_of_the_unit_that_holds_it_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for id in ["cabc123", "cxyz789", "cqq0001"] {
            let user = units::user_dir(id);
            write(root, &format!("{}/events.jsonl", user.display()), "{}");
            write(root, &format!("{}/att/a.bin", user.display()), "x");
        }
        write(root, "user-notes.txt", "shared");
        write(root, "3/2/1/readme", "shared, in a user-shaped parent");
        write(root, "x/y/z/misplaced1/f", "shared: misplaced");
        write(root, "cache/tmp.bin", "excluded");
        let scratch = format!("{}/scratch.tmp", units::user_dir("cxyz789").display());
        write(root, &scratch, "excluded");
        let v = volume(root, &["cache", "**/*.tmp"]);
        let first = fingerprints(&v);
        let labels: Vec<&str> = first.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(
            labels,
            [
                "users/user cabc123",
                "users/user cqq0001",
                "users/user cxyz789",
                "users/shared"
            ]
        );
        assert_eq!(first, fingerprints(&v), "a second scan of nothing changed");

        let step = |what: &str, f: &dyn Fn(), expect: &[&str]| {
            let before = fingerprints(&v);
            f();
            let after = fingerprints(&v);
            assert_eq!(changed(&before, &after), expect, "{what}");
        };
        let user = units::user_dir("cxyz789");
        step(
            "a user's file grows",
            &|| write(root, &format!("{}/att/a.bin", user.display()), "xx"),
            &["users/user cxyz789"],
        );
        step(
            "a user gets a new file",
            &|| {
                write(
                    root,
                    &format!("{}/new", units::user_dir("cabc123").display()),
                    "",
                )
            },
            &["users/user cabc123"],
        );
        step(
            "a shared file changes",
            &|| write(root, "3/2/1/readme", "shared, changed"),
            &["users/shared"],
        );
        step(
            "a misplaced directory is the shared unit's",
            &|| write(root, "x/y/z/misplaced1/f", "changed"),
            &["users/shared"],
        );
        step(
            "an excluded directory is in no unit",
            &|| write(root, "cache/tmp.bin", "changed"),
            &[],
        );
        step(
            "an excluded file in a user's directory is in no unit",
            &|| write(root, &scratch, "changed"),
            &[],
        );
        let scan = units_of(&v).unwrap();
        assert_eq!(scan.misplaced, [root.join("x/y/z/misplaced1")]);
    }

    #[test]
    fn users_below_an_excluded_directory_are_found_and_its_files_are_in_no_unit() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let user = units::user_dir("cabc123");
        write(root, &format!("{}/events.jsonl", user.display()), "{}");
        write(root, "3/b/c/skip.txt", "excluded with its parent");
        let v = volume(root, &["3"]);
        let before = fingerprints(&v);
        assert_eq!(before[0].0, "users/user cabc123", "{before:?}");
        write(root, "3/b/c/skip.txt", "changed");
        assert_eq!(changed(&before, &fingerprints(&v)), Vec::<String>::new());
        write(root, &format!("{}/events.jsonl", user.display()), "{1}");
        assert_eq!(changed(&before, &fingerprints(&v)), ["users/user cabc123"]);
    }
}
