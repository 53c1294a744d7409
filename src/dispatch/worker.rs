//! A worker: one fragment connection of one query. It takes fragments from the query's
//! board until none is left for it, runs each in its own transaction on the server's
//! snapshot, and hands the rows to the merge. A connection failure sends the fragment
//! back to the board and moves the worker to another server.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit};
use tracing::{debug, warn};

use super::board::{AfterFailure, Board, Delivery, FailKind, Next, Ticket};
use super::{FragmentEvent, QuerySpec};
use crate::backends::pool::PooledConnection;
use crate::protocol;

/// A reduced fragment's rows kept in memory, at most, before they are handed over.
const MAX_REDUCED_BYTES: usize = 256 << 20;

/// What all workers of one query share.
pub(super) struct Shared {
    pub spec: QuerySpec,
    pub board: Mutex<Board>,
    pub changed: Notify,
    /// Cancelled when the query stops (the merge is over or gone).
    pub stop: tokio_util::sync::CancellationToken,
    /// Where each fragment's events go (one shared sender, or one per fragment).
    pub sinks: Vec<mpsc::Sender<FragmentEvent>>,
    /// Servers much slower than the query's fastest: they take the smallest fragments.
    pub slow: Vec<bool>,
    pub fragment_timeout: Option<Duration>,
    pub ban_after: u32,
    /// New connections opened so far, and when the query started (slow start).
    pub opened: std::sync::atomic::AtomicUsize,
    pub started: Instant,
    pub slow_start: Duration,
    /// The servers this query counts as running on (fair shares) until it is dropped,
    /// when its last worker leaves.
    pub present_on: Vec<usize>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        for s in &self.present_on {
            if let Some(server) = self.spec.servers.get(*s) {
                server.pool.stats.query_ended();
            }
        }
    }
}

impl Shared {
    fn sink(&self, fragment: usize) -> Option<&mpsc::Sender<FragmentEvent>> {
        if self.sinks.len() == 1 {
            self.sinks.first()
        } else {
            self.sinks.get(fragment)
        }
    }

    fn with_board<T>(&self, f: impl FnOnce(&mut Board) -> T) -> Option<T> {
        let out = self.board.lock().ok().map(|mut b| f(&mut b));
        self.changed.notify_waiters();
        out
    }

    async fn report(
        &self,
        fragment: usize,
        error: Option<BytesMut>,
        cause: String,
        conclusive: bool,
    ) {
        if let Some(tx) = self.sink(fragment) {
            let _ = tx
                .send(FragmentEvent::Failed {
                    index: fragment,
                    error,
                    cause,
                    conclusive,
                })
                .await;
        }
    }
}

/// How an attempt ended.
enum End {
    /// Finished and its rows count.
    Won,
    /// Another copy won; the connection is clean.
    Lost,
}

/// Why an attempt failed.
enum AttemptError {
    /// Lost connection or a fatal server error: worth another backend.
    Connection(String),
    /// The statement's own error.
    Sql(BytesMut),
    /// Cancelled: another copy won, or the query stopped.
    Stopped,
    /// The merge is gone.
    MergeGone,
    /// `fragment_timeout` passed.
    Timeout,
    /// A reduced fragment's rows outgrew memory.
    TooLarge,
}

/// How often a given-up connection's CancelRequest is sent again, and how long it may take
/// in all before the connection is closed regardless.
const RECANCEL_EVERY: Duration = Duration::from_millis(100);
const CANCEL_LIMIT: Duration = Duration::from_secs(10);

/// Stops a fragment that may still run on `conn`, then closes it, in the background. A
/// CancelRequest that reaches the server before the statement starts is ignored, and a
/// closed socket goes unnoticed while a statement runs, so the cancel is sent again until
/// the fragment's pipeline ends (ReadyForQuery after its COMMIT: idle, `I`) or the
/// connection fails. The connection keeps its slot until then, since its backend is busy.
fn cancel_and_close(mut conn: PooledConnection) {
    conn.broken = true;
    let Some(target) = conn.cancel_target() else {
        return;
    };
    tokio::spawn(async move {
        let idle = async {
            while let Ok((tag, body)) = conn.next().await {
                if tag == b'Z' && body.first() == Some(&b'I') {
                    break;
                }
            }
        };
        let cancel = async {
            loop {
                let _ = target.cancel().await;
                tokio::time::sleep(RECANCEL_EVERY).await;
            }
        };
        let _ = tokio::time::timeout(CANCEL_LIMIT, async {
            tokio::select! {
                _ = idle => {}
                _ = cancel => {}
            }
        })
        .await;
        drop(conn);
    });
}

/// Runs one worker on `server` with a reserved slot until the query needs it no more.
pub(super) async fn run(shared: Arc<Shared>, mut server: usize, permit: OwnedSemaphorePermit) {
    let mut slot = Slot::Free(permit);
    loop {
        let conn = match slot {
            Slot::Conn(c) => *c,
            Slot::Free(p) => match connect(&shared, server, p).await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(cause) => {
                    let pool = &shared.spec.servers[server].pool;
                    debug!(query = shared.spec.query_id, backend = %pool.config.name, %cause, "fragment connection failed");
                    pool.stats.fragment_failed(true, shared.ban_after);
                    shared.with_board(|b| b.server_failed(server));
                    match move_elsewhere(&shared, &mut server).await {
                        Some(s) => {
                            slot = s;
                            continue;
                        }
                        None => break,
                    }
                }
            },
        };
        let ticket = match take(&shared, server).await {
            Taken::Ticket(t) => t,
            Taken::Done => break,
            Taken::Move => {
                drop(conn);
                match move_elsewhere(&shared, &mut server).await {
                    Some(s) => {
                        slot = s;
                        continue;
                    }
                    None => {
                        let stranded = shared.with_board(|b| b.stranded()).unwrap_or_default();
                        for fragment in stranded {
                            shared
                                .report(fragment, None, no_backend(fragment), false)
                                .await;
                        }
                        break;
                    }
                }
            }
        };
        let mut conn = conn;
        let pool = shared.spec.servers[server].pool.clone();
        let started = Instant::now();
        let result = {
            let _in_flight = pool.stats.fragment_started();
            attempt(&shared, &mut conn, server, &ticket).await
        };
        let elapsed = started.elapsed();
        let broken = !matches!(result, Ok(_) | Err(AttemptError::Sql(_)));
        let connection_failed = matches!(result, Err(AttemptError::Connection(_)));
        // the backend may still run the statement: stop it, and never reuse the connection
        let conn = match (broken, connection_failed) {
            (false, _) => Some(conn),
            (true, true) => {
                conn.broken = true;
                None
            }
            (true, false) => {
                cancel_and_close(conn);
                None
            }
        };
        let merge_gone = matches!(result, Err(AttemptError::MergeGone));
        match result {
            Ok(End::Won) => {
                let pages = shared.spec.fragments[ticket.fragment].pages;
                pool.stats.fragment_finished(pages, elapsed);
                if ticket.hedge {
                    debug!(query = shared.spec.query_id, fragment = ticket.fragment, backend = %pool.config.name, "hedged copy won");
                }
            }
            Ok(End::Lost) | Err(AttemptError::Stopped) => {
                shared.with_board(|b| b.abandon(&ticket));
            }
            other => on_failure(&shared, &ticket, server, other).await,
        }
        if merge_gone {
            shared.with_board(|b| b.close());
            break;
        }
        if connection_failed {
            match move_elsewhere(&shared, &mut server).await {
                Some(s) => {
                    slot = s;
                    continue;
                }
                None => break,
            }
        }
        slot = match conn {
            Some(conn) => Slot::Conn(Box::new(conn)),
            // the given-up connection keeps its slot until the backend is idle: the worker
            // goes on only if it gets another one
            None => match pool.try_reserve() {
                Some(p) => Slot::Free(p),
                None => break,
            },
        };
    }
    let orphans = shared
        .with_board(|b| b.worker_stopped(server))
        .unwrap_or_default();
    for fragment in orphans {
        shared
            .report(fragment, None, no_backend(fragment), false)
            .await;
    }
}

fn no_backend(fragment: usize) -> String {
    format!("no backend could run fragment {}", fragment + 1)
}

/// What [`take`] found.
enum Taken {
    Ticket(Ticket),
    Done,
    Move,
}

/// A worker's hold on its server: a slot, or a connection (which holds the slot).
enum Slot {
    Free(OwnedSemaphorePermit),
    Conn(Box<PooledConnection>),
}

/// Waits for the next ticket for `server`.
async fn take(shared: &Shared, server: usize) -> Taken {
    loop {
        let changed = shared.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let slow = shared.slow.get(server).copied().unwrap_or(false);
        let Some(next) = shared
            .board
            .lock()
            .ok()
            .map(|mut b| b.next(server, slow, Instant::now()))
        else {
            return Taken::Done;
        };
        match next {
            Next::Run(t) => {
                if t.hedge {
                    metrics::counter!(crate::metrics::FRAGMENT_HEDGES).increment(1);
                    debug!(query = shared.spec.query_id, fragment = t.fragment, backend = %shared.spec.servers[server].pool.config.name, "hedging a slow fragment");
                }
                return Taken::Ticket(t);
            }
            Next::Exit => return Taken::Done,
            Next::Move => return Taken::Move,
            Next::Wait(until) => {
                let sleep = async {
                    match until {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = changed => {}
                    _ = sleep => {}
                    _ = shared.stop.cancelled() => return Taken::Done,
                }
            }
        }
    }
}

/// A connection for the worker: an idle one at once, or a new one once slow start allows
/// (the k-th new connection of a query waits `slow_start * log2(k + 1)`); `None` when by
/// then no fragment waits for this server (a short query opens no connections it would
/// not use).
async fn connect(
    shared: &Shared,
    server: usize,
    permit: OwnedSemaphorePermit,
) -> Result<Option<PooledConnection>, String> {
    let pool = &shared.spec.servers[server].pool;
    let permit = match pool.acquire_idle(&shared.spec.login, permit) {
        Ok(c) => return Ok(Some(c)),
        Err(p) => p,
    };
    let k = shared
        .opened
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let step = usize::BITS - (k + 1).leading_zeros() - 1;
    let at = shared.started + shared.slow_start * step;
    tokio::select! {
        _ = tokio::time::sleep_until(at.into()) => {}
        _ = shared.stop.cancelled() => return Ok(None),
    }
    let wanted = shared
        .board
        .lock()
        .map(|b| b.has_work_for(server))
        .unwrap_or(false);
    if !wanted {
        return Ok(None);
    }
    pool.acquire_new(&shared.spec.login, permit)
        .await
        .map(Some)
        .map_err(|e| e.to_string())
}

/// After a connection failure: a slot on another server that still has work for it;
/// `server` becomes that server.
async fn move_elsewhere(shared: &Shared, server: &mut usize) -> Option<Slot> {
    let (to, permit) = find_slot(shared, *server).await?;
    let from = std::mem::replace(server, to);
    shared.with_board(|b| b.worker_moved(from, to));
    Some(Slot::Free(permit))
}

async fn find_slot(shared: &Shared, from: usize) -> Option<(usize, OwnedSemaphorePermit)> {
    let wanted = shared.board.lock().ok()?.wanted_servers();
    let candidates: Vec<usize> = wanted
        .into_iter()
        .filter(|s| *s != from && !shared.spec.servers[*s].pool.stats.is_banned())
        .collect();
    for s in &candidates {
        if let Some(p) = shared.spec.servers[*s].pool.try_reserve() {
            return Some((*s, p));
        }
    }
    // an ordered merge has no other worker to pick the fragment up: wait for a slot
    if shared.spec.delivery == Delivery::Ordered {
        if let Some(s) = candidates.first() {
            let p = shared.spec.servers[*s]
                .pool
                .reserve(1, super::RESERVE_WAIT)
                .await?;
            return Some((*s, p));
        }
    }
    None
}

/// Records a failed attempt and tells the board; reports the fragment's failure to the
/// merge when no retry is left.
async fn on_failure(
    shared: &Shared,
    ticket: &Ticket,
    server: usize,
    result: Result<End, AttemptError>,
) {
    let pool = &shared.spec.servers[server].pool;
    let (kind, error, cause, conclusive) = match result {
        Ok(_) | Err(AttemptError::Stopped) | Err(AttemptError::MergeGone) => return,
        Err(AttemptError::Connection(cause)) => {
            pool.stats.fragment_failed(true, shared.ban_after);
            (FailKind::Connection, None, cause, false)
        }
        Err(AttemptError::Sql(body)) => {
            pool.stats.fragment_failed(false, shared.ban_after);
            let (code, msg) = protocol::error_code_and_message(&body);
            let cause = format!("{}: {}", code.unwrap_or_default(), msg.unwrap_or_default());
            (FailKind::Final, Some(body), cause, false)
        }
        Err(AttemptError::Timeout) => {
            pool.stats.fragment_failed(false, shared.ban_after);
            let secs = shared.fragment_timeout.unwrap_or_default().as_secs_f64();
            let cause = format!("canceling statement due to fragment_timeout ({secs} s)");
            // the ErrorResponse body, without its type byte and length
            let message = protocol::ErrorFields::error("57014", cause.clone()).to_bytes();
            let body = BytesMut::from(message.get(5..).unwrap_or_default());
            (FailKind::Final, Some(body), cause, true)
        }
        Err(AttemptError::TooLarge) => (
            FailKind::Final,
            None,
            "partial rows too large".to_string(),
            false,
        ),
    };
    let after = shared
        .with_board(|b| b.fail(ticket, server, kind))
        .unwrap_or(AfterFailure::Report);
    match after {
        AfterFailure::Ignore => {}
        AfterFailure::Retry => {
            metrics::counter!(crate::metrics::FRAGMENT_RETRIES).increment(1);
            warn!(query = shared.spec.query_id, fragment = ticket.fragment, backend = %pool.config.name, %cause, "fragment failed; retrying on another backend");
        }
        AfterFailure::Report => {
            shared
                .report(ticket.fragment, error, cause, conclusive)
                .await
        }
    }
}

/// One attempt, bounded by the fragment timeout and the ticket's stop token.
async fn attempt(
    shared: &Shared,
    conn: &mut PooledConnection,
    server: usize,
    ticket: &Ticket,
) -> Result<End, AttemptError> {
    let run = run_fragment(shared, conn, server, ticket);
    let limit = async {
        match shared.fragment_timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = run => r,
        _ = ticket.stop.cancelled() => Err(AttemptError::Stopped),
        _ = limit => Err(AttemptError::Timeout),
    }
}

/// Whether an ErrorResponse means the connection (not the statement) failed: FATAL or
/// PANIC, a connection exception (08), or an operator intervention that ends sessions
/// (57P01-57P03: shutdown, crash, cannot connect now).
fn connection_error(body: &[u8]) -> bool {
    protocol::error_fields(body).any(|(field, value)| match field {
        b'V' => matches!(value, b"FATAL" | b"PANIC"),
        b'C' => value.starts_with(b"08") || matches!(value, b"57P01" | b"57P02" | b"57P03"),
        _ => false,
    })
}

async fn run_fragment(
    shared: &Shared,
    conn: &mut PooledConnection,
    server: usize,
    ticket: &Ticket,
) -> Result<End, AttemptError> {
    let index = ticket.fragment;
    let spec = &shared.spec;
    let Some(tx) = shared.sink(index) else {
        return Err(AttemptError::MergeGone);
    };
    let reduced = spec.delivery == Delivery::Reduced;
    let mut out = BytesMut::new();
    protocol::put_query(&mut out, &spec.servers[server].setup);
    protocol::put_parse(&mut out, "", &spec.fragments[index].sql, &spec.param_types);
    protocol::put_bind(
        &mut out,
        "",
        "",
        &spec.params,
        &[],
        &spec.params.result_formats,
    );
    protocol::put_describe_or_close(&mut out, b'D', b'P', "");
    protocol::put_execute(&mut out, "");
    protocol::put_empty(&mut out, b'S');
    protocol::put_query(&mut out, "COMMIT");
    conn.send(&out)
        .await
        .map_err(|e| AttemptError::Connection(e.to_string()))?;
    let started = Instant::now();
    let mut description: Option<bytes::Bytes> = None;
    let mut claimed = false;
    let mut kept: Vec<bytes::Bytes> = Vec::new();
    let mut kept_bytes = 0usize;
    let mut error: Option<BytesMut> = None;
    let mut ready = 0;
    let send =
        |ev: FragmentEvent| async move { tx.send(ev).await.map_err(|_| AttemptError::MergeGone) };
    while ready < 3 {
        // a merge that stops (cancel, LIMIT reached, client gone) drops its receiver:
        // stop waiting for the backend at once, so the caller cancels its work
        let (tag, body) = tokio::select! {
            m = conn.next() => m.map_err(|e| AttemptError::Connection(e.to_string()))?,
            _ = tx.closed() => return Err(AttemptError::MergeGone),
        };
        match tag {
            // ready == 1: past the setup query, inside the fragment's own reply
            b'T' if error.is_none() && ready == 1 => description = Some(body.freeze()),
            b'D' if error.is_none() && ready == 1 => {
                let mut message = BytesMut::with_capacity(body.len() + 5);
                protocol::put_message(&mut message, b'D', &body);
                let message = message.freeze();
                if reduced {
                    kept_bytes += message.len();
                    if kept_bytes > MAX_REDUCED_BYTES {
                        return Err(AttemptError::TooLarge);
                    }
                    kept.push(message);
                    continue;
                }
                if !claimed {
                    if !shared.with_board(|b| b.claim(ticket)).unwrap_or(false) {
                        return Err(AttemptError::Stopped);
                    }
                    claimed = true;
                    if let Some(body) = description.take() {
                        send(FragmentEvent::Described { index, body }).await?;
                    }
                }
                send(FragmentEvent::Row { index, message }).await?;
            }
            b'E' => {
                if connection_error(&body) {
                    return Err(AttemptError::Connection({
                        let (code, msg) = protocol::error_code_and_message(&body);
                        format!("{}: {}", code.unwrap_or_default(), msg.unwrap_or_default())
                    }));
                }
                error.get_or_insert(body);
            }
            b'Z' => ready += 1,
            _ => {}
        }
    }
    if let Some(e) = error {
        return Err(AttemptError::Sql(e));
    }
    let secs = started.elapsed().as_secs_f64();
    if !shared
        .with_board(|b| b.finish(ticket, secs))
        .unwrap_or(false)
    {
        return Ok(End::Lost);
    }
    if let Some(body) = description {
        send(FragmentEvent::Described { index, body }).await?;
    }
    for message in kept {
        send(FragmentEvent::Row { index, message }).await?;
    }
    send(FragmentEvent::Done { index }).await?;
    Ok(End::Won)
}
