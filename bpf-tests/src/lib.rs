//! Shared fixtures for tests that load Ferry's real programs.
pub mod fixture;
pub mod packet;
