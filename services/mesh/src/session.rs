//! The tasks that run one established session: a writer that sends what is queued, and a reader
//! that keeps the session alive, answers pings and hands everything else to the node.

use std::time::Duration;

use cnsprcy::identity::PublicKey;
use cnsprcy::wire::Message;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::liveness::{Action, Liveness, Role};
use crate::node::Event;
use crate::transport::{Session, SessionWriter};

/// Messages queued for one session; when full, further sends to that peer are dropped.
pub const OUTBOUND_QUEUE: usize = 256;

pub struct SessionTask {
    pub session: Session,
    pub id: u64,
    pub role: Role,
    pub interval: Duration,
    pub timeout: Duration,
    /// The node's sender for this session's queue; pongs and keepalive pings go there too.
    pub outbound_tx: mpsc::Sender<Message>,
    pub outbound: mpsc::Receiver<Message>,
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
        let writer = tokio::spawn(write_loop(session.writer, outbound, cancel.clone()));
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

async fn write_loop(
    mut writer: SessionWriter,
    mut outbound: mpsc::Receiver<Message>,
    cancel: CancellationToken,
) -> String {
    loop {
        let message = tokio::select! {
            _ = cancel.cancelled() => return "closed by this device".into(),
            message = outbound.recv() => message,
        };
        let Some(message) = message else {
            return "closed by this device".into();
        };
        if let Err(e) = writer.send(&message).await {
            return format!("send failed: {e}");
        }
    }
}

struct ReadLoop {
    key: PublicKey,
    id: u64,
    liveness: Liveness,
    interval: Duration,
    timeout: Duration,
    outbound: mpsc::Sender<Message>,
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
                            let _ = self.outbound.try_send(Message::Ping { nonce, rtt_us });
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
                let _ = self.outbound.try_send(Message::Pong { nonce });
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
