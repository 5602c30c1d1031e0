//! Logging: `tracing` to stderr, filtered by `--log-level` (a tracing filter such as `debug` or
//! `xdp_proxy=debug,info`) or else `RUST_LOG`, default `info`; records of the `log` crate
//! (aya itself, and the XDP program's aya-log records read by `aya_log::EbpfLogger`) are
//! bridged into tracing by `tracing_log::LogTracer`, so eBPF log events appear in the daemon's
//! output with the same filter and format (eBPF records carry the target `proxy_xdp::<module>`,
//! so `xdp_proxy=debug` alone hides them; `xdp_proxy=debug,proxy_xdp=info` keeps them). Plain output (no colours) when stderr is not a
//! terminal (journald, files).

use std::io::IsTerminal as _;

use tracing_log::AsLog as _;
use tracing_subscriber::EnvFilter;

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

/// Install the subscriber and the `log` bridge (once per process).
///
/// # Errors
/// A bad filter, or a subscriber/logger already installed.
pub fn init(cli: Option<&str>) -> Result<(), LoggingError> {
    let env = std::env::var("RUST_LOG").ok();
    let filter = filter(cli, env.as_deref().filter(|s| !s.is_empty()))?;
    let max = filter
        .max_level_hint()
        .unwrap_or(tracing_subscriber::filter::LevelFilter::TRACE);
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .finish();
    tracing::subscriber::set_global_default(subscriber)?;
    tracing_log::LogTracer::builder()
        .with_max_level(max.as_log())
        .init()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
            log::warn!("SNAT ports exhausted: new flow from 10.0.0.1:1234 dropped");
        });
        let got = seen.0.lock().unwrap().clone();
        assert!(
            got.iter()
                .any(|l| l.starts_with("WARN") && l.contains("SNAT ports exhausted")),
            "{got:?}"
        );
    }
}
