//! The mesh service's connection to the handler service, opened on first use (under systemd the
//! connect is what starts the handler service) and reopened when the handler service restarted.
//!
//! One task owns the connection: it writes requests and matches answers to their callers, so
//! many handler runs can be in flight at once and finish in any order.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use cnsprcy::framing::JsonConnection;
use cnsprcy::ipc::{FromHandlers, Run, RunResult, ToHandlers};
use tokio::net::UnixStream;
use tokio::sync::{Mutex, mpsc, oneshot};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const PING_TIMEOUT: Duration = Duration::from_secs(3);

pub struct HandlersLink {
    socket: PathBuf,
    conn: Mutex<Option<Conn>>,
}

/// The open connection, as callers see it.
#[derive(Clone)]
struct Conn {
    requests: mpsc::Sender<Pending>,
}

/// A request with the way to answer its caller.
enum Pending {
    Ping(oneshot::Sender<u32>),
    Run(Box<Run>, Caller),
}

impl HandlersLink {
    pub fn new(socket: PathBuf) -> Self {
        Self {
            socket,
            conn: Mutex::new(None),
        }
    }

    /// The open connection, connecting first if there is none (or the last one died).
    async fn conn(&self) -> Result<Conn, String> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref()
            && !conn.requests.is_closed()
        {
            return Ok(conn.clone());
        }
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(&self.socket))
            .await
            .map_err(|_| "the handler service did not accept a connection in time".to_owned())?
            .map_err(|e| format!("cannot reach the handler service: {e}"))?;
        let (requests, rx) = mpsc::channel(256);
        tokio::spawn(own_connection(JsonConnection::new(stream), rx));
        let conn = Conn { requests };
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Asks the handler service whether it is there; returns its pid. A kept connection may be
    /// to a handler service that has since restarted: on failure, try once more afresh.
    pub async fn ping(&self) -> Result<u32, String> {
        match self.ping_once().await {
            Ok(pid) => Ok(pid),
            Err(_) => self.ping_once().await,
        }
    }

    async fn ping_once(&self) -> Result<u32, String> {
        let conn = self.conn().await?;
        let (tx, rx) = oneshot::channel();
        conn.requests
            .send(Pending::Ping(tx))
            .await
            .map_err(|_| "the handler service connection closed".to_owned())?;
        match tokio::time::timeout(PING_TIMEOUT, rx).await {
            Ok(Ok(pid)) => Ok(pid),
            Ok(Err(_)) => Err("the handler service connection closed".into()),
            Err(_) => Err("the handler service did not answer in time".into()),
        }
    }

    /// Has the handler service run `run` and waits for the result; `started` hears when the
    /// handler process started. The run is handed over at most once: if the connection breaks
    /// afterwards, the result is lost, not the run repeated. An error: the run did not end with
    /// a result (the service could not be reached, the connection broke, or the service was
    /// stopping and did not start it).
    pub async fn run(
        &self,
        run: Run,
        started: Option<oneshot::Sender<()>>,
    ) -> Result<RunResult, String> {
        let mut run = run;
        run.report_start = started.is_some();
        let conn = self.conn().await?;
        let (tx, rx) = oneshot::channel();
        conn.requests
            .send(Pending::Run(Box::new(run), Caller { started, done: tx }))
            .await
            .map_err(|_| "the handler service connection closed".to_owned())?;
        rx.await
            .map_err(|_| "lost the connection to the handler service during the run".to_owned())?
    }
}

/// Who waits for a run: to hear that it started, and its result (or why it did not start).
struct Caller {
    started: Option<oneshot::Sender<()>>,
    done: oneshot::Sender<Result<RunResult, String>>,
}

/// Writes requests, reads answers, and hands each answer to its caller; ends when either side
/// closes. Dropping the callers' senders tells them the connection is gone.
async fn own_connection(
    mut conn: JsonConnection<UnixStream>,
    mut requests: mpsc::Receiver<Pending>,
) {
    let mut next_run_id = 0u64;
    let mut runs: HashMap<u64, Caller> = HashMap::new();
    let mut pings: VecDeque<oneshot::Sender<u32>> = VecDeque::new();
    loop {
        tokio::select! {
            request = requests.recv() => {
                let Some(request) = request else { return };
                let message = match request {
                    Pending::Ping(tx) => {
                        pings.push_back(tx);
                        ToHandlers::Ping
                    }
                    Pending::Run(mut run, caller) => {
                        next_run_id += 1;
                        run.run_id = next_run_id;
                        runs.insert(next_run_id, caller);
                        ToHandlers::Run(run)
                    }
                };
                if let Err(e) = conn.send(&message).await {
                    tracing::warn!("lost the connection to the handler service: {e}");
                    return;
                }
            }
            answer = conn.recv::<FromHandlers>() => match answer {
                Ok(Some(FromHandlers::Pong { pid, .. })) => {
                    if let Some(tx) = pings.pop_front() {
                        let _ = tx.send(pid);
                    }
                }
                Ok(Some(FromHandlers::Started { run_id })) => {
                    if let Some(started) = runs.get_mut(&run_id).and_then(|c| c.started.take()) {
                        let _ = started.send(());
                    }
                }
                Ok(Some(FromHandlers::Done { run_id, result })) => {
                    if let Some(caller) = runs.remove(&run_id) {
                        let _ = caller.done.send(Ok(result));
                    }
                }
                Ok(Some(FromHandlers::NotStarted { run_id, reason })) => {
                    if let Some(caller) = runs.remove(&run_id) {
                        let _ = caller.done.send(Err(reason));
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!("bad answer from the handler service: {e}");
                    return;
                }
            },
        }
    }
}
