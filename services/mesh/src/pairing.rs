//! Pairing on the local network, with a code shown on both screens (numeric comparison, as
//! Bluetooth does).
//!
//! The new device runs `cnspr manage join` without a code: it advertises itself over mDNS-SD
//! (`_cnsprcy-join._tcp`, its name and public key in TXT) and accepts one handshake from a
//! stranger that says it inducts. A member runs `cnspr manage induct`: it lists the devices
//! advertised, and dials the one the user picks with Noise IK, committing to a random nonce
//! in its first handshake message. The joiner answers with its own nonce, the inductor reveals
//! its own, and both derive a 6-digit code from the handshake hash and the two nonces. Once
//! the users confirm the code on both sides, the inductor makes a one-time invitation and
//! sends it over the pairing connection; the joiner joins with it as `cnspr manage join CODE`
//! would, so that the roster and the store arrive as they do for every join.
//!
//! The commitment is what makes a 6-digit code enough: a machine in the middle runs one
//! handshake with each side, and would need the two codes to match. It must fix its nonce
//! towards the joiner before it sees the joiner's, and towards the inductor before it sees the
//! inductor's, so it cannot search for nonces that make them match: it succeeds once in a
//! million tries, and every try is a pairing the users see fail.
//!
//! This is driver-side orchestration around user decisions; the membership rules stay in the
//! core (the invitation and the join are `ApiCall`s).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use blake2::{Blake2s256, Digest};
use cnsprcy::api::WatchEvent;
use cnsprcy::identity::{DeviceId, DeviceName, PublicKey};
use cnsprcy::invitation::Invitation;
use cnsprcy::ipc::{JoinAdvert, PairingDiscovery};
use cnsprcy::rpc::RpcError;
use cnsprcy::wire::{Inducting, MemberState, Message};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::core::{Answer, ApiCall, JOIN_TIMEOUT, Joined, code, error};
use crate::node::NodeHandle;
use crate::transport::{self, Session};

/// How long one side waits for the other's next pairing message (not for its user).
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a side waits for the other side's user to confirm, once its own user did.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a code shown waits for this side's user before the pairing is given up.
const DECIDE_TIMEOUT: Duration = Duration::from_secs(300);
/// Browsing for devices waiting to be paired stops this long after the last `candidates`
/// call (the inductor's CLI asks every few seconds while it lists them).
const BROWSE_LEASE: Duration = Duration::from_secs(30);
/// Devices waiting to be paired that one inductor lists at most.
const MAX_CANDIDATES: usize = 32;
/// The longest `manage join` (without a code) waits for an inductor.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What commits the inductor to `nonce` without showing it.
pub fn commitment(nonce: &[u8; 32]) -> [u8; 32] {
    let mut hasher = Blake2s256::new();
    hasher.update(b"cnsprcy pairing commitment\0");
    hasher.update(nonce);
    hasher.finalize().into()
}

/// The code both screens show: 6 digits from the handshake hash and both nonces.
pub fn pairing_code(handshake_hash: &[u8], inductor: &[u8; 32], joiner: &[u8; 32]) -> u32 {
    let mut hasher = Blake2s256::new();
    hasher.update(b"cnsprcy pairing code\0");
    hasher.update(handshake_hash);
    hasher.update(inductor);
    hasher.update(joiner);
    let digest: [u8; 32] = hasher.finalize().into();
    // 2^32 is not a multiple of 10^6: the bias (under 0.03 %) does not help a guesser.
    u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]) % 1_000_000
}

/// `123 456`: easier to compare at a glance than six digits in a row.
pub fn format_code(code: u32) -> String {
    let digits = format!("{code:06}");
    format!("{} {}", &digits[..3], &digits[3..])
}

/// A device on the local network waiting to be paired, as it advertises itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub key: PublicKey,
    pub addresses: Vec<SocketAddr>,
}

/// A pairing connection that got as far as the code.
#[derive(Debug, Clone)]
pub struct Coded {
    pub code: u32,
    /// The other device's name (as it says) and ID (as its key proves).
    pub peer_name: String,
    pub peer_id: DeviceId,
}

/// What a confirmed pairing became.
#[derive(Debug, Clone)]
pub enum Confirmed {
    /// This device joined the inductor's mesh.
    Joined(Joined),
    /// The joiner became a member (under this name: another name's start of ID is added when
    /// its own is taken).
    Inducted { name: String, id: DeviceId },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Joiner,
    Inductor,
}

enum Stage {
    Idle,
    /// `manage join` waits for an inductor; the listener hands inducting sessions over here.
    Waiting {
        offers: mpsc::Sender<(Session, SocketAddr)>,
        cancel: CancellationToken,
    },
    /// `manage induct` dials the device picked.
    Dialling {
        cancel: CancellationToken,
    },
    /// The code is shown; this side's user has not decided yet.
    Coded(Box<Confirming>),
    /// This side's user decided; the other side's decision and the join follow.
    Finishing {
        cancel: CancellationToken,
    },
}

struct Confirming {
    session: Session,
    role: Role,
    /// Where the pairing connection reached the other device (the joiner dials back here).
    local: Option<SocketAddr>,
    peer_name: String,
    shown: Instant,
}

struct State {
    stage: Stage,
    /// Counts pairing steps begun (and cancels), so that a step that ends late resets the
    /// stage only if no other step took it since.
    attempt: u64,
    candidates: Vec<Candidate>,
    browse_until: Option<Instant>,
    advert: Option<JoinAdvert>,
}

/// The pairing this device takes part in (at most one at a time), and what discovery is to do
/// for it.
pub struct Pairing {
    name: DeviceName,
    own: PublicKey,
    /// Where the mesh service listens (the port goes into the advertisement and invitations).
    listen_port: Mutex<u16>,
    state: Mutex<State>,
    discovery: watch::Sender<PairingDiscovery>,
    /// Bumped whenever a candidate appears.
    candidates_seen: watch::Sender<u64>,
}

/// Puts the stage back to idle (and stops advertising and browsing for it) unless disarmed:
/// every way out of a pairing step, an early return or a dropped call, ends the pairing.
struct Reset<'a> {
    pairing: &'a Pairing,
    attempt: u64,
    armed: bool,
}

impl Drop for Reset<'_> {
    fn drop(&mut self) {
        let mut state = self.pairing.lock();
        if self.armed && state.attempt == self.attempt {
            state.stage = Stage::Idle;
            state.advert = None;
            self.pairing.publish(&state);
        }
    }
}

impl Pairing {
    pub fn new(name: DeviceName, own: PublicKey) -> Self {
        Self {
            name,
            own,
            listen_port: Mutex::new(0),
            state: Mutex::new(State {
                stage: Stage::Idle,
                attempt: 0,
                candidates: Vec::new(),
                browse_until: None,
                advert: None,
            }),
            discovery: watch::channel(PairingDiscovery::default()).0,
            candidates_seen: watch::channel(0).0,
        }
    }

    pub fn set_listen_port(&self, port: u16) {
        *self.listen_port.lock().unwrap_or_else(|p| p.into_inner()) = port;
    }

    fn listen_port(&self) -> u16 {
        *self.listen_port.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every statement leaves the state consistent; a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What discovery is to advertise and browse, as it changes.
    pub fn discovery_wish(&self) -> watch::Receiver<PairingDiscovery> {
        self.discovery.subscribe()
    }

    fn publish(&self, state: &State) {
        let wish = PairingDiscovery {
            advertise: state.advert.clone(),
            browse: state.browse_until.is_some(),
        };
        self.discovery.send_if_modified(|current| {
            let changed = *current != wish;
            *current = wish;
            changed
        });
    }

    fn busy(stage: &Stage) -> Option<RpcError> {
        let what = match stage {
            Stage::Idle => return None,
            Stage::Waiting { .. } => "this device is waiting to be inducted (`cnspr manage join`)",
            Stage::Dialling { .. } => "this device is inducting another (`cnspr manage induct`)",
            Stage::Coded(_) | Stage::Finishing { .. } => {
                "a pairing on this device waits for its code to be confirmed"
            }
        };
        Some(error(
            code::CONFLICT,
            format!("{what}; finish it, or cancel it with Ctrl-C where it runs, first"),
        ))
    }

    /// Takes the stage for a new pairing step, unless another one is under way. A code shown
    /// longer than its user may take to decide is given up for the new one.
    fn begin(&self, stage: Stage) -> Result<Reset<'_>, RpcError> {
        let mut state = self.lock();
        if let Stage::Coded(coded) = &state.stage
            && coded.shown.elapsed() > DECIDE_TIMEOUT
        {
            tracing::info!("gave up a pairing whose code nobody confirmed");
            state.stage = Stage::Idle;
        }
        if let Some(busy) = Self::busy(&state.stage) {
            return Err(busy);
        }
        state.stage = stage;
        state.attempt += 1;
        Ok(Reset {
            pairing: self,
            attempt: state.attempt,
            armed: true,
        })
    }

    /// `members.pair_cancel`: ends whatever pairing is under way. Returns whether one was.
    pub fn cancel(&self) -> bool {
        let mut state = self.lock();
        state.attempt += 1;
        let was = match std::mem::replace(&mut state.stage, Stage::Idle) {
            Stage::Idle => false,
            Stage::Waiting { cancel, .. }
            | Stage::Dialling { cancel }
            | Stage::Finishing { cancel } => {
                cancel.cancel();
                true
            }
            // Dropping the session closes the connection: the other side learns at once.
            Stage::Coded(_) => true,
        };
        state.advert = None;
        state.browse_until = None;
        self.publish(&state);
        was
    }

    /// The listener's hand-over: a stranger completed a handshake saying it inducts this
    /// device. Taken while `manage join` waits; otherwise the connection is closed.
    pub fn offer(&self, session: Session, addr: SocketAddr) {
        let state = self.lock();
        match &state.stage {
            Stage::Waiting { offers, .. } => {
                if offers.try_send((session, addr)).is_err() {
                    tracing::info!(
                        "closed a pairing connection from {addr}: another one is being answered"
                    );
                }
            }
            // Any stranger that knows this device's key can get this far: no log line each.
            _ => tracing::debug!(
                "closed a pairing connection from {addr}: this device is not waiting to be inducted (`cnspr manage join` starts that)"
            ),
        }
    }

    /// `members.pair_wait`: advertise this device and wait until a member dials to induct it
    /// and the code is known. `expect`: only that member may (others are turned away).
    pub async fn wait_for_inductor(
        &self,
        node: &NodeHandle,
        expect: Option<DeviceId>,
        wait: Duration,
    ) -> Result<Coded, RpcError> {
        let members = node.members.read().map(|m| m.len()).unwrap_or(0);
        if members > 0 {
            return Err(error(
                code::CONFLICT,
                format!(
                    "this device is a member of a mesh already ({members} members); run `cnspr manage induct` on it to add another device, or `cnspr manage leave` first"
                ),
            ));
        }
        let (offers, mut offered) = mpsc::channel(1);
        let cancel = CancellationToken::new();
        let reset = self.begin(Stage::Waiting {
            offers,
            cancel: cancel.clone(),
        })?;
        {
            let mut state = self.lock();
            let id = self.own.device_id().to_string();
            // An mDNS instance name is one DNS label: at most 63 bytes. Each wait gets a new
            // one: hosts that saw the last one withdrawn a moment ago may still hold it as
            // "going away" and miss it coming back under the same name.
            let mut short = self.name.to_string();
            while short.len() > 53 {
                short.pop();
            }
            let fresh: u16 = rand::random();
            state.advert = Some(JoinAdvert {
                instance: format!("{short}-{}-{fresh:04x}", id.get(..4).unwrap_or(&id)),
                port: self.listen_port(),
                name: self.name.to_string(),
                key: self.own.to_string(),
            });
            self.publish(&state);
        }
        tracing::info!("waiting to be inducted: advertising this device on the local network");
        let deadline = Instant::now() + wait;
        loop {
            let (mut session, addr) = tokio::select! {
                _ = cancel.cancelled() => return Err(error(code::CONFLICT, "cancelled")),
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(error(
                        code::UNREACHABLE,
                        format!(
                            "no member inducted this device within {} s; run `cnspr manage induct` on a member on the same network, or use an invitation (`cnspr manage invite` there)",
                            wait.as_secs()
                        ),
                    ));
                }
                offer = offered.recv() => match offer {
                    Some(offer) => offer,
                    None => return Err(error(code::CONFLICT, "cancelled")),
                },
            };
            let Some(inducting) = session.remote.inducting.clone() else {
                continue;
            };
            let id = session.remote_key.device_id();
            let accepted = expect.as_ref().is_none_or(|e| *e == id);
            let _ = node.watch.send(WatchEvent::PairingRequest {
                name: inducting.name.clone(),
                id: id.clone(),
                address: addr,
                accepted,
            });
            if !accepted {
                tracing::warn!(
                    "turned away {} ({id}) at {addr}: it is not the inductor this device expects",
                    inducting.name
                );
                let _ = tokio::time::timeout(
                    EXCHANGE_TIMEOUT,
                    session.writer.send(&Message::PairConfirm(false)),
                )
                .await;
                continue;
            }
            let nonce: [u8; 32] = rand::random();
            let exchanged = async {
                session.writer.send(&Message::PairNonce(nonce)).await?;
                match next_message(&mut session).await? {
                    Message::PairNonce(theirs) => Ok(theirs),
                    other => Err(transport::TransportError::Protocol(format!(
                        "expected the inductor's nonce, got {other:?}"
                    ))),
                }
            };
            let theirs = match tokio::time::timeout(EXCHANGE_TIMEOUT, exchanged).await {
                Ok(Ok(theirs)) => theirs,
                Ok(Err(e)) => {
                    tracing::warn!(
                        "pairing with {} ({id}) at {addr} failed: {e}",
                        inducting.name
                    );
                    continue;
                }
                Err(_) => {
                    tracing::warn!(
                        "pairing with {} ({id}) at {addr} failed: no nonce within {} s",
                        inducting.name,
                        EXCHANGE_TIMEOUT.as_secs()
                    );
                    continue;
                }
            };
            if commitment(&theirs) != inducting.commitment {
                tracing::warn!(
                    "turned away {} ({id}) at {addr}: its nonce does not match what it committed to (a machine in the middle?)",
                    inducting.name
                );
                continue;
            }
            let code = pairing_code(&session.handshake_hash, &theirs, &nonce);
            let coded = Coded {
                code,
                peer_name: inducting.name.clone(),
                peer_id: id,
            };
            self.show(
                reset,
                Confirming {
                    session,
                    role: Role::Joiner,
                    local: None,
                    peer_name: inducting.name,
                    shown: Instant::now(),
                },
            )?;
            return Ok(coded);
        }
    }

    /// The code is known: keep the connection until this side's user decides.
    fn show(&self, mut reset: Reset<'_>, confirming: Confirming) -> Result<(), RpcError> {
        let mut state = self.lock();
        if state.attempt != reset.attempt {
            return Err(error(code::CONFLICT, "cancelled"));
        }
        state.stage = Stage::Coded(Box::new(confirming));
        state.advert = None;
        state.browse_until = None;
        self.publish(&state);
        reset.armed = false;
        Ok(())
    }

    /// Discovery resolved a device waiting to be paired. Kept (and reported) while browsing.
    pub fn candidate(
        &self,
        node: &NodeHandle,
        name: String,
        key: &str,
        addresses: Vec<SocketAddr>,
    ) {
        let Ok(key) = key.parse::<PublicKey>() else {
            tracing::debug!(%name, "ignored a pairing advertisement with a malformed key");
            return;
        };
        if key == self.own || node.is_member(&key) || addresses.is_empty() {
            return;
        }
        let name: String = name.chars().filter(|c| !c.is_control()).take(64).collect();
        let mut state = self.lock();
        if state.browse_until.is_none() {
            return;
        }
        if let Some(known) = state.candidates.iter_mut().find(|c| c.key == key) {
            if known.addresses == addresses && known.name == name {
                return;
            }
            known.addresses = addresses.clone();
            known.name = name.clone();
        } else {
            if state.candidates.len() >= MAX_CANDIDATES {
                return;
            }
            state.candidates.push(Candidate {
                name: name.clone(),
                key,
                addresses: addresses.clone(),
            });
        }
        drop(state);
        self.candidates_seen.send_modify(|n| *n += 1);
        let _ = node.watch.send(WatchEvent::JoinCandidate {
            name,
            id: key.device_id(),
            addresses,
        });
    }

    /// `members.candidates`: browse (for a while longer) and list the devices waiting to be
    /// paired; waits up to `wait` for one beyond the first `known`.
    pub async fn candidates(
        self: &Arc<Self>,
        node: &NodeHandle,
        known: usize,
        wait: Duration,
    ) -> Vec<Candidate> {
        let mut seen = self.candidates_seen.subscribe();
        let start_lease = {
            let mut state = self.lock();
            let first = state.browse_until.is_none();
            if first {
                state.candidates.clear();
            }
            state.browse_until = Some(Instant::now() + BROWSE_LEASE);
            self.publish(&state);
            first
        };
        if start_lease {
            tracing::info!("browsing for devices waiting to be paired");
            tokio::spawn(self.clone().end_browsing_when_unused());
        }
        let deadline = Instant::now() + wait;
        loop {
            let listed: Vec<Candidate> = self
                .lock()
                .candidates
                .iter()
                .filter(|c| !node.is_member(&c.key))
                .cloned()
                .collect();
            if listed.len() > known {
                return listed;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return listed,
                changed = seen.changed() => if changed.is_err() { return listed },
            }
        }
    }

    /// The key of the listed device waiting to be paired with ID `id`.
    pub fn candidate_key(&self, id: &DeviceId) -> Option<PublicKey> {
        self.lock()
            .candidates
            .iter()
            .find(|c| c.key.device_id() == *id)
            .map(|c| c.key)
    }

    async fn end_browsing_when_unused(self: Arc<Self>) {
        loop {
            let until = match self.lock().browse_until {
                Some(until) => until,
                None => return,
            };
            tokio::time::sleep_until(until).await;
            let mut state = self.lock();
            if state.browse_until.is_some_and(|u| u <= Instant::now()) {
                state.browse_until = None;
                state.candidates.clear();
                self.publish(&state);
                tracing::info!("stopped browsing for devices waiting to be paired");
                return;
            }
        }
    }

    /// `members.induct`: dial the device waiting to be paired with `key`, and get as far as
    /// the code.
    pub async fn induct(&self, node: &NodeHandle, key: PublicKey) -> Result<Coded, RpcError> {
        if key == self.own {
            return Err(error(code::CONFLICT, "that is this device"));
        }
        if node.is_member(&key) {
            return Err(error(
                code::CONFLICT,
                format!("device {} is a member already", key.device_id()),
            ));
        }
        let candidate = self
            .lock()
            .candidates
            .iter()
            .find(|c| c.key == key)
            .cloned();
        let Some(candidate) = candidate else {
            return Err(error(
                code::NOT_FOUND,
                format!(
                    "no device {} waits to be paired on the local network; run `cnspr manage join` (without a code) on it, then `cnspr manage induct` here",
                    key.device_id()
                ),
            ));
        };
        let cancel = CancellationToken::new();
        let reset = self.begin(Stage::Dialling {
            cancel: cancel.clone(),
        })?;
        let nonce: [u8; 32] = rand::random();
        let mut payload = node.payload();
        payload.inducting = Some(Inducting {
            commitment: commitment(&nonce),
            name: self.name.to_string(),
        });
        let id = key.device_id();
        let exchange = async {
            let (mut session, local) = connect(node, &candidate, &payload).await?;
            let theirs = tokio::time::timeout(EXCHANGE_TIMEOUT, next_message(&mut session))
                .await
                .map_err(|_| {
                    format!(
                        "{} did not answer within {} s",
                        candidate.name,
                        EXCHANGE_TIMEOUT.as_secs()
                    )
                })?;
            let theirs = match theirs {
                Ok(Message::PairNonce(theirs)) => theirs,
                Ok(Message::PairConfirm(false)) => {
                    return Err(format!(
                        "{} turned this device away: it waits for another inductor (`--expect-inductor`)",
                        candidate.name
                    ));
                }
                Ok(other) => return Err(format!("unexpected answer {other:?}")),
                Err(transport::TransportError::Closed) => {
                    return Err(format!(
                        "{} closed the connection: it is pairing with another device, or stopped waiting",
                        candidate.name
                    ));
                }
                Err(e) => return Err(e.to_string()),
            };
            tokio::time::timeout(
                EXCHANGE_TIMEOUT,
                session.writer.send(&Message::PairNonce(nonce)),
            )
            .await
            .map_err(|_| "the connection stalled".to_owned())?
            .map_err(|e| e.to_string())?;
            Ok::<_, String>((session, local, theirs))
        };
        let (session, local, theirs) = tokio::select! {
            _ = cancel.cancelled() => return Err(error(code::CONFLICT, "cancelled")),
            outcome = exchange => outcome.map_err(|e| {
                error(code::UNREACHABLE, format!("cannot pair with {} ({id}): {e}", candidate.name))
            })?,
        };
        let code = pairing_code(&session.handshake_hash, &nonce, &theirs);
        self.show(
            reset,
            Confirming {
                session,
                role: Role::Inductor,
                local,
                peer_name: candidate.name.clone(),
                shown: Instant::now(),
            },
        )?;
        Ok(Coded {
            code,
            peer_name: candidate.name,
            peer_id: id,
        })
    }

    /// `members.pair_confirm`: this side's user compared the codes. Tells the other side and
    /// waits for its decision; then the joiner joins.
    pub async fn confirm(&self, node: &NodeHandle, accept: bool) -> Result<Confirmed, RpcError> {
        let cancel = CancellationToken::new();
        let (confirming, attempt) = {
            let mut state = self.lock();
            match std::mem::replace(&mut state.stage, Stage::Idle) {
                Stage::Coded(confirming) => {
                    state.stage = Stage::Finishing {
                        cancel: cancel.clone(),
                    };
                    state.attempt += 1;
                    (confirming, state.attempt)
                }
                other => {
                    state.stage = other;
                    return Err(error(
                        code::CONFLICT,
                        "no pairing waits for its code to be confirmed on this device",
                    ));
                }
            }
        };
        let _reset = Reset {
            pairing: self,
            attempt,
            armed: true,
        };
        let Confirming {
            mut session,
            role,
            local,
            peer_name,
            ..
        } = *confirming;
        let peer_id = session.remote_key.device_id();
        let told = tokio::time::timeout(
            EXCHANGE_TIMEOUT,
            session.writer.send(&Message::PairConfirm(accept)),
        )
        .await;
        if !accept {
            tracing::info!("refused to pair with {peer_name} ({peer_id}): the codes differ");
            return Err(error(
                code::CONFLICT,
                format!("pairing with {peer_name} refused here; nothing was changed"),
            ));
        }
        if !matches!(told, Ok(Ok(()))) {
            return Err(error(
                code::UNREACHABLE,
                format!("lost the connection to {peer_name}; nothing was changed, try again"),
            ));
        }
        let unreachable = |what: String| error(code::UNREACHABLE, what);
        let decided = async {
            loop {
                match next_message(&mut session).await {
                    Ok(Message::PairConfirm(theirs)) => return Ok(theirs),
                    Ok(_) => continue,
                    Err(_) => {
                        return Err(unreachable(format!(
                            "{peer_name} closed the pairing (cancelled there?); nothing was changed"
                        )));
                    }
                }
            }
        };
        let theirs = tokio::select! {
            _ = cancel.cancelled() => return Err(error(code::CONFLICT, "cancelled")),
            decided = tokio::time::timeout(CONFIRM_TIMEOUT, decided) => decided.map_err(|_| {
                unreachable(format!(
                    "{peer_name} did not confirm the code within {} s; nothing was changed",
                    CONFIRM_TIMEOUT.as_secs()
                ))
            })??,
        };
        if !theirs {
            return Err(error(
                code::CONFLICT,
                format!(
                    "{peer_name} refused the pairing: the code did not match there; nothing was changed"
                ),
            ));
        }
        let finished = async {
            match role {
                Role::Inductor => self.admit(node, session, local, &peer_name).await,
                Role::Joiner => self.join(node, session, &peer_name).await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => Err(error(code::CONFLICT, "cancelled")),
            finished = finished => finished,
        }
    }

    /// Inductor, both sides confirmed: a one-time invitation for the joiner, then wait for it
    /// to become a member.
    async fn admit(
        &self,
        node: &NodeHandle,
        mut session: Session,
        local: Option<SocketAddr>,
        peer_name: &str,
    ) -> Result<Confirmed, RpcError> {
        let joiner = session.remote_key;
        let mut events = node.watch.subscribe();
        let invited = match node
            .call(ApiCall::Invite {
                lifetime: JOIN_TIMEOUT,
            })
            .await?
        {
            Answer::Invited(invited) => invited,
            _ => return Err(RpcError::internal("unexpected answer to an invitation")),
        };
        // The address the joiner reached this device at comes first: it works on this LAN.
        let mut addresses: Vec<SocketAddr> = local
            .map(|l| SocketAddr::new(l.ip(), self.listen_port()))
            .into_iter()
            .collect();
        for address in invited.addresses {
            if !addresses.contains(&address) && addresses.len() < 4 {
                addresses.push(address);
            }
        }
        let sent = tokio::time::timeout(
            EXCHANGE_TIMEOUT,
            session.writer.send(&Message::PairInvitation {
                secret: invited.secret,
                addresses,
            }),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            return Err(error(
                code::UNREACHABLE,
                format!("lost the connection to {peer_name} before it could join; try again"),
            ));
        }
        let id = joiner.device_id();
        let joined = async {
            loop {
                match events.recv().await {
                    Ok(WatchEvent::Member {
                        name,
                        id: member,
                        state: MemberState::Active,
                        ..
                    }) if member == id => return Some(name),
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        if node.is_member(&joiner) {
                            return None;
                        }
                    }
                    Err(_) => return None,
                }
            }
        };
        match tokio::time::timeout(JOIN_TIMEOUT, joined).await {
            Ok(Some(name)) => Ok(Confirmed::Inducted {
                name: name.to_string(),
                id,
            }),
            Ok(None) if node.is_member(&joiner) => Ok(Confirmed::Inducted {
                name: peer_name.to_owned(),
                id,
            }),
            _ => Err(error(
                code::UNREACHABLE,
                format!(
                    "{peer_name} did not join within {} s (it could not dial this device back?); `cnspr manage list` shows whether it did",
                    JOIN_TIMEOUT.as_secs()
                ),
            )),
        }
    }

    /// Joiner, both sides confirmed: take the inductor's invitation and join with it.
    async fn join(
        &self,
        node: &NodeHandle,
        mut session: Session,
        peer_name: &str,
    ) -> Result<Confirmed, RpcError> {
        let inviter = session.remote_key;
        let invitation = loop {
            match tokio::time::timeout(EXCHANGE_TIMEOUT, next_message(&mut session)).await {
                Ok(Ok(Message::PairInvitation { secret, addresses })) => {
                    break Invitation {
                        inviter,
                        secret,
                        addresses,
                    };
                }
                Ok(Ok(_)) => continue,
                _ => {
                    return Err(error(
                        code::UNREACHABLE,
                        format!("{peer_name} confirmed but sent no invitation; try again"),
                    ));
                }
            }
        };
        drop(session);
        match node.call(ApiCall::Join(invitation)).await? {
            Answer::Joined(joined) => Ok(Confirmed::Joined(joined?)),
            _ => Err(RpcError::internal("unexpected answer to a join")),
        }
    }
}

/// The next message of a kind this version knows; `Closed` when the connection ended.
async fn next_message(session: &mut Session) -> Result<Message, transport::TransportError> {
    loop {
        if let Some(message) = session.reader.recv().await? {
            return Ok(message);
        }
    }
}

/// Dials the candidate at each of its addresses in turn, as an inductor. Returns the session
/// and this device's address on the connection.
async fn connect(
    node: &NodeHandle,
    candidate: &Candidate,
    payload: &cnsprcy::wire::HandshakePayload,
) -> Result<(Session, Option<SocketAddr>), String> {
    let mut errors = Vec::new();
    for address in &candidate.addresses {
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                errors.push(format!("{address}: {e}"));
                continue;
            }
            Err(_) => {
                errors.push(format!("{address}: no answer"));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok();
        match transport::initiate(stream, &node.identity, &candidate.key, payload).await {
            Ok(session) => return Ok((session, local)),
            Err(e) => errors.push(format!("{address}: {e}")),
        }
    }
    Err(errors.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_depend_on_the_handshake_and_both_nonces() {
        let (hash, ni, nj) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let code = pairing_code(&hash, &ni, &nj);
        assert!(code < 1_000_000);
        assert_eq!(
            code,
            pairing_code(&hash, &ni, &nj),
            "both sides derive the same"
        );
        // A machine in the middle holds another handshake hash, and cannot pick the nonces.
        let others = [
            pairing_code(&[9; 32], &ni, &nj),
            pairing_code(&hash, &[8; 32], &nj),
            pairing_code(&hash, &ni, &[7; 32]),
            pairing_code(&hash, &nj, &ni),
        ];
        assert!(others.iter().all(|&other| other != code));
    }

    #[test]
    fn commitments_bind_the_nonce() {
        let nonce = [5u8; 32];
        assert_eq!(commitment(&nonce), commitment(&nonce));
        assert_ne!(commitment(&nonce), commitment(&[6; 32]));
        assert_ne!(commitment(&nonce), nonce, "the nonce is not shown");
    }

    #[test]
    fn codes_print_as_two_groups_of_three_digits() {
        assert_eq!(format_code(42), "000 042");
        assert_eq!(format_code(987_654), "987 654");
    }
}
