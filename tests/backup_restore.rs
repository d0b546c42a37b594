//! backup → snapshots → restore against two Garage zones, with the real
//! age/zstd/tar tools for the disaster path.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::{
    Fleet, backup, fleet, fleet_with_users, hostile_object, manifest, object_of, output_text,
    process, restore, run, spoof_ch_secondary, tool, zv,
};
use zonevault_testkit::fixture;

fn object_keys(fleet: &Fleet, region: &str) -> Vec<String> {
    fleet
        .garage(region)
        .keys()
        .unwrap()
        .into_iter()
        .filter(|k| k.contains("/objects/"))
        .collect()
}

#[test]
fn round_trip_of_200_users_stays_in_the_zone() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, ids) = fleet_with_users(dir.path(), 200, 20_000);
    let report = backup(&core);
    // 200 user units + the shared unit + the plain etc volume
    assert_eq!(report["units"], 202, "{report}");

    // listed from the cleartext index
    let (stdout, _) = run(zv(&core).args(["snapshots", "--json"]), 0);
    let list: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], report["snapshot"]);
    assert_eq!(list[0]["units"], 202);

    // objects in both targets of zone ch, none in zone de, no user id in any key
    // small units share packs: fewer objects than units, each referenced
    let gva = object_keys(&fleet, "ch-gva-2");
    let dk = object_keys(&fleet, "ch-dk-2");
    assert!(
        gva.len() < 202 && gva.iter().any(|k| k.ends_with(".pack")),
        "{gva:?}"
    );
    assert_eq!(
        gva.iter()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        common::indexed_objects(&fleet, "ch-gva-2")
    );
    assert_eq!(gva, dk, "every object goes to each target of the zone");
    assert!(fleet.garage("de-fra-1").keys().unwrap().is_empty());
    for key in fleet.garage("ch-gva-2").keys().unwrap() {
        for id in &ids {
            assert!(!key.contains(id.as_str()), "{key} holds user id {id}");
        }
    }

    // restore on "a fresh machine": only the configs, credentials and identity
    std::fs::remove_dir_all(dir.path().join("state")).ok();
    let to = dir.path().join("restored");
    restore(&core, &fleet.identity("ch"), &to, &[], 0);
    let source = fleet.volumes_dir("core-ch-1");
    let mut expected = fixture::tree(&source).unwrap();
    expected.retain(|p, _| !p.to_string_lossy().ends_with(".tmp")); // excluded by *.tmp
    // The volume roots themselves are DIR/<volume>, made by restore: their
    // own mode and mtime are not part of any unit.
    let mut got = fixture::tree(&to).unwrap();
    for root in ["users", "etc"] {
        assert!(
            got.remove(Path::new(root)).is_some() && expected.remove(Path::new(root)).is_some()
        );
    }
    assert_same_tree(&got, &expected);
}

/// Asserts two tree digests are equal, printing only the entries that differ.
fn assert_same_tree(
    got: &std::collections::BTreeMap<PathBuf, String>,
    want: &std::collections::BTreeMap<PathBuf, String>,
) {
    let mut diffs = Vec::new();
    for (path, w) in want {
        match got.get(path) {
            Some(g) if g == w => {}
            Some(g) => diffs.push(format!("{}: restored {g}, source {w}", path.display())),
            None => diffs.push(format!("{}: missing", path.display())),
        }
    }
    diffs.extend(
        got.keys()
            .filter(|p| !want.contains_key(*p))
            .map(|p| format!("{}: extra", p.display())),
    );
    assert!(
        diffs.is_empty(),
        "{} differences, first ones:\n{}",
        diffs.len(),
        diffs[..diffs.len().min(10)].join("\n")
    );
}

/// The user's directory under `to/users` is the one on core-ch-1.
fn assert_user_restored(fleet: &Fleet, to: &Path, id: &str) {
    let user_dir = fixture::user_dir(id);
    assert_same_tree(
        &fixture::tree(&to.join("users").join(&user_dir)).unwrap(),
        &fixture::tree(&fleet.volumes_dir("core-ch-1").join("users").join(&user_dir)).unwrap(),
    );
}

#[test]
fn reference_tools_restore_a_unit() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, ids) = fleet_with_users(dir.path(), 3, 50_000);
    backup(&core);
    // find the object of user ids[1] through the manifest, as an operator
    // would: the index names the manifest and its data key
    let manifest = common::manifest(&fleet);
    let key = fleet.identity("ch");
    let unit = manifest["units"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["user"] == ids[1].as_str())
        .unwrap();
    let object = fleet
        .garage("ch-gva-2")
        .get(&format!("zonevault/{}", unit["object"].as_str().unwrap()))
        .unwrap();
    // small users share a pack: the unit is its byte range, cut as
    // docs/format.md says (a ranged GET does the same)
    let offset = unit["offset"].as_u64().expect("a 50 kB user is packed");
    let size = unit["stored_size"].as_u64().unwrap();
    // from the downloaded pack, as docs/format.md has it (dd stops reading
    // at the range's end: a pipe into it would break)
    let pack = dir.path().join("pack");
    std::fs::write(&pack, &object).unwrap();
    let sealed = tool(
        "dd",
        &[
            &format!("if={}", pack.display()),
            "iflag=skip_bytes,count_bytes",
            &format!("skip={offset}"),
            &format!("count={size}"),
            "bs=64K",
            "status=none",
        ],
        &[],
    );
    assert_eq!(sealed.len() as u64, size);

    // age -d -i zone.key keys/K.age > K.key; age -d -i K.key OBJ | zstd -d | tar -x
    let out = dir.path().join("by-hand");
    std::fs::create_dir_all(&out).unwrap();
    let data_key = unit["data_key"]
        .as_str()
        .expect("a user unit has its own key");
    assert!(
        !data_key.contains(ids[1].as_str()),
        "no user id in a key name: {data_key}"
    );
    let (_keys, user_key) = common::data_key_file(&fleet, data_key);
    let tar = tool(
        "zstd",
        &["-d"],
        &tool("age", &["-d", "-i", user_key.to_str().unwrap()], &sealed),
    );
    // the zone identity alone does not open a user's unit
    let zone_only = std::process::Command::new("age")
        .args(["-d", "-i", key.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(&sealed)?;
            c.wait()
        })
        .unwrap();
    assert!(!zone_only.success());
    assert_eq!(
        blake3::hash(&tar).to_hex().as_str(),
        unit["blake3"].as_str().unwrap()
    );
    tool("tar", &["-x", "-C", out.to_str().unwrap()], &tar);

    let user_dir = fixture::user_dir(&ids[1]);
    let source = fleet.volumes_dir("core-ch-1").join("users").join(&user_dir);
    assert_same_tree(
        &fixture::tree(&out.join(&user_dir)).unwrap(),
        &fixture::tree(&source).unwrap(),
    );
}

#[test]
fn spoofed_region_gets_zero_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut fleet, _) = fleet(dir.path());
    let core = spoof_ch_secondary(&mut fleet);
    let (_, stderr) = run(zv(&core).arg("backup"), 3);
    assert!(
        stderr.contains("de-fra-1") && stderr.contains("nothing written"),
        "{stderr}"
    );
    assert!(fleet.garage("de-fra-1").keys().unwrap().is_empty());
    assert!(fleet.garage("ch-gva-2").keys().unwrap().is_empty());
}

#[test]
fn restore_errors_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, ids) = fleet_with_users(dir.path(), 5, 10_000);
    let snapshot = backup(&core)["snapshot"].as_str().unwrap().to_string();
    let key = fleet.identity("ch");

    // one user only
    let to = dir.path().join("one-user");
    restore(&core, &key, &to, &["--user", &ids[2]], 0);
    let restored = fixture::tree(&to.join("users")).unwrap();
    let user_dir = fixture::user_dir(&ids[2]);
    assert!(!restored.is_empty());
    assert!(
        restored
            .keys()
            .all(|p| user_dir.starts_with(p) || p.starts_with(&user_dir)),
        "{restored:?}"
    );
    assert!(!to.join("etc").exists());

    // the wrong identity: one sentence
    let (_, stderr) = restore(&core, &fleet.identity("de"), &dir.path().join("x1"), &[], 1);
    assert_eq!(
        stderr.trim(),
        format!("error: this identity cannot decrypt snapshot {snapshot} of zone ch")
    );

    // a non-empty directory without --force; then with it
    let busy = dir.path().join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("keep.txt"), "x").unwrap();
    let (_, stderr) = restore(&core, &key, &busy, &[], 2);
    assert!(
        stderr.contains("is not empty") && stderr.contains("--force"),
        "{stderr}"
    );
    restore(&core, &key, &busy, &["--force", "--volume", "etc"], 0);
    assert!(busy.join("etc/core.yml").exists() && busy.join("keep.txt").exists());

    // an unknown user; another zone's core: exit code and message
    for (i, (args, code, message)) in [
        (
            ["--user", "cnosuchuser0000"],
            1,
            "user cnosuchuser0000 is not in snapshot",
        ),
        (
            ["--core", "core-de-1"],
            3,
            "core core-de-1 belongs to zone de",
        ),
    ]
    .iter()
    .enumerate()
    {
        let to = dir.path().join(format!("x{i}"));
        let (_, stderr) = restore(&core, &key, &to, args, *code);
        assert!(stderr.contains(message), "{stderr}");
    }

    // an unknown snapshot
    let (_, stderr) = run(
        zv(&core)
            .args([
                "restore",
                "--snapshot",
                "20990101T000000Z-0000",
                "--identity",
            ])
            .arg(&key)
            .arg("--to")
            .arg(dir.path().join("x4")),
        1,
    );
    assert!(
        stderr.contains("no snapshot 20990101T000000Z-0000"),
        "{stderr}"
    );
}

#[test]
fn a_corrupted_object_is_read_from_the_other_target_or_fails_naming_the_unit() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, ids) = fleet_with_users(dir.path(), 4, 200_000);
    backup(&core);
    let key = object_of(&fleet, &ids[3]);
    // the middle of the user's own bytes (its object, or its range of a pack)
    let unit = common::unit_of(&fleet, &ids[3]);
    let middle = unit["offset"].as_u64().unwrap_or(0) + unit["stored_size"].as_u64().unwrap() / 2;
    let corrupt = |region: &str| {
        let g = fleet.garage(region);
        let mut bytes = g.get(&key).unwrap();
        let middle = middle as usize;
        bytes[middle] ^= 0x55;
        g.put(&key, &bytes).unwrap();
    };

    // one damaged copy: the other target's copy restores, with a warning
    corrupt("ch-gva-2");
    let to = dir.path().join("r1");
    let (_, stderr) = restore(&core, &fleet.identity("ch"), &to, &[], 0);
    // for the damaged unit only: its neighbours in the pack read intact
    assert_eq!(stderr.matches("trying the next").count(), 1, "{stderr}");
    assert_user_restored(&fleet, &to, &ids[3]);
    let user_dir = fixture::user_dir(&ids[3]);

    // both copies damaged: the restore fails naming the unit and both
    // objects; the other units are restored
    corrupt("ch-dk-2");
    let to = dir.path().join("r2");
    let (stdout, stderr) = restore(&core, &fleet.identity("ch"), &to, &[], 1);
    assert!(
        stdout.contains(&format!("NOT restored: unit users/user {}", ids[3])),
        "{stdout}"
    );
    for target in ["ch-primary", "ch-secondary"] {
        assert!(
            stdout.contains(&format!("object {key} on target {target}")),
            "{stdout}"
        );
    }
    assert!(stderr.contains("1 of 6 units failed"), "{stderr}");
    assert!(!to.join("users").join(&user_dir).exists());
    assert!(to.join("users").join(fixture::user_dir(&ids[0])).is_dir());
    // --json says why: no target holds an intact copy
    let to = dir.path().join("r2-json");
    let (stdout, _) = restore(
        &core,
        &fleet.identity("ch"),
        &to,
        &["--user", &ids[3], "--json"],
        1,
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["failed"][0]["reason"], "integrity", "{report}");
}

#[test]
fn a_pack_cut_short_on_one_target_restores_every_unit_from_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, ids) = fleet_with_users(dir.path(), 6, 100_000);
    backup(&core);
    // the users share one pack, read with one GET per target
    let key = object_of(&fleet, &ids[0]);
    assert!(ids.iter().all(|id| object_of(&fleet, id) == key));
    let g = fleet.garage("ch-gva-2");
    let bytes = g.get(&key).unwrap();
    g.put(&key, &bytes[..bytes.len() / 3]).unwrap();

    let to = dir.path().join("r");
    let (_, stderr) = restore(&core, &fleet.identity("ch"), &to, &[], 0);
    assert!(stderr.contains("trying the next"), "{stderr}");
    for id in &ids {
        assert_user_restored(&fleet, &to, id);
    }
}

#[test]
fn entries_that_escape_the_restore_directory_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, ids) = fleet_with_users(dir.path(), 2, 10_000);
    // the user's object is replaced whole
    common::one_object_per_unit(&core);
    backup(&core);
    let key = object_of(&fleet, &ids[0]);
    let gva = fleet.garage("ch-gva-2");
    let cases: [&[(&str, tar::EntryType, &str)]; 5] = [
        &[("../../escape.txt", tar::EntryType::Regular, "pwned")],
        &[(
            "/tmp/zonevault-absolute-escape.txt",
            tar::EntryType::Regular,
            "pwned",
        )],
        &[
            ("evil", tar::EntryType::Symlink, "../../.."),
            ("evil/escape.txt", tar::EntryType::Regular, "pwned"),
        ],
        // a chain of links, each harmless on its own text
        &[
            ("a/b/up", tar::EntryType::Symlink, ".."),
            ("x", tar::EntryType::Symlink, "a/b/up/../.."),
            ("x/escape.txt", tar::EntryType::Regular, "pwned"),
        ],
        &[
            ("a/b/up", tar::EntryType::Symlink, ".."),
            ("a/b/up/up2", tar::EntryType::Symlink, "../.."),
            ("a/b/up/up2/escape.txt", tar::EntryType::Regular, "pwned"),
        ],
    ];
    for (i, entries) in cases.iter().enumerate() {
        // on both targets, or restore takes the good copy from the other one
        let hostile = hostile_object(&fleet, &ids[0], entries);
        gva.put(&key, &hostile).unwrap();
        fleet.garage("ch-dk-2").put(&key, &hostile).unwrap();
        let to = dir.path().join(format!("r{i}"));
        let (_, stderr) = restore(&core, &fleet.identity("ch"), &to, &[], 1);
        assert!(stderr.contains("refused"), "case {i}: {stderr}");
        assert!(
            stderr.contains(&format!("users/user {}", ids[0])),
            "case {i}: {stderr}"
        );
        assert!(!dir.path().join("escape.txt").exists());
        assert!(!to.join("escape.txt").exists());
        assert!(!Path::new("/tmp/zonevault-absolute-escape.txt").exists());
    }
}

#[test]
fn sigkill_during_an_upload_leaves_no_snapshot_and_the_next_run_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, _) = fleet_with_users(dir.path(), 3, 10_000);
    // one big incompressible unit, so that the run is still uploading when killed
    let mut big = vec![0u8; 300 << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for chunk in big.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(fleet.volumes_dir("core-ch-1").join("etc/big.bin"), &big).unwrap();
    drop(big);

    let mut child = process(&core)
        // --full: every unit is uploaded again, so the run is long enough
        // to lose a target in the middle
        .args(["backup", "--full", "--jobs", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let gva = fleet.garage("ch-gva-2");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while gva.pending_uploads().unwrap() == 0 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup ended before an upload was seen"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no multipart upload started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let (stdout, _) = run(zv(&core).args(["snapshots", "--json"]), 0);
    assert_eq!(stdout.trim(), "[]", "a killed run left a visible snapshot");
    assert!(gva.pending_uploads().unwrap() > 0 || !object_keys(&fleet, "ch-gva-2").is_empty());

    let report = backup(&core);
    assert!(report["cleaned"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(gva.pending_uploads().unwrap(), 0);
    assert_eq!(
        object_keys(&fleet, "ch-gva-2")
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>(),
        common::indexed_objects(&fleet, "ch-gva-2"),
        "only what the snapshot references is left"
    );
    let (stdout, _) = run(zv(&core).args(["snapshots", "--json"]), 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn a_target_failing_mid_run_fails_the_run_and_keeps_earlier_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let (mut fleet, core, _) = fleet_with_users(dir.path(), 3, 10_000);
    // each unit its own object, so that the second run's writes show early
    common::one_object_per_unit(&core);
    let first = backup(&core)["snapshot"].as_str().unwrap().to_string();
    std::fs::write(
        fleet.volumes_dir("core-ch-1").join("etc/big.bin"),
        vec![7u8; 64 << 20],
    )
    .unwrap();

    let child = process(&core)
        // --full: every unit is uploaded again, so the run is long enough
        // to lose a target in the middle
        .args(["backup", "--full", "--jobs", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while object_keys(&fleet, "ch-dk-2").len() <= 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "the second run wrote nothing"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    fleet.garage_mut("ch-dk-2").stop();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("ch-secondary"),
        "the failing target is not named: {stderr}"
    );

    // the other target holds the first snapshot only, and no unfinished upload
    let gva = fleet.garage("ch-gva-2");
    let indexes: Vec<String> = gva
        .keys()
        .unwrap()
        .into_iter()
        .filter(|k| k.ends_with(".json") && k.contains("/snapshots/"))
        .collect();
    assert_eq!(
        indexes,
        vec![format!("zonevault/core-ch-1/snapshots/{first}.json")]
    );
    assert_eq!(gva.pending_uploads().unwrap(), 0);
}

#[test]
fn a_forged_volume_name_in_the_manifest_is_refused() {
    // The recipients are public: anyone who can write to the bucket can forge
    // a manifest. Its volume names must not steer restore outside DIR.
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, _) = fleet_with_users(dir.path(), 2, 10_000);
    backup(&core);
    let gva = fleet.garage("ch-gva-2");
    let key = gva
        .keys()
        .unwrap()
        .into_iter()
        .find(|k| k.ends_with(".manifest.age"))
        .unwrap();
    let mut m = manifest(&fleet);
    for u in m["units"].as_array_mut().unwrap() {
        u["volume"] = serde_json::json!("../../forged");
    }
    // sealed to the manifest's data key (a recipient is no secret)
    let index = common::only_index(&fleet);
    let recipient =
        common::data_key_recipient(&fleet, index["manifest"]["data_key"].as_str().unwrap());
    gva.put(
        &key,
        &tool("age", &["-r", &recipient], &serde_json::to_vec(&m).unwrap()),
    )
    .unwrap();
    // without the signatures (which refuse it first: tests/restore_safety.rs),
    // as a snapshot made before signing would be
    for sig in gva
        .keys()
        .unwrap()
        .into_iter()
        .filter(|k| k.ends_with(".minisig"))
    {
        gva.delete(&sig).unwrap();
    }
    let to = dir.path().join("r");
    let (_, stderr) = restore(&core, &fleet.identity("ch"), &to, &[], 1);
    assert!(stderr.contains("not a valid volume name"), "{stderr}");
    assert!(!dir.path().join("forged").exists());
}

#[test]
fn backup_of_one_volume_only() {
    let dir = tempfile::tempdir().unwrap();
    let (_fleet, core, _) = fleet_with_users(dir.path(), 3, 10_000);
    let (stdout, _) = run(zv(&core).args(["backup", "--volume", "etc", "--json"]), 0);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["units"], 1);
    let (_, stderr) = run(zv(&core).args(["backup", "--volume", "nope"]), 2);
    assert!(stderr.contains("no volume named \"nope\""), "{stderr}");
}

#[test]
fn a_file_that_changes_while_read_is_stored_and_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, _) = fleet_with_users(dir.path(), 1, 10_000);
    let growing = fleet.volumes_dir("core-ch-1").join("etc/growing.log");
    std::fs::write(&growing, vec![b'x'; 64 << 20]).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, growing) = (stop.clone(), growing.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&growing)
                .unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.write_all(&[b'y'; 4096]).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
    };
    let (stdout, _) = run(zv(&core).args(["backup", "--volume", "etc", "--json"]), 0);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let changed: Vec<&str> = report["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(
        changed.iter().any(|c| c.ends_with("etc/growing.log")),
        "{report}"
    );
    // and the human summary says so
    let out = zv(&core)
        .args(["backup", "--volume", "users"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn files_vanishing_during_the_walk_do_not_fail_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, _) = fleet_with_users(dir.path(), 1, 10_000);
    let many = fleet.volumes_dir("core-ch-1").join("etc/many");
    std::fs::create_dir_all(&many).unwrap();
    let names: Vec<PathBuf> = (0..20_000).map(|i| many.join(format!("f{i:05}"))).collect();
    for n in &names {
        std::fs::write(n, b"short-lived").unwrap();
    }
    let deleter = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(30));
        for n in names.iter().rev() {
            let _ = std::fs::remove_file(n);
        }
    });
    let (stdout, stderr) = run(zv(&core).args(["backup", "--volume", "etc", "--json"]), 0);
    deleter.join().unwrap();
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let vanished = report["vanished"].as_array().unwrap();
    // 20,000 files take far longer to store than the 30 ms before deletion starts
    assert!(!vanished.is_empty(), "nothing vanished: {report}");
    assert!(stderr.contains("vanished during the backup"), "{stderr}");
    assert!(
        vanished
            .iter()
            .all(|v| v.as_str().unwrap().contains("etc/many/f"))
    );
}

#[test]
fn an_unreadable_file_fails_the_run_naming_it() {
    // Tests run as root, whom mode bits never stop: run zonevault as `nobody`
    // (setpriv, util-linux), with one file of the volume readable by root only.
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, _) = fleet_with_users(dir.path(), 2, 10_000);
    let secret = fleet.volumes_dir("core-ch-1").join("etc/shadow-copy");
    std::fs::write(&secret, b"root only").unwrap();
    let binary = dir.path().join("zonevault");
    std::fs::copy(assert_cmd::cargo::cargo_bin("zonevault"), &binary).unwrap();
    let chown = |path: &Path| {
        let status = std::process::Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success());
    };
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    chown(&fleet.dir);
    chown(&binary);
    std::os::unix::fs::chown(&secret, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();

    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&binary)
        .arg("--config")
        .arg(&core)
        .arg("backup")
        .env("HOME", dir.path())
        .output()
        .expect("setpriv (util-linux)");
    let (stdout, stderr) = output_text(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("cannot read {}", secret.display()))
            && stderr.contains("Permission denied"),
        "{stderr}"
    );
    let (stdout, _) = run(zv(&core).args(["snapshots", "--json"]), 0);
    assert_eq!(stdout.trim(), "[]");
}

#[test]
fn symlinks_out_of_the_volume_are_reported_at_backup_time() {
    // Restore recreates links that leave the volume as links (never writing
    // through them), whose targets may not exist there; the operator
    // learns it when backing up, not during a disaster.
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, _) = fleet_with_users(dir.path(), 1, 10_000);
    let etc = fleet.volumes_dir("core-ch-1").join("etc");
    std::os::unix::fs::symlink("/etc/hostname", etc.join("absolute-link")).unwrap();
    std::os::unix::fs::symlink("../../outside", etc.join("escaping-link")).unwrap();
    std::os::unix::fs::symlink("core.yml", etc.join("fine-link")).unwrap();
    let (stdout, stderr) = run(zv(&core).args(["backup", "--volume", "etc", "--json"]), 0);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let links: Vec<&str> = report["escaping_links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(links.len(), 2, "{report}");
    assert!(links.iter().any(|l| l.ends_with("etc/absolute-link")));
    assert!(links.iter().any(|l| l.ends_with("etc/escaping-link")));
    assert!(stderr.contains("stored as a link"), "{stderr}");
}
