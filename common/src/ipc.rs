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

    /// What the service does, in a sentence for `--help` and its man page.
    pub fn duty(self) -> &'static str {
        match self {
            ServiceKind::Mesh => {
                "Owns the identity key, the encrypted sessions with the other devices, the roster, \
                 the replicated store and the JSON API that `cnspr` and scripts use."
            }
            ServiceKind::Netwatch => {
                "Watches links, addresses and routes over rtnetlink and tells the mesh service at \
                 once, so sessions follow the device from network to network."
            }
            ServiceKind::Discovery => {
                "Advertises this device on the local network with mDNS-SD under rotating names \
                 only members recognise, and hands the addresses of members it finds to the mesh \
                 service."
            }
            ServiceKind::Handlers => {
                "Runs the handler scripts for tagged messages that reach this device. Started by \
                 the first message (socket activation) and exits when idle."
            }
        }
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
    /// From netwatch: the interfaces and addresses now (sent on registering and after every
    /// change).
    Network { interfaces: Vec<Interface> },
    /// From discovery: a device on the local network advertises `instance` at these addresses.
    /// The mesh service tells members from strangers; discovery cannot.
    Discovered {
        instance: String,
        addresses: Vec<std::net::SocketAddr>,
    },
    /// From discovery: a device on the local network waits to be paired (`cnspr manage join`
    /// without a code), advertising its name and public key. Neither is proven: the pairing
    /// handshake and the confirmation code are.
    JoinCandidate {
        name: String,
        /// The public key as `PublicKey` prints it.
        key: String,
        addresses: Vec<std::net::SocketAddr>,
    },
}

/// What discovery is to do for pairing, sent whole every time it changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingDiscovery {
    /// Advertise this device as waiting to be paired (`_cnsprcy-join._tcp`).
    pub advertise: Option<JoinAdvert>,
    /// Browse for devices waiting to be paired and report each as `ToMesh::JoinCandidate`.
    pub browse: bool,
}

/// This device waiting to be paired, as discovery advertises it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinAdvert {
    /// The mDNS instance name (unique on the network: the name and the start of the ID).
    pub instance: String,
    /// The TCP port the mesh service listens on.
    pub port: u16,
    /// The device's name (TXT `name`).
    pub name: String,
    /// The device's public key (TXT `key`).
    pub key: String,
}

/// A network interface as netwatch sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    /// Administratively up and with carrier (IFF_UP and IFF_RUNNING).
    pub up: bool,
    pub loopback: bool,
    pub addresses: Vec<std::net::IpAddr>,
}

/// What the mesh service answers on `mesh.sock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromMesh {
    /// Registration accepted.
    Welcome { device: DeviceName, version: String },
    /// Registration refused; the service should log `reason` and try again later.
    Refused { reason: String },
    /// To discovery: advertise this device as `instance` (a name that changes every hour and
    /// that only members can tell apart) on TCP `port`.
    Advertise { instance: String, port: u16 },
    /// To discovery: what to advertise and browse for pairing now (replaces the last).
    Pairing(PairingDiscovery),
    /// To discovery: look for members' advertisements (`true`: while there is no member yet or
    /// some member has no session), or stop, so that a whole mesh sends no mDNS queries.
    Browse { members: bool },
}

/// What the mesh service sends to the handler service on `handlers.sock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToHandlers {
    /// Are you there? Answered by `Pong`.
    Ping,
    /// Run the handler for a message or a built-in event. Answered by `Started` with the same
    /// `run_id` when the handler process started (if the run asks for it: `report_start`), and
    /// by `Done` when it finished, or by `NotStarted` (runs overlap: answers come in any
    /// order).
    Run(Box<Run>),
}

/// What the handler service answers on `handlers.sock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromHandlers {
    Pong {
        pid: u32,
        version: String,
    },
    /// The handler process of run `run_id` started. The mesh service then no longer keeps the
    /// message to run it again after a stop.
    Started {
        run_id: u64,
    },
    /// Run `run_id` was not started because the service is stopping (sent instead of `Done`
    /// to a run that asked for `Started`): the mesh service keeps the message to run it later.
    NotStarted {
        run_id: u64,
        reason: String,
    },
    Done {
        run_id: u64,
        result: RunResult,
    },
}

/// The event name of a tagged message; built-in events have names of their own.
pub const EVENT_MESSAGE: &str = "message";

/// One handler run, as the mesh service asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// Chosen by the mesh service, unique per connection.
    pub run_id: u64,
    /// `message`, or a built-in event such as `peer-up`.
    pub event: String,
    /// The message's tag (for a built-in event, the event name).
    pub tag: String,
    /// The sending device, for messages (`None` for events this device raises itself).
    pub from: Option<Sender>,
    pub message_id: Option<String>,
    /// This device's name, for `CNSPRCY_DEVICE`.
    pub device: String,
    /// Extra environment variables for the handler (`CNSPRCY_PEER`, ... for peer events).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The handler's standard input.
    #[serde(with = "base64_bytes")]
    pub payload: Vec<u8>,
    /// Answer `Started` when the handler process started (older mesh services do not
    /// understand it, so it is sent only when asked for).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub report_start: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sender {
    pub name: String,
    pub id: String,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunResult {
    /// The handler file, relative to the handler directory, once one was chosen.
    pub handler: Option<String>,
    pub outcome: Outcome,
    /// The handler's standard output: the reply (cut at `MAX_REPLY_BYTES`).
    #[serde(with = "base64_bytes")]
    pub stdout: Vec<u8>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// The handler exited by itself with this status.
    Exited { code: i32 },
    /// The handler was killed by a signal it did not get from us.
    Signalled { signal: i32 },
    /// The handler ran past its time-out; its whole process group was killed.
    TimedOut { after_ms: u64 },
    /// No handler file matches the tag (nor a directory fallback).
    NoHandler,
    /// A handler exists but may not run: not executable, not the user's, writable by others,
    /// or the sender is not allowed. `reason` says which.
    Refused { reason: String },
    /// The handler could not be started (or the service is shutting down).
    Failed { reason: String },
}

impl From<Outcome> for crate::wire::HandlerOutcome {
    fn from(outcome: Outcome) -> Self {
        use crate::wire::HandlerOutcome as W;
        match outcome {
            Outcome::Exited { code } => W::Exited { code },
            Outcome::Signalled { signal } => W::Signalled { signal },
            Outcome::TimedOut { after_ms } => W::TimedOut { after_ms },
            Outcome::NoHandler => W::NoHandler,
            Outcome::Refused { reason } => W::Refused { reason },
            Outcome::Failed { reason } => W::Failed { reason },
        }
    }
}

impl From<RunResult> for crate::wire::HandlerResult {
    fn from(result: RunResult) -> Self {
        Self {
            handler: result.handler,
            outcome: result.outcome.into(),
            stdout: result.stdout,
            duration_ms: result.duration_ms,
        }
    }
}

/// The largest payload a message may carry.
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024 * 1024;
/// The largest reply kept from a handler's standard output.
pub const MAX_REPLY_BYTES: usize = 16 * 1024 * 1024;

/// Byte strings in JSON as standard base64 text.
pub mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("bad base64: {e}")))
    }
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
