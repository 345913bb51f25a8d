//! The systemd side, without a systemd: the unit files pass `systemd-analyze verify --user`,
//! and the mesh service takes its sockets from socket activation by name and reports readiness
//! (emulated with `systemd-socket-activate` and a notify socket of the test's own).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cnsprcy_tests::{Device, bin};
use nix::sys::signal::Signal;

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

/// `systemd-socket-activate`, which emulates socket activation (package systemd).
fn activator() -> PathBuf {
    let found = Command::new("sh")
        .args(["-c", "command -v systemd-socket-activate"])
        .output()
        .unwrap();
    let path = PathBuf::from(String::from_utf8_lossy(&found.stdout).trim());
    assert!(
        path.is_absolute(),
        "systemd-socket-activate is missing (package systemd)"
    );
    path
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let (units, man, run) = (
        tmp.path().join("units"),
        tmp.path().join("man"),
        tmp.path().join("run"),
    );
    for dir in [&units, &run] {
        fs::create_dir_all(dir).unwrap();
    }
    fs::set_permissions(&run, fs::Permissions::from_mode(0o700)).unwrap();
    // The units name /usr/bin/cnspr and man pages as the package installs them;
    // here they point at the build's binaries and freshly generated man pages.
    let bin_dir = bin("cnspr").parent().unwrap().display().to_string();
    let mut files = Vec::new();
    for entry in fs::read_dir(units_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.ends_with(".service") || name.ends_with(".socket") || name.ends_with(".target")) {
            continue;
        }
        let text = fs::read_to_string(&path)
            .unwrap()
            .replace("/usr/bin/cnspr ", &format!("{bin_dir}/cnspr "));
        fs::write(units.join(&name), text).unwrap();
        files.push(name);
    }
    assert!(files.len() >= 7, "units: {files:?}");
    let status = Command::new(bin("cnspr"))
        .arg("manpages")
        .arg(man.join("man1"))
        .output()
        .unwrap();
    assert!(status.status.success());
    let output = Command::new("systemd-analyze")
        .args(["verify", "--user"])
        .args(&files)
        .current_dir(&units)
        .env("XDG_RUNTIME_DIR", &run)
        .env("MANPATH", &man)
        .output()
        .expect("systemd-analyze (package systemd)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        output.status
    );
}

#[test]
fn the_mesh_service_takes_activated_sockets_and_reports_ready() {
    let mut device = Device::new("desk");
    device.configure("127.0.0.1:17501");
    let runtime = device.runtime_dir();
    fs::create_dir_all(&runtime).unwrap();
    fs::set_permissions(&runtime, fs::Permissions::from_mode(0o700)).unwrap();
    let notify_path = device.root().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let public = device.socket();
    let internal = runtime.join("mesh.sock");
    let activator = activator();
    let (public_arg, internal_arg) = (public.display().to_string(), internal.display().to_string());
    let mesh = bin("cnsprcy-mesh").display().to_string();
    let notify_env = format!("NOTIFY_SOCKET={}", notify_path.display());
    device.spawn(
        "mesh",
        &activator,
        &[
            "-l",
            &public_arg,
            "-l",
            &internal_arg,
            "--fdname=public:internal",
            "-E",
            "XDG_CONFIG_HOME",
            "-E",
            "XDG_DATA_HOME",
            "-E",
            "XDG_RUNTIME_DIR",
            "-E",
            "RUST_LOG",
            "-E",
            &notify_env,
            &mesh,
        ],
    );
    // The sockets exist before the service runs; the first client starts it and is answered.
    assert!(cnsprcy_tests::wait_until(Duration::from_secs(10), || {
        public.exists()
    }));
    let inode = fs::metadata(&public).unwrap().ino();
    device.wait_ready("mesh");
    let mut buf = [0u8; 4096];
    let len = notify.recv(&mut buf).expect("a readiness notification");
    let message = String::from_utf8_lossy(&buf[..len]).into_owned();
    assert!(message.contains("READY=1"), "{message}");
    assert!(message.contains("STATUS="), "{message}");
    // The service used the passed socket instead of binding its own.
    assert_eq!(fs::metadata(&public).unwrap().ino(), inode);
    assert!(
        device
            .log("mesh")
            .contains("using the socket passed by systemd")
    );

    let status = device.stop_with("mesh", Signal::SIGTERM);
    assert!(status.success(), "{status}\n{}", device.log("mesh"));
    let len = notify.recv(&mut buf).expect("a stopping notification");
    assert!(String::from_utf8_lossy(&buf[..len]).contains("STOPPING=1"));
}

#[test]
fn the_activated_handler_service_exits_when_idle_and_starts_again() {
    let mut device = Device::new("desk");
    device.write_config("name = \"desk\"\n[handlers]\nidle_exit = \"1s\"\n");
    let runtime = device.runtime_dir();
    fs::create_dir_all(&runtime).unwrap();
    fs::set_permissions(&runtime, fs::Permissions::from_mode(0o700)).unwrap();
    let socket = runtime.join("handlers.sock");
    let socket_arg = socket.display().to_string();
    let handlers = bin("cnsprcy-handlers").display().to_string();
    let activator = activator();
    let args = [
        "-l",
        socket_arg.as_str(),
        "--fdname=handlers",
        "-E",
        "XDG_CONFIG_HOME",
        "-E",
        "XDG_DATA_HOME",
        "-E",
        "XDG_RUNTIME_DIR",
        "-E",
        "RUST_LOG",
        handlers.as_str(),
    ];
    let ping = |socket: &Path| {
        use std::io::{BufRead, BufReader, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream.write_all(b"{\"type\":\"ping\"}\n").unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        line
    };
    for round in ["first", "second"] {
        // systemd-socket-activate serves one activation; start it afresh as systemd would keep
        // the socket and start the service again.
        let label = format!("handlers-{round}");
        device.spawn(&label, &activator, &args);
        assert!(cnsprcy_tests::wait_until(Duration::from_secs(10), || {
            socket.exists()
        }));
        assert!(ping(&socket).contains("pong"), "{}", device.log(&label));
        let status = device
            .wait_exit(&label, Duration::from_secs(15))
            .unwrap_or_else(|| panic!("did not exit when idle:\n{}", device.log(&label)));
        assert!(status.success(), "{status}\n{}", device.log(&label));
        assert!(
            device
                .log(&label)
                .contains("exiting until the next message")
        );
        let _ = fs::remove_file(&socket);
    }
}
