//! The discovery service: advertises this device on the local network with mDNS-SD
//! (`_cnsprcy._tcp.local.`) and browses for other devices, handing every advertisement it
//! resolves to the mesh service. It holds no keys: the mesh service tells it the name to
//! advertise (one that changes every hour and that only members recognise, see
//! `PublicKey::discovery_name`) and tells members from strangers itself.
//!
//! For pairing on the same network, the mesh service also asks it (`FromMesh::Pairing`) to
//! advertise this device as waiting to be paired (`_cnsprcy-join._tcp.local.`, with the
//! device's name and public key in TXT, while `cnspr manage join` runs without a code) and to
//! browse for such devices (while `cnspr manage induct` runs), reporting each as
//! `ToMesh::JoinCandidate`. Neither the name nor the key is proven by the advertisement; the
//! pairing handshake and its confirmation code are.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use cnsprcy::env::DeviceEnv;
use cnsprcy::ipc::{FromMesh, JoinAdvert, PairingDiscovery, ServiceKind, ToMesh};
use cnsprcy::mesh_link::{Channels, keep_registered_with};
use cnsprcy::netif::InterfaceFilter;
use cnsprcy::service::Running;
use mdns_sd::{
    IfKind, IfPredicate, Receiver, RecvError, ResolvedService, ServiceDaemon, ServiceEvent,
    ServiceInfo,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub const SERVICE_TYPE: &str = "_cnsprcy._tcp.local.";
/// A device waiting to be paired (`cnspr manage join` without a code) advertises this type.
pub const JOIN_SERVICE_TYPE: &str = "_cnsprcy-join._tcp.local.";

pub async fn start(env: DeviceEnv, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let socket = env.paths.mesh_socket();
    let (_state, updates) = watch::channel(None);
    let (events_tx, events) = mpsc::channel(256);
    let (inbound, inbound_rx) = mpsc::channel(16);
    let enabled = env.config.discovery.enabled;
    if !enabled {
        tracing::info!("discovery is off ([discovery] enabled = false)");
    }
    let filter = InterfaceFilter::discovery(
        &env.config.discovery.interfaces,
        &env.config.mesh.interfaces,
    );
    Ok(cnsprcy::service::spawn(async move {
        let link = keep_registered_with(
            ServiceKind::Discovery,
            socket,
            shutdown.clone(),
            updates,
            Channels {
                events: Some(events),
                inbound: Some(inbound),
            },
        );
        if enabled {
            let (_, result) = tokio::join!(link, run_mdns(filter, events_tx, inbound_rx, shutdown));
            result
        } else {
            link.await;
            Ok(())
        }
    }))
}

/// Restricts mDNS to the interfaces `filter` allows. mdns-sd applies the selection to every
/// interface it sees, also to those that appear later (it looks every few seconds), so a named
/// interface that does not exist yet is used once it does.
fn select_interfaces(daemon: &ServiceDaemon, filter: &InterfaceFilter) -> anyhow::Result<()> {
    let failed = |e: mdns_sd::Error| anyhow::anyhow!("cannot choose the mDNS interfaces: {e}");
    daemon.disable_interface(IfKind::All).map_err(failed)?;
    let allowed = filter.clone();
    // By device, so that an address labelled `eth0:1` counts as eth0's.
    let predicate =
        IfPredicate::new(move |interface| allowed.allows(&interface.name, interface.is_loopback()));
    daemon
        .enable_interface(IfKind::Predicate(predicate))
        .map_err(failed)?;
    if filter.names().is_some_and(|n| n.is_empty()) {
        tracing::warn!(
            "discovery uses no interface: [discovery] interfaces and [mesh] interfaces name none in common"
        );
        return Ok(());
    }
    let interfaces = cnsprcy::netif::snapshot();
    let mut used: Vec<&str> = interfaces
        .iter()
        .filter(|i| filter.allows_interface(i))
        .map(|i| cnsprcy::netif::device_of(&i.name))
        .collect();
    used.dedup();
    tracing::info!(interfaces = ?used, "mDNS runs on these interfaces");
    let missing = filter.missing(&interfaces);
    if !missing.is_empty() {
        tracing::warn!(
            "no interface named {} on this device (yet); mDNS runs on it once it appears",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Advertises what the mesh service asks for and reports what it resolves, until shutdown.
async fn run_mdns(
    filter: InterfaceFilter,
    found: mpsc::Sender<ToMesh>,
    mut asked: mpsc::Receiver<FromMesh>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let daemon = ServiceDaemon::new().map_err(|e| anyhow::anyhow!("cannot start mDNS: {e}"))?;
    // Before browsing and advertising: the daemon handles its commands in order, so no query or
    // announcement goes out on an interface the filter leaves out.
    select_interfaces(&daemon, &filter)?;
    // Members are looked for from the start; the mesh service stops it once every member has a
    // session (`FromMesh::Browse`), and asks again when one is missing.
    let mut members = Browse::new(SERVICE_TYPE, "members");
    members.set(&daemon, true);
    let mut advertised: Option<String> = None;
    let mut pairing = Pairing::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            request = asked.recv() => match request {
                Some(FromMesh::Advertise { instance, port }) => {
                    advertise_device(&daemon, &mut advertised, &instance, port);
                }
                Some(FromMesh::Pairing(wish)) => pairing.apply(&daemon, wish),
                Some(FromMesh::Browse { members: wanted }) => members.set(&daemon, wanted),
                _ => {}
            },
            event = members.next_event() => {
                let Ok(event) = event else {
                    members.stopped();
                    continue;
                };
                if let ServiceEvent::ServiceResolved(service) = event {
                    let Some(instance) = service
                        .fullname
                        .strip_suffix(SERVICE_TYPE)
                        .map(|n| n.trim_end_matches('.').to_owned())
                    else {
                        continue;
                    };
                    let addresses = usable_addresses(&service);
                    if addresses.is_empty() {
                        continue;
                    }
                    tracing::debug!(%instance, ?addresses, "resolved a device on the local network");
                    let _ = found.try_send(ToMesh::Discovered { instance, addresses });
                }
            }
            event = pairing.browse.next_event() => match event {
                Ok(ServiceEvent::ServiceResolved(service)) => {
                    if let Some(candidate) = join_candidate(&service) {
                        tracing::debug!(fullname = %service.fullname, "resolved a device waiting to be paired");
                        let _ = found.try_send(candidate);
                    } else {
                        tracing::debug!(
                            fullname = %service.fullname,
                            "ignoring a join advertisement without a usable name, key or address"
                        );
                    }
                }
                Ok(_) => {}
                Err(_) => pairing.browse.stopped(),
            },
        }
    }
    if let Some(old) = advertised {
        unregister(&daemon, &old);
    }
    if let Some((_, old)) = pairing.advertised {
        unregister(&daemon, &old);
    }
    let _ = daemon.shutdown();
    Ok(())
}

/// One mDNS browse that the mesh service turns on and off.
struct Browse {
    service_type: &'static str,
    /// What is looked for, for the log.
    what: &'static str,
    /// Its events, while it runs.
    events: Option<Receiver<ServiceEvent>>,
}

impl Browse {
    fn new(service_type: &'static str, what: &'static str) -> Self {
        Self {
            service_type,
            what,
            events: None,
        }
    }

    /// Starts or stops the browse; does nothing when it already is as `wanted`.
    fn set(&mut self, daemon: &ServiceDaemon, wanted: bool) {
        let what = self.what;
        match (wanted, self.events.is_some()) {
            (true, false) => match daemon.browse(self.service_type) {
                Ok(events) => {
                    tracing::debug!("now looking for {what} on the local network");
                    self.events = Some(events);
                }
                Err(e) => tracing::warn!("cannot look for {what} on the local network: {e}"),
            },
            (false, true) => {
                self.events = None;
                tracing::debug!("not looking for {what} any more");
                if let Err(e) = daemon.stop_browse(self.service_type) {
                    tracing::warn!("cannot stop looking for {what}: {e}");
                }
            }
            _ => {}
        }
    }

    /// The next event; pending forever while the browse is off, so that the loop's other
    /// branches carry on.
    async fn next_event(&self) -> Result<ServiceEvent, RecvError> {
        match &self.events {
            Some(events) => events.recv_async().await,
            None => std::future::pending().await,
        }
    }

    /// mdns-sd ended the browse by itself.
    fn stopped(&mut self) {
        tracing::warn!("mDNS stopped looking for {}", self.what);
        self.events = None;
    }
}

/// Advertises this device as `instance` (the mesh service's hourly name) on `port`, replacing
/// the last advertisement.
fn advertise_device(
    daemon: &ServiceDaemon,
    advertised: &mut Option<String>,
    instance: &str,
    port: u16,
) {
    if let Some(old) = advertised.take() {
        unregister(daemon, &old);
    }
    let host = format!("{instance}.local.");
    let info = ServiceInfo::new(
        SERVICE_TYPE,
        instance,
        &host,
        "",
        port,
        None::<HashMap<String, String>>,
    )
    .map(ServiceInfo::enable_addr_auto);
    match info.and_then(|info| {
        let fullname = info.get_fullname().to_owned();
        daemon.register(info).map(|()| fullname)
    }) {
        Ok(fullname) => {
            tracing::info!(%instance, port, "advertising this device on the local network");
            *advertised = Some(fullname);
        }
        Err(e) => tracing::warn!("cannot advertise this device on the local network: {e}"),
    }
}

fn unregister(daemon: &ServiceDaemon, fullname: &str) {
    if let Err(e) = daemon.unregister(fullname) {
        tracing::warn!("cannot withdraw the mDNS advertisement {fullname}: {e}");
    }
}

/// What discovery does for pairing now, as the mesh service last asked
/// (`FromMesh::Pairing`): advertise this device as waiting to be paired, browse for others that
/// do, both or neither.
struct Pairing {
    /// The join advertisement registered, and its full mDNS name to withdraw it by.
    advertised: Option<(JoinAdvert, String)>,
    /// The browse for `JOIN_SERVICE_TYPE`, on while the mesh service wants it.
    browse: Browse,
}

impl Default for Pairing {
    fn default() -> Self {
        Self {
            advertised: None,
            browse: Browse::new(JOIN_SERVICE_TYPE, "devices waiting to be paired"),
        }
    }
}

impl Pairing {
    /// Makes the advertisement and the browse what `wish` asks for, touching only what changed.
    fn apply(&mut self, daemon: &ServiceDaemon, wish: PairingDiscovery) {
        if self.advertised.as_ref().map(|(advert, _)| advert) != wish.advertise.as_ref() {
            if let Some((_, old)) = self.advertised.take() {
                unregister(daemon, &old);
                tracing::info!("no longer advertising this device as waiting to be paired");
            }
            if let Some(advert) = wish.advertise {
                let registered = join_service_info(&advert).and_then(|info| {
                    let fullname = info.get_fullname().to_owned();
                    daemon
                        .register(info)
                        .map(|()| fullname)
                        .map_err(|e| e.to_string())
                });
                match registered {
                    Ok(fullname) => {
                        tracing::info!(
                            instance = %advert.instance,
                            port = advert.port,
                            "advertising this device as waiting to be paired"
                        );
                        self.advertised = Some((advert, fullname));
                    }
                    Err(e) => {
                        tracing::warn!("cannot advertise this device as waiting to be paired: {e}")
                    }
                }
            }
        }
        self.browse.set(daemon, wish.browse);
    }
}

/// The longest DNS label, and so the longest mDNS instance name or host label, in bytes.
const MAX_LABEL_BYTES: usize = 63;

/// The longest TXT value accepted from an advertisement: one TXT string holds at most 255 bytes.
const MAX_TXT_VALUE_BYTES: usize = 255;

/// The join advertisement for `advert`: `JOIN_SERVICE_TYPE` with the device's name and public
/// key in TXT, on the addresses of the interfaces in use.
fn join_service_info(advert: &JoinAdvert) -> Result<ServiceInfo, String> {
    let instance = &advert.instance;
    if instance.is_empty() || instance.len() > MAX_LABEL_BYTES {
        // mdns-sd would register it, then fail to write it into any packet (a DNS label has at
        // most 63 bytes), and the advertisement would silently never go out.
        return Err(format!(
            "the instance name {instance:?} must have 1 to {MAX_LABEL_BYTES} bytes"
        ));
    }
    // The instance may hold dots (device names can); in a host name they would split the label.
    let host_label: String = instance
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let host = format!("{host_label}.local.");
    let txt = [("name", advert.name.as_str()), ("key", advert.key.as_str())];
    ServiceInfo::new(
        JOIN_SERVICE_TYPE,
        instance,
        &host,
        "",
        advert.port,
        &txt[..],
    )
    .map(ServiceInfo::enable_addr_auto)
    .map_err(|e| e.to_string())
}

/// A device waiting to be paired, from its join advertisement; `None` unless it carries a name,
/// a key and a usable address. The key's format is the mesh service's to check.
fn join_candidate(service: &ResolvedService) -> Option<ToMesh> {
    let name = txt_value(service, "name")?;
    let key = txt_value(service, "key")?;
    let addresses = usable_addresses(service);
    if addresses.is_empty() {
        return None;
    }
    Some(ToMesh::JoinCandidate {
        name,
        key,
        addresses,
    })
}

/// The TXT value of `key`, if present, not empty, UTF-8 and at most 255 bytes.
fn txt_value(service: &ResolvedService, key: &str) -> Option<String> {
    let value = service.get_property_val(key)??;
    if value.is_empty() || value.len() > MAX_TXT_VALUE_BYTES {
        return None;
    }
    std::str::from_utf8(value).ok().map(str::to_owned)
}

/// The addresses of `service` the mesh service can dial: not loopback and not IPv6 link-local,
/// which needs a scope (the interface) that a `SocketAddr` in this list does not carry.
fn usable_addresses(service: &ResolvedService) -> Vec<SocketAddr> {
    let mut addresses: Vec<SocketAddr> = service
        .addresses
        .iter()
        .map(|ip| ip.to_ip_addr())
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_loopback(),
            IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
        })
        .map(|ip| SocketAddr::new(ip, service.port))
        .collect();
    // The set has no order; a stable one keeps repeated reports alike.
    addresses.sort();
    addresses
}

#[cfg(test)]
mod tests {
    use mdns_sd::{IntoTxtProperties, TxtProperty};

    use super::*;

    fn advert() -> JoinAdvert {
        JoinAdvert {
            instance: "laptop.home-3f9a1c".to_owned(),
            port: 7332,
            name: "laptop.home".to_owned(),
            key: "k".repeat(44),
        }
    }

    /// What a browser resolves from `info` when its addresses are `addresses`.
    fn resolved(info: ServiceInfo, addresses: &[&str]) -> ResolvedService {
        let mut service = info.as_resolved_service();
        for address in addresses {
            let ip: IpAddr = address.parse().expect("test addresses parse");
            service.addresses.insert(ip.into());
        }
        service
    }

    fn with_txt(properties: &[(&str, &str)]) -> ServiceInfo {
        ServiceInfo::new(
            JOIN_SERVICE_TYPE,
            "joiner",
            "joiner.local.",
            "",
            7332,
            properties,
        )
        .expect("a valid service")
    }

    #[test]
    fn only_addresses_the_mesh_can_dial_are_kept() {
        let info = ServiceInfo::new(
            SERVICE_TYPE,
            "x",
            "x.local.",
            "10.1.2.3,127.0.0.1,::1,fe80::1,febf::2,2001:db8::5,192.168.7.9",
            7332,
            None::<HashMap<String, String>>,
        )
        .expect("a valid service");
        let addresses: Vec<String> = usable_addresses(&info.as_resolved_service())
            .iter()
            .map(SocketAddr::to_string)
            .collect();
        assert_eq!(
            addresses,
            ["10.1.2.3:7332", "192.168.7.9:7332", "[2001:db8::5]:7332"]
        );
    }

    #[test]
    fn a_join_advertisement_resolves_to_the_candidate_it_advertises() {
        let advert = advert();
        let info = join_service_info(&advert).expect("a valid advertisement");
        assert_eq!(info.get_type(), JOIN_SERVICE_TYPE);
        assert_eq!(info.get_port(), 7332);
        assert!(info.is_addr_auto());
        // The dots of the device name stay in the instance, escaped, but not in the host name.
        assert_eq!(
            info.get_fullname(),
            "laptop\\.home-3f9a1c._cnsprcy-join._tcp.local."
        );
        assert_eq!(info.get_hostname(), "laptop-home-3f9a1c.local.");
        let candidate = join_candidate(&resolved(info, &["10.1.2.3", "fe80::1"]));
        assert_eq!(
            candidate,
            Some(ToMesh::JoinCandidate {
                name: advert.name,
                key: advert.key,
                addresses: vec!["10.1.2.3:7332".parse().expect("parses")],
            })
        );
    }

    #[test]
    fn advertisements_that_mdns_could_not_carry_are_refused() {
        let long_instance = JoinAdvert {
            instance: "x".repeat(64),
            ..advert()
        };
        let e = join_service_info(&long_instance).expect_err("64 bytes is one too many");
        assert!(e.contains("1 to 63 bytes"), "{e}");
        let empty_instance = JoinAdvert {
            instance: String::new(),
            ..advert()
        };
        assert!(join_service_info(&empty_instance).is_err());
        // "name=" and 251 bytes make a TXT string of 256 bytes.
        let long_name = JoinAdvert {
            name: "n".repeat(251),
            ..advert()
        };
        assert!(join_service_info(&long_name).is_err());
        let longest_name = JoinAdvert {
            name: "n".repeat(250),
            ..advert()
        };
        assert!(join_service_info(&longest_name).is_ok());
    }

    #[test]
    fn join_advertisements_without_a_name_key_or_address_are_ignored() {
        let key = "k".repeat(44);
        let complete = [("name", "phone"), ("key", key.as_str())];
        assert!(join_candidate(&resolved(with_txt(&complete), &["10.1.2.3"])).is_some());
        // No address the mesh can dial.
        assert_eq!(
            join_candidate(&resolved(with_txt(&complete), &["fe80::1", "127.0.0.1"])),
            None
        );
        for txt in [
            &[("name", "phone")][..],
            &[("key", key.as_str())],
            &[("name", ""), ("key", key.as_str())],
            &[("name", "phone"), ("key", "")],
        ] {
            assert_eq!(
                join_candidate(&resolved(with_txt(txt), &["10.1.2.3"])),
                None,
                "{txt:?}"
            );
        }
        // A key without a value, and values that are not UTF-8 or longer than a TXT string can
        // be (mdns-sd decodes no such value, but the limit does not rest on that).
        let name = || TxtProperty::from(("name", "phone"));
        let key = || TxtProperty::from(("key", [b'k'; 44]));
        for properties in [
            vec![name(), TxtProperty::from("key")],
            vec![TxtProperty::from(("name", [0xff, 0xfe])), key()],
            vec![name(), TxtProperty::from(("key", [b'k'; 256]))],
        ] {
            let mut service = resolved(with_txt(&[]), &["10.1.2.3"]);
            service.txt_properties = properties.clone().into_txt_properties();
            assert_eq!(join_candidate(&service), None, "{properties:?}");
        }
        // The longest value a TXT string can hold is taken.
        let mut service = resolved(with_txt(&[]), &["10.1.2.3"]);
        service.txt_properties =
            vec![name(), TxtProperty::from(("key", [b'k'; 255]))].into_txt_properties();
        assert!(join_candidate(&service).is_some());
    }
}
