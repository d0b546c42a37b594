//! Reading a volume while a hostile local user races the walk: entries
//! swapped (renameat2 RENAME_EXCHANGE, in a loop) with links to secrets or to
//! another user's directory, or with a FIFO; trees deeper than PATH_MAX;
//! hard links out of a unit; misplaced user directories. Against two Garage
//! zones, reading the units back from the bucket.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Fleet, fleet, process, run, tool, zv};
use serde_json::Value;
use zonevault_testkit::fixture::{self, Spec};

/// A backup that must end within `limit`: a run that hangs (an open that
/// blocks on a FIFO) is killed and fails the test. Returns the exit code,
/// the report (when it printed one) and stderr.
fn backup_within(core: &Path, args: &[&str], limit: Duration) -> (i32, Value, String) {
    let mut child = process(core)
        .arg("backup")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).map(|_| s)
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).map(|_| s)
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            let stderr = err.join().unwrap().unwrap_or_default();
            panic!(
                "backup {args:?} did not finish within {limit:?}: it hung (killed)\nstderr:\n{stderr}"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.join().unwrap().unwrap();
    let stderr = err.join().unwrap().unwrap();
    let report = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (status.code().unwrap_or(-1), report, stderr)
}

/// The strings of a list in a report (none when the field is missing).
fn list(report: &Value, field: &str) -> Vec<String> {
    report[field]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// Exchanges two names of one directory in a loop (renameat2
/// RENAME_EXCHANGE) until dropped, counting the swaps.
struct Racer {
    stop: Arc<AtomicBool>,
    swaps: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Racer {
    fn start(dir: &Path, a: &'static str, b: &'static str) -> Racer {
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = Arc::new(AtomicU64::new(0));
        let fd = rustix::fs::open(
            dir,
            rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let thread = {
            let (stop, swaps) = (stop.clone(), swaps.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    rustix::fs::renameat_with(&fd, a, &fd, b, rustix::fs::RenameFlags::EXCHANGE)
                        .expect("renameat2(RENAME_EXCHANGE)");
                    swaps.fetch_add(1, Ordering::Relaxed);
                    if swaps.load(Ordering::Relaxed) % 64 == 0 {
                        std::thread::yield_now();
                    }
                }
            })
        };
        Racer {
            stop,
            swaps,
            thread: Some(thread),
        }
    }
}

impl Drop for Racer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A unit as stored on ch-gva-2: its user (None for the shared unit) and
/// its plain tar.
struct Stored {
    user: Option<String>,
    /// The object as stored: age(zstd(tar)).
    sealed: Vec<u8>,
    /// The key object of its data key.
    data_key: Option<String>,
    tar: Vec<u8>,
}

/// Opens `sealed` with the data key in key object `data_key` (unwrapped
/// with the zone identity), or with the zone identity when it names none.
fn decrypt(fleet: &Fleet, sealed: &[u8], data_key: Option<&str>) -> Vec<u8> {
    let mut identities = zonevault::keys::load_identities(&fleet.identity("ch")).unwrap();
    if let Some(k) = data_key {
        let wrapped = fleet
            .garage("ch-gva-2")
            .get(&format!("zonevault/{k}"))
            .unwrap();
        let key = zonevault::datakeys::unwrap(&wrapped, &identities).unwrap();
        identities = vec![Box::new(key)];
    }
    let decryptor = age::Decryptor::new(sealed).unwrap();
    let mut plain = Vec::new();
    decryptor
        .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
        .unwrap()
        .read_to_end(&mut plain)
        .unwrap();
    plain
}

/// Every unit object of every snapshot on ch-gva-2 not in `seen` (which it
/// extends), decrypted and decompressed with the age and zstd libraries.
fn new_units(fleet: &Fleet, seen: &mut HashSet<String>) -> Vec<Stored> {
    let gva = fleet.garage("ch-gva-2");
    let mut objects: BTreeMap<(String, u64), (Value, Option<String>)> = BTreeMap::new();
    for key in gva.keys().unwrap() {
        if !(key.contains("/snapshots/") && key.ends_with(".json")) {
            continue;
        }
        let index: Value = serde_json::from_slice(&gva.get(&key).unwrap()).unwrap();
        let sealed = gva
            .get(&format!(
                "zonevault/{}",
                index["manifest"]["key"].as_str().unwrap()
            ))
            .unwrap();
        let manifest: Value = serde_json::from_slice(&decrypt(
            fleet,
            &sealed,
            index["manifest"]["data_key"].as_str(),
        ))
        .expect("a manifest");
        for u in manifest["units"].as_array().unwrap() {
            let object = format!("zonevault/{}", u["object"].as_str().unwrap());
            // a unit is its object, or its range of a pack
            let at = (object, u["offset"].as_u64().unwrap_or(0));
            objects.insert(at, (u.clone(), u["user"].as_str().map(String::from)));
        }
    }
    objects
        .into_iter()
        .filter(|((object, offset), _)| seen.insert(format!("{object}@{offset}")))
        .map(|((object, _), (unit, user))| {
            let sealed = common::unit_bytes(&gva.get(&object).unwrap(), &unit);
            let tar =
                zstd::decode_all(&decrypt(fleet, &sealed, unit["data_key"].as_str())[..]).unwrap();
            let data_key = unit["data_key"].as_str().map(String::from);
            Stored {
                user,
                sealed,
                data_key,
                tar,
            }
        })
        .collect()
}

fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The entry paths of a tar.
fn entries(tar: &[u8]) -> Vec<PathBuf> {
    tar::Archive::new(tar)
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().into_owned())
        .collect()
}

/// Runs backups of the users volume while a racer exchanges `names` in
/// `dir`, until a unit breaks `foreign` (which fails at once), or 600 rounds
/// or 300 s pass, or 3 rounds caught a swap (a swap lands between the walk's
/// look and its open in 2-20% of the runs here, depending on the load: 3 are
/// caught in 15-160 rounds, 5-120 s). Every run must exit 0
/// within 60 s. The swap must have been caught at least once, and only the
/// swapped names are reported: else the test proved nothing.
fn race(
    fleet: &Fleet,
    core: &Path,
    dir: &Path,
    names: (&'static str, &'static str),
    foreign: &dyn Fn(&Stored) -> Option<String>,
) {
    // One race at a time: a racer spins on a core, and racers competing for
    // the cores (with the backups) catch far fewer swaps.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let racer = Racer::start(dir, names.0, names.1);
    let started = Instant::now();
    let mut seen = HashSet::new();
    let (mut changed, mut rounds, mut rounds_detected) = (Vec::new(), 0, 0);
    while rounds < 600 && rounds_detected < 3 && started.elapsed() < Duration::from_secs(300) {
        rounds += 1;
        let (code, report, stderr) = backup_within(
            core,
            &["--volume", "users", "--json"],
            Duration::from_secs(60),
        );
        assert_eq!(code, 0, "round {rounds}: {report}\nstderr:\n{stderr}");
        let found = list(&report, "changed_during_walk");
        if !found.is_empty() {
            rounds_detected += 1;
            assert!(
                stderr.contains("changed during the walk; skipped, not followed"),
                "round {rounds}: no warning for {found:?}:\n{stderr}"
            );
        }
        changed.extend(found);
        for unit in new_units(fleet, &mut seen) {
            if let Some(what) = foreign(&unit) {
                panic!(
                    "round {rounds} (after {} swaps): the unit of {:?} holds {what}",
                    racer.swaps.load(Ordering::Relaxed),
                    unit.user
                );
            }
        }
    }
    let swaps = racer.swaps.load(Ordering::Relaxed);
    drop(racer);
    eprintln!(
        "{rounds} backups, {swaps} swaps, {} entries caught changing in {rounds_detected} backups",
        changed.len()
    );
    assert!(
        !changed.is_empty(),
        "no swap was caught in {rounds} backups ({swaps} swaps): the race did not happen, the test proves nothing"
    );
    let swapped = [format!("/{}", names.0), format!("/{}", names.1)];
    assert!(
        changed
            .iter()
            .all(|p| swapped.iter().any(|s| p.ends_with(s))),
        "{changed:?}"
    );
}

/// A fleet whose users volume has `users` small users; returns the volume root.
fn setup(dir: &Path, users: usize) -> (Fleet, PathBuf, Vec<String>, PathBuf) {
    let (fleet, core) = fleet(dir);
    let ids = fleet
        .users_fixture("core-ch-1", &Spec::new(users, 4_000))
        .unwrap();
    let volume = fleet.volumes_dir("core-ch-1").join("users");
    (fleet, core, ids, volume)
}

fn random_marker(what: &str) -> String {
    format!("zv-{what}-{:032x}", rand::random::<u128>())
}

#[test]
fn a_file_swapped_with_a_link_to_a_secret_never_brings_the_secret_in() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, ids, volume) = setup(dir.path(), 2);
    let marker = random_marker("secret");
    let secret = dir.path().join("outside/shadow");
    std::fs::create_dir_all(secret.parent().unwrap()).unwrap();
    std::fs::write(&secret, marker.repeat(100)).unwrap();
    let attacker = volume.join(fixture::user_dir(&ids[0]));
    // as long as the secret, so that a read through the link takes it all
    std::fs::write(attacker.join("bait"), vec![b'b'; 8192]).unwrap();
    std::os::unix::fs::symlink(&secret, attacker.join("bait.link")).unwrap();

    race(&fleet, &core, &attacker, ("bait", "bait.link"), &|unit| {
        holds(&unit.tar, marker.as_bytes()).then(|| "the secret's bytes".to_string())
    });
}

#[test]
fn a_directory_swapped_with_a_link_to_another_user_never_brings_that_user_in() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, ids, volume) = setup(dir.path(), 3);
    let marker = random_marker("victim");
    let attacker = volume.join(fixture::user_dir(&ids[0]));
    let victim = volume.join(fixture::user_dir(&ids[1]));
    for i in 0..20 {
        std::fs::write(victim.join(format!("private-{i}")), &marker).unwrap();
    }
    std::fs::create_dir(attacker.join("inbox")).unwrap();
    std::fs::write(attacker.join("inbox/note"), b"the attacker's own note").unwrap();
    std::os::unix::fs::symlink(&victim, attacker.join("inbox.link")).unwrap();

    race(&fleet, &core, &attacker, ("inbox", "inbox.link"), &|unit| {
        let Some(user) = &unit.user else {
            return holds(&unit.tar, marker.as_bytes()).then(|| "the victim's bytes".into());
        };
        // a user unit holds its own user's directory only
        let own = fixture::user_dir(user);
        if let Some(p) = entries(&unit.tar).iter().find(|p| !p.starts_with(&own)) {
            return Some(format!("{}, outside its directory", p.display()));
        }
        if *user == ids[1] {
            return None;
        }
        if holds(&unit.tar, marker.as_bytes()) {
            return Some("the victim's bytes".into());
        }
        entries(&unit.tar)
            .into_iter()
            .find(|p| p.to_string_lossy().contains("private-"))
            .map(|p| format!("the victim's entry {}", p.display()))
    });
}

#[test]
fn a_file_swapped_with_a_fifo_never_hangs_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, ids, volume) = setup(dir.path(), 2);
    let attacker = volume.join(fixture::user_dir(&ids[0]));
    std::fs::write(attacker.join("data"), b"ordinary bytes").unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        attacker.join("data.fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();

    race(&fleet, &core, &attacker, ("data", "data.fifo"), &|_| None);
}

#[test]
fn a_tree_deeper_than_path_max_is_backed_up_and_restored() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, ids, volume) = setup(dir.path(), 2);
    // 25 levels of 200-byte names: ~5 KB, past PATH_MAX (4096); made
    // relative to descriptors, as no path can name the bottom
    let name = "d".repeat(200);
    let user_dir = fixture::user_dir(&ids[1]);
    let mut fd = rustix::fs::open(
        volume.join(&user_dir),
        rustix::fs::OFlags::DIRECTORY,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    for _ in 0..25 {
        rustix::fs::mkdirat(&fd, name.as_str(), rustix::fs::Mode::from_raw_mode(0o755)).unwrap();
        fd = rustix::fs::openat(
            &fd,
            name.as_str(),
            rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
    }
    let file = rustix::fs::openat(
        &fd,
        "bottom.txt",
        rustix::fs::OFlags::CREATE | rustix::fs::OFlags::WRONLY,
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .unwrap();
    rustix::io::write(&file, b"the bottom of the tree\n").unwrap();

    let (stdout, _) = run(zv(&core).args(["backup", "--json"]), 0);
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["units"], 4, "{report}"); // 2 users, shared, etc

    // the unit, read with the reference tools: age -d -i KEY | zstd -d | tar -t
    let unit = new_units(&fleet, &mut HashSet::new())
        .into_iter()
        .find(|u| u.user.as_deref() == Some(ids[1].as_str()))
        .expect("the unit of the user");
    let tar = tool(
        "zstd",
        &["-d"],
        &common::open_by_hand(&fleet, unit.data_key.as_deref(), &unit.sealed),
    );
    let listing = String::from_utf8(tool("tar", &["-t"], &tar)).unwrap();
    let mut deep = user_dir.clone();
    for _ in 0..25 {
        deep.push(&name);
    }
    deep.push("bottom.txt");
    let deep = deep.to_str().unwrap();
    assert!(
        listing.lines().any(|l| l == deep),
        "tar -t does not list the deep file; it lists {} entries",
        listing.lines().count()
    );
    let content = tool("tar", &["-x", "-O", deep], &tar);
    assert_eq!(content, b"the bottom of the tree\n");

    // and zonevault restores it, through descriptors (no path can name it)
    let to = dir.path().join("restored");
    run(
        zv(&core)
            .args([
                "restore",
                "--snapshot",
                "latest",
                "--user",
                &ids[1],
                "--identity",
            ])
            .arg(fleet.identity("ch"))
            .arg("--to")
            .arg(&to),
        0,
    );
    let mut fd = rustix::fs::open(
        to.join("users").join(&user_dir),
        rustix::fs::OFlags::DIRECTORY,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    for _ in 0..25 {
        fd = rustix::fs::openat(
            &fd,
            name.as_str(),
            rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
    }
    let file = rustix::fs::openat(
        &fd,
        "bottom.txt",
        rustix::fs::OFlags::RDONLY,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    let mut restored = String::new();
    std::io::Read::read_to_string(&mut std::fs::File::from(file), &mut restored).unwrap();
    assert_eq!(restored, "the bottom of the tree\n");
}

#[test]
fn hard_links_out_of_a_unit_and_misplaced_user_dirs_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, ids, volume) = setup(dir.path(), 2);
    let a = volume.join(fixture::user_dir(&ids[0]));
    let b = volume.join(fixture::user_dir(&ids[1]));
    std::fs::write(b.join("original"), b"lives in two units").unwrap();
    std::fs::hard_link(b.join("original"), a.join("linked-in")).unwrap();
    let misplaced = volume.join("x/y/z/abc123");
    std::fs::create_dir_all(&misplaced).unwrap();
    std::fs::write(misplaced.join("note.txt"), b"whose is this?").unwrap();

    // what an operator reads
    let (stdout, stderr) = run(zv(&core).args(["backup", "--volume", "users"]), 0);
    for linked in [a.join("linked-in"), b.join("original")] {
        assert!(
            stdout.contains(&format!(
                "hard-linked from outside its unit (stored; the same file may live elsewhere): {}\n",
                linked.display()
            )),
            "{stdout}"
        );
        assert!(
            stderr
                .lines()
                .any(|l| l.contains("hard links outside this unit")
                    && l.contains(&linked.display().to_string())),
            "{stderr}"
        );
    }
    assert!(
        stdout.contains(&format!(
            "misplaced user directory (backed up in the shared unit): {}\n",
            misplaced.display()
        )),
        "{stdout}"
    );
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("looks like a user directory"))
        .collect();
    assert!(
        warnings.len() == 1 && warnings[0].contains(&misplaced.display().to_string()),
        "one warning naming {}: {stderr}",
        misplaced.display()
    );

    // the same in --json (a full run: the units are stored again)
    let (stdout, _) = run(
        zv(&core).args(["backup", "--volume", "users", "--full", "--json"]),
        0,
    );
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let mut links = list(&report, "hard_links");
    links.sort();
    let mut want = vec![
        a.join("linked-in").display().to_string(),
        b.join("original").display().to_string(),
    ];
    want.sort();
    // the fixture's own hard link (events.jsonl.bak, inside one unit) is not reported
    assert_eq!(links, want, "{report}");
    assert_eq!(
        list(&report, "misplaced"),
        [misplaced.display().to_string()]
    );
    assert_eq!(report["units"], 3, "{report}"); // 2 users and shared: no user abc123

    // it lies in the shared unit
    let units = new_units(&fleet, &mut HashSet::new());
    let shared: Vec<&Stored> = units.iter().filter(|u| u.user.is_none()).collect();
    assert!(
        shared
            .iter()
            .all(|u| entries(&u.tar).contains(&PathBuf::from("x/y/z/abc123/note.txt"))),
        "the shared unit lacks x/y/z/abc123/note.txt"
    );
}
