//! The public API's methods.

use cnsprcy::api::{ServiceState, ServiceStatus, Status};
use cnsprcy::ipc::ServiceKind;
use cnsprcy::rpc::{self, Methods, RpcError};
use serde::Deserialize;
use serde_json::Value;

use crate::Mesh;

pub struct Api<'a> {
    pub mesh: &'a Mesh,
}

/// `status` takes no parameters.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

impl Methods for Api<'_> {
    fn names(&self) -> &[&'static str] {
        &["status"]
    }

    async fn call(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        match method {
            "status" => {
                rpc::params::<NoParams>(params)?;
                let status = self.status().await;
                serde_json::to_value(status).map_err(|e| RpcError::internal(e.to_string()))
            }
            other => Err(RpcError::internal(format!(
                "method {other:?} has no handler"
            ))),
        }
    }
}

impl Api<'_> {
    async fn status(&self) -> Status {
        let mesh = self.mesh;
        let mut services = vec![ServiceStatus {
            name: ServiceKind::Mesh,
            state: ServiceState::Running,
            pid: Some(std::process::id()),
            detail: None,
        }];
        for kind in [ServiceKind::Netwatch, ServiceKind::Discovery] {
            services.push(match mesh.registry.get(kind) {
                Some(registration) => ServiceStatus {
                    name: kind,
                    state: ServiceState::Connected,
                    pid: Some(registration.pid),
                    detail: None,
                },
                None => ServiceStatus {
                    name: kind,
                    state: ServiceState::Disconnected,
                    pid: None,
                    detail: Some(format!(
                        "not registered; start {} (it connects by itself)",
                        kind.unit_name()
                    )),
                },
            });
        }
        services.push(match mesh.handlers.ping().await {
            Ok(pid) => ServiceStatus {
                name: ServiceKind::Handlers,
                state: ServiceState::Connected,
                pid: Some(pid),
                detail: None,
            },
            Err(reason) => ServiceStatus {
                name: ServiceKind::Handlers,
                state: ServiceState::Disconnected,
                pid: None,
                detail: Some(reason),
            },
        });
        Status {
            name: mesh.name.clone(),
            id: mesh.identity.device_id(),
            public_key: mesh.identity.public_key(),
            version: cnsprcy::VERSION.to_owned(),
            pid: std::process::id(),
            uptime_secs: mesh.started.elapsed().as_secs(),
            listen: mesh.env.config.mesh.listen.clone(),
            socket: mesh.env.paths.public_socket(),
            services,
        }
    }
}
