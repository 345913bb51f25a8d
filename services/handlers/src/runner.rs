//! Running one handler process: payload on stdin, stdout kept as the reply, stderr to the log,
//! a time-out that kills the whole process group.
//!
//! The payload is put whole into an anonymous memory file before the handler starts, and that
//! file is its stdin. A pipe would be fed while the handler runs, so a handler whose service
//! is killed a moment after starting it would read a payload cut short (or none) and take it
//! for the whole: it is better that such a handler never starts than that it runs on half.
//!
//! The handler is executed from the descriptor it was checked through (`fexecve`), never by
//! its path: the path may lead somewhere else by then.

use std::ffi::CString;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cnsprcy::ipc::{MAX_REPLY_BYTES, Outcome};
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::spawn::{ExecArgs, Launch, StartNote, Started};

/// After SIGTERM, how long a timed-out handler gets to exit before its group gets SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(2);
/// After the handler exited, how long its stdout and stderr are still read. A background
/// process it left behind may hold them open forever; what it writes later is not read.
const DRAIN_TIME: Duration = Duration::from_millis(500);
/// The longest stderr line logged whole; the rest of a longer one is cut.
pub const MAX_LOG_LINE: usize = 4096;
/// How often a freshly written script that is still open for writing ("text file busy") is
/// tried again before giving up.
const BUSY_RETRIES: u32 = 5;

/// Everything needed to start a handler.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The opened, checked handler file: this is what runs.
    pub program: Arc<OwnedFd>,
    /// It is a `#!` script: the kernel hands the interpreter `/dev/fd/N`, so the descriptor
    /// must stay open in the handler.
    pub script: bool,
    /// Where it was found: its `argv[0]`.
    pub path: PathBuf,
    pub dir: PathBuf,
    /// The handler's name (relative path) and tag, for log lines.
    pub name: String,
    pub tag: String,
    /// Set on top of the inherited environment, in order (later wins).
    pub env: Vec<(String, String)>,
    pub payload: Vec<u8>,
    pub timeout: Duration,
    /// Appended by the handler's process before its exec (`started.rs`).
    pub note: Option<Arc<StartNote>>,
}

/// How the run went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub outcome: Outcome,
    pub stdout: Vec<u8>,
    pub duration: Duration,
}

/// Why the handler was stopped before it exited by itself.
enum Stop {
    TimedOut,
    Shutdown,
}

/// Runs the handler to its end. `on_start` is called once its process started; `shutdown`
/// stops it early (the service is stopping).
pub async fn run(
    mut spec: Spec,
    shutdown: &CancellationToken,
    on_start: impl FnOnce(),
) -> Finished {
    let started = Instant::now();
    let spawned = spawn(&spec).await;
    // The handler's stdin holds its own copy now.
    spec.payload = Vec::new();
    let Started {
        process: mut child,
        stdout,
        stderr,
    } = match spawned {
        Ok(started) => started,
        Err(e) => {
            let hint = match nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)) {
                nix::errno::Errno::ENOEXEC => {
                    " (is it a script starting with a #! line, or a program for this machine?)"
                }
                // The file was there a moment ago: what is missing is what the exec needs next.
                nix::errno::Errno::ENOENT if spec.script => {
                    " (is the interpreter its #! line names installed?)"
                }
                nix::errno::Errno::ENOENT => {
                    " (is it a program for another system, whose dynamic loader is missing here?)"
                }
                _ => "",
            };
            let reason = format!("cannot start {}: {e}{hint}", spec.name);
            tracing::warn!(handler = %spec.name, tag = %spec.tag, "{reason}");
            return Finished {
                outcome: Outcome::Failed { reason },
                stdout: Vec::new(),
                duration: started.elapsed(),
            };
        }
    };
    let pid = child.id();
    on_start();
    tracing::debug!(handler = %spec.name, tag = %spec.tag, pid, "handler started");

    let stop_reading = CancellationToken::new();
    let mut reply = tokio::spawn(read_reply(stdout, stop_reading.clone()));
    // In the service's span, so the lines say whose they are like every other line.
    let mut log = tokio::spawn(
        log_stderr(
            stderr,
            spec.name.clone(),
            spec.tag.clone(),
            stop_reading.clone(),
        )
        .in_current_span(),
    );

    let stopped = tokio::select! {
        status = child.wait() => Ok(status),
        _ = tokio::time::sleep(spec.timeout) => Err(Stop::TimedOut),
        _ = shutdown.cancelled() => Err(Stop::Shutdown),
    };
    let (stop, status) = match stopped {
        Ok(status) => (None, status),
        Err(stop) => {
            kill_group(pid).await;
            (Some(stop), child.wait().await)
        }
    };
    let duration = started.elapsed();

    // Read what is left in the pipes, briefly: the handler has exited, so that is at most one
    // pipe buffer, unless something it started keeps writing.
    let drain = tokio::time::sleep(DRAIN_TIME);
    tokio::pin!(drain);
    let (mut reply_done, mut log_done) = (None, false);
    while reply_done.is_none() || !log_done {
        tokio::select! {
            result = &mut reply, if reply_done.is_none() => {
                reply_done = Some(result.unwrap_or_default());
            }
            _ = &mut log, if !log_done => log_done = true,
            _ = &mut drain => {
                stop_reading.cancel();
                if reply_done.is_none() {
                    reply_done = Some((&mut reply).await.unwrap_or_default());
                }
                if !log_done {
                    let _ = (&mut log).await;
                }
                break;
            }
        }
    }
    let (stdout, dropped) = reply_done.unwrap_or_default();
    if dropped > 0 {
        tracing::warn!(
            handler = %spec.name,
            tag = %spec.tag,
            "the reply was cut at {MAX_REPLY_BYTES} bytes; {dropped} more bytes of stdout were dropped"
        );
    }

    let outcome = match (stop, status) {
        (Some(Stop::TimedOut), _) => Outcome::TimedOut {
            after_ms: u64::try_from(spec.timeout.as_millis()).unwrap_or(u64::MAX),
        },
        (Some(Stop::Shutdown), _) => Outcome::Failed {
            reason: "the handler service is stopping; the handler was killed".into(),
        },
        (None, Ok(status)) => exit_outcome(status),
        (None, Err(e)) => Outcome::Failed {
            reason: format!("lost track of the handler process: {e}"),
        },
    };
    tracing::info!(
        handler = %spec.name,
        tag = %spec.tag,
        duration_ms = duration.as_millis() as u64,
        "handler finished: {}",
        describe_outcome(&outcome)
    );
    Finished {
        outcome,
        stdout,
        duration,
    }
}

/// Starts the process in a new process group (so the time-out can kill all it started), in its
/// directory, with the payload file as stdin and pipes for stdout and stderr. A script written
/// a moment ago may still be open for writing somewhere (ETXTBSY); that clears within
/// milliseconds, so it is retried.
async fn spawn(spec: &Spec) -> io::Result<Started> {
    let exec = ExecArgs::new(&spec.path, &spec.env)?;
    let dir = CString::new(spec.dir.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the handler's directory holds a NUL byte",
        )
    })?;
    let payload = payload_file(&spec.payload)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot hold its payload: {e}")))?;
    let launch = Launch {
        program: spec.program.as_fd(),
        script: spec.script,
        dir: &dir,
        stdin: payload.as_fd(),
        exec: &exec,
        note: spec.note.as_deref(),
    };
    let mut attempt = 0;
    loop {
        match crate::spawn::spawn(&launch) {
            Err(e) if e.kind() == io::ErrorKind::ExecutableFileBusy && attempt < BUSY_RETRIES => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
            }
            other => return other,
        }
    }
}

/// The payload in a sealed anonymous memory file, read from its start. Handlers read it like a
/// pipe (to its end), and cannot change it.
fn payload_file(payload: &[u8]) -> io::Result<OwnedFd> {
    let fd = memfd_create(
        c"cnsprcy-payload",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(payload)?;
    file.seek(SeekFrom::Start(0))?;
    fcntl(
        &file,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok(file.into())
}

/// SIGTERM to the group, then SIGKILL once the handler exited or `KILL_GRACE` passed. The
/// handler is not reaped in between (its zombie keeps the group id from being reused), so the
/// SIGKILL cannot reach an unrelated group.
async fn kill_group(pid: u32) {
    let Ok(raw) = i32::try_from(pid) else { return };
    let group = Pid::from_raw(raw);
    let _ = killpg(group, Signal::SIGTERM);
    let deadline = Instant::now() + KILL_GRACE;
    while Instant::now() < deadline {
        let exited = waitid(
            Id::Pid(group),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        );
        // StillAlive while running; an exit status (or an error: it is gone) ends the grace.
        if !matches!(exited, Ok(nix::sys::wait::WaitStatus::StillAlive)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = killpg(group, Signal::SIGKILL);
}

/// Reads stdout up to `MAX_REPLY_BYTES`, then keeps reading (so the handler never blocks on a
/// full pipe) and counts what it drops. Stops early when `stop` fires.
async fn read_reply<R: AsyncRead + Unpin>(
    mut stdout: R,
    stop: CancellationToken,
) -> (Vec<u8>, u64) {
    let mut reply = Vec::new();
    let mut dropped = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            read = stdout.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = stop.cancelled() => break,
        };
        let room = MAX_REPLY_BYTES - reply.len();
        let keep = n.min(room);
        reply.extend_from_slice(&buf[..keep]);
        dropped += (n - keep) as u64;
    }
    (reply, dropped)
}

/// Logs stderr line by line with the handler's name and tag; a line longer than `MAX_LOG_LINE`
/// is logged cut, and the rest of it skipped.
async fn log_stderr<R: AsyncRead + Unpin>(
    mut stderr: R,
    name: String,
    tag: String,
    stop: CancellationToken,
) {
    let mut lines = LineCutter::default();
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        let n = tokio::select! {
            read = stderr.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = stop.cancelled() => break,
        };
        for line in lines.push(&buf[..n]) {
            tracing::info!(handler = %name, tag = %tag, "stderr: {line}");
        }
    }
    if let Some(line) = lines.finish() {
        tracing::info!(handler = %name, tag = %tag, "stderr: {line}");
    }
}

/// Splits bytes into text lines of at most `MAX_LOG_LINE` bytes, without holding more than that.
#[derive(Debug, Default)]
struct LineCutter {
    current: Vec<u8>,
    /// The current line was too long: it was logged cut, and is skipped up to its newline.
    skipping: bool,
}

impl LineCutter {
    fn push(&mut self, mut bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let (part, newline) = match bytes.iter().position(|b| *b == b'\n') {
                Some(i) => (&bytes[..i], true),
                None => (bytes, false),
            };
            bytes = &bytes[part.len() + usize::from(newline)..];
            if !self.skipping {
                let room = MAX_LOG_LINE - self.current.len();
                if part.len() > room {
                    self.current.extend_from_slice(&part[..room]);
                    out.push(format!("{} [line cut]", text(&self.current)));
                    self.current.clear();
                    self.skipping = true;
                } else {
                    self.current.extend_from_slice(part);
                }
            }
            if newline {
                if !self.skipping {
                    out.push(text(&self.current));
                }
                self.current.clear();
                self.skipping = false;
            }
        }
        out
    }

    /// The last line, if it did not end in a newline.
    fn finish(self) -> Option<String> {
        (!self.current.is_empty() && !self.skipping).then(|| text(&self.current))
    }
}

/// Log text from handler output: invalid UTF-8 replaced, a trailing CR (CRLF lines) dropped.
fn text(bytes: &[u8]) -> String {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    String::from_utf8_lossy(bytes).into_owned()
}

fn exit_outcome(status: ExitStatus) -> Outcome {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => Outcome::Exited { code },
        (None, Some(signal)) => Outcome::Signalled { signal },
        (None, None) => Outcome::Failed {
            reason: format!("the handler ended in an unknown way: {status}"),
        },
    }
}

/// A few words about an outcome, for log lines.
pub fn describe_outcome(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Exited { code } => format!("exit status {code}"),
        Outcome::Signalled { signal } => {
            let name = Signal::try_from(*signal)
                .map(|s| s.as_str().to_owned())
                .unwrap_or_else(|_| format!("signal {signal}"));
            format!("killed by {name}")
        }
        Outcome::TimedOut { after_ms } => {
            format!("timed out after {after_ms} ms; its process group was killed")
        }
        Outcome::NoHandler => "no handler".to_owned(),
        Outcome::Refused { reason } => format!("refused: {reason}"),
        Outcome::Failed { reason } => format!("failed: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    #[test]
    fn lines_are_split_and_long_ones_cut() {
        let mut cutter = LineCutter::default();
        assert_eq!(cutter.push(b"one\ntw"), vec!["one"]);
        assert_eq!(cutter.push(b"o\r\nthree"), vec!["two"]);
        let long = vec![b'x'; MAX_LOG_LINE + 10];
        let out = cutter.push(&long);
        assert_eq!(out.len(), 1);
        assert!(out[0].starts_with("threexx") && out[0].ends_with(" [line cut]"));
        assert_eq!(out[0].len(), MAX_LOG_LINE + " [line cut]".len());
        // The rest of the long line is skipped, the next one is whole.
        assert_eq!(cutter.push(b"xxx\nfour\n\xffend"), vec!["four"]);
        assert_eq!(cutter.finish().as_deref(), Some("\u{fffd}end"));
    }

    fn script(dir: &Path, body: &str) -> Spec {
        let path = dir.join("h.sh");
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
        Spec {
            program: Arc::new(fs::File::open(&path).unwrap().into()),
            script: true,
            path,
            dir: dir.to_owned(),
            name: "h.sh".into(),
            tag: "t".into(),
            env: vec![("GREETING".into(), "hi".into())],
            payload: b"payload".to_vec(),
            timeout: Duration::from_secs(10),
            note: None,
        }
    }

    #[tokio::test]
    async fn stdin_env_cwd_stdout_and_status() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = script(tmp.path(), "read x; echo \"$GREETING $x $(pwd)\"; exit 3");
        let done = run(spec, &CancellationToken::new(), || {}).await;
        assert_eq!(done.outcome, Outcome::Exited { code: 3 });
        let cwd = tmp.path().canonicalize().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&done.stdout),
            format!("hi payload {}\n", cwd.display())
        );
    }

    #[tokio::test]
    async fn a_handler_that_ignores_stdin_does_not_block() {
        let tmp = tempfile::tempdir().unwrap();
        let mut spec = script(tmp.path(), "echo done");
        spec.payload = vec![7u8; 4 * 1024 * 1024];
        let done = run(spec, &CancellationToken::new(), || {}).await;
        assert_eq!(done.outcome, Outcome::Exited { code: 0 });
        assert_eq!(done.stdout, b"done\n");
    }

    /// The whole payload is in place when the handler starts: a service killed right after
    /// starting it cannot leave it a payload cut short. And the handler cannot change it.
    #[tokio::test]
    async fn the_payload_is_whole_before_the_handler_starts_and_read_only() {
        let tmp = tempfile::tempdir().unwrap();
        let mut spec = script(
            tmp.path(),
            "stat -L -c %s /dev/stdin; if echo x >&0; then echo writable; fi 2>/dev/null; \
             wc -c | tr -d ' '",
        );
        spec.payload = vec![7u8; 3 * 1024 * 1024 + 1];
        let done = run(spec, &CancellationToken::new(), || {}).await;
        assert_eq!(done.outcome, Outcome::Exited { code: 0 });
        assert_eq!(String::from_utf8_lossy(&done.stdout), "3145729\n3145729\n");
    }

    /// The handler's process writes the start note itself, before its exec.
    #[tokio::test]
    async fn the_start_note_is_written_by_the_started_process() {
        let tmp = tempfile::tempdir().unwrap();
        let notes = tmp.path().join("notes");
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&notes)
            .unwrap();
        let mut spec = script(tmp.path(), "cat \"$0.notes\" 2>/dev/null; exit 0");
        spec.note = Some(Arc::new(StartNote {
            file: file.into(),
            line: b"an-id\n".to_vec(),
        }));
        let done = run(spec, &CancellationToken::new(), || {}).await;
        assert_eq!(done.outcome, Outcome::Exited { code: 0 });
        assert_eq!(std::fs::read_to_string(&notes).unwrap(), "an-id\n");
    }

    #[tokio::test]
    async fn time_out_kills_the_group_even_if_term_is_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let mut spec = script(
            tmp.path(),
            "trap '' TERM; sleep 30 & echo $! > child; echo started; wait",
        );
        spec.timeout = Duration::from_millis(300);
        let begun = Instant::now();
        let done = run(spec, &CancellationToken::new(), || {}).await;
        assert_eq!(done.outcome, Outcome::TimedOut { after_ms: 300 });
        assert_eq!(done.stdout, b"started\n");
        // TERM was ignored, so it took the grace and then SIGKILL.
        assert!(begun.elapsed() >= KILL_GRACE, "{:?}", begun.elapsed());
        let child: i32 = fs::read_to_string(tmp.path().join("child"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SIGKILL is sent; the child dies when it is next scheduled.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !gone(child) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone(child), "the background child {child} survived");
    }

    #[tokio::test]
    async fn a_background_process_holding_stdout_does_not_hold_the_run() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = script(tmp.path(), "echo quick; sleep 5 & exit 0");
        let begun = Instant::now();
        let done = run(spec, &CancellationToken::new(), || {}).await;
        assert_eq!(done.outcome, Outcome::Exited { code: 0 });
        assert_eq!(done.stdout, b"quick\n");
        assert!(
            begun.elapsed() < Duration::from_secs(3),
            "{:?}",
            begun.elapsed()
        );
    }

    #[tokio::test]
    async fn shutdown_stops_a_running_handler() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = script(tmp.path(), "sleep 30");
        let shutdown = CancellationToken::new();
        let stopper = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            stopper.cancel();
        });
        let done = run(spec, &shutdown, || {}).await;
        assert!(
            matches!(done.outcome, Outcome::Failed { .. }),
            "{:?}",
            done.outcome
        );
    }

    #[tokio::test]
    async fn a_script_without_interpreter_line_fails_with_a_hint() {
        let tmp = tempfile::tempdir().unwrap();
        let mut spec = script(tmp.path(), "");
        fs::write(&spec.path, "echo no shebang\n").unwrap();
        spec.script = false;
        let done = run(spec, &CancellationToken::new(), || {}).await;
        match done.outcome {
            Outcome::Failed { reason } => assert!(reason.contains("#!"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_missing_interpreter_is_named_as_the_cause() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = script(tmp.path(), "");
        fs::write(&spec.path, "#!/nonexistent/interpreter\necho x\n").unwrap();
        let done = run(spec, &CancellationToken::new(), || {}).await;
        match done.outcome {
            Outcome::Failed { reason } => {
                assert!(reason.contains("interpreter its #! line names"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_program_runs_from_its_descriptor() {
        let tmp = tempfile::tempdir().unwrap();
        let mut spec = script(tmp.path(), "");
        // /bin/sh itself, an ELF program: its descriptor is not kept open across exec.
        spec.program = Arc::new(fs::File::open("/bin/sh").unwrap().into());
        spec.script = false;
        spec.payload = b"echo \"from stdin, as $0\"".to_vec();
        let done = run(spec, &CancellationToken::new(), || {}).await;
        assert_eq!(done.outcome, Outcome::Exited { code: 0 });
        let expected = format!("from stdin, as {}\n", tmp.path().join("h.sh").display());
        assert_eq!(String::from_utf8_lossy(&done.stdout), expected);
    }

    /// Whether the process `pid` has ended (a zombie waiting for its parent counts as ended).
    pub(crate) fn gone(pid: i32) -> bool {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        }
    }
}
