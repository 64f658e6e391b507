//! A full filesystem: writes fail with NoSpace, acknowledged data and the
//! superblock stay intact, and freeing space makes writes work again.
//! Uses a 2 MiB tmpfs (needs root, which the test machines have).

use metro_node::block::{BlockDevice, BlockError};
use metro_node::store::testing::pattern;
use metro_node::store::{DirtyBitmap, LocalVolume, StoreError};
use std::path::{Path, PathBuf};
use std::process::Command;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

/// A small tmpfs, unmounted on drop.
struct TinyFs {
    mnt: PathBuf,
    _root: tempfile::TempDir,
}

impl TinyFs {
    fn mount(size: &str) -> Option<TinyFs> {
        let root = tempfile::tempdir().unwrap();
        let mnt = root.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mnt)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(TinyFs { mnt, _root: root })
    }
    fn path(&self) -> &Path {
        &self.mnt
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

#[tokio::test]
async fn a_full_filesystem_fails_writes_with_no_space_and_keeps_acknowledged_data() {
    let Some(fs) = TinyFs::mount("2m") else {
        panic!("cannot mount a tmpfs: this test needs root (the test machines run as root)");
    };
    let dir = fs.path().join("vol");
    // A 64 MiB thin volume on a 2 MiB filesystem.
    let v = LocalVolume::create(&dir, "full", 64 * MIB).unwrap();
    v.set_epoch(3).await.unwrap();
    let acked = pattern(42, 512 * KIB as usize);
    v.write(0, acked.clone(), true).await.expect("first write fits");

    tracing::info!("--- fill the filesystem");
    let mut no_space_at = None;
    for k in 0..32u64 {
        let off = MIB + k * 256 * KIB;
        match v.write(off, pattern(k, 256 * KIB as usize), false).await {
            Ok(()) => {}
            Err(BlockError::NoSpace) => {
                no_space_at = Some(off);
                break;
            }
            Err(e) => panic!("expected NoSpace, got {e:?}"),
        }
    }
    let no_space_at = no_space_at.expect("2 MiB filesystem never filled up");
    assert_eq!(BlockError::NoSpace.nbd_errno(), 28);

    tracing::info!("--- acknowledged data is intact; flush still works");
    assert_eq!(v.read(0, acked.len() as u32).await.unwrap(), acked);
    v.flush().await.expect("flush on a full filesystem");

    tracing::info!("--- metadata updates fail cleanly and leave the old superblock");
    let err = v.set_epoch(4).await.unwrap_err();
    assert!(err.is_no_space(), "expected NoSpace, got {err:?}");
    assert_eq!(v.epoch(), 3);
    assert_eq!(LocalVolume::open(&dir).unwrap().epoch(), 3);
    let err = DirtyBitmap::create(&dir.join("dirty-b1.bitmap"), 64 * MIB, 64 * KIB);
    assert!(matches!(err, Err(StoreError::NoSpace { .. })), "{err:?}");

    tracing::info!("--- trimming frees space and writes succeed again");
    v.trim(MIB, (no_space_at - MIB) as u32, true).await.unwrap();
    v.write(no_space_at, pattern(99, 256 * KIB as usize), true).await.expect("write after trim");
    assert_eq!(v.read(no_space_at, 256 * KIB as u32).await.unwrap(), pattern(99, 256 * KIB as usize));
    assert_eq!(v.read(0, acked.len() as u32).await.unwrap(), acked);
    v.set_epoch(4).await.unwrap();
    assert_eq!(LocalVolume::open(&dir).unwrap().epoch(), 4);
}
