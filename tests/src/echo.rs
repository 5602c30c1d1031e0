//! HTTP/1.1 echo upstreams for the L7 namespace tests: listeners in the home namespace, one per
//! `(name, port)`, each answering every request of a keep-alive connection with its name, the
//! peer it saw and the request head it received ([`answer`]). A test file gives the per-connection
//! handler ([`start`]) and builds it from [`read_head`] and [`answer`], adding what it needs
//! (WebSocket, odd framings, a body read and skipped).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, ensure};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::netns::{Netns, NsThread, Stop, sock, two};

/// Bind one listener per `(name, port)` on the home address inside `home` and serve each
/// accepted connection with `conn(stream, peer, name)` until stopped or `limit` passes (errors
/// are printed, not fatal). Returns once every listener is bound.
///
/// # Errors
/// A bind failed, or the listeners did not come up within 10 s.
pub fn start<F, Fut>(
    home: &Netns,
    servers: &[(&'static str, u16)],
    limit: Duration,
    conn: F,
) -> Result<NsThread<()>>
where
    F: Fn(TcpStream, SocketAddr, &'static str) -> Fut + Copy + Send + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let servers = servers.to_vec();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = home.spawn(limit, move |stop| async move {
        let mut set = tokio::task::JoinSet::new();
        for (name, port) in servers {
            let l = TcpListener::bind(sock(two::HOME, port))
                .await
                .with_context(|| format!("echo: bind {port}"))?;
            set.spawn(accept(l, name, stop.clone(), conn));
        }
        let _ = ready_tx.send(());
        let mut stop = stop;
        stop.wait().await;
        set.abort_all();
        Ok(())
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow!("echo upstreams did not start"))?;
    Ok(thread)
}

async fn accept<F, Fut>(l: TcpListener, name: &'static str, mut stop: Stop, conn: F)
where
    F: Fn(TcpStream, SocketAddr, &'static str) -> Fut + Copy + Send + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    loop {
        tokio::select! {
            a = l.accept() => {
                if let Ok((s, peer)) = a {
                    tokio::spawn(async move {
                        if let Err(e) = conn(s, peer, name).await {
                            eprintln!("echo {name}: {peer}: {e:#}");
                        }
                    });
                }
            }
            () = stop.wait() => return,
        }
    }
}

/// One request head's lines (request line first, no CRLF), lower-cased when `lowercase`;
/// `None` when the peer closed before a new request. At most 100 lines.
///
/// # Errors
/// A read failed or the head is longer than 100 lines.
pub async fn read_head(
    s: &mut BufReader<TcpStream>,
    lowercase: bool,
) -> Result<Option<Vec<String>>> {
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if s.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        let line = line.trim_end();
        if line.is_empty() {
            return Ok(Some(head));
        }
        ensure!(head.len() < 100, "head too long");
        head.push(if lowercase {
            line.to_ascii_lowercase()
        } else {
            line.to_owned()
        });
    }
}

/// The echo answer: 200, `name=NAME`, `peer=PEER` and the head's lines, one per line.
#[must_use]
pub fn answer(name: &str, peer: SocketAddr, head: &[String]) -> Vec<u8> {
    let body = format!("name={name}\npeer={peer}\n{}\n", head.join("\n"));
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
