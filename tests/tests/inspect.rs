//! The `inspect` and `flows` CLI against a live daemon in namespaces and against its pinned maps
//! after it exited; JSON checked against the traffic the test sent; the documented exit codes.
//!
//! Run as root: `cargo test -p integration-tests --test inspect -- --nocapture`. The daemon
//! binary comes from `$XDP_PROXY_BIN` or the same target directory (`cargo xtask test` builds it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, ensure};
use integration_tests::netns::{self, Daemon, TwoInterface, two};
use integration_tests::traffic::{self, Conn, HomeServer};
use serde_json::Value;

const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const HOME_PORT: u16 = 8080;
const SNAT_PORTS: (u16, u16) = (20_000, 29_999);
/// TCP connections held open while the CLI looks at them.
const CONNS: usize = 4;
/// Bytes each connection downloads and uploads (payload, without HTTP headers).
const DOWN: u64 = 200_000;
const UP: u64 = 50_000;
const UDP_SOCKETS: usize = 3;
const UDP_PER_SOCKET: usize = 2;
/// Per IP packet at most 20 (IPv4) + 60 (TCP with options) header bytes; plus HTTP heads.
const MAX_HEADER_PER_PACKET: u64 = 80;
const HTTP_HEADS: u64 = 2048;
const LIMIT: Duration = Duration::from_secs(60);

// Exit codes (docs/inspect-json.md).
const EXIT_NO_PIN_DIR: i32 = 3;
const EXIT_PERMISSION: i32 = 4;
const EXIT_LAYOUT: i32 = 5;
const EXIT_DAEMON_VERSION: i32 = 6;
const EXIT_REFUSED: i32 = 7;
const EXIT_NO_MATCH: i32 = 8;

/// What one CLI run gave.
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(self) -> Result<String> {
        ensure!(self.code == 0, "exit {}: {}", self.code, self.stderr);
        Ok(self.stdout)
    }

    fn json(self) -> Result<Value> {
        let text = self.ok()?;
        serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))
    }
}

/// Run `xdp-proxy ARGS` with stdin not a terminal (/dev/null).
fn cli(bin: &Path, args: &[&str], uid: Option<u32>) -> Result<Out> {
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null());
    if let Some(uid) = uid {
        use std::os::unix::process::CommandExt as _;
        cmd.uid(uid).gid(uid);
    }
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {} {args:?}", bin.display()))?;
    Ok(Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Run `xdp-proxy ARGS` on a terminal (a pty made by `script`) and type `answer` into it.
/// The terminal merges stderr into stdout.
fn cli_on_tty(bin: &Path, args: &[&str], answer: &str) -> Result<Out> {
    use std::io::Write as _;
    let line = std::iter::once(bin.to_string_lossy().into_owned())
        .chain(args.iter().map(|a| (*a).to_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run script(1) (util-linux) for a terminal")?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow!("no stdin"))?
        .write_all(answer.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok(Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// The metadata file of `pin_dir`, by the rule in docs/inspect-json.md.
fn meta_path(pin_dir: &Path) -> PathBuf {
    let s = pin_dir.to_string_lossy();
    let mut name = String::new();
    for (i, b) in s
        .trim_start_matches('/')
        .trim_end_matches('/')
        .bytes()
        .enumerate()
    {
        match b {
            b'/' => name.push('-'),
            b'.' if i == 0 => name.push_str("%2E"),
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' => name.push(char::from(b)),
            _ => name.push_str(&format!("%{b:02X}")),
        }
    }
    Path::new("/run/xdp-proxy").join(name + ".json")
}

/// Removes the daemon's metadata file (it outlives the daemon by design).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn config(pin_dir: &Path, upstream: SocketAddr) -> String {
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
listen = "{PROXY_CLIENT_SIDE}:{TCP_PORT}"
protocol = "tcp"
upstreams = ["{upstream}"]

[[service]]
name = "dns"
listen = "{PROXY_CLIENT_SIDE}:{UDP_PORT}"
protocol = "udp"
upstreams = ["{upstream}"]
"#,
        pin = pin_dir.display(),
        lo = SNAT_PORTS.0,
        hi = SNAT_PORTS.1,
    )
}

/// What the client sent: its connections' local addresses.
struct Sent {
    clients: Vec<SocketAddr>,
}

/// Each flow row whose client is one of ours: checked against what was sent.
fn check_flow_rows(flows: &Value, sent: &Sent, state: Option<&str>) -> Result<()> {
    let rows = flows["flows"]
        .as_array()
        .ok_or_else(|| anyhow!("no flows array: {flows}"))?;
    for client in &sent.clients {
        let row = rows
            .iter()
            .find(|r| r["client"].as_str() == Some(client.to_string().as_str()))
            .ok_or_else(|| anyhow!("no flow for client {client}: {flows}"))?;
        let n = |k: &str| row[k].as_u64().ok_or_else(|| anyhow!("{k} missing: {row}"));
        ensure!(
            row["service_name"] == "web" && row["proto"] == "tcp",
            "{row}"
        );
        if let Some(state) = state {
            ensure!(row["state"] == state, "want state {state}: {row}");
        }
        ensure!(row["has_reverse"] == true, "{row}");
        ensure!(
            row["upstream"].as_str()
                == Some(netns::sock(two::HOME, HOME_PORT).to_string().as_str())
                && row["snat"].as_str() == Some(two::PROXY_HOME_SIDE.to_string().as_str()),
            "{row}"
        );
        let port = n("snat_port")?;
        ensure!(
            (u64::from(SNAT_PORTS.0)..=u64::from(SNAT_PORTS.1)).contains(&port),
            "SNAT port {port} outside the range"
        );
        let (fp, fb, rp, rb) = (
            n("fwd_packets")?,
            n("fwd_bytes")?,
            n("rev_packets")?,
            n("rev_bytes")?,
        );
        // Bytes are IP lengths: the payload plus at most the headers of every packet.
        ensure!(
            fb >= UP && fb <= UP + HTTP_HEADS + fp * MAX_HEADER_PER_PACKET,
            "fwd_bytes {fb} for {UP} bytes up in {fp} packets: {row}"
        );
        ensure!(
            rb >= DOWN && rb <= DOWN + HTTP_HEADS + rp * MAX_HEADER_PER_PACKET,
            "rev_bytes {rb} for {DOWN} bytes down in {rp} packets: {row}"
        );
        ensure!(
            row["age_s"]
                .as_f64()
                .is_some_and(|a| (0.0..600.0).contains(&a)),
            "{row}"
        );
    }
    Ok(())
}

#[test]
fn inspect_live_daemon_then_pins_after_exit() -> Result<()> {
    let mut topo = TwoInterface::new("insp")?;
    let upstream = netns::sock(two::HOME, HOME_PORT);
    let home = HomeServer::start(&topo.home, upstream, Some(upstream), LIMIT * 3)?;
    let pin_dir = topo.lab.mount_bpffs()?;
    let _meta = RemoveOnDrop(meta_path(&pin_dir));
    let daemon = Daemon::start(&mut topo.lab, &topo.proxy, &config(&pin_dir, upstream))?;
    daemon.wait_ready(
        &mut topo.lab,
        &topo.proxy,
        &[two::PROXY_CLIENT_DEV, two::PROXY_HOME_DEV],
        2,
        Duration::from_secs(30),
        || false,
    )?;
    let bin = daemon.bin.clone();
    let pins = pin_dir.to_string_lossy().into_owned();
    let run = |args: &[&str]| -> Result<Out> {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--pin-dir", pins.as_str()]);
        cli(&bin, &all, None)
    };

    // Client: CONNS connections, each uploads and downloads, then stays open until stopped.
    let tcp_service = netns::sock(two::PROXY_CLIENT_SIDE, TCP_PORT);
    let udp_service = netns::sock(two::PROXY_CLIENT_SIDE, UDP_PORT);
    let (tx, rx) = mpsc::channel();
    let client = topo.client.spawn(LIMIT * 2, move |mut stop| async move {
        let mut conns = Vec::new();
        for i in 0..CONNS {
            // The first connects may race the datapath's first neighbour resolution: retry.
            let mut c = None;
            for _ in 0..20 {
                if let Ok(x) = Conn::connect(tcp_service, Duration::from_secs(2)).await {
                    c = Some(x);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let mut c = c.ok_or_else(|| anyhow!("cannot connect to {tcp_service}"))?;
            c.put_sink(i as u64, UP).await.context("upload")?;
            c.get_blob(100 + i as u64, DOWN).await.context("download")?;
            conns.push(c);
        }
        let udp = traffic::udp_exchange(udp_service, UDP_SOCKETS, UDP_PER_SOCKET, 5).await?;
        let _ = tx.send((
            conns.iter().map(Conn::local_addr).collect::<Vec<_>>(),
            udp.requests,
        ));
        stop.wait().await;
        drop(conns);
        Ok(())
    })?;
    let (clients, udp_requests) = rx
        .recv_timeout(LIMIT)
        .map_err(|_| anyhow!("client did not finish its transfers"))?;
    let sent = Sent { clients };
    println!("clients: {:?}, udp requests: {udp_requests}", sent.clients);

    // --- live daemon: flows, filters, limit ---
    let flows = run(&["inspect", "flows", "--json", "--service", "web"])?.json()?;
    ensure!(
        flows["schema_version"] == 1 && flows["kind"] == "flows",
        "{flows}"
    );
    check_flow_rows(&flows, &sent, Some("established"))?;
    let client_cidr = format!("{}/32", two::CLIENT);
    let mine = run(&[
        "inspect",
        "flows",
        "--json",
        "--service",
        "1",
        "--client",
        &client_cidr,
        "--state",
        "established",
    ])?
    .json()?;
    ensure!(
        mine["matched"].as_u64() == Some(CONNS as u64),
        "--service 1 --client {client_cidr} --state established: want {CONNS} flows: {mine}"
    );
    let limited = run(&[
        "inspect",
        "flows",
        "--json",
        "--service",
        "web",
        "--limit",
        "2",
    ])?
    .json()?;
    ensure!(
        limited["flows"].as_array().map(Vec::len) == Some(2)
            && limited["matched"].as_u64() >= Some(CONNS as u64),
        "--limit 2: {limited}"
    );
    let udp = run(&["inspect", "flows", "--json", "--service", "dns"])?.json()?;
    ensure!(
        udp["matched"].as_u64() == Some(UDP_SOCKETS as u64),
        "want {UDP_SOCKETS} UDP flows: {udp}"
    );
    let none = run(&["inspect", "flows", "--json", "--upstream", "10.200.0.99"])?.json()?;
    ensure!(none["matched"] == 0, "{none}");
    let fin = run(&[
        "inspect",
        "flows",
        "--json",
        "--state",
        "closed",
        "--client",
        &sent.clients[0].to_string(),
    ])?
    .json()?;
    ensure!(
        fin["matched"] == 0,
        "an open connection is not closed: {fin}"
    );
    let table = run(&["inspect", "flows", "--service", "web"])?.ok()?;
    println!("{table}");
    ensure!(
        table.contains("web 10.100.0.1:80") && table.contains("established"),
        "{table}"
    );
    let bad = run(&["inspect", "flows", "--service", "nosuch"])?;
    ensure!(
        bad.code == 2
            && bad.stderr.contains("no service named `nosuch`")
            && bad.stderr.contains("web (1)"),
        "unknown service name: exit {} {}",
        bad.code,
        bad.stderr
    );

    // --- stats, services, upstreams, maps ---
    let stats = run(&["inspect", "stats", "--json"])?.json()?;
    let web = stats["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "web"))
        .ok_or_else(|| anyhow!("no service named web in stats: {stats}"))?;
    ensure!(web["new_flows"].as_u64() >= Some(CONNS as u64), "{web}");
    ensure!(
        web["rev_bytes"].as_u64() >= Some(DOWN * CONNS as u64),
        "{web}"
    );
    ensure!(
        stats["daemon"]["version"].is_string() && stats["daemon"]["running"] == true,
        "{stats}"
    );
    let services = run(&["inspect", "services", "--json"])?.json()?;
    ensure!(
        services["services"][0]["name"] == "web"
            && services["services"][0]["has_upstreams"] == true,
        "{services}"
    );
    let ups = run(&["inspect", "upstreams", "--json"])?.json()?;
    ensure!(
        ups["upstreams"][0]["services"] == serde_json::json!(["web", "dns"])
            && ups["upstreams"][0]["maglev_slots"].as_u64() > Some(0),
        "{ups}"
    );
    let maps = run(&["inspect", "maps", "--json"])?.json()?;
    let map = |name: &str| {
        maps["maps"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == name))
            .cloned()
            .ok_or_else(|| anyhow!("map {name} not listed: {maps}"))
    };
    let fwd = map("XP_FLOWS_FWD")?;
    ensure!(
        fwd["type"] == "lru_hash"
            && fwd["key_size"] == std::mem::size_of::<proxy_common::FlowKey>()
            && fwd["value_size"] == std::mem::size_of::<proxy_common::FlowValue>()
            && fwd["used_entries"].as_u64() >= Some((CONNS + UDP_SOCKETS) as u64)
            && fwd["memory_source"] == "memlock"
            && fwd["memory_bytes"].as_u64() > Some(0),
        "{fwd}"
    );
    let svc = map("XP_SERVICES")?;
    ensure!(svc["used_entries"] == 2, "{svc}");
    for name in [
        "XP_CONFIG",
        "XP_UPSTREAMS",
        "XP_MAGLEV",
        "XP_FLOWS_REV",
        "XP_DEVMAP",
        "XP_REASONS",
        "XP_SVC_STATS",
        "XP_UPS_STATS",
    ] {
        map(name)?;
    }
    println!("{}", run(&["inspect", "maps"])?.ok()?);
    // For docs/inspect-json.md ("BTF"): whether the kernel holds BTF for a pinned map.
    if let Ok(show) = netns::run_cmd(
        Command::new("bpftool")
            .args(["map", "show", "pinned"])
            .arg(pin_dir.join(format!("v{}/XP_FLOWS_FWD", proxy_common::ABI_VERSION))),
    ) {
        println!("bpftool map show: {}", show.trim());
    }
    let watch = run(&[
        "inspect",
        "stats",
        "--watch",
        "--interval",
        "0.2",
        "--count",
        "2",
        "--json",
    ])?
    .ok()?;
    let lines: Vec<Value> = watch
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("--watch --json lines: {watch}"))?;
    ensure!(
        lines.len() == 2 && lines.iter().all(|l| l["kind"] == "rates"),
        "{watch}"
    );
    let human = run(&[
        "inspect",
        "stats",
        "--watch",
        "--interval",
        "0.2",
        "--count",
        "1",
    ])?
    .ok()?;
    ensure!(
        human.contains("rates over the last") && human.contains("NEW FLOWS/S"),
        "{human}"
    );

    // --- errors against live pins ---
    let nobody = cli(
        &bin,
        &["inspect", "stats", "--pin-dir", &pins],
        Some(65_534),
    )?;
    ensure!(
        nobody.code == EXIT_PERMISSION,
        "as nobody: exit {} {}",
        nobody.code,
        nobody.stderr
    );
    let foreign_meta = topo.lab.run_dir().join("meta-other");
    std::fs::create_dir_all(&foreign_meta)?;
    std::fs::write(
        foreign_meta.join(meta_path(&pin_dir).file_name().unwrap_or_default()),
        r#"{"format": 99, "daemon_version": "9.9.9"}"#,
    )?;
    let other = run(&[
        "inspect",
        "stats",
        "--meta-dir",
        &foreign_meta.to_string_lossy(),
    ])?;
    ensure!(
        other.code == EXIT_DAEMON_VERSION && other.stderr.contains("9.9.9"),
        "metadata of another version: exit {} {}",
        other.code,
        other.stderr
    );

    // --- operator actions: refused without --yes off a terminal, then done with it ---
    let victim = sent.clients[0].to_string();
    let refused = run(&["flows", "delete", "--client", &victim, "--service", "web"])?;
    ensure!(
        refused.code == EXIT_REFUSED,
        "no --yes, no tty: exit {} {}",
        refused.code,
        refused.stderr
    );
    let still = run(&["inspect", "flows", "--json", "--client", &victim])?.json()?;
    ensure!(
        still["matched"] == 1,
        "refused delete removed the flow: {still}"
    );
    let deleted = run(&[
        "flows",
        "delete",
        "--client",
        &victim,
        "--service",
        "web",
        "--yes",
    ])?
    .ok()?;
    ensure!(deleted.contains("deleted 1 flow"), "{deleted}");
    let gone = run(&["inspect", "flows", "--json", "--client", &victim])?.json()?;
    ensure!(gone["matched"] == 0, "deleted flow still listed: {gone}");
    // On a terminal: asked, and only "y" goes ahead.
    let second = sent.clients[1].to_string();
    let tty_args = [
        "flows",
        "delete",
        "--client",
        &second,
        "--service",
        "web",
        "--pin-dir",
        &pins,
    ];
    let no = cli_on_tty(&bin, &tty_args, "n\n")?;
    ensure!(
        no.code == EXIT_REFUSED && no.stdout.contains("Continue? [y/N]"),
        "answered n: exit {} {}",
        no.code,
        no.stdout
    );
    let still = run(&["inspect", "flows", "--json", "--client", &second])?.json()?;
    ensure!(
        still["matched"] == 1,
        "answered n, but the flow is gone: {still}"
    );
    let yes = cli_on_tty(&bin, &tty_args, "y\n")?;
    ensure!(
        yes.code == 0 && yes.stdout.contains("deleted 1 flow"),
        "answered y: exit {} {}",
        yes.code,
        yes.stdout
    );
    let again = run(&[
        "flows",
        "delete",
        "--client",
        &victim,
        "--service",
        "web",
        "--yes",
    ])?;
    ensure!(
        again.code == EXIT_NO_MATCH,
        "second delete: exit {} {}",
        again.code,
        again.stderr
    );

    // --- after the daemon exited: the pins and the metadata stay readable ---
    client.stop_and_join()?;
    daemon.stop_ok(&mut topo.lab)?;
    let after = run(&["inspect", "flows", "--json", "--service", "web"])?.json()?;
    let rest: Vec<&Value> = after["flows"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter(|r| r["client"] != victim.as_str() && r["client"] != second.as_str())
                .collect()
        })
        .unwrap_or_default();
    ensure!(
        rest.len() >= CONNS - 2,
        "flows after the daemon exited: {after}"
    );
    // The client closed its connections meanwhile: any state; the counters still hold.
    let rest = Sent {
        clients: sent.clients[2..].to_vec(),
    };
    check_flow_rows(&after, &rest, None)?;
    let stats = run(&["inspect", "stats", "--json"])?.json()?;
    ensure!(
        stats["services"][0]["name"] == "web" && stats["daemon"]["running"] == false,
        "names after exit: {stats}"
    );
    let refused = run(&["flows", "flush", "--service", "web"])?;
    ensure!(
        refused.code == EXIT_REFUSED,
        "flush without --yes: exit {}",
        refused.code
    );
    let flushed = run(&["flows", "flush", "--service", "web", "--yes"])?.ok()?;
    ensure!(flushed.contains("deleted"), "{flushed}");
    let empty = run(&["inspect", "flows", "--json", "--service", "web"])?.json()?;
    ensure!(empty["matched"] == 0, "after flush: {empty}");
    let dns_left = run(&["inspect", "flows", "--json", "--service", "dns"])?.json()?;
    ensure!(
        dns_left["matched"] == UDP_SOCKETS,
        "flush of web touched dns: {dns_left}"
    );
    home.stop()
}

/// A scratch directory under /run removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Result<Self> {
        let p = Path::new("/run").join(format!("xpt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn error_exit_codes_without_a_daemon() -> Result<()> {
    let bin = netns::daemon_binary()?;
    let dir = Scratch::new("inspecterr")?;
    let pins = dir.0.join("pins");
    let p = pins.to_string_lossy().into_owned();

    // No pin directory at all.
    for what in ["stats", "flows", "services", "upstreams", "maps"] {
        let out = cli(&bin, &["inspect", what, "--pin-dir", &p], None)?;
        ensure!(
            out.code == EXIT_NO_PIN_DIR && out.stderr.contains("does not exist"),
            "inspect {what}: exit {} {}",
            out.code,
            out.stderr
        );
    }
    // Only another layout version's directory.
    let ours = format!("v{}", proxy_common::ABI_VERSION);
    let other = format!("v{}", proxy_common::ABI_VERSION + 1);
    std::fs::create_dir_all(pins.join(&other))?;
    let out = cli(&bin, &["inspect", "stats", "--pin-dir", &p], None)?;
    ensure!(
        out.code == EXIT_LAYOUT && out.stderr.contains(&format!("layout {other}")),
        "{other} only: exit {} {}",
        out.code,
        out.stderr
    );
    // Our version's directory, but without our maps.
    std::fs::create_dir_all(pins.join(&ours))?;
    let out = cli(&bin, &["inspect", "flows", "--pin-dir", &p], None)?;
    ensure!(
        out.code == EXIT_LAYOUT && out.stderr.contains("is missing"),
        "empty {ours}: exit {} {}",
        out.code,
        out.stderr
    );
    // Operator actions read the flows first: the same errors; and usage errors.
    let out = cli(
        &bin,
        &["flows", "flush", "--service", "3", "--pin-dir", &p],
        None,
    )?;
    ensure!(
        out.code == EXIT_LAYOUT,
        "flush: exit {} {}",
        out.code,
        out.stderr
    );
    let out = cli(
        &bin,
        &["flows", "delete", "--client", "10.0.0.1", "--service", "3"],
        None,
    )?;
    ensure!(
        out.code == 2,
        "delete without a port is a usage error: exit {}",
        out.code
    );
    Ok(())
}
