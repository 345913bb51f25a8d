//! Pairing and removing devices, as a user does it, with real daemons in a network namespace
//! made by the test: invitations (`manage invite` / `join`), pairing on the local network over
//! mDNS (`manage join` without a code / `manage induct`), the replicated roster, `disable`,
//! `revoke` and `leave`.

use std::time::Duration;

use cnsprcy::identity::PublicKey;
use cnsprcy::invitation::Invitation;
use cnsprcy_tests::netns::NetNs;
use cnsprcy_tests::{Device, wait_until};
use nix::sys::signal::Signal;

/// Generous bound for anything that should take a second or two.
const SOON: Duration = Duration::from_secs(20);

fn device(ns: &NetNs, name: &str, port: u16) -> Device {
    Device::started_in(ns, name, &format!("127.0.0.1:{port}"))
}

/// `manage invite --json` on `inviter`: the code.
fn invite(inviter: &Device, expires: &str) -> String {
    let invited = inviter.cnspr_json(&["manage", "invite", "--expires", expires]);
    invited["code"].as_str().expect("code").to_owned()
}

/// A device per name on `lan`, each listening on every address and running `cnspr serve`.
fn on_lan(lan: &cnsprcy_tests::netns::Lan, names: &[&str]) -> Vec<Device> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut device = Device::new(name);
            device.configure("0.0.0.0:7332");
            device.start_in(lan.node(i));
            device
        })
        .collect()
}

fn names(device: &Device) -> Vec<String> {
    device.peers().into_keys().collect()
}

fn wait_names(device: &Device, expected: &[&str]) {
    let mut last = Vec::new();
    let reached = wait_until(SOON, || {
        last = names(device);
        last == expected
    });
    assert!(
        reached,
        "{}: members {last:?}, expected {expected:?}\n{}",
        device.name,
        device.log("serve")
    );
}

#[test]
fn devices_join_with_invitations_and_leave_by_disable_revoke_and_leave() {
    let ns = NetNs::new();
    let mut alpha = device(&ns, "alpha", 17101);
    let mut beta = device(&ns, "beta", 17102);
    let mut gamma = device(&ns, "gamma", 17103);
    let mut delta = device(&ns, "delta", 17104);

    // beta joins through alpha; the text output says so.
    let code = invite(&alpha, "15m");
    beta.cnspr(&["manage", "join", &code])
        .success()
        .stdout_has("joined the mesh through alpha");
    beta.wait_status("alpha", "direct", SOON);
    alpha.wait_status("beta", "direct", SOON);

    // gamma joins through beta, pasting the code in pieces and in lower case; it connects to
    // alpha too, with no command on alpha.
    let code = invite(&beta, "15m").to_lowercase();
    let (first, rest) = code.split_at(20);
    let joined = gamma.cnspr_json(&["manage", "join", first, rest]);
    assert_eq!(joined["inviter"]["name"], "beta");
    gamma.wait_status("alpha", "direct", SOON);
    gamma.wait_status("beta", "direct", SOON);
    alpha.wait_status("gamma", "direct", SOON);

    // The same code again, from delta: used; beta's `watch` reports the attempt.
    beta.spawn_in(
        &ns,
        "watch",
        &cnsprcy_tests::bin("cnspr"),
        &["watch", "--json"],
    );
    let delta_id = delta.cnspr_json(&["manage", "id"])["id"].clone();
    // Tried until the event shows: `watch` may not have subscribed yet at the first try.
    assert!(
        wait_until(SOON, || {
            delta
                .cnspr(&["manage", "join", &code])
                .code(1)
                .stderr_has("was used already");
            beta.log("watch").lines().any(|l| {
                l.contains("\"event\":\"join_refused\"")
                    && l.contains("\"reason\":\"used\"")
                    && l.contains(delta_id.as_str().unwrap())
            })
        }),
        "{}",
        beta.log("watch")
    );
    // A code that expired.
    let expired = invite(&alpha, "1s");
    std::thread::sleep(Duration::from_millis(1500));
    delta
        .cnspr(&["manage", "join", &expired])
        .code(1)
        .stderr_has("expired");
    // A well-formed code alpha never made (a guess).
    let alpha_key: PublicKey = alpha.public_key().parse().expect("a key");
    let guessed = Invitation {
        inviter: alpha_key,
        secret: [7; 16],
        addresses: vec!["127.0.0.1:17101".parse().unwrap()],
    };
    delta
        .cnspr(&["manage", "join", &guessed.encode()])
        .code(1)
        .stderr_has("does not know this invitation");
    // A lifetime out of bounds is a usage error.
    alpha
        .cnspr(&["manage", "invite", "--expires", "8d"])
        .code(2)
        .stderr_has("from 1s to 7days");
    // A mistyped one: a usage error, without asking anyone.
    let mut typo = invite(&alpha, "15m");
    let last = typo.pop().unwrap();
    typo.push(if last == 'A' { 'B' } else { 'A' });
    delta
        .cnspr(&["manage", "join", &typo])
        .code(2)
        .stderr_has("mistyped");
    assert!(
        names(&delta).is_empty(),
        "refused joins leave nothing behind"
    );
    assert_eq!(names(&alpha), ["beta", "gamma"]);

    // delta joins properly; everyone has everyone.
    let code = invite(&gamma, "15m");
    delta.cnspr_json(&["manage", "join", &code]);
    for device in [&mut alpha, &mut beta, &mut gamma] {
        device.wait_status("delta", "direct", SOON);
    }
    wait_names(&delta, &["alpha", "beta", "gamma"]);

    // beta goes offline; delta is stolen and revoked on alpha.
    beta.stop_with("serve", Signal::SIGTERM);
    let revoked = alpha.cnspr_json(&["manage", "revoke", "delta"]);
    assert_eq!(revoked["member"]["name"], "delta");
    wait_names(&alpha, &["beta", "gamma"]);
    wait_names(&gamma, &["alpha", "beta"]);
    // delta's sessions end, and its dials are refused.
    delta.wait_status("alpha", "unreachable", SOON);
    delta.wait_status("gamma", "unreachable", SOON);
    // beta returns and learns of the revocation from the others: it refuses delta too.
    beta.start_in(&ns);
    wait_names(&beta, &["alpha", "gamma"]);
    let roster = beta.cnspr_json(&["manage", "list"]);
    let states: Vec<(String, String)> = roster
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_owned();
            (name, e["state"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(
        states,
        [
            ("beta", "active"),
            ("alpha", "active"),
            ("delta", "revoked"),
            ("gamma", "active")
        ]
        .map(|(n, s)| (n.to_owned(), s.to_owned())),
        "this device first, then by name"
    );
    assert_eq!(roster[2]["by"], "alpha");
    beta.cnspr(&["manage", "list"])
        .success()
        .stdout_has("active (this device)");
    delta.cnspr(&["reconnect"]).success();
    std::thread::sleep(Duration::from_secs(2));
    assert_ne!(
        delta.peers()["beta"]["status"],
        "direct",
        "{}",
        beta.log("serve")
    );
    // A revoked device cannot be added back.
    alpha
        .cnspr(&["manage", "add", "delta", &delta.public_key()])
        .code(1)
        .stderr_has("revoked");

    // gamma is disabled from beta: it is told, and forgets the mesh.
    beta.cnspr(&["manage", "disable", "gamma"])
        .success()
        .stdout_has("disabled gamma");
    wait_names(&gamma, &[]);
    wait_names(&alpha, &["beta"]);

    // beta leaves: alpha hears of it; beta forgets the mesh.
    beta.cnspr(&["manage", "leave"])
        .success()
        .stdout_has("left the mesh");
    wait_names(&beta, &[]);
    wait_names(&alpha, &[]);
    // Leaving again: no mesh to leave.
    beta.cnspr(&["manage", "leave"])
        .code(1)
        .stderr_has("in no mesh");
}

/// Three devices on a LAN of namespaces, listening on every address: the invitation carries the
/// inviter's LAN address, the joiners receive the store written before they came, and `watch`
/// reports each roster change.
#[test]
fn devices_on_a_lan_join_and_receive_the_store() {
    let lan = cnsprcy_tests::netns::Lan::new(3);
    let mut devices = on_lan(&lan, &["laptop", "desk", "phone"]);
    devices[0].spawn_in(
        lan.node(0),
        "watch",
        &cnsprcy_tests::bin("cnspr"),
        &["watch", "--json"],
    );
    devices[0]
        .cnspr(&["db", "set", "greeting", "hello"])
        .success();

    let invited = devices[0].cnspr_json(&["manage", "invite"]);
    assert_eq!(
        invited["addresses"],
        serde_json::json!([format!("{}:7332", lan.addr(0))]),
        "the LAN address, not the unspecified listen address"
    );
    let code = invited["code"].as_str().unwrap().to_owned();
    devices[1].cnspr_json(&["manage", "join", &code]);
    let code = invite(&devices[1], "15m");
    devices[2].cnspr_json(&["manage", "join", &code]);
    for (device, others) in [
        (0, ["desk", "phone"]),
        (1, ["laptop", "phone"]),
        (2, ["desk", "laptop"]),
    ] {
        for other in others {
            devices[device].wait_status(other, "direct", SOON);
        }
    }
    for device in &devices[1..] {
        assert!(
            wait_until(SOON, || {
                device.cnspr(&["db", "get", "greeting"]).stdout.trim() == "hello"
            }),
            "{} did not receive the store",
            device.name
        );
    }
    let events = devices[0].log("watch");
    for joined in ["desk", "phone"] {
        assert!(
            events.lines().any(|l| l.contains("\"event\":\"member\"")
                && l.contains(&format!("\"name\":\"{joined}\""))
                && l.contains("\"state\":\"active\"")),
            "no member event for {joined}:\n{events}"
        );
    }
}

/// Ctrl-C while `join` waits for an inviting device that does not answer: `join` says so and
/// exits 130, and the daemon forgets the half-made join (no inviter left in the roster).
#[test]
fn ctrl_c_cancels_a_join_cleanly() {
    let ns = NetNs::new();
    let joiner = device(&ns, "joiner", 17111);
    // Something that accepts connections and never answers a handshake.
    let silent = ns.run_in(|| std::net::TcpListener::bind("127.0.0.1:17119").expect("bind"));
    let someone = cnsprcy::identity::Identity::from_secret([9; 32]).public_key();
    let code = Invitation {
        inviter: someone,
        secret: [1; 16],
        addresses: vec!["127.0.0.1:17119".parse().unwrap()],
    }
    .encode();
    let mut join = joiner.command(cnsprcy_tests::bin("cnspr"));
    join.args(["manage", "join", &code])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    ns.enter(&mut join);
    let child = join.spawn().expect("spawn join");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    // The daemon is dialling (the inviter is in the roster as a placeholder meanwhile).
    assert!(
        wait_until(SOON, || joiner.log("serve").contains("inviter-")
            || joiner
                .cnspr_json(&["manage", "list"])
                .as_array()
                .is_some_and(|a| a.len() == 2)),
        "{}",
        joiner.log("serve")
    );
    nix::sys::signal::kill(pid, Signal::SIGINT).expect("SIGINT");
    let output = child.wait_with_output().expect("join exits");
    assert_eq!(output.status.code(), Some(130), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("join cancelled"));
    let roster = joiner.cnspr_json(&["manage", "list"]);
    assert_eq!(roster.as_array().map(Vec::len), Some(1), "{roster}");
    drop(silent);
}

/// A device disabled while it was offline learns it when it comes back and dials a member: it
/// forgets the mesh then, instead of dialling forever. Invited again, it gets back in.
#[test]
fn a_device_disabled_while_offline_is_told_when_it_returns() {
    let ns = NetNs::new();
    let mut alpha = device(&ns, "alpha", 17121);
    let mut beta = device(&ns, "beta", 17122);
    let code = invite(&alpha, "15m");
    beta.cnspr_json(&["manage", "join", &code]);
    alpha.wait_status("beta", "direct", SOON);
    beta.stop_with("serve", Signal::SIGTERM);
    alpha.cnspr(&["manage", "disable", "beta"]).success();
    beta.start_in(&ns);
    wait_names(&beta, &[]);
    assert!(
        beta.log("serve")
            .contains("this device was disabled by alpha"),
        "{}",
        beta.log("serve")
    );
    assert!(alpha.log("serve").contains("that it was disabled"));
    let code = invite(&alpha, "15m");
    beta.cnspr_json(&["manage", "join", &code]);
    alpha.wait_status("beta", "direct", SOON);
}

fn id_of(device: &Device) -> String {
    device.cnspr_json(&["status"])["id"]
        .as_str()
        .expect("id")
        .to_owned()
}

/// Waits for a command started with `spawn_in` to exit with `expected`.
fn assert_exits(device: &mut Device, label: &str, expected: i32) {
    let status = device.wait_exit(label, Duration::from_secs(60));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(expected),
        "{label} on {}:\n{}\n{}",
        device.name,
        device.log(label),
        device.log("serve")
    );
}

/// `manage induct --expect-id ID --json` on `inductor`.
fn induct(inductor: &Device, id: &str) -> cnsprcy_tests::Run {
    inductor.cnspr(&[
        "manage",
        "induct",
        "--expect-id",
        id,
        "--timeout",
        "40s",
        "--json",
    ])
}

/// Devices on one LAN pair over mDNS as a user does, with `--expect-…` standing in for the
/// user comparing codes: a member inducts a new device, which then inducts the next, and all
/// three connect to each other without another command. A device that is not the expected
/// inductor is turned away; a joiner that does not confirm the code stays out; `watch`
/// reports the device waiting and the pairing request.
#[test]
fn devices_on_a_lan_pair_over_mdns_with_a_confirmation_code() {
    let lan = cnsprcy_tests::netns::Lan::new(4);
    let mut devices = on_lan(&lan, &["laptop", "desk", "phone", "stranger"]);
    let ids: Vec<String> = devices.iter().map(id_of).collect();
    let cnspr = cnsprcy_tests::bin("cnspr");
    devices[0].spawn_in(lan.node(0), "watch", &cnspr, &["watch", "--json"]);
    devices[2].spawn_in(lan.node(2), "watch", &cnspr, &["watch", "--json"]);

    // laptop inducts desk.
    devices[1].spawn_in(
        lan.node(1),
        "join",
        &cnspr,
        &["manage", "join", "--expect-inductor", &ids[0], "--json"],
    );
    let added = induct(&devices[0], &ids[1]).success().json();
    assert_eq!(added["added"]["name"], "desk", "{added}");
    assert_exits(&mut devices[1], "join", 0);
    assert!(
        devices[1].log("join").contains("pairing code: "),
        "the joiner shows the code:\n{}",
        devices[1].log("join")
    );

    // phone waits for desk only; stranger, not a member of anything, picks it first and is
    // turned away.
    devices[2].spawn_in(
        lan.node(2),
        "join",
        &cnspr,
        &["manage", "join", "--expect-inductor", &ids[1]],
    );
    induct(&devices[3], &ids[2])
        .code(1)
        .stderr_has("turned this device away");
    let added = induct(&devices[1], &ids[2]).success().json();
    assert_eq!(added["added"]["name"], "phone", "{added}");
    assert_exits(&mut devices[2], "join", 0);

    // Every member reaches every other, laptop and phone included, with no further command.
    for (device, others) in [
        (0, ["desk", "phone"]),
        (1, ["laptop", "phone"]),
        (2, ["desk", "laptop"]),
    ] {
        for other in others {
            devices[device].wait_status(other, "direct", SOON);
        }
    }

    // Ctrl-C while waiting to be inducted: status 130, and the device stops advertising.
    devices[3].spawn_in(lan.node(3), "join", &cnspr, &["manage", "join"]);
    assert!(
        wait_until(SOON, || devices[3]
            .log("serve")
            .contains("advertising this device as waiting to be paired")),
        "{}",
        devices[3].log("serve")
    );
    devices[3].signal("join", Signal::SIGINT);
    assert_exits(&mut devices[3], "join", 130);
    assert!(devices[3].log("join").contains("pairing cancelled"));
    assert!(
        wait_until(SOON, || devices[3].log("serve").contains(
            "no longer advertising this device as waiting to be paired"
        )),
        "{}",
        devices[3].log("serve")
    );

    // stranger waits to be paired, but answers nothing (no one at its keyboard): laptop's
    // confirmation alone does not let it in.
    devices[3].spawn_in(lan.node(3), "join-again", &cnspr, &["manage", "join"]);
    let refused = induct(&devices[0], &ids[3]);
    assert!(
        refused.stderr.contains("refused the pairing"),
        "{}\n{}\n{}",
        refused.stderr,
        devices[3].log("join-again"),
        devices[3].log("serve")
    );
    assert_exits(&mut devices[3], "join-again", 1);
    for device in &devices[..3] {
        let roster = device.cnspr_json(&["manage", "list"]);
        assert_eq!(
            roster.as_array().map(Vec::len),
            Some(3),
            "{}: {roster}",
            device.name
        );
    }
    assert_eq!(names(&devices[3]), Vec::<String>::new());

    // The owner does want it after all: an invitation from phone, and it reaches everyone.
    let code = invite(&devices[2], "15m");
    devices[3].cnspr_json(&["manage", "join", &code]);
    for other in ["desk", "laptop", "phone"] {
        devices[3].wait_status(other, "direct", SOON);
    }

    let laptop = devices[0].log("watch");
    assert!(
        laptop
            .lines()
            .any(|l| l.contains("\"event\":\"join_candidate\"") && l.contains("\"name\":\"desk\"")),
        "laptop's watch shows desk waiting:\n{laptop}"
    );
    let phone = devices[2].log("watch");
    for (who, accepted) in [("stranger", false), ("desk", true)] {
        assert!(
            phone
                .lines()
                .any(|l| l.contains("\"event\":\"pairing_request\"")
                    && l.contains(&format!("\"name\":\"{who}\""))
                    && l.contains(&format!("\"accepted\":{accepted}"))),
            "phone's watch shows {who}'s request:\n{phone}"
        );
    }
}
