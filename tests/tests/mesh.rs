//! Several devices as real processes, each with its own XDG directories and port, in a network
//! namespace made by the test: sessions, status, relays, ping, members coming and going.

use std::time::Duration;

use cnsprcy_tests::netns::NetNs;
use cnsprcy_tests::{Device, wait_until};
use nix::sys::signal::Signal;

/// Generous bound for anything that should take a second or two.
const SOON: Duration = Duration::from_secs(20);

/// Devices listening on 127.0.0.1:17001, :17002, ... in one namespace, each started.
fn loopback_devices(ns: &NetNs, names: &[&str]) -> Vec<Device> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut device = Device::new(name);
            device.configure(&format!("127.0.0.1:{}", 17001 + i));
            device.start_in(ns);
            device
        })
        .collect()
}

fn addr(i: usize) -> String {
    format!("127.0.0.1:{}", 17001 + i)
}

/// Established TCP connections between the devices, counted once per connection.
fn sessions_in(ns: &NetNs) -> usize {
    let out = ns.run(&["ss", "-Htn", "state", "established"]);
    // On loopback both ends of a connection are listed; each session has one end on a listening
    // port (1700x) as its local address.
    out.lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(2)
                .is_some_and(|local| local.starts_with("127.0.0.1:1700"))
        })
        .count()
}

#[test]
fn three_devices_form_one_session_per_pair() {
    let ns = NetNs::new();
    let mut devices = loopback_devices(&ns, &["alpha", "beta", "gamma"]);
    // Everyone knows everyone's address, so all of them dial at once and sessions cross.
    for (i, device) in devices.iter().enumerate() {
        for (j, other) in devices.iter().enumerate() {
            if i != j {
                device.add_member(other, Some(&addr(j)));
            }
        }
    }
    for i in 0..3 {
        for j in 0..3 {
            if i != j {
                let name = devices[j].name.clone();
                let peer = devices[i].wait_status(&name, "direct", SOON);
                assert!(peer["id"].as_str().unwrap().len() == 19);
                assert_eq!(peer["via"], serde_json::Value::Null);
                assert!(peer["last_seen"].as_str().unwrap().ends_with('Z'));
            }
        }
    }
    // Crossing dials settle on exactly one session per pair.
    assert!(
        wait_until(SOON, || sessions_in(&ns) == 3),
        "expected 3 sessions, have {}: {}",
        sessions_in(&ns),
        ns.run(&["ss", "-Htn", "state", "established"])
    );
    // Latency gets measured, and the table has the documented columns.
    let alpha = &mut devices[0];
    assert!(wait_until(SOON, || alpha.peers()["beta"]["rtt_ms"].is_number()));
    let table = alpha.cnspr(&["peers"]).success().stdout;
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("LAST SEEN") && table.contains("direct"),
        "{table}"
    );
    assert_eq!(
        alpha.cnspr(&["members"]).success().stdout.lines().count(),
        table.lines().count(),
        "`members` is `peers`"
    );
    // The IDs the table shows can be pasted back as names.
    for row in table.lines().skip(1) {
        let cells: Vec<&str> = row.split_whitespace().collect();
        let (name, id) = (cells[0], cells[1]);
        assert!(id.len() >= 4 && !id.contains('…'), "{table}");
        assert_eq!(alpha.cnspr_json(&["peers", id])["name"], name, "{table}");
        alpha
            .cnspr(&["ping", id, "-c", "1"])
            .success()
            .stdout_has(&format!("pong from {name}"));
    }
    let one = alpha.cnspr_json(&["peers", "gamma"]);
    assert_eq!(one["name"], "gamma");
    let by_id = one["id"].as_str().unwrap()[..4].to_owned();
    assert_eq!(alpha.cnspr_json(&["peers", &by_id])["name"], "gamma");
    alpha
        .cnspr(&["peers", "nobody"])
        .code(1)
        .stderr_has("no member named");
    let ping = alpha.cnspr(&["ping", "beta", "-c", "2"]).success().stdout;
    let lines: Vec<&str> = ping.lines().collect();
    assert_eq!(lines.len(), 3, "two pongs and the summary: {ping}");
    assert!(
        lines[0].contains("pong from beta") && lines[0].contains(&addr(1)),
        "{ping}"
    );
    assert!(
        lines[2].starts_with("2 sent, 0 lost (0%), rtt min/avg/max = ")
            && lines[2].ends_with(" ms"),
        "{ping}"
    );
    let json = alpha.cnspr_json(&["ping", "gamma", "-c", "1"]);
    let round = &json["rounds"][0];
    assert_eq!(round["status"], "direct");
    assert!(round["rtt_ms"].as_f64().unwrap() > 0.0);
    // `ping` and `peers` name the same things alike.
    let peer = alpha.cnspr_json(&["peers", "gamma"]);
    assert_eq!(peer["status"], round["status"]);
    assert!(peer["rtt_ms"].is_number() && peer.get("latency_ms").is_none());
    let summary = &json["summary"];
    assert_eq!(
        (summary["sent"].as_u64(), summary["lost"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(summary["loss_percent"], 0);
    assert_eq!(summary["rtt_min_ms"], round["rtt_ms"]);
    assert_eq!(summary["rtt_max_ms"], round["rtt_ms"]);
    // Ctrl-C ends the rounds, with the summary of those that finished.
    let long_ping = alpha
        .command(cnsprcy_tests::bin("cnspr"))
        .args(["ping", "beta", "-c", "100"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(long_ping.id() as i32),
        Signal::SIGINT,
    )
    .unwrap();
    let output = long_ping.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(
        summary.contains(" sent, 0 lost (0%), rtt min/avg/max = ") && !summary.starts_with("100 "),
        "{stdout}"
    );
    let pongs = stdout
        .lines()
        .filter(|l| l.starts_with("pong from beta"))
        .count();
    assert!(summary.starts_with(&format!("{pongs} sent")), "{stdout}");
    // An unknown name fails once, at once, not once per round.
    let started = std::time::Instant::now();
    let unknown = alpha.cnspr(&["ping", "nobody", "-c", "5"]).code(1);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "it waited between rounds"
    );
    assert_eq!(
        unknown.stderr.matches("no member named").count(),
        1,
        "{}",
        unknown.stderr
    );
    assert!(!unknown.stdout.contains("sent"), "{}", unknown.stdout);
    // A likely typo of a member's name gets that name as a hint, wherever a member is named.
    for args in [
        &["peers", "betta"][..],
        &["ping", "btea", "-c", "3"],
        &["send", "test/typo", "--to", "gamma", "--to", "bta"],
        &["manage", "remove", "beat"],
    ] {
        alpha.cnspr(args).code(1).stderr_has("; did you mean beta?");
    }
    alpha
        .cnspr(&["peers", "omega"])
        .code(1)
        .stderr_has("`cnspr peers` lists the members");
    assert_eq!(alpha.peers().len(), 2, "nothing was removed");
    // A status change is logged with the peer's name.
    assert!(alpha.log("serve").contains("beta is direct at"));
}

#[test]
fn a_peer_without_a_path_is_relayed_and_pinged_through_the_relay() {
    // a and c cannot reach each other (the LAN's bridge drops what goes between them): only b
    // links them. (Withholding addresses no longer does: the shared roster carries them.)
    let lan = cnsprcy_tests::netns::Lan::new(3);
    lan.partition(0, 2);
    let mut devices: Vec<Device> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, name)| Device::started_in(lan.node(i), name, &format!("{}:7332", lan.addr(i))))
        .collect();
    let at = |i: usize| format!("{}:7332", lan.addr(i));
    for (i, j) in [(0, 1), (1, 0), (1, 2), (2, 1), (0, 2), (2, 0)] {
        devices[i].add_member(&devices[j], Some(&at(j)));
    }

    let peer = devices[0].wait_status("c", "relayed", SOON);
    assert_eq!(peer["via"], "b");
    devices[2].wait_status("a", "relayed", SOON);
    let a = &mut devices[0];
    assert!(wait_until(SOON, || a.peers()["c"]["rtt_ms"].is_number()));
    let table = a.cnspr(&["peers"]).success().stdout;
    assert!(table.contains("via b"), "{table}");

    let out = a.cnspr(&["ping", "c", "-c", "1"]).success().stdout;
    assert!(
        out.contains("pong from c") && out.contains("via b (relayed)"),
        "{out}"
    );
    let json = a.cnspr_json(&["ping", "c", "-c", "1"]);
    assert_eq!(json["rounds"][0]["status"], "relayed");
    assert_eq!(json["rounds"][0]["via"], "b");
    assert_eq!(a.peers()["c"]["via"], json["rounds"][0]["via"]);

    // Without the relay, c is unreachable, and ping says so.
    devices[1].stop_with("serve", Signal::SIGTERM);
    devices[0].wait_status("c", "unreachable", SOON);
    // Every round is tried and counted as lost.
    let lost = devices[0]
        .cnspr(&["ping", "c", "-c", "2"])
        .code(1)
        .stderr_has("unreachable")
        .stdout_has("2 sent, 2 lost (100%)");
    assert_eq!(
        lost.stderr.matches("unreachable").count(),
        2,
        "{}",
        lost.stderr
    );
    let json = devices[0]
        .cnspr(&["ping", "c", "-c", "1", "--json"])
        .code(1)
        .json();
    assert!(
        json["rounds"][0]["error"]
            .as_str()
            .unwrap()
            .contains("unreachable")
    );
    assert_eq!(json["summary"]["lost"], 1);
    assert_eq!(json["summary"]["rtt_avg_ms"], serde_json::Value::Null);
}

#[test]
fn a_killed_device_is_unreachable_at_once_and_comes_back_after_restart() {
    let ns = NetNs::new();
    let mut devices = loopback_devices(&ns, &["a", "b", "c"]);
    for (i, device) in devices.iter().enumerate() {
        for (j, other) in devices.iter().enumerate() {
            if i != j {
                device.add_member(other, Some(&addr(j)));
            }
        }
    }
    devices[0].wait_status("c", "direct", SOON);
    devices[1].wait_status("c", "direct", SOON);

    devices[2].stop_with("serve", Signal::SIGKILL);
    let started = std::time::Instant::now();
    let peer = devices[0].wait_status("c", "unreachable", SOON);
    devices[1].wait_status("c", "unreachable", SOON);
    // The kernel closes a killed process's connections: no keepalive timeout is needed.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(peer["last_seen"].is_string());
    assert!(
        devices[0]
            .cnspr(&["peers"])
            .success()
            .stdout
            .contains("unreachable")
    );

    // Restarted with the same identity and roster, it dials the others itself.
    devices[2].start_in(&ns);
    devices[0].wait_status("c", "direct", SOON);
    devices[2].wait_status("a", "direct", SOON);
    devices[2].wait_status("b", "direct", SOON);
}

#[test]
fn a_removed_member_loses_its_session_and_forgets_the_mesh() {
    let ns = NetNs::new();
    let mut devices = loopback_devices(&ns, &["a", "b"]);
    devices[0].add_member(&devices[1], Some(&addr(1)));
    devices[1].add_member(&devices[0], Some(&addr(0)));
    devices[0].wait_status("b", "direct", SOON);

    // `remove` disables b on every member; b, reachable, is told and forgets the mesh.
    let removed = devices[0].cnspr_json(&["manage", "remove", "b"]);
    assert_eq!(removed["name"], "b");
    assert!(devices[0].peers().is_empty());
    let b = &devices[1];
    assert!(
        wait_until(SOON, || b.peers().is_empty()),
        "b still lists {:?}\n{}",
        b.peers(),
        b.log("serve")
    );
    assert!(b.log("serve").contains("this device was disabled by a"));

    // Bad input to the member commands is refused with a reason.
    let key = devices[1].public_key();
    devices[0]
        .cnspr(&["manage", "add", "b", "not-a-key"])
        .code(2)
        .stderr_has("not a public key");
    devices[0]
        .cnspr(&["manage", "add", "b", &key, "nowhere"])
        .code(2);
    devices[0]
        .cnspr(&["manage", "add", "b", &key, &addr(1)])
        .success();
    devices[0]
        .cnspr(&["manage", "add", "b2", &key])
        .code(1)
        .stderr_has("already belongs to member b");
    let own = devices[0].public_key();
    devices[0]
        .cnspr(&["manage", "add", "self", &own])
        .code(1)
        .stderr_has("own key");
    devices[0]
        .cnspr(&["manage", "remove", "nobody"])
        .code(1)
        .stderr_has("no member named");
    // Added back on both sides (b forgot a), they connect again.
    devices[1].add_member(&devices[0], Some(&addr(0)));
    devices[0].wait_status("b", "direct", SOON);
    devices[1].wait_status("a", "direct", SOON);
}

#[test]
fn a_member_known_at_two_addresses_keeps_one_stable_session() {
    let ns = NetNs::new();
    let mut a = Device::new("a");
    let mut b = Device::new("b");
    a.configure("127.0.0.1:17001");
    b.write_config(
        "name = \"b\"\n[mesh]\nlisten = [\"127.0.0.1:17002\", \"[::1]:17002\"]\nkeepalive_interval = \"1s\"\nkeepalive_timeout = \"2s\"\n",
    );
    a.start_in(&ns);
    b.start_in(&ns);
    b.add_member(&a, None);
    let key = b.public_key();
    a.cnspr(&["manage", "add", "b", &key, "127.0.0.1:17002", "[::1]:17002"])
        .success();
    a.wait_status("b", "direct", SOON);
    // Both addresses answer at once; still exactly one session, and it stays.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(a.peers()["b"]["status"], "direct");
    assert!(
        !a.log("serve").contains("session with b ended"),
        "{}",
        a.log("serve")
    );
    assert!(
        !b.log("serve").contains("session with a ended"),
        "{}",
        b.log("serve")
    );
}

#[test]
fn members_survive_a_restart() {
    let ns = NetNs::new();
    let mut devices = loopback_devices(&ns, &["a", "b"]);
    devices[0].add_member(&devices[1], Some(&addr(1)));
    devices[1].add_member(&devices[0], None);
    devices[0].wait_status("b", "direct", SOON);
    // b learned where a listens from a's announcement.
    devices[1].stop_with("serve", Signal::SIGTERM);
    devices[0].stop_with("serve", Signal::SIGTERM);
    devices[1].start_in(&ns);
    devices[0].start_in(&ns);
    devices[0].wait_status("b", "direct", SOON);
    let b_peers = devices[1].peers();
    assert_eq!(b_peers["a"]["addresses"][0], addr(0));
}

#[test]
fn an_address_without_a_port_means_port_7332() {
    let ns = NetNs::new();
    let mut a = Device::new("a");
    let mut b = Device::new("b");
    let mut c = Device::new("c");
    a.configure("127.0.0.1:17001");
    // Listen addresses without a port, IPv4 and IPv6 in brackets.
    b.configure("127.0.0.1");
    c.configure("[::1]");
    for device in [&mut a, &mut b, &mut c] {
        device.start_in(&ns);
    }
    assert_eq!(b.cnspr_json(&["status"])["listen"][0], "127.0.0.1:7332");
    assert_eq!(c.cnspr_json(&["status"])["listen"][0], "[::1]:7332");
    b.add_member(&a, None);
    c.add_member(&a, None);

    // `manage add` with an IPv4 address alone.
    let added = a.cnspr_json(&["manage", "add", "b", &b.public_key(), "127.0.0.1"]);
    assert_eq!(added["addresses"], serde_json::json!(["127.0.0.1:7332"]));
    a.wait_status("b", "direct", SOON);

    // The `members.add` method with an IPv6 address alone, and one in brackets.
    let mut api = cnsprcy_tests::bench::Api::connect(&a);
    let added = api.call(
        "members.add",
        serde_json::json!({"name": "c", "public_key": c.public_key(), "addresses": ["::1", "[::1]"]}),
    );
    assert_eq!(added["addresses"], serde_json::json!(["[::1]:7332"]));
    a.wait_status("c", "direct", SOON);

    // `fd00::5` alone is an address too; one that is not says how to write one (a usage error).
    a.cnspr(&["manage", "remove", "c"]).success();
    let added = a.cnspr_json(&["manage", "add", "c", &c.public_key(), "fd00::5"]);
    assert_eq!(added["addresses"], serde_json::json!(["[fd00::5]:7332"]));
    a.cnspr(&["manage", "add", "d", &b.public_key(), "10.0.0.300"])
        .code(2)
        .stderr_has("is not an address");
}

#[test]
fn a_config_typo_does_not_cut_client_commands_off_a_running_daemon() {
    let ns = NetNs::new();
    let mut devices = loopback_devices(&ns, &["a", "b"]);
    devices[0].add_member(&devices[1], Some(&addr(1)));
    devices[1].add_member(&devices[0], Some(&addr(0)));
    devices[0].wait_status("b", "direct", SOON);

    // A typo while the daemon runs, in a file whose [paths] still matter.
    let a = &mut devices[0];
    let good = std::fs::read_to_string(a.config_file()).unwrap();
    a.write_config(&format!("{good}lisen = [\"127.0.0.1\"]\n"));
    let warned = |run: cnsprcy_tests::Run| {
        run.success()
            .stderr_has("warning: ")
            .stderr_has("unknown key `mesh.lisen`")
            .stderr_has("going on with the socket")
    };
    let peers = warned(a.cnspr(&["peers", "--json"]));
    assert_eq!(peers.json()[0]["name"], "b");
    warned(a.cnspr(&["status"])).stdout_has("running");
    warned(a.cnspr(&["send", "test/typo", "hi", "--to", "b"]));
    warned(a.cnspr(&["ping", "b", "-c", "1"])).stdout_has("pong from b");

    // What uses the settings still refuses the file, and so does the daemon.
    a.cnspr(&["config", "show"])
        .code(1)
        .stderr_has("unknown key `mesh.lisen`");
    a.stop_with("serve", Signal::SIGTERM);
    a.spawn_in(&ns, "serve-again", &cnsprcy_tests::bin("cnspr"), &["serve"]);
    let status = a
        .wait_exit("serve-again", SOON)
        .expect("serve refuses and exits");
    assert_eq!(status.code(), Some(1), "{}", a.log("serve-again"));
    assert!(a.log("serve-again").contains("unknown key `mesh.lisen`"));
}
