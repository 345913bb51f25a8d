//! The deterministic simulator: many mesh cores (`cnsprcy_mesh::core`) over a virtual network in
//! virtual time, with faults, checked against the invariants after every run.
//!
//! - `cargo test -p cnsprcy-mesh --test sim` runs the scenarios below and 1000 seeded chaos runs
//!   (`CNSPRCY_SIM_RUNS=N` for another number).
//! - A failing run prints its seed; `CNSPRCY_SIM_SEED=SEED cargo test -p cnsprcy-mesh --test sim
//!   chaos` replays exactly that run, and `CNSPRCY_SIM_TRACE=1` prints every input and output.

mod checks;
mod memstore;
mod world;

use std::time::Duration;

use cnsprcy_mesh::core::Answer;
use cnsprcy_mesh::peers::Reach;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use world::{DeviceIndex, World};

const SECOND: Duration = Duration::from_secs(1);
/// Long enough for every rule to have done its work once faults stopped: a redial after the
/// longest backoff (60 s), a silent session declared dead (30 s), an anti-entropy round (30 s).
const SETTLE: Duration = Duration::from_secs(150);

/// A repair or restart the chaos scheduled for later.
enum Later {
    Heal(DeviceIndex, DeviceIndex),
    Clear(DeviceIndex, DeviceIndex),
    Restart(DeviceIndex),
}

/// Summary of one run, for the aggregate line.
struct Ran {
    devices: usize,
    events: u64,
    virtual_time: Duration,
}

/// One seeded run: devices come up, send, write, and suffer cut links, partitions, loss, crashes
/// (some wiping their state) and clock errors; then everything heals and the checks run.
fn chaos(seed: u64) -> Result<Ran, String> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_cafe);
    // Mostly the sizes people have, now and then up to 50: the cost of a run grows with the
    // square of its devices.
    let devices = if rng.random_bool(0.9) {
        rng.random_range(10..=15)
    } else {
        rng.random_range(16..=50)
    };
    let wipes = rng.random_bool(0.1);
    let mut world = World::new(seed, devices, |_, _| true);
    for d in 0..devices {
        world.skew(d, rng.random_range(-2000..=2000));
        world.start(d);
    }
    let chaos_time = Duration::from_secs(rng.random_range(90..=180));
    let mut later: Vec<(Duration, Later)> = Vec::new();
    let mut keys = 0usize;
    while world.now < chaos_time {
        world.run_for(Duration::from_millis(rng.random_range(100..3000)));
        let now = world.now;
        let due: Vec<Later> = {
            let (due, rest): (Vec<_>, Vec<_>) = later.drain(..).partition(|(at, _)| *at <= now);
            later = rest;
            due.into_iter().map(|(_, l)| l).collect()
        };
        for action in due {
            match action {
                Later::Heal(a, b) => world.set_link(a, b, true),
                Later::Clear(a, b) => world.set_loss(a, b, 0.0),
                Later::Restart(d) => {
                    if !world.is_up(d) {
                        world.start(d);
                    }
                }
            }
        }
        let up: Vec<DeviceIndex> = (0..devices).filter(|d| world.is_up(*d)).collect();
        if up.is_empty() {
            continue;
        }
        let device = up[rng.random_range(0..up.len())];
        let action = rng.random_range(0..100);
        match action {
            0..40 => {
                let targets: Vec<DeviceIndex> = if rng.random_bool(0.3) {
                    Vec::new()
                } else {
                    let count = rng.random_range(1..=4.min(devices - 1));
                    let mut targets: Vec<DeviceIndex> =
                        (0..devices).filter(|t| *t != device).collect();
                    for i in 0..count {
                        let j = rng.random_range(i..targets.len());
                        targets.swap(i, j);
                    }
                    targets.truncate(count);
                    if rng.random_bool(0.1) {
                        targets.push(device);
                    }
                    targets
                };
                let ttl = if rng.random_bool(0.85) {
                    Duration::from_secs(3600)
                } else {
                    Duration::from_millis(rng.random_range(500..5000))
                };
                world.send(device, &targets, ttl);
            }
            40..70 => {
                keys += 1;
                let key = format!("k{}", rng.random_range(0..keys.min(60)));
                let value = rng
                    .random_bool(0.9)
                    .then(|| format!("v{keys}").into_bytes());
                world.write(device, &key, value);
            }
            70..80 => {
                let (a, b) = pair(&mut rng, devices);
                world.set_link(a, b, false);
                later.push((now + SECOND * rng.random_range(5..60), Later::Heal(a, b)));
            }
            80..83 => {
                let side: Vec<bool> = (0..devices).map(|_| rng.random_bool(0.5)).collect();
                let heal = now + SECOND * rng.random_range(10..60);
                for a in 0..devices {
                    for b in (a + 1)..devices {
                        if side[a] != side[b] {
                            world.set_link(a, b, false);
                            later.push((heal, Later::Heal(a, b)));
                        }
                    }
                }
            }
            83..90 => {
                if wipes && rng.random_bool(0.2) {
                    world.wipe(device);
                } else {
                    world.crash(device);
                }
                later.push((
                    now + SECOND * rng.random_range(1..20),
                    Later::Restart(device),
                ));
            }
            90..95 => {
                let (a, b) = pair(&mut rng, devices);
                world.set_loss(a, b, 0.1);
                later.push((now + SECOND * rng.random_range(10..60), Later::Clear(a, b)));
            }
            _ => {
                let (a, b) = pair(&mut rng, devices);
                world.set_link(a, b, false);
                later.push((
                    now + Duration::from_millis(rng.random_range(100..3000)),
                    Later::Heal(a, b),
                ));
            }
        }
    }
    world.heal_all();
    for d in 0..devices {
        if !world.is_up(d) {
            world.start(d);
        }
    }
    world.run_for(SETTLE);
    checks::all(&world)?;
    Ok(Ran {
        devices,
        events: world.events_handled,
        virtual_time: world.now,
    })
}

/// Two different devices.
fn pair(rng: &mut StdRng, devices: usize) -> (DeviceIndex, DeviceIndex) {
    let a = rng.random_range(0..devices);
    let b = (a + 1 + rng.random_range(0..devices - 1)) % devices;
    (a, b)
}

#[test]
fn chaos_runs_keep_every_invariant() {
    let seeds: Vec<u64> = match std::env::var("CNSPRCY_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("CNSPRCY_SIM_SEED is a number")],
        Err(_) => {
            let runs: u64 = std::env::var("CNSPRCY_SIM_RUNS")
                .ok()
                .and_then(|r| r.parse().ok())
                .unwrap_or(1000);
            (1..=runs).collect()
        }
    };
    let started = std::time::Instant::now();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunks: Vec<Vec<u64>> = (0..threads)
        .map(|t| seeds.iter().copied().skip(t).step_by(threads).collect())
        .collect();
    let results: Vec<(u64, Result<Ran, String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .into_iter()
                        .map(|seed| (seed, chaos(seed)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a simulator thread"))
            .collect()
    });
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(seed, r)| r.as_ref().err().map(|e| format!("seed {seed}: {e}")))
        .collect();
    let ran: Vec<&Ran> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .collect();
    let events: u64 = ran.iter().map(|r| r.events).sum();
    let virtual_time: Duration = ran.iter().map(|r| r.virtual_time).sum();
    let largest = ran.iter().map(|r| r.devices).max().unwrap_or(0);
    eprintln!(
        "{} runs ({} failed) of up to {largest} devices, {:.0} virtual minutes, {events} inputs, in {:.1?}",
        results.len(),
        failed.len(),
        virtual_time.as_secs_f64() / 60.0,
        started.elapsed()
    );
    assert!(
        failed.is_empty(),
        "{} of {} runs failed; replay one with CNSPRCY_SIM_SEED=SEED (and CNSPRCY_SIM_TRACE=1):\n{}",
        failed.len(),
        results.len(),
        failed.join("\n")
    );
}

/// Every device dials every other at once: crossing dials everywhere. Both sides keep the same
/// one of each pair's two connections at once, so no pair needs a third (a redial after both
/// sides dropped different ones).
#[test]
fn crossing_dials_leave_one_session_per_pair() {
    for seed in 0..20 {
        let mut world = World::new(seed, 12, |_, _| true);
        for d in 0..12 {
            world.start(d);
        }
        world.run_for(SECOND * 10);
        checks::sessions(&world).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        checks::statuses(&world).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let mut per_pair = std::collections::BTreeMap::new();
        for conn in &world.connections {
            let (a, b) = (conn.ends[0].0, conn.ends[1].0);
            *per_pair.entry((a.min(b), a.max(b))).or_insert(0) += 1;
        }
        for (pair, count) in per_pair {
            assert!(
                count <= 2,
                "seed {seed}: {pair:?} needed {count} connections"
            );
        }
    }
}

/// `d0` and `d2` know no address of each other and the link between them is cut: each sees the
/// other relayed via `d1`, and a message between them arrives through it.
#[test]
fn a_member_without_a_path_of_its_own_is_relayed() {
    let mut world = World::new(7, 3, |a, b| (a, b) != (0, 2) && (a, b) != (2, 0));
    world.set_link(0, 2, false);
    for d in 0..3 {
        world.start(d);
    }
    world.run_for(SECOND * 5);
    let key = |d: usize| world.devices[d].key;
    let reach =
        |world: &World, a: usize, b: usize| world.devices[a].core.as_ref().unwrap().reach(&key(b));
    assert!(
        matches!(reach(&world, 0, 2), Reach::Relayed { via, .. } if via == key(1)),
        "{:?}",
        reach(&world, 0, 2)
    );
    assert!(matches!(reach(&world, 2, 0), Reach::Relayed { .. }));
    world.send(0, &[2], SECOND * 3600);
    world.run_for(SECOND);
    let id = world.sends[0].accepted.clone().expect("accepted");
    assert_eq!(
        world
            .runs
            .iter()
            .filter(|r| r.device == 2 && r.message == id)
            .count(),
        1
    );
    checks::outboxes(&world).unwrap();
}

/// Devices added as members without an address after discovery reported them (mDNS reports an
/// advertisement once) are dialled at the addresses discovery saw.
#[test]
fn members_added_after_discovery_saw_them_are_dialled() {
    let mut world = World::new(23, 3, |_, _| false);
    for d in 0..3 {
        world.forget_members(d);
        world.start(d);
    }
    world.run_for(SECOND);
    for d in 0..3 {
        for other in (0..3).filter(|o| *o != d) {
            let instance = world.discovery_name(other);
            let addresses = vec![world.devices[other].addr];
            world.input(
                d,
                cnsprcy_mesh::core::Input::Discovered {
                    instance,
                    addresses,
                },
            );
        }
    }
    world.run_for(SECOND * 30);
    for d in 0..3 {
        for other in (0..3).filter(|o| *o != d) {
            world.add_member(d, other);
        }
    }
    world.run_for(SECOND * 5);
    checks::sessions(&world).unwrap();
    for d in 0..3 {
        for other in (0..3).filter(|o| *o != d) {
            let key = world.devices[other].key;
            let reach = world.devices[d].core.as_ref().unwrap().reach(&key);
            assert!(
                matches!(reach, Reach::Direct { .. }),
                "d{d} sees d{other} {reach:?}"
            );
        }
    }
}

/// A peer gone silent is `suspect` once its heartbeat is overdue (it is probed then), and
/// `unreachable` once the probe went unanswered; a peer that answers stays `direct`.
#[test]
fn a_silent_peer_is_suspect_before_it_is_unreachable() {
    use cnsprcy::api::PeerStatus;
    let mut world = World::new(29, 2, |_, _| true);
    world.start(0);
    world.start(1);
    world.run_for(SECOND * 5);
    let key1 = world.devices[1].key;
    let shown = |world: &World| {
        world.devices[0]
            .core
            .as_ref()
            .unwrap()
            .reported_status(&key1)
    };
    assert_eq!(shown(&world), Some(PeerStatus::Direct));
    world.set_link(0, 1, false);
    let step = Duration::from_millis(100);
    let mut suspect_at = None;
    for tenth in 1..100u32 {
        world.run_for(step);
        match shown(&world) {
            Some(PeerStatus::Suspect) if suspect_at.is_none() => suspect_at = Some(tenth),
            Some(PeerStatus::Unreachable) => {
                let suspect_at = suspect_at.expect("suspect before unreachable");
                // Heartbeats every 2 s, 0.5 s grace, a probe waits 1 s.
                assert!(suspect_at <= 27, "suspect after {suspect_at} tenths");
                assert!(
                    tenth - suspect_at >= 9,
                    "suspect {suspect_at}, unreachable {tenth} (tenths of a second)"
                );
                return;
            }
            _ => {}
        }
    }
    panic!("never unreachable: {:?}", shown(&world));
}

/// `n` devices, all started and given 10 s to form the mesh.
fn formed(seed: u64, n: usize) -> World {
    let mut world = World::new(seed, n, |_, _| true);
    for d in 0..n {
        world.start(d);
    }
    world.run_for(SECOND * 10);
    world
}

/// Cuts every link of `device` silently.
fn cut_off(world: &mut World, device: DeviceIndex) {
    for other in 0..world.devices.len() {
        if other != device {
            world.set_link(device, other, false);
        }
    }
}

/// The device that watches `device`'s heartbeats: the next larger key, wrapping around.
fn watcher_of(world: &World, device: DeviceIndex) -> DeviceIndex {
    let key = |d: DeviceIndex| *world.devices[d].key.as_bytes();
    let all = 0..world.devices.len();
    all.clone()
        .filter(|d| key(*d) > key(device))
        .min_by_key(|d| key(*d))
        .or_else(|| all.min_by_key(|d| key(*d)))
        .expect("a mesh of at least one device")
}

/// Panics if any device shows any other `unreachable`.
fn assert_nobody_unreachable(world: &World) {
    use cnsprcy::api::PeerStatus;
    let n = world.devices.len();
    for d in 0..n {
        let core = world.devices[d].core.as_ref().unwrap();
        for other in (0..n).filter(|o| *o != d) {
            let status = core.reported_status(&world.devices[other].key);
            assert_ne!(status, Some(PeerStatus::Unreachable), "d{d} lost d{other}");
        }
    }
}

/// Where every other device has `device`, in tenths of a second after `from`: the first tenth
/// each showed it `unreachable`.
fn watch_until_unreachable(
    world: &mut World,
    device: DeviceIndex,
    tenths: u32,
) -> Vec<Option<u32>> {
    use cnsprcy::api::PeerStatus;
    let key = world.devices[device].key;
    let n = world.devices.len();
    let mut seen = vec![None; n];
    for tenth in 1..=tenths {
        world.run_for(Duration::from_millis(100));
        for (d, seen) in seen.iter_mut().enumerate() {
            if d == device || seen.is_some() {
                continue;
            }
            let status = world.devices[d]
                .core
                .as_ref()
                .unwrap()
                .reported_status(&key);
            if status == Some(PeerStatus::Unreachable) {
                *seen = Some(tenth);
            }
        }
    }
    seen
}

/// A device whose every link is cut silently is `unreachable` on every other device within
/// heartbeat interval + grace + probe time-out (3.5 s; 4 s with the links' latency), and it
/// finds out itself about as fast; everything comes back once the links heal.
#[test]
fn a_silently_cut_device_is_unreachable_everywhere_within_seconds() {
    for seed in [41, 42, 43] {
        let n = 10;
        let mut world = formed(seed, n);
        checks::statuses(&world).unwrap();
        // At a random moment of the heartbeat cycle.
        world.run_for(Duration::from_millis(seed * 370 % 2000));
        let cut = 7;
        cut_off(&mut world, cut);
        let seen = watch_until_unreachable(&mut world, cut, 60);
        for (d, at) in seen.iter().enumerate() {
            if d == cut {
                continue;
            }
            let at = at.unwrap_or_else(|| panic!("seed {seed}: d{d} never saw d{cut} go"));
            assert!(
                at <= 40,
                "seed {seed}: d{d} saw d{cut} go after {at} tenths"
            );
        }
        let own = world.devices[cut].core.as_ref().unwrap();
        let lost = (0..n)
            .filter(|d| *d != cut)
            .filter(|d| own.reach(&world.devices[*d].key) == Reach::Unreachable)
            .count();
        assert_eq!(
            lost,
            n - 1,
            "seed {seed}: the cut device sees the others gone"
        );
        world.heal_all();
        world.run_for(SECOND * 70);
        checks::sessions(&world).unwrap();
        checks::statuses(&world).unwrap();
    }
}

/// A device and its watcher cut off together (neighbours on the ring): the watcher's watcher
/// notices it, its sweep finds the other, and both are unreachable everywhere within seconds.
#[test]
fn a_device_cut_off_with_its_watcher_is_noticed_too() {
    let n = 8;
    let mut world = formed(59, n);
    let (first, second) = (3, watcher_of(&world, 3));
    cut_off(&mut world, first);
    cut_off(&mut world, second);
    world.run_for(SECOND * 8);
    for d in (0..n).filter(|d| *d != first && *d != second) {
        let core = world.devices[d].core.as_ref().unwrap();
        for gone in [first, second] {
            let reach = core.reach(&world.devices[gone].key);
            assert_eq!(reach, Reach::Unreachable, "d{d} still reaches d{gone}");
        }
    }
}

/// A link that dies between a device and its watcher alone ends their session on both sides
/// within seconds, not their standing: they reach each other through the rest, and nobody drops
/// either.
#[test]
fn one_dead_link_costs_one_session() {
    let mut world = formed(47, 8);
    let watcher = watcher_of(&world, 2);
    world.set_link(2, watcher, false);
    for _ in 0..50 {
        world.run_for(Duration::from_millis(100));
        assert_nobody_unreachable(&world);
    }
    for (d, other) in [(watcher, 2), (2, watcher)] {
        let core = world.devices[d].core.as_ref().unwrap();
        let reach = core.reach(&world.devices[other].key);
        assert!(
            matches!(reach, Reach::Relayed { .. }),
            "d{d} reaches d{other} through another: {reach:?}"
        );
    }
}

/// A slow, lossy link (200 ms each way, 10 % of segments resent) for ten minutes: nobody is
/// ever taken for unreachable.
#[test]
fn a_lossy_slow_link_is_not_a_dead_one() {
    let mut world = formed(53, 6);
    world.set_latency(1, 4, Duration::from_millis(200));
    world.set_loss(1, 4, 0.1);
    for _ in 0..600 {
        world.run_for(SECOND);
        assert_nobody_unreachable(&world);
    }
}

/// Heartbeats from a device that are lost on their way (UDP dropped by a firewall) cost one
/// false alarm: its watcher probes, gets an answer, and says the heartbeat went missing, so the
/// driver moves them into the session; nobody loses a peer, and no alarm follows.
#[test]
fn heartbeats_lost_on_their_way_cost_one_false_alarm() {
    let mut world = formed(61, 5);
    world.heartbeats_dropped.insert(2);
    for _ in 0..60 {
        world.run_for(SECOND);
        assert_nobody_unreachable(&world);
    }
    assert_eq!(world.heartbeats_missed, vec![(watcher_of(&world, 2), 2)]);
    assert!(world.heartbeats_dropped.is_empty());
}

/// An idle device pings about as often in a mesh of 40 as in one of 10: with more than ten
/// sessions, the devices agree on a longer keepalive interval, in steps. Nobody is shown
/// `suspect` meanwhile (a side that kept the shorter interval would find the keepalive late).
#[test]
fn keepalive_pings_do_not_grow_with_the_mesh() {
    let per_device_minute = |n: usize| {
        let mut world = formed(67, n);
        world.pings_sent.clear();
        world.suspect_events = 0;
        world.run_for(SECOND * 600);
        assert_eq!(world.suspect_events, 0, "suspects in a mesh of {n}");
        world.pings_sent.values().sum::<u64>() as f64 / n as f64 / 10.0
    };
    let (ten, forty) = (per_device_minute(10), per_device_minute(40));
    // About 4.5 a minute each: half of nine sessions' keepalives (the side that dialled pings).
    assert!(ten > 2.0, "{ten} pings a minute in a mesh of 10");
    assert!(
        forty < ten * 1.5,
        "{forty} pings a minute in a mesh of 40, {ten} in one of 10"
    );
}

/// A target that is down when the message is sent gets it once after it returns, also when the
/// sender restarted meanwhile (the outbox is on its disk).
#[test]
fn messages_wait_for_a_device_that_is_down_and_arrive_once() {
    let mut world = World::new(11, 4, |_, _| true);
    for d in 0..4 {
        world.start(d);
    }
    world.run_for(SECOND * 5);
    world.crash(3);
    world.run_for(SECOND);
    world.send(0, &[3], SECOND * 3600);
    world.send(0, &[], SECOND * 3600);
    world.run_for(SECOND);
    world.crash(0);
    world.run_for(SECOND * 5);
    world.start(0);
    world.start(3);
    world.run_for(SECOND * 70);
    checks::messages(&world).unwrap();
    checks::outboxes(&world).unwrap();
    assert_eq!(world.runs.iter().filter(|r| r.device == 3).count(), 2);
}

/// A target starts a message's handler once its record is written, without waiting for the
/// sync (which takes 1 to 20 ms here); a run that ends before the sync is reported to the origin
/// after the ack.
#[test]
fn handlers_start_before_the_record_is_synced_and_reply_after_the_ack() {
    let mut world = World::new(23, 3, |_, _| true);
    for d in 0..3 {
        world.start(d);
    }
    world.run_for(SECOND * 5);
    let (mut started_unsynced, mut ended_unsynced) = (0, 0);
    for _ in 0..10 {
        world.send(0, &[1], SECOND * 3600);
        let send = world.sends.len() - 1;
        let (mut started, mut ended) = (false, false);
        for _ in 0..1000 {
            world.run_for(Duration::from_micros(100));
            let queues = world.devices[1].core.as_ref().expect("up").queue_sizes();
            let unsynced = queues["delivering"] > 0;
            started |= unsynced && world.runs.iter().any(|r| r.send == Some(send));
            ended |= queues["unreported"] > 0;
        }
        started_unsynced += usize::from(started);
        ended_unsynced += usize::from(ended);
    }
    world.run_for(SECOND * 40);
    checks::messages(&world).unwrap();
    checks::acks_before_replies(&world).unwrap();
    checks::outboxes(&world).unwrap();
    assert!(
        started_unsynced >= 5,
        "{started_unsynced} of 10 handlers started before the sync"
    );
    assert!(
        ended_unsynced >= 2,
        "{ended_unsynced} of 10 handlers ended before the sync"
    );
    assert_eq!(world.runs.iter().filter(|r| r.device == 1).count(), 10);
}

/// A target that crashes after recording a message as delivered (and acknowledging it), but
/// before its handler started, runs it once when it is back; a crash after the start does not
/// run it again.
#[test]
fn a_crash_between_the_record_and_the_handler_start_loses_no_run() {
    let mut world = World::new(17, 3, |_, _| true);
    for d in 0..3 {
        world.start(d);
    }
    world.run_for(SECOND * 5);
    world.send(0, &[1], SECOND * 3600);
    let deadline = world.now + SECOND;
    while world.devices[1].disk.inbox.is_empty() {
        assert!(world.now < deadline, "the message was never recorded");
        world.run_for(Duration::from_micros(100));
    }
    assert!(world.runs.is_empty(), "started before the crash");
    world.crash(1);
    world.run_for(SECOND);
    world.start(1);
    world.run_for(SECOND * 5);
    assert_eq!(world.runs.iter().filter(|r| r.device == 1).count(), 1);
    assert!(world.devices[1].disk.inbox.is_empty());
    world.crash(1);
    world.start(1);
    world.run_for(SECOND * 40);
    checks::messages(&world).unwrap();
    checks::outboxes(&world).unwrap();
    assert_eq!(world.runs.iter().filter(|r| r.device == 1).count(), 1);
}

/// A handler service out of reach does not lose a delivered message: its handler runs once the
/// service is back, once; and not at all if the message expires first.
#[test]
fn a_handler_service_out_of_reach_delays_the_run_and_loses_nothing() {
    let mut world = World::new(19, 3, |_, _| true);
    for d in 0..3 {
        world.start(d);
    }
    world.run_for(SECOND * 5);
    world.devices[1].handlers_down = true;
    world.send(0, &[1], SECOND * 3600);
    world.send(0, &[1], SECOND * 3600);
    world.send(2, &[1], SECOND * 8);
    world.run_for(SECOND * 12);
    assert!(world.runs.is_empty());
    // The second from d0 waits for the first (same sender and tag), unrecorded; d2's expired.
    assert_eq!(world.devices[1].disk.inbox.len(), 1);
    let request = world.call(1, cnsprcy_mesh::core::ApiCall::Messages);
    let Some(Answer::Messages(info)) = world.answer(1, request) else {
        panic!("no messages answer")
    };
    let states: Vec<(&str, &str)> = (info.handling.iter())
        .map(|m| (m.from.as_str(), m.state.as_str()))
        .collect();
    assert_eq!(states, [("d0", "retrying")], "{info:?}");
    assert!(info.handling[0].failed_attempts >= 2, "{info:?}");
    world.devices[1].handlers_down = false;
    world.run_for(SECOND * 10);
    assert_eq!(world.runs.iter().filter(|r| r.device == 1).count(), 2);
    assert!(world.devices[1].disk.inbox.is_empty());
    checks::messages(&world).unwrap();
    checks::order(&world).unwrap();
    checks::outboxes(&world).unwrap();
}

/// A message whose TTL runs out while its target is down never runs there, leaves the outbox,
/// and its `expired` event comes when the TTL ends.
#[test]
fn a_message_expires_with_its_ttl() {
    let mut world = World::new(13, 3, |_, _| true);
    for d in 0..3 {
        world.start(d);
    }
    world.run_for(SECOND * 5);
    world.crash(2);
    world.run_for(SECOND);
    let sent = world.now;
    world.send(0, &[1, 2], SECOND * 5);
    world.run_for(SECOND * 20);
    // Told when it happens, not at the next housekeeping round (up to 5 s later).
    let [(device, at)] = world.expired[..] else {
        panic!("one expired event: {:?}", world.expired)
    };
    assert_eq!(device, 0);
    let late = at - sent;
    assert!(
        late >= SECOND * 5 && late <= SECOND * 5 + Duration::from_millis(100),
        "expired after {late:?}"
    );
    world.start(2);
    world.run_for(SECOND * 40);
    assert_eq!(world.runs.iter().filter(|r| r.device == 1).count(), 1);
    assert_eq!(world.runs.iter().filter(|r| r.device == 2).count(), 0);
    checks::outboxes(&world).unwrap();
}

/// Messages with one tag queued for a device that is cut off run there in the order they were
/// sent once it is back (one that expired meanwhile does not run), also when the first copies
/// took another path than the resends.
#[test]
fn queued_messages_run_in_send_order() {
    let mut world = World::new(23, 4, |_, _| true);
    for d in 0..4 {
        world.start(d);
    }
    world.run_for(SECOND * 5);
    // d3 is reached only through d1 for a while, then not at all, then directly.
    world.set_link(0, 3, false);
    world.set_link(2, 3, false);
    world.run_for(SECOND * 35);
    world.send(0, &[3], SECOND * 3600);
    world.run_for(Duration::from_millis(1));
    world.set_link(1, 3, false);
    world.send(0, &[3], SECOND * 5);
    for _ in 0..6 {
        world.send(0, &[3], SECOND * 3600);
        world.run_for(Duration::from_millis(50));
    }
    world.run_for(SECOND * 20);
    world.heal_all();
    world.run_for(SECOND * 70);
    let ran: Vec<usize> = (world.runs.iter())
        .filter(|r| r.device == 3)
        .filter_map(|r| r.send)
        .collect();
    assert_eq!(ran, [0, 2, 3, 4, 5, 6, 7]);
    checks::order(&world).unwrap();
    checks::outboxes(&world).unwrap();
}

/// A device can send to itself: its handler runs once, and the send's outcome is reported.
#[test]
fn a_device_sends_to_itself() {
    let mut world = World::new(29, 2, |_, _| true);
    world.start(0);
    world.start(1);
    world.run_for(SECOND * 5);
    world.send(0, &[0, 1], SECOND * 3600);
    world.run_for(SECOND * 2);
    let ran: Vec<usize> = world.runs.iter().map(|r| r.device).collect();
    assert_eq!(ran.iter().filter(|d| **d == 0).count(), 1);
    assert_eq!(ran.iter().filter(|d| **d == 1).count(), 1);
    checks::outboxes(&world).unwrap();
}

/// Both sides of a partition write, some to the same keys; once it heals, anti-entropy makes every
/// store the same, and no acknowledged write is lost.
#[test]
fn anti_entropy_repairs_a_partition() {
    let mut world = World::new(17, 6, |_, _| true);
    for d in 0..6 {
        world.start(d);
    }
    world.run_for(SECOND * 5);
    for a in 0..3 {
        for b in 3..6 {
            world.set_link(a, b, false);
        }
    }
    for i in 0..30 {
        world.write(
            i % 6,
            &format!("key{}", i % 10),
            Some(format!("{i}").into_bytes()),
        );
        world.run_for(Duration::from_millis(300));
    }
    world.run_for(SECOND * 40);
    assert!(checks::stores(&world).is_err(), "the partition held");
    world.heal_all();
    world.run_for(SECOND * 90);
    checks::stores(&world).unwrap();
    checks::sessions(&world).unwrap();
}

/// A link cut silently (no FIN, no RST) is noticed by both sides within interval + timeout, and
/// the session comes back once it heals.
#[test]
fn a_silent_cut_is_noticed_and_repaired() {
    let mut world = World::new(19, 2, |_, _| true);
    world.start(0);
    world.start(1);
    world.run_for(SECOND * 5);
    world.set_link(0, 1, false);
    world.run_for(SECOND * 31);
    let key1 = world.devices[1].key;
    assert_eq!(
        world.devices[0].core.as_ref().unwrap().reach(&key1),
        Reach::Unreachable
    );
    world.set_link(0, 1, true);
    world.run_for(SECOND * 65);
    checks::sessions(&world).unwrap();
    checks::statuses(&world).unwrap();
}

/// Discovery looks for members only while some member has no session: a whole mesh sends no
/// mDNS queries; a device that is cut off makes everyone look again, and healing stops it.
#[test]
fn discovery_looks_for_members_only_while_one_is_missing() {
    let mut world = formed(23, 4);
    let browsing =
        |world: &World| -> Vec<Option<bool>> { world.devices.iter().map(|d| d.browsing).collect() };
    assert_eq!(browsing(&world), vec![Some(false); 4]);
    cut_off(&mut world, 3);
    world.run_for(SECOND * 10);
    assert_eq!(browsing(&world), vec![Some(true); 4]);
    for other in 0..3 {
        world.set_link(3, other, true);
    }
    world.run_for(SECOND * 30);
    checks::statuses(&world).unwrap();
    assert_eq!(browsing(&world), vec![Some(false); 4]);
}

/// The names of the members `device` holds, sorted.
fn member_names(world: &World, device: DeviceIndex) -> Vec<String> {
    let core = world.devices[device].core.as_ref().expect("running");
    core.members().iter().map(|m| m.name.to_string()).collect()
}

/// Roster changes made on both sides of a partition at once (a revocation on one side; on the
/// other, the revoked device adding a key and another member disabling a device) end the same
/// on every device once it heals: the revoked device and the key it added are out everywhere,
/// the disabled device forgot the mesh, and nobody keeps a session with either.
#[test]
fn roster_changes_on_both_sides_of_a_partition_converge() {
    use cnsprcy::wire::MemberState;
    use cnsprcy_mesh::core::ApiCall;
    let mut world = World::new(41, 7, |_, _| true);
    // d6 is a thief's device: known to nobody yet.
    for d in 0..7 {
        world.devices[d]
            .disk
            .roster
            .retain(|m| m.name.as_str() != "d6");
    }
    world.forget_members(6);
    for d in 0..7 {
        world.start(d);
    }
    world.run_for(SECOND * 10);
    for a in 0..3 {
        for b in 3..6 {
            world.set_link(a, b, false);
        }
    }
    world.run_for(SECOND * 5);
    let name = |world: &World, d: DeviceIndex| world.devices[d].name.clone();
    let revoke = ApiCall::RemoveMember {
        name: name(&world, 5),
        state: MemberState::Revoked,
    };
    world.call(0, revoke);
    // d5, stolen but not yet revoked on its side, adds the thief's key; d4 disables d2.
    let thief = cnsprcy_mesh::roster::Member::new(
        cnsprcy::identity::DeviceName::new("d6").unwrap(),
        world.devices[6].key,
        vec![world.devices[6].addr],
    );
    world.call(5, ApiCall::AddMember(thief));
    let disable = ApiCall::RemoveMember {
        name: name(&world, 2),
        state: MemberState::Disabled,
    };
    world.call(4, disable);
    world.run_for(SECOND * 5);
    assert!(
        member_names(&world, 3).contains(&"d6".to_owned()),
        "the thief's key got in on d5's side: {:?}",
        member_names(&world, 3)
    );
    world.heal_all();
    world.run_for(SECOND * 30);

    let kept = [0, 1, 3, 4];
    let digest = world.devices[0].core.as_ref().unwrap().roster_digest();
    for d in kept {
        let core = world.devices[d].core.as_ref().unwrap();
        assert_eq!(core.roster_digest(), digest, "d{d}'s roster differs");
        assert_eq!(
            member_names(&world, d),
            kept.iter()
                .filter(|k| **k != d)
                .map(|k| format!("d{k}"))
                .collect::<Vec<_>>()
        );
        for out in [2, 5, 6] {
            assert!(
                core.session_of(&world.devices[out].key).is_none(),
                "d{d} keeps a session with d{out}"
            );
        }
    }
    assert!(member_names(&world, 2).is_empty(), "d2 forgot the mesh");
}

/// A device with an empty roster joins with an invitation made by one member and ends up with
/// a session to every member; a second use of the same invitation is refused.
#[test]
fn a_device_joins_with_an_invitation_and_meets_every_member() {
    use cnsprcy_mesh::core::{Answer, ApiCall};
    let mut world = World::new(43, 6, |_, _| true);
    for d in 0..6 {
        world.devices[d]
            .disk
            .roster
            .retain(|m| m.name.as_str() != "d5");
    }
    world.forget_members(5);
    for d in 0..6 {
        world.start(d);
    }
    world.run_for(SECOND * 10);
    let lifetime = Duration::from_secs(600);
    let request = world.call(2, ApiCall::Invite { lifetime });
    world.run_for(Duration::from_millis(10));
    let Some(Answer::Invited(invited)) = world.answer(2, request) else {
        panic!("no invitation: {:?}", world.answer(2, request));
    };
    let invitation = cnsprcy::invitation::Invitation {
        inviter: world.devices[2].key,
        secret: invited.secret,
        addresses: vec![world.devices[2].addr],
    };
    let join = world.call(5, ApiCall::Join(invitation.clone()));
    world.run_for(SECOND * 10);
    assert!(
        matches!(world.answer(5, join), Some(Answer::Joined(Ok(_)))),
        "{:?}",
        world.answer(5, join)
    );
    checks::sessions(&world).unwrap();
    for d in 0..6 {
        for other in (0..6).filter(|o| *o != d) {
            let key = world.devices[other].key;
            let reach = world.devices[d].core.as_ref().unwrap().reach(&key);
            assert!(
                matches!(reach, Reach::Direct { .. }),
                "d{d} sees d{other} {reach:?}"
            );
        }
    }
    // d5 leaves, then tries the same invitation again: used.
    let leave = world.call(5, ApiCall::Leave { force: false });
    world.run_for(SECOND * 5);
    assert!(matches!(world.answer(5, leave), Some(Answer::Left(Ok(5)))));
    assert!(member_names(&world, 5).is_empty());
    assert!(!member_names(&world, 0).contains(&"d5".to_owned()));
    let again = world.call(5, ApiCall::Join(invitation));
    world.run_for(SECOND * 5);
    match world.answer(5, again) {
        Some(Answer::Joined(Err(e))) => assert!(e.message.contains("used already"), "{e:?}"),
        other => panic!("joined twice: {other:?}"),
    }
    assert!(
        member_names(&world, 5).is_empty(),
        "a refused join leaves nothing"
    );
}
