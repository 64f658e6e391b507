//! Test support for the cross-crate suites: fixtures that start clusters and
//! inject faults, kept out of the tests themselves.

pub mod lab;
