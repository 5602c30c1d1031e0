//! The flow hash. The datapath uses it to pick a Maglev slot and a SNAT port probe start; the
//! daemon's "which upstream gets this flow" simulator uses the same function, so they agree.

/// Seed for the Maglev slot hash.
pub const SEED_MAGLEV: u32 = 0x9e37_79b9;
/// Seed for the SNAT port probe start.
pub const SEED_SNAT_PORT: u32 = 0x85eb_ca6b;

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
const fn word(a: &[u8; 16], i: usize) -> u32 {
    u32::from_be_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]])
}

/// Murmur3-style hash of a flow's client-side 5-tuple (as the client's packet carries it).
/// Ports are in network byte order, exactly as in the packet.
#[inline(always)]
#[must_use]
pub const fn flow_hash(
    seed: u32,
    src: &[u8; 16],
    dst: &[u8; 16],
    src_port: [u8; 2],
    dst_port: [u8; 2],
    proto: u8,
) -> u32 {
    let mut h = seed;
    h = mix(h, word(src, 0));
    h = mix(h, word(src, 4));
    h = mix(h, word(src, 8));
    h = mix(h, word(src, 12));
    h = mix(h, word(dst, 0));
    h = mix(h, word(dst, 4));
    h = mix(h, word(dst, 8));
    h = mix(h, word(dst, 12));
    h = mix(
        h,
        u32::from_be_bytes([src_port[0], src_port[1], dst_port[0], dst_port[1]]),
    );
    h = mix(h, proto as u32);
    finish(h ^ 37)
}

/// Offset from `port_min` of the SNAT port a new flow probes `i`-th, for a flow whose SNAT hash
/// (`flow_hash(SEED_SNAT_PORT, ..)`) is `h`, in a range of `span` ports (`1..=65536`).
///
/// Probe 0 is `h % span`. In a range no larger than the probe budget, every port is probed once,
/// in order from there. In a larger range each further probe lands at an offset of its own,
/// pseudo-random per flow and probe: linear probing (`start + i`) lets taken ports bunch into
/// runs that every flow hashing into a run then walks, so a range half full showed as SNAT
/// exhaustion; with independent probes a new flow fails only when all `SNAT_PORT_PROBES` probed
/// ports are taken, with probability (fill)^32. A probe may repeat an earlier one; that costs one
/// probe, never a reused port (the BPF_NOEXIST insert decides).
#[inline(always)]
#[must_use]
pub const fn snat_probe_offset(h: u32, i: u32, span: u32) -> u32 {
    if i == 0 || span <= crate::SNAT_PORT_PROBES {
        // h % span < span <= 65536 and i < 32: no overflow.
        (h % span + i) % span
    } else {
        finish(h ^ i.wrapping_mul(0x9e37_79b9)) % span
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_every_field() {
        let a = [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let b = [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let base = flow_hash(SEED_MAGLEV, &a, &b, [0x30, 0x39], [0, 80], 6);
        assert_ne!(
            base,
            flow_hash(SEED_MAGLEV, &b, &a, [0x30, 0x39], [0, 80], 6)
        );
        assert_ne!(
            base,
            flow_hash(SEED_MAGLEV, &a, &b, [0x30, 0x3a], [0, 80], 6)
        );
        assert_ne!(
            base,
            flow_hash(SEED_MAGLEV, &a, &b, [0x30, 0x39], [0, 81], 6)
        );
        assert_ne!(
            base,
            flow_hash(SEED_MAGLEV, &a, &b, [0x30, 0x39], [0, 80], 17)
        );
        assert_ne!(
            base,
            flow_hash(SEED_SNAT_PORT, &a, &b, [0x30, 0x39], [0, 80], 6)
        );
    }

    #[test]
    fn hash_spreads_source_ports() {
        // 64k source ports into 64 buckets: each bucket within 20% of the mean.
        let a = [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let b = [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut buckets = [0u32; 64];
        for p in 0..=u16::MAX {
            let h = flow_hash(SEED_MAGLEV, &a, &b, p.to_be_bytes(), [0, 80], 6);
            buckets[(h % 64) as usize] += 1;
        }
        let mean = 65_536 / 64;
        for (i, n) in buckets.iter().enumerate() {
            assert!(
                n.abs_diff(mean) < mean / 5,
                "bucket {i}: {n} vs mean {mean}"
            );
        }
    }

    #[test]
    fn small_ranges_probe_every_port_once() {
        for span in 1..=crate::SNAT_PORT_PROBES {
            let mut seen: [bool; 32] = [false; 32];
            for i in 0..span {
                let off = snat_probe_offset(0xdead_beef, i, span);
                assert!(off < span);
                assert!(
                    !seen[off as usize],
                    "span {span}: offset {off} probed twice"
                );
                seen[off as usize] = true;
            }
        }
    }

    #[test]
    fn probes_stay_in_range_and_start_at_the_hash() {
        for (h, span) in [
            (0u32, 65_536u32),
            (u32::MAX, 65_536),
            (12_345, 22_528),
            (7, 33),
        ] {
            assert_eq!(snat_probe_offset(h, 0, span), h % span);
            for i in 0..crate::SNAT_PORT_PROBES {
                assert!(snat_probe_offset(h, i, span) < span);
            }
        }
    }

    /// The property the scattered probes exist for: a range filled to 75% by flows that each
    /// take their first free probe still admits every new flow. Linear probing fails this (runs
    /// of taken ports that whole groups of flows walk into exhaust their 32 probes).
    #[test]
    fn a_three_quarters_full_range_admits_every_new_flow() {
        const SPAN: u32 = 8_192;
        let mut taken = [false; SPAN as usize];
        let a = [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let b = [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut admitted = 0u32;
        let mut refused = 0u32;
        for client in 0..(SPAN * 3 / 4) {
            let h = flow_hash(
                SEED_SNAT_PORT,
                &a,
                &b,
                ((client % 60_000) as u16).to_be_bytes(),
                (((client / 60_000) + 80) as u16).to_be_bytes(),
                6,
            );
            let free = (0..crate::SNAT_PORT_PROBES)
                .map(|i| snat_probe_offset(h, i, SPAN) as usize)
                .find(|&off| !taken[off]);
            match free {
                Some(off) => {
                    taken[off] = true;
                    admitted += 1;
                }
                None => refused += 1,
            }
        }
        assert_eq!(refused, 0, "{refused} flows refused, {admitted} admitted");
    }
}
