//! The roster: the members this device accepts sessions from and dials. `Roster` holds the rules
//! (names and keys unique, addresses most recent first, bounded), without I/O; `load` and `save`
//! keep it as `roster.json` in the state directory. Until pairing exists (a later issue) members
//! are added on the user's word with `cnspr manage add`.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cnsprcy::identity::{DeviceId, DeviceName, PublicKey};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const ROSTER_FILE: &str = "roster.json";
const FORMAT_VERSION: u32 = 1;
/// Addresses kept per member; the most recently confirmed come first.
pub const MAX_ADDRESSES: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: DeviceName,
    pub public_key: PublicKey,
    /// Where the member was last reached or said it listens, most recent first.
    #[serde(default)]
    pub addresses: Vec<SocketAddr>,
}

impl Member {
    pub fn id(&self) -> DeviceId {
        self.public_key.device_id()
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
        "the roster {path} has format version {found}; this cnsprcy reads version {FORMAT_VERSION}"
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

#[derive(Debug, Default)]
pub struct Roster {
    members: Vec<Member>,
}

/// Loads the members from `state_dir`; a missing file is an empty roster.
pub fn load(state_dir: &Path) -> Result<Vec<Member>, RosterError> {
    let path = state_dir.join(ROSTER_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            let file: RosterFile =
                serde_json::from_slice(&bytes).map_err(|error| RosterError::Damaged {
                    path: path.clone(),
                    error,
                })?;
            if file.version != FORMAT_VERSION {
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

/// Writes the roster next to the old one and renames it over, so a crash leaves either the old or
/// the new roster, never half of one.
pub fn save(state_dir: &Path, members: &[Member]) -> Result<(), RosterError> {
    let path = state_dir.join(ROSTER_FILE);
    let file = RosterFile {
        version: FORMAT_VERSION,
        members: members.to_vec(),
    };
    // Members hold only strings and addresses: serializing cannot fail.
    let text = serde_json::to_vec_pretty(&file).expect("roster serializes");
    cnsprcy::fsutil::write_private(&path, &text).map_err(|error| RosterError::Write { path, error })
}

impl Roster {
    pub fn new(members: Vec<Member>) -> Self {
        Self { members }
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    pub fn get(&self, key: &PublicKey) -> Option<&Member> {
        self.members.iter().find(|m| m.public_key == *key)
    }

    /// Finds a member by name, full ID or the unambiguous start of an ID.
    pub fn find(&self, name_or_id: &str) -> Result<&Member, RosterError> {
        if let Some(member) = self.members.iter().find(|m| m.name.as_str() == name_or_id) {
            return Ok(member);
        }
        let mut matches = self
            .members
            .iter()
            .filter(|m| id_matches(&m.id(), name_or_id));
        match (matches.next(), matches.next()) {
            (Some(member), None) => Ok(member),
            _ => Err(self.not_found(name_or_id)),
        }
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

    pub fn add(&mut self, member: Member, own_key: &PublicKey) -> Result<(), RosterError> {
        if member.public_key == *own_key {
            return Err(RosterError::OwnKey);
        }
        if let Some(existing) = self.get(&member.public_key) {
            return Err(RosterError::KeyTaken(existing.name.clone()));
        }
        if self.members.iter().any(|m| m.name == member.name) {
            return Err(RosterError::NameTaken(member.name));
        }
        self.members.push(member);
        Ok(())
    }

    pub fn remove(&mut self, name_or_id: &str) -> Result<Member, RosterError> {
        let key = self.find(name_or_id)?.public_key;
        let index = self
            .members
            .iter()
            .position(|m| m.public_key == key)
            .ok_or_else(|| self.not_found(name_or_id))?;
        Ok(self.members.remove(index))
    }

    /// Puts `announced` (addresses the member named itself) right after the member's first
    /// address, ahead of older ones, keeping at most `MAX_ADDRESSES`. Returns whether anything
    /// changed.
    pub fn learn_announced(&mut self, key: &PublicKey, announced: &[SocketAddr]) -> bool {
        let Some(member) = self.members.iter_mut().find(|m| m.public_key == *key) else {
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
        true
    }

    /// Puts `addr` first in the member's addresses. Returns whether anything changed.
    pub fn learn_address(&mut self, key: &PublicKey, addr: SocketAddr) -> bool {
        let Some(member) = self.members.iter_mut().find(|m| m.public_key == *key) else {
            return false;
        };
        if member.addresses.first() == Some(&addr) {
            return false;
        }
        member.addresses.retain(|a| *a != addr);
        member.addresses.insert(0, addr);
        member.addresses.truncate(MAX_ADDRESSES);
        true
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

    fn member(name: &str, seed: u8) -> Member {
        Member {
            name: DeviceName::new(name).unwrap(),
            public_key: Identity::from_secret([seed; 32]).public_key(),
            addresses: vec![],
        }
    }

    #[test]
    fn add_find_learn_remove_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let own = Identity::from_secret([1; 32]).public_key();
        let mut roster = Roster::new(load(dir.path()).unwrap());
        roster.add(member("laptop", 2), &own).unwrap();
        roster.add(member("phone", 3), &own).unwrap();
        assert!(matches!(
            roster.add(member("laptop", 4), &own),
            Err(RosterError::NameTaken(_))
        ));
        assert!(matches!(
            roster.add(member("other", 2), &own),
            Err(RosterError::KeyTaken(_))
        ));
        assert!(matches!(
            roster.add(member("me", 1), &own),
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
            roster.remove("phnoe"),
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
        save(dir.path(), roster.members()).unwrap();
        let mut reloaded = Roster::new(load(dir.path()).unwrap());
        assert_eq!(reloaded.find("phone").unwrap().addresses, vec![a, c, b]);
        reloaded.remove("laptop").unwrap();
        save(dir.path(), reloaded.members()).unwrap();
        assert_eq!(load(dir.path()).unwrap().len(), 1);
    }

    #[test]
    fn a_damaged_roster_is_an_error_not_an_empty_roster() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(ROSTER_FILE), b"{not json").unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
    }
}
