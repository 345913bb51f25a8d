//! What must hold after a run, once every link healed, every device runs again and the mesh had
//! time to settle: the invariants of `core/mod.rs`, checked from outside.

use std::collections::BTreeMap;

use cnsprcy::identity::PublicKey;
use cnsprcy_mesh::messaging::MAX_OUTBOX_MESSAGES;
use cnsprcy_mesh::peers::Reach;

use crate::world::{DeviceIndex, World};

/// Bounds on the core's queues and maps during a run (`Core::queue_sizes`).
fn bound(name: &str, devices: usize) -> usize {
    match name {
        "outbox" => MAX_OUTBOX_MESSAGES,
        "sessions" => devices,
        "pings" => 0,
        "problems" => devices,
        "knocks" => cnsprcy::api::MAX_KNOCKS,
        // One per message being recorded or run; the workload sends far fewer.
        _ => 10_000,
    }
}

pub fn all(world: &World) -> Result<(), String> {
    sessions(world)?;
    statuses(world)?;
    messages(world)?;
    order(world)?;
    stores(world)?;
    outboxes(world)?;
    queues(world)
}

/// One session per pair, the same connection on both sides.
pub fn sessions(world: &World) -> Result<(), String> {
    for (a, b) in world.up_pairs() {
        let core_a = world.devices[a].core.as_ref().expect("up");
        let core_b = world.devices[b].core.as_ref().expect("up");
        let (ka, kb) = (world.devices[a].key, world.devices[b].key);
        let (Some(sa), Some(sb)) = (core_a.session_of(&kb), core_b.session_of(&ka)) else {
            return Err(format!(
                "d{a} and d{b}: no session on {} (d{a}: {:?}, d{b}: {:?})",
                if core_a.session_of(&kb).is_none() {
                    format!("d{a}")
                } else {
                    format!("d{b}")
                },
                core_a.reach(&kb),
                core_b.reach(&ka),
            ));
        };
        let conn = world
            .connection_of(a, sa)
            .ok_or_else(|| format!("d{a}'s session {sa} with d{b} has no connection"))?;
        if !conn.ends.contains(&(b, sb)) {
            return Err(format!(
                "d{a} and d{b} keep different sessions ({sa} on d{a}, {sb} on d{b})"
            ));
        }
    }
    Ok(())
}

/// With every link up, every member is direct.
pub fn statuses(world: &World) -> Result<(), String> {
    for (a, b) in world.up_pairs() {
        for (x, y) in [(a, b), (b, a)] {
            let core = world.devices[x].core.as_ref().expect("up");
            let reach = core.reach(&world.devices[y].key);
            if world.link_up(x, y) && !matches!(reach, Reach::Direct { .. }) {
                return Err(format!(
                    "d{x} sees d{y} as {reach:?} though their link is up"
                ));
            }
            // ...and gives no reason why not (a stale one would mislead `peers`).
            let reason = core.reason_code(&world.devices[y].key);
            if matches!(reach, Reach::Direct { .. }) && reason.is_some() {
                return Err(format!(
                    "d{x} sees d{y} as direct, yet gives the reason {reason:?}"
                ));
            }
        }
    }
    Ok(())
}

/// Every accepted message with a TTL longer than the run ran its handler exactly once on every
/// target (a device wiped since it was sent may have run it again, or lost it with its sender).
pub fn messages(world: &World) -> Result<(), String> {
    let mut runs: BTreeMap<(&str, DeviceIndex), usize> = BTreeMap::new();
    for run in &world.runs {
        *runs.entry((run.message.as_str(), run.device)).or_default() += 1;
    }
    let wiped_after = |d: DeviceIndex, at| world.devices[d].wiped_at.is_some_and(|w| w >= at);
    for ((message, device), count) in &runs {
        if *count > 1 && world.devices[*device].wiped_at.is_none() {
            return Err(format!("d{device} ran message {message} {count} times"));
        }
    }
    for send in &world.sends {
        let Some(id) = &send.accepted else { continue };
        if send.ttl < world.now || wiped_after(send.from, send.at) {
            continue;
        }
        for target in &send.targets {
            let count = runs.get(&(id.as_str(), *target)).copied().unwrap_or(0);
            if count == 0 && !wiped_after(*target, send.at) {
                return Err(format!(
                    "d{target} never ran message {id} from d{} (sent at {:?})",
                    send.from, send.at
                ));
            }
        }
    }
    Ok(())
}

/// Every target acknowledged a message before it sent the reply of its handler run: the origin
/// hears of a run only for a message it knows was delivered. Holds only where every target had
/// a way to the origin all along: an ack that finds none is dropped and sent again when the
/// origin sends the message again, which can be after the reply found a way.
pub fn acks_before_replies(world: &World) -> Result<(), String> {
    for ((id, target), sent) in &world.acked_replied {
        let (acked, Some(replied)) = (sent.acked, sent.replied) else {
            continue;
        };
        if acked.is_none_or(|acked| acked > replied) {
            return Err(format!(
                "{} replied to message {} at {replied:?}, before it acknowledged it ({acked:?})",
                PublicKey::from_bytes(*target).device_id(),
                cnsprcy_mesh::messaging::id_text(id),
            ));
        }
    }
    Ok(())
}

/// On every target, one sender's messages (all of one tag here) started their handlers in the
/// order they were sent, leaving out messages never accepted and devices wiped in the run.
pub fn order(world: &World) -> Result<(), String> {
    let mut last: BTreeMap<(DeviceIndex, DeviceIndex), usize> = BTreeMap::new();
    for run in &world.runs {
        let Some(index) = run.send else { continue };
        let send = &world.sends[index];
        if send.accepted.is_none()
            || world.devices[run.device].wiped_at.is_some()
            || world.devices[send.from].wiped_at.is_some()
        {
            continue;
        }
        if let Some(before) = last.insert((send.from, run.device), index)
            && before > index
        {
            return Err(format!(
                "d{} ran send {index} from d{} after send {before}, which was sent later",
                run.device, send.from
            ));
        }
    }
    Ok(())
}

/// All stores hold the same, and every acknowledged write is there (or overwritten by a later
/// one), unless its writer was wiped before it could spread it.
pub fn stores(world: &World) -> Result<(), String> {
    let up: Vec<DeviceIndex> = (0..world.devices.len())
        .filter(|d| world.is_up(*d))
        .collect();
    let Some(first) = up.first() else {
        return Ok(());
    };
    let reference = world.devices[*first].store.records();
    for d in &up[1..] {
        let records = world.devices[*d].store.records();
        if records != reference {
            let differing = reference
                .iter()
                .find(|(k, v)| records.get(*k) != Some(*v))
                .map(|(k, _)| k.clone())
                .or_else(|| {
                    records
                        .keys()
                        .find(|k| !reference.contains_key(*k))
                        .cloned()
                });
            return Err(format!(
                "the stores of d{first} and d{d} differ ({} and {} keys; first at {differing:?})",
                reference.len(),
                records.len()
            ));
        }
    }
    for write in &world.writes {
        if world.devices[write.device]
            .wiped_at
            .is_some_and(|w| w >= write.at)
        {
            continue;
        }
        let held = reference.get(&write.entry.key);
        let kept = held.is_some_and(|r| (r.ts, r.writer) >= (write.entry.ts, write.entry.writer));
        if !kept {
            return Err(format!(
                "the write of {:?} by d{} at {:?} is lost",
                write.entry.key, write.device, write.at
            ));
        }
    }
    Ok(())
}

pub fn outboxes(world: &World) -> Result<(), String> {
    for (d, device) in world.devices.iter().enumerate() {
        if let Some(core) = &device.core
            && core.outbox_len() > 0
        {
            return Err(format!(
                "d{d}'s outbox still holds {} messages",
                core.outbox_len()
            ));
        }
    }
    Ok(())
}

pub fn queues(world: &World) -> Result<(), String> {
    for (name, peak) in &world.peak_queues {
        let limit = bound(name, world.devices.len());
        if *peak > limit && *name != "pings" {
            return Err(format!("the core's {name} grew to {peak} (bound {limit})"));
        }
    }
    Ok(())
}
