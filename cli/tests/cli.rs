//! The `cnspr` binary's help, completions and man pages. (Also makes `cargo test --workspace`
//! build `cnspr` for the multi-process tests in `tests/`.)

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cnspr");

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("CNSPRCY_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn help_lists_the_commands() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for command in ["serve", "status", "config", "manage", "completions"] {
        assert!(text.contains(command), "help lacks {command}:\n{text}");
    }
    assert!(
        !text.contains("manpages"),
        "the packaging command is hidden"
    );
    assert_eq!(run(&["no-such-command"]).status.code(), Some(2));
}

#[test]
fn completions_for_every_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        // The script asks `cnspr` what to offer (member names included).
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            script.contains("cnspr") && script.contains("COMPLETE"),
            "{shell}: {script}"
        );
    }
}

#[test]
fn man_pages_for_every_visible_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["manpages", dir.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "cnspr.1",
        "cnspr-serve.1",
        "cnspr-config-show.1",
        "cnspr-manage-init.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}");
    }
    assert!(!dir.path().join("cnspr-manpages.1").exists());
    let man = std::fs::read_to_string(dir.path().join("cnspr-manage-init.1")).unwrap();
    assert!(man.contains("force"));
}

/// Output into a pipe whose reader is gone ends the command quietly, as other tools do: killed
/// by SIGPIPE, no panic.
#[test]
fn a_closed_pipe_ends_a_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(BIN)
        .args(["config", "example"])
        .env_remove("CNSPRCY_CONFIG")
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(13), "{:?}: {stderr}", out.status);
}

/// The services' executable is `cnspr` started under a service's name (as the systemd units do
/// with `ExecStart=@/usr/bin/cnspr cnsprcy-mesh`): `--version` prints `NAME VERSION`, `--help`
/// explains, anything else is a usage error.
#[test]
fn cnspr_started_under_a_service_name_is_that_service() {
    use std::os::unix::process::CommandExt;
    for name in [
        "cnsprcy-mesh",
        "cnsprcy-netwatch",
        "cnsprcy-discovery",
        "cnsprcy-handlers",
    ] {
        let run = |arg: &str| Command::new(BIN).arg0(name).arg(arg).output().unwrap();
        let out = run("--version");
        assert!(out.status.success(), "{name}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{name} {}", env!("CARGO_PKG_VERSION"))
        );
        let out = run("--help");
        assert!(out.status.success(), "{name}");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.starts_with(name), "{help}");
        assert!(help.contains("cnspr serve"), "{help}");
        let out = run("--bogus");
        assert_eq!(out.status.code(), Some(2), "{name}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--help"));
    }
}
