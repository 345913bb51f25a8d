//! The shared library of cnsprcy: configuration, paths, identity, the public API's and the
//! internal sockets' message types and framing, and the pieces every service process shares.

pub mod activation;
pub mod address;
pub mod api;
pub mod client;
pub mod config;
pub mod env;
pub mod framing;
pub mod fsutil;
#[cfg(test)]
mod fuzz;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod identity;
pub mod invitation;
pub mod ipc;
pub mod lock;
pub mod logging;
pub mod mesh_link;
pub mod netif;
pub mod paths;
pub mod rpc;
pub mod service;
pub mod sockets;
pub mod suggest;
pub mod tag;
pub mod wire;

/// The version of every cnsprcy binary, from the workspace manifest.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The Noise protocol every session uses.
pub const NOISE_PARAMS: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
