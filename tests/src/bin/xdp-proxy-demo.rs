//! `cargo xtask run`: a self-contained demo of xdp-proxy in network namespaces.
//!
//! Builds client -> proxy -> home (two-interface shape), serves HTTP in the home namespace,
//! starts the daemon (`$XDP_PROXY_BIN`) on the proxy, sends a few requests from the client to
//! http://10.100.0.1/, prints each answer and the datapath counters, then removes everything
//! (also on Ctrl-C and on errors). Needs root.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use integration_tests::netns::{self, Daemon, TwoInterface, daemon_binary, two};
use integration_tests::traffic::{Conn, HomeServer};

const STEPS: usize = 6;
const REQUESTS: usize = 5;
const BLOB_LEN: u64 = 1 << 20;
const SERVICE_PORT: u16 = 80;
const HOME_PORT: u16 = 8080;

fn step(n: usize, what: &str) {
    println!("[{n}/{STEPS}] {what}");
}

fn check(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

fn demo(cancel: &AtomicBool) -> Result<()> {
    let service = netns::sock(two::PROXY_CLIENT_SIDE, SERVICE_PORT);
    let upstream = netns::sock(two::HOME, HOME_PORT);

    let bin = daemon_binary()?;
    println!("xdp-proxy demo, daemon binary {}", bin.display());
    step(1, "creating namespaces and veth pairs");
    let mut topo = TwoInterface::new("demo")?;
    println!(
        "      {c} [{cd}] --- [{pc}] {p1} (proxy) {p2} [{ph}] --- [{hd}] {h}",
        c = two::CLIENT,
        cd = two::CLIENT_DEV,
        pc = two::PROXY_CLIENT_DEV,
        p1 = two::PROXY_CLIENT_SIDE,
        p2 = two::PROXY_HOME_SIDE,
        ph = two::PROXY_HOME_DEV,
        hd = two::HOME_DEV,
        h = two::HOME,
    );
    println!(
        "      namespaces: {}, {}, {}",
        topo.client.name(),
        topo.proxy.name(),
        topo.home.name()
    );
    check(cancel)?;

    step(
        2,
        &format!("starting an HTTP server on {upstream} in the home namespace"),
    );
    let home = HomeServer::start(&topo.home, upstream, None, Duration::from_secs(600))?;
    check(cancel)?;

    let pin_dir = topo.lab.mount_bpffs()?;
    let config = format!(
        r#"[datapath]
interfaces = ["{pc}", "{ph}"]
mode = "native"
pin_dir = "{pin}"

[nat]
snat_ipv4 = "{snat}"
port_range = [20000, 29999]
home_cidrs = ["{cidr}"]

[admin]
listen = "127.0.0.1:9100"

[[service]]
name = "web"
listen = "{service}"
protocol = "tcp"
mode = "l4"
upstreams = ["{upstream}"]
"#,
        pc = two::PROXY_CLIENT_DEV,
        ph = two::PROXY_HOME_DEV,
        pin = pin_dir.display(),
        snat = two::PROXY_HOME_SIDE,
        cidr = two::HOME_CIDR,
    );
    step(
        3,
        "starting xdp-proxy in the proxy namespace with this config:",
    );
    for line in config.lines() {
        println!("      | {line}");
    }
    let daemon = Daemon::start(&mut topo.lab, &topo.proxy, &config)?;
    println!(
        "      daemon pid {}, log {}/xdp-proxy.log",
        daemon.pid,
        topo.lab.run_dir().display()
    );
    daemon.wait_ready(
        &mut topo.lab,
        &topo.proxy,
        &[two::PROXY_CLIENT_DEV, two::PROXY_HOME_DEV],
        1,
        Duration::from_secs(30),
        || cancel.load(Ordering::Relaxed),
    )?;
    println!(
        "      XDP attached to {} and {}",
        two::PROXY_CLIENT_DEV,
        two::PROXY_HOME_DEV
    );
    check(cancel)?;

    step(
        4,
        &format!("sending requests from the client to http://{service}/"),
    );
    let lines = topo
        .client
        .run(Duration::from_secs(60), move || async move {
            let mut lines = Vec::new();
            for i in 0..REQUESTS {
                // Retried a few times: the first request may race the daemon's first map fill.
                let mut answer = None;
                for _ in 0..10 {
                    let attempt = async {
                        let mut c = Conn::connect(service, Duration::from_secs(2)).await?;
                        let local = c.local_addr();
                        let (status, body) = c.get_text("/").await?;
                        Ok::<_, anyhow::Error>(format!(
                            "GET / from {local}: {status} | {}",
                            body.trim()
                        ))
                    };
                    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                        Ok(Ok(line)) => {
                            answer = Some(line);
                            break;
                        }
                        Ok(Err(_)) | Err(_) => {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                    }
                }
                let Some(line) = answer else {
                    bail!("request {} got no answer", i + 1);
                };
                println!("      {line}");
                lines.push(line);
            }
            let mut c = Conn::connect(service, Duration::from_secs(2)).await?;
            let sum = c.get_blob(42, BLOB_LEN).await?;
            let line =
                format!("GET /blob ({BLOB_LEN} bytes): every byte checked, fnv64 {sum:016x}");
            println!("      {line}");
            lines.push(line);
            Ok(lines)
        })?;
    let peers = home.stats().peer_ips();
    println!(
        "      {} answers; the home server saw these client addresses: {peers:?}",
        lines.len()
    );
    check(cancel)?;

    step(5, "xdp-proxy inspect stats");
    let table = daemon.stats_table().context("inspect stats")?;
    for line in table.lines() {
        println!("      {line}");
    }

    step(6, "stopping the daemon and removing the namespaces");
    let status = daemon.stop(&mut topo.lab)?;
    println!("      daemon exited: {status}");
    home.stop()?;
    drop(topo);
    if !status.success() {
        bail!("the daemon exited with {status}");
    }
    println!("done.");
    Ok(())
}

fn main() -> ExitCode {
    let cancel = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Result<()>>();
    let worker_cancel = Arc::clone(&cancel);
    let worker = std::thread::spawn(move || {
        let _ = done_tx.send(demo(&worker_cancel));
    });

    // The main thread only waits for the demo or for Ctrl-C / SIGTERM. On a signal the demo
    // stops at its next step, and unwinding its lab stops the daemon and removes the namespaces.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("xdp-proxy-demo: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let wait_done = async {
            loop {
                match done_rx.try_recv() {
                    Ok(r) => return r,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        return Err(anyhow::anyhow!("the demo thread panicked"));
                    }
                    Err(std::sync::mpsc::TryRecvError::Empty) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        };
        tokio::select! {
            r = wait_done => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            Some(()) = async { match term.as_mut() { Some(t) => t.recv().await, None => None } } =>
                Err(anyhow::anyhow!("terminated")),
        }
    });
    if result.is_err() && !worker.is_finished() {
        eprintln!("xdp-proxy-demo: stopping, cleaning up...");
        cancel.store(true, Ordering::Relaxed);
        // Bounded: every step of the demo is bounded; give it time to unwind its lab.
        match done_rx.recv_timeout(Duration::from_secs(90)) {
            Ok(_) => {}
            Err(_) => eprintln!("xdp-proxy-demo: cleanup did not finish in time"),
        }
    }
    if worker.is_finished() {
        let _ = worker.join();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xdp-proxy-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}
