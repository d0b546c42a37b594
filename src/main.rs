//! The `zonevault` binary: a thin command-line layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use zonevault::commands;
use zonevault::config::{Config, DEFAULT_CONFIG_PATH};
use zonevault::{Error, Exit, output};

const EXAMPLES: &str = "\
Examples:
  zonevault keygen --out /root/zone-ch.key      new identity; prints its age1... recipient
  zonevault check                               validate config, check every target's residency
  zonevault --config ./core.toml check --json   the same, for scripts

Exit codes: 0 ok, 1 failure, 2 configuration or usage error, 3 residency refused.";

/// Compliance-aware backups: zone-resident, age-encrypted, audited.
#[derive(Debug, Parser)]
#[command(name = "zonevault", version, about, after_help = EXAMPLES)]
struct Cli {
    /// The core config file.
    #[arg(long, short = 'c', global = true, env = "ZONEVAULT_CONFIG",
          default_value = DEFAULT_CONFIG_PATH, value_name = "FILE")]
    config: PathBuf,

    /// Log filter (error, warn, info, debug, trace, or a tracing directive);
    /// overrides RUST_LOG. Logs go to stderr.
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a new age identity file (mode 0600) and print its recipient.
    Keygen {
        /// Where to write the identity; an existing file is never overwritten.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Validate the configuration and check the residency of every target of
    /// this core's zone. Writes nothing.
    Check {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = zonevault::logging::init(cli.log_level.as_deref(), "warn") {
        eprintln!("error: {e}");
        return ExitCode::from(Exit::Usage.code());
    }
    let exit = match run(cli) {
        Ok(exit) => exit,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit()
        }
    };
    ExitCode::from(exit.code())
}

fn run(cli: Cli) -> Result<Exit, Error> {
    match cli.command {
        Command::Keygen { out } => {
            let recipient = commands::keygen::run(&out)?;
            eprintln!(
                "wrote identity to {} (mode 0600); its recipient:",
                out.display()
            );
            println!("{recipient}");
            Ok(Exit::Ok)
        }
        Command::Check { json } => {
            let config = Config::load(&cli.config)?;
            let report = runtime()?.block_on(commands::check::run(&config));
            if json {
                output::json(&report).map_err(|e| Error::failed(format!("writing stdout: {e}")))?;
            } else {
                print!("{}", output::check(&report));
            }
            let exit = report.exit();
            match exit {
                Exit::Refused => eprintln!(
                    "error: residency refused for {} target(s); nothing will be written there",
                    report
                        .targets
                        .iter()
                        .filter(|t| t.exit() == Exit::Refused)
                        .count()
                ),
                Exit::Failure => eprintln!(
                    "error: {} target(s) could not be checked",
                    report
                        .targets
                        .iter()
                        .filter(|t| t.exit() == Exit::Failure)
                        .count()
                ),
                _ => {}
            }
            Ok(exit)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::failed(format!("cannot start the async runtime: {e}")))
}
