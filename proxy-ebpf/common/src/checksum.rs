//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624, eqn. 3).
//!
//! XDP has no checksum helpers, so the datapath patches checksums itself with these functions,
//! and the tests recompute checksums in full with them. All 16-bit words are taken in network
//! byte order (big-endian) from byte arrays; checksum values are the u16 as read big-endian from
//! the header.

/// Fold a 32-bit one's complement accumulator to 16 bits (not complemented).
#[inline(always)]
#[must_use]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Add one 16-bit word to a one's complement accumulator.
#[inline(always)]
#[must_use]
pub const fn add16(sum: u32, word: u16) -> u32 {
    let s = sum + word as u32;
    (s & 0xffff) + (s >> 16)
}

/// Incrementally update checksum `check` for one 16-bit word changing from `old` to `new`:
/// HC' = ~(~HC + ~m + m').
#[inline(always)]
#[must_use]
pub const fn update16(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = !check as u32;
    sum = add16(sum, !old);
    sum = add16(sum, new);
    !fold(sum)
}

/// Incrementally update `check` for 4 bytes (an IPv4 address, or two ports) changing.
#[inline(always)]
#[must_use]
pub const fn update32(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let mut sum = !check as u32;
    sum = add16(sum, !u16::from_be_bytes([old[0], old[1]]));
    sum = add16(sum, !u16::from_be_bytes([old[2], old[3]]));
    sum = add16(sum, u16::from_be_bytes([new[0], new[1]]));
    sum = add16(sum, u16::from_be_bytes([new[2], new[3]]));
    !fold(sum)
}

/// Incrementally update a UDP checksum: 0 means "no checksum" and stays 0; a computed 0 is sent
/// as 0xffff (RFC 768).
#[inline(always)]
#[must_use]
pub const fn udp_update32(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    if check == 0 {
        return 0;
    }
    let c = update32(check, old, new);
    if c == 0 { 0xffff } else { c }
}

/// Incrementally update a UDP checksum for one 16-bit word (see `udp_update32`).
#[inline(always)]
#[must_use]
pub const fn udp_update16(check: u16, old: u16, new: u16) -> u16 {
    if check == 0 {
        return 0;
    }
    let c = update16(check, old, new);
    if c == 0 { 0xffff } else { c }
}

/// One's complement sum of `data` (odd trailing byte padded with zero), not complemented.
/// Host-side helper for tests and userspace; the datapath never sums a whole packet.
#[must_use]
pub fn sum_bytes(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = add16(sum, u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum = add16(sum, u16::from_be_bytes([*last, 0]));
    }
    sum
}

/// Full Internet checksum of `data` (e.g. an IPv4 header with its checksum field zeroed).
#[must_use]
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum_bytes(0, data))
}

/// Full TCP/UDP checksum over the IPv4 pseudo-header and `segment` (L4 header with its checksum
/// field zeroed, plus payload).
#[must_use]
pub fn l4_checksum_v4(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> u16 {
    let mut sum = sum_bytes(0, &src);
    sum = sum_bytes(sum, &dst);
    sum = add16(sum, u16::from(proto));
    // Segment length fits in 16 bits for any IPv4 packet.
    sum = add16(sum, (segment.len() & 0xffff) as u16);
    sum = sum_bytes(sum, segment);
    !fold(sum)
}

/// True when `data` (a header including its checksum field) sums to all ones: checksum valid.
#[must_use]
pub fn verify(data: &[u8]) -> bool {
    fold(sum_bytes(0, data)) == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real IPv4 header (from RFC 1071 examples / Wikipedia's worked example).
    const IP_HDR: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    #[test]
    fn full_checksum_matches_known_header() {
        let mut h = IP_HDR;
        h[10] = 0;
        h[11] = 0;
        assert_eq!(checksum(&h), 0xb861);
        assert!(verify(&IP_HDR));
    }

    #[test]
    fn incremental_address_update_equals_recompute() {
        let mut h = IP_HDR;
        let old_check = u16::from_be_bytes([h[10], h[11]]);
        let old_src = [h[12], h[13], h[14], h[15]];
        let new_src = [10, 20, 1, 1];
        h[12..16].copy_from_slice(&new_src);
        let inc = update32(old_check, old_src, new_src);
        h[10] = 0;
        h[11] = 0;
        assert_eq!(inc, checksum(&h));
    }

    #[test]
    fn incremental_ttl_update_equals_recompute() {
        let mut h = IP_HDR;
        let old_check = u16::from_be_bytes([h[10], h[11]]);
        let old = u16::from_be_bytes([h[8], h[9]]);
        h[8] -= 1;
        let new = u16::from_be_bytes([h[8], h[9]]);
        let inc = update16(old_check, old, new);
        h[10] = 0;
        h[11] = 0;
        assert_eq!(inc, checksum(&h));
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(udp_update32(0, [1, 2, 3, 4], [5, 6, 7, 8]), 0);
        assert_eq!(udp_update16(0, 1, 2), 0);
    }

    #[test]
    fn exhaustive_word_updates_match_recompute() {
        // Random-ish sweep: for many (data, old, new) triples the incremental result must equal
        // a full recompute. Deterministic LCG so failures reproduce.
        let mut x: u32 = 0x1234_5678;
        let mut next = || {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            x
        };
        for _ in 0..20_000 {
            let mut data = [0u8; 12];
            for b in &mut data {
                *b = (next() >> 24) as u8;
            }
            let before = checksum(&data);
            let idx = (next() % 6) as usize * 2;
            let old = u16::from_be_bytes([data[idx], data[idx + 1]]);
            let new = (next() >> 16) as u16;
            data[idx..idx + 2].copy_from_slice(&new.to_be_bytes());
            let after = checksum(&data);
            let inc = update16(before, old, new);
            // 0x0000 and 0xffff are the same one's complement value; a receiver accepts both.
            assert!(
                inc == after || (inc ^ after) == 0xffff && (inc == 0 || after == 0),
                "data {data:?} idx {idx} old {old:#x} new {new:#x}: inc {inc:#x} full {after:#x}"
            );
        }
    }

    #[test]
    fn l4_checksum_verifies() {
        let src = [10, 0, 0, 1];
        let dst = [10, 0, 0, 2];
        let mut seg = [0u8; 8 + 5];
        seg[0..2].copy_from_slice(&1234u16.to_be_bytes());
        seg[2..4].copy_from_slice(&80u16.to_be_bytes());
        seg[4..6].copy_from_slice(&13u16.to_be_bytes());
        seg[8..].copy_from_slice(b"hello");
        let c = l4_checksum_v4(src, dst, 17, &seg);
        seg[6..8].copy_from_slice(&c.to_be_bytes());
        let mut sum = sum_bytes(0, &src);
        sum = sum_bytes(sum, &dst);
        sum = add16(sum, 17);
        sum = add16(sum, 13);
        sum = sum_bytes(sum, &seg);
        assert_eq!(fold(sum), 0xffff);
    }
}
