//! Addresses as people write them: `ip:port`, or an IP address alone meaning the default port
//! ([`DEFAULT_PORT`], 7332). IPv6 takes brackets with a port (`[fd00::5]:7333`), and may go with or
//! without them alone (`fd00::5`, `[fd00::5]`). Used wherever an address is read from the user:
//! `cnspr manage add`, the `members.add` method, `[mesh] listen`.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Deserializer};

use crate::config::DEFAULT_PORT;

/// Parses `text` as an address, the port defaulting to [`DEFAULT_PORT`].
pub fn parse(text: &str) -> Result<SocketAddr, String> {
    let trimmed = text.trim();
    if let Ok(addr) = trimmed.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bare = trimmed
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(trimmed);
    match bare.parse::<IpAddr>() {
        // An IPv4 address in brackets is not a form anyone writes on purpose.
        Ok(IpAddr::V4(_)) if bare != trimmed => Err(not_an_address(text)),
        Ok(ip) => Ok(SocketAddr::new(ip, DEFAULT_PORT)),
        Err(_) => Err(not_an_address(text)),
    }
}

fn not_an_address(text: &str) -> String {
    format!(
        "{text:?} is not an address: write an IP address, with a port if it is not \
         {DEFAULT_PORT} (192.168.1.20, 192.168.1.20:7333, fd00::5, [fd00::5]:7333)"
    )
}

/// For `#[serde(deserialize_with = "...")]`: a list of addresses as [`parse`] reads them.
pub fn deserialize_list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<SocketAddr>, D::Error> {
    let texts = Vec::<String>::deserialize(deserializer)?;
    texts
        .iter()
        .map(|text| parse(text).map_err(serde::de::Error::custom))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_port_is_the_default_port() {
        let ok = |text: &str, expected: &str| {
            assert_eq!(parse(text), Ok(expected.parse().unwrap()), "{text}");
        };
        ok("10.0.0.5", "10.0.0.5:7332");
        ok(" 10.0.0.5 ", "10.0.0.5:7332");
        ok("10.0.0.5:7400", "10.0.0.5:7400");
        ok("fd00::5", "[fd00::5]:7332");
        ok("[fd00::5]", "[fd00::5]:7332");
        ok("[fd00::5]:7400", "[fd00::5]:7400");
        ok("::", "[::]:7332");
        ok("0.0.0.0:0", "0.0.0.0:0");
    }

    #[test]
    fn what_is_not_an_address_says_how_to_write_one() {
        for bad in [
            "",
            "desk",
            "10.0.0.300",
            "10.0.0.5:",
            "10.0.0.5:99999",
            "[10.0.0.5]",
            "[fd00::5",
            "fd00::5]:7332",
            "desk.local:7332",
        ] {
            let error = parse(bad).unwrap_err();
            assert!(
                error.contains("is not an address") && error.contains("[fd00::5]:7333"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn lists_deserialize_with_the_default_port() {
        #[derive(Deserialize)]
        struct Params {
            #[serde(deserialize_with = "deserialize_list")]
            addresses: Vec<SocketAddr>,
        }
        let params: Params =
            serde_json::from_str(r#"{"addresses": ["10.0.0.5", "[fd00::5]:7400"]}"#).unwrap();
        assert_eq!(
            params.addresses,
            [
                "10.0.0.5:7332".parse().unwrap(),
                "[fd00::5]:7400".parse().unwrap()
            ]
        );
        let error = serde_json::from_str::<Params>(r#"{"addresses": ["10.0.0.300"]}"#)
            .err()
            .unwrap();
        assert!(error.to_string().contains("is not an address"), "{error}");
    }
}
