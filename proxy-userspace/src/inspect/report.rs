//! `inspect stats|services|upstreams|maps`: reports built from values read out of the pinned
//! maps, and their tables (pure). JSON shapes: docs/inspect-json.md.

use std::collections::BTreeMap;

use proxy_common::{
    Reason, SERVICE_F_HAS_UPSTREAMS, ServiceKey, ServiceValue, TrafficCounters, UpstreamValue,
};
use serde::{Serialize, ser::SerializeMap};

use super::{
    SCHEMA_VERSION,
    meta::{Metadata, Names},
    rates::action_class,
    render::{Align, Table, bytes, count},
};
use crate::{config::Protocol, plan::upstream_addr};

/// Who wrote the maps, from the metadata file (null in JSON without one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DaemonInfo {
    pub version: String,
    pub pid: u32,
    /// Whether a process with that PID exists now (best effort: PIDs are reused).
    pub running: bool,
}

impl DaemonInfo {
    #[must_use]
    pub fn from_meta(meta: Option<&Metadata>) -> Option<Self> {
        meta.map(|m| Self {
            version: m.daemon_version.clone(),
            pid: m.pid,
            running: std::path::Path::new("/proc")
                .join(m.pid.to_string())
                .exists(),
        })
    }
}

/// Reason counters in index order, serialized as `{name: packets}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reasons(pub Vec<(Reason, u64)>);

impl Serialize for Reasons {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k.name(), v)?;
        }
        m.end()
    }
}

/// One service's counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceStats {
    pub id: u32,
    pub name: Option<String>,
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
    pub schema_version: u32,
    pub kind: &'static str,
    pub daemon: Option<DaemonInfo>,
    pub reasons: Reasons,
    pub services: Vec<ServiceStats>,
    pub upstreams: Vec<UpstreamStats>,
    /// The interfaces in the devmap, with what the kernel counts of frames lost on them.
    pub interfaces: Vec<InterfaceDelivery>,
}

/// One datapath interface in `inspect stats`: the device's drop and error counters and the
/// frames the kernel failed to transmit after the program sent them (docs/datapath.md,
/// "Delivery").
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InterfaceDelivery {
    pub ifindex: u32,
    /// `None`: no interface has that index in this namespace (`inspect` runs in another one).
    pub name: Option<String>,
    /// `None`: the device's counters could not be read.
    pub kernel: Option<crate::netdev::Delivery>,
}

fn is_zero(c: &TrafficCounters) -> bool {
    *c == TrafficCounters::default()
}

/// `addr:port` of a service key.
#[must_use]
pub fn service_listen(k: &ServiceKey) -> String {
    std::net::SocketAddr::new(
        crate::plan::ip_of(&k.addr, k.family),
        u16::from_be_bytes(k.port),
    )
    .to_string()
}

fn proto_name(n: u8) -> Option<&'static str> {
    Protocol::from_number(n).map(Protocol::name)
}

/// Everything read from the maps that the reports need.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapValues {
    pub reasons: Vec<(Reason, u64)>,
    pub services: Vec<(ServiceKey, ServiceValue)>,
    pub upstreams: Vec<(u32, UpstreamValue)>,
    pub service_counters: Vec<(u32, TrafficCounters)>,
    pub upstream_counters: Vec<(u32, TrafficCounters)>,
    /// Maglev table per service id (only for `services` and `upstreams`).
    pub tables: Vec<(u32, Vec<u32>)>,
}

/// The stats report. Services: every entry of `XP_SERVICES`, plus ids that still have counters;
/// upstreams likewise with the active slots. Both sorted by id.
#[must_use]
pub fn build_stats(v: &MapValues, names: &Names, daemon: Option<DaemonInfo>) -> StatsReport {
    let mut services: Vec<ServiceStats> = v
        .service_counters
        .iter()
        .filter_map(|(id, c)| {
            let entry = v.services.iter().find(|(_, s)| s.id == *id);
            if entry.is_none() && is_zero(c) {
                return None;
            }
            Some(ServiceStats {
                id: *id,
                name: names.service(*id).map(str::to_owned),
                listen: entry.map(|(k, _)| service_listen(k)),
                proto: entry.and_then(|(k, _)| proto_name(k.proto)),
                fwd_packets: c.fwd_packets,
                fwd_bytes: c.fwd_bytes,
                rev_packets: c.rev_packets,
                rev_bytes: c.rev_bytes,
                new_flows: c.new_flows,
            })
        })
        .collect();
    services.sort_by_key(|s| s.id);
    let mut upstreams: Vec<UpstreamStats> = v
        .upstream_counters
        .iter()
        .filter_map(|(id, c)| {
            let slot = v.upstreams.iter().find(|(i, _)| i == id);
            if slot.is_none() && is_zero(c) {
                return None;
            }
            Some(UpstreamStats {
                id: *id,
                addr: slot.map(|(_, u)| upstream_addr(u).to_string()),
                fwd_packets: c.fwd_packets,
                fwd_bytes: c.fwd_bytes,
                rev_packets: c.rev_packets,
                rev_bytes: c.rev_bytes,
                new_flows: c.new_flows,
            })
        })
        .collect();
    upstreams.sort_by_key(|u| u.id);
    StatsReport {
        schema_version: SCHEMA_VERSION,
        kind: "stats",
        daemon,
        reasons: Reasons(v.reasons.clone()),
        services,
        upstreams,
        interfaces: Vec::new(),
    }
}

fn traffic_table(first: &'static str, second: &'static str) -> Table {
    Table::new(&[
        (first, Align::Right),
        (second, Align::Left),
        ("ADDR", Align::Left),
        ("PROTO", Align::Left),
        ("PKTS FWD", Align::Right),
        ("PKTS REV", Align::Right),
        ("BYTES FWD", Align::Right),
        ("BYTES REV", Align::Right),
        ("FLOWS", Align::Right),
    ])
}

#[expect(clippy::too_many_arguments, reason = "one table row")]
fn traffic_row(
    id: u32,
    name: &str,
    addr: &str,
    proto: &str,
    fp: u64,
    rp: u64,
    fb: u64,
    rb: u64,
    flows: u64,
) -> Vec<String> {
    vec![
        id.to_string(),
        name.to_owned(),
        addr.to_owned(),
        proto.to_owned(),
        count(fp),
        count(rp),
        bytes(fb),
        bytes(rb),
        count(flows),
    ]
}

/// Human view of `inspect stats`.
#[must_use]
pub fn render_stats(r: &StatsReport) -> String {
    let mut svc = traffic_table("SVC", "NAME");
    for s in &r.services {
        svc.row(traffic_row(
            s.id,
            s.name.as_deref().unwrap_or("-"),
            s.listen.as_deref().unwrap_or("(removed)"),
            s.proto.unwrap_or("-"),
            s.fwd_packets,
            s.rev_packets,
            s.fwd_bytes,
            s.rev_bytes,
            s.new_flows,
        ));
    }
    let mut ups = Table::new(&[
        ("UPS", Align::Right),
        ("ADDR", Align::Left),
        ("PKTS FWD", Align::Right),
        ("PKTS REV", Align::Right),
        ("BYTES FWD", Align::Right),
        ("BYTES REV", Align::Right),
        ("FLOWS", Align::Right),
    ]);
    for u in &r.upstreams {
        ups.row(vec![
            u.id.to_string(),
            u.addr.clone().unwrap_or_else(|| "(removed)".into()),
            count(u.fwd_packets),
            count(u.rev_packets),
            bytes(u.fwd_bytes),
            bytes(u.rev_bytes),
            count(u.new_flows),
        ]);
    }
    let mut reasons = Table::new(&[
        ("REASON", Align::Left),
        ("ACTION", Align::Left),
        ("PACKETS", Align::Right),
    ]);
    for (reason, n) in &r.reasons.0 {
        reasons.row(vec![
            reason.name().to_owned(),
            action_class(*reason).to_owned(),
            count(*n),
        ]);
    }
    let mut out = match &r.daemon {
        Some(d) => format!(
            "daemon xdp-proxy {}, pid {} ({})\n\n",
            d.version,
            d.pid,
            if d.running { "running" } else { "not running" }
        ),
        None => "no daemon metadata file: names unknown\n\n".to_owned(),
    };
    out.push_str(&svc.render());
    out.push('\n');
    out.push_str(&ups.render());
    out.push('\n');
    out.push_str(&reasons.render());
    out.push_str("(FWD: client -> upstream, REV: upstream -> client; FLOWS: flows created)\n");
    if !r.interfaces.is_empty() {
        let mut ifs = Table::new(&[
            ("IF", Align::Left),
            ("INDEX", Align::Right),
            ("XDP XMIT DROPS", Align::Right),
            ("TX DROPPED", Align::Right),
            ("TX ERRORS", Align::Right),
            ("RX DROPPED", Align::Right),
        ]);
        for i in &r.interfaces {
            let k = |f: fn(&crate::netdev::Delivery) -> u64| {
                i.kernel
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |d| count(f(d)))
            };
            ifs.row(vec![
                i.name.clone().unwrap_or_else(|| "?".into()),
                i.ifindex.to_string(),
                k(|d| d.xdp_xmit_drops),
                k(|d| d.tx_dropped),
                k(|d| d.tx_errors),
                k(|d| d.rx_dropped),
            ]);
        }
        out.push('\n');
        out.push_str(&ifs.render());
        out.push_str(
            "(frames the kernel lost on each datapath interface after the program's verdict)\n",
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
    pub name: Option<String>,
    pub listen: String,
    pub proto: Option<&'static str>,
    pub has_upstreams: bool,
    /// Maglev slots per upstream, by upstream id (slots of id 0 are `empty_slots`).
    pub table: Vec<TableShare>,
    pub empty_slots: u32,
}

/// `inspect services`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicesReport {
    pub schema_version: u32,
    pub kind: &'static str,
    pub services: Vec<ServiceRow>,
}

fn slot_counts(tables: &[(u32, Vec<u32>)], service_id: u32) -> BTreeMap<u32, u32> {
    let mut counts = BTreeMap::new();
    if let Some((_, t)) = tables.iter().find(|(id, _)| *id == service_id) {
        for up in t {
            *counts.entry(*up).or_insert(0) += 1;
        }
    }
    counts
}

/// `inspect services`, by id.
#[must_use]
pub fn build_services(v: &MapValues, names: &Names) -> ServicesReport {
    let mut rows: Vec<ServiceRow> = v
        .services
        .iter()
        .map(|(k, s)| {
            let mut counts = slot_counts(&v.tables, s.id);
            let empty_slots = counts.remove(&0).unwrap_or(0);
            ServiceRow {
                id: s.id,
                name: names.service(s.id).map(str::to_owned),
                listen: service_listen(k),
                proto: proto_name(k.proto),
                has_upstreams: s.flags & SERVICE_F_HAS_UPSTREAMS != 0,
                table: counts
                    .into_iter()
                    .map(|(upstream_id, slots)| TableShare {
                        upstream_id,
                        addr: v
                            .upstreams
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
    ServicesReport {
        schema_version: SCHEMA_VERSION,
        kind: "services",
        services: rows,
    }
}

/// Human view of `inspect services`.
#[must_use]
pub fn render_services(r: &ServicesReport) -> String {
    let mut t = Table::new(&[
        ("SVC", Align::Right),
        ("NAME", Align::Left),
        ("LISTEN", Align::Left),
        ("PROTO", Align::Left),
        ("UPSTREAMS (id addr: share of Maglev slots)", Align::Left),
    ]);
    for s in &r.services {
        let total: u32 = s.table.iter().map(|x| x.slots).sum::<u32>() + s.empty_slots;
        let pct = |n: u32| {
            if total == 0 {
                0.0
            } else {
                f64::from(n) * 100.0 / f64::from(total)
            }
        };
        let mut shares: Vec<String> = s
            .table
            .iter()
            .map(|x| {
                format!(
                    "{} {}: {:.1}%",
                    x.upstream_id,
                    x.addr.as_deref().unwrap_or("(no slot!)"),
                    pct(x.slots)
                )
            })
            .collect();
        if s.empty_slots > 0 && !s.table.is_empty() {
            shares.push(format!("empty: {:.1}%", pct(s.empty_slots)));
        }
        if !s.has_upstreams {
            shares = vec!["none: new flows are passed to the kernel".into()];
        }
        t.row(vec![
            s.id.to_string(),
            s.name.clone().unwrap_or_else(|| "-".into()),
            s.listen.clone(),
            s.proto.unwrap_or("-").to_owned(),
            shares.join(", "),
        ]);
    }
    t.render()
}

/// One active upstream slot, as `inspect upstreams` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UpstreamRow {
    pub id: u32,
    pub addr: String,
    /// Names of the services using it (from the metadata; empty without it).
    pub services: Vec<String>,
    /// Maglev slots pointing at it, over all services (0: it gets no new flows).
    pub maglev_slots: u32,
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    pub rev_packets: u64,
    pub rev_bytes: u64,
    pub new_flows: u64,
}

/// `inspect upstreams`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UpstreamsReport {
    pub schema_version: u32,
    pub kind: &'static str,
    pub upstreams: Vec<UpstreamRow>,
}

/// `inspect upstreams`, by id.
#[must_use]
pub fn build_upstreams(v: &MapValues, names: &Names) -> UpstreamsReport {
    let mut slots: BTreeMap<u32, u32> = BTreeMap::new();
    for (_, t) in &v.tables {
        for up in t {
            *slots.entry(*up).or_insert(0) += 1;
        }
    }
    let mut rows: Vec<UpstreamRow> = v
        .upstreams
        .iter()
        .map(|(id, u)| {
            let c = v
                .upstream_counters
                .iter()
                .find(|(i, _)| i == id)
                .map(|(_, c)| *c)
                .unwrap_or_default();
            UpstreamRow {
                id: *id,
                addr: upstream_addr(u).to_string(),
                services: names.upstream_users.get(id).cloned().unwrap_or_default(),
                maglev_slots: slots.get(id).copied().unwrap_or(0),
                fwd_packets: c.fwd_packets,
                fwd_bytes: c.fwd_bytes,
                rev_packets: c.rev_packets,
                rev_bytes: c.rev_bytes,
                new_flows: c.new_flows,
            }
        })
        .collect();
    rows.sort_by_key(|r| r.id);
    UpstreamsReport {
        schema_version: SCHEMA_VERSION,
        kind: "upstreams",
        upstreams: rows,
    }
}

/// Human view of `inspect upstreams`.
#[must_use]
pub fn render_upstreams(r: &UpstreamsReport) -> String {
    let mut t = Table::new(&[
        ("UPS", Align::Right),
        ("ADDR", Align::Left),
        ("SERVICES", Align::Left),
        ("SLOTS", Align::Right),
        ("PKTS FWD", Align::Right),
        ("PKTS REV", Align::Right),
        ("BYTES FWD", Align::Right),
        ("BYTES REV", Align::Right),
        ("FLOWS", Align::Right),
    ]);
    for u in &r.upstreams {
        t.row(vec![
            u.id.to_string(),
            u.addr.clone(),
            if u.services.is_empty() {
                "-".into()
            } else {
                u.services.join(",")
            },
            count(u64::from(u.maglev_slots)),
            count(u.fwd_packets),
            count(u.rev_packets),
            bytes(u.fwd_bytes),
            bytes(u.rev_bytes),
            count(u.new_flows),
        ]);
    }
    let mut out = t.render();
    out.push_str("(SLOTS: Maglev slots over all services; 0 = gets no new flows)\n");
    out
}

/// One pinned map, as `inspect maps` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapRow {
    pub name: String,
    /// Kernel map type, lower case without the `BPF_MAP_TYPE_` prefix (`hash`, `lru_hash`, ...).
    #[serde(rename = "type")]
    pub map_type: String,
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// Hash maps: entries counted by iterating the keys. Arrays: entries that are not all zero.
    /// null when not counted.
    pub used_entries: Option<u64>,
    pub memory_bytes: u64,
    /// `memlock` (the kernel's own figure from /proc/self/fdinfo) or `estimate`.
    pub memory_source: &'static str,
}

/// A pin that is not a map (for example the XDP link).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OtherPin {
    pub name: String,
    pub what: String,
}

/// `inspect maps`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapsReport {
    pub schema_version: u32,
    pub kind: &'static str,
    /// The directory the pins were read from (`<pin_dir>/v<ABI>`).
    pub dir: String,
    pub maps: Vec<MapRow>,
    pub other_pins: Vec<OtherPin>,
}

/// Human view of `inspect maps`.
#[must_use]
pub fn render_maps(r: &MapsReport) -> String {
    let mut t = Table::new(&[
        ("NAME", Align::Left),
        ("TYPE", Align::Left),
        ("KEY", Align::Right),
        ("VALUE", Align::Right),
        ("MAX", Align::Right),
        ("USED", Align::Right),
        ("MEMORY", Align::Right),
    ]);
    let mut estimated = false;
    for m in &r.maps {
        let mut mem = bytes(m.memory_bytes);
        if m.memory_source != "memlock" {
            mem.push('*');
            estimated = true;
        }
        t.row(vec![
            m.name.clone(),
            m.map_type.clone(),
            bytes(u64::from(m.key_size)),
            bytes(u64::from(m.value_size)),
            count(u64::from(m.max_entries)),
            m.used_entries.map_or_else(|| "n/a".into(), count),
            mem,
        ]);
    }
    let mut out = format!("{}\n", r.dir);
    out.push_str(&t.render());
    if estimated {
        out.push_str("(* estimated from sizes: the kernel did not report memlock)\n");
    }
    for p in &r.other_pins {
        out.push_str(&format!("also pinned: {} ({})\n", p.name, p.what));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{service_key, upstream_value};

    fn counters(n: u64) -> TrafficCounters {
        TrafficCounters {
            fwd_packets: n,
            fwd_bytes: n * 100,
            rev_packets: n + 1,
            rev_bytes: (n + 1) * 100_000,
            new_flows: 1,
        }
    }

    fn values() -> MapValues {
        let mut service_counters: Vec<(u32, TrafficCounters)> =
            (0..4).map(|id| (id, TrafficCounters::default())).collect();
        service_counters[1].1 = counters(1500);
        service_counters[3].1 = counters(5);
        let mut upstream_counters: Vec<(u32, TrafficCounters)> =
            (0..4).map(|id| (id, TrafficCounters::default())).collect();
        upstream_counters[2].1 = counters(1500);
        MapValues {
            reasons: Reason::ALL.iter().map(|r| (*r, *r as u64 * 1000)).collect(),
            services: vec![
                (
                    service_key("10.10.1.1:80".parse().unwrap(), Protocol::Tcp),
                    ServiceValue { id: 1, flags: 1 },
                ),
                (
                    service_key("10.10.1.1:53".parse().unwrap(), Protocol::Udp),
                    ServiceValue { id: 2, flags: 0 },
                ),
            ],
            upstreams: vec![
                (2, upstream_value("10.20.1.2:8080".parse().unwrap())),
                (3, upstream_value("10.20.1.3:8080".parse().unwrap())),
            ],
            service_counters,
            upstream_counters,
            tables: vec![(1, vec![2, 2, 3, 0]), (2, vec![0, 0, 0, 0])],
        }
    }

    fn names() -> Names {
        let mut n = Names::default();
        n.services.insert(1, "web".into());
        n.upstream_users.insert(2, vec!["web".into()]);
        n
    }

    #[test]
    fn stats_report_and_json_shape() {
        let r = build_stats(&values(), &names(), None);
        let ids: Vec<(u32, Option<&str>)> = r
            .services
            .iter()
            .map(|s| (s.id, s.listen.as_deref()))
            .collect();
        // Id 3 has counters but no service any more: listed, listen null. Id 0: nothing.
        assert_eq!(
            ids,
            [
                (1, Some("10.10.1.1:80")),
                (2, Some("10.10.1.1:53")),
                (3, None)
            ]
        );
        let ups: Vec<u32> = r.upstreams.iter().map(|u| u.id).collect();
        assert_eq!(ups, [2, 3]);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["schema_version"], 1);
        assert_eq!(json["kind"], "stats");
        assert_eq!(json["daemon"], serde_json::Value::Null);
        assert_eq!(json["reasons"]["pass_not_service"], 6000);
        assert_eq!(json["services"][0]["name"], "web");
        assert_eq!(json["services"][0]["fwd_packets"], 1500);
        assert_eq!(json["services"][1]["name"], serde_json::Value::Null);
        assert_eq!(json["upstreams"][0]["addr"], "10.20.1.2:8080");
        let d = DaemonInfo {
            version: "0.1.0".into(),
            pid: 7,
            running: false,
        };
        let r = build_stats(&values(), &names(), Some(d));
        assert!(render_stats(&r).starts_with("daemon xdp-proxy 0.1.0, pid 7 (not running)\n\nSVC"));
        assert_eq!(
            serde_json::to_value(&r).unwrap()["daemon"]["running"],
            false
        );
    }

    #[test]
    fn stats_table_snapshot() {
        let mut v = values();
        v.reasons.truncate(3);
        let r = build_stats(&v, &names(), None);
        assert_eq!(
            render_stats(&r),
            "\
no daemon metadata file: names unknown

SVC  NAME  ADDR          PROTO  PKTS FWD  PKTS REV  BYTES FWD  BYTES REV  FLOWS
  1  web   10.10.1.1:80  tcp        1.5K      1.5K  146.5 KiB  143.1 MiB      1
  2  -     10.10.1.1:53  udp           0         0        0 B        0 B      0
  3  -     (removed)     -             5         6      500 B  585.9 KiB      1

UPS  ADDR            PKTS FWD  PKTS REV  BYTES FWD  BYTES REV  FLOWS
  2  10.20.1.2:8080      1.5K      1.5K  146.5 KiB  143.1 MiB      1
  3  10.20.1.3:8080         0         0        0 B        0 B      0

REASON        ACTION   PACKETS
fwd_tx        forward        0
fwd_redirect  forward     1.0K
rev_tx        forward     2.0K
(FWD: client -> upstream, REV: upstream -> client; FLOWS: flows created)
"
        );
    }

    #[test]
    fn services_and_upstreams_snapshot() {
        let v = values();
        let s = build_services(&v, &names());
        assert_eq!(s.services[0].empty_slots, 1);
        assert_eq!(
            render_services(&s),
            "\
SVC  NAME  LISTEN        PROTO  UPSTREAMS (id addr: share of Maglev slots)
  1  web   10.10.1.1:80  tcp    2 10.20.1.2:8080: 50.0%, 3 10.20.1.3:8080: 25.0%, empty: 25.0%
  2  -     10.10.1.1:53  udp    none: new flows are passed to the kernel
"
        );
        let u = build_upstreams(&v, &names());
        assert_eq!(u.upstreams[0].maglev_slots, 2);
        assert_eq!(
            render_upstreams(&u),
            "\
UPS  ADDR            SERVICES  SLOTS  PKTS FWD  PKTS REV  BYTES FWD  BYTES REV  FLOWS
  2  10.20.1.2:8080  web           2      1.5K      1.5K  146.5 KiB  143.1 MiB      1
  3  10.20.1.3:8080  -             1         0         0        0 B        0 B      0
(SLOTS: Maglev slots over all services; 0 = gets no new flows)
"
        );
    }

    #[test]
    fn maps_snapshot() {
        let r = MapsReport {
            schema_version: SCHEMA_VERSION,
            kind: "maps",
            dir: "/sys/fs/bpf/xdp-proxy/v1".into(),
            maps: vec![
                MapRow {
                    name: "XP_FLOWS_FWD".into(),
                    map_type: "lru_hash".into(),
                    id: 7,
                    key_size: 40,
                    value_size: 88,
                    max_entries: 262_144,
                    used_entries: Some(1234),
                    memory_bytes: 40_000_000,
                    memory_source: "memlock",
                },
                MapRow {
                    name: "XP_DEVMAP".into(),
                    map_type: "devmap_hash".into(),
                    id: 8,
                    key_size: 4,
                    value_size: 4,
                    max_entries: 64,
                    used_entries: None,
                    memory_bytes: 512,
                    memory_source: "estimate",
                },
            ],
            other_pins: vec![OtherPin {
                name: "link_eth0".into(),
                what: "not a map".into(),
            }],
        };
        assert_eq!(
            render_maps(&r),
            "\
/sys/fs/bpf/xdp-proxy/v1
NAME          TYPE          KEY  VALUE     MAX  USED    MEMORY
XP_FLOWS_FWD  lru_hash     40 B   88 B  262.1K  1.2K  38.1 MiB
XP_DEVMAP     devmap_hash   4 B    4 B      64   n/a    512 B*
(* estimated from sizes: the kernel did not report memlock)
also pinned: link_eth0 (not a map)
"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["maps"][0]["type"], "lru_hash");
        assert_eq!(json["maps"][1]["used_entries"], serde_json::Value::Null);
    }
}
