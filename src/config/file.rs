//! Reading a TOML configuration file into typed structs, with errors that
//! point at line:column.

use std::path::Path;

use serde::de::DeserializeOwned;

use super::ConfigError;

/// Reads `path` and deserializes it. Missing, unreadable, non-UTF-8 and
/// malformed files all become a [`ConfigError`] naming the file and, where
/// there is one, the line and column.
pub fn read_toml<T: DeserializeOwned>(path: &Path, what: &str) -> Result<(T, String), ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| {
        let problem = match e.kind() {
            std::io::ErrorKind::NotFound => format!("{what} not found"),
            std::io::ErrorKind::PermissionDenied => {
                format!("{what} cannot be read: permission denied")
            }
            _ => format!("{what} cannot be read: {e}"),
        };
        ConfigError::file(path, problem)
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let text = String::from_utf8_lossy(&e.into_bytes()[..valid]).into_owned();
        ConfigError::at_offset(
            path,
            &text,
            valid,
            format!("{what} is not UTF-8 text (binary data?)"),
        )
        .help("a zonevault configuration file is TOML text; see config/ for examples")
    })?;
    let value = toml::from_str::<T>(&text).map_err(|e| toml_error(path, &text, &e))?;
    Ok((value, text))
}

fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let problem = e.message().trim().to_string();
    let help = if problem.starts_with("unknown field") {
        "remove or correct the field; the accepted fields are listed above"
    } else if problem.starts_with("missing field") {
        "add the field; config/ has a commented example of every file"
    } else {
        "see config/ for commented examples of both files"
    };
    match e.span() {
        Some(span) => ConfigError::at_offset(path, text, span.start, problem),
        None => ConfigError::file(path, problem),
    }
    .help(help)
}
