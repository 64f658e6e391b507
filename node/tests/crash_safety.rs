//! Crash safety of the real write path (issue 12), two nodes in one process:
//! two real `VolumeManager`s (a1, b1) over `FileStorage` (activity log,
//! bitmaps, superblocks on disk), joined by real replication links and
//! servers over in-memory pipes (the link's `Transport` seam). The committed
//! state is a `ClusterState` that proposals change through the real `apply`;
//! each node holds a lease on the volumes it is primary of.
//!
//! A "restart" drops a node's manager, its links and its server side, and
//! starts a new one on the same directory: a new replica session, the
//! activity log recovered from disk.
//!
//! Classes covered here: 1 (a primary restarting after a crash reconciles
//! its activity log before serving), 2 (a replica that restarts under a new
//! session leaves `in_sync` and is resynced), 4 (a planned move reconciles
//! the old primary's unacknowledged extents over an existing link), 5 (a
//! failover's new primary that lost power before its first flush pulls the
//! old primary's writes back).

use async_trait::async_trait;
use bytes::Bytes;
use metro_api::config::Role;
use metro_node::block::{BlockDevice, ExportRegistry};
use metro_node::repl::link::{BoxStream, Dialer, LinkError, Transport};
use metro_node::repl::server::ReplicaSink;
use metro_node::store::{NodeStore, DEFAULT_REGION_BYTES};
use metro_node::volume::file_storage::FileStorage;
use metro_node::volume::manager::{ClusterView, VolumeManager};
use metro_node::volume::storage::VolumeStorage;
use metro_quorum::state::raft_id_of;
use metro_quorum::{ClusterState, Command, CommandResult, LeasePolicy, NodeRecord, VolumeId, VolumeRecord};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

const SIZE: u64 = 16 << 20;
/// Small activity-log extents keep the copies small.
const EXTENT: u64 = 1 << 20;
const BLOCK: usize = 4096;

/// The committed state both nodes follow.
struct Cluster {
    tx: watch::Sender<Arc<ClusterState>>,
    /// Leases: nodes whose lease on their primaries is valid.
    leased: Mutex<Vec<String>>,
}

struct View {
    me: String,
    cluster: Arc<Cluster>,
}

#[async_trait]
impl ClusterView for View {
    fn state(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.cluster.tx.subscribe()
    }
    fn lease_valid(&self, volume: &str, min_epoch: u64) -> bool {
        let s = self.cluster.tx.borrow().clone();
        self.cluster.leased.lock().unwrap().contains(&self.me)
            && s.volumes
                .get(volume)
                .is_some_and(|v| v.primary.as_deref() == Some(self.me.as_str()) && v.epoch >= min_epoch)
    }
    async fn propose(&self, cmd: Command) -> Result<CommandResult, String> {
        let mut s = (*self.cluster.tx.borrow().clone()).clone();
        let r = s.apply(&cmd);
        if matches!(r, CommandResult::Ok { .. }) {
            self.cluster.tx.send_replace(Arc::new(s));
        }
        Ok(r)
    }
}

/// Live managers by replication address, and their server-side tasks.
#[derive(Default)]
struct Net {
    nodes: Mutex<HashMap<String, Arc<VolumeManager>>>,
    servers: Mutex<HashMap<String, Vec<tokio::task::JoinHandle<()>>>>,
}

struct Pipe(Arc<Net>);

#[async_trait]
impl Transport for Pipe {
    async fn dial(&self, addr: &str, peer: &str) -> Result<BoxStream, LinkError> {
        let m = self.0.nodes.lock().unwrap().get(addr).cloned();
        let Some(m) = m else { return Err(LinkError::Down(format!("{peer} (not running)"))) };
        // client <-> relay <-> server: aborting the relay (the "process"
        // dying) closes both ends, as a dead peer's sockets would.
        let (client, mut near) = tokio::io::duplex(4 << 20);
        let (mut far, server) = tokio::io::duplex(4 << 20);
        let sink: Arc<dyn ReplicaSink> = m;
        tokio::spawn(async move {
            let _ = metro_node::repl::server::serve_stream(server, sink).await;
        });
        let relay = tokio::spawn(async move {
            let _ = tokio::io::copy_bidirectional(&mut near, &mut far).await;
        });
        self.0.servers.lock().unwrap().entry(addr.to_string()).or_default().push(relay);
        Ok(Box::new(client))
    }
}

struct Node {
    id: String,
    dir: PathBuf,
    manager: Arc<VolumeManager>,
    storage: Arc<dyn VolumeStorage>,
    stop: watch::Sender<bool>,
}

struct Pair {
    _tmp: tempfile::TempDir,
    cluster: Arc<Cluster>,
    net: Arc<Net>,
    nodes: HashMap<String, Node>,
}

fn record(id: &str) -> NodeRecord {
    NodeRecord {
        id: id.into(),
        raft_id: raft_id_of(id),
        site: if id.starts_with('a') { "dc-a".into() } else { "dc-b".into() },
        role: Role::Storage,
        api: format!("{id}:7443"),
        nbd: None,
        replication: Some(id.to_string()),
        capacity_bytes: 1 << 30,
        timings: None,
    }
}

impl Pair {
    /// Volume `v` on a1 (primary) and b1, both in sync, a1 holding a lease.
    async fn new() -> Pair {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = ClusterState::default();
        for n in ["a1", "b1"] {
            s.nodes.insert(n.into(), record(n));
        }
        s.volumes.insert(
            "v".into(),
            VolumeRecord {
                name: "v".into(),
                id: VolumeId { serial: 1, nonce: 0xfeed },
                size_bytes: SIZE,
                iops_limit: 0,
                bandwidth_limit: 0,
                lease_policy: LeasePolicy::Suspend,
                replicas: vec!["a1".into(), "b1".into()],
                in_sync: vec!["a1".into(), "b1".into()],
                primary: Some("a1".into()),
                epoch: 1,
                primary_since: 1,
                previous_primary: None,
            },
        );
        s.volume_serial = 1;
        let (tx, _) = watch::channel(Arc::new(s));
        let cluster = Arc::new(Cluster { tx, leased: Mutex::new(vec!["a1".into(), "b1".into()]) });
        let mut p = Pair { cluster, net: Arc::default(), nodes: HashMap::new(), _tmp: tmp };
        for id in ["a1", "b1"] {
            let dir = p._tmp.path().join(id);
            p.start(id, &dir);
        }
        p
    }

    fn start(&mut self, id: &str, dir: &Path) {
        self.start_with(id, dir, false);
    }

    fn start_with(&mut self, id: &str, dir: &Path, cache_lost: bool) {
        metro_api::tls::install_crypto_provider();
        std::fs::create_dir_all(dir).unwrap();
        let store = NodeStore::open(dir, Some(1 << 30)).unwrap();
        let fs = FileStorage::with_store(store, DEFAULT_REGION_BYTES, EXTENT);
        if cache_lost {
            fs.assume_cache_lost();
        }
        let storage: Arc<dyn VolumeStorage> = Arc::new(fs);
        let dialer = Dialer {
            my_node: id.into(),
            transport: Arc::new(Pipe(self.net.clone())),
            on_hot: None,
            on_session: None,
        };
        let view = Arc::new(View { me: id.into(), cluster: self.cluster.clone() });
        let m = VolumeManager::new(id.into(), view, storage.clone(), dialer, Duration::from_millis(500));
        let (stop, stop_rx) = watch::channel(false);
        m.spawn(stop_rx);
        self.net.nodes.lock().unwrap().insert(id.into(), m.clone());
        self.nodes
            .insert(id.into(), Node { id: id.into(), dir: dir.to_path_buf(), manager: m, storage, stop });
    }

    /// The process dies (its page cache survives: the data files keep every
    /// write) and starts again at once on the same directory.
    async fn restart(&mut self, id: &str) {
        self.restart_with(id, false).await
    }

    /// `cache_lost`: the machine lost power (unflushed writes are gone).
    async fn restart_with(&mut self, id: &str, cache_lost: bool) {
        let dir = self.stop(id).await;
        self.start_with(id, &dir, cache_lost);
    }

    /// The node's process dies and stays down.
    async fn stop(&mut self, id: &str) -> PathBuf {
        let node = self.nodes.remove(id).unwrap();
        let _ = node.stop.send(true);
        self.net.nodes.lock().unwrap().remove(&node.id);
        for t in self.net.servers.lock().unwrap().remove(&node.id).unwrap_or_default() {
            t.abort();
        }
        let dir = node.dir.clone();
        drop(node);
        tokio::time::sleep(Duration::from_millis(50)).await;
        dir
    }

    fn state(&self) -> Arc<ClusterState> {
        self.cluster.tx.borrow().clone()
    }

    async fn propose(&self, cmd: Command) -> CommandResult {
        View { me: "test".into(), cluster: self.cluster.clone() }.propose(cmd).await.unwrap()
    }

    /// The primary's device once it serves (reconciled, under its lease).
    async fn export(&self, id: &str) -> Arc<dyn BlockDevice> {
        let m = &self.nodes[id].manager;
        for _ in 0..200 {
            if let Ok(d) = m.open("v") {
                // A read returns only once the volume is reconciled and leased.
                if tokio::time::timeout(Duration::from_millis(100), d.read(0, 512)).await.is_ok() {
                    return d;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{id} never served v");
    }

    /// The bytes of `v` as `id`'s local replica holds them.
    async fn replica_bytes(&self, id: &str) -> Vec<u8> {
        let n = &self.nodes[id];
        let (dev, _) = n.storage.open_or_create("v", SIZE, self.state().volumes["v"].id).unwrap();
        dev.read(0, SIZE as u32).await.unwrap().to_vec()
    }

    /// Wait until `v` has every replica in sync.
    async fn wait_in_sync(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if self.state().volumes["v"].in_sync.len() == 2 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}

fn block(byte: u8) -> Bytes {
    Bytes::from(vec![byte; BLOCK])
}

/// Blocks (4 KiB) where the two replicas differ.
fn differing_blocks(a: &[u8], b: &[u8]) -> Vec<usize> {
    a.chunks(BLOCK).zip(b.chunks(BLOCK)).enumerate().filter(|(_, (x, y))| x != y).map(|(i, _)| i).collect()
}

/// Where [`write_acked_unflushed`] writes.
const UNFLUSHED_AT: u64 = 2 << 20;

/// Through a1 (primary): a flushed block at 0, then `0xa5` at
/// [`UNFLUSHED_AT`], acknowledged by both and never flushed (a1's activity
/// log has its extent hot).
async fn write_acked_unflushed(p: &Pair) {
    let dev = p.export("a1").await;
    dev.write(0, block(0x0f), false).await.unwrap();
    dev.flush().await.unwrap();
    dev.write(UNFLUSHED_AT, block(0xa5), false).await.unwrap();
}

/// `id`'s machine loses the unflushed write of [`write_acked_unflushed`]
/// (what a power cut does to its page cache); restart it with
/// `restart_with(id, true)` afterwards.
async fn lose_unflushed_write(p: &Pair, id: &str) {
    let (local, _) = p.nodes[id].storage.open_or_create("v", SIZE, p.state().volumes["v"].id).unwrap();
    local.write(UNFLUSHED_AT, Bytes::from(vec![0u8; BLOCK]), false).await.unwrap();
}

async fn assert_identical(p: &Pair, what: &str) {
    let (a, b) = (p.replica_bytes("a1").await, p.replica_bytes("b1").await);
    let diff = differing_blocks(&a, &b);
    assert!(
        diff.is_empty(),
        "{what}: in-sync replicas differ in {} blocks, first {:?}",
        diff.len(),
        &diff[..diff.len().min(8)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class1_a_primary_restarting_after_a_crash_reconciles_its_hot_extents_before_serving() {
    let mut p = Pair::new().await;
    let dev = p.export("a1").await;
    dev.write(0, block(0xaa), false).await.unwrap();
    dev.write(8 << 20, block(0xab), false).await.unwrap();
    drop(dev);
    // The crash comes in the middle of a write: a1 wrote it locally (its
    // activity log has the extent hot), b1 never got it.
    let a1 = &p.nodes["a1"];
    a1.storage.touch_extent("v", 8 << 20, BLOCK as u64).unwrap();
    let (local, _) = a1.storage.open_or_create("v", SIZE, p.state().volumes["v"].id).unwrap();
    local.write(8 << 20, block(0xcc), false).await.unwrap();
    drop(local);
    p.restart("a1").await;
    // a1 comes back as primary at the same epoch: before it serves, b1 must
    // hold what a1 holds.
    let epoch = p.state().volumes["v"].epoch;
    let dev = p.export("a1").await;
    assert_eq!(p.state().volumes["v"].epoch, epoch, "no reconfiguration was needed");
    assert_eq!(dev.read(8 << 20, BLOCK as u32).await.unwrap(), block(0xcc));
    assert_identical(&p, "after a1's restart as primary").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class2_a_replica_under_a_new_session_leaves_in_sync_and_comes_back_identical() {
    let mut p = Pair::new().await;
    let dev = p.export("a1").await;
    for i in 0..16u64 {
        dev.write(i * (1 << 20), block(i as u8 + 1), false).await.unwrap();
    }
    let epoch = p.state().volumes["v"].epoch;
    // b1 restarts: a new session. It may have lost every write that no
    // flush covered (a power cut empties the page cache).
    p.restart("b1").await;
    let mut left = false;
    for _ in 0..250 {
        let v = p.state().volumes["v"].clone();
        if v.epoch > epoch {
            left = !v.in_sync.contains(&"b1".to_string()) || v.epoch >= epoch + 2;
            if left {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(left, "b1 came back under a new session and stayed in in_sync: {:?}", p.state().volumes["v"]);
    // It resyncs the extents no flush covered and rejoins.
    assert!(p.wait_in_sync(Duration::from_secs(15)).await, "b1 never rejoined: {:?}", p.state().volumes["v"]);
    dev.write(3 << 20, block(0x77), false).await.unwrap();
    assert_identical(&p, "after b1 rejoined").await;
}

/// A replica restarted after a power cut is resynced and rejoins; then it
/// stays in sync. Failed before the fix (real processes,
/// `power_cut::a_replica_power_cut_in_the_middle_of_its_resync_*`): the
/// primary committed the rejoin before telling the replica that its copy was
/// reconciled, so the replica, still "lost its page cache" for a moment,
/// saw itself in `in_sync` and left again. A check that read the volume in
/// between saw every replica in sync, and a failover then found none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class2_a_replica_resynced_after_a_power_cut_stays_in_sync_once_it_rejoins() {
    let mut p = Pair::new().await;
    let dev = p.export("a1").await;
    for i in 0..16u64 {
        dev.write(i * (1 << 20), block(i as u8 + 1), false).await.unwrap();
    }
    p.restart_with("b1", true).await;
    // b1 leaves in_sync once (epoch 2: its new session, its lost cache; by
    // its own change or its primary's, whichever commits first), is
    // resynced and rejoins (epoch 3), and that is all.
    assert!(p.wait_in_sync(Duration::from_secs(15)).await, "b1 never rejoined: {:?}", p.state().volumes["v"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let v = p.state().volumes["v"].clone();
    assert!(
        v.epoch == 3 && v.in_sync.len() == 2,
        "b1 should have left in_sync once and rejoined once (epoch 3), then stayed: {v:?}"
    );
    assert!(!p.nodes["b1"].storage.cache_lost("v"), "b1 rejoined but still counts its copy as unreconciled");
    dev.write(3 << 20, block(0x77), false).await.unwrap();
    assert_identical(&p, "after b1 rejoined").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class4_a_planned_move_over_an_existing_link_reconciles_the_old_primarys_extents() {
    let p = Pair::new().await;
    let dev = p.export("a1").await;
    dev.write(0, block(0x11), false).await.unwrap();
    // b1 already has a link to a1? Make it: b1 is the one dialling after the
    // move; a1's link to b1 is up (it mirrors writes).
    // A write in flight when a1 is deposed: local on a1, never on b1.
    let a1 = &p.nodes["a1"];
    a1.storage.touch_extent("v", 5 << 20, BLOCK as u64).unwrap();
    let (local, _) = a1.storage.open_or_create("v", SIZE, p.state().volumes["v"].id).unwrap();
    local.write(5 << 20, block(0x55), false).await.unwrap();
    drop(local);
    drop(dev);
    let epoch = p.state().volumes["v"].epoch;
    let r = p
        .propose(Command::ChangeVolume {
            name: "v".into(),
            expected_epoch: epoch,
            primary: Some("b1".into()),
            in_sync: vec!["a1".into(), "b1".into()],
            rejoin: None,
        })
        .await;
    assert!(matches!(r, CommandResult::Ok { .. }), "{r:?}");
    let dev = p.export("b1").await;
    assert_eq!(dev.read(5 << 20, BLOCK as u32).await.unwrap(), Bytes::from(vec![0u8; BLOCK]));
    assert!(p.state().volumes["v"].in_sync.len() == 2 || p.wait_in_sync(Duration::from_secs(15)).await);
    assert_identical(&p, "after the move to b1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class1_a_primary_restarting_after_a_power_cut_hands_over_and_keeps_acknowledged_writes() {
    let mut p = Pair::new().await;
    write_acked_unflushed(&p).await;
    // a1 loses power: its cached copy of the write is gone.
    lose_unflushed_write(&p, "a1").await;
    p.restart_with("a1", true).await;
    // b1 holds the acknowledged write: it must be the copy that serves it.
    let mut served_by = None;
    for _ in 0..300 {
        if let Some(pr) = p.state().volumes["v"].primary.clone() {
            if pr == "b1" {
                served_by = Some(pr);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        served_by.as_deref(),
        Some("b1"),
        "a1 kept serving its power-cut copy: {:?}",
        p.state().volumes["v"]
    );
    let dev = p.export("b1").await;
    assert_eq!(
        dev.read(UNFLUSHED_AT, BLOCK as u32).await.unwrap(),
        block(0xa5),
        "the acknowledged write survived"
    );
    assert!(p.wait_in_sync(Duration::from_secs(20)).await, "a1 never rejoined: {:?}", p.state().volumes["v"]);
    assert_identical(&p, "after a1's power cut as primary").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class9_after_a_forced_activation_the_returning_replica_ends_identical_to_the_survivor() {
    let mut p = Pair::new().await;
    let dev = p.export("a1").await;
    dev.write(0, block(0x01), false).await.unwrap();
    dev.flush().await.unwrap();
    // b1 goes away; a1 takes it out of in_sync and goes on writing: those
    // writes are only on a1 (its bitmap for b1 marks them), and a flush lets
    // the activity log cool them.
    let b1_dir = p.stop("b1").await;
    dev.write(6 << 20, block(0x66), false).await.unwrap();
    dev.flush().await.unwrap();
    assert_eq!(p.state().volumes["v"].in_sync, vec!["a1".to_string()]);
    drop(dev);
    // After a long outage the activity log has long let those extents go
    // (flushed, then evicted); only the bitmap for b1 remembers them.
    p.nodes["a1"].storage.clear_hot("v").unwrap();
    assert!(p.nodes["a1"].storage.hot_extents("v").is_empty());
    // dc-a is lost; the operator forces b1 in (`site activate --force`),
    // giving up a1's later writes.
    let a1_dir = p.stop("a1").await;
    let epoch = p.state().volumes["v"].epoch;
    let r = p
        .propose(Command::ForceInSync { name: "v".into(), expected_epoch: epoch, in_sync: vec!["b1".into()] })
        .await;
    assert!(matches!(r, CommandResult::Ok { .. }), "{r:?}");
    let r = p
        .propose(Command::ChangeVolume {
            name: "v".into(),
            expected_epoch: epoch + 1,
            primary: Some("b1".into()),
            in_sync: vec!["b1".into()],
            rejoin: None,
        })
        .await;
    assert!(matches!(r, CommandResult::Ok { .. }), "{r:?}");
    p.start("b1", &b1_dir);
    let dev = p.export("b1").await;
    assert_eq!(dev.read(6 << 20, BLOCK as u32).await.unwrap(), Bytes::from(vec![0u8; BLOCK]));
    // a1 returns: it must end identical to the survivor, not keep its write.
    p.start("a1", &a1_dir);
    assert!(p.wait_in_sync(Duration::from_secs(20)).await, "a1 never rejoined: {:?}", p.state().volumes["v"]);
    assert_identical(&p, "after a1 returned to the forced survivor").await;
}

/// Class 5 (a failover's new primary): the new primary is the only in-sync
/// copy, and it loses power before its primaryship ever flushed, so the
/// writes the old primary acknowledged from its cache are gone from it. The
/// old primary (now a stale replica) still holds them: the new primary pulls
/// the old one's hot extents back before serving, and resyncing the old one
/// from this copy does not erase them (seed 639325170 of the data-path
/// simulation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class5_a_new_primary_that_lost_power_before_its_first_flush_pulls_the_old_primarys_writes() {
    let mut p = Pair::new().await;
    write_acked_unflushed(&p).await;
    // a1 is cut off; the leader fails the volume over to b1, which has no
    // lease yet (it cannot reach the leader either), so it never flushes.
    let a1_dir = p.stop("a1").await;
    p.cluster.leased.lock().unwrap().clear();
    let r = p
        .propose(Command::ChangeVolume {
            name: "v".into(),
            expected_epoch: 1,
            primary: Some("b1".into()),
            in_sync: vec!["b1".into()],
            rejoin: None,
        })
        .await;
    assert!(matches!(r, CommandResult::Ok { .. }), "{r:?}");
    assert_eq!(p.state().volumes["v"].previous_primary.as_deref(), Some("a1"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // b1 loses power: its cached copy of the write is gone.
    lose_unflushed_write(&p, "b1").await;
    p.restart_with("b1", true).await;
    // a1 comes back (a stale replica now), and b1 gets its lease.
    p.start("a1", &a1_dir);
    *p.cluster.leased.lock().unwrap() = vec!["a1".into(), "b1".into()];
    let dev = p.export("b1").await;
    let got = dev.read(UNFLUSHED_AT, BLOCK as u32).await.unwrap();
    assert!(
        got == block(0xa5),
        "the write a1 acknowledged is gone from the new primary (first byte {:#x})",
        got[0]
    );
    drop(dev);
    assert!(p.wait_in_sync(Duration::from_secs(20)).await, "a1 never rejoined: {:?}", p.state().volumes["v"]);
    assert_identical(&p, "after b1's power cut before its first flush").await;
    assert!(
        p.replica_bytes("a1").await[UNFLUSHED_AT as usize..UNFLUSHED_AT as usize + BLOCK] == block(0xa5)[..],
        "a1 lost it in the resync"
    );
}

/// A node whose state jumps over a stretch in which another node was
/// primary (failover away and back, seen in one step) is primary again in a
/// new primaryship: its old `PrimaryVolume` must not adopt the new epoch
/// (seed 134 of the data-path simulation) but stop serving, and a fresh one
/// reconciles and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_missed_another_primaryship_starts_a_new_one() {
    let p = Pair::new().await;
    let old = p.export("a1").await;
    old.write(0, block(0x11), false).await.unwrap();
    // Away to b1 and back to a1, committed elsewhere and seen at once.
    let mut s = (*p.state()).clone();
    for (e, primary) in [(1, "b1"), (2, "a1")] {
        let r = s.apply(&Command::ChangeVolume {
            name: "v".into(),
            expected_epoch: e,
            primary: Some(primary.into()),
            in_sync: vec!["a1".into(), "b1".into()],
            rejoin: None,
        });
        assert!(matches!(r, CommandResult::Ok { .. }), "{r:?}");
    }
    assert_eq!((s.volumes["v"].epoch, s.volumes["v"].primary_since), (3, 3));
    p.cluster.tx.send_replace(Arc::new(s));
    let mut refused = false;
    for _ in 0..100 {
        if tokio::time::timeout(Duration::from_millis(200), old.write(4096, block(0x22), false))
            .await
            .is_ok_and(|r| r.is_err())
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the old primaryship's export kept serving after a newer one began");
    let new = p.export("a1").await;
    new.write(8192, block(0x33), false).await.unwrap();
    assert_identical(&p, "after the new primaryship's first write").await;
}

/// A small tmpfs for one node's directory (needs root), unmounted on drop.
struct TinyFs(PathBuf);

impl TinyFs {
    fn mount(at: &Path, size: &str) -> TinyFs {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mount a tmpfs at {} (the test machines run as root)", at.display());
        TinyFs(at.to_path_buf())
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class10_a_local_write_that_fails_after_the_replicas_applied_it_leaves_identical_copies() {
    let mut p = Pair::new().await;
    // a1's disk is nearly full: its data writes start failing with ENOSPC
    // while b1 (roomy) applies them.
    let a1_dir = p.stop("a1").await;
    let small = p._tmp.path().join("a1-small");
    let _fs = TinyFs::mount(&small, "3m");
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", a1_dir.display()))
        .arg(&small)
        .status();
    assert!(out.is_ok_and(|s| s.success()));
    p.start("a1", &small);
    let dev = p.export("a1").await;
    let mut failed = 0;
    for i in 0..1024u64 {
        if dev.write(i * BLOCK as u64, block((i % 250) as u8 + 1), false).await.is_err() {
            failed += 1;
        }
    }
    assert!(failed > 0, "the tmpfs never filled up");
    drop(dev);
    tokio::time::sleep(Duration::from_millis(200)).await;
    if p.state().volumes["v"].in_sync.len() < 2 {
        assert!(
            p.wait_in_sync(Duration::from_secs(20)).await,
            "b1 never rejoined: {:?}",
            p.state().volumes["v"]
        );
    }
    assert_identical(&p, &format!("after {failed} local write failures")).await;
}

#[tokio::test]
async fn a_lost_page_cache_is_remembered_across_restarts_until_the_hot_extents_are_reconciled() {
    let tmp = tempfile::tempdir().unwrap();
    let id = VolumeId { serial: 1, nonce: 7 };
    let open = |lost: bool| {
        let fs = FileStorage::with_store(
            NodeStore::open(tmp.path(), Some(1 << 30)).unwrap(),
            DEFAULT_REGION_BYTES,
            EXTENT,
        );
        if lost {
            fs.assume_cache_lost();
        }
        let (dev, _) = fs.open_or_create("v", SIZE, id).unwrap();
        (fs, dev)
    };
    let (fs, dev) = open(false);
    fs.touch_extent("v", 0, BLOCK as u64).unwrap();
    dev.write(0, block(1), false).await.unwrap();
    assert!(!fs.cache_lost("v"));
    drop((fs, dev));
    // A power cut: this start knows.
    let (fs, dev) = open(true);
    assert!(fs.cache_lost("v"));
    drop((fs, dev));
    // Killed before it reconciled; the next start is on the same boot. It
    // must still know its hot extents may lack acknowledged writes.
    let (fs, dev) = open(false);
    assert!(fs.cache_lost("v"), "a second restart forgot the power cut before reconciling");
    assert!(!fs.hot_extents("v").is_empty());
    // Reconciled (the extents were copied between the copies): forgotten.
    fs.clear_hot("v").unwrap();
    assert!(!fs.cache_lost("v"));
    drop((fs, dev));
    let (fs, _dev) = open(false);
    assert!(!fs.cache_lost("v"));
}
