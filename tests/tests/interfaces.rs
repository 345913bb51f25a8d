//! `[mesh] interfaces` and `[discovery] interfaces`: a device with two networks, a LAN and a
//! second link beside it (a cable, a VPN, a tethered phone), kept to one of them. Everything runs
//! in namespaces the test made, so neither the sessions nor the multicast leave them.

use std::net::IpAddr;
use std::time::Duration;

use cnsprcy_tests::netns::{Lan, NetNs};
use cnsprcy_tests::{Device, wait_until};

const SOON: Duration = Duration::from_secs(30);

/// The second link's addresses: `10.232.X.host`, with the LAN's `X`, so that Lans of tests
/// running at once do not share them either.
fn second(lan: &Lan, host: u8) -> String {
    let IpAddr::V4(v4) = lan.addr(0) else {
        unreachable!("Lan addresses are IPv4")
    };
    format!("10.232.{}.{host}", v4.octets()[2])
}

fn device(name: &str, extra: &str) -> Device {
    let device = Device::new(name);
    device.write_config(&format!(
        "name = \"{name}\"\n[mesh]\nlisten = [\"0.0.0.0:7332\"]\nkeepalive_interval = \"1s\"\nkeepalive_timeout = \"2s\"\n{extra}"
    ));
    device
}

#[test]
fn the_mesh_dials_and_accepts_only_over_its_interfaces() {
    let lan = Lan::new(2);
    let (wire_a, wire_b) = (second(&lan, 1), second(&lan, 2));
    lan.node(0).link_to(
        "wire",
        &format!("{wire_a}/24"),
        lan.node(1),
        "wire",
        &format!("{wire_b}/24"),
    );
    // On a, the route to b's LAN address goes over the wire: a dial the kernel routes on its own
    // would leave through it. Bound to eth0, a's dials keep to the LAN.
    lan.node(0).run(&[
        "ip",
        "route",
        "add",
        &format!("{}/32", lan.addr(1)),
        "dev",
        "wire",
    ]);
    // b's eth0 answers ARP only for b's own LAN address, as on a real LAN, where nobody holds
    // the wire's addresses. (Bound to eth0 without a route there, a asks for b's wire address on
    // the LAN; by default Linux would answer for any of its addresses.)
    lan.node(1).run(&[
        "sh",
        "-c",
        "echo 1 > /proc/sys/net/ipv4/conf/eth0/arp_ignore",
    ]);

    // a: only eth0, and usb0, a tether not plugged in. b: everything.
    let mut a = device(
        "a",
        "interfaces = [\"eth0\", \"usb0\"]\n[discovery]\nenabled = false\n",
    );
    let mut b = device("b", "[discovery]\nenabled = false\n");
    a.start_in(lan.node(0));
    b.start_in(lan.node(1));
    let (key_a, key_b) = (a.public_key(), b.public_key());

    // Each knows the other only on the wire: b's dials reach a there and are refused; a dials b's
    // wire address over eth0 only, where nobody answers.
    b.cnspr(&["manage", "add", "a", &key_a, &format!("{wire_a}:7332")])
        .success();
    a.cnspr(&["manage", "add", "b", &key_b, &format!("{wire_b}:7332")])
        .success();
    let refused = format!("refused a connection from {wire_b}:");
    assert!(
        wait_until(SOON, || a.log("serve").contains(&refused)),
        "a did not refuse b's connection over the wire:\n{}",
        a.log("serve")
    );
    assert!(
        wait_until(SOON, || a.log("serve").contains("over eth0: ")),
        "a did not try b's wire address over eth0:\n{}",
        a.log("serve")
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(a.peers()["b"]["status"], "unreachable");
    assert_eq!(b.peers()["a"]["status"], "unreachable");
    let log = a.log("serve");
    assert_eq!(
        log.matches("[mesh] interfaces names usb0, which this device does not have")
            .count(),
        1,
        "{log}"
    );

    // Told b's LAN address, a dials it over eth0, although its routes say wire: b sees the
    // session come from a's LAN address.
    a.cnspr(&["manage", "remove", "b"]).success();
    a.cnspr(&[
        "manage",
        "add",
        "b",
        &key_b,
        &format!("{}:7332", lan.addr(1)),
    ])
    .success();
    let peer = a.wait_status("b", "direct", SOON);
    assert_eq!(peer["addresses"][0], format!("{}:7332", lan.addr(1)));
    let on_lan = format!("{}:7332", lan.addr(0));
    let mut seen = serde_json::Value::Null;
    assert!(
        wait_until(SOON, || {
            seen = b.peers()["a"].clone();
            seen["status"] == "direct" && seen["addresses"][0] == on_lan.as_str()
        }),
        "b: {seen}\n{}",
        b.log("serve")
    );

    // `cnspr status` shows which interfaces the mesh uses.
    let status = a.cnspr_json(&["status"]);
    let uses = |name: &str| {
        status["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .map(|i| i["mesh"].clone())
            .unwrap_or_default()
    };
    assert_eq!(uses("eth0"), true, "{status}");
    assert_eq!(uses("wire"), false, "{status}");
    assert_eq!(uses("lo"), false, "{status}");
    assert_eq!(status["absent_interfaces"], serde_json::json!(["usb0"]));
    let text = a.cnspr(&["status"]).success().stdout;
    assert!(text.contains("  eth0        up      mesh "), "{text}");
    assert!(text.contains("  wire        up      not used "), "{text}");
    assert!(text.contains("  usb0        absent  "), "{text}");
}

#[test]
fn discovery_stays_on_its_interfaces() {
    // a and b on a LAN; c on a second link to a only.
    let lan = Lan::new(2);
    let c_ns = NetNs::new();
    lan.node(0).link_to(
        "wire",
        &format!("{}/24", second(&lan, 1)),
        &c_ns,
        "wire",
        &format!("{}/24", second(&lan, 3)),
    );
    c_ns.run(&["ip", "route", "add", "224.0.0.0/4", "dev", "wire"]);

    let mut a = device("a", "[discovery]\ninterfaces = [\"eth0\"]\n");
    let mut b = device("b", "");
    let mut c = device("c", "");
    a.start_in(lan.node(0));
    b.start_in(lan.node(1));
    c.start_in(&c_ns);
    let keys: Vec<String> = [&a, &b, &c].iter().map(|d| d.public_key()).collect();
    // Keys only, no addresses: only discovery can bring them together.
    a.cnspr(&["manage", "add", "b", &keys[1]]).success();
    a.cnspr(&["manage", "add", "c", &keys[2]]).success();
    b.cnspr(&["manage", "add", "a", &keys[0]]).success();
    c.cnspr(&["manage", "add", "a", &keys[0]]).success();

    let peer = a.wait_status("b", "direct", SOON);
    assert_eq!(peer["addresses"][0], format!("{}:7332", lan.addr(1)));
    b.wait_status("a", "direct", SOON);
    // mDNS queries and announcements are repeated within the first seconds; by now c would
    // have found a (or a c) if either could see the other.
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        a.peers()["c"]["status"],
        "unreachable",
        "{}",
        a.log("serve")
    );
    assert_eq!(
        c.peers()["a"]["status"],
        "unreachable",
        "{}",
        c.log("serve")
    );
    assert!(!a.log("serve").contains("found c on the local network"));
    assert!(!c.log("serve").contains("found a on the local network"));
    assert!(
        a.log("serve")
            .contains("mDNS runs on these interfaces interfaces=[\"eth0\"]"),
        "{}",
        a.log("serve")
    );
    let status = a.cnspr_json(&["status"]);
    let wire = status["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "wire")
        .cloned()
        .unwrap_or_default();
    assert_eq!(wire["mesh"], true, "{status}");
    assert_eq!(wire["discovery"], false, "{status}");
}
