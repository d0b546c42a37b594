//! `zonevault audit verify | where | show | pull`: questions asked of the
//! audit log, and its rebuilding from the zone's copies.
//!
//! None of these records anything: they read the log (`pull` writes a
//! missing one), so asking does not change the answer.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::audit::query::{self, Filter, Location};
use crate::audit::{chain, log, remote};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::keys;
use crate::lock::RunLock;
use crate::targets;

/// What `audit verify` found when the chain holds.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub log: PathBuf,
    pub records: u64,
    /// With `--remote`: per target, the highest record it holds a copy of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copied: Option<std::collections::BTreeMap<String, u64>>,
}

fn log_path(config: &Config) -> PathBuf {
    config.core.state_dir.join(log::FILE_NAME)
}

fn broken(path: &Path, b: &chain::Break) -> Error {
    Error::failed(format!(
        "audit log {}: line {}: {}",
        path.display(),
        b.line,
        b.what
    ))
}

/// The local log, which must exist: answering "nothing" from a log that is
/// not there would be a wrong answer.
fn existing_log(config: &Config) -> Result<PathBuf> {
    let path = log_path(config);
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => Ok(path),
        Ok(_) => Err(Error::failed(format!(
            "{} is not a file; the audit log must be one",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::failed(format!(
            "there is no audit log at {}; on a fresh machine, `zonevault audit pull --identity FILE` rebuilds it from the zone",
            path.display()
        ))),
        Err(e) => Err(Error::failed(format!(
            "cannot read the audit log {}: {e}",
            path.display()
        ))),
    }
}

/// Checks the local chain, and that it still holds every record copied to
/// the zone as copied; with `identity`, also that it agrees with the copies.
pub async fn verify(config: &Config, identity: Option<&Path>) -> Result<VerifyReport> {
    let path = existing_log(config)?;
    let Some(identity) = identity else {
        let holds = chain::verify_file(&path)?.map_err(|b| broken(&path, &b))?;
        let copied = remote::load_copied(&config.core.state_dir)?;
        if let Some(b) = remote::marks_break(&path, &copied)? {
            return Err(broken(&path, &b));
        }
        return Ok(VerifyReport {
            log: path,
            records: holds.records,
            copied: None,
        });
    };
    let identities = keys::load_identities(identity).map_err(|e| Error::Usage(format!("{e:#}")))?;
    let stores = targets::open(config).await;
    let report = remote::verify(
        &config.core.state_dir,
        &stores,
        &config.core.core_id,
        &identities,
        identity,
    )
    .await?
    .map_err(|b| broken(&path, &b))?;
    Ok(VerifyReport {
        log: path,
        records: report.local,
        copied: Some(report.copied),
    })
}

/// Every live object that holds `user`'s data.
pub fn where_(config: &Config, user: &str) -> Result<Vec<Location>> {
    if user.trim().is_empty() {
        return Err(Error::Usage("--user needs a user id".into()));
    }
    let path = existing_log(config)?;
    warn_if_broken(&path);
    Ok(query::locations(&path, user)?)
}

/// The records that pass `filter`. Unknown event kinds are a usage error.
pub fn show(config: &Config, filter: &Filter) -> Result<Vec<Map<String, Value>>> {
    if let Some(unknown) = filter
        .events
        .iter()
        .find(|e| !crate::audit::Event::KINDS.contains(&e.as_str()))
    {
        return Err(Error::Usage(format!(
            "--event {unknown:?} is not an event kind; the kinds are: {}",
            crate::audit::Event::KINDS.join(", ")
        )));
    }
    let path = existing_log(config)?;
    warn_if_broken(&path);
    Ok(query::records(&path, filter)?)
}

/// Answers from a log whose chain is broken still come, with a warning.
/// (A log that cannot be read is the query's own error.)
fn warn_if_broken(path: &Path) {
    if let Ok(Err(b)) = chain::verify_file(path) {
        tracing::warn!(
            "{}; the answer below comes from a log that is not intact",
            broken(path, &b)
        );
    }
}

/// What `audit pull` did.
#[derive(Debug, Clone, Serialize)]
pub struct PullReport {
    pub log: PathBuf,
    pub records: u64,
}

/// Rebuilds the local log from the zone's copies (see [`remote::pull`]).
pub async fn pull(config: &Config, identity: &Path) -> Result<PullReport> {
    let identities = keys::load_identities(identity).map_err(|e| Error::Usage(format!("{e:#}")))?;
    let state_dir = config.core.state_dir.clone();
    let lock_dir = state_dir.clone();
    let _lock = crate::blocking::run("the run lock", move || RunLock::acquire(&lock_dir)).await??;
    let stores = targets::open(config).await;
    let records = remote::pull(
        &state_dir,
        &stores,
        &config.core.core_id,
        &identities,
        identity,
    )
    .await?;
    Ok(PullReport {
        log: log_path(config),
        records,
    })
}

/// Parses `--since` for [`Filter`]; a usage error names the accepted forms.
pub fn parse_since(text: &str) -> Result<chrono::DateTime<chrono::Utc>> {
    query::parse_since(text, chrono::Utc::now()).ok_or_else(|| {
        Error::Usage(format!(
            "--since {text:?} is not a time: give an RFC 3339 time (2026-11-26T02:30:00Z), a date (2026-11-26) or a duration back from now (36h, 7d)"
        ))
    })
}
