//! The primary's write path against a scripted control plane: what it
//! commits, marks and acknowledges when a replica is unreachable, how it
//! fences itself, and how volume limits pace it.

use async_trait::async_trait;
use bytes::Bytes;
use metro_node::block::{BlockDevice, BlockError};
use metro_node::repl::link::Link;
use metro_node::store::MemVolume;
use metro_node::volume::control::VolumeControl;
use metro_node::volume::primary::{PrimaryVolume, ReplState};
use metro_quorum::LeasePolicy;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Script {
    lease: Mutex<bool>,
    primary: Mutex<bool>,
    commits: Mutex<Vec<(u64, Vec<String>)>>,
    dirty: Mutex<Vec<(String, u64, u64)>>,
    refuse_commit: Mutex<bool>,
    /// The activity log is full until a mirrored flush completes.
    full: Mutex<bool>,
    /// Activity-log calls in order ("touch", "flush_done").
    events: Mutex<Vec<String>>,
}

#[async_trait]
impl VolumeControl for Script {
    fn lease_valid(&self, _: &str, min_epoch: u64) -> bool {
        assert_eq!(min_epoch, 1, "the primary asks for a lease from the epoch it began at");
        *self.lease.lock().unwrap()
    }
    fn still_primary(&self, _: &str, _: u64) -> bool {
        *self.primary.lock().unwrap()
    }
    fn link(&self, _: &str) -> Option<Arc<Link>> {
        None // every peer is unreachable
    }
    fn touch_extent(&self, _: &str, _: u64, _: u64) -> std::io::Result<()> {
        if *self.full.lock().unwrap() {
            return Err(std::io::Error::other(metro_node::volume::storage::ActivityLogFull { hot: 1 }));
        }
        self.events.lock().unwrap().push("touch".into());
        Ok(())
    }
    fn touch_would_flush(&self, _: &str, _: u64, _: u64) -> bool {
        *self.full.lock().unwrap()
    }
    fn flush_begin(&self, _: &str) -> u64 {
        0
    }
    fn flush_done(&self, _: &str, _: u64) {
        *self.full.lock().unwrap() = false;
        self.events.lock().unwrap().push("flush_done".into());
    }
    fn mark_dirty(&self, _: &str, peer: &str, off: u64, len: u64) -> std::io::Result<()> {
        self.dirty.lock().unwrap().push((peer.into(), off, len));
        Ok(())
    }
    fn mark_all_outstanding(&self, _: &str, _: &str) -> std::io::Result<()> {
        Ok(())
    }
    async fn shrink_in_sync(&self, _: &str, expected: u64, in_sync: Vec<String>) -> Result<u64, String> {
        if *self.refuse_commit.lock().unwrap() {
            return Err("no quorum".into());
        }
        self.commits.lock().unwrap().push((expected, in_sync));
        Ok(expected + 1)
    }
    async fn rejoin(&self, _: &str, e: u64, _: Vec<String>, _: &str) -> Result<u64, String> {
        Ok(e + 1)
    }
}

fn primary(script: Arc<Script>, policy: LeasePolicy) -> PrimaryVolume {
    *script.lease.lock().unwrap() = true;
    *script.primary.lock().unwrap() = true;
    PrimaryVolume::new(
        "v".into(),
        1 << 20,
        Arc::new(MemVolume::new(1 << 20)),
        "a1".into(),
        ReplState { epoch: 1, in_sync_peers: vec!["b1".into()], stale_peers: vec![], catching_up: vec![] },
        script,
        Duration::from_millis(200),
        policy,
    )
}

#[tokio::test]
async fn an_unreachable_replica_is_removed_by_a_committed_change_before_the_write_is_acknowledged() {
    let s = Arc::new(Script::default());
    let p = primary(s.clone(), LeasePolicy::Suspend);
    p.write(8192, Bytes::from(vec![7u8; 4096]), false).await.expect("acknowledged after the commit");
    assert_eq!(s.commits.lock().unwrap().clone(), vec![(1, vec!["a1".to_string()])]);
    assert!(
        s.dirty.lock().unwrap().contains(&("b1".into(), 8192, 4096)),
        "the missed region is dirty for b1"
    );
    let st = p.repl_state().await;
    assert_eq!((st.epoch, st.in_sync_peers.len(), st.stale_peers.clone()), (2, 0, vec!["b1".to_string()]));
    // Later writes go straight to the dirty bitmap, no more commits.
    p.write(0, Bytes::from(vec![1u8; 4096]), true).await.unwrap();
    assert_eq!(s.commits.lock().unwrap().len(), 1);
    assert!(s.dirty.lock().unwrap().contains(&("b1".into(), 0, 4096)));
    assert_eq!(&p.read(0, 4096).await.unwrap()[..], &[1u8; 4096][..]);
}

#[tokio::test]
async fn without_a_commit_the_write_is_never_acknowledged_and_error_policy_fails_it() {
    let s = Arc::new(Script::default());
    *s.refuse_commit.lock().unwrap() = true;
    let p = Arc::new(primary(s.clone(), LeasePolicy::Error));
    let p2 = p.clone();
    let w = tokio::spawn(async move { p2.write(0, Bytes::from(vec![9u8; 4096]), false).await });
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!w.is_finished(), "held while the removal cannot commit");
    *s.lease.lock().unwrap() = false; // the lease runs out
    let r = tokio::time::timeout(Duration::from_secs(5), w).await.expect("resolves").unwrap();
    assert!(matches!(r, Err(BlockError::Io(_))), "policy error fails the held write: {r:?}");
    assert!(s.commits.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_deposed_primary_answers_eshutdown() {
    let s = Arc::new(Script::default());
    let p = primary(s, LeasePolicy::Suspend);
    p.depose("test");
    let e = p.read(0, 4096).await.unwrap_err();
    assert_eq!(e.nbd_errno(), 108, "ESHUTDOWN");
}

#[tokio::test(start_paused = true)]
async fn the_volume_iops_limit_paces_requests() {
    let s = Arc::new(Script::default());
    let p = primary(s, LeasePolicy::Suspend).with_limits(50, 0);
    let start = tokio::time::Instant::now();
    for i in 0..60u64 {
        p.read(i * 4096, 4096).await.unwrap();
    }
    let took = start.elapsed();
    // 50 IOPS with a 100 ms burst: 60 reads need at least ~1.1 s of virtual time.
    assert!(took >= Duration::from_millis(1000), "60 reads at 50 IOPS took {took:?}");
}

/// A device that logs local operations and holds writes whose first byte
/// is 1 for 300 ms (virtual time), to make the order of local I/O visible.
struct Recording {
    inner: MemVolume,
    log: Mutex<Vec<String>>,
}

#[async_trait]
impl BlockDevice for Recording {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read(&self, offset: u64, len: u32) -> metro_node::block::BlockResult<Bytes> {
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> metro_node::block::BlockResult<()> {
        let tag = data[0];
        self.log.lock().unwrap().push(format!("begin {tag}"));
        if tag == 1 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let r = self.inner.write(offset, data, fua).await;
        self.log.lock().unwrap().push(format!("end {tag}"));
        r
    }
    async fn flush(&self) -> metro_node::block::BlockResult<()> {
        self.log.lock().unwrap().push("flush".into());
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> metro_node::block::BlockResult<()> {
        self.inner.trim(offset, len, fua).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_punch: bool,
    ) -> metro_node::block::BlockResult<()> {
        self.inner.write_zeroes(offset, len, fua, may_punch).await
    }
}

fn unreplicated(dev: Arc<Recording>) -> Arc<PrimaryVolume> {
    let s = Arc::new(Script::default());
    *s.lease.lock().unwrap() = true;
    *s.primary.lock().unwrap() = true;
    Arc::new(PrimaryVolume::new(
        "v".into(),
        1 << 20,
        dev,
        "a1".into(),
        ReplState { epoch: 1, in_sync_peers: vec![], stale_peers: vec![], catching_up: vec![] },
        s,
        Duration::from_millis(200),
        LeasePolicy::Suspend,
    ))
}

/// Wait (virtual time) until the device log holds `entry`.
async fn logged(dev: &Recording, entry: &str) {
    for _ in 0..1000 {
        if dev.log.lock().unwrap().iter().any(|e| e == entry) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("`{entry}` never logged: {:?}", dev.log.lock().unwrap());
}

#[tokio::test(start_paused = true)]
async fn overlapping_writes_land_locally_in_order_while_disjoint_ones_do_not_wait() {
    let dev = Arc::new(Recording { inner: MemVolume::new(1 << 20), log: Mutex::default() });
    let p = unreplicated(dev.clone());
    let (p1, p2, p3) = (p.clone(), p.clone(), p.clone());
    let w1 = tokio::spawn(async move { p1.write(0, Bytes::from(vec![1u8; 8192]), false).await });
    logged(&dev, "begin 1").await;
    // Overlaps the second half of w1: must wait for it locally.
    let w2 = tokio::spawn(async move { p2.write(4096, Bytes::from(vec![2u8; 4096]), false).await });
    // Disjoint from both: runs at once.
    let w3 = tokio::spawn(async move { p3.write(65536, Bytes::from(vec![3u8; 4096]), false).await });
    w3.await.unwrap().unwrap();
    w2.await.unwrap().unwrap();
    w1.await.unwrap().unwrap();
    let log = dev.log.lock().unwrap().clone();
    let at = |e: &str| log.iter().position(|x| x == e).unwrap_or_else(|| panic!("{e} missing: {log:?}"));
    assert!(at("end 1") < at("begin 2"), "the later overlapping write waited: {log:?}");
    assert!(at("end 3") < at("end 1"), "the disjoint write did not wait: {log:?}");
    assert_eq!(&p.read(0, 4096).await.unwrap()[..], &[1u8; 4096][..]);
    assert_eq!(&p.read(4096, 4096).await.unwrap()[..], &[2u8; 4096][..], "the later write wins");
}

#[tokio::test(start_paused = true)]
async fn a_flush_covers_every_write_ordered_before_it() {
    let dev = Arc::new(Recording { inner: MemVolume::new(1 << 20), log: Mutex::default() });
    let p = unreplicated(dev.clone());
    let p1 = p.clone();
    let w1 = tokio::spawn(async move { p1.write(0, Bytes::from(vec![1u8; 4096]), false).await });
    logged(&dev, "begin 1").await;
    p.flush().await.unwrap();
    let log = dev.log.lock().unwrap().clone();
    let at = |e: &str| log.iter().position(|x| x == e).unwrap_or_else(|| panic!("{e} missing: {log:?}"));
    assert!(at("end 1") < at("flush"), "the flush waited for the earlier write: {log:?}");
    w1.await.unwrap().unwrap();
}

/// A deposed primary counts as drained (and may give its lease up) only once
/// every client op that entered before the depose has returned.
#[tokio::test(start_paused = true)]
async fn a_deposed_primary_is_drained_only_after_its_in_flight_writes_return() {
    let dev = Arc::new(Recording { inner: MemVolume::new(1 << 20), log: Mutex::default() });
    let p = unreplicated(dev.clone());
    assert!(p.drained(Duration::ZERO).await, "an idle primary is drained");
    let p2 = p.clone();
    let slow = tokio::spawn(async move { p2.write(0, Bytes::from(vec![1u8; 4096]), false).await });
    logged(&dev, "begin 1").await;
    p.depose("moved");
    assert!(!p.drained(Duration::from_millis(100)).await, "a write is still in flight");
    let late = p.write(8192, Bytes::from(vec![2u8; 4096]), false).await;
    assert_eq!(late.unwrap_err().nbd_errno(), 108, "a write after the depose is refused");
    assert!(p.drained(Duration::from_secs(1)).await, "drained once the held write returned");
    assert!(slow.is_finished(), "the held write finished before the drain was reported");
    slow.await.unwrap().expect("the in-flight write completes");
}

/// Issue 12, class 3: activity-log extents cool only after a flush that is
/// durable on every in-sync replica. A full log makes the primary issue a
/// mirrored FLUSH (whose completion is `flush_done`) before it adds an
/// extent, never a local-only flush.
#[tokio::test]
async fn class3_a_full_activity_log_makes_a_mirrored_flush_before_an_extent_is_added() {
    let s = Arc::new(Script::default());
    *s.lease.lock().unwrap() = true;
    *s.primary.lock().unwrap() = true;
    *s.full.lock().unwrap() = true;
    let p = PrimaryVolume::new(
        "v".into(),
        1 << 20,
        Arc::new(MemVolume::new(1 << 20)),
        "a1".into(),
        ReplState { epoch: 1, in_sync_peers: vec![], stale_peers: vec![], catching_up: vec![] },
        s.clone(),
        Duration::from_millis(200),
        LeasePolicy::Error,
    );
    p.write(0, Bytes::from(vec![1u8; 4096]), false).await.unwrap();
    assert_eq!(*s.events.lock().unwrap(), vec!["flush_done".to_string(), "touch".to_string()]);
}

/// Issue 12, class 7: a read that waited in the rate limiter past the end of
/// its lease returns no data (a newer primary may have overwritten it).
#[tokio::test(start_paused = true)]
async fn class7_a_read_that_outlived_its_lease_in_the_rate_limiter_returns_no_data() {
    let s = Arc::new(Script::default());
    let p = Arc::new(primary(s.clone(), LeasePolicy::Error).with_limits(1, 0));
    p.read(0, 4096).await.unwrap();
    let started = tokio::time::Instant::now();
    let p2 = p.clone();
    let read = tokio::spawn(async move { p2.read(0, 4096).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!read.is_finished(), "the second read must be waiting in the limiter");
    *s.lease.lock().unwrap() = false;
    let r = read.await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(500), "it waited for its token");
    assert!(r.is_err(), "a read returned data after its lease ended: {r:?}");
}
