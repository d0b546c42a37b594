//! A deterministic Pryv-like volume of N users, for tests and benchmarks.
//!
//! Per user, under `<a>/<b>/<c>/<userId>/` (a, b, c: the id's last three
//! characters, last first): `events.db` with its `-wal` and `-shm` files
//! (byte-level stand-ins of SQLite files in WAL mode: the SQLite header, then
//! text-like JSON events), `events.jsonl` (text), `attachments/*.bin`
//! (incompressible), a symlink, an empty directory, and one file shared by a
//! hard link. At the root: `user-index.db` and a `_shared/` folder. Modes and
//! mtimes vary. The same seed gives the same bytes.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// What to generate.
#[derive(Debug, Clone)]
pub struct Spec {
    pub users: usize,
    /// Roughly the bytes per user (text ~60%, attachments ~30%, WAL ~10%).
    pub bytes_per_user: usize,
    pub seed: u64,
}

impl Spec {
    pub fn new(users: usize, bytes_per_user: usize) -> Spec {
        Spec {
            users,
            bytes_per_user,
            seed: 42,
        }
    }
}

/// The user ids a spec generates, in order.
pub fn user_ids(spec: &Spec) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    (0..spec.users)
        .map(|_| {
            const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
            let tail: String = (0..24)
                .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
                .collect();
            format!("c{tail}")
        })
        .collect()
}

/// `<a>/<b>/<c>/<userId>` relative to the volume root.
pub fn user_dir(id: &str) -> PathBuf {
    let c: Vec<char> = id.chars().collect();
    let n = c.len();
    [c[n - 1], c[n - 2], c[n - 3]]
        .iter()
        .map(|ch| ch.to_string())
        .collect::<PathBuf>()
        .join(id)
}

const WORDS: &[&str] = &[
    "heart-rate",
    "steps",
    "note",
    "mood",
    "glucose",
    "weight",
    "sleep",
    "position",
    "activity",
    "temperature",
    "blood-pressure",
    "medication",
    "symptom",
    "calories",
    "water",
    "stream",
];

fn text(rng: &mut StdRng, bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes + 200);
    let mut t: u64 = 1_700_000_000;
    while out.len() < bytes {
        t += rng.gen_range(1..600);
        let w = WORDS[rng.gen_range(0..WORDS.len())];
        let _ = writeln!(
            out,
            "{{\"id\":\"ev{:08x}\",\"time\":{t},\"type\":\"{w}/value\",\"streamIds\":[\"{w}\"],\"content\":{}}}",
            rng.r#gen::<u32>(),
            rng.gen_range(0..100_000) as f64 / 100.0
        );
    }
    out.truncate(bytes);
    out
}

fn random(rng: &mut StdRng, bytes: usize) -> Vec<u8> {
    let mut out = vec![0u8; bytes];
    rng.fill_bytes(&mut out);
    out
}

fn write(path: &Path, bytes: &[u8], mode: u32, mtime: i64) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    filetime::set_file_mtime(path, filetime::FileTime::from_unix_time(mtime, 0))?;
    Ok(())
}

/// Writes the volume under `root` (created). Returns the user ids.
pub fn write_pryv_volume(root: &Path, spec: &Spec) -> Result<Vec<String>> {
    std::fs::create_dir_all(root)?;
    let mut rng = StdRng::seed_from_u64(spec.seed ^ 0x5eed);
    let ids = user_ids(spec);
    let base_time = 1_767_225_600; // 2026-01-01
    for (i, id) in ids.iter().enumerate() {
        let dir = root.join(user_dir(id));
        std::fs::create_dir_all(dir.join("attachments"))?;
        std::fs::create_dir_all(dir.join("empty-stream"))?;
        let mtime = base_time + i as i64 * 37;
        let b = spec.bytes_per_user;
        let mut db = b"SQLite format 3\0".to_vec();
        db.extend(text(&mut rng, b * 4 / 10));
        write(&dir.join("events.db"), &db, 0o640, mtime)?;
        write(
            &dir.join("events.db-wal"),
            &text(&mut rng, b / 10),
            0o640,
            mtime + 1,
        )?;
        write(
            &dir.join("events.db-shm"),
            &vec![0u8; 32 * 1024],
            0o640,
            mtime + 1,
        )?;
        write(
            &dir.join("events.jsonl"),
            &text(&mut rng, b * 2 / 10),
            0o644,
            mtime,
        )?;
        let attachments = 1 + rng.gen_range(0..3);
        for a in 0..attachments {
            let size = b * 3 / 10 / attachments;
            write(
                &dir.join(format!("attachments/att{a}.bin")),
                &random(&mut rng, size),
                0o600,
                mtime - 100,
            )?;
        }
        std::os::unix::fs::symlink("attachments/att0.bin", dir.join("latest-attachment"))?;
        std::fs::hard_link(dir.join("events.jsonl"), dir.join("events.jsonl.bak"))?;
        filetime::set_file_mtime(
            dir.join("empty-stream"),
            filetime::FileTime::from_unix_time(mtime, 0),
        )?;
        filetime::set_file_mtime(
            dir.join("attachments"),
            filetime::FileTime::from_unix_time(mtime, 0),
        )?;
        filetime::set_file_mtime(&dir, filetime::FileTime::from_unix_time(mtime, 0))?;
    }
    std::fs::create_dir_all(root.join("_shared/streams"))?;
    write(
        &root.join("_shared/streams/defaults.json"),
        &text(&mut rng, 4096),
        0o644,
        base_time,
    )?;
    write(
        &root.join("_shared/access.log.tmp"),
        b"excluded by *.tmp\n",
        0o644,
        base_time,
    )?;
    let mut index = b"SQLite format 3\0".to_vec();
    for id in &ids {
        index.extend_from_slice(id.as_bytes());
        index.push(b'\n');
    }
    write(&root.join("user-index.db"), &index, 0o640, base_time)?;
    write(
        &root.join("user-index.db-wal"),
        &text(&mut rng, 2048),
        0o640,
        base_time,
    )?;
    Ok(ids)
}

/// What a tree holds, entry by entry: kind, mode, mtime, and the content's
/// BLAKE3 or the link's target. Two trees are equal when their digests are.
pub fn tree(root: &Path) -> Result<BTreeMap<PathBuf, String>> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).follow_links(false).min_depth(1) {
        let e = e?;
        let meta = e.path().symlink_metadata()?;
        let rel = e.path().strip_prefix(root)?.to_path_buf();
        let what = if meta.is_symlink() {
            format!("link -> {}", std::fs::read_link(e.path())?.display())
        } else if meta.is_dir() {
            format!("dir {:o} mtime {}", meta.mode() & 0o7777, meta.mtime())
        } else {
            let hash = blake3::hash(&std::fs::read(e.path())?);
            format!(
                "file {:o} mtime {} nlink {} {hash}",
                meta.mode() & 0o7777,
                meta.mtime(),
                meta.nlink()
            )
        };
        out.insert(rel, what);
    }
    Ok(out)
}
