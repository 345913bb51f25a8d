//! cnsprcy side by side with serf (issue 16): broadcast latency, failure detection (SIGKILL and a
//! silent link cut, and the return after the cut), idle wire bytes and CPU, and memory, for N
//! devices of each in network namespaces on one bridge. The scenarios and what each counts are
//! described in `cnsprcy_tests::vs_serf` and docs/performance.md.
//!
//! ```text
//! cargo bench -p cnsprcy-tests --bench vs_serf                       # N = 10, about 8 minutes
//! cargo bench -p cnsprcy-tests --bench vs_serf -- --sizes 5,20,40 --no-main
//! cargo bench -p cnsprcy-tests --bench vs_serf -- --quick            # what CI runs, ~1 minute
//! cargo bench -p cnsprcy-tests --bench vs_serf -- --help
//! ```
//!
//! It first builds the workspace's binaries in release mode (`cargo build --release --workspace
//! --bins`, which `cargo bench` does not do for other packages), and installs serf from Debian's
//! packages when it is missing. Needs root. Prints a Markdown table and writes results.json,
//! results.svg and results.md to target/release/vs-serf (or `--out DIR`).

use std::process::{Command, ExitCode};

use cnsprcy_tests::bench::bin_dir;
use cnsprcy_tests::vs_serf::{self, Options, USAGE};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match Options::parse(&args, bin_dir()) {
        Ok(options) => options,
        Err(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(Some(message)) => {
            eprintln!("vs_serf: {message}");
            return ExitCode::from(2);
        }
    };
    if !cnsprcy_tests::is_root() {
        eprintln!("vs_serf: needs root, to make network namespaces; run it as root");
        return ExitCode::from(1);
    }
    if let Err(message) = build_release() {
        eprintln!("vs_serf: {message}");
        return ExitCode::from(1);
    }
    vs_serf::catch_interrupts();
    let report = vs_serf::run(&options);
    println!("{}", report.markdown);
    println!(
        "results: {0}/results.md, {0}/results.json, {0}/results.svg",
        options.out.display()
    );
    ExitCode::SUCCESS
}

/// Builds the daemons this benchmark runs, with the profile and target dir of this executable:
/// `cargo bench` builds only this package's targets, and stale binaries would be measured
/// otherwise. `CARGO` is the cargo that started this benchmark.
fn build_release() -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target = bin_dir()
        .parent()
        .map(|p| p.to_owned())
        .ok_or("cannot tell the target directory")?;
    eprintln!("building the release binaries (cargo build --release --workspace --bins)");
    let status = Command::new(cargo)
        .args(["build", "--release", "--workspace", "--bins"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .map_err(|e| format!("cannot run cargo to build the binaries: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "cargo build --release --workspace --bins failed ({status})"
        ))
    }
}
