//! Which helper services are registered on `mesh.sock` right now.

use std::collections::HashMap;
use std::sync::Mutex;

use cnsprcy::ipc::ServiceKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registration {
    pub pid: u32,
    /// Tells a restarted service's connection from the one it replaced.
    pub ticket: u64,
}

#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_ticket: u64,
    current: HashMap<ServiceKind, Registration>,
}

/// Proof of one registration, handed back to `unregister`.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    service: ServiceKind,
    ticket: u64,
}

impl Registry {
    /// Records `service` as connected; a newer registration replaces an older one.
    pub fn register(&self, service: ServiceKind, pid: u32) -> Ticket {
        let mut inner = self.lock();
        inner.next_ticket += 1;
        let ticket = inner.next_ticket;
        inner.current.insert(service, Registration { pid, ticket });
        Ticket { service, ticket }
    }

    /// Forgets a registration, unless a newer one replaced it. Returns whether it was current.
    pub fn unregister(&self, ticket: Ticket) -> bool {
        let mut inner = self.lock();
        match inner.current.get(&ticket.service) {
            Some(r) if r.ticket == ticket.ticket => {
                inner.current.remove(&ticket.service);
                true
            }
            _ => false,
        }
    }

    pub fn get(&self, service: ServiceKind) -> Option<Registration> {
        self.lock().current.get(&service).copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The map stays consistent even if a holder panicked: every update is one insert or remove.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_connection_does_not_unregister_its_replacement() {
        let registry = Registry::default();
        let old = registry.register(ServiceKind::Netwatch, 1);
        let new = registry.register(ServiceKind::Netwatch, 2);
        assert!(!registry.unregister(old));
        assert_eq!(registry.get(ServiceKind::Netwatch).unwrap().pid, 2);
        assert!(registry.unregister(new));
        assert!(registry.get(ServiceKind::Netwatch).is_none());
    }
}
