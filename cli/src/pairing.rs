//! The commands about who belongs to the mesh: `manage list`, `invite`, `join` (with a code,
//! or waiting to be inducted), `induct`, `disable`, `revoke` and `leave`.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cnsprcy::api::{MemberInfo, RosterInfo};
use cnsprcy::env::DeviceEnv;
use cnsprcy::identity::DeviceId;
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
    print_joined(value)?;
    Ok(ExitCode::SUCCESS)
}

/// The answer of a join (with a code, or after pairing), for people.
fn print_joined(value: Value) -> anyhow::Result<()> {
    let joined: Joined = serde_json::from_value(value)?;
    let others = match joined.members {
        1 => "1 member".to_owned(),
        n => format!("{n} members"),
    };
    println!(
        "joined the mesh through {} ({}): {others}; `cnspr peers` shows them as they connect",
        joined.inviter.name, joined.inviter.id
    );
    Ok(())
}

/// The other device of a pairing, as the daemon names it.
#[derive(Deserialize)]
struct Peer {
    name: String,
    id: DeviceId,
}

#[derive(Deserialize)]
struct Candidate {
    name: String,
    id: DeviceId,
    key: String,
    addresses: Vec<std::net::SocketAddr>,
}

#[derive(Deserialize)]
struct Candidates {
    candidates: Vec<Candidate>,
}

/// How a pairing step ended, when it did not give a value.
enum Stopped {
    Exit(ExitCode),
    Failed(anyhow::Error),
}

/// Runs a pairing call; Ctrl-C cancels the pairing on the daemon instead (status 130).
async fn pairing_call(
    env: &DeviceEnv,
    as_json: bool,
    call: impl std::future::Future<Output = Result<Value, CallError>>,
) -> Result<Value, Stopped> {
    let answer = tokio::select! {
        answer = call => answer,
        _ = tokio::signal::ctrl_c() => return Err(cancelled(env).await),
    };
    match answer {
        Ok(value) => Ok(value),
        Err(CallError::NotRunning(e)) => Err(match not_running(env, e, as_json) {
            Ok(code) => Stopped::Exit(code),
            Err(e) => Stopped::Failed(e),
        }),
        Err(CallError::Other(e)) => Err(Stopped::Failed(e)),
    }
}

async fn cancelled(env: &DeviceEnv) -> Stopped {
    // Whatever the daemon had begun (advertising, a connection, a join) ends with it.
    let _ = call(env, "members.pair_cancel", json!({})).await;
    eprintln!("\ncnspr: pairing cancelled; nothing was changed");
    Stopped::Exit(ExitCode::from(130))
}

/// Lines typed on stdin, read on a thread of their own so that the wait for one does not stop
/// the rest (new devices listed, Ctrl-C).
struct Typed(tokio::sync::mpsc::UnboundedReceiver<String>);

impl Typed {
    fn start() -> Self {
        let (lines, typed) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { break };
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        Self(typed)
    }

    /// The next line; `None` at the end of input.
    async fn next(&mut self) -> Option<String> {
        self.0.recv().await
    }
}

/// Shows the code and asks whether the other screen shows the same. `expected`: the other
/// device's ID was checked against `--expect-…`, so nothing is asked.
async fn compare_codes(
    env: &DeviceEnv,
    typed: &mut Typed,
    code: &str,
    peer: &Peer,
    expected: bool,
) -> Result<bool, Stopped> {
    eprintln!("\n    pairing code: {code}\n");
    if expected {
        eprintln!(
            "{} ({}) is the device expected: confirmed without asking",
            peer.name, peer.id
        );
        return Ok(true);
    }
    eprint!(
        "Does {} show the same code? Answer y only if it does [y/N] ",
        peer.name
    );
    let _ = std::io::stderr().flush();
    let answer = tokio::select! {
        answer = typed.next() => answer,
        _ = tokio::signal::ctrl_c() => return Err(cancelled(env).await),
    };
    if !std::io::stdin().is_terminal() {
        // Nobody typed the line break: end the question's line.
        eprintln!();
    }
    let yes = answer.is_some_and(|a| matches!(a.trim(), "y" | "Y" | "yes" | "YES" | "Yes"));
    Ok(yes)
}

/// Tells the daemon what the user decided, and waits for the other side (and the join).
async fn confirm(
    env: &DeviceEnv,
    as_json: bool,
    accept: bool,
    peer: &Peer,
) -> Result<Value, Stopped> {
    let spinner = (accept && !as_json && std::io::stderr().is_terminal())
        .then(|| Spinner::start(format!("waiting for {} to confirm", peer.name)));
    let answer = pairing_call(
        env,
        as_json,
        call_with_timeout(
            env,
            "members.pair_confirm",
            json!({ "accept": accept }),
            cnsprcy_mesh::CONFIRM_TIMEOUT + JOIN_TIMEOUT + Duration::from_secs(30),
        ),
    )
    .await;
    drop(spinner);
    answer
}

/// An `--expect-…` ID; a malformed one is a usage error (status 2).
fn parse_id(id: Option<String>) -> Result<Option<DeviceId>, Stopped> {
    id.map(|id| id.parse::<DeviceId>())
        .transpose()
        .map_err(|e| {
            eprintln!("cnspr: {e}");
            Stopped::Exit(ExitCode::from(2))
        })
}

fn finish(outcome: Result<ExitCode, Stopped>) -> anyhow::Result<ExitCode> {
    match outcome {
        Ok(code) | Err(Stopped::Exit(code)) => Ok(code),
        Err(Stopped::Failed(e)) => Err(e),
    }
}

/// `manage join` without a code: wait to be inducted by a member on this network.
pub async fn wait_to_be_inducted(
    env: &DeviceEnv,
    expect: Option<String>,
    timeout: Duration,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let waited = async {
        let expect = parse_id(expect)?;
        wait_and_confirm(env, &mut Typed::start(), expect, timeout, as_json).await
    };
    finish(waited.await)
}

async fn wait_and_confirm(
    env: &DeviceEnv,
    typed: &mut Typed,
    expect: Option<DeviceId>,
    timeout: Duration,
    as_json: bool,
) -> Result<ExitCode, Stopped> {
    // Checked here too (the daemon does), so that the instructions below are not shown to
    // a device that cannot follow them.
    let roster = pairing_call(env, as_json, call(env, "members.list", json!({}))).await?;
    let roster: Vec<RosterInfo> =
        serde_json::from_value(roster).map_err(|e| Stopped::Failed(e.into()))?;
    let members = roster
        .iter()
        .filter(|e| !e.this_device && e.state == cnsprcy::wire::MemberState::Active)
        .count();
    if members > 0 {
        return Err(Stopped::Failed(anyhow::anyhow!(
            "this device is a member of a mesh already ({members} members); run `cnspr manage induct` on it to add another device, or `cnspr manage leave` first"
        )));
    }
    let Some(this) = roster.iter().find(|e| e.this_device) else {
        return Err(Stopped::Failed(anyhow::anyhow!(
            "the daemon's roster does not list this device"
        )));
    };
    let (name, id) = (&this.name, &this.id);
    eprintln!(
        "This device is {name} ({id}). On a member on this network, run:\n\n    cnspr manage induct\n\nand pick it."
    );
    let spinner = (!as_json && std::io::stderr().is_terminal())
        .then(|| Spinner::start("waiting for a member to induct this device".into()));
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let waited = pairing_call(
        env,
        as_json,
        call_with_timeout(
            env,
            "members.pair_wait",
            json!({ "expect_inductor": expect, "timeout_ms": timeout_ms }),
            timeout + Duration::from_secs(30),
        ),
    )
    .await;
    drop(spinner);
    let waited = waited?;
    let (code, inductor) = coded(&waited, "inductor")?;
    eprintln!("{} ({}) inducts this device.", inductor.name, inductor.id);
    let accept = compare_codes(env, typed, &code, &inductor, expect.is_some()).await?;
    let value = confirm(env, as_json, accept, &inductor).await?;
    if as_json {
        print_json(&value).map_err(Stopped::Failed)?;
        return Ok(ExitCode::SUCCESS);
    }
    print_joined(value).map_err(Stopped::Failed)?;
    Ok(ExitCode::SUCCESS)
}

/// The code and the other device of a `pair_wait` or `induct` answer.
fn coded(value: &Value, peer: &str) -> Result<(String, Peer), Stopped> {
    let code = value.get("code").and_then(Value::as_str).map(str::to_owned);
    let peer = value
        .get(peer)
        .cloned()
        .and_then(|p| serde_json::from_value::<Peer>(p).ok());
    match (code, peer) {
        (Some(code), Some(peer)) => Ok((code, peer)),
        _ => Err(Stopped::Failed(anyhow::anyhow!(
            "the daemon's answer is not understood: {value}"
        ))),
    }
}

/// `manage induct`: list the devices waiting to be paired, add the one picked.
pub async fn induct(
    env: &DeviceEnv,
    expect: Option<String>,
    timeout: Duration,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let inducted = async {
        let expect = parse_id(expect)?;
        pick_and_induct(env, &mut Typed::start(), expect, timeout, as_json).await
    };
    finish(inducted.await)
}

async fn pick_and_induct(
    env: &DeviceEnv,
    typed: &mut Typed,
    expect: Option<DeviceId>,
    timeout: Duration,
    as_json: bool,
) -> Result<ExitCode, Stopped> {
    let deadline = tokio::time::Instant::now() + timeout;
    let spin = !as_json && std::io::stderr().is_terminal();
    let looking = match &expect {
        Some(id) => format!("waiting for device {id} to appear"),
        None => "looking for devices waiting in `cnspr manage join`; type a number to add one"
            .to_owned(),
    };
    let mut spinner = spin.then(|| Spinner::start(looking.clone()));
    // Numbered in the order they appeared; the daemon's list may also lose one (it became a
    // member meanwhile), so they are told apart by ID, not by position.
    let mut listed: Vec<Candidate> = Vec::new();
    let mut answered = 0;
    let mut typing = expect.is_none();
    let chosen = loop {
        let poll = call_with_timeout(
            env,
            "members.candidates",
            json!({ "known": answered, "wait_ms": 2000 }),
            Duration::from_secs(15),
        );
        tokio::select! {
            answer = poll => {
                let value = match answer {
                    Ok(value) => value,
                    Err(CallError::NotRunning(e)) => {
                        drop(spinner);
                        return Err(match not_running(env, e, as_json) {
                            Ok(code) => Stopped::Exit(code),
                            Err(e) => Stopped::Failed(e),
                        });
                    }
                    Err(CallError::Other(e)) => {
                        drop(spinner);
                        return Err(Stopped::Failed(e));
                    }
                };
                let all: Candidates = serde_json::from_value(value)
                    .map_err(|e| Stopped::Failed(e.into()))?;
                answered = all.candidates.len();
                let new: Vec<Candidate> = all
                    .candidates
                    .into_iter()
                    .filter(|c| !listed.iter().any(|l| l.id == c.id))
                    .collect();
                if !new.is_empty() {
                    drop(spinner.take());
                    for candidate in new {
                        let addresses: Vec<String> =
                            candidate.addresses.iter().map(|a| a.to_string()).collect();
                        let line = format!(
                            "{:>3}) {}  {}  {}",
                            listed.len() + 1,
                            candidate.name,
                            candidate.id,
                            addresses.join(", ")
                        );
                        if as_json {
                            eprintln!("{line}");
                        } else {
                            println!("{line}");
                        }
                        listed.push(candidate);
                    }
                    spinner = spin.then(|| Spinner::start(looking.clone()));
                }
                if let Some(id) = &expect
                    && let Some(found) = listed.iter().position(|c| c.id == *id)
                {
                    break found;
                }
            }
            line = typed.next(), if typing => match line {
                None => typing = false,
                Some(line) if line.trim().is_empty() => {}
                Some(line) => match line.trim().parse::<usize>() {
                    Ok(n) if (1..=listed.len()).contains(&n) => break n - 1,
                    _ => {
                        drop(spinner.take());
                        eprintln!("type the number of a device listed above (1 to {})", listed.len());
                        spinner = spin.then(|| Spinner::start(looking.clone()));
                    }
                },
            },
            _ = tokio::signal::ctrl_c() => {
                drop(spinner);
                return Err(cancelled(env).await);
            }
            _ = tokio::time::sleep_until(deadline) => {
                drop(spinner);
                let what = match &expect {
                    Some(id) => format!("device {id} did not appear"),
                    None if listed.is_empty() => "no device waiting to be paired appeared".into(),
                    None => "no device was picked".into(),
                };
                let _ = call(env, "members.pair_cancel", json!({})).await;
                eprintln!(
                    "cnspr: {what} within {}; run `cnspr manage join` (without a code) on the new device, on this network, then try again",
                    humantime::format_duration(timeout)
                );
                return Ok(ExitCode::FAILURE);
            }
        }
    };
    drop(spinner);
    let candidate = &listed[chosen];
    let value = pairing_call(
        env,
        as_json,
        call_with_timeout(
            env,
            "members.induct",
            json!({ "id": candidate.key }),
            cnsprcy_mesh::EXCHANGE_TIMEOUT * 3,
        ),
    )
    .await?;
    let (code, joiner) = coded(&value, "joiner")?;
    let accept = compare_codes(env, typed, &code, &joiner, expect.is_some()).await?;
    let value = confirm(env, as_json, accept, &joiner).await?;
    if as_json {
        print_json(&value).map_err(Stopped::Failed)?;
        return Ok(ExitCode::SUCCESS);
    }
    let added: Peer = value
        .get("added")
        .cloned()
        .and_then(|a| serde_json::from_value(a).ok())
        .ok_or_else(|| {
            Stopped::Failed(anyhow::anyhow!(
                "the daemon's answer is not understood: {value}"
            ))
        })?;
    println!(
        "added {} ({}) to the mesh: every member accepts it from now on",
        added.name, added.id
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
                    || start.elapsed() > Duration::from_secs(4 * 3600)
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
