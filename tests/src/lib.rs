//! Test support for the cross-crate suites, kept out of the tests themselves:
//! - [`lab`]: real processes in the lab topology, fault injection, the write oracle;
//! - [`sim`]: the deterministic simulation of the quorum engine (turmoil).

pub mod lab;
pub mod sim;
