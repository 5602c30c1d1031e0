//! The HTTP reverse proxy of `mode = "http"` services (hyper 1.x server, hyper-util's pooled
//! keep-alive client).
//!
//! Per request: route by Host and path prefix ([`crate::config::HttpConfig::route`]) to an
//! upstream group; take its upstreams that the control plane does not report unhealthy, round
//! robin; remove hop-by-hop headers and append the client to X-Forwarded-For and Forwarded
//! ([`headers`]); send through the pool (connections from the SNAT address); stream both bodies
//! (never buffered whole); log one access line (`xdp_proxy::access`).
//!
//! Failures: no usable upstream -> 503; every upstream refused or failed the connect -> 503;
//! connect or response head timed out -> 504; the upstream failed after the connect -> 502.
//! A connect failure is retried on the next upstream when the request is idempotent (GET, HEAD,
//! OPTIONS, TRACE, PUT, DELETE) and has no body (a streamed body cannot be replayed without
//! buffering it). Upgrades (WebSocket) are passed through: after a 101 both connections are
//! joined byte for byte.

pub mod headers;

use std::{
    convert::Infallible,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header,
    uri::{Authority, Scheme},
};
use http_body_util::{BodyExt as _, Empty, Full, combinators::BoxBody};
use hyper::body::{Body as _, Incoming};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::{
    config::{Config, HttpConfig, ServiceMode},
    l4::counters::{PerUpstream, Traffic},
    state::SharedStatus,
};

type Body = BoxBody<Bytes, hyper::Error>;

/// Upstreams tried for one request (the first, then retries after connect failures).
const MAX_ATTEMPTS: usize = 3;
/// Client connections served at once per service (more wait in the accept queue).
const MAX_CONNECTIONS: usize = 16_384;

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
    client: Client<HttpConnector, Body>,
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
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(http.connect_timeout));
        match (snat.v4, snat.v6) {
            (Some(v4), Some(v6)) => connector.set_local_addresses(v4, v6),
            (Some(v4), None) => connector.set_local_address(Some(IpAddr::V4(v4))),
            (None, Some(v6)) => connector.set_local_address(Some(IpAddr::V6(v6))),
            (None, None) => {}
        }
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(http.idle_timeout)
            .pool_timer(TokioTimer::new())
            .build(connector);
        let listener =
            crate::l4::tcp::listen(s.listen, 4096).map_err(|source| L7Error::Listen {
                name: s.name.clone(),
                listen: s.listen,
                source,
            })?;
        let svc = Arc::new(Service {
            name: s.name.clone(),
            listen: s.listen,
            routing: std::sync::RwLock::new(Arc::new(routing)),
            client,
            status: status.clone(),
            next: AtomicUsize::new(0),
            stats: Stats::default(),
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
    loop {
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            return;
        };
        let (stream, peer) = tokio::select! {
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
        let _ = stream.set_nodelay(true);
        let svc = Arc::clone(&svc);
        tokio::spawn(async move {
            let _active = svc.stats.traffic.open();
            let stream = Counted {
                inner: stream,
                traffic: Arc::clone(&svc.stats.traffic),
            };
            let handler = Arc::clone(&svc);
            // The client's forwarding headers, formatted once for the connection.
            let client = Arc::new(headers::Client::new(peer.ip(), "http"));
            let service = hyper::service::service_fn(move |req| {
                let svc = Arc::clone(&handler);
                let client = Arc::clone(&client);
                async move { Ok::<_, Infallible>(svc.handle(req, peer, &client).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(svc.routing().http.header_timeout)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(service = %svc.name, client = %peer, error = %e, "client connection ended");
            }
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

/// The request as it goes to `up`: absolute URI for the pool (`http://up/path?query`).
fn upstream_request(
    routing: &Routing,
    method: &Method,
    uri: &Uri,
    headers: HeaderMap,
    body: Body,
    up: SocketAddr,
) -> Request<Body> {
    let mut p = http::uri::Parts::default();
    p.scheme = Some(Scheme::HTTP);
    p.authority = routing.authority(up);
    p.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    let uri = Uri::from_parts(p).unwrap_or_else(|_| Uri::from_static("/"));
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
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

    /// The group's usable upstreams, starting at the round-robin position.
    fn candidates(&self, group: &[SocketAddr]) -> Vec<SocketAddr> {
        if group.is_empty() {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % group.len();
        (0..group.len())
            .map(|i| group[(start + i) % group.len()])
            .filter(|a| !self.unhealthy(*a))
            .collect()
    }

    async fn handle(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        client: &headers::Client,
    ) -> Response<Body> {
        let started = Instant::now();
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()));
        let routing = self.routing();
        let (route, group) = routing
            .http
            .route(host.as_deref(), &path, &routing.default_group);
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
                let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
                let replayable =
                    idempotent(&method) && req.body().is_end_stream() && upgrade.is_none();
                let (parts, body) = req.into_parts();
                let mut body = Some(body.boxed());
                let tries = candidates.len().min(MAX_ATTEMPTS);
                // The headers as they go upstream, the same for every attempt: made once, and
                // copied only when a retry may need them again.
                let mut out_headers =
                    Some(forward_headers(parts.headers, client, upgrade.as_ref()));
                let mut last = None;
                for (i, up) in candidates.iter().take(tries).enumerate() {
                    let b = match body.take() {
                        Some(b) => b,
                        None if replayable => Empty::new().map_err(|never| match never {}).boxed(),
                        None => break,
                    };
                    let headers = if replayable && i + 1 < tries {
                        out_headers.clone()
                    } else {
                        out_headers.take()
                    };
                    let Some(headers) = headers else { break };
                    attempts += 1;
                    if attempts > 1 {
                        self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    }
                    let out =
                        upstream_request(&routing, &parts.method, &parts.uri, headers, b, *up);
                    let up_traffic = self.stats.upstreams.get(*up);
                    match self.send(out, &routing.http).await {
                        Ok(resp) => {
                            up_traffic.opened.fetch_add(1, Ordering::Relaxed);
                            upstream = Some(*up);
                            let resp =
                                self.upstream_response(resp, client_upgrade, upgrade.as_ref());
                            return self.log(
                                resp,
                                &method,
                                &path,
                                host.as_deref(),
                                route,
                                peer,
                                upstream,
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
            &path,
            host.as_deref(),
            route,
            peer,
            upstream,
            attempts,
            started,
        )
    }

    async fn send(
        &self,
        req: Request<Body>,
        http: &HttpConfig,
    ) -> Result<Response<Incoming>, Failure> {
        // The pooled client connects inside `request`: give the connect its own budget on top
        // of the response head's, so a connect that hangs ends as the connector's own timeout
        // ("connect timed out") and a silent upstream as the head timeout, whatever their
        // relative sizes (with one shared limit, equal timeouts raced and the answer depended on
        // which timer fired first).
        let limit = http.connect_timeout + http.header_timeout;
        match tokio::time::timeout(limit, self.client.request(req)).await {
            Err(_) => Err(Failure::HeadTimeout),
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) if e.is_connect() => Err(Failure::Connect {
                timed_out: timed_out(&e),
                error: error_chain(&e),
            }),
            Ok(Err(e)) => Err(Failure::Upstream(error_chain(&e))),
        }
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
        Response::from_parts(parts, body.boxed())
    }

    #[expect(clippy::too_many_arguments, reason = "one access log line's fields")]
    fn log(
        &self,
        resp: Response<Body>,
        method: &Method,
        path: &str,
        host: Option<&str>,
        route: Option<usize>,
        peer: SocketAddr,
        upstream: Option<SocketAddr>,
        attempts: usize,
        started: Instant,
    ) -> Response<Body> {
        let status = resp.status().as_u16();
        if status >= 500 {
            self.stats.responses_5xx.fetch_add(1, Ordering::Relaxed);
        }
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.stats.classes[class].fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            target: "xdp_proxy::access",
            service = %self.name,
            client = %peer,
            method = %method,
            host = host.unwrap_or("-"),
            path,
            route = route.map_or_else(|| "default".to_owned(), |r| r.to_string()),
            upstream = upstream.map_or_else(|| "-".to_owned(), |u| u.to_string()),
            attempts,
            status,
            head_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "access"
        );
        resp
    }
}

/// Whether an io::Error of kind `TimedOut` is among `e`'s sources (the connector's connect
/// timeout).
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
        {
            return true;
        }
        cur = c.source();
    }
    false
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
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
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
    fn upstream_request_has_an_absolute_uri_and_forwarding_headers() {
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
        let client = headers::Client::new("10.100.0.2".parse().unwrap(), "http");
        for (up, want) in [
            (up4, "http://10.20.1.2:8080/a/b?x=1"),
            (up6, "http://[2001:db8::2]:80/a/b?x=1"),
            // Not in the cache: formatted on the spot.
            (other, "http://10.20.1.9:81/a/b?x=1"),
        ] {
            let headers = forward_headers(h.clone(), &client, None);
            let req = upstream_request(
                &routing,
                &Method::GET,
                &uri,
                headers,
                Empty::new().map_err(|never| match never {}).boxed(),
                up,
            );
            assert_eq!(req.uri().to_string(), want);
            assert_eq!(req.method(), Method::GET);
            let h = req.headers();
            assert!(h.get(header::CONNECTION).is_none());
            assert_eq!(h["host"], "app.example");
            assert_eq!(h["x-forwarded-for"], "10.100.0.2");
            assert_eq!(h["forwarded"], "for=10.100.0.2;proto=http;host=app.example");
        }
        // A relative request without a query still gets a path.
        let headers = forward_headers(HeaderMap::new(), &client, None);
        let req = upstream_request(
            &routing,
            &Method::GET,
            &Uri::from_static("*"),
            headers,
            Empty::new().map_err(|never| match never {}).boxed(),
            up4,
        );
        assert_eq!(req.headers()["forwarded"], "for=10.100.0.2;proto=http");
        assert!(req.uri().to_string().starts_with("http://10.20.1.2:8080"));
    }

    #[test]
    fn round_robin_skips_what_the_control_plane_reports_unhealthy() {
        let a: SocketAddr = "10.20.1.2:80".parse().unwrap();
        let b: SocketAddr = "10.20.1.3:80".parse().unwrap();
        let status = crate::state::shared();
        let svc = service(&[a, b], status.clone());
        // Nothing reported: both, rotating.
        assert_eq!(svc.candidates(&[a, b]), [a, b]);
        assert_eq!(svc.candidates(&[a, b]), [b, a]);
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
            assert_eq!(svc.candidates(&[a, b]), [b]);
        }
        status.write().unwrap().services[0].upstreams[1].healthy = false;
        // None healthy: no candidate, which the handler answers with 503.
        assert!(svc.candidates(&[a, b]).is_empty());
        assert!(svc.candidates(&[]).is_empty());
    }
}
