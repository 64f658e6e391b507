//! Deterministic simulation of metro's control protocol (turmoil).
//!
//! Five hosts in three sites (dc-a: a1 a2, dc-b: b1 b2, witness: w1) exchange
//! datagrams over turmoil's simulated network, which injects latency, full and
//! one-way partitions and crashes with restarts; each host's clock drifts
//! within a bound. An [`oracle::Oracle`] checks DESIGN.md section 4 at every
//! event and after every step.
//!
//! What is real and what is a model:
//! - REAL: `metro_quorum::state::ClusterState::apply` (the replicated state
//!   machine) and `metro_quorum::decide` (`LeaseTable`, `SiteTracker`,
//!   `plan_failover`): the leader in the simulator calls exactly the code the
//!   engine calls.
//! - MODEL: the consensus ([`raft`], a compact Raft with fixed voters standing
//!   in for openraft) and the data path ([`node`]: primary mirrors each write
//!   to every in-sync replica, acknowledges only when all hold it, asks the
//!   leader to drop a silent replica and waits for the commit).
//!
//! The seam for the real engine is [`node::Node`]: its consensus half is the
//! only part that would be replaced by `metro_quorum::Quorum` over an
//! injectable turmoil connector; the decisions, the oracle and the harness
//! stay as they are.
//!
//! ```text
//!   harness ──► turmoil::Sim ──► host_loop (per host) ──► Node ──► Raft (model)
//!      │             ▲ faults                                 └──► decide::* (real)
//!      └── after each step: Oracle::check_instant            └──► ClusterState::apply (real)
//! ```

pub mod clock;
pub mod datapath;
pub mod disk;
pub mod engine;
pub mod engine_oracle;
pub mod faults;
pub mod harness;
pub mod msg;
pub mod node;
pub mod oracle;
pub mod raft;

pub use faults::{Fault, Scenario};
pub use harness::{run, SimOptions, SimReport};
pub use node::{Bugs, SimTiming};
