//! Shared test helpers: the zonevault binary and a local Garage fleet.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};

use assert_cmd::Command;
pub use zonevault_testkit::Fleet;
use zonevault_testkit::fixture::Spec;

/// The zonevault binary, with a clean environment for config lookup.
pub fn zonevault() -> Command {
    let mut cmd = Command::cargo_bin("zonevault").expect("zonevault binary");
    cmd.env_remove("ZONEVAULT_CONFIG").env_remove("RUST_LOG");
    cmd
}

/// zonevault with `--config CONFIG`.
pub fn zv(config: &Path) -> Command {
    let mut cmd = zonevault();
    cmd.arg("--config").arg(config);
    cmd
}

/// zonevault with `--config CONFIG` as a plain process, for the runs a test
/// signals, kills or races (assert_cmd waits for its commands).
pub fn process(config: &Path) -> Process {
    let mut cmd = Process::new(assert_cmd::cargo::cargo_bin("zonevault"));
    cmd.env_remove("ZONEVAULT_CONFIG")
        .env_remove("RUST_LOG")
        .arg("--config")
        .arg(config);
    cmd
}

/// Starts the two-zone fleet in `dir` and writes its configs. Panics (fails
/// the test) when Garage is missing: these tests never skip.
pub fn fleet(dir: &Path) -> (Fleet, PathBuf) {
    let fleet = Fleet::start(dir).unwrap_or_else(|e| panic!("starting the Garage fleet: {e:#}"));
    let core = fleet.write_configs().expect("writing the fleet's configs");
    (fleet, core)
}

/// stdout and stderr of a finished command, as text.
pub fn output_text(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a command, asserts the exit code, returns (stdout, stderr).
pub fn run(cmd: &mut Command, code: i32) -> (String, String) {
    let out = cmd.output().unwrap();
    let (stdout, stderr) = output_text(&out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (stdout, stderr)
}

/// Points target ch-secondary (which claims region ch-dk-2) at the German
/// Garage, as a copied or mistyped config would, and writes the configs.
pub fn spoof_ch_secondary(fleet: &mut Fleet) -> PathBuf {
    let de = fleet.garage("de-fra-1");
    let (endpoint, bucket, key_id, secret) = (
        de.endpoint.clone(),
        de.bucket.clone(),
        de.key_id.clone(),
        de.secret.clone(),
    );
    let t = &mut fleet.zone_mut("ch").targets[1];
    (t.endpoint, t.bucket, t.key_id, t.secret) = (endpoint, bucket, key_id, secret);
    // the German zone must not list the same bucket+prefix: give it another prefix
    fleet.zone_mut("de").targets[0].prefix = "zonevault-de".into();
    fleet.write_configs().unwrap()
}

/// Runs a reference tool (age, age-keygen, zstd, tar), feeding `input`, and
/// returns its stdout. Fails the test (never skips) when the tool is missing.
pub fn tool(program: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Process::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} not found ({e}): run scripts/install-deps"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub fn backup(core: &Path) -> serde_json::Value {
    let (stdout, _) = run(zv(core).args(["backup", "--json"]), 0);
    serde_json::from_str(&stdout).unwrap()
}

pub fn restore(core: &Path, key: &Path, to: &Path, extra: &[&str], code: i32) -> (String, String) {
    run(
        zv(core)
            .args(["restore", "--snapshot", "latest", "--identity"])
            .arg(key)
            .arg("--to")
            .arg(to)
            .args(extra),
        code,
    )
}

/// A fleet whose core-ch-1 has a generated users volume of `users` users.
pub fn fleet_with_users(dir: &Path, users: usize, bytes: usize) -> (Fleet, PathBuf, Vec<String>) {
    let (fleet, core) = fleet(dir);
    let ids = fleet
        .users_fixture("core-ch-1", &Spec::new(users, bytes))
        .unwrap();
    (fleet, core, ids)
}

/// The identity file of the data key in key object `data_key` (relative),
/// as docs/format.md has it by hand: `age -d -i zone.key keys/K.age > K.key`.
/// The file lives as long as the returned directory.
pub fn data_key_file(fleet: &Fleet, data_key: &str) -> (tempfile::TempDir, PathBuf) {
    let sealed = fleet
        .garage("ch-gva-2")
        .get(&format!("zonevault/{data_key}"))
        .unwrap();
    let zone = fleet.identity("ch");
    let text = tool("age", &["-d", "-i", zone.to_str().unwrap()], &sealed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.key");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// Opens `sealed` with the age CLI as an operator would: with the data key
/// it names (two steps), or the zone identity for an object that has none.
pub fn open_by_hand(fleet: &Fleet, data_key: Option<&str>, sealed: &[u8]) -> Vec<u8> {
    match data_key {
        Some(k) => {
            let (_dir, key) = data_key_file(fleet, k);
            tool("age", &["-d", "-i", key.to_str().unwrap()], sealed)
        }
        None => {
            let zone = fleet.identity("ch");
            tool("age", &["-d", "-i", zone.to_str().unwrap()], sealed)
        }
    }
}

/// The recipient (`age1...`) of the data key in key object `data_key`.
pub fn data_key_recipient(fleet: &Fleet, data_key: &str) -> String {
    let (_dir, key) = data_key_file(fleet, data_key);
    let text = std::fs::read_to_string(key).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("# public key: "))
        .expect("an identity file with its public key")
        .to_string()
}

/// The index of the only snapshot of core-ch-1 (as stored on ch-gva-2).
pub fn only_index(fleet: &Fleet) -> serde_json::Value {
    let gva = fleet.garage("ch-gva-2");
    let mut indexes: Vec<String> = gva
        .keys()
        .unwrap()
        .into_iter()
        .filter(|k| k.contains("/snapshots/") && k.ends_with(".json"))
        .collect();
    indexes.sort();
    let key = indexes.pop().expect("an index");
    serde_json::from_slice(&gva.get(&key).unwrap()).unwrap()
}

/// The decrypted manifest of the newest snapshot, read with the age CLI
/// (its data key first, as docs/format.md says).
pub fn manifest(fleet: &Fleet) -> serde_json::Value {
    manifest_in(fleet, &only_index(fleet))
}

/// The decrypted manifest of snapshot `id` of core-ch-1.
pub fn manifest_of(fleet: &Fleet, id: &str) -> serde_json::Value {
    let key = format!("zonevault/core-ch-1/snapshots/{id}.json");
    let index = serde_json::from_slice(&fleet.garage("ch-gva-2").get(&key).unwrap()).unwrap();
    manifest_in(fleet, &index)
}

fn manifest_in(fleet: &Fleet, index: &serde_json::Value) -> serde_json::Value {
    let key = format!("zonevault/{}", index["manifest"]["key"].as_str().unwrap());
    let sealed = fleet.garage("ch-gva-2").get(&key).unwrap();
    let plain = open_by_hand(fleet, index["manifest"]["data_key"].as_str(), &sealed);
    serde_json::from_slice(&plain).unwrap()
}

/// The object key (in the bucket) of `user`'s unit.
pub fn object_of(fleet: &Fleet, user: &str) -> String {
    let m = manifest(fleet);
    let unit = m["units"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["user"] == user)
        .unwrap();
    format!("zonevault/{}", unit["object"].as_str().unwrap())
}

/// A tar holding `entries` (raw, unchecked paths), compressed and encrypted
/// to `user`'s data key as zonevault would: what an attacker with write
/// access (and the recipient, which is no secret) could put.
pub fn hostile_object(
    fleet: &Fleet,
    user: &str,
    entries: &[(&str, tar::EntryType, &str)],
) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, kind, content) in entries {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        if *kind == tar::EntryType::Symlink {
            h.as_gnu_mut().unwrap().linkname[..content.len()].copy_from_slice(content.as_bytes());
            h.set_size(0);
            h.set_cksum();
            builder.append(&h, std::io::empty()).unwrap();
        } else {
            h.set_size(content.len() as u64);
            h.set_cksum();
            builder.append(&h, content.as_bytes()).unwrap();
        }
    }
    let tar = builder.into_inner().unwrap();
    let unit = unit_of(fleet, user);
    let recipient = data_key_recipient(fleet, unit["data_key"].as_str().unwrap());
    tool("age", &["-r", &recipient], &tool("zstd", &["-q"], &tar))
}

/// Writes one object per unit from now on (`[transfer] pack_size = "0"`):
/// for the tests that swap or damage the object of one unit.
pub fn one_object_per_unit(core: &Path) {
    let mut f = std::fs::OpenOptions::new().append(true).open(core).unwrap();
    writeln!(f, "\n[transfer]\npack_size = \"0\"").unwrap();
}

/// A unit's own bytes (`age(zstd(tar))`) out of its object as stored: the
/// whole object, or the unit's range of a pack (what a ranged GET reads).
pub fn unit_bytes(object: &[u8], unit: &serde_json::Value) -> Vec<u8> {
    match unit["offset"].as_u64() {
        None => object.to_vec(),
        Some(offset) => {
            let len = unit["stored_size"].as_u64().unwrap();
            object[offset as usize..(offset + len) as usize].to_vec()
        }
    }
}

/// The unit entry of `user` in the only snapshot's manifest.
pub fn unit_of(fleet: &Fleet, user: &str) -> serde_json::Value {
    manifest(fleet)["units"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["user"] == user)
        .unwrap()
        .clone()
}

/// The object keys (in the bucket) that the committed indexes on `region`
/// reference: what a target holds when nothing is left over.
pub fn indexed_objects(fleet: &Fleet, region: &str) -> std::collections::BTreeSet<String> {
    let garage = fleet.garage(region);
    let mut out = std::collections::BTreeSet::new();
    for key in garage.keys().unwrap() {
        if key.contains("/snapshots/") && key.ends_with(".json") {
            let index: serde_json::Value =
                serde_json::from_slice(&garage.get(&key).unwrap()).unwrap();
            for o in index["objects"].as_array().unwrap() {
                out.insert(format!("zonevault/{}", o["key"].as_str().unwrap()));
            }
        }
    }
    out
}
