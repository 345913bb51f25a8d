//! This crate's fuzz harnesses: every parser here that reads what another device, a client, a
//! service or the user wrote (`crate::fuzzing` says how they run; `docs/reliability.md` lists
//! them all).

use std::path::Path;

use crate::config::Config;
use crate::framing::{BadLine, JsonLinesCodec};
use crate::fuzzing::{assert_says_something, both, text};
use crate::invitation::Invitation;
use crate::ipc::{FromHandlers, FromMesh, ToHandlers, ToMesh};
use crate::rpc::{self, Methods, RpcError};
use crate::tag;
use crate::wire::{
    ChunkError, FLAG_MORE, HandshakePayload, MAX_MESSAGE_BYTES, Message, Reassembler,
};
use bytes::BytesMut;
use serde_json::{Value, json};
use tokio_util::codec::Decoder;

/// A message from a peer, after decryption and reassembly.
#[test]
fn wire_message() {
    let seeds = crate::fuzz_seeds!("wire_message");
    crate::fuzz_target!("wire_message").for_each(|input| {
        both(&seeds, input, |bytes| match Message::decode(bytes) {
            Ok(message) => {
                let encoded = message.encode();
                assert_eq!(message.encoded_len(), encoded.len());
                assert_eq!(Message::decode(&encoded).as_ref().ok(), Some(&message));
            }
            Err(e) => assert_says_something(&e),
        })
    });
}

/// The payload of a handshake message, from a device that may be a stranger.
#[test]
fn handshake_payload() {
    let seeds = crate::fuzz_seeds!("handshake_payload");
    crate::fuzz_target!("handshake_payload").for_each(|input| {
        both(&seeds, input, |bytes| {
            match HandshakePayload::decode(bytes) {
                Ok(payload) => {
                    assert!(payload.joining.is_none() || payload.inducting.is_none());
                    let again = HandshakePayload::decode(&payload.encode());
                    assert_eq!(again.as_ref().ok(), Some(&payload));
                }
                Err(e) => assert_says_something(&e),
            }
        })
    });
}

/// Decrypted transport messages, joined into messages: the input is a list of chunks, each
/// a flag byte and a length (up to 64 KiB, so that the 32 MiB limit is reached too), and
/// the result is checked against joining them by hand.
#[test]
fn chunk_reassembly() {
    crate::fuzz_target!("chunk_reassembly").for_each(|input| {
        let mut reassembler = Reassembler::default();
        let mut expected_len = 0usize;
        let mut plaintext = Vec::new();
        for (i, chunk) in input.chunks_exact(3).enumerate() {
            let (flags, len) = (
                chunk[0],
                usize::from(u16::from_be_bytes([chunk[1], chunk[2]])),
            );
            plaintext.clear();
            if len > 0 {
                plaintext.push(flags);
                plaintext.resize(len, i as u8);
            }
            let got = reassembler.push(&plaintext);
            let body = len.saturating_sub(1);
            let want = if len == 0 {
                Err(ChunkError::Empty)
            } else if flags & !FLAG_MORE != 0 {
                Err(ChunkError::BadFlags(flags))
            } else if expected_len + body > MAX_MESSAGE_BYTES {
                expected_len = 0;
                Err(ChunkError::TooLong)
            } else if flags & FLAG_MORE != 0 {
                expected_len += body;
                Ok(None)
            } else {
                let whole = expected_len + body;
                expected_len = 0;
                Ok(Some(whole))
            };
            assert_eq!(got.map(|whole| whole.map(|w| w.len())), want, "chunk {i}");
        }
    });
}

/// Methods that read their params as the real ones do.
struct Strict;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // Read only to check the params' shape.
struct SendParams {
    tag: String,
    to: Vec<String>,
    #[serde(default)]
    ttl_ms: Option<u64>,
}

impl Methods for Strict {
    fn names(&self) -> &[&'static str] {
        &["status", "send", "peers"]
    }
    async fn call(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        match method {
            "send" => rpc::params::<SendParams>(params).map(|_| json!("sent")),
            _ => Ok(json!({"ok": true})),
        }
    }
}

/// One response object: JSON-RPC 2.0, with a result or an error and an id.
fn check_response(response: &Value) {
    assert_eq!(response["jsonrpc"], "2.0", "{response}");
    let object = response.as_object().expect("a response is an object");
    assert!(object.contains_key("id"), "{response}");
    match (object.get("result"), object.get("error")) {
        (Some(_), None) => {}
        (None, Some(error)) => {
            let code = error["code"].as_i64().expect("an error code");
            assert!((-32768..=-32000).contains(&code), "{response}");
            assert!(!error["message"].as_str().unwrap_or("").is_empty());
        }
        _ => panic!("a response holds a result or an error: {response}"),
    }
}

/// A line from a client on the public socket, answered as the mesh answers it.
#[test]
fn rpc_line() {
    let seeds = crate::fuzz_seeds!("rpc_line");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    crate::fuzz_target!("rpc_line").for_each(|input| {
        both(&seeds, input, |bytes| {
            let line = text(bytes);
            let Some(answer) = runtime.block_on(rpc::handle_line(&Strict, &line)) else {
                // Only notifications go unanswered, so the line must be valid JSON.
                assert!(serde_json::from_str::<Value>(&line).is_ok(), "{line:?}");
                return;
            };
            assert!(!answer.contains('\n'), "one line per answer");
            let answer: Value = serde_json::from_str(&answer).expect("answers are JSON");
            match &answer {
                Value::Array(responses) => responses.iter().for_each(check_response),
                response => check_response(response),
            }
        })
    });
}

/// The newline-delimited framing of the public and internal sockets, with a small limit,
/// fed in pieces of any size: the lines that come out are the short UTF-8 lines that went
/// in, in order; every other line is reported as an item, and the stream goes on.
#[test]
fn json_lines() {
    const MAX: usize = 40;
    let seeds = crate::fuzz_seeds!("json_lines");
    crate::fuzz_target!("json_lines").for_each(|input| {
        both(&seeds, input, |bytes| {
            let mut codec = JsonLinesCodec::new(MAX);
            let mut buffer = BytesMut::new();
            let mut lines = Vec::new();
            let mut take = |item: Result<String, BadLine>| match item {
                Ok(line) => lines.push(line),
                Err(BadLine::TooLong { limit }) => assert_eq!(limit, MAX),
                Err(BadLine::NotUtf8) => {}
            };
            // Piece sizes from the bytes themselves: deterministic, and of every size.
            let mut rest = bytes;
            while !rest.is_empty() {
                let piece = (usize::from(rest[0]) % 7 + 1).min(rest.len());
                buffer.extend_from_slice(&rest[..piece]);
                rest = &rest[piece..];
                while let Some(item) = codec.decode(&mut buffer).expect("no I/O error") {
                    take(item);
                }
            }
            while let Some(item) = codec.decode_eof(&mut buffer).expect("no I/O error") {
                take(item);
            }
            let newlines = bytes.iter().filter(|&&b| b == b'\n').count();
            let expected: Vec<String> = bytes
                .split(|&b| b == b'\n')
                .enumerate()
                // After the last newline, only something other than "" or "\r" is a line.
                .filter(|(i, line)| *i < newlines || !matches!(*line, b"" | b"\r"))
                // The limit counts a line's bytes before its "\r" is dropped.
                .filter(|(_, line)| line.len() <= MAX)
                .filter_map(|(_, line)| {
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    String::from_utf8(line.to_vec()).ok()
                })
                .collect();
            assert_eq!(lines, expected, "{bytes:?}");
        })
    });
}

fn ipc_round_trip<T>(text: &str)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    match serde_json::from_str::<T>(text) {
        Ok(value) => {
            let again = serde_json::to_string(&value).expect("our types encode");
            assert_eq!(
                serde_json::from_str::<T>(&again).ok().as_ref(),
                Some(&value)
            );
        }
        Err(e) => assert_says_something(&e),
    }
}

/// A line on the internal sockets, read as each side reads it.
#[test]
fn ipc_message() {
    let seeds = crate::fuzz_seeds!("ipc_message");
    crate::fuzz_target!("ipc_message").for_each(|input| {
        both(&seeds, input, |bytes| {
            let line = text(bytes);
            ipc_round_trip::<ToMesh>(&line);
            ipc_round_trip::<FromMesh>(&line);
            ipc_round_trip::<ToHandlers>(&line);
            ipc_round_trip::<FromHandlers>(&line);
        })
    });
}

/// The configuration file, and the `[paths]` section read alone from a broken one.
#[test]
fn config_file() {
    let seeds = crate::fuzz_seeds!("config_file");
    let path = Path::new("/fuzz/config.toml");
    crate::fuzz_target!("config_file").for_each(|input| {
        both(&seeds, input, |bytes| {
            let text = text(bytes);
            match Config::parse(&text, path) {
                Ok(config) => {
                    let written = toml::to_string(&config).expect("a config encodes");
                    let again = Config::parse(&written, path);
                    assert_eq!(again.as_ref().ok(), Some(&config), "{written}");
                }
                Err(e) => assert_says_something(&e),
            }
            let _ = Config::paths_section(&text);
        })
    });
}

/// Tags, which become paths below the handler directory: an accepted tag names nothing
/// outside it, nor the directory's own `_` names, nor hidden files.
#[test]
fn tag_names() {
    let seeds = crate::fuzz_seeds!("tag_names");
    crate::fuzz_target!("tag_names").for_each(|input| {
        both(&seeds, input, |bytes| {
            let text = text(bytes);
            match tag::validate_tag(&text) {
                Ok(()) => {
                    assert!(text.len() <= tag::MAX_TAG_BYTES);
                    assert!(!text.contains('\0') && !text.contains('\\'));
                    let segments: Vec<&str> = text.split('/').collect();
                    assert!(segments.len() <= tag::MAX_SEGMENTS);
                    for segment in &segments {
                        assert!(!segment.is_empty());
                        assert!(!segment.starts_with('.') && !segment.starts_with('_'));
                    }
                    let components: Vec<_> = Path::new(&text).components().collect();
                    assert_eq!(components.len(), segments.len(), "{text:?}");
                    assert!(
                        components
                            .iter()
                            .all(|c| matches!(c, std::path::Component::Normal(_)))
                    );
                }
                Err(e) => assert!(!e.is_empty()),
            }
            if tag::validate_event(&text).is_ok() {
                assert!(tag::validate_segment(&text).is_ok(), "{text:?}");
            }
            let (stem, extension) = tag::split_extension(&text);
            match extension {
                Some(extension) => {
                    assert_eq!(format!("{stem}.{extension}"), text);
                    assert!(!stem.is_empty() && !extension.contains('.'));
                }
                None => assert_eq!(stem, text),
            }
        })
    });
}

/// Invitation codes as a person may type or paste them.
#[test]
fn invitation_code() {
    let seeds = crate::fuzz_seeds!("invitation_code");
    crate::fuzz_target!("invitation_code").for_each(|input| {
        both(&seeds, input, |bytes| {
            let text = text(bytes);
            match Invitation::parse(&text) {
                Ok(invitation) => {
                    let code = invitation.encode();
                    assert_eq!(Invitation::parse(&code).as_ref(), Ok(&invitation));
                }
                Err(e) => assert_says_something(&e),
            }
        })
    });
}

/// Device names, public keys and device IDs as text: from allow lists, the command line, and
/// mDNS advertisements of devices waiting to be paired (a stranger's, on the local network).
#[test]
fn identity_text() {
    use crate::identity::{DeviceId, DeviceName, PublicKey};
    let seeds = crate::fuzz_seeds!("identity_text");
    crate::fuzz_target!("identity_text").for_each(|input| {
        both(&seeds, input, |bytes| {
            let text = text(bytes);
            match DeviceName::new(&text) {
                Ok(name) => assert_eq!(DeviceName::new(&name.to_string()).ok(), Some(name)),
                Err(e) => assert_says_something(&e),
            }
            match text.parse::<PublicKey>() {
                Ok(key) => assert_eq!(key.to_string().parse::<PublicKey>().ok(), Some(key)),
                Err(e) => assert_says_something(&e),
            }
            match text.parse::<DeviceId>() {
                Ok(id) => assert_eq!(id.to_string().parse::<DeviceId>().ok(), Some(id)),
                Err(e) => assert_says_something(&e),
            }
        })
    });
}
