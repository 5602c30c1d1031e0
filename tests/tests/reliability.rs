//! Reliability in network namespaces (two-interface shape): security properties of the running
//! daemon, exhaustion of each finite resource, and a CI-length soak with faults.
//!
//! - `admin_listener_is_loopback_unless_configured`: without `[admin]` the config's listener is
//!   127.0.0.1:9100; a live daemon listens there only (the client cannot reach it on the
//!   proxy's address); a non-loopback listener exists only when written explicitly.
//! - `inspect_is_read_only`: after traffic made flows, the daemon stops (SIGTERM keeps the
//!   maps pinned, detaches XDP); every pinned map is dumped with bpftool, every `inspect`
//!   command runs (JSON and tables), `flows flush` without `--yes` is refused, and every map
//!   dumps the same afterwards.
//! - `flow_table_full_evicts_without_a_crash`: `max_flows = 16`; 60 sequential TCP connections
//!   and 40 UDP sessions all succeed (the LRU tables evict), the tables never hold more than 16
//!   entries, the daemon keeps running; a connection held open while its entries were evicted
//!   fails fast (the kernel resets it, counted `pass_midflow_no_flow`) instead of hanging.
//!   New flows are opened one at a time here; concurrent new flows in a full table are
//!   `concurrent_new_flows_in_a_full_table_are_kept`.
//! - `snat_ports_exhausted_refuses_new_flows_and_keeps_old_ones`: a 4-port SNAT range; 4
//!   connections hold every port; further connections are refused (dropped, counted
//!   `drop_snat_exhausted`; the client's connect fails within its bound), the 4 keep working.
//! - `syn_flood_dropping_syn_acks_frees_every_port`: 2,000 SYNs from a client that drops the
//!   SYN-ACKs (nftables); with `[flows] tcp_syn_received = 2s` both flow tables are empty one
//!   lifetime plus one expiry interval (plus slack) later, and a real connection works.
//! - `dns_failure_keeps_the_last_good_address`: the resolver of a DNS upstream answers
//!   SERVFAIL, then stops answering: failures are counted, the last good address stays in the
//!   Maglev table and new connections keep working.
//! - `all_upstreams_down_refuses_new_connections_fast`: every upstream's server stops; once
//!   health checks notice, a new connection is refused with a reset (ECONNREFUSED, well within
//!   its bound), counted `pass_no_upstream`; an upstream coming back is used again.
//! - `daemon_drops_every_capability_once_attached`: a daemon started as root (every
//!   capability) on the XDP path holds none on any of its threads once it runs (CapPrm, CapEff,
//!   CapInh, CapAmb and CapBnd all 0, NoNewPrivs 1, read from `/proc/PID/task/*/status`); a
//!   SIGHUP reload that moves the service to another upstream is applied and forwarded, the
//!   threads started since hold nothing either, and SIGTERM detaches and unpins.
//! - `userspace_daemon_keeps_only_net_bind_service`: on the userspace L4 path the daemon keeps
//!   CAP_NET_BIND_SERVICE only (no thread holds more), which a reload needs to bind a new
//!   service on port 81.
//! - `soak_with_faults`: `integration_tests::soak` for `XPT_SOAK_SECS` (default 60) seconds:
//!   hundreds of concurrent checksummed TCP flows (well over 1,000 over the run) and UDP
//!   sessions, SIGHUP reloads, an upstream killed and restored, health flapping and `kill -9` of
//!   the daemon with a restart; nothing lost, resources steady.
//!
//! Run as root: `cargo test -p integration-tests --test reliability -- --nocapture`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use integration_tests::netns::serial;
use integration_tests::netns::{self, Daemon, Netns, NsThread, TwoInterface, run_cmd, sock, two};
use integration_tests::soak::{self, SoakOptions, admin_get, status};
use integration_tests::traffic::{Conn, HomeServer, get_root_until_up, udp_exchange};
use serde_json::Value;
use tokio::net::UdpSocket;

const HOME_PORT: u16 = 8080;
const HOME2: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
const LIMIT: Duration = Duration::from_secs(90);

fn lab(tag: &str) -> Result<TwoInterface> {
    let topo = TwoInterface::new(tag)?;
    topo.home
        .ip(&["addr", "add", &format!("{HOME2}/24"), "dev", two::HOME_DEV])?;
    Ok(topo)
}

/// A config with `nat_extra` lines in `[nat]` (after home_cidrs), `datapath_extra` in
/// `[datapath]` and `rest` after it (services, `[admin]`, `[dns]`).
fn config(pin_dir: &Path, port_range: (u16, u16), datapath_extra: &str, rest: &str) -> String {
    format!(
        r#"[datapath]
interfaces = ["{pc}", "{ph}"]
mode = "native"
pin_dir = "{pin}"
{datapath_extra}

[nat]
snat_ipv4 = "{snat}"
port_range = [{lo}, {hi}]
home_cidrs = ["{cidr}"]

{rest}"#,
        pc = two::PROXY_CLIENT_DEV,
        ph = two::PROXY_HOME_DEV,
        pin = pin_dir.display(),
        snat = two::PROXY_HOME_SIDE,
        lo = port_range.0,
        hi = port_range.1,
        cidr = two::HOME_CIDR,
    )
}

fn service_addr(port: u16) -> SocketAddr {
    sock(two::PROXY_CLIENT_SIDE, port)
}

fn web_service(upstreams: &[SocketAddr], health: &str) -> String {
    let ups: Vec<String> = upstreams.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "[[service]]\nname = \"web\"\nlisten = \"{}\"\nupstreams = [{}]\n{health}\n",
        service_addr(80),
        ups.join(", ")
    )
}

fn start(
    topo: &mut TwoInterface,
    text_of: impl Fn(&Path) -> String,
    services: usize,
) -> Result<Daemon> {
    let pin_dir = topo.lab.mount_bpffs()?;
    let daemon = Daemon::start(&mut topo.lab, &topo.proxy, &text_of(&pin_dir))?;
    daemon.wait_ready(
        &mut topo.lab,
        &topo.proxy,
        &[two::PROXY_CLIENT_DEV, two::PROXY_HOME_DEV],
        services,
        Duration::from_secs(30),
        || false,
    )?;
    Ok(daemon)
}

fn reason(stats: &Value, name: &str) -> Result<u64> {
    stats["reasons"][name]
        .as_u64()
        .ok_or_else(|| anyhow!("no reason {name} in {stats}"))
}

/// Poll `/status` until `check` holds (bounded).
fn wait_status(
    proxy: &Netns,
    limit: Duration,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Result<()> {
    let start = Instant::now();
    let mut last = Value::Null;
    while start.elapsed() < limit {
        last = status(proxy)?;
        if check(&last) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{what}: not seen within {limit:?}; last /status: {last:#}")
}

/// `GET /` on a new connection; the home server's greeting.
async fn greeting(service: SocketAddr) -> Result<String> {
    let mut c = Conn::connect(service, Duration::from_secs(3)).await?;
    let (status, body) = c.get_text("/").await?;
    ensure!(status.contains(" 200 "), "GET /: {status}");
    Ok(body)
}

// =============================================================================================
// Security.
// =============================================================================================

#[test]
fn admin_listener_is_loopback_unless_configured() -> Result<()> {
    let _serial = serial();
    // The contract, on the parser: the default is loopback; another address only when written.
    let parse = |text: &str| xdp_proxy::config::Config::parse(text, Path::new("admin.toml"));
    let pin = Path::new("/sys/fs/bpf/xdp-proxy");
    let base = config(
        pin,
        (20000, 29999),
        "",
        &web_service(&[sock(two::HOME, HOME_PORT)], ""),
    );
    let default = parse(&base).map_err(|e| anyhow!("{e}"))?;
    ensure!(
        default.admin.listen.ip().is_loopback(),
        "the default admin listener is {}",
        default.admin.listen
    );
    let explicit = parse(&format!("{base}\n[admin]\nlisten = \"0.0.0.0:9100\"\n"))
        .map_err(|e| anyhow!("{e}"))?;
    ensure!(
        explicit.admin.listen == "0.0.0.0:9100".parse::<SocketAddr>()?,
        "an explicit listener is not taken as written: {}",
        explicit.admin.listen
    );
    println!(
        "admin listener: default {}, explicit non-loopback {} only when written",
        default.admin.listen, explicit.admin.listen
    );

    // The running daemon with the default: listening on loopback only.
    let mut topo = lab("adm")?;
    let home = HomeServer::start(&topo.home, sock(two::HOME, HOME_PORT), None, LIMIT)?;
    let daemon = start(
        &mut topo,
        |p| {
            config(
                p,
                (20000, 29999),
                "",
                &web_service(&[sock(two::HOME, HOME_PORT)], ""),
            )
        },
        1,
    )?;
    let (code, _) = admin_get(&topo.proxy, "/healthz")?;
    ensure!(code == 200, "/healthz on loopback: {code}");
    let listening = topo.proxy.exec("ss", &["-Hltn"])?;
    let admin_sockets: Vec<&str> = listening.lines().filter(|l| l.contains(":9100")).collect();
    ensure!(
        admin_sockets.len() == 1 && admin_sockets[0].contains("127.0.0.1:9100"),
        "admin sockets in the proxy namespace: {admin_sockets:?}\n{listening}"
    );
    // From the client, on the proxy's address: nothing there (refused, not served).
    let reached = topo.client.run(Duration::from_secs(10), || async {
        let r = tokio::time::timeout(
            Duration::from_secs(3),
            tokio::net::TcpStream::connect(sock(two::PROXY_CLIENT_SIDE, 9100)),
        )
        .await;
        Ok(matches!(r, Ok(Ok(_))))
    })?;
    ensure!(
        !reached,
        "the admin port answers on the proxy's client-side address"
    );
    home.stop()?;
    daemon.stop_ok(&mut topo.lab)
}

/// `bpftool map dump pinned` of every map pinned in `dir` (links and other pins skipped).
fn dump_maps(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("read_dir {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("XP_") {
            continue;
        }
        let dump = run_cmd(
            Command::new("bpftool")
                .args(["map", "dump", "pinned"])
                .arg(entry.path()),
        )?;
        out.insert(name, dump);
    }
    ensure!(
        out.len() >= 10,
        "only {} maps pinned in {}: {:?}",
        out.len(),
        dir.display(),
        out.keys()
    );
    Ok(out)
}

#[test]
fn inspect_is_read_only() -> Result<()> {
    let _serial = serial();
    let mut topo = lab("insp")?;
    let home = HomeServer::start(&topo.home, sock(two::HOME, HOME_PORT), None, LIMIT)?;
    let daemon = start(
        &mut topo,
        |p| {
            config(
                p,
                (20000, 29999),
                "",
                &web_service(&[sock(two::HOME, HOME_PORT)], ""),
            )
        },
        1,
    )?;
    // Flows in the tables: some closed, one open.
    let held = topo.client.spawn(LIMIT, |mut stop| async move {
        for _ in 0..5 {
            greeting(service_addr(80)).await?;
        }
        let mut c = Conn::connect(service_addr(80), Duration::from_secs(3)).await?;
        c.get_text("/").await?;
        stop.wait().await;
        Ok(())
    })?;
    std::thread::sleep(Duration::from_secs(2));
    // SIGTERM: detach and keep the maps pinned; nothing writes them any more.
    daemon.stop_ok(&mut topo.lab)?;
    held.stop_and_join()?;
    home.stop()?;
    let dir = daemon
        .pin_dir
        .join(format!("v{}", proxy_common::ABI_VERSION));
    let before = dump_maps(&dir)?;
    let flows = daemon.inspect_json("flows")?;
    ensure!(
        flows["flows"].as_array().is_some_and(|f| f.len() >= 6),
        "expected the test's flows in the table: {flows}"
    );
    let bin = daemon.bin.clone();
    let pin = daemon.pin_dir.to_string_lossy().into_owned();
    let mut ran = 0;
    for what in ["stats", "flows", "services", "upstreams", "maps"] {
        for json in [true, false] {
            let mut cmd = Command::new(&bin);
            cmd.args(["inspect", what, "--pin-dir", &pin]);
            if json {
                cmd.arg("--json");
            }
            run_cmd(&mut cmd)?;
            ran += 1;
        }
    }
    run_cmd(Command::new(&bin).args(["inspect", "flows", "--state", "closed", "--pin-dir", &pin]))?;
    // An action without its confirmation does nothing.
    for args in [
        vec!["flows", "flush", "--service", "web", "--pin-dir", &pin],
        vec![
            "flows",
            "delete",
            "--client",
            "10.100.0.2:1",
            "--service",
            "web",
            "--pin-dir",
            &pin,
        ],
    ] {
        let out = Command::new(&bin)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()?;
        ensure!(
            !out.status.success(),
            "{args:?} without --yes and no terminal succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let after = dump_maps(&dir)?;
    for (name, dump) in &before {
        ensure!(
            after.get(name) == Some(dump),
            "map {name} changed while only inspect ran"
        );
    }
    println!(
        "inspect read-only: {ran} inspect runs and 2 unconfirmed actions left all {} pinned maps byte-identical",
        before.len()
    );
    Ok(())
}

// =============================================================================================
// Exhaustion.
// =============================================================================================

fn flows_used(daemon: &Daemon) -> Result<(u64, u64)> {
    let maps = daemon.inspect_json("maps")?;
    let used = |name: &str| {
        maps["maps"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == name))
            .and_then(|m| m["used_entries"].as_u64())
            .ok_or_else(|| anyhow!("no used_entries of {name}"))
    };
    Ok((
        used(proxy_common::MAP_FLOWS_FWD)?,
        used(proxy_common::MAP_FLOWS_REV)?,
    ))
}

#[test]
fn flow_table_full_evicts_without_a_crash() -> Result<()> {
    let _serial = serial();
    let mut topo = lab("full")?;
    let up = sock(two::HOME, HOME_PORT);
    let home = HomeServer::start(&topo.home, up, Some(up), LIMIT)?;
    let udp_svc = format!(
        "[[service]]\nname = \"dns\"\nlisten = \"{}\"\nprotocol = \"udp\"\nupstreams = [\"{up}\"]\n",
        service_addr(53)
    );
    let daemon = start(
        &mut topo,
        |p| {
            config(
                p,
                (20000, 29999),
                "max_flows = 16",
                &format!("{}{udp_svc}", web_service(&[up], "")),
            )
        },
        2,
    )?;
    // One connection held open from the start; its entries are the least recently used.
    let (opened_tx, opened_rx) = mpsc::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let held = topo.client.spawn(LIMIT, move |_stop| async move {
        let mut c = Conn::connect(service_addr(80), Duration::from_secs(3)).await?;
        c.get_text("/").await?;
        let local = c.local_addr();
        let _ = opened_tx.send(local);
        go_rx.await.map_err(|_| anyhow!("test thread gone"))?;
        let began = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(10), c.get_text("/")).await;
        Ok((r.map(|r| r.map(|_| ())), began.elapsed()))
    })?;
    let held_local = opened_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow!("the held connection did not open"))?;
    let mut max_seen = (0, 0);
    let before = daemon.stats()?;
    for round in 0..6u64 {
        // One new flow at a time (see `concurrent_new_flows_in_a_full_table_are_kept` for
        // concurrent ones).
        let r = topo.client.run(LIMIT, move || async move {
            for _ in 0..10 {
                greeting(service_addr(80)).await?;
            }
            for k in 0..8 {
                udp_exchange(service_addr(53), 1, 2, round << 8 | k).await?;
            }
            Ok(())
        });
        if let Err(e) = r {
            let now = daemon.stats()?;
            bail!(
                "round {round}: {e:#}\nreasons now: {}\nflow tables: {:?}",
                now["reasons"],
                flows_used(&daemon)?
            );
        }
        let used = flows_used(&daemon)?;
        max_seen = (max_seen.0.max(used.0), max_seen.1.max(used.1));
        topo.lab.check_running(daemon.pid)?;
    }
    ensure!(
        max_seen.0 <= 16 && max_seen.1 <= 16,
        "flow tables held {max_seen:?} entries with max_flows = 16"
    );
    // Is the held connection's forward entry still there?
    let flows = daemon.inspect_json("flows")?;
    let held_in_table = flows["flows"]
        .as_array()
        .is_some_and(|f| f.iter().any(|f| f["client"] == held_local.to_string()));
    let _ = go_tx.send(());
    let (outcome, took) = held.join()?;
    let after = daemon.stats()?;
    let midflow =
        reason(&after, "pass_midflow_no_flow")? - reason(&before, "pass_midflow_no_flow")?;
    match (held_in_table, outcome) {
        (false, Ok(Ok(()))) => bail!("the held connection's flow was evicted, yet it still worked"),
        (false, Ok(Err(e))) => {
            ensure!(
                midflow >= 1,
                "evicted flow's packet not counted pass_midflow_no_flow"
            );
            println!(
                "held connection evicted: failed in {took:.1?} ({e:#}), pass_midflow_no_flow +{midflow}"
            );
        }
        (_, Err(_)) => bail!("the held connection hung for 10 s"),
        (true, r) => {
            let r = r.map_err(|_| anyhow!("timed out"))?;
            r.context("the held connection, still in the table, failed")?;
            println!("held connection survived (its entry was not evicted)");
        }
    }
    topo.lab.check_running(daemon.pid)?;
    println!(
        "flow table full: 60 TCP connections and 48 UDP sessions (one new flow at a time) through a 16-entry table, all \
         answered; at most {max_seen:?} entries (forward, reverse)"
    );
    home.stop()?;
    daemon.stop_ok(&mut topo.lab)
}

/// Concurrent new UDP flows through a full 16-entry table. Each table evicts on its own, so a
/// new flow's fresh reverse entry can be evicted by its neighbours' inserts before the reply
/// comes; the forward entry survives. Without the datapath's repair (docs/datapath.md,
/// "Lifetimes") every retry went out and every reply was passed to the kernel: a black hole.
#[test]
fn concurrent_new_flows_in_a_full_table_are_kept() -> Result<()> {
    let _serial = serial();
    let mut topo = lab("half")?;
    let up = sock(two::HOME, HOME_PORT);
    let home = HomeServer::start(&topo.home, up, Some(up), LIMIT)?;
    let udp_svc = format!(
        "[[service]]\nname = \"dns\"\nlisten = \"{}\"\nprotocol = \"udp\"\nupstreams = [\"{up}\"]\n",
        service_addr(53)
    );
    let daemon = start(
        &mut topo,
        |p| config(p, (20000, 29999), "max_flows = 16", &udp_svc),
        1,
    )?;
    for round in 0..4u64 {
        topo.client
            .run(LIMIT, move || async move {
                udp_exchange(service_addr(53), 8, 2, round).await.map(drop)
            })
            .with_context(|| format!("round {round} of 8 concurrent UDP sessions"))?;
    }
    home.stop()?;
    daemon.stop_ok(&mut topo.lab)
}

#[test]
fn snat_ports_exhausted_refuses_new_flows_and_keeps_old_ones() -> Result<()> {
    let _serial = serial();
    let mut topo = lab("snat")?;
    let up = sock(two::HOME, HOME_PORT);
    let home = HomeServer::start(&topo.home, up, None, LIMIT)?;
    let daemon = start(
        &mut topo,
        |p| config(p, (20000, 20003), "", &web_service(&[up], "")),
        1,
    )?;
    let before = daemon.stats()?;
    let (full_tx, full_rx) = mpsc::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let holders = topo.client.spawn(LIMIT, move |_stop| async move {
        let mut conns = Vec::new();
        for _ in 0..4 {
            let mut c = Conn::connect(service_addr(80), Duration::from_secs(3)).await?;
            c.get_text("/").await?;
            conns.push(c);
        }
        let _ = full_tx.send(());
        go_rx.await.map_err(|_| anyhow!("test thread gone"))?;
        for c in &mut conns {
            c.get_blob(9, 256 << 10).await?;
        }
        Ok(conns.len())
    })?;
    full_rx
        .recv_timeout(Duration::from_secs(20))
        .map_err(|_| anyhow!("4 connections did not open"))?;
    // Every port is held: new connections are refused (their SYNs dropped, counted).
    let refused = topo.client.run(LIMIT, || async {
        let mut refused = 0;
        for _ in 0..5 {
            if Conn::connect(service_addr(80), Duration::from_secs(2))
                .await
                .is_err()
            {
                refused += 1;
            }
        }
        Ok(refused)
    })?;
    ensure!(
        refused == 5,
        "{refused} of 5 connections refused with every SNAT port held"
    );
    let after = daemon.stats()?;
    let exhausted =
        reason(&after, "drop_snat_exhausted")? - reason(&before, "drop_snat_exhausted")?;
    ensure!(
        exhausted >= 5,
        "drop_snat_exhausted +{exhausted}, want >= 5 (one per SYN)"
    );
    let _ = go_tx.send(());
    let kept = holders
        .join()
        .context("the 4 connections holding the ports")?;
    topo.lab.check_running(daemon.pid)?;
    println!(
        "SNAT ports exhausted (4-port range): 5 new connections refused, drop_snat_exhausted +{exhausted}; \
         the {kept} connections holding the ports each downloaded 256 KiB intact"
    );
    home.stop()?;
    daemon.stop_ok(&mut topo.lab)
}

/// A SYN flood whose client drops the SYN-ACKs (nftables in the client namespace): 2,000
/// connect attempts, each abandoned after 200 ms (before the first SYN retransmission). Every
/// SYN makes a flow and every SYN-ACK passes the proxy, but no handshake completes, so the
/// flows stay in the SYN-received state (`[flows] tcp_syn_received = 2s` here) and are all gone
/// one lifetime plus one expiry interval (and a little slack) after the last SYN-ACK: both
/// flow tables empty, every port free; then a real connection works. (Before the handshake was
/// tracked, each SYN-ACK made its flow established and pinned its port for an hour.) The
/// upstream sends each SYN-ACK once (`tcp_synack_retries = 0` in the home namespace), so no
/// retransmission refreshes a flow during the wait.
#[test]
fn syn_flood_dropping_syn_acks_frees_every_port() -> Result<()> {
    const ATTEMPTS: u64 = 2000;
    const BATCH: u64 = 100;
    let _serial = serial();
    let mut topo = lab("synflood")?;
    topo.home.sysctl("net.ipv4.tcp_synack_retries", "0")?;
    let up = sock(two::HOME, HOME_PORT);
    let home = HomeServer::start(&topo.home, up, None, LIMIT)?;
    let flows = "[flows]\ntcp_syn_sent = \"2s\"\ntcp_syn_received = \"2s\"\n";
    let daemon = start(
        &mut topo,
        |p| {
            config(
                p,
                (20000, 22999),
                "",
                &format!("{}{flows}", web_service(&[up], "")),
            )
        },
        1,
    )?;
    for args in [
        &["add", "table", "inet", "xpt_synflood"][..],
        &[
            "add",
            "chain",
            "inet",
            "xpt_synflood",
            "input",
            "{ type filter hook input priority 0; policy accept; }",
        ],
        &[
            "add",
            "rule",
            "inet",
            "xpt_synflood",
            "input",
            "tcp",
            "flags",
            "&",
            "(syn|ack)",
            "==",
            "syn|ack",
            "counter",
            "drop",
        ],
    ] {
        topo.client.exec("nft", args)?;
    }
    let before = daemon.stats()?;
    let unanswered = topo.client.run(LIMIT, || async {
        let mut unanswered = 0u64;
        for _ in 0..ATTEMPTS / BATCH {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..BATCH {
                set.spawn(async {
                    let s = tokio::net::TcpSocket::new_v4()?;
                    let r = tokio::time::timeout(
                        Duration::from_millis(200),
                        s.connect(service_addr(80)),
                    )
                    .await;
                    Ok::<bool, std::io::Error>(r.is_err())
                });
            }
            while let Some(r) = set.join_next().await {
                if r.map_err(|e| anyhow!("connect task: {e}"))?? {
                    unanswered += 1;
                }
            }
        }
        Ok(unanswered)
    })?;
    ensure!(
        unanswered == ATTEMPTS,
        "{unanswered} of {ATTEMPTS} connect attempts timed out (all SYN-ACKs should be dropped)"
    );
    let flood = daemon.stats()?;
    let delta = |name: &str| -> Result<u64> { Ok(reason(&flood, name)? - reason(&before, name)?) };
    let (syns, syn_acks, exhausted) = (
        delta("fwd_redirect")?,
        delta("rev_redirect")?,
        delta("drop_snat_exhausted")?,
    );
    ensure!(
        syns >= ATTEMPTS,
        "fwd_redirect +{syns}, want >= {ATTEMPTS} (one per SYN)"
    );
    ensure!(
        syn_acks >= ATTEMPTS,
        "rev_redirect +{syn_acks}, want >= {ATTEMPTS} (one SYN-ACK per SYN, forwarded)"
    );
    ensure!(
        exhausted == 0,
        "drop_snat_exhausted +{exhausted} with 3,000 ports"
    );
    // tcp_syn_received (2 s) + one expiry interval (1 s) + slack for the scan and the clock.
    std::thread::sleep(Duration::from_secs(5));
    let used = flows_used(&daemon)?;
    ensure!(
        used == (0, 0),
        "flow entries (forward, reverse) left after the SYN-received lifetime: {used:?}"
    );
    topo.client
        .exec("nft", &["delete", "table", "inet", "xpt_synflood"])?;
    let body = topo.client.run(LIMIT, || greeting(service_addr(80)))?;
    ensure!(!body.is_empty(), "empty greeting after the flood");
    topo.lab.check_running(daemon.pid)?;
    println!(
        "SYN flood dropping SYN-ACKs: {ATTEMPTS} attempts, {syns} SYNs and {syn_acks} SYN-ACKs \
         forwarded, no SNAT port exhausted; 5 s later both flow tables were empty and a new \
         connection got its greeting"
    );
    home.stop()?;
    daemon.stop_ok(&mut topo.lab)
}

/// How the test's DNS responder answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DnsMode {
    Answer(Ipv4Addr),
    ServFail,
    Silent,
}

fn start_dns(ns: &Netns, addr: SocketAddr, mode: Arc<Mutex<DnsMode>>) -> Result<NsThread<u64>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let thread = ns.spawn(LIMIT, move |mut stop| async move {
        let sock = UdpSocket::bind(addr).await?;
        let _ = ready_tx.send(());
        let mut buf = [0u8; 512];
        let mut queries = 0;
        loop {
            tokio::select! {
                () = stop.wait() => return Ok(queries),
                r = sock.recv_from(&mut buf) => {
                    let (n, peer) = r?;
                    queries += 1;
                    let m = *mode.lock().map_err(|_| anyhow!("mode lock"))?;
                    if let Some(reply) = dns_reply(&buf[..n], m) {
                        sock.send_to(&reply, peer).await?;
                    }
                }
            }
        }
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow!("DNS responder did not start"))?;
    Ok(thread)
}

/// The answer to one A query in `mode` (None: garbage or silent).
fn dns_reply(q: &[u8], mode: DnsMode) -> Option<Vec<u8>> {
    if q.len() < 12 || mode == DnsMode::Silent {
        return None;
    }
    let mut at = 12;
    loop {
        let len = usize::from(*q.get(at)?);
        at += 1 + len;
        if len == 0 {
            break;
        }
    }
    let mut r = q.get(..at + 4)?.to_vec();
    let (rcode, answer) = match mode {
        DnsMode::Answer(a) => (0u16, Some(a)),
        _ => (2, None),
    };
    r[2..4].copy_from_slice(&(0x8180u16 | rcode).to_be_bytes());
    r[6..8].copy_from_slice(&u16::from(answer.is_some()).to_be_bytes());
    r[8..12].copy_from_slice(&[0; 4]);
    if let Some(a) = answer {
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4]);
        r.extend_from_slice(&a.octets());
    }
    Some(r)
}

#[test]
fn dns_failure_keeps_the_last_good_address() -> Result<()> {
    let _serial = serial();
    let mut topo = lab("dnsf")?;
    let up = sock(HOME2, HOME_PORT);
    let home = HomeServer::start(&topo.home, up, None, LIMIT)?;
    let mode = Arc::new(Mutex::new(DnsMode::Answer(HOME2)));
    let resolver = sock(two::HOME, 53);
    let dns = start_dns(&topo.home, resolver, Arc::clone(&mode))?;
    let daemon = start(
        &mut topo,
        |p| {
            config(
                p,
                (20000, 29999),
                "",
                &format!(
                    "[dns]\nservers = [\"{resolver}\"]\ninterval = \"300ms\"\ntimeout = \"300ms\"\n\n\
                     [[service]]\nname = \"web\"\nlisten = \"{}\"\nupstreams = [\"app.home.test:{HOME_PORT}\"]\n\
                     [service.health]\ninterval = \"300ms\"\ntimeout = \"200ms\"\n",
                    service_addr(80)
                ),
            )
        },
        1,
    )?;
    let good = |st: &Value| soak::in_table(st, "web", up);
    wait_status(
        &topo.proxy,
        Duration::from_secs(10),
        "the resolved address in the table",
        good,
    )?;
    let works = |topo: &TwoInterface| -> Result<()> {
        topo.client.run(LIMIT, || async {
            for _ in 0..5 {
                greeting(service_addr(80)).await?;
            }
            Ok(())
        })
    };
    works(&topo)?;
    for (m, what) in [
        (DnsMode::ServFail, "SERVFAIL"),
        (DnsMode::Silent, "no answer"),
    ] {
        *mode.lock().map_err(|_| anyhow!("mode lock"))? = m;
        let failures = status(&topo.proxy)?["dns_failures"].as_u64().unwrap_or(0);
        wait_status(
            &topo.proxy,
            Duration::from_secs(15),
            &format!("two more failed resolutions ({what})"),
            |st| st["dns_failures"].as_u64().unwrap_or(0) >= failures + 2,
        )?;
        let st = status(&topo.proxy)?;
        ensure!(
            good(&st),
            "{what}: the last good address left the table: {st:#}"
        );
        works(&topo).with_context(|| format!("new connections while the resolver gives {what}"))?;
        println!(
            "DNS {what}: dns_failures {failures} -> {}, last good address kept, new connections served",
            st["dns_failures"]
        );
    }
    let queries = dns.stop_and_join()?;
    // One answered, then two of each failure mode at least.
    ensure!(queries >= 5, "only {queries} DNS queries");
    home.stop()?;
    daemon.stop_ok(&mut topo.lab)
}

#[test]
fn all_upstreams_down_refuses_new_connections_fast() -> Result<()> {
    let _serial = serial();
    let mut topo = lab("down")?;
    let (a, b) = (sock(two::HOME, HOME_PORT), sock(HOME2, HOME_PORT));
    let ha = HomeServer::start(&topo.home, a, None, LIMIT)?;
    let hb = HomeServer::start(&topo.home, b, None, LIMIT)?;
    let health =
        "[service.health]\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 2\n";
    let daemon = start(
        &mut topo,
        |p| config(p, (20000, 29999), "", &web_service(&[a, b], health)),
        1,
    )?;
    topo.client.run(LIMIT, || async {
        greeting(service_addr(80)).await.map(drop)
    })?;
    ha.stop()?;
    hb.stop()?;
    wait_status(
        &topo.proxy,
        Duration::from_secs(10),
        "no upstream left",
        |st| {
            st["services"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|s| s["name"] == "web" && s["has_upstreams"] == false)
            })
        },
    )?;
    let before = daemon.stats()?;
    let kinds = topo.client.run(LIMIT, || async {
        let mut kinds = Vec::new();
        for _ in 0..10 {
            let r = tokio::time::timeout(
                Duration::from_secs(3),
                tokio::net::TcpStream::connect(service_addr(80)),
            )
            .await;
            kinds.push(match r {
                Err(_) => "hung".to_owned(),
                Ok(Ok(_)) => "connected".to_owned(),
                Ok(Err(e)) => format!("{:?}", e.kind()),
            });
        }
        Ok(kinds)
    })?;
    ensure!(
        kinds.iter().all(|k| k == "ConnectionRefused"),
        "with every upstream down, new connections ended as {kinds:?} (want a reset: ConnectionRefused)"
    );
    let after = daemon.stats()?;
    let passed = reason(&after, "pass_no_upstream")? - reason(&before, "pass_no_upstream")?;
    ensure!(passed >= 10, "pass_no_upstream +{passed}, want >= 10");
    // One comes back: used again.
    let ha = HomeServer::start(&topo.home, a, None, LIMIT)?;
    wait_status(
        &topo.proxy,
        Duration::from_secs(10),
        "an upstream back",
        |st| soak::in_table(st, "web", a),
    )?;
    let body = topo
        .client
        .run(LIMIT, || async { greeting(service_addr(80)).await })?;
    ensure!(body.contains(&a.to_string()), "served by {body}");
    println!(
        "all upstreams down: 10 new connections refused at once (ECONNREFUSED), pass_no_upstream +{passed}; \
         an upstream back serves again"
    );
    ha.stop()?;
    daemon.stop_ok(&mut topo.lab)
}

// =============================================================================================
// Capabilities of the running daemon.
// =============================================================================================

/// CapInh, CapPrm, CapEff, CapBnd, CapAmb and NoNewPrivs of every thread of `pid`.
fn thread_caps(pid: u32) -> Result<BTreeMap<u32, [u64; 6]>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(entry.path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let mut v = [0u64; 6];
        for (i, name) in [
            "CapInh:",
            "CapPrm:",
            "CapEff:",
            "CapBnd:",
            "CapAmb:",
            "NoNewPrivs:",
        ]
        .iter()
        .enumerate()
        {
            let field = text
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .ok_or_else(|| anyhow!("thread {tid}: no {name}"))?;
            v[i] = u64::from_str_radix(field.trim(), 16)?;
        }
        out.insert(tid, v);
    }
    Ok(out)
}

/// The main thread of `pid` holds exactly `caps` (permitted, effective, bounding), nothing
/// inheritable or ambient, and has no-new-privs set; no other thread holds more (a thread that
/// dropped on itself at its start, like the access-log writer, holds less). Returns the number
/// of threads.
fn only_caps(pid: u32, caps: u64, when: &str) -> Result<usize> {
    let threads = thread_caps(pid)?;
    let want = [0, caps, caps, caps, 0, 1];
    ensure!(
        threads.get(&pid) == Some(&want),
        "{when}: the main thread holds {:x?}, want {want:x?} \
         ([CapInh, CapPrm, CapEff, CapBnd, CapAmb, NoNewPrivs])",
        threads.get(&pid)
    );
    let wrong: Vec<String> = threads
        .iter()
        .filter(|(_, v)| v[..5].iter().zip(&want).any(|(have, w)| have & !w != 0) || v[5] != 1)
        .map(|(tid, v)| format!("thread {tid}: {v:x?}"))
        .collect();
    ensure!(
        wrong.is_empty(),
        "{when}: threads holding more than {caps:#x} \
         ([CapInh, CapPrm, CapEff, CapBnd, CapAmb, NoNewPrivs], want at most {want:x?}):\n{}",
        wrong.join("\n")
    );
    Ok(threads.len())
}

#[test]
fn daemon_drops_every_capability_once_attached() -> Result<()> {
    let _serial = serial();
    let mut topo = lab("caps")?;
    let (a, b) = (sock(two::HOME, HOME_PORT), sock(HOME2, HOME_PORT));
    let ha = HomeServer::start(&topo.home, a, None, LIMIT)?;
    let hb = HomeServer::start(&topo.home, b, None, LIMIT)?;
    let health =
        "[service.health]\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 2\n";
    let daemon = start(
        &mut topo,
        |p| config(p, (20000, 29999), "", &web_service(&[a], health)),
        1,
    )?;
    daemon.wait_log(
        &mut topo.lab,
        &["xdp-proxy running"],
        1,
        Duration::from_secs(30),
    )?;
    let root = thread_caps(std::process::id())?;
    ensure!(
        root.values().all(|v| v[2] & (1 << 39) != 0),
        "this test must run as root with CAP_BPF: {root:x?}"
    );
    let started = only_caps(daemon.pid, 0, "after start")?;
    ensure!(
        started >= 3,
        "{started} threads: main and 2 workers expected"
    );
    daemon.wait_log(
        &mut topo.lab,
        &["capabilities dropped on every thread", "kept=none"],
        1,
        Duration::from_secs(5),
    )?;
    let body = topo
        .client
        .run(LIMIT, || async { greeting(service_addr(80)).await })?;
    ensure!(body.contains(&a.to_string()), "served by {body}");

    // Reload: the service moves to the other upstream (map writes, health checkers started).
    let text = config(
        &daemon.pin_dir,
        (20000, 29999),
        "",
        &web_service(&[b], health),
    );
    topo.lab.write_file("xdp-proxy.toml", &text)?;
    run_cmd(Command::new("kill").args(["-HUP", &daemon.pid.to_string()]))?;
    wait_status(
        &topo.proxy,
        Duration::from_secs(10),
        "the reload applied",
        |st| st["reloads"] == 1 && soak::in_table(st, "web", b) && !soak::in_table(st, "web", a),
    )?;
    let body = topo
        .client
        .run(LIMIT, || async { greeting(service_addr(80)).await })?;
    ensure!(
        body.contains(&b.to_string()),
        "after the reload served by {body}"
    );
    let (code, metrics) = admin_get(&topo.proxy, "/metrics")?;
    ensure!(
        code == 200 && metrics.contains("xdp_proxy"),
        "/metrics: {code}"
    );
    // Expiry scans (every second, on blocking threads) and admin requests ran since.
    std::thread::sleep(Duration::from_secs(2));
    let later = only_caps(daemon.pid, 0, "after a reload, traffic and expiry")?;
    let log = std::fs::read_to_string(topo.lab.run_dir().join("xdp-proxy.log"))?;
    ensure!(
        !log.contains("ERROR") && !log.contains("Operation not permitted"),
        "errors after dropping capabilities:\n{log}"
    );
    daemon.stop_ok(&mut topo.lab)?;
    for dev in [two::PROXY_CLIENT_DEV, two::PROXY_HOME_DEV] {
        ensure!(
            !netns::has_xdp(&topo.proxy, dev)?,
            "XDP on {dev} after SIGTERM"
        );
    }
    let pins: Vec<String> = std::fs::read_dir(
        daemon
            .pin_dir
            .join(format!("v{}", proxy_common::ABI_VERSION)),
    )?
    .flatten()
    .map(|e| e.file_name().to_string_lossy().into_owned())
    .filter(|n| n.starts_with("link_") || n.starts_with("prog_"))
    .collect();
    ensure!(pins.is_empty(), "pins left after SIGTERM: {pins:?}");
    println!(
        "capabilities: {started} threads after start and {later} after a reload, traffic and \
         expiry all hold none (CapPrm/CapEff/CapBnd/CapInh/CapAmb 0, NoNewPrivs 1); reload \
         applied and forwarded; SIGTERM detached and unpinned"
    );
    ha.stop()?;
    hb.stop()
}

#[test]
fn userspace_daemon_keeps_only_net_bind_service() -> Result<()> {
    let _serial = serial();
    let mut topo = lab("capsus")?;
    let a = sock(two::HOME, HOME_PORT);
    let ha = HomeServer::start(&topo.home, a, None, LIMIT)?;
    let web = |port: u16| {
        format!(
            "[[service]]\nname = \"web{port}\"\nlisten = \"{}\"\nupstreams = [\"{a}\"]\n",
            service_addr(port)
        )
    };
    let pin_dir = topo.lab.mount_bpffs()?;
    let text = |services: &str| {
        config(&pin_dir, (20000, 29999), "", services)
            .replace("mode = \"native\"", "mode = \"userspace\"")
    };
    let daemon = Daemon::start(&mut topo.lab, &topo.proxy, &text(&web(80)))?;
    daemon.wait_log(
        &mut topo.lab,
        &["xdp-proxy running"],
        1,
        Duration::from_secs(30),
    )?;
    let net_bind_service = 1 << 10;
    let started = only_caps(daemon.pid, net_bind_service, "after start")?;
    topo.client.run(LIMIT, || async {
        get_root_until_up(service_addr(80)).await.map(drop)
    })?;
    // A reload adds a service on port 81: bound with the one capability kept.
    topo.lab
        .write_file("xdp-proxy.toml", &text(&format!("{}{}", web(80), web(81))))?;
    run_cmd(Command::new("kill").args(["-HUP", &daemon.pid.to_string()]))?;
    daemon.wait_log(
        &mut topo.lab,
        &["userspace L4 listening", "web81"],
        1,
        Duration::from_secs(10),
    )?;
    let body = topo.client.run(LIMIT, || async {
        get_root_until_up(service_addr(81)).await
    })?;
    ensure!(body.contains(&a.to_string()), "port 81 served by {body}");
    let later = only_caps(daemon.pid, net_bind_service, "after a reload")?;
    println!(
        "capabilities (userspace path): {started} threads after start, {later} after a reload \
         that bound port 81: CAP_NET_BIND_SERVICE only"
    );
    daemon.stop_ok(&mut topo.lab)?;
    ha.stop()
}

// =============================================================================================
// The soak, CI length.
// =============================================================================================

#[test]
fn soak_with_faults() -> Result<()> {
    let _serial = serial();
    let secs = std::env::var("XPT_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let report = soak::run(&SoakOptions::ci(secs), &|| false)?;
    ensure!(
        report.tcp_flows_ok >= 1000,
        "only {} TCP flows completed in {secs} s (want >= 1,000)",
        report.tcp_flows_ok
    );
    ensure!(
        report.max_concurrent >= 100,
        "at most {} flows at once",
        report.max_concurrent
    );
    ensure!(report.udp_requests > 0, "no UDP traffic");
    for fault in [
        "sighup_reload",
        "upstream_killed",
        "upstream_restored",
        "health_flap",
        "daemon_kill9_restart",
    ] {
        ensure!(
            report.faults.get(fault).copied().unwrap_or(0) >= 1,
            "fault {fault} was not injected: {:?}",
            report.faults
        );
    }
    Ok(())
}
