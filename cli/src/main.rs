//! `cnspr`: the command-line interface of cnsprcy, `cnspr serve`, the whole daemon in one
//! process, and each service's executable when started under the service's name (`service`).

mod args;
mod cli;
mod commands;
mod db;
mod doctor;
mod handlers_cmd;
mod messages;
mod pairing;
mod peers;
mod serve;
mod service;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use crate::cli::{Cli, Command};

/// Exit status when the daemon is not running (as `systemctl status` uses 3 for "inactive").
pub const EXIT_NOT_RUNNING: u8 = 3;

fn main() -> ExitCode {
    if let Some(kind) = std::env::args_os()
        .next()
        .and_then(|a| service::named_by(&a))
    {
        return service::run(kind);
    }
    // `COMPLETE=SHELL cnspr ...`: the completion scripts ask what to offer (and exit here).
    clap_complete::CompleteEnv::with_factory(Cli::command)
        .completer("cnspr")
        .complete();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve) {
        die_quietly_on_a_closed_stdout();
    }
    let result = match cli.command {
        Command::Serve => serve::run(),
        Command::Completions { shell } => commands::completions(shell),
        Command::Manpages { dir } => commands::manpages(&dir),
        command => {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("cnspr: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(commands::run(command))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cnspr: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `cnspr peers --json | head -1`: Rust ignores SIGPIPE, so printing to a closed pipe would
/// panic; the client commands end the way other Unix tools do instead (killed by SIGPIPE,
/// quietly). Not the daemon (`serve`), which must outlive a peer or client that went away.
fn die_quietly_on_a_closed_stdout() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: called before any other thread starts; the default action has no handler code.
    if let Err(e) = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) } {
        eprintln!("cnspr: cannot restore the default SIGPIPE action: {e}");
    }
}
