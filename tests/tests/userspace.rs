//! Namespace tests of the daemon's userspace data paths (the L4 scenarios shared with XDP live in
//! `namespace.rs`, parameterised by datapath):
//!
//! - `auto_falls_back_to_userspace_when_xdp_cannot_attach`: another program already holds the
//!   proxy's client-side interface through a bpf_link in driver mode, so the kernel refuses the
//!   daemon's native attachment (a bpf_link cannot be replaced: EBUSY) and its generic one
//!   (native and generic XDP cannot be active on one device at once); with `mode = "auto"` the
//!   daemon says so, undoes the attachment it made on the other interface, and serves the L4
//!   services in userspace.
//!
//! Run as root: `cargo test -p integration-tests --test userspace -- --nocapture`.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, ensure};
use integration_tests::netns::{self, Daemon, Netns, TwoInterface, sock, two};
use integration_tests::traffic::{self, Conn, HomeServer};

const HOME_PORT: u16 = 8080;
/// Bound of one test's client side.
const CLIENT_LIMIT: Duration = Duration::from_secs(120);
const READY: Duration = Duration::from_secs(30);

/// One test at a time: the machine has two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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
    Ok(())
}

/// `[datapath]` and `[nat]` of the two-interface shape, for `mode`.
fn base_config(mode: &str, interfaces: &[&str], pin_dir: &std::path::Path) -> String {
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
port_range = [20000, 29999]
home_cidrs = ["{cidr}"]

[admin]
listen = "127.0.0.1:9100"
"#,
        pin_dir = pin_dir.display(),
        snat = two::PROXY_HOME_SIDE,
        cidr = two::HOME_CIDR,
    )
}

/// `GET /` through `service`, retried (bounded) while the daemon comes up; the body names the
/// peer the home server saw.
async fn get_root(service: SocketAddr) -> Result<String> {
    let mut last = anyhow!("no attempt");
    for _ in 0..20 {
        let attempt = async {
            let mut c = Conn::connect(service, Duration::from_secs(2)).await?;
            let (status, body) = c.get_text("/").await?;
            ensure!(status.contains(" 200 "), "GET /: {status}");
            Ok(body)
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(body)) => return Ok(body),
            Ok(Err(e)) => last = e,
            Err(_) => last = anyhow!("GET / timed out"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(last.context("GET / never succeeded"))
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
        base_config(
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
    let status = admin_get(&topo.proxy, "/status")?;
    let status: serde_json::Value =
        serde_json::from_str(&status).with_context(|| format!("/status: {status}"))?;
    ensure!(
        status["datapath"]["mode"] == "userspace",
        "/status datapath: {}",
        status["datapath"]
    );
    let metrics = admin_get(&topo.proxy, "/metrics")?;
    ensure!(
        metrics
            .lines()
            .any(|l| l == r#"xdp_proxy_datapath_mode{mode="userspace"} 1"#),
        "/metrics has no xdp_proxy_datapath_mode{{mode=\"userspace\"}} 1"
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
        let body = get_root(tcp_service).await?;
        let udp = traffic::udp_exchange(udp_service, 2, 3, 5).await?;
        Ok((body, udp))
    })?;
    println!("GET /: {}", body.trim());
    ensure!(
        body.contains(&format!("you came from {}:", two::PROXY_HOME_SIDE)),
        "home saw another source: {body}"
    );
    ensure!(udp.requests == 6, "udp: {} requests answered", udp.requests);
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
    home.stop()?;
    drop(topo);
    check_cleaned(&id)
}

/// `GET path` from the daemon's admin listener (127.0.0.1:9100 inside `ns`).
fn admin_get(ns: &Netns, path: &str) -> Result<String> {
    ns.exec(
        "curl",
        &[
            "-sS",
            "--fail",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:9100{path}"),
        ],
    )
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
