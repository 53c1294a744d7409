//! Periodic health checks: each backend answers a query on one of its fragment
//! connections (logged in as the last user that ran fragments there). A success re-admits
//! a banned backend; failures count towards a ban. The same query measures each replica's
//! replay position against the primary's WAL position.

use std::sync::Arc;
use std::time::Duration;

use tracing::debug;

use super::pool::{BackendPool, FragmentPools};
use crate::relay::fanout::parse_lsn;

/// The query of a health check: recovery state and WAL position.
const CHECK_SQL: &str = "SELECT pg_is_in_recovery(), (CASE WHEN pg_is_in_recovery() \
     THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text";

/// Runs the health checks every `interval` for as long as the process lives.
pub fn spawn(pools: Arc<FragmentPools>, interval: Duration, ban_after: u32) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            check_all(&pools, interval, ban_after).await;
        }
    });
}

/// Checks every backend once, the primary first (its WAL position is the reference of
/// the replicas' lag).
pub async fn check_all(pools: &FragmentPools, interval: Duration, ban_after: u32) {
    let limit = interval.max(Duration::from_secs(2));
    let mut primary_lsn = None;
    for pool in &pools.backends {
        let Some(result) = check(pool, limit).await else {
            continue;
        };
        match result {
            Ok(lsn) => {
                pool.stats.health_ok();
                if pool.index == 0 {
                    primary_lsn = lsn;
                } else if let (Some(p), Some(r)) = (primary_lsn, lsn) {
                    pool.stats.set_replica_lag(p.saturating_sub(r));
                }
            }
            Err(cause) => {
                debug!(backend = %pool.config.name, %cause, "health check failed");
                pool.stats.connection_failed(ban_after, "health check");
            }
        }
    }
}

/// One backend's check: its WAL (or replay) position. `None` when there is nothing to
/// check with: no login has used it yet, or every slot is running fragments (which report
/// on its health themselves).
async fn check(pool: &Arc<BackendPool>, limit: Duration) -> Option<Result<Option<u64>, String>> {
    let login = pool.last_login()?;
    let permit = pool.try_reserve()?;
    let query = async {
        let mut conn = pool
            .acquire_reserved(&login, permit)
            .await
            .map_err(|e| e.to_string())?;
        let rows = conn.simple_query(CHECK_SQL).await?;
        Ok(rows
            .first()
            .and_then(|r| r.get(1).cloned().flatten())
            .and_then(|l| parse_lsn(&l)))
    };
    Some(
        tokio::time::timeout(limit, query)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {limit:?}"))),
    )
}
