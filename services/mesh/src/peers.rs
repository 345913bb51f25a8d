//! Where every member stands, seen from this device, without I/O: direct sessions, what direct
//! peers report about their own sessions (for `relayed` status), and when to dial whom.
//!
//! Invariants:
//! - every roster member has exactly one entry here, and nothing else has one;
//! - a member with a direct session is never dialled; one being dialled is not dialled twice;
//! - a report from a peer counts only while this device has a direct session with it.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use cnsprcy::identity::PublicKey;

use crate::backoff::Backoff;
use crate::det::Map;

/// A session must last this long before its end resets the member's backoff; a peer that
/// accepts and immediately drops sessions is otherwise redialled in a tight loop.
pub const STABLE_SESSION: Duration = Duration::from_secs(10);
/// The most neighbours kept from one peer's report.
pub const MAX_REPORTED: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reach {
    Direct {
        addr: SocketAddr,
        rtt: Option<Duration>,
    },
    /// Reachable through `via`, which has a direct session with it.
    Relayed {
        via: PublicKey,
        rtt: Option<Duration>,
    },
    Unreachable,
}

impl Reach {
    pub fn is_reachable(&self) -> bool {
        !matches!(self, Reach::Unreachable)
    }
}

#[derive(Debug, Clone)]
struct Direct {
    addr: SocketAddr,
    since: Instant,
    rtt: Option<Duration>,
}

#[derive(Debug, Clone)]
struct Peer {
    direct: Option<Direct>,
    last_seen: Option<SystemTime>,
    backoff: Backoff,
    next_dial: Instant,
    dialing: bool,
}

#[derive(Debug, Default)]
pub struct PeerTable {
    peers: Map<PublicKey, Peer>,
    /// What each direct peer said it is directly connected to, with its RTT.
    reports: Map<PublicKey, Vec<(PublicKey, Option<Duration>)>>,
    /// The same, by reported device: who reports it, with that reporter's RTT to it. Finding a
    /// relay is then one look-up, not a pass over every report.
    reported_by: Map<PublicKey, Map<PublicKey, Option<Duration>>>,
    /// Bumped by every change of who is direct, reported or a member: whoever reports
    /// statuses need not look again while it stays the same.
    generation: u64,
    /// Bumped by every change of a measured RTT (which changes latencies, and may change the
    /// choice of relay).
    rtt_generation: u64,
    /// Bumped by every change of who is direct or of a direct peer's RTT.
    direct_generation: u64,
    /// `direct_neighbors` as of the `direct_generation` it was computed at: asked for after
    /// nearly every input, and sorting it each time was a good part of the core's work.
    direct_cache: std::cell::RefCell<Option<DirectCache>>,
}

#[derive(Debug)]
struct DirectCache {
    generation: u64,
    neighbors: Vec<(PublicKey, Option<Duration>)>,
}

impl PeerTable {
    /// Makes the table's members exactly `members`; new ones are due for dialling at once.
    pub fn sync_members(&mut self, members: impl IntoIterator<Item = PublicKey>, now: Instant) {
        self.generation += 1;
        self.direct_generation += 1;
        let members: Vec<PublicKey> = members.into_iter().collect();
        self.peers.retain(|key, _| members.contains(key));
        let gone: Vec<PublicKey> = self
            .reports
            .keys()
            .filter(|key| !members.contains(key))
            .copied()
            .collect();
        for key in gone {
            self.drop_report(&key);
        }
        for key in members {
            self.peers.entry(key).or_insert_with(|| Peer {
                direct: None,
                last_seen: None,
                backoff: Backoff::default(),
                next_dial: now,
                dialing: false,
            });
        }
    }

    pub fn contains(&self, key: &PublicKey) -> bool {
        self.peers.contains_key(key)
    }

    /// Members to dial now; they are marked as being dialled.
    pub fn take_due_dials(&mut self, now: Instant) -> Vec<PublicKey> {
        let mut due = Vec::new();
        for (key, peer) in &mut self.peers {
            if peer.direct.is_none() && !peer.dialing && peer.next_dial <= now {
                peer.dialing = true;
                due.push(*key);
            }
        }
        due.sort_by_key(|k| *k.as_bytes());
        due
    }

    /// All dial attempts to `key` failed; `jitter` in [0, 1).
    pub fn dial_failed(&mut self, key: &PublicKey, now: Instant, jitter: f64) -> Option<Duration> {
        let peer = self.peers.get_mut(key)?;
        peer.dialing = false;
        if peer.direct.is_some() {
            return None;
        }
        let delay = peer.backoff.next_delay(jitter);
        peer.next_dial = now + delay;
        Some(delay)
    }

    pub fn session_up(&mut self, key: &PublicKey, addr: SocketAddr, now: Instant) {
        self.generation += 1;
        self.direct_generation += 1;
        if let Some(peer) = self.peers.get_mut(key) {
            peer.dialing = false;
            peer.direct = Some(Direct {
                addr,
                since: now,
                rtt: None,
            });
        }
    }

    /// The direct session ended; the next dial waits for the backoff (reset first if the
    /// session had been stable).
    pub fn session_down(&mut self, key: &PublicKey, now: Instant, jitter: f64) {
        self.generation += 1;
        self.direct_generation += 1;
        self.drop_report(key);
        let Some(peer) = self.peers.get_mut(key) else {
            return;
        };
        if let Some(direct) = peer.direct.take()
            && now.saturating_duration_since(direct.since) >= STABLE_SESSION
        {
            peer.backoff.reset();
        }
        peer.next_dial = now + peer.backoff.next_delay(jitter);
    }

    /// Where the peer of a direct session listens, once known (an accepted session's own address
    /// has the peer's ephemeral port, which is no use to anyone).
    pub fn set_address(&mut self, key: &PublicKey, addr: SocketAddr) {
        if let Some(direct) = self.peers.get_mut(key).and_then(|p| p.direct.as_mut())
            && direct.addr != addr
        {
            direct.addr = addr;
            self.generation += 1;
        }
    }

    pub fn set_rtt(&mut self, key: &PublicKey, rtt: Duration) {
        if let Some(direct) = self.peers.get_mut(key).and_then(|p| p.direct.as_mut())
            && direct.rtt != Some(rtt)
        {
            direct.rtt = Some(rtt);
            self.rtt_generation += 1;
            self.direct_generation += 1;
        }
    }

    /// `reporter` says it has direct sessions with `neighbors`. Kept whole (members added later
    /// count at once), but bounded: no member has more peers than this.
    pub fn set_report(
        &mut self,
        reporter: &PublicKey,
        mut neighbors: Vec<(PublicKey, Option<Duration>)>,
    ) {
        neighbors.truncate(MAX_REPORTED);
        if self.peers.get(reporter).is_none_or(|p| p.direct.is_none()) {
            return;
        }
        let old = self.reports.get(reporter);
        let same_devices = old.is_some_and(|old| {
            old.len() == neighbors.len()
                && old.iter().zip(&neighbors).all(|((a, _), (b, _))| a == b)
        });
        if same_devices {
            // The usual case (round-trip times moved): update in place, since taking every
            // entry out and putting it back costs a reporter's whole list of map operations.
            if old != Some(&neighbors) {
                self.rtt_generation += 1;
                for (target, rtt) in &neighbors {
                    if let Some(by) = self.reported_by.get_mut(target) {
                        by.insert(*reporter, *rtt);
                    }
                }
            }
        } else {
            self.drop_report(reporter);
            for (target, rtt) in &neighbors {
                self.reported_by
                    .entry(*target)
                    .or_default()
                    .insert(*reporter, *rtt);
            }
            self.generation += 1;
        }
        self.reports.insert(*reporter, neighbors);
    }

    /// Whether `peer` reported a direct session with every one of `keys` (but itself): it then
    /// reaches them all without a relay and has no use for this device's round-trip times.
    pub fn reports_all(&self, peer: &PublicKey, keys: &[PublicKey]) -> bool {
        let Some(report) = self.reports.get(peer) else {
            return false;
        };
        keys.iter()
            .filter(|k| *k != peer)
            .all(|k| report.iter().any(|(reported, _)| reported == k))
    }

    /// Forgets what `reporter` reported; returns it.
    fn drop_report(&mut self, reporter: &PublicKey) -> Option<Vec<(PublicKey, Option<Duration>)>> {
        let old = self.reports.remove(reporter)?;
        for (target, _) in &old {
            if let Some(by) = self.reported_by.get_mut(target) {
                by.remove(reporter);
                if by.is_empty() {
                    self.reported_by.remove(target);
                }
            }
        }
        Some(old)
    }

    /// Dial every unconnected member now and start their backoff afresh: the network changed,
    /// so old failures say nothing about the next attempt.
    pub fn retry_all(&mut self, now: Instant) -> usize {
        let mut count = 0;
        for peer in self.peers.values_mut() {
            peer.backoff.reset();
            if peer.direct.is_none() {
                peer.next_dial = now;
                count += 1;
            }
        }
        count
    }

    /// Dial `key` now, if it has no session: something new is known about where it is.
    pub fn retry(&mut self, key: &PublicKey, now: Instant) {
        if let Some(peer) = self.peers.get_mut(key)
            && peer.direct.is_none()
        {
            peer.backoff.reset();
            peer.next_dial = now;
        }
    }

    pub fn reach(&self, key: &PublicKey) -> Reach {
        let Some(peer) = self.peers.get(key) else {
            return Reach::Unreachable;
        };
        if let Some(direct) = &peer.direct {
            return Reach::Direct {
                addr: direct.addr,
                rtt: direct.rtt,
            };
        }
        // The relay with the lowest total RTT; unmeasured legs count as slow but usable; equal
        // costs go to the smaller key.
        const UNKNOWN: Duration = Duration::from_secs(10);
        self.reported_by
            .get(key)
            .into_iter()
            .flatten()
            .filter(|(reporter, _)| *reporter != key)
            .filter_map(|(reporter, second)| {
                let first = self.peers.get(reporter)?.direct.as_ref()?.rtt;
                let total = first.zip(*second).map(|(a, b)| a + b);
                let cost = first.unwrap_or(UNKNOWN) + second.unwrap_or(UNKNOWN);
                Some((cost, reporter, total))
            })
            .min_by(|(a, a_key, _), (b, b_key, _)| {
                a.cmp(b)
                    .then_with(|| a_key.as_bytes().cmp(b_key.as_bytes()))
            })
            .map_or(Reach::Unreachable, |(_, via, rtt)| Reach::Relayed {
                via: *via,
                rtt,
            })
    }

    /// The member stopped being reachable at `wall`: that is when it was last seen.
    pub fn seen_until(&mut self, key: &PublicKey, wall: SystemTime) {
        if let Some(peer) = self.peers.get_mut(key) {
            peer.last_seen = Some(wall);
        }
    }

    /// Changes with every change of who is direct, reported or a member.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Changes with every change of a measured RTT.
    pub fn rtt_generation(&self) -> u64 {
        self.rtt_generation
    }

    pub fn last_seen(&self, key: &PublicKey) -> Option<SystemTime> {
        self.peers.get(key).and_then(|p| p.last_seen)
    }

    /// This device's direct sessions, as told to peers in `Neighbors`.
    pub fn direct_neighbors(&self) -> Vec<(PublicKey, Option<Duration>)> {
        let generation = self.direct_generation;
        let mut cache = self.direct_cache.borrow_mut();
        if let Some(cached) = cache.as_ref().filter(|c| c.generation == generation) {
            return cached.neighbors.clone();
        }
        let mut list: Vec<_> = self
            .peers
            .iter()
            .filter_map(|(k, p)| p.direct.as_ref().map(|d| (*k, d.rtt)))
            .collect();
        // Keys are unique: an unstable sort gives the one order there is.
        list.sort_unstable_by(|(a, _), (b, _)| a.as_bytes().cmp(b.as_bytes()));
        *cache = Some(DirectCache {
            generation,
            neighbors: list.clone(),
        });
        list
    }

    /// Whether `reporter` (a direct peer) reports a direct session with `target`.
    pub fn reports_direct(&self, reporter: &PublicKey, target: &PublicKey) -> bool {
        self.reports
            .get(reporter)
            .is_some_and(|list| list.iter().any(|(k, _)| k == target))
    }

    /// When the next dial falls due, if any member waits for one.
    pub fn next_dial_at(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter(|p| p.direct.is_none() && !p.dialing)
            .map(|p| p.next_dial)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnsprcy::identity::Identity;

    fn key(seed: u8) -> PublicKey {
        Identity::from_secret([seed; 32]).public_key()
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 7332))
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_peer_reports_all_only_with_a_session_to_every_member_named() {
        let t0 = Instant::now();
        let mut table = PeerTable::default();
        table.sync_members([key(1), key(2), key(3)], t0);
        table.session_up(&key(1), addr(1), t0);
        assert!(!table.reports_all(&key(1), &[key(2)]), "no report yet");
        table.set_report(&key(1), vec![(key(2), Some(MS)), (key(3), None)]);
        assert!(table.reports_all(&key(1), &[key(1), key(2), key(3)]));
        table.set_report(&key(1), vec![(key(3), None)]);
        assert!(!table.reports_all(&key(1), &[key(2), key(3)]));
        assert!(table.reports_all(&key(1), &[key(3)]));
    }

    #[test]
    fn new_members_are_dialled_once_then_backed_off() {
        let t0 = Instant::now();
        let mut table = PeerTable::default();
        table.sync_members([key(1), key(2)], t0);
        assert_eq!(table.take_due_dials(t0).len(), 2);
        assert!(table.take_due_dials(t0).is_empty(), "no double dial");
        let delay = table.dial_failed(&key(1), t0, 0.0).unwrap();
        assert_eq!(table.next_dial_at(), Some(t0 + delay));
        assert!(table.take_due_dials(t0 + delay - MS).is_empty());
        assert_eq!(table.take_due_dials(t0 + delay), vec![key(1)]);
        let second = table.dial_failed(&key(1), t0 + delay, 0.0).unwrap();
        assert!(second > delay, "backoff grows");
        assert_eq!(table.retry_all(t0 + delay), 2);
        assert_eq!(table.take_due_dials(t0 + delay), vec![key(1)]);
    }

    #[test]
    fn connected_members_are_not_dialled_and_flapping_sessions_keep_backing_off() {
        let t0 = Instant::now();
        let mut table = PeerTable::default();
        table.sync_members([key(1)], t0);
        table.take_due_dials(t0);
        table.session_up(&key(1), addr(1), t0);
        assert!(
            table
                .take_due_dials(t0 + Duration::from_secs(100))
                .is_empty()
        );
        assert_eq!(table.next_dial_at(), None);
        // A session that drops at once does not reset the backoff.
        table.session_down(&key(1), t0 + MS, 0.0);
        table.session_up(&key(1), addr(1), t0 + MS * 2);
        table.session_down(&key(1), t0 + MS * 3, 0.0);
        let after_flaps = table.next_dial_at().unwrap() - (t0 + MS * 3);
        // A stable session resets it.
        table.session_up(&key(1), addr(1), t0);
        table.session_down(&key(1), t0 + STABLE_SESSION, 0.0);
        let after_stable = table.next_dial_at().unwrap() - (t0 + STABLE_SESSION);
        assert!(
            after_stable < after_flaps,
            "{after_stable:?} vs {after_flaps:?}"
        );
    }

    #[test]
    fn relayed_through_the_cheapest_direct_peer_only_while_connected_to_it() {
        let t0 = Instant::now();
        let (b, c, d) = (key(2), key(3), key(4));
        let mut table = PeerTable::default();
        table.sync_members([b, c, d], t0);
        table.session_up(&b, addr(2), t0);
        table.session_up(&d, addr(4), t0);
        table.set_rtt(&b, 5 * MS);
        table.set_rtt(&d, 1 * MS);
        assert_eq!(table.reach(&c), Reach::Unreachable);
        table.set_report(&b, vec![(c, Some(2 * MS))]);
        table.set_report(&d, vec![(c, Some(9 * MS))]);
        assert_eq!(
            table.reach(&c),
            Reach::Relayed {
                via: b,
                rtt: Some(7 * MS)
            }
        );
        table.session_down(&b, t0, 0.5);
        assert_eq!(
            table.reach(&c),
            Reach::Relayed {
                via: d,
                rtt: Some(10 * MS)
            }
        );
        table.session_down(&d, t0, 0.5);
        assert_eq!(table.reach(&c), Reach::Unreachable);
        // Reports from peers without a session are ignored.
        table.set_report(&b, vec![(c, None)]);
        assert_eq!(table.reach(&c), Reach::Unreachable);
    }

    #[test]
    fn the_generation_moves_with_every_change_that_can_change_a_reach() {
        let t0 = Instant::now();
        let mut table = PeerTable::default();
        let mut seen = table.generation();
        let mut changed = |table: &PeerTable| {
            let moved = table.generation() != seen;
            seen = table.generation();
            moved
        };
        table.sync_members([key(1), key(2)], t0);
        assert!(changed(&table));
        table.take_due_dials(t0);
        table.dial_failed(&key(2), t0, 0.5);
        assert!(!changed(&table), "dialling changes no reach");
        table.session_up(&key(1), addr(1), t0);
        assert!(changed(&table));
        let rtts = table.rtt_generation();
        table.set_rtt(&key(1), MS);
        assert!(!changed(&table), "RTTs have a generation of their own");
        assert_ne!(table.rtt_generation(), rtts);
        let rtts = table.rtt_generation();
        table.set_rtt(&key(1), MS);
        assert_eq!(table.rtt_generation(), rtts, "the same RTT again");
        table.set_report(&key(1), vec![(key(2), None)]);
        assert!(changed(&table));
        table.session_down(&key(1), t0, 0.5);
        assert!(changed(&table));
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        table.seen_until(&key(1), wall);
        assert_eq!(table.last_seen(&key(1)), Some(wall));
        table.sync_members([], t0);
        assert!(!table.contains(&key(1)));
    }
}
