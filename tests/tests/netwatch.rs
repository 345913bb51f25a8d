//! The network changing under a device, in namespaces made by the test: a link that goes down
//! and comes back, an address that moves to another one. netwatch tells the mesh service at
//! once, so sessions end and return without waiting for keepalive time-outs or backoff.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use cnsprcy_tests::Device;
use cnsprcy_tests::netns::Lan;

const SOON: Duration = Duration::from_secs(20);

/// Two devices on a LAN, listening on every address, with the default keepalive (20 s + 10 s):
/// nothing here may be noticed through a keepalive time-out.
fn pair(lan: &Lan) -> Vec<Device> {
    pair_with(lan, "")
}

/// [`pair`], with `extra` appended to each device's configuration.
fn pair_with(lan: &Lan, extra: &str) -> Vec<Device> {
    let mut devices: Vec<Device> = ["a", "b"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut device = Device::new(name);
            device.write_config(&format!(
                "name = \"{name}\"\n[mesh]\nlisten = [\"0.0.0.0:7332\"]\n{extra}"
            ));
            device.start_in(lan.node(i));
            device
        })
        .collect();
    let keys: Vec<String> = devices.iter().map(|d| d.public_key()).collect();
    for (i, other) in [(0, 1), (1, 0)] {
        let address = format!("{}:7332", lan.addr(other));
        let name = devices[other].name.clone();
        devices[i]
            .cnspr(&["manage", "add", &name, &keys[other], &address])
            .success();
    }
    devices[0].wait_status("b", "direct", SOON);
    devices[1].wait_status("a", "direct", SOON);
    devices
}

#[test]
fn a_link_that_comes_back_restores_the_session_at_once() {
    let lan = Lan::new(2);
    let mut devices = pair(&lan);

    lan.cut(1);
    let cut = Instant::now();
    devices[1].wait_status("a", "unreachable", SOON);
    assert!(
        cut.elapsed() < Duration::from_secs(10),
        "noticed after {:?}, not from the link going down",
        cut.elapsed()
    );
    // A minute, as the issue asks: the redial backoff grows to 16-60 s meanwhile, so only the
    // kernel's news of the link (netwatch) can bring the session back at once. (The benchmark
    // measures the same: 0.5 s median, against 18 s with backoff alone; docs/performance.md.)
    std::thread::sleep(Duration::from_secs(60));

    lan.restore(1);
    let restored = Instant::now();
    devices[1].wait_status("a", "direct", SOON);
    let took = restored.elapsed();
    assert!(took < Duration::from_secs(4), "restored after {took:?}");
    devices[0].wait_status("b", "direct", SOON);
    assert!(devices[1].log("serve").contains("the network changed"));
}

#[test]
fn a_device_whose_address_moves_is_reached_at_the_new_one() {
    let lan = Lan::new(2);
    let mut devices = pair(&lan);
    let old = lan.addr(1).to_string();
    let new = old
        .rsplit_once('.')
        .map(|(net, _)| format!("{net}.52"))
        .unwrap();
    // Renumbered in its subnet, as after a new DHCP lease. (Removing the old address after
    // adding the new one would take the new one with it: the kernel drops an IPv4 primary's
    // secondaries.) A move to another subnet is the next test.
    lan.node(1)
        .run(&["ip", "addr", "del", &format!("{old}/24"), "dev", "eth0"]);
    std::thread::sleep(Duration::from_millis(300));
    lan.node(1)
        .run(&["ip", "addr", "add", &format!("{new}/24"), "dev", "eth0"]);
    let moved = Instant::now();
    let expected = format!("{new}:7332");
    let reached = cnsprcy_tests::wait_until(SOON, || {
        let peer = devices[0].peers()["b"].clone();
        peer["status"] == "direct" && peer["addresses"][0] == expected.as_str()
    });
    assert!(
        reached,
        "a: {}\n{}",
        devices[0].peers()["b"],
        devices[1].log("serve")
    );
    assert!(
        moved.elapsed() < Duration::from_secs(8),
        "took {:?}",
        moved.elapsed()
    );
    devices[1].wait_status("a", "direct", SOON);
    // `cnspr status` lists the interfaces and addresses netwatch reported.
    let status = devices[1].cnspr_json(&["status"]);
    let eth0 = status["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "eth0")
        .cloned()
        .unwrap_or_default();
    assert_eq!(eth0["up"], true, "{status}");
    assert!(
        eth0["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == new.as_str()),
        "{status}"
    );
    let text = devices[1].cnspr(&["status"]).success().stdout;
    assert!(
        text.contains("network\n  eth0") && text.contains(&new),
        "{text}"
    );
}

/// A device moves to another subnet, and nothing is configured for it. The LAN carries two
/// subnets, as a home network does whose router serves a second range beside the first (moving
/// the network to a new range, or a second network for some devices), or like the old and new
/// IPv6 prefixes after a provider's renumbering. The desktop a holds an address in each; the
/// laptop b's lease moves from the first to the second, where the address of a that b was
/// given no longer reaches (b has no route to the first subnet any more). b knows a's address
/// in the second subnet because a names it in its `Hello`, and (with discovery) advertises it
/// on the LAN.
///
/// Then b's netwatch reports the change, b ends the session on its lost address at once and
/// redials a at every address it knows, a's second one among them; a takes the new session (a
/// new incarnation) in place of the old, which it still thinks alive, and learns b's new
/// address from it.
#[test]
fn a_device_that_moves_to_another_subnet_is_reached_there() {
    move_to_another_subnet("");
}

/// The same without discovery: a's `Hello` alone tells b where else a is.
#[test]
fn a_device_that_moves_to_another_subnet_is_reached_there_without_discovery() {
    move_to_another_subnet("[discovery]\nenabled = false\n");
}

fn move_to_another_subnet(extra_config: &str) {
    let lan = Lan::new(2);
    let IpAddr::V4(first) = lan.addr(1) else {
        unreachable!("Lan addresses are IPv4")
    };
    let second = |host: u8| format!("10.232.{}.{host}", first.octets()[2]);
    lan.node(0).run(&[
        "ip",
        "addr",
        "add",
        &format!("{}/24", second(1)),
        "dev",
        "eth0",
    ]);
    let mut devices = pair_with(&lan, extra_config);
    let a_second = format!("{}:7332", second(1));
    assert!(
        cnsprcy_tests::wait_until(SOON, || {
            devices[1].peers()["a"]["addresses"]
                .as_array()
                .is_some_and(|list| list.iter().any(|a| a == a_second.as_str()))
        }),
        "b did not learn a's second address: {}\n{}",
        devices[1].peers()["a"],
        devices[1].log("serve")
    );

    lan.node(1).run(&[
        "ip",
        "addr",
        "del",
        &format!("{}/24", lan.addr(1)),
        "dev",
        "eth0",
    ]);
    std::thread::sleep(Duration::from_millis(300));
    lan.node(1).run(&[
        "ip",
        "addr",
        "add",
        &format!("{}/24", second(2)),
        "dev",
        "eth0",
    ]);
    let moved = Instant::now();
    let expected = format!("{}:7332", second(2));
    let reached = cnsprcy_tests::wait_until(SOON, || {
        let peer = devices[0].peers()["b"].clone();
        peer["status"] == "direct" && peer["addresses"][0] == expected.as_str()
    });
    let took = moved.elapsed();
    assert!(
        reached,
        "a: {}\n{}",
        devices[0].peers()["b"],
        devices[1].log("serve")
    );
    let peer = devices[1].wait_status("a", "direct", SOON);
    assert_eq!(peer["addresses"][0], a_second.as_str(), "{peer}");
    assert!(took < Duration::from_secs(8), "took {took:?}");
}
