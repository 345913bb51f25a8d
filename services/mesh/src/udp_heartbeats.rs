//! Heartbeats over UDP (`docs/protocol.md`, "Heartbeats over UDP").
//!
//! A heartbeat over a TCP session costs two packets, the segment and its acknowledgement; over
//! UDP it costs one. The device that watches a peer's heartbeats offers, over their session, a
//! port, a tag and a key made for that session alone; the peer then seals each heartbeat with
//! the key and sends it to that port. A datagram that does not open with a live offer's key, or
//! whose sequence number is not above every one seen before, is dropped without a word.
//! When a heartbeat went missing yet the peer answered the probe that followed, the offer is
//! withdrawn: UDP is blocked or lossy on that path, and heartbeats go over the session again
//! (TCP resends what it loses). The session offers UDP again after a while (a passing loss, or
//! a peer that stalled for a moment, should not cost it UDP for good), waiting twice as long
//! after each withdrawal.
//!
//! The way heartbeats travel is the driver's business, like the sessions' encryption: the core
//! asks to send a `Heartbeat` and hears of one as a frame of the session, whichever way it came.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};
use cnsprcy::wire::{Message, TAG_LEN, UdpHeartbeatOffer};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::core::SessionId;
use crate::node::Event;

/// The first byte of every datagram: the format below.
const VERSION: u8 = 1;
/// Version, tag and sequence number, sent in the clear and authenticated with the rest.
const HEADER: usize = 1 + 8 + 8;
/// A sealed heartbeat is about 40 bytes; anything larger is not one.
const MAX_DATAGRAM: usize = 128;

fn nonce(seq: u64) -> Nonce {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&seq.to_le_bytes());
    Nonce::from(nonce)
}

/// `message` sealed as datagram number `seq` under `tag` (`None`: it could not be encrypted,
/// which only a message of gigabytes could cause).
fn seal(cipher: &ChaCha20Poly1305, tag: u64, seq: u64, message: &Message) -> Option<Vec<u8>> {
    seal_bytes(cipher, tag, seq, message.encode())
}

fn seal_bytes(cipher: &ChaCha20Poly1305, tag: u64, seq: u64, mut body: Vec<u8>) -> Option<Vec<u8>> {
    let mut datagram = Vec::with_capacity(HEADER + body.len() + TAG_LEN);
    datagram.push(VERSION);
    datagram.extend_from_slice(&tag.to_le_bytes());
    datagram.extend_from_slice(&seq.to_le_bytes());
    let auth = cipher
        .encrypt_in_place_detached(&nonce(seq), &datagram, &mut body)
        .ok()?;
    datagram.extend_from_slice(&body);
    datagram.extend_from_slice(&auth);
    Some(datagram)
}

/// The tag and sequence number of what looks like one of our datagrams.
fn header(datagram: &[u8]) -> Option<(u64, u64)> {
    if datagram.len() < HEADER + TAG_LEN || datagram.len() > MAX_DATAGRAM {
        return None;
    }
    if datagram[0] != VERSION {
        return None;
    }
    let tag = u64::from_le_bytes(datagram[1..9].try_into().ok()?);
    let seq = u64::from_le_bytes(datagram[9..HEADER].try_into().ok()?);
    Some((tag, seq))
}

/// The offers, shared between the node and the tasks that receive.
pub fn lock(offered: &Mutex<Offered>) -> MutexGuard<'_, Offered> {
    // Every change to the offers is whole at the end of a statement.
    offered.lock().unwrap_or_else(|p| p.into_inner())
}

/// The offers this device made: whose heartbeats it takes over UDP, and with which key.
#[derive(Default)]
pub struct Offered {
    by_tag: HashMap<u64, Accepting>,
    tags: HashMap<SessionId, u64>,
}

struct Accepting {
    session: SessionId,
    cipher: ChaCha20Poly1305,
    /// The highest sequence number opened so far: a replayed or late datagram is not above it.
    last_seq: u64,
    /// The peer was asked to send its heartbeats over the session again. Datagrams it sent
    /// before it heard still open.
    withdrawn: bool,
}

impl Offered {
    /// A new offer to `session`'s peer: send heartbeats to `port`.
    pub fn offer(&mut self, session: SessionId, port: u16) -> UdpHeartbeatOffer {
        self.forget(session);
        let key: [u8; 32] = rand::random();
        let mut tag: u64 = rand::random();
        while self.by_tag.contains_key(&tag) {
            tag = rand::random();
        }
        self.by_tag.insert(
            tag,
            Accepting {
                session,
                cipher: ChaCha20Poly1305::new(&key.into()),
                last_seq: 0,
                withdrawn: false,
            },
        );
        self.tags.insert(session, tag);
        UdpHeartbeatOffer { port, tag, key }
    }

    /// Whether `session`'s peer has an offer that was not withdrawn.
    pub fn is_live(&self, session: SessionId) -> bool {
        self.accepting(session).is_some_and(|a| !a.withdrawn)
    }

    /// Marks the offer to `session`'s peer as withdrawn (the peer is told over the session).
    pub fn withdraw(&mut self, session: SessionId) {
        if let Some(tag) = self.tags.get(&session)
            && let Some(accepting) = self.by_tag.get_mut(tag)
        {
            accepting.withdrawn = true;
        }
    }

    /// Forgets the offer made to `session`'s peer: the session ended.
    pub fn forget(&mut self, session: SessionId) {
        if let Some(tag) = self.tags.remove(&session) {
            self.by_tag.remove(&tag);
        }
    }

    fn accepting(&self, session: SessionId) -> Option<&Accepting> {
        self.by_tag.get(self.tags.get(&session)?)
    }

    /// The session and heartbeat a datagram carries, if it opens with the key of a live offer
    /// and comes after every datagram opened under that offer before.
    pub fn open(&mut self, datagram: &[u8]) -> Option<(SessionId, Message)> {
        let (tag, seq) = header(datagram)?;
        let accepting = self.by_tag.get_mut(&tag)?;
        if seq <= accepting.last_seq {
            return None;
        }
        let (head, rest) = datagram.split_at(HEADER);
        let (ciphertext, auth) = rest.split_at(rest.len() - TAG_LEN);
        let mut body = ciphertext.to_vec();
        accepting
            .cipher
            .decrypt_in_place_detached(&nonce(seq), head, &mut body, Tag::from_slice(auth))
            .ok()?;
        let message = Message::decode(&body).ok()?;
        if !matches!(message, Message::Heartbeat { .. }) {
            return None;
        }
        accepting.last_seq = seq;
        Some((accepting.session, message))
    }
}

/// UDP is offered again this many heartbeat intervals after the first withdrawal on a session
/// (10 minutes with the default interval of 2 s).
const FIRST_RETRY_HEARTBEATS: u32 = 300;
/// The longest wait before offering again: where UDP is blocked for good, a false alarm (one
/// probe per device) about twice a day.
const LAST_RETRY: Duration = Duration::from_secs(12 * 3600);

/// When a session whose offer was withdrawn offers UDP again.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// When to offer again; `None` while an offer is out.
    at: Option<Instant>,
    /// The wait after the next withdrawal.
    next_wait: Duration,
}

impl Retry {
    /// For a session whose heartbeats come every `heartbeat_interval`.
    pub fn new(heartbeat_interval: Duration) -> Self {
        Self {
            at: None,
            next_wait: (heartbeat_interval * FIRST_RETRY_HEARTBEATS).min(LAST_RETRY),
        }
    }

    /// The offer was withdrawn at `now`.
    pub fn withdrawn(&mut self, now: Instant) {
        self.at = Some(now + self.next_wait);
        self.next_wait = (self.next_wait * 2).min(LAST_RETRY);
    }

    /// Whether to offer again at `now` (then it counts as offered).
    pub fn due(&mut self, now: Instant) -> bool {
        if self.at.is_some_and(|at| now >= at) {
            self.at = None;
            return true;
        }
        false
    }
}

/// The offers this device took: where each session's heartbeats go over UDP.
#[derive(Default)]
pub struct Targets {
    by_session: HashMap<SessionId, Target>,
}

struct Target {
    to: SocketAddr,
    tag: u64,
    cipher: ChaCha20Poly1305,
    next_seq: u64,
}

impl Targets {
    /// Heartbeats on `session`, whose peer is at `peer`, go as `offer` says from now on.
    pub fn take(&mut self, session: SessionId, peer: SocketAddr, offer: &UdpHeartbeatOffer) {
        let mut to = peer;
        // The peer's address as the session reached it (with its scope, for a link-local
        // IPv6 address), at the port offered.
        to.set_port(offer.port);
        self.by_session.insert(
            session,
            Target {
                to,
                tag: offer.tag,
                cipher: ChaCha20Poly1305::new(&offer.key.into()),
                next_seq: 1,
            },
        );
    }

    pub fn forget(&mut self, session: SessionId) {
        self.by_session.remove(&session);
    }

    /// `message` sealed for `session`'s peer, and where to send it; `None` when heartbeats on
    /// that session go over the session.
    pub fn seal(&mut self, session: SessionId, message: &Message) -> Option<(SocketAddr, Vec<u8>)> {
        let target = self.by_session.get_mut(&session)?;
        let datagram = seal(&target.cipher, target.tag, target.next_seq, message)?;
        target.next_seq += 1;
        Some((target.to, datagram))
    }
}

/// The UDP sockets heartbeats come in on and go out from: one beside each listening TCP socket,
/// at the same address and port.
pub struct Sockets {
    sockets: Vec<Arc<UdpSocket>>,
}

impl Sockets {
    /// Binds one UDP socket at each of `listening`. One that fails is logged and skipped: its
    /// heartbeats then go over the sessions, as before.
    pub fn bind(listening: &[SocketAddr]) -> Self {
        let mut sockets = Vec::new();
        for addr in listening {
            match bind(*addr) {
                Ok(socket) => sockets.push(Arc::new(socket)),
                Err(e) => tracing::info!(
                    "cannot receive heartbeats over UDP at {addr} ({e}); they come over the sessions"
                ),
            }
        }
        Self { sockets }
    }

    /// None: nothing goes over UDP.
    pub fn none() -> Self {
        Self {
            sockets: Vec::new(),
        }
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<UdpSocket>> {
        self.sockets.iter()
    }

    /// The port a peer reaches this device's UDP socket at over a session whose local end is
    /// `local`: that of a socket bound to its address, or to any address of its family.
    pub fn port_for(&self, local: SocketAddr) -> Option<u16> {
        self.sockets
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .find(|bound| {
                bound.is_ipv4() == local.is_ipv4()
                    && (bound.ip().is_unspecified() || bound.ip() == local.ip())
            })
            .map(|bound| bound.port())
    }

    /// Sends `datagram` to `to` without waiting; false when it could not go (no socket of that
    /// family, a full socket buffer, no route).
    pub fn send(&self, to: SocketAddr, datagram: &[u8]) -> bool {
        self.sockets
            .iter()
            .find(|s| s.local_addr().is_ok_and(|a| a.is_ipv4() == to.is_ipv4()))
            // Straight to the socket: tokio's `try_send_to` refuses until its reactor has seen
            // the socket writable once, and a heartbeat does not wait.
            .is_some_and(|socket| {
                match SockRef::from(socket.as_ref()).send_to(datagram, &to.into()) {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::debug!("a heartbeat to {to} did not go over UDP: {e}");
                        false
                    }
                }
            })
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // As the TCP listeners: `[::]` and `0.0.0.0` on one port each get their own socket.
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Hands the node every heartbeat that opens with a live offer's key, until `stop`.
pub async fn receive(
    socket: Arc<UdpSocket>,
    offered: Arc<Mutex<Offered>>,
    events: mpsc::Sender<Event>,
    stop: CancellationToken,
) {
    // One byte more than the largest datagram taken, to tell a larger one.
    let mut buf = [0u8; MAX_DATAGRAM + 1];
    loop {
        let received = tokio::select! {
            _ = stop.cancelled() => return,
            received = socket.recv_from(&mut buf) => received,
        };
        let len = match received {
            Ok((len, _)) => len,
            Err(e) => {
                // Errors of a UDP socket are passing (an ICMP error for an earlier send, say);
                // the pause keeps one that is not from spinning.
                tracing::debug!("receiving a heartbeat over UDP failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let opened = lock(&offered).open(&buf[..len]);
        if let Some((session, message)) = opened
            && events
                .send(Event::Frame { session, message })
                .await
                .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat(next_ms: u32) -> Message {
        Message::Heartbeat {
            next_ms: Some(next_ms),
            root: 0xfeed,
        }
    }

    /// An offer made by a watcher for session 7, taken by the sender for its session 3.
    fn pair() -> (Offered, Targets) {
        let mut offered = Offered::default();
        let offer = offered.offer(7, 7332);
        let mut targets = Targets::default();
        targets.take(3, "10.0.0.2:40000".parse().unwrap(), &offer);
        (offered, targets)
    }

    #[test]
    fn a_sealed_heartbeat_opens_for_the_session_it_was_offered_on() {
        let (mut offered, mut targets) = pair();
        let (to, datagram) = targets.seal(3, &heartbeat(2000)).unwrap();
        assert_eq!(to, "10.0.0.2:7332".parse().unwrap());
        assert!(datagram.len() <= MAX_DATAGRAM, "{}", datagram.len());
        assert_eq!(offered.open(&datagram), Some((7, heartbeat(2000))));
        // Unknown sessions have no target.
        assert!(targets.seal(4, &heartbeat(2000)).is_none());
    }

    #[test]
    fn replayed_late_forged_and_foreign_datagrams_are_dropped() {
        let (mut offered, mut targets) = pair();
        let (_, first) = targets.seal(3, &heartbeat(1)).unwrap();
        let (_, second) = targets.seal(3, &heartbeat(2)).unwrap();
        assert!(offered.open(&second).is_some());
        assert_eq!(offered.open(&first), None, "older than one opened");
        assert_eq!(offered.open(&second), None, "replayed");

        let (_, third) = targets.seal(3, &heartbeat(3)).unwrap();
        for i in 0..third.len() {
            let mut forged = third.clone();
            forged[i] ^= 0x40;
            assert_eq!(offered.open(&forged), None, "byte {i} changed");
        }
        assert_eq!(offered.open(&third[..third.len() - 1]), None, "cut short");
        assert_eq!(offered.open(&[]), None);
        assert_eq!(offered.open(&[0u8; MAX_DATAGRAM + 1]), None);

        // Another offer's key, under this offer's tag.
        let mut other = Offered::default();
        let mut foreign = other.offer(8, 7332);
        foreign.tag = u64::from_le_bytes(third[1..9].try_into().unwrap());
        let mut stranger = Targets::default();
        stranger.take(1, "10.0.0.2:1".parse().unwrap(), &foreign);
        let (_, datagram) = stranger.seal(1, &heartbeat(4)).unwrap();
        assert_eq!(offered.open(&datagram), None);

        assert!(offered.open(&third).is_some(), "the real one still opens");
    }

    #[test]
    fn an_offer_comes_again_later_each_time_it_was_withdrawn() {
        let t0 = Instant::now();
        let minute = Duration::from_secs(60);
        let mut retry = Retry::new(Duration::from_secs(2));
        assert!(!retry.due(t0 + minute * 1000), "nothing withdrawn yet");
        retry.withdrawn(t0);
        assert!(!retry.due(t0 + minute * 9));
        assert!(retry.due(t0 + minute * 10));
        assert!(!retry.due(t0 + minute * 11), "offered again already");
        let t1 = t0 + minute * 12;
        retry.withdrawn(t1);
        assert!(!retry.due(t1 + minute * 19));
        assert!(retry.due(t1 + minute * 20));
        for _ in 0..20 {
            retry.withdrawn(t1);
            assert!(retry.due(t1 + LAST_RETRY));
        }
    }

    #[test]
    fn only_heartbeats_open() {
        let (mut offered, mut targets) = pair();
        let (_, datagram) = targets.seal(3, &Message::Pong { nonce: 1 }).unwrap();
        assert_eq!(offered.open(&datagram), None);
    }

    #[test]
    fn a_withdrawn_offer_still_opens_what_was_on_its_way_and_a_forgotten_one_nothing() {
        let (mut offered, mut targets) = pair();
        assert!(offered.is_live(7));
        offered.withdraw(7);
        assert!(!offered.is_live(7));
        let (_, datagram) = targets.seal(3, &heartbeat(1)).unwrap();
        assert!(offered.open(&datagram).is_some());
        offered.forget(7);
        let (_, datagram) = targets.seal(3, &heartbeat(2)).unwrap();
        assert_eq!(offered.open(&datagram), None);
        targets.forget(3);
        assert!(targets.seal(3, &heartbeat(1)).is_none());
    }

    #[test]
    fn offers_for_one_session_replace_each_other() {
        let mut offered = Offered::default();
        let first = offered.offer(7, 1);
        let second = offered.offer(7, 1);
        assert_ne!(first.key, second.key);
        let mut targets = Targets::default();
        targets.take(3, "10.0.0.2:1".parse().unwrap(), &first);
        let (_, datagram) = targets.seal(3, &heartbeat(1)).unwrap();
        assert_eq!(offered.open(&datagram), None);
    }

    /// Fuzz harness (docs/reliability.md): a datagram as a stranger sends it (first byte even),
    /// or any plaintext sealed with the real key under any sequence number (odd), to `open`.
    /// A stranger's opens nothing; a sealed one opens exactly when it is a heartbeat that comes
    /// after every one opened before and fits a datagram.
    #[test]
    fn udp_datagram() {
        use cnsprcy::fuzzing::both;
        use cnsprcy::{fuzz_seeds, fuzz_target};
        let seeds = fuzz_seeds!("udp_datagram");
        fuzz_target!("udp_datagram").for_each(|input| {
            both(&seeds, input, |bytes| {
                let mut offered = Offered::default();
                let offer = offered.offer(7, 7332);
                let cipher = ChaCha20Poly1305::new(&offer.key.into());
                let Some((&mode, rest)) = bytes.split_first() else {
                    return;
                };
                if mode % 2 == 0 {
                    assert_eq!(offered.open(rest), None);
                    return;
                }
                let mut last = 0;
                // Several datagrams in a row: a sequence number (one byte) and a plaintext
                // length (one byte) each, then the plaintext.
                let mut rest = rest;
                while let [seq, len, tail @ ..] = rest {
                    let len = usize::from(*len).min(tail.len());
                    let (plaintext, tail) = tail.split_at(len);
                    rest = tail;
                    let seq = u64::from(*seq);
                    let Some(datagram) = seal_bytes(&cipher, offer.tag, seq, plaintext.to_vec())
                    else {
                        continue;
                    };
                    let heartbeat = Message::decode(plaintext)
                        .ok()
                        .filter(|m| matches!(m, Message::Heartbeat { .. }));
                    let opens = heartbeat.is_some() && seq > last && datagram.len() <= MAX_DATAGRAM;
                    let opened = offered.open(&datagram);
                    if opens {
                        assert_eq!(opened, Some((7, heartbeat.unwrap())));
                        last = seq;
                    } else {
                        assert_eq!(opened, None, "seq {seq} after {last}: {plaintext:?}");
                    }
                }
            })
        });
    }

    #[tokio::test]
    async fn a_heartbeat_goes_over_loopback_and_reaches_the_node() {
        let sockets = Sockets::bind(&["127.0.0.1:0".parse().unwrap()]);
        let bound = sockets.all().next().unwrap().local_addr().unwrap();
        assert_eq!(
            sockets.port_for("127.0.0.1:5".parse().unwrap()),
            Some(bound.port())
        );
        assert_eq!(sockets.port_for("127.0.0.2:5".parse().unwrap()), None);
        assert_eq!(sockets.port_for("[::1]:5".parse().unwrap()), None);

        let offered = Arc::new(Mutex::new(Offered::default()));
        let offer = offered.lock().unwrap().offer(7, bound.port());
        let (events_tx, mut events) = mpsc::channel(4);
        let stop = CancellationToken::new();
        let socket = sockets.all().next().unwrap().clone();
        let task = tokio::spawn(receive(socket, offered, events_tx, stop.clone()));

        let mut targets = Targets::default();
        targets.take(3, "127.0.0.1:9".parse().unwrap(), &offer);
        let (to, datagram) = targets.seal(3, &heartbeat(5)).unwrap();
        assert!(sockets.send(to, b"not a heartbeat"));
        assert!(sockets.send(to, &datagram));
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Some(Event::Frame { session, message })) => {
                assert_eq!(session, 7);
                assert_eq!(message, heartbeat(5));
            }
            _ => panic!("no heartbeat reached the node"),
        }
        stop.cancel();
        task.await.unwrap();
    }
}
