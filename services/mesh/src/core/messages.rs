//! Tagged messages: accepting a send (into the outbox, then copies along the routing plan),
//! passing copies on, delivering to this device's handler once (the id durable first), acks,
//! replies and waits, and the outbox's resends and expiry. `docs/protocol.md#tagged-messages`.

use std::time::Duration;

use cnsprcy::api::{
    Bytes, HandlerReply, HandlingMessage, MessagesInfo, OutboxMessage, RecentOutcome, SendResult,
    WatchEvent,
};
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
use crate::ordering::{Lane, lane_of};
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
    /// With `to` left out: this device runs its handler too.
    pub include_self: bool,
}

/// A message for this device whose record is being written and synced.
#[derive(Debug)]
pub(super) struct Delivering {
    data: Data,
    /// Its handler was asked for once the record was written, before the sync: the payload went
    /// with it.
    run_asked: bool,
}

/// A handler run that ended before its message's record was durable, to report after the ack.
#[derive(Debug)]
pub(super) struct Finished {
    data: Data,
    size: usize,
    result: Result<RunResult, String>,
}

/// A handler run under way.
#[derive(Debug)]
pub(super) struct Running {
    /// The message: what it takes to reply, and its payload until the handler started (to ask
    /// again if the handler service cannot start it now).
    data: Data,
    /// Its payload's size, for the `message` event.
    size: usize,
    /// The handler service said the handler started.
    started: bool,
    /// Asked before, and the handler service could not start it.
    attempt: u32,
}

/// How often a handler the handler service could not start is asked for again: at each
/// housekeeping round.
const RETRY_EVERY: Duration = super::HOUSEKEEPING;

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
        let recipients = match self.recipients(send.to.as_deref(), send.include_self) {
            Ok(recipients) => recipients,
            Err(e) => return self.answer(request, Answer::Send(Err(e))),
        };
        let targets: Vec<KeyBytes> = recipients.iter().map(|(k, _)| *k.as_bytes()).collect();
        let data = Data {
            id: rand::Rng::random(&mut self.rng),
            origin: self.own_bytes(),
            sent_ms: now.wall_ms,
            ttl_ms: send.ttl.as_millis() as u64,
            tag: send.tag,
            targets: targets.clone(),
            want_reply: send.wait.is_some(),
            hops: 0,
            after: Vec::new(),
            payload: send.payload.into(),
        };
        let (id, tag, size) = (data.id, data.tag.clone(), data.payload.len());
        let expires = crate::messaging::expires_ms(&data);
        let entry = match self.outbox.add(data, targets.clone()) {
            Ok(entry) => {
                self.outbox_dirty = true;
                self.next_expiry = Some(self.next_expiry.map_or(expires, |at| at.min(expires)));
                entry
            }
            Err(e) => {
                let e = self.outbox_error(e);
                return self.answer(request, Answer::Send(Err(e)));
            }
        };
        let result = SendResult {
            id: id_text(&id),
            recipients: recipients.iter().map(|(_, name)| name.clone()).collect(),
            queued: recipients
                .iter()
                .filter(|(k, _)| *k != self.own && !self.table.reach(k).is_reachable())
                .map(|(_, name)| name.clone())
                .collect(),
            replies: None,
        };
        tracing::info!(tag = %tag, id = %result.id, "sending a message to {} device(s)", recipients.len());
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

    /// The devices a send is for, by key and name: the members named (this device too, by its
    /// own name or ID), or every member (and this device with `include_self`).
    fn recipients(
        &self,
        to: Option<&[String]>,
        include_self: bool,
    ) -> Result<Vec<(PublicKey, DeviceName)>, RpcError> {
        let own = (self.own, self.name.clone());
        let mut recipients = Vec::new();
        match to {
            None => {
                recipients.extend(
                    self.roster
                        .members()
                        .iter()
                        .map(|m| (m.public_key, m.name.clone())),
                );
                if include_self {
                    recipients.push(own);
                }
            }
            Some(names) => {
                for name in names {
                    let recipient = if self.is_own_name(name) {
                        own.clone()
                    } else {
                        let member = self.roster.find(name).map_err(super::api::roster_error)?;
                        (member.public_key, member.name.clone())
                    };
                    if !recipients.contains(&recipient) {
                        recipients.push(recipient);
                    }
                }
            }
        }
        if recipients.is_empty() {
            return Err(error(
                code::NOT_FOUND,
                "there are no members to send to; add one with `cnspr manage add` (or send to this device itself with --include-self)",
            ));
        }
        Ok(recipients)
    }

    /// Whether `name` names this device: its name, or its ID as `Roster::find` reads IDs.
    fn is_own_name(&self, name: &str) -> bool {
        name == self.name.as_str()
            || (crate::roster::id_matches(&self.own.device_id(), name)
                && self.roster.find(name).is_err())
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
            OutboxChange::Acked { id, target } => PersistOp::OutboxAcked { id, target },
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
        let (table, own) = (&self.table, self.own_bytes());
        let due = self.outbox.due(
            |k| *k == own || table.reach(&PublicKey::from_bytes(*k)).is_reachable(),
            now.mono,
        );
        // A hop whose queue is full gets nothing newer, so that copies to it keep their order.
        let mut full: Set<PublicKey> = self
            .sessions
            .iter()
            .filter(|(_, live)| live.full)
            .map(|(key, _)| *key)
            .collect();
        for (data, mut targets) in due {
            if let Some(at) = targets.iter().position(|k| *k == self.own) {
                targets.swap_remove(at);
                self.receive(&data, now);
                self.outbox.queued(&data.id, &self.own, now.mono);
            }
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
            let targets: Vec<KeyBytes> = serves.iter().map(|k| *k.as_bytes()).collect();
            let copy = Data {
                after: (data.after.iter())
                    .filter(|a| targets.contains(&a.target))
                    .copied()
                    .collect(),
                targets,
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
            self.receive(&data, now);
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

    /// A message for this device arrived (or, from this device to itself, left the outbox):
    /// record it as delivered unless it was, or hold it back while the message before it from
    /// the same origin with the same tag is still to come.
    fn receive(&mut self, data: &Data, now: Now) {
        let origin = PublicKey::from_bytes(data.origin);
        if self.delivered.contains(&data.id) {
            // Delivered before: the ack was lost. Acknowledge again; do not run again.
            self.send_to_origin(&origin, RoutedBody::Ack { id: data.id }, now);
            return;
        }
        if self.delivering_ids.contains(&data.id) || self.holdback.is_held(&data.id) {
            return;
        }
        let own = self.own_bytes();
        // Any predecessor named for this device that is neither recorded nor expired; when it
        // is, the message comes back here and the next one is checked.
        if let Some(after) = data.after.iter().find(|a| {
            a.target == own && !self.delivered.contains(&a.id) && now.wall_ms < a.expires_ms
        }) {
            if !(self.holdback).hold_for_predecessor(after.id, after.expires_ms, data.clone()) {
                tracing::debug!(id = %id_text(&data.id), "too many messages wait for earlier ones; dropped one (its sender sends it again)");
            }
            return;
        }
        let lane = lane_of(data);
        if self.holdback.lane_busy(&lane) {
            if !self.holdback.hold_for_lane(data.clone()) {
                tracing::debug!(id = %id_text(&data.id), "too many messages wait for earlier ones; dropped one (its sender sends it again)");
            }
            return;
        }
        // Recorded before acknowledged: an ack for a message this device could lose would stop
        // the origin's resends for good.
        let until = Delivered::until(data, now.wall_ms);
        let op = PersistOp::Delivered {
            data: Box::new(data.clone()),
            until_ms: until,
        };
        if let Some(token) = self.persist(op, true) {
            self.delivering_ids.insert(data.id);
            let delivering = Delivering {
                data: data.clone(),
                run_asked: false,
            };
            self.delivering.insert(token, delivering);
            self.holdback.occupy(lane);
        }
    }

    /// What waited for `lane` is received again, in the order it came.
    fn free_lane(&mut self, lane: &Lane, now: Now) {
        for data in self.holdback.free(lane) {
            self.receive(&data, now);
        }
    }

    /// Messages held back whose predecessor expired go on.
    pub(super) fn release_held(&mut self, now: Now) {
        for data in self.holdback.release_expired(now.wall_ms) {
            self.receive(&data, now);
        }
    }

    /// A delivery's record is written, not yet synced: its handler may start. A crash of the
    /// process from here on keeps the record (and the handler service's own record keeps a
    /// started handler from starting again); only a power cut before the sync can lose it, and
    /// then the origin, never acknowledged, sends the message again and the handler runs a
    /// second time, as after a power cut at other moments (protocol.md#the-inbox). The sync is
    /// then off the way to the handler: on a phone's flash it can take tens of milliseconds.
    pub(super) fn delivery_written(&mut self, token: super::Token) {
        let Some(delivering) = self.delivering.get_mut(&token) else {
            return;
        };
        if delivering.run_asked {
            return;
        }
        delivering.run_asked = true;
        let data = delivering.data.clone();
        // The run holds the payload from now on.
        delivering.data.payload = Default::default();
        self.start_handler(data, 0);
    }

    /// A message for this device is recorded as delivered (or could not be): acknowledge it and
    /// run its handler (after the one before it from the same origin with the same tag), unless
    /// it was asked for once the record was written.
    pub(super) fn delivery_recorded(
        &mut self,
        delivering: Delivering,
        recorded: Result<(), String>,
        now: Now,
    ) {
        let Delivering { data, run_asked } = delivering;
        self.delivering_ids.remove(&data.id);
        match recorded {
            Err(e) if !run_asked => {
                tracing::warn!("{e} (the sender will send the message again)");
                self.free_lane(&lane_of(&data), now);
                return;
            }
            // The record is written (a crash of the process keeps it) and the handler asked
            // for; unacknowledged, the message would come again and be refused as a repeat.
            Err(e) => tracing::warn!(
                id = %id_text(&data.id),
                "{e}; its handler was started already, and a power cut before the next sync may run it again"
            ),
            Ok(()) => {}
        }
        let until = Delivered::until(&data, now.wall_ms);
        self.delivered.insert(data.id, until);
        let origin = PublicKey::from_bytes(data.origin);
        self.send_to_origin(&origin, RoutedBody::Ack { id: data.id }, now);
        for next in self.holdback.recorded(&data.id) {
            self.receive(&next, now);
        }
        if !run_asked {
            self.start_handler(data, 0);
        } else if let Some(Finished { data, size, result }) = self.unreported.remove(&data.id) {
            self.report_handled(data, size, result, now);
        }
    }

    /// Handlers that had not started when this device last stopped: their messages are recorded
    /// as delivered (an inbox entry is that record), so they would never come again. They run
    /// now, unless their message expired meanwhile.
    pub(super) fn rerun_inbox(&mut self, inbox: Vec<Data>, now: Now) {
        for data in inbox {
            let id = id_text(&data.id);
            if now.wall_ms >= expires_ms(&data) {
                tracing::warn!(%id, tag = %data.tag, "message expired before its handler could start; not run");
                self.persist(PersistOp::InboxDone(data.id), false);
            } else {
                tracing::info!(%id, tag = %data.tag, "running the handler of a message again: the last stop came before it started");
                self.holdback.occupy(lane_of(&data));
                self.start_handler(data, 0);
            }
        }
    }

    /// Asks for the handler run of a message recorded as delivered. Its lane is occupied until
    /// the run is done.
    fn start_handler(&mut self, data: Data, attempt: u32) {
        let origin = PublicKey::from_bytes(data.origin);
        let from = if origin == self.own {
            Some(Sender {
                name: self.name.to_string(),
                id: self.own.device_id().to_string(),
            })
        } else {
            self.roster.get(&origin).map(|m| Sender {
                name: m.name.to_string(),
                id: m.id().to_string(),
            })
        };
        let handler = Run {
            run_id: 0,
            event: EVENT_MESSAGE.to_owned(),
            tag: data.tag.clone(),
            from,
            message_id: Some(id_text(&data.id)),
            device: self.name.to_string(),
            env: Vec::new(),
            payload: data.payload.to_vec(),
            report_start: false,
        };
        self.next_run += 1;
        let run: RunId = self.next_run;
        let size = data.payload.len();
        self.runs.insert(
            run,
            Running {
                data,
                size,
                started: false,
                attempt,
            },
        );
        self.outputs.push(Output::RunHandler {
            run,
            handler: Box::new(handler),
        });
    }

    /// The handler started: a stop from now on must not run it again.
    pub(super) fn on_handler_started(&mut self, run: RunId) {
        if let Some(running) = self.runs.get_mut(&run)
            && !running.started
        {
            running.started = true;
            running.data.payload = Default::default();
            let id = running.data.id;
            self.persist(PersistOp::InboxDone(id), false);
        }
    }

    /// Asks again for the handlers the handler service could not start (it was out of reach or
    /// stopping). One whose message expired meanwhile is over, and fails.
    pub(super) fn retry_unstarted(&mut self, now: Now) {
        for (data, attempt) in std::mem::take(&mut self.unstarted) {
            if now.wall_ms < expires_ms(&data) {
                self.start_handler(data, attempt);
            } else {
                self.persist(PersistOp::InboxDone(data.id), false);
                let size = data.payload.len();
                let reason =
                    "the message expired before the handler service could start its handler";
                self.report_handled(data, size, Err(reason.to_owned()), now);
            }
        }
    }

    pub(super) fn on_handler_done(
        &mut self,
        run: RunId,
        result: Result<RunResult, String>,
        now: Now,
    ) {
        let Some(Running {
            data,
            size,
            started,
            attempt,
        }) = self.runs.remove(&run)
        else {
            return;
        };
        match (&result, started) {
            (_, true) => {}
            // Over without starting (no handler, refused, or an older handler service that
            // does not say when a handler starts).
            (Ok(_), false) => {
                self.persist(PersistOp::InboxDone(data.id), false);
            }
            // The handler service was out of reach or stopping: asked again in a moment. The
            // message stays in the inbox meanwhile, so a stop now does not lose it either. (If
            // the connection broke just after the handler started, before the service could
            // say so, the service itself does not start it twice.)
            (Err(reason), false) => {
                let id = id_text(&data.id);
                if attempt == 0 {
                    tracing::warn!(%id, tag = %data.tag, "the handler service did not start the handler ({reason}); asking again every {}s", RETRY_EVERY.as_secs());
                } else {
                    tracing::debug!(%id, tag = %data.tag, attempt, "the handler service did not start the handler ({reason})");
                }
                self.unstarted.push((data, attempt + 1));
                return;
            }
        }
        // The reply goes after the ack: the origin hears of a run only for a message it knows
        // was delivered.
        if self.delivering_ids.contains(&data.id) {
            let finished = Finished { data, size, result };
            self.unreported.insert(finished.data.id, finished);
            return;
        }
        self.report_handled(data, size, result, now);
    }

    /// A message's handler run is over: tells the log, subscribers and the origin, and lets the
    /// next message of its lane go.
    fn report_handled(
        &mut self,
        data: Data,
        size: usize,
        result: Result<RunResult, String>,
        now: Now,
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
        tracing::info!(tag = %data.tag, from = %name, id = %id_text(&data.id), status, "message handled");
        if origin == self.own || self.roster.get(&origin).is_some() {
            let (from, from_id) = self.device_label(&origin);
            let event = WatchEvent::Message {
                id: id_text(&data.id),
                tag: data.tag.clone(),
                from,
                from_id,
                size,
                status: status.to_owned(),
                handler: result.handler.clone(),
            };
            self.watch(event);
        }
        // The origin learns every outcome; the output only when it asked for it.
        let mut result = result;
        if !data.want_reply {
            result.stdout = Vec::new();
        }
        self.send_to_origin(
            &origin,
            RoutedBody::Reply {
                id: data.id,
                tag: data.tag.clone(),
                result,
            },
            now,
        );
        self.free_lane(&lane_of(&data), now);
    }

    /// Sends an ack or reply to a message's origin: over the mesh, or to this device itself.
    fn send_to_origin(&mut self, origin: &PublicKey, body: RoutedBody, now: Now) {
        if *origin != self.own {
            self.route(origin, body);
            return;
        }
        let own = self.own;
        match body {
            RoutedBody::Ack { id } => self.on_ack(&own, id, now),
            RoutedBody::Reply { id, tag, result } => self.on_reply(&own, id, result, &tag, now),
            // Pings and the store never go to this device itself.
            RoutedBody::Ping { .. } | RoutedBody::Pong { .. } | RoutedBody::Store(_) => {}
        }
    }

    /// A device's name and ID: this device's, a member's, or (for neither) its ID as name.
    fn device_label(&self, key: &PublicKey) -> (DeviceName, cnsprcy::identity::DeviceId) {
        let name = if *key == self.own {
            self.name.clone()
        } else {
            self.roster
                .get(key)
                .map(|m| m.name.clone())
                .unwrap_or_else(|| DeviceName::sanitized(&key.device_id().to_string()))
        };
        (name, key.device_id())
    }

    /// Tells subscribers what became of a message from this device, and keeps it for
    /// `cnspr messages`.
    fn outcome(&mut self, event: WatchEvent, stdout: &[u8], now: Now) {
        let (stdout, stdout_base64) = if stdout.is_empty() {
            (None, None)
        } else {
            Bytes::encode(stdout)
        };
        self.recent.push(RecentOutcome {
            time: humantime::format_rfc3339_millis(now.wall()).to_string(),
            event: event.clone(),
            stdout,
            stdout_base64,
        });
        self.watch(event);
    }

    /// The `messages` call: the outbox and recent outcomes.
    pub(super) fn messages_info(&self) -> MessagesInfo {
        let rfc3339 = |ms: u64| {
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms))
                .to_string()
        };
        let outbox = self
            .outbox
            .entries()
            .map(|entry| OutboxMessage {
                id: id_text(&entry.data.id),
                tag: entry.data.tag.clone(),
                size: entry.data.payload.len(),
                sent: rfc3339(entry.data.sent_ms),
                expires: rfc3339(expires_ms(&entry.data)),
                waiting_for: (entry.pending.iter())
                    .map(|k| self.device_label(&PublicKey::from_bytes(*k)).0)
                    .collect(),
            })
            .collect();
        let mut running: Vec<(&RunId, &Running)> = self.runs.iter().collect();
        running.sort_by_key(|(run, _)| **run);
        let mut handling: Vec<HandlingMessage> = running
            .into_iter()
            .map(|(_, r)| {
                let state = if r.started { "running" } else { "handed over" };
                self.handling(&r.data, r.size, state, r.attempt)
            })
            .collect();
        handling.extend(
            (self.unstarted.iter()).map(|(data, attempt)| {
                self.handling(data, data.payload.len(), "retrying", *attempt)
            }),
        );
        MessagesInfo {
            outbox,
            recent: self.recent.list(),
            handling,
        }
    }

    fn handling(&self, data: &Data, size: usize, state: &str, attempts: u32) -> HandlingMessage {
        HandlingMessage {
            id: id_text(&data.id),
            tag: data.tag.clone(),
            from: self.device_label(&PublicKey::from_bytes(data.origin)).0,
            size,
            state: state.to_owned(),
            failed_attempts: attempts,
        }
    }

    pub(super) fn on_ack(&mut self, from: &PublicKey, id: MessageId, now: Now) {
        let tag = self.outbox.get(&id).map(|e| e.data.tag.clone());
        if let Some(change) = self.outbox.acked(&id, from.as_bytes()) {
            self.outbox_changed(change);
            // The messages that wait for this one there are due now (`Outbox::acked`).
            self.outbox_dirty = true;
            let (to, to_id) = self.device_label(from);
            let event = WatchEvent::Delivered {
                id: id_text(&id),
                tag: tag.unwrap_or_default(),
                to,
                to_id,
            };
            self.outcome(event, &[], now);
        }
    }

    pub(super) fn on_reply(
        &mut self,
        from: &PublicKey,
        id: MessageId,
        result: HandlerResult,
        tag: &str,
        now: Now,
    ) {
        let Some(wait) = self.waits.get(&id) else {
            // After the wait ended (or none was asked for): the output is kept for `cnspr
            // messages`.
            let reply = self.handler_reply(from, result, tag);
            let stdout = Bytes::decode(reply.stdout.as_deref(), reply.stdout_base64.as_deref())
                .unwrap_or_default();
            self.outcome(handled_event(&id, tag, reply), &stdout, now);
            return;
        };
        if !wait.expected.contains(from.as_bytes()) || wait.replied.contains(from.as_bytes()) {
            return;
        }
        let tag = wait.tag.clone();
        let reply = self.handler_reply(from, result, &tag);
        self.outcome(handled_event(&id, &tag, reply.clone()), &[], now);
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
        let (name, _) = self.device_label(from);
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
        let expired = self.outbox.expire(now.wall_ms);
        self.next_expiry = self.outbox.earliest_expiry();
        for entry in expired {
            self.persist(PersistOp::OutboxRemove(entry.data.id), false);
            let missed: Vec<DeviceName> = (entry.pending.iter())
                .map(|k| self.device_label(&PublicKey::from_bytes(*k)).0)
                .collect();
            let names: Vec<&str> = missed.iter().map(DeviceName::as_str).collect();
            tracing::warn!(
                id = %id_text(&entry.data.id),
                tag = %entry.data.tag,
                "a message expired before it reached {}",
                names.join(", ")
            );
            let event = WatchEvent::Expired {
                id: id_text(&entry.data.id),
                tag: entry.data.tag.clone(),
                missed,
            };
            self.outcome(event, &[], now);
        }
    }

    /// A member left the roster: nothing more is owed to it.
    pub(super) fn forget_target(&mut self, key: &PublicKey) {
        for change in self.outbox.forget_target(key.as_bytes()) {
            self.outbox_changed(change);
        }
    }
}

fn handled_event(id: &MessageId, tag: &str, reply: HandlerReply) -> WatchEvent {
    WatchEvent::Handled {
        id: id_text(id),
        tag: tag.to_owned(),
        by: reply.name,
        by_id: reply.id,
        status: reply.status,
        exit_code: reply.exit_code,
        handler: reply.handler,
        error: reply.error,
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
