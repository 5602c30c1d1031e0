//! `xdp-proxy status`: ask the running daemon's admin listener for `/status` and print which
//! datapath is active, its interfaces, the services and their upstreams' health (a short table),
//! or the JSON document unchanged (`--json`).
//!
//! A deliberately tiny HTTP/1.1 client: one `GET /status` with `Connection: close` over a
//! blocking [`TcpStream`] with connect and read timeouts, the body read to the end.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use serde_json::Value;

/// Connect and read timeout of the request.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response read (the document of a few hundred services is far below this).
pub const MAX_RESPONSE: u64 = 16 * 1024 * 1024;
/// Exit code when the daemon cannot be reached (nothing listens, timeout).
pub const EXIT_UNREACHABLE: u8 = 9;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "cannot reach the daemon's admin listener at {addr}: {source} (is `xdp-proxy run` up, \
         and is --admin (or the [admin] listen of --config) its address?)"
    )]
    Unreachable {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin listener at {addr}: {what}")]
    BadAnswer { addr: SocketAddr, what: String },
}

impl StatusError {
    #[must_use]
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Unreachable { .. } => EXIT_UNREACHABLE,
            Self::BadAnswer { .. } => crate::inspect::exit::FAILURE,
        }
    }
}

/// `GET /status` from `addr`: the body (a JSON document) as text.
///
/// # Errors
/// Nothing listening or no answer in [`TIMEOUT`] ([`StatusError::Unreachable`]); an answer
/// that is not `200` with a body ([`StatusError::BadAnswer`]).
pub fn fetch(addr: SocketAddr) -> Result<String, StatusError> {
    let unreachable = |source| StatusError::Unreachable { addr, source };
    let bad = |what: String| StatusError::BadAnswer { addr, what };
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(unreachable)?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(unreachable)?;
    s.set_write_timeout(Some(TIMEOUT)).map_err(unreachable)?;
    write!(
        s,
        "GET /status HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: \
         close\r\n\r\n"
    )
    .map_err(unreachable)?;
    let mut raw = Vec::new();
    s.take(MAX_RESPONSE)
        .read_to_end(&mut raw)
        .map_err(unreachable)?;
    let text = String::from_utf8(raw).map_err(|_| bad("answer is not UTF-8".to_owned()))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("answer without a header end".to_owned()))?;
    let status_line = head.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(bad(format!("GET /status answered {status_line:?}")));
    }
    Ok(body.to_owned())
}

/// Render the `/status` document as a short human summary and table.
///
/// # Errors
/// The body is not JSON.
pub fn render(doc: &str) -> Result<String, serde_json::Error> {
    let v: Value = serde_json::from_str(doc)?;
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let mut out = String::new();
    let dp = &v["datapath"];
    let _ = writeln!(out, "datapath:   {}", s(&dp["mode"]));
    let attached: Vec<String> = dp["interfaces"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    let adopted = if i["adopted"] == true {
                        ", adopted"
                    } else {
                        ""
                    };
                    format!("{} ({}{adopted})", s(&i["name"]), s(&i["mode"]))
                })
                .collect()
        })
        .unwrap_or_default();
    let configured: Vec<String> = dp["configured_interfaces"]
        .as_array()
        .map(|a| a.iter().map(s).collect())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "interfaces: {} (XDP attached: {})",
        if configured.is_empty() {
            "-".to_owned()
        } else {
            configured.join(", ")
        },
        if attached.is_empty() {
            "none".to_owned()
        } else {
            attached.join(", ")
        }
    );
    if dp["error"] != Value::Null {
        let _ = writeln!(out, "datapath error: {}", s(&dp["error"]));
    }
    let ready = if v["ready"] == true {
        "yes".to_owned()
    } else {
        format!("no: {}", s(&v["not_ready_reason"]))
    };
    let _ = writeln!(out, "ready:      {ready}");
    let _ = writeln!(
        out,
        "config:     {} (reloads {}, failed {})",
        s(&v["config"]),
        s(&v["reloads"]),
        s(&v["reload_failures"])
    );
    let mut rows = vec![
        [
            "SERVICE", "MODE", "PROTO", "LISTEN", "UPSTREAM", "HEALTHY", "WEIGHT", "DRAIN", "ERROR",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for svc in v["services"].as_array().into_iter().flatten() {
        let head = [
            s(&svc["name"]),
            s(&svc["mode"]),
            s(&svc["protocol"]),
            s(&svc["listen"]),
        ];
        let ups = svc["upstreams"].as_array().cloned().unwrap_or_default();
        if ups.is_empty() {
            let mut row = head.to_vec();
            row.extend(["(none)", "-", "-", "-", "-"].map(str::to_owned));
            rows.push(row);
        }
        for u in &ups {
            let addr = match &u["resolved"] {
                Value::String(r) if *r != s(&u["address"]) => {
                    format!("{} ({r})", s(&u["address"]))
                }
                _ => s(&u["address"]),
            };
            let healthy = if u["healthy"] == true { "yes" } else { "NO" };
            let drain = if u["drain"] == true { "yes" } else { "no" };
            let mut row = head.to_vec();
            row.extend([
                addr,
                healthy.to_owned(),
                s(&u["weight"]),
                drain.to_owned(),
                s(&u["last_error"]),
            ]);
            rows.push(row);
        }
    }
    let widths: Vec<usize> = (0..9)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    out.push('\n');
    for r in &rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_mode_interfaces_and_upstream_health() {
        let doc = serde_json::json!({
            "version": "0.1.0", "ready": true, "not_ready_reason": null,
            "config": "/etc/x.toml", "reloads": 2, "reload_failures": 0,
            "datapath": {"mode": "userspace", "configured_interfaces": ["eth0", "eth1"],
                         "interfaces": [], "error": null},
            "services": [
                {"name": "web", "mode": "l4", "protocol": "tcp", "listen": "10.0.0.1:80",
                 "upstreams": [
                    {"address": "10.1.0.2:80", "resolved": "10.1.0.2:80", "healthy": true,
                     "weight": 1, "drain": false, "last_error": null},
                    {"address": "b.internal:80", "resolved": "10.1.0.3:80", "healthy": false,
                     "weight": 2, "drain": true, "last_error": "connection refused"}]},
                {"name": "api", "mode": "http", "protocol": "tcp", "listen": "10.0.0.1:8080",
                 "upstreams": []}
            ]
        })
        .to_string();
        let out = render(&doc).unwrap();
        assert!(out.contains("datapath:   userspace\n"), "{out}");
        assert!(
            out.contains("interfaces: eth0, eth1 (XDP attached: none)"),
            "{out}"
        );
        assert!(out.contains("ready:      yes"), "{out}");
        let line = out.lines().find(|l| l.contains("b.internal")).unwrap();
        assert!(
            line.contains("(10.1.0.3:80)") && line.contains(" NO "),
            "{line}"
        );
        assert!(line.ends_with("connection refused"), "{line}");
        let line = out.lines().find(|l| l.starts_with("api")).unwrap();
        assert!(line.contains("http") && line.contains("(none)"), "{line}");
        assert!(render("not json").is_err());
    }

    #[test]
    fn unreachable_daemon_is_its_own_exit_code() {
        // A port nobody listens on: bind, learn the port, close.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap();
        let err = fetch(addr).unwrap_err();
        assert_eq!(err.exit_code(), EXIT_UNREACHABLE);
        assert!(err.to_string().contains("cannot reach"), "{err}");
    }

    #[test]
    fn fetches_the_body_of_a_200() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            // Read the whole request head before answering: closing on a partly read request
            // makes the client's next write fail (EPIPE), which is not what this test is about.
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 64 * 1024 {
                let n = c.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            assert!(req.starts_with(b"GET /status HTTP/1.1\r\n"));
            c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                .unwrap();
        });
        assert_eq!(fetch(addr).unwrap(), "{}");
        t.join().unwrap();
    }
}
