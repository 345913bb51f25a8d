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

use cnsprcy::api::HandlerReply;
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
    /// The order messages were accepted in: copies go out in this order.
    pub seq: u64,
    pub data: Data,
    pub pending: Vec<KeyBytes>,
}

/// Messages the outbox holds at most (over all targets); a send beyond is refused.
pub const MAX_OUTBOX_MESSAGES: usize = 1000;
/// Payload bytes the outbox holds at most; a send beyond is refused. It is on disk (so it survives
/// a restart) and in memory (so it goes out at link speed once a target is back).
pub const MAX_OUTBOX_BYTES: usize = 256 * 1024 * 1024;

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
    #[error("cannot store the message: {0}")]
    Io(#[from] io::Error),
}

/// The origin's unacknowledged messages, one file each under `outbox/` in the state directory.
pub struct Outbox {
    dir: PathBuf,
    entries: HashMap<MessageId, Entry>,
    /// Entries by `seq`: the order they go out in.
    order: std::collections::BTreeMap<u64, MessageId>,
    next_seq: u64,
    /// Payload bytes held.
    bytes: usize,
    /// When each (message, target) was last queued for sending, to pace resends.
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
        let mut outbox = Self {
            dir,
            entries: HashMap::new(),
            order: Default::default(),
            next_seq: 0,
            bytes: 0,
            sent: HashMap::new(),
        };
        let now = now_ms();
        for file in fs::read_dir(&outbox.dir)? {
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
                // Kept even beyond the bounds (they apply to new messages): nothing is lost.
                Some(entry) if expires_ms(&entry.data) > now && !entry.pending.is_empty() => {
                    outbox.next_seq = outbox.next_seq.max(entry.seq + 1);
                    outbox.insert(entry);
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
        Ok(outbox)
    }

    fn insert(&mut self, entry: Entry) {
        self.bytes += entry.data.payload.len();
        self.order.insert(entry.seq, entry.data.id);
        self.entries.insert(entry.data.id, entry);
    }

    fn remove(&mut self, id: &MessageId) -> Option<Entry> {
        let entry = self.entries.remove(id)?;
        self.bytes -= entry.data.payload.len();
        self.order.remove(&entry.seq);
        self.sent.retain(|(i, _), _| i != id);
        let _ = fs::remove_file(self.path(id));
        Some(entry)
    }

    fn path(&self, id: &MessageId) -> PathBuf {
        self.dir.join(format!("{}.msg", id_text(id)))
    }

    fn save(&self, entry: &Entry) -> io::Result<()> {
        let bytes = postcard::to_stdvec(entry).map_err(io::Error::other)?;
        cnsprcy::fsutil::write_private(&self.path(&entry.data.id), &bytes)
    }

    /// Keeps `data` for `pending` until they acknowledge; durable when this returns. Refused
    /// when the outbox is at its bounds.
    pub fn add(&mut self, data: Data, pending: Vec<KeyBytes>) -> Result<(), OutboxError> {
        if self.entries.len() >= MAX_OUTBOX_MESSAGES
            || self.bytes + data.payload.len() > MAX_OUTBOX_BYTES
        {
            let mut waiting: HashMap<KeyBytes, usize> = HashMap::new();
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
        let entry = Entry {
            seq: self.next_seq,
            data,
            pending,
        };
        self.save(&entry)?;
        self.next_seq += 1;
        self.insert(entry);
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
            self.remove(id);
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
            .filter_map(|id| self.remove(&id).map(|entry| (id, entry.pending)))
            .collect()
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
    /// Those that replied; their replies, unless they went to `progress` already.
    pub replied: HashSet<KeyBytes>,
    pub replies: Vec<HandlerReply>,
    pub deadline: Instant,
    /// For a streaming `send`: each reply goes here as it arrives.
    pub progress: Option<tokio::sync::mpsc::UnboundedSender<HandlerReply>>,
}

impl Wait {
    pub fn complete(&self) -> bool {
        self.expected.iter().all(|k| self.replied.contains(k))
    }

    /// Takes `reply` from `from`, once per expected target.
    pub fn add(&mut self, from: KeyBytes, reply: HandlerReply) {
        if !self.expected.contains(&from) || !self.replied.insert(from) {
            return;
        }
        match &self.progress {
            // A client that went away no longer reads; the reply is then just dropped.
            Some(progress) => {
                let _ = progress.send(reply);
            }
            None => self.replies.push(reply),
        }
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
    fn outbox_survives_a_restart_until_acknowledged_or_expired() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::load(dir.path()).unwrap();
        outbox.add(data(1, 60_000), vec![[7; 32], [8; 32]]).unwrap();
        outbox.add(data(2, 1), vec![[7; 32]]).unwrap();
        outbox.acked(&[1; 16], &[7; 32]);
        std::thread::sleep(Duration::from_millis(5));
        let mut outbox = Outbox::load(dir.path()).unwrap();
        assert_eq!(outbox.len(), 1, "the expired message is gone");
        let now = Instant::now();
        let due = outbox.due(|_| true, now);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].1, vec![PublicKey::from_bytes([8; 32])]);
        assert_eq!(outbox.due(|_| true, now).len(), 1, "not queued: still due");
        queue_all(&mut outbox, &due, now);
        assert!(outbox.due(|_| true, now).is_empty(), "paced");
        assert_eq!(outbox.due(|_| true, now + RESEND_AFTER).len(), 1);
        outbox.reset_pacing(&[8; 32]);
        assert_eq!(outbox.due(|_| true, now).len(), 1);
        outbox.acked(&[1; 16], &[8; 32]);
        assert_eq!(Outbox::load(dir.path()).unwrap().len(), 0);
    }

    #[test]
    fn messages_go_out_in_the_order_they_were_sent_also_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::load(dir.path()).unwrap();
        // Random ids: the order must not come from them.
        let ids = [9u8, 3, 7, 1, 5];
        for id in ids {
            outbox.add(data(id, 60_000), vec![[7; 32]]).unwrap();
        }
        let order = |outbox: &Outbox| -> Vec<u8> {
            outbox
                .due(|_| true, Instant::now())
                .iter()
                .map(|(d, _)| d.id[0])
                .collect()
        };
        assert_eq!(order(&outbox), ids);
        let mut outbox = Outbox::load(dir.path()).unwrap();
        assert_eq!(order(&outbox), ids);
        outbox.add(data(2, 60_000), vec![[7; 32]]).unwrap();
        assert_eq!(order(&outbox), [9, 3, 7, 1, 5, 2]);
    }

    #[test]
    fn the_outbox_is_bounded_and_says_who_it_waits_for() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::load(dir.path()).unwrap();
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
        // Small messages still fit until the count bound... once room is made.
        outbox.acked(&[0; 16], &[7; 32]);
        outbox.add(data(201, 60_000), vec![[8; 32]]).unwrap();
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
