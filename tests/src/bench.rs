//! What the benchmarks in `tests/benches/` share: a plain JSON-RPC client for a device's socket,
//! a subscription to its events, the release binaries' directory, percentiles, and the bytes a
//! daemon sent on its sessions.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::Device;
use crate::netns::NetNs;

/// One JSON-RPC connection to a device; every call must succeed.
pub struct Api {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    next: u64,
}

impl Api {
    pub fn connect(device: &Device) -> Self {
        Self::connect_path(&device.socket())
    }

    pub fn connect_path(socket: &Path) -> Self {
        let stream = UnixStream::connect(socket).expect("connect to the API");
        Self {
            reader: BufReader::new(stream.try_clone().expect("clone")),
            stream,
            next: 0,
        }
    }

    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let request =
            json!({"jsonrpc": "2.0", "id": self.next, "method": method, "params": params});
        writeln!(self.stream, "{request}").expect("write request");
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read answer");
        let answer: Value = serde_json::from_str(&line).expect("JSON answer");
        assert!(answer["error"].is_null(), "{method} failed: {answer}");
        answer["result"].clone()
    }
}

/// The first lines of the benches' handlers (both products' in `vs_serf`): the time, taken first thing, without starting
/// another process (bash's `EPOCHREALTIME`, microseconds, its decimal point dropped whatever
/// the locale), in nanoseconds. Until 2026-12-08 it was `t=$(date +%s%N)` in `sh`, then
/// `cat` read the input: three processes a run, about 2.4 ms of CPU here, against about 0.9 ms
/// now. At 40 devices on two cores those runs' CPU time was a third of what was measured, and
/// the stamp came a `fork` and `exec` after the handler's start.
pub const HANDLER_STAMP: &str = "#!/bin/bash\nt=${EPOCHREALTIME//[!0-9]/}000\n";

/// Reads the rest of the handler's input without another process.
pub const HANDLER_DRAIN: &str = "while read -r _; do :; done\n";

/// Wall-clock nanoseconds, the clock of the handler scripts' `date +%s%N`.
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Follows the events of the device whose API socket is `socket` on a thread of its own, until
/// the device stops: `on_event` gets each event (`params` of the notification) and when it was
/// read, in nanoseconds since the epoch.
pub fn follow_events(socket: &Path, mut on_event: impl FnMut(u128, &Value) + Send + 'static) {
    let mut stream = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
    writeln!(
        stream,
        "{}",
        json!({"jsonrpc": "2.0", "id": 1, "method": "subscribe"})
    )
    .expect("subscribe");
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    reader.read_line(&mut first).expect("subscribe answer");
    assert!(first.contains("\"subscribed\":true"), "subscribe: {first}");
    std::thread::spawn(move || {
        for line in reader.lines() {
            let Ok(line) = line else { break };
            let at_ns = now_ns();
            if let Ok(message) = serde_json::from_str::<Value>(&line) {
                on_event(at_ns, &message["params"]);
            }
        }
    });
}

/// The `cnspr` the benchmarks run, after checking what every benchmark needs: root (for network
/// namespaces) and a release build.
pub fn release_cnspr() -> PathBuf {
    assert!(crate::is_root(), "needs root: it makes network namespaces");
    // Another build's `cnspr` (an older version, to compare with), if named.
    let cnspr = std::env::var_os("CNSPRCY_BENCH_CNSPR")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir().join("cnspr"));
    assert!(
        cnspr.exists(),
        "build first: cargo build --release --workspace"
    );
    cnspr
}

/// The directory of the binaries built with the benchmark's profile (`target/release`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("bench path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_owned()
}

/// The `p` quantile (0..=1) of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Bytes sent on the TCP sockets of process `pid` in `ns` (`ss -tinp`'s bytes_sent).
pub fn bytes_sent(ns: &NetNs, pid: u32) -> u64 {
    let out = ns.run(&["ss", "-Htinp", "state", "established"]);
    let mut total = 0;
    let mut mine = false;
    for line in out.lines() {
        if line.contains("users:(") {
            mine = line.contains(&format!("pid={pid},"));
        } else if mine && let Some(rest) = line.split("bytes_sent:").nth(1) {
            total += rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}
