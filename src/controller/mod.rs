//! The NetbirdInstance controller, by floor, each module saying what it owns:
//! - `watch` (the watches and their wiring, [`run`]) and `pass` (one pass, [`reconcile`]: read,
//!   decide, do, report);
//! - below the pass: `steps` (the one step a decision asks for, and the world it reads),
//!   `decide` (the pure decision), `report` (the status a pass reports), `publish` (the status
//!   write, Events and metrics), `schedule` (when the next pass runs, and the backoff),
//!   `cleanup` (the finalizer);
//! - at the bottom, read by all and calling none: `context` (what every pass shares, the
//!   [`Settings`] and the [`Error`]s that end a pass early), `memory` (what the passes remember
//!   about each instance), `secrets` and `refs` (the Secret cache and who references what),
//!   `setup_gates`, `previous_use`, `status_patch`, `trim`, `namespaces`, `recorder`, `backoff`
//!   (the one backoff).
//!
//! A pass reads the world (the instance and its Secrets), asks [`decide::decide`] for the next
//! step, does that one step, and asks again until the decision is a verdict; then it writes the
//! status (only when it changed) and Events for transitions.

mod backoff;
pub mod cleanup;
mod context;
pub mod decide;
mod memory;
mod namespaces;
mod pass;
mod previous_use;
mod publish;
mod recorder;
mod refs;
pub mod report;
mod schedule;
mod secrets;
mod setup_gates;
mod status_patch;
mod steps;
mod trim;
mod watch;

pub use backoff::{backoff_delay, set_jitter_source};
use context::lock;
pub use context::{Context, Error, Settings};
pub use pass::reconcile;
pub use publish::instance_gauges;
pub use recorder::Recorder;
pub use watch::{run, store_held_writes};
