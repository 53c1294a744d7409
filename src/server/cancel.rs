//! Cancel keys: the BackendKeyData a client sees carries the pinned backend's real PID and a
//! secret pgfan generates; a CancelRequest with both is forwarded to that backend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use crate::backends::connect::CancelTarget;

/// All live sessions' cancel keys.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    sessions: Mutex<HashMap<(i32, i32), CancelTarget>>,
}

impl CancelRegistry {
    /// Registers a session; returns the client-facing secret and a guard that unregisters
    /// it when the session ends.
    pub fn register(self: &Arc<Self>, target: CancelTarget) -> (i32, CancelKeyGuard) {
        let pid = target.pid;
        let mut map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let secret = loop {
            let s: i32 = rand::random();
            if !map.contains_key(&(pid, s)) {
                break s;
            }
        };
        map.insert((pid, secret), target);
        (
            secret,
            CancelKeyGuard {
                registry: self.clone(),
                key: (pid, secret),
            },
        )
    }

    /// The backend to cancel for a client's (pid, secret), if it matches a live session.
    pub fn lookup(&self, pid: i32, secret: &[u8]) -> Option<CancelTarget> {
        let secret = i32::from_be_bytes(secret.try_into().ok()?);
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(pid, secret))
            .cloned()
    }
}

/// Removes a session's cancel key on drop.
pub struct CancelKeyGuard {
    registry: Arc<CancelRegistry>,
    key: (i32, i32),
}

impl Drop for CancelKeyGuard {
    fn drop(&mut self) {
        self.registry
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_needs_the_right_secret() {
        let reg = Arc::new(CancelRegistry::default());
        let target = CancelTarget {
            addr: "127.0.0.1:5432".parse().unwrap(),
            pid: 42,
            secret: vec![1, 2, 3, 4],
        };
        let (secret, guard) = reg.register(target);
        assert!(reg.lookup(42, &secret.to_be_bytes()).is_some());
        assert!(reg
            .lookup(42, &secret.wrapping_add(1).to_be_bytes())
            .is_none());
        assert!(reg.lookup(43, &secret.to_be_bytes()).is_none());
        drop(guard);
        assert!(reg.lookup(42, &secret.to_be_bytes()).is_none());
    }
}
