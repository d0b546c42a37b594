//! The error type of the library and the exit codes that the binary derives from it.
//!
//! DESIGN.md fixes the exit codes: 0 ok, 1 failure, 2 configuration or usage
//! error, 3 residency refused. Every error knows its [`Reason`], set where the
//! failure arises, and the exit code follows from it: the binary, the
//! daemon's metrics and the `--json` reports never guess from a message.

use std::fmt;

use crate::config::ConfigError;
use crate::residency::Refusal;
use crate::storage::StoreError;

/// How a command ended, as the process exit code that operators script against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Everything asked for was done.
    Ok = 0,
    /// A run failed (network, storage, I/O, integrity).
    Failure = 1,
    /// The configuration or the command line is wrong; nothing was attempted.
    Usage = 2,
    /// A target failed the residency check; nothing was written to it.
    Refused = 3,
}

impl Exit {
    /// The exit code of the process.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The worse of two outcomes: a refusal outranks a failure, which outranks success.
    pub fn worst(self, other: Exit) -> Exit {
        fn rank(e: Exit) -> u8 {
            match e {
                Exit::Ok => 0,
                Exit::Failure => 1,
                Exit::Usage => 2,
                Exit::Refused => 3,
            }
        }
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

/// Why a command failed, decided where the failure arises and carried as a
/// value (never read back from a message). Metrics, exit codes and the
/// `--json` reports read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// A target failed the residency check, or data belongs to another zone (exit 3).
    Residency,
    /// A target could not be used: unreachable, no such bucket (exit 1).
    Unavailable,
    /// A server refused the credentials (exit 1).
    Credentials,
    /// The configuration or the command line is wrong (exit 2).
    Config,
    /// Stored data failed a check: BLAKE3, signature, decryption (exit 1).
    Integrity,
    /// Anything else (exit 1).
    Other,
}

impl Reason {
    /// Every reason, in the order of its label.
    pub const ALL: [Reason; 6] = [
        Reason::Config,
        Reason::Credentials,
        Reason::Integrity,
        Reason::Other,
        Reason::Residency,
        Reason::Unavailable,
    ];

    /// The reason as it appears in JSON and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Residency => "residency",
            Reason::Unavailable => "unavailable",
            Reason::Credentials => "credentials",
            Reason::Config => "config",
            Reason::Integrity => "integrity",
            Reason::Other => "other",
        }
    }

    /// The exit code a failure of this reason ends the process with.
    pub fn exit(self) -> Exit {
        match self {
            Reason::Residency => Exit::Refused,
            Reason::Config => Exit::Usage,
            Reason::Unavailable | Reason::Credentials | Reason::Integrity | Reason::Other => {
                Exit::Failure
            }
        }
    }

    /// The reason of several failures taken together: `integrity` if any
    /// is, else their common reason, else `other`.
    pub fn of_all(reasons: impl IntoIterator<Item = Reason>) -> Reason {
        let mut common = None;
        for r in reasons {
            if r == Reason::Integrity {
                return r;
            }
            common = match common {
                None => Some(r),
                Some(c) if c == r => Some(c),
                Some(_) => Some(Reason::Other),
            };
        }
        common.unwrap_or(Reason::Other)
    }

    /// The reason of giving up on targets that could not be used, from
    /// theirs: `credentials` when each refused the credentials, else
    /// `unavailable`.
    pub fn of_unusable_targets(reasons: impl IntoIterator<Item = Reason>) -> Reason {
        let mut reasons = reasons.into_iter().peekable();
        if reasons.peek().is_some() && reasons.all(|r| r == Reason::Credentials) {
            Reason::Credentials
        } else {
            Reason::Unavailable
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure whose [`Reason`] is known where it arises. It travels in
/// `anyhow` chains (as the error or as a context) and is found again by
/// type: [`Error::reason`] looks for it, and for [`StoreError`], in the chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub reason: Reason,
    /// One sentence for the operator.
    pub message: String,
}

impl Failure {
    pub fn new(reason: Reason, message: impl fmt::Display) -> Failure {
        Failure {
            reason,
            message: message.to_string(),
        }
    }
}

impl StoreError {
    /// What the operator has to do about it, as a [`Reason`].
    pub fn reason(&self) -> Reason {
        match self {
            StoreError::Unreachable { .. } | StoreError::NoSuchBucket { .. } => Reason::Unavailable,
            StoreError::Credentials { .. } => Reason::Credentials,
            StoreError::WrongRegion { .. } => Reason::Residency,
            StoreError::Exists { .. } | StoreError::Other(_) => Reason::Other,
        }
    }
}

/// One target refused by the residency check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetRefusal {
    /// The target's name.
    pub target: String,
    /// The region the server reported, and the sentence.
    pub refusal: Refusal,
}

/// A residency refusal as a command ends with it (exit 3): the refused
/// targets with what the server reported, or one sentence when the refusal
/// concerns no target (a core or a snapshot of another zone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// What was refused, before the targets: "residency check refused, nothing written".
    pub summary: Option<String>,
    /// Every refused target, in zone-map order.
    pub targets: Vec<TargetRefusal>,
}

impl Refused {
    /// A refusal that concerns no target.
    pub fn sentence(text: impl fmt::Display) -> Refused {
        Refused {
            summary: Some(text.to_string()),
            targets: Vec::new(),
        }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(summary) = &self.summary {
            f.write_str(summary)?;
            if !self.targets.is_empty() {
                f.write_str(": ")?;
            }
        }
        for (i, t) in self.targets.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "target {}: {}", t.target, t.refusal.reason)?;
        }
        Ok(())
    }
}

/// Every error that a command can end with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration file is missing, unreadable or wrong (exit 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The command line asks for something impossible (exit 2).
    #[error("{0}")]
    Usage(String),
    /// A target failed the residency check (exit 3).
    #[error("{0}")]
    Residency(Refused),
    /// Anything else that made the run fail; its [`Reason`] is in the chain
    /// (a [`Failure`] or a [`StoreError`]), else it is `other`. The chain of
    /// causes is printed on one line, outermost first.
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

impl Error {
    /// Why the command failed.
    pub fn reason(&self) -> Reason {
        match self {
            Error::Config(_) | Error::Usage(_) => Reason::Config,
            Error::Residency(_) => Reason::Residency,
            Error::Failed(e) => reason_of(e),
        }
    }

    /// The exit code that this error ends the process with.
    pub fn exit(&self) -> Exit {
        self.reason().exit()
    }

    /// A failure with a plain message (reason `other`).
    pub fn failed(msg: impl fmt::Display) -> Error {
        Error::Failed(anyhow::anyhow!("{msg}"))
    }

    /// A failure with a message and the reason it arose for.
    pub fn because(reason: Reason, msg: impl fmt::Display) -> Error {
        Error::Failed(Failure::new(reason, msg).into())
    }

    /// A residency refusal that concerns no target.
    pub fn refused(sentence: impl fmt::Display) -> Error {
        Error::Residency(Refused::sentence(sentence))
    }
}

/// The reason carried in an `anyhow` chain: the outermost [`Failure`] (a
/// context or an error), else the first typed error that knows its reason,
/// else `other`. Found by type only.
pub fn reason_of(e: &anyhow::Error) -> Reason {
    // contexts added with `.context(Failure)` are found by anyhow's downcast
    if let Some(f) = e.downcast_ref::<Failure>() {
        return f.reason;
    }
    for cause in e.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return f.reason;
        }
        if let Some(s) = cause.downcast_ref::<StoreError>() {
            return s.reason();
        }
        if let Some(inner) = cause.downcast_ref::<Error>() {
            return inner.reason();
        }
        if cause.downcast_ref::<ConfigError>().is_some() {
            return Reason::Config;
        }
    }
    // a StoreError under a context (`.context(..)` on a `Result<_, StoreError>`)
    if let Some(s) = e.downcast_ref::<StoreError>() {
        return s.reason();
    }
    Reason::Other
}

/// The result type of the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    fn store_errors() -> Vec<(StoreError, Reason)> {
        vec![
            (
                StoreError::Unreachable {
                    endpoint: "http://127.0.0.1:1".into(),
                    cause: "Connection refused".into(),
                },
                Reason::Unavailable,
            ),
            (
                StoreError::Credentials {
                    cause: "AccessDenied (HTTP 403)".into(),
                },
                Reason::Credentials,
            ),
            (
                StoreError::NoSuchBucket {
                    endpoint: "http://127.0.0.1:1".into(),
                    bucket: "b".into(),
                },
                Reason::Unavailable,
            ),
            (
                StoreError::WrongRegion {
                    reported: "de-fra-1".into(),
                },
                Reason::Residency,
            ),
            (StoreError::Exists { key: "k".into() }, Reason::Other),
            (StoreError::Other("HTTP 500".into()), Reason::Other),
        ]
    }

    /// A typed error that holds a `StoreError` as its std `source()`.
    #[derive(Debug, thiserror::Error)]
    #[error("uploading a part")]
    struct Wrapped(#[source] StoreError);

    #[test]
    fn every_error_knows_its_reason_and_exit_code() {
        let mut table: Vec<(String, Error, Reason, Exit)> = Vec::new();
        for (e, reason) in store_errors() {
            let exit = reason.exit();
            // as the error of an anyhow chain, under contexts
            let chained = anyhow::Error::from(e.clone())
                .context("reading p/x on target ch-primary")
                .context("backing up volume data");
            table.push((format!("{e:?} in a chain"), chained.into(), reason, exit));
            // as the error of a Result given a context
            let ctx = Err::<(), _>(e.clone())
                .context("reading p/x")
                .context("restoring")
                .unwrap_err();
            table.push((format!("{e:?} under .context"), ctx.into(), reason, exit));
            // as the std source of another error
            let nested = anyhow::Error::new(Wrapped(e.clone())).context("backing up");
            table.push((format!("{e:?} as a source"), nested.into(), reason, exit));
        }
        let refusal = Error::Residency(Refused {
            summary: Some("residency check refused, nothing written".into()),
            targets: vec![TargetRefusal {
                target: "ch-secondary".into(),
                refusal: Refusal {
                    reported_region: Some("de-fra-1".into()),
                    reason: "the server reports the bucket in region de-fra-1, not ch-dk-2".into(),
                },
            }],
        });
        table.push((
            "a refusal".into(),
            refusal,
            Reason::Residency,
            Exit::Refused,
        ));
        table.push((
            "a refusal of another zone's core".into(),
            Error::refused("core x belongs to zone de"),
            Reason::Residency,
            Exit::Refused,
        ));
        table.push((
            "a refusal inside an anyhow chain".into(),
            Error::Failed(anyhow::Error::from(Error::refused("no")).context("running")),
            Reason::Residency,
            Exit::Refused,
        ));
        table.push((
            "a config error".into(),
            Error::Config(ConfigError::file(
                std::path::Path::new("/etc/zonevault/core.toml"),
                "missing",
            )),
            Reason::Config,
            Exit::Usage,
        ));
        table.push((
            "a usage error".into(),
            Error::Usage("no volume named x".into()),
            Reason::Config,
            Exit::Usage,
        ));
        table.push((
            "a BLAKE3 mismatch".into(),
            Error::Failed(
                anyhow::Error::from(Failure::new(Reason::Integrity, "integrity check failed"))
                    .context("object p/u on target ch-primary"),
            ),
            Reason::Integrity,
            Exit::Failure,
        ));
        let damaged = serde_json::from_slice::<serde_json::Value>(b"{")
            .context(Failure::new(Reason::Integrity, "the manifest is damaged"))
            .unwrap_err();
        table.push((
            "an integrity context over a parse error".into(),
            damaged.into(),
            Reason::Integrity,
            Exit::Failure,
        ));
        table.push((
            "targets that cannot be used".into(),
            Error::because(Reason::Unavailable, "target ch-secondary: cannot reach it"),
            Reason::Unavailable,
            Exit::Failure,
        ));
        // the outermost reason wins over a store error further in
        table.push((
            "a failure over a store error".into(),
            Error::Failed(
                anyhow::Error::from(StoreError::Other("HTTP 500".into()))
                    .context(Failure::new(Reason::Integrity, "signature check failed")),
            ),
            Reason::Integrity,
            Exit::Failure,
        ));
        // never by its text
        table.push((
            "a plain failure that reads like an outage".into(),
            Error::failed("cannot use every target of zone ch: residency refused"),
            Reason::Other,
            Exit::Failure,
        ));
        for (what, e, reason, exit) in table {
            assert_eq!(e.reason(), reason, "{what}: {e}");
            assert_eq!(e.exit(), exit, "{what}: {e}");
        }
    }

    #[test]
    fn a_refusal_reads_as_before() {
        let refusal = |target: &str, reason: &str| TargetRefusal {
            target: target.into(),
            refusal: Refusal {
                reported_region: None,
                reason: reason.into(),
            },
        };
        let e = Error::Residency(Refused {
            summary: Some("residency check refused, nothing written".into()),
            targets: vec![refusal("a", "one"), refusal("b", "two")],
        });
        assert_eq!(
            e.to_string(),
            "residency check refused, nothing written: target a: one; target b: two"
        );
        let e = Error::Residency(Refused {
            summary: None,
            targets: vec![refusal("a", "one")],
        });
        assert_eq!(e.to_string(), "target a: one");
        assert_eq!(
            Error::refused("core x: refused").to_string(),
            "core x: refused"
        );
        // the chain of a failure prints as before
        let e = Error::Failed(
            anyhow::Error::from(Failure::new(Reason::Integrity, "BLAKE3 differs"))
                .context("object k"),
        );
        assert_eq!(e.to_string(), "object k: BLAKE3 differs");
    }

    #[test]
    fn reasons_serialize_as_their_labels() {
        for r in Reason::ALL {
            assert_eq!(
                serde_json::to_value(r).unwrap(),
                serde_json::Value::String(r.as_str().into())
            );
        }
        let labels: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            [
                "config",
                "credentials",
                "integrity",
                "other",
                "residency",
                "unavailable"
            ]
        );
    }

    #[test]
    fn reasons_taken_together() {
        use Reason::*;
        assert_eq!(Reason::of_all([Unavailable, Unavailable]), Unavailable);
        assert_eq!(Reason::of_all([Unavailable, Credentials]), Other);
        assert_eq!(Reason::of_all([Unavailable, Integrity]), Integrity);
        assert_eq!(Reason::of_all([]), Other);
        assert_eq!(
            Reason::of_unusable_targets([Credentials, Credentials]),
            Credentials
        );
        assert_eq!(
            Reason::of_unusable_targets([Credentials, Unavailable]),
            Unavailable
        );
        assert_eq!(Reason::of_unusable_targets([Other]), Unavailable);
        assert_eq!(Reason::of_unusable_targets([]), Unavailable);
    }
}
