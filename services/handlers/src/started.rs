//! The messages whose handler this service started, in `handlers-started.log` in the runtime
//! directory: one message ID per line, appended (not synced) by the handler's process itself,
//! between its start and its exec (`spawn::StartNote`).
//!
//! The mesh service keeps a delivered message until it hears that its handler started, and runs
//! it again at its next start if it did not hear it. Between the start and the mesh service
//! hearing of it lie a few hops (tens of milliseconds on a busy machine); a kill in between
//! would run the handler twice. This record closes that gap: a message whose handler started
//! before is not started again. Written by the child, it is there exactly when the handler's
//! process exists: a kill of the service before the fork leaves no record (and the mesh service
//! asks again), one after it cannot stop the record.
//!
//! The runtime directory is a tmpfs, emptied at logout: the record outlives a crash of the
//! services, which is all it is for.

use std::collections::{HashSet, VecDeque};
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::spawn::StartNote;

pub const FILE: &str = "handlers-started.log";
/// How many IDs are remembered: far more than can wait in the mesh service's inbox at once.
const KEEP: usize = 4096;

pub struct Started {
    path: PathBuf,
    ids: HashSet<String>,
    /// Oldest first, as in the file.
    order: VecDeque<String>,
    /// Lines in the file.
    lines: usize,
}

impl Started {
    /// Reads what an earlier run of the service recorded. A file that cannot be read is
    /// started afresh, with a warning.
    pub fn open(path: &Path) -> Self {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                tracing::warn!(file = %path.display(), "cannot read the record of started handlers: {e}");
                String::new()
            }
        };
        let mut started = Self {
            path: path.to_owned(),
            ids: HashSet::new(),
            order: VecDeque::new(),
            lines: 0,
        };
        // A line cut short by a crash is not an ID of any message; it does no harm.
        for id in text.lines().filter(|l| !l.is_empty()) {
            started.remember(id.to_owned());
            started.lines += 1;
        }
        started
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// Remembers that the handler of message `id` is about to start, and returns what its
    /// process appends to the file before its exec.
    pub fn record(&mut self, id: &str) -> io::Result<StartNote> {
        if self.lines >= 2 * KEEP {
            // Rewritten with what is remembered now and then, so that it does not grow without
            // end; before `id` is remembered, which only its process may write.
            let text: String = self.order.iter().map(|id| format!("{id}\n")).collect();
            self.lines = self.order.len();
            cnsprcy::fsutil::write_private(&self.path, text.as_bytes())?;
        }
        self.remember(id.to_owned());
        self.lines += 1;
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.path)?;
        Ok(StartNote {
            file: file.into(),
            line: format!("{id}\n").into_bytes(),
        })
    }

    fn remember(&mut self, id: String) {
        if self.ids.insert(id.clone()) {
            self.order.push_back(id);
        }
        while self.order.len() > KEEP {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_was_recorded_is_known_after_a_restart_and_the_file_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let mut started = Started::open(&path);
        assert!(!started.contains("a"));
        started.record("a").unwrap().write();
        started.record("b").unwrap().write();
        assert!(started.contains("a"));
        let started = Started::open(&path);
        assert!(started.contains("a") && started.contains("b") && !started.contains("c"));

        let mut started = Started::open(&path);
        for i in 0..3 * KEEP {
            started.record(&format!("id-{i}")).unwrap().write();
        }
        let lines = fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines <= 2 * KEEP, "{lines} lines");
        let started = Started::open(&path);
        assert!(started.contains(&format!("id-{}", 3 * KEEP - 1)));
        assert!(!started.contains("a"));
    }
}
