//! Step 9: TTL (hop limit) check, FIB lookup (AF_INET or AF_INET6), rewrite, then XDP_TX, XDP_REDIRECT through `XP_DEVMAP`, or a
//! pass to the kernel (already rewritten) when the next hop is not ready or the route leaves
//! through an interface outside the devmap.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::generated::bpf_fib_lookup as fib_lookup_helper,
    programs::XdpContext,
};
use proxy_common::{FLOW_DIR_FORWARD, NEXT_HOP_VALID_NS, Reason};

use crate::{
    family::Ip,
    keys::FlowValueW,
    maps::XP_DEVMAP,
    nat::RewriteG,
    parse::{PacketG, ptr_at},
};

/// A flow entry whose next-hop cache (`FlowValue::nh_*`) step 9 uses and refreshes, and the
/// packet's `bpf_ktime_get_ns()`. `entry` must be a value pointer returned by a lookup in
/// `XP_FLOWS_FWD`/`XP_FLOWS_REV`.
#[derive(Clone, Copy)]
pub struct NextHopCache {
    pub entry: *mut FlowValueW,
    pub now: u64,
}

/// What is being forwarded: a packet of a flow (its entry's `FLOW_DIR_*`), or an ICMP error
/// translated with the entry its quote answers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Flow(u8),
    IcmpError,
}

/// Forward (or pass) a packet of family `A` whose flow entry matched. `kind` picks the rewrite
/// and the `Fwd*`/`Rev*`/`Icmp*` reasons. `pkt.ttl` is the IPv6 hop limit for IPv6.
#[inline(always)]
pub fn forward<A: Ip>(
    ctx: &XdpContext,
    pkt: &PacketG<A>,
    rw: &RewriteG<A>,
    kind: Kind,
    cache: Option<NextHopCache>,
) -> Result<Reason, Reason> {
    if pkt.ttl <= 1 {
        return Err(Reason::DropTtlExceeded);
    }
    if let Kind::Flow(_) = kind
        && rw.mss != 0
    {
        A::mss_clamp(ctx, rw.mss);
    }
    let ingress = ctx.ingress_ifindex() as u32;

    if let Some(c) = cache {
        // SAFETY: a flow table value pointer (NextHopCache's contract); copied out at once.
        let e = unsafe { &*c.entry };
        // A cached next hop is always the ingress interface or one in the devmap: an egress
        // outside it is never cached (below), so this path needs no devmap lookup.
        if next_hop_fresh(e, c.now, pkt.tot_len) {
            let (ifindex, dmac, smac) = (e.nh_ifindex, e.nh_dmac, e.nh_smac);
            A::rewrite(ctx, pkt, rw, kind, true)?;
            return transmit(ctx, kind, ingress, ifindex, &dmac, &smac);
        }
    }

    // SAFETY: bpf_fib_lookup is a plain C struct of integers; all-zero is a valid value.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    A::fib(&mut params, rw.src, rw.dst);
    params.l4_protocol = pkt.proto;
    if let Kind::Flow(_) = kind {
        params.sport = rw.sport;
        params.dport = rw.dport;
    }
    params.__bindgen_anon_1.tot_len = pkt.tot_len;
    params.ifindex = ingress;
    // SAFETY: ctx is the program's context; params is a stack struct of the size passed.
    let rc = unsafe {
        fib_lookup_helper(
            ctx.as_ptr(),
            &raw mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };

    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        // Not forwardable from here: hand the rewritten packet to the kernel (TTL untouched:
        // the kernel decrements it when it forwards).
        A::rewrite(ctx, pkt, rw, kind, false)?;
        return Ok(if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
            Reason::PassNoNeigh
        } else {
            Reason::PassFibFailed
        });
    }

    if params.ifindex != ingress && XP_DEVMAP.get_ifindex(params.ifindex).is_none() {
        // The route leaves through an interface the daemon does not run (not in the devmap):
        // no redirect is possible there. Hand the rewritten packet to the kernel (TTL and MACs
        // untouched: it forwards it by its own routing, and decrements the TTL itself). Its
        // source is the SNAT address, which the kernel accepts on a datapath interface
        // (`accept_local`, set by the daemon). Not cached: every packet of such a flow takes
        // this lookup, so one whose route moves back onto a datapath interface follows it.
        A::rewrite(ctx, pkt, rw, kind, false)?;
        return Ok(Reason::PassOutsideDevmap);
    }

    if let Some(c) = cache {
        // SAFETY: a flow table value pointer (NextHopCache's contract). LRU hash values are
        // preallocated, so the memory stays valid even if the entry is evicted meanwhile. Two
        // CPUs refreshing at once write the same lookup's result; the time is written last.
        let e = unsafe { &mut *c.entry };
        let len = if c.now.saturating_sub(e.nh_checked_ns) < NEXT_HOP_VALID_NS
            && e.nh_ifindex == params.ifindex
            && e.nh_len > pkt.tot_len
        {
            // Still fresh, only this packet was longer: keep the larger length.
            e.nh_len
        } else {
            pkt.tot_len
        };
        e.nh_ifindex = params.ifindex;
        e.nh_dmac = params.dmac;
        e.nh_smac = params.smac;
        e.nh_len = len;
        e.nh_checked_ns = c.now;
    }
    A::rewrite(ctx, pkt, rw, kind, true)?;
    transmit(
        ctx,
        kind,
        ingress,
        params.ifindex,
        &params.dmac,
        &params.smac,
    )
}

/// A flow entry whose cached next hop (`nh_*`) may be used for this packet: the last lookup is
/// younger than `NEXT_HOP_VALID_NS` and accepted a packet at least as long as this one. A time
/// ahead of `now` (another CPU's clock read a moment later) counts as age 0.
#[inline(always)]
fn next_hop_fresh(e: &FlowValueW, now: u64, tot_len: u16) -> bool {
    e.nh_checked_ns != 0
        && now.saturating_sub(e.nh_checked_ns) < NEXT_HOP_VALID_NS
        && tot_len <= e.nh_len
}

/// Whether the flow entry's next hop must be looked up again (and the repair rule of step 5
/// checked again) for this packet.
///
/// # Safety
/// `entry` must be a value pointer returned by a lookup in `XP_FLOWS_FWD`/`XP_FLOWS_REV`.
#[inline(always)]
pub unsafe fn revalidate(entry: *const FlowValueW, now: u64) -> bool {
    // SAFETY: the caller's contract; one field read.
    let checked = unsafe { (*entry).nh_checked_ns };
    checked == 0 || now.saturating_sub(checked) >= NEXT_HOP_VALID_NS
}

/// Set the Ethernet addresses, then XDP_TX (egress == ingress) or a devmap redirect.
#[inline(always)]
fn transmit(
    ctx: &XdpContext,
    kind: Kind,
    ingress: u32,
    egress: u32,
    dmac: &[u8; 6],
    smac: &[u8; 6],
) -> Result<Reason, Reason> {
    let eth: *mut [u8; 12] = ptr_at(ctx, 0).ok_or(Reason::DropTruncated)?;
    // SAFETY: ptr_at checked data + 12 <= data_end; byte array, no alignment needed.
    let eth = unsafe { &mut *eth };
    eth[..6].copy_from_slice(dmac);
    eth[6..].copy_from_slice(smac);

    let (tx, redirect) = match kind {
        Kind::Flow(FLOW_DIR_FORWARD) => (Reason::FwdTx, Reason::FwdRedirect),
        Kind::Flow(_) => (Reason::RevTx, Reason::RevRedirect),
        Kind::IcmpError => (Reason::IcmpTx, Reason::IcmpRedirect),
    };
    if egress == ingress {
        return Ok(tx);
    }
    match XP_DEVMAP.redirect(egress, 0) {
        Ok(_) => Ok(redirect),
        Err(_) => Err(Reason::DropRedirectFailed),
    }
}
