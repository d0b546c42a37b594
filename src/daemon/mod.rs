//! `zonevault daemon`: scheduled backups and retention, for years, under
//! systemd.
//!
//! The loop, top to bottom: wait for the next scheduled time of the zone
//! (in its timezone, plus optional jitter) or a signal; run a backup then a
//! `forget` (the same code as the commands, so the same run lock, gate and
//! audit records); count what happened in [`metrics::Metrics`]; repeat. A
//! failed run is counted and logged; the next scheduled run tries again.
//!
//! - At start: if the last committed snapshot is older than the last
//!   scheduled time (the machine was off), a run starts at once.
//! - SIGTERM/SIGINT: no new run; a run in progress stops at its next safe
//!   point: uploads in flight are aborted and the backup fails before its
//!   commit (no partial snapshot; the next run cleans up), while a commit
//!   under way runs to its end; a `forget` stops before its next snapshot's
//!   deletion (or does not start), while its sweep of unreferenced objects
//!   runs on. `stop_timeout` bounds the wait; exit 0.
//! - SIGHUP: the config is read again; a config that does not load is
//!   refused, logged and recorded, and the daemon goes on with the old one.
//! - systemd: `READY=1` once the config is valid and the HTTP endpoint is
//!   bound; `WATCHDOG=1` at half the watchdog interval, from the loop itself.

pub mod http;
pub mod metrics;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditLog, Event};
use crate::commands::{backup, forget, snapshots};
use crate::config::{Config, Schedule};
use crate::error::{Error, Result};

use metrics::Metrics;

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The core config, read again on SIGHUP.
    pub config_path: PathBuf,
    /// How long a run in progress may go on after SIGTERM.
    pub stop_timeout: Duration,
    /// Up to this much random delay before each scheduled run, so that the
    /// cores of a zone do not all start at the same second.
    pub jitter: Duration,
}

/// What the daemon is told from outside: in `main`, SIGTERM and SIGINT are
/// [`Signal::Stop`] and SIGHUP is [`Signal::Reload`] ([`os_signals`]); a
/// test sends them itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Stop: no new run; the run in progress stops at its next safe point.
    /// A second one while stopping abandons the run at once.
    Stop,
    /// Read the config again.
    Reload,
}

/// The process's SIGTERM, SIGINT and SIGHUP as [`Signal`]s. Call inside the
/// runtime.
pub fn os_signals() -> Result<mpsc::Receiver<Signal>> {
    let handler =
        |kind| signal(kind).map_err(|e| Error::failed(format!("cannot handle signals: {e}")));
    let (mut term, mut int, mut hup) = (
        handler(SignalKind::terminate())?,
        handler(SignalKind::interrupt())?,
        handler(SignalKind::hangup())?,
    );
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let signal = tokio::select! {
                _ = term.recv() => Signal::Stop,
                _ = int.recv() => Signal::Stop,
                _ = hup.recv() => Signal::Reload,
            };
            if tx.send(signal).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// Runs until told to stop ([`Signal::Stop`], or `signals` closing).
pub async fn run(options: Options, mut signals: mpsc::Receiver<Signal>) -> Result<()> {
    let mut config = Arc::new(Config::load_live(&options.config_path)?);
    // One daemon per core: a second one would double every run.
    let _daemon_lock = daemon_lock(&config.core.state_dir)?;
    let audit =
        Arc::new(AuditLog::start(&config, "daemon").map_err(|e| {
            Error::Failed(e.context("zonevault records every run in its audit log"))
        })?);
    let metrics = Arc::new(Mutex::new(Metrics::default()));
    let server = match config.core.metrics_listen {
        Some(addr) => Some(http::serve(addr, Arc::clone(&metrics)).await?),
        None => None,
    };
    // Ready: the config is valid and the endpoint listens. What follows may
    // wait on the network, which systemd's start timeout must not cover.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    // The watchdog is fed by this loop itself, so a wedged loop is noticed.
    let mut watchdog = tokio::time::interval(
        sd_notify::watchdog_enabled().map_or(Duration::from_secs(3600), |every| every / 2),
    );

    let last = last_snapshot(&config).await;
    {
        // Health and per-target freshness start from what the zone holds.
        let mut m = lock(&metrics);
        if let Some(at) = last {
            m.last_success = Some(at);
            for t in &config.zone().targets {
                m.last_success_by_target.insert(t.name.clone(), at);
            }
        }
    }
    if config.zone().schedule.is_none() {
        tracing::warn!(zone = %config.zone().id, "the zone has no [schedule]: the daemon serves metrics but runs nothing");
    }
    let catch_up = needs_catch_up(config.zone().schedule.as_ref(), last, Utc::now());
    tracing::info!(core = %config.core.core_id, zone = %config.zone().id, catch_up, "daemon started");
    // The time of the next run, kept until it happens: a reload does not
    // redraw it (unless the schedule changed), so no run is skipped.
    let mut planned = plan(&config, catch_up, options.jitter);

    loop {
        {
            let mut m = lock(&metrics);
            m.next_run = planned;
            m.schedule = config.zone().schedule.clone();
        }
        let wait = planned.map_or(Duration::from_secs(3600), |t| {
            (t - Utc::now()).to_std().unwrap_or_default()
        });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {
                if planned.is_none_or(|t| t > Utc::now()) {
                    continue;
                }
            }
            _ = watchdog.tick() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                continue;
            }
            signal = signals.recv() => {
                if signal != Some(Signal::Reload) {
                    break;
                }
                let old = Arc::clone(&config);
                config = reload(&options, config, &audit, &metrics).await;
                if !same_schedule(&old, &config) {
                    planned = plan(&config, false, options.jitter);
                }
                continue;
            }
        }
        tracing::info!("scheduled run starting");
        lock(&metrics).next_run = None;
        let current = Arc::clone(&config);
        let cancel = CancellationToken::new();
        let run = run_once(&current, &audit, &metrics, &cancel);
        tokio::pin!(run);
        let stopping = loop {
            tokio::select! {
                _ = &mut run => break false,
                _ = watchdog.tick() => {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
                signal = signals.recv() => match signal {
                    Some(Signal::Reload) => config = reload(&options, config, &audit, &metrics).await,
                    _ => break true,
                },
            }
        };
        if stopping {
            // Uploads in flight are aborted and no unit starts; a commit or a
            // forget stops before its next deletion, within the bound.
            tracing::info!(timeout = ?options.stop_timeout, "stopping: the run in progress stops at its next safe point");
            cancel.cancel();
            let finished = tokio::select! {
                r = tokio::time::timeout(options.stop_timeout, &mut run) => r.is_ok(),
                // a second stop: abandon the run now (a reload waits; a
                // closed channel leaves the run its grace)
                () = second_stop(&mut signals) => false,
            };
            if !finished {
                let e = Error::failed(format!(
                    "stopped: the run did not reach a safe point within {:?} (or a second signal came) and was abandoned; the next run cleans up",
                    options.stop_timeout
                ));
                tracing::warn!("{e}");
                audit.record_failure("daemon", &e).await;
            }
            break;
        }
        planned = plan(&config, false, options.jitter);
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    if let Some(endpoint) = server {
        endpoint.shutdown().await;
    }
    tracing::info!("daemon stopped");
    Ok(())
}

/// Waits for another [`Signal::Stop`], passing over reloads; never returns
/// once `signals` is closed (no one is left to ask twice).
async fn second_stop(signals: &mut mpsc::Receiver<Signal>) {
    loop {
        match signals.recv().await {
            Some(Signal::Stop) => return,
            Some(Signal::Reload) => {}
            None => std::future::pending().await,
        }
    }
}

/// When the next run starts: now (catching up) or at the next scheduled
/// time, plus jitter either way; `None` without a schedule.
fn plan(config: &Config, catch_up: bool, max_jitter: Duration) -> Option<DateTime<Utc>> {
    let schedule = config.zone().schedule.as_ref()?;
    let now = Utc::now();
    let at = if catch_up {
        now
    } else {
        next_after(schedule, now)?
    };
    Some(at + jitter(max_jitter))
}

fn same_schedule(a: &Config, b: &Config) -> bool {
    let key = |c: &Config| {
        c.zone()
            .schedule
            .as_ref()
            .map(|s| (s.expression.clone(), s.timezone))
    };
    key(a) == key(b)
}

fn lock(metrics: &Mutex<Metrics>) -> std::sync::MutexGuard<'_, Metrics> {
    metrics.lock().unwrap_or_else(|p| p.into_inner())
}

/// One scheduled run: a backup, then retention. Never fails the daemon.
async fn run_once(
    config: &Config,
    audit: &Arc<AuditLog>,
    metrics: &Mutex<Metrics>,
    cancel: &CancellationToken,
) {
    let started = Instant::now();
    let outcome = async {
        let mut options = backup::Options::new();
        options.cancel = cancel.clone();
        let report = backup::run(config, audit, &options).await?;
        tracing::info!(snapshot = %report.snapshot, uploaded = report.uploaded, reused = report.reused, "backup committed");
        lock(metrics).backup_done(&report, Utc::now());
        if cancel.is_cancelled() {
            // stopping: the retention waits for the next run
            return Ok(());
        }
        let forget_options = forget::Options {
            cancel: cancel.clone(),
            ..Default::default()
        };
        let forgot = forget::run(config, audit, &forget_options).await?;
        tracing::info!(kept = forgot.kept, forgotten = forgot.forgotten, "retention applied");
        lock(metrics).forget_done(&forgot);
        Ok::<(), Error>(())
    }
    .await;
    if let Err(e) = &outcome {
        tracing::error!(error = %e, "scheduled run failed; the next scheduled run tries again");
    }
    lock(metrics).run_done(
        outcome.as_ref().map(|_| ()),
        started.elapsed().as_secs_f64(),
        Utc::now(),
    );
}

/// Reads the config again. A config that does not load, or that moves the
/// core or its state dir (which only a restart may do), is refused: the
/// daemon keeps `old`, and says why in the log and the audit log.
async fn reload(
    options: &Options,
    old: Arc<Config>,
    audit: &Arc<AuditLog>,
    metrics: &Arc<Mutex<Metrics>>,
) -> Arc<Config> {
    // reading files and fsyncing the record: off the loop's thread
    let (path, audit, metrics, fallback) = (
        options.config_path.clone(),
        Arc::clone(audit),
        Arc::clone(metrics),
        Arc::clone(&old),
    );
    crate::blocking::run("reloading the config", move || {
        reload_now(&path, old, &audit, &metrics)
    })
    .await
    .unwrap_or(fallback)
}

fn reload_now(
    path: &std::path::Path,
    old: Arc<Config>,
    audit: &AuditLog,
    metrics: &Mutex<Metrics>,
) -> Arc<Config> {
    let loaded = Config::load_live(path)
        .map_err(Error::from)
        .and_then(|new| {
            if new.core.core_id != old.core.core_id || new.core.state_dir != old.core.state_dir {
                return Err(Error::Usage(
                    "a reload cannot change core_id or state_dir; restart the daemon for that"
                        .into(),
                ));
            }
            Ok(new)
        });
    match loaded {
        Ok(new) => {
            let event = Event::ConfigLoaded {
                command: "daemon reload".into(),
                core_config: new.path.display().to_string(),
                core_config_blake3: new.digests.core.clone(),
                zone_map: new.core.zone_map.display().to_string(),
                zone_map_blake3: new.digests.zone_map.clone(),
            };
            if let Err(e) = audit.append(&event) {
                tracing::error!(error = %format!("{e:#}"), "cannot record the reload");
            }
            tracing::info!("configuration reloaded");
            Arc::new(new)
        }
        Err(e) => {
            tracing::error!(error = %e, "configuration not reloaded; going on with the previous one");
            lock(metrics).reload_failed();
            let event = Event::ConfigRejected {
                command: "daemon reload".into(),
                reason: e.to_string(),
            };
            if let Err(e) = audit.append(&event) {
                tracing::error!(error = %format!("{e:#}"), "cannot record the refused reload");
            }
            old
        }
    }
}

/// Held for the daemon's life: `<state_dir>/daemon.lock`.
fn daemon_lock(state_dir: &std::path::Path) -> Result<std::fs::File> {
    crate::state::create_dir(state_dir)?;
    let path = state_dir.join("daemon.lock");
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::failed(format!("cannot open {}: {e}", path.display())))?;
    crate::lock::flock(&file, libc::LOCK_EX | libc::LOCK_NB).map_err(|_| {
        Error::failed(format!(
            "another zonevault daemon runs for this core (it holds {}); stop it first",
            path.display()
        ))
    })?;
    Ok(file)
}

/// When this core's last committed snapshot was taken, if the zone answers.
async fn last_snapshot(config: &Config) -> Option<DateTime<Utc>> {
    match snapshots::list(config, &config.core.core_id).await {
        Ok((indexes, ..)) => indexes.last().map(|i| i.time),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the snapshots at start");
            None
        }
    }
}

/// Whether a scheduled run was missed: the schedule fired after the last
/// snapshot (or there is none) and before `now`.
pub fn needs_catch_up(
    schedule: Option<&Schedule>,
    last: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> bool {
    let Some(schedule) = schedule else {
        return false;
    };
    match last {
        None => true,
        Some(last) => next_after(schedule, last).is_some_and(|t| t <= now),
    }
}

/// The first scheduled time after `t`, in the schedule's timezone.
pub fn next_after(schedule: &Schedule, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    schedule
        .backup
        .after(&t.with_timezone(&schedule.timezone))
        .next()
        .map(|t| t.with_timezone(&Utc))
}

fn jitter(max: Duration) -> chrono::Duration {
    use rand::Rng;
    if max.is_zero() {
        return chrono::Duration::zero();
    }
    let ms = rand::thread_rng().gen_range(0..=max.as_millis() as i64);
    chrono::Duration::milliseconds(ms)
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn schedule(expr: &str, tz: chrono_tz::Tz) -> Schedule {
        Schedule {
            expression: expr.into(),
            backup: cron::Schedule::from_str(expr).unwrap(),
            timezone: tz,
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn catch_up_when_a_scheduled_time_passed_since_the_last_snapshot() {
        let nightly = schedule("0 30 2 * * *", chrono_tz::Tz::Europe__Zurich);
        let now = at("2026-11-26T12:00:00Z");
        // 02:30 Zurich = 01:30Z
        assert!(!needs_catch_up(
            Some(&nightly),
            Some(at("2026-11-26T01:30:05Z")),
            now
        ));
        assert!(needs_catch_up(
            Some(&nightly),
            Some(at("2026-11-25T01:30:05Z")),
            now
        ));
        assert!(needs_catch_up(Some(&nightly), None, now));
        assert!(!needs_catch_up(None, None, now));
        assert_eq!(next_after(&nightly, now), Some(at("2026-11-27T01:30:00Z")));
    }

    #[tokio::test]
    async fn a_closed_signal_channel_leaves_a_stopping_run_its_grace() {
        let wait = Duration::from_millis(200);
        let (tx, mut rx) = mpsc::channel(4);
        tx.send(Signal::Reload).await.unwrap();
        drop(tx);
        // closed: no second stop ever comes
        assert!(
            tokio::time::timeout(wait, second_stop(&mut rx))
                .await
                .is_err()
        );
        let (tx, mut rx) = mpsc::channel(4);
        tx.send(Signal::Reload).await.unwrap();
        tx.send(Signal::Stop).await.unwrap();
        assert!(
            tokio::time::timeout(wait, second_stop(&mut rx))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn a_stop_ends_the_daemon_and_a_closed_channel_too() {
        for close_instead in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let config = crate::testing::config(dir.path());
            std::fs::create_dir_all(dir.path().join("vol")).unwrap();
            let options = Options {
                config_path: config.path.clone(),
                stop_timeout: Duration::from_secs(1),
                jitter: Duration::ZERO,
            };
            let (tx, rx) = mpsc::channel(4);
            let daemon = tokio::spawn(run(options, rx));
            // a reload is not a stop
            tx.send(Signal::Reload).await.unwrap();
            if close_instead {
                drop(tx);
            } else {
                tx.send(Signal::Stop).await.unwrap();
            }
            tokio::time::timeout(Duration::from_secs(60), daemon)
                .await
                .expect("the daemon stopped")
                .unwrap()
                .unwrap();
            // it let go of its lock: another daemon may start (a child
            // that another test forks in the meantime holds a copy of the
            // descriptor until its exec closes it, so allow a moment)
            let mut tries = 0;
            while let Err(e) = daemon_lock(&config.core.state_dir) {
                tries += 1;
                assert!(tries < 100, "{e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
