//! The store's merge rules, with no I/O: which of two versions of a key wins, the hybrid logical
//! clock that stamps local writes, and the limits every write (local or remote) must meet.
//!
//! - A version is `(timestamp, writer)`. The greater one wins: the later timestamp, and for equal
//!   timestamps the greater writer public key (compared as bytes). Every device decides the same
//!   way, so replicas that have seen the same writes hold the same store, whatever the order.
//! - A deletion is a version like any other, with no value (a tombstone).
//! - A remote timestamp more than `MAX_FUTURE` ahead of this device's clock is refused: a device
//!   with a clock far ahead cannot make its writes win over every later one for ever.

use std::cmp::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cnsprcy::wire::{KeyBytes, StoreEntry, StoreTimestamp};

/// The longest key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 1024;
/// The largest value.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// How far ahead of this device's clock a peer's timestamp may be.
pub const MAX_FUTURE: Duration = Duration::from_secs(60);

/// A key's version: greater wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Version {
    pub ts: StoreTimestamp,
    pub writer: KeyBytes,
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.ts
            .cmp(&other.ts)
            .then_with(|| self.writer.cmp(&other.writer))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Version {
    pub fn of(entry: &StoreEntry) -> Self {
        Self {
            ts: entry.ts,
            writer: entry.writer,
        }
    }
}

/// Whether `incoming` replaces what a replica holds (`None`: nothing for that key).
pub fn wins(incoming: &Version, current: Option<&Version>) -> bool {
    current.is_none_or(|current| incoming > current)
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A hybrid logical clock: never goes backwards, stays close to the wall clock, and is always
/// ahead of every timestamp this device has stored or accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Clock {
    last: StoreTimestamp,
}

impl Clock {
    /// The timestamp for a new local write, at wall-clock time `now_ms`.
    pub fn tick(&mut self, now_ms: u64) -> StoreTimestamp {
        self.last = if now_ms > self.last.ms {
            StoreTimestamp {
                ms: now_ms,
                counter: 0,
            }
        } else if self.last.counter == u32::MAX {
            StoreTimestamp {
                ms: self.last.ms + 1,
                counter: 0,
            }
        } else {
            StoreTimestamp {
                ms: self.last.ms,
                counter: self.last.counter + 1,
            }
        };
        self.last
    }

    /// The latest timestamp given out or observed.
    pub fn last(&self) -> StoreTimestamp {
        self.last
    }

    /// Takes note of a timestamp stored or accepted, so later local writes come after it.
    pub fn observe(&mut self, ts: StoreTimestamp) {
        self.last = self.last.max(ts);
    }
}

/// Why an entry is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("the key is empty")]
    EmptyKey,
    #[error("the key is {0} bytes; the limit is {MAX_KEY_BYTES} bytes")]
    KeyTooLong(usize),
    #[error("the key contains a control character; use printable text (e.g. presence/laptop)")]
    KeyControl,
    #[error("the value is {0} bytes; the limit is {MAX_VALUE_BYTES} bytes (1 MiB)")]
    ValueTooLarge(usize),
    #[error("its timestamp is {ahead_ms} ms ahead of this device's clock (the limit is {} s); is the writer's clock wrong?", MAX_FUTURE.as_secs())]
    Future { ahead_ms: u64 },
}

/// Checks a key: UTF-8 (by type), not empty, at most `MAX_KEY_BYTES`, no control characters.
pub fn check_key(key: &str) -> Result<(), Invalid> {
    if key.is_empty() {
        return Err(Invalid::EmptyKey);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Invalid::KeyTooLong(key.len()));
    }
    if key.chars().any(char::is_control) {
        return Err(Invalid::KeyControl);
    }
    Ok(())
}

pub fn check_value(value: &[u8]) -> Result<(), Invalid> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(Invalid::ValueTooLarge(value.len()));
    }
    Ok(())
}

/// Checks an entry from a peer, at wall-clock time `now_ms`.
pub fn check_remote(entry: &StoreEntry, now_ms: u64) -> Result<(), Invalid> {
    check_key(&entry.key)?;
    if let Some(value) = &entry.value {
        check_value(value)?;
    }
    let limit = now_ms.saturating_add(MAX_FUTURE.as_millis() as u64);
    if entry.ts.ms > limit {
        return Err(Invalid::Future {
            ahead_ms: entry.ts.ms - now_ms,
        });
    }
    Ok(())
}

/// A replica as plain data: the model the engine follows, used by the property tests.
#[cfg(test)]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replica {
    pub entries: std::collections::BTreeMap<String, StoreEntry>,
}

#[cfg(test)]
impl Replica {
    /// Merges one entry; returns whether it changed the replica.
    pub fn apply(&mut self, entry: &StoreEntry) -> bool {
        let current = self.entries.get(&entry.key).map(Version::of);
        if wins(&Version::of(entry), current.as_ref()) {
            self.entries.insert(entry.key.clone(), entry.clone());
            true
        } else {
            false
        }
    }

    pub fn merge(&mut self, other: &Replica) {
        for entry in other.entries.values() {
            self.apply(entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(key: &str, ms: u64, counter: u32, writer: u8, value: Option<&[u8]>) -> StoreEntry {
        StoreEntry {
            key: key.into(),
            ts: StoreTimestamp { ms, counter },
            writer: [writer; 32],
            value: value.map(<[u8]>::to_vec),
        }
    }

    #[test]
    fn later_timestamp_wins_then_greater_writer() {
        let old = Version::of(&entry("k", 5, 0, 9, Some(b"a")));
        let new = Version::of(&entry("k", 5, 1, 1, Some(b"b")));
        assert!(wins(&new, Some(&old)));
        assert!(!wins(&old, Some(&new)));
        let low = Version::of(&entry("k", 7, 0, 1, None));
        let high = Version::of(&entry("k", 7, 0, 2, None));
        assert!(wins(&high, Some(&low)));
        assert!(!wins(&low, Some(&high)));
        assert!(
            !wins(&low, Some(&low)),
            "the same version does not replace itself"
        );
        assert!(wins(&low, None));
    }

    #[test]
    fn clock_is_monotonic_and_follows_what_it_sees() {
        let mut clock = Clock::default();
        let a = clock.tick(100);
        let b = clock.tick(100);
        let c = clock.tick(90);
        assert!(a < b && b < c);
        assert_eq!(c.ms, 100);
        clock.observe(StoreTimestamp {
            ms: 500,
            counter: 3,
        });
        let d = clock.tick(200);
        assert_eq!(
            d,
            StoreTimestamp {
                ms: 500,
                counter: 4
            }
        );
        assert_eq!(
            clock.tick(600),
            StoreTimestamp {
                ms: 600,
                counter: 0
            }
        );
    }

    #[test]
    fn limits_and_future_bound() {
        assert_eq!(check_key(""), Err(Invalid::EmptyKey));
        assert!(check_key(&"k".repeat(MAX_KEY_BYTES)).is_ok());
        assert_eq!(
            check_key(&"k".repeat(MAX_KEY_BYTES + 1)),
            Err(Invalid::KeyTooLong(MAX_KEY_BYTES + 1))
        );
        assert_eq!(check_key("a\nb"), Err(Invalid::KeyControl));
        assert!(check_key("presence/laptop ü").is_ok());
        assert!(check_value(&vec![0; MAX_VALUE_BYTES]).is_ok());
        assert!(check_value(&vec![0; MAX_VALUE_BYTES + 1]).is_err());
        let now = 1_000_000;
        let bound = MAX_FUTURE.as_millis() as u64;
        assert!(check_remote(&entry("k", now + bound, 0, 1, None), now).is_ok());
        assert_eq!(
            check_remote(&entry("k", now + bound + 1, 0, 1, None), now),
            Err(Invalid::Future {
                ahead_ms: bound + 1
            })
        );
    }

    /// An operation: a write of `key` at `(ms, counter)` by `writer`. Its value (or deletion)
    /// follows from its version, as it does for real: a writer never reuses a timestamp.
    fn op() -> impl Strategy<Value = StoreEntry> {
        (0u8..4, 0u64..6, 0u32..3, 0u8..3).prop_map(|(key, ms, counter, writer)| {
            let value = ((ms + u64::from(writer)) % 3 != 0)
                .then(|| vec![key, ms as u8, counter as u8, writer]);
            StoreEntry {
                key: format!("k{key}"),
                ts: StoreTimestamp { ms, counter },
                writer: [writer; 32],
                value,
            }
        })
    }

    /// What every replica must end up with: for each key, the greatest version.
    fn expected(ops: &[StoreEntry]) -> Replica {
        let mut replica = Replica::default();
        for op in ops {
            let keep = replica
                .entries
                .get(&op.key)
                .is_none_or(|e| Version::of(op) > Version::of(e));
            if keep {
                replica.entries.insert(op.key.clone(), op.clone());
            }
        }
        replica
    }

    proptest! {
        /// Any operations, each delivered to a random subset of replicas in a random order (and
        /// some twice), then replicas merging each other's state in random pairs and finally all
        /// with all: every replica holds the same store, the one with each key's greatest version.
        #[test]
        fn any_order_and_grouping_converges(
            ops in prop::collection::vec(op(), 0..40),
            replicas in 1usize..6,
            deliveries in prop::collection::vec((any::<prop::sample::Index>(), 0usize..64), 0..120),
            merges in prop::collection::vec((0usize..6, 0usize..6), 0..20),
            seed in any::<u64>(),
        ) {
            let mut stores = vec![Replica::default(); replicas];
            // Each op reaches at least its "origin" replica, plus random extra deliveries.
            for (i, op) in ops.iter().enumerate() {
                stores[(seed as usize).wrapping_add(i) % replicas].apply(op);
            }
            if !ops.is_empty() {
                for (which, to) in &deliveries {
                    let op = &ops[which.index(ops.len())];
                    stores[to % replicas].apply(op);
                }
            }
            for (a, b) in merges {
                let (a, b) = (a % replicas, b % replicas);
                let other = stores[b].clone();
                stores[a].merge(&other);
            }
            // Anti-entropy until quiet: everyone merges everyone.
            for a in 0..replicas {
                for b in 0..replicas {
                    let other = stores[b].clone();
                    stores[a].merge(&other);
                }
            }
            for a in 0..replicas {
                let other = stores[a].clone();
                stores[0].merge(&other);
            }
            for a in 1..replicas {
                let first = stores[0].clone();
                stores[a].merge(&first);
            }
            let want = expected(&ops);
            for store in &stores {
                prop_assert_eq!(store, &want);
            }
        }

        /// Applying the same operations in two different orders gives the same replica.
        #[test]
        fn order_does_not_matter(ops in prop::collection::vec(op(), 0..40), seed in any::<u64>()) {
            let mut forward = Replica::default();
            for op in &ops {
                forward.apply(op);
            }
            let mut shuffled = ops.clone();
            // A deterministic shuffle from the seed.
            let mut state = seed | 1;
            for i in (1..shuffled.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                shuffled.swap(i, (state % (i as u64 + 1)) as usize);
            }
            let mut backward = Replica::default();
            for op in shuffled.iter().rev() {
                backward.apply(op);
            }
            prop_assert_eq!(forward, backward);
        }

        /// Two writes with the same timestamp: the greater writer ID wins on every replica.
        #[test]
        fn equal_timestamps_are_settled_by_writer(ms in 0u64..1000, a in 0u8..255, b in 0u8..255) {
            prop_assume!(a != b);
            let x = entry("k", ms, 0, a, Some(b"x"));
            let y = entry("k", ms, 0, b, Some(b"y"));
            let mut one = Replica::default();
            one.apply(&x);
            one.apply(&y);
            let mut two = Replica::default();
            two.apply(&y);
            two.apply(&x);
            prop_assert_eq!(&one, &two);
            prop_assert_eq!(one.entries["k"].writer, [a.max(b); 32]);
        }
    }
}
