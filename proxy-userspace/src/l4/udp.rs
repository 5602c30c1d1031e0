//! Userspace UDP: one socket on the service address; per client address a session with its own
//! socket connected to the chosen upstream (from the SNAT address), so replies find their
//! client. A session ends after `udp_idle` without a datagram either way; at most
//! `max_udp_sessions` live at once (datagrams of new clients beyond that are dropped, counted).

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::UdpSocket,
    sync::{mpsc, watch},
    time::Instant,
};

use super::{Service, Settings};
use crate::config::Protocol;

/// Largest datagram relayed.
const MAX_DATAGRAM: usize = 65_535;

/// Bind the service socket.
///
/// # Errors
/// Bind failure.
pub async fn bind(listen: SocketAddr) -> io::Result<UdpSocket> {
    UdpSocket::bind(listen).await
}

struct Session {
    generation: u64,
    upstream: Arc<UdpSocket>,
    /// Milliseconds since `epoch` of the last datagram either way.
    last: Arc<AtomicU64>,
    /// The counters of its upstream.
    up_traffic: Arc<super::counters::Traffic>,
    /// Counted active (service, upstream) while in the table.
    _active: (super::counters::ActiveGuard, super::counters::ActiveGuard),
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Relay until `shutdown` turns true.
pub async fn serve(
    sock: UdpSocket,
    svc: Arc<Service>,
    settings: Settings,
    mut shutdown: watch::Receiver<bool>,
) {
    let sock = Arc::new(sock);
    let epoch = Instant::now();
    let mut sessions: HashMap<SocketAddr, Session> = HashMap::new();
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<(SocketAddr, u64)>();
    let mut generation = 0u64;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let name = svc.chooser.name.clone();
    loop {
        let (n, peer) = tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors reported on the socket, for example: keep serving.
                    tracing::debug!(service = %name, error = %e, "udp receive failed");
                    continue;
                }
            },
            Some((client, g)) = ended_rx.recv() => {
                if sessions.get(&client).is_some_and(|s| s.generation == g) {
                    sessions.remove(&client);
                }
                continue;
            }
            _ = shutdown.changed() => return,
        };
        let client = peer;
        if !sessions.contains_key(&client) {
            // A datagram that would open a session: the fast path's step 7 order (ACL, an
            // upstream exists, rate), then the session bound. Sessions open already are not
            // asked again (the ACL admits flows).
            if let Err(r) = svc.stats.admission.acl(client.ip()) {
                tracing::debug!(service = %name, %client, reason = r.name(), "udp datagram dropped");
                continue;
            }
            if sessions.len() >= settings.max_udp_sessions {
                svc.stats
                    .udp_sessions_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(service = %name, %client, "udp session limit reached: datagram dropped");
                continue;
            }
            let candidates =
                svc.chooser
                    .current()
                    .candidates(client, svc.chooser.listen, Protocol::Udp);
            let Some(up) = candidates.first().copied() else {
                svc.stats.no_upstream.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if let Err(r) = svc.stats.admission.rate(client.ip()) {
                tracing::debug!(service = %name, %client, reason = r.name(), "udp datagram dropped");
                continue;
            }
            let upstream = match open_upstream(svc.source, up).await {
                Ok(u) => Arc::new(u),
                Err(e) => {
                    svc.stats
                        .traffic
                        .connect_failures
                        .fetch_add(1, Ordering::Relaxed);
                    svc.stats
                        .upstreams
                        .get(up)
                        .connect_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(service = %name, %client, upstream = %up, error = %e, "udp upstream socket failed");
                    continue;
                }
            };
            generation += 1;
            let last = Arc::new(AtomicU64::new(millis_since(epoch)));
            let up_traffic = svc.stats.upstreams.get(up);
            let active = (svc.stats.traffic.open(), up_traffic.open());
            tokio::spawn(replies(ReplyTask {
                service: Arc::clone(&svc),
                listener: Arc::clone(&sock),
                upstream: Arc::clone(&upstream),
                up_traffic: Arc::clone(&up_traffic),
                client,
                last: Arc::clone(&last),
                epoch,
                idle: settings.udp_idle,
                ended: ended_tx.clone(),
                generation,
                shutdown: shutdown.clone(),
            }));
            tracing::debug!(service = %name, %client, upstream = %up, "udp session");
            sessions.insert(
                client,
                Session {
                    generation,
                    upstream,
                    last,
                    up_traffic,
                    _active: active,
                },
            );
        }
        if let Some(s) = sessions.get(&client) {
            s.last.store(millis_since(epoch), Ordering::Relaxed);
            match s.upstream.send(&buf[..n]).await {
                Ok(_) => {
                    svc.stats
                        .traffic
                        .bytes_up
                        .fetch_add(n as u64, Ordering::Relaxed);
                    s.up_traffic.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::debug!(service = %name, %client, error = %e, "udp send upstream failed")
                }
            }
        }
    }
}

async fn open_upstream(source: SocketAddr, upstream: SocketAddr) -> io::Result<UdpSocket> {
    let s = UdpSocket::bind(source).await?;
    s.connect(upstream).await?;
    Ok(s)
}

struct ReplyTask {
    service: Arc<Service>,
    listener: Arc<UdpSocket>,
    upstream: Arc<UdpSocket>,
    up_traffic: Arc<super::counters::Traffic>,
    client: SocketAddr,
    last: Arc<AtomicU64>,
    epoch: Instant,
    idle: Duration,
    ended: mpsc::UnboundedSender<(SocketAddr, u64)>,
    generation: u64,
    shutdown: watch::Receiver<bool>,
}

/// Upstream -> client for one session, until it has been idle for `idle` (both directions).
async fn replies(mut t: ReplyTask) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let idle_ms = u64::try_from(t.idle.as_millis()).unwrap_or(u64::MAX);
    loop {
        let since = millis_since(t.epoch).saturating_sub(t.last.load(Ordering::Relaxed));
        if since >= idle_ms {
            break;
        }
        let wait = Duration::from_millis(idle_ms - since);
        let r = tokio::select! {
            r = tokio::time::timeout(wait, t.upstream.recv(&mut buf)) => r,
            _ = t.shutdown.changed() => break,
        };
        match r {
            Err(_) => {} // re-check the idle time: the client may have sent meanwhile
            Ok(Ok(n)) => {
                t.last.store(millis_since(t.epoch), Ordering::Relaxed);
                match t.listener.send_to(&buf[..n], t.client).await {
                    Ok(_) => {
                        t.service
                            .stats
                            .traffic
                            .bytes_down
                            .fetch_add(n as u64, Ordering::Relaxed);
                        t.up_traffic
                            .bytes_down
                            .fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::debug!(client = %t.client, error = %e, "udp send to client failed")
                    }
                }
            }
            // ECONNREFUSED from an ICMP port unreachable, for example: the session stays
            // until idle (the upstream may come back).
            Ok(Err(e)) => {
                tracing::debug!(client = %t.client, error = %e, "udp upstream receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tracing::debug!(service = %t.service.chooser.name, client = %t.client, "udp session idle: closed");
    let _ = t.ended.send((t.client, t.generation));
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::l4::{Choice, Chooser, Stats};

    /// An upstream that answers every datagram with "echo:" + the datagram.
    async fn echo_upstream() -> SocketAddr {
        let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            for _ in 0..1000 {
                let Ok((n, peer)) = s.recv_from(&mut buf).await else {
                    return;
                };
                let mut out = b"echo:".to_vec();
                out.extend_from_slice(&buf[..n]);
                let _ = s.send_to(&out, peer).await;
            }
        });
        addr
    }

    fn service(upstream: SocketAddr, listen: SocketAddr) -> Arc<Service> {
        let svc = crate::plan::PlannedService {
            name: "u".into(),
            listen,
            protocol: Protocol::Udp,
            key: crate::plan::service_key(listen, Protocol::Udp),
            value: proxy_common::ServiceValue { id: 1, flags: 0 },
            table: vec![1; proxy_common::MAGLEV_SIZE as usize],
        };
        Arc::new(Service {
            chooser: Chooser::new(
                "u".into(),
                listen,
                Protocol::Udp,
                Choice::from_plan(&svc, &[(1, upstream)]),
            ),
            source: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            mss_clamp: 0,
            stats: Stats::default(),
        })
    }

    async fn ask(client: &UdpSocket, msg: &[u8]) -> Option<Vec<u8>> {
        client.send(msg).await.ok()?;
        let mut buf = [0u8; 2048];
        let n = tokio::time::timeout(Duration::from_millis(500), client.recv(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some(buf[..n].to_vec())
    }

    /// Replies reach their own client; a session beyond the bound is refused (counted) until
    /// idle sessions end.
    #[tokio::test]
    async fn sessions_are_per_client_bounded_and_expire() {
        let upstream = echo_upstream().await;
        let sock = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .unwrap();
        let listen = sock.local_addr().unwrap();
        let svc = service(upstream, listen);
        let settings = Settings {
            udp_idle: Duration::from_millis(300),
            max_udp_sessions: 2,
            ..Settings::default()
        };
        let (_tx, rx) = watch::channel(false);
        tokio::spawn(serve(sock, Arc::clone(&svc), settings, rx));
        let mut clients = Vec::new();
        for _ in 0..3 {
            let c = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
            c.connect(listen).await.unwrap();
            clients.push(c);
        }
        assert_eq!(
            ask(&clients[0], b"a").await.as_deref(),
            Some(&b"echo:a"[..])
        );
        assert_eq!(
            ask(&clients[1], b"b").await.as_deref(),
            Some(&b"echo:b"[..])
        );
        // The third client is over the bound: dropped.
        assert_eq!(ask(&clients[2], b"c").await, None);
        assert_eq!(svc.stats.udp_sessions_refused.load(Ordering::Relaxed), 1);
        assert_eq!(svc.stats.traffic.opened.load(Ordering::Relaxed), 2);
        assert_eq!(svc.counters().upstreams[&upstream.to_string()].opened, 2);
        // Once the first two sessions idled out, the third client gets one (bounded wait).
        let mut answered = None;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            answered = ask(&clients[2], b"c").await;
            if answered.is_some() {
                break;
            }
        }
        assert_eq!(answered.as_deref(), Some(&b"echo:c"[..]));
        assert_eq!(svc.stats.traffic.opened.load(Ordering::Relaxed), 3);
    }
}
