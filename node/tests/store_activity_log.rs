//! ActivityLog: extents become hot durably before writes, cool only after a
//! flush, the hot set is bounded, and a crash leaves the hot set on disk.

use metro_node::store::{ActivityLog, AlOutcome, StoreError};

const MIB: u64 = 1 << 20;
const EXT: u64 = 4 * MIB;
const VOL: u64 = 1 << 30;

#[test]
fn a_write_makes_its_extents_hot_on_disk_before_it_is_issued() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("activity.log");
    let (mut log, outcome) = ActivityLog::open(&p, VOL, EXT, 8).unwrap();
    assert_eq!(outcome, AlOutcome::Fresh);
    // A write straddling two extents makes both hot.
    log.begin_write(EXT - 4096, 8192).unwrap();
    log.begin_write(100 * MIB, 4096).unwrap();
    assert_eq!(log.hot_extents(), vec![(0, 2 * EXT), (100 * MIB, EXT)]);
    // "Crash": drop without cooling, reopen.
    drop(log);
    let (log, outcome) = ActivityLog::open(&p, VOL, EXT, 8).unwrap();
    assert_eq!(outcome, AlOutcome::Intact);
    assert_eq!(log.recovered_extents(), 3);
    assert_eq!(log.hot_extents(), vec![(0, 2 * EXT), (100 * MIB, EXT)]);
}

#[test]
fn writes_into_hot_extents_do_not_touch_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("activity.log");
    let (mut log, _) = ActivityLog::open(&p, VOL, EXT, 8).unwrap();
    log.begin_write(0, 4096).unwrap();
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&p).unwrap());
    for i in 0..1000 {
        log.begin_write((i * 4096) % EXT, 4096).unwrap();
    }
    assert_eq!(std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&p).unwrap()), ino);
}

#[test]
fn a_full_hot_set_evicts_only_flushed_extents_least_recently_used_first() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("activity.log");
    let (mut log, _) = ActivityLog::open(&p, VOL, EXT, 3).unwrap();
    log.begin_write(0, 1).unwrap(); // extent 0
    log.begin_write(EXT, 1).unwrap(); // extent 1
    let s = log.begin_write(2 * EXT, 1).unwrap(); // extent 2
    log.begin_write(0, 1).unwrap(); // touch extent 0 again (now newest)
                                    // Nothing flushed yet: a fourth extent is refused, and that is predicted.
    assert!(!log.would_be_full(EXT, 1), "a hot extent always fits");
    assert!(log.would_be_full(3 * EXT, 1));
    let err = log.begin_write(3 * EXT, 1).unwrap_err();
    assert!(matches!(err, StoreError::ActivityLogFull { hot: 3 }), "{err:?}");
    // Flush covering writes up to extent 2's: extents 1 and 2 may cool, but
    // extent 0 was written after the flush point.
    log.mark_flushed(s);
    assert!(!log.would_be_full(3 * EXT, 1), "a flushed extent can be evicted");
    log.begin_write(3 * EXT, 1).unwrap();
    let hot = log.hot_extents();
    assert_eq!(hot, vec![(0, EXT), (2 * EXT, 2 * EXT)], "LRU flushed extent 1 should go first");
    drop(log);
    let (log, _) = ActivityLog::open(&p, VOL, EXT, 3).unwrap();
    assert_eq!(log.hot_extents(), hot, "the file matches memory");
}

#[test]
fn cool_down_after_a_flush_leaves_nothing_to_resync() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("activity.log");
    let (mut log, _) = ActivityLog::open(&p, VOL, EXT, 64).unwrap();
    for i in 0..10 {
        log.begin_write(i * EXT, 4096).unwrap();
    }
    let before_flush = log.current_seq();
    log.begin_write(50 * EXT, 4096).unwrap(); // in flight during the flush
    log.mark_flushed(before_flush);
    assert_eq!(log.cool_down().unwrap(), 10);
    drop(log);
    let (log, _) = ActivityLog::open(&p, VOL, EXT, 64).unwrap();
    assert_eq!(log.hot_extents(), vec![(50 * EXT, EXT)]);
}

#[test]
fn recovered_extents_stay_on_disk_until_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("activity.log");
    let (mut log, _) = ActivityLog::open(&p, VOL, EXT, 64).unwrap();
    log.begin_write(7 * EXT, 1).unwrap();
    drop(log);
    let (mut log, _) = ActivityLog::open(&p, VOL, EXT, 64).unwrap();
    log.begin_write(9 * EXT, 1).unwrap(); // new hot extent rewrites the file...
    drop(log);
    let (mut log, _) = ActivityLog::open(&p, VOL, EXT, 64).unwrap();
    assert_eq!(log.hot_extents(), vec![(7 * EXT, EXT), (9 * EXT, EXT)], "...keeping the recovered one");
    log.clear_recovered().unwrap();
    drop(log);
    let (log, _) = ActivityLog::open(&p, VOL, EXT, 64).unwrap();
    assert!(log.hot_extents().is_empty());
}

#[test]
fn a_damaged_log_makes_every_extent_hot() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("activity.log");
    let (mut log, _) = ActivityLog::open(&p, 10 * EXT + 5, EXT, 64).unwrap();
    log.begin_write(0, 1).unwrap();
    drop(log);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes.truncate(bytes.len() - 3);
    std::fs::write(&p, &bytes).unwrap();
    let (log, outcome) = ActivityLog::open(&p, 10 * EXT + 5, EXT, 64).unwrap();
    assert!(matches!(outcome, AlOutcome::AllHot { .. }), "{outcome:?}");
    assert_eq!(log.hot_extents(), vec![(0, 10 * EXT + 5)]);
    drop(log);
    let (_, outcome) = ActivityLog::open(&p, 10 * EXT + 5, EXT, 64).unwrap();
    assert_eq!(outcome, AlOutcome::Intact, "the conservative state was persisted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_share_persists_and_every_extent_is_on_disk_before_its_write() {
    use metro_node::store::SharedActivityLog;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("activity.log");
    let (log, _) = ActivityLog::open(&p, VOL, EXT, 256).unwrap();
    let shared = Arc::new(SharedActivityLog::new(log));
    const WRITERS: u64 = 64;
    let tasks: Vec<_> = (0..WRITERS)
        .map(|i| {
            let s = shared.clone();
            let p = p.clone();
            tokio::spawn(async move {
                // Two writers per extent: the second must also wait for the file.
                s.begin_write((i / 2) * EXT + (i % 2) * 4096, 4096).await.unwrap();
                let (on_disk, _) = ActivityLog::open(&p, VOL, EXT, 256).unwrap();
                let hot = on_disk.hot_extents();
                let off = (i / 2) * EXT;
                assert!(
                    hot.iter().any(|&(o, l)| o <= off && off < o + l),
                    "extent at {off} not on disk for writer {i}"
                );
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let persists = shared.persist_count();
    assert!(persists < WRITERS / 2, "{persists} persists for {} new extents: no group commit", WRITERS / 2);
    // Hot extents cost nothing more.
    let seq = shared.begin_write(0, 1).await.unwrap();
    assert_eq!(shared.persist_count(), persists);
    shared.mark_flushed(seq);
    assert_eq!(shared.cool_down().await.unwrap(), (WRITERS / 2) as usize);
    let (on_disk, _) = ActivityLog::open(&p, VOL, EXT, 256).unwrap();
    assert!(on_disk.hot_extents().is_empty());
}
