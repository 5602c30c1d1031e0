//! Active health checks of upstreams: the probes (TCP connect, HTTP GET) and the pure rise/fall
//! state machine that turns their results into healthy / unhealthy.
//!
//! Rules (documented in docs/xdp-proxy.example.toml):
//! - an upstream starts healthy (a restarted daemon keeps serving at once; a dead upstream
//!   leaves the table after `fall` failed checks);
//! - `fall` failures in a row make a healthy upstream unhealthy, `rise` successes in a row make
//!   an unhealthy one healthy again; a result agreeing with the current state resets the count;
//! - checks also keep every upstream's next hop resolved (docs/datapath.md step 9).

use std::net::SocketAddr;

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::config::{HealthConfig, HealthKind};

/// Result of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeResult {
    Ok,
    Failed(String),
}

/// A state change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    BecameHealthy,
    BecameUnhealthy,
}

/// Health of one upstream of one service (pure).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    healthy: bool,
    /// Results in a row that disagree with `healthy`.
    streak: u32,
    last_error: Option<String>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            healthy: true,
            streak: 0,
            last_error: None,
        }
    }
}

impl Health {
    #[must_use]
    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// The last failure's message (cleared by a success).
    #[must_use]
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Record one result; returns the transition when the state changed.
    pub fn record(&mut self, result: &ProbeResult, rise: u32, fall: u32) -> Option<Transition> {
        let ok = match result {
            ProbeResult::Ok => {
                self.last_error = None;
                true
            }
            ProbeResult::Failed(e) => {
                self.last_error = Some(e.clone());
                false
            }
        };
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak = self.streak.saturating_add(1);
        let needed = if self.healthy { fall } else { rise };
        if self.streak >= needed.max(1) {
            self.healthy = ok;
            self.streak = 0;
            Some(if ok {
                Transition::BecameHealthy
            } else {
                Transition::BecameUnhealthy
            })
        } else {
            None
        }
    }
}

/// One check of `upstream` per `cfg` (`HealthKind::None` always succeeds).
pub async fn probe(upstream: SocketAddr, cfg: &HealthConfig) -> ProbeResult {
    let attempt = async {
        match cfg.kind {
            HealthKind::None => Ok(()),
            HealthKind::Tcp => TcpStream::connect(upstream)
                .await
                .map(drop)
                .map_err(|e| format!("connect: {e}")),
            HealthKind::Http => http_check(upstream, &cfg.path, cfg.expect_status).await,
        }
    };
    match tokio::time::timeout(cfg.timeout, attempt).await {
        Ok(Ok(())) => ProbeResult::Ok,
        Ok(Err(e)) => ProbeResult::Failed(e),
        Err(_) => ProbeResult::Failed(format!("no answer within {:?}", cfg.timeout)),
    }
}

/// Most bytes of a response read to find its status line.
const MAX_STATUS_LINE: usize = 1024;

async fn http_check(upstream: SocketAddr, path: &str, expect: u16) -> Result<(), String> {
    let mut s = TcpStream::connect(upstream)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {upstream}\r\nUser-Agent: xdp-proxy-health\r\n\
         Connection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        if buf.len() >= MAX_STATUS_LINE {
            return Err("no status line in the first 1024 bytes".into());
        }
        let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed before a status line".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let status = parse_status_line(&buf)?;
    if status == expect {
        Ok(())
    } else {
        Err(format!("GET {path}: status {status}, want {expect}"))
    }
}

/// The status code of an HTTP/1.x response's first line.
///
/// # Errors
/// A message when the line is not `HTTP/1.x NNN ...`.
pub fn parse_status_line(buf: &[u8]) -> Result<u16, String> {
    let line_end = buf
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(buf.len());
    let line = String::from_utf8_lossy(&buf[..line_end]);
    let mut parts = line.split(' ');
    match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code
            .parse::<u16>()
            .ok()
            .filter(|c| (100..=599).contains(c))
            .ok_or_else(|| format!("bad status line {line:?}")),
        _ => Err(format!("bad status line {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn fail() -> ProbeResult {
        ProbeResult::Failed("refused".into())
    }

    #[test]
    fn starts_healthy_and_falls_after_fall_failures_in_a_row() {
        let mut h = Health::default();
        assert!(h.healthy());
        assert_eq!(h.record(&fail(), 2, 3), None);
        assert_eq!(h.record(&fail(), 2, 3), None);
        // A success in between resets the count.
        assert_eq!(h.record(&ProbeResult::Ok, 2, 3), None);
        assert_eq!(h.last_error(), None);
        assert_eq!(h.record(&fail(), 2, 3), None);
        assert_eq!(h.record(&fail(), 2, 3), None);
        assert!(h.healthy());
        assert_eq!(h.record(&fail(), 2, 3), Some(Transition::BecameUnhealthy));
        assert!(!h.healthy());
        assert_eq!(h.last_error(), Some("refused"));
        // Further failures change nothing.
        assert_eq!(h.record(&fail(), 2, 3), None);
    }

    #[test]
    fn rises_after_rise_successes_in_a_row() {
        let mut h = Health::default();
        h.record(&fail(), 2, 1);
        assert!(!h.healthy());
        assert_eq!(h.record(&ProbeResult::Ok, 2, 1), None);
        assert_eq!(h.record(&fail(), 2, 1), None);
        assert_eq!(h.record(&ProbeResult::Ok, 2, 1), None);
        assert_eq!(
            h.record(&ProbeResult::Ok, 2, 1),
            Some(Transition::BecameHealthy)
        );
        assert!(h.healthy());
        // rise/fall of 0 behave as 1.
        let mut h = Health::default();
        assert_eq!(h.record(&fail(), 0, 0), Some(Transition::BecameUnhealthy));
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\nX: y\r\n"), Ok(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503 Busy\r\n"), Ok(503));
        assert!(parse_status_line(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse_status_line(b"HTTP/1.1 2000 x\r\n").is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn probes_on_loopback() {
        probes_on("127.0.0.1:0").await;
    }

    /// The same checks reach an IPv6 upstream (the Host header is `[addr]:port`).
    #[tokio::test(flavor = "current_thread")]
    async fn probes_on_ipv6_loopback() {
        probes_on("[::1]:0").await;
    }

    async fn probes_on(bind: &str) {
        use tokio::net::TcpListener;
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tcp = HealthConfig {
            timeout: Duration::from_secs(1),
            ..HealthConfig::default()
        };
        assert_eq!(probe(addr, &tcp).await, ProbeResult::Ok);
        // Take the probe's connection out of the backlog.
        drop(listener.accept().await.unwrap());
        // An HTTP server answering 503 then 200.
        let server = tokio::spawn(async move {
            for status in ["503 Busy", "200 OK"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap();
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                assert!(req.contains(&format!("Host: {addr}\r\n")), "{req}");
                let resp = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                s.write_all(resp.as_bytes()).await.unwrap();
            }
            listener
        });
        let http = HealthConfig {
            kind: HealthKind::Http,
            path: "/healthz".into(),
            ..tcp.clone()
        };
        let r = probe(addr, &http).await;
        assert!(
            matches!(&r, ProbeResult::Failed(e) if e.contains("status 503")),
            "{r:?}"
        );
        assert_eq!(probe(addr, &http).await, ProbeResult::Ok);
        drop(server.await.unwrap());
        let r = probe(addr, &tcp).await;
        assert!(matches!(r, ProbeResult::Failed(_)), "{r:?}");
        let none = HealthConfig {
            kind: HealthKind::None,
            ..tcp
        };
        assert_eq!(probe(addr, &none).await, ProbeResult::Ok);
    }
}
