//! What every service process does around its service: load the environment, take the instance
//! lock, stop on SIGINT/SIGTERM. Used by `cnspr serve` and by `cnspr` started as one service
//! (under the name `cnsprcy-<service>`).

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::env::DeviceEnv;
use crate::ipc::ServiceKind;
use crate::lock::InstanceLock;
use crate::paths::ensure_private_dir;

/// How long services get to finish after a stop signal before the process exits anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Threads for blocking work (store calls, handler look-ups) at most, per process. Tokio's
/// default (512) let a flood of store writes, each raising an event whose handler is looked up,
/// start a hundred threads, each with its own stack and malloc arena; beyond this, the work
/// waits its turn.
pub const MAX_BLOCKING_THREADS: usize = 16;

/// A started service: the task serving it. It ends when the shutdown token fires.
pub type Running = JoinHandle<anyhow::Result<()>>;

/// The span every log line of `kind` is recorded in, so lines of `cnspr serve` (four services in
/// one process) say whose they are, and the journal gets a `SERVICE` field.
pub fn span(kind: ServiceKind) -> tracing::Span {
    tracing::info_span!("service", service = kind.as_str())
}

/// Spawns a service's main task in the current span: `start` functions run inside the service's
/// span, so the task's lines say whose they are too.
pub fn spawn<F>(task: F) -> Running
where
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    tokio::spawn(task.in_current_span())
}

/// Creates the runtime directory and takes the instance lock of each of `services`, all or none,
/// so a second daemon fails before it touches any socket.
pub fn lock_services(
    env: &DeviceEnv,
    services: &[ServiceKind],
) -> anyhow::Result<Vec<InstanceLock>> {
    ensure_private_dir(&env.paths.runtime_dir).context("cannot prepare the runtime directory")?;
    services
        .iter()
        .map(|kind| {
            InstanceLock::acquire(&env.paths.lock_file(kind.as_str()), &kind.unit_name())
                .map_err(anyhow::Error::from)
        })
        .collect()
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM; a second signal exits at once.
pub fn cancel_on_signals(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        };
        tracing::info!("{name} received; shutting down");
        shutdown.cancel();
        tokio::select! {
            _ = int.recv() => {},
            _ = term.recv() => {},
        }
        tracing::warn!("second stop signal; exiting without waiting");
        std::process::exit(130);
    });
    Ok(())
}

/// Waits for started services to finish after `shutdown` fired, at most `SHUTDOWN_GRACE`.
/// Returns the first error any of them ended with.
pub async fn join_all(running: Vec<(ServiceKind, Running)>) -> anyhow::Result<()> {
    let mut first_error = None;
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    for (kind, handle) in running {
        let outcome = tokio::time::timeout_at(deadline, handle).await;
        let error = match outcome {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(e))) => Some(e.context(format!("the {kind} service failed"))),
            Ok(Err(join)) => Some(anyhow::anyhow!("the {kind} service crashed: {join}")),
            Err(_) => Some(anyhow::anyhow!("the {kind} service did not stop in time")),
        };
        if let Some(e) = error {
            tracing::error!("{e:#}");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// How every service process is run, for its `--help` and man page.
pub const SERVICE_USAGE: &str = "The executable is `cnspr`, started under the service's name: systemd's unit does \
so (ExecStart=@/usr/bin/cnspr NAME), by hand `exec -a NAME cnspr` in bash. Without systemd, `cnspr serve` runs all \
services in one process. Takes no arguments. Reads the same configuration as `cnspr` (see `cnspr config path`). \
RUST_LOG sets the log filter (default: info).";

/// The whole life of a `cnsprcy-<service>` process: arguments, logging, environment, lock, signals,
/// and the service itself until it stops.
pub fn main<F, Fut>(kind: ServiceKind, start: F) -> std::process::ExitCode
where
    F: FnOnce(DeviceEnv, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<Running>>,
{
    let unit = kind.unit_name();
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        None => {}
        Some("--version" | "-V") => {
            println!("{unit} {}", crate::VERSION);
            return std::process::ExitCode::SUCCESS;
        }
        Some("--help" | "-h") => {
            println!(
                "{unit} {}: the {kind} service of cnsprcy.\n\n{}\n\nUsage: {unit}\n\n{SERVICE_USAGE}",
                crate::VERSION,
                kind.duty()
            );
            return std::process::ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("{unit}: unexpected argument {other:?}; try `{unit} --help`");
            return std::process::ExitCode::from(2);
        }
    }
    crate::logging::init(&unit);
    let run = async {
        let env = DeviceEnv::load()?;
        let _lock = lock_services(&env, &[kind])?;
        let shutdown = CancellationToken::new();
        cancel_on_signals(shutdown.clone())?;
        let running = start(env, shutdown.clone()).instrument(span(kind)).await?;
        crate::activation::ready(&format!("{kind} service running"));
        if let Some(every) = crate::activation::watchdog_interval() {
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(every);
                loop {
                    ticks.tick().await;
                    crate::activation::watchdog_ping();
                }
            });
        }
        let stopped = shutdown.clone();
        // A service that ends by itself (an error) takes the process down with it; one asked to
        // stop gets SHUTDOWN_GRACE to do so.
        let running = tokio::spawn(async move {
            let outcome = running.await;
            stopped.cancel();
            outcome.unwrap_or_else(|join| Err(anyhow::anyhow!("crashed: {join}")))
        });
        shutdown.cancelled().await;
        crate::activation::stopping();
        join_all(vec![(kind, running)]).await
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{unit}: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // stderr reaches the journal too when running as a unit.
            eprintln!("{unit}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
