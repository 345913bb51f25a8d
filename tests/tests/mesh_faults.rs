//! What strangers and broken members can throw at a device's port: each is dropped (with one
//! rate-limited log line), members keep working, memory stays bounded, nothing panics.
//!
//! The bad clients run inside the devices' network namespace, on threads that joined it.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use cnsprcy::identity::{Identity, PublicKey};
use cnsprcy::wire::{self, FLAG_MORE, HandshakePayload, MAX_CHUNK};
use cnsprcy_mesh::transport;
use cnsprcy_tests::netns::NetNs;
use cnsprcy_tests::{Device, wait_until};

const SOON: Duration = Duration::from_secs(20);
const A: &str = "127.0.0.1:17001";

/// Devices a and b with a session, in a fresh namespace; returns them and a's pid.
fn pair(ns: &NetNs) -> (Device, Device, u32) {
    let mut a = Device::new("a");
    let mut b = Device::new("b");
    a.configure(A);
    b.configure("127.0.0.1:17002");
    let pid = a.start_in(ns);
    b.start_in(ns);
    let (ka, kb) = (a.public_key(), b.public_key());
    a.cnspr(&["manage", "add", "b", &kb, "127.0.0.1:17002"])
        .success();
    b.cnspr(&["manage", "add", "a", &ka, A]).success();
    a.wait_status("b", "direct", SOON);
    (a, b, pid)
}

/// The members still talk: a session, and a ping over it.
fn members_still_work(a: &mut Device) {
    a.wait_status("b", "direct", SOON);
    let out = a.cnspr(&["ping", "b", "-c", "1"]).success().stdout;
    assert!(out.contains("pong from b"), "{out}");
}

/// Reads until the daemon closes the connection; returns how long after `started` that was
/// (None: not within `limit`).
fn wait_closed(stream: &mut TcpStream, started: Instant, limit: Duration) -> Option<Duration> {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return None;
            }
            Err(_) => return Some(started.elapsed()),
        }
    }
}

fn log_lines(device: &Device, needle: &str) -> usize {
    device
        .log("serve")
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// An identity that `a` has accepted as member "m".
fn member_identity(a: &Device) -> Identity {
    let m = Device::new("m");
    m.cnspr(&["manage", "init"]).success();
    let identity = Identity::load(&m.state_dir()).unwrap();
    a.cnspr(&["manage", "add", "m", &identity.public_key().to_string()])
        .success();
    identity
}

/// What a real device sends first; the daemon counts an accepted session only once it arrived.
fn hello() -> wire::Message {
    wire::Message::Hello(wire::Hello {
        name: "m".into(),
        listen: vec![],
        addresses: vec![],
    })
}

fn payload() -> HandshakePayload {
    HandshakePayload {
        version: wire::PROTOCOL_VERSION,
        incarnation: 42,
        joining: None,
        inducting: None,
    }
}

#[test]
fn garbage_bytes_on_the_port_are_dropped() {
    let ns = NetNs::new();
    let (mut a, _b, _) = pair(&ns);
    let closed = ns.run_in(|| {
        let mut stream = TcpStream::connect(A).unwrap();
        let garbage: Vec<u8> = (0..70_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        let _ = stream.write_all(&garbage);
        wait_closed(&mut stream, Instant::now(), SOON)
    });
    assert!(
        closed.is_some(),
        "the daemon kept a garbage connection open"
    );
    assert!(wait_until(SOON, || log_lines(&a, "dropped a connection") == 1));
    members_still_work(&mut a);
}

#[test]
fn a_strangers_handshake_is_refused() {
    let ns = NetNs::new();
    let (mut a, _b, _) = pair(&ns);
    let a_key: PublicKey = a.public_key().parse().unwrap();
    let stranger = Identity::generate();
    let outcome = ns.run_in(|| {
        runtime().block_on(async {
            let stream = tokio::net::TcpStream::connect(A).await.unwrap();
            transport::initiate(stream, &stranger, &a_key, &payload())
                .await
                .map(|_| ())
        })
    });
    assert!(
        outcome.is_err_and(|e| e.closed_by_peer()),
        "a stranger completed a handshake, or was not simply closed on"
    );
    assert!(
        wait_until(SOON, || log_lines(&a, "not a member") == 1),
        "{}",
        a.log("serve")
    );
    // ...and listed as a knock, with the key its handshake proved.
    let knocks = a.cnspr_json(&["status"])["knocks"].clone();
    assert_eq!(knocks.as_array().map(Vec::len), Some(1), "{knocks:#}");
    assert_eq!(
        knocks[0]["public_key"],
        stranger.public_key().to_string(),
        "{knocks:#}"
    );
    assert_eq!(knocks[0]["count"], 1, "{knocks:#}");
    members_still_work(&mut a);
}

#[test]
fn a_stalled_handshake_times_out() {
    let ns = NetNs::new();
    let (mut a, _b, _) = pair(&ns);
    let (silent, partial) = ns.run_in(|| {
        let started = Instant::now();
        let mut silent = TcpStream::connect(A).unwrap();
        let mut partial = TcpStream::connect(A).unwrap();
        // A frame header promising 100 bytes, then only 10 of them.
        partial.write_all(&[0, 100]).unwrap();
        partial.write_all(&[1; 10]).unwrap();
        (
            wait_closed(&mut silent, started, SOON),
            wait_closed(&mut partial, started, SOON),
        )
    });
    for closed in [silent, partial] {
        let after = closed.expect("a stalled handshake was never dropped");
        assert!(
            after >= Duration::from_secs(3),
            "dropped too early: {after:?}"
        );
        assert!(after <= transport::HANDSHAKE_TIMEOUT + Duration::from_secs(5));
    }
    assert!(wait_until(SOON, || a
        .log("serve")
        .contains("handshake did not complete")));
    members_still_work(&mut a);
}

#[test]
fn frames_over_the_limit_end_the_connection() {
    let ns = NetNs::new();
    let (mut a, _b, _) = pair(&ns);
    // Before a handshake: a maximal frame of noise.
    let closed = ns.run_in(|| {
        let mut stream = TcpStream::connect(A).unwrap();
        let _ = stream.write_all(&[0xff, 0xff]);
        let _ = stream.write_all(&vec![0x5a; 65535]);
        wait_closed(&mut stream, Instant::now(), SOON)
    });
    assert!(closed.is_some());

    // After a handshake: a member whose message grows past the 32 MiB limit loses its session.
    let identity = member_identity(&a);
    let a_key: PublicKey = a.public_key().parse().unwrap();
    let outcome = ns.run_in(|| {
        runtime().block_on(async {
            let stream = tokio::net::TcpStream::connect(A).await.unwrap();
            let session = transport::initiate(stream, &identity, &a_key, &payload())
                .await
                .expect("member handshake");
            let (mut reader, mut writer) = (session.reader, session.writer);
            writer.send(&hello()).await.expect("hello");
            let mut chunk = vec![FLAG_MORE];
            chunk.resize(MAX_CHUNK + 1, 0);
            let send = async {
                for _ in 0..(wire::MAX_MESSAGE_BYTES / MAX_CHUNK + 2) {
                    if writer.send_chunk(&chunk).await.is_err() {
                        break;
                    }
                }
            };
            // Our reader sees the daemon close the session (after its Hello and Neighbors).
            let read = async {
                loop {
                    if reader.recv().await.is_err() {
                        return;
                    }
                }
            };
            tokio::time::timeout(SOON * 3, async { tokio::join!(send, read) }).await
        })
    });
    assert!(outcome.is_ok(), "the session survived an over-long message");
    assert!(wait_until(SOON, || a
        .log("serve")
        .contains("message longer than")));
    members_still_work(&mut a);
}

#[test]
fn a_member_that_goes_silent_is_dropped_after_the_keepalive_timeout() {
    let ns = NetNs::new();
    let (mut a, _b, _) = pair(&ns);
    let identity = member_identity(&a);
    let a_key: PublicKey = a.public_key().parse().unwrap();
    let lasted = ns.run_in(|| {
        runtime().block_on(async {
            let stream = tokio::net::TcpStream::connect(A).await.unwrap();
            let mut session = transport::initiate(stream, &identity, &a_key, &payload())
                .await
                .expect("member handshake");
            session.writer.send(&hello()).await.expect("hello");
            // Read (pings arrive) but never answer.
            let started = Instant::now();
            let read = async { while session.reader.recv().await.is_ok() {} };
            tokio::time::timeout(SOON, read).await.ok()?;
            Some(started.elapsed())
        })
    });
    // keepalive_interval 1s + keepalive_timeout 2s in the test configuration.
    let lasted = lasted.expect("a silent member was never dropped");
    assert!(lasted >= Duration::from_secs(2), "{lasted:?}");
    // The connection closes before the node has logged why: give the line a moment.
    assert!(
        wait_until(SOON, || a.log("serve").contains("nothing received for 3s")),
        "{}",
        a.log("serve")
    );
    members_still_work(&mut a);
}

#[test]
fn thousands_of_connection_attempts_are_absorbed() {
    let ns = NetNs::new();
    let (mut a, _b, pid) = pair(&ns);
    let started = Instant::now();
    ns.run_in(|| {
        std::thread::scope(|scope| {
            for t in 0..16u8 {
                scope.spawn(move || {
                    for i in 0..200u32 {
                        let Ok(mut stream) = TcpStream::connect(A) else {
                            continue;
                        };
                        // Some say nothing, some send junk; all go away at once.
                        if (i + u32::from(t)) % 2 == 0 {
                            let _ = stream.write_all(&[t; 64]);
                        }
                        let _ = stream.shutdown(Shutdown::Both);
                    }
                });
            }
        });
    });
    let flood = started.elapsed();
    members_still_work(&mut a);
    // One line per kind and 10 s, plus the count of those left out.
    let logged = log_lines(&a, "dropped a connection") + log_lines(&a, "handshakes in progress");
    let allowed = 2 * (2 + flood.as_secs() as usize / 10);
    assert!(
        logged <= allowed,
        "{logged} log lines for 3200 connections in {flood:?}"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(
        rss_kb < 100 * 1024,
        "resident memory {rss_kb} kB after the flood"
    );
}

/// A TCP connection to `to` from the local address `from` (another loopback address stands for
/// another host).
fn connect_from(from: std::net::Ipv4Addr, to: &str) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(std::net::SocketAddrV4::new(from, 0)),
    )?;
    let to: std::net::SocketAddrV4 = to.parse().map_err(std::io::Error::other)?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(to))?;
    Ok(TcpStream::from(fd))
}

/// Whether the daemon has not closed `stream` yet (nothing is ever sent on it).
fn still_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    let _ = stream.set_nonblocking(true);
    matches!(stream.peek(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[test]
fn a_flood_of_stalled_handshakes_from_one_address_does_not_keep_a_member_out() {
    let ns = NetNs::new();
    let mut a = Device::new("a");
    let mut b = Device::new("b");
    a.configure(A);
    b.configure("127.0.0.1:17002");
    a.start_in(&ns);
    b.start_in(&ns);
    // `a` does not know where `b` is: only `b` can dial, through `a`'s listening socket.
    a.cnspr(&["manage", "add", "b", &b.public_key()]).success();
    let flooding = std::sync::atomic::AtomicBool::new(true);
    let stalled = std::sync::atomic::AtomicUsize::new(0);
    ns.run_in(|| {
        std::thread::scope(|scope| {
            // 100 connections from 127.0.0.2 that never send a byte, each reopened as soon as
            // the daemon drops it: more than all 64 handshake slots, all the time.
            scope.spawn(|| {
                let mut open: Vec<TcpStream> = Vec::new();
                while flooding.load(std::sync::atomic::Ordering::Relaxed) {
                    open.retain(still_open);
                    while open.len() < 100 {
                        match connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2), A) {
                            Ok(stream) => open.push(stream),
                            Err(_) => break,
                        }
                    }
                    stalled.store(open.len(), std::sync::atomic::Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
            let deadline = Instant::now() + SOON;
            while stalled.load(std::sync::atomic::Ordering::Relaxed) < 100
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            // The member dials while the flood holds every slot, and still gets in.
            b.cnspr(&["manage", "add", "a", &a.public_key(), A])
                .success();
            let started = Instant::now();
            let direct = wait_until(SOON, || {
                a.peers().get("b").is_some_and(|p| p["status"] == "direct")
            });
            flooding.store(false, std::sync::atomic::Ordering::Relaxed);
            assert!(
                direct,
                "b did not get a session within {:?} during the flood:\n{}",
                started.elapsed(),
                a.log("serve")
            );
        });
    });
    assert!(
        log_lines(&a, "to make room for another source") >= 1,
        "{}",
        a.log("serve")
    );
}
