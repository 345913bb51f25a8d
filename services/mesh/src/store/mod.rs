//! The replicated key-value store (`docs/store.md`): last writer wins by hybrid logical clock
//! timestamp, the writer's public key breaking ties, deletions kept as tombstones.
//!
//! - `merge`: the rules, pure;
//! - `storage`: the engine (sled), behind a small interface;
//! - `digest`: the digest tree anti-entropy compares;
//! - the core's `store_sync`: pushing writes, answering anti-entropy;
//! - `rpc`: the `db.*` API methods.
//!
//! The mesh process keeps the store open for its whole life; the CLI opens it itself only when
//! the daemon does not run (`open_offline`).

pub mod digest;
pub mod merge;
pub mod rpc;
pub mod storage;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use cnsprcy::api::StoreItem;
use cnsprcy::identity::PublicKey;
use cnsprcy::wire::{KeyBytes, StoreEntry, StoreSummary};

use digest::DigestTree;
use merge::{Clock, Invalid, Version};
pub use storage::{Record, Storage, StorageError};

/// How often each device starts anti-entropy with each member it has a session with (besides
/// when the session comes up).
pub const SYNC_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Invalid(#[from] Invalid),
    #[error("{0}")]
    Storage(#[from] StorageError),
}

struct Inner {
    clock: Clock,
    tree: DigestTree,
}

/// The store as the mesh service holds it.
pub struct Store {
    storage: Storage,
    inner: Mutex<Inner>,
    own: KeyBytes,
    pub stats: Stats,
}

/// Traffic counters since the daemon started (`db.stats`).
#[derive(Debug, Default)]
pub struct Stats {
    /// Store messages sent for anti-entropy (digests, summaries, wants and their updates).
    pub sync_bytes_sent: AtomicU64,
    /// Store messages sent to push local writes.
    pub push_bytes_sent: AtomicU64,
    /// Store messages received for this device, of any kind.
    pub bytes_received: AtomicU64,
    /// Anti-entropy walks this device started.
    pub sync_rounds: AtomicU64,
}

/// An entry that changed the store.
#[derive(Debug, Clone)]
pub struct Change {
    pub entry: StoreEntry,
}

impl Store {
    /// Opens the store in `state_dir/store`, reading every record once to build the digest
    /// tree and to set the clock past every stored timestamp.
    pub fn open(state_dir: &Path, own: KeyBytes) -> Result<Self, StorageError> {
        let storage = Storage::open(state_dir)?;
        let mut inner = Inner {
            clock: Clock::default(),
            tree: DigestTree::default(),
        };
        let mut count = 0usize;
        for item in storage.scan("") {
            let (key, record) = item?;
            let version = Version {
                ts: record.ts,
                writer: record.writer,
            };
            inner.tree.update(&key, None, &version);
            inner.clock.observe(record.ts);
            count += 1;
        }
        tracing::debug!(keys = count, "opened the store");
        Ok(Self {
            storage,
            inner: Mutex::new(inner),
            own,
            stats: Stats::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the tree half-updated in a way that
        // matters more than a missed anti-entropy round; carry on with the data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes (`Some`) or deletes (`None`) a key on this device, and returns once durable.
    pub fn write_local(&self, key: &str, value: Option<Vec<u8>>) -> Result<StoreEntry, StoreError> {
        merge::check_key(key)?;
        if let Some(value) = &value {
            merge::check_value(value)?;
        }
        let entry = {
            let mut inner = self.lock();
            let old = self.storage.get(key)?.map(|r| Version {
                ts: r.ts,
                writer: r.writer,
            });
            let mut ts = inner.clock.tick(merge::now_ms());
            let mut version = Version {
                ts,
                writer: self.own,
            };
            // The clock is ahead of everything stored; only a damaged clock state could make
            // this loop run more than once.
            while !merge::wins(&version, old.as_ref()) {
                ts = inner.clock.tick(merge::now_ms());
                version.ts = ts;
            }
            let record = Record {
                ts,
                writer: self.own,
                value,
            };
            self.storage.put(key, &record)?;
            inner.tree.update(key, old.as_ref(), &version);
            StoreEntry {
                key: key.to_owned(),
                ts,
                writer: self.own,
                value: record.value,
            }
        };
        self.storage.flush()?;
        Ok(entry)
    }

    /// Merges entries from a peer; returns those that changed the store. Invalid entries (too
    /// large, or from too far in the future) are logged and skipped.
    pub fn apply_remote(&self, entries: Vec<StoreEntry>, from: &str, now: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut inner = self.lock();
        for entry in entries {
            if let Err(e) = merge::check_remote(&entry, now) {
                tracing::warn!(peer = %from, key = %entry.key.escape_debug(), "refused a store entry: {e}");
                continue;
            }
            let old = match self.storage.get(&entry.key) {
                Ok(old) => old.map(|r| Version {
                    ts: r.ts,
                    writer: r.writer,
                }),
                Err(e) => {
                    tracing::warn!("cannot read the store: {e}");
                    continue;
                }
            };
            let version = Version::of(&entry);
            if !merge::wins(&version, old.as_ref()) {
                continue;
            }
            let record = Record {
                ts: entry.ts,
                writer: entry.writer,
                value: entry.value.clone(),
            };
            if let Err(e) = self.storage.put(&entry.key, &record) {
                tracing::warn!("cannot write to the store: {e}");
                continue;
            }
            inner.tree.update(&entry.key, old.as_ref(), &version);
            inner.clock.observe(entry.ts);
            changes.push(Change { entry });
        }
        changes
    }

    pub fn get(&self, key: &str) -> Result<Option<Record>, StorageError> {
        self.storage.get(key)
    }

    /// Live entries (not deleted) whose key starts with `prefix`, in key order.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, Record)>, StorageError> {
        list(&self.storage, prefix)
    }

    /// The counters, and the number of keys (tombstones included), as `db.stats` shows them.
    pub fn stats_json(&self) -> serde_json::Value {
        let keys = self.lock().tree.key_count();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "keys": keys,
            "sync_bytes_sent": get(&self.stats.sync_bytes_sent),
            "push_bytes_sent": get(&self.stats.push_bytes_sent),
            "bytes_received": get(&self.stats.bytes_received),
            "sync_rounds": get(&self.stats.sync_rounds),
        })
    }

    pub fn top(&self) -> Vec<u64> {
        self.lock().tree.top()
    }

    pub fn buckets(&self, which: impl IntoIterator<Item = u8>) -> Vec<(u8, Vec<u64>)> {
        let inner = self.lock();
        which
            .into_iter()
            .map(|b| (b, inner.tree.bucket(b)))
            .collect()
    }

    pub fn leaf_digests(&self, bucket: u8) -> Vec<u64> {
        self.lock().tree.bucket(bucket)
    }

    /// The versions held in the given leaves.
    pub fn summaries(&self, leaves: &[u16]) -> Vec<StoreSummary> {
        let keys: Vec<String> = {
            let inner = self.lock();
            leaves
                .iter()
                .flat_map(|&leaf| inner.tree.keys(leaf).cloned().collect::<Vec<_>>())
                .collect()
        };
        keys.into_iter()
            .filter_map(|key| {
                let record = self.storage.get(&key).ok()??;
                Some(StoreSummary {
                    key,
                    ts: record.ts,
                    writer: record.writer,
                })
            })
            .collect()
    }

    /// The stored entries for `keys` (tombstones included; absent keys left out).
    pub fn entries<'a>(&self, keys: impl IntoIterator<Item = &'a str>) -> Vec<StoreEntry> {
        keys.into_iter()
            .filter_map(|key| {
                let record = self.storage.get(key).ok()??;
                Some(StoreEntry {
                    key: key.to_owned(),
                    ts: record.ts,
                    writer: record.writer,
                    value: record.value,
                })
            })
            .collect()
    }
}

fn list(storage: &Storage, prefix: &str) -> Result<Vec<(String, Record)>, StorageError> {
    let mut out = Vec::new();
    for item in storage.scan(prefix) {
        let (key, record) = item?;
        if record.value.is_some() {
            out.push((key, record));
        }
    }
    Ok(out)
}

/// The store opened by the CLI while the daemon does not run: reads only.
pub struct OfflineStore {
    storage: Storage,
}

impl OfflineStore {
    /// `Ok(None)` when this device has no store yet.
    pub fn open(state_dir: &Path) -> Result<Option<Self>, StorageError> {
        if !Storage::exists(state_dir) {
            return Ok(None);
        }
        Ok(Some(Self {
            storage: Storage::open(state_dir)?,
        }))
    }

    pub fn get(&self, key: &str) -> Result<Option<Record>, StorageError> {
        Ok(self.storage.get(key)?.filter(|r| r.value.is_some()))
    }

    pub fn list(&self, prefix: &str) -> Result<Vec<(String, Record)>, StorageError> {
        list(&self.storage, prefix)
    }
}

/// A record as the API shows it; `names` maps writers' keys to device names.
pub fn item(key: &str, record: &Record, names: &HashMap<KeyBytes, String>) -> StoreItem {
    let writer_key = PublicKey::from_bytes(record.writer);
    let writer_id = writer_key.device_id();
    let value = record.value.as_deref().unwrap_or_default();
    StoreItem {
        key: key.to_owned(),
        value: std::str::from_utf8(value).ok().map(str::to_owned),
        value_base64: BASE64.encode(value),
        deleted: record.value.is_none(),
        writer: names
            .get(&record.writer)
            .cloned()
            .unwrap_or_else(|| writer_id.to_string()),
        writer_id,
        time: humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(record.ts.ms))
            .to_string(),
        timestamp: record.ts.ms,
        counter: record.ts.counter,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnsprcy::wire::StoreTimestamp;

    #[test]
    fn local_writes_are_durable_and_remote_ones_merge_by_version() {
        let dir = tempfile::tempdir().unwrap();
        let own = [1; 32];
        let store = Store::open(dir.path(), own).unwrap();
        let written = store.write_local("a", Some(b"one".to_vec())).unwrap();
        assert_eq!(written.writer, own);
        // An older remote write loses; a newer one wins; one from too far ahead is refused.
        let remote = |ms: u64, value: &[u8]| StoreEntry {
            key: "a".into(),
            ts: StoreTimestamp { ms, counter: 0 },
            writer: [2; 32],
            value: Some(value.to_vec()),
        };
        assert!(
            store
                .apply_remote(vec![remote(1, b"old")], "b", merge::now_ms())
                .is_empty()
        );
        let now = merge::now_ms();
        assert!(
            store
                .apply_remote(vec![remote(now + 3_600_000, b"future")], "b", now)
                .is_empty()
        );
        assert_eq!(
            store
                .apply_remote(vec![remote(now + 1000, b"new")], "b", now)
                .len(),
            1
        );
        assert_eq!(store.get("a").unwrap().unwrap().value.unwrap(), b"new");
        // The clock moved past the accepted timestamp: a local write wins again.
        let again = store.write_local("a", None).unwrap();
        assert!(again.ts.ms >= now + 1000);
        assert!(store.list("").unwrap().is_empty());
        assert!(matches!(
            store.write_local("", Some(Vec::new())),
            Err(StoreError::Invalid(Invalid::EmptyKey))
        ));
        let top = store.top();
        drop(store);
        // Reopened: same digests; the daemon being down, the CLI can read. sled lets go of its
        // file lock from a background thread, so the reopen may have to wait a moment (as the
        // daemon does at start).
        let store = (0..50)
            .find_map(|_| match Store::open(dir.path(), own) {
                Err(StorageError::Locked { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    None
                }
                other => Some(other),
            })
            .expect("the store's lock was released")
            .unwrap();
        assert_eq!(store.top(), top);
        drop(store);
        let offline = OfflineStore::open(dir.path()).unwrap().unwrap();
        assert!(offline.get("a").unwrap().is_none());
        assert!(
            OfflineStore::open(&dir.path().join("none"))
                .unwrap()
                .is_none()
        );
    }

    /// Two stores with many equal keys and a few different ones: the digest walk finds exactly
    /// the different ones.
    #[test]
    fn digest_walk_finds_only_the_differences() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = Store::open(da.path(), [1; 32]).unwrap();
        let b = Store::open(db.path(), [2; 32]).unwrap();
        let shared: Vec<StoreEntry> = (0..2000)
            .map(|i| StoreEntry {
                key: format!("k{i}"),
                ts: StoreTimestamp {
                    ms: 1000,
                    counter: 0,
                },
                writer: [3; 32],
                value: Some(vec![1]),
            })
            .collect();
        a.apply_remote(shared.clone(), "x", merge::now_ms());
        b.apply_remote(shared, "x", merge::now_ms());
        assert_eq!(a.top(), b.top());
        for i in 0..5 {
            a.write_local(&format!("a{i}"), Some(vec![2])).unwrap();
            b.write_local(&format!("k{i}"), Some(vec![3])).unwrap();
        }
        let buckets = digest::differing(&a.top(), &b.top());
        assert!(!buckets.is_empty() && buckets.len() <= 10);
        let mut leaves = Vec::new();
        for bucket in buckets {
            let bucket = bucket as u8;
            for leaf in digest::differing(&a.leaf_digests(bucket), &b.leaf_digests(bucket)) {
                leaves.push(u16::from(bucket) << 8 | leaf as u16);
            }
        }
        let mut keys: Vec<String> = a
            .summaries(&leaves)
            .into_iter()
            .chain(b.summaries(&leaves))
            .map(|s| s.key)
            .collect();
        keys.sort();
        keys.dedup();
        // The differing keys, plus the few that share their leaves.
        assert!(keys.len() >= 10 && keys.len() <= 20, "{keys:?}");
    }
}
