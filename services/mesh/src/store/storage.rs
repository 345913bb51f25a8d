//! The storage engine, and the only file that knows it is sled: a durable, ordered map from key
//! to record. Swapping the engine means rewriting this file.
//!
//! sled 0.34 has failure modes that this file works around (`docs/store.md` describes them; the
//! tests below show them):
//!
//! - **It panics on some damaged files** (`index out of bounds` while opening a store whose `db`
//!   was truncated). Every call into sled runs under `catch_unwind`, and a panic becomes
//!   [`StorageError::Damaged`].
//! - **A failed write poisons the instance.** After an I/O error (a full disk) sled keeps a
//!   global error: every later insert and flush fails, even once space is back, its
//!   in-memory tree may still show the write that failed, and reads may fail too. Only a new instance (dropping this
//!   one and opening the files again) reads what is on disk and writes again. The caller
//!   (`Store`) does that.
//! - **A failed blob write wedges it.** sled writes an item larger than a quarter of its 512 KiB
//!   segment to a file of its own; when that write fails, a log buffer is left claimed for ever,
//!   and every later flush (and dropping the instance, which flushes) waits for ever. So no
//!   record is given to sled in one piece larger than [`INLINE_BYTES`]: larger ones are cut into
//!   chunks stored under internal keys, written in one atomic batch. And a flush that does not
//!   return within [`FLUSH_TIMEOUT`] is reported as a failure instead of blocking the daemon.

use std::cell::{Cell, RefCell};
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;

use cnsprcy::wire::{KeyBytes, StoreTimestamp};
use serde::{Deserialize, Serialize};

/// The store's directory inside the state directory.
pub const DIR: &str = "store";
/// The first byte of a record stored in one piece: `[1] + postcard(Record)`.
const RECORD_WHOLE: u8 = 1;
/// The first byte of a record stored in chunks: `[2] + chunk count (u32 BE) + byte count (u32
/// BE)`; the chunks of `postcard(Record)` are under `chunk_key(key, i)`.
const RECORD_CHUNKED: u8 = 2;
/// The largest piece handed to sled. A sled leaf node holds up to 17 items and is written as a
/// blob (see above) when it serializes to more than about 128 KiB: 17 × (a 1 KiB key + 4 KiB)
/// stays well below.
pub const INLINE_BYTES: usize = 4096;
/// User keys never contain control characters, so keys starting with NUL are free for the
/// store's own use: chunks (`\0c` + key + `\0` + index) and the health probe.
const INTERNAL: u8 = 0;
const PROBE_KEY: &[u8] = b"\0probe";
/// How long a flush may take before the instance is taken for wedged.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

/// What is stored for a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub ts: StoreTimestamp,
    pub writer: KeyBytes,
    /// `None`: deleted (a tombstone).
    pub value: Option<Vec<u8>>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error(
        "the store {path} is in use by another process (is the daemon running? `cnspr status`)"
    )]
    Locked { path: PathBuf },
    /// The files cannot be read as a store: sled panicked or reported corruption.
    #[error("the store {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("the store {path}: {error}")]
    Engine {
        path: PathBuf,
        error: String,
        /// The I/O error's kind, when there was one (`StorageFull` for a full disk).
        kind: Option<io::ErrorKind>,
    },
}

impl StorageError {
    /// What the user can do about it, in words.
    pub fn advice(&self) -> String {
        match self {
            StorageError::Locked { .. } => {
                "stop the other process that has the store open".to_owned()
            }
            StorageError::Damaged { .. } => {
                "the daemon sets the damaged copy aside and refills the store from the other devices"
                    .to_owned()
            }
            StorageError::Engine {
                kind: Some(io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded),
                path,
                ..
            } => format!(
                "free some space on the disk that holds {}; the store recovers by itself within seconds",
                path.display()
            ),
            StorageError::Engine { path, .. } => format!(
                "check the disk that holds {} (the log has details); the store retries by itself",
                path.display()
            ),
        }
    }
}

pub struct Storage {
    db: sled::Db,
    path: PathBuf,
}

impl Storage {
    /// Opens (or creates) the store in `state_dir/store`, private to this user.
    pub fn open(state_dir: &Path) -> Result<Self, StorageError> {
        let path = state_dir.join(DIR);
        let engine = |error: io::Error| StorageError::Engine {
            path: path.clone(),
            error: error.to_string(),
            kind: Some(error.kind()),
        };
        make_private(&path, true).map_err(engine)?;
        let opened = guarded(|| {
            sled::Config::new()
                .path(&path)
                // A personal store is small. No periodic flusher: local writes flush themselves
                // before they return, merged remote writes come again by anti-entropy if lost,
                // and a timer thread would wake an idle laptop for nothing.
                .cache_capacity(8 * 1024 * 1024)
                .flush_every_ms(None)
                .open()
        });
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => return Err(classify(&path, e)),
            Err(panic) => {
                return Err(StorageError::Damaged {
                    path,
                    reason: format!("the storage engine failed while opening it ({panic})"),
                });
            }
        };
        // The files sled created are inside a directory only this user can enter; make them
        // private too, so the store stays private when copied or moved aside.
        make_private(&path, false).map_err(engine)?;
        Ok(Self { db, path })
    }

    /// Whether a store exists in `state_dir` (without creating one).
    pub fn exists(state_dir: &Path) -> bool {
        state_dir.join(DIR).join("db").exists()
    }

    fn error(&self, e: sled::Error) -> StorageError {
        classify(&self.path, e)
    }

    fn panicked(&self, what: &str, panic: String) -> StorageError {
        StorageError::Damaged {
            path: self.path.clone(),
            reason: format!("the storage engine failed while {what} ({panic})"),
        }
    }

    /// Runs one call into sled, turning a panic into an error.
    fn call<T>(&self, what: &str, f: impl FnOnce() -> sled::Result<T>) -> Result<T, StorageError> {
        match guarded(f) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.error(e)),
            Err(panic) => Err(self.panicked(what, panic)),
        }
    }

    /// Decodes a stored record; a damaged one is logged and skipped.
    fn decode(&self, key: &[u8], bytes: &[u8]) -> Result<Option<Record>, StorageError> {
        let whole = match bytes.split_first() {
            Some((&RECORD_WHOLE, rest)) => rest.to_vec(),
            Some((&RECORD_CHUNKED, rest)) => match self.read_chunks(key, rest)? {
                Some(whole) => whole,
                None => return Ok(None),
            },
            _ => {
                tracing::warn!(key = %String::from_utf8_lossy(key), "skipping a store record of an unknown version");
                return Ok(None);
            }
        };
        match postcard::from_bytes(&whole) {
            Ok(record) => Ok(Some(record)),
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(key), "skipping a damaged store record: {e}");
                Ok(None)
            }
        }
    }

    /// The pieces of a chunked record, joined; `None` (logged) when some are missing.
    fn read_chunks(&self, key: &[u8], head: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let Some((chunks, len)) = chunked_head(head) else {
            tracing::warn!(key = %String::from_utf8_lossy(key), "skipping a store record with a damaged head");
            return Ok(None);
        };
        // The length comes from disk: reserve no more than a record can be.
        let mut whole = Vec::with_capacity(len.min(2 * super::merge::MAX_VALUE_BYTES));
        for i in 0..chunks {
            let piece = self.call("reading", || self.db.get(chunk_key(key, i)))?;
            match piece {
                Some(piece) => whole.extend_from_slice(&piece),
                None => {
                    tracing::warn!(key = %String::from_utf8_lossy(key), "skipping a store record that misses chunk {i} of {chunks}");
                    return Ok(None);
                }
            }
        }
        if whole.len() != len {
            tracing::warn!(key = %String::from_utf8_lossy(key), "skipping a store record of {} bytes instead of {len}", whole.len());
            return Ok(None);
        }
        Ok(Some(whole))
    }

    pub fn get(&self, key: &str) -> Result<Option<Record>, StorageError> {
        let found = self.call("reading", || self.db.get(key.as_bytes()))?;
        match found {
            Some(bytes) => self.decode(key.as_bytes(), &bytes),
            None => Ok(None),
        }
    }

    /// How many chunks the stored record of `key` has (0 for none or a whole one).
    fn chunks_of(&self, key: &str) -> Result<u32, StorageError> {
        let found = self.call("reading", || self.db.get(key.as_bytes()))?;
        Ok(match found.as_deref().and_then(|b| b.split_first()) {
            Some((&RECORD_CHUNKED, head)) => chunked_head(head).map_or(0, |(chunks, _)| chunks),
            _ => 0,
        })
    }

    /// Writes `record` (`None`: removes the key), in one atomic batch with its chunks. Not
    /// durable until `flush`.
    pub fn put(&self, key: &str, record: Option<&Record>) -> Result<(), StorageError> {
        let old_chunks = self.chunks_of(key)?;
        let mut batch = sled::Batch::default();
        let mut new_chunks: u32 = 0;
        match record {
            None => batch.remove(key.as_bytes()),
            Some(record) => {
                let whole = postcard::to_stdvec(record).map_err(|e| StorageError::Engine {
                    path: self.path.clone(),
                    error: format!("cannot encode a record: {e}"),
                    kind: None,
                })?;
                if whole.len() < INLINE_BYTES {
                    let mut bytes = Vec::with_capacity(whole.len() + 1);
                    bytes.push(RECORD_WHOLE);
                    bytes.extend(whole);
                    batch.insert(key.as_bytes(), bytes);
                } else {
                    for (i, piece) in whole.chunks(INLINE_BYTES).enumerate() {
                        batch.insert(chunk_key(key.as_bytes(), i as u32), piece);
                        new_chunks += 1;
                    }
                    let mut head = vec![RECORD_CHUNKED];
                    head.extend(new_chunks.to_be_bytes());
                    head.extend((whole.len() as u32).to_be_bytes());
                    batch.insert(key.as_bytes(), head);
                }
            }
        }
        for i in new_chunks..old_chunks {
            batch.remove(chunk_key(key.as_bytes(), i));
        }
        self.call("writing", || self.db.apply_batch(batch))
    }

    /// Every record whose key starts with `prefix` and comes after `after` (if given), in key
    /// order.
    pub fn scan<'a>(
        &'a self,
        prefix: &str,
        after: Option<&str>,
    ) -> impl Iterator<Item = Result<(String, Record), StorageError>> + 'a {
        // Internal keys start with NUL and sort first: user keys start at 0x01.
        let mut start = prefix.as_bytes().to_vec();
        if start.first().is_none_or(|&b| b == INTERNAL) {
            start = vec![INTERNAL + 1];
        }
        let from = match after {
            Some(after) if after.as_bytes() >= start.as_slice() => {
                std::ops::Bound::Excluded(after.as_bytes().to_vec())
            }
            _ => std::ops::Bound::Included(start),
        };
        let prefix = prefix.as_bytes().to_vec();
        let mut iter = self.call("reading", || {
            Ok(self
                .db
                .range::<Vec<u8>, _>((from, std::ops::Bound::Unbounded)))
        });
        let mut done = false;
        std::iter::from_fn(move || {
            loop {
                if done {
                    return None;
                }
                let it = match &mut iter {
                    Ok(it) => it,
                    Err(e) => {
                        done = true;
                        return Some(Err(e.clone()));
                    }
                };
                let next = match guarded(|| it.next()) {
                    Ok(next) => next,
                    Err(panic) => {
                        done = true;
                        return Some(Err(self.panicked("reading", panic)));
                    }
                };
                let (key, bytes) = match next {
                    None => {
                        done = true;
                        return None;
                    }
                    Some(Err(e)) => {
                        done = true;
                        return Some(Err(self.error(e)));
                    }
                    Some(Ok(item)) => item,
                };
                if !key.starts_with(&prefix) {
                    done = true;
                    return None;
                }
                let record = match self.decode(&key, &bytes) {
                    Ok(Some(record)) => record,
                    Ok(None) => continue,
                    Err(e) => {
                        done = true;
                        return Some(Err(e));
                    }
                };
                match String::from_utf8(key.to_vec()) {
                    Ok(key) => return Some(Ok((key, record))),
                    Err(_) => {
                        tracing::warn!("skipping a store record whose key is not UTF-8");
                        continue;
                    }
                }
            }
        })
    }

    /// Makes every write so far durable: returns once it is on disk, or with an error after
    /// at most `FLUSH_TIMEOUT` (a wedged sled would otherwise hold the caller for ever).
    pub fn flush(&self) -> Result<(), StorageError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let db = self.db.clone();
        let spawned = std::thread::Builder::new()
            .name("store-flush".into())
            .spawn(move || {
                let _ = tx.send(guarded(|| db.flush()));
            });
        if let Err(e) = spawned {
            return Err(StorageError::Engine {
                path: self.path.clone(),
                error: format!("cannot start a thread to flush: {e}"),
                kind: Some(e.kind()),
            });
        }
        match rx.recv_timeout(FLUSH_TIMEOUT) {
            Ok(Ok(Ok(_))) => Ok(()),
            Ok(Ok(Err(e))) => Err(self.error(e)),
            Ok(Err(panic)) => Err(self.panicked("flushing", panic)),
            Err(_) => Err(StorageError::Engine {
                path: self.path.clone(),
                error: format!(
                    "the storage engine did not finish a flush within {} s; it is stuck until the daemon restarts (`systemctl --user restart cnsprcy-mesh`)",
                    FLUSH_TIMEOUT.as_secs()
                ),
                kind: None,
            }),
        }
    }

    /// Writes and flushes an internal key: whether this instance can write now.
    pub fn probe(&self, now_ms: u64) -> Result<(), StorageError> {
        self.call("writing", || {
            self.db.insert(PROBE_KEY, &now_ms.to_be_bytes()).map(|_| ())
        })?;
        self.flush()
    }
}

/// `(chunk count, byte count)` from a chunked record's head.
fn chunked_head(head: &[u8]) -> Option<(u32, usize)> {
    let chunks = u32::from_be_bytes(head.get(0..4)?.try_into().ok()?);
    let len = u32::from_be_bytes(head.get(4..8)?.try_into().ok()?) as usize;
    Some((chunks, len))
}

fn chunk_key(key: &[u8], index: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 7);
    out.extend([INTERNAL, b'c']);
    out.extend(key);
    out.push(INTERNAL);
    out.extend(index.to_be_bytes());
    out
}

/// Sorts sled's errors: locked, damaged (corruption, or files it cannot make sense of), or
/// anything else (I/O, such as a full disk).
fn classify(path: &Path, e: sled::Error) -> StorageError {
    let path = path.to_owned();
    match e {
        sled::Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock => {
            StorageError::Locked { path }
        }
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            StorageError::Locked { path }
        }
        sled::Error::Io(io)
            if matches!(
                io.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData
            ) =>
        {
            StorageError::Damaged {
                path,
                reason: io_message(&io),
            }
        }
        sled::Error::Io(io) => StorageError::Engine {
            path,
            error: io_message(&io),
            kind: Some(io.kind()),
        },
        e @ (sled::Error::Corruption { .. }
        | sled::Error::ReportableBug(_)
        | sled::Error::Unsupported(_)) => StorageError::Damaged {
            path,
            reason: e.to_string(),
        },
        other => StorageError::Engine {
            path,
            error: other.to_string(),
            kind: None,
        },
    }
}

/// An I/O error in words. sled passes some on wrapped in their debug form (`Os { code: 28, kind:
/// StorageFull, message: "No space left on device" }`); those are unwrapped.
fn io_message(e: &io::Error) -> String {
    let text = e.to_string();
    let code = text
        .split_once("Os { code: ")
        .and_then(|(_, rest)| rest.split(',').next())
        .and_then(|code| code.parse::<i32>().ok());
    match (e.raw_os_error(), code) {
        (None, Some(code)) => io::Error::from_raw_os_error(code).to_string(),
        _ => text,
    }
}

/// Makes the store directory private: creates it with mode 0700 (when `create`), or sets an
/// existing one (made by an older version with 0755) to 0700, and, when `create` is false, its
/// files to 0600 and subdirectories to 0700. Each is opened without following symbolic links,
/// and checked and changed through that one descriptor.
fn make_private(dir: &Path, create: bool) -> io::Result<()> {
    if create {
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    set_private(dir, true)?;
    if !create {
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let is_dir = set_private(&path, false)?;
            if is_dir {
                for inner in fs::read_dir(&path)? {
                    set_private(&inner?.path(), false)?;
                }
            }
        }
    }
    Ok(())
}

/// Opens `path` (not following a link), and sets a directory to 0700 and a file to 0600 if it
/// is not so already; returns whether it is a directory. `must_be_dir`: the store directory
/// itself, which must be a directory of this user's.
fn set_private(path: &Path, must_be_dir: bool) -> io::Result<bool> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if must_be_dir && (!meta.is_dir() || meta.uid() != me) {
        return Err(io::Error::other(format!(
            "{} is not a directory of this user's (uid {me}); move it away",
            path.display()
        )));
    }
    if meta.uid() != me {
        // Not ours to change (and nothing the store wrote).
        return Ok(meta.is_dir());
    }
    let mode = if meta.is_dir() { 0o700 } else { 0o600 };
    if meta.mode() & 0o777 != mode {
        file.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    Ok(meta.is_dir())
}

thread_local! {
    /// Set while this thread runs a call into sled under `guarded`.
    static GUARDED: Cell<bool> = const { Cell::new(false) };
    /// The message of the panic caught there.
    static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs `f`, catching a panic: `Err` with its message and location. While `f` runs, a panic on
/// this thread is not printed (the caller reports it in words); panics elsewhere are printed as
/// before.
pub fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.with(Cell::get) {
                let message = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_owned());
                let at = info
                    .location()
                    .map(|l| format!(" at {}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                CAUGHT.with(|c| *c.borrow_mut() = Some(format!("{message}{at}")));
            } else {
                previous(info);
            }
        }));
    });
    let outer = GUARDED.with(|g| g.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(outer));
    result.map_err(|_| {
        CAUGHT
            .with(|c| c.borrow_mut().take())
            .unwrap_or_else(|| "a panic".to_owned())
    })
}

/// The bytes an unprivileged process may still write on the file system holding `dir`
/// (`None` when that cannot be found out).
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and `stat` is writable memory of the right type;
    // statvfs fills it in completely when it returns 0.
    let stat = unsafe {
        if libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    // The field types differ between targets (u32 on some 32-bit ones).
    #[allow(clippy::useless_conversion)]
    let (blocks, size) = (u64::from(stat.f_bavail), u64::from(stat.f_frsize));
    Some(blocks.saturating_mul(size))
}

/// Moves a damaged store out of the way: `store` becomes `store.damaged-<UTC time>` beside it.
pub fn set_aside(state_dir: &Path, now: std::time::SystemTime) -> io::Result<PathBuf> {
    let stamp = humantime::format_rfc3339_seconds(now)
        .to_string()
        .replace([':', '-'], "");
    let mut aside = state_dir.join(format!("{DIR}.damaged-{stamp}"));
    let mut n = 1;
    while aside.exists() {
        n += 1;
        aside = state_dir.join(format!("{DIR}.damaged-{stamp}-{n}"));
    }
    fs::rename(state_dir.join(DIR), &aside)?;
    fs::File::open(state_dir)?.sync_all()?;
    Ok(aside)
}

/// A real full disk for tests: a small tmpfs in a mount namespace of its own.
#[cfg(test)]
pub(crate) mod full_disk {
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    const ENV: &str = "CNSPRCY_TEST_SMALL_TMPFS";

    /// Runs the test `name` (its path in the crate, `store::tests::x`) again in a child process
    /// inside a private mount namespace, with a 4 MiB tmpfs mounted on a temporary directory,
    /// and calls `body` with that directory there. The mount goes away with the namespace,
    /// however the child ends. Returns false when `body` ran here (in the child).
    pub fn in_small_tmpfs(name: &str, body: impl FnOnce(&Path)) {
        if let Some(dir) = std::env::var_os(ENV) {
            body(Path::new(&dir));
            return;
        }
        if !nix_is_root() {
            eprintln!("skipped: mounting a tmpfs needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        let output = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount -t tmpfs -o size=4m,mode=0700 tmpfs "$0" && exec "$1" --exact "$2" --nocapture --test-threads=1"#)
            .arg(dir.path())
            .arg(exe)
            .arg(name)
            .env(ENV, dir.path())
            .output()
            .expect("run unshare");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success() && text.contains("1 passed"),
            "{name} in a small tmpfs: {}\n{text}",
            output.status
        );
        eprintln!("{text}");
    }

    fn nix_is_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }

    /// Fills the file system holding `dir` with a file; returns its path (remove it to free
    /// the space).
    pub fn fill(dir: &Path) -> PathBuf {
        let path = dir.join("filler");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .unwrap();
        for size in [64 * 1024, 4096, 512, 1] {
            let block = vec![0u8; size];
            while file.write_all(&block).is_ok() {}
        }
        let _ = file.sync_all();
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(v: Option<&[u8]>) -> Record {
        Record {
            ts: StoreTimestamp { ms: 5, counter: 1 },
            writer: [7; 32],
            value: v.map(<[u8]>::to_vec),
        }
    }

    fn keys(storage: &Storage, prefix: &str, after: Option<&str>) -> Vec<String> {
        storage.scan(prefix, after).map(|r| r.unwrap().0).collect()
    }

    #[test]
    fn records_survive_reopening_and_scan_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..1_048_576u32).map(|i| (i * 7 % 251) as u8).collect();
        {
            let storage = Storage::open(dir.path()).unwrap();
            storage.put("a/1", Some(&record(Some(b"x")))).unwrap();
            storage.put("a/2", Some(&record(None))).unwrap();
            storage.put("b", Some(&record(Some(b"")))).unwrap();
            storage.put("big", Some(&record(Some(&big)))).unwrap();
            storage.put("gone", Some(&record(Some(&big)))).unwrap();
            storage.put("gone", None).unwrap();
            storage.flush().unwrap();
            assert!(matches!(
                Storage::open(dir.path()),
                Err(StorageError::Locked { .. })
            ));
        }
        assert!(Storage::exists(dir.path()));
        let storage = (0..50)
            .find_map(|_| match Storage::open(dir.path()) {
                Err(StorageError::Locked { .. }) => {
                    std::thread::sleep(Duration::from_millis(100));
                    None
                }
                other => Some(other.unwrap()),
            })
            .unwrap();
        assert_eq!(storage.get("a/1").unwrap(), Some(record(Some(b"x"))));
        assert_eq!(storage.get("nope").unwrap(), None);
        assert_eq!(storage.get("big").unwrap(), Some(record(Some(&big))));
        assert_eq!(storage.get("gone").unwrap(), None);
        assert_eq!(keys(&storage, "a/", None), ["a/1", "a/2"]);
        // The chunks and the probe are not keys.
        storage.probe(1).unwrap();
        assert_eq!(keys(&storage, "", None), ["a/1", "a/2", "b", "big"]);
        assert_eq!(keys(&storage, "", Some("a/2")), ["b", "big"]);
        assert_eq!(keys(&storage, "a/", Some("a/1")), ["a/2"]);
        assert_eq!(keys(&storage, "a/", Some("0")), ["a/1", "a/2"]);
        assert!(keys(&storage, "a/", Some("a/2")).is_empty());
        // A big value shrunk to a small one leaves no chunks behind.
        storage.put("big", Some(&record(Some(b"small")))).unwrap();
        let chunks = storage.db.scan_prefix([INTERNAL, b'c']).count();
        assert_eq!(chunks, 0);
    }

    #[test]
    fn the_store_directory_and_its_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join(DIR);
        fs::create_dir(&store).unwrap();
        fs::set_permissions(&store, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(store.join("leftover"), b"").unwrap();
        fs::set_permissions(store.join("leftover"), fs::Permissions::from_mode(0o644)).unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        storage.put("k", Some(&record(Some(b"v")))).unwrap();
        storage.flush().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&store), 0o700);
        for entry in fs::read_dir(&store).unwrap() {
            let path = entry.unwrap().path();
            let want = if path.is_dir() { 0o700 } else { 0o600 };
            assert_eq!(mode(&path), want, "{}", path.display());
        }
        // A link in place of the store is refused, not followed.
        drop(storage);
        let other = tempfile::tempdir().unwrap();
        let linked = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(other.path(), linked.path().join(DIR)).unwrap();
        assert!(matches!(
            Storage::open(linked.path()),
            Err(StorageError::Engine { .. })
        ));
    }

    /// What sled 0.34 does on a full disk, which `Store` is built around: a write that fails
    /// poisons the instance (its memory still shows the failed write, and every later write
    /// fails even after space is back), and a new instance reads what is on disk and writes
    /// again. Values are chunked, so even a 1 MiB value fails cleanly instead of wedging sled.
    #[test]
    fn sled_refuses_writes_after_a_full_disk_until_reopened() {
        full_disk::in_small_tmpfs(
            "store::storage::tests::sled_refuses_writes_after_a_full_disk_until_reopened",
            |dir| {
                let storage = Storage::open(dir).unwrap();
                storage.put("k", Some(&record(Some(b"old")))).unwrap();
                storage.flush().unwrap();
                let filler = full_disk::fill(dir);
                let big = vec![1u8; 1024 * 1024];
                let failed = (0..64).find_map(|i| {
                    let value = if i % 2 == 0 { &big[..] } else { b"new!" };
                    storage
                        .put("k", Some(&record(Some(value))))
                        .and_then(|()| storage.flush())
                        .err()
                        .map(|e| (e, value.to_vec()))
                });
                let (error, value) = failed.expect("a write failed on the full disk");
                eprintln!("the write failed: {error}");
                assert!(
                    matches!(
                        error,
                        StorageError::Engine {
                            kind: Some(io::ErrorKind::StorageFull),
                            ..
                        }
                    ),
                    "{error:?}"
                );
                // The failed write may still show in this instance's memory (or the read fails
                // too); writes keep failing once there is space again.
                match storage.get("k") {
                    Ok(shown) => eprintln!(
                        "after the failure, sled shows a value of {:?} bytes",
                        shown.and_then(|r| r.value).map(|v| v.len())
                    ),
                    Err(e) => eprintln!("after the failure, reading fails: {e}"),
                }
                std::fs::remove_file(filler).unwrap();
                let again = storage
                    .put("other", Some(&record(Some(b"x"))))
                    .and_then(|()| storage.flush());
                assert!(again.is_err(), "sled wrote again without a reopen");
                drop(storage);
                let storage = (0..100)
                    .find_map(|_| match Storage::open(dir) {
                        Err(StorageError::Locked { .. }) => {
                            std::thread::sleep(Duration::from_millis(50));
                            None
                        }
                        other => Some(other.unwrap()),
                    })
                    .unwrap();
                let now = storage.get("k").unwrap().unwrap().value.unwrap();
                assert_ne!(now, value, "the failed write is on disk");
                storage.put("other", Some(&record(Some(b"x")))).unwrap();
                storage.flush().unwrap();
            },
        );
    }

    #[test]
    fn io_errors_read_as_words() {
        let wrapped = io::Error::new(
            io::ErrorKind::StorageFull,
            format!("{:?}", io::Error::from_raw_os_error(28)),
        );
        assert_eq!(
            io_message(&wrapped),
            "No space left on device (os error 28)"
        );
        let plain = io::Error::from_raw_os_error(13);
        assert_eq!(io_message(&plain), "Permission denied (os error 13)");
    }

    #[test]
    fn a_panic_is_caught_and_reported_quietly() {
        let caught = guarded(|| -> u32 { panic!("boom") }).unwrap_err();
        assert!(caught.starts_with("boom at "), "{caught}");
        assert_eq!(guarded(|| 5), Ok(5));
    }
}
