//! The bookkeeping behind tagged messages, without I/O: the origin's outbox (until every target
//! acknowledged or the TTL ran out), the recipients' record of messages already delivered (so a
//! handler runs at most once per message), and the origin's waits for replies. The files that
//! keep the first two across restarts are `persist.rs`'s.
//!
//! Delivery is at least once on the wire (the origin resends until acknowledged) and at most once
//! to the handler (the recipient records the id durably before running the handler).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cnsprcy::api::{HandlerReply, RecentOutcome};
use cnsprcy::identity::PublicKey;
use cnsprcy::wire::{After, Data, KeyBytes, MessageId};
use serde::{Deserialize, Serialize};

use crate::det::{Map, Set};

/// Delivered ids are remembered at least this long, and longer for messages with a longer TTL.
pub const SEEN_MIN: Duration = Duration::from_secs(3600);
/// The most ids remembered; beyond, the oldest are forgotten first.
pub const SEEN_MAX: usize = 200_000;
/// A target that has not acknowledged is sent the message again after this long.
pub const RESEND_AFTER: Duration = Duration::from_secs(30);
/// Messages the outbox holds at most (over all targets); a send beyond is refused.
pub const MAX_OUTBOX_MESSAGES: usize = 1000;
/// Payload bytes the outbox holds at most; a send beyond is refused. It is on disk (so it survives
/// a restart) and in memory (so it goes out at link speed once a target is back).
pub const MAX_OUTBOX_BYTES: usize = 256 * 1024 * 1024;

/// The system's wall clock in Unix milliseconds (for the driver; the core is given the time).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn id_text(id: &MessageId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn expires_ms(data: &Data) -> u64 {
    data.sent_ms.saturating_add(data.ttl_ms)
}

/// Predecessors named per target in a message's `after` at most: enough for any mix of a few
/// TTLs; beyond, the order holds only until the newest named ones expire.
pub const MAX_AFTER_PER_TARGET: usize = 32;

/// A message the origin still owes to some targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// The order messages were accepted in: copies go out in this order.
    pub seq: u64,
    pub data: Data,
    pub pending: Vec<KeyBytes>,
}

/// Why a message was not taken into the outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(
        "the outbox is full: {messages} messages ({mib} MiB) still wait for their targets, and it holds at most {MAX_OUTBOX_MESSAGES} messages and {} MiB",
        MAX_OUTBOX_BYTES >> 20
    )]
    Full {
        messages: usize,
        mib: usize,
        /// The targets most messages wait for, with how many each.
        waiting_for: Vec<(KeyBytes, usize)>,
    },
}

/// What became of an outbox entry, for the files that keep it.
#[derive(Debug, PartialEq)]
pub enum OutboxChange {
    /// `target` acknowledged it; others still wait.
    Acked {
        id: MessageId,
        target: KeyBytes,
    },
    Removed(MessageId),
}

/// The origin's unacknowledged messages.
#[derive(Debug, Default)]
pub struct Outbox {
    entries: Map<MessageId, OutboxEntry>,
    /// Entries by `seq`: the order they go out in.
    order: BTreeMap<u64, MessageId>,
    next_seq: u64,
    /// Payload bytes held.
    bytes: usize,
    /// When each (message, target) was last queued for sending, to pace resends.
    sent: Map<(MessageId, KeyBytes), Instant>,
}

impl Outbox {
    /// The outbox as it was saved, without what expired meanwhile. Kept whole even beyond the
    /// bounds, which apply to new messages: nothing is lost.
    pub fn restore(entries: Vec<OutboxEntry>, now_ms: u64) -> Self {
        let mut outbox = Self::default();
        for entry in entries {
            if expires_ms(&entry.data) > now_ms && !entry.pending.is_empty() {
                outbox.next_seq = outbox.next_seq.max(entry.seq + 1);
                outbox.insert(entry);
            }
        }
        outbox
    }

    fn insert(&mut self, entry: OutboxEntry) {
        self.bytes += entry.data.payload.len();
        self.order.insert(entry.seq, entry.data.id);
        self.entries.insert(entry.data.id, entry);
    }

    fn remove(&mut self, id: &MessageId) -> Option<OutboxEntry> {
        let entry = self.entries.remove(id)?;
        self.bytes -= entry.data.payload.len();
        self.order.remove(&entry.seq);
        self.sent.retain(|(i, _), _| i != id);
        Some(entry)
    }

    /// Takes `data` for `pending` until they acknowledge; returns the entry to save. Refused
    /// when the outbox is at its bounds. Sets `data.after`: per target, the newest message with
    /// the same tag that target has not acknowledged (it runs first there).
    pub fn add(
        &mut self,
        mut data: Data,
        pending: Vec<KeyBytes>,
    ) -> Result<OutboxEntry, OutboxError> {
        if self.entries.len() >= MAX_OUTBOX_MESSAGES
            || self.bytes + data.payload.len() > MAX_OUTBOX_BYTES
        {
            let mut waiting: Map<KeyBytes, usize> = Map::default();
            for entry in self.entries.values() {
                for key in &entry.pending {
                    *waiting.entry(*key).or_default() += 1;
                }
            }
            let mut waiting_for: Vec<(KeyBytes, usize)> = waiting.into_iter().collect();
            waiting_for.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            waiting_for.truncate(3);
            return Err(OutboxError::Full {
                messages: self.entries.len(),
                mib: self.bytes.div_ceil(1 << 20),
                waiting_for,
            });
        }
        data.after = self.predecessors(&data.tag, &pending);
        let entry = OutboxEntry {
            seq: self.next_seq,
            data,
            pending,
        };
        self.next_seq += 1;
        self.insert(entry.clone());
        Ok(entry)
    }

    /// Per target, the earlier messages with `tag` it has not acknowledged that a new message
    /// must run after. The newest suffices while it lives (it waits for the ones before it);
    /// an older one that outlives every newer one is named too, so that the order holds when
    /// a newer one with a shorter TTL expires first. At most `MAX_AFTER_PER_TARGET`, newest
    /// first.
    fn predecessors(&self, tag: &str, targets: &[KeyBytes]) -> Vec<After> {
        let mut after = Vec::new();
        for target in targets {
            let mut covered_until = 0;
            let pending = (self.order.values().rev())
                .filter_map(|id| self.entries.get(id))
                .filter(|e| e.data.tag == tag && e.pending.contains(target));
            for entry in pending {
                let expires = expires_ms(&entry.data);
                if expires <= covered_until {
                    continue;
                }
                covered_until = expires;
                after.push(After {
                    target: *target,
                    id: entry.data.id,
                    expires_ms: expires,
                });
                if after.iter().filter(|a| a.target == *target).count() == MAX_AFTER_PER_TARGET {
                    break;
                }
            }
        }
        after
    }

    /// Drops a message that could not be saved: it was never accepted.
    pub fn discard(&mut self, id: &MessageId) {
        self.remove(id);
    }

    /// `from` acknowledged `id`: what changed, if anything.
    pub fn acked(&mut self, id: &MessageId, from: &KeyBytes) -> Option<OutboxChange> {
        let entry = self.entries.get_mut(id)?;
        if !entry.pending.contains(from) {
            return None;
        }
        entry.pending.retain(|k| k != from);
        self.sent.remove(&(*id, *from));
        // What waits for this one there is due again at once: `from` may have dropped it for
        // lack of room to hold it (it holds at most 64 MiB), and would otherwise get it only
        // with the next resend, 30 s later, so a backlog would drain a few messages at a time.
        // A copy it still holds is ignored there.
        let successors: Vec<MessageId> = (self.entries.values())
            .filter(|e| {
                e.pending.contains(from)
                    && e.data
                        .after
                        .iter()
                        .any(|a| a.target == *from && a.id == *id)
            })
            .map(|e| e.data.id)
            .collect();
        for successor in successors {
            self.sent.remove(&(successor, *from));
        }
        let entry = self.entries.get_mut(id)?;
        if entry.pending.is_empty() {
            self.remove(id);
            Some(OutboxChange::Removed(*id))
        } else {
            Some(OutboxChange::Acked {
                id: *id,
                target: *from,
            })
        }
    }

    /// Forgets a target that left the roster.
    pub fn forget_target(&mut self, key: &KeyBytes) -> Vec<OutboxChange> {
        let ids: Vec<MessageId> = self
            .entries
            .iter()
            .filter(|(_, e)| e.pending.contains(key))
            .map(|(id, _)| *id)
            .collect();
        ids.iter().filter_map(|id| self.acked(id, key)).collect()
    }

    /// When the first message held expires (wall-clock milliseconds).
    pub fn earliest_expiry(&self) -> Option<u64> {
        self.entries.values().map(|e| expires_ms(&e.data)).min()
    }

    /// Drops expired messages; returns each with the targets that never got it.
    pub fn expire(&mut self, now_ms: u64) -> Vec<OutboxEntry> {
        let expired: Vec<MessageId> = self
            .entries
            .values()
            .filter(|e| expires_ms(&e.data) <= now_ms)
            .map(|e| e.data.id)
            .collect();
        expired.iter().filter_map(|id| self.remove(id)).collect()
    }

    /// In the order they were sent, each message with its targets in `reachable` that are due a
    /// (re)send: never queued, or queued `RESEND_AFTER` ago without an acknowledgement. The
    /// caller marks what it queued with `queued`; what did not fit stays due.
    pub fn due(
        &self,
        reachable: impl Fn(&KeyBytes) -> bool,
        now: Instant,
    ) -> Vec<(Data, Vec<PublicKey>)> {
        let mut out: Vec<(Data, Vec<PublicKey>)> = Vec::new();
        for entry in self.order.values().filter_map(|id| self.entries.get(id)) {
            let targets: Vec<PublicKey> = entry
                .pending
                .iter()
                .filter(|k| reachable(k))
                .filter(|k| {
                    self.sent
                        .get(&(entry.data.id, **k))
                        .is_none_or(|at| now.duration_since(*at) >= RESEND_AFTER)
                })
                .map(|k| PublicKey::from_bytes(*k))
                .collect();
            if !targets.is_empty() {
                // Cheap: the payload is shared, not copied.
                out.push((entry.data.clone(), targets));
            }
        }
        out
    }

    /// A copy of `id` for `target` went into a session's queue at `now`.
    pub fn queued(&mut self, id: &MessageId, target: &PublicKey, now: Instant) {
        if self.entries.contains_key(id) {
            self.sent.insert((*id, *target.as_bytes()), now);
        }
    }

    /// A copy of `id` for `target` did not make it into the queue after all: due again.
    pub fn unqueued(&mut self, id: &MessageId, target: &KeyBytes) {
        self.sent.remove(&(*id, *target));
    }

    /// Makes every pending target due at once (it just became reachable).
    pub fn reset_pacing(&mut self, key: &KeyBytes) {
        self.sent.retain(|(_, k), _| k != key);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn get(&self, id: &MessageId) -> Option<&OutboxEntry> {
        self.entries.get(id)
    }

    /// The entries in the order they go out.
    pub fn entries(&self) -> impl Iterator<Item = &OutboxEntry> {
        self.order.values().filter_map(|id| self.entries.get(id))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Ids of messages this device delivered to its handler, with when they may be forgotten.
#[derive(Debug, Default)]
pub struct Delivered {
    ids: Map<MessageId, u64>,
    order: VecDeque<MessageId>,
}

impl Delivered {
    /// The record as saved (oldest first), without what may be forgotten by `now_ms`.
    pub fn restore(records: Vec<(MessageId, u64)>, now_ms: u64) -> Self {
        let mut delivered = Self::default();
        for (id, until) in records {
            if until > now_ms {
                delivered.insert(id, until);
            }
        }
        delivered
    }

    pub fn contains(&self, id: &MessageId) -> bool {
        self.ids.contains_key(id)
    }

    /// Until when a delivered `data` must be remembered.
    pub fn until(data: &Data, now_ms: u64) -> u64 {
        Self::until_expiry(expires_ms(data), now_ms)
    }

    /// Until when a delivered message that expires at `expires_ms` must be remembered.
    pub fn until_expiry(expires_ms: u64, now_ms: u64) -> u64 {
        expires_ms.max(now_ms + SEEN_MIN.as_millis() as u64)
    }

    /// Records `id`; false if it was already there.
    pub fn insert(&mut self, id: MessageId, until: u64) -> bool {
        if self.ids.insert(id, until).is_some() {
            return false;
        }
        self.order.push_back(id);
        while self.order.len() > SEEN_MAX {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        true
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Outcomes `cnspr messages` shows at most.
pub const RECENT_OUTCOMES: usize = 200;
/// Bytes of late replies' output kept at most; the oldest output goes first.
pub const RECENT_OUTPUT_BYTES: usize = 4 << 20;

/// What became of this device's recent messages, newest last, bounded in count and bytes.
#[derive(Debug, Default)]
pub struct RecentOutcomes {
    outcomes: VecDeque<RecentOutcome>,
    output_bytes: usize,
}

impl RecentOutcomes {
    pub fn push(&mut self, outcome: RecentOutcome) {
        self.output_bytes += output_len(&outcome);
        self.outcomes.push_back(outcome);
        while self.outcomes.len() > RECENT_OUTCOMES {
            if let Some(old) = self.outcomes.pop_front() {
                self.output_bytes -= output_len(&old);
            }
        }
        for old in self.outcomes.iter_mut() {
            if self.output_bytes <= RECENT_OUTPUT_BYTES {
                break;
            }
            self.output_bytes -= output_len(old);
            old.stdout = None;
            old.stdout_base64 = None;
        }
    }

    pub fn list(&self) -> Vec<RecentOutcome> {
        self.outcomes.iter().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.outcomes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.outcomes.is_empty()
    }
}

fn output_len(outcome: &RecentOutcome) -> usize {
    outcome.stdout.as_ref().map_or(0, String::len)
        + outcome.stdout_base64.as_ref().map_or(0, String::len)
}

/// An origin waiting for its targets' handlers to finish.
#[derive(Debug)]
pub struct Wait {
    /// The API call that waits.
    pub request: u64,
    pub tag: String,
    pub expected: Set<KeyBytes>,
    /// Those that replied; their replies, unless they went out as progress already.
    pub replied: Set<KeyBytes>,
    pub replies: Vec<HandlerReply>,
    pub deadline: Instant,
    /// A streaming `send`: each reply goes out as it arrives.
    pub streaming: bool,
    /// The message is on disk: the wait may be answered.
    pub stored: bool,
    /// The answer, once the wait ends.
    pub result: cnsprcy::api::SendResult,
}

impl Wait {
    pub fn complete(&self) -> bool {
        self.expected.iter().all(|k| self.replied.contains(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(id: u8, ttl_ms: u64) -> Data {
        Data {
            id: [id; 16],
            origin: [0; 32],
            sent_ms: 1_000_000,
            ttl_ms,
            tag: "t".into(),
            targets: vec![],
            want_reply: false,
            hops: 0,
            after: Vec::new(),
            payload: vec![1, 2, 3].into(),
        }
    }

    fn queue_all(outbox: &mut Outbox, due: &[(Data, Vec<PublicKey>)], now: Instant) {
        for (data, targets) in due {
            for target in targets {
                outbox.queued(&data.id, target, now);
            }
        }
    }

    #[test]
    fn outbox_paces_resends_until_acknowledged_or_expired() {
        let mut outbox = Outbox::default();
        let first = outbox.add(data(1, 60_000), vec![[7; 32], [8; 32]]).unwrap();
        outbox.add(data(2, 1), vec![[7; 32]]).unwrap();
        assert_eq!(
            outbox.acked(&[1; 16], &[7; 32]),
            Some(OutboxChange::Acked {
                id: [1; 16],
                target: [7; 32]
            })
        );
        assert_eq!(outbox.get(&[1; 16]).unwrap().pending, vec![[8; 32]]);
        assert_eq!(outbox.get(&[1; 16]).unwrap().data, first.data);
        assert_eq!(outbox.acked(&[1; 16], &[7; 32]), None, "once");
        let expired = outbox.expire(1_000_001);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].pending, vec![[7; 32]]);
        assert_eq!(outbox.len(), 1);
        let now = Instant::now();
        let due = outbox.due(|_| true, now);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].1, vec![PublicKey::from_bytes([8; 32])]);
        assert_eq!(outbox.due(|_| true, now).len(), 1, "not queued: still due");
        queue_all(&mut outbox, &due, now);
        assert!(outbox.due(|_| true, now).is_empty(), "paced");
        assert_eq!(outbox.due(|_| true, now + RESEND_AFTER).len(), 1);
        outbox.unqueued(&[1; 16], &[8; 32]);
        assert_eq!(outbox.due(|_| true, now).len(), 1, "refused by the queue");
        queue_all(&mut outbox, &due, now);
        outbox.reset_pacing(&[8; 32]);
        assert_eq!(outbox.due(|_| true, now).len(), 1);
        assert_eq!(
            outbox.acked(&[1; 16], &[8; 32]),
            Some(OutboxChange::Removed([1; 16]))
        );
        assert!(outbox.is_empty());
    }

    #[test]
    fn messages_go_out_in_the_order_they_were_sent_also_after_a_restart() {
        let mut outbox = Outbox::default();
        // Random ids: the order must not come from them.
        let ids = [9u8, 3, 7, 1, 5];
        let mut saved = Vec::new();
        for id in ids {
            saved.push(outbox.add(data(id, 60_000), vec![[7; 32]]).unwrap());
        }
        let order = |outbox: &Outbox| -> Vec<u8> {
            outbox
                .due(|_| true, Instant::now())
                .iter()
                .map(|(d, _)| d.id[0])
                .collect()
        };
        assert_eq!(order(&outbox), ids);
        saved.reverse();
        let mut outbox = Outbox::restore(saved, 0);
        assert_eq!(order(&outbox), ids);
        outbox.add(data(2, 60_000), vec![[7; 32]]).unwrap();
        assert_eq!(order(&outbox), [9, 3, 7, 1, 5, 2]);
    }

    #[test]
    fn each_message_names_per_target_the_unacknowledged_one_before_it_with_its_tag() {
        let mut outbox = Outbox::default();
        let (a, b) = ([7; 32], [8; 32]);
        let tagged = |id: u8, tag: &str| Data {
            tag: tag.into(),
            ..data(id, 60_000)
        };
        assert!(
            outbox
                .add(tagged(1, "t"), vec![a, b])
                .unwrap()
                .data
                .after
                .is_empty()
        );
        outbox.add(tagged(2, "other"), vec![a, b]).unwrap();
        outbox.acked(&[1; 16], &b);
        let entry = outbox.add(tagged(3, "t"), vec![a, b]).unwrap();
        // b acknowledged 1: nothing to wait for there; a did not.
        assert_eq!(
            entry.data.after,
            vec![After {
                target: a,
                id: [1; 16],
                expires_ms: 1_060_000
            }]
        );
        let entry = outbox.add(tagged(4, "t"), vec![a, b]).unwrap();
        let after: Vec<_> = entry
            .data
            .after
            .iter()
            .map(|x| (x.target, x.id[0]))
            .collect();
        assert_eq!(after, vec![(a, 3), (b, 3)]);
    }

    /// When a target acknowledges a message, the ones that wait for it there go again at once,
    /// not a resend interval later.
    #[test]
    fn an_ack_makes_the_messages_that_wait_for_it_due_at_once() {
        let mut outbox = Outbox::default();
        let (a, b) = ([7; 32], [8; 32]);
        outbox.add(data(1, 60_000), vec![a, b]).unwrap();
        outbox.add(data(2, 60_000), vec![a, b]).unwrap();
        outbox.add(data(3, 60_000), vec![a]).unwrap();
        let now = Instant::now();
        let due = outbox.due(|_| true, now);
        queue_all(&mut outbox, &due, now);
        assert!(outbox.due(|_| true, now).is_empty());
        outbox.acked(&[1; 16], &a);
        let due: Vec<(u8, Vec<PublicKey>)> = (outbox.due(|_| true, now).into_iter())
            .map(|(d, t)| (d.id[0], t))
            .collect();
        // 2 waits for 1 on a; 3 waits for 2, which is not acknowledged yet.
        assert_eq!(due, vec![(2, vec![PublicKey::from_bytes(a)])]);
    }

    /// A newer message with a shorter TTL does not cover an older one that outlives it: the
    /// older one is named too, or the order would break once the newer one expired.
    #[test]
    fn an_older_predecessor_that_outlives_the_newer_ones_is_named_too() {
        let mut outbox = Outbox::default();
        let target = [7; 32];
        outbox.add(data(1, 60_000), vec![target]).unwrap();
        outbox.add(data(2, 1_000), vec![target]).unwrap();
        outbox.add(data(3, 2_000), vec![target]).unwrap();
        outbox.add(data(4, 500), vec![target]).unwrap();
        let entry = outbox.add(data(5, 60_000), vec![target]).unwrap();
        let after: Vec<(u8, u64)> = (entry.data.after.iter())
            .map(|a| (a.id[0], a.expires_ms - 1_000_000))
            .collect();
        // 2 is left out: 3 outlives it and waits for it.
        assert_eq!(after, vec![(4, 500), (3, 2_000), (1, 60_000)]);
        for id in 6..(6 + MAX_AFTER_PER_TARGET as u8 + 4) {
            // Each older one outlives the newer ones: all would be named, but for the bound.
            outbox
                .add(data(id, 60_000 - u64::from(id) * 100), vec![target])
                .unwrap();
        }
        let entry = outbox.add(data(200, 60_000), vec![target]).unwrap();
        assert_eq!(entry.data.after.len(), MAX_AFTER_PER_TARGET);
    }

    #[test]
    fn recent_outcomes_are_bounded_in_count_and_output() {
        let mut recent = RecentOutcomes::default();
        let outcome = |n: usize, output: usize| RecentOutcome {
            time: n.to_string(),
            event: cnsprcy::api::WatchEvent::Lagged { missed: 0 },
            stdout: (output > 0).then(|| "x".repeat(output)),
            stdout_base64: None,
        };
        for n in 0..RECENT_OUTCOMES + 10 {
            recent.push(outcome(n, 0));
        }
        assert_eq!(recent.len(), RECENT_OUTCOMES);
        assert_eq!(recent.list()[0].time, "10");
        recent.push(outcome(1, RECENT_OUTPUT_BYTES / 2 + 1));
        recent.push(outcome(2, RECENT_OUTPUT_BYTES / 2 + 1));
        let list = recent.list();
        let kept: Vec<bool> = list
            .iter()
            .rev()
            .take(2)
            .map(|o| o.stdout.is_some())
            .collect();
        assert_eq!(kept, [true, false], "the older output goes first");
    }

    #[test]
    fn the_outbox_is_bounded_and_says_who_it_waits_for() {
        let mut outbox = Outbox::default();
        let big = |id: u8| Data {
            payload: vec![0u8; 16 << 20].into(),
            ..data(id, 60_000)
        };
        for id in 0..(MAX_OUTBOX_BYTES / (16 << 20)) as u8 {
            outbox.add(big(id), vec![[7; 32]]).unwrap();
        }
        match outbox.add(big(200), vec![[7; 32]]) {
            Err(OutboxError::Full {
                messages,
                waiting_for,
                ..
            }) => {
                assert_eq!(messages, MAX_OUTBOX_BYTES / (16 << 20));
                assert_eq!(waiting_for, vec![([7; 32], messages)]);
            }
            other => panic!("{other:?}"),
        }
        outbox.acked(&[0; 16], &[7; 32]);
        outbox.add(data(201, 60_000), vec![[8; 32]]).unwrap();
        for id in 0..MAX_OUTBOX_MESSAGES {
            let mut small = data(0, 60_000);
            small.id[..8].copy_from_slice(&(id as u64 + 1000).to_le_bytes());
            if outbox.add(small, vec![[8; 32]]).is_err() {
                assert_eq!(outbox.len(), MAX_OUTBOX_MESSAGES);
                return;
            }
        }
        panic!("the count bound did not hold");
    }

    #[test]
    fn delivered_ids_are_bounded_and_forgotten_in_time() {
        let mut delivered = Delivered::default();
        assert!(delivered.insert([1; 16], 100));
        assert!(!delivered.insert([1; 16], 100));
        let restored = Delivered::restore(vec![([1; 16], 100), ([2; 16], 50)], 60);
        assert!(restored.contains(&[1; 16]));
        assert!(!restored.contains(&[2; 16]));
        assert_eq!(
            Delivered::until(&data(1, 10), 0),
            SEEN_MIN.as_millis() as u64
        );
    }
}
