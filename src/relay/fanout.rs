//! Runs one fanned-out statement for a session: plan it, probe the session (snapshot,
//! settings, whether its transaction has written), dispatch the fragments, merge, and write
//! the result to the client in the protocol the client used.
//!
//! Until the first byte reaches the client, any surprise falls back to pass-through, so the
//! client gets PostgreSQL's own answer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info};

use crate::backends::pool::{decode_text_row, FragmentPools, LoginKey};
use crate::config::Config;
use crate::dispatch::{self, Delivery, Events, FragmentEvent, QuerySpec};
use crate::merge::ordered::OrderedMerge;
use crate::merge::{row_description_types, Concat, ConcatStep, PartialRows};
use crate::plan::cache::ScreenFacts;
use crate::plan::{
    self, CatalogCache, CombineSpec, MergeSpec, Route, SplitStrategy, TableInfo, TableSet,
};
use crate::protocol::{self, BindParams};

/// Partial rows beyond this many bytes make a combine fall back to pass-through.
const MAX_PARTIAL_BYTES: usize = 256 << 20;

static QUERY_IDS: AtomicU64 = AtomicU64::new(1);

/// Everything a session needs to fan statements out.
pub struct FanoutEnv {
    /// The configuration.
    pub config: Arc<Config>,
    /// Fragment pools.
    pub pools: Arc<FragmentPools>,
    /// Catalog cache.
    pub catalog: Arc<CatalogCache>,
    /// Parsed statements by text.
    pub statements: Arc<plan::cache::StatementCache>,
}

/// The statement to run, as the client sent it.
pub enum Request {
    /// A simple Query.
    Simple,
    /// An Execute of a bound portal.
    Extended {
        /// Parameter types of the client's Parse.
        param_types: Vec<u32>,
        /// The client's Bind.
        params: BindParams,
    },
}

/// How the fan-out attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing was sent: relay the statement to the primary as usual.
    PassThrough,
    /// The statement was answered; for a simple Query, with this ReadyForQuery status.
    Done(Option<u8>),
    /// The statement was answered with an error, and the primary connection was left as
    /// PostgreSQL would be after it: for a simple Query, with this ReadyForQuery status;
    /// in an extended batch, skipping messages until the client's Sync.
    Failed(Option<u8>),
    /// The client went away.
    ClientGone,
    /// The primary connection failed.
    BackendGone,
}

/// The session's primary connection, shared with the relay.
pub struct Pinned<'a, R, W> {
    /// Read half.
    pub rd: &'a mut R,
    /// Write half.
    pub wr: &'a mut W,
    /// Bytes read and not yet handled.
    pub buf: &'a mut BytesMut,
}

/// What the session probe found.
struct Probe {
    row_description: Option<BytesMut>,
    clean: bool,
    isolation: String,
    /// The OID each table name resolves to in the session (0: none).
    oids: Vec<u32>,
    snapshot: String,
    /// The primary's WAL position when the snapshot was taken.
    lsn: Option<u64>,
    settings: Vec<(&'static str, String)>,
}

/// Parses a `pg_lsn` text (`16/B374D848`) into a byte position.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// A replica that exported a snapshot for one query; its transaction stays open until the
/// query's fragments have imported it.
struct ReplicaSnapshot {
    conn: crate::backends::pool::PooledConnection,
    snapshot: String,
}

/// Opens a snapshot on every replica within `max_lag` bytes of the primary's `lsn`.
async fn replica_snapshots(
    env: &FanoutEnv,
    login: &LoginKey,
    lsn: Option<u64>,
    session_id: u64,
) -> Vec<ReplicaSnapshot> {
    let Some(primary_lsn) = lsn else {
        return vec![];
    };
    let mut out = Vec::new();
    for pool in env.pools.backends.iter().skip(1) {
        // a banned replica, or one without a slot for a worker besides the snapshot's own
        // connection, sits this query out rather than making it wait
        if pool.stats.is_banned() || pool.free_slots() < 2 {
            continue;
        }
        let Some(permit) = pool.try_reserve() else {
            continue;
        };
        let mut conn = match pool.acquire_reserved(login, permit).await {
            Ok(c) => c,
            Err(e) => {
                pool.stats
                    .connection_failed(env.config.fanout.ban_after_failures, "snapshot");
                debug!(session = session_id, backend = %pool.config.name, error = %e, "replica left out");
                continue;
            }
        };
        let rows = conn
            .simple_query(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
                 SELECT pg_export_snapshot(), pg_last_wal_replay_lsn()::text",
            )
            .await;
        let Ok(rows) = rows else {
            conn.broken = true;
            continue;
        };
        let row = rows.first().cloned().unwrap_or_default();
        let snapshot = row.first().cloned().flatten();
        let replayed = row.get(1).cloned().flatten().and_then(|l| parse_lsn(&l));
        let lag = replayed.map(|r| primary_lsn.saturating_sub(r));
        match (snapshot, lag) {
            (Some(snapshot), Some(lag)) if lag <= env.config.fanout.max_replica_lag_bytes => {
                out.push(ReplicaSnapshot { conn, snapshot })
            }
            _ => {
                debug!(session = session_id, backend = %pool.config.name, ?lag, "replica left out");
                let _ = conn.simple_query("ROLLBACK").await;
            }
        }
    }
    out
}

const SETTINGS: &[&str] = &[
    "TimeZone",
    "DateStyle",
    "IntervalStyle",
    "extra_float_digits",
    "bytea_output",
    "search_path",
    "client_encoding",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
];

enum Fail {
    Client,
    Backend,
}

/// Client bytes read (and kept for the relay) while a fan-out runs, at most.
const INTERRUPT_READ_LIMIT: usize = 1 << 20;

/// What stops a fan-out early: a CancelRequest for the session, or the client closing
/// its connection (noticed by reading ahead while the fan-out runs).
pub struct Interrupt<'a, CR> {
    /// The session's CancelRequests, subscribed when the statement starts (earlier ones
    /// do not concern it).
    pub cancel: tokio::sync::watch::Receiver<u64>,
    /// The client's read half.
    pub client: &'a mut CR,
    /// Where bytes the client sends meanwhile go (the relay handles them afterwards).
    pub pending: &'a mut BytesMut,
}

/// Why a fan-out stopped early.
enum Stop {
    Cancelled,
    ClientGone,
}

impl<CR: AsyncRead + Unpin> Interrupt<'_, CR> {
    /// Resolves when the fan-out must stop.
    async fn stopped(&mut self) -> Stop {
        loop {
            let reading = self.pending.len() < INTERRUPT_READ_LIMIT;
            tokio::select! {
                changed = self.cancel.changed() => {
                    if changed.is_ok() {
                        return Stop::Cancelled;
                    }
                    return std::future::pending::<Stop>().await;
                }
                read = self.client.read_buf(self.pending), if reading => match read {
                    Ok(0) | Err(_) => return Stop::ClientGone,
                    Ok(_) => {}
                },
            }
        }
    }

    /// The next event, or why the fan-out must stop.
    async fn next<T>(
        &mut self,
        events: &mut tokio::sync::mpsc::Receiver<T>,
    ) -> Result<Option<T>, Stop> {
        tokio::select! {
            ev = events.recv() => Ok(ev),
            stop = self.stopped() => Err(stop),
        }
    }
}

/// PostgreSQL's error for a cancelled statement.
fn cancelled_error() -> BytesMut {
    protocol::ErrorFields::error("57014", "canceling statement due to user request").to_bytes()
}

async fn write_client<W: AsyncWrite + Unpin>(w: &mut W, b: &[u8]) -> Result<(), Fail> {
    w.write_all(b).await.map_err(|_| Fail::Client)
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Pinned<'_, R, W> {
    async fn send(&mut self, b: &[u8]) -> Result<(), Fail> {
        self.wr.write_all(b).await.map_err(|_| Fail::Backend)?;
        self.wr.flush().await.map_err(|_| Fail::Backend)
    }

    /// Next message that is not asynchronous; notices, notifications and parameter
    /// changes go to the client as they come.
    async fn next<C: AsyncWrite + Unpin>(
        &mut self,
        client: &mut C,
    ) -> Result<(u8, BytesMut), Fail> {
        loop {
            let (tag, body) = protocol::read_message(self.rd, self.buf)
                .await
                .map_err(|_| Fail::Backend)?;
            match tag {
                b'N' | b'A' | b'S' => {
                    let mut m = BytesMut::new();
                    protocol::put_message(&mut m, tag, &body);
                    write_client(client, &m).await?;
                }
                _ => return Ok((tag, body)),
            }
        }
    }

    /// Leaves the primary as PostgreSQL would be after the statement failed: an error
    /// inside the batch (an Execute of a portal that does not exist; its message is not
    /// shown), so a transaction block is aborted; then, for a simple Query, the Sync and
    /// its status.
    async fn fail_statement<C: AsyncWrite + Unpin>(
        &mut self,
        client: &mut C,
        simple: bool,
    ) -> Result<Option<u8>, Fail> {
        let mut m = BytesMut::new();
        protocol::put_execute(&mut m, "pgfan_failed_statement");
        protocol::put_empty(&mut m, if simple { b'S' } else { b'H' });
        self.send(&m).await?;
        loop {
            let (tag, body) = self.next(client).await?;
            match tag {
                b'E' if !simple => return Ok(None),
                b'Z' => return Ok(Some(body.first().copied().unwrap_or(b'I'))),
                _ => {}
            }
        }
    }

    /// Sends Sync and returns the ReadyForQuery status.
    async fn sync<C: AsyncWrite + Unpin>(&mut self, client: &mut C) -> Result<u8, Fail> {
        let mut m = BytesMut::new();
        protocol::put_empty(&mut m, b'S');
        self.send(&m).await?;
        loop {
            let (tag, body) = self.next(client).await?;
            if tag == b'Z' {
                return Ok(body.first().copied().unwrap_or(b'I'));
            }
        }
    }
}

/// Runs `candidate` for the session if it fans out.
#[allow(clippy::too_many_arguments)]
pub async fn execute<R, W, C, CR>(
    env: &FanoutEnv,
    session_id: u64,
    login: &LoginKey,
    status: u8,
    candidate: &plan::Candidate,
    sql: &str,
    request: Request,
    pinned: &mut Pinned<'_, R, W>,
    client: &mut C,
    interrupt: &mut Interrupt<'_, CR>,
) -> Outcome
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    C: AsyncWrite + Unpin,
    CR: AsyncRead + Unpin,
{
    let query_id = QUERY_IDS.fetch_add(1, Ordering::Relaxed);
    let start = Instant::now();
    let result = run(
        env, session_id, query_id, login, status, candidate, sql, &request, pinned, client,
        interrupt,
    )
    .await;
    let outcome = match result {
        Ok(o) => o,
        Err(Fail::Client) => Outcome::ClientGone,
        Err(Fail::Backend) => Outcome::BackendGone,
    };
    if let (Outcome::Done(_) | Outcome::Failed(_), false) = (&outcome, candidate.explain) {
        metrics::counter!(crate::metrics::QUERIES_TOTAL, "route" => crate::metrics::ROUTE_FANOUT)
            .increment(1);
        metrics::histogram!(crate::metrics::QUERY_DURATION, "route" => crate::metrics::ROUTE_FANOUT)
            .record(start.elapsed().as_secs_f64());
    }
    let _ = client.flush().await;
    outcome
}

/// Ends a fan-out with `error` after the output so far: the primary is failed the same
/// way (see [`Pinned::fail_statement`]), and a simple Query gets its ReadyForQuery.
async fn answer_error<R, W, C>(
    pinned: &mut Pinned<'_, R, W>,
    client: &mut C,
    simple: bool,
    out: &[u8],
    mut error: BytesMut,
) -> Result<Outcome, Fail>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    C: AsyncWrite + Unpin,
{
    write_client(client, out).await?;
    let z = pinned.fail_statement(client, simple).await?;
    if let Some(z) = z {
        protocol::put_ready_for_query(&mut error, z);
    }
    write_client(client, &error).await?;
    Ok(Outcome::Failed(z))
}

/// How a fan-out stopped early ends: a cancel answers 57014, a closed client ends the
/// session (dropping the event streams has cancelled the fragments).
async fn answer_stop<R, W, C>(
    stop: Stop,
    pinned: &mut Pinned<'_, R, W>,
    client: &mut C,
    simple: bool,
    out: &[u8],
) -> Result<Outcome, Fail>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    C: AsyncWrite + Unpin,
{
    match stop {
        Stop::ClientGone => Ok(Outcome::ClientGone),
        Stop::Cancelled => answer_error(pinned, client, simple, out, cancelled_error()).await,
    }
}

fn passthrough(session_id: u64, query_id: u64, reason: &plan::PassReason) -> Outcome {
    debug!(session = session_id, query = query_id, reason = %reason, "pass-through");
    crate::metrics::count_passthrough(reason.label);
    Outcome::PassThrough
}

async fn table_info(
    env: &FanoutEnv,
    login: &LoginKey,
    table: &str,
) -> Result<Option<Arc<TableInfo>>, String> {
    if let Some(hit) = env.catalog.get(&login.1, table) {
        return Ok(hit);
    }
    let mut conn = env
        .pools
        .primary()
        .acquire(login)
        .await
        .map_err(|e| e.to_string())?;
    let info = plan::catalog::load_table(&mut conn, table)
        .await?
        .map(Arc::new);
    env.catalog.put(&login.1, table, info.clone());
    Ok(info)
}

/// The catalog entries of every table the candidate names; `Ok(None)` when one does not
/// exist (PostgreSQL then gives its own error).
async fn table_set(
    env: &FanoutEnv,
    login: &LoginKey,
    candidate: &plan::Candidate,
) -> Result<Option<TableSet>, String> {
    let mut entries = Vec::with_capacity(candidate.relations.len());
    for name in &candidate.relations {
        match table_info(env, login, name).await? {
            Some(t) => entries.push((name.clone(), t)),
            None => return Ok(None),
        }
    }
    Ok(Some(TableSet::new(entries)))
}

/// The catalog entries of every table the candidate names, from the cache only, with the
/// instant the first of them goes stale.
fn cached_table_set(
    env: &FanoutEnv,
    login: &LoginKey,
    candidate: &plan::Candidate,
) -> Option<(Option<TableSet>, Instant)> {
    let mut entries = Vec::with_capacity(candidate.relations.len());
    let mut fresh_until: Option<Instant> = None;
    for name in &candidate.relations {
        let (info, until) = env.catalog.get_fresh(&login.1, name)?;
        fresh_until = Some(fresh_until.map_or(until, |f| f.min(until)));
        match info {
            Some(t) => entries.push((name.clone(), t)),
            None => return Some((None, until)),
        }
    }
    let fresh_until = fresh_until.unwrap_or_else(Instant::now);
    Some((Some(TableSet::new(entries)), fresh_until))
}

/// The plan with the backends each fragment would run on.
///
/// `load`: size the plan by the fragment connections free now (a run) rather than by the
/// backends' budgets (EXPLAIN, which shows what an idle pgfan would do).
pub async fn route_for(
    env: &FanoutEnv,
    login: &LoginKey,
    status: u8,
    candidate: &plan::Candidate,
    load: bool,
) -> (Route, Vec<usize>) {
    if !env.config.fanout.enabled {
        return (
            Route::PassThrough(plan::PassReason::new("disabled", "fan-out is disabled")),
            vec![],
        );
    }
    match table_set(env, login, candidate).await {
        Ok(tables) => route_with(env, status, candidate, tables.as_ref(), load),
        Err(e) => (
            Route::PassThrough(plan::PassReason::new("catalog", format!("catalog: {e}"))),
            vec![],
        ),
    }
}

/// A pass-through verdict from cached catalog facts, and what it was judged under: a
/// session may keep it for the next text of the same shape while [`CachedPass::holds`].
#[derive(Debug, Clone)]
pub struct CachedPass {
    /// The label of the reason (the passthrough-reasons metric).
    pub label: &'static str,
    facts: ScreenFacts,
}

impl CachedPass {
    /// The facts the verdict was judged under are the same now, for a session in
    /// transaction status `status` (the session's database is fixed).
    pub fn holds(&self, env: &FanoutEnv, status: u8) -> bool {
        self.facts
            .hold(env.catalog.epoch(), usable_slots(env, status, false))
    }
}

/// Why the candidate passes through, judged from cached catalog facts only, or `None` when
/// it may fan out or a table it names is not cached. For a shape's template only a reason
/// that holds whatever the literals counts (`PassReason::holds_for_any_literal`). The
/// verdict is kept on the candidate while the catalog entries it read stay fresh and
/// unchanged and the fragment slots stay the same.
pub fn cached_pass(
    env: &FanoutEnv,
    login: &LoginKey,
    status: u8,
    candidate: &plan::Candidate,
) -> Option<CachedPass> {
    let slots = usable_slots(env, status, false);
    let catalog_epoch = env.catalog.epoch();
    let pass = |label: Option<&'static str>, facts| label.map(|label| CachedPass { label, facts });
    if let Some((verdict, facts)) = candidate.screen.get(&login.1, catalog_epoch, slots) {
        return pass(verdict, facts);
    }
    let (tables, fresh_until) = cached_table_set(env, login, candidate)?;
    let verdict = match route_from_slots(env, candidate, tables.as_ref(), slots) {
        Route::PassThrough(reason)
            if !candidate.literal_placeholders || reason.holds_for_any_literal() =>
        {
            Some(reason.label)
        }
        _ => None,
    };
    let facts = ScreenFacts {
        catalog_epoch,
        slots,
        fresh_until,
    };
    candidate.screen.put(&login.1, facts, verdict);
    pass(verdict, facts)
}

/// Fragment slots of the backends a statement may use: inside a transaction block
/// fragments import the session's snapshot, so only the primary's.
fn usable_slots(env: &FanoutEnv, status: u8, load: bool) -> usize {
    dispatch::available_slots(
        env.pools.backends.iter().filter(|b| usable(b, status)),
        &env.config.fanout,
        load,
    )
}

fn usable(backend: &crate::backends::pool::BackendPool, status: u8) -> bool {
    backend.index == 0 || status == b'I'
}

fn route_from_slots(
    env: &FanoutEnv,
    candidate: &plan::Candidate,
    tables: Option<&TableSet>,
    slots: usize,
) -> Route {
    match tables {
        Some(tables) => plan::plan_shared(candidate, tables, &env.config.fanout, slots),
        None => Route::PassThrough(plan::PassReason::new("unknown_table", "no such table")),
    }
}

fn route_with(
    env: &FanoutEnv,
    status: u8,
    candidate: &plan::Candidate,
    tables: Option<&TableSet>,
    load: bool,
) -> (Route, Vec<usize>) {
    let slots = usable_slots(env, status, load);
    let route = route_from_slots(env, candidate, tables, slots);
    let assignment = match &route {
        Route::FanOut(p) => {
            let usable: Vec<usize> = env
                .pools
                .backends
                .iter()
                .filter(|b| usable(b, status))
                .map(|b| b.index)
                .collect();
            (0..p.fragments.len())
                .map(|i| usable[i % usable.len()])
                .collect()
        }
        Route::PassThrough(_) => Vec::new(),
    };
    (route, assignment)
}

/// The EXPLAIN FANOUT lines of a route.
pub fn explain_lines(env: &FanoutEnv, route: &Route, assignment: &[usize]) -> Vec<String> {
    match route {
        Route::PassThrough(r) => vec![format!("PassThrough: {r}")],
        Route::FanOut(p) => {
            let mut lines = vec![format!(
                "FanOut: {} fragments, split {} on {}",
                p.fragments.len(),
                p.split.describe(),
                p.table
            )];
            for (i, sql) in p.fragments.iter().enumerate() {
                let backend = assignment
                    .get(i)
                    .map(|b| env.pools.backends[*b].config.name.as_str())
                    .unwrap_or("?");
                lines.push(format!("  Fragment {} on {backend}: {sql}", i + 1));
            }
            for c in &p.co_ranges {
                lines.push(format!("  Co-range: {c}"));
            }
            lines.push(format!("  {}", p.merge.describe()));
            lines
        }
    }
}

/// Writes a one-column text result (`QUERY PLAN`) and its CommandComplete.
pub fn put_text_result(out: &mut BytesMut, column: &str, lines: &[String], tag: &str) {
    use bytes::BufMut;
    let start = out.len();
    out.put_u8(b'T');
    out.put_i32(0);
    out.put_i16(1);
    protocol::put_cstr(out, column);
    out.put_u32(0);
    out.put_i16(0);
    out.put_u32(25);
    out.put_i16(-1);
    out.put_i32(-1);
    out.put_i16(0);
    protocol::patch_len(out, start);
    put_text_rows(out, lines, tag);
}

/// Writes one-column text DataRows and their CommandComplete (an Execute's answer).
pub fn put_text_rows(out: &mut BytesMut, lines: &[String], tag: &str) {
    use bytes::BufMut;
    for l in lines {
        let start = out.len();
        out.put_u8(b'D');
        out.put_i32(0);
        out.put_i16(1);
        out.put_i32(l.len() as i32);
        out.put_slice(l.as_bytes());
        protocol::patch_len(out, start);
    }
    protocol::put_command_complete(out, tag);
}

#[allow(clippy::too_many_arguments)]
async fn run<R, W, C, CR>(
    env: &FanoutEnv,
    session_id: u64,
    query_id: u64,
    login: &LoginKey,
    status: u8,
    candidate: &plan::Candidate,
    sql: &str,
    request: &Request,
    pinned: &mut Pinned<'_, R, W>,
    client: &mut C,
    interrupt: &mut Interrupt<'_, CR>,
) -> Result<Outcome, Fail>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    C: AsyncWrite + Unpin,
    CR: AsyncRead + Unpin,
{
    let simple = matches!(request, Request::Simple);
    // the assignment is what EXPLAIN shows; a run assigns after the replicas' lag check
    let (route, assignment) = route_for(env, login, status, candidate, !candidate.explain).await;
    if candidate.explain {
        let lines = explain_lines(env, &route, &assignment);
        let mut out = BytesMut::new();
        if simple {
            put_text_result(&mut out, "QUERY PLAN", &lines, "EXPLAIN");
            protocol::put_ready_for_query(&mut out, status);
        } else {
            put_text_rows(&mut out, &lines, "EXPLAIN");
        }
        write_client(client, &out).await?;
        return Ok(Outcome::Done(simple.then_some(status)));
    }
    let plan = match route {
        Route::PassThrough(reason) => return Ok(passthrough(session_id, query_id, &reason)),
        Route::FanOut(p) => p,
    };
    // an ordered merge reads its keys from hidden binary columns after the client's
    let ordered_formats = match (&plan.merge, request) {
        (MergeSpec::Ordered { keys, visible, .. }, Request::Extended { params, .. }) => {
            match hidden_key_formats(&params.result_formats, *visible, keys.len()) {
                Some(f) => Some(f),
                None => {
                    let reason = plan::PassReason::new(
                        "result_formats",
                        "result format codes do not match the columns",
                    );
                    return Ok(passthrough(session_id, query_id, &reason));
                }
            }
        }
        (MergeSpec::Ordered { keys, visible, .. }, Request::Simple) => {
            hidden_key_formats(&[], *visible, keys.len())
        }
        _ => None,
    };

    // probe the session: row description (simple protocol), snapshot, settings
    let probe = probe(pinned, client, simple, sql, &candidate.relations).await?;
    let probe = match probe {
        Ok(p) => p,
        Err(error) => {
            // PostgreSQL rejected the statement itself: that is the answer
            let mut out = BytesMut::new();
            protocol::put_message(&mut out, b'E', &error);
            write_client(client, &out).await?;
            let z = if simple {
                Some(pinned.sync(client).await?)
            } else {
                None
            };
            if let Some(z) = z {
                let mut out = BytesMut::new();
                protocol::put_ready_for_query(&mut out, z);
                write_client(client, &out).await?;
            }
            // the primary itself failed the statement: in a batch it now skips to Sync
            return Ok(Outcome::Failed(z));
        }
    };
    let reason = if !probe.clean {
        Some(plan::PassReason::new(
            "wrote",
            "the transaction has written",
        ))
    } else if probe.isolation == "serializable" {
        Some(plan::PassReason::new(
            "serializable",
            "SERIALIZABLE transaction",
        ))
    } else if probe.oids.contains(&0) {
        Some(plan::PassReason::new(
            "unknown_table",
            "no such table in this session",
        ))
    } else if candidate
        .relations
        .iter()
        .map(|r| env.catalog.get(&login.1, r).flatten().map(|t| t.oid))
        .collect::<Option<Vec<u32>>>()
        != Some(probe.oids.clone())
    {
        Some(plan::PassReason::new(
            "search_path",
            "a table name resolves differently in this session",
        ))
    } else {
        None
    };
    if let Some(reason) = reason {
        if simple {
            pinned.sync(client).await?;
        }
        return Ok(passthrough(session_id, query_id, &reason));
    }

    let mut sets: Vec<String> = probe
        .settings
        .iter()
        .map(|(k, v)| {
            format!(
                "set_config({}, {}, true)",
                plan::catalog::quote_literal(k),
                plan::catalog::quote_literal(v)
            )
        })
        .collect();
    if matches!(plan.split, SplitStrategy::Partitions { .. }) {
        // a fragment reads partitions directly: PostgreSQL skips one the WHERE excludes
        // only with constraint exclusion on
        sets.push("set_config('constraint_exclusion', 'on', true)".into());
    }
    let setup_for = |snapshot: &str| {
        format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}; SELECT {}",
            plan::catalog::quote_literal(snapshot),
            sets.join(", ")
        )
    };
    // replicas take part only outside a transaction block (they cannot import the
    // session's snapshot), each with its own snapshot, within the configured lag
    let replicas = if status == b'I' && env.pools.backends.len() > 1 {
        replica_snapshots(env, login, probe.lsn, session_id).await
    } else {
        vec![]
    };
    let mut servers = vec![(env.pools.primary().clone(), setup_for(&probe.snapshot))];
    for r in &replicas {
        servers.push((
            env.pools.backends[r.conn.backend().index].clone(),
            setup_for(&r.snapshot),
        ));
    }

    let (param_types, params) = match request {
        Request::Simple => (vec![], BindParams::default()),
        Request::Extended {
            param_types,
            params,
        } => (param_types.clone(), params.clone()),
    };
    let combine = matches!(plan.merge, MergeSpec::Combine(_));
    let mut fragment_params = params.clone();
    if combine {
        fragment_params.result_formats = vec![1];
    }
    if let Some(formats) = ordered_formats {
        fragment_params.result_formats = formats;
    }
    let delivery = match &plan.merge {
        MergeSpec::Ordered { .. } => Delivery::Ordered,
        MergeSpec::Concat { .. } => Delivery::Stream,
        MergeSpec::Combine(_) => Delivery::Reduced,
    };
    let spec = QuerySpec {
        fragments: plan
            .fragments
            .iter()
            .zip(&plan.pages)
            .map(|(sql, pages)| dispatch::Fragment {
                sql: sql.clone(),
                pages: *pages,
            })
            .collect(),
        servers: servers
            .into_iter()
            .map(|(pool, setup)| dispatch::Server { pool, setup })
            .collect(),
        param_types: param_types.clone(),
        params: fragment_params,
        login: login.clone(),
        query_id,
        delivery,
    };
    let Some(running) = dispatch::start(spec, &env.config.fanout).await else {
        if simple {
            pinned.sync(client).await?;
        }
        let reason = plan::PassReason::new("pool_busy", "fewer than 2 fragment connections free");
        return Ok(passthrough(session_id, query_id, &reason));
    };
    info!(
        session = session_id,
        query = query_id,
        fragments = plan.fragments.len(),
        workers = ?running.workers,
        split = %plan.split.describe(),
        table = %plan.table,
        "fan-out"
    );
    // the fragments stop when the merge drops its streams, or at the latest here
    let (events, _stop) = running.into_parts();
    let total = plan.fragments.len();
    // the exporting transactions end once the merge is over
    let _replicas = ReleaseOnDrop(replicas);

    match &plan.merge {
        MergeSpec::Ordered {
            keys,
            visible,
            limit,
            offset,
        } => {
            let Events::Each(streams) = events else {
                return Err(Fail::Backend);
            };
            let merge = OrderedMerge::new(keys.clone(), *visible, total);
            let ctx = MergeContext {
                session_id,
                query_id,
                simple,
                row_description: probe.row_description.as_deref(),
            };
            let concat = Concat::new(*limit, *offset);
            merge_ordered(ctx, merge, streams, concat, pinned, client, interrupt).await
        }
        MergeSpec::Concat { limit, offset } => {
            let Events::Shared(mut events) = events else {
                return Err(Fail::Backend);
            };
            let mut concat = Concat::new(*limit, *offset);
            let mut rows = RowsOut::new(MergeContext {
                session_id,
                query_id,
                simple,
                row_description: probe.row_description.as_deref(),
            });
            let mut done = 0;
            while done < total && !concat.full() {
                let ev = match interrupt.next(&mut events).await {
                    Ok(Some(ev)) => ev,
                    Ok(None) => break,
                    Err(stop) => {
                        drop(events);
                        return rows.stopped(stop, pinned, client).await;
                    }
                };
                match ev {
                    FragmentEvent::Described { .. } => {}
                    FragmentEvent::Done { .. } => done += 1,
                    FragmentEvent::Row { message, .. } => {
                        rows.begin();
                        match concat.step() {
                            ConcatStep::Send => rows.out.extend_from_slice(&message),
                            ConcatStep::Skip => {}
                            ConcatStep::Stop => break,
                        }
                        // rows go out as soon as no more are waiting
                        rows.flush(client, events.is_empty()).await?;
                    }
                    FragmentEvent::Failed {
                        error,
                        cause,
                        conclusive,
                        ..
                    } => {
                        drop(events);
                        return rows
                            .fragment_failed(error, cause, conclusive, pinned, client)
                            .await;
                    }
                }
            }
            drop(events);
            rows.finish(concat.sent, pinned, client).await
        }
        MergeSpec::Combine(spec) => {
            let Events::Shared(mut events) = events else {
                return Err(Fail::Backend);
            };
            let mut partial = PartialRows::default();
            let mut done = 0;
            let mut failure = None;
            while done < total {
                let ev = match interrupt.next(&mut events).await {
                    Ok(Some(ev)) => ev,
                    Ok(None) => break,
                    Err(stop) => {
                        drop(events);
                        return answer_stop(stop, pinned, client, simple, &[]).await;
                    }
                };
                match ev {
                    FragmentEvent::Described { body, .. } => {
                        if let Some(types) = row_description_types(&body) {
                            partial.describe(types);
                        }
                    }
                    FragmentEvent::Row { message, .. } => {
                        if !partial.push(&message) || partial.bytes > MAX_PARTIAL_BYTES {
                            failure = Some(plan::PassReason::new(
                                "partial_rows",
                                "partial rows too large or malformed",
                            ));
                            break;
                        }
                    }
                    FragmentEvent::Done { .. } => done += 1,
                    FragmentEvent::Failed {
                        error: Some(error),
                        conclusive: true,
                        ..
                    } => {
                        drop(events);
                        let e = protocol::strip_error_position(&error);
                        return answer_error(pinned, client, simple, &[], e).await;
                    }
                    FragmentEvent::Failed { cause, .. } => {
                        failure = Some(plan::PassReason::new("fragment_failed", cause));
                        break;
                    }
                }
            }
            drop(events);
            if done < total && failure.is_none() {
                failure = Some(plan::PassReason::new(
                    "fragment_failed",
                    "fragments ended early",
                ));
            }
            // the client's parameters go to the combine only if it refers to them
            let uses_params = match spec {
                CombineSpec::Aggregate { template, .. } => template.contains('$'),
                CombineSpec::TopN { .. } => false,
            };
            let undeclared = param_types.len() < params.values.len()
                || param_types
                    .iter()
                    .take(params.values.len())
                    .any(|t| *t == 0);
            if uses_params && undeclared {
                failure.get_or_insert(plan::PassReason::new(
                    "parameter_types",
                    "parameters in the combine step without declared types",
                ));
            }
            let params = if uses_params {
                params.clone()
            } else {
                BindParams {
                    result_formats: params.result_formats.clone(),
                    ..BindParams::default()
                }
            };
            let param_types = if uses_params {
                param_types.clone()
            } else {
                vec![]
            };
            let first_param = params.values.len() + 1;
            let sql = match failure {
                Some(f) => Err(f),
                None => spec.combine_sql(&partial.types, first_param, &|agg| {
                    var_input_is_float(spec, &partial, agg)
                }),
            };
            let combine_sql = match sql {
                Ok(s) => s,
                Err(reason) => {
                    if simple {
                        pinned.sync(client).await?;
                    }
                    return Ok(passthrough(session_id, query_id, &reason));
                }
            };
            debug!(session = session_id, query = query_id, sql = %combine_sql, "combine");
            let arrays: Vec<Option<Bytes>> = (0..partial.types.len())
                .map(|i| Some(partial.array(i)))
                .collect();
            let mut types = param_types.clone();
            types.resize(params.values.len(), 0);
            types.extend(std::iter::repeat_n(0, arrays.len()));
            let result_formats = if simple {
                vec![]
            } else {
                params.result_formats.clone()
            };
            let mut bind_params = params.clone();
            bind_params.result_formats = vec![];
            let mut m = BytesMut::new();
            protocol::put_describe_or_close(&mut m, b'C', b'P', "pgfan_combine");
            protocol::put_describe_or_close(&mut m, b'C', b'S', "pgfan_combine");
            protocol::put_parse(&mut m, "pgfan_combine", &combine_sql, &types);
            protocol::put_bind(
                &mut m,
                "pgfan_combine",
                "pgfan_combine",
                &bind_params,
                &arrays,
                &result_formats,
            );
            protocol::put_execute(&mut m, "pgfan_combine");
            protocol::put_describe_or_close(&mut m, b'C', b'P', "pgfan_combine");
            protocol::put_describe_or_close(&mut m, b'C', b'S', "pgfan_combine");
            protocol::put_empty(&mut m, if simple { b'S' } else { b'H' });
            pinned.send(&m).await?;
            let mut out = BytesMut::new();
            if simple {
                if let Some(rd) = &probe.row_description {
                    protocol::put_message(&mut out, b'T', rd);
                }
            }
            let mut closes = 0;
            let mut failed = false;
            loop {
                let (tag, body) = pinned.next(client).await?;
                match tag {
                    b'D' | b'C' => {
                        protocol::put_message(&mut out, tag, &body);
                        if out.len() >= 64 << 10 {
                            write_client(client, &out).await?;
                            out.clear();
                        }
                    }
                    b'E' => {
                        out.extend_from_slice(&protocol::strip_error_position(&body));
                        failed = true;
                        if !simple {
                            break;
                        }
                    }
                    b'3' => {
                        closes += 1;
                        if !simple && closes == 4 {
                            break;
                        }
                    }
                    b'Z' => {
                        let z = body.first().copied().unwrap_or(b'I');
                        protocol::put_ready_for_query(&mut out, z);
                        write_client(client, &out).await?;
                        return Ok(Outcome::Done(Some(z)));
                    }
                    _ => {}
                }
            }
            write_client(client, &out).await?;
            Ok(if failed {
                Outcome::Failed(None)
            } else {
                Outcome::Done(None)
            })
        }
    }
}

/// Ends the replicas' exporting transactions when the query is over.
struct ReleaseOnDrop(Vec<ReplicaSnapshot>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        for mut r in self.0.drain(..) {
            tokio::spawn(async move {
                let _ = r.conn.simple_query("ROLLBACK").await;
            });
        }
    }
}

/// Whether variance aggregate `agg` had float input (its type column holds a regtype).
fn var_input_is_float(spec: &CombineSpec, partial: &PartialRows, agg: usize) -> bool {
    let CombineSpec::Aggregate { keys, aggs, .. } = spec else {
        return false;
    };
    let Some(a) = aggs.get(agg) else { return false };
    let col = keys.len() + a.first + 3;
    partial
        .first_value(col)
        .filter(|v| v.len() == 4)
        .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
        .is_some_and(|oid| oid == 700 || oid == 701)
}

/// Sends the probe (and, for the simple protocol, Parse/Describe of the statement) on the
/// session's connection without Sync, so the snapshot stays importable. `Ok(Err(body))` is
/// PostgreSQL's error for the statement.
/// Bind result formats for an ordered merge's fragments: the client's codes spread over
/// the `visible` columns, then binary for each hidden key. `None` when the client's codes
/// do not fit the columns (PostgreSQL's own error then comes from pass-through).
fn hidden_key_formats(client: &[i16], visible: usize, keys: usize) -> Option<Vec<i16>> {
    let mut formats = match client.len() {
        0 => vec![0; visible],
        1 => vec![client[0]; visible],
        n if n == visible => client.to_vec(),
        _ => return None,
    };
    formats.extend(std::iter::repeat_n(1, keys));
    Some(formats)
}

/// What a merge needs to know about the statement it answers.
struct MergeContext<'a> {
    session_id: u64,
    query_id: u64,
    simple: bool,
    /// RowDescription for a simple Query (the extended client described the statement).
    row_description: Option<&'a [u8]>,
}

/// The client's result while fragments stream final rows: a simple Query's
/// RowDescription before the first row, the rows the merge passes, and how it ends.
struct RowsOut<'a> {
    ctx: MergeContext<'a>,
    out: BytesMut,
    /// A row came (the RowDescription is in `out` or sent).
    started: bool,
}

impl<'a> RowsOut<'a> {
    fn new(ctx: MergeContext<'a>) -> Self {
        RowsOut {
            ctx,
            out: BytesMut::new(),
            started: false,
        }
    }

    /// Notes a row from the merge (sent or skipped by OFFSET).
    fn begin(&mut self) {
        if !self.started {
            self.started = true;
            self.put_description();
        }
    }

    fn put_description(&mut self) {
        if let (true, Some(rd)) = (self.ctx.simple, self.ctx.row_description) {
            protocol::put_message(&mut self.out, b'T', rd);
        }
    }

    /// Writes what is buffered once it is large, or when `now`.
    async fn flush<C: AsyncWrite + Unpin>(
        &mut self,
        client: &mut C,
        now: bool,
    ) -> Result<(), Fail> {
        if self.out.len() >= 64 << 10 || (now && !self.out.is_empty()) {
            write_client(client, &self.out).await?;
            client.flush().await.map_err(|_| Fail::Client)?;
            self.out.clear();
        }
        Ok(())
    }

    /// A fragment failed: before any row, the statement passes through (PostgreSQL's own
    /// answer) unless the error is `conclusive`; after, the client gets the fragment's
    /// error.
    async fn fragment_failed<R, W, C>(
        self,
        error: Option<BytesMut>,
        cause: String,
        conclusive: bool,
        pinned: &mut Pinned<'_, R, W>,
        client: &mut C,
    ) -> Result<Outcome, Fail>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
        C: AsyncWrite + Unpin,
    {
        let ctx = &self.ctx;
        debug!(session = ctx.session_id, query = ctx.query_id, cause = %cause, "fragment failed");
        if !self.started && !conclusive {
            if ctx.simple {
                pinned.sync(client).await?;
            }
            let reason = plan::PassReason::new("fragment_failed", cause);
            return Ok(passthrough(ctx.session_id, ctx.query_id, &reason));
        }
        let e = match error {
            Some(b) => protocol::strip_error_position(&b),
            None => protocol::ErrorFields::error("08006", cause).to_bytes(),
        };
        answer_error(pinned, client, ctx.simple, &self.out, e).await
    }

    /// The merge stopped early (cancel or client gone).
    async fn stopped<R, W, C>(
        self,
        stop: Stop,
        pinned: &mut Pinned<'_, R, W>,
        client: &mut C,
    ) -> Result<Outcome, Fail>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
        C: AsyncWrite + Unpin,
    {
        answer_stop(stop, pinned, client, self.ctx.simple, &self.out).await
    }

    /// All rows are out: CommandComplete with `sent` rows, and for a simple Query the
    /// primary's Sync and its ReadyForQuery.
    async fn finish<R, W, C>(
        mut self,
        sent: u64,
        pinned: &mut Pinned<'_, R, W>,
        client: &mut C,
    ) -> Result<Outcome, Fail>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
        C: AsyncWrite + Unpin,
    {
        if !self.started {
            self.put_description();
        }
        protocol::put_command_complete(&mut self.out, &format!("SELECT {sent}"));
        let z = if self.ctx.simple {
            let z = pinned.sync(client).await?;
            protocol::put_ready_for_query(&mut self.out, z);
            Some(z)
        } else {
            None
        };
        write_client(client, &self.out).await?;
        Ok(Outcome::Done(z))
    }
}

/// Streams the k-way merge of sorted fragment streams to the client: waits for the next
/// row of whichever fragment the merge needs, sends the smallest head row without its
/// hidden key columns, and applies LIMIT/OFFSET.
async fn merge_ordered<R, W, C, CR>(
    ctx: MergeContext<'_>,
    mut merge: OrderedMerge,
    mut streams: Vec<tokio::sync::mpsc::Receiver<FragmentEvent>>,
    mut concat: Concat,
    pinned: &mut Pinned<'_, R, W>,
    client: &mut C,
    interrupt: &mut Interrupt<'_, CR>,
) -> Result<Outcome, Fail>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    C: AsyncWrite + Unpin,
    CR: AsyncRead + Unpin,
{
    let mut rows = RowsOut::new(ctx);
    let mut expected: Option<Vec<u32>> = None;
    let failure = loop {
        if concat.full() {
            break None;
        }
        if let Some(i) = merge.waiting_for() {
            let event = match streams.get_mut(i) {
                Some(s) => match interrupt.next(s).await {
                    Ok(ev) => ev,
                    Err(stop) => {
                        drop(streams);
                        return rows.stopped(stop, pinned, client).await;
                    }
                },
                None => None,
            };
            match event {
                Some(FragmentEvent::Described { body, .. }) => {
                    // every fragment must describe the same columns (a stale catalog
                    // could expand `*` differently): otherwise pass through
                    let types = row_description_types(&body);
                    match &expected {
                        None => expected = types,
                        Some(e) if Some(e) == types.as_ref() => {}
                        Some(_) => {
                            break Some((
                                None,
                                "fragments describe different columns".into(),
                                false,
                            ))
                        }
                    }
                    if !expected.as_deref().is_some_and(|t| merge.accepts(t)) {
                        break Some((None, "fragment columns differ from the plan".into(), false));
                    }
                }
                Some(FragmentEvent::Row { message, .. }) => merge.push(i, message),
                Some(FragmentEvent::Done { .. }) => merge.finish(i),
                Some(FragmentEvent::Failed {
                    error,
                    cause,
                    conclusive,
                    ..
                }) => break Some((error, cause, conclusive)),
                None => break Some((None, "fragment stream ended".into(), false)),
            }
            continue;
        }
        let Some(row) = merge.pop() else {
            break None; // every fragment is done
        };
        rows.begin();
        match concat.step() {
            ConcatStep::Send => rows.out.extend_from_slice(&row),
            ConcatStep::Skip => {}
            ConcatStep::Stop => break None,
        }
        rows.flush(client, false).await?;
    };
    // stops every fragment still running
    drop(streams);
    match failure {
        Some((error, cause, conclusive)) => {
            rows.fragment_failed(error, cause, conclusive, pinned, client)
                .await
        }
        None => rows.finish(concat.sent, pinned, client).await,
    }
}

async fn probe<R, W, C>(
    pinned: &mut Pinned<'_, R, W>,
    client: &mut C,
    simple: bool,
    sql: &str,
    tables: &[String],
) -> Result<Result<Probe, BytesMut>, Fail>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    C: AsyncWrite + Unpin,
{
    let settings = SETTINGS
        .iter()
        .map(|s| format!("current_setting('{s}')"))
        .collect::<Vec<_>>()
        .join(", ");
    let probe_sql = format!(
        "SELECT pg_current_xact_id_if_assigned() IS NULL, current_setting('transaction_isolation'), \
         ARRAY[{}]::oid[]::text, pg_export_snapshot(), pg_current_wal_lsn()::text, {settings}",
        tables
            .iter()
            .map(|t| format!(
                "coalesce(to_regclass({})::oid, 0)",
                plan::catalog::quote_literal(t)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut m = BytesMut::new();
    let mut expected_closes = 4;
    if simple {
        protocol::put_describe_or_close(&mut m, b'C', b'S', "pgfan_describe");
        protocol::put_parse(
            &mut m,
            "pgfan_describe",
            sql.trim_end_matches([';', ' ', '\n']),
            &[],
        );
        protocol::put_describe_or_close(&mut m, b'D', b'S', "pgfan_describe");
        protocol::put_describe_or_close(&mut m, b'C', b'S', "pgfan_describe");
        expected_closes += 2;
    }
    protocol::put_describe_or_close(&mut m, b'C', b'P', "pgfan_probe");
    protocol::put_describe_or_close(&mut m, b'C', b'S', "pgfan_probe");
    protocol::put_parse(&mut m, "pgfan_probe", &probe_sql, &[]);
    protocol::put_bind(
        &mut m,
        "pgfan_probe",
        "pgfan_probe",
        &BindParams::default(),
        &[],
        &[],
    );
    protocol::put_execute(&mut m, "pgfan_probe");
    protocol::put_describe_or_close(&mut m, b'C', b'P', "pgfan_probe");
    protocol::put_describe_or_close(&mut m, b'C', b'S', "pgfan_probe");
    protocol::put_empty(&mut m, b'H');
    pinned.send(&m).await?;
    let mut row_description = None;
    let mut row = None;
    let mut closes = 0;
    while closes < expected_closes {
        let (tag, body) = pinned.next(client).await?;
        match tag {
            b'T' if row_description.is_none() && simple => row_description = Some(body),
            b'D' => row = Some(decode_text_row(&body)),
            b'E' => return Ok(Err(body)),
            b'3' => closes += 1,
            _ => {}
        }
    }
    let Some(row) = row else {
        return Err(Fail::Backend);
    };
    let text = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    Ok(Ok(Probe {
        row_description,
        clean: text(0) == "t",
        isolation: text(1),
        oids: text(2)
            .trim_matches(['{', '}'])
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap_or(0))
            .collect(),
        snapshot: text(3),
        lsn: parse_lsn(&text(4)),
        settings: SETTINGS
            .iter()
            .enumerate()
            .map(|(i, s)| (*s, text(5 + i)))
            .collect(),
    }))
}
