//! `cnspr doctor` against real devices: a running daemon with one member direct and one
//! unreachable, a broken handler and a configuration typo while the daemon runs; then no daemon
//! at all, an identity key others could read, and a configuration that does not parse.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use cnsprcy_tests::netns::NetNs;
use cnsprcy_tests::packages::workspace;
use cnsprcy_tests::{Device, Run};
use serde_json::Value;

const SOON: Duration = Duration::from_secs(20);

fn addr(i: usize) -> String {
    format!("127.0.0.1:{}", 17301 + i)
}

/// `cnspr doctor --json`: the run (for its exit status) and its checks.
fn doctor(device: &Device) -> (Run, Vec<Value>) {
    let run = device.cnspr(&["doctor", "--json"]);
    let checks = run.json().as_array().expect("an array of checks").clone();
    (run, checks)
}

/// The check named `check` (and `subject`, for members).
fn find<'a>(checks: &'a [Value], check: &str, subject: Option<&str>) -> &'a Value {
    checks
        .iter()
        .find(|c| c["check"] == check && c["subject"].as_str() == subject)
        .unwrap_or_else(|| panic!("no {check} {subject:?} check in {checks:#?}"))
}

fn assert_verdict(checks: &[Value], check: &str, subject: Option<&str>, verdict: &str) {
    let found = find(checks, check, subject);
    assert_eq!(found["verdict"], verdict, "{found:#}");
}

fn text(value: &Value, key: &str) -> String {
    value[key].as_str().unwrap_or_default().to_owned()
}

#[test]
fn doctor_shows_the_daemon_each_member_and_what_is_broken() {
    let ns = NetNs::new();
    let mut laptop = Device::started_in(&ns, "laptop", &addr(0));
    let desk = Device::started_in(&ns, "desk", &addr(1));
    // tv has an identity but never runs: nothing answers where laptop looks for it.
    let tv = Device::new("tv");
    tv.cnspr(&["manage", "init", "--name", "tv"]).success();
    laptop.add_member(&desk, Some(&addr(1)));
    laptop.add_member(&tv, Some(&addr(2)));
    desk.add_member(&laptop, Some(&addr(0)));
    laptop.wait_status("desk", "direct", SOON);

    // One handler, installed the documented way.
    let handler = laptop.root().join("config/cnsprcy/handlers/notify/show.sh");
    fs::create_dir_all(handler.parent().unwrap()).unwrap();
    fs::copy(
        workspace().join("examples/handlers/notify/show.sh"),
        &handler,
    )
    .unwrap();

    let (run, checks) = doctor(&laptop);
    assert_eq!(run.status.code(), Some(0), "only warnings: {checks:#?}");
    for check in ["config", "daemon", "identity", "handlers"] {
        assert_verdict(&checks, check, None, "ok");
    }
    assert!(text(find(&checks, "daemon", None), "message").contains("running"));
    assert!(text(find(&checks, "handlers", None), "message").contains("1 handler, no problems"));
    // The namespace has only loopback: a warning that says so.
    let interfaces = find(&checks, "interfaces", None);
    assert_eq!(interfaces["verdict"], "warning", "{interfaces:#}");
    assert!(
        interfaces["details"][0]
            .as_str()
            .unwrap()
            .contains("only devices on this machine")
    );
    assert_verdict(&checks, "member", Some("desk"), "ok");
    let tv_check = find(&checks, "member", Some("tv"));
    assert_eq!(tv_check["verdict"], "warning", "{tv_check:#}");
    assert!(
        text(tv_check, "message").starts_with("unreachable"),
        "{tv_check:#}"
    );
    assert!(
        text(tv_check, "fix").contains(&format!("nothing answered at {}", addr(2))),
        "{tv_check:#}"
    );

    // The same, for people: one line per check, the verdict first.
    let run = laptop.cnspr(&["doctor"]).success();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(
        lines.iter().any(|l| l.starts_with("ok       daemon")),
        "{}",
        run.stdout
    );
    assert!(
        lines.iter().any(|l| l.starts_with("ok       member desk")),
        "{}",
        run.stdout
    );
    assert!(
        lines.iter().any(|l| l.starts_with("warning  member tv")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.ends_with("; nothing is broken.\n"),
        "{}",
        run.stdout
    );

    // A handler that may not run is a problem, with `handlers check`'s words.
    fs::set_permissions(&handler, fs::Permissions::from_mode(0o644)).unwrap();
    let (run, checks) = doctor(&laptop);
    assert_eq!(run.status.code(), Some(1), "{checks:#?}");
    let handlers = find(&checks, "handlers", None);
    assert_eq!(handlers["verdict"], "problem", "{handlers:#}");
    assert!(
        handlers["details"][0]
            .as_str()
            .unwrap()
            .contains("is not executable"),
        "{handlers:#}"
    );
    fs::set_permissions(&handler, fs::Permissions::from_mode(0o755)).unwrap();

    // A typo in the configuration while the daemon runs: the file is the problem, and the
    // daemon and its members are still shown.
    let good = fs::read_to_string(laptop.config_file()).unwrap();
    fs::write(laptop.config_file(), format!("{good}lisen = 1\n")).unwrap();
    let (run, checks) = doctor(&laptop);
    assert_eq!(run.status.code(), Some(1), "{checks:#?}");
    let config = find(&checks, "config", None);
    assert_eq!(config["verdict"], "problem", "{config:#}");
    assert!(text(config, "message").contains("lisen"), "{config:#}");
    assert_verdict(&checks, "daemon", None, "ok");
    assert_verdict(&checks, "member", Some("desk"), "ok");
    assert_verdict(&checks, "interfaces", None, "warning");
}

#[test]
fn doctor_without_a_daemon_still_checks_the_files() {
    let device = Device::new("laptop");
    device.cnspr(&["manage", "init"]).success();
    fs::set_permissions(device.key_file(), fs::Permissions::from_mode(0o644)).unwrap();

    let (run, checks) = doctor(&device);
    assert_eq!(run.status.code(), Some(1), "{checks:#?}");
    assert_verdict(&checks, "config", None, "ok");
    let daemon = find(&checks, "daemon", None);
    assert_eq!(daemon["verdict"], "problem");
    assert!(
        text(daemon, "message").starts_with("not running"),
        "{daemon:#}"
    );
    assert!(text(daemon, "fix").contains("cnspr serve"), "{daemon:#}");
    let identity = find(&checks, "identity", None);
    assert_eq!(identity["verdict"], "problem", "{identity:#}");
    assert_eq!(
        text(identity, "fix"),
        format!("chmod 600 {}", device.key_file().display())
    );
    assert_verdict(&checks, "handlers", None, "warning");
    assert_verdict(&checks, "members", None, "warning");

    // Fixed key; a configuration that does not parse, whose [paths] still count.
    fs::set_permissions(device.key_file(), fs::Permissions::from_mode(0o600)).unwrap();
    let elsewhere = device.root().join("my-handlers");
    device.write_config(&format!(
        "[mesh]\nlisen = [\"127.0.0.1:7332\"]\n[paths]\nhandlers_dir = \"{}\"\n",
        elsewhere.display()
    ));
    let run = device.cnspr(&["doctor"]).code(1);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(lines[0].starts_with("problem  config"), "{}", run.stdout);
    assert!(
        run.stdout.contains("did you mean `listen`?"),
        "{}",
        run.stdout
    );
    assert!(
        lines.iter().any(|l| l.starts_with("ok       identity")),
        "{}",
        run.stdout
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("warning  handlers") && l.contains("my-handlers")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.ends_with("2 problems, 3 warnings.\n"),
        "{}",
        run.stdout
    );
}
