//! The one forwarding rule: a `Routed` envelope goes to its `to` directly when there is a session
//! with it, else to the member that relays to it; each device on the way adds 1 to `hops`, and
//! drops it at `MAX_HOPS` or when it has no path. Nothing routed is stored on the way: what is
//! lost is sent again by its origin (resends, anti-entropy, the next ping).

use cnsprcy::api::PeerStatus;
use cnsprcy::identity::PublicKey;
use cnsprcy::wire::{MAX_HOPS, Message, Routed, RoutedBody};

use super::{Core, Now, StoreAccess};
use crate::peers::Reach;

impl<S: StoreAccess> Core<S> {
    /// The session `to` is reached through now: its own, or its relay's.
    pub(super) fn next_hop(&self, to: &PublicKey) -> Option<PublicKey> {
        match self.table.reach(to) {
            Reach::Direct { .. } => Some(*to),
            Reach::Relayed { via, .. } => Some(via),
            Reach::Unreachable => None,
        }
    }

    /// Sends `body` from this device to `to`; false when there is no path now.
    pub(super) fn route(&mut self, to: &PublicKey, body: RoutedBody) -> bool {
        let routed = Routed {
            from: self.own_bytes(),
            to: *to.as_bytes(),
            hops: 0,
            body,
        };
        self.forward(routed)
    }

    /// Passes `routed` one hop on towards its `to`.
    fn forward(&mut self, routed: Routed) -> bool {
        let to = PublicKey::from_bytes(routed.to);
        let Some(hop) = self.next_hop(&to) else {
            return false;
        };
        self.send_to(&hop, Message::Routed(routed))
    }

    /// A routed envelope arrived from the direct peer `via`.
    pub(super) fn on_routed(&mut self, via: &PublicKey, routed: Routed, now: Now) {
        let from = PublicKey::from_bytes(routed.from);
        // Only members speak, and only through members.
        if !self.table.contains(&from) {
            tracing::debug!(peer = %self.member_name(via), "dropped a routed message from a non-member");
            return;
        }
        if routed.to != self.own_bytes() {
            if routed.hops + 1 >= MAX_HOPS
                || !self.table.contains(&PublicKey::from_bytes(routed.to))
            {
                return;
            }
            self.forward(Routed {
                hops: routed.hops + 1,
                ..routed
            });
            return;
        }
        match routed.body {
            RoutedBody::Ping { nonce } => {
                self.route(&from, RoutedBody::Pong { nonce });
            }
            RoutedBody::Pong { nonce } => self.complete_ping(nonce, now),
            RoutedBody::Ack { id } => self.on_ack(&from, id, now),
            RoutedBody::Reply { id, tag, result } => self.on_reply(&from, id, result, &tag, now),
            RoutedBody::Store(body) => self.on_store(&from, body, now),
        }
    }

    /// Starts a `cnspr ping`: over the session, or through the relay.
    pub(super) fn start_ping(
        &mut self,
        request: super::RequestId,
        name: &str,
        timeout: std::time::Duration,
        now: Now,
    ) {
        let member = match self.roster.find(name) {
            Ok(member) => member.clone(),
            Err(e) => {
                self.answer(
                    request,
                    super::Answer::Ping(Err(super::api::roster_error(e))),
                );
                return;
            }
        };
        let key = member.public_key;
        let nonce: u64 = rand::Rng::random(&mut self.rng);
        let sent =
            match self.table.reach(&key) {
                Reach::Direct { addr, .. } => self
                    .send_to(
                        &key,
                        Message::Ping {
                            nonce,
                            rtt_us: None,
                        },
                    )
                    .then_some((PeerStatus::Direct, None, Some(addr))),
                Reach::Relayed { via, .. } => self
                    .route(&key, RoutedBody::Ping { nonce })
                    .then_some((PeerStatus::Relayed, Some(via), None)),
                Reach::Unreachable => None,
            };
        let Some((path, via, address)) = sent else {
            self.answer(
                request,
                super::Answer::Ping(Err(super::api::error(
                    super::api::code::UNREACHABLE,
                    format!(
                        "{} is unreachable: no session with it, and no member reports one",
                        member.name
                    ),
                ))),
            );
            return;
        };
        self.pending_pings.insert(
            nonce,
            super::PendingPing {
                request,
                key,
                sent: now.mono,
                deadline: now.mono + timeout,
                path,
                via,
                address,
            },
        );
    }

    pub(super) fn complete_ping(&mut self, nonce: u64, now: Now) {
        let Some(pending) = self.pending_pings.remove(&nonce) else {
            return;
        };
        let answer = match self.roster.get(&pending.key) {
            Some(member) => Ok(cnsprcy::api::PingResult {
                name: member.name.clone(),
                id: member.id(),
                status: pending.path,
                via: pending
                    .via
                    .and_then(|v| self.roster.get(&v).map(|m| m.name.clone())),
                address: pending.address,
                rtt_ms: super::millis(now.mono.saturating_duration_since(pending.sent)),
            }),
            None => Err(super::api::error(
                super::api::code::NOT_FOUND,
                "the member was removed while the ping was under way",
            )),
        };
        self.answer(pending.request, super::Answer::Ping(answer));
    }

    /// Pings whose time ran out are answered as such.
    pub(super) fn expire_pings(&mut self, now: Now) {
        let expired: Vec<u64> = self
            .pending_pings
            .iter()
            .filter(|(_, p)| p.deadline <= now.mono)
            .map(|(nonce, _)| *nonce)
            .collect();
        for nonce in expired {
            let Some(ping) = self.pending_pings.remove(&nonce) else {
                continue;
            };
            let name = self.member_name(&ping.key);
            let waited = ping.deadline.saturating_duration_since(ping.sent);
            self.answer(
                ping.request,
                super::Answer::Ping(Err(super::api::error(
                    super::api::code::UNREACHABLE,
                    format!("no pong from {name} within {} ms", waited.as_millis()),
                ))),
            );
        }
    }
}
