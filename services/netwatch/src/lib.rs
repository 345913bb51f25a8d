//! The netwatch service: follows the kernel's link, address and route changes over rtnetlink and
//! tells the mesh service the interfaces and addresses after every burst of changes, so the mesh
//! can drop sessions on an address that is gone and redial at once when a network appears. It
//! holds no keys and opens no internet sockets.

use std::time::Duration;

use cnsprcy::env::DeviceEnv;
use cnsprcy::ipc::{Interface, ServiceKind, ToMesh};
use cnsprcy::mesh_link::keep_registered_with;
use cnsprcy::service::Running;
use futures_util::StreamExt;
use rtnetlink::MulticastGroup;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Changes arriving within this time of each other are reported once: an address change is
/// several netlink messages (address, routes, neighbours).
const DEBOUNCE: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

pub async fn start(env: DeviceEnv, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let socket = env.paths.mesh_socket();
    let (updates, receiver) = watch::channel(Some(ToMesh::Network {
        interfaces: snapshot(),
    }));
    let watcher = watch_netlink(updates, shutdown.clone());
    Ok(cnsprcy::service::spawn(async move {
        tokio::join!(
            keep_registered_with(
                ServiceKind::Netwatch,
                socket,
                shutdown,
                receiver,
                Default::default()
            ),
            watcher
        );
        Ok(())
    }))
}

/// The interfaces and their addresses, from getifaddrs(3).
pub use cnsprcy::netif::snapshot;

/// Subscribes to rtnetlink and publishes a new snapshot after each burst of changes that
/// changed something; reopens the netlink socket if it fails.
async fn watch_netlink(updates: watch::Sender<Option<ToMesh>>, shutdown: CancellationToken) {
    let groups = [
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ];
    let mut delay = Duration::from_secs(1);
    loop {
        match rtnetlink::new_multicast_connection(&groups) {
            Ok((connection, _handle, mut messages)) => {
                let connection = tokio::spawn(connection);
                delay = Duration::from_secs(1);
                // Anything may have changed while no socket was open.
                publish(&updates);
                loop {
                    let message = tokio::select! {
                        _ = shutdown.cancelled() => {
                            connection.abort();
                            return;
                        }
                        message = messages.next() => message,
                    };
                    if message.is_none() {
                        tracing::warn!("the netlink socket closed; reopening it");
                        break;
                    }
                    // Let the rest of the burst arrive, then look once.
                    let quiet = async {
                        while tokio::time::timeout(DEBOUNCE, messages.next())
                            .await
                            .is_ok_and(|m| m.is_some())
                        {}
                    };
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            connection.abort();
                            return;
                        }
                        _ = quiet => {}
                    }
                    publish(&updates);
                }
                connection.abort();
            }
            Err(e) => tracing::warn!("cannot open a netlink socket: {e}; retrying in {delay:?}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(RECONNECT_MAX);
    }
}

fn publish(updates: &watch::Sender<Option<ToMesh>>) {
    let interfaces = snapshot();
    updates.send_if_modified(|current| {
        let next = Some(ToMesh::Network {
            interfaces: interfaces.clone(),
        });
        if *current == next {
            return false;
        }
        tracing::info!(
            interfaces = %describe(&interfaces),
            "network changed"
        );
        *current = next;
        true
    });
}

fn describe(interfaces: &[Interface]) -> String {
    interfaces
        .iter()
        .filter(|i| !i.loopback)
        .map(|i| {
            let addresses: Vec<String> = i.addresses.iter().map(|a| a.to_string()).collect();
            format!(
                "{} {} [{}]",
                i.name,
                if i.up { "up" } else { "down" },
                addresses.join(" ")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
