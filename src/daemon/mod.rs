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
//! - SIGTERM/SIGINT: no new run; a run in progress gets `stop_timeout` to
//!   finish, else it is abandoned before its commit (so no partial snapshot:
//!   the index is the last write, and the next run cleans up); exit 0.
//! - SIGHUP: the config is read again; a config that does not load is
//!   refused, logged and recorded, and the daemon goes on with the old one.
//! - systemd: `READY=1` once the config is valid and the HTTP endpoint is
//!   bound; `WATCHDOG=1` at half the watchdog interval.

pub mod http;
pub mod metrics;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::signal::unix::{SignalKind, signal};

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

/// Runs until SIGTERM or SIGINT.
pub async fn run(options: Options) -> Result<()> {
    let mut config = Arc::new(Config::load(&options.config_path)?);
    let audit =
        Arc::new(AuditLog::start(&config, "daemon").map_err(|e| {
            Error::Failed(e.context("zonevault records every run in its audit log"))
        })?);
    let metrics = Arc::new(Mutex::new(Metrics::default()));
    let server = match config.core.metrics_listen {
        Some(addr) => Some(http::serve(addr, Arc::clone(&metrics)).await?),
        None => None,
    };
    let signals =
        |kind| signal(kind).map_err(|e| Error::failed(format!("cannot handle signals: {e}")));
    let (mut term, mut int, mut hup) = (
        signals(SignalKind::terminate())?,
        signals(SignalKind::interrupt())?,
        signals(SignalKind::hangup())?,
    );
    let last = last_snapshot(&config).await;
    let mut catch_up = needs_catch_up(config.zone().schedule.as_ref(), last, Utc::now());
    if let Some(at) = last {
        // Health starts from what the zone already holds.
        lock(&metrics).last_success = Some(at);
    }
    if config.zone().schedule.is_none() {
        tracing::warn!(zone = %config.zone().id, "the zone has no [schedule]: the daemon serves metrics but runs nothing");
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let watchdog = sd_notify::watchdog_enabled().map(|every| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every / 2);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        })
    });
    tracing::info!(core = %config.core.core_id, zone = %config.zone().id, catch_up, "daemon started");

    loop {
        let now = Utc::now();
        let schedule = config.zone().schedule.clone();
        let next = if catch_up {
            Some(now)
        } else {
            schedule
                .as_ref()
                .and_then(|s| next_after(s, now))
                .map(|t| t + jitter(options.jitter))
        };
        {
            let mut m = lock(&metrics);
            m.next_run = next;
            m.period_seconds = schedule.as_ref().and_then(|s| period(s, now));
        }
        let wait = next.map_or(Duration::from_secs(3600), |t| {
            (t - Utc::now()).to_std().unwrap_or_default()
        });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {
                if next.is_none() {
                    continue;
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                config = reload(&options, config, &audit);
                continue;
            }
        }
        catch_up = false;
        let current = Arc::clone(&config);
        let run = run_once(&current, &audit, &metrics);
        tokio::pin!(run);
        let stopping = loop {
            tokio::select! {
                _ = &mut run => break false,
                _ = term.recv() => break true,
                _ = int.recv() => break true,
                _ = hup.recv() => config = reload(&options, config, &audit),
            }
        };
        if stopping {
            tracing::info!(timeout = ?options.stop_timeout, "stopping: the run in progress may finish");
            if tokio::time::timeout(options.stop_timeout, &mut run)
                .await
                .is_err()
            {
                let e = Error::failed(format!(
                    "stopped: the run was abandoned after {:?}, before its commit; the next run cleans up",
                    options.stop_timeout
                ));
                tracing::warn!("{e}");
                audit.run_failed("daemon", &e);
            }
            break;
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    if let Some(task) = server {
        task.abort();
    }
    if let Some(task) = watchdog {
        task.abort();
    }
    tracing::info!("daemon stopped");
    Ok(())
}

fn lock(metrics: &Mutex<Metrics>) -> std::sync::MutexGuard<'_, Metrics> {
    metrics.lock().unwrap_or_else(|p| p.into_inner())
}

/// One scheduled run: a backup, then retention. Never fails the daemon.
async fn run_once(config: &Config, audit: &Arc<AuditLog>, metrics: &Mutex<Metrics>) {
    let started = Instant::now();
    let outcome = async {
        let report = backup::run(config, audit, &backup::Options::new()).await?;
        tracing::info!(snapshot = %report.snapshot, uploaded = report.uploaded, reused = report.reused, "backup committed");
        lock(metrics).backup_done(&report, Utc::now());
        let forgot = forget::run(config, audit, &forget::Options::default()).await?;
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
fn reload(options: &Options, old: Arc<Config>, audit: &AuditLog) -> Arc<Config> {
    let loaded = Config::load(&options.config_path)
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

/// The gap between the next two scheduled times.
fn period(schedule: &Schedule, now: DateTime<Utc>) -> Option<f64> {
    let first = next_after(schedule, now)?;
    let second = next_after(schedule, first)?;
    Some((second - first).num_milliseconds() as f64 / 1000.0)
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
        assert_eq!(period(&nightly, now), Some(86_400.0));
    }
}
