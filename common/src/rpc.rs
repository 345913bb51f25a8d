//! JSON-RPC 2.0 on the public socket: one request or batch per line, one response per line.
//!
//! This module holds the protocol rules (what is a valid request, which error code for what) with
//! no I/O; the mesh service feeds it lines and writes back what it returns. `docs/api.md`
//! documents the methods.

use std::future::Future;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub const VERSION: &str = "2.0";

/// JSON-RPC 2.0 error codes, plus the implementation-defined ones cnsprcy uses.
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL_ERROR: i64 = -32603;
    /// The connection comes from another user and is refused.
    pub const PERMISSION_DENIED: i64 = -32001;
    /// The daemon is busy (too many connections) or shutting down; try again.
    pub const UNAVAILABLE: i64 = -32002;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            data: None,
        }
    }

    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(code::INVALID_PARAMS, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(code::INTERNAL_ERROR, message)
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.message, self.code)
    }
}

impl std::error::Error for RpcError {}

/// A response object, as a client reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub jsonrpc: String,
    #[serde(default)]
    pub id: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
}

impl Response {
    pub fn success(id: Value, result: Value) -> Self {
        Self {
            jsonrpc: VERSION.into(),
            id,
            result: Some(result),
            error: None,
        }
    }

    pub fn failure(id: Value, error: RpcError) -> Self {
        Self {
            jsonrpc: VERSION.into(),
            id,
            result: None,
            error: Some(error),
        }
    }
}

/// A request, as a client writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub jsonrpc: String,
    pub id: Value,
    pub method: String,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub params: Value,
}

impl Request {
    pub fn new(id: u64, method: &str, params: Value) -> Self {
        Self {
            jsonrpc: VERSION.into(),
            id: json!(id),
            method: method.into(),
            params,
        }
    }
}

/// A validated call: the method with its params; `id` is `None` for a notification.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub id: Option<Value>,
    pub method: String,
    pub params: Value,
}

/// The methods a server offers.
pub trait Methods {
    /// The method names, for "did you mean" hints.
    fn names(&self) -> &[&'static str];
    /// Runs one call. Unknown methods need not be handled: `handle_line` answers them.
    fn call(&self, method: &str, params: Value) -> impl Future<Output = Result<Value, RpcError>>;
}

/// Handles one line from a client and returns the line to answer with, if any (notifications get
/// no answer, as JSON-RPC 2.0 says).
pub async fn handle_line<M: Methods>(methods: &M, line: &str) -> Option<String> {
    let value: Value = match serde_json::from_str(line) {
        Ok(value) => value,
        Err(e) => {
            let error = RpcError::new(code::PARSE_ERROR, format!("parse error: {e}"));
            return Some(to_line(&Response::failure(Value::Null, error)));
        }
    };
    match value {
        Value::Array(items) if items.is_empty() => {
            let error = RpcError::new(code::INVALID_REQUEST, "invalid request: empty batch");
            Some(to_line(&Response::failure(Value::Null, error)))
        }
        Value::Array(items) => {
            let mut responses = Vec::new();
            for item in items {
                if let Some(response) = handle_value(methods, item).await {
                    responses.push(response);
                }
            }
            (!responses.is_empty()).then(|| to_line(&responses))
        }
        single => handle_value(methods, single)
            .await
            .map(|response| to_line(&response)),
    }
}

async fn handle_value<M: Methods>(methods: &M, value: Value) -> Option<Response> {
    let call = match validate(value) {
        Ok(call) => call,
        Err((id, error)) => return Some(Response::failure(id, error)),
    };
    let result = if methods.names().contains(&call.method.as_str()) {
        methods.call(&call.method, call.params).await
    } else {
        Err(method_not_found(&call.method, methods.names()))
    };
    let id = call.id?;
    Some(match result {
        Ok(value) => Response::success(id, value),
        Err(error) => Response::failure(id, error),
    })
}

/// Checks the request object's shape. On error, also returns the id to answer with.
pub fn validate(value: Value) -> Result<Call, (Value, RpcError)> {
    let invalid = |id: Value, why: &str| {
        Err((
            id,
            RpcError::new(code::INVALID_REQUEST, format!("invalid request: {why}")),
        ))
    };
    let Value::Object(mut object) = value else {
        return invalid(Value::Null, "a request is a JSON object");
    };
    let id = object.remove("id");
    let answer_id = match &id {
        Some(id @ (Value::Number(_) | Value::String(_) | Value::Null)) => id.clone(),
        Some(_) => return invalid(Value::Null, "\"id\" must be a number, a string or null"),
        None => Value::Null,
    };
    if object.get("jsonrpc") != Some(&Value::String(VERSION.into())) {
        return invalid(answer_id, "\"jsonrpc\" must be \"2.0\"");
    }
    let method = match object.remove("method") {
        Some(Value::String(method)) => method,
        _ => return invalid(answer_id, "\"method\" must be a string"),
    };
    let params = object.remove("params").unwrap_or(Value::Null);
    if !matches!(params, Value::Null | Value::Object(_) | Value::Array(_)) {
        return invalid(answer_id, "\"params\" must be an object or an array");
    }
    if let Some(extra) = object.keys().find(|k| *k != "jsonrpc") {
        return invalid(answer_id, &format!("unknown member {extra:?}"));
    }
    Ok(Call { id, method, params })
}

fn method_not_found(method: &str, names: &[&str]) -> RpcError {
    let nearest = crate::suggest::closest(method, names.iter().copied(), |_| 2);
    let mut message = format!("method not found: {method:?}");
    if let Some(name) = nearest {
        message.push_str(&format!("; did you mean {name:?}?"));
    }
    let mut error = RpcError::new(code::METHOD_NOT_FOUND, message);
    error.data = Some(json!({ "methods": names }));
    error
}

/// Parses a method's params into `T`. Absent params mean `{}`; `T` decides what is required.
pub fn params<T: serde::de::DeserializeOwned>(params: Value) -> Result<T, RpcError> {
    let params = match params {
        Value::Null => json!({}),
        other => other,
    };
    serde_json::from_value(params)
        .map_err(|e| RpcError::invalid_params(format!("invalid params: {e}")))
}

/// One response line. Serializing a `Response` cannot fail: it holds only JSON values.
pub fn to_line<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| {
        format!(
            r#"{{"jsonrpc":"2.0","id":null,"error":{{"code":{},"message":"cannot encode response: {e}"}}}}"#,
            code::INTERNAL_ERROR
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct EchoParams {
        text: String,
    }

    impl Methods for Echo {
        fn names(&self) -> &[&'static str] {
            &["echo", "status"]
        }
        async fn call(&self, method: &str, p: Value) -> Result<Value, RpcError> {
            match method {
                "echo" => Ok(json!(params::<EchoParams>(p)?.text)),
                _ => Ok(json!("ok")),
            }
        }
    }

    async fn answer(line: &str) -> Value {
        serde_json::from_str(&handle_line(&Echo, line).await.expect("an answer")).unwrap()
    }

    #[tokio::test]
    async fn a_good_call_is_answered_with_its_id() {
        let v =
            answer(r#"{"jsonrpc":"2.0","id":"a","method":"echo","params":{"text":"hi"}}"#).await;
        assert_eq!(v, json!({"jsonrpc":"2.0","id":"a","result":"hi"}));
    }

    #[tokio::test]
    async fn bad_input_gets_the_right_codes() {
        assert_eq!(answer("{nope").await["error"]["code"], code::PARSE_ERROR);
        assert_eq!(answer("42").await["error"]["code"], code::INVALID_REQUEST);
        assert_eq!(answer("[]").await["error"]["code"], code::INVALID_REQUEST);
        assert_eq!(
            answer(r#"{"jsonrpc":"1.0","id":1,"method":"echo"}"#).await["error"]["code"],
            code::INVALID_REQUEST
        );
        let v = answer(r#"{"jsonrpc":"2.0","id":1,"method":"stauts"}"#).await;
        assert_eq!(v["error"]["code"], code::METHOD_NOT_FOUND);
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("did you mean \"status\"")
        );
        let v = answer(r#"{"jsonrpc":"2.0","id":1,"method":"echo","params":{"txt":"x"}}"#).await;
        assert_eq!(v["error"]["code"], code::INVALID_PARAMS);
        assert_eq!(v["id"], 1);
    }

    #[tokio::test]
    async fn notifications_get_no_answer_and_batches_get_arrays() {
        assert!(
            handle_line(&Echo, r#"{"jsonrpc":"2.0","method":"status"}"#)
                .await
                .is_none()
        );
        let v = answer(
            r#"[{"jsonrpc":"2.0","id":1,"method":"status"},{"jsonrpc":"2.0","method":"status"},7]"#,
        )
        .await;
        let items = v.as_array().unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0]["result"], "ok");
        assert_eq!(items[1]["error"]["code"], code::INVALID_REQUEST);
    }
}
