//! Bounds on the connections a listener keeps open from one remote
//! address, shared by every listener (log, segments, metadata): a peer
//! opening sockets without end cannot exhaust the node's descriptors or
//! tasks.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Default bound on one listener's open connections from one address.
pub const CONNECTIONS_PER_PEER_DEFAULT: usize = 1024;

/// Counts open connections per remote address.
#[derive(Clone, Debug)]
pub struct PeerLimiter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; its slot is released when dropped.
#[derive(Debug)]
pub struct PeerSlot {
    inner: Arc<Inner>,
    ip: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.inner.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl PeerLimiter {
    /// At most `max` (at least 1) open connections per address.
    pub fn new(max: usize) -> PeerLimiter {
        PeerLimiter {
            inner: Arc::new(Inner {
                max: max.max(1),
                open: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A slot for a new connection from `ip`, or `None` if `ip` has the
    /// maximum open already (the caller closes the socket and logs it).
    pub fn admit(&self, ip: IpAddr) -> Option<PeerSlot> {
        let mut open = self.inner.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.inner.max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            inner: self.inner.clone(),
            ip,
        })
    }

    pub fn max(&self) -> usize {
        self.inner.max
    }

    /// Connections open from `ip` now.
    pub fn open(&self, ip: IpAddr) -> usize {
        let open = self.inner.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(&ip).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_bound_per_address_and_frees_on_drop() {
        let l = PeerLimiter::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = l.admit(a).unwrap();
        let _s2 = l.admit(a).unwrap();
        assert!(l.admit(a).is_none(), "a third from the same address");
        let _t = l.admit(b).expect("another address has its own bound");
        drop(s1);
        assert_eq!(l.open(a), 1);
        assert!(l.admit(a).is_some());
    }
}
