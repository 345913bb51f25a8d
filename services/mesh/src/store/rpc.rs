//! The store's API methods: `db.set`, `db.get`, `db.del`, `db.list`, `db.stats`. Reads go to the
//! store directly; writes are made durable here (off the runtime's threads) and then handed to
//! the node, which pushes them to every member and raises the events.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use cnsprcy::api::{StoreItem, StoreListPage};
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
    /// The last key of the previous page: this page starts after it.
    #[serde(default)]
    after: Option<String>,
    /// At most this many items (`DEFAULT_LIST_LIMIT` if not given).
    #[serde(default)]
    limit: Option<usize>,
}

/// Items per `db.list` page unless `limit` says otherwise, and the most `limit` may ask for.
pub const DEFAULT_LIST_LIMIT: usize = 1000;
pub const MAX_LIST_LIMIT: usize = 10_000;
/// A page ends before its items' JSON passes this size (except that a page holds at least one
/// item). One item is at most about 6 MiB (a 1 MiB text value of control characters, each
/// escaped as `\u0000`), so a page always fits in the API's 24 MiB line.
pub const PAGE_BYTES: usize = 8 * 1024 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

/// An error of a read (`write`: false) or a write, for the API.
fn store_error(e: StoreError, write: bool) -> RpcError {
    match e {
        StoreError::Invalid(e) => RpcError::invalid_params(e.to_string()),
        StoreError::NotFound(_) => RpcError::new(code::NOT_FOUND, e.to_string()),
        StoreError::Storage(e) if write => RpcError::new(
            code::STORAGE,
            format!("{e}; nothing was changed. {}", e.advice()),
        ),
        StoreError::Storage(e) => RpcError::new(
            code::STORAGE,
            format!("cannot read the store: {e}. {}", e.advice()),
        ),
        StoreError::Degraded(_) => RpcError::new(code::STORAGE, e.to_string()),
    }
}

/// One page of `db.list`: up to `limit` items and `PAGE_BYTES` of JSON, and where the next
/// page starts if there is more.
fn list_page(
    store: &Store,
    params: ListParams,
    names: &HashMap<KeyBytes, String>,
) -> Result<StoreListPage, StoreError> {
    let ListParams {
        prefix,
        after,
        limit,
    } = params;
    let limit = limit.unwrap_or(DEFAULT_LIST_LIMIT);
    let mut items = Vec::new();
    let mut bytes = 0;
    let mut more = false;
    store.scan_live(&prefix, after.as_deref(), |key, record| {
        let shown = item(&key, &record, names);
        // The size it adds to the answer (its JSON and a comma).
        let size = serde_json::to_vec(&shown).map_or(0, |v| v.len()) + 1;
        if items.len() == limit || (!items.is_empty() && bytes + size > PAGE_BYTES) {
            more = true;
            return ControlFlow::Break(());
        }
        bytes += size;
        items.push(shown);
        ControlFlow::Continue(())
    })?;
    let next_after = if more {
        items.last().map(|i: &StoreItem| i.key.clone())
    } else {
        None
    };
    Ok(StoreListPage { items, next_after })
}

fn to_value<T: serde::Serialize>(value: T) -> Result<Value, RpcError> {
    serde_json::to_value(value).map_err(|e| RpcError::internal(e.to_string()))
}

/// Runs blocking store work off the runtime's threads; `write`: whether it is a write.
async fn blocking<T: Send + 'static>(
    write: bool,
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, RpcError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| RpcError::internal(format!("store task failed: {e}")))?
        .map_err(|e| store_error(e, write))
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
                blocking(false, move || Ok(store.get(&key)?)).await?
            };
            match record.filter(|r| r.value.is_some()) {
                Some(record) => to_value(item(&key, &record, &names(mesh).await)),
                None => Ok(Value::Null),
            }
        }
        "db.list" => {
            let params: ListParams = rpc::params(params)?;
            if params.limit.is_some_and(|l| l == 0 || l > MAX_LIST_LIMIT) {
                return Err(RpcError::invalid_params(format!(
                    "limit must be between 1 and {MAX_LIST_LIMIT}"
                )));
            }
            let names = names(mesh).await;
            to_value(blocking(false, move || list_page(&store, params, &names)).await?)
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
            let entry = blocking(true, move || store.write_local(&key, value)).await?;
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
            // Off the runtime's threads: the store's lock is held while it writes.
            blocking(false, move || Ok(store.stats_json())).await
        }
        other => Err(RpcError::internal(format!(
            "method {other:?} has no handler"
        ))),
    }
}
