//! Results of the public API's methods, shared by the mesh service (which fills them in) and the
//! CLI (which prints them). `docs/api.md` shows them as JSON.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::identity::{DeviceId, DeviceName, PublicKey};
use crate::ipc::ServiceKind;

/// The shortest message TTL (`send`'s `ttl_ms`, `cnspr send --ttl`): the same floor as every
/// duration of the configuration file, below which a value is a slip, not a choice.
pub const MIN_TTL_MS: u64 = 100;
/// The longest message TTL: 30 days.
pub const MAX_TTL_MS: u64 = 30 * 24 * 3_600_000;
/// The longest `send` with `wait` waits (`timeout_ms`): 1 hour.
pub const MAX_WAIT_MS: u64 = 3_600_000;
/// The longest `ping` waits for its pong (`timeout_ms`): 60 seconds.
pub const MAX_PING_TIMEOUT_MS: u64 = 60_000;

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
    /// The interfaces and addresses netwatch last reported (until it has, as the mesh service
    /// read them itself), with what uses each.
    #[serde(default)]
    pub interfaces: Vec<InterfaceStatus>,
    /// Names in `[mesh] interfaces` or `[discovery] interfaces` that this device does not have
    /// now (a USB tether not plugged in, or a typo).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub absent_interfaces: Vec<String>,
    /// The replicated store (absent from daemons older than this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreStatus>,
    /// Devices that are not members and tried to start a session with this device lately, most
    /// recent last (at most `MAX_KNOCKS`, since the daemon started).
    #[serde(default)]
    pub knocks: Vec<Knock>,
}

/// The most knocks `status` lists; an older one is forgotten for a new one.
pub const MAX_KNOCKS: usize = 16;

/// A device that is not a member and started a handshake with this device ("knocked"): it has
/// added this device, and this device has not added it (or has a different key for it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Knock {
    pub id: DeviceId,
    /// Its public key, as its handshake proved (to add it: `cnspr manage add NAME KEY`, after
    /// comparing the ID with `cnspr manage id` on that device).
    pub public_key: PublicKey,
    /// Where its last handshake came from (`ip:port`; the port is its dialling port, not where
    /// it listens).
    pub address: SocketAddr,
    /// Handshakes since the daemon started (or since it was first listed, if it was forgotten).
    pub count: u64,
    /// The first and the last (RFC 3339, UTC).
    pub first_seen: String,
    pub last_seen: String,
}

/// The replicated store, in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreStatus {
    /// The store's directory.
    pub path: PathBuf,
    pub state: StoreState,
    /// While degraded: what is wrong, and what to do.
    #[serde(default)]
    pub problem: Option<String>,
    /// While degraded: since when (RFC 3339, UTC).
    #[serde(default)]
    pub since: Option<String>,
    /// A damaged store this daemon moved aside (since it started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_aside: Option<SetAsideStore>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreState {
    Ok,
    /// Writes fail (and change nothing) until the problem is gone; the daemon retries by
    /// itself.
    Degraded,
}

impl StoreState {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreState::Ok => "ok",
            StoreState::Degraded => "degraded",
        }
    }
}

/// A damaged store, moved aside so that the daemon could start with an empty one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAsideStore {
    /// Where the damaged copy is now.
    pub path: PathBuf,
    /// What was wrong with it.
    pub reason: String,
    /// When it was moved (RFC 3339, UTC).
    pub time: String,
    /// What to do about it.
    pub advice: String,
}

/// One network interface in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    /// Administratively up and with carrier.
    pub up: bool,
    pub loopback: bool,
    pub addresses: Vec<std::net::IpAddr>,
    /// Sessions may use it: `[mesh] interfaces` is empty or names it.
    #[serde(default)]
    pub mesh: bool,
    /// Discovery runs mDNS on it (`[discovery] interfaces`, within the mesh's; false when
    /// discovery is off).
    #[serde(default)]
    pub discovery: bool,
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

/// A peer's status, as `cnspr peers` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerStatus {
    /// An encrypted session with this device is up.
    Direct,
    /// A session is up, but its keepalive is overdue: nothing arrived for the keepalive
    /// interval plus half the time-out. `unreachable` follows at interval + time-out, unless a
    /// frame arrives first (then `direct` again).
    Suspect,
    /// No session, but a member with a session to it passes messages on.
    Relayed,
    Unreachable,
    /// In the roster, but switched off by the user.
    Disabled,
}

impl PeerStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerStatus::Direct => "direct",
            PeerStatus::Suspect => "suspect",
            PeerStatus::Relayed => "relayed",
            PeerStatus::Unreachable => "unreachable",
            PeerStatus::Disabled => "disabled",
        }
    }
}

/// One element of the result of `peers`, and the result of `peer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub name: DeviceName,
    pub id: DeviceId,
    pub public_key: PublicKey,
    pub status: PeerStatus,
    /// Known addresses (`ip:port`); for a direct peer, the session's address comes first.
    pub addresses: Vec<SocketAddr>,
    /// Smoothed round-trip time; through the relay for a relayed peer. Named as `ping`'s
    /// (it was `latency_ms`; an older daemon's answer still reads).
    #[serde(alias = "latency_ms")]
    pub rtt_ms: Option<f64>,
    /// The member that relays to this peer.
    pub via: Option<DeviceName>,
    /// When the peer was last reachable (RFC 3339, UTC); `null` if never.
    pub last_seen: Option<String>,
    /// Why it is not direct, in words with what to do (`null` when direct).
    #[serde(default)]
    pub reason: Option<String>,
    /// The same as a code, for scripts (`null` when direct).
    #[serde(default)]
    pub reason_code: Option<PeerReason>,
}

/// Why a member is not direct, as `reason_code` in `peers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerReason {
    /// A connection was made, and the other side closed it during the handshake: it has not
    /// added this device, or the key added here for it is wrong (it cannot decrypt the
    /// handshake), or its `[mesh] interfaces` refuse the address. This side cannot tell which.
    HandshakeRefused,
    /// No address is known to dial: none was given, none was learned, discovery has not seen it.
    NoAddress,
    /// `[mesh] interfaces` here allows no interface that reaches any of its addresses.
    Interfaces,
    /// Connecting failed (refused, timed out, unreachable) or the handshake failed otherwise.
    DialFailed,
    /// Its session ended, and it has not been dialled again yet.
    SessionEnded,
    /// It is being dialled for the first time.
    Dialling,
    /// Its session is up, but its keepalive is overdue (`suspect`).
    KeepaliveOverdue,
    /// Its session is up, but its heartbeat is overdue (here or at another member), and this
    /// device probes it (`suspect`).
    Probed,
}

impl PeerReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerReason::HandshakeRefused => "handshake_refused",
            PeerReason::NoAddress => "no_address",
            PeerReason::Interfaces => "interfaces",
            PeerReason::DialFailed => "dial_failed",
            PeerReason::SessionEnded => "session_ended",
            PeerReason::Dialling => "dialling",
            PeerReason::KeepaliveOverdue => "keepalive_overdue",
            PeerReason::Probed => "probed",
        }
    }
}

/// The result of `ping`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingResult {
    pub name: DeviceName,
    pub id: DeviceId,
    /// `direct` or `relayed`: the path the ping took. Named as `peers`' field (it was `path`;
    /// an older daemon's answer still reads).
    #[serde(alias = "path")]
    pub status: PeerStatus,
    pub via: Option<DeviceName>,
    /// The session's address, for a direct path.
    pub address: Option<SocketAddr>,
    pub rtt_ms: f64,
}

/// The result of `retry`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryResult {
    /// Members without a session dialled now (those with at least one known address).
    pub dialling: usize,
    /// Members without a session that cannot be dialled: no address is known for them (none
    /// given, none learned from a session, discovery has not seen them). They may still dial
    /// this device, or be relayed.
    #[serde(default)]
    pub no_address: Vec<MemberInfo>,
}

/// The result of `members.add` and `members.remove`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub name: DeviceName,
    pub id: DeviceId,
    pub public_key: PublicKey,
    pub addresses: Vec<SocketAddr>,
}

/// One device of the roster, as `members.list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RosterInfo {
    pub name: DeviceName,
    pub id: DeviceId,
    pub public_key: PublicKey,
    pub state: crate::wire::MemberState,
    /// This device's own entry.
    pub this_device: bool,
    /// When the entry last changed (RFC 3339, UTC), if known.
    pub changed: Option<String>,
    /// The device that changed it last (its name, or ID if unknown).
    pub by: Option<String>,
}

/// The result of `send`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendResult {
    /// The message ID (32 hex digits), as handlers see it in `CNSPRCY_MESSAGE_ID`.
    pub id: String,
    /// The devices the message is for.
    pub recipients: Vec<DeviceName>,
    /// Those without a path now: the message waits for them until its TTL runs out.
    pub queued: Vec<DeviceName>,
    /// With `wait`: one reply per recipient, in the order they came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replies: Option<Vec<HandlerReply>>,
}

/// How one recipient's handler ended, for `send` with `wait`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandlerReply {
    pub name: DeviceName,
    pub id: DeviceId,
    /// `ok` (exit 0), `failed` (other exit or signal), `timeout` (the handler's own time-out),
    /// `no_handler`, `refused`, `error` (could not run), or `no_reply` (nothing came back
    /// before the wait ended).
    pub status: String,
    pub exit_code: Option<i32>,
    /// The handler file that ran, relative to the handler directory.
    pub handler: Option<String>,
    /// The handler's standard output, when it is text (see [`Bytes`]); absent when it is
    /// binary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    /// The handler's standard output in base64, when it is binary (then `stdout` is absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_base64: Option<String>,
    /// Why it did not run or failed, in words.
    pub error: Option<String>,
    pub duration_ms: Option<u64>,
}

impl HandlerReply {
    pub fn succeeded(&self) -> bool {
        self.status == "ok"
    }

    /// The standard output's bytes, whichever way they came.
    pub fn stdout_bytes(&self) -> Result<Vec<u8>, base64::DecodeError> {
        Bytes::decode(self.stdout.as_deref(), self.stdout_base64.as_deref())
    }
}

/// Byte strings in answers: as JSON text when they are UTF-8 text that JSON carries about as
/// compactly as base64 (a few quotes, tabs or escape characters are fine; much binary-looking
/// content is not), else in base64. Never both: an answer carrying a 16 MiB value twice would
/// not fit a line a client can read.
pub struct Bytes;

impl Bytes {
    /// `(text, base64)`: exactly one is `Some`.
    pub fn encode(bytes: &[u8]) -> (Option<String>, Option<String>) {
        use base64::Engine;
        match std::str::from_utf8(bytes) {
            Ok(text) if json_len(text) <= bytes.len() / 3 * 4 + 4 => (Some(text.to_owned()), None),
            _ => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
            ),
        }
    }

    pub fn decode(
        text: Option<&str>,
        base64: Option<&str>,
    ) -> Result<Vec<u8>, base64::DecodeError> {
        use base64::Engine;
        match (text, base64) {
            (Some(text), _) => Ok(text.as_bytes().to_vec()),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD.decode(b64),
            (None, None) => Ok(Vec::new()),
        }
    }
}

/// The length of `text` as a JSON string's contents, escapes included.
fn json_len(text: &str) -> usize {
    text.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..0x20 => 6,
            _ => 1,
        })
        .sum()
}

/// A notification of `subscribe`: `{"jsonrpc":"2.0","method":"event","params":WatchEvent}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WatchEvent {
    /// A message arrived for this device and its handler finished.
    Message {
        id: String,
        tag: String,
        from: DeviceName,
        from_id: DeviceId,
        size: usize,
        status: String,
        handler: Option<String>,
    },
    /// This device accepted a message to send.
    Sent {
        id: String,
        tag: String,
        recipients: Vec<DeviceName>,
        size: usize,
    },
    /// A peer's status changed.
    Peer {
        name: DeviceName,
        id: DeviceId,
        status: PeerStatus,
        via: Option<DeviceName>,
    },
    /// A device recorded a message from this device: its handler runs next.
    Delivered {
        id: String,
        tag: String,
        to: DeviceName,
        to_id: DeviceId,
    },
    /// A device's handler for a message from this device finished, or none ran. `status` is
    /// one of `send --wait`'s: ok, failed, timeout, no_handler, refused, error.
    Handled {
        id: String,
        tag: String,
        by: DeviceName,
        by_id: DeviceId,
        status: String,
        exit_code: Option<i32>,
        handler: Option<String>,
        error: Option<String>,
    },
    /// A message from this device expired (its TTL ran out) before it reached `missed`.
    Expired {
        id: String,
        tag: String,
        missed: Vec<DeviceName>,
    },
    /// This subscriber fell behind and missed `missed` events.
    Lagged { missed: u64 },
    /// A key of the replicated store changed on this device (by a local write or one from a
    /// peer). `writer` is the writing device's name (or ID, if it is not a member).
    Store {
        key: String,
        deleted: bool,
        writer: String,
    },
    /// A device that is not a member tried to join with an invitation this device refused:
    /// `reason` is `unknown`, `used` or `expired`.
    JoinRefused {
        id: DeviceId,
        address: std::net::SocketAddr,
        reason: String,
    },
    /// The roster changed: a device became a member (`active`), or was disabled or revoked,
    /// by the device named `by` (this one or another member).
    Member {
        name: DeviceName,
        id: DeviceId,
        state: crate::wire::MemberState,
        by: String,
    },
    /// While `cnspr manage induct` runs: a device on the local network waits to be paired.
    /// Its name and ID are what it advertises; the pairing code proves them.
    JoinCandidate {
        name: String,
        id: DeviceId,
        addresses: Vec<std::net::SocketAddr>,
    },
    /// While `cnspr manage join` waits without a code: a member dialled to induct this device.
    /// `accepted` is false when it was turned away (not the `--expect-inductor` device).
    PairingRequest {
        name: String,
        id: DeviceId,
        address: std::net::SocketAddr,
        accepted: bool,
    },
}

/// The `messages` method's result: what the outbox still owes, and what became of recent
/// messages from this device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessagesInfo {
    /// Oldest first.
    pub outbox: Vec<OutboxMessage>,
    /// Oldest first; at most `messaging::RECENT_OUTCOMES`.
    pub recent: Vec<RecentOutcome>,
    /// Messages delivered here whose handler has not finished, in the order they were handed
    /// over. (Absent from older daemons.)
    #[serde(default)]
    pub handling: Vec<HandlingMessage>,
}

/// A message delivered here whose handler has not finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandlingMessage {
    pub id: String,
    pub tag: String,
    pub from: DeviceName,
    pub size: usize,
    /// `handed over` (to the handler service, which has not started it yet: it waits for its
    /// turn), `running`, or `retrying` (the handler service could not start it; asked again
    /// every 5 s).
    pub state: String,
    /// How often the handler service could not start it.
    pub failed_attempts: u32,
}

/// A message in the outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxMessage {
    pub id: String,
    pub tag: String,
    pub size: usize,
    /// When it was sent and when its TTL runs out (RFC 3339, UTC).
    pub sent: String,
    pub expires: String,
    /// The targets that have not acknowledged it yet.
    pub waiting_for: Vec<DeviceName>,
}

/// A `delivered`, `handled` or `expired` event, with when it happened, and the handler's output
/// of a reply that came after `send --wait` stopped waiting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecentOutcome {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    #[serde(flatten)]
    pub event: WatchEvent,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_base64: Option<String>,
}

/// One key of the replicated store, as `db.get`, `db.list`, `db.set` and `db.del` return it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreItem {
    pub key: String,
    /// The value, if it is UTF-8 text (absent for binary values and deletions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The value in base64, when it is not UTF-8 text (absent otherwise; older daemons sent it
    /// always).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
    /// Whether this is a deletion (only `db.del` returns one).
    #[serde(default)]
    pub deleted: bool,
    /// The device that wrote this version: its name, or its ID if it is not a member.
    pub writer: String,
    pub writer_id: DeviceId,
    /// When it was written, by the writer's hybrid logical clock (RFC 3339, UTC, milliseconds).
    pub time: String,
    /// The same as Unix milliseconds, and the clock's counter within that millisecond.
    pub timestamp: u64,
    pub counter: u32,
}

impl StoreItem {
    /// The value's bytes, from `value` or `value_base64` (empty for a deletion).
    pub fn value_bytes(&self) -> Result<Vec<u8>, base64::DecodeError> {
        Bytes::decode(self.value.as_deref(), self.value_base64.as_deref())
    }
}

/// One page of `db.list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreListPage {
    pub items: Vec<StoreItem>,
    /// Where the next page starts: pass it as `after`. `null` when this page is the last.
    pub next_after: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recent_outcome_is_its_event_with_a_time() {
        let outcome = RecentOutcome {
            time: "2026-12-06T10:00:00.000Z".into(),
            event: WatchEvent::Expired {
                id: "ab".into(),
                tag: "t".into(),
                missed: vec![DeviceName::sanitized("phone")],
            },
            stdout: None,
            stdout_base64: None,
        };
        let json = serde_json::to_value(&outcome).unwrap();
        assert_eq!(json["event"], "expired");
        assert_eq!(json["missed"][0], "phone");
        assert_eq!(json["time"], "2026-12-06T10:00:00.000Z");
        assert_eq!(
            serde_json::from_value::<RecentOutcome>(json).unwrap(),
            outcome
        );
    }

    #[test]
    fn bytes_go_as_text_or_base64_never_both() {
        assert_eq!(Bytes::encode(b"hello\n"), (Some("hello\n".into()), None));
        assert_eq!(Bytes::encode(b""), (Some(String::new()), None));
        // A few escapes are cheaper than base64; mostly control bytes are not.
        let colored = "\u{1b}[1mbold\u{1b}[0m and a long enough line of ordinary text";
        assert_eq!(
            Bytes::encode(colored.as_bytes()).0.as_deref(),
            Some(colored)
        );
        let nuls = [0u8; 64];
        let (text, b64) = Bytes::encode(&nuls);
        assert!(text.is_none());
        assert_eq!(Bytes::decode(None, b64.as_deref()).unwrap(), nuls);
        let binary = [0xffu8, 0xfe, 0x00, 0x41];
        let (text, b64) = Bytes::encode(&binary);
        assert!(text.is_none());
        assert_eq!(
            Bytes::decode(text.as_deref(), b64.as_deref()).unwrap(),
            binary
        );
        // Whatever the choice, the JSON is never much over base64's size.
        for bytes in [&b"\"\\\"\\"[..], &[7u8; 100][..], "é\tü\n".as_bytes()] {
            let (text, b64) = Bytes::encode(bytes);
            let json = serde_json::to_string(&(text, b64)).unwrap();
            assert!(json.len() <= bytes.len() / 3 * 4 + 20, "{json}");
        }
    }
}
