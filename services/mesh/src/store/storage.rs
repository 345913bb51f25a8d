//! The storage engine, and the only file that knows it is sled: a durable, ordered map from key
//! to record. Swapping the engine means rewriting this file.

use std::path::{Path, PathBuf};

use cnsprcy::wire::{KeyBytes, StoreTimestamp};
use serde::{Deserialize, Serialize};

/// The store's directory inside the state directory.
pub const DIR: &str = "store";
/// The first byte of every record: its encoding's version.
const RECORD_VERSION: u8 = 1;

/// What is stored for a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub ts: StoreTimestamp,
    pub writer: KeyBytes,
    /// `None`: deleted (a tombstone).
    pub value: Option<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(
        "the store {path} is in use by another process (is the daemon running? `cnspr status`)"
    )]
    Locked { path: PathBuf },
    #[error("the store {path}: {error}")]
    Engine { path: PathBuf, error: String },
}

pub struct Storage {
    db: sled::Db,
    path: PathBuf,
}

impl Storage {
    /// Opens (or creates) the store in `state_dir/store`.
    pub fn open(state_dir: &Path) -> Result<Self, StorageError> {
        let path = state_dir.join(DIR);
        let db = sled::Config::new()
            .path(&path)
            // A personal store is small. No periodic flusher: local writes flush themselves
            // before they return, merged remote writes come again by anti-entropy if lost, and
            // a timer thread would wake an idle laptop for nothing.
            .cache_capacity(8 * 1024 * 1024)
            .flush_every_ms(None)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    StorageError::Locked { path: path.clone() }
                }
                sled::Error::Io(io) if io.to_string().contains("lock") => {
                    StorageError::Locked { path: path.clone() }
                }
                other => StorageError::Engine {
                    path: path.clone(),
                    error: other.to_string(),
                },
            })?;
        Ok(Self { db, path })
    }

    /// Whether a store exists in `state_dir` (without creating one).
    pub fn exists(state_dir: &Path) -> bool {
        state_dir.join(DIR).join("db").exists()
    }

    fn error(&self, e: sled::Error) -> StorageError {
        StorageError::Engine {
            path: self.path.clone(),
            error: e.to_string(),
        }
    }

    /// Decodes a stored record; a damaged one is logged and skipped.
    fn decode(&self, key: &[u8], bytes: &[u8]) -> Option<Record> {
        match bytes.split_first() {
            Some((&RECORD_VERSION, rest)) => match postcard::from_bytes(rest) {
                Ok(record) => Some(record),
                Err(e) => {
                    tracing::warn!(key = %String::from_utf8_lossy(key), "skipping a damaged store record: {e}");
                    None
                }
            },
            _ => {
                tracing::warn!(key = %String::from_utf8_lossy(key), "skipping a store record of an unknown version");
                None
            }
        }
    }

    pub fn get(&self, key: &str) -> Result<Option<Record>, StorageError> {
        let found = self.db.get(key.as_bytes()).map_err(|e| self.error(e))?;
        Ok(found.and_then(|bytes| self.decode(key.as_bytes(), &bytes)))
    }

    pub fn put(&self, key: &str, record: &Record) -> Result<(), StorageError> {
        let mut bytes = vec![RECORD_VERSION];
        bytes.extend(
            postcard::to_stdvec(record).map_err(|e| StorageError::Engine {
                path: self.path.clone(),
                error: e.to_string(),
            })?,
        );
        self.db
            .insert(key.as_bytes(), bytes)
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Every record whose key starts with `prefix`, in key order.
    pub fn scan(
        &self,
        prefix: &str,
    ) -> impl Iterator<Item = Result<(String, Record), StorageError>> + '_ {
        self.db
            .scan_prefix(prefix.as_bytes())
            .filter_map(move |item| match item {
                Err(e) => Some(Err(self.error(e))),
                Ok((key, bytes)) => {
                    let record = self.decode(&key, &bytes)?;
                    match String::from_utf8(key.to_vec()) {
                        Ok(key) => Some(Ok((key, record))),
                        Err(_) => {
                            tracing::warn!("skipping a store record whose key is not UTF-8");
                            None
                        }
                    }
                }
            })
    }

    /// Makes every write so far durable: returns once it is on disk.
    pub fn flush(&self) -> Result<(), StorageError> {
        self.db.flush().map(|_| ()).map_err(|e| self.error(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening_and_scan_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let record = |v: Option<&[u8]>| Record {
            ts: StoreTimestamp { ms: 5, counter: 1 },
            writer: [7; 32],
            value: v.map(<[u8]>::to_vec),
        };
        {
            let storage = Storage::open(dir.path()).unwrap();
            storage.put("a/1", &record(Some(b"x"))).unwrap();
            storage.put("a/2", &record(None)).unwrap();
            storage.put("b", &record(Some(b""))).unwrap();
            storage.flush().unwrap();
            assert!(matches!(
                Storage::open(dir.path()),
                Err(StorageError::Locked { .. })
            ));
        }
        assert!(Storage::exists(dir.path()));
        let storage = Storage::open(dir.path()).unwrap();
        assert_eq!(storage.get("a/1").unwrap(), Some(record(Some(b"x"))));
        assert_eq!(storage.get("nope").unwrap(), None);
        let keys: Vec<String> = storage.scan("a/").map(|r| r.unwrap().0).collect();
        assert_eq!(keys, ["a/1", "a/2"]);
        assert_eq!(storage.scan("").count(), 3);
    }
}
