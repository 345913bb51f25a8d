//! Where cnsprcy keeps its files, following the XDG base directory specification.
//!
//! Several devices on one machine (tests, demos) differ only in these directories and their listen
//! port, so nothing here may fall back to a fixed, machine-wide path.

use std::env;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Name of the directory cnsprcy uses inside each XDG base directory.
pub const APP_DIR: &str = "cnsprcy";
/// The public JSON-RPC socket, in the runtime directory.
pub const PUBLIC_SOCKET: &str = "cnsprcy.sock";
/// The internal socket that netwatch and discovery connect to, in the runtime directory.
pub const MESH_SOCKET: &str = "mesh.sock";
/// The internal socket of the handler service, in the runtime directory.
pub const HANDLERS_SOCKET: &str = "handlers.sock";

#[derive(Debug, Error)]
pub enum PathError {
    #[error(
        "cannot find a home directory: neither HOME nor the XDG_*_HOME variables are set; set HOME or {0}"
    )]
    NoHome(&'static str),
    #[error("{var} must be an absolute path, but it is {value:?}")]
    NotAbsolute { var: &'static str, value: String },
    #[error("cannot create directory {path}: {error}")]
    Create { path: PathBuf, error: io::Error },
    #[error("cannot read directory {path}: {error}")]
    Inspect { path: PathBuf, error: io::Error },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error(
        "directory {path} belongs to uid {owner}, not to you (uid {uid}); remove it or point cnsprcy elsewhere"
    )]
    WrongOwner { path: PathBuf, owner: u32, uid: u32 },
    #[error(
        "directory {path} has mode {mode:04o}, which lets other users in; run `chmod 700 {path}`"
    )]
    TooOpen { path: PathBuf, mode: u32 },
}

/// The XDG base directories as the environment gives them, before any configuration applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdgDirs {
    pub config_home: PathBuf,
    pub data_home: PathBuf,
    /// `$XDG_RUNTIME_DIR`; unset on a machine without a systemd user session.
    pub runtime_dir: Option<PathBuf>,
}

impl XdgDirs {
    /// Reads the XDG variables from the process environment.
    pub fn from_env() -> Result<Self, PathError> {
        Self::from_lookup(|name| env::var_os(name).filter(|v| !v.is_empty()))
    }

    /// Reads the XDG variables through `lookup`, so tests need not touch the real environment.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Self, PathError> {
        let home = lookup("HOME").map(PathBuf::from);
        let base = |var: &'static str, below_home: &str| -> Result<PathBuf, PathError> {
            match lookup(var) {
                Some(value) => {
                    let path = PathBuf::from(&value);
                    if path.is_absolute() {
                        Ok(path)
                    } else {
                        Err(PathError::NotAbsolute {
                            var,
                            value: value.to_string_lossy().into_owned(),
                        })
                    }
                }
                None => home
                    .as_ref()
                    .map(|h| h.join(below_home))
                    .ok_or(PathError::NoHome(var)),
            }
        };
        let runtime_dir = match lookup("XDG_RUNTIME_DIR") {
            Some(value) if Path::new(&value).is_absolute() => Some(PathBuf::from(value)),
            Some(value) => {
                return Err(PathError::NotAbsolute {
                    var: "XDG_RUNTIME_DIR",
                    value: value.to_string_lossy().into_owned(),
                });
            }
            None => None,
        };
        Ok(Self {
            config_home: base("XDG_CONFIG_HOME", ".config")?,
            data_home: base("XDG_DATA_HOME", ".local/share")?,
            runtime_dir,
        })
    }

    /// The configuration file: `CNSPRCY_CONFIG` if set, else `$XDG_CONFIG_HOME/cnsprcy/config.toml`.
    pub fn config_file(&self, override_path: Option<PathBuf>) -> PathBuf {
        override_path.unwrap_or_else(|| self.config_home.join(APP_DIR).join("config.toml"))
    }

    pub fn default_state_dir(&self) -> PathBuf {
        self.data_home.join(APP_DIR)
    }

    pub fn default_handlers_dir(&self) -> PathBuf {
        self.config_home.join(APP_DIR).join("handlers")
    }

    /// `$XDG_RUNTIME_DIR/cnsprcy`, or `$TMPDIR/cnsprcy-UID` where there is no runtime directory.
    /// The fallback is per user; `ensure_private_dir` refuses it if someone else made it.
    pub fn default_runtime_dir(&self) -> PathBuf {
        match &self.runtime_dir {
            Some(dir) => dir.join(APP_DIR),
            None => env::temp_dir().join(format!("cnsprcy-{}", nix::unistd::getuid())),
        }
    }
}

/// The directories one device uses, after configuration is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub config_file: PathBuf,
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub handlers_dir: PathBuf,
}

impl Paths {
    pub fn public_socket(&self) -> PathBuf {
        self.runtime_dir.join(PUBLIC_SOCKET)
    }

    pub fn mesh_socket(&self) -> PathBuf {
        self.runtime_dir.join(MESH_SOCKET)
    }

    pub fn handlers_socket(&self) -> PathBuf {
        self.runtime_dir.join(HANDLERS_SOCKET)
    }

    /// The lock file that keeps a second instance of `service` from starting for this device.
    pub fn lock_file(&self, service: &str) -> PathBuf {
        self.runtime_dir.join(format!("{service}.lock"))
    }
}

/// Creates `path` (and its parents) with mode 0700 if missing, and checks that an existing directory
/// belongs to this user and is closed to everyone else. Never loosens or silently tightens an
/// existing directory: a directory with wrong permissions is the user's to look at.
pub fn ensure_private_dir(path: &Path) -> Result<(), PathError> {
    match fs::metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(|error| PathError::Create {
                    path: path.to_owned(),
                    error,
                })?;
            // `mode` is filtered by the umask; make sure the leaf is exactly 0700.
            fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(|error| {
                PathError::Create {
                    path: path.to_owned(),
                    error,
                }
            })?;
        }
        Err(error) => {
            return Err(PathError::Inspect {
                path: path.to_owned(),
                error,
            });
        }
    }
    check_private_dir(path)
}

/// Checks that `path` is a directory owned by this user with no access for group or others.
pub fn check_private_dir(path: &Path) -> Result<(), PathError> {
    let meta = fs::metadata(path).map_err(|error| PathError::Inspect {
        path: path.to_owned(),
        error,
    })?;
    if !meta.is_dir() {
        return Err(PathError::NotADirectory {
            path: path.to_owned(),
        });
    }
    let uid = nix::unistd::getuid().as_raw();
    if meta.uid() != uid {
        return Err(PathError::WrongOwner {
            path: path.to_owned(),
            owner: meta.uid(),
            uid,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PathError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Expands a leading `~/` to the home directory, as users write paths in the config file.
pub fn expand_home(path: &Path, home: Option<&Path>) -> PathBuf {
    match (path.strip_prefix("~"), home) {
        (Ok(rest), Some(home)) => home.join(rest),
        _ => path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::ffi::OsString;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn xdg_variables_win_over_home() {
        let dirs = XdgDirs::from_lookup(lookup(&[
            ("HOME", "/home/u"),
            ("XDG_CONFIG_HOME", "/c"),
            ("XDG_DATA_HOME", "/d"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
        ]))
        .unwrap();
        assert_eq!(
            dirs.config_file(None),
            PathBuf::from("/c/cnsprcy/config.toml")
        );
        assert_eq!(dirs.default_state_dir(), PathBuf::from("/d/cnsprcy"));
        assert_eq!(
            dirs.default_handlers_dir(),
            PathBuf::from("/c/cnsprcy/handlers")
        );
        assert_eq!(
            dirs.default_runtime_dir(),
            PathBuf::from("/run/user/1000/cnsprcy")
        );
    }

    #[test]
    fn home_fallbacks_and_missing_runtime_dir() {
        let dirs = XdgDirs::from_lookup(lookup(&[("HOME", "/home/u")])).unwrap();
        assert_eq!(dirs.config_home, PathBuf::from("/home/u/.config"));
        assert_eq!(dirs.data_home, PathBuf::from("/home/u/.local/share"));
        let runtime = dirs.default_runtime_dir();
        assert!(
            runtime
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("cnsprcy-")
        );
    }

    #[test]
    fn relative_xdg_paths_are_refused() {
        let err =
            XdgDirs::from_lookup(lookup(&[("HOME", "/h"), ("XDG_DATA_HOME", "rel")])).unwrap_err();
        assert!(err.to_string().contains("XDG_DATA_HOME"), "{err}");
    }

    #[test]
    fn private_dir_is_created_0700_and_open_dir_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        ensure_private_dir(&dir).unwrap();
        let mode = fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let err = ensure_private_dir(&dir).unwrap_err();
        assert!(err.to_string().contains("chmod 700"), "{err}");
    }

    #[test]
    fn tilde_expands_to_home() {
        assert_eq!(
            expand_home(Path::new("~/x"), Some(Path::new("/h"))),
            PathBuf::from("/h/x")
        );
        assert_eq!(
            expand_home(Path::new("/abs"), Some(Path::new("/h"))),
            PathBuf::from("/abs")
        );
    }
}
