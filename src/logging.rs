//! Logs: `tracing` to stderr, readable by journald.
//!
//! The level comes from `--log-level`, else `RUST_LOG`, else the command's
//! default: `warn` for interactive commands, whose results are their output. Under
//! systemd (`JOURNAL_STREAM` is set) lines carry no timestamp and no colour,
//! because journald adds its own timestamp.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `level` is a filter such as `debug` or
/// `zonevault=debug,aws_sdk_s3=info`.
pub fn init(level: Option<&str>, default: &str) -> Result<(), String> {
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("--log-level {l:?}: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            EnvFilter::new(format!(
                "{default},aws_config=error,aws_smithy_runtime=error,aws_sdk_s3=error"
            ))
        }),
    };
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| Stderr)
        .with_target(false)
        .with_ansi(!journald && std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if journald {
        builder.without_time().init();
    } else {
        builder.init();
    }
    Ok(())
}

/// stderr that drops what it cannot write: a log reader that went away (a
/// closed pipe, a full journal) must not stop a backup, let alone panic it.
struct Stderr;

impl std::io::Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}
