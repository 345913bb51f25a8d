//! The command line, as clap reads it. Man pages and shell completions are generated from it.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use clap_complete::Shell;
use cnsprcy::identity::DeviceName;

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
each service, as the running daemon reports them. Exits with status 3 (and says how to start it) \
when the daemon is not running."
    )]
    Status {
        /// Print JSON (the `status` API method's result) instead of text
        #[arg(long)]
        json: bool,
    },

    /// Show the configuration and the files it comes from
    #[command(subcommand)]
    Config(ConfigCommand),

    /// Manage this device's identity
    #[command(subcommand)]
    Manage(ManageCommand),

    /// Print a shell completion script
    #[command(
        long_about = "Print a completion script for SHELL on stdout. For bash: \
`cnspr completions bash > ~/.local/share/bash-completion/completions/cnspr`."
    )]
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },

    /// Write man pages for cnspr and its subcommands into DIR (for packaging)
    #[command(hide = true)]
    Manpages { dir: PathBuf },
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
    /// Print this device's name, ID and public key
    Id {
        /// Print {"name","id","public_key"} as JSON
        #[arg(long)]
        json: bool,
    },
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
    fn bad_names_are_usage_errors() {
        let err = Cli::try_parse_from(["cnspr", "manage", "init", "--name", "a b"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
    }
}
