//! Flow lifetimes (docs/datapath.md, "Lifetimes"): the pure decision of when the daemon deletes
//! a flow's two entries, and the peer-key formula shared by both directions.

use std::time::Duration;

use proxy_common::{
    FLOW_F_FIN_CLIENT, FLOW_F_FIN_UPSTREAM, FLOW_F_FIN_UPSTREAM_FIRST, FLOW_F_REPLIED, FLOW_F_RST,
    FLOW_F_SYN_RECEIVED, FlowKey, FlowValue, IPPROTO_TCP,
};

/// A TCP flow's state, from the union of both entries' `FLOW_F_*` flags (docs/datapath.md,
/// "TCP states").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpState {
    /// The client's SYN went out, nothing came back.
    SynSent,
    /// The upstream answered (SYN-ACK), the client has not acknowledged it.
    SynReceived,
    /// Handshake complete, no FIN or RST.
    Established,
    /// One side sent FIN.
    HalfClosed,
    /// FIN both ways, the upstream's first: the upstream is the active closer and holds
    /// TIME_WAIT for the (upstream, SNAT address, SNAT port) 4-tuple, so the SNAT port is held
    /// through the TIME_WAIT period.
    TimeWait,
    /// FIN both ways, the client's first: the upstream closed passively and holds no
    /// TIME_WAIT; the port needs only a short grace.
    Closed,
    /// RST: no TIME_WAIT on either side; a short grace for segments still in flight.
    Reset,
}

impl TcpState {
    /// The state of a flow with `flags`.
    #[must_use]
    pub fn of(flags: u32) -> Self {
        let both_fin = FLOW_F_FIN_CLIENT | FLOW_F_FIN_UPSTREAM;
        if flags & both_fin == both_fin && flags & FLOW_F_FIN_UPSTREAM_FIRST != 0 {
            // Even after a RST: an upstream in TIME_WAIT may keep it (tcp_rfc1337), so the
            // hold is kept whenever the upstream may be there.
            Self::TimeWait
        } else if flags & FLOW_F_RST != 0 {
            Self::Reset
        } else if flags & both_fin == both_fin {
            Self::Closed
        } else if flags & both_fin != 0 {
            Self::HalfClosed
        } else if flags & FLOW_F_SYN_RECEIVED != 0 {
            Self::SynReceived
        } else if flags & FLOW_F_REPLIED != 0 {
            Self::Established
        } else {
            Self::SynSent
        }
    }
}

/// How long a flow may stay idle, by protocol and state (`[flows]` in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    /// TCP SYN sent, no reply (conntrack: SYN_SENT 120 s; Cilium: 60 s).
    pub tcp_syn_sent: Duration,
    /// TCP SYN-ACK seen, the client's ACK not yet (conntrack: SYN_RECV 60 s).
    pub tcp_syn_received: Duration,
    /// TCP established (handshake complete, no FIN/RST).
    pub tcp_established: Duration,
    /// TCP after a FIN from one side.
    pub tcp_half_closed: Duration,
    /// TCP after FIN both ways when the upstream closed first: the TIME_WAIT hold of the SNAT
    /// port.
    pub tcp_time_wait: Duration,
    /// TCP after RST, or after FIN both ways when the client closed first (no TIME_WAIT on the
    /// upstream): a short grace for segments still in flight.
    pub tcp_close_grace: Duration,
    /// UDP (and anything else).
    pub udp: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            tcp_syn_sent: Duration::from_secs(30),
            tcp_syn_received: Duration::from_secs(30),
            tcp_established: Duration::from_secs(3600),
            tcp_half_closed: Duration::from_secs(120),
            tcp_time_wait: Duration::from_secs(60),
            tcp_close_grace: Duration::from_secs(5),
            udp: Duration::from_secs(60),
        }
    }
}

impl Lifetimes {
    /// The idle lifetime of a flow with `flags` (the union of both entries' flags).
    #[must_use]
    pub fn for_flow(&self, proto: u8, flags: u32) -> Duration {
        if proto != IPPROTO_TCP {
            return self.udp;
        }
        match TcpState::of(flags) {
            TcpState::SynSent => self.tcp_syn_sent,
            TcpState::SynReceived => self.tcp_syn_received,
            TcpState::Established => self.tcp_established,
            TcpState::HalfClosed => self.tcp_half_closed,
            TcpState::TimeWait => self.tcp_time_wait,
            TcpState::Closed | TcpState::Reset => self.tcp_close_grace,
        }
    }
}

/// The key of a flow entry's peer: `(new_dst -> new_src, new_dport -> new_sport)` of its value.
/// The same formula gives the reverse key from a forward value and the forward key from a
/// reverse value.
#[must_use]
pub fn peer_key(key: &FlowKey, value: &FlowValue) -> FlowKey {
    FlowKey {
        src_addr: value.new_dst_addr,
        dst_addr: value.new_src_addr,
        src_port: value.new_dst_port,
        dst_port: value.new_src_port,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    }
}

/// What the expiry scan does with one flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Keep,
    /// Delete both entries.
    Expire,
}

/// Decide for a flow from its entry and, when present, its peer entry. The flow's idle time
/// counts from the later of the two `last_seen_ns`; its state is the union of both entries'
/// flags. `now_ns` is CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
#[must_use]
pub fn decide(
    key: &FlowKey,
    entry: &FlowValue,
    peer: Option<&FlowValue>,
    now_ns: u64,
    lifetimes: &Lifetimes,
) -> Decision {
    let (last_seen, flags) = match peer {
        Some(p) => (
            entry.last_seen_ns.max(p.last_seen_ns),
            entry.flags | p.flags,
        ),
        None => (entry.last_seen_ns, entry.flags),
    };
    // A last_seen after `now` (read race with the datapath) counts as idle for 0 ns.
    let idle = now_ns.saturating_sub(last_seen);
    let limit = u64::try_from(lifetimes.for_flow(key.proto, flags).as_nanos()).unwrap_or(u64::MAX);
    if idle > limit {
        Decision::Expire
    } else {
        Decision::Keep
    }
}

#[cfg(test)]
mod tests {
    use proxy_common::{FAMILY_IPV4, FLOW_DIR_FORWARD, IPPROTO_UDP, addr_v4};

    use super::*;

    const S: u64 = 1_000_000_000;

    fn key(proto: u8) -> FlowKey {
        FlowKey {
            src_addr: addr_v4([10, 0, 0, 1]),
            dst_addr: addr_v4([10, 10, 1, 1]),
            src_port: 40000u16.to_be_bytes(),
            dst_port: 80u16.to_be_bytes(),
            proto,
            family: FAMILY_IPV4,
            _pad: [0; 2],
        }
    }

    fn value(flags: u32, last_seen_ns: u64) -> FlowValue {
        FlowValue {
            new_src_addr: addr_v4([10, 20, 1, 1]),
            new_dst_addr: addr_v4([10, 20, 1, 2]),
            new_src_port: 12000u16.to_be_bytes(),
            new_dst_port: 8080u16.to_be_bytes(),
            direction: FLOW_DIR_FORWARD,
            flags,
            service_id: 1,
            upstream_id: 1,
            created_ns: 0,
            last_seen_ns,
            ..FlowValue::default()
        }
    }

    fn expires_after(proto: u8, flags: u32) -> u64 {
        let l = Lifetimes::default();
        let k = key(proto);
        let now = 10_000 * S;
        // Find the idle second at which it flips from Keep to Expire.
        let mut secs = 0;
        while secs < 5000 {
            if decide(&k, &value(flags, now - secs * S - 1), None, now, &l) == Decision::Expire {
                return secs;
            }
            secs += 1;
        }
        panic!("never expires");
    }

    #[test]
    fn lifetimes_by_protocol_and_state() {
        let syn_rcvd = FLOW_F_REPLIED | FLOW_F_SYN_RECEIVED;
        // SYN sent, nothing back.
        assert_eq!(expires_after(IPPROTO_TCP, 0), 30);
        // SYN-ACK seen, the client's ACK not (a SYN flood that drops the SYN-ACKs): 30 s, not
        // the established hour.
        assert_eq!(expires_after(IPPROTO_TCP, syn_rcvd), 30);
        assert_eq!(expires_after(IPPROTO_TCP, FLOW_F_REPLIED), 3600);
        assert_eq!(
            expires_after(IPPROTO_TCP, FLOW_F_REPLIED | FLOW_F_FIN_CLIENT),
            120
        );
        assert_eq!(
            expires_after(IPPROTO_TCP, FLOW_F_REPLIED | FLOW_F_FIN_UPSTREAM),
            120
        );
        // FIN both ways: the TIME_WAIT hold only when the upstream closed first (it is the
        // active closer and holds TIME_WAIT); the client first: the short grace.
        let both = FLOW_F_FIN_CLIENT | FLOW_F_FIN_UPSTREAM;
        assert_eq!(
            expires_after(
                IPPROTO_TCP,
                FLOW_F_REPLIED | both | FLOW_F_FIN_UPSTREAM_FIRST
            ),
            60
        );
        assert_eq!(expires_after(IPPROTO_TCP, FLOW_F_REPLIED | both), 5);
        // Half-closed by the upstream: still half-closed, whoever is first.
        assert_eq!(
            expires_after(
                IPPROTO_TCP,
                FLOW_F_REPLIED | FLOW_F_FIN_UPSTREAM | FLOW_F_FIN_UPSTREAM_FIRST
            ),
            120
        );
        // A RST after the upstream's TIME_WAIT began keeps the hold.
        assert_eq!(
            expires_after(
                IPPROTO_TCP,
                FLOW_F_REPLIED | both | FLOW_F_FIN_UPSTREAM_FIRST | FLOW_F_RST
            ),
            60
        );
        // RST: a short grace, in any state.
        assert_eq!(expires_after(IPPROTO_TCP, FLOW_F_RST), 5);
        assert_eq!(expires_after(IPPROTO_TCP, syn_rcvd | FLOW_F_RST), 5);
        assert_eq!(
            expires_after(IPPROTO_TCP, FLOW_F_REPLIED | FLOW_F_RST | FLOW_F_FIN_CLIENT),
            5
        );
        assert_eq!(expires_after(IPPROTO_UDP, 0), 60);
        assert_eq!(expires_after(IPPROTO_UDP, FLOW_F_REPLIED), 60);
    }

    #[test]
    fn every_state_has_its_own_lifetime() {
        let l = Lifetimes {
            tcp_syn_sent: Duration::from_secs(1),
            tcp_syn_received: Duration::from_secs(2),
            tcp_established: Duration::from_secs(3),
            tcp_half_closed: Duration::from_secs(4),
            tcp_time_wait: Duration::from_secs(5),
            tcp_close_grace: Duration::from_secs(6),
            udp: Duration::from_secs(7),
        };
        let both = FLOW_F_FIN_CLIENT | FLOW_F_FIN_UPSTREAM;
        for (flags, state, secs) in [
            (0, TcpState::SynSent, 1),
            (
                FLOW_F_REPLIED | FLOW_F_SYN_RECEIVED,
                TcpState::SynReceived,
                2,
            ),
            (FLOW_F_REPLIED, TcpState::Established, 3),
            (
                FLOW_F_REPLIED | FLOW_F_FIN_UPSTREAM,
                TcpState::HalfClosed,
                4,
            ),
            (
                FLOW_F_REPLIED | both | FLOW_F_FIN_UPSTREAM_FIRST,
                TcpState::TimeWait,
                5,
            ),
            (FLOW_F_REPLIED | both, TcpState::Closed, 6),
            (FLOW_F_REPLIED | FLOW_F_RST, TcpState::Reset, 6),
        ] {
            assert_eq!(TcpState::of(flags), state, "flags {flags:#x}");
            assert_eq!(
                l.for_flow(IPPROTO_TCP, flags),
                Duration::from_secs(secs),
                "{state:?}"
            );
        }
        assert_eq!(l.for_flow(IPPROTO_UDP, 0), Duration::from_secs(7));
    }

    #[test]
    fn peer_activity_and_flags_count() {
        let l = Lifetimes::default();
        let k = key(IPPROTO_TCP);
        let now = 10_000 * S;
        // Forward idle for 100 s, reply seen 1 s ago: established, kept.
        let fwd = value(FLOW_F_REPLIED, now - 100 * S);
        let rev = value(FLOW_F_REPLIED, now - S);
        assert_eq!(decide(&k, &fwd, Some(&rev), now, &l), Decision::Keep);
        // Forward says half-closed by the client, reverse saw the upstream's FIN first: the
        // union is FIN both ways with the upstream first, the TIME_WAIT hold of 60 s.
        let fwd = value(FLOW_F_REPLIED | FLOW_F_FIN_CLIENT, now - 61 * S);
        let rev = value(
            FLOW_F_FIN_UPSTREAM | FLOW_F_FIN_UPSTREAM_FIRST,
            now - 61 * S,
        );
        assert_eq!(decide(&k, &fwd, Some(&rev), now, &l), Decision::Expire);
        assert_eq!(decide(&k, &fwd, None, now, &l), Decision::Keep);
    }

    #[test]
    fn clock_race_never_expires() {
        let l = Lifetimes::default();
        let k = key(IPPROTO_TCP);
        let v = value(0, 50 * S);
        assert_eq!(decide(&k, &v, None, 10 * S, &l), Decision::Keep);
    }

    #[test]
    fn peer_key_round_trips() {
        let fwd_key = key(IPPROTO_TCP);
        let fwd = value(0, 0);
        let rev_key = peer_key(&fwd_key, &fwd);
        assert_eq!(rev_key.src_addr, addr_v4([10, 20, 1, 2]));
        assert_eq!(rev_key.dst_addr, addr_v4([10, 20, 1, 1]));
        assert_eq!(rev_key.src_port, 8080u16.to_be_bytes());
        assert_eq!(rev_key.dst_port, 12000u16.to_be_bytes());
        // The reverse value rewrites back to (service -> client); its peer is the forward key.
        let rev = FlowValue {
            new_src_addr: fwd_key.dst_addr,
            new_dst_addr: fwd_key.src_addr,
            new_src_port: fwd_key.dst_port,
            new_dst_port: fwd_key.src_port,
            ..fwd
        };
        assert_eq!(peer_key(&rev_key, &rev), fwd_key);
    }
}
