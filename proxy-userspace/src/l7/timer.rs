//! One timer per client connection for all of that connection's deadlines (hyper's header read
//! timeout, the upstream response head timeout).
//!
//! Why: a tokio timer made per request is put into the runtime's timer wheel and taken out
//! again (a lock each way, an allocation), for a deadline that almost never fires. Here a
//! connection keeps one tokio `Sleep`; a deadline only moves it when the deadline is earlier
//! than the one it is set for. Requests of a keep-alive connection come with later and later
//! deadlines, so the timer stays where it is until it fires; then whoever waits checks the
//! clock and sets it to their own deadline. That is one timer move per timeout period instead
//! of two per request.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use tokio::time::{Instant, Sleep};

/// How far ahead an unused timer is set.
const PARKED: std::time::Duration = std::time::Duration::from_secs(86_400);

/// The deadlines of one client connection.
#[derive(Debug)]
pub struct Deadlines {
    sleep: Mutex<Pin<Box<Sleep>>>,
}

impl Deadlines {
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            sleep: Mutex::new(Box::pin(tokio::time::sleep(PARKED))),
        })
    }

    /// Ready once `deadline` has passed (the caller's task is woken then).
    pub fn poll_deadline(&self, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let mut sleep = match self.sleep.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
        }
        // The timer is set at or before `deadline`: while it has not fired, `deadline` has not
        // passed either. When it fires for an earlier deadline, it is set again for this one
        // (and then fires only once `deadline` has passed: at most two turns).
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            sleep.as_mut().reset(deadline);
        }
    }

    /// What `fut` gives, or `None` when `deadline` passes first (the connection's one timer,
    /// no timer entry of its own).
    pub async fn before<F: Future>(&self, deadline: Instant, fut: F) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            self.poll_deadline(deadline, cx).map(|()| None)
        })
        .await
    }

    /// A future ready at `deadline`.
    #[must_use]
    pub fn until(self: &Arc<Self>, deadline: Instant) -> Until {
        Until {
            deadlines: Arc::clone(self),
            deadline,
        }
    }
}

/// A deadline of a connection's [`Deadlines`] as a future (and as hyper's `Sleep`).
#[derive(Debug)]
pub struct Until {
    deadlines: Arc<Deadlines>,
    deadline: Instant,
}

impl Future for Until {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.deadlines.poll_deadline(self.deadline, cx)
    }
}

impl hyper::rt::Sleep for Until {}

/// hyper's timer for one server connection, backed by the connection's [`Deadlines`].
#[derive(Clone, Debug)]
pub struct ConnTimer(pub Arc<Deadlines>);

impl hyper::rt::Timer for ConnTimer {
    fn sleep(&self, duration: std::time::Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.0.until(Instant::now() + duration))
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.0.until(Instant::from_std(deadline)))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Deadlines fire in order on one shared timer, never early: an earlier one moves the timer
    /// back, a later one waits past the earlier one's firing.
    #[tokio::test]
    async fn shared_timer_serves_each_deadline() {
        let d = Deadlines::new();
        let t0 = Instant::now();
        let late = d.until(t0 + Duration::from_millis(300));
        let early = d.until(t0 + Duration::from_millis(100));
        let mut late = std::pin::pin!(late);
        // The late deadline is polled first (the timer is set to it), then the early one.
        assert!(poll_once(late.as_mut()).is_pending());
        early.await;
        let e = t0.elapsed();
        assert!(e >= Duration::from_millis(100), "early fired at {e:?}");
        assert!(
            poll_once(late.as_mut()).is_pending(),
            "late fired with early"
        );
        late.await;
        let l = t0.elapsed();
        assert!(l >= Duration::from_millis(300), "late fired at {l:?}");
    }

    /// A deadline that already passed is ready at once; hyper's timer is the same clock.
    #[tokio::test]
    async fn past_deadline_is_ready() {
        let d = Deadlines::new();
        let past = Instant::now() - Duration::from_millis(5);
        assert!(poll_once(std::pin::pin!(d.until(past))).is_ready());
        let timer = ConnTimer(Arc::clone(&d));
        let mut s = hyper::rt::Timer::sleep_until(&timer, past.into_std());
        assert!(poll_once(s.as_mut()).is_ready());
    }

    fn poll_once<F: Future + ?Sized>(f: Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(std::task::Waker::noop()))
    }
}
