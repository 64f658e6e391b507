//! Volumes as this node sees them: the primary's mirrored device, the control
//! seam it needs, and the manager that follows committed cluster state.

pub mod control;
pub mod file_storage;
pub mod manager;
pub mod primary;
pub mod resolve;
pub mod storage;
