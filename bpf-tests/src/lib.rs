//! Shared fixtures for tests that load Ferry's real programs.
pub mod apilab;
pub mod cluster;
pub mod conformance;
pub mod fakeapi;
pub mod fixture;
pub mod lab;
pub mod netprog;
pub mod podnet;
pub mod raw;
pub mod scale;
pub mod steady;
pub use dataplane_agent::packet;
