//! One running instance per service and user: each service holds an exclusive `flock` on
//! `<service>.lock` in the runtime directory for as long as it runs. The kernel drops the lock
//! when the process dies, so a crash never leaves a stale lock behind.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LockError {
    #[error(
        "cnsprcy is already running for this user ({service}{}, lock {path}); stop it first (`systemctl --user stop cnsprcy.target`, or Ctrl-C in the terminal running `cnspr serve`), or talk to it with `cnspr status`",
        pid.map(|p| format!(" as pid {p}")).unwrap_or_default()
    )]
    Held {
        service: String,
        pid: Option<u32>,
        path: PathBuf,
    },
    #[error("cannot open lock file {path}: {error}")]
    Open { path: PathBuf, error: io::Error },
}

/// Held for the life of the service; dropping it releases the lock.
#[derive(Debug)]
pub struct InstanceLock {
    _file: Flock<File>,
}

impl InstanceLock {
    pub fn acquire(path: &Path, service: &str) -> Result<Self, LockError> {
        let open_err = |error| LockError::Open {
            path: path.to_owned(),
            error,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(open_err)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut file) => {
                // The pid is only a hint for the error message above; failing to write it is harmless.
                let _ = file
                    .set_len(0)
                    .and_then(|_| writeln!(file, "{}", std::process::id()));
                Ok(Self { _file: file })
            }
            Err((_, Errno::EWOULDBLOCK)) => Err(LockError::Held {
                service: service.to_owned(),
                pid: fs::read_to_string(path)
                    .ok()
                    .and_then(|t| t.trim().parse().ok()),
                path: path.to_owned(),
            }),
            Err((_, errno)) => Err(open_err(io::Error::from(errno))),
        }
    }

    /// Whether some process holds the lock now, without taking it for longer than a moment.
    pub fn is_held(path: &Path) -> bool {
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => matches!(
                Flock::lock(file, FlockArg::LockExclusiveNonblock),
                Err((_, Errno::EWOULDBLOCK))
            ),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_with_the_pid() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("mesh.lock");
        let first = InstanceLock::acquire(&path, "mesh").unwrap();
        assert!(InstanceLock::is_held(&path));
        match InstanceLock::acquire(&path, "mesh") {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected Held, got {other:?}"),
        }
        drop(first);
        assert!(!InstanceLock::is_held(&path));
        InstanceLock::acquire(&path, "mesh").unwrap();
    }
}
