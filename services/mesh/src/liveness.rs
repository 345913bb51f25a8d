//! Keepalive and round-trip time of one session, without I/O: the session task feeds it what it
//! receives and the clock, and it says when to ping and when the session is dead.
//!
//! The initiator of a session pings every `interval` and reports its smoothed RTT in each ping,
//! so the responder learns the RTT without pinging. The responder pings once at the start and
//! then only when it heard nothing for `interval + timeout / 2` (later than the initiator's next
//! ping is due, so the two do not race). Each side declares the session dead when it has
//! received nothing for `interval + timeout`. An idle session so costs one ping and one pong per
//! interval. Both sides must use the same interval (the core agrees on one with the peer); it
//! may change while the session runs, and every deadline follows at once.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Initiator,
    Responder,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send `Ping { nonce, rtt }`.
    Ping { nonce: u64, rtt: Option<Duration> },
    /// Nothing was received for too long: close the session.
    Dead,
    /// Nothing to do before `next_deadline`.
    Wait,
}

#[derive(Debug)]
pub struct Liveness {
    role: Role,
    interval: Duration,
    timeout: Duration,
    last_rx: Instant,
    last_ping: Option<Instant>,
    outstanding: Option<(u64, Instant)>,
    srtt: Option<Duration>,
}

impl Liveness {
    pub fn new(role: Role, now: Instant, interval: Duration, timeout: Duration) -> Self {
        Self {
            role,
            interval,
            timeout,
            last_rx: now,
            last_ping: None,
            outstanding: None,
            srtt: None,
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    pub fn set_interval(&mut self, interval: Duration) {
        self.interval = interval;
    }

    /// Anything at all arrived from the peer at `at` (never moves backwards).
    pub fn on_receive(&mut self, at: Instant) {
        self.last_rx = self.last_rx.max(at);
    }

    /// A pong arrived; returns whether it answered our keepalive ping (else it is someone
    /// else's, such as a `cnspr ping`).
    pub fn on_pong(&mut self, nonce: u64, now: Instant) -> bool {
        match self.outstanding {
            Some((sent_nonce, sent_at)) if sent_nonce == nonce => {
                self.outstanding = None;
                self.sample(now.saturating_duration_since(sent_at));
                true
            }
            _ => false,
        }
    }

    /// A probe (a ping outside the keepalive's schedule) was answered after `rtt`.
    pub fn on_probe_answer(&mut self, rtt: Duration) {
        self.sample(rtt);
    }

    /// A ping arrived carrying the peer's RTT estimate; the responder takes it as its own.
    pub fn on_ping_report(&mut self, rtt: Option<Duration>) {
        if self.role == Role::Responder && rtt.is_some() {
            self.srtt = rtt;
        }
    }

    /// Smoothing that rises slowly (7/8 old, 1/8 new: one slow pong does not swing the figure)
    /// and falls fast (1/4 old, 3/4 new): the first samples, taken while the mesh forms, run
    /// high, and a path's real RTT is near its lowest samples.
    fn sample(&mut self, rtt: Duration) {
        self.srtt = Some(match self.srtt {
            None => rtt,
            Some(srtt) if rtt < srtt => (srtt + rtt * 3) / 4,
            Some(srtt) => (srtt * 7 + rtt) / 8,
        });
    }

    pub fn rtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// How long the responder waits for the initiator's ping before pinging itself.
    fn responder_idle(&self) -> Duration {
        self.interval + self.timeout / 2
    }

    /// What to do now. `nonce` is used if a ping is due.
    pub fn poll(&mut self, now: Instant, nonce: u64) -> Action {
        if now >= self.last_rx + self.interval + self.timeout {
            return Action::Dead;
        }
        let due = match self.role {
            Role::Initiator => self.last_ping.is_none_or(|at| now >= at + self.interval),
            Role::Responder => match self.last_ping {
                None => true,
                Some(at) => now >= self.last_rx.max(at) + self.responder_idle(),
            },
        };
        if due {
            self.last_ping = Some(now);
            self.outstanding = Some((nonce, now));
            Action::Ping {
                nonce,
                rtt: self.srtt,
            }
        } else {
            Action::Wait
        }
    }

    /// When `poll` next has something to do.
    /// When the peer counts as `suspect`: its keepalive is overdue (nothing received for the
    /// interval plus half the time-out), some time before the session is declared dead.
    pub fn suspect_at(&self) -> Instant {
        self.last_rx + self.interval + self.timeout / 2
    }

    /// When the last frame arrived.
    pub fn last_received(&self) -> Instant {
        self.last_rx
    }

    pub fn next_deadline(&self) -> Instant {
        let dead = self.last_rx + self.interval + self.timeout;
        let ping = match (self.role, self.last_ping) {
            (_, None) => return self.last_rx,
            (Role::Initiator, Some(at)) => at + self.interval,
            (Role::Responder, Some(at)) => self.last_rx.max(at) + self.responder_idle(),
        };
        ping.min(dead)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: Duration = Duration::from_secs(20);
    const T: Duration = Duration::from_secs(10);

    #[test]
    fn a_peer_is_suspect_between_an_overdue_keepalive_and_the_verdict() {
        let t0 = Instant::now();
        let mut l = Liveness::new(Role::Initiator, t0, I, T);
        assert_eq!(l.suspect_at(), t0 + I + T / 2);
        assert!(l.suspect_at() < t0 + I + T, "suspect before dead");
        l.on_receive(t0 + I);
        assert_eq!(l.last_received(), t0 + I);
        assert_eq!(l.suspect_at(), t0 + I + I + T / 2);
    }

    #[test]
    fn initiator_pings_every_interval_and_measures_rtt() {
        let t0 = Instant::now();
        let mut l = Liveness::new(Role::Initiator, t0, I, T);
        assert_eq!(
            l.poll(t0, 1),
            Action::Ping {
                nonce: 1,
                rtt: None
            }
        );
        assert_eq!(l.poll(t0, 2), Action::Wait);
        let t1 = t0 + Duration::from_millis(4);
        l.on_receive(t1);
        assert!(l.on_pong(1, t1));
        assert!(!l.on_pong(1, t1), "a pong counts once");
        assert_eq!(l.rtt(), Some(Duration::from_millis(4)));
        assert_eq!(l.next_deadline(), t0 + I);
        assert_eq!(
            l.poll(t0 + I, 3),
            Action::Ping {
                nonce: 3,
                rtt: Some(Duration::from_millis(4))
            }
        );
        l.on_receive(t0 + I + Duration::from_millis(12));
        assert!(l.on_pong(3, t0 + I + Duration::from_millis(12)));
        assert_eq!(l.rtt(), Some(Duration::from_millis(5)), "rises slowly");
        l.poll(t0 + I * 2, 4);
        assert!(l.on_pong(4, t0 + I * 2 + Duration::from_millis(1)));
        assert_eq!(l.rtt(), Some(Duration::from_micros(2000)), "falls fast");
    }

    #[test]
    fn responder_pings_once_then_only_when_idle() {
        let t0 = Instant::now();
        let mut l = Liveness::new(Role::Responder, t0, I, T);
        assert!(matches!(l.poll(t0, 1), Action::Ping { .. }));
        // The initiator's pings keep arriving: the responder stays quiet and takes its RTT.
        for k in 1..5 {
            let t = t0 + I * k - Duration::from_secs(1);
            l.on_receive(t);
            l.on_ping_report(Some(Duration::from_millis(3)));
            assert_eq!(l.poll(t, 9), Action::Wait);
        }
        assert_eq!(l.rtt(), Some(Duration::from_millis(3)));
        let last = t0 + I * 4 - Duration::from_secs(1);
        // The initiator's next ping is due at `last + I`; only well after it does the responder
        // take over.
        assert_eq!(l.poll(last + I, 10), Action::Wait);
        assert!(matches!(l.poll(last + I + T / 2, 11), Action::Ping { .. }));
    }

    #[test]
    fn silence_is_death_after_interval_plus_timeout() {
        let t0 = Instant::now();
        let mut l = Liveness::new(Role::Initiator, t0, I, T);
        l.poll(t0, 1);
        assert_eq!(l.next_deadline(), t0 + I);
        l.poll(t0 + I, 2);
        assert_eq!(l.next_deadline(), t0 + I + T);
        assert_eq!(
            l.poll(t0 + I + T - Duration::from_millis(1), 3),
            Action::Wait
        );
        assert_eq!(l.poll(t0 + I + T, 4), Action::Dead);
    }
}
