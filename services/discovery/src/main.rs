fn main() -> std::process::ExitCode {
    cnsprcy::service::main(
        cnsprcy::ipc::ServiceKind::Discovery,
        cnsprcy_discovery::start,
    )
}
