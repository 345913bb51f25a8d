//! UNIX sockets that only this user may use: created 0600 in a 0700 directory, and every
//! connection's peer credentials checked, because a looser directory (or root's help) must not
//! let another user drive the daemon.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;
use tokio::net::{UnixListener, UnixStream};

#[derive(Debug, Error)]
pub enum SocketError {
    #[error("cannot listen on {path}: {error}")]
    Bind { path: PathBuf, error: io::Error },
    #[error("{path} exists and is not a socket; move it away")]
    NotASocket { path: PathBuf },
}

/// Binds a listening socket at `path` with mode 0600. A socket file left by a process that is gone
/// is replaced; callers hold the service's instance lock, so no live process owns it.
pub fn bind_private(path: &Path) -> Result<UnixListener, SocketError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            let _ = fs::remove_file(path);
        }
        Ok(_) => {
            return Err(SocketError::NotASocket {
                path: path.to_owned(),
            });
        }
        Err(_) => {}
    }
    let bind_err = |error| SocketError::Bind {
        path: path.to_owned(),
        error,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    // The directory is 0700, so nobody else can reach the socket in the moment before this chmod.
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

/// A listening socket and who owns its file.
pub struct Listening {
    pub listener: UnixListener,
    /// Passed by systemd socket activation: systemd made the file and removes it, not us.
    pub activated: bool,
}

/// The socket systemd passed as `name` (`FileDescriptorName=`), or else one bound at `path`.
pub fn listen(name: &str, path: &Path) -> Result<Listening, SocketError> {
    if let Some(std_listener) = crate::activation::take_unix_listener(name) {
        let listener = std_listener
            .set_nonblocking(true)
            .and_then(|()| UnixListener::from_std(std_listener))
            .map_err(|error| SocketError::Bind {
                path: path.to_owned(),
                error,
            })?;
        tracing::debug!(name, "using the socket passed by systemd");
        return Ok(Listening {
            listener,
            activated: true,
        });
    }
    Ok(Listening {
        listener: bind_private(path)?,
        activated: false,
    })
}

impl Listening {
    /// Removes the socket file on shutdown, unless systemd owns it.
    pub fn remove_file(&self, path: &Path) {
        if !self.activated {
            remove_socket(path);
        }
    }
}

/// Checks that the process at the other end of `stream` runs as this user. The error text is
/// meant for the log and for the refused client.
pub fn check_peer_uid(stream: &UnixStream) -> Result<(), String> {
    let own = nix::unistd::getuid().as_raw();
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == own => Ok(()),
        Ok(cred) => Err(format!(
            "permission denied: connection from uid {} (pid {}) refused; cnsprcy answers only its own user (uid {own})",
            cred.uid(),
            cred.pid()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "?".into())
        )),
        Err(e) => Err(format!("cannot read the peer's credentials: {e}")),
    }
}

/// Removes a socket file this process created, ignoring one that is already gone.
pub fn remove_socket(path: &Path) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), "cannot remove socket: {e}");
    }
}
