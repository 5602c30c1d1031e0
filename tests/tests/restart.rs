//! Operating the daemon: restart without losing a flow, the admin endpoints, the pinned-layout
//! check and eBPF log events (two-interface shape, see DESIGN.md "How it is tested").
//!
//! - `kill_9_and_restart_keep_every_transfer`: 50 checksummed uploads held in the middle of
//!   their request bodies; the daemon is killed with SIGKILL (the pinned link keeps XDP
//!   attached), a third of every body goes through while no daemon runs, a new daemon adopts
//!   the pinned link, the rest goes through: all 50 complete with correct checksums, on XDP
//!   (the kernel forwarded nothing, no flow was created twice); then /healthz, /metrics and
//!   /status are checked against the traffic and the config, and SIGTERM detaches.
//! - `sigquit_leaves_the_datapath_for_the_next_start`: SIGQUIT exits leaving the link pinned
//!   and attached; a connection opened before goes on working; the next start adopts it.
//! - `incompatible_pinned_layout_is_refused`: a map pinned under an expected name with another
//!   value size stops the start with an error naming map, field and sizes; nothing attaches.
//! - `ebpf_log_event_reaches_the_daemon_log`: SNAT exhaustion (one-port range) makes the XDP
//!   program log a warning (rate-limited: at most one line per second, with the drops it
//!   stands for), which appears in the daemon's output.
//! - `link_of_an_interface_dropped_from_the_config_is_released`: a link left by a SIGQUIT exit
//!   for an interface the next config no longer names is unpinned (detached) at start.
//! - `links_of_another_layout_version_are_taken_over`: links pinned under another `v<N>` are
//!   switched to the new program and their pins moved.
//! - `runs_with_only_the_units_capabilities`: CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and
//!   CAP_NET_BIND_SERVICE (what docs/xdp-proxy.service grants) suffice to start, serve, exit leaving the datapath, adopt
//!   and detach; once running the daemon holds none of them (its bounding set stays the
//!   unit's: dropping from it needs CAP_SETPCAP).
//!
//! Run as root: `cargo test -p integration-tests --test restart -- --nocapture`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use integration_tests::netns::serial;
use integration_tests::netns::{self, Daemon, Lab, Netns, TwoInterface, two};
use integration_tests::traffic::{self, Conn, HomeServer, get_root_until_up};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const TCP_SERVICE_PORT: u16 = 80;
const UDP_SERVICE_PORT: u16 = 53;
const HOME_PORT: u16 = 8080;
const SNAT_PORTS: (u16, u16) = (20_000, 29_999);
const ADMIN: &str = "127.0.0.1:9100";
/// Transfers held open across the restart.
const TRANSFERS: usize = 50;
/// Upload size of each (in three parts) and download size after it.
const UPLOAD: u64 = 192 << 10;
const DOWNLOAD: u64 = 128 << 10;
/// Kernel-forwarded packets tolerated (first packets to an unresolved neighbour).
const FORW_SLACK: u64 = 16;
/// Bound of every wait in these tests.
const LIMIT: Duration = Duration::from_secs(60);

fn config(pin_dir: &Path, port_range: (u16, u16)) -> String {
    format!(
        r#"[datapath]
interfaces = ["{pc}", "{ph}"]
mode = "native"
pin_dir = "{pin_dir}"

[nat]
snat_ipv4 = "{snat}"
port_range = [{lo}, {hi}]
home_cidrs = ["{home_cidr}"]

[admin]
listen = "{ADMIN}"

[[service]]
name = "web"
listen = "{client_side}:{TCP_SERVICE_PORT}"
protocol = "tcp"
upstreams = ["{home}:{HOME_PORT}"]

[[service]]
name = "dns"
listen = "{client_side}:{UDP_SERVICE_PORT}"
protocol = "udp"
upstreams = ["{home}:{HOME_PORT}"]
"#,
        pc = two::PROXY_CLIENT_DEV,
        ph = two::PROXY_HOME_DEV,
        pin_dir = pin_dir.display(),
        snat = two::PROXY_HOME_SIDE,
        lo = port_range.0,
        hi = port_range.1,
        home_cidr = two::HOME_CIDR,
        client_side = two::PROXY_CLIENT_SIDE,
        home = two::HOME,
    )
}

fn tcp_service() -> SocketAddr {
    SocketAddr::from((two::PROXY_CLIENT_SIDE, TCP_SERVICE_PORT))
}

/// Start `xdp-proxy run` in the proxy namespace under its own log label.
fn start_daemon(lab: &mut Lab, proxy: &Netns, label: &str, config_text: &str) -> Result<Daemon> {
    let bin = netns::daemon_binary()?;
    let pin_dir = lab.mount_bpffs()?;
    let config = lab.write_file(&format!("{label}.toml"), config_text)?;
    let arg = config.to_string_lossy().into_owned();
    let pid = lab.spawn_daemon(label, proxy, &bin, &["run", "--config", &arg])?;
    Ok(Daemon {
        pid,
        bin,
        pin_dir,
        config,
    })
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) -> Result<()> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
    nix::sys::signal::kill(pid, sig).with_context(|| format!("kill -{sig} {pid}"))
}

/// Wait (bounded) until `pid` has exited; returns how (status and log tail).
fn wait_exit(lab: &mut Lab, pid: u32) -> Result<String> {
    let deadline = Instant::now() + LIMIT;
    while Instant::now() < deadline {
        match lab.check_running(pid) {
            Ok(()) => thread::sleep(Duration::from_millis(50)),
            Err(e) => return Ok(format!("{e:#}")),
        }
    }
    bail!("pid {pid} still running after {LIMIT:?}")
}

/// Wait (bounded) until `cond` holds.
fn wait_until(what: &str, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + LIMIT;
    while Instant::now() < deadline {
        if cond()? {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    }
    bail!("timed out waiting for {what}")
}

/// Wait (bounded) until `daemon` answers /healthz with 200: it has attached (or adopted) every
/// interface. (`Daemon::wait_ready` alone cannot tell a restarted daemon from the links left
/// by the previous one.)
fn wait_up(lab: &mut Lab, proxy: &Netns, daemon: &Daemon) -> Result<()> {
    wait_until("the daemon's /healthz", || {
        lab.check_running(daemon.pid)?;
        Ok(admin_get(proxy, "/healthz").is_ok_and(|(c, _)| c == 200))
    })
}

fn forw_datagrams(ns: &Netns) -> Result<u64> {
    ns.ip_snmp()?
        .get("ForwDatagrams")
        .copied()
        .ok_or_else(|| anyhow!("no ForwDatagrams in /proc/net/snmp"))
}

/// One HTTP/1.1 GET to the admin listener from inside `ns`: (status code, body).
fn admin_get(ns: &Netns, path: &str) -> Result<(u16, String)> {
    let path = path.to_owned();
    ns.run(Duration::from_secs(10), move || async move {
        let mut s = tokio::net::TcpStream::connect(ADMIN)
            .await
            .with_context(|| format!("connect {ADMIN}"))?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
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

/// Prometheus samples: `name{labels}` -> value.
fn parse_metrics(text: &str) -> Result<BTreeMap<String, u64>> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l
                .rsplit_once(' ')
                .ok_or_else(|| anyhow!("bad sample line {l:?}"))?;
            Ok((
                k.to_owned(),
                v.parse().with_context(|| format!("value of {l:?}"))?,
            ))
        })
        .collect()
}

fn metric(m: &BTreeMap<String, u64>, key: &str) -> Result<u64> {
    m.get(key)
        .copied()
        .ok_or_else(|| anyhow!("no series {key} in /metrics"))
}

fn reason(stats: &Value, name: &str) -> Result<u64> {
    stats["reasons"][name]
        .as_u64()
        .ok_or_else(|| anyhow!("no reason {name} in inspect stats"))
}

fn service_stat(stats: &Value, listen: &str, key: &str) -> Result<u64> {
    stats["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["listen"] == listen))
        .and_then(|s| s[key].as_u64())
        .ok_or_else(|| anyhow!("no {key} of service {listen} in inspect stats: {stats}"))
}

/// `<pin_dir>/v<ABI_VERSION>`: where the daemon pins.
fn layout_dir(pin_dir: &Path) -> std::path::PathBuf {
    pin_dir.join(format!("v{}", proxy_common::ABI_VERSION))
}

fn pins(pin_dir: &Path, prefix: &str) -> Result<Vec<String>> {
    let dir = layout_dir(pin_dir);
    let mut out: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("read_dir {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    out.sort();
    Ok(out)
}

#[test]
fn kill_9_and_restart_keep_every_transfer() -> Result<()> {
    let _serial = serial();
    let TwoInterface {
        mut lab,
        client,
        proxy,
        home,
    } = TwoInterface::new("restart")?;
    let upstream = SocketAddr::from((two::HOME, HOME_PORT));
    let server = HomeServer::start(&home, upstream, Some(upstream), LIMIT * 4)?;
    let pin_dir = lab.mount_bpffs()?;
    let cfg = config(&pin_dir, SNAT_PORTS);
    let first = start_daemon(&mut lab, &proxy, "xdp-proxy-1", &cfg)?;
    let ifaces = [two::PROXY_CLIENT_DEV, two::PROXY_HOME_DEV];
    first.wait_ready(&mut lab, &proxy, &ifaces, 2, LIMIT, || false)?;
    ensure!(
        pins(&pin_dir, "link_")? == ["link_native_pc", "link_native_ph"],
        "link pins: {:?}",
        pins(&pin_dir, "link_")?
    );

    // Warm up (neighbours resolved), then the 50 held transfers.
    client.run(LIMIT, || async {
        get_root_until_up(tcp_service()).await.map(drop)
    })?;
    let peers_before = server.stats().tcp_peers().len();
    let flows_before = service_stat(&first.stats()?, &tcp_service().to_string(), "new_flows")?;
    let forw_before = forw_datagrams(&proxy)?;
    let (phase_tx, phase_rx) = tokio::sync::watch::channel(0u32);
    let arrived: Arc<[AtomicUsize; 2]> = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let arrived_c = Arc::clone(&arrived);
    let transfers = client.spawn(LIMIT * 3, move |_stop| async move {
        let conns = traffic::connect_all(tcp_service(), TRANSFERS, Duration::from_secs(10)).await?;
        let mut set = tokio::task::JoinSet::new();
        for (i, mut conn) in conns.into_iter().enumerate() {
            let mut phase = phase_rx.clone();
            let arrived = Arc::clone(&arrived_c);
            set.spawn(async move {
                let seed = 5_000 + i as u64;
                conn.put_sink_staged(seed, UPLOAD, &mut phase, &arrived[..], LIMIT * 2)
                    .await
                    .with_context(|| format!("transfer {i} upload"))?;
                conn.get_blob(seed, DOWNLOAD)
                    .await
                    .with_context(|| format!("transfer {i} download"))?;
                Ok::<(), anyhow::Error>(())
            });
        }
        let mut failed = Vec::new();
        while let Some(joined) = set.join_next().await {
            if let Err(e) = joined.context("transfer task").and_then(|r| r) {
                failed.push(format!("{e:#}"));
            }
        }
        ensure!(
            failed.is_empty(),
            "{} of {TRANSFERS} transfers failed; first: {}",
            failed.len(),
            failed[0]
        );
        Ok(TRANSFERS)
    })?;

    // Every upload has sent its first third: kill the daemon.
    wait_until("50 uploads at stage 1", || {
        Ok(arrived[0].load(Ordering::SeqCst) == TRANSFERS)
    })?;
    signal(first.pid, nix::sys::signal::Signal::SIGKILL)?;
    let how = wait_exit(&mut lab, first.pid)?;
    println!("first daemon: {how}");
    for dev in ifaces {
        ensure!(
            netns::has_xdp(&proxy, dev)?,
            "XDP left {dev} when the daemon was killed"
        );
    }
    // The second third goes through with no daemon at all.
    phase_tx.send_replace(1);
    wait_until("50 uploads at stage 2 (no daemon running)", || {
        Ok(arrived[1].load(Ordering::SeqCst) == TRANSFERS)
    })?;
    let no_daemon = first.stats()?;
    println!(
        "without a daemon: fwd_redirect {} rev_redirect {}",
        reason(&no_daemon, "fwd_redirect")?,
        reason(&no_daemon, "rev_redirect")?
    );

    // Restart: the new daemon adopts the pinned links; then the rest of every body.
    let second = start_daemon(&mut lab, &proxy, "xdp-proxy-2", &cfg)?;
    wait_up(&mut lab, &proxy, &second)?;
    phase_tx.send_replace(2);
    let done = transfers.join().with_context(|| {
        format!(
            "--- second daemon log ---\n{}",
            lab.log_tail(second.pid, 30)
        )
    })?;
    ensure!(done == TRANSFERS);
    let log = std::fs::read_to_string(lab.run_dir().join("xdp-proxy-2.log"))?;
    ensure!(
        log.matches("adopted the pinned XDP link").count() == 2,
        "the second daemon did not adopt both links:\n{log}"
    );

    // They stayed on XDP: same connections (no reconnect), same flows (none created twice),
    // nothing forwarded by the kernel, and at least the payload's packets redirected.
    let stats = second.stats()?;
    // Connections from the SNAT range (the daemons' health checks come from ephemeral ports).
    let proxied = server.stats().tcp_peers()[peers_before..]
        .iter()
        .filter(|p| (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&p.port()))
        .count();
    ensure!(
        proxied == TRANSFERS,
        "home accepted {proxied} proxied connections, want {TRANSFERS}"
    );
    let listen = tcp_service().to_string();
    let new_flows = service_stat(&stats, &listen, "new_flows")? - flows_before;
    ensure!(
        new_flows == TRANSFERS as u64,
        "{new_flows} new flows for {TRANSFERS} connections"
    );
    let forw = forw_datagrams(&proxy)? - forw_before;
    ensure!(
        forw <= FORW_SLACK,
        "the proxy's kernel forwarded {forw} packets: traffic left the XDP path"
    );
    let min_up = TRANSFERS as u64 * UPLOAD.div_ceil(traffic::MAX_SEGMENT);
    let min_down = TRANSFERS as u64 * DOWNLOAD.div_ceil(traffic::MAX_SEGMENT);
    ensure!(
        reason(&stats, "fwd_redirect")? >= min_up && reason(&stats, "rev_redirect")? >= min_down,
        "redirect counters below the payload's packets: {stats}"
    );
    ensure!(
        reason(&stats, "pass_midflow_no_flow")? == 0,
        "mid-flow packets without a flow: {stats}"
    );

    check_admin(&proxy, &stats, &listen, &pin_dir)?;

    // SIGTERM = stop: detached and unpinned, maps kept.
    second.stop_ok(&mut lab)?;
    for dev in ifaces {
        ensure!(
            !netns::has_xdp(&proxy, dev)?,
            "XDP still on {dev} after SIGTERM"
        );
    }
    ensure!(
        pins(&pin_dir, "link_")?.is_empty() && pins(&pin_dir, "prog_")?.is_empty(),
        "pins left after SIGTERM: {:?}",
        pins(&pin_dir, "")?
    );
    ensure!(
        pins(&pin_dir, "XP_FLOWS_FWD")? == ["XP_FLOWS_FWD"],
        "maps must stay pinned"
    );
    server.stop()
}

/// /healthz, /metrics and /status of the running (second) daemon, against `stats` (read after
/// the traffic stopped) and the config.
fn check_admin(proxy: &Netns, stats: &Value, listen: &str, pin_dir: &Path) -> Result<()> {
    let (code, body) = admin_get(proxy, "/healthz")?;
    ensure!(code == 200 && body == "ok\n", "/healthz: {code} {body:?}");
    let (code, _) = admin_get(proxy, "/nope")?;
    ensure!(code == 404, "/nope: {code}");

    // Active flow gauges appear after the daemon's first expiry scan (every second).
    let mut text = String::new();
    wait_until("active flow gauges in /metrics", || {
        let (code, body) = admin_get(proxy, "/metrics")?;
        ensure!(code == 200, "/metrics: {code}");
        text = body;
        Ok(text.contains("\nxdp_proxy_flows_active "))
    })?;
    let m = parse_metrics(&text)?;
    let web = format!(r#"service="web",listen="{listen}",protocol="tcp""#);
    // The 50 transfers' flows and the warm-up's are still in the table (closed less than the
    // closed-flow lifetime ago); nothing else went through the service.
    let active = metric(&m, &format!("xdp_proxy_service_active_flows{{{web}}}"))?;
    ensure!(
        (TRANSFERS as u64..=TRANSFERS as u64 + 1).contains(&active),
        "web active flows {active}, want {TRANSFERS} or {}",
        TRANSFERS + 1
    );
    ensure!(metric(&m, r#"xdp_proxy_datapath_mode{mode="native"}"#)? == 1);
    ensure!(metric(&m, "xdp_proxy_ready")? == 1);
    ensure!(
        metric(
            &m,
            &format!(
                r#"xdp_proxy_build_info{{version="{}"}}"#,
                env!("CARGO_PKG_VERSION")
            )
        )? == 1
    );
    for (series, want) in [
        (
            r#"xdp_proxy_datapath_packets_total{reason="fwd_redirect",action="redirect"}"#
                .to_owned(),
            reason(stats, "fwd_redirect")?,
        ),
        (
            r#"xdp_proxy_datapath_packets_total{reason="rev_redirect",action="redirect"}"#
                .to_owned(),
            reason(stats, "rev_redirect")?,
        ),
        (
            format!("xdp_proxy_service_new_flows_total{{{web}}}"),
            service_stat(stats, listen, "new_flows")?,
        ),
        (
            format!(r#"xdp_proxy_service_bytes_total{{{web},direction="to_upstream"}}"#),
            service_stat(stats, listen, "fwd_bytes")?,
        ),
        (
            format!(r#"xdp_proxy_service_packets_total{{{web},direction="to_client"}}"#),
            service_stat(stats, listen, "rev_packets")?,
        ),
    ] {
        ensure!(
            metric(&m, &series)? == want,
            "{series} = {}, inspect stats says {want}",
            metric(&m, &series)?
        );
    }
    // Against the traffic sent: every uploaded byte went to the upstream.
    let up_bytes = metric(
        &m,
        &format!(r#"xdp_proxy_service_bytes_total{{{web},direction="to_upstream"}}"#),
    )?;
    ensure!(
        up_bytes >= TRANSFERS as u64 * UPLOAD,
        "to_upstream bytes {up_bytes} < uploaded payload"
    );
    let home = format!("{}:{HOME_PORT}", two::HOME);
    ensure!(
        metric(
            &m,
            &format!(
                r#"xdp_proxy_upstream_healthy{{service="web",upstream="{home}",address="{home}"}}"#
            )
        )? == 1
    );
    ensure!(
        metric(
            &m,
            &format!(r#"xdp_proxy_upstream_new_flows_total{{upstream="{home}"}}"#)
        )? >= TRANSFERS as u64
    );

    let (code, body) = admin_get(proxy, "/status")?;
    ensure!(code == 200, "/status: {code}");
    let v: Value = serde_json::from_str(&body).context("/status is not JSON")?;
    ensure!(v["version"] == env!("CARGO_PKG_VERSION"), "{v}");
    ensure!(
        v["ready"] == true && v["datapath"]["mode"] == "native",
        "{v}"
    );
    let ifaces: Vec<(&str, bool, &str)> = v["datapath"]["interfaces"]
        .as_array()
        .ok_or_else(|| anyhow!("no interfaces in /status"))?
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap_or(""),
                i["adopted"] == true,
                i["pin"].as_str().unwrap_or(""),
            )
        })
        .collect();
    let pc = layout_dir(pin_dir)
        .join("link_native_pc")
        .display()
        .to_string();
    let ph = layout_dir(pin_dir)
        .join("link_native_ph")
        .display()
        .to_string();
    ensure!(
        ifaces == [("pc", true, pc.as_str()), ("ph", true, ph.as_str())],
        "/status interfaces {ifaces:?}"
    );
    let services = v["services"]
        .as_array()
        .ok_or_else(|| anyhow!("no services in /status"))?;
    let names: Vec<(&str, &str, &str)> = services
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or(""),
                s["listen"].as_str().unwrap_or(""),
                s["protocol"].as_str().unwrap_or(""),
            )
        })
        .collect();
    let udp_listen = format!("{}:{UDP_SERVICE_PORT}", two::PROXY_CLIENT_SIDE);
    ensure!(
        names == [("web", listen, "tcp"), ("dns", udp_listen.as_str(), "udp")],
        "/status services {names:?}"
    );
    let web = &services[0];
    ensure!(
        web["upstreams"][0]["resolved"] == home.as_str()
            && web["upstreams"][0]["healthy"] == true
            && web["counters"]["new_flows"] == service_stat(stats, listen, "new_flows")?,
        "/status web: {web}"
    );
    ensure!(
        v["reasons"]["fwd_redirect"] == reason(stats, "fwd_redirect")?,
        "/status reasons: {}",
        v["reasons"]
    );
    println!(
        "admin: /healthz ok, {} metric samples, /status {} services",
        m.len(),
        services.len()
    );
    Ok(())
}

#[test]
fn sigquit_leaves_the_datapath_for_the_next_start() -> Result<()> {
    let _serial = serial();
    let TwoInterface {
        mut lab,
        client,
        proxy,
        home,
    } = TwoInterface::new("sigquit")?;
    let upstream = SocketAddr::from((two::HOME, HOME_PORT));
    let server = HomeServer::start(&home, upstream, None, LIMIT * 2)?;
    let pin_dir = lab.mount_bpffs()?;
    let cfg = config(&pin_dir, SNAT_PORTS);
    let ifaces = [two::PROXY_CLIENT_DEV, two::PROXY_HOME_DEV];
    let first = start_daemon(&mut lab, &proxy, "xdp-proxy-1", &cfg)?;
    first.wait_ready(&mut lab, &proxy, &ifaces, 2, LIMIT, || false)?;

    // One connection opened under the first daemon, used again after it exits.
    let (go_tx, go_rx) = tokio::sync::watch::channel(0u32);
    let arrived = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let arrived_c = Arc::clone(&arrived);
    let t = client.spawn(LIMIT * 2, move |_stop| async move {
        get_root_until_up(tcp_service()).await?;
        let mut c = Conn::connect(tcp_service(), Duration::from_secs(5)).await?;
        let mut phase = go_rx;
        c.put_sink_staged(77, 96 << 10, &mut phase, &arrived_c[..], LIMIT)
            .await?;
        c.get_blob(77, 64 << 10).await
    })?;
    wait_until("upload at stage 1", || {
        Ok(arrived[0].load(Ordering::SeqCst) == 1)
    })?;
    signal(first.pid, nix::sys::signal::Signal::SIGQUIT)?;
    let how = wait_exit(&mut lab, first.pid)?;
    ensure!(how.contains("exit status: 0"), "SIGQUIT exit: {how}");
    for dev in ifaces {
        ensure!(netns::has_xdp(&proxy, dev)?, "XDP left {dev} on SIGQUIT");
    }
    ensure!(
        pins(&pin_dir, "link_")?.len() == 2 && pins(&pin_dir, "prog_")?.len() == 1,
        "pins after SIGQUIT: {:?}",
        pins(&pin_dir, "")?
    );
    go_tx.send_replace(1);
    wait_until("upload at stage 2", || {
        Ok(arrived[1].load(Ordering::SeqCst) == 1)
    })?;
    let second = start_daemon(&mut lab, &proxy, "xdp-proxy-2", &cfg)?;
    wait_up(&mut lab, &proxy, &second)?;
    go_tx.send_replace(2);
    t.join()
        .context("the connection across the SIGQUIT restart")?;
    let log = std::fs::read_to_string(lab.run_dir().join("xdp-proxy-2.log"))?;
    ensure!(
        log.matches("adopted the pinned XDP link").count() == 2,
        "no adoption:\n{log}"
    );
    second.stop_ok(&mut lab)?;
    for dev in ifaces {
        ensure!(!netns::has_xdp(&proxy, dev)?, "XDP on {dev} after SIGTERM");
    }
    server.stop()
}

#[test]
fn incompatible_pinned_layout_is_refused() -> Result<()> {
    let _serial = serial();
    let TwoInterface { mut lab, proxy, .. } = TwoInterface::new("layout")?;
    let pin_dir = lab.mount_bpffs()?;
    let v1 = layout_dir(&pin_dir);
    std::fs::create_dir_all(&v1)?;
    // A forward flow table with the right type and key but a 16-byte value.
    let map = v1.join(proxy_common::MAP_FLOWS_FWD);
    let key = std::mem::size_of::<proxy_common::FlowKey>().to_string();
    let value = std::mem::size_of::<proxy_common::FlowValue>();
    netns::run_cmd(std::process::Command::new("bpftool").args([
        "map",
        "create",
        &map.to_string_lossy(),
        "type",
        "lru_hash",
        "key",
        &key,
        "value",
        "16",
        "entries",
        "1024",
        "name",
        "XP_FLOWS_FWD",
    ]))?;
    let daemon = start_daemon(&mut lab, &proxy, "xdp-proxy", &config(&pin_dir, SNAT_PORTS))?;
    let how = wait_exit(&mut lab, daemon.pid)?;
    let want = format!(
        "pinned map {} has value size 16, but this build of xdp-proxy expects {value}",
        map.display()
    );
    ensure!(how.contains(&want), "want {want:?} in:\n{how}");
    ensure!(!how.contains("exit status: 0"), "{how}");
    for dev in [two::PROXY_CLIENT_DEV, two::PROXY_HOME_DEV] {
        ensure!(!netns::has_xdp(&proxy, dev)?, "XDP attached to {dev}");
    }
    ensure!(
        pins(&pin_dir, "link_")?.is_empty(),
        "{:?}",
        pins(&pin_dir, "")?
    );
    Ok(())
}

#[test]
fn ebpf_log_event_reaches_the_daemon_log() -> Result<()> {
    let _serial = serial();
    let TwoInterface {
        mut lab,
        client,
        proxy,
        home,
    } = TwoInterface::new("ebpflog")?;
    let upstream = SocketAddr::from((two::HOME, HOME_PORT));
    let server = HomeServer::start(&home, upstream, None, LIMIT)?;
    let pin_dir = lab.mount_bpffs()?;
    // One SNAT port: the second concurrent flow to the upstream finds it taken.
    let daemon = start_daemon(
        &mut lab,
        &proxy,
        "xdp-proxy",
        &config(&pin_dir, (20_000, 20_000)),
    )?;
    let ifaces = [two::PROXY_CLIENT_DEV, two::PROXY_HOME_DEV];
    daemon.wait_ready(&mut lab, &proxy, &ifaces, 2, LIMIT, || false)?;
    let second = client.run(LIMIT, || async {
        get_root_until_up(tcp_service()).await?;
        // The warm-up's flow still holds the one port (its closed flow's hold: at least the
        // 5 s grace).
        let r = Conn::connect(tcp_service(), Duration::from_secs(2)).await;
        Ok(r.is_ok())
    })?;
    ensure!(
        !second,
        "a second flow got through with a one-port SNAT range"
    );
    let log_path = lab.run_dir().join("xdp-proxy.log");
    wait_until("the eBPF warning in the daemon log", || {
        Ok(std::fs::read_to_string(&log_path)?.contains("SNAT ports exhausted: "))
    })
    .with_context(|| lab.log_tail(daemon.pid, 20))?;
    let log = std::fs::read_to_string(&log_path)?;
    if let Some(line) = log.lines().find(|l| l.contains("SNAT ports exhausted")) {
        println!("eBPF log event in the daemon log: {line}");
    }
    let stats = daemon.stats()?;
    ensure!(reason(&stats, "drop_snat_exhausted")? >= 1, "{stats}");
    server.stop()
}

#[test]
fn link_of_an_interface_dropped_from_the_config_is_released() -> Result<()> {
    let _serial = serial();
    let TwoInterface { mut lab, proxy, .. } = TwoInterface::new("stale")?;
    let pin_dir = lab.mount_bpffs()?;
    let both = config(&pin_dir, SNAT_PORTS);
    let first = start_daemon(&mut lab, &proxy, "xdp-proxy-1", &both)?;
    wait_up(&mut lab, &proxy, &first)?;
    signal(first.pid, nix::sys::signal::Signal::SIGQUIT)?;
    wait_exit(&mut lab, first.pid)?;
    ensure!(netns::has_xdp(&proxy, two::PROXY_HOME_DEV)?);
    // The next start configures only the client-side interface.
    let one = both.replace(
        &format!(
            r#"interfaces = ["{}", "{}"]"#,
            two::PROXY_CLIENT_DEV,
            two::PROXY_HOME_DEV
        ),
        &format!(r#"interfaces = ["{}"]"#, two::PROXY_CLIENT_DEV),
    );
    ensure!(one != both, "config rewrite failed");
    let second = start_daemon(&mut lab, &proxy, "xdp-proxy-2", &one)?;
    wait_up(&mut lab, &proxy, &second)?;
    ensure!(
        pins(&pin_dir, "link_")? == ["link_native_pc"],
        "link pins: {:?}",
        pins(&pin_dir, "link_")?
    );
    ensure!(
        !netns::has_xdp(&proxy, two::PROXY_HOME_DEV)?,
        "XDP still on the dropped interface"
    );
    ensure!(netns::has_xdp(&proxy, two::PROXY_CLIENT_DEV)?);
    second.stop_ok(&mut lab)?;
    ensure!(pins(&pin_dir, "link_")?.is_empty());
    Ok(())
}

/// An upgrade that changes the map layout: the new daemon pins under another `v<N>`, finds the
/// links left under the old one, switches them to its program (the interfaces never go without
/// one) and moves their pins to its own directory.
#[test]
fn links_of_another_layout_version_are_taken_over() -> Result<()> {
    let _serial = serial();
    let TwoInterface { mut lab, proxy, .. } = TwoInterface::new("relayout")?;
    let pin_dir = lab.mount_bpffs()?;
    let cfg = config(&pin_dir, SNAT_PORTS);
    let first = start_daemon(&mut lab, &proxy, "xdp-proxy-1", &cfg)?;
    wait_up(&mut lab, &proxy, &first)?;
    signal(first.pid, nix::sys::signal::Signal::SIGQUIT)?;
    wait_exit(&mut lab, first.pid)?;
    // Make the links look like an older layout's: move their pins to `v0/`.
    let old = pin_dir.join("v0");
    std::fs::create_dir_all(&old)?;
    for name in pins(&pin_dir, "link_")? {
        std::fs::rename(layout_dir(&pin_dir).join(&name), old.join(&name))
            .with_context(|| format!("moving pin {name}"))?;
    }
    let second = start_daemon(&mut lab, &proxy, "xdp-proxy-2", &cfg)?;
    wait_up(&mut lab, &proxy, &second)?;
    ensure!(
        pins(&pin_dir, "link_")? == ["link_native_pc", "link_native_ph"],
        "link pins: {:?}",
        pins(&pin_dir, "link_")?
    );
    let left: Vec<_> = std::fs::read_dir(&old)?.flatten().collect();
    ensure!(left.is_empty(), "pins left in v0: {left:?}");
    let log = std::fs::read_to_string(lab.run_dir().join("xdp-proxy-2.log"))?;
    ensure!(
        log.matches("another map layout").count() == 2,
        "no take-over logged:\n{log}"
    );
    second.stop_ok(&mut lab)?;
    for dev in [two::PROXY_CLIENT_DEV, two::PROXY_HOME_DEV] {
        ensure!(!netns::has_xdp(&proxy, dev)?, "XDP on {dev} after SIGTERM");
    }
    Ok(())
}

/// The capabilities `docs/xdp-proxy.service` grants (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN,
/// CAP_NET_BIND_SERVICE, no CAP_SYS_ADMIN) are enough to start, pin and attach, serve, exit
/// leaving the datapath, adopt it again and detach; the running daemon holds none of them.
/// The veth peers carry an XDP program: without CAP_SYS_ADMIN the daemon cannot enter their
/// namespaces to read GRO, but it sees their XDP program from its own (`mode = "native"`
/// checks that the path delivers before it attaches).
#[test]
fn runs_with_only_the_units_capabilities() -> Result<()> {
    let _serial = serial();
    let TwoInterface {
        mut lab,
        client,
        proxy,
        home,
    } = TwoInterface::new("caps")?;
    for (ns, dev) in [(&client, two::CLIENT_DEV), (&home, two::HOME_DEV)] {
        let pass = netns::attach_pass_program(ns, dev)?;
        lab.hold(pass);
    }
    let upstream = SocketAddr::from((two::HOME, HOME_PORT));
    let server = HomeServer::start(&home, upstream, None, LIMIT)?;
    let pin_dir = lab.mount_bpffs()?;
    let config = lab.write_file("caps.toml", &config(&pin_dir, SNAT_PORTS))?;
    let bin = netns::daemon_binary()?;
    let restricted = |lab: &mut Lab, label: &str| -> Result<Daemon> {
        let args = [
            "--bounding-set",
            "-all,+bpf,+perfmon,+net_admin,+net_bind_service",
            "--inh-caps",
            "-all",
            "--",
            &bin.to_string_lossy(),
            "run",
            "--config",
            &config.to_string_lossy(),
        ];
        let pid = lab.spawn_daemon(label, &proxy, Path::new("/usr/bin/setpriv"), &args)?;
        Ok(Daemon {
            pid,
            bin: bin.clone(),
            pin_dir: pin_dir.clone(),
            config: config.clone(),
        })
    };
    let first = restricted(&mut lab, "xdp-proxy-1")?;
    wait_up(&mut lab, &proxy, &first)?;
    first.wait_log(&mut lab, &["xdp-proxy running"], 1, Duration::from_secs(30))?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", first.pid))?;
    let cap = |name: &str| -> Result<u64> {
        let v = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .ok_or_else(|| anyhow!("no {name}"))?;
        Ok(u64::from_str_radix(v, 16)?)
    };
    // Started with CAP_NET_BIND_SERVICE (10), CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF
    // (39); attached through a bpf_link, it keeps none (tests/tests/reliability.rs checks every
    // thread).
    ensure!(
        cap("CapEff:")? == 0 && cap("CapPrm:")? == 0,
        "daemon runs with CapEff {:#x} CapPrm {:#x}",
        cap("CapEff:")?,
        cap("CapPrm:")?
    );
    ensure!(
        cap("CapBnd:")? == (1 << 10) | (1 << 12) | (1 << 38) | (1 << 39),
        "bounding set {:#x}",
        cap("CapBnd:")?
    );
    ensure!(
        pins(&pin_dir, "link_")? == ["link_native_pc", "link_native_ph"],
        "links not pinned: {:?}",
        pins(&pin_dir, "")?
    );
    client.run(LIMIT, || async {
        get_root_until_up(tcp_service()).await.map(drop)
    })?;
    signal(first.pid, nix::sys::signal::Signal::SIGQUIT)?;
    wait_exit(&mut lab, first.pid)?;
    let second = restricted(&mut lab, "xdp-proxy-2")?;
    wait_up(&mut lab, &proxy, &second)?;
    let log = std::fs::read_to_string(lab.run_dir().join("xdp-proxy-2.log"))?;
    ensure!(
        log.matches("adopted the pinned XDP link").count() == 2,
        "no adoption:\n{log}"
    );
    client.run(LIMIT, || async {
        get_root_until_up(tcp_service()).await.map(drop)
    })?;
    second.stop_ok(&mut lab)?;
    for dev in [two::PROXY_CLIENT_DEV, two::PROXY_HOME_DEV] {
        ensure!(!netns::has_xdp(&proxy, dev)?, "XDP on {dev} after SIGTERM");
    }
    server.stop()
}
