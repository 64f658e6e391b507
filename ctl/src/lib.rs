//! `metroctl`: the operator's CLI and the one-machine lab.
