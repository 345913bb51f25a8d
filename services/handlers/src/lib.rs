//! The handler service: listens on `handlers.sock` for the mesh service. It will run handler
//! scripts; for now it answers pings so the mesh service can report it.

use std::time::Duration;

use cnsprcy::env::DeviceEnv;
use cnsprcy::framing::JsonConnection;
use cnsprcy::ipc::{FromHandlers, ToHandlers};
use cnsprcy::service::Running;
use cnsprcy::sockets::{bind_private, check_peer_uid, remove_socket};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Binds `handlers.sock` and starts serving it. Returns once the socket accepts connections.
pub async fn start(env: DeviceEnv, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let socket = env.paths.handlers_socket();
    let listener = bind_private(&socket)?;
    tracing::info!(socket = %socket.display(), "handler service ready");
    Ok(cnsprcy::service::spawn(serve(env, listener, shutdown)))
}

async fn serve(
    env: DeviceEnv,
    listener: UnixListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tasks = TaskTracker::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tasks.spawn(serve_connection(stream, shutdown.clone()).in_current_span());
                }
                Err(e) => {
                    tracing::warn!("cannot accept on the handler socket: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    tasks.close();
    tasks.wait().await;
    remove_socket(&env.paths.handlers_socket());
    tracing::info!("handler service stopped");
    Ok(())
}

async fn serve_connection(stream: UnixStream, shutdown: CancellationToken) {
    if let Err(reason) = check_peer_uid(&stream) {
        tracing::warn!("handler socket: {reason}");
        return;
    }
    let mut conn = JsonConnection::new(stream);
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return,
            message = conn.recv::<ToHandlers>() => message,
        };
        let reply = match message {
            Ok(Some(ToHandlers::Ping)) => FromHandlers::Pong {
                pid: std::process::id(),
                version: cnsprcy::VERSION.to_owned(),
            },
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("handler socket: {e}");
                return;
            }
        };
        if conn.send(&reply).await.is_err() {
            return;
        }
    }
}
