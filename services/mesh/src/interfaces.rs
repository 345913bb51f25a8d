//! `[mesh] interfaces` at run time: the interfaces this device has now (from netwatch, or read
//! here with getifaddrs when netwatch has not reported or an address is not in its last report),
//! and the checks the accept path and the dial tasks make against them. The rules themselves are
//! pure functions in `cnsprcy::netif`.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cnsprcy::ipc::Interface;
use cnsprcy::netif::{self, DialPlan, InterfaceFilter, LocalCheck};
use tokio::net::{TcpSocket, TcpStream};

/// getifaddrs is read again at most this often because of an address it did not know: a
/// stranger connecting to addresses of a refused interface must not make us read it per
/// connection.
const REREAD_INTERVAL: Duration = Duration::from_secs(1);

pub struct Interfaces {
    filter: InterfaceFilter,
    state: Mutex<State>,
}

struct State {
    list: Vec<Interface>,
    /// When getifaddrs was last read here (not when netwatch last reported).
    read_at: Option<Instant>,
    /// Names from `[mesh] interfaces` already logged as missing: each is logged once.
    warned: BTreeSet<String>,
}

impl Interfaces {
    /// Reads the interfaces now, and logs the configured names this device does not have.
    pub fn new(filter: InterfaceFilter) -> Self {
        let interfaces = Self {
            filter,
            state: Mutex::new(State {
                list: Vec::new(),
                read_at: None,
                warned: BTreeSet::new(),
            }),
        };
        if !interfaces.filter.is_any() {
            let list = netif::snapshot();
            let mut state = interfaces.lock();
            state.read_at = Some(Instant::now());
            interfaces.note_missing(&mut state, &list);
            state.list = list;
        }
        interfaces
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn filter(&self) -> &InterfaceFilter {
        &self.filter
    }

    /// The interfaces as last known; read now if nothing is known yet.
    pub fn list(&self) -> Vec<Interface> {
        let mut state = self.lock();
        if state.list.is_empty() {
            self.reread(&mut state, true);
        }
        state.list.clone()
    }

    /// netwatch reported the interfaces.
    pub fn update(&self, list: Vec<Interface>) {
        let mut state = self.lock();
        self.note_missing(&mut state, &list);
        state.list = list;
    }

    fn note_missing(&self, state: &mut State, list: &[Interface]) {
        for name in self.filter.missing(list) {
            if state.warned.insert(name.clone()) {
                tracing::warn!(
                    "[mesh] interfaces names {name}, which this device does not have (yet); sessions use it once it appears"
                );
            }
        }
    }

    /// Reads getifaddrs again, unless it was read within `REREAD_INTERVAL` (or `force`).
    fn reread(&self, state: &mut State, force: bool) -> bool {
        if !force
            && state
                .read_at
                .is_some_and(|at| at.elapsed() < REREAD_INTERVAL)
        {
            return false;
        }
        let list = netif::snapshot();
        state.read_at = Some(Instant::now());
        self.note_missing(state, &list);
        state.list = list;
        true
    }

    /// Whether a session may use the local address `local`: `Err` says why not.
    pub fn check_local(&self, local: IpAddr) -> Result<(), String> {
        if self.filter.is_any() {
            return Ok(());
        }
        let mut state = self.lock();
        let mut check = netif::check_local(&self.filter, &state.list, local);
        if check == LocalCheck::Unknown && self.reread(&mut state, false) {
            check = netif::check_local(&self.filter, &state.list, local);
        }
        match check {
            LocalCheck::Allowed => Ok(()),
            LocalCheck::Refused(interface) => Err(format!(
                "{local} is on {interface}, which [mesh] interfaces does not name"
            )),
            LocalCheck::Unknown => Err(format!(
                "{local} is on no interface [mesh] interfaces names"
            )),
        }
    }

    /// How to dial `target`. When no allowed interface fits, getifaddrs is read again first (an
    /// interface may have come up since the last report).
    pub fn dial_plan(&self, target: IpAddr) -> DialPlan {
        if self.filter.is_any() {
            return DialPlan::Unbound;
        }
        let routed = routed_from(target);
        let mut state = self.lock();
        let plan = netif::dial_plan(&self.filter, &state.list, target, routed);
        if matches!(plan, DialPlan::Impossible(_)) && self.reread(&mut state, false) {
            return netif::dial_plan(&self.filter, &state.list, target, routed);
        }
        plan
    }
}

/// The source address the kernel's routing picks for `target`: connecting a UDP socket looks
/// the route up without sending anything. `None` when there is no route.
fn routed_from(target: IpAddr) -> Option<IpAddr> {
    let unspecified: IpAddr = if target.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = std::net::UdpSocket::bind((unspecified, 0)).ok()?;
    socket.connect((target, 9)).ok()?;
    socket.local_addr().ok().map(|a| a.ip())
}

/// Connects to `addr` as `plan` says: unbound, or bound to one device (SO_BINDTODEVICE, which
/// Linux allows without privileges since 5.7 on a socket not bound yet). On an older kernel that
/// refuses the binding, it connects unbound and keeps the connection only if its local address
/// is on an allowed interface.
pub async fn connect(
    addr: SocketAddr,
    device: Option<&str>,
    interfaces: &Interfaces,
) -> Result<TcpStream, String> {
    let Some(device) = device else {
        return TcpStream::connect(addr)
            .await
            .map_err(|e| format!("{addr}: {e}"));
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("{addr}: cannot make a socket: {e}"))?;
    let bound = socket.bind_device(Some(device.as_bytes()));
    let stream = socket
        .connect(addr)
        .await
        .map_err(|e| format!("{addr} over {device}: {e}"))?;
    if let Err(e) = bound {
        let local = stream.local_addr().map_err(|e| format!("{addr}: {e}"))?;
        interfaces.check_local(local.ip()).map_err(|why| {
            format!("{addr}: cannot bind to {device} ({e}), and the kernel's route uses {why}")
        })?;
    }
    Ok(stream)
}
