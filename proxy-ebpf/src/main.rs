//! The xdp-proxy XDP program: L4 full NAT of configured IPv4 TCP/UDP services.
//!
//! The per-packet rules are docs/datapath.md; step numbers in comments refer to it. Layout:
//! `parse` (steps 1-3), `flow` (steps 4-8), `forward` + `nat` (step 9), `stats` (step 10 and
//! the per-packet reason counter), `maps` (every map).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod acl;
mod flow;
mod forward;
mod icmp;
mod keys;
mod maps;
mod mss;
mod nat;
mod parse;
mod stats;

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::xdp, programs::XdpContext};
use proxy_common::{IPPROTO_ICMP, Reason};

use crate::{forward::Kind, nat::Rewrite, parse::TCP_SYN};

#[xdp]
pub fn proxy_xdp(ctx: XdpContext) -> u32 {
    let reason = match try_proxy_xdp(&ctx) {
        Ok(reason) | Err(reason) => reason,
    };
    stats::reason(reason);
    reason.action()
}

/// One packet, start to verdict. `Ok` and `Err` both carry the packet's one final reason; `Err`
/// marks an early exit.
#[inline(always)]
fn try_proxy_xdp(ctx: &XdpContext) -> Result<Reason, Reason> {
    let pkt = parse::parse(ctx)?;
    if pkt.proto == IPPROTO_ICMP {
        return icmp_error(ctx, &pkt);
    }
    let cfg = flow::config()?;

    let key = pkt.flow_key();
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let entry = match flow::lookup(&key) {
        Some(entry) => {
            // SAFETY: entry was just returned by a flow table lookup.
            unsafe { flow::ensure_reverse(&pkt, &key, entry, now) }?;
            entry
        }
        None => flow::create(ctx, &pkt, &key, &cfg, now)?,
    };
    // SAFETY: entry was just returned by a flow table lookup.
    unsafe { flow::track(entry, &pkt, now) };

    // SAFETY: entry is a flow table value pointer (see flow::track); copied out once.
    let e = unsafe { &*entry };
    let rw = Rewrite {
        src: e.new_src[0],
        dst: e.new_dst[0],
        sport: e.new_sport,
        dport: e.new_dport,
        mss: 0,
    };
    let (direction, service_id, upstream_id) = (e.direction, e.service_id, e.upstream_id);
    let mut rw = rw;
    if pkt.is_tcp() && pkt.tcp_flags & TCP_SYN != 0 {
        rw.mss = flow::mss_clamp(service_id);
    }

    let reason = forward::forward(ctx, &pkt, &rw, Kind::Flow(direction))?;
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
    forward::forward(ctx, pkt, &rw, Kind::IcmpError)
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
