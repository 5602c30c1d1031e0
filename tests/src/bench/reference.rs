//! Reference servers the bench binary runs to put the userspace data paths' numbers in context:
//! what the libraries the issue prescribes cost on their own, measured in the same lab.
//!
//! - [`serve_tcp_copy`] (`xdp-proxy-bench --tcp-copy LISTEN=UPSTREAM ...`): a TCP proxy that is
//!   nothing but `tokio::io::copy_bidirectional`, one worker thread, one task per connection.
//!   The `tokio-copy` system of the bench: the floor a tokio-based L4 proxy starts from, and what
//!   a team writing "a small Rust proxy" would ship first.
//! - [`serve_http_static`] (`xdp-proxy-bench --http-static LISTEN`): a hyper 1.x HTTP/1 server,
//!   one worker thread, answering every request from memory with the response the bench's
//!   upstream sends (same headers, same 128-byte body). It proxies nothing: it is the cost of
//!   hyper's server side alone, the part of an L7 request an http service cannot avoid. Used
//!   by the instruction-count recipe in docs/userspace.md, not by a bench row (its requests/s
//!   would not be comparable: no upstream hop).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;

/// The bench upstream's body (systems.rs `return 200` text), so the response is byte for byte
/// the size a proxy relays.
const STATIC_BODY: &[u8] = b"xdp-proxy bench body: static text served by nginx from memory (return 200), the same for every system...........................";

/// Parse `LISTEN=UPSTREAM` pairs (socket addresses).
///
/// # Errors
/// A pair without `=` or with an address that does not parse; no pairs at all.
pub fn parse_pairs(args: &[String]) -> Result<Vec<(SocketAddr, SocketAddr)>> {
    ensure!(!args.is_empty(), "--tcp-copy needs LISTEN=UPSTREAM pairs");
    args.iter()
        .map(|a| {
            let Some((l, u)) = a.split_once('=') else {
                bail!("--tcp-copy {a:?}: expected LISTEN=UPSTREAM");
            };
            let l = l
                .parse()
                .with_context(|| format!("--tcp-copy {a:?}: listen address"))?;
            let u = u
                .parse()
                .with_context(|| format!("--tcp-copy {a:?}: upstream address"))?;
            Ok((l, u))
        })
        .collect()
}

/// One worker thread, as the other systems' one worker process.
fn one_worker() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("building the tokio runtime")
}

/// Proxy every `LISTEN=UPSTREAM` pair with `copy_bidirectional` until `lifetime` passes (or the
/// bench, its parent, dies).
///
/// # Errors
/// Binding a listen address; the runtime.
pub fn serve_tcp_copy(pairs: &[(SocketAddr, SocketAddr)], lifetime: Duration) -> Result<()> {
    super::die_with_parent()?;
    let rt = one_worker()?;
    rt.block_on(async {
        let mut listeners = Vec::new();
        for &(listen, upstream) in pairs {
            let l = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("tcp-copy bind {listen}"))?;
            listeners.push(tokio::spawn(accept_and_copy(l, upstream)));
        }
        tokio::time::sleep(lifetime).await;
        for l in listeners {
            l.abort();
        }
        Ok(())
    })
}

async fn accept_and_copy(listener: tokio::net::TcpListener, upstream: SocketAddr) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            // Out of descriptors or a reset before accept: the load generator sees it.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                return;
            };
            let _ = up.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
        });
    }
}

/// Answer HTTP/1 requests on `listen` from memory with hyper until `lifetime` passes.
///
/// # Errors
/// Binding the address; the runtime.
pub fn serve_http_static(listen: SocketAddr, lifetime: Duration) -> Result<()> {
    super::die_with_parent()?;
    let rt = one_worker()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("http-static bind {listen}"))?;
        let serve = async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let svc = service_fn(|_req: Request<Incoming>| async {
                        let mut resp = Response::new(Full::new(Bytes::from_static(STATIC_BODY)));
                        let h = resp.headers_mut();
                        h.insert("server", hyper::header::HeaderValue::from_static("nginx"));
                        h.insert(
                            "date",
                            hyper::header::HeaderValue::from_static(
                                "Thu, 26 Nov 2026 22:46:32 GMT",
                            ),
                        );
                        h.insert(
                            "content-type",
                            hyper::header::HeaderValue::from_static("text/plain"),
                        );
                        Ok::<_, Infallible>(resp)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        };
        tokio::select! {
            () = serve => {}
            () = tokio::time::sleep(lifetime) => {}
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_parse_and_bad_ones_are_refused() {
        let ok = parse_pairs(&["10.0.0.1:80=10.0.0.2:8080".to_owned()]).expect("a valid pair");
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].1.port(), 8080);
        for bad in ["10.0.0.1:80", "10.0.0.1:80=nowhere", "x=10.0.0.2:1"] {
            assert!(parse_pairs(&[bad.to_owned()]).is_err(), "{bad} accepted");
        }
        assert!(parse_pairs(&[]).is_err());
    }

    /// The static server answers with the upstream's body, and the copy proxy relays it.
    #[test]
    fn copy_proxy_relays_the_static_server() {
        use std::io::{Read, Write};
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free loopback port")
        };
        let (server, proxy) = (free(), free());
        let s = std::thread::spawn(move || serve_http_static(server, Duration::from_secs(5)));
        let p =
            std::thread::spawn(move || serve_tcp_copy(&[(proxy, server)], Duration::from_secs(5)));
        let mut conn = None;
        for _ in 0..100 {
            if let Ok(c) = std::net::TcpStream::connect(proxy) {
                conn = Some(c);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut c = conn.expect("the copy proxy listens");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("request");
        let mut resp = Vec::new();
        c.read_to_end(&mut resp).expect("response");
        let text = String::from_utf8_lossy(&resp);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("content-length: 128"), "{text}");
        assert!(resp.ends_with(STATIC_BODY), "{text}");
        drop((s, p));
    }
}
