//! A run that writes to the zone's targets (`backup`, `forget`): one at a
//! time per core, through the residency gate, on the record from start to
//! end.
//!
//! [`Session::begin`] takes the run lock, checks every target and the audit
//! log's continuity; [`Session::finish`] records a failure and copies the
//! run's audit records to the targets, whatever the outcome.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::audit::AuditLog;
use crate::audit::remote::{self, CopyOutcome};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::lock::RunLock;
use crate::residency::Writable;
use crate::storage::s3::S3Store;
use crate::targets;

/// The targets of a writing run, and what ends it properly.
pub struct Session<'a> {
    config: &'a Config,
    audit: &'a Arc<AuditLog>,
    command: &'static str,
    targets: Vec<Writable<S3Store>>,
    cancel: CancellationToken,
    _lock: RunLock,
}

impl<'a> Session<'a> {
    /// Locks, checks the targets (any refusal: exit 3, nothing written) and
    /// the audit log's continuity. A failure here is recorded.
    pub async fn begin(
        config: &'a Config,
        audit: &'a Arc<AuditLog>,
        command: &'static str,
        wait: bool,
        cancel: &CancellationToken,
    ) -> Result<Session<'a>> {
        let (lock, targets) = audit
            .failing(command, Self::open(config, audit, wait).await)
            .await?;
        Ok(Session {
            config,
            audit,
            command,
            targets,
            cancel: cancel.clone(),
            _lock: lock,
        })
    }

    async fn open(
        config: &Config,
        audit: &Arc<AuditLog>,
        wait: bool,
    ) -> Result<(RunLock, Vec<Writable<S3Store>>)> {
        let lock_dir = config.core.state_dir.clone();
        let lock =
            crate::blocking::run("the run lock", move || RunLock::take(&lock_dir, wait)).await??;
        let targets = targets::writable(config, audit).await?;
        remote::check_continuity(audit, &config.core.state_dir, &targets).await?;
        Ok((lock, targets))
    }

    /// The zone's targets, all of which passed the gate.
    pub fn targets(&self) -> &[Writable<S3Store>] {
        &self.targets
    }

    /// Ends the run: records its failure, then copies its records to the
    /// targets. A run that succeeded but whose records could not be copied
    /// fails (exit 1), saying that its work is done.
    pub async fn finish<T>(self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            self.audit.record_failure(self.command, e).await;
        }
        let copied = remote::copy(
            self.audit,
            &self.config.core.state_dir,
            &self.targets,
            &self.config.zone().recipients,
            &self.cancel,
        )
        .await;
        if let Ok(CopyOutcome::Stopped) = copied {
            tracing::warn!(
                "stopping: the audit records of this {} wait for the next run to be copied to every target",
                self.command
            );
        }
        match (result, copied) {
            (Ok(done), Ok(_)) => Ok(done),
            (Ok(_), Err(e)) => {
                let e = Error::Failed(e.context(format!(
                    "the {} is done, but its audit records could not be copied to the zone (the next run copies them)",
                    self.command
                )));
                self.audit.record_failure(self.command, &e).await;
                Err(e)
            }
            (Err(e), Ok(_)) => Err(e),
            (Err(e), Err(copy)) => {
                tracing::warn!(error = %format!("{copy:#}"), "the audit records of this failed run could not be copied; the next run copies them");
                Err(e)
            }
        }
    }
}
