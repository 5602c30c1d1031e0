//! Wake-up tracking for a future made of parts polled by one task.
//!
//! Why: a proxied connection is several things that wait on their own (the two directions of a
//! TCP copy; a server connection and its upstream connections; an idle timer). Polled together
//! with the task's one waker, every wake-up polls every part, and a part woken while the task
//! is already polling (a request handed from one part to the other) costs a trip through the
//! scheduler. With [`Woken`], each part gets a waker of its own that sets the part's bit: the
//! task polls only the parts whose bits are set, and a wake-up that comes while it is polling
//! is picked up by the same poll instead of scheduling the task again.
//!
//! Use: at the start of `poll`, [`Woken::begin`] (the bits to poll); poll those parts with
//! [`Woken::waker`]; then [`Woken::end`]: `None` when nothing was woken meanwhile (return
//! `Pending`), else the bits to poll next. After a bounded number of passes,
//! [`Woken::yield_now`] lets other tasks run.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    task::{Context, Wake, Waker},
};

use atomic_waker::AtomicWaker;

/// The task is polling: a wake-up is noted, not sent to the scheduler.
const POLLING: u8 = 1;

/// The most parts one [`Woken`] tracks (one bit each, besides [`POLLING`]).
pub const MAX_PARTS: usize = 7;

/// Why an [`AtomicWaker`], not a mutex: the task's waker is registered on every poll and taken
/// on the first part wake-up after it; a lock pair on both paths was about a tenth of the
/// user-space cost of a proxied request on the L4 path.
#[derive(Debug)]
struct Flags {
    state: AtomicU8,
    task: AtomicWaker,
}

/// The waker of one part: sets the part's bit, and wakes the task unless it is polling or was
/// already woken.
struct Part {
    flags: Arc<Flags>,
    bit: u8,
}

impl Wake for Part {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let before = self.flags.state.fetch_or(self.bit, Ordering::AcqRel);
        // Polling: the pass loop sees the bit. Other bits already set: a wake-up is on its way.
        if before == 0 {
            self.flags.task.wake();
        }
    }
}

/// Which parts of a task's future were woken.
pub struct Woken {
    flags: Arc<Flags>,
    wakers: Vec<Waker>,
    all: u8,
    started: AtomicBool,
}

impl std::fmt::Debug for Woken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Woken")
            .field("state", &self.flags.state.load(Ordering::Relaxed))
            .field("parts", &self.wakers.len())
            .finish()
    }
}

impl Woken {
    /// Tracking for `parts` parts (at most [`MAX_PARTS`]); part `i` is bit [`Woken::bit`]`(i)`.
    #[must_use]
    pub fn new(parts: usize) -> Self {
        let parts = parts.min(MAX_PARTS);
        let flags = Arc::new(Flags {
            state: AtomicU8::new(0),
            task: AtomicWaker::new(),
        });
        let wakers = (0..parts)
            .map(|i| {
                Waker::from(Arc::new(Part {
                    flags: Arc::clone(&flags),
                    bit: Self::bit(i),
                }))
            })
            .collect();
        let all = (0..parts).fold(0, |a, i| a | Self::bit(i));
        Self {
            flags,
            wakers,
            all,
            started: AtomicBool::new(false),
        }
    }

    /// Part `i`'s bit.
    #[must_use]
    pub const fn bit(i: usize) -> u8 {
        2 << i
    }

    /// The waker to poll part `i` with.
    #[must_use]
    pub fn waker(&self, i: usize) -> &Waker {
        &self.wakers[i]
    }

    /// Mark part `i` woken (it must be polled before the task returns, or soon after).
    pub fn wake(&self, i: usize) {
        self.wakers[i].wake_by_ref();
    }

    /// Start a poll of the task: remember its waker, mark it polling; the parts to poll (every
    /// part on the first poll).
    pub fn begin(&self, cx: &Context<'_>) -> u8 {
        self.flags.task.register(cx.waker());
        let woken = self.flags.state.swap(POLLING, Ordering::AcqRel) & self.all;
        if self.started.swap(true, Ordering::Relaxed) {
            woken
        } else {
            self.all
        }
    }

    /// End a pass: `None` when no part was woken since [`Self::begin`] or the last pass (the
    /// task may return `Pending`); else the parts to poll in another pass.
    pub fn end(&self) -> Option<u8> {
        match self
            .flags
            .state
            .compare_exchange(POLLING, 0, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => None,
            Err(_) => Some(self.flags.state.swap(POLLING, Ordering::AcqRel) & self.all),
        }
    }

    /// Stop polling with `woken` still to do: let other tasks run and come back for them.
    pub fn yield_now(&self, woken: u8, cx: &Context<'_>) {
        self.flags.state.fetch_or(woken, Ordering::AcqRel);
        self.flags.state.fetch_and(!POLLING, Ordering::AcqRel);
        cx.waker().wake_by_ref();
    }

    /// The task is done: later wake-ups of its parts change nothing.
    pub fn finish(&self) {
        self.flags.state.store(0, Ordering::Release);
        drop(self.flags.task.take());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Wake-ups while polling are passes, not task wake-ups; outside they wake the task once.
    #[test]
    fn wakeups_inside_a_poll_do_not_wake_the_task() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let task = Waker::from(Arc::clone(&count));
        let cx = Context::from_waker(&task);
        let w = Woken::new(3);
        assert_eq!(w.begin(&cx), Woken::bit(0) | Woken::bit(1) | Woken::bit(2));
        w.wake(1);
        assert_eq!(w.end(), Some(Woken::bit(1)));
        assert_eq!(w.end(), None);
        assert_eq!(
            count.0.load(Ordering::Relaxed),
            0,
            "no task wake-up while polling"
        );
        // Outside a poll: one task wake-up for any number of part wake-ups.
        w.wake(0);
        w.wake(2);
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        assert_eq!(w.begin(&cx), Woken::bit(0) | Woken::bit(2));
        assert_eq!(w.end(), None);
        // Yielding keeps what is left and wakes the task.
        let _ = w.begin(&cx);
        w.yield_now(Woken::bit(1), &cx);
        assert_eq!(count.0.load(Ordering::Relaxed), 2);
        assert_eq!(w.begin(&cx), Woken::bit(1));
        assert_eq!(w.end(), None);
        w.finish();
        w.wake(0);
        assert_eq!(count.0.load(Ordering::Relaxed), 2, "no task after finish");
    }
}
