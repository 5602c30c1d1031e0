//! Both directions of one proxied TCP connection, copied by one future.
//!
//! Why not two copy futures joined: every wake-up of the connection's task then polled both
//! directions and the idle timer, though one thing was ready (a request from the client, or a
//! response from the upstream). Here each direction and the timer are parts of a
//! [`Woken`]: a wake-up polls only the part it was for. Activity is a count of chunks moved,
//! read by the idle timer when it fires, instead of a clock read per chunk.
//!
//! Half-close: when one side sends FIN (a read returns EOF), the write half toward the other
//! side is shut down and the other direction keeps flowing until it ends too. On an error the
//! write half is shut down as well, which ends the other side's reads. A connection idle for
//! the established lifetime (or the half-closed one, once one direction has ended) is closed;
//! the idle time is measured at the timer's checks, at least once a second.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::{Instant, Sleep},
};

use crate::wake::Woken;

/// Client toward upstream.
const UP: usize = 0;
/// Upstream toward client.
const DOWN: usize = 1;
/// The idle timer.
const TIMER: usize = 2;

/// A direction's first buffer: small, so a short connection does not pay for zeroing 64 KiB.
const FIRST_BUFFER: usize = 4 * 1024;
/// Bytes read (and then written) at most per system call, once a read filled the first buffer.
pub const MAX_BUFFER: usize = 64 * 1024;
/// How often at least the idle timer looks at the connection.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// Passes over woken parts in one poll before the task yields to the others.
const MAX_PASSES: usize = 8;

/// What one direction carried.
#[derive(Debug, Default)]
pub struct Pumped {
    pub bytes: u64,
    pub error: Option<io::ErrorKind>,
}

/// How a spliced connection ended.
#[derive(Debug)]
pub struct Spliced {
    /// Client toward upstream, upstream toward client.
    pub up: Pumped,
    pub down: Pumped,
    /// The idle limit that closed the connection, if that is what closed it.
    pub idle: Option<Duration>,
}

#[derive(Clone, Copy, Debug)]
enum Stage {
    Read,
    Write { at: usize, end: usize },
    Shutdown,
    Done,
}

/// One direction: read a chunk, write it all, again; then pass the EOF on.
struct Direction<'a> {
    buf: Vec<u8>,
    stage: Stage,
    out: Pumped,
    /// Chunks moved (the idle timer's activity count).
    moved: u64,
    /// Counters every written byte is added to (service and upstream totals).
    counted: &'a [&'a AtomicU64],
}

impl<'a> Direction<'a> {
    fn new(counted: &'a [&'a AtomicU64]) -> Self {
        Self {
            buf: vec![0; FIRST_BUFFER],
            stage: Stage::Read,
            out: Pumped::default(),
            moved: 0,
            counted,
        }
    }

    fn done(&self) -> bool {
        matches!(self.stage, Stage::Done)
    }

    fn fail(&mut self, e: &io::Error) {
        self.out.error = Some(e.kind());
        self.stage = Stage::Shutdown;
    }

    /// Copy from `from` to `to` until nothing is ready; `Ready` once this direction has ended.
    fn poll_copy(
        &mut self,
        from: &mut TcpStream,
        to: &mut TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        loop {
            match self.stage {
                Stage::Read => {
                    let mut rb = ReadBuf::new(&mut self.buf);
                    match Pin::new(&mut *from).poll_read(cx, &mut rb) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(())) => {
                            let n = rb.filled().len();
                            self.stage = if n == 0 {
                                Stage::Shutdown
                            } else {
                                Stage::Write { at: 0, end: n }
                            };
                        }
                        Poll::Ready(Err(e)) => self.fail(&e),
                    }
                }
                Stage::Write { at, end } => {
                    match Pin::new(&mut *to).poll_write(cx, &self.buf[at..end]) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(0)) => self.fail(&io::ErrorKind::WriteZero.into()),
                        Poll::Ready(Ok(n)) => {
                            self.out.bytes += n as u64;
                            for c in self.counted {
                                c.fetch_add(n as u64, Ordering::Relaxed);
                            }
                            if at + n < end {
                                self.stage = Stage::Write { at: at + n, end };
                                continue;
                            }
                            self.moved += 1;
                            // A full buffer: a bulk transfer, read more per call from now on.
                            if end == self.buf.len() && self.buf.len() < MAX_BUFFER {
                                self.buf.resize(MAX_BUFFER, 0);
                            }
                            self.stage = Stage::Read;
                        }
                        Poll::Ready(Err(e)) => self.fail(&e),
                    }
                }
                Stage::Shutdown => {
                    if Pin::new(&mut *to).poll_shutdown(cx).is_pending() {
                        return Poll::Pending;
                    }
                    self.stage = Stage::Done;
                }
                Stage::Done => return Poll::Ready(()),
            }
        }
    }
}

/// The idle timer: fires at most [`IDLE_CHECK`] apart, compares the activity count.
struct IdleTimer {
    sleep: Pin<Box<Sleep>>,
    established: Duration,
    half_closed: Duration,
    seen: u64,
    active_at: Instant,
}

impl IdleTimer {
    fn new(established: Duration, half_closed: Duration) -> Self {
        let now = Instant::now();
        Self {
            sleep: Box::pin(tokio::time::sleep_until(now + established.min(IDLE_CHECK))),
            established,
            half_closed,
            seen: 0,
            active_at: now,
        }
    }

    /// `Ready(limit)` once idle for `limit`; `moved` is the activity count, `half` whether a
    /// direction has ended.
    fn poll_idle(&mut self, moved: u64, half: bool, cx: &mut Context<'_>) -> Poll<Duration> {
        while self.sleep.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if moved != self.seen {
                self.seen = moved;
                self.active_at = now;
            }
            let limit = if half {
                self.half_closed
            } else {
                self.established
            };
            let idle = now.saturating_duration_since(self.active_at);
            if idle >= limit {
                return Poll::Ready(limit);
            }
            self.sleep
                .as_mut()
                .reset(now + (limit - idle).min(IDLE_CHECK));
        }
        Poll::Pending
    }
}

/// Both directions of a client connection and its upstream connection.
pub struct Splice<'a> {
    client: TcpStream,
    upstream: TcpStream,
    up: Direction<'a>,
    down: Direction<'a>,
    idle: IdleTimer,
    woken: Woken,
}

impl<'a> Splice<'a> {
    /// Copy between `client` and `upstream`; bytes toward the upstream are added to each of
    /// `to_upstream`, toward the client to each of `to_client`, as they go. Idle limits:
    /// `established`, and `half_closed` once one direction has ended.
    pub fn new(
        client: TcpStream,
        upstream: TcpStream,
        to_upstream: &'a [&'a AtomicU64],
        to_client: &'a [&'a AtomicU64],
        established: Duration,
        half_closed: Duration,
    ) -> Self {
        Self {
            client,
            upstream,
            up: Direction::new(to_upstream),
            down: Direction::new(to_client),
            idle: IdleTimer::new(established, half_closed),
            woken: Woken::new(3),
        }
    }

    fn finish(&mut self, idle: Option<Duration>) -> Spliced {
        self.woken.finish();
        Spliced {
            up: std::mem::take(&mut self.up.out),
            down: std::mem::take(&mut self.down.out),
            idle,
        }
    }
}

impl Future for Splice<'_> {
    type Output = Spliced;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Spliced> {
        let this = self.get_mut();
        let mut parts = this.woken.begin(cx);
        for _ in 0..MAX_PASSES {
            if parts & Woken::bit(UP) != 0 && !this.up.done() {
                let mut c = Context::from_waker(this.woken.waker(UP));
                let _ = this
                    .up
                    .poll_copy(&mut this.client, &mut this.upstream, &mut c);
            }
            if parts & Woken::bit(DOWN) != 0 && !this.down.done() {
                let mut c = Context::from_waker(this.woken.waker(DOWN));
                let _ = this
                    .down
                    .poll_copy(&mut this.upstream, &mut this.client, &mut c);
            }
            if this.up.done() && this.down.done() {
                return Poll::Ready(this.finish(None));
            }
            if parts & Woken::bit(TIMER) != 0 {
                let moved = this.up.moved + this.down.moved;
                let half = this.up.done() || this.down.done();
                let mut c = Context::from_waker(this.woken.waker(TIMER));
                if let Poll::Ready(limit) = this.idle.poll_idle(moved, half, &mut c) {
                    return Poll::Ready(this.finish(Some(limit)));
                }
            }
            match this.woken.end() {
                None => return Poll::Pending,
                Some(more) => parts = more,
            }
        }
        this.woken.yield_now(parts, cx);
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::l4::tcp::listen;

    /// A connected pair through a listener on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), 16).unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// The upload ends with a FIN; the reply flows after it (half-close passed on, not a
    /// close); both byte counts and the counters are right, across the buffer's growth.
    #[tokio::test]
    async fn half_close_is_passed_on() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let server_task = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            // Only after the client's FIN arrived: answer with the length and a checksum.
            let sum: u64 = got.iter().map(|b| u64::from(*b)).sum();
            server
                .write_all(format!("{} {sum}", got.len()).as_bytes())
                .await
                .unwrap();
            server.shutdown().await.unwrap();
        });
        let up_total = AtomicU64::new(0);
        let down_total = AtomicU64::new(0);
        let up_counted = [&up_total];
        let down_counted = [&down_total];
        let splice = Splice::new(
            proxy_client,
            proxy_upstream,
            &up_counted,
            &down_counted,
            Duration::from_secs(60),
            Duration::from_secs(60),
        );
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let want_sum: u64 = body.iter().map(|b| u64::from(*b)).sum();
        let client_side = async move {
            client.write_all(&body).await.unwrap();
            client.shutdown().await.unwrap();
            let mut reply = String::new();
            client.read_to_string(&mut reply).await.unwrap();
            reply
        };
        let (done, reply) = tokio::join!(splice, client_side);
        server_task.await.unwrap();
        assert_eq!(reply, format!("300000 {want_sum}"));
        let reply_len = reply.len() as u64;
        assert_eq!((done.up.bytes, done.down.bytes), (300_000, reply_len));
        assert_eq!(up_total.load(Ordering::Relaxed), 300_000);
        assert_eq!(down_total.load(Ordering::Relaxed), reply_len);
        assert!(done.idle.is_none());
        assert_eq!((done.up.error, done.down.error), (None, None));
    }

    /// Nothing moves: closed after the idle limit; a half-closed connection after the
    /// half-closed limit.
    #[tokio::test]
    async fn idle_connections_end() {
        let (_client, proxy_client) = pair().await;
        let (proxy_upstream, _server) = pair().await;
        let started = Instant::now();
        let done = Splice::new(
            proxy_client,
            proxy_upstream,
            &[],
            &[],
            Duration::from_millis(300),
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(done.idle, Some(Duration::from_millis(300)));
        assert!(started.elapsed() >= Duration::from_millis(300));

        let (mut client, proxy_client) = pair().await;
        let (proxy_upstream, _server) = pair().await;
        client.shutdown().await.unwrap();
        let done = tokio::time::timeout(
            Duration::from_secs(30),
            Splice::new(
                proxy_client,
                proxy_upstream,
                &[],
                &[],
                Duration::from_secs(60),
                Duration::from_millis(200),
            ),
        )
        .await
        .expect("the half-closed limit ended it");
        assert_eq!(done.idle, Some(Duration::from_millis(200)));
    }
}
