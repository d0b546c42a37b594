//! `layout = "command"` volumes (a dump streamed as one file, never in
//! plaintext on disk) and per-volume `before` / `after` hooks, against
//! Garage and a real PostgreSQL server.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::*;
use zonevault_testkit::postgres::Postgres;

/// core-ch-1's config with `extra` appended (more [[volumes]]) and
/// `users_extra` added to the users volume.
fn write_core(fleet: &Fleet, users_extra: &str, extra: &str) -> PathBuf {
    let core = fleet.write_configs().unwrap();
    let mut toml = fleet.core_toml("core-ch-1");
    if !users_extra.is_empty() {
        toml = toml.replacen(
            "layout = \"pryv\"\n",
            &format!("layout = \"pryv\"\n{users_extra}\n"),
            1,
        );
    }
    toml.push_str(extra);
    std::fs::write(&core, toml).unwrap();
    core
}

fn toml_argv(argv: &[&str]) -> String {
    format!("{argv:?}")
}

fn snapshots(core: &Path) -> serde_json::Value {
    let (stdout, _) = run(zv(core).args(["snapshots", "--json"]), 0);
    serde_json::from_str(&stdout).unwrap()
}

fn audit_events(core: &Path) -> Vec<serde_json::Value> {
    let (stdout, _) = run(zv(core).args(["audit", "show", "--json"]), 0);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|_| {
        serde_json::Value::Array(
            stdout
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
        )
    });
    match v {
        serde_json::Value::Array(a) => a,
        other => other["records"].as_array().cloned().unwrap_or_default(),
    }
}

/// Processes whose command line contains `marker` (other than us).
fn running_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(marker) {
                found.push(cmd);
            }
        }
    }
    found
}

#[test]
fn a_postgres_dump_under_writes_restores_whole() {
    let dir = tempfile::tempdir().unwrap();
    let pgdir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(pgdir.path()).unwrap();
    pg.sql("postgres", "CREATE DATABASE pryvnode").unwrap();
    pg.sql(
        "pryvnode",
        "CREATE TABLE t (id serial PRIMARY KEY, v text NOT NULL); \
         CREATE TABLE c (n bigint NOT NULL); INSERT INTO c VALUES (0); \
         INSERT INTO t (v) SELECT 'row-' || g FROM generate_series(1, 2000) g; \
         UPDATE c SET n = 2000;",
    )
    .unwrap();
    // a writer that keeps committing: each transaction adds a row and counts it
    let mut writer = pg
        .tool("psql")
        .args(["-X", "-q", "-d", "pryvnode"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = writer.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        for i in 0..200_000 {
            let tx = format!(
                "BEGIN; INSERT INTO t (v) VALUES ('live-{i}'); UPDATE c SET n = n + 1; COMMIT;\n"
            );
            if stdin.write_all(tx.as_bytes()).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    let before: i64 = pg
        .sql("pryvnode", "SELECT count(*) FROM t")
        .unwrap()
        .parse()
        .unwrap();
    assert!(before > 2000, "the writer is writing");

    let (fleet, _) = fleet(dir.path());
    let pg_dump = pg.bin("pg_dump");
    let argv = [
        pg_dump.to_str().unwrap(),
        "-Fc",
        "-h",
        pg.socket_dir.to_str().unwrap(),
        "-p",
        &pg.port.to_string(),
        "-U",
        "postgres",
        "pryvnode",
    ];
    let core = write_core(
        &fleet,
        "",
        &format!(
            "\n[[volumes]]\nname = \"pg\"\nlayout = \"command\"\ncommand = {}\nfile = \"pryv-node.dump\"\ntimeout = \"5m\"\n",
            toml_argv(&argv)
        ),
    );
    let report = backup(&core);
    let _ = writer.kill();
    let _ = writer.wait();
    let _ = feeder.join();
    assert!(report["units"].as_u64().unwrap() >= 2);

    // nothing of the dump stayed in the state dir
    let state = dir.path().join("state/core-ch-1");
    for e in std::fs::read_dir(&state).unwrap().flatten() {
        assert!(
            !e.file_name().to_string_lossy().contains("dump"),
            "{:?} left in the state dir",
            e.path()
        );
    }

    let to = dir.path().join("restored");
    restore(&core, &fleet.identity("ch"), &to, &["--volume", "pg"], 0);
    let dumped = to.join("pg/pryv-node.dump");
    assert!(
        dumped.is_file(),
        "restore puts the dump at DIR/pg/pryv-node.dump"
    );

    pg.sql("postgres", "CREATE DATABASE fresh").unwrap();
    let out = pg
        .tool("pg_restore")
        .args(["-d", "fresh", "--no-owner"])
        .arg(&dumped)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let count: i64 = pg
        .sql("fresh", "SELECT count(*) FROM t")
        .unwrap()
        .parse()
        .unwrap();
    let counted: i64 = pg.sql("fresh", "SELECT n FROM c").unwrap().parse().unwrap();
    assert_eq!(count, counted, "the dump is one transaction's state");
    assert!(
        count >= before,
        "{count} rows restored, {before} committed before the backup"
    );
    let ids: String = pg.sql("fresh", "SELECT count(*) = max(id) FROM t").unwrap();
    assert_eq!(ids, "t", "no row missing in the restored table");

    // the reference tools read the object: one entry, pryv-node.dump
    let m = manifest(&fleet);
    let unit = m["units"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["volume"] == "pg")
        .expect("a unit of volume pg");
    let key = format!("zonevault/{}", unit["object"].as_str().unwrap());
    let object = unit_bytes(&fleet.garage("ch-gva-2").get(&key).unwrap(), unit);
    let tar = tool(
        "zstd",
        &["-d", "-q"],
        &common::open_by_hand(&fleet, unit["data_key"].as_str(), &object),
    );
    let listed = tool("tar", &["-t"], &tar);
    assert_eq!(String::from_utf8_lossy(&listed), "pryv-node.dump\n");
}

/// A backup with one command volume running `argv` fails with exit 1, its
/// message containing `expect`; nothing is committed; no process is left.
fn failing_command(argv: &[&str], timeout: &str, expect: &str, marker: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, _) = fleet(dir.path());
    let core = write_core(
        &fleet,
        "",
        &format!(
            "\n[[volumes]]\nname = \"db\"\nlayout = \"command\"\ncommand = {}\nfile = \"db.dump\"\ntimeout = {timeout:?}\n",
            toml_argv(argv)
        ),
    );
    let before = snapshots(&core);
    let started = std::time::Instant::now();
    let (_, stderr) = run(zv(&core).arg("backup"), 1);
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    assert!(stderr.contains(expect), "{expect:?} not in:\n{stderr}");
    assert_eq!(snapshots(&core), before, "nothing committed");
    let gva = fleet.garage("ch-gva-2");
    assert!(
        !gva.keys()
            .unwrap()
            .iter()
            .any(|k| k.contains("/snapshots/")),
        "no index or manifest written"
    );
    assert!(
        running_with(marker).is_empty(),
        "left running: {:?}",
        running_with(marker)
    );
}

#[test]
fn a_failing_command_fails_the_run_with_its_stderr() {
    failing_command(
        &["sh", "-c", "echo zv-boom-marker >&2; exit 3"],
        "1m",
        "zv-boom-marker",
        "zv-boom-marker",
    );
}

#[test]
fn a_hanging_command_times_out_and_is_killed() {
    failing_command(&["sleep", "1000.123"], "2s", "timed out", "1000.123");
}

#[test]
fn a_signalled_command_fails_the_run() {
    failing_command(
        &["sh", "-c", "kill -9 $$ # zv-signal-marker"],
        "1m",
        "signal 9",
        "zv-signal-marker",
    );
}

/// A hook that appends its phase, volume and snapshot to `log`.
fn logging_hook(log: &Path, what: &str) -> String {
    toml_argv(&[
        "sh",
        "-c",
        &format!(
            "echo \"{what} $ZONEVAULT_PHASE $ZONEVAULT_VOLUME $ZONEVAULT_SNAPSHOT\" >> {}",
            log.display()
        ),
    ])
}

#[test]
fn hooks_run_in_order_around_the_volume_and_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, _) = fleet(dir.path());
    let log = dir.path().join("hooks.log");
    // the dump command logs too: it runs between before and after
    let core = write_core(
        &fleet,
        &format!(
            "before = {}\nafter = {}",
            logging_hook(&log, "users"),
            logging_hook(&log, "users")
        ),
        &format!(
            "\n[[volumes]]\nname = \"db\"\nlayout = \"command\"\ncommand = {}\nfile = \"db.dump\"\nbefore = {}\nafter = {}\nhook_timeout = \"30s\"\n",
            toml_argv(&[
                "sh",
                "-c",
                &format!(
                    "echo \"db command $ZONEVAULT_PHASE\" >> {}; echo dumped",
                    log.display()
                )
            ]),
            logging_hook(&log, "db"),
            logging_hook(&log, "db"),
        ),
    );
    let report = backup(&core);
    let id = report["snapshot"].as_str().unwrap();
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(
        lines,
        vec![
            format!("users before users {id}"),
            format!("db before db {id}"),
            "db command command".to_string(),
            format!("db after db {id}"),
            format!("users after users {id}"),
        ]
    );
    let events = audit_events(&core);
    let hooks: Vec<(String, String, String)> = events
        .iter()
        .filter(|e| e["event"] == "hook_finished")
        .map(|e| {
            (
                e["volume"].as_str().unwrap().to_string(),
                e["phase"].as_str().unwrap().to_string(),
                e["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(hooks.len(), 5, "{hooks:?}");
    assert!(hooks.iter().all(|(_, _, s)| s == "exit 0"));
    assert_eq!(
        events
            .iter()
            .filter(|e| e["event"] == "hook_started")
            .count(),
        5
    );
    run(zv(&core).args(["audit", "verify"]), 0);
    // restore puts the dump where it belongs
    let to = dir.path().join("r");
    restore(&core, &fleet.identity("ch"), &to, &["--volume", "db"], 0);
    assert_eq!(
        std::fs::read_to_string(to.join("db/db.dump")).unwrap(),
        "dumped\n"
    );
}

#[test]
fn after_runs_when_the_volume_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, _) = fleet(dir.path());
    let log = dir.path().join("hooks.log");
    let core = write_core(
        &fleet,
        "",
        &format!(
            "\n[[volumes]]\nname = \"db\"\nlayout = \"command\"\ncommand = [\"false\"]\nfile = \"db.dump\"\nbefore = {}\nafter = {}\n",
            logging_hook(&log, "db"),
            logging_hook(&log, "db"),
        ),
    );
    let before = snapshots(&core);
    run(zv(&core).arg("backup"), 1);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.lines().any(|l| l.starts_with("db after db")), "{text}");
    assert_eq!(snapshots(&core), before);
    run(zv(&core).args(["audit", "verify"]), 0);
}

#[test]
fn a_failing_before_hook_stops_the_run_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, _) = fleet(dir.path());
    let log = dir.path().join("hooks.log");
    let core = write_core(
        &fleet,
        &format!(
            "before = {}\nafter = {}",
            toml_argv(&["sh", "-c", "echo snap-failed >&2; exit 4"]),
            logging_hook(&log, "users"),
        ),
        "",
    );
    let before = snapshots(&core);
    let (_, stderr) = run(zv(&core).arg("backup"), 1);
    assert!(
        stderr.contains("before hook") && stderr.contains("snap-failed"),
        "{stderr}"
    );
    assert_eq!(snapshots(&core), before);
    let gva = fleet.garage("ch-gva-2");
    assert!(
        !gva.keys().unwrap().iter().any(|k| k.contains("/objects/")),
        "no unit uploaded"
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("users after users")
    );
    let events = audit_events(&core);
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "hook_finished" && e["status"] == "exit 4")
    );
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "upload_started" && e["kind"] == "unit")
    );
    run(zv(&core).args(["audit", "verify"]), 0);
}

#[test]
fn a_hook_that_hangs_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, _) = fleet(dir.path());
    let core = write_core(
        &fleet,
        "before = [\"sleep\", \"1000.456\"]\nhook_timeout = \"1s\"",
        "",
    );
    let (_, stderr) = run(zv(&core).arg("backup"), 1);
    assert!(stderr.contains("timed out"), "{stderr}");
    assert!(running_with("1000.456").is_empty());
    let events = audit_events(&core);
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "hook_finished" && e["status"] == "timeout")
    );
}

/// The daemon's SIGTERM does not wait for a dump that would run for an
/// hour: the command's process group is killed, nothing is committed, and
/// the `after` hook still runs (it undoes what `before` did).
#[test]
fn sigterm_stops_a_running_dump_and_the_after_hook_still_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (mut fleet, _) = fleet(dir.path());
    // a daily schedule: only the catch-up run at start happens
    fleet.zone_mut("ch").schedule = "backup = \"0 30 2 * * *\"".into();
    let log = dir.path().join("hooks.log");
    let core = write_core(
        &fleet,
        "",
        &format!(
            "\n[[volumes]]\nname = \"db\"\nlayout = \"command\"\ncommand = {}\nfile = \"db.dump\"\ntimeout = \"1h\"\nbefore = {}\nafter = {}\n",
            toml_argv(&[
                "sh",
                "-c",
                &format!("echo db dumping >> {}; exec sleep 1000.456", log.display()),
            ]),
            logging_hook(&log, "db"),
            logging_hook(&log, "db"),
        ),
    );
    let before = snapshots(&core);
    let daemon_log = dir.path().join("daemon.log");
    let mut daemon = process(&core)
        .args(["daemon", "--stop-timeout", "30s"])
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&daemon_log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while running_with("1000.456").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the dump never started:\n{}",
            std::fs::read_to_string(&daemon_log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let stopped = std::time::Instant::now();
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopped.elapsed() < std::time::Duration::from_secs(40),
            "the daemon did not exit"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let daemon_log = std::fs::read_to_string(&daemon_log).unwrap();
    assert!(status.success(), "{status}\n{daemon_log}");
    // well inside --stop-timeout: the dump was stopped, not waited for
    assert!(
        stopped.elapsed() < std::time::Duration::from_secs(10),
        "took {:?}:\n{daemon_log}",
        stopped.elapsed()
    );
    assert!(
        running_with("1000.456").is_empty(),
        "left running: {:?}",
        running_with("1000.456")
    );
    let phases: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(phases, ["db before", "db dumping", "db after"]);
    assert_eq!(snapshots(&core), before, "nothing committed");
    assert!(
        audit_events(&core)
            .iter()
            .any(|e| e["event"] == "hook_finished"
                && e["phase"] == "command"
                && e["status"] == "stopped"),
        "no hook_finished record with status stopped: {:?}",
        audit_events(&core)
            .iter()
            .filter(|e| e["event"] == "hook_finished")
            .collect::<Vec<_>>()
    );
}
