//! Restore writes nothing outside DIR by any path at any time, lets no byte
//! of a unit land before its BLAKE3 matched, trusts only signed snapshots,
//! and never lets one bad entry sink the rest. Against Garage, with the
//! real age/zstd/minisign tools for what an attacker or an auditor would use.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::{
    backup, fleet_with_users, hostile_object, manifest, object_of, restore, run, tool, zv,
};
use zonevault_testkit::fixture;

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        out.push(p.clone());
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(files_under(&p));
        }
    }
    out
}

fn private_dir(path: &Path) {
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).unwrap();
}

#[test]
fn a_restore_directory_that_is_a_link_or_writable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, _) = fleet_with_users(dir.path(), 2, 1_000);
    backup(&core);
    let key = fleet.identity("ch");

    let outside = dir.path().join("outside");
    private_dir(&outside);
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    for extra in [&[][..], &["--force"][..]] {
        let (_, stderr) = restore(&core, &key, &link, extra, 2);
        assert!(stderr.contains("is a symbolic link"), "{stderr}");
    }

    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (_, stderr) = restore(&core, &key, &open, &[], 2);
    assert!(
        stderr.contains("writable by other users (mode 0777)"),
        "{stderr}"
    );
    assert!(files_under(&outside).is_empty());
    assert!(files_under(&open).is_empty());
}

#[test]
fn a_link_placed_at_dir_volume_is_never_followed_and_the_rest_restores() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, _) = fleet_with_users(dir.path(), 3, 1_000);
    backup(&core);
    let outside = dir.path().join("outside");
    private_dir(&outside);
    let to = dir.path().join("r");
    private_dir(&to);
    std::os::unix::fs::symlink(&outside, to.join("users")).unwrap();
    let (stdout, stderr) = restore(&core, &fleet.identity("ch"), &to, &["--force"], 1);
    assert!(files_under(&outside).is_empty(), "{stdout}");
    assert!(stdout.contains("NOT restored: unit users/"), "{stdout}");
    assert!(
        stdout.contains("a link or a file there is not followed"),
        "{stdout}"
    );
    assert!(stderr.contains("4 of 5 units failed"), "{stderr}");
    // the other volume is whole
    assert_eq!(
        fixture::tree(&to.join("etc")).unwrap(),
        fixture::tree(&fleet.volumes_dir("core-ch-1").join("etc")).unwrap()
    );
    assert!(!to.join(zonevault::unpack::STAGING).exists());
}

#[test]
fn a_link_planted_while_restore_runs_redirects_no_write() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, _) = fleet_with_users(dir.path(), 300, 2_000);
    backup(&core);
    let outside = dir.path().join("outside");
    private_dir(&outside);
    let to = dir.path().join("r");
    private_dir(&to);

    // The racer: whenever DIR/users is a real directory, move it away and put
    // a link to `outside` in its place, then take the link away again.
    let stop = Arc::new(AtomicBool::new(false));
    // real directories that restore made and the racer moved away: the race ran
    let moves = Arc::new(AtomicUsize::new(0));
    let racer = {
        let (stop, moves, to, outside) = (stop.clone(), moves.clone(), to.clone(), outside.clone());
        std::thread::spawn(move || {
            let users = to.join("users");
            while !stop.load(Ordering::Relaxed) {
                if std::fs::symlink_metadata(&users).is_ok_and(|m| m.is_dir()) {
                    let n = moves.fetch_add(1, Ordering::Relaxed);
                    let _ = std::fs::rename(&users, to.join(format!("moved-{n}")));
                }
                let _ = std::os::unix::fs::symlink(&outside, &users);
                std::thread::sleep(std::time::Duration::from_micros(300));
                if std::fs::symlink_metadata(&users).is_ok_and(|m| m.is_symlink()) {
                    let _ = std::fs::remove_file(&users);
                }
                // as long without a link as with one: restore gets to create
                // DIR/users often enough for the racer to catch it, however
                // fast it fails the units that met the link
                std::thread::sleep(std::time::Duration::from_micros(300));
            }
        })
    };
    let out = zv(&core)
        .args(["restore", "--snapshot", "latest", "--force", "--identity"])
        .arg(fleet.identity("ch"))
        .arg("--to")
        .arg(&to)
        .timeout(std::time::Duration::from_secs(300))
        .output()
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    racer.join().unwrap();
    let (stdout, stderr) = common::output_text(&out);
    assert!(
        moves.load(Ordering::Relaxed) > 0,
        "restore never created DIR/users between two swaps: the race did not run\n{stderr}"
    );
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{stdout}\n{stderr}"
    );
    assert!(
        files_under(&outside).is_empty(),
        "written through the link: {:?}",
        files_under(&outside)
    );
}

#[test]
fn a_swapped_object_never_lands_with_or_without_a_good_copy() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, ids) = fleet_with_users(dir.path(), 3, 50_000);
    // objects are swapped whole
    common::one_object_per_unit(&core);
    backup(&core);
    let victim = &ids[1];
    let key = object_of(&fleet, victim);
    let victim_dir = fixture::user_dir(victim);
    // valid age, in the victim's own directory: only the BLAKE3 tells it apart
    let evil_path = format!("{}/evil.txt", victim_dir.display());
    let dir_path = format!("{}", victim_dir.display());
    let hostile = hostile_object(
        &fleet,
        victim,
        &[
            (dir_path.as_str(), tar::EntryType::Directory, ""),
            (evil_path.as_str(), tar::EntryType::Regular, "planted"),
        ],
    );
    let source = fleet.volumes_dir("core-ch-1").join("users");

    // one copy swapped: the other target's copy restores; nothing of the
    // swapped one stays
    fleet.garage("ch-gva-2").put(&key, &hostile).unwrap();
    let to = dir.path().join("r1");
    let (_, stderr) = restore(&core, &fleet.identity("ch"), &to, &[], 0);
    assert!(
        stderr.contains(&format!("object {key} on target ch-primary"))
            && stderr.contains("integrity check failed"),
        "{stderr}"
    );
    assert!(!to.join("users").join(&evil_path).exists());
    let mut expected = fixture::tree(&source).unwrap();
    expected.retain(|p, _| p.extension().is_none_or(|e| e != "tmp")); // excluded
    assert_eq!(fixture::tree(&to.join("users")).unwrap(), expected);

    // both copies swapped: the unit fails, nothing of it is in DIR, the
    // other units are restored
    fleet.garage("ch-dk-2").put(&key, &hostile).unwrap();
    let to = dir.path().join("r2");
    let (stdout, stderr) = restore(&core, &fleet.identity("ch"), &to, &[], 1);
    assert!(
        stdout.contains(&format!("NOT restored: unit users/user {victim}")),
        "{stdout}"
    );
    assert!(stderr.contains("1 of 5 units failed"), "{stderr}");
    assert!(!to.join("users").join(&victim_dir).exists(), "{stdout}");
    assert!(to.join("users").join(fixture::user_dir(&ids[0])).is_dir());
    assert!(!to.join(zonevault::unpack::STAGING).exists());
    // --json says why: no target holds an intact copy
    let to = dir.path().join("r2-json");
    let (stdout, _) = restore(
        &core,
        &fleet.identity("ch"),
        &to,
        &["--user", victim, "--json"],
        1,
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["failed"][0]["reason"], "integrity", "{report}");

    // another user's (authentic) object under the victim's key: encrypted
    // to the other user's data key, it does not even open (before per-user
    // keys its entries outside the victim's directory refused it)
    let other = object_of(&fleet, &ids[2]);
    let body = fleet.garage("ch-gva-2").get(&other).unwrap();
    fleet.garage("ch-gva-2").put(&key, &body).unwrap();
    fleet.garage("ch-dk-2").put(&key, &body).unwrap();
    let to = dir.path().join("r3");
    let (stdout, _) = restore(
        &core,
        &fleet.identity("ch"),
        &to,
        &["--user", victim, "--json"],
        1,
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["failed"][0]["reason"], "integrity", "{report}");
    assert!(
        report["failed"][0]["error"]
            .as_str()
            .unwrap()
            .contains("not encrypted to its data key"),
        "{report}"
    );
    assert!(files_under(&to.join("users")).is_empty(), "{stdout}");
    // entries of another user's directory, encrypted to the victim's key
    // (its recipient is no secret): refused whole by the unit's scope
    let foreign = format!("{}/planted.txt", fixture::user_dir(&ids[2]).display());
    let hostile = hostile_object(
        &fleet,
        victim,
        &[(foreign.as_str(), tar::EntryType::Regular, "planted")],
    );
    fleet.garage("ch-gva-2").put(&key, &hostile).unwrap();
    fleet.garage("ch-dk-2").put(&key, &hostile).unwrap();
    let to = dir.path().join("r4");
    let (stdout, _) = restore(&core, &fleet.identity("ch"), &to, &["--user", victim], 1);
    assert!(
        stdout.contains("not under its user's directories"),
        "{stdout}"
    );
    assert!(files_under(&to.join("users")).is_empty(), "{stdout}");
}

/// Replaces the manifest on both ch targets with `body`.
fn replace_manifest(fleet: &common::Fleet, body: &[u8]) {
    for region in ["ch-gva-2", "ch-dk-2"] {
        let g = fleet.garage(region);
        let key = g
            .keys()
            .unwrap()
            .into_iter()
            .find(|k| k.ends_with(".manifest.age"))
            .unwrap();
        g.put(&key, body).unwrap();
    }
}

#[test]
fn a_forged_manifest_is_refused_by_its_signature() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, _) = fleet_with_users(dir.path(), 2, 1_000);
    backup(&core);
    // the reference tool checks what zonevault signed
    let gva = fleet.garage("ch-gva-2");
    let keys = gva.keys().unwrap();
    let index = keys
        .iter()
        .find(|k| k.contains("/snapshots/") && k.ends_with(".json"))
        .unwrap();
    let check = dir.path().join("check");
    std::fs::create_dir(&check).unwrap();
    std::fs::write(check.join("index.json"), gva.get(index).unwrap()).unwrap();
    std::fs::write(
        check.join("index.json.minisig"),
        gva.get(&format!("{index}.minisig")).unwrap(),
    )
    .unwrap();
    let public = &fleet.zone("ch").signing_keys[0].1;
    let out = tool(
        "minisign",
        &[
            "-V",
            "-P",
            public,
            "-m",
            check.join("index.json").to_str().unwrap(),
        ],
        b"",
    );
    assert!(
        String::from_utf8_lossy(&out).contains("zonevault core=core-ch-1 zone=ch"),
        "{}",
        String::from_utf8_lossy(&out)
    );

    // the same manifest, encrypted again by someone with its recipient
    // (the core's data key: a recipient is no secret)
    let index = common::only_index(&fleet);
    let recipient =
        common::data_key_recipient(&fleet, index["manifest"]["data_key"].as_str().unwrap());
    let forged = tool(
        "age",
        &["-r", &recipient],
        &serde_json::to_vec(&manifest(&fleet)).unwrap(),
    );
    replace_manifest(&fleet, &forged);
    let to = dir.path().join("r1");
    let (_, stderr) = restore(&core, &fleet.identity("ch"), &to, &[], 1);
    assert!(
        stderr.contains("fails its signature check") && stderr.contains(".manifest.age"),
        "{stderr}"
    );
    assert!(files_under(&to).is_empty());

    // with the signatures removed too: a warning, and refused when required
    for region in ["ch-gva-2", "ch-dk-2"] {
        let g = fleet.garage(region);
        for k in g
            .keys()
            .unwrap()
            .into_iter()
            .filter(|k| k.ends_with(".minisig"))
        {
            g.delete(&k).unwrap();
        }
    }
    let (_, stderr) = restore(
        &core,
        &fleet.identity("ch"),
        &dir.path().join("r2"),
        &["--require-signed"],
        1,
    );
    assert!(
        stderr.contains("is not signed, and --require-signed was given"),
        "{stderr}"
    );
    let (_, stderr) = restore(&core, &fleet.identity("ch"), &dir.path().join("r3"), &[], 0);
    assert!(stderr.contains("is not signed"), "{stderr}");

    // a key the zone map does not list: backup refuses to sign with it
    let mut fleet = fleet;
    fleet.zone_mut("ch").signing_keys[0].1 = zonevault::signing::Signer::generate().unwrap().1;
    fleet.write_configs().unwrap();
    let (_, stderr) = run(zv(&core).arg("backup"), 2);
    assert!(
        stderr.contains("is not listed in") && stderr.contains("zones.ch.signing_keys.core-ch-1"),
        "{stderr}"
    );
}

#[test]
fn links_that_leave_a_plain_volume_restore_as_links() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, _) = fleet_with_users(dir.path(), 1, 1_000);
    let etc = fleet.volumes_dir("core-ch-1").join("etc");
    std::fs::write(etc.join("a.conf"), "a = 1\n").unwrap();
    std::os::unix::fs::symlink("/etc/shadow", etc.join("absolute-link")).unwrap();
    std::os::unix::fs::symlink("../../outside", etc.join("escaping-link")).unwrap();
    std::os::unix::fs::symlink("core.yml", etc.join("fine-link")).unwrap();
    run(zv(&core).args(["backup"]), 0);
    let to = dir.path().join("r");
    restore(&core, &fleet.identity("ch"), &to, &["--volume", "etc"], 0);
    for (link, target) in [
        ("absolute-link", "/etc/shadow"),
        ("escaping-link", "../../outside"),
        ("fine-link", "core.yml"),
    ] {
        assert_eq!(
            std::fs::read_link(to.join("etc").join(link)).unwrap(),
            Path::new(target)
        );
    }
    assert_eq!(
        std::fs::read_to_string(to.join("etc/a.conf")).unwrap(),
        "a = 1\n"
    );
    assert!(to.join("etc/core.yml").is_file());
}

#[test]
fn a_link_named_like_a_user_directory_restores_with_the_shared_unit() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, _) = fleet_with_users(dir.path(), 2, 1_000);
    let users = fleet.volumes_dir("core-ch-1").join("users");
    std::fs::create_dir_all(users.join("c/b/a")).unwrap();
    std::os::unix::fs::symlink("/nowhere", users.join("c/b/a/xyzabc")).unwrap();
    run(zv(&core).args(["backup"]), 0);
    let to = dir.path().join("r");
    restore(&core, &fleet.identity("ch"), &to, &[], 0);
    assert_eq!(
        std::fs::read_link(to.join("users/c/b/a/xyzabc")).unwrap(),
        Path::new("/nowhere")
    );
    assert!(to.join("users/user-index.db").exists());
}

#[test]
fn an_entry_that_cannot_be_placed_is_refused_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, _) = fleet_with_users(dir.path(), 1, 1_000);
    let etc = fleet.volumes_dir("core-ch-1").join("etc");
    std::fs::write(etc.join("a.conf"), "a = 1\n").unwrap();
    std::fs::write(etc.join("b.conf"), "b = 2\n").unwrap();
    run(zv(&core).args(["backup"]), 0);
    let to = dir.path().join("r");
    private_dir(&to.join("etc/a.conf"));
    std::fs::write(to.join("etc/b.conf"), "old\n").unwrap();

    let (stdout, stderr) = restore(
        &core,
        &fleet.identity("ch"),
        &to,
        &["--force", "--volume", "etc", "--json"],
        1,
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let refused = report["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 1, "{report}");
    assert_eq!(refused[0]["path"], "etc/a.conf");
    assert!(
        refused[0]["reason"]
            .as_str()
            .unwrap()
            .contains("a directory exists there"),
        "{report}"
    );
    assert!(stderr.contains("1 entries refused"), "{stderr}");
    // --force replaced the file, and everything else is there
    assert_eq!(
        std::fs::read_to_string(to.join("etc/b.conf")).unwrap(),
        "b = 2\n"
    );
    assert!(to.join("etc/core.yml").is_file());
}

#[test]
fn stray_objects_among_the_indexes_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, _) = fleet_with_users(dir.path(), 2, 1_000);
    let snapshot = backup(&core)["snapshot"].as_str().unwrap().to_string();
    for region in ["ch-gva-2", "ch-dk-2"] {
        let g = fleet.garage(region);
        g.put("zonevault/core-ch-1/snapshots/empty.json", b"")
            .unwrap();
        g.put(
            "zonevault/core-ch-1/snapshots/20991231T000000Z-000000000000.json",
            br#"{"hello": "world"}"#,
        )
        .unwrap();
    }
    let (stdout, stderr) = run(zv(&core).args(["snapshots", "--json"]), 0);
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert!(stderr.contains("skipping"), "{stderr}");
    restore(&core, &fleet.identity("ch"), &dir.path().join("r"), &[], 0);
    let second = backup(&core)["snapshot"].as_str().unwrap().to_string();
    assert_ne!(second, snapshot);
    run(zv(&core).args(["forget"]), 0);
    // the strays are not the run's to delete
    assert!(
        fleet
            .garage("ch-gva-2")
            .keys()
            .unwrap()
            .iter()
            .any(|k| k.ends_with("snapshots/empty.json"))
    );
}

#[test]
fn backups_in_the_same_second_get_their_own_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let (_fleet, core, _) = fleet_with_users(dir.path(), 1, 100);
    let ids: Vec<String> = (0..4)
        .map(|_| backup(&core)["snapshot"].as_str().unwrap().to_string())
        .collect();
    let (stdout, _) = run(zv(&core).args(["snapshots", "--json"]), 0);
    let listed: Vec<String> = serde_json::from_str::<serde_json::Value>(&stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    let mut expected = ids.clone();
    expected.sort();
    let mut got = listed.clone();
    got.sort();
    assert_eq!(got, expected);
}

#[test]
fn a_commit_never_replaces_an_existing_index() {
    use zonevault::audit::ObjectKind;
    use zonevault::residency::Contents;
    let dir = tempfile::tempdir().unwrap();
    let (_fleet, core, _) = fleet_with_users(dir.path(), 1, 100);
    let config = zonevault::config::Config::load(&core).unwrap();
    let audit = Arc::new(zonevault::audit::AuditLog::start(&config, "test").unwrap());
    zonevault_testkit::garage::block_on(async {
        let targets = zonevault::targets::writable(&config, &audit).await.unwrap();
        let t = &targets[0];
        let contents = Contents::of(ObjectKind::Index);
        let rel =
            zonevault::repository::layout::index_key("core-ch-1", "20261201T000000Z-000000000000");
        t.put_new(&rel, bytes::Bytes::from_static(b"first"), &contents)
            .await
            .unwrap();
        let e = t
            .put_new(&rel, bytes::Bytes::from_static(b"second"), &contents)
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("already exists"), "{e:#}");
        use zonevault::storage::ReadBackend;
        assert_eq!(
            t.store().get(&t.key(&rel)).await.unwrap().unwrap(),
            b"first"
        );
    });
}
