//! Ferry's agent as a library: `main.rs` only wires these together, and tests import them.
pub mod agent;
pub mod attach;
pub mod bpf;
pub mod error;
pub mod health;
pub mod loader;
pub mod model;
pub mod packet;
pub mod reconcile;
pub mod select;
pub mod sources;
pub mod trace;
