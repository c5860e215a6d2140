//! netbird-operator: bootstraps self-hosted NetBird management servers from Kubernetes and keeps
//! their API token in a Secret.
#![forbid(unsafe_code)]

pub mod binding;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod credentials;
pub mod duration;
pub mod fingerprint;
pub mod http;
pub mod metrics;
pub mod netbird;
pub mod telemetry;
pub mod tls;
pub mod token_secret;
