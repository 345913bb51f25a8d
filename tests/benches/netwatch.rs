//! Benchmark of issue 6: after a link comes back, how long until the session is restored — with
//! netwatch telling the mesh service at once, and with backoff alone (the same daemons without
//! netwatch). Two devices on a LAN of network namespaces; the link of one is cut from the bridge
//! for `OUTAGE`, then restored. The keepalive is 2 s + 3 s, so that without netwatch the session
//! dies within the outage too and its return waits for the redial backoff, as it does after a
//! longer outage with the default keepalive.
//!
//! ```text
//! cargo build --release --workspace
//! cargo bench -p cnsprcy-tests --bench netwatch
//! ```

use std::time::{Duration, Instant};

use cnsprcy_tests::bench::{Api, bin_dir, percentile, release_cnspr};
use cnsprcy_tests::netns::Lan;
use cnsprcy_tests::{Device, wait_until};
use serde_json::json;

/// Outages per mode, and their length; `CNSPRCY_BENCH_OUTAGE_SECS` and
/// `CNSPRCY_BENCH_TRIALS` change them (the issue's case is a minute).
const TRIALS: usize = 4;
const OUTAGE: Duration = Duration::from_secs(12);

fn setting(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
const SOON: Duration = Duration::from_secs(90);

fn status_of(api: &mut Api, peer: &str) -> String {
    api.call("peer", json!({ "name": peer }))["status"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

/// Restore times, in seconds, of `TRIALS` outages of device b's link.
fn trials(with_netwatch: bool) -> Vec<f64> {
    let bins = bin_dir();
    let lan = Lan::new(2);
    let devices: Vec<Device> = ["a", "b"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut device = Device::new(name);
            device.write_config(&format!(
                "name = \"{name}\"\n[mesh]\nlisten = [\"0.0.0.0:7332\"]\nkeepalive_interval = \"2s\"\nkeepalive_timeout = \"3s\"\n[discovery]\nenabled = false\n"
            ));
            if with_netwatch {
                device.spawn_in(lan.node(i), "serve", &bins.join("cnspr"), &["serve"]);
                device.wait_ready("serve");
            } else {
                device.spawn_in(lan.node(i), "handlers", &cnsprcy_tests::bin("cnsprcy-handlers"), &[]);
                device.spawn_in(lan.node(i), "mesh", &cnsprcy_tests::bin("cnsprcy-mesh"), &[]);
                device.wait_ready("mesh");
            }
            device
        })
        .collect();
    let keys: Vec<String> = devices.iter().map(|d| d.public_key()).collect();
    let mut apis: Vec<Api> = devices.iter().map(Api::connect).collect();
    for (i, other) in [(0usize, 1usize), (1, 0)] {
        apis[i].call(
            "members.add",
            json!({"name": devices[other].name, "public_key": keys[other],
                   "addresses": [format!("{}:7332", lan.addr(other))]}),
        );
    }
    assert!(wait_until(SOON, || status_of(&mut apis[1], "a") == "direct"));
    let outage = Duration::from_secs(setting("CNSPRCY_BENCH_OUTAGE_SECS", OUTAGE.as_secs()));
    let mut times = Vec::new();
    for _ in 0..setting("CNSPRCY_BENCH_TRIALS", TRIALS as u64) {
        lan.cut(1);
        std::thread::sleep(outage);
        lan.restore(1);
        let restored = Instant::now();
        // Restored: b has a session with a (polled every 10 ms).
        let back = wait_until(SOON, || {
            std::thread::sleep(Duration::from_millis(10));
            status_of(&mut apis[1], "a") == "direct"
        });
        assert!(back, "the session did not come back");
        times.push(restored.elapsed().as_secs_f64());
        // Let both sides settle before the next outage.
        assert!(wait_until(SOON, || status_of(&mut apis[0], "b") == "direct"));
        std::thread::sleep(Duration::from_secs(2));
    }
    times
}

fn main() {
    release_cnspr();
    for (label, with_netwatch) in [("with netwatch", true), ("backoff alone", false)] {
        let mut times = trials(with_netwatch);
        let raw: Vec<String> = times.iter().map(|t| format!("{t:.2}")).collect();
        times.sort_by(f64::total_cmp);
        println!(
            "{label}: link back after {} s → session restored: median {:.2} s (trials: {} s)",
            setting("CNSPRCY_BENCH_OUTAGE_SECS", OUTAGE.as_secs()),
            percentile(&times, 0.5),
            raw.join(", ")
        );
    }
}
