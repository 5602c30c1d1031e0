//! What the admin listener reports, as plain data ([`Snapshot`]), and its two renderings: the
//! Prometheus text exposition format ([`render_prometheus`]) and the `/status` JSON
//! ([`status_json`]). Pure: no maps, no sockets; the admin module fills a [`Snapshot`].
//!
//! Series (every counter is cumulative since the maps were created: pinned maps keep counting
//! across daemon restarts):
//! - `xdp_proxy_build_info{version}` 1; `xdp_proxy_ready` 1 while the datapath is attached and
//!   the config loaded (what /healthz answers);
//! - `xdp_proxy_datapath_mode{mode}` 1 for the mode in use (`native`, `generic`, `userspace`),
//!   0 for the others; `xdp_proxy_datapath_interface_attached{interface,mode,adopted}`;
//!   `xdp_proxy_interface_kernel_drops_total{interface,counter}` (the kernel's IFLA_STATS64
//!   drop and error counters of each attached interface);
//! - `xdp_proxy_datapath_packets_total{reason,action}`: one per datapath reason (drops and
//!   passes by reason; action = tx, redirect, pass, drop, aborted);
//! - per service `{service,listen,protocol}`: `xdp_proxy_service_packets_total{direction}`,
//!   `xdp_proxy_service_bytes_total{direction}` (direction = `to_upstream` | `to_client`),
//!   `xdp_proxy_service_new_flows_total`, `xdp_proxy_service_active_flows`,
//!   `xdp_proxy_service_has_upstreams`;
//! - per upstream address `{upstream}` (an address shared by services counts once):
//!   `xdp_proxy_upstream_packets_total{direction}`, `xdp_proxy_upstream_bytes_total{direction}`,
//!   `xdp_proxy_upstream_new_flows_total`, `xdp_proxy_upstream_active_flows`;
//! - per service and upstream `{service,upstream,address}`: `xdp_proxy_upstream_healthy`,
//!   `xdp_proxy_upstream_in_table`, `xdp_proxy_upstream_weight`, `xdp_proxy_upstream_draining`;
//! - `xdp_proxy_flows_active` (forward flows after the last expiry scan), `xdp_proxy_reloads_total`,
//!   `xdp_proxy_reload_failures_total`, `xdp_proxy_dns_failures_total`,
//!   `xdp_proxy_access_log_dropped_total` (access log lines the buffered writer dropped rather
//!   than block the proxy).
//!
//! - userspace data paths (userspace L4, and the L7 proxy of http services), per service
//!   `{service,listen,protocol,layer}` (layer = `l4` | `http`):
//!   `xdp_proxy_userspace_connections_total` (TCP connections connected to an upstream, UDP
//!   sessions opened, HTTP client connections accepted), `xdp_proxy_userspace_active_connections`,
//!   `xdp_proxy_userspace_bytes_total{direction}` (payload bytes; for http, bytes of the client
//!   connection, headers included), `xdp_proxy_userspace_connect_failures_total` (upstream
//!   connects that failed), `xdp_proxy_userspace_no_upstream_total` (refused: no healthy
//!   upstream), `xdp_proxy_userspace_dropped_total` (UDP datagrams of new clients beyond the
//!   session limit), `xdp_proxy_userspace_refused_total{reason}` (new connections, or UDP
//!   datagrams that would open a session, refused by the service's `allow` / `deny` lists or
//!   new-flow rate; reason = `drop_acl_denied` | `drop_acl_not_allowed` | `drop_rate_limited`,
//!   the fast path's reason names, whose XDP counts are in `xdp_proxy_datapath_packets_total`),
//!   `xdp_proxy_userspace_http_responses_total{class}` (class = `1xx`..`5xx`,
//!   http only, the proxy's own 502/503/504 included); per service and upstream
//!   `{service,layer,upstream}`: `xdp_proxy_userspace_upstream_connections_total` (http:
//!   requests sent), `xdp_proxy_userspace_upstream_active_connections` (l4 only),
//!   `xdp_proxy_userspace_upstream_bytes_total{direction}` (l4 only),
//!   `xdp_proxy_userspace_upstream_connect_failures_total`. These count since the daemon started.
//!
//! Active flow gauges come from the expiry scan (every second by default), not from a scan per
//! scrape; they are absent until the first scan.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::SocketAddr,
};

use serde::Serialize;
use serde_json::{Value, json};

use crate::state::Status;

/// Traffic counters of one service or upstream id (summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    pub rev_packets: u64,
    pub rev_bytes: u64,
    pub new_flows: u64,
}

impl From<proxy_common::TrafficCounters> for Counters {
    fn from(c: proxy_common::TrafficCounters) -> Self {
        Self {
            fwd_packets: c.fwd_packets,
            fwd_bytes: c.fwd_bytes,
            rev_packets: c.rev_packets,
            rev_bytes: c.rev_bytes,
            new_flows: c.new_flows,
        }
    }
}

/// Traffic counters of a userspace service, or of one upstream address of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UserspaceTraffic {
    /// Connections / sessions opened (per http upstream: requests sent).
    pub opened: u64,
    /// Open now.
    pub active: u64,
    pub bytes_to_upstream: u64,
    pub bytes_to_client: u64,
    pub connect_failures: u64,
}

/// Counters of one service the daemon serves itself (userspace L4 or http).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UserspaceService {
    pub name: String,
    pub listen: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// `l4` or `http`.
    pub layer: String,
    #[serde(flatten)]
    pub traffic: UserspaceTraffic,
    /// New connections or sessions refused: no healthy upstream (http: requests answered 503
    /// without trying).
    pub no_upstream: u64,
    /// UDP datagrams of new clients dropped at the session limit.
    pub dropped: u64,
    /// New connections (UDP: datagrams that would open a session) refused by the service's
    /// `allow` / `deny` lists and new-flow rate, by the fast path's reason name
    /// (`drop_acl_denied`, `drop_acl_not_allowed`, `drop_rate_limited`).
    pub refused: BTreeMap<String, u64>,
    /// http responses by class (`1xx`..`5xx`).
    pub http_responses: BTreeMap<String, u64>,
    /// Per upstream address (`a.b.c.d:port` or `[v6]:port`).
    pub upstreams: BTreeMap<String, UserspaceTraffic>,
}

/// One XDP attachment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InterfaceStatus {
    pub name: String,
    /// `native` or `generic`.
    pub mode: String,
    /// Adopted from a pinned link left by an earlier daemon.
    pub adopted: bool,
    /// Where the link is pinned (`None`: netlink attachment, not pinned).
    pub pin: Option<String>,
    /// The kernel's drop and error counters of the interface (`None`: unreadable).
    pub kernel: Option<crate::netdev::Delivery>,
    /// Frames the kernel dropped leaving the interface since this daemon attached
    /// (`tx_dropped + tx_errors`; `None`: unknown).
    pub lost_outbound_since_attach: Option<u64>,
}

/// Everything the admin endpoints show, read at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub version: String,
    /// `native`, `generic` (the attachments' mode; `mixed` when they differ) or `userspace`.
    pub mode: String,
    /// Interfaces the config names.
    pub configured_interfaces: Vec<String>,
    pub interfaces: Vec<InterfaceStatus>,
    /// The config is loaded and its plan written to the maps.
    pub config_loaded: bool,
    /// Why the datapath could not be read, if it could not.
    pub datapath_error: Option<String>,
    pub status: Status,
    /// Every reason counter in index order: (name, action, packets).
    pub reasons: Vec<(String, String, u64)>,
    pub service_counters: BTreeMap<u32, Counters>,
    pub upstream_counters: BTreeMap<u32, Counters>,
    /// Forward flows after the last expiry scan: total, per service id, per upstream id.
    pub flows: Option<FlowCounts>,
    /// Services the daemon serves itself (userspace L4, http), with their counters.
    pub userspace_services: Vec<UserspaceService>,
    /// Access log lines dropped because the log writer's buffer was full (`logging`).
    pub access_log_dropped: u64,
}

/// Active flow counts from the last expiry scan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowCounts {
    pub total: u64,
    pub per_service: BTreeMap<u32, u64>,
    pub per_upstream: BTreeMap<u32, u64>,
}

/// The XDP action name of a reason (a metric label).
#[must_use]
pub fn action_name(action: u32) -> &'static str {
    match action {
        proxy_common::XDP_TX => "tx",
        proxy_common::XDP_REDIRECT => "redirect",
        proxy_common::XDP_PASS => "pass",
        proxy_common::XDP_DROP => "drop",
        _ => "aborted",
    }
}

impl Snapshot {
    /// Healthy for the front load balancer: config loaded, every configured interface
    /// attached, the maps readable. `Err` says why not.
    ///
    /// # Errors
    /// The reason the proxy is not ready, as one line.
    pub fn health(&self) -> Result<(), String> {
        if !self.config_loaded {
            return Err("config not loaded".to_owned());
        }
        // The userspace datapath (configured, or fallen back to when XDP could not attach)
        // serves every service: the host stays in the load balancer. That it runs without XDP
        // is visible in /status and in `xdp_proxy_datapath_mode`, where an alert belongs;
        // failing the target health check instead would pull every host that fell back, and
        // with all of them the whole service.
        if self.mode == "userspace" {
            return Ok(());
        }
        if let Some(e) = &self.datapath_error {
            return Err(format!("datapath unreadable: {e}"));
        }
        let attached: BTreeSet<&str> = self.interfaces.iter().map(|i| i.name.as_str()).collect();
        let missing: Vec<&str> = self
            .configured_interfaces
            .iter()
            .map(String::as_str)
            .filter(|i| !attached.contains(i))
            .collect();
        if !missing.is_empty() || self.configured_interfaces.is_empty() {
            return Err(format!(
                "XDP not attached to: {}",
                if missing.is_empty() {
                    "(no interface configured)".to_owned()
                } else {
                    missing.join(", ")
                }
            ));
        }
        Ok(())
    }
}

/// Escape a Prometheus label value (backslash, double quote, newline).
#[must_use]
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Series of one metric family, written with its HELP and TYPE lines once.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn new<'a>(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// Render `s` in the Prometheus text exposition format (version 0.0.4).
#[must_use]
pub fn render_prometheus(s: &Snapshot) -> String {
    let mut out = String::new();
    let o = &mut out;

    let n = "xdp_proxy_build_info";
    Family::new(o, n, "gauge", "Build of the running daemon.").sample(
        n,
        &[("version", &s.version)],
        1,
    );
    let n = "xdp_proxy_ready";
    Family::new(
        o,
        n,
        "gauge",
        "1 while the datapath is attached and the config loaded (what /healthz answers).",
    )
    .sample(n, &[], u64::from(s.health().is_ok()));

    let n = "xdp_proxy_datapath_mode";
    let mut f = Family::new(
        o,
        n,
        "gauge",
        "The datapath mode in use (1) among all modes.",
    );
    for mode in ["native", "generic", "userspace"] {
        f.sample(n, &[("mode", mode)], u64::from(s.mode == mode));
    }
    let n = "xdp_proxy_datapath_interface_attached";
    let mut f = Family::new(o, n, "gauge", "XDP attachments of this daemon.");
    for i in &s.interfaces {
        let adopted = if i.adopted { "true" } else { "false" };
        f.sample(
            n,
            &[
                ("interface", &i.name),
                ("mode", &i.mode),
                ("adopted", adopted),
            ],
            1,
        );
    }
    let n = "xdp_proxy_interface_kernel_drops_total";
    let mut f = Family::new(
        o,
        n,
        "counter",
        "Frames lost on each attached interface as the kernel counts them, beside the program's \
         counters: the device's drop and error counters (IFLA_STATS64) and xdp_xmit_drops, frames \
         the program sent that the kernel then failed to transmit (xdp tracepoints; a veth peer \
         without GRO or an XDP program shows here).",
    );
    for i in &s.interfaces {
        if let Some(k) = &i.kernel {
            for (counter, v) in [
                ("rx_dropped", k.rx_dropped),
                ("tx_dropped", k.tx_dropped),
                ("rx_errors", k.rx_errors),
                ("tx_errors", k.tx_errors),
                ("xdp_xmit_drops", k.xdp_xmit_drops),
            ] {
                f.sample(n, &[("interface", &i.name), ("counter", counter)], v);
            }
        }
    }

    let n = "xdp_proxy_datapath_packets_total";
    let mut f = Family::new(
        o,
        n,
        "counter",
        "Packets seen by the XDP program, by the reason of its verdict.",
    );
    for (reason, action, v) in &s.reasons {
        f.sample(n, &[("reason", reason), ("action", action)], *v);
    }

    render_services(o, s);
    render_upstreams(o, s);
    render_userspace(o, &s.userspace_services);

    if let Some(flows) = &s.flows {
        let n = "xdp_proxy_flows_active";
        Family::new(
            o,
            n,
            "gauge",
            "Forward flows in the flow table after the last expiry scan.",
        )
        .sample(n, &[], flows.total);
    }
    for (n, help, v) in [
        (
            "xdp_proxy_reloads_total",
            "Config reloads applied.",
            s.status.reloads,
        ),
        (
            "xdp_proxy_reload_failures_total",
            "Config reloads refused (the running config stayed).",
            s.status.reload_failures,
        ),
        (
            "xdp_proxy_dns_failures_total",
            "Upstream name resolutions that failed (the last addresses were kept).",
            s.status.dns_failures,
        ),
        (
            "xdp_proxy_access_log_dropped_total",
            "Access log lines dropped because the log writer fell behind (never blocks the proxy).",
            s.access_log_dropped,
        ),
    ] {
        Family::new(o, n, "counter", help).sample(n, &[], v);
    }
    out
}

fn render_services(o: &mut String, s: &Snapshot) {
    let with_id: Vec<_> = s
        .status
        .services
        .iter()
        .filter_map(|svc| svc.id.map(|id| (id, svc)))
        .collect();
    let labels = |svc: &crate::state::ServiceStatus| {
        [
            ("service", svc.name.clone()),
            ("listen", svc.listen.to_string()),
            ("protocol", svc.protocol.clone()),
        ]
    };
    for (n, help, pick) in [
        (
            "xdp_proxy_service_packets_total",
            "Packets forwarded by XDP for the service, by direction.",
            (|c: &Counters| (c.fwd_packets, c.rev_packets)) as fn(&Counters) -> (u64, u64),
        ),
        (
            "xdp_proxy_service_bytes_total",
            "Bytes (IP length) forwarded by XDP for the service, by direction.",
            |c: &Counters| (c.fwd_bytes, c.rev_bytes),
        ),
    ] {
        let mut f = Family::new(o, n, "counter", help);
        for (id, svc) in &with_id {
            let c = s.service_counters.get(id).copied().unwrap_or_default();
            let (up, down) = pick(&c);
            let l = labels(svc);
            for (dir, v) in [("to_upstream", up), ("to_client", down)] {
                f.sample(
                    n,
                    &[
                        (l[0].0, &l[0].1),
                        (l[1].0, &l[1].1),
                        (l[2].0, &l[2].1),
                        ("direction", dir),
                    ],
                    v,
                );
            }
        }
    }
    let n = "xdp_proxy_service_new_flows_total";
    let mut f = Family::new(o, n, "counter", "Flows created by XDP for the service.");
    for (id, svc) in &with_id {
        let c = s.service_counters.get(id).copied().unwrap_or_default();
        let l = labels(svc);
        f.sample(
            n,
            &[(l[0].0, &l[0].1), (l[1].0, &l[1].1), (l[2].0, &l[2].1)],
            c.new_flows,
        );
    }
    if let Some(flows) = &s.flows {
        let n = "xdp_proxy_service_active_flows";
        let mut f = Family::new(
            o,
            n,
            "gauge",
            "Flows of the service in the flow table after the last expiry scan.",
        );
        for (id, svc) in &with_id {
            let l = labels(svc);
            f.sample(
                n,
                &[(l[0].0, &l[0].1), (l[1].0, &l[1].1), (l[2].0, &l[2].1)],
                flows.per_service.get(id).copied().unwrap_or(0),
            );
        }
    }
    let n = "xdp_proxy_service_has_upstreams";
    let mut f = Family::new(
        o,
        n,
        "gauge",
        "1 when new flows of the service find an upstream.",
    );
    for svc in &s.status.services {
        let l = labels(svc);
        f.sample(
            n,
            &[(l[0].0, &l[0].1), (l[1].0, &l[1].1), (l[2].0, &l[2].1)],
            u64::from(svc.has_upstreams),
        );
    }
}

fn render_upstreams(o: &mut String, s: &Snapshot) {
    // Upstream ids are per address: one series per id, labelled with its address.
    let mut by_id: BTreeMap<u32, SocketAddr> = BTreeMap::new();
    for svc in &s.status.services {
        for u in &svc.upstreams {
            if let (Some(id), Some(addr)) = (u.id, u.resolved) {
                by_id.insert(id, addr);
            }
        }
    }
    for (n, help, pick) in [
        (
            "xdp_proxy_upstream_packets_total",
            "Packets forwarded by XDP to and from the upstream address, by direction.",
            (|c: &Counters| (c.fwd_packets, c.rev_packets)) as fn(&Counters) -> (u64, u64),
        ),
        (
            "xdp_proxy_upstream_bytes_total",
            "Bytes (IP length) forwarded by XDP to and from the upstream address.",
            |c: &Counters| (c.fwd_bytes, c.rev_bytes),
        ),
    ] {
        let mut f = Family::new(o, n, "counter", help);
        for (id, addr) in &by_id {
            let c = s.upstream_counters.get(id).copied().unwrap_or_default();
            let (up, down) = pick(&c);
            let a = addr.to_string();
            f.sample(n, &[("upstream", &a), ("direction", "to_upstream")], up);
            f.sample(n, &[("upstream", &a), ("direction", "to_client")], down);
        }
    }
    let n = "xdp_proxy_upstream_new_flows_total";
    let mut f = Family::new(o, n, "counter", "Flows XDP sent to the upstream address.");
    for (id, addr) in &by_id {
        let c = s.upstream_counters.get(id).copied().unwrap_or_default();
        f.sample(n, &[("upstream", &addr.to_string())], c.new_flows);
    }
    if let Some(flows) = &s.flows {
        let n = "xdp_proxy_upstream_active_flows";
        let mut f = Family::new(
            o,
            n,
            "gauge",
            "Flows to the upstream address after the last expiry scan.",
        );
        for (id, addr) in &by_id {
            f.sample(
                n,
                &[("upstream", &addr.to_string())],
                flows.per_upstream.get(id).copied().unwrap_or(0),
            );
        }
    }
    type Pick = fn(&crate::state::UpstreamStatus) -> u64;
    let gauges: [(&str, &str, Pick); 4] = [
        (
            "xdp_proxy_upstream_healthy",
            "1 while the health checks see the upstream healthy.",
            |u| u64::from(u.healthy),
        ),
        (
            "xdp_proxy_upstream_in_table",
            "1 when the upstream has slots in the service's Maglev table.",
            |u| u64::from(u.in_table),
        ),
        (
            "xdp_proxy_upstream_weight",
            "Configured weight of the upstream.",
            |u| u64::from(u.weight),
        ),
        (
            "xdp_proxy_upstream_draining",
            "1 when the upstream drains (no new flows).",
            |u| u64::from(u.drain),
        ),
    ];
    for (n, help, pick) in gauges {
        let mut f = Family::new(o, n, "gauge", help);
        for svc in &s.status.services {
            for u in &svc.upstreams {
                let resolved = u.resolved.map(|a| a.to_string()).unwrap_or_default();
                f.sample(
                    n,
                    &[
                        ("service", &svc.name),
                        ("upstream", &resolved),
                        ("address", &u.address),
                    ],
                    pick(u),
                );
            }
        }
    }
}

fn render_userspace(o: &mut String, services: &[UserspaceService]) {
    if services.is_empty() {
        return;
    }
    let labels = |s: &UserspaceService| -> [(&'static str, String); 4] {
        [
            ("service", s.name.clone()),
            ("listen", s.listen.clone()),
            ("protocol", s.protocol.clone()),
            ("layer", s.layer.clone()),
        ]
    };
    let refs = |l: &[(&'static str, String)]| -> Vec<(&'static str, String)> { l.to_vec() };
    let sample = |f: &mut Family<'_>, n: &str, l: &[(&'static str, String)], v: u64| {
        let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
        f.sample(n, &l, v);
    };
    type Pick = fn(&UserspaceService) -> u64;
    let per_service: [(&str, &str, &str, Pick); 5] = [
        (
            "xdp_proxy_userspace_connections_total",
            "counter",
            "Connections (UDP: sessions) the daemon opened to an upstream; http: client \
             connections accepted.",
            |s| s.traffic.opened,
        ),
        (
            "xdp_proxy_userspace_active_connections",
            "gauge",
            "Connections (UDP: sessions) open now.",
            |s| s.traffic.active,
        ),
        (
            "xdp_proxy_userspace_connect_failures_total",
            "counter",
            "Upstream connects that failed.",
            |s| s.traffic.connect_failures,
        ),
        (
            "xdp_proxy_userspace_no_upstream_total",
            "counter",
            "Connections, sessions or requests refused because no upstream was healthy.",
            |s| s.no_upstream,
        ),
        (
            "xdp_proxy_userspace_dropped_total",
            "counter",
            "UDP datagrams of new clients dropped at the session limit.",
            |s| s.dropped,
        ),
    ];
    for (n, kind, help, pick) in per_service {
        let mut f = Family::new(o, n, kind, help);
        for s in services {
            sample(&mut f, n, &labels(s), pick(s));
        }
    }
    let n = "xdp_proxy_userspace_bytes_total";
    let mut f = Family::new(
        o,
        n,
        "counter",
        "Bytes the daemon relayed for the service, by direction (http: client connection bytes).",
    );
    for s in services {
        for (dir, v) in [
            ("to_upstream", s.traffic.bytes_to_upstream),
            ("to_client", s.traffic.bytes_to_client),
        ] {
            let mut l = refs(&labels(s));
            l.push(("direction", dir.to_owned()));
            sample(&mut f, n, &l, v);
        }
    }
    let n = "xdp_proxy_userspace_refused_total";
    let mut f = Family::new(
        o,
        n,
        "counter",
        "New connections (UDP: datagrams that would open a session) refused by the service's \
         allow/deny lists or new-flow rate, by the datapath reason name.",
    );
    for s in services {
        for (reason, v) in &s.refused {
            let mut l = refs(&labels(s));
            l.push(("reason", reason.clone()));
            sample(&mut f, n, &l, *v);
        }
    }
    let n = "xdp_proxy_userspace_http_responses_total";
    let mut f = Family::new(
        o,
        n,
        "counter",
        "Responses of http services by status class (the proxy's own 502/503/504 included).",
    );
    for s in services.iter().filter(|s| s.layer == "http") {
        for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
            let mut l = refs(&labels(s));
            l.push(("class", class.to_owned()));
            sample(
                &mut f,
                n,
                &l,
                s.http_responses.get(class).copied().unwrap_or(0),
            );
        }
    }
    let up_labels = |s: &UserspaceService, a: &str| -> Vec<(&'static str, String)> {
        vec![
            ("service", s.name.clone()),
            ("layer", s.layer.clone()),
            ("upstream", a.to_owned()),
        ]
    };
    type UpPick = fn(&UserspaceTraffic) -> u64;
    let per_upstream: [(&str, &str, &str, bool, UpPick); 3] = [
        (
            "xdp_proxy_userspace_upstream_connections_total",
            "counter",
            "Connections (UDP: sessions; http: requests) the daemon sent to the upstream.",
            true,
            |t| t.opened,
        ),
        (
            "xdp_proxy_userspace_upstream_active_connections",
            "gauge",
            "Connections (UDP: sessions) to the upstream open now (l4 only).",
            false,
            |t| t.active,
        ),
        (
            "xdp_proxy_userspace_upstream_connect_failures_total",
            "counter",
            "Connects to the upstream that failed.",
            true,
            |t| t.connect_failures,
        ),
    ];
    for (n, kind, help, http_too, pick) in per_upstream {
        let mut f = Family::new(o, n, kind, help);
        for s in services.iter().filter(|s| http_too || s.layer != "http") {
            for (a, t) in &s.upstreams {
                sample(&mut f, n, &up_labels(s, a), pick(t));
            }
        }
    }
    let n = "xdp_proxy_userspace_upstream_bytes_total";
    let mut f = Family::new(
        o,
        n,
        "counter",
        "Bytes the daemon relayed to and from the upstream, by direction (l4 only).",
    );
    for s in services.iter().filter(|s| s.layer != "http") {
        for (a, t) in &s.upstreams {
            for (dir, v) in [
                ("to_upstream", t.bytes_to_upstream),
                ("to_client", t.bytes_to_client),
            ] {
                let mut l = up_labels(s, a);
                l.push(("direction", dir.to_owned()));
                sample(&mut f, n, &l, v);
            }
        }
    }
}

/// The `/status` document.
#[must_use]
pub fn status_json(s: &Snapshot) -> Value {
    let services: Vec<Value> = s
        .status
        .services
        .iter()
        .map(|svc| {
            let counters = svc
                .id
                .map(|id| s.service_counters.get(&id).copied().unwrap_or_default());
            let active = svc.id.and_then(|id| {
                s.flows
                    .as_ref()
                    .map(|f| f.per_service.get(&id).copied().unwrap_or(0))
            });
            let upstreams: Vec<Value> = svc
                .upstreams
                .iter()
                .map(|u| {
                    let counters =
                        u.id.map(|id| s.upstream_counters.get(&id).copied().unwrap_or_default());
                    let active = u.id.and_then(|id| {
                        s.flows
                            .as_ref()
                            .map(|f| f.per_upstream.get(&id).copied().unwrap_or(0))
                    });
                    json!({
                        "address": u.address,
                        "resolved": u.resolved.map(|a| a.to_string()),
                        "id": u.id,
                        "weight": u.weight,
                        "drain": u.drain,
                        "healthy": u.healthy,
                        "in_table": u.in_table,
                        "last_error": u.last_error,
                        "counters": counters,
                        "active_flows": active,
                    })
                })
                .collect();
            json!({
                "name": svc.name,
                "listen": svc.listen.to_string(),
                "protocol": svc.protocol,
                "mode": svc.mode,
                "id": svc.id,
                "has_upstreams": svc.has_upstreams,
                "counters": counters,
                "active_flows": active,
                "upstreams": upstreams,
            })
        })
        .collect();
    let reasons: serde_json::Map<String, Value> = s
        .reasons
        .iter()
        .map(|(name, _, v)| (name.clone(), Value::from(*v)))
        .collect();
    let health = s.health();
    json!({
        "version": s.version,
        "ready": health.is_ok(),
        "not_ready_reason": health.err(),
        "config": s.status.config,
        "reloads": s.status.reloads,
        "reload_failures": s.status.reload_failures,
        "last_reload_error": s.status.last_reload_error,
        "dns_failures": s.status.dns_failures,
        "dns_refused_addresses": s.status.dns_refused_addresses,
        "datapath": {
            "mode": s.mode,
            "configured_interfaces": s.configured_interfaces,
            "interfaces": s.interfaces,
            "error": s.datapath_error,
        },
        "flows": s.flows.as_ref().map(|f| json!({"active": f.total})),
        "reasons": reasons,
        "services": services,
        "userspace_services": s.userspace_services,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ServiceStatus, UpstreamStatus};

    fn sample() -> Snapshot {
        let up = |addr: &str, id, healthy| UpstreamStatus {
            address: addr.to_owned(),
            resolved: Some(addr.parse().unwrap()),
            id: Some(id),
            weight: 1,
            drain: false,
            healthy,
            in_table: healthy,
            last_error: None,
        };
        let mut service_counters = BTreeMap::new();
        service_counters.insert(
            1,
            Counters {
                fwd_packets: 10,
                fwd_bytes: 1000,
                rev_packets: 20,
                rev_bytes: 30_000,
                new_flows: 3,
            },
        );
        let mut upstream_counters = BTreeMap::new();
        upstream_counters.insert(
            7,
            Counters {
                fwd_packets: 6,
                fwd_bytes: 600,
                rev_packets: 12,
                rev_bytes: 18_000,
                new_flows: 2,
            },
        );
        Snapshot {
            version: "0.1.0".to_owned(),
            mode: "native".to_owned(),
            configured_interfaces: vec!["eth0".to_owned()],
            interfaces: vec![InterfaceStatus {
                name: "eth0".to_owned(),
                mode: "native".to_owned(),
                adopted: true,
                pin: Some("/sys/fs/bpf/xdp-proxy/v1/link_native_eth0".to_owned()),
                kernel: Some(crate::netdev::Delivery {
                    rx_dropped: 1,
                    tx_dropped: 42,
                    rx_errors: 0,
                    tx_errors: 3,
                    xdp_xmit_drops: 7,
                }),
                lost_outbound_since_attach: Some(52),
            }],
            config_loaded: true,
            datapath_error: None,
            status: Status {
                config: "/etc/xdp-proxy.toml".to_owned(),
                services: vec![ServiceStatus {
                    name: "web \"main\"".to_owned(),
                    listen: "10.10.1.1:80".parse().unwrap(),
                    protocol: "tcp".to_owned(),
                    mode: "l4".to_owned(),
                    id: Some(1),
                    has_upstreams: true,
                    upstreams: vec![up("10.20.1.2:80", 7, true), up("10.20.1.3:80", 8, false)],
                }],
                ..Status::default()
            },
            reasons: vec![
                ("fwd_tx".to_owned(), "tx".to_owned(), 5),
                ("drop_snat_exhausted".to_owned(), "drop".to_owned(), 2),
            ],
            service_counters,
            upstream_counters,
            flows: Some(FlowCounts {
                total: 4,
                per_service: [(1, 4)].into_iter().collect(),
                per_upstream: [(7, 3), (8, 1)].into_iter().collect(),
            }),
            userspace_services: Vec::new(),
            access_log_dropped: 3,
        }
    }

    #[test]
    fn userspace_series() {
        let mut s = sample();
        assert!(!render_prometheus(&s).contains("xdp_proxy_userspace_"));
        let t = |opened, active, up, down, fails| UserspaceTraffic {
            opened,
            active,
            bytes_to_upstream: up,
            bytes_to_client: down,
            connect_failures: fails,
        };
        s.userspace_services = vec![
            UserspaceService {
                name: "dns".to_owned(),
                listen: "10.0.0.1:53".to_owned(),
                protocol: "udp".to_owned(),
                layer: "l4".to_owned(),
                traffic: t(3, 2, 100, 200, 1),
                no_upstream: 4,
                dropped: 5,
                refused: [
                    ("drop_acl_denied".to_owned(), 6),
                    ("drop_rate_limited".to_owned(), 7),
                ]
                .into_iter()
                .collect(),
                http_responses: BTreeMap::new(),
                upstreams: [("10.1.0.2:53".to_owned(), t(3, 2, 100, 200, 1))]
                    .into_iter()
                    .collect(),
            },
            UserspaceService {
                name: "api".to_owned(),
                listen: "10.0.0.1:8080".to_owned(),
                protocol: "tcp".to_owned(),
                layer: "http".to_owned(),
                traffic: t(7, 1, 1000, 9000, 2),
                no_upstream: 0,
                dropped: 0,
                refused: [("drop_acl_not_allowed".to_owned(), 8)]
                    .into_iter()
                    .collect(),
                http_responses: [("2xx".to_owned(), 9), ("5xx".to_owned(), 1)]
                    .into_iter()
                    .collect(),
                upstreams: [("10.1.0.3:80".to_owned(), t(10, 0, 0, 0, 2))]
                    .into_iter()
                    .collect(),
            },
        ];
        let text = render_prometheus(&s);
        let got = samples(&text);
        let dns = r#"service="dns",listen="10.0.0.1:53",protocol="udp",layer="l4""#;
        let api = r#"service="api",listen="10.0.0.1:8080",protocol="tcp",layer="http""#;
        for (k, v) in [
            (format!("xdp_proxy_userspace_connections_total{{{dns}}}"), 3),
            (format!("xdp_proxy_userspace_active_connections{{{dns}}}"), 2),
            (format!("xdp_proxy_userspace_connect_failures_total{{{dns}}}"), 1),
            (format!("xdp_proxy_userspace_no_upstream_total{{{dns}}}"), 4),
            (format!("xdp_proxy_userspace_dropped_total{{{dns}}}"), 5),
            (
                format!(
                    "xdp_proxy_userspace_refused_total{{{dns},reason=\"drop_acl_denied\"}}"
                ),
                6,
            ),
            (
                format!(
                    "xdp_proxy_userspace_refused_total{{{dns},reason=\"drop_rate_limited\"}}"
                ),
                7,
            ),
            (
                format!(
                    "xdp_proxy_userspace_refused_total{{{api},reason=\"drop_acl_not_allowed\"}}"
                ),
                8,
            ),
            (
                format!("xdp_proxy_userspace_bytes_total{{{dns},direction=\"to_upstream\"}}"),
                100,
            ),
            (
                format!("xdp_proxy_userspace_bytes_total{{{api},direction=\"to_client\"}}"),
                9000,
            ),
            (
                format!("xdp_proxy_userspace_http_responses_total{{{api},class=\"2xx\"}}"),
                9,
            ),
            (
                format!("xdp_proxy_userspace_http_responses_total{{{api},class=\"4xx\"}}"),
                0,
            ),
            (
                r#"xdp_proxy_userspace_upstream_connections_total{service="api",layer="http",upstream="10.1.0.3:80"}"#.to_owned(),
                10,
            ),
            (
                r#"xdp_proxy_userspace_upstream_connect_failures_total{service="api",layer="http",upstream="10.1.0.3:80"}"#.to_owned(),
                2,
            ),
            (
                r#"xdp_proxy_userspace_upstream_bytes_total{service="dns",layer="l4",upstream="10.1.0.2:53",direction="to_client"}"#.to_owned(),
                200,
            ),
            (
                r#"xdp_proxy_userspace_upstream_active_connections{service="dns",layer="l4",upstream="10.1.0.2:53"}"#.to_owned(),
                2,
            ),
        ] {
            assert_eq!(got.get(&k), Some(&v), "{k} in\n{text}");
        }
        // No http class series for an l4 service; no byte or active series for http upstreams.
        assert!(!text.contains(r#"http_responses_total{service="dns""#));
        assert!(!text.contains(r#"upstream_bytes_total{service="api""#));
        assert!(!text.contains(r#"upstream_active_connections{service="api""#));
        // Every family's HELP/TYPE once.
        assert_eq!(
            text.matches("# TYPE xdp_proxy_userspace_bytes_total counter")
                .count(),
            1
        );
        let v = status_json(&s);
        assert_eq!(v["userspace_services"][1]["http_responses"]["5xx"], 1);
        assert_eq!(v["userspace_services"][0]["refused"]["drop_acl_denied"], 6);
        assert_eq!(v["userspace_services"][0]["opened"], 3);
        assert_eq!(
            v["userspace_services"][0]["upstreams"]["10.1.0.2:53"]["bytes_to_client"],
            200
        );
    }

    /// `name{labels} value` lines of `text`, as a map from the text before the value.
    fn samples(text: &str) -> BTreeMap<String, u64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').unwrap();
                (k.to_owned(), v.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn prometheus_series_and_values() {
        let text = render_prometheus(&sample());
        let m = samples(&text);
        let svc = r#"service="web \"main\"",listen="10.10.1.1:80",protocol="tcp""#;
        for (key, want) in [
            (r#"xdp_proxy_build_info{version="0.1.0"}"#.to_owned(), 1),
            ("xdp_proxy_ready".to_owned(), 1),
            (r#"xdp_proxy_datapath_mode{mode="native"}"#.to_owned(), 1),
            (r#"xdp_proxy_datapath_mode{mode="generic"}"#.to_owned(), 0),
            (
                r#"xdp_proxy_datapath_packets_total{reason="drop_snat_exhausted",action="drop"}"#
                    .to_owned(),
                2,
            ),
            (
                format!(r#"xdp_proxy_service_packets_total{{{svc},direction="to_upstream"}}"#),
                10,
            ),
            (
                format!(r#"xdp_proxy_service_bytes_total{{{svc},direction="to_client"}}"#),
                30_000,
            ),
            (format!("xdp_proxy_service_new_flows_total{{{svc}}}"), 3),
            (format!("xdp_proxy_service_active_flows{{{svc}}}"), 4),
            (
                r#"xdp_proxy_upstream_packets_total{upstream="10.20.1.2:80",direction="to_client"}"#
                    .to_owned(),
                12,
            ),
            (
                r#"xdp_proxy_upstream_packets_total{upstream="10.20.1.3:80",direction="to_client"}"#
                    .to_owned(),
                0,
            ),
            (
                r#"xdp_proxy_upstream_active_flows{upstream="10.20.1.3:80"}"#.to_owned(),
                1,
            ),
            (
                r#"xdp_proxy_upstream_healthy{service="web \"main\"",upstream="10.20.1.3:80",address="10.20.1.3:80"}"#
                    .to_owned(),
                0,
            ),
            (
                r#"xdp_proxy_upstream_healthy{service="web \"main\"",upstream="10.20.1.2:80",address="10.20.1.2:80"}"#
                    .to_owned(),
                1,
            ),
            (
                r#"xdp_proxy_datapath_interface_attached{interface="eth0",mode="native",adopted="true"}"#
                    .to_owned(),
                1,
            ),
            (
                r#"xdp_proxy_interface_kernel_drops_total{interface="eth0",counter="tx_dropped"}"#
                    .to_owned(),
                42,
            ),
            (
                r#"xdp_proxy_interface_kernel_drops_total{interface="eth0",counter="tx_errors"}"#
                    .to_owned(),
                3,
            ),
            ("xdp_proxy_flows_active".to_owned(), 4),
            ("xdp_proxy_reloads_total".to_owned(), 0),
            ("xdp_proxy_access_log_dropped_total".to_owned(), 3),
        ] {
            assert_eq!(m.get(&key), Some(&want), "{key}\n{text}");
        }
        // Every family has HELP and TYPE exactly once, before its samples.
        let mut seen = BTreeSet::new();
        for l in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = l.split(' ').nth(2).unwrap();
            assert!(seen.insert(name.to_owned()), "TYPE {name} twice");
        }
        for k in m.keys() {
            let family = k.split('{').next().unwrap();
            assert!(seen.contains(family), "{family} has no TYPE line");
        }
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn no_flow_gauges_before_the_first_scan() {
        let mut s = sample();
        s.flows = None;
        let text = render_prometheus(&s);
        assert!(!text.contains("active_flows"), "{text}");
        assert!(!text.contains("xdp_proxy_flows_active"), "{text}");
        assert_eq!(status_json(&s)["flows"], Value::Null);
    }

    #[test]
    fn health_says_why_not() {
        let mut s = sample();
        assert_eq!(s.health(), Ok(()));
        s.configured_interfaces.push("eth1".to_owned());
        assert_eq!(s.health(), Err("XDP not attached to: eth1".to_owned()));
        let text = render_prometheus(&s);
        assert!(text.contains("\nxdp_proxy_ready 0\n"), "{text}");
        s.config_loaded = false;
        assert_eq!(s.health(), Err("config not loaded".to_owned()));
        let mut u = sample();
        u.mode = "userspace".to_owned();
        u.interfaces.clear();
        assert_eq!(u.health(), Ok(()), "the userspace datapath serves: healthy");
        u.config_loaded = false;
        assert_eq!(u.health(), Err("config not loaded".to_owned()));
    }

    #[test]
    fn status_document() {
        let v = status_json(&sample());
        assert_eq!(v["version"], "0.1.0");
        assert_eq!(v["ready"], true);
        assert_eq!(v["datapath"]["mode"], "native");
        assert_eq!(v["datapath"]["interfaces"][0]["name"], "eth0");
        assert_eq!(v["datapath"]["interfaces"][0]["adopted"], true);
        assert_eq!(v["services"][0]["name"], "web \"main\"");
        assert_eq!(v["services"][0]["listen"], "10.10.1.1:80");
        assert_eq!(v["services"][0]["counters"]["rev_bytes"], 30_000);
        assert_eq!(v["services"][0]["active_flows"], 4);
        assert_eq!(v["services"][0]["upstreams"][1]["healthy"], false);
        assert_eq!(v["services"][0]["upstreams"][0]["counters"]["new_flows"], 2);
        assert_eq!(v["services"][0]["upstreams"][1]["active_flows"], 1);
        assert_eq!(v["reasons"]["drop_snat_exhausted"], 2);
        assert_eq!(v["flows"]["active"], 4);
    }

    #[test]
    fn label_escaping() {
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }
}
