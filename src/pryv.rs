//! Pryv's user index: which user a directory of a `pryv` volume belongs to.
//!
//! Pryv v2 keeps a user's series database under `<x>/<y>/<z>/user.<username>/`
//! (sharded by that name, like the userId directory is by the userId), and
//! maps usernames to userIds in `<volume>/user-index.db`, table
//! `id4name(username, userId)`. A user unit must hold both directories, so
//! the scan asks this index who owns each one. The index is a live SQLite
//! database in WAL mode: it is read through SQLite's online backup into
//! memory, which gives one consistent state whatever the core is writing.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::{Connection, OpenFlags};

/// The file name of the index in a pryv volume.
pub const INDEX: &str = "user-index.db";

/// How long reading the index may wait for the core's writers.
const BUSY: Duration = Duration::from_secs(30);

/// The users of a Pryv v2 volume.
#[derive(Debug, Clone, Default)]
pub struct UserIndex {
    /// username → userId.
    by_username: HashMap<String, String>,
    ids: HashSet<String>,
}

impl UserIndex {
    /// An index of (username, userId) pairs.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> UserIndex {
        let by_username: HashMap<String, String> = pairs.into_iter().collect();
        let ids = by_username.values().cloned().collect();
        UserIndex { by_username, ids }
    }

    /// The userId that owns a user-shaped directory named `name`: a userId
    /// itself, or `user.<username>`.
    pub fn owner_of_dir(&self, name: &str) -> Option<String> {
        if self.ids.contains(name) {
            return Some(name.to_string());
        }
        name.strip_prefix("user.")
            .and_then(|username| self.by_username.get(username))
            .cloned()
    }
}

/// Reads `<root>/user-index.db`, if the volume has one that is a SQLite
/// database with an `id4name` table (Pryv v2); `None` otherwise (Pryv v1:
/// every user directory is named by its userId). A database that cannot be
/// read consistently fails the run, naming the file.
pub fn read_user_index(root: &Path) -> Result<Option<UserIndex>> {
    let path = root.join(INDEX);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => {
            tracing::warn!(path = %path.display(), "not a regular file: not read as the user index");
            return Ok(None);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    if !looks_like_a_database(&path) {
        return Ok(None);
    }
    let read = || -> rusqlite::Result<Option<UserIndex>> {
        let source = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        source.busy_timeout(BUSY)?;
        let mut copy = Connection::open_in_memory()?;
        rusqlite::backup::Backup::new(&source, &mut copy)?.run_to_completion(
            256,
            Duration::from_millis(5),
            None,
        )?;
        let has_table: bool = copy.query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'id4name'",
            [],
            |r| r.get(0),
        )?;
        if !has_table {
            return Ok(None);
        }
        let mut statement = copy.prepare("SELECT username, userId FROM id4name")?;
        let pairs = statement
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Some(UserIndex::from_pairs(pairs)))
    };
    let index = match read() {
        Ok(index) => index,
        // the header of a database, but not one: no index to go by
        Err(rusqlite::Error::SqliteFailure(e, _))
            if matches!(
                e.code,
                rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt
            ) =>
        {
            tracing::warn!(path = %path.display(), "starts like a SQLite database but is not one: not used as the user index");
            return Ok(None);
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot read the user index {} (a Pryv v2 SQLite database)",
                    path.display()
                )
            });
        }
    };
    if index.is_none() {
        tracing::warn!(path = %path.display(), "a SQLite database without an id4name table: not used as the user index");
    }
    Ok(index)
}

/// Whether `path` holds a SQLite database by its whole header
/// ([`crate::sqlite::is_database`]). Only then is it opened: opening lets
/// SQLite create a `-shm` beside it, and a read must not change the volume.
fn looks_like_a_database(path: &Path) -> bool {
    std::fs::File::open(path)
        .and_then(|f| {
            let size = f.metadata()?.len();
            crate::sqlite::is_database(&f, size)
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_belong_to_their_user() {
        let index = UserIndex::from_pairs([("alice".into(), "cid0001abc".into())]);
        assert_eq!(
            index.owner_of_dir("cid0001abc").as_deref(),
            Some("cid0001abc")
        );
        assert_eq!(
            index.owner_of_dir("user.alice").as_deref(),
            Some("cid0001abc")
        );
        assert_eq!(index.owner_of_dir("user.bob"), None);
        assert_eq!(index.owner_of_dir("alice"), None);
    }

    #[test]
    fn the_index_is_read_from_a_live_wal_database() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_user_index(dir.path()).unwrap().is_none());
        std::fs::write(dir.path().join(INDEX), b"index").unwrap();
        assert!(
            read_user_index(dir.path()).unwrap().is_none(),
            "not a database: v1"
        );
        std::fs::remove_file(dir.path().join(INDEX)).unwrap();
        let writer = Connection::open(dir.path().join(INDEX)).unwrap();
        writer.pragma_update(None, "journal_mode", "WAL").unwrap();
        writer
            .execute_batch(
                "CREATE TABLE id4name (username TEXT PRIMARY KEY, userId TEXT);
                 INSERT INTO id4name VALUES ('alice', 'cid0001abc');",
            )
            .unwrap();
        // the row lives only in the -wal while the writer holds the database open
        assert!(dir.path().join(format!("{INDEX}-wal")).exists());
        let index = read_user_index(dir.path()).unwrap().unwrap();
        assert_eq!(
            index.owner_of_dir("user.alice").as_deref(),
            Some("cid0001abc")
        );
    }
}
