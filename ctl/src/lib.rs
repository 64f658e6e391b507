//! `metroctl`: the operator's CLI and the one-machine lab.
//!
//! The binary (`src/bin/metroctl.rs`) is thin: it parses [`cli::Cli`] and
//! calls into [`lab`], [`certs`] and [`commands`]. Tests call the same
//! library in-process.

pub mod certs;
pub mod cli;
pub mod client;
pub mod commands;
pub mod lab;
