//! Running the commands a config names: volume hooks (`before`, `after`) and
//! the dump command of a `layout = "command"` volume.
//!
//! A command is an argv, never a shell line. It runs in a process group of
//! its own with stdin closed and a timeout; its stderr (and a hook's stdout)
//! is kept as a tail of [`TAIL`] bytes for messages. On timeout the whole
//! group is killed (SIGKILL); once the command exits, what it left running
//! in its group is killed too, so a run never leaves a process behind. The
//! command also dies if zonevault dies (`PR_SET_PDEATHSIG`). A command given
//! a stop token (the daemon's SIGTERM) is killed the same way when the token
//! is cancelled; `after` hooks get none, since they undo what `before` did.

use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Bytes of a command's stderr (or stdout) kept for messages.
pub const TAIL: usize = 2048;

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Exited with this code.
    Exited(i32),
    /// Killed by this signal (not by zonevault).
    Signalled(i32),
    /// Ran past its timeout: zonevault killed its process group.
    TimedOut(Duration),
    /// zonevault was told to stop (SIGTERM) and killed its process group.
    Stopped,
}

impl Status {
    pub fn success(&self) -> bool {
        *self == Status::Exited(0)
    }

    /// `exit 0`, `exit 3`, `signal 9`, `timeout`: the audit record's `status`.
    pub fn code(&self) -> String {
        match self {
            Status::Exited(c) => format!("exit {c}"),
            Status::Signalled(s) => format!("signal {s}"),
            Status::TimedOut(_) => "timeout".into(),
            Status::Stopped => "stopped".into(),
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Exited(c) => write!(f, "exited with status {c}"),
            Status::Signalled(s) => write!(f, "was killed by signal {s}"),
            Status::TimedOut(t) => write!(
                f,
                "timed out after {} (killed with its process group)",
                humantime::format_duration(*t)
            ),
            Status::Stopped => write!(
                f,
                "was stopped: zonevault is shutting down (killed with its process group)"
            ),
        }
    }
}

/// What running a command gave.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: Status,
    /// The last [`TAIL`] bytes of stderr, as text.
    pub stderr: String,
    /// The last [`TAIL`] bytes of stdout, when stdout was not streamed elsewhere.
    pub stdout: String,
    pub elapsed: Duration,
}

impl Outcome {
    /// `"… exited with status 3; stderr: boom"`: for messages.
    pub fn describe(&self, what: &str) -> String {
        let mut s = format!("{what} {}", self.status);
        let stderr = self.stderr.trim();
        if !stderr.is_empty() {
            s.push_str(&format!("; stderr (last {TAIL} bytes): {stderr}"));
        }
        s
    }
}

/// One command to run.
#[derive(Debug, Clone)]
pub struct Spec<'a> {
    pub argv: &'a [String],
    pub env: Vec<(&'static str, String)>,
    pub timeout: Duration,
    /// Killed when this is cancelled (`None`: runs to its end or timeout).
    pub stop: Option<CancellationToken>,
}

/// Runs `spec`, writing its stdout to `stdout` (or keeping a tail of it when
/// `None`). An `Err` is a command that could not be started or whose stdout
/// could not be written (it is killed then); how it ended otherwise is in
/// the [`Outcome`].
pub fn run(spec: &Spec<'_>, stdout: Option<&mut dyn Write>) -> io::Result<Outcome> {
    let started = Instant::now();
    let Some((program, args)) = spec.argv.split_first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty command"));
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start {program:?}: {e}")))?;
    let pgid = child.id() as libc::pid_t;
    let mut child_stdout = child.stdout.take().expect("piped");
    let mut child_stderr = child.stderr.take().expect("piped");
    let stderr_reader = std::thread::spawn(move || {
        let mut tail = Tail::default();
        let _ = io::copy(&mut child_stderr, &mut tail);
        tail.text()
    });
    // The watchdog: kills the group at the timeout or when told to stop,
    // whichever comes first; it looks at the stop token a few times a second.
    let ended = Arc::new(AtomicU8::new(RUNNING));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = {
        let (ended, stop) = (ended.clone(), spec.stop.clone());
        // a timeout past what an Instant holds is no timeout
        let deadline = started.checked_add(spec.timeout);
        std::thread::spawn(move || {
            loop {
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    ended.store(TIMED_OUT, Ordering::SeqCst);
                    break;
                }
                if stop.as_ref().is_some_and(CancellationToken::is_cancelled) {
                    ended.store(STOPPED, Ordering::SeqCst);
                    break;
                }
                let wait = deadline.map_or(STOP_POLL, |d| (d - now).min(STOP_POLL));
                match done_rx.recv_timeout(wait) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                    _ => return,
                }
            }
            kill_group(pgid);
        })
    };
    let mut stdout_tail = Tail::default();
    let copied = match stdout {
        Some(w) => copy(&mut child_stdout, w),
        None => copy(&mut child_stdout, &mut stdout_tail),
    };
    if copied.is_err() {
        kill_group(pgid);
    }
    drop(child_stdout);
    // Wait for the exit without reaping: the group id cannot be reused until
    // the leader is reaped, so killing the group below hits only its processes.
    wait_exited(pgid);
    let _ = done_tx.send(());
    let _ = watchdog.join();
    kill_group(pgid);
    let status = child.wait()?;
    let stderr = stderr_reader.join().unwrap_or_default();
    copied?;
    let status = match ended.load(Ordering::SeqCst) {
        TIMED_OUT => Status::TimedOut(spec.timeout),
        STOPPED => Status::Stopped,
        _ => exit_status(status),
    };
    Ok(Outcome {
        status,
        stderr,
        stdout: stdout_tail.text(),
        elapsed: started.elapsed(),
    })
}

/// How often the watchdog looks at a stop token.
const STOP_POLL: Duration = Duration::from_millis(100);
const RUNNING: u8 = 0;
const TIMED_OUT: u8 = 1;
const STOPPED: u8 = 2;

fn exit_status(status: std::process::ExitStatus) -> Status {
    if let Some(code) = status.code() {
        Status::Exited(code)
    } else {
        Status::Signalled(status.signal().unwrap_or(0))
    }
}

fn copy(r: &mut impl Read, w: &mut dyn Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
        total += n as u64;
    }
}

fn kill_group(pgid: libc::pid_t) {
    // SAFETY: a plain syscall; ESRCH (group gone) is fine.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// Blocks until `pid` has exited, leaving it unreaped.
fn wait_exited(pid: libc::pid_t) {
    loop {
        // SAFETY: waitid writes into the zeroed siginfo we own.
        let r = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// The last [`TAIL`] bytes written to it.
#[derive(Default)]
struct Tail {
    buf: Vec<u8>,
}

impl Tail {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }
}

impl Write for Tail {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() > TAIL {
            let cut = self.buf.len() - TAIL;
            self.buf.drain(..cut);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn spec(a: &[String], secs: u64) -> Spec<'_> {
        Spec {
            argv: a,
            env: vec![("ZONEVAULT_PHASE", "before".into())],
            timeout: Duration::from_secs(secs),
            stop: None,
        }
    }

    #[test]
    fn status_env_and_tails() {
        let a = argv(&[
            "sh",
            "-c",
            "echo out $ZONEVAULT_PHASE; echo boom >&2; exit 3",
        ]);
        let o = run(&spec(&a, 10), None).unwrap();
        assert_eq!(o.status, Status::Exited(3));
        assert_eq!(o.stdout.trim(), "out before");
        assert!(o.describe("x").contains("boom"), "{}", o.describe("x"));
    }

    #[test]
    fn stdout_streams_and_signals_show() {
        let a = argv(&["sh", "-c", "printf abc; kill -9 $$"]);
        let mut out = Vec::new();
        let o = run(&spec(&a, 10), Some(&mut out)).unwrap();
        assert_eq!(out, b"abc");
        assert_eq!(o.status, Status::Signalled(9));
    }

    #[test]
    fn a_timeout_kills_the_group() {
        let a = argv(&["sh", "-c", "sleep 1000 & sleep 1000"]);
        let o = run(
            &Spec {
                timeout: Duration::from_millis(300),
                ..spec(&a, 0)
            },
            None,
        )
        .unwrap();
        assert!(matches!(o.status, Status::TimedOut(_)));
        assert!(o.elapsed < Duration::from_secs(5));
    }

    #[test]
    fn a_stop_kills_the_group_and_says_so() {
        let a = argv(&["sh", "-c", "sleep 1000 & sleep 1000"]);
        let stop = CancellationToken::new();
        let later = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            later.cancel();
        });
        let o = run(
            &Spec {
                stop: Some(stop),
                ..spec(&a, 100)
            },
            None,
        )
        .unwrap();
        assert_eq!(o.status, Status::Stopped);
        assert_eq!(o.status.code(), "stopped");
        assert!(o.elapsed < Duration::from_secs(5), "{:?}", o.elapsed);
    }

    #[test]
    fn the_tail_is_bounded() {
        let a = argv(&[
            "sh",
            "-c",
            "head -c 100000 /dev/zero | tr '\\0' x >&2; echo END >&2",
        ]);
        let o = run(&spec(&a, 10), None).unwrap();
        assert!(o.stderr.len() <= TAIL);
        assert!(o.stderr.ends_with("END\n"));
    }
}
