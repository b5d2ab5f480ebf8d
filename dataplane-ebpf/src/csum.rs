//! Checksums computed in software over small stack buffers (headers we build ourselves). Packet
//! rewrites use the kernel's incremental helpers instead (see nat.rs).

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
