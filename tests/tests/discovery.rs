//! Members find each other on a LAN with mDNS-SD, with no configured address; a stranger on
//! the same LAN is ignored. Every device runs in a namespace of a LAN the test made, so the
//! multicast never leaves it.

use std::time::Duration;

use cnsprcy_tests::netns::Lan;
use cnsprcy_tests::{Device, wait_until};
use nix::sys::signal::Signal;

const SOON: Duration = Duration::from_secs(30);

#[test]
fn members_without_addresses_find_each_other_and_strangers_are_ignored() {
    let lan = Lan::new(3);
    let mut devices: Vec<Device> = ["a", "b", "stranger"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut device = Device::new(name);
            device.write_config(&format!(
                "name = \"{name}\"\n[mesh]\nlisten = [\"0.0.0.0:7332\"]\nkeepalive_interval = \"1s\"\nkeepalive_timeout = \"2s\"\n"
            ));
            device.start_in(lan.node(i));
            device
        })
        .collect();
    let keys: Vec<String> = devices.iter().map(|d| d.public_key()).collect();
    // a and b know each other's keys, and nothing about where the other is.
    devices[0]
        .cnspr(&["manage", "add", "b", &keys[1]])
        .success();
    devices[1]
        .cnspr(&["manage", "add", "a", &keys[0]])
        .success();
    devices[2]
        .cnspr(&["manage", "add", "a", &keys[0]])
        .success();

    let peer = devices[0].wait_status("b", "direct", SOON);
    assert_eq!(peer["addresses"][0], format!("{}:7332", lan.addr(1)));
    devices[1].wait_status("a", "direct", SOON);
    // Whichever found the other first dialled it.
    assert!(
        devices[0]
            .log("serve")
            .contains("found b on the local network")
            || devices[1]
                .log("serve")
                .contains("found a on the local network")
    );
    // The stranger knows a's key, but a does not know the stranger: no session, and a never
    // took its advertisement for a member's.
    assert_eq!(devices[0].peers().len(), 1);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(devices[2].peers()["a"]["status"], "unreachable");

    // A whole mesh stops looking (an idle one sends no mDNS queries); the stranger, whose only
    // member does not take it, goes on looking.
    const STOPPED: &str = "not looking for members any more";
    const STARTED: &str = "now looking for members on the local network";
    for device in &devices[..2] {
        assert!(
            wait_until(SOON, || device.log("serve").contains(STOPPED)),
            "{} still looks for members:\n{}",
            device.name,
            device.log("serve")
        );
    }
    assert!(!devices[2].log("serve").contains(STOPPED));
    // b goes away: a looks again, and finds b by mDNS once b is back.
    devices[1].stop_with("serve", Signal::SIGKILL);
    assert!(wait_until(SOON, || {
        devices[0].log("serve").matches(STARTED).count() == 2
    }));
    devices[1].start_in(lan.node(1));
    devices[0].wait_status("b", "direct", SOON);
    assert!(wait_until(SOON, || {
        devices[0].log("serve").matches(STOPPED).count() == 2
    }));
}

/// mDNS reports an advertisement once, when it first resolves it: devices that become members
/// only after that (issue 14: added without addresses once the daemons ran) must still be found,
/// from what discovery saw before.
#[test]
fn devices_added_after_discovery_saw_them_are_found() {
    let lan = Lan::new(3);
    let names = ["a", "b", "c"];
    let mut devices: Vec<Device> = names
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
    // Time for every discovery service to resolve the others' advertisements, as strangers.
    std::thread::sleep(Duration::from_secs(8));
    for (i, device) in devices.iter().enumerate() {
        for (j, name) in names.iter().enumerate().filter(|(j, _)| *j != i) {
            device.cnspr(&["manage", "add", name, &keys[j]]).success();
        }
    }
    for (i, device) in devices.iter_mut().enumerate() {
        for (j, name) in names.iter().enumerate().filter(|(j, _)| *j != i) {
            let peer = device.wait_status(name, "direct", SOON);
            assert_eq!(peer["addresses"][0], format!("{}:7332", lan.addr(j)));
        }
    }
}
