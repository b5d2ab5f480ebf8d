//! Ferry's agent as a library: `main.rs` only wires these together, and tests import them.
pub mod agent;
pub mod attach;
pub mod bpf;
pub mod cleanup;
pub mod cli;
pub mod error;
pub mod health;
pub mod http;
pub mod inspect;
pub mod observe;
pub mod loader;
pub mod model;
pub mod packet;
pub mod reconcile;
pub mod select;
pub mod sources;
pub mod trace;
