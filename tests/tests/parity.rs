//! Namespace tests: a service's fast-path options (`allow` / `deny`, `new_flow_rate` /
//! `new_flow_burst`, `mss_clamp`) are enforced by the daemon's userspace data paths as the XDP
//! program enforces them (docs/datapath.md step 7, docs/userspace.md "Client admission"), with
//! the daemon in `datapath.mode = "userspace"` and real sockets. The client namespace gets a
//! second address ([`OTHER_CLIENT`]) so two clients can be told apart.
//!
//! - `userspace_tcp_deny_refuses_the_denied_client`: the denied client's connections are reset
//!   before any upstream connect (no data, counted `drop_acl_denied` in /metrics and /status)
//!   while the other client is served.
//! - `userspace_tcp_allow_list_admits_only_its_prefix`: a client outside the allow list is
//!   refused (`drop_acl_not_allowed`); the one inside it is served.
//! - `userspace_tcp_rate_limit_refuses_past_the_burst`: connections of one client past its
//!   burst are refused (`drop_rate_limited`, at least one) while another client still has its
//!   own bucket.
//! - `userspace_udp_deny_keeps_open_sessions`: a UDP service whose deny list gains a client at a
//!   reload: the client's open session keeps being answered (the ACL admits flows), a new
//!   session of it is dropped (`drop_acl_denied`), the other client is answered.
//! - `userspace_mss_clamp_on_both_sides`: with `mss_clamp = 1000` the client's connection and
//!   the proxy's upstream connection both use an MSS of at most 1000; a service without the
//!   clamp uses more on the same path.
//! - `http_deny_refuses_the_denied_client`: an http service with a deny list resets the denied
//!   client's connections and serves the other client (counted, layer `http`).
//!
//! Run as root: `cargo test -p integration-tests --test parity -- --nocapture`.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, ensure};
use integration_tests::netns::{Daemon, Netns, TwoInterface, serial, sock, two};
use integration_tests::soak::{admin_text, metric};
use integration_tests::traffic::HomeServer;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::time::timeout;

const HOME_PORT: u16 = 8080;
/// The second client address, added on the client namespace's interface.
const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 3);
/// Bound of one test's client side.
const CLIENT_LIMIT: Duration = Duration::from_secs(120);
const READY: Duration = Duration::from_secs(30);
/// Bound of one read or connect of a client.
const IO: Duration = Duration::from_secs(5);

/// The lab, with [`OTHER_CLIENT`] on the client's interface.
fn lab(tag: &str) -> Result<TwoInterface> {
    let topo = TwoInterface::new(tag)?;
    topo.client.ip(&[
        "addr",
        "add",
        &format!("{OTHER_CLIENT}/24"),
        "dev",
        two::CLIENT_DEV,
    ])?;
    Ok(topo)
}

/// The `xdp_proxy_userspace_refused_total` sample of one service and reason.
fn refused_series(
    name: &str,
    listen: SocketAddr,
    protocol: &str,
    layer: &str,
    reason: &str,
) -> String {
    format!(
        "xdp_proxy_userspace_refused_total{{service=\"{name}\",listen=\"{listen}\",protocol=\"{protocol}\",layer=\"{layer}\",reason=\"{reason}\"}}"
    )
}

/// The `/status` entry of userspace service `name`.
fn status_of(proxy: &Netns, name: &str) -> Result<serde_json::Value> {
    let text = admin_text(proxy, "/status")?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("/status: {text}"))?;
    v["userspace_services"]
        .as_array()
        .and_then(|l| l.iter().find(|s| s["name"] == name))
        .cloned()
        .ok_or_else(|| anyhow!("/status lists no userspace service {name}: {text}"))
}

/// A TCP connection to `service` from `src` (port chosen by the kernel).
async fn connect_from(src: Ipv4Addr, service: SocketAddr) -> Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::from((src, 0)))
        .with_context(|| format!("bind {src}"))?;
    timeout(IO, s.connect(service))
        .await
        .map_err(|_| anyhow!("connect {service} from {src}: timed out"))?
        .with_context(|| format!("connect {service} from {src}"))
}

/// What one `GET /` from `src` got.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// An HTTP response (its first line).
    Served(String),
    /// Reset or closed without a byte of response.
    Refused,
}

/// `GET /` through `service` from `src`, reading until the response head or the end.
async fn get_from(src: Ipv4Addr, service: SocketAddr) -> Result<Outcome> {
    let mut c = match connect_from(src, service).await {
        Ok(c) => c,
        // A reset that came before the connect returned.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset) =>
        {
            return Ok(Outcome::Refused);
        }
        Err(e) => return Err(e),
    };
    // The write may already meet the reset.
    if c.write_all(b"GET / HTTP/1.1\r\nHost: service\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return Ok(Outcome::Refused);
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..64 {
        match timeout(IO, c.read(&mut buf)).await {
            Err(_) => {
                return Err(anyhow!(
                    "GET / from {src}: no answer and no close in {IO:?}"
                ));
            }
            Ok(Err(_) | Ok(0)) => break,
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    if got.is_empty() {
        return Ok(Outcome::Refused);
    }
    let text = String::from_utf8_lossy(&got);
    Ok(Outcome::Served(
        text.lines().next().unwrap_or_default().to_owned(),
    ))
}

fn served_200(o: &Outcome) -> bool {
    matches!(o, Outcome::Served(l) if l.contains(" 200 "))
}

/// One TCP service `web` on port 80 with `options` (TOML lines), served from the home server.
fn tcp_service(options: &str) -> (SocketAddr, String) {
    let service = sock(two::PROXY_CLIENT_SIDE, 80);
    let upstream = sock(two::HOME, HOME_PORT);
    (
        service,
        format!(
            "[[service]]\nname = \"web\"\nlisten = \"{service}\"\nprotocol = \"tcp\"\nupstreams = [\"{upstream}\"]\n{options}"
        ),
    )
}

#[test]
fn userspace_tcp_deny_refuses_the_denied_client() -> Result<()> {
    let _serial = serial();
    let mut topo = lab("pdeny")?;
    let upstream = sock(two::HOME, HOME_PORT);
    let home = HomeServer::start(&topo.home, upstream, None, CLIENT_LIMIT * 2)?;
    let (service, svc) = tcp_service(&format!("deny = [\"{OTHER_CLIENT}/32\"]\n"));
    let pin_dir = topo.lab.mount_bpffs()?;
    let config = format!("{}\n{svc}", two::base_config("userspace", &[], &pin_dir));
    let lab = &mut topo.lab;
    let daemon = Daemon::start(lab, &topo.proxy, &config)?;
    daemon.wait_log(lab, &["userspace L4 listening", "service=web"], 1, READY)?;
    let accepted_before = home.stats().accepted();
    let (allowed, denied) = topo.client.run(CLIENT_LIMIT, move || async move {
        let mut allowed = Vec::new();
        let mut denied = Vec::new();
        for _ in 0..3 {
            allowed.push(get_from(two::CLIENT, service).await?);
            denied.push(get_from(OTHER_CLIENT, service).await?);
        }
        Ok((allowed, denied))
    })?;
    println!("allowed client: {allowed:?}\ndenied client: {denied:?}");
    ensure!(allowed.iter().all(served_200), "{allowed:?}");
    ensure!(
        denied.iter().all(|o| *o == Outcome::Refused),
        "the denied client was served: {denied:?}"
    );
    // Refused before any upstream connect: the home server saw the allowed client's only.
    ensure!(
        home.stats().accepted() - accepted_before == 3,
        "home accepted {} connections, not 3",
        home.stats().accepted() - accepted_before
    );
    let m = admin_text(&topo.proxy, "/metrics")?;
    let denied_n = metric(
        &m,
        &refused_series("web", service, "tcp", "l4", "drop_acl_denied"),
    )?;
    let not_allowed_n = metric(
        &m,
        &refused_series("web", service, "tcp", "l4", "drop_acl_not_allowed"),
    )?;
    ensure!(denied_n == 3, "drop_acl_denied {denied_n}, not 3");
    ensure!(not_allowed_n == 0, "drop_acl_not_allowed {not_allowed_n}");
    let st = status_of(&topo.proxy, "web")?;
    ensure!(
        st["refused"]["drop_acl_denied"] == 3 && st["opened"] == 3,
        "/status: {st}"
    );
    let status = daemon.stop(lab)?;
    ensure!(status.success(), "daemon exited with {status}");
    home.stop()
}

#[test]
fn userspace_tcp_allow_list_admits_only_its_prefix() -> Result<()> {
    let _serial = serial();
    let mut topo = lab("pallow")?;
    let upstream = sock(two::HOME, HOME_PORT);
    let home = HomeServer::start(&topo.home, upstream, None, CLIENT_LIMIT * 2)?;
    let (service, svc) = tcp_service(&format!("allow = [\"{}/32\"]\n", two::CLIENT));
    let pin_dir = topo.lab.mount_bpffs()?;
    let config = format!("{}\n{svc}", two::base_config("userspace", &[], &pin_dir));
    let lab = &mut topo.lab;
    let daemon = Daemon::start(lab, &topo.proxy, &config)?;
    daemon.wait_log(lab, &["userspace L4 listening", "service=web"], 1, READY)?;
    let (inside, outside) = topo.client.run(CLIENT_LIMIT, move || async move {
        let inside = get_from(two::CLIENT, service).await?;
        let mut outside = Vec::new();
        for _ in 0..2 {
            outside.push(get_from(OTHER_CLIENT, service).await?);
        }
        Ok((inside, outside))
    })?;
    println!("inside: {inside:?}\noutside: {outside:?}");
    ensure!(served_200(&inside), "{inside:?}");
    ensure!(
        outside.iter().all(|o| *o == Outcome::Refused),
        "a client outside the allow list was served: {outside:?}"
    );
    let m = admin_text(&topo.proxy, "/metrics")?;
    let n = metric(
        &m,
        &refused_series("web", service, "tcp", "l4", "drop_acl_not_allowed"),
    )?;
    ensure!(n == 2, "drop_acl_not_allowed {n}, not 2");
    let status = daemon.stop(lab)?;
    ensure!(status.success(), "daemon exited with {status}");
    home.stop()
}

#[test]
fn userspace_tcp_rate_limit_refuses_past_the_burst() -> Result<()> {
    const ATTEMPTS: usize = 12;
    let _serial = serial();
    let mut topo = lab("prate")?;
    let upstream = sock(two::HOME, HOME_PORT);
    let home = HomeServer::start(&topo.home, upstream, None, CLIENT_LIMIT * 2)?;
    // One new connection per second per client, two at once.
    let (service, svc) = tcp_service("new_flow_rate = 1\nnew_flow_burst = 2\n");
    let pin_dir = topo.lab.mount_bpffs()?;
    let config = format!("{}\n{svc}", two::base_config("userspace", &[], &pin_dir));
    let lab = &mut topo.lab;
    let daemon = Daemon::start(lab, &topo.proxy, &config)?;
    daemon.wait_log(lab, &["userspace L4 listening", "service=web"], 1, READY)?;
    let (burst, other) = topo.client.run(CLIENT_LIMIT, move || async move {
        let mut burst = Vec::new();
        for _ in 0..ATTEMPTS {
            burst.push(get_from(OTHER_CLIENT, service).await?);
        }
        // Another client address: its own bucket, full.
        let other = get_from(two::CLIENT, service).await?;
        Ok((burst, other))
    })?;
    let served = burst.iter().filter(|o| served_200(o)).count();
    let refused = burst.iter().filter(|o| **o == Outcome::Refused).count();
    println!(
        "{ATTEMPTS} connections from one client: {served} served, {refused} refused; other client: {other:?}"
    );
    ensure!(served + refused == ATTEMPTS, "{burst:?}");
    ensure!(served >= 2, "the burst of 2 was not served: {burst:?}");
    ensure!(refused >= 1, "nothing refused past the burst: {burst:?}");
    ensure!(served_200(&other), "the other client: {other:?}");
    let m = admin_text(&topo.proxy, "/metrics")?;
    let n = metric(
        &m,
        &refused_series("web", service, "tcp", "l4", "drop_rate_limited"),
    )?;
    ensure!(
        n >= 1 && n == refused as u64,
        "drop_rate_limited {n}, the client saw {refused} refused"
    );
    let status = daemon.stop(lab)?;
    ensure!(status.success(), "daemon exited with {status}");
    home.stop()
}

/// Send `msg` on `s` and wait (bounded) for one answer; `None` when none came.
async fn ask(s: &UdpSocket, msg: &[u8]) -> Result<Option<Vec<u8>>> {
    let mut buf = [0u8; 2048];
    // A few tries: a lost datagram is not a refusal.
    for _ in 0..3 {
        s.send(msg).await.context("udp send")?;
        if let Ok(r) = timeout(Duration::from_millis(700), s.recv(&mut buf)).await {
            let n = r.context("udp recv")?;
            return Ok(Some(buf[..n].to_vec()));
        }
    }
    Ok(None)
}

async fn udp_from(src: Ipv4Addr, service: SocketAddr) -> Result<UdpSocket> {
    let s = UdpSocket::bind(SocketAddr::from((src, 0)))
        .await
        .with_context(|| format!("udp bind {src}"))?;
    s.connect(service).await.context("udp connect")?;
    Ok(s)
}

#[test]
fn userspace_udp_deny_keeps_open_sessions() -> Result<()> {
    let _serial = serial();
    let mut topo = lab("pudp")?;
    let upstream = sock(two::HOME, HOME_PORT);
    let home = HomeServer::start(&topo.home, upstream, Some(upstream), CLIENT_LIMIT * 2)?;
    let service = sock(two::PROXY_CLIENT_SIDE, 53);
    let dns = |options: &str| {
        format!(
            "[[service]]\nname = \"dns\"\nlisten = \"{service}\"\nprotocol = \"udp\"\nupstreams = [\"{upstream}\"]\n{options}"
        )
    };
    let pin_dir = topo.lab.mount_bpffs()?;
    let base = two::base_config("userspace", &[], &pin_dir);
    let lab = &mut topo.lab;
    let daemon = Daemon::start(lab, &topo.proxy, &format!("{base}\n{}", dns("")))?;
    daemon.wait_log(lab, &["userspace L4 listening", "service=dns"], 1, READY)?;

    // The soon-denied client opens a session while it is still admitted, and keeps its socket.
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let (opened_tx, opened_rx) = std::sync::mpsc::channel::<Result<()>>();
    let (result_tx, result_rx) = std::sync::mpsc::channel::<Result<Option<Vec<u8>>>>();
    let held = topo.client.spawn(CLIENT_LIMIT, move |_stop| async move {
        let s = udp_from(OTHER_CLIENT, service).await?;
        let first = ask(&s, b"before").await;
        let ok = match &first {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(anyhow!("no answer before the deny")),
            Err(e) => Err(anyhow!("{e:#}")),
        };
        let _ = opened_tx.send(ok);
        // Wait (bounded by the thread's limit) for the reload, then ask again on the same socket.
        for _ in 0..600 {
            if held_rx.try_recv().is_ok() {
                let _ = result_tx.send(ask(&s, b"after").await);
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(anyhow!("never told to ask again"))
    })?;
    opened_rx
        .recv_timeout(CLIENT_LIMIT)
        .context("the held session never reported")??;

    std::fs::write(
        &daemon.config,
        format!(
            "{base}\n{}",
            dns(&format!("deny = [\"{OTHER_CLIENT}/32\"]\n"))
        ),
    )
    .context("rewriting the config")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(daemon.pid)?),
        nix::sys::signal::Signal::SIGHUP,
    )
    .context("SIGHUP")?;
    daemon.wait_log(lab, &["admission rules reloaded", "service=dns"], 1, READY)?;
    held_tx.send(()).context("telling the held session")?;
    let after = result_rx
        .recv_timeout(CLIENT_LIMIT)
        .context("the held session never answered")??;
    held.join()?;
    println!("open session after the deny: {after:?}");
    ensure!(
        after.as_deref().is_some_and(|a| a.ends_with(b"after")),
        "the session opened before the deny was cut: {after:?}"
    );

    let (fresh, other) = topo.client.run(CLIENT_LIMIT, move || async move {
        let fresh = ask(&udp_from(OTHER_CLIENT, service).await?, b"new").await?;
        let other = ask(&udp_from(two::CLIENT, service).await?, b"other").await?;
        Ok((fresh, other))
    })?;
    println!("new session of the denied client: {fresh:?}; other client: {other:?}");
    ensure!(
        fresh.is_none(),
        "a new session of the denied client was answered"
    );
    ensure!(
        other.as_deref().is_some_and(|a| a.ends_with(b"other")),
        "the other client: {other:?}"
    );
    let m = admin_text(&topo.proxy, "/metrics")?;
    let n = metric(
        &m,
        &refused_series("dns", service, "udp", "l4", "drop_acl_denied"),
    )?;
    // `ask` sends up to 3 datagrams, each one refused.
    ensure!((1..=3).contains(&n), "drop_acl_denied {n}");
    let status = daemon.stop(lab)?;
    ensure!(status.success(), "daemon exited with {status}");
    home.stop()
}

/// TCP_MAXSEG of a connected socket: the MSS it sends with (the peer's advertised MSS bounds
/// it, less TCP options).
fn mss_of<S: std::os::fd::AsFd>(s: &S) -> Result<u32> {
    nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::TcpMaxSeg).context("TCP_MAXSEG")
}

#[test]
fn userspace_mss_clamp_on_both_sides() -> Result<()> {
    const CLAMP: u32 = 1000;
    const MSS_PORT: u16 = 8090;
    let _serial = serial();
    let mut topo = lab("pmss")?;
    // The upstream: tells each connection the MSS of its own (accepted) socket.
    let upstream = sock(two::HOME, MSS_PORT);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let home = topo
        .home
        .spawn(CLIENT_LIMIT * 2, move |mut stop| async move {
            let l = TcpListener::bind(upstream).await?;
            let _ = ready_tx.send(());
            for _ in 0..16 {
                let (mut s, _) = tokio::select! {
                    a = l.accept() => a?,
                    () = stop.wait() => return Ok(()),
                };
                let line = format!("{}\n", mss_of(&s)?);
                s.write_all(line.as_bytes()).await?;
                s.shutdown().await?;
            }
            Ok(())
        })?;
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("mss upstream not bound")?;
    let clamped = sock(two::PROXY_CLIENT_SIDE, 80);
    let plain = sock(two::PROXY_CLIENT_SIDE, 81);
    let pin_dir = topo.lab.mount_bpffs()?;
    let config = format!(
        "{}\n[[service]]\nname = \"clamped\"\nlisten = \"{clamped}\"\nupstreams = [\"{upstream}\"]\nmss_clamp = {CLAMP}\n\
         [[service]]\nname = \"plain\"\nlisten = \"{plain}\"\nupstreams = [\"{upstream}\"]\n",
        two::base_config("userspace", &[], &pin_dir)
    );
    let lab = &mut topo.lab;
    let daemon = Daemon::start(lab, &topo.proxy, &config)?;
    daemon.wait_log(lab, &["userspace L4 listening"], 2, READY)?;
    let measure = |service: SocketAddr| async move {
        let mut c = connect_from(two::CLIENT, service).await?;
        let client_mss = mss_of(&c)?;
        let mut text = String::new();
        timeout(IO, c.read_to_string(&mut text))
            .await
            .map_err(|_| anyhow!("no answer from the mss upstream"))??;
        let upstream_mss: u32 = text.trim().parse().with_context(|| format!("{text:?}"))?;
        anyhow::Ok((client_mss, upstream_mss))
    };
    let (with, without) = topo.client.run(CLIENT_LIMIT, move || async move {
        Ok((measure(clamped).await?, measure(plain).await?))
    })?;
    println!("mss (client side, upstream side): clamped {with:?}, plain {without:?}");
    ensure!(
        with.0 <= CLAMP && with.1 <= CLAMP,
        "mss_clamp = {CLAMP} not applied: {with:?}"
    );
    ensure!(
        without.0 > CLAMP && without.1 > CLAMP,
        "the unclamped service's MSS is not above {CLAMP} (the check above proves nothing): {without:?}"
    );
    let status = daemon.stop(lab)?;
    ensure!(status.success(), "daemon exited with {status}");
    home.stop_and_join()
}

#[test]
fn http_deny_refuses_the_denied_client() -> Result<()> {
    let _serial = serial();
    let mut topo = lab("phttp")?;
    let upstream = sock(two::HOME, HOME_PORT);
    let home = HomeServer::start(&topo.home, upstream, None, CLIENT_LIMIT * 2)?;
    let service = sock(two::PROXY_CLIENT_SIDE, 80);
    let pin_dir = topo.lab.mount_bpffs()?;
    let config = format!(
        "{}\n[[service]]\nname = \"app\"\nlisten = \"{service}\"\nmode = \"http\"\nupstreams = [\"{upstream}\"]\ndeny = [\"{OTHER_CLIENT}/32\"]\n",
        two::base_config("userspace", &[], &pin_dir)
    );
    let lab = &mut topo.lab;
    let daemon = Daemon::start(lab, &topo.proxy, &config)?;
    daemon.wait_log(lab, &["http proxy listening", "service=app"], 1, READY)?;
    let (allowed, denied) = topo.client.run(CLIENT_LIMIT, move || async move {
        let mut allowed = Vec::new();
        let mut denied = Vec::new();
        for _ in 0..2 {
            allowed.push(get_from(two::CLIENT, service).await?);
            denied.push(get_from(OTHER_CLIENT, service).await?);
        }
        Ok((allowed, denied))
    })?;
    println!("allowed client: {allowed:?}\ndenied client: {denied:?}");
    ensure!(allowed.iter().all(served_200), "{allowed:?}");
    ensure!(
        denied.iter().all(|o| *o == Outcome::Refused),
        "the denied client was served: {denied:?}"
    );
    let m = admin_text(&topo.proxy, "/metrics")?;
    let n = metric(
        &m,
        &refused_series("app", service, "tcp", "http", "drop_acl_denied"),
    )?;
    ensure!(n == 2, "drop_acl_denied {n}, not 2");
    let st = status_of(&topo.proxy, "app")?;
    ensure!(st["refused"]["drop_acl_denied"] == 2, "/status: {st}");
    let status = daemon.stop(lab)?;
    ensure!(status.success(), "daemon exited with {status}");
    home.stop()
}
