//! A client for the public API socket, used by the CLI.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use nix::sys::socket::{MsgFlags, send};
use serde_json::Value;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

use crate::framing::JsonLinesCodec;
use crate::rpc::{Request, RpcError};

/// How long to wait for the daemon to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum ClientError {
    #[error(
        "cnsprcy is not running: nothing answers at {socket} ({reason}).\nStart it with `cnspr serve` (or `systemctl --user start cnsprcy.target` where the systemd units are installed)"
    )]
    NotRunning { socket: PathBuf, reason: String },
    #[error("the daemon did not answer within {0:?}")]
    Timeout(Duration),
    #[error(
        "cannot connect to {socket}: permission denied; the daemon's socket belongs to another user, or its directory is closed to you"
    )]
    Denied { socket: PathBuf },
    #[error("lost the connection to the daemon")]
    Io(#[from] std::io::Error),
    #[error("the daemon closed the connection without answering")]
    Closed,
    #[error("the daemon sent an answer that is not understood: {0}")]
    BadAnswer(String),
    #[error("{0}")]
    Rpc(RpcError),
}

pub struct Client {
    framed: Framed<NoSigpipe, JsonLinesCodec>,
    next_id: u64,
}

/// The client's socket, whose writes never raise SIGPIPE. `cnspr` restores SIGPIPE's default
/// action (a closed stdout ends it quietly), and a daemon that refuses a connection closes it,
/// maybe before the request is written: that write must fail, so that the refusal is read,
/// instead of killing the process without a word.
struct NoSigpipe(UnixStream);

impl AsyncRead for NoSigpipe {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for NoSigpipe {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let stream = &self.0;
        loop {
            std::task::ready!(stream.poll_write_ready(cx))?;
            let sent = stream.try_io(Interest::WRITABLE, || {
                send(stream.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL).map_err(std::io::Error::from)
            });
            match sent {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // `send` buffers nothing of its own.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Client {
    pub async fn connect(socket: &Path) -> Result<Self, ClientError> {
        let not_running = |reason: String| ClientError::NotRunning {
            socket: socket.to_owned(),
            reason,
        };
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(socket)).await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(ClientError::Denied {
                    socket: socket.to_owned(),
                });
            }
            Ok(Err(e)) => return Err(not_running(e.to_string())),
            Err(_) => return Err(ClientError::Timeout(CONNECT_TIMEOUT)),
        };
        Ok(Self {
            framed: Framed::new(NoSigpipe(stream), JsonLinesCodec::default()),
            next_id: 1,
        })
    }

    /// The next notification (after `subscribe`): its params. `None` when the daemon closed the
    /// connection.
    pub async fn next_notification(&mut self) -> Result<Option<Value>, ClientError> {
        loop {
            let line = match self.framed.next().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Err(bad))) => return Err(ClientError::BadAnswer(bad.to_string())),
                Some(Ok(Ok(line))) => line,
            };
            let value: Value =
                serde_json::from_str(&line).map_err(|e| ClientError::BadAnswer(e.to_string()))?;
            if value.get("method").is_some() {
                return Ok(value.get("params").cloned());
            }
        }
    }

    /// Calls `method` and waits up to `timeout` for its result.
    pub async fn call(
        &mut self,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        self.call_with_notifications(method, params, timeout, |_, _| {})
            .await
    }

    /// Calls `method` and waits up to `timeout` for its result, handing each notification that
    /// arrives before it (such as `send.reply` for a streaming `send`) to `notified` with its
    /// method and params.
    pub async fn call_with_notifications(
        &mut self,
        method: &str,
        params: Value,
        timeout: Duration,
        mut notified: impl FnMut(&str, Value),
    ) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let line = crate::rpc::to_line(&Request::new(id, method, params));
        // A daemon that refuses the connection says why and closes it, possibly before the
        // request is written: read its answer even when writing failed.
        let sent = self.framed.send(line).await;
        let deadline = tokio::time::Instant::now() + timeout;
        let value = loop {
            let answer = tokio::time::timeout_at(deadline, self.framed.next())
                .await
                .map_err(|_| ClientError::Timeout(timeout))?;
            let line = match answer {
                None => return Err(sent.err().map_or(ClientError::Closed, ClientError::Io)),
                Some(Err(e)) => return Err(sent.err().unwrap_or(e).into()),
                Some(Ok(Err(bad))) => return Err(ClientError::BadAnswer(bad.to_string())),
                Some(Ok(Ok(line))) => line,
            };
            let value: Value =
                serde_json::from_str(&line).map_err(|e| ClientError::BadAnswer(e.to_string()))?;
            match value {
                Value::Object(mut note) if note.contains_key("method") => {
                    let method = match note.remove("method") {
                        Some(Value::String(method)) => method,
                        _ => String::new(),
                    };
                    notified(&method, note.remove("params").unwrap_or(Value::Null));
                }
                other => break other,
            }
        };
        // Taken apart by hand rather than through `Response`: a result may be tens of megabytes,
        // and `"result": null` is a result (serde would read it as absent).
        let mut response = match value {
            Value::Object(response) => response,
            other => return Err(ClientError::BadAnswer(format!("not an object: {other}"))),
        };
        if let Some(error) = response.remove("error") {
            let error: RpcError = serde_json::from_value(error)
                .map_err(|e| ClientError::BadAnswer(format!("bad error object: {e}")))?;
            return Err(ClientError::Rpc(error));
        }
        response
            .remove("result")
            .ok_or_else(|| ClientError::BadAnswer("neither result nor error".into()))
    }
}
