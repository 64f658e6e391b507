//! Persistent raft log: one append-only segment file plus an atomic vote file,
//! both under `data_dir/raft/`.
//!
//! ```text
//! log.seg : magic "METRLOG\0" | version u32 LE | record*
//! record  : len u32 LE | crc32c(len) u32 LE | crc32c(payload) u32 LE | payload (serde_json Record)
//! vote    : durable envelope (see durable.rs), serde_json Vote
//! ```
//!
//! Every mutation (append, truncate, purge) is a record appended to the
//! segment, so the file is only ever appended to, except by compaction, which
//! rewrites the live suffix into `log.seg.tmp` and renames it over.
//!
//! Invariants:
//! - `append` returns (and reports the flush to openraft) only after fsync.
//! - On open, a torn tail (an incomplete last record, a last record whose
//!   payload checksum fails, or a zero-filled tail) is what a crash mid-append
//!   leaves: it is truncated and logged. Anything else is corruption and
//!   opening fails with an error naming the file and the byte offset: a bad
//!   payload checksum with more data after it, or a length whose own checksum
//!   fails (so a flipped length bit can never pass for a torn tail and
//!   silently drop the records after it).
//! - The in-memory index equals the replay of the file at all times.

use crate::durable::{self, DurableError};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogId, RaftLogReader};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const LOG_MAGIC: &[u8; 8] = b"METRLOG\0";
/// Segment format version; bump and add an upgrade path when the layout changes.
pub const LOG_VERSION: u32 = 1;
const VOTE_MAGIC: &[u8; 8] = b"METRVOTE";
const VOTE_VERSION: u32 = 1;
const HEADER_LEN: u64 = 12;
const RECORD_HEADER_LEN: u64 = 12;
/// Largest record accepted: an entry carries one command (a batch of at most
/// a few thousand volume changes), far below this.
pub const MAX_RECORD_BYTES: u64 = 64 * 1024 * 1024;
/// Compact the segment after a purge once it is bigger than this; below it a
/// rewrite costs more than the disk space it frees.
const COMPACT_MIN_BYTES: u64 = 8 * 1024 * 1024;

/// One durable mutation of the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Record {
    Entry(Entry),
    /// Delete every entry with index >= `since` (conflicting suffix).
    Truncate {
        since: u64,
    },
    /// Delete every entry up to and including this log id (compacted into a snapshot).
    Purge(LogId),
    Committed(Option<LogId>),
}

#[derive(Debug, thiserror::Error)]
pub enum LogFileError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} at byte offset {offset}: {reason}; the raft log is corrupt, remove this member's data dir and re-join it")]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    #[error(transparent)]
    Durable(#[from] DurableError),
}

struct Inner {
    path: PathBuf,
    vote_path: PathBuf,
    file: File,
    file_bytes: u64,
    entries: BTreeMap<u64, Entry>,
    last_purged: Option<LogId>,
    committed: Option<LogId>,
    vote: Option<Vote>,
}

/// The raft log store. Cheap to clone; clones share the same file.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
}

fn frame(rec: &Record) -> Vec<u8> {
    let payload = serde_json::to_vec(rec).expect("log records always serialize");
    let mut out = Vec::with_capacity(payload.len() + RECORD_HEADER_LEN as usize);
    let len = (payload.len() as u32).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc32c::crc32c(&len).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

fn header() -> Vec<u8> {
    let mut h = LOG_MAGIC.to_vec();
    h.extend_from_slice(&LOG_VERSION.to_le_bytes());
    h
}

/// Parse a segment image. Returns the records and the length of the valid
/// prefix (shorter than `buf` when the tail is torn).
fn parse(path: &Path, buf: &[u8]) -> Result<(Vec<Record>, u64), LogFileError> {
    let corrupt =
        |offset: u64, reason: String| LogFileError::Corrupt { path: path.to_path_buf(), offset, reason };
    let len = buf.len() as u64;
    if len < HEADER_LEN {
        // A crash while creating the file: only a prefix of the header exists.
        if buf != &header()[..buf.len()] {
            return Err(corrupt(0, "bad header".into()));
        }
        return Ok((Vec::new(), 0));
    }
    if &buf[..8] != LOG_MAGIC {
        return Err(corrupt(0, "wrong magic, not a metro raft log".into()));
    }
    let version = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
    if version != LOG_VERSION {
        return Err(corrupt(8, format!("format version {version}, this build reads version {LOG_VERSION}")));
    }
    let mut records = Vec::new();
    let mut off = HEADER_LEN;
    while off < len {
        if len - off < RECORD_HEADER_LEN {
            return Ok((records, off));
        }
        let o = off as usize;
        let len_bytes: [u8; 4] = buf[o..o + 4].try_into().expect("4 bytes");
        let len_crc = u32::from_le_bytes(buf[o + 4..o + 8].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(buf[o + 8..o + 12].try_into().expect("4 bytes"));
        if crc32c::crc32c(&len_bytes) != len_crc {
            // A file extended by a crash may end in zeros; anything else is damage.
            if buf[o..].iter().all(|b| *b == 0) {
                return Ok((records, off));
            }
            return Err(corrupt(off, "record length checksum mismatch".into()));
        }
        let rlen = u64::from(u32::from_le_bytes(len_bytes));
        let end = off + RECORD_HEADER_LEN + rlen;
        if rlen > MAX_RECORD_BYTES {
            return Err(corrupt(off, format!("record length {rlen} exceeds the limit {MAX_RECORD_BYTES}")));
        }
        if end > len {
            return Ok((records, off));
        }
        let payload = &buf[(off + RECORD_HEADER_LEN) as usize..end as usize];
        if crc32c::crc32c(payload) != crc {
            if end == len {
                return Ok((records, off));
            }
            return Err(corrupt(off, "record checksum mismatch with more records after it".into()));
        }
        let rec: Record = serde_json::from_slice(payload)
            .map_err(|e| corrupt(off, format!("record checksums but does not decode: {e}")))?;
        records.push(rec);
        off = end;
    }
    Ok((records, off))
}

impl Inner {
    fn replay(&mut self, rec: Record) {
        match rec {
            Record::Entry(e) => {
                self.entries.insert(e.log_id.index, e);
            }
            Record::Truncate { since } => {
                self.entries.split_off(&since);
            }
            Record::Purge(id) => {
                self.entries = self.entries.split_off(&(id.index + 1));
                self.last_purged = Some(id);
            }
            Record::Committed(c) => self.committed = c,
        }
    }

    fn write(&mut self, bytes: &[u8], sync: bool) -> io::Result<()> {
        self.file.write_all(bytes)?;
        if sync {
            self.file.sync_data()?;
        }
        self.file_bytes += bytes.len() as u64;
        Ok(())
    }

    /// Rewrite the live records into a fresh segment and swap it in atomically.
    fn compact(&mut self) -> Result<(), LogFileError> {
        let tmp = self.path.with_extension("seg.tmp");
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| LogFileError::Io { path: p, source }
        };
        let mut buf = header();
        if let Some(p) = self.last_purged {
            buf.extend(frame(&Record::Purge(p)));
        }
        buf.extend(frame(&Record::Committed(self.committed)));
        for e in self.entries.values() {
            buf.extend(frame(&Record::Entry(e.clone())));
        }
        {
            let mut f =
                OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).map_err(io(&tmp))?;
            f.write_all(&buf).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        durable::fsync_dir(self.path.parent().unwrap_or(Path::new(".")))?;
        self.file = OpenOptions::new().append(true).open(&self.path).map_err(io(&self.path))?;
        self.file_bytes = buf.len() as u64;
        tracing::info!(path = %self.path.display(), bytes = self.file_bytes, "compacted the raft log segment");
        Ok(())
    }
}

impl LogStore {
    /// Open (or create) the log under `dir` (normally `data_dir/raft`).
    pub fn open(dir: &Path) -> Result<Self, LogFileError> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| LogFileError::Io { path: p, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join("log.seg");
        let vote_path = dir.join("vote");
        let buf = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(&path)(e)),
        };
        let (records, valid) = parse(&path, &buf)?;
        let mut file = OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?;
        if valid < buf.len() as u64 {
            tracing::warn!(
                path = %path.display(),
                offset = valid,
                dropped_bytes = buf.len() as u64 - valid,
                "raft log has a torn tail (crash during an append); truncating it"
            );
            file.set_len(valid).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
        }
        let mut file_bytes = valid;
        if valid < HEADER_LEN {
            file.set_len(0).map_err(io(&path))?;
            file.write_all(&header()).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
            durable::fsync_dir(dir)?;
            file_bytes = HEADER_LEN;
        }
        let vote = match durable::read(&vote_path, VOTE_MAGIC, VOTE_VERSION)? {
            Some(body) => Some(serde_json::from_slice(&body).map_err(|e| LogFileError::Corrupt {
                path: vote_path.clone(),
                offset: 0,
                reason: format!("vote does not decode: {e}"),
            })?),
            None => None,
        };
        let mut inner = Inner {
            path,
            vote_path,
            file,
            file_bytes,
            entries: BTreeMap::new(),
            last_purged: None,
            committed: None,
            vote,
        };
        for r in records {
            inner.replay(r);
        }
        Ok(Self { inner: Arc::new(Mutex::new(inner)) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries with an index above `index` (all of them for None).
    pub(crate) fn entries_after(&self, index: Option<u64>) -> Vec<Entry> {
        let g = self.lock();
        match index {
            Some(i) => g.entries.range(i + 1..).map(|(_, e)| e.clone()).collect(),
            None => g.entries.values().cloned().collect(),
        }
    }

    /// The last log id (an entry's, else the last purged one) and the vote.
    pub(crate) fn last_and_vote(&self) -> (Option<LogId>, Option<Vote>) {
        let g = self.lock();
        (g.entries.values().next_back().map(|e| *e.get_log_id()).or(g.last_purged), g.vote)
    }

    /// Quorum-loss override only, with the raft core stopped: store `vote`,
    /// then append `entries` (fsynced), as if this member had been elected.
    pub(crate) fn force_append(&self, vote: Vote, entries: Vec<Entry>) -> Result<(), LogFileError> {
        let mut g = self.lock();
        let body = serde_json::to_vec(&vote).expect("votes serialize");
        durable::write_atomic(&g.vote_path, VOTE_MAGIC, VOTE_VERSION, &body)?;
        g.vote = Some(vote);
        let recs: Vec<Record> = entries.into_iter().map(Record::Entry).collect();
        let mut bytes = Vec::new();
        for r in &recs {
            bytes.extend(frame(r));
        }
        let path = g.path.clone();
        g.write(&bytes, true).map_err(|source| LogFileError::Io { path, source })?;
        for r in recs {
            g.replay(r);
        }
        Ok(())
    }

    #[allow(clippy::result_large_err)] // openraft's error type, returned as is
    fn mutate(&self, rec: Record, sync: bool, verb: ErrorVerb) -> Result<(), StorageError> {
        let mut g = self.lock();
        let bytes = frame(&rec);
        g.write(&bytes, sync).map_err(|e| StorageError::from_io_error(ErrorSubject::Logs, verb, e))?;
        g.replay(rec);
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(self.lock().entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let g = self.lock();
        let last = g.entries.values().next_back().map(|e| *e.get_log_id()).or(g.last_purged);
        Ok(LogState { last_purged_log_id: g.last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let mut g = self.lock();
        let body = serde_json::to_vec(vote).expect("votes serialize");
        durable::write_atomic(&g.vote_path, VOTE_MAGIC, VOTE_VERSION, &body).map_err(|e| {
            StorageError::from_io_error(ErrorSubject::Vote, ErrorVerb::Write, io::Error::other(e.to_string()))
        })?;
        g.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.lock().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not fsynced on its own: it is an optimisation (apply on restart
        // without waiting for the leader); the next append syncs it.
        self.mutate(Record::Committed(committed), false, ErrorVerb::Write)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.lock().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut g = self.lock();
        let recs: Vec<Record> = entries.into_iter().map(Record::Entry).collect();
        let mut bytes = Vec::new();
        for r in &recs {
            bytes.extend(frame(r));
        }
        let res = g.write(&bytes, true);
        if let Err(e) = res {
            let kind = e.kind();
            callback.log_io_completed(Err(io::Error::new(kind, e.to_string())));
            return Err(StorageError::from_io_error(ErrorSubject::Logs, ErrorVerb::Write, e));
        }
        for r in recs {
            g.replay(r);
        }
        drop(g);
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.mutate(Record::Truncate { since: log_id.index }, true, ErrorVerb::Delete)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.mutate(Record::Purge(log_id), true, ErrorVerb::Delete)?;
        let mut g = self.lock();
        if g.file_bytes > COMPACT_MIN_BYTES {
            g.compact().map_err(|e| {
                StorageError::from_io_error(
                    ErrorSubject::Logs,
                    ErrorVerb::Write,
                    io::Error::other(e.to_string()),
                )
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::StateMachine;
    use openraft::storage::RaftLogStorageExt;
    use openraft::testing::{StoreBuilder, Suite};

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
            let dir = tempfile::tempdir().expect("tempdir");
            let log = LogStore::open(dir.path()).expect("open log");
            let sm = StateMachine::open(dir.path()).expect("open sm");
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn the_store_passes_the_openraft_storage_conformance_suite() {
        Suite::test_all(Builder).unwrap();
    }

    fn blank(index: u64) -> Entry {
        openraft::testing::blank_ent::<TypeConfig>(1, 1, index)
    }

    async fn write_three(dir: &Path) -> (u64, u64) {
        let mut log = LogStore::open(dir).unwrap();
        log.blocking_append([blank(1), blank(2)]).await.unwrap();
        let before = std::fs::metadata(dir.join("log.seg")).unwrap().len();
        log.blocking_append([blank(3)]).await.unwrap();
        let after = std::fs::metadata(dir.join("log.seg")).unwrap().len();
        (before, after)
    }

    async fn indexes(log: &mut LogStore) -> Vec<u64> {
        log.try_get_log_entries(0..).await.unwrap().iter().map(|e| e.log_id.index).collect()
    }

    #[tokio::test]
    async fn a_torn_last_record_is_truncated_at_every_byte_offset() {
        let src = tempfile::tempdir().unwrap();
        let (start, end) = write_three(src.path()).await;
        let image = std::fs::read(src.path().join("log.seg")).unwrap();
        assert_eq!(image.len() as u64, end);
        for cut in start..end {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("log.seg"), &image[..cut as usize]).unwrap();
            let mut log = LogStore::open(dir.path()).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            assert_eq!(indexes(&mut log).await, vec![1, 2], "cut at {cut}");
            assert_eq!(std::fs::metadata(dir.path().join("log.seg")).unwrap().len(), start, "cut at {cut}");
            // The log keeps working after recovery, and the new tail is durable.
            log.blocking_append([blank(3)]).await.unwrap();
            drop(log);
            let mut again = LogStore::open(dir.path()).unwrap();
            assert_eq!(indexes(&mut again).await, vec![1, 2, 3], "cut at {cut}");
        }
    }

    #[tokio::test]
    async fn a_bad_checksum_in_the_middle_is_refused_with_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        write_three(dir.path()).await;
        let path = dir.path().join("log.seg");
        let mut image = std::fs::read(&path).unwrap();
        // Flip one payload byte of the first record (offset 12 + 12 header bytes).
        image[(HEADER_LEN + RECORD_HEADER_LEN + 3) as usize] ^= 0x40;
        std::fs::write(&path, &image).unwrap();
        let err = LogStore::open(dir.path()).err().expect("corruption must be refused");
        let msg = err.to_string();
        assert!(matches!(err, LogFileError::Corrupt { offset: 12, .. }), "{msg}");
        assert!(msg.contains("log.seg") && msg.contains("offset 12"), "{msg}");
        // The file is left untouched for the operator to inspect.
        assert_eq!(std::fs::read(&path).unwrap(), image);
    }

    #[tokio::test]
    async fn truncate_purge_and_vote_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = LogStore::open(dir.path()).unwrap();
            log.blocking_append((1..=6).map(blank)).await.unwrap();
            log.truncate(openraft::testing::log_id(1, 1, 5)).await.unwrap();
            log.purge(openraft::testing::log_id(1, 1, 2)).await.unwrap();
            log.save_vote(&Vote::new(3, 7)).await.unwrap();
        }
        let mut log = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&mut log).await, vec![3, 4]);
        let st = log.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id.map(|l| l.index), Some(2));
        assert_eq!(st.last_log_id.map(|l| l.index), Some(4));
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 7)));
    }

    #[tokio::test]
    async fn a_flipped_length_bit_in_the_middle_is_corruption_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        write_three(dir.path()).await;
        let path = dir.path().join("log.seg");
        let mut image = std::fs::read(&path).unwrap();
        image[HEADER_LEN as usize + 2] ^= 0x01; // the first record's length, +64 KiB
        std::fs::write(&path, &image).unwrap();
        let err = LogStore::open(dir.path()).err().expect("must be refused");
        assert!(matches!(err, LogFileError::Corrupt { offset: 12, .. }), "{err}");
    }

    #[tokio::test]
    async fn a_zero_filled_tail_after_a_crash_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let (_, end) = write_three(dir.path()).await;
        let path = dir.path().join("log.seg");
        let mut image = std::fs::read(&path).unwrap();
        image.extend(std::iter::repeat_n(0u8, 4096));
        std::fs::write(&path, &image).unwrap();
        let mut log = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&mut log).await, vec![1, 2, 3]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), end);
    }

    #[test]
    fn a_log_of_another_format_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = LOG_MAGIC.to_vec();
        h.extend_from_slice(&(LOG_VERSION + 1).to_le_bytes());
        std::fs::write(dir.path().join("log.seg"), h).unwrap();
        let msg = LogStore::open(dir.path()).err().unwrap().to_string();
        assert!(msg.contains("format version 2"), "{msg}");
    }
}
