//! The public API's methods. `docs/api.md` documents each with examples.

use std::net::SocketAddr;
use std::time::Duration;

use cnsprcy::api::{
    InterfaceStatus, MAX_PING_TIMEOUT_MS, MAX_TTL_MS, MAX_WAIT_MS, MIN_TTL_MS, ServiceState,
    ServiceStatus, Status,
};
use cnsprcy::identity::{DeviceName, PublicKey};
use cnsprcy::ipc::ServiceKind;
use cnsprcy::netif::InterfaceFilter;
use cnsprcy::rpc::{self, Methods, RpcError};
use serde::Deserialize;
use serde_json::Value;

use base64::Engine;
use tokio::sync::mpsc;

use crate::Mesh;
use crate::core::{Answer, ApiCall, SendRequest};
use crate::roster::{MAX_ADDRESSES, Member};
use cnsprcy::wire::MemberState;

/// `ping` waits this long for the pong unless told otherwise.
const DEFAULT_PING_TIMEOUT_MS: u64 = 5000;

pub struct Api<'a> {
    pub mesh: &'a Mesh,
    /// This connection's number in `Mesh::connections`.
    pub connection: u64,
    /// Notification lines a call sends while it runs (`send.reply` of a streaming `send`).
    pub notes: mpsc::UnboundedSender<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

/// A member named by name or device ID (or the unambiguous start of one).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameParams {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InviteParams {
    /// How long the invitation stays valid; 15 minutes when absent.
    #[serde(default)]
    expires_ms: Option<u64>,
}

/// The default lifetime of an invitation.
const DEFAULT_INVITATION_MS: u64 = 15 * 60 * 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinParams {
    code: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PairWaitParams {
    /// Only the member with this device ID may induct this device.
    #[serde(default)]
    expect_inductor: Option<String>,
    /// How long to wait for an inductor; 10 minutes when absent.
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// `pair_wait` waits this long for an inductor unless told otherwise.
const DEFAULT_PAIR_WAIT_MS: u64 = 10 * 60 * 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CandidatesParams {
    /// Answer at once when more than this many devices are listed.
    #[serde(default)]
    known: usize,
    /// Otherwise wait this long for another one.
    #[serde(default)]
    wait_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InductParams {
    /// A device ID (as `members.candidates` lists it) or a public key.
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfirmParams {
    accept: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaveParams {
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PingParams {
    name: String,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendParams {
    tag: String,
    /// Member names or IDs; absent: every member.
    #[serde(default)]
    to: Option<Vec<String>>,
    /// The payload in base64 (binary-safe).
    #[serde(default)]
    payload: Option<String>,
    /// The payload as text, for scripts that send text (instead of `payload`).
    #[serde(default)]
    payload_text: Option<String>,
    #[serde(default)]
    wait: bool,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    ttl_ms: Option<u64>,
    /// With `wait`: send each reply as a `send.reply` notification as it arrives, and leave
    /// `replies` out of the result (large replies from many devices then never meet in one line).
    #[serde(default)]
    stream: bool,
    /// With `to` left out: this device runs its handler too.
    #[serde(default)]
    include_self: bool,
}

/// `send --wait` waits this long unless told otherwise.
const DEFAULT_WAIT_MS: u64 = 10_000;

fn send_request(params: SendParams) -> Result<SendRequest, RpcError> {
    cnsprcy::tag::validate_tag(&params.tag).map_err(RpcError::invalid_params)?;
    let payload = match (params.payload, params.payload_text) {
        (Some(_), Some(_)) => {
            return Err(RpcError::invalid_params(
                "give either payload (base64) or payload_text, not both",
            ));
        }
        (Some(b64), None) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| RpcError::invalid_params(format!("payload is not base64: {e}")))?,
        (None, Some(text)) => text.into_bytes(),
        (None, None) => Vec::new(),
    };
    let wait_ms = params.timeout_ms.unwrap_or(DEFAULT_WAIT_MS);
    if params.wait && (wait_ms == 0 || wait_ms > MAX_WAIT_MS) {
        return Err(RpcError::invalid_params(format!(
            "timeout_ms must be between 1 and {MAX_WAIT_MS}"
        )));
    }
    let ttl_ms = params
        .ttl_ms
        .unwrap_or(crate::core::DEFAULT_TTL.as_millis() as u64);
    if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&ttl_ms) {
        return Err(RpcError::invalid_params(format!(
            "ttl_ms must be between {MIN_TTL_MS} and {MAX_TTL_MS} (100 ms to 30 days)"
        )));
    }
    if params.stream && !params.wait {
        return Err(RpcError::invalid_params(
            "stream applies to a send that waits: give wait: true too",
        ));
    }
    if let Some(to) = &params.to
        && to.is_empty()
    {
        return Err(RpcError::invalid_params(
            "\"to\" is empty; leave it out to send to every member",
        ));
    }
    Ok(SendRequest {
        tag: params.tag,
        to: params.to,
        payload,
        wait: params.wait.then(|| Duration::from_millis(wait_ms)),
        ttl: Duration::from_millis(ttl_ms),
        stream: params.stream,
        include_self: params.include_self,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddParams {
    name: DeviceName,
    public_key: PublicKey,
    #[serde(default, deserialize_with = "cnsprcy::address::deserialize_list")]
    addresses: Vec<SocketAddr>,
}

/// The addresses `members.add` accepts: at most `MAX_ADDRESSES` (the roster keeps no more),
/// each one a device could listen on, without repeats.
fn member_addresses(addresses: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, RpcError> {
    let mut kept: Vec<SocketAddr> = Vec::new();
    for addr in addresses {
        if addr.ip().is_unspecified() || addr.ip().is_multicast() || addr.port() == 0 {
            return Err(RpcError::invalid_params(format!(
                "{addr} cannot be dialled: give the address and port the member listens on, such as 192.168.1.20:7332"
            )));
        }
        if !kept.contains(&addr) {
            kept.push(addr);
        }
    }
    if kept.len() > MAX_ADDRESSES {
        return Err(RpcError::invalid_params(format!(
            "{} addresses given; a member has at most {MAX_ADDRESSES}: give those it is most likely reached at (it announces the rest itself once connected)",
            kept.len()
        )));
    }
    Ok(kept)
}

fn to_value<T: serde::Serialize>(value: T) -> Result<Value, RpcError> {
    serde_json::to_value(value).map_err(|e| RpcError::internal(e.to_string()))
}

impl Methods for Api<'_> {
    fn names(&self) -> &[&'static str] {
        &[
            "status",
            "peers",
            "peer",
            "ping",
            "members.add",
            "members.remove",
            "members.disable",
            "members.revoke",
            "members.leave",
            "members.invite",
            "members.join",
            "members.cancel_join",
            "members.pair_wait",
            "members.candidates",
            "members.induct",
            "members.pair_confirm",
            "members.pair_cancel",
            "members.list",
            "retry",
            "send",
            "messages",
            "subscribe",
            "db.set",
            "db.get",
            "db.del",
            "db.list",
            "db.stats",
        ]
    }

    async fn call(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        match method {
            "status" => {
                rpc::params::<NoParams>(params)?;
                to_value(self.status().await)
            }
            "peers" => {
                rpc::params::<NoParams>(params)?;
                match self.mesh.node.call(ApiCall::Peers).await? {
                    Answer::Peers(peers) => to_value(peers),
                    other => Err(unexpected(other)),
                }
            }
            "peer" => {
                let NameParams { name } = rpc::params(params)?;
                match self.mesh.node.call(ApiCall::Peer { name }).await? {
                    Answer::Peer(peer) => to_value(peer?),
                    other => Err(unexpected(other)),
                }
            }
            "ping" => {
                let PingParams { name, timeout_ms } = rpc::params(params)?;
                let timeout_ms = timeout_ms.unwrap_or(DEFAULT_PING_TIMEOUT_MS);
                if timeout_ms == 0 || timeout_ms > MAX_PING_TIMEOUT_MS {
                    return Err(RpcError::invalid_params(format!(
                        "invalid params: timeout_ms must be between 1 and {MAX_PING_TIMEOUT_MS}"
                    )));
                }
                let timeout = Duration::from_millis(timeout_ms);
                match self.mesh.node.call(ApiCall::Ping { name, timeout }).await? {
                    Answer::Ping(pong) => to_value(pong?),
                    other => Err(unexpected(other)),
                }
            }
            "members.add" => {
                let AddParams {
                    name,
                    public_key,
                    addresses,
                } = rpc::params(params)?;
                let member = Member::new(name, public_key, member_addresses(addresses)?);
                match self.mesh.node.call(ApiCall::AddMember(member)).await? {
                    Answer::Member(member) => to_value(member?),
                    other => Err(unexpected(other)),
                }
            }
            "members.remove" | "members.disable" | "members.revoke" => {
                let NameParams { name } = rpc::params(params)?;
                let state = match method {
                    "members.revoke" => MemberState::Revoked,
                    _ => MemberState::Disabled,
                };
                let removed = match self
                    .mesh
                    .node
                    .call(ApiCall::RemoveMember { name, state })
                    .await?
                {
                    Answer::Removed(removed) => removed?,
                    other => return Err(unexpected(other)),
                };
                let member = crate::core::member_info(&removed.member);
                if method == "members.revoke" {
                    let kept: Vec<_> = removed.kept.iter().map(crate::core::member_info).collect();
                    Ok(serde_json::json!({ "member": member, "kept": kept }))
                } else {
                    to_value(member)
                }
            }
            "members.leave" => {
                let LeaveParams { force } = rpc::params(params)?;
                match self.mesh.node.call(ApiCall::Leave { force }).await? {
                    Answer::Left(told) => Ok(serde_json::json!({ "told": told? })),
                    other => Err(unexpected(other)),
                }
            }
            "members.invite" => {
                let InviteParams { expires_ms } = rpc::params(params)?;
                let expires_ms = expires_ms.unwrap_or(DEFAULT_INVITATION_MS);
                let max = crate::core::MAX_INVITATION_LIFETIME.as_millis() as u64;
                if expires_ms == 0 || expires_ms > max {
                    return Err(RpcError::invalid_params(format!(
                        "invalid params: expires_ms must be between 1 and {max} (7 days)"
                    )));
                }
                let lifetime = Duration::from_millis(expires_ms);
                let invited = match self.mesh.node.call(ApiCall::Invite { lifetime }).await? {
                    Answer::Invited(invited) => invited,
                    other => return Err(unexpected(other)),
                };
                let invitation = cnsprcy::invitation::Invitation {
                    inviter: self.mesh.node.identity.public_key(),
                    secret: invited.secret,
                    addresses: invited.addresses.clone(),
                };
                let expires = std::time::UNIX_EPOCH + Duration::from_millis(invited.expires_ms);
                Ok(serde_json::json!({
                    "code": invitation.encode(),
                    "expires": humantime::format_rfc3339_seconds(expires).to_string(),
                    "addresses": invited.addresses,
                }))
            }
            "members.list" => {
                rpc::params::<NoParams>(params)?;
                match self.mesh.node.call(ApiCall::Roster).await? {
                    Answer::Roster(roster) => to_value(roster),
                    other => Err(unexpected(other)),
                }
            }
            "members.cancel_join" => {
                rpc::params::<NoParams>(params)?;
                match self.mesh.node.call(ApiCall::CancelJoin).await? {
                    Answer::JoinCancelled(cancelled) => {
                        Ok(serde_json::json!({ "cancelled": cancelled }))
                    }
                    other => Err(unexpected(other)),
                }
            }
            "members.pair_wait" => {
                let PairWaitParams {
                    expect_inductor,
                    timeout_ms,
                } = rpc::params(params)?;
                let expect = expect_inductor
                    .map(|id| id.parse::<cnsprcy::identity::DeviceId>())
                    .transpose()
                    .map_err(|e| RpcError::invalid_params(e.to_string()))?;
                let timeout_ms = timeout_ms.unwrap_or(DEFAULT_PAIR_WAIT_MS);
                let max = crate::pairing::MAX_WAIT.as_millis() as u64;
                if timeout_ms == 0 || timeout_ms > max {
                    return Err(RpcError::invalid_params(format!(
                        "invalid params: timeout_ms must be between 1 and {max} (1 hour)"
                    )));
                }
                self.discovery_for_pairing()?;
                let coded = self
                    .mesh
                    .node
                    .pairing
                    .wait_for_inductor(&self.mesh.node, expect, Duration::from_millis(timeout_ms))
                    .await?;
                Ok(coded_value(&coded, "inductor"))
            }
            "members.candidates" => {
                let CandidatesParams { known, wait_ms } = rpc::params(params)?;
                self.discovery_for_pairing()?;
                let wait = Duration::from_millis(wait_ms.min(MAX_WAIT_MS));
                let candidates = self
                    .mesh
                    .node
                    .pairing
                    .candidates(&self.mesh.node, known, wait)
                    .await;
                let listed: Vec<Value> = candidates
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "name": c.name,
                            "id": c.key.device_id(),
                            "key": c.key.to_string(),
                            "addresses": c.addresses,
                        })
                    })
                    .collect();
                Ok(serde_json::json!({ "candidates": listed }))
            }
            "members.induct" => {
                let InductParams { id } = rpc::params(params)?;
                self.discovery_for_pairing()?;
                let key = match id.parse::<PublicKey>() {
                    Ok(key) => key,
                    Err(_) => {
                        let id = id
                            .parse::<cnsprcy::identity::DeviceId>()
                            .map_err(|e| RpcError::invalid_params(e.to_string()))?;
                        match self.mesh.node.pairing.candidate_key(&id) {
                            Some(key) => key,
                            None => {
                                return Err(RpcError::new(
                                    crate::core::code::NOT_FOUND,
                                    format!(
                                        "no device {id} waits to be paired on the local network; run `cnspr manage join` (without a code) on it first"
                                    ),
                                ));
                            }
                        }
                    }
                };
                let coded = self.mesh.node.pairing.induct(&self.mesh.node, key).await?;
                Ok(coded_value(&coded, "joiner"))
            }
            "members.pair_confirm" => {
                let ConfirmParams { accept } = rpc::params(params)?;
                match self
                    .mesh
                    .node
                    .pairing
                    .confirm(&self.mesh.node, accept)
                    .await?
                {
                    crate::pairing::Confirmed::Joined(joined) => Ok(joined_value(&joined)),
                    crate::pairing::Confirmed::Inducted { name, id } => {
                        Ok(serde_json::json!({ "added": { "name": name, "id": id } }))
                    }
                }
            }
            "members.pair_cancel" => {
                rpc::params::<NoParams>(params)?;
                let pairing = self.mesh.node.pairing.cancel();
                // A confirmed pairing may be joining already: that ends too.
                let join = match self.mesh.node.call(ApiCall::CancelJoin).await? {
                    Answer::JoinCancelled(cancelled) => cancelled,
                    other => return Err(unexpected(other)),
                };
                Ok(serde_json::json!({ "cancelled": pairing || join }))
            }
            "members.join" => {
                let JoinParams { code } = rpc::params(params)?;
                let invitation = cnsprcy::invitation::Invitation::parse(&code)
                    .map_err(|e| RpcError::invalid_params(e.to_string()))?;
                match self.mesh.node.call(ApiCall::Join(invitation)).await? {
                    Answer::Joined(joined) => Ok(joined_value(&joined?)),
                    other => Err(unexpected(other)),
                }
            }
            "send" => {
                let send = send_request(rpc::params(params)?)?;
                if !send.stream {
                    return match self.mesh.node.call(ApiCall::Send(send)).await? {
                        Answer::Send(sent) => to_value(sent?),
                        other => Err(unexpected(other)),
                    };
                }
                let (progress, mut replies) = mpsc::unbounded_channel();
                let answer = self
                    .mesh
                    .node
                    .call_with_progress(ApiCall::Send(send), Some(progress));
                tokio::pin!(answer);
                let answer = loop {
                    tokio::select! {
                        answer = &mut answer => break answer,
                        Some(reply) = replies.recv() => self.notify("send.reply", &reply),
                    }
                };
                while let Ok(reply) = replies.try_recv() {
                    self.notify("send.reply", &reply);
                }
                match answer? {
                    Answer::Send(sent) => to_value(sent?),
                    other => Err(unexpected(other)),
                }
            }
            "messages" => {
                rpc::params::<NoParams>(params)?;
                match self.mesh.node.call(ApiCall::Messages).await? {
                    Answer::Messages(info) => to_value(info),
                    other => Err(unexpected(other)),
                }
            }
            "subscribe" => {
                rpc::params::<NoParams>(params)?;
                if !self.mesh.connections.subscribe(self.connection) {
                    return Err(RpcError::new(
                        rpc::code::UNAVAILABLE,
                        format!(
                            "{} clients are subscribed already, the most there may be; close one (`cnspr watch` in another terminal?) and try again",
                            crate::api_conn::MAX_SUBSCRIBERS
                        ),
                    ));
                }
                Ok(serde_json::json!({ "subscribed": true }))
            }
            "retry" => {
                rpc::params::<NoParams>(params)?;
                match self.mesh.node.call(ApiCall::Retry).await? {
                    Answer::Retry(outcome) => to_value(cnsprcy::api::RetryResult {
                        dialling: outcome.dialling,
                        no_address: outcome
                            .no_address
                            .iter()
                            .map(crate::core::member_info)
                            .collect(),
                    }),
                    other => Err(unexpected(other)),
                }
            }
            db if crate::store::rpc::METHODS.contains(&db) => {
                crate::store::rpc::call(self.mesh, db, params).await
            }
            other => Err(RpcError::internal(format!(
                "method {other:?} has no handler"
            ))),
        }
    }
}

/// The core answered a call with another call's answer: a bug, said as such.
pub(crate) fn unexpected(answer: Answer) -> RpcError {
    RpcError::internal(format!("unexpected answer from the mesh: {answer:?}"))
}

/// What `members.join` answers, and `members.pair_confirm` on the joining device.
fn joined_value(joined: &crate::core::Joined) -> Value {
    serde_json::json!({
        "inviter": crate::core::member_info(&joined.inviter),
        "members": joined.members,
    })
}

/// A pairing step that got as far as the code, as `pair_wait` and `induct` answer it.
fn coded_value(coded: &crate::pairing::Coded, peer: &str) -> Value {
    serde_json::json!({
        "code": crate::pairing::format_code(coded.code),
        peer: { "name": coded.peer_name, "id": coded.peer_id },
    })
}

impl Api<'_> {
    /// Pairing on the local network needs the discovery service.
    fn discovery_for_pairing(&self) -> Result<(), RpcError> {
        if !self.mesh.env.config.discovery.enabled {
            return Err(RpcError::new(
                rpc::code::UNAVAILABLE,
                "discovery is off on this device ([discovery] enabled = false), and pairing on the local network needs it; pair with an invitation instead: `cnspr manage invite` on a member, `cnspr manage join CODE` on the new device",
            ));
        }
        if self.mesh.registry.get(ServiceKind::Discovery).is_none() {
            return Err(RpcError::new(
                rpc::code::UNAVAILABLE,
                "the discovery service is not running, and pairing on the local network needs it; `cnspr doctor` says why, or pair with an invitation (`cnspr manage invite`)",
            ));
        }
        Ok(())
    }

    /// Whether this connection subscribed to events.
    pub fn is_subscribed(&self) -> bool {
        self.mesh.connections.is_subscribed(self.connection)
    }

    /// Queues a notification for this connection; it goes out before the call's answer.
    fn notify(&self, method: &str, params: &impl serde::Serialize) {
        let note = serde_json::json!({"jsonrpc": "2.0", "method": method, "params": params});
        // The connection task reads these until the call is answered: it is there.
        let _ = self.notes.send(note.to_string());
    }

    async fn status(&self) -> Status {
        let mesh = self.mesh;
        let mut services = vec![ServiceStatus {
            name: ServiceKind::Mesh,
            state: ServiceState::Running,
            pid: Some(std::process::id()),
            detail: None,
        }];
        for kind in [ServiceKind::Netwatch, ServiceKind::Discovery] {
            services.push(match mesh.registry.get(kind) {
                Some(registration) => ServiceStatus {
                    name: kind,
                    state: ServiceState::Connected,
                    pid: Some(registration.pid),
                    detail: None,
                },
                None => ServiceStatus {
                    name: kind,
                    state: ServiceState::Disconnected,
                    pid: None,
                    detail: Some(format!(
                        "not registered; start it: `systemctl --user start {}`",
                        kind.unit_name()
                    )),
                },
            });
        }
        services.push(match mesh.handlers.ping().await {
            Ok(pid) => ServiceStatus {
                name: ServiceKind::Handlers,
                state: ServiceState::Connected,
                pid: Some(pid),
                detail: None,
            },
            Err(reason) => ServiceStatus {
                name: ServiceKind::Handlers,
                state: ServiceState::Disconnected,
                pid: None,
                detail: Some(reason),
            },
        });
        let interfaces = match self.mesh.node.call(ApiCall::Interfaces).await {
            Ok(Answer::Interfaces(interfaces)) => interfaces,
            _ => Vec::new(),
        };
        let knocks = match self.mesh.node.call(ApiCall::Knocks).await {
            Ok(Answer::Knocks(knocks)) => knocks,
            _ => Vec::new(),
        };
        let config = &mesh.env.config;
        let mesh_filter = mesh.node.interfaces.filter();
        let discovery_filter = config.discovery.enabled.then(|| {
            InterfaceFilter::discovery(&config.discovery.interfaces, &config.mesh.interfaces)
        });
        let mut absent = mesh_filter.missing(&interfaces);
        for name in discovery_filter
            .as_ref()
            .map(|f| f.missing(&interfaces))
            .unwrap_or_default()
        {
            if !absent.contains(&name) {
                absent.push(name);
            }
        }
        let interfaces = interfaces
            .into_iter()
            .map(|i| InterfaceStatus {
                mesh: mesh_filter.allows_interface(&i),
                discovery: discovery_filter
                    .as_ref()
                    .is_some_and(|f| f.allows_interface(&i)),
                name: i.name,
                up: i.up,
                loopback: i.loopback,
                addresses: i.addresses,
            })
            .collect();
        // Off the runtime's threads: the store's lock is held while it writes or recovers.
        let store = mesh.node.store.clone();
        let store = tokio::task::spawn_blocking(move || store.status())
            .await
            .ok();
        Status {
            name: mesh.name.clone(),
            id: mesh.identity.device_id(),
            public_key: mesh.identity.public_key(),
            version: cnsprcy::VERSION.to_owned(),
            pid: std::process::id(),
            uptime_secs: mesh.started.elapsed().as_secs(),
            listen: mesh.listening.clone(),
            socket: mesh.env.paths.public_socket(),
            services,
            interfaces,
            absent_interfaces: absent,
            store,
            knocks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_addresses_are_bounded_dialable_and_unique() {
        let addr = |i: u16| SocketAddr::from(([192, 168, 1, 20], 7000 + i));
        assert_eq!(
            member_addresses(vec![addr(1), addr(1), addr(2)]).unwrap(),
            vec![addr(1), addr(2)]
        );
        let many: Vec<SocketAddr> = (0..1000).map(addr).collect();
        let error = member_addresses(many).unwrap_err();
        assert!(error.message.contains("1000 addresses"), "{error}");
        assert!(member_addresses((0..8).map(addr).collect()).is_ok());
        for bad in ["0.0.0.0:7332", "192.168.1.20:0", "[ff02::1]:7332"] {
            let error = member_addresses(vec![bad.parse().unwrap()]).unwrap_err();
            assert!(
                error.message.contains("cannot be dialled"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn ttl_has_the_configuration_files_floor_of_100_ms() {
        let params = |ttl_ms: u64| -> SendParams {
            serde_json::from_value(serde_json::json!({"tag": "notify", "ttl_ms": ttl_ms})).unwrap()
        };
        for bad in [0, 5, 99, MAX_TTL_MS + 1] {
            let error = send_request(params(bad)).map(|_| ()).unwrap_err();
            assert_eq!(
                error.message,
                "ttl_ms must be between 100 and 2592000000 (100 ms to 30 days)"
            );
        }
        for good in [100, 60_000, MAX_TTL_MS] {
            assert_eq!(
                send_request(params(good)).unwrap().ttl,
                Duration::from_millis(good)
            );
        }
    }
}
