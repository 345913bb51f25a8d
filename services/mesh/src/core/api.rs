//! The API calls the core answers: peers, ping, members, retry, send, messages, interfaces.

use std::collections::HashMap;

use cnsprcy::api::{MemberInfo, PeerInfo, PeerStatus};
use cnsprcy::rpc::RpcError;

use super::{Answer, ApiCall, Core, Now, Output, PersistOp, RequestId, StoreAccess};
use crate::peers::Reach;
use crate::roster::{Member, RosterError};

/// Error codes of the peer methods (JSON-RPC implementation-defined range).
pub mod code {
    pub const NOT_FOUND: i64 = -32004;
    pub const CONFLICT: i64 = -32005;
    pub const UNREACHABLE: i64 = -32006;
    pub const STORAGE: i64 = -32007;
    /// `send`: the outbox holds as much as it may; nothing was sent.
    pub const OUTBOX_FULL: i64 = -32008;
}

pub(crate) fn error(code: i64, message: impl Into<String>) -> RpcError {
    RpcError::new(code, message)
}

pub(crate) fn roster_error(e: RosterError) -> RpcError {
    match e {
        RosterError::NotFound { .. } => error(code::NOT_FOUND, e.to_string()),
        RosterError::NameTaken(_)
        | RosterError::KeyTaken(_)
        | RosterError::OwnKey
        | RosterError::Revoked(_)
        | RosterError::Full => error(code::CONFLICT, e.to_string()),
        other => error(code::STORAGE, other.to_string()),
    }
}

pub fn member_info(member: &Member) -> MemberInfo {
    MemberInfo {
        name: member.name.clone(),
        id: member.id(),
        public_key: member.public_key,
        addresses: member.addresses.clone(),
    }
}

impl<S: StoreAccess> Core<S> {
    pub(super) fn on_api(&mut self, request: RequestId, call: ApiCall, now: Now) {
        match call {
            ApiCall::Peers => {
                let peers = self
                    .roster
                    .members()
                    .iter()
                    .map(|m| self.peer_info(m, now))
                    .collect();
                self.answer(request, Answer::Peers(peers));
            }
            ApiCall::Peer { name } => {
                let result = self
                    .roster
                    .find(&name)
                    .map(|m| self.peer_info(m, now))
                    .map_err(roster_error);
                self.answer(request, Answer::Peer(result));
            }
            ApiCall::Ping { name, timeout } => self.start_ping(request, &name, timeout, now),
            ApiCall::AddMember(member) => self.add_member(request, member, now),
            ApiCall::RemoveMember { name, state } => self.remove_member(request, &name, state, now),
            ApiCall::Invite { lifetime } => self.invite(request, lifetime, now),
            ApiCall::Join(invitation) => self.join(request, invitation, now),
            ApiCall::Roster => {
                let roster = self.roster_info();
                self.answer(request, Answer::Roster(roster));
            }
            ApiCall::CancelJoin => {
                let cancelled = self.cancel_join(now);
                self.answer(request, Answer::JoinCancelled(cancelled));
            }
            ApiCall::Leave { force } => self.leave(request, force, now),
            ApiCall::Retry => {
                self.table.retry_all(now.mono);
                // Dialled are those with an address; the others wait to be found or to dial.
                let (no_address, dialling): (Vec<&Member>, Vec<&Member>) = self
                    .roster
                    .members()
                    .iter()
                    .filter(|m| !matches!(self.table.reach(&m.public_key), Reach::Direct { .. }))
                    .partition(|m| m.addresses.is_empty());
                let outcome = super::RetryOutcome {
                    dialling: dialling.len(),
                    no_address: no_address.into_iter().cloned().collect(),
                };
                self.answer(request, Answer::Retry(outcome));
            }
            ApiCall::Send(send) => self.start_send(request, send, now),
            ApiCall::Messages => {
                let info = self.messages_info();
                self.answer(request, Answer::Messages(Box::new(info)));
            }
            ApiCall::Interfaces => {
                let interfaces = self.interfaces.clone();
                self.answer(request, Answer::Interfaces(interfaces));
            }
            ApiCall::Knocks => {
                let knocks = self.knocks();
                self.answer(request, Answer::Knocks(knocks));
            }
            ApiCall::Names => {
                let mut names: HashMap<[u8; 32], String> = self
                    .roster
                    .members()
                    .iter()
                    .map(|m| (*m.public_key.as_bytes(), m.name.to_string()))
                    .collect();
                names.insert(self.own_bytes(), self.name.to_string());
                self.answer(request, Answer::Names(names));
            }
        }
    }

    /// Writes the roster as it is now; nobody waits for it.
    pub(super) fn save_roster(&mut self) {
        self.persist(PersistOp::Roster(self.roster.entries()), false);
    }

    /// The member set changed: the peer table, the accept path and the disk follow. Returns the
    /// token of the write.
    pub(super) fn members_changed(&mut self, now: Now) -> Option<super::Token> {
        self.table
            .sync_members(self.roster.members().iter().map(|m| m.public_key), now.mono);
        self.outputs.push(Output::Members(self.member_keys()));
        self.outputs.push(Output::Disabled(self.disabled_entries()));
        self.prune_problems();
        self.persist(PersistOp::Roster(self.roster.entries()), true)
    }

    pub(super) fn peer_info(&self, member: &Member, now: Now) -> PeerInfo {
        let key = member.public_key;
        let reach = self.table.reach(&key);
        let mut addresses = Vec::new();
        let live = self.sessions.get(&key);
        let (status, latency, via) = match reach {
            Reach::Direct { addr, rtt } => {
                addresses.push(addr);
                let status = if live.is_some_and(|l| l.suspect) {
                    PeerStatus::Suspect
                } else {
                    PeerStatus::Direct
                };
                (status, rtt, None)
            }
            Reach::Relayed { via, rtt } => (
                PeerStatus::Relayed,
                rtt,
                self.roster.get(&via).map(|m| m.name.clone()),
            ),
            Reach::Unreachable => (PeerStatus::Unreachable, None, None),
        };
        for addr in &member.addresses {
            if !addresses.contains(addr) {
                addresses.push(*addr);
            }
        }
        // A direct peer was last seen when its last frame came; a relayed one is seen now.
        let last_seen = if let Some(live) = live {
            Some(live.last_frame_wall(now))
        } else if reach.is_reachable() {
            Some(now.wall())
        } else {
            self.table.last_seen(&key)
        };
        let reason = self.reason(member, reach);
        PeerInfo {
            reason_code: reason.as_ref().map(|(code, _)| *code),
            reason: reason.map(|(_, text)| text),
            name: member.name.clone(),
            id: member.id(),
            public_key: key,
            status,
            addresses,
            rtt_ms: latency.map(super::millis),
            via,
            last_seen: last_seen.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        }
    }
}
