//! `cargo xtask bench`: xdp-proxy side by side with direct routing, nftables NAT, NGINX and
//! HAProxy, in one run, interleaved round by round. Needs root. Writes results.json, report.md
//! and SVG charts into `--out DIR`. See BENCHMARKS.md.
//!
//! Usage: xdp-proxy-bench [--quick] [--rounds N] [--out DIR] [--no-micro] [--no-live]
//!                        [--no-bpf-stats]
//!                        [--systems direct,xdp,nftables,nginx-stream,nginx-http,haproxy,
//!                                   tokio-copy,xdp-userspace,xdp-http]
//!                        [--workloads keepalive,latency-1conn,newconn,bulk,udp-rr]
//!        xdp-proxy-bench --udp-echo IP:PORT   (the UDP responder the bench starts at home)
//!        xdp-proxy-bench --tcp-copy LISTEN=UPSTREAM...  (the tokio-copy reference proxy)
//!        xdp-proxy-bench --http-static LISTEN (hyper answering from memory; see
//!                                              docs/userspace.md "Performance")

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use integration_tests::bench::measure::{
    self, BpfStats, CpuProbe, WRK_SCRIPT, WrkLoad, host_info, loadavg, run_iperf, run_wrk,
    xdp_prog_ids,
};
use integration_tests::bench::report::{self, Machine, Results, Settings, SystemInfo};
use integration_tests::bench::systems::{
    BULK_PORT, BenchLab, NOT_IMPLEMENTED, System, UDP_PORT, udp_bound,
};
use integration_tests::bench::udp::{self, UdpLoad};
use integration_tests::bench::{LiveSample, Workload, micro, reference};
use integration_tests::netns::{daemon_binary, two};

/// Set by SIGINT/SIGTERM: the bench stops after the current run and its lab's Drop removes the
/// namespaces and stops the processes it started.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.with_context(|| format!("sigaction {sig}"))?;
    }
    Ok(())
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

struct Args {
    quick: bool,
    rounds: Option<u32>,
    out: Option<PathBuf>,
    micro: bool,
    live: bool,
    systems: Vec<System>,
    workloads: Vec<Workload>,
    bpf_stats: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        quick: false,
        rounds: None,
        out: None,
        micro: true,
        live: true,
        systems: System::ALL.to_vec(),
        workloads: Workload::ALL.to_vec(),
        bpf_stats: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--no-micro" => a.micro = false,
            "--no-live" => a.live = false,
            "--no-bpf-stats" => a.bpf_stats = false,
            "--rounds" => {
                let v = it.next().context("--rounds needs a number")?;
                let n: u32 = v.parse().with_context(|| format!("--rounds {v:?}"))?;
                ensure!((1..=20).contains(&n), "--rounds must be 1..=20");
                a.rounds = Some(n);
            }
            "--out" => a.out = Some(PathBuf::from(it.next().context("--out needs a directory")?)),
            "--systems" => {
                let v = it.next().context("--systems needs a list")?;
                a.systems = v
                    .split(',')
                    .map(|id| {
                        System::ALL
                            .into_iter()
                            .find(|s| s.id() == id)
                            .with_context(|| format!("unknown system {id:?}"))
                    })
                    .collect::<Result<_>>()?;
            }
            "--workloads" => {
                let v = it.next().context("--workloads needs a list")?;
                a.workloads = v
                    .split(',')
                    .map(|id| {
                        Workload::ALL
                            .into_iter()
                            .find(|w| w.id() == id)
                            .with_context(|| format!("unknown workload {id:?}"))
                    })
                    .collect::<Result<_>>()?;
            }
            "-h" | "--help" => {
                println!(
                    "xdp-proxy-bench [--quick] [--rounds N] [--out DIR] [--no-micro] [--no-live] \
                     [--no-bpf-stats] \
                     [--systems direct,xdp,nftables,nginx-stream,nginx-http,haproxy,xdp-userspace,\
                     xdp-http] [--workloads keepalive,latency-1conn,newconn,bulk,udp-rr]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(a)
}

/// `YYYYMMDDTHHMMSSZ` for now (UTC), from the days-to-civil algorithm.
fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

fn machine() -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .next()
                .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        })
        .map_or_else(|| "unknown memory".to_owned(), |m| format!("{m} RAM"));
    Machine {
        nproc: host_info("nproc", &[]),
        cpu_model,
        kernel: host_info("uname", &["-r"]),
        memory,
        loadavg_start: loadavg().unwrap_or_default(),
        ..Machine::default()
    }
}

/// The UDP client: 4 sockets (4 flows / sessions through the proxy), 4 requests in flight on
/// each: 16 in flight, as wrk's 16 connections.
const UDP_SOCKETS: u32 = 4;
const UDP_PER_SOCKET: u32 = 4;
/// A UDP request unanswered this long is counted lost (and replaced).
const UDP_LOSS_TIMEOUT: Duration = Duration::from_millis(200);
/// The helper processes (the UDP responder, the reference servers) exit by themselves after this
/// long if nobody stopped them.
const HELPER_LIFETIME: Duration = Duration::from_secs(3 * 3600);

struct Plan {
    rounds: u32,
    keepalive: Duration,
    latency: Duration,
    newconn: Duration,
    bulk: Duration,
    udp: Duration,
    udp_sockets: u32,
    udp_per_socket: u32,
    warmup: Duration,
    connections: u32,
    micro_samples: u32,
    scale_flows: u32,
}

impl Plan {
    fn new(a: &Args) -> Self {
        if a.quick {
            Self {
                rounds: a.rounds.unwrap_or(2),
                keepalive: Duration::from_secs(2),
                latency: Duration::from_secs(1),
                newconn: Duration::from_secs(2),
                bulk: Duration::from_secs(2),
                udp: Duration::from_secs(2),
                udp_sockets: UDP_SOCKETS,
                udp_per_socket: UDP_PER_SOCKET,
                warmup: Duration::ZERO,
                connections: 16,
                micro_samples: 50,
                // Half of 100,000 flows' fill time (18 s on a busy machine): --quick stays under
                // 3 minutes with a margin.
                scale_flows: 50_000,
            }
        } else {
            Self {
                rounds: a.rounds.unwrap_or(3),
                // 5 s per measurement: 3 rounds of 8 systems and 5 workloads are about 9 minutes
                // of traffic and setup, the micro-benchmarks 1 to 4 minutes (quiet to very busy
                // machine): under 15 minutes on 2 cores.
                keepalive: Duration::from_secs(5),
                latency: Duration::from_secs(3),
                newconn: Duration::from_secs(5),
                bulk: Duration::from_secs(5),
                udp: Duration::from_secs(5),
                udp_sockets: UDP_SOCKETS,
                udp_per_socket: UDP_PER_SOCKET,
                warmup: Duration::from_secs(1),
                connections: 16,
                micro_samples: 400,
                scale_flows: micro::SCALE_FLOWS,
            }
        }
    }
}

/// What CPU to attribute to the proxy: its process, and its XDP programs (fast path).
struct Own<'a> {
    pid: Option<u32>,
    xdp_progs: &'a [u32],
}

fn measure_one(
    lab: &BenchLab,
    system: System,
    own: &Own<'_>,
    workload: Workload,
    round: u32,
    plan: &Plan,
    script: &std::path::Path,
) -> Result<LiveSample> {
    let client = &lab.topo.client;
    let url = system.http_url();
    let wrk = |connections, duration, close| -> Result<(measure::WrkResult, measure::CpuUse)> {
        let probe = CpuProbe::start(own.pid, own.xdp_progs)?;
        let r = run_wrk(
            client,
            &url,
            &WrkLoad {
                connections,
                duration,
                close,
            },
            script,
        )?;
        Ok((r, probe.finish()?))
    };
    let (value, units, wrk_r, iperf_r, udp_r, cpu) = match workload {
        Workload::KeepAlive | Workload::Latency1 | Workload::NewConn => {
            let (conns, d, close) = match workload {
                Workload::KeepAlive => (plan.connections, plan.keepalive, false),
                Workload::Latency1 => (1, plan.latency, false),
                _ => (plan.connections, plan.newconn, true),
            };
            let (r, cpu) = wrk(conns, d, close)?;
            ensure!(r.requests > 0, "wrk completed no request against {url}");
            (r.rate(), r.requests as f64, Some(r), None, None, cpu)
        }
        Workload::Bulk => {
            let probe = CpuProbe::start(own.pid, own.xdp_progs)?;
            let r = run_iperf(
                client,
                &system.target_ip().to_string(),
                BULK_PORT,
                plan.bulk,
            )?;
            let cpu = probe.finish()?;
            (
                r.bits_per_second / 1e9,
                r.bytes as f64 / 1e9,
                None,
                Some(r),
                None,
                cpu,
            )
        }
        Workload::Udp => {
            // The same port on the proxy and at home (direct routing targets home).
            let target = std::net::SocketAddrV4::new(system.target_ip(), UDP_PORT);
            let load = UdpLoad {
                sockets: plan.udp_sockets,
                per_socket: plan.udp_per_socket,
                duration: plan.udp,
                loss_timeout: UDP_LOSS_TIMEOUT,
                // Far above what 2 cores answer in the duration: the duration ends the run.
                max_requests: 100_000_000,
            };
            let probe = CpuProbe::start(own.pid, own.xdp_progs)?;
            let r = udp::run_client(client, target, &load)?;
            let cpu = probe.finish()?;
            ensure!(
                r.requests > 0,
                "the UDP client completed no request against {target} ({} sent, {} lost, {} socket \
                 errors)",
                r.sent,
                r.lost,
                r.socket_errors
            );
            (r.rate(), r.requests as f64, None, None, Some(r), cpu)
        }
    };
    Ok(LiveSample {
        system,
        workload,
        round,
        value,
        wrk: wrk_r,
        iperf: iperf_r,
        udp: udp_r,
        cpu,
        units,
    })
}

fn describe(s: &LiveSample) -> String {
    match s.workload {
        Workload::KeepAlive => format!(
            "{:.0} req/s, p50 {:.0} µs, p99 {:.0} µs, CPU {:.1} µs/req{}{}",
            s.value,
            s.wrk.as_ref().map_or(0.0, |w| w.p50_us),
            s.wrk.as_ref().map_or(0.0, |w| w.p99_us),
            s.cpu_per_unit(),
            xdp_share(s, "µs/req", 1.0),
            errors(s)
        ),
        Workload::Latency1 => format!(
            "1 conn: p50 {:.0} µs, {:.0} req/s{}",
            s.wrk.as_ref().map_or(0.0, |w| w.p50_us),
            s.value,
            errors(s)
        ),
        Workload::NewConn => format!(
            "{:.0} conn/s, CPU {:.1} µs/conn{}{}",
            s.value,
            s.cpu_per_unit(),
            xdp_share(s, "µs/conn", 1.0),
            errors(s)
        ),
        Workload::Bulk => format!(
            "{:.2} Gbit/s, CPU {:.0} ms/GB{}",
            s.value,
            s.cpu_per_unit() / 1000.0,
            xdp_share(s, "ms/GB", 1e-3)
        ),
        Workload::Udp => {
            let (p50, p99, p999) = s.latency().unwrap_or_default();
            format!(
                "{:.0} req/s, p50 {p50:.0} µs, p99 {p99:.0} µs, p99.9 {p999:.0} µs, CPU {:.1} µs/req{}{}",
                s.value,
                s.cpu_per_unit(),
                xdp_share(s, "µs/req", 1.0),
                errors(s)
            )
        }
    }
}

/// The XDP programs' share, when measured: `, XDP program 0.21 µs/req`.
fn xdp_share(s: &LiveSample, unit: &str, scale: f64) -> String {
    s.xdp_prog_per_unit()
        .map(|v| format!(", XDP program {:.3} {unit}", v * scale))
        .unwrap_or_default()
}

fn errors(s: &LiveSample) -> String {
    match s.errors() {
        0 => String::new(),
        n if s.udp.is_some() => format!(", {n} lost or failed"),
        n => format!(", {n} errors"),
    }
}

/// Whether `system` can carry workload `w` (no bulk through an HTTP proxy, no UDP through
/// HAProxy or an HTTP proxy).
fn applies(system: System, w: Workload) -> bool {
    match w {
        Workload::Bulk => system.carries_bulk(),
        Workload::Udp => system.carries_udp(),
        Workload::KeepAlive | Workload::Latency1 | Workload::NewConn => true,
    }
}

fn live(
    args: &Args,
    plan: &Plan,
    results: &mut Results,
    out: &std::path::Path,
    t0: Instant,
) -> Result<()> {
    println!(
        "setting up the lab (client / proxy / home namespaces, upstream nginx, iperf3 server)"
    );
    let mut lab = BenchLab::new(daemon_binary()?)?;
    let script = lab.topo.lab.write_file("wrk-report.lua", WRK_SCRIPT)?;
    if args.workloads.contains(&Workload::Udp) {
        start_udp_responder(&mut lab)?;
    }
    let total = plan.rounds as usize * args.systems.len();
    let mut done = 0;
    for round in 1..=plan.rounds {
        for &system in &args.systems {
            check_interrupted()?;
            done += 1;
            if !args.workloads.iter().any(|&w| applies(system, w)) {
                continue;
            }
            println!(
                "[{done}/{total}] round {round}/{}: {} (elapsed {:.0} s, load {:?})",
                plan.rounds,
                system.name(),
                t0.elapsed().as_secs_f64(),
                loadavg().unwrap_or_default()
            );
            let running = match lab.start(system) {
                Ok(r) => r,
                Err(e) => {
                    let msg = format!("round {round} {}: setup failed: {e:#}", system.name());
                    println!("  FAILED: {msg}");
                    results.failures.push(msg);
                    continue;
                }
            };
            if round == 1 {
                results
                    .settings
                    .offloads
                    .push((system.name().to_owned(), lab.offloads()));
            }
            // The fast path's own data-path share: its XDP programs' run time, from the kernel's
            // BPF run-time statistics, on only while this system is measured.
            let (stats, xdp_progs) = if system == System::XdpFast && args.bpf_stats {
                match (
                    BpfStats::enable(),
                    xdp_prog_ids(
                        &lab.topo.proxy,
                        &[two::PROXY_CLIENT_DEV, two::PROXY_HOME_DEV],
                    ),
                ) {
                    (Ok(st), Ok(ids)) if !ids.is_empty() => (Some(st), ids),
                    (st, ids) => {
                        println!(
                            "  note: XDP program run time not attributed ({:?}, program ids {:?})",
                            st.err(),
                            ids
                        );
                        (None, Vec::new())
                    }
                }
            } else {
                (None, Vec::new())
            };
            if !plan.warmup.is_zero() {
                let _ = run_wrk(
                    &lab.topo.client,
                    &system.http_url(),
                    &WrkLoad {
                        connections: plan.connections,
                        duration: plan.warmup,
                        close: false,
                    },
                    &script,
                );
            }
            for &w in &args.workloads {
                if !applies(system, w) {
                    continue;
                }
                if INTERRUPTED.load(Ordering::Relaxed) {
                    break;
                }
                match measure_one(
                    &lab,
                    system,
                    &Own {
                        pid: running.pid,
                        xdp_progs: &xdp_progs,
                    },
                    w,
                    round,
                    plan,
                    &script,
                ) {
                    Ok(s) => {
                        println!("  {:<14} {}", w.id(), describe(&s));
                        results.live.push(s);
                    }
                    Err(e) => {
                        let msg = format!("round {round} {} {}: {e:#}", system.name(), w.id());
                        println!("  FAILED: {msg}");
                        results.failures.push(msg);
                    }
                }
            }
            drop(stats);
            lab.stop(running)
                .with_context(|| format!("tearing down {}", system.name()))?;
        }
        results
            .machine
            .loadavg_rounds
            .push(loadavg().unwrap_or_default());
        // Partial results survive an interrupted run.
        results.elapsed_seconds = t0.elapsed().as_secs_f64();
        report::write_all(results, out)?;
    }
    Ok(())
}

/// Start the UDP responder (this binary, `--udp-echo`) in the home namespace; the lab stops it by
/// PID when it is dropped.
fn start_udp_responder(lab: &mut BenchLab) -> Result<u32> {
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let addr = format!("{}:{UDP_PORT}", two::HOME);
    let mut cmd = lab.topo.home.command(&exe)?;
    cmd.args(["--udp-echo", &addr]);
    let pid = lab.topo.lab.spawn("udp-responder", cmd)?;
    let home = lab.topo.home.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !udp_bound(&home, two::HOME, UDP_PORT) {
        lab.topo.lab.check_running(pid)?;
        ensure!(
            Instant::now() < deadline,
            "the UDP responder did not bind {addr} within 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(pid)
}

fn bench() -> Result<PathBuf> {
    let args = parse_args()?;
    install_signal_handlers()?;
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the bench needs root (namespaces, XDP): run it through `cargo xtask bench`"
    );
    let t0 = Instant::now();
    let stamp = timestamp();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("bench-results").join(&stamp));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let plan = Plan::new(&args);
    let mut results = Results {
        started_utc: stamp,
        machine: machine(),
        settings: Settings {
            quick: args.quick,
            rounds: plan.rounds,
            keepalive_seconds: plan.keepalive.as_secs(),
            latency_seconds: plan.latency.as_secs(),
            newconn_seconds: plan.newconn.as_secs(),
            bulk_seconds: plan.bulk.as_secs(),
            udp_seconds: plan.udp.as_secs(),
            udp_sockets: plan.udp_sockets,
            udp_in_flight: plan.udp_sockets * plan.udp_per_socket,
            udp_request_bytes: udp::REQUEST_BYTES,
            xdp_run_time_stats: args.bpf_stats,
            warmup_seconds: plan.warmup.as_secs(),
            connections: plan.connections,
            micro_samples: plan.micro_samples,
            client: format!(
                "wrk 1 thread (latency percentiles from its Lua done() hook), iperf3 one stream, \
                 and the bench's own UDP client (one thread of the driver, {} sockets with {} \
                 requests of {} bytes in flight each, a request unanswered after {} ms counted \
                 lost), all in the client namespace",
                plan.udp_sockets,
                plan.udp_per_socket,
                udp::REQUEST_BYTES,
                UDP_LOSS_TIMEOUT.as_millis()
            ),
            upstream: format!(
                "nginx, 1 worker, `return 200` of a {}-byte body from memory, keepalive_requests \
                 10000000; iperf3 server; the bench's UDP responder (one thread, answers each \
                 datagram with its own bytes); all in the home namespace",
                integration_tests::bench::systems::BODY.len()
            ),
            cpu_pinning: "No CPU pinning: client, proxy and upstream share the machine's CPUs; \
                          each system's workers / threads are in its description below"
                .to_owned(),
            offloads: Vec::new(),
        },
        systems: args
            .systems
            .iter()
            .map(|s| SystemInfo {
                id: s.id().to_owned(),
                name: s.name().to_owned(),
                description: s.description().to_owned(),
            })
            .collect(),
        not_implemented: NOT_IMPLEMENTED
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect(),
        ..Results::default()
    };
    let m = &results.machine;
    println!(
        "xdp-proxy bench: {} CPUs ({}), kernel {}, load average {:?}; results in {}",
        m.nproc,
        m.cpu_model,
        m.kernel,
        m.loadavg_start,
        out.display()
    );
    if args.micro {
        println!(
            "XDP program per packet (BPF_PROG_TEST_RUN, {} calls of {} runs per case) and the \
             flow table at {} flows",
            plan.micro_samples,
            micro::REPEAT,
            plan.scale_flows
        );
        match micro::run(plan.micro_samples, Some(plan.scale_flows)) {
            Ok(m) => {
                for c in &m.cases {
                    println!("  {:<22} {:.1} ns/packet", c.name, c.ns_per_packet.median);
                }
                if let Some(s) = &m.scale {
                    println!(
                        "  {} flows in {:.2} s; {:.0} + {:.0} MiB; established at full table {:.1} ns",
                        s.flows,
                        s.fill_seconds,
                        s.fwd_memlock_bytes as f64 / 1048576.0,
                        s.rev_memlock_bytes as f64 / 1048576.0,
                        s.established_full.ns_per_packet.median
                    );
                }
                results.micro = Some(m);
            }
            Err(e) => {
                let msg = format!("XDP micro-benchmarks: {e:#}");
                println!("  FAILED: {msg}");
                results.failures.push(msg);
            }
        }
        report::write_all(&results, &out)?;
    }
    if args.live {
        live(&args, &plan, &mut results, &out, t0)?;
    }
    results.machine.loadavg_end = loadavg().unwrap_or_default();
    results.elapsed_seconds = t0.elapsed().as_secs_f64();
    let charts = report::write_all(&results, &out)?;
    println!(
        "\ndone in {:.0} s: {}/report.md, results.json, {} charts",
        results.elapsed_seconds,
        out.display(),
        charts.len()
    );
    if !results.failures.is_empty() {
        bail!(
            "{} run(s) failed (listed in the report):\n{}",
            results.failures.len(),
            results.failures.join("\n")
        );
    }
    Ok(out)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--udp-echo") {
        let result = argv
            .get(2)
            .context("--udp-echo needs IP:PORT")
            .and_then(|a| {
                a.parse::<std::net::SocketAddrV4>()
                    .with_context(|| format!("--udp-echo {a:?}"))
            })
            .and_then(|addr| udp::serve_echo(addr, HELPER_LIFETIME));
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("xdp-proxy-bench --udp-echo: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(flag @ ("--tcp-copy" | "--http-static")) = argv.get(1).map(String::as_str) {
        let rest = argv.get(2..).unwrap_or_default();
        let result = if flag == "--tcp-copy" {
            reference::parse_pairs(rest)
                .and_then(|pairs| reference::serve_tcp_copy(&pairs, HELPER_LIFETIME))
        } else {
            rest.first()
                .context("--http-static needs IP:PORT")
                .and_then(|a| a.parse().with_context(|| format!("--http-static {a:?}")))
                .and_then(|addr| reference::serve_http_static(addr, HELPER_LIFETIME))
        };
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("xdp-proxy-bench {flag}: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match bench() {
        Ok(out) => {
            if let Ok(md) = std::fs::read_to_string(out.join("report.md")) {
                println!("\n{md}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("xdp-proxy-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
