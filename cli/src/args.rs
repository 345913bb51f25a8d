//! Value parsers for the command line. A value that cannot be right is a usage error (exit
//! status 2) reported by clap, in the units the user typed, before anything is sent.

use std::time::Duration;

use cnsprcy::api::{MAX_PING_TIMEOUT_MS, MAX_TTL_MS, MAX_WAIT_MS, MIN_TTL_MS};

/// A message tag, checked as the daemon checks it.
pub fn tag(text: &str) -> Result<String, String> {
    cnsprcy::tag::validate_tag(text)?;
    Ok(text.to_owned())
}

/// `send --ttl`: 100 ms to 30 days, as the API takes it.
pub fn ttl(text: &str) -> Result<Duration, String> {
    bounded_duration(
        text,
        ("the shortest TTL", MIN_TTL_MS, "100 ms"),
        ("the longest TTL", MAX_TTL_MS, "30 days"),
    )
}

/// `send --timeout`: how long `--wait` waits, up to an hour.
pub fn wait_timeout(text: &str) -> Result<Duration, String> {
    bounded_duration(
        text,
        ("the shortest wait", 1, "1 ms"),
        ("the longest wait", MAX_WAIT_MS, "1 hour"),
    )
}

/// `ping --timeout`: how long each ping waits for its pong, up to a minute.
pub fn ping_timeout(text: &str) -> Result<Duration, String> {
    bounded_duration(
        text,
        ("the shortest ping time-out", 1, "1 ms"),
        (
            "the longest ping time-out",
            MAX_PING_TIMEOUT_MS,
            "60 seconds",
        ),
    )
}

/// A duration as people write it (`30s`, `5m`, `1h 30m`), within `min` and `max`, each given
/// as (what it is, milliseconds, the same in words).
fn bounded_duration(
    text: &str,
    (min_name, min_ms, min_words): (&str, u64, &str),
    (max_name, max_ms, max_words): (&str, u64, &str),
) -> Result<Duration, String> {
    let value = humantime::parse_duration(text.trim())
        .map_err(|_| format!("`{text}` is not a duration; write it like 30s, 5m, 2h"))?;
    if value < Duration::from_millis(min_ms) {
        return Err(format!("`{text}` is shorter than {min_name}, {min_words}"));
    }
    if value > Duration::from_millis(max_ms) {
        return Err(format!("`{text}` is longer than {max_name}, {max_words}"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_checked_in_the_users_units() {
        assert_eq!(ttl("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(ttl("30days"), Ok(Duration::from_secs(30 * 86400)));
        assert_eq!(ttl("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(
            ttl("60d").unwrap_err(),
            "`60d` is longer than the longest TTL, 30 days"
        );
        assert_eq!(
            ttl("soon").unwrap_err(),
            "`soon` is not a duration; write it like 30s, 5m, 2h"
        );
        assert_eq!(
            ttl("5ms").unwrap_err(),
            "`5ms` is shorter than the shortest TTL, 100 ms"
        );
        assert_eq!(
            ttl("20").unwrap_err(),
            "`20` is not a duration; write it like 30s, 5m, 2h"
        );
        assert_eq!(wait_timeout("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(
            wait_timeout("2h").unwrap_err(),
            "`2h` is longer than the longest wait, 1 hour"
        );
        assert_eq!(
            ping_timeout("61s").unwrap_err(),
            "`61s` is longer than the longest ping time-out, 60 seconds"
        );
    }

    #[test]
    fn tags_are_checked_as_the_daemon_checks_them() {
        assert_eq!(tag("clipboard/set"), Ok("clipboard/set".into()));
        assert!(tag("_bad").unwrap_err().contains("reserved"));
        assert!(tag("a//b").is_err());
        assert!(tag("").is_err());
    }
}
