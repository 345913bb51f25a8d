//! Which copies of a message to send where, without I/O. A copy goes to a next hop with the list
//! of targets that hop serves: itself (if it is a target) and the targets it passes the message
//! on to. So one copy crosses each link, relayed-only targets are reached through their relay,
//! and a device with many direct targets hands some of them to a few forwarders instead of
//! sending every copy over its own link.

use std::collections::BTreeMap;

use cnsprcy::identity::PublicKey;

use crate::peers::{PeerTable, Reach};

/// A device sends at most this many copies itself when other devices can pass the message on.
pub const FANOUT: usize = 3;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Next hop and the targets its copy serves.
    pub copies: Vec<(PublicKey, Vec<PublicKey>)>,
    /// Targets without a path now.
    pub unreachable: Vec<PublicKey>,
}

/// Plans the copies for `targets` (this device excluded by the caller).
pub fn plan(targets: &[PublicKey], table: &PeerTable) -> Plan {
    let mut direct = Vec::new();
    let mut groups: BTreeMap<[u8; 32], (PublicKey, Vec<PublicKey>)> = BTreeMap::new();
    let mut unreachable = Vec::new();
    for target in targets {
        match table.reach(target) {
            Reach::Direct { rtt, .. } => direct.push((rtt, *target)),
            Reach::Relayed { via, .. } => groups
                .entry(*via.as_bytes())
                .or_insert_with(|| (via, Vec::new()))
                .1
                .push(*target),
            Reach::Unreachable => unreachable.push(*target),
        }
    }
    // The fastest direct targets become forwarders; the rest go through one of them when it
    // has a session with them, spread evenly, and directly otherwise.
    direct.sort_by_key(|(rtt, key)| (rtt.unwrap_or(std::time::Duration::MAX), *key.as_bytes()));
    let forwarders: Vec<PublicKey> = direct.iter().take(FANOUT).map(|(_, k)| *k).collect();
    for key in &forwarders {
        groups
            .entry(*key.as_bytes())
            .or_insert_with(|| (*key, Vec::new()))
            .1
            .push(*key);
    }
    for (_, target) in direct.iter().skip(FANOUT) {
        let forwarder = forwarders
            .iter()
            .filter(|f| table.reports_direct(f, target))
            .min_by_key(|f| groups.get(f.as_bytes()).map_or(0, |g| g.1.len()));
        let hop = forwarder.copied().unwrap_or(*target);
        groups
            .entry(*hop.as_bytes())
            .or_insert_with(|| (hop, Vec::new()))
            .1
            .push(*target);
    }
    Plan {
        copies: groups.into_values().collect(),
        unreachable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnsprcy::identity::Identity;
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    fn key(seed: u8) -> PublicKey {
        Identity::from_secret([seed; 32]).public_key()
    }

    fn addr() -> SocketAddr {
        "10.0.0.1:7332".parse().unwrap()
    }

    /// A device directly connected to `direct` (with RTTs 1, 2, ... ms), each of which reports
    /// sessions with all the others.
    fn table(direct: &[PublicKey], others: &[PublicKey]) -> PeerTable {
        let now = Instant::now();
        let mut table = PeerTable::default();
        table.sync_members(direct.iter().chain(others).copied(), now);
        for (i, key) in direct.iter().enumerate() {
            table.session_up(key, addr(), now);
            table.set_rtt(key, Duration::from_millis(i as u64 + 1));
        }
        for key in direct {
            let neighbors = direct
                .iter()
                .filter(|k| *k != key)
                .map(|k| (*k, Some(Duration::from_millis(1))))
                .collect();
            table.set_report(key, neighbors);
        }
        table
    }

    fn served(plan: &Plan) -> Vec<PublicKey> {
        let mut all: Vec<PublicKey> = plan.copies.iter().flat_map(|(_, t)| t.clone()).collect();
        all.sort_by_key(|k| *k.as_bytes());
        all
    }

    #[test]
    fn a_full_mesh_sends_fanout_copies_that_cover_everyone_once() {
        let direct: Vec<PublicKey> = (1..=9).map(key).collect();
        let table = table(&direct, &[]);
        let plan = plan(&direct, &table);
        assert_eq!(plan.copies.len(), FANOUT);
        let mut expected = direct.clone();
        expected.sort_by_key(|k| *k.as_bytes());
        assert_eq!(served(&plan), expected, "every target exactly once");
        let sizes: Vec<usize> = plan.copies.iter().map(|(_, t)| t.len()).collect();
        assert!(sizes.iter().all(|s| *s == 3), "spread evenly: {sizes:?}");
        // The forwarders are the fastest peers and serve themselves too.
        for (hop, targets) in &plan.copies {
            assert!(targets.contains(hop));
            assert!(direct[..FANOUT].contains(hop));
        }
    }

    #[test]
    fn without_reports_every_direct_target_gets_its_own_copy() {
        let now = Instant::now();
        let direct: Vec<PublicKey> = (1..=5).map(key).collect();
        let mut table = PeerTable::default();
        table.sync_members(direct.iter().copied(), now);
        for k in &direct {
            table.session_up(k, addr(), now);
        }
        let plan = plan(&direct, &table);
        assert_eq!(plan.copies.len(), 5);
    }

    #[test]
    fn relayed_targets_go_to_their_relay_and_the_rest_wait() {
        let (b, c, d) = (key(2), key(3), key(4));
        let now = Instant::now();
        let mut table = PeerTable::default();
        table.sync_members([b, c, d], now);
        table.session_up(&b, addr(), now);
        table.set_report(&b, vec![(c, None)]);
        let plan = plan(&[c, d], &table);
        assert_eq!(plan.copies, vec![(b, vec![c])]);
        assert_eq!(plan.unreachable, vec![d]);
    }
}
