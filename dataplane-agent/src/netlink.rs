//! The few netlink calls the agent makes itself (route dumps, sock_diag, link/address events):
//! opening a socket, sending one request, and walking the messages that come back.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

pub const NLM_F_REQUEST: u16 = 1;
pub const NLM_F_ACK: u16 = 4;
pub const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `struct nlmsghdr`.
const HDR_LEN: usize = 16;

/// A netlink socket of `protocol`, subscribed to `groups`; reads give up after `timeout` (None:
/// they block, for event sockets).
pub fn open(protocol: i32, groups: u32, timeout: Option<Duration>) -> io::Result<OwnedFd> {
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if groups != 0 {
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        sa.nl_groups = groups;
        if unsafe { libc::bind(fd.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_nl>() as u32) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if let Some(t) = timeout {
        let tv = libc::timeval { tv_sec: t.as_secs() as libc::time_t, tv_usec: t.subsec_micros() as libc::suseconds_t };
        unsafe { libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv as *const _ as *const libc::c_void, std::mem::size_of_val(&tv) as u32) };
    }
    Ok(fd)
}

/// Sends one message: a header of `kind` and `flags`, then `payload`.
pub fn send(fd: &OwnedFd, kind: u16, flags: u16, payload: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(HDR_LEN + payload.len());
    buf.extend_from_slice(&((HDR_LEN + payload.len()) as u32).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&1u32.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(payload);
    if unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr() as *const libc::c_void, buf.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The messages in `buf`, as (kind, payload). A malformed length ends the walk with an error.
pub fn messages(buf: &[u8]) -> impl Iterator<Item = io::Result<(u16, &[u8])>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < HDR_LEN {
            return None;
        }
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if len < HDR_LEN || len > rest.len() {
            rest = &[];
            return Some(Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message")));
        }
        let payload = &rest[HDR_LEN..len];
        rest = &rest[((len + 3) & !3).min(rest.len())..];
        Some(Ok((kind, payload)))
    })
}

/// Reads until `NLMSG_DONE` or an error/ack message, calling `f` on every other message.
/// Returns the ack's error code (0: success, or a dump's end).
pub fn recv_all(fd: &OwnedFd, mut f: impl FnMut(u16, &[u8])) -> io::Result<i32> {
    let mut buf = vec![0u8; 64 * 1024];
    // Bounded: a dump ends with NLMSG_DONE, and every read with the socket's timeout.
    for _ in 0..100_000 {
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        for m in messages(&buf[..n as usize]) {
            match m? {
                (NLMSG_DONE, _) => return Ok(0),
                (NLMSG_ERROR, p) => return Ok(p.get(..4).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(0)),
                (kind, p) => f(kind, p),
            }
        }
    }
    Err(io::Error::new(io::ErrorKind::TimedOut, "netlink: no end of dump"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_walked_and_bad_lengths_named() {
        let msg = |kind: u16, body: &[u8]| {
            let mut m = ((HDR_LEN + body.len()) as u32).to_ne_bytes().to_vec();
            m.extend_from_slice(&kind.to_ne_bytes());
            m.extend_from_slice(&[0; 10]);
            m.extend_from_slice(body);
            while m.len() % 4 != 0 {
                m.push(0);
            }
            m
        };
        let buf = [msg(16, b"ab"), msg(20, b"")].concat();
        let got: Vec<(u16, Vec<u8>)> = messages(&buf).map(|m| m.map(|(k, p)| (k, p.to_vec())).unwrap()).collect();
        assert_eq!(got, vec![(16, b"ab".to_vec()), (20, vec![])]);
        let mut bad = msg(16, b"");
        bad[0] = 200;
        assert!(messages(&bad).next().unwrap().is_err());
        assert_eq!(messages(&[1, 2, 3]).count(), 0);
    }
}
