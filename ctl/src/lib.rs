//! `metroctl`: the operator's CLI and the one-machine lab.
//!
//! The binary (`src/bin/metroctl.rs`) is thin: it parses [`cli::Cli`] and
//! calls into [`lab`] and [`certs`]. Tests call the same library in-process.

pub mod certs;
pub mod cli;
pub mod lab;
