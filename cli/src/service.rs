//! The services' executable is `cnspr` itself: started under a service's name (its argv[0] is
//! `cnsprcy-mesh`, `cnsprcy-netwatch`, `cnsprcy-discovery` or `cnsprcy-handlers`) it runs that
//! one service. The systemd units start it so (`ExecStart=@/usr/bin/cnspr cnsprcy-mesh`), and
//! the four processes of a device then share one executable's pages instead of paying for four
//! (docs/performance.md, "Side by side with serf").

use std::ffi::OsStr;
use std::path::Path;
use std::process::ExitCode;

use cnsprcy::ipc::ServiceKind;

/// The service `argv0` names, if it names one: its last path component is a unit name.
pub fn named_by(argv0: &OsStr) -> Option<ServiceKind> {
    let name = Path::new(argv0).file_name()?.to_str()?;
    ServiceKind::ALL
        .into_iter()
        .find(|kind| kind.unit_name() == name)
}

/// The whole life of the process as service `kind`: its arguments, logging, lock, signals.
pub fn run(kind: ServiceKind) -> ExitCode {
    use cnsprcy::service::main;
    match kind {
        ServiceKind::Mesh => main(kind, cnsprcy_mesh::start),
        ServiceKind::Netwatch => main(kind, cnsprcy_netwatch::start),
        ServiceKind::Discovery => main(kind, cnsprcy_discovery::start),
        ServiceKind::Handlers => main(kind, cnsprcy_handlers::start),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_is_named_by_the_last_component_of_argv0() {
        assert_eq!(
            named_by(OsStr::new("cnsprcy-mesh")),
            Some(ServiceKind::Mesh)
        );
        assert_eq!(
            named_by(OsStr::new("/usr/bin/cnsprcy-handlers")),
            Some(ServiceKind::Handlers)
        );
        for other in ["cnspr", "/usr/bin/cnspr", "cnsprcy-mesh.old", "cnsprcy", ""] {
            assert_eq!(named_by(OsStr::new(other)), None, "{other:?}");
        }
    }
}
