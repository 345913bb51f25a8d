//! The mesh's rules, without I/O: sessions (one per pair, keepalive, who is direct, relayed or
//! unreachable), dialling, routed envelopes, tagged messages (outbox, acknowledgements, replies,
//! delivery at most once), the roster and anti-entropy of the store.
//!
//! `Core::handle` takes one `Input` and the time, and returns `Output`s for the driver to carry
//! out: bytes to send, dials, handler runs, things to make durable, answers to API calls, events.
//! It never reads a clock, a random generator, a socket or a file of its own: time comes with each
//! input, randomness from a generator seeded at construction, and the store is read through the
//! `StoreAccess` trait (sled in the daemon, a map in the simulator). So one core can be driven by
//! tokio (`node.rs`) or by the deterministic simulator (`tests/sim`), and both see the same rules.
//!
//! Invariants (checked by the simulator after every run):
//! - at most one session per pair of devices, the same one on both sides once both know of it;
//! - a member is `direct` exactly while a session with it is up; `relayed` only through a direct
//!   peer that reports a session with it;
//! - a message ran its handler at most once per target (the id is durable before the ack and
//!   the run), and at least once per target that was reachable within its TTL;
//! - what the outbox holds, it holds on disk before `send` answers;
//! - every queue the core keeps is bounded.

mod api;
mod detector;
mod forward;
mod membership;
mod messages;
mod reasons;
mod sessions;
mod store_sync;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cnsprcy::api::{
    HandlerReply, MemberInfo, MessagesInfo, PeerInfo, PingResult, SendResult, WatchEvent,
};
use cnsprcy::config::MeshConfig;
use cnsprcy::identity::{DeviceName, PublicKey};
use cnsprcy::ipc::{Interface, Run, RunResult};
use cnsprcy::netif::InterfaceFilter;
use cnsprcy::rpc::RpcError;
use cnsprcy::wire::{Joining, KeyBytes, MemberState, Message, MessageId, StoreEntry, StoreSummary};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::det::{Map, Set};
use crate::liveness::Liveness;
use crate::messaging::{Delivered, Outbox, OutboxEntry, RecentOutcomes, Wait};
use crate::ordering::Holdback;
use crate::peers::PeerTable;
use crate::roster::{Member, Roster};

pub(crate) use api::error;
pub use api::{code, member_info};
pub use membership::{
    InvitationState, Invitations, Invited, JOIN_TIMEOUT, Joined, MAX_INVITATION_LIFETIME, Removed,
};
pub use messages::{DEFAULT_TTL, SendRequest};
pub use reasons::DialFailure;

/// A session, numbered by the driver when its handshake completed; never reused.
pub type SessionId = u64;
/// An API call, numbered by the driver; its answer carries the number back.
pub type RequestId = u64;
/// A handler run the core asked for; its result carries the number back.
pub type RunId = u64;
/// A persistence action whose completion the core waits for.
pub type Token = u64;

/// The time of an input: monotonic for timers and round trips, the wall clock (Unix
/// milliseconds) for message lifetimes, store timestamps and what users read.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub mono: Instant,
    pub wall_ms: u64,
}

impl Now {
    /// The system's clocks: for the driver only.
    pub fn system() -> Self {
        Self {
            mono: Instant::now(),
            wall_ms: crate::messaging::now_ms(),
        }
    }

    pub fn wall(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + Duration::from_millis(self.wall_ms)
    }
}

/// The replicated store as the core reads and merges it. Reads and merges are quick (an
/// in-memory tree and a cache-backed engine); local writes are made durable by the API before
/// the core hears of them (`Input::StoreWritten`).
pub trait StoreAccess {
    /// The 256 bucket digests.
    fn top(&self) -> Vec<u64>;
    /// All bucket digests folded into one: equal roots mean equal stores (but for a 64-bit
    /// collision).
    fn root(&self) -> u64 {
        crate::store::digest::root(&self.top())
    }
    /// The leaf digests of the given buckets.
    fn buckets(&self, which: &[u8]) -> Vec<(u8, Vec<u64>)>;
    /// The leaf digests of one bucket.
    fn leaf_digests(&self, bucket: u8) -> Vec<u64>;
    /// The versions held in the given leaves.
    fn summaries(&self, leaves: &[u16]) -> Vec<StoreSummary>;
    /// The stored entries for `keys` (tombstones included; absent keys left out).
    fn entries(&self, keys: &[&str]) -> Vec<StoreEntry>;
    /// Merges entries from `from`; returns those that changed the store. `now_ms` bounds how
    /// far in the future a timestamp may be.
    fn apply_remote(&self, entries: Vec<StoreEntry>, from: &str, now_ms: u64) -> Vec<StoreEntry>;
    /// Whether `apply_remote` skipped an entry since the last call because a local write of its
    /// key was being made durable (the engine in use never skips: false).
    fn take_skipped_for_a_write(&self) -> bool {
        false
    }
    /// Counts traffic for `db.stats`: bytes of store messages sent (for anti-entropy or for
    /// pushing writes) and received, and rounds started.
    fn count(&self, counter: StoreCounter, amount: u64);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreCounter {
    SyncBytesSent,
    PushBytesSent,
    BytesReceived,
    SyncRounds,
}

/// Everything the core is told.
#[derive(Debug)]
pub enum Input {
    /// A handshake completed: by this device (`initiator`) or accepted. For an accepted session
    /// the driver reports it once its first message arrived (and then that message as a `Frame`).
    SessionUp {
        session: SessionId,
        peer: PublicKey,
        initiator: bool,
        /// The peer's incarnation from the handshake.
        incarnation: u64,
        /// The peer's address.
        addr: SocketAddr,
        /// This device's end.
        local: Option<SocketAddr>,
        /// A device that is not a member yet, joining with an invitation (accepted sessions).
        joining: Option<Joining>,
    },
    /// The session's connection ended (read or write failed, or the peer closed it).
    SessionDown {
        session: SessionId,
        reason: String,
    },
    /// A whole message arrived on a session.
    Frame {
        session: SessionId,
        message: Message,
    },
    /// Part of a large message arrived: the session is alive.
    Activity {
        session: SessionId,
    },
    /// A message `Output::Send` asked for did not fit the session's queue.
    Unsent {
        session: SessionId,
        message: Message,
    },
    /// A session's queue, which refused a message, has room again.
    Writable {
        session: SessionId,
    },
    /// Every address of a dial failed.
    DialFailed {
        peer: PublicKey,
        failure: DialFailure,
        /// What failed at each address.
        error: String,
    },
    /// A device that is not a member sent a handshake this device could decrypt; the driver
    /// dropped the connection.
    Knock {
        peer: PublicKey,
        addr: SocketAddr,
    },
    Api {
        request: RequestId,
        call: ApiCall,
    },
    /// The handler of a run asked for with `Output::RunHandler` started.
    HandlerStarted {
        run: RunId,
    },
    /// A handler run asked for with `Output::RunHandler` finished (or could not run).
    HandlerDone {
        run: RunId,
        result: Result<RunResult, String>,
    },
    /// The records of a `Persist` with a token are written, not yet synced: a crash of the
    /// process keeps them (they are in the page cache), a power cut may not. Only a delivery's
    /// is told (its handler may start now; its ack waits for `Persisted`); a driver that never
    /// tells it is correct too, only slower.
    Written {
        token: Token,
    },
    /// A `Persist` with a token was carried out.
    Persisted {
        token: Token,
        result: Result<(), String>,
    },
    /// The interfaces and addresses now (netwatch).
    Network(Vec<Interface>),
    /// A device advertising `instance` on the local network (discovery).
    Discovered {
        instance: String,
        addresses: Vec<SocketAddr>,
    },
    /// A local store write is durable: push it to the members and raise its events.
    StoreWritten(StoreEntry),
    /// Time passed (`Core::next_wakeup` fell due).
    Tick,
}

/// What the API asks.
#[derive(Debug)]
pub enum ApiCall {
    Peers,
    Peer {
        name: String,
    },
    Ping {
        name: String,
        timeout: Duration,
    },
    AddMember(Member),
    /// Disable or revoke a device.
    RemoveMember {
        name: String,
        state: MemberState,
    },
    /// A one-time invitation valid this long.
    Invite {
        lifetime: Duration,
    },
    Join(cnsprcy::invitation::Invitation),
    /// Stop a join under way (its caller gave up).
    CancelJoin,
    /// Every device of the roster, removed ones included.
    Roster,
    /// This device leaves the mesh (`force`: even when no member hears of it).
    Leave {
        force: bool,
    },
    Retry,
    Send(SendRequest),
    /// The outbox and recent outcomes of messages from this device.
    Messages,
    Interfaces,
    /// Writers' names for store items: this device and the members.
    Names,
    /// The devices that knocked lately (for `status`).
    Knocks,
}

/// The core's answer to an `ApiCall`.
#[derive(Debug)]
pub enum Answer {
    Peers(Vec<PeerInfo>),
    Peer(Result<PeerInfo, RpcError>),
    Ping(Result<PingResult, RpcError>),
    Member(Result<MemberInfo, RpcError>),
    Removed(Result<Removed, RpcError>),
    /// `leave`: how many members were told.
    Left(Result<usize, RpcError>),
    Invited(Invited),
    Joined(Result<Joined, RpcError>),
    /// `cancel_join`: whether a join was under way.
    JoinCancelled(bool),
    Roster(Vec<cnsprcy::api::RosterInfo>),
    Retry(RetryOutcome),
    Send(Result<SendResult, RpcError>),
    Messages(Box<MessagesInfo>),
    Interfaces(Vec<Interface>),
    Names(std::collections::HashMap<KeyBytes, String>),
    Knocks(Vec<cnsprcy::api::Knock>),
}

/// What `retry` did: how many members are dialled now, and those that cannot be because no
/// address is known for them.
#[derive(Debug)]
pub struct RetryOutcome {
    pub dialling: usize,
    pub no_address: Vec<Member>,
}

/// What to make durable. The driver's writer carries these out in order.
#[derive(Debug, Clone)]
pub enum PersistOp {
    /// Write a message of the outbox, as it was accepted (synced).
    OutboxSave(Box<OutboxEntry>),
    /// `target` acknowledged an outbox message. Need not be durable: what a crash loses of
    /// these is sent again, and refused there as a repeat (and acknowledged again).
    OutboxAcked {
        id: MessageId,
        target: KeyBytes,
    },
    OutboxRemove(MessageId),
    /// Record a message as delivered: its id, kept until `until_ms`, and the message itself in
    /// the inbox until its handler started (`InboxDone`), so that a stop in between does not
    /// lose the run: the next start runs it (`Setup::inbox`).
    Delivered {
        data: Box<cnsprcy::wire::Data>,
        until_ms: u64,
    },
    /// The handler of a delivered message started (or will never run): its inbox entry can go.
    /// Need not be durable before the core goes on.
    InboxDone(MessageId),
    /// Write the roster (every entry).
    Roster(Vec<Member>),
}

/// Everything the core asks for.
#[derive(Debug)]
pub enum Output {
    Send {
        session: SessionId,
        message: Message,
    },
    Close {
        session: SessionId,
        reason: String,
    },
    /// Like `Close`, after the messages queued on the session went out (or a second passed).
    CloseAfterFlush {
        session: SessionId,
        reason: String,
    },
    Dial {
        peer: PublicKey,
        addresses: Vec<SocketAddr>,
        /// The invitation to show, when joining through `peer`.
        joining: Option<Joining>,
    },
    /// Run the handler for a message delivered here; `Input::HandlerDone` follows.
    RunHandler {
        run: RunId,
        handler: Box<Run>,
    },
    /// Run the handler for a built-in event; nobody waits for it.
    RaiseEvent(Box<Run>),
    Persist {
        op: PersistOp,
        token: Option<Token>,
    },
    Answer {
        request: RequestId,
        answer: Answer,
    },
    /// A reply for a streaming `send` (`request`), as it arrived.
    Progress {
        request: RequestId,
        reply: Box<HandlerReply>,
    },
    /// For `subscribe`.
    Watch(WatchEvent),
    /// The members whose handshakes to accept changed.
    Members(std::collections::HashSet<PublicKey>),
    /// The invitations joining devices are checked against changed.
    Invitations(Invitations),
    /// The disabled devices (not revoked ones) and their entries: one that dials this device is
    /// told, so that it forgets the mesh also when it was offline when it was disabled.
    Disabled(std::collections::HashMap<PublicKey, cnsprcy::wire::RosterEntry>),
    /// This device's incarnation (sent in handshakes) changed.
    Incarnation(u64),
    /// A heartbeat from this session's peer was overdue, yet the peer answered the probe that
    /// followed: the way heartbeats take from it lost one (UDP blocked or lossy on that path;
    /// the driver then has them sent over the session).
    HeartbeatMissed {
        session: SessionId,
    },
    /// Whether discovery should look for members on the local network changed: it should while
    /// there is no member yet or some member is not `direct`. A whole mesh then sends no mDNS
    /// queries and gets no answers (docs/performance.md).
    Browse(bool),
}

/// What the core is built from: this device, its settings, and the state restored from disk.
pub struct Setup {
    pub own: PublicKey,
    pub name: DeviceName,
    pub config: MeshConfig,
    /// Where this device accepts sessions (ports resolved).
    pub listening: Vec<SocketAddr>,
    pub filter: InterfaceFilter,
    pub interfaces: Vec<Interface>,
    pub members: Vec<Member>,
    pub outbox: Vec<OutboxEntry>,
    pub delivered: Vec<(MessageId, u64)>,
    /// Messages recorded as delivered whose handler had not started, in the order they came.
    pub inbox: Vec<cnsprcy::wire::Data>,
    pub seed: u64,
}

/// One live session, as the core sees it.
#[derive(Debug)]
pub(crate) struct Live {
    id: SessionId,
    initiator: bool,
    incarnation: u64,
    addr: SocketAddr,
    local: Option<SocketAddr>,
    liveness: Liveness,
    /// The queue refused a message; `Writable` clears it.
    full: bool,
    /// Its keepalive is overdue or it is being probed (reported as `suspect`).
    suspect: bool,
    /// How long after its last frame its next heartbeat is overdue (while it sends this device
    /// heartbeats).
    heartbeat_watch: Option<Duration>,
    /// A probe of it waiting for the answer.
    probe: Option<detector::Probe>,
    /// When it last answered a probe.
    probe_answered: Option<Instant>,
    /// The store root in its last heartbeat differed from this device's.
    root_differed: bool,
    /// The keepalive interval the peer wants (`KeepaliveInterval`); `None` from a peer that
    /// never said, whose sessions stay at `[mesh] keepalive_interval`.
    peer_keepalive: Option<Duration>,
}

impl Live {
    /// The wall time of the last frame from the peer.
    fn last_frame_wall(&self, now: Now) -> std::time::SystemTime {
        now.wall()
            - now
                .mono
                .saturating_duration_since(self.liveness.last_received())
    }
}

/// A ping the API waits for.
#[derive(Debug)]
struct PendingPing {
    request: RequestId,
    key: PublicKey,
    sent: Instant,
    deadline: Instant,
    path: cnsprcy::api::PeerStatus,
    via: Option<PublicKey>,
    address: Option<SocketAddr>,
}

pub struct Core<S: StoreAccess> {
    own: PublicKey,
    name: DeviceName,
    config: MeshConfig,
    listening: Vec<SocketAddr>,
    filter: InterfaceFilter,
    /// The interfaces as last reported.
    interfaces: Vec<Interface>,
    /// Whether netwatch has reported yet (until then, changes are not compared).
    network_reported: bool,
    incarnation: u64,
    rng: StdRng,
    roster: Roster,
    table: PeerTable,
    /// Live sessions by peer; one per peer.
    sessions: Map<PublicKey, Live>,
    /// Peers by session, for every live session.
    session_peers: Map<SessionId, PublicKey>,
    outbox: Outbox,
    delivered: Delivered,
    /// Messages for this device whose id is being made durable, by persistence token.
    delivering: Map<Token, messages::Delivering>,
    /// Ids in `delivering`, so that a second copy meanwhile is neither recorded nor run twice.
    delivering_ids: Set<MessageId>,
    /// Handler runs that ended before their message's record was durable: reported to its
    /// origin after the ack, by message id.
    unreported: Map<MessageId, messages::Finished>,
    /// Messages for this device that wait for an earlier one from the same origin and tag,
    /// or for its handler to finish.
    holdback: Holdback,
    /// Handler runs under way.
    runs: Map<RunId, messages::Running>,
    /// Messages whose handler the handler service could not start, and how often it was asked:
    /// asked again at the next housekeeping round.
    unstarted: Vec<(cnsprcy::wire::Data, u32)>,
    /// What became of recent messages from this device.
    recent: RecentOutcomes,
    waits: Map<MessageId, Wait>,
    /// Sends whose outbox entry is being made durable, by token.
    storing: Map<Token, (RequestId, MessageId, SendResult)>,
    pending_pings: Map<u64, PendingPing>,
    /// Roster changes waiting to be on disk before they are answered.
    roster_changes: Map<Token, (RequestId, Answer)>,
    invitations: Invitations,
    pending_join: Option<membership::PendingJoin>,
    /// After `leave`: when to forget the mesh.
    leaving_at: Option<Instant>,
    /// RTTs last announced in `Neighbors`, to announce again only on real change.
    announced: Vec<(PublicKey, Option<Duration>)>,
    announced_at: Option<Instant>,
    /// Only RTTs moved since the last announcement, which may go again at this time.
    rtt_announce_due: Option<Instant>,
    /// The peer table's generations when statuses were last reported.
    reported_generation: Option<u64>,
    reported_rtts: u64,
    /// Something the outbox's sending depends on changed (or the housekeeping timer ran): look
    /// at it again after this input.
    outbox_dirty: bool,
    /// Bumped when a session becomes suspect or stops being so (statuses to report again).
    suspect_generation: u64,
    reported_suspects: u64,
    /// Status last reported per member.
    reported: Map<PublicKey, (cnsprcy::api::PeerStatus, Option<PublicKey>)>,
    /// Members whose failed dials were logged since they were last reachable.
    quiet_dials: Set<PublicKey>,
    /// What discovery resolved lately, members' advertisements or not, most recent last: a
    /// device added as a member later is found here (mDNS reports an advertisement once, when
    /// it first resolves it).
    discovered: std::collections::VecDeque<(String, Vec<SocketAddr>)>,
    /// The last thing that went wrong per member without a session (for `peers`' reason).
    problems: Map<PublicKey, reasons::Problem>,
    /// What `Output::Browse` said last.
    browsing: Option<bool>,
    /// Devices that are not members and sent handshakes lately (for `status`).
    knocks: reasons::Knocks,
    /// How many times `[mesh] keepalive_interval` this device wants its sessions kept alive
    /// at, as last told to its peers (`sessions::keepalive_step`).
    keepalive_step: u32,
    /// The peer this device sends heartbeats to, and when the next is due.
    heartbeat_to: Option<PublicKey>,
    next_heartbeat: Instant,
    next_housekeeping: Instant,
    /// When the outbox's first message expires (wall-clock ms; early rather than late: a
    /// message acknowledged meanwhile leaves it unchanged until the next expiry pass).
    next_expiry: Option<u64>,
    /// The time of the last input, to turn a wall-clock expiry into a monotonic wake-up.
    clock: Now,
    next_sync: Instant,
    next_token: Token,
    next_run: RunId,
    store: S,
    outputs: Vec<Output>,
}

/// How often held messages are looked at again and unacknowledged ones considered for resending.
pub const HOUSEKEEPING: Duration = Duration::from_secs(5);

impl<S: StoreAccess> Core<S> {
    pub fn new(setup: Setup, store: S, now: Now) -> Self {
        let mut rng = StdRng::seed_from_u64(setup.seed);
        let incarnation = rand::Rng::random(&mut rng);
        let roster = Roster::new(setup.own, &setup.name, setup.members, now.wall_ms);
        let mut table = PeerTable::default();
        table.sync_members(roster.members().iter().map(|m| m.public_key), now.mono);
        let network_reported = false;
        let mut core = Self {
            own: setup.own,
            name: setup.name,
            config: setup.config,
            listening: setup.listening,
            filter: setup.filter,
            interfaces: setup.interfaces,
            network_reported,
            incarnation,
            rng,
            roster,
            table,
            sessions: Map::default(),
            session_peers: Map::default(),
            outbox: Outbox::restore(setup.outbox, now.wall_ms),
            delivered: Delivered::restore(setup.delivered, now.wall_ms),
            delivering: Map::default(),
            delivering_ids: Set::default(),
            unreported: Map::default(),
            holdback: Holdback::default(),
            runs: Map::default(),
            unstarted: Vec::new(),
            recent: RecentOutcomes::default(),
            waits: Map::default(),
            storing: Map::default(),
            pending_pings: Map::default(),
            roster_changes: Map::default(),
            invitations: Invitations::default(),
            pending_join: None,
            leaving_at: None,
            announced: Vec::new(),
            announced_at: None,
            rtt_announce_due: None,
            reported_generation: None,
            reported_rtts: 0,
            outbox_dirty: true,
            suspect_generation: 0,
            reported_suspects: 0,
            reported: Map::default(),
            quiet_dials: Set::default(),
            discovered: std::collections::VecDeque::new(),
            problems: Map::default(),
            browsing: None,
            knocks: reasons::Knocks::default(),
            keepalive_step: 1,
            heartbeat_to: None,
            next_heartbeat: now.mono,
            next_housekeeping: now.mono + HOUSEKEEPING,
            next_expiry: None,
            clock: now,
            next_sync: now.mono + crate::store::SYNC_INTERVAL,
            next_token: 0,
            next_run: 0,
            store,
            outputs: Vec::new(),
        };
        core.next_expiry = core.outbox.earliest_expiry();
        core.outputs.push(Output::Incarnation(incarnation));
        core.outputs.push(Output::Members(core.member_keys()));
        core.outputs.push(Output::Disabled(core.disabled_entries()));
        core.raise_event("daemon-start", Vec::new());
        core.rerun_inbox(setup.inbox, now);
        core
    }

    /// What the core asked for while it was built (the incarnation, the members, the
    /// `daemon-start` event, the first dials).
    pub fn start(&mut self, now: Now) -> Vec<Output> {
        self.after(now);
        std::mem::take(&mut self.outputs)
    }

    /// Takes one input at `now`; returns what to do.
    pub fn handle(&mut self, input: Input, now: Now) -> Vec<Output> {
        self.clock = now;
        if self.next_expiry.is_some_and(|at| now.wall_ms >= at) {
            // Before the input, so that nothing (a `messages` call, say) sees an expired
            // message as waiting; the wake-up for it is in `next_wakeup`.
            self.expire_messages(now);
        }
        match input {
            Input::SessionUp {
                session,
                peer,
                initiator,
                incarnation,
                addr,
                local,
                joining,
            } => {
                let admitted = match joining {
                    Some(joining) if self.roster.get(&peer).is_none() => {
                        self.admit_joining(session, &peer, &joining, addr, now)
                    }
                    _ => true,
                };
                if admitted {
                    self.on_session_up(session, peer, initiator, incarnation, addr, local, now);
                }
            }
            Input::SessionDown { session, reason } => self.on_session_down(session, &reason, now),
            Input::Frame { session, message } => self.on_frame(session, message, now),
            Input::Activity { session } => {
                if let Some(live) = self.live_mut(session) {
                    live.liveness.on_receive(now.mono);
                }
            }
            Input::Unsent { session, message } => self.on_unsent(session, message),
            Input::Writable { session } => {
                if let Some(live) = self.live_mut(session) {
                    live.full = false;
                }
                self.outbox_dirty = true;
            }
            Input::DialFailed {
                peer,
                failure,
                error,
            } => self.on_dial_failed(peer, failure, &error, now),
            Input::Knock { peer, addr } => self.on_knock(peer, addr, now),
            Input::Api { request, call } => self.on_api(request, call, now),
            Input::HandlerStarted { run } => self.on_handler_started(run),
            Input::HandlerDone { run, result } => self.on_handler_done(run, result, now),
            Input::Written { token } => self.delivery_written(token),
            Input::Persisted { token, result } => self.on_persisted(token, result, now),
            Input::Network(interfaces) => self.on_network(interfaces, now),
            Input::Discovered {
                instance,
                addresses,
            } => self.on_discovered(&instance, addresses, now),
            Input::StoreWritten(entry) => self.store_written(entry, now),
            Input::Tick => self.on_tick(now),
        }
        self.after(now);
        std::mem::take(&mut self.outputs)
    }

    /// The daemon stops: answer every waiting call, raise `daemon-stop`, close the sessions.
    pub fn stop(&mut self, now: Now) -> Vec<Output> {
        self.finish_waits(now, true);
        let pings: Vec<u64> = self.pending_pings.keys().copied().collect();
        for nonce in pings {
            if let Some(ping) = self.pending_pings.remove(&nonce) {
                self.answer(ping.request, Answer::Ping(Err(shutting_down())));
            }
        }
        let storing: Vec<Token> = self.storing.keys().copied().collect();
        for token in storing {
            if let Some((request, _, result)) = self.storing.remove(&token) {
                // Its outbox entry is being written now; it goes out after the restart.
                self.answer(request, Answer::Send(Ok(result)));
            }
        }
        self.raise_event("daemon-stop", Vec::new());
        let sessions: Vec<SessionId> = self.session_peers.keys().copied().collect();
        for session in sessions {
            self.outputs.push(Output::Close {
                session,
                reason: "this device is stopping".into(),
            });
        }
        std::mem::take(&mut self.outputs)
    }

    /// When the core next has something to do by itself (send `Input::Tick` then).
    pub fn next_wakeup(&self) -> Instant {
        let mut wake = self.next_housekeeping.min(self.next_sync);
        for live in self.sessions.values() {
            wake = wake.min(live.liveness.next_deadline());
            if !live.suspect {
                wake = wake.min(live.liveness.suspect_at());
            }
        }
        if let Some(dial) = self.table.next_dial_at() {
            wake = wake.min(dial);
        }
        for wait in self.waits.values() {
            wake = wake.min(wait.deadline);
        }
        for ping in self.pending_pings.values() {
            wake = wake.min(ping.deadline);
        }
        if let Some(at) = self.detector_wakeup() {
            wake = wake.min(at);
        }
        if let Some(at) = self.membership_wakeup() {
            wake = wake.min(at);
        }
        if let Some(expiry) = self.next_expiry {
            // Expiry is wall-clock time; a clock step moves it, which the next pass corrects.
            let wait = Duration::from_millis(expiry.saturating_sub(self.clock.wall_ms));
            wake = wake.min(self.clock.mono + wait);
        }
        if let Some(at) = self.rtt_announce_due {
            wake = wake.min(at);
        }
        wake
    }

    fn on_tick(&mut self, now: Now) {
        self.poll_sessions(now);
        self.detect_failures(now);
        self.expire_pings(now);
        self.join_due(now);
        self.leave_due(now);
        if now.mono >= self.next_housekeeping {
            self.next_housekeeping = now.mono + HOUSEKEEPING;
            self.release_held(now);
            self.retry_unstarted(now);
            // Resends fall due with time: considered at least this often.
            self.outbox_dirty = true;
        }
        if now.mono >= self.next_sync {
            self.next_sync = now.mono + crate::store::SYNC_INTERVAL;
            self.store_anti_entropy();
        }
    }

    /// After every input: dial who is due, tell peers and subscribers what changed, send what
    /// the outbox owes, answer finished waits.
    fn after(&mut self, now: Now) {
        self.stretch_keepalives();
        self.dial_due(now);
        self.send_heartbeats(now);
        self.mark_suspects(now);
        self.after_change(now);
        self.flush_outbox(now);
        self.finish_waits(now, false);
    }

    pub(crate) fn own_bytes(&self) -> KeyBytes {
        *self.own.as_bytes()
    }

    fn disabled_entries(&self) -> std::collections::HashMap<PublicKey, cnsprcy::wire::RosterEntry> {
        self.roster
            .entries()
            .into_iter()
            .filter(|e| e.state == MemberState::Disabled && e.public_key != self.own)
            .map(|e| (e.public_key, e.to_wire(&self.own)))
            .collect()
    }

    fn member_keys(&self) -> std::collections::HashSet<PublicKey> {
        self.roster.members().iter().map(|m| m.public_key).collect()
    }

    /// The name of a device the roster knows (a removed one too, for what is logged as it
    /// goes), or its ID.
    pub(crate) fn member_name(&self, key: &PublicKey) -> String {
        self.roster
            .entry(key)
            .map(|m| m.name.to_string())
            .unwrap_or_else(|| key.device_id().to_string())
    }

    fn jitter(&mut self) -> f64 {
        rand::Rng::random::<f64>(&mut self.rng)
    }

    fn token(&mut self) -> Token {
        self.next_token += 1;
        self.next_token
    }

    fn answer(&mut self, request: RequestId, answer: Answer) {
        self.outputs.push(Output::Answer { request, answer });
    }

    fn persist(&mut self, op: PersistOp, wait: bool) -> Option<Token> {
        let token = wait.then(|| self.token());
        self.outputs.push(Output::Persist { op, token });
        token
    }

    fn watch(&mut self, event: WatchEvent) {
        self.outputs.push(Output::Watch(event));
    }

    fn live_mut(&mut self, session: SessionId) -> Option<&mut Live> {
        let peer = self.session_peers.get(&session)?;
        self.sessions.get_mut(peer).filter(|l| l.id == session)
    }

    fn on_persisted(&mut self, token: Token, result: Result<(), String>, now: Now) {
        if let Some(delivering) = self.delivering.remove(&token) {
            self.delivery_recorded(delivering, result, now);
        } else if let Some((request, id, send)) = self.storing.remove(&token) {
            self.send_stored(request, id, send, result, now);
        } else if let Some((request, answer)) = self.roster_changes.remove(&token) {
            self.roster_saved(request, answer, result);
        }
    }

    /// A built-in event's handler run (`peer-up`, `store-change`, ...), if there is one.
    fn raise_event(&mut self, event: &str, env: Vec<(String, String)>) {
        let run = self.event_run(event, env);
        self.outputs.push(Output::RaiseEvent(Box::new(run)));
    }

    fn event_run(&self, event: &str, env: Vec<(String, String)>) -> Run {
        Run {
            run_id: 0,
            event: event.to_owned(),
            tag: event.to_owned(),
            from: None,
            message_id: None,
            device: self.name.to_string(),
            env,
            payload: Vec::new(),
            report_start: false,
        }
    }

    /// The number of sessions, for tests and the simulator's checks.
    pub fn session_of(&self, peer: &PublicKey) -> Option<SessionId> {
        self.sessions.get(peer).map(|l| l.id)
    }

    /// Where `peer` stands, for the simulator's checks.
    pub fn reach(&self, peer: &PublicKey) -> crate::peers::Reach {
        self.table.reach(peer)
    }

    /// The status last reported (logged, told to subscribers) for `peer`, if any.
    pub fn reported_status(&self, peer: &PublicKey) -> Option<cnsprcy::api::PeerStatus> {
        self.reported.get(peer).map(|(status, _)| *status)
    }

    /// How many messages the outbox holds.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// The sizes of the core's queues and maps, for the simulator's bound checks.
    pub fn queue_sizes(&self) -> BTreeMap<&'static str, usize> {
        BTreeMap::from([
            ("outbox", self.outbox.len()),
            ("delivered", self.delivered.len()),
            ("delivering", self.delivering.len()),
            ("unreported", self.unreported.len()),
            ("runs", self.runs.len()),
            ("unstarted", self.unstarted.len()),
            ("held", self.holdback.len()),
            ("recent outcomes", self.recent.len()),
            ("waits", self.waits.len()),
            ("pings", self.pending_pings.len()),
            ("sessions", self.sessions.len()),
            ("discovered", self.discovered.len()),
            ("problems", self.problems.len()),
            ("knocks", self.knocks.len()),
        ])
    }

    pub fn members(&self) -> &[Member] {
        self.roster.members()
    }

    /// The roster's digest: equal on devices that hold the same roster.
    pub fn roster_digest(&self) -> u64 {
        self.roster.digest()
    }
}

fn shutting_down() -> RpcError {
    RpcError::new(cnsprcy::rpc::code::UNAVAILABLE, "the mesh is shutting down")
}

/// Milliseconds with microsecond precision, for the `rtt_ms` of `peers` and `ping`.
pub(crate) fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0
}
