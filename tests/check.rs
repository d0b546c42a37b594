//! `zonevault check` against real Garage servers, one per region.

mod common;

use common::{fleet, output_text, spoof_ch_secondary, zv};

#[test]
fn good_fleet_passes_both_targets() {
    let dir = tempfile::tempdir().unwrap();
    let (mut fleet, core) = fleet(dir.path());
    let out = zv(&core).arg("check").output().unwrap();
    let (stdout, stderr) = output_text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for target in ["ch-primary", "ch-secondary"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(target))
            .unwrap_or_else(|| panic!("no line for {target}:\n{stdout}"));
        assert!(line.contains(" pass "), "{line}");
    }
    assert!(
        !stdout.contains("de-primary"),
        "another zone's target was checked:\n{stdout}"
    );
    let key = &fleet.zone("ch").signing_keys[0].1;
    assert!(
        stdout.contains(&format!("snapshots are signed with {key}")),
        "{stdout}"
    );

    // the zone map lists a key for the core, but the core has none: exit 2
    std::fs::remove_file(dir.path().join("keys/core-ch-1.signing.key")).unwrap();
    let out = zv(&core).arg("check").output().unwrap();
    let (_, stderr) = output_text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("does not exist") && stderr.contains("keygen --signing"),
        "{stderr}"
    );
    // neither a key nor a listed one: a warning
    fleet.zone_mut("ch").signing_keys.clear();
    fleet.write_configs().unwrap();
    let out = zv(&core).arg("check").output().unwrap();
    let (stdout, _) = output_text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("warning: core core-ch-1 signs no snapshot"),
        "{stdout}"
    );
}

#[test]
fn spoofed_region_is_refused_and_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let (mut fleet, _) = fleet(dir.path());
    let core = spoof_ch_secondary(&mut fleet);
    let out = zv(&core).arg("check").output().unwrap();
    let (stdout, stderr) = output_text(&out);
    assert_eq!(
        out.status.code(),
        Some(3),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("ch-secondary"))
        .unwrap();
    assert!(line.contains("refused"), "{line}");
    assert!(
        line.contains("de-fra-1"),
        "the reported region is not named: {line}"
    );
    assert!(stderr.contains("residency refused"), "{stderr}");
    assert_eq!(
        fleet.garage("de-fra-1").keys().unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        fleet.garage("ch-gva-2").keys().unwrap(),
        Vec::<String>::new()
    );
}

/// Runs `check --json` and returns (exit code, the report, stderr).
fn check_json(core: &std::path::Path) -> (i32, serde_json::Value, String) {
    let out = zv(core).args(["check", "--json"]).output().unwrap();
    let (stdout, stderr) = output_text(&out);
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("check --json printed no JSON ({e}):\n{stdout}\n{stderr}"));
    (out.status.code().unwrap(), report, stderr)
}

fn target<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == name)
        .unwrap_or_else(|| panic!("no target {name} in {report}"))
}

#[test]
fn json_report_lists_each_target() {
    let dir = tempfile::tempdir().unwrap();
    let (_fleet, core) = fleet(dir.path());
    let (code, report, _) = check_json(&core);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["zone"], "ch");
    assert_eq!(report["core"], "core-ch-1");
    let t = target(&report, "ch-secondary");
    assert_eq!(t["verdict"], "pass");
    assert_eq!(t["region"], "ch-dk-2");
    assert_eq!(t["reported_region"], "ch-dk-2");
}

#[test]
fn unreachable_endpoint_is_a_failure_naming_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let (mut fleet, _) = fleet(dir.path());
    // a port that nothing listens on
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    fleet.zone_mut("ch").targets[0].endpoint = format!("http://127.0.0.1:{port}");
    let core = fleet.write_configs().unwrap();
    let (code, report, stderr) = check_json(&core);
    assert_eq!(code, 1, "{report}\n{stderr}");
    let t = target(&report, "ch-primary");
    assert_eq!(t["verdict"], "error");
    assert_eq!(t["failure"], "unavailable");
    let reason = t["reason"].as_str().unwrap();
    assert!(
        reason.contains("cannot reach") && reason.contains("onnection refused"),
        "{reason}"
    );
    assert_eq!(target(&report, "ch-secondary")["verdict"], "pass");
    assert!(target(&report, "ch-secondary")["failure"].is_null());
    assert!(stderr.contains("could not be checked"), "{stderr}");
}

#[test]
fn wrong_secret_is_a_failure_naming_the_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let (mut fleet, _) = fleet(dir.path());
    fleet.zone_mut("ch").targets[0].secret = "0".repeat(64);
    let core = fleet.write_configs().unwrap();
    let (code, report, _) = check_json(&core);
    assert_eq!(code, 1, "{report}");
    assert_eq!(target(&report, "ch-primary")["failure"], "credentials");
    let reason = target(&report, "ch-primary")["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("refused the credentials"), "{reason}");
    // a secret never appears in output
    let out = zv(&core).arg("check").output().unwrap();
    let (stdout, stderr) = output_text(&out);
    assert!(!stdout.contains(&"0".repeat(64)) && !stderr.contains(&"0".repeat(64)));
}

#[test]
fn missing_bucket_is_a_failure_naming_the_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let (mut fleet, _) = fleet(dir.path());
    fleet.zone_mut("ch").targets[1].bucket = "no-such-bucket".into();
    let core = fleet.write_configs().unwrap();
    let (code, report, _) = check_json(&core);
    assert_eq!(code, 1, "{report}");
    let reason = target(&report, "ch-secondary")["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains("\"no-such-bucket\" does not exist"),
        "{reason}"
    );
}

#[test]
fn marker_of_another_zone_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core) = fleet(dir.path());
    let gva = fleet.garage("ch-gva-2");
    gva.put("zonevault/zonevault.json", br#"{"format":1,"zone":"de"}"#)
        .unwrap();
    let (code, report, stderr) = check_json(&core);
    assert_eq!(code, 3, "{report}\n{stderr}");
    let t = target(&report, "ch-primary");
    assert_eq!(t["verdict"], "refused");
    assert_eq!(t["failure"], "residency");
    assert!(
        t["reason"].as_str().unwrap().contains("names zone \"de\""),
        "{t}"
    );
    // check wrote nothing: the marker we put is the only object
    assert_eq!(
        gva.keys().unwrap(),
        vec!["zonevault/zonevault.json".to_string()]
    );
}

#[test]
fn marker_of_this_zone_passes() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core) = fleet(dir.path());
    fleet
        .garage("ch-gva-2")
        .put("zonevault/zonevault.json", br#"{"format":1,"zone":"ch"}"#)
        .unwrap();
    let (code, report, _) = check_json(&core);
    assert_eq!(code, 0, "{report}");
    assert!(
        target(&report, "ch-primary")["reason"]
            .as_str()
            .unwrap()
            .contains("marker names this zone")
    );
}

#[test]
fn refusal_outranks_failure() {
    let dir = tempfile::tempdir().unwrap();
    let (mut fleet, _) = fleet(dir.path());
    fleet
        .garage("ch-gva-2")
        .put("zonevault/zonevault.json", br#"{"format":1,"zone":"de"}"#)
        .unwrap();
    fleet.zone_mut("ch").targets[1].bucket = "no-such-bucket".into();
    let core = fleet.write_configs().unwrap();
    let (code, report, _) = check_json(&core);
    assert_eq!(code, 3, "{report}");
}

#[test]
fn a_secret_quoted_back_by_the_server_is_redacted() {
    // Swapped credential files: the secret goes out as the key id, and the
    // server answers "No such key: <it>".
    let dir = tempfile::tempdir().unwrap();
    let (mut fleet, _) = fleet(dir.path());
    let secret = fleet.zone("ch").targets[0].secret.clone();
    fleet.zone_mut("ch").targets[0].key_id = secret.clone();
    let core = fleet.write_configs().unwrap();
    let out = zv(&core).args(["check", "--json"]).output().unwrap();
    let (stdout, stderr) = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("refused the credentials"), "{stdout}");
    assert!(
        !stdout.contains(&secret) && !stderr.contains(&secret),
        "{stdout}\n{stderr}"
    );
}

#[test]
fn marker_of_an_unknown_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core) = fleet(dir.path());
    fleet
        .garage("ch-dk-2")
        .put("zonevault/zonevault.json", br#"{"format":2,"zone":"ch"}"#)
        .unwrap();
    let (code, report, _) = check_json(&core);
    assert_eq!(code, 3, "{report}");
    assert!(
        target(&report, "ch-secondary")["reason"]
            .as_str()
            .unwrap()
            .contains("format 2")
    );
}
