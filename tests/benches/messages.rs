//! Benchmarks of tagged messages (issue 4) with real daemons in one network namespace (10, or
//! `CNSPRCY_BENCH_DEVICES`):
//! - `broadcast`: time from `send` to every other device's handler starting, over 100
//!   broadcasts; and, without the handlers, to the sender's `delivered` event of the last
//!   recipient (every one recorded the message and its acknowledgement came back);
//! - `unicast`: messages per second from one device to another, handlers included;
//! - `bytes`: bytes the sender itself puts on the wire per broadcast, against N-1 direct copies;
//! - `flood`: round trips of pings from a third device to one that another device floods with
//!   messages and store writes (the node must answer on time while its writer fsyncs).
//!
//! ```text
//! cargo build --release --workspace
//! cargo bench -p cnsprcy-tests --bench messages [-- SECTION...]
//! ```
//!
//! Needs root (network namespaces). Uses the release binaries next to this executable, or the
//! `cnspr` named by `CNSPRCY_BENCH_CNSPR` (to compare with another version).

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use cnsprcy_tests::bench::{
    Api, HANDLER_DRAIN, HANDLER_STAMP, bytes_sent, follow_events, now_ns, percentile, release_cnspr,
};
use cnsprcy_tests::netns::NetNs;
use cnsprcy_tests::{Device, wait_until};
use serde_json::{Value, json};

const DEFAULT_DEVICES: usize = 10;
/// How long the flood lasts.
const FLOOD: Duration = Duration::from_secs(10);
const BROADCASTS: usize = 100;
const UNICASTS: usize = 500;
const BYTE_ROUNDS: usize = 20;
const PAYLOAD: usize = 1000;
const SOON: Duration = Duration::from_secs(60);
/// How long the first broadcast's acknowledgements are waited for before the build is taken
/// for one without `delivered` events.
const DELIVERED_EVENT_WAIT: Duration = Duration::from_secs(10);

/// A handler that records, first thing, when it started: one line per run in `log`.
fn install_handler(device: &Device, log: &Path) {
    let dir = device.root().join("config/cnsprcy/handlers/bench");
    fs::create_dir_all(&dir).expect("handler dir");
    let path = dir.join("_default.sh");
    fs::write(
        &path,
        format!(
            "{HANDLER_STAMP}echo \"$CNSPRCY_MESSAGE_ID $t\" >> {}\n{HANDLER_DRAIN}",
            log.display()
        ),
    )
    .expect("write handler");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// When each `delivered` event reached a subscriber of `socket`, stamped as read, by message ID.
fn watch_deliveries(socket: &Path) -> Arc<Mutex<HashMap<String, Vec<u128>>>> {
    let delivered = Arc::new(Mutex::new(HashMap::<String, Vec<u128>>::new()));
    let seen = Arc::clone(&delivered);
    follow_events(socket, move |at_ns, event| {
        if event["event"] == "delivered"
            && let Some(id) = event["id"].as_str()
        {
            seen.lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(id.to_owned())
                .or_default()
                .push(at_ns);
        }
    });
    delivered
}

fn main() {
    let cnspr = release_cnspr();
    let sections: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |name: &str| sections.is_empty() || sections.iter().any(|s| s == name);
    let devices_wanted = std::env::var("CNSPRCY_BENCH_DEVICES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_DEVICES);
    let count = devices_wanted.max(3);
    let ns = NetNs::new();
    let logs = tempfile::tempdir().expect("temp dir");
    let mut devices: Vec<Device> = (0..count)
        .map(|i| {
            let mut device = Device::new(&format!("d{i}"));
            // The harness's default, debug, logs several lines per message: CPU the product
            // spends at `info` (its default) only when asked for.
            device.set_env("RUST_LOG", "info");
            device.configure(&format!("127.0.0.1:{}", 18001 + i));
            install_handler(&device, &logs.path().join(format!("d{i}")));
            device.spawn_in(&ns, "serve", &cnspr, &["serve"]);
            device
        })
        .collect();
    for device in &mut devices {
        device.wait_ready("serve");
    }
    let keys: Vec<String> = devices.iter().map(|d| d.public_key()).collect();
    let mut apis: Vec<Api> = devices.iter().map(Api::connect).collect();
    for (i, api) in apis.iter_mut().enumerate() {
        for (j, key) in keys.iter().enumerate() {
            if i != j {
                api.call(
                    "members.add",
                    json!({"name": format!("d{j}"), "public_key": key,
                           "addresses": [format!("127.0.0.1:{}", 18001 + j)]}),
                );
            }
        }
    }
    let all_direct = |api: &mut Api| {
        api.call("peers", Value::Null)
            .as_array()
            .is_some_and(|p| p.iter().filter(|p| p["status"] == "direct").count() == count - 1)
    };
    assert!(
        wait_until(SOON, || apis.iter_mut().all(all_direct)),
        "the mesh did not form"
    );
    println!("{count} devices, full mesh, all direct");
    let payload = base64::engine::general_purpose::STANDARD.encode(vec![b'x'; PAYLOAD]);
    let count_lines = |i: usize| {
        fs::read_to_string(logs.path().join(format!("d{i}")))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };

    // 1. Broadcast latency: send, then wait for every handler's start stamp, and for the
    // sender's `delivered` event of every recipient.
    let delivered = watch_deliveries(&devices[0].socket());
    let mut latencies = Vec::new();
    let mut acknowledged = Vec::new();
    let mut reports_deliveries = true;
    for round in 0..BROADCASTS * usize::from(run("broadcast")) {
        let sent_at = now_ns();
        let result = apis[0].call(
            "send",
            json!({"tag": format!("bench/b{round}"), "payload": payload}),
        );
        let id = result["id"].as_str().expect("id").to_owned();
        let mut last = 0u128;
        let complete = wait_until(SOON, || {
            last = 0;
            (1..count).all(|i| {
                fs::read_to_string(logs.path().join(format!("d{i}")))
                    .unwrap_or_default()
                    .lines()
                    .find(|l| l.starts_with(&id))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u128>().ok())
                    .map(|t| last = last.max(t))
                    .is_some()
            })
        });
        assert!(complete, "broadcast {round} did not reach everyone");
        latencies.push((last.saturating_sub(sent_at)) as f64 / 1e6);
        if !reports_deliveries {
            continue;
        }
        let mut last_ack = 0u128;
        // Builds from before the `delivered` event (compared with CNSPRCY_BENCH_CNSPR) send
        // none: after the first broadcast's wait, the acknowledgements are not measured.
        let wait = if round == 0 {
            DELIVERED_EVENT_WAIT
        } else {
            SOON
        };
        let all_acknowledged = wait_until(wait, || {
            let delivered = delivered.lock().unwrap_or_else(|e| e.into_inner());
            delivered.get(&id).is_some_and(|stamps| {
                last_ack = stamps.iter().copied().max().unwrap_or(0);
                stamps.len() >= count - 1
            })
        });
        if round == 0
            && delivered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
        {
            println!("this cnspr sends no `delivered` events: acknowledgements not measured");
            reports_deliveries = false;
            continue;
        }
        assert!(
            all_acknowledged,
            "broadcast {round}: not every recipient's acknowledgement came back"
        );
        acknowledged.push((last_ack.saturating_sub(sent_at)) as f64 / 1e6);
    }
    acknowledged.sort_by(f64::total_cmp);
    latencies.sort_by(f64::total_cmp);
    if !latencies.is_empty() {
        println!(
            "broadcast to {} devices, send → last handler started: median {:.1} ms, p99 {:.1} ms (n={BROADCASTS})",
            count - 1,
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99)
        );
        if !acknowledged.is_empty() {
            println!(
                "broadcast to {} devices, send → last acknowledgement back at the sender (no handler): median {:.1} ms, p99 {:.1} ms",
                count - 1,
                percentile(&acknowledged, 0.5),
                percentile(&acknowledged, 0.99)
            );
        }
    }

    // 2. Unicast rate: many messages to one device, handlers included.
    if run("unicast") {
        let before = count_lines(1);
        let started = Instant::now();
        for k in 0..UNICASTS {
            apis[0].call(
                "send",
                json!({"tag": format!("bench/u{}", k % 32), "to": ["d1"], "payload_text": "x"}),
            );
        }
        let accepted = started.elapsed();
        assert!(
            wait_until(SOON * 2, || count_lines(1) >= before + UNICASTS),
            "unicasts did not all arrive"
        );
        let handled = started.elapsed();
        println!(
            "{UNICASTS} messages d0 → d1: accepted {:.0}/s, handled {:.0}/s (handler runs included)",
            UNICASTS as f64 / accepted.as_secs_f64(),
            UNICASTS as f64 / handled.as_secs_f64()
        );
    }

    // 3. Bytes the sender sends per broadcast, against N-1 direct copies.
    if run("bytes") {
        let pid = devices[0].pid("serve");
        std::thread::sleep(Duration::from_secs(1));
        let idle_before = bytes_sent(&ns, pid);
        std::thread::sleep(Duration::from_secs(2));
        let idle_rate = bytes_sent(&ns, pid).saturating_sub(idle_before) as f64 / 2.0;
        let sent_before = bytes_sent(&ns, pid);
        let started = Instant::now();
        for round in 0..BYTE_ROUNDS {
            apis[0].call(
                "send",
                json!({"tag": format!("bench/w{round}"), "payload": payload}),
            );
        }
        let base = count_lines(1);
        let _ = wait_until(SOON, || count_lines(1) >= base);
        std::thread::sleep(Duration::from_secs(2));
        let elapsed = started.elapsed().as_secs_f64();
        let sent = bytes_sent(&ns, pid).saturating_sub(sent_before) as f64 - idle_rate * elapsed;
        let per_broadcast = sent / BYTE_ROUNDS as f64;
        // One direct copy: the payload, the tag, 9 target keys of 32 bytes... the ~1 KB payload
        // dominates; take the measured copy size as payload + framing for the comparison.
        let one_copy = (PAYLOAD + 16 + 1 + 2 + 100) as f64;
        println!(
            "sender's bytes per broadcast of a {PAYLOAD}-byte payload: {per_broadcast:.0} (acks and keepalives of the window included); \
         {} direct copies would be ≥ {:.0} ({:.2}×)",
            count - 1,
            one_copy * (count - 1) as f64,
            per_broadcast / (one_copy * (count - 1) as f64)
        );
    }

    if run("flood") {
        flood(&devices, &mut apis);
    }
    drop(apis);
}

/// d1 floods d0 with messages (d0's handler runs each, and d0 records each delivery on disk
/// first) and store writes, while d2 pings d0 every 20 ms: the round trips, before and during.
fn flood(devices: &[Device], apis: &mut [Api]) {
    let ping = |api: &mut Api| {
        api.call("ping", json!({"name": "d0", "timeout_ms": 5000}))["rtt_ms"]
            .as_f64()
            .expect("rtt_ms")
    };
    let mut quiet: Vec<f64> = (0..100)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            ping(&mut apis[2])
        })
        .collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (sent, written, mut flooded) = std::thread::scope(|scope| {
        let messages = scope.spawn(|| {
            let mut api = Api::connect(&devices[1]);
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                api.call(
                    "send",
                    json!({"tag": format!("bench/f{}", sent % 16), "to": ["d0"], "payload_text": "x"}),
                );
                sent += 1;
            }
            sent
        });
        let writes = scope.spawn(|| {
            let mut api = Api::connect(&devices[1]);
            let mut written = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                api.call(
                    "db.set",
                    json!({"key": format!("flood/{}", written % 1000), "value": "v"}),
                );
                written += 1;
            }
            written
        });
        let started = Instant::now();
        let mut rtts = Vec::new();
        while started.elapsed() < FLOOD {
            std::thread::sleep(Duration::from_millis(20));
            rtts.push(ping(&mut apis[2]));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (
            messages.join().expect("sender"),
            writes.join().expect("writer"),
            rtts,
        )
    });
    quiet.sort_by(f64::total_cmp);
    flooded.sort_by(f64::total_cmp);
    let direct = apis[2].call("peer", json!({"name": "d0"}))["status"].clone();
    println!(
        "ping d2 → d0: quiet median {:.2} ms, p99 {:.2} ms; while d1 sent {:.0} messages/s and {:.0} store writes/s to d0: median {:.2} ms, p99 {:.2} ms, max {:.2} ms (n={}); d0 is {direct} from d2 after",
        percentile(&quiet, 0.5),
        percentile(&quiet, 0.99),
        sent as f64 / FLOOD.as_secs_f64(),
        written as f64 / FLOOD.as_secs_f64(),
        percentile(&flooded, 0.5),
        percentile(&flooded, 0.99),
        flooded.last().copied().unwrap_or(0.0),
        flooded.len()
    );
}
