//! Client admission for new flows (docs/datapath.md step 7): per-service allow and deny lists
//! (LPM tries keyed by service id, family and address prefix) and a per-(service, client)
//! new-flow token bucket.

use aya_ebpf::maps::lpm_trie::Key;
use proxy_common::{
    ACL_PREFIX_BASE, AclKey, RATE_TOKEN, RateKey, RateState, Reason, SVC_OPT_F_ALLOW_LIST,
    ServiceOptions,
};

use crate::{
    family::Ip,
    maps::{XP_ACL_ALLOW, XP_ACL_DENY, XP_RATE, XP_SVC_OPTS},
    parse::PacketG,
};

/// The service's options (all zero when unset or the id is out of range).
#[inline(always)]
pub fn options(service_id: u32) -> ServiceOptions {
    XP_SVC_OPTS
        .get(service_id)
        .copied()
        .unwrap_or(ServiceOptions {
            mss_clamp: 0,
            _pad0: 0,
            flags: 0,
            new_flow_rate: 0,
            new_flow_burst: 0,
        })
}

/// Deny list first (a hit drops), then the allow list when the service has one (a miss drops).
#[inline(always)]
pub fn check<A: Ip>(
    service_id: u32,
    opts: &ServiceOptions,
    pkt: &PacketG<A>,
) -> Result<(), Reason> {
    let key = Key::new(
        ACL_PREFIX_BASE + A::BITS,
        AclKey {
            service_id: service_id.to_be_bytes(),
            family: A::FAMILY,
            addr: pkt.src.to_addr(),
            _pad: [0; 3],
        },
    );
    if XP_ACL_DENY.get(&key).is_some() {
        return Err(Reason::DropAclDenied);
    }
    if opts.flags & SVC_OPT_F_ALLOW_LIST != 0 && XP_ACL_ALLOW.get(&key).is_none() {
        return Err(Reason::DropAclNotAllowed);
    }
    Ok(())
}

/// Take one token from the client's bucket for this service, or `DropRateLimited`. A bucket
/// starts full (`new_flow_burst` tokens) and refills `new_flow_rate` tokens per second up to
/// the burst. Buckets live in an LRU hash; concurrent CPUs may race on one bucket (the limit is
/// approximate under contention, never unbounded: each CPU still pays for what it admits).
#[inline(always)]
pub fn rate<A: Ip>(
    service_id: u32,
    opts: &ServiceOptions,
    pkt: &PacketG<A>,
    now: u64,
) -> Result<(), Reason> {
    if opts.new_flow_rate == 0 {
        return Ok(());
    }
    let rate = u64::from(opts.new_flow_rate);
    let burst = u64::from(if opts.new_flow_burst == 0 {
        1
    } else {
        opts.new_flow_burst
    });
    let cap = burst * RATE_TOKEN;
    let key = RateKey {
        addr: pkt.src.to_addr(),
        service_id,
        family: A::FAMILY,
        _pad: [0; 3],
    };
    let Some(bucket) = XP_RATE.get_ptr_mut(&key) else {
        let fresh = RateState {
            tokens: cap - RATE_TOKEN,
            last_ns: now,
        };
        // A failed insert (map full of other CPUs' inserts) admits the flow: the limit is a
        // defence, not an accounting.
        let _ = XP_RATE.insert(&key, &fresh, 0);
        return Ok(());
    };
    // SAFETY: a non-null LRU hash value pointer (preallocated memory).
    let b = unsafe { &mut *bucket };
    let elapsed = now.saturating_sub(b.last_ns);
    // Refilled to the cap after `full_ns`; before that `elapsed * rate < cap` (no overflow:
    // cap <= 2^32 * 10^9 < 2^64).
    let full_ns = cap / rate;
    let tokens = if elapsed >= full_ns {
        cap
    } else {
        let t = b.tokens + elapsed * rate;
        if t > cap { cap } else { t }
    };
    if elapsed > 0 {
        b.last_ns = now;
    }
    if tokens < RATE_TOKEN {
        b.tokens = tokens;
        return Err(Reason::DropRateLimited);
    }
    b.tokens = tokens - RATE_TOKEN;
    Ok(())
}
