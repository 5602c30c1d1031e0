//! Measuring tools: wrk (with a Lua `done` hook that prints machine-readable lines), iperf3's
//! JSON, `/proc/stat` and `/proc/<pid>/stat` CPU accounting, `/proc/loadavg`. The parsers are
//! pure and unit-tested.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use serde::Serialize;

use crate::netns::{Netns, run_cmd};

/// The Lua script given to wrk: after the run it prints one `XPT_SUMMARY` and one
/// `XPT_LATENCY` line (latencies in microseconds) that [`parse_wrk`] reads.
pub const WRK_SCRIPT: &str = r#"-- written by xdp-proxy-bench: machine-readable summary
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "XPT_SUMMARY requests=%d duration_us=%d bytes=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout))
  io.write(string.format(
    "XPT_LATENCY p50=%d p90=%d p99=%d p999=%d max=%d\n",
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
"#;

/// What one wrk run reported.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct WrkResult {
    pub requests: u64,
    pub duration_us: u64,
    pub bytes: u64,
    /// connect + read + write + non-2xx/3xx status + timeout errors.
    pub errors: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl WrkResult {
    #[must_use]
    pub fn rate(&self) -> f64 {
        if self.duration_us == 0 {
            return 0.0;
        }
        self.requests as f64 * 1e6 / self.duration_us as f64
    }
}

fn fields(line: &str) -> impl Iterator<Item = (&str, &str)> {
    line.split_whitespace().filter_map(|kv| kv.split_once('='))
}

fn field(line: &str, name: &str) -> Result<u64> {
    let v = fields(line)
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .ok_or_else(|| anyhow!("wrk output: no {name}= in {line:?}"))?;
    v.parse::<u64>()
        .with_context(|| format!("wrk output: {name}={v:?} is not a number"))
}

/// Parse wrk's stdout (run with [`WRK_SCRIPT`]).
pub fn parse_wrk(out: &str) -> Result<WrkResult> {
    let summary = out
        .lines()
        .find(|l| l.starts_with("XPT_SUMMARY "))
        .ok_or_else(|| anyhow!("wrk output has no XPT_SUMMARY line:\n{out}"))?;
    let latency = out
        .lines()
        .find(|l| l.starts_with("XPT_LATENCY "))
        .ok_or_else(|| anyhow!("wrk output has no XPT_LATENCY line:\n{out}"))?;
    let mut errors = 0;
    for name in ["connect", "read", "write", "status", "timeout"] {
        errors += field(summary, name)?;
    }
    let lat = |name: &str| field(latency, name).map(|v| v as f64);
    Ok(WrkResult {
        requests: field(summary, "requests")?,
        duration_us: field(summary, "duration_us")?,
        bytes: field(summary, "bytes")?,
        errors,
        p50_us: lat("p50")?,
        p90_us: lat("p90")?,
        p99_us: lat("p99")?,
        p999_us: lat("p999")?,
        max_us: lat("max")?,
    })
}

/// How wrk is run.
#[derive(Clone, Debug)]
pub struct WrkLoad {
    pub connections: u32,
    pub duration: Duration,
    /// Send `Connection: close` (a new TCP connection per request).
    pub close: bool,
}

/// Run wrk (one thread) in `ns` against `url`; `script` is the path of [`WRK_SCRIPT`].
pub fn run_wrk(ns: &Netns, url: &str, load: &WrkLoad, script: &Path) -> Result<WrkResult> {
    let secs = load.duration.as_secs().max(1);
    let mut args = vec![
        "-t1".to_owned(),
        format!("-c{}", load.connections),
        format!("-d{secs}s"),
        "--timeout".to_owned(),
        "2s".to_owned(),
        "-s".to_owned(),
        script.display().to_string(),
    ];
    if load.close {
        args.push("-H".to_owned());
        args.push("Connection: close".to_owned());
    }
    args.push(url.to_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ns.exec("wrk", &args)?;
    parse_wrk(&out)
}

/// What one iperf3 run reported.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct IperfResult {
    pub bits_per_second: f64,
    pub bytes: u64,
    pub seconds: f64,
    pub retransmits: u64,
}

/// Parse `iperf3 -J` output (the receiver's sum).
pub fn parse_iperf(out: &str) -> Result<IperfResult> {
    let v: serde_json::Value = serde_json::from_str(out)
        .with_context(|| format!("iperf3 -J output is not JSON: {out}"))?;
    if let Some(e) = v.get("error").and_then(serde_json::Value::as_str) {
        bail!("iperf3: {e}");
    }
    let end = v
        .get("end")
        .ok_or_else(|| anyhow!("iperf3 JSON has no end"))?;
    let recv = end
        .get("sum_received")
        .ok_or_else(|| anyhow!("iperf3 JSON has no end.sum_received"))?;
    let num = |o: &serde_json::Value, k: &str| o.get(k).and_then(serde_json::Value::as_f64);
    Ok(IperfResult {
        bits_per_second: num(recv, "bits_per_second")
            .ok_or_else(|| anyhow!("iperf3 JSON: no sum_received.bits_per_second"))?,
        bytes: num(recv, "bytes").unwrap_or(0.0) as u64,
        seconds: num(recv, "seconds").unwrap_or(0.0),
        retransmits: end
            .get("sum_sent")
            .and_then(|s| num(s, "retransmits"))
            .unwrap_or(0.0) as u64,
    })
}

/// Run an iperf3 client (one TCP stream) in `ns` against `host:port` for `duration`.
pub fn run_iperf(ns: &Netns, host: &str, port: u16, duration: Duration) -> Result<IperfResult> {
    let secs = duration.as_secs().max(1).to_string();
    let port = port.to_string();
    let out = ns.exec(
        "iperf3",
        &[
            "-c",
            host,
            "-p",
            &port,
            "-t",
            &secs,
            "-J",
            "--connect-timeout",
            "3000",
        ],
    )?;
    parse_iperf(&out)
}

/// Machine-wide CPU time from the first line of `/proc/stat`, in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CpuTimes {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

impl CpuTimes {
    /// Ticks spent doing anything (not idle, not waiting for I/O).
    #[must_use]
    pub fn busy(&self) -> u64 {
        self.user + self.nice + self.system + self.irq + self.softirq + self.steal
    }

    #[must_use]
    pub fn total(&self) -> u64 {
        self.busy() + self.idle + self.iowait
    }

    /// `self - earlier`, field by field (saturating: counters never go back).
    #[must_use]
    pub fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user.saturating_sub(earlier.user),
            nice: self.nice.saturating_sub(earlier.nice),
            system: self.system.saturating_sub(earlier.system),
            idle: self.idle.saturating_sub(earlier.idle),
            iowait: self.iowait.saturating_sub(earlier.iowait),
            irq: self.irq.saturating_sub(earlier.irq),
            softirq: self.softirq.saturating_sub(earlier.softirq),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }
}

/// Parse the aggregate `cpu` line of `/proc/stat`.
pub fn parse_proc_stat(text: &str) -> Result<CpuTimes> {
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow!("/proc/stat has no aggregate cpu line"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| {
            f.parse::<u64>()
                .with_context(|| format!("/proc/stat: {f:?}"))
        })
        .collect::<Result<_>>()?;
    ensure!(v.len() >= 8, "/proc/stat cpu line has {} fields", v.len());
    Ok(CpuTimes {
        user: v[0],
        nice: v[1],
        system: v[2],
        idle: v[3],
        iowait: v[4],
        irq: v[5],
        softirq: v[6],
        steal: v[7],
    })
}

pub fn read_proc_stat() -> Result<CpuTimes> {
    parse_proc_stat(&fs::read_to_string("/proc/stat").context("reading /proc/stat")?)
}

/// Clock ticks per second (`USER_HZ`) of `/proc/stat` and `/proc/<pid>/stat`.
#[must_use]
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// Microseconds in `ticks` clock ticks.
#[must_use]
pub fn ticks_to_us(ticks: u64) -> f64 {
    ticks as f64 * 1e6 / clock_ticks() as f64
}

/// `utime + stime` (fields 14 and 15) and `cutime + cstime` (16 and 17: children already
/// reaped) of one `/proc/<pid>/stat` line, in clock ticks. The command name (field 2) may
/// contain spaces and parentheses: fields are counted after the last `)`.
pub fn parse_pid_stat(text: &str) -> Result<(u64, u64)> {
    let rest = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .ok_or_else(|| anyhow!("pid stat without ')': {text:?}"))?;
    // After ')': field 3 (state) is index 0, so utime (14) is index 11, stime 12, cutime 13,
    // cstime 14.
    let f: Vec<&str> = rest.split_whitespace().collect();
    ensure!(f.len() > 14, "pid stat too short: {text:?}");
    let n = |i: usize, what: &str| -> Result<u64> {
        // cutime/cstime are signed in the kernel's format; never negative in practice.
        let v: i64 = f[i]
            .parse()
            .with_context(|| format!("{what}: {:?}", f[i]))?;
        Ok(u64::try_from(v).unwrap_or(0))
    };
    Ok((
        n(11, "utime")? + n(12, "stime")?,
        n(13, "cutime")? + n(14, "cstime")?,
    ))
}

/// CPU ticks of `pid`, its live descendants, and every descendant already reaped (threads
/// included: `/proc/<pid>/stat` sums them). A process that exits between two readings moves
/// its whole time into its parent's reaped-children fields, so deltas stay right.
#[must_use]
pub fn tree_ticks(pid: u32) -> u64 {
    let mut total = 0;
    let mut stack = vec![pid];
    let mut seen = 0;
    while let Some(p) = stack.pop() {
        seen += 1;
        if seen > 4096 {
            break;
        }
        if let Ok(text) = fs::read_to_string(format!("/proc/{p}/stat"))
            && let Ok((own, reaped)) = parse_pid_stat(&text)
        {
            total += own + reaped;
        }
        if let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) {
            for task in tasks.flatten() {
                if let Ok(children) = fs::read_to_string(task.path().join("children")) {
                    stack.extend(
                        children
                            .split_whitespace()
                            .filter_map(|c| c.parse::<u32>().ok()),
                    );
                }
            }
        }
    }
    total
}

/// CPU ticks of the `ksoftirqd/N` threads (softirq work the kernel deferred to them).
#[must_use]
pub fn ksoftirqd_ticks() -> u64 {
    let Ok(entries) = fs::read_dir("/proc") else {
        return 0;
    };
    let mut total = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/stat"))
            && text.contains("(ksoftirqd/")
            && let Ok((own, _)) = parse_pid_stat(&text)
        {
            total += own;
        }
    }
    total
}

/// `/proc/loadavg`'s three averages.
pub fn loadavg() -> Result<[f64; 3]> {
    let text = fs::read_to_string("/proc/loadavg").context("reading /proc/loadavg")?;
    let v: Vec<f64> = text
        .split_whitespace()
        .take(3)
        .map(|f| f.parse::<f64>().with_context(|| format!("loadavg {f:?}")))
        .collect::<Result<_>>()?;
    ensure!(v.len() == 3, "loadavg: {text:?}");
    Ok([v[0], v[1], v[2]])
}

/// CPU accounting over one measured run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CpuUse {
    pub wall_s: f64,
    /// Machine busy time (all CPUs, every process and softirq), microseconds.
    pub busy_us: f64,
    /// Of which softirq (network receive processing of every namespace), microseconds.
    pub softirq_us: f64,
    /// CPU of the bench's own processes (this driver, wrk, iperf3, the upstream, the proxy and
    /// their children) plus the ksoftirqd threads, microseconds. On a machine shared with other
    /// work this is the figure to compare: `busy_us` also counts everyone else. With tick-based
    /// accounting, softirq work done in a bench process's context is charged to that process.
    pub bench_us: f64,
    /// Of which the proxy process tree (userspace proxies, and the xdp-proxy daemon's control
    /// plane), microseconds.
    pub proxy_us: Option<f64>,
    /// The XDP programs' own run time (kernel BPF run-time statistics, summed over the programs
    /// attached to the proxy's interfaces), microseconds: the fast path's data-path share, which
    /// runs in softirq and is otherwise charged to whichever process sent the packet.
    pub xdp_prog_us: Option<f64>,
    /// Runs of those programs (packets) over the measurement.
    pub xdp_prog_runs: Option<u64>,
}

impl CpuUse {
    /// The proxy's own CPU: its process tree plus, for the fast path, its XDP programs' run time.
    #[must_use]
    pub fn proxy_own_us(&self) -> Option<f64> {
        match (self.proxy_us, self.xdp_prog_us) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
        }
    }
}

/// Ids of the XDP programs attached to `devs` in `ns` (from `ip -j -d link show`).
pub fn xdp_prog_ids(ns: &Netns, devs: &[&str]) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for dev in devs {
        let out = ns.ip(&["-j", "-d", "link", "show", "dev", dev])?;
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("ip -j link show {dev}: {out}"))?;
        collect_xdp_ids(&v, false, &mut ids);
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Every `prog.id` under an `xdp` object (single attachment: `xdp.prog.id`; several modes:
/// `xdp.attached[].prog.id`).
fn collect_xdp_ids(v: &serde_json::Value, in_xdp: bool, ids: &mut Vec<u32>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                if in_xdp
                    && k == "prog"
                    && let Some(id) = x.get("id").and_then(serde_json::Value::as_u64)
                    && let Ok(id) = u32::try_from(id)
                {
                    ids.push(id);
                }
                collect_xdp_ids(x, in_xdp || k == "xdp", ids);
            }
        }
        serde_json::Value::Array(a) => {
            for x in a {
                collect_xdp_ids(x, in_xdp, ids);
            }
        }
        _ => {}
    }
}

/// Summed run time (ns) and run count of the loaded BPF programs with these ids. Both only
/// advance while run-time statistics are on ([`BpfStats`]).
#[must_use]
pub fn bpf_run_time(ids: &[u32]) -> (u64, u64) {
    let mut ns = 0u64;
    let mut runs = 0u64;
    for p in aya::programs::loaded_programs().flatten() {
        if ids.contains(&p.id()) {
            ns += u64::try_from(p.run_time().as_nanos()).unwrap_or(u64::MAX);
            runs += p.run_count();
        }
    }
    (ns, runs)
}

/// Kernel BPF run-time statistics, on while this lives (`BPF_ENABLE_STATS`; off again when the
/// descriptor closes, also if the bench dies). Every BPF program run then also reads the clock
/// twice, so it is on only while the fast path is measured.
pub struct BpfStats(#[allow(dead_code)] std::os::fd::OwnedFd);

impl BpfStats {
    pub fn enable() -> Result<Self> {
        aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map(Self)
            .context("BPF_ENABLE_STATS (run time)")
    }
}

/// Snapshot before a run; [`CpuProbe::finish`] after it.
pub struct CpuProbe {
    start: Instant,
    stat: CpuTimes,
    bench: u64,
    proxy: Option<(u32, u64)>,
    /// XDP program ids and their (run time ns, runs) at the start.
    xdp: Option<(Vec<u32>, (u64, u64))>,
}

fn bench_ticks() -> u64 {
    tree_ticks(std::process::id()) + ksoftirqd_ticks()
}

impl CpuProbe {
    /// `xdp_progs`: ids of the proxy's XDP programs whose run time to attribute (empty: none).
    pub fn start(proxy_pid: Option<u32>, xdp_progs: &[u32]) -> Result<Self> {
        let xdp = (!xdp_progs.is_empty()).then(|| (xdp_progs.to_vec(), bpf_run_time(xdp_progs)));
        Ok(Self {
            start: Instant::now(),
            stat: read_proc_stat()?,
            bench: bench_ticks(),
            proxy: proxy_pid.map(|p| (p, tree_ticks(p))),
            xdp,
        })
    }

    pub fn finish(self) -> Result<CpuUse> {
        let d = read_proc_stat()?.since(&self.stat);
        Ok(CpuUse {
            wall_s: self.start.elapsed().as_secs_f64(),
            busy_us: ticks_to_us(d.busy()),
            softirq_us: ticks_to_us(d.softirq),
            bench_us: ticks_to_us(bench_ticks().saturating_sub(self.bench)),
            proxy_us: self
                .proxy
                .map(|(pid, t0)| ticks_to_us(tree_ticks(pid).saturating_sub(t0))),
            xdp_prog_us: self
                .xdp
                .as_ref()
                .map(|(ids, (ns0, _))| bpf_run_time(ids).0.saturating_sub(*ns0) as f64 / 1000.0),
            xdp_prog_runs: self
                .xdp
                .as_ref()
                .map(|(ids, (_, r0))| bpf_run_time(ids).1.saturating_sub(*r0)),
        })
    }
}

/// Run a host command and return its trimmed stdout, or a placeholder naming the failure.
#[must_use]
pub fn host_info(program: &str, args: &[&str]) -> String {
    match run_cmd(std::process::Command::new(program).args(args)) {
        Ok(s) => s.trim().to_owned(),
        Err(e) => format!("({program} failed: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_parsed() {
        let out = "Running 3s test @ http://10.100.0.1/\n  1 threads and 16 connections\n\
                   XPT_SUMMARY requests=30000 duration_us=3000000 bytes=9000000 connect=0 read=2 \
                   write=0 status=1 timeout=0\n\
                   XPT_LATENCY p50=120 p90=300 p99=900 p999=2100 max=5000\n";
        let r = parse_wrk(out).unwrap();
        assert_eq!(r.requests, 30_000);
        assert_eq!(r.errors, 3);
        assert!((r.rate() - 10_000.0).abs() < 1e-6);
        assert!((r.p999_us - 2100.0).abs() < 1e-9);
        assert!(parse_wrk("Requests/sec: 1\n").is_err());
        assert!(parse_wrk("XPT_SUMMARY requests=x\nXPT_LATENCY p50=1\n").is_err());
    }

    #[test]
    fn proc_stat_delta() {
        let a =
            parse_proc_stat("cpu  100 5 50 1000 10 1 20 0 0 0\ncpu0 1 2 3 4 5 6 7 8\n").unwrap();
        let b = parse_proc_stat("cpu  160 5 70 1100 10 1 40 0 0 0\n").unwrap();
        let d = b.since(&a);
        assert_eq!(d.busy(), 60 + 20 + 20);
        assert_eq!(d.softirq, 20);
        assert_eq!(d.total(), 200);
        assert!(parse_proc_stat("cpu0 1 2\n").is_err());
    }

    #[test]
    fn pid_stat_with_odd_command_name() {
        let line = "1234 (ngi nx) worker) S 1 1234 1234 0 -1 4194560 100 0 0 0 37 12 5 3 20 0 1 0";
        assert_eq!(parse_pid_stat(line).unwrap(), (49, 8));
        assert!(parse_pid_stat("1 (x) S 1 2").is_err());
    }

    #[test]
    fn xdp_ids_from_ip_json() {
        let single: serde_json::Value = serde_json::from_str(
            r#"[{"ifname":"pc","xdp":{"mode":1,"prog":{"id":42,"name":"proxy"}}}]"#,
        )
        .unwrap();
        let mut ids = Vec::new();
        collect_xdp_ids(&single, false, &mut ids);
        assert_eq!(ids, [42]);
        let multi: serde_json::Value = serde_json::from_str(
            r#"[{"xdp":{"mode":4,"attached":[{"mode":1,"prog":{"id":7}},{"mode":2,"prog":{"id":9}}]},
                "linkinfo":{"prog":{"id":99}}}]"#,
        )
        .unwrap();
        ids.clear();
        collect_xdp_ids(&multi, false, &mut ids);
        assert_eq!(ids, [7, 9]);
    }

    #[test]
    fn iperf_json_is_parsed() {
        let out = r#"{"end":{"sum_sent":{"retransmits":3},
            "sum_received":{"bits_per_second":5.5e9,"bytes":6875000000,"seconds":10.0}}}"#;
        let r = parse_iperf(out).unwrap();
        assert!((r.bits_per_second - 5.5e9).abs() < 1.0);
        assert_eq!(r.retransmits, 3);
        assert!(parse_iperf(r#"{"error":"unable to connect"}"#).is_err());
    }
}
