//! The network changing under a device, in namespaces made by the test: a link that goes down
//! and comes back, an address that moves to another one. netwatch tells the mesh service at
//! once, so sessions end and return without waiting for keepalive time-outs or backoff.

use std::time::{Duration, Instant};

use cnsprcy_tests::Device;
use cnsprcy_tests::netns::Lan;

const SOON: Duration = Duration::from_secs(20);

/// Two devices on a LAN, listening on every address, with the default keepalive (20 s + 10 s):
/// nothing here may be noticed through a keepalive time-out.
fn pair(lan: &Lan) -> Vec<Device> {
    let mut devices: Vec<Device> = ["a", "b"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut device = Device::new(name);
            device.write_config(&format!(
                "name = \"{name}\"\n[mesh]\nlisten = [\"0.0.0.0:7332\"]\n"
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
    // Long enough for the redial backoff to grow past several seconds.
    std::thread::sleep(Duration::from_secs(12));

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
    // secondaries.) Reaching a new subnet needs discovery, which is not built yet.
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
