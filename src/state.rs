//! The core's state dir (`state_dir` in core.toml): the run lock, the audit
//! log and what was copied of it. Owner-only, because the log names users.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use anyhow::{Context, Result};

/// Creates the state dir (mode 0700) if it is missing.
pub fn create_dir(state_dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("cannot create the state directory {}", state_dir.display()))
}
