//! NodeStore: volume lifecycle, name checks, capacity admission and
//! allocation accounting.

use bytes::Bytes;
use metro_node::block::BlockDevice;
use metro_node::store::{NodeStore, StoreError};

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn volumes_are_created_listed_reopened_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let store = NodeStore::open(dir.path(), Some(1 << 30)).unwrap();
    assert!(store.list().unwrap().is_empty());
    let a = store.create_volume("vol-a", 64 * MIB).unwrap();
    store.create_volume("vol.b_2", 32 * MIB).unwrap();
    assert_eq!(store.list().unwrap(), vec!["vol-a", "vol.b_2"]);
    assert_eq!(store.provisioned_bytes().unwrap(), 96 * MIB);
    a.write(0, Bytes::from(vec![1; MIB as usize]), true).await.unwrap();
    a.set_epoch(2).await.unwrap();
    // The same instance is shared: the epoch is visible through open_volume.
    assert_eq!(store.open_volume("vol-a").unwrap().epoch(), 2);
    drop(store);
    let store = NodeStore::open(dir.path(), Some(1 << 30)).unwrap();
    let a = store.open_volume("vol-a").unwrap();
    assert_eq!((a.size(), a.epoch()), (64 * MIB, 2));
    assert!(matches!(store.create_volume("vol-a", MIB), Err(StoreError::AlreadyExists { .. })));
    store.delete_volume("vol-a").unwrap();
    assert_eq!(store.list().unwrap(), vec!["vol.b_2"]);
    assert!(matches!(store.open_volume("vol-a"), Err(StoreError::NotFound { .. })));
    assert!(matches!(store.delete_volume("vol-a"), Err(StoreError::NotFound { .. })));
}

#[test]
fn names_that_could_escape_the_volumes_directory_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = NodeStore::open(dir.path(), Some(1 << 30)).unwrap();
    for bad in ["", "..", ".hidden", "a/b", "../x", "sp ace", &"x".repeat(201)] {
        assert!(
            matches!(store.create_volume(bad, MIB), Err(StoreError::InvalidArgument(_))),
            "`{bad}` accepted"
        );
    }
}

#[test]
fn a_volume_larger_than_capacity_is_refused_with_both_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let store = NodeStore::open(dir.path(), Some(100 * MIB)).unwrap();
    assert_eq!(store.capacity_bytes().unwrap(), 100 * MIB);
    store.create_volume("fits", 100 * MIB).unwrap();
    let err = store.create_volume("big", 100 * MIB + 1).unwrap_err();
    assert!(
        matches!(err, StoreError::CapacityExceeded { requested, capacity } if requested == 100 * MIB + 1 && capacity == 100 * MIB),
        "{err:?}"
    );
    assert!(!dir.path().join("volumes/big").exists());
    // Without a configured capacity the filesystem's free space is the bound.
    let store = NodeStore::open(dir.path(), None).unwrap();
    let free = store.fs_available_bytes().unwrap();
    assert!(free > 0 && store.capacity_bytes().unwrap() == free);
    assert!(matches!(
        store.create_volume("huge", free.saturating_mul(2)),
        Err(StoreError::CapacityExceeded { .. })
    ));
}

#[tokio::test]
async fn used_bytes_follow_allocation_not_thin_size() {
    let dir = tempfile::tempdir().unwrap();
    let store = NodeStore::open(dir.path(), Some(1 << 40)).unwrap();
    let v = store.create_volume("thin", 10 << 30).unwrap();
    assert!(store.used_bytes().unwrap() < MIB);
    v.write(0, Bytes::from(vec![9; 8 * MIB as usize]), true).await.unwrap();
    let used = store.used_bytes().unwrap();
    assert!((8 * MIB..9 * MIB).contains(&used), "used {used}");
    v.trim(0, 8 * MIB as u32, true).await.unwrap();
    assert!(store.used_bytes().unwrap() < MIB);
}

#[test]
fn leftovers_of_an_interrupted_create_are_cleaned_but_corrupt_volumes_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = NodeStore::open(dir.path(), Some(1 << 30)).unwrap();
    store.create_volume("good", MIB).unwrap();
    store.create_volume("bad", MIB).unwrap();
    drop(store);
    let vols = dir.path().join("volumes");
    std::fs::create_dir(vols.join("half")).unwrap();
    std::fs::write(vols.join("half/data"), b"").unwrap();
    std::fs::write(vols.join("bad/meta"), b"garbage").unwrap();
    let store = NodeStore::open(dir.path(), Some(1 << 30)).unwrap();
    assert!(!vols.join("half").exists(), "directory without meta not cleaned");
    assert_eq!(store.list().unwrap(), vec!["bad", "good"]);
    assert!(matches!(store.open_volume("bad"), Err(StoreError::Corrupt { .. })));
    assert!(vols.join("bad/meta").exists(), "corrupt metadata must be kept for the operator");
}
