//! The virtual world the cores run in: devices with their disks and stores, a network of links
//! with latency, loss, cuts and partitions, TCP-like connections, handler runs, and virtual time
//! driven by one event queue. Everything random comes from the run's seed.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use cnsprcy::config::MeshConfig;
use cnsprcy::identity::{DeviceName, Identity, PublicKey};
use cnsprcy::ipc::{Interface, Outcome, RunResult};
use cnsprcy::netif::InterfaceFilter;
use cnsprcy::wire::{Data, Joining, Message, MessageId, Routed, RoutedBody, StoreEntry};
use cnsprcy_mesh::core::{
    Answer, ApiCall, Core, DialFailure, Input, Now, Output, PersistOp, SendRequest, SessionId,
    Setup,
};
use cnsprcy_mesh::messaging::OutboxEntry;
use cnsprcy_mesh::roster::Member;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::memstore::MemStore;

pub const PORT: u16 = 7332;
/// How long a TCP connect to a black hole takes to fail.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the writer takes to make something durable.
const DISK_DELAY: Duration = Duration::from_millis(2);
/// How long the writer takes to write a delivery's records (then `Input::Written`; a crash of
/// the process from then on keeps them) ...
const DISK_WRITE: Duration = Duration::from_micros(200);
/// ... and to sync them after that, in milliseconds: from a quick disk's to a phone's slow
/// flash, so that handlers also end before their message's record is durable.
const SYNC_MS: std::ops::RangeInclusive<u64> = 1..=20;
/// How long a handler runs.
const HANDLER_TIME: Duration = Duration::from_millis(5);
/// From a handler run asked for to its process started (the handler service's queue and
/// fork): a crash meanwhile leaves the message in the inbox.
const HANDLER_START: Duration = Duration::from_millis(1);
/// The wall clock at the start of every run (Unix ms): 2026-12-06.
const WALL_START_MS: u64 = 1_796_515_200_000;

pub type DeviceIndex = usize;

/// What is on a device's disk: what the writer made durable.
#[derive(Default, Clone)]
pub struct Disk {
    pub outbox: BTreeMap<MessageId, OutboxEntry>,
    pub delivered: Vec<(MessageId, u64)>,
    /// Delivered messages whose handler has not started.
    pub inbox: Vec<Data>,
    pub roster: Vec<Member>,
}

pub struct Device {
    pub name: String,
    pub key: PublicKey,
    pub addr: SocketAddr,
    pub core: Option<Core<MemStore>>,
    pub store: MemStore,
    pub disk: Disk,
    /// Added to the world's wall clock: this device's clock error.
    pub skew_ms: i64,
    pub incarnation: u64,
    /// What the core last said about looking for members on the local network.
    pub browsing: Option<bool>,
    /// The tick the device waits for; a queued tick of another generation is stale.
    tick_generation: u64,
    /// When that tick comes.
    next_tick: Option<Duration>,
    /// Bumped at every restart: events of an older life are dropped.
    pub life: u64,
    /// Wiped (restarted without its state) at this time, if ever.
    pub wiped_at: Option<Duration>,
    /// Its handler service cannot be reached: runs fail without starting.
    pub handlers_down: bool,
}

/// One TCP connection between two devices, each end with its own session number. Like TCP, it
/// loses nothing while both ends hold it open: what is sent while the link is cut waits, and
/// arrives in order when the link heals.
#[derive(Debug, Clone)]
pub struct Connection {
    pub ends: [(DeviceIndex, SessionId); 2],
    /// The life of each end's device when it connected.
    lives: [u64; 2],
    /// Whether each end still holds it open.
    open: [bool; 2],
    /// The last arrival time scheduled in each direction (from end 0, from end 1).
    last_arrival: [Duration; 2],
    /// The next sequence number in each direction.
    next_seq: [u64; 2],
    /// What was sent in each direction while the link was cut, by sequence number.
    held: [BTreeMap<u64, Segment>; 2],
    /// The invitation the initiator showed, if it joins through the responder.
    joining: Option<Joining>,
}

/// What one end sends the other.
#[derive(Debug, Clone)]
enum Segment {
    Frame(Message),
    /// The end closed (FIN).
    Fin,
}

#[derive(Debug, Clone)]
struct Link {
    up: bool,
    latency: Duration,
    /// Chance that a segment needs a retransmission (it then arrives an RTO later).
    loss: f64,
}

/// What happens at a moment of virtual time.
#[derive(Debug)]
enum Event {
    Tick {
        device: DeviceIndex,
        generation: u64,
    },
    /// A dial's handshake finished at the initiator (or failed).
    DialDone {
        device: DeviceIndex,
        life: u64,
        peer: PublicKey,
        target: Option<DeviceIndex>,
        joining: Option<Joining>,
    },
    /// The responder's side of a connection comes up (with the initiator's first message).
    Accepted { connection: usize },
    /// A segment from end `from` arrives at the other end.
    Arrive {
        connection: usize,
        from: usize,
        seq: u64,
        segment: Segment,
    },
    /// The other end answered a segment with RST: end `to` learns the connection is gone.
    Reset { connection: usize, to: usize },
    Persisted {
        device: DeviceIndex,
        life: u64,
        op: PersistOp,
        token: Option<u64>,
    },
    /// A delivery's records are written; their sync follows (`Synced`).
    Written {
        device: DeviceIndex,
        life: u64,
        op: PersistOp,
        token: u64,
    },
    Synced {
        device: DeviceIndex,
        life: u64,
        token: u64,
    },
    HandlerStarted {
        device: DeviceIndex,
        life: u64,
        run: u64,
        record: RunRecord,
    },
    HandlerDone {
        device: DeviceIndex,
        life: u64,
        run: u64,
    },
}

/// When a target first sent its ack of a message, and its reply.
#[derive(Debug, Default)]
pub struct AckedReplied {
    pub acked: Option<Duration>,
    pub replied: Option<Duration>,
}

/// A handler run, as the checks see it.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub device: DeviceIndex,
    pub message: String,
    /// The workload's send it came from (its index in `World::sends`, the payload).
    pub send: Option<usize>,
}

/// A `send` the workload made, and how it was answered.
#[derive(Debug, Clone)]
pub struct SendRecord {
    pub from: DeviceIndex,
    pub targets: Vec<DeviceIndex>,
    pub ttl: Duration,
    pub at: Duration,
    /// `Some(id)` once answered with success.
    pub accepted: Option<String>,
    pub answered: bool,
}

/// A local store write the workload made (acknowledged at once in the simulator).
#[derive(Debug, Clone)]
pub struct WriteRecord {
    pub device: DeviceIndex,
    pub entry: StoreEntry,
    pub at: Duration,
}

pub struct World {
    pub rng: StdRng,
    pub base: Instant,
    pub now: Duration,
    pub devices: Vec<Device>,
    links: BTreeMap<(DeviceIndex, DeviceIndex), Link>,
    pub connections: Vec<Connection>,
    /// Each session's connection and end (session numbers are unique in the world).
    ends: std::collections::HashMap<SessionId, (usize, usize)>,
    queue: BinaryHeap<Reverse<(Duration, u64, usize)>>,
    events: Vec<Option<Event>>,
    seq: u64,
    next_session: SessionId,
    pub runs: Vec<RunRecord>,
    pub sends: Vec<SendRecord>,
    pub writes: Vec<WriteRecord>,
    /// API calls under way: request → the send it is.
    pending_sends: BTreeMap<(DeviceIndex, u64), usize>,
    next_request: u64,
    /// The largest of each core queue seen, for the bound checks.
    pub peak_queues: BTreeMap<&'static str, usize>,
    /// Per message and target: when the target first sent its ack and its reply.
    pub acked_replied: BTreeMap<(MessageId, [u8; 32]), AckedReplied>,
    pub events_handled: u64,
    pub trace: bool,
    /// `expired` events: the device that told it, and when.
    pub expired: Vec<(DeviceIndex, Duration)>,
    /// Answers to API calls other than the workload's sends.
    pub answers: Vec<(DeviceIndex, u64, Answer)>,
    /// Devices whose heartbeats are lost on the way, as over UDP through a firewall that drops
    /// it; a device leaves the set when its watcher says a heartbeat went missing
    /// (`HeartbeatMissed`), as the driver then has them sent over the session.
    pub heartbeats_dropped: std::collections::BTreeSet<DeviceIndex>,
    /// Every `HeartbeatMissed`: the device that said it, and the peer it was about.
    pub heartbeats_missed: Vec<(DeviceIndex, DeviceIndex)>,
    /// `Ping`s each device sent (keepalives and probes).
    pub pings_sent: BTreeMap<DeviceIndex, u64>,
    /// `peer` events that said `suspect`.
    pub suspect_events: u64,
}

impl World {
    /// `n` devices that are all members of each other. `known(i, j)`: whether `i` is given `j`'s
    /// address (else it must be dialled by `j`, relayed, or learnt).
    pub fn new(seed: u64, n: usize, known: impl Fn(usize, usize) -> bool) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let devices: Vec<Device> = (0..n)
            .map(|i| {
                let mut secret = [0u8; 32];
                rng.fill(&mut secret);
                let key = Identity::from_secret(secret).public_key();
                let addr = SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250 + 1) as u8)),
                    PORT,
                );
                Device {
                    name: format!("d{i}"),
                    key,
                    addr,
                    core: None,
                    store: MemStore::new(),
                    disk: Disk::default(),
                    skew_ms: 0,
                    incarnation: 0,
                    browsing: None,
                    tick_generation: 0,
                    next_tick: None,
                    life: 0,
                    wiped_at: None,
                    handlers_down: false,
                }
            })
            .collect();
        let mut world = Self {
            rng,
            base: Instant::now(),
            now: Duration::ZERO,
            devices,
            links: BTreeMap::new(),
            connections: Vec::new(),
            ends: std::collections::HashMap::new(),
            queue: BinaryHeap::new(),
            events: Vec::new(),
            seq: 0,
            next_session: 0,
            runs: Vec::new(),
            sends: Vec::new(),
            writes: Vec::new(),
            pending_sends: BTreeMap::new(),
            next_request: 0,
            peak_queues: BTreeMap::new(),
            acked_replied: BTreeMap::new(),
            events_handled: 0,
            expired: Vec::new(),
            answers: Vec::new(),
            heartbeats_dropped: Default::default(),
            heartbeats_missed: Vec::new(),
            pings_sent: BTreeMap::new(),
            suspect_events: 0,
            trace: std::env::var_os("CNSPRCY_SIM_TRACE").is_some(),
        };
        for i in 0..n {
            for j in (i + 1)..n {
                let latency = Duration::from_micros(world.rng.random_range(200..20_000));
                world.links.insert(
                    (i, j),
                    Link {
                        up: true,
                        latency,
                        loss: 0.0,
                    },
                );
            }
        }
        for i in 0..n {
            let roster = (0..n)
                .filter(|j| *j != i)
                .map(|j| {
                    Member::new(
                        DeviceName::new(&world.devices[j].name).expect("a valid name"),
                        world.devices[j].key,
                        if known(i, j) {
                            vec![world.devices[j].addr]
                        } else {
                            Vec::new()
                        },
                    )
                })
                .collect();
            world.devices[i].disk.roster = roster;
        }
        world
    }

    /// The name `device` advertises on the LAN now, by its own clock.
    pub fn discovery_name(&self, device: DeviceIndex) -> String {
        let now = self.now_of(device);
        let epoch = cnsprcy::identity::discovery_epoch_at(now.wall_ms / 1000);
        self.devices[device].key.discovery_name(epoch)
    }

    /// Makes `device`'s roster empty before it starts (its members are added later).
    pub fn forget_members(&mut self, device: DeviceIndex) {
        self.devices[device].disk.roster.clear();
    }

    /// Makes an API call on `device`; its answer lands in `answers` under the returned number.
    pub fn call(&mut self, device: DeviceIndex, call: cnsprcy_mesh::core::ApiCall) -> u64 {
        self.next_request += 1;
        let request = self.next_request;
        self.input(device, Input::Api { request, call });
        request
    }

    /// The answer to `request` on `device`, once there is one.
    pub fn answer(&self, device: DeviceIndex, request: u64) -> Option<&Answer> {
        self.answers
            .iter()
            .find(|(d, r, _)| *d == device && *r == request)
            .map(|(_, _, answer)| answer)
    }

    /// `device` adds `member` without an address (`cnspr manage add NAME KEY`).
    pub fn add_member(&mut self, device: DeviceIndex, member: DeviceIndex) {
        self.next_request += 1;
        let call = cnsprcy_mesh::core::ApiCall::AddMember(Member::new(
            DeviceName::new(&self.devices[member].name).expect("a valid name"),
            self.devices[member].key,
            Vec::new(),
        ));
        let request = self.next_request;
        self.input(device, Input::Api { request, call });
    }

    pub fn instant(&self) -> Instant {
        self.base + self.now
    }

    fn now_of(&self, device: DeviceIndex) -> Now {
        let wall =
            WALL_START_MS as i64 + self.now.as_millis() as i64 + self.devices[device].skew_ms;
        Now {
            mono: self.instant(),
            wall_ms: wall.max(0) as u64,
        }
    }

    fn link(&self, a: DeviceIndex, b: DeviceIndex) -> &Link {
        &self.links[&(a.min(b), a.max(b))]
    }

    fn link_mut(&mut self, a: DeviceIndex, b: DeviceIndex) -> &mut Link {
        self.links
            .get_mut(&(a.min(b), a.max(b)))
            .expect("a link between every pair")
    }

    pub fn set_link(&mut self, a: DeviceIndex, b: DeviceIndex, up: bool) {
        let was = self.link(a, b).up;
        self.link_mut(a, b).up = up;
        if up && !was {
            self.release_held(a, b);
        }
    }

    /// The link between `a` and `b` healed: what waited on it goes, in order.
    fn release_held(&mut self, a: DeviceIndex, b: DeviceIndex) {
        for c in 0..self.connections.len() {
            let (x, y) = (self.connections[c].ends[0].0, self.connections[c].ends[1].0);
            if (x, y) != (a, b) && (x, y) != (b, a) {
                continue;
            }
            for from in 0..2 {
                let held = std::mem::take(&mut self.connections[c].held[from]);
                for (seq, segment) in held {
                    self.transmit(c, from, seq, segment);
                }
            }
        }
    }

    pub fn set_latency(&mut self, a: DeviceIndex, b: DeviceIndex, latency: Duration) {
        self.link_mut(a, b).latency = latency;
    }

    pub fn set_loss(&mut self, a: DeviceIndex, b: DeviceIndex, loss: f64) {
        self.link_mut(a, b).loss = loss;
    }

    pub fn link_up(&self, a: DeviceIndex, b: DeviceIndex) -> bool {
        self.link(a, b).up
    }

    pub fn heal_all(&mut self) {
        let links: Vec<(DeviceIndex, DeviceIndex)> = self.links.keys().copied().collect();
        for (a, b) in links {
            self.set_link(a, b, true);
            self.set_loss(a, b, 0.0);
        }
    }

    pub fn is_up(&self, device: DeviceIndex) -> bool {
        self.devices[device].core.is_some()
    }

    fn schedule(&mut self, after: Duration, event: Event) {
        self.seq += 1;
        let index = self.events.len();
        self.events.push(Some(event));
        self.queue
            .push(Reverse((self.now + after, self.seq, index)));
    }

    /// One way, `from` to `to`: the link's latency, and an RTO more for each lost try.
    fn transit(&mut self, from: DeviceIndex, to: DeviceIndex) -> Duration {
        let link = self.link(from, to).clone();
        let mut delay = link.latency;
        while link.loss > 0.0 && self.rng.random_bool(link.loss.min(0.9)) {
            delay += Duration::from_millis(200).max(link.latency * 3);
        }
        delay
    }

    // --- devices ---

    /// Starts (or restarts) `device` from what is on its disk.
    pub fn start(&mut self, device: DeviceIndex) {
        let seed = self.rng.random();
        let now = self.now_of(device);
        let d = &mut self.devices[device];
        d.life += 1;
        d.next_tick = None;
        let setup = Setup {
            own: d.key,
            name: DeviceName::new(&d.name).expect("a valid name"),
            config: MeshConfig::default(),
            listening: vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT)],
            filter: InterfaceFilter::any(),
            interfaces: vec![Interface {
                name: "eth0".into(),
                up: true,
                loopback: false,
                addresses: vec![d.addr.ip()],
            }],
            members: d.disk.roster.clone(),
            outbox: d.disk.outbox.values().cloned().collect(),
            delivered: d.disk.delivered.clone(),
            inbox: d.disk.inbox.clone(),
            seed,
        };
        let mut core = Core::new(setup, d.store.clone(), now);
        let outputs = core.start(now);
        d.core = Some(core);
        self.carry_out(device, outputs);
    }

    /// Kills `device`: its connections are reset (the peers' kernels answer RST), what it had
    /// not made durable is lost.
    pub fn crash(&mut self, device: DeviceIndex) {
        self.devices[device].core = None;
        for c in 0..self.connections.len() {
            for end in 0..2 {
                if self.connections[c].ends[end].0 == device && self.connections[c].open[end] {
                    self.close_end(c, end);
                }
            }
        }
    }

    /// Kills `device` and wipes its state (outbox, delivered ids, store); the roster stays.
    pub fn wipe(&mut self, device: DeviceIndex) {
        self.crash(device);
        let d = &mut self.devices[device];
        d.disk.outbox.clear();
        d.disk.delivered.clear();
        d.disk.inbox.clear();
        d.store = MemStore::new();
        d.wiped_at = Some(self.now);
    }

    /// Sets `device`'s clock error.
    pub fn skew(&mut self, device: DeviceIndex, skew_ms: i64) {
        self.devices[device].skew_ms = skew_ms;
    }

    // --- the workload's calls ---

    /// `device` sends a message to `targets` (every member when empty; `device` itself may be
    /// among them).
    pub fn send(&mut self, device: DeviceIndex, targets: &[DeviceIndex], ttl: Duration) {
        if !self.is_up(device) {
            return;
        }
        let names = targets
            .iter()
            .map(|t| self.devices[*t].name.clone())
            .collect();
        let all: Vec<DeviceIndex> = if targets.is_empty() {
            (0..self.devices.len()).filter(|t| *t != device).collect()
        } else {
            targets.to_vec()
        };
        self.sends.push(SendRecord {
            from: device,
            targets: all,
            ttl,
            at: self.now,
            accepted: None,
            answered: false,
        });
        let send = SendRequest {
            tag: "sim/note".into(),
            to: (!targets.is_empty()).then_some(names),
            payload: format!("{}", self.sends.len() - 1).into_bytes(),
            wait: None,
            ttl,
            stream: false,
            include_self: false,
        };
        self.next_request += 1;
        let request = self.next_request;
        self.pending_sends
            .insert((device, request), self.sends.len() - 1);
        self.input(
            device,
            Input::Api {
                request,
                call: ApiCall::Send(send),
            },
        );
    }

    /// `device` writes `key` locally (durable at once), and tells its core.
    pub fn write(&mut self, device: DeviceIndex, key: &str, value: Option<Vec<u8>>) {
        if !self.is_up(device) {
            return;
        }
        let now = self.now_of(device);
        let own = *self.devices[device].key.as_bytes();
        let entry = self.devices[device]
            .store
            .write_local(own, key, value, now.wall_ms);
        self.writes.push(WriteRecord {
            device,
            entry: entry.clone(),
            at: self.now,
        });
        self.input(device, Input::StoreWritten(entry));
    }

    // --- running ---

    /// Feeds `device` one input now and carries out what it answers.
    pub fn input(&mut self, device: DeviceIndex, input: Input) {
        let now = self.now_of(device);
        if self.trace {
            eprintln!(
                "{:>10.3} {} <- {input:?}",
                self.now.as_secs_f64(),
                self.devices[device].name
            );
        }
        let Some(core) = self.devices[device].core.as_mut() else {
            return;
        };
        let outputs = core.handle(input, now);
        self.events_handled += 1;
        self.carry_out(device, outputs);
    }

    fn carry_out(&mut self, device: DeviceIndex, outputs: Vec<Output>) {
        let life = self.devices[device].life;
        for output in outputs {
            if self.trace {
                eprintln!(
                    "{:>10.3} {} -> {output:?}",
                    self.now.as_secs_f64(),
                    self.devices[device].name
                );
            }
            match output {
                Output::Send {
                    message:
                        Message::Heartbeat {
                            next_ms: Some(_), ..
                        },
                    ..
                } if self.heartbeats_dropped.contains(&device) => {}
                Output::Send { session, message } => {
                    if matches!(message, Message::Ping { .. }) {
                        *self.pings_sent.entry(device).or_default() += 1;
                    }
                    self.note_ack_or_reply(device, &message);
                    self.send_frame(device, session, message)
                }
                Output::HeartbeatMissed { session } => {
                    if let Some((c, end)) = self.find_end(device, session) {
                        let peer = self.connections[c].ends[1 - end].0;
                        self.heartbeats_dropped.remove(&peer);
                        self.heartbeats_missed.push((device, peer));
                    }
                }
                // A FIN follows the frames queued before it here, as the driver's flush does.
                Output::Close { session, .. } | Output::CloseAfterFlush { session, .. } => {
                    if let Some((c, end)) = self.find_end(device, session) {
                        self.close_end(c, end);
                    }
                }
                Output::Dial {
                    peer,
                    addresses,
                    joining,
                } => self.dial(device, peer, &addresses, joining),
                Output::RunHandler { run, .. } if self.devices[device].handlers_down => {
                    let result = Err("cannot reach the handler service".to_owned());
                    self.input(device, Input::HandlerDone { run, result });
                }
                Output::RunHandler { run, handler } => {
                    let record = RunRecord {
                        device,
                        message: handler.message_id.clone().unwrap_or_default(),
                        send: String::from_utf8_lossy(&handler.payload).parse().ok(),
                    };
                    self.schedule(
                        HANDLER_START,
                        Event::HandlerStarted {
                            device,
                            life,
                            run,
                            record,
                        },
                    );
                }
                Output::Watch(cnsprcy::api::WatchEvent::Expired { .. }) => {
                    self.expired.push((device, self.now));
                }
                Output::Watch(cnsprcy::api::WatchEvent::Peer {
                    status: cnsprcy::api::PeerStatus::Suspect,
                    ..
                }) => self.suspect_events += 1,
                Output::RaiseEvent(_)
                | Output::Watch(_)
                | Output::Members(_)
                | Output::Disabled(_)
                | Output::Invitations(_) => {}
                // Written at once and kept by a crash of the process (it is not synced, so a
                // power cut could lose it; the simulated crashes are process crashes).
                Output::Persist {
                    op: op @ PersistOp::InboxDone(_),
                    token,
                } => self.persisted(device, op, token),
                Output::Persist {
                    op: op @ PersistOp::Delivered { .. },
                    token: Some(token),
                } => {
                    let event = Event::Written {
                        device,
                        life,
                        op,
                        token,
                    };
                    self.schedule(DISK_WRITE, event);
                }
                Output::Persist { op, token } => {
                    self.schedule(
                        DISK_DELAY,
                        Event::Persisted {
                            device,
                            life,
                            op,
                            token,
                        },
                    );
                }
                Output::Answer { request, answer } => self.answered(device, request, answer),
                Output::Progress { .. } => {}
                Output::Incarnation(incarnation) => {
                    self.devices[device].incarnation = incarnation;
                }
                Output::Browse(browsing) => self.devices[device].browsing = Some(browsing),
            }
        }
        // Sampled: the sizes move slowly, and looking costs as much as a small input.
        if self.events_handled % 64 == 0 {
            self.note_queues(device);
        }
        self.schedule_tick(device);
    }

    /// Notes when `device` first sent an ack or a reply of its own (relayed ones aside).
    fn note_ack_or_reply(&mut self, device: DeviceIndex, message: &Message) {
        let Message::Routed(Routed { from, body, .. }) = message else {
            return;
        };
        if *from != *self.devices[device].key.as_bytes() {
            return;
        }
        let (id, ack) = match body {
            RoutedBody::Ack { id } => (*id, true),
            RoutedBody::Reply { id, .. } => (*id, false),
            _ => return,
        };
        let now = self.now;
        let sent = self.acked_replied.entry((id, *from)).or_default();
        let first = if ack {
            &mut sent.acked
        } else {
            &mut sent.replied
        };
        first.get_or_insert(now);
    }

    fn note_queues(&mut self, device: DeviceIndex) {
        let Some(core) = self.devices[device].core.as_ref() else {
            return;
        };
        for (name, size) in core.queue_sizes() {
            let peak = self.peak_queues.entry(name).or_default();
            *peak = (*peak).max(size);
        }
    }

    /// Makes sure a tick comes at the core's next wake-up: a tick already due earlier stays
    /// (the core then finds nothing to do, and says when next), a later one is replaced.
    fn schedule_tick(&mut self, device: DeviceIndex) {
        let Some(core) = self.devices[device].core.as_ref() else {
            return;
        };
        let wake = core.next_wakeup().saturating_duration_since(self.base);
        let d = &mut self.devices[device];
        if d.next_tick.is_some_and(|at| at <= wake) {
            return;
        }
        d.next_tick = Some(wake);
        d.tick_generation += 1;
        let generation = d.tick_generation;
        let after = wake.saturating_sub(self.now);
        self.schedule(after, Event::Tick { device, generation });
    }

    fn answered(&mut self, device: DeviceIndex, request: u64, answer: Answer) {
        let Some(send) = self.pending_sends.remove(&(device, request)) else {
            self.answers.push((device, request, answer));
            return;
        };
        self.sends[send].answered = true;
        if let Answer::Send(Ok(result)) = answer {
            self.sends[send].accepted = Some(result.id);
        }
    }

    fn find_end(&self, device: DeviceIndex, session: SessionId) -> Option<(usize, usize)> {
        self.ends
            .get(&session)
            .copied()
            .filter(|(c, end)| self.connections[*c].ends[*end].0 == device)
    }

    fn send_frame(&mut self, device: DeviceIndex, session: SessionId, message: Message) {
        let Some((c, end)) = self.find_end(device, session) else {
            return;
        };
        if !self.connections[c].open[end] {
            return;
        }
        self.segment(c, end, Segment::Frame(message));
    }

    /// Sends a segment from end `from`: now, or when the link heals.
    fn segment(&mut self, c: usize, from: usize, segment: Segment) {
        let seq = self.connections[c].next_seq[from];
        self.connections[c].next_seq[from] += 1;
        self.transmit(c, from, seq, segment);
    }

    fn transmit(&mut self, c: usize, from: usize, seq: u64, segment: Segment) {
        let (a, b) = (
            self.connections[c].ends[from].0,
            self.connections[c].ends[1 - from].0,
        );
        if !self.link_up(a, b) {
            self.connections[c].held[from].insert(seq, segment);
            return;
        }
        let transit = self.transit(a, b);
        let arrival = (self.now + transit).max(self.connections[c].last_arrival[from]);
        self.connections[c].last_arrival[from] = arrival;
        self.schedule(
            arrival - self.now,
            Event::Arrive {
                connection: c,
                from,
                seq,
                segment,
            },
        );
    }

    /// Closes one end: a FIN goes to the other end (when the link carries it).
    fn close_end(&mut self, c: usize, end: usize) {
        if !self.connections[c].open[end] {
            return;
        }
        self.connections[c].open[end] = false;
        self.segment(c, end, Segment::Fin);
    }

    /// Whether end `end` of connection `c` is open and its device still in the same life.
    fn end_alive(&self, c: usize, end: usize) -> bool {
        let conn = &self.connections[c];
        let device = conn.ends[end].0;
        conn.open[end] && self.devices[device].life == conn.lives[end] && self.is_up(device)
    }

    fn arrive(&mut self, c: usize, from: usize, seq: u64, segment: Segment) {
        let to = 1 - from;
        let (a, b) = (
            self.connections[c].ends[from].0,
            self.connections[c].ends[to].0,
        );
        if !self.link_up(a, b) {
            // Cut while in flight: retransmitted once the link heals.
            self.connections[c].held[from].insert(seq, segment);
            return;
        }
        let (device, session) = self.connections[c].ends[to];
        if !self.end_alive(c, to) {
            // Nobody holds that end: its kernel answers a segment with RST.
            if matches!(segment, Segment::Frame(_)) && self.connections[c].open[from] {
                let transit = self.transit(b, a);
                self.schedule(
                    transit,
                    Event::Reset {
                        connection: c,
                        to: from,
                    },
                );
            }
            return;
        }
        match segment {
            Segment::Frame(message) => self.input(device, Input::Frame { session, message }),
            Segment::Fin => {
                self.connections[c].open[to] = false;
                self.input(
                    device,
                    Input::SessionDown {
                        session,
                        reason: "closed by the other side".into(),
                    },
                );
            }
        }
    }

    fn dial(
        &mut self,
        device: DeviceIndex,
        peer: PublicKey,
        addresses: &[SocketAddr],
        joining: Option<Joining>,
    ) {
        let life = self.devices[device].life;
        let target = addresses.iter().find_map(|addr| {
            self.devices
                .iter()
                .position(|d| d.addr == *addr && d.key == peer)
        });
        let Some(target) = target else {
            // Nobody there: refused at once... or, for an address of nobody, no answer.
            self.schedule(
                CONNECT_TIMEOUT,
                Event::DialDone {
                    device,
                    life,
                    peer,
                    target: None,
                    joining: None,
                },
            );
            return;
        };
        if !self.link_up(device, target) {
            self.schedule(
                CONNECT_TIMEOUT,
                Event::DialDone {
                    device,
                    life,
                    peer,
                    target: None,
                    joining: None,
                },
            );
            return;
        }
        // SYN, SYN-ACK, then the two handshake messages: the initiator is done after about two
        // round trips.
        let rtt = self.transit(device, target) + self.transit(target, device);
        self.schedule(
            rtt * 2,
            Event::DialDone {
                device,
                life,
                peer,
                target: Some(target),
                joining,
            },
        );
    }

    fn dial_done(
        &mut self,
        device: DeviceIndex,
        peer: PublicKey,
        target: Option<DeviceIndex>,
        joining: Option<Joining>,
    ) {
        let failed = |world: &mut Self, error: &str| {
            world.input(
                device,
                Input::DialFailed {
                    peer,
                    failure: DialFailure::Other,
                    error: error.into(),
                },
            );
        };
        let Some(target) = target else {
            return failed(self, "connect timed out");
        };
        if !self.is_up(target) {
            return failed(self, "connection refused");
        }
        if !self.link_up(device, target) {
            return failed(self, "handshake did not complete within 5s");
        }
        self.next_session += 1;
        let initiator_session = self.next_session;
        self.next_session += 1;
        let responder_session = self.next_session;
        let c = self.connections.len();
        self.connections.push(Connection {
            ends: [(device, initiator_session), (target, responder_session)],
            lives: [self.devices[device].life, self.devices[target].life],
            open: [true, true],
            last_arrival: [self.now, self.now],
            next_seq: [0, 0],
            held: [BTreeMap::new(), BTreeMap::new()],
            joining,
        });
        self.ends.insert(initiator_session, (c, 0));
        self.ends.insert(responder_session, (c, 1));
        // The responder counts the session once the initiator's first message arrives: before
        // any frame of the initiator's (scheduled later, never to arrive earlier).
        let transit = self.transit(device, target);
        self.schedule(transit, Event::Accepted { connection: c });
        self.connections[c].last_arrival[0] = self.now + transit;
        let incarnation = self.devices[target].incarnation;
        let addr = self.devices[target].addr;
        let local = Some(SocketAddr::new(self.devices[device].addr.ip(), 40000));
        self.input(
            device,
            Input::SessionUp {
                session: initiator_session,
                peer,
                initiator: true,
                incarnation,
                addr,
                local,
                joining: None,
            },
        );
    }

    fn accepted(&mut self, c: usize) {
        let conn = self.connections[c].clone();
        let (initiator, responder) = (conn.ends[0].0, conn.ends[1].0);
        if !self.link_up(initiator, responder) {
            // The first message never came: the responder's handshake timed out, and what the
            // initiator sends will be answered with RST.
            self.connections[c].open[1] = false;
            return;
        }
        if !conn.open[1] || self.devices[responder].life != conn.lives[1] || !self.is_up(responder)
        {
            return;
        }
        // Even if the initiator closed it meanwhile: its first message went before its FIN, which
        // arrives after this.
        let peer = self.devices[initiator].key;
        let incarnation = self.devices[initiator].incarnation;
        self.input(
            responder,
            Input::SessionUp {
                session: conn.ends[1].1,
                peer,
                initiator: false,
                incarnation,
                addr: SocketAddr::new(self.devices[initiator].addr.ip(), 40000),
                local: Some(self.devices[responder].addr),
                joining: conn.joining.clone(),
            },
        );
    }

    fn persisted(&mut self, device: DeviceIndex, op: PersistOp, token: Option<u64>) {
        self.write_to_disk(device, op);
        if let Some(token) = token {
            self.input(
                device,
                Input::Persisted {
                    token,
                    result: Ok(()),
                },
            );
        }
    }

    fn write_to_disk(&mut self, device: DeviceIndex, op: PersistOp) {
        let disk = &mut self.devices[device].disk;
        match op {
            PersistOp::OutboxSave(entry) => {
                disk.outbox.insert(entry.data.id, *entry);
            }
            PersistOp::OutboxAcked { id, target } => {
                if let Some(entry) = disk.outbox.get_mut(&id) {
                    entry.pending.retain(|k| *k != target);
                }
            }
            PersistOp::OutboxRemove(id) => {
                disk.outbox.remove(&id);
            }
            PersistOp::Delivered { data, until_ms } => {
                disk.delivered.push((data.id, until_ms));
                disk.inbox.retain(|d| d.id != data.id);
                disk.inbox.push(*data);
            }
            PersistOp::InboxDone(id) => disk.inbox.retain(|d| d.id != id),
            PersistOp::Roster(members) => disk.roster = members,
        }
    }

    /// Runs events until virtual time `until`.
    pub fn run_until(&mut self, until: Duration) {
        while let Some(Reverse((at, _, index))) = self.queue.peek().copied() {
            if at > until {
                break;
            }
            self.queue.pop();
            self.now = at;
            let Some(event) = self.events[index].take() else {
                continue;
            };
            self.handle(event);
        }
        self.now = until;
        if self.events.len() > 1 << 16 && self.queue.is_empty() {
            self.events.clear();
        }
    }

    pub fn run_for(&mut self, time: Duration) {
        self.run_until(self.now + time);
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Tick { device, generation } => {
                if self.devices[device].tick_generation == generation && self.is_up(device) {
                    self.devices[device].next_tick = None;
                    self.input(device, Input::Tick);
                }
            }
            Event::DialDone {
                device,
                life,
                peer,
                target,
                joining,
            } => {
                if self.devices[device].life == life && self.is_up(device) {
                    self.dial_done(device, peer, target, joining);
                }
            }
            Event::Accepted { connection } => self.accepted(connection),
            Event::Arrive {
                connection,
                from,
                seq,
                segment,
            } => self.arrive(connection, from, seq, segment),
            Event::Reset { connection, to } => {
                if self.end_alive(connection, to) {
                    let (device, session) = self.connections[connection].ends[to];
                    self.connections[connection].open[to] = false;
                    self.input(
                        device,
                        Input::SessionDown {
                            session,
                            reason: "connection reset by peer".into(),
                        },
                    );
                }
            }
            Event::Persisted {
                device,
                life,
                op,
                token,
            } => {
                if self.devices[device].life == life && self.is_up(device) {
                    self.persisted(device, op, token);
                }
            }
            Event::Written {
                device,
                life,
                op,
                token,
            } => {
                if self.devices[device].life == life && self.is_up(device) {
                    self.write_to_disk(device, op);
                    self.input(device, Input::Written { token });
                    let sync = Duration::from_millis(self.rng.random_range(SYNC_MS));
                    self.schedule(
                        sync,
                        Event::Synced {
                            device,
                            life,
                            token,
                        },
                    );
                }
            }
            Event::Synced {
                device,
                life,
                token,
            } => {
                if self.devices[device].life == life && self.is_up(device) {
                    let result = Ok(());
                    self.input(device, Input::Persisted { token, result });
                }
            }
            Event::HandlerStarted {
                device,
                life,
                run,
                record,
            } => {
                if self.devices[device].life == life && self.is_up(device) {
                    self.runs.push(record);
                    self.input(device, Input::HandlerStarted { run });
                    self.schedule(HANDLER_TIME, Event::HandlerDone { device, life, run });
                }
            }
            Event::HandlerDone { device, life, run } => {
                if self.devices[device].life == life && self.is_up(device) {
                    let result = Ok(RunResult {
                        handler: Some("sim/note".into()),
                        outcome: Outcome::Exited { code: 0 },
                        stdout: Vec::new(),
                        duration_ms: HANDLER_TIME.as_millis() as u64,
                    });
                    self.input(device, Input::HandlerDone { run, result });
                }
            }
        }
    }

    /// Devices `a` and `b` both up, and the pairs of them, for the checks.
    pub fn up_pairs(&self) -> Vec<(DeviceIndex, DeviceIndex)> {
        let up: Vec<DeviceIndex> = (0..self.devices.len()).filter(|d| self.is_up(*d)).collect();
        let mut pairs = Vec::new();
        for (i, a) in up.iter().enumerate() {
            for b in &up[i + 1..] {
                pairs.push((*a, *b));
            }
        }
        pairs
    }

    /// The connection that holds `device`'s live session `session`, if any.
    pub fn connection_of(&self, device: DeviceIndex, session: SessionId) -> Option<&Connection> {
        self.find_end(device, session)
            .map(|(c, _)| &self.connections[c])
    }
}
