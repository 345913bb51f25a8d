//! The packages `packaging/build` made, for the tests that check and install them.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The workspace's top directory.
pub fn workspace() -> PathBuf {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR"));
    tests
        .parent()
        .expect("tests/ is inside the workspace")
        .to_owned()
}

/// The .deb `packaging/build` made; see [`package`].
pub fn deb() -> PathBuf {
    package(&format!(
        "cnsprcy_{}-1_amd64.deb",
        env!("CARGO_PKG_VERSION")
    ))
}

/// The .rpm `packaging/build` made; see [`package`].
pub fn rpm() -> PathBuf {
    package(&format!(
        "cnsprcy-{}-1.x86_64.rpm",
        env!("CARGO_PKG_VERSION")
    ))
}

/// `<target dir>/packages/<file_name>`, checked to exist and to be newer than every source it is
/// made from, so a test never passes on a package built from older code.
fn package(file_name: &str) -> PathBuf {
    let path = crate::bench::bin_dir()
        .parent()
        .expect("target/<profile> has a parent")
        .join("packages")
        .join(file_name);
    let hint = "build the packages with `packaging/build --profile dev` (README.md, Testing)";
    let built = match std::fs::metadata(&path).and_then(|m| m.modified()) {
        Ok(built) => built,
        Err(e) => panic!("{}: {e}; {hint}", path.display()),
    };
    let mut newest = (SystemTime::UNIX_EPOCH, PathBuf::new());
    for dir in [
        "common",
        "services",
        "cli",
        "systemd",
        "packaging",
        "docs",
        "examples",
    ] {
        newest_file(&workspace().join(dir), &mut newest);
    }
    for file in ["Cargo.toml", "Cargo.lock", "README.md"] {
        newest_file(&workspace().join(file), &mut newest);
    }
    assert!(
        newest.0 <= built,
        "{} is older than {}; {hint}",
        path.display(),
        newest.1.display()
    );
    path
}

fn newest_file(path: &Path, newest: &mut (SystemTime, PathBuf)) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
            newest_file(&entry.path(), newest);
        }
    } else if let Ok(modified) = meta.modified()
        && modified > newest.0
    {
        *newest = (modified, path.to_owned());
    }
}
