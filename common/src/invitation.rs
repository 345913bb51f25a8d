//! One-time invitation codes, copied by hand from the inviting device to the joining one
//! (`cnspr manage invite` prints one, `cnspr manage join CODE` reads it).
//!
//! # Format
//!
//! The bytes, in order:
//!
//! | bytes   | content                                                                  |
//! |---------|--------------------------------------------------------------------------|
//! | 1       | format version, `1`                                                      |
//! | 32      | the inviter's X25519 public key                                          |
//! | 16      | the one-time secret                                                      |
//! | 1       | how many addresses follow, at most [`MAX_ADDRESSES`]                     |
//! | 7 or 19 | per address: tag `4` or `6`, the 4 or 16 IP bytes, the port big-endian  |
//! | 4       | checksum: the first 4 bytes of BLAKE2s-256 over all the bytes before it  |
//!
//! The text is `CNSPR1-` followed by those bytes in upper-case base32 (RFC 4648, no padding),
//! in groups of five characters joined by `-`:
//! `CNSPR1-AFNFU-WS2LJ-…`. With one IPv4 address a code is 124 characters long.
//!
//! # Why it looks like this
//!
//! - **The secret is what authenticates.** Whoever presents it to the inviter is let in, once;
//!   the code is shown once and the inviter forgets the secret when it is used or expires. The
//!   key tells the joining device whom it is talking to, so nobody on the path can pose as the
//!   inviter; the addresses only say where to try first.
//! - **The checksum catches typos before a network round trip.** A code copied wrongly would
//!   otherwise be found out only when the inviter refused the secret, which reads like a network
//!   or permission problem. With 32 bits of checksum a mistyped code is recognised as such right
//!   away. It is no protection against tampering, and need not be: a forged code can only point
//!   the joiner at a key the forger chose, and whoever hands over a code is trusted anyway.
//! - **Base32 and the grouping are for people.** One case, no look-alike punctuation, and groups
//!   of five to keep one's place. Reading ignores case, spaces, line breaks and dashes, so a code
//!   that a mail program wrapped or a person re-grouped still reads. Upper case lets a QR code use
//!   its compact alphanumeric mode ([`qr_for_terminal`]).
//! - **The version is in the text and in the bytes.** `CNSPR2-` and later are recognised as a
//!   newer format (a single digit, 2–9), so an old device says "update" rather than "mistyped".
//!
//! IPv6 flow labels and scope IDs are not carried: both mean something only on the inviting
//! device. Nothing here does I/O; reading and writing codes is all there is.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use blake2::{Blake2s256, Digest};
use data_encoding::BASE32_NOPAD;
use thiserror::Error;

use crate::identity::PublicKey;

/// Length of the one-time secret in bytes.
pub const SECRET_LEN: usize = 16;
/// At most this many addresses travel in a code; more would make it long to copy for little gain.
pub const MAX_ADDRESSES: usize = 4;

/// What every code starts with, followed by the format version.
const PREFIX: &str = "CNSPR";
/// The format version this module writes and reads, as a byte and as the digit after [`PREFIX`].
const FORMAT_VERSION: u8 = 1;
const FORMAT_VERSION_DIGIT: char = '1';
const KEY_LEN: usize = 32;
const CHECKSUM_LEN: usize = 4;
const TAG_IPV4: u8 = 4;
const TAG_IPV6: u8 = 6;
/// Characters per group in the text; dashes between groups.
const GROUP_LEN: usize = 5;

/// An invitation as a code carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invitation {
    /// The inviting device's public key (cnsprcy::identity::PublicKey).
    pub inviter: PublicKey,
    /// The one-time secret the inviter checks.
    pub secret: [u8; SECRET_LEN],
    /// Where the inviter listens (at most MAX_ADDRESSES; encode keeps the first MAX_ADDRESSES).
    pub addresses: Vec<SocketAddr>,
}

/// Why a text is not a usable invitation code. Each message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InvitationError {
    #[error("no invitation code given; paste the whole code `cnspr manage invite` printed")]
    Empty,
    #[error(
        "this is not a cnsprcy invitation: an invitation code starts with CNSPR1-; copy the whole code `cnspr manage invite` printed"
    )]
    NotAnInvitation,
    #[error(
        "this invitation code (CNSPR{version}-) was made by a newer cnsprcy; update this device, then join again"
    )]
    NewerVersion { version: char },
    #[error(
        "the code contains {character:?}, which no invitation code has{}; the code is mistyped or incomplete; copy it again",
        look_alike_hint(.character)
    )]
    BadCharacter { character: char },
    #[error(
        "the code is too short or too long to be whole; the code is mistyped or incomplete; copy it again"
    )]
    Incomplete,
    #[error(
        "the code's checksum does not match; the code is mistyped or incomplete; copy it again"
    )]
    ChecksumMismatch,
    #[error(
        "the invitation code is intact but unusable: {0}; make a new one with `cnspr manage invite` on the inviting device"
    )]
    Damaged(Damage),
}

/// What is wrong inside a code whose checksum matches: made by a broken or foreign program, as
/// a typo would not keep the checksum right.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Damage {
    #[error("its format version byte is {0}, not {FORMAT_VERSION}")]
    VersionByte(u8),
    #[error("it ends in the middle of its contents")]
    Truncated,
    #[error("it has {0} bytes left over after its contents")]
    TrailingBytes(usize),
    #[error("it lists {0} addresses, more than the {MAX_ADDRESSES} allowed")]
    TooManyAddresses(u8),
    #[error("an address has the unknown type tag {0} (expected {TAG_IPV4} or {TAG_IPV6})")]
    UnknownAddressTag(u8),
    #[error("an address has port 0, which nothing listens on")]
    PortZero,
}

/// For a character that base32 leaves out, the letter it is usually mistaken for.
fn look_alike_hint(character: &char) -> &'static str {
    match character {
        '0' => " (the letter O, perhaps?)",
        '1' => " (the letter I or L, perhaps?)",
        '8' => " (the letter B, perhaps?)",
        _ => "",
    }
}

impl Invitation {
    /// The code as the user sees it: "CNSPR1-" then groups of 5 characters joined by '-'.
    ///
    /// Addresses with port 0 are left out (nothing can connect to them, and [`Invitation::parse`]
    /// refuses them); of the rest, the first [`MAX_ADDRESSES`] are kept.
    pub fn encode(&self) -> String {
        let mut bytes = Vec::new();
        bytes.push(FORMAT_VERSION);
        bytes.extend_from_slice(self.inviter.as_bytes());
        bytes.extend_from_slice(&self.secret);
        let addresses: Vec<&SocketAddr> = self
            .addresses
            .iter()
            .filter(|address| address.port() != 0)
            .take(MAX_ADDRESSES)
            .collect();
        // At most MAX_ADDRESSES (4) by the `take` above, so the count fits a byte.
        bytes.push(addresses.len() as u8);
        for address in addresses {
            match address.ip() {
                IpAddr::V4(ip) => {
                    bytes.push(TAG_IPV4);
                    bytes.extend_from_slice(&ip.octets());
                }
                IpAddr::V6(ip) => {
                    bytes.push(TAG_IPV6);
                    bytes.extend_from_slice(&ip.octets());
                }
            }
            bytes.extend_from_slice(&address.port().to_be_bytes());
        }
        let checksum = checksum(&bytes);
        bytes.extend_from_slice(&checksum);

        let mut code = format!("{PREFIX}{FORMAT_VERSION_DIGIT}");
        for (i, symbol) in BASE32_NOPAD.encode(&bytes).chars().enumerate() {
            if i % GROUP_LEN == 0 {
                code.push('-');
            }
            code.push(symbol);
        }
        code
    }

    /// Reads a code as a user may have typed or pasted it: case-insensitive, spaces, newlines and '-' ignored (so a line-wrapped code works).
    pub fn parse(text: &str) -> Result<Invitation, InvitationError> {
        let normalized: String = text
            .chars()
            .filter(|c| !c.is_whitespace() && !is_dash(*c))
            .map(|c| c.to_ascii_uppercase())
            .collect();
        if normalized.is_empty() {
            return Err(InvitationError::Empty);
        }
        let Some(after_prefix) = normalized.strip_prefix(PREFIX) else {
            return Err(InvitationError::NotAnInvitation);
        };
        let mut rest = after_prefix.chars();
        match rest.next() {
            Some(FORMAT_VERSION_DIGIT) => {}
            Some(version @ '2'..='9') => return Err(InvitationError::NewerVersion { version }),
            _ => return Err(InvitationError::NotAnInvitation),
        }
        let payload = rest.as_str();
        if let Some(character) = payload.chars().find(|c| !is_base32_symbol(*c)) {
            return Err(InvitationError::BadCharacter { character });
        }
        // Every symbol is valid, so decoding fails only on a length no byte string encodes to,
        // or on stray bits in the last symbol: both a code cut short or with a symbol too many.
        let bytes = BASE32_NOPAD
            .decode(payload.as_bytes())
            .map_err(|_| InvitationError::Incomplete)?;
        if bytes.len() <= CHECKSUM_LEN {
            return Err(InvitationError::Incomplete);
        }
        let (content, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if checksum(content) != sum {
            return Err(InvitationError::ChecksumMismatch);
        }
        decode_content(content).map_err(InvitationError::Damaged)
    }
}

/// Dashes as typed, and the Unicode hyphens and dashes that some editors and chat programs
/// put in their place.
fn is_dash(c: char) -> bool {
    matches!(c, '-' | '\u{2010}'..='\u{2015}' | '\u{2212}')
}

fn is_base32_symbol(c: char) -> bool {
    matches!(c, 'A'..='Z' | '2'..='7')
}

fn checksum(bytes: &[u8]) -> [u8; CHECKSUM_LEN] {
    let digest = Blake2s256::digest(bytes);
    let mut sum = [0; CHECKSUM_LEN];
    sum.copy_from_slice(&digest[..CHECKSUM_LEN]);
    sum
}

/// Reads the bytes before the checksum.
fn decode_content(content: &[u8]) -> Result<Invitation, Damage> {
    let mut reader = Reader(content);
    let [version] = reader.take::<1>()?;
    if version != FORMAT_VERSION {
        return Err(Damage::VersionByte(version));
    }
    let inviter = PublicKey::from_bytes(reader.take::<KEY_LEN>()?);
    let secret = reader.take::<SECRET_LEN>()?;
    let [count] = reader.take::<1>()?;
    if usize::from(count) > MAX_ADDRESSES {
        return Err(Damage::TooManyAddresses(count));
    }
    let mut addresses = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let [tag] = reader.take::<1>()?;
        let ip = match tag {
            TAG_IPV4 => IpAddr::V4(Ipv4Addr::from(reader.take::<4>()?)),
            TAG_IPV6 => IpAddr::V6(Ipv6Addr::from(reader.take::<16>()?)),
            other => return Err(Damage::UnknownAddressTag(other)),
        };
        let port = u16::from_be_bytes(reader.take::<2>()?);
        if port == 0 {
            return Err(Damage::PortZero);
        }
        addresses.push(SocketAddr::new(ip, port));
    }
    if !reader.0.is_empty() {
        return Err(Damage::TrailingBytes(reader.0.len()));
    }
    Ok(Invitation {
        inviter,
        secret,
        addresses,
    })
}

/// The unread rest of a code's contents.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], Damage> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or(Damage::Truncated)?;
        self.0 = rest;
        Ok(*head)
    }
}

/// The code as a QR code for a terminal (Unicode half blocks, dark on light, with a quiet zone), for a phone's camera.
///
/// Terminals draw characters in a light colour on a dark background far more often than the
/// other way round, so the light modules and the quiet zone are the drawn blocks and the dark
/// modules are left blank: on such a terminal the camera sees dark on light, as QR readers
/// expect. The code is upper-cased first so the QR code uses its alphanumeric mode, a third
/// smaller than bytes. An empty string if the text is too long for any QR code, which no code
/// from [`Invitation::encode`] is (at most 256 characters).
pub fn qr_for_terminal(code: &str) -> String {
    use qrcode::render::unicode::Dense1x2;
    let Ok(qr) = qrcode::QrCode::new(code.to_ascii_uppercase()) else {
        return String::new();
    };
    qr.render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{SocketAddrV4, SocketAddrV6};

    fn key(seed: u8) -> PublicKey {
        PublicKey::from_bytes([seed; KEY_LEN])
    }

    fn v4(a: u8, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 168, 1, a)), port)
    }

    fn v6(last: u16, port: u16) -> SocketAddr {
        SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last)),
            port,
        )
    }

    fn invitation(addresses: Vec<SocketAddr>) -> Invitation {
        Invitation {
            inviter: key(7),
            secret: *b"0123456789abcdef",
            addresses,
        }
    }

    /// A code made of `content` as it is, with a correct checksum: for structures `encode`
    /// would never write.
    fn code_from_content(content: &[u8]) -> String {
        let mut bytes = content.to_vec();
        bytes.extend_from_slice(&checksum(content));
        format!("CNSPR1-{}", BASE32_NOPAD.encode(&bytes))
    }

    fn round_trips(invitation: &Invitation) {
        let code = invitation.encode();
        assert_eq!(Invitation::parse(&code).as_ref(), Ok(invitation), "{code}");
    }

    #[test]
    fn round_trip_without_addresses() {
        round_trips(&invitation(vec![]));
    }

    #[test]
    fn round_trip_with_one_address() {
        round_trips(&invitation(vec![v4(10, 7946)]));
        round_trips(&invitation(vec![v6(1, 7946)]));
    }

    #[test]
    fn round_trip_with_four_addresses() {
        round_trips(&invitation(vec![
            v4(10, 7946),
            v6(1, 1),
            v4(11, 65535),
            v6(2, 7946),
        ]));
        round_trips(&invitation(vec![v6(1, 1), v6(2, 2), v6(3, 3), v6(4, 4)]));
    }

    #[test]
    fn code_looks_as_documented() {
        let code = invitation(vec![v4(10, 7946)]).encode();
        assert_eq!(code.len(), 124, "{code}");
        let (prefix, groups) = code.split_at("CNSPR1-".len());
        assert_eq!(prefix, "CNSPR1-");
        let groups: Vec<&str> = groups.split('-').collect();
        let (last, full) = groups.split_last().unwrap();
        assert!(full.iter().all(|group| group.len() == 5), "{code}");
        assert!((1..=5).contains(&last.len()), "{code}");
        assert!(
            groups
                .iter()
                .flat_map(|group| group.chars())
                .all(is_base32_symbol)
        );
    }

    #[test]
    fn lower_case_regrouped_and_wrapped_copy_parses() {
        let original = invitation(vec![v4(10, 7946), v6(1, 7946)]);
        let code = original.encode();
        let letters: String = code.chars().filter(|c| *c != '-').collect();
        // Groups of four, lower case, wrapped every 23 characters with mixed line endings and
        // indentation, and a non-breaking space and an en dash from a chat program.
        let mut copy = String::from("  \n");
        for (i, c) in letters.to_lowercase().chars().enumerate() {
            if i > 0 && i % 4 == 0 {
                copy.push(if i % 12 == 0 { '\u{2013}' } else { ' ' });
            }
            if i > 0 && i % 23 == 0 {
                copy.push_str(if i % 2 == 0 { "\r\n\t" } else { "\n\u{a0}" });
            }
            copy.push(c);
        }
        copy.push('\n');
        assert_eq!(Invitation::parse(&copy), Ok(original), "{copy}");
    }

    #[test]
    fn one_changed_character_is_detected() {
        let code = invitation(vec![v4(10, 7946)]).encode();
        let start = "CNSPR1-".len();
        for (i, original) in code.char_indices().skip(start) {
            if original == '-' {
                continue;
            }
            for replacement in ['A', 'Q', '7', '2', 'Z'] {
                if replacement == original {
                    continue;
                }
                let mut changed = code.clone();
                changed.replace_range(i..i + 1, &replacement.to_string());
                let result = Invitation::parse(&changed);
                assert!(
                    matches!(
                        result,
                        Err(InvitationError::ChecksumMismatch | InvitationError::Incomplete)
                    ),
                    "{changed}: {result:?}"
                );
            }
        }
    }

    #[test]
    fn a_character_outside_base32_is_named() {
        let code = invitation(vec![]).encode();
        let typo = code.replacen('O', "0", 1);
        // The code may happen to have no O; put a 0 in any case.
        let typo = if typo == code {
            format!("{code}0")
        } else {
            typo
        };
        let error = Invitation::parse(&typo).unwrap_err();
        assert_eq!(error, InvitationError::BadCharacter { character: '0' });
        let message = error.to_string();
        assert!(message.contains("'0'"), "{message}");
        assert!(message.contains("the letter O"), "{message}");
        assert!(message.contains("copy it again"), "{message}");

        let error = Invitation::parse(&format!("{code}!")).unwrap_err();
        assert_eq!(error, InvitationError::BadCharacter { character: '!' });
    }

    #[test]
    fn truncated_code_is_incomplete() {
        let code = invitation(vec![v4(10, 7946), v6(3, 443)]).encode();
        for cut in "CNSPR1-".len()..code.len() {
            let truncated = &code[..cut];
            let result = Invitation::parse(truncated);
            assert!(
                matches!(
                    result,
                    Err(InvitationError::ChecksumMismatch | InvitationError::Incomplete)
                ),
                "{truncated}: {result:?}"
            );
            if let Err(error) = result {
                assert!(
                    error.to_string().contains("mistyped or incomplete"),
                    "{error}"
                );
            }
        }
    }

    #[test]
    fn wrong_prefix_is_not_an_invitation() {
        let code = invitation(vec![]).encode();
        let payload = &code["CNSPR1-".len()..];
        for text in [
            payload.to_string(),
            format!("CNSRP1-{payload}"),
            format!("CNSPR-{payload}"),
            format!("CNSPR0-{payload}"),
            "hello".to_string(),
        ] {
            let error = Invitation::parse(&text).unwrap_err();
            assert_eq!(error, InvitationError::NotAnInvitation, "{text}");
            assert!(error.to_string().contains("starts with CNSPR1-"));
            assert!(error.to_string().contains("cnspr manage invite"));
        }
        assert_eq!(Invitation::parse(" \n- "), Err(InvitationError::Empty));
    }

    #[test]
    fn newer_version_asks_for_an_update() {
        let code = invitation(vec![]).encode();
        for newer in [
            code.replacen("CNSPR1-", "CNSPR2-", 1),
            code.replacen("CNSPR1-", "cnspr9-", 1),
        ] {
            let error = Invitation::parse(&newer).unwrap_err();
            assert!(
                matches!(error, InvitationError::NewerVersion { .. }),
                "{error:?}"
            );
            assert!(error.to_string().contains("update this device"), "{error}");
        }
    }

    #[test]
    fn more_than_max_addresses_are_cut_on_encode() {
        let many: Vec<SocketAddr> = (1..=7).map(|i| v4(i, 7946)).collect();
        let parsed = Invitation::parse(&invitation(many.clone()).encode()).unwrap();
        assert_eq!(parsed.addresses, many[..MAX_ADDRESSES]);
    }

    #[test]
    fn port_zero_is_left_out_on_encode() {
        let parsed = Invitation::parse(&invitation(vec![v4(1, 0), v4(2, 7946)]).encode()).unwrap();
        assert_eq!(parsed.addresses, [v4(2, 7946)]);
    }

    #[test]
    fn ipv6_scope_and_flow_label_are_not_carried() {
        let scoped = SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1),
            7946,
            0x12345,
            3,
        ));
        let parsed = Invitation::parse(&invitation(vec![scoped]).encode()).unwrap();
        assert_eq!(
            parsed.addresses,
            [SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1),
                7946,
                0,
                0,
            ))]
        );
    }

    /// The contents every damage test starts from: version, key, secret.
    fn header() -> Vec<u8> {
        let mut content = vec![FORMAT_VERSION];
        content.extend_from_slice(&[7; KEY_LEN]);
        content.extend_from_slice(&[9; SECRET_LEN]);
        content
    }

    #[test]
    fn damaged_structure_with_matching_checksum_is_reported() {
        let damaged = |tail: &[u8], expected: Damage| {
            let mut content = header();
            content.extend_from_slice(tail);
            let error = Invitation::parse(&code_from_content(&content)).unwrap_err();
            assert_eq!(error, InvitationError::Damaged(expected));
            assert!(error.to_string().contains("cnspr manage invite"), "{error}");
        };
        damaged(&[5], Damage::TooManyAddresses(5));
        damaged(
            &[1, 5, 10, 0, 0, 1, 0x1f, 0x0a],
            Damage::UnknownAddressTag(5),
        );
        damaged(&[1, 4, 10, 0, 0, 1, 0, 0], Damage::PortZero);
        damaged(&[1, 4, 10, 0, 0, 1, 0x1f], Damage::Truncated);
        damaged(&[2, 4, 10, 0, 0, 1, 0x1f, 0x0a], Damage::Truncated);
        damaged(&[0, 0xff, 0xff], Damage::TrailingBytes(2));
        damaged(&[], Damage::Truncated);

        let mut wrong_version = header();
        wrong_version[0] = 2;
        wrong_version.push(0);
        assert_eq!(
            Invitation::parse(&code_from_content(&wrong_version)),
            Err(InvitationError::Damaged(Damage::VersionByte(2)))
        );
        assert_eq!(
            Invitation::parse(&code_from_content(&[FORMAT_VERSION])),
            Err(InvitationError::Damaged(Damage::Truncated))
        );
    }

    #[test]
    fn qr_code_renders_for_a_terminal() {
        let code = invitation(vec![v4(10, 7946)]).encode();
        let qr = qr_for_terminal(&code);
        let lines: Vec<&str> = qr.lines().collect();
        assert!(lines.len() > 10, "{qr}");
        let width = lines[0].chars().count();
        assert!(lines.iter().all(|line| line.chars().count() == width));
        assert!(
            qr.chars()
                .all(|c| matches!(c, ' ' | '\u{2580}' | '\u{2584}' | '\u{2588}' | '\n'))
        );
        // The quiet zone is drawn: light, so full blocks.
        assert!(lines[0].chars().all(|c| c == '\u{2588}'), "{qr}");
        // Each line is two rows of modules: the symbol plus 4 modules of quiet zone each side.
        let symbol = qrcode::QrCode::new(&code).unwrap();
        assert_eq!(width, symbol.width() + 8);
        assert_eq!(lines.len(), (symbol.width() + 8).div_ceil(2));
        // Upper-casing puts the code in alphanumeric mode, smaller than the byte mode lower case
        // would need; and the case the caller passes does not matter.
        assert_eq!(qr_for_terminal(&code.to_lowercase()), qr);
        let bytes_mode = qrcode::QrCode::new(code.to_lowercase()).unwrap();
        assert!(symbol.width() < bytes_mode.width());
    }

    fn socket_address() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), 1..=u16::MAX)
                .prop_map(|(ip, port)| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port))),
            (any::<[u8; 16]>(), 1..=u16::MAX).prop_map(|(ip, port)| SocketAddr::V6(
                SocketAddrV6::new(Ipv6Addr::from(ip), port, 0, 0)
            )),
        ]
    }

    fn any_invitation() -> impl Strategy<Value = Invitation> {
        (
            any::<[u8; KEY_LEN]>(),
            any::<[u8; SECRET_LEN]>(),
            prop::collection::vec(socket_address(), 0..=MAX_ADDRESSES),
        )
            .prop_map(|(key, secret, addresses)| Invitation {
                inviter: PublicKey::from_bytes(key),
                secret,
                addresses,
            })
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_any_text(text in any::<String>()) {
            let _ = Invitation::parse(&text);
        }

        /// Past the prefix and the alphabet check, into base32 decoding and the checksum.
        #[test]
        fn parse_never_panics_on_base32_text(text in "[A-Z2-7a-z -]{0,300}") {
            let _ = Invitation::parse(&format!("CNSPR1-{text}"));
        }

        /// Past the checksum, into the structure: any bytes either read or are reported damaged.
        #[test]
        fn contents_with_a_matching_checksum_read_or_are_damaged(
            content in prop::collection::vec(any::<u8>(), 1..200),
            valid_start in any::<bool>(),
        ) {
            let mut content = content;
            if valid_start {
                content[0] = FORMAT_VERSION;
            }
            match Invitation::parse(&code_from_content(&content)) {
                Ok(_) | Err(InvitationError::Damaged(_)) => {}
                Err(other) => prop_assert!(false, "{other:?}"),
            }
        }

        #[test]
        fn encode_then_parse_round_trips(invitation in any_invitation()) {
            let code = invitation.encode();
            prop_assert_eq!(Invitation::parse(&code), Ok(invitation.clone()));
            prop_assert_eq!(Invitation::parse(&code.to_lowercase()), Ok(invitation));
        }
    }
}
