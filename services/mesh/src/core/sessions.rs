//! Sessions and peers: one session per pair, keepalive, `Hello` and `Neighbors`, dialling with
//! backoff, network changes and discovery, and telling everyone when a member's status changes.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use cnsprcy::api::{PeerStatus, WatchEvent};
use cnsprcy::identity::PublicKey;
use cnsprcy::ipc::Interface;
use cnsprcy::netif::{self, LocalCheck};
use cnsprcy::wire::{self, Hello, Message, Neighbor};

use super::{Core, Live, Now, Output, SessionId, StoreAccess};
use crate::liveness::{Action, Liveness, Role};
use crate::peers::Reach;

/// Advertisements remembered from discovery (each a name and at most a few addresses); a LAN
/// with more cnsprcy devices than this finds a member added later once it advertises again
/// (within the hour, under its next name) or dials this device.
pub(crate) const MAX_DISCOVERED: usize = 128;

/// The discovery epochs whose names count now: this one and those beside it, for clocks a
/// little apart.
fn discovery_epochs(now: Now) -> [u64; 3] {
    let epoch = cnsprcy::identity::discovery_epoch_at(now.wall_ms / 1000);
    [epoch.saturating_sub(1), epoch, epoch + 1]
}

/// An RTT change larger than this fraction is announced to peers (for their relay choice)...
const RTT_ANNOUNCE_CHANGE: f64 = 0.25;
/// ... and by more than this.
const RTT_ANNOUNCE_FLOOR: Duration = Duration::from_millis(2);
/// Sessions a device keeps alive at `[mesh] keepalive_interval`; with more, it wants twice the
/// interval, with more than twice as many three times, and so on (`keepalive_step`).
const KEEPALIVE_SESSIONS: usize = 10;
/// The longest a device stretches its keepalive interval to (unless set longer): NAT mappings
/// and firewalls forget idle TCP connections after minutes to hours.
const MAX_STRETCHED_KEEPALIVE: Duration = Duration::from_secs(300);

/// How many times `[mesh] keepalive_interval` a device with `sessions` sessions wants them
/// kept alive at: so that it sends about as many keepalive pings in a mesh of forty as in one
/// of ten. Heartbeats watch every device at a cost that does not grow with the mesh; the
/// keepalive only measures round trips and ends a dead link between two devices that do not
/// watch each other. In steps, so that a mesh that grows by one device does not make every
/// device tell every peer.
fn keepalive_step(sessions: usize) -> u32 {
    u32::try_from(sessions.div_ceil(KEEPALIVE_SESSIONS))
        .unwrap_or(u32::MAX)
        .max(1)
}

/// Decides which of two sessions with the same peer survives, the same way on both sides:
/// - a session from a new incarnation of the peer replaces one from the old (it restarted);
/// - a new session dialled by the same side as the old one replaces it (that side thinks the old
///   one is gone, and only it can know);
/// - of two sessions dialled by opposite sides at once, the one whose initiator has the smaller
///   public key survives.
pub(crate) fn keep_new_session(
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

impl<S: StoreAccess> Core<S> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_session_up(
        &mut self,
        session: SessionId,
        peer: PublicKey,
        initiator: bool,
        incarnation: u64,
        addr: SocketAddr,
        local: Option<SocketAddr>,
        now: Now,
    ) {
        if !self.table.contains(&peer) {
            self.outputs.push(Output::Close {
                session,
                reason: "not a member".into(),
            });
            return;
        }
        if let Some(old) = self.sessions.get(&peer) {
            if !keep_new_session(
                &self.own,
                &peer,
                (old.initiator, old.incarnation),
                (initiator, incarnation),
            ) {
                tracing::debug!(peer = %self.member_name(&peer), "dropped a duplicate session");
                self.outputs.push(Output::Close {
                    session,
                    reason: "a duplicate of the session kept".into(),
                });
                return;
            }
            let old = old.id;
            self.session_peers.remove(&old);
            self.outputs.push(Output::Close {
                session: old,
                reason: "replaced by a newer session".into(),
            });
        }
        let role = if initiator {
            Role::Initiator
        } else {
            Role::Responder
        };
        let liveness = Liveness::new(
            role,
            now.mono,
            self.config.keepalive_interval,
            self.config.keepalive_timeout,
        );
        self.sessions.insert(
            peer,
            Live {
                id: session,
                initiator,
                incarnation,
                addr,
                local,
                liveness,
                full: false,
                suspect: false,
                heartbeat_watch: None,
                probe: None,
                probe_answered: None,
                root_differed: false,
                peer_keepalive: None,
            },
        );
        self.session_peers.insert(session, peer);
        self.send(session, self.hello());
        self.send(session, self.neighbors_message());
        self.send_roster_digest(session);
        self.send(session, self.keepalive_message());
        // For an accepted session, show the address the member listens on at that IP, if known,
        // until its Hello says for sure.
        let shown = if initiator {
            addr
        } else {
            self.roster
                .get(&peer)
                .and_then(|m| m.addresses.iter().find(|a| a.ip() == addr.ip()).copied())
                .unwrap_or(addr)
        };
        self.table.session_up(&peer, shown, now.mono);
        self.quiet_dials.remove(&peer);
        self.problems.remove(&peer);
        self.outbox.reset_pacing(peer.as_bytes());
        if initiator {
            self.learn_address(&peer, addr);
        }
        self.store_session_up(&peer);
        // The keepalive's first ping goes at once (its deadline is now).
        self.poll_session(&peer, now);
    }

    /// The session's connection is gone (or the core closed it: then it is no longer live).
    pub(super) fn on_session_down(&mut self, session: SessionId, reason: &str, now: Now) {
        let Some(peer) = self.session_peers.remove(&session) else {
            return;
        };
        if self.sessions.get(&peer).is_some_and(|l| l.id == session) {
            if let Some(live) = self.sessions.remove(&peer) {
                // Last seen is when its last frame came, not when the session was given up.
                self.table.seen_until(&peer, live.last_frame_wall(now));
            }
            let name = self.member_name(&peer);
            tracing::info!(peer = %name, "session with {name} ended: {reason}");
            self.note_session_ended(&peer, reason, now);
            let jitter = self.jitter();
            self.table.session_down(&peer, now.mono, jitter);
        }
    }

    /// Ends the session with `peer` from this side once what is queued for it went out.
    pub(super) fn close_session_after_flush(&mut self, peer: &PublicKey, reason: &str, now: Now) {
        self.end_session(peer, reason, true, now);
    }

    /// Ends the session with `peer` from this side.
    pub(super) fn close_session(&mut self, peer: &PublicKey, reason: &str, now: Now) {
        self.end_session(peer, reason, false, now);
    }

    fn end_session(&mut self, peer: &PublicKey, reason: &str, flush: bool, now: Now) {
        let Some(live) = self.sessions.get(peer) else {
            return;
        };
        let session = live.id;
        let reason = reason.to_owned();
        self.outputs.push(if flush {
            Output::CloseAfterFlush {
                session,
                reason: reason.clone(),
            }
        } else {
            Output::Close {
                session,
                reason: reason.clone(),
            }
        });
        self.on_session_down(session, &reason, now);
    }

    /// Queues `message` on `session`.
    pub(super) fn send(&mut self, session: SessionId, message: Message) {
        self.outputs.push(Output::Send { session, message });
    }

    /// Queues `message` on the session with `peer`; false when there is none.
    pub(super) fn send_to(&mut self, peer: &PublicKey, message: Message) -> bool {
        let Some(live) = self.sessions.get(peer) else {
            return false;
        };
        let session = live.id;
        self.send(session, message);
        true
    }

    pub(super) fn on_frame(&mut self, session: SessionId, message: Message, now: Now) {
        let Some(peer) = self.session_peers.get(&session).copied() else {
            return;
        };
        let Some(live) = self.sessions.get_mut(&peer).filter(|l| l.id == session) else {
            return;
        };
        live.liveness.on_receive(now.mono);
        match message {
            Message::Ping { nonce, rtt_us } => {
                live.liveness
                    .on_ping_report(rtt_us.map(|us| Duration::from_micros(us.into())));
                let rtt = live.liveness.rtt();
                self.send(session, Message::Pong { nonce });
                if let Some(rtt) = rtt {
                    self.table.set_rtt(&peer, rtt);
                }
            }
            Message::Pong { nonce } => {
                if live.liveness.on_pong(nonce, now.mono) {
                    if let Some(rtt) = live.liveness.rtt() {
                        self.table.set_rtt(&peer, rtt);
                    }
                } else if !self.on_probe_pong(&peer, nonce, now) {
                    self.complete_ping(nonce, now);
                }
            }
            Message::Heartbeat { next_ms, root } => self.on_heartbeat(&peer, next_ms, root),
            Message::KeepaliveInterval(ms) => {
                // A member's word, but bounded as the setting is.
                let wanted = Duration::from_millis(ms.into()).clamp(
                    self.config.keepalive_interval,
                    cnsprcy::config::MAX_KEEPALIVE_INTERVAL,
                );
                let interval = self.session_keepalive(Some(wanted));
                if let Some(live) = self.live_mut(session) {
                    live.peer_keepalive = Some(wanted);
                    live.liveness.set_interval(interval);
                }
            }
            Message::Suspect { peer: suspect } => {
                self.on_suspect(&peer, PublicKey::from_bytes(suspect), now);
            }
            Message::SuspectedBy { by } => self.on_suspected_by(PublicKey::from_bytes(by), now),
            Message::Hello(hello) => self.on_hello(&peer, hello),
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
                let direct: Vec<PublicKey> = self
                    .table
                    .direct_neighbors()
                    .into_iter()
                    .map(|(key, _)| key)
                    .collect();
                let had_all = self.table.reports_all(&peer, &direct);
                self.table.set_report(&peer, list);
                // A peer that just lost a session may relay now: it gets this device's
                // round-trip times, which are announced only to such peers. (Only on that
                // change, or two peers that each miss a member would answer each other forever.)
                if had_all && !self.table.reports_all(&peer, &direct) {
                    let message = self.neighbors_message();
                    self.send_to(&peer, message);
                }
            }
            Message::Data(data) => self.on_data(data, now),
            Message::Routed(routed) => self.on_routed(&peer, routed, now),
            Message::RosterDigest(digest) => self.on_roster_digest(session, digest),
            Message::RosterEntries { entries, answer } => {
                self.on_roster_entries(session, &peer, entries, answer, now)
            }
            Message::JoinRefused(refusal) => self.on_join_refused(&peer, refusal, now),
            // The driver's: it chooses the way heartbeats travel (`udp_heartbeats.rs`).
            Message::UdpHeartbeats(_) => {}
            // Pairing connections are not sessions; a member has no business sending these.
            Message::PairNonce(_) | Message::PairConfirm(_) | Message::PairInvitation { .. } => {
                tracing::debug!(peer = %self.member_name(&peer), "ignored a pairing message in a member's session");
            }
        }
    }

    /// The keepalive interval this device wants on its sessions now.
    fn wanted_keepalive(&self) -> Duration {
        let interval = self.config.keepalive_interval;
        interval
            .saturating_mul(self.keepalive_step)
            .min(MAX_STRETCHED_KEEPALIVE.max(interval))
    }

    fn keepalive_message(&self) -> Message {
        let ms = self.wanted_keepalive().as_millis();
        Message::KeepaliveInterval(u32::try_from(ms).unwrap_or(u32::MAX))
    }

    /// The keepalive interval of a session whose peer wants `peer` (both sides come to the
    /// same: the larger of the two).
    fn session_keepalive(&self, peer: Option<Duration>) -> Duration {
        peer.map_or(self.config.keepalive_interval, |peer| {
            peer.max(self.wanted_keepalive())
        })
    }

    /// When the number of sessions crossed a step, tells every peer the keepalive interval
    /// this device wants now, and applies it.
    pub(super) fn stretch_keepalives(&mut self) {
        let step = keepalive_step(self.sessions.len());
        if step == self.keepalive_step {
            return;
        }
        self.keepalive_step = step;
        let message = self.keepalive_message();
        let sessions: Vec<(SessionId, Duration)> = self
            .sessions
            .values()
            .map(|live| (live.id, self.session_keepalive(live.peer_keepalive)))
            .collect();
        for (session, interval) in sessions {
            self.send(session, message.clone());
            if let Some(live) = self.live_mut(session) {
                live.liveness.set_interval(interval);
            }
        }
    }

    /// Keepalive for every session: pings due, sessions silent too long.
    pub(super) fn poll_sessions(&mut self, now: Now) {
        let peers: Vec<PublicKey> = self.sessions.keys().copied().collect();
        for peer in peers {
            self.poll_session(&peer, now);
        }
    }

    fn poll_session(&mut self, peer: &PublicKey, now: Now) {
        let nonce: u64 = rand::Rng::random(&mut self.rng);
        let Some(live) = self.sessions.get_mut(peer) else {
            return;
        };
        if now.mono < live.liveness.next_deadline() {
            return;
        }
        match live.liveness.poll(now.mono, nonce) {
            Action::Ping { nonce, rtt } => {
                let rtt_us = rtt.map(|d| d.as_micros().min(u32::MAX.into()) as u32);
                let session = live.id;
                self.send(session, Message::Ping { nonce, rtt_us });
            }
            Action::Dead => {
                let reason = format!(
                    "nothing received for {}",
                    humantime::format_duration(
                        live.liveness.interval() + self.config.keepalive_timeout
                    )
                );
                self.close_session(peer, &reason, now);
            }
            Action::Wait => {}
        }
    }

    /// Marks the sessions whose keepalive is overdue or that are being probed as suspect, and
    /// the others as not.
    pub(super) fn mark_suspects(&mut self, now: Now) {
        for live in self.sessions.values_mut() {
            let overdue =
                now.mono >= live.liveness.suspect_at() || live.probe.is_some_and(|p| p.suspects());
            if overdue != live.suspect {
                live.suspect = overdue;
                self.suspect_generation += 1;
            }
        }
    }

    /// This device's `Hello`: its name, where it listens and its other addresses.
    pub(super) fn hello(&self) -> Message {
        Message::Hello(Hello {
            name: self.name.to_string(),
            listen: self.announced_listen(),
            addresses: self.announced_addresses(),
        })
    }

    /// The addresses peers may dial besides the one they reached this device at: those of the
    /// interfaces `[mesh] interfaces` allows that are up, without loopback, link-local and
    /// unspecified ones (link-local IPv6 needs a scope no peer could know).
    pub(super) fn announced_addresses(&self) -> Vec<IpAddr> {
        netif::usable_addresses(&self.filter, &self.interfaces)
            .into_iter()
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified() && !ip.is_multicast())
            .filter(|ip| match ip {
                IpAddr::V4(v4) => !v4.is_link_local(),
                IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
            })
            .take(wire::MAX_ANNOUNCED_ADDRESSES)
            .collect()
    }

    /// Where this device listens, as told to peers: a listen address at a specific IP only if
    /// that IP is on an interface `[mesh] interfaces` allows (an unspecified one means "the
    /// address you reached me at", which is on an allowed interface, or the session would not
    /// exist).
    pub(super) fn announced_listen(&self) -> Vec<SocketAddr> {
        self.listening
            .iter()
            .filter(|a| {
                a.ip().is_unspecified()
                    || self.filter.is_any()
                    || netif::check_local(&self.filter, &self.interfaces, a.ip())
                        == LocalCheck::Allowed
            })
            .copied()
            .collect()
    }

    fn on_hello(&mut self, peer: &PublicKey, hello: Hello) {
        let Some((observed, initiator)) = self.sessions.get(peer).map(|l| (l.addr, l.initiator))
        else {
            return;
        };
        // Where the peer listens, at the address it reached us from.
        for listen in &hello.listen {
            let ip = listen.ip();
            if (ip.is_unspecified() && ip.is_ipv4() == observed.is_ipv4()) || ip == observed.ip() {
                let addr = SocketAddr::new(observed.ip(), listen.port());
                self.learn_address(peer, addr);
                if !initiator {
                    self.table.set_address(peer, addr);
                }
            }
        }
        // ...and at its other addresses, so that a move to a network where the address this
        // device knew no longer reaches still finds it, with or without discovery.
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
        if self.roster.learn_announced(peer, &announced) {
            self.save_roster();
        }
    }

    pub(super) fn learn_address(&mut self, peer: &PublicKey, addr: SocketAddr) {
        if self.roster.learn_address(peer, addr) {
            self.save_roster();
        }
    }

    pub(super) fn neighbors_message(&self) -> Message {
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

    /// Dials the members that are due, or backs them off when no address is known.
    pub(super) fn dial_due(&mut self, now: Now) {
        for peer in self.table.take_due_dials(now.mono) {
            let addresses = self
                .roster
                .get(&peer)
                .map(|m| m.addresses.clone())
                .unwrap_or_default();
            if addresses.is_empty() {
                // Nothing to dial yet; the member may dial us, or discovery may find it.
                let jitter = self.jitter();
                self.table.dial_failed(&peer, now.mono, jitter);
                continue;
            }
            let joining = self.joining_for(&peer);
            self.outputs.push(Output::Dial {
                peer,
                addresses,
                joining,
            });
        }
    }

    pub(super) fn on_dial_failed(
        &mut self,
        peer: PublicKey,
        failure: super::DialFailure,
        error: &str,
        now: Now,
    ) {
        self.note_dial_failure(&peer, failure, error, now);
        self.join_dial_failed(&peer, error, now);
        let name = self.member_name(&peer);
        let jitter = self.jitter();
        if let Some(delay) = self.table.dial_failed(&peer, now.mono, jitter) {
            if self.quiet_dials.insert(peer) {
                tracing::info!(peer = %name, "cannot reach {name}: {error}; retrying with backoff");
            } else {
                tracing::debug!(peer = %name, "still cannot reach {name}: {error}; next try in {delay:?}");
            }
        }
    }

    /// Discovery resolved `instance`: remember it (a device may become a member later), and if
    /// it is a member's name for this epoch (or the one before or after, for clocks a little
    /// apart), learn its addresses and dial it now.
    pub(super) fn on_discovered(&mut self, instance: &str, addresses: Vec<SocketAddr>, now: Now) {
        self.discovered.retain(|(name, _)| name != instance);
        if self.discovered.len() >= MAX_DISCOVERED {
            self.discovered.pop_front();
        }
        self.discovered
            .push_back((instance.to_owned(), addresses.clone()));
        let epochs = discovery_epochs(now);
        let member = self.roster.members().iter().find(|m| {
            epochs
                .iter()
                .any(|e| m.public_key.discovery_name(*e) == instance)
        });
        let Some(member) = member.cloned() else {
            // Not a member (or this device itself), for now.
            return;
        };
        if self.learn_discovered(&member.public_key, &addresses) {
            self.save_roster();
        }
        if !matches!(self.table.reach(&member.public_key), Reach::Direct { .. }) {
            tracing::info!(peer = %member.name, ?addresses, "found {} on the local network", member.name);
            self.table.retry(&member.public_key, now.mono);
        }
    }

    /// Learns what discovery saw lately of the member `key` (just added): returns whether its
    /// addresses changed.
    pub(super) fn recall_discovered(&mut self, key: &PublicKey, now: Now) -> bool {
        let names: Vec<String> = discovery_epochs(now)
            .iter()
            .map(|e| key.discovery_name(*e))
            .collect();
        let Some((_, addresses)) = self
            .discovered
            .iter()
            .rev()
            .find(|(instance, _)| names.contains(instance))
            .cloned()
        else {
            return false;
        };
        let name = self.member_name(key);
        tracing::info!(peer = %name, ?addresses, "{name} was seen on the local network");
        self.learn_discovered(key, &addresses)
    }

    fn learn_discovered(&mut self, key: &PublicKey, addresses: &[SocketAddr]) -> bool {
        let mut changed = false;
        for addr in addresses.iter().rev() {
            changed |= self.roster.learn_address(key, *addr);
        }
        changed
    }

    /// The network changed (netwatch): sessions on an address this device no longer has (or on a
    /// link that went down) end at once, and when anything changed, every member without a
    /// session is dialled now, with a fresh incarnation so peers drop a session they still
    /// think alive in favour of the new one.
    pub(super) fn on_network(&mut self, interfaces: Vec<Interface>, now: Now) {
        let usable = netif::usable_addresses(&self.filter, &interfaces);
        let was = netif::usable_addresses(&self.filter, &self.interfaces);
        self.interfaces = interfaces;
        let first_report = !std::mem::replace(&mut self.network_reported, true);
        if first_report || was == usable {
            return;
        }
        let lost: Vec<IpAddr> = was.difference(&usable).copied().collect();
        let gained: Vec<IpAddr> = usable.difference(&was).copied().collect();
        let stale: Vec<PublicKey> = self
            .sessions
            .iter()
            .filter(|(_, live)| live.local.is_some_and(|l| lost.contains(&l.ip())))
            .map(|(key, _)| *key)
            .collect();
        if !stale.is_empty() || !lost.is_empty() {
            self.incarnation = rand::Rng::random(&mut self.rng);
            self.outputs.push(Output::Incarnation(self.incarnation));
        }
        for peer in &stale {
            self.close_session(peer, "its local address is gone", now);
        }
        let dialling = self.table.retry_all(now.mono);
        tracing::info!(
            lost = ?lost,
            gained = ?gained,
            "the network changed; redialling {dialling} member(s) now"
        );
        // The sessions that remain tell their peers where this device is now.
        let hello = self.hello();
        let sessions: Vec<SessionId> = self.sessions.values().map(|l| l.id).collect();
        for session in sessions {
            self.send(session, hello.clone());
        }
    }

    /// After every input: tell peers about changed direct sessions, report status changes (log,
    /// `watch`, built-in events), and note who is reachable.
    pub(super) fn after_change(&mut self, now: Now) {
        let generation = self.table.generation();
        // RTTs move with every keepalive: looked at again at most once per announcement
        // interval (the relay choice they may change, too).
        let rtts_moved = self.reported_rtts != self.table.rtt_generation()
            && self
                .announced_at
                .is_none_or(|at| now.mono >= at + self.config.keepalive_interval);
        let announce_due = self.rtt_announce_due.is_some_and(|at| now.mono >= at);
        let suspects_moved = self.reported_suspects != self.suspect_generation;
        self.reported_suspects = self.suspect_generation;
        if self.reported_generation == Some(generation)
            && !announce_due
            && !rtts_moved
            && !suspects_moved
        {
            // Nothing that a status or an announcement depends on moved.
            return;
        }
        self.reported_rtts = self.table.rtt_generation();
        if self.reported_generation != Some(generation) {
            self.reported_generation = Some(generation);
            self.outbox_dirty = true;
        }
        let neighbors = self.table.direct_neighbors();
        let (announce, set_changed) = match announcement_differs(&self.announced, &neighbors) {
            Announce::Same => {
                self.rtt_announce_due = None;
                (false, false)
            }
            Announce::SetChanged => (true, true),
            Announce::RttMoved => {
                let at = self
                    .announced_at
                    .map_or(now.mono, |at| at + self.config.keepalive_interval);
                self.rtt_announce_due = (now.mono < at).then_some(at);
                (now.mono >= at, false)
            }
        };
        if announce {
            let message = self.neighbors_message();
            let direct: Vec<PublicKey> = neighbors.iter().map(|(key, _)| *key).collect();
            // Round-trip times alone matter only to peers that choose relays, those without a
            // session with every member this device has one with; in a full mesh that is
            // nobody, so an idle mesh does not announce (a cost that would grow with N²).
            let sessions: Vec<SessionId> = self
                .sessions
                .iter()
                .filter(|(peer, _)| set_changed || !self.table.reports_all(peer, &direct))
                .map(|(_, l)| l.id)
                .collect();
            for session in sessions {
                self.send(session, message.clone());
            }
            self.announced = neighbors;
            self.announced_at = Some(now.mono);
            self.rtt_announce_due = None;
        }
        let mut changes = Vec::new();
        for member in self.roster.members() {
            let key = member.public_key;
            let reach = self.table.reach(&key);
            let status = match reach {
                Reach::Direct { .. } if self.sessions.get(&key).is_some_and(|l| l.suspect) => {
                    (PeerStatus::Suspect, None)
                }
                Reach::Direct { .. } => (PeerStatus::Direct, None),
                Reach::Relayed { via, .. } => (PeerStatus::Relayed, Some(via)),
                Reach::Unreachable => (PeerStatus::Unreachable, None),
            };
            let before = self.reported.insert(key, status);
            let first = before.is_none();
            if before == Some(status) || (first && status.0 == PeerStatus::Unreachable) {
                continue;
            }
            let was_reachable = before.is_some_and(|(s, _)| s != PeerStatus::Unreachable);
            let was_relayed = before.is_some_and(|(s, _)| s == PeerStatus::Relayed);
            let on_session = |s: PeerStatus| matches!(s, PeerStatus::Direct | PeerStatus::Suspect);
            // Into or out of `suspect`: the same session at the same address, no event.
            let same_session = before.is_some_and(|(s, _)| on_session(s)) && on_session(status.0);
            changes.push((
                member.clone(),
                reach,
                status.0,
                was_reachable,
                was_relayed,
                same_session,
            ));
        }
        for (member, reach, _, _, was_relayed, _) in &changes {
            // A direct peer's last frame was noted when its session ended.
            if *was_relayed && !reach.is_reachable() {
                self.table.seen_until(&member.public_key, now.wall());
            }
        }
        for (member, reach, status, was_reachable, _, same_session) in changes {
            self.peer_changed(&member, reach, status, was_reachable, same_session);
        }
        self.update_browsing();
    }

    /// Asks discovery to look for members while there is none yet (so that one added by its
    /// key alone is found at once) or some member has no session; stops it once every member
    /// is `direct`.
    fn update_browsing(&mut self) {
        let members = self.roster.members();
        let wanted = members.is_empty()
            || members.iter().any(|m| {
                !matches!(
                    self.reported.get(&m.public_key),
                    Some((PeerStatus::Direct | PeerStatus::Suspect, _))
                )
            });
        if self.browsing != Some(wanted) {
            self.browsing = Some(wanted);
            self.outputs.push(Output::Browse(wanted));
        }
    }

    /// A member's status changed: log it, tell subscribers and run the built-in event handlers.
    fn peer_changed(
        &mut self,
        member: &crate::roster::Member,
        reach: Reach,
        shown: PeerStatus,
        was_reachable: bool,
        same_session: bool,
    ) {
        let name = &member.name;
        let (status, via, address) = match reach {
            Reach::Direct { .. } if shown == PeerStatus::Suspect => {
                let why = self.probe_reason(&member.public_key).unwrap_or_else(|| {
                    let interval = self
                        .sessions
                        .get(&member.public_key)
                        .map_or(self.config.keepalive_interval, |l| l.liveness.interval());
                    let interval = humantime::format_duration(interval);
                    format!("its keepalive (every {interval}) is overdue")
                });
                tracing::info!(peer = %name, status = "suspect", "{name} is suspect: {why}");
                (PeerStatus::Suspect, None, None)
            }
            Reach::Direct { addr, .. } => {
                tracing::info!(peer = %name, status = "direct", "{name} is direct at {addr}");
                (PeerStatus::Direct, None, Some(addr))
            }
            Reach::Relayed { via, .. } => {
                let via_name = self.member_name(&via);
                tracing::info!(peer = %name, status = "relayed", "{name} is relayed via {via_name}");
                (PeerStatus::Relayed, Some(via), None)
            }
            Reach::Unreachable => {
                tracing::info!(peer = %name, status = "unreachable", "{name} is unreachable");
                (PeerStatus::Unreachable, None, None)
            }
        };
        let via_name = via.and_then(|v| self.roster.get(&v).map(|m| m.name.clone()));
        self.watch(WatchEvent::Peer {
            name: member.name.clone(),
            id: member.id(),
            status,
            via: via_name.clone(),
        });
        let event = match (reach.is_reachable(), was_reachable) {
            (true, false) => "peer-up",
            (false, true) => "peer-down",
            (true, true) if same_session => return,
            (true, true) => "peer-address",
            (false, false) => return,
        };
        let mut env = vec![
            ("CNSPRCY_PEER".to_owned(), member.name.to_string()),
            ("CNSPRCY_PEER_ID".to_owned(), member.id().to_string()),
            ("CNSPRCY_PEER_STATUS".to_owned(), status.as_str().to_owned()),
        ];
        if let Some(addr) = address {
            env.push(("CNSPRCY_PEER_ADDRESS".to_owned(), addr.to_string()));
        }
        if let Some(via) = via_name {
            env.push(("CNSPRCY_PEER_VIA".to_owned(), via.to_string()));
        }
        self.raise_event(event, env);
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

#[cfg(test)]
mod tests {
    use super::*;
    use cnsprcy::identity::Identity;

    fn key(seed: u8) -> PublicKey {
        Identity::from_secret([seed; 32]).public_key()
    }

    #[test]
    fn the_keepalive_stretches_in_steps_of_ten_sessions() {
        let steps: Vec<u32> = [0, 1, 10, 11, 20, 21, 39, 40, 41]
            .into_iter()
            .map(keepalive_step)
            .collect();
        assert_eq!(steps, [1, 1, 1, 2, 2, 3, 4, 4, 5]);
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
