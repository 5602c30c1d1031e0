//! `xdp-proxy run`: validate, load, fill, attach, then keep the datapath true until SIGINT or
//! SIGTERM (health checks, DNS re-resolution and SIGHUP reloads through the control loop in
//! `control`, flow expiry, eBPF logs), and detach cleanly, keeping the pinned maps so the next
//! start keeps every flow.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config::{Config, ConfigError, DatapathMode, IpCidr, RuntimeFacts, SnatAddrs},
    control::{self, Controller},
    datapath::{self, AttachMode, Bpffs, Datapath, DatapathError},
    flows::Lifetimes,
    netdev,
    plan::{self, PlanError},
    sysctl::{self, SysctlError},
};

/// Knobs that are not in the config file (tests and later issues may change them).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Root of the sysctl tree (`/proc/sys`).
    pub proc_sys: PathBuf,
    /// How often idle flows are expired.
    pub expiry_interval: Duration,
    /// Flow lifetimes that override the config's `[flows]` section (tests); `None`: the
    /// running config's, so a reload applies new ones at the next expiry scan.
    pub lifetimes: Option<Lifetimes>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            proc_sys: PathBuf::from("/proc/sys"),
            expiry_interval: Duration::from_secs(1),
            lifetimes: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("reading net.ipv4.ip_local_port_range under {}: {source}", path.display())]
    EphemeralRange {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{}: nat.snat_ipv4 is not set and no route toward the first IPv4 home CIDR {cidr} was \
         found ({source}): add a route home or set nat.snat_ipv4",
        file.display()
    )]
    SnatRoute {
        file: PathBuf,
        cidr: IpCidr,
        #[source]
        source: io::Error,
    },
    #[error("starting the userspace L4 path: {0}")]
    UserspaceL4(#[from] crate::l4::L4Error),
    #[error("starting the HTTP proxy: {0}")]
    Http(#[from] crate::l7::L7Error),
    #[error("{}: datapath.interfaces[{index}]: {source}", file.display())]
    Interface {
        file: PathBuf,
        index: usize,
        #[source]
        source: Box<DatapathError>,
    },
    #[error(transparent)]
    Datapath(Box<DatapathError>),
    #[error("planning the map contents: {0}")]
    Plan(#[from] PlanError),
    #[error("setting the datapath's sysctls: {0}")]
    Sysctl(#[from] SysctlError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the datapath lock was poisoned by a panicked task")]
    Poisoned,
    #[error(transparent)]
    Reconcile(#[from] control::ReconcileError),
    #[error(
        "{}: {}",
        file.display(),
        upstreams.iter().map(|(key, ip)| format!("{key}: {ip} is an address of this host: the proxy would forward to itself; name the upstream's own address")).collect::<Vec<_>>().join("; ")
    )]
    LocalUpstream {
        file: PathBuf,
        upstreams: Vec<(String, IpAddr)>,
    },
    #[error(
        "{}: datapath.mode = \"native\", but native XDP would not deliver here: {}",
        file.display(),
        refusals.iter().map(|(why, fix)| format!("{why}; to fix: {fix}")).collect::<Vec<_>>().join(" | ")
    )]
    NativeWouldNotDeliver {
        file: PathBuf,
        /// Per interface: why, and what to change.
        refusals: Vec<(String, String)>,
    },
}

impl From<DatapathError> for DaemonError {
    fn from(e: DatapathError) -> Self {
        Self::Datapath(Box::new(e))
    }
}

/// The source address the kernel picks toward `dst` (UDP connect: no packet is sent), of
/// `dst`'s family.
///
/// # Errors
/// No route, or a socket error.
pub fn route_source(dst: impl Into<IpAddr>) -> io::Result<IpAddr> {
    let dst = dst.into();
    let any: IpAddr = match dst {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let sock = UdpSocket::bind((any, 0))?;
    sock.connect((dst, 9))?;
    Ok(sock.local_addr()?.ip())
}

/// Whether `addr` is assigned to this host (a bind to it succeeds).
fn is_local(addr: IpAddr) -> bool {
    UdpSocket::bind((addr, 0)).is_ok()
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
///
/// # Errors
/// clock_gettime failure.
pub fn monotonic_ns() -> io::Result<u64> {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_err(io::Error::from)?;
    let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
    Ok(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}

/// Whether the datapath needs IPv6 forwarding: the config has an IPv6 home CIDR or an IPv6 l4
/// service.
fn wants_ipv6(config: &Config) -> bool {
    config.nat.first_home_cidr(true).is_some()
        || config.l4_services().any(|(_, s)| s.listen.is_ipv6())
}

/// The rules that need the running system (ephemeral port range, the SNAT addresses from the
/// routes home); the SNAT addresses in effect. Run at start and for every reload.
///
/// IPv4: `nat.snat_ipv4`, else the source of the route toward the first IPv4 home CIDR (no
/// route: an error). IPv6 mirrors it with `nat.snat_ipv6` and the first IPv6 home CIDR, except
/// that a missing route is an error only when an l4 service listens on IPv6 (reported by
/// `validate_runtime`, naming the service).
fn runtime_checks(config: &Config, opts: &RunOptions) -> Result<SnatAddrs, DaemonError> {
    let ephemeral = sysctl::ephemeral_port_range(&opts.proc_sys).map_err(|source| {
        DaemonError::EphemeralRange {
            path: opts.proc_sys.clone(),
            source,
        }
    })?;
    let v4 = match (config.nat.snat_ipv4, config.nat.first_home_cidr(false)) {
        (Some(a), _) => Some(a),
        (None, None) => None,
        (None, Some(cidr)) => {
            let a = match route_source(cidr.probe_address()) {
                Ok(IpAddr::V4(a)) => a,
                Ok(IpAddr::V6(a)) => {
                    return Err(DaemonError::SnatRoute {
                        file: config.source.clone(),
                        cidr,
                        source: io::Error::other(format!("IPv6 source {a}")),
                    });
                }
                Err(source) => {
                    return Err(DaemonError::SnatRoute {
                        file: config.source.clone(),
                        cidr,
                        source,
                    });
                }
            };
            tracing::info!(snat = %a, home = %cidr, "nat.snat_ipv4 not set: using the source address of the route home");
            Some(a)
        }
    };
    let v6 = match (config.nat.snat_ipv6, config.nat.first_home_cidr(true)) {
        (Some(a), _) => Some(a),
        (None, None) => None,
        (None, Some(cidr)) => match route_source(cidr.probe_address()) {
            Ok(IpAddr::V6(a)) => {
                tracing::info!(snat = %a, home = %cidr, "nat.snat_ipv6 not set: using the source address of the IPv6 route home");
                Some(a)
            }
            Ok(IpAddr::V4(_)) => None,
            Err(e) => {
                tracing::warn!(home = %cidr, error = %e, "nat.snat_ipv6 not set and no IPv6 route home: no IPv6 SNAT address (IPv6 l4 services need one)");
                None
            }
        },
    };
    let snat = SnatAddrs { v4, v6 };
    config.validate_runtime(RuntimeFacts {
        ephemeral_ports: ephemeral,
        snat,
    })?;
    let local = local_upstreams(config, is_local);
    if !local.is_empty() {
        return Err(DaemonError::LocalUpstream {
            file: config.source.clone(),
            upstreams: local,
        });
    }
    Ok(snat)
}

/// Static upstreams (l4 upstreams, http route upstreams) that are addresses of this host
/// (`is_local`), with their key: the proxy would forward to itself. The file alone names only
/// some of the host's addresses (SNAT, listen, admin: refused by `Config::load`); this needs the
/// running system, so it runs at start and for every reload.
fn local_upstreams(config: &Config, is_local: impl Fn(IpAddr) -> bool) -> Vec<(String, IpAddr)> {
    let mut out = Vec::new();
    for (i, s) in config.services.iter().enumerate() {
        for (j, u) in s.upstreams.iter().enumerate() {
            if let crate::config::UpstreamHost::Ip(ip) = u.host
                && is_local(ip)
            {
                out.push((format!("service[{i}].upstreams[{j}]"), ip));
            }
        }
        for (r, route) in s.http.iter().flat_map(|h| h.routes.iter()).enumerate() {
            for (j, u) in route.upstreams.iter().enumerate() {
                if is_local(u.ip()) {
                    out.push((format!("service[{i}].route[{r}].upstreams[{j}]"), u.ip()));
                }
            }
        }
    }
    out
}

/// Everything `run` decides from the config and the system before it changes anything.
struct Prepared {
    config: Config,
    snat: SnatAddrs,
    ifindexes: Vec<u32>,
}

fn prepare(config_path: &Path, opts: &RunOptions) -> Result<Prepared, DaemonError> {
    let config = Config::load(config_path)?;
    let snat = runtime_checks(&config, opts)?;
    for a in [snat.v4.map(IpAddr::V4), snat.v6.map(IpAddr::V6)]
        .into_iter()
        .flatten()
    {
        if !is_local(a) {
            tracing::warn!(snat = %a, "the SNAT address is not assigned to this host: replies to it will not reach the proxy unless routed here");
        }
    }
    let mut ifindexes = Vec::new();
    if config.datapath.mode != DatapathMode::Userspace {
        for (index, name) in config.datapath.interfaces.iter().enumerate() {
            ifindexes.push(
                datapath::ifindex(name).map_err(|source| DaemonError::Interface {
                    file: config.source.clone(),
                    index,
                    source: Box::new(source),
                })?,
            );
        }
    }
    Ok(Prepared {
        config,
        snat,
        ifindexes,
    })
}

/// Load, pin, fill (the controller's first plan) and attach. On error everything attached so
/// far is detached (dropped).
fn start_datapath(
    p: &Prepared,
    object: &[u8],
    controller: &mut Controller,
) -> Result<(Datapath, datapath::PinDirLock), DaemonError> {
    let c = &p.config;
    let pin_dir = &c.datapath.pin_dir;
    match datapath::ensure_bpffs(pin_dir)? {
        Bpffs::Present => {}
        Bpffs::Mounted(at) => {
            // On a normal host /sys/fs/bpf is mounted at boot; a daemon that had to mount one is
            // often in a private mount namespace (ip netns exec, systemd PrivateMounts), where
            // the mount and every pin in it die with the process.
            tracing::warn!(
                at = %at.display(),
                "mounted a bpffs: if this process runs in a private mount namespace (ip netns \
                 exec, PrivateMounts), the pins die with it and flows do not survive a restart; \
                 mount a bpffs outside it and point datapath.pin_dir there"
            );
        }
    }
    let lock = datapath::lock_pin_dir(pin_dir)?;
    let mut dp = Datapath::load(object, pin_dir, c.datapath.max_flows)?;
    tracing::info!(
        pin_dir = %datapath::versioned_pin_dir(pin_dir).display(),
        max_flows = c.datapath.max_flows,
        "XDP object loaded, maps pinned"
    );
    let existing_services: Vec<_> = dp
        .maps
        .services()?
        .into_iter()
        .map(|(k, v)| (k, v.id))
        .collect();
    let existing_upstreams: Vec<(SocketAddr, u32)> = dp
        .maps
        .upstream_slots()?
        .into_iter()
        .map(|(id, v)| (plan::upstream_addr(&v), id))
        .collect();
    controller.found_in_maps(&existing_services, &existing_upstreams);
    let plan = controller.plan()?;
    dp.maps.apply(&plan, &p.ifindexes)?;
    dp.maps.set_service_options(c)?;
    // Names for `inspect` (the maps hold only ids): a file under /run/xdp-proxy; never fatal.
    crate::inspect::meta::publish(&plan, pin_dir);
    for s in &plan.services {
        tracing::info!(
            service = %s.name,
            id = s.value.id,
            listen = %s.listen,
            proto = %s.protocol,
            has_upstreams = s.value.flags & proxy_common::SERVICE_F_HAS_UPSTREAMS != 0,
            "service in the datapath"
        );
    }
    for (id, addr) in &plan.upstreams {
        tracing::info!(id, upstream = %addr, "upstream slot");
    }
    tracing::info!(
        snat = %p.snat,
        port_min = plan.nat.port_min,
        port_max = plan.nat.port_max,
        "datapath config written (ready)"
    );
    controller.adopt(plan);
    attach_all(&mut dp, p)?;
    dp.release_stale_links(&c.datapath.interfaces)?;
    Ok((dp, lock))
}

/// The one XDP mode every configured interface runs in (never a mix: a native redirect into
/// an interface attached in generic mode, or into a device without native support, is lost
/// after the program counted it). `generic` is taken as asked. `native` and `auto` first ask
/// [`netdev::native`] whether native XDP delivers on every interface (a veth peer without GRO
/// or an XDP program drops everything; ENA's MTU and channel limits): `native` refuses to
/// start when one does not, naming the interface, the reason and the fixes; `auto` runs every
/// interface generic and logs why.
fn host_mode(p: &Prepared) -> Result<AttachMode, DaemonError> {
    let c = &p.config;
    if c.datapath.mode == DatapathMode::Generic {
        return Ok(AttachMode::Generic);
    }
    let egress = netdev::Egress::for_interfaces(c.datapath.interfaces.len());
    let mut refusals = Vec::new();
    for (name, index) in c.datapath.interfaces.iter().zip(&p.ifindexes) {
        let facts = match netdev::native::facts(name, *index) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(
                    interface = %name,
                    error = %e,
                    "could not read what the kernel says of the interface: trying native XDP \
                     without checking that it delivers"
                );
                continue;
            }
        };
        if let Some(Err(why)) = &facts.peer {
            tracing::warn!(interface = %name, why = %why, "the veth peer could not be inspected");
        }
        tracing::debug!(interface = %name, ?facts, "interface facts");
        match netdev::native::judge(&facts) {
            netdev::Native::No { why, fix } => refusals.push((why, fix)),
            netdev::Native::Delivers => {
                if let Some(c) = netdev::native::caveat(&facts, egress) {
                    tracing::warn!(interface = %name, "{c}");
                }
            }
        }
    }
    if refusals.is_empty() {
        return Ok(AttachMode::Native);
    }
    if c.datapath.mode == DatapathMode::Native {
        return Err(DaemonError::NativeWouldNotDeliver {
            file: c.source.clone(),
            refusals,
        });
    }
    for (why, fix) in &refusals {
        tracing::warn!(
            why = %why,
            fix = %fix,
            "native XDP would not deliver (datapath.mode = \"auto\"): every interface runs \
             generic XDP, one mode per host"
        );
    }
    Ok(AttachMode::Generic)
}

/// Attach to every configured interface in [`host_mode`]. Under `auto`, a native attach the
/// kernel refuses on one interface (a driver without native XDP) detaches the others and runs
/// every interface generic.
fn attach_all(dp: &mut Datapath, p: &Prepared) -> Result<(), DaemonError> {
    let c = &p.config;
    let mode = host_mode(p)?;
    let mut failed = None;
    for name in &c.datapath.interfaces {
        match dp.attach(name, mode) {
            Ok(m) => {
                tracing::info!(interface = %name, mode = %m, requested = %c.datapath.mode, "XDP attached");
            }
            Err(e) if mode == AttachMode::Native && c.datapath.mode == DatapathMode::Auto => {
                failed = Some((name, e));
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let Some((name, e)) = failed else {
        return Ok(());
    };
    tracing::warn!(
        interface = %name,
        error = %e,
        "native XDP attach refused (datapath.mode = \"auto\"): every interface runs generic \
         XDP, one mode per host"
    );
    for (iface, e) in dp.detach_interfaces() {
        tracing::warn!(interface = %iface, error = %e, "detaching before the generic attach");
    }
    for name in &c.datapath.interfaces {
        let m = dp.attach(name, AttachMode::Generic)?;
        tracing::info!(interface = %name, mode = %m, requested = %c.datapath.mode, "XDP attached");
    }
    Ok(())
}

/// Run the daemon until SIGINT/SIGTERM. Builds its own tokio runtime.
///
/// # Errors
/// Any failure before the daemon is up; failures of the periodic tasks are logged.
pub fn run(config_path: &Path, object: &[u8], opts: RunOptions) -> Result<(), DaemonError> {
    let prepared = prepare(config_path, &opts)?;
    // Before any descriptor is opened for traffic: every proxied connection holds two.
    let nofile = crate::fdlimit::raise();
    let (runtime, workers) = crate::l4::runtime().map_err(|source| DaemonError::Io {
        what: "starting the tokio runtime",
        source,
    })?;
    tracing::info!(
        workers,
        scheduler = if workers == 1 {
            "current-thread"
        } else {
            "multi-thread"
        },
        "tokio runtime"
    );
    runtime.block_on(serve(prepared, object, opts, nofile))
}

async fn serve(
    p: Prepared,
    object: &[u8],
    opts: RunOptions,
    nofile: Result<crate::fdlimit::Limit, nix::Error>,
) -> Result<(), DaemonError> {
    // Signals first, so a SIGTERM during start-up is not lost.
    let sig = |kind, what| signal(kind).map_err(|source| DaemonError::Io { what, source });
    let mut sigterm = sig(SignalKind::terminate(), "installing the SIGTERM handler")?;
    let mut sigint = sig(SignalKind::interrupt(), "installing the SIGINT handler")?;
    let mut sighup = sig(SignalKind::hangup(), "installing the SIGHUP handler")?;
    // SIGQUIT: exit for a restart or upgrade, leaving the pinned XDP links attached.
    let mut sigquit = sig(SignalKind::quit(), "installing the SIGQUIT handler")?;

    // The control plane: the first DNS answers are needed by the first plan.
    let status = crate::state::shared();
    let mut controller = Controller::new(p.config.clone(), p.snat, status.clone());
    let first_waits = control::resolve_now(&mut controller, true).await;

    let mut userspace = p.config.datapath.mode == DatapathMode::Userspace;
    let mut _pin_lock = None;
    let started = if userspace {
        None
    } else {
        match start_datapath(&p, object, &mut controller) {
            Ok(started) => Some(started),
            Err(e) if p.config.datapath.mode == DatapathMode::Auto && xdp_unavailable(&e) => {
                tracing::warn!(
                    error = %e,
                    "XDP cannot attach (datapath.mode = \"auto\"): falling back to the userspace L4 path"
                );
                userspace = true;
                None
            }
            Err(e) => return Err(e),
        }
    };
    tracing::info!(
        datapath = if userspace { "userspace" } else { "xdp" },
        requested = %p.config.datapath.mode,
        "datapath active"
    );
    let datapath = if let Some((mut dp, lock)) = started {
        _pin_lock = Some(lock);
        let mut settings = sysctl::required(&p.config.datapath.interfaces);
        if wants_ipv6(&p.config) {
            settings.extend(sysctl::required_ipv6());
        }
        for (s, old) in sysctl::apply(&opts.proc_sys, &settings)? {
            tracing::info!(sysctl = %s.name(), value = %s.value, was = %old, "sysctl set");
        }
        if let Some(logger) = dp.take_logger() {
            spawn_log_reader(logger);
        }
        Some(Arc::new(Mutex::new(dp)))
    } else {
        None
    };

    // Admin listener (/healthz, /metrics, /status). The status is the control loop's (its
    // first version was published when the plan was written).
    let counters = crate::l4::counters::Registry::default();
    let admin = crate::admin::Source {
        datapath: datapath.clone(),
        status: status.clone(),
        interfaces: p.config.datapath.interfaces.clone(),
        userspace,
        counters: counters.clone(),
    };
    crate::admin::spawn(p.config.admin.listen, admin)
        .await
        .map_err(|source| DaemonError::Io {
            what: "binding the admin listener ([admin] listen)",
            source,
        })?;

    // The open-file limit reached, against what the services the daemon proxies may open.
    let flows = opts.lifetimes.unwrap_or(p.config.flows);
    let settings = crate::l4::Settings {
        tcp_idle: flows.tcp_established,
        tcp_half_closed_idle: flows.tcp_half_closed,
        udp_idle: flows.udp,
        ..crate::l4::Settings::default()
    };
    crate::fdlimit::report(
        nofile,
        &crate::fdlimit::needs(&p.config, userspace, &settings),
    );

    // Userspace L4: every l4 service served by the daemon, same Maglev choice as the fast path.
    let mut l4 = if userspace {
        let plan = controller.plan().map_err(control::ReconcileError::from)?;
        // No maps to write: the plan counts as written, so the status the userspace path
        // follows carries its ids and tables.
        controller.adopt(plan.clone());
        // `settings` has the idle lifetimes of the `[flows]` section (read at start: a reload
        // changes the fast path's lifetimes, the userspace path's at the next start).
        Some(crate::l4::start(&p.config, &plan, p.snat, status.clone(), settings).await?)
    } else {
        None
    };
    // The http services: served by the daemon's L7 proxy whatever the datapath.
    let l7 = crate::l7::start(&p.config, p.snat, status.clone())?;
    if let Some(l4) = &l4 {
        counters.set_l4(l4);
    }
    counters.set_l7(&l7);

    controller.publish();
    let (events_tx, mut events) = tokio::sync::mpsc::channel(1024);
    let mut tasks = control::Tasks::default();
    tasks.sync(&controller, &events_tx, &first_waits);
    let mut reconcile_pending = false;
    let mut expiry_tick = tokio::time::interval(opts.expiry_interval);
    expiry_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Bound each expiry scan by twice the table size (iteration may restart while the datapath
    // inserts and evicts).
    let capacity = match &datapath {
        Some(dp) => dp
            .lock()
            .map_err(|_| DaemonError::Poisoned)?
            .maps
            .flow_capacity()?,
        None => p.config.datapath.max_flows,
    };
    let max_scan = capacity as usize * 2;
    drop_capabilities(datapath.as_ref(), l4.is_some()).await;
    tracing::info!(config = %p.config.source.display(), "xdp-proxy running");

    let mut leave_attached = false;
    // The kernel's drop counters of each attached interface, looked at every few seconds: a
    // black hole behind the program (frames it counted as forwarded, then lost by the driver)
    // gets a warning naming the interface (also shown in /status and /metrics).
    let mut delivery_tick = tokio::time::interval(DELIVERY_CHECK_EVERY);
    delivery_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut delivery_watch = netdev::DeliveryWatch::default();
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = sigquit.recv() => {
                tracing::info!("SIGQUIT: exiting, datapath left attached for the next start");
                leave_attached = true;
                break;
            }
            _ = sighup.recv() => {
                let dp = datapath.as_ref();
                reconcile_pending = !reload(&mut controller, &opts, dp, &mut tasks, &events_tx).await;
                l7.reconfigure(controller.config());
                if let Some(l4) = &mut l4 {
                    l4.reconfigure(controller.config()).await;
                }
            }
            Some(event) = events.recv() => {
                let changed = match event {
                    control::Event::Health { service, addr, result } => {
                        controller.on_health(&service, addr, &result)
                    }
                    control::Event::Dns { name, result } => {
                        let changed = controller.on_dns(&name, result);
                        if changed {
                            // New addresses get checkers; gone ones lose theirs and their state.
                            controller.prune_health(&controller.health_targets());
                            tasks.sync(&controller, &events_tx, &std::collections::HashMap::new());
                        }
                        changed
                    }
                };
                if changed || reconcile_pending {
                    reconcile_pending = !reconcile_now(&mut controller, datapath.as_ref());
                }
            }
            _ = delivery_tick.tick(), if datapath.is_some() => {
                if let Some(dp) = &datapath {
                    watch_delivery(dp, &mut delivery_watch);
                }
            }
            _ = expiry_tick.tick(), if datapath.is_some() => {
                if let Some(dp) = &datapath {
                    let lifetimes = opts.lifetimes.unwrap_or(controller.config().flows);
                    expire_once(Arc::clone(dp), lifetimes, max_scan).await;
                    release_retired(&mut controller, dp);
                }
                if reconcile_pending {
                    reconcile_pending = !reconcile_now(&mut controller, datapath.as_ref());
                }
            }
        }
    }

    tasks.stop();
    if let Some(dp) = datapath {
        let mut dp = dp.lock().map_err(|_| DaemonError::Poisoned)?;
        if leave_attached {
            for pin in dp.leave_attached() {
                tracing::info!(pin = %pin.display(), "XDP link left attached (pinned): the fast path keeps forwarding");
            }
        } else {
            for (iface, e) in dp.detach_all() {
                tracing::error!(interface = %iface, error = %e, "XDP detach failed");
            }
        }
        tracing::info!(
            pin_dir = %datapath::versioned_pin_dir(&p.config.datapath.pin_dir).display(),
            "maps stay pinned: the next start keeps the flows"
        );
    }
    if let Some(l4) = l4 {
        l4.shutdown().await;
    }
    l7.shutdown().await;
    tracing::info!("xdp-proxy stopped");
    Ok(())
}

/// How often the kernel's drop counters of the attached interfaces are read.
const DELIVERY_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Read each attached interface's drop counters (one rtnetlink request and a 64-entry map walk
/// each, under the datapath lock) and warn about those whose outbound losses grew.
fn watch_delivery(dp: &Arc<Mutex<Datapath>>, watch: &mut netdev::DeliveryWatch) {
    let attached: Vec<(String, AttachMode, Option<netdev::Delivery>)> = match dp.lock() {
        Ok(dp) => dp
            .attachments()
            .iter()
            .map(|a| (a.interface.clone(), a.mode, dp.delivery(a.ifindex)))
            .collect(),
        Err(_) => return,
    };
    let now = std::time::Instant::now();
    for (iface, mode, d) in attached {
        let Some(d) = d else {
            continue;
        };
        if let Some(g) = watch.observe(now, &iface, &d) {
            tracing::warn!(
                interface = %g.iface,
                mode = %mode,
                lost = g.new,
                lost_total = g.total,
                "the kernel dropped frames leaving this interface (tx_dropped + tx_errors + \
                 xdp_xmit_drops grew): \
                 if they are the program's forwards, the path is a black hole (a veth peer \
                 without GRO or an XDP program, a driver that cannot transmit XDP frames); see \
                 /status datapath.interfaces"
            );
        }
    }
}

/// Attached, pinned, first plan written, listeners bound: keep only the capabilities run time
/// needs (`privs`), on every thread. A failure is logged, not fatal: the daemon then runs as it
/// was started.
async fn drop_capabilities(datapath: Option<&Arc<Mutex<Datapath>>>, userspace_l4: bool) {
    let netlink = datapath.is_some_and(|dp| {
        dp.lock()
            .map(|dp| dp.attachments().iter().any(|a| a.pin_path().is_none()))
            .unwrap_or(true)
    });
    match crate::privs::drop_on_every_thread(&crate::privs::runtime_needs(userspace_l4, netlink))
        .await
    {
        Ok(d) => tracing::info!(
            kept = %crate::privs::names(d.caps.permitted),
            bounding = %crate::privs::names(d.caps.bounding),
            threads = d.threads,
            "capabilities dropped on every thread"
        ),
        Err(e) => {
            tracing::error!(error = %e, "dropping capabilities failed: the daemon keeps those it was started with")
        }
    }
}

/// Whether a failure to start the datapath means XDP is not available here (attach refused,
/// object or program refused by the kernel, no bpffs), so `auto` may fall back to userspace.
fn xdp_unavailable(e: &DaemonError) -> bool {
    matches!(e, DaemonError::Datapath(d) if matches!(
        **d,
        DatapathError::Attach { .. }
            | DatapathError::Load { .. }
            | DatapathError::Program { .. }
            | DatapathError::Mount { .. }
    ))
}

/// Ids of removed services and upstreams stay reserved while flows carry them: release those
/// the last expiry scan found no flow for.
fn release_retired(controller: &mut Controller, dp: &Arc<Mutex<Datapath>>) {
    let (svc, ups) = controller.retired_ids();
    if svc.is_empty() && ups.is_empty() {
        return;
    }
    let Ok(dp) = dp.lock() else { return };
    let census = dp.maps.census();
    if !census.scanned {
        return;
    }
    let in_use = |m: &std::collections::BTreeMap<u32, u64>| -> std::collections::HashSet<u32> {
        m.iter()
            .filter(|(_, n)| **n > 0)
            .map(|(id, _)| *id)
            .collect()
    };
    controller.release_retired(&in_use(&census.per_service), &in_use(&census.per_upstream));
    let (svc_after, ups_after) = controller.retired_ids();
    if svc_after.len() < svc.len() || ups_after.len() < ups.len() {
        tracing::debug!(services = ?svc_after, upstreams = ?ups_after, "retired ids still held by flows");
    }
}

/// Write the controller's plan into the maps (the minimal difference). Returns false when it
/// failed (logged; retried on the next event or expiry tick).
fn reconcile_now(controller: &mut Controller, datapath: Option<&Arc<Mutex<Datapath>>>) -> bool {
    let Some(dp) = datapath else {
        // Userspace path: nothing to write; the new plan reaches it through the status.
        if let Err(e) = controller.reconcile(&mut crate::l4::NoMaps) {
            tracing::error!(error = %e, "planning failed (retried on the next event)");
            return false;
        }
        return true;
    };
    let Ok(mut dp) = dp.lock() else {
        tracing::error!("the datapath lock was poisoned by a panicked task: maps not updated");
        return false;
    };
    let result = controller.reconcile(&mut dp.maps);
    if result.is_ok()
        && let Err(e) = dp.maps.set_service_options(controller.config())
    {
        tracing::error!(error = %e, "writing the service options failed (retried on the next event)");
        return false;
    }
    match result {
        Ok(r) => {
            if r.ops > 0 {
                let c = controller.config();
                crate::inspect::meta::publish(controller.shadow(), &c.datapath.pin_dir);
                tracing::info!(
                    writes = r.ops,
                    maglev_slots = r.maglev_slots,
                    "maps updated"
                );
            }
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "updating the maps failed (retried on the next event)");
            false
        }
    }
}

/// SIGHUP: load and validate the config file again. Valid: applied (restart-only keys keep
/// their running values, each refused change logged), with no established flow lost. Invalid:
/// refused with its errors logged; the running config stays. Returns false when the maps
/// could not be written (retried later).
async fn reload(
    controller: &mut Controller,
    opts: &RunOptions,
    datapath: Option<&Arc<Mutex<Datapath>>>,
    tasks: &mut control::Tasks,
    events_tx: &tokio::sync::mpsc::Sender<control::Event>,
) -> bool {
    let path = controller.config().source.clone();
    tracing::info!(config = %path.display(), "SIGHUP: reloading the config");
    let loaded = Config::load(&path)
        .map_err(DaemonError::from)
        .and_then(|new| runtime_checks(&new, opts).map(|snat| (new, snat)));
    let status = controller.shared_status();
    let (new, snat) = match loaded {
        Ok(v) => v,
        Err(e) => {
            for line in e.to_string().lines() {
                tracing::error!(problem = %line, "SIGHUP: the new config is refused; the running config stays");
            }
            if let Ok(mut st) = status.write() {
                st.reload_failures += 1;
                st.last_reload_error = Some(e.to_string());
            }
            return true;
        }
    };
    for (key, running, wanted) in controller.config().restart_only_changes(&new) {
        tracing::error!(
            key,
            running = %running,
            new = %wanted,
            "SIGHUP: this key cannot change while the daemon runs: the running value stays \
             (restart the daemon to apply it); the rest of the config is applied"
        );
    }
    let new = controller.config().with_restart_only_keys_of(new);
    // A reload that brings IPv6 to an XDP datapath needs IPv6 forwarding too.
    if datapath.is_some() && wants_ipv6(&new) {
        match sysctl::apply(&opts.proc_sys, &sysctl::required_ipv6()) {
            Ok(set) => {
                for (s, old) in set {
                    if old != s.value {
                        tracing::info!(sysctl = %s.name(), value = %s.value, was = %old, "sysctl set");
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: IPv6 forwarding could not be turned on: IPv6 flows take the kernel's path")
            }
        }
    }
    if controller.config().flows != new.flows {
        tracing::info!(lifetimes = ?new.flows, "SIGHUP: new [flows] lifetimes apply from the next expiry scan");
    }
    controller.set_config(new, snat);
    let waits = control::resolve_now(controller, false).await;
    tasks.sync(controller, events_tx, &waits);
    let ok = reconcile_now(controller, datapath);
    if let Ok(mut st) = status.write() {
        st.reloads += 1;
        st.last_reload_error = None;
    }
    tracing::info!(
        services = controller.config().services.len(),
        "SIGHUP: config reloaded"
    );
    ok
}

async fn expire_once(dp: Arc<Mutex<Datapath>>, lifetimes: Lifetimes, max_scan: usize) {
    let result = tokio::task::spawn_blocking(move || {
        let now = monotonic_ns().map_err(|source| DaemonError::Io {
            what: "reading CLOCK_MONOTONIC",
            source,
        })?;
        let mut dp = dp.lock().map_err(|_| DaemonError::Poisoned)?;
        Ok::<_, DaemonError>(dp.maps.expire_flows(now, &lifetimes, max_scan)?)
    })
    .await;
    match result {
        Ok(Ok(stats)) => {
            if stats.expired > 0 || stats.orphans_expired > 0 || stats.revived > 0 {
                tracing::debug!(
                    scanned = stats.scanned,
                    expired = stats.expired,
                    orphans = stats.orphans_expired,
                    revived = stats.revived,
                    "flows expired"
                );
            }
        }
        Ok(Err(e)) => tracing::error!(error = %e, "flow expiry failed"),
        Err(e) => tracing::error!(error = %e, "flow expiry task failed"),
    }
}

/// Drain the eBPF log ring buffer into tracing. Polled (the ring buffer read is non-blocking)
/// rather than registered with the reactor, which would need `unsafe` for the fd's lifetime.
fn spawn_log_reader(mut logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            logger.flush();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_on_this_hosts_addresses_are_named() {
        let text = "[datapath]\ninterfaces = [\"eth0\"]\n[nat]\nsnat_ipv4 = \"10.20.0.1\"\n\
                    home_cidrs = [\"10.20.0.0/16\"]\n\
                    [[service]]\nname = \"a\"\nlisten = \"10.10.0.1:80\"\n\
                    upstreams = [\"10.20.0.5:80\", \"10.20.0.6:80\"]\n";
        let c = Config::parse(text, Path::new("/etc/xdp-proxy.toml")).unwrap();
        let local: IpAddr = "10.20.0.6".parse().unwrap();
        assert_eq!(
            local_upstreams(&c, |ip| ip == local),
            vec![("service[0].upstreams[1]".to_owned(), local)]
        );
        assert!(local_upstreams(&c, |_| false).is_empty());
    }

    #[test]
    fn route_source_of_loopback() {
        assert_eq!(
            route_source(Ipv4Addr::LOCALHOST).unwrap(),
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        );
        assert!(is_local(Ipv4Addr::LOCALHOST.into()));
    }

    #[test]
    fn monotonic_clock_advances() {
        let a = monotonic_ns().unwrap();
        let b = monotonic_ns().unwrap();
        assert!(a > 0 && b >= a);
    }
}
