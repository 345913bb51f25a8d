//! The driver around the core (`core/`): one task that feeds the core every input and carries out
//! its outputs. Dialling, accepting and running sessions happen in other tasks, which report here
//! as `Event`s; the API asks through `Request`s; the writer thread makes the core's `Persist`
//! outputs durable and reports back. Nothing here blocks on a disk or decides a rule.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cnsprcy::api::{HandlerReply, WatchEvent};
use cnsprcy::config::MeshConfig;
use cnsprcy::identity::{DeviceName, Identity, PublicKey};
use cnsprcy::ipc::{Interface, Outcome, Run, RunResult};
use cnsprcy::netif::{DialPlan, InterfaceFilter};
use cnsprcy::rpc::RpcError;
use cnsprcy::wire::{self, HandshakePayload, Message, StoreEntry};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::core::{
    Answer, ApiCall, Core, DialFailure, Input, Now, Output, RequestId, SessionId, Setup,
    StoreAccess,
};
use crate::handlers_link::HandlersLink;
use crate::interfaces::{self, Interfaces};
use crate::liveness::Role;
use crate::persist::{Files, Job};
use crate::roster::Member;
use crate::session::{Outbound, SessionTask};
use crate::store::Store;
use crate::transport::{self, Session};
use crate::udp_heartbeats::{self, Offered, Targets};

/// How long one TCP connect may take before that address counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
        failure: DialFailure,
        error: String,
    },
    /// A device that is not a member sent a handshake (the connection was dropped).
    Knock {
        key: PublicKey,
        addr: SocketAddr,
    },
    Frame {
        session: SessionId,
        message: Message,
    },
    Activity {
        session: SessionId,
    },
    Closed {
        session: SessionId,
        reason: String,
    },
    /// A session's queue refused a message and has room again.
    Writable {
        session: SessionId,
    },
    HandlerStarted {
        run: u64,
    },
    HandlerDone {
        run: u64,
        result: Result<RunResult, String>,
    },
}

/// What the API and the helper services ask of the node.
pub enum Request {
    Call {
        call: ApiCall,
        reply: oneshot::Sender<Answer>,
        /// For a streaming `send`: where its replies go as they arrive.
        progress: Option<mpsc::UnboundedSender<HandlerReply>>,
    },
    /// From netwatch: the interfaces and addresses now.
    Network(Vec<Interface>),
    /// From discovery: a device advertising `instance` on the local network.
    Discovered {
        instance: String,
        addresses: Vec<SocketAddr>,
    },
    /// A local store write is durable.
    StoreWritten(Box<StoreEntry>),
}

/// The node's public face: where to send events and requests, and what the accept path checks
/// handshakes against without a round trip through the node.
#[derive(Clone)]
pub struct NodeHandle {
    pub events: mpsc::Sender<Event>,
    pub requests: mpsc::Sender<Request>,
    pub members: Arc<RwLock<HashSet<PublicKey>>>,
    /// The invitations this device made, for the accept path to check joining devices.
    pub invitations: Arc<RwLock<crate::core::Invitations>>,
    /// Disabled devices and their entries, for the accept path to tell them.
    pub disabled: Arc<RwLock<HashMap<PublicKey, wire::RosterEntry>>>,
    pub identity: Arc<Identity>,
    /// Random per daemon start, and drawn again when this device's addresses change: peers
    /// then replace the session they had at once (see `core::sessions::keep_new_session`).
    pub incarnation: Arc<AtomicU64>,
    /// What `subscribe` streams.
    pub watch: broadcast::Sender<WatchEvent>,
    /// The replicated store (`store`).
    pub store: Arc<Store>,
    /// `[mesh] interfaces` and the interfaces this device has.
    pub interfaces: Arc<Interfaces>,
    /// Pairing on the local network (`manage join` without a code, `manage induct`).
    pub pairing: Arc<crate::pairing::Pairing>,
    /// Whether discovery should look for members on the local network (`Output::Browse`);
    /// the discovery service's connection passes it on.
    pub browse: watch::Sender<bool>,
}

impl NodeHandle {
    /// What this device says about itself in every handshake.
    pub fn payload(&self) -> HandshakePayload {
        HandshakePayload {
            version: wire::PROTOCOL_VERSION,
            incarnation: self.incarnation.load(Ordering::Relaxed),
            joining: None,
            inducting: None,
        }
    }

    /// Why a device joining with `secret` is refused now, if it is (`None`: the invitation is
    /// open; the core checks again and uses it up).
    pub fn join_refusal(&self, secret: &[u8; 16]) -> Option<wire::JoinRefusal> {
        let now_ms = crate::messaging::now_ms();
        match self.invitations.read() {
            Ok(invitations) => match invitations.get(secret) {
                Some(state) => state.refusal(now_ms),
                None => Some(wire::JoinRefusal::Unknown),
            },
            Err(_) => Some(wire::JoinRefusal::Unknown),
        }
    }

    /// The entry that tells a disabled device so, if `key` is one.
    pub fn disabled_entry(&self, key: &PublicKey) -> Option<wire::RosterEntry> {
        self.disabled.read().ok()?.get(key).cloned()
    }

    pub fn is_member(&self, key: &PublicKey) -> bool {
        self.members
            .read()
            .map(|m| m.contains(key))
            .unwrap_or(false)
    }

    /// Asks the core and waits for its answer.
    pub async fn call(&self, call: ApiCall) -> Result<Answer, RpcError> {
        self.call_with_progress(call, None).await
    }

    pub async fn call_with_progress(
        &self,
        call: ApiCall,
        progress: Option<mpsc::UnboundedSender<HandlerReply>>,
    ) -> Result<Answer, RpcError> {
        let stopping =
            || RpcError::new(cnsprcy::rpc::code::UNAVAILABLE, "the mesh is shutting down");
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Call {
                call,
                reply,
                progress,
            })
            .await
            .map_err(|_| stopping())?;
        answer.await.map_err(|_| stopping())
    }
}

/// The store as the core reads it.
impl StoreAccess for Arc<Store> {
    fn top(&self) -> Vec<u64> {
        Store::top(self)
    }
    fn buckets(&self, which: &[u8]) -> Vec<(u8, Vec<u64>)> {
        Store::buckets(self, which.iter().copied())
    }
    fn leaf_digests(&self, bucket: u8) -> Vec<u64> {
        Store::leaf_digests(self, bucket)
    }
    fn summaries(&self, leaves: &[u16]) -> Vec<wire::StoreSummary> {
        Store::summaries(self, leaves)
    }
    fn entries(&self, keys: &[&str]) -> Vec<StoreEntry> {
        Store::entries(self, keys.iter().copied())
    }
    fn apply_remote(&self, entries: Vec<StoreEntry>, from: &str, now_ms: u64) -> Vec<StoreEntry> {
        Store::apply_remote(self, entries, from, now_ms)
            .into_iter()
            .map(|c| c.entry)
            .collect()
    }
    fn take_skipped_for_a_write(&self) -> bool {
        Store::take_skipped_for_a_write(self)
    }
    fn count(&self, counter: crate::core::StoreCounter, amount: u64) {
        use crate::core::StoreCounter as C;
        let stats = &self.stats;
        let counter = match counter {
            C::SyncBytesSent => &stats.sync_bytes_sent,
            C::PushBytesSent => &stats.push_bytes_sent,
            C::BytesReceived => &stats.bytes_received,
            C::SyncRounds => &stats.sync_rounds,
        };
        counter.fetch_add(amount, Ordering::Relaxed);
    }
}

/// One live session, as the driver holds it.
struct Live {
    tx: Outbound,
    cancel: CancellationToken,
    /// The peer's address, where heartbeats over UDP go (at the port it offers).
    addr: SocketAddr,
    /// The port of this device's UDP socket that the peer can reach, if there is one.
    udp_port: Option<u16>,
    /// When to offer heartbeats over UDP again, after the peer was told to stop.
    udp_retry: udp_heartbeats::Retry,
}

/// Heartbeats over UDP: the sockets, the offers this device made (shared with the tasks that
/// receive), and those it took.
struct Udp {
    sockets: udp_heartbeats::Sockets,
    offered: Arc<std::sync::Mutex<Offered>>,
    targets: Targets,
    /// New sessions to offer heartbeats over UDP on, once the core's first messages on them
    /// (`Hello` first) are queued.
    to_offer: Vec<(SessionId, u16)>,
    /// `[mesh] heartbeat_interval`, which sets when a withdrawn offer is made again.
    heartbeat_interval: Duration,
}

impl Udp {
    fn offered(&self) -> std::sync::MutexGuard<'_, Offered> {
        udp_heartbeats::lock(&self.offered)
    }
}

/// A call waiting for the core's answer.
struct Pending {
    reply: oneshot::Sender<Answer>,
    progress: Option<mpsc::UnboundedSender<HandlerReply>>,
}

pub struct Node {
    handle: NodeHandle,
    core: Core<Arc<Store>>,
    sessions: HashMap<SessionId, Live>,
    next_session: SessionId,
    next_request: RequestId,
    pending: HashMap<RequestId, Pending>,
    events: mpsc::Receiver<Event>,
    requests: mpsc::Receiver<Request>,
    jobs: mpsc::UnboundedSender<Job>,
    /// What the writer reports: `Written` and `Persisted`.
    persisted: mpsc::UnboundedReceiver<Input>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Inputs the driver itself raised while carrying out outputs (a queue that was full).
    local: VecDeque<Input>,
    tasks: TaskTracker,
    handlers: Arc<HandlersLink>,
    udp: Udp,
}

/// What the node is started with.
pub struct NodeSetup {
    pub identity: Arc<Identity>,
    pub name: DeviceName,
    pub config: MeshConfig,
    pub listening: Vec<SocketAddr>,
    pub members: Vec<Member>,
    pub handlers: Arc<HandlersLink>,
    pub files: Files,
    pub restored: crate::persist::Restored,
    pub store: Arc<Store>,
    /// Where heartbeats over UDP come in (none: they all go over the sessions).
    pub udp: udp_heartbeats::Sockets,
}

impl Node {
    pub fn new(setup: NodeSetup) -> std::io::Result<(Self, NodeHandle)> {
        let NodeSetup {
            identity,
            name,
            config,
            listening,
            members,
            handlers,
            files,
            restored,
            store,
            udp,
        } = setup;
        let (events_tx, events) = mpsc::channel(1024);
        let (requests_tx, requests) = mpsc::channel(64);
        let heartbeat_interval = config.heartbeat_interval;
        let filter = InterfaceFilter::mesh(&config.interfaces);
        let interfaces = Arc::new(Interfaces::new(filter.clone()));
        let handle = NodeHandle {
            events: events_tx,
            requests: requests_tx,
            members: Arc::new(RwLock::new(HashSet::new())),
            invitations: Arc::default(),
            disabled: Arc::default(),
            identity: identity.clone(),
            incarnation: Arc::new(AtomicU64::new(0)),
            watch: broadcast::channel(1024).0,
            store: store.clone(),
            interfaces: interfaces.clone(),
            pairing: Arc::new(crate::pairing::Pairing::new(
                name.clone(),
                identity.public_key(),
            )),
            // Discovery browses from its start until the core says otherwise.
            browse: watch::channel(true).0,
        };
        handle
            .pairing
            .set_listen_port(listening.first().map_or(0, |a| a.port()));
        let (done_tx, persisted) = mpsc::unbounded_channel();
        let (jobs, writer) = crate::persist::spawn_writer(files, done_tx)?;
        let now = Now::system();
        let core = Core::new(
            Setup {
                own: identity.public_key(),
                name,
                config,
                listening,
                filter,
                interfaces: interfaces.list(),
                members,
                outbox: restored.outbox,
                delivered: restored.delivered,
                inbox: restored.inbox,
                seed: rand::random(),
            },
            store,
            now,
        );
        let node = Self {
            handle: handle.clone(),
            core,
            sessions: HashMap::new(),
            next_session: 0,
            next_request: 0,
            pending: HashMap::new(),
            events,
            requests,
            jobs,
            persisted,
            writer: Some(writer),
            local: VecDeque::new(),
            tasks: TaskTracker::new(),
            handlers,
            udp: Udp {
                sockets: udp,
                offered: Arc::default(),
                targets: Targets::default(),
                to_offer: Vec::new(),
                heartbeat_interval,
            },
        };
        Ok((node, handle))
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let receiving = CancellationToken::new();
        for socket in self.udp.sockets.all() {
            self.tasks.spawn(udp_heartbeats::receive(
                socket.clone(),
                self.udp.offered.clone(),
                self.handle.events.clone(),
                receiving.clone(),
            ));
        }
        let outputs = self.core.start(Now::system());
        self.execute(outputs);
        loop {
            let input = match self.local.pop_front() {
                Some(input) => input,
                None => {
                    let wake = tokio::time::Instant::from_std(self.core.next_wakeup());
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        Some(event) = self.events.recv() => match self.event_input(event) {
                            Some(input) => input,
                            None => continue,
                        },
                        Some(request) = self.requests.recv() => self.request_input(request),
                        Some(input) = self.persisted.recv() => input,
                        _ = tokio::time::sleep_until(wake) => Input::Tick,
                    }
                }
            };
            let outputs = self.core.handle(input, Now::system());
            self.execute(outputs);
            self.offer_udp_heartbeats();
        }
        let outputs = self.core.stop(Now::system());
        let stop: Vec<Run> = outputs
            .iter()
            .filter_map(|o| match o {
                Output::RaiseEvent(run) if run.event == "daemon-stop" => Some((**run).clone()),
                _ => None,
            })
            .collect();
        self.execute(
            outputs
                .into_iter()
                .filter(|o| !matches!(o, Output::RaiseEvent(_)))
                .collect(),
        );
        // The daemon-stop handler gets a moment to run before the sessions close.
        for run in stop {
            let _ =
                tokio::time::timeout(Duration::from_secs(2), self.handlers.run(run, None)).await;
        }
        for live in self.sessions.values() {
            live.cancel.cancel();
        }
        receiving.cancel();
        // The writer finishes what it was given, then ends.
        drop(std::mem::replace(
            &mut self.jobs,
            mpsc::unbounded_channel().0,
        ));
        if let Some(writer) = self.writer.take() {
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// The core's input for a task's event (`None` when the event needs none).
    fn event_input(&mut self, event: Event) -> Option<Input> {
        Some(match event {
            Event::Established {
                session,
                role,
                addr,
                local,
                first,
            } => {
                let id = self.start_session(*session, role, addr, local, first);
                return id;
            }
            Event::DialFailed {
                key,
                failure,
                error,
            } => Input::DialFailed {
                peer: key,
                failure,
                error,
            },
            Event::Knock { key, addr } => Input::Knock { peer: key, addr },
            Event::Frame {
                session,
                message: Message::UdpHeartbeats(offer),
            } => {
                self.take_udp_offer(session, offer);
                return None;
            }
            Event::Frame { session, message } => {
                if matches!(message, Message::Heartbeat { .. }) {
                    self.offer_udp_again_if_due(session);
                }
                Input::Frame { session, message }
            }
            Event::Activity { session } => Input::Activity { session },
            Event::Closed { session, reason } => {
                self.sessions.remove(&session);
                self.udp.targets.forget(session);
                self.udp.offered().forget(session);
                Input::SessionDown { session, reason }
            }
            Event::Writable { session } => Input::Writable { session },
            Event::HandlerStarted { run } => Input::HandlerStarted { run },
            Event::HandlerDone { run, result } => Input::HandlerDone { run, result },
        })
    }

    /// Starts the tasks of a session that completed its handshake, and tells the core.
    fn start_session(
        &mut self,
        session: Session,
        role: Role,
        addr: SocketAddr,
        local: Option<SocketAddr>,
        first: Option<Message>,
    ) -> Option<Input> {
        self.next_session += 1;
        let id = self.next_session;
        let peer = session.remote_key;
        let incarnation = session.remote.incarnation;
        let joining = session.remote.joining.clone();
        let (tx, rx) = Outbound::new();
        let cancel = CancellationToken::new();
        let task = SessionTask {
            session,
            id,
            outbound_tx: tx.clone(),
            outbound: rx,
            events: self.handle.events.clone(),
            cancel: cancel.clone(),
        };
        self.tasks.spawn(task.run());
        // Heartbeats from this peer may come over UDP: one packet each instead of two.
        let udp_port = local.and_then(|local| self.udp.sockets.port_for(local));
        if let Some(port) = udp_port {
            self.udp.to_offer.push((id, port));
        }
        self.sessions.insert(
            id,
            Live {
                tx,
                cancel,
                addr,
                udp_port,
                udp_retry: udp_heartbeats::Retry::new(self.udp.heartbeat_interval),
            },
        );
        match first {
            Some(Message::UdpHeartbeats(offer)) => self.take_udp_offer(id, offer),
            Some(message) => self.local.push_back(Input::Frame {
                session: id,
                message,
            }),
            None => {}
        }
        Some(Input::SessionUp {
            session: id,
            peer,
            initiator: role == Role::Initiator,
            incarnation,
            addr,
            local,
            joining,
        })
    }

    fn request_input(&mut self, request: Request) -> Input {
        match request {
            Request::Call {
                call,
                reply,
                progress,
            } => {
                self.next_request += 1;
                let request = self.next_request;
                self.pending.insert(request, Pending { reply, progress });
                Input::Api { request, call }
            }
            Request::Network(interfaces) => {
                self.handle.interfaces.update(interfaces.clone());
                Input::Network(interfaces)
            }
            Request::Discovered {
                instance,
                addresses,
            } => Input::Discovered {
                instance,
                addresses,
            },
            Request::StoreWritten(entry) => Input::StoreWritten(*entry),
        }
    }

    fn execute(&mut self, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send { session, message } => {
                    if let Message::Heartbeat { next_ms, .. } = message
                        && self.send_heartbeat_over_udp(session, &message)
                        // "No more follow" goes over the session as well: it must not be lost,
                        // and whichever comes second is the same news.
                        && next_ms.is_some()
                    {
                        continue;
                    }
                    let refused = match self.sessions.get(&session) {
                        Some(live) => live.tx.try_send(message).err(),
                        // Ended already; the core hears of it from the session task.
                        None => None,
                    };
                    if let Some(message) = refused {
                        self.local.push_back(Input::Unsent {
                            session,
                            message: *message,
                        });
                    }
                }
                Output::Close { session, reason } => {
                    if let Some(live) = self.sessions.remove(&session) {
                        tracing::debug!(session, "closing a session: {reason}");
                        live.cancel.cancel();
                    }
                }
                Output::CloseAfterFlush { session, reason } => {
                    if let Some(live) = self.sessions.remove(&session) {
                        tracing::debug!(
                            session,
                            "closing a session once its queue went out: {reason}"
                        );
                        self.tasks.spawn(async move {
                            tokio::time::sleep(FLUSH_GRACE).await;
                            live.cancel.cancel();
                        });
                    }
                }
                Output::Dial {
                    peer,
                    addresses,
                    joining,
                } => {
                    self.tasks
                        .spawn(dial(self.handle.clone(), peer, addresses, joining));
                }
                Output::Disabled(disabled) => {
                    if let Ok(mut shared) = self.handle.disabled.write() {
                        *shared = disabled;
                    }
                }
                Output::Invitations(invitations) => {
                    if let Ok(mut shared) = self.handle.invitations.write() {
                        *shared = invitations;
                    }
                }
                Output::RunHandler { run, handler } => {
                    let (handlers, events) = (self.handlers.clone(), self.handle.events.clone());
                    self.tasks.spawn(async move {
                        let (started_tx, started) = oneshot::channel();
                        // Ends when the handler started, or without a word when it never did.
                        let tell_started = async {
                            if started.await.is_ok() {
                                let _ = events.send(Event::HandlerStarted { run }).await;
                            }
                        };
                        let (result, ()) =
                            tokio::join!(handlers.run(*handler, Some(started_tx)), tell_started);
                        let _ = events.send(Event::HandlerDone { run, result }).await;
                    });
                }
                Output::RaiseEvent(run) => {
                    let handlers = self.handlers.clone();
                    self.tasks.spawn(async move {
                        let event = run.event.clone();
                        match handlers.run(*run, None).await {
                            Ok(RunResult {
                                outcome: Outcome::NoHandler,
                                ..
                            }) => {}
                            Ok(result) => {
                                tracing::debug!(%event, ?result.outcome, "event handler finished")
                            }
                            Err(e) => tracing::debug!(%event, "event handler not run: {e}"),
                        }
                    });
                }
                Output::Persist { op, token } => {
                    if self.jobs.send(Job { op, token }).is_err()
                        && let Some(token) = token
                    {
                        self.local.push_back(Input::Persisted {
                            token,
                            result: Err("the writer has stopped".into()),
                        });
                    }
                }
                Output::Answer { request, answer } => {
                    if let Some(pending) = self.pending.remove(&request) {
                        let _ = pending.reply.send(answer);
                    }
                }
                Output::Progress { request, reply } => {
                    if let Some(progress) =
                        self.pending.get(&request).and_then(|p| p.progress.as_ref())
                    {
                        let _ = progress.send(*reply);
                    }
                }
                Output::Watch(event) => {
                    let _ = self.handle.watch.send(event);
                }
                Output::Members(members) => {
                    if let Ok(mut shared) = self.handle.members.write() {
                        *shared = members;
                    }
                }
                Output::Incarnation(incarnation) => {
                    self.handle
                        .incarnation
                        .store(incarnation, Ordering::Relaxed);
                }
                Output::Browse(browse) => {
                    self.handle.browse.send_replace(browse);
                }
                Output::HeartbeatMissed { session } => self.withdraw_udp_offer(session),
            }
        }
    }
}

impl Node {
    /// Offers heartbeats over UDP on the sessions that came up, behind what the core sent on
    /// them first (the peer learns where this device listens from that `Hello`).
    fn offer_udp_heartbeats(&mut self) {
        for (session, port) in std::mem::take(&mut self.udp.to_offer) {
            let Some(live) = self.sessions.get(&session) else {
                continue;
            };
            let offer = self.udp.offered().offer(session, port);
            if live
                .tx
                .try_send(Message::UdpHeartbeats(Some(offer)))
                .is_err()
            {
                self.udp.offered().forget(session);
            }
        }
    }

    /// A peer's offer (or withdrawal) of heartbeats over UDP, for a session of this device.
    fn take_udp_offer(&mut self, session: SessionId, offer: Option<wire::UdpHeartbeatOffer>) {
        let Some(live) = self.sessions.get(&session) else {
            return;
        };
        match offer {
            // Without a UDP socket of our own (`[mesh] interfaces` set, or none could be
            // bound), heartbeats stay on the session: an unbound socket would not keep to the
            // allowed interfaces.
            Some(offer) if self.udp.sockets.all().next().is_some() => {
                tracing::debug!(session, "heartbeats on this session go over UDP");
                self.udp.targets.take(session, live.addr, &offer);
            }
            _ => self.udp.targets.forget(session),
        }
    }

    /// Sends a heartbeat over UDP if the peer asked for that; false when it must go over the
    /// session.
    fn send_heartbeat_over_udp(&mut self, session: SessionId, message: &Message) -> bool {
        self.udp
            .targets
            .seal(session, message)
            .is_some_and(|(to, datagram)| self.udp.sockets.send(to, &datagram))
    }

    /// A heartbeat over UDP from this session's peer went missing, yet the peer is there:
    /// have it send them over the session from now on.
    fn withdraw_udp_offer(&mut self, session: SessionId) {
        let Some(live) = self.sessions.get_mut(&session) else {
            return;
        };
        if !self.udp.offered().is_live(session) {
            return;
        }
        if live.tx.try_send(Message::UdpHeartbeats(None)).is_err() {
            // The queue is full: the next heartbeat that goes missing asks again.
            return;
        }
        live.udp_retry.withdrawn(std::time::Instant::now());
        tracing::info!(
            session,
            peer = %live.addr,
            "a heartbeat over UDP from {} went missing while it was there; its heartbeats come over TCP for a while",
            live.addr.ip()
        );
        self.udp.offered().withdraw(session);
    }

    /// A heartbeat came on a session whose peer was told to stop sending them over UDP: when
    /// the wait is over, offer UDP again.
    fn offer_udp_again_if_due(&mut self, session: SessionId) {
        let Some(live) = self.sessions.get_mut(&session) else {
            return;
        };
        if let Some(port) = live.udp_port
            && live.udp_retry.due(std::time::Instant::now())
        {
            tracing::debug!(session, "offering heartbeats over UDP again");
            self.udp.to_offer.push((session, port));
        }
    }
}

/// How long a session closed with `CloseAfterFlush` has to send what is queued.
const FLUSH_GRACE: Duration = Duration::from_secs(1);

/// Dials all of a member's addresses at once and runs the handshake on the first connection
/// that comes up (then the next, if that handshake fails). Only one handshake at a time: two
/// completed ones would each replace the other on the far side, and both would die.
///
/// With `[mesh] interfaces` set, each connection's socket is bound to an allowed interface, so
/// that no route takes the session through another one: the interface the kernel's route picks
/// when it is allowed, else every allowed interface that could carry the address, at once. An
/// address that no allowed interface can carry is not dialled.
async fn dial(
    handle: NodeHandle,
    key: PublicKey,
    addresses: Vec<SocketAddr>,
    joining: Option<wire::Joining>,
) {
    let mut payload = handle.payload();
    payload.joining = joining;
    let mut connects = JoinSet::new();
    let mut errors = Vec::new();
    // How the dial failed, for `peers`' reason: a handshake the other side closed at any
    // address (it was reached) says the most; else `[mesh] interfaces`, when they kept every
    // address from being dialled.
    let mut refused = false;
    let mut not_dialled = 0;
    for addr in addresses {
        let devices = match handle.interfaces.dial_plan(addr.ip()) {
            DialPlan::Unbound => vec![None],
            DialPlan::Devices(devices) => devices.into_iter().map(Some).collect(),
            DialPlan::Impossible(why) => {
                errors.push(format!("{addr}: not dialled: {why}"));
                not_dialled += 1;
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
        match transport::initiate(stream, &handle.identity, &key, &payload).await {
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
            Err(e) => {
                refused |= e.closed_by_peer();
                errors.push(format!("{addr}: {e}"));
            }
        }
    }
    let failure = if refused {
        DialFailure::HandshakeRefused
    } else if not_dialled > 0 && not_dialled == errors.len() {
        DialFailure::Interfaces
    } else {
        DialFailure::Other
    };
    let _ = handle
        .events
        .send(Event::DialFailed {
            key,
            failure,
            error: errors.join("; "),
        })
        .await;
}
