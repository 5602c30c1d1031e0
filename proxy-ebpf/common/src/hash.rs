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
}
