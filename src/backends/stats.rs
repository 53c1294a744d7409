//! Live statistics of one backend: how fast its fragments run (EWMA of pages/s and of
//! latency), how many run now, its errors, and whether it is banned after repeated
//! connection failures. The dispatcher reads them to size and order a query's work; every
//! change is exported as a metric labelled with the backend's name.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tracing::{info, warn};

use crate::metrics as m;

/// Weight of the newest sample in the moving averages.
const EWMA_ALPHA: f64 = 0.3;

/// One backend's live statistics.
pub struct BackendStats {
    name: String,
    in_flight: AtomicUsize,
    /// Fan-out queries that hold fragment connections on the backend now.
    active_queries: AtomicUsize,
    fragments: AtomicU64,
    /// Read by every screening of a statement, so not behind the lock; changed under it.
    banned: AtomicBool,
    inner: Mutex<Moving>,
}

#[derive(Default)]
struct Moving {
    pages_per_second: Option<f64>,
    latency: Option<f64>,
    consecutive_failures: u32,
}

/// A copy of the moving figures, for the dispatcher.
#[derive(Debug, Clone, Copy, Default)]
pub struct StatsView {
    /// EWMA of one fragment connection's pages per second; `None` before any fragment.
    pub pages_per_second: Option<f64>,
    /// Banned: left out of new queries until a health check succeeds.
    pub banned: bool,
}

/// Counts a fragment as running until dropped.
pub struct InFlight<'a>(&'a BackendStats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let n = self.0.in_flight.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!(m::BACKEND_IN_FLIGHT, "backend" => self.0.name.clone()).set(n as f64);
    }
}

impl BackendStats {
    /// Statistics for the backend called `name`, exported as healthy.
    pub fn new(name: &str) -> Self {
        metrics::gauge!(m::BACKEND_HEALTHY, "backend" => name.to_string()).set(1.0);
        metrics::gauge!(m::BACKEND_IN_FLIGHT, "backend" => name.to_string()).set(0.0);
        metrics::counter!(m::BACKEND_FRAGMENTS, "backend" => name.to_string()).absolute(0);
        metrics::counter!(m::BACKEND_FRAGMENT_ERRORS, "backend" => name.to_string()).absolute(0);
        BackendStats {
            name: name.to_string(),
            in_flight: AtomicUsize::new(0),
            active_queries: AtomicUsize::new(0),
            fragments: AtomicU64::new(0),
            banned: AtomicBool::new(false),
            inner: Mutex::new(Moving::default()),
        }
    }

    /// The moving figures now.
    pub fn view(&self) -> StatsView {
        self.inner
            .lock()
            .map(|s| StatsView {
                pages_per_second: s.pages_per_second,
                banned: self.is_banned(),
            })
            .unwrap_or_default()
    }

    /// Banned: left out of new queries until a health check succeeds.
    pub fn is_banned(&self) -> bool {
        self.banned.load(Ordering::Relaxed)
    }

    /// Fragments that completed here since start.
    pub fn fragments(&self) -> u64 {
        self.fragments.load(Ordering::Relaxed)
    }

    /// Fan-out queries holding fragment connections here now.
    pub fn active_queries(&self) -> usize {
        self.active_queries.load(Ordering::Relaxed)
    }

    /// A query got fragment connections here.
    pub fn query_began(&self) {
        self.active_queries.fetch_add(1, Ordering::Relaxed);
    }

    /// A query that [began](Self::query_began) here is over.
    pub fn query_ended(&self) {
        self.active_queries.fetch_sub(1, Ordering::Relaxed);
    }

    /// Marks a fragment running until the guard drops.
    pub fn fragment_started(&self) -> InFlight<'_> {
        let n = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(m::BACKEND_IN_FLIGHT, "backend" => self.name.clone()).set(n as f64);
        InFlight(self)
    }

    /// A fragment of about `pages` heap pages completed in `elapsed`.
    pub fn fragment_finished(&self, pages: u64, elapsed: Duration) {
        self.fragments.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::BACKEND_FRAGMENTS, "backend" => self.name.clone()).increment(1);
        let secs = elapsed.as_secs_f64().max(1e-6);
        let rate = pages.max(1) as f64 / secs;
        let readmitted = {
            let Ok(mut s) = self.inner.lock() else { return };
            s.pages_per_second = Some(ewma(s.pages_per_second, rate));
            s.latency = Some(ewma(s.latency, secs));
            s.consecutive_failures = 0;
            metrics::gauge!(m::BACKEND_THROUGHPUT, "backend" => self.name.clone())
                .set(s.pages_per_second.unwrap_or(0.0));
            metrics::gauge!(m::BACKEND_LATENCY, "backend" => self.name.clone())
                .set(s.latency.unwrap_or(0.0));
            self.banned.load(Ordering::Relaxed) && self.banned.swap(false, Ordering::Relaxed)
        };
        if readmitted {
            self.export_health(true);
        }
    }

    /// A fragment failed; `connection`: the backend could not be reached or dropped the
    /// connection (counts towards a ban), rather than rejecting the statement.
    pub fn fragment_failed(&self, connection: bool, ban_after: u32) {
        metrics::counter!(m::BACKEND_FRAGMENT_ERRORS, "backend" => self.name.clone()).increment(1);
        if connection {
            self.connection_failed(ban_after, "fragment");
        }
    }

    /// A connection to the backend failed (`what`: fragment or health check); bans it
    /// after `ban_after` in a row.
    pub fn connection_failed(&self, ban_after: u32, what: &str) {
        let banned_now = {
            let Ok(mut s) = self.inner.lock() else { return };
            s.consecutive_failures = s.consecutive_failures.saturating_add(1);
            s.consecutive_failures >= ban_after && !self.banned.swap(true, Ordering::Relaxed)
        };
        if banned_now {
            warn!(backend = %self.name, cause = what, "backend banned after repeated connection failures");
            self.export_health(false);
        }
    }

    /// A health check succeeded: the failure count restarts, a ban ends.
    pub fn health_ok(&self) {
        let readmitted = {
            let Ok(mut s) = self.inner.lock() else { return };
            s.consecutive_failures = 0;
            self.banned.load(Ordering::Relaxed) && self.banned.swap(false, Ordering::Relaxed)
        };
        if readmitted {
            info!(backend = %self.name, "backend re-admitted after a successful health check");
            self.export_health(true);
        }
    }

    /// Records a replica's replay lag behind the primary.
    pub fn set_replica_lag(&self, bytes: u64) {
        metrics::gauge!(m::BACKEND_REPLICA_LAG, "backend" => self.name.clone()).set(bytes as f64);
    }

    fn export_health(&self, healthy: bool) {
        metrics::gauge!(m::BACKEND_HEALTHY, "backend" => self.name.clone()).set(if healthy {
            1.0
        } else {
            0.0
        });
    }
}

fn ewma(old: Option<f64>, sample: f64) -> f64 {
    match old {
        Some(o) => o + EWMA_ALPHA * (sample - o),
        None => sample,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_after_repeated_failures_and_readmits() {
        let s = BackendStats::new("t");
        s.connection_failed(3, "fragment");
        s.connection_failed(3, "fragment");
        assert!(!s.view().banned);
        s.connection_failed(3, "fragment");
        assert!(s.view().banned);
        s.health_ok();
        assert!(!s.view().banned);
    }

    #[test]
    fn moving_average_follows_samples() {
        let s = BackendStats::new("t");
        s.fragment_finished(100, Duration::from_secs(1));
        assert_eq!(s.view().pages_per_second, Some(100.0));
        s.fragment_finished(200, Duration::from_secs(1));
        let r = s.view().pages_per_second.unwrap_or(0.0);
        assert!((r - 130.0).abs() < 1e-9, "{r}");
        assert_eq!(s.fragments(), 2);
    }
}
