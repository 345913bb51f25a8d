//! Benchmarks of the mesh (issue 3): session setup, ping round trips, bulk throughput of
//! encrypted frames, and the memory, CPU time and bytes of an idle mesh of real daemons. Prints
//! the results as a Markdown table; `docs/performance.md` holds a copy with the machine it ran on.
//!
//! ```text
//! cargo build --release --workspace
//! cargo bench -p cnsprcy-tests --bench mesh [-- SECTION...]
//! ```
//!
//! Sections: `setup`, `ping`, `throughput`, `idle` (the idle mesh, then the memory of a daemon
//! with 10 peers); all by default. `CNSPRCY_BENCH_IDLE_SECS` watches the idle mesh longer than
//! 60 s. Needs root: every socket and every daemon lives in a network namespace made here, with
//! only `lo` (127.0.0.1) in it. The daemons are the release binaries next to this executable
//! (`target/release`), as they were last built: rebuild them first. Daemons are started from the
//! main thread only (see the `PR_SET_PDEATHSIG` caveat in `cnsprcy_tests::netns`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cnsprcy::identity::{Identity, PublicKey};
use cnsprcy::wire::{self, HandshakePayload, Hello, Message, TAG_LEN};
use cnsprcy_mesh::transport::{self, Session};
use cnsprcy_tests::netns::NetNs;
use cnsprcy_tests::{Device, wait_until};
use serde_json::{Value, json};
use snow::params::CipherChoice;
use snow::resolvers::{CryptoResolver, DefaultResolver};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Timed repetitions of each cheap measurement (the variants compared take turns within each
/// run), and samples in each.
const RUNS: usize = 5;
const SAMPLES: usize = 200;
const WARMUP: usize = 20;
/// Bytes moved by each bulk throughput run.
const BULK_BYTES: usize = 256 << 20;
/// Samples of the daemon-level session setup (each removes and re-adds two members).
const DAEMON_SETUPS: usize = 20;
/// Devices of the idle mesh, and how long it is watched.
const IDLE_DEVICES: usize = 10;
const IDLE_WINDOW: Duration = Duration::from_secs(60);
/// Set to watch the idle mesh longer (seconds, in steps of 20).
const IDLE_WINDOW_VAR: &str = "CNSPRCY_BENCH_IDLE_SECS";
const IDLE_STEP: Duration = Duration::from_secs(20);
/// The default keepalive (`cnsprcy::config::MeshConfig::default`), for the expected traffic.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(20);
/// Bound for anything a daemon should finish in a second or two.
const SOON: Duration = Duration::from_secs(30);

static P1: HandshakePayload = HandshakePayload {
    version: wire::PROTOCOL_VERSION,
    incarnation: 1,
    joining: None,
    inducting: None,
};
static P2: HandshakePayload = HandshakePayload {
    version: wire::PROTOCOL_VERSION,
    incarnation: 2,
    joining: None,
    inducting: None,
};
/// A nonce of the size a random one usually has (postcard varint: 10 bytes).
const NONCE: u64 = 0xdead_beef_dead_beef;

fn main() {
    let sections: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |name: &str| sections.is_empty() || sections.iter().any(|s| s == name);
    assert!(
        cnsprcy_tests::is_root(),
        "the mesh benchmark needs root: it makes network namespaces"
    );
    let bin_dir = bin_dir();
    let cnspr = bin_dir.join("cnspr");
    let started = Instant::now();
    let machine = machine();
    println!("{machine}\nbinaries: {}\n", bin_dir.display());

    let mut table = Table::default();
    if wanted("setup") {
        setup(&mut table);
        daemon_setup(&mut table, &cnspr);
    }
    if wanted("ping") {
        ping(&mut table, &cnspr);
    }
    if wanted("throughput") {
        throughput(&mut table);
    }
    if wanted("idle") {
        idle_and_memory(&mut table, &cnspr);
    }
    println!(
        "\n{machine}\nload average at the end: {}\nbenchmark took {:.0} s\n\n{}",
        read("/proc/loadavg").trim(),
        started.elapsed().as_secs_f64(),
        table.markdown()
    );
}

// ---------------------------------------------------------------------------------------------
// Section 1: session setup

fn setup(table: &mut Table) {
    let ns = NetNs::new();
    let (mut tcp, mut noise, mut session) =
        (Series::default(), Series::default(), Series::default());
    // The variants take turns in every run, so that a burst of load elsewhere on the machine
    // hits all of them, and their ratio is taken within each run.
    for run in 0..RUNS {
        let (t, n, s) = ns.run_in(|| {
            runtime().block_on(async {
                let t = tcp_connect_times(SAMPLES).await;
                let n = noise_in_memory_times(SAMPLES);
                let s = session_setup_times(SAMPLES).await;
                (t, n, s)
            })
        });
        tcp.push(t);
        noise.push(n);
        session.push(s);
        eprintln!("setup: run {} of {RUNS} done", run + 1);
    }
    let (tcp, noise, session) = (tcp.stats(), noise.stats(), session.stats());
    table.row(
        "setup",
        "TCP connect + accept (loopback, in-process, tokio)",
        tcp.latency(),
        "baseline for the session setup",
    );
    table.row(
        "setup",
        "Noise IK handshake, crypto only (snow, both sides in one thread, no I/O)",
        noise.latency(),
        "10 X25519 operations and the BLAKE2s hashing of both sides",
    );
    table.row(
        "setup",
        "**Session setup**: TCP connect + Noise IK handshake (`transport::initiate`/`respond`, \
         loopback, in-process, responder in its own task)",
        session.latency(),
        &format!(
            "{} TCP connect; the handshake's crypto is {:.0}% of it",
            ratio(&session.run_medians, &tcp.run_medians, 1),
            100.0 * noise.median / session.median
        ),
    );
}

async fn tcp_connect_times(n: usize) -> Vec<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let mut times = Vec::with_capacity(n);
    for i in 0..n + WARMUP {
        let started = Instant::now();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let elapsed = started.elapsed();
        drop((client.expect("connect"), server.expect("accept")));
        if i >= WARMUP {
            times.push(elapsed);
        }
    }
    times
}

fn noise_builder<'a>(
    params: &snow::params::NoiseParams,
    identity: &'a Identity,
) -> snow::Builder<'a> {
    snow::Builder::new(params.clone())
        .prologue(wire::PROLOGUE)
        .expect("prologue")
        .local_private_key(identity.secret_bytes())
        .expect("private key")
}

fn noise_in_memory_times(n: usize) -> Vec<Duration> {
    let (a, b) = (Identity::generate(), Identity::generate());
    let params: snow::params::NoiseParams = cnsprcy::NOISE_PARAMS.parse().expect("noise params");
    let (payload_a, payload_b) = (P1.encode(), P2.encode());
    let (mut message, mut out) = ([0u8; 256], [0u8; 256]);
    let b_key = b.public_key();
    let mut times = Vec::with_capacity(n);
    for i in 0..n + WARMUP {
        let started = Instant::now();
        let mut initiator = noise_builder(&params, &a)
            .remote_public_key(b_key.as_bytes())
            .expect("remote key")
            .build_initiator()
            .expect("initiator");
        let mut responder = noise_builder(&params, &b)
            .build_responder()
            .expect("responder");
        let len = initiator
            .write_message(&payload_a, &mut message)
            .expect("write 1");
        responder
            .read_message(&message[..len], &mut out)
            .expect("read 1");
        let len = responder
            .write_message(&payload_b, &mut message)
            .expect("write 2");
        initiator
            .read_message(&message[..len], &mut out)
            .expect("read 2");
        let pair = (
            initiator
                .into_stateless_transport_mode()
                .expect("transport"),
            responder
                .into_stateless_transport_mode()
                .expect("transport"),
        );
        let elapsed = started.elapsed();
        black_box(pair);
        if i >= WARMUP {
            times.push(elapsed);
        }
    }
    times
}

/// From `connect()` until both sides hold a `Session`; the responder runs in its own task, as
/// in the daemon.
async fn session_setup_times(n: usize) -> Vec<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let a = Identity::generate();
    let b = Arc::new(Identity::generate());
    let (a_key, b_key) = (a.public_key(), b.public_key());
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                break;
            };
            let _ = stream.set_nodelay(true);
            let session = transport::respond(stream, &b, |k: &PublicKey| *k == a_key, &P2).await;
            if done_tx.send(session.is_ok()).is_err() {
                break;
            }
        }
    });
    let mut times = Vec::with_capacity(n);
    for i in 0..n + WARMUP {
        let started = Instant::now();
        let stream = TcpStream::connect(addr).await.expect("connect");
        let _ = stream.set_nodelay(true);
        let session = transport::initiate(stream, &a, &b_key, &P1)
            .await
            .expect("initiate");
        assert_eq!(done.recv().await, Some(true), "the responder failed");
        let elapsed = started.elapsed();
        drop(session);
        if i >= WARMUP {
            times.push(elapsed);
        }
    }
    server.abort();
    times
}

/// Two daemons: `members.add` on both sides (over the API socket, not by running `cnspr`) until
/// both show the other `direct`; then both remove each other and it starts again.
fn daemon_setup(table: &mut Table, cnspr: &Path) {
    let ns = NetNs::new();
    let mut a = Device::new("a");
    let mut b = Device::new("b");
    configure_default(&a, &listen_addr(0));
    configure_default(&b, &listen_addr(1));
    start(&mut a, &ns, cnspr);
    start(&mut b, &ns, cnspr);
    let (ka, kb) = (a.public_key(), b.public_key());
    let (mut api_a, mut api_b) = (Api::connect(&a), Api::connect(&b));
    let mut times = Vec::with_capacity(DAEMON_SETUPS);
    let mut adds = Vec::with_capacity(DAEMON_SETUPS);
    let mut removes = Vec::with_capacity(DAEMON_SETUPS);
    let mut polls = 0usize;
    for _ in 0..DAEMON_SETUPS {
        let started = Instant::now();
        api_a.add_member("b", &kb, &listen_addr(1));
        api_b.add_member("a", &ka, &listen_addr(0));
        adds.push(started.elapsed());
        let deadline = started + SOON;
        loop {
            polls += 1;
            if api_a.peer_status("b") == "direct" && api_b.peer_status("a") == "direct" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a and b did not become direct:\n{}\n{}",
                a.log("serve"),
                b.log("serve")
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        times.push(started.elapsed());
        let removing = Instant::now();
        api_a
            .call("members.remove", json!({ "name": "b" }))
            .expect("remove b");
        removes.push(removing.elapsed());
        api_b
            .call("members.remove", json!({ "name": "a" }))
            .expect("remove a");
        assert!(
            wait_until(SOON, || sockets(&ns).is_empty()),
            "the session outlived members.remove"
        );
    }
    let stats = Series::single(times).stats();
    let adds = Series::single(adds).stats();
    let removes = Series::single(removes).stats();
    table.row(
        "setup",
        "Session setup between two daemons: `members.add` on both sides → both show `direct`",
        format!(
            "median {}, min {}, max {} (n={})",
            fmt_us(stats.median),
            fmt_us(stats.min),
            fmt_us(stats.max),
            stats.n
        ),
        &format!(
            "both add with the other's address, so both dial; includes the two `members.add` \
             calls (median {} for both, min {}; one `members.remove` takes {}) and polling \
             `peer` on both every 0.2 ms ({:.1} polls per sample)",
            fmt_us(adds.median),
            fmt_us(adds.min),
            fmt_us(removes.median),
            polls as f64 / DAEMON_SETUPS as f64
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// Section 2: ping round trips

/// Bytes on the wire of a `Ping` (as `cnspr ping` sends it) and of its `Pong`: 2-byte length,
/// flag byte, postcard message, tag.
fn ping_sizes() -> (usize, usize) {
    let frame = |m: &Message| 2 + 1 + m.encode().len() + TAG_LEN;
    (
        frame(&Message::Ping {
            nonce: NONCE,
            rtt_us: None,
        }),
        frame(&Message::Pong { nonce: NONCE }),
    )
}

fn ping(table: &mut Table, cnspr: &Path) {
    let (ping_len, pong_len) = ping_sizes();
    let ns = NetNs::new();
    // Two daemons with a session; pings from a to b through a's API.
    let mut a = Device::new("a");
    let mut b = Device::new("b");
    configure_default(&a, &listen_addr(0));
    configure_default(&b, &listen_addr(1));
    start(&mut a, &ns, cnspr);
    start(&mut b, &ns, cnspr);
    let (ka, kb) = (a.public_key(), b.public_key());
    let mut api = Api::connect(&a);
    api.add_member("b", &kb, &listen_addr(1));
    Api::connect(&b).add_member("a", &ka, &listen_addr(0));
    assert!(
        wait_until(SOON, || api.peer_status("b") == "direct"),
        "no session:\n{}",
        a.log("serve")
    );

    let mut raw_std = Series::default();
    let mut raw_tokio = Series::default();
    let mut session = Series::default();
    let mut api_ping = Series::default();
    let mut daemon_rtt = Series::default();
    let mut api_peer = Series::default();
    for run in 0..RUNS {
        let (s, t, x) = ns.run_in(|| {
            let s = std_tcp_pingpong(ping_len, pong_len, SAMPLES);
            let (t, x) = runtime().block_on(async {
                let t = tokio_tcp_pingpong(ping_len, pong_len, SAMPLES).await;
                let x = session_pingpong(SAMPLES).await;
                (t, x)
            });
            (s, t, x)
        });
        raw_std.push(s);
        raw_tokio.push(t);
        session.push(x);
        let (mut client, mut daemon, mut peer) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..SAMPLES + WARMUP {
            let started = Instant::now();
            let result = api
                .call("ping", json!({ "name": "b" }))
                .unwrap_or_else(|e| panic!("ping failed: {e}\n{}", a.log("serve")));
            let elapsed = started.elapsed();
            if i >= WARMUP {
                client.push(elapsed);
                let ms = result["rtt_ms"].as_f64().expect("rtt_ms");
                daemon.push(Duration::from_secs_f64(ms / 1000.0));
            }
        }
        for i in 0..SAMPLES + WARMUP {
            let started = Instant::now();
            api.call("peer", json!({ "name": "b" })).expect("peer");
            if i >= WARMUP {
                peer.push(started.elapsed());
            }
        }
        api_ping.push(client);
        daemon_rtt.push(daemon);
        api_peer.push(peer);
        eprintln!("ping: run {} of {RUNS} done", run + 1);
    }

    let raw_std = raw_std.stats();
    let vs_raw = |s: &Stats| format!("{} raw TCP", ratio(&s.run_medians, &raw_std.run_medians, 1));
    let raw_tokio = raw_tokio.stats();
    let session = session.stats();
    let daemon_rtt = daemon_rtt.stats();
    let api_ping = api_ping.stats();
    let api_peer = api_peer.stats();
    table.row(
        "ping",
        &format!("Raw TCP ping-pong, blocking std sockets ({ping_len} B → {pong_len} B)"),
        raw_std.latency(),
        "baseline: the same bytes as a mesh ping and pong, no crypto, TCP_NODELAY",
    );
    table.row(
        "ping",
        "Raw TCP ping-pong, tokio (2 workers, like `cnspr serve`)",
        raw_tokio.latency(),
        &vs_raw(&raw_tokio),
    );
    table.row(
        "ping",
        "Encrypted `Session` ping-pong, in-process (`send(Ping)` → `recv` → `send(Pong)` → \
         `recv`, tokio)",
        session.latency(),
        &vs_raw(&session),
    );
    table.row(
        "ping",
        "**Mesh ping** between two daemons, as the daemon measures it (`rtt_ms` of the `ping` \
         result)",
        daemon_rtt.latency(),
        &format!(
            "{}; {} the in-process `Session`",
            vs_raw(&daemon_rtt),
            ratio(&daemon_rtt.run_medians, &session.run_medians, 1)
        ),
    );
    table.row(
        "ping",
        "**Mesh ping** as a client of the JSON API sees it (`ping` call on a kept-open socket)",
        api_ping.latency(),
        &format!(
            "{}; includes the UNIX socket hop and JSON",
            vs_raw(&api_ping)
        ),
    );
    table.row(
        "ping",
        "JSON API call without network (`peer`), same socket",
        api_peer.latency(),
        "the API's share of the row above",
    );
}

fn std_tcp_pingpong(ping_len: usize, pong_len: usize, n: usize) -> Vec<Duration> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        stream.set_nodelay(true).expect("nodelay");
        let mut buf = vec![0u8; ping_len];
        let reply = vec![0x55u8; pong_len];
        while stream.read_exact(&mut buf).is_ok() {
            if stream.write_all(&reply).is_err() {
                break;
            }
        }
    });
    let mut client = std::net::TcpStream::connect(addr).expect("connect");
    client.set_nodelay(true).expect("nodelay");
    let ping = vec![0xaau8; ping_len];
    let mut pong = vec![0u8; pong_len];
    let mut times = Vec::with_capacity(n);
    for i in 0..n + WARMUP {
        let started = Instant::now();
        client.write_all(&ping).expect("send ping");
        client.read_exact(&mut pong).expect("read pong");
        if i >= WARMUP {
            times.push(started.elapsed());
        }
    }
    drop(client);
    server.join().expect("echo thread");
    times
}

async fn tokio_tcp_pingpong(ping_len: usize, pong_len: usize, n: usize) -> Vec<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        stream.set_nodelay(true).expect("nodelay");
        let mut buf = vec![0u8; ping_len];
        let reply = vec![0x55u8; pong_len];
        while stream.read_exact(&mut buf).await.is_ok() {
            if stream.write_all(&reply).await.is_err() {
                break;
            }
        }
    });
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client.set_nodelay(true).expect("nodelay");
    let ping = vec![0xaau8; ping_len];
    let mut pong = vec![0u8; pong_len];
    let mut times = Vec::with_capacity(n);
    for i in 0..n + WARMUP {
        let started = Instant::now();
        client.write_all(&ping).await.expect("send ping");
        client.read_exact(&mut pong).await.expect("read pong");
        if i >= WARMUP {
            times.push(started.elapsed());
        }
    }
    drop(client);
    server.await.expect("echo task");
    times
}

async fn session_pingpong(n: usize) -> Vec<Duration> {
    let (mut a, mut b) = session_pair().await;
    let echo = tokio::spawn(async move {
        while let Ok(Some(Message::Ping { nonce, .. })) = b.reader.recv().await {
            if b.writer.send(&Message::Pong { nonce }).await.is_err() {
                break;
            }
        }
    });
    let ping = Message::Ping {
        nonce: NONCE,
        rtt_us: None,
    };
    let mut times = Vec::with_capacity(n);
    for i in 0..n + WARMUP {
        let started = Instant::now();
        a.writer.send(&ping).await.expect("send ping");
        let pong = a.reader.recv().await.expect("read pong");
        let elapsed = started.elapsed();
        assert_eq!(pong, Some(Message::Pong { nonce: NONCE }));
        if i >= WARMUP {
            times.push(elapsed);
        }
    }
    drop(a);
    echo.await.expect("echo task");
    times
}

// ---------------------------------------------------------------------------------------------
// Section 3: bulk throughput

const SIZES: [usize; 2] = [64 << 10, 1 << 20];

fn throughput(table: &mut Table) {
    let ns = NetNs::new();
    let (mut enc, mut dec) = (Vec::new(), Vec::new());
    // (workers, size) -> MB/s per run
    let mut session: Vec<((usize, usize), Vec<f64>)> = [2, 1]
        .iter()
        .flat_map(|&w| SIZES.iter().map(move |&s| ((w, s), Vec::new())))
        .collect();
    let mut tcp: Vec<(usize, Vec<f64>)> = SIZES.iter().map(|&s| (s, Vec::new())).collect();
    for run in 0..RUNS {
        let (e, d) = cipher_speed();
        enc.push(mb_per_s(BULK_BYTES, e));
        dec.push(mb_per_s(BULK_BYTES, d));
        for ((workers, size), results) in &mut session {
            let (workers, size) = (*workers, *size);
            let elapsed =
                ns.run_in(|| runtime_with(workers).block_on(session_bulk(size, BULK_BYTES / size)));
            results.push(mb_per_s(BULK_BYTES, elapsed));
        }
        for (size, results) in &mut tcp {
            let size = *size;
            let elapsed = ns.run_in(|| runtime().block_on(tcp_bulk(size, 4 * BULK_BYTES)));
            results.push(mb_per_s(4 * BULK_BYTES, elapsed));
        }
        eprintln!("throughput: run {} of {RUNS} done", run + 1);
    }
    table.row(
        "throughput",
        "ChaCha20-Poly1305 encrypt, one core, 64 KiB buffers (snow's cipher, i.e. the \
         `chacha20poly1305` 0.10 crate, as sessions use it)",
        fmt_mbs(&enc),
        "baseline",
    );
    table.row(
        "throughput",
        "ChaCha20-Poly1305 decrypt, one core, 64 KiB buffers",
        fmt_mbs(&dec),
        &format!("{} encrypt", ratio(&dec, &enc, 2)),
    );
    // One core that both encrypts and decrypts every byte can do at best this, per run.
    let both: Vec<f64> = enc
        .iter()
        .zip(&dec)
        .map(|(e, d)| 1.0 / (1.0 / e + 1.0 / d))
        .collect();
    for ((workers, size), results) in &session {
        let runtime = if *workers == 1 {
            "tokio, current thread: one core does both sides"
        } else {
            "tokio, 2 workers, like `cnspr serve`"
        };
        let mut notes = format!(
            "{} one-core encrypt; {} Noise frames per message",
            ratio(results, &enc, 2),
            wire::chunks(&vec![0u8; *size]).count()
        );
        if *workers == 1 {
            let _ = write!(
                notes,
                "; {} of encrypt+decrypt on one core ({:.0} MB/s)",
                ratio(results, &both, 2),
                median(&both)
            );
        }
        table.row(
            "throughput",
            &format!(
                "**Encrypted `Session`** writer → reader over loopback, {} messages ({runtime})",
                size_name(*size)
            ),
            fmt_mbs(results),
            &notes,
        );
    }
    for (size, results) in &tcp {
        table.row(
            "throughput",
            &format!(
                "Plain TCP on loopback, {} writes (tokio, 2 workers)",
                size_name(*size)
            ),
            fmt_mbs(results),
            &format!("{} one-core encrypt", ratio(results, &enc, 2)),
        );
    }
}

/// Encrypt, then decrypt, `BULK_BYTES` in 64 KiB buffers on this thread.
fn cipher_speed() -> (Duration, Duration) {
    const BUF: usize = 64 << 10;
    let mut cipher = DefaultResolver
        .resolve_cipher(&CipherChoice::ChaChaPoly)
        .expect("ChaChaPoly");
    cipher.set(&[7u8; 32]);
    let plain = vec![0x5au8; BUF];
    let mut sealed = vec![0u8; BUF + TAG_LEN];
    let mut opened = vec![0u8; BUF];
    let count = BULK_BYTES / BUF;
    let started = Instant::now();
    for nonce in 0..count as u64 {
        black_box(cipher.encrypt(nonce, &[], black_box(&plain), &mut sealed));
    }
    let enc = started.elapsed();
    cipher.encrypt(0, &[], &plain, &mut sealed);
    let started = Instant::now();
    for _ in 0..count {
        black_box(
            cipher
                .decrypt(0, &[], black_box(&sealed), &mut opened)
                .expect("decrypt"),
        );
    }
    (enc, started.elapsed())
}

/// A `Hello` whose encoding is exactly `size` bytes: a message of that size as the session
/// sends it (`SessionWriter::send` encodes, `SessionReader::recv` decodes).
fn message_of_size(size: usize) -> Message {
    let mut name_len = size - 5;
    loop {
        let message = Message::Hello(Hello {
            name: "x".repeat(name_len),
            listen: Vec::new(),
            addresses: Vec::new(),
        });
        let len = message.encode().len();
        if len == size {
            return message;
        }
        name_len = name_len + size - len;
    }
}

async fn session_bulk(size: usize, count: usize) -> Duration {
    let (mut a, mut b) = session_pair().await;
    let message = message_of_size(size);
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        for _ in 0..count {
            a.writer.send(&message).await.expect("send");
        }
        a
    });
    let reader = tokio::spawn(async move {
        for _ in 0..count {
            match b.reader.recv().await.expect("recv") {
                Some(Message::Hello(hello)) => assert_eq!(hello.name.len() + 5, size),
                other => panic!("unexpected message {other:?}"),
            }
        }
        b
    });
    let b = reader.await.expect("reader");
    let elapsed = started.elapsed();
    let a = writer.await.expect("writer");
    drop((a, b));
    elapsed
}

async fn tcp_bulk(size: usize, total: usize) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (mut client, mut server) = (client.expect("connect"), server.expect("accept").0);
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let buf = vec![0x5au8; size];
        for _ in 0..total / size {
            client.write_all(&buf).await.expect("write");
        }
    });
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; size];
        let mut left = total;
        while left > 0 {
            let n = server.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed early");
            left -= n;
        }
    });
    reader.await.expect("reader");
    let elapsed = started.elapsed();
    writer.await.expect("writer");
    elapsed
}

// ---------------------------------------------------------------------------------------------
// Sections 4 and 5: an idle mesh of real daemons, and the memory of one with 10 peers

/// One look at the daemons and their namespace.
struct Snapshot {
    at: Instant,
    /// utime + stime per daemon, in clock ticks.
    cpu_ticks: Vec<u64>,
    /// Per daemon: thread id -> (ns on CPU from schedstat, context switches).
    threads: Vec<HashMap<u32, (u64, u64)>>,
    lo_tx: (u64, u64),
    sockets: Vec<Socket>,
}

impl Snapshot {
    fn take(ns: &NetNs, pids: &[u32]) -> Self {
        Self {
            at: Instant::now(),
            cpu_ticks: pids.iter().map(|&p| cpu_ticks(p)).collect(),
            threads: pids.iter().map(|&p| thread_stats(p)).collect(),
            lo_tx: lo_tx(ns),
            sockets: sockets(ns),
        }
    }
}

/// What changed between two snapshots, per daemon.
struct Delta {
    secs: f64,
    cpu_ms: Vec<f64>,
    sched_ms: Vec<f64>,
    switches: Vec<u64>,
    tcp_bytes: Vec<u64>,
    tcp_segs: Vec<u64>,
    tcp_data_segs: Vec<u64>,
    lo_bytes: u64,
    lo_packets: u64,
    sessions_kept: bool,
}

impl Delta {
    fn between(a: &Snapshot, b: &Snapshot, pids: &[u32]) -> Self {
        let ms_per_tick = 1000.0 / clock_ticks() as f64;
        let mut sched_ms = Vec::new();
        let mut switches = Vec::new();
        for (before, after) in a.threads.iter().zip(&b.threads) {
            // Threads that ended in between are missed; new ones count from zero.
            let (mut ns, mut sw) = (0u64, 0u64);
            for (tid, (t, s)) in after {
                let (t0, s0) = before.get(tid).copied().unwrap_or((0, 0));
                ns += t.saturating_sub(t0);
                sw += s.saturating_sub(s0);
            }
            sched_ms.push(ns as f64 / 1e6);
            switches.push(sw);
        }
        let key = |s: &Socket| (s.local.clone(), s.peer.clone());
        let before: HashMap<_, _> = a.sockets.iter().map(|s| (key(s), s)).collect();
        let mut tcp_bytes = vec![0u64; pids.len()];
        let mut tcp_segs = vec![0u64; pids.len()];
        let mut tcp_data_segs = vec![0u64; pids.len()];
        for s in &b.sockets {
            let Some(i) = pids.iter().position(|&p| p == s.pid) else {
                continue;
            };
            let (bytes0, segs0, data0) = before.get(&key(s)).map_or((0, 0, 0), |old| {
                (old.bytes_sent, old.segs_out, old.data_segs_out)
            });
            tcp_bytes[i] += s.bytes_sent - bytes0;
            tcp_segs[i] += s.segs_out - segs0;
            tcp_data_segs[i] += s.data_segs_out - data0;
        }
        let mut keys_a: Vec<_> = a.sockets.iter().map(key).collect();
        let mut keys_b: Vec<_> = b.sockets.iter().map(key).collect();
        keys_a.sort();
        keys_b.sort();
        Self {
            secs: (b.at - a.at).as_secs_f64(),
            cpu_ms: a
                .cpu_ticks
                .iter()
                .zip(&b.cpu_ticks)
                .map(|(x, y)| (y - x) as f64 * ms_per_tick)
                .collect(),
            sched_ms,
            switches,
            tcp_bytes,
            tcp_segs,
            tcp_data_segs,
            lo_bytes: b.lo_tx.0 - a.lo_tx.0,
            lo_packets: b.lo_tx.1 - a.lo_tx.1,
            sessions_kept: keys_a == keys_b,
        }
    }

    /// Scales a count over this window to one minute.
    fn per_min(&self, value: f64) -> f64 {
        value * 60.0 / self.secs
    }
}

fn idle_and_memory(table: &mut Table, cnspr: &Path) {
    let ns = NetNs::new();
    let mut devices: Vec<Device> = (0..IDLE_DEVICES)
        .map(|i| Device::new(&format!("d{i:02}")))
        .collect();
    let mut pids = Vec::new();
    for (i, device) in devices.iter_mut().enumerate() {
        configure_default(device, &listen_addr(i));
        pids.push(start(device, &ns, cnspr));
    }
    std::thread::sleep(Duration::from_secs(1));
    let rss_alone: Vec<f64> = pids.iter().map(|&p| vm_rss_kib(p) as f64).collect();
    let keys: Vec<String> = devices.iter().map(Device::public_key).collect();
    let mut apis: Vec<Api> = devices.iter().map(Api::connect).collect();
    let linking = Instant::now();
    for (i, api) in apis.iter_mut().enumerate() {
        for (j, device) in devices.iter().enumerate() {
            if i != j {
                api.add_member(&device.name, &keys[j], &listen_addr(j));
            }
        }
    }
    let names: Vec<String> = devices.iter().map(|d| d.name.clone()).collect();
    let pairs = IDLE_DEVICES * (IDLE_DEVICES - 1) / 2;
    let meshed = wait_until(Duration::from_secs(60), || {
        apis.iter_mut()
            .all(|api| api.all_direct(&names) == IDLE_DEVICES - 1)
            && sessions_between(&ns, IDLE_DEVICES) == pairs
    });
    assert!(
        meshed,
        "the mesh of {IDLE_DEVICES} did not form: {} sessions\n{}",
        sessions_between(&ns, IDLE_DEVICES),
        devices[0].log("serve")
    );
    let mesh_time = linking.elapsed();
    eprintln!(
        "idle mesh: {pairs} sessions up {:.1} s after the first members.add; settling",
        mesh_time.as_secs_f64()
    );
    // Let the start-up traffic (Hello, Neighbors, first pings) and any blocking-pool threads
    // from the roster writes (tokio keeps them 10 s) die down.
    std::thread::sleep(Duration::from_secs(12));
    let rtt_before = latencies(&mut apis);

    let mut snapshots = vec![Snapshot::take(&ns, &pids)];
    let window_start = snapshots[0].at;
    let steps = (idle_window().as_secs() / IDLE_STEP.as_secs()) as u32;
    for k in 1..=steps {
        let due = window_start + IDLE_STEP * k;
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        snapshots.push(Snapshot::take(&ns, &pids));
        eprintln!("idle mesh: {} s watched", (IDLE_STEP * k).as_secs());
    }
    let rss_9: Vec<f64> = pids.iter().map(|&p| vm_rss_kib(p) as f64).collect();
    let rtt_after = latencies(&mut apis);
    let total = Delta::between(&snapshots[0], &snapshots[steps as usize], &pids);
    let parts: Vec<Delta> = snapshots
        .windows(2)
        .map(|w| Delta::between(&w[0], &w[1], &pids))
        .collect();
    let still_direct = apis
        .iter_mut()
        .all(|api| api.all_direct(&names) == IDLE_DEVICES - 1);

    // Expected traffic if keepalive were the only traffic: per session and interval, one Ping
    // carrying an RTT report and one Pong.
    let frame = |m: &Message| (2 + 1 + m.encode().len() + TAG_LEN) as f64;
    let keepalive_bytes = frame(&Message::Ping {
        nonce: NONCE,
        rtt_us: Some(150),
    }) + frame(&Message::Pong { nonce: NONCE });
    let intervals_per_min = 60.0 / DEFAULT_KEEPALIVE.as_secs_f64();
    let expected_bytes = pairs as f64 * keepalive_bytes * intervals_per_min;
    let expected_segs = pairs as f64 * 2.0 * intervals_per_min;
    let neighbors_bytes = frame(&Message::Neighbors(
        (0..IDLE_DEVICES - 1)
            .map(|_| wire::Neighbor {
                key: [0xee; 32],
                rtt_us: Some(1000),
            })
            .collect(),
    ));

    let per_min = |v: &[f64]| -> Vec<f64> { v.iter().map(|&x| total.per_min(x)).collect() };
    let as_f64 = |v: &[u64]| -> Vec<f64> { v.iter().map(|&x| x as f64).collect() };
    let cpu = per_min(&total.cpu_ms);
    let sched = per_min(&total.sched_ms);
    let switches = per_min(&as_f64(&total.switches));
    let tcp = per_min(&as_f64(&total.tcp_bytes));
    let segs = per_min(&as_f64(&total.tcp_segs));
    let data_segs = per_min(&as_f64(&total.tcp_data_segs));
    let sum = |v: &[f64]| v.iter().sum::<f64>();
    let spread = |v: &[f64], digits: usize| {
        format!(
            "per device median {:.digits$}, min {:.digits$}, max {:.digits$}",
            median(v),
            min(v),
            max(v)
        )
    };
    let per_part = |f: &dyn Fn(&Delta) -> f64| {
        parts
            .iter()
            .map(|d| format!("{:.0}", f(d)))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let context = format!(
        "{IDLE_DEVICES} daemons, full mesh ({pairs} sessions), default keepalive 20 s / 10 s, \
         watched {:.0} s from 12 s after all sessions were up; sessions unchanged: {}, all still \
         direct: {still_direct}",
        total.secs, total.sessions_kept
    );
    table.row(
        "idle",
        "**CPU time** (utime+stime, /proc/PID/stat), ms per minute, whole mesh",
        format!(
            "{:.0} ms/min ({:.0} per device)",
            sum(&cpu),
            sum(&cpu) / IDLE_DEVICES as f64
        ),
        &format!(
            "{}; {context}; clock tick = {} ms",
            spread(&cpu, 0),
            1000 / clock_ticks()
        ),
    );
    table.row(
        "idle",
        "CPU time from schedstat (ns, live threads), ms per minute, whole mesh",
        format!(
            "{:.1} ms/min ({:.1} per device)",
            sum(&sched),
            sum(&sched) / IDLE_DEVICES as f64
        ),
        &format!(
            "{}; whole mesh per 20 s: {} ms",
            spread(&sched, 1),
            per_part(&|d| sum(&d.sched_ms))
        ),
    );
    table.row(
        "idle",
        "Context switches (≈ wake-ups) of the daemons' threads, per minute, whole mesh",
        format!(
            "{:.0} /min ({:.0} per device)",
            sum(&switches),
            sum(&switches) / IDLE_DEVICES as f64
        ),
        &spread(&switches, 0),
    );
    table.row(
        "idle",
        "**Bytes sent**: TCP payload (tcp_info `bytes_sent` of the daemons' sockets), per minute",
        format!(
            "{:.0} B/min whole mesh ({:.0} per device)",
            sum(&tcp),
            sum(&tcp) / IDLE_DEVICES as f64
        ),
        &format!(
            "{}; {:.1}× the {:.0} B/min keepalive alone needs ({keepalive_bytes:.0} B per session \
             per 20 s); whole mesh per 20 s: {} B",
            spread(&tcp, 0),
            sum(&tcp) / expected_bytes,
            expected_bytes,
            per_part(&|d| d.tcp_bytes.iter().sum::<u64>() as f64)
        ),
    );
    table.row(
        "idle",
        "TCP data segments sent, per minute, whole mesh",
        format!("{:.0} /min", sum(&data_segs)),
        &format!(
            "keepalive alone: {expected_segs:.0} (a Ping and a Pong per session per 20 s); mean \
             payload {:.0} B per data segment (Ping {:.0} B, Pong {:.0} B, Neighbors with {} \
             entries {neighbors_bytes:.0} B); whole mesh per 20 s: {}",
            sum(&tcp) / sum(&data_segs),
            frame(&Message::Ping {
                nonce: NONCE,
                rtt_us: Some(150)
            }),
            frame(&Message::Pong { nonce: NONCE }),
            IDLE_DEVICES - 1,
            per_part(&|d| d.tcp_data_segs.iter().sum::<u64>() as f64)
        ),
    );
    // Each small frame goes out in a segment of its own (TCP_NODELAY), so the segments split
    // into keepalive frames (about `keepalive_bytes / 2` each) and Neighbors announcements.
    let small = keepalive_bytes / 2.0;
    let announcements =
        ((sum(&tcp) - small * sum(&data_segs)) / (neighbors_bytes - small)).max(0.0);
    table.row(
        "idle",
        "Estimated split of the data segments, per minute, whole mesh",
        format!(
            "≈ {:.0} keepalive frames + {announcements:.0} Neighbors announcements",
            sum(&data_segs) - announcements
        ),
        &format!(
            "solved from bytes and segments with {small:.1} B per keepalive frame and \
             {neighbors_bytes:.0} B per announcement; by design {expected_segs:.0} keepalive \
             frames and no announcements (nothing changes in an idle mesh); announcements carry \
             ≈ {:.0}% of the bytes",
            100.0 * announcements * neighbors_bytes / sum(&tcp)
        ),
    );
    table.row(
        "idle",
        "Bytes on `lo` of the mesh's namespace (headers included: 14 B link + 20 B IP + 32 B \
         TCP per packet), per minute",
        format!(
            "{:.0} B/min, {:.0} packets/min",
            total.per_min(total.lo_bytes as f64),
            total.per_min(total.lo_packets as f64)
        ),
        &format!(
            "TCP segments sent by the daemons: {:.0}/min (data and pure ACKs)",
            sum(&segs)
        ),
    );
    table.row(
        "idle",
        "Smoothed RTT the daemons show (`rtt_ms` of `peers`), before → after the window",
        format!(
            "median {:.3} → {:.3} ms",
            median(&rtt_before),
            median(&rtt_after)
        ),
        &format!(
            "max {:.3} → {:.3} ms over the {} directed pairs",
            max(&rtt_before),
            max(&rtt_after),
            rtt_after.len()
        ),
    );

    // The 11th device: first alone, then linked to all ten.
    let mut last = Device::new(&format!("d{IDLE_DEVICES:02}"));
    configure_default(&last, &listen_addr(IDLE_DEVICES));
    let last_pid = start(&mut last, &ns, cnspr);
    std::thread::sleep(Duration::from_secs(1));
    let last_alone = vm_rss_kib(last_pid);
    let last_key = last.public_key();
    let mut last_api = Api::connect(&last);
    for (i, api) in apis.iter_mut().enumerate() {
        api.add_member(&last.name, &last_key, &listen_addr(IDLE_DEVICES));
        last_api.add_member(&devices[i].name, &keys[i], &listen_addr(i));
    }
    let mut all_names = names.clone();
    all_names.push(last.name.clone());
    let meshed = wait_until(Duration::from_secs(60), || {
        last_api.all_direct(&names) == IDLE_DEVICES
            && apis
                .iter_mut()
                .all(|api| api.all_direct(&all_names) == IDLE_DEVICES)
    });
    assert!(meshed, "d10 did not link to all:\n{}", last.log("serve"));
    std::thread::sleep(Duration::from_secs(3));
    let mut all_pids = pids.clone();
    all_pids.push(last_pid);
    let rss_10: Vec<f64> = all_pids.iter().map(|&p| vm_rss_kib(p) as f64).collect();
    let last_10 = vm_rss_kib(last_pid);
    table.row(
        "memory",
        "VmRSS of `cnspr serve` (all four services), no peers",
        format!("{} KiB", median(&rss_alone) as u64),
        &format!(
            "median of {IDLE_DEVICES} daemons 1 s after start (min {}, max {}); d10: {last_alone} KiB",
            min(&rss_alone) as u64,
            max(&rss_alone) as u64
        ),
    );
    table.row(
        "memory",
        "VmRSS with 9 connected peers (after the idle minute)",
        format!("{} KiB", median(&rss_9) as u64),
        &format!(
            "median of {IDLE_DEVICES} (min {}, max {})",
            min(&rss_9) as u64,
            max(&rss_9) as u64
        ),
    );
    table.row(
        "memory",
        "**VmRSS with 10 connected peers** (11 daemons, full mesh, 3 s after d10 linked)",
        format!("{last_10} KiB (d10)"),
        &format!(
            "all 11: median {}, min {}, max {} KiB; d10 grew {} KiB from 0 to 10 peers ({:.0} KiB per peer); VmHWM of d10: {} KiB",
            median(&rss_10) as u64,
            min(&rss_10) as u64,
            max(&rss_10) as u64,
            last_10 as i64 - last_alone as i64,
            (last_10 as f64 - last_alone as f64) / IDLE_DEVICES as f64,
            status_kib(last_pid, "VmHWM")
        ),
    );
    drop(last);
    drop(devices);
}

/// How long the idle mesh is watched: `IDLE_WINDOW`, or longer if `IDLE_WINDOW_VAR` says so.
fn idle_window() -> Duration {
    std::env::var(IDLE_WINDOW_VAR)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|secs| Duration::from_secs(secs.div_ceil(20) * 20))
        .unwrap_or(IDLE_WINDOW)
        .max(IDLE_WINDOW)
}

/// `rtt_ms` of every direct peer of every daemon.
fn latencies(apis: &mut [Api]) -> Vec<f64> {
    let mut all = Vec::new();
    for api in apis {
        let peers = api.call("peers", json!({})).expect("peers");
        all.extend(
            peers
                .as_array()
                .expect("peers is an array")
                .iter()
                .filter_map(|p| p["rtt_ms"].as_f64()),
        );
    }
    all
}

// ---------------------------------------------------------------------------------------------
// Daemons and their API

/// `target/<profile>` of this executable (`target/release/deps/mesh-HASH`), which must hold the
/// workspace binaries: the harness's `cnsprcy_tests::bin` finds them the same way.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("bench executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the bench lives in target/<profile>/deps")
        .to_owned();
    assert!(
        dir.join("cnspr").exists(),
        "{} is missing; run `cargo build --release --workspace` before the benchmark",
        dir.join("cnspr").display()
    );
    dir
}

fn listen_addr(i: usize) -> String {
    format!("127.0.0.1:{}", 17001 + i)
}

/// A config with the device's name, one listen address, and the default keepalive.
fn configure_default(device: &Device, listen: &str) {
    device.write_config(&format!(
        "name = \"{}\"\n[mesh]\nlisten = [\"{listen}\"]\n",
        device.name
    ));
}

/// Starts `cnspr serve` in `ns` with the default log level (the harness sets `RUST_LOG=debug`;
/// `env -u` removes it and execs, so the pid is the daemon's).
fn start(device: &mut Device, ns: &NetNs, cnspr: &Path) -> u32 {
    let cnspr = cnspr.to_str().expect("UTF-8 path");
    let pid = device.spawn_in(
        ns,
        "serve",
        Path::new("/usr/bin/env"),
        &["-u", "RUST_LOG", cnspr, "serve"],
    );
    device.wait_ready("serve");
    pid
}

/// A JSON-RPC connection to a daemon's public socket, kept open.
struct Api {
    stream: BufReader<UnixStream>,
    next_id: u64,
    line: String,
}

impl Api {
    fn connect(device: &Device) -> Self {
        let stream = UnixStream::connect(device.socket()).expect("connect to the API socket");
        stream.set_read_timeout(Some(SOON)).expect("socket timeout");
        Self {
            stream: BufReader::new(stream),
            next_id: 1,
            line: String::new(),
        }
    }

    fn call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request =
            json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }).to_string();
        request.push('\n');
        self.stream
            .get_mut()
            .write_all(request.as_bytes())
            .expect("write request");
        self.line.clear();
        self.stream.read_line(&mut self.line).expect("read answer");
        let mut answer: Value = serde_json::from_str(&self.line).expect("answer is JSON");
        assert_eq!(answer["id"], id, "answer to another request: {}", self.line);
        match answer.get_mut("error") {
            Some(error) => Err(error.take()),
            None => Ok(answer["result"].take()),
        }
    }

    fn add_member(&mut self, name: &str, key: &str, address: &str) {
        self.call(
            "members.add",
            json!({ "name": name, "public_key": key, "addresses": [address] }),
        )
        .unwrap_or_else(|e| panic!("members.add {name}: {e}"));
    }

    fn peer_status(&mut self, name: &str) -> String {
        match self.call("peer", json!({ "name": name })) {
            Ok(peer) => peer["status"].as_str().unwrap_or("?").to_owned(),
            Err(e) => panic!("peer {name}: {e}"),
        }
    }

    /// How many of `names` this daemon shows `direct`.
    fn all_direct(&mut self, names: &[String]) -> usize {
        let peers = self.call("peers", json!({})).expect("peers");
        peers
            .as_array()
            .expect("peers is an array")
            .iter()
            .filter(|p| {
                p["status"] == "direct"
                    && names.iter().any(|n| p["name"].as_str() == Some(n.as_str()))
            })
            .count()
    }
}

// ---------------------------------------------------------------------------------------------
// /proc, ss

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a constant.
    let ticks = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// utime + stime of a process (all its threads, dead ones included), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = read(&format!("/proc/{pid}/stat"));
    // Fields after "(comm)": state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields[n - 3].parse::<u64>().expect("a number");
    field(14) + field(15)
}

fn status_kib(pid: u32, key: &str) -> u64 {
    read(&format!("/proc/{pid}/status"))
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} for {pid}"))
}

fn vm_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// Per thread: ns on CPU (first field of schedstat) and voluntary + involuntary context
/// switches.
fn thread_stats(pid: u32) -> HashMap<u32, (u64, u64)> {
    let mut threads = HashMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return threads;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let path = entry.path();
        let Ok(schedstat) = std::fs::read_to_string(path.join("schedstat")) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(path.join("status")) else {
            continue;
        };
        let on_cpu = schedstat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let switches = status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        threads.insert(tid, (on_cpu, switches));
    }
    threads
}

/// Bytes and packets sent on `lo` inside `ns` (which is also what `lo` received).
fn lo_tx(ns: &NetNs) -> (u64, u64) {
    let dev = ns.run(&["cat", "/proc/net/dev"]);
    let line = dev
        .lines()
        .find(|l| l.trim_start().starts_with("lo:"))
        .expect("lo in /proc/net/dev");
    let fields: Vec<u64> = line
        .split_once(':')
        .expect("colon")
        .1
        .split_whitespace()
        .map(|f| f.parse().expect("a number"))
        .collect();
    (fields[8], fields[9])
}

/// An established TCP socket in a namespace, as `ss -tinp` shows it.
#[derive(Debug, Clone)]
struct Socket {
    local: String,
    peer: String,
    pid: u32,
    bytes_sent: u64,
    segs_out: u64,
    data_segs_out: u64,
}

fn sockets(ns: &NetNs) -> Vec<Socket> {
    let out = ns.run(&["ss", "-Htinp", "state", "established"]);
    let mut sockets: Vec<Socket> = Vec::new();
    for line in out.lines() {
        if line.starts_with(char::is_whitespace) {
            let Some(socket) = sockets.last_mut() else {
                continue;
            };
            for item in line.split_whitespace() {
                if let Some(v) = item.strip_prefix("bytes_sent:") {
                    socket.bytes_sent = v.parse().unwrap_or(0);
                } else if let Some(v) = item.strip_prefix("segs_out:") {
                    socket.segs_out = v.parse().unwrap_or(0);
                } else if let Some(v) = item.strip_prefix("data_segs_out:") {
                    socket.data_segs_out = v.parse().unwrap_or(0);
                }
            }
        } else {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 4 {
                continue;
            }
            let pid = line
                .split("pid=")
                .nth(1)
                .and_then(|p| p.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            sockets.push(Socket {
                local: fields[2].to_owned(),
                peer: fields[3].to_owned(),
                pid,
                bytes_sent: 0,
                segs_out: 0,
                data_segs_out: 0,
            });
        }
    }
    sockets
}

/// Sessions between the first `n` devices: sockets whose local address is a listen port.
fn sessions_between(ns: &NetNs, n: usize) -> usize {
    let ports: Vec<String> = (0..n).map(listen_addr).collect();
    sockets(ns)
        .iter()
        .filter(|s| ports.contains(&s.local))
        .count()
}

// ---------------------------------------------------------------------------------------------
// Measuring and reporting

fn runtime() -> tokio::runtime::Runtime {
    runtime_with(2)
}

/// A runtime like `cnspr serve`'s (multi-thread, 2 workers), or a current-thread one for 1.
fn runtime_with(workers: usize) -> tokio::runtime::Runtime {
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder.enable_all().build().expect("tokio runtime")
}

async fn session_pair() -> (Session, Session) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (client, server) = (client.expect("connect"), server.expect("accept").0);
    client.set_nodelay(true).expect("nodelay");
    server.set_nodelay(true).expect("nodelay");
    let (a, b) = (Identity::generate(), Identity::generate());
    let (a_key, b_key) = (a.public_key(), b.public_key());
    let (sa, sb) = tokio::join!(
        transport::initiate(client, &a, &b_key, &P1),
        transport::respond(server, &b, |k: &PublicKey| *k == a_key, &P2),
    );
    (sa.expect("initiate"), sb.expect("respond"))
}

/// Samples of one measurement, kept per run.
#[derive(Default)]
struct Series {
    runs: Vec<Vec<Duration>>,
}

impl Series {
    fn single(samples: Vec<Duration>) -> Self {
        Self {
            runs: vec![samples],
        }
    }

    fn push(&mut self, samples: Vec<Duration>) {
        self.runs.push(samples);
    }

    fn stats(&self) -> Stats {
        let us = |s: &[Duration]| -> Vec<f64> {
            let mut v: Vec<f64> = s.iter().map(|d| d.as_secs_f64() * 1e6).collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let all = us(&self.runs.concat());
        Stats {
            n: all.len(),
            median: median(&all),
            p99: all[((all.len() as f64 * 0.99).ceil() as usize).max(1) - 1],
            min: all[0],
            max: all[all.len() - 1],
            run_medians: self.runs.iter().map(|r| median(&us(r))).collect(),
        }
    }
}

/// Latency statistics in microseconds over all runs, and each run's median.
struct Stats {
    n: usize,
    median: f64,
    p99: f64,
    min: f64,
    max: f64,
    run_medians: Vec<f64>,
}

impl Stats {
    fn latency(&self) -> String {
        let medians: Vec<String> = self.run_medians.iter().map(|&m| fmt_us(m)).collect();
        format!(
            "median {}, p99 {} (n={}; run medians {})",
            fmt_us(self.median),
            fmt_us(self.p99),
            self.n,
            medians.join(" / ")
        )
    }
}

/// `a / b` for values measured in the same runs: the median of the per-run ratios, and each.
fn ratio(a: &[f64], b: &[f64], digits: usize) -> String {
    let each: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    let list: Vec<String> = each.iter().map(|r| format!("{r:.digits$}")).collect();
    format!("{:.digits$}× (per run {})", median(&each), list.join(" / "))
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

fn fmt_us(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else if us >= 100.0 {
        format!("{us:.0} µs")
    } else {
        format!("{us:.1} µs")
    }
}

fn mb_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e6
}

fn fmt_mbs(runs: &[f64]) -> String {
    let each: Vec<String> = runs.iter().map(|v| format!("{v:.0}")).collect();
    format!("{:.0} MB/s (runs {})", median(runs), each.join(" / "))
}

fn size_name(size: usize) -> String {
    if size >= 1 << 20 {
        format!("{} MiB", size >> 20)
    } else {
        format!("{} KiB", size >> 10)
    }
}

/// The machine and the time, for the report.
fn machine() -> String {
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "machine: {} cores (nproc), CPU \"{cpu}\", Linux {}\ndate: {date}\nload average at the start: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        read("/proc/sys/kernel/osrelease").trim(),
        read("/proc/loadavg").trim()
    )
}

/// Rows of the result table, printed as they come and as Markdown at the end.
#[derive(Default)]
struct Table {
    rows: Vec<[String; 4]>,
}

impl Table {
    fn row(&mut self, group: &str, what: &str, result: impl Into<String>, notes: &str) {
        let result = result.into();
        println!(
            "[{group}] {what}: {result}{}",
            if notes.is_empty() {
                String::new()
            } else {
                format!(" — {notes}")
            }
        );
        self.rows
            .push([group.into(), what.into(), result, notes.into()]);
    }

    fn markdown(&self) -> String {
        let mut out = String::from("| | measurement | result | notes |\n|---|---|---|---|\n");
        for [group, what, result, notes] in &self.rows {
            let _ = writeln!(out, "| {group} | {what} | {result} | {notes} |");
        }
        out
    }
}
