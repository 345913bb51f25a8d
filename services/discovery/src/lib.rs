//! The discovery service. For now it keeps itself registered with the mesh service over `mesh.sock`,
//! reconnecting whenever the mesh service restarts; its real job comes with a later issue.

use cnsprcy::env::DeviceEnv;
use cnsprcy::ipc::ServiceKind;
use cnsprcy::mesh_link::keep_registered;
use cnsprcy::service::Running;
use tokio_util::sync::CancellationToken;

pub async fn start(env: DeviceEnv, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let socket = env.paths.mesh_socket();
    Ok(cnsprcy::service::spawn(async move {
        keep_registered(ServiceKind::Discovery, socket, shutdown).await;
        Ok(())
    }))
}
