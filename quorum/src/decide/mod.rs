//! Pure, sans-IO decisions of the quorum leader (DESIGN.md sections 1, 2, 4, 5, 7).
//!
//! Every function here takes the replicated [`ClusterState`](crate::state::ClusterState),
//! the leader's view of which nodes are alive, and the current time, and
//! returns what to do. Nothing reads a clock, touches the network or the disk:
//! the openraft plumbing and the simulator drive the same code.
//!
//! ```text
//!   heartbeats ──► alive set ──┬─► SiteTracker::observe ──► SetSiteMode
//!                              ├─► plan_failover ────────► ChangeVolume (promote)
//!   LeaseTable ◄── grant ──────┘        ▲ holder_expired
//!                              ├─► desired_voters ───────► membership_steps
//!   create request ────────────┴─► place_volume ─────────► CreateVolume
//! ```
//!
//! Time: a `u64` of milliseconds on a monotonic clock (`now_ms`), the same
//! unit everywhere in this module, so the simulator can drive it directly.

pub mod activate;
pub mod failover;
pub mod lease;
pub mod liveness;
pub mod moves;
pub mod placement;
pub mod sites;
pub mod voters;

/// Cluster builders for tests (this crate's, and others' with the
/// `test-support` feature).
#[cfg(any(test, feature = "test-support"))]
pub mod fixture;
#[cfg(test)]
mod matrix;

pub use activate::{check_activate, plan_override, ActivateRefusal, OverridePlan};
pub use failover::{plan_failover, FailoverPlan};
pub use lease::{LeaseError, LeaseTable, LeaseTiming};
pub use liveness::Liveness;
pub use moves::{move_target, planned_move, primaries_of};
pub use placement::{place_volume, PlacementError};
pub use sites::{arbitrate, hand_over_wanted, SiteTracker};
pub use voters::{desired_voters, desired_voters_returning, gate_activations, has_quorum, membership_steps};
