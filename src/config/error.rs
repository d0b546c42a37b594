//! Configuration errors: one message that names the file, the place in it
//! (line:column, or the field path) and what to do.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where in a file a problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// The whole file (it is missing, unreadable, not text ...).
    File,
    /// A position in the text, both 1-based.
    LineCol(usize, usize),
    /// A field path such as `zones.ch.targets[1].region`.
    Field(String),
}

/// A configuration file that cannot be used. Ends the process with exit code 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the problem is in.
    pub file: PathBuf,
    /// Where in the file.
    pub place: Place,
    /// What is wrong.
    pub problem: String,
    /// What to do about it, when there is something more useful to say than
    /// "fix the value".
    pub help: Option<String>,
}

impl ConfigError {
    /// A problem with the file as a whole.
    pub fn file(file: &Path, problem: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            place: Place::File,
            problem: problem.into(),
            help: None,
        }
    }

    /// A problem with one field.
    pub fn field(file: &Path, field: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            place: Place::Field(field.into()),
            problem: problem.into(),
            help: None,
        }
    }

    /// A problem at a byte offset of `text` (the file's contents).
    pub fn at_offset(file: &Path, text: &str, offset: usize, problem: impl Into<String>) -> Self {
        let (line, col) = line_col(text, offset);
        ConfigError {
            file: file.to_path_buf(),
            place: Place::LineCol(line, col),
            problem: problem.into(),
            help: None,
        }
    }

    /// Adds the advice on what to do.
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        match &self.place {
            Place::File => write!(f, "{file}: {}", self.problem)?,
            Place::LineCol(line, col) => write!(f, "{file}:{line}:{col}: {}", self.problem)?,
            Place::Field(path) => write!(f, "{file}: {path}: {}", self.problem)?,
        }
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = text[line_start..offset].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        // 'é' is two bytes but one column
        assert_eq!(line_col(text, 9), (2, 3));
        assert_eq!(line_col(text, 1000), (3, 1));
    }

    #[test]
    fn display_names_file_place_and_help() {
        let e = ConfigError::field(Path::new("/etc/z.toml"), "zones.ch.regions", "is empty")
            .help("list the bucket locations of the zone");
        assert_eq!(
            e.to_string(),
            "/etc/z.toml: zones.ch.regions: is empty\n  help: list the bucket locations of the zone"
        );
    }
}
