//! The messages devices exchange inside an encrypted session, and how they are cut into Noise
//! transport messages. `docs/protocol.md` is the prose version of this file.
//!
//! Layers, outermost first:
//! 1. TCP carries frames of a 2-byte big-endian length and that many bytes (at most 65535).
//! 2. The first two frames are the Noise IK handshake; every later frame is one Noise transport
//!    message (ChaCha20-Poly1305, 16-byte tag).
//! 3. A decrypted transport message is one flag byte (`MORE` = another chunk of the same message
//!    follows) and a chunk; chunks are joined until one without `MORE`, at most
//!    `MAX_MESSAGE_BYTES` in all.
//! 4. A joined message is one `Message`, encoded with postcard. Variants are only ever appended,
//!    so a device can skip a message type it does not know yet.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Names protocol and version in the Noise prologue: devices speaking another version cannot
/// complete a handshake, instead of misreading each other.
pub const PROLOGUE: &[u8] = b"cnsprcy/3";
pub const PROTOCOL_VERSION: u16 = 3;

/// The largest Noise message (and so TCP frame).
pub const MAX_NOISE_MESSAGE: usize = 65535;
/// ChaCha20-Poly1305's authentication tag.
pub const TAG_LEN: usize = 16;
/// Plaintext bytes one transport message carries besides its flag byte.
pub const MAX_CHUNK: usize = MAX_NOISE_MESSAGE - TAG_LEN - 1;
/// The largest message after joining chunks. A peer that sends more loses its session.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// Flag byte of a chunk: another chunk of the same message follows.
pub const FLAG_MORE: u8 = 1;

/// A device's public key on the wire: its 32 raw bytes.
pub type KeyBytes = [u8; 32];

/// What the two sides tell each other inside the handshake itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakePayload {
    pub version: u16,
    /// Random per daemon start: a session from a new incarnation of a device replaces any
    /// session left over from the previous one.
    pub incarnation: u64,
    /// Sent by a device that is not a member yet and joins with an invitation; encoded after
    /// the fields above only when present, so members' handshakes stay as they were.
    #[serde(skip)]
    pub joining: Option<Joining>,
    /// Sent by a member that dials a device waiting to be paired (`cnspr manage induct`);
    /// encoded like `joining` (a payload carries at most one of the two).
    #[serde(skip)]
    pub inducting: Option<Inducting>,
}

/// The extension a handshake payload may carry after its fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum HandshakeExtension {
    Joining(Joining),
    Inducting(Inducting),
}

/// What an inducting member commits to in its first handshake message: the pairing code both
/// screens show is derived from its nonce, the joiner's and the handshake, and the commitment
/// keeps either side (or a machine in the middle) from choosing its nonce after seeing the
/// other's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inducting {
    /// BLAKE2s of the inductor's pairing nonce, revealed later in `PairNonce`.
    pub commitment: [u8; 32],
    /// The name the inducting member goes by.
    pub name: String,
}

/// What a joining device proves and asks for in its first handshake message (encrypted to the
/// inviter's key, as the whole payload is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joining {
    /// The invitation's one-time secret.
    pub secret: [u8; 16],
    /// The name the joining device goes by.
    pub name: String,
}

/// One message in a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Sent first by both sides: who I am and where I listen.
    Hello(Hello),
    /// Answered at once by `Pong` with the same nonce. `rtt_us` is the sender's smoothed
    /// round-trip time to the receiver, so the side that does not ping still learns it.
    Ping {
        nonce: u64,
        rtt_us: Option<u32>,
    },
    Pong {
        nonce: u64,
    },
    /// The members the sender has a direct session with, and at what round-trip time.
    Neighbors(Vec<Neighbor>),
    /// A tagged message from a script, for the devices in `targets` that this hop serves.
    Data(Data),
    /// Something for one device, from one device, passed on by the devices between them.
    Routed(Routed),
    /// Sent every heartbeat interval to one peer, the sender's successor in key order: the
    /// receiver watches the sender and suspects it when nothing arrived `next_ms` after this
    /// (plus a grace). `next_ms: None` says that no more follow (the sender's successor is
    /// another device now). `root` is the sender's store root digest, so that stores that
    /// differ are compared without a round of their own.
    Heartbeat {
        next_ms: Option<u32>,
        root: u64,
    },
    /// The sender's heartbeats from `peer` stopped: the receiver probes `peer` itself, and
    /// closes its session with it if the probe goes unanswered.
    Suspect {
        peer: KeyBytes,
    },
    /// `by` suspected the receiver, and the sender's probe of the receiver was answered: the
    /// link between `by` and the receiver may be the one that failed, so the receiver probes
    /// `by` (and tells nobody).
    SuspectedBy {
        by: KeyBytes,
    },
    /// The digest of the sender's roster (`RosterEntry`s of every device it knows, this device
    /// and removed ones included): a receiver whose digest differs answers with all its entries.
    RosterDigest(u64),
    /// Roster entries: changes passed on to every session, or a whole roster after a
    /// `RosterDigest` differed. With `answer`, a receiver whose roster still differs from
    /// `entries` after merging them sends its whole roster back (without `answer`).
    RosterEntries {
        entries: Vec<RosterEntry>,
        answer: bool,
    },
    /// From an inviter to a device that tried to join with an invitation it does not accept,
    /// just before it closes the session.
    JoinRefused(JoinRefusal),
    /// Pairing, on a pairing connection only (never in a member's session): a side's random
    /// nonce. The joiner sends its own first; the inductor answers with the one it committed
    /// to in its handshake.
    PairNonce([u8; 32]),
    /// Pairing: whether the user (or `--expect-…`) confirmed the code on the sender's side.
    PairConfirm(bool),
    /// Pairing: from the inductor once both sides confirmed, an invitation the joiner joins
    /// with at once (as `cnspr manage join CODE` would).
    PairInvitation {
        secret: [u8; 16],
        addresses: Vec<std::net::SocketAddr>,
    },
    /// From a device that watches the sender's heartbeats: "send them to me over UDP as this
    /// offer says" (`Some`), or "over the session again" (`None`: they went missing over UDP).
    /// A heartbeat over UDP costs one packet, where one over TCP costs two (the segment and its
    /// acknowledgement).
    UdpHeartbeats(Option<UdpHeartbeatOffer>),
    /// The keepalive interval the sender wants on this session, in milliseconds: longer than
    /// `[mesh] keepalive_interval` when it has many sessions. Both sides keep the session alive
    /// at the larger of the two; a side that never sent one is kept at its own setting.
    KeepaliveInterval(u32),
}

/// Where and how to send heartbeats over UDP: to the port named, at the address of the session
/// the offer came over, each one sealed with `key` (ChaCha20-Poly1305, see
/// `docs/protocol.md`) and marked with `tag`, so that the receiver finds the key without trying
/// every one. Made afresh for every session, and valid until the session ends or another offer
/// on it replaces this one.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpHeartbeatOffer {
    pub port: u16,
    pub tag: u64,
    pub key: [u8; 32],
}

impl std::fmt::Debug for UdpHeartbeatOffer {
    // The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpHeartbeatOffer")
            .field("port", &self.port)
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

/// Why an inviter refused a joining device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinRefusal {
    /// The inviter made no such invitation (or restarted since: invitations live in memory).
    Unknown,
    /// Another device joined with it already.
    Used,
    Expired,
}

impl JoinRefusal {
    /// The word `watch` and the API report it by.
    pub fn as_str(self) -> &'static str {
        match self {
            JoinRefusal::Unknown => "unknown",
            JoinRefusal::Used => "used",
            JoinRefusal::Expired => "expired",
        }
    }

    pub fn explain(self) -> &'static str {
        match self {
            JoinRefusal::Unknown => {
                "the inviting device does not know this invitation (it was cancelled, or that device restarted since); ask for a new one with `cnspr manage invite`"
            }
            JoinRefusal::Used => {
                "this invitation was used already (it works once); ask for a new one with `cnspr manage invite`"
            }
            JoinRefusal::Expired => {
                "this invitation expired; ask for a new one with `cnspr manage invite`"
            }
        }
    }
}

/// Where a device stands in the roster. `Revoked` is final: a revoked key never comes back,
/// and changes it made are void from then on (`docs/protocol.md`, roster).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    #[default]
    Active,
    Disabled,
    Revoked,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Active => "active",
            MemberState::Disabled => "disabled",
            MemberState::Revoked => "revoked",
        }
    }
}

/// One device's entry in the replicated roster. Of two entries for one key, a revoked one
/// wins, then the one with the higher `(version, author)`; `version` is a Unix millisecond
/// count, raised past every version the author has seen. `addresses` are a hint for dialling
/// and do not take part in the comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterEntry {
    pub key: KeyBytes,
    pub name: String,
    pub state: MemberState,
    pub version: u64,
    /// The device that made this change.
    pub author: KeyBytes,
    pub addresses: Vec<std::net::SocketAddr>,
}

/// The most entries a roster holds (removed devices included): more is refused.
pub const MAX_ROSTER_ENTRIES: usize = 512;

/// The one envelope for everything that goes from one device to one other, directly or through
/// relays: relayed pings, acknowledgements, replies and the store's messages. Every device on
/// the way passes it on by the same rule and adds 1 to `hops`; at `MAX_HOPS` it is dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routed {
    pub from: KeyBytes,
    pub to: KeyBytes,
    pub hops: u8,
    pub body: RoutedBody,
}

/// A routed envelope or a `Data` copy passes through at most this many devices.
pub const MAX_HOPS: u8 = 4;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoutedBody {
    /// `cnspr ping` to a member reached through a relay.
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// The sender (a target) got `Data` `id`; sent back to its origin, which stops resending.
    Ack {
        id: MessageId,
    },
    /// A target's handler finished (or none ran): for every message, so that its origin learns
    /// the outcome. `result.stdout` is empty unless the origin asked for replies.
    Reply {
        id: MessageId,
        tag: String,
        result: HandlerResult,
    },
    /// The replicated store: writes pushed to every member, and anti-entropy between two
    /// members (`docs/store.md`).
    Store(StoreBody),
}

/// A hybrid logical clock reading: Unix milliseconds, and a counter for writes within one
/// millisecond (or while the wall clock is behind a timestamp already seen). Ordered by `ms`,
/// then `counter`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct StoreTimestamp {
    pub ms: u64,
    pub counter: u32,
}

/// One key's state: its value, or `None` for a deletion (a tombstone), written at `ts` by the
/// device with the public key `writer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreEntry {
    pub key: String,
    pub ts: StoreTimestamp,
    pub writer: KeyBytes,
    pub value: Option<Vec<u8>>,
}

/// A key and the version the sender holds, without the value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreSummary {
    pub key: String,
    pub ts: StoreTimestamp,
    pub writer: KeyBytes,
}

/// The store's messages. Anti-entropy compares a two-level digest tree over key hashes:
/// `Top` (256 bucket digests), then `Buckets` (the 256 leaf digests of each bucket that
/// differs), then `Summaries` (the versions in each leaf that differs), then `Update`s both ways
/// and a `Want` for what the other side has newer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreBody {
    /// Entries for the receiver to merge: pushed writes, or anti-entropy answers.
    Update(Vec<StoreEntry>),
    /// The sender's bucket digests (256).
    Top(Vec<u64>),
    /// The sender's leaf digests (256 each) of the buckets whose digests differed.
    Buckets(Vec<(u8, Vec<u64>)>),
    /// What the sender holds in the leaves whose digests differed.
    Summaries {
        leaves: Vec<u16>,
        entries: Vec<StoreSummary>,
    },
    /// Keys the receiver holds newer than the sender: send them as an `Update`.
    Want(Vec<String>),
    /// The sender's root digest (all bucket digests folded): a receiver whose root differs
    /// answers with its `Top`.
    Root(u64),
}

/// A message id: random, chosen by the origin.
pub type MessageId = [u8; 16];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Data {
    pub id: MessageId,
    pub origin: KeyBytes,
    /// When the origin accepted the message (Unix milliseconds) and how long it stays valid.
    pub sent_ms: u64,
    pub ttl_ms: u64,
    pub tag: String,
    /// The devices this copy is for: the receiver delivers it to itself if listed, and passes
    /// it on to the rest.
    pub targets: Vec<KeyBytes>,
    pub want_reply: bool,
    pub hops: u8,
    /// Per target, the origin's previous message with the same tag that the target had not
    /// acknowledged when this one was sent: the target runs this one only after that one (or
    /// once that one expired), so that one sender's messages with one tag run in send order.
    pub after: Vec<After>,
    /// Shared, not copied, between the outbox and the copies queued for each hop.
    pub payload: bytes::Bytes,
}

/// "For `target`, run only after `id`, which expires at `expires_ms`."
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct After {
    pub target: KeyBytes,
    pub id: MessageId,
    pub expires_ms: u64,
}

/// How a target's handler ended, for an origin that waits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandlerResult {
    /// The handler file, relative to the handler directory, once one was chosen.
    pub handler: Option<String>,
    pub outcome: HandlerOutcome,
    /// The handler's standard output (at most `ipc::MAX_REPLY_BYTES`).
    pub stdout: Vec<u8>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandlerOutcome {
    Exited { code: i32 },
    Signalled { signal: i32 },
    TimedOut { after_ms: u64 },
    NoHandler,
    Refused { reason: String },
    Failed { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub name: String,
    /// The addresses the sender listens on, as configured (an unspecified IP such as `0.0.0.0`
    /// means "the address you reached me at").
    pub listen: Vec<std::net::SocketAddr>,
    /// The sender's other addresses, where it can be dialled at the ports of its unspecified
    /// `listen` addresses of the same family: those of the interfaces it may use that are up,
    /// without loopback and link-local ones, at most `MAX_ANNOUNCED_ADDRESSES`. Sent again on
    /// every session when they change.
    pub addresses: Vec<std::net::IpAddr>,
}

/// The most addresses a `Hello` names, and the most a receiver takes from one.
pub const MAX_ANNOUNCED_ADDRESSES: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Neighbor {
    pub key: KeyBytes,
    /// Smoothed round-trip time in microseconds, once measured.
    pub rtt_us: Option<u32>,
}

#[derive(Debug, Error)]
#[error("cannot decode message: {0}")]
pub struct DecodeError(#[from] postcard::Error);

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        // Encoding into a growable Vec cannot fail for these plain types.
        postcard::to_stdvec(self).expect("message encodes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(postcard::from_bytes(bytes)?)
    }

    /// The length of [`Message::encode`]'s output, counted without building it.
    pub fn encoded_len(&self) -> usize {
        encoded_len(self)
    }
}

/// The length of `value` encoded with postcard, counted without building it.
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> usize {
    // Counting into the Size flavor cannot fail, as encoding into a Vec cannot.
    postcard::serialize_with_flavor(value, postcard::ser_flavors::Size::default())
        .expect("message encodes")
}

/// The bytes a `Message::Routed` adds around its body: the variant, `from`, `to` and `hops`.
pub const ROUTED_OVERHEAD: usize = 1 + 32 + 32 + 1;

impl HandshakePayload {
    pub fn encode(&self) -> Vec<u8> {
        // Integers, a byte array and a string: encoding cannot fail.
        let mut bytes = postcard::to_stdvec(self).expect("payload encodes");
        let extension = match (&self.joining, &self.inducting) {
            (Some(joining), _) => Some(HandshakeExtension::Joining(joining.clone())),
            (None, Some(inducting)) => Some(HandshakeExtension::Inducting(inducting.clone())),
            (None, None) => None,
        };
        if let Some(extension) = extension {
            bytes.extend(postcard::to_stdvec(&extension).expect("payload encodes"));
        }
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (mut payload, rest): (Self, &[u8]) = postcard::take_from_bytes(bytes)?;
        if !rest.is_empty() {
            match postcard::from_bytes(rest)? {
                HandshakeExtension::Joining(joining) => payload.joining = Some(joining),
                HandshakeExtension::Inducting(inducting) => payload.inducting = Some(inducting),
            }
        }
        Ok(payload)
    }
}

/// Joins chunks into messages, refusing to hold more than `MAX_MESSAGE_BYTES`.
#[derive(Debug, Default)]
pub struct Reassembler {
    partial: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChunkError {
    #[error("empty transport message")]
    Empty,
    #[error("message longer than {MAX_MESSAGE_BYTES} bytes")]
    TooLong,
    #[error("unknown chunk flags {0:#04x}")]
    BadFlags(u8),
}

impl Reassembler {
    /// Takes one decrypted transport message; returns a whole message once its last chunk came.
    pub fn push(&mut self, plaintext: &[u8]) -> Result<Option<Vec<u8>>, ChunkError> {
        let (&flags, chunk) = plaintext.split_first().ok_or(ChunkError::Empty)?;
        if flags & !FLAG_MORE != 0 {
            return Err(ChunkError::BadFlags(flags));
        }
        if self.partial.len() + chunk.len() > MAX_MESSAGE_BYTES {
            self.partial = Vec::new();
            return Err(ChunkError::TooLong);
        }
        self.partial.extend_from_slice(chunk);
        if flags & FLAG_MORE != 0 {
            Ok(None)
        } else {
            Ok(Some(std::mem::take(&mut self.partial)))
        }
    }
}

/// Cuts an encoded message into plaintext chunks, each with its flag byte.
pub fn chunks(message: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    let count = message.len().div_ceil(MAX_CHUNK).max(1);
    (0..count).map(move |i| {
        let start = i * MAX_CHUNK;
        let end = (start + MAX_CHUNK).min(message.len());
        let mut chunk = Vec::with_capacity(end - start + 1);
        chunk.push(if i + 1 < count { FLAG_MORE } else { 0 });
        chunk.extend_from_slice(&message[start..end]);
        chunk
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_payloads_carry_one_extension_and_plain_ones_none() {
        let plain = HandshakePayload {
            version: PROTOCOL_VERSION,
            incarnation: 9,
            joining: None,
            inducting: None,
        };
        // Members' handshakes are exactly the two fields, as before pairing existed.
        assert_eq!(
            plain.encode(),
            postcard::to_stdvec(&(PROTOCOL_VERSION, 9u64)).unwrap()
        );
        let joining = HandshakePayload {
            joining: Some(Joining {
                secret: [1; 16],
                name: "phone".into(),
            }),
            ..plain.clone()
        };
        let inducting = HandshakePayload {
            inducting: Some(Inducting {
                commitment: [2; 32],
                name: "laptop".into(),
            }),
            ..plain.clone()
        };
        for payload in [plain, joining, inducting] {
            assert_eq!(
                HandshakePayload::decode(&payload.encode()).unwrap(),
                payload
            );
        }
        let mut bad = HandshakePayload::decode(&[3, 9]).unwrap().encode();
        bad.push(7);
        assert!(HandshakePayload::decode(&bad).is_err());
    }

    #[test]
    fn messages_round_trip() {
        let messages = [
            Message::Hello(Hello {
                name: "laptop".into(),
                listen: vec!["0.0.0.0:7332".parse().unwrap()],
                addresses: vec![
                    "192.168.1.20".parse().unwrap(),
                    "2001:db8::1".parse().unwrap(),
                ],
            }),
            Message::Ping {
                nonce: 7,
                rtt_us: Some(3),
            },
            Message::Neighbors(vec![Neighbor {
                key: [3; 32],
                rtt_us: Some(800),
            }]),
            Message::Routed(Routed {
                from: [1; 32],
                to: [2; 32],
                hops: 1,
                body: RoutedBody::Pong { nonce: 9 },
            }),
            Message::PairNonce([4; 32]),
            Message::PairConfirm(true),
            Message::PairInvitation {
                secret: [5; 16],
                addresses: vec!["192.168.1.20:7332".parse().unwrap()],
            },
            Message::UdpHeartbeats(Some(UdpHeartbeatOffer {
                port: 7332,
                tag: u64::MAX,
                key: [6; 32],
            })),
            Message::UdpHeartbeats(None),
            Message::KeepaliveInterval(120_000),
        ];
        let routed = RoutedBody::Store(StoreBody::Want(vec!["k".into()]));
        assert_eq!(
            Message::Routed(Routed {
                from: [1; 32],
                to: [2; 32],
                hops: 3,
                body: routed.clone()
            })
            .encoded_len(),
            ROUTED_OVERHEAD + encoded_len(&routed)
        );
        for message in messages {
            let bytes = message.encode();
            assert_eq!(message.encoded_len(), bytes.len());
            assert_eq!(Message::decode(&bytes).unwrap(), message);
        }
        // Variants are only appended: the index is the first byte.
        assert_eq!(Message::UdpHeartbeats(None).encode(), [15, 0]);
        assert!(Message::decode(&[200, 1, 2]).is_err());
        assert!(Message::decode(&[]).is_err());
    }

    #[test]
    fn chunks_join_back_at_every_size() {
        for len in [
            0,
            1,
            MAX_CHUNK - 1,
            MAX_CHUNK,
            MAX_CHUNK + 1,
            3 * MAX_CHUNK + 5,
        ] {
            let message: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut joined = None;
            let mut reassembler = Reassembler::default();
            for chunk in chunks(&message) {
                assert!(chunk.len() <= MAX_NOISE_MESSAGE - TAG_LEN);
                assert!(joined.is_none(), "a message ended early");
                joined = reassembler.push(&chunk).unwrap();
            }
            assert_eq!(joined.unwrap(), message, "len {len}");
        }
    }

    #[test]
    fn reassembly_is_bounded_and_checks_flags() {
        let mut reassembler = Reassembler::default();
        let chunk = {
            let mut c = vec![FLAG_MORE];
            c.extend(std::iter::repeat_n(0u8, MAX_CHUNK));
            c
        };
        let mut result = Ok(None);
        for _ in 0..(MAX_MESSAGE_BYTES / MAX_CHUNK + 2) {
            result = reassembler.push(&chunk);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(ChunkError::TooLong));
        assert_eq!(reassembler.push(&[]), Err(ChunkError::Empty));
        assert_eq!(
            reassembler.push(&[0x80, 1]),
            Err(ChunkError::BadFlags(0x80))
        );
    }
}
