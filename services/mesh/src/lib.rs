//! The mesh service: owns the device's identity, the roster, the encrypted sessions with other
//! members, the public JSON-RPC socket and the internal `mesh.sock` that the helper services
//! register on; talks to the handler service on demand.

mod admission;
mod api;
mod backoff;
mod delivery;
mod handlers_link;
mod interfaces;
mod listener;
mod liveness;
mod messaging;
mod node;
mod peers;
mod ratelimit;
mod registry;
pub mod roster;
mod routing;
mod session;
pub mod store;
pub mod transport;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cnsprcy::api::WatchEvent;
use cnsprcy::env::DeviceEnv;
use cnsprcy::framing::{BadLine, JsonConnection, JsonLinesCodec};
use cnsprcy::identity::{DeviceName, Identity, effective_name};
use cnsprcy::ipc::{FromMesh, ServiceKind, ToMesh};
use cnsprcy::rpc;
use cnsprcy::service::Running;
use cnsprcy::sockets::{Listening, check_peer_uid, listen};
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use tokio::net::UnixStream;
use tokio::sync::Semaphore;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::handlers_link::HandlersLink;
use crate::messaging::{Delivered, Outbox};
use crate::node::{Node, NodeHandle};
use crate::registry::Registry;
use crate::roster::Roster;

/// Public API connections served at once; more wait in the socket's backlog.
const MAX_API_CONNECTIONS: usize = 64;
/// A helper service must say who it is this quickly after connecting.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// When the service stops, an API connection it accepted already is closed once its client has
/// asked nothing for this long.
const API_DRAIN_IDLE: Duration = Duration::from_millis(500);

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
    let roster = Roster::load(&env.paths.state_dir)?;
    let tcp = listener::bind_all(&env.config.mesh.listen)?;
    let listening: Vec<SocketAddr> = tcp.iter().filter_map(|l| l.local_addr().ok()).collect();
    // Under systemd the sockets come from cnsprcy-mesh.socket, named there.
    let public = listen("public", &env.paths.public_socket())?;
    let internal = listen("internal", &env.paths.mesh_socket())?;
    let outbox = Outbox::load(&env.paths.state_dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot open the outbox in {}: {e}",
            env.paths.state_dir.display()
        )
    })?;
    let delivered = Delivered::load(&env.paths.state_dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot open the delivery record in {}: {e}",
            env.paths.state_dir.display()
        )
    })?;
    let store = Arc::new(open_store(&env.paths.state_dir, &identity).await?);
    let handlers = Arc::new(HandlersLink::new(env.paths.handlers_socket()));
    let (node, handle) = Node::new(
        identity.clone(),
        name.clone(),
        env.config.mesh.clone(),
        listening.clone(),
        roster,
        handlers.clone(),
        outbox,
        delivered,
        store,
    );
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
    let limit = Arc::new(Semaphore::new(MAX_API_CONNECTIONS));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = public.listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        tasks.spawn(refuse_busy(stream).in_current_span());
                        continue;
                    };
                    let (mesh, shutdown) = (mesh.clone(), shutdown.clone());
                    tasks.spawn(async move {
                        serve_api(mesh, stream, shutdown).await;
                        drop(permit);
                    }.in_current_span());
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

/// Tells a client over the connection limit to come back later, instead of leaving it hanging.
async fn refuse_busy(stream: UnixStream) {
    tracing::warn!("{MAX_API_CONNECTIONS} API clients connected; refused one more");
    let mut framed = Framed::new(stream, JsonLinesCodec::default());
    let error = rpc::RpcError::new(
        rpc::code::UNAVAILABLE,
        format!("too many connections ({MAX_API_CONNECTIONS}); try again"),
    );
    let _ = framed
        .send(rpc::to_line(&rpc::Response::failure(
            serde_json::Value::Null,
            error,
        )))
        .await;
}

/// One client of the public API: JSON-RPC requests, one per line, until it hangs up; after
/// `subscribe`, also event notifications.
async fn serve_api(mesh: Arc<Mesh>, stream: UnixStream, shutdown: CancellationToken) {
    let refused = check_peer_uid(&stream).err();
    let mut framed = Framed::new(stream, JsonLinesCodec::default());
    if let Some(reason) = refused {
        tracing::warn!("public socket: {reason}");
        let error = rpc::RpcError::new(rpc::code::PERMISSION_DENIED, reason);
        let _ = framed
            .send(rpc::to_line(&rpc::Response::failure(
                serde_json::Value::Null,
                error,
            )))
            .await;
        return;
    }
    let api = api::Api {
        mesh: &mesh,
        subscribed: Default::default(),
    };
    let mut events: Option<tokio::sync::broadcast::Receiver<WatchEvent>> = None;
    loop {
        let line = if shutdown.is_cancelled() {
            // Stopping. New clients wait in the socket (under systemd, for the next process),
            // but this one was accepted already: what it asks is still answered, until it has
            // been quiet for a moment.
            match tokio::time::timeout(API_DRAIN_IDLE, framed.next()).await {
                Ok(line) => line,
                Err(_) => return,
            }
        } else {
            let next_event = async {
                match events.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => continue,
                event = next_event => {
                    let event = match event {
                        Ok(event) => event,
                        Err(RecvError::Lagged(missed)) => WatchEvent::Lagged { missed },
                        Err(RecvError::Closed) => return,
                    };
                    let note = serde_json::json!({"jsonrpc": "2.0", "method": "event", "params": event});
                    if framed.send(note.to_string()).await.is_err() {
                        return;
                    }
                    continue;
                }
                line = framed.next() => line,
            }
        };
        let answer = match line {
            None => return,
            Some(Err(e)) => {
                tracing::debug!("API client connection failed: {e}");
                return;
            }
            Some(Ok(Err(bad))) => {
                let code = match bad {
                    BadLine::TooLong { .. } => rpc::code::INVALID_REQUEST,
                    BadLine::NotUtf8 => rpc::code::PARSE_ERROR,
                };
                let error = rpc::RpcError::new(code, format!("cannot read request: {bad}"));
                Some(rpc::to_line(&rpc::Response::failure(
                    serde_json::Value::Null,
                    error,
                )))
            }
            Some(Ok(Ok(line))) if line.trim().is_empty() => None,
            Some(Ok(Ok(line))) => rpc::handle_line(&api, &line).await,
        };
        if let Some(answer) = answer
            && framed.send(answer).await.is_err()
        {
            return;
        }
        if events.is_none() && api.subscribed.load(std::sync::atomic::Ordering::Relaxed) {
            events = Some(mesh.node.watch.subscribe());
        }
    }
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
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = next_epoch => continue,
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
