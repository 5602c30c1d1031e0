//! Flow tables: lookup (step 5), service match and new flow creation with Maglev upstream choice
//! and SNAT port reservation (steps 6-7), and per-flow TCP state and accounting (step 8).

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns, programs::XdpContext};
use proxy_common::{
    CONFIG_F_READY, FAMILY_IPV6, FLOW_DIR_FORWARD, FLOW_DIR_REPLY, FLOW_F_FIN_CLIENT,
    FLOW_F_FIN_UPSTREAM, FLOW_F_FIN_UPSTREAM_FIRST, FLOW_F_REPLIED, FLOW_F_RST,
    FLOW_F_SYN_RECEIVED, LOG_INTERVAL_NS, MAGLEV_SIZE, MAX_SERVICES, MAX_UPSTREAMS, NatConfig,
    Reason, SERVICE_F_HAS_UPSTREAMS, SNAT_PORT_PROBES, UPSTREAM_F_ACTIVE,
    hash::{SEED_MAGLEV, SEED_SNAT_PORT, flow_hash, snat_probe_offset},
};

use crate::{
    acl,
    family::Ip,
    keys::{FlowKeyW, FlowValueW, ServiceKeyW},
    maps::{
        XP_CONFIG, XP_FLOWS_FWD, XP_FLOWS_REV, XP_LOG_RATE, XP_MAGLEV, XP_SERVICES, XP_SVC_OPTS,
        XP_UPSTREAMS,
    },
    parse::{PacketG, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats,
};

/// Step 4: the datapath settings, once the daemon has marked them ready.
#[inline(always)]
pub fn config() -> Result<NatConfig, Reason> {
    let cfg = *XP_CONFIG.get(0).ok_or(Reason::Aborted)?;
    if cfg.flags & CONFIG_F_READY == 0 {
        return Err(Reason::PassNotReady);
    }
    Ok(cfg)
}

/// Step 4 without a copy: the settings in the map (valid for the whole program run).
#[inline(always)]
pub fn config_ref() -> Result<&'static NatConfig, Reason> {
    let cfg = XP_CONFIG.get(0).ok_or(Reason::Aborted)?;
    if cfg.flags & CONFIG_F_READY == 0 {
        return Err(Reason::PassNotReady);
    }
    Ok(cfg)
}

/// The service's MSS clamp (0: none).
#[inline(always)]
pub fn mss_clamp(service_id: u32) -> u16 {
    XP_SVC_OPTS.get(service_id).map_or(0, |o| o.mss_clamp)
}

/// Step 5: the flow entry this packet belongs to, forward table first, then reverse.
#[inline(always)]
pub fn lookup(key: &FlowKeyW) -> Option<*mut FlowValueW> {
    XP_FLOWS_FWD
        .get_ptr_mut(key.as_key())
        .or_else(|| XP_FLOWS_REV.get_ptr_mut(key.as_key()))
        .map(FlowValueW::from_map)
}

/// Steps 6-7: match a service and create the flow (reverse entry first: it reserves the SNAT
/// port). Returns the new forward entry, which the caller then treats like a lookup hit.
#[inline(always)]
pub fn create<A: Ip>(
    ctx: &XdpContext,
    pkt: &PacketG<A>,
    fwd_key: &FlowKeyW,
    cfg: &NatConfig,
    now: u64,
) -> Result<*mut FlowValueW, Reason> {
    // Step 6: service match.
    let svc_key = if A::FAMILY == FAMILY_IPV6 {
        // The address words from memory (`fwd_key` is the packet's tuple): see `value` below.
        ServiceKeyW {
            addr: fwd_key.dst,
            port: pkt.dport,
            proto: pkt.proto,
            family: A::FAMILY,
        }
    } else {
        ServiceKeyW::new(pkt.dst, pkt.dport, pkt.proto)
    };
    // SAFETY: the value is copied out at once; XP_SERVICES is a preallocated HASH, so the
    // pointer stays valid memory even if the daemon deletes the entry concurrently.
    let Some(svc) = unsafe { XP_SERVICES.get(svc_key.as_key()) }.copied() else {
        return Err(not_a_service::<A>(fwd_key, pkt.dport, cfg));
    };
    if pkt.invalid_udp_check() {
        return Err(Reason::DropUdpZeroChecksum);
    }

    // Step 7: client ACL (every packet of a would-be flow), then a new flow starts with a TCP
    // SYN (not SYN+ACK) or any UDP packet, then the client's new-flow rate.
    let opts = acl::options(svc.id);
    A::acl_check(svc.id, &opts, pkt)?;
    if pkt.is_tcp() && (pkt.tcp_flags & TCP_SYN == 0 || pkt.tcp_flags & TCP_ACK != 0) {
        return Err(Reason::PassMidflowNoFlow);
    }
    if svc.flags & SERVICE_F_HAS_UPSTREAMS == 0 {
        return Err(Reason::PassNoUpstream);
    }
    // IPv4 always has its SNAT address; IPv6 only when the daemon configured one.
    if !A::has_snat(cfg) {
        return Err(Reason::PassNoSnatV6);
    }
    A::rate(svc.id, &opts, pkt, now)?;

    // Maglev: the upstream for this 5-tuple.
    let slot = A::tuple_hash(SEED_MAGLEV, pkt) % MAGLEV_SIZE;
    if svc.id >= MAX_SERVICES {
        // The Maglev index would lie outside the array (or wrap into another service's table).
        return Err(Reason::Aborted);
    }
    let upstream_id = *XP_MAGLEV
        .get(svc.id * MAGLEV_SIZE + slot)
        .ok_or(Reason::Aborted)?;
    if upstream_id == 0 || upstream_id >= MAX_UPSTREAMS {
        return Err(Reason::DropBadUpstream);
    }
    let ups = XP_UPSTREAMS.get(upstream_id).ok_or(Reason::Aborted)?;
    if ups.flags & UPSTREAM_F_ACTIVE == 0 {
        return Err(Reason::DropBadUpstream);
    }
    // An IPv6 flow needs an IPv6 upstream (full NAT keeps the family).
    if A::FAMILY == FAMILY_IPV6 && ups.family != FAMILY_IPV6 {
        return Err(Reason::DropBadUpstream);
    }
    let ups_addr = A::from_addr(&ups.addr);
    let ups_port = u16::from_ne_bytes(ups.port);
    let snat_addr = A::snat(cfg);

    // SNAT port: the client's own port when inside the range, then the flow's sequence of
    // offsets (proxy_common::hash::snat_probe_offset); the first BPF_NOEXIST insert of the
    // reverse entry that succeeds is the reservation.
    let port_min = u32::from(cfg.port_min);
    let port_max = u32::from(cfg.port_max);
    if port_max < port_min {
        // An empty range: no port can be reserved.
        return Err(snat_exhausted(ctx, pkt));
    }
    let span = port_max - port_min + 1;
    if span == 0 {
        return Err(Reason::Aborted); // unreachable (span is 1..=65536); lets LLVM drop a panic
    }
    let snat_hash = A::tuple_hash(SEED_SNAT_PORT, pkt);
    let probes = if span < SNAT_PORT_PROBES {
        span
    } else {
        SNAT_PORT_PROBES
    };

    let mut rev_key = FlowKeyW::new(ups_addr, snat_addr, ups_port, 0, pkt.proto);
    // One value buffer: first the reverse entry, then rewritten into the forward entry.
    let mut value = FlowValueW {
        new_src: pkt.dst.words(),
        new_dst: pkt.src.words(),
        new_sport: pkt.dport,
        new_dport: pkt.sport,
        direction: FLOW_DIR_REPLY,
        pad0: [0; 3],
        flags: 0,
        service_id: svc.id,
        upstream_id,
        pad1: 0,
        created_ns: now,
        last_seen_ns: now,
        packets: 0,
        bytes: 0,
        nh_checked_ns: 0,
        nh_ifindex: 0,
        nh_len: 0,
        nh_dmac: [0; 6],
        nh_smac: [0; 6],
        pad2: [0; 6],
    };
    if A::FAMILY == FAMILY_IPV6 {
        // Four-word addresses are taken from memory, never kept live as 8 scalars (the IPv6
        // path's stack budget).
        value.new_src = fwd_key.dst;
        value.new_dst = fwd_key.src;
    }
    // Port preservation: the client's own source port first, when the range holds it (as
    // conntrack's SNAT does): a client reusing its port then reuses the same upstream 4-tuple,
    // whose TIME_WAIT its own TCP timestamps satisfy.
    let mut reserved = false;
    let client_port = u32::from(u16::from_be(pkt.sport));
    if client_port >= port_min && client_port <= port_max {
        rev_key.dport = pkt.sport;
        reserved = XP_FLOWS_REV
            .insert(rev_key.as_key(), value.as_value(), u64::from(BPF_NOEXIST))
            .is_ok();
    }
    for i in 0..SNAT_PORT_PROBES {
        if reserved {
            break;
        }
        // A volatile read keeps LLVM from rewriting the loop into a countdown from `probes`,
        // whose bound the verifier cannot see: the constant SNAT_PORT_PROBES stays the bound.
        // SAFETY: reads a local variable.
        if i >= unsafe { core::ptr::read_volatile(&raw const probes) } {
            break;
        }
        // The offset is below span: the port is at most port_max.
        let port = (port_min + snat_probe_offset(snat_hash, i, span)) as u16;
        rev_key.dport = u16::from_ne_bytes(port.to_be_bytes());
        if XP_FLOWS_REV
            .insert(rev_key.as_key(), value.as_value(), u64::from(BPF_NOEXIST))
            .is_ok()
        {
            reserved = true;
            break;
        }
    }
    if !reserved {
        return Err(snat_exhausted(ctx, pkt));
    }

    if A::FAMILY == FAMILY_IPV6 {
        // The same words, from memory: four-word addresses kept live across the probe loop
        // would be spilled word by word.
        value.new_src = rev_key.dst;
        value.new_dst = rev_key.src;
    } else {
        value.new_src = snat_addr.words();
        value.new_dst = ups_addr.words();
    }
    value.new_sport = rev_key.dport;
    value.new_dport = ups_port;
    value.direction = FLOW_DIR_FORWARD;
    if XP_FLOWS_FWD
        .insert(fwd_key.as_key(), value.as_value(), u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Roll the reservation back so the port is free again.
        let _ = XP_FLOWS_REV.remove(rev_key.as_key());
        return Err(Reason::DropFlowInsertFailed);
    }
    stats::new_flow(svc.id, upstream_id);
    match XP_FLOWS_FWD.get_ptr_mut(fwd_key.as_key()) {
        Some(entry) => Ok(FlowValueW::from_map(entry)),
        None => {
            // Gone between insert and lookup (the daemon deleted it): the flow does not exist.
            let _ = XP_FLOWS_REV.remove(rev_key.as_key());
            Err(Reason::DropFlowInsertFailed)
        }
    }
}

/// Step 6's miss: a packet to the SNAT address at a port inside the SNAT range is an upstream's
/// segment for a flow that does not exist (expired, evicted, never made, or spoofed):
/// `DropNoFlowSnatPort`. Anything else the proxy does not own: `PassNotService`.
#[inline(always)]
fn not_a_service<A: Ip>(key: &FlowKeyW, dport: u16, cfg: &NatConfig) -> Reason {
    let port = u16::from_be(dport);
    if port >= cfg.port_min
        && port <= cfg.port_max
        && A::has_snat(cfg)
        && A::from_words(&key.dst) == A::snat(cfg)
    {
        Reason::DropNoFlowSnatPort
    } else {
        Reason::PassNotService
    }
}

/// `flow_hash` of the packet's 5-tuple, exactly as the daemon's simulator computes it.
#[inline(always)]
pub fn tuple_hash<A: Ip>(seed: u32, pkt: &PacketG<A>) -> u32 {
    let src = pkt.src.to_addr();
    let dst = pkt.dst.to_addr();
    flow_hash(
        seed,
        &src,
        &dst,
        pkt.sport.to_ne_bytes(),
        pkt.dport.to_ne_bytes(),
        pkt.proto,
    )
}

/// The configured SNAT range is full for this upstream: worth a log line, but not one per
/// packet (a flood of new flows would flood the log ring and the daemon's output). Every drop
/// adds one to `XP_LOG_RATE[0].total`; at most one line per `LOG_INTERVAL_NS` is written,
/// saying how many drops it stands for and the latest one's client. The BPF target has no
/// atomic add in `core`, so CPUs racing here may lose an increment of the line's count, or both
/// write a line in the same instant: the log is approximate under contention, the
/// `DropSnatExhausted` reason counter (per CPU) counts every drop exactly.
#[inline(always)]
fn snat_exhausted<A: Ip>(ctx: &XdpContext, pkt: &PacketG<A>) -> Reason {
    let Some(st) = XP_LOG_RATE.get_ptr_mut(0) else {
        return Reason::DropSnatExhausted;
    };
    // SAFETY: a non-null value pointer of an ARRAY map: valid memory for the program's life.
    let st = unsafe { &mut *st };
    st.total = st.total.wrapping_add(1);
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if st.last_ns != 0 && now.wrapping_sub(st.last_ns) < LOG_INTERVAL_NS {
        return Reason::DropSnatExhausted;
    }
    let dropped = st.total.wrapping_sub(st.logged);
    st.logged = st.total;
    st.last_ns = now;
    if A::FAMILY == FAMILY_IPV6 {
        aya_log_ebpf::warn!(
            ctx,
            "SNAT ports exhausted: {} new flows dropped since the last such line (latest: IPv6, \
             client port {}); drop_snat_exhausted counts them all",
            dropped,
            u16::from_be(pkt.sport)
        );
    } else {
        aya_log_ebpf::warn!(
            ctx,
            "SNAT ports exhausted: {} new flows dropped since the last such line (latest: from \
             {:i}:{}); drop_snat_exhausted counts them all",
            dropped,
            u32::from_be(pkt.src.words()[0]),
            u16::from_be(pkt.sport)
        );
    }
    Reason::DropSnatExhausted
}

/// Step 5, second half: a forward hit whose reverse entry is gone. The two tables are separate
/// LRU maps and each evicts on its own, so a full table can drop one half of a flow; without the
/// reverse entry every reply would miss and the client's retries would keep the forward entry
/// alive: a black hole. The reverse entry is put back with BPF_NOEXIST (the same reservation as
/// at creation). If its SNAT port went to another flow meanwhile (the reverse key exists but
/// leads to another client), the flow cannot be repaired: the forward entry is removed and the
/// packet dropped (`DropFlowInsertFailed`), so the client's next attempt starts a fresh flow.
///
/// # Safety
/// `entry` must be a value pointer returned by a lookup in `XP_FLOWS_FWD`/`XP_FLOWS_REV`.
#[inline(always)]
pub unsafe fn ensure_reverse<A: Ip>(
    pkt: &PacketG<A>,
    key: &FlowKeyW,
    entry: *mut FlowValueW,
    now: u64,
) -> Result<(), Reason> {
    // SAFETY: entry is a live map value pointer (caller contract); copied out at once.
    let e = unsafe { &*entry };
    if e.direction != FLOW_DIR_FORWARD {
        return Ok(());
    }
    let rev_key = FlowKeyW::new(
        A::from_words(&e.new_dst),
        A::from_words(&e.new_src),
        e.new_dport,
        e.new_sport,
        pkt.proto,
    );
    if let Some(rev) = XP_FLOWS_REV.get_ptr(rev_key.as_key()) {
        // SAFETY: non-null value pointer just returned by the map lookup; copied out at once.
        let r = unsafe { &*FlowValueW::from_map(rev.cast_mut()) };
        if A::from_words(&r.new_dst) == pkt.src
            && r.new_dport == pkt.sport
            && A::from_words(&r.new_src) == pkt.dst
        {
            return Ok(());
        }
        // The reverse key now belongs to another flow (its half was evicted and the port
        // reserved again): this flow is gone.
        let _ = XP_FLOWS_FWD.remove(key.as_key());
        return Err(Reason::DropFlowInsertFailed);
    }
    let value = FlowValueW {
        new_src: pkt.dst.words(),
        new_dst: pkt.src.words(),
        new_sport: pkt.dport,
        new_dport: pkt.sport,
        direction: FLOW_DIR_REPLY,
        pad0: [0; 3],
        flags: e.flags,
        service_id: e.service_id,
        upstream_id: e.upstream_id,
        pad1: 0,
        created_ns: e.created_ns,
        last_seen_ns: now,
        packets: 0,
        bytes: 0,
        nh_checked_ns: 0,
        nh_ifindex: 0,
        nh_len: 0,
        nh_dmac: [0; 6],
        nh_smac: [0; 6],
        pad2: [0; 6],
    };
    if XP_FLOWS_REV
        .insert(rev_key.as_key(), value.as_value(), u64::from(BPF_NOEXIST))
        .is_ok()
    {
        return Ok(());
    }
    let _ = XP_FLOWS_FWD.remove(key.as_key());
    Err(Reason::DropFlowInsertFailed)
}

/// Step 8: TCP state flags (kept equal in both entries of a flow) and per-entry accounting.
///
/// # Safety
/// `entry` must be a value pointer returned by a lookup in `XP_FLOWS_FWD`/`XP_FLOWS_REV`.
#[inline(always)]
pub unsafe fn track<A: Ip>(entry: *mut FlowValueW, pkt: &PacketG<A>, now: u64) {
    // SAFETY: entry is a live map value pointer (caller contract); LRU hash values are
    // preallocated, so the memory stays valid even if the entry is evicted meanwhile.
    let e = unsafe { &mut *entry };
    if pkt.is_tcp() {
        let old = e.flags;
        let new = next_flags(old, e.direction, pkt.tcp_flags);
        if new != old {
            e.flags = new;
            let peer_key = FlowKeyW::new(
                A::from_words(&e.new_dst),
                A::from_words(&e.new_src),
                e.new_dport,
                e.new_sport,
                pkt.proto,
            );
            let peer = if e.direction == FLOW_DIR_FORWARD {
                XP_FLOWS_REV.get_ptr_mut(peer_key.as_key())
            } else {
                XP_FLOWS_FWD.get_ptr_mut(peer_key.as_key())
            };
            if let Some(peer) = peer {
                // SAFETY: non-null value pointer just returned by the map lookup.
                unsafe { (*peer).flags = new };
            }
        }
    }
    e.last_seen_ns = now;
    e.packets += 1;
    e.bytes += u64::from(pkt.tot_len);
}

/// The flags of a flow after one more TCP segment matched the entry of direction `dir`
/// (docs/datapath.md, "TCP states"). Sequence numbers are not checked: the states only choose
/// how long the daemon keeps an idle flow, and a client can only reach "established" by
/// acknowledging a reply it received.
#[inline(always)]
fn next_flags(old: u32, dir: u8, tcp: u8) -> u32 {
    let mut new = old;
    let closing = FLOW_F_FIN_CLIENT | FLOW_F_FIN_UPSTREAM | FLOW_F_RST;
    let syn_received = FLOW_F_REPLIED | FLOW_F_SYN_RECEIVED;
    if dir == FLOW_DIR_FORWARD && tcp & TCP_SYN != 0 && tcp & TCP_ACK == 0 && old & closing != 0 {
        // A new connection reusing the client port of a closed one: same upstream and SNAT
        // port, fresh state.
        new = 0;
    }
    if tcp & TCP_RST != 0 {
        new |= FLOW_F_RST;
    }
    if dir == FLOW_DIR_FORWARD {
        // The client's ACK of the SYN-ACK (or its first data after it): established.
        if new & syn_received == syn_received && tcp & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_ACK {
            new &= !FLOW_F_SYN_RECEIVED;
        }
    } else if new & FLOW_F_REPLIED == 0 {
        // The first reply (the SYN-ACK): SYN received.
        new |= syn_received;
    }
    // A FIN counts only on an established flow: a SYN followed by a FIN without a handshake
    // (a flood that never completes one) stays in the short SYN states.
    if tcp & TCP_FIN != 0 && new & syn_received == FLOW_F_REPLIED {
        if dir == FLOW_DIR_FORWARD {
            new |= FLOW_F_FIN_CLIENT;
        } else {
            if new & FLOW_F_FIN_CLIENT == 0 {
                // The upstream closes first: it will hold TIME_WAIT (the active closer).
                new |= FLOW_F_FIN_UPSTREAM_FIRST;
            }
            new |= FLOW_F_FIN_UPSTREAM;
        }
    }
    new
}
