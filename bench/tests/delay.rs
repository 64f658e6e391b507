//! The delay injector really adds the configured RTT (root + iptables needed).
//! Uses 127.250.1.0/24 <-> 127.250.2.0/24, which no lab uses.
//!
//! Every bound is checked on the fastest of 15 handshakes. The delayer's
//! invariant is "never early", so even the fastest must be at least the set
//! RTT; and a busy machine only ever adds time, so the fastest is also the one
//! that shows a delayer adding too much (say, delaying a packet twice).

use metro_bench::delay::{measure_rtt, Delay};
use std::net::Ipv4Addr;
use std::path::Path;

#[test]
fn injected_rtt_is_measured_between_the_two_subnets_and_gone_after_removal() {
    let bin = Path::new(env!("CARGO_BIN_EXE_metro-delay")).parent().unwrap().to_path_buf();
    let a = Ipv4Addr::new(127, 250, 1, 200);
    let b = Ipv4Addr::new(127, 250, 2, 200);
    let before = measure_rtt(a, b).unwrap();
    assert!(before.min_ms < 2.0, "loopback RTT without delay is {before:?}");
    for rtt in [1.0, 10.0] {
        let d = Delay::install(&bin, 9250, &["127.250.1.0/24"], &["127.250.2.0/24"], rtt).unwrap();
        let got = measure_rtt(a, b).unwrap();
        eprintln!("set {rtt} ms, measured {got:?}");
        assert!(got.min_ms >= rtt * 0.95, "never early: set {rtt} ms, measured {got:?}");
        assert!(got.min_ms < rtt * 1.5 + 1.0, "not added twice: set {rtt} ms, measured {got:?}");
        // Traffic outside the two subnets is untouched.
        let other = measure_rtt(Ipv4Addr::new(127, 250, 3, 200), b).unwrap();
        assert!(other.min_ms < 2.0, "unrelated pair got {other:?}");
        d.remove().unwrap();
    }
    let after = measure_rtt(a, b).unwrap();
    assert!(after.min_ms < 2.0, "delay still present after removal: {after:?}");
}
