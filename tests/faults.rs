//! Transient faults inside a run: a target that answers 503 or drops
//! connections now and then is retried with backoff, and the run succeeds.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{fleet, run, zv};

/// A TCP proxy to `upstream` that answers every `every`-th connection with
/// a 503 or a reset instead of forwarding it. Returns its port and the
/// number of faults served so far.
fn flaky_proxy(upstream: String, every: usize) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let faults = Arc::new(AtomicUsize::new(0));
    let served = Arc::clone(&faults);
    std::thread::spawn(move || {
        for (n, client) in listener.incoming().enumerate() {
            let Ok(mut client) = client else { continue };
            if n % every == 0 {
                served.fetch_add(1, Ordering::SeqCst);
                // read the request head, then fail it
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && client.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                if n % (2 * every) == 0 {
                    let _ = client.write_all(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                }
                // else: dropped without an answer (a reset connection)
                continue;
            }
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
                let _ = s2.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let (mut client, mut server) = (client, server);
                let _ = std::io::copy(&mut server, &mut client);
                let _ = client.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (port, faults)
}

#[test]
fn a_flaky_target_is_retried_and_the_run_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let (mut fleet, _) = fleet(dir.path());
    fleet
        .users_fixture(
            "core-ch-1",
            &zonevault_testkit::fixture::Spec::new(40, 4_000),
        )
        .unwrap();
    let upstream = fleet
        .garage("ch-dk-2")
        .endpoint
        .trim_start_matches("http://")
        .to_string();
    let (port, faults) = flaky_proxy(upstream, 3);
    fleet.zone_mut("ch").targets[1].endpoint = format!("http://127.0.0.1:{port}");
    let core = fleet.write_configs().unwrap();

    let (stdout, stderr) = run(zv(&core).args(["backup", "--json"]), 0);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["units"], 42, "{stderr}");
    assert!(
        faults.load(Ordering::SeqCst) >= 2,
        "the proxy failed only {} requests",
        faults.load(Ordering::SeqCst)
    );
    // every object reached the flaky target too
    let on_dk: std::collections::BTreeSet<String> = fleet
        .garage("ch-dk-2")
        .keys()
        .unwrap()
        .into_iter()
        .filter(|k| k.contains("/objects/"))
        .collect();
    assert!(!on_dk.is_empty());
    assert_eq!(on_dk, common::indexed_objects(&fleet, "ch-gva-2"));
    run(
        zv(&core)
            .args(["restore", "--snapshot", "latest", "--json", "--identity"])
            .arg(fleet.identity("ch"))
            .arg("--to")
            .arg(dir.path().join("restored")),
        0,
    );
}
