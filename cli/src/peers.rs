//! The commands about other devices: `peers`, `ping`, `reconnect`, `manage add|remove`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use cnsprcy::api::{MemberInfo, PeerInfo, PeerStatus, PingResult, RetryResult};
use cnsprcy::env::DeviceEnv;
use cnsprcy::identity::{DeviceName, PublicKey};
use cnsprcy_mesh::core::code;
use serde_json::{Value, json};

use crate::commands::{
    CallError, api_error_code, call, call_with_timeout, not_running, print_json, table,
};

/// Runs `call`, turning "not running" into its exit.
macro_rules! call_or_exit {
    ($env:expr, $json:expr, $call:expr) => {
        match $call.await {
            Ok(value) => value,
            Err(CallError::NotRunning(e)) => return not_running($env, e, $json),
            Err(CallError::Other(e)) => return Err(e),
        }
    };
}
pub(crate) use call_or_exit;

pub async fn list(env: &DeviceEnv, name: Option<&str>, as_json: bool) -> anyhow::Result<ExitCode> {
    let value = match name {
        Some(name) => call_or_exit!(env, as_json, call(env, "peer", json!({ "name": name }))),
        None => call_or_exit!(env, as_json, call(env, "peers", Value::Null)),
    };
    if as_json {
        print_json(&value)?;
        return Ok(ExitCode::SUCCESS);
    }
    let peers: Vec<PeerInfo> = if name.is_some() {
        vec![serde_json::from_value(value)?]
    } else {
        serde_json::from_value(value)?
    };
    if peers.is_empty() {
        println!(
            "No members yet. On a member of a mesh, `cnspr manage invite` makes a code that\n\
             `cnspr manage join CODE` here uses to join; or run `cnspr manage invite` here and\n\
             join from another device."
        );
    } else {
        print!("{}", format_table(&peers, SystemTime::now()));
        print!("{}", format_reasons(&peers));
    }
    Ok(ExitCode::SUCCESS)
}

fn format_table(peers: &[PeerInfo], now: SystemTime) -> String {
    let header = ["NAME", "ID", "STATUS", "LATENCY", "ADDRESS", "LAST SEEN"].map(String::from);
    let mut rows = vec![header];
    let ids = pasteable_ids(peers);
    for (peer, id) in peers.iter().zip(ids) {
        let address = match (&peer.via, peer.addresses.first()) {
            (Some(via), _) => format!("via {via}"),
            (None, Some(addr)) => addr.to_string(),
            (None, None) => "-".into(),
        };
        let last_seen = match (peer.status, &peer.last_seen) {
            (PeerStatus::Direct | PeerStatus::Relayed, _) => "now".into(),
            // Suspect: when its last frame came, which is what makes it suspect.
            (_, Some(seen)) => ago(seen, now),
            (_, None) => "never".into(),
        };
        rows.push([
            peer.name.to_string(),
            id,
            peer.status.as_str().into(),
            peer.rtt_ms.map(format_ms).unwrap_or_else(|| "-".into()),
            address,
            last_seen,
        ]);
    }
    table(&rows)
}

/// Why each member that is not direct is not, one line each under the table.
fn format_reasons(peers: &[PeerInfo]) -> String {
    peers
        .iter()
        .filter_map(|p| Some(format!("{}: {}\n", p.name, p.reason.as_deref()?)))
        .collect()
}

/// Each peer's ID cut to the shortest start, at least 4 characters, that names that peer alone
/// among `peers`, so that it can be pasted back where a member is named (`ping`, `send --to`,
/// `peers NAME`). It is lengthened where it would equal a member's name, which wins over an ID.
/// With one peer (`peers NAME`) the others are unknown: the full ID.
fn pasteable_ids(peers: &[PeerInfo]) -> Vec<String> {
    let full: Vec<String> = peers.iter().map(|p| p.id.to_string()).collect();
    if peers.len() == 1 {
        return full;
    }
    let bare: Vec<String> = full.iter().map(|id| id.replace('-', "")).collect();
    full.iter()
        .zip(&bare)
        .enumerate()
        .map(|(i, (dashed, own))| {
            let unique = |len: usize| {
                let start = &own[..len];
                let shown = shown_prefix(dashed, len);
                bare.iter()
                    .enumerate()
                    .all(|(j, other)| j == i || !other.starts_with(start))
                    && peers.iter().all(|p| p.name.as_str() != shown)
            };
            let len = (4..own.len()).find(|&len| unique(len)).unwrap_or(own.len());
            shown_prefix(dashed, len).to_owned()
        })
        .collect()
}

/// The start of a dashed ID (`wdzc-1qcf-…`) that holds `len` of its characters.
fn shown_prefix(dashed: &str, len: usize) -> &str {
    // A dash after every 4 characters.
    let end = len + len.saturating_sub(1) / 4;
    &dashed[..end.min(dashed.len())]
}

fn format_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// "3 h ago" from an RFC 3339 time.
fn ago(rfc3339: &str, now: SystemTime) -> String {
    let Ok(then) = humantime::parse_rfc3339(rfc3339) else {
        return rfc3339.to_owned();
    };
    let secs = now.duration_since(then).unwrap_or_default().as_secs();
    match secs {
        s if s < 60 => format!("{s} s ago"),
        s if s < 3600 => format!("{} min ago", s / 60),
        s if s < 86400 => format!("{} h ago", s / 3600),
        s => format!("{} d ago", s / 86400),
    }
}

pub async fn ping(
    env: &DeviceEnv,
    name: &str,
    count: u32,
    timeout: Duration,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let timeout_ms = timeout.as_millis().clamp(1, 60_000) as u64;
    let mut rounds = Vec::new();
    let mut rtts = Vec::new();
    // As ping(8): Ctrl-C ends the rounds, and the summary covers those that finished.
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    for round in 0..count {
        let one_round = async {
            if round > 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let params = json!({ "name": name, "timeout_ms": timeout_ms });
            call_with_timeout(env, "ping", params, timeout + Duration::from_secs(5)).await
        };
        let answer = tokio::select! {
            answer = one_round => answer,
            _ = &mut interrupted => break,
        };
        match answer {
            Ok(value) => {
                let pong: PingResult = serde_json::from_value(value.clone())?;
                if !as_json {
                    println!("{}", describe_pong(&pong));
                }
                rtts.push(pong.rtt_ms);
                rounds.push(value);
            }
            Err(CallError::NotRunning(e)) => return not_running(env, e, as_json),
            // A lost round (no path, no pong, or no answer in time) is worth another; an error
            // the daemon answered otherwise (no such member, a bad parameter) would come again
            // every second.
            Err(CallError::Other(e))
                if api_error_code(&e).is_none_or(|answered| answered == code::UNREACHABLE) =>
            {
                if !as_json {
                    eprintln!("{e}");
                }
                rounds.push(json!({ "error": e.to_string() }));
            }
            Err(CallError::Other(e)) => return Err(e),
        }
    }
    let summary = PingSummary::new(rounds.len() as u32, &rtts);
    if as_json {
        print_json(&json!({ "rounds": rounds, "summary": summary }))?;
    } else {
        println!("{}", summary.describe());
    }
    Ok(if rtts.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// What `ping` prints after its rounds, as ping(8) does.
#[derive(Debug, PartialEq, serde::Serialize)]
struct PingSummary {
    sent: u32,
    lost: u32,
    /// Lost rounds in percent of those sent, rounded to a whole number.
    loss_percent: u32,
    /// Over the rounds that got a pong; `null` when none did.
    rtt_min_ms: Option<f64>,
    rtt_avg_ms: Option<f64>,
    rtt_max_ms: Option<f64>,
}

impl PingSummary {
    fn new(sent: u32, rtts: &[f64]) -> Self {
        let received = rtts.len() as u32;
        let lost = sent.saturating_sub(received);
        let loss_percent = if sent == 0 {
            0
        } else {
            (f64::from(lost) * 100.0 / f64::from(sent)).round() as u32
        };
        let round3 = |ms: f64| (ms * 1000.0).round() / 1000.0;
        let (min, max, avg) = if rtts.is_empty() {
            (None, None, None)
        } else {
            let min = rtts.iter().copied().fold(f64::INFINITY, f64::min);
            let max = rtts.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let avg = rtts.iter().sum::<f64>() / rtts.len() as f64;
            (Some(round3(min)), Some(round3(max)), Some(round3(avg)))
        };
        Self {
            sent,
            lost,
            loss_percent,
            rtt_min_ms: min,
            rtt_avg_ms: avg,
            rtt_max_ms: max,
        }
    }

    fn describe(&self) -> String {
        let counts = format!(
            "{} sent, {} lost ({}%)",
            self.sent, self.lost, self.loss_percent
        );
        match (self.rtt_min_ms, self.rtt_avg_ms, self.rtt_max_ms) {
            (Some(min), Some(avg), Some(max)) => {
                format!("{counts}, rtt min/avg/max = {min:.3}/{avg:.3}/{max:.3} ms")
            }
            _ => counts,
        }
    }
}

fn describe_pong(pong: &PingResult) -> String {
    let path = match (&pong.via, pong.address) {
        (Some(via), _) => format!("via {via} (relayed)"),
        (None, Some(addr)) => format!("via {addr}"),
        (None, None) => "direct".into(),
    };
    format!(
        "pong from {} ({}) {path} in {}",
        pong.name,
        pong.id,
        format_ms(pong.rtt_ms)
    )
}

pub async fn reconnect(env: &DeviceEnv, as_json: bool) -> anyhow::Result<ExitCode> {
    let value = call_or_exit!(env, as_json, call(env, "retry", Value::Null));
    if as_json {
        print_json(&value)?;
        return Ok(ExitCode::SUCCESS);
    }
    let result: RetryResult = serde_json::from_value(value)?;
    print!("{}", describe_retry(&result));
    Ok(ExitCode::SUCCESS)
}

fn describe_retry(result: &RetryResult) -> String {
    let mut text = format!(
        "dialling {} member(s) without a session now\n",
        result.dialling
    );
    for member in &result.no_address {
        text.push_str(&format!(
            "{name}: no address known yet (not seen by discovery on this network); to give one: \
             cnspr manage add {name} {key} ADDRESS\n",
            name = member.name,
            key = member.public_key,
        ));
    }
    text
}

pub async fn add(
    env: &DeviceEnv,
    name: DeviceName,
    public_key: PublicKey,
    addresses: Vec<SocketAddr>,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let params = json!({ "name": name, "public_key": public_key, "addresses": addresses });
    let value = call_or_exit!(env, as_json, call(env, "members.add", params));
    print_member("added", value, as_json)
}

pub async fn remove(env: &DeviceEnv, name: &str, as_json: bool) -> anyhow::Result<ExitCode> {
    let value = call_or_exit!(
        env,
        as_json,
        call(env, "members.remove", json!({ "name": name }))
    );
    print_member("removed", value, as_json)
}

fn print_member(verb: &str, value: Value, as_json: bool) -> anyhow::Result<ExitCode> {
    if as_json {
        print_json(&value)?;
    } else {
        let member: MemberInfo = serde_json::from_value(value)?;
        println!("{verb} member {} ({})", member.name, member.id);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnsprcy::identity::Identity;

    #[test]
    fn table_matches_the_documented_shape() {
        let now = humantime::parse_rfc3339("2026-01-01T12:00:00Z").unwrap();
        let peer =
            |name: &str, seed: u8, status, latency, via: Option<&str>, seen: Option<&str>| {
                let key = Identity::from_secret([seed; 32]).public_key();
                PeerInfo {
                    name: DeviceName::new(name).unwrap(),
                    id: key.device_id(),
                    public_key: key,
                    status,
                    addresses: vec!["192.168.1.20:7332".parse().unwrap()],
                    rtt_ms: latency,
                    via: via.map(|v| DeviceName::new(v).unwrap()),
                    last_seen: seen.map(String::from),
                    reason: None,
                    reason_code: None,
                }
            };
        let table = format_table(
            &[
                peer("laptop", 1, PeerStatus::Direct, Some(0.8), None, None),
                peer(
                    "phone",
                    2,
                    PeerStatus::Relayed,
                    Some(14.2),
                    Some("laptop"),
                    None,
                ),
                peer(
                    "tv-box",
                    3,
                    PeerStatus::Unreachable,
                    None,
                    None,
                    Some("2026-01-01T09:00:00Z"),
                ),
            ],
            now,
        );
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("NAME    ID"), "{table}");
        assert!(
            lines[1].contains("direct") && lines[1].contains("0.8 ms") && lines[1].ends_with("now")
        );
        assert!(lines[2].contains("via laptop") && lines[2].contains("14 ms"));
        assert!(
            lines[3].contains("unreachable") && lines[3].ends_with("3 h ago"),
            "{table}"
        );
    }

    #[test]
    fn ids_are_cut_to_what_names_one_peer_alone() {
        let peer = |name: &str, id: &str| {
            let key = Identity::from_secret([name.len() as u8; 32]).public_key();
            PeerInfo {
                name: DeviceName::new(name).unwrap(),
                id: id.parse().unwrap(),
                public_key: key,
                status: PeerStatus::Unreachable,
                addresses: Vec::new(),
                rtt_ms: None,
                via: None,
                last_seen: None,
                reason: None,
                reason_code: None,
            }
        };
        let peers = [
            peer("desk", "1tek-9fhz-5fej-yjfe"),
            peer("phone", "wdzc-1qcf-4dxn-aa05"),
            peer("tablet", "wdzc-1qxx-4dxn-aa05"),
            peer("tv", "wdzd-1qcf-4dxn-aa05"),
            // A member named as another's ID start: that start would name this one instead.
            peer("4824", "7777-kbza-went-gxqh"),
            peer("box", "4824-kbza-went-gxqh"),
        ];
        assert_eq!(
            pasteable_ids(&peers),
            ["1tek", "wdzc-1qc", "wdzc-1qx", "wdzd", "7777", "4824-k"]
        );
        // One peer alone: the others are unknown, so the whole ID.
        assert_eq!(pasteable_ids(&peers[..1]), ["1tek-9fhz-5fej-yjfe"]);
        assert_eq!(
            shown_prefix("1tek-9fhz-5fej-yjfe", 16),
            "1tek-9fhz-5fej-yjfe"
        );
        assert_eq!(shown_prefix("1tek-9fhz-5fej-yjfe", 8), "1tek-9fhz");
    }

    #[test]
    fn ping_summary_counts_like_ping8() {
        let summary = PingSummary::new(3, &[0.4, 0.6, 2.7]);
        assert_eq!(
            summary.describe(),
            "3 sent, 0 lost (0%), rtt min/avg/max = 0.400/1.233/2.700 ms"
        );
        let summary = PingSummary::new(3, &[1.0]);
        assert_eq!((summary.lost, summary.loss_percent), (2, 67));
        let all_lost = PingSummary::new(2, &[]);
        assert_eq!(all_lost.describe(), "2 sent, 2 lost (100%)");
        let json = serde_json::to_value(&all_lost).unwrap();
        assert_eq!(json["rtt_avg_ms"], Value::Null);
        assert_eq!(json["sent"], 2);
    }
}
