//! Network interfaces: reading them (getifaddrs), naming them in the configuration, and the rules
//! for which of them the mesh and discovery may use (`[mesh] interfaces`,
//! `[discovery] interfaces`). The rules are pure functions over a list of [`Interface`]s, so they
//! are tested without a network.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ipc::Interface;

/// The longest interface name Linux accepts (`IFNAMSIZ` is 16, with the terminating NUL).
pub const MAX_NAME_BYTES: usize = 15;

/// A network interface's name as the configuration names it (`wlan0`, `enp3s0`, `usb0`): what
/// Linux accepts for a device name, so that a typo in a name that cannot exist is caught at once.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct InterfaceName(String);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum InterfaceNameError {
    #[error("an interface name cannot be empty")]
    Empty,
    #[error("{0:?} is too long for an interface name: Linux allows at most {MAX_NAME_BYTES} bytes")]
    TooLong(String),
    #[error(
        "{0:?} is not an interface name: it may not hold '/', ':' or whitespace, nor be \".\" or \"..\" (`ip link` lists the interfaces)"
    )]
    Invalid(String),
}

impl InterfaceName {
    /// Checks `name` the way the kernel's `dev_valid_name` does.
    pub fn new(name: &str) -> Result<Self, InterfaceNameError> {
        if name.is_empty() {
            return Err(InterfaceNameError::Empty);
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(InterfaceNameError::TooLong(name.to_owned()));
        }
        if name == "."
            || name == ".."
            || name
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        {
            return Err(InterfaceNameError::Invalid(name.to_owned()));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for InterfaceName {
    type Error = InterfaceNameError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(&value)
    }
}

impl From<InterfaceName> for String {
    fn from(value: InterfaceName) -> Self {
        value.0
    }
}

impl fmt::Display for InterfaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The device an interface entry belongs to: getifaddrs names an IPv4 address with a label
/// (`ip addr add … label eth0:1`) by its label, but the device is `eth0`.
pub fn device_of(label: &str) -> &str {
    label.split_once(':').map_or(label, |(device, _)| device)
}

/// Which interfaces a service may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceFilter {
    /// `None`: any interface. `Some`: only these.
    names: Option<BTreeSet<String>>,
    /// Whether a loopback interface may pass at all (it must be in `names` too, if that is set).
    loopback: bool,
}

impl InterfaceFilter {
    /// Any interface, loopback included: the mesh when `[mesh] interfaces` is empty.
    pub fn any() -> Self {
        Self {
            names: None,
            loopback: true,
        }
    }

    /// `[mesh] interfaces`: empty means every interface, loopback included (sessions with other
    /// devices on this machine run over it, and it never leaves the machine); otherwise only the
    /// named ones, so loopback only when named.
    pub fn mesh(configured: &[InterfaceName]) -> Self {
        if configured.is_empty() {
            return Self::any();
        }
        Self {
            names: Some(configured.iter().map(|n| n.0.clone()).collect()),
            loopback: true,
        }
    }

    /// `[discovery] interfaces`, within what the mesh may use: mDNS on an interface where the
    /// mesh refuses sessions would advertise an address nobody can use. Loopback only when
    /// `[discovery] interfaces` names it.
    pub fn discovery(configured: &[InterfaceName], mesh: &[InterfaceName]) -> Self {
        let own: Option<BTreeSet<String>> =
            (!configured.is_empty()).then(|| configured.iter().map(|n| n.0.clone()).collect());
        let mesh: Option<BTreeSet<String>> =
            (!mesh.is_empty()).then(|| mesh.iter().map(|n| n.0.clone()).collect());
        let names = match (own, mesh) {
            (None, None) => None,
            (Some(names), None) | (None, Some(names)) => Some(names),
            (Some(own), Some(mesh)) => Some(own.intersection(&mesh).cloned().collect()),
        };
        Self {
            names,
            loopback: !configured.is_empty(),
        }
    }

    /// True when every interface passes, so that callers can skip the work.
    pub fn is_any(&self) -> bool {
        self.names.is_none() && self.loopback
    }

    /// The names this filter allows; `None` when it does not restrict names.
    pub fn names(&self) -> Option<&BTreeSet<String>> {
        self.names.as_ref()
    }

    /// Whether loopback interfaces may pass (when named, if names are given).
    pub fn allows_loopback(&self) -> bool {
        self.loopback
    }

    /// Whether the interface (or address label) `name` may be used.
    pub fn allows(&self, name: &str, loopback: bool) -> bool {
        let device = device_of(name);
        (!loopback || self.loopback) && self.names.as_ref().is_none_or(|n| n.contains(device))
    }

    pub fn allows_interface(&self, interface: &Interface) -> bool {
        self.allows(&interface.name, interface.loopback)
    }

    /// The named interfaces that `interfaces` does not have (none when names are not
    /// restricted): a USB tether that is not plugged in yet, or a typo.
    pub fn missing(&self, interfaces: &[Interface]) -> Vec<String> {
        let Some(names) = &self.names else {
            return Vec::new();
        };
        names
            .iter()
            .filter(|n| !interfaces.iter().any(|i| device_of(&i.name) == n.as_str()))
            .cloned()
            .collect()
    }
}

/// The interface that holds `ip`, if any. An IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`,
/// from a dual-stack socket) counts as the IPv4 address.
pub fn interface_with(interfaces: &[Interface], ip: IpAddr) -> Option<&Interface> {
    let ip = ip.to_canonical();
    interfaces.iter().find(|i| i.addresses.contains(&ip))
}

/// What the accept path decides for a connection that arrived at the local address `local`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalCheck {
    /// On an interface the filter allows.
    Allowed,
    /// On this interface, which the filter does not allow.
    Refused(String),
    /// No interface in the list holds the address: read the interfaces again, then refuse.
    Unknown,
}

pub fn check_local(
    filter: &InterfaceFilter,
    interfaces: &[Interface],
    local: IpAddr,
) -> LocalCheck {
    if filter.is_any() {
        return LocalCheck::Allowed;
    }
    match interface_with(interfaces, local) {
        Some(interface) if filter.allows_interface(interface) => LocalCheck::Allowed,
        Some(interface) => LocalCheck::Refused(device_of(&interface.name).to_owned()),
        None => LocalCheck::Unknown,
    }
}

/// How to dial `target` under `filter`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialPlan {
    /// No restriction: let the kernel's routing pick the interface.
    Unbound,
    /// Bind the socket to each of these devices (SO_BINDTODEVICE) and try them all at once;
    /// routing then only looks at routes through that device.
    Devices(Vec<String>),
    /// No allowed interface can reach an address of this kind; why, for the log.
    Impossible(String),
}

/// The allowed interfaces that could carry a session to `target`: up, with an address of the
/// target's family; a loopback target only over loopback and anything else never over it.
///
/// `routed_from` is the source address the kernel's routing picks for `target` (if known): when
/// it is on an allowed interface, that interface alone is used, as an unrestricted dial would.
/// Otherwise every candidate is tried; bound to an interface without a route to the target,
/// Linux tries the target as if it were on that interface's link.
pub fn dial_plan(
    filter: &InterfaceFilter,
    interfaces: &[Interface],
    target: IpAddr,
    routed_from: Option<IpAddr>,
) -> DialPlan {
    if filter.is_any() {
        return DialPlan::Unbound;
    }
    let target = target.to_canonical();
    let mut devices: Vec<String> = Vec::new();
    for interface in interfaces {
        if !interface.up
            || !filter.allows_interface(interface)
            || interface.loopback != target.is_loopback()
            || !interface
                .addresses
                .iter()
                .any(|a| a.is_ipv4() == target.is_ipv4())
        {
            continue;
        }
        let device = device_of(&interface.name).to_owned();
        if !devices.contains(&device) {
            devices.push(device);
        }
    }
    if let Some(routed) = routed_from
        .and_then(|ip| interface_with(interfaces, ip))
        .map(|i| device_of(&i.name))
        .filter(|device| devices.iter().any(|d| d == device))
    {
        return DialPlan::Devices(vec![routed.to_owned()]);
    }
    if !devices.is_empty() {
        return DialPlan::Devices(devices);
    }
    let family = if target.is_ipv4() { "IPv4" } else { "IPv6" };
    let which = filter
        .names
        .as_ref()
        .map(|n| n.iter().cloned().collect::<Vec<_>>().join(", "))
        .unwrap_or_default();
    let loopback_allowed = interfaces
        .iter()
        .any(|i| i.loopback && filter.allows_interface(i));
    DialPlan::Impossible(if target.is_loopback() && !loopback_allowed {
        format!("{target} is a loopback address, and [mesh] interfaces ({which}) does not name lo")
    } else if target.is_loopback() {
        format!(
            "{target} is a loopback address, and the loopback interface is down or has no {family} address"
        )
    } else {
        format!("no interface of [mesh] interfaces ({which}) is up with an {family} address")
    })
}

/// The addresses that sessions may use: those of allowed interfaces that are up.
pub fn usable_addresses(filter: &InterfaceFilter, interfaces: &[Interface]) -> BTreeSet<IpAddr> {
    interfaces
        .iter()
        .filter(|i| i.up && filter.allows_interface(i))
        .flat_map(|i| i.addresses.iter().copied())
        .collect()
}

/// The interfaces and their addresses, from getifaddrs(3); empty if it fails.
pub fn snapshot() -> Vec<Interface> {
    use nix::net::if_::InterfaceFlags;

    let mut interfaces: BTreeMap<String, Interface> = BTreeMap::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    for ifaddr in addrs {
        let flags = ifaddr.flags;
        let entry = interfaces
            .entry(ifaddr.interface_name.clone())
            .or_insert_with(|| Interface {
                name: ifaddr.interface_name.clone(),
                up: flags.contains(InterfaceFlags::IFF_UP)
                    && flags.contains(InterfaceFlags::IFF_RUNNING),
                loopback: flags.contains(InterfaceFlags::IFF_LOOPBACK),
                addresses: Vec::new(),
            });
        let ip = ifaddr.address.as_ref().and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        });
        if let Some(ip) = ip
            && !entry.addresses.contains(&ip)
        {
            entry.addresses.push(ip);
        }
    }
    let mut list: Vec<Interface> = interfaces.into_values().collect();
    for interface in &mut list {
        interface.addresses.sort();
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<InterfaceName> {
        list.iter()
            .map(|n| InterfaceName::new(n).unwrap())
            .collect()
    }

    fn interface(name: &str, up: bool, addresses: &[&str]) -> Interface {
        Interface {
            name: name.to_owned(),
            up,
            loopback: name == "lo",
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    fn machine() -> Vec<Interface> {
        vec![
            interface("eth0", true, &["192.168.1.20", "fd00::20"]),
            interface("eth0:1", true, &["10.9.0.1"]),
            interface("lo", true, &["127.0.0.1", "::1"]),
            interface("tun0", true, &["10.8.0.5"]),
            interface("wlan0", false, &["192.168.2.7"]),
        ]
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn names_are_checked_like_the_kernel_does() {
        assert_eq!(InterfaceName::new("wlan0").unwrap().as_str(), "wlan0");
        assert!(InterfaceName::new("enx00e04c680001").is_ok()); // 15 bytes
        assert_eq!(InterfaceName::new(""), Err(InterfaceNameError::Empty));
        assert!(matches!(
            InterfaceName::new("enx00e04c6800012"),
            Err(InterfaceNameError::TooLong(_))
        ));
        for bad in [
            "wl an0",
            "eth0/1",
            "eth0:1",
            "tab\t",
            ".",
            "..",
            "new\nline",
        ] {
            assert!(
                matches!(InterfaceName::new(bad), Err(InterfaceNameError::Invalid(_))),
                "{bad:?}"
            );
        }
        // Bytes, not characters: seven 2-byte characters are 14 bytes, six 3-byte ones 18.
        assert!(InterfaceName::new("ééééééé").is_ok());
        assert!(InterfaceName::new("€€€€€€").is_err());
    }

    #[test]
    fn the_mesh_uses_everything_unless_told() {
        let any = InterfaceFilter::mesh(&[]);
        assert!(any.is_any());
        assert!(any.allows("lo", true) && any.allows("tun0", false));
        let some = InterfaceFilter::mesh(&names(&["eth0", "usb0"]));
        assert!(!some.is_any());
        assert!(some.allows("eth0", false));
        assert!(some.allows("eth0:1", false), "a label counts as its device");
        assert!(!some.allows("tun0", false));
        assert!(!some.allows("lo", true), "loopback only when named");
        assert!(InterfaceFilter::mesh(&names(&["lo"])).allows("lo", true));
        assert_eq!(some.missing(&machine()), vec!["usb0".to_owned()]);
        assert!(any.missing(&machine()).is_empty());
    }

    #[test]
    fn discovery_skips_loopback_and_stays_within_the_mesh() {
        let default = InterfaceFilter::discovery(&[], &[]);
        assert!(!default.is_any());
        assert!(default.allows("eth0", false) && default.allows("tun0", false));
        assert!(!default.allows("lo", true));
        let named = InterfaceFilter::discovery(&names(&["lo", "eth0"]), &[]);
        assert!(named.allows("lo", true) && named.allows("eth0", false));
        assert!(!named.allows("tun0", false));
        // The mesh's list bounds discovery; its loopback does not carry over.
        let mesh_only = InterfaceFilter::discovery(&[], &names(&["eth0", "lo"]));
        assert!(mesh_only.allows("eth0", false));
        assert!(!mesh_only.allows("lo", true) && !mesh_only.allows("tun0", false));
        let both = InterfaceFilter::discovery(&names(&["eth0", "tun0"]), &names(&["eth0"]));
        assert!(both.allows("eth0", false) && !both.allows("tun0", false));
        assert_eq!(both.names().unwrap().len(), 1);
    }

    #[test]
    fn incoming_connections_are_judged_by_their_local_address() {
        let list = machine();
        let filter = InterfaceFilter::mesh(&names(&["eth0"]));
        assert_eq!(
            check_local(&filter, &list, ip("192.168.1.20")),
            LocalCheck::Allowed
        );
        assert_eq!(
            check_local(&filter, &list, ip("10.9.0.1")),
            LocalCheck::Allowed
        );
        assert_eq!(
            check_local(&filter, &list, ip("::ffff:192.168.1.20")),
            LocalCheck::Allowed
        );
        assert_eq!(
            check_local(&filter, &list, ip("10.8.0.5")),
            LocalCheck::Refused("tun0".into())
        );
        assert_eq!(
            check_local(&filter, &list, ip("127.0.0.1")),
            LocalCheck::Refused("lo".into())
        );
        assert_eq!(
            check_local(&filter, &list, ip("10.1.1.1")),
            LocalCheck::Unknown
        );
        let any = InterfaceFilter::mesh(&[]);
        assert_eq!(
            check_local(&any, &list, ip("10.1.1.1")),
            LocalCheck::Allowed
        );
    }

    #[test]
    fn dials_go_out_over_allowed_interfaces_of_the_right_family() {
        let list = machine();
        let any = InterfaceFilter::mesh(&[]);
        assert_eq!(
            dial_plan(&any, &list, ip("10.8.0.1"), None),
            DialPlan::Unbound
        );
        let eth = InterfaceFilter::mesh(&names(&["eth0", "wlan0"]));
        // wlan0 is down; eth0 and its labelled address are one device.
        assert_eq!(
            dial_plan(&eth, &list, ip("10.8.0.1"), None),
            DialPlan::Devices(vec!["eth0".into()])
        );
        assert_eq!(
            dial_plan(&eth, &list, ip("2001:db8::1"), None),
            DialPlan::Devices(vec!["eth0".into()])
        );
        let DialPlan::Impossible(why) = dial_plan(&eth, &list, ip("127.0.0.1"), None) else {
            panic!("loopback is not named");
        };
        assert!(why.contains("does not name lo"), "{why}");
        let tun = InterfaceFilter::mesh(&names(&["tun0"]));
        let DialPlan::Impossible(why) = dial_plan(&tun, &list, ip("fd00::1"), None) else {
            panic!("tun0 has no IPv6 address");
        };
        assert!(why.contains("IPv6"), "{why}");
        let with_lo = InterfaceFilter::mesh(&names(&["lo", "tun0"]));
        assert_eq!(
            dial_plan(&with_lo, &list, ip("127.0.0.1"), None),
            DialPlan::Devices(vec!["lo".into()])
        );
        assert_eq!(
            dial_plan(&with_lo, &list, ip("10.0.0.1"), None),
            DialPlan::Devices(vec!["tun0".into()])
        );
        // Where the kernel's route goes over an allowed interface, only that one is used;
        // where it goes over another, every allowed candidate is tried.
        let two = InterfaceFilter::mesh(&names(&["eth0", "tun0"]));
        assert_eq!(
            dial_plan(&two, &list, ip("10.8.0.1"), Some(ip("10.8.0.5"))),
            DialPlan::Devices(vec!["tun0".into()])
        );
        assert_eq!(
            dial_plan(&two, &list, ip("10.9.0.7"), Some(ip("10.9.0.1"))),
            DialPlan::Devices(vec!["eth0".into()])
        );
        assert_eq!(
            dial_plan(&two, &list, ip("192.168.2.9"), Some(ip("192.168.2.7"))),
            DialPlan::Devices(vec!["eth0".into(), "tun0".into()])
        );
        assert_eq!(
            dial_plan(&eth, &list, ip("10.8.0.1"), Some(ip("10.8.0.5"))),
            DialPlan::Devices(vec!["eth0".into()])
        );
    }

    #[test]
    fn usable_addresses_are_those_of_allowed_interfaces_that_are_up() {
        let list = machine();
        let all = usable_addresses(&InterfaceFilter::any(), &list);
        assert!(all.contains(&ip("127.0.0.1")) && all.contains(&ip("10.8.0.5")));
        assert!(!all.contains(&ip("192.168.2.7")), "wlan0 is down");
        let eth = usable_addresses(&InterfaceFilter::mesh(&names(&["eth0"])), &list);
        assert_eq!(
            eth,
            ["192.168.1.20", "fd00::20", "10.9.0.1"]
                .iter()
                .map(|a| ip(a))
                .collect()
        );
    }

    #[test]
    fn the_snapshot_has_loopback() {
        let interfaces = snapshot();
        assert!(interfaces.iter().any(|i| i.loopback), "{interfaces:?}");
    }
}
