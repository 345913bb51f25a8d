//! Messages between the services on the internal sockets (`mesh.sock`, `handlers.sock`).
//!
//! They are framed like the public API (one JSON object per line) and tagged by `type`, so a
//! service can be replaced or restarted without the others noticing more than a reconnect.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::identity::DeviceName;

/// The four services every device runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    Mesh,
    Netwatch,
    Discovery,
    Handlers,
}

impl ServiceKind {
    pub const ALL: [ServiceKind; 4] = [
        ServiceKind::Mesh,
        ServiceKind::Netwatch,
        ServiceKind::Discovery,
        ServiceKind::Handlers,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ServiceKind::Mesh => "mesh",
            ServiceKind::Netwatch => "netwatch",
            ServiceKind::Discovery => "discovery",
            ServiceKind::Handlers => "handlers",
        }
    }

    /// The name of the service's own binary and systemd unit.
    pub fn unit_name(self) -> String {
        format!("cnsprcy-{}", self.as_str())
    }
}

impl fmt::Display for ServiceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ServiceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown service {s:?}; the services are mesh, netwatch, discovery and handlers"
                )
            })
    }
}

/// What a service sends to the mesh service on `mesh.sock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToMesh {
    /// The first message on every connection: who is connecting.
    Register {
        service: ServiceKind,
        pid: u32,
        version: String,
    },
}

/// What the mesh service answers on `mesh.sock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromMesh {
    /// Registration accepted.
    Welcome { device: DeviceName, version: String },
    /// Registration refused; the service should log `reason` and try again later.
    Refused { reason: String },
}

/// What the mesh service sends to the handler service on `handlers.sock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToHandlers {
    /// Are you there? Answered by `Pong`.
    Ping,
}

/// What the handler service answers on `handlers.sock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromHandlers {
    Pong { pid: u32, version: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_tagged_json() {
        let register = ToMesh::Register {
            service: ServiceKind::Netwatch,
            pid: 7,
            version: "0.1.0".into(),
        };
        let text = serde_json::to_string(&register).unwrap();
        assert_eq!(
            text,
            r#"{"type":"register","service":"netwatch","pid":7,"version":"0.1.0"}"#
        );
        assert_eq!(serde_json::from_str::<ToMesh>(&text).unwrap(), register);
        assert_eq!(
            serde_json::to_string(&ToHandlers::Ping).unwrap(),
            r#"{"type":"ping"}"#
        );
    }

    #[test]
    fn service_names_parse() {
        for kind in ServiceKind::ALL {
            assert_eq!(kind.as_str().parse::<ServiceKind>().unwrap(), kind);
        }
        assert!("mash".parse::<ServiceKind>().is_err());
    }
}
