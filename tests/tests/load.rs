//! Load (issue 15): one device receiving from nine others as fast as they send, and 100 clients on
//! one device's public socket. Every device is a real `cnspr serve` in a network namespace of its
//! own, on one bridge ([`Lan`]); the load comes from threads of this test talking JSON-RPC on the
//! devices' sockets (kept open: faster than starting `cnspr` for each call).
//!
//! What is checked: memory and descriptors stay bounded, no member is ever taken for unreachable,
//! pings and keepalive round trips stay short, every message a `send` accepted runs its handler
//! exactly once, every store write arrives, and every API call is answered (a result or a clear
//! error) within a generous bound: nothing hangs.
//!
//! Short by default (part of `cargo test --workspace`); `CNSPRCY_LOAD_SECS=600` loads for ten
//! minutes instead of 15 s. `--nocapture` prints the numbers.
//! Needs root (network namespaces); skipped otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cnsprcy_tests::load::{CallError, Client, Usage, quantile, usage};
use cnsprcy_tests::netns::Lan;
use cnsprcy_tests::{Device, is_root, lines, wait_until};
use serde_json::{Value, json};

const PORT: u16 = 7332;
const SOON: Duration = Duration::from_secs(30);
/// Longest any API call may take before it counts as a hang. Generous: 10 daemons share 2 cores.
const HANG: Duration = Duration::from_secs(30);
/// `rpc::code::UNAVAILABLE`, `OUTBOX_FULL` (docs/api.md).
const UNAVAILABLE: i64 = -32002;
const OUTBOX_FULL: i64 = -32008;

/// Descriptors that handlers running at once may hold in the daemon: 16 runs (`[handlers]
/// max_running`), each with its pipes and pidfd, generously.
const HANDLER_FDS: usize = 16 * 6;

/// The two tests load the same two cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long the load lasts: `CNSPRCY_LOAD_SECS`, else `short`.
fn load_time(short: u64) -> Duration {
    let secs = std::env::var("CNSPRCY_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(short);
    Duration::from_secs(secs)
}

fn skipped() -> bool {
    if !is_root() {
        eprintln!("skipped: the load tests need root, to make network namespaces");
    }
    !is_root()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One device per node of `lan`, named d0, d1, ..., each a member of every other (with its
/// address), all sessions direct. Logs at `info` (`debug`, with `CNSPRCY_LOAD_LOG=debug`, logs
/// several lines per message).
fn full_mesh(lan: &Lan, n: usize, handler_log: &Path) -> Vec<Device> {
    let mut devices: Vec<Device> = (0..n)
        .map(|i| {
            let mut device = Device::new(&format!("d{i}"));
            let level = std::env::var("CNSPRCY_LOAD_LOG").unwrap_or_else(|_| "info".into());
            device.set_env("RUST_LOG", level);
            device.configure(&format!("{}:{PORT}", lan.addr(i)));
            install_handler(&device, handler_log);
            device.start_in(lan.node(i));
            device
        })
        .collect();
    let keys: Vec<String> = devices.iter().map(|d| d.public_key()).collect();
    for (i, device) in devices.iter().enumerate() {
        let mut api = Client::connect(&device.socket(), HANG).expect("connect");
        for (j, key) in keys.iter().enumerate() {
            if i != j {
                let params = json!({"name": format!("d{j}"), "public_key": key,
                                    "addresses": [format!("{}:{PORT}", lan.addr(j))]});
                api.call("members.add", params).expect("members.add");
            }
        }
    }
    for (i, device) in devices.iter_mut().enumerate() {
        for j in (0..n).filter(|&j| j != i) {
            device.wait_status(&format!("d{j}"), "direct", SOON);
        }
    }
    devices
}

/// The handler of every `load/...` tag: appends the message's ID to `log`, one line per run.
fn install_handler(device: &Device, log: &Path) {
    let dir = device.root().join("config/cnsprcy/handlers/load");
    fs::create_dir_all(&dir).expect("handler dir");
    let path = dir.join("_default.sh");
    fs::write(
        &path,
        format!(
            "#!/bin/sh\necho \"$CNSPRCY_MESSAGE_ID\" >> {}\n",
            log.display()
        ),
    )
    .expect("write handler");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod handler");
}

/// What one sending device did.
#[derive(Default)]
struct Sent {
    /// IDs of the messages `send` accepted.
    accepted: Vec<String>,
    /// `send`s refused because the outbox was full, and the first such message.
    outbox_full: u64,
    full_message: Option<String>,
    /// Every call's time to answer, ms.
    latencies: Vec<f64>,
    /// Anything else: a failure of the test.
    failures: Vec<String>,
}

/// Sends messages to d0 from the device at `socket` until `stop`, as fast as answers come; a
/// full outbox makes it pause 20 ms.
fn flood_messages(socket: &Path, me: usize, stop: &AtomicBool) -> Sent {
    let mut sent = Sent::default();
    let mut api = Client::connect(socket, HANG).expect("connect");
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let params = json!({"tag": format!("load/t{}", n % 4), "to": ["d0"],
                            "payload_text": format!("d{me} {n}")});
        let started = Instant::now();
        let answer = api.call("send", params);
        sent.latencies.push(started.elapsed().as_secs_f64() * 1e3);
        n += 1;
        match answer {
            Ok(result) => match result["id"].as_str() {
                Some(id) => sent.accepted.push(id.to_owned()),
                None => sent
                    .failures
                    .push(format!("send answered without id: {result}")),
            },
            Err(CallError::Rpc { code, message }) if code == OUTBOX_FULL => {
                sent.outbox_full += 1;
                sent.full_message.get_or_insert(message);
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                sent.failures.push(format!("d{me}: send: {e}"));
                if !matches!(e, CallError::Rpc { .. }) {
                    break;
                }
            }
        }
    }
    sent
}

/// Keys each writing device cycles through: the store's size (and so its memory: the digest
/// tree holds every key) stays the same however long the load lasts.
const STORE_KEYS: u64 = 200;

/// What one writing device did: its write number `n` (from 0 to `written - 1`) set
/// `load/d<me>/<n % STORE_KEYS>` to `n`.
#[derive(Default)]
struct Written {
    written: u64,
    latencies: Vec<f64>,
    failures: Vec<String>,
}

fn flood_store(socket: &Path, me: usize, stop: &AtomicBool) -> Written {
    let mut out = Written::default();
    let mut api = Client::connect(socket, HANG).expect("connect");
    while !stop.load(Ordering::Relaxed) {
        let n = out.written;
        let params =
            json!({"key": format!("load/d{me}/{}", n % STORE_KEYS), "value": n.to_string()});
        let started = Instant::now();
        let answer = api.call("db.set", params);
        out.latencies.push(started.elapsed().as_secs_f64() * 1e3);
        match answer {
            Ok(_) => out.written += 1,
            Err(e) => {
                out.failures.push(format!("d{me}: db.set: {e}"));
                break;
            }
        }
    }
    out
}

/// What d0's subscription saw.
#[derive(Default)]
struct Watched {
    /// `peer` events other than `direct`: (seconds since the start, name, status).
    not_direct: Vec<(f64, String, String)>,
    messages: u64,
    stores: u64,
    lagged: u64,
    failures: Vec<String>,
}

fn watch(socket: &Path, stop: &AtomicBool, start: Instant) -> Watched {
    let mut watched = Watched::default();
    let mut api = Client::connect(socket, HANG).expect("connect");
    if let Err(e) = api.call("subscribe", Value::Null) {
        watched.failures.push(format!("subscribe: {e}"));
        return watched;
    }
    while !stop.load(Ordering::Relaxed) {
        let event = match api.line(Duration::from_millis(200)) {
            Ok(line) => line["params"].clone(),
            Err(CallError::TimedOut(_)) => continue,
            Err(e) => {
                watched.failures.push(format!("subscription: {e}"));
                break;
            }
        };
        match event["event"].as_str() {
            Some("peer") if event["status"] != "direct" => watched.not_direct.push((
                start.elapsed().as_secs_f64(),
                event["name"].as_str().unwrap_or("?").to_owned(),
                event["status"].as_str().unwrap_or("?").to_owned(),
            )),
            Some("message") => watched.messages += 1,
            Some("store") => watched.stores += 1,
            Some("lagged") => watched.lagged += event["missed"].as_u64().unwrap_or(0),
            _ => {}
        }
    }
    watched
}

/// What d0 looked like while loaded, sampled every `period`.
#[derive(Default)]
struct Probed {
    /// (seconds since the start, usage of d0's process).
    usage: Vec<(f64, Usage)>,
    /// `ping` from d0 to each member in turn: the daemon's rtt_ms, and the call's time.
    ping_rtt: Vec<f64>,
    ping_call: Vec<f64>,
    /// `rtt_ms` of every member in `peers` (the keepalive's smoothed RTT).
    keepalive_rtt: Vec<f64>,
    /// `peers` showing a member neither direct nor suspect: (seconds, name, status).
    not_routable: Vec<(f64, String, String)>,
    suspect: u64,
    failures: Vec<String>,
}

fn probe(socket: &Path, pid: u32, stop: &AtomicBool, start: Instant, members: usize) -> Probed {
    let mut probed = Probed::default();
    let mut api = Client::connect(socket, HANG).expect("connect");
    let mut next = 1;
    while !stop.load(Ordering::Relaxed) {
        let t = start.elapsed().as_secs_f64();
        probed.usage.push((t, usage(pid)));
        let name = format!("d{next}");
        next = next % members + 1;
        let started = Instant::now();
        match api.call("ping", json!({"name": name, "timeout_ms": 5000})) {
            Ok(pong) => {
                probed.ping_call.push(started.elapsed().as_secs_f64() * 1e3);
                probed
                    .ping_rtt
                    .push(pong["rtt_ms"].as_f64().unwrap_or(f64::NAN));
            }
            Err(e) => probed.failures.push(format!("{t:.1}s: ping {name}: {e}")),
        }
        match api.call("peers", Value::Null) {
            Ok(peers) => {
                for peer in peers.as_array().into_iter().flatten() {
                    let status = peer["status"].as_str().unwrap_or("?");
                    if let Some(rtt) = peer["rtt_ms"].as_f64() {
                        probed.keepalive_rtt.push(rtt);
                    }
                    match status {
                        "direct" => {}
                        "suspect" => probed.suspect += 1,
                        _ => probed.not_routable.push((
                            t,
                            peer["name"].as_str().unwrap_or("?").to_owned(),
                            status.to_owned(),
                        )),
                    }
                }
            }
            Err(e) => probed.failures.push(format!("{t:.1}s: peers: {e}")),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    probed
}

fn ms_summary(samples: &[f64]) -> String {
    format!(
        "median {:.2} ms, p99 {:.2} ms, max {:.2} ms (n={})",
        quantile(samples, 0.5),
        quantile(samples, 0.99),
        quantile(samples, 1.0),
        samples.len()
    )
}

/// Every key `load/...` on `api`'s device, with its value.
fn stored_keys(api: &mut Client) -> BTreeMap<String, String> {
    let mut keys = BTreeMap::new();
    let mut after = Value::Null;
    loop {
        let mut params = json!({"prefix": "load/", "limit": 10000});
        if !after.is_null() {
            params["after"] = after.clone();
        }
        let Ok(page) = api.call("db.list", params) else {
            return keys;
        };
        for item in page["items"].as_array().into_iter().flatten() {
            let key = item["key"].as_str().unwrap_or("").to_owned();
            keys.insert(key, item["value"].as_str().unwrap_or("").to_owned());
        }
        after = page["next_after"].clone();
        if after.is_null() {
            return keys;
        }
    }
}

#[test]
fn nine_devices_flood_one_with_messages_and_store_writes() {
    if skipped() {
        return;
    }
    let _serial = serial();
    const N: usize = 10;
    let load = load_time(15);
    let out = tempfile::tempdir().expect("temp dir");
    let handled_log = out.path().join("handled");
    let lan = Lan::new(N);
    let mut devices = full_mesh(&lan, N, &handled_log);
    let pid = devices[0].pid("serve");
    let sockets: Vec<PathBuf> = devices.iter().map(Device::socket).collect();
    std::thread::sleep(Duration::from_secs(2));
    let before = usage(pid);

    let start = Instant::now();
    let stop_load = AtomicBool::new(false);
    let stop_watch = AtomicBool::new(false);
    let handled_at_load_end = AtomicU64::new(0);
    let (sent, written, watched, probed, drained_after) = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| watch(&sockets[0], &stop_watch, start));
        let prober = scope.spawn(|| probe(&sockets[0], pid, &stop_watch, start, N - 1));
        let senders: Vec<_> = (1..N)
            .map(|i| {
                let (socket, stop) = (&sockets[i], &stop_load);
                scope.spawn(move || flood_messages(socket, i, stop))
            })
            .collect();
        let writers: Vec<_> = (1..N)
            .map(|i| {
                let (socket, stop) = (&sockets[i], &stop_load);
                scope.spawn(move || flood_store(socket, i, stop))
            })
            .collect();
        std::thread::sleep(load);
        stop_load.store(true, Ordering::Relaxed);
        handled_at_load_end.store(lines(&handled_log).len() as u64, Ordering::Relaxed);
        let sent: Vec<Sent> = senders.into_iter().map(|t| t.join().unwrap()).collect();
        let written: Vec<Written> = writers.into_iter().map(|t| t.join().unwrap()).collect();
        // Drained: every sender's outbox empty, so every accepted message was acknowledged.
        let drain = load + Duration::from_secs(60);
        let mut outboxes: Vec<Client> = sockets[1..]
            .iter()
            .map(|socket| Client::connect(socket, HANG).expect("connect"))
            .collect();
        let drained = wait_until(drain, || {
            std::thread::sleep(Duration::from_millis(200));
            outboxes.iter_mut().all(|api| {
                api.call("messages", Value::Null)
                    .is_ok_and(|m| m["outbox"].as_array().is_some_and(Vec::is_empty))
            })
        });
        let drained_after = drained.then(|| start.elapsed());
        stop_watch.store(true, Ordering::Relaxed);
        (
            sent,
            written,
            watcher.join().unwrap(),
            prober.join().unwrap(),
            drained_after,
        )
    });
    let accepted: usize = sent.iter().map(|s| s.accepted.len()).sum();
    let full: u64 = sent.iter().map(|s| s.outbox_full).sum();
    let keys: u64 = written.iter().map(|w| w.written).sum();
    let handled_done = wait_until(SOON, || lines(&handled_log).len() >= accepted);
    let handled_all_after = start.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    // The last value each writer gave each of its keys.
    let expected_store: BTreeMap<String, String> = written
        .iter()
        .enumerate()
        .flat_map(|(i, w)| {
            (w.written.saturating_sub(STORE_KEYS)..w.written)
                .map(move |n| (format!("load/d{}/{}", i + 1, n % STORE_KEYS), n.to_string()))
        })
        .collect();
    let mut d0 = Client::connect(&sockets[0], HANG).expect("connect");
    let stored_done = wait_until(SOON, || {
        std::thread::sleep(Duration::from_millis(200));
        stored_keys(&mut d0) == expected_store
    });
    std::thread::sleep(Duration::from_secs(2));
    let after = usage(pid);
    let peak = |of: fn(&Usage) -> u64| probed.usage.iter().map(|(_, u)| of(u)).max().unwrap_or(0);
    let peak_rss = peak(|u| u.rss_kib);
    let peak_pss = peak(|u| u.pss_kib);
    let peak_fds = peak(|u| u.fds as u64) as usize;

    let secs = load.as_secs_f64();
    let send_latency: Vec<f64> = sent.iter().flat_map(|s| s.latencies.clone()).collect();
    let set_latency: Vec<f64> = written.iter().flat_map(|w| w.latencies.clone()).collect();
    println!("load: 9 devices → d0 for {secs:.0} s (debug build unless said otherwise)");
    println!(
        "  messages: {accepted} accepted ({:.0}/s), {full} refused with outbox full; handled by d0 during the load: {} ({:.0}/s); outboxes drained after {}; all handled after {:.1} s",
        accepted as f64 / secs,
        handled_at_load_end.load(Ordering::Relaxed),
        handled_at_load_end.load(Ordering::Relaxed) as f64 / secs,
        drained_after.map_or("NEVER".into(), |d| format!("{:.1} s", d.as_secs_f64())),
        handled_all_after.as_secs_f64(),
    );
    println!("  send call: {}", ms_summary(&send_latency));
    println!(
        "  store: {keys} writes ({:.0}/s) to {} keys; db.set call: {}",
        keys as f64 / secs,
        expected_store.len(),
        ms_summary(&set_latency)
    );
    println!(
        "  d0 before: {before}; peak while loaded: RSS {:.1} MiB, PSS {:.1} MiB, {peak_fds} fds; after draining: {after}",
        mib(peak_rss),
        mib(peak_pss)
    );
    println!(
        "  d0's pings to members: daemon RTT {}; API call {}",
        ms_summary(&probed.ping_rtt),
        ms_summary(&probed.ping_call)
    );
    println!(
        "  keepalive RTT (peers' rtt_ms): {}",
        ms_summary(&probed.keepalive_rtt)
    );
    println!(
        "  d0's events: {} message, {} store, {} lost to lag; peer events not direct: {:?}; `peers` polls showing suspect: {}",
        watched.messages, watched.stores, watched.lagged, watched.not_direct, probed.suspect
    );
    if let Some(message) = sent.iter().find_map(|s| s.full_message.clone()) {
        println!("  a full outbox answers: {message}");
    }
    let log = devices[0].log("serve");
    let count = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    println!(
        "  d0's log: {} messages dropped as too many wait for earlier ones (logged at debug: CNSPRCY_LOAD_LOG=debug)",
        count("too many messages wait for earlier ones")
    );
    for (t, u) in probed
        .usage
        .iter()
        .step_by((probed.usage.len() / 10).max(1))
    {
        println!("  d0 at {t:6.1} s: {u}");
    }

    // Nothing hung, nothing failed but a clearly refused send.
    let failures: Vec<&String> = sent
        .iter()
        .flat_map(|s| &s.failures)
        .chain(written.iter().flat_map(|w| &w.failures))
        .chain(&watched.failures)
        .chain(&probed.failures)
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
    if let Some(message) = sent.iter().find_map(|s| s.full_message.as_ref()) {
        assert!(message.contains("the outbox is full"), "{message}");
    }
    assert!(accepted > 0 && keys > 0, "nothing was sent or written");
    // No member was ever taken for unreachable (nor relayed: its session closed).
    let gone: Vec<_> = watched
        .not_direct
        .iter()
        .filter(|(_, _, status)| status != "suspect")
        .collect();
    assert!(gone.is_empty(), "members lost while loaded: {gone:?}");
    assert!(probed.not_routable.is_empty(), "{:?}", probed.not_routable);
    // Round trips stay well within the 3 s (keepalive interval + timeout) after which a session
    // is taken for dead. Generous: 10 daemons and this test share 2 cores.
    let (ping_p99, keepalive_max) = (
        quantile(&probed.ping_rtt, 0.99),
        quantile(&probed.keepalive_rtt, 1.0),
    );
    assert!(ping_p99 < 2000.0, "ping p99 {ping_p99} ms");
    assert!(keepalive_max < 2000.0, "keepalive RTT {keepalive_max} ms");
    // Every accepted message ran exactly once, and nothing else ran.
    assert!(
        drained_after.is_some(),
        "the senders' outboxes did not drain"
    );
    assert!(handled_done, "not every accepted message was handled");
    let handled = lines(&handled_log);
    let unique: BTreeSet<&String> = handled.iter().collect();
    assert_eq!(unique.len(), handled.len(), "a handler ran twice");
    let expected: BTreeSet<&String> = sent.iter().flat_map(|s| &s.accepted).collect();
    assert_eq!(unique, expected, "handled ≠ accepted");
    // Every store write arrived: d0 holds each key's last value.
    if !stored_done {
        let stored = stored_keys(&mut d0);
        let wrong: Vec<_> = expected_store
            .iter()
            .filter(|(k, v)| stored.get(*k) != Some(v))
            .take(10)
            .collect();
        panic!(
            "d0's store differs from the writes ({} keys, {} expected); first differences: {wrong:?}",
            stored.len(),
            expected_store.len()
        );
    }
    // Memory and descriptors bounded.
    assert!(peak_rss < 256 * 1024, "d0 peaked at {peak_rss} KiB");
    assert!(
        after.rss_kib < before.rss_kib + 64 * 1024,
        "d0 grew from {before} to {after}"
    );
    assert!(
        peak_fds <= before.fds + HANDLER_FDS + 8,
        "d0 held {peak_fds} fds (before: {before})"
    );
    assert!(after.fds <= before.fds + 8, "d0 from {before} to {after}");
    for device in &mut devices {
        assert!(device.try_wait("serve").is_none(), "{} died", device.name);
    }
}

/// What one of the 100 clients saw.
#[derive(Default)]
struct Seen {
    /// Calls answered with a result.
    answered: u64,
    /// `-32002`: the connection refused (all 64 busy) or the subscription refused (32 already).
    refused_busy: u64,
    refused_subscribe: u64,
    /// `send`s refused with a full outbox.
    outbox_full: u64,
    /// The daemon closed the connection (an idle one, to make room for a new client), saying
    /// so in a last line; and without a word (the end of the stream, a reset).
    closed: u64,
    closed_silently: u64,
    /// Event notifications received while subscribed.
    events: u64,
    /// IDs of the messages `send` accepted.
    accepted: Vec<String>,
    latencies: Vec<f64>,
    /// Anything else: hangs, garbage, unexpected errors.
    failures: Vec<String>,
}

impl Seen {
    /// Files an error answer; true if the connection is gone (reconnect).
    fn error(&mut self, who: &str, what: &str, e: CallError) -> bool {
        match e {
            CallError::Rpc { code, message }
                if code == UNAVAILABLE && message.contains("too many connections") =>
            {
                self.refused_busy += 1;
                true
            }
            CallError::Rpc { code, message }
                if code == UNAVAILABLE && message.contains("subscribed already") =>
            {
                self.refused_subscribe += 1;
                false
            }
            CallError::Rpc { code, message }
                if code == UNAVAILABLE && message.contains("to make room for a new client") =>
            {
                self.closed += 1;
                true
            }
            CallError::Rpc { code, .. } if code == OUTBOX_FULL => {
                self.outbox_full += 1;
                false
            }
            CallError::Closed(_) => {
                self.closed_silently += 1;
                true
            }
            e => {
                self.failures.push(format!("{who}: {what}: {e}"));
                !matches!(e, CallError::Rpc { .. })
            }
        }
    }
}

/// Connects, retrying for a moment if the socket's backlog is full.
fn connect(socket: &Path, seen: &mut Seen, who: &str) -> Option<Client> {
    let deadline = Instant::now() + HANG;
    loop {
        match Client::connect(socket, HANG) {
            Ok(client) => return Some(client),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                seen.failures.push(format!("{who}: cannot connect: {e}"));
                return None;
            }
        }
    }
}

/// Connects and says nothing; reconnects when the daemon closes the connection.
fn idle_client(socket: &Path, who: &str, stop: &AtomicBool) -> Seen {
    let mut seen = Seen::default();
    while !stop.load(Ordering::Relaxed) {
        let Some(mut api) = connect(socket, &mut seen, who) else {
            break;
        };
        while !stop.load(Ordering::Relaxed) {
            match api.line(Duration::from_millis(500)) {
                Err(CallError::TimedOut(_)) => continue,
                Ok(line) if line["error"].is_object() => {
                    let error = CallError::Rpc {
                        code: line["error"]["code"].as_i64().unwrap_or(0),
                        message: line["error"]["message"].as_str().unwrap_or("").into(),
                    };
                    seen.error(who, "idle", error);
                    break;
                }
                Ok(line) => {
                    seen.failures
                        .push(format!("{who}: an idle client was sent {line}"));
                    break;
                }
                Err(e) => {
                    seen.error(who, "idle", e);
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    seen
}

/// Calls one method after another, of every kind; reconnects when closed or refused.
fn busy_client(socket: &Path, me: usize, stop: &AtomicBool) -> Seen {
    let who = format!("client {me}");
    let mut seen = Seen::default();
    let mut n = 0u64;
    'connection: while !stop.load(Ordering::Relaxed) {
        let Some(mut api) = connect(socket, &mut seen, &who) else {
            break;
        };
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let key = format!("clients/{me}/{}", n % 50);
            let (method, params) = match n % 8 {
                0 => ("status", Value::Null),
                1 => ("peers", Value::Null),
                2 => ("peer", json!({"name": "d1"})),
                3 => ("db.set", json!({"key": key, "value": "v"})),
                4 => ("db.get", json!({"key": key})),
                5 => ("ping", json!({"name": "d1", "timeout_ms": 5000})),
                6 => (
                    "send",
                    json!({"tag": "load/clients", "to": ["d1"], "payload_text": who}),
                ),
                _ => ("messages", Value::Null),
            };
            let started = Instant::now();
            let answer = api.call(method, params);
            seen.latencies.push(started.elapsed().as_secs_f64() * 1e3);
            match answer {
                Ok(result) => {
                    seen.answered += 1;
                    if method == "send" {
                        seen.accepted
                            .push(result["id"].as_str().unwrap_or("?").to_owned());
                    }
                }
                Err(e) => {
                    if seen.error(&who, method, e) {
                        std::thread::sleep(Duration::from_millis(100));
                        continue 'connection;
                    }
                }
            }
        }
    }
    seen
}

/// Subscribes and reads events; refused (32 subscribed already), tries again every second.
fn subscriber(socket: &Path, me: usize, stop: &AtomicBool, subscribed: &AtomicU64) -> Seen {
    let who = format!("subscriber {me}");
    let mut seen = Seen::default();
    'connection: while !stop.load(Ordering::Relaxed) {
        let Some(mut api) = connect(socket, &mut seen, &who) else {
            break;
        };
        loop {
            if stop.load(Ordering::Relaxed) {
                break 'connection;
            }
            let started = Instant::now();
            let answer = api.call("subscribe", Value::Null);
            seen.latencies.push(started.elapsed().as_secs_f64() * 1e3);
            match answer {
                Ok(_) => break,
                Err(e) => {
                    if seen.error(&who, "subscribe", e) {
                        std::thread::sleep(Duration::from_millis(100));
                        continue 'connection;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        seen.answered += 1;
        subscribed.fetch_add(1, Ordering::Relaxed);
        let gone = loop {
            if stop.load(Ordering::Relaxed) {
                break false;
            }
            match api.line(Duration::from_millis(500)) {
                Ok(line) if line["method"] == "event" => seen.events += 1,
                Ok(line) => seen.failures.push(format!("{who}: unexpected line {line}")),
                Err(CallError::TimedOut(_)) => {}
                Err(e) => {
                    seen.error(&who, "events", e);
                    break true;
                }
            }
        };
        subscribed.fetch_sub(1, Ordering::Relaxed);
        if !gone {
            break;
        }
    }
    seen
}

#[test]
fn a_hundred_clients_on_the_public_socket_are_answered_or_told_to_come_back() {
    if skipped() {
        return;
    }
    let _serial = serial();
    let load = load_time(15);
    let out = tempfile::tempdir().expect("temp dir");
    let handled_log = out.path().join("handled");
    let lan = Lan::new(3);
    let mut devices = full_mesh(&lan, 3, &handled_log);
    let pid = devices[0].pid("serve");
    let sockets: Vec<PathBuf> = devices.iter().map(Device::socket).collect();
    std::thread::sleep(Duration::from_secs(1));
    let before = usage(pid);

    let stop = AtomicBool::new(false);
    let subscribed = AtomicU64::new(0);
    let start = Instant::now();
    let mut samples: Vec<(f64, Usage, u64)> = Vec::new();
    let mut cli = (0u64, 0u64, Vec::new());
    let (seen, mesh_sent, mesh_failures) = std::thread::scope(|scope| {
        let (socket, stop, subscribed) = (&sockets[0], &stop, &subscribed);
        let clients: Vec<_> = (0..100)
            .map(|i| match i {
                0..25 => scope.spawn(move || idle_client(socket, &format!("idle {i}"), stop)),
                25..60 => scope.spawn(move || busy_client(socket, i, stop)),
                _ => scope.spawn(move || subscriber(socket, i, stop, subscribed)),
            })
            .collect();
        // Meanwhile the mesh works: d1 sends d0 a message every 50 ms, d2 pings d0 and finds
        // it direct.
        let mesh = scope.spawn(|| {
            let mut failures = Vec::new();
            let mut sent = Vec::new();
            let mut d1 = Client::connect(&sockets[1], HANG).expect("connect");
            let mut d2 = Client::connect(&sockets[2], HANG).expect("connect");
            while !stop.load(Ordering::Relaxed) {
                match d1.call("send", json!({"tag": "load/mesh", "to": ["d0"]})) {
                    Ok(r) => sent.push(r["id"].as_str().unwrap_or("?").to_owned()),
                    Err(e) => failures.push(format!("d1 send: {e}")),
                }
                if let Err(e) = d2.call("ping", json!({"name": "d0", "timeout_ms": 5000})) {
                    failures.push(format!("d2 ping d0: {e}"));
                }
                match d2.call("peer", json!({"name": "d0"})) {
                    Ok(p) if p["status"] == "direct" => {}
                    other => failures.push(format!("d2 sees d0: {other:?}")),
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (sent, failures)
        });
        // The CLI on d0 gets through, or is told to come back.
        while start.elapsed() < load {
            samples.push((
                start.elapsed().as_secs_f64(),
                usage(pid),
                subscribed.load(Ordering::Relaxed),
            ));
            let run = devices[0].cnspr(&["status"]);
            if run.status.success() {
                cli.0 += 1;
            } else if run.stderr.contains("too many connections")
                || run.stderr.contains("to make room for a new client")
            {
                cli.1 += 1;
                eprintln!("  `cnspr status` on d0: {}", run.stderr.trim());
            } else {
                cli.2.push(format!("{}{}", run.stdout, run.stderr));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        stop.store(true, Ordering::Relaxed);
        let seen: Vec<Seen> = clients.into_iter().map(|t| t.join().unwrap()).collect();
        let (sent, failures) = mesh.join().unwrap();
        (seen, sent, failures)
    });
    std::thread::sleep(Duration::from_secs(2));
    let after = usage(pid);

    let sum = |f: fn(&Seen) -> u64, range: std::ops::Range<usize>| -> u64 {
        seen[range].iter().map(f).sum()
    };
    let latencies: Vec<f64> = seen.iter().flat_map(|s| s.latencies.clone()).collect();
    let peak_rss = samples.iter().map(|(_, u, _)| u.rss_kib).max().unwrap_or(0);
    let peak_fds = samples.iter().map(|(_, u, _)| u.fds).max().unwrap_or(0);
    let most_subscribed = samples.iter().map(|(_, _, s)| *s).max().unwrap_or(0);
    let secs = load.as_secs_f64();
    println!(
        "load: 100 clients on d0's socket for {secs:.0} s (25 idle, 35 calling, 40 subscribing)"
    );
    println!(
        "  idle: closed to make room {} times (without a word: {}), refused {} times",
        sum(|s| s.closed, 0..25),
        sum(|s| s.closed_silently, 0..25),
        sum(|s| s.refused_busy, 0..25)
    );
    println!(
        "  calling: {} answered ({:.0}/s; fewest for one client {}), {} connections refused (all busy), {} closed while idle (without a word: {}), {} sends refused (outbox full); call {}",
        sum(|s| s.answered, 25..60),
        sum(|s| s.answered, 25..60) as f64 / secs,
        seen[25..60].iter().map(|s| s.answered).min().unwrap_or(0),
        sum(|s| s.refused_busy, 25..60),
        sum(|s| s.closed, 25..60),
        sum(|s| s.closed_silently, 25..60),
        sum(|s| s.outbox_full, 25..60),
        ms_summary(&latencies)
    );
    println!(
        "  subscribing: {} subscriptions, at most {most_subscribed} at once; {} refused (32 already), {} connections refused, {} closed ({} without a word); {} events",
        sum(|s| s.answered, 60..100),
        sum(|s| s.refused_subscribe, 60..100),
        sum(|s| s.refused_busy, 60..100),
        sum(|s| s.closed, 60..100),
        sum(|s| s.closed_silently, 60..100),
        sum(|s| s.events, 60..100)
    );
    println!(
        "  `cnspr status` on d0 meanwhile: {} ok, {} told to come back; the mesh: {} messages d1 → d0",
        cli.0,
        cli.1,
        mesh_sent.len()
    );
    println!(
        "  d0 before: {before}; peak: RSS {:.1} MiB, {peak_fds} fds; after: {after}",
        mib(peak_rss)
    );

    let failures: Vec<&String> = seen
        .iter()
        .flat_map(|s| &s.failures)
        .chain(&mesh_failures)
        .chain(&cli.2)
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
    // A connection the daemon closes is told why first.
    assert_eq!(sum(|s| s.closed_silently, 0..100), 0);
    assert!(sum(|s| s.answered, 25..60) > 0);
    assert!(sum(|s| s.events, 60..100) > 0, "no subscriber got an event");
    assert!(
        most_subscribed <= 32,
        "{most_subscribed} subscribed at once"
    );
    assert!(cli.0 > 0, "`cnspr status` never got through");
    // Every message accepted, from the mesh or a client, ran once.
    let accepted: BTreeSet<String> = seen
        .iter()
        .flat_map(|s| s.accepted.iter().cloned())
        .chain(mesh_sent)
        .collect();
    assert!(
        wait_until(SOON, || {
            let handled: BTreeSet<String> = lines(&handled_log).into_iter().collect();
            accepted.is_subset(&handled)
        }),
        "accepted messages were not handled"
    );
    let handled = lines(&handled_log);
    let unique: BTreeSet<&String> = handled.iter().collect();
    assert_eq!(unique.len(), handled.len(), "a handler ran twice");
    // Bounded: at most 64 connections, and handlers running (16 at most, each with its pipes),
    // and nothing left behind.
    assert!(peak_rss < 256 * 1024, "d0 peaked at {peak_rss} KiB");
    assert!(
        peak_fds <= before.fds + 64 + HANDLER_FDS,
        "d0 held {peak_fds} fds (before: {before})"
    );
    assert!(after.fds <= before.fds + 8, "d0 from {before} to {after}");
    assert!(
        after.rss_kib < before.rss_kib + 32 * 1024,
        "d0 grew from {before} to {after}"
    );
    for device in &mut devices {
        assert!(device.try_wait("serve").is_none(), "{} died", device.name);
    }
}
