//! The `cnsprcy-mesh` binary answers --version and --help and refuses unknown arguments.
//! (Having an integration test also makes `cargo test --workspace` build the binary, which the
//! multi-process tests in `tests/` run.)

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cnsprcy-mesh");

#[test]
fn version_help_and_bad_arguments() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("cnsprcy-mesh {}", env!("CARGO_PKG_VERSION"))
    );
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("cnspr serve"));
    let out = Command::new(BIN).arg("--bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--help"));
}
