//! Userspace TCP: accept on the service address, connect to the chosen upstream from the SNAT
//! address, copy both ways ([`super::splice`]: half-close passed on, idle connections closed
//! after the fast path's TCP lifetimes, `flows::Lifetimes`: established, half-closed).
//!
//! Admission (`allow` / `deny`, new-flow rate; [`super::admission`]) is decided when a
//! connection is accepted, before any upstream connect. The kernel has completed the handshake
//! by then, so a refused connection cannot be dropped silently as the fast path drops its SYN:
//! it is reset (SO_LINGER 0, then closed), so the client learns at once, gets no data and the
//! proxy keeps no TIME_WAIT or FIN state for it. `mss_clamp` is TCP_MAXSEG on the listening
//! socket (the SYN-ACK of each accepted connection advertises it, and the proxy sends no larger
//! segment to the client) and on the upstream socket before connect (the SYN to the upstream
//! advertises it).

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{Semaphore, watch},
};

use super::{Service, Settings, splice::Splice};
use crate::config::Protocol;

/// Bind and listen on `listen` (SO_REUSEADDR, so a restarted daemon binds at once).
///
/// # Errors
/// Socket, bind or listen failure.
pub fn listen(listen: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    listen_clamped(listen, backlog, 0)
}

/// [`listen`], with TCP_MAXSEG `mss` on the listening socket when not 0 (accepted connections
/// inherit it).
///
/// # Errors
/// Socket, socket option, bind or listen failure.
pub fn listen_clamped(listen: SocketAddr, backlog: u32, mss: u16) -> io::Result<TcpListener> {
    let sock = if listen.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    clamp_mss(&sock, mss)?;
    sock.bind(listen)?;
    sock.listen(backlog)
}

/// Set TCP_MAXSEG `mss` on `sock` (0: leave it).
///
/// # Errors
/// The kernel refusing the value.
pub fn clamp_mss(sock: &TcpSocket, mss: u16) -> io::Result<()> {
    if mss == 0 {
        return Ok(());
    }
    nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::TcpMaxSeg, &u32::from(mss))
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("TCP_MAXSEG {mss}: {e}")))
}

/// Connect to `upstream` from `source` (port chosen by the kernel), within `timeout`.
///
/// # Errors
/// Socket, bind or connect failure, or the timeout.
pub async fn connect_from(
    source: SocketAddr,
    upstream: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    connect_clamped(source, upstream, timeout, 0).await
}

/// [`connect_from`], with TCP_MAXSEG `mss` set before connect when not 0.
///
/// # Errors
/// Socket, socket option, bind or connect failure, or the timeout.
pub async fn connect_clamped(
    source: SocketAddr,
    upstream: SocketAddr,
    timeout: Duration,
    mss: u16,
) -> io::Result<TcpStream> {
    let sock = if upstream.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    clamp_mss(&sock, mss)?;
    bind_source(&sock, source)?;
    match tokio::time::timeout(timeout, sock.connect(upstream)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect timed out after {timeout:?}"),
        )),
    }
}

/// Bind `sock` to `source` for an outgoing connection. With port 0 the port is left to
/// `connect` (IP_BIND_ADDRESS_NO_PORT): `bind` would reserve a port of its own for the address,
/// searched for under a lock and never shared, while `connect` picks one that only has to be
/// unique for the 4-tuple (cheaper per connection, and many more connections per SNAT address
/// when there are several upstreams).
///
/// # Errors
/// The bind failing (the socket option is best effort: without it the bind still works).
pub fn bind_source(sock: &TcpSocket, source: SocketAddr) -> io::Result<()> {
    if source.port() == 0
        && let Err(e) = nix::sys::socket::setsockopt(
            sock,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        )
    {
        tracing::debug!(error = %e, "IP_BIND_ADDRESS_NO_PORT not set: bind picks the port");
    }
    sock.bind(source)
}

/// Accept until `shutdown` turns true; one task per connection.
pub async fn serve(
    listener: TcpListener,
    svc: Arc<Service>,
    settings: Settings,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(settings.max_tcp_connections));
    loop {
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((stream, client)) => {
                let svc = Arc::clone(&svc);
                tokio::spawn(async move {
                    handle(stream, client, &svc, settings).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(service = %svc.chooser.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reset a refused client connection: SO_LINGER 0, then close (an RST, no data, no TIME_WAIT).
pub fn reset(client: TcpStream) {
    let _ = client.set_zero_linger();
    drop(client);
}

async fn handle(client: TcpStream, peer: SocketAddr, svc: &Service, settings: Settings) {
    let name = &svc.chooser.name;
    // The fast path's order: the ACL, then whether an upstream exists, then the rate (a flow
    // refused for another reason costs no token).
    if let Err(r) = svc.stats.admission.acl(peer.ip()) {
        tracing::debug!(service = %name, client = %peer, reason = r.name(), "connection refused: reset");
        reset(client);
        return;
    }
    let candidates = svc
        .chooser
        .current()
        .candidates(peer, svc.chooser.listen, Protocol::Tcp);
    if candidates.is_empty() {
        svc.stats.no_upstream.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(service = %name, client = %peer, "no healthy upstream: connection closed");
        return;
    }
    if let Err(r) = svc.stats.admission.rate(peer.ip()) {
        tracing::debug!(service = %name, client = %peer, reason = r.name(), "connection refused: reset");
        reset(client);
        return;
    }
    let mut upstream = None;
    for up in candidates.iter().take(settings.connect_attempts.max(1)) {
        match connect_clamped(svc.source, *up, settings.connect_timeout, svc.mss_clamp).await {
            Ok(s) => {
                upstream = Some((s, *up));
                break;
            }
            Err(e) => {
                svc.stats
                    .traffic
                    .connect_failures
                    .fetch_add(1, Ordering::Relaxed);
                svc.stats
                    .upstreams
                    .get(*up)
                    .connect_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(service = %name, client = %peer, upstream = %up, error = %e, "upstream connect failed");
            }
        }
    }
    let Some((upstream, up_addr)) = upstream else {
        return;
    };
    let up_traffic = svc.stats.upstreams.get(up_addr);
    let _active = (svc.stats.traffic.open(), up_traffic.open());
    let to_upstream = [&svc.stats.traffic.bytes_up, &up_traffic.bytes_up];
    let to_client = [&svc.stats.traffic.bytes_down, &up_traffic.bytes_down];
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let done = Splice::new(
        client,
        upstream,
        &to_upstream,
        &to_client,
        settings.tcp_idle,
        settings.tcp_half_closed_idle,
    )
    .await;
    if let Some(idle) = done.idle {
        tracing::debug!(service = %name, client = %peer, upstream = %up_addr, idle = ?idle, "tcp connection idle: closed");
    }
    tracing::debug!(
        service = %name,
        client = %peer,
        upstream = %up_addr,
        bytes_up = done.up.bytes,
        bytes_down = done.down.bytes,
        error_up = ?done.up.error,
        error_down = ?done.down.error,
        "tcp connection closed"
    );
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// A source with port 0 gets no port at bind (IP_BIND_ADDRESS_NO_PORT), one at connect, on
    /// the source address.
    #[tokio::test]
    async fn source_port_is_chosen_at_connect() {
        let server = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), 16).unwrap();
        let server_addr = server.local_addr().unwrap();
        let sock = TcpSocket::new_v4().unwrap();
        let source = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 3), 0));
        bind_source(&sock, source).unwrap();
        assert_eq!(
            sock.local_addr().unwrap(),
            source,
            "no port reserved at bind"
        );
        let s = sock.connect(server_addr).await.unwrap();
        let local = s.local_addr().unwrap();
        assert_eq!(local.ip(), source.ip());
        assert_ne!(local.port(), 0);
        let (_, peer) = server.accept().await.unwrap();
        assert_eq!(peer, local);
    }
}

#[cfg(test)]
mod idle_tests {
    use std::net::Ipv4Addr;

    use tokio::io::AsyncReadExt as _;

    use super::*;
    use crate::l4::{Choice, Chooser, Stats};

    /// A connection nobody uses is closed by the proxy once idle (the client reads EOF).
    #[tokio::test]
    async fn idle_connections_are_closed() {
        let upstream = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), 16).unwrap();
        let up_addr = upstream.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let (s, _) = upstream.accept().await.unwrap();
            // Hold it open, silent.
            tokio::time::sleep(Duration::from_secs(20)).await;
            drop(s);
        });
        let proxy = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), 16).unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        let planned = crate::plan::PlannedService {
            name: "t".into(),
            listen: proxy_addr,
            protocol: Protocol::Tcp,
            key: crate::plan::service_key(proxy_addr, Protocol::Tcp),
            value: proxy_common::ServiceValue { id: 1, flags: 0 },
            table: vec![1; proxy_common::MAGLEV_SIZE as usize],
        };
        let svc = Arc::new(Service {
            chooser: Chooser::new(
                "t".into(),
                proxy_addr,
                Protocol::Tcp,
                Choice::from_plan(&planned, &[(1, up_addr)]),
            ),
            source: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            mss_clamp: 0,
            stats: Stats::default(),
        });
        let settings = Settings {
            tcp_idle: Duration::from_millis(300),
            ..Settings::default()
        };
        let (_tx, rx) = watch::channel(false);
        tokio::spawn(serve(proxy, Arc::clone(&svc), settings, rx));
        let mut c = TcpStream::connect(proxy_addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("the proxy never closed the idle connection")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert_eq!(svc.stats.traffic.opened.load(Ordering::Relaxed), 1);
        held.abort();
    }
}
