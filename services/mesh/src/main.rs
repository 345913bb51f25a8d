fn main() -> std::process::ExitCode {
    cnsprcy::service::main(cnsprcy::ipc::ServiceKind::Mesh, cnsprcy_mesh::start)
}
