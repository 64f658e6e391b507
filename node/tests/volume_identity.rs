//! Volume identity (issue 12, class 5): a replica directory is opened only as
//! the volume whose id its superblock holds. A volume deleted while this node
//! was down, then created again with the same name, must read as zeros here,
//! and replicas of volumes the committed state no longer holds are removed.
//!
//! Runs a real `VolumeManager` over `FileStorage` with a stub `ClusterView`.

use async_trait::async_trait;
use bytes::Bytes;
use metro_api::config::Role;
use metro_node::repl::link::Dialer;
use metro_node::repl::server::ReplicaSink;
use metro_node::store::{NodeStore, DEFAULT_EXTENT_BYTES, DEFAULT_REGION_BYTES};
use metro_node::volume::file_storage::FileStorage;
use metro_node::volume::manager::{ClusterView, VolumeManager};
use metro_node::volume::storage::VolumeStorage;
use metro_quorum::state::raft_id_of;
use metro_quorum::{ClusterState, Command, CommandResult, LeasePolicy, NodeRecord, VolumeId, VolumeRecord};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const SIZE: u64 = 4 << 20;

struct Stub(watch::Sender<Arc<ClusterState>>);

#[async_trait]
impl ClusterView for Stub {
    fn state(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.0.subscribe()
    }
    fn lease_valid(&self, _: &str, _: u64) -> bool {
        false
    }
    async fn propose(&self, _: Command) -> Result<CommandResult, String> {
        Err("no quorum in this test".into())
    }
}

fn node(id: &str) -> NodeRecord {
    NodeRecord {
        id: id.into(),
        raft_id: raft_id_of(id),
        site: "dc-a".into(),
        role: Role::Storage,
        api: format!("{id}:7443"),
        nbd: None,
        replication: None,
        capacity_bytes: 1 << 30,
        timings: None,
    }
}

/// State with volume `v` (id `serial`) replicated on a1 (here) and b1 (its primary).
fn state_with(volumes: &[(&str, u64)], volume_serial: u64) -> ClusterState {
    let mut s = ClusterState::default();
    for n in ["a1", "b1"] {
        s.nodes.insert(n.into(), node(n));
    }
    for (name, serial) in volumes {
        s.volumes.insert(
            name.to_string(),
            VolumeRecord {
                name: name.to_string(),
                id: VolumeId { serial: *serial, nonce: 0x5eed + serial },
                size_bytes: SIZE,
                iops_limit: 0,
                bandwidth_limit: 0,
                lease_policy: LeasePolicy::Suspend,
                replicas: vec!["a1".into(), "b1".into()],
                in_sync: vec!["a1".into(), "b1".into()],
                primary: Some("b1".into()),
                epoch: 1,
                primary_since: 1,
                previous_primary: None,
            },
        );
    }
    s.volume_serial = volume_serial;
    s
}

/// A manager for node a1 over the store in `dir` (a process start).
fn manager(dir: &Path, state: ClusterState) -> (Arc<VolumeManager>, Arc<dyn VolumeStorage>) {
    metro_api::tls::install_crypto_provider();
    let store = NodeStore::open(dir, Some(1 << 30)).unwrap();
    let storage: Arc<dyn VolumeStorage> =
        Arc::new(FileStorage::with_store(store, DEFAULT_REGION_BYTES, DEFAULT_EXTENT_BYTES));
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let dialer = Dialer::tls("a1".into(), Arc::new(tls), None);
    let (tx, _) = watch::channel(Arc::new(state));
    let m =
        VolumeManager::new("a1".into(), Arc::new(Stub(tx)), storage.clone(), dialer, Duration::from_secs(1));
    (m, storage)
}

async fn write_pattern(m: &VolumeManager, name: &str) {
    let r = m.replica(name, SIZE).expect("replica open");
    r.device.write(0, Bytes::from(vec![0xab; 65536]), true).await.unwrap();
    r.device.write(SIZE - 4096, Bytes::from(vec![0xcd; 4096]), true).await.unwrap();
}

async fn assert_zeros(m: &VolumeManager, name: &str) {
    let r = m.replica(name, SIZE).expect("replica open");
    let data = r.device.read(0, SIZE as u32).await.unwrap();
    assert!(
        data.iter().all(|b| *b == 0),
        "volume `{name}` does not read as zeros: it reopened a deleted volume's data"
    );
}

#[tokio::test]
async fn a_volume_deleted_and_created_again_while_the_node_was_down_reads_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = manager(dir.path(), ClusterState::default());
    m.reconcile(&state_with(&[("v", 1)], 1)).await;
    write_pattern(&m, "v").await;
    drop(m);
    // While a1 was down: `v` deleted, then created again (serial 2).
    let (m, _) = manager(dir.path(), ClusterState::default());
    m.reconcile(&state_with(&[("v", 2)], 2)).await;
    assert_zeros(&m, "v").await;
}

#[tokio::test]
async fn a_delete_and_create_seen_in_one_state_update_reopens_an_empty_replica() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = manager(dir.path(), ClusterState::default());
    m.reconcile(&state_with(&[("v", 1)], 1)).await;
    write_pattern(&m, "v").await;
    // The state watch coalesced the delete and the create: never saw `v` gone.
    m.reconcile(&state_with(&[("v", 2)], 2)).await;
    assert_zeros(&m, "v").await;
}

#[tokio::test]
async fn replicas_of_volumes_deleted_while_the_node_was_down_are_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (m, storage) = manager(dir.path(), ClusterState::default());
    m.reconcile(&state_with(&[("v", 1), ("w", 2)], 2)).await;
    assert_eq!(storage.list(), vec!["v".to_string(), "w".to_string()]);
    drop((m, storage));
    // `w` was deleted while a1 was down.
    let (m, storage) = manager(dir.path(), ClusterState::default());
    m.reconcile(&state_with(&[("v", 1)], 2)).await;
    assert_eq!(storage.list(), vec!["v".to_string()], "the deleted volume's replica is still here");
}

#[tokio::test]
async fn a_state_that_is_behind_keeps_and_refuses_replicas_of_later_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let (m, storage) = manager(dir.path(), ClusterState::default());
    m.reconcile(&state_with(&[("v", 3), ("x", 4)], 4)).await;
    write_pattern(&m, "v").await;
    drop((m, storage));
    // Replayed after a power cut, the local state is older than the replicas
    // (`v` is still the earlier volume with serial 1, `x` unknown): neither
    // is removed nor opened as something else.
    let (m, storage) = manager(dir.path(), ClusterState::default());
    m.reconcile(&state_with(&[("v", 1)], 1)).await;
    assert_eq!(storage.list(), vec!["v".to_string(), "x".to_string()]);
    assert!(m.replica("v", SIZE).is_none(), "a later volume's replica opened under an older id");
    // Once the state catches up, `v` opens with its data.
    m.reconcile(&state_with(&[("v", 3), ("x", 4)], 4)).await;
    let r = m.replica("v", SIZE).expect("replica open");
    assert_eq!(r.device.read(0, 4096).await.unwrap(), Bytes::from(vec![0xab; 4096]));
}
