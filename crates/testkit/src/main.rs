//! `zv-testkit`: starts a local two-zone Garage fleet for the demo.
//!
//!     zv-testkit fleet DIR [--one-target]  start the fleet in DIR, write its config; servers keep running
//!     zv-testkit fixture DIR USERS [KB]    write a Pryv-like volume of USERS users (~KB kB each, default 1000)
//!     zv-testkit delay-proxy PORT TO MS    forward 127.0.0.1:PORT to TO (host:port), MS ms late each way

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
        [cmd, port, to, ms] if cmd == "delay-proxy" => {
            match (port.parse::<u16>(), to.parse(), ms.parse::<u64>()) {
                (Ok(port), Ok(to), Ok(ms)) => match delay_proxy(port, to, ms) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        ExitCode::FAILURE
                    }
                },
                _ => {
                    eprintln!("usage: zv-testkit delay-proxy PORT HOST:PORT MS");
                    ExitCode::from(2)
                }
            }
        }
        _ => {
            eprintln!(
                "usage: zv-testkit fleet DIR [--one-target] | zv-testkit fixture DIR USERS [KB] | zv-testkit delay-proxy PORT HOST:PORT MS"
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

fn delay_proxy(port: u16, to: std::net::SocketAddr, ms: u64) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        zonevault_testkit::delay::serve(listener, to, std::time::Duration::from_millis(ms)).await;
        Ok(())
    })
}
