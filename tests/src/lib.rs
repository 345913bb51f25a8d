//! The harness for cnsprcy's process-level tests: devices with their own XDG directories, daemons
//! started as real processes inside a network namespace of their own, and the `cnspr` CLI run
//! against them.
//!
//! The binaries come from the same target directory as the test executable; `cargo test
//! --workspace` builds them first because every binary's package has an integration test.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;

use crate::netns::NetNs;

pub mod bench;
pub mod load;
pub mod netns;
pub mod nspawn;
pub mod packages;
pub mod vs_serf;

/// Generous: the CI machines are shared and slow.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The path of a workspace binary: `cnspr`, or a service's executable (`cnsprcy-mesh`, ...),
/// which is `cnspr` started under the service's name: a symbolic link to it, made here.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let cnspr = dir.join("cnspr");
    assert!(
        cnspr.exists(),
        "{} is missing; build it with `cargo build --workspace` (or run `cargo test --workspace`)",
        cnspr.display()
    );
    if name == "cnspr" {
        return cnspr;
    }
    assert!(
        name.starts_with("cnsprcy-"),
        "{name} is not a workspace binary"
    );
    let link = dir.join(name);
    if fs::read_link(&link).ok().as_deref() != Some(Path::new("cnspr")) {
        // Tests run in parallel: a link made under a name of its own and renamed into place
        // replaces whatever was there (an executable of an older build) in one step.
        static LINKS_MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let serial = LINKS_MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let temporary = dir.join(format!("{name}.{}-{serial}.link", std::process::id()));
        let _ = fs::remove_file(&temporary);
        std::os::unix::fs::symlink("cnspr", &temporary).expect("link a service's name to cnspr");
        fs::rename(&temporary, &link).expect("put the service's link in place");
    }
    link
}

/// The lines of a file that a handler appends to; none while it does not exist yet.
pub fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Polls `check` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One device: a private set of XDG directories, and the daemon processes started for it.
pub struct Device {
    pub name: String,
    dir: TempDir,
    processes: Vec<(String, Child)>,
    /// Variables set for every process of this device, after the usual ones (so `PATH` here
    /// replaces the inherited one).
    env: Vec<(String, std::ffi::OsString)>,
}

impl Device {
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cnsprcy-test-")
            .tempdir()
            .expect("temp dir");
        for sub in ["home", "config", "data", "run"] {
            fs::create_dir_all(dir.path().join(sub)).expect("create XDG dir");
        }
        fs::set_permissions(dir.path().join("run"), fs::Permissions::from_mode(0o700))
            .expect("chmod runtime dir");
        Self {
            name: name.to_owned(),
            dir,
            processes: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Sets `key` to `value` for every process started for this device from now on: daemons
    /// (and so the handlers they run) and `cnspr` commands alike.
    pub fn set_env(&mut self, key: &str, value: impl Into<std::ffi::OsString>) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.into()));
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_file(&self) -> PathBuf {
        self.root().join("config/cnsprcy/config.toml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root().join("data/cnsprcy")
    }

    pub fn runtime_dir(&self) -> PathBuf {
        self.root().join("run/cnsprcy")
    }

    pub fn socket(&self) -> PathBuf {
        self.runtime_dir().join("cnsprcy.sock")
    }

    pub fn key_file(&self) -> PathBuf {
        self.state_dir().join("identity.key")
    }

    pub fn write_config(&self, text: &str) {
        let path = self.config_file();
        fs::create_dir_all(path.parent().expect("config dir")).expect("create config dir");
        fs::write(path, text).expect("write config");
    }

    /// A command for `program` with this device's environment and nothing else inherited.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.root().join("home"))
            .env("XDG_CONFIG_HOME", self.root().join("config"))
            .env("XDG_DATA_HOME", self.root().join("data"))
            .env("XDG_RUNTIME_DIR", self.root().join("run"))
            .env("RUST_LOG", "debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `cnspr ARGS` to completion.
    pub fn cnspr(&self, args: &[&str]) -> Run {
        let output = self
            .command(bin("cnspr"))
            .args(args)
            .output()
            .expect("run cnspr");
        Run::new(args, output)
    }

    /// `cnspr ARGS --json`'s stdout as JSON; panics with the output if the command failed.
    pub fn cnspr_json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        self.cnspr(&args).success().json()
    }

    /// A command that runs `program ARGS` inside a new network namespace with only `lo` up, so
    /// nothing a daemon sends can reach the host's network.
    pub fn in_netns(&self, program: &Path, args: &[&str]) -> Command {
        let mut cmd = self.command("unshare");
        if !is_root() {
            cmd.arg("--map-root-user");
        }
        cmd.args([
            "--net",
            "--",
            "sh",
            "-c",
            r#"ip link set lo up && exec "$0" "$@""#,
        ])
        .arg(program)
        .args(args);
        cmd
    }

    /// Starts `program ARGS` as a daemon process of this device, in its own network namespace,
    /// with its log in `<label>.log`. Returns its pid.
    pub fn spawn(&mut self, label: &str, program: &Path, args: &[&str]) -> u32 {
        let log = fs::File::create(self.log_path(label)).expect("create log file");
        let mut cmd = self.in_netns(program, args);
        cmd.stdout(log.try_clone().expect("log fd")).stderr(log);
        // If the test process dies without unwinding (SIGKILL, abort), its daemons die with it.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().expect("spawn daemon");
        let pid = child.id();
        self.processes.push((label.to_owned(), child));
        pid
    }

    /// Starts `program ARGS` as a daemon process of this device inside `ns` (shared with other
    /// devices of the same test), with its log in `<label>.log`. Returns its pid.
    pub fn spawn_in(&mut self, ns: &NetNs, label: &str, program: &Path, args: &[&str]) -> u32 {
        let log = fs::File::create(self.log_path(label)).expect("create log file");
        let mut cmd = self.command(program);
        // Nothing typed: a command that asks reads the end of input.
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        ns.enter(&mut cmd);
        let child = cmd.spawn().expect("spawn daemon");
        let pid = child.id();
        self.processes.push((label.to_owned(), child));
        pid
    }

    /// A device named `name`, configured to listen on `listen`, running `cnspr serve` in `ns`.
    pub fn started_in(ns: &NetNs, name: &str, listen: &str) -> Self {
        let mut device = Self::new(name);
        device.configure(listen);
        device.start_in(ns);
        device
    }

    /// Starts `cnspr serve` inside `ns` and waits until it answers `status`.
    pub fn start_in(&mut self, ns: &NetNs) -> u32 {
        let pid = self.spawn_in(ns, "serve", &bin("cnspr"), &["serve"]);
        self.wait_ready("serve");
        pid
    }

    /// Writes a config file naming the device, listening on `listen`, with a short keepalive so
    /// that dead links are noticed within seconds.
    pub fn configure(&self, listen: &str) {
        self.write_config(&format!(
            "name = \"{}\"\n[mesh]\nlisten = [\"{listen}\"]\nkeepalive_interval = \"1s\"\nkeepalive_timeout = \"2s\"\n",
            self.name
        ));
    }

    /// Adds `member` to this device's roster (`cnspr manage add`), with where it listens if given.
    pub fn add_member(&self, member: &Device, address: Option<&str>) {
        let key = member.public_key();
        let mut args = vec!["manage", "add", member.name.as_str(), key.as_str()];
        args.extend(address);
        self.cnspr(&args).success();
    }

    /// Starts `cnspr serve` as `label` and checks that it refuses to run: exit status 1, and
    /// `needle` in its log.
    pub fn serve_refuses(&mut self, label: &str, needle: &str) {
        self.spawn(label, &bin("cnspr"), &["serve"]);
        let status = self
            .wait_exit(label, Duration::from_secs(15))
            .unwrap_or_else(|| panic!("{label} did not exit:\n{}", self.log(label)));
        assert_eq!(status.code(), Some(1), "{}", self.log(label));
        assert!(self.log(label).contains(needle), "{}", self.log(label));
    }

    /// This device's public key, as `cnspr manage id` prints it.
    pub fn public_key(&self) -> String {
        let id = self.cnspr_json(&["manage", "id"]);
        id["public_key"].as_str().expect("public_key").to_owned()
    }

    /// `cnspr peers --json` as a map from name to peer object.
    pub fn peers(&self) -> std::collections::BTreeMap<String, Value> {
        let peers = self.cnspr_json(&["peers"]);
        peers
            .as_array()
            .expect("peers is an array")
            .iter()
            .map(|p| (p["name"].as_str().unwrap_or("?").to_owned(), p.clone()))
            .collect()
    }

    /// Waits until `cnspr peers` shows `peer` with `status` (and `via`, for relayed); panics
    /// with the peer table and the log otherwise.
    pub fn wait_status(&mut self, peer: &str, status: &str, timeout: Duration) -> Value {
        let mut last = Value::Null;
        let reached = wait_until(timeout, || {
            last = self.peers().get(peer).cloned().unwrap_or(Value::Null);
            last["status"] == status
        });
        assert!(
            reached,
            "{}: {peer} did not become {status} within {timeout:?}; last: {last}\n{}",
            self.name,
            self.log("serve")
        );
        last
    }

    /// Starts `cnspr serve` and waits until it answers `status`.
    pub fn start(&mut self) -> u32 {
        let pid = self.spawn("serve", &bin("cnspr"), &["serve"]);
        self.wait_ready("serve");
        pid
    }

    /// Waits until the daemon answers `status`, or panics with the logs.
    pub fn wait_ready(&mut self, label: &str) {
        let ready = wait_until(STARTUP_TIMEOUT, || {
            if let Some(status) = self.try_wait(label) {
                panic!(
                    "{label} exited during startup with {status}:\n{}",
                    self.log(label)
                );
            }
            self.cnspr(&["status", "--json"]).status.success()
        });
        assert!(
            ready,
            "{label} did not answer in time:\n{}",
            self.log(label)
        );
    }

    pub fn log_path(&self, label: &str) -> PathBuf {
        self.root().join(format!("{label}.log"))
    }

    pub fn log(&self, label: &str) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(self.log_path(label)) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    fn child(&mut self, label: &str) -> &mut Child {
        self.processes
            .iter_mut()
            .rev()
            .find(|(l, _)| l == label)
            .map(|(_, c)| c)
            .unwrap_or_else(|| panic!("no process labelled {label}"))
    }

    pub fn pid(&mut self, label: &str) -> u32 {
        self.child(label).id()
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self, label: &str) -> Option<ExitStatus> {
        self.child(label).try_wait().expect("try_wait")
    }

    pub fn signal(&mut self, label: &str, signal: Signal) {
        let pid = self.pid(label);
        kill(Pid::from_raw(pid as i32), signal).expect("send signal");
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, label: &str, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.try_wait(label);
            status.is_some()
        });
        status
    }

    /// Sends `signal` and waits for the exit; panics with the log if it does not come.
    pub fn stop_with(&mut self, label: &str, signal: Signal) -> ExitStatus {
        self.signal(label, signal);
        match self.wait_exit(label, Duration::from_secs(15)) {
            Some(status) => status,
            None => panic!("{label} did not exit after {signal}:\n{}", self.log(label)),
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        for (label, child) in &mut self.processes {
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            if std::thread::panicking() {
                eprintln!(
                    "----- {} {label} log -----\n{}",
                    self.name,
                    fs::read_to_string(self.dir.path().join(format!("{label}.log")))
                        .unwrap_or_default()
                );
            }
        }
    }
}

/// A finished command, with helpers that fail the test with its output.
pub struct Run {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn new(args: &[&str], output: Output) -> Self {
        Self {
            args: args.iter().map(|a| a.to_string()).collect(),
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    fn describe(&self) -> String {
        format!(
            "`cnspr {}` exited with {}\n--- stdout\n{}\n--- stderr\n{}",
            self.args.join(" "),
            self.status,
            self.stdout,
            self.stderr
        )
    }

    pub fn success(self) -> Self {
        assert!(self.status.success(), "{}", self.describe());
        self
    }

    /// Asserts the exit code and returns self.
    pub fn code(self, expected: i32) -> Self {
        assert_eq!(self.status.code(), Some(expected), "{}", self.describe());
        self
    }

    pub fn stderr_has(self, needle: &str) -> Self {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}\n{}",
            self.describe()
        );
        self
    }

    pub fn stdout_has(self, needle: &str) -> Self {
        assert!(
            self.stdout.contains(needle),
            "stdout lacks {needle:?}\n{}",
            self.describe()
        );
        self
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e})\n{}", self.describe()))
    }
}
