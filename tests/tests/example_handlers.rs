//! The example handlers of examples/handlers/ (installed by the packages under
//! /usr/share/cnsprcy/examples/handlers): each copied into a device's handler directory as
//! docs/event_handlers.md tells users to, run by a real message from another device, with fake
//! `notify-send`, `wl-copy`, `xclip` and `xdg-open` first on the receiving daemon's PATH that
//! record their arguments and standard input.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cnsprcy_tests::netns::NetNs;
use cnsprcy_tests::packages::workspace;
use cnsprcy_tests::{Device, bin, wait_until};
use serde_json::Value;

const SOON: Duration = Duration::from_secs(20);

/// The example handlers, as files under examples/handlers/ (each path is also the tag it
/// serves, without the extension; download/_default serves download/NAME).
const EXAMPLES: [&str; 5] = [
    "notify/show.sh",
    "clipboard/set.sh",
    "url/open.sh",
    "download/_default.sh",
    "device/status.sh",
];

fn addr(i: usize) -> String {
    format!("127.0.0.1:{}", 17201 + i)
}

/// Fake desktop programs in `dir/bin`: each writes its arguments (one per line) to
/// `dir/NAME.args` and, for the clipboard programs, its standard input to `dir/NAME.stdin`,
/// each file complete once it appears.
fn fake_programs(dir: &Path) -> PathBuf {
    let bin_dir = dir.join("bin");
    fs::create_dir_all(&bin_dir).unwrap();
    for (name, reads_stdin) in [
        ("notify-send", false),
        ("wl-copy", true),
        ("xclip", true),
        ("xdg-open", false),
    ] {
        let record = dir.join(name);
        let stdin = if reads_stdin {
            format!(
                "cat > '{0}.stdin.tmp' && mv '{0}.stdin.tmp' '{0}.stdin'\n",
                record.display()
            )
        } else {
            String::new()
        };
        let script = format!(
            "#!/bin/sh\n{stdin}printf '%s\\n' \"$@\" > '{0}.args.tmp' && mv '{0}.args.tmp' '{0}.args'\n",
            record.display()
        );
        let path = bin_dir.join(name);
        fs::write(&path, script).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin_dir
}

/// What the fake `program` recorded (`args` or `stdin`), once it has.
fn recorded(dir: &Path, program: &str, what: &str) -> String {
    let path = dir.join(format!("{program}.{what}"));
    assert!(
        wait_until(SOON, || path.exists()),
        "{program} was not run (no {})",
        path.display()
    );
    fs::read_to_string(&path).unwrap()
}

/// Copies every example into the device's handler directory, the way docs/event_handlers.md
/// says: a copy (`cp`, keeping the mode the package gives it), not a symbolic link.
fn install_examples(device: &Device) {
    let handlers = device.root().join("config/cnsprcy/handlers");
    for example in EXAMPLES {
        let source = workspace().join("examples/handlers").join(example);
        let target = handlers.join(example);
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        fs::copy(&source, &target).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let check = device.cnspr(&["handlers", "check"]).success();
    assert!(check.stdout.contains("No problems"), "{}", check.stdout);
}

/// `cnspr send --wait --json --to TO -- TAG PAYLOAD` from `from`; the one reply.
fn send_wait(from: &Device, to: &str, tag: &str, payload: &str) -> Value {
    let run = from.cnspr(&[
        "send",
        "--wait",
        "--json",
        "--timeout",
        "20s",
        "--to",
        to,
        "--",
        tag,
        payload,
    ]);
    let result = run.json();
    let reply = result["replies"][0].clone();
    assert_eq!(reply["name"], to, "{result}");
    reply
}

fn assert_ok(reply: &Value, stdout: &str) {
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(reply["stdout"], stdout, "{reply}");
}

fn assert_refused_by_handler(reply: &Value, reason: &str) {
    assert_eq!(reply["status"], "failed", "{reply}");
    assert_eq!(reply["exit_code"], 1, "{reply}");
    let stdout = reply["stdout"].as_str().unwrap_or_default();
    assert!(stdout.contains(reason), "{reply}");
}

/// Three devices in one namespace, all members of each other: `laptop` sends; `desk` runs a
/// Wayland session, `tv` an X11 one. Returns them with the record directories of desk and tv.
struct Setup {
    ns: NetNs,
    laptop: Device,
    desk: Device,
    tv: Device,
    desk_records: tempfile::TempDir,
    tv_records: tempfile::TempDir,
}

fn setup() -> Setup {
    let ns = NetNs::new();
    let desk_records = tempfile::tempdir().unwrap();
    let tv_records = tempfile::tempdir().unwrap();
    let inherited = std::env::var("PATH").unwrap_or_default();
    let mut devices: Vec<Device> = ["laptop", "desk", "tv"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut device = Device::new(name);
            device.configure(&addr(i));
            match *name {
                "desk" => {
                    let fakes = fake_programs(desk_records.path());
                    device.set_env("PATH", format!("{}:{inherited}", fakes.display()));
                    device.set_env("WAYLAND_DISPLAY", "wayland-1");
                    device.set_env("DISPLAY", ":0");
                }
                "tv" => {
                    let fakes = fake_programs(tv_records.path());
                    device.set_env("PATH", format!("{}:{inherited}", fakes.display()));
                    device.set_env("DISPLAY", ":0");
                }
                _ => {}
            }
            device.start_in(&ns);
            device
        })
        .collect();
    for i in 0..devices.len() {
        for j in 0..devices.len() {
            if i != j {
                devices[i].add_member(&devices[j], Some(&addr(j)));
            }
        }
    }
    for peer in ["desk", "tv"] {
        devices[0].wait_status(peer, "direct", SOON);
    }
    let tv = devices.pop().unwrap();
    let desk = devices.pop().unwrap();
    let laptop = devices.pop().unwrap();
    install_examples(&desk);
    install_examples(&tv);
    Setup {
        ns,
        laptop,
        desk,
        tv,
        desk_records,
        tv_records,
    }
}

#[test]
fn the_notification_and_clipboard_examples_reach_the_desktop() {
    let s = setup();

    // A payload that looks like an option is shown, not taken as one.
    let reply = send_wait(&s.laptop, "desk", "notify/show", "-the build finished");
    assert_ok(&reply, "shown on desk\n");
    assert_eq!(
        recorded(s.desk_records.path(), "notify-send", "args"),
        "--app-name=cnsprcy\n--\nfrom laptop\n-the build finished\n"
    );

    // Wayland (WAYLAND_DISPLAY set): wl-copy gets the payload exactly.
    let text = "copied text\n\twith a tab and a second line\n";
    let reply = send_wait(&s.laptop, "desk", "clipboard/set", text);
    assert_ok(&reply, "clipboard set on desk\n");
    assert_eq!(recorded(s.desk_records.path(), "wl-copy", "stdin"), text);
    assert!(!s.desk_records.path().join("xclip.args").exists());

    // X11 only: xclip, into the clipboard selection.
    let reply = send_wait(&s.laptop, "tv", "clipboard/set", text);
    assert_ok(&reply, "clipboard set on tv\n");
    assert_eq!(recorded(s.tv_records.path(), "xclip", "stdin"), text);
    assert_eq!(
        recorded(s.tv_records.path(), "xclip", "args"),
        "-selection\nclipboard\n"
    );
    assert!(!s.tv_records.path().join("wl-copy.args").exists());
}

#[test]
fn the_url_example_opens_only_web_urls() {
    let s = setup();
    let url = "https://example.org/a?b=1&c=%20";
    let reply = send_wait(&s.laptop, "desk", "url/open", &format!("{url}\n"));
    assert_ok(&reply, &format!("opening {url} on desk\n"));
    assert_eq!(
        recorded(s.desk_records.path(), "xdg-open", "args"),
        format!("{url}\n")
    );

    for (payload, reason) in [
        ("file:///etc/passwd", "only http:// and https://"),
        ("javascript:alert(1)", "only http:// and https://"),
        ("--help", "only http:// and https://"),
        ("/usr/bin/xterm", "only http:// and https://"),
        ("https://example.org/a b", "without spaces"),
        ("https://example.org/\nfile:///etc/passwd", "without spaces"),
    ] {
        let reply = send_wait(&s.laptop, "tv", "url/open", payload);
        assert_refused_by_handler(&reply, reason);
    }
    let long = format!("https://example.org/{}", "a".repeat(5000));
    assert_refused_by_handler(
        &send_wait(&s.laptop, "tv", "url/open", &long),
        "longer than 4096 bytes",
    );
    // The refusals come before xdg-open would run; give a stray one time to show up anyway.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!s.tv_records.path().join("xdg-open.args").exists());
}

#[test]
fn the_download_example_saves_under_a_free_safe_name_and_bounds_the_size() {
    let s = setup();
    let downloads = s.desk.root().join("home/Downloads");

    let reply = send_wait(&s.laptop, "desk", "download/notes.txt", "first");
    assert_ok(
        &reply,
        &format!("saved 5 bytes as {}/notes.txt\n", downloads.display()),
    );
    // The same name again: a numbered name, the first file untouched.
    let reply = send_wait(&s.laptop, "desk", "download/notes.txt", "second");
    assert_ok(
        &reply,
        &format!("saved 6 bytes as {}/notes-1.txt\n", downloads.display()),
    );
    let reply = send_wait(&s.laptop, "desk", "download/README", "third");
    assert_ok(
        &reply,
        &format!("saved 5 bytes as {}/README\n", downloads.display()),
    );
    assert_eq!(
        fs::read_to_string(downloads.join("notes.txt")).unwrap(),
        "first"
    );
    assert_eq!(
        fs::read_to_string(downloads.join("notes-1.txt")).unwrap(),
        "second"
    );

    // A name with a path separator (a deeper tag) is refused; names starting with '.' cannot
    // even be sent (no tag segment starts with '.').
    let reply = send_wait(&s.laptop, "desk", "download/sub/x.txt", "nested");
    assert_refused_by_handler(&reply, "is not a safe file name");
    s.laptop
        .cnspr(&["send", "--to", "desk", "download/.bashrc", "x"])
        .stderr_has(".bashrc");

    // One byte over the bound: refused, and nothing is left behind.
    let big = s.laptop.root().join("big");
    fs::write(&big, vec![b'x'; 10 * 1024 * 1024 + 1]).unwrap();
    let output = s
        .laptop
        .command(bin("cnspr"))
        .args([
            "send",
            "--wait",
            "--json",
            "--timeout",
            "60s",
            "--to",
            "desk",
            "download/big.bin",
            "-",
        ])
        .stdin(fs::File::open(&big).unwrap())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_refused_by_handler(&result["replies"][0], "larger than 10485760 bytes");

    let mut names: Vec<String> = fs::read_dir(&downloads)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["README", "notes-1.txt", "notes.txt"]);
}

#[test]
fn the_status_example_answers_with_battery_and_load() {
    let s = setup();
    // desk has a fake battery (and mains power, which is not a battery).
    let supplies = s.desk_records.path().join("power_supply");
    for (supply, files) in [
        (
            "BAT0",
            [
                ("type", "Battery\n"),
                ("capacity", "87\n"),
                ("status", "Discharging\n"),
            ],
        ),
        (
            "AC",
            [("type", "Mains\n"), ("online", "0\n"), ("status", "\n")],
        ),
    ] {
        fs::create_dir_all(supplies.join(supply)).unwrap();
        for (file, text) in files {
            fs::write(supplies.join(supply).join(file), text).unwrap();
        }
    }
    // The variable reaches the handler through the daemon's environment, so desk restarts.
    let mut desk = s.desk;
    desk.set_env("CNSPRCY_POWER_SUPPLY_DIR", &supplies);
    desk.stop_with("serve", nix::sys::signal::Signal::SIGTERM);
    desk.start_in(&s.ns);
    let mut laptop = s.laptop;
    laptop.wait_status("desk", "direct", SOON);

    let run = laptop.cnspr(&["send", "--wait", "--json", "device/status"]);
    let result = run.json();
    let replies = result["replies"].as_array().unwrap();
    assert_eq!(replies.len(), 2, "{result}");
    for reply in replies {
        assert_eq!(reply["status"], "ok", "{reply}");
        let text = reply["stdout"].as_str().unwrap();
        let lines: Vec<&str> = text.lines().collect();
        if reply["name"] == "desk" {
            assert_eq!(lines[0], "battery BAT0 87% Discharging", "{text}");
            assert_eq!(lines.len(), 2, "{text}");
        } else {
            // tv reads the real /sys/class/power_supply: a battery line of some kind.
            assert!(lines[0].starts_with("battery "), "{text}");
        }
        // The load line: "load" and the three averages of /proc/loadavg.
        let load: Vec<&str> = lines.last().unwrap().split(' ').collect();
        assert_eq!(load[0], "load", "{text}");
        assert_eq!(load.len(), 4, "{text}");
        for average in &load[1..] {
            average
                .parse::<f64>()
                .unwrap_or_else(|e| panic!("{average}: {e} in {text}"));
        }
    }
    drop(s.tv);
}
