//! A private PostgreSQL server for tests (Debian's `postgresql` package):
//! `initdb` into a temp dir, a Unix socket in that dir (no TCP), run as the
//! `postgres` user when the tests run as root, stopped by its PID on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A running server; dropped, it is stopped (SIGTERM, then SIGKILL).
pub struct Postgres {
    pub dir: PathBuf,
    /// The socket directory: pass it as `-h`.
    pub socket_dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    child: Option<Child>,
}

/// The directory of the newest installed PostgreSQL binaries.
pub fn bin_dir() -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (/usr/lib/postgresql): run scripts/install-deps")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
        .context("no PostgreSQL server binaries: run scripts/install-deps")
}

fn is_root() -> bool {
    // SAFETY: a plain getter.
    unsafe { libc::geteuid() == 0 }
}

impl Postgres {
    /// Starts a server in `dir` (created; chowned to `postgres` as root).
    pub fn start(dir: &Path) -> Result<Postgres> {
        let bin = bin_dir()?;
        std::fs::create_dir_all(dir)?;
        let data = dir.join("data");
        let socket_dir = dir.to_path_buf();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir)
                .status()?
                .success();
            if !ok {
                bail!("cannot chown {} to postgres", dir.display());
            }
        }
        let out = as_postgres(&bin.join("initdb"))
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .output()?;
        check(&out, "initdb")?;
        let port = 20000 + (rand::random::<u16>() % 20000);
        let log = std::fs::File::create(dir.join("postgres.log"))?;
        let mut cmd = as_postgres(&bin.join("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&socket_dir)
            .args(["-c", "listen_addresses=", "-c", "fsync=off", "-p"])
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("starting postgres")?;
        let mut pg = Postgres {
            dir: dir.to_path_buf(),
            socket_dir,
            port,
            bin,
            child: Some(child),
        };
        pg.wait_ready()?;
        Ok(pg)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!(
                    "postgres exited ({status}): {}",
                    std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
                );
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .arg("-h")
                .arg(&self.socket_dir)
                .arg("-p")
                .arg(self.port.to_string())
                .output()?;
            if ready.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("postgres did not become ready in 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A client tool (`psql`, `pg_dump`, `pg_restore`, ...) connected to this server.
    pub fn tool(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(name));
        cmd.arg("-h")
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-U")
            .arg("postgres");
        cmd
    }

    /// The path of a client tool.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// Runs SQL in `db` through psql; returns its unaligned output.
    pub fn sql(&self, db: &str, sql: &str) -> Result<String> {
        let out = self
            .tool("psql")
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                db,
                "-c",
                sql,
            ])
            .output()?;
        check(&out, "psql")?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The server's PID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signals the child we started, by its PID.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A command run as `postgres` when we are root (postgres refuses root),
/// killed if the test process dies.
fn as_postgres(program: &Path) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--pdeathsig=KILL",
        ])
        .arg(program);
        c
    } else {
        Command::new(program)
    };
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

fn check(out: &Output, what: &str) -> Result<()> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
