//! The bookkeeping behind tagged messages: the origin's outbox (kept on disk until every target
//! acknowledged or the TTL ran out), the recipients' record of messages already delivered (so a
//! handler runs at most once per message, also across restarts), and the origin's waits for
//! replies.
//!
//! Delivery is at least once on the wire (the origin resends until acknowledged) and at most once
//! to the handler (the recipient records the id durably before running the handler).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cnsprcy::identity::PublicKey;
use cnsprcy::wire::{Data, KeyBytes, MessageId};
use serde::{Deserialize, Serialize};

const OUTBOX_DIR: &str = "outbox";
const SEEN_FILE: &str = "delivered.log";
/// Delivered ids are remembered at least this long, and longer for messages with a longer TTL.
const SEEN_MIN: Duration = Duration::from_secs(3600);
/// The most ids remembered; beyond, the oldest are forgotten first.
const SEEN_MAX: usize = 200_000;
/// A target that has not acknowledged is sent the message again after this long.
pub const RESEND_AFTER: Duration = Duration::from_secs(30);

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

/// A message the origin still owes to some targets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub data: Data,
    pub pending: Vec<KeyBytes>,
}

/// The origin's unacknowledged messages, one file each under `outbox/` in the state directory.
pub struct Outbox {
    dir: PathBuf,
    entries: HashMap<MessageId, Entry>,
    /// When each (message, target) was last sent, to pace resends.
    sent: HashMap<(MessageId, KeyBytes), Instant>,
}

impl Outbox {
    /// Loads the outbox, dropping entries that expired while the daemon was down.
    pub fn load(state_dir: &Path) -> io::Result<Self> {
        let dir = state_dir.join(OUTBOX_DIR);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let mut entries = HashMap::new();
        let now = now_ms();
        for file in fs::read_dir(&dir)? {
            let path = file?.path();
            // A half-written entry from a crash: the complete one, if any, has the .msg name.
            if path.extension().is_none_or(|e| e != "msg") {
                let _ = fs::remove_file(&path);
                continue;
            }
            let entry: Option<Entry> = fs::read(&path)
                .ok()
                .and_then(|bytes| postcard::from_bytes(&bytes).ok());
            match entry {
                Some(entry) if expires_ms(&entry.data) > now && !entry.pending.is_empty() => {
                    entries.insert(entry.data.id, entry);
                }
                Some(_) => {
                    let _ = fs::remove_file(&path);
                }
                None => {
                    tracing::warn!(file = %path.display(), "unreadable outbox entry; removing it");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        Ok(Self {
            dir,
            entries,
            sent: HashMap::new(),
        })
    }

    fn path(&self, id: &MessageId) -> PathBuf {
        self.dir.join(format!("{}.msg", id_text(id)))
    }

    fn save(&self, entry: &Entry) -> io::Result<()> {
        let bytes = postcard::to_stdvec(entry).map_err(io::Error::other)?;
        cnsprcy::fsutil::write_private(&self.path(&entry.data.id), &bytes)
    }

    /// Keeps `data` for `pending` until they acknowledge; durable when this returns.
    pub fn add(&mut self, data: Data, pending: Vec<KeyBytes>) -> io::Result<()> {
        let entry = Entry { data, pending };
        self.save(&entry)?;
        self.entries.insert(entry.data.id, entry);
        Ok(())
    }

    /// `from` acknowledged `id`.
    pub fn acked(&mut self, id: &MessageId, from: &KeyBytes) {
        let Some(entry) = self.entries.get_mut(id) else {
            return;
        };
        entry.pending.retain(|k| k != from);
        self.sent.remove(&(*id, *from));
        if entry.pending.is_empty() {
            self.entries.remove(id);
            let _ = fs::remove_file(self.path(id));
        } else {
            let entry = entry.clone();
            if let Err(e) = self.save(&entry) {
                tracing::warn!("cannot update the outbox: {e}");
            }
        }
    }

    /// Forgets a target that left the roster.
    pub fn forget_target(&mut self, key: &KeyBytes) {
        let ids: Vec<MessageId> = self
            .entries
            .iter()
            .filter(|(_, e)| e.pending.contains(key))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.acked(&id, key);
        }
    }

    /// Drops expired messages; returns (id, targets that never got it) for each.
    pub fn expire(&mut self, now_ms: u64) -> Vec<(MessageId, Vec<KeyBytes>)> {
        let expired: Vec<MessageId> = self
            .entries
            .values()
            .filter(|e| expires_ms(&e.data) <= now_ms)
            .map(|e| e.data.id)
            .collect();
        expired
            .into_iter()
            .filter_map(|id| {
                let entry = self.entries.remove(&id)?;
                let _ = fs::remove_file(self.path(&id));
                self.sent.retain(|(i, _), _| *i != id);
                Some((id, entry.pending))
            })
            .collect()
    }

    /// For each message with targets in `reachable` that are due a (re)send: the message and
    /// those targets. Marks them sent now.
    pub fn due(
        &mut self,
        reachable: impl Fn(&KeyBytes) -> bool,
        now: Instant,
    ) -> Vec<(Data, Vec<PublicKey>)> {
        let mut out: Vec<(Data, Vec<PublicKey>)> = Vec::new();
        for entry in self.entries.values() {
            let targets: Vec<KeyBytes> = entry
                .pending
                .iter()
                .filter(|k| reachable(k))
                .filter(|k| {
                    self.sent
                        .get(&(entry.data.id, **k))
                        .is_none_or(|at| now.duration_since(*at) >= RESEND_AFTER)
                })
                .copied()
                .collect();
            if !targets.is_empty() {
                out.push((
                    entry.data.clone(),
                    targets.iter().map(|k| PublicKey::from_bytes(*k)).collect(),
                ));
            }
        }
        for (data, targets) in &out {
            for key in targets {
                self.sent.insert((data.id, *key.as_bytes()), now);
            }
        }
        out
    }

    /// Makes every pending target due at once (it just became reachable).
    pub fn reset_pacing(&mut self, key: &KeyBytes) {
        self.sent.retain(|(_, k), _| k != key);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Ids of messages this device delivered to its handler, with when they may be forgotten;
/// appended to `delivered.log` before the handler runs.
pub struct Delivered {
    path: PathBuf,
    ids: HashMap<MessageId, u64>,
    order: VecDeque<MessageId>,
    /// Records appended since the file was last compacted.
    appended: usize,
}

/// `delivered.log` is rewritten without forgotten ids after this many appends.
const COMPACT_EVERY: usize = 10_000;

/// Bytes per record in `delivered.log`: the id and the forget-after time.
const RECORD: usize = 16 + 8;

impl Delivered {
    pub fn load(state_dir: &Path) -> io::Result<Self> {
        let path = state_dir.join(SEEN_FILE);
        let mut bytes = Vec::new();
        match fs::File::open(&path) {
            Ok(mut file) => {
                file.read_to_end(&mut bytes)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let now = now_ms();
        let mut delivered = Self {
            path,
            ids: HashMap::new(),
            order: VecDeque::new(),
            appended: 0,
        };
        for record in bytes.chunks_exact(RECORD) {
            let mut id = [0u8; 16];
            id.copy_from_slice(&record[..16]);
            let mut until = [0u8; 8];
            until.copy_from_slice(&record[16..]);
            let until = u64::from_le_bytes(until);
            if until > now && delivered.ids.insert(id, until).is_none() {
                delivered.order.push_back(id);
            }
        }
        // Rewrite without what expired, so the file does not grow without end.
        delivered.compact()?;
        Ok(delivered)
    }

    fn compact(&self) -> io::Result<()> {
        let mut out = Vec::with_capacity(self.order.len() * RECORD);
        for id in &self.order {
            if let Some(until) = self.ids.get(id) {
                out.extend_from_slice(id);
                out.extend_from_slice(&until.to_le_bytes());
            }
        }
        cnsprcy::fsutil::write_private(&self.path, &out)
    }

    pub fn contains(&self, id: &MessageId) -> bool {
        self.ids.contains_key(id)
    }

    /// Records `id` durably; returns false if it was already there.
    pub fn insert(&mut self, data: &Data) -> io::Result<bool> {
        if self.contains(&data.id) {
            return Ok(false);
        }
        let until = expires_ms(data).max(now_ms() + SEEN_MIN.as_millis() as u64);
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)?;
        let mut record = Vec::with_capacity(RECORD);
        record.extend_from_slice(&data.id);
        record.extend_from_slice(&until.to_le_bytes());
        file.write_all(&record)?;
        file.sync_data()?;
        self.ids.insert(data.id, until);
        self.order.push_back(data.id);
        while self.order.len() > SEEN_MAX {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        // The file only grows between compactions; keep it near what is remembered.
        self.appended += 1;
        if self.appended > COMPACT_EVERY {
            self.appended = 0;
            self.compact()?;
        }
        Ok(true)
    }
}

/// An origin waiting for its targets' handlers to finish.
pub struct Wait {
    pub tag: String,
    pub expected: HashSet<KeyBytes>,
    pub replies: Vec<(KeyBytes, String)>,
    pub deadline: Instant,
}

impl Wait {
    pub fn complete(&self) -> bool {
        self.expected
            .iter()
            .all(|k| self.replies.iter().any(|(from, _)| from == k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(id: u8, ttl_ms: u64) -> Data {
        Data {
            id: [id; 16],
            origin: [0; 32],
            sent_ms: now_ms(),
            ttl_ms,
            tag: "t".into(),
            targets: vec![],
            want_reply: false,
            hops: 0,
            payload: vec![1, 2, 3],
        }
    }

    #[test]
    fn outbox_survives_a_restart_until_acknowledged_or_expired() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::load(dir.path()).unwrap();
        outbox.add(data(1, 60_000), vec![[7; 32], [8; 32]]).unwrap();
        outbox.add(data(2, 1), vec![[7; 32]]).unwrap();
        outbox.acked(&[1; 16], &[7; 32]);
        std::thread::sleep(Duration::from_millis(5));
        let mut outbox = Outbox::load(dir.path()).unwrap();
        assert_eq!(outbox.len(), 1, "the expired message is gone");
        let due = outbox.due(|_| true, Instant::now());
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].1, vec![PublicKey::from_bytes([8; 32])]);
        assert!(outbox.due(|_| true, Instant::now()).is_empty(), "paced");
        outbox.reset_pacing(&[8; 32]);
        assert_eq!(outbox.due(|_| true, Instant::now()).len(), 1);
        outbox.acked(&[1; 16], &[8; 32]);
        assert_eq!(Outbox::load(dir.path()).unwrap().len(), 0);
    }

    #[test]
    fn delivered_ids_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut delivered = Delivered::load(dir.path()).unwrap();
        assert!(delivered.insert(&data(1, 1000)).unwrap());
        assert!(!delivered.insert(&data(1, 1000)).unwrap());
        let delivered = Delivered::load(dir.path()).unwrap();
        assert!(delivered.contains(&[1; 16]));
        assert!(!delivered.contains(&[2; 16]));
    }
}
