//! LocalVolume: superblock persistence, typed errors on bad metadata,
//! thin allocation, SEEK_DATA/SEEK_HOLE ranges, delete.

use bytes::Bytes;
use metro_node::block::BlockDevice;
use metro_node::store::envelope;
use metro_node::store::superblock::{SUPERBLOCK_MAGIC, SUPERBLOCK_VERSION};
use metro_node::store::{LocalVolume, StoreError};

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn superblock_survives_reopen_with_name_size_epoch_and_generation() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("vol");
    let v = LocalVolume::create(&dir, "db1", 64 * MIB).unwrap();
    assert_eq!((v.name(), v.size(), v.epoch(), v.generation()), ("db1".to_string(), 64 * MIB, 0, 0));
    v.set_epoch(7).await.unwrap();
    v.set_generation(3).await.unwrap();
    v.write(0, Bytes::from_static(b"persisted"), true).await.unwrap();
    drop(v);
    let v = LocalVolume::open(&dir).unwrap();
    assert_eq!((v.name(), v.size(), v.epoch(), v.generation()), ("db1".to_string(), 64 * MIB, 7, 3));
    assert_eq!(&v.read(0, 9).await.unwrap()[..], b"persisted");
}

#[tokio::test]
async fn epoch_never_goes_backwards() {
    let root = tempfile::tempdir().unwrap();
    let v = LocalVolume::create(&root.path().join("v"), "v", MIB).unwrap();
    v.set_epoch(5).await.unwrap();
    let err = v.set_epoch(4).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidArgument(_)), "{err}");
    assert_eq!(LocalVolume::open(v.dir()).unwrap().epoch(), 5);
}

#[test]
fn creating_over_an_existing_volume_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("v");
    LocalVolume::create(&dir, "v", MIB).unwrap();
    assert!(matches!(LocalVolume::create(&dir, "v", MIB), Err(StoreError::AlreadyExists { .. })));
}

#[test]
fn a_corrupt_superblock_is_a_typed_error_naming_the_file_and_is_not_recreated() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("v");
    LocalVolume::create(&dir, "v", MIB).unwrap();
    let meta = dir.join("meta");
    let mut bytes = std::fs::read(&meta).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x40;
    std::fs::write(&meta, &bytes).unwrap();
    let err = LocalVolume::open(&dir).unwrap_err();
    match &err {
        StoreError::Corrupt { path, what } => {
            assert_eq!(path, &meta);
            assert!(what.contains("checksum"), "{what}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(err.to_string().contains("meta"), "{err}");
    // Still corrupt: nothing rewrote it.
    assert_eq!(std::fs::read(&meta).unwrap(), bytes);
}

#[test]
fn a_superblock_from_a_future_version_is_refused_with_both_versions_named() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("v");
    LocalVolume::create(&dir, "v", MIB).unwrap();
    let meta = dir.join("meta");
    let payload = envelope::read_file(&meta, SUPERBLOCK_MAGIC, SUPERBLOCK_VERSION).unwrap();
    std::fs::write(&meta, envelope::encode(SUPERBLOCK_MAGIC, SUPERBLOCK_VERSION + 1, &payload)).unwrap();
    match LocalVolume::open(&dir).unwrap_err() {
        StoreError::UnsupportedVersion { found, supported, .. } => {
            assert_eq!((found, supported), (SUPERBLOCK_VERSION + 1, SUPERBLOCK_VERSION));
        }
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }
}

#[test]
fn a_data_file_of_the_wrong_length_is_reported_as_corrupt() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("v");
    LocalVolume::create(&dir, "v", MIB).unwrap();
    std::fs::OpenOptions::new().write(true).open(dir.join("data")).unwrap().set_len(4096).unwrap();
    match LocalVolume::open(&dir).unwrap_err() {
        StoreError::Corrupt { what, .. } => assert!(what.contains("4096"), "{what}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[tokio::test]
async fn volumes_are_thin_and_trim_gives_space_back() {
    let root = tempfile::tempdir().unwrap();
    let v = LocalVolume::create(&root.path().join("v"), "v", 1 << 30).unwrap();
    assert!(v.allocated_bytes().unwrap() < 64 * 1024, "fresh 1 GiB volume allocates nothing");
    v.write(10 * MIB, Bytes::from(vec![0xAB; 4 * MIB as usize]), true).await.unwrap();
    let after_write = v.allocated_bytes().unwrap();
    assert!(after_write >= 4 * MIB, "4 MiB written, {after_write} allocated");
    v.trim(10 * MIB, 4 * MIB as u32, true).await.unwrap();
    assert!(v.allocated_bytes().unwrap() < after_write - 3 * MIB, "trim did not punch");
    v.write(20 * MIB, Bytes::from(vec![1; MIB as usize]), false).await.unwrap();
    v.write_zeroes(20 * MIB, MIB as u32, false, true).await.unwrap();
    assert!(v.read(20 * MIB, MIB as u32).await.unwrap().iter().all(|&b| b == 0));
}

#[tokio::test]
async fn data_ranges_report_written_extents_and_skip_holes() {
    let root = tempfile::tempdir().unwrap();
    let v = LocalVolume::create(&root.path().join("v"), "v", 256 * MIB).unwrap();
    assert_eq!(v.data_ranges(0, 256 * MIB).unwrap(), vec![]);
    v.write(MIB, Bytes::from(vec![7; 64 << 10]), false).await.unwrap();
    v.write(100 * MIB, Bytes::from(vec![8; MIB as usize]), false).await.unwrap();
    let r = v.data_ranges(0, 256 * MIB).unwrap();
    assert_eq!(r.len(), 2, "{r:?}");
    // The filesystem may round to its block size, never lose data.
    assert!(r[0].0 <= MIB && r[0].0 + r[0].1 >= MIB + (64 << 10), "{r:?}");
    assert!(r[1].0 <= 100 * MIB && r[1].0 + r[1].1 >= 101 * MIB, "{r:?}");
    assert!(r[0].1 + r[1].1 < 4 * MIB, "holes reported as data: {r:?}");
    // A window starting inside data is clipped to the window.
    assert_eq!(v.data_ranges(100 * MIB + 4096, 8192).unwrap(), vec![(100 * MIB + 4096, 8192)]);
}

#[tokio::test]
async fn delete_removes_the_volume_so_it_no_longer_opens() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("v");
    let v = LocalVolume::create(&dir, "v", MIB).unwrap();
    std::fs::write(v.dirty_bitmap_path("b1"), b"x").unwrap();
    drop(v);
    LocalVolume::delete(&dir).unwrap();
    assert!(!dir.exists());
    assert!(matches!(LocalVolume::open(&dir), Err(StoreError::NotFound { .. })));
}
