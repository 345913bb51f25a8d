//! The files that keep the core's state across restarts, and the writer that makes the core's
//! `Persist` outputs durable off the event loop.
//!
//! - `outbox/ID.msg`: one file per message some target has not acknowledged (postcard), as it
//!   was accepted; `outbox/ID.acked`: the 32-byte keys of the targets that acknowledged it
//!   since, appended and not synced (what a crash loses of them is sent again, and refused
//!   there as a repeat). A message's payload is written once, not again at every ack.
//! - `delivered.log`: records of 16-byte id and 8-byte forget-after time; rewritten without
//!   forgotten ids now and then.
//! - `inbox.log`: delivered messages whose handler has not started (`inbox.rs`).
//! - `roster.json`: the members (`roster.rs`).
//!
//! A delivery appends the message to `inbox.log` and its id to `delivered.log`. Only the inbox
//! is synced before the ack: its entry, done or not, is the durable record of the delivery
//! until `delivered.log` holds the id durably, which the inbox's rewrites wait for (at the
//! start, and when it has grown large). One sync per delivery where two would be needed, which
//! the ack waits for (the handler does not: `Input::Written`); `delivered.log` reaches the disk
//! with the kernel's writeback, or at its own rewrite.
//!
//! The writer runs on a thread of its own and takes the operations in the order the core gave
//! them. It syncs the inbox once per batch (group commit) and reports each operation with a
//! token when it is durable, so "recorded before acknowledged" holds without the event loop ever
//! waiting for a disk. A delivery is also reported as soon as it is written, before the sync,
//! so that its handler need not wait for the disk (`Input::Written`).

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use cnsprcy::wire::{KeyBytes, MessageId};
use tokio::sync::mpsc;

use crate::core::{Input, PersistOp, Token};
use crate::inbox::Inbox;
use crate::messaging::{Delivered, OutboxEntry, SEEN_MAX, expires_ms, id_text, now_ms};

const OUTBOX_DIR: &str = "outbox";
const ENTRY_EXT: &str = "msg";
const ACKED_EXT: &str = "acked";
/// Bytes per record in an `.acked` file: a target's key.
const ACKED_RECORD: usize = 32;
const DELIVERED_FILE: &str = "delivered.log";
const INBOX_FILE: &str = "inbox.log";
/// Bytes per record in `delivered.log`: the id and the forget-after time.
const RECORD: usize = 16 + 8;
/// `delivered.log` is rewritten without forgotten ids after this many appends.
const COMPACT_EVERY: usize = 10_000;

/// What was on disk at start.
pub struct Restored {
    pub outbox: Vec<OutboxEntry>,
    /// Oldest first.
    pub delivered: Vec<(MessageId, u64)>,
    /// Delivered messages whose handler had not started, oldest first.
    pub inbox: Vec<cnsprcy::wire::Data>,
}

/// The state directory's files, as the writer holds them.
pub struct Files {
    state_dir: PathBuf,
    outbox_dir: PathBuf,
    delivered: PathBuf,
    appended: usize,
    inbox: Inbox,
}

impl Files {
    /// Opens (creating what is missing) and reads what a previous run left. Unreadable outbox
    /// entries and half-written files are removed, with a warning.
    pub fn open(state_dir: &Path) -> io::Result<(Self, Restored)> {
        let outbox_dir = state_dir.join(OUTBOX_DIR);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&outbox_dir)?;
        let outbox = read_outbox(&outbox_dir)?;
        let delivered_path = state_dir.join(DELIVERED_FILE);
        let mut delivered = read_delivered(&delivered_path)?;
        let opened = Inbox::open(&state_dir.join(INBOX_FILE))?;
        let mut files = Self {
            state_dir: state_dir.to_owned(),
            outbox_dir,
            delivered: delivered_path,
            appended: 0,
            inbox: opened.inbox,
        };
        // What the inbox has on record and `delivered.log` lacks (its append had not reached
        // the disk at a power cut) goes there, before the inbox drops its done entries.
        let mut known: std::collections::HashSet<MessageId> =
            delivered.iter().map(|(id, _)| *id).collect();
        let now = now_ms();
        let missing: Vec<(MessageId, u64)> = (opened.recorded.into_iter())
            .filter(|(id, _)| known.insert(*id))
            .map(|(id, expires)| (id, Delivered::until_expiry(expires, now)))
            .collect();
        delivered.extend_from_slice(&missing);
        // Rewritten without what was forgotten, so the file does not grow without end. On a full
        // disk that waits for a later compaction: the file as it is serves, with what was
        // missing appended and synced.
        let recorded = files.rewrite_delivered(&delivered).or_else(|e| {
            tracing::warn!(file = %files.delivered.display(), "cannot rewrite the delivered messages ({e}); appending to the file as it is");
            files.append_delivered(&missing)?;
            files.sync_delivered()
        });
        match recorded {
            Ok(()) => {
                if let Err(e) = files.inbox.compact() {
                    tracing::warn!("cannot rewrite the inbox ({e}); appending to it as it is");
                }
            }
            Err(e) => {
                tracing::warn!(
                    "cannot record the inbox's messages as delivered ({e}); keeping the inbox as it is"
                );
            }
        }
        Ok((
            files,
            Restored {
                outbox,
                delivered,
                inbox: opened.entries,
            },
        ))
    }

    fn outbox_path(&self, id: &MessageId) -> PathBuf {
        outbox_file(&self.outbox_dir, &id_text(id), ENTRY_EXT)
    }

    fn acked_path(&self, id: &MessageId) -> PathBuf {
        outbox_file(&self.outbox_dir, &id_text(id), ACKED_EXT)
    }

    /// Carries out `op`. Appends to `delivered.log` are durable only after `sync`.
    fn apply(&mut self, op: &PersistOp) -> io::Result<()> {
        match op {
            PersistOp::OutboxSave(entry) => {
                let bytes = postcard::to_stdvec(entry.as_ref()).map_err(io::Error::other)?;
                cnsprcy::fsutil::write_private(&self.outbox_path(&entry.data.id), &bytes)
            }
            PersistOp::OutboxAcked { id, target } => {
                append_records(&self.acked_path(id), ACKED_RECORD, target)
            }
            // The entry first: an `.acked` file left alone by a crash is removed at the start.
            PersistOp::OutboxRemove(id) => {
                remove_if_there(&self.outbox_path(id))?;
                remove_if_there(&self.acked_path(id))
            }
            PersistOp::Delivered { data, until_ms } => {
                self.inbox.add(data)?;
                self.append_delivered(&[(data.id, *until_ms)])
            }
            PersistOp::InboxDone(id) => {
                self.inbox.done(id)?;
                if self.inbox.wants_compaction() {
                    // The done entries are the record of their delivery until this sync.
                    self.sync_delivered()?;
                    self.inbox.compact()?;
                }
                Ok(())
            }
            PersistOp::Roster(members) => {
                crate::roster::save(&self.state_dir, members).map_err(io::Error::other)
            }
        }
    }

    /// Appends `records` to `delivered.log`. Durable after `sync_delivered` or `compact`.
    fn append_delivered(&mut self, records: &[(MessageId, u64)]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(records.len() * RECORD);
        for (id, until_ms) in records {
            bytes.extend_from_slice(id);
            bytes.extend_from_slice(&until_ms.to_le_bytes());
        }
        append_records(&self.delivered, RECORD, &bytes)?;
        self.appended += records.len();
        Ok(())
    }

    fn sync_delivered(&self) -> io::Result<()> {
        match fs::File::open(&self.delivered) {
            Ok(file) => file.sync_data(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Makes the deliveries appended so far durable (their inbox entries); compacts
    /// `delivered.log` now and then.
    fn sync(&mut self) -> io::Result<()> {
        self.inbox.sync()?;
        if self.appended > COMPACT_EVERY {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrites `delivered.log` with the ids still to be remembered, at most `SEEN_MAX`.
    fn compact(&mut self) -> io::Result<()> {
        let records = read_delivered(&self.delivered)?;
        self.rewrite_delivered(&records)
    }

    /// Replaces `delivered.log` with the last `SEEN_MAX` of `records` (synced).
    fn rewrite_delivered(&mut self, records: &[(MessageId, u64)]) -> io::Result<()> {
        let keep = records.len().saturating_sub(SEEN_MAX);
        let mut out = Vec::with_capacity((records.len() - keep) * RECORD);
        for (id, until) in &records[keep..] {
            out.extend_from_slice(id);
            out.extend_from_slice(&until.to_le_bytes());
        }
        cnsprcy::fsutil::write_private(&self.delivered, &out)?;
        self.appended = 0;
        Ok(())
    }
}

/// Appends `bytes`, whole records of `record` bytes, to the file at `path` (created private).
fn append_records(path: &Path, record: usize, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    // A short write (a full disk: the part that fit in the last page went in) leaves part of
    // a record at the end. Drop it first, or this record and every one after it would be
    // read shifted.
    let len = file.metadata()?.len();
    let partial = len % record as u64;
    if partial != 0 {
        file.set_len(len - partial)?;
    }
    file.write_all(bytes)
}

fn remove_if_there(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// `outbox/ID.EXT`, for the message whose ID reads `id`.
fn outbox_file(outbox_dir: &Path, id: &str, ext: &str) -> PathBuf {
    outbox_dir.join(format!("{id}.{ext}"))
}

/// The outbox as it was left: each entry without the targets its `.acked` file names. Removes
/// what is of no use any more: half-written entries, unreadable ones (with a warning), entries
/// every target acknowledged or that expired, and `.acked` files without their entry.
fn read_outbox(outbox_dir: &Path) -> io::Result<Vec<OutboxEntry>> {
    let mut entries = Vec::new();
    let mut acked: std::collections::HashMap<String, Vec<KeyBytes>> = Default::default();
    for file in fs::read_dir(outbox_dir)? {
        let path = file?.path();
        let stem = (path.file_stem()).map_or_else(String::new, |s| s.to_string_lossy().into());
        match path.extension().and_then(|e| e.to_str()) {
            Some(ENTRY_EXT) => {
                let entry: Option<OutboxEntry> = fs::read(&path)
                    .ok()
                    .and_then(|bytes| postcard::from_bytes(&bytes).ok());
                match entry {
                    Some(entry) => entries.push(entry),
                    None => {
                        tracing::warn!(file = %path.display(), "unreadable outbox entry; removing it");
                        let _ = fs::remove_file(&path);
                    }
                }
            }
            Some(ACKED_EXT) => {
                // Unreadable: as if nobody had acknowledged; those targets refuse the copy.
                let bytes = fs::read(&path).unwrap_or_default();
                let keys = bytes.chunks_exact(ACKED_RECORD).map(|k| {
                    let mut key = [0u8; ACKED_RECORD];
                    key.copy_from_slice(k);
                    key
                });
                acked.entry(stem).or_default().extend(keys);
            }
            // A half-written entry from a crash: the complete one, if any, has the .msg name.
            _ => {
                let _ = fs::remove_file(&path);
            }
        }
    }
    let now = now_ms();
    let mut kept = Vec::with_capacity(entries.len());
    for mut entry in entries {
        let id = id_text(&entry.data.id);
        if let Some(keys) = acked.remove(&id) {
            entry.pending.retain(|k| !keys.contains(k));
        }
        if entry.pending.is_empty() || expires_ms(&entry.data) <= now {
            let _ = fs::remove_file(outbox_file(outbox_dir, &id, ENTRY_EXT));
            let _ = fs::remove_file(outbox_file(outbox_dir, &id, ACKED_EXT));
        } else {
            kept.push(entry);
        }
    }
    for orphan in acked.keys() {
        let _ = fs::remove_file(outbox_file(outbox_dir, orphan, ACKED_EXT));
    }
    Ok(kept)
}

/// The records of `delivered.log` still to be remembered, oldest first, each id once.
fn read_delivered(path: &Path) -> io::Result<Vec<(MessageId, u64)>> {
    let mut bytes = Vec::new();
    match fs::File::open(path) {
        Ok(mut file) => {
            file.read_to_end(&mut bytes)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let now = now_ms();
    let mut seen = std::collections::HashSet::new();
    let mut records = Vec::new();
    for record in bytes.chunks_exact(RECORD) {
        let mut id = [0u8; 16];
        id.copy_from_slice(&record[..16]);
        let mut until = [0u8; 8];
        until.copy_from_slice(&record[16..]);
        let until = u64::from_le_bytes(until);
        if until > now && seen.insert(id) {
            records.push((id, until));
        }
    }
    Ok(records)
}

/// An operation for the writer, and where to report it.
pub struct Job {
    pub op: PersistOp,
    pub token: Option<Token>,
}

/// Starts the writer thread. It reports every job with a token as `Input::Persisted`, and a
/// delivery written without error first as `Input::Written`; it ends when the sender is
/// dropped, after the jobs already given.
pub fn spawn_writer(
    mut files: Files,
    done: mpsc::UnboundedSender<Input>,
) -> io::Result<(mpsc::UnboundedSender<Job>, std::thread::JoinHandle<()>)> {
    let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
    let thread = std::thread::Builder::new()
        .name("cnsprcy-writer".into())
        .spawn(move || {
            let mut batch: Vec<Job> = Vec::new();
            while let Some(job) = rx.blocking_recv() {
                batch.push(job);
                while let Ok(job) = rx.try_recv() {
                    batch.push(job);
                }
                let last = last_writes(&batch);
                let mut results = Vec::new();
                let mut appended = false;
                for (at, job) in batch.drain(..).enumerate() {
                    if job.token.is_none() && superseded(&job.op, at, &last) {
                        continue;
                    }
                    appended |= matches!(job.op, PersistOp::Delivered { .. });
                    let result = files.apply(&job.op).map_err(|e| describe(&job.op, &e));
                    if let Err(e) = &result {
                        // The core logs a delivery's failure, saying what follows from it.
                        if !reported_to_core(&job) {
                            tracing::warn!("{e}");
                        }
                    } else if let (PersistOp::Delivered { .. }, Some(token)) = (&job.op, job.token)
                        && done.send(Input::Written { token }).is_err()
                    {
                        return;
                    }
                    results.push((job, result));
                }
                let synced = if appended {
                    files.sync().map_err(|e| {
                        let e = format!("cannot sync the delivered messages: {e}");
                        if !results.iter().any(|(job, _)| reported_to_core(job)) {
                            tracing::warn!("{e}");
                        }
                        e
                    })
                } else {
                    Ok(())
                };
                for (job, result) in results {
                    let Some(token) = job.token else { continue };
                    let result = match (&job.op, result) {
                        (PersistOp::Delivered { .. }, Ok(())) => synced.clone(),
                        (_, result) => result,
                    };
                    if done.send(Input::Persisted { token, result }).is_err() {
                        return;
                    }
                }
            }
        })?;
    Ok((jobs, thread))
}

/// Whether the core hears of this job's failure and logs it itself: a delivery, whose
/// warning says what happens next (the sender sends it again, or the run may repeat).
fn reported_to_core(job: &Job) -> bool {
    matches!(job.op, PersistOp::Delivered { .. }) && job.token.is_some()
}

/// A roster written again later in the same batch need not be written now, nor an outbox
/// message's acknowledgement when the message is removed later in it: a crash before the
/// later write leaves the earlier state on disk, which the later one only narrows (fewer
/// members to wait for, acks that came).
fn superseded(op: &PersistOp, at: usize, last: &LastWrites) -> bool {
    match op {
        PersistOp::Roster(_) => last.roster > Some(at),
        PersistOp::OutboxAcked { id, .. } => last.outbox_removed.get(id) > Some(&at),
        _ => false,
    }
}

/// Where in a batch the roster is written last, and each outbox entry removed.
#[derive(Default)]
struct LastWrites {
    roster: Option<usize>,
    outbox_removed: std::collections::HashMap<MessageId, usize>,
}

fn last_writes(batch: &[Job]) -> LastWrites {
    let mut last = LastWrites::default();
    for (at, job) in batch.iter().enumerate() {
        match &job.op {
            PersistOp::Roster(_) => last.roster = Some(at),
            PersistOp::OutboxRemove(id) => {
                last.outbox_removed.insert(*id, at);
            }
            _ => {}
        }
    }
    last
}

fn describe(op: &PersistOp, e: &io::Error) -> String {
    match op {
        PersistOp::OutboxSave(entry) => {
            format!("cannot store message {}: {e}", id_text(&entry.data.id))
        }
        PersistOp::OutboxAcked { id, .. } => format!(
            "cannot record an acknowledgement of message {} (after a restart it is sent there again, and refused as a repeat): {e}",
            id_text(id)
        ),
        PersistOp::OutboxRemove(id) => {
            format!("cannot remove message {} from the outbox: {e}", id_text(id))
        }
        PersistOp::Delivered { .. } => format!("cannot record a delivered message: {e}"),
        PersistOp::InboxDone(id) => {
            format!(
                "cannot mark message {}'s handler as started: {e}",
                id_text(id)
            )
        }
        PersistOp::Roster(_) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnsprcy::wire::Data;

    fn entry(id: u8, seq: u64) -> OutboxEntry {
        OutboxEntry {
            seq,
            data: Data {
                id: [id; 16],
                origin: [0; 32],
                sent_ms: now_ms(),
                ttl_ms: 60_000,
                tag: "t".into(),
                targets: vec![[7; 32]],
                want_reply: false,
                hops: 0,
                after: Vec::new(),
                payload: vec![1, 2, 3].into(),
            },
            pending: vec![[7; 32]],
        }
    }

    fn delivered(id: u8, until_ms: u64) -> PersistOp {
        PersistOp::Delivered {
            data: Box::new(entry(id, 0).data),
            until_ms,
        }
    }

    #[test]
    fn the_files_keep_the_outbox_and_the_delivered_ids() {
        let dir = tempfile::tempdir().unwrap();
        let (mut files, restored) = Files::open(dir.path()).unwrap();
        assert!(restored.outbox.is_empty() && restored.delivered.is_empty());
        files
            .apply(&PersistOp::OutboxSave(Box::new(entry(1, 0))))
            .unwrap();
        files
            .apply(&PersistOp::OutboxSave(Box::new(entry(2, 1))))
            .unwrap();
        files.apply(&PersistOp::OutboxRemove([1; 16])).unwrap();
        files.apply(&PersistOp::OutboxRemove([9; 16])).unwrap();
        let later = now_ms() + 60_000;
        for id in [3u8, 4, 3] {
            files.apply(&delivered(id, later)).unwrap();
        }
        files.sync().unwrap();
        // A record whose time is up is forgotten.
        files.append_delivered(&[([5; 16], 1)]).unwrap();
        fs::write(dir.path().join("outbox/.half.msg.new"), b"x").unwrap();
        fs::write(dir.path().join("outbox/bad.msg"), b"x").unwrap();
        let (_, restored) = Files::open(dir.path()).unwrap();
        assert_eq!(restored.outbox.len(), 1);
        assert_eq!(restored.outbox[0].data.id, [2; 16]);
        assert_eq!(restored.delivered, vec![([3; 16], later), ([4; 16], later)]);
        assert_eq!(fs::read_dir(dir.path().join("outbox")).unwrap().count(), 1);
    }

    /// Acknowledgements are appended next to the entry, which is not written again; a start
    /// reads them back, and cleans up what is of no use.
    #[test]
    fn acknowledgements_narrow_the_entry_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = dir.path().join("outbox");
        let (mut files, _) = Files::open(dir.path()).unwrap();
        let targets = vec![[7; 32], [8; 32], [9; 32]];
        let mut three = entry(1, 0);
        three.pending = targets.clone();
        files
            .apply(&PersistOp::OutboxSave(Box::new(three)))
            .unwrap();
        let written = fs::read(outbox.join(format!("{}.msg", id_text(&[1; 16])))).unwrap();
        let acked = |target| PersistOp::OutboxAcked {
            id: [1; 16],
            target,
        };
        files.apply(&acked([7; 32])).unwrap();
        // A short write at a full disk left part of a record; the next append drops it.
        let acked_file = outbox.join(format!("{}.acked", id_text(&[1; 16])));
        let mut file = OpenOptions::new().append(true).open(&acked_file).unwrap();
        file.write_all(&[9; 5]).unwrap();
        files.apply(&acked([9; 32])).unwrap();
        assert_eq!(
            fs::read(outbox.join(format!("{}.msg", id_text(&[1; 16])))).unwrap(),
            written,
            "the entry is not rewritten"
        );
        // Every target acknowledged; the removal did not happen (a crash).
        let mut two = entry(2, 1);
        two.pending = vec![[7; 32]];
        files.apply(&PersistOp::OutboxSave(Box::new(two))).unwrap();
        files
            .apply(&PersistOp::OutboxAcked {
                id: [2; 16],
                target: [7; 32],
            })
            .unwrap();
        // An acknowledgement file whose entry was removed (a crash in between).
        fs::write(outbox.join(format!("{}.acked", id_text(&[3; 16]))), [7; 32]).unwrap();
        let (mut files, restored) = Files::open(dir.path()).unwrap();
        assert_eq!(restored.outbox.len(), 1);
        assert_eq!(restored.outbox[0].data.id, [1; 16]);
        assert_eq!(restored.outbox[0].pending, vec![[8; 32]]);
        let mut left: Vec<String> = (fs::read_dir(&outbox).unwrap())
            .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let one = id_text(&[1; 16]);
        assert_eq!(left, vec![format!("{one}.acked"), format!("{one}.msg")]);
        files.apply(&PersistOp::OutboxRemove([1; 16])).unwrap();
        assert_eq!(fs::read_dir(&outbox).unwrap().count(), 0);
    }

    /// Records messages 1 and 2 as delivered in `dir`, and 1's handler as started; returns
    /// until when they are to be remembered.
    fn one_started_one_waiting(dir: &Path) -> u64 {
        let (mut files, _) = Files::open(dir).unwrap();
        let later = now_ms() + 60_000;
        for id in [1u8, 2] {
            files.apply(&delivered(id, later)).unwrap();
        }
        files.apply(&PersistOp::InboxDone([1; 16])).unwrap();
        files.sync().unwrap();
        later
    }

    /// A message recorded as delivered stays at hand until its handler started.
    #[test]
    fn a_delivered_message_is_kept_until_its_handler_started() {
        let dir = tempfile::tempdir().unwrap();
        one_started_one_waiting(dir.path());
        let (_, restored) = Files::open(dir.path()).unwrap();
        assert_eq!(restored.delivered.len(), 2);
        let kept: Vec<_> = restored
            .inbox
            .iter()
            .map(|d| (d.id, &d.payload[..]))
            .collect();
        assert_eq!(kept, [([2; 16], &[1u8, 2, 3][..])]);
    }

    /// Only the inbox is synced before the ack. A power cut that loses the `delivered.log`
    /// append loses no record: the inbox's entry, done or not, puts it back at the start, and
    /// it is in `delivered.log` before the inbox is rewritten without the done entry.
    #[test]
    fn the_inbox_entry_is_the_record_until_delivered_log_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let later = one_started_one_waiting(dir.path());
        // The power cut: the unsynced appends to delivered.log did not reach the disk.
        fs::write(dir.path().join(DELIVERED_FILE), b"").unwrap();
        let (_, restored) = Files::open(dir.path()).unwrap();
        let mut ids: Vec<u8> = restored.delivered.iter().map(|(id, _)| id[0]).collect();
        ids.sort();
        assert_eq!(ids, vec![1, 2]);
        assert!(restored.delivered.iter().all(|(_, until)| *until > later));
        assert_eq!(restored.inbox.len(), 1);
        // The done entry left the inbox at that start; its id is in delivered.log now.
        let inbox = Inbox::open(&dir.path().join(INBOX_FILE)).unwrap();
        assert_eq!(inbox.recorded.len(), 1);
        let (_, restored) = Files::open(dir.path()).unwrap();
        assert_eq!(restored.delivered.len(), 2);
    }

    /// The chaos test found `delivered.log` at a length that is not a whole number of records
    /// after its disk had been full: an append that failed half way. What is appended later
    /// is still read back.
    #[test]
    fn an_append_after_a_short_write_is_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mut files, _) = Files::open(dir.path()).unwrap();
        let later = now_ms() + 60_000;
        let record = |id: u8| delivered(id, later);
        files.apply(&record(1)).unwrap();
        // What a write that ran out of space after 10 bytes leaves behind.
        let mut file = OpenOptions::new()
            .append(true)
            .open(dir.path().join(DELIVERED_FILE))
            .unwrap();
        file.write_all(&[2; 10]).unwrap();
        files.apply(&record(2)).unwrap();
        files.apply(&record(3)).unwrap();
        files.sync().unwrap();
        let (_, restored) = Files::open(dir.path()).unwrap();
        assert_eq!(
            restored.delivered,
            vec![([1; 16], later), ([2; 16], later), ([3; 16], later)]
        );
    }

    /// A roster written again later in a batch is not written before, nor the acks of an
    /// outbox entry removed later in it; a job with a token always is.
    #[test]
    fn a_write_superseded_later_in_the_batch_is_left_out() {
        let acked = |id, key| PersistOp::OutboxAcked {
            id: [id; 16],
            target: [key; 32],
        };
        let job = |op, token| Job { op, token };
        let batch = vec![
            job(acked(1, 7), None),
            job(acked(2, 7), None),
            job(acked(1, 8), None),
            job(PersistOp::Roster(Vec::new()), None),
            job(PersistOp::OutboxSave(Box::new(entry(3, 2))), Some(7)),
            job(PersistOp::OutboxRemove([2; 16]), None),
            job(PersistOp::Roster(Vec::new()), None),
            job(delivered(4, 0), Some(8)),
            job(PersistOp::OutboxRemove([3; 16]), None),
            job(acked(2, 8), None),
        ];
        let last = last_writes(&batch);
        let left_out: Vec<usize> = (batch.iter().enumerate())
            .filter(|(at, j)| j.token.is_none() && superseded(&j.op, *at, &last))
            .map(|(at, _)| at)
            .collect();
        assert_eq!(left_out, vec![1, 3]);
    }

    /// Every job with a token is reported once durable, in order; a delivery also once written,
    /// before that.
    #[tokio::test]
    async fn the_writer_reports_each_job_with_a_token_once_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = Files::open(dir.path()).unwrap();
        let (done_tx, mut done) = mpsc::unbounded_channel();
        let (jobs, thread) = spawn_writer(files, done_tx).unwrap();
        for i in 0..100u8 {
            jobs.send(Job {
                op: delivered(i, now_ms() + 60_000),
                token: Some(u64::from(i)),
            })
            .unwrap();
        }
        let saved = Job {
            op: PersistOp::OutboxSave(Box::new(entry(200, 0))),
            token: Some(100),
        };
        jobs.send(saved).unwrap();
        let (mut written, mut persisted) = (Vec::new(), Vec::new());
        while persisted.len() < 101 {
            match done.recv().await.unwrap() {
                Input::Written { token } => {
                    assert!(
                        !persisted.contains(&token),
                        "{token} written after persisted"
                    );
                    written.push(token);
                }
                Input::Persisted { token, result } => {
                    assert_eq!(result, Ok(()));
                    persisted.push(token);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(written, (0..100).collect::<Vec<_>>());
        assert_eq!(persisted, (0..101).collect::<Vec<_>>());
        drop(jobs);
        thread.join().unwrap();
        let (_, restored) = Files::open(dir.path()).unwrap();
        assert_eq!(restored.delivered.len(), 100);
    }
}
