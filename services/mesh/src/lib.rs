//! The mesh service: owns the device's identity, the roster, the encrypted sessions with other
//! members, the public JSON-RPC socket and the internal `mesh.sock` that the helper services
//! register on; talks to the handler service on demand.

mod admission;
mod api;
mod api_conn;
pub mod backoff;
pub mod core;
mod det;
#[cfg(test)]
mod fuzz;
mod handlers_link;
mod inbox;
mod interfaces;
mod listener;
pub mod liveness;
pub mod messaging;
mod node;
pub mod ordering;
mod pairing;
pub mod peers;
mod persist;
mod ratelimit;
mod registry;
pub mod roster;
pub mod routing;
mod session;
pub mod store;
pub mod transport;
mod udp_heartbeats;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use pairing::{CONFIRM_TIMEOUT, EXCHANGE_TIMEOUT, MAX_WAIT as MAX_PAIR_WAIT};

use cnsprcy::env::DeviceEnv;
use cnsprcy::framing::JsonConnection;
use cnsprcy::identity::{DeviceName, Identity, effective_name};
use cnsprcy::ipc::{FromMesh, ServiceKind, ToMesh};
use cnsprcy::service::Running;
use cnsprcy::sockets::{Listening, check_peer_uid, listen};
use std::net::SocketAddr;
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::handlers_link::HandlersLink;
use crate::node::{Node, NodeHandle, NodeSetup};
use crate::registry::Registry;

/// A helper service must say who it is this quickly after connecting.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);

/// What the API handlers and the internal socket share.
struct Mesh {
    env: DeviceEnv,
    identity: Arc<Identity>,
    name: DeviceName,
    /// Where this device accepts sessions (the bound addresses, ports resolved).
    listening: Vec<SocketAddr>,
    node: NodeHandle,
    started: Instant,
    registry: Registry,
    handlers: Arc<HandlersLink>,
    connections: Arc<api_conn::Connections>,
}

/// Loads (or creates) the identity, loads the roster, binds the TCP and UNIX sockets and starts
/// serving them. Returns once every socket accepts connections.
pub async fn start(env: DeviceEnv, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let (identity, created) = Identity::load_or_create(&env.paths.state_dir)?;
    let identity = Arc::new(identity);
    let name = effective_name(env.config.name.as_ref(), &env.paths.state_dir)?;
    if created {
        tracing::info!(
            id = %identity.device_id(),
            dir = %env.paths.state_dir.display(),
            "created a new identity for this device"
        );
    }
    let members = roster::load(&env.paths.state_dir)?;
    let tcp = listener::bind_all(&env.config.mesh.listen)?;
    let listening: Vec<SocketAddr> = tcp.iter().filter_map(|l| l.local_addr().ok()).collect();
    // Heartbeats over UDP leave by whatever route the kernel picks, so not where sessions are
    // kept to some interfaces.
    let udp = if env.config.mesh.interfaces.is_empty() {
        udp_heartbeats::Sockets::bind(&listening)
    } else {
        udp_heartbeats::Sockets::none()
    };
    // Under systemd the sockets come from cnsprcy-mesh.socket, named there.
    let public = listen("public", &env.paths.public_socket())?;
    let internal = listen("internal", &env.paths.mesh_socket())?;
    let (files, restored) = persist::Files::open(&env.paths.state_dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot open the outbox or the delivery record in {}: {e}",
            env.paths.state_dir.display()
        )
    })?;
    let store = Arc::new(open_store(&env.paths.state_dir, &identity).await?);
    let handlers = Arc::new(HandlersLink::new(env.paths.handlers_socket()));
    let (node, handle) = Node::new(NodeSetup {
        identity: identity.clone(),
        name: name.clone(),
        config: env.config.mesh.clone(),
        listening: listening.clone(),
        members,
        handlers: handlers.clone(),
        files,
        restored,
        store,
        udp,
    })
    .map_err(|e| anyhow::anyhow!("cannot start the writer thread: {e}"))?;
    tracing::info!(
        %name,
        id = %identity.device_id(),
        listen = ?listening,
        socket = %env.paths.public_socket().display(),
        "mesh service ready"
    );
    let mesh = Arc::new(Mesh {
        handlers,
        env,
        identity,
        name,
        listening,
        node: handle.clone(),
        started: Instant::now(),
        registry: Registry::default(),
        connections: Arc::new(api_conn::Connections::new()),
    });
    let serving = async move {
        let tasks = TaskTracker::new();
        // The node outlives the API: on shutdown the API first answers what its clients already
        // asked (a restart under systemd must fail no call), then the node stops.
        let node_stop = CancellationToken::new();
        tasks.spawn(node.run(node_stop.clone()));
        for tcp in tcp {
            tasks.spawn(listener::accept_sessions(
                tcp,
                handle.clone(),
                shutdown.clone(),
            ));
        }
        tasks.close();
        let result = serve(mesh, public, internal, shutdown).await;
        node_stop.cancel();
        tasks.wait().await;
        result
    };
    Ok(cnsprcy::service::spawn(serving))
}

/// Opens the store; a `cnspr db get` reading it while the daemon was down may hold it for a
/// moment, so a locked store is retried for a few seconds.
async fn open_store(
    state_dir: &std::path::Path,
    identity: &Identity,
) -> anyhow::Result<store::Store> {
    let own = *identity.public_key().as_bytes();
    let mut tries = 0;
    loop {
        let dir = state_dir.to_owned();
        let opened = tokio::task::spawn_blocking(move || store::Store::open(&dir, own)).await?;
        match opened {
            Ok(store) => return Ok(store),
            Err(store::StorageError::Locked { .. }) if tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(anyhow::anyhow!("cannot open the store: {e}")),
        }
    }
}

async fn serve(
    mesh: Arc<Mesh>,
    public: Listening,
    internal: Listening,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tasks = TaskTracker::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = public.listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Some(ticket) = mesh.connections.admit(Instant::now()) else {
                        let mesh = mesh.clone();
                        tasks.spawn(async move {
                            api_conn::refuse_busy(&mesh.connections, stream).await;
                        }.in_current_span());
                        continue;
                    };
                    let (mesh, shutdown) = (mesh.clone(), shutdown.clone());
                    tasks.spawn(api_conn::serve_api(mesh, stream, shutdown, ticket).in_current_span());
                }
                Err(e) => accept_failed("public", e).await,
            },
            accepted = internal.listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (mesh, shutdown) = (mesh.clone(), shutdown.clone());
                    tasks.spawn(serve_internal(mesh, stream, shutdown).in_current_span());
                }
                Err(e) => accept_failed("internal", e).await,
            },
        }
    }
    tasks.close();
    tasks.wait().await;
    public.remove_file(&mesh.env.paths.public_socket());
    internal.remove_file(&mesh.env.paths.mesh_socket());
    tracing::info!("mesh service stopped");
    Ok(())
}

/// accept() fails for reasons like running out of file descriptors; pause instead of spinning.
async fn accept_failed(which: &str, e: std::io::Error) {
    tracing::warn!("cannot accept on the {which} socket: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// One helper service on `mesh.sock`: it registers, then stays connected while it runs.
async fn serve_internal(mesh: Arc<Mesh>, stream: UnixStream, shutdown: CancellationToken) {
    if let Err(reason) = check_peer_uid(&stream) {
        tracing::warn!("internal socket: {reason}");
        return;
    }
    let mut conn = JsonConnection::new(stream);
    let first = tokio::time::timeout(REGISTER_TIMEOUT, conn.recv::<ToMesh>()).await;
    let (service, pid, version) = match first {
        Ok(Ok(Some(ToMesh::Register {
            service,
            pid,
            version,
        }))) => (service, pid, version),
        Ok(Ok(Some(_))) => {
            tracing::warn!("internal socket: a client spoke before registering");
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::warn!("internal socket: bad registration: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!("internal socket: a client connected but did not register in time");
            return;
        }
    };
    let welcome = FromMesh::Welcome {
        device: mesh.name.clone(),
        version: cnsprcy::VERSION.to_owned(),
    };
    if conn.send(&welcome).await.is_err() {
        return;
    }
    let ticket = mesh.registry.register(service, pid);
    tracing::info!(%service, pid, %version, "service registered");
    let mut advertised_epoch = None;
    let mut pairing_wish = mesh.node.pairing.discovery_wish();
    // A discovery service that (re)registers mid-pairing learns what to do at once.
    pairing_wish.mark_changed();
    let mut browse_wish = mesh.node.browse.subscribe();
    browse_wish.mark_changed();
    loop {
        // Discovery advertises a name that changes every epoch: tell it the current one.
        if service == ServiceKind::Discovery {
            let epoch = cnsprcy::identity::discovery_epoch();
            if advertised_epoch != Some(epoch) {
                let advertise = FromMesh::Advertise {
                    instance: mesh.identity.public_key().discovery_name(epoch),
                    port: mesh.listening.first().map_or(0, |a| a.port()),
                };
                if conn.send(&advertise).await.is_err() {
                    break;
                }
                advertised_epoch = Some(epoch);
            }
        }
        let next_epoch = tokio::time::sleep(Duration::from_secs(
            cnsprcy::identity::DISCOVERY_EPOCH_SECS
                - std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() % cnsprcy::identity::DISCOVERY_EPOCH_SECS),
        ));
        let pairing_changed = async {
            if service == ServiceKind::Discovery {
                pairing_wish.changed().await
            } else {
                std::future::pending().await
            }
        };
        let browse_changed = async {
            if service == ServiceKind::Discovery {
                browse_wish.changed().await
            } else {
                std::future::pending().await
            }
        };
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = next_epoch => continue,
            changed = pairing_changed => {
                if changed.is_err() {
                    break;
                }
                let wish = pairing_wish.borrow_and_update().clone();
                if conn.send(&FromMesh::Pairing(wish)).await.is_err() {
                    break;
                }
                continue;
            }
            changed = browse_changed => {
                if changed.is_err() {
                    break;
                }
                let members = *browse_wish.borrow_and_update();
                if conn.send(&FromMesh::Browse { members }).await.is_err() {
                    break;
                }
                continue;
            }
            message = conn.recv::<ToMesh>() => message,
        };
        match message {
            Ok(Some(ToMesh::Discovered {
                instance,
                addresses,
            })) if service == ServiceKind::Discovery => {
                let _ = mesh
                    .node
                    .requests
                    .send(node::Request::Discovered {
                        instance,
                        addresses,
                    })
                    .await;
            }
            Ok(Some(ToMesh::JoinCandidate {
                name,
                key,
                addresses,
            })) if service == ServiceKind::Discovery => {
                mesh.node
                    .pairing
                    .candidate(&mesh.node, name, &key, addresses);
            }
            Ok(Some(ToMesh::Network { interfaces })) if service == ServiceKind::Netwatch => {
                let _ = mesh
                    .node
                    .requests
                    .send(node::Request::Network(interfaces))
                    .await;
            }
            Ok(Some(other)) => tracing::debug!(%service, ?other, "unexpected message"),
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(%service, "internal connection failed: {e}");
                break;
            }
        }
    }
    if mesh.registry.unregister(ticket) && !shutdown.is_cancelled() {
        tracing::info!(%service, pid, "service disconnected");
    }
}
