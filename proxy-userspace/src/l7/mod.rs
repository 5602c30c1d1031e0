//! The HTTP reverse proxy of `mode = "http"` services: hyper 1.x server connections; upstream,
//! the daemon's own HTTP/1 client for requests without a body ([`direct`]) and hyper's for the
//! rest (request bodies, upgrades).
//!
//! Per request: route by Host and path prefix ([`crate::config::HttpConfig::route`]) to an
//! upstream group; take its upstreams that the control plane does not report unhealthy, round
//! robin; remove hop-by-hop headers and append the client to X-Forwarded-For and Forwarded,
//! keeping a trusted front proxy's X-Forwarded-Proto/-Port and Forwarded ([`headers`]); send
//! on an upstream connection (from the SNAT address); stream both bodies (never buffered
//! whole); log one access line (`xdp_proxy::access`).
//!
//! Upstream connections ([`Conns`]): each client connection keeps the keep-alive HTTP/1
//! connections it used, one per upstream (at most [`OWN_MAX`]), and sends its next request to
//! the same upstream on the same connection when that connection is ready: no pool lookup, no
//! lock shared with other client connections. The upstream is still chosen per request (route,
//! health, round robin), so a connection to an upstream that was taken out gets no further
//! request. Otherwise the connection comes from the service's idle list (connections that
//! client connections left behind when they ended, at most [`IDLE_MAX`], dropped after the
//! service's `idle_timeout`), else a new one is opened. A request that a reused connection
//! closed before answering (or, through hyper's client, before sending) is sent again on a new
//! connection. Two kinds, kept apart: plain connections for requests without a body, read in
//! place by the response body ([`direct`]); hyper client connections for the rest, driven by
//! the client connection's own task ([`drive`]: no task switch per request). The client
//! connection's deadlines share one timer ([`timer`]).
//!
//! Client admission: the service's `allow` / `deny` lists and `new_flow_rate` /
//! `new_flow_burst` are asked at each accepted client connection ([`crate::l4::admission`],
//! the rules and reason names of the L4 paths; a new-flow is a client connection here). A
//! refused connection is reset (SO_LINGER 0, closed) before hyper reads a byte of it, rather
//! than answered 403: the refused client gets no HTTP exchange at all (as at L4), costs no
//! parsing, and a client is refused the same way whatever the service's mode. Counted in the
//! service's `refused` counters. `mss_clamp` is TCP_MAXSEG on the listening socket and on each
//! upstream socket before connect.
//!
//! Failures: no usable upstream -> 503; every upstream refused or failed the connect -> 503;
//! connect or response head timed out -> 504; the upstream failed after the connect -> 502.
//! A connect failure is retried on the next upstream when the request is idempotent (GET, HEAD,
//! OPTIONS, TRACE, PUT, DELETE) and has no body (a streamed body cannot be replayed without
//! buffering it). Upgrades (WebSocket) are passed through: after a 101 both connections are
//! joined byte for byte.

mod direct;
mod drive;
pub mod headers;
mod timer;

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header,
    uri::Authority,
};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::watch,
    task::JoinHandle,
};

use crate::{
    config::{Config, HttpConfig, ServiceMode, SnatAddrs},
    l4::counters::{PerUpstream, Traffic},
    state::SharedStatus,
};

/// Bodies both ways: hyper's (client requests, upstream responses through hyper's client), ours
/// ([`direct::DirectBody`]), and the proxy's own answers.
type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Upstreams tried for one request (the first, then retries after connect failures).
const MAX_ATTEMPTS: usize = 3;
/// Client connections served at once per service (more wait in the accept queue).
pub const MAX_CONNECTIONS: usize = 16_384;
/// Upstream connections one client connection keeps (one per upstream it used last).
pub const OWN_MAX: usize = 4;
/// Idle upstream connections a service keeps for client connections to come.
pub const IDLE_MAX: usize = 256;

/// The sending half of one upstream HTTP/1 connection (its connection future is driven by the
/// client connection's task that opened it, see [`drive`]).
type Sender = hyper::client::conn::http1::SendRequest<Body>;

/// The upstream connections of one client connection; when the client connection ends, the
/// ready ones go to the service's idle list (with their connection futures).
struct Conns {
    svc: Arc<Service>,
    /// The client's address.
    peer: SocketAddr,
    /// The client's address as the access log writes it, formatted once, on the first line
    /// written (nothing to format with the access log off).
    peer_text: std::sync::OnceLock<String>,
    /// Ready connections for the next request: upstream, sender, id in `upstreams`.
    own: std::sync::Mutex<Vec<(SocketAddr, Sender, u64)>>,
    /// Plain connections for the next request without a body ([`direct`]).
    direct: std::sync::Mutex<Vec<(SocketAddr, direct::Conn)>>,
    /// The client connection ended: connections given back go to the service's idle list.
    finished: std::sync::atomic::AtomicBool,
    /// The id of the next connection this client connection opens or takes over.
    next_id: AtomicU64,
    /// The upstream connections this client connection's task drives.
    upstreams: Arc<drive::Upstreams>,
    /// The connection's one timer (header read, upstream response head).
    deadlines: Arc<timer::Deadlines>,
    /// The buffer the last request head went out of, for the next ([`LentHead`]): requests on
    /// one client connection come one after the other.
    head: std::sync::Mutex<Vec<u8>>,
}

/// A request head buffer lent by the client connection ([`Conns::lend_head`]), given back when
/// dropped: no allocation per request for the head.
struct LentHead<'a> {
    conns: &'a Conns,
    buf: Vec<u8>,
}

impl Drop for LentHead<'_> {
    fn drop(&mut self) {
        // A buffer grown by an unusually large head is not kept.
        if self.buf.capacity() <= LENT_HEAD_MAX {
            let buf = std::mem::take(&mut self.buf);
            match self.conns.head.lock() {
                Ok(mut h) => *h = buf,
                Err(p) => *p.into_inner() = buf,
            }
        }
    }
}

/// The largest request head buffer a client connection keeps for its next request.
const LENT_HEAD_MAX: usize = 16 * 1024;

impl Conns {
    fn lend_head(&self) -> LentHead<'_> {
        let buf = match self.head.lock() {
            Ok(mut h) => std::mem::take(&mut *h),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        };
        LentHead { conns: self, buf }
    }

    fn peer_text(&self) -> &str {
        self.peer_text
            .get_or_init(|| headers::socket_text(self.peer))
    }

    fn own(&self) -> std::sync::MutexGuard<'_, Vec<(SocketAddr, Sender, u64)>> {
        match self.own.lock() {
            Ok(o) => o,
            Err(p) => p.into_inner(),
        }
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A ready connection to `up` and its id: this client connection's own, else an idle one
    /// of the service (taken over: driven by this task from now on).
    fn take(&self, up: SocketAddr) -> Option<(Sender, u64)> {
        let mut own = self.own();
        if let Some(i) = own.iter().position(|(a, _, _)| *a == up) {
            let (_, s, id) = own.swap_remove(i);
            if s.is_ready() {
                return Some((s, id));
            }
        }
        drop(own);
        while let Some((s, mut conn)) = self.svc.idle_take(up) {
            // Polled here first: its wake-ups come to this task, and one that ended while idle
            // is seen now.
            if self.upstreams.poll_here(&mut conn).is_ready() || !s.is_ready() {
                continue;
            }
            let id = self.id();
            self.upstreams.adopt_polled(id, conn);
            return Some((s, id));
        }
        None
    }

    /// Keep `s` (to `up`, id `id`) for this client connection's next request.
    fn put(&self, up: SocketAddr, s: Sender, id: u64) {
        let mut own = self.own();
        if own.len() >= OWN_MAX {
            let (a, old, old_id) = own.remove(0);
            self.to_idle(a, old, old_id);
        }
        own.push((up, s, id));
    }

    /// Give connection `id` (to `up`) and its future to the service's idle list.
    fn to_idle(&self, up: SocketAddr, s: Sender, id: u64) {
        if let Some(conn) = self.upstreams.release(id) {
            self.svc.idle_put(up, s, conn);
        }
    }

    fn direct(&self) -> std::sync::MutexGuard<'_, Vec<(SocketAddr, direct::Conn)>> {
        match self.direct.lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        }
    }

    /// A plain connection to `up` that may carry a request: this client connection's own, else
    /// an idle one of the service.
    fn take_direct(&self, up: SocketAddr) -> Option<direct::Conn> {
        {
            let mut own = self.direct();
            if let Some(i) = own.iter().position(|(a, _)| *a == up) {
                let (_, c) = own.swap_remove(i);
                if c.idle_ok() {
                    return Some(c);
                }
            }
        }
        self.svc.direct_idle_take(up)
    }

    /// The client connection ended: its ready connections go to the idle list, every other
    /// connection it still drives goes on in a task of its own.
    fn finish(&self) {
        self.finished.store(true, Ordering::Release);
        let own = std::mem::take(&mut *self.own());
        for (a, s, id) in own {
            self.to_idle(a, s, id);
        }
        let direct = std::mem::take(&mut *self.direct());
        for (a, c) in direct {
            self.svc.direct_idle_put(a, c);
        }
        self.upstreams.hand_off();
    }
}

impl direct::Keep for Conns {
    /// A response body was read to its end: its connection carries this client connection's
    /// next request to `up` (or, the client connection ended, another's).
    fn keep(&self, up: SocketAddr, conn: direct::Conn) {
        if self.finished.load(Ordering::Acquire) {
            self.svc.direct_idle_put(up, conn);
            return;
        }
        let mut own = self.direct();
        if own.len() >= OWN_MAX {
            let (a, old) = own.remove(0);
            self.svc.direct_idle_put(a, old);
        }
        own.push((up, conn));
    }
}

impl Drop for Conns {
    fn drop(&mut self) {
        self.finish();
    }
}

/// An idle upstream connection of a service.
struct Idle {
    up: SocketAddr,
    sender: Sender,
    /// The connection's future: not driven while idle (the sweep polls it), taken over by the
    /// client connection that takes the connection.
    conn: drive::UpstreamConn,
    since: Instant,
}

/// Per-service counters (shown in /metrics and /status).
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub responses_5xx: AtomicU64,
    pub retries: AtomicU64,
    pub upgrades: AtomicU64,
    /// Client connections accepted and open, bytes of them both ways, upstream connect
    /// failures.
    pub traffic: Arc<Traffic>,
    /// Per upstream: requests sent (`opened`) and connect failures.
    pub upstreams: PerUpstream,
    /// Requests answered 503 without trying (no healthy upstream).
    pub no_upstream: AtomicU64,
    /// Responses by class: 1xx, 2xx, 3xx, 4xx, 5xx.
    pub classes: [AtomicU64; 5],
    /// `allow` / `deny` / new-flow rate of the service, and the client connections they
    /// refused.
    pub admission: crate::l4::admission::Admission,
}

/// A client connection whose bytes are counted as they pass (read: toward the upstream;
/// written: toward the client), upgraded connections included.
struct Counted<S> {
    inner: S,
    traffic: Arc<Traffic>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.traffic.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.traffic
                .bytes_down
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.traffic
                .bytes_down
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What a reload may change: routes, upstreams, header timeout.
#[derive(Debug, PartialEq, Eq)]
struct Routing {
    http: HttpConfig,
    /// The service's own upstreams: requests no route matches.
    default_group: Vec<SocketAddr>,
    /// The URI authority of every upstream of the default group and the routes, made once
    /// (the pooled client wants absolute URIs).
    authorities: Vec<(SocketAddr, Authority)>,
}

impl Routing {
    fn of(s: &crate::config::ServiceConfig) -> Self {
        let default_group: Vec<SocketAddr> =
            s.upstreams.iter().filter_map(|u| u.static_addr()).collect();
        if default_group.len() < s.upstreams.len() {
            tracing::warn!(service = %s.name, "http services use upstream IP addresses only: DNS upstreams are skipped");
        }
        let http = s.http.clone().unwrap_or_default();
        let mut authorities: Vec<(SocketAddr, Authority)> = Vec::new();
        for up in default_group
            .iter()
            .chain(http.routes.iter().flat_map(|r| r.upstreams.iter()))
        {
            if !authorities.iter().any(|(a, _)| a == up)
                && let Ok(auth) = Authority::try_from(up.to_string())
            {
                authorities.push((*up, auth));
            }
        }
        Self {
            http,
            default_group,
            authorities,
        }
    }

    /// `up`'s cached `ip:port` text.
    fn authority_str(&self, up: SocketAddr) -> Option<&str> {
        self.authorities
            .iter()
            .find(|(a, _)| *a == up)
            .map(|(_, auth)| auth.as_str())
    }

    /// `up` as a URI authority (`ip:port`, `[ip6]:port`).
    fn authority(&self, up: SocketAddr) -> Option<Authority> {
        match self.authorities.iter().find(|(a, _)| *a == up) {
            Some((_, auth)) => Some(auth.clone()),
            None => Authority::try_from(up.to_string()).ok(),
        }
    }
}

/// One served http service.
pub struct Service {
    pub name: String,
    pub listen: SocketAddr,
    routing: std::sync::RwLock<Arc<Routing>>,
    /// Source addresses of upstream connections.
    snat: SnatAddrs,
    /// TCP_MAXSEG of the listening socket and of upstream sockets (0: none).
    mss_clamp: u16,
    /// Idle upstream connections: upstream, sender, connection future (polled by the sweep),
    /// since when idle.
    idle: std::sync::Mutex<Vec<Idle>>,
    /// Idle plain connections ([`direct`]): upstream, connection, since when idle.
    direct_idle: std::sync::Mutex<Vec<(SocketAddr, direct::Conn, Instant)>>,
    status: SharedStatus,
    next: AtomicUsize,
    pub stats: Stats,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum L7Error {
    #[error("service `{name}`: listening on {listen}/tcp: {source}")]
    Listen {
        name: String,
        listen: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// The running L7 listeners; dropping it stops them.
#[derive(Debug)]
pub struct L7 {
    pub services: Vec<Arc<Service>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl L7 {
    /// Apply a reloaded config: the routes, upstreams and header timeout of every running http
    /// service (same name and listen address); a new or removed http service, or a changed
    /// connect or idle timeout, takes a restart (logged).
    pub fn reconfigure(&self, config: &Config) {
        for svc in &self.services {
            let Some(s) = config.services.iter().find(|s| {
                s.mode == ServiceMode::Http && s.name == svc.name && s.listen == svc.listen
            }) else {
                tracing::warn!(service = %svc.name, "http service removed or changed its listen address: it keeps running until a restart");
                continue;
            };
            let next = Routing::of(s);
            let old = svc.routing();
            if svc.stats.admission.set(&s.fast) {
                tracing::info!(service = %svc.name, allow = s.fast.allow.len(), deny = s.fast.deny.len(), new_flow_rate = s.fast.new_flow_rate, "http admission rules reloaded (next client connections)");
            }
            if s.fast.mss_clamp != svc.mss_clamp {
                tracing::warn!(service = %svc.name, "http mss_clamp changes take a restart");
            }
            if *old == next {
                continue;
            }
            if next.http.connect_timeout != old.http.connect_timeout
                || next.http.idle_timeout != old.http.idle_timeout
            {
                tracing::warn!(service = %svc.name, "http connect_timeout / idle_timeout changes take a restart");
            }
            tracing::info!(service = %svc.name, routes = next.http.routes.len(), upstreams = ?next.default_group, "http routes reloaded");
            match svc.routing.write() {
                Ok(mut r) => *r = Arc::new(next),
                Err(p) => *p.into_inner() = Arc::new(next),
            }
        }
        for s in config
            .services
            .iter()
            .filter(|s| s.mode == ServiceMode::Http)
        {
            if !self
                .services
                .iter()
                .any(|x| x.name == s.name && x.listen == s.listen)
            {
                tracing::warn!(service = %s.name, listen = %s.listen, "new http service: it is served after a restart");
            }
        }
    }

    /// Stop accepting.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
    }
}

impl Drop for L7 {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Bind and serve every `mode = "http"` service of `config`; upstream connections come from
/// the SNAT address of the upstream's family (`snat`; the kernel picks when the family has
/// none). The listen and upstream families are independent here: the daemon opens its own
/// connections.
///
/// # Errors
/// [`L7Error::Listen`] when a listen address cannot be bound.
pub fn start(
    config: &Config,
    snat: impl Into<crate::config::SnatAddrs>,
    status: SharedStatus,
) -> Result<L7, L7Error> {
    let snat = snat.into();
    let (tx, rx) = watch::channel(false);
    let mut services = Vec::new();
    let mut tasks = Vec::new();
    for s in config
        .services
        .iter()
        .filter(|s| s.mode == ServiceMode::Http)
    {
        let routing = Routing::of(s);
        let http = routing.http.clone();
        let listener =
            crate::l4::tcp::listen_clamped(s.listen, 4096, s.fast.mss_clamp).map_err(|source| {
                L7Error::Listen {
                    name: s.name.clone(),
                    listen: s.listen,
                    source,
                }
            })?;
        let svc = Arc::new(Service {
            name: s.name.clone(),
            listen: s.listen,
            routing: std::sync::RwLock::new(Arc::new(routing)),
            snat,
            mss_clamp: s.fast.mss_clamp,
            idle: std::sync::Mutex::new(Vec::new()),
            direct_idle: std::sync::Mutex::new(Vec::new()),
            status: status.clone(),
            next: AtomicUsize::new(0),
            stats: Stats {
                admission: crate::l4::admission::Admission::new(&s.fast),
                ..Stats::default()
            },
        });
        tracing::info!(
            service = %s.name,
            listen = %s.listen,
            routes = http.routes.len(),
            upstreams = ?svc.routing().default_group,
            "http proxy listening"
        );
        tasks.push(tokio::spawn(accept_loop(
            listener,
            Arc::clone(&svc),
            rx.clone(),
        )));
        services.push(svc);
    }
    Ok(L7 {
        services,
        shutdown: tx,
        tasks,
    })
}

async fn accept_loop(
    listener: TcpListener,
    svc: Arc<Service>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    // Idle upstream connections past the idle timeout are closed about once a second.
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            return;
        };
        let (stream, peer) = tokio::select! {
            _ = sweep.tick() => {
                svc.idle_sweep();
                drop(permit);
                continue;
            }
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(service = %svc.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let admitted = svc
            .stats
            .admission
            .acl(peer.ip())
            .and_then(|()| svc.stats.admission.rate(peer.ip()));
        if let Err(r) = admitted {
            tracing::debug!(service = %svc.name, client = %peer, reason = r.name(), "http client connection refused: reset");
            crate::l4::tcp::reset(stream);
            drop(permit);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let svc = Arc::clone(&svc);
        tokio::spawn(async move {
            let _active = svc.stats.traffic.open();
            let stream = Counted {
                inner: stream,
                traffic: Arc::clone(&svc.stats.traffic),
            };
            let handler = Arc::clone(&svc);
            // The client's forwarding headers, formatted once for the connection, and whether
            // it is a trusted front proxy (decided once: a reload applies to new connections).
            let (trusted, header_timeout) = {
                let routing = svc.routing();
                (routing.http.trusts(peer.ip()), routing.http.header_timeout)
            };
            let client = Arc::new(headers::Client::new(peer.ip(), "http", trusted));
            let upstreams = drive::Upstreams::new();
            let deadlines = timer::Deadlines::new();
            let conns = Arc::new(Conns {
                svc: Arc::clone(&svc),
                peer,
                peer_text: std::sync::OnceLock::new(),
                own: std::sync::Mutex::new(Vec::new()),
                direct: std::sync::Mutex::new(Vec::new()),
                finished: std::sync::atomic::AtomicBool::new(false),
                next_id: AtomicU64::new(0),
                upstreams: Arc::clone(&upstreams),
                deadlines: Arc::clone(&deadlines),
                head: std::sync::Mutex::new(Vec::new()),
            });
            let at_end = Arc::clone(&conns);
            let service = hyper::service::service_fn(move |req| {
                let svc = Arc::clone(&handler);
                let client = Arc::clone(&client);
                let conns = Arc::clone(&conns);
                async move { Ok::<_, Infallible>(svc.handle(req, &client, &conns).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(timer::ConnTimer(deadlines))
                .header_read_timeout(header_timeout)
                .keep_alive(true)
                // A client may shut its sending side once its request is out and still get the
                // answer. It also spares hyper's probe for the end of the client's stream while
                // a request is answered: that probe reads into hyper's buffer while the request
                // still holds the buffer's bytes, so each request cost a new 8 KiB buffer
                // (about 800 instructions). A client that goes away meanwhile is noticed when
                // the answer is written to it (or at the upstream head timeout).
                .half_close(true)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            // The server connection and the upstream connections its requests use, in this one
            // task (no task switch per request).
            if let Err(e) = drive::Joined::new(conn, Arc::clone(&upstreams)).await {
                tracing::debug!(service = %svc.name, client = %peer, error = %e, "client connection ended");
            }
            // Ready upstream connections go to the idle list, the rest (an upgrade being handed
            // over) on in tasks of their own.
            at_end.finish();
            drop(permit);
        });
    }
}

/// The client's request headers as they go upstream: hop-by-hop headers removed (the upgrade
/// passed on when there is one), the client appended to the forwarding headers (with the
/// client's own Host).
fn forward_headers(
    mut h: HeaderMap,
    client: &headers::Client,
    upgrade: Option<&HeaderValue>,
) -> HeaderMap {
    let host = h.get(header::HOST).cloned();
    headers::remove_hop_by_hop(&mut h, upgrade);
    headers::add_forwarded_for(&mut h, client, "http", host.as_ref());
    h
}

/// The request target as it goes upstream: origin form (`/path?query`).
fn origin_target(uri: &Uri) -> &str {
    uri.path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str)
}

/// The request as it goes to `up`: origin-form URI (`/path?query`), the client's Host (or
/// `up` when the client sent none).
fn upstream_request(
    routing: &Routing,
    method: &Method,
    uri: &Uri,
    headers: HeaderMap,
    body: Body,
    up: SocketAddr,
) -> Request<Body> {
    let uri = match uri.path_and_query() {
        Some(_) if uri.scheme().is_none() && uri.authority().is_none() => uri.clone(),
        Some(pq) => Uri::from(pq.clone()),
        None => Uri::from_static("/"),
    };
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    if !req.headers().contains_key(header::HOST)
        && let Some(auth) = routing.authority(up)
        && let Ok(v) = HeaderValue::from_str(auth.as_str())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    req
}

fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{msg}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The upstreams one request may try, in order (no allocation per request).
#[derive(Debug)]
struct Candidates {
    addrs: [SocketAddr; MAX_ATTEMPTS],
    len: usize,
}

impl Default for Candidates {
    fn default() -> Self {
        Self {
            addrs: [SocketAddr::from(([0, 0, 0, 0], 0)); MAX_ATTEMPTS],
            len: 0,
        }
    }
}

impl std::ops::Deref for Candidates {
    type Target = [SocketAddr];

    fn deref(&self) -> &[SocketAddr] {
        &self.addrs[..self.len]
    }
}

/// How one attempt failed.
enum Failure {
    Connect { timed_out: bool, error: String },
    HeadTimeout,
    Upstream(String),
}

impl Service {
    /// The counters as plain data.
    #[must_use]
    pub fn counters(&self) -> crate::metrics::UserspaceService {
        crate::metrics::UserspaceService {
            name: self.name.clone(),
            listen: self.listen.to_string(),
            protocol: "tcp".to_owned(),
            layer: "http".to_owned(),
            traffic: self.stats.traffic.read(),
            no_upstream: self.stats.no_upstream.load(Ordering::Relaxed),
            dropped: 0,
            refused: self.stats.admission.refused(),
            http_responses: ["1xx", "2xx", "3xx", "4xx", "5xx"]
                .iter()
                .zip(&self.stats.classes)
                .map(|(c, v)| ((*c).to_owned(), v.load(Ordering::Relaxed)))
                .collect(),
            upstreams: self
                .stats
                .upstreams
                .read()
                .into_iter()
                .map(|(a, t)| (a.to_string(), t))
                .collect(),
        }
    }

    fn routing(&self) -> Arc<Routing> {
        match self.routing.read() {
            Ok(r) => Arc::clone(&r),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// Whether the control plane reports `addr` unhealthy (an address it does not check
    /// counts as healthy).
    fn unhealthy(&self, addr: SocketAddr) -> bool {
        let st = match self.status.read() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        st.services
            .iter()
            .flat_map(|s| s.upstreams.iter())
            .any(|u| u.resolved == Some(addr) && !u.healthy)
    }

    /// The group's first usable upstreams (as many as a request may try), starting at the
    /// round-robin position.
    fn candidates(&self, group: &[SocketAddr]) -> Candidates {
        let mut out = Candidates::default();
        if group.is_empty() {
            return out;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % group.len();
        for a in (0..group.len()).map(|i| group[(start + i) % group.len()]) {
            if out.len == MAX_ATTEMPTS {
                break;
            }
            if !self.unhealthy(a) {
                out.addrs[out.len] = a;
                out.len += 1;
            }
        }
        out
    }

    async fn handle(
        &self,
        mut req: Request<Incoming>,
        client: &headers::Client,
        conns: &Arc<Conns>,
    ) -> Response<Body> {
        let started = Instant::now();
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let routing = self.routing();
        // The response head is due header_timeout after the request came in (every attempt).
        let head_deadline = tokio::time::Instant::from_std(started) + routing.http.header_timeout;
        let method = req.method().clone();
        // Kept for routing and the access line: shared, not copied (no allocation).
        let uri = req.uri().clone();
        let path = uri.path();
        // Behind a trusted front proxy, the access log names the client its X-Forwarded-For
        // gives (a walk over the header, no allocation; nothing for other peers).
        let real = client
            .trusted()
            .then(|| {
                headers::real_client(
                    conns.peer.ip(),
                    req.headers(),
                    &routing.http.trusted_proxies,
                )
            })
            .filter(|ip| *ip != conns.peer.ip());
        // RFC 9112 section 3.2: an HTTP/1.1 request without Host, or any with two Host lines,
        // is answered 400 at once, its body left unread (the connection closes after the
        // answer). HTTP/1.0 may leave Host out: the upstream's address goes in its place.
        let mut hosts = req.headers().get_all(header::HOST).iter();
        let bad_host = match (hosts.next(), hosts.next()) {
            (None, _) if req.version() == Version::HTTP_11 => Some("400 a request without Host"),
            (Some(_), Some(_)) => Some("400 a request with two Host lines"),
            _ => None,
        };
        if let Some(why) = bad_host {
            let mut r = text(StatusCode::BAD_REQUEST, why);
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return self.log(
                r,
                &method,
                path,
                None,
                None,
                conns,
                real,
                UpText(None, None),
                0,
                started,
            );
        }
        // The Host routed on is the Host forwarded. An absolute-form target names it (RFC 9112
        // section 3.2.2: its authority replaces the Host line); otherwise the Host line does.
        if let Some(auth) = uri.authority()
            && let Ok(v) = HeaderValue::from_str(
                auth.as_str()
                    .rsplit_once('@')
                    .map_or(auth.as_str(), |(_, h)| h),
            )
        {
            req.headers_mut().insert(header::HOST, v);
        }
        let host_header = req.headers().get(header::HOST).cloned();
        let host = host_header.as_ref().and_then(|h| h.to_str().ok());
        let (route, group) = routing.http.route(host, path, &routing.default_group);
        let mut upstream = None;
        let mut attempts = 0usize;
        let response = if group.is_empty() {
            text(StatusCode::NOT_FOUND, "no route for this host and path")
        } else {
            let candidates = self.candidates(group);
            if candidates.is_empty() {
                self.stats.no_upstream.fetch_add(1, Ordering::Relaxed);
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "503 no healthy upstream for this route",
                )
            } else {
                let upgrade = headers::upgrade_request(req.headers());
                let mut client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
                // A request the proxy may send again goes on a plain connection ([`direct`]);
                // one with a body or an upgrade through hyper's client, once.
                let replayable =
                    idempotent(&method) && req.body().is_end_stream() && upgrade.is_none();
                let (parts, body) = req.into_parts();
                // Boxed only for hyper's client; a plain-connection request has none to send.
                let mut body = (!replayable).then(|| body.map_err(Into::into).boxed());
                let tries = if replayable {
                    candidates.len().min(MAX_ATTEMPTS)
                } else {
                    1
                };
                // The headers as they go upstream, the same for every attempt: made once. For a
                // plain connection the forwarding headers are written into the head as it is
                // encoded, not inserted into the map.
                let mut out_headers = Some(if replayable {
                    let mut h = parts.headers;
                    headers::remove_hop_by_hop(&mut h, None);
                    h
                } else {
                    forward_headers(parts.headers, client, upgrade.as_ref())
                });
                // The plain-connection request's head, written into the connection's buffer.
                let mut head = conns.lend_head();
                // Without a Host (HTTP/1.0 only, see above), the upstream's address goes in its
                // place.
                let needs_host = out_headers
                    .as_ref()
                    .is_some_and(|h| !h.contains_key(header::HOST));
                let mut last = None;
                for up in candidates.iter().take(tries) {
                    attempts += 1;
                    if attempts > 1 {
                        self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    }
                    let up_traffic = self.stats.upstreams.get(*up);
                    let sent = if replayable {
                        let Some(h) = out_headers.as_mut() else { break };
                        let fallback;
                        let host = if needs_host {
                            match routing.authority_str(*up) {
                                Some(a) => Some(a),
                                None => {
                                    fallback = up.to_string();
                                    Some(fallback.as_str())
                                }
                            }
                        } else {
                            None
                        };
                        direct::encode_request(
                            &parts.method,
                            origin_target(&parts.uri),
                            h,
                            host,
                            Some((client, host_header.as_ref())),
                            &mut head.buf,
                        );
                        // The request's map holds the response's fields once a head comes
                        // back (one allocation less; a request without an answer is sent
                        // again from the map as it was).
                        self.send_direct(
                            conns,
                            *up,
                            (&head.buf, &parts.method),
                            h,
                            &routing.http,
                            head_deadline,
                        )
                        .await
                    } else {
                        let (Some(b), Some(h)) = (body.take(), out_headers.take()) else {
                            break;
                        };
                        let out = upstream_request(&routing, &parts.method, &parts.uri, h, b, *up);
                        match self
                            .send(conns, *up, out, &routing.http, head_deadline)
                            .await
                        {
                            Ok(resp) => Ok(self.upstream_response(
                                resp,
                                client_upgrade.take(),
                                upgrade.as_ref(),
                            )),
                            Err(f) => Err(f),
                        }
                    };
                    match sent {
                        Ok(resp) => {
                            up_traffic.opened.fetch_add(1, Ordering::Relaxed);
                            upstream = Some(*up);
                            return self.log(
                                resp,
                                &method,
                                path,
                                host,
                                route,
                                conns,
                                real,
                                UpText(upstream, routing.authority_str(*up)),
                                attempts,
                                started,
                            );
                        }
                        Err(f) => {
                            if let Failure::Connect { .. } = f {
                                self.stats
                                    .traffic
                                    .connect_failures
                                    .fetch_add(1, Ordering::Relaxed);
                                up_traffic.connect_failures.fetch_add(1, Ordering::Relaxed);
                            } else {
                                up_traffic.opened.fetch_add(1, Ordering::Relaxed);
                            }
                            let retry = matches!(f, Failure::Connect { .. }) && replayable;
                            if let Failure::Connect { error, .. } | Failure::Upstream(error) = &f {
                                tracing::warn!(service = %self.name, upstream = %up, error = %error, retry, "upstream request failed");
                            }
                            last = Some(f);
                            if !retry {
                                break;
                            }
                        }
                    }
                }
                match last {
                    Some(Failure::Connect {
                        timed_out: true, ..
                    }) => text(
                        StatusCode::GATEWAY_TIMEOUT,
                        "504 upstream connect timed out",
                    ),
                    Some(Failure::Connect { .. }) | None => text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "503 no upstream accepted the connection",
                    ),
                    Some(Failure::HeadTimeout) => text(
                        StatusCode::GATEWAY_TIMEOUT,
                        "504 upstream did not answer in time",
                    ),
                    Some(Failure::Upstream(e)) => text(
                        StatusCode::BAD_GATEWAY,
                        &format!("502 upstream failed: {e}"),
                    ),
                }
            }
        };
        self.log(
            response,
            &method,
            path,
            host,
            route,
            conns,
            real,
            UpText(upstream, None),
            attempts,
            started,
        )
    }

    /// Send `req` to `up` on a ready connection of `conns` or a new one; a reused connection
    /// that closed before the request went out is replaced by a new one and the request sent
    /// again. The connection is kept for the client connection's next request. No response
    /// head by `head_deadline`: [`Failure::HeadTimeout`].
    async fn send(
        &self,
        conns: &Conns,
        up: SocketAddr,
        mut req: Request<Body>,
        http: &HttpConfig,
        head_deadline: tokio::time::Instant,
    ) -> Result<Response<Incoming>, Failure> {
        let (mut sender, mut id, mut fresh) = match conns.take(up) {
            Some((s, id)) => (s, id, false),
            None => {
                let (s, id) = self.connect(conns, up, http.connect_timeout).await?;
                (s, id, true)
            }
        };
        loop {
            let answered = conns
                .deadlines
                .before(head_deadline, sender.try_send_request(req))
                .await;
            match answered {
                None => return Err(Failure::HeadTimeout),
                Some(Ok(resp)) => {
                    conns.put(up, sender, id);
                    return Ok(resp);
                }
                Some(Err(mut e)) => match e.take_message() {
                    Some(back) if !fresh => {
                        req = back;
                        (sender, id) = self.connect(conns, up, http.connect_timeout).await?;
                        fresh = true;
                    }
                    _ => return Err(Failure::Upstream(error_chain(e.error()))),
                },
            }
        }
    }

    /// Send a request without a body (`request`: its head and method) to `up` on a plain
    /// connection of `conns` or a new one ([`direct`]); a reused connection that closed without
    /// answering is replaced by a new one and the request sent again. No response head by
    /// `head_deadline`: [`Failure::HeadTimeout`]. The response's body reads the connection and
    /// gives it back to `conns` at its end. The response's fields go into `spare`'s allocation
    /// ([`direct::exchange`]).
    async fn send_direct(
        &self,
        conns: &Arc<Conns>,
        up: SocketAddr,
        (request, method): (&[u8], &Method),
        spare: &mut HeaderMap,
        http: &HttpConfig,
        head_deadline: tokio::time::Instant,
    ) -> Result<Response<Body>, Failure> {
        let (mut conn, mut fresh) = match conns.take_direct(up) {
            Some(c) => (c, false),
            None => (
                direct::Conn::new(self.open(up, http.connect_timeout).await?),
                true,
            ),
        };
        loop {
            let answered = conns
                .deadlines
                .before(
                    head_deadline,
                    direct::exchange(&mut conn, request, method, spare),
                )
                .await;
            match answered {
                None => return Err(Failure::HeadTimeout),
                Some(Ok(head)) => {
                    let keep: Arc<dyn direct::Keep> = Arc::clone(conns) as Arc<dyn direct::Keep>;
                    let body = direct::DirectBody::new(conn, &head, keep, up);
                    let mut resp = Response::new(body.map_err(Into::into).boxed());
                    *resp.status_mut() = head.status;
                    *resp.version_mut() = head.version;
                    // Hop-by-hop fields were left out as the head was parsed.
                    *resp.headers_mut() = head.headers;
                    return Ok(resp);
                }
                Some(Err(e)) if e.retry_on_new_connection() && !fresh => {
                    tracing::debug!(service = %self.name, upstream = %up, error = %e, "reused upstream connection closed: sending again on a new one");
                    conn = direct::Conn::new(self.open(up, http.connect_timeout).await?);
                    fresh = true;
                }
                Some(Err(e)) => return Err(Failure::Upstream(e.to_string())),
            }
        }
    }

    /// A new TCP connection to `up` from the SNAT address of its family.
    async fn open(
        &self,
        up: SocketAddr,
        timeout: Duration,
    ) -> Result<tokio::net::TcpStream, Failure> {
        let failed = |e: io::Error| Failure::Connect {
            timed_out: e.kind() == io::ErrorKind::TimedOut,
            error: format!("connect to {up}: {e}"),
        };
        let sock = if up.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(failed)?;
        crate::l4::tcp::clamp_mss(&sock, self.mss_clamp).map_err(failed)?;
        if let Some(ip) = self.snat.of_family(up.ip()) {
            crate::l4::tcp::bind_source(&sock, SocketAddr::new(ip, 0)).map_err(failed)?;
        }
        let stream = match tokio::time::timeout(timeout, sock.connect(up)).await {
            Err(_) => {
                return Err(Failure::Connect {
                    timed_out: true,
                    error: format!("connect to {up}: timed out after {timeout:?}"),
                });
            }
            Ok(r) => r.map_err(failed)?,
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// A new HTTP/1 connection to `up` from the SNAT address of its family, its connection
    /// driven by the client connection's task (upgrades included).
    async fn connect(
        &self,
        conns: &Conns,
        up: SocketAddr,
        timeout: Duration,
    ) -> Result<(Sender, u64), Failure> {
        let stream = self.open(up, timeout).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Failure::Upstream(error_chain(&e)))?;
        let name = self.name.clone();
        let id = conns.id();
        conns.upstreams.adopt(
            id,
            Box::pin(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(service = %name, upstream = %up, error = %e, "upstream connection ended");
                }
            }),
        );
        Ok((sender, id))
    }

    /// A ready idle connection to `up` and its connection future; closed ones are dropped on
    /// the way.
    fn idle_take(&self, up: SocketAddr) -> Option<(Sender, drive::UpstreamConn)> {
        let mut idle = match self.idle.lock() {
            Ok(i) => i,
            Err(p) => p.into_inner(),
        };
        while let Some(i) = idle.iter().rposition(|c| c.up == up) {
            let c = idle.swap_remove(i);
            if c.sender.is_ready() {
                return Some((c.sender, c.conn));
            }
        }
        None
    }

    /// Keep `s` (to `up`) and its connection `conn` for another client connection, when it is
    /// ready and there is room. A connection still busy (an upgrade being handed over) goes on
    /// in a task of its own.
    fn idle_put(&self, up: SocketAddr, sender: Sender, conn: drive::UpstreamConn) {
        if !sender.is_ready() {
            if !sender.is_closed() {
                tokio::spawn(conn);
            }
            return;
        }
        let mut idle = match self.idle.lock() {
            Ok(i) => i,
            Err(p) => p.into_inner(),
        };
        if idle.len() < IDLE_MAX {
            idle.push(Idle {
                up,
                sender,
                conn,
                since: Instant::now(),
            });
        }
    }

    /// An idle plain connection to `up` that may carry a request; closed ones are dropped on
    /// the way.
    fn direct_idle_take(&self, up: SocketAddr) -> Option<direct::Conn> {
        let mut idle = match self.direct_idle.lock() {
            Ok(i) => i,
            Err(p) => p.into_inner(),
        };
        while let Some(i) = idle.iter().rposition(|(a, _, _)| *a == up) {
            let (_, c, _) = idle.swap_remove(i);
            if c.idle_ok() {
                return Some(c);
            }
        }
        None
    }

    /// Keep a plain connection to `up` for other client connections, when there is room.
    fn direct_idle_put(&self, up: SocketAddr, conn: direct::Conn) {
        let mut idle = match self.direct_idle.lock() {
            Ok(i) => i,
            Err(p) => p.into_inner(),
        };
        if idle.len() < IDLE_MAX {
            idle.push((up, conn, Instant::now()));
        }
    }

    /// Close idle connections older than the idle timeout; poll the others once, so that one
    /// the upstream closed ends (and is dropped) here.
    fn idle_sweep(&self) {
        let timeout = self.routing().http.idle_timeout;
        {
            let mut idle = match self.direct_idle.lock() {
                Ok(i) => i,
                Err(p) => p.into_inner(),
            };
            idle.retain(|(_, c, since)| since.elapsed() < timeout && c.idle_ok());
        }
        let mut idle = match self.idle.lock() {
            Ok(i) => i,
            Err(p) => p.into_inner(),
        };
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        idle.retain_mut(|c| {
            c.since.elapsed() < timeout
                && c.conn.as_mut().poll(&mut cx).is_pending()
                && !c.sender.is_closed()
        });
    }

    /// The upstream's response as it goes to the client; for a 101 the two upgraded
    /// connections are joined.
    fn upstream_response(
        &self,
        mut resp: Response<Incoming>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        upgrade: Option<&HeaderValue>,
    ) -> Response<Body> {
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let up_proto = if switching {
            headers::upgrade_request(resp.headers()).or_else(|| upgrade.cloned())
        } else {
            None
        };
        if let (true, Some(client_upgrade)) = (switching, client_upgrade) {
            self.stats.upgrades.fetch_add(1, Ordering::Relaxed);
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let name = self.name.clone();
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((c, u)) => {
                        let mut c = TokioIo::new(c);
                        let mut u = TokioIo::new(u);
                        match tokio::io::copy_bidirectional(&mut c, &mut u).await {
                            Ok((up, down)) => {
                                tracing::debug!(service = %name, bytes_up = up, bytes_down = down, "upgraded connection closed")
                            }
                            Err(e) => {
                                tracing::debug!(service = %name, error = %e, "upgraded connection failed")
                            }
                        }
                    }
                    Err(e) => tracing::warn!(service = %name, error = %e, "upgrade failed"),
                }
            });
        }
        let (mut parts, body) = resp.into_parts();
        headers::remove_hop_by_hop(&mut parts.headers, up_proto.as_ref());
        Response::from_parts(parts, body.map_err(Into::into).boxed())
    }

    #[expect(clippy::too_many_arguments, reason = "one access log line's fields")]
    fn log(
        &self,
        resp: Response<Body>,
        method: &Method,
        path: &str,
        host: Option<&str>,
        route: Option<usize>,
        conns: &Conns,
        // The client behind a trusted front proxy, when it is not the peer.
        real: Option<std::net::IpAddr>,
        upstream: UpText<'_>,
        attempts: usize,
        started: Instant,
    ) -> Response<Body> {
        let status = resp.status().as_u16();
        if status >= 500 {
            self.stats.responses_5xx.fetch_add(1, Ordering::Relaxed);
        }
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.stats.classes[class].fetch_add(1, Ordering::Relaxed);
        // The same text as the event's fields would give (`access service=.. path="/x" ..`,
        // strings quoted as `{:?}` does), appended as text: nothing is built when the access
        // log is off, and no formatter machinery when it is on (logging::access).
        crate::logging::access(|l| {
            use crate::logging::push_padded;
            l.push_str("access service=");
            l.push_str(&self.name);
            l.push_str(" client=");
            match real {
                Some(ip) => l.push_str(&headers::ip_text(ip)),
                None => l.push_str(conns.peer_text()),
            }
            l.push_str(" method=");
            l.push_str(method.as_str());
            l.push_str(" host=");
            Quoted(host.unwrap_or("-")).push_to(l);
            l.push_str(" path=");
            Quoted(path).push_to(l);
            l.push_str(" route=");
            match route {
                Some(r) => push_padded(l, r as u64, 1),
                None => l.push_str("default"),
            }
            l.push_str(" upstream=");
            upstream.push_to(l);
            l.push_str(" attempts=");
            push_padded(l, attempts as u64, 1);
            l.push_str(" status=");
            push_padded(l, u64::from(status), 1);
            l.push_str(" head_ms=");
            push_padded(
                l,
                u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                1,
            );
        });
        resp
    }
}

/// The upstream in the access log: its cached `ip:port` text when there is one, else formatted;
/// `-` for none.
struct UpText<'a>(Option<SocketAddr>, Option<&'a str>);

impl std::fmt::Display for UpText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.0, self.1) {
            (Some(_), Some(text)) => f.write_str(text),
            (Some(up), None) => up.fmt(f),
            (None, _) => f.write_str("-"),
        }
    }
}

/// A string in double quotes, escaped as `{:?}` does; plain printable ASCII (most hosts and
/// paths) is copied as it is, without the per-character escape checks.
struct Quoted<'a>(&'a str);

impl Quoted<'_> {
    fn plain(&self) -> bool {
        self.0
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    }

    /// Append the quoted text to `out`.
    fn push_to(&self, out: &mut String) {
        if self.plain() {
            out.push('"');
            out.push_str(self.0);
            out.push('"');
        } else {
            use std::fmt::Write as _;
            let _ = write!(out, "{:?}", self.0);
        }
    }
}

impl UpText<'_> {
    /// Append the text to `out`.
    fn push_to(&self, out: &mut String) {
        match (self.0, self.1) {
            (Some(_), Some(text)) => out.push_str(text),
            (Some(up), None) => out.push_str(&headers::socket_text(up)),
            (None, _) => out.push('-'),
        }
    }
}

impl std::fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.plain() {
            f.write_str("\"")?;
            f.write_str(self.0)?;
            f.write_str("\"")
        } else {
            write!(f, "{:?}", self.0)
        }
    }
}

/// An error and its sources, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ServiceStatus, UpstreamStatus};

    fn service(group: &[SocketAddr], status: SharedStatus) -> Service {
        Service {
            name: "app".into(),
            listen: "10.10.1.1:80".parse().unwrap(),
            routing: std::sync::RwLock::new(Arc::new(Routing {
                http: HttpConfig::default(),
                default_group: group.to_vec(),
                authorities: Vec::new(),
            })),
            snat: SnatAddrs::default(),
            mss_clamp: 0,
            idle: std::sync::Mutex::new(Vec::new()),
            direct_idle: std::sync::Mutex::new(Vec::new()),
            status,
            next: AtomicUsize::new(0),
            stats: Stats::default(),
        }
    }

    fn report(addr: SocketAddr, healthy: bool) -> UpstreamStatus {
        UpstreamStatus {
            address: addr.to_string(),
            resolved: Some(addr),
            id: Some(1),
            weight: 1,
            drain: false,
            healthy,
            in_table: healthy,
            last_error: None,
        }
    }

    #[test]
    fn upstream_request_has_an_origin_form_uri_a_host_and_forwarding_headers() {
        let up4: SocketAddr = "10.20.1.2:8080".parse().unwrap();
        let up6: SocketAddr = "[2001:db8::2]:80".parse().unwrap();
        let other: SocketAddr = "10.20.1.9:81".parse().unwrap();
        let routing = Routing {
            http: HttpConfig::default(),
            default_group: vec![up4, up6],
            authorities: vec![
                (up4, Authority::from_static("10.20.1.2:8080")),
                (up6, Authority::from_static("[2001:db8::2]:80")),
            ],
        };
        let uri: Uri = "/a/b?x=1".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("app.example"));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        let client = headers::Client::new("10.100.0.2".parse().unwrap(), "http", false);
        for up in [up4, up6, other] {
            let headers = forward_headers(h.clone(), &client, None);
            let req = upstream_request(
                &routing,
                &Method::GET,
                &uri,
                headers,
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed(),
                up,
            );
            assert_eq!(req.uri().to_string(), "/a/b?x=1");
            assert_eq!(req.method(), Method::GET);
            let h = req.headers();
            assert!(h.get(header::CONNECTION).is_none());
            assert_eq!(h["host"], "app.example");
            assert_eq!(h["x-forwarded-for"], "10.100.0.2");
            assert_eq!(h["forwarded"], "for=10.100.0.2;proto=http;host=app.example");
        }
        // Without a Host from the client: the upstream's address (cached or formatted on the
        // spot); an absolute-form request goes on in origin form.
        for (up, host) in [
            (up4, "10.20.1.2:8080"),
            (up6, "[2001:db8::2]:80"),
            (other, "10.20.1.9:81"),
        ] {
            let headers = forward_headers(HeaderMap::new(), &client, None);
            let req = upstream_request(
                &routing,
                &Method::GET,
                &Uri::from_static("http://app.example/c?d"),
                headers,
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed(),
                up,
            );
            assert_eq!(req.headers()["forwarded"], "for=10.100.0.2;proto=http");
            assert_eq!(req.headers()["host"], host);
            assert_eq!(req.uri().to_string(), "/c?d");
        }
    }

    #[test]
    fn access_log_text_is_what_the_field_formatter_wrote() {
        for s in [
            "/a/b?x=1",
            "app.example",
            "-",
            "",
            "/q\"x",
            "/back\\slash",
            "/tab\tx",
            "/é",
        ] {
            assert_eq!(Quoted(s).to_string(), format!("{s:?}"), "{s}");
            let mut pushed = String::new();
            Quoted(s).push_to(&mut pushed);
            assert_eq!(pushed, format!("{s:?}"), "{s}");
        }
        for u in [
            UpText(Some("10.0.0.1:80".parse().unwrap()), None),
            UpText(Some("10.0.0.1:80".parse().unwrap()), Some("cached")),
            UpText(None, None),
        ] {
            let mut pushed = String::new();
            u.push_to(&mut pushed);
            assert_eq!(pushed, u.to_string());
        }
        let up: SocketAddr = "[2001:db8::2]:80".parse().unwrap();
        assert_eq!(UpText(Some(up), None).to_string(), "[2001:db8::2]:80");
        assert_eq!(UpText(Some(up), Some("cached")).to_string(), "cached");
        assert_eq!(UpText(None, Some("cached")).to_string(), "-");
    }

    #[test]
    fn round_robin_skips_what_the_control_plane_reports_unhealthy() {
        let a: SocketAddr = "10.20.1.2:80".parse().unwrap();
        let b: SocketAddr = "10.20.1.3:80".parse().unwrap();
        let status = crate::state::shared();
        let svc = service(&[a, b], status.clone());
        // Nothing reported: both, rotating.
        assert_eq!(*svc.candidates(&[a, b]), [a, b]);
        assert_eq!(*svc.candidates(&[a, b]), [b, a]);
        status.write().unwrap().services = vec![ServiceStatus {
            name: "web".into(),
            listen: "10.10.1.1:81".parse().unwrap(),
            protocol: "tcp".into(),
            mode: "l4".into(),
            id: Some(1),
            has_upstreams: true,
            upstreams: vec![report(a, false), report(b, true)],
        }];
        for _ in 0..3 {
            assert_eq!(*svc.candidates(&[a, b]), [b]);
        }
        status.write().unwrap().services[0].upstreams[1].healthy = false;
        // None healthy: no candidate, which the handler answers with 503.
        assert!(svc.candidates(&[a, b]).is_empty());
        assert!(svc.candidates(&[]).is_empty());
        // At most as many as a request may try.
        let many: Vec<SocketAddr> = (1..=5)
            .map(|i| SocketAddr::from(([10, 20, 2, i], 80)))
            .collect();
        assert_eq!(svc.candidates(&many).len(), MAX_ATTEMPTS);
    }
}
