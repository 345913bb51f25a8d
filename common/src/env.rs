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
        let xdg = XdgDirs::from_env()?;
        // A relative CNSPRCY_CONFIG is taken against the current directory, and shown absolute.
        let explicit = std::env::var_os(CONFIG_ENV)
            .filter(|v| !v.is_empty())
            .map(|v| std::path::absolute(PathBuf::from(&v)).unwrap_or_else(|_| PathBuf::from(v)));
        let is_explicit = explicit.is_some();
        let config_file = xdg.config_file(explicit);
        let (config, source) = Config::load(&config_file, is_explicit)?;
        let paths = config.paths(&xdg, config_file);
        Ok(Self {
            config,
            source,
            paths,
        })
    }
}
