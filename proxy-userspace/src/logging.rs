//! Logging: `tracing` to stderr, filtered by `--log-level` (a tracing filter such as `debug` or
//! `xdp_proxy=debug,info`) or else `RUST_LOG`, default `info`; records of the `log` crate
//! (aya itself, and the XDP program's aya-log records read by `aya_log::EbpfLogger`) are
//! bridged into tracing by `tracing_log::LogTracer`, so eBPF log events appear in the daemon's
//! output with the same filter and format (eBPF records carry the target `proxy_xdp::<module>`,
//! so `xdp_proxy=debug` alone hides them; `xdp_proxy=debug,proxy_xdp=info` keeps them). Plain output (no colours) when stderr is not a
//! terminal (journald, files).
//!
//! The access log (target `xdp_proxy::access`, one line per HTTP request) does not write to
//! stderr from the request's thread: its lines are appended to a memory buffer
//! ([`ACCESS_BUFFER_MAX`] bytes at most) that a thread of its own writes out a few
//! milliseconds later, many lines per write(2). When the output does not keep up and the buffer
//! is full, lines are dropped (never blocking the proxy) and counted: [`access_lines_dropped`],
//! and a line on stderr says how many. [`init`]'s guard writes what is buffered when dropped
//! (at exit). Every other record is written to stderr at once, as before.
//!
//! Access lines are written by [`access`], not formatted by the tracing formatter: the line is
//! the formatter's (`<RFC 3339 UTC time, microseconds>  INFO xdp_proxy::access: access ...`),
//! put together with the date cached per second and the fields appended as text, which costs a
//! small part of an event through the formatter (about 14,500 instructions per line). The
//! filter still decides: with `xdp_proxy::access` off nothing is built. On a terminal (colours)
//! the lines go through tracing as before.

use std::{
    cell::RefCell,
    io::IsTerminal as _,
    sync::{
        Arc, Condvar, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use tracing_log::AsLog as _;
use tracing_subscriber::{EnvFilter, fmt::writer::MakeWriterExt as _};

/// Access log bytes buffered at most; lines beyond are dropped and counted.
pub const ACCESS_BUFFER_MAX: usize = 4 << 20;
/// How long the writer thread lets lines gather after the first one before writing them.
const ACCESS_BATCH: Duration = Duration::from_millis(5);

static ACCESS_DROPPED: AtomicU64 = AtomicU64::new(0);

/// Access log lines dropped because the output did not keep up (buffer full).
#[must_use]
pub fn access_lines_dropped() -> u64 {
    ACCESS_DROPPED.load(Ordering::Relaxed)
}

struct Shared {
    buf: Mutex<Vec<u8>>,
    wake: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        match self.buf.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        }
    }
}

/// The access log's writer: appends to the shared buffer, never blocks on the output.
#[derive(Clone)]
pub struct AccessWriter(Arc<Shared>);

impl AccessWriter {
    /// Append `line` (dropped and counted when the buffer is full).
    fn push(&self, line: &[u8]) {
        let mut buf = self.0.lock();
        if buf.len() + line.len() > ACCESS_BUFFER_MAX {
            ACCESS_DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_empty = buf.is_empty();
        buf.extend_from_slice(line);
        drop(buf);
        if was_empty {
            self.0.wake.notify_one();
        }
    }
}

impl std::io::Write for AccessWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for AccessWriter {
    type Writer = Self;
    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

/// Keeps the access log's writer thread; dropping it writes out what is buffered.
#[must_use = "dropping the guard stops the access log writer"]
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for LogGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogGuard").finish_non_exhaustive()
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The buffered access log writer into `out`, and its guard.
///
/// # Errors
/// The thread could not be started.
pub fn access_writer<W: std::io::Write + Send + 'static>(
    mut out: W,
) -> std::io::Result<(AccessWriter, LogGuard)> {
    let shared = Arc::new(Shared {
        buf: Mutex::new(Vec::with_capacity(64 << 10)),
        wake: Condvar::new(),
        stop: AtomicBool::new(false),
    });
    let s = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || {
            // This thread never needs a capability, and the daemon's drop once attached reaches
            // only its runtime's threads (privs): it drops them all itself. A failure shows in
            // the daemon's check of every thread.
            let _ = crate::privs::drop_everything_on_this_thread();
            let mut spare: Vec<u8> = Vec::with_capacity(64 << 10);
            let mut reported = 0u64;
            loop {
                let mut buf = s.lock();
                while buf.is_empty() && !s.stop.load(Ordering::Relaxed) {
                    buf = match s.wake.wait(buf) {
                        Ok(b) => b,
                        Err(p) => p.into_inner(),
                    };
                }
                let stopping = s.stop.load(Ordering::Relaxed);
                if buf.is_empty() && stopping {
                    return;
                }
                if !stopping {
                    // Let more lines gather: one write for all of them.
                    drop(buf);
                    std::thread::sleep(ACCESS_BATCH);
                    buf = s.lock();
                }
                std::mem::swap(&mut *buf, &mut spare);
                drop(buf);
                let _ = out.write_all(&spare);
                spare.clear();
                let dropped = ACCESS_DROPPED.load(Ordering::Relaxed);
                if dropped > reported {
                    let _ = writeln!(
                        out,
                        "xdp-proxy: {} access log lines dropped so far (output too slow)",
                        dropped
                    );
                    reported = dropped;
                }
                let _ = out.flush();
            }
        })?;
    Ok((
        AccessWriter(Arc::clone(&shared)),
        LogGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("bad log filter {filter:?}: {source}")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("bad RUST_LOG: {0}")]
    Env(#[source] tracing_subscriber::filter::FromEnvError),
    #[error("installing the log bridge: {0}")]
    Bridge(#[from] log::SetLoggerError),
    #[error("installing the tracing subscriber: {0}")]
    Subscriber(#[from] tracing::subscriber::SetGlobalDefaultError),
    #[error("starting the access log writer thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The filter: `cli` when given, else `RUST_LOG` when set, else `info`.
///
/// # Errors
/// An unparsable filter.
pub fn filter(cli: Option<&str>, env: Option<&str>) -> Result<EnvFilter, LoggingError> {
    let text = cli.or(env).unwrap_or("info");
    EnvFilter::try_new(text).map_err(|source| LoggingError::Filter {
        filter: text.to_owned(),
        source,
    })
}

/// Install the subscriber and the `log` bridge (once per process). Keep the guard until the
/// process ends: dropping it writes out the buffered access log lines.
///
/// # Errors
/// A bad filter, or a subscriber/logger already installed.
pub fn init(cli: Option<&str>) -> Result<LogGuard, LoggingError> {
    let env = std::env::var("RUST_LOG").ok();
    let filter = filter(cli, env.as_deref().filter(|s| !s.is_empty()))?;
    let max = filter
        .max_level_hint()
        .unwrap_or(tracing_subscriber::filter::LevelFilter::TRACE);
    let (access, guard) = access_writer(std::io::stderr()).map_err(LoggingError::Thread)?;
    let ansi = std::io::stderr().is_terminal();
    if !ansi {
        let _ = FAST_ACCESS.set(access.clone());
    }
    let writer = access
        .with_filter(|m| m.target() == ACCESS_TARGET)
        .or_else(std::io::stderr);
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .finish();
    tracing::subscriber::set_global_default(subscriber)?;
    tracing_log::LogTracer::builder()
        .with_max_level(max.as_log())
        .init()?;
    Ok(guard)
}

/// The access log's target.
pub const ACCESS_TARGET: &str = "xdp_proxy::access";

/// The access log writer [`access`] appends to directly (set by [`init`] when the output has
/// no colours).
static FAST_ACCESS: OnceLock<AccessWriter> = OnceLock::new();

/// What every access line starts with after the time (the formatter's level and target).
const ACCESS_HEAD: &str = "  INFO xdp_proxy::access: ";

thread_local! {
    /// This thread's line being built, and the second whose date text is cached.
    static LINE: RefCell<(String, u64, String)> = const { RefCell::new((String::new(), u64::MAX, String::new())) };
}

/// Write one access line: `build` appends the message (`access service=...`). Nothing happens
/// when the filter turns the access log off.
pub fn access(build: impl FnOnce(&mut String)) {
    if !tracing::enabled!(target: "xdp_proxy::access", tracing::Level::INFO) {
        return;
    }
    let Some(writer) = FAST_ACCESS.get() else {
        let mut message = String::new();
        build(&mut message);
        tracing::info!(target: "xdp_proxy::access", "{message}");
        return;
    };
    LINE.with(|cell| {
        let Ok(mut guard) = cell.try_borrow_mut() else {
            return;
        };
        let (line, second, date) = &mut *guard;
        line.clear();
        push_time(line, SystemTime::now(), second, date);
        line.push_str(ACCESS_HEAD);
        build(line);
        line.push('\n');
        writer.push(line.as_bytes());
    });
}

/// `now` as the formatter writes it (`2026-11-26T21:21:19.569782Z`); `second` and `date` cache
/// the text up to the seconds.
fn push_time(out: &mut String, now: SystemTime, second: &mut u64, date: &mut String) {
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    if secs != *second {
        date.clear();
        date_text(date, secs);
        *second = secs;
    }
    out.push_str(date);
    out.push('.');
    push_padded(out, u64::from(since.subsec_micros()), 6);
    out.push('Z');
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SS` (UTC, proleptic Gregorian calendar),
/// appended to `out`.
fn date_text(out: &mut String, secs: u64) {
    let days = secs / 86_400;
    let rest = secs % 86_400;
    // Days to a civil date (H. Hinnant's algorithm), with eras of 400 years from 0000-03-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    push_padded(out, year, 4);
    out.push('-');
    push_padded(out, month, 2);
    out.push('-');
    push_padded(out, day, 2);
    out.push('T');
    push_padded(out, rest / 3_600, 2);
    out.push(':');
    push_padded(out, rest / 60 % 60, 2);
    out.push(':');
    push_padded(out, rest % 60, 2);
}

/// `n` in decimal, at least `width` digits (zeros in front).
pub fn push_padded(out: &mut String, n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut i = digits.len();
    let mut v = n;
    loop {
        i -= 1;
        digits[i] = b'0' + u8::try_from(v % 10).unwrap_or(0);
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let start = i.min(digits.len().saturating_sub(width));
    out.extend(digits[start..].iter().map(|d| char::from(*d)));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cached date text is the calendar's, and the line's time is the formatter's shape.
    #[test]
    fn access_time_text() {
        for (secs, want) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_709_164_800, "2024-02-29T00:00:00"),
            (1_795_730_788, "2026-11-26T22:06:28"),
            (4_102_444_799, "2099-12-31T23:59:59"),
        ] {
            let mut s = String::new();
            date_text(&mut s, secs);
            assert_eq!(s, want, "{secs}");
        }
        let mut out = String::new();
        let (mut second, mut date) = (u64::MAX, String::new());
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_730_788_000_042);
        push_time(&mut out, t, &mut second, &mut date);
        assert_eq!(out, "2026-11-26T22:06:28.000042Z");
        let mut n = String::new();
        push_padded(&mut n, 7, 3);
        push_padded(&mut n, 12_345, 2);
        assert_eq!(n, "00712345");
    }

    /// A line written by [`access`] is the line the tracing formatter writes for the same
    /// message (after the time, which differs).
    #[test]
    fn access_lines_match_the_formatter() {
        #[derive(Clone, Default)]
        struct Out(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Out {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Out {
            type Writer = Self;
            fn make_writer(&'a self) -> Self {
                self.clone()
            }
        }
        let formatter = Out::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(formatter.clone())
            .with_ansi(false)
            .finish();
        let message = "access service=web client=10.0.0.2:4 path=\"/\" status=200";
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "xdp_proxy::access", "{message}");
        });
        let theirs = String::from_utf8(formatter.0.lock().unwrap().clone()).unwrap();
        let mut ours = String::new();
        let (mut second, mut date) = (u64::MAX, String::new());
        push_time(&mut ours, SystemTime::now(), &mut second, &mut date);
        ours.push_str(ACCESS_HEAD);
        ours.push_str(message);
        ours.push('\n');
        assert_eq!(ours.len(), theirs.len(), "{ours:?} vs {theirs:?}");
        assert_eq!(ours[27..], theirs[27..]);
        assert_eq!(&ours[..11], &theirs[..11], "same day");
        assert_eq!(ours.as_bytes()[26], b'Z');
    }

    #[test]
    fn flag_wins_over_env_and_default_is_info() {
        let f = filter(Some("debug"), Some("error")).unwrap();
        assert_eq!(
            f.max_level_hint(),
            Some(tracing_subscriber::filter::LevelFilter::DEBUG)
        );
        let f = filter(None, Some("warn")).unwrap();
        assert_eq!(
            f.max_level_hint(),
            Some(tracing_subscriber::filter::LevelFilter::WARN)
        );
        let f = filter(None, None).unwrap();
        assert_eq!(
            f.max_level_hint(),
            Some(tracing_subscriber::filter::LevelFilter::INFO)
        );
        let e = filter(Some("xdp_proxy=loud"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("xdp_proxy=loud"), "{e}");
    }

    /// Access lines reach the output in order, many per write, and all of them once the guard
    /// is dropped.
    #[test]
    fn access_writer_batches_and_flushes_on_drop() {
        use std::io::Write as _;
        #[derive(Clone, Default)]
        struct Out(Arc<Mutex<(Vec<u8>, usize)>>);
        impl std::io::Write for Out {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                let mut o = self.0.lock().unwrap();
                o.0.extend_from_slice(b);
                o.1 += 1;
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Out::default();
        let (mut w, guard) = access_writer(out.clone()).unwrap();
        let mut want = String::new();
        for i in 0..1000 {
            let line = format!("access n={i}\n");
            w.write_all(line.as_bytes()).unwrap();
            want.push_str(&line);
        }
        drop(guard);
        let o = out.0.lock().unwrap();
        assert_eq!(String::from_utf8_lossy(&o.0), want);
        assert!(o.1 < 1000, "{} writes for 1000 lines", o.1);
        assert_eq!(access_lines_dropped(), 0);
    }

    /// A `log` record (as aya-log emits for eBPF events) reaches tracing through the bridge.
    #[test]
    fn log_records_reach_tracing() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Seen(Arc<Mutex<Vec<String>>>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Seen {
            fn on_event(
                &self,
                event: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                struct V<'a>(&'a mut String);
                impl tracing::field::Visit for V<'_> {
                    fn record_debug(
                        &mut self,
                        field: &tracing::field::Field,
                        value: &dyn std::fmt::Debug,
                    ) {
                        if field.name() == "message" {
                            self.0.push_str(&format!("{value:?}"));
                        }
                    }
                }
                let mut s = format!("{} ", event.metadata().level());
                event.record(&mut V(&mut s));
                if let Ok(mut v) = self.0.lock() {
                    v.push(s);
                }
            }
        }
        use tracing_subscriber::layer::SubscriberExt as _;
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry().with(seen.clone());
        // The bridge is process-global; this is the only test in this binary installing it.
        tracing_log::LogTracer::init().unwrap();
        tracing::subscriber::with_default(subscriber, || {
            log::warn!(
                "SNAT ports exhausted: 3 new flows dropped since the last such line (latest: \
                 from 10.0.0.1:1234); drop_snat_exhausted counts them all"
            );
        });
        let got = seen.0.lock().unwrap().clone();
        assert!(
            got.iter()
                .any(|l| l.starts_with("WARN") && l.contains("SNAT ports exhausted")),
            "{got:?}"
        );
    }
}
