//! The TCP side: listening sockets, and the accept path that runs the Noise handshake for each
//! connection before the node hears of it. Everything here faces strangers, so work per
//! connection is bounded (handshakes at once, shared out by source address; handshake time) and
//! logging is rate-limited.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admission::{Admit, Slots, Source, Ticket};

use crate::liveness::Role;
use crate::node::{Event, NodeHandle};
use crate::ratelimit::RateLimitedLog;
use crate::transport;

/// Handshakes in progress at once. Beyond, a connection from a source holding fewer slots than
/// the busiest takes over the busiest one's oldest slot; others are closed at once.
pub const MAX_HANDSHAKES: usize = 64;
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Binds every address. One that fails is logged and skipped (a default `[::]` on a machine
/// without IPv6, say); none at all is an error.
pub fn bind_all(addresses: &[SocketAddr]) -> anyhow::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    let mut errors = Vec::new();
    for addr in addresses {
        match bind(*addr) {
            Ok(listener) => listeners.push(listener),
            Err(e) => {
                tracing::warn!("cannot listen on {addr}: {e}");
                errors.push(format!("{addr}: {e}"));
            }
        }
    }
    if listeners.is_empty() && !addresses.is_empty() {
        bail!(
            "cannot listen on any of the [mesh] listen addresses ({}); is another program using the port?",
            errors.join("; ")
        );
    }
    Ok(listeners)
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // `[::]` beside `0.0.0.0` on the same port: each family gets its own socket.
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// The handshake slots of one listening socket, with a way to cancel each running handshake.
#[derive(Default)]
struct Handshakes {
    slots: Option<Slots>,
    running: HashMap<Ticket, CancellationToken>,
}

impl Handshakes {
    /// A slot for a connection from `source`, and the token that cancels its handshake; `None`
    /// when it is refused.
    fn admit(&mut self, source: Source) -> Option<(Ticket, CancellationToken)> {
        let slots = self.slots.get_or_insert_with(|| Slots::new(MAX_HANDSHAKES));
        let ticket = match slots.admit(source) {
            Admit::Admitted(ticket) => ticket,
            Admit::Evicted { ticket, evicted } => {
                if let Some(cancel) = self.running.remove(&evicted) {
                    cancel.cancel();
                }
                ticket
            }
            Admit::Refused => return None,
        };
        let cancel = CancellationToken::new();
        self.running.insert(ticket, cancel.clone());
        Some((ticket, cancel))
    }

    fn release(&mut self, ticket: Ticket) {
        self.running.remove(&ticket);
        if let Some(slots) = &mut self.slots {
            slots.release(ticket);
        }
    }
}

/// Gives the slot back when the handshake task ends, however it ends.
struct SlotGuard {
    handshakes: Arc<Mutex<Handshakes>>,
    ticket: Ticket,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        lock(&self.handshakes).release(self.ticket);
    }
}

fn lock(handshakes: &Mutex<Handshakes>) -> std::sync::MutexGuard<'_, Handshakes> {
    // The bookkeeping stays consistent between statements; a panic elsewhere leaves it usable.
    handshakes.lock().unwrap_or_else(|p| p.into_inner())
}

pub async fn accept_sessions(listener: TcpListener, node: NodeHandle, shutdown: CancellationToken) {
    let handshakes = Arc::new(Mutex::new(Handshakes::default()));
    let log = Arc::new(RateLimitedLog::new(LOG_INTERVAL));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, addr) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                log.warn("accept", || format!("cannot accept a connection: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // `[mesh] interfaces`: a connection that reached this device at an address of another
        // interface is closed before anything is read from it.
        if let Ok(local) = stream.local_addr()
            && let Err(why) = node.interfaces.check_local(local.ip())
        {
            log.warn("interface", || {
                format!("refused a connection from {addr}: {why}")
            });
            continue;
        }
        let admitted = lock(&handshakes).admit(Source::of(addr.ip()));
        let Some((ticket, evicted)) = admitted else {
            log.warn("busy", || {
                format!(
                    "{MAX_HANDSHAKES} handshakes in progress, {} holding its share; dropped a connection from {addr}",
                    addr.ip()
                )
            });
            continue;
        };
        let slot = SlotGuard {
            handshakes: handshakes.clone(),
            ticket,
        };
        let (node, log, shutdown) = (node.clone(), log.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            let local = stream.local_addr().ok();
            // The session counts once the initiator's first message arrived: whoever replays a
            // recorded handshake gets this far, but cannot encrypt that message.
            let handshake = async {
                let mut session = transport::respond(
                    stream,
                    &node.identity,
                    // A disabled device completes the handshake too: it is told, below.
                    |k| node.is_member(k) || node.disabled_entry(k).is_some(),
                    &node.payload(),
                )
                .await?;
                // An inductor waits for this device's nonce before it says more (and one that
                // replays a recorded handshake learns nothing from it).
                if session.remote.inducting.is_some() && !node.is_member(&session.remote_key) {
                    return Ok((session, None));
                }
                let first =
                    tokio::time::timeout(transport::HANDSHAKE_TIMEOUT, session.reader.recv())
                        .await
                        .map_err(|_| transport::TransportError::HandshakeTimeout)??;
                Ok::<_, transport::TransportError>((session, first))
            };
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = evicted.cancelled() => {
                    log.warn("evicted", || {
                        format!("all {MAX_HANDSHAKES} handshake slots taken; dropped the oldest pending handshake from {addr} to make room for another source")
                    });
                    return;
                }
                outcome = handshake => outcome,
            };
            let outcome = match outcome {
                Ok((session, first)) if !node.is_member(&session.remote_key) => {
                    match admit_non_member(session, &node, addr, &log).await {
                        Some(session) => Ok((session, first)),
                        None => return,
                    }
                }
                other => other,
            };
            match outcome {
                Ok((session, first)) => {
                    let _ = node
                        .events
                        .send(Event::Established {
                            session: Box::new(session),
                            role: Role::Responder,
                            addr,
                            local,
                            first,
                        })
                        .await;
                }
                Err(transport::TransportError::NotAMember(key)) => {
                    log.warn("knock", || {
                        format!(
                            "dropped a handshake from {addr}: device {} is not a member (`cnspr status` lists it)",
                            key.device_id()
                        )
                    });
                    let _ = node.events.send(Event::Knock { key, addr }).await;
                }
                Err(e) => {
                    log.warn("handshake", || {
                        format!("dropped a connection from {addr}: {e}")
                    });
                }
            }
        });
    }
}

/// A device that is not a member completed a handshake. One inducting this device goes to the
/// pairing under way (if any); one claiming an open invitation goes on to the core (which
/// checks again and uses the invitation up); otherwise the device is told why not (disabled,
/// or the invitation's refusal) and the connection ends here.
async fn admit_non_member(
    mut session: transport::Session,
    node: &NodeHandle,
    addr: SocketAddr,
    log: &RateLimitedLog,
) -> Option<transport::Session> {
    let id = session.remote_key.device_id();
    if session.remote.inducting.is_some() {
        node.pairing.offer(session, addr);
        return None;
    }
    // An open invitation lets in a device disabled before, too: that is how it comes back.
    let refusal = match &session.remote.joining {
        Some(joining) => match node.join_refusal(&joining.secret) {
            None => return Some(session),
            Some(refusal) => refusal,
        },
        None => {
            if let Some(entry) = node.disabled_entry(&session.remote_key) {
                // A device disabled while it was away: it learns so, and forgets the mesh.
                log.warn("disabled", || {
                    format!("told device {id} at {addr} that it was disabled")
                });
                let told = cnsprcy::wire::Message::RosterEntries {
                    entries: vec![entry],
                    answer: false,
                };
                let _ =
                    tokio::time::timeout(transport::HANDSHAKE_TIMEOUT, session.writer.send(&told))
                        .await;
            }
            // Otherwise a member removed since its handshake began.
            return None;
        }
    };
    log.warn("join", || {
        format!(
            "refused device {id} at {addr} joining: {}",
            refusal.explain()
        )
    });
    let _ = node.watch.send(cnsprcy::api::WatchEvent::JoinRefused {
        id,
        address: addr,
        reason: refusal.as_str().to_owned(),
    });
    let refused = cnsprcy::wire::Message::JoinRefused(refusal);
    let _ = tokio::time::timeout(transport::HANDSHAKE_TIMEOUT, session.writer.send(&refused)).await;
    None
}
