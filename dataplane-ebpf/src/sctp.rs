//! SCTP port translation: SCTP's CRC32c covers the whole packet but not the IP addresses, so an
//! address rewrite leaves it valid while a port rewrite does not. Neither Cilium nor Calico's
//! eBPF dataplane translates SCTP ports.
//!
//! The CRC is patched, not recomputed: CRC32c is affine over GF(2), so for two messages of one
//! length `crc(new) = crc(old) ^ L(new ^ old)`, with `L` the CRC without its initial value and
//! final xor. Only the four port bytes differ, so `L` is the CRC of those four delta bytes
//! followed by `len - 4` zero bytes: the delta's CRC multiplied by x^(8*(len-4)) mod P, found by
//! square-and-multiply (as zlib's crc32_combine). About 800 short constant-bound, branch-free
//! iterations per translated packet, whatever its length, and no pass over the payload.
use aya_ebpf::programs::TcContext;
use dataplane_common::DropReason;

/// CRC32c's polynomial, bit-reflected. In this representation bit 31 is x^0.
const POLY: u32 = 0x82F6_3B78;
/// Longest SCTP packet whose CRC can be patched (12 bits of zero-byte shift).
const MAX_LEN: usize = 4095;

/// All ones if bit 0 of `x` is set, else zero: selects without a branch, so the verifier walks
/// each loop once instead of splitting its state at every bit.
#[inline(always)]
fn mask(x: u32) -> u32 {
    0u32.wrapping_sub(x & 1)
}

/// a * b mod P (reflected), Mark Adler's multmodp with a constant 32-step, branch-free loop.
#[inline(always)]
fn multmodp(a: u32, mut b: u32) -> u32 {
    let mut p = 0u32;
    let mut i = 0;
    while i < 32 {
        p ^= b & mask(a >> (31 - i));
        b = (b >> 1) ^ (POLY & mask(b));
        i += 1;
    }
    p
}

/// x^(8n) mod P: the operator "append n zero bytes" to a CRC register.
#[inline(always)]
fn zero_bytes(mut n: u32) -> u32 {
    let mut p = 1u32 << 31; // x^0
    let mut sq = 1u32 << 23; // x^8
    let mut i = 0;
    while i < 12 {
        let m = mask(n);
        p = (multmodp(sq, p) & m) | (p & !m);
        sq = multmodp(sq, sq);
        n >>= 1;
        i += 1;
    }
    p
}

/// Patches the CRC32c of the SCTP packet at `l4_off` (`l4_len` bytes) whose first four bytes
/// (the ports) changed from `old` to `new` (raw wire bytes as u32).
#[inline(always)]
pub fn patch_crc(ctx: &TcContext, l4_off: usize, l4_len: usize, old: u32, new: u32) -> Result<(), DropReason> {
    match ferry_sctp_patch_crc(ctx.skb.skb, l4_off as u32, l4_len as u32, old, new) {
        0 => Ok(()),
        code => Err(DropReason::from_code(code)),
    }
}

/// The patch as a global BPF function: its ~800 loop iterations are verified once per program,
/// not once for every path that reaches a port rewrite. Returns 0 or the drop reason's code.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn ferry_sctp_patch_crc(skb: *mut aya_ebpf::bindings::__sk_buff, l4_off: u32, l4_len: u32, old: u32, new: u32) -> u32 {
    match patch(&TcContext::new(skb), l4_off as usize, l4_len as usize, old, new) {
        Ok(()) => 0,
        Err(r) => r as u32,
    }
}

#[inline(always)]
fn patch(ctx: &TcContext, l4_off: usize, l4_len: usize, old: u32, new: u32) -> Result<(), DropReason> {
    if !(12..=MAX_LEN).contains(&l4_len) {
        return Err(DropReason::SctpPortNat);
    }
    let delta = old ^ new;
    let mut c = 0u32;
    let mut i = 0;
    while i < 32 {
        // The four delta bytes in wire order, bit by bit (reflected: least significant first).
        c = (c >> 1) ^ (POLY & mask(c ^ (delta >> i)));
        i += 1;
    }
    let l = multmodp(zero_bytes((l4_len - 4) as u32), c);
    let field: [u8; 4] = ctx.load(l4_off + 8).map_err(|_| DropReason::Malformed)?;
    let patched = u32::from_le_bytes(field) ^ l;
    ctx.store(l4_off + 8, &patched.to_le_bytes(), 0).map_err(|_| DropReason::Rewrite)
}
