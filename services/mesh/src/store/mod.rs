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
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cnsprcy::api::{SetAsideStore, StoreItem, StoreState, StoreStatus};
use cnsprcy::identity::PublicKey;
use cnsprcy::wire::{KeyBytes, StoreEntry, StoreSummary};

use digest::DigestTree;
use merge::{Clock, Invalid, Version};
pub use storage::{Record, Storage, StorageError};

/// How often each device starts anti-entropy with each member it has a session with (besides
/// when the session comes up).
pub const SYNC_INTERVAL: Duration = Duration::from_secs(30);
/// While the store is degraded, how often it tries to recover by itself.
pub const RECOVERY_INTERVAL: Duration = Duration::from_secs(5);
const MAX_RECOVERY_INTERVAL: Duration = Duration::from_secs(60);
/// The free space a reopen waits for (sled writes a snapshot and may start a 512 KiB segment).
const REOPEN_FREE_BYTES: u64 = 2 * 1024 * 1024;
/// How long a reopen waits for sled to let go of the files of the instance it replaces.
const REOPEN_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Invalid(#[from] Invalid),
    #[error("{0}")]
    Storage(#[from] StorageError),
    /// `db.del` of a key this device does not hold (or holds deleted).
    #[error("no key {0:?} on this device; nothing deleted (`cnspr db list` shows the keys)")]
    NotFound(String),
    /// The store is degraded: writes are refused until it recovered.
    #[error("the store cannot take writes now: {0}")]
    Degraded(String),
}

/// What went wrong with the store, while it is degraded.
struct Problem {
    error: StorageError,
    since: SystemTime,
}

struct Inner {
    clock: Clock,
    tree: DigestTree,
    /// How many of the tree's keys are tombstones.
    tombstones: usize,
    /// Whether the open instance takes writes. False after a failed write (sled then refuses
    /// every write until it is opened again) until a reopen and a probe write succeeded.
    writable: bool,
    problem: Option<Problem>,
    set_aside: Option<SetAsideStore>,
}

/// The parts the recovery thread shares with the store.
struct Core {
    state_dir: PathBuf,
    inner: Mutex<Inner>,
    /// The open instance, or why there is none (reads fail then).
    storage: RwLock<Result<Arc<Storage>, StorageError>>,
    /// Keys whose write is under way or failed and is not yet verified undone, with the record
    /// they held before: reads show that one. A failed write can linger in sled's memory (and,
    /// rarely, reach the disk although sled reported an error) until the store is reopened and
    /// the key checked.
    unconfirmed: Mutex<HashMap<String, Option<Record>>>,
    /// Whether a recovery thread runs (changed only with `inner` locked).
    recovering: AtomicBool,
    /// A peer's entry was skipped because a local write of its key was being made durable.
    skipped_for_a_write: AtomicBool,
    /// Held by a local write from start to durable: they go one at a time.
    writing: Mutex<()>,
}

/// The store as the mesh service holds it.
pub struct Store {
    core: Arc<Core>,
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

/// What one pass over every record found.
#[derive(Default)]
struct Scanned {
    tree: DigestTree,
    tombstones: usize,
    clock: Clock,
}

fn version(record: &Record) -> Version {
    Version {
        ts: record.ts,
        writer: record.writer,
    }
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the tree half-updated in a way that
        // matters more than a missed anti-entropy round; carry on with the data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unconfirmed(&self) -> MutexGuard<'_, HashMap<String, Option<Record>>> {
        self.unconfirmed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn storage(&self) -> Result<Arc<Storage>, StorageError> {
        self.storage
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_storage(&self, storage: Result<Arc<Storage>, StorageError>) {
        let old = std::mem::replace(
            &mut *self.storage.write().unwrap_or_else(|p| p.into_inner()),
            storage,
        );
        if let Ok(old) = old {
            release(old);
        }
    }

    /// A record as reads show it: the one before an unconfirmed write, if there is one.
    fn shown(&self, key: &str, stored: Option<Record>) -> Option<Record> {
        match self.unconfirmed().get(key) {
            Some(before) => before.clone(),
            None => stored,
        }
    }

    fn get(&self, key: &str) -> Result<Option<Record>, StorageError> {
        let stored = self.storage()?.get(key)?;
        // Checked after the read: a write that the read saw registered itself before it wrote.
        Ok(self.shown(key, stored))
    }

    /// Opens the store's files and reads every record once. A damaged store is set aside and
    /// a new empty one opened in its place; the daemon then refills it from the other devices.
    fn open_and_scan(&self, inner: &mut Inner) -> Result<(Arc<Storage>, Scanned), StorageError> {
        match open_scanned(&self.state_dir) {
            Err(StorageError::Damaged { path, reason }) => {
                let now = SystemTime::now();
                let aside =
                    storage::set_aside(&self.state_dir, now).map_err(|e| StorageError::Engine {
                        path: path.clone(),
                        error: format!(
                            "the store is damaged ({reason}), and cannot be moved aside: {e}"
                        ),
                        kind: Some(e.kind()),
                    })?;
                let advice = format!(
                    "the store starts empty and refills from the other devices; once they have \
                     (`cnspr db list`), delete {}",
                    aside.display()
                );
                tracing::error!(
                    damaged = %aside.display(),
                    "the store {} was damaged ({reason}); moved it to {}: {advice}",
                    path.display(),
                    aside.display(),
                );
                inner.set_aside = Some(SetAsideStore {
                    path: aside,
                    reason,
                    time: humantime::format_rfc3339_seconds(now).to_string(),
                    advice,
                });
                // The data is elsewhere too: forget what was unconfirmed in the old copy.
                self.unconfirmed().clear();
                open_scanned(&self.state_dir)
            }
            other => other,
        }
    }

    /// Records a failed write or read: the store is degraded until `recover` succeeds.
    /// `recover_now`: try at once (not from the node's event loop, which must not wait).
    fn fail(self: &Arc<Self>, inner: &mut Inner, error: StorageError, recover_now: bool) {
        tracing::error!("{error}; {}", error.advice());
        inner.writable = false;
        let since = inner
            .problem
            .as_ref()
            .map_or_else(SystemTime::now, |p| p.since);
        inner.problem = Some(Problem { error, since });
        if recover_now {
            self.recover(inner);
        }
        if inner.problem.is_some() && !self.recovering.swap(true, Ordering::SeqCst) {
            let weak = Arc::downgrade(self);
            let spawned = std::thread::Builder::new()
                .name("store-recovery".into())
                .spawn(move || recovery_loop(weak));
            if let Err(e) = spawned {
                tracing::error!("cannot start the store's recovery thread: {e}");
                self.recovering.store(false, Ordering::SeqCst);
            }
        }
    }

    /// Makes the store writable again if it can: opens the files anew (sled refuses every
    /// write after a failure until then), checks that each failed write left no trace (and
    /// undoes it where it did), rebuilds the digest tree from what is on disk, and writes a
    /// probe. Leaves `inner.problem` set if any step fails. Returns whether it reopened the
    /// files (or tried to), which is the costly part.
    fn recover(&self, inner: &mut Inner) -> bool {
        if inner.writable && inner.problem.is_none() {
            return false;
        }
        if !inner.writable {
            // sled writes when it opens the files; on a full disk that fails and leaves the
            // store unreadable too. So until there is room, keep reading from the instance
            // at hand (the unconfirmed keys show their old records).
            let free = storage::free_bytes(&self.state_dir.join(storage::DIR));
            if free.is_some_and(|free| free < REOPEN_FREE_BYTES) && self.storage().is_ok() {
                return false;
            }
            // Let go of the instance first: sled holds a lock on its files until it is gone.
            self.set_storage(Err(inner
                .problem
                .as_ref()
                .map(|p| p.error.clone())
                .unwrap_or_else(|| StorageError::Engine {
                    path: self.state_dir.join(storage::DIR),
                    error: "the store is being reopened".into(),
                    kind: None,
                })));
            let deadline = std::time::Instant::now() + REOPEN_WAIT;
            let opened = loop {
                match self.open_and_scan(inner) {
                    Err(StorageError::Locked { .. }) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    other => break other,
                }
            };
            let (storage, scanned) = match opened {
                Ok(opened) => opened,
                Err(StorageError::Locked { path }) => {
                    // Only this daemon opens the store while it runs: its own old instance
                    // still holds the files (a flush that never returned).
                    let error = StorageError::Engine {
                        error: "the storage engine still holds the files after a failure; \
                                restart the daemon (`systemctl --user restart cnsprcy-mesh`)"
                            .into(),
                        path,
                        kind: None,
                    };
                    self.set_storage(Err(error.clone()));
                    self.keep_problem(inner, error);
                    return true;
                }
                Err(error) => {
                    self.set_storage(Err(error.clone()));
                    self.keep_problem(inner, error);
                    return true;
                }
            };
            // Undo, on disk, any failed write that got there after all.
            let undo: Vec<(String, Option<Record>)> = self
                .unconfirmed()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let mut undone = true;
            for (key, before) in &undo {
                let result = storage.get(key).and_then(|now| {
                    if now.as_ref().map(version) == before.as_ref().map(version) {
                        return Ok(());
                    }
                    tracing::warn!(key = %key.escape_debug(), "a failed store write reached the disk; undoing it");
                    storage.put(key, before.as_ref())?;
                    storage.flush()
                });
                if let Err(error) = result {
                    undone = false;
                    self.keep_problem(inner, error);
                    break;
                }
            }
            let mut scanned = scanned;
            if !undo.is_empty() && undone {
                // The tree was read before the undo: read it again.
                match scan(&storage) {
                    Ok(again) => scanned = again,
                    Err(error) => {
                        undone = false;
                        self.keep_problem(inner, error);
                    }
                }
            }
            inner.tree = scanned.tree;
            inner.tombstones = scanned.tombstones;
            inner.clock.observe(scanned.clock.last());
            if undone {
                self.unconfirmed().clear();
            } else {
                // Readable (the unconfirmed keys show their old records), not writable.
                self.set_storage(Ok(storage));
                return true;
            }
            self.set_storage(Ok(storage));
        }
        let reopened = !inner.writable;
        let probe = self.storage().and_then(|s| s.probe(merge::now_ms()));
        match probe {
            Ok(()) => {
                inner.writable = true;
                if let Some(problem) = inner.problem.take() {
                    tracing::info!(
                        "the store works again (it was degraded for {} s: {})",
                        problem.since.elapsed().map_or(0, |d| d.as_secs()),
                        problem.error
                    );
                }
            }
            Err(error) => {
                // The probe failed: sled refuses writes again until the next reopen.
                inner.writable = false;
                self.keep_problem(inner, error);
            }
        }
        reopened
    }

    /// Keeps the store degraded with the latest error, since the first.
    fn keep_problem(&self, inner: &mut Inner, error: StorageError) {
        tracing::debug!("the store is still degraded: {error}");
        let since = inner
            .problem
            .as_ref()
            .map_or_else(SystemTime::now, |p| p.since);
        inner.problem = Some(Problem { error, since });
    }
}

/// Drops a sled instance on a thread of its own: dropping flushes, and a wedged instance never
/// returns from that.
fn release(storage: Arc<Storage>) {
    let _ = std::thread::Builder::new()
        .name("store-release".into())
        .spawn(move || {
            let _ = storage::guarded(move || drop(storage));
        });
}

/// Tries to recover every `RECOVERY_INTERVAL` until the store works again; after each try that
/// reopened the store in vain (which reads it through), twice as long, up to
/// `MAX_RECOVERY_INTERVAL`.
fn recovery_loop(core: Weak<Core>) {
    let mut interval = RECOVERY_INTERVAL;
    loop {
        std::thread::sleep(interval);
        let Some(core) = core.upgrade() else { return };
        let mut inner = core.lock();
        let reopened = core.recover(&mut inner);
        if inner.problem.is_none() {
            core.recovering.store(false, Ordering::SeqCst);
            return;
        }
        if reopened {
            interval = (interval * 2).min(MAX_RECOVERY_INTERVAL);
        }
    }
}

/// Opens the store and reads every record once (a damaged store can open and then fail while
/// being read).
fn open_scanned(state_dir: &Path) -> Result<(Arc<Storage>, Scanned), StorageError> {
    let storage = Arc::new(Storage::open(state_dir)?);
    match scan(&storage) {
        Ok(scanned) => Ok((storage, scanned)),
        Err(e) => {
            release(storage);
            Err(e)
        }
    }
}

fn scan(storage: &Storage) -> Result<Scanned, StorageError> {
    let mut scanned = Scanned::default();
    for item in storage.scan("", None) {
        let (key, record) = item?;
        scanned.tree.update(&key, None, &version(&record));
        scanned.clock.observe(record.ts);
        if record.value.is_none() {
            scanned.tombstones += 1;
        }
    }
    Ok(scanned)
}

impl Inner {
    /// Takes note of a write that is durable (local) or stored (remote).
    fn written(&mut self, key: &str, old: Option<&Record>, new: &Record) {
        self.tree
            .update(key, old.map(version).as_ref(), &version(new));
        self.clock.observe(new.ts);
        if old.is_some_and(|r| r.value.is_none()) {
            self.tombstones = self.tombstones.saturating_sub(1);
        }
        if new.value.is_none() {
            self.tombstones += 1;
        }
    }
}

impl Store {
    /// Opens the store in `state_dir/store`, reading every record once to build the digest
    /// tree and to set the clock past every stored timestamp. A damaged store is set aside and
    /// replaced by an empty one; a store that cannot be opened now (a full disk, say) leaves the
    /// daemon running with the store degraded, retrying by itself. Only `Locked` is an error.
    pub fn open(state_dir: &Path, own: KeyBytes) -> Result<Self, StorageError> {
        let path = state_dir.join(storage::DIR);
        let core = Arc::new(Core {
            state_dir: state_dir.to_owned(),
            inner: Mutex::new(Inner {
                clock: Clock::default(),
                tree: DigestTree::default(),
                tombstones: 0,
                writable: false,
                problem: None,
                set_aside: None,
            }),
            storage: RwLock::new(Err(StorageError::Engine {
                path,
                error: "not opened yet".into(),
                kind: None,
            })),
            unconfirmed: Mutex::default(),
            recovering: AtomicBool::new(false),
            skipped_for_a_write: AtomicBool::new(false),
            writing: Mutex::default(),
        });
        {
            let mut inner = core.lock();
            match core.open_and_scan(&mut inner) {
                Ok((storage, scanned)) => {
                    tracing::debug!(keys = scanned.tree.key_count(), "opened the store");
                    inner.tree = scanned.tree;
                    inner.tombstones = scanned.tombstones;
                    inner.clock = scanned.clock;
                    inner.writable = true;
                    core.set_storage(Ok(storage));
                }
                Err(e @ StorageError::Locked { .. }) => return Err(e),
                Err(error) => {
                    core.set_storage(Err(error.clone()));
                    core.fail(&mut inner, error, false);
                }
            }
        }
        Ok(Self {
            core,
            own,
            stats: Stats::default(),
        })
    }

    /// Writes (`Some`) or deletes (`None`) a key on this device, and returns once durable. A
    /// write that fails leaves no trace: not readable, not in the digest tree, the clock as it
    /// was.
    pub fn write_local(&self, key: &str, value: Option<Vec<u8>>) -> Result<StoreEntry, StoreError> {
        merge::check_key(key)?;
        if let Some(value) = &value {
            merge::check_value(value)?;
        }
        let core = &self.core;
        // Local writes one at a time; `inner` is not held while one is made durable, so the
        // node's reads and merges never wait for a disk.
        let _writing = core.writing.lock().unwrap_or_else(|p| p.into_inner());
        let mut inner = core.lock();
        if !inner.writable || inner.problem.is_some() {
            core.recover(&mut inner);
            if let Some(problem) = &inner.problem {
                return Err(StoreError::Degraded(format!(
                    "{}; {}",
                    problem.error,
                    problem.error.advice()
                )));
            }
        }
        let storage = core.storage()?;
        let old = match storage.get(key) {
            Ok(old) => old,
            Err(error) => {
                core.fail(&mut inner, error.clone(), true);
                return Err(error.into());
            }
        };
        if value.is_none() && old.as_ref().is_none_or(|r| r.value.is_none()) {
            return Err(StoreError::NotFound(key.to_owned()));
        }
        // The clock moves only once the write is durable.
        let mut clock = inner.clock;
        let mut new = Record {
            ts: clock.tick(merge::now_ms()),
            writer: self.own,
            value,
        };
        // The clock is ahead of everything stored; only a damaged clock state could make this
        // loop run more than once.
        while !merge::wins(&version(&new), old.as_ref().map(version).as_ref()) {
            new.ts = clock.tick(merge::now_ms());
        }
        core.unconfirmed().insert(key.to_owned(), old.clone());
        // Until it is durable, reads show the old record and merges from peers leave the key
        // alone (`apply_remote`), so nothing else changes it meanwhile.
        let mut written = storage.put(key, Some(&new));
        if written.is_ok() {
            drop(inner);
            written = storage.flush();
            inner = core.lock();
        }
        drop(storage);
        if let Err(error) = written {
            core.fail(&mut inner, error.clone(), true);
            return Err(error.into());
        }
        core.unconfirmed().remove(key);
        inner.written(key, old.as_ref(), &new);
        Ok(StoreEntry {
            key: key.to_owned(),
            ts: new.ts,
            writer: new.writer,
            value: new.value,
        })
    }

    /// Merges entries from a peer; returns those that changed the store. Invalid entries (too
    /// large, or from too far in the future by `now`, Unix ms) are logged and skipped. While the
    /// store is degraded nothing is merged: anti-entropy offers the entries again later.
    pub fn apply_remote(&self, entries: Vec<StoreEntry>, from: &str, now: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        let core = &self.core;
        let mut inner = core.lock();
        if !inner.writable {
            tracing::debug!(peer = %from, "the store is degraded; {} entries left for a later anti-entropy round", entries.len());
            return changes;
        }
        let Ok(storage) = core.storage() else {
            return changes;
        };
        for entry in entries {
            if let Err(e) = merge::check_remote(&entry, now) {
                tracing::warn!(peer = %from, key = %entry.key.escape_debug(), "refused a store entry: {e}");
                continue;
            }
            if core.unconfirmed().contains_key(&entry.key) {
                // A local write of this key is being made durable: the node compares stores
                // with its peers once the write is done (`take_skipped_for_a_write`).
                core.skipped_for_a_write.store(true, Ordering::SeqCst);
                continue;
            }
            let old = match storage.get(&entry.key) {
                Ok(old) => old,
                Err(error) => {
                    core.fail(&mut inner, error, false);
                    break;
                }
            };
            let record = Record {
                ts: entry.ts,
                writer: entry.writer,
                value: entry.value.clone(),
            };
            if !merge::wins(&version(&record), old.as_ref().map(version).as_ref()) {
                continue;
            }
            core.unconfirmed().insert(entry.key.clone(), old.clone());
            if let Err(error) = storage.put(&entry.key, Some(&record)) {
                core.fail(&mut inner, error, false);
                break;
            }
            core.unconfirmed().remove(&entry.key);
            inner.written(&entry.key, old.as_ref(), &record);
            changes.push(Change { entry });
        }
        changes
    }

    /// Whether a peer's entry was skipped since the last call because a local write of its
    /// key was in flight (then it may be missing here until stores are compared).
    pub fn take_skipped_for_a_write(&self) -> bool {
        self.core.skipped_for_a_write.swap(false, Ordering::SeqCst)
    }

    /// Reports a failed read: the store may need reopening.
    fn read_failed(&self, error: &StorageError) {
        let mut inner = self.core.lock();
        // Reads fail while there is no instance: already known.
        if inner.problem.is_none() {
            self.core.fail(&mut inner, error.clone(), false);
        }
    }

    pub fn get(&self, key: &str) -> Result<Option<Record>, StorageError> {
        self.core.get(key).inspect_err(|e| self.read_failed(e))
    }

    /// Calls `visit` with each live entry (not deleted) whose key starts with `prefix` and
    /// comes after `after`, in key order, until it says `Break`.
    pub fn scan_live(
        &self,
        prefix: &str,
        after: Option<&str>,
        visit: impl FnMut(String, Record) -> ControlFlow<()>,
    ) -> Result<(), StorageError> {
        let storage = self.core.storage()?;
        scan_live(&storage, Some(&*self.core), prefix, after, visit)
            .inspect_err(|e| self.read_failed(e))
    }

    /// Live entries (not deleted) whose key starts with `prefix`, in key order.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, Record)>, StorageError> {
        let mut out = Vec::new();
        self.scan_live(prefix, None, |key, record| {
            out.push((key, record));
            ControlFlow::Continue(())
        })?;
        Ok(out)
    }

    /// The counters, the number of live keys and of tombstones, as `db.stats` shows them.
    pub fn stats_json(&self) -> serde_json::Value {
        let (keys, tombstones) = {
            let inner = self.core.lock();
            let all = inner.tree.key_count();
            (all - inner.tombstones.min(all), inner.tombstones)
        };
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "keys": keys,
            "tombstones": tombstones,
            "sync_bytes_sent": get(&self.stats.sync_bytes_sent),
            "push_bytes_sent": get(&self.stats.push_bytes_sent),
            "bytes_received": get(&self.stats.bytes_received),
            "sync_rounds": get(&self.stats.sync_rounds),
        })
    }

    /// The store's state, as `status` shows it.
    pub fn status(&self) -> StoreStatus {
        let inner = self.core.lock();
        let (state, problem, since) = match &inner.problem {
            None => (StoreState::Ok, None, None),
            Some(problem) => {
                // sled's sticky error can make reads of the instance at hand fail too.
                let reads = if self.core.storage().is_ok() {
                    "reads may fail"
                } else {
                    "reads fail too"
                };
                (
                    StoreState::Degraded,
                    Some(format!(
                        "{}; writes fail, {reads}, nothing is lost on the other devices; {}",
                        problem.error,
                        problem.error.advice()
                    )),
                    Some(humantime::format_rfc3339_seconds(problem.since).to_string()),
                )
            }
        };
        StoreStatus {
            path: self.core.state_dir.join(storage::DIR),
            state,
            problem,
            since,
            set_aside: inner.set_aside.clone(),
        }
    }

    pub fn top(&self) -> Vec<u64> {
        self.core.lock().tree.top()
    }

    pub fn buckets(&self, which: impl IntoIterator<Item = u8>) -> Vec<(u8, Vec<u64>)> {
        let inner = self.core.lock();
        which
            .into_iter()
            .map(|b| (b, inner.tree.bucket(b)))
            .collect()
    }

    pub fn leaf_digests(&self, bucket: u8) -> Vec<u64> {
        self.core.lock().tree.bucket(bucket)
    }

    /// The versions held in the given leaves.
    pub fn summaries(&self, leaves: &[u16]) -> Vec<StoreSummary> {
        let keys: Vec<String> = {
            let inner = self.core.lock();
            leaves
                .iter()
                .flat_map(|&leaf| inner.tree.keys(leaf).cloned().collect::<Vec<_>>())
                .collect()
        };
        keys.into_iter()
            .filter_map(|key| {
                let record = self.core.get(&key).ok()??;
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
                let record = self.core.get(key).ok()??;
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

/// The live entries of a scan, as reads show them (`core`: with unconfirmed writes hidden).
fn scan_live(
    storage: &Storage,
    core: Option<&Core>,
    prefix: &str,
    after: Option<&str>,
    mut visit: impl FnMut(String, Record) -> ControlFlow<()>,
) -> Result<(), StorageError> {
    for item in storage.scan(prefix, after) {
        let (key, stored) = item?;
        let record = match core {
            Some(core) => core.shown(&key, Some(stored)),
            None => Some(stored),
        };
        if let Some(record) = record.filter(|r| r.value.is_some())
            && visit(key, record).is_break()
        {
            break;
        }
    }
    Ok(())
}

/// The store opened by the CLI while the daemon does not run: reads only. It never moves a
/// damaged store aside (the daemon does that, and refills it); it says so.
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

    /// As `Store::scan_live`.
    pub fn scan_live(
        &self,
        prefix: &str,
        after: Option<&str>,
        visit: impl FnMut(String, Record) -> ControlFlow<()>,
    ) -> Result<(), StorageError> {
        scan_live(&self.storage, None, prefix, after, visit)
    }
}

/// A record as the API shows it; `names` maps writers' keys to device names. The value is in
/// `value` when it is text, else in `value_base64` (`api::Bytes`).
pub fn item(key: &str, record: &Record, names: &HashMap<KeyBytes, String>) -> StoreItem {
    let writer_key = PublicKey::from_bytes(record.writer);
    let writer_id = writer_key.device_id();
    let (value, value_base64) = match record.value.as_deref() {
        None => (None, None),
        Some(bytes) => cnsprcy::api::Bytes::encode(bytes),
    };
    StoreItem {
        key: key.to_owned(),
        value,
        value_base64,
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

    fn value_of(store: &Store, key: &str) -> Option<Vec<u8>> {
        store.get(key).unwrap().and_then(|r| r.value)
    }

    /// A value in a few characters, for assertions on values of a megabyte.
    fn brief(value: Option<Vec<u8>>) -> Option<(usize, String)> {
        value.map(|v| {
            (
                v.len(),
                String::from_utf8_lossy(&v[..v.len().min(8)]).into_owned(),
            )
        })
    }

    fn wait_until(mut ok: impl FnMut() -> bool) -> bool {
        (0..300).any(|_| {
            ok() || {
                std::thread::sleep(Duration::from_millis(100));
                false
            }
        })
    }

    /// On a full disk, a write fails and leaves no trace (not readable, not in the digest
    /// tree, so anti-entropy cannot offer it; the clock not moved); the store says it is
    /// degraded, refuses writes and remote entries, and recovers by itself once space returns.
    /// Twice: with small values, and with 1 MiB ones.
    #[test]
    fn a_failed_write_leaves_no_trace_and_the_store_recovers_when_space_returns() {
        storage::full_disk::in_small_tmpfs(
            "store::tests::a_failed_write_leaves_no_trace_and_the_store_recovers_when_space_returns",
            |dir| {
                let store = Store::open(dir, [1; 32]).unwrap();
                store.write_local("stay", Some(b"here".to_vec())).unwrap();
                for (round, size) in [(0, 3000), (1, 1024 * 1024)] {
                    let filler = storage::full_disk::fill(dir);
                    let mut last = value_of(&store, "k");
                    let mut failed = None;
                    for i in 0..200 {
                        let value = vec![b'a' + (i % 26) as u8; size];
                        let (top, stats) = (store.top(), store.stats_json());
                        let clock = store.core.lock().clock;
                        match store.write_local("k", Some(value.clone())) {
                            Ok(_) => last = Some(value),
                            Err(e) => {
                                failed = Some((e, value, top, stats, clock));
                                break;
                            }
                        }
                    }
                    let (error, value, top, stats, clock) =
                        failed.expect("a write failed on the full disk");
                    eprintln!("round {round}: {error}");
                    assert!(error.to_string().contains("No space left"), "{error}");
                    // No trace. Reads of sled's instance may fail with its sticky error
                    // until the store is reopened; whatever they show is the old value.
                    if let Ok(record) = store.get("k") {
                        assert_eq!(brief(record.and_then(|r| r.value)), brief(last.clone()));
                    }
                    if let Ok(listed) = store.list("") {
                        assert!(listed.iter().all(|(_, r)| r.value.as_ref() != Some(&value)));
                    }
                    assert_eq!(store.top(), top);
                    assert_eq!(store.stats_json(), stats);
                    assert_eq!(store.core.lock().clock, clock);
                    if let Ok(record) = store.get("stay") {
                        assert_eq!(record.and_then(|r| r.value).as_deref(), Some(&b"here"[..]));
                    }
                    // Degraded, and says why and what to do.
                    let status = store.status();
                    assert_eq!(status.state, StoreState::Degraded);
                    let problem = status.problem.unwrap();
                    assert!(
                        problem.contains("No space left") && problem.contains("free some space"),
                        "{problem}"
                    );
                    // Further writes fail, and so do remote entries, without a trace.
                    assert!(store.write_local("other", Some(b"x".to_vec())).is_err());
                    let remote = StoreEntry {
                        key: "remote".into(),
                        ts: StoreTimestamp {
                            ms: merge::now_ms(),
                            counter: 0,
                        },
                        writer: [2; 32],
                        value: Some(b"r".to_vec()),
                    };
                    assert!(
                        store
                            .apply_remote(vec![remote.clone()], "b", merge::now_ms())
                            .is_empty()
                    );
                    assert!(store.get("remote").is_err() || value_of(&store, "remote").is_none());
                    assert_eq!(store.top(), top);
                    // Space returns: the store recovers by itself, and takes writes again.
                    std::fs::remove_file(filler).unwrap();
                    assert!(
                        wait_until(|| store.status().state == StoreState::Ok),
                        "still degraded: {:?}",
                        store.status()
                    );
                    assert_eq!(brief(value_of(&store, "k")), brief(last));
                    let written = store.write_local("k", Some(b"after".to_vec())).unwrap();
                    assert!(written.ts > clock.last());
                    assert_eq!(
                        store.apply_remote(vec![remote], "b", merge::now_ms()).len(),
                        1
                    );
                    store.write_local("remote", None).unwrap();
                }
                // What is on disk agrees.
                let top = store.top();
                drop(store);
                let store = (0..100)
                    .find_map(|_| match Store::open(dir, [1; 32]) {
                        Err(StorageError::Locked { .. }) => {
                            std::thread::sleep(Duration::from_millis(50));
                            None
                        }
                        other => Some(other.unwrap()),
                    })
                    .unwrap();
                assert_eq!(store.status().state, StoreState::Ok);
                assert_eq!(value_of(&store, "k").as_deref(), Some(&b"after"[..]));
                assert_eq!(store.top(), top);
            },
        );
    }

    /// A store as the daemon leaves it (every write flushed, opened again once), with its
    /// `db` file cut to half its length.
    fn damaged_store(keys: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let record = Record {
            ts: StoreTimestamp { ms: 1, counter: 0 },
            writer: [2; 32],
            value: Some(vec![b'v'; 200]),
        };
        {
            let storage = Storage::open(dir.path()).unwrap();
            for i in 0..keys {
                storage.put(&format!("key{i:05}"), Some(&record)).unwrap();
                storage.flush().unwrap();
            }
        }
        let reopened = (0..100).find_map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            Storage::open(dir.path()).ok()
        });
        drop(reopened.expect("reopened"));
        std::thread::sleep(Duration::from_millis(200));
        let db = dir.path().join("store/db");
        let len = std::fs::metadata(&db).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&db)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        dir
    }

    /// sled panics (3000 keys) or reports corruption (1500 keys) on these; neither crashes.
    /// The daemon's store moves the damaged copy aside, starts empty and says so; the CLI's
    /// says it is damaged and moves nothing.
    #[test]
    fn a_damaged_store_is_set_aside_and_replaced_by_an_empty_one() {
        for keys in [1500, 3000] {
            let dir = damaged_store(keys);
            let error = OfflineStore::open(dir.path())
                .and_then(|s| {
                    s.unwrap()
                        .scan_live("", None, |_, _| ControlFlow::Continue(()))
                })
                .unwrap_err();
            assert!(
                matches!(error, StorageError::Damaged { .. }),
                "{keys}: {error:?}"
            );
            assert!(
                dir.path().join("store/db").exists(),
                "the CLI moved the store"
            );

            let store = Store::open(dir.path(), [1; 32]).unwrap();
            let status = store.status();
            assert_eq!(status.state, StoreState::Ok, "{status:?}");
            let aside = status.set_aside.expect("set aside");
            eprintln!("{keys} keys: {}", aside.reason);
            assert!(aside.path.join("db").exists());
            assert!(
                aside
                    .path
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("store.damaged-2")
            );
            assert!(
                aside.advice.contains("refills from the other devices"),
                "{}",
                aside.advice
            );
            assert!(store.list("").unwrap().is_empty());
            store.write_local("fresh", Some(b"start".to_vec())).unwrap();
            assert_eq!(value_of(&store, "fresh").as_deref(), Some(&b"start"[..]));
        }
    }

    #[test]
    fn stats_count_live_keys_and_tombstones_apart_and_deleting_nothing_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), [1; 32]).unwrap();
        for key in ["a", "b", "c", "d"] {
            store.write_local(key, Some(b"x".to_vec())).unwrap();
        }
        store.write_local("a", None).unwrap();
        store.write_local("b", None).unwrap();
        let top = store.top();
        for key in ["a", "never"] {
            assert!(matches!(
                store.write_local(key, None),
                Err(StoreError::NotFound(_))
            ));
        }
        assert_eq!(store.top(), top, "a refused deletion wrote nothing");
        let stats = store.stats_json();
        assert_eq!(
            (stats["keys"].as_u64(), stats["tombstones"].as_u64()),
            (Some(2), Some(2))
        );
        assert_eq!(store.list("").unwrap().len(), 2);
        // Set again: live again.
        store.write_local("a", Some(b"y".to_vec())).unwrap();
        assert_eq!(store.stats_json()["keys"], 3);
        assert_eq!(store.stats_json()["tombstones"], 1);
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
