//! Log lines about things strangers can cause (garbage on the port, handshakes from non-members,
//! connection floods) are rate-limited: one line per kind and interval, counting what it left
//! out, so an attacker cannot fill the journal.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct RateLimitedLog {
    interval: Duration,
    state: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl RateLimitedLog {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// Logs `message()` at warn level unless a line of this `kind` was logged within the
    /// interval. Returns whether it logged.
    pub fn warn(&self, kind: &'static str, message: impl FnOnce() -> String) -> bool {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let entry = state.entry(kind).or_insert((now - self.interval * 2, 0));
        if now.duration_since(entry.0) < self.interval {
            entry.1 += 1;
            return false;
        }
        let suppressed = std::mem::replace(entry, (now, 0)).1;
        if suppressed > 0 {
            tracing::warn!(
                "{} ({suppressed} more like it in the last {:?} not logged)",
                message(),
                self.interval
            );
        } else {
            tracing::warn!("{}", message());
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kind_and_interval() {
        let log = RateLimitedLog::new(Duration::from_secs(60));
        assert!(log.warn("a", || "first".into()));
        assert!(!log.warn("a", || "second".into()));
        assert!(log.warn("b", || "other kind".into()));
        let fast = RateLimitedLog::new(Duration::from_millis(1));
        assert!(fast.warn("a", || "x".into()));
        std::thread::sleep(Duration::from_millis(5));
        assert!(fast.warn("a", || "y".into()));
    }
}
