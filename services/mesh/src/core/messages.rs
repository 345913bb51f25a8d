//! Tagged messages: accepting a send (into the outbox, then copies along the routing plan),
//! passing copies on, delivering to this device's handler once (the id durable first), acks,
//! replies and waits, and the outbox's resends and expiry. `docs/protocol.md#tagged-messages`.

use std::time::Duration;

use cnsprcy::api::{Bytes, HandlerReply, SendResult, WatchEvent};
use cnsprcy::identity::{DeviceName, PublicKey};
use cnsprcy::ipc::{EVENT_MESSAGE, MAX_PAYLOAD_BYTES, Outcome, Run, RunResult, Sender};
use cnsprcy::rpc::RpcError;
use cnsprcy::wire::{
    Data, HandlerOutcome, HandlerResult, KeyBytes, MAX_HOPS, Message, MessageId, RoutedBody,
};

use super::api::{code, error};
use super::{Answer, Core, Now, Output, PersistOp, RequestId, RunId, SessionId, StoreAccess};
use crate::det::Set;
use crate::messaging::{Delivered, OutboxChange, OutboxError, Wait, expires_ms, id_text};
use crate::roster::Member;
use crate::routing;

/// The default time a message waits for an unreachable target.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// What `send` asks for, checked by the API layer except for what needs the roster.
#[derive(Debug)]
pub struct SendRequest {
    pub tag: String,
    /// Member names or IDs; `None` sends to every member.
    pub to: Option<Vec<String>>,
    pub payload: Vec<u8>,
    /// Wait this long for every recipient's handler.
    pub wait: Option<Duration>,
    pub ttl: Duration,
    /// With `wait`: each reply goes out as `Output::Progress` as it arrives.
    pub stream: bool,
}

impl<S: StoreAccess> Core<S> {
    /// Takes a message into the outbox (made durable before `send` is answered) and sends the
    /// first copies at once (that need not wait for the disk).
    pub(super) fn start_send(&mut self, request: RequestId, send: SendRequest, now: Now) {
        if send.payload.len() > MAX_PAYLOAD_BYTES {
            let e = RpcError::invalid_params(format!(
                "the payload is {} bytes; the limit is {MAX_PAYLOAD_BYTES} bytes (16 MiB)",
                send.payload.len()
            ));
            return self.answer(request, Answer::Send(Err(e)));
        }
        let members: Result<Vec<Member>, RpcError> = match &send.to {
            None => Ok(self.roster.members().to_vec()),
            Some(names) => names
                .iter()
                .map(|n| self.roster.find(n).cloned())
                .collect::<Result<_, _>>()
                .map_err(super::api::roster_error),
        };
        let members = match members {
            Ok(members) if members.is_empty() => {
                let e = error(
                    code::NOT_FOUND,
                    "there are no members to send to; add one with `cnspr manage add`",
                );
                return self.answer(request, Answer::Send(Err(e)));
            }
            Ok(members) => members,
            Err(e) => return self.answer(request, Answer::Send(Err(e))),
        };
        let targets: Vec<KeyBytes> = members.iter().map(|m| *m.public_key.as_bytes()).collect();
        let data = Data {
            id: rand::Rng::random(&mut self.rng),
            origin: self.own_bytes(),
            sent_ms: now.wall_ms,
            ttl_ms: send.ttl.as_millis() as u64,
            tag: send.tag,
            targets: targets.clone(),
            want_reply: send.wait.is_some(),
            hops: 0,
            payload: send.payload.into(),
        };
        let (id, tag, size) = (data.id, data.tag.clone(), data.payload.len());
        let entry = match self.outbox.add(data, targets.clone()) {
            Ok(entry) => {
                self.outbox_dirty = true;
                entry
            }
            Err(e) => {
                let e = self.outbox_error(e);
                return self.answer(request, Answer::Send(Err(e)));
            }
        };
        let result = SendResult {
            id: id_text(&id),
            recipients: members.iter().map(|m| m.name.clone()).collect(),
            queued: members
                .iter()
                .filter(|m| !self.table.reach(&m.public_key).is_reachable())
                .map(|m| m.name.clone())
                .collect(),
            replies: None,
        };
        tracing::info!(tag = %tag, id = %result.id, "sending a message to {} member(s)", members.len());
        self.watch(WatchEvent::Sent {
            id: result.id.clone(),
            tag: tag.clone(),
            recipients: result.recipients.clone(),
            size,
        });
        if let Some(wait) = send.wait {
            self.waits.insert(
                id,
                Wait {
                    request,
                    tag,
                    expected: targets.into_iter().collect(),
                    replied: Set::default(),
                    replies: Vec::new(),
                    deadline: now.mono + wait,
                    streaming: send.stream,
                    stored: false,
                    result: result.clone(),
                },
            );
        }
        if let Some(token) = self.persist(PersistOp::OutboxSave(Box::new(entry)), true) {
            self.storing.insert(token, (request, id, result));
        }
    }

    /// The outbox entry of a send is on disk (or could not be written).
    pub(super) fn send_stored(
        &mut self,
        request: RequestId,
        id: MessageId,
        result: SendResult,
        stored: Result<(), String>,
        _now: Now,
    ) {
        match stored {
            Ok(()) => match self.waits.get_mut(&id) {
                // A send that waits is answered when its wait ends.
                Some(wait) => wait.stored = true,
                None => self.answer(request, Answer::Send(Ok(result))),
            },
            Err(reason) => {
                // Not kept: it is not resent. Copies sent already may still arrive.
                self.outbox.discard(&id);
                self.waits.remove(&id);
                self.persist(PersistOp::OutboxRemove(id), false);
                let e = error(
                    code::STORAGE,
                    format!(
                        "{reason}; the message is not kept for members that are unreachable (those reachable now may have got it)"
                    ),
                );
                self.answer(request, Answer::Send(Err(e)));
            }
        }
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
                error(
                    code::OUTBOX_FULL,
                    format!(
                        "{e}; the message was not sent. Most wait for {}: they go out when it is reachable again, or expire at the end of their TTL",
                        waiting.join(", ")
                    ),
                )
            }
        }
    }

    fn outbox_changed(&mut self, change: OutboxChange) {
        let op = match change {
            OutboxChange::Saved(entry) => PersistOp::OutboxSave(entry),
            OutboxChange::Removed(id) => PersistOp::OutboxRemove(id),
        };
        self.persist(op, false);
    }

    /// Sends what the outbox owes to targets that can be reached now, oldest first, as fast as
    /// their sessions take it: what a full session queue did not take stays due, and goes when
    /// the queue has room again (`Input::Writable`).
    pub(super) fn flush_outbox(&mut self, now: Now) {
        if !std::mem::take(&mut self.outbox_dirty) || self.outbox.is_empty() {
            return;
        }
        let table = &self.table;
        let due = self.outbox.due(
            |k| table.reach(&PublicKey::from_bytes(*k)).is_reachable(),
            now.mono,
        );
        // A hop whose queue is full gets nothing newer, so that copies to it keep their order.
        let mut full: Set<PublicKey> = self
            .sessions
            .iter()
            .filter(|(_, live)| live.full)
            .map(|(key, _)| *key)
            .collect();
        for (data, targets) in due {
            for target in self.pass_on(&data, &targets, &mut full) {
                self.outbox.queued(&data.id, &target, now.mono);
            }
        }
    }

    /// Sends copies of `data` for `targets` along the routing plan, except to hops in `full`;
    /// returns the targets served by the copies sent.
    fn pass_on(
        &mut self,
        data: &Data,
        targets: &[PublicKey],
        full: &mut Set<PublicKey>,
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
            if self.send_to(&hop, Message::Data(copy)) {
                served.extend(serves);
            } else {
                full.insert(hop);
            }
        }
        served
    }

    /// A message did not fit its session's queue: a copy of one of this device's messages is
    /// due again once the queue has room; anything else is sent again by its origin.
    pub(super) fn on_unsent(&mut self, session: SessionId, message: Message) {
        if let Some(live) = self.live_mut(session) {
            live.full = true;
        }
        if let Message::Data(data) = message
            && data.origin == self.own_bytes()
        {
            for target in &data.targets {
                self.outbox.unqueued(&data.id, target);
            }
            self.outbox_dirty = true;
        }
    }

    pub(super) fn on_data(&mut self, mut data: Data, now: Now) {
        let own = self.own_bytes();
        let origin = PublicKey::from_bytes(data.origin);
        if !self.table.contains(&origin) || data.hops >= MAX_HOPS {
            return;
        }
        if now.wall_ms >= expires_ms(&data) {
            return;
        }
        if data.targets.contains(&own) {
            if self.delivered.contains(&data.id) {
                // Delivered before: the ack was lost. Acknowledge again; do not run again.
                self.route(&origin, RoutedBody::Ack { id: data.id });
            } else if !self.delivering_ids.contains(&data.id) {
                // Recorded before acknowledged: an ack for a message this device could lose
                // would stop the origin's resends for good.
                let until = Delivered::until(&data, now.wall_ms);
                let op = PersistOp::Delivered {
                    id: data.id,
                    until_ms: until,
                };
                if let Some(token) = self.persist(op, true) {
                    self.delivering_ids.insert(data.id);
                    self.delivering.insert(token, data.clone());
                }
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
            let mut full = Set::default();
            self.pass_on(&data, &rest, &mut full);
        }
    }

    /// A message for this device is recorded as delivered (or could not be): acknowledge it and
    /// run its handler.
    pub(super) fn delivery_recorded(&mut self, data: Data, recorded: Result<(), String>, now: Now) {
        self.delivering_ids.remove(&data.id);
        if let Err(e) = recorded {
            tracing::warn!("{e} (the sender will send the message again)");
            return;
        }
        let until = Delivered::until(&data, now.wall_ms);
        self.delivered.insert(data.id, until);
        let origin = PublicKey::from_bytes(data.origin);
        self.route(&origin, RoutedBody::Ack { id: data.id });
        let from = self.roster.get(&origin).map(|m| Sender {
            name: m.name.to_string(),
            id: m.id().to_string(),
        });
        let handler = Run {
            run_id: 0,
            event: EVENT_MESSAGE.to_owned(),
            tag: data.tag.clone(),
            from,
            message_id: Some(id_text(&data.id)),
            device: self.name.to_string(),
            env: Vec::new(),
            payload: data.payload.to_vec(),
        };
        self.next_run += 1;
        let run: RunId = self.next_run;
        let size = data.payload.len();
        // What it takes to reply, not the payload.
        let kept = Data {
            payload: Default::default(),
            ..data
        };
        self.runs.insert(run, (kept, size));
        self.outputs.push(Output::RunHandler {
            run,
            handler: Box::new(handler),
        });
    }

    pub(super) fn on_handler_done(
        &mut self,
        run: RunId,
        result: Result<RunResult, String>,
        _now: Now,
    ) {
        let Some((data, size)) = self.runs.remove(&run) else {
            return;
        };
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
        tracing::info!(tag = %data.tag, from = %name, id = %id_text(&data.id), status, "message handled");
        if let Some(member) = self.roster.get(&origin) {
            let event = WatchEvent::Message {
                id: id_text(&data.id),
                tag: data.tag.clone(),
                from: member.name.clone(),
                from_id: member.id(),
                size,
                status: status.to_owned(),
                handler: result.handler.clone(),
            };
            self.watch(event);
        }
        if data.want_reply {
            self.route(
                &origin,
                RoutedBody::Reply {
                    id: data.id,
                    result,
                },
            );
        }
    }

    pub(super) fn on_ack(&mut self, from: &PublicKey, id: MessageId) {
        if let Some(change) = self.outbox.acked(&id, from.as_bytes()) {
            self.outbox_changed(change);
        }
    }

    pub(super) fn on_reply(
        &mut self,
        from: &PublicKey,
        id: MessageId,
        result: HandlerResult,
        _now: Now,
    ) {
        let Some(wait) = self.waits.get(&id) else {
            // After the wait ended: nobody asks any more.
            return;
        };
        if !wait.expected.contains(from.as_bytes()) || wait.replied.contains(from.as_bytes()) {
            return;
        }
        let tag = wait.tag.clone();
        let reply = self.handler_reply(from, result, &tag);
        let Some(wait) = self.waits.get_mut(&id) else {
            return;
        };
        wait.replied.insert(*from.as_bytes());
        if wait.streaming {
            let request = wait.request;
            self.outputs.push(Output::Progress {
                request,
                reply: Box::new(reply),
            });
        } else {
            wait.replies.push(reply);
        }
    }

    /// Answers the sends whose replies are all in or whose wait ran out (all of them when the
    /// daemon stops), once their message is on disk.
    pub(super) fn finish_waits(&mut self, now: Now, all: bool) {
        let done: Vec<MessageId> = self
            .waits
            .iter()
            .filter(|(_, w)| all || (w.stored && (w.complete() || w.deadline <= now.mono)))
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            let Some(wait) = self.waits.remove(&id) else {
                continue;
            };
            let mut replies = wait.replies;
            for missing in wait.expected.iter().filter(|k| !wait.replied.contains(*k)) {
                let key = PublicKey::from_bytes(*missing);
                let reachable = self.table.reach(&key).is_reachable();
                replies.push(HandlerReply {
                    name: self
                        .roster
                        .get(&key)
                        .map(|m| m.name.clone())
                        .unwrap_or_else(|| DeviceName::sanitized(&key.device_id().to_string())),
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
            let mut result = wait.result;
            if wait.streaming {
                for reply in replies {
                    self.outputs.push(Output::Progress {
                        request: wait.request,
                        reply: Box::new(reply),
                    });
                }
            } else {
                result.replies = Some(replies);
            }
            self.answer(wait.request, Answer::Send(Ok(result)));
        }
    }

    fn handler_reply(&self, from: &PublicKey, result: HandlerResult, tag: &str) -> HandlerReply {
        let name = self
            .roster
            .get(from)
            .map(|m| m.name.clone())
            .unwrap_or_else(|| DeviceName::sanitized("unknown"));
        let (status, exit_code, error) = reply_status(&result.outcome, tag, name.as_str());
        let (stdout, stdout_base64) = Bytes::encode(&result.stdout);
        HandlerReply {
            name,
            id: from.device_id(),
            status: status.into(),
            exit_code,
            handler: result.handler,
            stdout,
            stdout_base64,
            error,
            duration_ms: Some(result.duration_ms),
        }
    }

    pub(super) fn expire_messages(&mut self, now: Now) {
        for entry in self.outbox.expire(now.wall_ms) {
            self.persist(PersistOp::OutboxRemove(entry.data.id), false);
            let names: Vec<String> = entry
                .pending
                .iter()
                .map(|k| self.member_name(&PublicKey::from_bytes(*k)))
                .collect();
            tracing::warn!(
                id = %id_text(&entry.data.id),
                "a message expired before it reached {}",
                names.join(", ")
            );
        }
    }

    /// A member left the roster: nothing more is owed to it.
    pub(super) fn forget_target(&mut self, key: &PublicKey) {
        for change in self.outbox.forget_target(key.as_bytes()) {
            self.outbox_changed(change);
        }
    }
}

/// The word `send --wait` shows for an outcome, the exit code, and why the handler did not
/// succeed (for `tag` on `device`).
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
