//! The store's API methods: `db.set`, `db.get`, `db.del`, `db.list`, `db.stats`. Reads go to the
//! store directly; writes are made durable here (off the runtime's threads) and then handed to
//! the node, which pushes them to every member and raises the events.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use cnsprcy::rpc::{self, RpcError};
use cnsprcy::wire::KeyBytes;
use serde::Deserialize;
use serde_json::Value;

use super::{Store, StoreError, item};
use crate::Mesh;
use crate::core::{Answer, ApiCall, code};
use crate::node::Request;

pub const METHODS: &[&str] = &["db.set", "db.get", "db.del", "db.list", "db.stats"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyParams {
    key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetParams {
    key: String,
    /// The value as text.
    #[serde(default)]
    value: Option<String>,
    /// The value in base64 (binary-safe), instead of `value`.
    #[serde(default)]
    value_base64: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    #[serde(default)]
    prefix: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

fn store_error(e: StoreError) -> RpcError {
    match e {
        StoreError::Invalid(e) => RpcError::invalid_params(e.to_string()),
        StoreError::Storage(e) => RpcError::new(code::STORAGE, e.to_string()),
    }
}

fn to_value<T: serde::Serialize>(value: T) -> Result<Value, RpcError> {
    serde_json::to_value(value).map_err(|e| RpcError::internal(e.to_string()))
}

/// Runs blocking store work off the runtime's threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, RpcError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| RpcError::internal(format!("store task failed: {e}")))?
        .map_err(store_error)
}

/// Writers' names: this device and the members.
async fn names(mesh: &Mesh) -> HashMap<KeyBytes, String> {
    match mesh.node.call(ApiCall::Names).await {
        Ok(Answer::Names(names)) => names,
        // Stopping: the items then name writers by ID.
        _ => HashMap::from([(
            *mesh.identity.public_key().as_bytes(),
            mesh.name.to_string(),
        )]),
    }
}

pub(crate) async fn call(mesh: &Mesh, method: &str, params: Value) -> Result<Value, RpcError> {
    let store: Arc<Store> = mesh.node.store.clone();
    match method {
        "db.get" => {
            let KeyParams { key } = rpc::params(params)?;
            let record = {
                let (store, key) = (store.clone(), key.clone());
                blocking(move || Ok(store.get(&key)?)).await?
            };
            match record.filter(|r| r.value.is_some()) {
                Some(record) => to_value(item(&key, &record, &names(mesh).await)),
                None => Ok(Value::Null),
            }
        }
        "db.list" => {
            let ListParams { prefix } = rpc::params(params)?;
            let records = blocking(move || Ok(store.list(&prefix)?)).await?;
            let names = names(mesh).await;
            to_value(
                records
                    .iter()
                    .map(|(key, record)| item(key, record, &names))
                    .collect::<Vec<_>>(),
            )
        }
        "db.set" | "db.del" => {
            let (key, value) = if method == "db.set" {
                let SetParams {
                    key,
                    value,
                    value_base64,
                } = rpc::params(params)?;
                let value = match (value, value_base64) {
                    (Some(text), None) => text.into_bytes(),
                    (None, Some(b64)) => BASE64.decode(b64.as_bytes()).map_err(|e| {
                        RpcError::invalid_params(format!("value_base64 is not base64: {e}"))
                    })?,
                    _ => {
                        return Err(RpcError::invalid_params(
                            "give the value as either value (text) or value_base64",
                        ));
                    }
                };
                (key, Some(value))
            } else {
                let KeyParams { key } = rpc::params(params)?;
                (key, None)
            };
            let entry = blocking(move || store.write_local(&key, value)).await?;
            let record = super::Record {
                ts: entry.ts,
                writer: entry.writer,
                value: entry.value.clone(),
            };
            let shown = item(&entry.key, &record, &names(mesh).await);
            // Durable already: if the node is gone (shutting down), anti-entropy spreads it later.
            let _ = mesh
                .node
                .requests
                .send(Request::StoreWritten(Box::new(entry)))
                .await;
            to_value(shown)
        }
        "db.stats" => {
            rpc::params::<NoParams>(params)?;
            Ok(store.stats_json())
        }
        other => Err(RpcError::internal(format!(
            "method {other:?} has no handler"
        ))),
    }
}
