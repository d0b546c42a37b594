//! A Pryv v2 core: a user's series database lives under
//! `<x>/<y>/<z>/user.<username>/`, resolved to the userId through the live
//! `user-index.db` (table `id4name`). A user unit holds the whole user.

mod common;

use std::path::{Path, PathBuf};

use common::{backup, fleet_with_users, manifest, restore, run, zv};
use zonevault_testkit::fixture;

/// `<x>/<y>/<z>/user.<username>`: sharded by the last three characters of
/// the directory's name, as Pryv does.
fn series_dir(username: &str) -> PathBuf {
    fixture::user_dir(&format!("user.{username}"))
}

/// Turns the fixture's users volume into a Pryv v2 one: a WAL user index
/// (kept open by the returned connection, so its rows live in the -wal),
/// a series directory per user, and one look-alike that no user claims.
fn make_v2(users: &Path, ids: &[String]) -> rusqlite::Connection {
    std::fs::remove_file(users.join("user-index.db")).unwrap();
    let _ = std::fs::remove_file(users.join("user-index.db-wal"));
    let index = rusqlite::Connection::open(users.join("user-index.db")).unwrap();
    index.pragma_update(None, "journal_mode", "WAL").unwrap();
    index
        .execute_batch("CREATE TABLE id4name (username TEXT PRIMARY KEY, userId TEXT NOT NULL);")
        .unwrap();
    for (i, id) in ids.iter().enumerate() {
        let username = format!("zvuser{i:03}");
        index
            .execute("INSERT INTO id4name VALUES (?1, ?2)", [&username, id])
            .unwrap();
        let dir = users.join(series_dir(&username));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("series-1.0.0.sqlite"), format!("series of {id}")).unwrap();
    }
    let stray = users.join(series_dir("nobody999"));
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("left-behind.txt"), "no user claims this").unwrap();
    index
}

#[test]
fn a_user_unit_holds_the_users_series_directory_too() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, ids) = fleet_with_users(dir.path(), 3, 2_000);
    let users = fleet.volumes_dir("core-ch-1").join("users");
    let _index = make_v2(&users, &ids);

    let (stdout, stderr) = run(zv(&core).args(["backup", "--json"]), 0);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    // 3 users + shared + etc: no unit of its own for a user.<username> directory
    assert_eq!(report["units"], 5, "{report}");
    let stray = series_dir("nobody999");
    assert!(
        stderr.contains(&stray.display().to_string())
            && stderr.contains("no user in user-index.db"),
        "{stderr}"
    );

    // the manifest: each user holds both directories, the shared unit the stray
    let m = manifest(&fleet);
    for (i, id) in ids.iter().enumerate() {
        let unit = m["units"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["user"] == id.as_str())
            .unwrap_or_else(|| panic!("no unit for {id}: {m}"));
        let dirs: Vec<&str> = unit["dirs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap())
            .collect();
        let mut expected = vec![
            fixture::user_dir(id).display().to_string(),
            series_dir(&format!("zvuser{i:03}")).display().to_string(),
        ];
        expected.sort();
        assert_eq!(dirs, expected);
    }
    let shared = m["units"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["kind"] == "shared")
        .unwrap();
    assert_eq!(shared["dirs"][0], stray.display().to_string());

    // restore --user brings back both of the user's directories, and no one else's
    let to = dir.path().join("one");
    restore(&core, &fleet.identity("ch"), &to, &["--user", &ids[1]], 0);
    assert_eq!(
        std::fs::read_to_string(
            to.join("users")
                .join(series_dir("zvuser001"))
                .join("series-1.0.0.sqlite")
        )
        .unwrap(),
        format!("series of {}", ids[1])
    );
    assert!(to.join("users").join(fixture::user_dir(&ids[1])).is_dir());
    assert!(!to.join("users").join(series_dir("zvuser000")).exists());
    assert!(!to.join("users").join(&stray).exists());

    // a full restore has the stray in the shared unit's place
    let to = dir.path().join("all");
    restore(&core, &fleet.identity("ch"), &to, &[], 0);
    assert!(
        to.join("users")
            .join(&stray)
            .join("left-behind.txt")
            .is_file()
    );

    // audit where: the user's one object, on both targets
    let (stdout, _) = run(
        zv(&core).args(["audit", "where", "--user", &ids[1], "--json"]),
        0,
    );
    let found: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(found.as_array().unwrap().len(), 2, "{found}");

    // usernames are personal data: in no object key and no cleartext index
    for region in ["ch-gva-2", "ch-dk-2"] {
        let g = fleet.garage(region);
        for key in g.keys().unwrap() {
            assert!(!key.contains("zvuser"), "{key}");
            if key.ends_with(".json") {
                let text = String::from_utf8_lossy(&g.get(&key).unwrap()).into_owned();
                assert!(
                    !text.contains("zvuser") && !text.contains("user."),
                    "{key}: {text}"
                );
            }
        }
    }

    // a change in the series directory alone uploads that user again (the
    // shared unit holds the live index, whose -shm every reader touches)
    let objects = |m: &serde_json::Value| -> Vec<String> {
        ids.iter()
            .map(|id| {
                let unit = m["units"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|u| u["user"] == id.as_str());
                unit.unwrap()["object"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let before = objects(&m);
    std::fs::write(
        users
            .join(series_dir("zvuser002"))
            .join("series-1.0.0.sqlite"),
        "a new point",
    )
    .unwrap();
    let again = backup(&core);
    let after = objects(&common::manifest_of(
        &fleet,
        again["snapshot"].as_str().unwrap(),
    ));
    assert_eq!(after[..2], before[..2], "unchanged users are reused");
    assert_ne!(
        after[2], before[2],
        "the user whose series changed is uploaded again"
    );
}

#[test]
fn a_volume_without_a_user_index_keeps_one_unit_per_user_directory() {
    // Pryv v1 (and the fixture): user-index.db is no database, every
    // user-shaped directory is the user its name says
    let dir = tempfile::tempdir().unwrap();
    let (_fleet, core, ids) = fleet_with_users(dir.path(), 3, 1_000);
    let report = backup(&core);
    assert_eq!(report["units"], ids.len() + 2, "{report}");
}
