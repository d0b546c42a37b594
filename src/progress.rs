//! A progress bar on stderr for long interactive work; silent otherwise.

use std::sync::atomic::{AtomicU64, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

/// Progress over a number of units.
pub struct Progress {
    bar: ProgressBar,
    bytes: AtomicU64,
}

impl Progress {
    /// A bar over `units` units when `enabled` and stderr is a terminal.
    pub fn new(enabled: bool, units: u64, verb: &str) -> Progress {
        let visible = enabled && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = if visible {
            ProgressBar::new(units)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} units, {msg} ({elapsed})",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(verb.to_string());
        Progress {
            bar,
            bytes: AtomicU64::new(0),
        }
    }

    /// One unit done with `bytes` of plain data.
    pub fn unit_done(&self, bytes: u64) {
        self.bar.inc(1);
        let total = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.bar.set_message(format!("{} MB", total / 1_000_000));
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
