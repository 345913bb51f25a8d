//! The replicated roster and pairing: roster digests and entries between members, changes
//! passed on to every session, disabling, revoking and leaving, invitations and joining.
//! The merge rules themselves are `crate::roster`'s.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cnsprcy::identity::{DeviceName, PublicKey};
use cnsprcy::rpc::RpcError;
use cnsprcy::wire::{JoinRefusal, Joining, MAX_ROSTER_ENTRIES, MemberState, Message, RosterEntry};

use super::api::{code, error, member_info, roster_error};
use super::{Answer, Core, Now, Output, RequestId, SessionId, StoreAccess};
use crate::roster::{Member, RosterError};

/// The longest an invitation may be valid.
pub const MAX_INVITATION_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// Invitations kept (open, used or expired, to say which when one comes back).
const MAX_INVITATIONS: usize = 64;
/// How long `join` waits for the inviter's roster.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a leaving device keeps its sessions for its last word to go out.
const LEAVE_GRACE: Duration = Duration::from_secs(1);

/// An invitation this device made, as the listener and the core check it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvitationState {
    pub expires_ms: u64,
    pub used: bool,
}

impl InvitationState {
    /// Why a device joining with it now is refused, if it is.
    pub fn refusal(&self, now_ms: u64) -> Option<JoinRefusal> {
        if self.used {
            Some(JoinRefusal::Used)
        } else if now_ms >= self.expires_ms {
            Some(JoinRefusal::Expired)
        } else {
            None
        }
    }
}

/// The invitations the listener checks joining devices against, by secret.
pub type Invitations = HashMap<[u8; 16], InvitationState>;

/// An invitation made by `members.invite`.
#[derive(Debug, Clone)]
pub struct Invited {
    pub secret: [u8; 16],
    /// Where this device may be dialled: the joiner tries them in order.
    pub addresses: Vec<SocketAddr>,
    pub expires_ms: u64,
}

/// What became of a join.
#[derive(Debug, Clone)]
pub struct Joined {
    pub inviter: Member,
    /// The active members the roster holds now.
    pub members: usize,
}

/// A disable or revoke: the device, and for a revoke the entries it had written last that this
/// device took over (devices it added: they stay members, check they are yours).
#[derive(Debug, Clone)]
pub struct Removed {
    pub member: Member,
    pub kept: Vec<Member>,
}

/// `join` waiting for the inviter.
#[derive(Debug)]
pub(super) struct PendingJoin {
    request: RequestId,
    inviter: PublicKey,
    joining: Joining,
    deadline: Instant,
}

impl<S: StoreAccess> Core<S> {
    /// A new session: tell the peer our roster's digest.
    pub(super) fn send_roster_digest(&mut self, session: SessionId) {
        let digest = self.roster.digest();
        self.send(session, Message::RosterDigest(digest));
    }

    pub(super) fn on_roster_digest(&mut self, session: SessionId, digest: u64) {
        if digest != self.roster.digest() {
            let entries = self.roster_wire_entries();
            self.send(
                session,
                Message::RosterEntries {
                    entries,
                    answer: true,
                },
            );
        }
    }

    pub(super) fn on_roster_entries(
        &mut self,
        session: SessionId,
        peer: &PublicKey,
        entries: Vec<RosterEntry>,
        answer: bool,
        now: Now,
    ) {
        if entries.len() > MAX_ROSTER_ENTRIES {
            tracing::warn!(
                peer = %self.member_name(peer),
                "ignored a roster of {} entries from {} (at most {MAX_ROSTER_ENTRIES})",
                entries.len(),
                self.member_name(peer)
            );
            return;
        }
        let theirs = crate::roster::digest_of(&entries);
        let before = self.active_keys();
        let states: HashMap<[u8; 32], MemberState> = entries
            .iter()
            .filter_map(|e| {
                let state = self.roster.entry(&PublicKey::from_bytes(e.key))?.state;
                Some((e.key, state))
            })
            .collect();
        let merged = self.roster.merge(&entries);
        if !merged.changed.is_empty() {
            // Told only where a device's state changed (not for a newer version of the same).
            for entry in &merged.changed {
                if states.get(entry.public_key.as_bytes()) != Some(&entry.state) {
                    self.log_roster_change(entry, peer);
                }
            }
            let changed: Vec<RosterEntry> = merged
                .changed
                .iter()
                .map(|m| m.to_wire(&self.own))
                .collect();
            self.pass_on_roster(changed, Some(session));
        }
        if let Some((state, by)) = merged.removed_by {
            self.removed_from_mesh(state, &by, now);
        } else if !merged.changed.is_empty() {
            self.roster_applied(&before, now);
        }
        self.check_join();
        if answer && self.roster.digest() != theirs {
            let entries = self.roster_wire_entries();
            self.send(
                session,
                Message::RosterEntries {
                    entries,
                    answer: false,
                },
            );
        }
    }

    /// Every entry, this device's with the addresses it announces.
    fn roster_wire_entries(&self) -> Vec<RosterEntry> {
        let mut entries = self.roster.wire_entries();
        let own = self.own_bytes();
        let addresses = self.dialable_addresses();
        for entry in entries.iter_mut().filter(|e| e.key == own) {
            entry.addresses = addresses.clone();
        }
        entries
    }

    /// The addresses another device may dial this one at: its announced IPs at its listen
    /// ports (an unspecified listen address stands for every announced IP).
    fn dialable_addresses(&self) -> Vec<SocketAddr> {
        let ips = self.announced_addresses();
        let mut addresses = Vec::new();
        // Where Hello says this device listens: `[mesh] interfaces` applies alike.
        for listen in &self.announced_listen() {
            if listen.ip().is_unspecified() {
                for ip in &ips {
                    if ip.is_ipv4() == listen.is_ipv4() || listen.is_ipv6() {
                        addresses.push(SocketAddr::new(*ip, listen.port()));
                    }
                }
            } else {
                addresses.push(*listen);
            }
        }
        addresses.dedup();
        addresses.truncate(cnsprcy::invitation::MAX_ADDRESSES);
        addresses
    }

    /// Sends changed entries to every session but `except` (the one they came from), and not
    /// to revoked devices.
    fn pass_on_roster(&mut self, entries: Vec<RosterEntry>, except: Option<SessionId>) {
        let sessions: Vec<(PublicKey, SessionId)> =
            self.sessions.iter().map(|(k, l)| (*k, l.id)).collect();
        for (key, session) in sessions {
            let revoked = self
                .roster
                .entry(&key)
                .is_some_and(|e| e.state == MemberState::Revoked);
            if Some(session) != except && !revoked {
                self.send(
                    session,
                    Message::RosterEntries {
                        entries: entries.clone(),
                        answer: false,
                    },
                );
            }
        }
    }

    fn active_keys(&self) -> Vec<PublicKey> {
        self.roster.members().iter().map(|m| m.public_key).collect()
    }

    /// The active members changed from `before`: sessions, the peer table, the accept path and
    /// the disk follow. Returns the token of the roster write.
    pub(super) fn roster_applied(
        &mut self,
        before: &[PublicKey],
        now: Now,
    ) -> Option<super::Token> {
        let after = self.active_keys();
        for key in before.iter().filter(|k| !after.contains(k)) {
            self.forget_target(key);
            let state = self.roster.entry(key).map(|e| e.state);
            let reason = match state {
                Some(MemberState::Revoked) => "revoked",
                Some(_) => "disabled",
                // Forgotten: this device left the mesh, or a join through it failed.
                None => "no longer in the roster",
            };
            if state == Some(MemberState::Revoked) {
                self.close_session(key, reason, now);
            } else {
                // It is told first (the entries just queued), then let go.
                self.close_session_after_flush(key, reason, now);
            }
            self.reported.remove(key);
        }
        for key in after.iter().filter(|k| !before.contains(k)) {
            self.forget_knock(key);
            self.recall_discovered(key, now);
        }
        self.members_changed(now)
    }

    fn log_roster_change(&mut self, entry: &Member, from: &PublicKey) {
        let by = entry
            .author
            .map(|a| self.device_name(&a))
            .unwrap_or_else(|| self.member_name(from));
        match entry.state {
            MemberState::Active => {
                tracing::info!(peer = %entry.name, "{} ({}) is a member, added by {by}", entry.name, entry.id())
            }
            state => {
                tracing::info!(peer = %entry.name, "{} ({}) was {} by {by}", entry.name, entry.id(), state.as_str())
            }
        }
        self.watch(cnsprcy::api::WatchEvent::Member {
            name: entry.name.clone(),
            id: entry.id(),
            state: entry.state,
            by,
        });
    }

    /// Every entry, for `members.list`: this device first, then by name.
    pub(super) fn roster_info(&self) -> Vec<cnsprcy::api::RosterInfo> {
        let mut entries = self.roster.entries();
        entries.sort_by(|a, b| {
            (a.public_key != self.own, &a.name).cmp(&(b.public_key != self.own, &b.name))
        });
        entries
            .iter()
            .map(|e| cnsprcy::api::RosterInfo {
                name: e.name.clone(),
                id: e.id(),
                public_key: e.public_key,
                state: e.state,
                this_device: e.public_key == self.own,
                changed: (e.version > 0).then(|| {
                    let time = std::time::UNIX_EPOCH + Duration::from_millis(e.version);
                    humantime::format_rfc3339_seconds(time).to_string()
                }),
                by: e.author.map(|a| self.device_name(&a)),
            })
            .collect()
    }

    /// The name of any device the roster knows, this one included.
    fn device_name(&self, key: &PublicKey) -> String {
        if *key == self.own {
            return self.name.to_string();
        }
        self.roster
            .entry(key)
            .map(|e| e.name.to_string())
            .unwrap_or_else(|| key.device_id().to_string())
    }

    /// This device's own entry came back disabled or revoked: it forgets the mesh.
    fn removed_from_mesh(&mut self, state: MemberState, by: &PublicKey, now: Now) {
        let by = self.device_name(by);
        tracing::warn!(
            "this device was {} by {by}: it left the mesh and forgot its members (`cnspr manage join` makes it a member again)",
            state.as_str()
        );
        self.forget_mesh(now);
    }

    fn forget_mesh(&mut self, now: Now) {
        let before = self.active_keys();
        self.roster.forget_mesh(now.wall_ms);
        self.roster_applied(&before, now);
    }

    pub(super) fn add_member(&mut self, request: RequestId, member: Member, now: Now) {
        let before = self.active_keys();
        // A member already: only its addresses are new, which stay on this device.
        let known = before.contains(&member.public_key);
        let added = match self.roster.add(member, now.wall_ms) {
            Ok(added) => added,
            Err(e) => return self.answer(request, Answer::Member(Err(roster_error(e)))),
        };
        let own = self.own;
        if !known {
            self.log_roster_change(&added, &own);
            self.pass_on_roster(vec![added.to_wire(&own)], None);
        }
        let token = self.roster_applied(&before, now);
        let member = self.roster.get(&added.public_key).cloned().unwrap_or(added);
        self.answer_when_saved(request, token, Answer::Member(Ok(member_info(&member))));
    }

    /// `disable` (and `remove`) or `revoke`.
    pub(super) fn remove_member(
        &mut self,
        request: RequestId,
        name: &str,
        state: MemberState,
        now: Now,
    ) {
        let before = self.active_keys();
        let changed = match self.roster.remove(name, state, now.wall_ms) {
            Ok(changed) => changed,
            Err(e) => return self.answer(request, Answer::Removed(Err(roster_error(e)))),
        };
        let own = self.own;
        // The removed device comes first; the others only changed hands.
        if let Some(removed) = changed.first() {
            self.log_roster_change(removed, &own);
        }
        let wire: Vec<RosterEntry> = changed.iter().map(|m| m.to_wire(&own)).collect();
        self.pass_on_roster(wire, None);
        let token = self.roster_applied(&before, now);
        let mut changed = changed.into_iter();
        // `remove` returns the removed device first.
        let Some(member) = changed.next() else {
            // `remove` returns the removed device, or an error.
            return self.answer(
                request,
                Answer::Removed(Err(RpcError::internal("the roster changed nothing"))),
            );
        };
        let removed = Removed {
            member,
            // Members the revoked device had added (its disables are taken over too).
            kept: changed.filter(|m| m.state == MemberState::Active).collect(),
        };
        self.answer_when_saved(request, token, Answer::Removed(Ok(removed)));
    }

    /// `leave`: this device tells the members it is gone, then forgets them.
    pub(super) fn leave(&mut self, request: RequestId, force: bool, now: Now) {
        if self.roster.members().is_empty() {
            return self.answer(
                request,
                Answer::Left(Err(error(
                    code::NOT_FOUND,
                    "this device is in no mesh: its roster has no members",
                ))),
            );
        }
        if self.sessions.is_empty() && !force {
            return self.answer(
                request,
                Answer::Left(Err(error(
                    code::UNREACHABLE,
                    "no member is reachable to hear that this device leaves; try again when one is, or use --force and run `cnspr manage disable` for this device on a member later",
                ))),
            );
        }
        let Some(entry) = self.roster.leave(now.wall_ms) else {
            // The roster always holds this device's own entry.
            return self.answer(
                request,
                Answer::Left(Err(RpcError::internal("the roster lacks this device"))),
            );
        };
        let own = self.own;
        self.log_roster_change(&entry, &own);
        let told = self.sessions.len();
        self.pass_on_roster(vec![entry.to_wire(&own)], None);
        self.leaving_at = Some(now.mono + LEAVE_GRACE);
        self.answer(request, Answer::Left(Ok(told)));
    }

    /// The grace after `leave` is over.
    pub(super) fn leave_due(&mut self, now: Now) {
        if self.leaving_at.is_some_and(|at| now.mono >= at) {
            self.leaving_at = None;
            self.forget_mesh(now);
        }
    }

    /// Answers `request` once the roster write `token` is durable (at once without one).
    fn answer_when_saved(
        &mut self,
        request: RequestId,
        token: Option<super::Token>,
        answer: Answer,
    ) {
        match token {
            Some(token) => {
                self.roster_changes.insert(token, (request, answer));
            }
            None => self.answer(request, answer),
        }
    }

    /// A roster write finished: answer whoever waits for it. A failed write leaves the change
    /// in effect (members already heard of it) and says that the disk lags.
    pub(super) fn roster_saved(
        &mut self,
        request: RequestId,
        answer: Answer,
        saved: Result<(), String>,
    ) {
        let answer = match saved {
            Ok(()) => answer,
            Err(reason) => {
                let e = error(
                    code::STORAGE,
                    format!(
                        "{reason}; the change took effect on the members reached, but this device may lose it when it restarts"
                    ),
                );
                match answer {
                    Answer::Member(_) => Answer::Member(Err(e)),
                    Answer::Removed(_) => Answer::Removed(Err(e)),
                    other => other,
                }
            }
        };
        self.answer(request, answer);
    }

    /// `invite`: a new one-time secret, valid for `lifetime`.
    pub(super) fn invite(&mut self, request: RequestId, lifetime: Duration, now: Now) {
        let lifetime = lifetime.min(MAX_INVITATION_LIFETIME);
        let mut secret = [0u8; 16];
        rand::RngCore::fill_bytes(&mut self.rng, &mut secret);
        let expires_ms = now.wall_ms + lifetime.as_millis() as u64;
        if self.invitations.len() >= MAX_INVITATIONS {
            // The one that expires first goes (used and expired ones first of all).
            if let Some(oldest) = self
                .invitations
                .iter()
                .min_by_key(|(_, s)| (!s.used && s.expires_ms > now.wall_ms, s.expires_ms))
                .map(|(k, _)| *k)
            {
                self.invitations.remove(&oldest);
            }
        }
        self.invitations.insert(
            secret,
            InvitationState {
                expires_ms,
                used: false,
            },
        );
        self.publish_invitations();
        let addresses = self.dialable_addresses();
        if addresses.is_empty() {
            tracing::warn!(
                "made an invitation, but this device knows no address to put in it: the joining device can only reach it if it is a member it dials already"
            );
        }
        self.answer(
            request,
            Answer::Invited(Invited {
                secret,
                addresses,
                expires_ms,
            }),
        );
    }

    fn publish_invitations(&mut self) {
        self.outputs
            .push(Output::Invitations(self.invitations.clone()));
    }

    /// A device that is not a member completed a handshake claiming an invitation: it becomes a
    /// member if the invitation is open (it is used up then). Returns whether it did.
    pub(super) fn admit_joining(
        &mut self,
        session: SessionId,
        peer: &PublicKey,
        joining: &Joining,
        addr: SocketAddr,
        now: Now,
    ) -> bool {
        let refusal = match self.invitations.get(&joining.secret) {
            None => Some(JoinRefusal::Unknown),
            Some(state) => state.refusal(now.wall_ms),
        };
        let name = DeviceName::new(&joining.name).ok();
        let member = match (refusal, name) {
            (None, Some(name)) => self.add_joining(peer, name, now),
            (None, None) => Err(JoinRefusal::Unknown),
            (Some(refusal), _) => Err(refusal),
        };
        match member {
            Ok(member) => {
                if let Some(state) = self.invitations.get_mut(&joining.secret) {
                    state.used = true;
                }
                self.publish_invitations();
                tracing::info!(peer = %member.name, "{} ({}) joined with an invitation from this device", member.name, member.id());
                true
            }
            Err(refusal) => {
                tracing::warn!(
                    "refused device {} ({addr}) joining: {}",
                    peer.device_id(),
                    refusal.explain()
                );
                self.watch(cnsprcy::api::WatchEvent::JoinRefused {
                    id: peer.device_id(),
                    address: addr,
                    reason: refusal.as_str().to_owned(),
                });
                self.send(session, Message::JoinRefused(refusal));
                self.outputs.push(Output::CloseAfterFlush {
                    session,
                    reason: "join refused".into(),
                });
                false
            }
        }
    }

    /// Adds a joining device under its own name, or its name and the start of its ID when that
    /// name is taken.
    fn add_joining(
        &mut self,
        peer: &PublicKey,
        name: DeviceName,
        now: Now,
    ) -> Result<Member, JoinRefusal> {
        let before = self.active_keys();
        let id = peer.device_id().to_string();
        let fallback = DeviceName::new(&format!("{name}-{}", id.get(..4).unwrap_or(&id))).ok();
        let mut added = None;
        for name in std::iter::once(name).chain(fallback) {
            // No address yet: `addr` is the joiner's source port; its Hello names where it
            // listens, and it dials the members itself.
            match self
                .roster
                .add(Member::new(name, *peer, Vec::new()), now.wall_ms)
            {
                Ok(member) => {
                    added = Some(member);
                    break;
                }
                Err(RosterError::NameTaken(_)) => continue,
                Err(RosterError::Revoked(_)) => return Err(JoinRefusal::Unknown),
                Err(e) => {
                    tracing::warn!("cannot add a joining device: {e}");
                    return Err(JoinRefusal::Unknown);
                }
            }
        }
        let added = added.ok_or(JoinRefusal::Unknown)?;
        let own = self.own;
        self.log_roster_change(&added, &own);
        self.pass_on_roster(vec![added.to_wire(&own)], None);
        self.roster_applied(&before, now);
        Ok(added)
    }

    /// `join`: dial the inviter with the invitation's secret; answered once its roster arrived.
    pub(super) fn join(
        &mut self,
        request: RequestId,
        invitation: cnsprcy::invitation::Invitation,
        now: Now,
    ) {
        let refuse = |message: String| Answer::Joined(Err(error(code::CONFLICT, message)));
        if invitation.inviter == self.own {
            return self.answer(
                request,
                refuse("this invitation was made by this device; run `cnspr manage join` on the device that is to join".into()),
            );
        }
        if self.pending_join.is_some() {
            return self.answer(
                request,
                refuse("a join is under way already; wait for it".into()),
            );
        }
        if let Some(member) = self.roster.get(&invitation.inviter) {
            return self.answer(
                request,
                refuse(format!(
                    "this device is a member of that mesh already ({} is a member)",
                    member.name
                )),
            );
        }
        if !self.roster.members().is_empty() {
            return self.answer(
                request,
                refuse(format!(
                    "this device is a member of another mesh ({} members); `cnspr manage leave` first",
                    self.roster.members().len()
                )),
            );
        }
        if invitation.addresses.is_empty() {
            return self.answer(
                request,
                Answer::Joined(Err(RpcError::invalid_params(
                    "the invitation holds no address of the inviting device; make a new one on a device with a network address",
                ))),
            );
        }
        let before = self.active_keys();
        if let Err(e) = self
            .roster
            .add_inviter(invitation.inviter, invitation.addresses.clone())
        {
            return self.answer(request, Answer::Joined(Err(roster_error(e))));
        }
        self.roster_applied(&before, now);
        let joining = Joining {
            secret: invitation.secret,
            name: self.name.to_string(),
        };
        self.pending_join = Some(PendingJoin {
            request,
            inviter: invitation.inviter,
            joining: joining.clone(),
            deadline: now.mono + JOIN_TIMEOUT,
        });
        self.table.retry_all(now.mono);
    }

    /// What a dial to `peer` carries: the invitation while joining through it.
    pub(super) fn joining_for(&self, peer: &PublicKey) -> Option<Joining> {
        self.pending_join
            .as_ref()
            .filter(|j| j.inviter == *peer)
            .map(|j| j.joining.clone())
    }

    /// Whether the join finished: the inviter's own entry arrived.
    fn check_join(&mut self) {
        let Some(pending) = &self.pending_join else {
            return;
        };
        let Some(inviter) = self
            .roster
            .entry(&pending.inviter)
            .filter(|e| e.version > 0)
            .cloned()
        else {
            return;
        };
        let request = pending.request;
        self.pending_join = None;
        tracing::info!(peer = %inviter.name, "joined the mesh of {}: {} members", inviter.name, self.roster.members().len());
        let joined = Joined {
            inviter,
            members: self.roster.members().len(),
        };
        self.answer(request, Answer::Joined(Ok(joined)));
    }

    /// The join failed: answer, and forget the inviter again.
    fn join_failed(&mut self, message: String, now: Now) {
        let Some(pending) = self.pending_join.take() else {
            return;
        };
        let before = self.active_keys();
        self.roster.forget_placeholder(&pending.inviter);
        self.roster_applied(&before, now);
        self.answer(
            pending.request,
            Answer::Joined(Err(error(code::UNREACHABLE, message))),
        );
    }

    /// `join` was given up by its caller: the inviter is forgotten unless its roster arrived.
    /// Returns whether a join was under way.
    pub(super) fn cancel_join(&mut self, now: Now) -> bool {
        let pending = self.pending_join.is_some();
        self.join_failed("cancelled".into(), now);
        pending
    }

    pub(super) fn on_join_refused(&mut self, peer: &PublicKey, refusal: JoinRefusal, now: Now) {
        if self.joining_for(peer).is_some() {
            self.join_failed(
                format!("the inviting device refused: {}", refusal.explain()),
                now,
            );
        }
    }

    /// A dial to the inviter failed while joining.
    pub(super) fn join_dial_failed(&mut self, peer: &PublicKey, error: &str, now: Now) {
        if self.joining_for(peer).is_some() {
            self.join_failed(
                format!(
                    "could not reach the inviting device: {error}; check that it runs and that this device can reach the address in the invitation"
                ),
                now,
            );
        }
    }

    pub(super) fn join_due(&mut self, now: Now) {
        if self
            .pending_join
            .as_ref()
            .is_some_and(|j| now.mono >= j.deadline)
        {
            self.join_failed(
                format!(
                    "the inviting device did not send the mesh's roster within {} s; try again",
                    JOIN_TIMEOUT.as_secs()
                ),
                now,
            );
        }
    }

    pub(super) fn membership_wakeup(&self) -> Option<Instant> {
        let join = self.pending_join.as_ref().map(|j| j.deadline);
        match (join, self.leaving_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
