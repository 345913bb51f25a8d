//! The roster: every device of the mesh, this one included, with its state (active, disabled,
//! revoked). It is replicated: each entry carries a version and its author, and `merge` takes
//! in entries from other members by rules every device applies alike, so rosters that saw the
//! same entries are equal (`docs/protocol.md`, roster). `Roster` holds the rules without I/O;
//! `load` and `save` keep it as `roster.json` in the state directory.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use blake2::{Blake2s256, Digest};
use cnsprcy::identity::{DeviceId, DeviceName, PublicKey};
use cnsprcy::wire::{KeyBytes, MAX_ROSTER_ENTRIES, MemberState, RosterEntry};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const ROSTER_FILE: &str = "roster.json";
/// Version 1 held only active members (no state, version or author); it still loads.
const FORMAT_VERSION: u32 = 2;
/// Addresses kept per member; the most recently confirmed come first.
pub const MAX_ADDRESSES: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: DeviceName,
    pub public_key: PublicKey,
    /// Where the member was last reached or said it listens, most recent first.
    #[serde(default)]
    pub addresses: Vec<SocketAddr>,
    #[serde(default)]
    pub state: MemberState,
    /// When the entry last changed (Unix milliseconds, raised past every version seen).
    #[serde(default)]
    pub version: u64,
    /// Who changed it last; `None` in rosters written before replication (this device).
    #[serde(default)]
    pub author: Option<PublicKey>,
}

impl Member {
    /// An active member as the user names it; `Roster::add` gives it its version and author.
    pub fn new(name: DeviceName, public_key: PublicKey, addresses: Vec<SocketAddr>) -> Self {
        Self {
            name,
            public_key,
            addresses,
            state: MemberState::Active,
            version: 0,
            author: None,
        }
    }

    pub fn id(&self) -> DeviceId {
        self.public_key.device_id()
    }

    fn is_active(&self) -> bool {
        self.state == MemberState::Active
    }

    /// Which of two entries for one key wins: a revoked one, then the higher version, then the
    /// higher author key.
    fn rank(&self, own: &PublicKey) -> (bool, u64, KeyBytes) {
        (
            self.state == MemberState::Revoked,
            self.version,
            *self.author.as_ref().unwrap_or(own).as_bytes(),
        )
    }

    pub fn to_wire(&self, own: &PublicKey) -> RosterEntry {
        RosterEntry {
            key: *self.public_key.as_bytes(),
            name: self.name.to_string(),
            state: self.state,
            version: self.version,
            author: *self.author.as_ref().unwrap_or(own).as_bytes(),
            addresses: self.addresses.clone(),
        }
    }

    /// An entry from another member; `None` if it is malformed (a bad name).
    pub fn from_wire(entry: &RosterEntry) -> Option<Self> {
        Some(Self {
            name: DeviceName::new(&entry.name).ok()?,
            public_key: PublicKey::from_bytes(entry.key),
            addresses: entry
                .addresses
                .iter()
                .take(MAX_ADDRESSES)
                .copied()
                .collect(),
            state: entry.state,
            version: entry.version,
            author: Some(PublicKey::from_bytes(entry.author)),
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct RosterFile {
    version: u32,
    members: Vec<Member>,
}

#[derive(Debug, Error)]
pub enum RosterError {
    #[error("cannot read the roster {path}: {error}")]
    Read { path: PathBuf, error: io::Error },
    #[error(
        "the roster {path} is damaged ({error}); fix or move it away (members must then be added again)"
    )]
    Damaged {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error(
        "the roster {path} has format version {found}; this cnsprcy reads versions 1 to {FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("cannot save the roster {path}: {error}")]
    Write { path: PathBuf, error: io::Error },
    #[error("a member named {0} already exists; remove it first or choose another name")]
    NameTaken(DeviceName),
    #[error("that key already belongs to member {0}")]
    KeyTaken(DeviceName),
    #[error("that is this device's own key; a device is not a member of its own roster")]
    OwnKey,
    #[error(
        "{0} was revoked and can never be a member again; a device that is yours again needs a new key (`cnspr manage init --force` on it)"
    )]
    Revoked(DeviceName),
    #[error("the roster holds {MAX_ROSTER_ENTRIES} devices (removed ones included); no more fit")]
    Full,
    #[error("no member named or with ID {typed:?}; {}", match closest {
        Some(name) => format!("did you mean {name}?"),
        None => "`cnspr peers` lists the members".to_owned(),
    })]
    NotFound {
        typed: String,
        /// The member name nearest to `typed`, if one is a likely typo of it.
        closest: Option<String>,
    },
}

/// What `merge` changed.
#[derive(Debug, Default)]
pub struct Merged {
    /// The entries taken in (to pass on to other members).
    pub changed: Vec<Member>,
    /// This device's own entry arrived disabled or revoked: it is no longer a member.
    pub removed_by: Option<(MemberState, PublicKey)>,
}

#[derive(Debug)]
pub struct Roster {
    own: PublicKey,
    /// Every device's entry, by key: this device, members, disabled and revoked devices.
    entries: BTreeMap<KeyBytes, Member>,
    /// The active members other than this device, as most callers want them.
    members: Vec<Member>,
    /// `digest()` until the next change: asked for at every session start and store round.
    digest: std::cell::Cell<Option<u64>>,
}

/// Loads the entries from `state_dir`; a missing file is an empty roster.
pub fn load(state_dir: &Path) -> Result<Vec<Member>, RosterError> {
    let path = state_dir.join(ROSTER_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            let file: RosterFile =
                serde_json::from_slice(&bytes).map_err(|error| RosterError::Damaged {
                    path: path.clone(),
                    error,
                })?;
            if !(1..=FORMAT_VERSION).contains(&file.version) {
                return Err(RosterError::Version {
                    path,
                    found: file.version,
                });
            }
            Ok(file.members)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(error) => Err(RosterError::Read { path, error }),
    }
}

/// The active members among loaded entries, this device left out (for the CLI, which reads
/// the file without a daemon).
pub fn active(entries: Vec<Member>, own: Option<&PublicKey>) -> Vec<Member> {
    entries
        .into_iter()
        .filter(|m| m.is_active() && Some(&m.public_key) != own)
        .collect()
}

/// Writes the roster next to the old one and renames it over, so a crash leaves either the old or
/// the new roster, never half of one.
pub fn save(state_dir: &Path, members: &[Member]) -> Result<(), RosterError> {
    let path = state_dir.join(ROSTER_FILE);
    let file = RosterFile {
        version: FORMAT_VERSION,
        members: members.to_vec(),
    };
    // Members hold only strings, numbers and addresses: serializing cannot fail.
    let text = serde_json::to_vec_pretty(&file).expect("roster serializes");
    cnsprcy::fsutil::write_private(&path, &text).map_err(|error| RosterError::Write { path, error })
}

impl Roster {
    /// The roster of `entries` as loaded, with this device's own entry (named `name`) added or
    /// renamed.
    pub fn new(own: PublicKey, name: &DeviceName, entries: Vec<Member>, now_ms: u64) -> Self {
        let mut roster = Self {
            own,
            entries: BTreeMap::new(),
            members: Vec::new(),
            digest: std::cell::Cell::new(None),
        };
        for entry in entries {
            roster.entries.insert(*entry.public_key.as_bytes(), entry);
        }
        // A revoked entry stays as it is; a missing, renamed or inactive one is written anew.
        let current = roster
            .own_entry()
            .is_some_and(|e| e.state == MemberState::Revoked || (e.name == *name && e.is_active()));
        if !current {
            let version = roster.next_version(now_ms);
            let addresses = roster
                .own_entry()
                .map(|e| e.addresses.clone())
                .unwrap_or_default();
            roster.entries.insert(
                *own.as_bytes(),
                Member {
                    name: name.clone(),
                    public_key: own,
                    addresses,
                    state: MemberState::Active,
                    version,
                    author: Some(own),
                },
            );
        }
        roster.refresh();
        roster
    }

    fn own_entry(&self) -> Option<&Member> {
        self.entries.get(self.own.as_bytes())
    }

    /// The active members other than this device.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Every entry, this device's and removed devices' included.
    pub fn entries(&self) -> Vec<Member> {
        self.entries.values().cloned().collect()
    }

    /// Every entry as sent to other members.
    pub fn wire_entries(&self) -> Vec<RosterEntry> {
        self.entries
            .values()
            .map(|m| m.to_wire(&self.own))
            .collect()
    }

    /// The active member with `key`.
    pub fn get(&self, key: &PublicKey) -> Option<&Member> {
        self.members.iter().find(|m| m.public_key == *key)
    }

    /// The entry of `key` in any state.
    pub fn entry(&self, key: &PublicKey) -> Option<&Member> {
        self.entries.get(key.as_bytes())
    }

    /// Finds a member by name, full ID or the unambiguous start of an ID.
    pub fn find(&self, name_or_id: &str) -> Result<&Member, RosterError> {
        find_in(&self.members, name_or_id).ok_or_else(|| self.not_found(name_or_id))
    }

    /// Finds a device that is not revoked and not this one (a disabled one too).
    fn find_removable(&self, name_or_id: &str) -> Result<Member, RosterError> {
        let candidates: Vec<Member> = self
            .entries
            .values()
            .filter(|m| m.state != MemberState::Revoked && m.public_key != self.own)
            .cloned()
            .collect();
        find_in(&candidates, name_or_id)
            .cloned()
            .ok_or_else(|| self.not_found(name_or_id))
    }

    /// "No such member", with the member name `typed` is most likely a typo of.
    fn not_found(&self, typed: &str) -> RosterError {
        let names = self.members.iter().map(|m| m.name.as_str());
        // About one edit in three characters, at least one: `dsek` finds `desk`, `tv` no `pc`.
        let closest = cnsprcy::suggest::closest(typed, names, |name| (name.len() / 3).max(1))
            .map(str::to_owned);
        RosterError::NotFound {
            typed: typed.to_owned(),
            closest,
        }
    }

    /// A version newer than every one in the roster and not behind the wall clock.
    fn next_version(&self, now_ms: u64) -> u64 {
        let newest = self.entries.values().map(|m| m.version).max().unwrap_or(0);
        now_ms.max(newest + 1)
    }

    /// After every change to the entries.
    fn refresh(&mut self) {
        self.digest.set(None);
        self.members = self
            .entries
            .values()
            .filter(|m| m.is_active() && m.public_key != self.own)
            .cloned()
            .collect();
        // As people look for them: by name.
        self.members.sort_by(|a, b| {
            (&a.name, a.public_key.as_bytes()).cmp(&(&b.name, b.public_key.as_bytes()))
        });
    }

    /// Makes `member` active (new, or disabled before). Returns the entry as stored.
    pub fn add(&mut self, member: Member, now_ms: u64) -> Result<Member, RosterError> {
        if member.public_key == self.own {
            return Err(RosterError::OwnKey);
        }
        if let Some(existing) = self.entry(&member.public_key) {
            match existing.state {
                // The same member again, with addresses: where to reach it (nothing replicated).
                MemberState::Active if existing.name == member.name => {
                    for addr in member.addresses.iter().rev() {
                        self.learn_address(&member.public_key, *addr);
                    }
                    let key = member.public_key;
                    return self
                        .entry(&key)
                        .cloned()
                        .ok_or(RosterError::KeyTaken(member.name));
                }
                MemberState::Active => return Err(RosterError::KeyTaken(existing.name.clone())),
                MemberState::Revoked => return Err(RosterError::Revoked(existing.name.clone())),
                MemberState::Disabled => {}
            }
        } else if self.entries.len() >= MAX_ROSTER_ENTRIES {
            return Err(RosterError::Full);
        }
        if let Some(taken) = self.members.iter().find(|m| m.name == member.name) {
            return Err(RosterError::NameTaken(taken.name.clone()));
        }
        let entry = Member {
            state: MemberState::Active,
            version: self.next_version(now_ms),
            author: Some(self.own),
            ..member
        };
        self.entries
            .insert(*entry.public_key.as_bytes(), entry.clone());
        self.refresh();
        Ok(entry)
    }

    /// Disables or revokes a device. Revoking also takes over every entry the device wrote
    /// last, so that they outlive it: from now on, entries whose author is revoked are void.
    /// Returns the changed entries, the removed device's first.
    pub fn remove(
        &mut self,
        name_or_id: &str,
        state: MemberState,
        now_ms: u64,
    ) -> Result<Vec<Member>, RosterError> {
        let target = self.find_removable(name_or_id)?;
        let version = self.next_version(now_ms);
        let removed = Member {
            state,
            version,
            author: Some(self.own),
            ..target.clone()
        };
        let mut changed = vec![removed.clone()];
        self.entries.insert(*removed.public_key.as_bytes(), removed);
        if state == MemberState::Revoked {
            for entry in self.entries.values_mut() {
                let by_target =
                    entry.author == Some(target.public_key) && entry.state != MemberState::Revoked;
                if by_target {
                    entry.author = Some(self.own);
                    entry.version = version;
                    changed.push(entry.clone());
                }
            }
        }
        self.refresh();
        Ok(changed)
    }

    /// This device leaves: its own entry becomes disabled, written by itself. Returns it.
    pub fn leave(&mut self, now_ms: u64) -> Option<Member> {
        let version = self.next_version(now_ms);
        let own = self.entries.get_mut(self.own.as_bytes())?;
        own.state = MemberState::Disabled;
        own.version = version;
        own.author = Some(self.own);
        let own = own.clone();
        self.refresh();
        Some(own)
    }

    /// After this device was removed: it forgets every other device, and keeps an active entry
    /// of its own (newer than the one that removed it, unless that was a revocation) so that
    /// it can be invited again.
    pub fn forget_mesh(&mut self, now_ms: u64) {
        let version = self.next_version(now_ms);
        let own = self.own;
        self.entries.retain(|key, _| key == own.as_bytes());
        if let Some(entry) = self.entries.get_mut(own.as_bytes())
            && entry.state != MemberState::Revoked
        {
            entry.state = MemberState::Active;
            entry.version = version;
            entry.author = Some(own);
        }
        self.refresh();
    }

    /// Takes in entries from another member. Revocations first, since they void what the
    /// revoked device wrote; then the entries that win over this device's.
    pub fn merge(&mut self, incoming: &[RosterEntry]) -> Merged {
        let mut merged = Merged::default();
        let mut incoming: Vec<Member> = incoming.iter().filter_map(Member::from_wire).collect();
        // Revocations first (stable: otherwise in the order sent).
        incoming.sort_by_key(|m| m.state != MemberState::Revoked);
        for entry in incoming {
            let key = *entry.public_key.as_bytes();
            let author_revoked = entry.author.is_some_and(|a| self.is_revoked(&a));
            if author_revoked && entry.state != MemberState::Revoked {
                continue;
            }
            let wins = match self.entries.get_mut(&key) {
                Some(local) => {
                    let wins = entry.rank(&self.own) > local.rank(&self.own);
                    if !wins && local.addresses.is_empty() && key != *self.own.as_bytes() {
                        // Where to reach it is worth knowing even from an older entry (a
                        // joining device's own entry names where it listens).
                        local.addresses = entry.addresses.clone();
                    }
                    wins
                }
                None => self.entries.len() < MAX_ROSTER_ENTRIES,
            };
            if !wins {
                continue;
            }
            let mut entry = entry;
            if let Some(local) = self.entries.get(&key) {
                // Addresses are what this device learnt; the other side's fill in only gaps.
                if !local.addresses.is_empty() {
                    entry.addresses = local.addresses.clone();
                }
            }
            if entry.public_key == self.own && entry.state != MemberState::Active {
                merged.removed_by = entry.author.map(|a| (entry.state, a));
            }
            let revoked = entry.state == MemberState::Revoked;
            self.entries.insert(key, entry.clone());
            merged.changed.push(entry);
            if revoked {
                self.void_entries_by(&PublicKey::from_bytes(key));
            }
        }
        self.refresh();
        merged
    }

    fn is_revoked(&self, key: &PublicKey) -> bool {
        self.entry(key)
            .is_some_and(|e| e.state == MemberState::Revoked)
    }

    /// Drops the entries a revoked device wrote last (other than revocations): they came after
    /// the revocation that took over its earlier ones, or never reached the revoking device.
    ///
    /// This device's own entry too: one the revoked device wrote (disabling this device, say)
    /// is void like any other, and the entry the revoking device took over replaces it.
    fn void_entries_by(&mut self, revoked: &PublicKey) {
        self.entries.retain(|_, entry| {
            entry.state == MemberState::Revoked || entry.author != Some(*revoked)
        });
    }

    /// A digest of every entry's key, name, state, version and author (not addresses): equal
    /// digests mean equal rosters.
    pub fn digest(&self) -> u64 {
        if let Some(digest) = self.digest.get() {
            return digest;
        }
        let digest = digest_of(&self.wire_entries());
        self.digest.set(Some(digest));
        digest
    }

    /// The inviter of a join under way, until its own entry arrives: an active entry of
    /// version 0, which any entry from the mesh replaces.
    pub fn add_inviter(
        &mut self,
        key: PublicKey,
        addresses: Vec<SocketAddr>,
    ) -> Result<(), RosterError> {
        if key == self.own {
            return Err(RosterError::OwnKey);
        }
        if let Some(existing) = self.entry(&key) {
            match existing.state {
                MemberState::Active => return Err(RosterError::KeyTaken(existing.name.clone())),
                MemberState::Revoked => return Err(RosterError::Revoked(existing.name.clone())),
                MemberState::Disabled => {}
            }
        }
        let id = key.device_id().to_string();
        // "inviter-" and four characters of a device ID (lower-case letters and digits) make a
        // valid name, whatever the key.
        let name = DeviceName::new(&format!("inviter-{}", id.get(..4).unwrap_or(&id)))
            .expect("a valid device name");
        self.entries.insert(
            *key.as_bytes(),
            Member {
                name,
                public_key: key,
                addresses: addresses.into_iter().take(MAX_ADDRESSES).collect(),
                state: MemberState::Active,
                version: 0,
                author: Some(self.own),
            },
        );
        self.refresh();
        Ok(())
    }

    /// Drops the inviter of a failed join, if its entry is still the placeholder.
    pub fn forget_placeholder(&mut self, key: &PublicKey) {
        if self.entry(key).is_some_and(|e| e.version == 0) {
            self.entries.remove(key.as_bytes());
            self.refresh();
        }
    }

    /// Puts `announced` (addresses the member named itself) right after the member's first
    /// address, ahead of older ones, keeping at most `MAX_ADDRESSES`. Returns whether anything
    /// changed.
    pub fn learn_announced(&mut self, key: &PublicKey, announced: &[SocketAddr]) -> bool {
        let Some(member) = self.entries.get_mut(key.as_bytes()) else {
            return false;
        };
        let mut addresses: Vec<SocketAddr> =
            member.addresses.first().copied().into_iter().collect();
        for addr in announced.iter().chain(member.addresses.iter().skip(1)) {
            if !addresses.contains(addr) {
                addresses.push(*addr);
            }
        }
        addresses.truncate(MAX_ADDRESSES);
        if addresses == member.addresses {
            return false;
        }
        member.addresses = addresses;
        self.refresh();
        true
    }

    /// Puts `addr` first in the member's addresses. Returns whether anything changed.
    pub fn learn_address(&mut self, key: &PublicKey, addr: SocketAddr) -> bool {
        let Some(member) = self.entries.get_mut(key.as_bytes()) else {
            return false;
        };
        if member.addresses.first() == Some(&addr) {
            return false;
        }
        member.addresses.retain(|a| *a != addr);
        member.addresses.insert(0, addr);
        member.addresses.truncate(MAX_ADDRESSES);
        self.refresh();
        true
    }
}

/// The digest of a roster's entries (in any order), as `Roster::digest` computes it.
pub fn digest_of(entries: &[RosterEntry]) -> u64 {
    let mut sorted: Vec<&RosterEntry> = entries.iter().collect();
    sorted.sort_by_key(|e| e.key);
    let mut hasher = Blake2s256::new();
    for entry in sorted {
        hasher.update(entry.key);
        hasher.update((entry.name.len() as u64).to_le_bytes());
        hasher.update(entry.name.as_bytes());
        hasher.update([entry.state as u8]);
        hasher.update(entry.version.to_le_bytes());
        hasher.update(entry.author);
    }
    let hash = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_le_bytes(first)
}

fn find_in<'a>(members: &'a [Member], name_or_id: &str) -> Option<&'a Member> {
    if let Some(member) = members.iter().find(|m| m.name.as_str() == name_or_id) {
        return Some(member);
    }
    let mut matches = members.iter().filter(|m| id_matches(&m.id(), name_or_id));
    match (matches.next(), matches.next()) {
        (Some(member), None) => Some(member),
        _ => None,
    }
}

/// Whether `typed` is `id` or the start of it, as people type IDs: any case, with or without
/// dashes, Crockford's look-alikes (o for 0, i and l for 1).
pub fn id_matches(id: &DeviceId, typed: &str) -> bool {
    let wanted: String = typed
        .chars()
        .filter(|c| *c != '-')
        .map(|c| match c.to_ascii_lowercase() {
            'o' => '0',
            'i' | 'l' => '1',
            other => other,
        })
        .collect();
    !wanted.is_empty() && id.to_string().replace('-', "").starts_with(&wanted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnsprcy::identity::Identity;

    fn key(seed: u8) -> PublicKey {
        Identity::from_secret([seed; 32]).public_key()
    }

    fn member(name: &str, seed: u8) -> Member {
        Member::new(DeviceName::new(name).unwrap(), key(seed), vec![])
    }

    fn roster(seed: u8, name: &str) -> Roster {
        Roster::new(key(seed), &DeviceName::new(name).unwrap(), Vec::new(), 1000)
    }

    /// Sends everything `from` holds to `to`, as a session's first exchange does.
    fn sync(from: &Roster, to: &mut Roster) -> Merged {
        to.merge(&from.wire_entries())
    }

    fn names(roster: &Roster) -> Vec<String> {
        roster
            .members()
            .iter()
            .map(|m| m.name.to_string())
            .collect()
    }

    #[test]
    fn add_find_learn_remove_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let own = key(1);
        let me = DeviceName::new("me").unwrap();
        let mut roster = Roster::new(own, &me, load(dir.path()).unwrap(), 1000);
        roster.add(member("laptop", 2), 1000).unwrap();
        roster.add(member("phone", 3), 1000).unwrap();
        assert!(matches!(
            roster.add(member("laptop", 4), 1000),
            Err(RosterError::NameTaken(_))
        ));
        assert!(matches!(
            roster.add(member("other", 2), 1000),
            Err(RosterError::KeyTaken(_))
        ));
        // The same member again: its addresses are learnt, nothing else changes.
        let digest = roster.digest();
        let mut again = member("laptop", 2);
        again.addresses = vec!["10.0.0.9:7332".parse().unwrap()];
        roster.add(again, 5000).unwrap();
        assert_eq!(roster.digest(), digest);
        assert_eq!(
            roster.find("laptop").unwrap().addresses,
            ["10.0.0.9:7332".parse().unwrap()]
        );
        assert!(matches!(
            roster.add(member("me", 1), 1000),
            Err(RosterError::OwnKey)
        ));

        let phone = roster.find("phone").unwrap().clone();
        let id = phone.id().to_string();
        assert_eq!(roster.find(&id).unwrap().name, phone.name);
        assert_eq!(roster.find(&id[..4]).unwrap().name, phone.name);
        assert!(roster.find("nobody").is_err());
        assert_eq!(
            roster.find("nobody").unwrap_err().to_string(),
            "no member named or with ID \"nobody\"; `cnspr peers` lists the members"
        );
        // A likely typo of a name gets that name as a hint, a far one does not.
        for typo in ["lpatop", "laptp", "Laptop", "laptops"] {
            assert_eq!(
                roster.find(typo).unwrap_err().to_string(),
                format!("no member named or with ID {typo:?}; did you mean laptop?")
            );
        }
        assert!(matches!(
            roster.find("phn"),
            Err(RosterError::NotFound { closest: None, .. })
        ));
        assert!(matches!(
            roster.remove("phnoe", MemberState::Disabled, 1000),
            Err(RosterError::NotFound { closest: Some(name), .. }) if name == "phone"
        ));

        let a: SocketAddr = "10.0.0.1:7332".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:7332".parse().unwrap();
        assert!(roster.learn_address(&phone.public_key, a));
        assert!(roster.learn_address(&phone.public_key, b));
        assert!(!roster.learn_address(&phone.public_key, b));
        assert!(roster.learn_address(&phone.public_key, a));

        // Announced addresses go right after the first, ahead of older ones.
        let c: SocketAddr = "10.0.1.2:7332".parse().unwrap();
        assert!(roster.learn_announced(&phone.public_key, &[c, a]));
        assert!(!roster.learn_announced(&phone.public_key, &[c]));
        save(dir.path(), &roster.entries()).unwrap();
        let mut reloaded = Roster::new(own, &me, load(dir.path()).unwrap(), 2000);
        assert_eq!(reloaded.find("phone").unwrap().addresses, vec![a, c, b]);
        assert_eq!(
            reloaded.digest(),
            roster.digest(),
            "nothing changed on reload"
        );
        reloaded
            .remove("laptop", MemberState::Disabled, 2000)
            .unwrap();
        save(dir.path(), &reloaded.entries()).unwrap();
        let entries = load(dir.path()).unwrap();
        assert_eq!(active(entries.clone(), Some(&own)).len(), 1);
        // The disabled one is kept (and this device's own entry).
        assert_eq!(entries.len(), 3);
        // A disabled device may come back.
        reloaded.add(member("laptop", 2), 3000).unwrap();
        assert_eq!(names(&reloaded), ["laptop", "phone"]);
    }

    #[test]
    fn a_roster_of_format_version_1_loads_as_active_members() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            r#"{{"version":1,"members":[{{"name":"desk","public_key":"{}","addresses":["10.0.0.2:7332"]}}]}}"#,
            key(2)
        );
        fs::write(dir.path().join(ROSTER_FILE), text).unwrap();
        let entries = load(dir.path()).unwrap();
        let roster = Roster::new(key(1), &DeviceName::new("me").unwrap(), entries, 5000);
        assert_eq!(names(&roster), ["desk"]);
        assert_eq!(roster.entries().len(), 2, "its own entry is added");
    }

    #[test]
    fn a_damaged_roster_is_an_error_not_an_empty_roster() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(ROSTER_FILE), b"{not json").unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
    }

    #[test]
    fn rosters_that_saw_the_same_entries_are_equal() {
        let mut a = roster(1, "a");
        let mut b = roster(2, "b");
        a.add(member("b", 2), 2000).unwrap();
        b.add(member("a", 1), 2000).unwrap();
        // Concurrent changes on both sides: a adds c, b adds d.
        a.add(member("c", 3), 3000).unwrap();
        b.add(member("d", 4), 3000).unwrap();
        assert_ne!(a.digest(), b.digest());
        sync(&a, &mut b);
        sync(&b, &mut a);
        assert_eq!(a.digest(), b.digest());
        assert_eq!(names(&a), ["b", "c", "d"]);
        assert_eq!(names(&b), ["a", "c", "d"]);
        // Merging again changes nothing.
        assert!(sync(&a, &mut b).changed.is_empty());
    }

    #[test]
    fn the_newer_change_wins_and_a_revocation_wins_over_anything() {
        let mut a = roster(1, "a");
        let mut b = roster(2, "b");
        a.add(member("b", 2), 2000).unwrap();
        a.add(member("c", 3), 2000).unwrap();
        sync(&a, &mut b);
        // a disables c; b, not knowing, revokes it earlier; then a re-adds it later.
        a.remove("c", MemberState::Disabled, 3000).unwrap();
        b.remove("c", MemberState::Revoked, 2500).unwrap();
        sync(&b, &mut a);
        assert!(a.get(&key(3)).is_none());
        assert!(matches!(
            a.add(member("c", 3), 9000),
            Err(RosterError::Revoked(_))
        ));
        sync(&a, &mut b);
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.entry(&key(3)).unwrap().state, MemberState::Revoked);
    }

    #[test]
    fn a_revoked_device_cannot_bring_in_a_new_key() {
        // a, b, s (a stolen device) are members.
        let mut a = roster(1, "a");
        let mut b = roster(2, "b");
        let mut s = roster(9, "s");
        a.add(member("b", 2), 2000).unwrap();
        a.add(member("s", 9), 2000).unwrap();
        // s added d long ago, before it was stolen; a knows.
        sync(&a, &mut s);
        s.add(member("d", 4), 2100).unwrap();
        sync(&s, &mut a);
        sync(&a, &mut b);
        // Stolen: s adds the thief's key x, which reaches b before the revocation does.
        s.add(member("x", 7), 3000).unwrap();
        sync(&s, &mut b);
        assert!(b.get(&key(7)).is_some());
        // a revokes s: what s wrote that a knew (d) is a's now and stays.
        let changed = a.remove("s", MemberState::Revoked, 4000).unwrap();
        assert_eq!(
            changed.len(),
            2,
            "s itself, and d which s had added: {changed:?}"
        );
        let merged = sync(&a, &mut b);
        assert!(!merged.changed.is_empty());
        assert!(b.get(&key(7)).is_none(), "x, written by s, is void");
        assert!(b.get(&key(4)).is_some(), "d was taken over by a");
        // x comes back from s, or from anyone who still has it: void everywhere.
        sync(&s, &mut b);
        sync(&s, &mut a);
        assert!(a.get(&key(7)).is_none() && b.get(&key(7)).is_none());
        sync(&b, &mut a);
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn a_device_learns_that_it_was_removed_and_forgets_the_mesh() {
        let mut a = roster(1, "a");
        let mut b = roster(2, "b");
        a.add(member("b", 2), 2000).unwrap();
        a.add(member("c", 3), 2000).unwrap();
        sync(&a, &mut b);
        assert_eq!(names(&b), ["a", "c"]);
        a.remove("b", MemberState::Disabled, 3000).unwrap();
        let merged = sync(&a, &mut b);
        assert_eq!(merged.removed_by, Some((MemberState::Disabled, key(1))));
        b.forget_mesh(3001);
        assert!(b.members().is_empty());
        // It can be invited again: a's add is newer than its disable.
        a.add(member("b", 2), 4000).unwrap();
        sync(&a, &mut b);
        assert_eq!(names(&b), ["a", "c"]);
        assert_eq!(b.entry(&key(2)).unwrap().state, MemberState::Active);
    }

    #[test]
    fn a_joining_device_takes_in_the_mesh_through_its_inviter() {
        let mut a = roster(1, "a");
        a.add(member("c", 3), 2000).unwrap();
        let mut j = roster(4, "j");
        j.add_inviter(key(1), vec!["10.0.0.1:7332".parse().unwrap()])
            .unwrap();
        assert_eq!(j.entry(&key(1)).unwrap().version, 0);
        // a adds j when it joins (without an address), then both exchange rosters; j's own
        // entry, older than a's, still tells a where j listens.
        a.add(member("j", 4), 3000).unwrap();
        let listens: SocketAddr = "10.0.0.4:7332".parse().unwrap();
        let mut from_j = j.wire_entries();
        for entry in from_j.iter_mut().filter(|e| e.key == *key(4).as_bytes()) {
            entry.addresses = vec![listens];
        }
        a.merge(&from_j);
        assert_eq!(a.find("j").unwrap().addresses, [listens]);
        sync(&a, &mut j);
        assert_eq!(names(&j), ["a", "c"]);
        assert_eq!(
            j.find("a").unwrap().addresses,
            ["10.0.0.1:7332".parse().unwrap()]
        );
        assert_eq!(a.digest(), j.digest());
        // A failed join leaves nothing behind.
        let mut k = roster(5, "k");
        k.add_inviter(key(1), vec![]).unwrap();
        k.forget_placeholder(&key(1));
        assert!(k.members().is_empty());
    }

    /// What one device does in the property test below.
    #[derive(Debug, Clone)]
    enum Op {
        /// Device `by` adds device `seed` under `name`.
        Add {
            by: usize,
            seed: u8,
            name: u8,
        },
        Disable {
            by: usize,
            seed: u8,
        },
        Revoke {
            by: usize,
            seed: u8,
        },
        Leave {
            by: usize,
        },
        /// Device `from` sends its whole roster to device `to`.
        Sync {
            from: usize,
            to: usize,
        },
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        // Devices 0..4 run (keys 1..=4); keys 5 and 6 are devices that are only ever added.
        prop_oneof![
            (0..4usize, 1..7u8, 0..3u8).prop_map(|(by, seed, name)| Op::Add { by, seed, name }),
            (0..4usize, 1..7u8).prop_map(|(by, seed)| Op::Disable { by, seed }),
            (0..4usize, 1..7u8).prop_map(|(by, seed)| Op::Revoke { by, seed }),
            (0..4usize).prop_map(|by| Op::Leave { by }),
            (0..4usize, 0..4usize).prop_map(|(from, to)| Op::Sync { from, to }),
            (0..4usize, 0..4usize).prop_map(|(from, to)| Op::Sync { from, to }),
        ]
    }

    proptest::proptest! {
        /// Whatever devices do to the roster, in whatever order and with whatever partial
        /// exchanges (a stolen device going on after its revocation included), rosters that
        /// exchange everything end up equal, and nobody keeps an active entry written by a
        /// device it knows as revoked.
        #[test]
        fn rosters_converge_whatever_happens(ops in proptest::collection::vec(op(), 0..40)) {
            let mut rosters: Vec<Roster> = (0..4u8)
                .map(|i| roster(i + 1, &format!("r{}", i + 1)))
                .collect();
            for other in 2..=4u8 {
                rosters[0].add(member(&format!("r{other}"), other), 1000).unwrap();
            }
            for to in 1..4 {
                let entries = rosters[0].wire_entries();
                rosters[to].merge(&entries);
            }
            let name_of = |roster: &Roster, seed: u8| {
                roster.entry(&key(seed)).map(|e| e.name.to_string())
            };
            for (step, op) in ops.into_iter().enumerate() {
                let now = 2000 + step as u64 * 10;
                match op {
                    Op::Add { by, seed, name } => {
                        let name = DeviceName::new(&format!("n{seed}-{name}")).unwrap();
                        let _ = rosters[by].add(Member::new(name, key(seed), vec![]), now);
                    }
                    Op::Disable { by, seed } | Op::Revoke { by, seed } => {
                        let state = if matches!(op, Op::Revoke { .. }) {
                            MemberState::Revoked
                        } else {
                            MemberState::Disabled
                        };
                        if let Some(name) = name_of(&rosters[by], seed) {
                            let _ = rosters[by].remove(&name, state, now);
                        }
                    }
                    Op::Leave { by } => {
                        rosters[by].leave(now);
                    }
                    Op::Sync { from, to } => {
                        let entries = rosters[from].wire_entries();
                        rosters[to].merge(&entries);
                    }
                }
            }
            for _ in 0..3 {
                for from in 0..4 {
                    for to in 0..4 {
                        let entries = rosters[from].wire_entries();
                        rosters[to].merge(&entries);
                    }
                }
            }
            // A revoked device is out of the mesh: nobody exchanges with it any more, and what
            // it holds does not matter.
            let revoked = |seed: u8| rosters.iter().any(|r| r.is_revoked(&key(seed)));
            let kept: Vec<usize> = (0..4).filter(|i| !revoked(*i as u8 + 1)).collect();
            for (i, roster) in rosters.iter().enumerate() {
                if let Some(first) = kept.first() && kept.contains(&i) {
                    let digest = rosters[*first].digest();
                    proptest::prop_assert_eq!(roster.digest(), digest, "roster {} differs", i);
                }
                if !kept.contains(&i) {
                    continue;
                }
                for entry in roster.entries() {
                    let author_revoked = entry.author.is_some_and(|a| roster.is_revoked(&a));
                    proptest::prop_assert!(
                        !(author_revoked && entry.state != MemberState::Revoked),
                        "{:?} written by a revoked device", entry
                    );
                }
            }
        }
    }

    #[test]
    fn malformed_entries_are_skipped() {
        let mut a = roster(1, "a");
        let mut bad = member("x", 3).to_wire(&key(2));
        bad.name = "no spaces allowed here!".into();
        assert!(a.merge(&[bad]).changed.is_empty());
        assert!(a.members().is_empty());
    }
}
