//! S3 credentials per target: from environment variables, from files that
//! only the owner can read, or (when a target has no entry) from the standard
//! AWS chain. Secret values never reach a log line or an error message.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;

/// `[credentials.<target>]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CredentialsFile {
    access_key_id_env: Option<String>,
    access_key_id_file: Option<PathBuf>,
    secret_access_key_env: Option<String>,
    secret_access_key_file: Option<PathBuf>,
}

/// A secret string. Its `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret value, for handing to the S3 client only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Static credentials for one target.
#[derive(Debug, Clone)]
pub struct StaticCredentials {
    pub access_key_id: Secret,
    pub secret_access_key: Secret,
}

/// Resolves `[credentials.<target>]`: reads the environment variables or files.
/// `base` is the directory that relative file paths are relative to.
pub(super) fn resolve(
    config: &Path,
    base: &Path,
    target: &str,
    c: CredentialsFile,
) -> Result<StaticCredentials, ConfigError> {
    let access_key_id = one_secret(
        config,
        base,
        target,
        "access_key_id",
        c.access_key_id_env,
        c.access_key_id_file,
    )?;
    let secret_access_key = one_secret(
        config,
        base,
        target,
        "secret_access_key",
        c.secret_access_key_env,
        c.secret_access_key_file,
    )?;
    Ok(StaticCredentials {
        access_key_id,
        secret_access_key,
    })
}

fn one_secret(
    config: &Path,
    base: &Path,
    target: &str,
    name: &str,
    env: Option<String>,
    file: Option<PathBuf>,
) -> Result<Secret, ConfigError> {
    let field = |suffix: &str| format!("credentials.{target}.{name}_{suffix}");
    match (env, file) {
        (Some(_), Some(_)) => Err(ConfigError::field(
            config,
            format!("credentials.{target}"),
            format!("both {name}_env and {name}_file are set"),
        )
        .help("keep one of the two")),
        (None, None) => Err(ConfigError::field(
            config,
            format!("credentials.{target}"),
            format!("neither {name}_env nor {name}_file is set"),
        )
        .help(format!(
            "set one of them, or remove [credentials.{target}] to use the standard AWS credential chain"
        ))),
        (Some(var), None) if var.trim().is_empty() => Err(ConfigError::field(
            config,
            field("env"),
            "names no environment variable (it is empty)",
        )),
        (Some(var), None) => match std::env::var(&var) {
            Ok(v) if !v.trim().is_empty() => Ok(Secret(v.trim().to_string())),
            Ok(_) => Err(ConfigError::field(
                config,
                field("env"),
                format!("environment variable {var} is empty"),
            )),
            Err(std::env::VarError::NotPresent) => Err(ConfigError::field(
                config,
                field("env"),
                format!("environment variable {var} is not set"),
            )
            .help("export it in the service's environment (e.g. an EnvironmentFile= of the systemd unit)")),
            Err(std::env::VarError::NotUnicode(_)) => Err(ConfigError::field(
                config,
                field("env"),
                format!("environment variable {var} is not valid UTF-8"),
            )),
        },
        (None, Some(file)) => read_secret_file(config, &field("file"), &base.join(&file)),
    }
}

/// The largest secret file read: an access key id or a secret access key is
/// tens of bytes; a bigger file is the wrong file.
pub const MAX_SECRET_BYTES: u64 = 4096;

/// Reads a secret file: a regular file, private to its owner, at most
/// [`MAX_SECRET_BYTES`]. It is opened without waiting (`O_NONBLOCK`: a FIFO
/// or a device never blocks the open) and checked on the opened descriptor,
/// so what is read is what was checked. Symbolic links are followed (secret
/// stores such as systemd credentials or Kubernetes use them): the checks
/// apply to the file they lead to.
fn read_secret_file(config: &Path, field: &str, path: &Path) -> Result<Secret, ConfigError> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

    let shown = path.display();
    let err = |problem: String| ConfigError::field(config, field, problem);
    let cannot = |e: std::io::Error| err(format!("cannot read {shown}: {e}"));
    let mut f = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(cannot)?;
    let meta = f.metadata().map_err(cannot)?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO (named pipe)"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else {
            "of an unknown kind"
        };
        return Err(err(format!("{shown} is {what}, not a regular file"))
            .help("a secret file is a regular file that holds only the key, private to its owner (chmod 600)"));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(format!(
            "{shown} is readable by group or others (mode {mode:04o})"
        ))
        .help(format!(
            "a secret file must be private to its owner: chmod 600 {shown}"
        )));
    }
    let too_big = |len: u64| {
        err(format!(
            "{shown} is {len} bytes; a secret file holds one key and is at most {MAX_SECRET_BYTES} bytes"
        ))
        .help("name the file that holds only this key")
    };
    if meta.len() > MAX_SECRET_BYTES {
        return Err(too_big(meta.len()));
    }
    let mut bytes = Vec::new();
    (&mut f)
        .take(MAX_SECRET_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_SECRET_BYTES {
        return Err(too_big(bytes.len() as u64));
    }
    let text = String::from_utf8(bytes).map_err(|_| err(format!("{shown} is not UTF-8 text")))?;
    let value = text.trim();
    if value.is_empty() {
        return Err(err(format!("{shown} is empty")));
    }
    Ok(Secret(value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let s = Secret("hunter2".into());
        assert_eq!(format!("{s:?}"), "***");
        let c = StaticCredentials {
            access_key_id: Secret("GKabc".into()),
            secret_access_key: Secret("hunter2".into()),
        };
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("GKabc"),
            "{shown}"
        );
    }
}
