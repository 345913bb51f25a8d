//! Why a member is not direct, and who knocked: what `peers` and `status` tell the user.
//!
//! The dialling side of a refused handshake cannot tell "the other side has not added this
//! device" from "the key added here for it is wrong": in both cases the other side closes the
//! connection after the first handshake message without a word (Noise IK gives a stranger no
//! answer). So the reason says both. The listening side knows more: a handshake it can decrypt
//! from a key that is not a member is a knock, listed with the device ID and key. One it cannot
//! decrypt (sent with a wrong key for this device) names nobody, and is only logged.

use std::collections::VecDeque;
use std::net::SocketAddr;

use cnsprcy::api::{Knock, MAX_KNOCKS, PeerReason};
use cnsprcy::identity::PublicKey;

use super::{Core, Now, StoreAccess};
use crate::peers::Reach;
use crate::roster::Member;

/// How a dial failed, as far as the dialling side can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialFailure {
    /// A connection was made and the other side closed it during the handshake.
    HandshakeRefused,
    /// No address was dialled: `[mesh] interfaces` allows no interface that reaches them.
    Interfaces,
    /// Connecting failed, or the handshake failed otherwise (timed out, another protocol).
    Other,
}

/// The last thing that went wrong with a member, kept until a session with it is up.
#[derive(Debug, Clone)]
pub(crate) struct Problem {
    code: PeerReason,
    message: String,
    wall_ms: u64,
}

/// A device that is not a member and started a handshake.
#[derive(Debug, Clone)]
pub(crate) struct KnockRecord {
    key: PublicKey,
    addr: SocketAddr,
    count: u64,
    first_ms: u64,
    last_ms: u64,
}

/// The knocks, most recent last, at most `MAX_KNOCKS` (strangers can knock as often as they
/// like; the oldest is forgotten).
#[derive(Debug, Default)]
pub(crate) struct Knocks(VecDeque<KnockRecord>);

impl Knocks {
    fn record(&mut self, key: PublicKey, addr: SocketAddr, now_ms: u64) {
        let mut knock = match self.0.iter().position(|k| k.key == key) {
            Some(i) => self
                .0
                .remove(i)
                .unwrap_or_else(|| unreachable!("index just found")),
            None => KnockRecord {
                key,
                addr,
                count: 0,
                first_ms: now_ms,
                last_ms: now_ms,
            },
        };
        knock.addr = addr;
        knock.count += 1;
        knock.last_ms = now_ms;
        while self.0.len() >= MAX_KNOCKS {
            self.0.pop_front();
        }
        self.0.push_back(knock);
    }

    fn forget(&mut self, key: &PublicKey) {
        self.0.retain(|k| k.key != *key);
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

fn rfc3339(wall_ms: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(wall_ms);
    humantime::format_rfc3339_seconds(time).to_string()
}

impl<S: StoreAccess> Core<S> {
    /// A device that is not a member completed the first handshake message (the driver
    /// dropped the connection).
    pub(super) fn on_knock(&mut self, key: PublicKey, addr: SocketAddr, now: Now) {
        if self.roster.get(&key).is_some() || key == self.own {
            // Added meanwhile: its next dial gets through.
            return;
        }
        if let Some(entry) = self
            .roster
            .entry(&key)
            .filter(|e| e.state == cnsprcy::wire::MemberState::Revoked)
        {
            // Not a stranger to offer for adding: it is refused for good.
            tracing::debug!("refused {} (revoked) at {addr}", entry.name);
            return;
        }
        self.knocks.record(key, addr, now.wall_ms);
    }

    /// The knocks, for `status`.
    pub(super) fn knocks(&self) -> Vec<Knock> {
        self.knocks
            .0
            .iter()
            .map(|k| Knock {
                id: k.key.device_id(),
                public_key: k.key,
                address: k.addr,
                count: k.count,
                first_seen: rfc3339(k.first_ms),
                last_seen: rfc3339(k.last_ms),
            })
            .collect()
    }

    /// `key` became a member: it is no longer a stranger knocking.
    pub(super) fn forget_knock(&mut self, key: &PublicKey) {
        self.knocks.forget(key);
    }

    /// Every address of a dial to `peer` failed.
    pub(super) fn note_dial_failure(
        &mut self,
        peer: &PublicKey,
        failure: DialFailure,
        error: &str,
        now: Now,
    ) {
        let (code, message) = match failure {
            DialFailure::HandshakeRefused => (
                PeerReason::HandshakeRefused,
                format!(
                    "handshake refused or dropped by the other side ({error}): it may not have \
                     added this device, or the key added here for it is wrong (then it cannot \
                     decrypt the handshake), or its [mesh] interfaces refuse that address"
                ),
            ),
            DialFailure::Interfaces => (
                PeerReason::Interfaces,
                format!("refused by [mesh] interfaces settings: {error}"),
            ),
            DialFailure::Other => (PeerReason::DialFailed, format!("dial failed: {error}")),
        };
        self.note_problem(peer, code, message, now);
    }

    /// The session with `peer` ended for `reason`.
    pub(super) fn note_session_ended(&mut self, peer: &PublicKey, reason: &str, now: Now) {
        let message = format!("its session ended: {reason}; it is dialled again");
        self.note_problem(peer, PeerReason::SessionEnded, message, now);
    }

    fn note_problem(&mut self, peer: &PublicKey, code: PeerReason, message: String, now: Now) {
        if self.roster.get(peer).is_none() {
            return;
        }
        self.problems.insert(
            *peer,
            Problem {
                code,
                message,
                wall_ms: now.wall_ms,
            },
        );
    }

    /// Keeps problems of members only (after a roster change).
    pub(super) fn prune_problems(&mut self) {
        let roster = &self.roster;
        self.problems.retain(|key, _| roster.get(key).is_some());
    }

    /// The `reason_code` `peers` gives for `peer` now (for the simulator's checks).
    pub fn reason_code(&self, peer: &PublicKey) -> Option<PeerReason> {
        let member = self.roster.get(peer)?;
        self.reason(member, self.table.reach(peer))
            .map(|(code, _)| code)
    }

    /// Why `member` is not direct (`None` when it is).
    pub(super) fn reason(&self, member: &Member, reach: Reach) -> Option<(PeerReason, String)> {
        let key = &member.public_key;
        if let Some(live) = self.sessions.get(key) {
            if !live.suspect {
                return None;
            }
            if let Some(why) = self.probe_reason(key) {
                return Some((PeerReason::Probed, why));
            }
            let interval = humantime::format_duration(live.liveness.interval());
            return Some((
                PeerReason::KeepaliveOverdue,
                format!(
                    "its keepalive (every {interval}) is overdue; the session ends unless a \
                     frame comes soon"
                ),
            ));
        }
        if matches!(reach, Reach::Direct { .. }) {
            return None;
        }
        if member.addresses.is_empty() {
            let name = &member.name;
            return Some((
                PeerReason::NoAddress,
                format!(
                    "no address known: on the same network discovery finds it; else give one \
                     with `cnspr manage add {name} {key} ADDRESS`, \
                     or wait for {name} to dial this device"
                ),
            ));
        }
        if let Some(problem) = self.problems.get(key) {
            let at = rfc3339(problem.wall_ms);
            return Some((problem.code, format!("{} (at {at})", problem.message)));
        }
        Some((
            PeerReason::Dialling,
            format!("being dialled at {}", join(&member.addresses)),
        ))
    }
}

fn join(addresses: &[SocketAddr]) -> String {
    addresses
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::{Duration, Instant};

    use cnsprcy::api::{PeerInfo, PeerStatus};
    use cnsprcy::config::MeshConfig;
    use cnsprcy::identity::{DeviceName, Identity};
    use cnsprcy::netif::InterfaceFilter;
    use cnsprcy::wire::{StoreEntry, StoreSummary};

    use super::*;
    use crate::core::{Answer, ApiCall, Input, Output, Setup, StoreCounter};

    /// A store that holds nothing: these tests are about sessions.
    struct NoStore;

    impl StoreAccess for NoStore {
        fn top(&self) -> Vec<u64> {
            vec![0; 256]
        }
        fn buckets(&self, _: &[u8]) -> Vec<(u8, Vec<u64>)> {
            Vec::new()
        }
        fn leaf_digests(&self, _: u8) -> Vec<u64> {
            Vec::new()
        }
        fn summaries(&self, _: &[u16]) -> Vec<StoreSummary> {
            Vec::new()
        }
        fn entries(&self, _: &[&str]) -> Vec<StoreEntry> {
            Vec::new()
        }
        fn apply_remote(&self, _: Vec<StoreEntry>, _: &str, _: u64) -> Vec<StoreEntry> {
            Vec::new()
        }
        fn count(&self, _: StoreCounter, _: u64) {}
    }

    fn key(seed: u8) -> PublicKey {
        Identity::from_secret([seed; 32]).public_key()
    }

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, last)), 7332)
    }

    fn member(name: &str, seed: u8, addresses: Vec<SocketAddr>) -> Member {
        Member::new(DeviceName::new(name).unwrap(), key(seed), addresses)
    }

    struct Harness {
        core: Core<NoStore>,
        start: Instant,
        wall_ms: u64,
        /// The latest input's time: queries go then.
        at: Duration,
    }

    impl Harness {
        fn new(members: Vec<Member>) -> Self {
            let start = Instant::now();
            let wall_ms = 1_800_000_000_000;
            let setup = Setup {
                own: key(1),
                name: DeviceName::new("here").unwrap(),
                config: MeshConfig::default(),
                listening: vec![addr(1)],
                filter: InterfaceFilter::any(),
                interfaces: Vec::new(),
                members,
                outbox: Vec::new(),
                delivered: Vec::new(),
                inbox: Vec::new(),
                seed: 7,
            };
            let now = Now {
                mono: start,
                wall_ms,
            };
            let mut core = Core::new(setup, NoStore, now);
            core.start(now);
            Self {
                core,
                start,
                wall_ms,
                at: Duration::ZERO,
            }
        }

        fn now(&self, after: Duration) -> Now {
            Now {
                mono: self.start + after,
                wall_ms: self.wall_ms + after.as_millis() as u64,
            }
        }

        fn input(&mut self, input: Input, after: Duration) -> Vec<Output> {
            self.at = self.at.max(after);
            let now = self.now(self.at);
            self.core.handle(input, now)
        }

        fn peer(&mut self, name: &str) -> PeerInfo {
            let outputs = self.input(
                Input::Api {
                    request: 1,
                    call: ApiCall::Peer { name: name.into() },
                },
                self.at,
            );
            outputs
                .into_iter()
                .find_map(|o| match o {
                    Output::Answer {
                        answer: Answer::Peer(peer),
                        ..
                    } => Some(peer.unwrap()),
                    _ => None,
                })
                .unwrap()
        }

        fn knocks(&mut self) -> Vec<Knock> {
            let outputs = self.input(
                Input::Api {
                    request: 2,
                    call: ApiCall::Knocks,
                },
                self.at,
            );
            outputs
                .into_iter()
                .find_map(|o| match o {
                    Output::Answer {
                        answer: Answer::Knocks(knocks),
                        ..
                    } => Some(knocks),
                    _ => None,
                })
                .unwrap()
        }
    }

    #[test]
    fn a_member_without_an_address_says_so() {
        let mut h = Harness::new(vec![member("phone", 2, Vec::new())]);
        let peer = h.peer("phone");
        assert_eq!(peer.status, PeerStatus::Unreachable);
        assert_eq!(peer.reason_code, Some(PeerReason::NoAddress));
        let reason = peer.reason.unwrap();
        assert!(reason.starts_with("no address known"), "{reason}");
        assert!(reason.contains("cnspr manage add phone"), "{reason}");
    }

    #[test]
    fn a_refused_handshake_names_both_causes_and_when() {
        let mut h = Harness::new(vec![member("desk", 2, vec![addr(2)])]);
        assert_eq!(h.peer("desk").reason_code, Some(PeerReason::Dialling));
        h.input(
            Input::DialFailed {
                peer: key(2),
                failure: DialFailure::HandshakeRefused,
                error: "10.0.0.2:7332: closed by the other side".into(),
            },
            Duration::from_millis(500),
        );
        let peer = h.peer("desk");
        assert_eq!(peer.reason_code, Some(PeerReason::HandshakeRefused));
        let reason = peer.reason.unwrap();
        assert!(
            reason.contains("may not have added this device"),
            "{reason}"
        );
        assert!(
            reason.contains("the key added here for it is wrong"),
            "{reason}"
        );
        assert!(reason.contains("10.0.0.2:7332"), "{reason}");
        assert!(reason.ends_with("(at 2027-01-15T08:00:00Z)"), "{reason}");
    }

    #[test]
    fn the_last_dial_failure_counts_and_a_session_clears_it() {
        let mut h = Harness::new(vec![member("desk", 2, vec![addr(2)])]);
        h.input(
            Input::DialFailed {
                peer: key(2),
                failure: DialFailure::Interfaces,
                error: "10.0.0.2:7332: not dialled: no allowed interface".into(),
            },
            Duration::from_millis(100),
        );
        let peer = h.peer("desk");
        assert_eq!(peer.reason_code, Some(PeerReason::Interfaces));
        assert!(
            peer.reason
                .unwrap()
                .starts_with("refused by [mesh] interfaces settings")
        );
        h.input(
            Input::DialFailed {
                peer: key(2),
                failure: DialFailure::Other,
                error: "10.0.0.2:7332: connection refused".into(),
            },
            Duration::from_millis(200),
        );
        let peer = h.peer("desk");
        assert_eq!(peer.reason_code, Some(PeerReason::DialFailed));
        assert!(
            peer.reason
                .unwrap()
                .starts_with("dial failed: 10.0.0.2:7332: connection refused")
        );
        h.input(
            Input::SessionUp {
                session: 1,
                peer: key(2),
                initiator: false,
                incarnation: 1,
                addr: addr(2),
                local: None,
                joining: None,
            },
            Duration::from_millis(300),
        );
        let peer = h.peer("desk");
        assert_eq!(peer.status, PeerStatus::Direct);
        assert_eq!((peer.reason, peer.reason_code), (None, None));
        h.input(
            Input::SessionDown {
                session: 1,
                reason: "closed by the other side".into(),
            },
            Duration::from_millis(400),
        );
        let peer = h.peer("desk");
        assert_eq!(peer.reason_code, Some(PeerReason::SessionEnded));
        assert!(peer.reason.unwrap().contains("closed by the other side"));
    }

    #[test]
    fn knocks_are_counted_bounded_and_forgotten_once_added() {
        let mut h = Harness::new(Vec::new());
        let knock = |h: &mut Harness, seed: u8, last: u8, at_ms: u64| {
            h.input(
                Input::Knock {
                    peer: key(seed),
                    addr: addr(last),
                },
                Duration::from_millis(at_ms),
            );
        };
        knock(&mut h, 2, 2, 0);
        knock(&mut h, 2, 3, 2_000);
        let knocks = h.knocks();
        assert_eq!(knocks.len(), 1);
        assert_eq!(knocks[0].id, key(2).device_id());
        assert_eq!(knocks[0].public_key, key(2));
        assert_eq!(knocks[0].count, 2);
        assert_eq!(knocks[0].address, addr(3));
        assert_eq!(knocks[0].first_seen, "2027-01-15T08:00:00Z");
        assert_eq!(knocks[0].last_seen, "2027-01-15T08:00:02Z");
        // Many strangers: the most recent MAX_KNOCKS stay.
        for seed in 10..10 + MAX_KNOCKS as u8 + 4 {
            knock(&mut h, seed, seed, 3_000);
        }
        let knocks = h.knocks();
        assert_eq!(knocks.len(), MAX_KNOCKS);
        assert!(knocks.iter().all(|k| k.public_key != key(2)));
        let newest = key(10 + MAX_KNOCKS as u8 + 3);
        assert_eq!(knocks.last().unwrap().public_key, newest);
        // A stranger added as a member is no longer one.
        h.input(
            Input::Api {
                request: 3,
                call: ApiCall::AddMember(Member::new(
                    DeviceName::new("new").unwrap(),
                    newest,
                    Vec::new(),
                )),
            },
            Duration::from_secs(4),
        );
        assert!(h.knocks().iter().all(|k| k.public_key != newest));
        assert_eq!(h.core.knocks.len(), MAX_KNOCKS - 1);
        // And its handshakes are no knocks.
        knock(&mut h, 10 + MAX_KNOCKS as u8 + 3, 9, 5_000);
        assert_eq!(h.core.knocks.len(), MAX_KNOCKS - 1);
    }
}
