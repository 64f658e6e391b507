//! Test support: fixtures that start clusters and inject faults.
