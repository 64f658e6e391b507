//! The [`BlockDevice`] conformance suite every backend runs (LocalVolume,
//! MemVolume, and later the replicated primary).
//!
//! Requirements on devices produced by `make`: a fresh, all-zero device of
//! at least [`MIN_CONFORMANCE_SIZE`] bytes each call. The suite panics with
//! a message naming the failed property.

use crate::block::{BlockDevice, BlockError};
use bytes::Bytes;
use std::sync::Arc;

/// Smallest device the suite accepts: room for its 4 MiB large-I/O case
/// and the concurrent-writer stripes.
pub const MIN_CONFORMANCE_SIZE: u64 = 8 << 20;

/// Deterministic, position-dependent test pattern.
pub fn pattern(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// Run every conformance check against fresh devices from `make`.
pub async fn conformance_suite(make: impl Fn() -> Arc<dyn BlockDevice>) {
    read_after_write_returns_the_written_bytes(make()).await;
    unwritten_ranges_read_as_zeroes(make()).await;
    trim_and_write_zeroes_zero_exactly_their_range(make()).await;
    out_of_range_requests_fail_without_side_effects(make()).await;
    large_and_unaligned_io_round_trips(make()).await;
    concurrent_writers_to_disjoint_ranges_do_not_interfere(make()).await;
    flush_and_fua_succeed_and_keep_data(make()).await;
    a_write_batch_applies_in_order_and_fails_only_its_bad_ranges(make()).await;
}

fn check_size(d: &Arc<dyn BlockDevice>) {
    assert!(
        d.size() >= MIN_CONFORMANCE_SIZE,
        "conformance devices need at least {MIN_CONFORMANCE_SIZE} bytes, got {}",
        d.size()
    );
}

async fn read_after_write_returns_the_written_bytes(d: Arc<dyn BlockDevice>) {
    check_size(&d);
    let data = pattern(1, 8192);
    d.write(4096, data.clone(), false).await.expect("write");
    assert_eq!(d.read(4096, 8192).await.expect("read"), data, "read-after-write");
    let over = pattern(2, 4096);
    d.write(8192, over.clone(), false).await.expect("overwrite");
    let back = d.read(4096, 8192).await.expect("read");
    assert_eq!(&back[..4096], &data[..4096], "overwrite leaked before its range");
    assert_eq!(&back[4096..], &over[..], "overwrite not visible");
    let last = d.size() - 4096;
    d.write(last, pattern(3, 4096), false).await.expect("write last block");
    assert_eq!(d.read(last, 4096).await.unwrap(), pattern(3, 4096), "last block");
}

async fn unwritten_ranges_read_as_zeroes(d: Arc<dyn BlockDevice>) {
    check_size(&d);
    let r = d.read(0, 1 << 20).await.expect("read");
    assert!(r.iter().all(|&b| b == 0), "fresh device not zero");
    d.write(1 << 20, pattern(4, 512), false).await.unwrap();
    let r = d.read((1 << 20) + 512, 4096).await.unwrap();
    assert!(r.iter().all(|&b| b == 0), "bytes after a write not zero");
    assert_eq!(d.read(0, 0).await.expect("zero-length read").len(), 0);
}

async fn trim_and_write_zeroes_zero_exactly_their_range(d: Arc<dyn BlockDevice>) {
    check_size(&d);
    let base = 2 << 20;
    d.write(base, pattern(5, 1 << 20), false).await.unwrap();
    d.trim(base + 65536, 131072, false).await.expect("trim aligned");
    d.trim(base + 300_001, 777, false).await.expect("trim unaligned");
    d.write_zeroes(base + 500_000, 10_000, false, true).await.expect("zeroes may punch");
    d.write_zeroes(base + 700_000, 70_000, true, false).await.expect("zeroes no punch fua");
    let got = d.read(base, 1 << 20).await.unwrap();
    let mut want = pattern(5, 1 << 20).to_vec();
    for (o, l) in [(65536, 131072), (300_001, 777), (500_000, 10_000), (700_000, 70_000)] {
        want[o..o + l].fill(0);
    }
    let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
    assert!(first_diff.is_none(), "trim/zeroes wrong at byte {first_diff:?}");
    d.trim(0, 0, false).await.expect("zero-length trim");
}

async fn out_of_range_requests_fail_without_side_effects(d: Arc<dyn BlockDevice>) {
    check_size(&d);
    let size = d.size();
    let oor = |r: Result<(), BlockError>, what: &str| {
        assert!(matches!(r, Err(BlockError::OutOfRange { .. })), "{what}: expected OutOfRange, got {r:?}");
    };
    let r = d.read(size - 100, 4096).await;
    assert!(matches!(r, Err(BlockError::OutOfRange { .. })), "read past end: {r:?}");
    let r = d.read(u64::MAX - 10, 4096).await;
    assert!(matches!(r, Err(BlockError::OutOfRange { .. })), "read overflowing u64: {r:?}");
    oor(d.write(size - 100, pattern(6, 4096), false).await, "write past end");
    oor(d.write(size, pattern(6, 1), false).await, "write at end");
    oor(d.trim(size - 512, 1024, false).await, "trim past end");
    oor(d.write_zeroes(size, 512, false, true).await, "zeroes past end");
    let tail = d.read(size - 4096, 4096).await.unwrap();
    assert!(tail.iter().all(|&b| b == 0), "rejected write changed data");
}

async fn large_and_unaligned_io_round_trips(d: Arc<dyn BlockDevice>) {
    check_size(&d);
    let big = pattern(7, 4 << 20);
    d.write(1 << 20, big.clone(), false).await.expect("4 MiB write");
    assert_eq!(d.read(1 << 20, 4 << 20).await.unwrap(), big, "4 MiB read");
    let odd = pattern(8, 12_345);
    d.write(777, odd.clone(), false).await.expect("unaligned write");
    assert_eq!(d.read(777, 12_345).await.unwrap(), odd, "unaligned read");
    let around = d.read(700, 77).await.unwrap();
    assert!(around.iter().all(|&b| b == 0), "unaligned write spilled before its start");
    assert_eq!(d.read(777 + 12_345, 1).await.unwrap()[0], 0, "unaligned write spilled after its end");
}

async fn concurrent_writers_to_disjoint_ranges_do_not_interfere(d: Arc<dyn BlockDevice>) {
    check_size(&d);
    const WRITERS: u64 = 8;
    const STRIPE: u64 = 256 << 10;
    const BLOCK: usize = 16 << 10;
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let d = d.clone();
            tokio::spawn(async move {
                for i in 0..(STRIPE as usize / BLOCK) {
                    let off = w * STRIPE + (i * BLOCK) as u64;
                    d.write(off, pattern(100 + w * 1000 + i as u64, BLOCK), false).await.expect("write");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("writer task");
    }
    for w in 0..WRITERS {
        for i in 0..(STRIPE as usize / BLOCK) {
            let off = w * STRIPE + (i * BLOCK) as u64;
            let got = d.read(off, BLOCK as u32).await.unwrap();
            assert_eq!(got, pattern(100 + w * 1000 + i as u64, BLOCK), "writer {w} block {i} corrupted");
        }
    }
}

async fn flush_and_fua_succeed_and_keep_data(d: Arc<dyn BlockDevice>) {
    check_size(&d);
    d.flush().await.expect("flush of a fresh device");
    d.write(0, pattern(9, 4096), true).await.expect("fua write");
    d.write(4096, pattern(10, 4096), false).await.unwrap();
    d.flush().await.expect("flush");
    d.trim(8192, 4096, true).await.expect("fua trim");
    assert_eq!(d.read(0, 4096).await.unwrap(), pattern(9, 4096));
    assert_eq!(d.read(4096, 4096).await.unwrap(), pattern(10, 4096));
}

async fn a_write_batch_applies_in_order_and_fails_only_its_bad_ranges(d: Arc<dyn BlockDevice>) {
    check_size(&d);
    let (a, b, c) = (pattern(41, 8192), pattern(42, 4096), pattern(43, 4096));
    let past_end = d.size() - 2048;
    let results = d
        .write_batch(vec![
            (0, a.clone()),
            (past_end, pattern(44, 4096)),
            (4096, b.clone()),
            (65536, c.clone()),
        ])
        .await;
    assert_eq!(results.len(), 4, "one result per range");
    assert!(results[0].is_ok() && results[2].is_ok() && results[3].is_ok(), "{results:?}");
    assert!(
        matches!(results[1], Err(BlockError::OutOfRange { .. })),
        "a range past the end fails alone: {:?}",
        results[1]
    );
    let back = d.read(0, 8192).await.expect("read");
    assert_eq!(&back[..4096], &a[..4096], "the first write of the batch");
    assert_eq!(&back[4096..], &b[..], "a later overlapping write of the batch wins");
    assert_eq!(d.read(65536, 4096).await.expect("read"), c, "the last write of the batch");
    assert_eq!(
        d.read(past_end, 2048).await.expect("read"),
        vec![0u8; 2048],
        "the refused range left no bytes"
    );
}
