//! Tagged messages, as the node handles them: accepting a send (outbox first, then copies along
//! the routing plan), passing copies on, delivering to this device's handler once, acknowledging,
//! replying, and raising the built-in events. The bookkeeping lives in `messaging`, the choice of
//! copies in `routing`.

use std::collections::HashSet;
use std::time::Duration;

use cnsprcy::api::{Bytes, HandlerReply, PeerStatus, SendResult, WatchEvent};
use cnsprcy::identity::PublicKey;
use cnsprcy::ipc::{EVENT_MESSAGE, MAX_PAYLOAD_BYTES, Outcome, Run, RunResult, Sender};
use cnsprcy::rpc::RpcError;
use cnsprcy::wire::{
    Ack, Data, HandlerOutcome, HandlerResult, KeyBytes, Message, MessageId, Reply,
};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::messaging::{OutboxError, Wait, expires_ms, id_text, now_ms};
use crate::node::{Event, Node, code, rpc_error};
use crate::peers::Reach;
use crate::roster::Member;
use crate::routing;

/// How often expired messages are dropped and unacknowledged ones considered for resending.
pub const HOUSEKEEPING: Duration = Duration::from_secs(5);
/// A message passes through at most this many devices.
const MAX_DATA_HOPS: u8 = 4;
/// The default time a message waits for an unreachable target.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// What `send` asks for, checked by the API layer except for what needs the roster.
pub struct SendRequest {
    pub tag: String,
    /// Member names or IDs; `None` sends to every member.
    pub to: Option<Vec<String>>,
    pub payload: Vec<u8>,
    /// Wait this long for every recipient's handler.
    pub wait: Option<Duration>,
    pub ttl: Duration,
    /// With `wait`: hand each reply here as it arrives instead of in the result.
    pub progress: Option<tokio::sync::mpsc::UnboundedSender<HandlerReply>>,
}

/// A send waiting for replies, with the answer it will complete.
pub struct PendingSend {
    reply: oneshot::Sender<Result<SendResult, RpcError>>,
    result: SendResult,
}

impl Node {
    pub(crate) fn start_send(
        &mut self,
        send: SendRequest,
        reply: oneshot::Sender<Result<SendResult, RpcError>>,
    ) {
        match self.accept_send(send) {
            Ok((id, result, Some(wait))) => {
                self.waits.insert(id, (wait, PendingSend { reply, result }));
            }
            Ok((_, result, None)) => {
                let _ = reply.send(Ok(result));
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Stores and sends a message; for a send that waits, also returns what to wait for.
    fn accept_send(
        &mut self,
        send: SendRequest,
    ) -> Result<(MessageId, SendResult, Option<Wait>), RpcError> {
        if send.payload.len() > MAX_PAYLOAD_BYTES {
            return Err(RpcError::invalid_params(format!(
                "the payload is {} bytes; the limit is {MAX_PAYLOAD_BYTES} bytes (16 MiB)",
                send.payload.len()
            )));
        }
        let members: Vec<Member> = match &send.to {
            None => self.roster.members().to_vec(),
            Some(names) => names
                .iter()
                .map(|n| self.roster.find(n).cloned())
                .collect::<Result<_, _>>()
                .map_err(crate::node::roster_error)?,
        };
        if members.is_empty() {
            return Err(rpc_error(
                code::NOT_FOUND,
                "there are no members to send to; add one with `cnspr manage add`",
            ));
        }
        let targets: Vec<KeyBytes> = members.iter().map(|m| *m.public_key.as_bytes()).collect();
        let data = Data {
            id: rand::random(),
            origin: *self.own_key().as_bytes(),
            sent_ms: now_ms(),
            ttl_ms: send.ttl.as_millis() as u64,
            tag: send.tag,
            targets: targets.clone(),
            want_reply: send.wait.is_some(),
            hops: 0,
            payload: send.payload.into(),
        };
        let id = data.id;
        let (tag, size) = (data.tag.clone(), data.payload.len());
        let sent_tag = tag.clone();
        self.outbox
            .add(data, targets.clone())
            .map_err(|e| self.outbox_error(e))?;
        let queued = members
            .iter()
            .filter(|m| !self.table.reach(&m.public_key).is_reachable())
            .map(|m| m.name.clone())
            .collect();
        let result = SendResult {
            id: id_text(&id),
            recipients: members.iter().map(|m| m.name.clone()).collect(),
            queued,
            replies: None,
        };
        tracing::info!(tag = %tag, id = %result.id, "sending a message to {} member(s)", members.len());
        let _ = self.handle.watch.send(WatchEvent::Sent {
            id: result.id.clone(),
            tag: sent_tag,
            recipients: result.recipients.clone(),
            size,
        });
        self.flush_outbox();
        let wait = send.wait.map(|wait| Wait {
            tag: tag.clone(),
            expected: targets.into_iter().collect::<HashSet<_>>(),
            replied: HashSet::new(),
            replies: Vec::new(),
            deadline: (Instant::now() + wait).into_std(),
            progress: send.progress,
        });
        Ok((id, result, wait))
    }

    fn outbox_error(&self, e: OutboxError) -> RpcError {
        match e {
            OutboxError::Full {
                ref waiting_for, ..
            } => {
                let waiting: Vec<String> = waiting_for
                    .iter()
                    .map(|(key, n)| {
                        format!("{} ({n})", self.member_name(&PublicKey::from_bytes(*key)))
                    })
                    .collect();
                rpc_error(
                    code::OUTBOX_FULL,
                    format!(
                        "{e}; the message was not sent. Most wait for {}: they go out when it is reachable again, or expire at the end of their TTL",
                        waiting.join(", ")
                    ),
                )
            }
            OutboxError::Io(e) => {
                rpc_error(code::STORAGE, format!("cannot store the message: {e}"))
            }
        }
    }

    /// Sends what the outbox owes to targets that can be reached now, oldest first, as fast as
    /// their sessions take it: what a full session queue did not take stays due, and goes when
    /// the queue has room again (`Event::Writable`).
    pub(crate) fn flush_outbox(&mut self) {
        let now = Instant::now().into_std();
        let table = &self.table;
        let due = self.outbox.due(
            |k| table.reach(&PublicKey::from_bytes(*k)).is_reachable(),
            now,
        );
        // A hop whose queue refused a copy gets nothing newer this round, so that copies to it
        // keep their order.
        let mut full: HashSet<PublicKey> = HashSet::new();
        for (data, targets) in due {
            for target in self.pass_on(&data, &targets, &mut full) {
                self.outbox.queued(&data.id, &target, now);
            }
        }
    }

    /// Queues copies of `data` for `targets` along the routing plan, except to hops in `full`
    /// (which gains the hops whose queue is full); returns the targets served by queued copies.
    fn pass_on(
        &self,
        data: &Data,
        targets: &[PublicKey],
        full: &mut HashSet<PublicKey>,
    ) -> Vec<PublicKey> {
        let plan = routing::plan(targets, &self.table);
        let mut served = Vec::new();
        for (hop, serves) in plan.copies {
            if full.contains(&hop) {
                continue;
            }
            let copy = Data {
                targets: serves.iter().map(|k| *k.as_bytes()).collect(),
                ..data.clone()
            };
            let queued = self
                .sessions
                .get(&hop)
                .is_some_and(|live| live.tx.try_send(Message::Data(copy)));
            if queued {
                served.extend(serves);
            } else {
                tracing::debug!(peer = %self.member_name(&hop), "its queue is full; the message copy waits");
                full.insert(hop);
            }
        }
        served
    }

    pub(crate) fn on_data(&mut self, mut data: Data) {
        let own = *self.own_key().as_bytes();
        let origin = PublicKey::from_bytes(data.origin);
        if !self.table.contains(&origin) || data.hops >= MAX_DATA_HOPS {
            return;
        }
        if now_ms() >= expires_ms(&data) {
            return;
        }
        if data.targets.contains(&own) {
            // Recorded before acknowledged: an ack for a message this device could lose would
            // stop the origin's resends for good.
            let first_time = match self.delivered.insert(&data) {
                Ok(first_time) => first_time,
                Err(e) => {
                    tracing::warn!(
                        "cannot record a delivered message (the sender will resend): {e}"
                    );
                    return;
                }
            };
            self.route(
                &origin,
                Message::Ack(Ack {
                    id: data.id,
                    from: own,
                    to: data.origin,
                    hops: 0,
                }),
            );
            if first_time {
                self.deliver(&data);
            }
        }
        data.hops += 1;
        let rest: Vec<PublicKey> = data
            .targets
            .iter()
            .filter(|k| **k != own)
            .map(|k| PublicKey::from_bytes(*k))
            .filter(|k| self.table.contains(k))
            .collect();
        if !rest.is_empty() {
            // Passed on once; the origin resends what does not arrive.
            self.pass_on(&data, &rest, &mut HashSet::new());
        }
    }

    /// Has the handler service run this device's handler for `data`.
    fn deliver(&mut self, data: &Data) {
        let origin = PublicKey::from_bytes(data.origin);
        let from = self.roster.get(&origin).map(|m| Sender {
            name: m.name.to_string(),
            id: m.id().to_string(),
        });
        let run = Run {
            run_id: 0,
            event: EVENT_MESSAGE.to_owned(),
            tag: data.tag.clone(),
            from,
            message_id: Some(id_text(&data.id)),
            device: self.name.to_string(),
            env: Vec::new(),
            payload: data.payload.to_vec(),
        };
        let (handlers, events) = (self.handlers.clone(), self.handle.events.clone());
        let size = run.payload.len();
        // The node keeps what it needs to reply, not the payload.
        let data = Box::new(Data {
            payload: Default::default(),
            ..data.clone()
        });
        self.tasks.spawn(async move {
            let result = handlers.run(run).await;
            let _ = events.send(Event::HandlerDone { data, size, result }).await;
        });
    }

    pub(crate) fn on_handler_done(
        &mut self,
        data: Data,
        size: usize,
        result: Result<RunResult, String>,
    ) {
        let origin = PublicKey::from_bytes(data.origin);
        let result: HandlerResult = result
            .unwrap_or_else(|reason| RunResult {
                handler: None,
                outcome: Outcome::Failed { reason },
                stdout: Vec::new(),
                duration_ms: 0,
            })
            .into();
        let (status, _, _) = reply_status(&result.outcome, &data.tag, "");
        let name = self.member_name(&origin);
        tracing::info!(
            tag = %data.tag,
            from = %name,
            id = %id_text(&data.id),
            status,
            "message handled"
        );
        if let Some(member) = self.roster.get(&origin) {
            let _ = self.handle.watch.send(WatchEvent::Message {
                id: id_text(&data.id),
                tag: data.tag.clone(),
                from: member.name.clone(),
                from_id: member.id(),
                size,
                status: status.to_owned(),
                handler: result.handler.clone(),
            });
        }
        if data.want_reply {
            self.route(
                &origin,
                Message::Reply(Reply {
                    id: data.id,
                    from: *self.own_key().as_bytes(),
                    to: data.origin,
                    hops: 0,
                    result,
                }),
            );
        }
    }

    pub(crate) fn on_ack(&mut self, mut ack: Ack) {
        if ack.to == *self.own_key().as_bytes() {
            self.outbox.acked(&ack.id, &ack.from);
        } else if ack.hops < MAX_DATA_HOPS {
            ack.hops += 1;
            let to = PublicKey::from_bytes(ack.to);
            self.route(&to, Message::Ack(ack));
        }
    }

    pub(crate) fn on_reply(&mut self, mut reply: Reply) {
        if reply.to == *self.own_key().as_bytes() {
            let Some(tag) = self.waits.get(&reply.id).map(|(w, _)| w.tag.clone()) else {
                return;
            };
            let shown = self.handler_reply(&reply.from, reply.result, &tag);
            if let Some((wait, _)) = self.waits.get_mut(&reply.id) {
                wait.add(reply.from, shown);
            }
        } else if reply.hops < MAX_DATA_HOPS {
            reply.hops += 1;
            let to = PublicKey::from_bytes(reply.to);
            self.route(&to, Message::Reply(reply));
        }
    }

    pub(crate) fn next_wait_deadline(&self) -> Option<Instant> {
        self.waits
            .values()
            .map(|(w, _)| Instant::from_std(w.deadline))
            .min()
    }

    /// Answers the sends whose replies are all in or whose wait ran out (all of them when the
    /// daemon stops).
    pub(crate) fn finish_waits(&mut self, all: bool) {
        let now = Instant::now().into_std();
        let done: Vec<[u8; 16]> = self
            .waits
            .iter()
            .filter(|(_, (w, _))| all || w.complete() || w.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            let Some((wait, pending)) = self.waits.remove(&id) else {
                continue;
            };
            let mut result = pending.result;
            if wait.expected.is_empty() {
                let _ = pending.reply.send(Ok(result));
                continue;
            }
            let mut replies = wait.replies;
            for missing in wait.expected.iter().filter(|k| !wait.replied.contains(*k)) {
                let key = PublicKey::from_bytes(*missing);
                let reachable = self.table.reach(&key).is_reachable();
                replies.push(HandlerReply {
                    name: self
                        .roster
                        .get(&key)
                        .map(|m| m.name.clone())
                        .unwrap_or_else(|| {
                            cnsprcy::identity::DeviceName::sanitized(&key.device_id().to_string())
                        }),
                    id: key.device_id(),
                    status: "no_reply".into(),
                    exit_code: None,
                    handler: None,
                    stdout: None,
                    stdout_base64: None,
                    error: Some(if reachable {
                        "no reply before the wait ended".into()
                    } else {
                        "unreachable; the message waits for it until its TTL runs out".into()
                    }),
                    duration_ms: None,
                });
            }
            match &wait.progress {
                Some(progress) => {
                    for reply in replies {
                        let _ = progress.send(reply);
                    }
                }
                None => result.replies = Some(replies),
            }
            let _ = pending.reply.send(Ok(result));
        }
    }

    fn handler_reply(&self, from: &KeyBytes, result: HandlerResult, tag: &str) -> HandlerReply {
        let key = PublicKey::from_bytes(*from);
        let name = self
            .roster
            .get(&key)
            .map(|m| m.name.clone())
            .unwrap_or_else(|| cnsprcy::identity::DeviceName::sanitized("unknown"));
        let (status, exit_code, error) = reply_status(&result.outcome, tag, name.as_str());
        let (stdout, stdout_base64) = Bytes::encode(&result.stdout);
        HandlerReply {
            name,
            id: key.device_id(),
            status: status.into(),
            exit_code,
            handler: result.handler,
            stdout,
            stdout_base64,
            error,
            duration_ms: Some(result.duration_ms),
        }
    }

    pub(crate) fn expire_messages(&mut self) {
        for (id, missed) in self.outbox.expire(now_ms()) {
            let names: Vec<String> = missed
                .iter()
                .map(|k| self.member_name(&PublicKey::from_bytes(*k)))
                .collect();
            tracing::warn!(
                id = %id_text(&id),
                "a message expired before it reached {}",
                names.join(", ")
            );
        }
    }

    /// A member's status changed: tell subscribers and run the built-in event handlers.
    pub(crate) fn peer_changed(&mut self, member: &Member, reach: Reach, was_reachable: bool) {
        let (status, via, address) = match reach {
            Reach::Direct { addr, .. } => (PeerStatus::Direct, None, Some(addr)),
            Reach::Relayed { via, .. } => (PeerStatus::Relayed, Some(via), None),
            Reach::Unreachable => (PeerStatus::Unreachable, None, None),
        };
        let via_name = via.and_then(|v| self.roster.get(&v).map(|m| m.name.clone()));
        let _ = self.handle.watch.send(WatchEvent::Peer {
            name: member.name.clone(),
            id: member.id(),
            status,
            via: via_name.clone(),
        });
        let event = match (reach.is_reachable(), was_reachable) {
            (true, false) => "peer-up",
            (false, true) => "peer-down",
            (true, true) => "peer-address",
            (false, false) => return,
        };
        let mut env = vec![
            ("CNSPRCY_PEER".to_owned(), member.name.to_string()),
            ("CNSPRCY_PEER_ID".to_owned(), member.id().to_string()),
            ("CNSPRCY_PEER_STATUS".to_owned(), status.as_str().to_owned()),
        ];
        if let Some(addr) = address {
            env.push(("CNSPRCY_PEER_ADDRESS".to_owned(), addr.to_string()));
        }
        if let Some(via) = via_name {
            env.push(("CNSPRCY_PEER_VIA".to_owned(), via.to_string()));
        }
        self.raise_event(event, env);
    }

    pub(crate) fn event_run(&self, event: &str, env: Vec<(String, String)>) -> Run {
        Run {
            run_id: 0,
            event: event.to_owned(),
            tag: event.to_owned(),
            from: None,
            message_id: None,
            device: self.name.to_string(),
            env,
            payload: Vec::new(),
        }
    }

    /// Runs the handler for a built-in event, if there is one, without waiting for it.
    pub(crate) fn raise_event(&self, event: &str, env: Vec<(String, String)>) {
        let run = self.event_run(event, env);
        let handlers = self.handlers.clone();
        let event = event.to_owned();
        self.tasks.spawn(async move {
            match handlers.run(run).await {
                Ok(RunResult {
                    outcome: Outcome::NoHandler,
                    ..
                }) => {}
                Ok(result) => tracing::debug!(%event, ?result.outcome, "event handler finished"),
                Err(e) => tracing::debug!(%event, "event handler not run: {e}"),
            }
        });
    }
}

/// The word `send --wait` shows for an outcome, and why the handler did not succeed (for
/// `tag` on `device`).
fn reply_status(
    outcome: &HandlerOutcome,
    tag: &str,
    device: &str,
) -> (&'static str, Option<i32>, Option<String>) {
    match outcome {
        HandlerOutcome::Exited { code: 0 } => ("ok", Some(0), None),
        HandlerOutcome::Exited { code } => ("failed", Some(*code), None),
        HandlerOutcome::Signalled { signal } => {
            ("failed", None, Some(format!("killed by signal {signal}")))
        }
        HandlerOutcome::TimedOut { after_ms } => (
            "timeout",
            None,
            Some(format!("timed out after {after_ms} ms and was killed")),
        ),
        HandlerOutcome::NoHandler => (
            "no_handler",
            None,
            Some(format!("no handler for {tag} on {device}")),
        ),
        HandlerOutcome::Refused { reason } => ("refused", None, Some(reason.clone())),
        HandlerOutcome::Failed { reason } => ("error", None, Some(reason.clone())),
    }
}
