//! Small networks built from network namespaces the test creates itself: a [`NetNs`] is one
//! namespace, a [`Lan`] is a switch (a bridge in a namespace of its own) with nodes plugged into
//! it, whose links can be cut, partitioned and made lossy.
//!
//! Needs root (`CAP_SYS_ADMIN` and `CAP_NET_ADMIN`), `ip` (Debian package `iproute2`) and, for
//! [`Lan::partition`] and [`Lan::loss`], `nft` (package `nftables`).
//!
//! Nothing is ever created in the test's own network namespace: each namespace is held by a
//! `sleep` process that was moved into it before it exec'd, veth pairs are created inside the
//! bridge's namespace with their node end born directly in the node's namespace, and all
//! addresses (`10.231.X.0/24`) live only on interfaces inside those namespaces, which have no
//! uplink. So nothing a test sends here can leave the machine.
//!
//! Clean-up never depends on the test finishing: dropping a [`NetNs`] kills its holder, and every
//! process started in a namespace by this module (holders included) has `PR_SET_PDEATHSIG =
//! SIGKILL`, so if the test process dies without unwinding they die with it, the namespaces lose
//! their last process, and the kernel destroys them with their interfaces (deleting one end of a
//! veth pair deletes the other).
//!
//! Caveat of `PR_SET_PDEATHSIG`: the signal comes when the *thread* that spawned the process
//! exits, not the process. Create and use a [`NetNs`]/[`Lan`] (and spawn its processes) on the
//! test's own thread, not on a short-lived helper thread.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use nix::libc;
use nix::sys::signal::Signal;

/// Numbers the [`Lan`]s of this process, for interface names and subnets that differ between
/// the Lans alive at the same time.
static LAN_COUNTER: AtomicU32 = AtomicU32::new(0);

/// One network namespace with only `lo`, up.
///
/// The namespace is held by a `sleep infinity` process whose pid is [`NetNs::pid`], so
/// `/proc/PID/ns/net` names it for `nsenter --net=` and `ip link set DEV netns PID`.
pub struct NetNs {
    holder: Child,
    /// `/proc/PID/ns/net` of the holder, open: processes join the namespace through it, so a
    /// recycled pid can never send them elsewhere.
    fd: Arc<OwnedFd>,
}

impl NetNs {
    /// Creates the namespace and brings `lo` up. Panics if not root.
    pub fn new() -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "network namespace tests need root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
        );
        let mut cmd = Command::new("sleep");
        cmd.arg("infinity")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let parent = std::process::id();
        // The holder unshares before it execs `sleep`, and `spawn` returns only after the exec
        // succeeded, so when it returns the namespace exists: no window in which
        // /proc/PID/ns/net would still be ours.
        // SAFETY: only async-signal-safe calls (prctl, getppid, unshare) run between fork and
        // exec, and the error path does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                die_with_parent(parent)?;
                if libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let holder = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn the namespace holder `sleep infinity`: {e}"));
        let path = format!("/proc/{}/ns/net", holder.id());
        let fd = match File::open(&path) {
            Ok(file) => Arc::new(OwnedFd::from(file)),
            Err(e) => panic!("open {path}: {e}"),
        };
        let ns = Self { holder, fd };
        let ours = std::fs::read_link("/proc/self/ns/net").expect("read our netns");
        let theirs = std::fs::read_link(&path).expect("read the holder's netns");
        assert_ne!(
            ours, theirs,
            "the holder did not get a namespace of its own"
        );
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// The pid of the process holding the namespace.
    pub fn pid(&self) -> u32 {
        self.holder.id()
    }

    /// Makes `cmd` run inside this namespace, and die (`SIGKILL`) when the thread that spawns it
    /// exits. The child joins the namespace between fork and exec (`setns`), so there is no
    /// wrapper process: the pid of the spawned `Child` is the program's own pid. Everything else
    /// about `cmd` (environment, directory, stdio) is left as it is. `cmd` keeps the namespace's
    /// fd open until it is dropped.
    pub fn enter<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        let fd = Arc::clone(&self.fd);
        let parent = std::process::id();
        // SAFETY: only async-signal-safe calls (prctl, getppid, setns) run between fork and exec,
        // and the error path does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                die_with_parent(parent)?;
                if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            })
        }
    }

    /// A command for `program` that runs inside this namespace; see [`NetNs::enter`].
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        self.enter(&mut cmd);
        cmd
    }

    /// Runs `argv` inside the namespace to completion and returns its stdout; panics with its
    /// stderr if it fails.
    pub fn run(&self, argv: &[&str]) -> String {
        self.run_with_input(argv, None)
    }

    /// Like [`NetNs::run`], with `input` on the command's stdin (for `ip -batch -`, `nft -f -`).
    fn run_with_input(&self, argv: &[&str], input: Option<&str>) -> String {
        let (program, args) = argv.split_first().expect("a program to run");
        let mut cmd = self.command(program);
        cmd.args(args);
        run_to_completion(&mut cmd, input)
    }

    /// Links this namespace and `other` directly with a veth pair, a second network beside a
    /// [`Lan`] for instance: `name` here with the address `addr` (`"10.232.1.1/24"`),
    /// `other_name` in `other` with `other_addr`, both up. The pair is made here with its far
    /// end born in `other`, so it never exists in the test's own namespace; it goes away with
    /// either namespace.
    pub fn link_to(
        &self,
        name: &str,
        addr: &str,
        other: &NetNs,
        other_name: &str,
        other_addr: &str,
    ) {
        let script = format!(
            "link add name {name} type veth peer name {other_name} netns {}\n\
             addr add {addr} dev {name}\nlink set {name} up\n",
            other.pid()
        );
        self.run_with_input(&["ip", "-batch", "-"], Some(&script));
        let script = format!("addr add {other_addr} dev {other_name}\nlink set {other_name} up\n");
        other.run_with_input(&["ip", "-batch", "-"], Some(&script));
    }

    /// Runs `f` on a thread that has joined this namespace, and returns its result. Sockets made
    /// in `f` belong to this namespace for their whole life and can be used from any thread
    /// afterwards, so a test can listen and connect inside a node with `std::net` directly.
    /// Each such socket holds a reference to the namespace: it (and its interfaces) outlives
    /// the holder until the socket is closed.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let fd = self.fd.as_raw_fd();
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                // SAFETY: plain syscall on an fd that `self` keeps open for the whole scope. It
                // moves only this thread, which ends with the scope.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    panic!("setns into netns: {}", io::Error::last_os_error());
                }
                f()
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNs {
    /// Kills and reaps the holder. The namespace goes away once no process is left in it and
    /// its fd (closed right after this) is gone; processes started in it with
    /// [`NetNs::enter`] are their spawner's to stop.
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// In a forked child: asks for `SIGKILL` when the spawning thread exits, and fails the spawn if
/// the parent is already gone (it could have died before the prctl, and then the signal would
/// never come).
fn die_with_parent(parent: u32) -> io::Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
    if nix::unistd::getppid().as_raw() as u32 != parent {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

/// Runs `cmd` to completion with `input` on stdin and returns stdout; panics with the command,
/// its status, input and stderr on failure, and names the Debian package for a missing program.
fn run_to_completion(cmd: &mut Command, input: Option<&str>) -> String {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let hint = match (e.kind(), program.as_str()) {
            (io::ErrorKind::NotFound, "ip") => " (install the Debian package iproute2)",
            (io::ErrorKind::NotFound, "nft") => " (install the Debian package nftables)",
            _ => "",
        };
        panic!("cannot run {cmd:?}: {e}{hint}")
    });
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(input.as_bytes())
            .unwrap_or_else(|e| panic!("write the input of {cmd:?}: {e}"));
    }
    let output = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait for {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        panic!(
            "{cmd:?} failed with {}\n--- stdin\n{}\n--- stderr\n{}\n--- stdout\n{stdout}",
            output.status,
            input.unwrap_or(""),
            String::from_utf8_lossy(&output.stderr),
        );
    }
    stdout
}

/// A switch with nodes: a bridge in a namespace of its own, and `n` node namespaces, each plugged
/// in by a veth pair. Node `i` has `eth0` with `10.231.X.(i+1)/24` and a route for
/// `224.0.0.0/4` on `eth0` (there is no default route, and multicast senders such as mDNS need
/// one). The bridge floods multicast (snooping off), like the dumb switches at home.
///
/// Bridge-side ports are `<prefix>p<i>` and the bridge `<prefix>br`, where the prefix is unique
/// among the Lans alive on this machine; they never exist outside the bridge's namespace, and
/// the prefix lets a test check that.
pub struct Lan {
    // Field order is drop order: the bridge goes first, and with it every veth pair.
    bridge: NetNs,
    nodes: Vec<NetNs>,
    subnet: u8,
    prefix: String,
    faults: Mutex<Faults>,
}

/// The packet filters in force on the bridge; rewritten as a whole on every change.
#[derive(Default)]
struct Faults {
    /// Pairs `(a, b)` with `a < b` that cannot exchange frames.
    partitions: BTreeSet<(usize, usize)>,
    /// Node -> percent of its frames lost in each direction.
    loss: BTreeMap<usize, u8>,
    /// Nodes whose UDP datagrams are dropped, both ways.
    udp_blocked: BTreeSet<usize>,
}

/// The nftables table on the bridge that holds partitions and loss.
const NFT_TABLE: &str = "bridge cnsprcy";

impl Lan {
    /// Builds the Lan with `n` nodes (at most 253).
    pub fn new(n: usize) -> Self {
        assert!((1..=253).contains(&n), "a Lan has 1 to 253 nodes, not {n}");
        let count = LAN_COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // pid_max is at most 2^22, so 6 hex digits hold any pid exactly: prefixes of two
        // processes never collide, and within a process 4096 Lans can be alive at once.
        // "c" + 6 + 3 digits, + "p253" = 14 characters, within IFNAMSIZ (15).
        let prefix = format!("c{:06x}{:03x}", pid & 0xff_ffff, count & 0xfff);
        // Distinct for the Lans of one process; across processes a clash is harmless since the
        // addresses exist only inside these namespaces.
        let subnet = (pid.wrapping_mul(37).wrapping_add(count) % 256) as u8;
        let bridge = NetNs::new();
        let nodes: Vec<NetNs> = (0..n).map(|_| NetNs::new()).collect();

        let bridge_name = format!("{prefix}br");
        let mut script = format!(
            "link add name {bridge_name} type bridge stp_state 0 mcast_snooping 0\n\
             link set {bridge_name} up\n"
        );
        for (i, node) in nodes.iter().enumerate() {
            let port = format!("{prefix}p{i}");
            // The node end is born in the node: it never appears anywhere else.
            let _ = writeln!(
                script,
                "link add name {port} type veth peer name eth0 netns {}",
                node.pid()
            );
            let _ = writeln!(script, "link set {port} master {bridge_name} up");
        }
        bridge.run_with_input(&["ip", "-batch", "-"], Some(&script));

        let lan = Self {
            bridge,
            nodes,
            subnet,
            prefix,
            faults: Mutex::new(Faults::default()),
        };
        for (i, node) in lan.nodes.iter().enumerate() {
            let script = format!(
                "addr add {}/24 dev eth0\nlink set eth0 up\nroute add 224.0.0.0/4 dev eth0\n",
                lan.addr(i)
            );
            node.run_with_input(&["ip", "-batch", "-"], Some(&script));
        }
        lan
    }

    /// Node `i`'s namespace.
    pub fn node(&self, i: usize) -> &NetNs {
        self.check(i);
        &self.nodes[i]
    }

    /// All node namespaces, in order.
    pub fn nodes(&self) -> &[NetNs] {
        &self.nodes
    }

    /// The bridge's namespace, for inspecting it (`ip -br link`, `nft list ruleset`).
    pub fn bridge(&self) -> &NetNs {
        &self.bridge
    }

    /// Node `i`'s address on `eth0`.
    pub fn addr(&self, i: usize) -> IpAddr {
        self.check(i);
        IpAddr::V4(Ipv4Addr::new(10, 231, self.subnet, i as u8 + 1))
    }

    /// The start of every interface name this Lan creates on the bridge side.
    pub fn interface_prefix(&self) -> &str {
        &self.prefix
    }

    /// Unplugs node `i`: its bridge port goes down, so its `eth0` loses carrier. The node side
    /// is left alone, because setting `eth0` down inside the node would delete the routes added
    /// by hand (such as the multicast route).
    pub fn cut(&self, i: usize) {
        self.set_port(i, "down");
    }

    /// Plugs node `i` back in after [`Lan::cut`]. Forwarding resumes at once (no STP), but the
    /// node's neighbour entries may need a moment: poll.
    pub fn restore(&self, i: usize) {
        self.set_port(i, "up");
    }

    /// Drops every frame between nodes `a` and `b`, both ways (unicast, broadcast and
    /// multicast, ARP included), while both still reach the others.
    pub fn partition(&self, a: usize, b: usize) {
        let pair = self.pair(a, b);
        self.update(|faults| {
            faults.partitions.insert(pair);
        });
    }

    /// Undoes [`Lan::partition`] for `a` and `b`.
    pub fn heal(&self, a: usize, b: usize) {
        let pair = self.pair(a, b);
        self.update(|faults| {
            faults.partitions.remove(&pair);
        });
    }

    /// Undoes every [`Lan::partition`].
    pub fn heal_all(&self) {
        self.update(|faults| faults.partitions.clear());
    }

    /// Loses `percent` of the frames node `i` sends and of those it receives, at random; 0 turns
    /// loss off. Applied on the bridge rather than in the node, so the node's sockets see silent
    /// loss as on a real link, not the `EPERM` a local netfilter drop gives the sender.
    pub fn loss(&self, i: usize, percent: u8) {
        self.check(i);
        assert!(percent <= 100, "loss is a percentage, not {percent}");
        self.update(|faults| {
            if percent == 0 {
                faults.loss.remove(&i);
            } else {
                faults.loss.insert(i, percent);
            }
        });
    }

    /// Drops every IPv4 UDP datagram node `i` sends or receives (`false`: lets them through
    /// again), as a firewall that passes TCP only would.
    pub fn block_udp(&self, i: usize, blocked: bool) {
        self.check(i);
        self.update(|faults| {
            if blocked {
                faults.udp_blocked.insert(i);
            } else {
                faults.udp_blocked.remove(&i);
            }
        });
    }

    fn check(&self, i: usize) {
        assert!(
            i < self.nodes.len(),
            "node {i} does not exist: this Lan has {} nodes",
            self.nodes.len()
        );
    }

    fn pair(&self, a: usize, b: usize) -> (usize, usize) {
        self.check(a);
        self.check(b);
        assert_ne!(a, b, "cannot partition node {a} from itself");
        (a.min(b), a.max(b))
    }

    fn set_port(&self, i: usize, state: &str) {
        self.check(i);
        let port = format!("{}p{i}", self.prefix);
        self.bridge.run(&["ip", "link", "set", &port, state]);
    }

    /// Changes the faults and replaces the bridge's table with one that matches, in one nft
    /// transaction (add-then-delete makes the delete succeed whether or not the table existed).
    fn update(&self, change: impl FnOnce(&mut Faults)) {
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut faults);
        let mut script = format!("add table {NFT_TABLE}\ndelete table {NFT_TABLE}\n");
        if !faults.partitions.is_empty()
            || !faults.loss.is_empty()
            || !faults.udp_blocked.is_empty()
        {
            // The bridge family's forward hook sees every frame once per output port, flooded
            // ones too, with the ingress and egress bridge ports as iifname/oifname.
            let _ = writeln!(
                script,
                "table {NFT_TABLE} {{\n chain forward {{\n  \
                 type filter hook forward priority 0; policy accept;"
            );
            for (a, b) in &faults.partitions {
                let (pa, pb) = (
                    format!("{}p{a}", self.prefix),
                    format!("{}p{b}", self.prefix),
                );
                let _ = writeln!(script, "  iifname \"{pa}\" oifname \"{pb}\" drop");
                let _ = writeln!(script, "  iifname \"{pb}\" oifname \"{pa}\" drop");
            }
            for (i, &percent) in &faults.loss {
                let port = format!("{}p{i}", self.prefix);
                // nft rejects `< 100` for a value that is at most 99.
                let chance = if percent == 100 {
                    String::new()
                } else {
                    format!("numgen random mod 100 < {percent} ")
                };
                for dir in ["iifname", "oifname"] {
                    let _ = writeln!(script, "  {dir} \"{port}\" {chance}drop");
                }
            }
            for i in &faults.udp_blocked {
                let port = format!("{}p{i}", self.prefix);
                for dir in ["iifname", "oifname"] {
                    let _ = writeln!(script, "  {dir} \"{port}\" ip protocol udp drop");
                }
            }
            script.push_str(" }\n}\n");
        }
        self.bridge
            .run_with_input(&["nft", "-f", "-"], Some(&script));
    }
}
