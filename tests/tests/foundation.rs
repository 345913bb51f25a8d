//! The foundation, through real processes: identity, configuration errors, the public socket's
//! permissions and error handling, single instance, clean shutdown, and helper services that
//! reconnect when the mesh service restarts.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use cnsprcy_tests::{Device, bin, is_root, wait_until};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

#[test]
fn serve_answers_status_and_stops_cleanly_on_sigterm() {
    let mut device = Device::new("desk");
    device.write_config("name = \"desk\"\n[mesh]\nlisten = [\"127.0.0.1:17332\"]\n");
    let pid = device.start();

    let status = device.cnspr_json(&["status"]);
    assert_eq!(status["name"], "desk");
    assert_eq!(status["pid"], pid);
    assert_eq!(status["listen"], json!(["127.0.0.1:17332"]));
    let id = status["id"].as_str().unwrap();
    assert_eq!(id.len(), 19, "{id}");
    assert_eq!(status["public_key"].as_str().unwrap().len(), 44);
    let services: Vec<(String, String)> = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().into(),
                s["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        services,
        [
            ("mesh", "running"),
            ("netwatch", "connected"),
            ("discovery", "connected"),
            ("handlers", "connected"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    // The identity the daemon created on first start is the one `manage id` reads.
    assert_eq!(device.cnspr_json(&["manage", "id"])["id"], id);
    device
        .cnspr(&["status"])
        .success()
        .stdout_has("device      desk")
        .stdout_has(id);

    let status = device.stop_with("serve", Signal::SIGTERM);
    assert!(status.success(), "serve exited with {status}");
    for socket in ["cnsprcy.sock", "mesh.sock", "handlers.sock"] {
        assert!(
            !device.runtime_dir().join(socket).exists(),
            "{socket} left behind"
        );
    }
    device
        .cnspr(&["status"])
        .code(3)
        .stderr_has("not running")
        .stderr_has("cnspr serve");
    let json = device.cnspr(&["status", "--json"]).code(3).json();
    assert_eq!(json["running"], false);
}

#[test]
fn sigint_stops_serve_too() {
    let mut device = Device::new("desk");
    device.start();
    let status = device.stop_with("serve", Signal::SIGINT);
    assert!(status.success(), "serve exited with {status}");
    assert!(!device.socket().exists());
}

#[test]
fn a_second_serve_is_refused_and_the_first_keeps_running() {
    let mut device = Device::new("desk");
    let first = device.start();
    device.spawn("second", &bin("cnspr"), &["serve"]);
    let status = device
        .wait_exit("second", Duration::from_secs(15))
        .expect("second serve exits");
    assert_eq!(status.code(), Some(1));
    let log = device.log("second");
    assert!(log.contains("already running"), "{log}");
    assert!(log.contains(&format!("pid {first}")), "{log}");
    assert_eq!(device.cnspr_json(&["status"])["pid"], first);
}

#[test]
fn identity_is_created_once_and_damaged_keys_are_refused_not_replaced() {
    let mut device = Device::new("desk");
    let created = device.cnspr_json(&["manage", "init", "--name", "desk-1"]);
    assert_eq!(created["name"], "desk-1");
    let key = device.key_file();
    assert_eq!(fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
    assert_eq!(
        fs::metadata(device.state_dir()).unwrap().mode() & 0o777,
        0o700
    );
    assert_eq!(fs::metadata(&key).unwrap().len(), 32);
    assert_eq!(device.cnspr_json(&["manage", "id"]), created);

    // A second init is refused and changes nothing.
    let before = fs::read(&key).unwrap();
    device
        .cnspr(&["manage", "init"])
        .code(1)
        .stderr_has("already exists")
        .stderr_has("--force");
    assert_eq!(fs::read(&key).unwrap(), before);

    // --force replaces it, keeping the stored name.
    let replaced = device.cnspr_json(&["manage", "init", "--force"]);
    assert_ne!(replaced["id"], created["id"]);
    assert_eq!(replaced["name"], "desk-1");

    // A key others can read is an error for every command and for the daemon.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    device
        .cnspr(&["manage", "id"])
        .code(1)
        .stderr_has("chmod 600");
    device.serve_refuses("serve", "chmod 600");

    // A key of the wrong length likewise, and it is left as it is.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&key, b"not a key").unwrap();
    device
        .cnspr(&["manage", "id"])
        .code(1)
        .stderr_has("exactly 32 bytes");
    device.serve_refuses("serve2", "exactly 32 bytes");
    assert_eq!(fs::read(&key).unwrap(), b"not a key");

    // Names are checked before anything is written.
    device
        .cnspr(&["manage", "init", "--force", "--name", "no spaces"])
        .code(2)
        .stderr_has("letters, digits");
}

#[test]
fn identity_cannot_be_replaced_while_the_daemon_runs() {
    let mut device = Device::new("desk");
    device.start();
    let before = fs::read(device.key_file()).unwrap();
    device
        .cnspr(&["manage", "init", "--force"])
        .code(1)
        .stderr_has("daemon is running");
    assert_eq!(fs::read(device.key_file()).unwrap(), before);
}

#[test]
fn config_errors_name_the_file_line_and_key() {
    let mut device = Device::new("desk");
    device.write_config("name = \"desk\"\n\n[mesh]\nlisen = [\"127.0.0.1:7332\"]\n");
    let file = device.config_file().display().to_string();
    device
        .cnspr(&["config", "show"])
        .code(1)
        .stderr_has(&format!("{file}:4:1: unknown key `mesh.lisen`"))
        .stderr_has("did you mean `listen`?");
    // The daemon refuses to start with the same message.
    device.serve_refuses("serve", ":4:1: unknown key");

    device.write_config("[mesh]\nlisten = [\"127.0.0.1:7332\", \"localhost\"]\n");
    device
        .cnspr(&["config", "show"])
        .code(1)
        .stderr_has(&format!("{file}:2:"))
        .stderr_has("bad value for `mesh.listen`");

    device.write_config("listen = []\n");
    device
        .cnspr(&["config", "path"])
        .code(1)
        .stderr_has("belongs in the [mesh] section");

    // CNSPRCY_CONFIG names another file; a missing one is an error, not silent defaults.
    let other = device.root().join("other.toml");
    let run = |device: &Device| {
        device
            .command(bin("cnspr"))
            .args(["config", "show", "--json"])
            .env("CNSPRCY_CONFIG", &other)
            .output()
            .unwrap()
    };
    let output = run(&device);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("CNSPRCY_CONFIG"));
    fs::write(&other, "name = \"elsewhere\"\n").unwrap();
    let output = run(&device);
    assert!(output.status.success());
    let shown: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(shown["name"], "elsewhere");
}

#[test]
fn bad_arguments_are_usage_errors_in_the_users_units() {
    let device = Device::new("desk");
    for (args, needle) in [
        (
            &["send", "_bad", "x"][..],
            "names starting with '_' are reserved",
        ),
        (
            &["send", "notify", "--ttl", "60d"],
            "`60d` is longer than the longest TTL, 30 days",
        ),
        (
            &["send", "notify", "--ttl", "soon"],
            "`soon` is not a duration; write it like 30s, 5m, 2h",
        ),
        (
            &["send", "notify", "--ttl", "5ms"],
            "`5ms` is shorter than the shortest TTL, 100 ms",
        ),
        (
            &["send", "notify", "--wait", "--timeout", "2h"],
            "`2h` is longer than the longest wait, 1 hour",
        ),
        (
            &["ping", "desk", "--timeout", "2m"],
            "`2m` is longer than the longest ping time-out, 60 seconds",
        ),
    ] {
        device.cnspr(args).code(2).stderr_has(needle);
    }

    // The configuration file's numbers say what to write instead.
    device.write_config("[mesh]\nkeepalive_interval = 20\n");
    device
        .cnspr(&["config", "show"])
        .code(1)
        .stderr_has("bad value for `mesh.keepalive_interval`: 20 has no unit")
        .stderr_has("like \"20s\"");
    device.write_config("[handlers]\nmax_running = -1\n");
    device
        .cnspr(&["config", "show"])
        .code(1)
        .stderr_has("bad value for `handlers.max_running`: -1 is not a whole number of at least 1");
}

#[test]
fn config_example_and_show_and_path() {
    let device = Device::new("desk");
    let example = device.cnspr(&["config", "example"]).success().stdout;
    device.write_config(&example);
    let shown = device.cnspr_json(&["config", "show"]);
    assert_eq!(
        shown["mesh"]["listen"],
        json!(["0.0.0.0:7332", "[::]:7332"])
    );
    assert_eq!(
        shown["paths"]["state_dir"],
        device.state_dir().display().to_string()
    );
    assert_eq!(
        shown["discovery"],
        json!({"enabled": true, "interfaces": []})
    );
    assert_eq!(shown["mesh"]["interfaces"], json!([]));
    let paths = device.cnspr_json(&["config", "path"]);
    assert_eq!(paths["config_file_exists"], true);
    assert_eq!(paths["socket"], device.socket().display().to_string());
    // A uncommented example still parses.
    let uncommented: String = example
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if rest.contains(" = ") && !rest.starts_with("runtime_dir") => rest,
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    device.write_config(&uncommented);
    assert_eq!(device.cnspr_json(&["config", "show"])["name"], "laptop");
    device
        .cnspr(&["config", "show"])
        .success()
        .stdout_has("name = \"laptop\"");
}

/// Sends raw lines on one connection and reads one answer per line that expects one.
struct RawClient {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl RawClient {
    fn connect(device: &Device) -> Self {
        let stream = UnixStream::connect(device.socket()).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Self {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    fn send(&mut self, line: &[u8]) -> Value {
        self.writer.write_all(line).unwrap();
        self.writer.write_all(b"\n").unwrap();
        let mut answer = String::new();
        self.reader.read_line(&mut answer).expect("an answer");
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("bad answer {answer:?}: {e}"))
    }
}

#[test]
fn malformed_api_input_gets_errors_and_the_connection_stays() {
    let mut device = Device::new("desk");
    device.start();
    let mut client = RawClient::connect(&device);
    let code = |v: &Value| v["error"]["code"].as_i64().unwrap_or(0);

    assert_eq!(code(&client.send(b"this is not json")), -32700);
    assert_eq!(code(&client.send(b"\xff\xfe binary")), -32700);
    assert_eq!(code(&client.send(b"{}")), -32600);
    assert_eq!(code(&client.send(b"[]")), -32600);
    assert_eq!(
        code(&client.send(br#"{"jsonrpc":"2.0","id":1,"method":7}"#)),
        -32600
    );
    let v = client.send(br#"{"jsonrpc":"2.0","id":2,"method":"stat"}"#);
    assert_eq!(code(&v), -32601);
    assert_eq!(v["id"], 2);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"status\"")
    );
    let v = client.send(br#"{"jsonrpc":"2.0","id":3,"method":"status","params":{"x":1}}"#);
    assert_eq!(code(&v), -32602);
    let huge = vec![b'x'; 25 * 1024 * 1024];
    assert_eq!(code(&client.send(&huge)), -32600);

    // After all that, the same connection still works, in a batch too.
    let v = client.send(br#"{"jsonrpc":"2.0","id":"last","method":"status"}"#);
    assert_eq!(v["id"], "last");
    assert_eq!(v["result"]["name"], device.cnspr_json(&["status"])["name"]);
    let v = client.send(
        br#"[{"jsonrpc":"2.0","id":1,"method":"status"},{"jsonrpc":"2.0","id":2,"method":"nope"}]"#,
    );
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert!(device.try_wait("serve").is_none(), "daemon died");

    // A client that vanishes mid-line harms nothing either.
    let mut gone = UnixStream::connect(device.socket()).unwrap();
    gone.write_all(b"{\"jsonrpc\":\"2.0\",").unwrap();
    drop(gone);
    device.cnspr(&["status"]).success();
}

#[test]
fn sockets_are_private_and_other_users_are_refused() {
    let mut device = Device::new("desk");
    device.start();
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode(&device.runtime_dir()), 0o700);
    for socket in ["cnsprcy.sock", "mesh.sock", "handlers.sock"] {
        assert_eq!(mode(&device.runtime_dir().join(socket)), 0o600, "{socket}");
    }
    if !is_root() {
        eprintln!("not root: cannot run a client as another user; uid check not exercised");
        return;
    }
    // A copy of the CLI that user "nobody" can execute.
    let cli = device.root().join("cnspr-copy");
    fs::copy(bin("cnspr"), &cli).unwrap();
    fs::set_permissions(&cli, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(device.root(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(device.root().join("run"), fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = || {
        let output = device
            .command(&cli)
            .args(["status", "--json"])
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    // The directory keeps others out.
    let (code, stderr) = as_nobody();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.to_lowercase().contains("permission denied"),
        "{stderr}"
    );
    // With the file permissions opened up, the daemon still refuses by the peer's uid.
    fs::set_permissions(device.runtime_dir(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(device.socket(), fs::Permissions::from_mode(0o666)).unwrap();
    let (code, stderr) = as_nobody();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("uid 65534"), "{stderr}");
    assert!(device.log("serve").contains("uid 65534"));
    device.cnspr(&["status"]).success();
}

#[test]
fn helper_services_reconnect_after_the_mesh_service_restarts() {
    let mut device = Device::new("desk");
    // The helpers start first and wait for the mesh service.
    let netwatch = device.spawn("netwatch", &bin("cnsprcy-netwatch"), &[]);
    let discovery = device.spawn("discovery", &bin("cnsprcy-discovery"), &[]);
    let handlers = device.spawn("handlers", &bin("cnsprcy-handlers"), &[]);
    device.spawn("mesh", &bin("cnsprcy-mesh"), &[]);
    device.wait_ready("mesh");

    let service_pids = |device: &Device| -> Option<Vec<u64>> {
        let status = device.cnspr(&["status", "--json"]);
        if !status.status.success() {
            return None;
        }
        status.json()["services"]
            .as_array()?
            .iter()
            .map(|s| s["pid"].as_u64())
            .collect()
    };
    let all_connected = |device: &Device, expected: &[u64]| {
        wait_until(Duration::from_secs(20), || {
            service_pids(device).is_some_and(|pids| pids[1..] == *expected)
        })
    };
    let expected = [netwatch as u64, discovery as u64, handlers as u64];
    assert!(
        all_connected(&device, &expected),
        "{:?}",
        service_pids(&device)
    );

    // A crash (no clean shutdown, stale sockets left) and a restart of the mesh service.
    device.stop_with("mesh", Signal::SIGKILL);
    device.cnspr(&["status"]).code(3);
    device.spawn("mesh", &bin("cnsprcy-mesh"), &[]);
    device.wait_ready("mesh");
    assert!(
        all_connected(&device, &expected),
        "{:?}",
        service_pids(&device)
    );
    assert!(device.log("netwatch").contains("reconnecting"));

    // The handler service restarting is picked up on the mesh service's next call.
    device.stop_with("handlers", Signal::SIGTERM);
    let handlers = device.spawn("handlers", &bin("cnsprcy-handlers"), &[]);
    let expected = [netwatch as u64, discovery as u64, handlers as u64];
    assert!(
        all_connected(&device, &expected),
        "{:?}",
        service_pids(&device)
    );

    for label in ["netwatch", "discovery", "handlers", "mesh"] {
        assert!(device.try_wait(label).is_none(), "{label} exited");
    }
}

#[test]
fn idle_and_stalled_api_clients_neither_lock_out_the_cli_nor_delay_shutdown() {
    let mut device = Device::new("desk");
    device.start();
    // 100 clients that connect and say nothing: more than the 64 served at once.
    let idle: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(device.socket()).unwrap())
        .collect();
    device.cnspr(&["status"]).success();
    device.cnspr(&["peers"]).success();
    // Subscribers that never read what they are sent, while events flow (store writes raise
    // one each): they are not evicted, but cannot hold anything up either.
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let mut client = RawClient::connect(&device);
        let v = client.send(br#"{"jsonrpc":"2.0","id":1,"method":"subscribe"}"#);
        assert_eq!(v["result"]["subscribed"], true, "{v}");
        stalled.push(client);
    }
    // Each event names its 1000-byte key: 600 of them overflow what the socket buffers.
    let mut writer = RawClient::connect(&device);
    for i in 0..600 {
        let key = format!("{i:04}{}", "k".repeat(996));
        let line = json!({"jsonrpc": "2.0", "id": i, "method": "db.set", "params": {"key": key, "value": "v"}});
        let v = writer.send(line.to_string().as_bytes());
        assert!(v["result"].is_object(), "{v}");
    }
    device.cnspr(&["status"]).success();
    let started = std::time::Instant::now();
    let status = device.stop_with("serve", Signal::SIGTERM);
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "SIGTERM took {:?}",
        started.elapsed()
    );
    drop((idle, stalled));
}

/// The bash completion script, sourced in a real bash, offers the roster's member names where a
/// member is named (asking `cnspr` on PATH, as installed), and subcommands as before.
#[test]
fn member_names_complete_in_bash() {
    let ns = cnsprcy_tests::netns::NetNs::new();
    let mut laptop = Device::new("laptop");
    laptop.configure("127.0.0.1:17851");
    laptop.start_in(&ns);
    for (name, port) in [("desk", 17852), ("phone", 17853)] {
        let other = Device::new(name);
        other.configure(&format!("127.0.0.1:{port}"));
        other.cnspr(&["manage", "init"]).success();
        laptop.add_member(&other, None);
    }
    let bin_dir = bin("cnspr").parent().unwrap().to_owned();
    let complete = |line: &str| -> Vec<String> {
        // COMP_WORDS as bash splits the line; the last word is the one being completed.
        let script = format!(
            r#"source <(cnspr completions bash)
COMP_LINE='{line}'; read -ra COMP_WORDS <<< "$COMP_LINE"
[[ "$COMP_LINE" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 )); COMP_TYPE=9
_clap_complete_cnspr cnspr "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\n' "${{COMPREPLY[@]}}""#
        );
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let output = laptop
            .command("bash")
            .args(["-c", &script])
            .env("PATH", path)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut words: Vec<String> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|w| w.trim().to_owned())
            .filter(|w| !w.is_empty())
            .collect();
        words.sort();
        words
    };
    // Flags are offered beside the names on an empty word.
    let names = |words: Vec<String>| -> Vec<String> {
        words.into_iter().filter(|w| !w.starts_with('-')).collect()
    };
    assert_eq!(names(complete("cnspr ping ")), ["desk", "phone"]);
    assert_eq!(complete("cnspr ping p"), ["phone"]);
    assert_eq!(complete("cnspr send note --to d"), ["desk"]);
    assert!(complete("cnspr peers ").contains(&"desk".to_owned()));
    assert!(complete("cnspr manage remove ").contains(&"phone".to_owned()));
    assert_eq!(complete("cnspr pi"), ["ping"]);
}
