//! The packages `packaging/build` makes: both hold the one executable (`cnspr`, which the units
//! also start as each service), every unit, man page, completion and document, lintian finds nothing in the .deb, and the .rpm installs into an empty root.
//! README.md's test command builds them first (`packaging/build --profile dev`); the end-to-end
//! test that installs the .deb under a real systemd is systemd_boot.rs.

use std::path::Path;

use cnsprcy_tests::packages::{deb, rpm, workspace};
use std::process::Command;

/// The services have man pages of their own; their executable is `cnspr`.
const SERVICES: [&str; 4] = [
    "cnsprcy-mesh",
    "cnsprcy-netwatch",
    "cnsprcy-discovery",
    "cnsprcy-handlers",
];

/// Runs `program` with `args` and, last, `file` (if any); returns its stdout, or fails the test
/// with its stderr.
fn run(program: &str, args: &[&str], file: Option<&Path>) -> String {
    let output = Command::new(program)
        .args(args)
        .args(file)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} {} failed: {}",
        file.map(|f| f.display().to_string()).unwrap_or_default(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The files of the repository a package must carry: (directory in the package, file name).
fn expected_files() -> Vec<String> {
    let mut files = vec!["/usr/bin/cnspr".to_owned()];
    let names = |dir: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(workspace().join(dir))
            .unwrap_or_else(|e| panic!("read {dir}: {e}"))
            .map(|entry| {
                entry
                    .expect("directory entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        names
    };
    for unit in names("systemd") {
        files.push(format!("/usr/lib/systemd/user/{unit}"));
    }
    for doc in names("docs").into_iter().filter(|d| d.ends_with(".md")) {
        files.push(format!("/usr/share/doc/cnsprcy/{doc}"));
    }
    files.push("/usr/share/doc/cnsprcy/README.md".to_owned());
    for page in ["cnspr", "cnspr-send", "cnspr-manage-add"]
        .into_iter()
        .chain(SERVICES)
    {
        files.push(format!("/usr/share/man/man1/{page}.1.gz"));
    }
    // Every example handler, at its place under examples/handlers/.
    let examples = workspace().join("examples/handlers");
    for dir in names("examples/handlers") {
        for script in names(&format!("examples/handlers/{dir}")) {
            assert!(examples.join(&dir).join(&script).is_file());
            files.push(format!(
                "/usr/share/cnsprcy/examples/handlers/{dir}/{script}"
            ));
        }
    }
    files.push("/usr/share/bash-completion/completions/cnspr".to_owned());
    files.push("/usr/share/fish/vendor_completions.d/cnspr.fish".to_owned());
    files
}

fn assert_holds(package: &Path, listing: &str, extra: &[&str]) {
    let listed: Vec<&str> = listing.lines().map(str::trim).collect();
    let expected = expected_files();
    let missing: Vec<&str> = expected
        .iter()
        .map(String::as_str)
        .chain(extra.iter().copied())
        .filter(|file| !listed.contains(file))
        .collect();
    assert!(
        missing.is_empty(),
        "{} lacks {missing:?}; it holds:\n{listing}",
        package.display()
    );
}

#[test]
fn the_deb_holds_everything_and_lintian_finds_nothing() {
    let deb = deb();
    // `dpkg-deb -c` prints `./usr/bin/cnspr` among tar's columns: keep the path, without the dot.
    let listing: String = run("dpkg-deb", &["-c"], Some(&deb))
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .map(|path| format!("{}\n", path.trim_start_matches('.')))
        .collect();
    assert_holds(
        &deb,
        &listing,
        &[
            "/usr/share/zsh/vendor-completions/_cnspr",
            "/usr/share/doc/cnsprcy/copyright",
            "/usr/share/doc/cnsprcy/changelog.Debian.gz",
            "/usr/share/lintian/overrides/cnsprcy",
        ],
    );
    let info = run("dpkg-deb", &["--field"], Some(&deb));
    assert!(info.contains("Depends: libc6"), "{info}");

    // Errors and warnings fail; the override in packaging/debian/lintian-overrides is justified
    // there. `--fail-on` makes lintian's exit status say so.
    let output = Command::new("lintian")
        .args(["--fail-on", "error,warning"])
        .arg(&deb)
        .output()
        .expect("run lintian (apt-get install lintian)");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success()
            && !report
                .lines()
                .any(|l| l.starts_with("E:") || l.starts_with("W:")),
        "lintian: {}\n{report}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_rpm_holds_everything_and_installs() {
    let rpm = rpm();
    let listing = run("rpm", &["-qlp"], Some(&rpm));
    assert_holds(
        &rpm,
        &listing,
        &[
            "/usr/share/zsh/site-functions/_cnspr",
            "/usr/share/licenses/cnsprcy/LICENSE-MIT",
            "/usr/share/licenses/cnsprcy/LICENSE-APACHE",
        ],
    );
    let info = run("rpm", &["-qip"], Some(&rpm));
    assert!(info.contains("License     : MIT OR Apache-2.0"), "{info}");

    // It installs: rpm unpacks it into an empty root of its own (no rpm-based system here, so
    // without dependency checks), and the executable it put there runs, also as each service
    // (as the units start it).
    let root = tempfile::tempdir().expect("temp dir");
    let root_arg = root.path().to_str().expect("UTF-8 temp path");
    run("rpm", &["--root", root_arg, "--initdb"], None);
    run(
        "rpm",
        &["--root", root_arg, "--nodeps", "--noscripts", "-i"],
        Some(&rpm),
    );
    let installed = root.path().join("usr/bin/cnspr");
    for name in std::iter::once("cnspr").chain(SERVICES) {
        use std::os::unix::process::CommandExt;
        let output = Command::new(&installed)
            .arg0(name)
            .arg("--version")
            .output()
            .expect("run the installed cnspr");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            format!("{name} {}", env!("CARGO_PKG_VERSION"))
        );
    }
    assert!(
        root.path()
            .join("usr/lib/systemd/user/cnsprcy.target")
            .exists()
    );
}
