//! A replica's view of one volume: the local device plus the epoch floor that
//! fences deposed primaries (invariant 2).
//!
//! The floor is `(primary, epoch)`: the newest primary this replica has heard
//! of, from committed cluster state or from that primary's own writes. An op
//! is accepted iff `op.epoch >= floor.epoch` or it comes from `floor.primary`
//! (a primary's epochs never go backwards on its ordered link, and a
//! reconfiguration that keeps the primary must not fence its in-flight ops).

use crate::block::BlockDevice;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Floor {
    pub primary: String,
    pub epoch: u64,
}

pub struct ReplicaVolume {
    pub name: String,
    pub device: Arc<dyn BlockDevice>,
    floor: Mutex<Floor>,
    /// Called (outside the hot path) when the floor epoch rises, to persist it.
    persist: Box<dyn Fn(u64) + Send + Sync>,
}

impl ReplicaVolume {
    pub fn new(
        name: String,
        device: Arc<dyn BlockDevice>,
        floor: Floor,
        persist: Box<dyn Fn(u64) + Send + Sync>,
    ) -> Self {
        Self { name, device, floor: Mutex::new(floor), persist }
    }

    pub fn floor(&self) -> Floor {
        self.floor.lock().expect("poisoned").clone()
    }

    /// Raise the floor from committed state (never lowers it).
    pub fn observe(&self, primary: &str, epoch: u64) {
        let raised = {
            let mut f = self.floor.lock().expect("poisoned");
            if epoch > f.epoch {
                *f = Floor { primary: primary.to_string(), epoch };
                true
            } else {
                false
            }
        };
        if raised {
            (self.persist)(epoch);
        }
    }

    /// Check an op from `from` at `epoch`; Err carries the floor epoch.
    pub fn admit(&self, from: &str, epoch: u64) -> Result<(), u64> {
        let raised = {
            let mut f = self.floor.lock().expect("poisoned");
            if epoch > f.epoch {
                *f = Floor { primary: from.to_string(), epoch };
                true
            } else if epoch == f.epoch || f.primary == from {
                false
            } else {
                return Err(f.epoch);
            }
        };
        if raised {
            (self.persist)(epoch);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nop;
    #[async_trait::async_trait]
    impl BlockDevice for Nop {
        fn size(&self) -> u64 {
            0
        }
        async fn read(&self, _: u64, _: u32) -> crate::block::BlockResult<bytes::Bytes> {
            Ok(bytes::Bytes::new())
        }
        async fn write(&self, _: u64, _: bytes::Bytes, _: bool) -> crate::block::BlockResult<()> {
            Ok(())
        }
        async fn flush(&self) -> crate::block::BlockResult<()> {
            Ok(())
        }
        async fn trim(&self, _: u64, _: u32, _: bool) -> crate::block::BlockResult<()> {
            Ok(())
        }
        async fn write_zeroes(&self, _: u64, _: u32, _: bool, _: bool) -> crate::block::BlockResult<()> {
            Ok(())
        }
    }

    fn vol() -> ReplicaVolume {
        ReplicaVolume::new(
            "v".into(),
            Arc::new(Nop),
            Floor { primary: "a1".into(), epoch: 1 },
            Box::new(|_| {}),
        )
    }

    #[test]
    fn a_deposed_primary_is_fenced_after_a_promotion() {
        let v = vol();
        v.observe("b1", 2);
        assert_eq!(v.admit("a1", 1), Err(2));
        assert_eq!(v.admit("b1", 2), Ok(()));
    }

    #[test]
    fn a_newer_primary_write_fences_the_old_one_before_state_arrives() {
        let v = vol();
        assert_eq!(v.admit("b1", 2), Ok(()));
        assert_eq!(v.admit("a1", 1), Err(2));
    }

    #[test]
    fn in_flight_ops_of_the_same_primary_survive_a_reconfiguration() {
        let v = vol();
        v.observe("a1", 2); // a1 removed another replica: epoch bumped, same primary
        assert_eq!(v.admit("a1", 1), Ok(()));
    }
}
