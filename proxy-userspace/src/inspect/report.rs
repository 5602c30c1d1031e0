//! `xdp-proxy inspect`: reports built from the pinned maps (pure builders and renderers; the
//! map reads are in `datapath`). JSON field names are stable: scripts and the integration tests
//! read them.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
};

use proxy_common::{
    FLOW_F_FIN_CLIENT, FLOW_F_FIN_UPSTREAM, FLOW_F_REPLIED, FLOW_F_RST, Reason, ServiceKey,
    ServiceValue, TrafficCounters, UpstreamValue, addr_v4_octets,
};
use serde::{Serialize, ser::SerializeMap};

use crate::{config::Protocol, datapath::FlowEntry, plan::upstream_addr};

/// Reason counters in index order, serialized as `{name: packets}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reasons(pub Vec<(&'static str, u64)>);

impl Serialize for Reasons {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// One service's counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceStats {
    pub id: u32,
    /// `addr:port`; null for an id with counters but no service any more.
    pub listen: Option<String>,
    /// `tcp` / `udp`; null like `listen`.
    pub proto: Option<&'static str>,
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    pub rev_packets: u64,
    pub rev_bytes: u64,
    pub new_flows: u64,
}

/// One upstream's counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UpstreamStats {
    pub id: u32,
    /// `addr:port`; null for an id with counters but no active slot any more.
    pub addr: Option<String>,
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    pub rev_packets: u64,
    pub rev_bytes: u64,
    pub new_flows: u64,
}

/// `inspect stats`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatsReport {
    pub reasons: Reasons,
    pub services: Vec<ServiceStats>,
    pub upstreams: Vec<UpstreamStats>,
}

fn is_zero(c: &TrafficCounters) -> bool {
    *c == TrafficCounters::default()
}

fn service_listen(k: &ServiceKey) -> String {
    SocketAddrV4::new(
        Ipv4Addr::from(addr_v4_octets(&k.addr)),
        u16::from_be_bytes(k.port),
    )
    .to_string()
}

/// Build the stats report. Services: every entry of `XP_SERVICES`, plus ids that still have
/// counters; upstreams likewise with the active slots. Both sorted by id.
#[must_use]
pub fn build_stats(
    reasons: &[(Reason, u64)],
    services: &[(ServiceKey, ServiceValue)],
    upstreams: &[(u32, UpstreamValue)],
    service_counters: &[(u32, TrafficCounters)],
    upstream_counters: &[(u32, TrafficCounters)],
) -> StatsReport {
    let reasons = Reasons(reasons.iter().map(|(r, n)| (r.name(), *n)).collect());
    let mut svc: Vec<ServiceStats> = service_counters
        .iter()
        .filter_map(|(id, c)| {
            let entry = services.iter().find(|(_, v)| v.id == *id);
            if entry.is_none() && is_zero(c) {
                return None;
            }
            Some(ServiceStats {
                id: *id,
                listen: entry.map(|(k, _)| service_listen(k)),
                proto: entry.and_then(|(k, _)| Protocol::from_number(k.proto).map(Protocol::name)),
                fwd_packets: c.fwd_packets,
                fwd_bytes: c.fwd_bytes,
                rev_packets: c.rev_packets,
                rev_bytes: c.rev_bytes,
                new_flows: c.new_flows,
            })
        })
        .collect();
    svc.sort_by_key(|s| s.id);
    let mut ups: Vec<UpstreamStats> = upstream_counters
        .iter()
        .filter_map(|(id, c)| {
            let slot = upstreams.iter().find(|(i, _)| i == id);
            if slot.is_none() && is_zero(c) {
                return None;
            }
            Some(UpstreamStats {
                id: *id,
                addr: slot.map(|(_, v)| upstream_addr(v).to_string()),
                fwd_packets: c.fwd_packets,
                fwd_bytes: c.fwd_bytes,
                rev_packets: c.rev_packets,
                rev_bytes: c.rev_bytes,
                new_flows: c.new_flows,
            })
        })
        .collect();
    ups.sort_by_key(|u| u.id);
    StatsReport {
        reasons,
        services: svc,
        upstreams: ups,
    }
}

/// Human tables.
#[must_use]
pub fn render_stats(r: &StatsReport) -> String {
    let mut out = String::new();
    let w = r
        .reasons
        .0
        .iter()
        .map(|(n, _)| n.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let _ = writeln!(out, "{:<w$}  {:>14}", "REASON", "PACKETS");
    for (name, n) in &r.reasons.0 {
        let _ = writeln!(out, "{name:<w$}  {n:>14}");
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:>4}  {:<21}  {:<5}  {:>12}  {:>14}  {:>12}  {:>14}  {:>10}",
        "SVC", "LISTEN", "PROTO", "FWD_PKTS", "FWD_BYTES", "REV_PKTS", "REV_BYTES", "NEW_FLOWS"
    );
    for s in &r.services {
        let _ = writeln!(
            out,
            "{:>4}  {:<21}  {:<5}  {:>12}  {:>14}  {:>12}  {:>14}  {:>10}",
            s.id,
            s.listen.as_deref().unwrap_or("-"),
            s.proto.unwrap_or("-"),
            s.fwd_packets,
            s.fwd_bytes,
            s.rev_packets,
            s.rev_bytes,
            s.new_flows
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:>4}  {:<21}  {:>12}  {:>14}  {:>12}  {:>14}  {:>10}",
        "UPS", "ADDR", "FWD_PKTS", "FWD_BYTES", "REV_PKTS", "REV_BYTES", "NEW_FLOWS"
    );
    for u in &r.upstreams {
        let _ = writeln!(
            out,
            "{:>4}  {:<21}  {:>12}  {:>14}  {:>12}  {:>14}  {:>10}",
            u.id,
            u.addr.as_deref().unwrap_or("-"),
            u.fwd_packets,
            u.fwd_bytes,
            u.rev_packets,
            u.rev_bytes,
            u.new_flows
        );
    }
    out
}

/// One upstream's share of a service's Maglev table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TableShare {
    pub upstream_id: u32,
    /// null when the slot's upstream id has no active slot (a broken table).
    pub addr: Option<String>,
    pub slots: u32,
}

/// One service, as `inspect services` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceRow {
    pub id: u32,
    pub listen: String,
    pub proto: Option<&'static str>,
    pub has_upstreams: bool,
    /// Maglev slots per upstream, by upstream id (slots of id 0 are `empty_slots`).
    pub table: Vec<TableShare>,
    pub empty_slots: u32,
}

/// Rows for `inspect services`, by id; `tables` holds each service id's Maglev table.
#[must_use]
pub fn build_services(
    services: &[(ServiceKey, ServiceValue)],
    upstreams: &[(u32, UpstreamValue)],
    tables: &[(u32, Vec<u32>)],
) -> Vec<ServiceRow> {
    let mut rows: Vec<ServiceRow> = services
        .iter()
        .map(|(k, v)| {
            let mut counts: std::collections::BTreeMap<u32, u32> =
                std::collections::BTreeMap::new();
            if let Some((_, t)) = tables.iter().find(|(id, _)| *id == v.id) {
                for up in t {
                    *counts.entry(*up).or_insert(0) += 1;
                }
            }
            let empty_slots = counts.remove(&0).unwrap_or(0);
            ServiceRow {
                id: v.id,
                listen: service_listen(k),
                proto: Protocol::from_number(k.proto).map(Protocol::name),
                has_upstreams: v.flags & proxy_common::SERVICE_F_HAS_UPSTREAMS != 0,
                table: counts
                    .into_iter()
                    .map(|(upstream_id, slots)| TableShare {
                        upstream_id,
                        addr: upstreams
                            .iter()
                            .find(|(i, _)| *i == upstream_id)
                            .map(|(_, u)| upstream_addr(u).to_string()),
                        slots,
                    })
                    .collect(),
                empty_slots,
            }
        })
        .collect();
    rows.sort_by_key(|r| r.id);
    rows
}

/// Human table of services.
#[must_use]
pub fn render_services(rows: &[ServiceRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>4}  {:<21}  {:<5}  {:<9}  MAGLEV SLOTS (upstream id addr: slots)",
        "SVC", "LISTEN", "PROTO", "UPSTREAMS"
    );
    for r in rows {
        let mut shares: Vec<String> = r
            .table
            .iter()
            .map(|t| {
                format!(
                    "{} {}: {}",
                    t.upstream_id,
                    t.addr.as_deref().unwrap_or("(no slot!)"),
                    t.slots
                )
            })
            .collect();
        if r.empty_slots > 0 {
            shares.push(format!("empty: {}", r.empty_slots));
        }
        let _ = writeln!(
            out,
            "{:>4}  {:<21}  {:<5}  {:<9}  {}",
            r.id,
            r.listen,
            r.proto.unwrap_or("-"),
            if r.has_upstreams { "yes" } else { "none" },
            shares.join(", ")
        );
    }
    out
}

/// One active upstream slot, as `inspect upstreams` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UpstreamRow {
    pub id: u32,
    pub addr: String,
}

/// Rows for `inspect upstreams`, by id.
#[must_use]
pub fn build_upstreams(upstreams: &[(u32, UpstreamValue)]) -> Vec<UpstreamRow> {
    let mut rows: Vec<UpstreamRow> = upstreams
        .iter()
        .map(|(id, v)| UpstreamRow {
            id: *id,
            addr: upstream_addr(v).to_string(),
        })
        .collect();
    rows.sort_by_key(|r| r.id);
    rows
}

/// Human table of upstreams.
#[must_use]
pub fn render_upstreams(rows: &[UpstreamRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:>4}  ADDR", "UPS");
    for r in rows {
        let _ = writeln!(out, "{:>4}  {}", r.id, r.addr);
    }
    out
}

/// One forward flow, as `inspect flows` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlowRow {
    pub proto: String,
    pub client: String,
    pub service: String,
    pub upstream: String,
    pub snat: String,
    pub snat_port: u16,
    pub service_id: u32,
    pub upstream_id: u32,
    /// `replied`, `fin_client`, `fin_upstream`, `rst` (union of both entries).
    pub flags: Vec<&'static str>,
    pub age_s: f64,
    pub idle_s: f64,
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    pub rev_packets: u64,
    pub rev_bytes: u64,
    /// false when the reverse entry is missing.
    pub has_reverse: bool,
}

/// Flag names of a flow.
#[must_use]
pub fn flag_names(flags: u32) -> Vec<&'static str> {
    [
        (FLOW_F_REPLIED, "replied"),
        (FLOW_F_FIN_CLIENT, "fin_client"),
        (FLOW_F_FIN_UPSTREAM, "fin_upstream"),
        (FLOW_F_RST, "rst"),
    ]
    .iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, n)| *n)
    .collect()
}

fn ep(addr: &[u8; 16], port: [u8; 2]) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(addr_v4_octets(addr)),
        u16::from_be_bytes(port),
    )
}

#[expect(clippy::cast_precision_loss, reason = "seconds for display")]
fn secs(ns: u64) -> f64 {
    (ns / 1_000_000) as f64 / 1000.0
}

/// Rows for `inspect flows`, oldest first.
#[must_use]
pub fn build_flows(entries: &[FlowEntry], now_ns: u64) -> Vec<FlowRow> {
    let mut rows: Vec<(u64, FlowRow)> = entries
        .iter()
        .map(|e| {
            let (rev_p, rev_b, rev_seen, rev_flags) = e.rev.map_or((0, 0, 0, 0), |r| {
                (r.packets, r.bytes, r.last_seen_ns, r.flags)
            });
            let snat = ep(&e.fwd.new_src_addr, e.fwd.new_src_port);
            let row = FlowRow {
                proto: Protocol::from_number(e.key.proto)
                    .map_or_else(|| e.key.proto.to_string(), |p| p.name().to_owned()),
                client: ep(&e.key.src_addr, e.key.src_port).to_string(),
                service: ep(&e.key.dst_addr, e.key.dst_port).to_string(),
                upstream: ep(&e.fwd.new_dst_addr, e.fwd.new_dst_port).to_string(),
                snat: snat.ip().to_string(),
                snat_port: snat.port(),
                service_id: e.fwd.service_id,
                upstream_id: e.fwd.upstream_id,
                flags: flag_names(e.fwd.flags | rev_flags),
                age_s: secs(now_ns.saturating_sub(e.fwd.created_ns)),
                idle_s: secs(now_ns.saturating_sub(e.fwd.last_seen_ns.max(rev_seen))),
                fwd_packets: e.fwd.packets,
                fwd_bytes: e.fwd.bytes,
                rev_packets: rev_p,
                rev_bytes: rev_b,
                has_reverse: e.rev.is_some(),
            };
            (e.fwd.created_ns, row)
        })
        .collect();
    rows.sort_by_key(|(created, _)| *created);
    rows.into_iter().map(|(_, r)| r).collect()
}

/// Human table of flows.
#[must_use]
pub fn render_flows(rows: &[FlowRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<5} {:<21} {:<21} {:<21} {:>6} {:<26} {:>9} {:>9} {:>10} {:>12} {:>10} {:>12}",
        "PROTO",
        "CLIENT",
        "SERVICE",
        "UPSTREAM",
        "SNATPT",
        "FLAGS",
        "AGE_S",
        "IDLE_S",
        "FWD_PKTS",
        "FWD_BYTES",
        "REV_PKTS",
        "REV_BYTES"
    );
    for r in rows {
        let mut flags = r.flags.join(",");
        if !r.has_reverse {
            flags.push_str(if flags.is_empty() {
                "no_reverse"
            } else {
                ",no_reverse"
            });
        }
        if flags.is_empty() {
            flags.push('-');
        }
        let _ = writeln!(
            out,
            "{:<5} {:<21} {:<21} {:<21} {:>6} {:<26} {:>9.1} {:>9.1} {:>10} {:>12} {:>10} {:>12}",
            r.proto,
            r.client,
            r.service,
            r.upstream,
            r.snat_port,
            flags,
            r.age_s,
            r.idle_s,
            r.fwd_packets,
            r.fwd_bytes,
            r.rev_packets,
            r.rev_bytes
        );
    }
    let _ = writeln!(out, "{} flows", rows.len());
    out
}

#[cfg(test)]
mod tests {
    use proxy_common::{FAMILY_IPV4, FlowKey, FlowValue, addr_v4};

    use super::*;
    use crate::plan::{service_key, upstream_value};

    fn counters(n: u64) -> TrafficCounters {
        TrafficCounters {
            fwd_packets: n,
            fwd_bytes: n * 100,
            rev_packets: n + 1,
            rev_bytes: (n + 1) * 100,
            new_flows: 1,
        }
    }

    fn report() -> StatsReport {
        let reasons: Vec<(Reason, u64)> =
            Reason::ALL.iter().map(|r| (*r, *r as u64 * 10)).collect();
        let services = [(
            service_key("10.10.1.1:80".parse().unwrap(), Protocol::Tcp),
            ServiceValue { id: 1, flags: 1 },
        )];
        let ups = [(2, upstream_value("10.20.1.2:8080".parse().unwrap()))];
        let mut svc_c = vec![
            (0, TrafficCounters::default()),
            (1, counters(5)),
            (3, counters(7)),
        ];
        svc_c.push((4, TrafficCounters::default()));
        let ups_c = vec![(1, TrafficCounters::default()), (2, counters(5))];
        build_stats(&reasons, &services, &ups, &svc_c, &ups_c)
    }

    #[test]
    fn stats_json_has_the_stable_shape() {
        let v = serde_json::to_value(report()).unwrap();
        assert_eq!(v["reasons"]["fwd_tx"], 0);
        assert_eq!(v["reasons"]["pass_not_service"], 60);
        assert_eq!(v["reasons"].as_object().unwrap().len(), Reason::ALL.len());
        let svcs = v["services"].as_array().unwrap();
        assert_eq!(svcs.len(), 2, "{v}");
        assert_eq!(svcs[0]["id"], 1);
        assert_eq!(svcs[0]["listen"], "10.10.1.1:80");
        assert_eq!(svcs[0]["proto"], "tcp");
        assert_eq!(svcs[0]["fwd_packets"], 5);
        assert_eq!(svcs[0]["fwd_bytes"], 500);
        assert_eq!(svcs[0]["rev_packets"], 6);
        assert_eq!(svcs[0]["rev_bytes"], 600);
        assert_eq!(svcs[0]["new_flows"], 1);
        // Id 3 has counters but no service any more.
        assert_eq!(svcs[1]["id"], 3);
        assert!(svcs[1]["listen"].is_null());
        let ups = v["upstreams"].as_array().unwrap();
        assert_eq!(ups.len(), 1);
        assert_eq!(ups[0]["id"], 2);
        assert_eq!(ups[0]["addr"], "10.20.1.2:8080");
        // Reasons keep index order in the text.
        let text = serde_json::to_string(&report()).unwrap();
        assert!(text.find("fwd_tx").unwrap() < text.find("aborted").unwrap());
    }

    #[test]
    fn stats_table_names_every_reason() {
        let t = render_stats(&report());
        for r in Reason::ALL {
            assert!(t.contains(r.name()), "{}", r.name());
        }
        assert!(t.contains("10.10.1.1:80"));
        assert!(t.contains("10.20.1.2:8080"));
    }

    #[test]
    fn service_rows_count_maglev_shares() {
        let key = service_key("10.10.1.1:80".parse().unwrap(), Protocol::Tcp);
        let services = [(key, ServiceValue { id: 3, flags: 1 })];
        let ups = [
            (1, upstream_value("10.20.1.2:80".parse().unwrap())),
            (2, upstream_value("10.20.1.3:80".parse().unwrap())),
        ];
        let tables = [(3, vec![1, 2, 2, 0, 7])];
        let rows = build_services(&services, &ups, &tables);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(
            (r.id, r.listen.as_str(), r.proto),
            (3, "10.10.1.1:80", Some("tcp"))
        );
        assert!(r.has_upstreams);
        assert_eq!(r.empty_slots, 1);
        let shares: Vec<(u32, Option<&str>, u32)> = r
            .table
            .iter()
            .map(|t| (t.upstream_id, t.addr.as_deref(), t.slots))
            .collect();
        assert_eq!(
            shares,
            [
                (1, Some("10.20.1.2:80"), 1),
                (2, Some("10.20.1.3:80"), 2),
                (7, None, 1)
            ]
        );
        let t = render_services(&rows);
        assert!(
            t.contains("2 10.20.1.3:80: 2") && t.contains("7 (no slot!): 1"),
            "{t}"
        );
        let u = build_upstreams(&ups);
        assert_eq!(
            u[1],
            UpstreamRow {
                id: 2,
                addr: "10.20.1.3:80".into()
            }
        );
        assert!(render_upstreams(&u).contains("   1  10.20.1.2:80"));
    }

    #[test]
    fn flow_rows() {
        let key = FlowKey {
            src_addr: addr_v4([10, 0, 0, 1]),
            dst_addr: addr_v4([10, 10, 1, 1]),
            src_port: 40000u16.to_be_bytes(),
            dst_port: 80u16.to_be_bytes(),
            proto: 6,
            family: FAMILY_IPV4,
            _pad: [0; 2],
        };
        let fwd = FlowValue {
            new_src_addr: addr_v4([10, 20, 1, 1]),
            new_dst_addr: addr_v4([10, 20, 1, 2]),
            new_src_port: 12000u16.to_be_bytes(),
            new_dst_port: 8080u16.to_be_bytes(),
            flags: FLOW_F_REPLIED,
            service_id: 1,
            upstream_id: 2,
            created_ns: 1_000_000_000,
            last_seen_ns: 2_000_000_000,
            packets: 3,
            bytes: 180,
            ..FlowValue::default()
        };
        let rev = FlowValue {
            flags: FLOW_F_REPLIED | FLOW_F_FIN_UPSTREAM,
            last_seen_ns: 3_000_000_000,
            packets: 2,
            bytes: 120,
            ..fwd
        };
        let rows = build_flows(
            &[FlowEntry {
                key,
                fwd,
                rev: Some(rev),
            }],
            5_000_000_000,
        );
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r.client, "10.0.0.1:40000");
        assert_eq!(r.service, "10.10.1.1:80");
        assert_eq!(r.upstream, "10.20.1.2:8080");
        assert_eq!((r.snat.as_str(), r.snat_port), ("10.20.1.1", 12000));
        assert_eq!(r.flags, ["replied", "fin_upstream"]);
        assert!((r.age_s - 4.0).abs() < 1e-9);
        assert!((r.idle_s - 2.0).abs() < 1e-9);
        assert_eq!((r.fwd_packets, r.rev_packets), (3, 2));
        let t = render_flows(&rows);
        assert!(
            t.contains("replied,fin_upstream") && t.contains("1 flows"),
            "{t}"
        );
        let rows = build_flows(
            &[FlowEntry {
                key,
                fwd,
                rev: None,
            }],
            5_000_000_000,
        );
        assert!(render_flows(&rows).contains("replied,no_reverse"));
    }
}
