//! Small UDP request/response: the bench's own responder and client (no extra package).
//!
//! The responder ([`serve_echo`]) is the bench binary run as `xdp-proxy-bench --udp-echo ADDR`
//! in the home namespace: one thread answering every datagram with the same bytes, started and
//! stopped by PID like the upstream NGINX. The client ([`run_client`]) runs on a thread of the
//! driver itself that entered the client namespace (so its CPU is inside the bench's, like wrk's
//! through the driver's children): several connected UDP sockets, a fixed number of requests
//! in flight on each, one thread polling them all (like `wrk -t1`). Each request carries its
//! slot and a generation number; a response for the slot's current generation completes it
//! (latency recorded in 1 µs buckets) and the slot sends its next request at once. A request
//! without an answer after the loss timeout is counted lost and its slot sends a new one (late
//! answers to it are counted stale, not completed). Bounded by its duration and a request cap.

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Serialize;

use crate::netns::Netns;

/// Request (and response) size in bytes: a small request/response, as DNS or a game packet.
pub const REQUEST_BYTES: usize = 64;
/// First four bytes of every request: what the client checks a response starts with.
const MAGIC: [u8; 4] = *b"XPTU";

/// How the client runs.
#[derive(Clone, Debug)]
pub struct UdpLoad {
    /// Connected sockets (each is one flow / session through the proxy).
    pub sockets: u32,
    /// Requests in flight on each socket.
    pub per_socket: u32,
    pub duration: Duration,
    /// A request unanswered this long is counted lost and replaced.
    pub loss_timeout: Duration,
    /// Stop after this many completed requests even if the duration has not passed.
    pub max_requests: u64,
}

/// What one client run measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct UdpResult {
    /// Request/response pairs completed within the run.
    pub requests: u64,
    pub sent: u64,
    /// Requests unanswered within the loss timeout.
    pub lost: u64,
    /// Answers to a request already counted lost, or not ours.
    pub stale: u64,
    /// Send or receive errors (for example ICMP port unreachable reported on the socket).
    pub socket_errors: u64,
    pub duration_us: u64,
    pub sockets: u32,
    pub in_flight: u32,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl UdpResult {
    /// Completed request/response pairs per second.
    #[must_use]
    pub fn rate(&self) -> f64 {
        if self.duration_us == 0 {
            return 0.0;
        }
        self.requests as f64 * 1e6 / self.duration_us as f64
    }

    /// Lost requests plus socket errors (the report's error column).
    #[must_use]
    pub fn errors(&self) -> u64 {
        self.lost + self.socket_errors
    }
}

/// Latencies in 1 µs buckets up to a limit (the loss timeout); percentiles as wrk reports them
/// (the smallest value with at least p % of the samples at or below it).
pub struct Histogram {
    buckets: Vec<u32>,
    count: u64,
    max_us: u64,
}

impl Histogram {
    #[must_use]
    pub fn new(limit: Duration) -> Self {
        let n = usize::try_from(limit.as_micros())
            .unwrap_or(1_000_000)
            .clamp(1, 10_000_000)
            + 1;
        Self {
            buckets: vec![0; n],
            count: 0,
            max_us: 0,
        }
    }

    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = usize::try_from(us)
            .unwrap_or(usize::MAX)
            .min(self.buckets.len() - 1);
        self.buckets[i] = self.buckets[i].saturating_add(1);
        self.count += 1;
        self.max_us = self.max_us.max(us);
    }

    #[must_use]
    pub fn count(&self) -> u64 {
        self.count
    }

    #[must_use]
    pub fn max_us(&self) -> u64 {
        self.max_us
    }

    /// The `p`-th percentile in µs; NaN when empty.
    #[must_use]
    pub fn percentile(&self, p: f64) -> f64 {
        if self.count == 0 {
            return f64::NAN;
        }
        // p·n/100 rounded up; the small slack keeps 99.9 % of 1000 at 999 despite binary
        // fractions.
        let want = (p * self.count as f64 / 100.0 - 1e-9).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (us, &n) in self.buckets.iter().enumerate() {
            seen += u64::from(n);
            if seen >= want {
                return us as f64;
            }
        }
        self.max_us as f64
    }
}

/// Encode a request for `slot` (generation `generation`) into `buf`.
fn encode(buf: &mut [u8; REQUEST_BYTES], slot: u32, generation: u32) {
    buf[..4].copy_from_slice(&MAGIC);
    buf[4..8].copy_from_slice(&slot.to_be_bytes());
    buf[8..12].copy_from_slice(&generation.to_be_bytes());
}

/// `(slot, generation)` of a response, if it is one of ours.
fn decode(buf: &[u8]) -> Option<(u32, u32)> {
    if buf.len() != REQUEST_BYTES || buf[..4] != MAGIC {
        return None;
    }
    let slot = u32::from_be_bytes(buf[4..8].try_into().ok()?);
    let generation = u32::from_be_bytes(buf[8..12].try_into().ok()?);
    Some((slot, generation))
}

struct Slot {
    generation: u32,
    sent: Instant,
}

fn would_block(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock
}

/// Run the client on a thread that entered `ns`, against `target`; returns when `load.duration`
/// has passed (or `load.max_requests` completed).
pub fn run_client(ns: &Netns, target: SocketAddrV4, load: &UdpLoad) -> Result<UdpResult> {
    let load = load.clone();
    ns.run_blocking(move || client(target, &load))
}

fn client(target: SocketAddrV4, load: &UdpLoad) -> Result<UdpResult> {
    ensure!(
        (1..=256).contains(&load.sockets) && (1..=1024).contains(&load.per_socket),
        "udp client: 1..=256 sockets with 1..=1024 requests in flight each"
    );
    let mut socks = Vec::new();
    for _ in 0..load.sockets {
        let s = UdpSocket::bind("0.0.0.0:0").context("udp client bind")?;
        s.connect(SocketAddr::V4(target))
            .with_context(|| format!("udp client connect {target}"))?;
        s.set_nonblocking(true).context("udp client nonblocking")?;
        socks.push(s);
    }
    let mut hist = Histogram::new(load.loss_timeout);
    let mut r = UdpResult {
        sockets: load.sockets,
        in_flight: load.sockets * load.per_socket,
        ..UdpResult::default()
    };
    let mut buf = [0u8; REQUEST_BYTES];
    let mut rbuf = [0u8; 2048];
    let start = Instant::now();
    let end = start + load.duration;
    // slots[socket][slot]
    let mut slots: Vec<Vec<Slot>> = Vec::new();
    for s in &socks {
        let mut v = Vec::new();
        for slot in 0..load.per_socket {
            encode(&mut buf, slot, 0);
            match s.send(&buf) {
                Ok(_) => r.sent += 1,
                Err(e) if would_block(&e) => {}
                Err(_) => r.socket_errors += 1,
            }
            v.push(Slot {
                generation: 0,
                sent: Instant::now(),
            });
        }
        slots.push(v);
    }
    let mut fds: Vec<libc::pollfd> = socks
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let scan_every = (load.loss_timeout / 4).max(Duration::from_millis(1));
    let mut last_scan = start;
    let mut done = false;
    while !done {
        let now = Instant::now();
        if now >= end || hist.count() >= load.max_requests {
            break;
        }
        let wait = end
            .saturating_duration_since(now)
            .min(Duration::from_millis(10));
        let timeout = i32::try_from(wait.as_millis()).unwrap_or(10).max(1);
        let nfds = libc::nfds_t::try_from(fds.len()).context("too many sockets")?;
        // SAFETY: `fds` is a valid array of `nfds` pollfd structures for the whole call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), nfds, timeout) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            bail!("udp client poll: {e}");
        }
        for (i, fd) in fds.iter_mut().enumerate() {
            if done {
                break;
            }
            if fd.revents == 0 {
                continue;
            }
            fd.revents = 0;
            // Drain what is queued (bounded per wake-up so one socket cannot starve the others).
            for _ in 0..64 {
                match socks[i].recv(&mut rbuf) {
                    Ok(len) => {
                        let now = Instant::now();
                        let Some((slot, generation)) = decode(&rbuf[..len]) else {
                            r.stale += 1;
                            continue;
                        };
                        let Some(st) = slots[i].get_mut(slot as usize) else {
                            r.stale += 1;
                            continue;
                        };
                        if st.generation != generation {
                            r.stale += 1;
                            continue;
                        }
                        if now <= end {
                            hist.record(now - st.sent);
                        }
                        st.generation = st.generation.wrapping_add(1);
                        encode(&mut buf, slot, st.generation);
                        st.sent = Instant::now();
                        match socks[i].send(&buf) {
                            Ok(_) => r.sent += 1,
                            Err(e) if would_block(&e) => {}
                            Err(_) => r.socket_errors += 1,
                        }
                        if hist.count() >= load.max_requests {
                            done = true;
                            break;
                        }
                    }
                    Err(e) if would_block(&e) => break,
                    Err(_) => r.socket_errors += 1,
                }
            }
        }
        let now = Instant::now();
        if now.duration_since(last_scan) >= scan_every {
            last_scan = now;
            for (i, v) in slots.iter_mut().enumerate() {
                for (slot, st) in v.iter_mut().enumerate() {
                    if now.duration_since(st.sent) < load.loss_timeout {
                        continue;
                    }
                    r.lost += 1;
                    st.generation = st.generation.wrapping_add(1);
                    encode(&mut buf, u32::try_from(slot).unwrap_or(0), st.generation);
                    st.sent = now;
                    match socks[i].send(&buf) {
                        Ok(_) => r.sent += 1,
                        Err(e) if would_block(&e) => {}
                        Err(_) => r.socket_errors += 1,
                    }
                }
            }
        }
    }
    r.duration_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    r.requests = hist.count();
    r.p50_us = hist.percentile(50.0);
    r.p90_us = hist.percentile(90.0);
    r.p99_us = hist.percentile(99.0);
    r.p999_us = hist.percentile(99.9);
    r.max_us = hist.max_us() as f64;
    Ok(r)
}

/// The responder: answer every datagram on `addr` with its own bytes, on one thread, until
/// `lifetime` has passed (a bound in case nobody stops it) or the process is signalled. It also
/// asks the kernel to kill it when the bench that started it dies.
pub fn serve_echo(addr: SocketAddrV4, lifetime: Duration) -> Result<()> {
    super::die_with_parent()?;
    let sock = UdpSocket::bind(addr).with_context(|| format!("udp responder bind {addr}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(1)))
        .context("udp responder read timeout")?;
    let start = Instant::now();
    let mut buf = [0u8; 2048];
    while start.elapsed() < lifetime {
        match sock.recv_from(&mut buf) {
            Ok((n, peer)) => {
                // A full socket buffer or a vanished client: the client counts it lost.
                let _ = sock.send_to(&buf[..n], peer);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e).context("udp responder receive"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentiles() {
        let mut h = Histogram::new(Duration::from_millis(10));
        assert!(h.percentile(50.0).is_nan());
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count(), 1000);
        assert_eq!(h.percentile(50.0), 500.0);
        assert_eq!(h.percentile(99.0), 990.0);
        assert_eq!(h.percentile(99.9), 999.0);
        // Beyond the limit: counted in the last bucket, max kept exactly.
        h.record(Duration::from_secs(1));
        assert_eq!(h.max_us(), 1_000_000);
        assert_eq!(h.percentile(100.0), 10_000.0);
    }

    #[test]
    fn request_round_trip() {
        let mut b = [0u8; REQUEST_BYTES];
        encode(&mut b, 7, 0xdead_beef);
        assert_eq!(decode(&b), Some((7, 0xdead_beef)));
        assert_eq!(decode(&b[..10]), None);
        b[0] = b'Y';
        assert_eq!(decode(&b), None);
    }

    #[test]
    fn client_and_responder_on_loopback() {
        // Loopback of this (test) process's namespace; a responder thread bounded by lifetime.
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = match probe.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!(),
        };
        drop(probe);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let server = std::thread::spawn(move || {
            let sock = UdpSocket::bind(addr).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut buf = [0u8; 2048];
            let t0 = Instant::now();
            // Bounded: stops when told, or after 60 s.
            while !stop2.load(std::sync::atomic::Ordering::Relaxed)
                && t0.elapsed() < Duration::from_secs(60)
            {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], peer);
                }
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        // The request cap ends the run, long before the duration on any machine.
        let r = client(
            addr,
            &UdpLoad {
                sockets: 2,
                per_socket: 4,
                duration: Duration::from_secs(30),
                loss_timeout: Duration::from_secs(1),
                max_requests: 2000,
            },
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        server.join().unwrap();
        let r = r.unwrap();
        assert_eq!(r.requests, 2000, "{r:?}");
        assert!(r.sent >= r.requests);
        assert!(r.p50_us <= r.p99_us && r.p99_us <= r.max_us, "{r:?}");
        assert_eq!(r.in_flight, 8);
    }
}
