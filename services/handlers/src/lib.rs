//! The handler service: listens on `handlers.sock` for the mesh service and runs the handler
//! programs of tagged messages and built-in events (`docs/event_handlers.md`).
//!
//! One connection carries many runs at once, answered in any order. Reading and writing are
//! independent tasks, because the mesh service may be writing a large run while a result is on
//! its way back. Runs go through a scheduler: a limited number at once, those of one sender and
//! tag in order, everything else alongside.

pub mod allow;
#[cfg(test)]
mod fuzz;
pub mod resolve;
pub mod runner;
pub mod safe_open;
pub mod scan;
pub mod sched;
mod spawn;
mod started;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cnsprcy::env::DeviceEnv;
use cnsprcy::framing::{BadLine, JsonLinesCodec, MAX_INTERNAL_LINE_BYTES};
use cnsprcy::ipc::{
    EVENT_MESSAGE, FromHandlers, MAX_PAYLOAD_BYTES, Outcome, Run, RunResult, ToHandlers,
};
use cnsprcy::service::Running;
use cnsprcy::sockets::{Listening, check_peer_uid, listen};
use futures_util::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf, SocketAddr};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use scan::{Report, scan};

use crate::resolve::{Resolution, resolve};
use crate::sched::{Admit, Limits, Scheduler};
use crate::started::Started;

/// Runs waiting behind one sender and tag; more means the sender floods that tag.
const MAX_QUEUED_PER_KEY: usize = 64;
/// Payload bytes held by waiting runs: sixteen largest payloads.
const MAX_QUEUED_BYTES: usize = 16 * MAX_PAYLOAD_BYTES;
/// Answers waiting to be written to one connection.
const WRITE_QUEUE: usize = 256;
/// After the stop signal, how long the service still serves, so the mesh service can have the
/// `daemon-stop` handler run and running handlers can finish. Then what still runs is killed.
/// With `runner::KILL_GRACE` it stays within `cnsprcy::service::SHUTDOWN_GRACE`.
pub const STOP_GRACE: Duration = Duration::from_secs(2);
/// The one event that still starts after the stop signal.
const STOP_EVENT: &str = "daemon-stop";
/// At the end, how long one answer may take to write before the connection is given up.
const FLUSH_GRACE: Duration = Duration::from_millis(500);
/// The environment variable of peer events that names the peer (it orders their runs).
const PEER_ENV: &str = "CNSPRCY_PEER";
/// Under a burst, runs refused for a full queue are logged once per this interval, with a count.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Binds `handlers.sock` and starts serving it. Returns once the socket accepts connections.
pub async fn start(env: DeviceEnv, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let socket = env.paths.handlers_socket();
    // Under systemd the socket comes from cnsprcy-handlers.socket.
    let listener = listen("handlers", &socket)?;
    let config = &env.config.handlers;
    tracing::info!(
        socket = %socket.display(),
        handlers_dir = %env.paths.handlers_dir.display(),
        timeout = %secs_text(config.timeout),
        max_running = config.max_running.get(),
        "handler service ready"
    );
    let shared = Arc::new(Shared {
        handlers_dir: env.paths.handlers_dir.clone(),
        timeout: config.timeout,
        state: Mutex::new(State {
            scheduler: Scheduler::new(Limits {
                max_running: config.max_running.get(),
                max_queued: config.max_queued,
                max_queued_per_key: MAX_QUEUED_PER_KEY,
                max_queued_bytes: MAX_QUEUED_BYTES,
            }),
            stopping: false,
            connections: 0,
        }),
        tasks: TaskTracker::new(),
        kill: CancellationToken::new(),
        queue_full_log: Mutex::new(Throttle::new(REFUSAL_LOG_INTERVAL)),
        started: Mutex::new(Started::open(&env.paths.runtime_dir.join(started::FILE))),
    });
    if listener.activated {
        tokio::spawn(exit_when_idle(
            shared.clone(),
            config.idle_exit,
            shutdown.clone(),
        ));
    }
    Ok(cnsprcy::service::spawn(serve(
        shared, socket, listener, shutdown,
    )))
}

/// Under socket activation, ends the service after `idle` without runs: systemd keeps the
/// socket and starts the service again for the next message, so an idle device runs one
/// process fewer.
async fn exit_when_idle(shared: Arc<Shared>, idle: Duration, shutdown: CancellationToken) {
    let step = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut busy_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(step) => {}
        }
        let busy = {
            let state = shared.state();
            state.scheduler.running() > 0 || state.scheduler.queued() > 0
        };
        if busy {
            busy_at = tokio::time::Instant::now();
        } else if busy_at.elapsed() >= idle {
            tracing::info!(
                "idle for {}; exiting until the next message",
                secs_text(idle)
            );
            shutdown.cancel();
            return;
        }
    }
}

fn secs_text(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// What the runs of one key have in common: they run one at a time, in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    /// Messages of one tag from one sender ("" for a message without one).
    Message { sender: String, tag: String },
    /// Built-in events about one peer ("" for the daemon's own), so that a peer's up, address
    /// change and down reach the handlers in the order they happened.
    Event { peer: String },
}

fn key_of(run: &Run) -> Key {
    if run.event == EVENT_MESSAGE {
        Key::Message {
            sender: run.from.as_ref().map(|f| f.id.clone()).unwrap_or_default(),
            tag: run.tag.clone(),
        }
    } else {
        let peer = run
            .env
            .iter()
            .find(|(k, _)| k == PEER_ENV)
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        Key::Event { peer }
    }
}

/// A run with the way back to its connection.
struct Job {
    run: Run,
    reply: mpsc::Sender<FromHandlers>,
}

struct State {
    scheduler: Scheduler<Key, Job>,
    /// The service is stopping: only `daemon-stop` still starts.
    stopping: bool,
    /// Open connections, to know when stopping can end early.
    connections: usize,
}

struct Shared {
    handlers_dir: PathBuf,
    timeout: Duration,
    state: Mutex<State>,
    tasks: TaskTracker,
    /// Fires at the end of the stop grace: running handlers are killed, connections closed.
    kill: CancellationToken,
    /// The warnings about runs refused for a full queue.
    queue_full_log: Mutex<Throttle>,
    /// The messages whose handler started. Its appends go to the runtime directory, a tmpfs:
    /// quick enough to make under the lock, on the runtime's threads.
    started: Mutex<Started>,
}

impl Shared {
    /// The state is plain bookkeeping, consistent after every call, so a panic elsewhere while
    /// it was locked leaves nothing half-done: a poisoned lock is used as it is.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A set and its file; an append cut short by a panic is a line no ID matches.
    fn started(&self) -> MutexGuard<'_, Started> {
        self.started.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Plain counting, like `state`.
    fn queue_full_log(&self) -> MutexGuard<'_, Throttle> {
        self.queue_full_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// Holds back repeated log lines: the first is written, those within the next `interval` are
/// counted, and the count is written when the interval ends. A burst of thousands of refusals so
/// makes one line per interval, not one each.
#[derive(Debug)]
struct Throttle {
    interval: Duration,
    /// Lines are held back until then.
    quiet_until: Option<Instant>,
    held: u64,
}

/// What to do with one more line.
#[derive(Debug, PartialEq, Eq)]
enum Note {
    /// Write it, saying how many were held back before it (if the count was not written yet).
    Write { held_before: u64 },
    /// It was counted. `flush_at`: the first one held since the last line; write the count then.
    Held { flush_at: Option<Instant> },
}

impl Throttle {
    fn new(interval: Duration) -> Self {
        Self {
            interval,
            quiet_until: None,
            held: 0,
        }
    }

    fn note(&mut self, now: Instant) -> Note {
        match self.quiet_until {
            Some(until) if now < until => {
                self.held += 1;
                Note::Held {
                    flush_at: (self.held == 1).then_some(until),
                }
            }
            _ => {
                self.quiet_until = Some(now + self.interval);
                Note::Write {
                    held_before: std::mem::take(&mut self.held),
                }
            }
        }
    }

    /// The count held back, to be written now; a burst that goes on is counted for another
    /// interval.
    fn flush(&mut self, now: Instant) -> u64 {
        let held = std::mem::take(&mut self.held);
        if held > 0 {
            self.quiet_until = Some(now + self.interval);
        }
        held
    }
}

async fn serve(
    shared: Arc<Shared>,
    socket: PathBuf,
    listener: Listening,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.listener.accept() => accept(&shared, accepted).await,
        }
    }
    // Runs that have not started are answered now. Running ones, and a `daemon-stop` the mesh
    // service may still send, get the stop grace; it ends early once every connection closed
    // and nothing runs.
    let waiting = {
        let mut state = shared.state();
        state.stopping = true;
        state.scheduler.drain()
    };
    if !waiting.is_empty() {
        tracing::info!(
            "{} waiting handler runs not started: shutting down",
            waiting.len()
        );
    }
    for job in waiting {
        not_started(&shared, job);
    }
    let grace = tokio::time::sleep(STOP_GRACE);
    tokio::pin!(grace);
    let mut idle_check = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = &mut grace => break,
            accepted = listener.listener.accept() => accept(&shared, accepted).await,
            _ = idle_check.tick() => {
                let state = shared.state();
                if state.connections == 0 && state.scheduler.running() == 0 {
                    break;
                }
            }
        }
    }
    listener.remove_file(&socket);
    drop(listener);
    let running = shared.state().scheduler.running();
    if running > 0 {
        tracing::info!("stopping {running} running handlers");
    }
    shared.kill.cancel();
    shared.tasks.close();
    shared.tasks.wait().await;
    tracing::info!("handler service stopped");
    Ok(())
}

async fn accept(shared: &Arc<Shared>, accepted: std::io::Result<(UnixStream, SocketAddr)>) {
    match accepted {
        Ok((stream, _)) => {
            shared
                .tasks
                .spawn(serve_connection(shared.clone(), stream).in_current_span());
        }
        Err(e) => {
            tracing::warn!("cannot accept on the handler socket: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn serve_connection(shared: Arc<Shared>, stream: UnixStream) {
    if let Err(reason) = check_peer_uid(&stream) {
        tracing::warn!("handler socket: {reason}");
        return;
    }
    let (read, write) = stream.into_split();
    let (tx, rx) = mpsc::channel(WRITE_QUEUE);
    shared
        .tasks
        .spawn(write_answers(write, rx, shared.kill.clone()).in_current_span());
    shared.state().connections += 1;
    read_requests(&shared, read, tx).await;
    shared.state().connections -= 1;
}

/// Reads requests until the other side closes or the service stops. Never waits for a run:
/// runs are handed to the scheduler, and their answers go out through `tx`.
async fn read_requests(shared: &Arc<Shared>, read: OwnedReadHalf, tx: mpsc::Sender<FromHandlers>) {
    let mut lines = FramedRead::new(read, JsonLinesCodec::new(MAX_INTERNAL_LINE_BYTES));
    loop {
        let line = tokio::select! {
            _ = shared.kill.cancelled() => return,
            line = lines.next() => line,
        };
        let line = match line {
            None => return,
            Some(Err(e)) => {
                tracing::warn!("handler socket: {e}");
                return;
            }
            // The line was skipped whole; the connection goes on. Its run (if it was one) cannot
            // be answered, since its id is unknown.
            Some(Ok(Err(bad @ BadLine::TooLong { .. })))
            | Some(Ok(Err(bad @ BadLine::NotUtf8))) => {
                tracing::warn!("handler socket: skipped a {bad} from the mesh service");
                continue;
            }
            Some(Ok(Ok(line))) => line,
        };
        match serde_json::from_str::<ToHandlers>(&line) {
            Ok(ToHandlers::Ping) => {
                let pong = FromHandlers::Pong {
                    pid: std::process::id(),
                    version: cnsprcy::VERSION.to_owned(),
                };
                if tx.send(pong).await.is_err() {
                    return;
                }
            }
            Ok(ToHandlers::Run(run)) => submit(shared, *run, tx.clone()),
            Err(e) => {
                // A run this version cannot read still gets an answer, so its sender does not
                // wait forever: the id is usually readable even when the rest is not.
                let run_id = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v.get("run_id").and_then(|id| id.as_u64()));
                tracing::warn!(
                    ?run_id,
                    "handler socket: a request that is not understood: {e}"
                );
                if let Some(run_id) = run_id {
                    let result = failed(
                        None,
                        &format!("the handler service did not understand the run: {e}"),
                    );
                    answer(shared, tx.clone(), run_id, result);
                }
            }
        }
    }
}

/// Writes answers until every sender is gone (the reader and all runs of the connection ended).
/// After the stop grace, an answer the other side does not take within `FLUSH_GRACE` ends it.
async fn write_answers(
    write: OwnedWriteHalf,
    mut rx: mpsc::Receiver<FromHandlers>,
    kill: CancellationToken,
) {
    let mut sink = FramedWrite::new(write, JsonLinesCodec::new(MAX_INTERNAL_LINE_BYTES));
    while let Some(message) = rx.recv().await {
        let line = match serde_json::to_string(&message) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!("cannot encode an answer: {e}");
                continue;
            }
        };
        let give_up = async {
            kill.cancelled().await;
            tokio::time::sleep(FLUSH_GRACE).await;
        };
        let written = tokio::select! {
            written = sink.send(line) => written.map_err(|e| e.to_string()),
            _ = give_up => Err("the mesh service did not take the answer in time".into()),
        };
        if let Err(e) = written {
            tracing::warn!("handler socket: cannot write an answer: {e}");
            // Dropping the receiver makes the runs' answers fail fast instead of piling up.
            return;
        }
    }
}

fn failed(handler: Option<String>, reason: &str) -> RunResult {
    RunResult {
        handler,
        outcome: Outcome::Failed {
            reason: reason.to_owned(),
        },
        stdout: Vec::new(),
        duration_ms: 0,
    }
}

/// Sends the answer of `run_id` without making the caller wait for the connection's writer.
fn answer(shared: &Shared, reply: mpsc::Sender<FromHandlers>, run_id: u64, result: RunResult) {
    shared.tasks.spawn(async move {
        // The connection may be gone; the result is then lost, as the mesh service expects.
        let _ = reply.send(FromHandlers::Done { run_id, result }).await;
    });
}

/// Answers a run that was not started because the service is stopping. A mesh service that
/// asked for `Started` learns it apart from a result: it keeps the message and runs it later.
fn not_started(shared: &Shared, job: Job) {
    let run_id = job.run.run_id;
    if job.run.report_start {
        let reason = NOT_STARTED.to_owned();
        shared.tasks.spawn(async move {
            let _ = job
                .reply
                .send(FromHandlers::NotStarted { run_id, reason })
                .await;
        });
    } else {
        answer(shared, job.reply, run_id, failed(None, NOT_STARTED));
    }
}

/// Hands a run to the scheduler: it starts now, waits, or is answered at once.
fn submit(shared: &Arc<Shared>, run: Run, reply: mpsc::Sender<FromHandlers>) {
    let run_id = run.run_id;
    if run.payload.len() > MAX_PAYLOAD_BYTES {
        let reason = format!(
            "the payload is {} bytes; the limit is {MAX_PAYLOAD_BYTES}",
            run.payload.len()
        );
        tracing::warn!(tag = %run.tag, "run refused: {reason}");
        return answer(shared, reply, run_id, failed(None, &reason));
    }
    let key = key_of(&run);
    let bytes = run.payload.len();
    let tag = run.tag.clone();
    let admitted = {
        let mut state = shared.state();
        if state.stopping && run.event != STOP_EVENT {
            Err(Job { run, reply })
        } else {
            Ok(state
                .scheduler
                .submit(key.clone(), Job { run, reply }, bytes))
        }
    };
    let admitted = match admitted {
        Ok(admitted) => admitted,
        Err(job) => {
            tracing::debug!(%tag, "run not started: the service is stopping");
            return not_started(shared, job);
        }
    };
    match admitted {
        Admit::Start(job) => start_job(shared.clone(), key, job),
        Admit::Queued => tracing::debug!(%tag, "run queued"),
        Admit::Full(job, reason) => refuse_full(shared, job, reason),
    }
}

/// Answers a run that did not fit the queue. One that has no handler (most built-in events: a
/// store write or a peer change raises one whether a handler wants it or not) is answered "no
/// handler", as it would have been when run: nothing is lost, so nothing is logged. The others
/// are refused, with a warning that a burst does not turn into thousands of lines.
fn refuse_full(shared: &Arc<Shared>, job: Job, reason: String) {
    let shared = shared.clone();
    let tasks = shared.tasks.clone();
    tasks.spawn(
        async move {
            let run = &job.run;
            let root = shared.handlers_dir.clone();
            let (event, tag) = (run.event.clone(), run.tag.clone());
            // A directory listing or two; like `resolve`, not on the runtime's threads.
            let has_candidate = tokio::task::spawn_blocking(move || {
                resolve::has_candidate(&root, &event, &tag)
            })
            .await
            .unwrap_or(true);
            let result = if has_candidate {
                warn_queue_full(&shared, &run.tag, &reason);
                failed(None, &reason)
            } else {
                tracing::debug!(tag = %run.tag, event = %run.event, "no handler (the queue was full)");
                RunResult {
                    handler: None,
                    outcome: Outcome::NoHandler,
                    stdout: Vec::new(),
                    duration_ms: 0,
                }
            };
            // The connection may be gone; the result is then lost, as the mesh service expects.
            let _ = job
                .reply
                .send(FromHandlers::Done {
                    run_id: run.run_id,
                    result,
                })
                .await;
        }
        .in_current_span(),
    );
}

/// Logs a refusal for a full queue, through the throttle.
fn warn_queue_full(shared: &Arc<Shared>, tag: &str, reason: &str) {
    let note = shared.queue_full_log().note(Instant::now());
    match note {
        Note::Write { held_before: 0 } => tracing::warn!(%tag, "run not accepted: {reason}"),
        Note::Write { held_before } => tracing::warn!(
            %tag,
            "run not accepted: {reason} (and {held_before} more before it, not logged one by one)"
        ),
        Note::Held { flush_at: None } => {}
        Note::Held { flush_at: Some(at) } => {
            let flusher = shared.clone();
            shared.tasks.spawn(
                async move {
                    // At the stop, the count is written at once: the service does not wait.
                    tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => {}
                        _ = flusher.kill.cancelled() => {}
                    }
                    let held = flusher.queue_full_log().flush(Instant::now());
                    if held > 0 {
                        tracing::warn!(
                            "{held} more runs not accepted in the last {}: handler queue full",
                            secs_text(REFUSAL_LOG_INTERVAL)
                        );
                    }
                }
                .in_current_span(),
            );
        }
    }
}

/// Runs `job` in a task of its own; when it ends, starts what the scheduler lets start next.
fn start_job(shared: Arc<Shared>, key: Key, mut job: Job) {
    let tasks = shared.tasks.clone();
    tasks.spawn(
        async move {
            if shared.kill.is_cancelled() {
                let next = shared.state().scheduler.finish(&key);
                for (key, job) in next {
                    start_job(shared.clone(), key, job);
                }
                return not_started(&shared, job);
            }
            // Moved, not copied: up to 16 MiB per run.
            let payload = std::mem::take(&mut job.run.payload);
            let (reply, run_id, tasks) = (job.reply.clone(), job.run.run_id, shared.tasks.clone());
            let report_start = job.run.report_start;
            let started = move || {
                if report_start {
                    tasks.spawn(async move {
                        let _ = reply.send(FromHandlers::Started { run_id }).await;
                    });
                }
            };
            let result = execute(&shared, &job.run, payload, started).await;
            let next = shared.state().scheduler.finish(&key);
            for (key, job) in next {
                start_job(shared.clone(), key, job);
            }
            let _ = job
                .reply
                .send(FromHandlers::Done {
                    run_id: job.run.run_id,
                    result,
                })
                .await;
        }
        .in_current_span(),
    );
}

const NOT_STARTED: &str = "the handler service is stopping; the run was not started";

/// Finds the handler, checks it and the sender, and runs it.
/// `on_start` is called once the handler process started.
async fn execute(
    shared: &Shared,
    run: &Run,
    payload: Vec<u8>,
    on_start: impl FnOnce(),
) -> RunResult {
    let started = Instant::now();
    let root = shared.handlers_dir.clone();
    let (event, tag) = (run.event.clone(), run.tag.clone());
    // A few stat and readdir calls, but on a hung network home directory they could block: not
    // on the runtime's threads.
    let resolution = tokio::task::spawn_blocking(move || resolve(&root, &event, &tag))
        .await
        .unwrap_or_else(|e| Resolution::Refused {
            handler: None,
            reason: format!("looking up the handler failed: {e}"),
        });
    let what = if run.event == EVENT_MESSAGE {
        format!("tag {}", run.tag)
    } else {
        format!("event {}", run.event)
    };
    let quick = |handler: Option<String>, outcome: Outcome| RunResult {
        handler,
        outcome,
        stdout: Vec::new(),
        duration_ms: started.elapsed().as_millis() as u64,
    };
    let handler = match resolution {
        Resolution::Found(handler) => handler,
        Resolution::NoHandler => {
            // A message without a handler is worth a line; a built-in event without one is the
            // usual case (every peer change and store write raises one).
            if run.event == cnsprcy::ipc::EVENT_MESSAGE {
                tracing::info!(tag = %run.tag, "no handler for {what}");
            } else {
                tracing::debug!(tag = %run.tag, "no handler for {what}");
            }
            return quick(None, Outcome::NoHandler);
        }
        Resolution::Refused { handler, reason } => {
            tracing::warn!(
                handler = handler.as_deref().unwrap_or("-"),
                tag = %run.tag,
                handlers_dir = %shared.handlers_dir.display(),
                "handler for {what} refused: {reason}"
            );
            return quick(handler, Outcome::Refused { reason });
        }
    };
    if let Err(reason) = handler.allows(run.from.as_ref()) {
        tracing::warn!(handler = %handler.rel, tag = %run.tag, "handler for {what} refused: {reason}");
        return quick(Some(handler.rel), Outcome::Refused { reason });
    }
    tracing::debug!(handler = %handler.rel, tag = %run.tag, kind = handler.kind.describe(), "running the handler for {what}");
    // A mesh service that asks for `Started` keeps the message until it hears it, and may ask
    // again after a restart.
    let mut start_note = None;
    if let Some(id) = run.message_id.as_deref().filter(|_| run.report_start) {
        let mut started = shared.started();
        if started.contains(id) {
            // Started before this service or the mesh service was restarted, which did not hear
            // of it in time and asks again.
            drop(started);
            tracing::warn!(handler = %handler.rel, tag = %run.tag, id, "the handler of this message started before the last restart; not run again");
            return quick(
                Some(handler.rel),
                Outcome::Failed {
                    reason: "the handler started before cnsprcy was restarted; it is not run \
                             again, and its result is lost"
                        .into(),
                },
            );
        }
        match started.record(id) {
            Ok(note) => start_note = Some(Arc::new(note)),
            Err(e) => tracing::warn!(
                id,
                "cannot record that a handler starts (after a crash it may run again): {e}"
            ),
        }
    }
    let spec = runner::Spec {
        env: handler_env(run, &handler.rel, &handler.path),
        program: handler.file.fd.clone(),
        script: handler.file.format == safe_open::Format::Script,
        path: handler.path,
        dir: handler.dir,
        name: handler.rel.clone(),
        tag: run.tag.clone(),
        payload,
        timeout: shared.timeout,
        note: start_note,
    };
    let finished = runner::run(spec, &shared.kill, on_start).await;
    RunResult {
        handler: Some(handler.rel),
        outcome: finished.outcome,
        stdout: finished.stdout,
        duration_ms: finished.duration.as_millis() as u64,
    }
}

/// The variables a handler gets on top of the service's own environment: the run's extra ones
/// first, then those that describe the run (which they may not override).
fn handler_env(run: &Run, handler: &str, path: &Path) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for (name, value) in &run.env {
        if is_env_name(name) && !value.contains('\0') {
            env.push((name.clone(), value.clone()));
        } else {
            tracing::warn!(tag = %run.tag, "not passing the variable {name:?} to the handler: not a valid name or value");
        }
    }
    let from = run.from.as_ref();
    let handler_path = path.to_string_lossy();
    let own = [
        ("CNSPRCY_EVENT", run.event.as_str()),
        ("CNSPRCY_TAG", run.tag.as_str()),
        ("CNSPRCY_FROM", from.map_or("", |f| f.name.as_str())),
        ("CNSPRCY_FROM_ID", from.map_or("", |f| f.id.as_str())),
        (
            "CNSPRCY_MESSAGE_ID",
            run.message_id.as_deref().unwrap_or(""),
        ),
        ("CNSPRCY_DEVICE", run.device.as_str()),
        ("CNSPRCY_HANDLER", handler),
        // A script's $0 is /dev/fd/N (it runs from the descriptor that was checked).
        ("CNSPRCY_HANDLER_PATH", handler_path.as_ref()),
    ];
    for (name, value) in own {
        // A NUL cannot be passed in the environment; such a value (from a broken peer) is
        // dropped rather than failing the run.
        let value = if value.contains('\0') { "" } else { value };
        env.push((name.to_owned(), value.to_owned()));
    }
    env
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnsprcy::ipc::Sender;
    use std::os::unix::fs::PermissionsExt;

    fn run(event: &str, tag: &str) -> Run {
        Run {
            run_id: 1,
            event: event.into(),
            tag: tag.into(),
            from: Some(Sender {
                name: "laptop".into(),
                id: "aaaa-bbbb-cccc-dddd".into(),
            }),
            message_id: Some("m1".into()),
            device: "desk".into(),
            env: vec![
                ("CNSPRCY_TAG".into(), "spoofed".into()),
                ("EXTRA".into(), "1".into()),
                ("BAD=NAME".into(), "x".into()),
            ],
            payload: Vec::new(),
            report_start: false,
        }
    }

    #[test]
    fn environment_describes_the_run_and_cannot_be_spoofed() {
        let env = handler_env(
            &run(EVENT_MESSAGE, "clipboard/set"),
            "clipboard/set.sh",
            Path::new("/h/clipboard/set.sh"),
        );
        let get = |name: &str| {
            env.iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("CNSPRCY_TAG"), Some("clipboard/set"));
        assert_eq!(get("CNSPRCY_FROM"), Some("laptop"));
        assert_eq!(get("CNSPRCY_FROM_ID"), Some("aaaa-bbbb-cccc-dddd"));
        assert_eq!(get("CNSPRCY_MESSAGE_ID"), Some("m1"));
        assert_eq!(get("CNSPRCY_DEVICE"), Some("desk"));
        assert_eq!(get("CNSPRCY_EVENT"), Some("message"));
        assert_eq!(get("CNSPRCY_HANDLER"), Some("clipboard/set.sh"));
        assert_eq!(get("CNSPRCY_HANDLER_PATH"), Some("/h/clipboard/set.sh"));
        assert_eq!(get("EXTRA"), Some("1"));
        assert_eq!(get("BAD=NAME"), None);
    }

    #[test]
    fn keys_order_by_sender_and_tag_and_events_by_peer() {
        let a = run(EVENT_MESSAGE, "a");
        let mut b = run(EVENT_MESSAGE, "a");
        assert_eq!(key_of(&a), key_of(&b));
        b.from.as_mut().unwrap().id = "other".into();
        assert_ne!(key_of(&a), key_of(&b));
        let mut up = run("peer-up", "peer-up");
        up.env = vec![(PEER_ENV.into(), "phone".into())];
        let mut down = run("peer-down", "peer-down");
        down.env = vec![(PEER_ENV.into(), "phone".into())];
        assert_eq!(key_of(&up), key_of(&down));
        assert_eq!(
            key_of(&up),
            Key::Event {
                peer: "phone".into()
            }
        );
    }

    #[test]
    fn a_burst_of_refusals_makes_one_line_per_interval() {
        let second = Duration::from_secs(1);
        let mut throttle = Throttle::new(5 * second);
        let t0 = Instant::now();
        assert_eq!(throttle.note(t0), Note::Write { held_before: 0 });
        assert_eq!(
            throttle.note(t0 + second),
            Note::Held {
                flush_at: Some(t0 + 5 * second)
            }
        );
        for i in 0..600 {
            assert_eq!(
                throttle.note(t0 + second + Duration::from_millis(i)),
                Note::Held { flush_at: None }
            );
        }
        // At the end of the interval, the count of all held back since the first line.
        assert_eq!(throttle.flush(t0 + 5 * second), 601);
        // The burst goes on: counted for another interval, then written as one count.
        assert_eq!(
            throttle.note(t0 + 6 * second),
            Note::Held {
                flush_at: Some(t0 + 10 * second)
            }
        );
        assert_eq!(throttle.flush(t0 + 10 * second), 1);
        // Quiet for a while: the next one is written at once.
        assert_eq!(throttle.flush(t0 + 15 * second), 0);
        assert_eq!(
            throttle.note(t0 + 20 * second),
            Note::Write { held_before: 0 }
        );
        // A line written before a late count says what it held back.
        throttle.note(t0 + 21 * second);
        assert_eq!(
            throttle.note(t0 + 26 * second),
            Note::Write { held_before: 1 }
        );
    }

    fn test_shared(root: &Path, max_queued: usize) -> Arc<Shared> {
        Arc::new(Shared {
            handlers_dir: root.to_owned(),
            timeout: Duration::from_secs(10),
            state: Mutex::new(State {
                scheduler: Scheduler::new(Limits {
                    max_running: 1,
                    max_queued,
                    max_queued_per_key: MAX_QUEUED_PER_KEY,
                    max_queued_bytes: MAX_QUEUED_BYTES,
                }),
                stopping: false,
                connections: 0,
            }),
            tasks: TaskTracker::new(),
            kill: CancellationToken::new(),
            queue_full_log: Mutex::new(Throttle::new(REFUSAL_LOG_INTERVAL)),
            started: Mutex::new(Started::open(&root.join(started::FILE))),
        })
    }

    /// Submits `count` store-change events at once; returns their outcomes.
    async fn store_change_burst(shared: &Arc<Shared>, count: u64) -> Vec<Outcome> {
        let (tx, mut rx) = mpsc::channel(16);
        for run_id in 0..count {
            let mut event = run("store-change", "store-change");
            event.run_id = run_id;
            event.from = None;
            submit(shared, event, tx.clone());
        }
        drop(tx);
        let mut outcomes = Vec::new();
        while let Some(FromHandlers::Done { result, .. }) = rx.recv().await {
            outcomes.push(result.outcome);
        }
        outcomes
    }

    #[tokio::test]
    async fn an_event_without_handler_is_never_refused_for_a_full_queue() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = test_shared(tmp.path(), 0);
        let outcomes = store_change_burst(&shared, 200).await;
        assert_eq!(outcomes.len(), 200);
        assert!(
            outcomes.iter().all(|o| *o == Outcome::NoHandler),
            "{outcomes:?}"
        );
        // Nothing was refused, so nothing was logged.
        let log = shared.queue_full_log();
        assert_eq!((log.quiet_until, log.held), (None, 0));
    }

    #[tokio::test]
    async fn refusals_of_an_event_with_a_handler_are_counted_not_logged_each() {
        let tmp = tempfile::tempdir().unwrap();
        let events = tmp.path().join("_events");
        std::fs::create_dir(&events).unwrap();
        let script = events.join("store-change");
        std::fs::write(&script, "#!/bin/sh\nsleep 0.3\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).unwrap();
        let shared = test_shared(tmp.path(), 0);
        let outcomes = store_change_burst(&shared, 100).await;
        assert_eq!(outcomes.len(), 100);
        let full = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Failed { reason } if reason.contains("handler queue full")))
            .count();
        assert!(
            outcomes.contains(&Outcome::Exited { code: 0 }),
            "{outcomes:?}"
        );
        assert_eq!(full, 99, "{outcomes:?}");
        // One line written, the other 98 held for the count.
        assert_eq!(shared.queue_full_log().held, 98);
        shared.kill.cancel();
        shared.tasks.close();
        shared.tasks.wait().await;
        assert_eq!(shared.queue_full_log().held, 0);
    }

    /// Check and use are one object: once the handler is opened and checked, replacing what is
    /// at its path does not change what runs.
    #[tokio::test]
    async fn the_checked_file_runs_even_when_its_path_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700)).unwrap();
        let write = |name: &str, text: &str| {
            std::fs::write(root.join(name), text).unwrap();
            std::fs::set_permissions(root.join(name), std::fs::Permissions::from_mode(0o700))
                .unwrap();
        };
        write(
            "h",
            "#!/bin/sh\necho \"checked $0 $CNSPRCY_HANDLER_PATH\"\n",
        );
        let Resolution::Found(handler) = resolve(root, EVENT_MESSAGE, "h") else {
            panic!("no handler")
        };
        // Another file put in its place, and then a link to yet another one.
        write("other", "#!/bin/sh\necho swapped\n");
        std::fs::rename(root.join("other"), root.join("h")).unwrap();
        let spec = |handler: &resolve::Handler| runner::Spec {
            env: handler_env(&run(EVENT_MESSAGE, "h"), &handler.rel, &handler.path),
            program: handler.file.fd.clone(),
            script: handler.file.format == safe_open::Format::Script,
            path: handler.path.clone(),
            dir: handler.dir.clone(),
            name: handler.rel.clone(),
            tag: "h".into(),
            payload: Vec::new(),
            timeout: Duration::from_secs(10),
            note: None,
        };
        let done = runner::run(spec(&handler), &CancellationToken::new(), || {}).await;
        assert_eq!(done.outcome, Outcome::Exited { code: 0 });
        let stdout = String::from_utf8_lossy(&done.stdout).into_owned();
        // A script runs as `sh /dev/fd/N`, and learns its path from the environment.
        let expected_tail = format!(" {}\n", root.join("h").display());
        assert!(
            stdout.starts_with("checked /dev/fd/") && stdout.ends_with(&expected_tail),
            "{stdout}"
        );

        let Resolution::Found(handler) = resolve(root, EVENT_MESSAGE, "h") else {
            panic!("no handler")
        };
        write("third", "#!/bin/sh\necho third\n");
        std::fs::remove_file(root.join("h")).unwrap();
        std::os::unix::fs::symlink(root.join("third"), root.join("h")).unwrap();
        let done = runner::run(spec(&handler), &CancellationToken::new(), || {}).await;
        assert_eq!(String::from_utf8_lossy(&done.stdout), "swapped\n");
    }
}
