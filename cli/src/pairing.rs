//! The commands about who belongs to the mesh: `manage list`, `invite`, `join`, `disable`,
//! `revoke` and `leave`.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cnsprcy::api::{MemberInfo, RosterInfo};
use cnsprcy::env::DeviceEnv;
use cnsprcy::invitation::Invitation;
use cnsprcy_mesh::core::JOIN_TIMEOUT;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::commands::{CallError, call, call_with_timeout, not_running, print_json};
use crate::peers::call_or_exit;

pub async fn list(env: &DeviceEnv, as_json: bool) -> anyhow::Result<ExitCode> {
    let value = call_or_exit!(env, as_json, call(env, "members.list", json!({})));
    if as_json {
        print_json(&value)?;
        return Ok(ExitCode::SUCCESS);
    }
    let roster: Vec<RosterInfo> = serde_json::from_value(value)?;
    let mut rows = vec![[
        "NAME".to_owned(),
        "ID".to_owned(),
        "STATE".to_owned(),
        "CHANGED".to_owned(),
        "BY".to_owned(),
    ]];
    for entry in &roster {
        let state = if entry.this_device {
            format!("{} (this device)", entry.state.as_str())
        } else {
            entry.state.as_str().to_owned()
        };
        rows.push([
            entry.name.to_string(),
            entry.id.to_string(),
            state,
            entry.changed.clone().unwrap_or_else(|| "-".into()),
            entry.by.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    print!("{}", crate::commands::table(&rows));
    Ok(ExitCode::SUCCESS)
}

#[derive(Deserialize)]
struct Invited {
    code: String,
    expires: String,
    addresses: Vec<std::net::SocketAddr>,
}

pub async fn invite(
    env: &DeviceEnv,
    expires: Duration,
    qr: bool,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let expires_ms = u64::try_from(expires.as_millis()).unwrap_or(u64::MAX);
    let value = call_or_exit!(
        env,
        as_json,
        call(env, "members.invite", json!({ "expires_ms": expires_ms }))
    );
    if as_json {
        print_json(&value)?;
        return Ok(ExitCode::SUCCESS);
    }
    let invited: Invited = serde_json::from_value(value)?;
    println!(
        "On the new device, run:\n\n    cnspr manage join {}\n",
        invited.code
    );
    if qr && std::io::stdout().is_terminal() {
        println!("{}", cnsprcy::invitation::qr_for_terminal(&invited.code));
    }
    println!(
        "It works once, until {}. It lets the device that uses it into the mesh without \
         confirmation: give it only to a device of yours, over a channel you trust.",
        invited.expires
    );
    if invited.addresses.is_empty() {
        eprintln!(
            "warning: this device has no network address to put in the invitation; the new device cannot reach it"
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Deserialize)]
struct Joined {
    inviter: MemberInfo,
    members: usize,
}

pub async fn join(env: &DeviceEnv, code: &[String], as_json: bool) -> anyhow::Result<ExitCode> {
    let text = code.join("");
    // Read here first: a mistyped code is the user's to fix, without a round trip.
    let invitation = match Invitation::parse(&text) {
        Ok(invitation) => invitation,
        Err(e) => {
            eprintln!("cnspr: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let spinner = (!as_json && std::io::stderr().is_terminal()).then(|| {
        let addresses: Vec<String> = invitation.addresses.iter().map(|a| a.to_string()).collect();
        Spinner::start(format!("joining through {}", addresses.join(", ")))
    });
    let answer = tokio::select! {
        answer = call_with_timeout(
            env,
            "members.join",
            json!({ "code": text }),
            JOIN_TIMEOUT + Duration::from_secs(10),
        ) => answer,
        _ = tokio::signal::ctrl_c() => {
            drop(spinner);
            // The daemon forgets the inviter again (unless the join finished meanwhile).
            let _ = call(env, "members.cancel_join", json!({})).await;
            eprintln!("cnspr: join cancelled");
            return Ok(ExitCode::from(130));
        }
    };
    drop(spinner);
    let value = call_or_exit!(env, as_json, std::future::ready(answer));
    if as_json {
        print_json(&value)?;
        return Ok(ExitCode::SUCCESS);
    }
    let joined: Joined = serde_json::from_value(value)?;
    let others = match joined.members {
        1 => "1 member".to_owned(),
        n => format!("{n} members"),
    };
    println!(
        "joined the mesh through {} ({}): {others}; `cnspr peers` shows them as they connect",
        joined.inviter.name, joined.inviter.id
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Deserialize)]
struct Revoked {
    member: MemberInfo,
    kept: Vec<MemberInfo>,
}

pub async fn disable(env: &DeviceEnv, name: &str, as_json: bool) -> anyhow::Result<ExitCode> {
    let value = call_or_exit!(
        env,
        as_json,
        call(env, "members.disable", json!({ "name": name }))
    );
    if as_json {
        print_json(&value)?;
    } else {
        let member: MemberInfo = serde_json::from_value(value)?;
        println!(
            "disabled {} ({}): no member accepts it any more; if it is reachable it is told, and forgets the mesh",
            member.name, member.id
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn revoke(env: &DeviceEnv, name: &str, as_json: bool) -> anyhow::Result<ExitCode> {
    let value = call_or_exit!(
        env,
        as_json,
        call(env, "members.revoke", json!({ "name": name }))
    );
    if as_json {
        print_json(&value)?;
        return Ok(ExitCode::SUCCESS);
    }
    let revoked: Revoked = serde_json::from_value(value)?;
    println!(
        "revoked {} ({}): every member refuses its key from now on, for good",
        revoked.member.name, revoked.member.id
    );
    if !revoked.kept.is_empty() {
        println!(
            "{} had added these devices, which stay members; check that they are yours, and revoke any that is not:",
            revoked.member.name
        );
        for member in &revoked.kept {
            println!("    {} ({})", member.name, member.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn leave(env: &DeviceEnv, force: bool, as_json: bool) -> anyhow::Result<ExitCode> {
    let value: Value = call_or_exit!(
        env,
        as_json,
        call(env, "members.leave", json!({ "force": force }))
    );
    if as_json {
        print_json(&value)?;
        return Ok(ExitCode::SUCCESS);
    }
    let told = value.get("told").and_then(Value::as_u64).unwrap_or(0);
    let told = match told {
        1 => "1 reachable member was".to_owned(),
        n => format!("{n} reachable members were"),
    };
    println!("left the mesh: {told} told, and pass it on; this device forgot its members");
    Ok(ExitCode::SUCCESS)
}

/// A line on stderr that shows a long wait is alive, until dropped.
struct Spinner {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spinner {
    fn start(what: String) -> Self {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let frames = ['|', '/', '-', '\\'];
            let start = Instant::now();
            for frame in frames.iter().cycle() {
                let mut err = std::io::stderr();
                let _ = write!(err, "\r{frame} {what} ({} s)", start.elapsed().as_secs());
                let _ = err.flush();
                // Dropping the sender ends the wait at once (`Disconnected`).
                let waited = stopped.recv_timeout(Duration::from_millis(150));
                if waited != Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                    || start.elapsed() > Duration::from_secs(120)
                {
                    break;
                }
            }
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        });
        Self {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
