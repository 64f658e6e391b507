//! End to end on real files: a replica misses writes and trims while out of
//! sync, a crash leaves an activity-log extent hot, and an interrupted
//! resync resumed from its cursor makes the replica identical while moving
//! only dirty bytes (invariant 6).

use bytes::Bytes;
use metro_node::block::BlockDevice;
use metro_node::store::testing::pattern;
use metro_node::store::{ActivityLog, DirtyBitmap, LocalVolume, ResyncCursor, ResyncPlan, ResyncStep};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 256 * MIB;
const REGION: u64 = 64 << 10;
const STEP: u64 = MIB;

async fn write_both(a: &LocalVolume, b: &LocalVolume, off: u64, data: Bytes) {
    a.write(off, data.clone(), false).await.unwrap();
    b.write(off, data, false).await.unwrap();
}

async fn run_step(src: &LocalVolume, dst: &LocalVolume, step: ResyncStep) -> u64 {
    match step {
        ResyncStep::Copy { offset, len } => {
            let data = src.read(offset, len as u32).await.unwrap();
            dst.write(offset, data, false).await.unwrap();
            len
        }
        ResyncStep::Punch { offset, len } => {
            dst.trim(offset, len as u32, false).await.unwrap();
            0
        }
    }
}

async fn assert_identical(a: &LocalVolume, b: &LocalVolume) {
    let chunk = 8 * MIB;
    for off in (0..SIZE).step_by(chunk as usize) {
        let (x, y) = (a.read(off, chunk as u32).await.unwrap(), b.read(off, chunk as u32).await.unwrap());
        if x != y {
            let i = x.iter().zip(y.iter()).position(|(p, q)| p != q).unwrap();
            panic!("replicas differ at byte {}", off + i as u64);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_resync_resumes_and_moves_only_dirty_bytes() {
    let root = tempfile::tempdir().unwrap();
    let src = LocalVolume::create(&root.path().join("a1"), "db", SIZE).unwrap();
    let dst = LocalVolume::create(&root.path().join("b1"), "db", SIZE).unwrap();

    tracing::info!("--- in sync: both replicas get the same writes");
    for i in 0..20u64 {
        write_both(&src, &dst, i * 10 * MIB, pattern(i, 2 * MIB as usize)).await;
    }

    tracing::info!("--- b1 leaves in_sync; a1 records what b1 misses");
    let (mut bitmap, _) = DirtyBitmap::open_or_create(&src.dirty_bitmap_path("b1"), SIZE, REGION).unwrap();
    let (mut al, _) = ActivityLog::open(&src.activity_log_path(), SIZE, 4 * MIB, 64).unwrap();
    let missed: [(u64, u64); 5] = [
        (3 * MIB, 100_000),
        (50 * MIB + 777, 5000),
        (120 * MIB, 3 * MIB),
        (200 * MIB, 4096),
        (255 * MIB, MIB),
    ];
    for (i, &(off, len)) in missed.iter().enumerate() {
        bitmap.mark_durable(off, len).unwrap();
        src.write(off, pattern(1000 + i as u64, len as usize), false).await.unwrap();
    }
    // A trim b1 misses: the source range becomes a hole.
    bitmap.mark_durable(40 * MIB, 2 * MIB).unwrap();
    src.trim(40 * MIB, 2 * MIB as u32, false).await.unwrap();
    // Stale data on b1 where the source has a hole: must be punched.
    bitmap.mark_durable(230 * MIB, MIB).unwrap();
    dst.write(230 * MIB, pattern(77, MIB as usize), false).await.unwrap();

    tracing::info!("--- a1 crashes with a write in flight that reached only a1");
    al.begin_write(180 * MIB, 8192).unwrap();
    src.write(180 * MIB, pattern(555, 8192), false).await.unwrap();
    drop(al);
    let (al, _) = ActivityLog::open(&src.activity_log_path(), SIZE, 4 * MIB, 64).unwrap();

    tracing::info!("--- plan the resync");
    let dirty: Vec<_> = bitmap.dirty_regions().collect();
    let dirty_bytes = bitmap.dirty_bytes();
    let hot = al.hot_extents();
    let data = src.data_ranges(0, SIZE).unwrap();
    let plan = ResyncPlan::new(&dirty, &hot, &data, SIZE);
    let hot_bytes: u64 = hot.iter().map(|h| h.1).sum();
    assert!(plan.total_bytes() <= dirty_bytes + hot_bytes);
    assert!(plan.copy_bytes < SIZE / 16, "plan copies {} of {SIZE} bytes", plan.copy_bytes);
    assert!(plan.punch_bytes >= 3 * MIB, "trimmed and stale-hole ranges must be punched");

    tracing::info!("--- run half the steps, checkpointing, then 'crash'");
    let generation = src.generation();
    let cursor_path = src.resync_cursor_path("b1");
    let steps = plan.steps(STEP);
    let mut moved = 0;
    for step in &steps[..steps.len() / 2] {
        moved += run_step(&src, &dst, *step).await;
        dst.flush().await.unwrap();
        ResyncCursor { next_offset: step.end(), generation }.save(&cursor_path).unwrap();
    }

    tracing::info!("--- resume from the cursor");
    let cursor = ResyncCursor::load(&cursor_path).unwrap();
    let resume_at = ResyncCursor::resume_offset(cursor, generation);
    assert!(resume_at > 0);
    let rest = plan.resume_from(resume_at);
    assert!(rest.total_bytes() < plan.total_bytes());
    for step in rest.steps(STEP) {
        moved += run_step(&src, &dst, step).await;
    }
    dst.flush().await.unwrap();
    ResyncCursor::remove(&cursor_path).unwrap();
    bitmap.clear_all();
    bitmap.persist().unwrap();

    assert_identical(&src, &dst).await;
    assert_eq!(moved, plan.copy_bytes, "an interrupted resync moves each byte once");
    assert!(moved <= dirty_bytes + hot_bytes && moved < SIZE / 16, "moved {moved} bytes");
    eprintln!(
        "resync: volume {SIZE} B, dirty {dirty_bytes} B, hot {hot_bytes} B, copied {moved} B, punched {} B",
        plan.punch_bytes
    );
}
