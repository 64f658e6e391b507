//! Test support: fixtures that start clusters and inject faults.

pub mod sim;
