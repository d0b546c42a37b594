//! The `zonevault` binary: a thin command-line layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use zonevault::audit::AuditLog;
use zonevault::commands;
use zonevault::config::{Config, DEFAULT_CONFIG_PATH};
use zonevault::{Error, Exit, output};

const EXAMPLES: &str = "\
Examples:
  zonevault keygen --out /root/zone-ch.key      new identity; prints its age1... recipient
  zonevault check                               validate config, check every target's residency
  zonevault --config ./core.toml check --json   the same, for scripts
  zonevault backup                              one snapshot of every volume now
  zonevault snapshots                           list this core's snapshots
  zonevault restore --snapshot latest --to /srv/restore --identity /root/zone-ch.key
  zonevault restore --snapshot latest --to /tmp/u --identity KEY --user c123456789abc
  zonevault forget --dry-run                    what the zone's retention would forget, and why
  zonevault erase --user c123456789abc --dry-run what erasing that user would shred and delete
  zonevault erase --user c123456789abc --reason 'DPO ticket 42'
  zonevault rewrap --identity /root/zone-ch-old.key  after new recipients in the zone map
  zonevault daemon                              scheduled runs; see systemd/zonevault.service
  zonevault audit where --user c123456789abc    every backup object holding that user's data
  zonevault audit verify --remote --identity KEY

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
        /// Where to write the key; an existing file is never overwritten.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Make a core's snapshot-signing key (minisign format) instead of
        /// an age identity; prints the public key to list in the zone map.
        #[arg(long)]
        signing: bool,
    },
    /// Validate the configuration and check the residency of every target of
    /// this core's zone. Writes nothing.
    Check {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take one snapshot of this core's volumes now, into every target of its zone.
    Backup {
        /// Only this volume (repeatable); default: all.
        #[arg(long = "volume", value_name = "NAME")]
        volumes: Vec<String>,
        /// Units processed at once, 1 to 256 (default 32). Memory and load are
        /// bounded by the [transfer] budget of core.toml (bytes and requests
        /// in flight, upload rate) and the CPU count, whatever this is.
        #[arg(long, value_name = "N", value_parser = jobs_range())]
        jobs: Option<u16>,
        /// Upload parts (8 MiB) in flight per unit, 1 to 32.
        #[arg(long, value_name = "N", default_value_t = 2, value_parser = part_jobs_range())]
        part_jobs: u16,
        /// Upload every unit, even those unchanged since the last snapshot.
        #[arg(long)]
        full: bool,
        /// Fail at once (exit 1, "busy") when another run of this core is in progress.
        #[arg(long)]
        no_wait: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the committed snapshots of this core (or another core of its zone).
    Snapshots {
        /// Another core of the same zone.
        #[arg(long, value_name = "ID")]
        core: Option<String>,
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore a snapshot into a directory (one sub-directory per volume).
    Restore {
        /// Snapshot id, or `latest`.
        #[arg(long, value_name = "ID|latest")]
        snapshot: String,
        /// Where to restore; must be empty unless --force.
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// The age identity file that can decrypt the zone's backups.
        #[arg(long, value_name = "FILE")]
        identity: PathBuf,
        /// Only this user's unit (repeatable).
        #[arg(long = "user", value_name = "ID")]
        users: Vec<String>,
        /// Only this volume (repeatable).
        #[arg(long = "volume", value_name = "NAME")]
        volumes: Vec<String>,
        /// Restore a snapshot of another core of the same zone.
        #[arg(long, value_name = "ID")]
        core: Option<String>,
        /// Restore into a non-empty directory, overwriting files.
        #[arg(long)]
        force: bool,
        /// Refuse a snapshot that is not signed by its core (by default an
        /// unsigned one, made before signing, is restored with a warning).
        #[arg(long)]
        require_signed: bool,
        /// Units restored at once, 1 to 256 (default 32, each one GET in
        /// flight within the [transfer] request budget of core.toml).
        #[arg(long, value_name = "N", value_parser = jobs_range())]
        jobs: Option<u16>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply the zone's retention: forget snapshots no rule keeps, delete
    /// the objects no kept snapshot references.
    Forget {
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Another core of the same zone.
        #[arg(long, value_name = "ID")]
        core: Option<String>,
        /// Fail at once (exit 1, "busy") when another run of this core is in progress.
        #[arg(long)]
        no_wait: bool,
        /// Print the plan and what was done as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Erase users from every backup of this core: shred their data keys,
    /// delete (or zero, in packs) their units on every target, confirm each
    /// by reading back, and record it in the erasure ledger that restores
    /// honour. Run it again to finish an erasure that was interrupted.
    Erase {
        /// The user to erase (repeat for several).
        #[arg(long = "user", value_name = "ID", required = true)]
        users: Vec<String>,
        /// Why, for the record (e.g. a ticket number).
        #[arg(long, value_name = "TEXT", default_value = commands::erase::DEFAULT_REASON)]
        reason: String,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also erase the users from every other core of the zone (a user
        /// may have lived on another core), found in their manifests.
        #[arg(long, requires = "identity")]
        all_cores: bool,
        /// The age identity that decrypts the zone's manifests (--all-cores).
        #[arg(long, value_name = "FILE", requires = "all_cores")]
        identity: Option<PathBuf>,
        /// Fail at once (exit 1, "busy") when another run of this core is in progress.
        #[arg(long)]
        no_wait: bool,
        /// Print what was done as JSON.
        #[arg(long)]
        json: bool,
    },
    /// After a rotation of the zone's keys (new `recipients` in the zone
    /// map): wrap every core's data keys and erasure ledger again to the
    /// new recipients, with an identity of the old ones. Units and
    /// manifests are not rewritten: they are encrypted to the data keys.
    Rewrap {
        /// An age identity that the old recipients included.
        #[arg(long, value_name = "FILE")]
        identity: PathBuf,
        /// Fail at once (exit 1, "busy") when another run of this core is in progress.
        #[arg(long)]
        no_wait: bool,
        /// Print what was done as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run scheduled backups and retention, serve /metrics and /healthz
    /// (systemd: Type=notify). Stops on SIGTERM; SIGHUP reloads the config.
    Daemon {
        /// How long a run in progress may go on after SIGTERM before it is
        /// abandoned (before its commit).
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
        stop_timeout: std::time::Duration,
        /// Up to this much random delay before each scheduled run.
        #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
        jitter: std::time::Duration,
    },
    /// Ask the audit log: verify its chain, where a user's data is, what happened.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chain of the local log; name the first bad line.
    Verify {
        /// Also check that the log agrees with its encrypted copies in the zone.
        #[arg(long, requires = "identity")]
        remote: bool,
        /// The age identity that decrypts the copies (with --remote).
        #[arg(long, value_name = "FILE", requires = "remote")]
        identity: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every object that holds a user's data and has not been deleted.
    Where {
        /// The user id.
        #[arg(long, value_name = "ID")]
        user: String,
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print records, oldest first.
    Show {
        /// Only records since: an RFC 3339 time, a date, or a duration (36h, 7d).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Only this event kind (repeatable), e.g. object_put, residency_refused.
        #[arg(long = "event", value_name = "KIND")]
        events: Vec<String>,
        /// Print the records as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a missing local log from the zone's copies (a fresh machine).
    Pull {
        /// The age identity that decrypts the copies.
        #[arg(long, value_name = "FILE")]
        identity: PathBuf,
    },
}

/// `--jobs`: 0 would do nothing forever, and thousands of units in flight
/// only exhaust memory and file descriptors.
fn jobs_range() -> clap::builder::RangedI64ValueParser<u16> {
    clap::value_parser!(u16).range(1..=commands::backup::MAX_JOBS as i64)
}

/// `--part-jobs`: parts in flight per unit.
fn part_jobs_range() -> clap::builder::RangedI64ValueParser<u16> {
    clap::value_parser!(u16).range(1..=commands::backup::MAX_PART_JOBS as i64)
}

/// glibc's malloc, told to hold less: at most two arenas (it makes up to
/// eight per CPU, one per busy thread, and each keeps what its thread freed),
/// and blocks from 256 KiB up always mapped on their own, so a freed record
/// list or pack buffer goes back to the kernel (the default threshold grows
/// with each such free, after which big blocks stay in the heap). Measured
/// on a backup of 100,000 users: two arenas alone took peak RSS from 206 to
/// 153 MB in the same time; the fixed threshold took a 1 %-changed run from
/// 207 to 177 MB more.
///
/// A restore takes a 1 MiB threshold instead: it streams dozens of
/// responses at once, and HTTP read buffers (up to ~400 KiB) and each
/// unit's 256 KiB read buffer, mapped and zeroed afresh for every read,
/// cost a tenth of its CPU time in page faults (2,000 units, 2 GB: 9.3 →
/// 8.3 CPU-s, peak RSS 110 → 126 MB).
/// Set before any thread starts; an operator's `MALLOC_*` variables win.
fn tune_allocator(command: &Command) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mmap_threshold = match command {
            Command::Restore { .. } => 1 << 20,
            _ => 256 << 10,
        };
        for (param, value, env) in [
            (libc::M_ARENA_MAX, 2, "MALLOC_ARENA_MAX"),
            (
                libc::M_MMAP_THRESHOLD,
                mmap_threshold,
                "MALLOC_MMAP_THRESHOLD_",
            ),
        ] {
            if std::env::var_os(env).is_none() {
                // SAFETY: mallopt only sets a tunable of glibc's allocator; it
                // is called from main before any other thread exists.
                unsafe { libc::mallopt(param, value) };
            }
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = command;
}

fn main() -> ExitCode {
    // clap starts no thread: the allocator is still untouched
    let cli = Cli::parse();
    tune_allocator(&cli.command);
    // The daemon's log is its record in the journal; a command's is for trouble.
    let default_level = if matches!(cli.command, Command::Daemon { .. }) {
        "info"
    } else {
        "warn"
    };
    if let Err(e) = zonevault::logging::init(cli.log_level.as_deref(), default_level) {
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
        Command::Keygen { out, signing } => {
            use commands::keygen::Kind;
            let kind = if signing {
                Kind::Signing
            } else {
                Kind::Identity
            };
            let recipient = commands::keygen::run(&out, kind)?;
            if signing {
                eprintln!(
                    "wrote signing key to {} (mode 0600); list its public key in the zone map under [zones.<zone>.signing_keys] as <core> = \"...\":",
                    out.display()
                );
            } else {
                eprintln!(
                    "wrote identity to {} (mode 0600); its recipient:",
                    out.display()
                );
            }
            print(false, &recipient, |r| format!("{r}\n"))?;
            Ok(Exit::Ok)
        }
        Command::Check { json } => {
            let config = Config::load_live(&cli.config)?;
            let audit = open_audit(&config, "check")?;
            let report = runtime()?.block_on(commands::check::run(&config, &audit))?;
            print(json, &report, output::check)?;
            if let Some(line) = output::check_verdict(&report) {
                eprintln!("error: {line}");
            }
            Ok(report.exit())
        }
        Command::Backup {
            volumes,
            jobs,
            part_jobs,
            full,
            no_wait,
            json,
        } => {
            let config = Config::load_live(&cli.config)?;
            let audit = open_audit(&config, "backup")?;
            let mut options = commands::backup::Options::new();
            options.volumes = volumes;
            options.jobs = jobs.map_or(options.jobs, usize::from);
            options.part_jobs = usize::from(part_jobs);
            options.full = full;
            options.wait = !no_wait;
            options.progress = !json;
            let report = runtime()?.block_on(commands::backup::run(&config, &audit, &options))?;
            print(json, &report, output::backup)?;
            Ok(Exit::Ok)
        }
        Command::Snapshots { core, json } => {
            let config = Config::load(&cli.config)?;
            let rt = runtime()?;
            let core = commands::snapshots::resolve_core(&config, core.as_deref())?;
            let (indexes, ..) = rt.block_on(commands::snapshots::list(&config, &core))?;
            print(json, &indexes, |i| output::snapshots(i))?;
            Ok(Exit::Ok)
        }
        Command::Restore {
            snapshot,
            to,
            identity,
            users,
            volumes,
            core,
            force,
            require_signed,
            jobs,
            json,
        } => {
            let config = Config::load(&cli.config)?;
            let audit = open_audit(&config, "restore")?;
            let options = commands::restore::Options {
                snapshot,
                to,
                identity,
                users,
                volumes,
                core,
                force,
                require_signed,
                jobs: jobs.map_or_else(commands::backup::default_jobs, usize::from),
                progress: !json,
            };
            let report = runtime()?.block_on(commands::restore::run(&config, &audit, &options))?;
            print(json, &report, output::restore)?;
            match report.failure() {
                Some(failure) => Err(failure),
                None => Ok(Exit::Ok),
            }
        }
        Command::Forget {
            dry_run,
            core,
            no_wait,
            json,
        } => {
            let config = Config::load(&cli.config)?;
            let options = commands::forget::Options {
                dry_run,
                core,
                wait: !no_wait,
                ..Default::default()
            };
            let report = if dry_run {
                runtime()?.block_on(commands::forget::plan(&config, &options))?
            } else {
                let audit = open_audit(&config, "forget")?;
                runtime()?.block_on(commands::forget::run(&config, &audit, &options))?
            };
            for w in &report.warnings {
                tracing::warn!("{w}");
            }
            print(json, &report, output::forget)?;
            Ok(Exit::Ok)
        }
        Command::Erase {
            users,
            reason,
            dry_run,
            all_cores: _,
            identity,
            no_wait,
            json,
        } => {
            commands::erase::check_users(&users)?;
            let config = Config::load(&cli.config)?;
            let audit = open_audit(&config, "erase")?;
            let options = commands::erase::Options {
                users,
                reason,
                dry_run,
                wait: !no_wait,
                all_cores: identity,
                cancel: Default::default(),
            };
            let report = runtime()?.block_on(commands::erase::run(&config, &audit, &options))?;
            print(json, &report, output::erase)?;
            match report.failure() {
                Some(failure) => Err(failure),
                None => Ok(Exit::Ok),
            }
        }
        Command::Rewrap {
            identity,
            no_wait,
            json,
        } => {
            let identities = zonevault::keys::load_identities(&identity)
                .map_err(|e| Error::Usage(format!("{e:#}")))?;
            let config = Config::load(&cli.config)?;
            let audit = open_audit(&config, "rewrap")?;
            let report = runtime()?
                .block_on(commands::rewrap::run(&config, &audit, identities, !no_wait))?;
            print(json, &report, output::rewrap)?;
            match report.failure() {
                Some(failure) => Err(failure),
                None => Ok(Exit::Ok),
            }
        }
        Command::Daemon {
            stop_timeout,
            jitter,
        } => {
            let options = zonevault::daemon::Options {
                config_path: cli.config.clone(),
                stop_timeout,
                jitter,
            };
            let rt = runtime()?;
            let result = rt.block_on(async {
                let signals = zonevault::daemon::os_signals()?;
                zonevault::daemon::run(options, signals).await
            });
            // Blocking work of an abandoned run (a lock wait, a file walk)
            // must not hold the exit beyond the stop bound.
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
            result?;
            Ok(Exit::Ok)
        }
        Command::Audit { command } => audit(&Config::load(&cli.config)?, command),
    }
}

fn audit(config: &Config, command: AuditCommand) -> Result<Exit, Error> {
    use commands::audit;
    match command {
        AuditCommand::Verify { identity, json, .. } => {
            let report = runtime()?.block_on(audit::verify(config, identity.as_deref()))?;
            print(json, &report, output::audit_verify)?;
        }
        AuditCommand::Where { user, json } => {
            let locations = audit::where_(config, &user)?;
            print(json, &locations, |l| output::audit_where(&user, l))?;
        }
        AuditCommand::Show {
            since,
            events,
            json,
        } => {
            let filter = zonevault::audit::query::Filter {
                since: since.as_deref().map(audit::parse_since).transpose()?,
                events,
            };
            let records = audit::show(config, &filter)?;
            print(json, &records, |r| output::audit_show(r))?;
        }
        AuditCommand::Pull { identity } => {
            let report = runtime()?.block_on(audit::pull(config, &identity))?;
            eprintln!(
                "rebuilt {} with {} records from the zone's copies; `zonevault audit verify` checks it",
                report.log.display(),
                report.records
            );
        }
    }
    Ok(Exit::Ok)
}

/// Opens the audit log for a command that acts, recording its config.
fn open_audit(config: &Config, command: &str) -> Result<Arc<AuditLog>, Error> {
    AuditLog::start(config, command)
        .map(Arc::new)
        .map_err(|e| Error::Failed(e.context("zonevault records every run in its audit log")))
}

/// Prints a report as JSON or in its human form. A reader that went away
/// (`| head`) is not an error; a full disk is.
fn print<T: serde::Serialize>(
    json: bool,
    report: &T,
    human: impl FnOnce(&T) -> String,
) -> Result<(), Error> {
    use std::io::Write;
    let written = if json {
        output::json(report)
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(human(report).as_bytes())
            .and_then(|()| out.flush())
    };
    match written {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Error::failed(format!("writing stdout: {e}")))
        }
        _ => Ok(()),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::failed(format!("cannot start the async runtime: {e}")))
}
