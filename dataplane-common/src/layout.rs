//! Field layouts of the map keys and values (userspace only). The agent records them beside the
//! pinned maps, so that any other version of Ferry, newer or older, can carry entries over field
//! by field when a map's layout changed: a field moves by name (and size); a field the other
//! side lacks is zero. Keep each list complete and in declaration order (a test checks that the
//! fields tile the struct as `#[repr(C)]` lays it out).
extern crate alloc;
use alloc::vec::Vec;

use super::*;

/// One field: its name, offset and size in bytes, and its alignment (for the tiling check).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: &'static str,
    pub offset: usize,
    pub size: usize,
    pub align: usize,
}

#[doc(hidden)]
pub fn size_align<T, F>(_: fn(&T) -> &F) -> (usize, usize) {
    (core::mem::size_of::<F>(), core::mem::align_of::<F>())
}

macro_rules! fields {
    ($t:ty { $($f:ident),* $(,)? }) => {
        impl Described for $t {
            fn fields() -> Vec<Field> {
                alloc::vec![$({
                    let (size, align) = size_align(|x: &$t| &x.$f);
                    Field { name: stringify!($f), offset: core::mem::offset_of!($t, $f), size, align }
                }),*]
            }
        }
    };
}

/// A map key or value type whose fields are known by name.
pub trait Described: Sized {
    fn fields() -> Vec<Field>;
}

/// Integers and plain arrays are one field, `value`.
macro_rules! scalar {
    ($($t:ty),*) => {$(
        impl Described for $t {
            fn fields() -> Vec<Field> {
                alloc::vec![Field { name: "value", offset: 0, size: core::mem::size_of::<$t>(), align: core::mem::align_of::<$t>() }]
            }
        }
    )*};
}
scalar!(u32, u64, [u32; 2], [u8; 8], [u8; 12], [u8; 16]);

fields!(Lb4Key { addr_be, port_be, proto, scope });
fields!(Lb4Service { svc_id, count, flags, affinity_timeout_s, table_off, table_len });
fields!(AffinityKey { svc_id, client_be });
fields!(Lb4PairKey { svc_id, backend_id });
fields!(AffinityValue { backend_id, pad, last_used_ns });
fields!(Lb4SlotKey { svc_id, slot });
fields!(Lb4Backend { addr_be, port_be, proto, flags });
fields!(Ct4Key { saddr_be, daddr_be, sport_be, dport_be, proto, pad });
fields!(Ct4Entry { nat_saddr_be, nat_daddr_be, nat_sport_be, nat_dport_be, svc_id, backend_id, flags, state, tcp_next, created_ns, last_seen_ns, expires_ns });
fields!(NodeConfig {
    snat_addr_be,
    snat_port_min,
    snat_port_max,
    cluster_cidr_be,
    cluster_mask_be,
    ct_timeout_s,
    host_netns_cookie,
    flags,
    pol_generation,
    refusals_per_s,
    refusal_burst,
    ct_per_source_max,
    pad
});
fields!(SvcCounters { packets, bytes });
fields!(SvcName { name });
fields!(Frag4Key { saddr_be, daddr_be, id_be, proto, pad });
fields!(Frag4Ports { sport_be, dport_be });
fields!(SockRevKey { cookie, addr_be, port_be, pad });
fields!(SockRevValue { addr_be, port_be, pad });
fields!(LocalAddr { ifindex, kind });
fields!(PodIface { addr_be, pad });
fields!(PolEndpoint { ep_id, flags, ingress_policy, egress_policy });
fields!(PolRuleKey { ep_id_be, identity_be, dir, proto, port_be });
fields!(PolCtKey { tuple, ifindex });
fields!(PolCtEntry { peer_addr_be, peer_port_be, dir, pad, policy_id, generation, flags, state, tcp_next, ep_addr_be, created_ns, last_seen_ns, expires_ns });
fields!(PolRevoked { last_seen_ns, fwd, ep_addr_be, generation, dir, pad });
fields!(PolFragKey { saddr_be, daddr_be, ifindex, id_be, proto, dir });
fields!(PolEvKey { ep_be, peer_be, port_be, proto, dir });
fields!(SrcRangeData { svc_id, addr_be });

/// Checks that `fields` tile a `#[repr(C)]` struct of `size` and `align` exactly: each field
/// where the previous one ends (rounded up to its alignment), the struct ending after the last
/// (rounded up to its own). A field left out of a list shows as a gap. Returns the first misfit.
pub fn tiling_error(fields: &[Field], size: usize, align: usize) -> Option<&'static str> {
    let up = |x: usize, a: usize| x.div_ceil(a) * a;
    let mut end = 0;
    for f in fields {
        if f.offset != up(end, f.align) {
            return Some(f.name);
        }
        end = f.offset + f.size;
    }
    (up(end, align) != size).then_some("(end of struct)")
}
