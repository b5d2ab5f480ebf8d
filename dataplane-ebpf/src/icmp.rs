//! ICMP errors about translated connections (RFC 5508 behaviour, as netfilter's NAT does it):
//! a "port unreachable" or "fragmentation needed" from a backend names the backend in its quoted
//! header, which the client never talked to. Rewrite the quoted header and the outer addresses
//! back with the same conntrack entry the packet's connection uses.
use aya_ebpf::programs::TcContext;
use dataplane_common::{stat, Ct4Key, DropReason, CT_F_REDIRECT, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    conntrack,
    lb::{Hook, Verdict},
    nat::{self, store_u16_fix, store_u32_fix},
    parse::{l4_csum_off, Ipv4Packet, ETH_LEN, IP_CHECK_OFF, IP_DADDR_OFF, IP_SADDR_OFF},
    stats,
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

/// Returns the Service path's scalar (`Verdict as u32` or `lb::DROP_CODE | reason`).
// A separate BPF subprogram (see lb::service_path).
#[inline(never)]
pub fn handle_icmp(ctx: &TcContext, p: &mut Ipv4Packet, hook: u32) -> u32 {
    match icmp_error(ctx, p, Hook::from_u32(hook)) {
        Ok(v) => v as u32,
        Err(r) => crate::lb::DROP_CODE | r as u32,
    }
}

#[inline(always)]
fn icmp_error(ctx: &TcContext, p: &Ipv4Packet, hook: Hook) -> Result<Verdict, DropReason> {
    let icmp_type: u8 = ctx.load(p.l4_off).map_err(|_| DropReason::Malformed)?;
    if !matches!(icmp_type, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB) {
        // Echo and friends are not translated: kube-proxy's nftables rules refuse them at a
        // ClusterIP and drop them elsewhere in the service CIDRs, where they enter the node.
        if matches!(hook, Hook::FromPod | Hook::FromWorld) {
            return match crate::lb::other_protocol(p.daddr_be)? {
                c if c == Verdict::Reject as u32 => Ok(Verdict::Reject),
                _ => Ok(Verdict::Pass),
            };
        }
        return Ok(Verdict::Pass);
    }
    let icmp_check = p.l4_off + 2;
    let in_ip = p.l4_off + 8;
    let inner: [u8; 20] = match ctx.load(in_ip) {
        Ok(h) => h,
        Err(_) => return Ok(Verdict::Pass), // too short to quote a header: nothing to translate
    };
    let in_ihl = ((inner[0] & 0x0f) as usize) * 4;
    let in_proto = inner[9];
    if in_ihl < 20 || !matches!(in_proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        return Ok(Verdict::Pass);
    }
    let in_l4 = in_ip + in_ihl;
    let ports: [u8; 4] = match ctx.load(in_l4) {
        Ok(p) => p,
        Err(_) => return Ok(Verdict::Pass),
    };
    let in_saddr = u32::from_ne_bytes([inner[12], inner[13], inner[14], inner[15]]);
    let in_daddr = u32::from_ne_bytes([inner[16], inner[17], inner[18], inner[19]]);
    let in_sport = u16::from_ne_bytes([ports[0], ports[1]]);
    let in_dport = u16::from_ne_bytes([ports[2], ports[3]]);
    // The quoted packet went the other way: its reversed tuple is the tuple of the flow this
    // error travels with, which is what conntrack is keyed by.
    let key = Ct4Key { saddr_be: in_daddr, daddr_be: in_saddr, sport_be: in_dport, dport_be: in_sport, proto: in_proto, pad: [0; 3] };
    let Some(hit) = conntrack::lookup(&key, conntrack::now()) else {
        return Ok(Verdict::Pass);
    };
    // SAFETY: pointer from a successful lookup.
    let e = unsafe { *hit.ptr };

    // Quoted header: source <- e.nat_daddr:nat_dport, destination <- e.nat_saddr:nat_sport.
    let in_check_off = in_ip + IP_CHECK_OFF;
    let old_in_check: u16 = ctx.load(in_check_off).map_err(|_| DropReason::Malformed)?;
    let in_l4_check = l4_csum_off(in_proto)
        .map(|o| in_l4 + o)
        .filter(|off| off + 2 <= ctx.len() as usize);
    let old_l4_check: u16 = match in_l4_check {
        Some(off) => ctx.load(off).map_err(|_| DropReason::Malformed)?,
        None => 0,
    };
    for (off, from, to) in [(IP_SADDR_OFF, in_saddr, e.nat_daddr_be), (IP_DADDR_OFF, in_daddr, e.nat_saddr_be)] {
        if from != to {
            // Inner IP checksum, then the ICMP checksum for the address bytes themselves.
            store_u32_fix(ctx, in_ip + off, in_check_off, from, to)?;
            ctx.l4_csum_replace(icmp_check, from as u64, to as u64, 4).map_err(|_| DropReason::Rewrite)?;
            if let Some(c) = in_l4_check.filter(|_| old_l4_check != 0) {
                ctx.l3_csum_replace(c, from as u64, to as u64, 4).map_err(|_| DropReason::Rewrite)?;
            }
        }
    }
    for (off, from, to) in [(0usize, in_sport, e.nat_dport_be), (2usize, in_dport, e.nat_sport_be)] {
        if from != to {
            ctx.l4_csum_replace(icmp_check, from as u64, to as u64, 2).map_err(|_| DropReason::Rewrite)?;
            match in_l4_check.filter(|_| old_l4_check != 0) {
                Some(c) => store_u16_fix(ctx, in_l4 + off, c, from, to)?,
                None => ctx.store(in_l4 + off, &to, 0).map_err(|_| DropReason::Rewrite)?,
            }
        }
    }
    // The quoted checksums changed too; the ICMP checksum covers them.
    let new_in_check: u16 = ctx.load(in_check_off).map_err(|_| DropReason::Malformed)?;
    ctx.l4_csum_replace(icmp_check, old_in_check as u64, new_in_check as u64, 2).map_err(|_| DropReason::Rewrite)?;
    if let Some(c) = in_l4_check {
        let new_l4_check: u16 = ctx.load(c).map_err(|_| DropReason::Malformed)?;
        ctx.l4_csum_replace(icmp_check, old_l4_check as u64, new_l4_check as u64, 2).map_err(|_| DropReason::Rewrite)?;
    }

    // Outer header: towards whoever the translated flow's packets go to; and when the error was
    // generated by the endpoint itself, from the address the client knows it by.
    let ip_check = ETH_LEN + IP_CHECK_OFF;
    if p.daddr_be != e.nat_daddr_be {
        store_u32_fix(ctx, ETH_LEN + IP_DADDR_OFF, ip_check, p.daddr_be, e.nat_daddr_be)?;
    }
    let mut saddr = p.saddr_be;
    if p.saddr_be == in_daddr && p.saddr_be != e.nat_saddr_be {
        store_u32_fix(ctx, ETH_LEN + IP_SADDR_OFF, ip_check, p.saddr_be, e.nat_saddr_be)?;
        saddr = e.nat_saddr_be;
    }
    stats::count(stat::ICMP_RELATED);
    // An error about a connection from outside (a NodePort backend's port unreachable) now comes
    // from the frontend, often a node address: like the connection's own replies, it must be
    // sent out, or the stack drops it as a martian.
    if e.flags & CT_F_REDIRECT != 0 && hook != Hook::ToWorld && nat::fib_prepare(ctx, saddr, e.nat_daddr_be) == nat::FIB_GO {
        return Ok(Verdict::Redirect);
    }
    Ok(Verdict::Pass)
}
