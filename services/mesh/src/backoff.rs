//! How long to wait before dialling a member again after a failed attempt: exponential, capped,
//! with jitter so that devices that lost the network together do not redial in lock-step.

use std::time::Duration;

/// The first retry comes after 0.5–1 s.
pub const INITIAL: Duration = Duration::from_secs(1);
/// Retries never wait longer than this (before jitter shortens it).
pub const MAX: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The delay after one more failure. `jitter` in [0, 1) picks a point in the upper half of
    /// the current step ("equal jitter"): at least half the step, so the backoff still grows.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let step = INITIAL
            .checked_mul(1u32 << self.failures.min(16))
            .unwrap_or(MAX)
            .min(MAX);
        self.failures = self.failures.saturating_add(1);
        step.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let mut backoff = Backoff::default();
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next_delay(0.999_999)).collect();
        assert!(delays[0] <= INITIAL && delays[0] > INITIAL / 2);
        assert!(delays[1] > delays[0] && delays[2] > delays[1]);
        assert!(delays.iter().all(|d| *d <= MAX));
        assert!(delays[9] > MAX.mul_f64(0.99));
        let mut low = Backoff::default();
        assert_eq!(low.next_delay(0.0), INITIAL / 2);
        backoff.reset();
        assert_eq!(backoff.next_delay(0.0), INITIAL / 2);
        for _ in 0..100 {
            backoff.next_delay(0.5);
        }
        assert!(backoff.next_delay(1.0) <= MAX);
    }
}
