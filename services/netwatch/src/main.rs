fn main() -> std::process::ExitCode {
    cnsprcy::service::main(cnsprcy::ipc::ServiceKind::Netwatch, cnsprcy_netwatch::start)
}
