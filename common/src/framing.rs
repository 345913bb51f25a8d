//! Newline-delimited JSON framing, shared by the public API and the internal sockets.
//!
//! One JSON value per line, each line at most a fixed number of bytes. An over-long line, or one
//! that is not UTF-8, is reported as an item of its own (and skipped up to its newline), so a
//! server can answer it with an error and keep the connection, instead of the stream ending at
//! the first bad frame.

use std::io;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Decoder, Encoder, Framed, LinesCodec, LinesCodecError};

/// The longest line accepted on the public API socket: a largest message payload (16 MiB) in
/// base64, with room for the rest of the request.
pub const MAX_LINE_BYTES: usize = 24 * 1024 * 1024;
/// The longest line on the internal sockets: a largest payload and a largest reply, each in
/// base64, fit with room to spare.
pub const MAX_INTERNAL_LINE_BYTES: usize = 64 * 1024 * 1024;

/// A line that could not be read as text; its bytes were discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum BadLine {
    #[error("line longer than {limit} bytes")]
    TooLong { limit: usize },
    #[error("line that is not UTF-8 text")]
    NotUtf8,
}

/// Splits a byte stream into lines of at most `max` bytes.
#[derive(Debug)]
pub struct JsonLinesCodec {
    lines: LinesCodec,
    max: usize,
}

impl JsonLinesCodec {
    pub fn new(max: usize) -> Self {
        Self {
            lines: LinesCodec::new_with_max_length(max),
            max,
        }
    }
}

impl Default for JsonLinesCodec {
    fn default() -> Self {
        Self::new(MAX_LINE_BYTES)
    }
}

fn into_io(e: LinesCodecError) -> io::Error {
    match e {
        LinesCodecError::Io(e) => e,
        LinesCodecError::MaxLineLengthExceeded => io::Error::other("line too long"),
    }
}

impl JsonLinesCodec {
    /// `LinesCodec` has already consumed a line it reports as too long or not UTF-8, so both
    /// become items and the stream goes on.
    fn item(
        &self,
        decoded: Result<Option<String>, LinesCodecError>,
    ) -> Result<Option<Result<String, BadLine>>, io::Error> {
        match decoded {
            Ok(line) => Ok(line.map(Ok)),
            Err(LinesCodecError::MaxLineLengthExceeded) => {
                Ok(Some(Err(BadLine::TooLong { limit: self.max })))
            }
            Err(LinesCodecError::Io(e)) if e.kind() == io::ErrorKind::InvalidData => {
                Ok(Some(Err(BadLine::NotUtf8)))
            }
            Err(e) => Err(into_io(e)),
        }
    }
}

impl Decoder for JsonLinesCodec {
    type Item = Result<String, BadLine>;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, io::Error> {
        let decoded = self.lines.decode(src);
        self.item(decoded)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, io::Error> {
        let decoded = self.lines.decode_eof(src);
        self.item(decoded)
    }
}

impl<T: AsRef<str>> Encoder<T> for JsonLinesCodec {
    type Error = io::Error;

    fn encode(&mut self, line: T, dst: &mut BytesMut) -> Result<(), io::Error> {
        self.lines.encode(line, dst).map_err(into_io)
    }
}

#[derive(Debug, Error)]
pub enum FrameError {
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    #[error("the other side sent a {0}")]
    BadLine(BadLine),
    #[error("the other side sent a message that is not understood: {0}")]
    Malformed(serde_json::Error),
}

/// A connection carrying typed JSON messages, one per line: `In` is what we read, `Out` what we
/// write. Used for the internal sockets, where both ends are our own code.
pub struct JsonConnection<S> {
    framed: Framed<S, JsonLinesCodec>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> JsonConnection<S> {
    /// A connection on an internal socket (lines up to `MAX_INTERNAL_LINE_BYTES`).
    pub fn new(stream: S) -> Self {
        Self {
            framed: Framed::new(stream, JsonLinesCodec::new(MAX_INTERNAL_LINE_BYTES)),
        }
    }

    pub async fn send<T: Serialize>(&mut self, message: &T) -> Result<(), FrameError> {
        // Serializing our own message types cannot fail: they hold no maps with non-string keys.
        let line = serde_json::to_string(message).map_err(FrameError::Malformed)?;
        self.framed.send(line).await?;
        Ok(())
    }

    /// The next message, or `None` when the other side closed the connection.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match self.framed.next().await {
            None => Ok(None),
            Some(Err(e)) => Err(e.into()),
            Some(Ok(Err(bad))) => Err(FrameError::BadLine(bad)),
            Some(Ok(Ok(line))) => serde_json::from_str(&line)
                .map(Some)
                .map_err(FrameError::Malformed),
        }
    }

    pub fn get_ref(&self) -> &S {
        self.framed.get_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lines_are_items_and_the_next_line_survives() {
        let mut codec = JsonLinesCodec::new(8);
        let mut buf = BytesMut::from(&b"{\"a\":1}\n0123456789abcdef\n\xff\xfe\n{}\n"[..]);
        assert_eq!(
            codec.decode(&mut buf).unwrap(),
            Some(Ok("{\"a\":1}".into()))
        );
        let too_long = Some(Err(BadLine::TooLong { limit: 8 }));
        assert_eq!(codec.decode(&mut buf).unwrap(), too_long);
        let mut next = codec.decode(&mut buf).unwrap();
        while next.is_none() || next == too_long {
            next = codec.decode(&mut buf).unwrap();
        }
        assert_eq!(next, Some(Err(BadLine::NotUtf8)));
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(Ok("{}".into())));
    }

    #[tokio::test]
    async fn typed_messages_round_trip() {
        let (a, b) = tokio::io::duplex(1024);
        let mut a = JsonConnection::new(a);
        let mut b = JsonConnection::new(b);
        a.send(&vec![1, 2, 3]).await.unwrap();
        let got: Option<Vec<u32>> = b.recv().await.unwrap();
        assert_eq!(got, Some(vec![1, 2, 3]));
        drop(a);
        assert!(b.recv::<Vec<u32>>().await.unwrap().is_none());
    }
}
