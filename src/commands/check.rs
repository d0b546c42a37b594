//! `zonevault check`: the config is valid (it was loaded), and every target of
//! this core's zone passes the residency check. Writes nothing to the
//! targets; its verdicts go to the audit log.

use std::sync::Arc;

use serde::Serialize;

use crate::audit::AuditLog;
use crate::config::{Config, Target};
use crate::error::{Error, Exit, Reason, Refused, TargetRefusal};
use crate::residency::{self, Refusal};
use crate::storage::{StoreError, s3::S3Connect};

/// The verdict on one target, as `check` prints it (`--json`: `pass`,
/// `refused`, `error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The target passed the residency check.
    Pass,
    /// The target failed it: nothing may be written there (exit 3).
    Refused,
    /// The check could not be made (exit 1).
    Error,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Refused => "refused",
            Verdict::Error => "error",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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
    pub verdict: Verdict,
    /// One sentence for the operator.
    pub reason: String,
    /// Why the target cannot be used, as a [`Reason`] (`residency`,
    /// `unavailable`, `credentials` ...); `null` when it passed.
    pub failure: Option<Reason>,
}

impl TargetReport {
    /// The exit code this line alone would give.
    pub fn exit(&self) -> Exit {
        match self.failure {
            None => Exit::Ok,
            Some(reason) => reason.exit(),
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

    /// The error the check ends with, for the audit log: the refused
    /// targets when any is refused, else the targets that could not be
    /// checked; `None` when every target passed.
    pub fn failure(&self) -> Option<Error> {
        let refused: Vec<TargetRefusal> = self
            .targets
            .iter()
            .filter(|t| t.verdict == Verdict::Refused)
            .map(|t| TargetRefusal {
                target: t.target.clone(),
                refusal: Refusal {
                    reported_region: t.reported_region.clone(),
                    reason: t.reason.clone(),
                },
            })
            .collect();
        if !refused.is_empty() {
            return Some(Error::Residency(Refused {
                summary: None,
                targets: refused,
            }));
        }
        let failed: Vec<&TargetReport> = self
            .targets
            .iter()
            .filter(|t| t.verdict == Verdict::Error)
            .collect();
        if failed.is_empty() {
            return None;
        }
        let lines: Vec<String> = failed
            .iter()
            .map(|t| format!("target {}: {}", t.target, t.reason))
            .collect();
        let reason = Reason::of_unusable_targets(failed.iter().filter_map(|t| t.failure));
        Some(Error::because(reason, lines.join("; ")))
    }
}

/// Checks the core's signing key and every target of its zone, concurrently.
/// A check that does not pass is recorded as a failed run in `audit`; a
/// signing key that restore would not accept is a config error (exit 2).
pub async fn run(config: &Config, audit: &Arc<AuditLog>) -> crate::Result<CheckReport> {
    let signer = audit
        .failing("check", crate::signing::core_signer(config))
        .await?;
    let zone = config.zone();
    let checks = zone.targets.iter().map(|t| check_target(config, audit, t));
    let targets = futures::future::join_all(checks).await;
    let mut warnings = crate::retention::never_honoured(&zone.retention);
    if signer.is_none() {
        warnings.push(format!(
            "core {} signs no snapshot (no signing key); see docs/operations.md, \"Signing keys\"",
            config.core.core_id
        ));
    }
    let report = CheckReport {
        core: config.core.core_id.clone(),
        zone: zone.id.clone(),
        zone_name: zone.name.clone(),
        volumes: config.core.volumes.len(),
        targets,
        signing: signer.map(|s| s.public_key()),
        warnings,
    };
    if let Some(failure) = report.failure() {
        audit.record_failure("check", &failure).await;
    }
    Ok(report)
}

async fn check_target(config: &Config, audit: &Arc<AuditLog>, target: &Target) -> TargetReport {
    let verdict = residency::verify(config, &S3Connect(config), audit, target).await;
    let (reported_region, verdict, reason, failure) = match verdict {
        residency::Verdict::Passed(w) => {
            let marker = if w.marker_present() {
                "marker names this zone"
            } else {
                "no marker yet"
            };
            (
                Some(w.reported_region().to_string()),
                Verdict::Pass,
                format!("bucket location matches; {marker}"),
                None,
            )
        }
        residency::Verdict::Refused(r) => (
            r.reported_region,
            Verdict::Refused,
            r.reason,
            Some(Reason::Residency),
        ),
        // whatever the store error, the target could not be checked (exit 1)
        residency::Verdict::Unavailable(e) => (
            None,
            Verdict::Error,
            unavailable_reason(&e),
            Some(Reason::of_unusable_targets([e.reason()])),
        ),
    };
    tracing::info!(target = %target.name, %verdict, %reason, "residency check");
    TargetReport {
        target: target.name.clone(),
        endpoint: target.endpoint.clone(),
        bucket: target.bucket.clone(),
        region: target.region.clone(),
        reported_region,
        verdict,
        reason,
        failure,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn line(target: &str, verdict: Verdict, failure: Option<Reason>) -> TargetReport {
        TargetReport {
            target: target.into(),
            endpoint: "http://127.0.0.1:3900".into(),
            bucket: "b".into(),
            region: "ch-dk-2".into(),
            reported_region: None,
            verdict,
            reason: format!("why {target}"),
            failure,
        }
    }

    fn report(targets: Vec<TargetReport>) -> CheckReport {
        CheckReport {
            core: "core-ch-1".into(),
            zone: "ch".into(),
            zone_name: "Switzerland".into(),
            volumes: 1,
            targets,
            signing: None,
            warnings: Vec::new(),
        }
    }

    #[test]
    fn verdicts_are_the_strings_of_the_json_report() {
        let json =
            serde_json::to_value(line("a", Verdict::Refused, Some(Reason::Residency))).unwrap();
        assert_eq!(json["verdict"], "refused");
        assert_eq!(json["failure"], "residency");
        let json = serde_json::to_value(line("a", Verdict::Pass, None)).unwrap();
        assert_eq!(json["verdict"], "pass");
        assert!(json["failure"].is_null());
        let json = serde_json::to_value(Verdict::Error).unwrap();
        assert_eq!(json, "error");
        assert_eq!(Verdict::Error.to_string(), "error");
    }

    #[test]
    fn the_failure_of_a_check_has_the_reason_of_its_verdicts() {
        let pass = || line("p", Verdict::Pass, None);
        assert!(report(vec![pass()]).failure().is_none());
        assert_eq!(report(vec![pass()]).exit(), Exit::Ok);

        let r = report(vec![
            pass(),
            line("a", Verdict::Error, Some(Reason::Unavailable)),
            line("b", Verdict::Refused, Some(Reason::Residency)),
        ]);
        assert_eq!(r.exit(), Exit::Refused);
        let e = r.failure().unwrap();
        assert_eq!(e.reason(), Reason::Residency);
        assert_eq!(e.to_string(), "target b: why b");

        let r = report(vec![
            line("a", Verdict::Error, Some(Reason::Credentials)),
            line("b", Verdict::Error, Some(Reason::Credentials)),
        ]);
        assert_eq!(r.exit(), Exit::Failure);
        let e = r.failure().unwrap();
        assert_eq!(e.reason(), Reason::Credentials);
        assert_eq!(e.to_string(), "target a: why a; target b: why b");

        let r = report(vec![
            line("a", Verdict::Error, Some(Reason::Credentials)),
            line("b", Verdict::Error, Some(Reason::Unavailable)),
        ]);
        assert_eq!(r.failure().unwrap().reason(), Reason::Unavailable);
    }
}
