//! Per-CPU counters (no atomics needed: each CPU owns its slot).

use proxy_common::{FLOW_DIR_FORWARD, Reason};

use crate::maps::{XP_REASONS, XP_SVC_STATS, XP_UPS_STATS};

/// Count the packet's final reason: called exactly once per packet, at exit.
#[inline(always)]
pub fn reason(reason: Reason) {
    if let Some(n) = XP_REASONS.get_ptr_mut(reason as u32) {
        // SAFETY: non-null per-CPU array value pointer; this CPU is its only writer.
        unsafe { *n += 1 };
    }
}

/// A flow was created for `service_id` / `upstream_id`.
#[inline(always)]
pub fn new_flow(service_id: u32, upstream_id: u32) {
    if let Some(c) = XP_SVC_STATS.get_ptr_mut(service_id) {
        // SAFETY: non-null per-CPU array value pointer; this CPU is its only writer.
        unsafe { (*c).new_flows += 1 };
    }
    if let Some(c) = XP_UPS_STATS.get_ptr_mut(upstream_id) {
        // SAFETY: as above.
        unsafe { (*c).new_flows += 1 };
    }
}

/// A flow packet of `bytes` (IP length) in `direction` was forwarded or passed.
#[inline(always)]
pub fn traffic(service_id: u32, upstream_id: u32, direction: u8, bytes: u64) {
    let fwd = direction == FLOW_DIR_FORWARD;
    if let Some(c) = XP_SVC_STATS.get_ptr_mut(service_id) {
        // SAFETY: non-null per-CPU array value pointer; this CPU is its only writer.
        let c = unsafe { &mut *c };
        if fwd {
            c.fwd_packets += 1;
            c.fwd_bytes += bytes;
        } else {
            c.rev_packets += 1;
            c.rev_bytes += bytes;
        }
    }
    if let Some(c) = XP_UPS_STATS.get_ptr_mut(upstream_id) {
        // SAFETY: as above.
        let c = unsafe { &mut *c };
        if fwd {
            c.fwd_packets += 1;
            c.fwd_bytes += bytes;
        } else {
            c.rev_packets += 1;
            c.rev_bytes += bytes;
        }
    }
}
