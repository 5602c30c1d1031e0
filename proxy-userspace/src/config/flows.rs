//! `[flows]`: how long the daemon keeps an idle fast-path flow, by protocol and TCP state
//! (docs/datapath.md, "Lifetimes"). Reloadable: expiry is the daemon's, so a SIGHUP applies new
//! lifetimes at the next expiry scan, to existing flows too (they are idle times, not deadlines).

use std::time::Duration;

use serde::Deserialize;

use super::{Problem, parse_duration};
use crate::flows::Lifetimes;

/// `[flows]` as written: every key optional, a duration (seconds or "500ms", "2s", "1m", "1h").
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFlows {
    tcp_syn_sent: Option<toml::Value>,
    tcp_syn_received: Option<toml::Value>,
    tcp_established: Option<toml::Value>,
    tcp_half_closed: Option<toml::Value>,
    tcp_time_wait: Option<toml::Value>,
    tcp_close_grace: Option<toml::Value>,
    udp: Option<toml::Value>,
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Accepted range of each key, inclusive. The floor is the expiry scan's 1 s interval (a
/// shorter lifetime could not be honoured); the ceilings keep a typo from pinning SNAT ports
/// for days (established: a week, beyond any idle timeout in front of the proxy).
pub const RANGES: [(&str, Duration, Duration); 7] = [
    ("tcp_syn_sent", secs(1), secs(300)),
    ("tcp_syn_received", secs(1), secs(300)),
    ("tcp_established", secs(10), secs(7 * 86_400)),
    ("tcp_half_closed", secs(1), secs(3600)),
    ("tcp_time_wait", secs(1), secs(600)),
    ("tcp_close_grace", secs(1), secs(120)),
    ("udp", secs(1), secs(86_400)),
];

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_nanos() != 0 {
        format!("{}ms", d.as_millis())
    } else if s >= 3600 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// Validate `[flows]`; a key with a problem keeps its default (the problem is reported).
pub(super) fn convert_flows(raw: RawFlows, problems: &mut Vec<Problem>) -> Lifetimes {
    let d = Lifetimes::default();
    let values = [
        (raw.tcp_syn_sent, d.tcp_syn_sent),
        (raw.tcp_syn_received, d.tcp_syn_received),
        (raw.tcp_established, d.tcp_established),
        (raw.tcp_half_closed, d.tcp_half_closed),
        (raw.tcp_time_wait, d.tcp_time_wait),
        (raw.tcp_close_grace, d.tcp_close_grace),
        (raw.udp, d.udp),
    ];
    let mut out = [Duration::ZERO; 7];
    for (i, ((value, default), (name, min, max))) in values.into_iter().zip(RANGES).enumerate() {
        let key = format!("flows.{name}");
        out[i] = match value.as_ref().map(parse_duration) {
            None => default,
            Some(Ok(v)) if (min..=max).contains(&v) => v,
            Some(Ok(v)) => {
                problems.push(Problem::new(
                    key,
                    format!(
                        "{} is outside the allowed range {} to {} (default {})",
                        human(v),
                        human(min),
                        human(max),
                        human(default)
                    ),
                ));
                default
            }
            Some(Err(m)) => {
                problems.push(Problem::new(key, m));
                default
            }
        };
    }
    let [
        tcp_syn_sent,
        tcp_syn_received,
        tcp_established,
        tcp_half_closed,
        tcp_time_wait,
        tcp_close_grace,
        udp,
    ] = out;
    Lifetimes {
        tcp_syn_sent,
        tcp_syn_received,
        tcp_established,
        tcp_half_closed,
        tcp_time_wait,
        tcp_close_grace,
        udp,
    }
}
