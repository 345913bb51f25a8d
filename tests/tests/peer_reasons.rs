//! Why a member is not direct, told by real daemons in a network namespace: a device that has
//! not added this one back (and its knock on the other side), a wrong key, no address, nothing
//! listening, and `[mesh] interfaces` that allow no way there.

use std::time::Duration;

use cnsprcy_tests::netns::NetNs;
use cnsprcy_tests::{Device, wait_until};
use serde_json::Value;

/// Generous bound for anything that should take a second or two.
const SOON: Duration = Duration::from_secs(20);

fn addr(i: usize) -> String {
    format!("127.0.0.1:{}", 17401 + i)
}

/// Waits until `cnspr peers NAME --json` on `device` has `reason_code`; returns that peer.
fn wait_reason(device: &Device, name: &str, code: &str) -> Value {
    let mut last = Value::Null;
    let found = wait_until(SOON, || {
        last = device.cnspr_json(&["peers", name]);
        last["reason_code"] == code
    });
    assert!(
        found,
        "{name} on {} never had reason {code}; last: {last:#}\n{}",
        device.name,
        device.log("serve")
    );
    last
}

fn reason(peer: &Value) -> String {
    peer["reason"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn a_device_not_added_back_is_told_and_its_knock_listed() {
    let ns = NetNs::new();
    let mut laptop = Device::started_in(&ns, "laptop", &addr(0));
    let desk = Device::started_in(&ns, "desk", &addr(1));
    let laptop_key = laptop.public_key();
    let laptop_id = laptop.cnspr_json(&["manage", "id"])["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // laptop adds desk; desk has not added laptop.
    laptop.add_member(&desk, Some(&addr(1)));
    let peer = wait_reason(&laptop, "desk", "handshake_refused");
    assert_eq!(peer["status"], "unreachable", "{peer:#}");
    let text = reason(&peer);
    for needle in [
        "handshake refused or dropped by the other side",
        &addr(1),
        "it may not have added this device",
        "the key added here for it is wrong",
        "(at 20",
    ] {
        assert!(text.contains(needle), "{needle:?} not in {text:?}");
    }
    // The same, for people: under the table.
    laptop
        .cnspr(&["peers", "desk"])
        .success()
        .stdout_has("desk: handshake refused or dropped by the other side");
    // doctor turns it into what to check on both sides.
    let checks = laptop.cnspr(&["doctor", "--json"]).json();
    let check = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "member" && c["subject"] == "desk")
        .cloned()
        .unwrap_or_else(|| panic!("no member desk check in {checks:#}"));
    assert!(
        check["fix"]
            .as_str()
            .unwrap_or_default()
            .contains("on desk, `cnspr peers` must list this device"),
        "{check:#}"
    );

    // desk saw laptop knock: its ID, its key, where from, how often.
    let mut knocks = Value::Null;
    let knocked = wait_until(SOON, || {
        knocks = desk.cnspr_json(&["status"])["knocks"].clone();
        knocks
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k["public_key"] == laptop_key.as_str()))
    });
    assert!(knocked, "no knock from laptop on desk: {knocks:#}");
    let knock = &knocks[0];
    assert_eq!(knocks.as_array().unwrap().len(), 1, "{knocks:#}");
    assert_eq!(knock["id"], laptop_id.as_str(), "{knock:#}");
    assert!(knock["count"].as_u64().unwrap() >= 1, "{knock:#}");
    assert!(
        knock["address"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{knock:#}"
    );
    assert!(knock["last_seen"].as_str().unwrap().ends_with('Z'));
    desk.cnspr(&["status"])
        .success()
        .stdout_has("knocked (not members")
        .stdout_has(&format!("  {laptop_id}  from 127.0.0.1:"))
        .stdout_has(&format!("to add it: cnspr manage add NAME {laptop_key}"));
    assert!(
        desk.log("serve")
            .contains(&format!("device {laptop_id} is not a member")),
        "{}",
        desk.log("serve")
    );

    // desk adds laptop: the knock is gone, and the next dial gets through.
    desk.add_member(&laptop, None);
    let knocks = desk.cnspr_json(&["status"])["knocks"].clone();
    assert_eq!(knocks, Value::Array(Vec::new()));
    laptop.cnspr(&["reconnect"]).success();
    let peer = laptop.wait_status("desk", "direct", SOON);
    assert_eq!(peer["reason"], Value::Null, "{peer:#}");
    assert_eq!(peer["reason_code"], Value::Null, "{peer:#}");
}

#[test]
fn a_wrong_key_no_address_and_nothing_listening_each_say_so() {
    let ns = NetNs::new();
    let laptop = Device::started_in(&ns, "laptop", &addr(0));
    let desk = Device::started_in(&ns, "desk", &addr(1));
    desk.add_member(&laptop, Some(&addr(0)));
    // tv never runs: its key is real, nothing listens where laptop looks for it.
    let tv = Device::new("tv");
    tv.cnspr(&["manage", "init", "--name", "tv"]).success();
    let phone = Device::new("phone");
    phone
        .cnspr(&["manage", "init", "--name", "phone"])
        .success();

    // The key laptop has for "desk" is tv's: desk cannot decrypt the handshake. From laptop's
    // side that looks the same as not being added.
    let tv_key = tv.public_key();
    laptop
        .cnspr(&["manage", "add", "desk", &tv_key, &addr(1)])
        .success();
    let peer = wait_reason(&laptop, "desk", "handshake_refused");
    assert!(
        reason(&peer).contains("the key added here for it is wrong"),
        "{peer:#}"
    );
    // desk cannot tell who sent it: no knock, only a log line.
    assert!(
        wait_until(SOON, || desk.log("serve").contains("noise: decrypt error")),
        "{}",
        desk.log("serve")
    );
    assert_eq!(
        desk.cnspr_json(&["status"])["knocks"],
        Value::Array(Vec::new())
    );

    // No address at all.
    laptop.add_member(&phone, None);
    let peer = wait_reason(&laptop, "phone", "no_address");
    let text = reason(&peer);
    assert!(text.starts_with("no address known"), "{text}");
    assert!(
        text.contains(&format!("cnspr manage add phone {}", phone.public_key())),
        "{text}"
    );

    // An address where nothing listens.
    laptop.cnspr(&["manage", "remove", "desk"]).success();
    laptop.add_member(&tv, Some(&addr(2)));
    let peer = wait_reason(&laptop, "tv", "dial_failed");
    let text = reason(&peer);
    assert!(
        text.starts_with(&format!("dial failed: {}: ", addr(2))),
        "{text}"
    );
    assert!(text.to_lowercase().contains("connection refused"), "{text}");
}

#[test]
fn mesh_interfaces_that_reach_no_address_are_the_reason() {
    let ns = NetNs::new();
    let mut laptop = Device::new("laptop");
    // Sessions only over usb0, which this namespace does not have.
    laptop.write_config(&format!(
        "name = \"laptop\"\n[mesh]\nlisten = [\"{}\"]\ninterfaces = [\"usb0\"]\n",
        addr(0)
    ));
    laptop.start_in(&ns);
    let desk = Device::new("desk");
    desk.cnspr(&["manage", "init", "--name", "desk"]).success();
    laptop.add_member(&desk, Some(&addr(1)));
    let peer = wait_reason(&laptop, "desk", "interfaces");
    let text = reason(&peer);
    assert!(
        text.starts_with(&format!(
            "refused by [mesh] interfaces settings: {}: not dialled: ",
            addr(1)
        )),
        "{text}"
    );
}
