//! The connection a helper service (netwatch, discovery) keeps to the mesh service's internal
//! socket. It registers, stays connected, and when the mesh service goes away (restart, crash)
//! reconnects by itself with a short, capped backoff: the socket is local, so retrying is cheap,
//! and under socket activation a connect is queued until the mesh service is back.

use std::path::PathBuf;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::framing::{FrameError, JsonConnection};
use crate::ipc::{FromMesh, ServiceKind, ToMesh};

/// The next event to send, or never if there is no channel (or it closed).
async fn next_event(events: &mut Option<mpsc::Receiver<ToMesh>>) -> Option<ToMesh> {
    match events {
        Some(rx) => match rx.recv().await {
            Some(event) => Some(event),
            None => {
                *events = None;
                None
            }
        },
        None => std::future::pending().await,
    }
}

const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);

/// Keeps `service` registered with the mesh service at `socket` until `shutdown` fires.
pub async fn keep_registered(service: ServiceKind, socket: PathBuf, shutdown: CancellationToken) {
    let (_keep, updates) = watch::channel(None);
    keep_registered_with(service, socket, shutdown, updates, Channels::default()).await;
}

/// Optional extra traffic of a registered service.
#[derive(Default)]
pub struct Channels {
    /// Messages to send while connected (one-off events; state goes through `updates`).
    pub events: Option<mpsc::Receiver<ToMesh>>,
    /// Where to hand what the mesh service says after its welcome.
    pub inbound: Option<mpsc::Sender<FromMesh>>,
}

/// Like `keep_registered`, and also sends the latest value of `updates` after registering (so a
/// restarted mesh service learns the current state) and every new value while connected.
pub async fn keep_registered_with(
    service: ServiceKind,
    socket: PathBuf,
    shutdown: CancellationToken,
    mut updates: watch::Receiver<Option<ToMesh>>,
    mut channels: Channels,
) {
    let mut delay = FIRST_RETRY;
    let mut was_connected = true;
    loop {
        let mut registered = false;
        let attempt = async {
            let stream = UnixStream::connect(&socket).await.map_err(FrameError::Io)?;
            let mut conn = JsonConnection::new(stream);
            conn.send(&ToMesh::Register {
                service,
                pid: std::process::id(),
                version: crate::VERSION.to_owned(),
            })
            .await?;
            match conn.recv::<FromMesh>().await? {
                Some(FromMesh::Welcome { device, .. }) => {
                    tracing::info!(%device, "registered with the mesh service");
                    registered = true;
                }
                Some(FromMesh::Refused { reason }) => {
                    tracing::warn!("the mesh service refused registration: {reason}");
                    return Ok(());
                }
                Some(other) => {
                    tracing::warn!(?other, "the mesh service did not welcome this service");
                    return Ok(());
                }
                None => return Ok(()),
            }
            let current = updates.borrow_and_update().clone();
            if let Some(message) = current {
                conn.send(&message).await?;
            }
            let mut open = true;
            loop {
                tokio::select! {
                    changed = updates.changed(), if open => {
                        if changed.is_err() {
                            // The sender is gone: nothing more will be said; stay registered.
                            open = false;
                            continue;
                        }
                        let current = updates.borrow_and_update().clone();
                        if let Some(message) = current {
                            conn.send(&message).await?;
                        }
                    }
                    event = next_event(&mut channels.events) => {
                        if let Some(event) = event {
                            conn.send(&event).await?;
                        }
                    }
                    message = conn.recv::<FromMesh>() => match message? {
                        Some(message) => match &channels.inbound {
                            Some(inbound) => {
                                let _ = inbound.send(message).await;
                            }
                            None => tracing::debug!(?message, "from mesh"),
                        },
                        None => return Ok::<(), FrameError>(()),
                    },
                }
            }
        };
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            outcome = attempt => outcome,
        };
        if registered {
            // However the connection ended, the next outage starts afresh.
            tracing::info!("lost the connection to the mesh service; reconnecting");
            delay = FIRST_RETRY;
            was_connected = true;
            if let Err(e) = outcome {
                tracing::debug!("the connection ended with: {e}");
            }
        } else if let Err(e) = outcome {
            // Log once per outage, not once per retry.
            if was_connected {
                tracing::info!(
                    socket = %socket.display(),
                    "cannot reach the mesh service ({e}); retrying until it is back"
                );
                was_connected = false;
            } else {
                tracing::debug!("mesh service still unreachable: {e}");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_RETRY);
    }
}
