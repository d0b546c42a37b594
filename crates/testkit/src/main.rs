//! `zv-testkit`: starts a local two-zone Garage fleet for the demo.
//!
//!     zv-testkit fleet DIR [--one-target]  start the fleet in DIR, write its config; servers keep running
//!     zv-testkit fixture DIR USERS [KB]    write a Pryv-like volume of USERS users (~KB kB each, default 1000)

use std::path::PathBuf;
use std::process::ExitCode;

use zonevault_testkit::Fleet;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd, dir, flags @ ..] if cmd == "fleet" && flags.iter().all(|f| f == "--one-target") => {
            match fleet(PathBuf::from(dir), !flags.is_empty()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        [cmd, dir, users, rest @ ..] if cmd == "fixture" && rest.len() <= 1 => {
            let users = users.parse::<usize>();
            let kb = rest.first().map_or(Ok(1000), |k| k.parse::<usize>());
            match (users, kb) {
                (Ok(users), Ok(kb)) => {
                    let spec = zonevault_testkit::fixture::Spec::new(users, kb * 1000);
                    match zonevault_testkit::fixture::write_pryv_volume(
                        std::path::Path::new(dir),
                        &spec,
                    ) {
                        Ok(ids) => {
                            println!("wrote {} users (~{} kB each) to {dir}", ids.len(), kb);
                            ExitCode::SUCCESS
                        }
                        Err(e) => {
                            eprintln!("error: {e:#}");
                            ExitCode::FAILURE
                        }
                    }
                }
                _ => {
                    eprintln!("usage: zv-testkit fixture DIR USERS [KB]");
                    ExitCode::from(2)
                }
            }
        }
        _ => {
            eprintln!(
                "usage: zv-testkit fleet DIR [--one-target] | zv-testkit fixture DIR USERS [KB]"
            );
            ExitCode::from(2)
        }
    }
}

fn fleet(dir: PathBuf, one_target: bool) -> anyhow::Result<()> {
    let mut fleet = Fleet::start_detached(&dir)?;
    if one_target {
        // zone ch backs up to ch-primary only (benchmarks compare with one restic repository)
        fleet.zone_mut("ch").targets.truncate(1);
    }
    let core = fleet.write_configs()?;
    let mut stop = String::from(
        "#!/bin/sh\n# stops the Garage servers of this demo fleet, by the PIDs they were started with\n",
    );
    for g in &fleet.garages {
        println!(
            "garage {:<9} {}  bucket {}  pid {}",
            g.region,
            g.endpoint,
            g.bucket,
            g.pid()
        );
        stop.push_str(&format!("kill {} 2>/dev/null || true\n", g.pid()));
    }
    let stop_path = fleet.dir.join("stop.sh");
    std::fs::write(&stop_path, stop)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&stop_path, std::fs::Permissions::from_mode(0o755))?;
    println!("core config  {}", core.display());
    println!("stop with    {}", stop_path.display());
    Ok(())
}
