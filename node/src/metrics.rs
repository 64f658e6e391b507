//! Prometheus metrics, computed at scrape time from the quorum member and the
//! volume manager (no counters to keep in sync on the I/O path).
//!
//! | metric | meaning |
//! |---|---|
//! | `metro_quorum_term`, `metro_quorum_is_leader`, `metro_quorum_has_leader` | raft view |
//! | `metro_quorum_voters` | voter count |
//! | `metro_volumes` | volumes in the cluster |
//! | `metro_volume_epoch{volume}` | current epoch |
//! | `metro_volume_in_sync_replicas{volume}` / `metro_volume_replicas{volume}` | degradation |
//! | `metro_volume_primary_here{volume}` | 1 where this node serves it |
//! | `metro_replica_dirty_bytes{volume,replica}` | bytes a replica misses (resync backlog) |
//! | `metro_witness_reachable` | 0 raises the witness-loss alert |
//! | `metro_witness_rtt_seconds`, `metro_witness_rtt_last_seconds` | leader only: smoothed / latest raft-heartbeat RTT between the leader and the witness (absent without a fresh sample) |
//! | `metro_peer_rtt_seconds{peer}` | leader only: smoothed raft-heartbeat RTT to each member with a fresh sample |

use crate::volume::manager::VolumeManager;
use metro_api::config::Role;
use metro_api::telemetry::SharedRegistry;
use metro_quorum::Quorum;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use std::sync::Arc;

struct Metrics {
    quorum: Quorum,
    manager: Option<Arc<VolumeManager>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> Result<(), std::fmt::Error> {
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for Metrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let st = self.quorum.status();
        let state = self.quorum.state().borrow().clone();
        gauge(&mut enc, "quorum_term", "Current raft term", st.term as i64)?;
        gauge(&mut enc, "quorum_is_leader", "1 if this member leads", i64::from(st.is_leader))?;
        gauge(&mut enc, "quorum_has_leader", "1 if a leader is known", i64::from(st.leader.is_some()))?;
        gauge(&mut enc, "quorum_voters", "Number of voters", st.voters.len() as i64)?;
        gauge(&mut enc, "volumes", "Volumes in the cluster", state.volumes.len() as i64)?;
        if let Some(ages) = self.quorum.heartbeat_ages_ms() {
            if let Some(w) = state.nodes.values().find(|n| n.role == Role::Witness) {
                let ok = ages.get(&w.id).is_some_and(|a| *a < self.quorum.node_loss_ms());
                gauge(&mut enc, "witness_reachable", "1 if the leader hears the witness", i64::from(ok))?;
            }
        }
        if let Some(rtt) = crate::summary::witness_rtt(&self.quorum, &state) {
            let secs = |us: u64| us as f64 / 1e6;
            ConstGauge::new(secs(rtt.smoothed_us)).encode(enc.encode_descriptor(
                "witness_rtt_seconds",
                "Smoothed raft-heartbeat round trip between the leader and the witness",
                None,
                MetricType::Gauge,
            )?)?;
            ConstGauge::new(secs(rtt.last_us)).encode(enc.encode_descriptor(
                "witness_rtt_last_seconds",
                "Latest raft-heartbeat round trip between the leader and the witness",
                None,
                MetricType::Gauge,
            )?)?;
        }
        if st.is_leader {
            let mut e = enc.encode_descriptor(
                "peer_rtt_seconds",
                "Smoothed raft-heartbeat round trip from the leader",
                None,
                MetricType::Gauge,
            )?;
            for n in state.nodes.keys() {
                if let Some(r) = self.quorum.peer_rtt(n) {
                    ConstGauge::new(r.smoothed_us as f64 / 1e6)
                        .encode(e.encode_family(&[("peer", n.as_str())])?)?;
                }
            }
        }
        let mut e = enc.encode_descriptor("volume_epoch", "Volume epoch", None, MetricType::Gauge)?;
        for v in state.volumes.values() {
            ConstGauge::new(v.epoch as i64).encode(e.encode_family(&[("volume", v.name.as_str())])?)?;
        }
        let mut e =
            enc.encode_descriptor("volume_in_sync_replicas", "In-sync replicas", None, MetricType::Gauge)?;
        for v in state.volumes.values() {
            ConstGauge::new(v.in_sync.len() as i64)
                .encode(e.encode_family(&[("volume", v.name.as_str())])?)?;
        }
        let mut e = enc.encode_descriptor("volume_replicas", "Placed replicas", None, MetricType::Gauge)?;
        for v in state.volumes.values() {
            ConstGauge::new(v.replicas.len() as i64)
                .encode(e.encode_family(&[("volume", v.name.as_str())])?)?;
        }
        if let Some(m) = &self.manager {
            let mut e = enc.encode_descriptor(
                "volume_primary_here",
                "1 where this node serves",
                None,
                MetricType::Gauge,
            )?;
            for v in state.volumes.values() {
                let here = i64::from(m.is_primary_here(&v.name));
                ConstGauge::new(here).encode(e.encode_family(&[("volume", v.name.as_str())])?)?;
            }
            let mut e = enc.encode_descriptor(
                "replica_dirty_bytes",
                "Bytes a replica misses",
                None,
                MetricType::Gauge,
            )?;
            for v in state.volumes.values().filter(|v| m.is_primary_here(&v.name)) {
                for r in v.replicas.iter().filter(|r| !v.in_sync.contains(r)) {
                    let b = m.storage().dirty_bytes(&v.name, r) as i64;
                    ConstGauge::new(b)
                        .encode(e.encode_family(&[("volume", v.name.as_str()), ("replica", r.as_str())])?)?;
                }
            }
        }
        Ok(())
    }
}

pub fn register(reg: &SharedRegistry, quorum: Quorum, manager: Option<Arc<VolumeManager>>) {
    reg.lock().expect("metrics registry poisoned").register_collector(Box::new(Metrics { quorum, manager }));
}
