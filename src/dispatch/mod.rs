//! The adaptive scheduler: runs a query's fragments on the backends' fragment
//! connections and streams their results back as [`FragmentEvent`]s over bounded channels
//! (so a slow client slows the fragments down instead of filling memory).
//!
//! A query gets workers (fragment connections) on each usable backend, as many as the
//! backend's free budget and its fair share among running queries allow; the fragments
//! wait on a board, largest first, and an idle worker takes the next one (so a slow
//! backend runs fewer). A straggler is hedged on an idle worker of another backend; a
//! fragment whose connection fails is retried elsewhere while none of its rows has reached
//! the merge. Dropping [`Running`] cancels every fragment still running.

mod board;
mod worker;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit};
use tokio_util::sync::{CancellationToken, DropGuard};

pub use board::Delivery;

use crate::backends::pool::{BackendPool, LoginKey};
use crate::config::{BackendRole, DispatchMode, FanoutConfig};
use crate::protocol::BindParams;

/// Events per channel slot: bounded, so memory does not grow with the result.
const CHANNEL_DEPTH: usize = 256;
/// Events per fragment in an ordered merge.
const ORDERED_CHANNEL_DEPTH: usize = 64;
/// How long a merge that runs every fragment at once waits for its slots before passing
/// through.
pub const RESERVE_WAIT: Duration = Duration::from_secs(2);
/// A backend this many times slower than the query's fastest takes the smallest
/// fragments, so that it does not finish last with a large one.
const SLOW_FACTOR: f64 = 2.0;

/// A server a query's fragments may run on.
pub struct Server {
    /// Its fragment pool.
    pub pool: Arc<BackendPool>,
    /// Statements each fragment runs first, in one simple query (BEGIN, snapshot import,
    /// settings).
    pub setup: String,
}

/// One fragment.
pub struct Fragment {
    /// The fragment SQL.
    pub sql: String,
    /// Estimated heap pages it reads (orders the work, measures throughput).
    pub pages: u64,
}

/// Everything the dispatcher needs to run one query's fragments.
pub struct QuerySpec {
    /// The fragments.
    pub fragments: Vec<Fragment>,
    /// The servers, each with its snapshot.
    pub servers: Vec<Server>,
    /// Parameter types as the client declared them.
    pub param_types: Vec<u32>,
    /// The client's parameters and the wanted result formats.
    pub params: BindParams,
    /// Who the fragment connections log in as.
    pub login: LoginKey,
    /// For logs.
    pub query_id: u64,
    /// How rows reach the merge.
    pub delivery: Delivery,
}

/// What a fragment reports.
#[derive(Debug)]
pub enum FragmentEvent {
    /// The fragment's RowDescription body (once, before its rows).
    Described {
        /// Fragment index.
        index: usize,
        /// RowDescription body.
        body: Bytes,
    },
    /// One DataRow message, whole (type byte and length included).
    Row {
        /// Fragment index.
        index: usize,
        /// The message bytes.
        message: Bytes,
    },
    /// The fragment finished.
    Done {
        /// Fragment index.
        index: usize,
    },
    /// The fragment failed and no backend will run it again; `error` is the ErrorResponse
    /// body, or `None` for a lost connection.
    Failed {
        /// Fragment index.
        index: usize,
        /// The server's ErrorResponse body.
        error: Option<BytesMut>,
        /// Human-readable cause, for logs.
        cause: String,
        /// The error is the answer even before any row reached the client (a fragment
        /// timeout), rather than a reason to pass the statement through.
        conclusive: bool,
    },
}

/// The event streams of a running query.
pub enum Events {
    /// One stream for all fragments.
    Shared(mpsc::Receiver<FragmentEvent>),
    /// One stream per fragment, by index.
    Each(Vec<mpsc::Receiver<FragmentEvent>>),
}

/// A running query's fragments; dropping it stops them all.
pub struct Running {
    /// Their events.
    pub events: Events,
    /// Workers granted per server, for logs.
    pub workers: Vec<usize>,
    _stop: DropGuard,
}

impl Running {
    /// The event streams, and the guard that stops every fragment when dropped.
    pub fn into_parts(self) -> (Events, DropGuard) {
        (self.events, self._stop)
    }
}

/// Fragment connections a query could get on `pools`: with `load`, what is free now,
/// per backend at most its fair share among the queries running there (at least 2, so
/// the newest query still fans out while slots are free); without, the budgets (what an
/// idle pgfan would use; static dispatch always plans so). A replica's snapshot takes one
/// of its connections for the whole query, so it is not counted.
pub fn available_slots<'a>(
    pools: impl IntoIterator<Item = &'a Arc<BackendPool>>,
    cfg: &FanoutConfig,
    load: bool,
) -> usize {
    pools
        .into_iter()
        .filter(|p| !p.stats.is_banned())
        .map(|p| {
            let n = if load && cfg.dispatch == DispatchMode::Adaptive {
                p.free_slots().min(fair_share(p))
            } else {
                p.capacity()
            };
            if p.config.role == BackendRole::Replica {
                n.saturating_sub(1)
            } else {
                n
            }
        })
        .sum()
}

fn fair_share(p: &BackendPool) -> usize {
    let active = p.stats.active_queries();
    p.capacity().div_ceil(active + 1).max(2)
}

/// Starts the query's fragments. `None` when it cannot get at least two fragment
/// connections (or, for a merge that runs every fragment at once, one per fragment within
/// [`RESERVE_WAIT`]): nothing has run, and the caller passes the statement through.
/// The workers run on the caller's runtime: the session's thread, whose event loop also
/// runs the merge, so a row handed from a worker to the merge wakes no other thread.
pub async fn start(spec: QuerySpec, cfg: &FanoutConfig) -> Option<Running> {
    let n = spec.fragments.len();
    let all_at_once = spec.delivery == Delivery::Ordered || cfg.dispatch == DispatchMode::Static;
    let slow = slow_servers(&spec.servers);
    let (grants, pinned) = if all_at_once {
        let (g, p) = reserve_each(&spec.servers, n).await?;
        (g, (cfg.dispatch == DispatchMode::Static).then_some(p))
    } else {
        (grant(&spec.servers, &slow, n), None)
    };
    if grants.len() < 2 {
        return None;
    }
    let mut workers = vec![0; spec.servers.len()];
    for (s, _) in &grants {
        workers[*s] += 1;
    }
    let stop = CancellationToken::new();
    let pages: Vec<u64> = spec.fragments.iter().map(|f| f.pages).collect();
    let board = board::Board::new(
        &pages,
        spec.servers.len(),
        spec.delivery,
        cfg.hedge_after,
        pinned,
        stop.clone(),
    );
    let (sinks, events) = if spec.delivery == Delivery::Ordered {
        let (txs, rxs): (Vec<_>, Vec<_>) =
            (0..n).map(|_| mpsc::channel(ORDERED_CHANNEL_DEPTH)).unzip();
        (txs, Events::Each(rxs))
    } else {
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        (vec![tx], Events::Shared(rx))
    };
    let present_on: Vec<usize> = (0..workers.len()).filter(|s| workers[*s] > 0).collect();
    for s in &present_on {
        spec.servers[*s].pool.stats.query_began();
    }
    let shared = Arc::new(worker::Shared {
        spec,
        board: std::sync::Mutex::new(board),
        changed: Notify::new(),
        stop: stop.clone(),
        sinks,
        slow,
        fragment_timeout: cfg.fragment_timeout,
        ban_after: cfg.ban_after_failures,
        opened: std::sync::atomic::AtomicUsize::new(0),
        started: Instant::now(),
        slow_start: cfg.slow_start,
        present_on,
    });
    if let Ok(mut b) = shared.board.lock() {
        for (server, _) in &grants {
            b.worker_started(*server);
        }
    }
    for (server, permit) in grants {
        let shared = shared.clone();
        tokio::spawn(worker::run(shared, server, permit));
    }
    Some(Running {
        events,
        workers,
        _stop: stop.drop_guard(),
    })
}

/// Slots for a queue-fed query: one at a time round the servers (so each gets its share
/// while slots last), each server at most its fair share (half of it for a slow one), all
/// together at most one per fragment. Banned backends get none.
fn grant(
    servers: &[Server],
    slow: &[bool],
    fragments: usize,
) -> Vec<(usize, OwnedSemaphorePermit)> {
    // a backend much slower than the fastest gets half its share: its connections would
    // mostly wait for its CPU, and the work it does not take goes to the faster ones
    let shares: Vec<usize> = servers
        .iter()
        .zip(slow)
        .map(|(s, slow)| match (s.pool.stats.is_banned(), slow) {
            (true, _) => 0,
            (false, true) => fair_share(&s.pool).div_ceil(2),
            (false, false) => fair_share(&s.pool),
        })
        .collect();
    let mut out: Vec<(usize, OwnedSemaphorePermit)> = Vec::new();
    let mut taken = vec![0; servers.len()];
    let mut progress = true;
    while out.len() < fragments && progress {
        progress = false;
        for (i, s) in servers.iter().enumerate() {
            if out.len() >= fragments || taken[i] >= shares[i] {
                continue;
            }
            if let Some(p) = s.pool.try_reserve() {
                taken[i] += 1;
                out.push((i, p));
                progress = true;
            }
        }
    }
    out
}

/// One slot per fragment, dealt round the healthy servers (skipping a server once it
/// has as many as it has free slots, when all together have enough), reserved backend by
/// backend in index order (no two queries wait on each other in a cycle). Returns the
/// slots and each fragment's server.
async fn reserve_each(
    servers: &[Server],
    fragments: usize,
) -> Option<(Vec<(usize, OwnedSemaphorePermit)>, Vec<usize>)> {
    let healthy: Vec<usize> = (0..servers.len())
        .filter(|i| !servers[*i].pool.stats.is_banned())
        .collect();
    if healthy.is_empty() {
        return None;
    }
    let free: Vec<usize> = servers.iter().map(|s| s.pool.free_slots()).collect();
    let enough = healthy.iter().map(|s| free[*s]).sum::<usize>() >= fragments;
    let mut counts = vec![0; servers.len()];
    let mut assignment = Vec::with_capacity(fragments);
    let mut turn = 0;
    while assignment.len() < fragments {
        let s = healthy[turn % healthy.len()];
        turn += 1;
        if enough && counts[s] >= free[s] {
            continue;
        }
        counts[s] += 1;
        assignment.push(s);
    }
    let mut order: Vec<usize> = healthy.clone();
    order.sort_by_key(|s| servers[*s].pool.index);
    let mut out = Vec::with_capacity(fragments);
    for s in order {
        let n = assignment.iter().filter(|a| **a == s).count();
        if n == 0 {
            continue;
        }
        let mut permit = servers[s].pool.reserve(n, RESERVE_WAIT).await?;
        for _ in 1..n {
            out.push((s, permit.split(1)?));
        }
        out.push((s, permit));
    }
    Some((out, assignment))
}

/// Servers whose fragment throughput is below the fastest's by [`SLOW_FACTOR`].
fn slow_servers(servers: &[Server]) -> Vec<bool> {
    let rates: Vec<Option<f64>> = servers
        .iter()
        .map(|s| s.pool.stats.view().pages_per_second)
        .collect();
    let best = rates.iter().flatten().copied().fold(0.0, f64::max);
    rates
        .iter()
        .map(|r| r.is_some_and(|r| r * SLOW_FACTOR < best))
        .collect()
}
