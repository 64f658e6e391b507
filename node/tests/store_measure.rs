//! Measurements of the local store on this machine (not run by default):
//! `cargo test -p metro-node --test store_measure -- --ignored --nocapture`

use bytes::Bytes;
use metro_node::block::BlockDevice;
use metro_node::store::testing::pattern;
use metro_node::store::{DirtyBitmap, LocalVolume, SharedDirtyBitmap};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn measure_local_volume_and_bitmap_costs() {
    let start = Instant::now();
    let root = tempfile::tempdir().unwrap();
    let v = LocalVolume::create(&root.path().join("v"), "m", 1 << 30).unwrap();

    // 4 KiB random writes, queue depth 16, no FUA.
    let n_per = 2000u64;
    let t = Instant::now();
    let tasks: Vec<_> = (0..16u64)
        .map(|w| {
            let v = v.clone();
            tokio::spawn(async move {
                let mut x = w * 7919 + 1;
                for _ in 0..n_per {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let off = (x >> 20) % ((1 << 30) / 4096) * 4096;
                    v.write(off, Bytes::from_static(&[7u8; 4096]), false).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let d = t.elapsed();
    eprintln!("4 KiB random write qd16: {:.0} IOPS", rate(16 * n_per, d));

    // 4 KiB FUA writes, queue depth 1.
    let n = 200u64;
    let t = Instant::now();
    for i in 0..n {
        v.write(i * 4096, Bytes::from_static(&[9u8; 4096]), true).await.unwrap();
    }
    let d = t.elapsed();
    eprintln!("4 KiB FUA write qd1: {:.0} us/op", d.as_micros() as f64 / n as f64);

    // 1 MiB sequential writes then reads.
    let data = pattern(1, MIB as usize);
    let t = Instant::now();
    for i in 0..256u64 {
        v.write(512 * MIB + i * MIB, data.clone(), false).await.unwrap();
    }
    v.flush().await.unwrap();
    eprintln!("1 MiB sequential write + flush: {:.0} MiB/s", rate(256, t.elapsed()));
    let t = Instant::now();
    for i in 0..256u64 {
        let r = v.read(512 * MIB + i * MIB, MIB as u32).await.unwrap();
        assert_eq!(r, data);
    }
    eprintln!("1 MiB sequential read: {:.0} MiB/s", rate(256, t.elapsed()));

    // Dirty bitmap first-touch persist (1 TiB volume => 2 MiB file).
    for size in [1u64 << 30, 1 << 40] {
        let p = root.path().join(format!("bm-{size}"));
        let mut b = DirtyBitmap::create(&p, size, 64 << 10).unwrap();
        let n = 50u64;
        let t = Instant::now();
        for i in 0..n {
            assert!(b.mark_durable(i * (64 << 10), 1).unwrap());
        }
        eprintln!(
            "bitmap first-touch persist, {} GiB volume: {:.0} us/op",
            size >> 30,
            t.elapsed().as_micros() as f64 / n as f64
        );
    }

    // Group commit: 256 concurrent first touches.
    let p = root.path().join("bm-shared");
    let s = Arc::new(SharedDirtyBitmap::new(DirtyBitmap::create(&p, 1 << 30, 64 << 10).unwrap()));
    let t = Instant::now();
    let tasks: Vec<_> = (0..256u64)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.mark_durable(i * (64 << 10), 1).await.unwrap() })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    eprintln!(
        "shared bitmap: 256 concurrent first touches in {:?} with {} persists",
        t.elapsed(),
        s.persist_count()
    );
    assert_eq!(s.with(|b| b.dirty_region_count()), 256);
    eprintln!("total {:?}", start.elapsed());
}
