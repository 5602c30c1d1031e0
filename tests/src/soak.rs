//! The soak: many concurrent, checksummed TCP flows and UDP sessions through the XDP fast path
//! for a bounded time, with faults injected on a schedule, and the daemon's resources measured.
//! Driven by `tests/tests/reliability.rs` (a short CI version) and by the `xdp-proxy-soak`
//! binary (`cargo xtask soak`, 10 minutes by default).
//!
//! Shape: the two-interface lab with three home addresses, one service `web` (TCP) over three
//! upstreams and one service `dns` (UDP) over the third:
//! - `10.200.0.2:8080` "flapping": its health checks are dropped by an nftables rule in the
//!   home namespace for a while, twice per cycle (only the daemon's checks, which come from the
//!   kernel's ephemeral ports; XDP flows come from the SNAT range and pass), so it leaves the
//!   Maglev table and comes back while its own flows go on;
//! - `10.200.0.3:8080` "victim": its server is stopped (listener closed, open connections
//!   aborted) and started again once per cycle;
//! - `10.200.0.4:8080` "stable": TCP and the UDP responder.
//!
//! Each TCP flow is a new connection: `GET /` (the answer names the upstream), then an upload
//! and a download of seed-derived sizes, every byte checked, then close; each flow is bounded by
//! [`FLOW_LIMIT`]. A flow may fail only if it was on the victim (or had not learned its upstream
//! yet) while the victim was down or within the health checks' detection time after; it must
//! fail with an error within the bound (RST, refusal, EOF), never hang. Every other failure is
//! a loss and fails the soak. UDP: sockets each run a series of checked request/answer
//! exchanges (datagrams retried on loss, as `traffic::udp_exchange` does).
//!
//! The client has one address and the service one address and port, so every TCP flow needs
//! a client port of its own, and a port the client closed first stays in TIME_WAIT for 60 s.
//! New flows are paced to [`flow_rate_budget`] (90 % of the ephemeral ports, less those in
//! flight, per 60 s: 419 flows/s with 300 at once) so the client never runs out; a connect that
//! still finds no local port (EADDRNOTAVAIL: nothing was sent) is counted apart, not as a flow.
//!
//! Faults (fractions of each cycle): `kill -9` of the daemon and a new daemon adopting the
//! pinned XDP links at 0.08 of the first cycle (once, so the last daemon runs for most of the
//! soak and its resources are compared over that time); victim down at 0.15, up at 0.35;
//! health checks of the flapping upstream dropped 0.45-0.55 and 0.65-0.72; SIGHUP every
//! `hup_every`.
//!
//! Measured at the start (after warm-up), 2 s after the restarted daemon is healthy, and at the
//! end: the daemon's VmRSS and open descriptors (/proc/PID), and the forward flow table's
//! entries (`inspect maps`). Steady means: RSS at the end within 25 % + 8 MiB of the restarted
//! daemon's first measurement, plus 512 B per flow the table grew by since (the daemon's flow
//! scans read both tables whole), descriptors within +16, the flow table below its capacity and no
//! larger than what the flows of the last expiry period (130 s: every lifetime of a closed flow
//! plus the scan) can hold.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::task::JoinSet;

use crate::netns::{self, Daemon, Lab, Netns, TwoInterface, sock, two};
use crate::traffic::{Conn, HomeServer, splitmix64};

/// The three home addresses (see the module docs).
pub const FLAPPING: Ipv4Addr = two::HOME;
pub const VICTIM: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
pub const STABLE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 4);
pub const HOME_PORT: u16 = 8080;
pub const TCP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 53;
pub const ADMIN: &str = "127.0.0.1:9100";
/// Bound of one TCP flow, connect to close.
pub const FLOW_LIMIT: Duration = Duration::from_secs(20);
/// Health check settings of the soak's config (interval x fall = detection time).
const HEALTH_INTERVAL_MS: u64 = 200;
const HEALTH_FALL: u64 = 2;
/// After a victim goes down (or comes back), how long its flows may still fail: detection time
/// plus slack (a flow that started before the removal lands on the dead victim).
const FAULT_GRACE: Duration = Duration::from_secs(4);
/// Flow table capacity of the soak: the daemon's default.
pub const MAX_FLOWS: u32 = proxy_common::DEFAULT_MAX_FLOWS;
/// A client whose flow failed waits this long before its next one (as real clients back off),
/// so a dead upstream's instant refusals do not turn into thousands of new flows a second.
const FAILURE_BACKOFF: Duration = Duration::from_millis(100);
/// How long Linux keeps a closed connection's port in TIME_WAIT (`TCP_TIMEWAIT_LEN`, not
/// tunable): the side that closes first holds its port this long.
const TIME_WAIT: Duration = Duration::from_secs(60);
/// Share of the client's port budget the soak may use (see [`flow_rate_budget`]).
const PORT_BUDGET_SHARE: f64 = 0.9;

/// What to run.
#[derive(Clone, Debug)]
pub struct SoakOptions {
    pub duration: Duration,
    /// Length of one fault cycle.
    pub cycle: Duration,
    /// TCP flows in flight at once.
    pub concurrency: usize,
    /// UDP sockets (sessions) in flight at once; each does `udp_requests` exchanges.
    pub udp_sessions: usize,
    pub udp_requests: usize,
    pub hup_every: Duration,
    /// Faults to inject.
    pub kill_upstream: bool,
    pub flap_health: bool,
    pub kill9: bool,
    pub seed: u64,
}

impl SoakOptions {
    /// The CI version: `secs` seconds, one cycle, every fault once.
    #[must_use]
    pub fn ci(secs: u64) -> Self {
        Self {
            duration: Duration::from_secs(secs),
            cycle: Duration::from_secs(secs),
            concurrency: 200,
            udp_sessions: 8,
            udp_requests: 20,
            hup_every: Duration::from_secs(5),
            kill_upstream: true,
            flap_health: true,
            kill9: true,
            seed: 0x50a4,
        }
    }
}

/// What a soak did and measured.
#[derive(Clone, Debug, Default)]
pub struct SoakReport {
    pub elapsed: Duration,
    pub tcp_flows_ok: u64,
    /// Flows that failed on the killed upstream (fast, with an error).
    pub tcp_flows_failed_on_victim: u64,
    /// Longest time a failed flow took to fail.
    pub slowest_failure: Duration,
    pub tcp_bytes: u64,
    pub max_concurrent: usize,
    pub udp_sessions: u64,
    pub udp_requests: u64,
    pub udp_retries: u64,
    pub udp_bytes: u64,
    pub faults: BTreeMap<&'static str, u64>,
    /// (pid, VmRSS KiB, open fds, forward flow entries) at the start and at the end.
    pub start: Sample,
    pub end: Sample,
    /// The first sample of the daemon process that was running at the end.
    pub end_daemon_first: Sample,
    /// Flows created in the last expiry period (bound of the table at the end).
    pub recent_flows: u64,
    /// New TCP flows per second the client may open (its port budget, [`flow_rate_budget`]).
    pub flow_rate_cap: f64,
    /// The client's ephemeral ports (`ip_local_port_range` of its namespace).
    pub client_ports: u32,
    /// Connects that failed in the client's own kernel with EADDRNOTAVAIL (no local port free:
    /// nothing was sent, so not a flow); retried after a back-off. 0 when the budget holds.
    pub client_port_waits: u64,
    /// The datapath's non-zero `XP_REASONS` counters at the end (pinned: the whole soak).
    pub reasons: BTreeMap<String, u64>,
    /// Bytes corrupted or lost on flows not on the killed upstream: always 0 for a passing soak.
    pub losses: u64,
}

/// One measurement of the daemon.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub at: Duration,
    pub pid: u32,
    pub rss_kib: u64,
    pub fds: u64,
    pub flows: u64,
}

impl std::fmt::Display for SoakReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "soak: {:.0?}", self.elapsed)?;
        writeln!(
            f,
            "  TCP flows: {} complete and checked ({} MiB), {} failed fast on the killed upstream \
             (slowest failure {:.1?}), at most {} at once",
            self.tcp_flows_ok,
            self.tcp_bytes >> 20,
            self.tcp_flows_failed_on_victim,
            self.slowest_failure,
            self.max_concurrent
        )?;
        writeln!(
            f,
            "  UDP: {} sessions, {} requests checked ({} KiB), {} retried",
            self.udp_sessions,
            self.udp_requests,
            self.udp_bytes >> 10,
            self.udp_retries
        )?;
        writeln!(
            f,
            "  client: {} ephemeral ports, new TCP flows paced at <= {:.0}/s, {} connects found no \
             free local port",
            self.client_ports, self.flow_rate_cap, self.client_port_waits
        )?;
        writeln!(f, "  faults injected: {:?}", self.faults)?;
        writeln!(
            f,
            "  daemon at start: pid {} VmRSS {} KiB, {} fds, {} flows",
            self.start.pid, self.start.rss_kib, self.start.fds, self.start.flows
        )?;
        writeln!(
            f,
            "  last daemon first seen: pid {} VmRSS {} KiB, {} fds, {} flows (at {:.0?})",
            self.end_daemon_first.pid,
            self.end_daemon_first.rss_kib,
            self.end_daemon_first.fds,
            self.end_daemon_first.flows,
            self.end_daemon_first.at
        )?;
        writeln!(
            f,
            "  daemon at end:   pid {} VmRSS {} KiB, {} fds, {} flows (flows of the last expiry period: {})",
            self.end.pid, self.end.rss_kib, self.end.fds, self.end.flows, self.recent_flows
        )?;
        writeln!(f, "  datapath reasons: {:?}", self.reasons)?;
        write!(f, "  bytes lost or corrupted: {}", self.losses)
    }
}

/// The daemon config of the soak.
#[must_use]
pub fn config(pin_dir: &Path) -> String {
    format!(
        r#"[datapath]
interfaces = ["{pc}", "{ph}"]
mode = "native"
pin_dir = "{pin}"

[nat]
snat_ipv4 = "{snat}"
port_range = [10240, 32767]
home_cidrs = ["{cidr}"]

[admin]
listen = "{ADMIN}"

[[service]]
name = "web"
listen = "{svc}:{TCP_PORT}"
protocol = "tcp"
upstreams = ["{FLAPPING}:{HOME_PORT}", "{VICTIM}:{HOME_PORT}", "{STABLE}:{HOME_PORT}"]
[service.health]
kind = "tcp"
interval = "{HEALTH_INTERVAL_MS}ms"
timeout = "150ms"
rise = 2
fall = {HEALTH_FALL}

[[service]]
name = "dns"
listen = "{svc}:{UDP_PORT}"
protocol = "udp"
upstreams = ["{STABLE}:{HOME_PORT}"]
[service.health]
kind = "tcp"
interval = "{HEALTH_INTERVAL_MS}ms"
timeout = "150ms"
"#,
        pc = two::PROXY_CLIENT_DEV,
        ph = two::PROXY_HOME_DEV,
        pin = pin_dir.display(),
        snat = two::PROXY_HOME_SIDE,
        cidr = two::HOME_CIDR,
        svc = two::PROXY_CLIENT_SIDE,
    )
}

/// `GET path` on the admin listener from inside `ns`: (status code, body).
pub fn admin_get(ns: &Netns, path: &str) -> Result<(u16, String)> {
    let path = path.to_owned();
    ns.run(Duration::from_secs(10), move || async move {
        let mut s = tokio::net::TcpStream::connect(ADMIN)
            .await
            .with_context(|| format!("connect {ADMIN}"))?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
            .await
            .map_err(|_| anyhow!("admin {path}: timed out"))??;
        let text = String::from_utf8(raw).context("admin answer is not UTF-8")?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("no head in {text:?}"))?;
        let code = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow!("bad status line in {head:?}"))?;
        Ok((code, body.to_owned()))
    })
}

/// `GET path` on the admin listener from inside `ns` through curl: the body of a 2xx answer
/// (anything else is an error).
///
/// # Errors
/// curl failed or the answer was not 2xx.
pub fn admin_text(ns: &Netns, path: &str) -> Result<String> {
    ns.exec(
        "curl",
        &[
            "-sS",
            "--fail",
            "--max-time",
            "5",
            &format!("http://{ADMIN}{path}"),
        ],
    )
}

/// The value of the sample `series` (name and labels exactly as written) in a /metrics text.
///
/// # Errors
/// No such sample, or its value is not a whole number.
pub fn metric(text: &str, series: &str) -> Result<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .ok_or_else(|| anyhow!("/metrics has no {series}"))?
        .trim()
        .parse()
        .with_context(|| format!("/metrics value of {series}"))
}

/// `/status` as JSON.
pub fn status(ns: &Netns) -> Result<serde_json::Value> {
    let (code, body) = admin_get(ns, "/status")?;
    ensure!(code == 200, "/status: {code}");
    serde_json::from_str(&body).with_context(|| format!("/status: not JSON: {body}"))
}

/// Whether upstream `addr` of service `name` is in the Maglev table per `/status`.
#[must_use]
pub fn in_table(st: &serde_json::Value, name: &str, addr: SocketAddr) -> bool {
    st["services"].as_array().is_some_and(|svcs| {
        svcs.iter().filter(|s| s["name"] == name).any(|s| {
            s["upstreams"].as_array().is_some_and(|u| {
                u.iter()
                    .any(|u| u["resolved"] == addr.to_string() && u["in_table"] == true)
            })
        })
    })
}

/// VmRSS in KiB and the number of open descriptors of `pid`.
pub fn proc_usage(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for {pid}"))?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("/proc/{pid}/fd"))?
        .count() as u64;
    Ok((rss, fds))
}

/// Entries of the forward flow table (`inspect maps --json`).
pub fn flow_entries(daemon: &Daemon) -> Result<u64> {
    let maps = daemon.inspect_json("maps")?;
    maps["maps"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == proxy_common::MAP_FLOWS_FWD))
        .and_then(|m| m["used_entries"].as_u64())
        .ok_or_else(|| anyhow!("no used_entries of the forward flow table in {maps}"))
}

fn sample(daemon: &Daemon, t0: Instant) -> Result<Sample> {
    let (rss_kib, fds) = proc_usage(daemon.pid)?;
    Ok(Sample {
        at: t0.elapsed(),
        pid: daemon.pid,
        rss_kib,
        fds,
        flows: flow_entries(daemon)?,
    })
}

fn start_daemon(lab: &mut Lab, proxy: &Netns, label: &str) -> Result<Daemon> {
    let bin = netns::daemon_binary()?;
    let pin_dir = lab.mount_bpffs()?;
    let cfg = lab.write_file("soak.toml", &config(&pin_dir))?;
    let arg = cfg.to_string_lossy().into_owned();
    let pid = lab.spawn_daemon(label, proxy, &bin, &["run", "--config", &arg])?;
    Ok(Daemon {
        pid,
        bin,
        pin_dir,
        config: cfg,
    })
}

/// Wait until the daemon answers /healthz with 200 (bounded).
fn wait_healthy(lab: &mut Lab, proxy: &Netns, daemon: &Daemon) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        lab.check_running(daemon.pid)?;
        if admin_get(proxy, "/healthz").is_ok_and(|(c, _)| c == 200) {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "daemon pid {} not healthy after 30 s\n{}",
        daemon.pid,
        lab.log_tail(daemon.pid, 30)
    )
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) -> Result<()> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
    nix::sys::signal::kill(pid, sig).with_context(|| format!("kill -{sig} {pid}"))
}

/// Drop (or stop dropping) the daemon's health checks to the flapping upstream, in the home
/// namespace: TCP to its port from the proxy's own address and the kernel's ephemeral ports.
fn flap(home: &Netns, down: bool) -> Result<()> {
    if down {
        let rules = format!(
            "table ip xpt_flap {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  \
             ip saddr {} ip daddr {FLAPPING} tcp dport {HOME_PORT} tcp sport 32768-65535 drop\n }}\n}}\n",
            two::PROXY_HOME_SIDE
        );
        let path = std::env::temp_dir().join(format!("xpt-flap-{}.nft", std::process::id()));
        std::fs::write(&path, rules).context("writing the nft rules")?;
        let r = home.exec("nft", &["-f", &path.to_string_lossy()]);
        let _ = std::fs::remove_file(&path);
        r.map(drop)
    } else {
        home.exec("nft", &["delete", "table", "ip", "xpt_flap"])
            .map(drop)
    }
}

/// Windows in which the victim was down (start, end of grace), shared with the clients.
#[derive(Debug, Default)]
struct FaultWindows {
    victim: Mutex<Vec<(Instant, Option<Instant>)>>,
}

impl FaultWindows {
    fn victim_down(&self, at: Instant) {
        if let Ok(mut v) = self.victim.lock() {
            v.push((at, None));
        }
    }

    fn victim_up(&self, at: Instant) {
        if let Ok(mut v) = self.victim.lock()
            && let Some(last) = v.last_mut()
        {
            last.1 = Some(at + FAULT_GRACE);
        }
    }

    /// Whether a flow that ran from `start` to `end` overlapped a victim-down window.
    fn overlaps(&self, start: Instant, end: Instant) -> bool {
        self.victim.lock().is_ok_and(|v| {
            v.iter()
                .any(|(down, up)| *down <= end && up.is_none_or(|up| start <= up))
        })
    }
}

#[derive(Debug, Default)]
struct Counters {
    ok: AtomicU64,
    /// Connects refused by the client's own kernel for want of a local port (EADDRNOTAVAIL).
    port_waits: AtomicU64,
    /// Client port -> (start, end, upstream, ok) of the last flow that used it.
    #[allow(clippy::type_complexity, reason = "a diagnostic record")]
    port_last:
        Mutex<std::collections::HashMap<u16, (Duration, Duration, Option<SocketAddr>, bool)>>,
    failed_on_victim: AtomicU64,
    bytes: AtomicU64,
    slowest_failure_ms: AtomicU64,
    active: AtomicU64,
    max_active: AtomicU64,
    /// Creation times (since start) of flows, for the flow-table bound.
    started: Mutex<Vec<Duration>>,
    losses: Mutex<Vec<String>>,
}

/// One TCP flow: greet (learn the upstream), upload, download, close.
async fn one_flow(
    service: SocketAddr,
    seed: u64,
    local: &AtomicU64,
) -> (Option<SocketAddr>, Result<u64>) {
    let mut upstream = None;
    let r = async {
        let mut c = Conn::connect(service, Duration::from_secs(3)).await?;
        local.store(u64::from(c.local_addr().port()), Ordering::Relaxed);
        let (status, body) = c.get_text("/").await?;
        ensure!(status.contains(" 200 "), "GET /: {status}");
        upstream = body
            .split_whitespace()
            .nth(3)
            .and_then(|a| a.trim_end_matches(':').parse().ok());
        let mut s = seed;
        let up = 4096 + splitmix64(&mut s) % (60 << 10);
        let down = 4096 + splitmix64(&mut s) % (124 << 10);
        c.put_sink(seed, up).await?;
        c.get_blob(seed ^ 0xd0, down).await?;
        Ok(up + down)
    };
    let r = match tokio::time::timeout(FLOW_LIMIT, r).await {
        Ok(r) => r,
        Err(_) => Err(anyhow!("flow hung for {FLOW_LIMIT:?}")),
    };
    (upstream, r)
}

/// The ephemeral ports of the calling thread's network namespace (`ip_local_port_range`).
fn ephemeral_ports() -> Result<u32> {
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let mut it = text.split_whitespace().map(str::parse::<u32>);
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if hi >= lo => Ok(hi - lo + 1),
        _ => bail!("{path}: unexpected {text:?}"),
    }
}

/// New TCP flows per second a client with `ports` ephemeral ports toward one service address
/// can open without running out of them: every flow the client closes first holds its port in
/// TIME_WAIT for 60 s (refused and reset connects hold none), `concurrency` more are in use, and
/// only [`PORT_BUDGET_SHARE`] of the rest is used. 28,232 ports (32768-60999), 300 at once:
/// 0.9 x 27,932 / 60 s = 419 flows/s.
#[must_use]
pub fn flow_rate_budget(ports: u32, concurrency: usize) -> f64 {
    let free = f64::from(ports) - concurrency as f64;
    (PORT_BUDGET_SHARE * free / TIME_WAIT.as_secs_f64()).max(1.0)
}

/// Whether `e` is the client's own connect() finding no free local port (EADDRNOTAVAIL):
/// nothing was sent, so it is no flow through the proxy.
fn no_local_port(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrNotAvailable)
    })
}

/// Run TCP flows, `concurrency` at a time and at most the client's port budget per second
/// ([`flow_rate_budget`]), until `stop`. Returns (ephemeral ports, flows/s cap).
async fn tcp_clients(
    concurrency: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
    windows: Arc<FaultWindows>,
    counters: Arc<Counters>,
    t0: Instant,
) -> Result<(u32, f64)> {
    let service = sock(two::PROXY_CLIENT_SIDE, TCP_PORT);
    let victim = sock(VICTIM, HOME_PORT);
    let ports = ephemeral_ports()?;
    let rate = flow_rate_budget(ports, concurrency);
    let gap = Duration::from_secs_f64(1.0 / rate);
    // Paced start times; a slow stretch may be made up for at most one second's worth.
    let mut next_start = tokio::time::Instant::now();
    let mut set = JoinSet::new();
    let mut next = 0u64;
    loop {
        while set.len() < concurrency && !stop.load(Ordering::Relaxed) {
            let now = tokio::time::Instant::now();
            if next_start > now {
                tokio::time::sleep_until(next_start).await;
            }
            next_start =
                next_start.max(now.checked_sub(Duration::from_secs(1)).unwrap_or(now)) + gap;
            let flow_seed = seed.wrapping_mul(1_000_003).wrapping_add(next);
            next += 1;
            let (windows, counters) = (Arc::clone(&windows), Arc::clone(&counters));
            set.spawn(async move {
                let begin = Instant::now();
                if let Ok(mut s) = counters.started.lock() {
                    s.push(begin - t0);
                }
                let active = counters.active.fetch_add(1, Ordering::Relaxed) + 1;
                counters.max_active.fetch_max(active, Ordering::Relaxed);
                let local = AtomicU64::new(0);
                let (upstream, r) = one_flow(service, flow_seed, &local).await;
                counters.active.fetch_sub(1, Ordering::Relaxed);
                let end = Instant::now();
                // The flow that used this client port before (for a loss: was the port reused
                // right after that flow's TIME_WAIT?).
                let port = u16::try_from(local.load(Ordering::Relaxed)).unwrap_or(0);
                let previous = counters.port_last.lock().ok().and_then(|mut m| {
                    if port == 0 {
                        return None;
                    }
                    m.insert(port, (begin - t0, end - t0, upstream, r.is_ok()))
                });
                match r {
                    Ok(bytes) => {
                        counters.ok.fetch_add(1, Ordering::Relaxed);
                        counters.bytes.fetch_add(bytes, Ordering::Relaxed);
                    }
                    Err(e) if no_local_port(&e) => {
                        counters.port_waits.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(FAILURE_BACKOFF).await;
                    }
                    Err(e) => {
                        let took = end - begin;
                        counters.slowest_failure_ms.fetch_max(
                            u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
                            Ordering::Relaxed,
                        );
                        let on_victim = upstream.is_none_or(|u| u == victim);
                        if on_victim && windows.overlaps(begin, end) && took < FLOW_LIMIT {
                            counters.failed_on_victim.fetch_add(1, Ordering::Relaxed);
                        } else if let Ok(mut l) = counters.losses.lock() {
                            let before = previous.map_or_else(
                                || "first use of the port".to_owned(),
                                |(b, e, u, ok)| {
                                    format!(
                                        "port used before by a flow from {b:.3?} to {e:.3?} on \
                                         {u:?} ({}), {:.3?} before this one began",
                                        if ok { "ok" } else { "failed" },
                                        (begin - t0).saturating_sub(e)
                                    )
                                },
                            );
                            l.push(format!(
                                "flow {flow_seed} from port {port} on {upstream:?} ({:.3?} after \
                                 start, took {took:.1?}): {e:#}; {before}",
                                begin - t0
                            ));
                        }
                        tokio::time::sleep(FAILURE_BACKOFF).await;
                    }
                }
            });
        }
        if set.is_empty() {
            return Ok((ports, rate));
        }
        set.join_next().await;
    }
}

/// Run UDP sessions, `sessions` at a time, until `stop`. Returns (sessions, requests, retries,
/// bytes).
async fn udp_clients(
    sessions: usize,
    requests: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> Result<(u64, u64, u64, u64)> {
    let service = sock(two::PROXY_CLIENT_SIDE, UDP_PORT);
    let mut totals = (0u64, 0u64, 0u64, 0u64);
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let r = crate::traffic::udp_exchange(service, sessions, requests, seed ^ round << 40)
            .await
            .with_context(|| format!("UDP round {round}"))?;
        totals.0 += r.sockets as u64;
        totals.1 += r.requests as u64;
        totals.2 += r.retries as u64;
        totals.3 += r.bytes;
        round += 1;
        // Paced: a few new UDP flows per second, not a flood of them.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(totals)
}

/// Run the soak; `Err` when anything was lost, hung or a resource grew. The report is returned
/// also on success, to print.
#[allow(clippy::too_many_lines, reason = "one schedule, top to bottom")]
pub fn run(opts: &SoakOptions, abort: &(dyn Fn() -> bool + Sync)) -> Result<SoakReport> {
    let TwoInterface {
        mut lab,
        client,
        proxy,
        home,
    } = TwoInterface::new("soak")?;
    for a in [VICTIM, STABLE] {
        home.ip(&["addr", "add", &format!("{a}/24"), "dev", two::HOME_DEV])?;
    }
    let limit = opts.duration + Duration::from_secs(120);
    let flapping_server = HomeServer::start(&home, sock(FLAPPING, HOME_PORT), None, limit)?;
    let stable_server = HomeServer::start(
        &home,
        sock(STABLE, HOME_PORT),
        Some(sock(STABLE, HOME_PORT)),
        limit,
    )?;
    let mut victim_server = Some(HomeServer::start(
        &home,
        sock(VICTIM, HOME_PORT),
        None,
        limit,
    )?);
    let mut daemon = start_daemon(&mut lab, &proxy, "xdp-proxy")?;
    wait_healthy(&mut lab, &proxy, &daemon)?;
    let mut faults: BTreeMap<&'static str, u64> = BTreeMap::new();

    let stop = Arc::new(AtomicBool::new(false));
    let windows = Arc::new(FaultWindows::default());
    let counters = Arc::new(Counters::default());
    let t0 = Instant::now();
    let tcp = {
        let (stop, windows, counters) = (
            Arc::clone(&stop),
            Arc::clone(&windows),
            Arc::clone(&counters),
        );
        let (n, seed) = (opts.concurrency, opts.seed);
        client.spawn(limit, move |_s| {
            tcp_clients(n, seed, stop, windows, counters, t0)
        })?
    };
    let udp = {
        let stop = Arc::clone(&stop);
        let (n, r, seed) = (opts.udp_sessions, opts.udp_requests, opts.seed);
        client.spawn(limit, move |_s| udp_clients(n, r, seed, stop))?
    };
    // Warm-up, then the first sample.
    thread::sleep(Duration::from_secs(2));
    let start = sample(&daemon, t0)?;
    let mut end_daemon_first = start;

    // The schedule: events at fractions of each cycle.
    let cycle = opts.cycle.max(Duration::from_secs(10));
    let mut next_hup = t0 + opts.hup_every;
    let mut cycle_start = t0;
    let mut done = [false; 4];
    let mut victim_down = false;
    let mut flapped = false;
    let mut killed = false;
    let deadline = t0 + opts.duration;
    let result = (|| -> Result<()> {
        while Instant::now() < deadline {
            ensure!(!abort(), "interrupted");
            lab.check_running(daemon.pid)?;
            let now = Instant::now();
            if now >= cycle_start + cycle {
                cycle_start += cycle;
                done = [false; 4];
            }
            let at = |f: f64| cycle_start + cycle.mul_f64(f);
            if opts.hup_every > Duration::ZERO && now >= next_hup {
                signal(daemon.pid, nix::sys::signal::Signal::SIGHUP)?;
                *faults.entry("sighup_reload").or_default() += 1;
                next_hup += opts.hup_every;
            }
            if opts.kill_upstream && !done[0] && now >= at(0.15) {
                done[0] = true;
                windows.victim_down(Instant::now());
                if let Some(s) = victim_server.take() {
                    s.stop()?;
                }
                victim_down = true;
                *faults.entry("upstream_killed").or_default() += 1;
            }
            if opts.kill_upstream && !done[1] && now >= at(0.35) {
                done[1] = true;
                victim_server = Some(HomeServer::start(
                    &home,
                    sock(VICTIM, HOME_PORT),
                    None,
                    limit,
                )?);
                windows.victim_up(Instant::now());
                victim_down = false;
                *faults.entry("upstream_restored").or_default() += 1;
            }
            for (i, (from, to)) in [(2usize, (0.45, 0.55)), (3, (0.65, 0.72))] {
                if !opts.flap_health {
                    break;
                }
                if !done[i] && !flapped && now >= at(from) && now < at(to) {
                    flap(&home, true)?;
                    flapped = true;
                    *faults.entry("health_flap").or_default() += 1;
                }
                if !done[i] && flapped && now >= at(to) {
                    flap(&home, false)?;
                    flapped = false;
                    done[i] = true;
                }
            }
            if opts.kill9 && !killed && now >= at(0.08) {
                killed = true;
                signal(daemon.pid, nix::sys::signal::Signal::SIGKILL)?;
                let gone = Instant::now();
                while lab.check_running(daemon.pid).is_ok() {
                    ensure!(
                        gone.elapsed() < Duration::from_secs(10),
                        "kill -9 did not end the daemon"
                    );
                    thread::sleep(Duration::from_millis(20));
                }
                *faults.entry("daemon_kill9_restart").or_default() += 1;
                let label = format!("xdp-proxy-{}", faults["daemon_kill9_restart"]);
                daemon = start_daemon(&mut lab, &proxy, &label)?;
                wait_healthy(&mut lab, &proxy, &daemon)?;
                // Let the new daemon settle (first health round, flow census) before its first
                // measurement: the resource checks compare this process's first and last.
                thread::sleep(Duration::from_secs(2));
                end_daemon_first = sample(&daemon, t0)?;
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    })();
    // Wind down: restore every fault so the last flows can finish.
    if flapped {
        flap(&home, false)?;
    }
    if victim_down {
        victim_server = Some(HomeServer::start(
            &home,
            sock(VICTIM, HOME_PORT),
            None,
            limit,
        )?);
        windows.victim_up(Instant::now());
    }
    stop.store(true, Ordering::Relaxed);
    result?;
    let (client_ports, flow_rate_cap) = tcp.join().context("the TCP clients")?;
    let (udp_sessions, udp_requests, udp_retries, udp_bytes) =
        udp.join().context("the UDP clients")?;
    let elapsed = t0.elapsed();
    let end = sample(&daemon, t0)?;
    lab.check_running(daemon.pid)?;
    let reasons = daemon.stats().map_or_else(
        |_| BTreeMap::new(),
        |st| {
            st["reasons"].as_object().map_or_else(BTreeMap::new, |r| {
                r.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                    .filter(|(_, v)| *v > 0)
                    .collect()
            })
        },
    );

    let expiry_period = Duration::from_secs(130);
    let recent_flows = counters.started.lock().map_or(0, |s| {
        s.iter()
            .filter(|t| elapsed.saturating_sub(**t) < expiry_period)
            .count() as u64
    }) + udp_sessions;
    let losses = counters
        .losses
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    let report = SoakReport {
        elapsed,
        tcp_flows_ok: counters.ok.load(Ordering::Relaxed),
        tcp_flows_failed_on_victim: counters.failed_on_victim.load(Ordering::Relaxed),
        slowest_failure: Duration::from_millis(counters.slowest_failure_ms.load(Ordering::Relaxed)),
        tcp_bytes: counters.bytes.load(Ordering::Relaxed),
        max_concurrent: usize::try_from(counters.max_active.load(Ordering::Relaxed))
            .unwrap_or(usize::MAX),
        udp_sessions,
        udp_requests,
        udp_retries,
        udp_bytes,
        faults,
        start,
        end,
        end_daemon_first,
        recent_flows,
        flow_rate_cap,
        client_ports,
        client_port_waits: counters.port_waits.load(Ordering::Relaxed),
        reasons,
        losses: losses.len() as u64,
    };
    println!("{report}");
    ensure!(
        losses.is_empty(),
        "{} flows not on the killed upstream failed (first 10):\n{}",
        losses.len(),
        losses
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    let first = report.end_daemon_first;
    // The daemon's flow scans read every entry of both tables, and the allocator keeps what a
    // scan of the largest table needed: memory follows the table's size. 512 B per flow more
    // in the table at the end than at the first measurement is allowed for that; a leak grows
    // with time and traffic, not with the table.
    let per_flow_kib = report.end.flows.saturating_sub(first.flows) / 2;
    ensure!(
        report.end.rss_kib <= first.rss_kib + first.rss_kib / 4 + 8 * 1024 + per_flow_kib,
        "daemon memory grew: VmRSS {} KiB -> {} KiB (flows {} -> {})",
        first.rss_kib,
        report.end.rss_kib,
        first.flows,
        report.end.flows
    );
    ensure!(
        report.end.fds <= first.fds + 16,
        "daemon descriptors grew: {} -> {}",
        first.fds,
        report.end.fds
    );
    ensure!(
        report.end.flows < u64::from(MAX_FLOWS) && report.end.flows <= 2 * report.recent_flows + 64,
        "flow table holds {} entries, more than the {} flows of the last expiry period allow",
        report.end.flows,
        report.recent_flows
    );
    if let Some(s) = victim_server {
        s.stop()?;
    }
    flapping_server.stop()?;
    stable_server.stop()?;
    daemon.stop_ok(&mut lab)?;
    Ok(report)
}
