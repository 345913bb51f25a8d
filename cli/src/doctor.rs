//! `cnspr doctor`: every check of this device's setup on one screen, each with a verdict (ok,
//! warning, problem) and what to do. It must work when little else does: a configuration that
//! does not parse, no daemon, no identity. So it takes the configuration as client commands do
//! (`DeviceEnv::load_lenient`: a bad file is a finding, its directories are still used) and
//! reads each other file itself.

use std::process::ExitCode;

use cnsprcy::api::{ServiceState, Status};
use cnsprcy::client::{Client, ClientError};
use cnsprcy::config::{CONFIG_ENV, Config, ConfigError};
use cnsprcy::env::DeviceEnv;
use cnsprcy::identity::{Identity, IdentityError};
use cnsprcy::ipc::Interface;
use cnsprcy::netif::{self, InterfaceFilter};
use cnsprcy::paths::Paths;
use serde::Serialize;
use serde_json::Value;

use crate::commands::{CALL_TIMEOUT, print_json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Warning,
    Problem,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warning => "warning",
            Verdict::Problem => "problem",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// `daemon`, `config`, `identity`, `handlers`, `interfaces`, `store`, `members` or `member`.
    pub check: &'static str,
    /// What the check is about, where there are several of a kind: the member's name.
    pub subject: Option<String>,
    pub verdict: Verdict,
    pub message: String,
    /// What to do about it; `null` when nothing needs doing.
    pub fix: Option<String>,
    /// Further lines (each problem `cnspr handlers check` found, say).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

impl Check {
    fn new(check: &'static str, verdict: Verdict, message: impl Into<String>) -> Self {
        Self {
            check,
            subject: None,
            verdict,
            message: message.into(),
            fix: None,
            details: Vec::new(),
        }
    }

    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// What the configuration check found, for the checks after it.
struct Setup {
    paths: Paths,
    /// The configuration, if it parsed (the defaults when there is no file).
    config: Option<Config>,
}

pub async fn run(as_json: bool) -> anyhow::Result<ExitCode> {
    let mut checks = Vec::new();
    let setup = check_config(&mut checks);
    let status = match setup {
        Some(ref setup) => check_daemon(&setup.paths, &mut checks).await,
        None => None,
    };
    if let Some(setup) = &setup {
        checks.push(check_identity(&setup.paths));
        checks.push(check_handlers(&setup.paths));
        checks.push(check_interfaces(
            setup.config.as_ref(),
            status.as_ref().map(|(s, _)| s),
        ));
        match &status {
            Some((_, peers)) => check_members(peers, &mut checks),
            None => checks.push(Check::new(
                "members",
                Verdict::Warning,
                "not checked: the daemon is not running, and only it knows where each member stands",
            )),
        }
    }
    let worst = checks
        .iter()
        .map(|c| c.verdict)
        .max()
        .unwrap_or(Verdict::Ok);
    if as_json {
        print_json(&checks)?;
    } else {
        print!("{}", format_report(&checks));
    }
    Ok(if worst == Verdict::Problem {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Reads the configuration file. When it does not parse, the directories are still worked out
/// from its `[paths]` section where that can be read, else from the XDG defaults, so that the
/// other checks run. `None` only when not even the XDG directories can be told.
fn check_config(checks: &mut Vec<Check>) -> Option<Setup> {
    let (env, problem) =
        match DeviceEnv::load_lenient() {
            Ok(loaded) => loaded,
            Err(e) => {
                checks.push(Check::new("config", Verdict::Problem, e.to_string()).fix(
                    "set HOME (and the XDG_*_HOME variables, if you use them) to absolute paths",
                ));
                return None;
            }
        };
    let file = env.source.path.display();
    let Some(error) = problem else {
        let message = if env.source.exists {
            format!("{file} is valid")
        } else {
            format!("{file} does not exist: the defaults apply")
        };
        checks.push(Check::new("config", Verdict::Ok, message));
        return Some(Setup {
            paths: env.paths,
            config: Some(env.config),
        });
    };
    let fix = match &error {
        ConfigError::Missing { .. } => {
            format!("create it, or unset {CONFIG_ENV} to use the default file")
        }
        ConfigError::Read { .. } => "make it readable".to_owned(),
        _ => "correct it; `cnspr config example` prints every key with its default".to_owned(),
    };
    let mut check = Check::new("config", Verdict::Problem, error.to_string()).fix(fix);
    check.details.push(
        "the daemon will not (re)start with it, and `cnspr config` and `cnspr handlers` fail (the other commands warn and go on); the checks below use the directories it selects".to_owned(),
    );
    checks.push(check);
    Some(Setup {
        paths: env.paths,
        config: None,
    })
}

async fn check_daemon(paths: &Paths, checks: &mut Vec<Check>) -> Option<(Status, Vec<Value>)> {
    let socket = paths.public_socket();
    let answer = async {
        let mut client = Client::connect(&socket).await?;
        let status = client.call("status", Value::Null, CALL_TIMEOUT).await?;
        let peers = client.call("peers", Value::Null, CALL_TIMEOUT).await?;
        Ok::<_, ClientError>((status, peers))
    }
    .await;
    let (status, peers) = match answer {
        Ok(answer) => answer,
        Err(ClientError::NotRunning { reason, .. }) => {
            checks.push(
                Check::new(
                    "daemon",
                    Verdict::Problem,
                    format!("not running: nothing answers at {} ({reason})", socket.display()),
                )
                .fix("start it: `systemctl --user enable --now cnsprcy.target` where the packages are installed, else `cnspr serve`"),
            );
            return None;
        }
        Err(e) => {
            checks.push(
                Check::new(
                    "daemon",
                    Verdict::Problem,
                    format!("no answer at {}: {e}", socket.display()),
                )
                .fix("look at its log: `journalctl --user -u cnsprcy-mesh` (or the terminal of `cnspr serve`)"),
            );
            return None;
        }
    };
    let status: Status = match serde_json::from_value(status) {
        Ok(status) => status,
        Err(e) => {
            checks.push(
                Check::new(
                    "daemon",
                    Verdict::Problem,
                    format!("the daemon's status is not understood: {e}"),
                )
                .fix("the daemon and this cnspr are different versions; restart the daemon"),
            );
            return None;
        }
    };
    let mut daemon = Check::new(
        "daemon",
        Verdict::Ok,
        format!(
            "running: {} {} (pid {}) as {} ({}), socket {}",
            "cnsprcy",
            status.version,
            status.pid,
            status.name,
            status.id,
            socket.display()
        ),
    );
    let down: Vec<String> = status
        .services
        .iter()
        .filter(|s| s.state == ServiceState::Disconnected)
        .map(|s| match &s.detail {
            Some(detail) => format!("{}: {detail}", s.name.as_str()),
            None => s.name.as_str().to_owned(),
        })
        .collect();
    if !down.is_empty() {
        daemon.verdict = Verdict::Problem;
        daemon.message = format!(
            "running, but {} of its services {} not connected",
            down.len(),
            if down.len() == 1 { "is" } else { "are" }
        );
        daemon.details = down;
        daemon.fix = Some(
            "`systemctl --user restart cnsprcy.target`, and see `journalctl --user -u 'cnsprcy-*'`"
                .to_owned(),
        );
    }
    checks.push(daemon);
    if let Some(store) = &status.store
        && let Some(problem) = &store.problem
    {
        checks.push(Check::new(
            "store",
            Verdict::Problem,
            format!(
                "{} is degraded since {}: {problem}",
                store.path.display(),
                store.since.as_deref().unwrap_or("?")
            ),
        ));
    }
    let peers = match peers {
        Value::Array(peers) => peers,
        _ => Vec::new(),
    };
    Some((status, peers))
}

fn check_identity(paths: &Paths) -> Check {
    let key = Identity::key_path(&paths.state_dir);
    match Identity::load(&paths.state_dir) {
        Ok(identity) => {
            use std::os::unix::fs::MetadataExt;
            let mode = std::fs::metadata(&key).map_or(0o600, |m| m.mode() & 0o7777);
            Check::new(
                "identity",
                Verdict::Ok,
                format!(
                    "{}: yours, mode {mode:04o}, device ID {}",
                    key.display(),
                    identity.device_id()
                ),
            )
        }
        Err(IdentityError::Missing { .. }) => Check::new(
            "identity",
            Verdict::Warning,
            format!("no identity yet: {} does not exist", key.display()),
        )
        .fix("start the daemon, which creates one, or run `cnspr manage init --name NAME`"),
        Err(e) => Check::new("identity", Verdict::Problem, e.to_string()).fix(match e {
            IdentityError::KeyTooOpen { .. } => {
                format!("chmod 600 {}", key.display())
            }
            IdentityError::KeyWrongOwner { .. } => format!(
                "the key must be yours: `chown $USER {}`, or point [paths] state_dir elsewhere",
                key.display()
            ),
            IdentityError::KeyWrongLength { .. } => "restore the key from a backup, or move it away and run `cnspr manage init` (members must then add this device again)".to_owned(),
            _ => "see the message above".to_owned(),
        }),
    }
}

fn check_handlers(paths: &Paths) -> Check {
    let report = cnsprcy_handlers::scan::scan(&paths.handlers_dir);
    let dir = report.dir.display();
    if !report.exists {
        return Check::new(
            "handlers",
            Verdict::Warning,
            format!("{dir} does not exist: messages to this device find no handler"),
        )
        .fix(format!(
            "create it and copy handlers in, e.g. `mkdir -p {dir}/notify && cp /usr/share/cnsprcy/examples/handlers/notify/show.sh {dir}/notify/` (docs/event_handlers.md)"
        ));
    }
    let handlers = report.handlers.len();
    let plural = if handlers == 1 { "" } else { "s" };
    if report.problems.is_empty() {
        let mut check = Check::new(
            "handlers",
            Verdict::Ok,
            format!("{dir}: {handlers} handler{plural}, no problems"),
        );
        check.details = report.notes.iter().map(|n| n.message.clone()).collect();
        return check;
    }
    let n = report.problems.len();
    let mut check = Check::new(
        "handlers",
        Verdict::Problem,
        format!(
            "{dir}: {handlers} handler{plural}, {n} problem{}",
            if n == 1 { "" } else { "s" }
        ),
    )
    .fix("correct each as it says; `cnspr handlers check` lists them again");
    check.details = report.problems.iter().map(|p| p.message.clone()).collect();
    check
}

/// The `[mesh] interfaces` and `[discovery] interfaces` settings against the interfaces this
/// device has: the daemon's view when it runs, else this process's own (same namespace).
fn check_interfaces(config: Option<&Config>, status: Option<&Status>) -> Check {
    let Some(config) = config else {
        return Check::new(
            "interfaces",
            Verdict::Warning,
            "not checked: the configuration does not parse",
        )
        .fix("correct the configuration first");
    };
    let interfaces: Vec<Interface> = match status {
        Some(status) => status
            .interfaces
            .iter()
            .map(|i| Interface {
                name: i.name.clone(),
                up: i.up,
                loopback: i.loopback,
                addresses: i.addresses.clone(),
            })
            .collect(),
        None => netif::snapshot(),
    };
    let mesh_names = &config.mesh.interfaces;
    let discovery_names = &config.discovery.interfaces;
    let mesh = InterfaceFilter::mesh(mesh_names);
    let discovery = InterfaceFilter::discovery(discovery_names, mesh_names);

    let mut warnings = Vec::new();
    let mut fixes = Vec::new();
    let missing_mesh = mesh.missing(&interfaces);
    if !missing_mesh.is_empty() {
        warnings.push(format!(
            "[mesh] interfaces names {}, which this device does not have now",
            missing_mesh.join(", ")
        ));
        fixes.push(
            "check the names against `ip link` (a USB tether or VPN appears only when connected)",
        );
    }
    let outside: Vec<&str> = if mesh_names.is_empty() {
        Vec::new()
    } else {
        discovery_names
            .iter()
            .map(|n| n.as_str())
            .filter(|n| !mesh_names.iter().any(|m| m.as_str() == *n))
            .collect()
    };
    if !outside.is_empty() {
        warnings.push(format!(
            "[discovery] interfaces names {}, which [mesh] interfaces does not: mDNS does not run there",
            outside.join(", ")
        ));
        fixes.push("add them to [mesh] interfaces too, or remove them from [discovery] interfaces");
    }
    let usable: Vec<&Interface> = interfaces
        .iter()
        .filter(|i| i.up && !i.loopback && !i.addresses.is_empty() && mesh.allows_interface(i))
        .collect();
    if usable.is_empty() {
        warnings.push(
            "no network interface the mesh may use is up with an address (loopback aside): only devices on this machine can be reached".to_owned(),
        );
        fixes.push("connect to a network, or name an interface that is up in [mesh] interfaces");
    }
    let used = |filter: &InterfaceFilter, enabled: bool| -> String {
        if !enabled {
            return "off".to_owned();
        }
        let names: Vec<&str> = interfaces
            .iter()
            .filter(|i| i.up && filter.allows_interface(i))
            .map(|i| i.name.as_str())
            .collect();
        if names.is_empty() {
            "no interface that is up".to_owned()
        } else {
            names.join(", ")
        }
    };
    let summary = format!(
        "mesh on {}; discovery on {}",
        used(&mesh, true),
        used(&discovery, config.discovery.enabled)
    );
    if warnings.is_empty() {
        return Check::new("interfaces", Verdict::Ok, summary);
    }
    let mut check = Check::new("interfaces", Verdict::Warning, summary).fix(fixes.join("; "));
    check.details = warnings;
    check
}

/// One line per member, and why each that is not direct is not.
fn check_members(peers: &[Value], checks: &mut Vec<Check>) {
    if peers.is_empty() {
        checks.push(
            Check::new("members", Verdict::Warning, "no members yet")
                .fix("add one with `cnspr manage add NAME PUBLIC_KEY [ADDRESS]`, and this device on the other one (`cnspr manage id` prints the key)"),
        );
        return;
    }
    for peer in peers {
        checks.push(check_member(peer));
    }
}

/// A member's line from its `peers` entry, read as JSON so that fields this version does not
/// know (a `reason`, a new status) still show.
fn check_member(peer: &Value) -> Check {
    let text = |key: &str| peer[key].as_str().map(str::to_owned);
    let name = text("name").unwrap_or_else(|| "?".to_owned());
    let status = text("status").unwrap_or_else(|| "?".to_owned());
    let addresses: Vec<String> = peer["addresses"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let latency = peer["rtt_ms"]
        .as_f64()
        .map(|ms| format!(", {ms:.1} ms"))
        .unwrap_or_default();
    let reason = text("reason");
    let reason_code = text("reason_code");
    let last_seen = match text("last_seen") {
        Some(time) => format!("last seen {time}"),
        None => "not seen since the daemon started".to_owned(),
    };
    let (verdict, message, fix) = match status.as_str() {
        "direct" => (
            Verdict::Ok,
            format!(
                "direct at {}{latency}",
                addresses.first().map(String::as_str).unwrap_or("?")
            ),
            None,
        ),
        "relayed" => (
            Verdict::Warning,
            format!(
                "relayed via {}{latency}: no session of its own",
                text("via").unwrap_or_else(|| "?".to_owned())
            ),
            Some(
                if let Some(fix) = reason_fix(reason_code.as_deref(), &name, &addresses) {
                    fix
                } else if addresses.is_empty() {
                    "no address is known for it: on the same network discovery finds it; else give one with `cnspr manage add NAME KEY ADDRESS`".to_owned()
                } else {
                    format!(
                        "it could not be dialled at {}: a firewall, or it listens elsewhere; messages still reach it through the relay",
                        addresses.join(", ")
                    )
                },
            ),
        ),
        "disabled" => (Verdict::Ok, "disabled by you".to_owned(), None),
        other => (
            Verdict::Warning,
            format!("{other} ({last_seen})"),
            Some(
                if let Some(fix) = reason_fix(reason_code.as_deref(), &name, &addresses) {
                    fix
                } else if addresses.is_empty() {
                    "no address is known for it: on the same network discovery finds it once it runs; else give one with `cnspr manage add NAME KEY ADDRESS`".to_owned()
                } else {
                    format!(
                        "nothing answered at {}: is cnsprcy running there, and has {name} added this device (`cnspr manage id` here prints the key)? `cnspr ping {name}` tries now",
                        addresses.join(", ")
                    )
                },
            ),
        ),
    };
    let mut check = Check::new("member", verdict, message);
    check.subject = Some(name);
    if let Some(reason) = reason {
        check.details.push(format!("reason: {reason}"));
    }
    check.fix = fix;
    check
}

/// What to do about a member that is not direct, from the daemon's `reason_code` (`None` for a
/// code without a fix of its own, or one this version does not know).
fn reason_fix(code: Option<&str>, name: &str, addresses: &[String]) -> Option<String> {
    Some(match code? {
        "handshake_refused" => format!(
            "{name} was reached but closed the handshake: on {name}, `cnspr peers` must list this device with the key `cnspr manage id` prints here; and the key added here for {name} must be the one `cnspr manage id` prints there (if not, `cnspr manage remove {name}` and add it again)"
        ),
        "no_address" => "no address is known for it: on the same network discovery finds it once it runs; else give one with `cnspr manage add NAME KEY ADDRESS`".to_owned(),
        "interfaces" => format!(
            "[mesh] interfaces in the configuration allows no interface that reaches {}: add the interface there, or give {name} an address such an interface reaches",
            addresses.join(", ")
        ),
        "dial_failed" => format!(
            "nothing answered at {}: is cnsprcy running there, and listening at that address? `cnspr ping {name}` tries now",
            addresses.join(", ")
        ),
        _ => return None,
    })
}

fn format_report(checks: &[Check]) -> String {
    let problems = checks
        .iter()
        .filter(|c| c.verdict == Verdict::Problem)
        .count();
    let warnings = checks
        .iter()
        .filter(|c| c.verdict == Verdict::Warning)
        .count();
    let label = |c: &Check| match &c.subject {
        Some(subject) => format!("{} {subject}", c.check),
        None => c.check.to_owned(),
    };
    let width = checks
        .iter()
        .map(|c| label(c).chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for check in checks {
        let indent = " ".repeat(7 + 2 + width + 2);
        out.push_str(&format!(
            "{:<7}  {:<width$}  {}\n",
            check.verdict.as_str(),
            label(check),
            check.message.replace('\n', &format!("\n{indent}"))
        ));
        for detail in &check.details {
            out.push_str(&format!("{indent}- {detail}\n"));
        }
        if let Some(fix) = &check.fix {
            out.push_str(&format!("{indent}fix: {fix}\n"));
        }
    }
    let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    out.push_str(&match (problems, warnings) {
        (0, 0) => "\nAll is well.\n".to_owned(),
        (0, w) => format!("\n{}; nothing is broken.\n", plural(w, "warning")),
        (p, w) => format!("\n{}, {}.\n", plural(p, "problem"), plural(w, "warning")),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_member_line_says_why_it_is_not_direct() {
        let check = check_member(&json!({
            "name": "tv-box", "status": "unreachable", "addresses": ["127.0.0.1:7335"],
            "rtt_ms": null, "via": null, "last_seen": null,
        }));
        assert_eq!(check.verdict, Verdict::Warning);
        assert_eq!(check.subject.as_deref(), Some("tv-box"));
        assert!(
            check.message.starts_with("unreachable"),
            "{}",
            check.message
        );
        assert!(
            check
                .fix
                .as_deref()
                .unwrap()
                .contains("nothing answered at 127.0.0.1:7335"),
            "{check:?}"
        );
        // A reason from the daemon, and a status this version does not know, still show.
        let check = check_member(&json!({
            "name": "phone", "status": "suspect", "addresses": [],
            "reason": "its keepalive is overdue",
        }));
        assert_eq!(check.verdict, Verdict::Warning);
        assert!(check.message.starts_with("suspect"), "{}", check.message);
        assert_eq!(check.details, ["reason: its keepalive is overdue"]);
        // The reason's code picks the fix.
        let check = check_member(&json!({
            "name": "desk", "status": "unreachable", "addresses": ["10.0.0.2:7332"],
            "reason": "handshake refused or dropped by the other side (...)",
            "reason_code": "handshake_refused",
        }));
        assert_eq!(check.verdict, Verdict::Warning);
        assert!(
            check
                .fix
                .as_deref()
                .unwrap()
                .contains("on desk, `cnspr peers` must list this device"),
            "{check:?}"
        );
        assert_eq!(
            check.details,
            ["reason: handshake refused or dropped by the other side (...)"]
        );
        let check = check_member(&json!({
            "name": "desk", "status": "direct", "addresses": ["10.0.0.2:7332"], "rtt_ms": 0.84,
        }));
        assert_eq!(check.verdict, Verdict::Ok);
        assert_eq!(check.message, "direct at 10.0.0.2:7332, 0.8 ms");
    }

    #[test]
    fn the_report_lines_up_and_ends_with_a_verdict() {
        let checks = [
            Check::new("config", Verdict::Ok, "/c/config.toml is valid"),
            Check::new("daemon", Verdict::Problem, "not running").fix("start it"),
        ];
        assert_eq!(
            format_report(&checks),
            "ok       config  /c/config.toml is valid\n\
             problem  daemon  not running\n                 fix: start it\n\
             \n1 problem, 0 warnings.\n"
        );
    }
}
