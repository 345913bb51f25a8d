//! Which run starts when: plain bookkeeping without I/O, so the rules are tested directly.
//!
//! - At most `max_running` runs at once.
//! - Runs with the same key (a sender and a tag) start one after the other, in arrival order.
//! - Runs with different keys run alongside; when all slots are busy, keys get the next free
//!   slot in the order they started waiting, so one busy key cannot starve the others.
//! - Waiting runs are bounded per key, in number and in payload bytes; a run over a bound is
//!   handed back (`Admit::Full`) to be answered at once.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_running: usize,
    /// Runs waiting for a slot, over all keys.
    pub max_queued: usize,
    /// Runs waiting behind one key.
    pub max_queued_per_key: usize,
    /// Payload bytes held by waiting runs, over all keys.
    pub max_queued_bytes: usize,
}

/// What became of a submitted run.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit<T> {
    /// Start it now (a slot is taken).
    Start(T),
    /// It waits; `finish` hands it out later.
    Queued,
    /// It was not accepted; the reason is for the sender.
    Full(T, String),
}

#[derive(Debug)]
struct KeyState<T> {
    /// One run of this key holds a slot.
    busy: bool,
    waiting: VecDeque<(T, usize)>,
}

#[derive(Debug)]
pub struct Scheduler<K, T> {
    limits: Limits,
    running: usize,
    keys: HashMap<K, KeyState<T>>,
    /// Keys that are not busy but have runs waiting for a slot, oldest first. A key is here
    /// exactly when `!busy && !waiting.is_empty()`.
    ready: VecDeque<K>,
    queued: usize,
    queued_bytes: usize,
}

impl<K: Clone + Eq + Hash, T> Scheduler<K, T> {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits: Limits {
                max_running: limits.max_running.max(1),
                ..limits
            },
            running: 0,
            keys: HashMap::new(),
            ready: VecDeque::new(),
            queued: 0,
            queued_bytes: 0,
        }
    }

    pub fn running(&self) -> usize {
        self.running
    }

    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Offers a run with `bytes` of payload under `key`.
    pub fn submit(&mut self, key: K, item: T, bytes: usize) -> Admit<T> {
        let slot_free = self.running < self.limits.max_running;
        let state = self.keys.entry(key.clone()).or_insert_with(|| KeyState {
            busy: false,
            waiting: VecDeque::new(),
        });
        if !state.busy && state.waiting.is_empty() && slot_free {
            state.busy = true;
            self.running += 1;
            return Admit::Start(item);
        }
        let full = if state.waiting.len() >= self.limits.max_queued_per_key {
            Some(format!(
                "{} earlier runs of this tag from this sender are still waiting",
                state.waiting.len()
            ))
        } else if self.queued >= self.limits.max_queued {
            Some(format!(
                "{} runs are waiting for one of {} handler slots",
                self.queued, self.limits.max_running
            ))
        } else if self.queued > 0 && self.queued_bytes + bytes > self.limits.max_queued_bytes {
            Some(format!(
                "waiting runs already hold {} MiB of payload",
                self.queued_bytes / (1024 * 1024)
            ))
        } else {
            None
        };
        if let Some(reason) = full {
            if !state.busy && state.waiting.is_empty() {
                // Created just now for this run: leave no empty state behind.
                self.keys.remove(&key);
            }
            return Admit::Full(item, format!("handler queue full: {reason}"));
        }
        if !state.busy && state.waiting.is_empty() {
            self.ready.push_back(key);
        }
        state.waiting.push_back((item, bytes));
        self.queued += 1;
        self.queued_bytes += bytes;
        Admit::Queued
    }

    /// A run of `key` ended: frees its slot and returns the runs to start now.
    pub fn finish(&mut self, key: &K) -> Vec<(K, T)> {
        if let Some(state) = self.keys.get_mut(key)
            && state.busy
        {
            state.busy = false;
            self.running -= 1;
            if state.waiting.is_empty() {
                self.keys.remove(key);
            } else {
                // Behind keys that waited already: the freed slot goes to the oldest waiter.
                self.ready.push_back(key.clone());
            }
        }
        let mut start = Vec::new();
        while self.running < self.limits.max_running {
            let Some(next) = self.ready.pop_front() else {
                break;
            };
            let Some(state) = self.keys.get_mut(&next) else {
                continue;
            };
            let Some((item, bytes)) = state.waiting.pop_front() else {
                continue;
            };
            state.busy = true;
            self.running += 1;
            self.queued -= 1;
            self.queued_bytes -= bytes;
            start.push((next, item));
        }
        start
    }

    /// Takes every waiting run out (at shutdown, to answer them); running ones stay counted.
    pub fn drain(&mut self) -> Vec<T> {
        self.ready.clear();
        self.queued = 0;
        self.queued_bytes = 0;
        let mut drained = Vec::new();
        self.keys.retain(|_, state| {
            drained.extend(state.waiting.drain(..).map(|(item, _)| item));
            state.busy
        });
        drained
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_running: usize) -> Limits {
        Limits {
            max_running,
            max_queued: 100,
            max_queued_per_key: 10,
            max_queued_bytes: 1000,
        }
    }

    fn started<T>(admit: Admit<T>) -> T {
        match admit {
            Admit::Start(item) => item,
            _ => panic!("expected Start"),
        }
    }

    #[test]
    fn one_key_runs_in_order_others_alongside() {
        let mut s = Scheduler::new(limits(4));
        assert_eq!(started(s.submit("a", 1, 0)), 1);
        assert_eq!(s.submit("a", 2, 0), Admit::Queued);
        assert_eq!(s.submit("a", 3, 0), Admit::Queued);
        // Another key is not held up by a's queue.
        assert_eq!(started(s.submit("b", 10, 0)), 10);
        assert_eq!((s.running(), s.queued()), (2, 2));
        assert_eq!(s.finish(&"a"), vec![("a", 2)]);
        assert_eq!(s.finish(&"b"), vec![]);
        assert_eq!(s.finish(&"a"), vec![("a", 3)]);
        assert_eq!(s.finish(&"a"), vec![]);
        assert_eq!((s.running(), s.queued()), (0, 0));
        assert!(s.keys.is_empty() && s.ready.is_empty());
    }

    #[test]
    fn slots_are_limited_and_handed_out_oldest_first() {
        let mut s = Scheduler::new(limits(2));
        started(s.submit("a", 1, 0));
        started(s.submit("b", 2, 0));
        assert_eq!(s.submit("c", 3, 0), Admit::Queued);
        assert_eq!(s.submit("d", 4, 0), Admit::Queued);
        assert_eq!(s.submit("a", 5, 0), Admit::Queued);
        // a finishes: c waited longest, so c gets the slot, and a's next run queues behind d.
        assert_eq!(s.finish(&"a"), vec![("c", 3)]);
        assert_eq!(s.finish(&"b"), vec![("d", 4)]);
        assert_eq!(s.finish(&"c"), vec![("a", 5)]);
        assert_eq!(s.finish(&"d"), vec![]);
        assert_eq!(s.finish(&"a"), vec![]);
        assert_eq!((s.running(), s.queued()), (0, 0));
    }

    #[test]
    fn a_key_waiting_for_a_slot_keeps_its_order() {
        let mut s = Scheduler::new(limits(1));
        started(s.submit("x", 0, 0));
        assert_eq!(s.submit("a", 1, 0), Admit::Queued);
        assert_eq!(s.submit("a", 2, 0), Admit::Queued);
        assert_eq!(s.finish(&"x"), vec![("a", 1)]);
        assert_eq!(s.finish(&"a"), vec![("a", 2)]);
    }

    #[test]
    fn bounds_hand_runs_back() {
        let mut s = Scheduler::new(Limits {
            max_running: 1,
            max_queued: 3,
            max_queued_per_key: 2,
            max_queued_bytes: 100,
        });
        started(s.submit("a", 0, 0));
        assert_eq!(s.submit("a", 1, 10), Admit::Queued);
        assert_eq!(s.submit("a", 2, 10), Admit::Queued);
        match s.submit("a", 3, 10) {
            Admit::Full(3, reason) => {
                assert!(reason.contains("this tag from this sender"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        match s.submit("b", 4, 95) {
            Admit::Full(4, reason) => assert!(reason.contains("MiB of payload"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.submit("c", 5, 10), Admit::Queued);
        match s.submit("d", 6, 0) {
            Admit::Full(6, reason) => assert!(reason.contains("3 runs are waiting"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // Refused keys leave nothing behind.
        assert!(!s.keys.contains_key("b") && !s.keys.contains_key("d"));
        assert_eq!(s.queued_bytes, 30);
        // c waited for a slot before a's next run did.
        assert_eq!(s.finish(&"a"), vec![("c", 5)]);
        assert_eq!(s.queued_bytes, 20);
        assert_eq!(s.finish(&"c"), vec![("a", 1)]);
        assert_eq!(s.queued_bytes, 10);
    }

    #[test]
    fn a_large_run_still_queues_when_the_queue_is_empty() {
        let mut s = Scheduler::new(Limits {
            max_queued_bytes: 10,
            ..limits(1)
        });
        started(s.submit("a", 0, 0));
        assert_eq!(s.submit("b", 1, 50), Admit::Queued);
    }

    #[test]
    fn nothing_queues_with_max_queued_zero() {
        let mut s = Scheduler::new(Limits {
            max_queued: 0,
            ..limits(1)
        });
        started(s.submit("a", 0, 0));
        assert!(matches!(s.submit("b", 1, 0), Admit::Full(1, _)));
    }

    #[test]
    fn drain_takes_waiting_runs_and_keeps_running_ones() {
        let mut s = Scheduler::new(limits(1));
        started(s.submit("a", 0, 0));
        s.submit("a", 1, 0);
        s.submit("b", 2, 0);
        let mut drained = s.drain();
        drained.sort();
        assert_eq!(drained, vec![1, 2]);
        assert_eq!((s.running(), s.queued()), (1, 0));
        assert_eq!(s.finish(&"a"), vec![]);
        assert_eq!(s.running(), 0);
    }
}
