//! Namespace tests: real TCP and UDP traffic from a client namespace through the proxy to a
//! home namespace, in both shapes a proxy host has (see DESIGN.md, "How it is tested").
//!
//! - `two_interface_kernel_nat_baseline`: the same traffic and checks with nftables NAT doing the
//!   proxy's job, no XDP: proves the topology, the traffic generators and the checks themselves
//!   (and, by contrast, that the kernel forwarding counter does grow when the kernel forwards).
//! - `two_interface_xdp`: the daemon attaches the XDP program to both proxy interfaces
//!   (client side, home side): forwarding by XDP_REDIRECT through the devmap.
//! - `one_interface_xdp`: one proxy interface behind a bridge; the service address is also the
//!   SNAT address; forwarding by XDP_TX.
//! - `two_interface_userspace`, `one_interface_userspace`: the same scenarios, traffic and checks
//!   with `datapath.mode = "userspace"`: the daemon proxies in userspace (no XDP attached, nothing
//!   forwarded by the kernel); the XDP-only checks (counters, flow table, SNAT port range) are
//!   replaced by their userspace counterparts (upstream connections from the SNAT address with
//!   kernel-chosen ephemeral ports).
//!
//! Run as root: `cargo test -p integration-tests --test namespace -- --nocapture`. The daemon
//! binary comes from `$XDP_PROXY_BIN` or the same target directory (`cargo xtask test` builds it).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, ensure};
use integration_tests::netns::serial;
use integration_tests::netns::{self, Daemon, Lab, Netns, OneInterface, TwoInterface, one, two};
use integration_tests::traffic::{
    self, HomeServer, HomeStats, LoadReport, UdpReport, get_root_until_up,
};
use serde_json::Value;

/// Concurrent TCP connections per run.
const CONNECTIONS: usize = 200;
/// UDP flows (sockets) and requests per flow.
const UDP_SOCKETS: usize = 8;
const UDP_PER_SOCKET: usize = 4;
/// Service ports on the proxy, and the home servers' port (TCP and UDP alike: the daemon's
/// TCP health checks of the UDP upstream then find a listener too).
const TCP_SERVICE_PORT: u16 = 80;
const UDP_SERVICE_PORT: u16 = 53;
const HOME_PORT: u16 = 8080;
/// SNAT port range; the kernel's ephemeral range (32768-60999) stays clear of it.
const SNAT_PORTS: (u16, u16) = (20_000, 29_999);
/// Kernel-forwarded packets tolerated in the proxy namespace while XDP forwards (first packets
/// to an unresolved neighbour, for example).
const FORW_DATAGRAMS_SLACK: u64 = 16;
/// Bound of the whole client side of one run.
const CLIENT_LIMIT: Duration = Duration::from_secs(180);

/// Which datapath a daemon scenario runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Datapath {
    /// `datapath.mode = "native"`: the XDP fast path.
    Xdp,
    /// `datapath.mode = "userspace"`: the daemon's userspace L4 proxy.
    Userspace,
}

impl Datapath {
    const fn config_mode(self) -> &'static str {
        match self {
            Self::Xdp => "native",
            Self::Userspace => "userspace",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One run of traffic.
// ---------------------------------------------------------------------------------------------

/// What a run measured.
struct RunReport {
    load: LoadReport,
    udp: UdpReport,
    forw_before: u64,
    forw_after: u64,
    elapsed: Duration,
}

impl RunReport {
    fn forw_delta(&self) -> u64 {
        self.forw_after.saturating_sub(self.forw_before)
    }
}

/// From `client`: one warm-up request (retried while the proxy comes up), then `CONNECTIONS`
/// connections opened at once and held until the home server has them all open, then an
/// upload and a download checked end to end on each, concurrently; then the UDP exchange.
/// `ForwDatagrams` of `proxy` is read before the warm-up and after everything.
fn run_traffic(
    client: &Netns,
    proxy: &Netns,
    home: &Arc<HomeStats>,
    tcp_service: SocketAddr,
    udp_service: SocketAddr,
) -> Result<RunReport> {
    let start = Instant::now();
    let forw_before = forw_datagrams(proxy)?;
    let home = Arc::clone(home);
    let (load, udp) = client.run(CLIENT_LIMIT, move || async move {
        let greeting = get_root_until_up(tcp_service).await?;
        println!("warm-up: {}", greeting.trim());

        let conns = traffic::connect_all(tcp_service, CONNECTIONS, Duration::from_secs(10))
            .await
            .context("opening the concurrent connections")?;
        // Every connection is established at the client; wait until the home server holds
        // them all open at once too (nothing is closed before the transfers start).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while home.active() < CONNECTIONS && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ensure!(
            home.active() >= CONNECTIONS,
            "home server holds {} connections open, want {CONNECTIONS}",
            home.active()
        );
        let load = traffic::transfer_all(conns, 1_000)
            .await
            .context("transfers")?;
        let udp = traffic::udp_exchange(udp_service, UDP_SOCKETS, UDP_PER_SOCKET, 77)
            .await
            .context("udp exchange")?;
        Ok((load, udp))
    })?;
    let forw_after = forw_datagrams(proxy)?;
    Ok(RunReport {
        load,
        udp,
        forw_before,
        forw_after,
        elapsed: start.elapsed(),
    })
}

fn forw_datagrams(ns: &Netns) -> Result<u64> {
    ns.ip_snmp()?
        .get("ForwDatagrams")
        .copied()
        .ok_or_else(|| anyhow!("no ForwDatagrams in /proc/net/snmp"))
}

fn print_run(shape: &str, run: &RunReport, home: &HomeStats) {
    println!(
        "{shape}: {} connections, {} bytes up + {} bytes down (>= {} + {} packets) in {:?}; \
         udp {} requests on {} flows, {} retries; home: accepted {}, max open {}, \
         requests {}; ForwDatagrams +{}; run {:?}",
        run.load.connections,
        run.load.bytes_up,
        run.load.bytes_down,
        run.load.min_packets_up,
        run.load.min_packets_down,
        run.load.elapsed,
        run.udp.requests,
        run.udp.sockets,
        run.udp.retries,
        home.accepted(),
        home.max_active(),
        home.requests(),
        run.forw_delta(),
        run.elapsed,
    );
}

// ---------------------------------------------------------------------------------------------
// Checks shared by every shape.
// ---------------------------------------------------------------------------------------------

/// The home server received exactly what was uploaded, intact, and sent what was downloaded;
/// every peer it saw is `snat`; at least `flows` TCP connections and every UDP flow came from
/// `proxied_ports` (the SNAT port range for XDP, the ephemeral range for userspace). Other TCP
/// peers (the daemon's own health checks) must come from the proxy's ephemeral range.
fn check_home(
    home: &HomeStats,
    run: &RunReport,
    snat: Ipv4Addr,
    ephemeral: (u16, u16),
    proxied_ports: (u16, u16),
) -> Result<()> {
    ensure!(home.sink_mismatches() == 0, "home saw corrupted uploads");
    ensure!(
        home.bytes_received() == run.load.bytes_up,
        "home received {} upload bytes, clients sent {}",
        home.bytes_received(),
        run.load.bytes_up
    );
    ensure!(
        home.bytes_sent() >= run.load.bytes_down,
        "home sent {} bytes, clients received {}",
        home.bytes_sent(),
        run.load.bytes_down
    );
    ensure!(
        home.max_active() >= CONNECTIONS,
        "home had at most {} connections open at once",
        home.max_active()
    );
    let ips = home.peer_ips();
    ensure!(
        ips == BTreeSet::from([IpAddr::V4(snat)]),
        "home saw peers {ips:?}, want only the SNAT address {snat}"
    );
    let in_proxied_range = |p: u16| (proxied_ports.0..=proxied_ports.1).contains(&p);
    let tcp = home.tcp_peers();
    let proxied = tcp.iter().filter(|a| in_proxied_range(a.port())).count();
    ensure!(
        proxied > CONNECTIONS,
        "{proxied} TCP connections came from the port range {proxied_ports:?}, want \
         {CONNECTIONS} + warm-up"
    );
    let strays: Vec<_> = tcp
        .iter()
        .filter(|a| {
            !(SNAT_PORTS.0..=SNAT_PORTS.1).contains(&a.port())
                && !(ephemeral.0..=ephemeral.1).contains(&a.port())
        })
        .collect();
    ensure!(
        strays.is_empty(),
        "TCP peers outside the SNAT and ephemeral ranges: {strays:?}"
    );
    let udp = home.udp_peers();
    ensure!(
        udp.len() == UDP_SOCKETS && udp.iter().all(|a| in_proxied_range(a.port())),
        "UDP peers {udp:?}: want {UDP_SOCKETS} flows from the port range {proxied_ports:?}"
    );
    ensure!(
        home.udp_datagrams() >= run.udp.requests as u64,
        "home answered {} datagrams for {} requests",
        home.udp_datagrams(),
        run.udp.requests
    );
    Ok(())
}

fn ephemeral_range(ns: &Netns) -> Result<(u16, u16)> {
    let text = ns.read_sysctl("net.ipv4.ip_local_port_range")?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) => Ok((lo, hi)),
        _ => Err(anyhow!("ip_local_port_range: {text:?}")),
    }
}

/// The lab's namespaces are gone after the lab was dropped.
fn check_cleaned(id: &str) -> Result<()> {
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(id))
                .collect()
        })
        .unwrap_or_default();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    ensure!(
        !std::path::Path::new("/run").join(id).exists()
            || std::env::var_os("XPT_KEEP_LOGS").is_some(),
        "run directory /run/{id} left behind"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Counters from `xdp-proxy inspect stats --json`.
// ---------------------------------------------------------------------------------------------

struct Stats(Value);

impl Stats {
    fn reason(&self, name: &str) -> Result<u64> {
        self.0
            .get("reasons")
            .and_then(|r| r.get(name))
            .and_then(Value::as_u64)
            .ok_or_else(|| anyhow!("inspect stats: no reason {name}: {}", self.0))
    }

    /// The service listening on `listen` ("a.b.c.d:port") with protocol `proto`.
    fn service(&self, listen: SocketAddr, proto: &str) -> Result<Service<'_>> {
        let listen = listen.to_string();
        self.0
            .get("services")
            .and_then(Value::as_array)
            .and_then(|all| {
                all.iter().find(|s| {
                    s.get("listen").and_then(Value::as_str) == Some(listen.as_str())
                        && s.get("proto")
                            .and_then(Value::as_str)
                            .is_none_or(|p| p.eq_ignore_ascii_case(proto))
                })
            })
            .map(Service)
            .ok_or_else(|| anyhow!("inspect stats: no {proto} service {listen}: {}", self.0))
    }
}

struct Service<'a>(&'a Value);

impl Service<'_> {
    fn get(&self, key: &str) -> Result<u64> {
        self.0
            .get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| anyhow!("service counter {key} missing: {}", self.0))
    }
}

/// The counters account for the traffic: every flow was created by the program, every byte
/// crossed it, the forwarding verdicts (`fwd`/`rev` as `*_redirect` or `*_tx`) cover at least
/// the packets the transfers needed, and nothing was dropped.
fn check_counters(
    stats: &Stats,
    run: &RunReport,
    tcp_service: SocketAddr,
    udp_service: SocketAddr,
    verdict: &str,
    other_verdict: &str,
) -> Result<()> {
    let tcp = stats.service(tcp_service, "tcp")?;
    let udp = stats.service(udp_service, "udp")?;
    let flows = tcp.get("new_flows")?;
    ensure!(
        flows > CONNECTIONS as u64,
        "tcp new_flows {flows}, want > {CONNECTIONS} (connections + warm-up)"
    );
    for (key, want) in [
        ("fwd_bytes", run.load.bytes_up),
        ("rev_bytes", run.load.bytes_down),
        ("fwd_packets", run.load.min_packets_up),
        ("rev_packets", run.load.min_packets_down),
    ] {
        let got = tcp.get(key)?;
        ensure!(got >= want, "tcp {key} {got}, want >= {want}");
    }
    let udp_flows = udp.get("new_flows")?;
    ensure!(
        udp_flows >= UDP_SOCKETS as u64,
        "udp new_flows {udp_flows}, want >= {UDP_SOCKETS}"
    );
    for key in ["fwd_packets", "rev_packets"] {
        let got = udp.get(key)?;
        ensure!(
            got >= run.udp.requests as u64,
            "udp {key} {got}, want >= {}",
            run.udp.requests
        );
    }
    let fwd = stats.reason(&format!("fwd_{verdict}"))?;
    let rev = stats.reason(&format!("rev_{verdict}"))?;
    let need = run.load.min_packets_up + run.load.min_packets_down + 2 * run.udp.requests as u64;
    ensure!(
        fwd + rev >= need,
        "fwd_{verdict} {fwd} + rev_{verdict} {rev} < {need} packets the transfers needed"
    );
    for name in [
        format!("fwd_{other_verdict}"),
        format!("rev_{other_verdict}"),
    ] {
        let n = stats.reason(&name)?;
        ensure!(
            n == 0,
            "{name} = {n}: this shape forwards only by {verdict}"
        );
    }
    for name in proxy_common::Reason::ALL
        .iter()
        .map(|r| r.name())
        .filter(|n| n.starts_with("drop_") || *n == "aborted")
    {
        let n = stats.reason(name)?;
        ensure!(n == 0, "{name} = {n}: nothing should be dropped here");
    }
    Ok(())
}

/// Per-upstream counters add up to the per-service ones (every flow packet bumps both).
fn check_upstream_sums(stats: &Stats) -> Result<()> {
    let sum = |list: &str, key: &str| -> u64 {
        stats
            .0
            .get(list)
            .and_then(Value::as_array)
            .map(|all| {
                all.iter()
                    .filter_map(|e| e.get(key).and_then(Value::as_u64))
                    .sum()
            })
            .unwrap_or(0)
    };
    for key in [
        "new_flows",
        "fwd_packets",
        "fwd_bytes",
        "rev_packets",
        "rev_bytes",
    ] {
        let (svc, ups) = (sum("services", key), sum("upstreams", key));
        ensure!(
            svc == ups,
            "{key}: services add up to {svc}, upstreams to {ups}"
        );
    }
    Ok(())
}

/// Counters once the traffic's tail (FIN exchanges of closed connections) has passed: two
/// reads in a row that agree (bounded).
fn settled_stats(daemon: &Daemon) -> Result<Stats> {
    let mut last = daemon.stats()?;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        let now = daemon.stats()?;
        if now == last {
            return Ok(Stats(now));
        }
        last = now;
    }
    Err(anyhow!("counters still moving after 10 s: {last}"))
}

/// The flow table (`inspect flows --json`) holds every proxied TCP connection: from the client,
/// to the upstream, through the SNAT address with a port in range, answered, and no SNAT port
/// twice; and the ports the home server saw are those of these flows.
fn check_flows(
    daemon: &Daemon,
    home: &HomeStats,
    client: Ipv4Addr,
    snat: Ipv4Addr,
    tcp_service: SocketAddr,
    upstream: SocketAddr,
) -> Result<()> {
    let json = daemon.inspect_json("flows")?;
    let rows = json
        .as_array()
        .or_else(|| json.get("flows").and_then(Value::as_array))
        .ok_or_else(|| anyhow!("inspect flows: not a list: {json}"))?;
    let text = |row: &Value, key: &str| row.get(key).and_then(Value::as_str).map(str::to_owned);
    let tcp_service = tcp_service.to_string();
    let mut ports = BTreeSet::new();
    for row in rows.iter().filter(|r| {
        text(r, "proto").as_deref() == Some("tcp")
            && text(r, "service").as_deref() == Some(tcp_service.as_str())
    }) {
        let client_addr: SocketAddr = text(row, "client")
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow!("flow without client: {row}"))?;
        let port = row
            .get("snat_port")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| anyhow!("flow without snat_port: {row}"))?;
        let replied = row
            .get("flags")
            .and_then(Value::as_array)
            .is_some_and(|f| f.iter().any(|x| x.as_str() == Some("replied")));
        ensure!(
            client_addr.ip() == IpAddr::V4(client)
                && text(row, "upstream") == Some(upstream.to_string())
                && text(row, "snat") == Some(snat.to_string())
                && (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&port)
                && row.get("has_reverse").and_then(Value::as_bool) == Some(true)
                && replied,
            "unexpected flow: {row}"
        );
        ensure!(ports.insert(port), "SNAT port {port} used by two flows");
    }
    ensure!(
        ports.len() > CONNECTIONS,
        "{} TCP flows in the table, want > {CONNECTIONS}",
        ports.len()
    );
    let seen: BTreeSet<u16> = home
        .tcp_peers()
        .iter()
        .map(SocketAddr::port)
        .filter(|p| (SNAT_PORTS.0..=SNAT_PORTS.1).contains(p))
        .collect();
    ensure!(
        seen.is_subset(&ports),
        "home saw SNAT ports that no flow holds: {:?}",
        seen.difference(&ports).collect::<Vec<_>>()
    );
    Ok(())
}

fn print_counters(stats: &Stats) {
    let reasons = stats.0.get("reasons").cloned().unwrap_or(Value::Null);
    let nonzero: Vec<String> = reasons
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| v.as_u64().unwrap_or(0) > 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect()
        })
        .unwrap_or_default();
    println!("reasons: {}", nonzero.join(" "));
    if let Some(services) = stats.0.get("services").and_then(Value::as_array) {
        for s in services {
            println!("service: {s}");
        }
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one config text from one shape's values"
)]
fn daemon_config(
    datapath: Datapath,
    interfaces: &[&str],
    pin_dir: &std::path::Path,
    snat: Ipv4Addr,
    home_cidr: &str,
    tcp_service: SocketAddr,
    udp_service: SocketAddr,
    upstream: SocketAddr,
) -> String {
    let interfaces = interfaces
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"[datapath]
interfaces = [{interfaces}]
mode = "{mode}"
pin_dir = "{pin_dir}"

[nat]
snat_ipv4 = "{snat}"
port_range = [{lo}, {hi}]
home_cidrs = ["{home_cidr}"]

[admin]
listen = "127.0.0.1:9100"

# Closed flows stay in the table until check_flows has read them all (a flow the client
# closed first is otherwise gone after the default 5 s grace).
[flows]
tcp_close_grace = "2m"

[[service]]
name = "web"
listen = "{tcp_service}"
protocol = "tcp"
mode = "l4"
upstreams = ["{upstream}"]

[[service]]
name = "dns"
listen = "{udp_service}"
protocol = "udp"
mode = "l4"
upstreams = ["{upstream}"]
"#,
        mode = datapath.config_mode(),
        pin_dir = pin_dir.display(),
        lo = SNAT_PORTS.0,
        hi = SNAT_PORTS.1,
    )
}

/// One shape's namespaces and addresses, as the daemon scenario needs them.
struct Scenario<'a> {
    datapath: Datapath,
    client: &'a Netns,
    proxy: &'a Netns,
    home: &'a Netns,
    /// The proxy interfaces XDP attaches to.
    interfaces: &'a [&'a str],
    client_addr: Ipv4Addr,
    /// The service address (both services listen there).
    service_addr: Ipv4Addr,
    snat: Ipv4Addr,
    home_addr: Ipv4Addr,
    home_cidr: &'a str,
    /// How this shape forwards (`redirect` or `tx`), and how it never does.
    verdict: &'a str,
    other_verdict: &'a str,
    /// `XDP_PROXY_WORKER_THREADS` for the daemon (`None`: its default, two).
    workers: Option<usize>,
}

/// Start the daemon on `sc.datapath`, wait until it is ready, run the traffic, check everything,
/// stop it (it must exit cleanly and detach from every interface).
fn daemon_scenario(lab: &mut Lab, sc: &Scenario<'_>) -> Result<()> {
    let tcp_service = netns::sock(sc.service_addr, TCP_SERVICE_PORT);
    let udp_service = netns::sock(sc.service_addr, UDP_SERVICE_PORT);
    let upstream = netns::sock(sc.home_addr, HOME_PORT);
    let home = HomeServer::start(sc.home, upstream, Some(upstream), CLIENT_LIMIT * 2)?;
    let pin_dir = lab.mount_bpffs()?;
    let config = daemon_config(
        sc.datapath,
        sc.interfaces,
        &pin_dir,
        sc.snat,
        sc.home_cidr,
        tcp_service,
        udp_service,
        upstream,
    );
    let daemon = Daemon::start_with_workers(lab, sc.proxy, &config, sc.workers, &[])?;
    match sc.datapath {
        Datapath::Xdp => {
            daemon.wait_ready(
                lab,
                sc.proxy,
                sc.interfaces,
                2,
                Duration::from_secs(30),
                || false,
            )?;
            for (key, want) in [
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.all.accept_local", "1"),
            ] {
                let got = sc.proxy.read_sysctl(key)?;
                ensure!(got == want, "daemon left {key} = {got}, want {want}");
            }
        }
        Datapath::Userspace => {
            // Both services listening, and the daemon says which datapath is active.
            daemon.wait_log(lab, &["userspace L4 listening"], 2, Duration::from_secs(30))?;
            daemon.wait_log(
                lab,
                &["datapath active", "userspace"],
                1,
                Duration::from_secs(5),
            )?;
        }
    }
    // The scheduler that goes with the worker count (one: current-thread).
    let scheduler = if sc.workers == Some(1) {
        "current-thread"
    } else {
        "multi-thread"
    };
    daemon.wait_log(
        lab,
        &["tokio runtime", scheduler],
        1,
        Duration::from_secs(5),
    )?;

    let run = match run_traffic(sc.client, sc.proxy, home.stats(), tcp_service, udp_service) {
        Ok(run) => run,
        Err(e) => {
            if sc.datapath == Datapath::Xdp
                && let Ok(stats) = daemon.stats()
            {
                print_counters(&Stats(stats));
            }
            return Err(e.context(format!(
                "--- daemon log ---\n{}",
                lab.log_tail(daemon.pid, 40)
            )));
        }
    };
    match sc.datapath {
        Datapath::Xdp => {
            let stats = settled_stats(&daemon)?;
            print_run(sc.verdict, &run, home.stats());
            print_counters(&stats);

            check_home(
                home.stats(),
                &run,
                sc.snat,
                ephemeral_range(sc.proxy)?,
                SNAT_PORTS,
            )?;
            check_counters(
                &stats,
                &run,
                tcp_service,
                udp_service,
                sc.verdict,
                sc.other_verdict,
            )?;
            check_upstream_sums(&stats)?;
            check_flows(
                &daemon,
                home.stats(),
                sc.client_addr,
                sc.snat,
                tcp_service,
                upstream,
            )?;
        }
        Datapath::Userspace => {
            print_run("userspace", &run, home.stats());
            // Upstream connections come from the SNAT address, ports chosen by the kernel.
            let ephemeral = ephemeral_range(sc.proxy)?;
            check_home(home.stats(), &run, sc.snat, ephemeral, ephemeral)?;
            for dev in sc.interfaces {
                ensure!(
                    !netns::has_xdp(sc.proxy, dev)?,
                    "datapath.mode = \"userspace\" but an XDP program is attached to {dev}"
                );
            }
        }
    }
    // XDP forwards before the kernel sees the packets; the userspace proxy terminates them:
    // either way the proxy's kernel forwards (almost) nothing.
    ensure!(
        run.forw_delta() <= FORW_DATAGRAMS_SLACK,
        "the proxy's kernel forwarded {} packets (ForwDatagrams), want <= {FORW_DATAGRAMS_SLACK}: \
         traffic did not stay on the {:?} path",
        run.forw_delta(),
        sc.datapath
    );

    let status = daemon.stop(lab)?;
    ensure!(
        status.success(),
        "daemon exited with {status} after SIGTERM\n{}",
        lab.log_tail(daemon.pid, 20)
    );
    for dev in sc.interfaces {
        ensure!(
            !netns::has_xdp(sc.proxy, dev)?,
            "XDP program still attached to {dev} after the daemon stopped"
        );
    }
    home.stop()
}

// ---------------------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------------------

#[test]
fn two_interface_kernel_nat_baseline() -> Result<()> {
    let _serial = serial();
    let topo = TwoInterface::new("base")?;
    let id = topo.lab.id().to_owned();
    let tcp_service = netns::sock(two::PROXY_CLIENT_SIDE, TCP_SERVICE_PORT);
    let udp_service = netns::sock(two::PROXY_CLIENT_SIDE, UDP_SERVICE_PORT);
    let upstream = netns::sock(two::HOME, HOME_PORT);

    topo.proxy.sysctl("net.ipv4.ip_forward", "1")?;
    let rules = format!(
        "table ip xpt {{
            chain pre {{
                type nat hook prerouting priority dstnat;
                ip daddr {svc} tcp dport {tp} dnat to {upstream}
                ip daddr {svc} udp dport {up} dnat to {upstream}
            }}
            chain post {{
                type nat hook postrouting priority srcnat;
                ip daddr {home} tcp dport {hp} snat to {snat}:{lo}-{hi}
                ip daddr {home} udp dport {hp} snat to {snat}:{lo}-{hi}
            }}
        }}",
        svc = two::PROXY_CLIENT_SIDE,
        tp = TCP_SERVICE_PORT,
        up = UDP_SERVICE_PORT,
        home = two::HOME,
        hp = HOME_PORT,
        snat = two::PROXY_HOME_SIDE,
        lo = SNAT_PORTS.0,
        hi = SNAT_PORTS.1,
    );
    let rules_file = topo.lab.write_file("nat.nft", &rules)?;
    topo.proxy
        .exec("nft", &["-f", &rules_file.to_string_lossy()])
        .context("loading the nftables NAT rules")?;

    let home = HomeServer::start(&topo.home, upstream, Some(upstream), CLIENT_LIMIT * 2)?;
    let run = run_traffic(
        &topo.client,
        &topo.proxy,
        home.stats(),
        tcp_service,
        udp_service,
    )?;
    print_run("kernel NAT", &run, home.stats());
    // nftables keeps the client's port when it is free; it falls in the SNAT range only by
    // chance, so only the address is checked here.
    let peers = home.stats().peer_ips();
    ensure!(
        peers == BTreeSet::from([IpAddr::V4(two::PROXY_HOME_SIDE)]),
        "home saw {peers:?}"
    );
    ensure!(home.stats().sink_mismatches() == 0, "corrupted uploads");
    ensure!(
        home.stats().bytes_received() == run.load.bytes_up,
        "upload bytes lost"
    );
    ensure!(
        home.stats().max_active() >= CONNECTIONS,
        "connections not concurrent"
    );
    // The kernel forwarded every packet: the counter the XDP tests bound does move.
    let need = run.load.min_packets_up + run.load.min_packets_down;
    ensure!(
        run.forw_delta() >= need,
        "ForwDatagrams grew by {}, want >= {need}",
        run.forw_delta()
    );
    home.stop()?;
    drop(topo);
    check_cleaned(&id)
}

#[test]
fn two_interface_xdp() -> Result<()> {
    two_interface(Datapath::Xdp, "two")
}

#[test]
fn two_interface_userspace() -> Result<()> {
    two_interface(Datapath::Userspace, "twous")
}

fn two_interface(datapath: Datapath, tag: &str) -> Result<()> {
    let _serial = serial();
    let mut topo = TwoInterface::new(tag)?;
    let id = topo.lab.id().to_owned();
    let sc = Scenario {
        datapath,
        client: &topo.client,
        proxy: &topo.proxy,
        home: &topo.home,
        interfaces: &[two::PROXY_CLIENT_DEV, two::PROXY_HOME_DEV],
        client_addr: two::CLIENT,
        service_addr: two::PROXY_CLIENT_SIDE,
        snat: two::PROXY_HOME_SIDE,
        home_addr: two::HOME,
        home_cidr: two::HOME_CIDR,
        verdict: "redirect",
        other_verdict: "tx",
        workers: None,
    };
    daemon_scenario(&mut topo.lab, &sc)?;
    drop(topo);
    check_cleaned(&id)
}

#[test]
fn one_interface_xdp() -> Result<()> {
    one_interface(Datapath::Xdp, "one")
}

#[test]
fn one_interface_userspace() -> Result<()> {
    one_interface(Datapath::Userspace, "oneus")
}

fn one_interface(datapath: Datapath, tag: &str) -> Result<()> {
    let _serial = serial();
    let mut topo = OneInterface::new(tag)?;
    let id = topo.lab.id().to_owned();
    let sc = Scenario {
        datapath,
        client: &topo.client,
        proxy: &topo.proxy,
        home: &topo.home,
        interfaces: &[one::PROXY_DEV],
        client_addr: one::CLIENT,
        service_addr: one::PROXY,
        snat: one::PROXY,
        home_addr: one::HOME,
        home_cidr: one::CIDR,
        verdict: "tx",
        other_verdict: "redirect",
        // The userspace path with one worker thread here (the bench's setting), two (the
        // default) in the two-interface shape: the same traffic through both schedulers.
        workers: (datapath == Datapath::Userspace).then_some(1),
    };
    daemon_scenario(&mut topo.lab, &sc)?;
    drop(topo);
    check_cleaned(&id)
}
