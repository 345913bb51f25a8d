//! `inbox.log`: the messages recorded as delivered whose handler has not started yet.
//!
//! A message is acknowledged once recorded, so its origin never sends it again. Without the
//! inbox, a stop between the record and the handler's start (the handler service busy, or the
//! process killed) would lose the run for good. The entry is appended and synced before the
//! ack, and is itself the durable record of the delivery: the `delivered.log` record appended
//! with it is synced later (`persist.rs`). A second record marks the entry done when the handler
//! started. At the next start, what is not done runs.
//!
//! Records, appended:
//! - `E`, the length (u32, little-endian), the message (postcard): an entry.
//! - `D`, the 16-byte message id: the entry with that id is done.
//!
//! A record cut short at the end (a crash, a full disk) is dropped. The log is rewritten with
//! what is not done at every start, and when it has grown large and is mostly done records;
//! both only once `delivered.log` holds the IDs of the done entries durably.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use cnsprcy::wire::{Data, MessageId};

use crate::messaging::expires_ms;

const ENTRY: u8 = b'E';
const DONE: u8 = b'D';
/// The log is rewritten once it is at least this long and at least twice what is not done.
const COMPACT_BYTES: u64 = 4 << 20;

/// What [`Inbox::open`] found in the log.
pub struct Opened {
    pub inbox: Inbox,
    /// The entries not done, in the order they were appended.
    pub entries: Vec<Data>,
    /// Every message with an entry, done or not, and when it expires.
    pub recorded: Vec<(MessageId, u64)>,
}

pub struct Inbox {
    path: PathBuf,
    /// The length of the log's complete records. A failed append may leave more behind; that
    /// is cut off before the next one.
    len: u64,
    /// The entries not done, and their records' sizes.
    open: HashMap<MessageId, u64>,
    /// Appended since the last sync.
    unsynced: bool,
}

impl Inbox {
    /// Reads the log as it is (a missing one is empty). Appends go after its complete records;
    /// [`Inbox::compact`] drops its done entries.
    pub fn open(path: &Path) -> io::Result<Opened> {
        let read = read(path)?;
        let open = (read.entries.iter())
            .map(|d| (d.id, record_len(d)))
            .collect();
        Ok(Opened {
            inbox: Self {
                path: path.to_owned(),
                len: read.complete,
                open,
                unsynced: false,
            },
            entries: read.entries,
            recorded: read.recorded,
        })
    }

    /// Appends `data` as an entry. Durable after `sync`.
    pub fn add(&mut self, data: &Data) -> io::Result<()> {
        let record = entry_record(data)?;
        self.append(&record)?;
        self.open.insert(data.id, record.len() as u64);
        Ok(())
    }

    /// Marks the entry `id` done, if there is one. Not synced: a crash of the process keeps
    /// it (it is in the page cache); a power cut may lose it, and the handler runs again.
    pub fn done(&mut self, id: &MessageId) -> io::Result<()> {
        if self.open.remove(id).is_none() {
            return Ok(());
        }
        let mut record = Vec::with_capacity(17);
        record.push(DONE);
        record.extend_from_slice(id);
        self.append(&record)
    }

    /// Makes the entries added so far durable.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            File::open(&self.path)?.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }

    fn append(&mut self, record: &[u8]) -> io::Result<()> {
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)?;
        // What a failed append left (part of a record) would be read as the start of this one.
        if file.metadata()?.len() != self.len {
            file.set_len(self.len)?;
        }
        self.unsynced = true;
        match file.write_all(record) {
            Ok(()) => {
                self.len += record.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = file.set_len(self.len);
                Err(e)
            }
        }
    }

    /// The log has grown large, and is mostly done records.
    pub fn wants_compaction(&self) -> bool {
        let open_bytes: u64 = self.open.values().sum();
        self.len >= COMPACT_BYTES && self.len >= 2 * open_bytes
    }

    /// Replaces the log with its entries not done (synced). The done entries' IDs must be
    /// durable in `delivered.log` first: the log is their record until then.
    pub fn compact(&mut self) -> io::Result<()> {
        let entries = read(&self.path)?.entries;
        let mut bytes = Vec::new();
        self.open.clear();
        for data in &entries {
            let record = entry_record(data)?;
            self.open.insert(data.id, record.len() as u64);
            bytes.extend_from_slice(&record);
        }
        cnsprcy::fsutil::write_private(&self.path, &bytes)?;
        self.len = bytes.len() as u64;
        self.unsynced = false;
        Ok(())
    }
}

/// The length of `data`'s `E` record.
fn record_len(data: &Data) -> u64 {
    (5 + cnsprcy::wire::encoded_len(data)) as u64
}

/// The `E` record of `data`.
fn entry_record(data: &Data) -> io::Result<Vec<u8>> {
    let message = postcard::to_stdvec(data).map_err(io::Error::other)?;
    let len = u32::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "message too large"))?;
    let mut record = Vec::with_capacity(5 + message.len());
    record.push(ENTRY);
    record.extend_from_slice(&len.to_le_bytes());
    record.extend_from_slice(&message);
    Ok(record)
}

/// What the log holds.
struct Contents {
    /// The entries not done, in the order they were appended.
    entries: Vec<Data>,
    /// Every message with an entry, done or not, and when it expires.
    recorded: Vec<(MessageId, u64)>,
    /// The length of the complete records.
    complete: u64,
}

/// Reads the log at `path`. Reading stops at a record cut short or not understood (with a
/// warning).
fn read(path: &Path) -> io::Result<Contents> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut file) => {
            file.read_to_end(&mut bytes)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // In append order; a done entry leaves a hole.
    let mut entries: Vec<Option<Data>> = Vec::new();
    let mut at: HashMap<MessageId, usize> = HashMap::new();
    let mut recorded = Vec::new();
    let mut rest = bytes.as_slice();
    while let Some((&kind, after)) = rest.split_first() {
        match kind {
            ENTRY if after.len() >= 4 => {
                let (len, after) = after.split_at(4);
                let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
                if after.len() < len {
                    break;
                }
                let (message, after) = after.split_at(len);
                match postcard::from_bytes::<Data>(message) {
                    Ok(data) => {
                        recorded.push((data.id, expires_ms(&data)));
                        // The same message a second time (its first record failed): one entry.
                        if let Some(old) = at.insert(data.id, entries.len()) {
                            entries[old] = None;
                        }
                        entries.push(Some(data));
                    }
                    Err(e) => {
                        tracing::warn!(file = %path.display(), "skipping an unreadable inbox entry: {e}");
                    }
                }
                rest = after;
            }
            DONE if after.len() >= 16 => {
                let (id, after) = after.split_at(16);
                if let Some(old) = at.remove(id) {
                    entries[old] = None;
                }
                rest = after;
            }
            ENTRY | DONE => break,
            _ => {
                tracing::warn!(file = %path.display(), "the inbox has a damaged record; what follows it is dropped");
                break;
            }
        }
    }
    let complete = (bytes.len() - rest.len()) as u64;
    Ok(Contents {
        entries: entries.into_iter().flatten().collect(),
        recorded,
        complete,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: u8, payload_len: usize) -> Data {
        Data {
            id: [id; 16],
            origin: [1; 32],
            sent_ms: 1,
            ttl_ms: 60_000,
            tag: "t".into(),
            targets: vec![[7; 32]],
            want_reply: false,
            hops: 0,
            after: Vec::new(),
            payload: vec![id; payload_len].into(),
        }
    }

    fn ids(entries: &[Data]) -> Vec<u8> {
        entries.iter().map(|d| d.id[0]).collect()
    }

    fn open(path: &Path) -> (Inbox, Vec<Data>) {
        let opened = Inbox::open(path).unwrap();
        (opened.inbox, opened.entries)
    }

    #[test]
    fn what_is_not_done_comes_back_in_order_with_its_payload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inbox.log");
        let (mut inbox, entries) = open(&path);
        assert!(entries.is_empty());
        for id in 1..=4 {
            inbox.add(&message(id, 100)).unwrap();
        }
        inbox.done(&[2; 16]).unwrap();
        inbox.done(&[9; 16]).unwrap();
        inbox.sync().unwrap();
        drop(inbox);
        let opened = Inbox::open(&path).unwrap();
        assert_eq!(ids(&opened.entries), vec![1, 3, 4]);
        assert_eq!(opened.entries[1], message(3, 100));
        // The done entry is still on record, until a rewrite.
        let recorded: Vec<u8> = opened.recorded.iter().map(|(id, _)| id[0]).collect();
        assert_eq!(recorded, vec![1, 2, 3, 4]);
        assert_eq!(opened.recorded[0].1, expires_ms(&message(1, 100)));
        let mut inbox = opened.inbox;
        inbox.done(&[1; 16]).unwrap();
        inbox.done(&[3; 16]).unwrap();
        inbox.done(&[4; 16]).unwrap();
        inbox.compact().unwrap();
        let opened = Inbox::open(&path).unwrap();
        assert!(opened.entries.is_empty() && opened.recorded.is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn a_record_cut_short_is_dropped_and_the_next_append_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inbox.log");
        let (mut inbox, _) = open(&path);
        inbox.add(&message(1, 10)).unwrap();
        // What a short write on a full disk leaves: part of a record.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[ENTRY, 200, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(file);
        let (_, entries) = open(&path);
        assert_eq!(ids(&entries), vec![1]);
        // And within one life: the cut part is removed before the next append.
        let (mut inbox, _) = open(&path);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[DONE, 1, 1]).unwrap();
        drop(file);
        inbox.add(&message(2, 10)).unwrap();
        let (_, entries) = open(&path);
        assert_eq!(ids(&entries), vec![1, 2]);
    }

    #[test]
    fn a_large_log_of_done_entries_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inbox.log");
        let (mut inbox, _) = open(&path);
        inbox.add(&message(200, 10)).unwrap();
        for round in 0..6u8 {
            inbox.add(&message(round, 1 << 20)).unwrap();
            inbox.done(&[round; 16]).unwrap();
            if inbox.wants_compaction() {
                inbox.compact().unwrap();
            }
        }
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len < COMPACT_BYTES, "{len} bytes");
        // Mostly open entries: not worth a rewrite, however large.
        inbox.add(&message(201, 5 << 20)).unwrap();
        assert!(!inbox.wants_compaction());
        let (_, entries) = open(&path);
        assert_eq!(ids(&entries), vec![200, 201]);
    }
}
