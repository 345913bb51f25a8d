//! The `cnsprcy-mesh` binary answers --version and --help and refuses unknown arguments.
//! (Having an integration test also makes `cargo test --workspace` build the binary, which the
//! multi-process tests in `tests/` run.)

#[test]
fn version_help_and_bad_arguments() {
    cnsprcy_tests::check_service_binary(
        env!("CARGO_BIN_EXE_cnsprcy-mesh"),
        "cnsprcy-mesh",
        env!("CARGO_PKG_VERSION"),
    );
}
