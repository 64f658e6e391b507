//! The agent's metrics: per volume, reconnects, re-sent requests, requests
//! failed after a hold, the stall of every hold (a histogram), whether it is
//! holding now, and the current upstream.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use crate::agent::Agent;

type Labels = Vec<(String, String)>;

/// Register the agent's metrics in `registry` and keep them current.
pub fn spawn(agent: Arc<Agent>, registry: metro_api::telemetry::SharedRegistry) {
    let reconnects = Family::<Labels, Counter>::default();
    let resent = Family::<Labels, Counter>::default();
    let failed = Family::<Labels, Counter>::default();
    let holding = Family::<Labels, Gauge>::default();
    let upstream = Family::<Labels, Gauge>::default();
    let stalls = Family::<Labels, Histogram>::new_with_constructor(|| {
        Histogram::new([0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0])
    });
    {
        let mut r = registry.lock().expect("poisoned");
        r.register("attach_reconnects", "Upstream connections made after a hold", reconnects.clone());
        r.register("attach_resent_requests", "Requests re-sent to a new upstream", resent.clone());
        r.register("attach_failed_after_hold", "Requests failed with EIO after a whole hold", failed.clone());
        r.register("attach_holding", "1 while the volume's requests are held (no upstream)", holding.clone());
        r.register("attach_upstream_info", "The current upstream (label `upstream`)", upstream.clone());
        r.register("attach_stall_seconds", "How long each hold lasted", stalls.clone());
    }
    tokio::spawn(async move {
        let mut seen: std::collections::HashMap<String, (u64, u64, u64, usize, String)> = Default::default();
        loop {
            for f in agent.followers() {
                let v = f.volume().to_string();
                let l: Labels = vec![("volume".into(), v.clone())];
                let s = &f.stats;
                let now = (
                    s.reconnects.load(Ordering::Relaxed),
                    s.resent.load(Ordering::Relaxed),
                    s.failed_after_hold.load(Ordering::Relaxed),
                );
                let e = seen.entry(v.clone()).or_default();
                reconnects.get_or_create(&l).inc_by(now.0.saturating_sub(e.0));
                resent.get_or_create(&l).inc_by(now.1.saturating_sub(e.1));
                failed.get_or_create(&l).inc_by(now.2.saturating_sub(e.2));
                (e.0, e.1, e.2) = now;
                let st = s.stalls.lock().expect("poisoned").clone();
                let h = stalls.get_or_create(&l);
                for x in st.iter().skip(e.3.min(st.len())) {
                    h.observe(*x);
                }
                e.3 = st.len();
                holding.get_or_create(&l).set(s.holding.load(Ordering::Relaxed) as i64);
                let up = s.primary.lock().expect("poisoned").clone();
                if up != e.4 {
                    if !e.4.is_empty() {
                        upstream
                            .get_or_create(&vec![
                                ("volume".into(), v.clone()),
                                ("upstream".into(), e.4.clone()),
                            ])
                            .set(0);
                    }
                    upstream
                        .get_or_create(&vec![("volume".into(), v.clone()), ("upstream".into(), up.clone())])
                        .set(1);
                    e.4 = up;
                }
            }
            agent.save();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}
