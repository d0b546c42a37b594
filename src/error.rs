//! The error type of the library and the exit codes that the binary derives from it.
//!
//! DESIGN.md fixes the exit codes: 0 ok, 1 failure, 2 configuration or usage
//! error, 3 residency refused. Every error knows which of these it is, so the
//! binary never has to guess from a message.

use std::fmt;

use crate::config::ConfigError;

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
    Residency(String),
    /// Anything else that made the run fail (exit 1). The chain of causes is
    /// printed on one line, outermost first.
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

impl Error {
    /// The exit code that this error ends the process with.
    pub fn exit(&self) -> Exit {
        match self {
            Error::Config(_) | Error::Usage(_) => Exit::Usage,
            Error::Residency(_) => Exit::Refused,
            Error::Failed(_) => Exit::Failure,
        }
    }

    /// A failure with a plain message.
    pub fn failed(msg: impl fmt::Display) -> Error {
        Error::Failed(anyhow::anyhow!("{msg}"))
    }
}

/// The result type of the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
