//! Chaos with real processes: five devices, each a `cnspr serve` in a network namespace of its
//! own on one bridge, write store keys and send messages with a TTL while a seeded random
//! schedule cuts links, partitions pairs, SIGKILLs daemons and restarts them (some under a
//! shifted wall clock), and fills one device's disk. Then everything is healed and the test
//! checks that nothing acknowledged was lost: every store identical and holding every
//! acknowledged write, every long-lived message run exactly once on every target (no message
//! ever twice anywhere), and no daemon's descriptors or memory growing without bound.
//!
//! `CNSPRCY_CHAOS_SECS` sets how long the faults go on (60 s in the suite), and
//! `CNSPRCY_CHAOS_SEED` replays a schedule (the seed is printed at the start). docs/reliability.md
//! ("Chaos with real processes") describes the faults, the load and the results. Needs root
//! (network namespaces, a tmpfs); without it the test says so and passes. Clock jumps need
//! libfaketime (Debian package `faketime`); without it they are left out, and the test says so.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cnsprcy_tests::netns::Lan;
use cnsprcy_tests::{Device, STARTUP_TIMEOUT, bin, is_root, wait_until};
use nix::sys::signal::Signal;
use serde_json::Value;

const PORT: u16 = 7332;
const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];
/// The device whose state directory is a small tmpfs that the disk-full fault fills.
const DISK: usize = 4;
const DISK_SIZE: &str = "48m";
/// Messages that must run exactly once on every target: their TTL outlives the test (and any
/// clock offset below).
const LONG_TTL: &str = "3h";
/// Messages that may expire during the test: they must run at most once.
const SHORT_TTL: &str = "20s";
/// Wall clock offsets (seconds) a restarted device may run under. Within the store's 60 s
/// bound ahead, and behind by up to an hour.
const CLOCK_OFFSETS: [i64; 4] = [-3600, -600, -30, 45];
const SOON: Duration = Duration::from_secs(30);
/// A generous bound for one `cnspr` command of the load.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// splitmix64: small, and the same sequence for the same seed everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.range(0, items.len() as u64) as usize]
    }

    fn secs(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo * 1000, hi * 1000))
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    Some(
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a whole number")),
    )
}

/// The libfaketime library, if the Debian package `faketime` (which pulls in `libfaketime`)
/// is installed.
fn libfaketime() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from("/usr/lib/faketime/libfaketime.so.1")];
    if let Ok(dir) = std::fs::read_dir("/usr/lib") {
        for entry in dir.flatten() {
            candidates.push(entry.path().join("faketime/libfaketime.so.1"));
        }
    }
    candidates.into_iter().find(|p| p.exists())
}

/// How one `cnspr` command of the load ended.
#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    /// Exit status 0: the daemon acknowledged it.
    Acked,
    /// An error (the daemon was down, the disk full, ...): the first line of stderr.
    Failed(String),
    /// Killed after `COMMAND_TIMEOUT`.
    TimedOut,
}

/// Runs `cnspr` for one device from any thread: the device's environment, inside the mount
/// namespace that holds its tmpfs if it has one.
#[derive(Clone)]
struct Client {
    envs: Vec<(OsString, OsString)>,
    /// The pid of the process holding the device's mount namespace.
    mounts: Option<u32>,
    cnspr: PathBuf,
}

impl Client {
    fn new(device: &Device, mounts: Option<u32>) -> Self {
        let cmd = device.command("true");
        let envs = cmd
            .get_envs()
            .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned())))
            .collect();
        Self {
            envs,
            mounts,
            cnspr: bin("cnspr"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = match self.mounts {
            Some(pid) => {
                let mut cmd = Command::new("nsenter");
                cmd.args(["--target", &pid.to_string(), "--mount", "--"])
                    .arg(&self.cnspr);
                cmd
            }
            None => Command::new(&self.cnspr),
        };
        cmd.env_clear()
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `cnspr ARGS` to completion; panics if it fails.
    fn run(&self, args: &[&str]) -> String {
        let out = self.command(args).output().expect("run cnspr");
        assert!(
            out.status.success(),
            "cnspr {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `cnspr ARGS` for the load, at most `COMMAND_TIMEOUT`; with what it printed.
    fn attempt(&self, args: &[&str]) -> (Outcome, String) {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run cnspr");
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait for cnspr") {
                let mut out = String::new();
                if let Some(mut stdout) = child.stdout.take() {
                    let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
                }
                if status.success() {
                    return (Outcome::Acked, out);
                }
                let mut err = String::new();
                if let Some(stderr) = child.stderr.take() {
                    let _ = BufReader::new(stderr).read_line(&mut err);
                }
                if err.trim().is_empty() {
                    // `--json` reports "not running" on stdout.
                    err = serde_json::from_str::<Value>(&out)
                        .ok()
                        .and_then(|v| Some(v["error"].as_str()?.to_owned()))
                        .unwrap_or_else(|| format!("({status}, nothing on stderr)"));
                }
                return (Outcome::Failed(err.trim().to_owned()), out);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return (Outcome::TimedOut, String::new());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The store as `key -> value`.
    fn store(&self) -> Option<BTreeMap<String, String>> {
        let out = self.command(&["db", "list", "--json"]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        let items: Value = serde_json::from_slice(&out.stdout).ok()?;
        Some(
            items
                .as_array()?
                .iter()
                .map(|item| {
                    (
                        item["key"].as_str().unwrap_or_default().to_owned(),
                        item["value"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect(),
        )
    }
}

/// A small tmpfs at a device's state directory, in a mount namespace held by a `sleep`
/// process, so that it outlives the daemon's restarts and goes away with the test.
struct Disk {
    holder: Child,
    dir: PathBuf,
}

impl Disk {
    fn new(dir: &Path) -> Self {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(format!(
                r#"mount -t tmpfs -o size={DISK_SIZE},mode=0700 tmpfs "$0" && echo mounted && exec sleep infinity"#
            ))
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let mut holder = cmd.spawn().expect("unshare (Debian package util-linux)");
        let mut line = String::new();
        BufReader::new(holder.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read from the mount holder");
        assert_eq!(line.trim(), "mounted", "could not mount a tmpfs at {dir:?}");
        Self {
            holder,
            dir: dir.to_owned(),
        }
    }

    fn pid(&self) -> u32 {
        self.holder.id()
    }

    fn run(&self, script: &str) {
        let status = Command::new("nsenter")
            .args(["--target", &self.pid().to_string(), "--mount", "--"])
            .args(["sh", "-c", script])
            .arg(&self.dir)
            .status()
            .expect("nsenter");
        assert!(status.success(), "{script}");
    }

    fn fill(&self) {
        self.run(r#"cat /dev/zero > "$0/filler" 2>/dev/null; true"#);
    }

    fn free(&self) {
        self.run(r#"rm -f "$0/filler""#);
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// One device of the test: the harness's `Device`, how to reach it from any thread, and which
/// of its daemon processes is the current one.
struct Node {
    device: Device,
    client: Client,
    mounts: Option<u32>,
    /// Label of the current `cnspr serve` process (`serve0`, `serve1`, ...).
    label: String,
    starts: usize,
    /// The wall clock offset of the current process, in seconds.
    offset: Option<i64>,
    running: bool,
    /// What each refused start said.
    refused: Vec<String>,
    /// How many times its daemon was SIGKILLed.
    kills: usize,
}

impl Node {
    /// Starts `cnspr serve` in node `i`'s namespace, under a clock offset if given, and waits
    /// until it answers. A start refused because the instance lock is still held (right after a
    /// SIGKILL) is noted in `refused` and tried again.
    fn start(&mut self, lan: &Lan, i: usize, offset: Option<(i64, &Path)>) {
        for _ in 0..20 {
            let label = format!("serve{}", self.starts);
            self.starts += 1;
            if self.try_start(lan, i, offset, &label) {
                self.label = label;
                self.offset = offset.map(|(secs, _)| secs);
                self.running = true;
                return;
            }
            let log = self.device.log(&label);
            self.refused.push(log.trim().to_owned());
            eprintln!("  {} refused to start: {}", NAMES[i], log.trim());
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("{} did not start in 20 attempts", NAMES[i]);
    }

    /// One attempt of `start`: false if the daemon exited saying that it runs already.
    fn try_start(
        &mut self,
        lan: &Lan,
        i: usize,
        offset: Option<(i64, &Path)>,
        label: &str,
    ) -> bool {
        let mut argv: Vec<String> = Vec::new();
        if let Some(pid) = self.mounts {
            argv.extend(
                ["nsenter", "--target", &pid.to_string(), "--mount", "--"].map(String::from),
            );
        }
        if let Some((secs, lib)) = offset {
            argv.push("env".into());
            argv.push(format!("LD_PRELOAD={}", lib.display()));
            argv.push(format!("FAKETIME={secs:+}"));
            argv.push("FAKETIME_DONT_FAKE_MONOTONIC=1".into());
        }
        argv.push(bin("cnspr").display().to_string());
        argv.push("serve".into());
        let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
        self.device
            .spawn_in(lan.node(i), label, Path::new(&argv[0]), &args);
        let mut exited = None;
        let ready = wait_until(STARTUP_TIMEOUT, || {
            exited = self.device.try_wait(label);
            exited.is_some() || self.device.cnspr(&["status", "--json"]).status.success()
        });
        match exited {
            Some(_) if self.device.log(label).contains("is already running") => false,
            Some(status) => panic!(
                "{} exited during startup with {status}:\n{}",
                NAMES[i],
                self.device.log(label)
            ),
            None if ready => true,
            None => panic!(
                "{} did not answer in time:\n{}",
                NAMES[i],
                self.device.log(label)
            ),
        }
    }

    fn kill(&mut self) {
        let label = self.label.clone();
        self.device.stop_with(&label, Signal::SIGKILL);
        self.running = false;
        self.kills += 1;
    }

    fn pid(&mut self) -> u32 {
        let label = self.label.clone();
        self.device.pid(&label)
    }
}

/// Sets the flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Open descriptors and resident memory (KiB) of a process.
fn resources(pid: u32) -> Option<(usize, u64)> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    Some((fds, rss))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Cut(usize),
    Partition(usize, usize),
    Kill(usize),
    Clock(usize),
    DiskFull,
}

impl Fault {
    fn kind(&self) -> &'static str {
        match self {
            Fault::Cut(_) => "link cut",
            Fault::Partition(..) => "partition",
            Fault::Kill(_) => "SIGKILL and restart",
            Fault::Clock(_) => "restart under a shifted clock",
            Fault::DiskFull => "full disk",
        }
    }

    /// The device whose daemon or disk it affects (at most one such fault per device at once).
    fn process_of(&self) -> Option<usize> {
        match *self {
            Fault::Kill(i) | Fault::Clock(i) => Some(i),
            Fault::DiskFull => Some(DISK),
            _ => None,
        }
    }
}

/// What one device's load did.
#[derive(Default)]
struct Load {
    /// `(key, value, seq, outcome)` of every `db set`.
    writes: Vec<(String, String, u64, Outcome)>,
    /// `(id, long TTL, outcome, message ID)` of every `send` (the ID if it was acknowledged).
    sends: Vec<(String, bool, Outcome, Option<String>)>,
}

/// One device's load until `stop`: store writes of its own keys (each key rewritten again and
/// again) and of keys every device writes, and messages to every other device.
fn load(name: &str, client: &Client, seed: u64, stop: &AtomicBool) -> Load {
    let mut rng = Rng(seed);
    let mut out = Load::default();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let value = format!("{name}:{seq}");
        match seq % 4 {
            0 | 2 => {
                let key = format!("own/{name}/{:02}", rng.range(0, 40));
                let (outcome, _) = client.attempt(&["db", "set", &key, &value]);
                out.writes.push((key, value, seq, outcome));
            }
            1 => {
                let key = format!("shared/{}", rng.range(0, 8));
                let (outcome, _) = client.attempt(&["db", "set", &key, &value]);
                out.writes.push((key, value, seq, outcome));
            }
            _ => {
                let long = rng.range(0, 4) != 0;
                let id = format!("{name}-{seq}");
                let ttl = if long { LONG_TTL } else { SHORT_TTL };
                let (outcome, printed) =
                    client.attempt(&["send", "--ttl", ttl, "--json", "chaos", &id]);
                let message = serde_json::from_str::<Value>(&printed)
                    .ok()
                    .and_then(|v| Some(v["id"].as_str()?.to_owned()));
                out.sends.push((id, long, outcome, message));
            }
        }
        std::thread::sleep(Duration::from_millis(rng.range(150, 400)));
    }
    out
}

/// The message IDs the `chaos` handler ran on device `name`, one per run.
fn ran(results: &Path, name: &str) -> Vec<String> {
    std::fs::read_to_string(results.join(format!("{name}.ran")))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// The message IDs in a device's `delivered.log` (16-byte ID, 8-byte time, per record), as
/// 32 hex digits; read through the mount namespace of its tmpfs if it has one.
fn delivered(node: &Node) -> BTreeSet<String> {
    let file = node.device.state_dir().join("delivered.log");
    let path = match node.mounts {
        Some(pid) => {
            Path::new(&format!("/proc/{pid}/root")).join(file.strip_prefix("/").unwrap_or(&file))
        }
        None => file,
    };
    std::fs::read(path)
        .unwrap_or_default()
        .chunks_exact(24)
        .map(|record| record[..16].iter().map(|b| format!("{b:02x}")).collect())
        .collect()
}

/// What is still wrong at the end (an empty list means nothing was lost).
fn problems(nodes: &[Node], loads: &[Load], results: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let stores: Vec<Option<BTreeMap<String, String>>> =
        nodes.iter().map(|n| n.client.store()).collect();
    let Some(first) = stores[0].clone() else {
        return vec!["a: cannot list its store".into()];
    };
    for (i, store) in stores.iter().enumerate().skip(1) {
        match store {
            None => problems.push(format!("{}: cannot list its store", NAMES[i])),
            Some(store) if *store != first => {
                let differ: Vec<&String> = first
                    .keys()
                    .chain(store.keys())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .filter(|k| first.get(*k) != store.get(*k))
                    .take(5)
                    .collect();
                problems.push(format!(
                    "{}'s store differs from a's ({} keys against {}), e.g. at {differ:?}",
                    NAMES[i],
                    store.len(),
                    first.len()
                ));
            }
            Some(_) => {}
        }
    }
    // Store: each device's own keys hold its latest acknowledged write or a later one; the
    // shared keys hold a value some device tried to write; no value came from nowhere.
    let mut attempted: BTreeSet<(&str, &str)> = BTreeSet::new();
    for (i, load) in loads.iter().enumerate() {
        let mut latest: BTreeMap<&str, u64> = BTreeMap::new();
        for (key, value, seq, outcome) in &load.writes {
            attempted.insert((key.as_str(), value.as_str()));
            if *outcome == Outcome::Acked && key.starts_with("own/") {
                latest.insert(key.as_str(), *seq);
            }
        }
        for (key, seq) in latest {
            let held = first.get(key).and_then(|v| {
                let (writer, n) = v.split_once(':')?;
                (writer == NAMES[i]).then(|| n.parse::<u64>().ok())?
            });
            if held.is_none_or(|n| n < seq) {
                problems.push(format!(
                    "{key}: the acknowledged write {}:{seq} is lost; the store holds {:?}",
                    NAMES[i],
                    first.get(key)
                ));
            }
        }
    }
    for load in loads {
        for (key, _, _, outcome) in &load.writes {
            if *outcome == Outcome::Acked && !first.contains_key(key) {
                problems.push(format!("{key}: acknowledged, but missing"));
            }
        }
    }
    for (key, value) in &first {
        if (key.starts_with("own/") || key.starts_with("shared/"))
            && !attempted.contains(&(key.as_str(), value.as_str()))
        {
            problems.push(format!("{key} holds {value:?}, which nobody wrote"));
        }
    }
    // Messages: never twice anywhere, never on their sender, never one that was not sent; the
    // acknowledged ones with the long TTL exactly once on every other device.
    let sent: BTreeMap<&str, (usize, bool, &Outcome, &Option<String>)> = loads
        .iter()
        .enumerate()
        .flat_map(|(i, load)| {
            load.sends.iter().map(move |(id, long, outcome, message)| {
                (id.as_str(), (i, *long, outcome, message))
            })
        })
        .collect();
    for (j, name) in NAMES.iter().enumerate() {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for id in ran(results, name) {
            *counts.entry(id).or_default() += 1;
        }
        for (id, count) in &counts {
            match sent.get(id.as_str()) {
                None => problems.push(format!("{name} ran {id:?}, which nobody sent")),
                Some((i, ..)) if *i == j => problems.push(format!("{name} ran its own {id}")),
                _ => {}
            }
            if *count > 1 {
                problems.push(format!("{name} ran {id} {count} times"));
            }
        }
        let recorded = delivered(&nodes[j]);
        for (id, (i, long, outcome, message)) in &sent {
            if *i != j && *long && **outcome == Outcome::Acked && !counts.contains_key(*id) {
                let how = match message {
                    Some(m) if recorded.contains(m) => {
                        "recorded in its delivered.log, but its handler never ran"
                    }
                    Some(_) => "not recorded as delivered",
                    None => "message ID unknown",
                };
                problems.push(format!(
                    "{name} never ran {id} {message:?} (acknowledged, TTL {LONG_TTL}): {how}"
                ));
            }
        }
    }
    problems
}

#[test]
fn nothing_acknowledged_is_lost_under_chaos() {
    if !is_root() {
        eprintln!("skipped: the chaos test needs root, to make network namespaces and a tmpfs");
        return;
    }
    let secs = env_u64("CNSPRCY_CHAOS_SECS").unwrap_or(60);
    let seed = env_u64("CNSPRCY_CHAOS_SEED").unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        nanos ^ u64::from(std::process::id())
    });
    eprintln!(
        "chaos: seed {seed} (replay with CNSPRCY_CHAOS_SEED={seed}), {secs} s of faults \
         (CNSPRCY_CHAOS_SECS)"
    );
    let faketime = libfaketime();
    if faketime.is_none() {
        eprintln!(
            "chaos: libfaketime is missing, so the clock jumps are LEFT OUT; install the Debian \
             package faketime (packaging/test does)"
        );
    }
    let mut rng = Rng(seed);
    let started = Instant::now();
    let at = || format!("[{:7.1}s]", started.elapsed().as_secs_f64());

    let lan = Lan::new(NAMES.len());
    let results = tempfile::Builder::new()
        .prefix("cnsprcy-chaos-")
        .tempdir()
        .expect("temp dir");
    std::fs::set_permissions(results.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let mut disk: Option<Disk> = None;
    let mut nodes: Vec<Node> = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        let device = Device::new(name);
        device.configure(&format!("{}:{PORT}", lan.addr(i)));
        let mounts = if i == DISK {
            let dir = device.state_dir();
            std::fs::create_dir_all(&dir).expect("create the state dir");
            let d = Disk::new(&dir);
            let pid = d.pid();
            disk = Some(d);
            Some(pid)
        } else {
            None
        };
        let handler = device.root().join("config/cnsprcy/handlers/chaos.sh");
        std::fs::create_dir_all(handler.parent().expect("handler dir")).expect("handler dir");
        std::fs::write(
            &handler,
            format!(
                "#!/bin/sh\nid=$(cat)\nprintf '%s\\n' \"$id\" >> {}\n",
                results.path().join(format!("{name}.ran")).display()
            ),
        )
        .expect("write the handler");
        std::fs::set_permissions(&handler, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the handler");
        let client = Client::new(&device, mounts);
        let mut node = Node {
            device,
            client,
            mounts,
            label: String::new(),
            starts: 0,
            offset: None,
            running: false,
            refused: Vec::new(),
            kills: 0,
        };
        node.start(&lan, i, None);
        nodes.push(node);
    }
    let disk = disk.expect("the disk device");
    let keys: Vec<String> = nodes
        .iter()
        .map(|n| {
            let id: Value = serde_json::from_str(&n.client.run(&["manage", "id", "--json"]))
                .expect("manage id --json");
            id["public_key"].as_str().expect("public_key").to_owned()
        })
        .collect();
    for (i, node) in nodes.iter().enumerate() {
        for (j, key) in keys.iter().enumerate() {
            if i != j {
                let addr = format!("{}:{PORT}", lan.addr(j));
                node.client.run(&["manage", "add", NAMES[j], key, &addr]);
            }
        }
    }
    for node in &mut nodes {
        for name in NAMES {
            if name != node.device.name {
                node.device.wait_status(name, "direct", SOON);
            }
        }
    }
    eprintln!("{} the mesh is up", at());

    let stop = AtomicBool::new(false);
    let mut samples: Vec<Vec<(usize, u64)>> = vec![Vec::new(); NAMES.len()];
    let mut baseline: Vec<(usize, u64)> = Vec::new();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let clients: Vec<Client> = nodes.iter().map(|n| n.client.clone()).collect();
    let loads: Vec<Load> = std::thread::scope(|scope| {
        // Should this thread panic, the load stops, so that the scope can end.
        let _stop_on_panic = StopOnDrop(&stop);
        let workers: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, client)| {
                let seed = seed ^ (i as u64 + 1).wrapping_mul(0x1234_5678_9abc_def1);
                let stop = &stop;
                scope.spawn(move || load(NAMES[i], client, seed, stop))
            })
            .collect();
        // A few seconds of load before the baseline, so that it includes what a working
        // daemon holds anyway.
        std::thread::sleep(Duration::from_secs(5));
        for node in &mut nodes {
            let pid = node.pid();
            baseline.push(resources(pid).expect("read /proc"));
        }
        eprintln!(
            "{} baseline (descriptors, RSS KiB): {baseline:?}; faults for {secs} s",
            at()
        );

        let faults_end = Instant::now() + Duration::from_secs(secs);
        let mut active: Vec<(Fault, Instant)> = Vec::new();
        let mut next_fault = Instant::now() + rng.secs(1, 3);
        let mut next_sample = Instant::now();
        while Instant::now() < faults_end {
            let now = Instant::now();
            let (due, left): (Vec<_>, Vec<_>) = std::mem::take(&mut active)
                .into_iter()
                .partition(|(_, end)| *end <= now);
            active = left;
            for (fault, _) in due {
                eprintln!("{} end {fault:?}", at());
                end_fault(fault, &lan, &mut nodes, &disk);
            }
            if now >= next_fault && active.len() < 3 {
                if let Some((fault, lasts)) = choose(&mut rng, &active, faketime.is_some()) {
                    eprintln!("{} start {fault:?} for {lasts:.1?}", at());
                    start_fault(
                        fault,
                        &mut rng,
                        &lan,
                        &mut nodes,
                        &disk,
                        faketime.as_deref(),
                    );
                    *counts.entry(fault.kind()).or_default() += 1;
                    active.push((fault, Instant::now() + lasts));
                }
                next_fault = Instant::now() + rng.secs(1, 5);
            }
            if now >= next_sample {
                for (i, node) in nodes.iter_mut().enumerate() {
                    if node.running
                        && let Some(sample) = resources(node.pid())
                    {
                        samples[i].push(sample);
                    }
                }
                next_sample = now + Duration::from_secs(5);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
        let loads: Vec<Load> = workers
            .into_iter()
            .map(|w| w.join().expect("load thread"))
            .collect();
        eprintln!("{} load stopped; healing {} faults", at(), active.len());
        for (fault, _) in active {
            end_fault(fault, &lan, &mut nodes, &disk);
        }
        loads
    });
    lan.heal_all();
    for (i, node) in nodes.iter_mut().enumerate() {
        lan.restore(i);
        // Back to the true clock: a device still under an offset restarts without it.
        if node.offset.is_some() || !node.running {
            if node.running {
                node.kill();
            }
            node.start(&lan, i, None);
        }
    }
    disk.free();
    for node in &nodes {
        node.client.run(&["reconnect"]);
    }
    let healed = Instant::now();
    eprintln!("{} healed; waiting for convergence", at());

    let mut last = Vec::new();
    let converged = wait_until(Duration::from_secs(240), || {
        std::thread::sleep(Duration::from_secs(2));
        last = problems(&nodes, &loads, results.path());
        last.is_empty()
    });
    let convergence = healed.elapsed();
    // Handlers still queued get a moment to run.
    std::thread::sleep(Duration::from_secs(5));
    let after = problems(&nodes, &loads, results.path());
    if converged {
        last = after;
    }

    let mut report = String::new();
    let _ = writeln!(
        report,
        "chaos: seed {seed}, {secs} s of faults, convergence after {convergence:.1?}"
    );
    let _ = writeln!(report, "faults: {counts:?}");
    for (i, load) in loads.iter().enumerate() {
        let acked_writes = load.writes.iter().filter(|w| w.3 == Outcome::Acked).count();
        let acked_sends = load.sends.iter().filter(|s| s.2 == Outcome::Acked).count();
        let mut errors: BTreeMap<String, usize> = BTreeMap::new();
        for outcome in load
            .writes
            .iter()
            .map(|w| &w.3)
            .chain(load.sends.iter().map(|s| &s.2))
        {
            match outcome {
                Outcome::Acked => {}
                Outcome::Failed(e) => *errors.entry(error_kind(e)).or_default() += 1,
                Outcome::TimedOut => *errors.entry("timed out".into()).or_default() += 1,
            }
        }
        let _ = writeln!(
            report,
            "{}: {} writes ({acked_writes} acknowledged), {} sends ({acked_sends} acknowledged), \
             ran {} messages; refused: {errors:?}",
            NAMES[i],
            load.writes.len(),
            load.sends.len(),
            ran(results.path(), NAMES[i]).len()
        );
    }
    let mut leaks = Vec::new();
    for (i, node) in nodes.iter_mut().enumerate() {
        let end = resources(node.pid()).expect("read /proc");
        let peak = samples[i]
            .iter()
            .chain([&end])
            .fold((0, 0), |(f, r), &(sf, sr)| (f.max(sf), r.max(sr)));
        let (bf, br) = baseline[i];
        let _ = writeln!(
            report,
            "{}: descriptors {bf} at the start, {} at the end, {} at most; RSS {br} KiB at the \
             start, {} KiB at the end, {} KiB at most; {} starts, {} of them refused",
            NAMES[i],
            end.0,
            peak.0,
            end.1,
            peak.1,
            node.starts,
            node.refused.len()
        );
        // Generous: a few more sessions or handler runs open at the end are fine, growth with
        // the length of the run is not.
        if end.0 > bf * 2 + 32 {
            leaks.push(format!(
                "{}: {} descriptors, {bf} at the start",
                NAMES[i], end.0
            ));
        }
        if end.1 > (br * 3).max(br + 64 * 1024) {
            leaks.push(format!(
                "{}: RSS {} KiB, {br} KiB at the start",
                NAMES[i], end.1
            ));
        }
    }
    eprint!("{report}");
    assert!(
        converged && last.is_empty(),
        "not converged {convergence:?} after healing (seed {seed}):\n{}",
        last.join("\n")
    );
    assert!(leaks.is_empty(), "seed {seed}: {leaks:?}");
    drop(nodes);
    drop(disk);
}

/// An error message without its details (IDs, paths), to count errors by kind.
fn error_kind(error: &str) -> String {
    let words: Vec<String> = error
        .split_whitespace()
        .map(|w| {
            // An ID may end a clause: `message 0a1b…: No space left on device`.
            let bare = w.trim_end_matches(|c: char| c.is_ascii_punctuation());
            if bare.len() >= 16 && bare.chars().all(|c| c.is_ascii_hexdigit()) {
                format!("ID{}", &w[bare.len()..])
            } else if w.starts_with('/') {
                "PATH".to_owned()
            } else {
                w.to_owned()
            }
        })
        .collect();
    words.join(" ").chars().take(120).collect()
}

#[test]
fn errors_are_counted_by_kind() {
    assert_eq!(
        error_kind("cnspr: cannot store message 00926a3f13523d10c60cd00cb82da1ae: No space left"),
        "cnspr: cannot store message ID: No space left"
    );
    assert_eq!(
        error_kind("nothing answers at /run/x/api.sock"),
        "nothing answers at PATH"
    );
}

/// A fault to start now and how long it lasts, if one can start (at most one fault on a
/// device's process or disk at once, no link cut twice, no partition twice).
fn choose(rng: &mut Rng, active: &[(Fault, Instant)], clock: bool) -> Option<(Fault, Duration)> {
    let n = NAMES.len();
    for _ in 0..20 {
        let i = rng.range(0, n as u64) as usize;
        let (fault, lasts) = match rng.range(0, 5) {
            0 => (Fault::Cut(i), rng.secs(3, 12)),
            1 => {
                let j = (i + rng.range(1, n as u64) as usize) % n;
                (Fault::Partition(i.min(j), i.max(j)), rng.secs(5, 20))
            }
            2 => (Fault::Kill(i), rng.secs(1, 8)),
            3 if clock => (Fault::Clock(i), rng.secs(8, 25)),
            4 => (Fault::DiskFull, rng.secs(5, 15)),
            _ => continue,
        };
        let clash = active.iter().any(|(other, _)| {
            *other == fault
                || fault
                    .process_of()
                    .is_some_and(|p| other.process_of() == Some(p))
        });
        if !clash {
            return Some((fault, lasts));
        }
    }
    None
}

fn start_fault(
    fault: Fault,
    rng: &mut Rng,
    lan: &Lan,
    nodes: &mut [Node],
    disk: &Disk,
    faketime: Option<&Path>,
) {
    match fault {
        Fault::Cut(i) => lan.cut(i),
        Fault::Partition(a, b) => lan.partition(a, b),
        Fault::Kill(i) => nodes[i].kill(),
        Fault::Clock(i) => {
            let offset = rng.pick(&CLOCK_OFFSETS);
            eprintln!("  {} restarts with its clock {offset:+} s off", NAMES[i]);
            nodes[i].kill();
            let lib = faketime.expect("clock faults only with libfaketime");
            nodes[i].start(lan, i, Some((offset, lib)));
        }
        Fault::DiskFull => disk.fill(),
    }
}

fn end_fault(fault: Fault, lan: &Lan, nodes: &mut [Node], disk: &Disk) {
    match fault {
        Fault::Cut(i) => lan.restore(i),
        Fault::Partition(a, b) => lan.heal(a, b),
        Fault::Kill(i) => nodes[i].start(lan, i, None),
        Fault::Clock(i) => {
            // The clock jumps back to the true time.
            nodes[i].kill();
            nodes[i].start(lan, i, None);
        }
        Fault::DiskFull => disk.free(),
    }
}
