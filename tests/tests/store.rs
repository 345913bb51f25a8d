//! The replicated store with devices as real processes: replication to every member, concurrent
//! writes settling on one winner, a cut-off device catching up after the link returns (with the
//! anti-entropy traffic measured), crash safety of `db set`, and reads with the daemon down.

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
                item["value_base64"].as_str().unwrap_or_default().to_owned(),
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

    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let request =
            json!({"jsonrpc": "2.0", "id": self.next, "method": method, "params": params});
        writeln!(self.writer, "{request}").expect("send request");
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read answer");
        let answer: Value = serde_json::from_str(&line).expect("answer is JSON");
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
