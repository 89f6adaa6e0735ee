//! Open outbound connections: the idle pool for reuse, and the destination connection slots
//! each connection holds while it is open (see [`crate::shaping`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::client::Connection;
use crate::metrics;
use crate::shaping::{ShapingStore, Slot};

/// A connection and the destination slot it holds (none when the destination has no
/// connection limit).
pub(crate) struct Conn {
    pub conn: Connection,
    pub slot: Option<SlotHold>,
    /// Messages this connection may carry in all.
    pub max_messages: u32,
}

/// A held slot, refreshed by [`Pool::refresh`] until it is released.
pub(crate) struct SlotHold(Arc<tokio::sync::Mutex<Slot>>);

/// Idle connections by `host:port`, and every slot held by this worker.
pub(crate) struct Pool {
    idle: Mutex<HashMap<String, Vec<(Conn, Instant)>>>,
    held: Mutex<Vec<Arc<tokio::sync::Mutex<Slot>>>>,
    shaper: Arc<dyn ShapingStore>,
}

impl Pool {
    pub fn new(shaper: Arc<dyn ShapingStore>) -> Pool {
        Pool {
            idle: Mutex::new(HashMap::new()),
            held: Mutex::new(Vec::new()),
            shaper,
        }
    }

    pub fn shaper(&self) -> &dyn ShapingStore {
        self.shaper.as_ref()
    }

    /// Takes a slot of `dest` (of `max`): `Ok(Some(hold))`, or `Ok(None)` when all are held.
    pub async fn acquire(
        &self,
        dest: &str,
        max: u32,
    ) -> Result<Option<SlotHold>, crate::shaping::ShapingError> {
        let Some(slot) = self.shaper.acquire_slot(dest, max).await? else {
            return Ok(None);
        };
        let slot = Arc::new(tokio::sync::Mutex::new(slot));
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::clone(&slot));
        Ok(Some(SlotHold(slot)))
    }

    /// Gives a slot back (in the background).
    pub fn release(&self, hold: SlotHold) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|s| !Arc::ptr_eq(s, &hold.0));
        let shaper = Arc::clone(&self.shaper);
        tokio::spawn(async move {
            let slot = hold.0.lock().await.clone();
            shaper.release_slot(slot).await;
        });
    }

    /// Keeps every held slot alive; call every third of [`crate::shaping::SLOT_TTL`].
    pub async fn refresh(&self) {
        let held: Vec<_> = self.held.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for slot in held {
            let mut slot = slot.lock().await;
            match self.shaper.refresh_slot(&mut slot).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(dest = %slot.dest, slot = slot.n, "connection slot expired before its refresh; the destination may briefly see one connection too many")
                }
                Err(e) => tracing::warn!(error = %e, "connection slot refresh failed"),
            }
        }
    }

    pub fn take(&self, key: &str, max_idle: Duration) -> Option<Conn> {
        let mut stale = Vec::new();
        let found = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let list = idle.get_mut(key)?;
            let mut found = None;
            while let Some((conn, since)) = list.pop() {
                if since.elapsed() < max_idle && conn.conn.is_usable() {
                    found = Some(conn);
                    break;
                }
                stale.push(conn);
            }
            found
        };
        for conn in stale {
            self.close(conn);
        }
        found
    }

    pub fn put(&self, key: String, conn: Conn) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .push((conn, Instant::now()));
    }

    /// Closes connections idle for `max_idle` or longer (all of them when zero).
    pub fn reap(&self, max_idle: Duration) {
        let mut stale = Vec::new();
        {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            for list in idle.values_mut() {
                let (old, fresh): (Vec<_>, Vec<_>) = std::mem::take(list)
                    .into_iter()
                    .partition(|(_, since)| max_idle.is_zero() || since.elapsed() >= max_idle);
                *list = fresh;
                stale.extend(old.into_iter().map(|(c, _)| c));
            }
            idle.retain(|_, list| !list.is_empty());
        }
        for conn in stale {
            self.close(conn);
        }
    }

    /// Says QUIT in the background and gives the slot back once the connection is closed
    /// (a server slow to answer QUIT must not see more than its connection limit).
    pub fn close(&self, conn: Conn) {
        let slot = conn.slot.map(|hold| {
            self.held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|s| !Arc::ptr_eq(s, &hold.0));
            hold.0
        });
        let shaper = Arc::clone(&self.shaper);
        let c = conn.conn;
        tokio::spawn(async move {
            let _ = c.quit().await;
            metrics::CONNECTIONS_OPEN.dec();
            if let Some(slot) = slot {
                let slot = slot.lock().await.clone();
                shaper.release_slot(slot).await;
            }
        });
    }
}
