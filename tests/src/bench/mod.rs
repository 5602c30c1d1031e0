//! `cargo xtask bench`: xdp-proxy side by side with direct kernel routing, nftables NAT, NGINX
//! and HAProxy in one run (see BENCHMARKS.md). The driver is `src/bin/xdp-proxy-bench.rs`;
//! this module holds its parts: `measure` (wrk, iperf3, CPU accounting), `udp` (the small UDP
//! request/response client and responder), `systems` (setting each system up and down in the
//! namespace lab), `micro` (BPF_PROG_TEST_RUN per-packet cost and the 1M-flow table),
//! `reference` (the tokio and hyper reference servers) and `report` (markdown, SVG, JSON).

pub mod measure;
pub mod micro;
pub mod reference;
pub mod report;
pub mod systems;
pub mod udp;

use serde::Serialize;

use measure::{CpuUse, IperfResult, WrkResult};
use systems::System;
use udp::UdpResult;

/// Have the kernel kill this process when its parent (the bench) dies: the helper processes
/// the bench starts (the UDP responder, the reference servers) never outlive it.
///
/// # Errors
/// prctl(PR_SET_PDEATHSIG) failing.
pub fn die_with_parent() -> anyhow::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers and has no memory effects.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::c_ulong::try_from(libc::SIGKILL).unwrap_or(9),
        )
    };
    anyhow::ensure!(
        rc == 0,
        "prctl(PR_SET_PDEATHSIG): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Median, minimum and maximum of a set of values (NaN-free).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    /// Summary of `values`; all zero when empty. The median of an even count is the mean of the
    /// two middle values.
    #[must_use]
    pub fn of(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            f64::midpoint(v[n / 2 - 1], v[n / 2])
        };
        Self {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        }
    }
}

/// A traffic pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Small HTTP responses over kept-alive connections (wrk, many connections).
    KeepAlive,
    /// One kept-alive connection: latency without queueing.
    Latency1,
    /// `Connection: close`: one TCP connection per request.
    NewConn,
    /// iperf3, one TCP stream.
    Bulk,
    /// Small UDP request/response (the bench's own client and responder, several requests in
    /// flight on a few sockets).
    Udp,
}

impl Workload {
    pub const ALL: [Workload; 5] = [
        Workload::KeepAlive,
        Workload::Latency1,
        Workload::NewConn,
        Workload::Bulk,
        Workload::Udp,
    ];

    #[must_use]
    pub const fn id(self) -> &'static str {
        match self {
            Workload::KeepAlive => "keepalive",
            Workload::Latency1 => "latency-1conn",
            Workload::NewConn => "newconn",
            Workload::Bulk => "bulk",
            Workload::Udp => "udp-rr",
        }
    }
}

/// One measured run of one system under one workload.
#[derive(Clone, Debug, Serialize)]
pub struct LiveSample {
    pub system: System,
    pub workload: Workload,
    pub round: u32,
    /// Requests/s (keep-alive, latency, udp), connections/s (newconn), Gbit/s (bulk).
    pub value: f64,
    pub wrk: Option<WrkResult>,
    pub iperf: Option<IperfResult>,
    pub udp: Option<UdpResult>,
    pub cpu: CpuUse,
    /// Units of work done: requests (HTTP or UDP request/response pairs), connections, or
    /// gigabytes (bulk).
    pub units: f64,
}

impl LiveSample {
    /// The bench's CPU microseconds per unit (request, connection, or GB): its own processes
    /// and ksoftirqd (see [`CpuUse::bench_us`]).
    #[must_use]
    pub fn cpu_per_unit(&self) -> f64 {
        per(self.cpu.bench_us, self.units)
    }

    /// Machine-wide busy CPU microseconds per unit (everything running on the machine).
    #[must_use]
    pub fn machine_per_unit(&self) -> f64 {
        per(self.cpu.busy_us, self.units)
    }

    #[must_use]
    pub fn softirq_per_unit(&self) -> f64 {
        per(self.cpu.softirq_us, self.units)
    }

    /// Latency percentiles (p50, p99, p99.9) in µs, from wrk or the UDP client.
    #[must_use]
    pub fn latency(&self) -> Option<(f64, f64, f64)> {
        if let Some(w) = &self.wrk {
            return Some((w.p50_us, w.p99_us, w.p999_us));
        }
        self.udp.as_ref().map(|u| (u.p50_us, u.p99_us, u.p999_us))
    }

    /// wrk's errors, or the UDP client's lost requests and socket errors.
    #[must_use]
    pub fn errors(&self) -> u64 {
        self.wrk.as_ref().map_or(0, |w| w.errors) + self.udp.as_ref().map_or(0, UdpResult::errors)
    }

    /// The proxy's own CPU per unit: its process tree, plus its XDP programs' run time for the
    /// fast path (see [`CpuUse::proxy_own_us`]).
    #[must_use]
    pub fn proxy_per_unit(&self) -> Option<f64> {
        self.cpu.proxy_own_us().map(|p| per(p, self.units))
    }

    /// The XDP programs' run time per unit (fast path with run-time statistics on).
    #[must_use]
    pub fn xdp_prog_per_unit(&self) -> Option<f64> {
        self.cpu.xdp_prog_us.map(|p| per(p, self.units))
    }
}

fn per(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_median_min_max() {
        let s = Summary::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Summary::of(&[4.0, 1.0, 2.0, 3.0, f64::NAN]);
        assert_eq!((s.median, s.n), (2.5, 4));
        assert_eq!(Summary::of(&[]).n, 0);
    }
}
