//! Namespace tests of the control plane, on the two-interface shape (client -- proxy -- home):
//!
//! - `unhealthy_upstream_leaves_the_table_and_its_flows_are_kept`: one of three upstreams stops
//!   accepting connections while a paced, checksummed download from it runs; the health checks
//!   take it out of the Maglev table (seen in /status) within interval x fall plus slack, new
//!   connections all land on the other two, and the running download still completes intact;
//!   then the other two go down too: new connections are refused and counted pass_no_upstream.
//! - `reload_adds_removes_and_changes_services_without_losing_flows`: SIGHUP with a config that
//!   removes a service, adds one, moves another to a new upstream and changes a restart-only key,
//!   while a checksummed transfer runs on a third service and connections stay open on the
//!   removed and the moved one: the transfer completes intact, the open connections keep
//!   working, new connections follow the new config, the restart-only change is refused.
//! - `drained_upstream_takes_no_new_flows_and_its_flows_finish`: a reload sets `drain = true` on
//!   an upstream holding a connection: that connection goes on, new ones avoid the upstream.
//! - `invalid_reload_keeps_serving`: SIGHUP with an invalid file: refused (logged, counted), the
//!   running config keeps serving old and new connections.
//! - `dns_upstream_follows_its_name`: an upstream given by name, answered by a DNS responder the
//!   test runs in the home namespace from a table it changes (HTTP health checks on the way):
//!   the proxy follows the new address,
//!   refuses an address outside the home CIDR and keeps the last good address when the name
//!   stops resolving.
//!
//! Run as root: `cargo test -p integration-tests --test control -- --nocapture`.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use integration_tests::netns::serial;
use integration_tests::netns::{Daemon, Netns, NsThread, TwoInterface, sock, two};
use integration_tests::traffic::{Conn, HomeServer, Payload, payload_checksum};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const HOME_PORT: u16 = 8080;
const HOME2: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
const HOME3: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 4);
/// Bound of each client or server thread.
const LIMIT: Duration = Duration::from_secs(60);

/// The two-interface lab with two more home addresses (10.200.0.3, 10.200.0.4).
fn lab(tag: &str) -> Result<TwoInterface> {
    let topo = TwoInterface::new(tag)?;
    for a in [HOME2, HOME3] {
        topo.home
            .ip(&["addr", "add", &format!("{a}/24"), "dev", two::HOME_DEV])?;
    }
    Ok(topo)
}

fn config(pin_dir: &std::path::Path, extra: &str) -> String {
    format!(
        r#"[datapath]
interfaces = ["{pc}", "{ph}"]
mode = "native"
pin_dir = "{pin}"

[nat]
snat_ipv4 = "{snat}"
port_range = [20000, 29999]
home_cidrs = ["{cidr}"]

{extra}"#,
        pc = two::PROXY_CLIENT_DEV,
        ph = two::PROXY_HOME_DEV,
        pin = pin_dir.display(),
        snat = two::PROXY_HOME_SIDE,
        cidr = two::HOME_CIDR,
    )
}

fn service_addr(port: u16) -> SocketAddr {
    sock(two::PROXY_CLIENT_SIDE, port)
}

fn start_daemon(topo: &mut TwoInterface, extra: &str, services: usize) -> Result<Daemon> {
    let pin_dir = topo.lab.mount_bpffs()?;
    let daemon = Daemon::start(&mut topo.lab, &topo.proxy, &config(&pin_dir, extra))?;
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

fn sighup(pid: u32) -> Result<()> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).context("kill -HUP")
}

/// The daemon's `/status` (admin listener on the proxy's loopback).
fn status(proxy: &Netns) -> Result<Value> {
    proxy.run(Duration::from_secs(10), || async {
        let mut s = TcpStream::connect("127.0.0.1:9100")
            .await
            .context("connect to the admin listener")?;
        s.write_all(b"GET /status HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .map_err(|_| anyhow!("/status: timed out"))??;
        let text = String::from_utf8(buf).context("/status: not UTF-8")?;
        let (_, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("/status: no body in {text:?}"))?;
        serde_json::from_str(body).with_context(|| format!("/status: not JSON: {body}"))
    })
}

fn services_of(st: &Value) -> Vec<&Value> {
    st["services"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn service<'a>(st: &'a Value, name: &str) -> Option<&'a Value> {
    services_of(st).into_iter().find(|s| s["name"] == name)
}

/// The upstream entry of `service` whose resolved address is `addr`.
fn upstream<'a>(st: &'a Value, name: &str, addr: SocketAddr) -> Option<&'a Value> {
    service(st, name)?["upstreams"]
        .as_array()?
        .iter()
        .find(|u| u["resolved"] == addr.to_string())
}

/// Poll `check` every 100 ms until it is true, at most `limit`; the last status on failure.
fn wait_status(
    proxy: &Netns,
    limit: Duration,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    let mut last = Value::Null;
    while start.elapsed() < limit {
        last = status(proxy)?;
        if check(&last) {
            return Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{what}: not seen within {limit:?}; last /status: {last:#}")
}

/// `GET /` through `service` on a new connection: the home server's answer.
async fn greeting(service: SocketAddr) -> Result<String> {
    let mut c = Conn::connect(service, Duration::from_secs(3)).await?;
    let (status, body) = c.get_text("/").await?;
    ensure!(status.contains(" 200 "), "GET /: {status}");
    Ok(body)
}

/// The home address a greeting names ("hello from home 10.200.0.2:8080: ...").
fn served_by(greeting: &str) -> Result<SocketAddr> {
    greeting
        .split_whitespace()
        .nth(3)
        .and_then(|a| a.trim_end_matches(':').parse().ok())
        .ok_or_else(|| anyhow!("no server address in {greeting:?}"))
}

// ---------------------------------------------------------------------------------------------
// A home server that can stop accepting while its connections go on.
// ---------------------------------------------------------------------------------------------

const VICTIM_HELLO: &[u8] = b"VICTIM\n";

/// Bound to `addr` in `ns`: greets every connection with `VICTIM\n`, then on `go SEED LEN\n`
/// sends `LEN` bytes of seed `SEED`, paced (32 KiB every 20 ms), and closes. `stop()` closes
/// the listener; connections in progress finish.
fn start_victim(ns: &Netns, addr: SocketAddr) -> Result<NsThread<u64>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let thread = ns.spawn(LIMIT, move |mut stop| async move {
        let listener = TcpListener::bind(addr).await?;
        let _ = ready_tx.send(());
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                () = stop.wait() => break,
                accepted = listener.accept() => {
                    let (s, _) = accepted?;
                    conns.spawn(victim_conn(s));
                }
            }
        }
        drop(listener);
        let mut served = 0;
        while let Some(done) = conns.join_next().await {
            // Health-check connections close at once: an error there is expected.
            if matches!(done, Ok(Ok(true))) {
                served += 1;
            }
        }
        Ok(served)
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow!("victim server did not start"))?;
    Ok(thread)
}

async fn victim_conn(mut s: TcpStream) -> Result<bool> {
    s.write_all(VICTIM_HELLO).await?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if line.len() > 64 || s.read(&mut byte).await? == 0 {
            return Ok(false);
        }
        line.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&line);
    let mut it = text.split_whitespace();
    let (Some("go"), Some(seed), Some(len)) = (it.next(), it.next(), it.next()) else {
        return Ok(false);
    };
    let (seed, len): (u64, u64) = (seed.parse()?, len.parse()?);
    let mut p = Payload::new(seed);
    let mut buf = vec![0u8; 32 * 1024];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64))?;
        p.fill(&mut buf[..n]);
        s.write_all(&buf[..n]).await?;
        left -= n as u64;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.shutdown().await?;
    Ok(true)
}

/// From the client: connect until a connection lands on the victim (it greets first), tell
/// `found`, then download `len` bytes of `seed` from it and check them. Returns the checksum.
async fn download_from_victim(
    service: SocketAddr,
    found: mpsc::Sender<()>,
    seed: u64,
    len: u64,
) -> Result<u64> {
    let mut s = None;
    for _ in 0..60 {
        let mut c = TcpStream::connect(service).await?;
        let mut hello = [0u8; 7];
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(400), c.read_exact(&mut hello)).await
            && hello == VICTIM_HELLO
        {
            s = Some(c);
            break;
        }
    }
    let mut s = s.ok_or_else(|| anyhow!("no connection landed on the victim in 60 tries"))?;
    found.send(()).map_err(|_| anyhow!("test thread gone"))?;
    s.write_all(format!("go {seed} {len}\n").as_bytes()).await?;
    let mut got = Vec::with_capacity(usize::try_from(len)?);
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut got))
        .await
        .map_err(|_| anyhow!("download from the victim timed out at {} bytes", got.len()))??;
    ensure!(
        got.len() as u64 == len,
        "download from the victim: {} bytes of {len}",
        got.len()
    );
    let sum = integration_tests::traffic::fnv64(&got);
    ensure!(
        sum == payload_checksum(seed, len),
        "download from the victim: checksum differs"
    );
    Ok(sum)
}

// ---------------------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------------------

#[test]
fn unhealthy_upstream_leaves_the_table_and_its_flows_are_kept() -> Result<()> {
    let _serial = serial();
    let mut topo = lab("hlth")?;
    let ups = [
        sock(two::HOME, HOME_PORT),
        sock(HOME2, HOME_PORT),
        sock(HOME3, HOME_PORT),
    ];
    let h1 = HomeServer::start(&topo.home, ups[0], None, LIMIT * 2)?;
    let h2 = HomeServer::start(&topo.home, ups[1], None, LIMIT * 2)?;
    let victim = start_victim(&topo.home, ups[2])?;
    let (interval, fall) = (Duration::from_millis(200), 3u32);
    let daemon = start_daemon(
        &mut topo,
        &format!(
            r#"[[service]]
name = "web"
listen = "{svc}"
upstreams = ["{a}", "{b}", "{c}"]
[service.health]
kind = "tcp"
interval = "{ms}ms"
timeout = "150ms"
rise = 2
fall = {fall}
"#,
            svc = service_addr(80),
            a = ups[0],
            b = ups[1],
            c = ups[2],
            ms = interval.as_millis(),
        ),
        1,
    )?;
    wait_status(
        &topo.proxy,
        Duration::from_secs(10),
        "three healthy upstreams",
        |st| {
            ups.iter()
                .all(|u| upstream(st, "web", *u).is_some_and(|v| v["in_table"] == true))
        },
    )?;

    // A paced 3 MiB download from the victim, running while it goes away.
    let (found_tx, found_rx) = mpsc::channel();
    let len = 3 << 20;
    let download = topo.client.spawn(LIMIT, move |_stop| {
        download_from_victim(service_addr(80), found_tx, 42, len)
    })?;
    found_rx
        .recv_timeout(Duration::from_secs(40))
        .map_err(|_| anyhow!("no connection reached the victim"))?;
    // The victim stops accepting: health checks to it fail from now on.
    victim.stop();
    let gone = Instant::now();
    let bound = interval * fall + Duration::from_secs(3);
    wait_status(&topo.proxy, bound, "the victim out of the table", |st| {
        upstream(st, "web", ups[2]).is_some_and(|u| u["healthy"] == false && u["in_table"] == false)
    })?;
    println!(
        "victim out of the Maglev table {:?} after it stopped accepting (interval {interval:?} x fall {fall} = {:?})",
        gone.elapsed(),
        interval * fall
    );

    // New connections all succeed, on the two others.
    let served = topo.client.run(LIMIT, || async {
        let mut by = HashMap::new();
        for _ in 0..30 {
            let g = greeting(service_addr(80)).await?;
            *by.entry(served_by(&g)?).or_insert(0u32) += 1;
        }
        Ok(by)
    })?;
    println!("new connections after removal: {served:?}");
    ensure!(
        served.keys().all(|a| *a == ups[0] || *a == ups[1]) && served.values().sum::<u32>() == 30,
        "new connections went to {served:?}"
    );
    ensure!(
        served.len() == 2,
        "both healthy upstreams should get connections: {served:?}"
    );

    // The flow to the upstream that went unhealthy was kept: the download completed intact.
    let sum = download.join().context("the download from the victim")?;
    println!("download from the unhealthy upstream completed intact ({sum:016x})");
    let served_by_victim = victim.join()?;
    ensure!(served_by_victim >= 1, "the victim served no download");
    let st = status(&topo.proxy)?;
    ensure!(
        service(&st, "web").is_some_and(|s| s["has_upstreams"] == true),
        "web lost its upstreams: {st:#}"
    );

    // Every upstream down: the documented, counted behaviour. New flows are passed to the
    // kernel (nothing listens there: the client is refused) and counted pass_no_upstream.
    h1.stop()?;
    h2.stop()?;
    wait_status(&topo.proxy, bound, "no upstream left", |st| {
        service(st, "web").is_some_and(|s| s["has_upstreams"] == false)
    })?;
    let passed_before = status(&topo.proxy)?["reasons"]["pass_no_upstream"]
        .as_u64()
        .unwrap_or(0);
    let refused = topo.client.run(LIMIT, || async {
        let r = tokio::time::timeout(Duration::from_secs(5), greeting(service_addr(80))).await;
        Ok(!matches!(r, Ok(Ok(_))))
    })?;
    ensure!(
        refused,
        "a new connection succeeded with every upstream down"
    );
    let passed = status(&topo.proxy)?["reasons"]["pass_no_upstream"]
        .as_u64()
        .unwrap_or(0);
    ensure!(
        passed > passed_before,
        "pass_no_upstream {passed_before} -> {passed}: the refused flow was not counted"
    );
    println!(
        "every upstream down: new connection refused, pass_no_upstream {passed_before} -> {passed}"
    );
    daemon.stop_ok(&mut topo.lab)?;
    Ok(())
}

fn reload_services(with: &[(&str, u16, SocketAddr)]) -> String {
    let mut out = String::new();
    for (name, port, up) in with {
        out.push_str(&format!(
            "[[service]]\nname = \"{name}\"\nlisten = \"{}\"\nupstreams = [\"{up}\"]\n\
             [service.health]\ninterval = \"500ms\"\ntimeout = \"300ms\"\n\n",
            service_addr(*port)
        ));
    }
    out
}

#[test]
fn reload_adds_removes_and_changes_services_without_losing_flows() -> Result<()> {
    let _serial = serial();
    let mut topo = lab("rld")?;
    let (a, b) = (sock(two::HOME, HOME_PORT), sock(HOME2, HOME_PORT));
    let ha = HomeServer::start(&topo.home, a, None, LIMIT * 2)?;
    let hb = HomeServer::start(&topo.home, b, None, LIMIT * 2)?;
    let first = reload_services(&[("keep", 80, a), ("gone", 81, a), ("move", 83, a)]);
    let daemon = start_daemon(&mut topo, &first, 3)?;

    // A transfer on "keep" that runs across the reload: downloads and uploads, every byte
    // checked, on one connection, until told the reload happened (then three more rounds).
    let reloaded = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let (r, n) = (Arc::clone(&reloaded), Arc::clone(&rounds));
    let transfer = topo.client.spawn(LIMIT, move |_stop| async move {
        let mut c = Conn::connect(service_addr(80), Duration::from_secs(5)).await?;
        let mut after = 0;
        for seed in 0..2_000u64 {
            c.get_blob(seed, 512 * 1024).await?;
            c.put_sink(seed + 10_000, 128 * 1024).await?;
            n.fetch_add(1, Ordering::Relaxed);
            if r.load(Ordering::Relaxed) {
                after += 1;
                if after == 3 {
                    return Ok(seed + 1);
                }
            }
        }
        bail!("the reload never came")
    })?;
    // Connections held open on the service that goes and on the one that moves.
    let (opened_tx, opened_rx) = mpsc::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let held = topo.client.spawn(LIMIT, move |_stop| async move {
        let mut gone = Conn::connect(service_addr(81), Duration::from_secs(5)).await?;
        let mut moved = Conn::connect(service_addr(83), Duration::from_secs(5)).await?;
        for c in [&mut gone, &mut moved] {
            let (s, body) = c.get_text("/").await?;
            ensure!(
                s.contains(" 200 ") && served_by(&body)? == a,
                "before: {body}"
            );
        }
        let _ = opened_tx.send(());
        go_rx.await.map_err(|_| anyhow!("test thread gone"))?;
        let mut out = Vec::new();
        for c in [&mut gone, &mut moved] {
            let (s, body) = c.get_text("/").await?;
            ensure!(s.contains(" 200 "), "after the reload: {s}");
            out.push(served_by(&body)?);
        }
        Ok(out)
    })?;
    opened_rx
        .recv_timeout(Duration::from_secs(20))
        .map_err(|_| anyhow!("held connections not opened"))?;
    // Let the transfer get going.
    let t0 = Instant::now();
    while rounds.load(Ordering::Relaxed) < 2 && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(
        rounds.load(Ordering::Relaxed) >= 2,
        "the transfer did not start"
    );

    // The new config: "gone" removed, "new" added, "move" to another upstream, "keep" as it
    // was; max_flows changed (restart-only: refused, the rest applied).
    let second = reload_services(&[("keep", 80, a), ("new", 82, b), ("move", 83, b)]);
    let pin_dir = topo.lab.mount_bpffs()?;
    let text = config(&pin_dir, &second).replace("pin_dir = ", "max_flows = 4096\npin_dir = ");
    topo.lab.write_file("xdp-proxy.toml", &text)?;
    let before = rounds.load(Ordering::Relaxed);
    sighup(daemon.pid)?;
    wait_status(
        &topo.proxy,
        Duration::from_secs(10),
        "the reload applied",
        |st| {
            st["reloads"] == 1
                && service(st, "new").is_some_and(|s| s["has_upstreams"] == true)
                && service(st, "gone").is_none()
                && upstream(st, "move", b).is_some_and(|u| u["in_table"] == true)
        },
    )?;
    reloaded.store(true, Ordering::Relaxed);
    let _ = go_tx.send(());
    println!("reload applied after {before} transfer rounds");

    let seeds = transfer.join().context("the transfer across the reload")?;
    println!("transfer on the kept service: {seeds} rounds, every byte checked");
    let after = held.join().context("the held connections")?;
    ensure!(
        after == [a, a],
        "held connections (removed service, moved service) should still reach {a}: {after:?}"
    );
    let (new_by, move_by, gone_refused) = topo.client.run(LIMIT, || async {
        let new_by = served_by(&greeting(service_addr(82)).await?)?;
        let move_by = served_by(&greeting(service_addr(83)).await?)?;
        let gone = tokio::time::timeout(Duration::from_secs(5), greeting(service_addr(81))).await;
        Ok((new_by, move_by, !matches!(gone, Ok(Ok(_)))))
    })?;
    ensure!(new_by == b, "the added service reached {new_by}, want {b}");
    ensure!(
        move_by == b,
        "the moved service reached {move_by}, want {b}"
    );
    ensure!(
        gone_refused,
        "the removed service still answers new connections"
    );
    let log = topo.lab.log_tail(daemon.pid, 200);
    ensure!(
        log.contains("datapath.max_flows") && log.contains("cannot change while the daemon runs"),
        "the refused restart-only change is not logged:\n{log}"
    );
    ha.stop()?;
    hb.stop()?;
    daemon.stop_ok(&mut topo.lab)?;
    Ok(())
}

#[test]
fn invalid_reload_keeps_serving() -> Result<()> {
    let _serial = serial();
    let mut topo = lab("bad")?;
    let a = sock(two::HOME, HOME_PORT);
    let ha = HomeServer::start(&topo.home, a, None, LIMIT * 2)?;
    let daemon = start_daemon(&mut topo, &reload_services(&[("web", 80, a)]), 1)?;
    let (opened_tx, opened_rx) = mpsc::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let held = topo.client.spawn(LIMIT, move |_stop| async move {
        let mut c = Conn::connect(service_addr(80), Duration::from_secs(5)).await?;
        c.get_blob(1, 256 * 1024).await?;
        let _ = opened_tx.send(());
        go_rx.await.map_err(|_| anyhow!("test thread gone"))?;
        c.get_blob(2, 256 * 1024).await
    })?;
    opened_rx
        .recv_timeout(Duration::from_secs(20))
        .map_err(|_| anyhow!("connection not opened"))?;

    // An upstream outside the home CIDR and an unknown key: refused.
    let pin_dir = topo.lab.mount_bpffs()?;
    let bad = config(
        &pin_dir,
        "[[service]]\nname = \"web\"\nlisten = \"10.100.0.1:80\"\nupstreams = [\"192.0.2.1:80\"]\n",
    );
    topo.lab.write_file("xdp-proxy.toml", &bad)?;
    sighup(daemon.pid)?;
    wait_status(
        &topo.proxy,
        Duration::from_secs(10),
        "the reload refused",
        |st| st["reload_failures"] == 1 && st["reloads"] == 0,
    )?;
    let st = status(&topo.proxy)?;
    let err = st["last_reload_error"].as_str().unwrap_or("");
    ensure!(
        err.contains("service[0].upstreams[0]") && err.contains("outside every home CIDR"),
        "last_reload_error: {err}"
    );
    let log = topo.lab.log_tail(daemon.pid, 100);
    ensure!(
        log.contains("the new config is refused") && log.contains("192.0.2.1:80"),
        "refusal not logged:\n{log}"
    );
    // Still serving: the open connection and new ones, on the running config.
    let _ = go_tx.send(());
    held.join()
        .context("the connection open across the refused reload")?;
    let by = topo.client.run(LIMIT, || async {
        served_by(&greeting(service_addr(80)).await?)
    })?;
    ensure!(by == a, "served by {by}");
    ensure!(
        upstream(&st, "web", a).is_some_and(|u| u["in_table"] == true),
        "the running upstream left the table: {st:#}"
    );
    ha.stop()?;
    daemon.stop_ok(&mut topo.lab)?;
    Ok(())
}

#[test]
fn drained_upstream_takes_no_new_flows_and_its_flows_finish() -> Result<()> {
    let _serial = serial();
    let mut topo = lab("drn")?;
    let (a, b) = (sock(two::HOME, HOME_PORT), sock(HOME2, HOME_PORT));
    let ha = HomeServer::start(&topo.home, a, None, LIMIT * 2)?;
    let hb = HomeServer::start(&topo.home, b, None, LIMIT * 2)?;
    let services = |drain: bool| {
        format!(
            "[[service]]\nname = \"web\"\nlisten = \"{}\"\nupstreams = [\"{a}\", \
             {{ address = \"{b}\", weight = 3, drain = {drain} }}]\n",
            service_addr(80)
        )
    };
    let daemon = start_daemon(&mut topo, &services(false), 1)?;
    // A connection that landed on b, held open.
    let (opened_tx, opened_rx) = mpsc::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let held = topo.client.spawn(LIMIT, move |_stop| async move {
        let mut on_b = None;
        for _ in 0..40 {
            let mut c = Conn::connect(service_addr(80), Duration::from_secs(5)).await?;
            let (_, body) = c.get_text("/").await?;
            if served_by(&body)? == b {
                on_b = Some(c);
                break;
            }
        }
        let mut c = on_b.ok_or_else(|| anyhow!("no connection landed on {b}"))?;
        let _ = opened_tx.send(());
        go_rx.await.map_err(|_| anyhow!("test thread gone"))?;
        let (_, body) = c.get_text("/").await?;
        c.get_blob(5, 1 << 20).await?;
        served_by(&body)
    })?;
    opened_rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| anyhow!("no connection on the upstream to drain"))?;
    let pin_dir = topo.lab.mount_bpffs()?;
    topo.lab
        .write_file("xdp-proxy.toml", &config(&pin_dir, &services(true)))?;
    sighup(daemon.pid)?;
    wait_status(&topo.proxy, Duration::from_secs(10), "b drained", |st| {
        upstream(st, "web", b).is_some_and(|u| u["drain"] == true && u["in_table"] == false)
            && upstream(st, "web", a).is_some_and(|u| u["in_table"] == true)
    })?;
    let _ = go_tx.send(());
    let by = held
        .join()
        .context("the connection on the drained upstream")?;
    ensure!(by == b, "the held connection moved to {by}");
    let all_a = topo.client.run(LIMIT, move || async move {
        for _ in 0..20 {
            let by = served_by(&greeting(service_addr(80)).await?)?;
            ensure!(by == a, "a new connection went to {by} while {b} drains");
        }
        Ok(())
    });
    all_a?;
    println!("drained upstream: its connection finished, 20 new connections all on {a}");
    ha.stop()?;
    hb.stop()?;
    daemon.stop_ok(&mut topo.lab)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// DNS.
// ---------------------------------------------------------------------------------------------

/// What the test's DNS responder answers: name -> addresses (empty: NXDOMAIN).
type DnsTable = Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>>;

/// Answer A queries on `addr` (UDP) from `table`, TTL 1, until stopped. Returns the number of
/// queries answered.
fn start_dns(ns: &Netns, addr: SocketAddr, table: DnsTable) -> Result<NsThread<u64>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let thread = ns.spawn(LIMIT * 2, move |mut stop| async move {
        let sock = UdpSocket::bind(addr).await?;
        let _ = ready_tx.send(());
        let mut buf = [0u8; 512];
        let mut answered = 0;
        loop {
            tokio::select! {
                () = stop.wait() => return Ok(answered),
                r = sock.recv_from(&mut buf) => {
                    let (n, peer) = r?;
                    if let Some(reply) = dns_reply(&buf[..n], &table) {
                        sock.send_to(&reply, peer).await?;
                        answered += 1;
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

/// The answer to one query (one question), or None for garbage.
fn dns_reply(q: &[u8], table: &DnsTable) -> Option<Vec<u8>> {
    if q.len() < 12 || q[4..6] != [0, 1] {
        return None;
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*q.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let question_end = at + 4;
    let qtype = u16::from_be_bytes([*q.get(at)?, *q.get(at + 1)?]);
    let name = labels.join(".");
    let addrs = table.lock().ok()?.get(&name).cloned().unwrap_or_default();
    let mut r = q.get(..question_end)?.to_vec();
    let rcode = if addrs.is_empty() { 3 } else { 0 };
    r[2..4].copy_from_slice(&(0x8180u16 | rcode).to_be_bytes());
    let answers: Vec<Ipv4Addr> = if qtype == 1 { addrs } else { Vec::new() };
    r[6..8].copy_from_slice(&u16::try_from(answers.len()).ok()?.to_be_bytes());
    r[8..12].copy_from_slice(&[0; 4]);
    for a in answers {
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4]);
        r.extend_from_slice(&a.octets());
    }
    Some(r)
}

#[test]
fn dns_upstream_follows_its_name() -> Result<()> {
    let _serial = serial();
    let mut topo = lab("dns")?;
    let (a, b) = (sock(two::HOME, HOME_PORT), sock(HOME2, HOME_PORT));
    let ha = HomeServer::start(&topo.home, a, None, LIMIT * 2)?;
    let hb = HomeServer::start(&topo.home, b, None, LIMIT * 2)?;
    let table: DnsTable = Arc::new(Mutex::new(HashMap::new()));
    let set = |addrs: &[Ipv4Addr]| -> Result<()> {
        table
            .lock()
            .map_err(|_| anyhow!("table lock"))?
            .insert("app.home.test".into(), addrs.to_vec());
        Ok(())
    };
    set(&[two::HOME])?;
    let dns = start_dns(&topo.home, sock(two::HOME, 53), Arc::clone(&table))?;
    let daemon = start_daemon(
        &mut topo,
        &format!(
            r#"[dns]
servers = ["{resolver}"]
interval = "500ms"
timeout = "500ms"

[[service]]
name = "web"
listen = "{svc}"
upstreams = ["app.home.test:{HOME_PORT}"]
[service.health]
kind = "http"
path = "/"
expect_status = 200
interval = "500ms"
timeout = "300ms"
"#,
            resolver = sock(two::HOME, 53),
            svc = service_addr(80),
        ),
        1,
    )?;
    let in_table = |addr: SocketAddr| {
        move |st: &Value| upstream(st, "web", addr).is_some_and(|u| u["in_table"] == true)
    };
    wait_status(
        &topo.proxy,
        Duration::from_secs(10),
        "the name's first address",
        in_table(a),
    )?;
    let by = topo.client.run(LIMIT, || async {
        served_by(&greeting(service_addr(80)).await?)
    })?;
    ensure!(by == a, "served by {by}, want {a}");

    // The name moves: the proxy follows.
    set(&[HOME2])?;
    let took = wait_status(
        &topo.proxy,
        Duration::from_secs(15),
        "the name's new address",
        |st| in_table(b)(st) && upstream(st, "web", a).is_none(),
    )?;
    println!("DNS change followed in {took:?}");
    let all = |want: SocketAddr| {
        topo.client.run(LIMIT, move || async move {
            for _ in 0..10 {
                let by = served_by(&greeting(service_addr(80)).await?)?;
                ensure!(by == want, "served by {by}, want {want}");
            }
            Ok(())
        })
    };
    all(b)?;

    // An answer outside the home CIDR is refused; the last good address stays.
    set(&[Ipv4Addr::new(192, 0, 2, 1)])?;
    wait_status(
        &topo.proxy,
        Duration::from_secs(15),
        "the refused address counted",
        |st| st["dns_refused_addresses"].as_u64().unwrap_or(0) >= 1,
    )?;
    // The name stops resolving (NXDOMAIN): the last good address stays too.
    set(&[])?;
    let failures = status(&topo.proxy)?["dns_failures"].as_u64().unwrap_or(0);
    wait_status(
        &topo.proxy,
        Duration::from_secs(15),
        "a failed resolution counted",
        |st| st["dns_failures"].as_u64().unwrap_or(0) > failures,
    )?;
    let st = status(&topo.proxy)?;
    ensure!(in_table(b)(&st), "the last good address left: {st:#}");
    ensure!(
        upstream(&st, "web", sock(Ipv4Addr::new(192, 0, 2, 1), HOME_PORT)).is_none(),
        "the refused address is an upstream: {st:#}"
    );
    all(b)?;
    let queries = dns.stop_and_join()?;
    println!("DNS responder answered {queries} queries");
    ensure!(queries >= 4, "only {queries} DNS queries");
    ha.stop()?;
    hb.stop()?;
    daemon.stop_ok(&mut topo.lab)?;
    Ok(())
}
