//! `inspect flows`: one row per flow (forward entry joined with its reverse entry), its state,
//! the filters, and the table (pure).

use std::{
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use proxy_common::{
    FLOW_F_FIN_CLIENT, FLOW_F_FIN_UPSTREAM, FLOW_F_FIN_UPSTREAM_FIRST, FLOW_F_REPLIED, FLOW_F_RST,
    FLOW_F_SYN_RECEIVED, IPPROTO_TCP,
};
use serde::Serialize;

use super::{
    meta::Names,
    render::{Align, Table, bytes, count, duration},
};
use crate::{config::Protocol, datapath::FlowEntry};

/// A flow's state as the datapath saw it (union of both entries' flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum FlowState {
    /// TCP: handshake not complete (SYN sent, or SYN-ACK seen but not yet acknowledged by the
    /// client); UDP: nothing back yet.
    Syn,
    /// Replied (TCP: handshake complete), no FIN or RST.
    Established,
    /// TCP: FIN from one side.
    Fin,
    /// TCP: FIN from both sides, or RST (the SNAT port is held through TIME_WAIT when the
    /// upstream closed first, else for a short grace).
    Closed,
}

impl FlowState {
    #[must_use]
    pub fn of(proto: u8, flags: u32) -> Self {
        let both_fin = FLOW_F_FIN_CLIENT | FLOW_F_FIN_UPSTREAM;
        if proto == IPPROTO_TCP && (flags & FLOW_F_RST != 0 || flags & both_fin == both_fin) {
            Self::Closed
        } else if proto == IPPROTO_TCP && flags & both_fin != 0 {
            Self::Fin
        } else if flags & FLOW_F_REPLIED != 0
            && (proto != IPPROTO_TCP || flags & FLOW_F_SYN_RECEIVED == 0)
        {
            Self::Established
        } else {
            Self::Syn
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Syn => "syn",
            Self::Established => "established",
            Self::Fin => "fin",
            Self::Closed => "closed",
        }
    }
}

/// Flag names of a flow.
#[must_use]
pub fn flag_names(flags: u32) -> Vec<&'static str> {
    [
        (FLOW_F_REPLIED, "replied"),
        (FLOW_F_FIN_CLIENT, "fin_client"),
        (FLOW_F_FIN_UPSTREAM, "fin_upstream"),
        (FLOW_F_RST, "rst"),
        (FLOW_F_SYN_RECEIVED, "syn_received"),
        (FLOW_F_FIN_UPSTREAM_FIRST, "fin_upstream_first"),
    ]
    .iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, n)| *n)
    .collect()
}

/// An endpoint of a flow entry: both entries of a flow and their rewrites are of the key's
/// family (no NAT64).
fn ep(addr: &[u8; 16], port: [u8; 2], family: u8) -> SocketAddr {
    SocketAddr::new(crate::plan::ip_of(addr, family), u16::from_be_bytes(port))
}

#[expect(clippy::cast_precision_loss, reason = "seconds for display")]
fn secs(ns: u64) -> f64 {
    (ns / 1_000_000) as f64 / 1000.0
}

/// One flow, typed (the filters match on this).
#[derive(Clone, Debug, PartialEq)]
pub struct Flow {
    pub proto: u8,
    pub client: SocketAddr,
    pub service: SocketAddr,
    pub upstream: SocketAddr,
    pub snat: SocketAddr,
    pub service_id: u32,
    pub upstream_id: u32,
    pub flags: u32,
    pub state: FlowState,
    pub created_ns: u64,
    pub age_s: f64,
    pub idle_s: f64,
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    pub rev_packets: u64,
    pub rev_bytes: u64,
    pub has_reverse: bool,
}

impl Flow {
    /// From a forward entry and its reverse entry, at `now_ns` (CLOCK_MONOTONIC).
    #[must_use]
    pub fn from_entry(e: &FlowEntry, now_ns: u64) -> Self {
        let (rev_p, rev_b, rev_seen, rev_flags) = e.rev.map_or((0, 0, 0, 0), |r| {
            (r.packets, r.bytes, r.last_seen_ns, r.flags)
        });
        let flags = e.fwd.flags | rev_flags;
        Self {
            proto: e.key.proto,
            client: ep(&e.key.src_addr, e.key.src_port, e.key.family),
            service: ep(&e.key.dst_addr, e.key.dst_port, e.key.family),
            upstream: ep(&e.fwd.new_dst_addr, e.fwd.new_dst_port, e.key.family),
            snat: ep(&e.fwd.new_src_addr, e.fwd.new_src_port, e.key.family),
            service_id: e.fwd.service_id,
            upstream_id: e.fwd.upstream_id,
            flags,
            state: FlowState::of(e.key.proto, flags),
            created_ns: e.fwd.created_ns,
            age_s: secs(now_ns.saturating_sub(e.fwd.created_ns)),
            idle_s: secs(now_ns.saturating_sub(e.fwd.last_seen_ns.max(rev_seen))),
            fwd_packets: e.fwd.packets,
            fwd_bytes: e.fwd.bytes,
            rev_packets: rev_p,
            rev_bytes: rev_b,
            has_reverse: e.rev.is_some(),
        }
    }

    fn proto_name(&self) -> String {
        Protocol::from_number(self.proto)
            .map_or_else(|| self.proto.to_string(), |p| p.name().to_owned())
    }
}

// ---------------------------------------------------------------------------------------------
// Filters.
// ---------------------------------------------------------------------------------------------

/// `--service NAME|ID`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceSel {
    Id(u32),
    Name(String),
}

impl FromStr for ServiceSel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("empty service".into());
        }
        Ok(s.parse::<u32>()
            .map_or_else(|_| Self::Name(s.to_owned()), Self::Id))
    }
}

impl std::fmt::Display for ServiceSel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Id(id) => write!(f, "id {id}"),
            Self::Name(n) => write!(f, "`{n}`"),
        }
    }
}

impl ServiceSel {
    /// The service id, resolving a name through the daemon's metadata.
    ///
    /// # Errors
    /// Unknown name (the message lists the known ones, or says the metadata is missing).
    pub fn resolve(&self, names: &Names) -> Result<u32, String> {
        match self {
            Self::Id(id) => Ok(*id),
            Self::Name(n) => names.service_id(n).ok_or_else(|| {
                if names.services.is_empty() {
                    format!(
                        "no service named `{n}`: names come from the daemon's metadata file, \
                         which is missing; give the service id instead (`inspect services`)"
                    )
                } else {
                    let known: Vec<String> = names
                        .services
                        .iter()
                        .map(|(id, n)| format!("{n} ({id})"))
                        .collect();
                    format!("no service named `{n}`; known: {}", known.join(", "))
                }
            }),
        }
    }
}

/// `--client ADDR`, `ADDR:PORT` or `ADDR/PREFIX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientSel {
    Addr(IpAddr),
    Exact(SocketAddr),
    Cidr(crate::config::IpCidr),
}

impl FromStr for ClientSel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.contains('/') {
            return s.parse::<crate::config::IpCidr>().map(Self::Cidr);
        }
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(Self::Exact(sa));
        }
        s.parse::<IpAddr>()
            .map(Self::Addr)
            .map_err(|_| format!("`{s}`: want an ADDR, ADDR:PORT ([v6]:PORT) or ADDR/PREFIX"))
    }
}

impl ClientSel {
    #[must_use]
    pub fn matches(&self, c: SocketAddr) -> bool {
        match *self {
            Self::Addr(a) => c.ip() == a,
            Self::Exact(sa) => c == sa,
            Self::Cidr(net) => net.contains(c.ip()),
        }
    }
}

/// `--upstream ADDR[:PORT]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpstreamSel {
    pub addr: IpAddr,
    pub port: Option<u16>,
}

impl FromStr for UpstreamSel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(Self {
                addr: sa.ip(),
                port: Some(sa.port()),
            });
        }
        s.parse::<IpAddr>()
            .map(|addr| Self { addr, port: None })
            .map_err(|_| format!("`{s}`: want an ADDR or ADDR:PORT ([v6]:PORT)"))
    }
}

/// Every filter of `inspect flows` (all must match).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowFilter {
    pub service_id: Option<u32>,
    pub client: Option<ClientSel>,
    pub upstream: Option<UpstreamSel>,
    pub state: Option<FlowState>,
}

impl FlowFilter {
    #[must_use]
    pub fn matches(&self, f: &Flow) -> bool {
        self.service_id.is_none_or(|id| f.service_id == id)
            && self.client.is_none_or(|c| c.matches(f.client))
            && self.upstream.is_none_or(|u| {
                f.upstream.ip() == u.addr && u.port.is_none_or(|p| f.upstream.port() == p)
            })
            && self.state.is_none_or(|s| f.state == s)
    }
}

// ---------------------------------------------------------------------------------------------
// The report.
// ---------------------------------------------------------------------------------------------

/// One flow in `inspect flows --json` (docs/inspect-json.md).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlowRow {
    pub proto: String,
    pub client: String,
    pub service: String,
    pub service_id: u32,
    pub service_name: Option<String>,
    pub upstream: String,
    pub upstream_id: u32,
    pub snat: String,
    pub snat_port: u16,
    pub state: FlowState,
    pub flags: Vec<&'static str>,
    pub age_s: f64,
    pub idle_s: f64,
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    pub rev_packets: u64,
    pub rev_bytes: u64,
    pub has_reverse: bool,
}

/// `inspect flows --json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlowsReport {
    pub schema_version: u32,
    pub kind: &'static str,
    /// Flows read from the table (forward entries).
    pub scanned: usize,
    /// Flows that matched the filters.
    pub matched: usize,
    /// Rows listed (`matched` cut to `--limit`).
    pub flows: Vec<FlowRow>,
}

/// Filter, sort oldest first, cut to `limit`.
#[must_use]
pub fn build(
    entries: &[FlowEntry],
    now_ns: u64,
    filter: &FlowFilter,
    limit: Option<usize>,
    names: &Names,
) -> FlowsReport {
    let mut flows: Vec<Flow> = entries
        .iter()
        .map(|e| Flow::from_entry(e, now_ns))
        .filter(|f| filter.matches(f))
        .collect();
    flows.sort_by_key(|f| (f.created_ns, f.client.ip(), f.client.port()));
    let matched = flows.len();
    flows.truncate(limit.unwrap_or(usize::MAX));
    FlowsReport {
        schema_version: super::SCHEMA_VERSION,
        kind: "flows",
        scanned: entries.len(),
        matched,
        flows: flows
            .iter()
            .map(|f| FlowRow {
                proto: f.proto_name(),
                client: f.client.to_string(),
                service: f.service.to_string(),
                service_id: f.service_id,
                service_name: names.service(f.service_id).map(str::to_owned),
                upstream: f.upstream.to_string(),
                upstream_id: f.upstream_id,
                snat: f.snat.ip().to_string(),
                snat_port: f.snat.port(),
                state: f.state,
                flags: flag_names(f.flags),
                age_s: f.age_s,
                idle_s: f.idle_s,
                fwd_packets: f.fwd_packets,
                fwd_bytes: f.fwd_bytes,
                rev_packets: f.rev_packets,
                rev_bytes: f.rev_bytes,
                has_reverse: f.has_reverse,
            })
            .collect(),
    }
}

/// Human table of flows, with a summary line.
#[must_use]
pub fn render(r: &FlowsReport) -> String {
    let mut t = Table::new(&[
        ("PROTO", Align::Left),
        ("CLIENT", Align::Left),
        ("SERVICE", Align::Left),
        ("UPSTREAM", Align::Left),
        ("SNAT PORT", Align::Right),
        ("STATE", Align::Left),
        ("AGE", Align::Right),
        ("IDLE", Align::Right),
        ("PKTS FWD/REV", Align::Right),
        ("BYTES FWD/REV", Align::Right),
    ]);
    for f in &r.flows {
        let service = f.service_name.as_ref().map_or_else(
            || format!("#{} {}", f.service_id, f.service),
            |n| format!("{n} {}", f.service),
        );
        let mut state = f.state.name().to_owned();
        if !f.has_reverse {
            state.push_str(" (no reverse)");
        }
        t.row(vec![
            f.proto.clone(),
            f.client.clone(),
            service,
            f.upstream.clone(),
            f.snat_port.to_string(),
            state,
            duration(f.age_s),
            duration(f.idle_s),
            format!("{}/{}", count(f.fwd_packets), count(f.rev_packets)),
            format!("{} / {}", bytes(f.fwd_bytes), bytes(f.rev_bytes)),
        ]);
    }
    let mut out = t.render();
    let shown = r.flows.len();
    out.push_str(&if shown == r.matched {
        format!("{shown} flows (of {} in the table)\n", r.scanned)
    } else {
        format!(
            "{shown} of {} matching flows shown (--limit; {} in the table)\n",
            r.matched, r.scanned
        )
    });
    out
}

#[cfg(test)]
mod tests {
    use proxy_common::{FAMILY_IPV4, FlowKey, FlowValue, IPPROTO_UDP, addr_v4};

    use super::*;

    fn entry(client: [u8; 4], cport: u16, proto: u8, created_s: u64, flags: u32) -> FlowEntry {
        let key = FlowKey {
            src_addr: addr_v4(client),
            dst_addr: addr_v4([10, 10, 1, 1]),
            src_port: cport.to_be_bytes(),
            dst_port: 80u16.to_be_bytes(),
            proto,
            family: FAMILY_IPV4,
            _pad: [0; 2],
        };
        let fwd = FlowValue {
            new_src_addr: addr_v4([10, 20, 1, 1]),
            new_dst_addr: addr_v4([10, 20, 1, 2]),
            new_src_port: 12000u16.to_be_bytes(),
            new_dst_port: 8080u16.to_be_bytes(),
            flags,
            service_id: 1,
            upstream_id: 2,
            created_ns: created_s * 1_000_000_000,
            last_seen_ns: (created_s + 1) * 1_000_000_000,
            packets: 3,
            bytes: 180,
            ..FlowValue::default()
        };
        let rev = FlowValue {
            last_seen_ns: (created_s + 2) * 1_000_000_000,
            packets: 2,
            bytes: 2_000_000,
            ..fwd
        };
        FlowEntry {
            key,
            fwd,
            rev: Some(rev),
        }
    }

    #[test]
    fn states() {
        assert_eq!(FlowState::of(IPPROTO_TCP, 0), FlowState::Syn);
        assert_eq!(
            FlowState::of(IPPROTO_TCP, FLOW_F_REPLIED),
            FlowState::Established
        );
        assert_eq!(
            FlowState::of(IPPROTO_TCP, FLOW_F_REPLIED | FLOW_F_FIN_CLIENT),
            FlowState::Fin
        );
        assert_eq!(
            FlowState::of(IPPROTO_TCP, FLOW_F_FIN_CLIENT | FLOW_F_FIN_UPSTREAM),
            FlowState::Closed
        );
        assert_eq!(FlowState::of(IPPROTO_TCP, FLOW_F_RST), FlowState::Closed);
        assert_eq!(
            FlowState::of(IPPROTO_TCP, FLOW_F_REPLIED | FLOW_F_SYN_RECEIVED),
            FlowState::Syn,
            "a SYN-ACK without the client's ACK is not established"
        );
        assert_eq!(
            FlowState::of(IPPROTO_UDP, FLOW_F_REPLIED),
            FlowState::Established
        );
        assert_eq!(FlowState::of(IPPROTO_UDP, 0), FlowState::Syn);
    }

    #[test]
    fn selectors_parse_and_match() {
        let c = |s: &str| s.parse::<ClientSel>().unwrap();
        let a = SocketAddr::from((std::net::Ipv4Addr::new(10, 0, 0, 9), 4000));
        assert!(c("10.0.0.9").matches(a));
        assert!(c("10.0.0.9:4000").matches(a));
        assert!(!c("10.0.0.9:4001").matches(a));
        assert!(c("10.0.0.0/24").matches(a));
        assert!(!c("10.0.1.0/24").matches(a));
        assert!(c("0.0.0.0/0").matches(a));
        assert!(c("10.0.0.9/32").matches(a));
        assert!("10.0.0.0/33".parse::<ClientSel>().is_err());
        assert!("web".parse::<ClientSel>().is_err());
        // IPv6 clients: [addr]:port, addr, prefix; an IPv4 prefix never matches them.
        let b: SocketAddr = "[fd00:10::2]:4000".parse().unwrap();
        assert!(c("[fd00:10::2]:4000").matches(b));
        assert!(c("fd00:10::2").matches(b));
        assert!(c("fd00:10::/64").matches(b));
        assert!(!c("fd00:11::/64").matches(b));
        assert!(!c("0.0.0.0/0").matches(b));
        assert!(!c("::/0").matches(a));
        assert_eq!(
            "10.20.1.2".parse::<UpstreamSel>().unwrap(),
            UpstreamSel {
                addr: std::net::Ipv4Addr::new(10, 20, 1, 2).into(),
                port: None
            }
        );
        assert_eq!(
            "[fd00:20::2]:80".parse::<UpstreamSel>().unwrap(),
            UpstreamSel {
                addr: "fd00:20::2".parse().unwrap(),
                port: Some(80)
            }
        );
        assert_eq!(
            "10.20.1.2:8080".parse::<UpstreamSel>().unwrap().port,
            Some(8080)
        );
        assert_eq!("3".parse::<ServiceSel>().unwrap(), ServiceSel::Id(3));
        assert_eq!(
            "web".parse::<ServiceSel>().unwrap(),
            ServiceSel::Name("web".into())
        );
        let mut names = Names::default();
        let err = ServiceSel::Name("web".into()).resolve(&names).unwrap_err();
        assert!(err.contains("metadata file, which is missing"), "{err}");
        names.services.insert(4, "web".into());
        assert_eq!(ServiceSel::Name("web".into()).resolve(&names), Ok(4));
        let err = ServiceSel::Name("db".into()).resolve(&names).unwrap_err();
        assert!(err.contains("known: web (4)"), "{err}");
    }

    #[test]
    fn filters_sort_limit_and_join() {
        let entries = [
            entry([10, 0, 0, 1], 40001, IPPROTO_TCP, 30, FLOW_F_REPLIED),
            entry([10, 0, 0, 2], 40002, IPPROTO_TCP, 10, 0),
            entry([10, 0, 1, 3], 40003, IPPROTO_TCP, 20, FLOW_F_RST),
        ];
        let names = Names::default();
        let all = build(
            &entries,
            100_000_000_000,
            &FlowFilter::default(),
            None,
            &names,
        );
        assert_eq!((all.scanned, all.matched, all.flows.len()), (3, 3, 3));
        let clients: Vec<&str> = all.flows.iter().map(|f| f.client.as_str()).collect();
        assert_eq!(
            clients,
            ["10.0.0.2:40002", "10.0.1.3:40003", "10.0.0.1:40001"]
        );
        let f = &all.flows[2];
        assert_eq!(
            (f.fwd_packets, f.rev_packets, f.rev_bytes),
            (3, 2, 2_000_000)
        );
        assert!((f.age_s - 70.0).abs() < 1e-9 && (f.idle_s - 68.0).abs() < 1e-9);
        assert_eq!(f.snat_port, 12000);

        let filter = FlowFilter {
            client: Some("10.0.0.0/24".parse().unwrap()),
            ..FlowFilter::default()
        };
        let r = build(&entries, 100_000_000_000, &filter, Some(1), &names);
        assert_eq!((r.matched, r.flows.len()), (2, 1));
        assert_eq!(r.flows[0].client, "10.0.0.2:40002");
        let filter = FlowFilter {
            state: Some(FlowState::Closed),
            upstream: Some("10.20.1.2:8080".parse().unwrap()),
            service_id: Some(1),
            ..FlowFilter::default()
        };
        let r = build(&entries, 100_000_000_000, &filter, None, &names);
        assert_eq!(r.flows.len(), 1);
        assert_eq!(r.flows[0].flags, ["rst"]);
        let filter = FlowFilter {
            upstream: Some("10.20.1.2:9".parse().unwrap()),
            ..FlowFilter::default()
        };
        assert_eq!(build(&entries, 0, &filter, None, &names).matched, 0);
        let filter = FlowFilter {
            service_id: Some(2),
            ..FlowFilter::default()
        };
        assert_eq!(build(&entries, 0, &filter, None, &names).matched, 0);
    }

    #[test]
    fn table_snapshot() {
        let mut e = entry([10, 0, 0, 1], 40001, IPPROTO_TCP, 30, FLOW_F_REPLIED);
        let mut names = Names::default();
        names.services.insert(1, "web".into());
        let mut orphan = entry([10, 0, 0, 2], 5353, IPPROTO_UDP, 99, 0);
        orphan.rev = None;
        orphan.fwd.service_id = 7;
        e.fwd.packets = 12_345;
        let r = build(
            &[e, orphan],
            100_000_000_000,
            &FlowFilter::default(),
            None,
            &names,
        );
        assert_eq!(
            render(&r),
            "\
PROTO  CLIENT          SERVICE           UPSTREAM        SNAT PORT  STATE               AGE   IDLE  PKTS FWD/REV    BYTES FWD/REV
tcp    10.0.0.1:40001  web 10.10.1.1:80  10.20.1.2:8080      12000  established       1m10s  1m08s       12.3K/2  180 B / 1.9 MiB
udp    10.0.0.2:5353   #7 10.10.1.1:80   10.20.1.2:8080      12000  syn (no reverse)   1.0s   0.0s           3/0      180 B / 0 B
2 flows (of 2 in the table)
"
        );
        let r = build(
            &[e],
            100_000_000_000,
            &FlowFilter::default(),
            Some(0),
            &names,
        );
        assert!(render(&r).ends_with("0 of 1 matching flows shown (--limit; 1 in the table)\n"));
    }
}
