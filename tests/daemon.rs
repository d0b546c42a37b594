//! The daemon against Garage: scheduled runs and their metrics, an outage
//! and its end, SIGTERM during an upload, SIGHUP with a broken config,
//! /healthz; and the systemd unit.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Fleet, fleet, process, run, zv};
use zonevault_testkit::fixture::Spec;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fleet whose zone ch backs up every `every` seconds, keeps 2 snapshots,
/// and whose core serves metrics on a free port. Returns the port too.
fn scheduled_fleet(dir: &Path, every: u32, users: usize) -> (Fleet, PathBuf, u16) {
    let (mut fleet, _) = fleet(dir);
    fleet.zone_mut("ch").schedule =
        format!("backup = \"*/{every} * * * * *\"\ntimezone = \"Europe/Zurich\"");
    fleet.zone_mut("ch").retention = "keep_last = 2".into();
    let port = free_port();
    fleet.core_extra.insert(
        "core-ch-1".into(),
        format!("metrics_listen = \"127.0.0.1:{port}\""),
    );
    let core = fleet.write_configs().unwrap();
    if users > 0 {
        fleet
            .users_fixture("core-ch-1", &Spec::new(users, 20_000))
            .unwrap();
    }
    (fleet, core, port)
}

/// The daemon, its log in `dir/daemon.log`.
fn start_daemon(core: &Path, dir: &Path, extra: &[&str]) -> Child {
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    process(core)
        .arg("daemon")
        .args(extra)
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn daemon_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
}

/// GET `path` on the daemon: (status, body); None while it does not answer.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// One sample of `/metrics` (name with labels, as printed); 0 when absent.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Waits up to `secs` for `check` to return Some.
fn wait_for<T>(secs: u64, what: &str, dir: &Path, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; daemon log:\n{}",
            daemon_log(dir)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn metrics_when(port: u16, dir: &Path, what: &str, ok: impl Fn(&str) -> bool) -> String {
    wait_for(60, what, dir, || {
        get(port, "/metrics")
            .map(|(_, body)| body)
            .filter(|body| ok(body))
    })
}

fn sigterm(child: &Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

fn indexes(fleet: &Fleet, region: &str) -> usize {
    fleet
        .garage(region)
        .keys()
        .unwrap()
        .iter()
        .filter(|k| k.contains("/snapshots/") && k.ends_with(".json"))
        .count()
}

fn exits_within(child: &mut Child, secs: u64) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not exit within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn scheduled_runs_commit_snapshots_and_metrics_match() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, port) = scheduled_fleet(dir.path(), 2, 0);
    let mut daemon = start_daemon(&core, dir.path(), &[]);
    // the catch-up run at start, then scheduled ones
    let metrics = metrics_when(port, dir.path(), "three runs", |m| {
        sample(m, "zonevault_runs_total") >= 3.0
    });
    let runs = sample(&metrics, "zonevault_runs_total");
    let uploaded = sample(&metrics, "zonevault_units_total{result=\"uploaded\"}");
    let reused = sample(&metrics, "zonevault_units_total{result=\"reused\"}");
    // the sample volumes: 2 users + shared + etc; unchanged after the first run
    assert_eq!(uploaded, 4.0, "{metrics}");
    assert_eq!(uploaded + reused, 4.0 * runs, "{metrics}");
    assert_eq!(
        sample(&metrics, "zonevault_failures_total{reason=\"other\"}"),
        0.0
    );
    assert_eq!(
        sample(&metrics, "zonevault_snapshots_kept"),
        2.0,
        "{metrics}"
    );
    let now = chrono::Utc::now().timestamp() as f64;
    for target in ["ch-primary", "ch-secondary"] {
        let last = sample(
            &metrics,
            &format!("zonevault_last_success_timestamp_seconds{{target=\"{target}\"}}"),
        );
        assert!((now - last).abs() < 10.0, "{target}: {last} vs {now}");
    }
    assert!(sample(&metrics, "zonevault_next_run_timestamp_seconds") >= now - 1.0);
    assert!(sample(&metrics, "zonevault_bytes_total{kind=\"plain\"}") > 0.0);
    assert_eq!(sample(&metrics, "zonevault_healthy"), 1.0);
    let (status, body) = get(port, "/healthz").unwrap();
    assert_eq!(status, 200, "{body}");
    // retention ran: two snapshots on each target
    assert_eq!(indexes(&fleet, "ch-gva-2"), 2);
    assert_eq!(indexes(&fleet, "ch-dk-2"), 2);
    assert_eq!(get(port, "/nope").unwrap().0, 404);

    sigterm(&daemon);
    assert!(exits_within(&mut daemon, 30).success());
    run(zv(&core).args(["audit", "verify"]), 0);
    assert!(daemon_log(dir.path()).contains("daemon stopped"));
}

#[test]
fn an_outage_is_counted_and_the_daemon_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (mut fleet, core, port) = scheduled_fleet(dir.path(), 2, 0);
    let mut daemon = start_daemon(&core, dir.path(), &[]);
    metrics_when(port, dir.path(), "a first run", |m| {
        sample(m, "zonevault_healthy") == 1.0
    });
    fleet.garage_mut("ch-dk-2").stop();
    let metrics = metrics_when(port, dir.path(), "a failed run", |m| {
        sample(m, "zonevault_failures_total{reason=\"unavailable\"}") >= 1.0
    });
    assert_eq!(sample(&metrics, "zonevault_healthy"), 0.0);
    let (status, body) = get(port, "/healthz").unwrap();
    assert_eq!(status, 503, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["reason"], "the last run failed");
    assert!(
        health["last_error"]
            .as_str()
            .unwrap()
            .contains("ch-secondary"),
        "{health}"
    );
    assert!(daemon.try_wait().unwrap().is_none(), "the daemon stays up");

    fleet.garage_mut("ch-dk-2").restart().unwrap();
    wait_for(60, "a healthy run after the outage", dir.path(), || {
        get(port, "/healthz").filter(|(s, _)| *s == 200)
    });
    let metrics = get(port, "/metrics").unwrap().1;
    assert!(sample(&metrics, "zonevault_failures_total{reason=\"unavailable\"}") >= 1.0);
    sigterm(&daemon);
    assert!(exits_within(&mut daemon, 30).success());
}

#[test]
fn sigterm_during_an_upload_leaves_no_partial_snapshot_and_the_next_start_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    // a daily schedule: only the catch-up run happens
    let (mut fleet, _, port) = scheduled_fleet(dir.path(), 2, 0);
    fleet.zone_mut("ch").schedule = "backup = \"0 30 2 * * *\"".into();
    let core = fleet.write_configs().unwrap();
    // one object per unit: writes show from the first units on
    common::one_object_per_unit(&core);
    fleet
        .users_fixture("core-ch-1", &Spec::new(300, 60_000))
        .unwrap();
    let mut daemon = start_daemon(&core, dir.path(), &["--stop-timeout", "1s"]);
    // stop it once unit objects are being written
    wait_for(60, "uploads", dir.path(), || {
        let n = fleet
            .garage("ch-gva-2")
            .keys()
            .unwrap()
            .iter()
            .filter(|k| k.contains("/objects/"))
            .count();
        (n >= 5).then_some(())
    });
    let stopped = Instant::now();
    sigterm(&daemon);
    let status = exits_within(&mut daemon, 20);
    assert!(status.success(), "{status}");
    assert!(stopped.elapsed() < Duration::from_secs(10));
    assert_eq!(
        indexes(&fleet, "ch-gva-2"),
        0,
        "no snapshot from a stopped run"
    );
    assert_eq!(indexes(&fleet, "ch-dk-2"), 0);
    assert!(
        daemon_log(dir.path()).contains("stopped before its commit"),
        "{}",
        daemon_log(dir.path())
    );
    for region in ["ch-gva-2", "ch-dk-2"] {
        assert_eq!(
            fleet.garage(region).pending_uploads().unwrap(),
            0,
            "{region}: uploads in flight are aborted"
        );
    }

    // the next start runs at once: the 02:30 run was missed
    let mut daemon = start_daemon(&core, dir.path(), &[]);
    metrics_when(port, dir.path(), "the catch-up run", |m| {
        sample(m, "zonevault_runs_total") >= 1.0
    });
    assert_eq!(indexes(&fleet, "ch-gva-2"), 1);
    let (status, _) = get(port, "/healthz").unwrap();
    assert_eq!(status, 200);
    sigterm(&daemon);
    assert!(exits_within(&mut daemon, 60).success());
    run(zv(&core).args(["audit", "verify"]), 0);
}

#[test]
fn sighup_with_a_broken_config_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let (_fleet, core, port) = scheduled_fleet(dir.path(), 2, 0);
    let mut daemon = start_daemon(&core, dir.path(), &[]);
    metrics_when(port, dir.path(), "a first run", |m| {
        sample(m, "zonevault_runs_total") >= 1.0
    });
    let good = std::fs::read_to_string(&core).unwrap();
    std::fs::write(&core, good.replace("core_id", "core_idd")).unwrap();
    unsafe { libc::kill(daemon.id() as i32, libc::SIGHUP) };
    wait_for(30, "the refused reload in the log", dir.path(), || {
        daemon_log(dir.path())
            .contains("configuration not reloaded")
            .then_some(())
    });
    // still running, still backing up on the old config; the refusal is counted
    let metrics = get(port, "/metrics").unwrap().1;
    assert_eq!(
        sample(&metrics, "zonevault_config_reload_failures_total"),
        1.0
    );
    assert_eq!(
        sample(&metrics, "zonevault_failures_total{reason=\"config\"}"),
        1.0
    );
    let runs = sample(&metrics, "zonevault_runs_total");
    metrics_when(port, dir.path(), "more runs", |m| {
        sample(m, "zonevault_runs_total") >= runs + 2.0
    });
    assert!(daemon.try_wait().unwrap().is_none());
    std::fs::write(&core, &good).unwrap();
    let (stdout, _) = run(
        zv(&core).args(["audit", "show", "--event", "config_rejected", "--json"]),
        0,
    );
    let rejected: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(rejected.as_array().unwrap().len(), 1);
    assert!(
        rejected[0]["reason"].as_str().unwrap().contains("core_idd"),
        "{rejected}"
    );
    // a good reload is recorded as such
    unsafe { libc::kill(daemon.id() as i32, libc::SIGHUP) };
    wait_for(30, "the reload in the log", dir.path(), || {
        daemon_log(dir.path())
            .contains("configuration reloaded")
            .then_some(())
    });
    sigterm(&daemon);
    assert!(exits_within(&mut daemon, 30).success());
}

#[test]
fn busy_runs_and_daemon_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (_fleet, core, _) = scheduled_fleet(dir.path(), 2, 0);
    // a held run lock: --no-wait fails at once as busy
    let lock = zonevault::lock::RunLock::acquire(&dir.path().join("state/core-ch-1")).unwrap();
    let (_, e) = run(zv(&core).args(["backup", "--no-wait"]), 1);
    assert!(
        e.contains("busy: another zonevault run of this core"),
        "{e}"
    );
    let (_, e) = run(zv(&core).args(["forget", "--no-wait"]), 1);
    assert!(e.contains("busy"), "{e}");
    drop(lock);
    let (_, e) = run(zv(&core).args(["daemon", "--stop-timeout", "soon"]), 2);
    assert!(e.contains("--stop-timeout"), "{e}");
    // the metrics port taken: a startup error
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let text = std::fs::read_to_string(&core).unwrap();
    let port = text
        .lines()
        .find_map(|l| l.strip_prefix("metrics_listen = \"127.0.0.1:"))
        .unwrap()
        .trim_end_matches('"')
        .to_string();
    std::fs::write(
        &core,
        text.replace(&port, &taken.local_addr().unwrap().port().to_string()),
    )
    .unwrap();
    let (_, e) = run(zv(&core).arg("daemon"), 1);
    assert!(e.contains("cannot listen on metrics_listen"), "{e}");
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/zonevault.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    for line in [
        "Type=notify",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectHome=read-only",
        "WatchdogSec=",
        "ReadWritePaths=/var/lib/zonevault",
        "RestrictAddressFamilies=",
    ] {
        assert!(text.contains(line), "the unit lacks {line}");
    }
    // systemd-analyze checks the unit, with ExecStart pointing at the built binary
    let dir = tempfile::tempdir().unwrap();
    let bin = assert_cmd::cargo::cargo_bin("zonevault");
    let copy = dir.path().join("zonevault.service");
    std::fs::write(
        &copy,
        text.replace("/usr/local/bin/zonevault", bin.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze not found: run scripts/install-deps");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("zonevault.service"), "{stderr}");
}

#[test]
fn systemd_hears_ready_and_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let (_fleet, core, port) = scheduled_fleet(dir.path(), 2, 0);
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
    let mut daemon = process(&core)
        .arg("daemon")
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut heard = Vec::new();
    let mut buf = [0u8; 256];
    while !(heard.iter().any(|m: &String| m.contains("READY=1"))
        && heard.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2)
    {
        let n = socket.recv(&mut buf).unwrap_or_else(|e| {
            panic!(
                "heard {heard:?}, then {e}; log:\n{}",
                daemon_log(dir.path())
            )
        });
        heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    // READY comes once the metrics endpoint answers
    assert!(get(port, "/metrics").is_some());
    sigterm(&daemon);
    assert!(exits_within(&mut daemon, 30).success());
    let mut rest = String::new();
    while let Ok(n) = socket.recv(&mut buf) {
        rest.push_str(&String::from_utf8_lossy(&buf[..n]));
        if rest.contains("STOPPING=1") {
            break;
        }
    }
    assert!(rest.contains("STOPPING=1"), "{rest}");
}

#[test]
fn a_daemon_waiting_for_a_manual_run_stops_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, port) = scheduled_fleet(dir.path(), 2, 0);
    // a manual run holds the lock: the daemon's catch-up run waits for it
    let lock = zonevault::lock::RunLock::acquire(&dir.path().join("state/core-ch-1")).unwrap();
    let mut daemon = start_daemon(&core, dir.path(), &["--stop-timeout", "1s"]);
    wait_for(30, "the daemon waiting for the lock", dir.path(), || {
        daemon_log(dir.path())
            .contains("another zonevault run holds the lock")
            .then_some(())
    });
    assert!(get(port, "/healthz").is_some());
    let stopped = Instant::now();
    sigterm(&daemon);
    assert!(exits_within(&mut daemon, 15).success());
    assert!(
        stopped.elapsed() < Duration::from_secs(8),
        "{:?}",
        stopped.elapsed()
    );
    assert_eq!(indexes(&fleet, "ch-gva-2"), 0);
    drop(lock);
    // the manual and the scheduled runs never overlap: with the lock free,
    // a daemon and a manual backup both commit, one after the other
    let mut daemon = start_daemon(&core, dir.path(), &[]);
    run(zv(&core).args(["backup", "--json"]), 0);
    metrics_when(port, dir.path(), "a daemon run", |m| {
        sample(m, "zonevault_runs_total") >= 1.0
    });
    sigterm(&daemon);
    assert!(exits_within(&mut daemon, 30).success());
    run(zv(&core).args(["audit", "verify"]), 0);
}

#[test]
fn one_daemon_per_core_and_the_endpoint_answers_as_monitors_expect() {
    let dir = tempfile::tempdir().unwrap();
    let (mut fleet, core, port) = scheduled_fleet(dir.path(), 2, 0);
    // no [schedule]: the daemon runs nothing, and says so on /healthz
    fleet.zone_mut("ch").schedule = String::new();
    fleet.write_configs().unwrap();
    // stderr to a pipe whose reader is gone: logging must not stop the daemon
    let mut daemon = process(&core)
        .arg("daemon")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(daemon.stderr.take());
    let (status, body) = wait_for(30, "the endpoint", dir.path(), || get(port, "/healthz"));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no [schedule]"), "{body}");
    // a second daemon for the same core is refused
    let (_, e) = run(zv(&core).arg("daemon"), 1);
    assert!(
        e.contains("another zonevault daemon runs for this core"),
        "{e}"
    );
    // HEAD works like GET; other methods are refused with Allow
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("\r\n\r\n"), "no body: {response}");
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
    assert!(
        response.to_lowercase().contains("allow: get, head"),
        "{response}"
    );
    sigterm(&daemon);
    assert!(exits_within(&mut daemon, 30).success());
}

#[test]
fn idle_connections_cannot_hold_the_metrics_endpoint_down() {
    let dir = tempfile::tempdir().unwrap();
    let (mut fleet, core, port) = scheduled_fleet(dir.path(), 2, 0);
    // no schedule: the daemon only serves
    fleet.zone_mut("ch").schedule = String::new();
    fleet.write_configs().unwrap();
    let mut daemon = start_daemon(&core, dir.path(), &[]);
    wait_for(30, "the endpoint", dir.path(), || get(port, "/healthz"));
    // many idle sockets, from the same address as the scraper: some that
    // say nothing, some that never finish their headers (slowloris)
    let mut idle = Vec::new();
    for i in 0..300 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        if i % 2 == 0 {
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
        }
        idle.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        let asked = Instant::now();
        let (status, body) = get(port, "/metrics").expect("a scrape is answered");
        assert_eq!(status, 200);
        assert!(body.contains("zonevault_healthy"), "{body}");
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "the scrape took {:?}",
            asked.elapsed()
        );
        // and more idle sockets in between
        for _ in 0..50 {
            idle.push(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
        }
    }
    drop(idle);
    sigterm(&daemon);
    assert!(exits_within(&mut daemon, 30).success());
}
