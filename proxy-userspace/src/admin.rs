//! The admin listener (`[admin] listen`, loopback by default): a deliberately tiny HTTP/1.1
//! responder on tokio, one request per connection (`Connection: close`).
//!
//! - `GET /healthz`: 200 `ok` while the datapath is attached to every configured interface and
//!   the config is loaded; 503 with the reason otherwise (the front ALB/NLB target check);
//! - `GET /metrics`: Prometheus text format (see [`crate::metrics`]);
//! - `GET /status`: JSON (version, mode, interfaces, services with upstreams, health and
//!   counters, reason counters);
//! - anything else: 404 (unknown path) or 405 (method other than GET/HEAD); a request head over
//!   [`MAX_HEAD`] bytes: 431; a client that does not send its head within [`READ_TIMEOUT`] is
//!   dropped. At most [`MAX_CONNECTIONS`] connections are served at once.

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

use crate::{
    datapath::Datapath,
    metrics::{self, Counters, FlowCounts, InterfaceStatus, Snapshot},
    state::SharedStatus,
};

/// Longest request head read.
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once (others wait in the accept queue).
pub const MAX_CONNECTIONS: usize = 32;

/// Where a snapshot comes from.
#[derive(Clone)]
pub struct Source {
    /// `None` in userspace mode (nothing attached).
    pub datapath: Option<Arc<Mutex<Datapath>>>,
    pub status: SharedStatus,
    /// Interfaces the config names.
    pub interfaces: Vec<String>,
    /// `userspace` when no datapath is attached by config.
    pub userspace: bool,
    /// Counters of the services the daemon serves itself (userspace L4, http).
    pub counters: crate::l4::counters::Registry,
}

impl Source {
    /// Read everything the endpoints show (locks the datapath briefly: call from a blocking
    /// context).
    #[must_use]
    pub fn snapshot(&self) -> Snapshot {
        let status = self
            .status
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone());
        let mut snap = Snapshot {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            mode: "userspace".to_owned(),
            configured_interfaces: self.interfaces.clone(),
            config_loaded: true,
            status,
            userspace_services: self.counters.read(),
            access_log_dropped: crate::logging::access_lines_dropped(),
            ..Snapshot::default()
        };
        if self.userspace {
            return snap;
        }
        let Some(dp) = &self.datapath else {
            snap.config_loaded = false;
            return snap;
        };
        let dp = match dp.lock() {
            Ok(dp) => dp,
            Err(_) => {
                snap.datapath_error = Some("datapath lock poisoned".to_owned());
                return snap;
            }
        };
        snap.interfaces = dp
            .attachments()
            .iter()
            .map(|a| {
                let kernel = dp.delivery(a.ifindex);
                InterfaceStatus {
                    name: a.interface.clone(),
                    mode: a.mode.to_string(),
                    adopted: a.adopted,
                    pin: a.pin_path().map(|p| p.display().to_string()),
                    kernel,
                    lost_outbound_since_attach: kernel.zip(a.delivery_at_attach).map(
                        |(now, then)| now.lost_outbound().saturating_sub(then.lost_outbound()),
                    ),
                }
            })
            .collect();
        let mut modes: Vec<&str> = snap.interfaces.iter().map(|i| i.mode.as_str()).collect();
        modes.dedup();
        snap.mode = match modes.as_slice() {
            [] => "none".to_owned(),
            [one] => (*one).to_owned(),
            _ => "mixed".to_owned(),
        };
        let read = || -> Result<_, crate::datapath::DatapathError> {
            Ok((
                dp.maps.reasons()?,
                dp.maps.service_counters()?,
                dp.maps.upstream_counters()?,
            ))
        };
        match read() {
            Ok((reasons, svc, ups)) => {
                snap.reasons = reasons
                    .into_iter()
                    .map(|(r, v)| {
                        (
                            r.name().to_owned(),
                            metrics::action_name(r.action()).to_owned(),
                            v,
                        )
                    })
                    .collect();
                snap.service_counters = svc
                    .into_iter()
                    .map(|(id, c)| (id, Counters::from(c)))
                    .collect();
                snap.upstream_counters = ups
                    .into_iter()
                    .map(|(id, c)| (id, Counters::from(c)))
                    .collect();
            }
            Err(e) => snap.datapath_error = Some(e.to_string()),
        }
        let census = dp.maps.census();
        if census.scanned {
            snap.flows = Some(FlowCounts {
                total: census.total,
                per_service: census.per_service.clone(),
                per_upstream: census.per_upstream.clone(),
            });
        }
        snap
    }
}

/// Bind `listen` (warning when it is not a loopback address) and serve in a spawned task.
///
/// # Errors
/// The bind failure.
pub async fn spawn(listen: SocketAddr, source: Source) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(listen).await?;
    let local = listener.local_addr()?;
    if !listen.ip().is_loopback() {
        tracing::warn!(
            %listen,
            "the admin listener is not on loopback: /metrics and /status are readable by \
             anyone who can reach this address (needed for a load balancer health check on \
             /healthz; restrict it with a security group)"
        );
    }
    tracing::info!(listen = %local, "admin listener up: /healthz /metrics /status");
    tokio::spawn(serve(listener, source));
    Ok(local)
}

async fn serve(listener: TcpListener, source: Source) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, peer)) => {
                let source = source.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, source).await {
                        tracing::debug!(%peer, error = %e, "admin request failed");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A parsed request line.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without the query string.
    pub path: String,
}

/// What reading a request head produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    Complete(Request),
    TooLarge,
    Malformed,
}

/// Parse the request line of a complete head (`buf` ends with the blank line).
#[must_use]
pub fn parse_head(buf: &[u8]) -> Head {
    let Ok(text) = std::str::from_utf8(buf) else {
        return Head::Malformed;
    };
    let line = text.split("\r\n").next().unwrap_or("");
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(method), Some(target), Some(version), None)
            if version.starts_with("HTTP/1.") && !method.is_empty() =>
        {
            let path = target.split('?').next().unwrap_or("").to_owned();
            Head::Complete(Request {
                method: method.to_owned(),
                path,
            })
        }
        _ => Head::Malformed,
    }
}

/// A response: status line text, content type, body.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: &'static str,
    pub content_type: &'static str,
    pub body: String,
}

fn text(status: &'static str, body: impl Into<String>) -> Response {
    Response {
        status,
        content_type: "text/plain; charset=utf-8",
        body: body.into(),
    }
}

/// Route a request (pure, given the snapshot maker).
pub fn route(req: &Request, snapshot: impl FnOnce() -> Snapshot) -> Response {
    if req.method != "GET" && req.method != "HEAD" {
        return text("405 Method Not Allowed", "only GET and HEAD\n");
    }
    match req.path.as_str() {
        "/healthz" => match snapshot().health() {
            Ok(()) => text("200 OK", "ok\n"),
            Err(why) => text("503 Service Unavailable", format!("not ready: {why}\n")),
        },
        "/metrics" => Response {
            status: "200 OK",
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: metrics::render_prometheus(&snapshot()),
        },
        "/status" => {
            let doc = metrics::status_json(&snapshot());
            match serde_json::to_string_pretty(&doc) {
                Ok(body) => Response {
                    status: "200 OK",
                    content_type: "application/json",
                    body: body + "\n",
                },
                Err(e) => text("500 Internal Server Error", format!("{e}\n")),
            }
        }
        _ => text(
            "404 Not Found",
            "not found: try /healthz, /metrics or /status\n",
        ),
    }
}

async fn read_head(stream: &mut TcpStream) -> io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Head::Malformed);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(parse_head(&buf[..end + 4]));
        }
        if buf.len() > MAX_HEAD {
            return Ok(Head::TooLarge);
        }
    }
}

async fn handle(mut stream: TcpStream, source: Source) -> io::Result<()> {
    let head = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request head timed out"))??;
    let (resp, head_only) = match head {
        Head::Complete(req) => {
            let head_only = req.method == "HEAD";
            let resp = tokio::task::spawn_blocking(move || route(&req, || source.snapshot()))
                .await
                .map_err(io::Error::other)?;
            (resp, head_only)
        }
        Head::TooLarge => (
            text(
                "431 Request Header Fields Too Large",
                "request head too large\n",
            ),
            false,
        ),
        Head::Malformed => (text("400 Bad Request", "bad request\n"), false),
    };
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        resp.status,
        resp.content_type,
        resp.body.len()
    );
    if !head_only {
        out.push_str(&resp.body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str) -> Request {
        Request {
            method: method.to_owned(),
            path: path.to_owned(),
        }
    }

    #[test]
    fn parses_request_lines() {
        assert_eq!(
            parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Head::Complete(req("GET", "/metrics"))
        );
        assert_eq!(parse_head(b"GET /metrics\r\n\r\n"), Head::Malformed);
        assert_eq!(parse_head(b"\xff\xfe\r\n\r\n"), Head::Malformed);
        assert_eq!(parse_head(b"GET / HTTP/2 x\r\n\r\n"), Head::Malformed);
    }

    #[test]
    fn routes() {
        let ready = || {
            let mut s = Snapshot {
                mode: "native".to_owned(),
                config_loaded: true,
                configured_interfaces: vec!["eth0".to_owned()],
                ..Snapshot::default()
            };
            s.interfaces.push(InterfaceStatus {
                name: "eth0".to_owned(),
                mode: "native".to_owned(),
                adopted: false,
                pin: None,
                kernel: None,
                lost_outbound_since_attach: None,
            });
            s
        };
        let r = route(&req("GET", "/healthz"), ready);
        assert_eq!((r.status, r.body.as_str()), ("200 OK", "ok\n"));
        let r = route(&req("GET", "/healthz"), Snapshot::default);
        assert_eq!(r.status, "503 Service Unavailable");
        assert!(r.body.contains("config not loaded"), "{}", r.body);
        let r = route(&req("GET", "/metrics"), ready);
        assert!(r.body.contains("\nxdp_proxy_ready 1\n"), "{}", r.body);
        assert!(r.content_type.contains("version=0.0.4"));
        let r = route(&req("GET", "/status"), ready);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["datapath"]["mode"], "native");
        assert_eq!(route(&req("GET", "/nope"), ready).status, "404 Not Found");
        assert_eq!(
            route(&req("POST", "/healthz"), ready).status,
            "405 Method Not Allowed"
        );
    }
}
