//! The command line, as clap reads it. Man pages and shell completions are generated from it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use clap_complete::Shell;
use cnsprcy::identity::{DeviceName, PublicKey};

use crate::handlers_cmd::HandlersCommand;

#[derive(Debug, Parser)]
#[command(
    name = "cnspr",
    version,
    about = "Link your Linux devices into one small encrypted mesh",
    long_about = "cnsprcy links one person's Linux devices (desktop, laptop, phone) into a small, \
encrypted, fully decentralised mesh. `cnspr serve` runs the daemon; the other commands talk to it \
over its socket ($XDG_RUNTIME_DIR/cnsprcy/cnsprcy.sock) or read this device's files.",
    after_help = "Documentation: docs/ in the source tree, or /usr/share/doc/cnsprcy.\n\
Exit status: 0 on success, 1 on error, 2 on a usage error, 3 when the daemon is not running."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (all four services) in this process, in the foreground
    #[command(
        long_about = "Run the daemon: the mesh, netwatch, discovery and handler services, \
in this one process, in the foreground, talking over the same internal sockets as when systemd \
runs them as separate units. Creates this device's identity on first start. Stops cleanly on \
SIGINT (Ctrl-C) or SIGTERM. Only one daemon runs per user: a second `cnspr serve` is refused. \
RUST_LOG sets the log filter (default: info)."
    )]
    Serve,

    /// Show this device and the state of each service
    #[command(
        long_about = "Show this device's name, ID and listen addresses, and the state of \
each service, as the running daemon reports them, and the devices that are not members and tried \
to start a session lately (knocked), with the command that adds one. Exits with status 3 (and \
says how to start it) when the daemon is not running."
    )]
    Status {
        /// Print JSON (the `status` API method's result) instead of text
        #[arg(long)]
        json: bool,
    },

    /// List the members and where each stands: direct, relayed, unreachable
    #[command(
        visible_alias = "members",
        long_about = "List every member of this device's roster with its status \
(direct: an encrypted session is up; relayed: reachable through another member; unreachable), \
round-trip latency, address (or the relaying member) and when it was last reachable; under the \
table, why each member that is not direct is not (it has not added this device or has another \
key for it, no address is known, [mesh] interfaces, dial errors). The ID column shows the \
shortest start of each device ID that names that member alone; other commands take it in place \
of the name. `cnspr members` is the same command, for serf users."
    )]
    Peers {
        /// Show only this member (a name, a device ID or the start of one)
        #[arg(add = member_names())]
        name: Option<String>,
        /// Print JSON (an array of peer objects; one object with NAME) instead of a table
        #[arg(long)]
        json: bool,
    },

    /// Measure round trips to a member over the mesh
    #[command(
        long_about = "Send encrypted pings to the member NAME (a name or device ID) \
over its session, or through the member that relays to it, and print each round-trip time and \
the path taken, then a summary as ping(8) prints it: rounds sent and lost, and the minimum, \
average and maximum round trip. A round without a pong (the member is unreachable, or no pong \
came in time) is counted as lost and the next round follows; a NAME that is no member fails at \
once. Ctrl-C ends the rounds early, still with the summary. Exits with status 1 if no pong came \
back."
    )]
    Ping {
        /// Member name, device ID, or the start of an ID as `cnspr peers` shows it
        #[arg(add = member_names())]
        name: String,
        /// How many pings to send, one per second
        #[arg(short = 'c', long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
        count: u32,
        /// How long to wait for each pong (at most 60s)
        #[arg(long, default_value = "5s", value_parser = crate::args::ping_timeout)]
        timeout: std::time::Duration,
        /// Print JSON: {"rounds": [ping result or {"error": ...}, ...], "summary": {...}}
        #[arg(long)]
        json: bool,
    },

    /// Send a tagged message to other devices, whose handlers run with it
    #[command(
        long_about = "Send a message with TAG to the members named with --to (or to every \
member: --all, the default). On each, the handler for TAG runs with PAYLOAD on its standard input \
(`-` reads the payload from standard input, binary-safe, up to 16 MiB). A member that is \
unreachable now gets the message when it comes back, until --ttl runs out. Without --wait, \
returns once the local daemon has stored the message; with --wait, waits for every recipient's \
handler and prints each reply (its standard output), and the exit status says whether all \
handlers succeeded. Messages from one device with one tag run on each recipient one at a \
time, in the order they were sent, also when some waited in a queue. `cnspr messages` shows what \
is still queued and what became of recent messages."
    )]
    Send {
        /// The message's tag, which picks the handler (e.g. clipboard/set)
        #[arg(value_parser = crate::args::tag)]
        tag: String,
        /// The payload; `-` reads it from standard input. Default: empty
        payload: Option<String>,
        /// Send to this member (name, device ID, or the start of an ID as `cnspr peers` shows
        /// it); repeat for several
        #[arg(long = "to", value_name = "NAME", add = member_names())]
        to: Vec<String>,
        /// Send to every member (the default without --to)
        #[arg(long, conflicts_with = "to")]
        all: bool,
        /// With --all: run this device's own handler too (to send only to this device, use
        /// --to with its own name)
        #[arg(long, conflicts_with = "to")]
        include_self: bool,
        /// Wait for every recipient's handler and print the replies
        #[arg(long)]
        wait: bool,
        /// How long --wait waits (at most 1h)
        #[arg(long, default_value = "10s", value_parser = crate::args::wait_timeout)]
        timeout: std::time::Duration,
        /// How long the message waits for members that are unreachable (100ms to 30days)
        #[arg(long, default_value = "1h", value_parser = crate::args::ttl)]
        ttl: std::time::Duration,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },

    /// Show messages and peer events as they happen
    #[command(
        long_about = "Stream what the daemon sees: messages handled on this device, \
messages sent from it, and peers changing status, one line each, until interrupted. With \
--json, one JSON object per line (the `subscribe` API's event objects)."
    )]
    Watch {
        /// One JSON object per line
        #[arg(long)]
        json: bool,
    },

    /// Show the messages still queued here and what became of recent ones
    #[command(
        long_about = "List the messages this device sent that some target has not acknowledged \
yet (the outbox: tag, size, when they expire, whom they wait for), then the messages from other \
devices whose handler has not finished here (waiting for their turn, running, or waiting for the \
handler service), then the most recent outcomes of messages (delivered to a device, handled there \
with a status, expired before reaching a device; up to 200, oldest first). A handler's output that came back after `send --wait` stopped \
waiting is kept here too (--json shows it)."
    )]
    Messages {
        /// Print the outbox and outcomes as JSON (the `messages` API method's result)
        #[arg(long)]
        json: bool,
    },

    /// Read and write the replicated key-value store shared by all devices
    #[command(subcommand)]
    Db(DbCommand),

    /// Dial every unreachable member now, forgetting their backoff
    #[command(
        long_about = "Dial every member without a session right away, as if the \
network had just changed (for example after resuming from suspend). Normally not needed: the \
daemon redials by itself with a capped exponential backoff. Names the members that cannot be \
dialled because no address is known for them (discovery has not seen them on the LAN, and none \
was given or learned)."
    )]
    Reconnect {
        /// Print the result as JSON (the `retry` method's result)
        #[arg(long)]
        json: bool,
    },

    /// Show the configuration and the files it comes from
    #[command(subcommand)]
    Config(ConfigCommand),

    /// Inspect the handler scripts that run for tagged messages and events
    #[command(subcommand)]
    Handlers(HandlersCommand),

    /// Manage this device's identity and its members
    #[command(subcommand)]
    Manage(ManageCommand),

    /// Check this device's setup and say what to do about each thing that is wrong
    #[command(
        long_about = "Check, on one screen, everything this device needs: the daemon \
(does it answer on its socket, are its services connected), the configuration file (read \
directly, so a mistake in it is shown with its line even when nothing else starts), the identity \
key (present, yours, mode 0600), the handler directory (the same checks as `cnspr handlers \
check`), the [mesh] and [discovery] interfaces settings against the interfaces this device has, \
and each member: direct, or why not. Each line has a verdict, ok, warning or problem, and what to \
do. Works without the daemon (it says so, and checks the files). Exits with status 1 when there \
is a problem, 0 otherwise (warnings included)."
    )]
    Doctor {
        /// Print a JSON array with one object per check: {"check", "subject", "verdict", "message", "fix"}
        #[arg(long)]
        json: bool,
    },

    /// Print a shell completion script
    #[command(
        long_about = "Print a completion script for SHELL on stdout. For bash: \
`cnspr completions bash > ~/.local/share/bash-completion/completions/cnspr`. The script asks \
`cnspr` (found on PATH) what to offer, so member names complete after --to, ping, peers and \
manage remove; the packages install these scripts."
    )]
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },

    /// Write man pages for cnspr, its subcommands and the service binaries into DIR (for packaging)
    #[command(hide = true)]
    Manpages { dir: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Set KEY to VALUE on this device; every member gets it
    #[command(
        long_about = "Set KEY to VALUE (`-` reads it from standard input, binary-safe). Returns \
once the write is on this device's disk; the daemon pushes it to every member at once, and \
members out of reach get it when they come back. A key is UTF-8 text of at most 1024 bytes \
without control characters; a value is at most 1 MiB. The latest write wins (by hybrid logical \
clock), ties going to the device with the greater ID. Needs the daemon."
    )]
    Set {
        key: String,
        /// The value; `-` reads it from standard input
        value: String,
        /// Print the stored entry as JSON
        #[arg(long)]
        json: bool,
    },
    /// Print KEY's value; exit status 1 if it is not set
    #[command(
        long_about = "Print the value of KEY exactly as stored (a newline is added only on a \
terminal). Exits with status 1 and a message on standard error when KEY is not set. Works \
without the daemon too, reading this device's copy of the store."
    )]
    Get {
        key: String,
        /// Print the entry as JSON: value, writer and time
        #[arg(long)]
        json: bool,
    },
    /// List the keys (starting with PREFIX) and their values
    #[command(
        long_about = "Print one line per key starting with PREFIX (all keys without one): \
the key, a tab, the value, with tabs, newlines and backslashes escaped as \\t, \\n and \\\\, \
and other control characters as \\0, \\u{1b}, ...; a binary value shows as its size. --json \
prints an array of entries with writer and time. Prints page by page, so any number of keys \
works. Works without the daemon too."
    )]
    List {
        prefix: Option<String>,
        /// Print a JSON array of entries (key, value, value_base64, writer, time, ...)
        #[arg(long)]
        json: bool,
    },
    /// Show the store's live keys, tombstones and replication traffic since the daemon started
    Stats {
        /// Print JSON (the `db.stats` API method's result)
        #[arg(long)]
        json: bool,
    },
    /// Delete KEY on every device
    #[command(
        long_about = "Delete KEY: a deletion is a write like any other (a tombstone), so the \
latest of a deletion and a set wins on every device. Returns once durable. A KEY that is not set \
on this device is an error (exit status 1), and nothing is written. Needs the daemon."
    )]
    Del {
        key: String,
        /// Print the deletion as JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the configuration in effect, defaults filled in
    Show {
        /// Print JSON instead of TOML
        #[arg(long)]
        json: bool,
    },
    /// Print the configuration file and the directories in use
    Path {
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Print a fully commented example configuration file
    Example,
}

#[derive(Debug, Subcommand)]
pub enum ManageCommand {
    /// Create this device's identity (its key pair)
    #[command(
        long_about = "Create this device's X25519 key pair in the state directory \
($XDG_DATA_HOME/cnsprcy/identity.key, mode 0600). Refuses to replace an existing identity unless \
--force is given, and never while the daemon runs. `cnspr serve` creates an identity by itself on \
first start; use this to choose the name first, or to start over."
    )]
    Init {
        /// The device's name (letters, digits, '-', '_', '.'); default: the hostname.
        /// The config file's `name` key, where set, takes precedence.
        #[arg(long)]
        name: Option<DeviceName>,
        /// Replace an existing identity: other devices will no longer recognise this one
        #[arg(long)]
        force: bool,
        /// Print the new identity as JSON
        #[arg(long)]
        json: bool,
    },
    /// Add a member by its key, on every member (for scripts; see `invite`)
    #[command(
        long_about = "Add the device NAME with PUBLIC_KEY (as `cnspr manage id` prints \
it on that device) to the mesh's roster, with the addresses it may be reached at, if known \
(ip:port; an address without a port means port 7332, the default). It takes effect at once on \
every member: the roster is shared. A device that is in no mesh yet must also add one member the \
same way, so that it accepts that member; it then learns the rest of the roster. For a new \
device `cnspr manage invite` and `join` do all this without copying keys. On a device that is a \
member already (same name and key), `add` only gives its addresses."
    )]
    Add {
        /// The member's name on this device
        name: DeviceName,
        /// The member's public key (44 characters of base64)
        public_key: PublicKey,
        /// Addresses where the member listens: ip:port, or an IP address alone for port 7332
        /// (192.168.1.20, 192.168.1.20:7333, fd00::5, [fd00::5]:7333)
        #[arg(value_name = "ADDRESS", value_parser = cnsprcy::address::parse)]
        addresses: Vec<SocketAddr>,
        /// Print the new member as JSON
        #[arg(long)]
        json: bool,
    },
    /// Remove a member (the same as `disable`; kept for scripts)
    Remove {
        /// Member name, device ID, or the start of an ID as `cnspr peers` shows it
        #[arg(add = member_names())]
        name: String,
        /// Print the removed member as JSON
        #[arg(long)]
        json: bool,
    },
    /// List every device of the roster: members, this device, disabled and revoked ones
    #[command(
        long_about = "List every device the roster holds, as this device sees it: this \
device, the members, and disabled and revoked devices, with when each last changed and by which \
device. The roster is the same on every member once changes have spread; compare to check that \
a revocation reached a device."
    )]
    List {
        /// Print an array of {"name","id","public_key","state","this_device","changed","by"}
        #[arg(long)]
        json: bool,
    },
    /// Make a one-time invitation code for a new device (on a member)
    #[command(
        long_about = "Make a one-time invitation code for a new device, and show it \
as text and as a QR code. On the new device, `cnspr manage join CODE` makes it a member of this \
mesh: it connects to this device with the code, receives the roster and the store, and every \
member accepts it from then on. The code holds this device's public key, its addresses and a \
random secret; it works once and expires (--expires). Whoever holds it can join without \
confirmation: pass it only to a device of yours, over a channel you trust. Invitations live in \
the daemon's memory: a restart cancels them."
    )]
    Invite {
        /// How long the code is valid (15m, 1h, 2d; at most 7d)
        #[arg(long, default_value = "15m", value_parser = invitation_lifetime)]
        expires: std::time::Duration,
        /// Do not print the QR code
        #[arg(long)]
        no_qr: bool,
        /// Print {"code","expires","addresses"} as JSON
        #[arg(long)]
        json: bool,
    },
    /// Join a mesh (on the new device): with an invitation code, or by a member on this network
    #[command(
        long_about = "Join a mesh. With CODE: join the mesh of the device that made it \
with `cnspr manage invite`. This device's daemon connects to that device at the addresses in \
the code, proves the code's secret, and receives the roster (every member) and then the store; \
the members connect to it by themselves. Waits up to 30 s for the inviting device. A code is \
refused if it is mistyped (status 2), used already, expired or unknown to the inviting device \
(status 1). CODE may be given in pieces (as a line-wrapped copy splits it); case, spaces and \
dashes do not matter.

Without CODE: wait to be inducted by a member on the same local network. This device \
advertises its name and public key over mDNS until a member runs `cnspr manage induct` and \
picks it (--timeout, 10 minutes by default). Both screens then show the same 6-digit code: \
answer y only if they match, and on the member too. The code proves that no other device \
stands between the two. --expect-inductor ID accepts only that member, without asking (for \
scripts: the ID is checked by the handshake, so no code needs comparing).

Either way, a device that is a member of another mesh must `cnspr manage leave` first. Ctrl-C \
cancels, and leaves nothing half-paired."
    )]
    Join {
        /// The invitation code (CNSPR1-...); without one, wait for `cnspr manage induct`
        code: Vec<String>,
        /// Without CODE: accept only the member with this device ID, and confirm without asking
        #[arg(long, value_name = "ID", conflicts_with = "code")]
        expect_inductor: Option<String>,
        /// Without CODE: how long to wait for a member to induct this device (at most 1h)
        #[arg(long, default_value = "10m", value_parser = pair_wait, conflicts_with = "code")]
        timeout: std::time::Duration,
        /// Print {"inviter","members"} as JSON (the pairing code goes to stderr)
        #[arg(long)]
        json: bool,
    },
    /// Add a device on this network that waits in `cnspr manage join` (on a member)
    #[command(
        long_about = "Add a device on the same local network to the mesh. On the new \
device, run `cnspr manage join` (without a code) first: it advertises itself over mDNS. This \
command lists every device that does, as they appear, and asks which one to add (--timeout, 2 \
minutes by default). It then connects to the device, and both screens show the same 6-digit \
code: answer y only if they match, and on the new device too. The device becomes a member \
once both sides confirmed: it receives the roster and the store, and every member accepts it. \
--expect-id ID picks that device when it appears and confirms without asking (for scripts: the \
ID is checked by the handshake). Ctrl-C cancels, and leaves nothing half-paired."
    )]
    Induct {
        /// Add the device with this ID when it appears, without asking
        #[arg(long, value_name = "ID")]
        expect_id: Option<String>,
        /// How long to wait for the device to appear (at most 1h)
        #[arg(long, default_value = "2m", value_parser = pair_wait)]
        timeout: std::time::Duration,
        /// Print {"added":{"name","id"}} as JSON (the pairing code goes to stderr)
        #[arg(long)]
        json: bool,
    },
    /// Disable a member: every member refuses it; it is told and forgets the mesh
    #[command(
        long_about = "Disable the member NAME on every member of the mesh: the change \
spreads to all members (those offline learn it when they return), each closes its session with \
the device and refuses it from then on. If the device is reachable, it is told, and forgets the \
mesh. A disabled device can be invited or added again later. For a lost or stolen device, use \
`revoke`."
    )]
    Disable {
        /// Member name, device ID, or the start of an ID
        #[arg(add = member_names())]
        name: String,
        /// Print the disabled member as JSON
        #[arg(long)]
        json: bool,
    },
    /// Revoke a lost or stolen device: refused by every member, for good
    #[command(
        long_about = "Revoke the device NAME (lost or stolen) on every member of the \
mesh: each refuses its key from then on and sends it nothing more, and the revocation can never \
be undone for that key. Changes the device made to the roster (devices it added) that this \
device knows of are taken over and listed, so that you can check them; changes it makes later \
are void on every member that has heard of the revocation. See docs/security.md for the window \
that remains."
    )]
    Revoke {
        /// Member name, device ID, or the start of an ID (a disabled device too)
        name: String,
        /// Print {"member","kept"} as JSON
        #[arg(long)]
        json: bool,
    },
    /// This device leaves the mesh: the members are told, and it forgets them
    #[command(
        long_about = "Leave the mesh: the reachable members are told (and pass it on), \
then this device forgets its members. Refused when no member is reachable, since the others \
would keep this device as a member; --force leaves anyway (then run `cnspr manage disable` for \
this device on a member)."
    )]
    Leave {
        /// Leave even when no member is reachable to hear of it
        #[arg(long)]
        force: bool,
        /// Print {"told"} as JSON
        #[arg(long)]
        json: bool,
    },
    /// Print this device's name, ID and public key
    Id {
        /// Print {"name","id","public_key"} as JSON
        #[arg(long)]
        json: bool,
    },
}

/// `--expires` of `invite`: a duration from 1 s to 7 days.
fn invitation_lifetime(text: &str) -> Result<std::time::Duration, String> {
    let lifetime = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    let max = cnsprcy_mesh::core::MAX_INVITATION_LIFETIME;
    if lifetime < std::time::Duration::from_secs(1) || lifetime > max {
        return Err(format!(
            "an invitation is valid from 1s to {}; {text} is not in between",
            humantime::format_duration(max)
        ));
    }
    Ok(lifetime)
}

fn pair_wait(text: &str) -> Result<std::time::Duration, String> {
    let wait = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    let max = cnsprcy_mesh::MAX_PAIR_WAIT;
    if wait < std::time::Duration::from_secs(1) || wait > max {
        return Err(format!(
            "a pairing waits from 1s to {}; {text} is not in between",
            humantime::format_duration(max)
        ));
    }
    Ok(wait)
}

/// Completes member names from this device's roster (read from its file: no daemon needed).
fn member_names() -> clap_complete::engine::ArgValueCandidates {
    clap_complete::engine::ArgValueCandidates::new(|| {
        let Ok((env, _)) = cnsprcy::env::DeviceEnv::load_lenient() else {
            return Vec::new();
        };
        let Ok(entries) = cnsprcy_mesh::roster::load(&env.paths.state_dir) else {
            return Vec::new();
        };
        // The roster holds this device too; it is no member of its own.
        let own = cnsprcy::identity::Identity::load(&env.paths.state_dir)
            .ok()
            .map(|identity| identity.public_key());
        cnsprcy_mesh::roster::active(entries, own.as_ref())
            .iter()
            .map(|m| {
                clap_complete::engine::CompletionCandidate::new(m.name.as_str())
                    .help(Some(m.public_key.device_id().to_string().into()))
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_tags_and_durations_are_usage_errors() {
        for args in [
            &["cnspr", "send", "_bad", "x"][..],
            &["cnspr", "send", "notify", "--ttl", "60d"],
            &["cnspr", "send", "notify", "--ttl", "soon"],
            &["cnspr", "send", "notify", "--ttl", "5ms"],
            &["cnspr", "send", "notify", "--wait", "--timeout", "2h"],
            &["cnspr", "ping", "desk", "--timeout", "2m"],
        ] {
            let err = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{args:?}"
            );
            assert_eq!(err.exit_code(), 2);
        }
    }

    #[test]
    fn bad_names_are_usage_errors() {
        let err = Cli::try_parse_from(["cnspr", "manage", "init", "--name", "a b"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
    }
}
