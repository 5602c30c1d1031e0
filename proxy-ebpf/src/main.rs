//! The xdp-proxy XDP program: L4 full NAT of configured IPv4 and IPv6 TCP/UDP services.
//!
//! The per-packet rules are docs/datapath.md; step numbers in comments refer to it. Layout:
//! `parse` (steps 1-3), `flow` (steps 4-8), `forward` + `nat` (step 9), `stats` (step 10 and
//! the per-packet reason counter), `maps` (every map), `delivery` (tracepoint programs counting
//! frames the kernel failed to transmit after the program sent them). The flow code is generic over the address
//! family (`family::Ip`): one instance for IPv4, one for IPv6.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod acl;
mod delivery;
mod family;
mod flow;
mod forward;
mod icmp;
mod keys;
mod maps;
mod mss;
mod nat;
mod parse;
mod stats;

use aya_ebpf::{bindings::xdp_md, helpers::bpf_ktime_get_ns, macros::xdp, programs::XdpContext};
use proxy_common::{IPPROTO_ICMP, REASON_COUNT, Reason};

use crate::{
    family::Ip,
    forward::{Kind, NextHopCache},
    keys::FlowValueW,
    nat::{Rewrite, RewriteG},
    parse::{IPPROTO_ICMPV6, PacketG, TCP_SYN},
};

#[xdp]
pub fn proxy_xdp(ctx: XdpContext) -> u32 {
    // IPv4 first, as before IPv6 existed; only a frame it finds not IPv4 is looked at again.
    let mut reason = proxy_v4(ctx.ctx);
    if reason == Reason::PassNotIp && parse::is_ipv6(&ctx) {
        reason = proxy_v6(ctx.ctx);
    }
    stats::reason(reason);
    reason.action()
}

/// An IPv4 frame (or any frame: a non-IPv4 one comes back `PassNotIp`). A BPF function of its
/// own so that its stack frame and the IPv6 path's are never added up (the BPF stack limit of
/// 512 bytes covers the deepest call chain).
#[inline(never)]
fn proxy_v4(md: *mut xdp_md) -> Reason {
    let ctx = XdpContext::new(md);
    match try_proxy_v4(&ctx) {
        Ok(reason) | Err(reason) => reason,
    }
}

/// An IPv6 frame (EtherType 0x86DD): docs/datapath.md, "IPv6". Its addresses are four words
/// where IPv4's are one, so its steps do not fit the 512-byte BPF stack in one function: each
/// phase is a BPF function of its own, called one after the other from here (never one inside
/// another), and each parses the packet again (cheap: a few bounds-checked reads).
///
/// The phases are global BPF functions (`extern "C"`, exported): LLVM may not rewrite their
/// signature (it passed `data`/`data_end` instead of the context to a static one, which the
/// verifier refuses), and the verifier checks each once, on its own. They return a `Reason`
/// index, or `STEP_MISS` / `STEP_FORWARD`.
#[inline(always)]
fn proxy_v6(md: *mut xdp_md) -> Reason {
    let mut step = proxy_v6_track(md);
    if step == STEP_ICMP {
        return reason_from(proxy_v6_icmp(md));
    }
    if step == STEP_MISS {
        let created = proxy_v6_create(md);
        if created != STEP_FORWARD {
            return reason_from(created);
        }
        // The new flow: looked up and tracked like any flow packet.
        step = proxy_v6_track(md);
    }
    match step {
        STEP_FORWARD => reason_from(proxy_v6_forward(md)),
        // Gone between insert and lookup (the daemon deleted it): the flow does not exist.
        STEP_MISS => Reason::DropFlowInsertFailed,
        reason => reason_from(reason),
    }
}

/// IPv6 phase results besides a `Reason` index: no flow (create one), or go on (forward).
const STEP_MISS: u32 = 0x100;
const STEP_FORWARD: u32 = 0x101;
/// An ICMPv6 message: `proxy_v6_icmp`.
const STEP_ICMP: u32 = 0x102;

/// The `Reason` with index `n` (`Aborted` for anything else).
#[inline(always)]
fn reason_from(n: u32) -> Reason {
    if n < REASON_COUNT {
        // SAFETY: Reason is repr(u32) with the discriminants 0..REASON_COUNT, every one used
        // (proxy-common asserts ALL has REASON_COUNT entries in index order).
        unsafe { core::mem::transmute::<u32, Reason>(n) }
    } else {
        Reason::Aborted
    }
}

/// Steps 1-5 and 8 of an IPv6 packet (parse, config, lookup, the repair rule, flow state):
/// `STEP_FORWARD`, `STEP_MISS` or the final reason.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn proxy_v6_track(md: *mut xdp_md) -> u32 {
    let ctx = XdpContext::new(md);
    let pkt = match parse::parse6(&ctx) {
        Ok(pkt) => pkt,
        Err(reason) => return reason as u32,
    };
    if pkt.proto == IPPROTO_ICMPV6 {
        return STEP_ICMP;
    }
    if let Err(reason) = flow::config() {
        return reason as u32;
    }
    let key = pkt.flow_key();
    let Some(entry) = flow::lookup(&key) else {
        return STEP_MISS;
    };
    if pkt.invalid_udp_check() {
        return Reason::DropUdpZeroChecksum as u32;
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: entry was just returned by a flow table lookup.
    if unsafe { recheck_reverse(entry, &pkt, now) }
        // SAFETY: as above.
        && let Err(reason) = unsafe { flow::ensure_reverse(&pkt, &key, entry, now) }
    {
        return reason as u32;
    }
    // SAFETY: as above.
    unsafe { flow::track(entry, &pkt, now) };
    STEP_FORWARD
}

/// Steps 6-7 of an IPv6 packet without a flow: `STEP_FORWARD` when its flow was created, else
/// the packet's final reason.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn proxy_v6_create(md: *mut xdp_md) -> u32 {
    let ctx = XdpContext::new(md);
    let pkt = match parse::parse6(&ctx) {
        Ok(pkt) => pkt,
        Err(reason) => return reason as u32,
    };
    let cfg = match flow::config_ref() {
        Ok(cfg) => cfg,
        Err(reason) => return reason as u32,
    };
    let key = pkt.flow_key();
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    match flow::create(&ctx, &pkt, &key, cfg, now) {
        Ok(_) => STEP_FORWARD,
        Err(reason) => reason as u32,
    }
}

/// An ICMPv6 message (docs/datapath.md, "ICMPv6 errors"): translated when it is an error
/// quoting one of our flows, else passed. Flow entries and traffic counters are not touched.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn proxy_v6_icmp(md: *mut xdp_md) -> u32 {
    let ctx = XdpContext::new(md);
    match icmp_error6(&ctx) {
        Ok(reason) | Err(reason) => reason as u32,
    }
}

#[inline(always)]
fn icmp_error6(ctx: &XdpContext) -> Result<Reason, Reason> {
    let pkt = parse::parse6(ctx)?;
    let quote = icmp::quote6(ctx, &pkt)?;
    flow::config()?;
    let entry = flow::lookup(&quote.answer_key()).ok_or(Reason::PassNotService)?;
    // SAFETY: a flow table value pointer; copied out at once.
    let e = unsafe { &*entry };
    let rw = RewriteG {
        src: e.new_src,
        dst: e.new_dst,
        sport: e.new_sport,
        dport: e.new_dport,
        mss: 0,
    };
    forward::forward(ctx, &pkt, &rw, Kind::IcmpError, None)
}

/// Steps 9-10 of a tracked IPv6 flow packet: the final reason.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn proxy_v6_forward(md: *mut xdp_md) -> u32 {
    let ctx = XdpContext::new(md);
    let pkt = match parse::parse6(&ctx) {
        Ok(pkt) => pkt,
        Err(reason) => return reason as u32,
    };
    let Some(entry) = flow::lookup(&pkt.flow_key()) else {
        return Reason::DropFlowInsertFailed as u32;
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: entry was just returned by a flow table lookup.
    match unsafe { forward_flow(&ctx, &pkt, entry, now) } {
        Ok(reason) | Err(reason) => reason as u32,
    }
}

/// One IPv4 packet, start to verdict. `Ok` and `Err` both carry the packet's one final reason;
/// `Err` marks an early exit.
#[inline(always)]
fn try_proxy_v4(ctx: &XdpContext) -> Result<Reason, Reason> {
    let pkt = parse::parse(ctx)?;
    if pkt.proto == IPPROTO_ICMP {
        return icmp_error(ctx, &pkt);
    }
    let cfg = flow::config_ref()?;

    let key = pkt.flow_key();
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let entry = match flow::lookup(&key) {
        Some(entry) => {
            // SAFETY: entry was just returned by a flow table lookup.
            if unsafe { recheck_reverse(entry, &pkt, now) } {
                // SAFETY: as above.
                unsafe { flow::ensure_reverse(&pkt, &key, entry, now) }?;
            }
            entry
        }
        None => flow::create(ctx, &pkt, &key, cfg, now)?,
    };
    // SAFETY: entry was just returned by a flow table lookup.
    unsafe { flow::track(entry, &pkt, now) };
    // SAFETY: as above.
    unsafe { forward_flow(ctx, &pkt, entry, now) }
}

/// Step 5's repair rule runs for a forward hit when the entry's next hop is revalidated (its
/// cache is older than `NEXT_HOP_VALID_NS`, or empty) and on every TCP SYN; in between, the
/// reverse entry checked at the last revalidation is taken as still there.
///
/// # Safety
/// `entry` must be a value pointer returned by a lookup in `XP_FLOWS_FWD`/`XP_FLOWS_REV`.
#[inline(always)]
unsafe fn recheck_reverse<A: Ip>(entry: *mut FlowValueW, pkt: &PacketG<A>, now: u64) -> bool {
    // SAFETY: the caller's contract.
    (pkt.is_tcp() && pkt.tcp_flags & TCP_SYN != 0) || unsafe { forward::revalidate(entry, now) }
}

/// Steps 9-10 for a packet of family `A` with flow entry `entry` (already tracked).
///
/// # Safety
/// `entry` must be a value pointer returned by a lookup in `XP_FLOWS_FWD`/`XP_FLOWS_REV`.
#[inline(always)]
unsafe fn forward_flow<A: Ip>(
    ctx: &XdpContext,
    pkt: &PacketG<A>,
    entry: *mut FlowValueW,
    now: u64,
) -> Result<Reason, Reason> {
    // SAFETY: entry is a flow table value pointer (the caller's contract); copied out once.
    let e = unsafe { &*entry };
    let rw = RewriteG {
        src: A::from_words(&e.new_src),
        dst: A::from_words(&e.new_dst),
        sport: e.new_sport,
        dport: e.new_dport,
        mss: 0,
    };
    let (direction, service_id, upstream_id) = (e.direction, e.service_id, e.upstream_id);
    let mut rw = rw;
    if pkt.is_tcp() && pkt.tcp_flags & TCP_SYN != 0 {
        rw.mss = flow::mss_clamp(service_id);
    }

    let reason = forward::forward(
        ctx,
        pkt,
        &rw,
        Kind::Flow(direction),
        Some(NextHopCache { entry, now }),
    )?;
    stats::traffic(service_id, upstream_id, direction, u64::from(pkt.tot_len));
    Ok(reason)
}

/// An ICMP packet: translated when it is an error quoting one of our flows (docs/datapath.md,
/// "ICMP errors"), else passed. Flow entries and traffic counters are not touched.
#[inline(always)]
fn icmp_error(ctx: &XdpContext, pkt: &parse::Packet) -> Result<Reason, Reason> {
    let quote = icmp::quote(ctx, pkt)?;
    flow::config()?;
    let entry = flow::lookup(&quote.answer_key()).ok_or(Reason::PassNotService)?;
    // SAFETY: a flow table value pointer; copied out at once.
    let e = unsafe { &*entry };
    let rw = Rewrite {
        src: e.new_src[0],
        dst: e.new_dst[0],
        sport: e.new_sport,
        dport: e.new_dport,
        mss: 0,
    };
    forward::forward(ctx, pkt, &rw, Kind::IcmpError, None)
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
