//! The mesh service's connection to the handler service, opened on first use (under systemd the
//! connect is what starts the handler service) and reopened when the handler service restarted.

use std::path::PathBuf;
use std::time::Duration;

use cnsprcy::framing::{FrameError, JsonConnection};
use cnsprcy::ipc::{FromHandlers, ToHandlers};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

const TIMEOUT: Duration = Duration::from_secs(3);

pub struct HandlersLink {
    socket: PathBuf,
    conn: Mutex<Option<JsonConnection<UnixStream>>>,
}

impl HandlersLink {
    pub fn new(socket: PathBuf) -> Self {
        Self {
            socket,
            conn: Mutex::new(None),
        }
    }

    /// Asks the handler service whether it is there; returns its pid.
    pub async fn ping(&self) -> Result<u32, String> {
        let mut conn = self.conn.lock().await;
        // A kept connection may be to a handler service that has since restarted: on failure,
        // try once more on a fresh connection before reporting the service as away.
        let reused = conn.is_some();
        match self.ping_on(&mut conn).await {
            Ok(pid) => Ok(pid),
            Err(_) if reused => self.ping_on(&mut conn).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn ping_on(
        &self,
        slot: &mut Option<JsonConnection<UnixStream>>,
    ) -> Result<u32, FrameError> {
        let result = tokio::time::timeout(TIMEOUT, async {
            if slot.is_none() {
                let stream = UnixStream::connect(&self.socket).await?;
                *slot = Some(JsonConnection::new(stream));
            }
            // Just filled in above when it was empty.
            let conn = slot.as_mut().expect("connection present");
            conn.send(&ToHandlers::Ping).await?;
            match conn.recv::<FromHandlers>().await? {
                Some(FromHandlers::Pong { pid, .. }) => Ok(pid),
                None => Err(FrameError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the handler service closed the connection",
                ))),
            }
        })
        .await
        .unwrap_or_else(|_| {
            Err(FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the handler service did not answer in time",
            )))
        });
        if result.is_err() {
            *slot = None;
        }
        result
    }
}
