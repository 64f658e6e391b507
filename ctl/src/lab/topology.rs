//! The fixed lab topology: sites, daemons, names and addresses. Pure data, no IO.
//!
//! ```text
//!                 metro-sw (bridge br0)            host root ns: metro-host 10.77.0.1/16
//!        ┌───────────────┼────────────────┐
//!   dc-a 10.77.1.0/24   dc-b 10.77.2.0/24   witness 10.77.3.0/24
//!   etcd-a .10          etcd-b .10          etcd-w .10
//!   a1 .11  a2 .12      b1 .11  b2 .12      w1 .11
//! ```
//!
//! Loopback mode uses the same plan on `127.77.S.H` in the root namespace.
//! Invariants: a site is exactly one /24 (so a partition is two drop rules);
//! every daemon has its own address, so ports never collide.

use super::NetMode;
use std::net::Ipv4Addr;

pub const CLUSTER: &str = "lab";
pub const PORT_API: u16 = 7443;
pub const PORT_NBD: u16 = 10809;
pub const PORT_REPL: u16 = 7444;
pub const PORT_METRICS: u16 = 9100;
pub const PORT_ETCD_CLIENT: u16 = 2379;
pub const PORT_ETCD_PEER: u16 = 2380;
/// Namespace holding the bridge every daemon namespace plugs into.
pub const SWITCH_NS: &str = "metro-sw";
pub const BRIDGE: &str = "br0";
/// Host end of the host<->switch veth pair.
pub const HOST_VETH: &str = "metro-host";
/// nft table for partitions (bridge family in the switch ns, inet in loopback mode).
pub const NFT_TABLE: &str = "metro_lab";
/// Prefix length of the lab network in netns mode.
pub const NET_PREFIX: u8 = 16;

/// What a daemon is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Storage,
    Witness,
    Etcd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteDef {
    pub name: &'static str,
    pub data: bool,
    /// Third octet of the site's /24.
    pub octet: u8,
}

pub const SITES: [SiteDef; 3] = [
    SiteDef { name: "dc-a", data: true, octet: 1 },
    SiteDef { name: "dc-b", data: true, octet: 2 },
    SiteDef { name: "witness", data: false, octet: 3 },
];

/// One process of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DaemonDef {
    pub id: &'static str,
    pub site: &'static str,
    pub kind: Kind,
    /// Last octet of its address.
    pub host: u8,
}

pub const DAEMONS: [DaemonDef; 8] = [
    DaemonDef { id: "etcd-a", site: "dc-a", kind: Kind::Etcd, host: 10 },
    DaemonDef { id: "etcd-b", site: "dc-b", kind: Kind::Etcd, host: 10 },
    DaemonDef { id: "etcd-w", site: "witness", kind: Kind::Etcd, host: 10 },
    DaemonDef { id: "a1", site: "dc-a", kind: Kind::Storage, host: 11 },
    DaemonDef { id: "a2", site: "dc-a", kind: Kind::Storage, host: 12 },
    DaemonDef { id: "b1", site: "dc-b", kind: Kind::Storage, host: 11 },
    DaemonDef { id: "b2", site: "dc-b", kind: Kind::Storage, host: 12 },
    DaemonDef { id: "w1", site: "witness", kind: Kind::Witness, host: 11 },
];

pub fn site(name: &str) -> Option<&'static SiteDef> {
    SITES.iter().find(|s| s.name == name)
}

pub fn daemon(id: &str) -> Option<&'static DaemonDef> {
    DAEMONS.iter().find(|d| d.id == id)
}

/// First two octets of the netns lab network.
pub const NETNS_BASE: [u8; 2] = [10, 77];
/// Default second octet of the loopback lab (127.77.S.H).
pub const DEFAULT_LOOPBACK_OCTET: u8 = 77;

/// First two octets of the lab network: 10.77 (netns) or 127.`loopback_octet`.
pub fn base(mode: NetMode, loopback_octet: u8) -> [u8; 2] {
    match mode {
        NetMode::Loopback => [127, loopback_octet],
        _ => NETNS_BASE,
    }
}

/// Name of the partition table: the default lab's is `metro_lab`; a loopback
/// lab on another octet gets its own, so two such labs never heal each other.
pub fn nft_table(mode: NetMode, loopback_octet: u8) -> String {
    if mode == NetMode::Loopback && loopback_octet != DEFAULT_LOOPBACK_OCTET {
        format!("{NFT_TABLE}_{loopback_octet}")
    } else {
        NFT_TABLE.to_string()
    }
}

pub fn address(base: [u8; 2], d: &DaemonDef) -> Ipv4Addr {
    let [a, b] = base;
    let s = site(d.site).expect("daemon in a known site");
    Ipv4Addr::new(a, b, s.octet, d.host)
}

/// The host's own address on the lab network (netns mode).
pub fn host_address() -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 1)
}

/// The /24 of a site, e.g. `10.77.1.0/24`.
pub fn site_subnet(base: [u8; 2], s: &SiteDef) -> String {
    let [a, b] = base;
    format!("{a}.{b}.{}.0/24", s.octet)
}

/// Name of a daemon's network namespace.
pub fn netns(id: &str) -> String {
    format!("metro-{id}")
}

/// Every namespace the netns lab creates (switch first).
pub fn all_netns() -> Vec<String> {
    std::iter::once(SWITCH_NS.to_string()).chain(DAEMONS.iter().map(|d| netns(d.id))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_daemon_has_a_distinct_address_inside_its_sites_subnet() {
        for mode in [NetMode::Netns, NetMode::Loopback] {
            let mut seen = std::collections::BTreeSet::new();
            for d in &DAEMONS {
                let a = address(base(mode, 78), d);
                assert!(seen.insert(a), "{a} twice");
                let net = site_subnet(base(mode, 78), site(d.site).unwrap());
                let prefix = net.trim_end_matches("0/24");
                assert!(a.to_string().starts_with(prefix), "{a} not in {net}");
            }
        }
    }

    #[test]
    fn each_site_has_one_etcd_member_and_namespaces_fit_interface_limits() {
        for s in &SITES {
            assert_eq!(DAEMONS.iter().filter(|d| d.site == s.name && d.kind == Kind::Etcd).count(), 1);
        }
        // The switch-side veth is `v-<id>`; Linux interface names are at most 15 bytes.
        assert!(DAEMONS.iter().all(|d| format!("v-{}", d.id).len() <= 15));
        assert_eq!(all_netns().len(), 9);
        assert_eq!(netns("a1"), "metro-a1");
    }
}
