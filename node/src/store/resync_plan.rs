//! `ResyncPlan`: what a catching-up replica must receive (pure, sans-IO).
//!
//! ```text
//!  need  = dirty regions ∪ hot extents              (clipped to the volume)
//!  copy  = need ∩ data ranges of the source          (read + write)
//!  punch = need \ data ranges of the source          (trim on the target)
//! ```
//!
//! Invariants (invariant 6, "resync moves only what differs"):
//! - `copy ∪ punch == need` and `copy ∩ punch == ∅`, all coalesced.
//! - Bytes moved over the network are `copy_bytes <= total(need)`, never the
//!   volume size unless everything is dirty and allocated.
//! - [`ResyncPlan::resume_from`] drops exactly what lies below a cursor, so an
//!   interrupted resync does not redo finished work.

use super::ranges::{self, Range64};

/// One step of executing a plan, in offset order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncStep {
    /// Read `[offset, offset+len)` from the source, write it to the target.
    Copy { offset: u64, len: u64 },
    /// Trim (punch) `[offset, offset+len)` on the target: the source has a hole.
    Punch { offset: u64, len: u64 },
}

impl ResyncStep {
    /// Offset just past this step: what to store in the cursor once done.
    pub fn end(&self) -> u64 {
        match *self {
            ResyncStep::Copy { offset, len } | ResyncStep::Punch { offset, len } => offset + len,
        }
    }
}

/// The ranges to copy and to punch to bring a target up to date.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResyncPlan {
    pub copy: Vec<Range64>,
    pub punch: Vec<Range64>,
    pub copy_bytes: u64,
    pub punch_bytes: u64,
}

impl ResyncPlan {
    /// Build a plan. `dirty` comes from the peer's
    /// [`DirtyBitmap::dirty_regions`](super::DirtyBitmap::dirty_regions),
    /// `hot` from [`ActivityLog::hot_extents`](super::ActivityLog::hot_extents),
    /// `source_data` from the source's
    /// [`LocalVolume::data_ranges`](super::LocalVolume::data_ranges) (a
    /// superset of the non-zero bytes). Inputs need not be sorted.
    pub fn new(dirty: &[Range64], hot: &[Range64], source_data: &[Range64], volume_size: u64) -> ResyncPlan {
        let need = ranges::clip(&ranges::union(dirty, hot), volume_size);
        let copy = ranges::intersect(&need, source_data);
        let punch = ranges::subtract(&need, &copy);
        Self::from_parts(copy, punch)
    }

    /// A plan that copies the whole volume (last resort; count and report it).
    pub fn full(source_data: &[Range64], volume_size: u64) -> ResyncPlan {
        Self::new(&[(0, volume_size)], &[], source_data, volume_size)
    }

    fn from_parts(copy: Vec<Range64>, punch: Vec<Range64>) -> ResyncPlan {
        ResyncPlan { copy_bytes: ranges::total(&copy), punch_bytes: ranges::total(&punch), copy, punch }
    }

    /// The remainder of this plan at or after `next_offset` (from a
    /// [`ResyncCursor`](super::ResyncCursor)).
    pub fn resume_from(&self, next_offset: u64) -> ResyncPlan {
        let tail = [(next_offset, u64::MAX - next_offset)];
        Self::from_parts(ranges::intersect(&self.copy, &tail), ranges::intersect(&self.punch, &tail))
    }

    /// Bytes the plan covers (copied + punched).
    pub fn total_bytes(&self) -> u64 {
        self.copy_bytes + self.punch_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.copy.is_empty() && self.punch.is_empty()
    }

    /// Steps in offset order, each at most `max_step_bytes` long (e.g. the
    /// largest replication message), ready to execute and checkpoint.
    pub fn steps(&self, max_step_bytes: u64) -> Vec<ResyncStep> {
        assert!(max_step_bytes > 0, "max_step_bytes must be positive");
        let mut out = Vec::new();
        let mut all: Vec<(u64, u64, bool)> = self.copy.iter().map(|&(o, l)| (o, l, true)).collect();
        all.extend(self.punch.iter().map(|&(o, l)| (o, l, false)));
        all.sort_unstable();
        for (o, l, is_copy) in all {
            let mut pos = o;
            while pos < o + l {
                let n = max_step_bytes.min(o + l - pos);
                out.push(if is_copy {
                    ResyncStep::Copy { offset: pos, len: n }
                } else {
                    ResyncStep::Punch { offset: pos, len: n }
                });
                pos += n;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SIZE: u64 = 4096;
    const REGION: u64 = 64;

    #[test]
    fn hole_in_source_becomes_a_punch_and_data_becomes_a_copy() {
        let plan = ResyncPlan::new(&[(0, 200)], &[], &[(100, 50)], SIZE);
        assert_eq!(plan.copy, vec![(100, 50)]);
        assert_eq!(plan.punch, vec![(0, 100), (150, 50)]);
        assert_eq!((plan.copy_bytes, plan.punch_bytes), (50, 150));
    }

    #[test]
    fn dirty_and_hot_ranges_are_united_and_clipped_to_the_volume() {
        let plan = ResyncPlan::new(&[(0, 10), (5, 10)], &[(4090, 100)], &[(0, SIZE)], SIZE);
        assert_eq!(plan.copy, vec![(0, 15), (4090, 6)]);
        assert!(plan.punch.is_empty());
    }

    #[test]
    fn resume_drops_exactly_what_lies_below_the_cursor() {
        let plan = ResyncPlan::new(&[(0, 1000)], &[], &[(0, 300), (600, 100)], SIZE);
        let rest = plan.resume_from(650);
        assert_eq!(rest.copy, vec![(650, 50)]);
        assert_eq!(rest.punch, vec![(700, 300)]);
        assert_eq!(plan.resume_from(0), plan);
        assert!(plan.resume_from(1000).is_empty());
    }

    #[test]
    fn steps_are_ordered_and_bounded() {
        let plan = ResyncPlan::new(&[(0, 1000)], &[], &[(0, 300), (600, 100)], SIZE);
        let steps = plan.steps(128);
        assert!(steps.windows(2).all(|w| w[0].end() <= w[1].end()));
        let covered: u64 = steps
            .iter()
            .map(|s| match *s {
                ResyncStep::Copy { len, .. } | ResyncStep::Punch { len, .. } => {
                    assert!(len <= 128);
                    len
                }
            })
            .sum();
        assert_eq!(covered, 1000);
        assert_eq!(steps[0], ResyncStep::Copy { offset: 0, len: 128 });
    }

    /// A source volume: bytes plus the ranges that hold data (holes are zero).
    fn arb_case() -> impl Strategy<Value = (Vec<u8>, Vec<Range64>, Vec<u64>, Vec<u8>, u64)> {
        let data = proptest::collection::vec((0u64..SIZE, 1u64..300), 0..8);
        let dirty = proptest::collection::vec(0u64..SIZE / REGION, 0..20);
        (data, dirty, any::<u64>(), 1u64..2000).prop_map(|(data, dirty, seed, resume)| {
            let data = super::ranges::clip(&super::ranges::normalize(&data), SIZE);
            let mut src = vec![0u8; SIZE as usize];
            let mut x = seed | 1;
            for &(o, l) in &data {
                for b in &mut src[o as usize..(o + l) as usize] {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
            // The stale target equals the source outside dirty regions and
            // holds garbage inside them.
            let mut target = src.clone();
            for &r in &dirty {
                for b in &mut target[(r * REGION) as usize..((r + 1) * REGION) as usize] {
                    *b = 0xA5;
                }
            }
            (src, data, dirty, target, resume)
        })
    }

    fn apply(plan: &ResyncPlan, src: &[u8], target: &mut [u8]) -> u64 {
        let mut moved = 0;
        for step in plan.steps(100) {
            match step {
                ResyncStep::Copy { offset, len } => {
                    let r = offset as usize..(offset + len) as usize;
                    target[r.clone()].copy_from_slice(&src[r]);
                    moved += len;
                }
                ResyncStep::Punch { offset, len } => {
                    target[offset as usize..(offset + len) as usize].fill(0);
                }
            }
        }
        moved
    }

    proptest! {
        #[test]
        fn executing_the_plan_makes_a_stale_target_identical_moving_only_dirty_bytes(
            (src, data, dirty, mut target, _resume) in arb_case()
        ) {
            let dirty_ranges: Vec<Range64> = dirty.iter().map(|&r| (r * REGION, REGION)).collect();
            let dirty_bytes = super::ranges::total(&super::ranges::normalize(&dirty_ranges));
            let plan = ResyncPlan::new(&dirty_ranges, &[], &data, SIZE);
            let moved = apply(&plan, &src, &mut target);
            prop_assert_eq!(&target, &src);
            prop_assert_eq!(plan.total_bytes(), dirty_bytes);
            prop_assert!(moved <= dirty_bytes);
            prop_assert_eq!(moved, plan.copy_bytes);
        }

        #[test]
        fn an_interrupted_resync_resumed_from_its_cursor_converges(
            (src, data, dirty, mut target, resume) in arb_case()
        ) {
            let dirty_ranges: Vec<Range64> = dirty.iter().map(|&r| (r * REGION, REGION)).collect();
            let plan = ResyncPlan::new(&dirty_ranges, &[], &data, SIZE);
            // Run the steps up to the interruption point, then resume.
            let mut cursor = 0;
            for step in plan.steps(100) {
                if step.end() > resume { break; }
                match step {
                    ResyncStep::Copy { offset, len } => {
                        let r = offset as usize..(offset + len) as usize;
                        target[r.clone()].copy_from_slice(&src[r]);
                    }
                    ResyncStep::Punch { offset, len } => target[offset as usize..(offset + len) as usize].fill(0),
                }
                cursor = step.end();
            }
            let rest = plan.resume_from(cursor);
            prop_assert!(rest.total_bytes() <= plan.total_bytes());
            apply(&rest, &src, &mut target);
            prop_assert_eq!(&target, &src);
        }
    }
}
