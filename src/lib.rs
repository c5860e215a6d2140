//! netbird-operator: bootstraps self-hosted NetBird management servers from Kubernetes and keeps
//! their API token in a Secret.
#![cfg_attr(not(test), forbid(unsafe_code))]
// the tests' counting allocator (`footprint`) is the one exception
#![cfg_attr(test, deny(unsafe_code))]

pub mod binding;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod credentials;
pub mod duration;
pub mod fingerprint;
#[cfg(test)]
mod footprint;
pub mod http;
pub mod metrics;
pub mod netbird;
pub mod telemetry;
pub mod tls;
pub mod token_secret;
