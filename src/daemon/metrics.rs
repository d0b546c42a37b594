//! What the daemon has done, as Prometheus text (`/metrics`) and as a
//! health verdict (`/healthz`).

use std::collections::BTreeMap;
use std::fmt::Write;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::commands::{backup, forget};
use crate::config::Schedule;
use crate::error::{Error, Reason};

/// Counters and gauges of a daemon's life. Totals only grow.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Per target, when a backup last committed a snapshot there.
    pub last_success_by_target: BTreeMap<String, DateTime<Utc>>,
    /// When the last run (backup + forget) that succeeded ended.
    pub last_success: Option<DateTime<Utc>>,
    /// Whether the last run succeeded (`None`: no run yet).
    pub last_run_ok: Option<bool>,
    pub last_run_seconds: f64,
    pub last_error: Option<String>,
    pub runs_total: u64,
    pub plain_bytes_total: u64,
    pub stored_bytes_total: u64,
    pub units_uploaded_total: u64,
    pub units_reused_total: u64,
    /// Failed runs by reason.
    pub failures_total: BTreeMap<Reason, u64>,
    pub residency_refusals_total: u64,
    pub snapshots_kept: Option<usize>,
    pub next_run: Option<DateTime<Utc>>,
    /// The zone's schedule, for health.
    pub schedule: Option<Schedule>,
    /// Reloads refused because the config on disk did not load.
    pub reload_failures_total: u64,
}

/// The health verdict, as `/healthz` serves it.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub healthy: bool,
    pub reason: String,
    pub last_success: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

impl Metrics {
    /// Records a successful backup.
    pub fn backup_done(&mut self, r: &backup::Report, at: DateTime<Utc>) {
        for t in &r.targets {
            self.last_success_by_target.insert(t.clone(), at);
        }
        self.plain_bytes_total += r.uploaded_plain_bytes;
        self.stored_bytes_total += r.uploaded_bytes;
        self.units_uploaded_total += r.uploaded as u64;
        self.units_reused_total += r.reused as u64;
    }

    /// Records a successful forget.
    pub fn forget_done(&mut self, r: &forget::Report) {
        self.snapshots_kept = Some(r.kept);
    }

    /// Records a refused reload: the config on disk is broken (counted as a
    /// `config` failure; the daemon goes on with the old one).
    pub fn reload_failed(&mut self) {
        self.reload_failures_total += 1;
        *self.failures_total.entry(Reason::Config).or_insert(0) += 1;
    }

    /// Records the end of a run.
    pub fn run_done(&mut self, outcome: Result<(), &Error>, seconds: f64, at: DateTime<Utc>) {
        self.runs_total += 1;
        self.last_run_seconds = seconds;
        match outcome {
            Ok(()) => {
                self.last_run_ok = Some(true);
                self.last_success = Some(at);
                self.last_error = None;
            }
            Err(e) => {
                self.last_run_ok = Some(false);
                self.last_error = Some(e.to_string());
                let reason = e.reason();
                *self.failures_total.entry(reason).or_insert(0) += 1;
                if reason == Reason::Residency {
                    self.residency_refusals_total += 1;
                }
            }
        }
    }

    /// Healthy when the last run succeeded and at most one scheduled time
    /// has passed since it ("within two schedule periods", counted in the
    /// schedule's own slots, so weekends of a Mon-Fri schedule and DST days
    /// count right).
    pub fn health(&self, now: DateTime<Utc>) -> Health {
        let verdict = |healthy: bool, reason: String| Health {
            healthy,
            reason,
            last_success: self.last_success,
            last_error: self.last_error.clone(),
        };
        if self.schedule.is_none() {
            return verdict(
                false,
                "the zone has no [schedule]: this daemon runs nothing".into(),
            );
        }
        match (self.last_run_ok, self.last_success) {
            (Some(false), _) => verdict(false, "the last run failed".into()),
            (_, None) => verdict(false, "no successful run yet".into()),
            (_, Some(at)) => {
                let missed = self.schedule.as_ref().map_or(0, |s| {
                    let mut times = s.backup.after(&at.with_timezone(&s.timezone));
                    (0..2)
                        .take_while(|_| times.next().is_some_and(|t| t.with_timezone(&Utc) <= now))
                        .count()
                });
                if missed >= 2 {
                    verdict(
                        false,
                        format!(
                            "no successful run since {}: two scheduled runs have passed since",
                            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                        ),
                    )
                } else {
                    verdict(true, "the last run succeeded".into())
                }
            }
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, now: DateTime<Utc>) -> String {
        let mut s = String::new();
        let ts = |t: &DateTime<Utc>| t.timestamp_millis() as f64 / 1000.0;
        let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
            let _ = writeln!(s, "# HELP zonevault_{name} {help}");
            let _ = writeln!(s, "# TYPE zonevault_{name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(s, "zonevault_{name}{labels} {value}");
            }
        };
        metric(
            "last_success_timestamp_seconds",
            "gauge",
            "When a backup last committed a snapshot on the target.",
            self.last_success_by_target
                .iter()
                .map(|(t, at)| (format!("{{target=\"{}\"}}", escape(t)), ts(at)))
                .collect(),
        );
        metric(
            "last_run_duration_seconds",
            "gauge",
            "Duration of the last run (backup then forget).",
            vec![(String::new(), self.last_run_seconds)],
        );
        metric(
            "runs_total",
            "counter",
            "Runs (backup then forget) the daemon finished, successful or not.",
            vec![(String::new(), self.runs_total as f64)],
        );
        metric(
            "bytes_total",
            "counter",
            "Bytes of the units uploaded: plain (before compression) and stored (encrypted; each object once, whatever the number of targets).",
            vec![
                ("{kind=\"plain\"}".into(), self.plain_bytes_total as f64),
                ("{kind=\"stored\"}".into(), self.stored_bytes_total as f64),
            ],
        );
        metric(
            "units_total",
            "counter",
            "Units uploaded, or reused unchanged from an earlier snapshot.",
            vec![
                (
                    "{result=\"uploaded\"}".into(),
                    self.units_uploaded_total as f64,
                ),
                ("{result=\"reused\"}".into(), self.units_reused_total as f64),
            ],
        );
        let failures: Vec<(String, f64)> = Reason::ALL
            .iter()
            .map(|r| {
                (
                    format!("{{reason=\"{r}\"}}"),
                    self.failures_total.get(r).copied().unwrap_or(0) as f64,
                )
            })
            .collect();
        metric(
            "failures_total",
            "counter",
            "Failed runs by reason.",
            failures,
        );
        metric(
            "config_reload_failures_total",
            "counter",
            "SIGHUP reloads refused because the config on disk does not load.",
            vec![(String::new(), self.reload_failures_total as f64)],
        );
        metric(
            "residency_refusals_total",
            "counter",
            "Runs refused because a target failed the residency check.",
            vec![(String::new(), self.residency_refusals_total as f64)],
        );
        if let Some(kept) = self.snapshots_kept {
            metric(
                "snapshots_kept",
                "gauge",
                "Snapshots of this core kept by the last forget.",
                vec![(String::new(), kept as f64)],
            );
        }
        if let Some(next) = &self.next_run {
            metric(
                "next_run_timestamp_seconds",
                "gauge",
                "When the next scheduled run starts.",
                vec![(String::new(), ts(next))],
            );
        }
        let healthy = self.health(now).healthy;
        metric(
            "healthy",
            "gauge",
            "1 when the last run succeeded within two schedule periods.",
            vec![(String::new(), if healthy { 1.0 } else { 0.0 })],
        );
        s
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// Metrics of a daemon on schedule `expr` in `timezone`.
    fn scheduled(expr: &str, timezone: chrono_tz::Tz) -> Metrics {
        Metrics {
            schedule: Some(Schedule {
                expression: expr.into(),
                backup: std::str::FromStr::from_str(expr).unwrap(),
                timezone,
            }),
            ..Metrics::default()
        }
    }

    #[test]
    fn health_follows_the_last_run_and_the_schedule() {
        let mut m = scheduled("0 * * * * *", chrono_tz::Tz::UTC);
        let now = at("2026-11-26T12:00:00Z");
        assert!(!m.health(now).healthy);
        assert_eq!(m.health(now).reason, "no successful run yet");
        m.run_done(Ok(()), 1.0, at("2026-11-26T11:59:00Z"));
        assert!(m.health(now).healthy);
        assert!(
            !m.health(at("2026-11-26T12:01:01Z")).healthy,
            "two slots passed"
        );
        let e = Error::refused("refused");
        m.run_done(Err(&e), 1.0, now);
        let h = m.health(now);
        assert!(!h.healthy);
        assert_eq!(h.last_error.as_deref(), Some("refused"));
        assert_eq!(m.residency_refusals_total, 1);
        assert_eq!(m.failures_total[&Reason::Residency], 1);
        m.run_done(Ok(()), 1.0, now);
        assert!(m.health(now).healthy);
    }

    #[test]
    fn health_counts_slots_of_a_weekday_schedule() {
        let mut m = scheduled("0 30 2 * * Mon-Fri", chrono_tz::Tz::Europe__Zurich);
        // Friday 2026-11-27 02:30 Zurich, then nothing until Monday
        m.run_done(Ok(()), 1.0, at("2026-11-27T01:31:00Z"));
        assert!(
            m.health(at("2026-11-29T20:00:00Z")).healthy,
            "Sunday evening"
        );
        assert!(
            m.health(at("2026-11-30T02:00:00Z")).healthy,
            "Monday's run may be going on"
        );
        assert!(
            !m.health(at("2026-12-01T02:00:00Z")).healthy,
            "Monday and Tuesday passed"
        );
    }

    #[test]
    fn renders_prometheus_text() {
        let mut m = Metrics::default();
        m.last_success_by_target
            .insert("ch \"primary\"".into(), at("2026-11-26T12:00:00Z"));
        m.snapshots_kept = Some(3);
        let text = m.render(at("2026-11-26T12:00:00Z"));
        assert!(text.contains(
            "zonevault_last_success_timestamp_seconds{target=\"ch \\\"primary\\\"\"} 1795694400"
        ));
        assert!(text.contains("# TYPE zonevault_failures_total counter"));
        assert!(text.contains("zonevault_failures_total{reason=\"residency\"} 0"));
        assert!(text.contains("zonevault_snapshots_kept 3"));
        assert!(text.contains("zonevault_healthy 0"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("zonevault_"), "{line}");
            value.parse::<f64>().unwrap();
        }
    }

    #[test]
    fn failures_are_counted_under_the_reason_of_the_error() {
        use crate::storage::StoreError;
        let mut m = Metrics::default();
        let now = at("2026-11-26T12:00:00Z");
        let runs = [
            // the reason set where the failure arose, whatever the message
            Error::because(Reason::Unavailable, "target ch-secondary: cannot reach it"),
            Error::Failed(
                anyhow::Error::from(StoreError::Credentials {
                    cause: "AccessDenied (HTTP 403)".into(),
                })
                .context("listing p/ on target ch-primary"),
            ),
            Error::because(Reason::Integrity, "BLAKE3 differs"),
            Error::Usage("no volume named x".into()),
            Error::refused("core x is in zone de"),
            // a message that reads like an outage is not one
            Error::failed("cannot use every target of zone ch"),
        ];
        for e in &runs {
            m.run_done(Err(e), 1.0, now);
        }
        let text = m.render(now);
        for (label, n) in [
            ("unavailable", 1),
            ("credentials", 1),
            ("integrity", 1),
            ("config", 1),
            ("residency", 1),
            ("other", 1),
        ] {
            let line = format!("zonevault_failures_total{{reason=\"{label}\"}} {n}\n");
            assert!(text.contains(&line), "no {line:?} in\n{text}");
        }
        assert_eq!(m.residency_refusals_total, 1);
        assert_eq!(m.failures_total.values().sum::<u64>(), 6);
    }
}
