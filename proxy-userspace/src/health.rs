//! Upstream probing. For now it only warms up neighbours: a TCP connect to every upstream at
//! start and every interval makes the kernel resolve each next hop ahead of the first client
//! packet (docs/datapath.md step 9). A later issue turns it into the health checker (rise/fall,
//! Maglev removal); the pure core below already tracks per-upstream results.

use std::{collections::HashMap, net::SocketAddrV4, time::Duration};

use tokio::net::TcpStream;

/// How often and how long the warm-up probes run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSettings {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
        }
    }
}

/// Result of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeResult {
    Connected,
    Failed(String),
}

/// What the tracker knows about an upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Unknown,
    Reachable,
    Unreachable,
}

/// A change worth logging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub upstream: SocketAddrV4,
    pub from: State,
    pub to: State,
}

/// Per-upstream state from probe results (pure).
#[derive(Debug, Default)]
pub struct Tracker {
    states: HashMap<SocketAddrV4, (State, u32)>,
}

impl Tracker {
    /// Record a result; returns the transition when the state changed.
    pub fn record(&mut self, upstream: SocketAddrV4, result: &ProbeResult) -> Option<Transition> {
        let to = match result {
            ProbeResult::Connected => State::Reachable,
            ProbeResult::Failed(_) => State::Unreachable,
        };
        let entry = self.states.entry(upstream).or_insert((State::Unknown, 0));
        let from = entry.0;
        if from == to {
            entry.1 = entry.1.saturating_add(1);
            None
        } else {
            *entry = (to, 1);
            Some(Transition { upstream, from, to })
        }
    }

    /// Current state and how many consecutive probes agreed.
    #[must_use]
    pub fn state(&self, upstream: SocketAddrV4) -> (State, u32) {
        self.states
            .get(&upstream)
            .copied()
            .unwrap_or((State::Unknown, 0))
    }
}

/// The distinct upstreams to probe, in order.
#[must_use]
pub fn targets<'a>(upstreams: impl IntoIterator<Item = &'a SocketAddrV4>) -> Vec<SocketAddrV4> {
    let mut out = Vec::new();
    for u in upstreams {
        if !out.contains(u) {
            out.push(*u);
        }
    }
    out
}

/// One TCP connect with a timeout; the connection is closed at once.
pub async fn probe(upstream: SocketAddrV4, timeout: Duration) -> ProbeResult {
    match tokio::time::timeout(timeout, TcpStream::connect(upstream)).await {
        Ok(Ok(_stream)) => ProbeResult::Connected,
        Ok(Err(e)) => ProbeResult::Failed(e.to_string()),
        Err(_) => ProbeResult::Failed(format!("no answer within {timeout:?}")),
    }
}

/// Probe every target once, concurrently, and record the results (logged at debug).
pub async fn probe_all(targets: &[SocketAddrV4], timeout: Duration, tracker: &mut Tracker) {
    let mut set = tokio::task::JoinSet::new();
    for t in targets {
        let t = *t;
        set.spawn(async move { (t, probe(t, timeout).await) });
    }
    while let Some(done) = set.join_next().await {
        let Ok((upstream, result)) = done else {
            continue;
        };
        match &result {
            ProbeResult::Connected => tracing::debug!(%upstream, "warm-up connect: connected"),
            ProbeResult::Failed(e) => {
                tracing::debug!(%upstream, error = %e, "warm-up connect failed")
            }
        }
        if let Some(t) = tracker.record(upstream, &result) {
            tracing::debug!(upstream = %t.upstream, from = ?t.from, to = ?t.to, "upstream state changed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_reports_transitions_only() {
        let a: SocketAddrV4 = "10.20.1.2:80".parse().unwrap();
        let mut t = Tracker::default();
        assert_eq!(t.state(a), (State::Unknown, 0));
        let tr = t.record(a, &ProbeResult::Connected).unwrap();
        assert_eq!((tr.from, tr.to), (State::Unknown, State::Reachable));
        assert_eq!(t.record(a, &ProbeResult::Connected), None);
        assert_eq!(t.state(a), (State::Reachable, 2));
        let tr = t.record(a, &ProbeResult::Failed("refused".into())).unwrap();
        assert_eq!((tr.from, tr.to), (State::Reachable, State::Unreachable));
        assert_eq!(t.state(a), (State::Unreachable, 1));
    }

    #[test]
    fn targets_are_distinct_in_order() {
        let a: SocketAddrV4 = "10.20.1.2:80".parse().unwrap();
        let b: SocketAddrV4 = "10.20.1.3:80".parse().unwrap();
        assert_eq!(targets(&[a, b, a]), [a, b]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn probe_connects_and_fails_on_loopback() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let std::net::SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            panic!("v4 expected")
        };
        assert_eq!(
            probe(addr, Duration::from_secs(1)).await,
            ProbeResult::Connected
        );
        drop(listener);
        let r = probe(addr, Duration::from_secs(1)).await;
        assert!(matches!(r, ProbeResult::Failed(_)), "{r:?}");
    }
}
