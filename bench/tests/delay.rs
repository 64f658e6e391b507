//! The delay injector really adds the configured RTT (root + iptables needed).
//! Uses 127.250.1.0/24 <-> 127.250.2.0/24, which no lab uses.

use metro_bench::delay::{measure_rtt_ms, Delay};
use std::net::Ipv4Addr;
use std::path::Path;

#[test]
fn injected_rtt_is_measured_between_the_two_subnets_and_gone_after_removal() {
    let bin = Path::new(env!("CARGO_BIN_EXE_metro-delay")).parent().unwrap().to_path_buf();
    let a = Ipv4Addr::new(127, 250, 1, 200);
    let b = Ipv4Addr::new(127, 250, 2, 200);
    let before = measure_rtt_ms(a, b).unwrap();
    assert!(before < 2.0, "loopback RTT without delay is {before} ms");
    for rtt in [1.0, 10.0] {
        let d = Delay::install(&bin, 9250, &["127.250.1.0/24"], &["127.250.2.0/24"], rtt).unwrap();
        let got = measure_rtt_ms(a, b).unwrap();
        // A busy 2-core machine adds scheduling delay; never less than set.
        assert!(got >= rtt * 0.95 && got < rtt + 5.0, "set {rtt} ms, measured {got} ms");
        // Traffic outside the two subnets is untouched.
        let other = measure_rtt_ms(Ipv4Addr::new(127, 250, 3, 200), b).unwrap();
        assert!(other < 2.0, "unrelated pair got {other} ms");
        d.remove().unwrap();
    }
    let after = measure_rtt_ms(a, b).unwrap();
    assert!(after < 2.0, "delay still present after removal: {after} ms");
}
