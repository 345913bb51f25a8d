//! The tasks that run one established session: a writer that sends what is queued, and a reader
//! that keeps the session alive, answers pings and hands everything else to the node.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cnsprcy::identity::PublicKey;
use cnsprcy::wire::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::liveness::{Action, Liveness, Role};
use crate::node::Event;
use crate::transport::{Session, SessionWriter};

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

    /// Queues `message`; false when it was dropped because the queue is full (in messages or
    /// bytes) or the session has ended.
    pub fn try_send(&self, message: Message) -> bool {
        let queued = self.queue(message);
        if !queued {
            self.refused.store(true, Ordering::Relaxed);
        }
        queued
    }

    fn queue(&self, message: Message) -> bool {
        // Capped so that a message larger than the whole budget still goes, alone.
        let size = message.encoded_len().min(OUTBOUND_BYTES);
        let Ok(size) = u32::try_from(size) else {
            return false;
        };
        let Ok(permit) = Arc::clone(&self.bytes).try_acquire_many_owned(size) else {
            return false;
        };
        self.tx
            .try_send(Queued {
                message,
                _bytes: permit,
            })
            .is_ok()
    }

    /// Whether a message was refused since the last call (and forget it).
    fn take_refused(&self) -> bool {
        self.refused.swap(false, Ordering::Relaxed)
    }
}

pub struct SessionTask {
    pub session: Session,
    pub id: u64,
    pub role: Role,
    pub interval: Duration,
    pub timeout: Duration,
    /// The node's sender for this session's queue; pongs and keepalive pings go there too.
    pub outbound_tx: Outbound,
    pub outbound: mpsc::Receiver<Queued>,
    pub events: mpsc::Sender<Event>,
    pub cancel: CancellationToken,
}

impl SessionTask {
    /// Runs the session until it ends, then tells the node why.
    pub async fn run(self) {
        let Self {
            session,
            id,
            role,
            interval,
            timeout,
            outbound_tx,
            outbound,
            events,
            cancel,
        } = self;
        let key = session.remote_key;
        let writer = tokio::spawn(write_loop(
            session.writer,
            outbound,
            Writable {
                outbound: outbound_tx.clone(),
                events: events.clone(),
            },
            cancel.clone(),
        ));
        let reader = ReadLoop {
            key,
            id,
            liveness: Liveness::new(role, Instant::now().into_std(), interval, timeout),
            interval,
            timeout,
            outbound: outbound_tx,
            events: events.clone(),
        };
        let reason = tokio::select! {
            reason = reader.run(session.reader, cancel.clone()) => reason,
            written = writer => match written {
                Ok(reason) => reason,
                Err(e) => format!("writer crashed: {e}"),
            },
        };
        // Stops the writer too, when the reader ended first.
        cancel.cancel();
        let _ = events
            .send(Event::Closed {
                key,
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
        let Some(queued) = queued else {
            return "closed by this device".into();
        };
        let written = writer.send(&queued.message).await;
        // Its bytes go back to the budget.
        drop(queued);
        if let Err(e) = written {
            return format!("send failed: {e}");
        }
        if writable.outbound.take_refused() {
            // Best effort: when the node is busy, the next refusal asks again.
            let _ = writable.events.try_send(Event::Writable);
        }
    }
}

struct ReadLoop {
    key: PublicKey,
    id: u64,
    liveness: Liveness,
    interval: Duration,
    timeout: Duration,
    outbound: Outbound,
    events: mpsc::Sender<Event>,
}

impl ReadLoop {
    async fn run(
        mut self,
        mut reader: crate::transport::SessionReader,
        cancel: CancellationToken,
    ) -> String {
        loop {
            let deadline = Instant::from_std(self.liveness.next_deadline());
            tokio::select! {
                _ = cancel.cancelled() => return "closed by this device".into(),
                _ = tokio::time::sleep_until(deadline) => {
                    // Chunks of a message still being received count as traffic.
                    self.liveness.on_receive(reader.last_frame());
                    match self.liveness.poll(Instant::now().into_std(), rand::random()) {
                        Action::Ping { nonce, rtt } => {
                            let rtt_us = rtt.map(|d| d.as_micros().min(u32::MAX.into()) as u32);
                            // A full queue means the link is busy; the next ping will do.
                            self.outbound.try_send(Message::Ping { nonce, rtt_us });
                        }
                        Action::Dead => {
                            return format!(
                                "nothing received for {}",
                                humantime::format_duration(self.interval + self.timeout)
                            );
                        }
                        Action::Wait => {}
                    }
                }
                received = reader.recv() => {
                    let now = Instant::now().into_std();
                    match received {
                        Ok(Some(message)) => {
                            self.liveness.on_receive(now);
                            if !self.handle(message, now).await {
                                return "the node stopped".into();
                            }
                        }
                        Ok(None) => {
                            self.liveness.on_receive(now);
                            tracing::debug!(peer = %self.key.device_id(), "skipped a message of an unknown kind");
                        }
                        Err(e) => return e.to_string(),
                    }
                }
            }
        }
    }

    /// Answers pings, measures pongs, passes the rest on. Returns false if the node is gone.
    async fn handle(&mut self, message: Message, now: std::time::Instant) -> bool {
        let (key, session) = (self.key, self.id);
        let event = match message {
            Message::Ping { nonce, rtt_us } => {
                self.liveness
                    .on_ping_report(rtt_us.map(|us| Duration::from_micros(us.into())));
                self.outbound.try_send(Message::Pong { nonce });
                self.liveness
                    .rtt()
                    .map(|rtt| Event::Rtt { key, session, rtt })
            }
            Message::Pong { nonce } if self.liveness.on_pong(nonce, now) => self
                .liveness
                .rtt()
                .map(|rtt| Event::Rtt { key, session, rtt }),
            message => Some(Event::Message {
                key,
                session,
                message,
            }),
        };
        match event {
            Some(event) => self.events.send(event).await.is_ok(),
            None => true,
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
            payload: vec![0; payload_len].into(),
        })
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_and_gives_them_back_when_written() {
        let (outbound, mut rx) = Outbound::new();
        assert!(outbound.try_send(data(20 << 20)), "one large message fits");
        assert!(
            !outbound.try_send(data(20 << 20)),
            "a second one is over the budget"
        );
        assert!(outbound.try_send(data(1 << 20)), "smaller ones still fit");
        // Written (received and dropped): its bytes are free again.
        drop(rx.try_recv().expect("the first message is queued"));
        assert!(outbound.try_send(data(20 << 20)));
    }

    #[test]
    fn a_message_larger_than_the_budget_goes_alone() {
        let (outbound, mut rx) = Outbound::new();
        assert!(outbound.try_send(data(OUTBOUND_BYTES + 1)));
        assert!(!outbound.try_send(Message::Pong { nonce: 1 }));
        drop(rx.try_recv().expect("queued"));
        assert!(outbound.try_send(Message::Pong { nonce: 1 }));
    }

    #[test]
    fn the_queue_is_bounded_in_messages() {
        let (outbound, _rx) = Outbound::new();
        for nonce in 0..OUTBOUND_QUEUE as u64 {
            assert!(outbound.try_send(Message::Pong { nonce }));
        }
        assert!(!outbound.try_send(Message::Pong { nonce: 0 }));
    }

    #[test]
    fn nothing_is_queued_once_the_session_ended() {
        let (outbound, rx) = Outbound::new();
        drop(rx);
        assert!(!outbound.try_send(Message::Pong { nonce: 1 }));
    }
}
