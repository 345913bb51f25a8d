//! Which connection may take a handshake slot, without I/O.
//!
//! Handshakes in progress are bounded (`capacity`), each by the handshake time-out. A bound
//! alone lets one source address hold every slot for as long as it keeps opening connections,
//! and no member could then dial in. So slots are shared out by source: when all are taken, a
//! connection from a source holding fewer than the busiest one takes the oldest slot of the
//! busiest (that handshake is cancelled); a connection from the busiest source is refused.
//! A flood from one address (or one IPv6 /64, which one host can fill) then costs other sources
//! nothing but the flood's own share.
//!
//! Invariants: at most `capacity` slots are held; a source that holds fewer slots than another
//! is never refused while the other holds more than one.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

/// Where a connection comes from, as far as sharing goes: an IPv4 address, or an IPv6 /64 (one
/// host usually has a whole /64 to pick addresses from).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    V4([u8; 4]),
    V6Prefix([u8; 8]),
}

impl Source {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.octets()),
                None => {
                    let mut prefix = [0u8; 8];
                    prefix.copy_from_slice(&v6.octets()[..8]);
                    Source::V6Prefix(prefix)
                }
            },
        }
    }
}

/// A slot's number, handed out in order: the oldest slot has the smallest.
pub type Ticket = u64;

#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// A free slot was taken.
    Admitted(Ticket),
    /// The slot `evicted` (of the busiest source) was taken over: cancel that handshake.
    Evicted { ticket: Ticket, evicted: Ticket },
    /// Refused: this source already holds the most slots.
    Refused,
}

#[derive(Debug)]
pub struct Slots {
    capacity: usize,
    next: Ticket,
    /// Held slots, oldest first, by ticket.
    held: BTreeMap<Ticket, Source>,
    per_source: HashMap<Source, usize>,
}

impl Slots {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            next: 0,
            held: BTreeMap::new(),
            per_source: HashMap::new(),
        }
    }

    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held.len()
    }

    pub fn admit(&mut self, source: Source) -> Admit {
        if self.held.len() < self.capacity {
            return Admit::Admitted(self.take(source));
        }
        let own = self.per_source.get(&source).copied().unwrap_or(0);
        // The busiest source; of equals, the smallest for a deterministic choice.
        let Some((busiest, most)) = self
            .per_source
            .iter()
            .map(|(s, n)| (*s, *n))
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        else {
            return Admit::Refused;
        };
        if own + 1 >= most {
            return Admit::Refused;
        }
        let oldest = self
            .held
            .iter()
            .find(|(_, s)| **s == busiest)
            .map(|(t, _)| *t);
        let Some(evicted) = oldest else {
            return Admit::Refused;
        };
        self.release(evicted);
        Admit::Evicted {
            ticket: self.take(source),
            evicted,
        }
    }

    fn take(&mut self, source: Source) -> Ticket {
        let ticket = self.next;
        self.next += 1;
        self.held.insert(ticket, source);
        *self.per_source.entry(source).or_default() += 1;
        ticket
    }

    /// The handshake of `ticket` ended (or was evicted); does nothing if it was released already.
    pub fn release(&mut self, ticket: Ticket) {
        let Some(source) = self.held.remove(&ticket) else {
            return;
        };
        if let Some(count) = self.per_source.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                self.per_source.remove(&source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(last: u8) -> Source {
        Source::of(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn a_flood_from_one_source_does_not_lock_out_another() {
        let mut slots = Slots::new(4);
        let flood: Vec<Ticket> = (0..4)
            .map(|_| match slots.admit(v4(1)) {
                Admit::Admitted(t) => t,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(slots.admit(v4(1)), Admit::Refused);
        // A member from elsewhere takes the flood's oldest slot.
        assert_eq!(
            slots.admit(v4(2)),
            Admit::Evicted {
                ticket: 4,
                evicted: flood[0]
            }
        );
        assert_eq!(slots.held(), 4);
        // Sources with one slot each do not evict each other; the flood gives way again.
        assert!(matches!(
            slots.admit(v4(3)),
            Admit::Evicted { evicted: 1, .. }
        ));
        assert!(matches!(
            slots.admit(v4(4)),
            Admit::Evicted { evicted: 2, .. }
        ));
        assert_eq!(slots.admit(v4(5)), Admit::Refused, "now everyone holds one");
        // Releasing twice (ended after eviction) is harmless.
        slots.release(flood[0]);
        slots.release(4);
        assert_eq!(slots.held(), 3);
        assert!(matches!(slots.admit(v4(5)), Admit::Admitted(_)));
    }

    #[test]
    fn ipv6_sources_are_grouped_by_prefix() {
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        let c: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        assert_eq!(Source::of(a), Source::of(b));
        assert_ne!(Source::of(a), Source::of(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(Source::of(mapped), v4(1));
    }
}
