//! The network namespace harness itself (`cnsprcy_tests::netns`), checked with real traffic:
//! namespaces run what they are given inside them, Lan nodes reach each other, cut, partition
//! and loss do what they say, and nothing is left behind, even by a test process that is killed.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cnsprcy_tests::netns::{Lan, NetNs};
use cnsprcy_tests::{STARTUP_TIMEOUT, wait_until};
use nix::sys::signal::Signal;

/// How long a working path may take to come up: generous, the CI machine is shared.
const SETTLE: Duration = Duration::from_secs(10);
/// How long a connect may hang before a path counts as blocked. A working path answers within
/// milliseconds, so this only bounds how long a blocked probe costs.
const BLOCKED_AFTER: Duration = Duration::from_millis(300);
/// The port each node listens on in [`listen_everywhere`]; ports are per namespace.
const PORT: u16 = 7000;

/// What a TCP connect from one node to another saw.
#[derive(Debug, PartialEq)]
enum Reach {
    Connected,
    /// An answer came (RST): the path works, nobody listens.
    Refused,
    /// No answer (timeout, host unreachable): the path is blocked.
    Blocked(String),
}

fn connect(lan: &Lan, from: usize, to: usize, timeout: Duration) -> Reach {
    let target = SocketAddr::new(lan.addr(to), PORT);
    lan.node(from)
        .run_in(|| match TcpStream::connect_timeout(&target, timeout) {
            Ok(_) => Reach::Connected,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Reach::Refused,
            Err(e) => Reach::Blocked(e.to_string()),
        })
}

/// Polls until `from` connects to `to`'s listener.
fn reaches(lan: &Lan, from: usize, to: usize) -> bool {
    wait_until(SETTLE, || {
        connect(lan, from, to, Duration::from_secs(1)) == Reach::Connected
    })
}

fn assert_reaches(lan: &Lan, from: usize, to: usize) {
    assert!(
        reaches(lan, from, to),
        "node {from} cannot reach node {to}: {:?}",
        connect(lan, from, to, Duration::from_secs(1))
    );
}

fn assert_blocked(lan: &Lan, from: usize, to: usize) {
    let reach = connect(lan, from, to, BLOCKED_AFTER);
    assert!(
        matches!(reach, Reach::Blocked(_)),
        "node {from} still reaches node {to}: {reach:?}"
    );
}

/// A listener on [`PORT`] in every node, at the node's address. Connections are never
/// accepted: a probe only needs the handshake, and the backlog holds far more than a test makes.
fn listen_everywhere(lan: &Lan) -> Vec<TcpListener> {
    (0..lan.nodes().len())
        .map(|i| {
            lan.node(i)
                .run_in(|| TcpListener::bind((lan.addr(i), PORT)))
                .unwrap_or_else(|e| panic!("listen in node {i}: {e}"))
        })
        .collect()
}

fn v4(addr: IpAddr) -> Ipv4Addr {
    match addr {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => panic!("Lan addresses are IPv4"),
    }
}

fn netns_of(pid: u32) -> String {
    fs::read_link(format!("/proc/{pid}/ns/net"))
        .unwrap_or_else(|e| panic!("netns of {pid}: {e}"))
        .to_string_lossy()
        .into_owned()
}

/// Whether any thread on the machine is in one of `namespaces` (`net:[INODE]`), or any fd of
/// this process refers to one.
fn in_use(namespaces: &BTreeSet<String>) -> bool {
    let is_ours = |link: std::path::PathBuf| namespaces.contains(&*link.to_string_lossy());
    let Ok(procs) = fs::read_dir("/proc") else {
        return true;
    };
    for proc in procs.flatten() {
        if !proc
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        // Threads count too: `run_in` threads of other tests sit in namespaces of their own.
        let Ok(tasks) = fs::read_dir(proc.path().join("task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if fs::read_link(task.path().join("ns/net")).is_ok_and(is_ours) {
                return true;
            }
        }
    }
    fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .any(|fd| fs::read_link(fd.path()).is_ok_and(is_ours))
}

/// `ip -br link` of the test's own namespace (reading only).
fn root_links() -> String {
    let output = Command::new("ip")
        .args(["-br", "link"])
        .output()
        .expect("run ip");
    assert!(output.status.success(), "ip -br link: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn lan_namespaces(lan: &Lan) -> (Vec<u32>, BTreeSet<String>) {
    let pids: Vec<u32> = std::iter::once(lan.bridge())
        .chain(lan.nodes())
        .map(NetNs::pid)
        .collect();
    let namespaces = pids.iter().map(|&pid| netns_of(pid)).collect();
    (pids, namespaces)
}

#[test]
fn a_namespace_has_only_loopback_and_runs_commands_inside() {
    let ns = NetNs::new();
    let inside = netns_of(ns.pid());
    assert_ne!(inside, netns_of(std::process::id()));

    let links = ns.run(&["ip", "-br", "link"]);
    let lines: Vec<&str> = links.lines().collect();
    assert_eq!(lines.len(), 1, "{links}");
    assert!(
        lines[0].starts_with("lo ") && lines[0].contains("UP"),
        "{links}"
    );

    // A command started in the namespace is the program itself, with no wrapper process.
    let mut child = ns.command("sleep").arg("30").spawn().expect("spawn sleep");
    let comm = fs::read_to_string(format!("/proc/{}/comm", child.id())).unwrap();
    assert_eq!(comm.trim(), "sleep");
    assert_eq!(netns_of(child.id()), inside);
    child.kill().unwrap();
    child.wait().unwrap();

    // Sockets made in `run_in` live in the namespace: its loopback carries traffic, and `ss`
    // inside sees the listener.
    let listener = ns
        .run_in(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    assert!(
        ns.run(&["ss", "-Htln"])
            .contains(&format!("127.0.0.1:{port}")),
        "listener not in the namespace"
    );
    let mut stream = ns
        .run_in(|| TcpStream::connect((Ipv4Addr::LOCALHOST, port)))
        .unwrap();
    std::io::Write::write_all(&mut stream, b"hi").unwrap();
    drop(stream);
    let mut text = String::new();
    listener
        .accept()
        .unwrap()
        .0
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, "hi");
}

#[test]
fn link_to_wires_two_namespaces_and_nothing_else() {
    let (a, b) = (NetNs::new(), NetNs::new());
    a.link_to("wire0", "10.233.7.1/24", &b, "wire1", "10.233.7.2/24");
    assert!(a.run(&["ip", "-br", "addr"]).contains("10.233.7.1/24"));
    assert!(b.run(&["ip", "-br", "addr"]).contains("10.233.7.2/24"));
    let listener = b.run_in(|| TcpListener::bind(("10.233.7.2", 0))).unwrap();
    let target = listener.local_addr().unwrap();
    let connected = wait_until(SETTLE, || {
        a.run_in(|| TcpStream::connect_timeout(&target, Duration::from_secs(1)))
            .is_ok()
    });
    assert!(connected, "a cannot reach b over the link");
    let root = root_links();
    assert!(
        !root.contains("wire0") && !root.contains("wire1"),
        "the link showed up outside the namespaces:\n{root}"
    );
}

#[test]
fn processes_in_a_namespace_die_with_the_thread_that_spawned_them() {
    let ns = NetNs::new();
    // The spawning thread ends at once; the process must not outlive it.
    let mut child: Child = std::thread::scope(|scope| {
        scope
            .spawn(|| ns.command("sleep").arg("60").spawn().expect("spawn sleep"))
            .join()
            .unwrap()
    });
    let mut status = None;
    let died = wait_until(SETTLE, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if !died {
        let _ = child.kill();
        let _ = child.wait();
        panic!("a process survived the thread that spawned it");
    }
    assert_eq!(status.unwrap().signal(), Some(Signal::SIGKILL as i32));
}

#[test]
fn lan_nodes_have_their_address_and_reach_each_other() {
    let lan = Lan::new(2);
    for i in 0..2 {
        let addrs = lan
            .node(i)
            .run(&["ip", "-br", "-4", "addr", "show", "dev", "eth0"]);
        assert!(addrs.contains(&format!("{}/24", lan.addr(i))), "{addrs}");
        let routes = lan.node(i).run(&["ip", "route", "show", "dev", "eth0"]);
        assert!(routes.contains("224.0.0.0/4"), "{routes}");
    }

    // A real process in node 0 (bash's /dev/tcp, bounded by `timeout`) talks to node 1.
    let listener = lan
        .node(1)
        .run_in(|| TcpListener::bind((lan.addr(1), PORT)))
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let sent = lan
        .node(0)
        .command("timeout")
        .args(["10", "bash", "-c", r#"echo hello >"/dev/tcp/$0/$1""#])
        .arg(lan.addr(1).to_string())
        .arg(PORT.to_string())
        .status()
        .expect("run bash");
    assert!(sent.success(), "bash could not connect: {sent}");
    let mut accepted = None;
    assert!(wait_until(SETTLE, || {
        accepted = listener.accept().ok();
        accepted.is_some()
    }));
    let (mut stream, peer) = accepted.unwrap();
    assert_eq!(peer.ip(), lan.addr(0));
    stream.set_nonblocking(false).unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert_eq!(text, "hello\n");

    // And back, through std sockets in the nodes.
    drop(listener);
    let _listeners = listen_everywhere(&lan);
    assert_reaches(&lan, 1, 0);
}

#[test]
fn cut_stops_a_node_and_restore_brings_it_back() {
    let lan = Lan::new(2);
    let _listeners = listen_everywhere(&lan);
    assert_reaches(&lan, 0, 1);

    lan.cut(1);
    assert_blocked(&lan, 0, 1);
    assert_blocked(&lan, 1, 0);
    // The node side is untouched: carrier is gone but the hand-added route stays.
    let link = lan
        .node(1)
        .run(&["ip", "-br", "link", "show", "dev", "eth0"]);
    assert!(link.contains("NO-CARRIER"), "{link}");
    let routes = lan.node(1).run(&["ip", "route", "show", "dev", "eth0"]);
    assert!(routes.contains("224.0.0.0/4"), "{routes}");

    lan.restore(1);
    assert_reaches(&lan, 0, 1);
    assert_reaches(&lan, 1, 0);
}

#[test]
fn partition_separates_two_nodes_and_no_others() {
    let lan = Lan::new(3);
    let _listeners = listen_everywhere(&lan);
    for (a, b) in [(0, 1), (1, 0), (0, 2), (1, 2)] {
        assert_reaches(&lan, a, b);
    }

    lan.partition(0, 1);
    assert_blocked(&lan, 0, 1);
    assert_blocked(&lan, 1, 0);
    for (a, b) in [(0, 2), (2, 0), (1, 2), (2, 1)] {
        assert_reaches(&lan, a, b);
    }

    // Multicast (as mDNS will send it) from node 0 reaches node 2 but not node 1.
    let group = Ipv4Addr::new(239, 255, 42, 1);
    let receivers: Vec<UdpSocket> = [1, 2]
        .map(|i| {
            lan.node(i).run_in(|| {
                let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 5454)).unwrap();
                socket.join_multicast_v4(&group, &v4(lan.addr(i))).unwrap();
                socket.set_nonblocking(true).unwrap();
                socket
            })
        })
        .into();
    let sender = lan
        .node(0)
        .run_in(|| UdpSocket::bind((lan.addr(0), 0)))
        .unwrap();
    let mut buf = [0; 16];
    assert!(
        wait_until(SETTLE, || {
            sender.send_to(b"ping", (group, 5454)).unwrap();
            receivers[1].recv(&mut buf).is_ok()
        }),
        "node 2 did not hear node 0's multicast"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        receivers[0].recv(&mut buf).is_err(),
        "node 1 heard node 0's multicast across the partition"
    );

    lan.heal(1, 0);
    assert_reaches(&lan, 0, 1);
    assert_reaches(&lan, 1, 0);

    lan.partition(0, 2);
    lan.partition(1, 2);
    assert_blocked(&lan, 2, 0);
    assert_blocked(&lan, 1, 2);
    lan.heal_all();
    assert_reaches(&lan, 2, 0);
    assert_reaches(&lan, 1, 2);
    let rules = lan.bridge().run(&["nft", "list", "ruleset"]);
    assert!(
        rules.trim().is_empty(),
        "rules left after heal_all:\n{rules}"
    );
}

#[test]
fn loss_drops_about_the_given_share_of_packets() {
    let lan = Lan::new(2);
    let receiver = lan
        .node(1)
        .run_in(|| UdpSocket::bind((lan.addr(1), PORT)))
        .unwrap();
    let sender = lan
        .node(0)
        .run_in(|| UdpSocket::bind((lan.addr(0), 0)))
        .unwrap();
    let target = SocketAddr::new(lan.addr(1), PORT);
    // Resolves node 1's MAC address (the kernel queues only a few packets until then) and
    // empties the queue.
    let settle = || {
        receiver.set_nonblocking(true).unwrap();
        let mut buf = [0; 16];
        assert!(wait_until(SETTLE, || {
            sender.send_to(b"hello", target).unwrap();
            receiver.recv(&mut buf).is_ok()
        }));
        std::thread::sleep(Duration::from_millis(100));
        while receiver.recv(&mut buf).is_ok() {}
        receiver.set_nonblocking(false).unwrap();
    };
    // Sends `n` datagrams while a thread counts those that arrive; counting concurrently keeps
    // the receive buffer from overflowing, which would look like loss.
    let delivered = |n: usize| -> usize {
        receiver
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        std::thread::scope(|scope| {
            let counter = scope.spawn(|| {
                let mut buf = [0; 16];
                let mut count = 0;
                while receiver.recv(&mut buf).is_ok() {
                    count += 1;
                }
                count
            });
            for k in 0..n {
                sender.send_to(b"data", target).unwrap();
                if k % 50 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            counter.join().unwrap()
        })
    };

    settle();
    assert_eq!(delivered(200), 200, "packets lost without loss set");

    lan.loss(1, 50);
    // Binomial(400, 0.5): 200 +- 10; these bounds are 10 standard deviations out.
    let got = delivered(400);
    assert!(
        (100..=300).contains(&got),
        "{got} of 400 arrived at 50% loss"
    );

    lan.loss(1, 100);
    assert_eq!(delivered(50), 0, "packets arrived at 100% loss");

    lan.loss(1, 0);
    settle();
    assert_eq!(
        delivered(200),
        200,
        "packets lost after loss was turned off"
    );
    let rules = lan.bridge().run(&["nft", "list", "ruleset"]);
    assert!(rules.trim().is_empty(), "rules left after loss 0:\n{rules}");
}

#[test]
fn dropping_a_lan_leaves_nothing_behind() {
    let lan = Lan::new(2);
    let prefix = lan.interface_prefix().to_owned();
    let (pids, namespaces) = lan_namespaces(&lan);
    let bridge_links = lan.bridge().run(&["ip", "-br", "link"]);
    assert!(
        bridge_links.contains(&format!("{prefix}br")),
        "{bridge_links}"
    );
    // Nothing of it ever lives in the test's own namespace.
    assert!(!root_links().contains(&prefix), "{}", root_links());

    drop(lan);
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "holder {pid} still exists"
        );
    }
    // Namespaces die when their last user goes; the kernel does it right away, but poll anyway.
    assert!(
        wait_until(SETTLE, || !in_use(&namespaces)),
        "{namespaces:?} still in use"
    );
    assert!(!root_links().contains(&prefix), "{}", root_links());
}

/// Set for the child process of [`a_killed_test_process_leaves_nothing_behind`].
const CHILD_ENV: &str = "CNSPRCY_NETNS_HARNESS_CHILD";
/// Starts the line on which the child reports its Lan.
const LAN_MARKER: &str = "netns-harness-lan";

/// Not a test on its own: builds a Lan, says what it made, and waits to be killed.
#[test]
#[ignore = "run by a_killed_test_process_leaves_nothing_behind in a child process"]
fn hold_a_lan_until_killed() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let lan = Lan::new(2);
    let (pids, _) = lan_namespaces(&lan);
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    // libtest has printed "test NAME ... " without a newline before this.
    println!(
        "\n{LAN_MARKER} {} {}",
        lan.interface_prefix(),
        pids.join(" ")
    );
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Kills its child process when dropped, so a failing test does not leave it running.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_killed_test_process_leaves_nothing_behind() {
    let mut cmd = Command::new(std::env::current_exe().expect("test executable"));
    cmd.args([
        "--exact",
        "hold_a_lan_until_killed",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, "1")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    let mut child = KillOnDrop(cmd.spawn().expect("spawn the child test"));
    // Read on a thread, so that a child that never reports fails the test instead of hanging it.
    let stdout = BufReader::new(child.0.stdout.take().unwrap());
    let (report, reported) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let line = stdout
            .lines()
            .map_while(Result::ok)
            .find(|line| line.starts_with(LAN_MARKER));
        let _ = report.send(line);
    });
    let Ok(Some(line)) = reported.recv_timeout(STARTUP_TIMEOUT) else {
        let _ = child.0.kill();
        let mut stderr = String::new();
        let _ = child.0.stderr.take().unwrap().read_to_string(&mut stderr);
        panic!("the child test did not report its Lan:\n{stderr}");
    };
    let mut words = line.split_whitespace().skip(1);
    let prefix = words.next().expect("prefix").to_owned();
    let pids: Vec<u32> = words.map(|w| w.parse().expect("pid")).collect();
    assert_eq!(pids.len(), 3, "{line}");
    let namespaces: BTreeSet<String> = pids.iter().map(|&pid| netns_of(pid)).collect();
    assert!(in_use(&namespaces));

    // SIGKILL: no unwinding, no Drop; only the death signal cleans up.
    child.0.kill().unwrap();
    let status = child.0.wait().unwrap();
    assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
    assert!(
        wait_until(SETTLE, || !in_use(&namespaces)),
        "namespaces {namespaces:?} survived their test process"
    );
    assert!(!root_links().contains(&prefix), "{}", root_links());
}
