//! Every BlockDevice backend of `store` passes the same conformance suite.

use metro_node::block::BlockDevice;
use metro_node::store::testing::{conformance_suite, MIN_CONFORMANCE_SIZE};
use metro_node::store::{FaultyVolume, LocalVolume, MemVolume, VolatileCache};
use std::sync::{Arc, Mutex};

const SIZE: u64 = 2 * MIN_CONFORMANCE_SIZE;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_volume_passes_the_block_device_conformance_suite() {
    let root = tempfile::tempdir().unwrap();
    let n = Mutex::new(0);
    conformance_suite(|| {
        let mut i = n.lock().unwrap();
        *i += 1;
        let v = LocalVolume::create(&root.path().join(format!("v{i}")), "conf", SIZE).unwrap();
        Arc::new(v) as Arc<dyn BlockDevice>
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mem_volume_passes_the_block_device_conformance_suite() {
    conformance_suite(|| Arc::new(MemVolume::new(SIZE)) as Arc<dyn BlockDevice>).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_volume_without_faults_passes_the_block_device_conformance_suite() {
    conformance_suite(|| Arc::new(FaultyVolume::new(Arc::new(MemVolume::new(SIZE)))) as Arc<dyn BlockDevice>)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_cache_over_a_local_volume_passes_the_block_device_conformance_suite() {
    let root = tempfile::tempdir().unwrap();
    let n = Mutex::new(0);
    conformance_suite(|| {
        let mut i = n.lock().unwrap();
        *i += 1;
        let v = LocalVolume::create(&root.path().join(format!("v{i}")), "conf", SIZE).unwrap();
        Arc::new(VolatileCache::new(Arc::new(v), 64 << 20)) as Arc<dyn BlockDevice>
    })
    .await;
}

/// A bound of two blocks: nearly every write also writes back older ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_cache_with_a_tiny_bound_passes_the_block_device_conformance_suite() {
    conformance_suite(|| {
        Arc::new(VolatileCache::new(Arc::new(MemVolume::new(SIZE)), 8192)) as Arc<dyn BlockDevice>
    })
    .await;
}
