//! Clients of the public API socket: which may connect, and serving one connection.
//!
//! At most `MAX_API_CONNECTIONS` are served at once, of which at most `MAX_SUBSCRIBERS` watch
//! events. When all are taken, a new client takes the place of the one that has been idle longest
//! (connected, but neither waiting for an answer nor subscribed); it answers a request that had
//! come already, and says why it closes in a last line: idle clients cannot lock out the CLI,
//! however many there are. A connection that has
//! not asked anything yet counts as idle only from `FIRST_REQUEST_GRACE` after it came, so that
//! a newcomer (the CLI) is not pushed out by the next ones before its request was read, while
//! others have been idle longer. Only when every connection is busy or subscribed is a client
//! refused, with `UNAVAILABLE` and a rate-limited log line.
//!
//! Nothing a client does can hold the service up: a client that stops reading is dropped once
//! a line has waited `SEND_STALL` for it, and at shutdown at once after `SHUTDOWN_SEND_GRACE`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cnsprcy::api::WatchEvent;
use cnsprcy::framing::{BadLine, JsonLinesCodec};
use cnsprcy::rpc;
use cnsprcy::sockets::check_peer_uid;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::Mesh;
use crate::api;
use crate::ratelimit::RateLimitedLog;

/// Public API connections served at once.
pub const MAX_API_CONNECTIONS: usize = 64;
/// Of those, how many may subscribe to events.
pub const MAX_SUBSCRIBERS: usize = 32;
/// A new connection counts as idle from this long after it came, until it asks something.
pub const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);
/// When the service stops, an API connection it accepted already is closed once its client has
/// asked nothing for this long.
const API_DRAIN_IDLE: Duration = Duration::from_millis(500);
/// A client that has not taken a line it was sent within this time is dropped.
const SEND_STALL: Duration = Duration::from_secs(30);
/// Once the service stops, a line being written gets this much longer.
const SHUTDOWN_SEND_GRACE: Duration = Duration::from_secs(1);
const LOG_INTERVAL: Duration = Duration::from_secs(10);

type Framing = Framed<UnixStream, JsonLinesCodec>;

#[derive(Debug)]
struct Conn {
    /// Since when it has had no call in flight; `None` while it has one. For a connection that
    /// has not asked anything yet, `FIRST_REQUEST_GRACE` after it came (which may be later than
    /// now: it gives way after every other idle one).
    idle_since: Option<Instant>,
    subscribed: bool,
    evict: CancellationToken,
}

/// The connections being served, as the accept loop and each connection see them.
#[derive(Default)]
pub struct Connections {
    table: Mutex<Table>,
    log: Option<RateLimitedLog>,
}

#[derive(Debug, Default)]
struct Table {
    next: u64,
    conns: HashMap<u64, Conn>,
}

/// A connection's place in `Connections`; given back when dropped.
pub struct Ticket {
    connections: Arc<Connections>,
    pub id: u64,
    /// Cancelled when another client took this connection's place.
    pub evicted: CancellationToken,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.connections.table().conns.remove(&self.id);
    }
}

impl Connections {
    pub fn new() -> Self {
        Self {
            table: Mutex::default(),
            log: Some(RateLimitedLog::new(LOG_INTERVAL)),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // Every change is one map operation: a panic elsewhere cannot leave it half-done.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a new client, taking the longest-idle one's if all are taken; `None` when
    /// every connection is busy or subscribed.
    pub fn admit(self: &Arc<Self>, now: Instant) -> Option<Ticket> {
        let mut table = self.table();
        if table.conns.len() >= MAX_API_CONNECTIONS {
            let idlest = table
                .conns
                .iter()
                .filter(|(_, c)| !c.subscribed)
                .filter_map(|(id, c)| c.idle_since.map(|since| (since, *id)))
                .min();
            let (_, id) = idlest?;
            if let Some(conn) = table.conns.remove(&id) {
                conn.evict.cancel();
            }
        }
        let id = table.next;
        table.next += 1;
        let evicted = CancellationToken::new();
        table.conns.insert(
            id,
            Conn {
                idle_since: Some(now + FIRST_REQUEST_GRACE),
                subscribed: false,
                evict: evicted.clone(),
            },
        );
        Some(Ticket {
            connections: self.clone(),
            id,
            evicted,
        })
    }

    /// A call started (`busy`) or ended on connection `id`.
    fn set_busy(&self, id: u64, busy: bool, now: Instant) {
        if let Some(conn) = self.table().conns.get_mut(&id) {
            conn.idle_since = (!busy).then_some(now);
        }
    }

    /// Marks `id` as a subscriber; false when `MAX_SUBSCRIBERS` others are already.
    pub fn subscribe(&self, id: u64) -> bool {
        let mut table = self.table();
        let subscribers = table.conns.values().filter(|c| c.subscribed).count();
        match table.conns.get_mut(&id) {
            Some(conn) if conn.subscribed => true,
            Some(conn) if subscribers < MAX_SUBSCRIBERS => {
                conn.subscribed = true;
                true
            }
            _ => false,
        }
    }

    pub fn is_subscribed(&self, id: u64) -> bool {
        self.table().conns.get(&id).is_some_and(|c| c.subscribed)
    }

    fn warn(&self, kind: &'static str, message: impl FnOnce() -> String) {
        if let Some(log) = &self.log {
            log.warn(kind, message);
        }
    }
}

/// Tells a client over the connection limit to come back later, instead of leaving it hanging.
pub async fn refuse_busy(connections: &Connections, stream: UnixStream) {
    connections.warn("busy", || {
        format!(
            "{MAX_API_CONNECTIONS} API clients connected, each waiting for an answer or subscribed; refused one more"
        )
    });
    let mut framed = Framed::new(stream, JsonLinesCodec::default());
    let error = rpc::RpcError::new(
        rpc::code::UNAVAILABLE,
        format!("too many connections ({MAX_API_CONNECTIONS}, all busy); try again"),
    );
    let line = rpc::to_line(&rpc::Response::failure(serde_json::Value::Null, error));
    let _ = tokio::time::timeout(SEND_STALL, framed.send(line)).await;
}

/// Writes one line; false when the client is gone, took none of it for `SEND_STALL`, or the
/// service is stopping and the line did not go within `SHUTDOWN_SEND_GRACE`.
async fn send_line(framed: &mut Framing, line: String, shutdown: &CancellationToken) -> bool {
    let stopping = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_SEND_GRACE).await;
    };
    tokio::select! {
        sent = tokio::time::timeout(SEND_STALL, framed.send(line)) => matches!(sent, Ok(Ok(()))),
        _ = stopping => false,
    }
}

/// One client of the public API: JSON-RPC requests, one per line, until it hangs up; after
/// `subscribe`, also event notifications; during a streaming call, its notifications.
pub async fn serve_api(
    mesh: Arc<Mesh>,
    stream: UnixStream,
    shutdown: CancellationToken,
    ticket: Ticket,
) {
    let refused = check_peer_uid(&stream).err();
    let mut framed = Framed::new(stream, JsonLinesCodec::default());
    if let Some(reason) = refused {
        mesh.connections
            .warn("uid", || format!("public socket: {reason}"));
        let error = rpc::RpcError::new(rpc::code::PERMISSION_DENIED, reason);
        let line = rpc::to_line(&rpc::Response::failure(serde_json::Value::Null, error));
        send_line(&mut framed, line, &shutdown).await;
        return;
    }
    let (notes_tx, mut notes) = mpsc::unbounded_channel();
    let api = api::Api {
        mesh: &mesh,
        connection: ticket.id,
        notes: notes_tx,
    };
    let mut events: Option<tokio::sync::broadcast::Receiver<WatchEvent>> = None;
    let mut served_after_eviction = false;
    loop {
        let line = if ticket.evicted.is_cancelled() {
            // Gave way to a new client. A request that is there already is still answered (its
            // client sent it before it could know), then the client is told why it is closed.
            let waiting = if served_after_eviction {
                None
            } else {
                framed.next().now_or_never().flatten()
            };
            served_after_eviction = true;
            match waiting {
                Some(line) => Some(line),
                None => {
                    tracing::debug!("closed an idle API connection to make room for a new client");
                    let error = rpc::RpcError::new(
                        rpc::code::UNAVAILABLE,
                        format!(
                            "connection closed to make room for a new client: this one was idle longest of the {MAX_API_CONNECTIONS} served at once; connect again"
                        ),
                    );
                    let line =
                        rpc::to_line(&rpc::Response::failure(serde_json::Value::Null, error));
                    let _ = tokio::time::timeout(SHUTDOWN_SEND_GRACE, framed.send(line)).await;
                    return;
                }
            }
        } else if shutdown.is_cancelled() {
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
                _ = ticket.evicted.cancelled() => continue,
                event = next_event => {
                    let event = match event {
                        Ok(event) => event,
                        Err(RecvError::Lagged(missed)) => WatchEvent::Lagged { missed },
                        Err(RecvError::Closed) => return,
                    };
                    let mut params = serde_json::to_value(&event).unwrap_or_default();
                    if let Some(fields) = params.as_object_mut() {
                        let time = humantime::format_rfc3339_millis(std::time::SystemTime::now());
                        fields.insert("time".into(), time.to_string().into());
                    }
                    let note = serde_json::json!({"jsonrpc": "2.0", "method": "event", "params": params});
                    if !send_line(&mut framed, note.to_string(), &shutdown).await {
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
            Some(Ok(Ok(line))) => {
                mesh.connections.set_busy(ticket.id, true, Instant::now());
                let call = rpc::handle_line(&api, &line);
                tokio::pin!(call);
                // The call's own notifications go out while it runs, and all of them before its
                // answer.
                let answer = loop {
                    tokio::select! {
                        answer = &mut call => break answer,
                        Some(note) = notes.recv() => {
                            if !send_line(&mut framed, note, &shutdown).await {
                                return;
                            }
                        }
                    }
                };
                while let Ok(note) = notes.try_recv() {
                    if !send_line(&mut framed, note, &shutdown).await {
                        return;
                    }
                }
                mesh.connections.set_busy(ticket.id, false, Instant::now());
                answer
            }
        };
        if let Some(answer) = answer
            && !send_line(&mut framed, answer, &shutdown).await
        {
            return;
        }
        if events.is_none() && api.is_subscribed() {
            events = Some(mesh.node.watch.subscribe());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_clients_give_way_and_busy_or_subscribed_ones_do_not() {
        let connections = Arc::new(Connections::default());
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let held: Vec<Ticket> = (0..MAX_API_CONNECTIONS as u64)
            .map(|i| connections.admit(at(i)).expect("room"))
            .collect();
        // Full: the one idle longest (the first) makes room for a newcomer.
        let newcomer = connections.admit(at(100)).expect("an idle one gives way");
        assert!(held[0].evicted.is_cancelled());
        assert!(!held[1].evicted.is_cancelled());
        // Subscribers stay, up to their limit; everyone else is busy: nobody gives way.
        for (i, ticket) in held[1..].iter().enumerate() {
            let subscribed = i < MAX_SUBSCRIBERS && connections.subscribe(ticket.id);
            assert_eq!(subscribed, i < MAX_SUBSCRIBERS);
            if !subscribed {
                connections.set_busy(ticket.id, true, at(200));
            }
        }
        connections.set_busy(newcomer.id, true, at(200));
        assert!(connections.admit(at(300)).is_none());
        // A call ends: that connection may give way again.
        connections.set_busy(newcomer.id, false, at(400));
        let last = connections.admit(at(401)).expect("the idle one gave way");
        assert!(newcomer.evicted.is_cancelled());
        // The first one's ticket is dropped only now (its task ended): nothing is freed twice.
        drop(held);
        assert_eq!(connections.table().conns.len(), 1);
        drop(last);
        assert!(connections.table().conns.is_empty());
    }

    #[test]
    fn a_new_client_gives_way_only_after_those_that_were_idle_between_calls() {
        let connections = Arc::new(Connections::default());
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let held: Vec<Ticket> = (0..MAX_API_CONNECTIONS as u64)
            .map(|i| connections.admit(at(i)).expect("room"))
            .collect();
        // The last one asked something and has been idle since 500 ms; the others, new at 0 to
        // 62 ms, have asked nothing yet: they are taken for idle only from 2 s on.
        let last = held.last().expect("held");
        connections.set_busy(last.id, true, at(400));
        connections.set_busy(last.id, false, at(500));
        let _first = connections.admit(at(600)).expect("room");
        assert!(last.evicted.is_cancelled());
        assert!(held.iter().filter(|t| t.evicted.is_cancelled()).count() == 1);
        // With only new ones left, the one that came first gives way: new clients never lock
        // out the next.
        let _second = connections.admit(at(700)).expect("room");
        assert!(held[0].evicted.is_cancelled());
        assert!(!held[1].evicted.is_cancelled());
    }
}
