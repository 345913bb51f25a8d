//! Real systemd for the end-to-end tests: a Debian root made with debootstrap (cached between
//! runs), copied per container and booted with `systemd-nspawn --boot` inside a network namespace
//! the test made. Commands run inside with `nsenter -t <container init> -a`, as root or as the
//! container's user.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::netns::NetNs;

/// What the root holds besides `minbase`: an init, logind and a user bus (for user managers of
/// lingering users), and `ip` for looking around when a test fails.
const DEBIAN_PACKAGES: &str =
    "systemd,systemd-sysv,dbus,dbus-user-session,libpam-systemd,iproute2,procps";
const DEBIAN_SUITE: &str = "bookworm";

/// The container's user, uid 1000, lingering so that its user manager runs without a login.
pub const USER: &str = "alice";
const USER_UID: u32 = 1000;

/// The cached Debian root, made on first use. `CNSPRCY_DEBIAN_ROOT_CACHE` is the directory that
/// holds it (default `/var/cache/cnsprcy-ci`); `CNSPRCY_DEBIAN_MIRROR` the mirror (default
/// `http://deb.debian.org/debian`). The root's name carries the suite and the package list, so
/// changing either makes a new one.
pub fn debian_root() -> PathBuf {
    let cache = std::env::var_os("CNSPRCY_DEBIAN_ROOT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/cnsprcy-ci"));
    let stamp = fnv1a(format!("{DEBIAN_SUITE} {DEBIAN_PACKAGES}").as_bytes());
    let root = cache.join(format!("debian-{DEBIAN_SUITE}-{stamp:016x}"));
    if root.join("usr/lib/systemd/systemd").exists() {
        return root;
    }
    fs::create_dir_all(&cache).unwrap_or_else(|e| panic!("create {}: {e}", cache.display()));
    let mirror = std::env::var("CNSPRCY_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".to_owned());
    // Built under a temporary name and renamed when complete, so an interrupted debootstrap
    // never passes for a cached root.
    let partial = cache.join(format!(".partial-{stamp:016x}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&partial);
    eprintln!(
        "making the Debian root {} (once; about a minute)",
        root.display()
    );
    let output = Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={DEBIAN_PACKAGES}")])
        .arg(DEBIAN_SUITE)
        .arg(&partial)
        .arg(&mirror)
        .output()
        .unwrap_or_else(|e| panic!("run debootstrap (apt-get install debootstrap): {e}"));
    if !output.status.success() {
        let _ = fs::remove_dir_all(&partial);
        panic!(
            "debootstrap {DEBIAN_SUITE} from {mirror} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    if let Err(e) = fs::rename(&partial, &root) {
        // Another run finished first: use its root.
        let _ = fs::remove_dir_all(&partial);
        assert!(
            root.exists(),
            "rename {} -> {}: {e}",
            partial.display(),
            root.display()
        );
    }
    root
}

/// A stable hash for the cache name (std's hashers are not stable across releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A booted container: its own copy of the root, its own network namespace, systemd as init.
/// Dropping it powers it off (or kills it) and deletes the copy.
pub struct Container {
    name: String,
    // Field order is drop order after `Drop::drop` ran: the copy goes last.
    nspawn: Child,
    leader: u32,
    dir: TempDir,
}

impl Container {
    /// Copies `root`, puts `files` (host path, path inside) into the copy, and boots it inside
    /// `netns` with hostname `name`. Returns once systemd reports the boot finished.
    pub fn boot(name: &str, root: &Path, netns: &NetNs, files: &[(&Path, &str)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("cnsprcy-nspawn-{name}-"))
            .tempdir()
            .expect("temp dir for the container");
        let copy = dir.path().join("root");
        let status = Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(root)
            .arg(&copy)
            .status()
            .expect("run cp");
        assert!(
            status.success(),
            "copy {} to {}",
            root.display(),
            copy.display()
        );
        // debootstrap copied the host's name; without it, nspawn names the host `name`.
        let _ = fs::remove_file(copy.join("etc/hostname"));
        for (from, to) in files {
            let dest = copy.join(to.trim_start_matches('/'));
            fs::copy(from, &dest)
                .unwrap_or_else(|e| panic!("copy {} into the container: {e}", from.display()));
        }
        let log = fs::File::create(dir.path().join("console.log")).expect("console log");
        let nspawn = Command::new("systemd-nspawn")
            .args(["--boot", "--register=no", "--keep-unit", "--quiet"])
            .arg(format!(
                "--network-namespace-path=/proc/{}/ns/net",
                netns.pid()
            ))
            .arg(format!("--machine={name}"))
            .arg("--directory")
            .arg(&copy)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("console log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("run systemd-nspawn (apt-get install systemd-container): {e}")
            });
        let mut container = Self {
            name: name.to_owned(),
            leader: 0,
            nspawn,
            dir,
        };
        container.leader = container.wait_leader();
        container.wait_booted();
        container
    }

    /// The container's init (its pid 1), as the host sees it: nspawn's child.
    fn wait_leader(&mut self) -> u32 {
        let nspawn = self.nspawn.id();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.nspawn.try_wait() {
                panic!(
                    "systemd-nspawn for {} exited with {status}:\n{}",
                    self.name,
                    self.console()
                );
            }
            let children = fs::read_to_string(format!("/proc/{nspawn}/task/{nspawn}/children"))
                .unwrap_or_default();
            for pid in children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "systemd" {
                    return pid;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{}'s systemd did not start:\n{}",
                self.name,
                self.console()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until systemd finished booting: `running`, or a clear failure. Until its bus is up,
    /// `systemctl` prints nothing, or `offline` when it finds no manager to ask yet (entered
    /// before systemd made its socket), and is asked again.
    fn wait_booted(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let out = self.root(&["systemctl", "is-system-running", "--wait"]);
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            match state.as_str() {
                "running" => return,
                "degraded" | "maintenance" | "stopping" => {
                    let failed = self.root(&["systemctl", "--failed", "--no-pager"]);
                    panic!(
                        "{} booted to state {state:?}, not running:\n{}",
                        self.name,
                        String::from_utf8_lossy(&failed.stdout)
                    );
                }
                _ => {}
            }
            if let Ok(Some(status)) = self.nspawn.try_wait() {
                panic!(
                    "systemd-nspawn for {} exited with {status}:\n{}",
                    self.name,
                    self.console()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not finish booting (state {state:?}, {}):\n{}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim(),
                self.console()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// What the container printed on its console.
    pub fn console(&self) -> String {
        fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn enter(&self) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.leader.to_string(), "-a", "env", "-i"])
            .arg("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .arg("LANG=C.UTF-8");
        cmd
    }

    /// Runs `argv` as root inside the container and returns its output, whatever its status.
    pub fn root(&self, argv: &[&str]) -> Output {
        self.enter()
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("nsenter into {}: {e}", self.name))
    }

    /// Runs the shell script `script` as root inside the container; panics with its output if
    /// it fails. Returns its stdout.
    pub fn root_sh(&self, script: &str) -> String {
        succeeded(&self.name, script, self.root(&["sh", "-ec", script]))
    }

    /// Runs the shell script `script` as [`USER`], with the environment a login would give
    /// (`XDG_RUNTIME_DIR`, the user bus), and returns its output, whatever its status.
    pub fn user(&self, script: &str) -> Output {
        self.enter()
            .args(["runuser", "-u", USER, "--", "env"])
            .arg(format!("HOME=/home/{USER}"))
            .arg(format!("USER={USER}"))
            .arg(format!("XDG_RUNTIME_DIR=/run/user/{USER_UID}"))
            .arg(format!(
                "DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/{USER_UID}/bus"
            ))
            .args(["sh", "-ec", script])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("nsenter into {}: {e}", self.name))
    }

    /// [`Container::user`] that must succeed; returns its stdout.
    pub fn user_sh(&self, script: &str) -> String {
        succeeded(&self.name, script, self.user(script))
    }

    /// Creates [`USER`] with lingering on, and waits for its user manager to run.
    pub fn add_lingering_user(&self) {
        self.root_sh(&format!("useradd --create-home --uid {USER_UID} {USER}"));
        self.root_sh(&format!("loginctl enable-linger {USER}"));
        let mut state = String::new();
        let running = crate::wait_until(Duration::from_secs(60), || {
            let out = self.user("systemctl --user is-system-running");
            state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            state == "running"
        });
        assert!(
            running,
            "{}: the user manager of {USER} is {state:?}, not running",
            self.name
        );
    }
}

fn succeeded(name: &str, script: &str, output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{name}: `{script}` failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.leader != 0 {
            let _ = self.root(&["systemctl", "poweroff", "--no-block"]);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        // nspawn killed uncleanly can leave the container's processes behind: kill its init,
        // which takes its whole pid namespace with it.
        if self.leader != 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.leader as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
