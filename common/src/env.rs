//! What every process of a device starts from: the configuration file and the directories it
//! selects. The CLI, `cnspr serve` and each service binary load it the same way.

use std::path::PathBuf;

use thiserror::Error;

use crate::config::{CONFIG_ENV, Config, ConfigError, ConfigSource};
use crate::paths::{PathError, Paths, XdgDirs};

#[derive(Debug, Error)]
pub enum EnvError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Paths(#[from] PathError),
}

/// The loaded configuration and the paths it selects.
#[derive(Debug, Clone)]
pub struct DeviceEnv {
    pub config: Config,
    pub source: ConfigSource,
    pub paths: Paths,
}

impl DeviceEnv {
    /// Loads from the process environment (XDG variables, `CNSPRCY_CONFIG`).
    pub fn load() -> Result<Self, EnvError> {
        let (xdg, config_file, is_explicit) = locate()?;
        let (config, source) = Config::load(&config_file, is_explicit)?;
        let paths = config.paths(&xdg, config_file);
        Ok(Self {
            config,
            source,
            paths,
        })
    }

    /// As [`load`](Self::load), but a configuration file that cannot be read or parsed is
    /// returned as the problem beside an environment with the directories it still selects (its
    /// `[paths]` section if that reads, else the defaults) and default settings. For what needs
    /// only the directories (the socket's above all): a client command, or the doctor.
    pub fn load_lenient() -> Result<(Self, Option<ConfigError>), EnvError> {
        let (xdg, config_file, is_explicit) = locate()?;
        let problem = match Config::load(&config_file, is_explicit) {
            Ok((config, source)) => {
                let paths = config.paths(&xdg, config_file);
                let env = Self {
                    config,
                    source,
                    paths,
                };
                return Ok((env, None));
            }
            Err(problem) => problem,
        };
        let text = std::fs::read_to_string(&config_file).ok();
        let config = text
            .as_deref()
            .and_then(Config::paths_section)
            .unwrap_or_default();
        let env = Self {
            paths: config.paths(&xdg, config_file.clone()),
            source: ConfigSource {
                exists: text.is_some(),
                path: config_file,
            },
            config,
        };
        Ok((env, Some(problem)))
    }
}

/// The XDG directories, the configuration file, and whether `CNSPRCY_CONFIG` named it.
fn locate() -> Result<(XdgDirs, PathBuf, bool), EnvError> {
    let xdg = XdgDirs::from_env()?;
    // A relative CNSPRCY_CONFIG is taken against the current directory, and shown absolute.
    let explicit = std::env::var_os(CONFIG_ENV)
        .filter(|v| !v.is_empty())
        .map(|v| std::path::absolute(PathBuf::from(&v)).unwrap_or_else(|_| PathBuf::from(v)));
    let is_explicit = explicit.is_some();
    let config_file = xdg.config_file(explicit);
    Ok((xdg, config_file, is_explicit))
}
