//! The store, as the core moves it: local writes pushed to every member, what peers send merged,
//! anti-entropy (root digests on heartbeats and in a periodic round, then the digest tree), and the `store-change`
//! event. `docs/store.md` describes the protocol.

use cnsprcy::api::WatchEvent;
use cnsprcy::identity::PublicKey;
use cnsprcy::wire::{
    ROUTED_OVERHEAD, RoutedBody, StoreBody, StoreEntry, StoreSummary, encoded_len,
};

use super::{Core, Now, StoreAccess, StoreCounter};
use crate::det::Map;
use crate::store::digest::{self, LEAVES_PER_BUCKET};
use crate::store::merge::Version;

/// The built-in event raised when a key changes.
pub const EVENT: &str = "store-change";
/// A batch from a peer that changes more keys than this raises one summary event instead of one
/// per key (a device catching up after a long absence would otherwise start thousands of runs).
pub const MAX_EVENTS_PER_BATCH: usize = 64;
/// The most value bytes one `Update` carries; more goes in further messages.
const UPDATE_BYTES: usize = 4 * 1024 * 1024;

impl<S: StoreAccess> Core<S> {
    /// A local write is durable: tell every member, `watch` and the handlers.
    pub(super) fn store_written(&mut self, entry: StoreEntry, _now: Now) {
        let members: Vec<PublicKey> = self.roster.members().iter().map(|m| m.public_key).collect();
        let body = StoreBody::Update(vec![entry.clone()]);
        for key in members {
            self.store_send(&key, body.clone(), StoreCounter::PushBytesSent);
        }
        self.store_changed(std::slice::from_ref(&entry), true);
        if self.store.take_skipped_for_a_write() {
            // A peer's write of a key that was being written here was skipped (concurrent
            // writes of one key): compare stores now rather than at the next round, 30 s away,
            // so that every device holds the winner at once.
            let keys: Vec<PublicKey> = self.sessions.keys().copied().collect();
            for key in keys {
                self.store_compare(&key);
            }
        }
    }

    /// Sends a store message to `to`, directly or through its relay; counts the bytes.
    fn store_send(&mut self, to: &PublicKey, body: StoreBody, counter: StoreCounter) -> bool {
        let body = RoutedBody::Store(body);
        let size = (ROUTED_OVERHEAD + encoded_len(&body)) as u64;
        let sent = self.route(to, body);
        if sent {
            self.store.count(counter, size);
        }
        sent
    }

    /// A session came up: the side with the smaller key offers its root digest (one walk
    /// repairs both sides, so one is enough).
    pub(super) fn store_session_up(&mut self, key: &PublicKey) {
        if self.own.as_bytes() < key.as_bytes() {
            self.store_offer_root(key);
        }
    }

    /// Starts anti-entropy cheaply: the root digest, 8 bytes, answered with a `Top` only if the
    /// stores differ.
    fn store_offer_root(&mut self, key: &PublicKey) {
        self.store.count(StoreCounter::SyncRounds, 1);
        let root = self.store.root();
        self.store_send(key, StoreBody::Root(root), StoreCounter::SyncBytesSent);
    }

    /// Starts anti-entropy with `key`, whose store is known to differ.
    pub(super) fn store_compare(&mut self, key: &PublicKey) {
        self.store.count(StoreCounter::SyncRounds, 1);
        self.store_send_top(key);
    }

    fn store_send_top(&mut self, key: &PublicKey) {
        let top = self.store.top();
        self.store_send(key, StoreBody::Top(top), StoreCounter::SyncBytesSent);
    }

    /// The periodic round, a backstop for what heartbeats (which carry the root digest to the
    /// successor) miss: the root digest to one peer at random, so that its cost does not grow
    /// with the mesh.
    pub(super) fn store_anti_entropy(&mut self) {
        let keys: Vec<PublicKey> = self.sessions.keys().copied().collect();
        if keys.is_empty() {
            return;
        }
        let pick = rand::Rng::random_range(&mut self.rng, 0..keys.len());
        self.store_offer_root(&keys[pick]);
        // The roster too: changes passed on to every session can still be lost with a
        // session that ended while sending them.
        let digest = self.roster.digest();
        self.send_to(&keys[pick], cnsprcy::wire::Message::RosterDigest(digest));
    }

    pub(super) fn on_store(&mut self, from: &PublicKey, body: StoreBody, now: Now) {
        let size = ROUTED_OVERHEAD + 1 + encoded_len(&body);
        self.store.count(StoreCounter::BytesReceived, size as u64);
        let sync = StoreCounter::SyncBytesSent;
        match body {
            StoreBody::Update(entries) => {
                let name = self.member_name(from);
                let changes = self.store.apply_remote(entries, &name, now.wall_ms);
                if !changes.is_empty() {
                    tracing::debug!(peer = %name, "{} store key(s) changed", changes.len());
                    self.store_changed(&changes, false);
                }
            }
            StoreBody::Root(theirs) => {
                if theirs != self.store.root() {
                    self.store_send_top(from);
                }
            }
            StoreBody::Top(theirs) => {
                let differing: Vec<u8> = digest::differing(&self.store.top(), &theirs)
                    .into_iter()
                    .map(|b| b as u8)
                    .collect();
                if !differing.is_empty() {
                    let buckets = self.store.buckets(&differing);
                    self.store_send(from, StoreBody::Buckets(buckets), sync);
                }
            }
            StoreBody::Buckets(theirs) => {
                let mut leaves = Vec::new();
                for (bucket, digests) in theirs {
                    let ours = self.store.leaf_digests(bucket);
                    for leaf in digest::differing(&ours, &digests) {
                        if leaf < LEAVES_PER_BUCKET {
                            leaves.push(u16::from(bucket) << 8 | leaf as u16);
                        }
                    }
                }
                leaves.sort_unstable();
                leaves.dedup();
                if !leaves.is_empty() {
                    let entries = self.store.summaries(&leaves);
                    self.store_send(from, StoreBody::Summaries { leaves, entries }, sync);
                }
            }
            StoreBody::Summaries { leaves, entries } => {
                let versions = |summaries: Vec<StoreSummary>| -> Map<String, Version> {
                    summaries
                        .into_iter()
                        .map(|s| {
                            let version = Version {
                                ts: s.ts,
                                writer: s.writer,
                            };
                            (s.key, version)
                        })
                        .collect()
                };
                let ours = versions(self.store.summaries(&leaves));
                let theirs = versions(entries);
                let give: Vec<String> = ours
                    .iter()
                    .filter(|(k, v)| theirs.get(*k).is_none_or(|t| t < *v))
                    .map(|(k, _)| k.clone())
                    .collect();
                let want: Vec<String> = theirs
                    .iter()
                    .filter(|(k, t)| ours.get(*k).is_none_or(|v| v < *t))
                    .map(|(k, _)| k.clone())
                    .collect();
                self.store_send_entries(from, &give);
                if !want.is_empty() {
                    self.store_send(from, StoreBody::Want(want), sync);
                }
            }
            StoreBody::Want(keys) => self.store_send_entries(from, &keys),
        }
    }

    /// Sends the entries for `keys` in `Update`s of at most `UPDATE_BYTES` of values each.
    fn store_send_entries(&mut self, to: &PublicKey, keys: &[String]) {
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut batch = Vec::new();
        let mut bytes = 0;
        for entry in self.store.entries(&keys) {
            let size = entry.key.len() + entry.value.as_ref().map_or(0, Vec::len);
            if !batch.is_empty() && bytes + size > UPDATE_BYTES {
                let full = std::mem::take(&mut batch);
                self.store_send(to, StoreBody::Update(full), StoreCounter::SyncBytesSent);
                bytes = 0;
            }
            bytes += size;
            batch.push(entry);
        }
        if !batch.is_empty() {
            self.store_send(to, StoreBody::Update(batch), StoreCounter::SyncBytesSent);
        }
    }

    /// Tells `watch` about changed keys, and runs the `store-change` handler.
    fn store_changed(&mut self, changes: &[StoreEntry], local: bool) {
        let names: Map<[u8; 32], String> = self
            .roster
            .members()
            .iter()
            .map(|m| (*m.public_key.as_bytes(), m.name.to_string()))
            .chain([(self.own_bytes(), self.name.to_string())])
            .collect();
        let writer_name = |entry: &StoreEntry| {
            names
                .get(&entry.writer)
                .cloned()
                .unwrap_or_else(|| PublicKey::from_bytes(entry.writer).device_id().to_string())
        };
        for entry in changes {
            self.watch(WatchEvent::Store {
                key: entry.key.clone(),
                deleted: entry.value.is_none(),
                writer: writer_name(entry),
            });
        }
        let origin = if local { "local" } else { "remote" };
        if changes.len() > MAX_EVENTS_PER_BATCH {
            let prefix = common_prefix(changes.iter().map(|e| e.key.as_str()));
            let env = vec![
                ("CNSPRCY_KEY".to_owned(), String::new()),
                (
                    "CNSPRCY_STORE_CHANGES".to_owned(),
                    changes.len().to_string(),
                ),
                ("CNSPRCY_STORE_PREFIX".to_owned(), prefix),
                ("CNSPRCY_STORE_ORIGIN".to_owned(), origin.to_owned()),
            ];
            self.raise_event(EVENT, env);
            return;
        }
        for entry in changes {
            let time = humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(entry.ts.ms),
            );
            let env = vec![
                ("CNSPRCY_KEY".to_owned(), entry.key.clone()),
                (
                    "CNSPRCY_STORE_OP".to_owned(),
                    if entry.value.is_some() { "set" } else { "del" }.to_owned(),
                ),
                ("CNSPRCY_WRITER".to_owned(), writer_name(entry)),
                (
                    "CNSPRCY_WRITER_ID".to_owned(),
                    PublicKey::from_bytes(entry.writer).device_id().to_string(),
                ),
                ("CNSPRCY_STORE_TIME".to_owned(), time.to_string()),
                ("CNSPRCY_STORE_ORIGIN".to_owned(), origin.to_owned()),
                ("CNSPRCY_STORE_CHANGES".to_owned(), "1".to_owned()),
            ];
            let mut run = self.event_run(EVENT, env);
            run.payload = entry.value.clone().unwrap_or_default();
            self.outputs.push(super::Output::RaiseEvent(Box::new(run)));
        }
    }
}

/// The longest prefix (at a character boundary) all keys share.
fn common_prefix<'a>(mut keys: impl Iterator<Item = &'a str>) -> String {
    let Some(first) = keys.next() else {
        return String::new();
    };
    let mut len = first.len();
    for key in keys {
        len = first
            .char_indices()
            .zip(key.chars())
            .find(|((_, a), b)| a != b)
            .map_or(len.min(key.len()), |((i, _), _)| i.min(len));
    }
    first[..len].to_owned()
}

#[cfg(test)]
mod tests {
    use super::common_prefix;

    #[test]
    fn common_prefix_of_keys() {
        assert_eq!(common_prefix(["a/b/c", "a/b/d", "a/bx"].into_iter()), "a/b");
        assert_eq!(common_prefix(["x"].into_iter()), "x");
        assert_eq!(common_prefix(["ab", "a"].into_iter()), "a");
        assert_eq!(common_prefix(["é1", "é2"].into_iter()), "é");
        assert_eq!(common_prefix(std::iter::empty()), "");
    }
}
