//! The NetBird management API, as the operator uses it.

mod client;
mod error;
pub mod pat;
mod types;

pub use client::{
    CallObserver, ClientBuildError, ClientOptions, MAX_BODY_BYTES, NetbirdClient, ProxySettings,
    SimRequest, SimResponse, SimulatedNetwork,
};
pub use error::{Endpoint, NetbirdError, TransportKind, status_class};
pub use types::*;
