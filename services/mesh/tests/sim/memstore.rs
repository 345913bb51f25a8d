//! The replicated store in memory, by the same merge rules and digest tree as the sled store:
//! what the core reads and merges in the simulator.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use cnsprcy::wire::{KeyBytes, StoreEntry, StoreSummary, StoreTimestamp};
use cnsprcy_mesh::core::{StoreAccess, StoreCounter};
use cnsprcy_mesh::store::digest::DigestTree;
use cnsprcy_mesh::store::merge::{self, Clock, Version};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub ts: StoreTimestamp,
    pub writer: KeyBytes,
    pub value: Option<Vec<u8>>,
}

impl Record {
    fn version(&self) -> Version {
        Version {
            ts: self.ts,
            writer: self.writer,
        }
    }
}

pub struct Inner {
    pub records: BTreeMap<String, Record>,
    tree: DigestTree,
    clock: Clock,
}

/// A device's store; shared between its core and the simulator (which writes locally and checks).
#[derive(Clone)]
pub struct MemStore(Rc<RefCell<Inner>>);

impl MemStore {
    pub fn new() -> Self {
        Self(Rc::new(RefCell::new(Inner {
            records: BTreeMap::new(),
            tree: DigestTree::default(),
            clock: Clock::default(),
        })))
    }

    /// A local write at wall time `now_ms` by `own`: durable at once in the simulator.
    pub fn write_local(
        &self,
        own: KeyBytes,
        key: &str,
        value: Option<Vec<u8>>,
        now_ms: u64,
    ) -> StoreEntry {
        let mut inner = self.0.borrow_mut();
        let old = inner.records.get(key).map(Record::version);
        let mut version = Version {
            ts: inner.clock.tick(now_ms),
            writer: own,
        };
        while !merge::wins(&version, old.as_ref()) {
            version.ts = inner.clock.tick(now_ms);
        }
        let record = Record {
            ts: version.ts,
            writer: own,
            value,
        };
        inner.tree.update(key, old.as_ref(), &version);
        inner.records.insert(key.to_owned(), record.clone());
        StoreEntry {
            key: key.to_owned(),
            ts: record.ts,
            writer: own,
            value: record.value,
        }
    }

    pub fn records(&self) -> BTreeMap<String, Record> {
        self.0.borrow().records.clone()
    }
}

impl StoreAccess for MemStore {
    fn top(&self) -> Vec<u64> {
        self.0.borrow().tree.top()
    }

    fn buckets(&self, which: &[u8]) -> Vec<(u8, Vec<u64>)> {
        let inner = self.0.borrow();
        which.iter().map(|b| (*b, inner.tree.bucket(*b))).collect()
    }

    fn leaf_digests(&self, bucket: u8) -> Vec<u64> {
        self.0.borrow().tree.bucket(bucket)
    }

    fn summaries(&self, leaves: &[u16]) -> Vec<StoreSummary> {
        let inner = self.0.borrow();
        leaves
            .iter()
            .flat_map(|leaf| inner.tree.keys(*leaf))
            .filter_map(|key| {
                inner.records.get(key).map(|r| StoreSummary {
                    key: key.clone(),
                    ts: r.ts,
                    writer: r.writer,
                })
            })
            .collect()
    }

    fn entries(&self, keys: &[&str]) -> Vec<StoreEntry> {
        let inner = self.0.borrow();
        keys.iter()
            .filter_map(|key| {
                inner.records.get(*key).map(|r| StoreEntry {
                    key: (*key).to_owned(),
                    ts: r.ts,
                    writer: r.writer,
                    value: r.value.clone(),
                })
            })
            .collect()
    }

    fn apply_remote(&self, entries: Vec<StoreEntry>, _from: &str, now_ms: u64) -> Vec<StoreEntry> {
        let mut inner = self.0.borrow_mut();
        let mut changes = Vec::new();
        for entry in entries {
            if merge::check_remote(&entry, now_ms).is_err() {
                continue;
            }
            let old = inner.records.get(&entry.key).map(Record::version);
            let version = Version::of(&entry);
            if !merge::wins(&version, old.as_ref()) {
                continue;
            }
            inner.tree.update(&entry.key, old.as_ref(), &version);
            inner.clock.observe(entry.ts);
            inner.records.insert(
                entry.key.clone(),
                Record {
                    ts: entry.ts,
                    writer: entry.writer,
                    value: entry.value.clone(),
                },
            );
            changes.push(entry);
        }
        changes
    }

    fn count(&self, _counter: StoreCounter, _amount: u64) {}
}
