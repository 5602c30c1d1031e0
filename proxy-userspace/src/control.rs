//! The control plane: desired state (config + DNS answers + health) reconciled against what the
//! maps hold, writing the minimal difference ([`crate::plan::diff`]).
//!
//! Rules:
//! - A DNS upstream contributes every address its name resolves to, each with the upstream's
//!   weight. Addresses a static upstream could not have are refused (logged, counted, never
//!   written): outside every home CIDR, in a forbidden range (loopback, link-local and the
//!   metadata service, multicast, ...: `config::forbidden_upstream`), or the proxy's own. A
//!   failed resolution, or an answer with no acceptable address, keeps the last good addresses.
//! - An upstream that is unhealthy or draining (`drain = true`, or weight 0) keeps its slot in
//!   `XP_UPSTREAMS` but gets no slot of the Maglev table: no new flows. A service left with no
//!   upstream in its table loses `SERVICE_F_HAS_UPSTREAMS`: new flows are passed to the kernel,
//!   which resets them (counted `pass_no_upstream`).
//! - Existing flows are never cut by the control plane: a flow whose upstream went unhealthy,
//!   was drained or removed, or whose service was removed, keeps forwarding until it ends or
//!   expires idle (a dead upstream's connection fails on its own). The id of a removed upstream
//!   or service is not given to a new one while another id is free, so counters and the ids
//!   live flows carry stay theirs.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use proxy_common::{SERVICE_F_HAS_UPSTREAMS, ServiceKey};

use crate::{
    config::{
        self, Config, HealthConfig, HealthKind, NatSettings, OwnAddress, ServiceConfig,
        ServiceMode, SnatAddrs, UpstreamConfig, UpstreamRefusal,
    },
    dns,
    health::{Health, ProbeResult, Transition},
    plan::{self, DesiredService, MapOp, Plan, PlanError, Reserved},
    state::{ServiceStatus, SharedStatus, Status, UpstreamStatus},
};

/// What a DNS name resolved to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// The last good addresses (empty until the first good answer): A and AAAA records, each
    /// service taking those of its listen family.
    pub addrs: Vec<IpAddr>,
    /// The last failure, cleared by a good answer.
    pub last_error: Option<String>,
}

/// A health check target: one address of one upstream of one service (l4, or http: its
/// upstreams and every route's).
pub type TargetKey = (String, SocketAddr);

/// Split DNS answer addresses into those that may be upstreams and the refused rest, each with
/// why. The rule is the static upstreams' ([`config::refuse_upstream`]): a name can never
/// bring in an address the file could not name. `own`: the proxy's own addresses.
#[must_use]
pub fn filter_answer(
    nat: &NatSettings,
    own: &[OwnAddress],
    addrs: &[IpAddr],
) -> (Vec<IpAddr>, Vec<(IpAddr, UpstreamRefusal)>) {
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for &a in addrs {
        match config::refuse_upstream(nat, own, a) {
            None => ok.push(a),
            Some(why) => refused.push((a, why)),
        }
    }
    (ok, refused)
}

/// The distinct DNS names of the config's L4 services.
#[must_use]
pub fn dns_names(config: &Config) -> BTreeSet<String> {
    config
        .l4_services()
        .flat_map(|(_, s)| s.upstreams.iter().filter_map(|u| u.dns_name()))
        .map(str::to_owned)
        .collect()
}

/// Which records `name` is asked for: A when an IPv4 l4 service uses it, AAAA when an IPv6 one
/// does (an l4 service takes only addresses of its listen family).
#[must_use]
pub fn dns_families(config: &Config, name: &str) -> dns::Families {
    let mut f = dns::Families::default();
    for (_, s) in config.l4_services() {
        if s.upstreams.iter().any(|u| u.dns_name() == Some(name)) {
            if s.listen.is_ipv6() {
                f.v6 = true;
            } else {
                f.v4 = true;
            }
        }
    }
    f
}

/// Per L4 service (config order): each upstream entry with the addresses it stands for now
/// (a static address, or its name's last good addresses; an address already given by an
/// earlier entry of the same service is skipped).
/// One upstream entry with the addresses it stands for now.
type Entry<'a> = (&'a UpstreamConfig, Vec<SocketAddr>);

fn expand<'a>(
    config: &'a Config,
    resolved: &HashMap<String, Resolved>,
) -> Vec<(&'a ServiceConfig, Vec<Entry<'a>>)> {
    config
        .l4_services()
        .map(|(_, s)| {
            let mut seen = HashSet::new();
            let entries = s
                .upstreams
                .iter()
                .map(|u| {
                    let addrs: Vec<SocketAddr> = match u.static_addr() {
                        Some(a) => vec![a],
                        None => u
                            .dns_name()
                            .and_then(|n| resolved.get(n))
                            .map(|r| {
                                r.addrs
                                    .iter()
                                    .filter(|ip| ip.is_ipv6() == s.listen.is_ipv6())
                                    .map(|ip| SocketAddr::new(*ip, u.port))
                                    .collect()
                            })
                            .unwrap_or_default(),
                    };
                    let addrs = addrs.into_iter().filter(|a| seen.insert(*a)).collect();
                    (u, addrs)
                })
                .collect();
            (s, entries)
        })
        .collect()
}

/// Per `mode = "http"` service (config order): the distinct addresses its L7 proxy may send to
/// (its static upstreams, then every route's), checked like an l4 service's upstreams (same
/// `[service.health]`), so the L7 choice skips the unhealthy ones.
fn http_addresses(config: &Config) -> Vec<(&ServiceConfig, Vec<SocketAddr>)> {
    config
        .services
        .iter()
        .filter(|s| s.mode == ServiceMode::Http)
        .map(|s| {
            let mut seen = HashSet::new();
            let routes = s
                .http
                .iter()
                .flat_map(|h| h.routes.iter().flat_map(|r| r.upstreams.iter().copied()));
            let addrs = s
                .upstreams
                .iter()
                .filter_map(UpstreamConfig::static_addr)
                .chain(routes)
                .filter(|a| seen.insert(*a))
                .collect();
            (s, addrs)
        })
        .collect()
}

/// The health check targets of the config (l4 and http services whose check kind is not
/// `none`).
#[must_use]
pub fn health_targets(
    config: &Config,
    resolved: &HashMap<String, Resolved>,
) -> BTreeMap<TargetKey, HealthConfig> {
    let mut out = BTreeMap::new();
    for (s, entries) in expand(config, resolved) {
        if s.health.kind == HealthKind::None {
            continue;
        }
        for (_, addrs) in entries {
            for a in addrs {
                out.insert((s.name.clone(), a), s.health.clone());
            }
        }
    }
    for (s, addrs) in http_addresses(config) {
        if s.health.kind == HealthKind::None {
            continue;
        }
        for a in addrs {
            out.insert((s.name.clone(), a), s.health.clone());
        }
    }
    out
}

/// The desired L4 services: every address with its Maglev weight (0 when draining or
/// unhealthy; an address without health state counts as healthy).
#[must_use]
pub fn desired(
    config: &Config,
    resolved: &HashMap<String, Resolved>,
    health: &HashMap<TargetKey, Health>,
) -> Vec<DesiredService> {
    expand(config, resolved)
        .into_iter()
        .map(|(s, entries)| DesiredService {
            name: s.name.clone(),
            listen: s.listen,
            protocol: s.protocol,
            upstreams: entries
                .into_iter()
                .flat_map(|(u, addrs)| {
                    addrs.into_iter().map(move |a| {
                        let healthy = health.get(&(s.name.clone(), a)).is_none_or(Health::healthy);
                        (a, if healthy { u.effective_weight() } else { 0 })
                    })
                })
                .collect(),
        })
        .collect()
}

/// The control plane's state between events. Pure apart from the map writes in
/// [`Controller::reconcile`] (through a [`MapWriter`]).
#[derive(Debug)]
pub struct Controller {
    config: Config,
    snat: SnatAddrs,
    resolved: HashMap<String, Resolved>,
    health: HashMap<TargetKey, Health>,
    /// What the maps hold (written by this controller or found at start).
    shadow: Plan,
    /// Services and upstreams removed from the maps whose ids stay reserved.
    retired_services: HashMap<ServiceKey, u32>,
    retired_upstreams: HashMap<SocketAddr, u32>,
    status: SharedStatus,
}

/// Where reconcile writes: the maps (or a recorder in tests).
pub trait MapWriter {
    /// Apply the writes in order.
    ///
    /// # Errors
    /// The first failing write.
    fn write(&mut self, ops: &[MapOp]) -> Result<(), crate::datapath::DatapathError>;
}

impl MapWriter for crate::datapath::Maps {
    fn write(&mut self, ops: &[MapOp]) -> Result<(), crate::datapath::DatapathError> {
        self.apply_ops(ops)
    }
}

/// What one reconcile did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub ops: usize,
    pub maglev_slots: usize,
}

impl Controller {
    /// A controller for `config` and the SNAT address in effect. `existing_*`: what the
    /// pinned maps hold at start (their ids are kept).
    #[must_use]
    pub fn new(config: Config, snat: impl Into<SnatAddrs>, status: SharedStatus) -> Self {
        Self {
            config,
            snat: snat.into(),
            resolved: HashMap::new(),
            health: HashMap::new(),
            shadow: Plan {
                nat: proxy_common::NatConfig::default(),
                upstreams: Vec::new(),
                services: Vec::new(),
            },
            retired_services: HashMap::new(),
            retired_upstreams: HashMap::new(),
            status,
        }
    }

    #[must_use]
    pub fn config(&self) -> &Config {
        &self.config
    }

    #[must_use]
    pub fn snat(&self) -> SnatAddrs {
        self.snat
    }

    /// The plan the maps hold.
    #[must_use]
    pub fn shadow(&self) -> &Plan {
        &self.shadow
    }

    /// The current health check targets.
    #[must_use]
    pub fn health_targets(&self) -> BTreeMap<TargetKey, HealthConfig> {
        health_targets(&self.config, &self.resolved)
    }

    /// The DNS names to resolve.
    #[must_use]
    pub fn dns_names(&self) -> BTreeSet<String> {
        dns_names(&self.config)
    }

    /// The record types `name` is asked for.
    #[must_use]
    pub fn dns_families(&self, name: &str) -> dns::Families {
        dns_families(&self.config, name)
    }

    /// The plan for the current desired state, keeping the ids of the maps and never giving a
    /// new entry the id of a retired one while another is free.
    ///
    /// # Errors
    /// [`PlanError`] when ids run out.
    pub fn plan(&self) -> Result<Plan, PlanError> {
        let mut existing_services: Vec<(ServiceKey, u32)> = self
            .shadow
            .services
            .iter()
            .map(|s| (s.key, s.value.id))
            .collect();
        existing_services.extend(self.retired_services.iter().map(|(k, id)| (*k, *id)));
        let mut existing_upstreams: Vec<(SocketAddr, u32)> = self
            .shadow
            .upstreams
            .iter()
            .map(|(id, a)| (*a, *id))
            .collect();
        existing_upstreams.extend(self.retired_upstreams.iter().map(|(a, id)| (*a, *id)));
        let reserved = Reserved {
            services: self.retired_services.values().copied().collect(),
            upstreams: self.retired_upstreams.values().copied().collect(),
        };
        plan::build_desired(
            &self.config.nat,
            self.snat,
            &desired(&self.config, &self.resolved, &self.health),
            &existing_services,
            &existing_upstreams,
            &reserved,
        )
    }

    /// At start, before the first [`Controller::plan`]: what the pinned maps hold. Their ids
    /// are kept for entries still configured; the others are retired (their flows may live
    /// on).
    pub fn found_in_maps(
        &mut self,
        existing_services: &[(ServiceKey, u32)],
        existing_upstreams: &[(SocketAddr, u32)],
    ) {
        self.retired_services
            .extend(existing_services.iter().copied());
        self.retired_upstreams
            .extend(existing_upstreams.iter().copied());
    }

    /// At start: `plan` (from [`Controller::plan`]) was written whole into the maps.
    pub fn adopt(&mut self, plan: Plan) {
        self.retired_services
            .retain(|k, _| !plan.services.iter().any(|s| s.key == *k));
        self.retired_upstreams
            .retain(|a, _| !plan.upstreams.iter().any(|(_, u)| u == a));
        self.shadow = plan;
        self.publish();
    }

    /// Compute the plan, write the difference from the shadow through `maps`, keep the result.
    ///
    /// # Errors
    /// Planning or map write failures (the shadow is then re-read on the next call as it was:
    /// a failed write is retried whole on the next event).
    pub fn reconcile(
        &mut self,
        maps: &mut dyn MapWriter,
    ) -> Result<ReconcileReport, ReconcileError> {
        let new = self.plan()?;
        let ops = plan::diff(&self.shadow, &new);
        let report = ReconcileReport {
            ops: ops.len(),
            maglev_slots: ops
                .iter()
                .map(|o| match o {
                    MapOp::SetMaglev { slots, .. } => slots.len(),
                    _ => 0,
                })
                .sum(),
        };
        if !ops.is_empty() {
            maps.write(&ops).map_err(Box::new)?;
        }
        // Retire what left; un-retire what came back.
        for s in &self.shadow.services {
            if !new.services.iter().any(|n| n.key == s.key) {
                self.retired_services.insert(s.key, s.value.id);
            }
        }
        for (id, a) in &self.shadow.upstreams {
            if !new.upstreams.iter().any(|(_, n)| n == a) {
                self.retired_upstreams.insert(*a, *id);
            }
        }
        self.retired_services
            .retain(|k, _| !new.services.iter().any(|n| n.key == *k));
        self.retired_upstreams
            .retain(|a, _| !new.upstreams.iter().any(|(_, n)| n == a));
        self.shadow = new;
        self.publish();
        Ok(report)
    }

    /// Forget retired ids no flow carries any more (from a flow scan: the service and upstream
    /// ids of the flows in the table).
    pub fn release_retired(
        &mut self,
        services_in_use: &HashSet<u32>,
        upstreams_in_use: &HashSet<u32>,
    ) {
        self.retired_services
            .retain(|_, id| services_in_use.contains(id));
        self.retired_upstreams
            .retain(|_, id| upstreams_in_use.contains(id));
    }

    /// Ids reserved for flows of removed entries: (services, upstreams).
    #[must_use]
    pub fn retired_ids(&self) -> (BTreeSet<u32>, BTreeSet<u32>) {
        (
            self.retired_services.values().copied().collect(),
            self.retired_upstreams.values().copied().collect(),
        )
    }

    /// Record a health check result. Returns true when the upstream changed state (the tables
    /// need a reconcile).
    pub fn on_health(&mut self, service: &str, addr: SocketAddr, result: &ProbeResult) -> bool {
        let Some((cfg, mode)) = self
            .config
            .services
            .iter()
            .find(|s| s.name == service)
            .map(|s| (s.health.clone(), s.mode))
        else {
            return false;
        };
        let key = (service.to_owned(), addr);
        if !self.health_targets().contains_key(&key) {
            return false; // a late result of a target that is gone
        }
        let h = self.health.entry(key).or_default();
        let transition = h.record(result, cfg.rise, cfg.fall);
        let changed = match transition {
            Some(Transition::BecameUnhealthy) if mode == ServiceMode::Http => {
                tracing::warn!(
                    service,
                    upstream = %addr,
                    error = h.last_error().unwrap_or(""),
                    fall = cfg.fall,
                    "upstream unhealthy: the http proxy sends it no new request"
                );
                true
            }
            Some(Transition::BecameUnhealthy) => {
                tracing::warn!(
                    service,
                    upstream = %addr,
                    error = h.last_error().unwrap_or(""),
                    fall = cfg.fall,
                    "upstream unhealthy: it leaves the Maglev table (its flows are kept)"
                );
                true
            }
            Some(Transition::BecameHealthy) if mode == ServiceMode::Http => {
                tracing::info!(service, upstream = %addr, rise = cfg.rise, "upstream healthy again: the http proxy uses it again");
                true
            }
            Some(Transition::BecameHealthy) => {
                tracing::info!(service, upstream = %addr, rise = cfg.rise, "upstream healthy again: back in the Maglev table");
                true
            }
            None => false,
        };
        if !changed {
            // Only the error text may have changed: refresh the status.
            self.publish();
        }
        changed
    }

    /// Record a DNS answer (or failure) for `name`. Returns true when the name's addresses
    /// changed.
    pub fn on_dns(&mut self, name: &str, result: Result<dns::Answer, dns::DnsError>) -> bool {
        if !self.dns_names().contains(name) {
            return false;
        }
        let nat = self.config.nat.clone();
        let own = self.config.own_addresses(self.snat);
        let entry = self.resolved.entry(name.to_owned()).or_default();
        let mut refused_n = 0u64;
        let mut failed = false;
        let changed = match result {
            Ok(answer) => {
                let (ok, refused) = filter_answer(&nat, &own, &answer.addrs);
                if !refused.is_empty() {
                    refused_n = refused.len() as u64;
                    let list: Vec<String> = refused
                        .iter()
                        .map(|(a, why)| format!("{a}: {why}"))
                        .collect();
                    tracing::error!(
                        name,
                        refused = %list.join("; "),
                        "DNS answer has addresses no upstream may have: refused, never forwarded to (the proxy is no open relay)"
                    );
                }
                if ok.is_empty() {
                    failed = true;
                    let msg = format!(
                        "no acceptable address in the answer {:?} (each is outside every home \
                         CIDR, in a refused range or the proxy's own)",
                        answer.addrs
                    );
                    tracing::warn!(name, kept = ?entry.addrs, "{msg}: keeping the last good addresses");
                    entry.last_error = Some(msg);
                    false
                } else {
                    entry.last_error = None;
                    let mut sorted = ok.clone();
                    sorted.sort_unstable();
                    let mut before = entry.addrs.clone();
                    before.sort_unstable();
                    if sorted == before {
                        false
                    } else {
                        tracing::info!(name, from = ?entry.addrs, to = ?ok, "DNS upstream changed address");
                        entry.addrs = ok;
                        true
                    }
                }
            }
            Err(e) => {
                failed = true;
                tracing::warn!(name, error = %e, kept = ?entry.addrs, "DNS resolution failed: keeping the last good addresses");
                entry.last_error = Some(e.to_string());
                false
            }
        };
        if let Ok(mut st) = self.status.write() {
            st.dns_refused_addresses += refused_n;
            st.dns_failures += u64::from(failed);
        }
        if !changed {
            self.publish();
        }
        changed
    }

    /// Replace the config (a reload already validated, restart-only keys already kept). DNS
    /// answers of names still used and health of targets whose check is unchanged carry over.
    pub fn set_config(&mut self, config: Config, snat: impl Into<SnatAddrs>) {
        let old_checks = self.health_targets();
        self.config = config;
        self.snat = snat.into();
        let names = self.dns_names();
        self.resolved.retain(|n, _| names.contains(n));
        self.prune_health(&old_checks);
        if let Ok(mut st) = self.status.write() {
            st.config = self.config.source.display().to_string();
        }
    }

    /// Drop health state of targets gone, or whose check settings changed since `old`.
    pub fn prune_health(&mut self, old: &BTreeMap<TargetKey, HealthConfig>) {
        let now = self.health_targets();
        self.health
            .retain(|k, _| now.get(k).is_some_and(|c| old.get(k) == Some(c)));
    }

    /// Publish the current state to the shared status.
    pub fn publish(&self) {
        let services = self.status_services();
        if let Ok(mut st) = self.status.write() {
            st.config = self.config.source.display().to_string();
            st.services = services;
        }
    }

    fn status_services(&self) -> Vec<ServiceStatus> {
        let expanded = expand(&self.config, &self.resolved);
        let http = http_addresses(&self.config);
        self.config
            .services
            .iter()
            .map(|s| {
                let planned = self.shadow.services.iter().find(|p| p.name == s.name);
                let mut upstreams = Vec::new();
                if let Some((_, entries)) = expanded.iter().find(|(c, _)| c.name == s.name) {
                    for (u, addrs) in entries {
                        let dns_error = u
                            .dns_name()
                            .and_then(|n| self.resolved.get(n))
                            .and_then(|r| r.last_error.clone());
                        if addrs.is_empty() {
                            upstreams.push(UpstreamStatus {
                                address: u.to_string(),
                                resolved: None,
                                id: None,
                                weight: u.weight,
                                drain: u.drain,
                                healthy: false,
                                in_table: false,
                                last_error: dns_error
                                    .clone()
                                    .or_else(|| Some("not resolved yet".into())),
                            });
                        }
                        for a in addrs {
                            let h = self.health.get(&(s.name.clone(), *a));
                            let id = self
                                .shadow
                                .upstreams
                                .iter()
                                .find(|(_, x)| x == a)
                                .map(|(id, _)| *id);
                            let in_table = match (planned, id) {
                                (Some(p), Some(id)) => p.table.contains(&id),
                                _ => false,
                            };
                            upstreams.push(UpstreamStatus {
                                address: u.to_string(),
                                resolved: Some(*a),
                                id,
                                weight: u.weight,
                                drain: u.drain,
                                healthy: h.is_none_or(Health::healthy),
                                in_table,
                                last_error: h
                                    .and_then(|h| h.last_error().map(str::to_owned))
                                    .or_else(|| dns_error.clone()),
                            });
                        }
                    }
                }
                // An http service: every address of its upstream groups, with its health (no
                // id, not in any Maglev table).
                for (_, addrs) in http.iter().filter(|(c, _)| c.name == s.name) {
                    for a in addrs {
                        let h = self.health.get(&(s.name.clone(), *a));
                        let own = s.upstreams.iter().find(|u| u.static_addr() == Some(*a));
                        upstreams.push(UpstreamStatus {
                            address: own.map_or_else(|| a.to_string(), ToString::to_string),
                            resolved: Some(*a),
                            id: None,
                            weight: own.map_or(1, |u| u.weight),
                            drain: own.is_some_and(|u| u.drain),
                            healthy: h.is_none_or(Health::healthy),
                            in_table: false,
                            last_error: h.and_then(|h| h.last_error().map(str::to_owned)),
                        });
                    }
                }
                ServiceStatus {
                    name: s.name.clone(),
                    listen: s.listen,
                    protocol: s.protocol.to_string(),
                    mode: s.mode.to_string(),
                    id: planned.map(|p| p.value.id),
                    has_upstreams: s.mode == ServiceMode::L4
                        && planned.is_some_and(|p| p.value.flags & SERVICE_F_HAS_UPSTREAMS != 0),
                    upstreams,
                }
            })
            .collect()
    }

    /// The shared status handle.
    #[must_use]
    pub fn shared_status(&self) -> SharedStatus {
        self.status.clone()
    }

    /// A copy of the shared status (tests, logs).
    #[must_use]
    pub fn status(&self) -> Status {
        self.status.read().map(|s| s.clone()).unwrap_or_default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("planning the maps: {0}")]
    Plan(#[from] PlanError),
    #[error("writing the maps: {0}")]
    Write(#[from] Box<crate::datapath::DatapathError>),
}

#[cfg(test)]
mod tests;

// ---------------------------------------------------------------------------------------------
// The tasks feeding the controller: one health checker per target, one resolver per DNS name.
// ---------------------------------------------------------------------------------------------

/// What the tasks report.
#[derive(Debug)]
pub enum Event {
    Health {
        service: String,
        addr: SocketAddr,
        result: ProbeResult,
    },
    Dns {
        name: String,
        result: Result<dns::Answer, dns::DnsError>,
    },
}

/// Floor of the wait between two resolutions of a name (a TTL of 0 does not make a busy loop).
pub const MIN_DNS_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// Longest wait before retrying a failed resolution.
pub const DNS_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// How long to wait before resolving again after `result`: the answer's TTL (at least
/// [`MIN_DNS_WAIT`]), at most `interval`; after a failure at most [`DNS_RETRY`].
#[must_use]
pub fn next_dns_wait(
    result: &Result<dns::Answer, dns::DnsError>,
    interval: std::time::Duration,
) -> std::time::Duration {
    match result {
        Ok(a) => a
            .ttl
            .map_or(interval, |t| t.max(MIN_DNS_WAIT))
            .min(interval),
        Err(_) => interval.min(DNS_RETRY),
    }
}

/// The DNS servers in effect: `dns.servers`, else those of /etc/resolv.conf (read now).
#[must_use]
pub fn dns_servers(config: &Config) -> Vec<std::net::SocketAddr> {
    match &config.dns.servers {
        Some(s) => s.clone(),
        None => std::fs::read_to_string(dns::RESOLV_CONF)
            .map(|t| dns::resolv_conf_servers(&t))
            .unwrap_or_default(),
    }
}

/// Resolve every name of the controller's config once, concurrently, and record the answers
/// (start and reload: the first plan needs them). Names already resolved are skipped unless
/// `all`. Returns the first wait per name for its resolver task.
pub async fn resolve_now(
    controller: &mut Controller,
    all: bool,
) -> HashMap<String, std::time::Duration> {
    let cfg = controller.config().dns.clone();
    let servers = dns_servers(controller.config());
    let mut set = tokio::task::JoinSet::new();
    for name in controller.dns_names() {
        if !all && controller.resolved.contains_key(&name) {
            continue;
        }
        let servers = servers.clone();
        let families = controller.dns_families(&name);
        set.spawn(async move {
            let r = dns::resolve(&name, &servers, cfg.timeout, families).await;
            (name, r)
        });
    }
    let mut waits = HashMap::new();
    while let Some(done) = set.join_next().await {
        let Ok((name, result)) = done else { continue };
        waits.insert(name.clone(), next_dns_wait(&result, cfg.interval));
        controller.on_dns(&name, result);
    }
    waits
}

/// The running checker and resolver tasks, kept in step with the controller's targets.
#[derive(Debug, Default)]
pub struct Tasks {
    health: HashMap<TargetKey, (HealthConfig, tokio::task::JoinHandle<()>)>,
    dns: HashMap<
        String,
        (
            crate::config::DnsConfig,
            dns::Families,
            tokio::task::JoinHandle<()>,
        ),
    >,
}

impl Tasks {
    /// Start tasks for new targets and names, stop those of targets and names gone (or whose
    /// settings changed). `first_waits`: when a name's resolver first runs (from
    /// [`resolve_now`]); default the DNS interval.
    pub fn sync(
        &mut self,
        controller: &Controller,
        tx: &tokio::sync::mpsc::Sender<Event>,
        first_waits: &HashMap<String, std::time::Duration>,
    ) {
        let targets = controller.health_targets();
        self.health.retain(|k, (cfg, handle)| {
            let keep = targets.get(k) == Some(cfg);
            if !keep {
                handle.abort();
            }
            keep
        });
        for (key, cfg) in targets {
            if self.health.contains_key(&key) {
                continue;
            }
            let tx = tx.clone();
            let (service, addr) = key.clone();
            let c = cfg.clone();
            let handle = tokio::spawn(async move {
                let mut tick = tokio::time::interval(c.interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let result = crate::health::probe(addr, &c).await;
                    let ev = Event::Health {
                        service: service.clone(),
                        addr,
                        result,
                    };
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
            });
            self.health.insert(key, (cfg, handle));
        }

        let dns_cfg = controller.config().dns.clone();
        let names = controller.dns_names();
        self.dns.retain(|n, (cfg, families, handle)| {
            let keep =
                names.contains(n) && *cfg == dns_cfg && *families == controller.dns_families(n);
            if !keep {
                handle.abort();
            }
            keep
        });
        for name in names {
            if self.dns.contains_key(&name) {
                continue;
            }
            let tx = tx.clone();
            let cfg = dns_cfg.clone();
            let first = first_waits.get(&name).copied().unwrap_or(cfg.interval);
            let servers = dns_servers(controller.config());
            let families = controller.dns_families(&name);
            let n = name.clone();
            let handle = tokio::spawn(async move {
                let mut wait = first;
                loop {
                    tokio::time::sleep(wait).await;
                    let result = dns::resolve(&n, &servers, cfg.timeout, families).await;
                    wait = next_dns_wait(&result, cfg.interval);
                    let ev = Event::Dns {
                        name: n.clone(),
                        result,
                    };
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
            });
            self.dns.insert(name, (dns_cfg.clone(), families, handle));
        }
    }

    /// Stop every task.
    pub fn stop(&mut self) {
        for (_, (_, h)) in self.health.drain() {
            h.abort();
        }
        for (_, (_, _, h)) in self.dns.drain() {
            h.abort();
        }
    }
}
