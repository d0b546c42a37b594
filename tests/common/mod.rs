//! Shared test helpers: the zonevault binary and a local Garage fleet.

#![allow(dead_code)]

use std::path::Path;

use assert_cmd::Command;
pub use zonevault_testkit::Fleet;

/// The zonevault binary, with a clean environment for config lookup.
pub fn zonevault() -> Command {
    let mut cmd = Command::cargo_bin("zonevault").expect("zonevault binary");
    cmd.env_remove("ZONEVAULT_CONFIG").env_remove("RUST_LOG");
    cmd
}

/// zonevault with `--config CONFIG`.
pub fn zv(config: &Path) -> Command {
    let mut cmd = zonevault();
    cmd.arg("--config").arg(config);
    cmd
}

/// Starts the two-zone fleet in `dir` and writes its configs. Panics (fails
/// the test) when Garage is missing: these tests never skip.
pub fn fleet(dir: &Path) -> (Fleet, std::path::PathBuf) {
    let fleet = Fleet::start(dir).unwrap_or_else(|e| panic!("starting the Garage fleet: {e:#}"));
    let core = fleet.write_configs().expect("writing the fleet's configs");
    (fleet, core)
}

/// stdout and stderr of a finished command, as text.
pub fn output_text(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
