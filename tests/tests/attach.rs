//! Namespace tests of attaching safely, on the two-interface shape (client -- proxy -- home) with
//! the veth peers `c0` and `h0` left at the kernel's defaults (GRO off, no XDP program), as a
//! container host or a test host has them:
//!
//! - `attach_native_refuses_veth_peers_that_drop`: `mode = "native"` exits non-zero before
//!   attaching, naming each interface, its peer and the fixes (`ethtool -K PEER gro on`, an XDP
//!   program on the peer); nothing is left attached.
//! - `attach_auto_runs_generic_where_native_would_drop`: `mode = "auto"` attaches both
//!   interfaces in generic mode, says why, and a checksummed download and upload go through.
//! - `attach_auto_never_mixes_modes`: only `h0` lacks GRO: `ph` cannot run native, so `pc` runs
//!   generic too (one mode per host), and traffic goes through.
//! - `attach_delivery_errors_show_in_status_and_log`: native with GRO on at both peers; then,
//!   with a connection open, `h0`'s MTU drops to 1000 while `ph` stays at 1500: the program
//!   still redirects full-sized segments into `ph` (its route lookup checks `ph`'s MTU), the
//!   veth cannot hand them to `h0` and drops them when the devmap flushes. The upload fails,
//!   and the loss shows as a number: `xdp_xmit_drops` of `ph` (counted by the program's `xdp`
//!   tracepoint companions) in `/metrics`, `lost_outbound_since_attach` in `/status`, and a
//!   warning naming `ph`.
//! - `attach_route_outside_devmap_goes_through_the_kernel`: the upstream is reachable only
//!   through a third proxy interface the daemon does not run (`px`, not in the devmap), and its
//!   replies come back to the SNAT address through `ph` (as on EC2, where packets to an ENI's
//!   address arrive on that ENI whatever way the request left). The rewritten packets are
//!   handed to the kernel (`pass_outside_devmap`), which forwards them although their source
//!   is the proxy's own address (the martian trap of DESIGN.md: `accept_local`, set by the
//!   daemon on its interfaces), and the replies are translated on `ph` as always: a checksummed
//!   download and upload complete.
//!
//! Run as root: `cargo test -p integration-tests --test attach -- --nocapture`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use integration_tests::netns::{Daemon, Netns, TwoInterface, serial, sock, two};
use integration_tests::soak::{admin_get, status};
use integration_tests::traffic::{Conn, HomeServer, get_root_until_up};
use serde_json::Value;

const HOME_PORT: u16 = 8080;
const LIMIT: Duration = Duration::from_secs(60);

fn service_addr() -> SocketAddr {
    sock(two::PROXY_CLIENT_SIDE, 80)
}

fn config(pin_dir: &std::path::Path, mode: &str) -> String {
    format!(
        r#"[datapath]
interfaces = ["{pc}", "{ph}"]
mode = "{mode}"
pin_dir = "{pin}"

[nat]
snat_ipv4 = "{snat}"
port_range = [20000, 29999]
home_cidrs = ["{cidr}"]

[[service]]
name = "web"
listen = "{svc}"
upstreams = ["{home}"]
"#,
        pc = two::PROXY_CLIENT_DEV,
        ph = two::PROXY_HOME_DEV,
        pin = pin_dir.display(),
        snat = two::PROXY_HOME_SIDE,
        cidr = two::HOME_CIDR,
        svc = service_addr(),
        home = sock(two::HOME, HOME_PORT),
    )
}

fn gro(ns: &Netns, dev: &str, on: bool) -> Result<()> {
    ns.exec(
        "ethtool",
        &["-K", dev, "gro", if on { "on" } else { "off" }],
    )
    .map(drop)
}

/// The lab with GRO as the test wants it at the peers (`TwoInterface` turns it on at both).
fn lab(tag: &str, c0_gro: bool, h0_gro: bool) -> Result<TwoInterface> {
    let topo = TwoInterface::new(tag)?;
    gro(&topo.client, two::CLIENT_DEV, c0_gro)?;
    gro(&topo.home, two::HOME_DEV, h0_gro)?;
    Ok(topo)
}

fn start(topo: &mut TwoInterface, mode: &str) -> Result<Daemon> {
    let pin_dir = topo.lab.mount_bpffs()?;
    let daemon = Daemon::start(&mut topo.lab, &topo.proxy, &config(&pin_dir, mode))?;
    daemon.wait_ready(
        &mut topo.lab,
        &topo.proxy,
        &[two::PROXY_CLIENT_DEV, two::PROXY_HOME_DEV],
        1,
        Duration::from_secs(30),
        || false,
    )?;
    Ok(daemon)
}

/// The mode of each attachment in `/status`, by interface.
fn modes(st: &Value) -> Vec<(String, String)> {
    st["datapath"]["interfaces"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    (
                        i["name"].as_str().unwrap_or_default().to_owned(),
                        i["mode"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A 1 MiB download and a 1 MiB upload through the service, every byte checked.
fn transfers(client: &Netns) -> Result<()> {
    client.run(LIMIT, || async {
        get_root_until_up(service_addr()).await?;
        let mut c = Conn::connect(service_addr(), Duration::from_secs(5)).await?;
        c.get_blob(7, 1 << 20).await?;
        c.put_sink(8, 1 << 20).await?;
        Ok(())
    })
}

#[test]
fn attach_native_refuses_veth_peers_that_drop() -> Result<()> {
    let _serial = serial();
    let mut topo = lab("atnat", false, false)?;
    let pin_dir = topo.lab.mount_bpffs()?;
    let daemon = Daemon::start(&mut topo.lab, &topo.proxy, &config(&pin_dir, "native"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while topo.lab.check_running(daemon.pid).is_ok() {
        ensure!(
            std::time::Instant::now() < deadline,
            "the daemon kept running with veth peers that drop native XDP frames\n{}",
            topo.lab.log_tail(daemon.pid, 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = daemon.stop(&mut topo.lab)?;
    ensure!(!status.success(), "exit status {status}: want a failure");
    let log = topo.lab.log_text(daemon.pid);
    for needle in [
        "native XDP would not deliver",
        "veth `pc`: its peer `c0`",
        "veth `ph`: its peer `h0`",
        "ethtool -K c0 gro on",
        "ethtool -K h0 gro on",
        "attach an XDP program to `h0`",
    ] {
        ensure!(log.contains(needle), "the error lacks {needle:?}:\n{log}");
    }
    for dev in [two::PROXY_CLIENT_DEV, two::PROXY_HOME_DEV] {
        ensure!(
            !integration_tests::netns::has_xdp(&topo.proxy, dev)?,
            "{dev} was left with an XDP program"
        );
    }
    Ok(())
}

#[test]
fn attach_auto_runs_generic_where_native_would_drop() -> Result<()> {
    let _serial = serial();
    let mut topo = lab("atgen", false, false)?;
    let home = HomeServer::start(&topo.home, sock(two::HOME, HOME_PORT), None, LIMIT * 2)?;
    let daemon = start(&mut topo, "auto")?;
    let st = status(&topo.proxy)?;
    ensure!(
        modes(&st)
            == vec![
                ("pc".to_owned(), "generic".to_owned()),
                ("ph".to_owned(), "generic".to_owned())
            ],
        "want both interfaces generic: {:?}",
        modes(&st)
    );
    daemon.wait_log(
        &mut topo.lab,
        &["native XDP would not deliver", "its peer `h0`"],
        1,
        Duration::from_secs(5),
    )?;
    transfers(&topo.client)?;
    let stats = daemon.stats()?;
    ensure!(
        stats.to_string().contains("fwd_redirect"),
        "the fast path forwarded nothing: {stats}"
    );
    daemon.stop_ok(&mut topo.lab)?;
    home.stop()
}

#[test]
fn attach_auto_never_mixes_modes() -> Result<()> {
    let _serial = serial();
    // c0 has GRO (pc could run native), h0 has not (ph cannot).
    let mut topo = lab("atmix", true, false)?;
    let home = HomeServer::start(&topo.home, sock(two::HOME, HOME_PORT), None, LIMIT * 2)?;
    let daemon = start(&mut topo, "auto")?;
    let st = status(&topo.proxy)?;
    ensure!(
        modes(&st).iter().all(|(_, m)| m == "generic") && modes(&st).len() == 2,
        "want one mode, generic, on both: {:?}",
        modes(&st)
    );
    ensure!(
        st["datapath"]["mode"] == "generic",
        "mode: {}",
        st["datapath"]["mode"]
    );
    transfers(&topo.client)?;
    daemon.stop_ok(&mut topo.lab)?;
    home.stop()
}

#[test]
fn attach_delivery_errors_show_in_status_and_log() -> Result<()> {
    let _serial = serial();
    let mut topo = lab("atdel", true, true)?;
    let home = HomeServer::start(&topo.home, sock(two::HOME, HOME_PORT), None, LIMIT * 2)?;
    let daemon = start(&mut topo, "native")?;
    let st = status(&topo.proxy)?;
    ensure!(
        modes(&st).iter().all(|(_, m)| m == "native"),
        "want native: {:?}",
        modes(&st)
    );
    transfers(&topo.client)?;
    let lost = |st: &Value, dev: &str| -> Option<u64> {
        st["datapath"]["interfaces"]
            .as_array()?
            .iter()
            .find(|i| i["name"] == dev)?["lost_outbound_since_attach"]
            .as_u64()
    };
    let before = lost(&status(&topo.proxy)?, two::PROXY_HOME_DEV);
    ensure!(
        before == Some(0),
        "ph lost frames before the black hole: {before:?}"
    );

    // The black hole: h0's MTU drops below ph's while a connection is open. The program's
    // route lookup checks ph's MTU (1500) and redirects full-sized segments; the veth cannot
    // put them into h0's ring (longer than h0 takes) and drops them when the devmap flushes.
    let home_ns = topo.home.name().to_owned();
    let failed = topo.client.run(LIMIT, move || async move {
        let mut c = Conn::connect(service_addr(), Duration::from_secs(5)).await?;
        c.get_blob(3, 4096).await?;
        std::process::Command::new("ip")
            .args(["-n", &home_ns, "link", "set", two::HOME_DEV, "mtu", "1000"])
            .status()?;
        Ok(
            tokio::time::timeout(Duration::from_secs(4), c.put_sink(9, 256 * 1024))
                .await
                .map_or(true, |r| r.is_err()),
        )
    })?;
    ensure!(failed, "a connection went through the black hole");
    let lines = daemon.wait_log(
        &mut topo.lab,
        &[
            "the kernel dropped frames leaving this interface",
            "interface=ph",
        ],
        1,
        Duration::from_secs(10),
    )?;
    println!("warning: {}", lines[0]);
    let after = lost(&status(&topo.proxy)?, two::PROXY_HOME_DEV).unwrap_or(0);
    ensure!(
        after > 0,
        "/status shows no loss on ph: {:#}",
        status(&topo.proxy)?
    );
    let (code, metrics) = admin_get(&topo.proxy, "/metrics")?;
    ensure!(code == 200, "/metrics: {code}");
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with(
                r#"xdp_proxy_interface_kernel_drops_total{interface="ph",counter="xdp_xmit_drops"}"#,
            )
        })
        .map(str::to_owned);
    let Some(line) = line else {
        bail!("/metrics has no xdp_xmit_drops of ph:\n{metrics}");
    };
    let v: u64 = line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    ensure!(v > 0, "{line}");
    // `inspect stats` shows the same per interface, read from the pins and the kernel.
    let stats = daemon.stats()?;
    let ph = stats["interfaces"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == two::PROXY_HOME_DEV))
        .cloned()
        .unwrap_or_default();
    ensure!(
        ph["kernel"]["xdp_xmit_drops"].as_u64().unwrap_or(0) > 0,
        "inspect stats shows no loss on ph: {stats:#}"
    );
    ensure!(
        daemon.stats_table()?.contains("XDP XMIT DROPS"),
        "inspect stats (table) has no interface table"
    );
    daemon.stop_ok(&mut topo.lab)?;
    home.stop()
}

/// The far upstream's subnets: `px` (proxy) -- `f0` (far) on 10.202.0.0/24; `f1` (far) --
/// `hf` (home) on 10.201.0.0/24.
const FAR: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 202, 0, 2);

#[test]
fn attach_route_outside_devmap_goes_through_the_kernel() -> Result<()> {
    let _serial = serial();
    let mut topo = lab("atout", true, true)?;
    let far = topo.lab.add_netns("far")?;
    topo.lab.add_veth(&topo.proxy, "px", &far, "f0")?;
    topo.lab.add_veth(&far, "f1", &topo.home, "hf")?;
    topo.proxy
        .ip(&["addr", "add", "10.202.0.1/24", "dev", "px"])?;
    far.ip(&["addr", "add", &format!("{FAR}/24"), "dev", "f0"])?;
    far.ip(&["addr", "add", "10.201.0.2/24", "dev", "f1"])?;
    topo.home
        .ip(&["addr", "add", "10.201.0.1/24", "dev", "hf"])?;
    // Replies to the SNAT address (10.200.0.1) leave far toward home, which routes them to the
    // proxy's ph: they arrive on a datapath interface.
    far.ip(&["route", "add", "default", "via", "10.201.0.1"])?;
    topo.home.sysctl("net.ipv4.ip_forward", "1")?;
    integration_tests::netns::tx_checksum_off(&far, "f0")?;
    integration_tests::netns::tx_checksum_off(&far, "f1")?;
    let upstream = sock(FAR, HOME_PORT);
    let far_server = HomeServer::start(&far, upstream, None, LIMIT * 2)?;
    let pin_dir = topo.lab.mount_bpffs()?;
    let cfg = config(&pin_dir, "native")
        .replace(
            &format!("home_cidrs = [\"{}\"]", two::HOME_CIDR),
            &format!("home_cidrs = [\"{}\", \"10.202.0.0/24\"]", two::HOME_CIDR),
        )
        .replace(
            &sock(two::HOME, HOME_PORT).to_string(),
            &upstream.to_string(),
        );
    ensure!(
        cfg.contains("10.202.0.0/24") && cfg.contains(&upstream.to_string()),
        "{cfg}"
    );
    let daemon = Daemon::start(&mut topo.lab, &topo.proxy, &cfg)?;
    daemon.wait_ready(
        &mut topo.lab,
        &topo.proxy,
        &[two::PROXY_CLIENT_DEV, two::PROXY_HOME_DEV],
        1,
        Duration::from_secs(30),
        || false,
    )?;
    transfers(&topo.client)?;
    let stats = daemon.stats()?;
    let reason = |name: &str| stats["reasons"][name].as_u64().unwrap_or(0);
    ensure!(
        reason("pass_outside_devmap") > 100 && reason("rev_redirect") > 100,
        "want the forward direction through the kernel and the replies redirected: {stats:#}"
    );
    ensure!(
        reason("drop_redirect_failed") == 0,
        "a packet was dropped for its egress: {stats:#}"
    );
    ensure!(
        far_server
            .stats()
            .peer_ips()
            .contains(&std::net::IpAddr::V4(two::PROXY_HOME_SIDE)),
        "the far upstream saw {:?}, not the SNAT address",
        far_server.stats().peer_ips()
    );
    daemon.stop_ok(&mut topo.lab)?;
    far_server.stop()
}
