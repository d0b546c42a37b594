//! `zonevault rewrap`: after a rotation of the zone's keys, the key objects
//! (and erasure ledger entries) of every core of the zone wrapped again to
//! the recipients the zone map now lists.
//!
//! Only those objects are wrapped to the zone's recipients
//! ([`crate::datakeys`]): every unit and manifest written since per-user
//! keys exist is encrypted to a data key, so a rotation rewrites a few
//! hundred bytes per user instead of every backup. Needs an identity the
//! old recipients included; each rewritten object is read back and compared.

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditLog, ObjectKind};
use crate::config::Config;
use crate::datakeys::Identity;
use crate::error::{Error, Result};
use crate::pipeline::{self, OpenError};
use crate::repository::layout;
use crate::residency::{Contents, Writable};
use crate::storage::{ReadBackend, s3::S3Store};

use super::session::Session;

/// What a rewrap did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub zone: String,
    /// Objects wrapped to the current recipients, and read back.
    pub rewrapped: usize,
    /// Objects the identity does not open (already rewrapped, or never
    /// wrapped to it), by key.
    pub not_opened: Vec<String>,
    /// Objects that could not be rewrapped, and why.
    pub failed: Vec<String>,
}

impl Report {
    pub fn failure(&self) -> Option<Error> {
        (!self.failed.is_empty()).then(|| {
            Error::failed(format!(
                "{} object(s) could not be rewrapped: {}",
                self.failed.len(),
                self.failed.join("; ")
            ))
        })
    }
}

/// Rewraps every key object and ledger entry of every core of the zone, on
/// every target.
pub async fn run(
    config: &Config,
    audit: &Arc<AuditLog>,
    identities: Vec<Identity>,
    wait: bool,
) -> Result<Report> {
    let cancel = CancellationToken::new();
    let session = Session::begin(config, audit, "rewrap", wait, &cancel).await?;
    let result = rewrap(config, session.targets(), &identities).await;
    session.finish(result).await
}

async fn rewrap(
    config: &Config,
    targets: &[Writable<S3Store>],
    identities: &[Identity],
) -> Result<Report> {
    let zone = config.zone();
    let mut report = Report {
        zone: zone.id.clone(),
        rewrapped: 0,
        not_opened: Vec::new(),
        failed: Vec::new(),
    };
    for t in targets {
        for core in &zone.cores {
            for (dir, kind) in [
                (layout::keys_dir(core), ObjectKind::Key),
                (layout::erasures_dir(core), ObjectKind::Erasure),
            ] {
                let listed = t.store().list(&t.key(&dir)).await.map_err(|e| {
                    Error::Failed(
                        anyhow::Error::new(e)
                            .context(format!("listing {dir} on target {}", t.target().name)),
                    )
                })?;
                for object in listed {
                    let outcome = one(t, &object.key, kind, identities, &zone.recipients).await;
                    let at = format!("{} on target {}", object.key, t.target().name);
                    match outcome {
                        Ok(true) => report.rewrapped += 1,
                        Ok(false) => report.not_opened.push(at),
                        Err(e) => report.failed.push(format!("{at}: {e:#}")),
                    }
                }
            }
        }
    }
    Ok(report)
}

/// Rewraps one object; `false` when the identity does not open it.
async fn one(
    t: &Writable<S3Store>,
    key: &str,
    kind: ObjectKind,
    identities: &[Identity],
    recipients: &[age::x25519::Recipient],
) -> anyhow::Result<bool> {
    let Some(rel) = t.relative(key) else {
        anyhow::bail!("not under the target's prefix");
    };
    let Some(sealed) = t.store().get(key).await? else {
        anyhow::bail!("vanished while it was rewrapped");
    };
    let plain = match pipeline::decrypt_small(&sealed, identities) {
        Ok(plain) => plain,
        Err(OpenError::NoMatchingKeys) => return Ok(false),
        Err(e) => anyhow::bail!("cannot be opened: {e}"),
    };
    let body = Bytes::from(pipeline::encrypt_small(recipients, &plain)?);
    t.put(&rel, body.clone(), &Contents::of(kind)).await?;
    // read back: what the target holds is what was written
    let back = t.store().get(key).await?;
    if back.as_deref() != Some(&body[..]) {
        anyhow::bail!("the target does not hold what was written");
    }
    Ok(true)
}
