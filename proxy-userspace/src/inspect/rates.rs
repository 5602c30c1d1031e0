//! `inspect stats --watch`: rates from two snapshots of the summed per-CPU counters (pure).
//!
//! rate = (counter now - counter before) / elapsed. A counter that went down was reset (the
//! daemon zeroes the counters of a newly assigned id): its rate counts from zero.

use proxy_common::{Reason, TrafficCounters};
use serde::Serialize;

use super::{
    meta::Names,
    render::{Align, Table, bits_rate, rate},
};

/// Counters read at one instant (`t_ns`: CLOCK_MONOTONIC).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub t_ns: u64,
    pub reasons: Vec<(Reason, u64)>,
    /// (id, label such as the listen address, counters) per service with a map entry.
    pub services: Vec<(u32, String, TrafficCounters)>,
    /// (id, address, counters) per active upstream slot.
    pub upstreams: Vec<(u32, String, TrafficCounters)>,
}

/// Rates of one service or upstream.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrafficRates {
    pub id: u32,
    /// Service name, or for an upstream the services using it (comma-separated), from the
    /// metadata; null without it.
    pub name: Option<String>,
    /// Listen address (services) or upstream address.
    pub addr: String,
    pub fwd_pps: f64,
    pub rev_pps: f64,
    pub fwd_bps: f64,
    pub rev_bps: f64,
    pub new_flows_per_s: f64,
}

/// One reason's rate.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReasonRate {
    pub reason: &'static str,
    /// `forward`, `pass`, `drop` or `abort`.
    pub action: &'static str,
    pub per_s: f64,
}

/// `inspect stats --watch --json`: one object per refresh.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RatesReport {
    pub schema_version: u32,
    pub kind: &'static str,
    pub interval_s: f64,
    pub services: Vec<TrafficRates>,
    pub upstreams: Vec<TrafficRates>,
    /// Every reason, in index order.
    pub reasons: Vec<ReasonRate>,
}

fn delta(now: u64, before: u64) -> u64 {
    if now >= before { now - before } else { now }
}

#[expect(clippy::cast_precision_loss, reason = "rates for display")]
fn per_s(d: u64, secs: f64) -> f64 {
    if secs > 0.0 { d as f64 / secs } else { 0.0 }
}

fn traffic(
    id: u32,
    name: Option<String>,
    addr: &str,
    now: &TrafficCounters,
    before: Option<&TrafficCounters>,
    secs: f64,
) -> TrafficRates {
    let zero = TrafficCounters::default();
    let b = before.unwrap_or(&zero);
    TrafficRates {
        id,
        name,
        addr: addr.to_owned(),
        fwd_pps: per_s(delta(now.fwd_packets, b.fwd_packets), secs),
        rev_pps: per_s(delta(now.rev_packets, b.rev_packets), secs),
        fwd_bps: per_s(delta(now.fwd_bytes, b.fwd_bytes).saturating_mul(8), secs),
        rev_bps: per_s(delta(now.rev_bytes, b.rev_bytes).saturating_mul(8), secs),
        new_flows_per_s: per_s(delta(now.new_flows, b.new_flows), secs),
    }
}

/// The action class of a reason.
#[must_use]
pub const fn action_class(r: Reason) -> &'static str {
    match r.action() {
        proxy_common::XDP_PASS => "pass",
        proxy_common::XDP_DROP => "drop",
        proxy_common::XDP_ABORTED => "abort",
        _ => "forward",
    }
}

/// Rates between two snapshots. An id absent from `before` counts from zero.
#[must_use]
#[expect(clippy::cast_precision_loss, reason = "elapsed seconds")]
pub fn rates(before: &Snapshot, now: &Snapshot, names: &Names) -> RatesReport {
    let secs = now.t_ns.saturating_sub(before.t_ns) as f64 / 1e9;
    let services = now
        .services
        .iter()
        .map(|(id, addr, c)| {
            let b = before.services.iter().find(|(i, ..)| i == id).map(|x| &x.2);
            traffic(*id, names.service(*id).map(str::to_owned), addr, c, b, secs)
        })
        .collect();
    let upstreams = now
        .upstreams
        .iter()
        .map(|(id, addr, c)| {
            let b = before
                .upstreams
                .iter()
                .find(|(i, ..)| i == id)
                .map(|x| &x.2);
            let users = names.upstream_users.get(id).filter(|u| !u.is_empty());
            traffic(*id, users.map(|u| u.join(",")), addr, c, b, secs)
        })
        .collect();
    let reasons = now
        .reasons
        .iter()
        .map(|(r, n)| {
            let b = before
                .reasons
                .iter()
                .find(|(x, _)| x == r)
                .map_or(0, |(_, v)| *v);
            ReasonRate {
                reason: r.name(),
                action: action_class(*r),
                per_s: per_s(delta(*n, b), secs),
            }
        })
        .collect();
    RatesReport {
        schema_version: super::SCHEMA_VERSION,
        kind: "rates",
        interval_s: secs,
        services,
        upstreams,
        reasons,
    }
}

/// Human view of one refresh: services, upstreams, then every pass/drop reason with a non-zero
/// rate (forwarding verdicts are in the per-service rates already).
#[must_use]
pub fn render(r: &RatesReport) -> String {
    let headers = |first: &'static str| {
        Table::new(&[
            (first, Align::Right),
            ("NAME", Align::Left),
            ("ADDR", Align::Left),
            ("PKT/S FWD", Align::Right),
            ("PKT/S REV", Align::Right),
            ("BIT/S FWD", Align::Right),
            ("BIT/S REV", Align::Right),
            ("NEW FLOWS/S", Align::Right),
        ])
    };
    let fill = |t: &mut Table, rows: &[TrafficRates]| {
        for s in rows {
            t.row(vec![
                s.id.to_string(),
                s.name.clone().unwrap_or_else(|| "-".into()),
                s.addr.clone(),
                rate(s.fwd_pps),
                rate(s.rev_pps),
                bits_rate(s.fwd_bps),
                bits_rate(s.rev_bps),
                rate(s.new_flows_per_s),
            ]);
        }
    };
    let mut svc = headers("SVC");
    fill(&mut svc, &r.services);
    let mut ups = headers("UPS");
    fill(&mut ups, &r.upstreams);
    let mut reasons = Table::new(&[
        ("REASON", Align::Left),
        ("ACTION", Align::Left),
        ("PKT/S", Align::Right),
    ]);
    for x in r
        .reasons
        .iter()
        .filter(|x| x.action != "forward" && x.per_s > 0.0)
    {
        reasons.row(vec![
            x.reason.to_owned(),
            x.action.to_owned(),
            rate(x.per_s),
        ]);
    }
    let mut out = format!("rates over the last {:.1}s\n", r.interval_s);
    out.push_str(&svc.render());
    out.push('\n');
    out.push_str(&ups.render());
    out.push('\n');
    if reasons.is_empty() {
        out.push_str("no passes or drops\n");
    } else {
        out.push_str(&reasons.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(fp: u64, fb: u64, rp: u64, rb: u64, nf: u64) -> TrafficCounters {
        TrafficCounters {
            fwd_packets: fp,
            fwd_bytes: fb,
            rev_packets: rp,
            rev_bytes: rb,
            new_flows: nf,
        }
    }

    fn snapshots() -> (Snapshot, Snapshot) {
        let before = Snapshot {
            t_ns: 1_000_000_000,
            reasons: vec![
                (Reason::FwdTx, 100),
                (Reason::PassNotService, 10),
                (Reason::DropTruncated, 0),
            ],
            services: vec![(1, "10.10.1.1:80".into(), c(100, 10_000, 50, 100_000, 5))],
            upstreams: vec![(3, "10.20.1.2:80".into(), c(100, 10_000, 50, 100_000, 5))],
        };
        let now = Snapshot {
            t_ns: 3_000_000_000,
            reasons: vec![
                (Reason::FwdTx, 300),
                (Reason::PassNotService, 14),
                (Reason::DropTruncated, 2),
            ],
            services: vec![
                (
                    1,
                    "10.10.1.1:80".into(),
                    c(300, 260_000, 150, 2_600_000, 25),
                ),
                (2, "10.10.1.1:53".into(), c(4, 400, 4, 400, 2)),
            ],
            // Reset (new id at the same slot): counts from zero.
            upstreams: vec![(3, "10.20.1.9:80".into(), c(10, 1000, 0, 0, 1))],
        };
        (before, now)
    }

    #[test]
    fn rates_are_deltas_over_elapsed() {
        let (before, now) = snapshots();
        let mut names = Names::default();
        names.services.insert(1, "web".into());
        let r = rates(&before, &now, &names);
        assert!((r.interval_s - 2.0).abs() < 1e-12);
        let web = &r.services[0];
        assert_eq!(web.name.as_deref(), Some("web"));
        assert!((web.fwd_pps - 100.0).abs() < 1e-9);
        assert!((web.rev_pps - 50.0).abs() < 1e-9);
        assert!((web.fwd_bps - 1_000_000.0).abs() < 1e-6);
        assert!((web.rev_bps - 10_000_000.0).abs() < 1e-6);
        assert!((web.new_flows_per_s - 10.0).abs() < 1e-9);
        let dns = &r.services[1];
        assert!((dns.fwd_pps - 2.0).abs() < 1e-9 && dns.name.is_none());
        let ups = &r.upstreams[0];
        assert!((ups.fwd_pps - 5.0).abs() < 1e-9 && (ups.new_flows_per_s - 0.5).abs() < 1e-9);
        let per: Vec<(&str, &str, f64)> = r
            .reasons
            .iter()
            .map(|x| (x.reason, x.action, x.per_s))
            .collect();
        assert_eq!(
            per,
            [
                ("fwd_tx", "forward", 100.0),
                ("pass_not_service", "pass", 2.0),
                ("drop_truncated", "drop", 1.0)
            ]
        );
        // Same instant: no division by zero.
        let z = rates(&now, &now, &names);
        assert!(z.services.iter().all(|s| s.fwd_pps == 0.0));
    }

    #[test]
    fn table_snapshot() {
        let (before, now) = snapshots();
        let mut names = Names::default();
        names.services.insert(1, "web".into());
        names
            .upstream_users
            .insert(3, vec!["web".into(), "dns".into()]);
        assert_eq!(
            render(&rates(&before, &now, &names)),
            "\
rates over the last 2.0s
SVC  NAME  ADDR          PKT/S FWD  PKT/S REV   BIT/S FWD    BIT/S REV  NEW FLOWS/S
  1  web   10.10.1.1:80      100.0       50.0  1.0 Mbit/s  10.0 Mbit/s         10.0
  2  -     10.10.1.1:53        2.0        2.0  1.6 Kbit/s   1.6 Kbit/s          1.0

UPS  NAME     ADDR          PKT/S FWD  PKT/S REV   BIT/S FWD  BIT/S REV  NEW FLOWS/S
  3  web,dns  10.20.1.9:80        5.0          0  4.0 Kbit/s    0 bit/s          0.5

REASON            ACTION  PKT/S
pass_not_service  pass      2.0
drop_truncated    drop      1.0
"
        );
    }
}
