//! Namespace tests of the daemon's userspace data paths (the L4 scenarios shared with XDP live in
//! `namespace.rs`, parameterised by datapath):
//!
//! - `auto_falls_back_to_userspace_when_xdp_cannot_attach`: another program already holds the
//!   proxy's client-side interface through a bpf_link in driver mode, so the kernel refuses the
//!   daemon's native attachment (a bpf_link cannot be replaced: EBUSY) and its generic one
//!   (native and generic XDP cannot be active on one device at once); with `mode = "auto"` the
//!   daemon says so, undoes the attachment it made on the other interface, and serves the L4
//!   services in userspace; `/status`, `/metrics` and `xdp-proxy status` say so (and `status`
//!   exits 9 once the daemon is gone).
//!
//! - `userspace_l4_follows_health`: `mode = "userspace"` with a dead upstream beside a live one:
//!   once the control plane's health checks take it out, the userspace path (TCP and UDP)
//!   sends every new flow to the live one, as the fast path's Maglev table would.
//! - `userspace_l4_reload_adds_and_removes_services`: a SIGHUP that removes the TCP service and
//!   adds a UDP one: the first stops listening, the second is served.
//! - `http_routes_forwarded_headers_retry_and_503`: `mode = "http"`: routing by Host and by path
//!   prefix to upstream groups, X-Forwarded-For / X-Forwarded-Proto / Forwarded appended,
//!   hop-by-hop headers removed, a refused upstream retried on another, 503 for a group whose
//!   upstreams the health checks took out and for one whose upstreams refuse connections, 504
//!   for a silent upstream and an unreachable one, and the access log.
//! - `http_streams_50_mb_with_bounded_memory`: a 50 MB upload and a 50 MB download through the
//!   L7 proxy, every byte checked, while the daemon's peak RSS (VmHWM) stays under
//!   [`RSS_BOUND`].
//! - `http_alongside_xdp`: an http service served by the daemon while XDP is attached (the
//!   program passes what is not an l4 service to the kernel); `xdp-proxy status` says native.
//! - `http_reload_applies_routes`: a SIGHUP with changed routes sends the next requests to the
//!   new upstream group.
//! - `http_upstream_health_checked`: an http service's upstreams are health checked with its
//!   `[service.health]`: one of two stopped is taken out after `fall` checks and every later
//!   request goes to the other (no 502/503 in the access log); started again it is used again.
//! - `http_websocket_echo`: an Upgrade (WebSocket) request passed through; frames echoed.
//! - `http_upstream_response_framings`: responses to requests without a body (sent on plain
//!   upstream connections, not hyper's client) framed every way HTTP/1.1 allows: chunked with
//!   extensions and trailers, Content-Length, until close, 1xx before the response, 204, HEAD;
//!   the upstream connection reused after a body read to its end and not after a close; a
//!   conflicting Content-Length answered 502, a body cut short ends the client's transfer.
//!
//! Run as root: `cargo test -p integration-tests --test userspace -- --nocapture`.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use integration_tests::echo;
use integration_tests::netns::serial;
use integration_tests::netns::{self, Daemon, Netns, NsThread, TwoInterface, sock, two};
use integration_tests::soak::{admin_text, metric};
use integration_tests::traffic::{self, Conn, HomeServer, get_root_until_up};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

/// Peak RSS the daemon may reach while streaming 50 MB each way (bodies must stream, not
/// accumulate: buffering one of them whole would alone exceed it).
const RSS_BOUND_KIB: u64 = 64 * 1024;
/// The same, for the docs.
#[allow(dead_code, reason = "named in the module docs")]
const RSS_BOUND: &str = "64 MiB";
/// Size of each streamed transfer.
const STREAM_LEN: u64 = 50 * 1000 * 1000;

const HOME_PORT: u16 = 8080;
/// Bound of one test's client side.
const CLIENT_LIMIT: Duration = Duration::from_secs(120);
const READY: Duration = Duration::from_secs(30);

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
    Ok(())
}

#[test]
fn auto_falls_back_to_userspace_when_xdp_cannot_attach() -> Result<()> {
    let _serial = serial();
    let mut topo = TwoInterface::new("fallback")?;
    let id = topo.lab.id().to_owned();
    // The interface XDP cannot attach to: someone else's program holds it.
    let holder = netns::attach_pass_program(&topo.proxy, two::PROXY_CLIENT_DEV)
        .context("attaching the program that blocks the daemon's")?;
    topo.lab.hold(holder);
    let before = xdp_prog_ids(&topo.proxy, two::PROXY_CLIENT_DEV)?;
    ensure!(
        before.len() == 1,
        "the blocking program is not attached: {before:?}"
    );

    let tcp_service = sock(two::PROXY_CLIENT_SIDE, 80);
    let udp_service = sock(two::PROXY_CLIENT_SIDE, 53);
    let upstream = sock(two::HOME, HOME_PORT);
    let home = HomeServer::start(&topo.home, upstream, Some(upstream), CLIENT_LIMIT * 2)?;
    let pin_dir = topo.lab.mount_bpffs()?;
    // The home side first: that attachment succeeds and must be undone by the fallback.
    let config = format!(
        "{}
[[service]]
name = \"web\"
listen = \"{tcp_service}\"
protocol = \"tcp\"
upstreams = [\"{upstream}\"]

[[service]]
name = \"dns\"
listen = \"{udp_service}\"
protocol = \"udp\"
upstreams = [\"{upstream}\"]
",
        two::base_config(
            "auto",
            &[two::PROXY_HOME_DEV, two::PROXY_CLIENT_DEV],
            &pin_dir
        )
    );
    let lab = &mut topo.lab;
    let daemon = Daemon::start(lab, &topo.proxy, &config)?;
    let said = daemon.wait_log(
        lab,
        &["XDP cannot attach", "falling back to the userspace L4 path"],
        1,
        READY,
    )?;
    println!("daemon: {}", said[0]);
    ensure!(
        said[0].contains(two::PROXY_CLIENT_DEV),
        "the fallback line does not name the interface {}: {}",
        two::PROXY_CLIENT_DEV,
        said[0]
    );
    let active = daemon.wait_log(lab, &["datapath active", "userspace"], 1, READY)?;
    println!("daemon: {}", active[0]);
    daemon.wait_log(lab, &["userspace L4 listening"], 2, READY)?;

    // The admin endpoints say which datapath is active.
    let status = admin_text(&topo.proxy, "/status")?;
    let status: serde_json::Value =
        serde_json::from_str(&status).with_context(|| format!("/status: {status}"))?;
    ensure!(
        status["datapath"]["mode"] == "userspace",
        "/status datapath: {}",
        status["datapath"]
    );
    let metrics = admin_text(&topo.proxy, "/metrics")?;
    ensure!(
        metrics
            .lines()
            .any(|l| l == r#"xdp_proxy_datapath_mode{mode="userspace"} 1"#),
        "/metrics has no xdp_proxy_datapath_mode{{mode=\"userspace\"}} 1"
    );
    // And so does the CLI (`xdp-proxy status`, default admin address), table and JSON.
    let table = cli_status(&topo.proxy, &[])?;
    println!("xdp-proxy status:\n{table}");
    ensure!(
        table.lines().next() == Some("datapath:   userspace"),
        "`status` does not say userspace:\n{table}"
    );
    ensure!(
        table
            .lines()
            .any(|l| l.starts_with("web ") && l.contains(&upstream.to_string())),
        "`status` does not list the service web and its upstream:\n{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&cli_status(&topo.proxy, &["--json"])?).context("`status --json`")?;
    ensure!(
        json["datapath"]["mode"] == "userspace",
        "`status --json`: {}",
        json["datapath"]
    );

    // The daemon left nothing attached; the other program is still the one attached.
    ensure!(
        !netns::has_xdp(&topo.proxy, two::PROXY_HOME_DEV)?,
        "the daemon's attachment to {} was not undone by the fallback",
        two::PROXY_HOME_DEV
    );
    ensure!(
        xdp_prog_ids(&topo.proxy, two::PROXY_CLIENT_DEV)? == before,
        "the program on {} changed",
        two::PROXY_CLIENT_DEV
    );

    // The services answer, through the userspace path: the home host sees the SNAT address.
    let (body, udp) = topo.client.run(CLIENT_LIMIT, move || async move {
        let body = get_root_until_up(tcp_service).await?;
        let udp = traffic::udp_exchange(udp_service, 2, 3, 5).await?;
        Ok((body, udp))
    })?;
    println!("GET /: {}", body.trim());
    ensure!(
        body.contains(&format!("you came from {}:", two::PROXY_HOME_SIDE)),
        "home saw another source: {body}"
    );
    ensure!(udp.requests == 6, "udp: {} requests answered", udp.requests);
    // The userspace counters moved with that traffic (/metrics).
    let metrics = admin_text(&topo.proxy, "/metrics")?;
    let web = format!("service=\"web\",listen=\"{tcp_service}\",protocol=\"tcp\",layer=\"l4\"");
    let dns = format!("service=\"dns\",listen=\"{udp_service}\",protocol=\"udp\",layer=\"l4\"");
    for (series, at_least) in [
        (format!("xdp_proxy_userspace_connections_total{{{web}}}"), 1),
        (
            format!("xdp_proxy_userspace_bytes_total{{{web},direction=\"to_client\"}}"),
            body.len() as u64,
        ),
        (
            format!("xdp_proxy_userspace_bytes_total{{{web},direction=\"to_upstream\"}}"),
            1,
        ),
        (format!("xdp_proxy_userspace_connections_total{{{dns}}}"), 1),
        (
            format!("xdp_proxy_userspace_bytes_total{{{dns},direction=\"to_client\"}}"),
            1,
        ),
        (
            format!(
                "xdp_proxy_userspace_upstream_connections_total{{service=\"web\",layer=\"l4\",upstream=\"{upstream}\"}}"
            ),
            1,
        ),
    ] {
        let v = metric(&metrics, &series)?;
        ensure!(v >= at_least, "{series} = {v}, want at least {at_least}");
    }
    ensure!(
        metric(
            &metrics,
            &format!("xdp_proxy_userspace_connect_failures_total{{{web}}}")
        )? == 0,
        "connect failures counted without any"
    );
    ensure!(
        home.stats().peer_ips() == BTreeSet::from([IpAddr::V4(two::PROXY_HOME_SIDE)]),
        "home saw peers {:?}",
        home.stats().peer_ips()
    );

    let status = daemon.stop(lab)?;
    ensure!(
        status.success(),
        "daemon exited with {status}\n{}",
        lab.log_tail(daemon.pid, 20)
    );
    // With the daemon gone, `status` says it cannot reach it, with its own exit code.
    let out = topo
        .proxy
        .command(netns::daemon_binary()?)?
        .arg("status")
        .output()
        .context("running xdp-proxy status")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(9) && stderr.contains("cannot reach"),
        "`status` without a daemon: {} {stderr}",
        out.status
    );
    home.stop()?;
    drop(topo);
    check_cleaned(&id)
}

/// `xdp-proxy status ARGS` inside `ns` (the admin listener's default address): its stdout.
fn cli_status(ns: &Netns, args: &[&str]) -> Result<String> {
    let bin = netns::daemon_binary()?;
    let mut all = vec!["status"];
    all.extend_from_slice(args);
    netns::run_cmd(ns.command(bin)?.args(&all))
}

/// The XDP program ids `ip -d link` shows on `dev`.
fn xdp_prog_ids(ns: &Netns, dev: &str) -> Result<Vec<String>> {
    let out = ns.ip(&["-d", "link", "show", "dev", dev])?;
    Ok(out
        .split("prog/xdp id ")
        .skip(1)
        .filter_map(|s| s.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

#[test]
fn userspace_l4_follows_health() -> Result<()> {
    let _serial = serial();
    let mut topo = TwoInterface::new("ushealth")?;
    let id = topo.lab.id().to_owned();
    let live = sock(two::HOME, HOME_PORT);
    // Nothing listens there (TCP or UDP).
    let dead = sock(two::HOME, 8083);
    let home = HomeServer::start(&topo.home, live, Some(live), CLIENT_LIMIT * 2)?;
    let tcp_service = sock(two::PROXY_CLIENT_SIDE, 80);
    let udp_service = sock(two::PROXY_CLIENT_SIDE, 53);
    let health = "[service.health]\nkind = \"tcp\"\ninterval = \"300ms\"\ntimeout = \"250ms\"\nfall = 2\nrise = 1\n";
    let pin_dir = topo.lab.mount_bpffs()?;
    let config = format!(
        "{}
[[service]]
name = \"web\"
listen = \"{tcp_service}\"
protocol = \"tcp\"
upstreams = [\"{live}\", \"{dead}\"]
{health}
[[service]]
name = \"dns\"
listen = \"{udp_service}\"
protocol = \"udp\"
upstreams = [\"{live}\", \"{dead}\"]
{health}",
        two::base_config("userspace", &[], &pin_dir)
    );
    let lab = &mut topo.lab;
    let daemon = Daemon::start(lab, &topo.proxy, &config)?;
    for svc in ["web", "dns"] {
        let line = daemon.wait_log(
            lab,
            &[
                "userspace L4: upstream set changed",
                &format!("service={svc} "),
                &format!("upstreams=[{live}]"),
            ],
            1,
            READY,
        )?;
        println!("daemon: {}", line[0]);
    }
    let failed_before = lab
        .log_text(daemon.pid)
        .lines()
        .filter(|l| l.contains("upstream connect failed"))
        .count();
    let (answers, udp) = topo.client.run(CLIENT_LIMIT, move || async move {
        let mut answers = 0;
        for _ in 0..40 {
            let mut c = Conn::connect(tcp_service, Duration::from_secs(5)).await?;
            let (status, _) = c.get_text("/").await?;
            ensure!(status.contains(" 200 "), "GET /: {status}");
            answers += 1;
        }
        // Each socket is its own flow; without the health state about half of them would go
        // to the dead upstream and never be answered.
        let udp = traffic::udp_exchange(udp_service, 16, 2, 9).await?;
        Ok((answers, udp))
    })?;
    let failed_after = lab
        .log_text(daemon.pid)
        .lines()
        .filter(|l| l.contains("upstream connect failed"))
        .count();
    println!(
        "{answers} TCP connections answered; udp {} requests on {} flows, {} retries",
        udp.requests, udp.sockets, udp.retries
    );
    ensure!(
        answers == 40 && udp.requests == 32,
        "not every flow was answered"
    );
    ensure!(
        failed_after == failed_before,
        "{} connects to the dead upstream after it left the table",
        failed_after - failed_before
    );
    let status = daemon.stop(lab)?;
    ensure!(status.success(), "daemon exited with {status}");
    home.stop()?;
    drop(topo);
    check_cleaned(&id)
}

#[test]
fn userspace_l4_reload_adds_and_removes_services() -> Result<()> {
    let _serial = serial();
    let mut topo = TwoInterface::new("usreload")?;
    let id = topo.lab.id().to_owned();
    let upstream = sock(two::HOME, HOME_PORT);
    let home = HomeServer::start(&topo.home, upstream, Some(upstream), CLIENT_LIMIT * 2)?;
    let tcp_service = sock(two::PROXY_CLIENT_SIDE, 80);
    let udp_service = sock(two::PROXY_CLIENT_SIDE, 53);
    let pin_dir = topo.lab.mount_bpffs()?;
    let web = format!(
        "[[service]]\nname = \"web\"\nlisten = \"{tcp_service}\"\nupstreams = [\"{upstream}\"]\n"
    );
    let dns = format!(
        "[[service]]\nname = \"dns\"\nlisten = \"{udp_service}\"\nprotocol = \"udp\"\nupstreams = [\"{upstream}\"]\n"
    );
    let base = two::base_config("userspace", &[], &pin_dir);
    let lab = &mut topo.lab;
    let daemon = Daemon::start(lab, &topo.proxy, &format!("{base}{web}"))?;
    daemon.wait_log(lab, &["userspace L4 listening", "service=web"], 1, READY)?;
    let body = topo.client.run(CLIENT_LIMIT, move || async move {
        get_root_until_up(tcp_service).await
    })?;
    ensure!(body.contains("hello from home"), "before: {body}");

    std::fs::write(&daemon.config, format!("{base}{dns}")).context("rewriting the config")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(daemon.pid)?),
        nix::sys::signal::Signal::SIGHUP,
    )
    .context("SIGHUP")?;
    daemon.wait_log(lab, &["service removed", "service=web"], 1, READY)?;
    daemon.wait_log(lab, &["userspace L4 listening", "service=dns"], 1, READY)?;
    let (udp, refused) = topo.client.run(CLIENT_LIMIT, move || async move {
        let udp = traffic::udp_exchange(udp_service, 2, 2, 3).await?;
        let refused = Conn::connect(tcp_service, Duration::from_secs(2))
            .await
            .is_err();
        Ok((udp, refused))
    })?;
    ensure!(
        udp.requests == 4,
        "udp after reload: {} answered",
        udp.requests
    );
    ensure!(refused, "the removed TCP service still accepts connections");

    let status = daemon.stop(lab)?;
    ensure!(status.success(), "daemon exited with {status}");
    home.stop()?;
    drop(topo);
    check_cleaned(&id)
}

// ---------------------------------------------------------------------------------------------
// L7.
// ---------------------------------------------------------------------------------------------

/// Echo upstreams in the home namespace: `(name, port)`; each answers any request with its
/// name, the peer it saw and the request head it received; `Upgrade: websocket` requests get a
/// 101 and their frames echoed.
fn start_echo(home: &Netns, servers: &[(&'static str, u16)]) -> Result<NsThread<()>> {
    echo::start(home, servers, CLIENT_LIMIT * 2, echo_conn)
}

async fn echo_conn(s: TcpStream, peer: SocketAddr, name: &'static str) -> Result<()> {
    let mut s = BufReader::new(s);
    // Bounded: each turn consumes one request head; the thread's limit bounds the rest.
    while let Some(head) = echo::read_head(&mut s, false).await? {
        if name == "silent" {
            // Takes the request, never answers (bounded by the thread's limit).
            std::future::pending::<()>().await;
        }
        if name == "framing" {
            let (response, close) = framing_response(&head, peer);
            s.write_all(&response).await?;
            s.flush().await?;
            if close {
                return Ok(());
            }
            continue;
        }
        let websocket = head
            .iter()
            .any(|l| l.eq_ignore_ascii_case("upgrade: websocket"));
        if websocket {
            s.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
            )
            .await?;
            s.flush().await?;
            return ws_echo(s).await;
        }
        s.write_all(&echo::answer(name, peer, &head)).await?;
        s.flush().await?;
    }
    Ok(())
}

/// The "framing" upstream's answer to `head` (by path), and whether it closes after it.
fn framing_response(head: &[String], peer: SocketAddr) -> (Vec<u8>, bool) {
    let line = head.first().map_or("", String::as_str);
    let head_request = line.starts_with("HEAD ");
    let path = line.split(' ').nth(1).unwrap_or("/");
    let length = |body: &str| {
        let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
        if !head_request {
            r.push_str(body);
        }
        r
    };
    let r = match path {
        "/chunked" => {
            let (a, b) = (format!("chunked peer={peer}\n"), "second chunk\n");
            format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n\
                 0\r\nX-Trailer: t\r\n\r\n",
                a.len(),
                b.len()
            )
        }
        "/length" => length(&format!("length peer={peer}\n")),
        "/close" => {
            return (
                format!("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close peer={peer}\n")
                    .into_bytes(),
                true,
            );
        }
        "/early" => format!(
            "HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n{}",
            length("after early hints\n")
        ),
        "/nocontent" => "HTTP/1.1 204 No Content\r\nX-Framing: none\r\n\r\n".to_owned(),
        "/badlength" => {
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello".to_owned()
        }
        "/short" => {
            return (
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort".to_vec(),
                true,
            );
        }
        _ => length("no such framing\n"),
    };
    (r.into_bytes(), false)
}

/// Echo WebSocket frames (short ones: payload < 126 bytes) until a close frame.
async fn ws_echo(mut s: BufReader<TcpStream>) -> Result<()> {
    for _ in 0..1000 {
        let mut hdr = [0u8; 2];
        s.read_exact(&mut hdr).await?;
        let opcode = hdr[0] & 0x0f;
        ensure!(hdr[1] & 0x80 != 0, "client frame not masked");
        let len = usize::from(hdr[1] & 0x7f);
        ensure!(len < 126, "long frames not supported here");
        let mut mask = [0u8; 4];
        s.read_exact(&mut mask).await?;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await?;
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        let mut out = vec![0x80 | opcode, u8::try_from(len)?];
        out.extend_from_slice(&payload);
        s.write_all(&out).await?;
        s.flush().await?;
        if opcode == 8 {
            return Ok(());
        }
    }
    bail!("too many frames")
}

/// `curl` in `ns`: the status code and the body.
fn curl(ns: &Netns, args: &[&str]) -> Result<(u16, String)> {
    let mut all = vec!["-sS", "--max-time", "10", "-w", "\n%{http_code}"];
    all.extend_from_slice(args);
    let out = ns.exec("curl", &all)?;
    let (body, code) = out
        .rsplit_once('\n')
        .ok_or_else(|| anyhow!("curl output without a status: {out:?}"))?;
    Ok((code.trim().parse().context("curl status")?, body.to_owned()))
}

fn http_service(upstreams: &[SocketAddr], extra: &str) -> String {
    let ups = upstreams
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "
[[service]]
name = \"app\"
listen = \"{listen}\"
mode = \"http\"
upstreams = [{ups}]
{extra}",
        listen = sock(two::PROXY_CLIENT_SIDE, 80)
    )
}

/// Start the daemon in userspace mode with `services`; wait for the http listener.
fn start_http_daemon(topo: &mut TwoInterface, services: &str) -> Result<Daemon> {
    start_http_daemon_with(topo, services, None)
}

/// [`start_http_daemon`] with `XDP_PROXY_WORKER_THREADS` set when `workers` is given.
fn start_http_daemon_with(
    topo: &mut TwoInterface,
    services: &str,
    workers: Option<usize>,
) -> Result<Daemon> {
    let pin_dir = topo.lab.mount_bpffs()?;
    let config = format!("{}{services}", two::base_config("userspace", &[], &pin_dir));
    let daemon = Daemon::start_with_workers(&mut topo.lab, &topo.proxy, &config, workers, &[])?;
    daemon.wait_log(&mut topo.lab, &["http proxy listening"], 1, READY)?;
    Ok(daemon)
}

#[test]
fn http_routes_forwarded_headers_retry_and_503() -> Result<()> {
    let _serial = serial();
    let mut topo = TwoInterface::new("http")?;
    let id = topo.lab.id().to_owned();
    let echo = start_echo(
        &topo.home,
        &[
            ("alpha", 8081),
            ("beta", 8082),
            ("gamma", 8084),
            ("silent", 8085),
        ],
    )?;
    let up = |port| sock(two::HOME, port);
    // 8083: nothing listens there (connections refused).
    let routes = format!(
        "[service.http]
connect_timeout = \"1s\"
header_timeout = \"1s\"

[[service.route]]
host = \"a.example\"
upstreams = [\"{a}\"]

[[service.route]]
path_prefix = \"/b/\"
upstreams = [\"{b}\"]

[[service.route]]
path_prefix = \"/retry/\"
upstreams = [\"{down}\", \"{a}\"]

[[service.route]]
path_prefix = \"/down/\"
upstreams = [\"{down}\"]

[[service.route]]
path_prefix = \"/slow/\"
upstreams = [\"{silent}\"]

[[service.route]]
path_prefix = \"/nowhere/\"
upstreams = [\"{nowhere}\"]

[[service.route]]
path_prefix = \"/sick/\"
upstreams = [\"{sick}\"]

# The refused and unreachable upstreams must stay in use for the 503/504 checks below: no
# checks of this service's own upstreams.
[service.health]
kind = \"none\"

# An l4 service whose health checks cover the /sick/ upstream: the L7 proxy reads the same
# health state.
[[service]]
name = \"probe\"
listen = \"{probe}\"
upstreams = [\"{sick}\"]
[service.health]
kind = \"tcp\"
interval = \"300ms\"
timeout = \"250ms\"
fall = 2
",
        a = up(8081),
        b = up(8082),
        down = up(8083),
        sick = up(8086),
        probe = sock(two::PROXY_CLIENT_SIDE, 81),
        silent = up(8085),
        // In the home subnet, no host: the connect waits for ARP (about 3 s) until the
        // 1 s connect timeout ends it.
        nowhere = sock(std::net::Ipv4Addr::new(10, 200, 0, 99), 80),
    );
    let daemon = start_http_daemon(&mut topo, &http_service(&[up(8084)], &routes))?;
    let sick = up(8086).to_string();
    let base = format!("http://{}", two::PROXY_CLIENT_SIDE);
    let client = &topo.client;

    // Routing: by host, by path, the first matching route wins, else the default group.
    let get = |host: &str, path: &str| -> Result<(u16, String)> {
        curl(
            client,
            &["-H", &format!("Host: {host}"), &format!("{base}{path}")],
        )
    };
    for (host, path, want) in [
        ("a.example", "/", "alpha"),
        ("A.Example:80", "/x", "alpha"),
        ("other.example", "/b/1", "beta"),
        ("a.example", "/b/1", "alpha"),
        ("other.example", "/c", "gamma"),
        ("other.example", "/b", "gamma"),
    ] {
        let (code, body) = get(host, path)?;
        ensure!(
            code == 200 && body.starts_with(&format!("name={want}\n")),
            "Host {host} {path}: want {want}, got {code}: {body}"
        );
    }

    // Forwarding headers appended, hop-by-hop headers removed, the SNAT address as peer.
    let (code, body) = curl(
        client,
        &[
            "-H",
            "Host: a.example",
            "-H",
            "X-Forwarded-For: 192.0.2.7",
            "-H",
            "Connection: keep-alive, X-Drop-Me",
            "-H",
            "X-Drop-Me: secret",
            "-H",
            "Keep-Alive: timeout=5",
            "-H",
            "Proxy-Connection: keep-alive",
            "-H",
            "X-Keep-Me: yes",
            &format!("{base}/headers"),
        ],
    )?;
    println!("upstream saw:\n{body}");
    ensure!(code == 200, "GET /headers: {code}");
    let lines: Vec<String> = body.lines().map(str::to_ascii_lowercase).collect();
    let has = |l: &str| lines.iter().any(|x| x == l);
    let client_ip = two::CLIENT;
    for want in [
        format!("x-forwarded-for: 192.0.2.7, {client_ip}"),
        "x-forwarded-proto: http".to_owned(),
        format!("forwarded: for={client_ip};proto=http;host=a.example"),
        "x-keep-me: yes".to_owned(),
        "host: a.example".to_owned(),
    ] {
        ensure!(has(&want), "upstream did not see `{want}`:\n{body}");
    }
    for gone in ["x-drop-me", "keep-alive", "proxy-connection"] {
        ensure!(
            !lines.iter().any(|l| l.starts_with(&format!("{gone}:"))),
            "hop-by-hop header {gone} reached the upstream:\n{body}"
        );
    }
    ensure!(
        has(&format!("peer={}", two::PROXY_HOME_SIDE).to_ascii_lowercase())
            || lines
                .iter()
                .any(|l| l.starts_with(&format!("peer={}:", two::PROXY_HOME_SIDE))),
        "upstream saw another peer than the SNAT address:\n{body}"
    );

    // A refused upstream: GETs retried on the other one, every answer from it.
    for i in 0..4 {
        let (code, body) = get("other.example", &format!("/retry/{i}"))?;
        ensure!(
            code == 200 && body.starts_with("name=alpha\n"),
            "GET /retry/{i}: {code} {body}"
        );
    }
    let retried = daemon.wait_log(
        &mut topo.lab,
        &[
            "upstream request failed",
            &up(8083).to_string(),
            "retry=true",
        ],
        1,
        READY,
    )?;
    println!("daemon: {}", retried[0]);
    let twice = daemon.wait_log(
        &mut topo.lab,
        &["access", "path=\"/retry/", "attempts=2", "status=200"],
        1,
        READY,
    )?;
    println!("daemon: {}", twice[0]);

    // The health checks took the only upstream of the group out: 503 without trying it.
    daemon.wait_log(
        &mut topo.lab,
        &["upstream unhealthy", sick.as_str()],
        1,
        READY,
    )?;
    let (code, body) = get("other.example", "/sick/x")?;
    ensure!(
        code == 503 && body.contains("no healthy upstream"),
        "GET /sick/x: {code} {body}"
    );

    // No upstream of the group accepts connections: 503 with a clear body, for GET and POST.
    let (code, body) = get("other.example", "/down/x")?;
    ensure!(
        code == 503 && body.contains("no upstream accepted the connection"),
        "GET /down/x: {code} {body}"
    );
    let (code, body) = curl(
        client,
        &["-X", "POST", "-d", "x=1", &format!("{base}/down/y")],
    )?;
    ensure!(code == 503, "POST /down/y: {code} {body}");

    // Timeouts: the upstream takes the request and never answers; the connect never completes.
    let (code, body) = get("other.example", "/slow/x")?;
    ensure!(
        code == 504 && body.contains("upstream did not answer in time"),
        "GET /slow/x: {code} {body}"
    );
    let (code, body) = get("other.example", "/nowhere/x")?;
    ensure!(
        code == 504 && body.contains("connect timed out"),
        "GET /nowhere/x: {code} {body}"
    );

    // The client's header timeout (1 s) on a keep-alive connection: a head that never ends is
    // cut off, counted from the start of that head, not from an earlier request's (the
    // connection's one timer was first set for the first request).
    let service = sock(two::PROXY_CLIENT_SIDE, 80);
    let (cut_after, first_to_cut) = client.run(CLIENT_LIMIT, move || async move {
        let mut s = BufReader::new(TcpStream::connect(service).await?);
        let first = std::time::Instant::now();
        for i in 0..2 {
            if i == 1 {
                tokio::time::sleep(Duration::from_millis(600)).await;
            }
            s.write_all(b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n")
                .await?;
            let mut len = None;
            loop {
                let mut line = String::new();
                ensure!(s.read_line(&mut line).await? > 0, "closed mid-response");
                let l = line.trim().to_ascii_lowercase();
                if l.is_empty() {
                    break;
                }
                if let Some(v) = l.strip_prefix("content-length:") {
                    len = Some(v.trim().parse::<usize>()?);
                }
            }
            let mut body = vec![0u8; len.context("no content-length")?];
            s.read_exact(&mut body).await?;
        }
        let partial = std::time::Instant::now();
        s.write_all(b"GET / HTTP/1.1\r\nHost: other.example\r\n")
            .await?;
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
            .await
            .context("the unfinished head was never cut off")??;
        Ok((partial.elapsed(), first.elapsed()))
    })?;
    println!(
        "unfinished head cut off after {cut_after:?} ({first_to_cut:?} after the first request)"
    );
    ensure!(
        cut_after >= Duration::from_millis(800),
        "an unfinished head was cut off after {cut_after:?}: the header timeout is 1 s"
    );

    // The L7 counters (/metrics) moved with those requests: answers by class, the refused
    // upstream's connect failures, requests per upstream, the 503 without trying.
    let metrics = admin_text(&topo.proxy, "/metrics")?;
    let app = format!(
        "service=\"app\",listen=\"{}\",protocol=\"tcp\",layer=\"http\"",
        sock(two::PROXY_CLIENT_SIDE, 80)
    );
    let upstream_series = |name: &str, port| {
        format!(
            "{name}{{service=\"app\",layer=\"http\",upstream=\"{}\"}}",
            up(port)
        )
    };
    for (series, at_least) in [
        (
            format!("xdp_proxy_userspace_http_responses_total{{{app},class=\"2xx\"}}"),
            11,
        ),
        (
            format!("xdp_proxy_userspace_http_responses_total{{{app},class=\"5xx\"}}"),
            5,
        ),
        (
            format!("xdp_proxy_userspace_connections_total{{{app}}}"),
            16,
        ),
        (
            format!("xdp_proxy_userspace_bytes_total{{{app},direction=\"to_client\"}}"),
            1,
        ),
        (format!("xdp_proxy_userspace_no_upstream_total{{{app}}}"), 1),
        // /retry/ (round robin: at least one of the four tried 8083 first), /down/ twice,
        // /nowhere/ once.
        (
            format!("xdp_proxy_userspace_connect_failures_total{{{app}}}"),
            4,
        ),
        (
            upstream_series("xdp_proxy_userspace_upstream_connect_failures_total", 8083),
            3,
        ),
        (
            upstream_series("xdp_proxy_userspace_upstream_connections_total", 8081),
            7,
        ),
    ] {
        let v = metric(&metrics, &series)?;
        ensure!(v >= at_least, "{series} = {v}, want at least {at_least}");
    }

    daemon.stop_ok(&mut topo.lab)?;
    echo.stop_and_join()?;
    drop(topo);
    check_cleaned(&id)
}

/// Poll `xdp-proxy status --json` (bounded: 100 tries, 100 ms apart) until the health of
/// `service`'s upstream `addr` is `healthy`.
fn wait_health(ns: &Netns, service: &str, addr: SocketAddr, healthy: bool) -> Result<()> {
    let mut last = serde_json::Value::Null;
    for _ in 0..100 {
        let doc: serde_json::Value =
            serde_json::from_str(&cli_status(ns, &["--json"])?).context("`status --json`")?;
        let ups = doc["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == service))
            .map(|s| s["upstreams"].clone())
            .unwrap_or_default();
        if ups
            .as_array()
            .into_iter()
            .flatten()
            .any(|u| u["resolved"] == addr.to_string().as_str() && u["healthy"] == healthy)
        {
            return Ok(());
        }
        last = ups;
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{service} upstream {addr} never became healthy={healthy} in /status: {last}")
}

/// `mode = "http"` upstreams are health checked like l4 ones (same `[service.health]`): one of
/// two stops; after `fall` failed checks it is out and every request goes to the other, not
/// one answered 502/503; started again, it comes back after `rise` good checks.
#[test]
fn http_upstream_health_checked() -> Result<()> {
    let _serial = serial();
    let mut topo = TwoInterface::new("httphc")?;
    let id = topo.lab.id().to_owned();
    let alpha = start_echo(&topo.home, &[("alpha", 8081)])?;
    let beta = start_echo(&topo.home, &[("beta", 8082)])?;
    let (a, b) = (sock(two::HOME, 8081), sock(two::HOME, 8082));
    let health = "[service.health]
kind = \"tcp\"
interval = \"300ms\"
timeout = \"250ms\"
fall = 2
rise = 2
";
    let daemon = start_http_daemon(&mut topo, &http_service(&[a, b], health))?;
    let url = format!("http://{}/", two::PROXY_CLIENT_SIDE);
    let names = |n: usize| -> Result<Vec<String>> {
        (0..n)
            .map(|i| {
                let (code, body) = curl(&topo.client, &[&url])?;
                ensure!(code == 200, "request {i}: {code} {body}");
                Ok(body.lines().next().unwrap_or_default().to_owned())
            })
            .collect()
    };
    let seen: BTreeSet<String> = names(4)?.into_iter().collect();
    ensure!(
        seen == BTreeSet::from(["name=alpha".to_owned(), "name=beta".to_owned()]),
        "round robin over both: {seen:?}"
    );
    wait_health(&topo.proxy, "app", b, true)?;

    // beta stops: taken out by the checks, then no request reaches it and none fails.
    beta.stop_and_join()?;
    let said = daemon.wait_log(
        &mut topo.lab,
        &["upstream unhealthy", "http proxy", &b.to_string()],
        1,
        READY,
    )?;
    println!("daemon: {}", said[0]);
    wait_health(&topo.proxy, "app", b, false)?;
    let after = names(12)?;
    ensure!(
        after.iter().all(|n| n == "name=alpha"),
        "requests after beta was taken out: {after:?}"
    );
    let log = topo.lab.log_text(daemon.pid);
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("access") && (l.contains("status=502") || l.contains("status=503")))
        .collect();
    ensure!(bad.is_empty(), "502/503 answered: {bad:?}");

    // beta back: healthy again after `rise` checks, and used again.
    let beta = start_echo(&topo.home, &[("beta", 8082)])?;
    daemon.wait_log(
        &mut topo.lab,
        &["upstream healthy again", &b.to_string()],
        1,
        READY,
    )?;
    wait_health(&topo.proxy, "app", b, true)?;
    let back: BTreeSet<String> = names(4)?.into_iter().collect();
    ensure!(back.contains("name=beta"), "beta not used again: {back:?}");

    daemon.stop_ok(&mut topo.lab)?;
    alpha.stop_and_join()?;
    beta.stop_and_join()?;
    drop(topo);
    check_cleaned(&id)
}

/// VmHWM (peak resident set) of `pid`, in KiB.
fn vm_hwm_kib(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmHWM in /proc/{pid}/status"))
}

#[test]
fn http_streams_50_mb_with_bounded_memory() -> Result<()> {
    let _serial = serial();
    let mut topo = TwoInterface::new("httpbig")?;
    let id = topo.lab.id().to_owned();
    let upstream = sock(two::HOME, HOME_PORT);
    let home = HomeServer::start(&topo.home, upstream, None, CLIENT_LIMIT * 2)?;
    let daemon = start_http_daemon(&mut topo, &http_service(&[upstream], ""))?;
    let before = vm_hwm_kib(daemon.pid)?;
    let service = sock(two::PROXY_CLIENT_SIDE, 80);
    let (up, down) = topo.client.run(CLIENT_LIMIT, move || async move {
        let mut c = Conn::connect(service, Duration::from_secs(5)).await?;
        let up = c.put_sink(11, STREAM_LEN).await.context("50 MB upload")?;
        // Same connection: keep-alive through the proxy.
        let down = c.get_blob(12, STREAM_LEN).await.context("50 MB download")?;
        Ok((up, down))
    })?;
    let after = vm_hwm_kib(daemon.pid)?;
    println!(
        "50 MB up (checksum {up:016x}) and down (checksum {down:016x}); daemon VmHWM {before} kB \
         before, {after} kB after (bound {RSS_BOUND_KIB} kB)"
    );
    ensure!(
        home.stats().bytes_received() == STREAM_LEN && home.stats().sink_mismatches() == 0,
        "home received {} bytes, {} mismatches",
        home.stats().bytes_received(),
        home.stats().sink_mismatches()
    );
    ensure!(
        after < RSS_BOUND_KIB,
        "daemon peak RSS {after} kB >= {RSS_BOUND_KIB} kB: bodies were buffered"
    );
    daemon.stop_ok(&mut topo.lab)?;
    home.stop()?;
    drop(topo);
    check_cleaned(&id)
}

/// The upstream-side address an answer of the "framing" upstream names (`... peer=ADDR`).
fn peers_in(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split_once("peer=").map(|(_, p)| p.trim().to_owned()))
        .collect()
}

#[test]
fn http_upstream_response_framings() -> Result<()> {
    let _serial = serial();
    let mut topo = TwoInterface::new("httpframe")?;
    let id = topo.lab.id().to_owned();
    let echo = start_echo(&topo.home, &[("framing", 8086)])?;
    // One worker thread (tokio's current-thread scheduler, as the bench runs it); the other
    // http tests run the default two.
    let daemon = start_http_daemon_with(
        &mut topo,
        &http_service(
            &[sock(two::HOME, 8086)],
            "[service.http]\nheader_timeout = \"2s\"\n",
        ),
        Some(1),
    )?;
    daemon.wait_log(
        &mut topo.lab,
        &["tokio runtime", "current-thread"],
        1,
        READY,
    )?;
    let url = |path: &str| format!("http://{}{path}", sock(two::PROXY_CLIENT_SIDE, 80));
    // One client connection, three requests: chunked (extension, trailer), length, chunked.
    let out = topo.client.exec(
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            &url("/chunked"),
            &url("/length"),
            &url("/chunked"),
        ],
    )?;
    ensure!(
        out.matches("second chunk\n").count() == 2 && out.contains("length peer="),
        "chunked and length bodies: {out:?}"
    );
    let peers = peers_in(&out);
    ensure!(
        peers.len() == 3 && peers.iter().all(|p| *p == peers[0]),
        "one upstream connection reused after each body read to its end: {peers:?} in {out:?}"
    );
    // Until close: the body whole, and the next request on a new upstream connection.
    let out = topo.client.exec(
        "curl",
        &["-sS", "--max-time", "10", &url("/close"), &url("/length")],
    )?;
    let peers = peers_in(&out);
    ensure!(
        out.contains("until close peer=") && peers.len() == 2 && peers[0] != peers[1],
        "a connection closed after its body is not reused: {out:?}"
    );
    let (code, body) = curl(&topo.client, &[&url("/early")])?;
    ensure!(
        code == 200 && body == "after early hints\n",
        "103 skipped, the final response passed: {code} {body:?}"
    );
    let (code, body) = curl(&topo.client, &["-D", "-", &url("/nocontent")])?;
    ensure!(
        code == 204 && body.to_ascii_lowercase().contains("x-framing: none"),
        "204 with its header: {code} {body:?}"
    );
    let (code, head) = curl(&topo.client, &["-I", &url("/length")])?;
    ensure!(
        code == 200 && head.to_ascii_lowercase().contains("content-length: 2"),
        "HEAD: the length of the body a GET would get, no body: {code} {head:?}"
    );
    let (code, body) = curl(&topo.client, &[&url("/badlength")])?;
    ensure!(
        code == 502 && body.contains("Content-Length"),
        "conflicting Content-Length: {code} {body:?}"
    );
    // A client that shuts its sending side after the request (a half-close) still gets the
    // whole response, and then the end of the connection.
    let service = sock(two::PROXY_CLIENT_SIDE, 80);
    let answer = topo.client.run(CLIENT_LIMIT, move || async move {
        let mut s = TcpStream::connect(service).await?;
        s.write_all(b"GET /length HTTP/1.1\r\nHost: framing.example\r\n\r\n")
            .await?;
        s.shutdown().await?;
        let mut got = Vec::new();
        s.read_to_end(&mut got).await?;
        Ok(String::from_utf8_lossy(&got).into_owned())
    })?;
    ensure!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("length peer="),
        "a half-closed client's request went unanswered: {answer:?}"
    );
    // A body cut short: the client's transfer fails (not a complete response).
    let short = topo
        .client
        .exec("curl", &["-sS", "--max-time", "10", &url("/short")]);
    ensure!(
        short.is_err(),
        "a body cut short reached the client whole: {short:?}"
    );
    // And the service still answers.
    let (code, body) = curl(&topo.client, &[&url("/length")])?;
    ensure!(
        code == 200 && body.starts_with("length peer="),
        "{code} {body:?}"
    );
    daemon.stop_ok(&mut topo.lab)?;
    echo.stop_and_join()?;
    drop(topo);
    check_cleaned(&id)
}

#[test]
fn http_websocket_echo() -> Result<()> {
    let _serial = serial();
    let mut topo = TwoInterface::new("httpws")?;
    let id = topo.lab.id().to_owned();
    let echo = start_echo(&topo.home, &[("ws", 8081)])?;
    let daemon = start_http_daemon(&mut topo, &http_service(&[sock(two::HOME, 8081)], ""))?;
    let service = sock(two::PROXY_CLIENT_SIDE, 80);
    let echoed = topo.client.run(CLIENT_LIMIT, move || async move {
        let s = TcpStream::connect(service).await?;
        let mut s = BufReader::new(s);
        s.write_all(
            b"GET /chat HTTP/1.1\r\nHost: ws.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await?;
        let mut status = String::new();
        s.read_line(&mut status).await?;
        ensure!(status.starts_with("HTTP/1.1 101"), "upgrade answered {status:?}");
        let mut upgrade_header = false;
        for _ in 0..50 {
            let mut line = String::new();
            s.read_line(&mut line).await?;
            if line.trim().is_empty() {
                break;
            }
            upgrade_header |= line.trim().eq_ignore_ascii_case("upgrade: websocket");
        }
        ensure!(upgrade_header, "101 without Upgrade: websocket");
        let mut got = Vec::new();
        for msg in ["hello", "through the proxy", "third frame"] {
            let mask = [0x37u8, 0xfa, 0x21, 0x3d];
            let mut frame = vec![0x81, 0x80 | u8::try_from(msg.len())?];
            frame.extend_from_slice(&mask);
            frame.extend(msg.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            s.write_all(&frame).await?;
            let mut hdr = [0u8; 2];
            s.read_exact(&mut hdr).await?;
            ensure!(hdr[0] == 0x81, "frame type {:#x}", hdr[0]);
            let mut payload = vec![0u8; usize::from(hdr[1] & 0x7f)];
            s.read_exact(&mut payload).await?;
            got.push(String::from_utf8(payload)?);
        }
        // Close.
        s.write_all(&[0x88, 0x80, 1, 2, 3, 4]).await?;
        let mut hdr = [0u8; 2];
        s.read_exact(&mut hdr).await?;
        ensure!(hdr[0] == 0x88, "no close frame back: {:#x}", hdr[0]);
        Ok(got)
    })?;
    println!("websocket echo: {echoed:?}");
    ensure!(
        echoed == ["hello", "through the proxy", "third frame"],
        "echoed {echoed:?}"
    );
    daemon.stop_ok(&mut topo.lab)?;
    echo.stop_and_join()?;
    drop(topo);
    check_cleaned(&id)
}

#[test]
fn http_alongside_xdp() -> Result<()> {
    let _serial = serial();
    let mut topo = TwoInterface::new("httpxdp")?;
    let id = topo.lab.id().to_owned();
    let echo = start_echo(&topo.home, &[("alpha", 8081)])?;
    let pin_dir = topo.lab.mount_bpffs()?;
    let interfaces = [two::PROXY_CLIENT_DEV, two::PROXY_HOME_DEV];
    let config = format!(
        "{}{}",
        two::base_config("native", &interfaces, &pin_dir),
        http_service(&[sock(two::HOME, 8081)], "")
    );
    let lab = &mut topo.lab;
    let daemon = Daemon::start(lab, &topo.proxy, &config)?;
    daemon.wait_log(lab, &["datapath active", "datapath=\"xdp\""], 1, READY)?;
    daemon.wait_log(lab, &["http proxy listening"], 1, READY)?;
    for dev in interfaces {
        ensure!(netns::has_xdp(&topo.proxy, dev)?, "no XDP on {dev}");
    }
    let (code, body) = curl(
        &topo.client,
        &[
            "-H",
            "Host: app.example",
            &format!("http://{}/", two::PROXY_CLIENT_SIDE),
        ],
    )?;
    ensure!(
        code == 200 && body.starts_with("name=alpha\n"),
        "GET / beside XDP: {code} {body}"
    );
    ensure!(
        body.contains(&format!("x-forwarded-for: {}", two::CLIENT)),
        "no X-Forwarded-For: {body}"
    );
    // `xdp-proxy status` names the XDP mode, both attachments, and the http upstream's health.
    let table = cli_status(&topo.proxy, &["--admin", "127.0.0.1:9100"])?;
    println!("xdp-proxy status:\n{table}");
    ensure!(
        table.lines().next() == Some("datapath:   native"),
        "`status` does not say native:\n{table}"
    );
    ensure!(
        interfaces
            .iter()
            .all(|d| table.contains(&format!("{d} (native"))),
        "`status` does not list both attachments:\n{table}"
    );
    ensure!(
        table.lines().any(|l| l.starts_with("app ")
            && l.contains("http")
            && l.contains(&sock(two::HOME, 8081).to_string())
            && l.contains(" yes ")),
        "`status` does not list the http upstream as healthy:\n{table}"
    );
    let status = daemon.stop(lab)?;
    ensure!(status.success(), "daemon exited with {status}");
    echo.stop_and_join()?;
    drop(topo);
    check_cleaned(&id)
}

#[test]
fn http_reload_applies_routes() -> Result<()> {
    let _serial = serial();
    let mut topo = TwoInterface::new("httprl")?;
    let id = topo.lab.id().to_owned();
    let echo = start_echo(&topo.home, &[("alpha", 8081), ("beta", 8082)])?;
    let route = |port: u16| {
        format!(
            "[[service.route]]\npath_prefix = \"/r/\"\nupstreams = [\"{}\"]\n",
            sock(two::HOME, port)
        )
    };
    let pin_dir = topo.lab.mount_bpffs()?;
    let config = |port| {
        format!(
            "{}{}",
            two::base_config("userspace", &[], &pin_dir),
            http_service(&[sock(two::HOME, 8081)], &route(port))
        )
    };
    let lab = &mut topo.lab;
    let daemon = Daemon::start(lab, &topo.proxy, &config(8081))?;
    daemon.wait_log(lab, &["http proxy listening"], 1, READY)?;
    let url = format!("http://{}/r/1", two::PROXY_CLIENT_SIDE);
    let (code, body) = curl(&topo.client, &[&url])?;
    ensure!(
        code == 200 && body.starts_with("name=alpha\n"),
        "before: {code} {body}"
    );

    std::fs::write(&daemon.config, config(8082)).context("rewriting the config")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(daemon.pid)?),
        nix::sys::signal::Signal::SIGHUP,
    )
    .context("SIGHUP")?;
    daemon.wait_log(lab, &["http routes reloaded", "service=app"], 1, READY)?;
    let (code, body) = curl(&topo.client, &[&url])?;
    ensure!(
        code == 200 && body.starts_with("name=beta\n"),
        "after: {code} {body}"
    );

    let status = daemon.stop(lab)?;
    ensure!(status.success(), "daemon exited with {status}");
    echo.stop_and_join()?;
    drop(topo);
    check_cleaned(&id)
}
