//! Connection limits of a listener: in total and per client IP. A guard holds a slot and frees
//! it on drop, so every exit path of a session releases its slots.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Counts open connections of one listener.
#[derive(Debug, Default)]
pub struct ConnectionLimits {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
}

/// A slot in the total count.
#[derive(Debug)]
pub struct TotalSlot(Arc<ConnectionLimits>);

/// A slot in the per-IP count.
#[derive(Debug)]
pub struct IpSlot(Arc<ConnectionLimits>, IpAddr);

impl ConnectionLimits {
    /// Takes a slot when fewer than `max` connections are open.
    pub fn try_total(self: &Arc<Self>, max: usize) -> Option<TotalSlot> {
        let prev = self.total.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(TotalSlot(Arc::clone(self)))
    }

    /// Takes a slot for `ip` when it has fewer than `max` connections open.
    pub fn try_ip(self: &Arc<Self>, ip: IpAddr, max: u32) -> Option<IpSlot> {
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot(Arc::clone(self), ip))
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl Drop for TotalSlot {
    fn drop(&mut self) {
        self.0.total.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.0.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_and_freed() {
        let l = Arc::new(ConnectionLimits::default());
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let a = l.try_ip(ip, 2).expect("first");
        let _b = l.try_ip(ip, 2).expect("second");
        assert!(l.try_ip(ip, 2).is_none());
        drop(a);
        assert!(l.try_ip(ip, 2).is_some());
        let t1 = l.try_total(1).expect("total");
        assert!(l.try_total(1).is_none());
        drop(t1);
        assert_eq!(l.open(), 0);
    }
}
