//! The upstream HTTP/1 connections of one client connection, driven inside that client
//! connection's task.
//!
//! Why: a hyper client connection is a future that must be polled for its requests to go out
//! and its responses to come in. Spawned as a task of its own, every proxied request costs two
//! task wake-ups and switches (the request handed to the upstream task, the response handed
//! back). Here the client connection's task polls both the server connection and its upstream
//! connections ([`Joined`], each a part of a [`crate::wake::Woken`]), and a wake-up from either
//! side while the task is already polling is noted, not sent through the scheduler: the task
//! polls what was woken again before it returns. A request and its response are then forwarded
//! in one or two polls of one task.
//!
//! When the client connection ends, its ready upstream connections go to the service's idle
//! list with their futures (not driven there: the idle sweep polls them once a second, so one
//! the upstream closed is dropped); the next client connection that takes one polls it first
//! ([`Upstreams::poll_here`]) and drives it from then on. Anything else still driven (an
//! upgrade being handed over) is spawned as a task of its own ([`Upstreams::hand_off`]).

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use crate::wake::Woken;

/// One upstream connection's future (hyper's connection, upgrades included).
pub type UpstreamConn = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The server connection (client side, the handler, its timers).
const SERVER: usize = 0;
/// The upstream connections (one was woken, or a new one was added).
const UPSTREAM: usize = 1;

/// Passes over what was woken in one poll before the task yields to the others.
const MAX_PASSES: usize = 16;

/// The upstream connections driven by one client connection's task; the handler adds the
/// connections it opens.
pub struct Upstreams {
    /// The connections, each with the id its client connection gave it.
    conns: Mutex<Vec<(u64, UpstreamConn)>>,
    woken: Woken,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams")
            .field("woken", &self.woken)
            .finish_non_exhaustive()
    }
}

impl Upstreams {
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            conns: Mutex::new(Vec::new()),
            woken: Woken::new(2),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, UpstreamConn)>> {
        match self.conns.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        }
    }

    /// Drive `conn` (known as `id`) in this task from now on (its first poll comes before the
    /// task returns).
    pub fn adopt(&self, id: u64, conn: UpstreamConn) {
        self.lock().push((id, conn));
        self.woken.wake(UPSTREAM);
    }

    /// Poll `conn` once with this task's upstream waker (a connection taken over from elsewhere:
    /// its wake-ups come here from now on). Ready: the connection has ended.
    pub fn poll_here(&self, conn: &mut UpstreamConn) -> Poll<()> {
        conn.as_mut()
            .poll(&mut Context::from_waker(self.woken.waker(UPSTREAM)))
    }

    /// Drive `conn`, already polled by [`Self::poll_here`], in this task from now on.
    pub fn adopt_polled(&self, id: u64, conn: UpstreamConn) {
        self.lock().push((id, conn));
    }

    /// Stop driving connection `id` here; its future, for someone else to drive.
    pub fn release(&self, id: u64) -> Option<UpstreamConn> {
        let mut conns = self.lock();
        let i = conns.iter().position(|(c, _)| *c == id)?;
        Some(conns.swap_remove(i).1)
    }

    /// How many connections this task drives.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Poll every connection; finished ones are dropped.
    fn poll_all(&self) {
        let mut cx = Context::from_waker(self.woken.waker(UPSTREAM));
        self.lock()
            .retain_mut(|(_, c)| c.as_mut().poll(&mut cx).is_pending());
    }

    /// Spawn every connection still driven here as a task of its own (the client connection
    /// ended; connections kept for other clients, or being upgraded, go on).
    pub fn hand_off(&self) {
        let conns = std::mem::take(&mut *self.lock());
        for (_, c) in conns {
            tokio::spawn(c);
        }
    }
}

/// A server connection future joined with the upstream connections its handler uses: both
/// polled by one task.
pub struct Joined<F> {
    server: Pin<Box<F>>,
    upstreams: Arc<Upstreams>,
}

impl<F: Future> Joined<F> {
    pub fn new(server: F, upstreams: Arc<Upstreams>) -> Self {
        Self {
            server: Box::pin(server),
            upstreams,
        }
    }
}

impl<F: Future> Future for Joined<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let woken = &this.upstreams.woken;
        let mut parts = woken.begin(cx);
        for _ in 0..MAX_PASSES {
            if parts & Woken::bit(UPSTREAM) != 0 {
                this.upstreams.poll_all();
            }
            if parts & Woken::bit(SERVER) != 0 {
                let mut scx = Context::from_waker(woken.waker(SERVER));
                if let Poll::Ready(out) = this.server.as_mut().poll(&mut scx) {
                    woken.finish();
                    return Poll::Ready(out);
                }
            }
            match woken.end() {
                None => return Poll::Pending,
                Some(more) => parts = more,
            }
        }
        // Busy: let other tasks run, keep what is still to poll, and come back.
        woken.yield_now(parts, cx);
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A future adopted while the joined task polls runs in the same poll, and a wake-up of it
    /// from elsewhere brings the task back.
    #[tokio::test]
    async fn adopted_connections_run_in_the_joined_task() {
        let ups = Upstreams::new();
        let polls = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let adopted = {
            let ups = Arc::clone(&ups);
            let polls = Arc::clone(&polls);
            async move {
                // The "handler": open a connection (here a future waiting for `rx`).
                let mut rx = Some(rx);
                let p = Arc::clone(&polls);
                ups.adopt(
                    1,
                    Box::pin(async move {
                        p.fetch_add(1, Ordering::Relaxed);
                        let _ = rx.take().expect("polled once").await;
                        p.fetch_add(1, Ordering::Relaxed);
                    }),
                );
                // Wait until the adopted future finished (it was polled by the joined task).
                std::future::poll_fn(|cx| {
                    if polls.load(Ordering::Relaxed) == 2 {
                        Poll::Ready(())
                    } else {
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                })
                .await;
            }
        };
        let joined = tokio::spawn(Joined::new(adopted, Arc::clone(&ups)));
        tokio::task::yield_now().await;
        assert_eq!(polls.load(Ordering::Relaxed), 1, "adopted and polled once");
        tx.send(()).expect("receiver alive");
        tokio::time::timeout(std::time::Duration::from_secs(5), joined)
            .await
            .expect("joined task finished")
            .expect("no panic");
        assert_eq!(polls.load(Ordering::Relaxed), 2);
        assert!(ups.is_empty(), "finished connections are dropped");
    }

    /// Connections still driven when the client connection ends are spawned and keep running.
    #[tokio::test]
    async fn hand_off_spawns_what_is_left() {
        let ups = Upstreams::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<u32>();
        let ups2 = Arc::clone(&ups);
        Joined::new(
            async move {
                ups2.adopt(
                    7,
                    Box::pin(async move {
                        if let Ok(v) = rx.await {
                            let _ = done_tx.send(v + 1);
                        }
                    }),
                );
            },
            Arc::clone(&ups),
        )
        .await;
        assert_eq!(ups.len(), 1);
        ups.hand_off();
        assert!(ups.is_empty());
        tx.send(41).expect("spawned connection alive");
        let v = tokio::time::timeout(std::time::Duration::from_secs(5), done_rx)
            .await
            .expect("spawned connection ran")
            .expect("sent");
        assert_eq!(v, 42);
    }
}
