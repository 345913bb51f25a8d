//! cnsprcy measured side by side with serf (issue 16): the same scenarios, on the same machine, in
//! the same run, for N devices of each in network namespaces on one bridge ([`Lan`]).
//!
//! Scenarios, for each product in turn (a fresh [`Lan`] for each):
//! - **idle**: after the group has formed and settled, the bytes and packets each device puts on
//!   the wire (counted on its bridge port, so Ethernet, IP and transport headers are included)
//!   and the CPU time (utime + stime of its processes) over an idle window, per device per minute;
//! - **memory**: the PSS (`Pss` of `/proc/PID/smaps_rollup`) summed over one device's processes,
//!   each device running its own copy of the executables so their pages count once per device;
//!   for cnsprcy both `cnspr serve` and the four service processes as systemd starts them;
//! - **broadcast**: from just before `serf event -coalesce=false` / `cnspr send` starts on device
//!   0 to the latest start stamp of the handler scripts on all other devices (median);
//! - **cut**: device N-2's bridge port goes down (no RST, no FIN reaches anyone) until every
//!   other device's table says it failed (serf: its `member-failed` handler ran; cnsprcy: a
//!   `peer` event with `unreachable` on the API's `subscribe` stream); after the cut has lasted
//!   its time the port comes back, until every other device has it back (`member-join` /
//!   `direct` or `relayed`);
//! - **kill**: device N-1's processes get SIGKILL, until every other device says so.
//!
//! Optionally, broadcast alone at other group sizes (`--sizes`). Everything runs inside
//! namespaces this process makes; serf agents bind to their namespace's address only and have no
//! mDNS; cnsprcy's discovery runs as shipped, inside the namespaces. Each cnsprcy device's
//! runtime directory is on a tmpfs, as on a desktop or phone (see [`RuntimeDir`]); its other
//! directories are on the disk. Every process started here
//! dies with this process (`PR_SET_PDEATHSIG`), the namespaces with their last process, and the
//! temporary directory is removed when [`run`] returns or unwinds (also after Ctrl-C, see
//! [`catch_interrupts`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigHandler, Signal, kill, signal};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::bench::{Api, HANDLER_DRAIN, HANDLER_STAMP, follow_events, now_ns, percentile};
use crate::netns::Lan;

/// Port of every serf agent (memberlist's default), on its namespace's address.
const SERF_PORT: u16 = 7946;
/// Port of every cnsprcy device (the default).
const CNSPRCY_PORT: u16 = 7332;
/// From this group size on, neighbour entries are made static: the kernel's neighbour table is
/// shared by all namespaces and holds 1024 dynamic entries (gc_thresh3), which a full mesh of
/// N devices (N × (N-1) entries) outgrows; permanent entries are not counted.
const STATIC_ARP_FROM: usize = 30;
/// Pause between broadcasts, so one does not overlap the next.
const BROADCAST_GAP: Duration = Duration::from_millis(300);

/// What to run; see [`Options::parse`] for the command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// Devices of each product in the main scenarios.
    pub devices: usize,
    /// Run the main scenarios (idle, memory, broadcast, cut, kill) at `devices`.
    pub main: bool,
    /// Group sizes at which to measure broadcast alone.
    pub sizes: Vec<usize>,
    /// Broadcasts per measurement (the median is reported).
    pub broadcasts: usize,
    /// Wait after the group formed before the idle window.
    pub settle: Duration,
    /// The idle window.
    pub idle: Duration,
    /// How long a silent cut lasts (at least until every other device noticed, or the time-out).
    pub cut: Duration,
    /// Longest wait for a fault (or its healing) to be seen by everyone.
    pub fault_timeout: Duration,
    /// Short mode: small N, short windows, and cnsprcy with a 1 s / 2 s keepalive, so that CI
    /// finishes in about a minute. Its numbers are not comparable with a full run.
    pub quick: bool,
    /// Without serf (it could not be installed): cnsprcy alone, and no ratios.
    pub skip_serf: bool,
    /// Where `cnspr` and the `cnsprcy-*` service binaries are.
    pub bins: PathBuf,
    /// Where results.json and results.svg go.
    pub out: PathBuf,
}

pub const USAGE: &str = "\
cnsprcy side by side with serf: N devices of each in network namespaces on one bridge.

Usage: cargo bench -p cnsprcy-tests --bench vs_serf -- [OPTIONS]

Options:
  --devices N       devices of each product in the main scenarios (default 10)
  --sizes LIST      also measure broadcast at these group sizes, e.g. 5,20,40
  --no-main         only the --sizes broadcasts (skip idle, memory, broadcast at N, cut, kill)
  --broadcasts K    broadcasts per measurement, median reported (default 20)
  --idle SECS       idle window in seconds (default 60)
  --cut SECS        length of the silent link cut (default 40)
  --quick           short mode for CI: N=3, 3 broadcasts, 3 s idle, 5 s cut, cnsprcy keepalive 1 s
  --out DIR         where results.json and results.svg go (default: target/release/vs-serf)
  -h, --help        this text

Needs root (network namespaces). Installs serf with apt-get when it is missing.";

impl Options {
    /// The full run's defaults: N = 10, 20 broadcasts, a 60 s idle window, a 40 s cut.
    pub fn full(bins: PathBuf) -> Self {
        Self {
            devices: 10,
            main: true,
            sizes: Vec::new(),
            broadcasts: 20,
            settle: Duration::from_secs(15),
            idle: Duration::from_secs(60),
            cut: Duration::from_secs(40),
            fault_timeout: Duration::from_secs(120),
            quick: false,
            skip_serf: false,
            out: bins.join("vs-serf"),
            bins,
        }
    }

    /// The short mode CI runs: a minute for both products, numbers only to show it works.
    pub fn quick(bins: PathBuf) -> Self {
        Self {
            devices: 3,
            broadcasts: 3,
            settle: Duration::from_secs(1),
            idle: Duration::from_secs(3),
            cut: Duration::from_secs(5),
            fault_timeout: Duration::from_secs(20),
            quick: true,
            ..Self::full(bins)
        }
    }

    /// Reads the command line (the arguments after the program's name); `Err` holds a message
    /// for a usage error, or `None` for `--help`.
    pub fn parse(args: &[String], bins: PathBuf) -> Result<Self, Option<String>> {
        let quick = args.iter().any(|a| a == "--quick");
        let mut options = if quick {
            Self::quick(bins)
        } else {
            Self::full(bins)
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .cloned()
                    .ok_or_else(|| Some(format!("{name} needs a value; see --help")))
            };
            let number = |name: &str, text: String| {
                text.parse::<u64>()
                    .map_err(|_| Some(format!("{name} takes a whole number, not {text:?}")))
            };
            match arg.as_str() {
                "--help" | "-h" => return Err(None),
                // cargo bench passes --bench to every benchmark.
                "--bench" | "--quick" => {}
                "--no-main" => options.main = false,
                "--devices" => options.devices = number(arg, value(arg)?)? as usize,
                "--broadcasts" => options.broadcasts = number(arg, value(arg)?)? as usize,
                "--idle" => options.idle = Duration::from_secs(number(arg, value(arg)?)?),
                "--cut" => options.cut = Duration::from_secs(number(arg, value(arg)?)?),
                "--out" => options.out = PathBuf::from(value(arg)?),
                "--sizes" => {
                    options.sizes = value(arg)?
                        .split(',')
                        .map(|n| number(arg, n.trim().to_owned()).map(|n| n as usize))
                        .collect::<Result<_, _>>()?;
                }
                other => return Err(Some(format!("unknown argument {other:?}; see --help"))),
            }
        }
        for n in options.sizes.iter().chain([&options.devices]) {
            if !(3..=200).contains(n) {
                return Err(Some(format!(
                    "a group has 3 to 200 devices here, not {n} (one to cut and one to kill, and \
                     at least one to watch)"
                )));
            }
        }
        if options.broadcasts == 0 {
            return Err(Some("--broadcasts must be at least 1".into()));
        }
        if !options.main && options.sizes.is_empty() {
            return Err(Some(
                "--no-main needs --sizes: nothing to run otherwise".into(),
            ));
        }
        Ok(options)
    }
}

// ---------------------------------------------------------------------------------------------
// Interrupts and waiting

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT (Ctrl-C), SIGTERM and SIGHUP stop the run by unwinding at its next wait, so that
/// processes, namespaces and the temporary directory are cleaned up as on any other end.
pub fn catch_interrupts() {
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { signal(sig, SigHandler::Handler(on_interrupt)) }
            .unwrap_or_else(|e| panic!("install a handler for {sig}: {e}"));
    }
}

fn check_interrupt() {
    if INTERRUPTED.load(Ordering::SeqCst) {
        panic!("interrupted: stopping every daemon and removing the namespaces and temp files");
    }
}

/// Sleeps `duration`, waking every 20 ms to notice an interrupt.
fn pause(duration: Duration) {
    let end = Instant::now() + duration;
    loop {
        check_interrupt();
        let now = Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

/// Polls `check` every 20 ms until it returns `Some`, or `timeout` passes.
fn poll<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        check_interrupt();
        if let Some(found) = check() {
            return Some(found);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// serf from Debian's packages

/// The `serf` executable, installed with `apt-get` when it is missing. `Err` says why it could
/// not be had.
pub fn ensure_serf() -> Result<PathBuf, String> {
    if let Some(found) = which("serf") {
        return Ok(found);
    }
    if !crate::is_root() {
        return Err(
            "serf is not installed, and only root can install it (apt-get install serf)".into(),
        );
    }
    eprintln!("serf is missing: installing Debian's package (apt-get install -y serf)");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "serf"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let _ = Command::new("apt-get")
            .args(["update", "-qq"])
            .stdin(Stdio::null())
            .status();
        if !install() {
            return Err(
                "apt-get install serf failed (see its output above); install the \
                        Debian package serf by hand"
                    .into(),
            );
        }
    }
    // The package enables serf.service; an agent on the host's own network is not wanted.
    if Path::new("/run/systemd/system").exists() {
        let _ = Command::new("systemctl")
            .args(["disable", "--now", "serf.service"])
            .stdin(Stdio::null())
            .status();
        eprintln!("disabled the package's serf.service: the benchmark starts its own agents");
    }
    which("serf").ok_or_else(|| "apt-get installed serf, but it is not on PATH".into())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

// ---------------------------------------------------------------------------------------------
// What both products are measured with

/// Something a device's table recorded about another device, and when.
#[derive(Clone, Debug)]
struct Seen {
    at_ns: u128,
    observer: usize,
    target: String,
    up: bool,
}

/// The first time each observer recorded `target` as `up` (or down) at or after `since_ns`;
/// `Some(latest of those)` once every observer has.
fn seen_by_all(
    seen: &[Seen],
    target: &str,
    up: bool,
    since_ns: u128,
    observers: &[usize],
) -> Option<u128> {
    let mut latest = 0;
    for &observer in observers {
        let first = seen
            .iter()
            .filter(|s| {
                s.observer == observer && s.target == target && s.up == up && s.at_ns >= since_ns
            })
            .map(|s| s.at_ns)
            .min()?;
        latest = latest.max(first);
    }
    Some(latest)
}

/// One product's group of devices, formed and running.
trait Group {
    /// Starts `cmd` (the product's own CLI) on device 0 to broadcast event/tag `round`; returns
    /// the wall-clock time just before it started.
    fn start_broadcast(&mut self, round: usize) -> u128;
    /// The handler start stamp for broadcast `round` on device `i`, once there is one.
    fn handler_stamp(&self, i: usize, round: usize) -> Option<u128>;
    /// Everything the devices' tables recorded so far (handler logs, event streams).
    fn seen(&self) -> Vec<Seen>;
    /// The long-running processes of device `i`.
    fn pids(&mut self, i: usize) -> Vec<u32>;
    /// SIGKILL to every process of device `i`.
    fn kill(&mut self, i: usize);
    /// The name device `i` has in the others' tables.
    fn name(&self, i: usize) -> String {
        format!("d{i}")
    }
    /// Device 0's PSS in KiB when it runs as separate service processes, if the product has
    /// such a form.
    fn services_pss(&mut self, _settle: Duration) -> Option<u64> {
        None
    }
    /// Changes of the member tables themselves, when the product's handlers see them later.
    fn table_seen(&self) -> Option<Vec<Seen>> {
        None
    }
}

/// Median milliseconds from send to the last handler started, over `count` broadcasts, and the
/// samples; broadcasts that did not reach everyone within 30 s count as missing.
fn broadcasts(group: &mut dyn Group, devices: usize, count: usize) -> (Option<f64>, Vec<f64>) {
    let mut samples = Vec::new();
    for round in 0..count {
        let sent = group.start_broadcast(round);
        let last = poll(Duration::from_secs(30), || {
            (1..devices)
                .map(|i| group.handler_stamp(i, round))
                .collect::<Option<Vec<u128>>>()
                .map(|stamps| stamps.into_iter().max().unwrap_or(sent))
        });
        match last {
            Some(last) => samples.push(last.saturating_sub(sent) as f64 / 1e6),
            None => eprintln!("  broadcast {round} did not reach every device within 30 s"),
        }
        pause(BROADCAST_GAP);
    }
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    let median = (!sorted.is_empty()).then(|| percentile(&sorted, 0.5));
    (median, samples)
}

/// Seconds from `since` until every observer has recorded `target` going down (`up` false) or
/// coming back; `None` after `timeout`.
fn wait_seen(
    group: &dyn Group,
    target: usize,
    up: bool,
    since: u128,
    observers: &[usize],
    timeout: Duration,
) -> Option<f64> {
    let name = group.name(target);
    poll(timeout, || {
        seen_by_all(&group.seen(), &name, up, since, observers)
    })
    .map(|at| at.saturating_sub(since) as f64 / 1e9)
}

/// utime + stime of `pid` in seconds, 0 when it is gone.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start with field 3, the state.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime is field 14, stime 15: indexes 11 and 12 after the state (field 3).
    (ticks(11) + ticks(12)) as f64 / clock_ticks()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a constant of the system.
    let ticks = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// PSS of `pid` in KiB (`Pss:` of smaps_rollup), 0 when it is gone.
fn pss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Bytes and packets each node sent, from the receive counters of its bridge port (a frame
/// the node sends is one the port receives: Ethernet header, IP and transport included).
fn port_counters(lan: &Lan) -> Vec<(u64, u64)> {
    let out = lan.bridge().run(&["ip", "-j", "-s", "link", "show"]);
    let links: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    (0..lan.nodes().len())
        .map(|i| {
            let port = format!("{}p{i}", lan.interface_prefix());
            links
                .as_array()
                .and_then(|links| links.iter().find(|l| l["ifname"] == port.as_str()))
                .map(|l| {
                    let rx = &l["stats64"]["rx"];
                    (
                        rx["bytes"].as_u64().unwrap_or(0),
                        rx["packets"].as_u64().unwrap_or(0),
                    )
                })
                .unwrap_or_else(|| panic!("no counters for bridge port {port}: {out}"))
        })
        .collect()
}

/// Permanent neighbour entries for every other node, in every node.
fn static_neighbours(lan: &Lan, dir: &Path) {
    let n = lan.nodes().len();
    let macs: Vec<String> = lan
        .nodes()
        .iter()
        .map(|node| {
            let out = node.run(&["ip", "-j", "link", "show", "eth0"]);
            let links: Value = serde_json::from_str(&out).expect("ip -j prints JSON");
            links[0]["address"]
                .as_str()
                .unwrap_or_else(|| panic!("no MAC address for eth0: {out}"))
                .to_owned()
        })
        .collect();
    for (i, node) in lan.nodes().iter().enumerate() {
        let mut script = String::new();
        for (j, mac) in macs.iter().enumerate().filter(|&(j, _)| j != i) {
            let _ = writeln!(
                script,
                "neigh replace {} lladdr {mac} dev eth0 nud permanent",
                lan.addr(j)
            );
        }
        let file = dir.join(format!("neigh-{i}"));
        fs::write(&file, script).expect("write the neighbour batch");
        node.run(&["ip", "-batch", &file.to_string_lossy()]);
    }
    eprintln!("  {n} devices: static neighbour entries in every namespace");
}

/// Copies `program` to `dir` (so that the device's pages of it are its own), executable.
fn private_copy(program: &Path, dir: &Path) -> PathBuf {
    fs::create_dir_all(dir).expect("create the bin dir");
    let name = program.file_name().expect("a file name");
    let copy = dir.join(name);
    fs::copy(program, &copy)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", program.display(), copy.display()));
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).expect("chmod");
    copy
}

fn write_script(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().expect("a parent")).expect("create the script's dir");
    fs::write(path, text).expect("write the script");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn stop(child: &mut Child) {
    if child.try_wait().ok().flatten().is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// serf

struct SerfGroup<'a> {
    lan: &'a Lan,
    dirs: Vec<PathBuf>,
    agents: Vec<Child>,
    /// `EventMember*` lines of the agents' logs, stamped when read: when the member table
    /// changed, before serf's member-event coalescing delays the handler.
    log_seen: Arc<Mutex<Vec<Seen>>>,
    /// Event names of the broadcasts, `b<round>`.
    serf: PathBuf,
}

/// The event handler of every agent: the first thing it does is take the time; one line per
/// user event (`user NAME NS`) and per member of a member event (`member-failed NAME NS`).
fn serf_handler(log: &Path) -> String {
    let log = log.display();
    format!(
        "{HANDLER_STAMP}if [ \"$SERF_EVENT\" = user ]; then\n  \
         echo \"user $SERF_USER_EVENT $t\" >> {log}\n  {HANDLER_DRAIN}else\n  \
         while read -r name rest; do echo \"$SERF_EVENT $name $t\" >> {log}; done\nfi\n"
    )
}

impl<'a> SerfGroup<'a> {
    fn start(lan: &'a Lan, serf: &Path, root: &Path) -> Self {
        let n = lan.nodes().len();
        let mut group = Self {
            lan,
            dirs: Vec::new(),
            agents: Vec::new(),
            log_seen: Arc::new(Mutex::new(Vec::new())),
            serf: serf.to_owned(),
        };
        for i in 0..n {
            let dir = root.join(format!("serf-d{i}"));
            let handler = dir.join("handler.sh");
            write_script(&handler, &serf_handler(&dir.join("events.log")));
            let copy = private_copy(serf, &dir.join("bin"));
            let bind = format!("{}:{SERF_PORT}", lan.addr(i));
            let mut cmd = lan.node(i).command(&copy);
            cmd.args(["agent", "-node", &format!("d{i}"), "-bind", &bind])
                .args(["-rpc-addr", "127.0.0.1:7373", "-log-level", "info"])
                .arg(format!("-event-handler={}", handler.display()));
            if i > 0 {
                cmd.args(["-join", &format!("{}:{SERF_PORT}", lan.addr(0))]);
            }
            let stderr = fs::File::create(dir.join("agent.stderr")).expect("log file");
            cmd.env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env("HOME", &dir)
                .current_dir(&dir)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(stderr);
            let mut child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("start serf agent d{i}: {e}"));
            let stdout = child.stdout.take().expect("piped stdout");
            let seen = Arc::clone(&group.log_seen);
            let log_copy = dir.join("agent.log");
            std::thread::spawn(move || read_serf_log(i, stdout, &seen, &log_copy));
            group.agents.push(child);
            group.dirs.push(dir);
            // Every other agent joins d0: it must be listening first.
            if i == 0 {
                let up = poll(Duration::from_secs(30), || {
                    (group.members(0) >= 1).then_some(())
                });
                assert!(up.is_some(), "serf agent d0 did not answer on its RPC port");
            }
        }
        let formed = poll(Duration::from_secs(60 + n as u64), || {
            (0..n).all(|i| group.members(i) == n).then_some(())
        });
        assert!(
            formed.is_some(),
            "the serf cluster of {n} did not form within a minute"
        );
        group
    }

    /// Alive members in device `i`'s table (0 if its agent does not answer).
    fn members(&self, i: usize) -> usize {
        let out = self
            .lan
            .node(i)
            .command(&self.serf)
            .args(["members", "-status=alive", "-rpc-addr=127.0.0.1:7373"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output();
        match out {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.trim().is_empty())
                .count(),
            _ => 0,
        }
    }

    fn handler_log(&self, i: usize) -> String {
        fs::read_to_string(self.dirs[i].join("events.log")).unwrap_or_default()
    }

    /// The member events of every handler log, as `Seen`.
    fn handler_seen(&self) -> Vec<Seen> {
        let mut seen = Vec::new();
        for i in 0..self.dirs.len() {
            for line in self.handler_log(i).lines() {
                let mut fields = line.split_whitespace();
                let (Some(event), Some(name), Some(at)) =
                    (fields.next(), fields.next(), fields.next())
                else {
                    continue;
                };
                let up = match event {
                    "member-join" => true,
                    "member-failed" => false,
                    _ => continue,
                };
                if let Ok(at_ns) = at.parse() {
                    seen.push(Seen {
                        at_ns,
                        observer: i,
                        target: name.to_owned(),
                        up,
                    });
                }
            }
        }
        seen
    }
}

/// Reads an agent's log as it comes, keeps a copy, and stamps its member events.
fn read_serf_log(
    observer: usize,
    stdout: impl std::io::Read,
    seen: &Mutex<Vec<Seen>>,
    copy: &Path,
) {
    let mut copy = fs::File::create(copy).ok();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let at_ns = now_ns();
        if let Some(file) = copy.as_mut() {
            let _ = writeln!(file, "{line}");
        }
        // "... [INFO] serf: EventMemberFailed: d8 10.231.5.9"
        for (marker, up) in [("EventMemberFailed: ", false), ("EventMemberJoin: ", true)] {
            if let Some(rest) = line.split(marker).nth(1)
                && let Some(name) = rest.split_whitespace().next()
            {
                seen.lock().unwrap_or_else(|e| e.into_inner()).push(Seen {
                    at_ns,
                    observer,
                    target: name.to_owned(),
                    up,
                });
            }
        }
    }
}

impl Group for SerfGroup<'_> {
    fn start_broadcast(&mut self, round: usize) -> u128 {
        let mut cmd = self.lan.node(0).command(&self.serf);
        cmd.args(["event", "-coalesce=false", "-rpc-addr=127.0.0.1:7373"])
            .arg(format!("b{round}"))
            .arg("x")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let sent = now_ns();
        let status = cmd.status().expect("run serf event");
        assert!(status.success(), "serf event failed: {status}");
        sent
    }

    fn handler_stamp(&self, i: usize, round: usize) -> Option<u128> {
        let event = format!("b{round}");
        self.handler_log(i).lines().find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next()? == "user" && fields.next()? == event)
                .then(|| fields.next()?.parse().ok())?
        })
    }

    fn seen(&self) -> Vec<Seen> {
        self.handler_seen()
    }

    fn pids(&mut self, i: usize) -> Vec<u32> {
        vec![self.agents[i].id()]
    }

    fn kill(&mut self, i: usize) {
        let _ = self.agents[i].kill();
        let _ = self.agents[i].wait();
    }

    fn table_seen(&self) -> Option<Vec<Seen>> {
        Some(
            self.log_seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

impl Drop for SerfGroup<'_> {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            stop(agent);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// cnsprcy

/// One cnsprcy device: its XDG directories, its own copies of the executables, its processes.
struct CnsprcyDevice {
    name: String,
    root: PathBuf,
    runtime: RuntimeDir,
    cnspr: PathBuf,
    processes: Vec<Child>,
}

/// A device's `XDG_RUNTIME_DIR`: on a tmpfs (in `/dev/shm`), as `/run/user/UID` is wherever
/// systemd-logind runs, so that what the services keep there (their sockets, the handler
/// service's start records) costs no disk; otherwise every append there would wait behind the
/// other devices' syncs on this machine's one disk. Under the device's directory where there is
/// no `/dev/shm`. Removed with the device.
struct RuntimeDir {
    path: PathBuf,
    _tmpfs: Option<tempfile::TempDir>,
}

impl RuntimeDir {
    fn new(device_dir: &Path) -> Self {
        match (tempfile::Builder::new())
            .prefix("cnsprcy-vs-serf-run-")
            .tempdir_in("/dev/shm")
        {
            Ok(dir) => Self {
                path: dir.path().to_owned(),
                _tmpfs: Some(dir),
            },
            Err(_) => {
                let path = device_dir.join("run");
                fs::create_dir_all(&path).expect("create the runtime dir");
                Self { path, _tmpfs: None }
            }
        }
    }
}

impl CnsprcyDevice {
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.root.join("home"))
            .env("XDG_CONFIG_HOME", self.root.join("config"))
            .env("XDG_DATA_HOME", self.root.join("data"))
            .env("XDG_RUNTIME_DIR", &self.runtime.path)
            .stdin(Stdio::null());
        cmd
    }

    fn socket(&self) -> PathBuf {
        self.runtime.path.join("cnsprcy/cnsprcy.sock")
    }

    /// `cnspr ARGS --json` to completion; its JSON, or `None` if it failed.
    fn cnspr_json(&self, args: &[&str]) -> Option<Value> {
        let out = self
            .command(&self.cnspr)
            .args(args)
            .arg("--json")
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())?
    }

    fn spawn(&mut self, lan: &Lan, i: usize, program: &Path, args: &[&str]) {
        let name = program.file_name().unwrap_or_default().to_string_lossy();
        self.spawn_as(lan, i, program, &name, args);
    }

    /// Starts `program` with `name` as its argv[0] (`cnspr` started as `cnsprcy-mesh` runs the
    /// mesh service), logging to `name.log`.
    fn spawn_as(&mut self, lan: &Lan, i: usize, program: &Path, name: &str, args: &[&str]) {
        use std::os::unix::process::CommandExt;
        let log = fs::File::create(self.root.join(format!("{name}.log"))).expect("log file");
        let mut cmd = self.command(program);
        cmd.arg0(name)
            .args(args)
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        lan.node(i).enter(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} for {}: {e}", self.name));
        self.processes.push(child);
    }

    fn wait_ready(&self) {
        let ready = poll(crate::STARTUP_TIMEOUT, || {
            self.cnspr_json(&["status"]).map(|_| ())
        });
        assert!(
            ready.is_some(),
            "{} did not answer `cnspr status` within {:?}; its logs are in {}",
            self.name,
            crate::STARTUP_TIMEOUT,
            self.root.display()
        );
    }

    fn stop_all(&mut self) {
        for child in &mut self.processes {
            if child.try_wait().ok().flatten().is_none() {
                let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            }
        }
        for child in &mut self.processes {
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            stop(child);
        }
        self.processes.clear();
    }
}

struct CnsprcyGroup<'a> {
    lan: &'a Lan,
    devices: Vec<CnsprcyDevice>,
    /// `peer` events of every device's `subscribe` stream, stamped when read.
    events: Arc<Mutex<Vec<Seen>>>,
}

/// The handler of the `bench` tags: first thing, the time; one line `TAG NS` per run.
fn cnsprcy_handler(log: &Path) -> String {
    format!(
        "{HANDLER_STAMP}echo \"$CNSPRCY_TAG $t\" >> {}\n{HANDLER_DRAIN}",
        log.display()
    )
}

impl<'a> CnsprcyGroup<'a> {
    fn start(lan: &'a Lan, bins: &Path, root: &Path, quick: bool) -> Self {
        let n = lan.nodes().len();
        let cnspr = bins.join("cnspr");
        assert!(
            cnspr.exists(),
            "{} is missing: build it first (cargo build --release --workspace)",
            cnspr.display()
        );
        let mut group = Self {
            lan,
            devices: Vec::new(),
            events: Arc::new(Mutex::new(Vec::new())),
        };
        for i in 0..n {
            let dir = root.join(format!("cnsprcy-d{i}"));
            for sub in ["home", "config/cnsprcy", "data"] {
                fs::create_dir_all(dir.join(sub)).expect("create XDG dir");
            }
            let runtime = RuntimeDir::new(&dir);
            fs::set_permissions(&runtime.path, fs::Permissions::from_mode(0o700))
                .expect("chmod runtime dir");
            // The product's defaults (heartbeat 2 s, keepalive 60 s / 10 s, discovery on),
            // except in the short mode, which must notice a cut within seconds.
            let keepalive = if quick {
                "[mesh]\nkeepalive_interval = \"1s\"\nkeepalive_timeout = \"2s\"\n"
            } else {
                ""
            };
            fs::write(
                dir.join("config/cnsprcy/config.toml"),
                format!("name = \"d{i}\"\n{keepalive}"),
            )
            .expect("write config");
            write_script(
                &dir.join("config/cnsprcy/handlers/bench/_default.sh"),
                &cnsprcy_handler(&dir.join("events.log")),
            );
            let copy = private_copy(&cnspr, &dir.join("bin"));
            let mut device = CnsprcyDevice {
                name: format!("d{i}"),
                root: dir,
                runtime,
                cnspr: copy.clone(),
                processes: Vec::new(),
            };
            device.spawn(lan, i, &copy, &["serve"]);
            group.devices.push(device);
        }
        for device in &group.devices {
            device.wait_ready();
        }
        let keys: Vec<String> = group
            .devices
            .iter()
            .map(|d| {
                d.cnspr_json(&["manage", "id"])
                    .and_then(|id| id["public_key"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| panic!("no public key from {}", d.name))
            })
            .collect();
        for (i, device) in group.devices.iter().enumerate() {
            let mut api = Api::connect_path(&device.socket());
            for (j, key) in keys.iter().enumerate().filter(|&(j, _)| j != i) {
                api.call(
                    "members.add",
                    json!({"name": format!("d{j}"), "public_key": key,
                           "addresses": [format!("{}:{CNSPRCY_PORT}", lan.addr(j))]}),
                );
            }
        }
        for i in 0..n {
            group.subscribe(i);
        }
        group.wait_formed();
        group
    }

    /// Follows device `i`'s event stream on a thread of its own, until the device stops.
    fn subscribe(&self, observer: usize) {
        let events = Arc::clone(&self.events);
        follow_events(&self.devices[observer].socket(), move |at_ns, event| {
            if event["event"] == "peer"
                && let (Some(target), Some(status)) =
                    (event["name"].as_str(), event["status"].as_str())
            {
                events.lock().unwrap_or_else(|e| e.into_inner()).push(Seen {
                    at_ns,
                    observer,
                    target: target.to_owned(),
                    up: status != "unreachable",
                });
            }
        });
    }

    /// Waits until every device has every other one `direct`.
    fn wait_formed(&self) {
        let n = self.devices.len();
        let mut apis: Vec<Api> = self
            .devices
            .iter()
            .map(|d| Api::connect_path(&d.socket()))
            .collect();
        let formed = poll(Duration::from_secs(60 + n as u64), || {
            apis.iter_mut()
                .all(|api| {
                    api.call("peers", Value::Null).as_array().is_some_and(|p| {
                        p.iter().filter(|p| p["status"] == "direct").count() == n - 1
                    })
                })
                .then_some(())
        });
        assert!(formed.is_some(), "the cnsprcy mesh of {n} did not form");
    }

    fn handler_log(&self, i: usize) -> String {
        fs::read_to_string(self.devices[i].root.join("events.log")).unwrap_or_default()
    }

    /// Replaces device 0's `cnspr serve` with the four service processes as systemd starts
    /// them (its own copy of `cnspr`, started once under each service's name), waits until the
    /// mesh is whole again, and returns their PSS summed, in KiB; then goes back to `serve`.
    fn services(&mut self, settle: Duration) -> u64 {
        let lan = self.lan;
        let device = &mut self.devices[0];
        device.stop_all();
        let cnspr = device.cnspr.clone();
        // The helpers first: they wait for the mesh service, as under systemd.
        for name in [
            "cnsprcy-netwatch",
            "cnsprcy-discovery",
            "cnsprcy-handlers",
            "cnsprcy-mesh",
        ] {
            device.spawn_as(lan, 0, &cnspr, name, &[]);
        }
        device.wait_ready();
        let all_connected = poll(Duration::from_secs(30), || {
            device.cnspr_json(&["status"]).and_then(|status| {
                status["services"]
                    .as_array()?
                    .iter()
                    .all(|s| s["state"] != "disconnected")
                    .then_some(())
            })
        });
        assert!(
            all_connected.is_some(),
            "d0's four services did not connect"
        );
        self.wait_formed();
        pause(settle);
        let pss = self.devices[0]
            .processes
            .iter()
            .map(|c| pss_kib(c.id()))
            .sum();
        let device = &mut self.devices[0];
        device.stop_all();
        let cnspr = device.cnspr.clone();
        device.spawn(lan, 0, &cnspr, &["serve"]);
        device.wait_ready();
        self.subscribe(0);
        self.wait_formed();
        pss
    }
}

impl Group for CnsprcyGroup<'_> {
    fn start_broadcast(&mut self, round: usize) -> u128 {
        let device = &self.devices[0];
        let mut cmd = device.command(&device.cnspr);
        cmd.args(["send", &format!("bench/b{round}"), "x"])
            .stdout(Stdio::null());
        self.lan.node(0).enter(&mut cmd);
        let sent = now_ns();
        let status = cmd.status().expect("run cnspr send");
        assert!(status.success(), "cnspr send failed: {status}");
        sent
    }

    fn handler_stamp(&self, i: usize, round: usize) -> Option<u128> {
        let tag = format!("bench/b{round}");
        self.handler_log(i).lines().find_map(|line| {
            let (t, at) = line.split_once(' ')?;
            (t == tag).then(|| at.trim().parse().ok())?
        })
    }

    fn seen(&self) -> Vec<Seen> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn pids(&mut self, i: usize) -> Vec<u32> {
        self.devices[i].processes.iter().map(Child::id).collect()
    }

    fn kill(&mut self, i: usize) {
        for child in &mut self.devices[i].processes {
            let _ = child.kill();
        }
        for child in &mut self.devices[i].processes {
            let _ = child.wait();
        }
    }

    fn services_pss(&mut self, settle: Duration) -> Option<u64> {
        Some(self.services(settle))
    }
}

impl Drop for CnsprcyGroup<'_> {
    fn drop(&mut self) {
        for device in &mut self.devices {
            for child in &mut device.processes {
                stop(child);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The scenarios

/// One product's measurements: key → value, plus notes.
#[derive(Default, Debug, Clone)]
pub struct Measured {
    pub values: BTreeMap<String, f64>,
    pub samples: BTreeMap<String, Vec<f64>>,
    pub notes: Vec<String>,
}

impl Measured {
    fn set(&mut self, key: &str, value: Option<f64>) {
        if let Some(value) = value {
            self.values.insert(key.to_owned(), value);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Product {
    Serf,
    Cnsprcy,
}

impl Product {
    fn name(self) -> &'static str {
        match self {
            Product::Serf => "serf",
            Product::Cnsprcy => "cnsprcy",
        }
    }
}

/// Makes the Lan for `n` devices of one product, with static neighbours when it is large.
fn lan_for(n: usize, dir: &Path) -> Lan {
    let lan = Lan::new(n);
    if n >= STATIC_ARP_FROM {
        static_neighbours(&lan, dir);
    }
    lan
}

/// Starts `n` devices of `product` on `lan` and runs `scenarios` on them.
fn with_group<T>(
    product: Product,
    lan: &Lan,
    options: &Options,
    serf: &Path,
    dir: &Path,
    scenarios: impl FnOnce(&mut dyn Group) -> T,
) -> T {
    let started = Instant::now();
    let n = lan.nodes().len();
    match product {
        Product::Serf => {
            let mut group = SerfGroup::start(lan, serf, dir);
            eprintln!(
                "  {n} serf agents formed in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            scenarios(&mut group)
        }
        Product::Cnsprcy => {
            let mut group = CnsprcyGroup::start(lan, &options.bins, dir, options.quick);
            eprintln!(
                "  {n} cnsprcy devices formed in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            scenarios(&mut group)
        }
    }
}

/// The main scenarios for one product at `options.devices`.
fn main_scenarios(product: Product, options: &Options, serf: &Path, root: &Path) -> Measured {
    let n = options.devices;
    eprintln!("{}: {n} devices", product.name());
    let dir = root.join(format!("{}-{n}", product.name()));
    fs::create_dir_all(&dir).expect("create the run dir");
    let lan = lan_for(n, &dir);
    with_group(product, &lan, options, serf, &dir, |group| {
        scenarios(group, &lan, options)
    })
}

fn scenarios(group: &mut dyn Group, lan: &Lan, options: &Options) -> Measured {
    let n = lan.nodes().len();
    let mut measured = Measured::default();
    eprintln!(
        "  settling {:?}, then idle for {:?}",
        options.settle, options.idle
    );
    pause(options.settle);

    // Idle: bytes, packets and CPU over the window.
    let pids: Vec<Vec<u32>> = (0..n).map(|i| group.pids(i)).collect();
    let cpu = |pids: &[Vec<u32>]| -> Vec<f64> {
        pids.iter()
            .map(|p| p.iter().map(|&pid| cpu_seconds(pid)).sum())
            .collect()
    };
    let wire_before = port_counters(lan);
    let cpu_before = cpu(&pids);
    let started = Instant::now();
    pause(options.idle);
    let wire_after = port_counters(lan);
    let cpu_after = cpu(&pids);
    let per_minute = 60.0 / started.elapsed().as_secs_f64();
    let sent = |i: usize| {
        (
            wire_after[i].0.saturating_sub(wire_before[i].0) as f64,
            wire_after[i].1.saturating_sub(wire_before[i].1) as f64,
        )
    };
    let bytes: f64 = (0..n).map(|i| sent(i).0).sum();
    let packets: f64 = (0..n).map(|i| sent(i).1).sum();
    let cpu_used: f64 = (0..n).map(|i| cpu_after[i] - cpu_before[i]).sum();
    measured.set("idle_bytes", Some(bytes / n as f64 * per_minute / 1000.0));
    measured.set("idle_packets", Some(packets / n as f64 * per_minute));
    measured.set("idle_cpu", Some(cpu_used / n as f64 * per_minute));
    measured.samples.insert(
        "idle_bytes_per_device_per_minute".into(),
        (0..n).map(|i| sent(i).0 * per_minute).collect(),
    );
    measured.samples.insert(
        "idle_cpu_s_per_device_per_minute".into(),
        (0..n)
            .map(|i| (cpu_after[i] - cpu_before[i]) * per_minute)
            .collect(),
    );

    // Memory: PSS of each device's processes; the median over the devices.
    let mut pss: Vec<f64> = (0..n)
        .map(|i| group.pids(i).iter().map(|&p| pss_kib(p)).sum::<u64>() as f64)
        .collect();
    measured
        .samples
        .insert("memory_kib_per_device".into(), pss.clone());
    pss.sort_by(f64::total_cmp);
    measured.set("memory", Some(percentile(&pss, 0.5) / 1024.0));
    let settle = options.settle.max(Duration::from_secs(3));
    if let Some(services) = group.services_pss(settle) {
        measured.set("memory_services", Some(services as f64 / 1024.0));
    }

    // Broadcast from d0.
    eprintln!("  {} broadcasts", options.broadcasts);
    let (median, samples) = broadcasts(group, n, options.broadcasts);
    measured.set("broadcast", median);
    measured.samples.insert("broadcast_ms".into(), samples);

    // A silent cut of d(n-2), and its end.
    let cut = n - 2;
    let observers: Vec<usize> = (0..n).filter(|&i| i != cut).collect();
    eprintln!("  cutting d{cut}'s link (bridge port down)");
    let cut_at = now_ns();
    let cut_clock = Instant::now();
    lan.cut(cut);
    let down = wait_seen(group, cut, false, cut_at, &observers, options.fault_timeout);
    measured.set("cut", down);
    if down.is_none() {
        measured.notes.push(format!(
            "the cut was not seen by every other device within {:?}",
            options.fault_timeout
        ));
    }
    pause(options.cut.saturating_sub(cut_clock.elapsed()));
    let cut_lasted = cut_clock.elapsed();
    let healed_at = now_ns();
    lan.restore(cut);
    eprintln!(
        "  d{cut}'s link back after {:.1} s",
        cut_lasted.as_secs_f64()
    );
    let back = wait_seen(
        group,
        cut,
        true,
        healed_at,
        &observers,
        options.fault_timeout,
    );
    measured.set("healed", back);
    measured.set("cut_lasted", Some(cut_lasted.as_secs_f64()));
    if back.is_none() {
        measured.notes.push(format!(
            "after the cut healed, not every other device had d{cut} back within {:?}",
            options.fault_timeout
        ));
    }
    pause(Duration::from_secs(2));

    // SIGKILL to d(n-1).
    let killed = n - 1;
    let kill_observers: Vec<usize> = (0..n).filter(|&i| i != killed).collect();
    eprintln!("  SIGKILL to d{killed}");
    let kill_at = now_ns();
    group.kill(killed);
    let failed = wait_seen(
        group,
        killed,
        false,
        kill_at,
        &kill_observers,
        options.fault_timeout,
    );
    measured.set("killed", failed);
    if failed.is_none() {
        measured.notes.push(format!(
            "the killed device was not seen failed by every other one within {:?}",
            options.fault_timeout
        ));
    }

    // The same faults as the member tables themselves changed (serf: the agents' logs), before
    // any delay between a table's change and the handlers.
    if let Some(seen) = group.table_seen() {
        let after = |target: usize, up: bool, since: u128, observers: &[usize]| {
            seen_by_all(&seen, &group.name(target), up, since, observers)
                .map(|t| t.saturating_sub(since) as f64 / 1e9)
        };
        measured.set("cut_table", after(cut, false, cut_at, &observers));
        measured.set("healed_table", after(cut, true, healed_at, &observers));
        measured.set(
            "killed_table",
            after(killed, false, kill_at, &kill_observers),
        );
    }
    measured
}

/// Broadcast alone at group size `n`.
fn broadcast_at(
    product: Product,
    n: usize,
    options: &Options,
    serf: &Path,
    root: &Path,
) -> Option<f64> {
    eprintln!("{}: broadcast at {n} devices", product.name());
    let dir = root.join(format!("{}-{n}-broadcast", product.name()));
    fs::create_dir_all(&dir).expect("create the run dir");
    let lan = lan_for(n, &dir);
    with_group(product, &lan, options, serf, &dir, |group| {
        pause(options.settle.min(Duration::from_secs(5)));
        let (median, _) = broadcasts(group, n, options.broadcasts);
        median
    })
}

// ---------------------------------------------------------------------------------------------
// The report

/// A row of the table: key in [`Measured::values`], what it measures, its unit and how many
/// decimals to show.
struct RowSpec {
    key: String,
    label: String,
    unit: &'static str,
    decimals: usize,
}

fn row_specs(options: &Options, serf: &Measured, cnsprcy: &Measured) -> Vec<RowSpec> {
    let row = |key: &str, label: String, unit, decimals| RowSpec {
        key: key.to_owned(),
        label,
        unit,
        decimals,
    };
    let cut = [serf, cnsprcy]
        .iter()
        .filter_map(|m| m.values.get("cut_lasted"))
        .fold(0.0f64, |a, &b| a.max(b));
    let n = options.devices;
    let mut rows = Vec::new();
    if options.main {
        rows.extend([
            row(
                "broadcast",
                "broadcast, send → last handler (median)".into(),
                "ms",
                1,
            ),
            row(
                "killed",
                "SIGKILLed device seen failed by all others".into(),
                "s",
                3,
            ),
            row(
                "cut",
                "link cut silently, seen unreachable by all others".into(),
                "s",
                3,
            ),
            row(
                "healed",
                format!("back to everyone after a {cut:.0} s cut heals"),
                "s",
                3,
            ),
            row(
                "idle_bytes",
                "idle wire bytes per device per minute (headers included)".into(),
                "KB",
                1,
            ),
            row(
                "idle_packets",
                "idle packets per device per minute".into(),
                "",
                0,
            ),
            row("idle_cpu", "idle CPU per device per minute".into(), "s", 3),
            row(
                "memory",
                format!(
                    "memory one device pays (PSS of its processes, {} peers)",
                    n - 1
                ),
                "MB",
                1,
            ),
            row(
                "memory_services",
                "the same, cnsprcy as four service processes (as under systemd)".into(),
                "MB",
                1,
            ),
        ]);
    }
    for size in &options.sizes {
        rows.push(row(
            &format!("broadcast_{size}"),
            format!("broadcast at {size} devices (median)"),
            "ms",
            1,
        ));
    }
    rows
}

/// The value shown for `key`: serf's memory row for the services row too (the comparison is
/// with serf's agent).
fn value_of(m: &Measured, key: &str, product: Product) -> Option<f64> {
    match (key, product) {
        ("memory_services", Product::Serf) => m.values.get("memory").copied(),
        _ => m.values.get(key).copied(),
    }
}

fn show(value: Option<f64>, spec: &RowSpec) -> String {
    match value {
        Some(v) if spec.unit.is_empty() => format!("{v:.0}"),
        Some(v) => format!("{v:.*} {}", spec.decimals, spec.unit),
        None => "—".into(),
    }
}

fn ratio(serf: Option<f64>, cnsprcy: Option<f64>) -> Option<f64> {
    match (serf, cnsprcy) {
        (Some(s), Some(c)) if s > 0.0 => Some(c / s),
        _ => None,
    }
}

fn show_ratio(ratio: Option<f64>) -> String {
    match ratio {
        Some(r) if r < 0.095 => format!("{r:.3}×"),
        Some(r) => format!("{r:.2}×"),
        None => "—".into(),
    }
}

/// Everything a run found, ready to print and save.
pub struct Report {
    pub markdown: String,
    pub json: Value,
    pub svg: String,
    /// Values per product, for tests.
    pub serf: Option<Measured>,
    pub cnsprcy: Measured,
}

fn machine() -> Value {
    let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_owned();
    json!({"cpu": cpu, "cores": cores, "kernel": kernel,
           "load_average": read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ")})
}

fn serf_version(serf: &Path) -> String {
    Command::new(serf)
        .arg("version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

fn cnsprcy_commit() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{commit} (with uncommitted changes)")
    } else {
        commit
    }
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn build_report(
    options: &Options,
    serf: Option<Measured>,
    cnsprcy: Measured,
    serf_path: Option<&Path>,
    started: &str,
    machine_before: Value,
) -> Report {
    let empty = Measured::default();
    let serf_values = serf.as_ref().unwrap_or(&empty);
    let specs = row_specs(options, serf_values, &cnsprcy);
    let version = serf_path
        .map(serf_version)
        .unwrap_or_else(|| "not run".into());
    let commit = cnsprcy_commit();
    let mut markdown = String::new();
    let _ = writeln!(
        markdown,
        "{} devices of each{}; serf {version}, cnsprcy {commit}; {started}\n",
        options.devices,
        if options.quick {
            " (short mode: not comparable)"
        } else {
            ""
        }
    );
    let _ = writeln!(markdown, "| | serf | cnsprcy | ratio |\n|---|---|---|---|");
    let mut rows = Vec::new();
    for spec in &specs {
        let s = value_of(serf_values, &spec.key, Product::Serf);
        let c = value_of(&cnsprcy, &spec.key, Product::Cnsprcy);
        let r = ratio(s, c);
        let _ = writeln!(
            markdown,
            "| {} | {} | {} | {} |",
            spec.label,
            show(s, spec),
            show(c, spec),
            show_ratio(r)
        );
        rows.push(
            json!({"key": spec.key, "label": spec.label, "unit": spec.unit,
                         "serf": s, "cnsprcy": c, "ratio": r}),
        );
    }
    if let Some(serf) = &serf {
        let table = |key: &str| {
            serf.values
                .get(key)
                .map_or("—".into(), |v| format!("{v:.2} s"))
        };
        if options.main {
            let _ = writeln!(
                markdown,
                "\nserf's member tables themselves (agent log lines, before the handlers' \
                 coalescing): killed {}, cut {}, back {}.",
                table("killed_table"),
                table("cut_table"),
                table("healed_table")
            );
        }
    }
    for (product, m) in [("serf", serf_values), ("cnsprcy", &cnsprcy)] {
        for note in &m.notes {
            let _ = writeln!(markdown, "\n{product}: {note}");
        }
    }
    let measured_json =
        |m: &Measured| json!({"values": m.values, "samples": m.samples, "notes": m.notes});
    let json = json!({
        "started": started,
        "finished": utc_now(),
        "machine_at_start": machine_before,
        "machine_at_end": machine(),
        "serf_version": version,
        "cnsprcy_commit": commit,
        "options": {
            "devices": options.devices, "sizes": options.sizes, "main": options.main,
            "broadcasts": options.broadcasts, "settle_s": options.settle.as_secs_f64(),
            "idle_s": options.idle.as_secs_f64(), "cut_s": options.cut.as_secs_f64(),
            "quick": options.quick, "serf": !options.skip_serf,
        },
        "rows": rows,
        "serf": serf.as_ref().map(measured_json),
        "cnsprcy": measured_json(&cnsprcy),
    });
    let svg = svg(
        &specs,
        serf_values,
        &cnsprcy,
        options,
        &version,
        &commit,
        started,
    );
    Report {
        markdown,
        json,
        svg,
        serf,
        cnsprcy,
    }
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A bar per row: cnsprcy's value as a multiple of serf's, on a log scale from 0.001× to 10×
/// (left of 1× cnsprcy is cheaper or faster), with both values written beside it.
fn svg(
    specs: &[RowSpec],
    serf: &Measured,
    cnsprcy: &Measured,
    options: &Options,
    version: &str,
    commit: &str,
    started: &str,
) -> String {
    const WIDTH: f64 = 980.0;
    const LABEL: f64 = 420.0;
    const PLOT: f64 = 400.0;
    const ROW: f64 = 30.0;
    const TOP: f64 = 70.0;
    let (low, high) = (-3.0f64, 1.0f64);
    let x = |ratio: f64| LABEL + (ratio.log10().clamp(low, high) - low) / (high - low) * PLOT;
    let height = TOP + ROW * specs.len() as f64 + 50.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(out, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = writeln!(
        out,
        "<text x=\"10\" y=\"22\" font-size=\"15\" font-weight=\"bold\">cnsprcy ÷ serf, {} devices \
         each (log scale; left of 1× cnsprcy is faster or cheaper)</text>",
        options.devices
    );
    let _ = writeln!(
        out,
        "<text x=\"10\" y=\"40\" fill=\"#555\">serf {}, cnsprcy {}; {}{}</text>",
        xml_escape(version),
        xml_escape(commit),
        xml_escape(started),
        if options.quick {
            "; short mode, not comparable"
        } else {
            ""
        }
    );
    for tick in [0.001, 0.01, 0.1, 1.0, 10.0] {
        let tx = x(tick);
        let colour = if tick == 1.0 { "#000" } else { "#ccc" };
        let _ = writeln!(
            out,
            "<line x1=\"{tx:.1}\" y1=\"{:.1}\" x2=\"{tx:.1}\" y2=\"{:.1}\" stroke=\"{colour}\"/>\
             <text x=\"{tx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\">{tick}×</text>",
            TOP - 8.0,
            TOP + ROW * specs.len() as f64,
            TOP - 12.0,
        );
    }
    for (i, spec) in specs.iter().enumerate() {
        let y = TOP + ROW * i as f64;
        let s = value_of(serf, &spec.key, Product::Serf);
        let c = value_of(cnsprcy, &spec.key, Product::Cnsprcy);
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LABEL - 8.0,
            y + 19.0,
            xml_escape(&spec.label)
        );
        if let Some(r) = ratio(s, c) {
            let (a, b) = (x(1.0), x(r));
            let colour = if r <= 1.0 { "#2a9d4b" } else { "#d1495b" };
            let _ = writeln!(
                out,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"18\" fill=\"{colour}\"/>",
                a.min(b),
                y + 6.0,
                (a - b).abs().max(1.0)
            );
        }
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\">{} (cnsprcy {} · serf {})</text>",
            LABEL + PLOT + 10.0,
            y + 19.0,
            show_ratio(ratio(s, c)),
            xml_escape(&show(c, spec)),
            xml_escape(&show(s, spec))
        );
    }
    out.push_str("</svg>\n");
    out
}

// ---------------------------------------------------------------------------------------------

/// Runs everything `options` asks for, both products one after the other, and returns the report
/// (also written to `options.out`).
pub fn run(options: &Options) -> Report {
    assert!(crate::is_root(), "needs root: it makes network namespaces");
    let started = utc_now();
    let machine_before = machine();
    let root = tempfile::Builder::new()
        .prefix("cnsprcy-vs-serf-")
        .tempdir()
        .expect("temp dir");
    let serf_path = if options.skip_serf {
        None
    } else {
        Some(ensure_serf().unwrap_or_else(|e| panic!("{e}")))
    };
    let products: Vec<Product> = if serf_path.is_some() {
        vec![Product::Cnsprcy, Product::Serf]
    } else {
        vec![Product::Cnsprcy]
    };
    let serf_or_none = serf_path.clone().unwrap_or_default();
    let mut results: BTreeMap<&str, Measured> = BTreeMap::new();
    for &product in &products {
        let mut measured = if options.main {
            main_scenarios(product, options, &serf_or_none, root.path())
        } else {
            Measured::default()
        };
        for &size in &options.sizes {
            let median = broadcast_at(product, size, options, &serf_or_none, root.path());
            measured.set(&format!("broadcast_{size}"), median);
        }
        results.insert(product.name(), measured);
    }
    let cnsprcy = results.remove("cnsprcy").unwrap_or_default();
    let serf = results.remove("serf");
    let report = build_report(
        options,
        serf,
        cnsprcy,
        serf_path.as_deref(),
        &started,
        machine_before,
    );
    if let Err(e) = save(&report, &options.out) {
        eprintln!(
            "could not save the results in {}: {e}",
            options.out.display()
        );
    }
    drop(root);
    report
}

fn save(report: &Report, out: &Path) -> std::io::Result<()> {
    fs::create_dir_all(out)?;
    fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&report.json).unwrap_or_default() + "\n",
    )?;
    fs::write(out.join("results.svg"), &report.svg)?;
    fs::write(out.join("results.md"), &report.markdown)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both handlers log the time they started, in nanoseconds, and read their input to the end.
    #[test]
    fn the_handlers_stamp_their_start_in_nanoseconds() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("events.log");
        let cnsprcy_env: &[(&str, &str)] = &[("CNSPRCY_TAG", "bench/b1")];
        let serf_env: &[(&str, &str)] = &[("SERF_EVENT", "user"), ("SERF_USER_EVENT", "b1")];
        for (script, env) in [
            (cnsprcy_handler(&log), cnsprcy_env),
            (serf_handler(&log), serf_env),
        ] {
            let path = dir.path().join("handler");
            write_script(&path, &script);
            let before = now_ns();
            let mut child = Command::new(&path)
                .envs(env.iter().copied())
                .env("LC_ALL", "de_DE.UTF-8")
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(&[b'x'; 100_000]).unwrap();
            drop(stdin);
            assert!(child.wait().unwrap().success());
            let after = now_ns();
            let text = fs::read_to_string(&log).unwrap();
            let stamp: u128 = text
                .lines()
                .last()
                .unwrap()
                .rsplit(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            // Microseconds, so up to 1 µs before the clock read before the start.
            assert!(
                before <= stamp + 1000 && stamp <= after,
                "{before} {stamp} {after}"
            );
        }
        let text = fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("bench/b1 ") && lines[1].starts_with("user b1 "));
    }
}
