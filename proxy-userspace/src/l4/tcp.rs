//! Userspace TCP: accept on the service address, connect to the chosen upstream from the SNAT
//! address, copy both ways. Half-close is respected: when one side sends FIN (read returns EOF),
//! the write half toward the other side is shut down and the other direction keeps flowing
//! until it ends too. Idle connections are closed after the fast path's TCP lifetimes
//! (`flows::Lifetimes`: established, half-closed).

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{Semaphore, watch},
};

use super::{Service, Settings};
use crate::config::Protocol;

/// Bind and listen on `listen` (SO_REUSEADDR, so a restarted daemon binds at once).
///
/// # Errors
/// Socket, bind or listen failure.
pub fn listen(listen: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let sock = if listen.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(listen)?;
    sock.listen(backlog)
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
    let sock = if upstream.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
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

async fn handle(client: TcpStream, peer: SocketAddr, svc: &Service, settings: Settings) {
    let name = &svc.chooser.name;
    let candidates = svc
        .chooser
        .current()
        .candidates(peer, svc.chooser.listen, Protocol::Tcp);
    if candidates.is_empty() {
        svc.stats.no_upstream.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(service = %name, client = %peer, "no healthy upstream: connection closed");
        return;
    }
    let mut upstream = None;
    for up in candidates.iter().take(settings.connect_attempts.max(1)) {
        match connect_from(svc.source, *up, settings.connect_timeout).await {
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
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let activity = Activity::new();
    let (up, down) = tokio::select! {
        // The copies first: this is polled on every wake-up of the connection.
        biased;
        r = async {
            tokio::join!(
                pump(cr, uw, &activity, &to_upstream),
                pump(ur, cw, &activity, &to_client)
            )
        } => r,
        idle = activity.idle_out(settings.tcp_idle, settings.tcp_half_closed_idle) => {
            tracing::debug!(service = %name, client = %peer, upstream = %up_addr, idle = ?idle, "tcp connection idle: closed");
            (Pumped::default(), Pumped::default())
        }
    };
    tracing::debug!(
        service = %name,
        client = %peer,
        upstream = %up_addr,
        bytes_up = up.bytes,
        bytes_down = down.bytes,
        error_up = ?up.error,
        error_down = ?down.error,
        "tcp connection closed"
    );
}

/// Last activity of a connection, both directions.
#[derive(Debug)]
pub struct Activity {
    epoch: tokio::time::Instant,
    last_ms: AtomicU64,
    half_closed: AtomicBool,
}

impl Activity {
    #[must_use]
    pub fn new() -> Self {
        Self {
            epoch: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
            half_closed: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Resolves once the connection has been idle for `established` (or `half_closed` after
    /// one direction ended); returns the limit that was reached.
    pub async fn idle_out(&self, established: Duration, half_closed: Duration) -> Duration {
        loop {
            let limit = if self.half_closed.load(Ordering::Relaxed) {
                half_closed
            } else {
                established
            };
            let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
            let idle = self
                .now_ms()
                .saturating_sub(self.last_ms.load(Ordering::Relaxed));
            if idle >= limit_ms {
                return limit;
            }
            // Re-checked at least every second, so a half-close shortens the wait.
            let wait = (limit_ms - idle).min(1000);
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// Bytes read (and then written) at most per system call, each direction.
const PUMP_BUFFER: usize = 64 * 1024;

/// What one direction carried.
#[derive(Debug, Default)]
pub struct Pumped {
    pub bytes: u64,
    pub error: Option<io::ErrorKind>,
}

/// Copy `from` to `to` until EOF, then shut `to`'s write half down (a FIN toward that side: the
/// half-close is passed on, the other direction keeps flowing). On an error the write half is
/// shut down too, which ends the other side's reads. Every chunk written is added to each of
/// `counted` as it goes (the metrics move with a long transfer).
pub async fn pump<R, W>(
    mut from: R,
    mut to: W,
    activity: &Activity,
    counted: &[&AtomicU64],
) -> Pumped
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Read into spare capacity: the buffer is never zeroed (64 KiB per direction and
    // connection would cost more than the first requests of a short connection).
    let mut buf = Vec::with_capacity(PUMP_BUFFER);
    let mut out = Pumped::default();
    loop {
        buf.clear();
        let n = match from.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                out.error = Some(e.kind());
                break;
            }
        };
        if let Err(e) = to.write_all(&buf[..n]).await {
            out.error = Some(e.kind());
            break;
        }
        out.bytes += n as u64;
        for c in counted {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
        activity.touch();
    }
    let _ = to.shutdown().await;
    activity.half_closed.store(true, Ordering::Relaxed);
    activity.touch();
    out
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

    /// The upload ends with a FIN; the reply flows after it (half-close passed on, not a close).
    #[tokio::test]
    async fn half_close_is_passed_on() {
        let server = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), 16).unwrap();
        let server_addr = server.local_addr().unwrap();
        let server_task = tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            // Only after the client's FIN arrived: answer with the length.
            s.write_all(format!("{}", got.len()).as_bytes())
                .await
                .unwrap();
            s.shutdown().await.unwrap();
        });
        let proxy = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), 16).unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        let proxy_task = tokio::spawn(async move {
            let (c, _) = proxy.accept().await.unwrap();
            let u = connect_from(
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                server_addr,
                Duration::from_secs(2),
            )
            .await
            .unwrap();
            let (cr, cw) = c.into_split();
            let (ur, uw) = u.into_split();
            let activity = Activity::new();
            tokio::join!(pump(cr, uw, &activity, &[]), pump(ur, cw, &activity, &[]))
        });
        let mut c = TcpStream::connect(proxy_addr).await.unwrap();
        c.write_all(&[7u8; 100_000]).await.unwrap();
        c.shutdown().await.unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).await.unwrap();
        assert_eq!(reply, "100000");
        let (up, down) = proxy_task.await.unwrap();
        server_task.await.unwrap();
        assert_eq!((up.bytes, down.bytes), (100_000, 6));
    }
}

#[cfg(test)]
mod idle_tests {
    use std::net::Ipv4Addr;

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
