//! The mesh's fuzz harnesses: what an unauthenticated peer can send before and during the
//! handshake, what a member can send after it, and store keys (`cnsprcy::fuzzing` says how they
//! run; `docs/reliability.md` lists them all). The responder is the real `transport::respond`
//! on a loopback TCP connection.

use cnsprcy::fuzzing::{both, text};
use cnsprcy::identity::Identity;
use cnsprcy::wire::{
    self, HandshakePayload, MAX_NOISE_MESSAGE, Message, PROLOGUE, Reassembler, TAG_LEN,
};
use cnsprcy::{fuzz_seeds, fuzz_target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

use crate::store::merge::{self, Invalid};
use crate::transport::{self, Session, TransportError};

/// What the responder says about itself.
const RESPONDER_PAYLOAD: HandshakePayload = HandshakePayload {
    version: wire::PROTOCOL_VERSION,
    incarnation: 2,
    joining: None,
    inducting: None,
};

/// A Noise IK message carries the initiator's ephemeral key (32 bytes) and its encrypted static
/// key (32 + a tag) before the encrypted payload (+ a tag).
const MAX_PAYLOAD: usize = MAX_NOISE_MESSAGE - 32 - (32 + TAG_LEN) - TAG_LEN;

/// One loopback listener and runtime for all the connections of a harness.
struct Loopback {
    runtime: Runtime,
    listener: TcpListener,
}

impl Loopback {
    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("a loopback listener");
        Self { runtime, listener }
    }

    /// A connected pair: (dialling side, accepted side).
    async fn pair(&self) -> (TcpStream, TcpStream) {
        let address = self.listener.local_addr().expect("bound");
        let (dialled, accepted) = tokio::join!(TcpStream::connect(address), self.listener.accept());
        let dialled = dialled.expect("connect on loopback");
        // Closed with a reset, so that long runs do not fill the port range with TIME_WAIT.
        socket2::SockRef::from(&dialled)
            .set_linger(Some(std::time::Duration::ZERO))
            .expect("SO_LINGER");
        (dialled, accepted.expect("accept on loopback").0)
    }
}

/// The bytes of the stream from a peer that dials this device, whatever they are: length
/// prefixes of any value, frames cut short, garbage where the Noise message goes. The
/// responder fails with an error (not a time-out: the stream ends), and answers nothing.
#[test]
fn handshake_stream() {
    let loopback = Loopback::new();
    let identity = Identity::generate();
    let seeds = fuzz_seeds!("handshake_stream");
    fuzz_target!("handshake_stream").for_each(|input| {
        both(&seeds, input, |bytes| {
            loopback.runtime.block_on(async {
                let (mut dialled, accepted) = loopback.pair().await;
                let peer = async {
                    // The responder may close before reading everything: a failed write is
                    // what a real peer would see too.
                    let _ = dialled.write_all(bytes).await;
                    let _ = dialled.shutdown().await;
                    let mut answer = Vec::new();
                    let _ = dialled.read_to_end(&mut answer).await;
                    answer
                };
                let responder =
                    transport::respond(accepted, &identity, |_| true, &RESPONDER_PAYLOAD);
                let (answer, result) = tokio::join!(peer, responder);
                match result {
                    Ok(_) => panic!("a handshake from bytes that no initiator wrote"),
                    Err(TransportError::HandshakeTimeout) => {
                        panic!("the stream ended, yet the responder waited for the time-out")
                    }
                    Err(_) => assert!(answer.is_empty(), "answered {} bytes", answer.len()),
                }
            })
        })
    });
}

/// A well-formed first handshake message from a device that is not a member, carrying any
/// payload: the responder lets it on only if the payload reads as one that joins or inducts
/// in this protocol version (the caller then checks the invitation), and answers nothing
/// otherwise. From a member, any payload that reads in this version is accepted.
#[test]
fn handshake_payload_from_initiator() {
    let loopback = Loopback::new();
    let responder = Identity::generate();
    let initiator = Identity::generate();
    let responder_key = responder.public_key();
    let seeds = fuzz_seeds!("handshake_payload_from_initiator");
    fuzz_target!("handshake_payload_from_initiator").for_each(|input| {
        both(&seeds, input, |bytes| {
            let Some((&member, payload)) = bytes.split_first() else {
                return;
            };
            let member = member % 2 == 1;
            let payload = &payload[..payload.len().min(MAX_PAYLOAD)];
            let expected_ok = match HandshakePayload::decode(payload) {
                Ok(remote) => {
                    remote.version == wire::PROTOCOL_VERSION
                        && (member || remote.joining.is_some() || remote.inducting.is_some())
                }
                Err(_) => false,
            };
            let mut noise = snow::Builder::new(cnsprcy::NOISE_PARAMS.parse().expect("params"))
                .prologue(PROLOGUE)
                .and_then(|b| b.local_private_key(initiator.secret_bytes()))
                .and_then(|b| b.remote_public_key(responder_key.as_bytes()))
                .and_then(|b| b.build_initiator())
                .expect("an initiator");
            let mut message = vec![0u8; MAX_NOISE_MESSAGE];
            let len = noise
                .write_message(payload, &mut message)
                .expect("a payload that fits");
            let mut frame = (len as u16).to_be_bytes().to_vec();
            frame.extend_from_slice(&message[..len]);
            loopback.runtime.block_on(async {
                let (mut dialled, accepted) = loopback.pair().await;
                // Reads one frame, or nothing if the responder closes: an accepted session
                // stays open until the harness drops it.
                let peer = async {
                    let _ = dialled.write_all(&frame).await;
                    let _ = dialled.shutdown().await;
                    let mut length = [0u8; 2];
                    if dialled.read_exact(&mut length).await.is_err() {
                        return Vec::new();
                    }
                    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(length))];
                    dialled
                        .read_exact(&mut answer)
                        .await
                        .expect("a whole frame");
                    answer
                };
                let responding =
                    transport::respond(accepted, &responder, |_| member, &RESPONDER_PAYLOAD);
                let (answer, result) = tokio::join!(peer, responding);
                match result {
                    Ok(session) => {
                        assert!(expected_ok, "accepted {payload:?} (member: {member})");
                        assert_eq!(
                            session.remote,
                            HandshakePayload::decode(payload).expect("read")
                        );
                        assert!(!answer.is_empty(), "an accepted initiator gets an answer");
                    }
                    Err(e) => {
                        assert!(!expected_ok, "refused {payload:?} (member: {member}): {e}");
                        assert!(answer.is_empty(), "answered a refused initiator");
                        if !member {
                            assert!(
                                matches!(
                                    e,
                                    TransportError::NotAMember(_) | TransportError::Protocol(_)
                                ),
                                "{e}"
                            );
                        }
                    }
                }
            })
        })
    });
}

/// After a handshake, a member sends transport messages with any plaintext (flag byte and
/// chunk), correctly encrypted: the receiving session yields exactly what joining the chunks
/// and decoding the messages yields, a message of an unknown kind is skipped, and a bad chunk
/// ends the session with a protocol error. The input is a list of chunks, each a 2-byte length
/// and that many bytes.
#[test]
fn session_chunks() {
    let loopback = Loopback::new();
    let (a, b) = (Identity::generate(), Identity::generate());
    let (a_key, b_key) = (a.public_key(), b.public_key());
    let seeds = fuzz_seeds!("session_chunks");
    fuzz_target!("session_chunks").for_each(|input| {
        both(&seeds, input, |bytes| {
            let mut chunks = Vec::new();
            let mut rest = bytes;
            while let [high, low, tail @ ..] = rest {
                let len = usize::from(u16::from_be_bytes([*high, *low]))
                    .min(tail.len())
                    .min(MAX_NOISE_MESSAGE - TAG_LEN);
                chunks.push(&tail[..len]);
                rest = &tail[len..];
            }
            // What the session must yield: each whole message, then the error that ends it.
            let mut expected = Vec::new();
            let mut reassembler = Reassembler::default();
            let mut failed = false;
            for chunk in &chunks {
                match reassembler.push(chunk) {
                    Ok(Some(message)) => expected.push(Message::decode(&message).ok()),
                    Ok(None) => {}
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            loopback.runtime.block_on(async {
                let (dialled, accepted) = loopback.pair().await;
                let (sender, receiver) = tokio::join!(
                    transport::initiate(dialled, &a, &b_key, &RESPONDER_PAYLOAD),
                    transport::respond(accepted, &b, |k| *k == a_key, &RESPONDER_PAYLOAD),
                );
                let (sender, mut receiver): (Session, Session) =
                    (sender.expect("initiated"), receiver.expect("responded"));
                let (sender_reader, mut sender_writer) = (sender.reader, sender.writer);
                let sending = async move {
                    for chunk in &chunks {
                        if sender_writer.send_chunk(chunk).await.is_err() {
                            break;
                        }
                    }
                    let _ = sender_writer.flush().await;
                    // Ends the stream (FIN) once everything is out.
                    drop(sender_writer);
                };
                // Closes the session at its end, as the mesh does, so that a sender still
                // sending fails rather than waiting for room in the socket's buffers.
                let receiving = async move {
                    let mut got = Vec::new();
                    loop {
                        match receiver.reader.recv().await {
                            Ok(message) => got.push(message),
                            Err(e) => return (got, e),
                        }
                    }
                };
                let ((got, end), ()) = tokio::join!(receiving, sending);
                drop(sender_reader);
                assert_eq!(got, expected);
                if failed {
                    assert!(matches!(end, TransportError::Protocol(_)), "{end}");
                } else {
                    assert!(end.closed_by_peer(), "{end}");
                }
            })
        })
    });
}

/// Store keys, from a client (`db.set`) or a peer: accepted ones are non-empty printable text
/// within the limit.
#[test]
fn store_key() {
    let seeds = fuzz_seeds!("store_key");
    fuzz_target!("store_key").for_each(|input| {
        both(&seeds, input, |bytes| {
            let key = text(bytes);
            match merge::check_key(&key) {
                Ok(()) => {
                    assert!(!key.is_empty() && key.len() <= merge::MAX_KEY_BYTES);
                    assert!(!key.chars().any(char::is_control), "{key:?}");
                }
                Err(e @ (Invalid::EmptyKey | Invalid::KeyTooLong(_) | Invalid::KeyControl)) => {
                    cnsprcy::fuzzing::assert_says_something(&e)
                }
                Err(other) => panic!("a key refused for {other}"),
            }
        })
    });
}
