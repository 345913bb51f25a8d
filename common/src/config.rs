//! The configuration file: `$XDG_CONFIG_HOME/cnsprcy/config.toml`, or the file `CNSPRCY_CONFIG`
//! names. Every key is optional; `docs/configuration.md` lists them with their defaults.
//!
//! Mistakes are reported with the file, line, column and key, and an unknown key comes with the
//! nearest valid one, because a daemon that ignores a misspelt `lisen` silently is worse than one
//! that refuses to start.

use std::fs;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::identity::DeviceName;
use crate::netif::InterfaceName;
use crate::paths::{Paths, XdgDirs, expand_home};

/// The TCP port the mesh listens on unless `[mesh] listen` says otherwise.
pub const DEFAULT_PORT: u16 = 7332;

/// The environment variable that points at another configuration file.
pub const CONFIG_ENV: &str = "CNSPRCY_CONFIG";

/// Every key the file may hold, by section ("" is the top level). Kept next to the structs below;
/// a unit test checks that the two agree.
const SCHEMA: &[(&str, &[&str])] = &[
    ("", &["name", "mesh", "discovery", "handlers", "paths"]),
    ("discovery", &["enabled", "interfaces"]),
    (
        "mesh",
        &[
            "listen",
            "interfaces",
            "keepalive_interval",
            "keepalive_timeout",
            "heartbeat_interval",
        ],
    ),
    (
        "handlers",
        &["timeout", "max_running", "max_queued", "idle_exit"],
    ),
    ("paths", &["state_dir", "runtime_dir", "handlers_dir"]),
];

/// The longest `[mesh] keepalive_interval` and `keepalive_timeout`, and the longest keepalive
/// interval a peer may ask a session to be kept at.
pub const MAX_KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This device's name as other devices show it. Default: the name given to
    /// `cnspr manage init --name`, else the hostname.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<DeviceName>,
    pub mesh: MeshConfig,
    pub discovery: DiscoveryConfig,
    pub handlers: HandlersConfig,
    pub paths: PathsConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    /// Addresses the mesh accepts sessions on; one without a port means `DEFAULT_PORT`.
    #[serde(deserialize_with = "crate::address::deserialize_list")]
    pub listen: Vec<SocketAddr>,
    /// The network interfaces sessions may use, dialled or accepted; empty: every interface.
    pub interfaces: Vec<InterfaceName>,
    /// A session that received nothing for this long sends a ping.
    #[serde(with = "duration_text::up_to_an_hour")]
    pub keepalive_interval: Duration,
    /// A session that then still receives nothing for this long is declared dead.
    #[serde(with = "duration_text::up_to_an_hour")]
    pub keepalive_timeout: Duration,
    /// How often this device sends a heartbeat to the one peer that watches it; a device
    /// whose heartbeat is overdue is probed by every member.
    #[serde(with = "duration_text::up_to_an_hour")]
    pub heartbeat_interval: Duration,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_PORT)),
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, DEFAULT_PORT)),
            ],
            interfaces: Vec::new(),
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(2),
        }
    }
}

/// How the handler service runs handlers; `docs/event_handlers.md` explains each key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandlersConfig {
    /// A handler still running after this long is killed with its whole process group.
    #[serde(with = "duration_text::up_to_a_day")]
    pub timeout: Duration,
    /// At most this many handlers run at once; further runs wait in a queue.
    #[serde(deserialize_with = "whole_number::at_least_one")]
    pub max_running: std::num::NonZeroUsize,
    /// At most this many runs wait for a free slot; a run beyond it fails at once.
    #[serde(deserialize_with = "whole_number::any")]
    pub max_queued: usize,
    /// Started by socket activation, the service exits after this long without runs; the next
    /// message starts it again.
    #[serde(with = "duration_text::up_to_a_day")]
    pub idle_exit: Duration,
}

impl Default for HandlersConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            max_running: std::num::NonZeroUsize::new(16).unwrap_or(std::num::NonZeroUsize::MIN),
            max_queued: 256,
            idle_exit: Duration::from_secs(300),
        }
    }
}

/// Counts, with errors that say what to write rather than serde's "expected a nonzero usize".
mod whole_number {
    use std::num::NonZeroUsize;

    use serde::Deserializer;

    struct WholeNumber {
        min: usize,
    }

    impl WholeNumber {
        fn wanted(&self) -> String {
            format!("a whole number of at least {}", self.min)
        }
    }

    impl serde::de::Visitor<'_> for WholeNumber {
        type Value = usize;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(&self.wanted())
        }

        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<usize, E> {
            match usize::try_from(n) {
                Ok(n) => self.visit_u64(n as u64),
                Err(_) => Err(E::custom(format!("{n} is not {}", self.wanted()))),
            }
        }

        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<usize, E> {
            match usize::try_from(n) {
                Ok(n) if n >= self.min => Ok(n),
                _ => Err(E::custom(format!("{n} is not {}", self.wanted()))),
            }
        }

        fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<usize, E> {
            Err(E::custom(format!("{n} is not {}", self.wanted())))
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<usize, E> {
            Err(E::custom(format!(
                "{text:?} is text; write {} without quotes",
                self.wanted()
            )))
        }
    }

    pub fn any<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        d.deserialize_any(WholeNumber { min: 0 })
    }

    pub fn at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<NonZeroUsize, D::Error> {
        let n = d.deserialize_any(WholeNumber { min: 1 })?;
        // The visitor refused 0.
        NonZeroUsize::new(n).ok_or_else(|| serde::de::Error::custom("0 is not allowed"))
    }
}

/// Durations as people write them: "20s", "1m 30s", "500ms". Each key names the module of its
/// range; a value outside it is an error that says the range.
mod duration_text {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    /// Shorter intervals would keep devices awake for nothing; they only make sense in tests.
    const MIN: Duration = Duration::from_millis(100);

    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*value))
    }

    fn deserialize_within<'de, D: Deserializer<'de>>(
        d: D,
        max: Duration,
    ) -> Result<Duration, D::Error> {
        let text = d.deserialize_any(DurationText)?;
        // humantime's own words ("expected number at 0") help no one reading a config file.
        let value = humantime::parse_duration(&text).map_err(|_| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration; write it like \"20s\" or \"1m 30s\""
            ))
        })?;
        let range = || {
            format!(
                "it must be between {} and {}",
                humantime::format_duration(MIN),
                humantime::format_duration(max)
            )
        };
        if value < MIN {
            return Err(serde::de::Error::custom(format!(
                "{text:?} is too short; {}",
                range()
            )));
        }
        if value > max {
            return Err(serde::de::Error::custom(format!(
                "{text:?} is too long; {}",
                range()
            )));
        }
        Ok(value)
    }

    /// A duration's text; a bare number is refused with the form to write instead, since its
    /// unit would be a guess.
    struct DurationText;

    impl serde::de::Visitor<'_> for DurationText {
        type Value = String;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a duration string with its unit, like \"20s\" or \"1m 30s\"")
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<String, E> {
            Ok(text.to_owned())
        }

        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<String, E> {
            Err(E::custom(format!(
                "{n} has no unit; write the duration as a string with its unit, like \"{}s\" or \"1m 30s\"",
                n.max(1)
            )))
        }

        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<String, E> {
            self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
        }

        fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<String, E> {
            Err(E::custom(format!(
                "{n} has no unit; write the duration as a string with its unit, like \"20s\" or \"1m 30s\""
            )))
        }
    }

    /// Keepalive: a session silent for longer is dead to anyone (NAT and firewall mappings are
    /// long gone), and a dead link must be noticed within the hour.
    pub mod up_to_an_hour {
        pub use super::serialize;

        pub fn deserialize<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> Result<std::time::Duration, D::Error> {
            super::deserialize_within(d, crate::config::MAX_KEEPALIVE_INTERVAL)
        }
    }

    /// The handler service's time-out and idle exit: work that takes longer belongs in the
    /// background, and an exit after more than a day is no exit.
    pub mod up_to_a_day {
        pub use super::serialize;

        pub fn deserialize<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> Result<std::time::Duration, D::Error> {
            super::deserialize_within(d, std::time::Duration::from_secs(24 * 3600))
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// Advertise this device and look for members on the local network (mDNS-SD).
    pub enabled: bool,
    /// The network interfaces mDNS runs on; empty: every interface but loopback. Always within
    /// `[mesh] interfaces`, when that is set.
    pub interfaces: Vec<InterfaceName>,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interfaces: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PathsConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handlers_dir: Option<PathBuf>,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {error}")]
    Read { path: PathBuf, error: io::Error },
    #[error(
        "configuration file {path} does not exist ({CONFIG_ENV} names it); create it or unset {CONFIG_ENV}"
    )]
    Missing { path: PathBuf },
    #[error("{path}:{line}:{column}: {message}{}", hint.as_ref().map(|h| format!("\n  hint: {h}")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        /// The key the mistake is at, with its section (`mesh.listen`), where it can be told.
        key: Option<String>,
        message: String,
        hint: Option<String>,
    },
    #[error(
        "{path}:{line}: {key} must be an absolute path (or start with ~/), but it is {value:?}"
    )]
    RelativePath {
        path: PathBuf,
        line: usize,
        key: &'static str,
        value: PathBuf,
    },
}

/// Where the configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSource {
    pub path: PathBuf,
    /// False when the file does not exist and the built-in defaults apply.
    pub exists: bool,
}

impl Config {
    /// Loads the file at `path`. A missing file means "all defaults", unless the user named it
    /// explicitly (`explicit`), in which case a typo in the path must not go unnoticed.
    pub fn load(path: &Path, explicit: bool) -> Result<(Self, ConfigSource), ConfigError> {
        match fs::read_to_string(path) {
            Ok(text) => {
                let config = Self::parse(&text, path)?;
                Ok((
                    config,
                    ConfigSource {
                        path: path.to_owned(),
                        exists: true,
                    },
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && !explicit => Ok((
                Self::default(),
                ConfigSource {
                    path: path.to_owned(),
                    exists: false,
                },
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ConfigError::Missing {
                path: path.to_owned(),
            }),
            Err(error) => Err(ConfigError::Read {
                path: path.to_owned(),
                error,
            }),
        }
    }

    /// Parses configuration text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| describe_toml_error(text, path, &e))?;
        for (key, value) in [
            ("paths.state_dir", &config.paths.state_dir),
            ("paths.runtime_dir", &config.paths.runtime_dir),
            ("paths.handlers_dir", &config.paths.handlers_dir),
        ] {
            if let Some(value) = value
                && !(value.is_absolute() || value.starts_with("~"))
            {
                let bare = key.rsplit('.').next().unwrap_or(key);
                return Err(ConfigError::RelativePath {
                    path: path.to_owned(),
                    line: line_of_key(text, bare),
                    key,
                    value: value.clone(),
                });
            }
        }
        Ok(config)
    }

    /// The `[paths]` section alone of a file that does not parse as a whole, with defaults for
    /// the rest, if that section itself is readable: a typo elsewhere must not send a client
    /// command, or the doctor, to the wrong directories.
    pub fn paths_section(text: &str) -> Option<Config> {
        let table: toml::Table = toml::from_str(text).ok()?;
        let config = match table.get("paths") {
            Some(paths) => Config {
                paths: paths.clone().try_into().ok()?,
                ..Config::default()
            },
            None => Config::default(),
        };
        let usable = |p: &Option<PathBuf>| {
            p.as_ref()
                .is_none_or(|p| p.is_absolute() || p.starts_with("~"))
        };
        (usable(&config.paths.state_dir)
            && usable(&config.paths.runtime_dir)
            && usable(&config.paths.handlers_dir))
        .then_some(config)
    }

    /// The directories this configuration selects, with XDG defaults for those it leaves out.
    pub fn paths(&self, xdg: &XdgDirs, config_file: PathBuf) -> Paths {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let pick = |configured: &Option<PathBuf>, default: PathBuf| {
            configured
                .as_deref()
                .map(|p| expand_home(p, home.as_deref()))
                .unwrap_or(default)
        };
        Paths {
            config_file,
            state_dir: pick(&self.paths.state_dir, xdg.default_state_dir()),
            runtime_dir: pick(&self.paths.runtime_dir, xdg.default_runtime_dir()),
            handlers_dir: pick(&self.paths.handlers_dir, xdg.default_handlers_dir()),
        }
    }
}

/// Turns a TOML or serde error into one that names the line, the key and a likely fix.
fn describe_toml_error(text: &str, path: &Path, err: &toml::de::Error) -> ConfigError {
    let offset = err.span().map(|s| s.start).unwrap_or(0).min(text.len());
    let (line, column) = line_and_column(text, offset);
    let section = section_at(text, offset);
    let message = err.message().trim().to_owned();

    let (key, hint) = match unknown_field(&message) {
        Some(unknown) => {
            let qualified = qualify(&section, unknown);
            (Some(qualified), suggest_key(&section, unknown))
        }
        None => {
            let key = key_on_line(text, offset).map(|k| qualify(&section, &k));
            (key, None)
        }
    };
    let message = match (&key, unknown_field(&message)) {
        (Some(key), Some(_)) => format!("unknown key `{key}`"),
        (Some(key), None) => format!("bad value for `{key}`: {message}"),
        (None, _) => message,
    };
    ConfigError::Invalid {
        path: path.to_owned(),
        line,
        column,
        key,
        message,
        hint,
    }
}

fn qualify(section: &str, key: &str) -> String {
    if section.is_empty() {
        key.to_owned()
    } else {
        format!("{section}.{key}")
    }
}

/// The 1-based line where `key` is set (1 if it cannot be found).
fn line_of_key(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map_or(1, |i| i + 1)
}

/// 1-based line and column of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (line, before[line_start..].chars().count() + 1)
}

/// The `[section]` that the byte at `offset` belongs to ("" for the top level).
fn section_at(text: &str, offset: usize) -> String {
    text[..offset]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && !l.starts_with("[["))
        .and_then(|l| l.strip_prefix('['))
        .and_then(|l| l.split(']').next())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The key written on the line that holds `offset`, for errors that point at a value.
fn key_on_line(text: &str, offset: usize) -> Option<String> {
    let line_start = text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = text[line_start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    (!key.is_empty()).then(|| key.to_owned())
}

/// serde's message for `deny_unknown_fields` is "unknown field `x`, expected ...".
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

/// The nearest valid key in the same section, or the section where an existing key belongs.
fn suggest_key(section: &str, unknown: &str) -> Option<String> {
    let keys = SCHEMA
        .iter()
        .find(|(s, _)| *s == section)
        .map(|(_, k)| *k)?;
    let nearest =
        crate::suggest::closest(unknown, keys.iter().copied(), |key| (key.len() / 3).max(2));
    if let Some(key) = nearest {
        return Some(format!("did you mean `{key}`?"));
    }
    let home = SCHEMA
        .iter()
        .find(|(s, keys)| *s != section && keys.contains(&unknown))
        .map(|(s, _)| *s)?;
    Some(if home.is_empty() {
        format!("`{unknown}` belongs at the top of the file, before any [section]")
    } else {
        format!("`{unknown}` belongs in the [{home}] section")
    })
}

/// A fully commented configuration file showing every key with its default.
pub const EXAMPLE: &str = r#"# cnsprcy configuration: $XDG_CONFIG_HOME/cnsprcy/config.toml (or the file CNSPRCY_CONFIG names).
# Every key is optional; the values shown are the defaults. Uncomment a line to change it.
# `cnspr config show` prints the configuration in effect; docs/configuration.md explains each key.

# This device's name as other devices show it: letters, digits, '-', '_' and '.', at most 63
# characters. Default: the name given to `cnspr manage init --name`, else the hostname.
# name = "laptop"

[mesh]
# Addresses (ip:port) the mesh accepts encrypted sessions from other devices on; one without a
# port means 7332. IPv6 addresses with a port go in brackets ("[fd00::5]:7333"). The default
# listens on port 7332 on every IPv4 and IPv6 address.
# listen = ["0.0.0.0:7332", "[::]:7332"]

# The network interfaces (as `ip link` names them) the mesh dials members over and accepts
# sessions on, to keep it off a VPN or a tethered phone, say: ["wlan0", "enp3s0"]. Empty: every
# interface, loopback included. A named interface that does not exist yet (a USB tether) is used
# once it appears; lo (loopback: other devices on this machine) only when named.
# interfaces = []

# Every heartbeat_interval this device sends a heartbeat to one member, which watches it. When
# a heartbeat is overdue, the watcher asks every member to probe the device; whoever gets no
# answer within a second or so (more on a slow link) closes its session with it. A device whose
# link dies silently (cable pulled, packets dropped) is so noticed by all in about two to four
# seconds, at a cost that does not grow with the mesh. Shorter values notice sooner but cost
# more bytes and wake-ups.
# heartbeat_interval = "2s"

# Besides, a session that has received nothing for keepalive_interval sends an encrypted ping
# (which also measures the round-trip time); one that then receives nothing for
# keepalive_timeout more is declared dead and redialled. Each of these three is between 100ms
# and 1h.
# keepalive_interval = "60s"
# keepalive_timeout = "10s"

[discovery]
# Advertise this device on the local network with mDNS-SD (service _cnsprcy._tcp) under a name
# that changes every hour and that only members recognise, and find members there without any
# configured address. Strangers' advertisements are ignored. While `cnspr manage join` runs
# without a code, the device also advertises _cnsprcy-join._tcp with its name and public key;
# while `cnspr manage induct` runs, it looks for those.
# enabled = true

# The network interfaces mDNS advertises and browses on. Empty: every interface that is up,
# except loopback (lo only when named). Never beyond [mesh] interfaces, when that is set.
# interfaces = []

[handlers]
# A handler (see docs/event_handlers.md) still running after timeout is sent SIGTERM with its
# whole process group, and SIGKILL shortly after; the sender learns it timed out. Between
# 100ms and 24h: longer work belongs in the background.
# timeout = "30s"

# At most max_running handlers run at once. Runs of one tag from one sender always run one
# after the other, in the order they came; other tags run alongside.
# max_running = 16

# Runs waiting for a free slot, over all tags. A run that finds the queue full is not run, and
# its sender is told so.
# max_queued = 256

# Started by systemd socket activation, the handler service exits after this long without
# running anything; the next message starts it again. (Under `cnspr serve` it stays.) Between
# 100ms and 24h.
# idle_exit = "5m"

[paths]
# Where the identity key and the replicated state live. Default: $XDG_DATA_HOME/cnsprcy
# (~/.local/share/cnsprcy). Paths may start with ~/.
# state_dir = "~/.local/share/cnsprcy"

# Where the sockets live. Default: $XDG_RUNTIME_DIR/cnsprcy, or $TMPDIR/cnsprcy-UID where
# XDG_RUNTIME_DIR is not set.
# runtime_dir = "/run/user/1000/cnsprcy"

# The handler scripts' directory. Default: $XDG_CONFIG_HOME/cnsprcy/handlers.
# handlers_dir = "~/.config/cnsprcy/handlers"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/test.toml"))
    }

    #[test]
    fn the_paths_of_a_broken_file_are_still_used() {
        let config = Config::paths_section(
            "[mesh]\nlisen = 1\n[paths]\nstate_dir = \"/s\"\nhandlers_dir = \"~/h\"\n",
        )
        .unwrap();
        assert_eq!(config.paths.state_dir, Some(PathBuf::from("/s")));
        assert_eq!(config.mesh, MeshConfig::default());
        assert_eq!(Config::paths_section("name = 1\n"), Some(Config::default()));
        assert!(Config::paths_section("[paths]\nstate_dir = \"relative\"\n").is_none());
        assert!(Config::paths_section("[paths]\nstate_dr = \"/s\"\n").is_none());
        assert!(Config::paths_section("not toml [").is_none());
    }

    fn invalid(text: &str) -> (usize, usize, Option<String>, String, Option<String>) {
        match parse(text).unwrap_err() {
            ConfigError::Invalid {
                line,
                column,
                key,
                message,
                hint,
                ..
            } => (line, column, key, message, hint),
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.mesh.listen.len(), 2);
        assert!(config.mesh.listen.iter().all(|a| a.port() == DEFAULT_PORT));
    }

    #[test]
    fn values_are_read() {
        let config = parse(
            "name = \"desk\"\n[mesh]\nlisten = [\"127.0.0.1:9000\"]\n[paths]\nstate_dir = \"/s\"\n",
        )
        .unwrap();
        assert_eq!(config.name.unwrap().as_str(), "desk");
        assert_eq!(config.mesh.listen, vec!["127.0.0.1:9000".parse().unwrap()]);
        assert_eq!(config.paths.state_dir, Some(PathBuf::from("/s")));
    }

    #[test]
    fn interfaces_are_read_and_checked() {
        let config = parse(
            "[mesh]\ninterfaces = [\"wlan0\", \"enp3s0\"]\n[discovery]\ninterfaces = [\"wlan0\"]\n",
        )
        .unwrap();
        let names: Vec<&str> = config.mesh.interfaces.iter().map(|n| n.as_str()).collect();
        assert_eq!(names, ["wlan0", "enp3s0"]);
        assert_eq!(config.discovery.interfaces[0].as_str(), "wlan0");
        assert!(config.discovery.enabled);
        assert!(parse("").unwrap().mesh.interfaces.is_empty());

        let (line, _, key, message, _) =
            invalid("[mesh]\nlisten = []\ninterfaces = [\"wlan0\", \"my wifi\"]\n");
        assert_eq!(line, 3);
        assert_eq!(key.as_deref(), Some("mesh.interfaces"));
        assert!(
            message
                .contains("bad value for `mesh.interfaces`: \"my wifi\" is not an interface name"),
            "{message}"
        );
        let (line, _, key, message, _) =
            invalid("[discovery]\ninterfaces = [\"enx00e04c6800012\"]\n");
        assert_eq!(line, 2);
        assert_eq!(key.as_deref(), Some("discovery.interfaces"));
        assert!(message.contains("at most 15 bytes"), "{message}");
        let (_, _, _, message, _) = invalid("[mesh]\ninterfaces = [\"\"]\n");
        assert!(message.contains("cannot be empty"), "{message}");
        let (_, _, _, message, _) = invalid("[mesh]\ninterfaces = \"wlan0\"\n");
        assert!(message.contains("expected a sequence"), "{message}");
        let text = parse("[mesh]\ninterfaces = [\"a/b\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            text.starts_with("/etc/test.toml:2:") && text.contains("'/'"),
            "{text}"
        );
    }

    #[test]
    fn unknown_key_names_line_and_suggests() {
        let (line, column, key, message, hint) =
            invalid("name = \"a\"\n\n[mesh]\nlisen = [\"127.0.0.1:1\"]\n");
        assert_eq!((line, column), (4, 1));
        assert_eq!(key.as_deref(), Some("mesh.lisen"));
        assert!(message.contains("unknown key `mesh.lisen`"), "{message}");
        assert_eq!(hint.as_deref(), Some("did you mean `listen`?"));
    }

    #[test]
    fn key_in_wrong_section_is_pointed_home() {
        let (line, _, _, _, hint) = invalid("listen = [\"127.0.0.1:1\"]\n");
        assert_eq!(line, 1);
        assert_eq!(
            hint.as_deref(),
            Some("`listen` belongs in the [mesh] section")
        );
        let (_, _, key, _, hint) = invalid("[mesh]\nname = \"x\"\n");
        assert_eq!(key.as_deref(), Some("mesh.name"));
        assert!(hint.unwrap().contains("top of the file"));
    }

    #[test]
    fn bad_value_names_line_and_key() {
        let (line, _, key, message, _) = invalid("[mesh]\n\nlisten = [\"not an address\"]\n");
        assert_eq!(line, 3);
        assert_eq!(key.as_deref(), Some("mesh.listen"));
        assert!(message.contains("bad value for `mesh.listen`"), "{message}");
        let (line, _, key, message, _) = invalid("name = \"has space\"\n");
        assert_eq!(line, 1);
        assert_eq!(key.as_deref(), Some("name"));
        assert!(message.contains("letters, digits"), "{message}");
    }

    #[test]
    fn durations_are_read_and_checked() {
        let config = parse("[mesh]\nkeepalive_interval = \"1m 30s\"\n").unwrap();
        assert_eq!(config.mesh.keepalive_interval, Duration::from_secs(90));
        let (line, _, key, message, _) = invalid("[mesh]\nkeepalive_timeout = \"soon\"\n");
        assert_eq!(line, 2);
        assert_eq!(key.as_deref(), Some("mesh.keepalive_timeout"));
        assert!(message.contains("is not a duration"), "{message}");
        let (_, _, _, message, _) = invalid("[mesh]\nkeepalive_timeout = \"1ms\"\n");
        assert!(
            message.contains("too short; it must be between 100ms and 1h"),
            "{message}"
        );
        let (line, _, key, message, _) =
            invalid("[mesh]\nlisten = []\nkeepalive_interval = \"2h\"\n");
        assert_eq!(line, 3);
        assert_eq!(key.as_deref(), Some("mesh.keepalive_interval"));
        assert!(
            message.contains("\"2h\" is too long; it must be between 100ms and 1h"),
            "{message}"
        );
        assert!(parse("[mesh]\nkeepalive_timeout = \"1h\"\n").is_ok());
    }

    /// A time-out of a thousand years is no time-out: it would overflow deadlines, and means
    /// "never", which the key does not offer.
    #[test]
    fn handler_durations_are_bounded() {
        let path = Path::new("/home/me/.config/cnsprcy/config.toml");
        let error = Config::parse("[handlers]\ntimeout = \"1000y\"\n", path).unwrap_err();
        assert_eq!(
            error.to_string(),
            "/home/me/.config/cnsprcy/config.toml:2:11: bad value for `handlers.timeout`: \"1000y\" is too long; it must be between 100ms and 1day"
        );
        let (line, _, key, message, _) =
            invalid("[handlers]\nmax_running = 2\nidle_exit = \"25h\"\n");
        assert_eq!(line, 3);
        assert_eq!(key.as_deref(), Some("handlers.idle_exit"));
        assert!(message.contains("too long"), "{message}");
        let config = parse("[handlers]\ntimeout = \"24h\"\nidle_exit = \"1day\"\n").unwrap();
        assert_eq!(config.handlers.timeout, Duration::from_secs(86400));
    }

    #[test]
    fn handler_settings_are_read_and_checked() {
        let config =
            parse("[handlers]\ntimeout = \"2s\"\nmax_running = 2\nmax_queued = 0\n").unwrap();
        assert_eq!(config.handlers.timeout, Duration::from_secs(2));
        assert_eq!(config.handlers.max_running.get(), 2);
        assert_eq!(config.handlers.max_queued, 0);
        let (line, _, key, _, _) = invalid("[handlers]\n\nmax_running = 0\n");
        assert_eq!(line, 3);
        assert_eq!(key.as_deref(), Some("handlers.max_running"));
        let (_, _, key, _, hint) = invalid("[handlers]\ntimout = \"1s\"\n");
        assert_eq!(key.as_deref(), Some("handlers.timout"));
        assert_eq!(hint.as_deref(), Some("did you mean `timeout`?"));
    }

    #[test]
    fn a_number_without_a_unit_says_how_to_write_a_duration() {
        let (line, _, key, message, _) = invalid("[mesh]\nkeepalive_interval = 20\n");
        assert_eq!(line, 2);
        assert_eq!(key.as_deref(), Some("mesh.keepalive_interval"));
        assert!(
            message.contains(
                "20 has no unit; write the duration as a string with its unit, like \"20s\""
            ),
            "{message}"
        );
        let (_, _, _, message, _) = invalid("[handlers]\ntimeout = 1.5\n");
        assert!(message.contains("1.5 has no unit"), "{message}");
        let (_, _, _, message, _) = invalid("[handlers]\ntimeout = true\n");
        assert!(
            message.contains("a duration string with its unit"),
            "{message}"
        );
    }

    #[test]
    fn counts_say_what_number_is_wanted() {
        for (text, wanted) in [
            ("max_running = -1", "-1 is not a whole number of at least 1"),
            ("max_running = 0", "0 is not a whole number of at least 1"),
            (
                "max_running = 2.5",
                "2.5 is not a whole number of at least 1",
            ),
            (
                "max_running = \"4\"",
                "\"4\" is text; write a whole number of at least 1 without quotes",
            ),
            ("max_queued = -1", "-1 is not a whole number of at least 0"),
        ] {
            let (line, _, key, message, _) = invalid(&format!("[handlers]\n{text}\n"));
            assert_eq!(line, 2, "{text}");
            assert!(
                key.is_some_and(|k| k.starts_with("handlers.max_")),
                "{text}"
            );
            assert!(message.contains(wanted), "{text}: {message}");
        }
        let config = parse("[handlers]\nmax_running = 1\nmax_queued = 0\n").unwrap();
        assert_eq!(config.handlers.max_running.get(), 1);
    }

    #[test]
    fn syntax_error_has_a_line() {
        let (line, ..) = invalid("name = \"a\"\n[mesh\n");
        assert_eq!(line, 2);
    }

    #[test]
    fn relative_paths_are_refused() {
        let err = parse("[paths]\nstate_dir = \"relative\"\n").unwrap_err();
        assert!(err.to_string().contains("paths.state_dir"), "{err}");
        assert!(err.to_string().starts_with("/etc/test.toml:2: "), "{err}");
        parse("[paths]\nstate_dir = \"~/s\"\n").unwrap();
    }

    #[test]
    fn error_display_has_file_line_and_hint() {
        let text = parse("[mesh]\nlisen = []\n").unwrap_err().to_string();
        assert!(
            text.starts_with("/etc/test.toml:2:1: unknown key"),
            "{text}"
        );
        assert!(text.contains("hint: did you mean `listen`?"), "{text}");
    }

    /// The example documents every key: uncommented, it parses, and it names every key of SCHEMA.
    #[test]
    fn example_covers_schema_and_parses() {
        assert_eq!(parse(EXAMPLE).unwrap(), Config::default());
        let uncommented: String = EXAMPLE
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if rest.contains(" = ") => rest,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let config = parse(&uncommented).unwrap();
        assert_eq!(config.mesh, MeshConfig::default());
        assert_eq!(config.handlers, HandlersConfig::default());
        for (section, keys) in SCHEMA {
            for key in *keys {
                let written = if section.is_empty() {
                    uncommented.contains(&format!("\n{key} = "))
                        || uncommented.contains(&format!("[{key}]"))
                } else {
                    uncommented.contains(&format!("[{section}]"))
                        && uncommented.contains(&format!("\n{key} = "))
                };
                assert!(written, "example does not show {section}.{key}");
            }
        }
    }

    #[test]
    fn missing_file_is_defaults_unless_named_explicitly() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("none.toml");
        let (config, source) = Config::load(&path, false).unwrap();
        assert_eq!(config, Config::default());
        assert!(!source.exists);
        let err = Config::load(&path, true).unwrap_err();
        assert!(err.to_string().contains(CONFIG_ENV), "{err}");
    }
}
