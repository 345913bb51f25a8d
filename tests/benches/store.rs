//! Benchmarks of the replicated store (issue 5) with real daemons in network namespaces:
//! - local `db set` rate through the CLI (one `cnspr db set` process per write) and through one
//!   API connection, on one device of a 10-device full mesh;
//! - time from `db.set` on one device to the key being visible (`db.get`) on all 9 others;
//! - bytes exchanged to re-sync after a partition: two devices share 100,000 keys, one is
//!   stopped while 10 keys change on the other, and is started again.
//!
//! ```text
//! cargo build --release --workspace
//! cargo bench -p cnsprcy-tests --bench store
//! ```
//!
//! Needs root (network namespaces). Uses the release binaries next to this executable.

use std::path::Path;
use std::time::{Duration, Instant};

use cnsprcy_tests::bench::{Api, bytes_sent, percentile, release_cnspr};
use cnsprcy_tests::netns::NetNs;
use cnsprcy_tests::{Device, wait_until};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const DEVICES: usize = 10;
const CLI_SETS: usize = 200;
const API_SETS: usize = 2000;
const VISIBILITY_KEYS: usize = 50;
const STORE_KEYS: usize = 100_000;
const LOAD_CONNECTIONS: usize = 8;
const CHANGED_KEYS: usize = 10;
const SOON: Duration = Duration::from_secs(60);

fn set(api: &mut Api, key: &str, value: &str) {
    api.call("db.set", json!({"key": key, "value": value}));
}

fn has(api: &mut Api, key: &str, value: &str) -> bool {
    api.call("db.get", json!({"key": key}))["value"] == value
}

fn stats(api: &mut Api) -> Value {
    api.call("db.stats", Value::Null)
}

fn stat(stats: &Value, name: &str) -> u64 {
    stats[name].as_u64().unwrap_or(0)
}

/// Adds each device of `devices` to every other's roster, listening on `127.0.0.1:port(i)`.
fn full_mesh(devices: &[Device], apis: &mut [Api], port: impl Fn(usize) -> u16) {
    let keys: Vec<String> = devices.iter().map(|d| d.public_key()).collect();
    for (i, api) in apis.iter_mut().enumerate() {
        for (j, key) in keys.iter().enumerate() {
            if i != j {
                api.call(
                    "members.add",
                    json!({"name": devices[j].name, "public_key": key,
                           "addresses": [format!("127.0.0.1:{}", port(j))]}),
                );
            }
        }
    }
}

fn all_direct(api: &mut Api, others: usize) -> bool {
    api.call("peers", Value::Null)
        .as_array()
        .is_some_and(|p| p.iter().filter(|p| p["status"] == "direct").count() == others)
}

fn mb(bytes: f64) -> String {
    format!("{:.2} MB", bytes / 1e6)
}

fn main() {
    let cnspr = release_cnspr();
    let bench_started = Instant::now();
    mesh_of_ten(&cnspr);
    resync(&cnspr);
    println!(
        "whole bench: {:.0} s",
        bench_started.elapsed().as_secs_f64()
    );
}

/// Sections 1 and 2: write rates and visibility on 9 others, in a 10-device full mesh.
fn mesh_of_ten(cnspr: &Path) {
    let ns = NetNs::new();
    let port = |i: usize| 18001 + i as u16;
    let mut devices: Vec<Device> = (0..DEVICES)
        .map(|i| {
            let mut device = Device::new(&format!("d{i}"));
            device.configure(&format!("127.0.0.1:{}", port(i)));
            device.spawn_in(&ns, "serve", cnspr, &["serve"]);
            device
        })
        .collect();
    for device in &mut devices {
        device.wait_ready("serve");
    }
    let mut apis: Vec<Api> = devices.iter().map(Api::connect).collect();
    full_mesh(&devices, &mut apis, port);
    assert!(
        wait_until(SOON, || apis.iter_mut().all(|a| all_direct(a, DEVICES - 1))),
        "the mesh did not form"
    );
    println!("{DEVICES} devices, full mesh, all direct");

    // 1a. `cnspr db set` processes, one after another, on d0.
    let started = Instant::now();
    for k in 0..CLI_SETS {
        devices[0]
            .command(cnspr)
            .args(["db", "set", &format!("cli/k{k}"), &format!("v{k}")])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .expect("cnspr db set");
    }
    let cli = started.elapsed();
    // For comparison: the cost of a CLI process that makes one API call and writes nothing.
    let started = Instant::now();
    for _ in 0..CLI_SETS / 4 {
        devices[0]
            .command(cnspr)
            .args(["db", "stats"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .expect("cnspr db stats");
    }
    let cli_stats = started.elapsed();
    println!(
        "CLI: {CLI_SETS} `cnspr db set` processes: {:.0}/s ({:.2} ms each); `cnspr db stats` (no write): {:.2} ms each",
        CLI_SETS as f64 / cli.as_secs_f64(),
        cli.as_secs_f64() * 1e3 / CLI_SETS as f64,
        cli_stats.as_secs_f64() * 1e3 / (CLI_SETS / 4) as f64
    );

    // 1b. `db.set` calls on one API connection, one after another.
    let mut per_call = Vec::with_capacity(API_SETS);
    let started = Instant::now();
    for k in 0..API_SETS {
        let t = Instant::now();
        set(&mut apis[0], &format!("api/k{k}"), &format!("v{k}"));
        per_call.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let api = started.elapsed();
    per_call.sort_by(f64::total_cmp);
    println!(
        "API: {API_SETS} `db.set` on one connection: {:.0}/s (per call median {:.2} ms, p99 {:.2} ms)",
        API_SETS as f64 / api.as_secs_f64(),
        percentile(&per_call, 0.5),
        percentile(&per_call, 0.99)
    );
    let (last, last_value) = (
        format!("api/k{}", API_SETS - 1),
        format!("v{}", API_SETS - 1),
    );
    let caught_up = wait_until(SOON, || {
        (1..DEVICES).all(|i| has(&mut apis[i], &last, &last_value))
    });
    assert!(caught_up, "the API writes did not reach everyone");

    // 2. Visibility: db.set on d0, then poll db.get on d1..d9 until all have the key.
    let mut latencies = Vec::with_capacity(VISIBILITY_KEYS);
    let mut set_calls = Vec::with_capacity(VISIBILITY_KEYS);
    for k in 0..VISIBILITY_KEYS {
        let key = format!("vis/k{k}");
        let value = format!("v{k}");
        let started = Instant::now();
        set(&mut apis[0], &key, &value);
        set_calls.push(started.elapsed().as_secs_f64() * 1e3);
        let mut missing: Vec<usize> = (1..DEVICES).collect();
        let deadline = started + SOON;
        while !missing.is_empty() && Instant::now() < deadline {
            missing.retain(|&i| !has(&mut apis[i], &key, &value));
        }
        assert!(missing.is_empty(), "{key} did not reach {missing:?}");
        latencies.push(started.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(20));
    }
    latencies.sort_by(f64::total_cmp);
    set_calls.sort_by(f64::total_cmp);
    println!(
        "visibility: db.set on d0 → db.get shows it on all {} others: median {:.2} ms, p99 {:.2} ms, max {:.2} ms (n={VISIBILITY_KEYS}; the set call itself: median {:.2} ms)",
        DEVICES - 1,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1],
        percentile(&set_calls, 0.5)
    );
    drop(apis);
}

/// Section 3: two devices share 100,000 keys; B is stopped, 10 keys change on A, B comes back.
fn resync(cnspr: &Path) {
    let ns = NetNs::new();
    let port = |i: usize| 18101 + i as u16;
    let mut devices: Vec<Device> = ["a", "b"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut device = Device::new(name);
            device.configure(&format!("127.0.0.1:{}", port(i)));
            device.spawn_in(&ns, "serve", cnspr, &["serve"]);
            device
        })
        .collect();
    for device in &mut devices {
        device.wait_ready("serve");
    }

    // Load 100,000 keys on A alone (not linked yet), on several connections at once.
    let key = |k: usize| format!("sync/{k:06}");
    let value = |k: usize| format!("value-{k:06}-xxxxxxxx");
    let socket = devices[0].socket();
    let started = Instant::now();
    std::thread::scope(|scope| {
        for c in 0..LOAD_CONNECTIONS {
            let socket = socket.clone();
            scope.spawn(move || {
                let mut api = Api::connect_path(&socket);
                for k in (c..STORE_KEYS).step_by(LOAD_CONNECTIONS) {
                    set(&mut api, &key(k), &value(k));
                }
            });
        }
    });
    let load = started.elapsed();
    let mut a = Api::connect(&devices[0]);
    assert_eq!(
        stat(&stats(&mut a), "keys"),
        STORE_KEYS as u64,
        "A's key count"
    );
    println!(
        "loaded {STORE_KEYS} keys on a lone device over {LOAD_CONNECTIONS} API connections: {:.1} s ({:.0}/s)",
        load.as_secs_f64(),
        STORE_KEYS as f64 / load.as_secs_f64()
    );
    // What sending the whole store would take: key, value and a version (timestamp, counter,
    // 32-byte writer) per entry, no framing.
    let store_bytes: usize = (0..STORE_KEYS)
        .map(|k| key(k).len() + value(k).len() + 8 + 4 + 32)
        .sum();

    // Link A and B; B gets everything by anti-entropy.
    let mut apis = [a, Api::connect(&devices[1])];
    full_mesh(&devices, &mut apis, port);
    let [mut a, mut b] = apis;
    let started = Instant::now();
    let synced = wait_until(Duration::from_secs(120), || {
        stat(&stats(&mut b), "keys") == STORE_KEYS as u64
    });
    assert!(
        synced,
        "B did not get the {STORE_KEYS} keys: {}",
        stats(&mut b)
    );
    let first_sync = started.elapsed();
    let (sa, sb) = (stats(&mut a), stats(&mut b));
    println!(
        "first sync of {STORE_KEYS} keys to an empty B: {:.1} s; store-traffic counters: A sent {} (sync {} + push {}), B sent {}; the entries themselves ≈ {}",
        first_sync.as_secs_f64(),
        mb((stat(&sa, "sync_bytes_sent") + stat(&sa, "push_bytes_sent")) as f64),
        mb(stat(&sa, "sync_bytes_sent") as f64),
        mb(stat(&sa, "push_bytes_sent") as f64),
        mb((stat(&sb, "sync_bytes_sent") + stat(&sb, "push_bytes_sent")) as f64),
        mb(store_bytes as f64)
    );

    // Keepalive baseline: both daemons' TCP bytes per second with equal stores.
    std::thread::sleep(Duration::from_secs(2));
    let pids = [devices[0].pid("serve"), devices[1].pid("serve")];
    let idle_before: u64 = pids.iter().map(|&p| bytes_sent(&ns, p)).sum();
    let idle_window = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    let idle_after: u64 = pids.iter().map(|&p| bytes_sent(&ns, p)).sum();
    let idle_rate =
        idle_after.saturating_sub(idle_before) as f64 / idle_window.elapsed().as_secs_f64();

    // Partition: stop B, change 10 keys on A, start B.
    devices[1].stop_with("serve", Signal::SIGTERM);
    drop(b);
    let a_before = stats(&mut a);
    for k in 0..CHANGED_KEYS {
        set(&mut a, &key(k * 9973), "changed while b was away");
    }
    let restarted = Instant::now();
    let b_pid = devices[1].spawn_in(&ns, "serve", cnspr, &["serve"]);
    devices[1].wait_ready("serve");
    let mut b = Api::connect(&devices[1]);
    let deadline = restarted + SOON;
    while Instant::now() < deadline
        && !(0..CHANGED_KEYS).all(|k| has(&mut b, &key(k * 9973), "changed while b was away"))
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    let converged = restarted.elapsed();
    // Both sockets of the new session started at 0 bytes: A's session with the old B closed.
    let tcp = bytes_sent(&ns, pids[0]) + bytes_sent(&ns, b_pid);
    let measured = restarted.elapsed().as_secs_f64();
    assert!(
        (0..CHANGED_KEYS).all(|k| has(&mut b, &key(k * 9973), "changed while b was away")),
        "B did not get the {CHANGED_KEYS} changed keys within {SOON:?}"
    );
    let (sa, sb) = (stats(&mut a), stats(&mut b));
    let counter = |now: &Value, before: &Value| {
        (stat(now, "sync_bytes_sent") + stat(now, "push_bytes_sent"))
            .saturating_sub(stat(before, "sync_bytes_sent") + stat(before, "push_bytes_sent"))
    };
    let store_traffic = counter(&sa, &a_before) + counter(&sb, &json!({}));
    let tcp_net = tcp as f64 - idle_rate * measured;
    println!(
        "re-sync of {CHANGED_KEYS} differing keys in {STORE_KEYS}: B had them {:.2} s after its start; \
         TCP bytes sent by both daemons on the new session: {tcp} ({tcp_net:.0} after {idle_rate:.0} B/s × {measured:.1} s of keepalive baseline; handshake included); \
         store-traffic counters: {store_traffic} (A {}, B {}; sync rounds A {}, B {}); \
         sending the store: ≈ {} ({:.0}× the TCP bytes)",
        converged.as_secs_f64(),
        counter(&sa, &a_before),
        counter(&sb, &json!({})),
        stat(&sa, "sync_rounds").saturating_sub(stat(&a_before, "sync_rounds")),
        stat(&sb, "sync_rounds"),
        mb(store_bytes as f64),
        store_bytes as f64 / tcp_net.max(1.0)
    );
}
