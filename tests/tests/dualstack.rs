//! Namespace tests of the fast path's per-service options through the real daemon (two-interface
//! shape, XDP): the config keys `mss_clamp`, `deny` (and the counters they move).
//!
//! - `home_path_mtu_smaller_than_the_clients`: the proxy's home-side link has MTU 1280 while
//!   the client and the home server have 1500 (so both ends advertise MSS 1460). Frames larger
//!   than 1280 cannot cross that link (XDP redirect and veth drop them, and no ICMP reaches the
//!   ends), so without clamping a large transfer stalls in both directions. With
//!   `mss_clamp = 1240` on the service the SYN and SYN-ACK carry MSS 1240 and 4 MiB downloads
//!   and uploads complete, checksummed. A second service on the same address denies the client
//!   (`deny = ["<client>/32"]`): its connection attempts time out and `drop_acl_denied` counts
//!   them.
//!
//! Dual stack (IPv4 and IPv6 services side by side, one service per family), two-interface
//! shape with IPv6 ULA addresses (`TwoInterface::with_ipv6`):
//!
//! - `dual_stack_userspace`: `mode = "userspace"`. An IPv4 and an IPv6 TCP service and an IPv6
//!   UDP service; `nat.snat_ipv6` is not set, so the daemon takes the source address of the
//!   IPv6 route home. Checksummed TCP transfers over IPv6 and IPv4 at the same time, UDP
//!   request/answer over IPv6; the home servers see only the SNAT addresses (10.200.0.1 and
//!   fd00:200::1), and the proxy's kernel forwarded no IPv6 packet (`Ip6OutForwDatagrams`).
//! - `dual_stack_xdp`: the same through XDP (`mode = "native"`), and the IPv6 packets took the
//!   fast path: the IPv6 services' XDP counters (`inspect stats`) count the packets and bytes
//!   and the redirect reasons grew, while the kernel's `Ip6OutForwDatagrams` in the proxy
//!   namespace did not. Both also serve an http service on the IPv6 address with an IPv4
//!   upstream, and a service per family behind one DNS name (A and AAAA records).
//! - `one_interface_ipv6_xdp`: the one-interface shape, IPv6 only (no IPv4 home CIDR, so no
//!   IPv4 SNAT address), `snat_ipv6` set to the proxy's address: XDP_TX both ways.
//!
//! Run as root: `cargo test -p integration-tests --test dualstack`.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, ensure};
use integration_tests::netns::{self, Daemon, TwoInterface, serial, two};
use integration_tests::traffic::{
    self, Conn, HomeServer, connect_all, get_root_until_up, payload_checksum, transfer_all,
    udp_exchange,
};
use serde_json::Value;

const TCP_SERVICE_PORT: u16 = 80;
const DENIED_SERVICE_PORT: u16 = 81;
const HOME_PORT: u16 = 8080;
const SNAT_PORTS: (u16, u16) = (20_000, 29_999);
const HOME_LINK_MTU: u32 = 1280;
const MSS_CLAMP: u16 = 1240;
const TRANSFER: u64 = 4 << 20;
const CLIENT_LIMIT: Duration = Duration::from_secs(120);

fn config(
    pin_dir: &std::path::Path,
    svc: SocketAddr,
    denied: SocketAddr,
    up: SocketAddr,
) -> String {
    use two::*;
    format!(
        r#"[datapath]
interfaces = ["{PROXY_CLIENT_DEV}", "{PROXY_HOME_DEV}"]
mode = "native"
pin_dir = "{pin}"

[nat]
snat_ipv4 = "{PROXY_HOME_SIDE}"
port_range = [{lo}, {hi}]
home_cidrs = ["{HOME_CIDR}"]

[admin]
listen = "127.0.0.1:9100"

[[service]]
name = "web"
listen = "{svc}"
protocol = "tcp"
upstreams = ["{up}"]
mss_clamp = {MSS_CLAMP}

[[service]]
name = "closed"
listen = "{denied}"
protocol = "tcp"
upstreams = ["{up}"]
deny = ["{CLIENT}/32"]
"#,
        pin = pin_dir.display(),
        lo = SNAT_PORTS.0,
        hi = SNAT_PORTS.1,
    )
}

fn reason(stats: &Value, name: &str) -> Result<u64> {
    stats
        .get("reasons")
        .and_then(|r| r.get(name))
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow!("inspect stats: no reason {name}: {stats}"))
}

#[test]
fn home_path_mtu_smaller_than_the_clients() -> Result<()> {
    use two::*;
    let TwoInterface {
        mut lab,
        client,
        proxy,
        home,
    } = TwoInterface::new("mtu")?;
    proxy.ip(&[
        "link",
        "set",
        "dev",
        PROXY_HOME_DEV,
        "mtu",
        &HOME_LINK_MTU.to_string(),
    ])?;
    for (ns, dev, want) in [
        (&client, CLIENT_DEV, "mtu 1500 "),
        (&home, HOME_DEV, "mtu 1500 "),
        (&proxy, PROXY_HOME_DEV, "mtu 1280 "),
    ] {
        let link = ns.ip(&["-o", "link", "show", "dev", dev])?;
        ensure!(link.contains(want), "{dev}: want {want}: {link}");
    }
    let svc = netns::sock(PROXY_CLIENT_SIDE, TCP_SERVICE_PORT);
    let denied = netns::sock(PROXY_CLIENT_SIDE, DENIED_SERVICE_PORT);
    let up = netns::sock(HOME, HOME_PORT);
    let server = HomeServer::start(&home, up, None, CLIENT_LIMIT * 2)?;
    let pin_dir = lab.mount_bpffs()?;
    let daemon = Daemon::start(&mut lab, &proxy, &config(&pin_dir, svc, denied, up))?;
    daemon.wait_ready(
        &mut lab,
        &proxy,
        &[PROXY_CLIENT_DEV, PROXY_HOME_DEV],
        2,
        Duration::from_secs(30),
        || false,
    )?;

    let result = client.run(CLIENT_LIMIT, move || async move {
        // Bounded retries while the daemon's health checks bring the upstream up.
        let mut conn = None;
        let mut last = anyhow!("no attempt");
        for _ in 0..40 {
            match Conn::connect(svc, Duration::from_secs(2)).await {
                Ok(mut c) => match c.get_text("/").await {
                    Ok((status, _)) if status.contains(" 200 ") => {
                        conn = Some(c);
                        break;
                    }
                    Ok((status, _)) => last = anyhow!("GET /: {status}"),
                    Err(e) => last = e,
                },
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let mut c = conn
            .ok_or(last)
            .context("warm-up through the clamped service")?;
        let down = c.get_blob(7, TRANSFER).await.context("4 MiB download")?;
        ensure!(down == payload_checksum(7, TRANSFER), "download checksum");
        let up_sum = c.put_sink(8, TRANSFER).await.context("4 MiB upload")?;
        ensure!(up_sum == payload_checksum(8, TRANSFER), "upload checksum");

        // The denied service: every SYN is dropped, so the connect times out.
        for _ in 0..2 {
            let r = Conn::connect(denied, Duration::from_secs(1)).await;
            ensure!(r.is_err(), "a denied client connected to {denied}");
        }
        Ok(())
    });
    let stats = daemon.stats()?;
    if let Err(e) = result {
        return Err(e.context(format!(
            "stats: {stats}\n--- daemon log ---\n{}",
            lab.log_tail(daemon.pid, 40)
        )));
    }
    let denied_count = reason(&stats, "drop_acl_denied")?;
    ensure!(
        denied_count >= 2,
        "drop_acl_denied {denied_count}, want >= 2 (two connects, SYN retries included)"
    );
    ensure!(
        reason(&stats, "fwd_redirect")? > 0 && reason(&stats, "rev_redirect")? > 0,
        "the transfer went through the fast path: {stats}"
    );
    daemon.stop_ok(&mut lab)?;
    server.stop()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Dual stack.
// ---------------------------------------------------------------------------------------------

const DS_TCP_PORT: u16 = 80;
/// An http service on the IPv6 service address whose upstream is IPv4 (the L7 proxy opens its
/// own connections, so the families may differ).
const DS_HTTP_PORT: u16 = 8081;
/// A service per family whose upstream is the DNS name [`DS_NAME`]: the IPv4 one takes its A
/// record, the IPv6 one its AAAA record.
const DS_NAMED_PORT: u16 = 82;
const DS_NAME: &str = "app.home";
const DS_DNS_PORT: u16 = 53;
/// XDP variant: an IPv6 service whose deny list holds the client's /128 (an `AclKey` of
/// family 6): its connects time out and `drop_acl_denied` counts them.
const DS_DENIED_PORT: u16 = 83;
const DS_UDP_PORT: u16 = 53;
const DS_HOME_TCP: u16 = 8080;
const DS_HOME_UDP: u16 = 5353;
/// Concurrent connections per family.
const DS_CONNS: usize = 4;
const DS_UDP_SOCKETS: usize = 4;
const DS_UDP_REQUESTS: usize = 20;
/// IPv6 packets the proxy's kernel may forward in the XDP variant: the contract lets a new
/// flow's first packets take the kernel's path while a next hop is unresolved (`pass_no_neigh`);
/// the daemon's health checks resolve them ahead, so in practice this is 0.
const DS_KERNEL_FORWARD_SLACK: u64 = 2;

fn dual_config(pin_dir: &std::path::Path, xdp: bool) -> String {
    use two::*;
    let web4 = netns::sock(PROXY_CLIENT_SIDE, DS_TCP_PORT);
    let web6 = netns::sock6(PROXY_CLIENT_SIDE6, DS_TCP_PORT);
    let dns6 = netns::sock6(PROXY_CLIENT_SIDE6, DS_UDP_PORT);
    let up4 = netns::sock(HOME, DS_HOME_TCP);
    let up6 = netns::sock6(HOME6, DS_HOME_TCP);
    let udp6 = netns::sock6(HOME6, DS_HOME_UDP);
    let app6 = netns::sock6(PROXY_CLIENT_SIDE6, DS_HTTP_PORT);
    let named4 = netns::sock(PROXY_CLIENT_SIDE, DS_NAMED_PORT);
    let named6 = netns::sock6(PROXY_CLIENT_SIDE6, DS_NAMED_PORT);
    let dns = netns::sock(HOME, DS_DNS_PORT);
    let mode = if xdp { "native" } else { "userspace" };
    let denied6 = netns::sock6(PROXY_CLIENT_SIDE6, DS_DENIED_PORT);
    let acl = if xdp {
        format!(
            r#"
[[service]]
name = "closed6"
listen = "{denied6}"
upstreams = ["{up6}"]
deny = ["{CLIENT6}/128"]
"#
        )
    } else {
        String::new()
    };
    // snat_ipv6 left out on purpose: the source of the route toward fd00:200::/64.
    format!(
        r#"[datapath]
interfaces = ["{PROXY_CLIENT_DEV}", "{PROXY_HOME_DEV}"]
mode = "{mode}"
pin_dir = "{pin}"

[nat]
snat_ipv4 = "{PROXY_HOME_SIDE}"
port_range = [{lo}, {hi}]
home_cidrs = ["{HOME_CIDR}", "{HOME_CIDR6}"]

[admin]
listen = "127.0.0.1:9100"

[dns]
servers = ["{dns}"]
interval = "1s"
timeout = "500ms"

[[service]]
name = "web4"
listen = "{web4}"
upstreams = ["{up4}"]
health = {{ interval = "200ms", timeout = "150ms", rise = 1 }}

[[service]]
name = "web6"
listen = "{web6}"
upstreams = ["{up6}"]
health = {{ interval = "200ms", timeout = "150ms", rise = 1 }}

[[service]]
name = "dns6"
listen = "{dns6}"
protocol = "udp"
upstreams = ["{udp6}"]
health = {{ kind = "none" }}

[[service]]
name = "app6"
listen = "{app6}"
mode = "http"
upstreams = ["{up4}"]
health = {{ interval = "200ms", timeout = "150ms", rise = 1 }}

[[service]]
name = "named4"
listen = "{named4}"
upstreams = ["{DS_NAME}:{DS_HOME_TCP}"]
health = {{ interval = "200ms", timeout = "150ms", rise = 1 }}

[[service]]
name = "named6"
listen = "{named6}"
upstreams = ["{DS_NAME}:{DS_HOME_TCP}"]
health = {{ interval = "200ms", timeout = "150ms", rise = 1 }}
{acl}"#,
        pin = pin_dir.display(),
        lo = SNAT_PORTS.0,
        hi = SNAT_PORTS.1,
    )
}

/// The `inspect stats` entry of the service listening on `listen` with `proto`.
fn service_stats<'a>(stats: &'a Value, listen: SocketAddr, proto: &str) -> Result<&'a Value> {
    let want = listen.to_string();
    stats
        .get("services")
        .and_then(Value::as_array)
        .and_then(|all| {
            all.iter().find(|s| {
                s.get("listen").and_then(Value::as_str) == Some(want.as_str())
                    && s.get("proto")
                        .and_then(Value::as_str)
                        .is_none_or(|p| p.eq_ignore_ascii_case(proto))
            })
        })
        .ok_or_else(|| anyhow!("inspect stats: no {proto} service {want}: {stats}"))
}

fn field(v: &Value, key: &str) -> Result<u64> {
    v.get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow!("no {key} in {v}"))
}

/// Answer A and AAAA queries for [`DS_NAME`] on `addr` (UDP): 10.200.0.2 and fd00:200::2, TTL
/// 1; NXDOMAIN for other names. Returns the queries answered per type (A, AAAA).
fn start_dns(ns: &netns::Netns, addr: SocketAddr) -> Result<netns::NsThread<(u64, u64)>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = ns.spawn(CLIENT_LIMIT * 2, move |mut stop| async move {
        let sock = tokio::net::UdpSocket::bind(addr).await?;
        let _ = ready_tx.send(());
        let mut buf = [0u8; 512];
        let mut answered = (0, 0);
        loop {
            tokio::select! {
                () = stop.wait() => return Ok(answered),
                r = sock.recv_from(&mut buf) => {
                    let (n, peer) = r?;
                    if let Some((reply, qtype)) = dns_reply(&buf[..n]) {
                        sock.send_to(&reply, peer).await?;
                        match qtype {
                            1 => answered.0 += 1,
                            28 => answered.1 += 1,
                            _ => {}
                        }
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

/// The answer to one query (one question) and its type, or None for garbage.
fn dns_reply(q: &[u8]) -> Option<(Vec<u8>, u16)> {
    if q.len() < 12 || q[4..6] != [0, 1] {
        return None;
    }
    let mut at = 12;
    let mut labels = Vec::new();
    // Bounded: a name has at most 128 labels.
    for _ in 0..128 {
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
    let known = labels.join(".") == DS_NAME;
    let mut r = q.get(..question_end)?.to_vec();
    r[2..4].copy_from_slice(&(0x8180u16 | if known { 0 } else { 3 }).to_be_bytes());
    let data: Option<Vec<u8>> = match qtype {
        1 if known => Some(two::HOME.octets().to_vec()),
        28 if known => Some(two::HOME6.octets().to_vec()),
        _ => None,
    };
    r[6..8].copy_from_slice(&[0, u8::from(data.is_some())]);
    r[8..12].copy_from_slice(&[0; 4]);
    if let Some(d) = data {
        r.extend_from_slice(&[0xc0, 12]);
        r.extend_from_slice(&qtype.to_be_bytes());
        r.extend_from_slice(&[0, 1, 0, 0, 0, 1]);
        r.extend_from_slice(&u16::try_from(d.len()).ok()?.to_be_bytes());
        r.extend_from_slice(&d);
    }
    Some((r, qtype))
}

/// What the client side measured.
struct DualRun {
    v4: traffic::LoadReport,
    v6: traffic::LoadReport,
    udp: traffic::UdpReport,
}

fn dual_stack(xdp: bool) -> Result<()> {
    use two::*;
    let _serial = serial();
    let TwoInterface {
        mut lab,
        client,
        proxy,
        home,
    } = TwoInterface::new(if xdp { "dsxdp" } else { "dsusr" })?.with_ipv6()?;
    let web4 = netns::sock(PROXY_CLIENT_SIDE, DS_TCP_PORT);
    let web6 = netns::sock6(PROXY_CLIENT_SIDE6, DS_TCP_PORT);
    let dns6 = netns::sock6(PROXY_CLIENT_SIDE6, DS_UDP_PORT);
    let app6 = netns::sock6(PROXY_CLIENT_SIDE6, DS_HTTP_PORT);
    let server4 = HomeServer::start(
        &home,
        netns::sock(HOME, DS_HOME_TCP),
        None,
        CLIENT_LIMIT * 2,
    )?;
    let server6 = HomeServer::start(
        &home,
        netns::sock6(HOME6, DS_HOME_TCP),
        Some(netns::sock6(HOME6, DS_HOME_UDP)),
        CLIENT_LIMIT * 2,
    )?;
    let named4 = netns::sock(PROXY_CLIENT_SIDE, DS_NAMED_PORT);
    let named6 = netns::sock6(PROXY_CLIENT_SIDE6, DS_NAMED_PORT);
    let dns = start_dns(&home, netns::sock(HOME, DS_DNS_PORT))?;
    let pin_dir = lab.mount_bpffs()?;
    let daemon = Daemon::start(&mut lab, &proxy, &dual_config(&pin_dir, xdp))?;
    if xdp {
        daemon.wait_ready(
            &mut lab,
            &proxy,
            &[PROXY_CLIENT_DEV, PROXY_HOME_DEV],
            3,
            Duration::from_secs(30),
            || false,
        )?;
    }
    // The SNAT address of each family, as the daemon logged it: IPv6 from the route home.
    daemon.wait_log(
        &mut lab,
        &["nat.snat_ipv6 not set", &PROXY_HOME_SIDE6.to_string()],
        1,
        Duration::from_secs(30),
    )?;

    let before = proxy.ip6_snmp()?;
    let stats_before = if xdp { Some(daemon.stats()?) } else { None };
    let result = client.run(CLIENT_LIMIT, move || async move {
        // Both services up (health checks, then listeners / maps).
        let body6 = get_root_until_up(web6).await.context("IPv6 service")?;
        let body4 = get_root_until_up(web4).await.context("IPv4 service")?;
        ensure!(
            body6.contains(&PROXY_HOME_SIDE6.to_string()),
            "home saw: {body6}"
        );
        ensure!(
            body4.contains(&PROXY_HOME_SIDE.to_string()),
            "home saw: {body4}"
        );
        // One DNS name, two families: the IPv6 service reaches the AAAA address (the IPv6 home
        // server, from the IPv6 SNAT address), the IPv4 one the A address.
        let named_6 = get_root_until_up(named6)
            .await
            .context("IPv6 service by name")?;
        ensure!(
            named_6.contains(&PROXY_HOME_SIDE6.to_string()),
            "home saw: {named_6}"
        );
        let named_4 = get_root_until_up(named4)
            .await
            .context("IPv4 service by name")?;
        ensure!(
            named_4.contains(&PROXY_HOME_SIDE.to_string()),
            "home saw: {named_4}"
        );
        // L7 listening on IPv6, sending to an IPv4 upstream from the IPv4 SNAT address.
        let body_l7 = get_root_until_up(app6).await.context("IPv6 http service")?;
        ensure!(
            body_l7.contains(&PROXY_HOME_SIDE.to_string()),
            "home saw: {body_l7}"
        );
        let conns6 = connect_all(web6, DS_CONNS, Duration::from_secs(5)).await?;
        let conns4 = connect_all(web4, DS_CONNS, Duration::from_secs(5)).await?;
        for c in &conns6 {
            ensure!(
                c.local_addr().ip() == IpAddr::V6(CLIENT6),
                "{}",
                c.local_addr()
            );
        }
        // Both families at once, every byte checked at the other end.
        let (v6, v4, udp) = tokio::join!(
            transfer_all(conns6, 600),
            transfer_all(conns4, 400),
            udp_exchange(dns6, DS_UDP_SOCKETS, DS_UDP_REQUESTS, 66),
        );
        let v6 = v6.context("IPv6 transfers")?;
        let v4 = v4.context("IPv4 transfers")?;
        let udp = udp.context("IPv6 UDP exchange")?;
        ensure!(
            udp.requests == DS_UDP_SOCKETS * DS_UDP_REQUESTS,
            "udp answered {} of {}",
            udp.requests,
            DS_UDP_SOCKETS * DS_UDP_REQUESTS
        );
        // The IPv6 deny list (XDP): every SYN dropped, so the connect times out.
        if xdp {
            let denied6 = netns::sock6(PROXY_CLIENT_SIDE6, DS_DENIED_PORT);
            for _ in 0..2 {
                let r = Conn::connect(denied6, Duration::from_secs(1)).await;
                ensure!(r.is_err(), "a denied IPv6 client connected to {denied6}");
            }
        }
        // One more checksummed download on a fresh IPv6 connection.
        let mut c = Conn::connect(web6, Duration::from_secs(5)).await?;
        let down = c
            .get_blob(9, 1 << 20)
            .await
            .context("1 MiB IPv6 download")?;
        ensure!(
            down == payload_checksum(9, 1 << 20),
            "IPv6 download checksum"
        );
        Ok(DualRun { v4, v6, udp })
    });
    let after = proxy.ip6_snmp()?;
    let stats = if xdp { Some(daemon.stats()?) } else { None };
    let run = match result {
        Ok(r) => r,
        Err(e) => {
            return Err(e.context(format!(
                "stats: {stats:?}\n--- daemon log ---\n{}",
                lab.log_tail(daemon.pid, 60)
            )));
        }
    };

    // /status and /metrics name the IPv6 service and upstream as [addr]:port.
    let status_text = proxy.exec(
        "curl",
        &[
            "-sS",
            "--fail",
            "--max-time",
            "5",
            "http://127.0.0.1:9100/status",
        ],
    )?;
    let status: Value = serde_json::from_str(&status_text).context("/status is not JSON")?;
    let web6_status = status
        .get("services")
        .and_then(Value::as_array)
        .and_then(|all| {
            all.iter()
                .find(|s| s.get("name").and_then(Value::as_str) == Some("web6"))
        })
        .ok_or_else(|| anyhow!("/status has no web6: {status_text}"))?;
    ensure!(
        web6_status.get("listen").and_then(Value::as_str) == Some(web6.to_string().as_str()),
        "/status web6: {web6_status}"
    );
    let up6 = netns::sock6(HOME6, DS_HOME_TCP).to_string();
    ensure!(
        web6_status
            .get("upstreams")
            .and_then(Value::as_array)
            .is_some_and(|u| u.iter().any(|u| {
                u.get("resolved").and_then(Value::as_str) == Some(up6.as_str())
                    && u.get("healthy").and_then(Value::as_bool) == Some(true)
            })),
        "/status web6 upstreams: {web6_status}"
    );
    let metrics = proxy.exec(
        "curl",
        &[
            "-sS",
            "--fail",
            "--max-time",
            "5",
            "http://127.0.0.1:9100/metrics",
        ],
    )?;
    ensure!(
        metrics.contains(&format!("listen=\"{web6}\"")),
        "/metrics has no series of {web6}"
    );

    // The home servers saw only the SNAT address of their family.
    let peers4: BTreeSet<IpAddr> = server4.stats().peer_ips();
    let peers6: BTreeSet<IpAddr> = server6.stats().peer_ips();
    ensure!(
        peers4 == BTreeSet::from([IpAddr::V4(PROXY_HOME_SIDE)]),
        "IPv4 home saw {peers4:?}"
    );
    ensure!(
        peers6 == BTreeSet::from([IpAddr::V6(PROXY_HOME_SIDE6)]),
        "IPv6 home saw {peers6:?}"
    );
    let udp_peers = server6.stats().udp_peers();
    ensure!(
        !udp_peers.is_empty()
            && udp_peers
                .iter()
                .all(|p| p.ip() == IpAddr::V6(PROXY_HOME_SIDE6)),
        "IPv6 UDP home saw {udp_peers:?}"
    );
    ensure!(
        server6.stats().sink_mismatches() == 0 && server4.stats().sink_mismatches() == 0,
        "an upload arrived damaged"
    );

    // The proxy's kernel forwarded (almost) no IPv6 packet: userspace proxies with sockets,
    // XDP rewrites and redirects before the stack.
    let fwd = |m: &std::collections::HashMap<String, u64>| {
        m.get("Ip6OutForwDatagrams").copied().unwrap_or(0)
    };
    let kernel_fwd = fwd(&after).saturating_sub(fwd(&before));
    let slack = if xdp { DS_KERNEL_FORWARD_SLACK } else { 0 };
    ensure!(
        kernel_fwd <= slack,
        "the proxy's kernel forwarded {kernel_fwd} IPv6 packets (Ip6OutForwDatagrams), want <= {slack}"
    );

    if let (Some(before), Some(after)) = (stats_before, stats) {
        // XDP: the IPv6 services' counters carry the traffic (only the fast path writes them).
        let tcp6 = service_stats(&after, web6, "tcp")?;
        let tcp6_before = service_stats(&before, web6, "tcp")?;
        for (key, want) in [
            ("fwd_bytes", run.v6.bytes_up),
            ("rev_bytes", run.v6.bytes_down),
            ("fwd_packets", run.v6.min_packets_up),
            ("rev_packets", run.v6.min_packets_down),
        ] {
            let got = field(tcp6, key)? - field(tcp6_before, key)?;
            ensure!(got >= want, "IPv6 tcp {key} grew by {got}, want >= {want}");
        }
        let udp6 = service_stats(&after, dns6, "udp")?;
        ensure!(
            field(udp6, "new_flows")? >= DS_UDP_SOCKETS as u64
                && field(udp6, "fwd_packets")? >= run.udp.requests as u64
                && field(udp6, "rev_packets")? >= run.udp.requests as u64,
            "IPv6 udp counters: {udp6}"
        );
        let tcp4 = service_stats(&after, web4, "tcp")?;
        ensure!(
            field(tcp4, "fwd_bytes")? >= run.v4.bytes_up,
            "IPv4 tcp counters: {tcp4}"
        );
        // inspect flows shows IPv6 flows as [addr]:port, with the IPv6 SNAT address.
        let flows = daemon.inspect_json("flows")?;
        let client6 = format!("[{CLIENT6}]:");
        let v6_flows: Vec<&Value> = flows
            .get("flows")
            .and_then(Value::as_array)
            .map(|all| {
                all.iter()
                    .filter(|f| {
                        f.get("client")
                            .and_then(Value::as_str)
                            .is_some_and(|c| c.starts_with(&client6))
                    })
                    .collect()
            })
            .unwrap_or_default();
        ensure!(
            !v6_flows.is_empty(),
            "no IPv6 flow in inspect flows: {flows}"
        );
        for f in &v6_flows {
            ensure!(
                f.get("snat").and_then(Value::as_str)
                    == Some(PROXY_HOME_SIDE6.to_string().as_str())
                    && f.get("upstream")
                        .and_then(Value::as_str)
                        .is_some_and(|u| u.starts_with(&format!("[{HOME6}]:"))),
                "IPv6 flow: {f}"
            );
        }
        let denied = reason(&after, "drop_acl_denied")? - reason(&before, "drop_acl_denied")?;
        ensure!(
            denied >= 2,
            "drop_acl_denied grew by {denied}, want >= 2 (two IPv6 connects)"
        );
        for r in ["fwd_redirect", "rev_redirect"] {
            let grew = reason(&after, r)? - reason(&before, r)?;
            let want = run.v6.min_packets_up.min(run.v6.min_packets_down);
            ensure!(grew >= want, "{r} grew by {grew}, want >= {want}");
        }
    }
    daemon.stop_ok(&mut lab)?;
    server4.stop()?;
    server6.stop()?;
    let (a, aaaa) = dns.stop_and_join()?;
    ensure!(
        a > 0 && aaaa > 0,
        "DNS queries answered: {a} A, {aaaa} AAAA"
    );
    Ok(())
}

#[test]
fn dual_stack_userspace() -> Result<()> {
    dual_stack(false)
}

#[test]
fn dual_stack_xdp() -> Result<()> {
    dual_stack(true)
}

/// One interface, IPv6 only (`home_cidrs` has no IPv4 prefix, so no IPv4 SNAT address is
/// needed), `snat_ipv6` set explicitly to the proxy's only IPv6 address (also the service
/// address): XDP_TX both ways, checksummed TCP transfers and UDP over IPv6, the home server sees
/// only the SNAT address, `fwd_tx`/`rev_tx` grew and the kernel forwarded no IPv6 packet.
#[test]
fn one_interface_ipv6_xdp() -> Result<()> {
    use netns::one::*;
    let _serial = serial();
    let netns::OneInterface {
        mut lab,
        bridge: _bridge,
        client,
        proxy,
        home,
    } = netns::OneInterface::new("ds1")?.with_ipv6()?;
    let svc = netns::sock6(PROXY6, DS_TCP_PORT);
    let udp_svc = netns::sock6(PROXY6, DS_UDP_PORT);
    let server = HomeServer::start(
        &home,
        netns::sock6(HOME6, DS_HOME_TCP),
        Some(netns::sock6(HOME6, DS_HOME_UDP)),
        CLIENT_LIMIT * 2,
    )?;
    let pin_dir = lab.mount_bpffs()?;
    let config = format!(
        r#"[datapath]
interfaces = ["{PROXY_DEV}"]
mode = "native"
pin_dir = "{pin}"

[nat]
snat_ipv6 = "{PROXY6}"
port_range = [{lo}, {hi}]
home_cidrs = ["{CIDR6}"]

[[service]]
name = "web6"
listen = "{svc}"
upstreams = ["{up}"]
health = {{ interval = "200ms", timeout = "150ms", rise = 1 }}

[[service]]
name = "dns6"
listen = "{udp_svc}"
protocol = "udp"
upstreams = ["{udp_up}"]
health = {{ kind = "none" }}
"#,
        pin = pin_dir.display(),
        lo = SNAT_PORTS.0,
        hi = SNAT_PORTS.1,
        up = netns::sock6(HOME6, DS_HOME_TCP),
        udp_up = netns::sock6(HOME6, DS_HOME_UDP),
    );
    let daemon = Daemon::start(&mut lab, &proxy, &config)?;
    daemon.wait_ready(
        &mut lab,
        &proxy,
        &[PROXY_DEV],
        2,
        Duration::from_secs(30),
        || false,
    )?;
    let before = proxy.ip6_snmp()?;
    let stats_before = daemon.stats()?;
    let result = client.run(CLIENT_LIMIT, move || async move {
        let body = get_root_until_up(svc).await.context("IPv6 service")?;
        ensure!(body.contains(&PROXY6.to_string()), "home saw: {body}");
        let conns = connect_all(svc, DS_CONNS, Duration::from_secs(5)).await?;
        let (tcp, udp) = tokio::join!(
            transfer_all(conns, 700),
            udp_exchange(udp_svc, DS_UDP_SOCKETS, DS_UDP_REQUESTS, 77),
        );
        let tcp = tcp.context("IPv6 transfers")?;
        let udp = udp.context("IPv6 UDP exchange")?;
        ensure!(
            udp.requests == DS_UDP_SOCKETS * DS_UDP_REQUESTS,
            "udp answered {}",
            udp.requests
        );
        Ok(tcp)
    });
    let after = proxy.ip6_snmp()?;
    let stats = daemon.stats()?;
    let tcp = match result {
        Ok(r) => r,
        Err(e) => {
            return Err(e.context(format!(
                "stats: {stats}\n--- daemon log ---\n{}",
                lab.log_tail(daemon.pid, 60)
            )));
        }
    };
    let peers = server.stats().peer_ips();
    ensure!(
        peers == BTreeSet::from([IpAddr::V6(PROXY6)]),
        "home saw {peers:?}"
    );
    let fwd = |m: &std::collections::HashMap<String, u64>| {
        m.get("Ip6OutForwDatagrams").copied().unwrap_or(0)
    };
    let kernel_fwd = fwd(&after).saturating_sub(fwd(&before));
    ensure!(
        kernel_fwd <= DS_KERNEL_FORWARD_SLACK,
        "the proxy's kernel forwarded {kernel_fwd} IPv6 packets"
    );
    let tcp6 = service_stats(&stats, svc, "tcp")?;
    let tcp6_before = service_stats(&stats_before, svc, "tcp")?;
    for (key, want) in [("fwd_bytes", tcp.bytes_up), ("rev_bytes", tcp.bytes_down)] {
        let got = field(tcp6, key)? - field(tcp6_before, key)?;
        ensure!(got >= want, "IPv6 tcp {key} grew by {got}, want >= {want}");
    }
    for r in ["fwd_tx", "rev_tx"] {
        let grew = reason(&stats, r)? - reason(&stats_before, r)?;
        let want = tcp.min_packets_up.min(tcp.min_packets_down);
        ensure!(grew >= want, "{r} grew by {grew}, want >= {want}: {stats}");
    }
    daemon.stop_ok(&mut lab)?;
    server.stop()?;
    Ok(())
}
