//! The replicated store with devices as real processes: replication to every member, concurrent
//! writes settling on one winner, a cut-off device catching up after the link returns (with the
//! anti-entropy traffic measured), crash safety of `db set`, reads with the daemon down, a
//! damaged store set aside and refilled, writes on a full disk, and listing more than fits in
//! one answer.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cnsprcy_tests::netns::{Lan, NetNs};
use cnsprcy_tests::{Device, wait_until};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const SOON: Duration = Duration::from_secs(20);
const RECOVERY: Duration = Duration::from_secs(45);
const PORT: u16 = 7332;

fn addr(i: usize) -> String {
    format!("127.0.0.1:{}", 17201 + i)
}

fn link(devices: &[Device], address: impl Fn(usize) -> String) {
    let keys: Vec<String> = devices.iter().map(|d| d.public_key()).collect();
    for (i, device) in devices.iter().enumerate() {
        for (j, other) in devices.iter().enumerate() {
            if i != j {
                device
                    .cnspr(&["manage", "add", &other.name, &keys[j], &address(j)])
                    .success();
            }
        }
    }
}

fn wait_all_direct(devices: &mut [Device]) {
    let names: Vec<String> = devices.iter().map(|d| d.name.clone()).collect();
    for device in devices.iter_mut() {
        for name in &names {
            if *name != device.name {
                device.wait_status(name, "direct", SOON);
            }
        }
    }
}

/// Devices in one namespace on 127.0.0.1, all members of each other, all sessions up.
fn mesh(ns: &NetNs, names: &[&str]) -> Vec<Device> {
    let mut devices: Vec<Device> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut device = Device::new(name);
            device.configure(&addr(i));
            device.start_in(ns);
            device
        })
        .collect();
    link(&devices, addr);
    wait_all_direct(&mut devices);
    devices
}

/// `cnspr db get KEY`'s value, or `None` when it exits 1 (not set).
fn get(device: &Device, key: &str) -> Option<String> {
    let run = device.cnspr(&["db", "get", key]);
    match run.status.code() {
        Some(0) => Some(run.stdout),
        Some(1) => None,
        _ => panic!("db get {key} failed: {}", run.stderr),
    }
}

fn list(device: &Device, prefix: &str) -> Vec<Value> {
    let value = device.cnspr_json(&["db", "list", prefix]);
    value.as_array().expect("list is an array").clone()
}

/// `(key, value, writer)` of every key, to compare replicas.
fn contents(device: &Device) -> Vec<(String, String, String)> {
    list(device, "")
        .iter()
        .map(|item| {
            (
                item["key"].as_str().unwrap_or_default().to_owned(),
                // Text in `value`, anything else in `value_base64`.
                format!("{}|{}", item["value"], item["value_base64"]),
                item["writer_id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// One JSON-RPC connection to a device's API, for writing many keys quickly.
struct Api {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next: u64,
}

impl Api {
    fn connect(device: &Device) -> Self {
        let stream = UnixStream::connect(device.socket()).expect("connect to the API");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Self {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            next: 0,
        }
    }

    /// The whole answer to one call.
    fn answer(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let request =
            json!({"jsonrpc": "2.0", "id": self.next, "method": method, "params": params});
        writeln!(self.writer, "{request}").expect("send request");
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read answer");
        serde_json::from_str(&line).expect("answer is JSON")
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        let answer = self.answer(method, params);
        assert!(answer["error"].is_null(), "{method} failed: {answer}");
        answer["result"].clone()
    }
}

#[test]
fn a_write_on_one_device_is_readable_on_all() {
    let ns = NetNs::new();
    let devices = mesh(&ns, &["a", "b", "c"]);

    devices[0]
        .cnspr(&["db", "set", "presence/user", "at the laptop"])
        .success();
    // Durable and readable at once where it was written.
    assert_eq!(
        get(&devices[0], "presence/user").as_deref(),
        Some("at the laptop")
    );
    for device in &devices[1..] {
        assert!(
            wait_until(SOON, || get(device, "presence/user").as_deref()
                == Some("at the laptop")),
            "{} did not get the write:\n{}",
            device.name,
            device.log("serve")
        );
        let item = device.cnspr_json(&["db", "get", "presence/user"]);
        assert_eq!(item["writer"], "a");
        assert!(item["time"].as_str().unwrap().ends_with('Z'), "{item}");
    }

    // A value from standard input, binary, and a list by prefix.
    let mut cmd = devices[1].command(cnsprcy_tests::bin("cnspr"));
    cmd.args(["db", "set", "blob", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&[0, 159, 146, 150])
        .unwrap();
    assert!(child.wait().unwrap().success());
    devices[1]
        .cnspr(&["db", "set", "presence/phone", "pocket"])
        .success();
    assert!(wait_until(SOON, || list(&devices[2], "presence/").len() == 2));
    let out = devices[2]
        .cnspr(&["db", "list", "presence/"])
        .success()
        .stdout;
    assert_eq!(
        out,
        "presence/phone\tpocket\npresence/user\tat the laptop\n"
    );
    assert!(wait_until(SOON, || devices[0]
        .cnspr(&["db", "get", "blob"])
        .status
        .success()));
    let item = devices[0].cnspr_json(&["db", "get", "blob"]);
    assert_eq!(item["value_base64"], "AJ+Slg==");
    assert_eq!(item["writer"], "b");

    // A deletion spreads too.
    devices[2].cnspr(&["db", "del", "presence/user"]).success();
    for device in &devices {
        assert!(wait_until(SOON, || get(device, "presence/user").is_none()));
    }
    devices[0]
        .cnspr(&["db", "get", "presence/user"])
        .code(1)
        .stderr_has("is not set");
    // Deleting it again, or a key never set: refused, nothing written.
    for key in ["presence/user", "never/set"] {
        devices[0]
            .cnspr(&["db", "del", key])
            .code(1)
            .stderr_has("on this device; nothing deleted");
    }
    let stats = devices[0].cnspr_json(&["db", "stats"]);
    assert_eq!(
        (stats["keys"].as_u64(), stats["tombstones"].as_u64()),
        (Some(2), Some(1)),
        "{stats}"
    );
    // A binary value shows as its exact size.
    assert_eq!(
        devices[0].cnspr(&["db", "list", "blob"]).success().stdout,
        "blob\t(4 bytes of binary data; --json shows them in base64)\n"
    );

    // Limits, with clear errors.
    let long = "k".repeat(1025);
    devices[0]
        .cnspr(&["db", "set", &long, "v"])
        .code(1)
        .stderr_has("the limit is 1024 bytes");
}

#[test]
fn concurrent_writes_to_one_key_converge_to_one_winner() {
    let ns = NetNs::new();
    let devices = mesh(&ns, &["a", "b", "c"]);
    for round in 0..3 {
        std::thread::scope(|s| {
            for device in &devices {
                s.spawn(move || {
                    let value = format!("{} {round}", device.name);
                    device.cnspr(&["db", "set", "song", &value]).success();
                });
            }
        });
        let mut last = Vec::new();
        let agreed = wait_until(SOON, || {
            last = devices.iter().map(contents).collect();
            last.windows(2).all(|w| w[0] == w[1])
        });
        assert!(agreed, "replicas differ: {last:#?}");
        let winner = get(&devices[0], "song").unwrap();
        assert!(winner.ends_with(&format!(" {round}")), "{winner}");
    }
}

#[test]
fn a_cut_off_device_catches_up_and_anti_entropy_traffic_is_bounded() {
    let lan = Lan::new(3);
    let mut devices: Vec<Device> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut device = Device::new(name);
            device.configure(&format!("{}:{PORT}", lan.addr(i)));
            device.start_in(lan.node(i));
            device
        })
        .collect();
    link(&devices, |j| format!("{}:{PORT}", lan.addr(j)));
    wait_all_direct(&mut devices);

    // Many equal keys first.
    const SHARED: usize = 2000;
    let value = "v".repeat(200);
    let started = Instant::now();
    let mut api = Api::connect(&devices[0]);
    for i in 0..SHARED {
        api.call(
            "db.set",
            json!({"key": format!("shared/{i:05}"), "value": value}),
        );
    }
    eprintln!(
        "{SHARED} sets through one API connection in {:?}",
        started.elapsed()
    );
    for device in &devices[1..] {
        assert!(
            wait_until(RECOVERY, || list(device, "shared/").len() == SHARED),
            "{} has {} keys",
            device.name,
            list(device, "shared/").len()
        );
    }

    // c is cut off while keys change on both sides, one of them on both.
    lan.cut(2);
    devices[0].wait_status("c", "unreachable", SOON);
    devices[2].wait_status("a", "unreachable", SOON);
    for i in 0..10 {
        devices[0]
            .cnspr(&["db", "set", &format!("shared/{i:05}"), "changed by a"])
            .success();
        devices[2]
            .cnspr(&["db", "set", &format!("c/{i}"), "written by c"])
            .success();
    }
    devices[2].cnspr(&["db", "del", "shared/01000"]).success();
    let before: Vec<Value> = devices
        .iter()
        .map(|d| d.cnspr_json(&["db", "stats"]))
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(list(&devices[0], "c/").len(), 0);

    lan.restore(2);
    for device in &devices {
        device.cnspr(&["reconnect"]).success();
    }
    let mut last = Vec::new();
    let agreed = wait_until(RECOVERY, || {
        last = devices.iter().map(|d| contents(d).len()).collect();
        let all: Vec<_> = devices.iter().map(contents).collect();
        all.windows(2).all(|w| w[0] == w[1])
    });
    assert!(agreed, "replicas did not converge: {last:?} keys");
    assert_eq!(list(&devices[0], "c/").len(), 10);
    assert_eq!(
        get(&devices[2], "shared/00003").as_deref(),
        Some("changed by a")
    );
    assert!(get(&devices[1], "shared/01000").is_none());

    // The bytes all devices sent for anti-entropy since the cut, against the size of the store.
    let after: Vec<Value> = devices
        .iter()
        .map(|d| d.cnspr_json(&["db", "stats"]))
        .collect();
    let sent: u64 = before
        .iter()
        .zip(&after)
        .map(|(b, a)| {
            a["sync_bytes_sent"].as_u64().unwrap() - b["sync_bytes_sent"].as_u64().unwrap()
        })
        .sum();
    let store_bytes = (SHARED * (value.len() + 11)) as u64;
    eprintln!("anti-entropy after the cut: {sent} bytes; the store holds over {store_bytes} bytes");
    assert!(
        sent < 60_000 && sent < store_bytes / 4,
        "anti-entropy sent {sent} bytes for 21 different keys (store: {store_bytes} bytes)"
    );
}

#[test]
fn every_set_that_returned_survives_sigkill() {
    let ns = NetNs::new();
    let mut device = Device::new("a");
    device.configure(&addr(10));
    device.start_in(&ns);

    let pid = device.pid("serve");
    let done = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        let writer = {
            let (done, stop, device) = (done.clone(), stop.clone(), &device);
            s.spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("crash/{i:05}");
                    if device
                        .cnspr(&["db", "set", &key, &format!("value {i}")])
                        .status
                        .success()
                    {
                        done.lock().unwrap().push(key);
                    }
                    i += 1;
                }
            })
        };
        assert!(wait_until(SOON, || done.lock().unwrap().len() >= 30));
        // SIGKILL mid-stream: the writer thread keeps going and sees failures.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL)
            .expect("kill the daemon");
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
    });
    device.wait_exit("serve", SOON).expect("killed");
    let done = done.lock().unwrap().clone();
    eprintln!("{} sets returned success before the kill", done.len());

    // With the daemon down the CLI reads the store itself: every acknowledged key is there.
    let offline: Vec<String> = list(&device, "crash/")
        .iter()
        .map(|i| i["key"].as_str().unwrap().to_owned())
        .collect();
    for key in &done {
        assert!(
            offline.contains(key),
            "{key} was acknowledged but is missing"
        );
    }
    device.start_in(&ns);
    let online: Vec<String> = list(&device, "crash/")
        .iter()
        .map(|i| i["key"].as_str().unwrap().to_owned())
        .collect();
    for key in &done {
        assert!(online.contains(key), "{key} missing after the restart");
    }
}

#[test]
fn reads_work_with_the_daemon_down() {
    let ns = NetNs::new();
    let mut device = Device::new("a");
    device.configure(&addr(11));
    // No store yet, no daemon: nothing is set.
    device
        .cnspr(&["db", "get", "x"])
        .code(1)
        .stderr_has("is not set");
    assert_eq!(device.cnspr(&["db", "list"]).success().stdout, "");

    device.start_in(&ns);
    device.cnspr(&["db", "set", "greeting", "hello"]).success();
    device.cnspr(&["db", "set", "other", "x"]).success();
    device.stop_with("serve", Signal::SIGTERM);

    assert_eq!(
        device.cnspr(&["db", "get", "greeting"]).success().stdout,
        "hello"
    );
    let item = device.cnspr_json(&["db", "get", "greeting"]);
    assert_eq!(item["writer"], "a");
    assert_eq!(
        device.cnspr(&["db", "list"]).success().stdout,
        "greeting\thello\nother\tx\n"
    );
    device
        .cnspr(&["db", "get", "missing"])
        .code(1)
        .stderr_has("is not set");
    // Writes need the daemon (they must reach the other devices).
    device.cnspr(&["db", "set", "k", "v"]).code(3);
    // And the daemon starts again although the CLI just had the store open.
    device.start_in(&ns);
    assert_eq!(device.cnspr(&["db", "get", "other"]).success().stdout, "x");
}

#[test]
fn a_device_that_was_offline_catches_up_when_it_returns() {
    let ns = NetNs::new();
    let mut devices = mesh(&ns, &["a", "b", "c"]);
    devices[0].cnspr(&["db", "set", "before", "1"]).success();
    assert!(wait_until(Duration::from_secs(20), || get(
        &devices[2],
        "before"
    )
    .as_deref()
        == Some("1")));

    // c is switched off while the others write, overwrite and delete.
    devices[2].stop_with("serve", Signal::SIGTERM);
    for k in 0..20 {
        devices[k % 2]
            .cnspr(&["db", "set", &format!("while-away/{k}"), &format!("v{k}")])
            .success();
    }
    devices[1].cnspr(&["db", "set", "before", "2"]).success();
    devices[0].cnspr(&["db", "del", "while-away/0"]).success();
    std::thread::sleep(Duration::from_secs(2));

    devices[2].start_in(&ns);
    let converged = wait_until(Duration::from_secs(30), || {
        contents(&devices[2]) == contents(&devices[0])
    });
    assert!(
        converged,
        "c: {:?}\na: {:?}",
        contents(&devices[2]),
        contents(&devices[0])
    );
    assert_eq!(get(&devices[2], "before").as_deref(), Some("2"));
    assert_eq!(get(&devices[2], "while-away/0"), None);
    assert_eq!(get(&devices[2], "while-away/19").as_deref(), Some("v19"));
}

/// Cuts `device`'s `store/db` to half its length, as a crash of the disk might.
fn truncate_store(device: &Device) {
    let db = device.state_dir().join("store/db");
    let len = std::fs::metadata(&db).expect("store/db").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
}

#[test]
fn a_damaged_store_is_set_aside_and_refilled_from_another_device() {
    let ns = NetNs::new();
    let mut devices = mesh(&ns, &["a", "b"]);
    // Enough keys, each write flushed, for sled to panic on the damaged file (as the report
    // found: `index out of bounds`).
    const KEYS: usize = 3000;
    let mut api = Api::connect(&devices[0]);
    for i in 0..KEYS {
        api.call(
            "db.set",
            json!({"key": format!("k/{i:05}"), "value": "v".repeat(200)}),
        );
    }
    drop(api);
    assert!(
        wait_until(RECOVERY, || list(&devices[1], "k/").len() == KEYS),
        "b did not get the keys"
    );
    devices[0].stop_with("serve", Signal::SIGTERM);
    // An offline read opens the store once more (sled writes a snapshot), then the damage.
    assert_eq!(list(&devices[0], "k/").len(), KEYS);
    truncate_store(&devices[0]);

    // Offline reads: a clear error, no panic, nothing moved.
    for args in [&["db", "get", "k/00001"][..], &["db", "list"]] {
        devices[0]
            .cnspr(args)
            .code(1)
            .stderr_has("is damaged")
            .stderr_has("refills the store from your other devices");
    }
    let run = devices[0].cnspr(&["db", "list"]);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert!(devices[0].state_dir().join("store/db").exists());

    // The daemon comes up, says so, and refills from b.
    devices[0].start_in(&ns);
    let status = devices[0].cnspr_json(&["status"]);
    let aside = &status["store"]["set_aside"];
    let path = std::path::PathBuf::from(aside["path"].as_str().expect("set aside"));
    assert!(path.join("db").exists(), "{status}");
    assert_eq!(status["store"]["state"], "ok", "{status}");
    let log = devices[0].log("serve");
    assert!(
        log.contains("was damaged") && log.contains(&path.display().to_string()),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    devices[0]
        .cnspr(&["status"])
        .success()
        .stdout_has("a damaged store was moved to")
        .stdout_has("refills from the other devices");
    devices[1].wait_status("a", "direct", SOON);
    assert!(
        wait_until(RECOVERY, || list(&devices[0], "k/").len() == KEYS),
        "a has {} keys after the refill",
        list(&devices[0], "k/").len()
    );
    let mode = |p: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().mode() & 0o777
    };
    assert_eq!(mode(&devices[0].state_dir().join("store")), 0o700);
    assert_eq!(mode(&devices[0].state_dir().join("store/db")), 0o600);
}

/// `db set` on a full disk: an error, and no trace (not readable, not spread); `status` says
/// the store is degraded and what to do; once space returns the store works again without a
/// restart. The device's store is a small tmpfs in a mount namespace of the daemon's own.
#[test]
fn a_write_on_a_full_disk_fails_without_a_trace_and_the_store_recovers() {
    let ns = NetNs::new();
    let mut a = Device::new("a");
    a.configure(&addr(20));
    let store = a.state_dir().join("store");
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&store)
            .unwrap();
    }
    let cnspr = cnsprcy_tests::bin("cnspr");
    a.spawn_in(
        &ns,
        "serve",
        std::path::Path::new("unshare"),
        &[
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            r#"mount -t tmpfs -o size=8m,mode=0700 tmpfs "$0" && exec "$1" serve"#,
            store.to_str().unwrap(),
            cnspr.to_str().unwrap(),
        ],
    );
    a.wait_ready("serve");
    let pid = a.pid("serve").to_string();
    // Runs a shell command in the daemon's mount namespace (where the tmpfs is).
    let in_mounts = |script: &str| {
        let status = std::process::Command::new("nsenter")
            .args(["--target", &pid, "--mount", "--", "sh", "-c", script])
            .arg(&store)
            .status()
            .expect("nsenter");
        assert!(status.success(), "{script}");
    };
    let mut b = Device::new("b");
    b.configure(&addr(21));
    b.start_in(&ns);
    let mut devices = vec![a, b];
    link(&devices, |j| addr(20 + j));
    wait_all_direct(&mut devices);
    let [a, b] = &devices[..] else { unreachable!() };

    a.cnspr(&["db", "set", "before", "1"]).success();
    assert!(wait_until(SOON, || get(b, "before").is_some()));
    in_mounts(r#"cat /dev/zero > "$0/filler" 2>/dev/null; true"#);
    let mut api = Api::connect(a);
    let value = "x".repeat(100_000);
    let error = (0..100).find_map(|i| {
        let key = format!("full/{i}");
        let answer = api.answer("db.set", json!({"key": key, "value": value}));
        (!answer["error"].is_null()).then(|| (key, answer["error"].clone()))
    });
    let (failed, error) = error.expect("a write failed on the full disk");
    assert_eq!(error["code"], -32007, "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("No space left") && message.contains("nothing was changed"),
        "{message}"
    );
    // No trace here, none on b. (Reads may fail while sled's instance holds its error; a read
    // that works shows the old state.)
    assert_eq!(get(a, &failed), None);
    let listed = a.cnspr(&["db", "list", "--json"]);
    if listed.status.success() {
        let items: Value = serde_json::from_str(&listed.stdout).unwrap();
        assert!(
            items
                .as_array()
                .unwrap()
                .iter()
                .all(|i| i["key"] != failed.as_str())
        );
    }
    let status = a.cnspr_json(&["status"]);
    assert_eq!(status["store"]["state"], "degraded", "{status}");
    assert!(
        status["store"]["problem"]
            .as_str()
            .unwrap()
            .contains("free some space"),
        "{status}"
    );
    a.cnspr(&["status"])
        .success()
        .stdout_has("store       DEGRADED since");
    // Later writes fail clearly too; a read shows the old value or fails.
    a.cnspr(&["db", "set", "small", "v"])
        .code(1)
        .stderr_has("No space left");
    assert!(matches!(get(a, "before").as_deref(), Some("1") | None));
    // A new session makes b and a compare their stores: the failed key does not spread.
    devices[1].stop_with("serve", Signal::SIGTERM);
    devices[1].start_in(&ns);
    devices[1].wait_status("a", "direct", SOON);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(get(&devices[1], &failed), None);

    // Space returns: the store recovers by itself, no restart.
    in_mounts(r#"rm "$0/filler""#);
    let a = &devices[0];
    assert!(
        wait_until(RECOVERY, || a.cnspr_json(&["status"])["store"]["state"]
            == "ok"),
        "still degraded: {}",
        a.cnspr_json(&["status"])["store"]
    );
    a.cnspr(&["db", "set", "after", "2"]).success();
    assert!(wait_until(SOON, || get(&devices[1], "after").as_deref() == Some("2")));
    assert_eq!(get(a, &failed), None);
}

/// Runs `cnspr ARGS` and returns its stdout and its peak resident memory in KiB. The peak is
/// read from `/proc` while it runs (`VmHWM` counts from its exec; `wait4`'s `ru_maxrss` would
/// include this test process's memory, inherited through the fork).
fn cnspr_big_output(device: &Device, args: &[&str]) -> (Vec<u8>, u64) {
    let mut child = device
        .command(cnsprcy_tests::bin("cnspr"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status_file = format!("/proc/{}/status", child.id());
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        // Until the process is gone (a zombie has no memory lines).
        while let Some(kib) = std::fs::read_to_string(&status_file).ok().and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        }) {
            peak = peak.max(kib);
            std::thread::sleep(Duration::from_millis(5));
        }
        peak
    });
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    let peak = sampler.join().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "cnspr {args:?}: {status}\n{err}");
    (out, peak)
}

/// More than fits in one answer of the API (24 MiB): 11 values of 1 MiB, and 50 000 small
/// keys. `db list` pages, and prints as it goes, in text and JSON, with the daemon and without.
#[test]
fn listing_more_than_one_answer_holds() {
    let ns = NetNs::new();
    let mut device = Device::new("a");
    device.configure(&addr(22));
    const SMALL: usize = 50_000;
    // The small keys go straight into the store (50 000 flushed writes through the API would
    // take minutes); the big ones through the CLI.
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(device.state_dir())
            .unwrap();
        let own = [9; 32];
        let store = cnsprcy_mesh::store::Store::open(&device.state_dir(), own).unwrap();
        let entries: Vec<_> = (0..SMALL)
            .map(|i| cnsprcy::wire::StoreEntry {
                key: format!("small/{i:06}"),
                ts: cnsprcy::wire::StoreTimestamp {
                    ms: 1_700_000_000_000,
                    counter: 0,
                },
                writer: own,
                value: Some(vec![b's'; 200]),
            })
            .collect();
        for chunk in entries.chunks(5000) {
            assert_eq!(
                store
                    .apply_remote(chunk.to_vec(), "test", cnsprcy_mesh::store::merge::now_ms())
                    .len(),
                chunk.len()
            );
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    device.start_in(&ns);
    for i in 0..11u8 {
        let mut cmd = device.command(cnsprcy_tests::bin("cnspr"));
        cmd.args(["db", "set", &format!("big/{i:02}"), "-"])
            .stdin(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        // Binary for some (base64 in JSON), text for the others.
        let byte = if i % 2 == 0 { b'a' + i } else { 0xff };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&vec![byte; 1024 * 1024])
            .unwrap();
        assert!(child.wait().unwrap().success());
    }
    let total = SMALL + 11;
    for running in [true, false] {
        if !running {
            device.stop_with("serve", Signal::SIGTERM);
        }
        let (text, peak) = cnspr_big_output(&device, &["db", "list"]);
        let lines: Vec<&[u8]> = text
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(lines.len(), total);
        assert!(lines[0].starts_with(b"big/00\t"));
        assert!(
            String::from_utf8_lossy(lines[1]).starts_with("big/01\t(1048576 bytes of binary data")
        );
        eprintln!(
            "db list (daemon running: {running}): {} bytes, peak memory {peak} KiB",
            text.len()
        );
        let (json, peak_json) = cnspr_big_output(&device, &["db", "list", "--json"]);
        let items: Vec<Value> = serde_json::from_slice(&json).expect("one JSON array");
        assert_eq!(items.len(), total);
        assert_eq!(items[1]["value_base64"].as_str().unwrap().len(), 1398104);
        assert_eq!(items[total - 1]["key"], format!("small/{:06}", SMALL - 1));
        eprintln!(
            "db list --json: {} bytes, peak memory {peak_json} KiB",
            json.len()
        );
        // A page at a time, not the whole listing (about 30 MiB through the daemon; sled's
        // own memory when reading the store itself, which grows with the store).
        for peak in [peak, peak_json] {
            assert!(peak > 0 && peak < 96 * 1024, "peak memory {peak} KiB");
        }
    }
}
