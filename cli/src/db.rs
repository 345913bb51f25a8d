//! `cnspr db`: the replicated key-value store. Writes go through the daemon (which makes them
//! durable and replicates them); reads too while it runs, and otherwise straight from the store
//! on disk.

use std::collections::HashMap;
use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;

use std::ops::ControlFlow;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use cnsprcy::api::{StoreItem, StoreListPage};
use cnsprcy::client::{Client, ClientError};
use cnsprcy::env::DeviceEnv;
use cnsprcy::identity::{self, Identity};
use cnsprcy::lock::InstanceLock;
use cnsprcy_mesh::store::merge::MAX_VALUE_BYTES;
use cnsprcy_mesh::store::{OfflineStore, StorageError, item};
use serde_json::{Value, json};

use crate::cli::DbCommand;
use crate::commands::{CALL_TIMEOUT, CallError, call, not_running, print_json};

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

/// Why the daemon did not answer a read, when the store may be read on disk instead: `Ok` with
/// the store (or `None`: this device has none yet), or the error to report.
fn offline_store(env: &DeviceEnv, error: ClientError) -> anyhow::Result<Option<OfflineStore>> {
    if InstanceLock::is_held(&env.paths.lock_file("mesh")) {
        // Running but not answering (starting or stopping): the store is its to hold.
        bail!("{error}; the mesh service holds the store, try again in a moment");
    }
    OfflineStore::open(&env.paths.state_dir).map_err(offline_error)
}

/// A store error while the daemon is stopped, with what to do about it.
fn offline_error(e: StorageError) -> anyhow::Error {
    match e {
        StorageError::Damaged { .. } => anyhow::anyhow!(
            "cannot read the store while the daemon is stopped: {e}.\nStart the daemon (`cnspr serve`, or `systemctl --user start cnsprcy.target`): it moves the damaged copy aside and refills the store from your other devices"
        ),
        e => anyhow::anyhow!("cannot read the store while the daemon is stopped: {e}"),
    }
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
    match offline_store(env, error)? {
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
        Ok(match store.get(&key).map_err(offline_error)? {
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
    let bytes = item
        .value_bytes()
        .context("the daemon sent a value that is not base64")?;
    let mut out = std::io::stdout().lock();
    if let Some(notice) = binary_for_a_terminal(&key, &item, bytes.len(), out.is_terminal()) {
        eprintln!("{notice}");
        return Ok(ExitCode::SUCCESS);
    }
    out.write_all(&bytes)?;
    if out.is_terminal() && !bytes.ends_with(b"\n") {
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// What to say instead of writing a binary value (not text: `value` absent) to a terminal,
/// where its bytes would garble the screen. Redirected, the value is written as it is.
fn binary_for_a_terminal(
    key: &str,
    item: &StoreItem,
    len: usize,
    terminal: bool,
) -> Option<String> {
    (terminal && item.value.is_none()).then(|| {
        format!(
            "cnspr: {key:?} holds {len} bytes of binary data, not printed to the terminal; \
             redirect them (`cnspr db get {key} > FILE`) or see them in base64 with --json"
        )
    })
}

/// Prints `db list` as the items come, page by page: lines of text, or one JSON array.
struct ListPrinter<W: Write> {
    out: W,
    json: bool,
    printed: usize,
}

impl<W: Write> ListPrinter<W> {
    fn item(&mut self, item: &StoreItem) -> std::io::Result<()> {
        if self.json {
            let text = serde_json::to_string_pretty(item)?;
            self.out
                .write_all(if self.printed == 0 { b"[\n" } else { b",\n" })?;
            // Indented as one element of a pretty-printed array.
            for (i, line) in text.lines().enumerate() {
                if i > 0 {
                    self.out.write_all(b"\n")?;
                }
                write!(self.out, "  {line}")?;
            }
        } else {
            writeln!(self.out, "{}\t{}", escape(&item.key), shown_value(item))?;
        }
        self.printed += 1;
        Ok(())
    }

    /// Ends the output; returns the writer.
    fn finish(mut self) -> std::io::Result<W> {
        if self.json {
            self.out
                .write_all(if self.printed == 0 { b"[]\n" } else { b"\n]\n" })?;
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

async fn list(env: &DeviceEnv, prefix: String, as_json: bool) -> anyhow::Result<ExitCode> {
    let mut printer = ListPrinter {
        out: std::io::BufWriter::new(std::io::stdout().lock()),
        json: as_json,
        printed: 0,
    };
    let socket = env.paths.public_socket();
    let not_running = match Client::connect(&socket).await {
        Ok(mut client) => {
            // Page after page on one connection; each page is printed before the next is
            // asked for, so memory holds one page at most.
            let mut after: Option<String> = None;
            loop {
                let params = json!({ "prefix": prefix, "after": after });
                let page =
                    client
                        .call("db.list", params, CALL_TIMEOUT)
                        .await
                        .map_err(|e| match e {
                            ClientError::Rpc(e) => anyhow::anyhow!(e.message),
                            e => e.into(),
                        })?;
                let page: StoreListPage =
                    serde_json::from_value(page).context("the daemon's list is not understood")?;
                for item in &page.items {
                    printer.item(item)?;
                }
                match page.next_after {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            printer.finish()?;
            return Ok(ExitCode::SUCCESS);
        }
        Err(e @ ClientError::NotRunning { .. }) => e,
        Err(e) => return Err(e.into()),
    };
    if let Some(store) = offline_store(env, not_running)? {
        let names = offline_names(env);
        let mut failed = None;
        store
            .scan_live(&prefix, None, |key, record| {
                match printer.item(&item(&key, &record, &names)) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(e) => {
                        failed = Some(e);
                        ControlFlow::Break(())
                    }
                }
            })
            .map_err(offline_error)?;
        if let Some(e) = failed {
            return Err(e.into());
        }
    }
    printer.finish()?;
    Ok(ExitCode::SUCCESS)
}

/// One line per key: tab, newline, carriage return and backslash escaped as `\t`, `\n`, `\r`,
/// `\\`, and every other control character as Rust writes it (`\0`, `\u{1b}`), so that nothing
/// printed can move the cursor, clear the screen or break the line format.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.extend(c.escape_debug()),
            c => out.push(c),
        }
    }
    out
}

fn shown_value(item: &StoreItem) -> String {
    match (&item.value, item.value_bytes()) {
        (Some(text), _) => escape(text),
        (None, Ok(bytes)) => format!(
            "({} bytes of binary data; --json shows them in base64)",
            bytes.len()
        ),
        (None, Err(_)) => "(a value the daemon sent in broken base64)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_values_are_not_written_to_a_terminal() {
        let item = |value: serde_json::Value| -> StoreItem {
            let mut item = json!({"key": "k", "deleted": false, "writer": "a",
                "writer_id": "1tek-9fhz-5fej-yjfe", "time": "2026-12-06T10:00:00Z",
                "timestamp": 1, "counter": 0});
            item.as_object_mut()
                .unwrap()
                .extend(value.as_object().unwrap().clone());
            serde_json::from_value(item).unwrap()
        };
        let binary = item(json!({"value_base64": "YQBi"}));
        let notice = binary_for_a_terminal("k", &binary, 3, true).unwrap();
        assert!(notice.contains("3 bytes of binary data") && notice.contains("--json"));
        assert_eq!(binary_for_a_terminal("k", &binary, 3, false), None);
        let text = item(json!({"value": "hello"}));
        assert_eq!(binary_for_a_terminal("k", &text, 5, true), None);
    }

    #[test]
    fn list_lines_escape_separators_and_control_characters() {
        assert_eq!(escape("a\tb\nc\\d"), "a\\tb\\nc\\\\d");
        assert_eq!(escape("plain ü"), "plain ü");
        assert_eq!(
            escape("nul\0esc\u{1b}[2J\u{85}"),
            "nul\\0esc\\u{1b}[2J\\u{85}"
        );
    }

    fn stored(value: &[u8]) -> StoreItem {
        let record = cnsprcy_mesh::store::Record {
            ts: cnsprcy::wire::StoreTimestamp { ms: 1, counter: 0 },
            writer: [1; 32],
            value: Some(value.to_vec()),
        };
        item("k", &record, &HashMap::new())
    }

    #[test]
    fn binary_values_show_their_exact_size() {
        for len in [0usize, 1, 5, 20, 100, 1000] {
            let value: Vec<u8> = (0..len).map(|i| 0x80 | i as u8).collect();
            let shown = shown_value(&stored(&value));
            if len == 0 {
                assert_eq!(shown, "");
            } else {
                assert_eq!(
                    shown,
                    format!("({len} bytes of binary data; --json shows them in base64)")
                );
            }
        }
        assert_eq!(shown_value(&stored(b"a\0b")), "a\\0b");
    }

    #[test]
    fn the_json_list_is_one_array_however_it_is_paged() {
        let items: Vec<StoreItem> = [b"x".as_slice(), &[0xff, 0], b""]
            .iter()
            .map(|v| stored(v))
            .collect();
        let mut printer = ListPrinter {
            out: Vec::new(),
            json: true,
            printed: 0,
        };
        for item in &items {
            printer.item(item).unwrap();
        }
        let out = printer.finish().unwrap();
        let expected = format!("{}\n", serde_json::to_string_pretty(&items).unwrap());
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        let empty = ListPrinter {
            out: Vec::new(),
            json: true,
            printed: 0,
        };
        assert_eq!(empty.finish().unwrap(), b"[]\n");
    }
}
