//! `FaultyVolume`: wraps any [`BlockDevice`] and injects failures and
//! latency on command, for tests of the layers above (NBD, replication).
//!
//! Faults are armed per operation kind with a count (`Some(n)`: the next n
//! matching operations fail; `None`: fail until [`FaultyVolume::clear`]).
//! A failed operation never reaches the inner device, so it has no effect.

use crate::block::{BlockDevice, BlockError, BlockResult};
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The operation kinds a fault can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
}

const OPS: usize = 5;

impl Op {
    fn index(self) -> usize {
        self as usize
    }
}

/// Which error an armed fault returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// `BlockError::Io` with EIO.
    Io,
    /// `BlockError::NoSpace`.
    NoSpace,
    /// `BlockError::Shutdown` with this reason.
    Shutdown(String),
}

impl FaultKind {
    fn to_error(&self) -> BlockError {
        match self {
            FaultKind::Io => BlockError::Io(std::io::Error::from_raw_os_error(libc::EIO)),
            FaultKind::NoSpace => BlockError::NoSpace,
            FaultKind::Shutdown(r) => BlockError::Shutdown(r.clone()),
        }
    }
}

#[derive(Default)]
struct State {
    /// Per op: (kind, remaining count or None = until cleared).
    faults: [Option<(FaultKind, Option<u32>)>; OPS],
    latency: Duration,
    calls: [u64; OPS],
    injected: u64,
}

/// A [`BlockDevice`] wrapper with programmable faults.
pub struct FaultyVolume {
    inner: Arc<dyn BlockDevice>,
    state: Mutex<State>,
}

impl FaultyVolume {
    pub fn new(inner: Arc<dyn BlockDevice>) -> FaultyVolume {
        FaultyVolume { inner, state: Mutex::new(State::default()) }
    }

    /// Make `op` fail with `kind`: the next `count` calls, or every call
    /// until [`clear`](Self::clear) when `count` is `None`.
    pub fn fail(&self, op: Op, kind: FaultKind, count: Option<u32>) {
        self.lock().faults[op.index()] = Some((kind, count));
    }

    /// Delay every operation by `latency` before it runs.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// Remove every fault and the latency.
    pub fn clear(&self) {
        let mut s = self.lock();
        s.faults = Default::default();
        s.latency = Duration::ZERO;
    }

    /// Calls of `op` so far (failed ones included).
    pub fn calls(&self, op: Op) -> u64 {
        self.lock().calls[op.index()]
    }

    /// Operations failed on purpose so far.
    pub fn injected(&self) -> u64 {
        self.lock().injected
    }

    pub fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count the call, apply latency, and return the injected error if armed.
    async fn gate(&self, op: Op) -> BlockResult<()> {
        let (latency, fault) = {
            let mut s = self.lock();
            s.calls[op.index()] += 1;
            let slot = &mut s.faults[op.index()];
            let fault = match slot {
                Some((kind, None)) => Some(kind.to_error()),
                Some((kind, Some(n))) => {
                    let err = kind.to_error();
                    *n -= 1;
                    if *n == 0 {
                        *slot = None;
                    }
                    Some(err)
                }
                None => None,
            };
            if fault.is_some() {
                s.injected += 1;
            }
            (s.latency, fault)
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        match fault {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl BlockDevice for FaultyVolume {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        self.gate(Op::Read).await?;
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()> {
        self.gate(Op::Write).await?;
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> BlockResult<()> {
        self.gate(Op::Flush).await?;
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> BlockResult<()> {
        self.gate(Op::Trim).await?;
        self.inner.trim(offset, len, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool, may_punch: bool) -> BlockResult<()> {
        self.gate(Op::WriteZeroes).await?;
        self.inner.write_zeroes(offset, len, fua, may_punch).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemVolume;

    #[tokio::test]
    async fn armed_write_fault_fails_exactly_n_writes_and_leaves_data_untouched() {
        let f = FaultyVolume::new(Arc::new(MemVolume::new(1 << 20)));
        f.fail(Op::Write, FaultKind::NoSpace, Some(2));
        for _ in 0..2 {
            let r = f.write(0, Bytes::from_static(b"abcd"), false).await;
            assert!(matches!(r, Err(BlockError::NoSpace)), "got {r:?}");
        }
        assert_eq!(&f.read(0, 4).await.unwrap()[..], &[0, 0, 0, 0]);
        f.write(0, Bytes::from_static(b"abcd"), false).await.unwrap();
        assert_eq!(&f.read(0, 4).await.unwrap()[..], b"abcd");
        assert_eq!(f.calls(Op::Write), 3);
        assert_eq!(f.injected(), 2);
    }

    #[tokio::test]
    async fn unbounded_fault_lasts_until_cleared() {
        let f = FaultyVolume::new(Arc::new(MemVolume::new(1 << 20)));
        f.fail(Op::Flush, FaultKind::Shutdown("lease lost".into()), None);
        for _ in 0..5 {
            assert!(matches!(f.flush().await, Err(BlockError::Shutdown(_))));
        }
        f.clear();
        f.flush().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn latency_delays_each_operation() {
        let f = FaultyVolume::new(Arc::new(MemVolume::new(1 << 20)));
        f.set_latency(Duration::from_millis(50));
        let t = tokio::time::Instant::now();
        f.read(0, 512).await.unwrap();
        f.flush().await.unwrap();
        assert_eq!(t.elapsed(), Duration::from_millis(100));
    }
}
