//! Logging with `tracing`: to journald when the process runs as a systemd unit, else
//! human-readable lines on stderr. `RUST_LOG` filters as usual (default: `info`).

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::prelude::*;

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    Journald,
    Stderr,
}

/// Journald when the process runs as a systemd unit: systemd sets `JOURNAL_STREAM` to the device
/// and inode of the journal stream on stderr (checking that stderr still is that stream keeps a
/// shell started from a unit, which inherits the variable, logging to its terminal); a unit whose
/// stderr goes elsewhere is told by `INVOCATION_ID` with the journald socket present. A terminal
/// running `cnspr serve` gets stderr, even where journald runs.
pub fn detect_target() -> LogTarget {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        let in_unit = std::env::var_os("INVOCATION_ID").is_some();
        let journald = std::path::Path::new("/run/systemd/journal/socket").exists();
        return if in_unit && journald {
            LogTarget::Journald
        } else {
            LogTarget::Stderr
        };
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return LogTarget::Stderr;
    };
    let stderr_matches = std::fs::metadata("/proc/self/fd/2")
        .map(|m| m.dev().to_string() == dev && m.ino().to_string() == ino)
        .unwrap_or(false);
    if stderr_matches {
        LogTarget::Journald
    } else {
        LogTarget::Stderr
    }
}

/// The log filter `RUST_LOG` asks for. Unset, empty or not understood: `info`.
fn filter_from(rust_log: Option<&str>) -> Targets {
    // `Targets` rather than `EnvFilter`: the same `target=level` directives without a regular
    // expression engine (half a megabyte of code that every service process would map).
    let rust_log = rust_log.filter(|v| !v.trim().is_empty());
    let filter = rust_log
        .and_then(|directives| directives.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO));
    // The store's engine (sled) logs every disk write at debug: only its warnings, unless
    // RUST_LOG names it.
    if rust_log.is_some_and(|v| v.contains("sled")) {
        filter
    } else {
        filter.with_target("sled", LevelFilter::WARN)
    }
}

/// Installs the global subscriber. `service` names the syslog identifier in the journal.
pub fn init(service: &str) {
    let filter = || filter_from(std::env::var("RUST_LOG").ok().as_deref());
    if detect_target() == LogTarget::Journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                // Fields keep their own names (PEER=, TAG=, SERVICE=), without the crate's
                // default `F_` prefix, so `journalctl PEER=desk` reads naturally. None of our
                // field names is one journald reserves (MESSAGE, PRIORITY, ...).
                let layer = layer
                    .with_syslog_identifier(service.to_owned())
                    .with_field_prefix(None);
                let _ = tracing_subscriber::registry()
                    .with(filter())
                    .with(layer)
                    .try_init();
                return;
            }
            Err(e) => eprintln!("cannot connect to journald ({e}); logging to stderr"),
        }
    }
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let _ = tracing_subscriber::registry()
        .with(filter())
        .with(stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn rust_log_unset_empty_or_garbled_means_info() {
        for value in [None, Some(""), Some("  "), Some("=[")] {
            let filter = filter_from(value);
            assert!(
                filter.would_enable("cnsprcy_mesh", &Level::INFO),
                "{value:?}"
            );
            assert!(
                !filter.would_enable("cnsprcy_mesh", &Level::DEBUG),
                "{value:?}"
            );
            assert!(!filter.would_enable("sled", &Level::INFO), "{value:?}");
        }
        let filter = filter_from(Some("debug,sled=info"));
        assert!(filter.would_enable("cnsprcy_mesh", &Level::DEBUG));
        assert!(filter.would_enable("sled", &Level::INFO));
        assert!(!filter_from(Some("warn")).would_enable("x", &Level::INFO));
    }
}
