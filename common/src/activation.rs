//! systemd integration: sockets handed over by socket activation (by their
//! `FileDescriptorName=`), and readiness, status and watchdog notifications. Outside systemd
//! every function here is a no-op and services bind their own sockets.

use std::os::unix::net::UnixListener;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use listenfd::ListenFd;
use sd_notify::NotifyState;

/// The activated descriptors of this process, with their names (`LISTEN_FDNAMES`).
struct Activated {
    fds: ListenFd,
    names: Vec<String>,
}

fn activated() -> &'static Mutex<Activated> {
    static ACTIVATED: OnceLock<Mutex<Activated>> = OnceLock::new();
    ACTIVATED.get_or_init(|| {
        let fds = ListenFd::from_env();
        let names = std::env::var("LISTEN_FDNAMES")
            .map(|v| v.split(':').map(str::to_owned).collect())
            .unwrap_or_default();
        Mutex::new(Activated { fds, names })
    })
}

/// The listening UNIX socket systemd passed under `name`, if any. Each can be taken once.
pub fn take_unix_listener(name: &str) -> Option<UnixListener> {
    let mut activated = activated().lock().unwrap_or_else(|p| p.into_inner());
    let index = activated.names.iter().position(|n| n == name)?;
    match activated.fds.take_unix_listener(index) {
        Ok(Some(listener)) => Some(listener),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!("systemd passed a socket named {name}, but it is unusable: {e}");
            None
        }
    }
}

/// Tells systemd (`Type=notify`) the service is ready, with a status line for
/// `systemctl --user status`.
pub fn ready(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(status)]);
}

pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// When systemd watches this service (`WatchdogSec=`): how often to tell it we are alive.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
}

pub fn watchdog_ping() {
    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
}
