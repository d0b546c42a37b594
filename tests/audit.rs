//! The audit log against two Garage zones: where a user's data is, refusals
//! and failures on record, tampering caught, racing runs, copies in the zone.

mod common;

use zonevault_testkit::tmpfs::{Tmpfs, fill};

use std::path::{Path, PathBuf};

use common::{fleet, process, run, spoof_ch_secondary, tool, zv};
use serde_json::Value;
use zonevault::audit::record::{self, Stored};
use zonevault_testkit::fixture::Spec;

fn log_path(dir: &Path) -> PathBuf {
    dir.join("state/core-ch-1/audit.jsonl")
}

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// `audit show --json` with extra arguments.
fn show(core: &Path, extra: &[&str]) -> Vec<Value> {
    let (stdout, _) = run(zv(core).args(["audit", "show", "--json"]).args(extra), 0);
    json(&stdout).as_array().unwrap().clone()
}

/// `audit verify --remote --identity KEY`, expecting exit `code`.
fn verify_remote(core: &Path, key: &Path, code: i32) -> (String, String) {
    run(
        zv(core)
            .args(["audit", "verify", "--remote", "--identity"])
            .arg(key),
        code,
    )
}

/// A config for the same core with its own (empty) state dir: a fresh machine.
fn fresh_machine(dir: &Path, core: &Path) -> PathBuf {
    let text = std::fs::read_to_string(core)
        .unwrap()
        .replace("state/core-ch-1", "state/fresh");
    let path = dir.join("fresh.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn where_lists_exactly_the_objects_holding_a_user_on_every_target() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core) = fleet(dir.path());
    let ids = fleet
        .users_fixture("core-ch-1", &Spec::new(200, 4_000))
        .unwrap();
    run(zv(&core).args(["backup", "--json"]), 0);
    let user = &ids[17];

    let (stdout, _) = run(
        zv(&core).args(["audit", "where", "--user", user, "--json"]),
        0,
    );
    let found = json(&stdout);
    let found = found.as_array().unwrap();
    assert_eq!(
        found.len(),
        2,
        "one object, on each of the zone's two targets: {found:?}"
    );
    let mut targets: Vec<&str> = found
        .iter()
        .map(|l| l["target"].as_str().unwrap())
        .collect();
    targets.sort();
    assert_eq!(targets, ["ch-primary", "ch-secondary"]);
    assert_eq!(found[0]["key"], found[1]["key"]);
    for l in found {
        assert_eq!(l["zone"], "ch");
        let region = l["region"].as_str().unwrap();
        let garage = fleet.garage(region);
        assert_eq!(l["bucket"], garage.bucket.as_str());
        assert_eq!(l["endpoint"], garage.endpoint.as_str());
        // the object exists, and the user's range of it (the manifest
        // says which) holds that user's files and no one else's
        let object = garage.get(l["key"].as_str().unwrap()).unwrap();
        let unit = common::unit_of(&fleet, user);
        assert_eq!(
            l["key"],
            format!("zonevault/{}", unit["object"].as_str().unwrap())
        );
        let sealed = common::unit_bytes(&object, &unit);
        let tar = common::open_by_hand(&fleet, unit["data_key"].as_str(), &sealed);
        let listing =
            String::from_utf8(tool("tar", &["-t"], &tool("zstd", &["-d"], &tar))).unwrap();
        let dir = zonevault_testkit::fixture::user_dir(user);
        assert!(
            listing
                .lines()
                .all(|p| p.starts_with(dir.to_str().unwrap())),
            "{listing}"
        );
    }
    // every unit object of the run (most are packs of several users) is on
    // record with exactly the users whose units it holds
    let puts = show(&core, &["--event", "object_put"]);
    let units: Vec<&Value> = puts.iter().filter(|r| r["kind"] == "unit").collect();
    let mut holders: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for u in common::manifest(&fleet)["units"].as_array().unwrap() {
        let users = holders
            .entry(format!("zonevault/{}", u["object"].as_str().unwrap()))
            .or_default();
        users.extend(u["user"].as_str().map(String::from));
    }
    assert!(
        holders.len() < 202,
        "small units are packed: {}",
        holders.len()
    );
    assert_eq!(units.len(), 2 * holders.len());
    for r in &units {
        let mut on_record: Vec<String> = r["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u.as_str().unwrap().to_string())
            .collect();
        on_record.sort();
        let mut held = holders[r["key"].as_str().unwrap()].clone();
        held.sort();
        assert_eq!(on_record, held, "{r}");
    }
    let with_user: Vec<&&Value> = units
        .iter()
        .filter(|r| {
            r["users"]
                .as_array()
                .unwrap()
                .iter()
                .any(|u| u == user.as_str())
        })
        .collect();
    assert_eq!(with_user.len(), 2);

    // an unchanged user's unit is not uploaded again: still two objects
    run(zv(&core).args(["backup", "--json"]), 0);
    let (stdout, _) = run(
        zv(&core).args(["audit", "where", "--user", user, "--json"]),
        0,
    );
    assert_eq!(json(&stdout).as_array().unwrap().len(), 2);
    // a full snapshot adds its objects; an unknown user has none
    run(zv(&core).args(["backup", "--full", "--json"]), 0);
    let (stdout, _) = run(
        zv(&core).args(["audit", "where", "--user", user, "--json"]),
        0,
    );
    assert_eq!(json(&stdout).as_array().unwrap().len(), 4);
    let (stdout, _) = run(
        zv(&core).args(["audit", "where", "--user", "nobody-here"]),
        0,
    );
    assert!(
        stdout.contains("no object holds data of user nobody-here"),
        "{stdout}"
    );
    let (stdout, _) = run(zv(&core).args(["audit", "where", "--user", user]), 0);
    assert!(stdout.starts_with("ZONE"), "{stdout}");
    assert_eq!(stdout.lines().count(), 5, "{stdout}");
    run(zv(&core).args(["audit", "verify"]), 0);
}

#[test]
fn refusals_and_failed_runs_are_records() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spoofed, _) = fleet(dir.path());
    let core = spoof_ch_secondary(&mut spoofed);
    let (_, stderr) = run(zv(&core).arg("backup"), 3);
    assert!(stderr.contains("residency check refused"), "{stderr}");
    let refused = show(&core, &["--event", "residency_refused"]);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["target"], "ch-secondary");
    assert_eq!(refused[0]["reported_region"], "de-fra-1");
    let failed = show(&core, &["--event", "run_failed"]);
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["command"], "backup");
    assert_eq!(failed[0]["exit"], 3);
    assert_eq!(failed[0]["failure"], "residency");
    assert!(
        show(&core, &["--event", "object_put"]).is_empty(),
        "nothing written"
    );
    // check refuses too, and says so in the log
    run(zv(&core).arg("check"), 3);
    assert_eq!(show(&core, &["--event", "residency_refused"]).len(), 2);

    // a target that cannot be reached: recorded as unavailable, the run as failed
    let dir = tempfile::tempdir().unwrap();
    let (mut fleet, core) = fleet(dir.path());
    fleet.garage_mut("ch-dk-2").stop();
    run(zv(&core).arg("backup"), 1);
    let unavailable = show(&core, &["--event", "target_unavailable"]);
    assert_eq!(unavailable.len(), 1);
    assert_eq!(unavailable[0]["target"], "ch-secondary");
    let failed = show(&core, &["--event", "run_failed"]);
    assert_eq!(failed[0]["exit"], 1);
    assert_eq!(failed[0]["failure"], "unavailable");
    assert!(
        failed[0]["reason"]
            .as_str()
            .unwrap()
            .contains("ch-secondary")
    );
    run(zv(&core).args(["audit", "verify"]), 0);
}

/// Rewrites the log with `edit` applied to its lines, runs `audit verify`,
/// and returns its stderr after checking exit code 1.
fn tampered(core: &Path, log: &Path, edit: impl FnOnce(&mut Vec<String>)) -> String {
    let original = std::fs::read_to_string(log).unwrap();
    let mut lines: Vec<String> = original.lines().map(str::to_string).collect();
    edit(&mut lines);
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(log, text).unwrap();
    let (_, stderr) = run(zv(core).args(["audit", "verify"]), 1);
    std::fs::write(log, original).unwrap();
    stderr
}

#[test]
fn tampering_is_caught_at_the_right_line() {
    let dir = tempfile::tempdir().unwrap();
    let (_fleet, core) = fleet(dir.path());
    run(zv(&core).args(["backup", "--json"]), 0);
    let log = log_path(dir.path());
    let (stdout, _) = run(zv(&core).args(["audit", "verify"]), 0);
    assert!(stdout.contains("the chain holds"), "{stdout}");
    let count = std::fs::read_to_string(&log).unwrap().lines().count();
    assert!(count > 12, "{count} records");

    let lines = std::fs::read_to_string(&log).unwrap();
    let put = lines
        .lines()
        .position(|l| l.contains("\"event\":\"object_put\""))
        .unwrap();
    let e = tampered(&core, &log, |l| {
        l[put] = l[put].replace("\"event\":\"object_put\"", "\"event\":\"object_read\"");
        assert!(l[put].contains("object_read"));
    });
    assert!(e.contains(&format!("line {}: edited", put + 1)), "{e}");

    let e = tampered(&core, &log, |l| {
        l.remove(6);
    });
    assert!(
        e.contains("line 7: record 7 is missing before this line (removed)"),
        "{e}"
    );

    let e = tampered(&core, &log, |l| l.swap(4, 5));
    assert!(e.contains("line 5: reordered"), "{e}");

    // a forged record with a correct hash, chained to the line before it
    let e = tampered(&core, &log, |l| {
        let before = Stored::parse(&l[7]).unwrap();
        let event = record::Event::ObjectDeleted {
            place: serde_json::from_value(serde_json::json!({
                "target": "ch-primary", "endpoint": "x", "bucket": "b", "region": "ch-gva-2"
            }))
            .unwrap(),
            key: "zonevault/core-ch-1/objects/forged".into(),
            reason: "forged".into(),
        };
        let (forged, _) = record::seal(
            &event,
            before.seq().unwrap() + 1,
            "2026-11-26T00:00:00.000Z",
            "core-ch-1",
            "ch",
            before.hash().unwrap(),
        );
        l.insert(8, forged);
    });
    assert!(e.contains("line 9: inserted"), "{e}");

    // truncated: the last record cut in the middle
    let original = std::fs::read(&log).unwrap();
    std::fs::write(&log, &original[..original.len() - 40]).unwrap();
    let (_, e) = run(zv(&core).args(["audit", "verify"]), 1);
    assert!(e.contains(&format!("line {count}: cut short")), "{e}");
    // ... and a damaged log takes no more records: the next run fails, saying why
    let (_, e) = run(zv(&core).arg("check"), 1);
    assert!(e.contains("ends in a partial line"), "{e}");
    std::fs::write(&log, &original).unwrap();
    run(zv(&core).args(["audit", "verify"]), 0);
}

#[test]
fn a_wholesale_rewrite_is_caught_by_the_copies_in_the_zone() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core) = fleet(dir.path());
    run(zv(&core).args(["backup", "--json"]), 0);
    let key = fleet.identity("ch");
    let (stdout, _) = verify_remote(&core, &key, 0);
    assert!(
        stdout.contains("target ch-primary: copies of records 1 to"),
        "{stdout}"
    );
    assert!(
        fleet
            .garage("ch-gva-2")
            .keys()
            .unwrap()
            .iter()
            .any(|k| k.starts_with("zonevault/core-ch-1/audit/000000000001-"))
    );

    // rewrite every record with a consistent chain, hiding the third one's target
    let log = log_path(dir.path());
    let original = std::fs::read_to_string(&log).unwrap();
    let mut prev = record::GENESIS.to_string();
    let mut rewritten = String::new();
    for (i, line) in original.lines().enumerate() {
        let mut fields = Stored::parse(line).unwrap().fields;
        if i == 2 {
            fields.insert("target".into(), "elsewhere".into());
        }
        fields.remove("hash");
        fields.insert("prev".into(), prev.clone().into());
        let hash = record::hash(&prev, &fields);
        fields.insert("hash".into(), hash.clone().into());
        rewritten.push_str(&record::canonical(&Value::Object(fields)));
        rewritten.push('\n');
        prev = hash;
    }
    std::fs::write(&log, &rewritten).unwrap();
    // the marks of what was copied already disagree ...
    let (_, e) = run(zv(&core).args(["audit", "verify"]), 1);
    assert!(e.contains("the log was rewritten after the copy"), "{e}");
    // ... so a careful intruder rewrites them too; the chain alone then holds
    let marks = dir.path().join("state/core-ch-1/audit.copied.json");
    let saved_marks = std::fs::read(&marks).unwrap();
    std::fs::remove_file(&marks).unwrap();
    run(zv(&core).args(["audit", "verify"]), 0);
    let (_, e) = verify_remote(&core, &key, 1);
    assert!(
        e.contains("line 3: differs from copy zonevault/core-ch-1/audit/"),
        "{e}"
    );
    assert!(e.contains("the local log was rewritten"), "{e}");

    // records cut from the end are missing from the local log
    let kept: String = original.lines().take(5).map(|l| format!("{l}\n")).collect();
    std::fs::write(&log, kept).unwrap();
    run(zv(&core).args(["audit", "verify"]), 0);
    let (_, e) = verify_remote(&core, &key, 1);
    assert!(
        e.contains("line 6: missing: the local log ends at record 5"),
        "{e}"
    );

    // a wrong identity is one sentence, not a chain of library errors
    std::fs::write(&log, &original).unwrap();
    std::fs::write(&marks, saved_marks).unwrap();
    verify_remote(&core, &key, 0);
    let other = fleet.identity("de");
    let (_, e) = verify_remote(&core, &other, 1);
    assert!(
        e.contains("de.key cannot decrypt copy zonevault/core-ch-1/audit/"),
        "{e}"
    );
    assert!(e.contains("give an identity of this core's zone"), "{e}");
}

#[test]
fn racing_runs_leave_a_valid_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core) = fleet(dir.path());
    fleet
        .users_fixture("core-ch-1", &Spec::new(40, 4_000))
        .unwrap();
    let spawn = |args: &[&str]| {
        process(&core)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let children: Vec<_> = [
        spawn(&["backup", "--json"]),
        spawn(&["backup", "--json"]),
        spawn(&["check"]),
        spawn(&["check"]),
        spawn(&["check"]),
    ]
    .into_iter()
    .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (stdout, _) = run(zv(&core).args(["audit", "verify"]), 0);
    assert!(stdout.contains("the chain holds"), "{stdout}");
    let commits = show(&core, &["--event", "snapshot_committed"]);
    assert_eq!(commits.len(), 4, "two snapshots on two targets");
    let loaded = show(&core, &["--event", "config_loaded"]);
    assert_eq!(loaded.len(), 5);
    let key = fleet.identity("ch");
    verify_remote(&core, &key, 0);
}

#[test]
fn pull_rebuilds_the_log_on_a_fresh_machine() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core) = fleet(dir.path());
    run(zv(&core).args(["backup", "--json"]), 0);
    run(zv(&core).args(["backup", "--json"]), 0);
    let fresh = fresh_machine(dir.path(), &core);
    let key = fleet.identity("ch");

    // at 3 a.m. on a fresh machine: nothing to ask yet, then a restore
    let (_, e) = run(zv(&fresh).args(["audit", "where", "--user", "u"]), 1);
    assert!(e.contains("there is no audit log"), "{e}");
    let to = dir.path().join("restored");
    run(
        zv(&fresh)
            .args(["restore", "--snapshot", "latest", "--json", "--identity"])
            .arg(&key)
            .arg("--to")
            .arg(&to),
        0,
    );
    let reads = show(&fresh, &["--event", "object_read"]);
    assert!(
        reads
            .iter()
            .any(|r| r["key"].as_str().unwrap().ends_with(".manifest.age"))
    );
    assert!(
        reads
            .iter()
            .any(|r| r["key"].as_str().unwrap().contains("/objects/"))
    );
    let done = show(&fresh, &["--event", "restore_done"]);
    assert_eq!(done.len(), 1);
    assert_eq!(
        done[0]["users"].as_array().unwrap().len(),
        2,
        "the two users of the sample volume: {:?}",
        done[0]
    );
    // the reads of unit objects name whose data they fetched
    let mut read_users: Vec<&str> = reads
        .iter()
        .filter(|r| r["key"].as_str().unwrap().contains("/objects/"))
        .flat_map(|r| r["users"].as_array().unwrap())
        .map(|u| u.as_str().unwrap())
        .collect();
    read_users.sort();
    let mut restored: Vec<&str> = done[0]["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    restored.sort();
    assert_eq!(read_users, restored);

    // backing up from here would start a second chain beside the zone's copies
    let (_, e) = run(zv(&fresh).arg("backup"), 1);
    assert!(e.contains("it is not the log that wrote them"), "{e}");
    assert!(e.contains("zonevault audit pull"), "{e}");
    let local = std::fs::read_to_string(dir.path().join("state/fresh/audit.jsonl")).unwrap();

    // pull rebuilds the core's log and keeps this machine's records after it
    let (_, stderr) = run(
        zv(&fresh).args(["audit", "pull", "--identity"]).arg(&key),
        0,
    );
    assert!(stderr.contains("rebuilt"), "{stderr}");
    let (stdout, _) = run(zv(&fresh).args(["audit", "verify"]), 0);
    assert!(stdout.contains("the chain holds"), "{stdout}");
    verify_remote(&fresh, &key, 0);
    let pulled = std::fs::read_to_string(dir.path().join("state/fresh/audit.jsonl")).unwrap();
    let original = std::fs::read_to_string(log_path(dir.path())).unwrap();
    let copied = pulled.lines().count() - local.lines().count();
    let head: String = pulled
        .lines()
        .take(copied)
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(original.starts_with(&head), "the core's records come first");
    let events = |text: &str| -> Vec<String> {
        text.lines()
            .map(|l| Stored::parse(l).unwrap().event().to_string())
            .collect()
    };
    assert_eq!(
        events(&local),
        events(&pulled)[copied..],
        "then this machine's"
    );
    // and the machine can go on backing up
    run(zv(&fresh).args(["backup", "--json"]), 0);
    verify_remote(&fresh, &key, 0);

    // pull never replaces a log that was copied
    let (_, e) = run(
        zv(&fresh).args(["audit", "pull", "--identity"]).arg(&key),
        1,
    );
    assert!(e.contains("never replaces it"), "{e}");
}

#[test]
fn a_lost_log_or_lost_copies_are_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core) = fleet(dir.path());
    run(zv(&core).args(["backup", "--json"]), 0);
    let key = fleet.identity("ch");
    let log = log_path(dir.path());
    let original = std::fs::read_to_string(&log).unwrap();

    // records cut from the end: the marks of what was copied still say so
    let kept: String = original.lines().take(4).map(|l| format!("{l}\n")).collect();
    std::fs::write(&log, &kept).unwrap();
    let (_, e) = run(zv(&core).args(["audit", "verify"]), 1);
    assert!(
        e.contains("line 5: missing: the log ends at record 4"),
        "{e}"
    );
    // a log replaced by a new one: no backup until it is pulled back
    std::fs::remove_file(&log).unwrap();
    let (_, e) = run(zv(&core).arg("backup"), 1);
    assert!(
        e.contains("is not the log whose records were copied"),
        "{e}"
    );
    assert!(e.contains("audit pull"), "{e}");
    assert!(
        show(&core, &["--event", "object_put"]).is_empty(),
        "nothing written"
    );
    std::fs::write(&log, &original).unwrap();
    run(zv(&core).args(["backup", "--json"]), 0);

    // a copy deleted from a target
    let garage = fleet.garage("ch-dk-2");
    let copies: Vec<String> = garage
        .keys()
        .unwrap()
        .into_iter()
        .filter(|k| k.contains("/audit/"))
        .collect();
    assert_eq!(copies.len(), 2);
    garage.delete(copies.last().unwrap()).unwrap();
    let (_, e) = verify_remote(&core, &key, 1);
    assert!(e.contains("its copy is gone: target ch-secondary"), "{e}");
    // the next backup copies the missing records again
    run(zv(&core).args(["backup", "--json"]), 0);
    verify_remote(&core, &key, 0);

    // the machine is lost: pull into an empty state dir gives a log that verifies
    let state = dir.path().join("state/core-ch-1");
    std::fs::remove_dir_all(&state).unwrap();
    let (_, stderr) = run(zv(&core).args(["audit", "pull", "--identity"]).arg(&key), 0);
    assert!(stderr.contains("rebuilt"), "{stderr}");
    run(zv(&core).args(["audit", "verify"]), 0);
    verify_remote(&core, &key, 0);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&state).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "the state dir names users: owner only");
    run(zv(&core).args(["backup", "--json"]), 0);
}

#[test]
fn a_stdout_that_fails_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (_fleet, core) = fleet(dir.path());
    let full = || std::fs::File::create("/dev/full").unwrap();
    for args in [&["check"][..], &["audit", "show"], &["audit", "verify"]] {
        let out = process(&core).args(args).stdout(full()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("writing stdout"), "{args:?}: {stderr}");
    }
}

#[test]
fn audit_usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let (_fleet, core) = fleet(dir.path());
    run(zv(&core).arg("check"), 0);
    let cases: &[(&[&str], &str)] = &[
        (
            &["audit", "show", "--event", "bogus"],
            "is not an event kind",
        ),
        (
            &["audit", "show", "--since", "last tuesday"],
            "is not a time",
        ),
        (&["audit", "verify", "--remote"], "--identity"),
        (&["audit", "where"], "--user"),
        (&["audit", "where", "--user", " "], "--user needs a user id"),
        (
            &[
                "audit",
                "verify",
                "--remote",
                "--identity",
                "/nonexistent/key",
            ],
            "/nonexistent/key",
        ),
    ];
    for (args, message) in cases {
        let (_, e) = run(zv(&core).args(*args), 2);
        assert!(e.contains(message), "{args:?}: {e}");
    }
    // --since and --event filter
    assert_eq!(show(&core, &["--event", "config_loaded"]).len(), 1);
    assert_eq!(show(&core, &["--since", "2999-01-01"]).len(), 0);
    // config loaded, two targets passed
    assert_eq!(show(&core, &["--since", "1h"]).len(), 3);
    let (stdout, _) = run(zv(&core).args(["audit", "show"]), 0);
    assert!(stdout.contains("residency_passed"), "{stdout}");
}

/// What the log says of each (target, key): started, written, deleted, in
/// order. Checks that every deletion is of an object the log knew of.
#[derive(Default)]
struct Known {
    started: std::collections::HashSet<(String, String)>,
    live: std::collections::HashSet<(String, String)>,
}

fn known(core: &Path) -> Known {
    let mut k = Known::default();
    for r in show(core, &[]) {
        let (Some(target), Some(key)) = (r["target"].as_str(), r["key"].as_str()) else {
            continue;
        };
        let at = (target.to_string(), key.to_string());
        match r["event"].as_str().unwrap() {
            "upload_started" => {
                k.started.insert(at);
            }
            "object_put" => {
                assert!(k.started.contains(&at), "put without a start: {r}");
                k.live.insert(at);
            }
            "object_deleted" => {
                assert!(
                    k.started.contains(&at),
                    "a deletion of an object the log never knew of: {r}"
                );
                k.live.remove(&at);
            }
            _ => {}
        }
    }
    k
}

/// Every key on zone ch's targets, as (target, key).
fn stored(fleet: &zonevault_testkit::Fleet) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in &fleet.zone("ch").targets {
        for key in fleet.garage(&t.region).keys().unwrap() {
            out.push((t.name.clone(), key));
        }
    }
    out
}

#[test]
fn a_full_state_dir_fails_the_run_never_tears_the_log_and_the_next_run_needs_no_operator() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core) = fleet(dir.path());
    fleet
        .users_fixture("core-ch-1", &Spec::new(300, 2_000))
        .unwrap();
    let state = dir.path().join("state/core-ch-1");
    let _fs = Tmpfs::mount(&state, "16m");
    // The state dir fills at different points of a run: at once, among
    // the first uploads, further on (a run of these 302 small units, in a
    // few packs, appends ~50 kB of records, then spools its manifest).
    for leave in [24u64 << 10, 0, 40 << 10, 70 << 10] {
        let ballast = fill(&state, leave);
        let (_, e) = run(zv(&core).args(["backup", "--full", "--json"]), 1);
        assert!(e.contains("No space left on device"), "{leave}: {e}");
        assert!(
            e.contains(state.to_str().unwrap()),
            "names the state dir: {e}"
        );
        assert!(!e.contains("panicked"), "{e}");
        // the log is whole: every line a record, the chain holds
        let (stdout, _) = run(zv(&core).args(["audit", "verify"]), 0);
        assert!(stdout.contains("the chain holds"), "{stdout}");
        // nothing is on a target that the log did not know was coming
        let k = known(&core);
        for at in stored(&fleet) {
            assert!(
                k.started.contains(&at),
                "{leave}: {at:?} is on the target, the log never heard of it"
            );
        }

        // space freed: the next run goes on, no operator action
        std::fs::remove_file(&ballast).unwrap();
        run(zv(&core).args(["backup", "--json"]), 0);
        run(zv(&core).args(["audit", "verify"]), 0);
        let k = known(&core);
        let on_targets = stored(&fleet);
        for at in &on_targets {
            assert!(
                k.live.contains(at),
                "{leave}: {at:?} is on the target without an object_put that no deletion followed"
            );
        }
        for t in &fleet.zone("ch").targets {
            let objects: std::collections::BTreeSet<String> = on_targets
                .iter()
                .filter(|(name, key)| *name == t.name && key.contains("/objects/"))
                .map(|(_, key)| key.clone())
                .collect();
            assert_eq!(
                objects,
                common::indexed_objects(&fleet, &t.region),
                "{}: only the objects the snapshots reference, no leftovers",
                t.name
            );
        }
    }
    let key = fleet.identity("ch");
    verify_remote(&core, &key, 0);
}

#[test]
fn multipart_uploads_are_on_record_from_before_their_start_to_their_end_or_abort() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core) = fleet(dir.path());
    // one incompressible unit of many 8 MiB parts: a multipart upload, long
    // enough to be killed in the middle
    let mut big = vec![0u8; 160 << 20];
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
        .args(["backup", "--jobs", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
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
    child.kill().unwrap(); // SIGKILL: nothing of the run aborts its uploads
    child.wait().unwrap();
    // the log knew the upload was coming before the target did
    let started: Vec<Value> = show(&core, &["--event", "upload_started"])
        .into_iter()
        .filter(|r| r["multipart"] == true)
        .collect();
    let primary: Vec<&Value> = started
        .iter()
        .filter(|r| r["target"] == "ch-primary")
        .collect();
    assert_eq!(primary.len(), 1, "{started:?}");
    let killed = primary[0]["key"].as_str().unwrap().to_string();
    assert_eq!(primary[0]["kind"], "unit");
    assert!(killed.contains("/objects/"), "{killed}");

    // the next run aborts the upload left behind, on record, and uploads
    // the unit again: started, then put
    run(zv(&core).args(["backup", "--json"]), 0);
    assert_eq!(gva.pending_uploads().unwrap(), 0);
    let records = show(&core, &[]);
    let position = |event: &str, target: &str, key: &str| {
        records
            .iter()
            .position(|r| r["event"] == event && r["target"] == target && r["key"] == key)
    };
    let aborted = position("upload_aborted", "ch-primary", &killed)
        .unwrap_or_else(|| panic!("no upload_aborted of {killed}: {records:?}"));
    let abort = &records[aborted];
    assert!(
        abort["upload_id"].as_str().is_some_and(|id| !id.is_empty()),
        "{abort}"
    );
    assert!(
        abort["reason"].as_str().unwrap().contains("unfinished run"),
        "{abort}"
    );
    assert!(position("upload_started", "ch-primary", &killed).unwrap() < aborted);
    for r in records.iter().filter(|r| r["event"] == "upload_aborted") {
        let (target, key) = (r["target"].as_str().unwrap(), r["key"].as_str().unwrap());
        assert!(
            position("upload_started", target, key).is_some(),
            "an abort of an upload the log never saw start: {r}"
        );
    }
    let big_puts: Vec<&Value> = records
        .iter()
        .filter(|r| r["event"] == "object_put" && r["bytes"].as_u64().unwrap_or(0) > 2 * (8 << 20))
        .collect();
    assert_eq!(big_puts.len(), 2, "on each target: {big_puts:?}");
    for put in big_puts {
        let (target, key) = (
            put["target"].as_str().unwrap(),
            put["key"].as_str().unwrap(),
        );
        let start = position("upload_started", target, key).expect("a start record");
        assert_eq!(records[start]["multipart"], true, "{}", records[start]);
        assert_eq!(records[start]["users"], put["users"]);
        assert!(start < position("object_put", target, key).unwrap());
    }
    // `audit show` prints the new events in its human form too
    let (stdout, _) = run(
        zv(&core).args(["audit", "show", "--event", "upload_aborted"]),
        0,
    );
    assert!(
        stdout.contains("upload_aborted") && stdout.contains(&killed),
        "{stdout}"
    );
    run(zv(&core).args(["audit", "verify"]), 0);
}

/// The outcome events recorded for `key` (after its `upload_started`).
fn records_after(core: &Path, target: &str, key: &str) -> Vec<&'static str> {
    show(core, &[])
        .iter()
        .filter(|r| r["key"] == key && r["target"] == target)
        .filter_map(|r| match r["event"].as_str().unwrap() {
            "object_deleted" => Some("object_deleted"),
            "object_absent" => Some("object_absent"),
            "object_put" => Some("object_put"),
            _ => None,
        })
        .collect()
}

/// SIGKILL between a unit object's write and its `object_put` record: the
/// object is on the target and the log has only its intent. `audit where`
/// still lists it (unconfirmed); the next run's cleanup deletes it, on
/// record, and `audit where` then lists only what is stored.
#[test]
fn a_crash_between_a_write_and_its_record_hides_no_copy() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core) = fleet(dir.path());
    let users = fleet
        .users_fixture("core-ch-1", &Spec::new(3, 20_000))
        .unwrap();
    let out = process(&core)
        .arg("backup")
        .env("ZONEVAULT_FAILPOINT", "after-object-write")
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "{:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // the intent of the write that landed, with no outcome (other writes
    // in flight may have intents without objects)
    let records = show(&core, &[]);
    let on_target = |target: &str| {
        let region = if target == "ch-primary" {
            "ch-gva-2"
        } else {
            "ch-dk-2"
        };
        fleet.garage(region).keys().unwrap()
    };
    let open: Vec<&Value> = records
        .iter()
        // a user's unit (the shared unit, which holds no user's data, may
        // land first too)
        .filter(|r| r["event"] == "upload_started" && r["kind"] == "unit")
        .filter(|r| r["users"].as_array().is_some_and(|u| !u.is_empty()))
        .filter(|r| {
            !records.iter().any(|p| {
                p["event"] == "object_put" && p["key"] == r["key"] && p["target"] == r["target"]
            })
        })
        .collect();
    let intent = open
        .iter()
        .find(|r| {
            on_target(r["target"].as_str().unwrap())
                .iter()
                .any(|k| *k == r["key"])
        })
        .expect("an object on a target with only its intent on record");
    let (key, target) = (
        intent["key"].as_str().unwrap(),
        intent["target"].as_str().unwrap(),
    );
    let user = intent["users"][0].as_str().unwrap().to_string();
    assert!(users.contains(&user));
    let (stdout, _) = run(
        zv(&core).args(["audit", "where", "--user", &user, "--json"]),
        0,
    );
    let listed = json(&stdout);
    let found = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["key"] == key && l["target"] == target)
        .unwrap_or_else(|| panic!("audit where does not list {key}: {stdout}"));
    assert_eq!(found["status"], "unconfirmed");
    let (human, _) = run(zv(&core).args(["audit", "where", "--user", &user]), 0);
    assert!(
        human.contains(key) && human.contains("unconfirmed"),
        "{human}"
    );

    // the next run removes it, on record
    run(zv(&core).arg("backup"), 0);
    assert!(
        !on_target(target).iter().any(|k| k == key),
        "{key} was not deleted"
    );
    let records = show(&core, &[]);
    let deleted: Vec<&str> = records
        .iter()
        .filter(|r| r["key"] == key && r["target"] == target)
        .map(|r| r["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        deleted,
        ["upload_started", "delete_started", "object_deleted"],
        "{key}"
    );
    let (stdout, _) = run(
        zv(&core).args(["audit", "where", "--user", &user, "--json"]),
        0,
    );
    let listed = json(&stdout);
    let listed = listed.as_array().unwrap();
    assert!(!listed.iter().any(|l| l["key"] == key), "{stdout}");
    assert_eq!(listed.len(), 2, "one stored copy per target: {stdout}");
    assert!(listed.iter().all(|l| l["status"] == "stored"), "{stdout}");
    for r in open {
        let k = r["key"].as_str().unwrap();
        let outcome = records_after(&core, r["target"].as_str().unwrap(), k);
        assert!(
            outcome == ["object_deleted"] || outcome == ["object_absent"],
            "{k}: {outcome:?}"
        );
    }
    run(zv(&core).args(["audit", "verify"]), 0);
}
