//! Consistent SQLite: live WAL databases captured through SQLite's online
//! backup, against Garage (issue 10, part 1).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use common::{fleet, output_text, restore, run, tool, zv};
use rusqlite::{Connection, OpenFlags};

const DBS: usize = 40;
const ROWS: i64 = 200;
const TOTAL: i64 = ROWS * 100;

/// The test binary in writer mode: `ZV_SQLITE_WRITER=DIR` loops
/// transactions over every `db*.sqlite` in DIR until killed.
#[test]
fn writer_mode() {
    let Ok(dir) = std::env::var("ZV_SQLITE_WRITER") else {
        return;
    };
    let dbs: Vec<Connection> = (0..DBS)
        .map(|i| {
            let c = Connection::open(Path::new(&dir).join(format!("db{i}.sqlite"))).unwrap();
            c.busy_timeout(Duration::from_secs(10)).unwrap();
            c.execute_batch("PRAGMA wal_autocheckpoint = 10;").unwrap();
            c
        })
        .collect();
    let mut n: i64 = 0;
    loop {
        for (i, c) in dbs.iter().enumerate() {
            n += 1;
            let (a, b) = ((n * 7 + i as i64) % ROWS, (n * 13 + 5) % ROWS);
            c.execute_batch(&format!(
                "BEGIN IMMEDIATE;
                 UPDATE acct SET bal = bal - 3, pad = randomblob(300) WHERE id = {a};
                 UPDATE acct SET bal = bal + 3, pad = randomblob(300) WHERE id = {b};
                 UPDATE counter SET n = n + 1;
                 COMMIT;"
            ))
            .unwrap();
            if n % 97 == 0 {
                let _ = c.execute_batch("PRAGMA wal_checkpoint(PASSIVE);");
            }
        }
    }
}

fn create_dbs(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..DBS {
        let c = Connection::open(dir.join(format!("db{i}.sqlite"))).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE acct(id INTEGER PRIMARY KEY, bal INTEGER, pad BLOB);
             CREATE TABLE counter(n INTEGER);
             INSERT INTO counter VALUES (0);",
        )
        .unwrap();
        for r in 0..ROWS {
            c.execute("INSERT INTO acct VALUES (?1, 100, randomblob(300))", [r])
                .unwrap();
        }
    }
}

fn start_writer(dir: &Path) -> Child {
    Process::new(std::env::current_exe().unwrap())
        .args(["--exact", "writer_mode", "--nocapture"])
        .env("ZV_SQLITE_WRITER", dir)
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn counters(dir: &Path) -> Vec<i64> {
    (0..DBS)
        .map(|i| {
            let c = Connection::open_with_flags(
                dir.join(format!("db{i}.sqlite")),
                OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .unwrap();
            c.busy_timeout(Duration::from_secs(10)).unwrap();
            c.query_row("SELECT n FROM counter", [], |r| r.get(0))
                .unwrap()
        })
        .collect()
}

/// What is wrong with a restored database: `None` when it opens without a
/// `-wal`, passes integrity_check, keeps the invariant and holds `min` txns.
fn damage(db: &Path, min: i64) -> Option<String> {
    let c = match Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY) {
        Ok(c) => c,
        Err(e) => return Some(format!("open: {e}")),
    };
    let check: String = match c.query_row("PRAGMA integrity_check", [], |r| r.get(0)) {
        Ok(s) => s,
        Err(e) => return Some(format!("integrity_check: {e}")),
    };
    if check != "ok" {
        return Some(format!("integrity_check: {check}"));
    }
    let sum: i64 = match c.query_row("SELECT sum(bal) FROM acct", [], |r| r.get(0)) {
        Ok(s) => s,
        Err(e) => return Some(format!("sum: {e}")),
    };
    if sum != TOTAL {
        return Some(format!("invariant: sum {sum} != {TOTAL}"));
    }
    let n: i64 = c
        .query_row("SELECT n FROM counter", [], |r| r.get(0))
        .unwrap();
    if n < min {
        return Some(format!(
            "holds {n} txns, {min} were committed before the backup"
        ));
    }
    None
}

fn db_dir(core: &Path) -> PathBuf {
    core.parent().unwrap().join("volumes/core-ch-1/etc/dbs")
}

fn set_option(core: &Path, line: &str) {
    let toml = std::fs::read_to_string(core).unwrap();
    let toml = toml.replace(
        "layout = \"plain\"\n",
        &format!("layout = \"plain\"\n{line}\n"),
    );
    std::fs::write(core, toml).unwrap();
}

/// Three backups while a writer process commits and checkpoints: `(damaged
/// databases, wal files restored)` over the rounds.
fn live_rounds(dir: &Path, files_mode: bool) -> (Vec<String>, usize) {
    let (fleet, core) = fleet(dir);
    if files_mode {
        set_option(&core, "sqlite = \"files\"");
    }
    let dbs = db_dir(&core);
    create_dbs(&dbs);
    // commits that live only in the -wal (held open, never checkpointed)
    let held = Connection::open(dbs.join("held.sqlite")).unwrap();
    held.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;
         CREATE TABLE t(x); INSERT INTO t VALUES (1); INSERT INTO t VALUES (2);",
    )
    .unwrap();
    let mut writer = start_writer(&dbs);
    std::thread::sleep(Duration::from_millis(500));
    let key = fleet.identity("ch");
    let (mut damaged, mut wals) = (Vec::new(), 0);
    for round in 0..3 {
        let before = counters(&dbs);
        run(zv(&core).args(["backup", "--json", "--full"]), 0);
        let to = dir.join(format!("restored-{round}"));
        restore(&core, &key, &to, &["--volume", "etc"], 0);
        for (i, &min) in before.iter().enumerate() {
            let db = to.join(format!("etc/dbs/db{i}.sqlite"));
            let wal = to.join(format!("etc/dbs/db{i}.sqlite-wal"));
            if wal.exists() {
                wals += 1;
                std::fs::remove_file(&wal).unwrap(); // the database alone
                let _ = std::fs::remove_file(to.join(format!("etc/dbs/db{i}.sqlite-shm")));
            }
            if let Some(why) = damage(&db, min) {
                damaged.push(format!("round {round} db{i}: {why}"));
            }
        }
        let _ = std::fs::remove_file(to.join("etc/dbs/held.sqlite-wal"));
        let _ = std::fs::remove_file(to.join("etc/dbs/held.sqlite-shm"));
        let rows: rusqlite::Result<i64> = Connection::open(to.join("etc/dbs/held.sqlite"))
            .and_then(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get(0)));
        if !matches!(rows, Ok(2)) {
            damaged.push(format!(
                "round {round} held.sqlite: {rows:?}, 2 rows committed"
            ));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(held);
    writer.kill().unwrap();
    writer.wait().unwrap();
    (damaged, wals)
}

#[test]
fn live_wal_databases_restore_whole_and_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let (damaged, wals) = live_rounds(dir.path(), false);
    assert_eq!(wals, 0, "no -wal is archived beside a captured database");
    assert!(damaged.is_empty(), "damaged databases: {damaged:#?}");
}

/// The same workload as plain files: the file alone misses what its `-wal`
/// holds. Deterministic: a database whose commits are only in its `-wal`
/// (never checkpointed, held open) restores without them.
#[test]
fn files_mode_misses_what_the_wal_holds() {
    let dir = tempfile::tempdir().unwrap();
    let (damaged, wals) = live_rounds(dir.path(), true);
    let held = damaged.iter().filter(|d| d.contains("held.sqlite")).count();
    assert_eq!(
        held, 3,
        "the file alone misses the -wal's commits: {damaged:#?}"
    );
    eprintln!(
        "files mode: {} of {} restored databases damaged or incomplete",
        damaged.len(),
        3 * DBS
    );
    assert!(wals > 0, "files mode archives the -wal files");
}

#[test]
fn wal_only_change_is_a_change_and_reference_tools_restore_a_whole_database() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core) = fleet(dir.path());
    let dbs = db_dir(&core);
    std::fs::create_dir_all(&dbs).unwrap();
    let db = dbs.join("held.sqlite");
    // held open by a writer (this process counts as another one for SQLite:
    // zonevault is a separate process), commits only in the -wal
    let held = Connection::open(&db).unwrap();
    held.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;
         CREATE TABLE t(x); INSERT INTO t VALUES (1);",
    )
    .unwrap();
    let first = common::backup(&core);
    assert_eq!(first["databases"], 1, "{first}");
    let again = common::backup(&core);
    assert_eq!(again["uploaded"], 0, "nothing changed: {again}");
    let meta = std::fs::metadata(&db).unwrap();
    held.execute_batch("INSERT INTO t VALUES (2);").unwrap();
    assert_eq!(std::fs::metadata(&db).unwrap().len(), meta.len());
    let third = common::backup(&core);
    assert_eq!(
        third["uploaded"], 1,
        "a change only in the -wal is a change: {third}"
    );

    // reference tools: age -d | zstd -d | tar -x, then sqlite3 without a -wal
    let m = common::manifest_of(&fleet, third["snapshot"].as_str().unwrap());
    let unit = m["units"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["volume"] == "etc")
        .unwrap();
    let object = format!("zonevault/{}", unit["object"].as_str().unwrap());
    let body = fleet.garage("ch-gva-2").get(&object).unwrap();
    let tar = tool(
        "zstd",
        &["-d", "-q"],
        &common::open_by_hand(&fleet, unit["data_key"].as_str(), &body),
    );
    let out = dir.path().join("ref");
    std::fs::create_dir_all(&out).unwrap();
    tar::Archive::new(&tar[..]).unpack(&out).unwrap();
    let restored = out.join("dbs/held.sqlite");
    assert!(!out.join("dbs/held.sqlite-wal").exists());
    let check = Process::new("sqlite3")
        .arg(&restored)
        .arg("PRAGMA integrity_check; PRAGMA journal_mode; SELECT count(*) FROM t;")
        .output()
        .expect("sqlite3: run scripts/install-deps");
    assert_eq!(String::from_utf8_lossy(&check.stdout), "ok\ndelete\n2\n");
    drop(held);
}

#[test]
fn a_locked_database_fails_the_run_naming_it_and_a_fake_one_is_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_fleet, core) = fleet(dir.path());
    set_option(&core, "sqlite_busy_timeout = \"2s\"");
    let dbs = db_dir(&core);
    std::fs::create_dir_all(&dbs).unwrap();
    // a file with the header that is no database: stored as it is
    let mut fake = b"SQLite format 3\0".to_vec();
    fake.extend(std::iter::repeat_n(b'x', 4000));
    std::fs::write(dbs.join("fake.db"), &fake).unwrap();
    std::fs::write(dbs.join("fake.db-wal"), b"not a wal").unwrap();
    let report = common::backup(&core);
    let not = report["not_databases"].as_array().unwrap();
    assert!(
        not.iter()
            .any(|p| p.as_str().unwrap().ends_with("dbs/fake.db")),
        "{report}"
    );
    let key = _fleet.identity("ch");
    let to = dir.path().join("restored");
    restore(&core, &key, &to, &["--volume", "etc"], 0);
    assert_eq!(std::fs::read(to.join("etc/dbs/fake.db")).unwrap(), fake);
    assert_eq!(
        std::fs::read(to.join("etc/dbs/fake.db-wal")).unwrap(),
        b"not a wal"
    );

    // a rollback-journal database held in BEGIN EXCLUSIVE by another process
    let locked = dbs.join("locked.db");
    Connection::open(&locked)
        .unwrap()
        .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    let mut holder = Process::new("sqlite3")
        .arg(&locked)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sqlite3: run scripts/install-deps");
    {
        use std::io::Write;
        let stdin = holder.stdin.as_mut().unwrap();
        stdin
            .write_all(b"BEGIN EXCLUSIVE; INSERT INTO t VALUES (2); SELECT 'held';\n")
            .unwrap();
        stdin.flush().unwrap();
    }
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(holder.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "held");
    }
    let snapshots_before = snapshot_count(&core);
    let started = Instant::now();
    let out = zv(&core).args(["backup"]).output().unwrap();
    let (_, stderr) = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("locked.db") && stderr.contains("busy"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(snapshot_count(&core), snapshots_before, "nothing committed");
    holder.kill().unwrap();
    holder.wait().unwrap();
    // no temp copy is left behind
    let tmp = core.parent().unwrap().join("state/core-ch-1/tmp");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
}

fn snapshot_count(core: &Path) -> usize {
    let (stdout, _) = run(zv(core).args(["snapshots", "--json"]), 0);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    v.as_array()
        .map_or_else(|| v["snapshots"].as_array().unwrap().len(), Vec::len)
}

#[test]
fn leftovers_of_a_crashed_run_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (_fleet, core) = fleet(dir.path());
    let tmp = core.parent().unwrap().join("state/core-ch-1/tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("0123.db"), b"plaintext of a crashed run").unwrap();
    common::backup(&core);
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&tmp).unwrap().permissions().mode() & 0o777,
        0o700
    );
}
