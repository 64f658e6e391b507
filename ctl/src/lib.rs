//! `metroctl`: the operator's CLI and the one-machine lab.
pub mod client;
pub mod commands;
