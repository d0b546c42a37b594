//! Incremental runs and `forget` against two Garage zones: unchanged users
//! are not uploaded again, retention deletes only what no kept snapshot
//! needs, and a forget killed midway is finished by the next one.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use common::{Fleet, fleet, process, run, zv};
use serde_json::Value;
use zonevault_testkit::fixture::{self, Spec};

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn backup(core: &Path, extra: &[&str]) -> Value {
    let (stdout, _) = run(zv(core).args(["backup", "--json"]).args(extra), 0);
    json(&stdout)
}

/// A fleet with `users` generated users on core-ch-1 and, when given, a
/// retention policy for zone ch.
fn setup(dir: &Path, users: usize, retention: &str) -> (Fleet, PathBuf, Vec<String>) {
    let (mut fleet, _) = fleet(dir);
    fleet.zone_mut("ch").retention = retention.to_string();
    let core = fleet.write_configs().unwrap();
    let ids = fleet
        .users_fixture("core-ch-1", &Spec::new(users, 4_000))
        .unwrap();
    (fleet, core, ids)
}

fn keys(fleet: &Fleet, region: &str, part: &str) -> Vec<String> {
    let mut keys: Vec<String> = fleet
        .garage(region)
        .keys()
        .unwrap()
        .into_iter()
        .filter(|k| k.contains(part))
        .collect();
    keys.sort();
    keys
}

/// The unit objects written, per the audit log: (users, key) of each object_put of kind unit.
fn unit_puts(core: &Path) -> Vec<(Vec<String>, String)> {
    let (stdout, _) = run(
        zv(core).args(["audit", "show", "--event", "object_put", "--json"]),
        0,
    );
    json(&stdout)
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "unit")
        .map(|r| {
            let users = r["users"]
                .as_array()
                .map(|u| u.iter().map(|v| v.as_str().unwrap().to_string()).collect())
                .unwrap_or_default();
            (users, r["key"].as_str().unwrap().to_string())
        })
        .collect()
}

/// Restores snapshot `id` into a new folder and returns the digest of its users volume.
fn restored_tree(fleet: &Fleet, core: &Path, id: &str, to: &Path) -> BTreeMap<PathBuf, String> {
    run(
        zv(core)
            .args([
                "restore",
                "--volume",
                "users",
                "--json",
                "--snapshot",
                id,
                "--identity",
            ])
            .arg(fleet.identity("ch"))
            .arg("--to")
            .arg(to),
        0,
    );
    fixture::tree(&to.join("users")).unwrap()
}

/// Asserts two trees are equal, naming the first entries that differ.
fn assert_same(a: &BTreeMap<PathBuf, String>, b: &BTreeMap<PathBuf, String>, what: &str) {
    let diff: Vec<String> = a
        .keys()
        .chain(b.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .take(5)
        .map(|k| format!("{}: {:?} vs {:?}", k.display(), a.get(k), b.get(k)))
        .collect();
    assert!(
        diff.is_empty(),
        "{what}: trees differ:\n{}",
        diff.join("\n")
    );
}

/// The users volume as a restore gives it back: without the `*.tmp` files
/// that the fleet's config excludes.
fn source_tree(fleet: &Fleet) -> BTreeMap<PathBuf, String> {
    let mut tree = fixture::tree(&fleet.volumes_dir("core-ch-1").join("users")).unwrap();
    tree.retain(|p, _| p.extension().is_none_or(|e| e != "tmp"));
    tree
}

/// Appends to one user's events file (changes size, mtime and ctime).
fn change_user(fleet: &Fleet, user: &str) {
    let dir = fleet
        .volumes_dir("core-ch-1")
        .join("users")
        .join(fixture::user_dir(user));
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_file())
        .unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(file).unwrap();
    std::io::Write::write_all(&mut f, b"one more event\n").unwrap();
}

#[test]
fn unchanged_users_are_not_uploaded_again() {
    let dir = tempfile::tempdir().unwrap();
    let (mut fleet, core, ids) = setup(dir.path(), 30, "");
    let first = backup(&core, &[]);
    assert_eq!(first["units"], 32);
    assert_eq!(first["uploaded"], 32);
    let objects = keys(&fleet, "ch-gva-2", "/objects/");
    let puts = unit_puts(&core).len();

    // unchanged: no unit object is written
    let second = backup(&core, &[]);
    assert_eq!(second["units"], 32);
    assert_eq!(second["uploaded"], 0, "{second}");
    assert_eq!(second["reused"], 32);
    assert_eq!(keys(&fleet, "ch-gva-2", "/objects/"), objects);
    assert_eq!(unit_puts(&core).len(), puts);

    // one user changed: exactly that user's unit, on both targets
    change_user(&fleet, &ids[7]);
    let third = backup(&core, &[]);
    assert_eq!(third["uploaded"], 1, "{third}");
    let new: Vec<(Vec<String>, String)> = unit_puts(&core).into_iter().skip(puts).collect();
    assert_eq!(new.len(), 2, "one object, two targets: {new:?}");
    assert!(new.iter().all(|(users, _)| users == &[ids[7].clone()]));
    // and the incremental snapshot restores whole
    let tree = restored_tree(&fleet, &core, "latest", &dir.path().join("r3"));
    assert_same(&tree, &source_tree(&fleet), "restored vs source");

    // --full uploads everything again
    let full = backup(&core, &["--full"]);
    assert_eq!(full["uploaded"], 32);

    // a mode change alone (same size and mtime; ctime moves) is a change
    let file = fleet
        .volumes_dir("core-ch-1")
        .join("users")
        .join(fixture::user_dir(&ids[3]))
        .join("events.db");
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), mtime);
    let chmod = backup(&core, &[]);
    assert_eq!(chmod["uploaded"], 1, "{chmod}");

    // new recipients for the zone: the units are encrypted to data keys,
    // which `zonevault rewrap` wraps again; no unit is uploaded again
    let de = fleet.zone("de").recipients[0].clone();
    fleet.zone_mut("ch").recipients.push(de);
    fleet.write_configs().unwrap();
    assert_eq!(backup(&core, &[])["uploaded"], 0);

    // a state dir without unit state (a fresh machine): a full run
    std::fs::remove_file(dir.path().join("state/core-ch-1/units.json")).unwrap();
    assert_eq!(backup(&core, &[])["uploaded"], 32);

    // an object that no committed snapshot references any more is uploaded again
    for region in ["ch-gva-2", "ch-dk-2"] {
        for index in keys(&fleet, region, "/snapshots/") {
            if index.ends_with(".json") {
                fleet.garage(region).delete(&index).unwrap();
            }
        }
    }
    let again = backup(&core, &[]);
    assert_eq!(again["uploaded"], 32, "{again}");
    let tree = restored_tree(&fleet, &core, "latest", &dir.path().join("r-again"));
    assert_same(&tree, &source_tree(&fleet), "restored vs source");
}

#[test]
fn forget_keeps_what_kept_snapshots_need_and_they_restore() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, ids) = setup(dir.path(), 12, "keep_last = 2");
    // one object per unit, so that an object's fate is its unit's (a pack
    // lives while any of its units is referenced)
    common::one_object_per_unit(&core);
    // four snapshots; each changes one user, so they share most objects
    let mut snapshots = Vec::new();
    let mut trees = Vec::new();
    for (i, user) in ids.iter().enumerate().take(4) {
        if i > 0 {
            change_user(&fleet, user);
        }
        snapshots.push(backup(&core, &[])["snapshot"].as_str().unwrap().to_string());
        trees.push(source_tree(&fleet));
    }
    let before: Vec<Vec<String>> = ["ch-gva-2", "ch-dk-2"]
        .iter()
        .map(|r| keys(&fleet, r, "zonevault/core-ch-1/"))
        .collect();

    // --dry-run: the plan, and nothing changes
    let (stdout, _) = run(zv(&core).args(["forget", "--dry-run", "--json"]), 0);
    let plan = json(&stdout);
    assert_eq!(plan["kept"], 2);
    assert_eq!(plan["forgotten"], 2);
    let decisions = plan["snapshots"].as_array().unwrap();
    assert_eq!(decisions[0]["id"], snapshots[3].as_str());
    assert_eq!(decisions[0]["reasons"][0], "last");
    assert_eq!(decisions[3]["keep"], false);
    assert_eq!(decisions[3]["reasons"][0], "no rule keeps it");
    let (stdout, _) = run(zv(&core).args(["forget", "--dry-run"]), 0);
    assert!(stdout.contains("nothing changed"), "{stdout}");
    for (r, region) in ["ch-gva-2", "ch-dk-2"].iter().enumerate() {
        assert_eq!(keys(&fleet, region, "zonevault/core-ch-1/"), before[r]);
    }

    // forget: the two oldest go; objects the kept two share with them stay
    let (stdout, _) = run(zv(&core).args(["forget", "--json"]), 0);
    let done = json(&stdout);
    assert_eq!(done["forgotten"], 2);
    for region in ["ch-gva-2", "ch-dk-2"] {
        let indexes: Vec<String> = keys(&fleet, region, "/snapshots/")
            .into_iter()
            .filter(|k| k.ends_with(".json"))
            .collect();
        assert_eq!(indexes.len(), 2, "{region}: {indexes:?}");
        assert!(
            indexes
                .iter()
                .all(|k| k.contains(&snapshots[2]) || k.contains(&snapshots[3]))
        );
        // exactly the objects the kept snapshots reference remain
        let manifests = keys(&fleet, region, ".manifest.age");
        assert_eq!(
            manifests.len(),
            4,
            "manifests and their signatures: {manifests:?}"
        );
        // the signatures of the forgotten snapshots went with them
        assert_eq!(keys(&fleet, region, ".minisig").len(), 4, "{region}");
    }
    // 12 users + shared + etc = 14 units in the newest; the snapshot before it
    // differs by one user: 15 objects are referenced by the two kept snapshots
    assert_eq!(keys(&fleet, "ch-gva-2", "/objects/").len(), 15);
    // each kept snapshot restores to the tree it was taken of
    for k in [2, 3] {
        let tree = restored_tree(
            &fleet,
            &core,
            &snapshots[k],
            &dir.path().join(format!("r{k}")),
        );
        assert_same(&tree, &trees[k], &format!("snapshot {k}"));
    }
    // on the record
    let (stdout, _) = run(
        zv(&core).args(["audit", "show", "--event", "snapshot_forgotten", "--json"]),
        0,
    );
    let forgotten = json(&stdout);
    assert_eq!(
        forgotten.as_array().unwrap().len(),
        4,
        "two snapshots on two targets"
    );
    let (stdout, _) = run(
        zv(&core).args(["audit", "where", "--user", &ids[1], "--json"]),
        0,
    );
    // user 1 changed in snapshot 1 (forgotten): the object of snapshot 0 is gone,
    // the one written by snapshot 1 is still referenced by 2 and 3
    assert_eq!(json(&stdout).as_array().unwrap().len(), 2);
    // a second forget has nothing to do
    let (stdout, _) = run(zv(&core).args(["forget", "--json"]), 0);
    assert_eq!(json(&stdout)["forgotten"], 0);
    run(zv(&core).args(["audit", "verify"]), 0);
}

#[test]
fn a_forget_killed_midway_is_finished_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, _) = setup(dir.path(), 150, "keep_last = 1");
    // many objects to delete, so that the kill lands in the middle
    common::one_object_per_unit(&core);
    for _ in 0..3 {
        backup(&core, &["--full"]);
    }
    let kept = backup(&core, &["--full"])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let index_count = |region: &str| {
        keys(&fleet, region, "/snapshots/")
            .iter()
            .filter(|k| k.ends_with(".json"))
            .count()
    };
    let mut child = process(&core)
        .arg("forget")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // kill it once it has started deleting
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while index_count("ch-gva-2") == 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "forget deleted nothing"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let objects_after_kill = keys(&fleet, "ch-gva-2", "/objects/").len();
    // whatever the kill left: the kept snapshot is whole
    let tree = restored_tree(&fleet, &core, &kept, &dir.path().join("mid"));
    assert_same(&tree, &source_tree(&fleet), "restored vs source");

    let (stdout, _) = run(zv(&core).args(["forget", "--json"]), 0);
    let done = json(&stdout);
    assert_eq!(done["kept"], 1);
    for region in ["ch-gva-2", "ch-dk-2"] {
        assert_eq!(index_count(region), 1, "{region}");
        assert_eq!(keys(&fleet, region, ".manifest.age").len(), 2); // + signature
        assert_eq!(keys(&fleet, region, ".minisig").len(), 2, "{region}");
        // only the kept snapshot's objects: 150 users + shared + etc
        assert_eq!(keys(&fleet, region, "/objects/").len(), 152, "{region}");
    }
    assert!(
        objects_after_kill > 152,
        "the kill landed before forget finished deleting ({objects_after_kill} objects left)"
    );
    let tree = restored_tree(&fleet, &core, &kept, &dir.path().join("after"));
    assert_same(&tree, &source_tree(&fleet), "restored vs source");
    run(zv(&core).args(["audit", "verify"]), 0);
}

#[test]
fn forget_errors_and_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let (_fleet, core, _) = setup(dir.path(), 2, "keep_yearly = 5\nmax_age = \"1y\"");
    // check warns that keep_yearly can never be honoured, and passes
    let (stdout, _) = run(zv(&core).arg("check"), 0);
    assert!(
        stdout.contains("warning: keep_yearly = 5 reaches back further than max_age"),
        "{stdout}"
    );
    let (stdout, _) = run(zv(&core).args(["check", "--json"]), 0);
    assert_eq!(json(&stdout)["warnings"].as_array().unwrap().len(), 1);
    // nothing to forget yet
    let (stdout, _) = run(zv(&core).arg("forget"), 0);
    assert!(stdout.contains("has no snapshot"), "{stdout}");
    // another zone's core is refused; an unknown core is a usage error
    let (_, e) = run(zv(&core).args(["forget", "--core", "core-de-1"]), 3);
    assert!(e.contains("belongs to zone de"), "{e}");
    let (_, e) = run(zv(&core).args(["forget", "--core", "nope"]), 2);
    assert!(e.contains("no core \"nope\""), "{e}");
    // with snapshots: kept by yearly
    backup(&core, &[]);
    let (stdout, _) = run(zv(&core).args(["forget", "--json"]), 0);
    let done = json(&stdout);
    assert_eq!(done["kept"], 1);
    assert_eq!(done["snapshots"][0]["reasons"][0], "yearly");
    let seen: HashSet<&str> = done["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(seen.len(), 1);
}
