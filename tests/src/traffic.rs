//! Real traffic for namespace tests: a tiny HTTP/1.1 server and UDP responder for the home
//! host, and the clients that drive them through the proxy, with payloads generated from seeds
//! and checked byte for byte (and by checksum) at the other end.
//!
//! HTTP routes (one connection may carry several requests, keep-alive):
//! - `GET /blob?seed=S&len=N`: `N` bytes of the payload of seed `S`;
//! - `PUT /sink?seed=S&len=N` with an `N`-byte body: the server checks the body against seed
//!   `S` and answers `ok <fnv64 hex>` (200) or `mismatch at <offset>` (422);
//! - `GET /`: one line naming the server's address and the peer address it saw.
//!
//! UDP: every datagram is answered with its FNV-1a 64 checksum (8 bytes, big endian) followed
//! by the datagram itself.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::netns::{Netns, NsThread, Stop};

/// Longest request or response head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Largest payload a request may ask for.
const MAX_PAYLOAD: u64 = 64 << 20;
/// Transfer chunk size.
const CHUNK: usize = 16 * 1024;
/// Idle limit of one read or write on a connection.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Deterministic payloads.
// ---------------------------------------------------------------------------------------------

/// SplitMix64 step.
#[must_use]
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The endless byte stream of one seed.
#[derive(Clone, Debug)]
pub struct Payload {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Payload {
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed,
            word: [0; 8],
            used: 8,
        }
    }

    /// Fill `out` with the next bytes of the stream.
    pub fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            if self.used == 8 {
                self.word = splitmix64(&mut self.state).to_le_bytes();
                self.used = 0;
            }
            *b = self.word[self.used];
            self.used += 1;
        }
    }
}

/// FNV-1a, 64 bits.
#[derive(Clone, Copy, Debug)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    #[must_use]
    pub fn finish(self) -> u64 {
        self.0
    }
}

/// FNV-1a 64 of one slice.
#[must_use]
pub fn fnv64(data: &[u8]) -> u64 {
    let mut h = Fnv64::default();
    h.update(data);
    h.finish()
}

/// Checksum of the first `len` bytes of seed `seed`'s payload.
#[must_use]
pub fn payload_checksum(seed: u64, len: u64) -> u64 {
    let mut p = Payload::new(seed);
    let mut h = Fnv64::default();
    let mut buf = [0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
        p.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        left -= n as u64;
    }
    h.finish()
}

/// Upload and download sizes of connection `seed`: upload 16 KiB..=256 KiB, download
/// 64 KiB..=1 MiB, deterministic.
#[must_use]
pub fn transfer_sizes(seed: u64) -> (u64, u64) {
    let mut s = seed ^ 0x5eed_5eed_5eed_5eed;
    let up = (16 << 10) + splitmix64(&mut s) % ((256 << 10) - (16 << 10) + 1);
    let down = (64 << 10) + splitmix64(&mut s) % ((1 << 20) - (64 << 10) + 1);
    (up, down)
}

// ---------------------------------------------------------------------------------------------
// The home server.
// ---------------------------------------------------------------------------------------------

/// What the home server saw. Shared with the test thread (atomics and a mutex).
#[derive(Debug, Default)]
pub struct HomeStats {
    tcp_peers: Mutex<Vec<SocketAddr>>,
    udp_peers: Mutex<BTreeSet<SocketAddr>>,
    active: AtomicUsize,
    max_active: AtomicUsize,
    accepted: AtomicU64,
    requests: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    sink_mismatches: AtomicU64,
    udp_datagrams: AtomicU64,
}

impl HomeStats {
    /// Peer address of every accepted TCP connection.
    #[must_use]
    pub fn tcp_peers(&self) -> Vec<SocketAddr> {
        self.tcp_peers.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Distinct peer addresses of UDP datagrams.
    #[must_use]
    pub fn udp_peers(&self) -> BTreeSet<SocketAddr> {
        self.udp_peers.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Every distinct peer IP address seen, TCP and UDP.
    #[must_use]
    pub fn peer_ips(&self) -> BTreeSet<IpAddr> {
        let mut ips: BTreeSet<IpAddr> = self.tcp_peers().iter().map(SocketAddr::ip).collect();
        ips.extend(self.udp_peers().iter().map(SocketAddr::ip));
        ips
    }

    #[must_use]
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Most TCP connections open at the same time.
    #[must_use]
    pub fn max_active(&self) -> usize {
        self.max_active.load(Ordering::Relaxed)
    }

    #[must_use]
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    #[must_use]
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    #[must_use]
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    #[must_use]
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received.load(Ordering::Relaxed)
    }

    #[must_use]
    pub fn sink_mismatches(&self) -> u64 {
        self.sink_mismatches.load(Ordering::Relaxed)
    }

    #[must_use]
    pub fn udp_datagrams(&self) -> u64 {
        self.udp_datagrams.load(Ordering::Relaxed)
    }
}

/// The home host's servers, running on a thread in the home namespace until stopped.
pub struct HomeServer {
    thread: Option<NsThread<()>>,
    stats: Arc<HomeStats>,
}

impl HomeServer {
    /// Bind the HTTP server on `tcp` (and the UDP responder on `udp`) inside `ns` and serve
    /// until stopped or until `limit` passes. Returns once both sockets are bound.
    pub fn start(
        ns: &Netns,
        tcp: SocketAddr,
        udp: Option<SocketAddr>,
        limit: Duration,
    ) -> Result<Self> {
        let stats = Arc::new(HomeStats::default());
        let (ready_tx, ready_rx) = mpsc::channel::<()>();
        let server_stats = Arc::clone(&stats);
        let thread = ns.spawn(limit, move |stop| async move {
            let listener = TcpListener::bind(tcp)
                .await
                .with_context(|| format!("home: bind {tcp}"))?;
            let udp = match udp {
                Some(addr) => Some(
                    UdpSocket::bind(addr)
                        .await
                        .with_context(|| format!("home: bind udp {addr}"))?,
                ),
                None => None,
            };
            let _ = ready_tx.send(());
            serve(listener, udp, server_stats, stop).await
        })?;
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(()) => Ok(Self {
                thread: Some(thread),
                stats,
            }),
            // The closure returned before binding: its error says why.
            Err(_) => Err(thread
                .stop_and_join()
                .err()
                .unwrap_or_else(|| anyhow!("home server did not start"))),
        }
    }

    #[must_use]
    pub fn stats(&self) -> &Arc<HomeStats> {
        &self.stats
    }

    /// Stop serving and wait for the server thread; its error if it failed.
    pub fn stop(mut self) -> Result<()> {
        match self.thread.take() {
            Some(t) => t.stop_and_join(),
            None => Ok(()),
        }
    }
}

async fn serve(
    listener: TcpListener,
    udp: Option<UdpSocket>,
    stats: Arc<HomeStats>,
    mut stop: Stop,
) -> Result<()> {
    let mut conns = JoinSet::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        tokio::select! {
            () = stop.wait() => break,
            accepted = listener.accept() => {
                let (stream, peer) = accepted.context("home: accept")?;
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut peers) = stats.tcp_peers.lock() {
                    peers.push(peer);
                }
                let stats = Arc::clone(&stats);
                conns.spawn(async move {
                    let active = stats.active.fetch_add(1, Ordering::Relaxed) + 1;
                    stats.max_active.fetch_max(active, Ordering::Relaxed);
                    let result = serve_http(stream, peer, &stats).await;
                    stats.active.fetch_sub(1, Ordering::Relaxed);
                    if let Err(e) = result {
                        eprintln!("home: connection from {peer}: {e:#}");
                    }
                });
            }
            received = recv_udp(udp.as_ref(), &mut buf) => {
                let (n, peer) = received.context("home: udp recv")?;
                let sock = udp.as_ref().ok_or_else(|| anyhow!("udp without socket"))?;
                stats.udp_datagrams.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut peers) = stats.udp_peers.lock() {
                    peers.insert(peer);
                }
                let mut reply = fnv64(&buf[..n]).to_be_bytes().to_vec();
                reply.extend_from_slice(&buf[..n]);
                sock.send_to(&reply, peer).await.context("home: udp send")?;
            }
            // Reap finished connection tasks so the set does not grow without bound.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.abort_all();
    Ok(())
}

async fn recv_udp(
    sock: Option<&UdpSocket>,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr)> {
    match sock {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// A parsed request or response head.
#[derive(Debug)]
struct Head {
    /// The first line, without CRLF.
    start: String,
    content_length: Option<u64>,
    close: bool,
}

/// Read a head (start line and headers up to the empty line). `Ok(None)` on EOF before any
/// byte.
async fn read_head<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Result<Option<Head>> {
    let mut start = String::new();
    let mut total = 0usize;
    let mut content_length = None;
    let mut close = false;
    let mut line = String::new();
    loop {
        line.clear();
        let n = timeout(IO_TIMEOUT, r.read_line(&mut line))
            .await
            .map_err(|_| anyhow!("timed out reading a head"))??;
        if n == 0 {
            if total == 0 {
                return Ok(None);
            }
            bail!("EOF inside a head");
        }
        total += n;
        ensure!(total <= MAX_HEAD, "head longer than {MAX_HEAD} bytes");
        let text = line.trim_end_matches(['\r', '\n']);
        if start.is_empty() {
            ensure!(!text.is_empty(), "empty start line");
            start = text.to_owned();
            continue;
        }
        if text.is_empty() {
            return Ok(Some(Head {
                start,
                content_length,
                close,
            }));
        }
        let (name, value) = text
            .split_once(':')
            .ok_or_else(|| anyhow!("bad header line {text:?}"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse()
                    .with_context(|| format!("bad length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            close = true;
        }
    }
}

/// `seed` and `len` from a query string such as `seed=7&len=1024`.
fn seed_and_len(query: &str) -> Result<(u64, u64)> {
    let mut seed = None;
    let mut len = None;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("seed", v)) => seed = Some(v.parse().context("bad seed")?),
            Some(("len", v)) => len = Some(v.parse().context("bad len")?),
            _ => {}
        }
    }
    let (Some(seed), Some(len)) = (seed, len) else {
        bail!("query {query:?} needs seed and len");
    };
    ensure!(len <= MAX_PAYLOAD, "len {len} larger than {MAX_PAYLOAD}");
    Ok((seed, len))
}

async fn write_all_timed<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> Result<()> {
    timeout(IO_TIMEOUT, w.write_all(data))
        .await
        .map_err(|_| anyhow!("timed out writing"))?
        .context("write")
}

async fn respond<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    status: &str,
    body: &str,
) -> Result<()> {
    let msg = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    write_all_timed(w, msg.as_bytes()).await?;
    timeout(IO_TIMEOUT, w.flush())
        .await
        .map_err(|_| anyhow!("timed out flushing"))?
        .context("flush")
}

/// Serve HTTP/1.1 requests on one connection until EOF or `Connection: close`.
async fn serve_http(stream: TcpStream, peer: SocketAddr, stats: &HomeStats) -> Result<()> {
    let local = stream.local_addr().context("local_addr")?;
    let mut s = BufReader::new(stream);
    let mut buf = vec![0u8; CHUNK];
    // Bounded: every iteration consumes a request head, and a connection's life is bounded by
    // the server thread's limit.
    loop {
        let Some(head) = read_head(&mut s).await? else {
            return Ok(());
        };
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let mut parts = head.start.split(' ');
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        match (method, path) {
            ("GET", "/blob") => {
                let (seed, len) = seed_and_len(query)?;
                let hdr = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                     Content-Length: {len}\r\n\r\n"
                );
                write_all_timed(&mut s, hdr.as_bytes()).await?;
                let mut p = Payload::new(seed);
                let mut left = len;
                while left > 0 {
                    let n = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
                    p.fill(&mut buf[..n]);
                    write_all_timed(&mut s, &buf[..n]).await?;
                    stats.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
                    left -= n as u64;
                }
                timeout(IO_TIMEOUT, s.flush())
                    .await
                    .map_err(|_| anyhow!("timed out flushing"))??;
            }
            ("PUT", "/sink") => {
                let (seed, len) = seed_and_len(query)?;
                ensure!(
                    head.content_length == Some(len),
                    "sink: Content-Length {:?} != len {len}",
                    head.content_length
                );
                let mut p = Payload::new(seed);
                let mut want = vec![0u8; CHUNK];
                let mut h = Fnv64::default();
                let mut mismatch = None;
                let mut done = 0u64;
                while done < len {
                    let n = usize::try_from((len - done).min(CHUNK as u64)).unwrap_or(CHUNK);
                    timeout(IO_TIMEOUT, s.read_exact(&mut buf[..n]))
                        .await
                        .map_err(|_| anyhow!("sink: timed out reading the body"))?
                        .context("sink: read body")?;
                    p.fill(&mut want[..n]);
                    if mismatch.is_none()
                        && let Some(i) = (0..n).find(|&i| buf[i] != want[i])
                    {
                        mismatch = Some(done + i as u64);
                    }
                    h.update(&buf[..n]);
                    stats.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
                    done += n as u64;
                }
                match mismatch {
                    None => respond(&mut s, "200 OK", &format!("ok {:016x}\n", h.finish())).await?,
                    Some(off) => {
                        stats.sink_mismatches.fetch_add(1, Ordering::Relaxed);
                        respond(
                            &mut s,
                            "422 Unprocessable Content",
                            &format!("mismatch at {off}\n"),
                        )
                        .await?;
                    }
                }
            }
            ("GET", "/") => {
                let body = format!("hello from home {local}: you came from {peer}\n");
                respond(&mut s, "200 OK", &body).await?;
            }
            _ => respond(&mut s, "404 Not Found", "no such route\n").await?,
        }
        if head.close {
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients.
// ---------------------------------------------------------------------------------------------

/// One client HTTP/1.1 connection (keep-alive).
pub struct Conn {
    s: BufReader<TcpStream>,
    local: SocketAddr,
}

impl Conn {
    /// Connect to `addr` within `limit`.
    pub async fn connect(addr: SocketAddr, limit: Duration) -> Result<Self> {
        let stream = timeout(limit, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connect {addr}: timed out after {limit:?}"))?
            .with_context(|| format!("connect {addr}"))?;
        let local = stream.local_addr().context("local_addr")?;
        Ok(Self {
            s: BufReader::new(stream),
            local,
        })
    }

    /// The client-side address of this connection.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    async fn response_head(&mut self) -> Result<(u16, Head)> {
        let head = read_head(&mut self.s)
            .await?
            .ok_or_else(|| anyhow!("connection closed before a response"))?;
        let status = head
            .start
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad status line {:?}", head.start))?;
        Ok((status, head))
    }

    async fn small_body(&mut self, head: &Head) -> Result<String> {
        let len = head
            .content_length
            .ok_or_else(|| anyhow!("response without Content-Length"))?;
        ensure!(len <= MAX_HEAD as u64, "small body of {len} bytes");
        let mut body = vec![0u8; usize::try_from(len)?];
        timeout(IO_TIMEOUT, self.s.read_exact(&mut body))
            .await
            .map_err(|_| anyhow!("timed out reading a body"))??;
        String::from_utf8(body).context("body is not UTF-8")
    }

    /// `GET path`: the status line and the (short, text) body.
    pub async fn get_text(&mut self, path: &str) -> Result<(String, String)> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: service\r\n\r\n");
        write_all_timed(&mut self.s, req.as_bytes()).await?;
        let (_, head) = self.response_head().await?;
        let body = self.small_body(&head).await?;
        Ok((head.start, body))
    }

    /// Download `len` bytes of seed `seed`, checking every byte; returns the checksum.
    pub async fn get_blob(&mut self, seed: u64, len: u64) -> Result<u64> {
        let req = format!("GET /blob?seed={seed}&len={len} HTTP/1.1\r\nHost: service\r\n\r\n");
        write_all_timed(&mut self.s, req.as_bytes()).await?;
        let (status, head) = self.response_head().await?;
        ensure!(status == 200, "GET /blob: {}", head.start);
        ensure!(
            head.content_length == Some(len),
            "GET /blob: Content-Length {:?}, want {len}",
            head.content_length
        );
        let mut p = Payload::new(seed);
        let mut buf = vec![0u8; CHUNK];
        let mut want = vec![0u8; CHUNK];
        let mut h = Fnv64::default();
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from((len - done).min(CHUNK as u64)).unwrap_or(CHUNK);
            timeout(IO_TIMEOUT, self.s.read_exact(&mut buf[..n]))
                .await
                .map_err(|_| anyhow!("GET /blob: timed out at byte {done} of {len}"))?
                .with_context(|| format!("GET /blob: read at byte {done} of {len}"))?;
            p.fill(&mut want[..n]);
            if let Some(i) = (0..n).find(|&i| buf[i] != want[i]) {
                bail!("GET /blob seed {seed}: byte {} differs", done + i as u64);
            }
            h.update(&buf[..n]);
            done += n as u64;
        }
        let sum = h.finish();
        ensure!(
            sum == payload_checksum(seed, len),
            "GET /blob seed {seed}: checksum {sum:016x} differs"
        );
        Ok(sum)
    }

    /// Upload `len` bytes of seed `seed`; the server checks them and returns their checksum,
    /// which must equal ours. Returns it.
    pub async fn put_sink(&mut self, seed: u64, len: u64) -> Result<u64> {
        let req = format!(
            "PUT /sink?seed={seed}&len={len} HTTP/1.1\r\nHost: service\r\nContent-Length: {len}\r\n\r\n"
        );
        write_all_timed(&mut self.s, req.as_bytes()).await?;
        let mut p = Payload::new(seed);
        let mut buf = vec![0u8; CHUNK];
        let mut h = Fnv64::default();
        let mut left = len;
        while left > 0 {
            let n = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
            p.fill(&mut buf[..n]);
            h.update(&buf[..n]);
            write_all_timed(&mut self.s, &buf[..n]).await?;
            left -= n as u64;
        }
        timeout(IO_TIMEOUT, self.s.flush())
            .await
            .map_err(|_| anyhow!("timed out flushing"))??;
        let (status, head) = self.response_head().await?;
        let body = self.small_body(&head).await?;
        ensure!(
            status == 200,
            "PUT /sink seed {seed}: {} {}",
            head.start,
            body.trim()
        );
        let ours = h.finish();
        let theirs = body
            .trim()
            .strip_prefix("ok ")
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .ok_or_else(|| anyhow!("PUT /sink: bad answer {body:?}"))?;
        ensure!(
            ours == theirs,
            "PUT /sink seed {seed}: server checksum {theirs:016x} != ours {ours:016x}"
        );
        Ok(ours)
    }
}

impl Conn {
    /// Like [`Conn::put_sink`], but the body goes out in `stages` equal parts with a pause
    /// before each part after the first: before part `k` (1-based index into `arrived`) the
    /// upload counts itself in `arrived[k - 1]` and waits until `phase` reaches `k`, or fails
    /// after `limit`. The test drives `phase` (for example: kill the daemon, then restart it)
    /// while every upload is held in the middle of its request body.
    pub async fn put_sink_staged(
        &mut self,
        seed: u64,
        len: u64,
        phase: &mut tokio::sync::watch::Receiver<u32>,
        arrived: &[AtomicUsize],
        limit: Duration,
    ) -> Result<u64> {
        let stages = u64::try_from(arrived.len()).context("stage count")? + 1;
        let req = format!(
            "PUT /sink?seed={seed}&len={len} HTTP/1.1\r\nHost: service\r\nContent-Length: {len}\r\n\r\n"
        );
        write_all_timed(&mut self.s, req.as_bytes()).await?;
        let mut p = Payload::new(seed);
        let mut buf = vec![0u8; CHUNK];
        let mut h = Fnv64::default();
        let part = len.div_ceil(stages);
        let mut sent = 0u64;
        for stage in 0..stages {
            if stage > 0 {
                let k = usize::try_from(stage).context("stage")?;
                arrived[k - 1].fetch_add(1, Ordering::SeqCst);
                let want = u32::try_from(stage).context("stage")?;
                timeout(limit, phase.wait_for(|v| *v >= want))
                    .await
                    .map_err(|_| anyhow!("PUT /sink seed {seed}: stage {stage} never released"))?
                    .map_err(|_| anyhow!("PUT /sink seed {seed}: the stage driver went away"))?;
            }
            let end = ((stage + 1) * part).min(len);
            while sent < end {
                let n = usize::try_from((end - sent).min(CHUNK as u64)).unwrap_or(CHUNK);
                p.fill(&mut buf[..n]);
                h.update(&buf[..n]);
                write_all_timed(&mut self.s, &buf[..n])
                    .await
                    .with_context(|| format!("PUT /sink seed {seed}: at byte {sent} of {len}"))?;
                sent += n as u64;
            }
            timeout(IO_TIMEOUT, self.s.flush())
                .await
                .map_err(|_| anyhow!("timed out flushing"))??;
        }
        let (status, head) = self.response_head().await?;
        let body = self.small_body(&head).await?;
        ensure!(
            status == 200,
            "PUT /sink seed {seed}: {} {}",
            head.start,
            body.trim()
        );
        let ours = h.finish();
        let theirs = body
            .trim()
            .strip_prefix("ok ")
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .ok_or_else(|| anyhow!("PUT /sink: bad answer {body:?}"))?;
        ensure!(
            ours == theirs,
            "PUT /sink seed {seed}: server checksum {theirs:016x} != ours {ours:016x}"
        );
        Ok(ours)
    }
}

/// `GET /` through `service`, retried (at most 40 attempts, each bounded to 5 s) while the proxy
/// comes up; the body of the first 200 (the home server names the peer it saw).
///
/// # Errors
/// The last attempt's error when no attempt got a 200.
pub async fn get_root_until_up(service: SocketAddr) -> Result<String> {
    let mut last = anyhow!("no attempt");
    for _ in 0..40 {
        let attempt = async {
            let mut c = Conn::connect(service, Duration::from_secs(2)).await?;
            let (status, body) = c.get_text("/").await?;
            ensure!(status.contains(" 200 "), "GET /: {status}");
            Ok(body)
        };
        match timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(body)) => return Ok(body),
            Ok(Err(e)) => last = e,
            Err(_) => last = anyhow!("GET / timed out"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(last.context("GET / never succeeded"))
}

/// Open `n` connections to `addr` at once; all of them are established when this returns.
pub async fn connect_all(addr: SocketAddr, n: usize, limit: Duration) -> Result<Vec<Conn>> {
    let mut set = JoinSet::new();
    for i in 0..n {
        set.spawn(async move { (i, Conn::connect(addr, limit).await) });
    }
    let mut conns: Vec<Option<Conn>> = (0..n).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        let (i, conn) = joined.context("connect task")?;
        conns[i] = Some(conn.with_context(|| format!("connection {i}"))?);
    }
    conns
        .into_iter()
        .enumerate()
        .map(|(i, c)| c.ok_or_else(|| anyhow!("connection {i} missing")))
        .collect()
}

/// What a load run moved.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub connections: usize,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Upper bound of packets a transfer needs at least: payload / 1460 per direction, summed.
    pub min_packets_up: u64,
    pub min_packets_down: u64,
    pub elapsed: Duration,
}

/// Largest TCP payload of one packet on a 1500-byte MTU (no options).
pub const MAX_SEGMENT: u64 = 1460;

/// On every connection (concurrently): upload then download the sizes of seed
/// `base_seed + index` (see [`transfer_sizes`]), each checked end to end.
pub async fn transfer_all(conns: Vec<Conn>, base_seed: u64) -> Result<LoadReport> {
    let start = Instant::now();
    let mut report = LoadReport {
        connections: conns.len(),
        ..LoadReport::default()
    };
    let mut set = JoinSet::new();
    for (i, mut conn) in conns.into_iter().enumerate() {
        let seed = base_seed + i as u64;
        let (up, down) = transfer_sizes(seed);
        report.bytes_up += up;
        report.bytes_down += down;
        report.min_packets_up += up.div_ceil(MAX_SEGMENT);
        report.min_packets_down += down.div_ceil(MAX_SEGMENT);
        set.spawn(async move {
            conn.put_sink(seed, up)
                .await
                .with_context(|| format!("connection {i} ({}) upload", conn.local_addr()))?;
            conn.get_blob(seed, down)
                .await
                .with_context(|| format!("connection {i} ({}) download", conn.local_addr()))?;
            Ok::<(), anyhow::Error>(())
        });
    }
    let mut first_error = None;
    let mut failed = 0usize;
    while let Some(joined) = set.join_next().await {
        if let Err(e) = joined.context("transfer task").and_then(|r| r) {
            failed += 1;
            first_error.get_or_insert(e);
        }
    }
    if let Some(e) = first_error {
        return Err(e.context(format!(
            "{failed} of {} transfers failed",
            report.connections
        )));
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

/// What a UDP exchange did.
#[derive(Clone, Debug, Default)]
pub struct UdpReport {
    pub sockets: usize,
    pub requests: usize,
    /// Requests that needed more than one attempt.
    pub retries: usize,
    pub bytes: u64,
}

/// `sockets` UDP sockets (each its own flow), each sending `per_socket` requests to `service`
/// one after the other and checking every answer (FNV prefix and echoed payload). A request is
/// retried up to 5 times, 1 s apart. Sockets are connected, so an answer from any address but
/// `service` is never received.
pub async fn udp_exchange(
    service: SocketAddr,
    sockets: usize,
    per_socket: usize,
    seed: u64,
) -> Result<UdpReport> {
    let mut set = JoinSet::new();
    for k in 0..sockets {
        set.spawn(async move {
            let any = if service.is_ipv6() {
                "[::]:0"
            } else {
                "0.0.0.0:0"
            };
            let sock = UdpSocket::bind(any).await.context("udp bind")?;
            sock.connect(service).await.context("udp connect")?;
            let mut retries = 0usize;
            let mut bytes = 0u64;
            let mut rng = seed ^ (k as u64) << 32;
            let mut buf = vec![0u8; 2048];
            for r in 0..per_socket {
                let len = 16 + usize::try_from(splitmix64(&mut rng) % 1185).unwrap_or(0);
                let mut msg = vec![0u8; len];
                Payload::new(splitmix64(&mut rng)).fill(&mut msg);
                // The first 8 bytes identify the request, so a late answer to an earlier try
                // of another request is recognised and skipped.
                msg[..8].copy_from_slice(&((k as u64) << 32 | r as u64).to_be_bytes());
                let want = fnv64(&msg);
                let mut answered = false;
                for attempt in 0..5 {
                    if attempt > 0 {
                        retries += 1;
                    }
                    sock.send(&msg).await.context("udp send")?;
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
                    // Bounded: each pass consumes one datagram, and the deadline ends it.
                    while let Ok(got) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await
                    {
                        let n = got.context("udp recv")?;
                        if n == msg.len() + 8 && buf[8..16] == msg[..8] {
                            ensure!(
                                buf[..8] == want.to_be_bytes() && buf[8..n] == msg[..],
                                "udp socket {k} request {r}: answer does not match"
                            );
                            answered = true;
                            break;
                        }
                    }
                    if answered {
                        break;
                    }
                }
                ensure!(
                    answered,
                    "udp socket {k} request {r}: no answer after 5 attempts"
                );
                bytes += msg.len() as u64;
            }
            Ok::<_, anyhow::Error>((retries, bytes))
        });
    }
    let mut report = UdpReport {
        sockets,
        requests: sockets * per_socket,
        ..UdpReport::default()
    };
    while let Some(joined) = set.join_next().await {
        let (retries, bytes) = joined.context("udp task")??;
        report.retries += retries;
        report.bytes += bytes;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_deterministic_and_chunking_free() {
        let mut a = vec![0u8; 1000];
        Payload::new(7).fill(&mut a);
        let mut b = vec![0u8; 1000];
        let mut p = Payload::new(7);
        p.fill(&mut b[..3]);
        p.fill(&mut b[3..500]);
        p.fill(&mut b[500..]);
        assert_eq!(a, b);
        let mut c = vec![0u8; 1000];
        Payload::new(8).fill(&mut c);
        assert_ne!(a, c);
        assert_eq!(payload_checksum(7, 1000), fnv64(&a));
    }

    #[test]
    fn fnv_known_value() {
        assert_eq!(fnv64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn sizes_in_range() {
        for seed in 0..1000 {
            let (up, down) = transfer_sizes(seed);
            assert!((16 << 10..=256 << 10).contains(&up));
            assert!((64 << 10..=1 << 20).contains(&down));
        }
    }

    #[test]
    fn query_parsing() {
        assert_eq!(seed_and_len("seed=3&len=10").ok(), Some((3, 10)));
        assert!(seed_and_len("seed=3").is_err());
        assert!(seed_and_len(&format!("seed=1&len={}", MAX_PAYLOAD + 1)).is_err());
    }
}
