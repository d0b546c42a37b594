//! Reading a TOML configuration file into typed structs, with errors that
//! point at line:column.

use std::path::Path;

use serde::de::DeserializeOwned;

use super::ConfigError;

/// The largest configuration file zonevault reads (16 MiB: a zone map of
/// many thousands of cores fits easily).
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Reads `path` and deserializes it. Missing, unreadable, non-UTF-8 and
/// malformed files all become a [`ConfigError`] naming the file and, where
/// there is one, the line and column.
pub fn read_toml<T: DeserializeOwned>(path: &Path, what: &str) -> Result<(T, String), ConfigError> {
    // A device or FIFO would never end (or never answer): only plain files,
    // and only of a size a configuration can have.
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.is_dir() {
            return Err(ConfigError::file(
                path,
                format!("{what} cannot be read: it is a directory"),
            ));
        }
        if !meta.is_file() {
            return Err(ConfigError::file(
                path,
                format!("{what} is not a regular file"),
            ));
        }
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::file(
                path,
                format!(
                    "{what} is {} bytes; a configuration file is at most {MAX_CONFIG_BYTES}",
                    meta.len()
                ),
            ));
        }
    }
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
        .help("a zonevault configuration file is TOML text; docs/configuration.md describes it")
    })?;
    let value = toml::from_str::<T>(&text).map_err(|e| toml_error(path, &text, what, &e))?;
    Ok((value, text))
}

fn toml_error(path: &Path, text: &str, what: &str, e: &toml::de::Error) -> ConfigError {
    let problem = e.message().trim().to_string();
    let help = if what == "core config"
        && (problem.starts_with("unknown field `version`")
            || problem.starts_with("unknown field `zones`"))
    {
        "this looks like a zone map: --config takes the core config (core.toml), which names the zone map in zone_map"
    } else if what == "zone map" && problem.starts_with("unknown field `core_id`") {
        "this looks like a core config: zone_map must name the zone map (zonemap.toml)"
    } else if problem.starts_with("unknown field") {
        "remove or correct the field; the accepted fields are listed above"
    } else if problem.starts_with("missing field") {
        "add the field; docs/configuration.md describes every field"
    } else {
        "docs/configuration.md describes every field"
    };
    match e.span() {
        Some(span) => ConfigError::at_offset(path, text, span.start, problem),
        None => ConfigError::file(path, problem),
    }
    .help(help)
}
