//! Failure detection: a heartbeat ring, suspicion, and probes.
//!
//! - Every device sends a `Heartbeat` every `heartbeat_interval` to one peer, its successor: the
//!   member with the next larger key among those it has a session with (wrapping around). So
//!   every device is watched by one peer, and each sends one heartbeat and receives one per
//!   interval, however large the mesh. A device whose successor changes tells the old one that
//!   no more heartbeats follow.
//! - A heartbeat says when the next follows. When nothing at all arrived from the sender by
//!   then plus a grace, the watcher suspects it: it sends `Suspect` to every other peer it has a
//!   session with, and probes the sender itself.
//! - A probe is a ping that must be answered within the probe time-out. A device that hears
//!   `Suspect` probes the suspect too, over its own session. Whoever gets no answer closes its
//!   session with the suspect (which so becomes `relayed` or `unreachable`); one whose probe is
//!   answered keeps it. Detection by one so becomes detection by all within one probe time-out,
//!   and a bad link between the watcher and the suspect alone drops only that session.
//! - A device whose probe was answered tells the suspect who suspected it (`SuspectedBy`), and
//!   the suspect probes the watcher: when the link between the two alone died, both sides so end
//!   their session, not only the watcher. That probe tells nobody anything, so a false alarm
//!   ends there.
//! - A watcher whose own probe went unanswered probes every other peer as well: if it is the
//!   one cut off, it learns so now rather than a keepalive later; and a peer that fails this
//!   sweep is suspected to all (it may have been the one that watched the first, failing with
//!   it, so nobody else would notice).
//!
//! Grace and probe time-out grow with the session's round-trip time, so that a slow or lossy
//! link (TCP resends a lost segment after about one round trip plus 200 ms) is not taken for a
//! dead one.

use std::time::{Duration, Instant};

use cnsprcy::identity::PublicKey;
use cnsprcy::wire::Message;

use super::{Core, Now, Output, StoreAccess};

/// The least grace after an overdue heartbeat: a busy device's scheduling noise stays below it.
pub const MIN_GRACE: Duration = Duration::from_millis(500);
/// The least time a probe waits for its answer.
pub const MIN_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Grace and probe time-out are at least this many smoothed round trips.
const ROUND_TRIPS: u32 = 4;
/// A peer that answered a probe this recently is not probed again on hearsay (every device
/// that probed a suspect tells it who suspected it; one probe of the watcher is enough).
/// Also applies to `SuspectedBy`.
const PROBED_RECENTLY: Duration = Duration::from_secs(5);

/// A probe of a peer that waits for its pong.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Probe {
    nonce: u64,
    sent: Instant,
    deadline: Instant,
    cause: ProbeCause,
}

impl Probe {
    /// Whether the probe means the peer is suspected (a sweep, or a check of the link to a
    /// watcher that suspected this device, only checks this device's links).
    pub(crate) fn suspects(&self) -> bool {
        matches!(self.cause, ProbeCause::Heartbeat | ProbeCause::Suspected(_))
    }
}

/// Why a peer is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProbeCause {
    /// Its heartbeat to this device is overdue.
    Heartbeat,
    /// The member named found its heartbeat overdue.
    Suspected(PublicKey),
    /// This device's probe of another peer went unanswered: is this device the one cut off?
    Sweep,
    /// The peer suspected this device, which others still reach: is the link between the two
    /// the one that failed?
    SuspectedUs,
}

impl<S: StoreAccess> Core<S> {
    /// The member this device sends heartbeats to: the next larger key among its sessions,
    /// wrapping around to the smallest.
    fn heartbeat_successor(&self) -> Option<PublicKey> {
        let own = self.own.as_bytes();
        let keys = self.sessions.keys();
        let after = keys
            .clone()
            .filter(|k| k.as_bytes() > own)
            .min_by_key(|k| *k.as_bytes());
        after
            .or_else(|| keys.min_by_key(|k| *k.as_bytes()))
            .copied()
    }

    /// Sends the heartbeat when it is due, to the successor of the moment.
    pub(super) fn send_heartbeats(&mut self, now: Now) {
        let successor = self.heartbeat_successor();
        if successor != self.heartbeat_to {
            if let Some(old) = self.heartbeat_to.take() {
                let root = self.store.root();
                self.send_to(
                    &old,
                    Message::Heartbeat {
                        next_ms: None,
                        root,
                    },
                );
            }
            self.heartbeat_to = successor;
            self.next_heartbeat = now.mono;
        }
        let Some(to) = self.heartbeat_to else {
            return;
        };
        if now.mono < self.next_heartbeat {
            return;
        }
        let interval = self.config.heartbeat_interval;
        let next_ms = u32::try_from(interval.as_millis()).unwrap_or(u32::MAX);
        let root = self.store.root();
        self.send_to(
            &to,
            Message::Heartbeat {
                next_ms: Some(next_ms),
                root,
            },
        );
        self.next_heartbeat = now.mono + interval;
    }

    /// How long after the promised time a heartbeat from `peer` counts as overdue, and how long
    /// a probe of it waits.
    fn patience(&self, peer: &PublicKey, floor: Duration) -> Duration {
        let rtt = self
            .sessions
            .get(peer)
            .and_then(|l| l.liveness.rtt())
            .unwrap_or_default();
        floor.max(rtt * ROUND_TRIPS)
    }

    /// A heartbeat from `peer`: watch it until the next, and compare stores if they differed
    /// at two heartbeats in a row (a single difference is usually a write on its way).
    pub(super) fn on_heartbeat(&mut self, peer: &PublicKey, next_ms: Option<u32>, root: u64) {
        let grace = self.patience(peer, MIN_GRACE);
        let ours = self.store.root();
        let Some(live) = self.sessions.get_mut(peer) else {
            return;
        };
        live.heartbeat_watch = next_ms.map(|ms| Duration::from_millis(ms.into()) + grace);
        let differs = root != ours;
        if differs && live.root_differed {
            live.root_differed = false;
            self.store_compare(peer);
        } else {
            live.root_differed = differs;
        }
    }

    /// `from` says `suspect`'s heartbeat to it is overdue: probe it over this device's session.
    pub(super) fn on_suspect(&mut self, from: &PublicKey, suspect: PublicKey, now: Now) {
        if suspect == self.own {
            // Our answer to its probe says enough.
            return;
        }
        if self.may_probe(&suspect, now) {
            self.start_probe(&suspect, ProbeCause::Suspected(*from), now);
        }
    }

    /// Another member's probe of this device was answered, but `by` suspected it: probe `by`.
    pub(super) fn on_suspected_by(&mut self, by: PublicKey, now: Now) {
        if by != self.own && self.may_probe(&by, now) {
            self.start_probe(&by, ProbeCause::SuspectedUs, now);
        }
    }

    /// Whether `peer` has a session, no probe under way, and no answer to one lately.
    fn may_probe(&self, peer: &PublicKey, now: Now) -> bool {
        self.sessions.get(peer).is_some_and(|live| {
            live.probe.is_none()
                && live
                    .probe_answered
                    .is_none_or(|at| now.mono >= at + PROBED_RECENTLY)
        })
    }

    fn start_probe(&mut self, peer: &PublicKey, cause: ProbeCause, now: Now) {
        let timeout = self.patience(peer, MIN_PROBE_TIMEOUT);
        let nonce: u64 = rand::Rng::random(&mut self.rng);
        let name = self.member_name(peer);
        let why = self.probe_cause_text(cause);
        let Some(live) = self.sessions.get_mut(peer) else {
            return;
        };
        let rtt_us = live
            .liveness
            .rtt()
            .map(|d| d.as_micros().min(u32::MAX.into()) as u32);
        live.probe = Some(Probe {
            nonce,
            sent: now.mono,
            deadline: now.mono + timeout,
            cause,
        });
        let session = live.id;
        tracing::debug!(peer = %name, "probing {name}: {why}");
        self.send(session, Message::Ping { nonce, rtt_us });
    }

    fn probe_cause_text(&self, cause: ProbeCause) -> String {
        match cause {
            ProbeCause::Heartbeat => "its heartbeat to this device is overdue".to_owned(),
            ProbeCause::Suspected(by) => {
                format!("its heartbeat to {} is overdue", self.member_name(&by))
            }
            ProbeCause::Sweep => "this device lost another peer and checks the rest".to_owned(),
            ProbeCause::SuspectedUs => {
                "it found this device's heartbeat overdue, which others still hear".to_owned()
            }
        }
    }

    /// A pong from `peer`: true if it answered the probe of it.
    pub(super) fn on_probe_pong(&mut self, peer: &PublicKey, nonce: u64, now: Now) -> bool {
        let Some(live) = self.sessions.get_mut(peer) else {
            return false;
        };
        let Some(probe) = live.probe.filter(|p| p.nonce == nonce) else {
            return false;
        };
        live.probe = None;
        live.probe_answered = Some(now.mono);
        let session = live.id;
        live.liveness
            .on_probe_answer(now.mono.saturating_duration_since(probe.sent));
        if let Some(rtt) = live.liveness.rtt() {
            self.table.set_rtt(peer, rtt);
        }
        if probe.cause == ProbeCause::Heartbeat {
            self.outputs.push(Output::HeartbeatMissed { session });
        }
        if let ProbeCause::Suspected(by) = probe.cause {
            // Whatever failed may be the link between the two: let the suspect check it too.
            self.send_to(peer, Message::SuspectedBy { by: *by.as_bytes() });
        }
        if probe.suspects() {
            let name = self.member_name(peer);
            tracing::info!(peer = %name, "{name} answered its probe");
        }
        true
    }

    /// Overdue heartbeats start suspicion; unanswered probes end sessions.
    pub(super) fn detect_failures(&mut self, now: Now) {
        let mut overdue = Vec::new();
        let mut failed = Vec::new();
        let mut missed = Vec::new();
        for (peer, live) in &mut self.sessions {
            if let Some(probe) = live.probe {
                if now.mono < probe.deadline {
                    continue;
                }
                if live.liveness.last_received() > probe.sent {
                    // Frames came after the probe went (chunks of a long message, say, which
                    // the pong queues behind): it is alive.
                    live.probe = None;
                    live.probe_answered = Some(now.mono);
                    if probe.cause == ProbeCause::Heartbeat {
                        missed.push(live.id);
                    }
                } else {
                    failed.push((*peer, probe));
                }
            } else if let Some(watch) = live.heartbeat_watch
                && now.mono >= live.liveness.last_received() + watch
            {
                // Watched again from its next heartbeat on (a sender that moved on to another
                // successor without saying so is not suspected twice).
                live.heartbeat_watch = None;
                overdue.push(*peer);
            }
        }
        self.outputs.extend(
            missed
                .into_iter()
                .map(|session| Output::HeartbeatMissed { session }),
        );
        for peer in overdue {
            self.tell_all_to_probe(&peer);
            self.start_probe(&peer, ProbeCause::Heartbeat, now);
        }
        for (peer, probe) in failed {
            let waited = humantime::format_duration(probe.deadline - probe.sent);
            let why = self.probe_cause_text(probe.cause);
            let reason = format!("it did not answer a probe within {waited} ({why})");
            self.close_session(&peer, &reason, now);
            if probe.cause == ProbeCause::Sweep {
                // Another device gone with the first (two neighbours on the ring failing at
                // once): the one that watched it is gone too, so nobody else would notice.
                self.tell_all_to_probe(&peer);
            }
            if probe.cause == ProbeCause::Heartbeat {
                let rest: Vec<PublicKey> = self
                    .sessions
                    .iter()
                    .filter(|(_, l)| l.probe.is_none())
                    .map(|(k, _)| *k)
                    .collect();
                for other in rest {
                    self.start_probe(&other, ProbeCause::Sweep, now);
                }
            }
        }
    }

    /// Sends `Suspect { peer }` to every other peer with a session.
    fn tell_all_to_probe(&mut self, peer: &PublicKey) {
        let others: Vec<PublicKey> = self
            .sessions
            .keys()
            .filter(|k| *k != peer)
            .copied()
            .collect();
        for other in others {
            self.send_to(
                &other,
                Message::Suspect {
                    peer: *peer.as_bytes(),
                },
            );
        }
    }

    /// When failure detection next has something to do.
    pub(super) fn detector_wakeup(&self) -> Option<Instant> {
        let mut wake = self.heartbeat_to.map(|_| self.next_heartbeat);
        let mut earlier = |at: Instant| wake = Some(wake.map_or(at, |w: Instant| w.min(at)));
        for live in self.sessions.values() {
            if let Some(probe) = live.probe {
                earlier(probe.deadline);
            } else if let Some(watch) = live.heartbeat_watch {
                earlier(live.liveness.last_received() + watch);
            }
        }
        wake
    }

    /// Why `peer`'s session is suspect through a probe, if it is.
    pub(super) fn probe_reason(&self, peer: &PublicKey) -> Option<String> {
        let probe = self.sessions.get(peer)?.probe.filter(Probe::suspects)?;
        Some(format!(
            "{}; it is being probed, and its session ends unless it answers",
            self.probe_cause_text(probe.cause)
        ))
    }
}
