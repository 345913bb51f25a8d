//! Sessions on the wire: the Noise IK handshake over TCP and the encrypted, chunked messages
//! after it (see `cnsprcy::wire` for the layers). No peer state lives here; the node decides who
//! may connect and what a session is for.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cnsprcy::identity::{Identity, PublicKey};
use cnsprcy::wire::{
    self, HandshakePayload, MAX_NOISE_MESSAGE, Message, PROLOGUE, Reassembler, TAG_LEN,
};
use futures_util::{SinkExt, StreamExt};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::{Decoder, Framed, FramedRead, FramedWrite, LengthDelimitedCodec};

/// A handshake must complete within this time, or the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub type Wire = Framed<TcpStream, LengthDelimitedCodec>;

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("noise: {0}")]
    Noise(#[from] snow::Error),
    #[error("handshake did not complete within {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout,
    #[error("closed by the other side")]
    Closed,
    #[error("not a member: device {}", .0.device_id())]
    NotAMember(PublicKey),
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl TransportError {
    /// Whether the other side ended the connection during the handshake (a Noise responder
    /// answers nothing to a stranger, nor to a message it cannot decrypt: it closes).
    pub fn closed_by_peer(&self) -> bool {
        use std::io::ErrorKind;
        match self {
            TransportError::Closed => true,
            TransportError::Io(e) => matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }
}

/// Frames of a 2-byte length and at most 65535 bytes: exactly one Noise message each.
pub fn wire(stream: TcpStream) -> Wire {
    let codec = LengthDelimitedCodec::builder()
        .length_field_length(2)
        .max_frame_length(MAX_NOISE_MESSAGE)
        .new_codec();
    Framed::new(stream, codec)
}

fn builder(identity: &Identity) -> snow::Builder<'_> {
    // The pattern string is a constant of ours and valid.
    snow::Builder::new(cnsprcy::NOISE_PARAMS.parse().expect("valid noise params"))
        .prologue(PROLOGUE)
        .expect("prologue set once")
        .local_private_key(identity.secret_bytes())
        .expect("private key set once")
}

async fn next_frame(wire: &mut Wire) -> Result<bytes::BytesMut, TransportError> {
    match wire.next().await {
        Some(frame) => Ok(frame?),
        None => Err(TransportError::Closed),
    }
}

/// Devices of another protocol version fail the prologue already; this catches a payload that
/// claims one anyway.
fn check_version(remote: &HandshakePayload) -> Result<(), TransportError> {
    if remote.version == wire::PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(TransportError::Protocol(format!(
            "protocol version {} (this device speaks {})",
            remote.version,
            wire::PROTOCOL_VERSION
        )))
    }
}

/// An established session, split into its two directions so that a long send never stops the
/// other side's messages from being read (two devices sending large messages to each other at
/// once would otherwise both block on full socket buffers).
pub struct Session {
    pub reader: SessionReader,
    pub writer: SessionWriter,
    pub remote_key: PublicKey,
    pub remote: HandshakePayload,
    /// The Noise handshake hash: both sides hold the same one, and a machine in the middle
    /// (running a handshake with each) holds two others. Pairing derives its code from it.
    pub handshake_hash: Vec<u8>,
}

pub struct SessionReader {
    frames: FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
    /// Whole frames that arrived with the handshake, read before `frames`.
    early: std::collections::VecDeque<bytes::BytesMut>,
    /// When the last frame arrived: a long message in many chunks is traffic too.
    noise: Arc<snow::StatelessTransportState>,
    nonce: u64,
    reassembler: Reassembler,
    buffer: Vec<u8>,
}

pub struct SessionWriter {
    frames: FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>,
    noise: Arc<snow::StatelessTransportState>,
    nonce: u64,
    buffer: Vec<u8>,
}

/// Dials into a session with `remote_key` over `stream` (we are the Noise initiator).
pub async fn initiate(
    stream: TcpStream,
    identity: &Identity,
    remote_key: &PublicKey,
    payload: &HandshakePayload,
) -> Result<Session, TransportError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut noise = builder(identity)
            .remote_public_key(remote_key.as_bytes())?
            .build_initiator()?;
        let mut wire = wire(stream);
        let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
        let len = noise.write_message(&payload.encode(), &mut buf)?;
        wire.send(Bytes::copy_from_slice(&buf[..len])).await?;
        let reply = next_frame(&mut wire).await?;
        let len = noise.read_message(&reply, &mut buf)?;
        let remote = HandshakePayload::decode(&buf[..len])
            .map_err(|e| TransportError::Protocol(e.to_string()))?;
        check_version(&remote)?;
        Session::new(wire, noise, *remote_key, remote)
    })
    .await
    .unwrap_or(Err(TransportError::HandshakeTimeout))
}

/// Accepts a session on `stream` (we are the Noise responder) if `is_member` accepts the
/// initiator's key, or the initiator joins with an invitation or inducts this device (which
/// the caller checks);
/// otherwise drops the connection before answering.
pub async fn respond(
    stream: TcpStream,
    identity: &Identity,
    is_member: impl Fn(&PublicKey) -> bool,
    payload: &HandshakePayload,
) -> Result<Session, TransportError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut noise = builder(identity).build_responder()?;
        let mut wire = wire(stream);
        let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
        let first = next_frame(&mut wire).await?;
        let len = noise.read_message(&first, &mut buf)?;
        let remote_key: [u8; 32] = noise
            .get_remote_static()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| TransportError::Protocol("no static key in handshake".into()))?;
        let remote_key = PublicKey::from_bytes(remote_key);
        let member = is_member(&remote_key);
        let remote = match HandshakePayload::decode(&buf[..len]) {
            Ok(remote) => remote,
            Err(_) if !member => return Err(TransportError::NotAMember(remote_key)),
            Err(e) => return Err(TransportError::Protocol(e.to_string())),
        };
        if !member && remote.joining.is_none() && remote.inducting.is_none() {
            return Err(TransportError::NotAMember(remote_key));
        }
        check_version(&remote)?;
        let len = noise.write_message(&payload.encode(), &mut buf)?;
        wire.send(Bytes::copy_from_slice(&buf[..len])).await?;
        Session::new(wire, noise, remote_key, remote)
    })
    .await
    .unwrap_or(Err(TransportError::HandshakeTimeout))
}

impl Session {
    fn new(
        wire: Wire,
        noise: snow::HandshakeState,
        remote_key: PublicKey,
        remote: HandshakePayload,
    ) -> Result<Self, TransportError> {
        let handshake_hash = noise.get_handshake_hash().to_vec();
        let noise = Arc::new(noise.into_stateless_transport_mode()?);
        let parts = wire.into_parts();
        let (read, write) = parts.io.into_split();
        // Frames the peer sent right after the handshake may have arrived with it. A new
        // FramedRead does not look at its buffer before the socket has more to read, so
        // whole frames are taken out here; the rest (part of a frame) waits for its remainder.
        let mut codec = parts.codec.clone();
        let mut buffered = parts.read_buf;
        let mut early = std::collections::VecDeque::new();
        while let Some(frame) = codec.decode(&mut buffered)? {
            early.push_back(frame);
        }
        let mut frames = FramedRead::new(read, codec);
        frames.read_buffer_mut().extend_from_slice(&buffered);
        Ok(Self {
            reader: SessionReader {
                frames,
                early,
                noise: noise.clone(),
                nonce: 0,
                reassembler: Reassembler::default(),
                buffer: Vec::new(),
            },
            writer: SessionWriter {
                frames: FramedWrite::new(write, parts.codec),
                noise,
                nonce: 0,
                buffer: Vec::new(),
            },
            remote_key,
            remote,
            handshake_hash,
        })
    }
}

impl SessionWriter {
    /// Encrypts and sends one message (in as many chunks as it needs).
    pub async fn send(&mut self, message: &Message) -> Result<(), TransportError> {
        self.send_bytes(&message.encode()).await
    }

    /// Encrypts one message and queues its chunks; they go with the next `flush` (or before,
    /// once the queued bytes pass the codec's buffer).
    pub async fn feed(&mut self, message: &Message) -> Result<(), TransportError> {
        for chunk in wire::chunks(&message.encode()) {
            self.send_chunk(&chunk).await?;
        }
        Ok(())
    }

    /// Sends an already encoded message; also lets tests send what a broken peer would.
    pub async fn send_bytes(&mut self, encoded: &[u8]) -> Result<(), TransportError> {
        for chunk in wire::chunks(encoded) {
            self.send_chunk(&chunk).await?;
        }
        self.flush().await
    }

    /// Sends what `send_chunk` queued.
    pub async fn flush(&mut self) -> Result<(), TransportError> {
        SinkExt::<Bytes>::flush(&mut self.frames).await?;
        Ok(())
    }

    /// Encrypts one transport message as it is (flag byte included) and queues it: a test's
    /// broken peer sends any chunk this way, then `flush`es.
    pub async fn send_chunk(&mut self, chunk: &[u8]) -> Result<(), TransportError> {
        grow_to(&mut self.buffer, chunk.len() + TAG_LEN);
        let len = self
            .noise
            .write_message(self.nonce, chunk, &mut self.buffer)?;
        self.nonce += 1;
        debug_assert!(len == chunk.len() + TAG_LEN);
        self.frames
            .feed(Bytes::copy_from_slice(&self.buffer[..len]))
            .await?;
        Ok(())
    }
}

/// Makes `buffer` at least `len` bytes long. A session's buffers grow with the largest frame it
/// has carried, not to the largest one possible: an idle mesh's sessions carry frames of tens of
/// bytes, and two 64 KiB buffers for each were 0.9 MB of the mesh service's memory with 9 peers
/// (docs/performance.md).
fn grow_to(buffer: &mut Vec<u8>, len: usize) {
    if buffer.len() < len {
        buffer.resize(len.min(MAX_NOISE_MESSAGE), 0);
    }
}

/// What one transport message (frame) from the peer brought.
#[derive(Debug)]
pub enum Received {
    /// The last chunk of a message: the whole message, or `None` for a kind this version does
    /// not know (skipped).
    Message(Option<Message>),
    /// A chunk of a message that is not whole yet.
    Chunk,
}

impl SessionReader {
    /// Reads one transport message; errors end the session. Cancel-safe: it only waits for the
    /// next frame, and keeps partial messages across calls.
    pub async fn recv_frame(&mut self) -> Result<Received, TransportError> {
        let frame = match self.early.pop_front() {
            Some(frame) => frame,
            None => match self.frames.next().await {
                Some(frame) => frame?,
                None => return Err(TransportError::Closed),
            },
        };
        grow_to(&mut self.buffer, frame.len().saturating_sub(TAG_LEN));
        let len = self
            .noise
            .read_message(self.nonce, &frame, &mut self.buffer)?;
        self.nonce += 1;
        let joined = self
            .reassembler
            .push(&self.buffer[..len])
            .map_err(|e| TransportError::Protocol(e.to_string()))?;
        Ok(match joined {
            Some(bytes) => Received::Message(Message::decode(&bytes).ok()),
            None => Received::Chunk,
        })
    }

    /// Reads transport messages until a whole message is in. `Ok(None)` is a message of a kind
    /// this version does not know (skipped). Cancel-safe, as `recv_frame`.
    pub async fn recv(&mut self) -> Result<Option<Message>, TransportError> {
        loop {
            if let Received::Message(message) = self.recv_frame().await? {
                return Ok(message);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    static P1: HandshakePayload = HandshakePayload {
        version: wire::PROTOCOL_VERSION,
        incarnation: 1,
        joining: None,
        inducting: None,
    };
    static P2: HandshakePayload = HandshakePayload {
        version: wire::PROTOCOL_VERSION,
        incarnation: 2,
        joining: None,
        inducting: None,
    };

    #[tokio::test]
    async fn members_complete_a_handshake_and_exchange_large_messages() {
        let (a, b) = (Identity::generate(), Identity::generate());
        let (sa, sb) = pair().await;
        let b_key = b.public_key();
        let a_key = a.public_key();
        let (ra, rb) = tokio::join!(
            initiate(sa, &a, &b_key, &P1),
            respond(sb, &b, |k| *k == a_key, &P2),
        );
        let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(ra.remote.incarnation, 2);
        assert_eq!(rb.remote.incarnation, 1);
        assert_eq!(rb.remote_key, a_key);
        assert_eq!(ra.handshake_hash, rb.handshake_hash);
        assert_eq!(ra.handshake_hash.len(), 32);
        let big = Message::Hello(wire::Hello {
            name: "x".repeat(3_000_000),
            listen: vec![],
            addresses: vec![],
        });
        // Both sides sending large messages at once must not deadlock.
        let (sent_a, sent_b, got_b, got_a) = tokio::join!(
            ra.writer.send(&big),
            rb.writer.send(&big),
            rb.reader.recv(),
            ra.reader.recv()
        );
        sent_a.unwrap();
        sent_b.unwrap();
        assert_eq!(got_b.unwrap(), Some(big.clone()));
        assert_eq!(got_a.unwrap(), Some(big));
        rb.writer.send(&Message::Pong { nonce: 5 }).await.unwrap();
        assert_eq!(
            ra.reader.recv().await.unwrap(),
            Some(Message::Pong { nonce: 5 })
        );
    }

    #[tokio::test]
    async fn a_session_s_buffers_grow_with_the_frames_it_carries() {
        let (a, b) = (Identity::generate(), Identity::generate());
        let (sa, sb) = pair().await;
        let (b_key, a_key) = (b.public_key(), a.public_key());
        let (ra, rb) = tokio::join!(
            initiate(sa, &a, &b_key, &P1),
            respond(sb, &b, |k| *k == a_key, &P2),
        );
        let (mut ra, mut rb) = (ra.unwrap(), rb.unwrap());
        ra.writer
            .send(&Message::Ping {
                nonce: 1,
                rtt_us: None,
            })
            .await
            .unwrap();
        assert_eq!(
            rb.reader.recv().await.unwrap(),
            Some(Message::Ping {
                nonce: 1,
                rtt_us: None
            })
        );
        // An idle session's frames are tens of bytes: so are its buffers.
        assert!(
            ra.writer.buffer.capacity() < 1024,
            "{}",
            ra.writer.buffer.capacity()
        );
        assert!(
            rb.reader.buffer.capacity() < 1024,
            "{}",
            rb.reader.buffer.capacity()
        );
        let big = Message::Hello(wire::Hello {
            name: "x".repeat(200_000),
            listen: vec![],
            addresses: vec![],
        });
        let (sent, got) = tokio::join!(ra.writer.send(&big), rb.reader.recv());
        sent.unwrap();
        assert_eq!(got.unwrap(), Some(big));
        // A large message needs the largest frame, and no more.
        assert_eq!(ra.writer.buffer.len(), MAX_NOISE_MESSAGE);
        assert_eq!(rb.reader.buffer.len(), MAX_NOISE_MESSAGE - TAG_LEN);
    }

    #[tokio::test]
    async fn messages_that_arrive_with_the_handshake_are_read_at_once() {
        let (a, b) = (Identity::generate(), Identity::generate());
        let (sa, sb) = pair().await;
        let (a_key, b_key) = (a.public_key(), b.public_key());
        let responder = tokio::spawn(async move {
            let mut session = respond(sb, &b, |k| *k == a_key, &P2).await.unwrap();
            session
                .writer
                .send(&Message::Pong { nonce: 1 })
                .await
                .unwrap();
            session
                .writer
                .send(&Message::Pong { nonce: 2 })
                .await
                .unwrap();
            // Nothing more is sent while the other side reads.
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        // The initiator's handshake by hand, reading only once the reply and both messages
        // are in, so that they arrive in one buffer as they may on a real network.
        let mut noise = builder(&a)
            .remote_public_key(b_key.as_bytes())
            .unwrap()
            .build_initiator()
            .unwrap();
        let mut wire = wire(sa);
        let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
        let len = noise.write_message(&P1.encode(), &mut buf).unwrap();
        wire.send(Bytes::copy_from_slice(&buf[..len]))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let reply = next_frame(&mut wire).await.unwrap();
        let len = noise.read_message(&reply, &mut buf).unwrap();
        let remote = HandshakePayload::decode(&buf[..len]).unwrap();
        let mut session = Session::new(wire, noise, a.public_key(), remote).unwrap();
        for nonce in [1, 2] {
            let got = tokio::time::timeout(Duration::from_secs(5), session.reader.recv()).await;
            assert_eq!(
                got.expect("read at once").unwrap(),
                Some(Message::Pong { nonce })
            );
        }
        responder.abort();
    }

    #[tokio::test]
    async fn strangers_are_refused() {
        let (a, b) = (Identity::generate(), Identity::generate());
        let (sa, sb) = pair().await;
        let b_key = b.public_key();
        let (ra, rb) = tokio::join!(
            initiate(sa, &a, &b_key, &P1),
            respond(sb, &b, |_| false, &P2),
        );
        assert!(matches!(rb, Err(TransportError::NotAMember(k)) if k == a.public_key()));
        assert!(ra.is_err_and(|e| e.closed_by_peer()));
    }

    #[tokio::test]
    async fn dialling_the_wrong_key_fails() {
        let (a, b, c) = (
            Identity::generate(),
            Identity::generate(),
            Identity::generate(),
        );
        let (sa, sb) = pair().await;
        let c_key = c.public_key();
        let (ra, rb) = tokio::join!(
            initiate(sa, &a, &c_key, &P1),
            respond(sb, &b, |_| true, &P2),
        );
        assert!(
            matches!(rb, Err(TransportError::Noise(_))),
            "b cannot decrypt a handshake meant for c"
        );
        // The dialling side sees the same as a stranger does: the connection closed.
        assert!(ra.is_err_and(|e| e.closed_by_peer()));
    }
}
