//! Tagged messages between devices as real processes, with real handler scripts: broadcast
//! through a relay, each handler once, replies with --wait, store and forward with TTL, the
//! payload limit, and `cnspr watch`.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cnsprcy_tests::netns::NetNs;
use cnsprcy_tests::{Device, bin, lines, wait_until};
use nix::sys::signal::Signal;
use serde_json::Value;

const SOON: Duration = Duration::from_secs(20);

fn addr(i: usize) -> String {
    format!("127.0.0.1:{}", 17101 + i)
}

/// Writes an executable handler script for `tag` (as `tag.sh`) in the device's handler directory.
fn handler(device: &Device, tag: &str, script: &str) {
    let path = device
        .root()
        .join("config/cnsprcy/handlers")
        .join(format!("{tag}.sh"));
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A handler for `note` that appends one line per run to `log` (outside every device).
fn note_handler(device: &Device, log: &Path) {
    handler(
        device,
        "note",
        &format!(
            "printf '%s %s %s %s\\n' \"$CNSPRCY_DEVICE\" \"$CNSPRCY_FROM\" \"$CNSPRCY_EVENT\" \"$(cat)\" >> {}",
            log.display()
        ),
    );
}

/// Devices started on 127.0.0.1:17101... in `ns`, all members of each other, every one with the
/// others' addresses except where `no_path` says the pair cannot dial each other.
fn devices(ns: &NetNs, names: &[&str]) -> Vec<Device> {
    let devices: Vec<Device> = names
        .iter()
        .enumerate()
        .map(|(i, name)| Device::started_in(ns, name, &addr(i)))
        .collect();
    devices
}

fn link_all(devices: &[Device], no_path: &[(usize, usize)]) {
    for (i, device) in devices.iter().enumerate() {
        for (j, other) in devices.iter().enumerate() {
            if i == j {
                continue;
            }
            let blocked = no_path.contains(&(i, j)) || no_path.contains(&(j, i));
            device.add_member(other, (!blocked).then(|| addr(j)).as_deref());
        }
    }
}

/// Devices a and b, members of each other, once a sees b direct.
fn linked_pair(ns: &NetNs) -> Vec<Device> {
    let mut devices = devices(ns, &["a", "b"]);
    link_all(&devices, &[]);
    devices[0].wait_status("b", "direct", SOON);
    devices
}

fn shared_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn a_broadcast_reaches_everyone_once_including_a_relayed_only_device() {
    let ns = NetNs::new();
    let mut devices = devices(&ns, &["a", "b", "c", "d"]);
    // d can only be reached through c (nobody else knows where d listens, nor d where they do).
    link_all(&devices, &[(0, 3), (1, 3)]);
    devices[0].wait_status("d", "relayed", SOON);
    devices[0].wait_status("c", "direct", SOON);
    let out = shared_dir();
    let log = out.path().join("notes");
    for device in &devices[1..] {
        note_handler(device, &log);
    }

    let sent = devices[0].cnspr_json(&["send", "note", "hello"]);
    assert_eq!(sent["recipients"].as_array().unwrap().len(), 3);
    assert!(
        wait_until(SOON, || lines(&log).len() == 3),
        "{:?}",
        lines(&log)
    );
    std::thread::sleep(Duration::from_secs(2));
    let mut got = lines(&log);
    got.sort();
    assert_eq!(
        got,
        [
            "b a message hello",
            "c a message hello",
            "d a message hello"
        ]
    );
}

#[test]
fn wait_collects_every_reply_and_the_exit_status_says_if_all_succeeded() {
    let ns = NetNs::new();
    let devices = devices(&ns, &["a", "b", "c", "d"]);
    link_all(&devices, &[]);
    let [mut a0, b, c, d]: [Device; 4] = devices.try_into().ok().unwrap();
    for peer in ["b", "c", "d"] {
        a0.wait_status(peer, "direct", SOON);
    }
    handler(
        &b,
        "echo",
        "printf 'hi %s from %s' \"$(cat)\" \"$CNSPRCY_DEVICE\"",
    );
    handler(&c, "echo", "echo 'something broke' >&2; exit 3");
    // d has no handler for echo.

    let run = a0.cnspr(&[
        "send",
        "--wait",
        "--timeout",
        "10s",
        "echo",
        "there",
        "--json",
    ]);
    assert_eq!(run.status.code(), Some(1), "not every handler succeeded");
    let result = run.json();
    let replies: Vec<&Value> = result["replies"].as_array().unwrap().iter().collect();
    let by_name = |name: &str| {
        replies
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no reply from {name}: {result}"))
    };
    assert_eq!(by_name("b")["status"], "ok");
    assert_eq!(by_name("b")["exit_code"], 0);
    assert_eq!(by_name("b")["stdout"], "hi there from b");
    assert_eq!(by_name("c")["status"], "failed");
    assert_eq!(by_name("c")["exit_code"], 3);
    assert_eq!(by_name("d")["status"], "no_handler");
    assert!(
        by_name("d")["error"]
            .as_str()
            .unwrap()
            .contains("no handler for")
    );
    // Only b: everything succeeds; the human output shows the reply.
    let run = a0
        .cnspr(&["send", "--wait", "--to", "b", "echo", "you"])
        .success();
    assert!(run.stdout.contains("b: ok (exit 0"), "{}", run.stdout);
    assert!(run.stdout.contains("hi you from b"), "{}", run.stdout);
    // c's handler's stderr went to c's log.
    assert!(
        c.log("serve").contains("something broke"),
        "{}",
        c.log("serve")
    );
    let _ = d;
}

#[test]
fn a_message_for_a_device_that_is_down_arrives_when_it_returns_but_not_after_its_ttl() {
    let ns = NetNs::new();
    let mut devices = linked_pair(&ns);
    let out = shared_dir();
    let log = out.path().join("notes");
    note_handler(&devices[1], &log);

    devices[1].stop_with("serve", Signal::SIGTERM);
    devices[0].wait_status("b", "unreachable", SOON);
    let sent = devices[0].cnspr_json(&["send", "--to", "b", "note", "kept"]);
    assert_eq!(sent["queued"][0], "b");
    devices[0]
        .cnspr(&["send", "--to", "b", "--ttl", "1s", "note", "expired"])
        .success();
    // The sender restarts too: the queued message is on disk.
    devices[0].stop_with("serve", Signal::SIGTERM);
    std::thread::sleep(Duration::from_secs(2));
    devices[0].start_in(&ns);
    devices[1].start_in(&ns);
    assert!(wait_until(SOON, || !lines(&log).is_empty()));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(lines(&log), ["b a message kept"]);
}

#[test]
fn a_payload_at_the_limit_arrives_intact_and_one_over_is_refused() {
    let ns = NetNs::new();
    let devices = devices(&ns, &["a", "b"]);
    link_all(&devices, &[]);
    let mut devices = devices;
    devices[0].wait_status("b", "direct", SOON);
    handler(&devices[1], "sum", "sha256sum | cut -d' ' -f1");

    let dir = shared_dir();
    let file = dir.path().join("payload");
    let payload: Vec<u8> = (0..16 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(&file, &payload).unwrap();
    let expected = String::from_utf8(
        std::process::Command::new("sha256sum")
            .arg(&file)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .split_whitespace()
    .next()
    .unwrap()
    .to_owned();
    let send = |path: &PathBuf| {
        devices[0]
            .command(bin("cnspr"))
            .args([
                "send",
                "--to",
                "b",
                "--wait",
                "--timeout",
                "60s",
                "--json",
                "sum",
                "-",
            ])
            .stdin(fs::File::open(path).unwrap())
            .output()
            .unwrap()
    };
    let output = send(&file);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        result["replies"][0]["stdout"].as_str().unwrap().trim(),
        expected
    );

    let mut bigger = payload;
    bigger.push(0);
    fs::write(&file, &bigger).unwrap();
    let output = send(&file);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("larger than the limit"));
}

#[test]
fn watch_streams_messages_and_peer_changes() {
    let ns = NetNs::new();
    let mut devices = devices(&ns, &["a", "b"]);
    let mut watch = devices[1]
        .command(bin("cnspr"))
        .args(["watch", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    link_all(&devices, &[]);
    devices[0].wait_status("b", "direct", SOON);
    handler(&devices[1], "hello", "cat > /dev/null");
    devices[0].cnspr(&["send", "hello", "x"]).success();
    let mut seen = Vec::new();
    let found = wait_until(SOON, || {
        while let Ok(line) = rx.try_recv() {
            seen.push(serde_json::from_str::<Value>(&line).unwrap());
        }
        seen.iter()
            .any(|e| e["event"] == "message" && e["tag"] == "hello")
            && seen
                .iter()
                .any(|e| e["event"] == "peer" && e["name"] == "a" && e["status"] == "direct")
    });
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(found, "{seen:?}");
    let message = seen.iter().find(|e| e["event"] == "message").unwrap();
    assert_eq!(message["from"], "a");
    assert_eq!(message["status"], "ok");
}

/// The resident memory of process `pid`, in MiB.
fn rss_mib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap()
        / 1024
}

#[test]
fn replies_of_the_largest_size_from_several_devices_reach_the_cli() {
    let ns = NetNs::new();
    let devices = devices(&ns, &["a", "b", "c"]);
    link_all(&devices, &[]);
    let [mut a, b, c]: [Device; 3] = devices.try_into().ok().unwrap();
    a.wait_status("b", "direct", SOON);
    a.wait_status("c", "direct", SOON);
    // 16 MiB each (the reply limit): binary from b, text with NUL-free escapes from c.
    handler(&b, "big", "head -c 16777216 /dev/urandom");
    handler(&c, "big", "yes 'a line of \"text\"' | head -c 16777216");
    let run = a.cnspr(&["send", "--wait", "--timeout", "60s", "--json", "big"]);
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    let result = run.json();
    let replies = result["replies"].as_array().unwrap();
    assert_eq!(replies.len(), 2, "{}", run.stderr);
    for reply in replies {
        let bytes = match (reply["stdout"].as_str(), reply["stdout_base64"].as_str()) {
            (Some(text), None) => text.len(),
            (None, Some(b64)) => {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap()
                    .len()
            }
            other => panic!("{} sent {other:?}", reply["name"]),
        };
        assert_eq!(bytes, 16 << 20, "from {}", reply["name"]);
        let binary = reply["name"] == "b";
        assert_eq!(reply["stdout_base64"].is_string(), binary);
    }
    // As text, each reply as it comes: binary as its size, text as it is.
    let run = a
        .cnspr(&["send", "--wait", "--timeout", "60s", "big"])
        .success();
    assert!(
        run.stdout.contains("(16777216 bytes of binary output"),
        "{}",
        &run.stdout[..200.min(run.stdout.len())]
    );
    assert!(run.stdout.len() > 16 << 20);
}

#[test]
fn a_full_outbox_refuses_with_the_reason_and_drains_at_link_speed_when_the_target_returns() {
    let ns = NetNs::new();
    let mut devices = linked_pair(&ns);
    let out = shared_dir();
    let log = out.path().join("runs");
    // One line per run: when it started (s since the epoch) and the payload's size.
    handler(
        &devices[1],
        "file",
        &format!(
            "t=$(date +%s.%N); echo \"$t $(wc -c)\" >> {}",
            log.display()
        ),
    );
    devices[1].stop_with("serve", Signal::SIGTERM);
    devices[0].wait_status("b", "unreachable", SOON);

    let file = out.path().join("payload");
    fs::write(&file, vec![b'x'; 16 << 20]).unwrap();
    let send = |device: &Device| {
        device
            .command(bin("cnspr"))
            .args(["send", "--to", "b", "file", "-"])
            .stdin(fs::File::open(&file).unwrap())
            .output()
            .unwrap()
    };
    // 256 MiB is the bound: 16 messages of 16 MiB fit, the 17th is refused.
    for i in 0..16 {
        let output = send(&devices[0]);
        assert!(
            output.status.success(),
            "message {i}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let output = send(&devices[0]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("the outbox is full"), "{stderr}");
    assert!(stderr.contains("b (16)"), "{stderr}");
    let pid = devices[0].pid("serve");
    assert!(rss_mib(pid) < 600, "{} MiB resident", rss_mib(pid));

    // Back: the messages go one after another (they run in order, one at a time), not one
    // per resend interval (30 s): no gap of 20 s between two runs. (A debug build takes about
    // a second per 16 MiB message, more on a loaded machine.)
    devices[1].start_in(&ns);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let all = wait_until(Duration::from_secs(300), || lines(&log).len() == 16);
    let runs: Vec<(f64, String)> = (lines(&log).iter())
        .map(|l| {
            let (time, size) = l.split_once(' ').unwrap();
            (time.parse().unwrap(), size.trim().to_owned())
        })
        .collect();
    assert!(
        all,
        "{} of 16 ran: {runs:?}\n{}",
        runs.len(),
        devices[0].log("serve")
    );
    assert!(runs.iter().all(|(_, size)| size == "16777216"), "{runs:?}");
    let mut before = started;
    for (time, _) in &runs {
        assert!(
            time - before < 20.0,
            "a gap of {:.1} s: {runs:?}",
            time - before
        );
        before = *time;
    }
    // The outbox is empty again: a send goes.
    assert!(wait_until(SOON, || send(&devices[0]).status.success()));
}

/// Messages queued for a device that is down run there in the order they were sent, one at a
/// time, without the one that expired meanwhile; `cnspr messages` shows the outbox and what
/// became of each message.
#[test]
fn queued_messages_run_in_send_order_and_their_outcomes_are_listed() {
    let ns = NetNs::new();
    let mut devices = linked_pair(&ns);
    let out = shared_dir();
    let log = out.path().join("order");
    // Slow, so that two runs at once would interleave their lines.
    handler(
        &devices[1],
        "note",
        &format!(
            "p=$(cat); printf '%s start\\n' \"$p\" >> {0}; sleep 0.3; printf '%s end\\n' \"$p\" >> {0}",
            log.display()
        ),
    );
    devices[1].stop_with("serve", Signal::SIGTERM);
    devices[0].wait_status("b", "unreachable", SOON);
    let mut ids = Vec::new();
    for (payload, ttl) in [("1", "1h"), ("2", "1s"), ("3", "1h"), ("4", "1h")] {
        let sent = devices[0].cnspr_json(&["send", "--to", "b", "--ttl", ttl, "note", payload]);
        assert_eq!(sent["queued"][0], "b", "{sent}");
        ids.push(sent["id"].as_str().unwrap().to_owned());
    }
    // The second expires while b is down; the others wait in the outbox.
    assert!(wait_until(SOON, || {
        let info = devices[0].cnspr_json(&["messages"]);
        info["recent"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["event"] == "expired" && o["id"] == ids[1].as_str() && o["missed"][0] == "b")
    }));
    let info = devices[0].cnspr_json(&["messages"]);
    let waiting: Vec<&str> = info["outbox"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(waiting, [&ids[0], &ids[2], &ids[3]], "{info}");
    assert_eq!(info["outbox"][0]["waiting_for"][0], "b", "{info}");
    devices[1].start_in(&ns);
    assert!(wait_until(SOON, || lines(&log).len() >= 6));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        lines(&log),
        ["1 start", "1 end", "3 start", "3 end", "4 start", "4 end"]
    );
    // Each one's delivery and its handler's outcome came back to the sender.
    assert!(wait_until(SOON, || {
        let info = devices[0].cnspr_json(&["messages"]);
        let recent = info["recent"].as_array().unwrap().clone();
        info["outbox"].as_array().unwrap().is_empty()
            && [&ids[0], &ids[2], &ids[3]].iter().all(|id| {
                recent.iter().any(|o| {
                    o["event"] == "handled"
                        && o["id"] == id.as_str()
                        && o["by"] == "b"
                        && o["status"] == "ok"
                })
            })
    }));
    devices[0]
        .cnspr(&["messages"])
        .success()
        .stdout_has("outbox: empty")
        .stdout_has(&format!("handled note {} on b: ok (exit 0)", ids[3]))
        .stdout_has(&format!("expired note {} before reaching b", ids[1]));
}

/// A device can send to itself: by its own name, or with --all --include-self.
#[test]
fn a_device_runs_its_own_handler_for_a_message_to_itself() {
    let ns = NetNs::new();
    let devices = linked_pair(&ns);
    let out = shared_dir();
    let log = out.path().join("notes");
    note_handler(&devices[0], &log);
    note_handler(&devices[1], &log);
    devices[0]
        .cnspr(&["send", "--to", "a", "--wait", "note", "self"])
        .success()
        .stdout_has("a: ok");
    assert_eq!(lines(&log), ["a a message self"]);
    let result = devices[0].cnspr_json(&["send", "--include-self", "--wait", "note", "both"]);
    let mut names: Vec<&str> = result["replies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b"], "{result}");
    let mut notes = lines(&log);
    notes.sort();
    assert_eq!(
        notes,
        ["a a message both", "a a message self", "b a message both"]
    );
    devices[0]
        .cnspr(&["send", "--to", "b", "--include-self", "note", "x"])
        .code(2)
        .stderr_has("cannot be used with");
}

/// `cnspr serve` killed (SIGKILL) while one handler runs and a delivered message waits for a
/// free handler slot: at the next start the waiting one runs, once; the one that had started
/// is not run again, and it still reads its whole payload although nobody feeds it any more.
/// The same for a waiting message when `serve` is stopped in order.
#[test]
fn a_kill_loses_no_delivered_run_and_cuts_no_payload_short() {
    let ns = NetNs::new();
    let a = Device::started_in(&ns, "a", &addr(0));
    let mut b = Device::new("b");
    b.configure(&addr(1));
    let config = fs::read_to_string(b.config_file()).unwrap();
    b.write_config(&format!("{config}[handlers]\nmax_running = 1\n"));
    b.start_in(&ns);
    let mut devices = vec![a, b];
    link_all(&devices, &[]);
    devices[0].wait_status("b", "direct", SOON);
    let out = shared_dir();
    let (started, runs) = (out.path().join("started"), out.path().join("runs"));
    // Reads its payload only after a while: by then the service is gone.
    handler(
        &devices[1],
        "big",
        &format!(
            "echo $$ > {started}; sleep 2; printf 'big %s\\n' \"$(wc -c | tr -d ' ')\" >> {runs}",
            started = started.display(),
            runs = runs.display()
        ),
    );
    handler(
        &devices[1],
        "note",
        &format!("printf 'note %s\\n' \"$(cat)\" >> {}", runs.display()),
    );

    let payload = out.path().join("payload");
    fs::write(&payload, vec![b'x'; 200_000]).unwrap();
    let sent = devices[0]
        .command(bin("cnspr"))
        .args(["send", "--to", "b", "big", "-"])
        .stdin(fs::File::open(&payload).unwrap())
        .output()
        .unwrap();
    assert!(sent.status.success(), "{sent:?}");
    assert!(wait_until(SOON, || fs::read_to_string(&started)
        .is_ok_and(|t| t.ends_with('\n'))));
    // The only handler slot is taken: this one is delivered and waits.
    devices[0]
        .cnspr(&["send", "--to", "b", "note", "waited"])
        .success();
    assert!(wait_until(SOON, || {
        let info = devices[0].cnspr_json(&["messages"]);
        info["outbox"].as_array().unwrap().is_empty()
    }));
    std::thread::sleep(Duration::from_millis(300));
    assert!(lines(&runs).is_empty(), "{:?}", lines(&runs));
    // b says what it is handling.
    let info = devices[1].cnspr_json(&["messages"]);
    let handling: Vec<(&str, &str)> = info["handling"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["tag"].as_str().unwrap(), m["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        handling,
        [("big", "running"), ("note", "handed over")],
        "{info}"
    );
    devices[1]
        .cnspr(&["messages"])
        .success()
        .stdout_has("note from a (6 bytes): waiting for its turn in the handler service");
    devices[1].stop_with("serve", Signal::SIGKILL);

    let before = devices[1].log("serve");
    devices[1].spawn_in(&ns, "again", &bin("cnspr"), &["serve"]);
    devices[1].wait_ready("again");
    let logs = |b: &Device| format!("{before}\n----- after the kill -----\n{}", b.log("again"));
    wait_until(SOON, || lines(&runs).len() >= 2);
    std::thread::sleep(Duration::from_secs(3));
    let mut got = lines(&runs);
    got.sort();
    assert_eq!(got, ["big 200000", "note waited"], "{}", logs(&devices[1]));

    // Stopped in order (SIGTERM) while a delivered message waits for the slot: it runs after
    // the next start too.
    handler(&devices[1], "hold", "sleep 30");
    devices[0].cnspr(&["send", "--to", "b", "hold"]).success();
    devices[0]
        .cnspr(&["send", "--to", "b", "note", "at-stop"])
        .success();
    assert!(wait_until(SOON, || {
        let info = devices[0].cnspr_json(&["messages"]);
        info["outbox"].as_array().unwrap().is_empty()
    }));
    devices[1].stop_with("again", Signal::SIGTERM);
    devices[1].spawn_in(&ns, "third", &bin("cnspr"), &["serve"]);
    devices[1].wait_ready("third");
    wait_until(SOON, || lines(&runs).len() >= 3);
    std::thread::sleep(Duration::from_secs(1));
    let mut got = lines(&runs);
    got.sort();
    assert_eq!(
        got,
        ["big 200000", "note at-stop", "note waited"],
        "{}",
        devices[1].log("again")
    );
}
