//! `cnspr serve`: all four services in one process, talking over the same sockets as when they run
//! as separate systemd units.

use std::process::ExitCode;

use anyhow::Context;
use cnsprcy::env::DeviceEnv;
use cnsprcy::ipc::ServiceKind;
use cnsprcy::service::{Running, cancel_on_signals, join_all, lock_services, span};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub fn run() -> anyhow::Result<ExitCode> {
    cnsprcy::logging::init("cnspr-serve");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(cnsprcy::service::MAX_BLOCKING_THREADS)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve())?;
    Ok(ExitCode::SUCCESS)
}

async fn serve() -> anyhow::Result<()> {
    let env = DeviceEnv::load()?;
    let _locks = lock_services(&env, &ServiceKind::ALL)?;
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone())?;
    // The handler service stops last, so the mesh service's daemon-stop handler can still run.
    let handlers_shutdown = CancellationToken::new();

    // The handler service listens before the mesh service may call it; netwatch and discovery
    // come last because they connect to the mesh service.
    let mut running: Vec<(ServiceKind, Running)> = Vec::new();
    for kind in [
        ServiceKind::Handlers,
        ServiceKind::Mesh,
        ServiceKind::Netwatch,
        ServiceKind::Discovery,
    ] {
        let token = match kind {
            ServiceKind::Handlers => handlers_shutdown.clone(),
            _ => shutdown.clone(),
        };
        let env = env.clone();
        let started = match kind {
            ServiceKind::Handlers => {
                cnsprcy_handlers::start(env, token)
                    .instrument(span(kind))
                    .await
            }
            ServiceKind::Mesh => cnsprcy_mesh::start(env, token).instrument(span(kind)).await,
            ServiceKind::Netwatch => {
                cnsprcy_netwatch::start(env, token)
                    .instrument(span(kind))
                    .await
            }
            ServiceKind::Discovery => {
                cnsprcy_discovery::start(env, token)
                    .instrument(span(kind))
                    .await
            }
        };
        match started {
            Ok(handle) => running.push((kind, stop_all_when_done(handle, shutdown.clone()))),
            Err(e) => {
                shutdown.cancel();
                handlers_shutdown.cancel();
                let _ = join_all(running).await;
                return Err(e.context(format!("cannot start the {kind} service")));
            }
        }
    }
    tracing::info!(
        "cnsprcy is running; `cnspr status` in another terminal shows it, Ctrl-C stops it"
    );
    shutdown.cancelled().await;
    // `running` starts with the handler service: stop the others first.
    let handlers = running.remove(0);
    let others = join_all(running).await;
    handlers_shutdown.cancel();
    let handlers = join_all(vec![handlers]).await;
    others.and(handlers)
}

/// A service that ends by itself (it failed) stops the whole process rather than leaving a
/// half-working daemon behind.
fn stop_all_when_done(handle: Running, shutdown: CancellationToken) -> Running {
    tokio::spawn(async move {
        let outcome = handle.await;
        shutdown.cancel();
        outcome.unwrap_or_else(|join| Err(anyhow::anyhow!("crashed: {join}")))
    })
}
