//! `cnspr db`: the replicated key-value store. Writes go through the daemon (which makes them
//! durable and replicates them); reads too while it runs, and otherwise straight from the store
//! on disk.

use std::collections::HashMap;
use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use cnsprcy::api::StoreItem;
use cnsprcy::env::DeviceEnv;
use cnsprcy::identity::{self, Identity};
use cnsprcy::lock::InstanceLock;
use cnsprcy_mesh::store::merge::MAX_VALUE_BYTES;
use cnsprcy_mesh::store::{OfflineStore, item};
use serde_json::{Value, json};

use crate::cli::DbCommand;
use crate::commands::{CallError, call, not_running, print_json};

pub async fn run(env: &DeviceEnv, command: DbCommand) -> anyhow::Result<ExitCode> {
    match command {
        DbCommand::Set { key, value, json } => set(env, key, value, json).await,
        DbCommand::Get { key, json } => get(env, key, json).await,
        DbCommand::List { prefix, json } => list(env, prefix.unwrap_or_default(), json).await,
        DbCommand::Del { key, json } => del(env, key, json).await,
        DbCommand::Stats { json } => stats(env, json).await,
    }
}

async fn stats(env: &DeviceEnv, as_json: bool) -> anyhow::Result<ExitCode> {
    let value = match call(env, "db.stats", Value::Null).await {
        Ok(value) => value,
        Err(CallError::NotRunning(e)) => return not_running(env, e, as_json),
        Err(CallError::Other(e)) => return Err(e),
    };
    if as_json {
        print_json(&value)?;
    } else if let Some(fields) = value.as_object() {
        for (name, value) in fields {
            println!("{name}: {value}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn read_value(value: String) -> anyhow::Result<Vec<u8>> {
    if value != "-" {
        return Ok(value.into_bytes());
    }
    let mut bytes = Vec::new();
    std::io::stdin()
        .take(MAX_VALUE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .context("cannot read the value from standard input")?;
    if bytes.len() > MAX_VALUE_BYTES {
        bail!(
            "the value on standard input is larger than the limit of {MAX_VALUE_BYTES} bytes (1 MiB); store a path or a link to it instead"
        );
    }
    Ok(bytes)
}

async fn write(
    env: &DeviceEnv,
    method: &str,
    params: Value,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    match call(env, method, params).await {
        Ok(value) => {
            if as_json {
                print_json(&value)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(CallError::NotRunning(e)) => not_running(env, e, as_json),
        Err(CallError::Other(e)) => Err(e),
    }
}

async fn set(
    env: &DeviceEnv,
    key: String,
    value: String,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let value = read_value(value)?;
    let params = match String::from_utf8(value) {
        Ok(text) => json!({ "key": key, "value": text }),
        Err(e) => json!({ "key": key, "value_base64": BASE64.encode(e.as_bytes()) }),
    };
    write(env, "db.set", params, as_json).await
}

async fn del(env: &DeviceEnv, key: String, as_json: bool) -> anyhow::Result<ExitCode> {
    write(env, "db.del", json!({ "key": key }), as_json).await
}

/// A read: from the daemon, or from the store on disk when the daemon does not run.
async fn read(
    env: &DeviceEnv,
    method: &str,
    params: Value,
    offline: impl FnOnce(&OfflineStore) -> anyhow::Result<Value>,
) -> anyhow::Result<Value> {
    let error = match call(env, method, params).await {
        Ok(value) => return Ok(value),
        Err(CallError::Other(e)) => return Err(e),
        Err(CallError::NotRunning(e)) => e,
    };
    if InstanceLock::is_held(&env.paths.lock_file("mesh")) {
        // Running but not answering (starting or stopping): the store is its to hold.
        return Err(anyhow::anyhow!(
            "{error}; the mesh service holds the store, try again in a moment"
        ));
    }
    match OfflineStore::open(&env.paths.state_dir)
        .with_context(|| "cannot read the store while the daemon is stopped")?
    {
        Some(store) => offline(&store),
        // No store yet: nothing was ever written on this device.
        None => Ok(Value::Null),
    }
}

/// Writers' names for offline reads: this device and the roster's members.
fn offline_names(env: &DeviceEnv) -> HashMap<[u8; 32], String> {
    let mut names = HashMap::new();
    if let Ok(members) = cnsprcy_mesh::roster::load(&env.paths.state_dir) {
        for member in &members {
            names.insert(*member.public_key.as_bytes(), member.name.to_string());
        }
    }
    if let (Ok(identity), Ok(name)) = (
        Identity::load(&env.paths.state_dir),
        identity::effective_name(env.config.name.as_ref(), &env.paths.state_dir),
    ) {
        names.insert(*identity.public_key().as_bytes(), name.to_string());
    }
    names
}

async fn get(env: &DeviceEnv, key: String, as_json: bool) -> anyhow::Result<ExitCode> {
    let value = read(env, "db.get", json!({ "key": key }), |store| {
        Ok(match store.get(&key)? {
            Some(record) => serde_json::to_value(item(&key, &record, &offline_names(env)))?,
            None => Value::Null,
        })
    })
    .await?;
    if value.is_null() {
        if as_json {
            println!("null");
        }
        eprintln!("cnspr: {key:?} is not set (`cnspr db list` shows the keys)");
        return Ok(ExitCode::FAILURE);
    }
    let item: StoreItem = serde_json::from_value(value.clone())?;
    if as_json {
        print_json(&value)?;
        return Ok(ExitCode::SUCCESS);
    }
    let bytes = BASE64
        .decode(item.value_base64.as_bytes())
        .context("the daemon sent a value that is not base64")?;
    let mut out = std::io::stdout().lock();
    out.write_all(&bytes)?;
    if out.is_terminal() && !bytes.ends_with(b"\n") {
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

async fn list(env: &DeviceEnv, prefix: String, as_json: bool) -> anyhow::Result<ExitCode> {
    let value = read(env, "db.list", json!({ "prefix": prefix }), |store| {
        let names = offline_names(env);
        let items: Vec<StoreItem> = store
            .list(&prefix)?
            .iter()
            .map(|(key, record)| item(key, record, &names))
            .collect();
        Ok(serde_json::to_value(items)?)
    })
    .await?;
    let items: Vec<StoreItem> = if value.is_null() {
        Vec::new()
    } else {
        serde_json::from_value(value)?
    };
    if as_json {
        print_json(&items)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout().lock();
    for item in &items {
        writeln!(out, "{}\t{}", escape(&item.key), shown_value(item))?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// One line per key: tabs, newlines and backslashes escaped as `\t`, `\n`, `\\`.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

fn shown_value(item: &StoreItem) -> String {
    match &item.value {
        Some(text) => escape(text),
        None => format!(
            "({} bytes of binary data; --json shows them in base64)",
            item.value_base64.len() / 4 * 3
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn list_lines_escape_separators() {
        assert_eq!(escape("a\tb\nc\\d"), "a\\tb\\nc\\\\d");
        assert_eq!(escape("plain ü"), "plain ü");
    }
}
