//! The discovery service: advertises this device on the local network with mDNS-SD
//! (`_cnsprcy._tcp.local.`) and browses for other devices, handing every advertisement it
//! resolves to the mesh service. It holds no keys: the mesh service tells it the name to
//! advertise (one that changes every hour and that only members recognise, see
//! `PublicKey::discovery_name`) and tells members from strangers itself.

use std::net::SocketAddr;

use cnsprcy::env::DeviceEnv;
use cnsprcy::ipc::{FromMesh, ServiceKind, ToMesh};
use cnsprcy::mesh_link::{Channels, keep_registered_with};
use cnsprcy::netif::InterfaceFilter;
use cnsprcy::service::Running;
use mdns_sd::{IfKind, IfPredicate, ServiceDaemon, ServiceEvent, ServiceInfo};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub const SERVICE_TYPE: &str = "_cnsprcy._tcp.local.";

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
    let browse = daemon
        .browse(SERVICE_TYPE)
        .map_err(|e| anyhow::anyhow!("cannot browse for {SERVICE_TYPE}: {e}"))?;
    let mut advertised: Option<String> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            request = asked.recv() => {
                let Some(FromMesh::Advertise { instance, port }) = request else {
                    continue;
                };
                if let Some(old) = advertised.take() {
                    let _ = daemon.unregister(&old);
                }
                let host = format!("{instance}.local.");
                let info = ServiceInfo::new(SERVICE_TYPE, &instance, &host, "", port, None::<std::collections::HashMap<String, String>>)
                    .map(ServiceInfo::enable_addr_auto);
                match info {
                    Ok(info) => {
                        let fullname = info.get_fullname().to_owned();
                        match daemon.register(info) {
                            Ok(()) => {
                                tracing::info!(%instance, port, "advertising this device on the local network");
                                advertised = Some(fullname);
                            }
                            Err(e) => tracing::warn!("cannot advertise: {e}"),
                        }
                    }
                    Err(e) => tracing::warn!("cannot advertise: {e}"),
                }
            }
            event = browse.recv_async() => {
                let Ok(event) = event else {
                    tracing::warn!("mDNS browsing stopped");
                    break;
                };
                if let ServiceEvent::ServiceResolved(service) = event {
                    let Some(instance) = service
                        .fullname
                        .strip_suffix(SERVICE_TYPE)
                        .map(|n| n.trim_end_matches('.').to_owned())
                    else {
                        continue;
                    };
                    let addresses: Vec<SocketAddr> = service
                        .addresses
                        .iter()
                        .map(|ip| SocketAddr::new(ip.to_ip_addr(), service.port))
                        // Link-local IPv6 needs a scope this list does not carry.
                        .filter(|a| match a.ip() {
                            std::net::IpAddr::V4(v4) => !v4.is_loopback(),
                            std::net::IpAddr::V6(v6) => {
                                !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80
                            }
                        })
                        .collect();
                    if addresses.is_empty() {
                        continue;
                    }
                    tracing::debug!(%instance, ?addresses, "resolved a device on the local network");
                    let _ = found.try_send(ToMesh::Discovered { instance, addresses });
                }
            }
        }
    }
    if let Some(old) = advertised {
        let _ = daemon.unregister(&old);
    }
    let _ = daemon.shutdown();
    Ok(())
}
