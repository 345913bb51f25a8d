//! A device's identity: its X25519 static key pair, the ID derived from the public key, and its name.
//!
//! The key file `identity.key` in the state directory holds exactly the 32 bytes of the secret key,
//! mode 0600. A file that is the wrong size or readable by others is an error, never replaced: a
//! new key would make this device a stranger to every member that knows it.

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use blake2::{Blake2s256, Digest};
use curve25519_dalek::montgomery::MontgomeryPoint;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::fsutil::write_private;
use crate::paths::{PathError, check_private_dir, ensure_private_dir};

/// File names in the state directory.
pub const KEY_FILE: &str = "identity.key";
pub const NAME_FILE: &str = "name";

const KEY_LEN: usize = 32;
/// Bytes of the hash that make up a device ID: 80 bits, 16 base32 characters.
const ID_BYTES: usize = 10;
/// Domain separation, so the ID is never the same hash as anything else computed over the key.
const ID_CONTEXT: &[u8] = b"cnsprcy device id v1";
/// Crockford's base32 alphabet in lower case: no i, l, o or u, so IDs are easy to read aloud.
const ID_ALPHABET: &str = "0123456789abcdefghjkmnpqrstvwxyz";
pub const NAME_MAX_LEN: usize = 63;

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error(
        "no identity yet: {path} does not exist; run `cnspr manage init` (or start the daemon, which creates one)"
    )]
    Missing { path: PathBuf },
    #[error(
        "an identity already exists at {path} (device ID {id}); replacing it makes this device a stranger to its members. Use --force if that is what you want"
    )]
    Exists { path: PathBuf, id: DeviceId },
    #[error(
        "identity key {path} has mode {mode:04o}, so other users could read it; fix it with `chmod 600 {path}` (and consider the key compromised if others have read it)"
    )]
    KeyTooOpen { path: PathBuf, mode: u32 },
    #[error(
        "identity key {path} is {len} bytes long, but a key is exactly 32 bytes; the file is damaged or not a cnsprcy key. Restore it from a backup, or move it away and run `cnspr manage init`"
    )]
    KeyWrongLength { path: PathBuf, len: u64 },
    #[error("identity key {path} belongs to uid {owner}, not to you (uid {uid})")]
    KeyWrongOwner { path: PathBuf, owner: u32, uid: u32 },
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: io::Error },
    #[error("cannot write {path}: {error}")]
    Write { path: PathBuf, error: io::Error },
    #[error("{path}: {error}")]
    BadName { path: PathBuf, error: NameError },
    #[error(transparent)]
    Dir(#[from] PathError),
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    #[error("a device name cannot be empty")]
    Empty,
    #[error("a device name has at most {NAME_MAX_LEN} characters, but {0:?} has {1}")]
    TooLong(String, usize),
    #[error(
        "a device name may hold only ASCII letters, digits, '-', '_' and '.', and must start with a letter or digit; {0:?} does not"
    )]
    BadCharacter(String),
}

/// A device's human name: short and safe in a terminal table, a file name or an environment
/// variable.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceName(String);

impl DeviceName {
    pub fn new(name: &str) -> Result<Self, NameError> {
        let len = name.chars().count();
        if len == 0 {
            return Err(NameError::Empty);
        }
        if len > NAME_MAX_LEN {
            return Err(NameError::TooLong(name.to_owned(), len));
        }
        let mut chars = name.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
        if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
            return Err(NameError::BadCharacter(name.to_owned()));
        }
        Ok(Self(name.to_owned()))
    }

    /// A valid name made from any text (a hostname, say) by replacing what is not allowed.
    pub fn sanitized(raw: &str) -> Self {
        let mut name: String = raw
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '-'
                }
            })
            .skip_while(|c| !c.is_ascii_alphanumeric())
            .take(NAME_MAX_LEN)
            .collect();
        if name.is_empty() {
            name = "device".to_owned();
        }
        // Only allowed characters remain and the first is alphanumeric: `new` cannot fail.
        Self::new(&name).unwrap_or_else(|_| Self("device".to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DeviceName {
    type Error = NameError;
    fn try_from(value: String) -> Result<Self, NameError> {
        Self::new(&value)
    }
}

impl From<DeviceName> for String {
    fn from(name: DeviceName) -> String {
        name.0
    }
}

impl FromStr for DeviceName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::new(s)
    }
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A device's X25519 public key; written as standard base64 (44 characters), like WireGuard keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; KEY_LEN]);

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0:?} is not a public key: expected 44 characters of base64 encoding 32 bytes")]
pub struct BadPublicKey(String);

impl PublicKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The device ID: the first 80 bits of BLAKE2s("cnsprcy device id v1" || key), in lower-case
    /// Crockford base32, in four groups of four (`k3j9-x81q-p0mm-7c2d`).
    pub fn device_id(&self) -> DeviceId {
        let mut hash = Blake2s256::new();
        hash.update(ID_CONTEXT);
        hash.update(self.0);
        let digest = hash.finalize();
        let encoded = id_encoding().encode(&digest[..ID_BYTES]);
        DeviceId(encoded)
    }
}

/// Discovery names change every hour (`DISCOVERY_EPOCH_SECS`).
pub const DISCOVERY_EPOCH_SECS: u64 = 3600;

impl PublicKey {
    /// The name this device advertises on the local network during `epoch`: a hash of its
    /// public key and the epoch. Members, who know the key, recognise it; a stranger sees an
    /// unrelated name every hour and cannot follow the device from network to network.
    pub fn discovery_name(&self, epoch: u64) -> String {
        let mut hash = Blake2s256::new();
        hash.update(b"cnsprcy discovery v1");
        hash.update(self.0);
        hash.update(epoch.to_le_bytes());
        id_encoding().encode(&hash.finalize()[..ID_BYTES])
    }
}

/// The current discovery epoch.
pub fn discovery_epoch() -> u64 {
    discovery_epoch_at(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
}

/// The discovery epoch at `unix_secs`.
pub fn discovery_epoch_at(unix_secs: u64) -> u64 {
    unix_secs / DISCOVERY_EPOCH_SECS
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE64.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = BadPublicKey;
    fn from_str(s: &str) -> Result<Self, BadPublicKey> {
        let bytes = BASE64
            .decode(s.trim())
            .map_err(|_| BadPublicKey(s.to_owned()))?;
        let bytes: [u8; KEY_LEN] = bytes.try_into().map_err(|_| BadPublicKey(s.to_owned()))?;
        Ok(Self(bytes))
    }
}

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

fn id_encoding() -> data_encoding::Encoding {
    let mut spec = data_encoding::Specification::new();
    spec.symbols.push_str(ID_ALPHABET);
    // Typed IDs may come in upper case, or with the letters Crockford's alphabet leaves out.
    spec.translate.from.push_str("ABCDEFGHJKMNPQRSTVWXYZOoIiLl");
    spec.translate.to.push_str("abcdefghjkmnpqrstvwxyz001111");
    // The specification is a constant and valid, so building it cannot fail.
    spec.encoding().expect("valid base32 specification")
}

/// A device ID as printed: 16 base32 characters. Display groups them as `xxxx-xxxx-xxxx-xxxx`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0:?} is not a device ID: expected 16 base32 characters such as k3j9-x81q-p0mm-7c2d")]
pub struct BadDeviceId(String);

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let groups: Vec<&str> = (0..self.0.len())
            .step_by(4)
            .map(|i| &self.0[i..(i + 4).min(self.0.len())])
            .collect();
        f.write_str(&groups.join("-"))
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({self})")
    }
}

impl FromStr for DeviceId {
    type Err = BadDeviceId;
    fn from_str(s: &str) -> Result<Self, BadDeviceId> {
        let compact: String = s.chars().filter(|c| *c != '-' && *c != ' ').collect();
        let bytes = id_encoding()
            .decode(compact.as_bytes())
            .map_err(|_| BadDeviceId(s.to_owned()))?;
        if bytes.len() != ID_BYTES {
            return Err(BadDeviceId(s.to_owned()));
        }
        Ok(Self(id_encoding().encode(&bytes)))
    }
}

impl Serialize for DeviceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// This device's key pair.
pub struct Identity {
    secret: [u8; KEY_LEN],
    public: PublicKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret key, not even in debug logs.
        f.debug_struct("Identity")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh key pair from the operating system's random source.
    pub fn generate() -> Self {
        let mut secret = [0u8; KEY_LEN];
        // snow's resolver draws from the OS random source; a failure there leaves no safe way on.
        let keypair = snow::Builder::new(crate::NOISE_PARAMS.parse().expect("valid noise params"))
            .generate_keypair()
            .expect("the operating system's random source failed");
        secret.copy_from_slice(&keypair.private);
        Self::from_secret(secret)
    }

    pub fn from_secret(secret: [u8; KEY_LEN]) -> Self {
        let public = MontgomeryPoint::mul_base_clamped(secret).to_bytes();
        Self {
            secret,
            public: PublicKey(public),
        }
    }

    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    pub fn device_id(&self) -> DeviceId {
        self.public.device_id()
    }

    /// The secret key, for the Noise handshake.
    pub fn secret_bytes(&self) -> &[u8; KEY_LEN] {
        &self.secret
    }

    pub fn key_path(state_dir: &Path) -> PathBuf {
        state_dir.join(KEY_FILE)
    }

    /// Loads the identity from `state_dir`, checking the key file's owner, mode and size.
    pub fn load(state_dir: &Path) -> Result<Self, IdentityError> {
        let path = Self::key_path(state_dir);
        if state_dir.exists() {
            check_private_dir(state_dir)?;
        }
        let meta = match fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(IdentityError::Missing { path });
            }
            Err(error) => return Err(IdentityError::Read { path, error }),
        };
        let uid = nix::unistd::getuid().as_raw();
        if meta.uid() != uid {
            return Err(IdentityError::KeyWrongOwner {
                path,
                owner: meta.uid(),
                uid,
            });
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::KeyTooOpen { path, mode });
        }
        if meta.len() != KEY_LEN as u64 {
            return Err(IdentityError::KeyWrongLength {
                path,
                len: meta.len(),
            });
        }
        let mut secret = [0u8; KEY_LEN];
        fs::File::open(&path)
            .and_then(|mut f| f.read_exact(&mut secret))
            .map_err(|error| IdentityError::Read {
                path: path.clone(),
                error,
            })?;
        Ok(Self::from_secret(secret))
    }

    /// Creates a new identity in `state_dir`. Refuses to replace an existing key file (valid or
    /// not) unless `force` is set.
    pub fn create(state_dir: &Path, force: bool) -> Result<Self, IdentityError> {
        ensure_private_dir(state_dir)?;
        let path = Self::key_path(state_dir);
        if !force && path.exists() {
            return match Self::load(state_dir) {
                Ok(existing) => Err(IdentityError::Exists {
                    path,
                    id: existing.device_id(),
                }),
                Err(e) => Err(e),
            };
        }
        let identity = Self::generate();
        write_private(&path, &identity.secret).map_err(|error| IdentityError::Write {
            path: path.clone(),
            error,
        })?;
        Ok(identity)
    }

    /// Loads the identity, creating one first if the state directory has none.
    pub fn load_or_create(state_dir: &Path) -> Result<(Self, bool), IdentityError> {
        match Self::load(state_dir) {
            Ok(identity) => Ok((identity, false)),
            Err(IdentityError::Missing { .. }) => Ok((Self::create(state_dir, false)?, true)),
            Err(e) => Err(e),
        }
    }
}

/// The name stored by `cnspr manage init --name`, if any.
pub fn stored_name(state_dir: &Path) -> Result<Option<DeviceName>, IdentityError> {
    let path = state_dir.join(NAME_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => DeviceName::new(text.trim())
            .map(Some)
            .map_err(|error| IdentityError::BadName { path, error }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(IdentityError::Read { path, error }),
    }
}

pub fn store_name(state_dir: &Path, name: &DeviceName) -> Result<(), IdentityError> {
    ensure_private_dir(state_dir)?;
    let path = state_dir.join(NAME_FILE);
    write_private(&path, format!("{name}\n").as_bytes())
        .map_err(|error| IdentityError::Write { path, error })
}

/// The device name in effect: the config file's `name`, else the stored name, else the hostname.
pub fn effective_name(
    configured: Option<&DeviceName>,
    state_dir: &Path,
) -> Result<DeviceName, IdentityError> {
    if let Some(name) = configured {
        return Ok(name.clone());
    }
    if let Some(name) = stored_name(state_dir)? {
        return Ok(name);
    }
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(DeviceName::sanitized(&host))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn device_id_is_stable_grouped_and_parses_back() {
        let identity = Identity::from_secret([7u8; 32]);
        let id = identity.device_id();
        let text = id.to_string();
        assert_eq!(text.len(), 19, "{text}");
        assert_eq!(text.matches('-').count(), 3);
        assert_eq!(text.parse::<DeviceId>().unwrap(), id);
        assert_eq!(text.to_uppercase().parse::<DeviceId>().unwrap(), id);
        assert_eq!(text.replace('-', "").parse::<DeviceId>().unwrap(), id);
        assert_eq!(
            identity.device_id(),
            Identity::from_secret([7u8; 32]).device_id()
        );
        assert_ne!(id, Identity::from_secret([8u8; 32]).device_id());
        assert!("k3j9-x81q".parse::<DeviceId>().is_err());
    }

    #[test]
    fn public_key_round_trips_through_base64() {
        let key = Identity::generate().public_key();
        let text = key.to_string();
        assert_eq!(text.len(), 44);
        assert_eq!(text.parse::<PublicKey>().unwrap(), key);
        assert!("AAAA".parse::<PublicKey>().is_err());
    }

    #[test]
    fn public_key_matches_snow() {
        let keypair = snow::Builder::new(crate::NOISE_PARAMS.parse().unwrap())
            .generate_keypair()
            .unwrap();
        let identity = Identity::from_secret(keypair.private.as_slice().try_into().unwrap());
        assert_eq!(
            identity.public_key().as_bytes().as_slice(),
            keypair.public.as_slice()
        );
    }

    #[test]
    fn names_are_validated_and_hostnames_sanitized() {
        assert!(DeviceName::new("laptop-2.home").is_ok());
        assert_eq!(DeviceName::new(""), Err(NameError::Empty));
        assert!(matches!(
            DeviceName::new("a b"),
            Err(NameError::BadCharacter(_))
        ));
        assert!(matches!(
            DeviceName::new("-x"),
            Err(NameError::BadCharacter(_))
        ));
        assert!(matches!(
            DeviceName::new(&"x".repeat(64)),
            Err(NameError::TooLong(..))
        ));
        assert_eq!(DeviceName::sanitized("my host!").as_str(), "my-host-");
        assert_eq!(DeviceName::sanitized("--").as_str(), "device");
    }

    #[test]
    fn create_refuses_to_overwrite_and_load_checks_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let created = Identity::create(&state, false).unwrap();
        let path = Identity::key_path(&state);
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&state).unwrap().mode() & 0o777, 0o700);
        assert_eq!(
            Identity::load(&state).unwrap().public_key(),
            created.public_key()
        );

        assert!(matches!(
            Identity::create(&state, false),
            Err(IdentityError::Exists { .. })
        ));
        let replaced = Identity::create(&state, true).unwrap();
        assert_ne!(replaced.public_key(), created.public_key());

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Identity::load(&state),
            Err(IdentityError::KeyTooOpen { .. })
        ));
        // A damaged key is reported, not replaced, also by load_or_create.
        assert!(Identity::load_or_create(&state).is_err());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, b"short").unwrap();
        assert!(matches!(
            Identity::load(&state),
            Err(IdentityError::KeyWrongLength { len: 5, .. })
        ));
        assert!(Identity::load_or_create(&state).is_err());
        assert_eq!(fs::read(&path).unwrap(), b"short");
    }

    #[test]
    fn effective_name_prefers_config_then_stored_then_host() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let configured = DeviceName::new("from-config").unwrap();
        assert_eq!(
            effective_name(Some(&configured), &state).unwrap(),
            configured
        );
        let host = effective_name(None, &state).unwrap();
        assert!(!host.as_str().is_empty());
        store_name(&state, &DeviceName::new("stored").unwrap()).unwrap();
        assert_eq!(effective_name(None, &state).unwrap().as_str(), "stored");
    }
}
