//! Starting a handler's process without copying this service's memory, and waiting for it.
//!
//! A `fork` copies the page tables of the whole service (in `cnspr serve`, of every service and
//! the store's cache), marks every page of it copy-on-write, and makes the service fault on the
//! first write to each page afterwards; the `exec` right after throws the copy away. Profiled
//! at 40 devices on two cores, that was about a tenth of all CPU time of a broadcast
//! (docs/performance.md). Here the child shares the service's memory until its exec (`clone`
//! with `CLONE_VM | CLONE_VFORK`, as `posix_spawn` does), and the calling thread waits for that
//! moment. std's `Command` does the same only without a `pre_exec` step, and one is needed: the
//! handler runs from the descriptor it was checked through (`fexecve`), and its process writes
//! the start note itself (`started.rs`).
//!
//! The child runs on a stack of its own in the service's memory, with every signal blocked:
//! between the `clone` and the exec it only makes system calls on values prepared before, and
//! allocates, locks and unwinds nothing.

use std::ffi::{CStr, CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::fcntl::OFlag;
use nix::sched::{CloneFlags, clone};
use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};
use nix::unistd::pipe2;
use tokio::net::unix::pipe;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// The child's stack until its exec. What it runs there is a few system calls deep.
const CHILD_STACK: usize = 64 * 1024;
/// Signals are numbered below this (glibc's `_NSIG`).
const SIGNALS: libc::c_int = 65;

/// A line the handler's process writes to a file between its start and its exec: written by the
/// child, it is there exactly when the handler's process exists, whatever happens to this
/// service meanwhile.
#[derive(Debug)]
pub struct StartNote {
    /// Open for appending, close-on-exec.
    pub file: OwnedFd,
    pub line: Vec<u8>,
}

impl StartNote {
    /// Appends the line. Async-signal-safe: one `write`, no allocation. A failure is ignored:
    /// the handler runs anyway.
    pub fn write(&self) {
        // SAFETY: writes from a buffer this value owns, of its length, to a descriptor it owns.
        unsafe {
            libc::write(
                self.file.as_raw_fd(),
                self.line.as_ptr().cast(),
                self.line.len(),
            )
        };
    }
}

/// `argv` and `envp` for the exec, built before the child starts, so that it allocates nothing.
pub struct ExecArgs {
    /// Owns the strings the pointers below point into.
    _strings: Vec<CString>,
    /// NULL-terminated.
    argv: Vec<*const libc::c_char>,
    /// NULL-terminated.
    envp: Vec<*const libc::c_char>,
}

// SAFETY: the pointers point into the heap buffers of `_strings`, which the same value owns and
// never changes after `new`; they are only read (by the exec). Moving an `ExecArgs` moves the
// vectors, not the buffers they point to.
unsafe impl Send for ExecArgs {}
// SAFETY: as above: nothing is ever written through the pointers.
unsafe impl Sync for ExecArgs {}

impl ExecArgs {
    /// `argv[0]` is `argv0` (the handler's path); the environment is the service's own with
    /// `env` set on top (later ones win).
    pub fn new(argv0: &Path, env: &[(String, String)]) -> io::Result<Self> {
        let mut vars: Vec<(OsString, OsString)> = std::env::vars_os().collect();
        for (name, value) in env {
            vars.retain(|(existing, _)| existing.as_os_str() != name.as_str());
            vars.push((name.into(), value.into()));
        }
        let c_string = |bytes: Vec<u8>| {
            CString::new(bytes).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "an argument or environment variable holds a NUL byte",
                )
            })
        };
        let argv0 = c_string(argv0.as_os_str().as_bytes().to_vec())?;
        let mut env_strings = Vec::with_capacity(vars.len());
        for (name, value) in vars {
            let mut entry = name.into_vec();
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            env_strings.push(c_string(entry)?);
        }
        let argv = vec![argv0.as_ptr(), std::ptr::null()];
        let mut envp: Vec<*const libc::c_char> = env_strings.iter().map(|s| s.as_ptr()).collect();
        envp.push(std::ptr::null());
        let mut strings = env_strings;
        strings.push(argv0);
        Ok(Self {
            _strings: strings,
            argv,
            envp,
        })
    }
}

/// What to start, and how.
pub struct Launch<'a> {
    /// The opened, checked executable: this is what runs.
    pub program: BorrowedFd<'a>,
    /// It is a `#!` script: the kernel hands the interpreter `/dev/fd/N`, so the descriptor
    /// stays open in the handler.
    pub script: bool,
    pub dir: &'a CStr,
    pub stdin: BorrowedFd<'a>,
    pub exec: &'a ExecArgs,
    pub note: Option<&'a StartNote>,
}

/// A started process and the pipes from its stdout and stderr.
pub struct Started {
    pub process: Process,
    pub stdout: pipe::Receiver,
    pub stderr: pipe::Receiver,
}

/// A started process, in a process group of its own (its ID is the process's). Waited for once
/// it exits; one dropped before is waited for in the background.
pub struct Process {
    pid: libc::pid_t,
    /// `SIGCHLD`, listened for since before the start, so that the exit cannot be missed.
    exits: Option<Signal>,
    status: Option<ExitStatus>,
}

/// Starts `launch`. Returns once the child has executed the program, or with the error that
/// stopped it (the exec's own, such as `ETXTBSY` or `ENOEXEC`).
pub fn spawn(launch: &Launch) -> io::Result<Started> {
    let exits = signal(SignalKind::child())?;
    let (stdout, stdout_child) = pipe2(OFlag::O_CLOEXEC)?;
    let (stderr, stderr_child) = pipe2(OFlag::O_CLOEXEC)?;
    let stdout = pipe::Receiver::from_owned_fd(stdout)?;
    let stderr = pipe::Receiver::from_owned_fd(stderr)?;
    let child = Child {
        program: launch.program.as_raw_fd(),
        script: launch.script,
        dir: launch.dir.as_ptr(),
        stdio: [
            launch.stdin.as_raw_fd(),
            stdout_child.as_raw_fd(),
            stderr_child.as_raw_fd(),
        ],
        argv: launch.exec.argv.as_ptr(),
        envp: launch.exec.envp.as_ptr(),
        note: launch.note,
        failure: AtomicI32::new(0),
    };
    let mut stack = vec![0u8; CHILD_STACK];
    // Blocked in this thread, and so in the child from its first instruction: a signal handler
    // of the service must never run in the child, on the service's memory.
    let mut unblocked = SigSet::empty();
    pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut unblocked),
    )?;
    // SAFETY: the child shares this process's memory and runs `Child::exec` on `stack`, which
    // outlives it: `CLONE_VFORK` holds this thread until the child has executed the program or
    // exited. `Child::exec` makes only async-signal-safe system calls on values prepared
    // above, which this thread keeps alive and unchanged meanwhile, and allocates, locks and
    // unwinds nothing (see there).
    let cloned = unsafe {
        clone(
            Box::new(|| child.exec()),
            &mut stack,
            CloneFlags::CLONE_VM | CloneFlags::CLONE_VFORK,
            Some(libc::SIGCHLD),
        )
    };
    // Restoring a mask this thread just had cannot fail.
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&unblocked), None);
    drop((stdout_child, stderr_child));
    let pid = cloned?.as_raw();
    let mut process = Process {
        pid,
        exits: Some(exits),
        status: None,
    };
    match child.failure.load(Ordering::SeqCst) {
        0 => Ok(Started {
            process,
            stdout,
            stderr,
        }),
        errno => {
            // The child has exited already: reaping it does not wait.
            let _ = process.reap(0);
            Err(io::Error::from_raw_os_error(errno))
        }
    }
}

impl Process {
    pub fn id(&self) -> u32 {
        self.pid.unsigned_abs()
    }

    /// Waits for the process to exit, and reaps it.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.reap(libc::WNOHANG)? {
                return Ok(status);
            }
            let exits = self.exits.as_mut().ok_or_else(no_signals)?;
            if exits.recv().await.is_none() {
                return Err(no_signals());
            }
        }
    }

    /// Its status once it has exited (`flags` 0: waits for that).
    fn reap(&mut self, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            let mut raw = 0;
            // SAFETY: waits for this process's own child, which only this value reaps, and
            // writes its status to a local.
            match unsafe { libc::waitpid(self.pid, &mut raw, flags) } {
                0 => {}
                -1 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                _ => self.status = Some(ExitStatus::from_raw(raw)),
            }
        }
        Ok(self.status)
    }
}

impl Drop for Process {
    /// A process not waited for would stay a zombie as long as the service runs.
    fn drop(&mut self) {
        if matches!(self.reap(libc::WNOHANG), Ok(Some(_)) | Err(_)) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut rest = Process {
            pid: self.pid,
            exits: self.exits.take(),
            status: None,
        };
        // Marks this value reaped: `rest` reaps the process now.
        self.status = Some(ExitStatus::from_raw(0));
        runtime.spawn(async move {
            let _ = rest.wait().await;
        });
    }
}

fn no_signals() -> io::Error {
    io::Error::other("the service stopped listening for SIGCHLD")
}

/// What the child needs, as raw values prepared before it starts.
struct Child<'a> {
    program: libc::c_int,
    script: bool,
    dir: *const libc::c_char,
    /// Descriptors for its stdin, stdout and stderr, close-on-exec here.
    stdio: [libc::c_int; 3],
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    note: Option<&'a StartNote>,
    /// The `errno` of the step that failed, set by the child before it exits.
    failure: AtomicI32,
}

impl Child<'_> {
    /// In the child: sets up its signals, process group, stdio and directory as std's
    /// `Command` does, writes the start note, and executes the program. Returns (and the child
    /// exits with 127) only on failure, with `failure` set.
    ///
    /// Only async-signal-safe system calls through libc on the prepared values: no allocation,
    /// no lock, nothing that can panic.
    fn exec(&self) -> isize {
        // SAFETY: each call below is a plain system call wrapper on descriptors and pointers
        // this value holds valid for as long as the parent thread waits (see `spawn`), or on
        // local, zero-initialised plain C structs.
        unsafe {
            // Handlers of the service would run on its memory: back to the default (which an
            // exec would do anyway) before anything is unblocked. SIGPIPE is ignored by the Rust
            // runtime and goes back to the default too, as std's `Command` does.
            for signal in 1..SIGNALS {
                if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                    continue;
                }
                let mut current: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(signal, std::ptr::null(), &mut current) != 0 {
                    continue; // a number glibc keeps for itself
                }
                let ignored = current.sa_sigaction == libc::SIG_IGN && signal != libc::SIGPIPE;
                if current.sa_sigaction != libc::SIG_DFL && !ignored {
                    let default: libc::sigaction = std::mem::zeroed(); // SIG_DFL, no flags
                    libc::sigaction(signal, &default, std::ptr::null_mut());
                }
            }
            if libc::setpgid(0, 0) != 0 {
                return self.fail();
            }
            for (target, fd) in (0..).zip(self.stdio) {
                // dup2 onto another number clears close-on-exec; std's runtime keeps 0, 1 and 2
                // open, so the prepared descriptors are never those numbers themselves.
                if libc::dup2(fd, target) == -1 {
                    return self.fail();
                }
            }
            if libc::chdir(self.dir) != 0 {
                return self.fail();
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                return self.fail();
            }
            if let Some(note) = self.note {
                note.write();
            }
            if self.script {
                let flags = libc::fcntl(self.program, libc::F_GETFD);
                if flags == -1
                    || libc::fcntl(self.program, libc::F_SETFD, flags & !libc::FD_CLOEXEC) == -1
                {
                    return self.fail();
                }
            }
            libc::fexecve(self.program, self.argv, self.envp);
            self.fail()
        }
    }

    fn fail(&self) -> isize {
        let errno = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        self.failure.store(errno, Ordering::SeqCst);
        127
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::fd::AsFd;
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::AsyncReadExt;

    fn write_script(dir: &Path, body: &str) {
        let path = dir.join("s.sh");
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
    }

    /// Starts the script `write_script` wrote in `dir`, there, with `stdin`.
    async fn start_script(dir: &Path, stdin: &fs::File) -> Started {
        let path = dir.join("s.sh");
        let program = fs::File::open(&path).unwrap();
        let exec = ExecArgs::new(&path, &[("GREETING".into(), "hi".into())]).unwrap();
        let dir = CString::new(dir.as_os_str().as_bytes()).unwrap();
        let launch = Launch {
            program: program.as_fd(),
            script: true,
            dir: &dir,
            stdin: stdin.as_fd(),
            exec: &exec,
            note: None,
        };
        // Another test's child may hold a script open for writing until its exec (as the
        // runner, this retries).
        loop {
            match spawn(&launch) {
                Err(e) if e.kind() == io::ErrorKind::ExecutableFileBusy => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                started => return started.unwrap(),
            }
        }
    }

    /// Runs the script `write_script` wrote in `dir`, there, with `stdin`; returns its stdout
    /// and status.
    async fn run_script(dir: &Path, stdin: &fs::File) -> (String, ExitStatus) {
        let mut started = start_script(dir, stdin).await;
        let mut out = String::new();
        started.stdout.read_to_string(&mut out).await.unwrap();
        (out, started.process.wait().await.unwrap())
    }

    /// A process dropped before it exited is waited for all the same: no zombie is left.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_process_dropped_before_it_exits_is_reaped() {
        let tmp = tempfile::tempdir().unwrap();
        write_script(tmp.path(), "sleep 0.3");
        let stdin = fs::File::open("/dev/null").unwrap();
        let started = start_script(tmp.path(), &stdin).await;
        let proc_dir = std::path::PathBuf::from(format!("/proc/{}", started.process.id()));
        drop(started);
        assert!(proc_dir.exists(), "it ran for less than 0.3 s");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while proc_dir.exists() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // A zombie keeps its /proc entry until it is reaped.
        assert!(!proc_dir.exists(), "{} was not reaped", proc_dir.display());
    }

    /// The handler starts as std's `Command` would start it: no signal blocked, none ignored
    /// that std's would not ignore (the Rust runtime ignores SIGPIPE), its own process group,
    /// the environment, directory and stdin given.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_process_starts_clean() {
        let tmp = tempfile::tempdir().unwrap();
        let stdin_path = tmp.path().join("in");
        fs::write(&stdin_path, "from stdin").unwrap();
        let stdin = fs::File::open(&stdin_path).unwrap();
        write_script(
            tmp.path(),
            "read line; echo \"$GREETING $line $(pwd)\"; \
             grep -E '^Sig(Blk|Ign)' /proc/self/status; \
             set -- $(cat /proc/$$/stat); [ \"$1\" = \"$5\" ] && echo leader; exit 4",
        );
        let (out, status) = run_script(tmp.path(), &stdin).await;
        assert_eq!(status.code(), Some(4));
        let cwd = tmp.path().canonicalize().unwrap();
        let (first, signals) = out.split_once('\n').unwrap();
        assert_eq!(first, format!("hi from stdin {}", cwd.display()));
        assert_eq!(signal_sets(signals), signal_sets(&std_signals()));
        assert!(out.ends_with("\nleader\n"), "{out}");
    }

    /// What std's `Command` gives a process: the `SigBlk` and `SigIgn` lines of its status.
    fn std_signals() -> String {
        let out = std::process::Command::new("grep")
            .args(["-E", "^Sig(Blk|Ign)", "/proc/self/status"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    }

    /// The blocked and the ignored signals from `SigBlk` and `SigIgn` lines, without glibc's
    /// own two (32 and 33, which its `posix_spawn` ignores in the child and a program cannot
    /// touch).
    fn signal_sets(lines: &str) -> Vec<(String, u64)> {
        let glibc_own = 0b11 << 31;
        lines
            .lines()
            .filter_map(|l| l.split_once(":\t"))
            .filter(|(name, _)| name.starts_with("Sig"))
            .map(|(name, bits)| {
                let bits = u64::from_str_radix(bits.trim(), 16).unwrap();
                (name.to_owned(), bits & !glibc_own)
            })
            .collect()
    }

    /// Many processes started and exiting at once from several threads are each waited for
    /// with their own status.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_processes_each_get_their_own_status() {
        let tmp = tempfile::tempdir().unwrap();
        let mut runs = Vec::new();
        for i in 0..40 {
            let dir = tmp.path().join(i.to_string());
            fs::create_dir(&dir).unwrap();
            write_script(&dir, &format!("echo {i}; exit {i}"));
            runs.push(tokio::spawn(async move {
                let stdin = fs::File::open("/dev/null").unwrap();
                run_script(&dir, &stdin).await
            }));
        }
        for (i, run) in runs.into_iter().enumerate() {
            let (out, status) = run.await.unwrap();
            assert_eq!(out, format!("{i}\n"));
            assert_eq!(status.code(), Some(i32::try_from(i).unwrap()));
        }
    }

    /// A failed step in the child is the error of `spawn`.
    #[tokio::test]
    async fn a_failed_exec_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("not-a-program");
        fs::write(&path, "no interpreter line\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
        let program = fs::File::open(&path).unwrap();
        let stdin = fs::File::open("/dev/null").unwrap();
        let exec = ExecArgs::new(&path, &[]).unwrap();
        let dir = CString::new("/").unwrap();
        let mut launch = Launch {
            program: program.as_fd(),
            script: false,
            dir: &dir,
            stdin: stdin.as_fd(),
            exec: &exec,
            note: None,
        };
        let e = spawn(&launch).err().unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::ENOEXEC), "{e}");
        let missing = CString::new(tmp.path().join("gone").as_os_str().as_bytes()).unwrap();
        launch.dir = &missing;
        let e = spawn(&launch).err().unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    }
}
