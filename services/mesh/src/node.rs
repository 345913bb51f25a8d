//! The node: one task that owns the roster, the peer table and the live sessions. Dialling,
//! accepting and running sessions happen in other tasks, which report here as `Event`s; the API
//! asks through `Request`s. Keeping all state in one task keeps its rules in one place.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use cnsprcy::api::{MemberInfo, PeerInfo, PeerStatus, PingResult, SendResult, WatchEvent};
use cnsprcy::config::MeshConfig;
use cnsprcy::identity::{DeviceName, Identity, PublicKey};
use cnsprcy::ipc::{Interface, RunResult};
use cnsprcy::netif::{DialPlan, InterfaceFilter};
use cnsprcy::rpc::RpcError;
use cnsprcy::wire::{
    self, Data, HandshakePayload, Hello, MAX_RELAY_HOPS, Message, MessageId, Neighbor, Relay,
    RelayBody,
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::handlers_link::HandlersLink;
use crate::interfaces::{self, Interfaces};
use crate::liveness::Role;
use crate::messaging::{Delivered, Outbox, Wait};
use crate::peers::{PeerTable, Reach};
use crate::roster::{Member, Roster, RosterError};
use crate::session::{Outbound, SessionTask};
use crate::transport::{self, Session};

/// How long one TCP connect may take before that address counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pings not answered within this time are forgotten.
const PING_FORGET: Duration = Duration::from_secs(60);
/// An RTT change larger than this fraction is announced to peers (for their relay choice).
const RTT_ANNOUNCE_CHANGE: f64 = 0.25;
/// ... and by more than this.
const RTT_ANNOUNCE_FLOOR: Duration = Duration::from_millis(2);

/// Error codes of the peer methods (JSON-RPC implementation-defined range).
pub mod code {
    pub const NOT_FOUND: i64 = -32004;
    pub const CONFLICT: i64 = -32005;
    pub const UNREACHABLE: i64 = -32006;
    pub const STORAGE: i64 = -32007;
    /// `send`: the outbox holds as much as it may; nothing was sent.
    pub const OUTBOX_FULL: i64 = -32008;
}

/// What the tasks around the node report.
pub enum Event {
    /// A handshake completed, dialled by us (`Role::Initiator`) or accepted. An accepted session
    /// counts only once its first message arrived (`first`): a replayed handshake completes too,
    /// but its sender cannot then encrypt anything.
    Established {
        session: Box<Session>,
        role: Role,
        addr: SocketAddr,
        /// This device's end of the connection, to close it when that address goes away.
        local: Option<SocketAddr>,
        first: Option<Message>,
    },
    DialFailed {
        key: PublicKey,
        error: String,
    },
    Message {
        key: PublicKey,
        session: u64,
        message: Message,
    },
    Rtt {
        key: PublicKey,
        session: u64,
        rtt: Duration,
    },
    Closed {
        key: PublicKey,
        session: u64,
        reason: String,
    },
    /// A session's queue refused a message and has room again: the outbox goes on (the node
    /// flushes it after every event).
    Writable,
    /// The handler for a message delivered here finished (or could not run).
    HandlerDone {
        data: Box<Data>,
        /// The payload's size (the payload itself is not kept).
        size: usize,
        result: Result<RunResult, String>,
    },
}

/// What the API asks of the node.
pub enum Request {
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    Peer {
        name: String,
        reply: oneshot::Sender<Result<PeerInfo, RpcError>>,
    },
    Ping {
        name: String,
        reply: oneshot::Sender<Result<PingResult, RpcError>>,
    },
    AddMember {
        member: Member,
        reply: oneshot::Sender<Result<MemberInfo, RpcError>>,
    },
    RemoveMember {
        name: String,
        reply: oneshot::Sender<Result<MemberInfo, RpcError>>,
    },
    /// Redial everyone now (the network changed).
    Retry(oneshot::Sender<usize>),
    /// From netwatch: the interfaces and addresses now.
    Network(Vec<Interface>),
    /// The interfaces netwatch last reported.
    Interfaces(oneshot::Sender<Vec<Interface>>),
    /// From discovery: a device advertising `instance` on the local network.
    Discovered {
        instance: String,
        addresses: Vec<SocketAddr>,
    },
    Send {
        send: crate::delivery::SendRequest,
        reply: oneshot::Sender<Result<SendResult, RpcError>>,
    },
    /// A local store write is durable: push it to the members and raise its events.
    StoreWritten(Box<wire::StoreEntry>),
}

/// The node's public face: where to send events and requests, and the member set the accept
/// path checks handshakes against without a round trip through the node.
#[derive(Clone)]
pub struct NodeHandle {
    pub events: mpsc::Sender<Event>,
    pub requests: mpsc::Sender<Request>,
    pub members: Arc<RwLock<HashSet<PublicKey>>>,
    pub identity: Arc<Identity>,
    /// Random per daemon start, and drawn again when this device's addresses change: peers
    /// then replace the session they had at once (see `keep_new_session`).
    pub incarnation: Arc<std::sync::atomic::AtomicU64>,
    /// What `subscribe` streams.
    pub watch: broadcast::Sender<WatchEvent>,
    /// The replicated store (`store`).
    pub store: Arc<crate::store::Store>,
    /// `[mesh] interfaces` and the interfaces this device has.
    pub interfaces: Arc<Interfaces>,
}

impl NodeHandle {
    /// What this device says about itself in every handshake.
    pub fn payload(&self) -> HandshakePayload {
        HandshakePayload {
            version: wire::PROTOCOL_VERSION,
            incarnation: self.incarnation.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    pub fn is_member(&self, key: &PublicKey) -> bool {
        self.members
            .read()
            .map(|m| m.contains(key))
            .unwrap_or(false)
    }
}

/// One live session, as the node sees it.
pub(crate) struct Live {
    id: u64,
    pub(crate) tx: Outbound,
    cancel: CancellationToken,
    we_initiated: bool,
    incarnation: u64,
    addr: SocketAddr,
    local: Option<SocketAddr>,
}

struct PendingPing {
    key: PublicKey,
    sent: Instant,
    path: PeerStatus,
    via: Option<PublicKey>,
    address: Option<SocketAddr>,
    reply: oneshot::Sender<Result<PingResult, RpcError>>,
}

pub struct Node {
    pub(crate) handle: NodeHandle,
    pub(crate) name: DeviceName,
    config: MeshConfig,
    listening: Vec<SocketAddr>,
    pub(crate) roster: Roster,
    pub(crate) table: PeerTable,
    pub(crate) sessions: HashMap<PublicKey, Live>,
    next_session_id: u64,
    events: mpsc::Receiver<Event>,
    requests: mpsc::Receiver<Request>,
    pending_pings: HashMap<u64, PendingPing>,
    /// RTTs last announced in `Neighbors`, to announce again only on real change.
    announced: Vec<(PublicKey, Option<Duration>)>,
    announced_at: Option<Instant>,
    /// Status last logged per member.
    logged: HashMap<PublicKey, (PeerStatus, Option<PublicKey>)>,
    /// Members whose failed dials were logged since they were last reachable.
    quiet_dials: HashSet<PublicKey>,
    pub(crate) tasks: TaskTracker,
    pub(crate) handlers: Arc<HandlersLink>,
    pub(crate) outbox: Outbox,
    pub(crate) delivered: Delivered,
    pub(crate) waits: HashMap<MessageId, (Wait, crate::delivery::PendingSend)>,
    /// The interfaces netwatch last reported (`None` before its first report).
    pub(crate) network: Option<Vec<Interface>>,
}

/// Decides which of two sessions with the same peer survives, the same way on both sides:
/// - a session from a new incarnation of the peer replaces one from the old (it restarted);
/// - a new session dialled by the same side as the old one replaces it (that side thinks the old
///   one is gone, and only it can know);
/// - of two sessions dialled by opposite sides at once, the one whose initiator has the smaller
///   public key survives.
fn keep_new_session(
    own: &PublicKey,
    remote: &PublicKey,
    old: (bool, u64),
    new: (bool, u64),
) -> bool {
    let (old_we_initiated, old_incarnation) = old;
    let (new_we_initiated, new_incarnation) = new;
    if old_incarnation != new_incarnation || old_we_initiated == new_we_initiated {
        return true;
    }
    let initiator = |we: bool| if we { own } else { remote };
    initiator(new_we_initiated).as_bytes() < initiator(old_we_initiated).as_bytes()
}

pub(crate) fn rpc_error(code: i64, message: impl Into<String>) -> RpcError {
    RpcError::new(code, message)
}

pub(crate) fn roster_error(e: RosterError) -> RpcError {
    match e {
        RosterError::NotFound(_) => rpc_error(code::NOT_FOUND, e.to_string()),
        RosterError::NameTaken(_) | RosterError::KeyTaken(_) | RosterError::OwnKey => {
            rpc_error(code::CONFLICT, e.to_string())
        }
        other => rpc_error(code::STORAGE, other.to_string()),
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Node {
    /// `listening` is where this device accepts sessions, as announced to peers.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        identity: Arc<Identity>,
        name: DeviceName,
        config: MeshConfig,
        listening: Vec<SocketAddr>,
        roster: Roster,
        handlers: Arc<HandlersLink>,
        outbox: Outbox,
        delivered: Delivered,
        store: Arc<crate::store::Store>,
    ) -> (Self, NodeHandle) {
        let (events_tx, events) = mpsc::channel(1024);
        let (requests_tx, requests) = mpsc::channel(64);
        let members: HashSet<PublicKey> = roster.members().iter().map(|m| m.public_key).collect();
        let handle = NodeHandle {
            events: events_tx,
            requests: requests_tx,
            members: Arc::new(RwLock::new(members)),
            identity,
            incarnation: Arc::new(std::sync::atomic::AtomicU64::new(rand::random())),
            watch: broadcast::channel(1024).0,
            store,
            interfaces: Arc::new(Interfaces::new(InterfaceFilter::mesh(&config.interfaces))),
        };
        let mut table = PeerTable::default();
        table.sync_members(
            roster.members().iter().map(|m| m.public_key),
            Instant::now().into_std(),
        );
        let node = Self {
            handle: handle.clone(),
            name,
            config,
            listening,
            roster,
            table,
            sessions: HashMap::new(),
            next_session_id: 0,
            events,
            requests,
            pending_pings: HashMap::new(),
            announced: Vec::new(),
            announced_at: None,
            logged: HashMap::new(),
            quiet_dials: HashSet::new(),
            tasks: TaskTracker::new(),
            handlers,
            outbox,
            delivered,
            waits: HashMap::new(),
            network: None,
        };
        (node, handle)
    }

    pub(crate) fn own_key(&self) -> PublicKey {
        self.handle.identity.public_key()
    }

    pub(crate) fn member_name(&self, key: &PublicKey) -> String {
        self.roster
            .get(key)
            .map(|m| m.name.to_string())
            .unwrap_or_else(|| key.device_id().to_string())
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut prune = tokio::time::interval(PING_FORGET);
        let mut housekeeping = tokio::time::interval(crate::delivery::HOUSEKEEPING);
        let mut store_sync = tokio::time::interval(crate::store::SYNC_INTERVAL);
        self.raise_event("daemon-start", Vec::new());
        loop {
            self.dial_due();
            let wake = [
                self.table.next_dial_at().map(Instant::from_std),
                self.next_wait_deadline(),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(event) = self.events.recv() => self.on_event(event),
                Some(request) = self.requests.recv() => self.on_request(request),
                _ = tokio::time::sleep_until(wake) => {}
                _ = prune.tick() => self.forget_old_pings(),
                _ = housekeeping.tick() => self.expire_messages(),
                _ = store_sync.tick() => self.store_anti_entropy(),
            }
            self.after_change();
            self.flush_outbox();
            self.finish_waits(false);
        }
        self.finish_waits(true);
        // The daemon-stop handler gets a moment to run before the sessions close.
        let stop = self.event_run("daemon-stop", Vec::new());
        let _ = tokio::time::timeout(Duration::from_secs(2), self.handlers.run(stop)).await;
        for live in self.sessions.values() {
            live.cancel.cancel();
        }
        self.tasks.close();
        self.tasks.wait().await;
    }

    pub(crate) fn jitter() -> f64 {
        rand::random::<f64>()
    }

    fn dial_due(&mut self) {
        let now = Instant::now().into_std();
        for key in self.table.take_due_dials(now) {
            let addresses = self
                .roster
                .get(&key)
                .map(|m| m.addresses.clone())
                .unwrap_or_default();
            if addresses.is_empty() {
                // Nothing to dial yet; the member may dial us, or discovery may find it.
                self.table.dial_failed(&key, now, Self::jitter());
                continue;
            }
            let handle = self.handle.clone();
            self.tasks.spawn(dial(handle, key, addresses));
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Established {
                session,
                role,
                addr,
                local,
                first,
            } => {
                let key = session.remote_key;
                self.on_established(*session, role, addr, local);
                if let Some(message) = first
                    && self.sessions.contains_key(&key)
                {
                    self.on_message(key, message);
                }
            }
            Event::DialFailed { key, error } => {
                let name = self.member_name(&key);
                if let Some(delay) =
                    self.table
                        .dial_failed(&key, Instant::now().into_std(), Self::jitter())
                {
                    if self.quiet_dials.insert(key) {
                        tracing::info!(peer = %name, "cannot reach {name}: {error}; retrying with backoff");
                    } else {
                        tracing::debug!(peer = %name, "still cannot reach {name}: {error}; next try in {delay:?}");
                    }
                }
            }
            Event::Message {
                key,
                session,
                message,
            } => {
                if self.sessions.get(&key).is_some_and(|l| l.id == session) {
                    self.on_message(key, message);
                }
            }
            Event::Rtt { key, session, rtt } => {
                if self.sessions.get(&key).is_some_and(|l| l.id == session) {
                    self.table.set_rtt(&key, rtt);
                }
            }
            Event::HandlerDone { data, size, result } => self.on_handler_done(*data, size, result),
            Event::Writable => {}
            Event::Closed {
                key,
                session,
                reason,
            } => {
                if self.sessions.get(&key).is_some_and(|l| l.id == session) {
                    self.sessions.remove(&key);
                    let name = self.member_name(&key);
                    tracing::info!(peer = %name, "session with {name} ended: {reason}");
                    self.table
                        .session_down(&key, Instant::now().into_std(), Self::jitter());
                }
            }
        }
    }

    fn on_established(
        &mut self,
        session: Session,
        role: Role,
        addr: SocketAddr,
        local: Option<SocketAddr>,
    ) {
        let key = session.remote_key;
        if !self.table.contains(&key) {
            return;
        }
        let we_initiated = role == Role::Initiator;
        let incarnation = session.remote.incarnation;
        if let Some(old) = self.sessions.get(&key) {
            let own = self.own_key();
            if !keep_new_session(
                &own,
                &key,
                (old.we_initiated, old.incarnation),
                (we_initiated, incarnation),
            ) {
                tracing::debug!(peer = %self.member_name(&key), "dropped a duplicate session");
                return;
            }
            old.cancel.cancel();
        }
        self.next_session_id += 1;
        let id = self.next_session_id;
        let (tx, rx) = Outbound::new();
        let cancel = CancellationToken::new();
        let task = SessionTask {
            session,
            id,
            role,
            interval: self.config.keepalive_interval,
            timeout: self.config.keepalive_timeout,
            outbound_tx: tx.clone(),
            outbound: rx,
            events: self.handle.events.clone(),
            cancel: cancel.clone(),
        };
        self.tasks.spawn(task.run());
        tx.try_send(self.hello());
        tx.try_send(self.neighbors_message());
        self.sessions.insert(
            key,
            Live {
                id,
                tx,
                cancel,
                we_initiated,
                incarnation,
                addr,
                local,
            },
        );
        // For an accepted session, show the address the member listens on at that IP, if known,
        // until its Hello says for sure.
        let shown = if we_initiated {
            addr
        } else {
            self.roster
                .get(&key)
                .and_then(|m| m.addresses.iter().find(|a| a.ip() == addr.ip()).copied())
                .unwrap_or(addr)
        };
        self.table
            .session_up(&key, shown, Instant::now().into_std());
        self.quiet_dials.remove(&key);
        self.outbox.reset_pacing(key.as_bytes());
        if we_initiated {
            self.learn_address(&key, addr);
        }
        self.store_session_up(&key);
    }

    /// This device's `Hello`: its name, where it listens and its other addresses.
    fn hello(&self) -> Message {
        Message::Hello(Hello {
            name: self.name.to_string(),
            listen: self.announced_listen(),
            addresses: self.announced_addresses(),
        })
    }

    /// The interfaces as netwatch last reported them; until it has, as read here.
    fn interfaces_now(&self) -> Vec<Interface> {
        self.network
            .clone()
            .unwrap_or_else(|| self.handle.interfaces.list())
    }

    /// The addresses peers may dial besides the one they reached this device at: those of the
    /// interfaces `[mesh] interfaces` allows that are up, without loopback, link-local and
    /// unspecified ones (link-local IPv6 needs a scope no peer could know).
    fn announced_addresses(&self) -> Vec<std::net::IpAddr> {
        self.handle
            .interfaces
            .usable(&self.interfaces_now())
            .into_iter()
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified() && !ip.is_multicast())
            .filter(|ip| match ip {
                std::net::IpAddr::V4(v4) => !v4.is_link_local(),
                std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
            })
            .take(wire::MAX_ANNOUNCED_ADDRESSES)
            .collect()
    }

    /// Where this device listens, as told to peers: a listen address at a specific IP only if
    /// that IP is on an interface `[mesh] interfaces` allows (an unspecified one means "the
    /// address you reached me at", which is on an allowed interface, or the session would not
    /// exist).
    fn announced_listen(&self) -> Vec<SocketAddr> {
        let interfaces = &self.handle.interfaces;
        self.listening
            .iter()
            .filter(|a| a.ip().is_unspecified() || interfaces.check_local(a.ip()).is_ok())
            .copied()
            .collect()
    }

    fn learn_address(&mut self, key: &PublicKey, addr: SocketAddr) {
        if let Err(e) = self.roster.learn_address(key, addr) {
            tracing::warn!("{e}");
        }
    }

    fn on_message(&mut self, key: PublicKey, message: Message) {
        match message {
            Message::Hello(hello) => {
                let Some((observed, we_initiated)) =
                    self.sessions.get(&key).map(|l| (l.addr, l.we_initiated))
                else {
                    return;
                };
                // Where the peer listens, at the address it reached us from.
                for listen in &hello.listen {
                    let ip = listen.ip();
                    if (ip.is_unspecified() && ip.is_ipv4() == observed.is_ipv4())
                        || ip == observed.ip()
                    {
                        let addr = SocketAddr::new(observed.ip(), listen.port());
                        self.learn_address(&key, addr);
                        if !we_initiated {
                            self.table.set_address(&key, addr);
                        }
                    }
                }
                // ...and at its other addresses, so that a move to a network where the address
                // this device knew no longer reaches still finds it, with or without discovery.
                let announced: Vec<SocketAddr> = hello
                    .addresses
                    .iter()
                    .take(wire::MAX_ANNOUNCED_ADDRESSES)
                    .filter(|ip| **ip != observed.ip())
                    .flat_map(|ip| {
                        hello
                            .listen
                            .iter()
                            .filter(|l| l.ip().is_unspecified() && l.is_ipv4() == ip.is_ipv4())
                            .map(|l| SocketAddr::new(*ip, l.port()))
                    })
                    .collect();
                if let Err(e) = self.roster.learn_announced(&key, &announced) {
                    tracing::warn!("{e}");
                }
            }
            Message::Neighbors(neighbors) => {
                let list = neighbors
                    .into_iter()
                    .map(|n| {
                        (
                            PublicKey::from_bytes(n.key),
                            n.rtt_us.map(|us| Duration::from_micros(us.into())),
                        )
                    })
                    .collect();
                self.table.set_report(&key, list);
            }
            Message::Relay(relay) => self.on_relay(relay),
            Message::Data(data) => self.on_data(data),
            Message::Ack(ack) => self.on_ack(ack),
            Message::Reply(reply) => self.on_reply(reply),
            Message::Pong { nonce } => self.complete_ping(nonce),
            Message::Store(envelope) => self.on_store(envelope),
            // Answered by the session task itself.
            Message::Ping { .. } => {}
        }
    }

    fn on_relay(&mut self, relay: Relay) {
        let own = *self.own_key().as_bytes();
        let from = PublicKey::from_bytes(relay.from);
        if !self.table.contains(&from) && relay.from != own {
            return;
        }
        if relay.to == own {
            match relay.body {
                RelayBody::Ping { nonce } => {
                    let pong = Relay {
                        from: own,
                        to: relay.from,
                        hops: 0,
                        body: RelayBody::Pong { nonce },
                    };
                    self.route(&from, Message::Relay(pong));
                }
                RelayBody::Pong { nonce } => self.complete_ping(nonce),
            }
        } else if relay.hops < MAX_RELAY_HOPS {
            let to = PublicKey::from_bytes(relay.to);
            if let Some(live) = self.sessions.get(&to) {
                live.tx.try_send(Message::Relay(Relay {
                    hops: relay.hops + 1,
                    ..relay
                }));
            }
        }
    }

    /// Sends `message` to `to` directly, or to the member that relays to it.
    pub(crate) fn route(&self, to: &PublicKey, message: Message) -> bool {
        let next = match self.table.reach(to) {
            Reach::Direct { .. } => *to,
            Reach::Relayed { via, .. } => via,
            Reach::Unreachable => return false,
        };
        self.sessions
            .get(&next)
            .is_some_and(|live| live.tx.try_send(message))
    }

    fn complete_ping(&mut self, nonce: u64) {
        let Some(pending) = self.pending_pings.remove(&nonce) else {
            return;
        };
        let Some(member) = self.roster.get(&pending.key) else {
            return;
        };
        let result = PingResult {
            name: member.name.clone(),
            id: member.id(),
            path: pending.path,
            via: pending
                .via
                .and_then(|v| self.roster.get(&v).map(|m| m.name.clone())),
            address: pending.address,
            rtt_ms: millis(pending.sent.elapsed()),
        };
        let _ = pending.reply.send(Ok(result));
    }

    fn forget_old_pings(&mut self) {
        self.pending_pings
            .retain(|_, p| p.sent.elapsed() < PING_FORGET && !p.reply.is_closed());
    }

    fn neighbors_message(&self) -> Message {
        Message::Neighbors(
            self.table
                .direct_neighbors()
                .into_iter()
                .map(|(key, rtt)| Neighbor {
                    key: *key.as_bytes(),
                    rtt_us: rtt.map(|d| d.as_micros().min(u32::MAX.into()) as u32),
                })
                .collect(),
        )
    }

    /// After every event: tell peers about changed direct sessions, log status changes, and
    /// note who is reachable.
    fn after_change(&mut self) {
        let mut changes = Vec::new();
        let neighbors = self.table.direct_neighbors();
        let announce = match announcement_differs(&self.announced, &neighbors) {
            Announce::Same => false,
            Announce::SetChanged => true,
            Announce::RttMoved => self
                .announced_at
                .is_none_or(|at| at.elapsed() >= self.config.keepalive_interval),
        };
        if announce {
            let message = self.neighbors_message();
            for live in self.sessions.values() {
                live.tx.try_send(message.clone());
            }
            self.announced = neighbors;
            self.announced_at = Some(Instant::now());
        }
        for member in self.roster.members() {
            let key = member.public_key;
            let reach = self.table.reach(&key);
            let now = match reach {
                Reach::Direct { .. } => (PeerStatus::Direct, None),
                Reach::Relayed { via, .. } => (PeerStatus::Relayed, Some(via)),
                Reach::Unreachable => (PeerStatus::Unreachable, None),
            };
            let before = self.logged.insert(key, now);
            let first = before.is_none();
            if before == Some(now) || (first && now.0 == PeerStatus::Unreachable) {
                continue;
            }
            let was_reachable = before.is_some_and(|(s, _)| s != PeerStatus::Unreachable);
            changes.push((member.clone(), reach, was_reachable));
            let name = &member.name;
            match reach {
                Reach::Direct { addr, .. } => {
                    tracing::info!(peer = %name, status = "direct", "{name} is direct at {addr}")
                }
                Reach::Relayed { via, .. } => {
                    let via = self.member_name(&via);
                    tracing::info!(peer = %name, status = "relayed", "{name} is relayed via {via}")
                }
                Reach::Unreachable => {
                    tracing::info!(peer = %name, status = "unreachable", "{name} is unreachable")
                }
            }
        }
        self.table.touch_reachable(SystemTime::now());
        for (member, reach, was_reachable) in changes {
            self.peer_changed(&member, reach, was_reachable);
        }
    }

    fn on_request(&mut self, request: Request) {
        match request {
            Request::Peers(reply) => {
                let peers = self
                    .roster
                    .members()
                    .iter()
                    .map(|m| self.peer_info(m))
                    .collect();
                let _ = reply.send(peers);
            }
            Request::Peer { name, reply } => {
                let result = self
                    .roster
                    .find(&name)
                    .map(|m| self.peer_info(m))
                    .map_err(roster_error);
                let _ = reply.send(result);
            }
            Request::Ping { name, reply } => self.start_ping(&name, reply),
            Request::AddMember { member, reply } => {
                let own = self.own_key();
                let info = member_info(&member);
                let name = member.name.clone();
                let result = self.roster.add(member, &own).map_err(roster_error);
                if result.is_ok() {
                    tracing::info!(peer = %name, "added member {name} ({})", info.id);
                    self.sync_members();
                }
                let _ = reply.send(result.map(|()| info));
            }
            Request::RemoveMember { name, reply } => {
                let result = self.roster.remove(&name).map_err(roster_error);
                if let Ok(member) = &result {
                    tracing::info!(peer = %member.name, "removed member {}", member.name);
                    self.outbox.forget_target(member.public_key.as_bytes());
                    if let Some(live) = self.sessions.remove(&member.public_key) {
                        live.cancel.cancel();
                    }
                    self.logged.remove(&member.public_key);
                    self.sync_members();
                }
                let _ = reply.send(result.map(|m| member_info(&m)));
            }
            Request::Retry(reply) => {
                let count = self.table.retry_all(Instant::now().into_std());
                let _ = reply.send(count);
            }
            Request::Send { send, reply } => self.start_send(send, reply),
            Request::Network(interfaces) => self.on_network(interfaces),
            Request::Interfaces(reply) => {
                let _ = reply.send(self.interfaces_now());
            }
            Request::Discovered {
                instance,
                addresses,
            } => self.on_discovered(&instance, addresses),
            Request::StoreWritten(entry) => self.store_written(*entry),
        }
    }

    fn sync_members(&mut self) {
        let keys: HashSet<PublicKey> = self.roster.members().iter().map(|m| m.public_key).collect();
        self.table
            .sync_members(keys.iter().copied(), Instant::now().into_std());
        if let Ok(mut members) = self.handle.members.write() {
            *members = keys;
        }
    }

    fn start_ping(&mut self, name: &str, reply: oneshot::Sender<Result<PingResult, RpcError>>) {
        let member = match self.roster.find(name) {
            Ok(member) => member.clone(),
            Err(e) => {
                let _ = reply.send(Err(roster_error(e)));
                return;
            }
        };
        let key = member.public_key;
        let nonce: u64 = rand::random();
        let own = *self.own_key().as_bytes();
        let (path, via, address, message) = match self.table.reach(&key) {
            Reach::Direct { addr, .. } => (
                PeerStatus::Direct,
                None,
                Some(addr),
                Message::Ping {
                    nonce,
                    rtt_us: None,
                },
            ),
            Reach::Relayed { via, .. } => (
                PeerStatus::Relayed,
                Some(via),
                None,
                Message::Relay(Relay {
                    from: own,
                    to: *key.as_bytes(),
                    hops: 0,
                    body: RelayBody::Ping { nonce },
                }),
            ),
            Reach::Unreachable => {
                let _ = reply.send(Err(rpc_error(
                    code::UNREACHABLE,
                    format!(
                        "{} is unreachable: no session with it, and no member reports one",
                        member.name
                    ),
                )));
                return;
            }
        };
        self.pending_pings.insert(
            nonce,
            PendingPing {
                key,
                sent: Instant::now(),
                path,
                via,
                address,
                reply,
            },
        );
        if !self.route(&key, message)
            && let Some(pending) = self.pending_pings.remove(&nonce)
        {
            let _ = pending.reply.send(Err(rpc_error(
                code::UNREACHABLE,
                format!("cannot send to {} now (its queue is full)", member.name),
            )));
        }
    }

    /// Discovery resolved `instance`: if it is a member's name for this epoch (or the one
    /// before or after, for clocks a little apart), learn its addresses and dial it now.
    fn on_discovered(&mut self, instance: &str, addresses: Vec<SocketAddr>) {
        let epoch = cnsprcy::identity::discovery_epoch();
        let member = self.roster.members().iter().find(|m| {
            [epoch.saturating_sub(1), epoch, epoch + 1]
                .iter()
                .any(|e| m.public_key.discovery_name(*e) == instance)
        });
        let Some(member) = member.cloned() else {
            // Not a member (or this device itself): strangers are ignored.
            return;
        };
        for addr in addresses.iter().rev() {
            self.learn_address(&member.public_key, *addr);
        }
        if !matches!(self.table.reach(&member.public_key), Reach::Direct { .. }) {
            tracing::info!(peer = %member.name, ?addresses, "found {} on the local network", member.name);
            self.table
                .retry(&member.public_key, Instant::now().into_std());
        }
    }

    /// The network changed (netwatch): sessions on an address this device no longer has (or on a
    /// link that went down) end at once, and when anything changed, every member without a
    /// session is dialled now, with a fresh incarnation so peers drop a session they still
    /// think alive in favour of the new one.
    fn on_network(&mut self, interfaces: Vec<Interface>) {
        self.handle.interfaces.update(interfaces.clone());
        let usable = self.handle.interfaces.usable(&interfaces);
        let before = self.network.replace(interfaces);
        let Some(before) = before else {
            return;
        };
        let was = self.handle.interfaces.usable(&before);
        if was == usable {
            return;
        }
        let lost: Vec<std::net::IpAddr> = was.difference(&usable).copied().collect();
        let gained: Vec<std::net::IpAddr> = usable.difference(&was).copied().collect();
        let stale: Vec<PublicKey> = self
            .sessions
            .iter()
            .filter(|(_, live)| live.local.is_some_and(|l| lost.contains(&l.ip())))
            .map(|(key, _)| *key)
            .collect();
        if !stale.is_empty() || !lost.is_empty() {
            self.handle
                .incarnation
                .store(rand::random(), std::sync::atomic::Ordering::Relaxed);
        }
        let now = Instant::now().into_std();
        for key in &stale {
            if let Some(live) = self.sessions.remove(key) {
                live.cancel.cancel();
                let name = self.member_name(key);
                tracing::info!(peer = %name, "session with {name} ended: its local address is gone");
                self.table.session_down(key, now, Self::jitter());
            }
        }
        let dialling = self.table.retry_all(now);
        tracing::info!(
            lost = ?lost,
            gained = ?gained,
            "the network changed; redialling {dialling} member(s) now"
        );
        // The sessions that remain tell their peers where this device is now.
        let hello = self.hello();
        for live in self.sessions.values() {
            live.tx.try_send(hello.clone());
        }
    }

    pub(crate) fn peer_info(&self, member: &Member) -> PeerInfo {
        let key = member.public_key;
        let reach = self.table.reach(&key);
        let mut addresses = Vec::new();
        let (status, latency, via) = match reach {
            Reach::Direct { addr, rtt } => {
                addresses.push(addr);
                (PeerStatus::Direct, rtt, None)
            }
            Reach::Relayed { via, rtt } => (
                PeerStatus::Relayed,
                rtt,
                self.roster.get(&via).map(|m| m.name.clone()),
            ),
            Reach::Unreachable => (PeerStatus::Unreachable, None, None),
        };
        for addr in &member.addresses {
            if !addresses.contains(addr) {
                addresses.push(*addr);
            }
        }
        let last_seen = if reach.is_reachable() {
            Some(SystemTime::now())
        } else {
            self.table.last_seen(&key)
        };
        PeerInfo {
            name: member.name.clone(),
            id: member.id(),
            public_key: key,
            status,
            addresses,
            latency_ms: latency.map(millis),
            via,
            last_seen: last_seen.map(rfc3339),
        }
    }
}

fn member_info(member: &Member) -> MemberInfo {
    MemberInfo {
        name: member.name.clone(),
        id: member.id(),
        public_key: member.public_key,
        addresses: member.addresses.clone(),
    }
}

/// Whether the direct set changed, or an RTT moved by more than `RTT_ANNOUNCE_CHANGE` and by
/// more than `RTT_ANNOUNCE_FLOOR` (on a fast LAN, ordinary jitter is a large fraction of the RTT
/// and would be announced to every peer all the time).
fn announcement_differs(
    old: &[(PublicKey, Option<Duration>)],
    new: &[(PublicKey, Option<Duration>)],
) -> Announce {
    if old.len() != new.len() || old.iter().zip(new).any(|((a, _), (b, _))| a != b) {
        return Announce::SetChanged;
    }
    let moved = old
        .iter()
        .zip(new)
        .any(|((_, ra), (_, rb))| match (ra, rb) {
            (Some(a), Some(b)) => {
                let diff = if a > b { *a - *b } else { *b - *a };
                diff > RTT_ANNOUNCE_FLOOR
                    && diff.as_secs_f64() > RTT_ANNOUNCE_CHANGE * a.max(b).as_secs_f64()
            }
            (a, b) => a.is_some() != b.is_some(),
        });
    if moved {
        Announce::RttMoved
    } else {
        Announce::Same
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Announce {
    Same,
    /// Sessions came or went: tell peers at once.
    SetChanged,
    /// Only RTTs moved: tell peers at most once per keepalive interval.
    RttMoved,
}

/// Dials all of a member's addresses at once and runs the handshake on the first connection
/// that comes up (then the next, if that handshake fails). Only one handshake at a time: two
/// completed ones would each replace the other on the far side, and both would die.
///
/// With `[mesh] interfaces` set, each connection's socket is bound to an allowed interface, so
/// that no route takes the session through another one: the interface the kernel's route picks
/// when it is allowed, else every allowed interface that could carry the address, at once. An
/// address that no allowed interface can carry is not dialled.
async fn dial(handle: NodeHandle, key: PublicKey, addresses: Vec<SocketAddr>) {
    let mut connects = JoinSet::new();
    let mut errors = Vec::new();
    for addr in addresses {
        let devices = match handle.interfaces.dial_plan(addr.ip()) {
            DialPlan::Unbound => vec![None],
            DialPlan::Devices(devices) => devices.into_iter().map(Some).collect(),
            DialPlan::Impossible(why) => {
                errors.push(format!("{addr}: not dialled: {why}"));
                continue;
            }
        };
        for device in devices {
            let interfaces = handle.interfaces.clone();
            connects.spawn(async move {
                let stream = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    interfaces::connect(addr, device.as_deref(), &interfaces),
                )
                .await
                .map_err(|_| match &device {
                    Some(device) => format!("{addr} over {device}: connect timed out"),
                    None => format!("{addr}: connect timed out"),
                })??;
                let _ = stream.set_nodelay(true);
                Ok::<_, String>((stream, addr))
            });
        }
    }
    while let Some(outcome) = connects.join_next().await {
        let (stream, addr) = match outcome {
            Ok(Ok(connected)) => connected,
            Ok(Err(error)) => {
                errors.push(error);
                continue;
            }
            Err(join) => {
                errors.push(join.to_string());
                continue;
            }
        };
        let local = stream.local_addr().ok();
        match transport::initiate(stream, &handle.identity, &key, &handle.payload()).await {
            Ok(session) => {
                // The other connections are dropped (closed) with `connects`.
                let _ = handle
                    .events
                    .send(Event::Established {
                        session: Box::new(session),
                        role: Role::Initiator,
                        addr,
                        local,
                        first: None,
                    })
                    .await;
                return;
            }
            Err(e) => errors.push(format!("{addr}: {e}")),
        }
    }
    let _ = handle
        .events
        .send(Event::DialFailed {
            key,
            error: errors.join("; "),
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> PublicKey {
        Identity::from_secret([seed; 32]).public_key()
    }

    #[test]
    fn both_sides_keep_the_same_session() {
        let (a, b) = (key(1), key(2));
        let (low, high) = if a.as_bytes() < b.as_bytes() {
            (a, b)
        } else {
            (b, a)
        };
        // Crossing dials: each side holds one it dialled and one it accepted, in either order.
        // The session dialled by `low` survives on both sides.
        // On `low`: old = dialled by high (we_initiated=false), new = dialled by low (true).
        assert!(keep_new_session(&low, &high, (false, 7), (true, 7)));
        assert!(!keep_new_session(&low, &high, (true, 7), (false, 7)));
        // On `high`: old = dialled by low (false), new = dialled by high (true): keep old.
        assert!(!keep_new_session(&high, &low, (false, 7), (true, 7)));
        assert!(keep_new_session(&high, &low, (true, 7), (false, 7)));
        // A redial by the same side, or a restarted peer, always replaces.
        assert!(keep_new_session(&high, &low, (false, 7), (false, 7)));
        assert!(keep_new_session(&low, &high, (true, 7), (false, 8)));
    }

    #[test]
    fn announcements_ignore_small_rtt_changes() {
        let ms = Duration::from_millis;
        let a = key(1);
        let old = vec![(a, Some(ms(10)))];
        assert_eq!(
            announcement_differs(&old, &[(a, Some(ms(11)))]),
            Announce::Same
        );
        assert_eq!(
            announcement_differs(&old, &[(a, Some(ms(20)))]),
            Announce::RttMoved
        );
        assert_eq!(announcement_differs(&old, &[(a, None)]), Announce::RttMoved);
        assert_eq!(announcement_differs(&old, &[]), Announce::SetChanged);
        // Sub-millisecond jitter on a fast LAN is not news, however large in proportion.
        let fast = vec![(a, Some(Duration::from_micros(80)))];
        assert_eq!(
            announcement_differs(&fast, &[(a, Some(Duration::from_micros(400)))]),
            Announce::Same
        );
    }
}
