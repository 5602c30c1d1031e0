//! Namespace tests of an http service at the edge, behind a front proxy such as an ALB (issue
//! 20):
//!
//! - `http_host_rules`: RFC 9112 section 3.2: an HTTP/1.1 request without Host is answered 400
//!   at once (one with a Content-Length too, whose body never comes) and its connection closed;
//!   two Host lines are a 400; HTTP/1.0 without Host is served (the upstream sees its own address
//!   as Host); an absolute-form target is routed on its authority, and that authority is the
//!   Host the upstream sees.
//! - `http_many_connections_past_a_low_soft_limit`: the daemon started under a soft open-file
//!   limit of 1,024 (hard: 1,048,576, or this process's hard limit when lower) raises it to the
//!   hard limit and says so, with a warning naming the service when the hard limit cannot hold
//!   its 16,384 connections; [`MANY`]
//!   keep-alive client connections through one http service, all open at once, each served (two
//!   requests each, every answer a 200). Under the old soft limit the daemon could accept about
//!   500 of them (two descriptors per proxied connection).
//! - `http_trusted_proxies`: `trusted_proxies` lists one client address (a front proxy such
//!   as an ALB): its `X-Forwarded-Proto: https`, `X-Forwarded-Port` and `Forwarded` reach the
//!   upstream as it sent them, its `X-Forwarded-For` gets it appended, and the access log names
//!   the client its `X-Forwarded-For` gives. The same headers from another address of the
//!   client namespace (untrusted): `X-Forwarded-Proto` overwritten with `http`, its
//!   `X-Forwarded-Port` and `Forwarded` elements dropped, the access log names the peer. Both
//!   for a GET (the daemon's own upstream client) and a POST with a body (hyper's).
//!
//! Run as root: `cargo test -p integration-tests --test http_edge -- --nocapture`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, ensure};
use integration_tests::echo;
use integration_tests::netns::{Daemon, Netns, NsThread, TwoInterface, serial, sock, two};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

/// Bound of one test's client side.
const CLIENT_LIMIT: Duration = Duration::from_secs(60);
/// Bound of one exchange with the proxy.
const EXCHANGE_LIMIT: Duration = Duration::from_secs(10);
const READY: Duration = Duration::from_secs(30);
/// Concurrent client connections of the open-file limit test: three times what a soft limit of
/// 1,024 lets the daemon proxy.
const MANY: usize = 1500;

/// The http service `app` on the proxy's client side, port 80.
fn service() -> SocketAddr {
    sock(two::PROXY_CLIENT_SIDE, 80)
}

/// Echo upstreams in `home`, one per `(name, port)`: each answers every request (keep-alive)
/// with `name=<name>`, `peer=<addr>` and the request head's lines, lowercased (a body is read
/// and not echoed).
fn start_echo(home: &Netns, servers: &[(&'static str, u16)]) -> Result<NsThread<()>> {
    echo::start(home, servers, CLIENT_LIMIT * 2, echo_conn)
}

async fn echo_conn(s: TcpStream, peer: SocketAddr, name: &'static str) -> Result<()> {
    let mut s = BufReader::new(s);
    // Bounded: each turn consumes one request head; the thread's limit bounds the rest.
    while let Some(head) = echo::read_head(&mut s, true).await? {
        // A request body (Content-Length only: the proxy sends these tests' bodies so) is
        // read and left out, so the next request on the connection starts where it should.
        let length = head
            .iter()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(Ok(0), |v| v.trim().parse::<usize>())?;
        let mut request_body = vec![0u8; length];
        s.read_exact(&mut request_body).await?;
        s.write_all(&echo::answer(name, peer, &head)).await?;
        s.flush().await?;
    }
    Ok(())
}

/// Start the daemon in `topo.proxy` with `services` (`program` and `pre_args` run it, for
/// example through `prlimit`; `None`: the binary itself); wait for the http listener.
fn start_daemon(
    topo: &mut TwoInterface,
    services: &str,
    wrapper: Option<(&str, &[&str])>,
) -> Result<Daemon> {
    let bin = integration_tests::netns::daemon_binary()?;
    let pin_dir = topo.lab.mount_bpffs()?;
    let config = format!("{}{services}", two::base_config("userspace", &[], &pin_dir));
    let config_path = topo.lab.write_file("xdp-proxy.toml", &config)?;
    let bin_arg = bin.to_string_lossy().into_owned();
    let config_arg = config_path.to_string_lossy().into_owned();
    let daemon_args = ["run", "--config", config_arg.as_str()];
    let pid = match wrapper {
        None => topo
            .lab
            .spawn_daemon("xdp-proxy", &topo.proxy, &bin, &daemon_args)?,
        Some((program, pre)) => {
            let mut args: Vec<&str> = pre.to_vec();
            args.push(&bin_arg);
            args.extend(daemon_args);
            topo.lab.spawn_daemon(
                "xdp-proxy",
                &topo.proxy,
                std::path::Path::new(program),
                &args,
            )?
        }
    };
    let daemon = Daemon {
        pid,
        bin,
        pin_dir,
        config: config_path,
    };
    daemon.wait_log(&mut topo.lab, &["http proxy listening"], 1, READY)?;
    Ok(daemon)
}

/// One request written as is on a new connection to the service; everything the proxy sends
/// until it closes the connection (the request asks for the close, or the answer does).
async fn exchange(raw: &[u8]) -> Result<String> {
    tokio::time::timeout(EXCHANGE_LIMIT, async {
        let mut s = TcpStream::connect(service()).await?;
        s.write_all(raw).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, anyhow::Error>(String::from_utf8_lossy(&out).into_owned())
    })
    .await
    .map_err(|_| {
        anyhow!(
            "no complete answer to {:?} in {EXCHANGE_LIMIT:?}",
            String::from_utf8_lossy(raw)
        )
    })?
}

/// The status code of a response's text.
fn status(resp: &str) -> Option<u16> {
    resp.split(' ').nth(1)?.parse().ok()
}

#[test]
fn http_host_rules() -> Result<()> {
    let _serial = serial();
    let mut topo = TwoInterface::new("host")?;
    let _echo = start_echo(&topo.home, &[("alpha", 8081), ("beta", 8082)])?;
    let services = format!(
        "
[[service]]
name = \"app\"
listen = \"{listen}\"
mode = \"http\"
upstreams = [\"{a}\"]
[service.http]
header_timeout = \"3s\"
[service.health]
kind = \"none\"
[[service.route]]
host = \"b.example\"
upstreams = [\"{b}\"]
",
        listen = service(),
        a = sock(two::HOME, 8081),
        b = sock(two::HOME, 8082),
    );
    let daemon = start_daemon(&mut topo, &services, None)?;
    let alpha = sock(two::HOME, 8081).to_string();
    let answers = topo.client.run(CLIENT_LIMIT, || async {
        let mut out = Vec::new();
        for raw in [
            // No Host, a body announced and never sent: 400 at once, without waiting for it.
            &b"POST /upload HTTP/1.1\r\nContent-Length: 5\r\n\r\n"[..],
            // No Host, no body.
            b"GET /x HTTP/1.1\r\n\r\n",
            // Two Host lines.
            b"GET /x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n",
            // HTTP/1.0 may leave Host out.
            b"GET /old HTTP/1.0\r\n\r\n",
            // Absolute form: its authority is the host, whatever the Host line says.
            b"GET http://b.example/abs HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
        ] {
            out.push(exchange(raw).await?);
        }
        Ok(out)
    })?;
    for a in &answers {
        println!("--- answer ---\n{a}");
    }
    for (i, what) in [(0, "POST without Host"), (1, "GET without Host")] {
        ensure!(
            status(&answers[i]) == Some(400),
            "{what}: want 400, got:\n{}",
            answers[i]
        );
        ensure!(
            answers[i]
                .to_ascii_lowercase()
                .contains("connection: close"),
            "{what}: the 400 does not close the connection:\n{}",
            answers[i]
        );
    }
    ensure!(
        status(&answers[2]) == Some(400),
        "two Host lines: want 400, got:\n{}",
        answers[2]
    );
    ensure!(
        status(&answers[3]) == Some(200)
            && answers[3].contains("name=alpha\n")
            && answers[3].contains(&format!("\nhost: {alpha}\n")),
        "HTTP/1.0 without Host: want 200 from alpha with Host {alpha}, got:\n{}",
        answers[3]
    );
    ensure!(
        status(&answers[4]) == Some(200)
            && answers[4].contains("name=beta\n")
            && answers[4].contains("\nhost: b.example\n")
            && answers[4].contains("host=b.example"),
        "absolute form: want beta with Host b.example (and in Forwarded), got:\n{}",
        answers[4]
    );
    daemon.wait_log(
        &mut topo.lab,
        &["access", "path=\"/upload\"", "status=400"],
        1,
        READY,
    )?;
    daemon.stop_ok(&mut topo.lab)?;
    Ok(())
}

/// Raise this process's soft open-file limit to its hard limit (the client and home sides of
/// [`MANY`] connections live in the test process).
fn raise_own_nofile(want: u64) -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE)?;
    ensure!(
        soft >= want,
        "the test process's open-file limit {soft} is below {want}"
    );
    Ok(())
}

/// This process's hard open-file limit.
fn nofile_hard() -> Result<u64> {
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    Ok(hard)
}

/// Read one response (Content-Length framed, as the echo upstream sends) from `s`; its status.
async fn read_response(s: &mut BufReader<TcpStream>) -> Result<u16> {
    let mut status = None;
    let mut length = 0usize;
    for i in 0..100 {
        let mut line = String::new();
        ensure!(s.read_line(&mut line).await? > 0, "connection closed");
        let line = line.trim_end();
        if i == 0 {
            status = self::status(line);
            continue;
        }
        if line.is_empty() {
            let mut body = vec![0u8; length];
            s.read_exact(&mut body).await?;
            return status.ok_or_else(|| anyhow!("no status line"));
        }
        if let Some((n, v)) = line.split_once(':')
            && n.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse()?;
        }
    }
    Err(anyhow!("response head too long"))
}

#[test]
fn http_many_connections_past_a_low_soft_limit() -> Result<()> {
    let _serial = serial();
    raise_own_nofile(4 * MANY as u64)?;
    let mut topo = TwoInterface::new("nofile")?;
    let _echo = start_echo(&topo.home, &[("alpha", 8081)])?;
    let services = format!(
        "
[[service]]
name = \"app\"
listen = \"{listen}\"
mode = \"http\"
upstreams = [\"{a}\"]
[service.health]
kind = \"none\"
",
        listen = service(),
        a = sock(two::HOME, 8081),
    );
    // The hard limit the daemon gets: this process's (raising a hard limit takes
    // CAP_SYS_RESOURCE, which a container may not grant; 1,048,576 where it is granted).
    let hard = nofile_hard()?.min(1_048_576);
    let daemon = start_daemon(
        &mut topo,
        &services,
        Some(("/usr/bin/prlimit", &[&format!("--nofile=1024:{hard}")])),
    )?;
    // The traffic first: under the old soft limit it is what fails.
    let served = topo.client.run(CLIENT_LIMIT, || async {
        // All connected first, then each asked twice while every other stays open.
        let mut conns = Vec::with_capacity(MANY);
        for i in 0..MANY {
            let s = TcpStream::connect(service())
                .await
                .with_context(|| format!("connection {i}"))?;
            conns.push(BufReader::new(s));
        }
        let mut ok = 0usize;
        for round in 0..2 {
            for (i, s) in conns.iter_mut().enumerate() {
                let req = format!("GET /c/{i}/{round} HTTP/1.1\r\nHost: app.example\r\n\r\n");
                s.get_mut().write_all(req.as_bytes()).await?;
            }
            for (i, s) in conns.iter_mut().enumerate() {
                let code = tokio::time::timeout(EXCHANGE_LIMIT, read_response(s))
                    .await
                    .map_err(|_| anyhow!("connection {i}, round {round}: no answer"))?
                    .with_context(|| format!("connection {i}, round {round}"))?;
                ensure!(code == 200, "connection {i}, round {round}: status {code}");
                ok += 1;
            }
        }
        Ok(ok)
    })?;
    ensure!(served == 2 * MANY, "{served} answers of {}", 2 * MANY);
    println!("{MANY} connections open at once, {served} requests answered 200");
    let raised = daemon.wait_log(
        &mut topo.lab,
        &[
            "open-file limit raised",
            "was=1024",
            &format!("soft={hard}"),
            &format!("hard={hard}"),
        ],
        1,
        READY,
    )?;
    println!("daemon: {}", raised[0]);
    // One http service may hold 16,384 connections, two descriptors each, and 256 are kept
    // aside: a hard limit below that is named in a warning with the service and its numbers.
    let needed = 16_384 * 2 + 256;
    let short = topo
        .lab
        .log_text(daemon.pid)
        .lines()
        .filter(|l| l.contains("open-file limit cannot hold"))
        .map(str::to_owned)
        .collect::<Vec<_>>();
    if hard < needed {
        let want = [
            format!("limit={hard}"),
            format!("needed={needed}"),
            "app: 16384 connections, 32768 descriptors".to_owned(),
        ];
        ensure!(
            short.len() == 1 && want.iter().all(|w| short[0].contains(w.as_str())),
            "want one warning with {want:?}, got {short:?}"
        );
        println!("daemon: {}", short[0]);
    } else {
        ensure!(short.is_empty(), "a warning under {hard}: {short:?}");
    }
    daemon.stop_ok(&mut topo.lab)?;
    Ok(())
}

/// A second client address, outside `trusted_proxies`.
const UNTRUSTED: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 100, 0, 3);

/// [`exchange`] from the local address `from`.
async fn exchange_from(from: std::net::Ipv4Addr, raw: &[u8]) -> Result<String> {
    tokio::time::timeout(EXCHANGE_LIMIT, async {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(SocketAddr::from((from, 0)))?;
        let mut s = sock.connect(service()).await?;
        s.write_all(raw).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, anyhow::Error>(String::from_utf8_lossy(&out).into_owned())
    })
    .await
    .map_err(|_| anyhow!("no complete answer from {from} in {EXCHANGE_LIMIT:?}"))?
}

#[test]
fn http_trusted_proxies() -> Result<()> {
    let _serial = serial();
    let mut topo = TwoInterface::new("trust")?;
    topo.client.ip(&[
        "addr",
        "add",
        &format!("{UNTRUSTED}/24"),
        "dev",
        two::CLIENT_DEV,
    ])?;
    let _echo = start_echo(&topo.home, &[("alpha", 8081)])?;
    let services = format!(
        "
[[service]]
name = \"app\"
listen = \"{listen}\"
mode = \"http\"
upstreams = [\"{a}\"]
[service.http]
trusted_proxies = [\"{trusted}/32\", \"192.0.2.0/24\"]
[service.health]
kind = \"none\"
",
        listen = service(),
        a = sock(two::HOME, 8081),
        trusted = two::CLIENT,
    );
    let daemon = start_daemon(&mut topo, &services, None)?;
    // What an ALB sends: the client, the ALB's own hop from 192.0.2.10 (trusted too), proto and
    // port of the client's TLS connection.
    let forwarding = "Host: app.example\r\nX-Forwarded-For: 203.0.113.9, 192.0.2.10\r\n\
        X-Forwarded-Proto: https\r\nX-Forwarded-Port: 443\r\n\
        Forwarded: for=203.0.113.9;proto=https\r\nConnection: close\r\n";
    let requests = [
        format!("GET /get HTTP/1.1\r\n{forwarding}\r\n"),
        format!("POST /post HTTP/1.1\r\n{forwarding}Content-Length: 3\r\n\r\nabc"),
    ];
    let answers = topo.client.run(CLIENT_LIMIT, move || async move {
        let mut out = Vec::new();
        for from in [two::CLIENT, UNTRUSTED] {
            for r in &requests {
                out.push((from, exchange_from(from, r.as_bytes()).await?));
            }
        }
        Ok(out)
    })?;
    for (from, a) in &answers {
        println!("--- from {from} ---\n{a}");
        let trusted = *from == two::CLIENT;
        let lines: Vec<&str> = a.lines().collect();
        let has = |l: &str| lines.contains(&l);
        ensure!(
            status(a) == Some(200) && has("name=alpha"),
            "from {from}: want 200 from alpha:\n{a}"
        );
        let want_xff = format!("x-forwarded-for: 203.0.113.9, 192.0.2.10, {from}");
        let ours = format!("for={from};proto=http;host=app.example");
        let (want, gone): (Vec<String>, Vec<&str>) = if trusted {
            (
                vec![
                    want_xff,
                    "x-forwarded-proto: https".to_owned(),
                    "x-forwarded-port: 443".to_owned(),
                    format!("forwarded: for=203.0.113.9;proto=https, {ours}"),
                ],
                vec!["x-forwarded-proto: http"],
            )
        } else {
            (
                vec![
                    want_xff,
                    "x-forwarded-proto: http".to_owned(),
                    format!("forwarded: {ours}"),
                ],
                vec!["x-forwarded-proto: https", "x-forwarded-port:"],
            )
        };
        for w in &want {
            ensure!(has(w), "from {from}: the upstream did not see `{w}`:\n{a}");
        }
        for g in gone {
            ensure!(
                // A whole line, or a name (`name:`) on any line.
                !lines
                    .iter()
                    .any(|l| *l == g || (g.ends_with(':') && l.starts_with(g))),
                "from {from}: the upstream saw `{g}`:\n{a}"
            );
        }
        ensure!(
            lines
                .iter()
                .filter(|l| l.starts_with("x-forwarded-proto:"))
                .count()
                == 1
                && lines.iter().filter(|l| l.starts_with("forwarded:")).count() == 1,
            "from {from}: one X-Forwarded-Proto and one Forwarded line wanted:\n{a}"
        );
    }
    // The access log: the client behind the trusted peer, the peer itself otherwise.
    for path in ["/get", "/post"] {
        let path_field = format!("path=\"{path}\"");
        let behind = daemon.wait_log(
            &mut topo.lab,
            &["access", "client=203.0.113.9 ", &path_field],
            1,
            READY,
        )?;
        println!("daemon: {}", behind[0]);
        let untrusted = format!("client={UNTRUSTED}:");
        let direct = daemon.wait_log(
            &mut topo.lab,
            &["access", &untrusted, &path_field],
            1,
            READY,
        )?;
        println!("daemon: {}", direct[0]);
    }
    daemon.stop_ok(&mut topo.lab)?;
    Ok(())
}
