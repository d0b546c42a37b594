//! The zone's targets as the commands need them: stores to read from, and
//! writable targets that passed the residency gate.

use std::sync::Arc;

use crate::audit::AuditLog;
use crate::config::{Config, Target};
use crate::error::{Error, Reason, Refused, TargetRefusal};
use crate::residency::{self, Verdict, Writable};
use crate::storage::s3::{S3Connect, S3Store};

/// A client per target of the core's zone, in zone-map order.
pub async fn open(config: &Config) -> Vec<(Target, S3Store)> {
    let zone = config.zone();
    let stores = zone
        .targets
        .iter()
        .map(|t| S3Store::connect(t, config.credentials(&t.name)));
    let stores = futures::future::join_all(stores).await;
    zone.targets.iter().cloned().zip(stores).collect()
}

/// Every target of the zone, checked. Any refusal is an [`Error::Residency`]
/// (exit 3) and any target that cannot be used a failure of reason
/// `unavailable` (`credentials` when every such target refused the
/// credentials; exit 1): a run writes to all of the zone's targets or to
/// none. Every verdict is in `audit`.
pub async fn writable(
    config: &Config,
    audit: &Arc<AuditLog>,
) -> Result<Vec<Writable<S3Store>>, Error> {
    let connect = S3Connect(config);
    let verdicts = futures::future::join_all(config.zone().targets.iter().map(|t| {
        let connect = &connect;
        async move { (residency::verify(config, connect, audit, t).await, t) }
    }))
    .await;
    let mut writable = Vec::new();
    let mut refused = Vec::new();
    let mut failed = Vec::new();
    for (verdict, target) in verdicts {
        match verdict {
            Verdict::Passed(w) => writable.push(w),
            Verdict::Refused(refusal) => refused.push(TargetRefusal {
                target: target.name.clone(),
                refusal,
            }),
            Verdict::Unavailable(e) => failed.push((format!("target {}: {e}", target.name), e)),
        }
    }
    if !refused.is_empty() {
        return Err(Error::Residency(Refused {
            summary: Some("residency check refused, nothing written".into()),
            targets: refused,
        }));
    }
    if !failed.is_empty() {
        let reason = Reason::of_unusable_targets(failed.iter().map(|(_, e)| e.reason()));
        let failed: Vec<String> = failed.into_iter().map(|(line, _)| line).collect();
        return Err(Error::because(
            reason,
            format!(
                "cannot use every target of zone {}: {}",
                config.zone().id,
                failed.join("; ")
            ),
        ));
    }
    Ok(writable)
}
