//! Checksums in software: computed over small stack buffers (headers we build ourselves), and
//! updated incrementally (RFC 1624) where no kernel helper exists (XDP). The tc path's rewrites
//! use the kernel's incremental helpers instead (see nat.rs).

/// One's-complement sum of `data` (big-endian 16-bit words), added to `sum`. The loop is bounded
/// by the buffer length, which the verifier sees as a constant.
#[inline(always)]
pub fn add(mut sum: u32, data: &[u8], len: usize) -> u32 {
    let mut i = 0;
    while i + 1 < len && i + 1 < data.len() {
        sum += ((data[i] as u32) << 8) | data[i + 1] as u32;
        i += 2;
    }
    if len % 2 == 1 && i < data.len() {
        sum += (data[i] as u32) << 8;
    }
    sum
}

/// Folds a 32-bit one's-complement sum into the 16-bit checksum, returned as wire bytes.
#[inline(always)]
pub fn fold(mut sum: u32) -> [u8; 2] {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// RFC 1624 eqn. 3: the checksum `hc` (as on the wire, big-endian value) after a 16-bit word
/// changed from `old` to `new`.
#[inline(always)]
pub fn csum_replace2(hc: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!hc as u32) + (!old as u32 & 0xffff) + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// As [`csum_replace2`] for a 32-bit field given as raw wire bytes.
#[inline(always)]
pub fn csum_replace4(hc: u16, old_be: u32, new_be: u32) -> u16 {
    let (o, n) = (old_be.to_ne_bytes(), new_be.to_ne_bytes());
    let hc = csum_replace2(hc, u16::from_be_bytes([o[0], o[1]]), u16::from_be_bytes([n[0], n[1]]));
    csum_replace2(hc, u16::from_be_bytes([o[2], o[3]]), u16::from_be_bytes([n[2], n[3]]))
}
