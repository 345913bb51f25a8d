//! The tasks that run one established session: a writer that sends what is queued, and a reader
//! that hands every message to the node. Pure I/O: keepalive and everything else are the core's.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cnsprcy::wire::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::core::SessionId;
use crate::node::Event;
use crate::transport::{Received, Session, SessionReader, SessionWriter};

/// Queued messages the writer sends with one flush at most, so that a long queue does not
/// keep the session's other work waiting.
const BATCH_MESSAGES: usize = 64;

/// Messages queued for one session at most; when full, further sends to that peer are dropped.
pub const OUTBOUND_QUEUE: usize = 256;

/// Encoded bytes queued for one session at most, so that large messages (up to 16 MiB of payload
/// each) behind a slow link hold tens of megabytes, not `OUTBOUND_QUEUE` times 16 MiB. One
/// message may always be queued alone, whatever its size.
pub const OUTBOUND_BYTES: usize = 32 * 1024 * 1024;

/// The sending side of a session's queue, bounded both in messages and in bytes. What does not
/// fit is dropped: data and store writes are resent (outbox, anti-entropy), keepalives and
/// announcements come again.
#[derive(Clone)]
pub struct Outbound {
    tx: mpsc::Sender<Queued>,
    bytes: Arc<Semaphore>,
    /// Set when a message did not fit; the writer then says when it has written something
    /// (`Event::Writable`), so that what waits for room goes at once.
    refused: Arc<AtomicBool>,
}

/// A queued message with its share of the byte budget, given back once it is written.
pub struct Queued {
    message: Message,
    _bytes: OwnedSemaphorePermit,
}

impl Outbound {
    pub fn new() -> (Self, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let bytes = Arc::new(Semaphore::new(OUTBOUND_BYTES));
        let refused = Arc::new(AtomicBool::new(false));
        (Self { tx, bytes, refused }, rx)
    }

    /// Queues `message`; gives it back when the queue is full (in messages or bytes) or the
    /// session has ended.
    pub fn try_send(&self, message: Message) -> Result<(), Box<Message>> {
        let queued = self.queue(message);
        if queued.is_err() {
            self.refused.store(true, Ordering::Relaxed);
        }
        queued
    }

    fn queue(&self, message: Message) -> Result<(), Box<Message>> {
        // Capped so that a message larger than the whole budget still goes, alone.
        let size = message.encoded_len().min(OUTBOUND_BYTES);
        let Ok(size) = u32::try_from(size) else {
            return Err(Box::new(message));
        };
        let Ok(permit) = Arc::clone(&self.bytes).try_acquire_many_owned(size) else {
            return Err(Box::new(message));
        };
        self.tx
            .try_send(Queued {
                message,
                _bytes: permit,
            })
            .map_err(|e| Box::new(e.into_inner().message))
    }

    /// Whether a message was refused since the last call (and forget it).
    fn take_refused(&self) -> bool {
        self.refused.swap(false, Ordering::Relaxed)
    }
}

pub struct SessionTask {
    pub session: Session,
    pub id: SessionId,
    /// The node's sender for this session's queue.
    pub outbound_tx: Outbound,
    pub outbound: mpsc::Receiver<Queued>,
    pub events: mpsc::Sender<Event>,
    pub cancel: CancellationToken,
}

/// How often the reader says that part of a large message arrived (it counts as traffic).
const ACTIVITY_INTERVAL: Duration = Duration::from_secs(1);

impl SessionTask {
    /// Runs the session until it ends, then tells the node why.
    pub async fn run(self) {
        let Self {
            session,
            id,
            outbound_tx,
            outbound,
            events,
            cancel,
        } = self;
        let writer = tokio::spawn(write_loop(
            session.writer,
            outbound,
            Writable {
                outbound: outbound_tx,
                events: events.clone(),
                session: id,
            },
            cancel.clone(),
        ));
        let reason = tokio::select! {
            reason = read_loop(session.reader, id, events.clone(), cancel.clone()) => reason,
            written = writer => match written {
                Ok(reason) => reason,
                Err(e) => format!("writer crashed: {e}"),
            },
        };
        // Stops the writer too, when the reader ended first.
        cancel.cancel();
        let _ = events
            .send(Event::Closed {
                session: id,
                reason,
            })
            .await;
    }
}

/// How the writer tells the node that its queue has room again.
struct Writable {
    outbound: Outbound,
    events: mpsc::Sender<Event>,
    session: SessionId,
}

async fn write_loop(
    mut writer: SessionWriter,
    mut outbound: mpsc::Receiver<Queued>,
    writable: Writable,
    cancel: CancellationToken,
) -> String {
    loop {
        let queued = tokio::select! {
            _ = cancel.cancelled() => return "closed by this device".into(),
            queued = outbound.recv() => queued,
        };
        let Some(mut queued) = queued else {
            return "closed by this device".into();
        };
        // What else is queued by now goes in the same write: an acknowledgement and the reply
        // that follows it, or a burst of store writes, cost one system call and, on an idle
        // link, one segment. The codec writes out on its own what passes its buffer.
        let mut batched = 1;
        let sent = loop {
            if let Err(e) = writer.feed(&queued.message).await {
                break Err(e);
            }
            // Its bytes go back to the budget: they are in the codec's buffer or sent.
            drop(queued);
            if batched == BATCH_MESSAGES {
                break writer.flush().await;
            }
            match outbound.try_recv() {
                Ok(next) => queued = next,
                Err(_) => break writer.flush().await,
            }
            batched += 1;
        };
        if let Err(e) = sent {
            return format!("send failed: {e}");
        }
        if writable.outbound.take_refused() {
            // Best effort: when the node is busy, the next refusal asks again.
            let _ = writable.events.try_send(Event::Writable {
                session: writable.session,
            });
        }
    }
}

/// Hands every whole message to the node, and says now and then that a long one is on its way.
/// It wakes only when a frame arrives: an idle session costs no timer.
async fn read_loop(
    mut reader: SessionReader,
    session: SessionId,
    events: mpsc::Sender<Event>,
    cancel: CancellationToken,
) -> String {
    let mut reported = Instant::now();
    loop {
        let received = tokio::select! {
            _ = cancel.cancelled() => return "closed by this device".into(),
            received = reader.recv_frame() => received,
        };
        match received {
            Ok(Received::Chunk) => {
                if reported.elapsed() >= ACTIVITY_INTERVAL {
                    reported = Instant::now();
                    if events.send(Event::Activity { session }).await.is_err() {
                        return "the node stopped".into();
                    }
                }
            }
            Ok(Received::Message(Some(message))) => {
                reported = Instant::now();
                if events
                    .send(Event::Frame { session, message })
                    .await
                    .is_err()
                {
                    return "the node stopped".into();
                }
            }
            Ok(Received::Message(None)) => {
                tracing::debug!("skipped a message of an unknown kind");
            }
            Err(e) => return e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnsprcy::wire::Data;

    fn data(payload_len: usize) -> Message {
        Message::Data(Data {
            id: Default::default(),
            origin: [1; 32],
            sent_ms: 0,
            ttl_ms: 60_000,
            tag: "t".into(),
            targets: vec![[2; 32]],
            want_reply: false,
            hops: 0,
            after: Vec::new(),
            payload: vec![0; payload_len].into(),
        })
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_and_gives_them_back_when_written() {
        let (outbound, mut rx) = Outbound::new();
        assert!(
            outbound.try_send(data(20 << 20)).is_ok(),
            "one large message fits"
        );
        assert!(
            outbound.try_send(data(20 << 20)).is_err(),
            "a second one is over the budget"
        );
        assert!(
            outbound.try_send(data(1 << 20)).is_ok(),
            "smaller ones still fit"
        );
        // Written (received and dropped): its bytes are free again.
        drop(rx.try_recv().expect("the first message is queued"));
        assert!(outbound.try_send(data(20 << 20)).is_ok());
    }

    #[test]
    fn a_message_larger_than_the_budget_goes_alone() {
        let (outbound, mut rx) = Outbound::new();
        assert!(outbound.try_send(data(OUTBOUND_BYTES + 1)).is_ok());
        assert!(outbound.try_send(Message::Pong { nonce: 1 }).is_err());
        drop(rx.try_recv().expect("queued"));
        assert!(outbound.try_send(Message::Pong { nonce: 1 }).is_ok());
    }

    #[test]
    fn the_queue_is_bounded_in_messages() {
        let (outbound, _rx) = Outbound::new();
        for nonce in 0..OUTBOUND_QUEUE as u64 {
            assert!(outbound.try_send(Message::Pong { nonce }).is_ok());
        }
        assert!(outbound.try_send(Message::Pong { nonce: 0 }).is_err());
    }

    /// What waits in the queue goes out in batches, in order, a large message among them.
    #[tokio::test]
    async fn the_writer_sends_what_is_queued_in_order() {
        use cnsprcy::identity::Identity;
        use cnsprcy::wire::{HandshakePayload, PROTOCOL_VERSION};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (ida, idb) = (Identity::generate(), Identity::generate());
        let (ka, kb) = (ida.public_key(), idb.public_key());
        let payload = HandshakePayload {
            version: PROTOCOL_VERSION,
            incarnation: 1,
            joining: None,
            inducting: None,
        };
        let (sa, sb) = tokio::join!(
            crate::transport::initiate(a.unwrap(), &ida, &kb, &payload),
            crate::transport::respond(b.unwrap().0, &idb, |k| *k == ka, &payload),
        );
        let (sa, mut sb) = (sa.unwrap(), sb.unwrap());
        let (outbound, rx) = Outbound::new();
        let count = 3 * BATCH_MESSAGES as u64;
        for nonce in 0..count {
            let message = if nonce == BATCH_MESSAGES as u64 / 2 {
                data(3 << 20)
            } else {
                Message::Pong { nonce }
            };
            assert!(outbound.try_send(message).is_ok());
        }
        let (events, _events_rx) = mpsc::channel(1);
        let cancel = CancellationToken::new();
        let writable = Writable {
            outbound: outbound.clone(),
            events,
            session: 1,
        };
        let writer = tokio::spawn(write_loop(sa.writer, rx, writable, cancel.clone()));
        for nonce in 0..count {
            let got = sb.reader.recv().await.unwrap().unwrap();
            if nonce == BATCH_MESSAGES as u64 / 2 {
                assert_eq!(got, data(3 << 20));
            } else {
                assert_eq!(got, Message::Pong { nonce });
            }
        }
        cancel.cancel();
        assert_eq!(writer.await.unwrap(), "closed by this device");
    }

    #[test]
    fn nothing_is_queued_once_the_session_ended() {
        let (outbound, rx) = Outbound::new();
        drop(rx);
        assert!(outbound.try_send(Message::Pong { nonce: 1 }).is_err());
    }
}
