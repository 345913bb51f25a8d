//! `cnspr send` and `cnspr watch`.

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use cnsprcy::api::{HandlerReply, MessagesInfo, SendResult, WatchEvent};
use cnsprcy::client::{Client, ClientError};
use cnsprcy::env::DeviceEnv;
use cnsprcy::ipc::MAX_PAYLOAD_BYTES;
use serde_json::json;

use crate::commands::{CallError, call_with_timeout, not_running, print_json};

pub struct SendArgs {
    pub tag: String,
    pub payload: Option<String>,
    pub to: Vec<String>,
    pub include_self: bool,
    pub wait: bool,
    pub timeout: Duration,
    pub ttl: Duration,
}

/// The payload from the argument, or from standard input for `-`, checked against the limit.
fn read_payload(payload: Option<String>) -> anyhow::Result<Vec<u8>> {
    match payload.as_deref() {
        None => Ok(Vec::new()),
        Some("-") => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .take(MAX_PAYLOAD_BYTES as u64 + 1)
                .read_to_end(&mut bytes)
                .context("cannot read the payload from standard input")?;
            if bytes.len() > MAX_PAYLOAD_BYTES {
                bail!(
                    "the payload on standard input is larger than the limit of {MAX_PAYLOAD_BYTES} bytes (16 MiB); send a path or a link to it instead"
                );
            }
            Ok(bytes)
        }
        Some(text) => {
            if text.len() > MAX_PAYLOAD_BYTES {
                bail!("the payload is larger than the limit of {MAX_PAYLOAD_BYTES} bytes (16 MiB)");
            }
            Ok(text.as_bytes().to_vec())
        }
    }
}

pub async fn send(env: &DeviceEnv, args: SendArgs, as_json: bool) -> anyhow::Result<ExitCode> {
    use base64::Engine;
    let payload = read_payload(args.payload)?;
    let mut params = json!({
        "tag": args.tag,
        "payload": base64::engine::general_purpose::STANDARD.encode(&payload),
        "wait": args.wait,
        "timeout_ms": args.timeout.as_millis() as u64,
        "ttl_ms": args.ttl.as_millis() as u64,
    });
    if !args.to.is_empty() {
        params["to"] = json!(args.to);
    }
    if args.include_self {
        params["include_self"] = json!(true);
    }
    if !args.wait {
        let value = match call_with_timeout(env, "send", params, Duration::from_secs(30)).await {
            Ok(value) => value,
            Err(CallError::NotRunning(e)) => return not_running(env, e, as_json),
            Err(CallError::Other(e)) => return Err(e),
        };
        if as_json {
            print_json(&value)?;
        } else {
            let result: SendResult = serde_json::from_value(value)?;
            print_sent(&result, args.ttl);
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Waiting: each reply comes as a notification as soon as it is in, and is printed then.
    params["stream"] = json!(true);
    if !as_json {
        eprintln!(
            "waiting up to {} for the handlers…",
            humantime::format_duration(args.timeout)
        );
    }
    let mut client = match Client::connect(&env.paths.public_socket()).await {
        Ok(client) => client,
        Err(e @ ClientError::NotRunning { .. }) => return not_running(env, e, as_json),
        Err(e) => return Err(e.into()),
    };
    let mut replies: Vec<HandlerReply> = Vec::new();
    let mut unreadable = None;
    let answer = client
        .call_with_notifications(
            "send",
            params,
            args.timeout + Duration::from_secs(15),
            |method, params| {
                if method != "send.reply" {
                    return;
                }
                match serde_json::from_value::<HandlerReply>(params) {
                    Ok(reply) => {
                        if !as_json {
                            print_reply(&reply);
                        }
                        replies.push(reply);
                    }
                    Err(e) => unreadable = Some(e),
                }
            },
        )
        .await;
    let value = match answer {
        Ok(value) => value,
        Err(ClientError::Rpc(e)) => bail!(e.message),
        Err(e) => return Err(e.into()),
    };
    if let Some(e) = unreadable {
        bail!("the daemon sent a reply that is not understood: {e}");
    }
    let mut result: SendResult = serde_json::from_value(value)?;
    let all_ok = replies.iter().all(|r| r.succeeded());
    result.replies = Some(replies);
    if as_json {
        print_json(&result)?;
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn names(list: &[cnsprcy::identity::DeviceName]) -> String {
    list.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_sent(result: &SendResult, ttl: Duration) {
    println!("sent {} to {}", result.id, names(&result.recipients));
    if !result.queued.is_empty() {
        println!(
            "queued for {} until reachable (at most {})",
            names(&result.queued),
            humantime::format_duration(ttl)
        );
    }
}

/// One recipient's outcome, then its output: text as it is, binary output as a size.
fn print_reply(reply: &HandlerReply) {
    use std::io::Write;
    let mut head = format!("{}: {}", reply.name, reply.status);
    if let Some(code) = reply.exit_code {
        head.push_str(&format!(" (exit {code}"));
        if let Some(ms) = reply.duration_ms {
            head.push_str(&format!(", {ms} ms"));
        }
        head.push(')');
    }
    if let Some(error) = &reply.error {
        head.push_str(&format!(": {error}"));
    }
    println!("{head}");
    match (&reply.stdout, &reply.stdout_base64) {
        (Some(text), _) if !text.is_empty() => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(text.as_bytes());
            if !text.ends_with('\n') {
                let _ = writeln!(out);
            }
        }
        (None, Some(b64)) => {
            let size = reply.stdout_bytes().map_or(b64.len() / 4 * 3, |b| b.len());
            println!("({size} bytes of binary output; --json shows them in base64)");
        }
        _ => {}
    }
}

pub async fn watch(env: &DeviceEnv, as_json: bool) -> anyhow::Result<ExitCode> {
    let mut client = match Client::connect(&env.paths.public_socket()).await {
        Ok(client) => client,
        Err(e @ ClientError::NotRunning { .. }) => return not_running(env, e, as_json),
        Err(e) => return Err(e.into()),
    };
    client
        .call(
            "subscribe",
            serde_json::Value::Null,
            Duration::from_secs(10),
        )
        .await
        .context("cannot subscribe")?;
    if !as_json {
        eprintln!("watching messages and peers; Ctrl-C stops");
    }
    while let Some(params) = client.next_notification().await? {
        if as_json {
            println!("{params}");
            continue;
        }
        // The daemon stamps each event; older daemons did not.
        let time = match params["time"].as_str() {
            Some(time) => time.to_owned(),
            None => humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        };
        match serde_json::from_value::<WatchEvent>(params.clone()) {
            Ok(event) => println!("{time}  {}", describe(&event)),
            Err(_) => println!("{time}  {params}"),
        }
    }
    eprintln!("the daemon closed the connection");
    Ok(ExitCode::FAILURE)
}

fn describe(event: &WatchEvent) -> String {
    match event {
        WatchEvent::Message {
            tag,
            from,
            size,
            status,
            handler,
            ..
        } => format!(
            "message {tag} from {from} ({size} bytes): {status}{}",
            handler
                .as_ref()
                .map(|h| format!(" ({h})"))
                .unwrap_or_default()
        ),
        WatchEvent::Sent {
            tag,
            recipients,
            size,
            ..
        } => format!(
            "sent {tag} ({size} bytes) to {}",
            recipients
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        WatchEvent::Peer {
            name, status, via, ..
        } => match via {
            Some(via) => format!("peer {name} is {} via {via}", status.as_str()),
            None => format!("peer {name} is {}", status.as_str()),
        },
        WatchEvent::Delivered { id, tag, to, .. } => format!("delivered {tag} {id} to {to}"),
        WatchEvent::Handled {
            id,
            tag,
            by,
            status,
            exit_code,
            error,
            ..
        } => {
            let mut line = format!("handled {tag} {id} on {by}: {status}");
            if let Some(code) = exit_code {
                line.push_str(&format!(" (exit {code})"));
            }
            if let Some(error) = error {
                line.push_str(&format!(": {error}"));
            }
            line
        }
        WatchEvent::Expired { id, tag, missed } => {
            format!("expired {tag} {id} before reaching {}", names(missed))
        }
        WatchEvent::Lagged { missed } => format!("(missed {missed} events: too slow to keep up)"),
        WatchEvent::Store {
            key,
            deleted,
            writer,
        } => match deleted {
            true => format!("store {key:?} deleted by {writer}"),
            false => format!("store {key:?} set by {writer}"),
        },
        WatchEvent::JoinRefused {
            id,
            address,
            reason,
        } => format!("refused device {id} at {address} joining: invitation {reason}"),
        WatchEvent::Member {
            name,
            id,
            state,
            by,
            ..
        } => match state {
            cnsprcy::wire::MemberState::Active => format!("member {name} ({id}) added by {by}"),
            state => format!("member {name} ({id}) {} by {by}", state.as_str()),
        },
        WatchEvent::JoinCandidate {
            name,
            id,
            addresses,
        } => format!(
            "device {name} ({id}) waits to be paired at {}",
            addresses
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        WatchEvent::PairingRequest {
            name,
            id,
            address,
            accepted,
        } => match accepted {
            true => format!("member {name} ({id}) at {address} inducts this device"),
            false => format!(
                "turned away {name} ({id}) at {address}: not the inductor this device expects"
            ),
        },
    }
}

/// `cnspr messages`: the outbox, then recent outcomes.
pub async fn list(env: &DeviceEnv, as_json: bool) -> anyhow::Result<ExitCode> {
    let value = match call_with_timeout(env, "messages", json!({}), Duration::from_secs(10)).await {
        Ok(value) => value,
        Err(CallError::NotRunning(e)) => return not_running(env, e, as_json),
        Err(CallError::Other(e)) => return Err(e),
    };
    if as_json {
        print_json(&value)?;
        return Ok(ExitCode::SUCCESS);
    }
    let info: MessagesInfo = serde_json::from_value(value)
        .context("the daemon's answer to `messages` is not understood")?;
    if info.outbox.is_empty() {
        println!("outbox: empty");
    } else {
        println!("outbox ({} waiting):", info.outbox.len());
        for message in &info.outbox {
            println!(
                "  {} {} ({} bytes), sent {}, expires {}, waiting for {}",
                message.id,
                message.tag,
                message.size,
                message.sent,
                message.expires,
                names(&message.waiting_for)
            );
        }
    }
    if !info.handling.is_empty() {
        println!("handling here ({}):", info.handling.len());
        for message in &info.handling {
            let state = match message.state.as_str() {
                "handed over" => "waiting for its turn in the handler service".to_owned(),
                "retrying" => format!(
                    "the handler service could not start it ({} tries); trying again every 5 s",
                    message.failed_attempts
                ),
                other => other.to_owned(),
            };
            println!(
                "  {} {} from {} ({} bytes): {state}",
                message.id, message.tag, message.from, message.size
            );
        }
    }
    if info.recent.is_empty() {
        println!("recent: none");
    } else {
        println!("recent:");
        for outcome in &info.recent {
            println!("  {}  {}", outcome.time, describe(&outcome.event));
        }
    }
    Ok(ExitCode::SUCCESS)
}
