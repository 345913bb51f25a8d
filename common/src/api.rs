//! Results of the public API's methods, shared by the mesh service (which fills them in) and the
//! CLI (which prints them). `docs/api.md` shows them as JSON.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::identity::{DeviceId, DeviceName, PublicKey};
use crate::ipc::ServiceKind;

/// The result of `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub name: DeviceName,
    pub id: DeviceId,
    pub public_key: PublicKey,
    pub version: String,
    /// Process ID of the mesh service.
    pub pid: u32,
    pub uptime_secs: u64,
    /// Addresses the mesh listens on for sessions from other devices.
    pub listen: Vec<SocketAddr>,
    /// The public API socket.
    pub socket: PathBuf,
    pub services: Vec<ServiceStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: ServiceKind,
    pub state: ServiceState,
    #[serde(default)]
    pub pid: Option<u32>,
    /// Why a service is not connected, or other detail worth a user's eye.
    #[serde(default)]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    /// The service answering this call.
    Running,
    /// Registered with (or answering) the mesh service over its internal socket.
    Connected,
    /// Not connected now; the service reconnects by itself when it runs.
    Disconnected,
}

impl ServiceState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Running => "running",
            ServiceState::Connected => "connected",
            ServiceState::Disconnected => "disconnected",
        }
    }
}
