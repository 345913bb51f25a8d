fn main() -> std::process::ExitCode {
    cnsprcy::service::main(cnsprcy::ipc::ServiceKind::Handlers, cnsprcy_handlers::start)
}
