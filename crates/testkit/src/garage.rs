//! One Garage server on free 127.0.0.1 ports, with its own `s3_region`, one
//! bucket and one key. Stopped by its PID when dropped, even when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aws_sdk_s3::config::{Credentials, Region};

/// What Garage logs when a port it was given is taken meanwhile.
const PORT_TAKEN: &str = "Address already in use";

/// The Garage version the project is tested with.
pub const GARAGE_VERSION: &str = "2.5.0";

/// A running Garage.
pub struct Garage {
    child: Option<Child>,
    pid: u32,
    /// Directory with its config, data and log.
    pub dir: PathBuf,
    /// The `s3_region` it reports for every bucket.
    pub region: String,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The one bucket it was started with.
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
}

/// Where the garage binary is: `$ZONEVAULT_GARAGE`, else `garage` on `PATH`,
/// else `~/.cargo/bin/garage`. Fails, never skips, when there is none.
pub fn garage_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ZONEVAULT_GARAGE") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("ZONEVAULT_GARAGE={} is not a file", p.display());
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("garage"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cargo/bin/garage"));
    }
    candidates.into_iter().find(|p| p.is_file()).context(
        "Garage not found (looked at $ZONEVAULT_GARAGE, PATH and ~/.cargo/bin): \
         run scripts/install-deps, which installs Garage 2.5.0, or set ZONEVAULT_GARAGE",
    )
}

/// `N` distinct free ports: all are held until all are chosen, so two of
/// them can never be the same port (the kernel may hand out a port again
/// as soon as it is released).
fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let mut held = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for port in &mut ports {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
        *port = listener.local_addr()?.port();
        held.push(listener);
    }
    Ok(ports)
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("reading /dev/urandom");
}

impl Garage {
    /// Starts a Garage in `dir` (created) reporting `region`, with `bucket`
    /// created and a key allowed on it. Waits until it answers S3 requests.
    pub fn start(dir: &Path, region: &str, bucket: &str) -> Result<Garage> {
        Self::spawn(dir, region, bucket, false)
    }

    /// Like [`Garage::start`], but the server outlives this process (for the
    /// demo): stop it with `kill $(cat DIR/garage.pid)`.
    pub fn start_detached(dir: &Path, region: &str, bucket: &str) -> Result<Garage> {
        Self::spawn(dir, region, bucket, true)
    }

    fn spawn(dir: &Path, region: &str, bucket: &str, detached: bool) -> Result<Garage> {
        // Free ports are found by binding and releasing them, so another
        // server started at the same moment may take one first: try again
        // with new ports when that happens.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::spawn_once(dir, region, bucket, detached) {
                Err(e) if attempt < 10 && format!("{e:#}").contains(PORT_TAKEN) => continue,
                other => return other,
            }
        }
    }

    fn spawn_once(dir: &Path, region: &str, bucket: &str, detached: bool) -> Result<Garage> {
        let binary = garage_binary()?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir.canonicalize()?;
        for sub in ["meta", "data"] {
            let _ = std::fs::remove_dir_all(dir.join(sub)); // a failed earlier attempt
        }
        // and its log: the readiness check looks for a taken port in it
        let _ = std::fs::remove_file(dir.join("garage.log"));
        let [rpc, s3, admin] = free_ports::<3>()?;
        let config = format!(
            r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "sqlite"
compression_level = "none"
replication_factor = 1
metadata_fsync = false
data_fsync = false
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{rpc_secret}"

[s3_api]
s3_region = "{region}"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "{admin_token}"
"#,
            dir = dir.display(),
            rpc_secret = random_hex(32),
            admin_token = random_hex(32),
        );
        let config_path = dir.join("garage.toml");
        std::fs::write(&config_path, config)?;
        let key_id = format!("GK{}", random_hex(12));
        let secret = random_hex(32);
        let child = launch(&binary, &dir, &key_id, &secret, bucket, detached)?;
        let pid = child.id();
        std::fs::write(dir.join("garage.pid"), format!("{pid}\n"))?;
        let mut garage = Garage {
            child: Some(child),
            pid,
            dir: dir.clone(),
            region: region.to_string(),
            endpoint: format!("http://127.0.0.1:{s3}"),
            bucket: bucket.to_string(),
            key_id,
            secret,
        };
        garage.wait_ready().with_context(|| {
            let log = std::fs::read_to_string(dir.join("garage.log")).unwrap_or_default();
            format!("Garage ({region}) did not become ready; its log:\n{log}")
        })?;
        if detached {
            // Forget the handle: the server keeps running after we exit.
            garage.child.take();
        }
        Ok(garage)
    }

    /// The PID of the server process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// An S3 client for this server, signing for its region.
    pub async fn client(&self) -> aws_sdk_s3::Client {
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .region(Region::new(self.region.clone()))
            .credentials_provider(Credentials::new(
                &self.key_id,
                &self.secret,
                None,
                None,
                "testkit",
            ))
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .load()
            .await;
        let config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(true)
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = std::fs::read_to_string(self.dir.join("garage.log")).unwrap_or_default();
            if log.contains(PORT_TAKEN) {
                bail!("{PORT_TAKEN}");
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("garage exited with {status}");
            }
            if block_on(async {
                let client = self.client().await;
                client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .send()
                    .await
                    .is_ok()
            }) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("no answer to ListObjectsV2 within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every key in the bucket.
    pub fn keys(&self) -> Result<Vec<String>> {
        block_on(async {
            let client = self.client().await;
            let mut keys = Vec::new();
            let mut pages = client
                .list_objects_v2()
                .bucket(&self.bucket)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.context("listing objects")?;
                keys.extend(
                    page.contents()
                        .iter()
                        .filter_map(|o| o.key().map(String::from)),
                );
            }
            Ok(keys)
        })
    }

    /// Writes an object directly, bypassing zonevault (to set up a test).
    pub fn put(&self, key: &str, body: &[u8]) -> Result<()> {
        block_on(async {
            let client = self.client().await;
            client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .body(body.to_vec().into())
                .send()
                .await
                .with_context(|| format!("putting {key}"))?;
            Ok(())
        })
    }

    /// Deletes an object directly, bypassing zonevault (as an intruder would).
    pub fn delete(&self, key: &str) -> Result<()> {
        block_on(async {
            let client = self.client().await;
            client
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .with_context(|| format!("deleting {key}"))?;
            Ok(())
        })
    }

    /// How many multipart uploads are in progress in the bucket.
    pub fn pending_uploads(&self) -> Result<usize> {
        block_on(async {
            let client = self.client().await;
            let out = client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .send()
                .await
                .context("listing uploads")?;
            Ok(out.uploads().len())
        })
    }

    /// An object's bytes.
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        block_on(async {
            let client = self.client().await;
            let out = client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .with_context(|| format!("getting {key}"))?;
            Ok(out.body.collect().await?.to_vec())
        })
    }

    /// Starts a stopped server again, with its data, ports and keys (an
    /// outage that ends). Waits until it answers.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let child = launch(
            &garage_binary()?,
            &self.dir,
            &self.key_id,
            &self.secret,
            &self.bucket,
            false,
        )?;
        self.pid = child.id();
        self.child = Some(child);
        self.wait_ready()
    }

    /// Stops the server (SIGKILL by PID) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the server configured in `dir/garage.toml`, logging to `dir/garage.log`.
fn launch(
    binary: &Path,
    dir: &Path,
    key_id: &str,
    secret: &str,
    bucket: &str,
    detached: bool,
) -> Result<std::process::Child> {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(dir.join("garage.log"))?;
    let mut cmd = Command::new(binary);
    cmd.arg("-c")
        .arg(dir.join("garage.toml"))
        .args(["server", "--single-node", "--default-bucket"])
        .env("GARAGE_DEFAULT_ACCESS_KEY", key_id)
        .env("GARAGE_DEFAULT_SECRET_KEY", secret)
        .env("GARAGE_DEFAULT_BUCKET", bucket)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if !detached {
        use std::os::unix::process::CommandExt;
        // If the test process dies without running Drop, the kernel stops Garage.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    cmd.spawn()
        .with_context(|| format!("starting {}", binary.display()))
}

/// Runs a future to completion on a private single-threaded runtime, so that
/// synchronous tests can use the async S3 client.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a tokio runtime")
        .block_on(f)
}
