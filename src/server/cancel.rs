//! Cancel keys: the BackendKeyData a client sees carries the pinned backend's real PID and a
//! secret pgfan generates; a CancelRequest with both is forwarded to that backend and
//! raises the session's [`CancelSignal`], which stops a fan-out in progress.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

pub use crate::backends::connect::CancelTarget;

/// Counts a session's CancelRequests; a running fan-out watches it for a new one.
#[derive(Debug)]
pub struct CancelSignal {
    requests: watch::Sender<u64>,
}

impl Default for CancelSignal {
    fn default() -> Self {
        CancelSignal {
            requests: watch::Sender::new(0),
        }
    }
}

impl CancelSignal {
    /// Records a CancelRequest.
    pub fn raise(&self) {
        self.requests.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees the requests made from now on.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.requests.subscribe()
    }
}

/// What a cancel key reaches: the pinned backend and the session's signal.
#[derive(Debug, Clone)]
pub struct SessionCancel {
    /// The pinned backend.
    pub target: CancelTarget,
    /// The session's fan-out cancel signal.
    pub signal: Arc<CancelSignal>,
}

/// All live sessions' cancel keys.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    sessions: Mutex<HashMap<(i32, i32), SessionCancel>>,
}

impl CancelRegistry {
    /// Registers a session; returns the client-facing secret, the session's cancel signal
    /// and a guard that unregisters it when the session ends.
    pub fn register(
        self: &Arc<Self>,
        target: CancelTarget,
    ) -> (i32, Arc<CancelSignal>, CancelKeyGuard) {
        let pid = target.pid;
        let mut map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let secret = loop {
            let s: i32 = rand::random();
            if !map.contains_key(&(pid, s)) {
                break s;
            }
        };
        let signal = Arc::new(CancelSignal::default());
        map.insert(
            (pid, secret),
            SessionCancel {
                target,
                signal: signal.clone(),
            },
        );
        (
            secret,
            signal,
            CancelKeyGuard {
                registry: self.clone(),
                key: (pid, secret),
            },
        )
    }

    /// The session a client's (pid, secret) cancels, if it matches a live session.
    pub fn lookup(&self, pid: i32, secret: &[u8]) -> Option<SessionCancel> {
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
            addr: crate::backends::connect::BackendAddr::Tcp("127.0.0.1:5432".parse().unwrap()),
            pid: 42,
            secret: vec![1, 2, 3, 4],
        };
        let (secret, signal, guard) = reg.register(target);
        let seen = signal.subscribe();
        signal.raise();
        assert!(seen.has_changed().unwrap_or(false));
        assert!(reg.lookup(42, &secret.to_be_bytes()).is_some());
        assert!(reg
            .lookup(42, &secret.wrapping_add(1).to_be_bytes())
            .is_none());
        assert!(reg.lookup(43, &secret.to_be_bytes()).is_none());
        drop(guard);
        assert!(reg.lookup(42, &secret.to_be_bytes()).is_none());
    }
}
