//! The client commands: each reads this device's files or asks the daemon, and prints for people
//! or, with --json, for scripts.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::CommandFactory;
use cnsprcy::api::{Status, StoreState, StoreStatus};
use cnsprcy::client::{Client, ClientError};
use cnsprcy::config::EXAMPLE;
use cnsprcy::env::DeviceEnv;
use cnsprcy::identity::{self, DeviceName, Identity, IdentityError};
use cnsprcy::ipc::ServiceKind;
use cnsprcy::lock::InstanceLock;
use serde_json::{Value, json};

use crate::EXIT_NOT_RUNNING;
use crate::cli::{Cli, Command, ConfigCommand, ManageCommand};
use crate::{messages, peers};

/// How long a command waits for the daemon's answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    // The example helps fix a broken configuration, so it must not need a working one.
    if let Command::Config(ConfigCommand::Example) = command {
        print!("{EXAMPLE}");
        return Ok(ExitCode::SUCCESS);
    }
    // The doctor reads the configuration itself, so that a broken one is one of its findings.
    if let Command::Doctor { json } = command {
        return crate::doctor::run(json).await;
    }
    let env = if talks_to_the_daemon(&command) {
        let (env, problem) = DeviceEnv::load_lenient()?;
        if let Some(problem) = problem {
            eprintln!(
                "cnspr: warning: {problem}\n\
                 cnspr: going on with the socket {} (the daemon will refuse this file when it \
                 next starts; `cnspr doctor` checks the rest)",
                env.paths.public_socket().display()
            );
        }
        env
    } else {
        DeviceEnv::load()?
    };
    match command {
        Command::Status { json } => status(&env, json).await,
        Command::Peers { name, json } => peers::list(&env, name.as_deref(), json).await,
        Command::Ping {
            name,
            count,
            timeout,
            json,
        } => peers::ping(&env, &name, count, timeout, json).await,
        Command::Reconnect { json } => peers::reconnect(&env, json).await,
        Command::Send {
            tag,
            payload,
            to,
            all: _,
            include_self,
            wait,
            timeout,
            ttl,
            json,
        } => {
            let args = messages::SendArgs {
                tag,
                payload,
                to,
                include_self,
                wait,
                timeout,
                ttl,
            };
            messages::send(&env, args, json).await
        }
        Command::Watch { json } => messages::watch(&env, json).await,
        Command::Messages { json } => messages::list(&env, json).await,
        Command::Db(command) => crate::db::run(&env, command).await,
        Command::Manage(ManageCommand::Add {
            name,
            public_key,
            addresses,
            json,
        }) => peers::add(&env, name, public_key, addresses, json).await,
        Command::Manage(ManageCommand::Remove { name, json }) => {
            peers::remove(&env, &name, json).await
        }
        Command::Manage(ManageCommand::List { json }) => crate::pairing::list(&env, json).await,
        Command::Manage(ManageCommand::Invite {
            expires,
            no_qr,
            json,
        }) => crate::pairing::invite(&env, expires, !no_qr, json).await,
        Command::Manage(ManageCommand::Join {
            code,
            expect_inductor,
            timeout,
            json,
        }) => {
            if code.is_empty() {
                crate::pairing::wait_to_be_inducted(&env, expect_inductor, timeout, json).await
            } else {
                crate::pairing::join(&env, &code, json).await
            }
        }
        Command::Manage(ManageCommand::Induct {
            expect_id,
            timeout,
            json,
        }) => crate::pairing::induct(&env, expect_id, timeout, json).await,
        Command::Manage(ManageCommand::Disable { name, json }) => {
            crate::pairing::disable(&env, &name, json).await
        }
        Command::Manage(ManageCommand::Revoke { name, json }) => {
            crate::pairing::revoke(&env, &name, json).await
        }
        Command::Manage(ManageCommand::Leave { force, json }) => {
            crate::pairing::leave(&env, force, json).await
        }
        Command::Config(ConfigCommand::Show { json }) => config_show(&env, json),
        Command::Config(ConfigCommand::Path { json }) => config_path(&env, json),
        Command::Handlers(command) => crate::handlers_cmd::run(&env, command),
        Command::Manage(ManageCommand::Init { name, force, json }) => {
            manage_init(&env, name, force, json)
        }
        Command::Manage(ManageCommand::Id { json }) => manage_id(&env, json),
        Command::Serve
        | Command::Completions { .. }
        | Command::Manpages { .. }
        | Command::Doctor { .. }
        | Command::Config(ConfigCommand::Example) => {
            unreachable!("handled in main")
        }
    }
}

/// Whether `command` is a client of the running daemon, which needs from the configuration only
/// the directories (the socket's): a typo in the file must not cut it off from a daemon that
/// runs fine with the file it read at its start. The others use the configuration's settings
/// (`config`, `handlers`, `manage init` and `id` with the device name) and fail on a bad file.
fn talks_to_the_daemon(command: &Command) -> bool {
    matches!(
        command,
        Command::Status { .. }
            | Command::Peers { .. }
            | Command::Ping { .. }
            | Command::Send { .. }
            | Command::Watch { .. }
            | Command::Messages { .. }
            | Command::Db(_)
            | Command::Reconnect { .. }
            | Command::Manage(
                ManageCommand::Add { .. }
                    | ManageCommand::Remove { .. }
                    | ManageCommand::Invite { .. }
                    | ManageCommand::List { .. }
                    | ManageCommand::Join { .. }
                    | ManageCommand::Disable { .. }
                    | ManageCommand::Revoke { .. }
                    | ManageCommand::Leave { .. }
            )
    )
}

/// Columns padded to their widest cell, two spaces apart, trailing blanks cut.
pub fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Why a command that needs the daemon did not get an answer.
pub enum CallError {
    /// Not running: the caller says so (with exit status 3).
    NotRunning(ClientError),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for CallError {
    fn from(e: anyhow::Error) -> Self {
        CallError::Other(e)
    }
}

/// Calls one API method on the daemon.
pub async fn call(env: &DeviceEnv, method: &str, params: Value) -> Result<Value, CallError> {
    call_with_timeout(env, method, params, CALL_TIMEOUT).await
}

pub async fn call_with_timeout(
    env: &DeviceEnv,
    method: &str,
    params: Value,
    timeout: Duration,
) -> Result<Value, CallError> {
    let answer = async {
        let mut client = Client::connect(&env.paths.public_socket()).await?;
        client.call(method, params, timeout).await
    }
    .await;
    match answer {
        Ok(value) => Ok(value),
        Err(e @ ClientError::NotRunning { .. }) => Err(CallError::NotRunning(e)),
        Err(ClientError::Rpc(e)) => Err(CallError::Other(ApiError(e).into())),
        Err(e) => Err(CallError::Other(e.into())),
    }
}

/// An error answer of the daemon, shown as its message alone; `downcast_ref` gives its code.
#[derive(Debug)]
pub struct ApiError(pub cnsprcy::rpc::RpcError);

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.message)
    }
}

impl std::error::Error for ApiError {}

/// The daemon's error code behind `error`, if the daemon answered with one.
pub fn api_error_code(error: &anyhow::Error) -> Option<i64> {
    error.downcast_ref::<ApiError>().map(|e| e.0.code)
}

/// The exit for "daemon not running": the message (or JSON) and status 3.
pub fn not_running(env: &DeviceEnv, error: ClientError, as_json: bool) -> anyhow::Result<ExitCode> {
    if as_json {
        print_json(&json!({
            "running": false,
            "socket": env.paths.public_socket(),
            "error": error.to_string(),
        }))?;
    } else {
        eprintln!("{error}");
    }
    Ok(ExitCode::from(EXIT_NOT_RUNNING))
}

async fn status(env: &DeviceEnv, as_json: bool) -> anyhow::Result<ExitCode> {
    let value = match call(env, "status", Value::Null).await {
        Ok(value) => value,
        Err(CallError::NotRunning(e)) => return not_running(env, e, as_json),
        Err(CallError::Other(e)) => return Err(e.context("cannot get the status")),
    };
    if as_json {
        print_json(&value)?;
        return Ok(ExitCode::SUCCESS);
    }
    let status: Status =
        serde_json::from_value(value).context("the daemon's status is not understood")?;
    print!("{}", format_status(&status));
    Ok(ExitCode::SUCCESS)
}

fn format_status(status: &Status) -> String {
    let listen: Vec<String> = status.listen.iter().map(|a| a.to_string()).collect();
    let mut out = format!(
        "cnsprcy {} running (pid {}, up {})\n\
         device      {}\n\
         id          {}\n\
         public key  {}\n\
         listen      {}\n\
         socket      {}\n",
        status.version,
        status.pid,
        format_duration(status.uptime_secs),
        status.name,
        status.id,
        status.public_key,
        if listen.is_empty() {
            "-".to_owned()
        } else {
            listen.join(", ")
        },
        status.socket.display(),
    );
    if let Some(store) = &status.store {
        out.push_str(&format_store(store));
    }
    // Loopback is shown only where the configuration names it: when the mesh is kept to some
    // interfaces and lo is one of them, or discovery runs on it.
    let restricted = status.interfaces.iter().any(|i| !i.loopback && !i.mesh);
    let mut network: Vec<String> = status
        .interfaces
        .iter()
        .filter(|i| !i.loopback || i.discovery || (restricted && i.mesh))
        .map(|i| {
            let addresses: Vec<String> = i.addresses.iter().map(|a| a.to_string()).collect();
            let uses = match (i.mesh, i.discovery) {
                (true, true) => "mesh, discovery",
                (true, false) => "mesh",
                (false, true) => "discovery",
                (false, false) => "not used",
            };
            format!(
                "  {:<10}  {:<6}  {uses:<15}  {}",
                i.name,
                if i.up { "up" } else { "down" },
                addresses.join(" ")
            )
        })
        .collect();
    for name in &status.absent_interfaces {
        network.push(format!(
            "  {name:<10}  absent  (named in the configuration; used once it appears)"
        ));
    }
    if !network.is_empty() {
        out.push_str("network\n");
        for line in network {
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    out.push_str("services\n");
    for service in &status.services {
        let pid = service.pid.map(|p| format!("pid {p}")).unwrap_or_default();
        let mut line = format!(
            "  {:<10}  {:<12}  {pid}",
            service.name.as_str(),
            service.state.as_str()
        );
        if let Some(detail) = &service.detail {
            line = format!("{}  ({detail})", line.trim_end());
        }
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(&format_knocks(&status.knocks));
    out
}

/// The devices that are not members and tried to start a session, with how to add one.
fn format_knocks(knocks: &[cnsprcy::api::Knock]) -> String {
    if knocks.is_empty() {
        return String::new();
    }
    let mut out = "knocked (not members; add one only if you know it: its ID must match \
                   `cnspr manage id` on that device)\n"
        .to_owned();
    for knock in knocks {
        let times = if knock.count == 1 { "time" } else { "times" };
        out.push_str(&format!(
            "  {}  from {}, {} {times}, last {}\n    to add it: cnspr manage add NAME {}\n",
            knock.id, knock.address, knock.count, knock.last_seen, knock.public_key
        ));
    }
    out
}

/// The store's line, and what to do when something is wrong with it.
fn format_store(store: &StoreStatus) -> String {
    let mut out = match (&store.state, &store.problem) {
        (StoreState::Ok, _) | (_, None) => {
            format!(
                "store       {}  {}\n",
                store.state.as_str(),
                store.path.display()
            )
        }
        (StoreState::Degraded, Some(problem)) => format!(
            "store       DEGRADED since {}: {problem}\n",
            store.since.as_deref().unwrap_or("?")
        ),
    };
    if let Some(aside) = &store.set_aside {
        out.push_str(&format!(
            "            a damaged store was moved to {} at {} ({}); {}\n",
            aside.path.display(),
            aside.time,
            aside.reason,
            aside.advice
        ));
    }
    out
}

fn format_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

fn config_show(env: &DeviceEnv, as_json: bool) -> anyhow::Result<ExitCode> {
    let name = identity::effective_name(env.config.name.as_ref(), &env.paths.state_dir)?;
    let effective = json!({
        "name": name,
        "mesh": env.config.mesh,
        "discovery": env.config.discovery,
        "handlers": env.config.handlers,
        "paths": {
            "state_dir": env.paths.state_dir,
            "runtime_dir": env.paths.runtime_dir,
            "handlers_dir": env.paths.handlers_dir,
        },
    });
    if as_json {
        print_json(&effective)?;
    } else {
        let origin = if env.source.exists {
            format!(
                "# from {}, with defaults for keys it does not set",
                env.source.path.display()
            )
        } else {
            format!(
                "# built-in defaults: {} does not exist",
                env.source.path.display()
            )
        };
        println!("{origin}\n{}", toml::to_string(&effective)?.trim_end());
    }
    Ok(ExitCode::SUCCESS)
}

fn config_path(env: &DeviceEnv, as_json: bool) -> anyhow::Result<ExitCode> {
    let p = &env.paths;
    if as_json {
        print_json(&json!({
            "config_file": p.config_file,
            "config_file_exists": env.source.exists,
            "state_dir": p.state_dir,
            "runtime_dir": p.runtime_dir,
            "handlers_dir": p.handlers_dir,
            "socket": p.public_socket(),
        }))?;
    } else {
        let missing = if env.source.exists {
            ""
        } else {
            "  (does not exist: defaults apply)"
        };
        println!("config file   {}{missing}", p.config_file.display());
        println!("state dir     {}", p.state_dir.display());
        println!("runtime dir   {}", p.runtime_dir.display());
        println!("handlers dir  {}", p.handlers_dir.display());
        println!("socket        {}", p.public_socket().display());
    }
    Ok(ExitCode::SUCCESS)
}

fn print_identity(name: &DeviceName, identity: &Identity, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        print_json(&json!({
            "name": name,
            "id": identity.device_id(),
            "public_key": identity.public_key(),
        }))
    } else {
        println!("name        {name}");
        println!("id          {}", identity.device_id());
        println!("public key  {}", identity.public_key());
        Ok(())
    }
}

fn manage_init(
    env: &DeviceEnv,
    name: Option<DeviceName>,
    force: bool,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let state = &env.paths.state_dir;
    if force && InstanceLock::is_held(&env.paths.lock_file(ServiceKind::Mesh.as_str())) {
        bail!(
            "the daemon is running and uses the current identity; stop it before replacing the identity"
        );
    }
    let identity = match Identity::create(state, force) {
        Ok(identity) => identity,
        Err(e @ IdentityError::Exists { .. }) => bail!(e),
        Err(e) => return Err(e.into()),
    };
    if let Some(name) = &name {
        identity::store_name(state, name)?;
        if let Some(configured) = &env.config.name
            && configured != name
        {
            eprintln!(
                "note: {} sets name = \"{configured}\", which takes precedence over \"{name}\"",
                env.source.path.display()
            );
        }
    }
    let effective = identity::effective_name(env.config.name.as_ref(), state)?;
    if !as_json {
        println!(
            "Created a new identity in {}",
            Identity::key_path(state).display()
        );
    }
    print_identity(&effective, &identity, as_json)?;
    Ok(ExitCode::SUCCESS)
}

fn manage_id(env: &DeviceEnv, as_json: bool) -> anyhow::Result<ExitCode> {
    let identity = Identity::load(&env.paths.state_dir)?;
    let name = identity::effective_name(env.config.name.as_ref(), &env.paths.state_dir)?;
    print_identity(&name, &identity, as_json)?;
    Ok(ExitCode::SUCCESS)
}

/// The script that registers completions for `shell`: it asks `cnspr` (on PATH) what to offer
/// (`COMPLETE=SHELL cnspr -- ARGS`), which the start of `main` answers.
pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<ExitCode> {
    let name = shell.to_string();
    let shells = clap_complete::env::Shells::builtins();
    let completer = shells
        .completer(&name)
        .with_context(|| format!("no completions for {name}"))?;
    let mut script = Vec::new();
    completer.write_registration("COMPLETE", "cnspr", "cnspr", "cnspr", &mut script)?;
    if shell == clap_complete::Shell::Zsh {
        // Installed as the autoloaded `_cnspr` (the packages do), the first Tab runs this file:
        // complete then too, as clap's own zsh scripts do.
        script.extend_from_slice(
            b"if [ \"$funcstack[1]\" = \"_cnspr\" ]; then\n    _clap_dynamic_completer_cnspr \"$@\"\nfi\n",
        );
    }
    std::io::stdout().write_all(&script)?;
    Ok(ExitCode::SUCCESS)
}

/// Writes `cnspr.1`, one page per subcommand (`cnspr-config-show.1`, ...) and one per service
/// binary (`cnsprcy-mesh.1`, ...) into `dir`.
pub fn manpages(dir: &Path) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = 0;
    let mut pending = vec![(String::from("cnspr"), Cli::command())];
    while let Some((name, command)) = pending.pop() {
        if command.is_hide_set() {
            continue;
        }
        let command = command.name(name.clone());
        for sub in command.get_subcommands() {
            pending.push((format!("{name}-{}", sub.get_name()), sub.clone()));
        }
        write_manpage(dir, &name, command)?;
        written += 1;
    }
    for kind in ServiceKind::ALL {
        let name = kind.unit_name();
        let command = clap::Command::new(name.clone())
            .version(cnsprcy::VERSION)
            .about(format!("the {kind} service of cnsprcy"))
            .long_about(format!("{}\n\n{}", kind.duty(), cnsprcy::service::SERVICE_USAGE))
            .after_long_help(format!(
                "Unit: {name}.service, part of cnsprcy.target. Logs: journalctl --user -u {name}. See cnspr(1)."
            ));
        write_manpage(dir, &name, command)?;
        written += 1;
    }
    eprintln!("wrote {written} man pages to {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

fn write_manpage(dir: &Path, name: &str, command: clap::Command) -> anyhow::Result<()> {
    let path = dir.join(format!("{name}.1"));
    let mut page = Vec::new();
    clap_mangen::Man::new(command).render(&mut page)?;
    std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shows_the_store_and_what_to_do_about_it() {
        let mut store = StoreStatus {
            path: "/home/me/.local/share/cnsprcy/store".into(),
            state: StoreState::Ok,
            problem: None,
            since: None,
            set_aside: None,
        };
        assert_eq!(
            format_store(&store),
            "store       ok  /home/me/.local/share/cnsprcy/store\n"
        );
        store.state = StoreState::Degraded;
        store.problem = Some("disk full; free some space".into());
        store.since = Some("2026-12-06T07:16:35Z".into());
        store.set_aside = Some(cnsprcy::api::SetAsideStore {
            path: "/s/store.damaged-20261206T071600Z".into(),
            reason: "index out of bounds".into(),
            time: "2026-12-06T07:16:00Z".into(),
            advice: "delete it once refilled".into(),
        });
        assert_eq!(
            format_store(&store),
            "store       DEGRADED since 2026-12-06T07:16:35Z: disk full; free some space\n            \
             a damaged store was moved to /s/store.damaged-20261206T071600Z at \
             2026-12-06T07:16:00Z (index out of bounds); delete it once refilled\n"
        );
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(format_duration(5), "5s");
        assert_eq!(format_duration(125), "2m 5s");
        assert_eq!(format_duration(7300), "2h 1m");
        assert_eq!(format_duration(90000), "1d 1h");
    }

    #[test]
    fn status_shows_what_uses_each_interface() {
        let interface = |name: &str, mesh: bool, discovery: bool, address: &str| {
            cnsprcy::api::InterfaceStatus {
                name: name.to_owned(),
                up: true,
                loopback: name == "lo",
                addresses: vec![address.parse().unwrap()],
                mesh,
                discovery,
            }
        };
        let identity = cnsprcy::identity::Identity::from_secret([7; 32]);
        let mut status = Status {
            name: cnsprcy::identity::DeviceName::new("laptop").unwrap(),
            id: identity.device_id(),
            public_key: identity.public_key(),
            version: "0.1.0".into(),
            pid: 1,
            uptime_secs: 5,
            listen: vec![],
            socket: "/run/cnsprcy.sock".into(),
            services: vec![],
            interfaces: vec![
                interface("eth0", true, true, "192.168.1.20"),
                interface("lo", true, false, "127.0.0.1"),
                interface("tun0", false, false, "10.8.0.5"),
            ],
            absent_interfaces: vec!["usb0".into()],
            store: None,
            knocks: vec![],
        };
        let text = format_status(&status);
        assert!(
            text.contains(
                "network\n  eth0        up      mesh, discovery  192.168.1.20\n  lo          up      mesh             127.0.0.1\n  tun0        up      not used         10.8.0.5\n  usb0        absent  (named in the configuration; used once it appears)\nservices\n"
            ),
            "{text}"
        );
        // Without [mesh] interfaces, loopback is left out as before.
        status.interfaces.truncate(2);
        status.absent_interfaces.clear();
        let text = format_status(&status);
        assert!(
            text.contains(
                "network\n  eth0        up      mesh, discovery  192.168.1.20\nservices\n"
            ),
            "{text}"
        );
        assert!(!text.contains("knocked"), "{text}");
        // A device that knocked: its ID, where from, and the command that adds it.
        let stranger = cnsprcy::identity::Identity::from_secret([9; 32]).public_key();
        status.knocks.push(cnsprcy::api::Knock {
            id: stranger.device_id(),
            public_key: stranger,
            address: "192.168.1.30:41234".parse().unwrap(),
            count: 3,
            first_seen: "2026-12-06T20:00:00Z".into(),
            last_seen: "2026-12-06T20:01:00Z".into(),
        });
        let text = format_status(&status);
        assert!(
            text.ends_with(&format!(
                "  {}  from 192.168.1.30:41234, 3 times, last 2026-12-06T20:01:00Z\n    to add it: cnspr manage add NAME {stranger}\n",
                stranger.device_id()
            )),
            "{text}"
        );
    }
}
