//! `zonevault erase` against two Garage targets: a user's data keys
//! shredded, their objects deleted or zeroed in packs, each confirmed on the
//! servers themselves; every snapshot still restores everyone else, never
//! the erased user; the age CLI cannot open a copy kept aside.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;
use zonevault_testkit::fixture;

const REGIONS: [&str; 2] = ["ch-gva-2", "ch-dk-2"];

/// A user's unit in one snapshot: where it is and which key opens it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Placed {
    object: String,
    offset: Option<u64>,
    size: u64,
    data_key: String,
}

fn placed(manifest: &Value, user: &str) -> Placed {
    let u = manifest["units"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["user"] == user)
        .unwrap_or_else(|| panic!("{user} in the manifest"));
    Placed {
        object: format!("zonevault/{}", u["object"].as_str().unwrap()),
        offset: u["offset"].as_u64(),
        size: u["stored_size"].as_u64().unwrap(),
        data_key: format!("zonevault/{}", u["data_key"].as_str().unwrap()),
    }
}

fn user_tree(root: &Path, id: &str) -> std::collections::BTreeMap<PathBuf, String> {
    fixture::tree(&root.join("users").join(fixture::user_dir(id))).unwrap()
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Whether the age CLI opens `sealed` with `identity`.
fn age_opens(identity: &Path, sealed: &[u8]) -> bool {
    use std::io::Write;
    let mut child = std::process::Command::new("age")
        .args(["-d", "-i", identity.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("age: run scripts/install-deps");
    child.stdin.take().unwrap().write_all(sealed).unwrap();
    child.wait().unwrap().success()
}

fn where_of(core: &Path, user: &str) -> Vec<Value> {
    let (out, _) = run(
        zv(core).args(["audit", "where", "--user", user, "--json"]),
        0,
    );
    json(&out).as_array().unwrap().clone()
}

#[test]
fn erase_shreds_a_users_keys_removes_their_units_and_every_snapshot_restores_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, ids) = fleet_with_users(dir.path(), 50, 20_000);
    let source = fleet.volumes_dir("core-ch-1");
    let victim = ids[7].clone();
    let neighbour = ids[8].clone();
    let victim_dir = source.join("users").join(fixture::user_dir(&victim));
    // snapshot 1: the victim in a pack with other users; 2: too big for a
    // pack (an object of its own); 3: small again, alone in a pack of its run
    let mut snapshots = vec![backup(&core)["snapshot"].as_str().unwrap().to_string()];
    // incompressible: xorshift64
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let big: Vec<u8> = (0..9_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(victim_dir.join("attachments/big.bin"), &big).unwrap();
    for round in 0..2 {
        if round == 1 {
            std::fs::remove_file(victim_dir.join("attachments/big.bin")).unwrap();
            std::fs::write(victim_dir.join("note.txt"), "small again").unwrap();
        }
        let report = backup(&core);
        assert_eq!(report["uploaded"], 1, "only the victim changed: {report}");
        snapshots.push(report["snapshot"].as_str().unwrap().to_string());
    }
    let units: Vec<Placed> = snapshots
        .iter()
        .map(|id| placed(&manifest_of(&fleet, id), &victim))
        .collect();
    assert!(
        units[0].offset.is_some() && units[2].offset.is_some(),
        "{units:?}"
    );
    assert!(
        units[1].offset.is_none(),
        "snapshot 2 holds the victim alone"
    );
    let keys: BTreeSet<&str> = units.iter().map(|u| u.data_key.as_str()).collect();
    assert_eq!(keys.len(), 1, "one data key per user: {keys:?}");
    let key_object = units[0].data_key.clone();

    // kept aside before the erasure, as an attacker or a forgotten replica would
    let gva = fleet.garage("ch-gva-2");
    let shared = &units[0];
    let kept_unit = unit_bytes(
        &gva.get(&shared.object).unwrap(),
        &serde_json::json!({"offset": shared.offset, "stored_size": shared.size}),
    );
    let (_keydir, kept_key) = data_key_file(&fleet, &key_object["zonevault/".len()..]);
    assert!(
        age_opens(&kept_key, &kept_unit),
        "the user's key opens the unit"
    );
    let zone = fleet.identity("ch");
    assert!(
        !age_opens(&zone, &kept_unit),
        "the zone identity alone never did"
    );
    let neighbour_before = where_of(&core, &neighbour);
    assert!(!where_of(&core, &victim).is_empty());

    let (out, _) = run(
        zv(&core).args([
            "erase",
            "--user",
            &victim,
            "--reason",
            "DPO ticket 42",
            "--json",
        ]),
        0,
    );
    let report = json(&out);
    let done = &report["users"][0];
    assert_eq!(done["user"], victim.as_str());
    assert_eq!(done["held"], true);
    assert!(done["pending"].as_array().unwrap().is_empty(), "{report}");
    // on each of two targets: one key; the big object and the pack of the
    // victim alone deleted; the shared pack's range zeroed
    assert_eq!(done["shredded"].as_array().unwrap().len(), 2, "{report}");
    assert_eq!(done["deleted"].as_array().unwrap().len(), 4, "{report}");
    assert_eq!(done["scrubbed"].as_array().unwrap().len(), 2, "{report}");

    // read back on the servers: the key objects and the object are gone,
    // the ranges of the packs read as zeros, the packs keep their size
    for region in REGIONS {
        let garage = fleet.garage(region);
        let listed = garage.keys().unwrap();
        assert!(
            !listed.contains(&key_object),
            "{region}: key object still listed"
        );
        assert!(
            garage.get(&key_object).is_err(),
            "{region}: key object still readable"
        );
        assert!(
            !listed.contains(&units[1].object),
            "{region}: the victim's object"
        );
        assert!(
            !listed.contains(&units[2].object),
            "{region}: the victim's pack"
        );
        let shared = &units[0];
        let pack = garage.get(&shared.object).unwrap();
        let at = shared.offset.unwrap() as usize;
        assert!(
            pack[at..at + shared.size as usize].iter().all(|b| *b == 0),
            "{region}: the victim's range of {} is not zeros",
            shared.object
        );
        assert!(
            pack.iter().any(|b| *b != 0),
            "the others' units are still there"
        );
    }
    // the copy kept aside opens with nothing an operator still has
    assert!(!age_opens(&zone, &kept_unit));

    // every snapshot restores every other user, byte-equal, and names the
    // erased one as skipped
    for (i, id) in snapshots.iter().enumerate() {
        let to = dir.path().join(format!("restore-{i}"));
        let (out, _) = run(
            zv(&core)
                .args(["restore", "--snapshot", id, "--json", "--identity"])
                .arg(&zone)
                .arg("--to")
                .arg(&to),
            0,
        );
        let r = json(&out);
        assert_eq!(r["erased"][0]["user"], victim.as_str(), "{r}");
        let restored: BTreeSet<&str> = r["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u.as_str().unwrap())
            .collect();
        let others: BTreeSet<&str> = ids
            .iter()
            .filter(|u| **u != victim)
            .map(String::as_str)
            .collect();
        assert_eq!(restored, others, "snapshot {id}");
        for other in &others {
            assert_eq!(
                user_tree(&to, other),
                user_tree(&source, other),
                "{other} in snapshot {id}"
            );
        }
        assert!(!to.join("users").join(fixture::user_dir(&victim)).exists());
    }
    let (_, stderr) = run(
        zv(&core)
            .args([
                "restore",
                "--snapshot",
                &snapshots[2],
                "--user",
                &victim,
                "--identity",
            ])
            .arg(&zone)
            .arg("--to")
            .arg(dir.path().join("restore-victim")),
        1,
    );
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert!(
        stderr.contains(&format!("user {victim} was erased on {today}")),
        "{stderr}"
    );
    assert!(
        where_of(&core, &victim).is_empty(),
        "nothing readable is left"
    );
    assert_eq!(
        where_of(&core, &neighbour),
        neighbour_before,
        "the neighbour's data did not move"
    );
    run(zv(&core).args(["audit", "verify"]), 0);
    let (out, _) = run(
        zv(&core).args(["audit", "show", "--event", "user_erased", "--json"]),
        0,
    );
    let records = json(&out);
    assert_eq!(records.as_array().unwrap().len(), 1, "{records}");
    assert_eq!(records[0]["outcome"], "complete");
    assert_eq!(records[0]["reason"], "DPO ticket 42");

    // retention still works across snapshots whose objects were deleted
    run(zv(&core).arg("forget"), 0);

    // the victim still has data on the core: the next backup stores it
    // anew, under a new key, and that snapshot restores them
    let report = backup(&core);
    assert_eq!(report["uploaded"], 1, "{report}");
    let again = placed(&manifest(&fleet), &victim);
    assert_ne!(again.data_key, key_object, "a new key after the erasure");
    let to = dir.path().join("restore-after");
    restore(&core, &zone, &to, &["--user", &victim], 0);
    assert_eq!(user_tree(&to, &victim), user_tree(&source, &victim));
}

#[test]
fn an_erase_killed_midway_is_finished_by_the_next_with_one_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, ids) = fleet_with_users(dir.path(), 5, 10_000);
    backup(&core);
    let victim = &ids[2];
    let key_object = placed(&manifest(&fleet), victim).data_key;
    let status = process(&core)
        .args(["erase", "--user", victim])
        .env("ZONEVAULT_FAILPOINT", "erase-after-delete")
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), None, "killed by its failpoint: {status:?}");
    // the first deletion happened (one target), the rest did not
    let left: usize = REGIONS
        .iter()
        .filter(|r| fleet.garage(r).keys().unwrap().contains(&key_object))
        .count();
    assert_eq!(left, 1, "killed after its first deletion");
    let (out, _) = run(zv(&core).args(["erase", "--user", victim, "--json"]), 0);
    let report = json(&out);
    assert_eq!(
        report["users"][0]["shredded"].as_array().unwrap().len(),
        2,
        "{report}"
    );
    for region in REGIONS {
        assert!(!fleet.garage(region).keys().unwrap().contains(&key_object));
    }
    let (out, _) = run(
        zv(&core).args(["audit", "show", "--event", "user_erased", "--json"]),
        0,
    );
    let records = json(&out);
    assert_eq!(
        records.as_array().unwrap().len(),
        1,
        "one outcome: {records}"
    );
    assert_eq!(records[0]["outcome"], "complete");
    run(zv(&core).args(["audit", "verify"]), 0);
}

#[test]
fn erase_names_bad_input_and_says_when_there_is_nothing_to_erase() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, ids) = fleet_with_users(dir.path(), 3, 5_000);
    backup(&core);
    let (_, stderr) = run(zv(&core).arg("erase"), 2);
    assert!(stderr.contains("--user"), "{stderr}");
    let (_, stderr) = run(zv(&core).args(["erase", "--user", "../etc"]), 2);
    assert!(stderr.contains("\"../etc\" is not a user id"), "{stderr}");
    let (out, _) = run(zv(&core).args(["erase", "--user", "cnobodyhere000"]), 0);
    assert!(
        out.contains("user cnobodyhere000: no backup of core core-ch-1 holds this user"),
        "{out}"
    );
    // a dry run shows the plan and changes nothing
    let key_object = placed(&manifest(&fleet), &ids[0]).data_key;
    let (out, _) = run(zv(&core).args(["erase", "--user", &ids[0], "--dry-run"]), 0);
    assert!(out.contains("would do") && out.contains("shred"), "{out}");
    for region in REGIONS {
        assert!(fleet.garage(region).keys().unwrap().contains(&key_object));
    }
    assert!(!where_of(&core, &ids[0]).is_empty());
}

#[test]
fn after_a_zone_key_rotation_rewrap_lets_the_new_identity_alone_restore() {
    let dir = tempfile::tempdir().unwrap();
    let (mut fleet, core, ids) = fleet_with_users(dir.path(), 6, 10_000);
    backup(&core);
    let old = dir.path().join("old-zone.key");
    std::fs::copy(fleet.identity("ch"), &old).unwrap();
    // the rotation: a new identity, the zone map lists only its recipient
    let new = dir.path().join("new-zone.key");
    let (out, _) = run(zonevault().args(["keygen", "--out"]).arg(&new), 0);
    let recipient = out
        .split_whitespace()
        .find(|w| w.starts_with("age1"))
        .unwrap_or_else(|| panic!("a recipient in {out}"))
        .to_string();
    fleet.zone_mut("ch").recipients = vec![recipient];
    let core = {
        let written = fleet.write_configs().unwrap();
        assert_eq!(written, core);
        written
    };
    // before the rewrap the new identity opens nothing
    restore(&core, &new, &dir.path().join("too-early"), &[], 1);
    let (out, _) = run(
        zv(&core).args(["rewrap", "--json", "--identity"]).arg(&old),
        0,
    );
    let report = json(&out);
    // one key per user and the core's own, on two targets
    assert_eq!(report["rewrapped"], 2 * (ids.len() + 1), "{report}");
    let to = dir.path().join("restored");
    restore(&core, &new, &to, &[], 0);
    let source = fleet.volumes_dir("core-ch-1");
    for id in &ids {
        assert_eq!(user_tree(&to, id), user_tree(&source, id), "{id}");
    }
    // the old identity no longer opens the keys (their old wrapping is gone)
    let (_, stderr) = restore(&core, &old, &dir.path().join("old"), &[], 1);
    assert!(stderr.contains("cannot decrypt"), "{stderr}");
    // a second rewrap with the old identity finds nothing it opens
    let (out, _) = run(
        zv(&core).args(["rewrap", "--json", "--identity"]).arg(&old),
        0,
    );
    assert_eq!(json(&out)["rewrapped"], 0);
    // and the next backup uploads nothing again: its units are still good
    assert_eq!(backup(&core)["uploaded"], 0);
}

#[test]
fn erase_all_cores_reaches_a_user_who_moved_to_another_core() {
    let dir = tempfile::tempdir().unwrap();
    let (mut fleet, core1, ids) = fleet_with_users(dir.path(), 5, 10_000);
    let core2 = fleet.add_core("ch", "core-ch-2").unwrap();
    let mover = ids[1].clone();
    let from = fleet
        .volumes_dir("core-ch-1")
        .join("users")
        .join(fixture::user_dir(&mover));
    let to_dir = fleet
        .volumes_dir("core-ch-2")
        .join("users")
        .join(fixture::user_dir(&mover));
    // backed up on core 1, then moved to core 2 and backed up there
    let first = backup(&core1)["snapshot"].as_str().unwrap().to_string();
    std::fs::create_dir_all(to_dir.parent().unwrap()).unwrap();
    run_cp(&from, &to_dir);
    std::fs::remove_dir_all(&from).unwrap();
    backup(&core1);
    backup(&core2);
    let zone = fleet.identity("ch");
    // the key objects of the mover on both cores
    let keys_of = |core: &str| -> Vec<String> {
        fleet
            .garage("ch-gva-2")
            .keys()
            .unwrap()
            .into_iter()
            .filter(|k| k.starts_with(&format!("zonevault/{core}/keys/")))
            .collect()
    };
    let before = (keys_of("core-ch-1").len(), keys_of("core-ch-2").len());

    // from core 1, with the zone identity: both cores' backups
    let (out, _) = run(
        zv(&core1)
            .args([
                "erase",
                "--user",
                &mover,
                "--all-cores",
                "--json",
                "--identity",
            ])
            .arg(&zone),
        0,
    );
    let report = json(&out);
    let done = &report["users"][0];
    assert!(done["pending"].as_array().unwrap().is_empty(), "{report}");
    let shredded: BTreeSet<&str> = done["shredded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert!(
        shredded.iter().any(|k| k.contains("/core-ch-1/keys/")),
        "{report}"
    );
    assert!(
        shredded.iter().any(|k| k.contains("/core-ch-2/keys/")),
        "{report}"
    );
    assert_eq!(
        (keys_of("core-ch-1").len(), keys_of("core-ch-2").len()),
        (before.0 - 1, before.1 - 1),
        "one key object of the mover gone on each core"
    );
    // neither core's snapshots bring the mover back
    let (out, _) = run(
        zv(&core1)
            .args(["restore", "--snapshot", &first, "--json", "--identity"])
            .arg(&zone)
            .arg("--to")
            .arg(dir.path().join("r1")),
        0,
    );
    assert_eq!(json(&out)["erased"][0]["user"], mover.as_str());
    let (_, stderr) = run(
        zv(&core1)
            .args([
                "restore",
                "--snapshot",
                "latest",
                "--core",
                "core-ch-2",
                "--user",
                &mover,
                "--identity",
            ])
            .arg(&zone)
            .arg("--to")
            .arg(dir.path().join("r2")),
        1,
    );
    assert!(stderr.contains("was erased on"), "{stderr}");
    // core 2, whose own log knows nothing of this, notices its key is gone:
    // the mover's data still there is backed up again under a new key
    let again = backup(&core2);
    assert_eq!(again["uploaded"], 1, "{again}");
    let to = dir.path().join("r3");
    run(
        zv(&core2)
            .args([
                "restore",
                "--snapshot",
                "latest",
                "--user",
                &mover,
                "--identity",
            ])
            .arg(&zone)
            .arg("--to")
            .arg(&to),
        0,
    );
    assert_eq!(
        fixture::tree(&to.join("users").join(fixture::user_dir(&mover))).unwrap(),
        fixture::tree(&to_dir).unwrap()
    );
    // --all-cores without an identity is a usage error
    let (_, stderr) = run(
        zv(&core1).args(["erase", "--user", &mover, "--all-cores"]),
        2,
    );
    assert!(stderr.contains("--identity"), "{stderr}");
}

/// `cp -a FROM TO`: a user's directory moved with its modes and times.
fn run_cp(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn two_users_of_one_pack_with_the_shared_unit_are_erased_without_touching_it() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, ids) = fleet_with_users(dir.path(), 6, 5_000);
    backup(&core);
    // one run that uploads two users and the shared unit: one pack of three
    let users_dir = fleet.volumes_dir("core-ch-1").join("users");
    for id in &ids[..2] {
        std::fs::write(
            users_dir.join(fixture::user_dir(id)).join("note.txt"),
            "changed",
        )
        .unwrap();
    }
    std::fs::write(users_dir.join("_shared/streams/defaults.json"), "{}").unwrap();
    let report = backup(&core);
    assert_eq!(report["uploaded"], 3, "{report}");
    let m = manifest(&fleet);
    let (a, b) = (placed(&m, &ids[0]), placed(&m, &ids[1]));
    assert_eq!(a.object, b.object, "one pack");
    let (out, _) = run(
        zv(&core).args(["erase", "--user", &ids[0], "--user", &ids[1], "--json"]),
        0,
    );
    let report = json(&out);
    for u in report["users"].as_array().unwrap() {
        assert!(u["pending"].as_array().unwrap().is_empty(), "{report}");
        assert!(
            u["deleted"].as_array().unwrap().is_empty(),
            "the pack holds the shared unit: {report}"
        );
        // the first run's pack of everyone and this run's, on two targets
        assert_eq!(u["scrubbed"].as_array().unwrap().len(), 4, "{report}");
    }
    // the pack is still there, both ranges zeros; the shared unit restores
    for region in REGIONS {
        let pack = fleet.garage(region).get(&a.object).unwrap();
        for u in [&a, &b] {
            let at = u.offset.unwrap() as usize;
            assert!(
                pack[at..at + u.size as usize].iter().all(|x| *x == 0),
                "{region}"
            );
        }
    }
    let to = dir.path().join("r");
    let (out, _) = restore(&core, &fleet.identity("ch"), &to, &["--json"], 0);
    assert_eq!(json(&out)["erased"].as_array().unwrap().len(), 2);
    assert_eq!(
        std::fs::read(to.join("users/_shared/streams/defaults.json")).unwrap(),
        b"{}"
    );
    for id in &ids[2..] {
        assert_eq!(
            user_tree(&to, id),
            user_tree(&fleet.volumes_dir("core-ch-1"), id)
        );
    }
}

#[test]
fn a_kill_between_a_deletion_and_its_record_is_settled_by_the_next_erase() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, ids) = fleet_with_users(dir.path(), 4, 5_000);
    common::one_object_per_unit(&core);
    backup(&core);
    let victim = &ids[0];
    let status = process(&core)
        .args(["erase", "--user", victim])
        .env("ZONEVAULT_FAILPOINT", "after-delete")
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), None, "killed: {status:?}");
    run(zv(&core).args(["erase", "--user", victim]), 0);
    // the first deletion (the victim's key object) has no outcome on
    // record: the next erase settles it by what the target shows
    // (object_absent), and nothing of the victim is listed
    assert!(where_of(&core, victim).is_empty());
    let (out, _) = run(
        zv(&core).args(["audit", "show", "--event", "object_absent", "--json"]),
        0,
    );
    assert!(!json(&out).as_array().unwrap().is_empty());
    let _ = fleet;
}

#[test]
fn a_restore_refuses_when_the_erasure_ledger_cannot_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, ids) = fleet_with_users(dir.path(), 3, 5_000);
    backup(&core);
    run(zv(&core).args(["erase", "--user", &ids[0]]), 0);
    // the ledger entry damaged on every target
    for region in REGIONS {
        let g = fleet.garage(region);
        let entry = g
            .keys()
            .unwrap()
            .into_iter()
            .find(|k| k.contains("/erasures/"))
            .expect("a ledger entry");
        g.put(&entry, b"not an age file").unwrap();
    }
    let (_, stderr) = restore(&core, &fleet.identity("ch"), &dir.path().join("r"), &[], 1);
    assert!(
        stderr.contains("erasure ledger entry")
            && stderr.contains("could bring back an erased user"),
        "{stderr}"
    );
}
