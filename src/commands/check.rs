//! `zonevault check`: the config is valid (it was loaded), and every target of
//! this core's zone passes the residency check. Writes nothing to the
//! targets; its verdicts go to the audit log.

use std::sync::Arc;

use serde::Serialize;

use crate::audit::AuditLog;
use crate::config::{Config, Target};
use crate::error::Exit;
use crate::residency::{self, Verdict};
use crate::storage::{StoreError, s3::S3Connect};

/// The result of checking one target.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    pub target: String,
    pub endpoint: String,
    pub bucket: String,
    /// The region the target is configured with.
    pub region: String,
    /// The region the server reported, when it reported one.
    pub reported_region: Option<String>,
    /// `pass`, `refused` or `error`.
    pub verdict: &'static str,
    pub reason: String,
}

impl TargetReport {
    /// The exit code this line alone would give.
    pub fn exit(&self) -> Exit {
        match self.verdict {
            "pass" => Exit::Ok,
            "refused" => Exit::Refused,
            _ => Exit::Failure,
        }
    }
}

/// The result of `check`.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub core: String,
    pub zone: String,
    pub zone_name: String,
    pub volumes: usize,
    pub targets: Vec<TargetReport>,
    /// The public key this core signs its snapshots with (none: unsigned).
    pub signing: Option<String>,
    /// Problems that do not fail the check: retention rules that `max_age`
    /// makes impossible to honour.
    pub warnings: Vec<String>,
}

impl CheckReport {
    /// 0 when every target passes, 3 when any is refused, else 1.
    pub fn exit(&self) -> Exit {
        self.targets
            .iter()
            .fold(Exit::Ok, |acc, t| acc.worst(t.exit()))
    }
}

/// Checks every target of the core's zone, concurrently.
pub async fn run(config: &Config, audit: &Arc<AuditLog>) -> CheckReport {
    let zone = config.zone();
    let checks = zone.targets.iter().map(|t| check_target(config, audit, t));
    let targets = futures::future::join_all(checks).await;
    CheckReport {
        core: config.core.core_id.clone(),
        zone: zone.id.clone(),
        zone_name: zone.name.clone(),
        volumes: config.core.volumes.len(),
        targets,
        signing: None,
        warnings: crate::retention::never_honoured(&zone.retention),
    }
}

async fn check_target(config: &Config, audit: &Arc<AuditLog>, target: &Target) -> TargetReport {
    let verdict = residency::verify(config, &S3Connect(config), audit, target).await;
    let (reported_region, verdict, reason) = match verdict {
        Verdict::Passed(w) => {
            let marker = if w.marker_present() {
                "marker names this zone"
            } else {
                "no marker yet"
            };
            (
                Some(w.reported_region().to_string()),
                "pass",
                format!("bucket location matches; {marker}"),
            )
        }
        Verdict::Refused(r) => (r.reported_region, "refused", r.reason),
        Verdict::Unavailable(e) => (None, "error", unavailable_reason(&e)),
    };
    tracing::info!(target = %target.name, verdict, %reason, "residency check");
    TargetReport {
        target: target.name.clone(),
        endpoint: target.endpoint.clone(),
        bucket: target.bucket.clone(),
        region: target.region.clone(),
        reported_region,
        verdict,
        reason,
    }
}

fn unavailable_reason(e: &StoreError) -> String {
    match e {
        StoreError::Credentials { .. } => format!(
            "{e}; check the access key and secret in [credentials.<target>] (or the AWS chain)"
        ),
        other => other.to_string(),
    }
}
