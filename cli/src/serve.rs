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

    // The handler service listens before the mesh service may call it; netwatch and discovery
    // come last because they connect to the mesh service.
    let mut running: Vec<(ServiceKind, Running)> = Vec::new();
    for kind in [
        ServiceKind::Handlers,
        ServiceKind::Mesh,
        ServiceKind::Netwatch,
        ServiceKind::Discovery,
    ] {
        let (env, token) = (env.clone(), shutdown.clone());
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
                let _ = join_all(running).await;
                return Err(e.context(format!("cannot start the {kind} service")));
            }
        }
    }
    tracing::info!(
        "cnsprcy is running; `cnspr status` in another terminal shows it, Ctrl-C stops it"
    );
    shutdown.cancelled().await;
    join_all(running).await
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
