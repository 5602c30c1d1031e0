//! The userspace L4 path: every `l4` service served by the daemon itself when XDP does not
//! (`datapath.mode = "userspace"`, or `auto` when XDP cannot attach). Same upstream choice as the
//! fast path ([`choice`]: the plan's Maglev tables, then the control plane's status), TCP with
//! half-close ([`tcp`]), UDP with per-client sessions ([`udp`]).
//!
//! The service's fast-path options are enforced here too: `allow` / `deny` and `new_flow_rate`
//! / `new_flow_burst` at each new TCP connection and new UDP session ([`admission`], the fast
//! path's rules and reason names), `mss_clamp` as TCP_MAXSEG on the listening socket and on each
//! upstream socket ([`tcp`]).
//!
//! Differences from the fast path, by nature of a userspace proxy: upstream connections come from
//! the SNAT address with ports the kernel picks from its ephemeral range (not from
//! `nat.port_range`), and packets cross the daemon.

pub mod admission;
pub mod choice;
pub mod counters;
pub mod splice;
pub mod tcp;
pub mod udp;

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use tokio::{sync::watch, task::JoinHandle};

use crate::{
    config::{Config, Protocol, ServiceConfig, SnatAddrs},
    plan::Plan,
    state::SharedStatus,
};
pub use choice::{Choice, Chooser};

/// Environment variable that sets the number of worker threads of the daemon's tokio runtime
/// (which runs the userspace L4 and L7 data paths and the control plane). Unset: 2.
pub const WORKERS_ENV: &str = "XDP_PROXY_WORKER_THREADS";
/// Worker threads when [`WORKERS_ENV`] is unset.
pub const DEFAULT_WORKERS: usize = 2;

/// The worker thread count that `value` (the variable's text, if set) asks for: a number from 1
/// to 64; anything else is an error naming the variable.
///
/// # Errors
/// A value that is not a number in 1..=64.
pub fn workers_from(value: Option<&str>) -> io::Result<usize> {
    let Some(v) = value else {
        return Ok(DEFAULT_WORKERS);
    };
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=64).contains(&n) => Ok(n),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{WORKERS_ENV}={v:?}: expected a number of worker threads from 1 to 64"),
        )),
    }
}

/// The daemon's tokio runtime and its worker thread count ([`WORKERS_ENV`], default
/// [`DEFAULT_WORKERS`]). The userspace data paths run every connection as a task on it.
///
/// One worker: tokio's current-thread scheduler, which runs the tasks on the thread that calls
/// `block_on` (the daemon's main thread). With a single worker the multi-thread scheduler's
/// machinery (a run queue made to be stolen from, the wake-ups between the worker and the
/// thread in `block_on`) is all cost: callgrind, user-space instructions per request, userspace
/// L4 3,452 -> 2,962 and L7 17,978 -> 17,461. What it changes: the daemon's own work done in
/// `block_on` (a reload, writing a new plan into the maps) now shares that thread with the
/// connections, as its tasks (health checks, status, the admin listener) shared the one worker
/// already; flow expiry and other blocking work stay on the blocking pool. More workers: the
/// multi-thread scheduler.
///
/// # Errors
/// A bad [`WORKERS_ENV`] value, or the runtime cannot start.
pub fn runtime() -> io::Result<(tokio::runtime::Runtime, usize)> {
    let value = std::env::var(WORKERS_ENV).ok();
    let workers = workers_from(value.as_deref().filter(|v| !v.is_empty()))?;
    let runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("xdp-proxy-worker")
            .enable_all()
            .build()?
    };
    Ok((runtime, workers))
}

/// Knobs of the userspace L4 path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    pub connect_timeout: Duration,
    /// Upstreams tried for one TCP connection (the Maglev pick, then the others).
    pub connect_attempts: usize,
    pub max_tcp_connections: usize,
    /// Idle lifetime of an established TCP connection, and of one after a FIN one way.
    pub tcp_idle: Duration,
    pub tcp_half_closed_idle: Duration,
    pub udp_idle: Duration,
    pub max_udp_sessions: usize,
    pub listen_backlog: u32,
    /// How often the control plane's status is read for upstream changes.
    pub refresh_interval: Duration,
}

impl Default for Settings {
    /// Idle lifetimes are the fast path's flow lifetimes (`flows::Lifetimes::default()`).
    fn default() -> Self {
        let lifetimes = crate::flows::Lifetimes::default();
        Self {
            connect_timeout: Duration::from_secs(5),
            connect_attempts: 3,
            max_tcp_connections: 16_384,
            tcp_idle: lifetimes.tcp_established,
            tcp_half_closed_idle: lifetimes.tcp_half_closed,
            udp_idle: lifetimes.udp,
            max_udp_sessions: 16_384,
            listen_backlog: 4096,
            refresh_interval: Duration::from_millis(500),
        }
    }
}

/// Per-service counters of the userspace path (shown in /metrics and /status).
#[derive(Debug, Default)]
pub struct Stats {
    /// TCP connections proxied / UDP sessions opened, active, bytes, connect failures.
    pub traffic: Arc<counters::Traffic>,
    /// The same per upstream address.
    pub upstreams: counters::PerUpstream,
    /// New flows refused because no upstream is in the table.
    pub no_upstream: AtomicU64,
    pub udp_sessions_refused: AtomicU64,
    /// `allow` / `deny` / new-flow rate of the service, and the flows they refused.
    pub admission: admission::Admission,
}

impl Service {
    /// The counters as plain data.
    #[must_use]
    pub fn counters(&self) -> crate::metrics::UserspaceService {
        use std::sync::atomic::Ordering::Relaxed;
        crate::metrics::UserspaceService {
            name: self.chooser.name.clone(),
            listen: self.chooser.listen.to_string(),
            protocol: self.chooser.protocol.to_string(),
            layer: "l4".to_owned(),
            traffic: self.stats.traffic.read(),
            no_upstream: self.stats.no_upstream.load(Relaxed),
            dropped: self.stats.udp_sessions_refused.load(Relaxed),
            refused: self.stats.admission.refused(),
            http_responses: std::collections::BTreeMap::new(),
            upstreams: self
                .stats
                .upstreams
                .read()
                .into_iter()
                .map(|(a, t)| (a.to_string(), t))
                .collect(),
        }
    }
}

/// One served service.
#[derive(Debug)]
pub struct Service {
    pub chooser: Chooser,
    /// Source address of upstream connections (the SNAT address), port 0.
    pub source: SocketAddr,
    /// TCP_MAXSEG of the listening socket and of every upstream socket (0: none).
    pub mss_clamp: u16,
    pub stats: Stats,
}

#[derive(Debug, thiserror::Error)]
pub enum L4Error {
    #[error("service `{name}`: listening on {listen}/{protocol}: {source}")]
    Listen {
        name: String,
        listen: SocketAddr,
        protocol: Protocol,
        #[source]
        source: io::Error,
    },
}

/// The maps of the userspace path: there are none, so every write "succeeds" and the control
/// plane's plan (published in the status) is what [`Chooser::refresh`] follows.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoMaps;

impl crate::control::MapWriter for NoMaps {
    fn write(&mut self, _ops: &[crate::plan::MapOp]) -> Result<(), crate::datapath::DatapathError> {
        Ok(())
    }
}

/// The running userspace L4 path; dropping it (or [`L4::shutdown`]) stops every listener.
#[derive(Debug)]
pub struct L4 {
    /// The served services, as the status refresher sees them.
    services: Arc<std::sync::RwLock<Vec<Arc<Service>>>>,
    running: Vec<(Arc<Service>, JoinHandle<()>)>,
    /// Upstream connections come from the SNAT address of the service's family.
    snat: SnatAddrs,
    settings: Settings,
    status: SharedStatus,
    shutdown: watch::Sender<bool>,
    refresher: Option<JoinHandle<()>>,
}

impl L4 {
    /// The services served now.
    #[must_use]
    pub fn services(&self) -> Vec<Arc<Service>> {
        self.running.iter().map(|(s, _)| Arc::clone(s)).collect()
    }

    /// Apply a reloaded config: stop serving the l4 services it no longer has (their
    /// established connections and sessions run on), bind and serve the new ones (a bind
    /// failure is logged; the rest is applied). Upstream changes reach every service through
    /// the status; `allow` / `deny` / new-flow rate changes apply to the next new flows of a
    /// kept service. A changed `mss_clamp` is a new listening socket: the service is served
    /// anew (established connections run on; its counters start over).
    pub async fn reconfigure(&mut self, config: &Config) {
        let same = |svc: &Service, s: &ServiceConfig| {
            svc.chooser.name == s.name
                && svc.chooser.listen == s.listen
                && svc.chooser.protocol == s.protocol
                && svc.mss_clamp == s.fast.mss_clamp
        };
        let wanted: Vec<&ServiceConfig> = config.l4_services().map(|(_, s)| s).collect();
        let mut kept = Vec::new();
        for (svc, task) in std::mem::take(&mut self.running) {
            if wanted.iter().any(|s| same(&svc, s)) {
                kept.push((svc, task));
            } else {
                task.abort();
                // Its listening socket is closed once the task is gone: a service served anew
                // on the same address binds it next.
                let _ = task.await;
                tracing::info!(service = %svc.chooser.name, listen = %svc.chooser.listen, proto = %svc.chooser.protocol, "userspace L4: service removed, no longer listening");
            }
        }
        self.running = kept;
        for (svc, _) in &self.running {
            if let Some(s) = wanted.iter().find(|s| same(svc, s))
                && svc.stats.admission.set(&s.fast)
            {
                tracing::info!(service = %svc.chooser.name, allow = s.fast.allow.len(), deny = s.fast.deny.len(), new_flow_rate = s.fast.new_flow_rate, "userspace L4: admission rules reloaded (next new flows)");
            }
        }
        let snapshot = read_status(&self.status);
        for s in wanted {
            if self.running.iter().any(|(svc, _)| same(svc, s)) {
                continue;
            }
            match serve_one(
                s,
                Choice::empty(),
                source_for(self.snat, s),
                self.settings,
                self.shutdown.subscribe(),
            )
            .await
            {
                Ok((svc, task)) => {
                    svc.chooser.refresh(&snapshot);
                    log_listening(&svc);
                    self.running.push((svc, task));
                }
                Err(e) => tracing::error!(error = %e, "userspace L4: new service not served"),
            }
        }
        let list = self.services();
        match self.services.write() {
            Ok(mut l) => *l = list,
            Err(p) => *p.into_inner() = list,
        }
    }

    /// Stop accepting; established TCP connections and UDP sessions end with their tasks.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for (_, t) in std::mem::take(&mut self.running) {
            let _ = t.await;
        }
        if let Some(t) = self.refresher.take() {
            let _ = t.await;
        }
    }
}

impl Drop for L4 {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for (_, t) in &self.running {
            t.abort();
        }
        if let Some(t) = &self.refresher {
            t.abort();
        }
    }
}

/// The source of a service's upstream connections: the SNAT address of its family (an l4
/// service's upstreams are of its listen family), port chosen by the kernel.
fn source_for(snat: SnatAddrs, s: &ServiceConfig) -> SocketAddr {
    SocketAddr::new(snat.source_for(s.listen.ip()), 0)
}

/// Bind one service and start serving it.
async fn serve_one(
    s: &ServiceConfig,
    choice: Choice,
    source: SocketAddr,
    settings: Settings,
    rx: watch::Receiver<bool>,
) -> Result<(Arc<Service>, JoinHandle<()>), L4Error> {
    let svc = Arc::new(Service {
        chooser: Chooser::new(s.name.clone(), s.listen, s.protocol, choice),
        source,
        mss_clamp: s.fast.mss_clamp,
        stats: Stats {
            admission: admission::Admission::new(&s.fast),
            ..Stats::default()
        },
    });
    let err = |source| L4Error::Listen {
        name: s.name.clone(),
        listen: s.listen,
        protocol: s.protocol,
        source,
    };
    let task = match s.protocol {
        Protocol::Tcp => {
            let l = tcp::listen_clamped(s.listen, settings.listen_backlog, s.fast.mss_clamp)
                .map_err(err)?;
            tokio::spawn(tcp::serve(l, Arc::clone(&svc), settings, rx))
        }
        Protocol::Udp => {
            let sock = udp::bind(s.listen).await.map_err(err)?;
            tokio::spawn(udp::serve(sock, Arc::clone(&svc), settings, rx))
        }
    };
    Ok((svc, task))
}

fn log_listening(svc: &Service) {
    tracing::info!(
        service = %svc.chooser.name,
        listen = %svc.chooser.listen,
        proto = %svc.chooser.protocol,
        upstreams = ?svc.chooser.current().upstreams(),
        "userspace L4 listening"
    );
}

fn read_status(status: &SharedStatus) -> Vec<crate::state::ServiceStatus> {
    match status.read() {
        Ok(s) => s.services.clone(),
        Err(poisoned) => poisoned.into_inner().services.clone(),
    }
}

/// Bind every `l4` service of `config` and serve it, choosing upstreams from `plan` (computed
/// as for the fast path) and, once the control plane lists the service, from `status`.
///
/// # Errors
/// [`L4Error::Listen`] when a service address cannot be bound (nothing stays bound then).
pub async fn start(
    config: &Config,
    plan: &Plan,
    snat: impl Into<SnatAddrs>,
    status: SharedStatus,
    settings: Settings,
) -> Result<L4, L4Error> {
    let snat = snat.into();
    let (tx, rx) = watch::channel(false);
    let mut running = Vec::new();
    for (_, s) in config.l4_services() {
        let choice = plan
            .services
            .iter()
            .find(|p| p.listen == s.listen && p.protocol == s.protocol)
            .map_or_else(Choice::empty, |p| Choice::from_plan(p, &plan.upstreams));
        let (svc, task) = serve_one(s, choice, source_for(snat, s), settings, rx.clone()).await?;
        log_listening(&svc);
        running.push((svc, task));
    }
    let services = Arc::new(std::sync::RwLock::new(
        running.iter().map(|(s, _)| Arc::clone(s)).collect(),
    ));
    let refresher = tokio::spawn(refresh(
        Arc::clone(&services),
        status.clone(),
        settings.refresh_interval,
        rx,
    ));
    Ok(L4 {
        services,
        running,
        snat,
        settings,
        status,
        shutdown: tx,
        refresher: Some(refresher),
    })
}

/// Follow the control plane's status: health, weight, drain and DNS changes reach the choice.
async fn refresh(
    services: Arc<std::sync::RwLock<Vec<Arc<Service>>>>,
    status: SharedStatus,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let snapshot = read_status(&status);
        let services = match services.read() {
            Ok(l) => l.clone(),
            Err(p) => p.into_inner().clone(),
        };
        for s in &services {
            if let Some(next) = s.chooser.refresh(&snapshot) {
                tracing::info!(
                    service = %s.chooser.name,
                    upstreams = ?next.upstreams(),
                    "userspace L4: upstream set changed"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_threads_come_from_the_variable_or_default_to_two() {
        assert_eq!(workers_from(None).unwrap(), DEFAULT_WORKERS);
        assert_eq!(workers_from(Some("1")).unwrap(), 1);
        assert_eq!(workers_from(Some(" 4 ")).unwrap(), 4);
        for bad in ["0", "65", "two", "-1", ""] {
            let e = workers_from(Some(bad)).unwrap_err();
            assert!(e.to_string().contains(WORKERS_ENV), "{e}");
        }
    }
}
