//! One sender's messages with one tag run on a target one at a time, in the order they were
//! sent. Without I/O.
//!
//! The origin names, per target, the previous message with the same tag that the target had not
//! acknowledged yet (`wire::After`). A target holds a message back, unrecorded and
//! unacknowledged, while that predecessor is neither recorded here nor expired, and while the
//! handler of another message of the same origin and tag (its lane) is being recorded or runs.
//! Only a message that may run at once is recorded and acknowledged, so a device that stops
//! loses nothing it acknowledged: what it held, its origin sends again, as any message it has no
//! ack for. Holding is bounded in count and bytes; beyond, a message is dropped the same way.
//! A message that waits only for its lane is preferred to one that waits for a predecessor.

use std::collections::VecDeque;

use cnsprcy::wire::{Data, KeyBytes, MessageId};

use crate::det::{Map, Set};
use crate::messaging::expires_ms;

/// Messages held back at most; beyond, a new one is dropped (its origin sends it again).
pub const MAX_HELD: usize = 1000;
/// Payload bytes held back at most.
pub const MAX_HELD_BYTES: usize = 64 << 20;

/// A sender and a tag: their messages run one at a time, in order.
pub type Lane = (KeyBytes, String);

pub fn lane_of(data: &Data) -> Lane {
    (data.origin, data.tag.clone())
}

/// Messages that may not be recorded yet, and the lanes with a message recorded or running.
#[derive(Debug, Default)]
pub struct Holdback {
    /// Predecessor id → (its expiry, the messages waiting for it).
    for_predecessor: Map<MessageId, (u64, Vec<Data>)>,
    /// Messages waiting for their lane, in arrival order.
    for_lane: Map<Lane, VecDeque<Data>>,
    busy: Set<Lane>,
    held: Set<MessageId>,
    bytes: usize,
}

impl Holdback {
    fn has_room(&self, data: &Data) -> bool {
        self.held.len() < MAX_HELD && self.bytes + data.payload.len() <= MAX_HELD_BYTES
    }

    /// `next_in_lane`: `data` waits only for its lane, its predecessor recorded.
    fn admit(&mut self, data: &Data, next_in_lane: bool) -> bool {
        if self.held.contains(&data.id) {
            return false;
        }
        if !self.has_room(data) {
            // What waits for this message cannot run before it. Were it dropped for their sake,
            // each would wait for the other's resend (30 s); so they go, and come again when
            // their origin learns that this one was recorded.
            self.drop_successors(&data.id);
        }
        if next_in_lane {
            // It runs as soon as its lane's handler ends. Under a flood the hold fills with
            // messages whose predecessors were dropped and come only with their origin's
            // resend (30 s); were this one dropped for them, delivery would go at the resends'
            // pace, not the handlers'. So the last of such a chain goes instead.
            while !self.has_room(data) && self.drop_last_waiting_for_predecessor() {}
        }
        if !self.has_room(data) {
            return false;
        }
        self.held.insert(data.id);
        self.bytes += data.payload.len();
        true
    }

    fn let_go(&mut self, data: &Data) {
        self.held.remove(&data.id);
        self.bytes -= data.payload.len();
    }

    /// Drops one message that waits for its predecessor and that nothing waits for (the last
    /// of its chain); false if none waits for a predecessor.
    fn drop_last_waiting_for_predecessor(&mut self) -> bool {
        let last = self
            .for_predecessor
            .iter()
            .find_map(|(predecessor, (_, waiting))| {
                let position = waiting
                    .iter()
                    .position(|d| !self.for_predecessor.contains_key(&d.id))?;
                Some((*predecessor, position))
            });
        let Some((predecessor, position)) = last else {
            return false;
        };
        let Some((_, waiting)) = self.for_predecessor.get_mut(&predecessor) else {
            return false;
        };
        let dropped = waiting.remove(position);
        if waiting.is_empty() {
            self.for_predecessor.remove(&predecessor);
        }
        self.let_go(&dropped);
        true
    }

    /// Drops the messages that wait for `id`, and those that wait for them, and so on.
    fn drop_successors(&mut self, id: &MessageId) {
        let mut predecessors = vec![*id];
        while let Some(predecessor) = predecessors.pop() {
            let waiting = (self.for_predecessor.remove(&predecessor))
                .map(|(_, d)| d)
                .unwrap_or_default();
            for data in waiting {
                self.let_go(&data);
                predecessors.push(data.id);
            }
        }
    }

    /// Holds `data` until `after` (expiring at `after_expires_ms`) is recorded or expires.
    /// False if it was not held (already held, or too many are): the caller drops it.
    pub fn hold_for_predecessor(
        &mut self,
        after: MessageId,
        after_expires_ms: u64,
        data: Data,
    ) -> bool {
        if !self.admit(&data, false) {
            return false;
        }
        self.for_predecessor
            .entry(after)
            .or_insert_with(|| (after_expires_ms, Vec::new()))
            .1
            .push(data);
        true
    }

    /// Holds `data` until its lane is free. False if it was not held.
    pub fn hold_for_lane(&mut self, data: Data) -> bool {
        if !self.admit(&data, true) {
            return false;
        }
        self.for_lane
            .entry(lane_of(&data))
            .or_default()
            .push_back(data);
        true
    }

    pub fn is_held(&self, id: &MessageId) -> bool {
        self.held.contains(id)
    }

    pub fn lane_busy(&self, lane: &Lane) -> bool {
        self.busy.contains(lane)
    }

    /// A message of `lane` is being recorded or runs.
    pub fn occupy(&mut self, lane: Lane) {
        self.busy.insert(lane);
    }

    /// `lane`'s message finished (or could not be recorded): what waited for the lane, in
    /// arrival order, to be received again.
    pub fn free(&mut self, lane: &Lane) -> Vec<Data> {
        self.busy.remove(lane);
        let waiting: Vec<Data> = self.for_lane.remove(lane).unwrap_or_default().into();
        for data in &waiting {
            self.let_go(data);
        }
        waiting
    }

    /// `id` was recorded as delivered: what waited for it, to be received again.
    pub fn recorded(&mut self, id: &MessageId) -> Vec<Data> {
        let released = (self.for_predecessor.remove(id))
            .map(|(_, d)| d)
            .unwrap_or_default();
        for data in &released {
            self.let_go(data);
        }
        released
    }

    /// Predecessors that expired by `now_ms` will never come: what waited for them, to be
    /// received again. Held messages that expired themselves are dropped.
    pub fn release_expired(&mut self, now_ms: u64) -> Vec<Data> {
        let gone: Vec<MessageId> = (self.for_predecessor.iter())
            .filter(|(_, (expires, _))| *expires <= now_ms)
            .map(|(id, _)| *id)
            .collect();
        let mut released = Vec::new();
        for id in gone {
            released.extend(self.recorded(&id));
        }
        let mut dropped = Vec::new();
        let alive = |d: &Data, dropped: &mut Vec<Data>| {
            let alive = expires_ms(d) > now_ms;
            if !alive {
                dropped.push(d.clone());
            }
            alive
        };
        for (_, waiting) in self.for_predecessor.values_mut() {
            waiting.retain(|d| alive(d, &mut dropped));
        }
        for waiting in self.for_lane.values_mut() {
            waiting.retain(|d| alive(d, &mut dropped));
        }
        self.for_predecessor.retain(|_, (_, w)| !w.is_empty());
        self.for_lane.retain(|_, w| !w.is_empty());
        for data in &dropped {
            self.let_go(data);
        }
        released.retain(|d| expires_ms(d) > now_ms);
        released
    }

    /// Messages held back.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(id: u8, expires_ms: u64) -> Data {
        Data {
            id: [id; 16],
            origin: [9; 32],
            sent_ms: 0,
            ttl_ms: expires_ms,
            tag: "t".into(),
            targets: vec![[1; 32]],
            want_reply: false,
            hops: 0,
            after: Vec::new(),
            payload: vec![0u8; 10].into(),
        }
    }

    /// Message number `i` (of many more than 256), alive until 1000.
    fn numbered(i: usize) -> Data {
        let mut d = data(0, 1000);
        d.id[..8].copy_from_slice(&(i as u64).to_le_bytes());
        d
    }

    fn ids(data: &[Data]) -> Vec<u8> {
        data.iter().map(|d| d.id[0]).collect()
    }

    #[test]
    fn held_messages_go_on_when_their_predecessor_is_recorded() {
        let mut holdback = Holdback::default();
        assert!(holdback.hold_for_predecessor([1; 16], 1000, data(2, 1000)));
        assert!(holdback.hold_for_predecessor([2; 16], 1000, data(3, 1000)));
        assert!(
            !holdback.hold_for_predecessor([1; 16], 1000, data(2, 1000)),
            "held twice"
        );
        assert!(holdback.is_held(&[3; 16]));
        assert!(holdback.recorded(&[9; 16]).is_empty());
        assert_eq!(ids(&holdback.recorded(&[1; 16])), [2]);
        assert_eq!(ids(&holdback.recorded(&[2; 16])), [3]);
        assert!(holdback.is_empty());
        assert_eq!(holdback.bytes, 0);
    }

    #[test]
    fn a_lane_holds_what_comes_while_busy_and_gives_it_back_in_order() {
        let mut holdback = Holdback::default();
        let lane = lane_of(&data(1, 1000));
        assert!(!holdback.lane_busy(&lane));
        holdback.occupy(lane.clone());
        assert!(holdback.lane_busy(&lane));
        holdback.hold_for_lane(data(2, 1000));
        holdback.hold_for_lane(data(3, 1000));
        let other = Data {
            tag: "u".into(),
            ..data(4, 1000)
        };
        assert!(
            !holdback.lane_busy(&lane_of(&other)),
            "another tag has a lane of its own"
        );
        assert_eq!(ids(&holdback.free(&lane)), [2, 3]);
        assert!(!holdback.lane_busy(&lane));
        assert!(holdback.is_empty());
    }

    #[test]
    fn a_predecessor_that_expired_releases_what_waits_and_expired_messages_are_dropped() {
        let mut holdback = Holdback::default();
        holdback.hold_for_predecessor([1; 16], 100, data(2, 1000));
        holdback.hold_for_predecessor([5; 16], 2000, data(6, 150));
        holdback.occupy(lane_of(&data(7, 150)));
        holdback.hold_for_lane(data(7, 150));
        assert!(holdback.release_expired(99).is_empty());
        assert_eq!(ids(&holdback.release_expired(100)), [2]);
        // 6 waits for 5 (alive until 2000) but itself expired at 150; so did 7.
        assert!(holdback.release_expired(150).is_empty());
        assert!(holdback.is_empty());
        assert_eq!(holdback.bytes, 0);
    }

    #[test]
    fn holding_is_bounded_in_count_and_bytes() {
        let mut holdback = Holdback::default();
        for i in 0..MAX_HELD {
            assert!(holdback.hold_for_lane(numbered(i)));
        }
        assert!(!holdback.hold_for_lane(data(7, 1000)));
        assert!(!holdback.hold_for_predecessor([1; 16], 1000, data(8, 1000)));
        let mut holdback = Holdback::default();
        let big = |id: u8| Data {
            payload: vec![0u8; MAX_HELD_BYTES / 2].into(),
            ..data(id, 1000)
        };
        assert!(holdback.hold_for_lane(big(1)));
        assert!(holdback.hold_for_lane(big(2)));
        assert!(!holdback.hold_for_lane(big(3)));
    }

    /// When the messages that wait for a missing one fill the room, the missing one is held
    /// and they go (their origin sends them again); else each would wait for the other.
    #[test]
    fn a_message_that_others_wait_for_makes_room_by_dropping_them() {
        let mut holdback = Holdback::default();
        let big = |id: u8| Data {
            payload: vec![0u8; MAX_HELD_BYTES / 2].into(),
            ..data(id, 1000)
        };
        assert!(holdback.hold_for_predecessor([2; 16], 1000, big(3)));
        assert!(holdback.hold_for_predecessor([3; 16], 1000, big(4)));
        assert!(
            !holdback.hold_for_predecessor([9; 16], 1000, big(5)),
            "full, and nothing waits for 5"
        );
        holdback.occupy(lane_of(&big(1)));
        assert!(holdback.hold_for_lane(big(2)));
        assert!(holdback.is_held(&[2; 16]));
        assert!(!holdback.is_held(&[3; 16]) && !holdback.is_held(&[4; 16]));
        assert_eq!(holdback.bytes, MAX_HELD_BYTES / 2);
        assert!(holdback.recorded(&[2; 16]).is_empty());
    }

    /// Under a flood the room fills with messages whose predecessors were dropped; one whose
    /// predecessor is recorded, waiting only for its lane, takes the place of the last of such
    /// a chain, so delivery goes on at the handlers' pace.
    #[test]
    fn a_message_next_in_its_lane_takes_the_place_of_one_waiting_for_a_missing_predecessor() {
        let mut holdback = Holdback::default();
        // A chain 0 ← 1 ← … waiting for a missing message, filling the room.
        assert!(holdback.hold_for_predecessor([0xee; 16], 1000, numbered(0)));
        for i in 1..MAX_HELD {
            assert!(holdback.hold_for_predecessor(numbered(i - 1).id, 1000, numbered(i)));
        }
        holdback.occupy(lane_of(&data(7, 1000)));
        assert!(holdback.hold_for_lane(data(7, 1000)));
        assert!(holdback.is_held(&[7; 16]));
        assert!(
            !holdback.is_held(&numbered(MAX_HELD - 1).id),
            "the chain's last went"
        );
        assert!(holdback.is_held(&numbered(MAX_HELD - 2).id));
        assert_eq!(holdback.len(), MAX_HELD);
        assert_eq!(holdback.bytes, MAX_HELD * 10);
        // What waits for a predecessor never pushes out what waits for its lane.
        assert!(!holdback.hold_for_predecessor([0xef; 16], 1000, data(8, 1000)));
        assert!(holdback.is_held(&[7; 16]));
    }
}
