//! The handler service as a real process: real scripts in a temporary handler directory, driven
//! over `handlers.sock` the way the mesh service drives it. Payload and environment in, reply
//! and exit status out; time-outs that kill whole process groups; ordering per sender and tag
//! while slow tags run alongside; refusals; payloads at the size limit; and `cnspr handlers
//! list|check` on a crafted directory.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cnsprcy::framing::JsonConnection;
use cnsprcy::ipc::{
    EVENT_MESSAGE, FromHandlers, MAX_PAYLOAD_BYTES, MAX_REPLY_BYTES, Outcome, Run, RunResult,
    Sender, ToHandlers,
};
use cnsprcy_tests::{Device, STARTUP_TIMEOUT, bin, is_root, wait_until};
use tokio::net::UnixStream;

/// How long a test waits for one answer before failing with the service's log.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// A device with a handler directory and, once started, its handler service.
struct Handlers {
    device: Device,
}

impl Handlers {
    /// A device whose config sets `[handlers]` to `settings`.
    fn new(settings: &str) -> Self {
        let device = Device::new("desk");
        device.write_config(&format!("name = \"desk\"\n[handlers]\n{settings}\n"));
        let handlers = Self { device };
        fs::create_dir_all(handlers.dir()).unwrap();
        fs::set_permissions(handlers.dir(), fs::Permissions::from_mode(0o700)).unwrap();
        handlers
    }

    fn dir(&self) -> PathBuf {
        self.device.root().join("config/cnsprcy/handlers")
    }

    /// Writes a shell script handler at `rel` with `mode`.
    fn script(&self, rel: &str, body: &str, mode: u32) -> PathBuf {
        let path = self.dir().join(rel);
        let parent = path.parent().unwrap();
        fs::create_dir_all(parent).unwrap();
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn socket(&self) -> PathBuf {
        self.device.runtime_dir().join("handlers.sock")
    }

    /// Starts `cnsprcy-handlers` in its own network namespace and connects to it.
    async fn start(&mut self) -> Client {
        self.device.spawn("handlers", &bin("cnsprcy-handlers"), &[]);
        let socket = self.socket();
        let up = wait_until(STARTUP_TIMEOUT, || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        assert!(up, "the handler service did not listen:\n{}", self.log());
        let stream = UnixStream::connect(&socket).await.unwrap();
        Client {
            conn: JsonConnection::new(stream),
            next_id: 0,
            early: HashMap::new(),
        }
    }

    fn log(&self) -> String {
        self.device.log("handlers")
    }
}

/// The mesh service's side of `handlers.sock`, reduced to what the tests need.
struct Client {
    conn: JsonConnection<UnixStream>,
    next_id: u64,
    /// Answers that came while waiting for another one.
    early: HashMap<u64, RunResult>,
}

fn sender(name: &str) -> Sender {
    // Any stable text: the service passes it on and orders by it.
    Sender {
        name: name.to_owned(),
        id: format!("{name}-id"),
    }
}

fn message(tag: &str, from: &str, payload: &[u8]) -> Run {
    Run {
        run_id: 0,
        event: EVENT_MESSAGE.to_owned(),
        tag: tag.to_owned(),
        from: Some(sender(from)),
        message_id: Some(format!("msg-{tag}")),
        device: "desk".to_owned(),
        env: Vec::new(),
        payload: payload.to_vec(),
        report_start: false,
    }
}

impl Client {
    /// Sends `run` with a fresh id; returns the id.
    async fn send(&mut self, mut run: Run) -> u64 {
        self.next_id += 1;
        run.run_id = self.next_id;
        self.conn
            .send(&ToHandlers::Run(Box::new(run)))
            .await
            .unwrap();
        self.next_id
    }

    /// The next message from the service.
    async fn next(&mut self) -> FromHandlers {
        tokio::time::timeout(ANSWER_TIMEOUT, self.conn.recv::<FromHandlers>())
            .await
            .expect("an answer in time")
            .expect("a readable answer")
            .expect("the connection stays open")
    }

    /// The next answer of any run.
    async fn next_done(&mut self) -> (u64, RunResult) {
        loop {
            match self.next().await {
                FromHandlers::Done { run_id, result } => return (run_id, result),
                FromHandlers::Pong { .. } | FromHandlers::Started { .. } => continue,
                FromHandlers::NotStarted { run_id, reason } => {
                    panic!("run {run_id} not started: {reason}")
                }
            }
        }
    }

    /// The answer of run `id`.
    async fn done(&mut self, id: u64) -> RunResult {
        if let Some(result) = self.early.remove(&id) {
            return result;
        }
        loop {
            let (run_id, result) = self.next_done().await;
            if run_id == id {
                return result;
            }
            self.early.insert(run_id, result);
        }
    }

    async fn run(&mut self, run: Run) -> RunResult {
        let id = self.send(run).await;
        self.done(id).await
    }
}

fn stdout(result: &RunResult) -> String {
    String::from_utf8_lossy(&result.stdout).into_owned()
}

/// Whether process `pid` has ended (a zombie counts: it runs nothing any more).
fn gone(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn read_pid(path: &Path) -> i32 {
    let ok = wait_until(Duration::from_secs(10), || {
        fs::read_to_string(path).is_ok_and(|t| t.ends_with('\n'))
    });
    assert!(ok, "{} was not written", path.display());
    fs::read_to_string(path).unwrap().trim().parse().unwrap()
}

#[tokio::test]
async fn payload_and_environment_arrive_reply_and_exit_status_return() {
    let mut h = Handlers::new("timeout = \"10s\"");
    h.script(
        "echo/env.sh",
        r#"payload=$(cat)
echo "payload=$payload"
echo "tag=$CNSPRCY_TAG from=$CNSPRCY_FROM from_id=$CNSPRCY_FROM_ID"
echo "message=$CNSPRCY_MESSAGE_ID event=$CNSPRCY_EVENT device=$CNSPRCY_DEVICE"
echo "extra=$EXTRA handler=$CNSPRCY_HANDLER cwd=$(basename "$(pwd)")"
echo "a line for the log" >&2
exit 3"#,
        0o700,
    );
    h.script("echo/_default", "echo fallback for $CNSPRCY_TAG", 0o700);
    h.script(
        "_events/peer-up",
        "echo \"event=$CNSPRCY_EVENT tag=$CNSPRCY_TAG peer=$CNSPRCY_PEER from=[$CNSPRCY_FROM]\"",
        0o700,
    );
    let mut client = h.start().await;

    let mut run = message("echo/env", "laptop", b"hello handler");
    run.env = vec![("EXTRA".into(), "yes".into())];
    let result = client.run(run).await;
    assert_eq!(result.outcome, Outcome::Exited { code: 3 }, "{}", h.log());
    assert_eq!(result.handler.as_deref(), Some("echo/env.sh"));
    assert_eq!(
        stdout(&result),
        "payload=hello handler\n\
         tag=echo/env from=laptop from_id=laptop-id\n\
         message=msg-echo/env event=message device=desk\n\
         extra=yes handler=echo/env.sh cwd=echo\n"
    );

    // The directory fallback catches the rest of echo/...; an unknown tag has no handler.
    let result = client.run(message("echo/other/deep", "laptop", b"")).await;
    assert_eq!(stdout(&result), "fallback for echo/other/deep\n");
    assert_eq!(result.handler.as_deref(), Some("echo/_default"));
    let result = client.run(message("nothing/here", "laptop", b"")).await;
    assert_eq!(result.outcome, Outcome::NoHandler);
    assert_eq!(result.handler, None);

    // A built-in event runs from _events/, without a sender.
    let event = Run {
        event: "peer-up".into(),
        tag: "peer-up".into(),
        from: None,
        message_id: None,
        env: vec![("CNSPRCY_PEER".into(), "phone".into())],
        ..message("x", "x", b"")
    };
    let result = client.run(event).await;
    assert_eq!(result.outcome, Outcome::Exited { code: 0 });
    assert_eq!(
        stdout(&result),
        "event=peer-up tag=peer-up peer=phone from=[]\n"
    );
    let result = client
        .run(Run {
            event: "daemon-start".into(),
            tag: "daemon-start".into(),
            from: None,
            ..message("x", "x", b"")
        })
        .await;
    assert_eq!(result.outcome, Outcome::NoHandler);

    // stderr went to the log, line by line, with the handler's name and tag.
    let log = h.log();
    let line = log
        .lines()
        .find(|l| l.contains("a line for the log"))
        .unwrap_or_else(|| panic!("stderr not logged:\n{log}"));
    assert!(line.contains("handler=echo/env.sh"), "{line}");
    assert!(line.contains("tag=echo/env"), "{line}");
    assert!(log.contains("no handler for tag nothing/here"), "{log}");
}

#[tokio::test]
async fn a_timed_out_handler_is_killed_with_its_children() {
    let mut h = Handlers::new("timeout = \"1s\"");
    let dir = h.dir();
    h.script(
        "slow",
        "echo $$ > main.pid\nsleep 60 &\necho $! > child.pid\necho started\nsleep 60",
        0o700,
    );
    let mut client = h.start().await;
    let begun = Instant::now();
    let result = client.run(message("slow", "laptop", b"")).await;
    assert_eq!(
        result.outcome,
        Outcome::TimedOut { after_ms: 1000 },
        "{}",
        h.log()
    );
    // SIGTERM ends `sh` and `sleep` at once: no need to wait for the SIGKILL grace.
    assert!(
        begun.elapsed() < Duration::from_secs(5),
        "{:?}",
        begun.elapsed()
    );
    assert_eq!(stdout(&result), "started\n");
    let main = read_pid(&dir.join("main.pid"));
    let child = read_pid(&dir.join("child.pid"));
    assert!(
        wait_until(Duration::from_secs(5), || gone(main) && gone(child)),
        "handler {main} or its child {child} survived the time-out"
    );
    assert!(h.log().contains("timed out"), "{}", h.log());
}

#[tokio::test]
async fn one_sender_and_tag_run_in_order_while_a_slow_tag_runs_alongside() {
    let mut h = Handlers::new("timeout = \"20s\"\nmax_running = 8");
    // Earlier payloads sleep longer, so runs that overlapped would finish out of order.
    h.script(
        "seq/append",
        r#"n=$(cat)
echo "start $n" >> "order-$CNSPRCY_FROM.log"
sleep "0.$((6 - n))"
echo "end $n" >> "order-$CNSPRCY_FROM.log"
echo "$n""#,
        0o700,
    );
    h.script("slow", "sleep 5; echo slow", 0o700);
    let mut client = h.start().await;

    let begun = Instant::now();
    let slow = client.send(message("slow", "laptop", b"")).await;
    let mut ids = Vec::new();
    for n in 1..=5 {
        for from in ["laptop", "phone"] {
            let id = client
                .send(message("seq/append", from, n.to_string().as_bytes()))
                .await;
            ids.push((id, n));
        }
    }
    for (id, n) in ids {
        let result = client.done(id).await;
        assert_eq!(result.outcome, Outcome::Exited { code: 0 }, "{}", h.log());
        assert_eq!(stdout(&result), format!("{n}\n"));
    }
    // Both senders' five runs, one after the other (~1.5 s each), took less time than the slow
    // handler, which started first and is still running.
    let seq_done = begun.elapsed();
    assert!(seq_done < Duration::from_secs(5), "{seq_done:?}");
    let result = client.done(slow).await;
    assert_eq!(stdout(&result), "slow\n");
    assert!(begun.elapsed() >= Duration::from_secs(5));

    let expected: String = (1..=5).map(|n| format!("start {n}\nend {n}\n")).collect();
    for from in ["laptop", "phone"] {
        let order = fs::read_to_string(h.dir().join(format!("seq/order-{from}.log"))).unwrap();
        assert_eq!(order, expected, "runs from {from} overlapped or reordered");
    }
}

#[tokio::test]
async fn handlers_that_may_not_run_are_refused_with_the_reason() {
    let mut h = Handlers::new("timeout = \"10s\"");
    h.script("plain", "echo ran", 0o644);
    h.script("open", "echo ran", 0o775);
    h.script("shared/x", "echo ran", 0o700);
    fs::set_permissions(h.dir().join("shared"), fs::Permissions::from_mode(0o777)).unwrap();
    h.script("twice", "echo ran", 0o700);
    h.script("twice.sh", "echo ran", 0o700);
    h.script("lock", "echo locked", 0o700);
    fs::write(h.dir().join("lock.from"), "# only the laptop\nlaptop\n").unwrap();
    let foreign = h.script("foreign", "echo ran", 0o700);
    if is_root() {
        nix::unistd::chown(&foreign, Some(nix::unistd::Uid::from_raw(12345)), None).unwrap();
    }
    let mut client = h.start().await;

    let refused = |result: RunResult| match result.outcome {
        Outcome::Refused { reason } => reason,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let reason = refused(client.run(message("plain", "laptop", b"")).await);
    assert!(reason.contains("plain is not executable"), "{reason}");
    let reason = refused(client.run(message("open", "laptop", b"")).await);
    assert!(
        reason.contains("open is writable by group or others"),
        "{reason}"
    );
    let reason = refused(client.run(message("shared/x", "laptop", b"")).await);
    assert!(reason.contains("directory shared is writable"), "{reason}");
    let reason = refused(client.run(message("twice", "laptop", b"")).await);
    assert!(reason.contains("ambiguous"), "{reason}");
    if is_root() {
        let reason = refused(client.run(message("foreign", "laptop", b"")).await);
        assert!(reason.contains("belongs to uid 12345"), "{reason}");
    }

    // The allow list: the laptop may, the phone may not.
    let result = client.run(message("lock", "laptop", b"")).await;
    assert_eq!(stdout(&result), "locked\n");
    let reason = refused(client.run(message("lock", "phone", b"")).await);
    assert!(reason.contains("phone is not in lock.from"), "{reason}");

    let log = h.log();
    assert!(log.contains("plain is not executable"), "{log}");
    assert!(log.contains("refused"), "{log}");
    // Nothing ran but the laptop's lock.
    assert_eq!(log.matches("handler finished").count(), 1, "{log}");
}

/// The hole from the issue: a handler that is a link to `X/t.sh`, where X is a directory others
/// may write, outside the handler directory. Another user swapped t.sh for a link to /bin/sh
/// between the check and the exec, and /bin/sh ran the message's payload as the device's user.
/// Now every directory on the way must be safe, so the link is refused (and `check` says why),
/// and what runs is the file that was checked.
#[tokio::test]
async fn a_link_into_a_directory_others_may_write_is_refused_even_while_it_is_swapped() {
    let mut h = Handlers::new("timeout = \"10s\"");
    let outside = tempfile::tempdir().unwrap();
    fs::set_permissions(outside.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let x = outside.path().join("x");
    fs::create_dir(&x).unwrap();
    fs::write(x.join("t.sh"), "#!/bin/sh\necho safe\n").unwrap();
    fs::set_permissions(x.join("t.sh"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(&x, fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::symlink(x.join("t.sh"), h.dir().join("linked")).unwrap();
    let x_real = x.canonicalize().unwrap();
    let mut client = h.start().await;

    let result = client.run(message("linked", "laptop", b"")).await;
    let Outcome::Refused { reason } = &result.outcome else {
        panic!("expected a refusal, got {:?}\n{}", result.outcome, h.log());
    };
    for needle in [
        "linked leads out of the handler directory".to_owned(),
        format!(
            "directory {} is writable by group or others",
            x_real.display()
        ),
        "chmod go-w".to_owned(),
    ] {
        assert!(reason.contains(&needle), "{needle:?} not in {reason}");
    }
    let check = h.device.cnspr(&["handlers", "check"]).code(1);
    assert!(
        check
            .stdout
            .contains("linked leads out of the handler directory")
            && check.stdout.contains(&x_real.display().to_string()),
        "{}",
        check.stdout
    );

    // The race itself, as another user (nobody) would run it, for a few seconds.
    if !is_root() || Command::new("setpriv").arg("--help").output().is_err() {
        eprintln!("skipping the race: needs root and setpriv");
        return;
    }
    let swapper = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c"])
        .arg(
            "cd \"$1\" && while :; do mv -f t.sh t.orig; ln -s /bin/sh t.sh; mv -f t.orig t.sh; done",
        )
        .args(["swapper", &x.display().to_string()])
        .spawn()
        .unwrap();
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _swapper = KillOnDrop(swapper);
    let pwned = x.join("pwned");
    let payload = format!("touch {}\n", pwned.display());
    let begun = Instant::now();
    let mut runs = 0;
    while begun.elapsed() < Duration::from_secs(3) {
        let result = client
            .run(message("linked", "laptop", payload.as_bytes()))
            .await;
        assert!(
            matches!(result.outcome, Outcome::Refused { .. }),
            "run {runs}: {:?}",
            result.outcome
        );
        runs += 1;
    }
    assert!(runs > 10, "only {runs} runs");
    assert!(!pwned.exists(), "the swapped-in /bin/sh ran the payload");
    assert_eq!(
        h.log().matches("handler finished").count(),
        0,
        "{}",
        h.log()
    );
}

/// The expected reply of the checksum handler: `sha256sum`'s digest of `data`.
fn sha256(data: &[u8]) -> String {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    fs::write(tmp.path(), data).unwrap();
    let out = Command::new("sha256sum").arg(tmp.path()).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_payload_at_the_limit_arrives_intact_and_a_long_reply_is_cut() {
    let mut h = Handlers::new("timeout = \"20s\"");
    h.script(
        "sum",
        "cat > payload.bin\nwc -c < payload.bin >&2\nsha256sum < payload.bin | cut -d' ' -f1",
        0o700,
    );
    h.script(
        "flood",
        &format!(
            "head -c {} /dev/zero; echo done >&2",
            MAX_REPLY_BYTES + 1000
        ),
        0o700,
    );
    let mut client = h.start().await;

    // Bytes that are not all alike, so a dropped or repeated block would show.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let payload: Vec<u8> = (0..MAX_PAYLOAD_BYTES)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let expected = sha256(&payload);
    let result = client.run(message("sum", "laptop", &payload)).await;
    assert_eq!(result.outcome, Outcome::Exited { code: 0 }, "{}", h.log());
    assert_eq!(stdout(&result).trim(), expected);
    assert!(
        h.log().contains(&MAX_PAYLOAD_BYTES.to_string()),
        "{}",
        h.log()
    );

    // One byte more is not run.
    let mut over = payload;
    over.push(0);
    let result = client.run(message("sum", "laptop", &over)).await;
    assert!(
        matches!(&result.outcome, Outcome::Failed { reason } if reason.contains("limit")),
        "{:?}",
        result.outcome
    );

    let result = client.run(message("flood", "laptop", b"")).await;
    assert_eq!(result.outcome, Outcome::Exited { code: 0 });
    assert_eq!(result.stdout.len(), MAX_REPLY_BYTES);
    assert!(h.log().contains("the reply was cut"), "{}", h.log());
}

#[tokio::test]
async fn pings_are_answered_while_runs_are_in_flight() {
    let mut h = Handlers::new("timeout = \"10s\"");
    h.script("wait", "sleep 2; echo waited", 0o700);
    let mut client = h.start().await;
    let id = client.send(message("wait", "laptop", b"")).await;
    client.conn.send(&ToHandlers::Ping).await.unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(1), client.conn.recv::<FromHandlers>())
        .await
        .expect("a pong while the handler runs")
        .unwrap();
    assert!(matches!(pong, Some(FromHandlers::Pong { .. })), "{pong:?}");
    assert_eq!(stdout(&client.done(id).await), "waited\n");
}

#[test]
fn handlers_list_and_check_explain_a_crafted_directory() {
    let h = Handlers::new("");
    let device = &h.device;
    h.script("clipboard/set.sh", "cat", 0o700);
    h.script("clipboard/_default", "cat", 0o700);
    fs::write(h.dir().join("clipboard/set.from"), "laptop\nphone # mine\n").unwrap();
    h.script("_default", "true", 0o700);
    h.script("_events/peer-up", "true", 0o700);
    h.script("notify", "true", 0o700);

    let list = device.cnspr(&["handlers", "list"]).success();
    for row in [
        "*              _default            top-level fallback       any member     ok",
        "event peer-up  _events/peer-up     built-in event           -              ok",
        "clipboard/*    clipboard/_default  directory fallback       any member     ok",
        "clipboard/set  clipboard/set.sh    name with extension .sh  laptop, phone  ok",
        "notify         notify              exact name               any member     ok",
    ] {
        assert!(
            list.stdout.contains(row),
            "missing {row:?} in\n{}",
            list.stdout
        );
    }
    device
        .cnspr(&["handlers", "check"])
        .success()
        .stdout_has("No problems");

    // Break it in every way check knows of.
    h.script("notify.sh", "true", 0o700);
    h.script("clipboard/get", "cat", 0o644);
    h.script("bad name", "true", 0o700);
    h.script("_events/peer-sideways", "true", 0o700);
    fs::write(h.dir().join("orphan.from"), "laptop\n").unwrap();
    fs::write(h.dir().join("clipboard/set.from"), "laptop\nno good!\n").unwrap();

    let check = device.cnspr(&["handlers", "check"]).code(1);
    for needle in [
        "6 problems in",
        "ambiguous: notify, notify.sh",
        "clipboard/get is not executable (mode 0644)",
        "bad name can never match",
        "no built-in event \"peer-sideways\"",
        "orphan.from limits nothing",
        "clipboard/set.from:2: \"no good!\" is neither a device name nor a device ID",
    ] {
        assert!(
            check.stdout.contains(needle),
            "missing {needle:?} in\n{}",
            check.stdout
        );
    }
    let json = device
        .cnspr(&["handlers", "check", "--json"])
        .code(1)
        .json();
    assert_eq!(json["ok"], false);
    let kinds: Vec<&str> = json["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap())
        .collect();
    for kind in [
        "ambiguous",
        "not_executable",
        "bad_name",
        "unknown_event",
        "allow_list_orphan",
        "allow_list_bad_line",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }

    let list = device.cnspr_json(&["handlers", "list"]);
    let handlers = list["handlers"].as_array().unwrap();
    let set = handlers
        .iter()
        .find(|e| e["file"] == "clipboard/set.sh")
        .unwrap();
    assert_eq!(set["tag"], "clipboard/set");
    assert_eq!(set["match"], "extension");
    assert_eq!(set["extension"], "sh");
    assert_eq!(set["from"]["devices"], serde_json::json!(["laptop"]));
    assert_eq!(set["runs"], true);
    let get = handlers
        .iter()
        .find(|e| e["file"] == "clipboard/get")
        .unwrap();
    assert_eq!(get["runs"], false);
    device
        .cnspr(&["handlers", "list"])
        .success()
        .stdout_has("3 handlers would be refused");

    // Without a handler directory, nothing is wrong and list says how to start.
    fs::remove_dir_all(h.dir()).unwrap();
    device
        .cnspr(&["handlers", "list"])
        .success()
        .stdout_has("does not exist");
    device.cnspr(&["handlers", "check"]).success();
}

#[tokio::test]
async fn at_stop_daemon_stop_still_runs_and_running_handlers_are_killed() {
    let mut h = Handlers::new("timeout = \"60s\"");
    let dir = h.dir();
    h.script("slow", "echo $$ > slow.pid\nexec sleep 60", 0o700);
    h.script(
        "_events/daemon-stop",
        "echo goodbye from $CNSPRCY_DEVICE",
        0o700,
    );
    let mut client = h.start().await;
    let slow = client.send(message("slow", "laptop", b"")).await;
    let slow_pid = read_pid(&dir.join("slow.pid"));

    let begun = Instant::now();
    h.device
        .signal("handlers", nix::sys::signal::Signal::SIGTERM);
    // Once the signal landed, only daemon-stop starts.
    assert!(wait_until(Duration::from_secs(5), || h
        .log()
        .contains("SIGTERM received")));
    let late = client.run(message("slow", "phone", b"")).await;
    assert!(
        matches!(&late.outcome, Outcome::Failed { reason } if reason.contains("stopping")),
        "{:?}",
        late.outcome
    );
    let stop = Run {
        event: "daemon-stop".into(),
        tag: "daemon-stop".into(),
        from: None,
        ..message("x", "x", b"")
    };
    let result = client.run(stop).await;
    assert_eq!(stdout(&result), "goodbye from desk\n", "{}", h.log());

    // The slow handler is killed at the end of the grace, and its run answered.
    let result = client.done(slow).await;
    assert!(
        matches!(&result.outcome, Outcome::Failed { reason } if reason.contains("stopping")),
        "{:?}",
        result.outcome
    );
    assert!(wait_until(Duration::from_secs(5), || gone(slow_pid)));
    let status = h
        .device
        .wait_exit("handlers", Duration::from_secs(10))
        .expect("the service exits");
    assert!(status.success(), "{status}\n{}", h.log());
    assert!(
        begun.elapsed() < Duration::from_secs(5),
        "{:?}",
        begun.elapsed()
    );
    assert!(!h.socket().exists());
}

#[tokio::test]
async fn the_running_limit_queues_runs_and_a_full_queue_refuses_them() {
    let mut h = Handlers::new("timeout = \"10s\"\nmax_running = 1\nmax_queued = 1");
    let body = "echo \"start $CNSPRCY_TAG\" >> ../order.log\nsleep 0.5\necho \"end $CNSPRCY_TAG\" >> ../order.log";
    h.script("a/hold", body, 0o700);
    h.script("b/hold", body, 0o700);
    h.script("c/hold", body, 0o700);
    let mut client = h.start().await;
    let a = client.send(message("a/hold", "laptop", b"")).await;
    let b = client.send(message("b/hold", "laptop", b"")).await;
    let c = client.send(message("c/hold", "laptop", b"")).await;
    // c finds the one queue place taken by b, and is answered at once.
    let (first, result) = client.next_done().await;
    assert_eq!(first, c);
    assert!(
        matches!(&result.outcome, Outcome::Failed { reason } if reason.contains("handler queue full")),
        "{:?}",
        result.outcome
    );
    for id in [a, b] {
        assert_eq!(client.done(id).await.outcome, Outcome::Exited { code: 0 });
    }
    // With one slot, b started only after a ended, although their tags differ.
    let order = fs::read_to_string(h.dir().join("order.log")).unwrap();
    assert_eq!(
        order,
        "start a/hold\nend a/hold\nstart b/hold\nend b/hold\n"
    );
    assert!(h.log().contains("run not accepted"), "{}", h.log());
}

/// Asked for it, the service says when the handler process started, before it finishes; a run
/// that never starts (no handler) gets only its answer.
#[tokio::test]
async fn the_start_of_a_handler_is_reported_when_asked_for() {
    let mut h = Handlers::new("timeout = \"10s\"");
    h.script("slow", "sleep 1; cat", 0o700);
    let mut client = h.start().await;

    let mut run = message("slow", "laptop", b"payload");
    run.report_start = true;
    let id = client.send(run).await;
    let asked = Instant::now();
    assert_eq!(client.next().await, FromHandlers::Started { run_id: id });
    assert!(asked.elapsed() < Duration::from_secs(1), "{}", h.log());
    match client.next().await {
        FromHandlers::Done { run_id, result } => {
            assert_eq!(run_id, id);
            assert_eq!(stdout(&result), "payload");
        }
        other => panic!("expected the answer, got {other:?}"),
    }

    // Asked again for the same message (the mesh service restarted before it heard of the
    // start): not run a second time, also by a handler service killed and started again.
    let mut again = message("slow", "laptop", b"payload");
    again.report_start = true;
    let not_again = |result: &RunResult| matches!(&result.outcome, Outcome::Failed { reason } if reason.contains("not run again"));
    let result = client.run(again.clone()).await;
    assert!(not_again(&result), "{result:?}");
    drop(client);
    h.device
        .stop_with("handlers", nix::sys::signal::Signal::SIGKILL);
    let mut client = h.start().await;
    let result = client.run(again).await;
    assert!(not_again(&result), "{result:?}");

    let mut run = message("missing", "laptop", b"");
    run.report_start = true;
    let id = client.send(run).await;
    match client.next().await {
        FromHandlers::Done { run_id, result } => {
            assert_eq!(run_id, id);
            assert_eq!(result.outcome, Outcome::NoHandler);
        }
        other => panic!("expected the answer, got {other:?}"),
    }
}
