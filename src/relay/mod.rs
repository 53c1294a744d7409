//! Pass-through: relays a client session and its pinned primary connection message by
//! message, byte for byte (invariant 2).
//!
//! Both directions are read and written concurrently from one task, each with a bounded
//! queue, so neither side can block the other (a client streaming COPY data while the server
//! sends notices, or a pipeline whose replies the client reads late). Reads are forwarded in
//! whole chunks; only message headers are looked at, plus the few messages the proxy needs
//! (Query, Sync and Terminate from the client; ReadyForQuery and ParameterStatus from the
//! server).

pub mod fanout;
pub mod frame;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn, Instrument};

use crate::backends::connect::CancelTarget;
use crate::backends::pool::LoginKey;
use crate::metrics::SessionTally;
use crate::plan::{self, Candidate};
use crate::protocol::{self, BindParams, ErrorFields};
use fanout::{CachedPass, FanoutEnv, Outcome, Pinned, Request};
use frame::{MessageCursor, Visit};

impl Intercept {
    /// After ReadyForQuery: when the transaction ended, its portals and savepoints are gone.
    fn ready_for_query(&mut self, status: u8) {
        if status == b'I' {
            self.portals.clear();
            self.savepoint = false;
        }
    }
}

/// Fan-out for one session: the shared environment and who the session is.
pub struct FanoutSession<'a> {
    /// Pools, catalog, configuration.
    pub env: &'a FanoutEnv,
    /// The session's (user, database).
    pub login: LoginKey,
    /// The session's CancelRequests (they stop a fan-out in progress).
    pub cancel: Arc<crate::server::cancel::CancelSignal>,
}

/// A parsed statement that may fan out when executed.
struct Prepared {
    /// The candidate; `Err` only for an EXPLAIN FANOUT of a statement that is not one.
    candidate: Result<Arc<Candidate>, plan::PassReason>,
    sql: String,
    param_types: Vec<u32>,
}

/// A client message held back until the backend has answered everything before it.
enum Held {
    Query {
        candidate: Arc<Candidate>,
        sql: String,
        len: usize,
    },
    Execute {
        candidate: Arc<Candidate>,
        prepared: Arc<Prepared>,
        params: BindParams,
        len: usize,
    },
    /// EXPLAIN FANOUT of a statement that is not a candidate at all.
    Explain {
        reason: plan::PassReason,
        len: usize,
        /// Answered inside an extended-protocol batch: rows and tag only.
        extended: bool,
    },
    /// A Parse of EXPLAIN FANOUT: PostgreSQL gets a stand-in statement with the same
    /// parameters and EXPLAIN's result column, so Bind and Describe get its own answers,
    /// and pgfan answers the Execute.
    ExplainParse {
        prepared: Arc<Prepared>,
        name: String,
        substitute: Bytes,
        len: usize,
    },
}

/// Statements and portals that may fan out, and the message being held.
#[derive(Default)]
struct Intercept {
    statements: HashMap<String, Arc<Prepared>, foldhash::fast::RandomState>,
    portals: HashMap<String, (Arc<Prepared>, BindParams), foldhash::fast::RandomState>,
    held: Option<Held>,
    /// Forward the next message without intercepting it (it fell back to pass-through).
    bypass: bool,
    flush_sent: bool,
    /// The shape of the last simple query that passed through on cached facts (its key
    /// and its literals' kinds, see [`plan::literals::has_shape`]) and its verdict: the
    /// next text of that shape is judged without the shared cache.
    last_pass: Option<(String, Vec<bool>, CachedPass)>,
    /// The prepared statement of the last Bind that passed through on cached facts, and
    /// its verdict.
    last_bind_pass: Option<(Arc<Prepared>, CachedPass)>,
    /// A savepoint was opened in this transaction: a subtransaction cannot export a
    /// snapshot, so nothing fans out until the transaction ends.
    savepoint: bool,
}

/// Bytes buffered toward one side before the relay stops reading from the other side.
const QUEUE_LIMIT: usize = 256 << 10;
/// Free space first ensured in a read buffer before each read.
const READ_CHUNK_MIN: usize = 4 << 10;
/// The most free space ensured before a read, reached when reads keep filling the buffer.
const READ_CHUNK_MAX: usize = 64 << 10;

/// How much room to make before reading one side: small for the short messages of OLTP
/// (a connection that sends a few queries allocates little), doubling while reads fill
/// all the room given (a result or COPY streaming through).
struct ReadRoom {
    chunk: usize,
}

impl ReadRoom {
    fn new() -> Self {
        ReadRoom {
            chunk: READ_CHUNK_MIN,
        }
    }

    /// Reads what `rd` has into `buf`, after making room.
    fn poll_read<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        rd: &mut R,
        buf: &mut BytesMut,
    ) -> std::task::Poll<std::io::Result<usize>> {
        if buf.capacity() - buf.len() < self.chunk / 4 {
            buf.reserve(self.chunk);
        }
        let room = buf.capacity() - buf.len();
        let read = tokio_util::io::poll_read_buf(std::pin::Pin::new(rd), cx, buf);
        if matches!(read, std::task::Poll::Ready(Ok(n)) if n == room) {
            self.chunk = (self.chunk * 2).min(READ_CHUNK_MAX);
        }
        read
    }
}

/// How a relayed session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// The client sent Terminate.
    ClientTerminated,
    /// The client closed its socket (or it failed) without Terminate.
    ClientGone,
    /// The backend closed the connection (e.g. after a FATAL error).
    BackendClosed,
    /// The client broke the protocol; it got a FATAL 08P01.
    ClientProtocolError,
}

/// Session state the relay keeps up to date from the server's messages.
#[derive(Debug, Default)]
pub struct SessionState {
    /// Last ReadyForQuery status: `I`, `T` or `E`.
    pub status: u8,
    /// Current ParameterStatus values (TimeZone, DateStyle, …).
    pub parameters: HashMap<String, String, foldhash::fast::RandomState>,
}

/// Bytes waiting to be written to one side.
#[derive(Default)]
struct OutQueue {
    current: Bytes,
    queued: VecDeque<Bytes>,
    bytes: usize,
    unflushed: bool,
}

impl OutQueue {
    fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        self.bytes += chunk.len();
        if self.current.is_empty() {
            self.current = chunk;
        } else {
            self.queued.push_back(chunk);
        }
    }

    fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Bytes to write or a flush to do.
    fn has_work(&self) -> bool {
        self.bytes > 0 || self.unflushed
    }

    /// Writes everything queued, then flushes (TLS holds records until flushed). Progress
    /// is kept in the queue, so the caller may stop polling at any point.
    fn poll_drain<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        w: &mut W,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::{ready, Poll};
        loop {
            if !self.current.is_empty() {
                let n = ready!(std::pin::Pin::new(&mut *w).poll_write(cx, &self.current))?;
                if n == 0 {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                bytes::Buf::advance(&mut self.current, n);
                self.bytes -= n;
                self.unflushed = true;
                if self.current.is_empty() {
                    self.current = self.queued.pop_front().unwrap_or_default();
                }
                continue;
            }
            if self.unflushed {
                ready!(std::pin::Pin::new(&mut *w).poll_flush(cx))?;
                self.unflushed = false;
            }
            return Poll::Ready(Ok(()));
        }
    }
}

/// Which socket operations returned Pending during the current poll of the relay.
#[derive(Default)]
struct Blocked {
    client_read: bool,
    client_write: bool,
    backend_read: bool,
    backend_write: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Client sent Terminate: write what is queued to the backend, then stop.
    DrainToBackend(RelayEnd),
    /// Backend closed or client broke the protocol: write what is queued to the client.
    DrainToClient(RelayEnd),
}

/// The per-statement bookkeeping of one session.
struct Tracker<'a> {
    inflight: VecDeque<Instant>,
    /// Extended-protocol messages sent since the last Sync: the backend may hold an open
    /// implicit transaction, so the connection must not be reset and reused.
    unsynced: bool,
    /// Client requests whose replies have not ended yet (P, B, D, C, E, S, Q, F).
    expect: VecDeque<u8>,
    /// The backend is skipping messages up to the next Sync after an error.
    batch_failed: bool,
    /// A BEGIN completed since the last ReadyForQuery (a pipeline that opens a
    /// transaction block before its Sync): the last status says idle, but it is not.
    began: bool,
    metrics: SessionTally<'a>,
    state: &'a mut SessionState,
}

impl Tracker<'_> {
    fn request(&mut self) {
        if self.inflight.is_empty() {
            self.metrics.backend_busy();
        }
        self.inflight.push_back(Instant::now());
    }

    fn ready(&mut self, status: u8) {
        self.state.status = status;
        self.began = false;
        if let Some(start) = self.inflight.pop_front() {
            self.metrics
                .request_done(start.elapsed().as_secs_f64(), self.inflight.is_empty());
        }
    }

    /// The transaction status as of the last reply: ReadyForQuery's, or `T` once a
    /// pipelined BEGIN has completed (fan-out then keeps to the session's snapshot).
    fn status_now(&self) -> u8 {
        if self.began && self.state.status == b'I' {
            b'T'
        } else {
            self.state.status
        }
    }

    /// Notes a CommandComplete tag of the pinned backend.
    fn completed(&mut self, tag: &[u8]) {
        let word = tag.split(|b| *b == b' ' || *b == 0).next().unwrap_or(&[]);
        match word {
            b"BEGIN" | b"START" => self.began = true,
            b"COMMIT" | b"ROLLBACK" => self.began = false,
            _ => {}
        }
    }

    fn busy(&self) -> bool {
        !self.inflight.is_empty()
    }

    /// Books a backend reply against the requests in flight.
    fn reply(&mut self, tag: u8) {
        let front = self.expect.front().copied();
        match (tag, front) {
            (b'1', Some(b'P')) | (b'2', Some(b'B')) | (b'3', Some(b'C')) | (b'n', Some(b'D')) => {
                self.expect.pop_front();
            }
            (b'T', Some(b'D')) => {
                self.expect.pop_front();
            }
            (b'C' | b'I' | b's', Some(b'E')) => {
                self.expect.pop_front();
            }
            (b'G', Some(b'E')) => {
                // copy-in mode ignores the Syncs already sent behind the Execute
                while self.expect.get(1) == Some(&b'S') {
                    self.expect.remove(1);
                }
            }
            (b'E', Some(b'P' | b'B' | b'D' | b'C' | b'E')) => {
                // the backend skips the rest of the batch
                while matches!(self.expect.front(), Some(b'P' | b'B' | b'D' | b'C' | b'E')) {
                    self.expect.pop_front();
                }
                self.batch_failed = true;
            }
            (b'Z', _) => {
                while let Some(t) = self.expect.pop_front() {
                    if matches!(t, b'S' | b'Q' | b'F') {
                        break;
                    }
                }
                self.batch_failed = false;
            }
            _ => {}
        }
    }
}

impl Drop for Tracker<'_> {
    fn drop(&mut self) {
        self.metrics.backend_state(!self.inflight.is_empty(), -1);
    }
}

/// Relays until one side ends the session. `client_pending` and `backend_pending` are
/// bytes already read from each side. Returns how the session ended and, after a clean
/// Terminate with the backend idle and nothing in flight, the backend for reuse.
///
/// `span` (the session's id and peer) is entered only around the relay's own rare events,
/// not on every poll: that cost about a tenth of the relay's user time
/// (`pgbench -S -M simple -c 8`, perf). Fan-out's events carry `session_id` as a field.
#[allow(clippy::too_many_arguments)]
pub async fn relay<C, B>(
    session_id: u64,
    span: &tracing::Span,
    client: C,
    client_pending: BytesMut,
    backend: B,
    backend_pending: BytesMut,
    backend_cancel: &CancelTarget,
    state: &mut SessionState,
    metrics: SessionTally<'_>,
    fanout: Option<FanoutSession<'_>>,
) -> (RelayEnd, Option<B>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    // Each socket is used whole: the pump below reads and writes it in turn from one
    // poll, so `tokio::io::split` (a lock on every read and write) is only paid by a
    // fan-out, which needs the halves at once.
    let mut client = client;
    let mut backend = backend;
    let mut client_in = client_pending;
    let mut backend_in = backend_pending;
    let mut client_cursor = MessageCursor::default();
    let mut backend_cursor = MessageCursor::default();
    let mut to_backend = OutQueue::default();
    let mut to_client = OutQueue::default();
    let mut client_room = ReadRoom::new();
    let mut backend_room = ReadRoom::new();
    metrics.backend_state(false, 1);
    let mut tracker = Tracker {
        inflight: VecDeque::new(),
        unsynced: false,
        expect: VecDeque::new(),
        batch_failed: false,
        began: false,
        metrics,
        state,
    };
    let mut intercept = Intercept::default();
    let mut phase = Phase::Running;
    let mut backend_eof = false;

    macro_rules! take_client_input {
        () => {
            match scan_client(&mut client_cursor, &client_in, &mut tracker, &mut intercept, fanout.as_ref()) {
                Ok((n, terminated)) => {
                    to_backend.push(client_in.split_to(n).freeze());
                    if terminated {
                        phase = Phase::DrainToBackend(RelayEnd::ClientTerminated);
                    }
                }
                Err((n, e)) => {
                    span.in_scope(|| warn!(error = %e, "client protocol violation"));
                    to_backend.push(client_in.split_to(n).freeze());
                    to_client.push(
                        ErrorFields::fatal("08P01", e.to_string()).to_bytes().freeze(),
                    );
                    phase = Phase::DrainToClient(RelayEnd::ClientProtocolError);
                }
            }
        };
    }
    macro_rules! take_backend_input {
        () => {
            match scan_backend(&mut backend_cursor, &backend_in, &mut tracker, &mut intercept) {
                Ok(n) => to_client.push(backend_in.split_to(n).freeze()),
                Err((n, e)) => {
                    span.in_scope(|| warn!(error = %e, "backend protocol violation"));
                    to_client.push(backend_in.split_to(n).freeze());
                    backend_eof = true;
                    phase = Phase::DrainToClient(RelayEnd::BackendClosed);
                }
            }
        };
    }

    // What the loop below decides, checked there and by the I/O poll that stops for it.
    macro_rules! drained {
        () => {
            match phase {
                Phase::DrainToBackend(end) if to_backend.is_empty() => Some(end),
                Phase::DrainToClient(end) if to_client.is_empty() => Some(end),
                _ => None,
            }
        };
    }
    // the held statement may run: everything before it is answered and sent
    macro_rules! held_may_run {
        () => {
            phase == Phase::Running
                && to_backend.is_empty()
                && !to_backend.unflushed
                && tracker.expect.is_empty()
                && to_client.is_empty()
                && !to_client.unflushed
                && backend_cursor.at_boundary()
        };
    }
    // a held Execute waits on replies the backend may be buffering: send it a Flush
    macro_rules! held_wants_flush {
        () => {
            matches!(intercept.held, Some(Held::Execute { .. }))
                && !intercept.flush_sent
                && to_backend.is_empty()
        };
    }

    take_client_input!();
    take_backend_input!();

    let end = loop {
        if let Some(end) = drained!() {
            break end;
        }
        if let (Some(fs), true) = (fanout.as_ref(), intercept.held.is_some()) {
            if held_may_run!() {
                let held = intercept.held.take();
                intercept.flush_sent = false;
                let (candidate, sql, request, len) = match held {
                    Some(Held::Query {
                        candidate,
                        sql,
                        len,
                    }) => (candidate, sql, Request::Simple, len),
                    Some(Held::Execute {
                        candidate,
                        prepared,
                        params,
                        len,
                    }) => (
                        candidate,
                        prepared.sql.clone(),
                        Request::Extended {
                            param_types: prepared.param_types.clone(),
                            params,
                        },
                        len,
                    ),
                    Some(Held::Explain {
                        reason,
                        len,
                        extended,
                    }) => {
                        let mut out = BytesMut::new();
                        let lines = [format!("PassThrough: {reason}")];
                        if extended {
                            fanout::put_text_rows(&mut out, &lines, "EXPLAIN");
                        } else {
                            fanout::put_text_result(&mut out, "QUERY PLAN", &lines, "EXPLAIN");
                            protocol::put_ready_for_query(&mut out, tracker.state.status);
                        }
                        to_client.push(out.freeze());
                        let _ = client_in.split_to(len.min(client_in.len()));
                        take_client_input!();
                        continue;
                    }
                    Some(Held::ExplainParse {
                        prepared,
                        name,
                        substitute,
                        len,
                    }) => {
                        // the stand-in Parse goes on in the original's place, unwatched
                        let rest = client_in.split_off(len.min(client_in.len()));
                        client_in.clear();
                        client_in.extend_from_slice(&substitute);
                        client_in.unsplit(rest);
                        intercept.statements.insert(name, prepared);
                        intercept.bypass = true;
                        take_client_input!();
                        continue;
                    }
                    None => continue,
                };
                let (mut backend_rd, mut backend_wr) = tokio::io::split(&mut backend);
                let (mut client_rd, mut client_wr) = tokio::io::split(&mut client);
                let mut pinned = Pinned {
                    rd: &mut backend_rd,
                    wr: &mut backend_wr,
                    buf: &mut backend_in,
                };
                let outcome = {
                    let mut interrupt = fanout::Interrupt {
                        cancel: fs.cancel.subscribe(),
                        client: &mut client_rd,
                        pending: &mut client_in,
                    };
                    // boxed: a fan-out's state is large, and the relay of every session
                    // would otherwise carry it (and copy it on every spawn)
                    Box::pin(fanout::execute(
                        fs.env,
                        session_id,
                        &fs.login,
                        tracker.status_now(),
                        &candidate,
                        &sql,
                        request,
                        &mut pinned,
                        &mut client_wr,
                        &mut interrupt,
                    ))
                    .await
                };
                match outcome {
                    Outcome::PassThrough => intercept.bypass = true,
                    Outcome::Done(z) | Outcome::Failed(z) => {
                        match z {
                            Some(z) => {
                                tracker.state.status = z;
                                intercept.ready_for_query(z);
                            }
                            // the primary skips the rest of the batch, as after any error
                            None if matches!(outcome, Outcome::Failed(_)) => {
                                tracker.batch_failed = true;
                            }
                            None => {}
                        }
                        let _ = client_in.split_to(len.min(client_in.len()));
                    }
                    Outcome::ClientGone => break RelayEnd::ClientGone,
                    Outcome::BackendGone => {
                        backend_eof = true;
                        phase = Phase::DrainToClient(RelayEnd::BackendClosed);
                        continue;
                    }
                }
                take_client_input!();
                take_backend_input!();
                continue;
            } else if held_wants_flush!() {
                let mut flush = BytesMut::new();
                protocol::put_empty(&mut flush, b'H');
                to_backend.push(flush.freeze());
                intercept.flush_sent = true;
            }
        }
        // Moves bytes until the loop above has something to decide. One wakeup reads,
        // scans and writes on in the same poll, instead of a `select!` round per step.
        let stop = std::future::poll_fn(|cx| {
            use std::task::Poll;
            // A side that returned Pending has this task's waker registered: when its
            // readiness changes the task is polled again. Until then another poll of it
            // only takes the readiness lock to return Pending again (callgrind,
            // pgbench -S -c 1: 5 of 11 reads per transaction, about a tenth of the
            // relay's instructions), so this poll does not repeat it.
            let mut blocked = Blocked::default();
            loop {
                if drained!().is_some()
                    || (intercept.held.is_some() && (held_may_run!() || held_wants_flush!()))
                {
                    return Poll::Ready(None);
                }
                let mut progress = false;
                // writes first: queued replies go out before more is read
                if to_backend.has_work() && !backend_eof && !blocked.backend_write {
                    match to_backend.poll_drain(cx, &mut backend) {
                        Poll::Ready(Ok(())) => progress = true,
                        Poll::Ready(Err(_)) => {
                            backend_eof = true;
                            phase = Phase::DrainToClient(RelayEnd::BackendClosed);
                            continue;
                        }
                        Poll::Pending => blocked.backend_write = true,
                    }
                }
                if to_client.has_work() && !blocked.client_write {
                    match to_client.poll_drain(cx, &mut client) {
                        Poll::Ready(Ok(())) => progress = true,
                        Poll::Ready(Err(_)) => return Poll::Ready(Some(RelayEnd::ClientGone)),
                        Poll::Pending => blocked.client_write = true,
                    }
                }
                let read_client = phase == Phase::Running
                    && to_backend.bytes < QUEUE_LIMIT
                    && intercept.held.is_none()
                    && !blocked.client_read;
                if read_client {
                    match client_room.poll_read(cx, &mut client, &mut client_in) {
                        Poll::Ready(Ok(0) | Err(_)) => {
                            return Poll::Ready(Some(RelayEnd::ClientGone))
                        }
                        Poll::Ready(Ok(_)) => {
                            take_client_input!();
                            continue;
                        }
                        Poll::Pending => blocked.client_read = true,
                    }
                }
                let read_backend = matches!(phase, Phase::Running | Phase::DrainToBackend(_))
                    && !backend_eof
                    && to_client.bytes < QUEUE_LIMIT
                    && !blocked.backend_read;
                if read_backend {
                    match backend_room.poll_read(cx, &mut backend, &mut backend_in) {
                        Poll::Ready(Ok(0) | Err(_)) => {
                            backend_eof = true;
                            if !backend_cursor.at_boundary() || !backend_in.is_empty() {
                                span.in_scope(|| debug!("backend closed mid-message"));
                            } else if tracker.busy() {
                                to_client.push(
                                    ErrorFields::fatal(
                                        "08006",
                                        "pgfan: the backend closed the connection unexpectedly",
                                    )
                                    .to_bytes()
                                    .freeze(),
                                );
                            }
                            phase = Phase::DrainToClient(RelayEnd::BackendClosed);
                            continue;
                        }
                        Poll::Ready(Ok(_)) => {
                            take_backend_input!();
                            continue;
                        }
                        Poll::Pending => blocked.backend_read = true,
                    }
                }
                if !progress {
                    return Poll::Pending;
                }
            }
        })
        .await;
        if let Some(end) = stop {
            break end;
        }
    };

    if end == RelayEnd::ClientGone && tracker.busy() && !backend_eof {
        // the backend would run the abandoned statement to its end: cancel it
        let target = backend_cancel.clone();
        span.in_scope(|| {
            debug!(
                pid = target.pid,
                "client left mid-statement; cancelling backend"
            )
        });
        tokio::spawn(
            async move {
                if let Err(e) = target.cancel().await {
                    warn!(pid = target.pid, error = %e, "cancel of abandoned statement failed");
                }
            }
            .instrument(span.clone()),
        );
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        let _ = client.flush().await;
        let _ = client.shutdown().await;
    })
    .await;
    let reusable = end == RelayEnd::ClientTerminated
        && !backend_eof
        && !tracker.busy()
        && !tracker.unsynced
        && tracker.state.status == b'I'
        && backend_cursor.at_boundary()
        && backend_in.is_empty();
    drop(tracker);
    if reusable {
        return (end, Some(backend));
    }
    if !backend_eof {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
            let _ = backend.write_all(&[b'X', 0, 0, 0, 4]).await;
            let _ = backend.flush().await;
        })
        .await;
    }
    (end, None)
}

/// Scans client bytes: counts statements, stops at Terminate, and holds back a statement
/// that fans out.
fn scan_client(
    cursor: &mut MessageCursor,
    buf: &[u8],
    tracker: &mut Tracker<'_>,
    intercept: &mut Intercept,
    fanout: Option<&FanoutSession<'_>>,
) -> Result<(usize, bool), (usize, protocol::FrameError)> {
    let mut terminated = false;
    let watching = fanout.is_some();
    let n = cursor.scan(
        buf,
        |tag| watching && matches!(tag, b'Q' | b'P' | b'B' | b'E' | b'C'),
        |header, body| {
            let bypass = std::mem::take(&mut intercept.bypass);
            if let (Some(fs), Some(body)) = (fanout, body) {
                if watch_client(fs, header, body, bypass, tracker, intercept) == Visit::Stop {
                    return Visit::Stop;
                }
            }
            match header.tag {
                b'Q' => {
                    tracker.metrics.query();
                    tracker.request();
                    tracker.expect.push_back(b'Q');
                }
                b'F' => {
                    tracker.request();
                    tracker.expect.push_back(b'F');
                }
                b'E' => {
                    tracker.metrics.query();
                    tracker.unsynced = true;
                    tracker.expect.push_back(b'E');
                }
                b'P' | b'B' | b'D' | b'C' => {
                    tracker.unsynced = true;
                    tracker.expect.push_back(header.tag);
                }
                b'H' => tracker.unsynced = true,
                b'S' => {
                    tracker.unsynced = false;
                    tracker.request();
                    tracker.expect.push_back(b'S');
                }
                b'X' => {
                    // not forwarded: pgfan decides whether the connection is closed or reset
                    terminated = true;
                    return Visit::Stop;
                }
                _ => {}
            }
            Visit::Forward
        },
    )?;
    Ok((n, terminated))
}

/// Looks at a whole Q, P, B, E or C message for fan-out; `Stop` holds it back.
fn watch_client(
    fs: &FanoutSession<'_>,
    header: protocol::Header,
    body: &[u8],
    bypass: bool,
    tracker: &mut Tracker<'_>,
    intercept: &mut Intercept,
) -> Visit {
    let mut r = protocol::Reader(body);
    // `start`: the text after leading blanks and comments, skipped once per statement
    let seen_sql = |start: &str, intercept: &mut Intercept| {
        if plan::changes_catalog(start) {
            fs.env.catalog.invalidate(&fs.login.1);
        }
        if plan::opens_savepoint(start) {
            intercept.savepoint = true;
        }
    };
    match header.tag {
        b'Q' => {
            let Some(sql) = r.cstr() else {
                return Visit::Forward;
            };
            let start = plan::skip_space_and_comments(&sql);
            seen_sql(start, intercept);
            if bypass || intercept.savepoint || tracker.unsynced || !plan::worth_parsing(start) {
                return Visit::Forward;
            }
            // the shape of the session's last simple query that passed through: no lookup
            // in the shared cache while the facts it was judged under hold
            if let Some((key, texts, pass)) = &intercept.last_pass {
                if plan::literals::has_shape(&sql, key, texts) && still_passes(fs, tracker, pass) {
                    return Visit::Forward;
                }
            }
            let lookup = fs.env.statements.lookup(&sql);
            // a literal-only variant of a statement shape known to pass through
            if let (Some(t), Some((key, texts))) = (lookup.template(), lookup.shape()) {
                if !t.explain {
                    if let Some(pass) = passes_cached(fs, tracker, t) {
                        intercept.last_pass = Some((key.to_string(), texts, pass));
                        return Visit::Forward;
                    }
                }
            }
            let candidate = match lookup.candidate(&sql) {
                Ok(c) => c,
                Err(reason) if plan::is_explain_fanout(&sql) => {
                    intercept.held = Some(Held::Explain {
                        reason,
                        len: header.total(),
                        extended: false,
                    });
                    return Visit::Stop;
                }
                Err(_) => return Visit::Forward,
            };
            if !candidate.explain && passes_cached(fs, tracker, &candidate).is_some() {
                return Visit::Forward;
            }
            intercept.held = Some(Held::Query {
                candidate,
                sql: sql.into_owned(),
                len: header.total(),
            });
            Visit::Stop
        }
        b'P' => {
            let (Some(name), Some(sql)) = (r.cstr(), r.cstr()) else {
                return Visit::Forward;
            };
            let start = plan::skip_space_and_comments(&sql);
            seen_sql(start, intercept);
            if bypass {
                // the stand-in of an EXPLAIN FANOUT: its statement entry is already made
                return Visit::Forward;
            }
            let n = r.i16().unwrap_or(0).max(0);
            let param_types: Vec<u32> = (0..n).map_while(|_| r.u32()).collect();
            if plan::is_explain_fanout(start) {
                let substitute = explain_stand_in(&name, &sql, &param_types);
                intercept.held = Some(Held::ExplainParse {
                    prepared: Arc::new(Prepared {
                        candidate: fs.env.statements.parse(&sql),
                        sql: sql.into_owned(),
                        param_types,
                    }),
                    name: name.into_owned(),
                    substitute,
                    len: header.total(),
                });
                return Visit::Stop;
            }
            let candidate = plan::worth_parsing(start)
                .then(|| fs.env.statements.parse(&sql).ok())
                .flatten();
            match candidate {
                Some(c) => {
                    intercept.statements.insert(
                        name.into_owned(),
                        Arc::new(Prepared {
                            candidate: Ok(c),
                            sql: sql.into_owned(),
                            param_types,
                        }),
                    );
                }
                None => {
                    intercept.statements.remove(&*name);
                }
            }
            Visit::Forward
        }
        b'B' => {
            let (Some(portal), Some(statement)) = (r.cstr(), r.cstr()) else {
                return Visit::Forward;
            };
            // Parameters are copied only for statements that may fan out. One that passes
            // through whatever its parameters (the check treats `$n` as unknown values) is
            // judged here, once per Bind: its Execute then finds no portal and goes on. The
            // transaction status cannot change between a Bind and its Execute, since a
            // portal ends with its transaction.
            let prepared = intercept.statements.get(&*statement).cloned();
            let may_fan_out = |p: &Arc<Prepared>, intercept: &mut Intercept| {
                // the session's last statement that passed through: its verdict holds
                // while the facts it was judged under do, without the shared memo
                if let Some((last, pass)) = &intercept.last_bind_pass {
                    if Arc::ptr_eq(last, p) && still_passes(fs, tracker, pass) {
                        return false;
                    }
                }
                match &p.candidate {
                    Ok(c) if !c.explain => match passes_cached(fs, tracker, c) {
                        Some(pass) => {
                            intercept.last_bind_pass = Some((p.clone(), pass));
                            false
                        }
                        None => true,
                    },
                    _ => true,
                }
            };
            // the parameters are parsed only for a statement that may fan out
            let prepared = prepared.filter(|p| may_fan_out(p, intercept));
            match prepared.and_then(|p| Some((p, BindParams::parse(body)?))) {
                Some((p, (_, _, params))) => {
                    intercept.portals.insert(portal.into_owned(), (p, params));
                }
                None => {
                    intercept.portals.remove(&*portal);
                }
            }
            Visit::Forward
        }
        b'C' => {
            let kind = r.take(1).map(|k| k[0]);
            if let Some(name) = r.cstr() {
                match kind {
                    Some(b'S') => {
                        intercept.statements.remove(&*name);
                    }
                    Some(b'P') => {
                        intercept.portals.remove(&*name);
                    }
                    _ => {}
                }
            }
            Visit::Forward
        }
        b'E' => {
            let (Some(portal), Some(max_rows)) = (r.cstr(), r.i32()) else {
                return Visit::Forward;
            };
            if bypass || tracker.batch_failed {
                return Visit::Forward;
            }
            let Some((prepared, params)) = intercept.portals.get(&*portal).cloned() else {
                return Visit::Forward;
            };
            let candidate = match &prepared.candidate {
                // EXPLAIN FANOUT answers whatever the state (the stand-in would run instead)
                Err(reason) => {
                    intercept.held = Some(Held::Explain {
                        reason: reason.clone(),
                        len: header.total(),
                        extended: true,
                    });
                    return Visit::Stop;
                }
                Ok(c) if c.explain => c.clone(),
                Ok(c) => {
                    if max_rows != 0
                        || intercept.savepoint
                        || passes_cached(fs, tracker, c).is_some()
                    {
                        return Visit::Forward;
                    }
                    c.clone()
                }
            };
            intercept.held = Some(Held::Execute {
                candidate,
                prepared,
                params,
                len: header.total(),
            });
            Visit::Stop
        }
        _ => Visit::Forward,
    }
}

/// A Parse of a stand-in for `EXPLAIN FANOUT …` under statement `name`: one text column
/// named `QUERY PLAN` and no rows. A SELECT is wrapped as a subquery, so PostgreSQL infers
/// its parameters' types as for the statement itself; anything else gets text parameters
/// (declared types kept). Bind and Describe then get PostgreSQL's own answers.
fn explain_stand_in(name: &str, sql: &str, param_types: &[u32]) -> Bytes {
    let inner = plan::explained_statement(sql).trim_end_matches([';', ' ', '\t', '\r', '\n']);
    let text = if plan::worth_parsing(inner) {
        format!(
            "SELECT NULL::text AS \"QUERY PLAN\" FROM ({inner}\n) AS pgfan_explained WHERE false"
        )
    } else {
        let count = plan::max_parameter(sql).max(param_types.len());
        let mut text = String::from("SELECT NULL::text AS \"QUERY PLAN\" WHERE false");
        for i in 1..=count {
            text.push_str(&format!(" AND ${i}::text IS NULL"));
        }
        text
    };
    let mut out = BytesMut::new();
    protocol::put_parse(&mut out, name, &text, param_types);
    out.freeze()
}

/// Why cached catalog facts already say the statement passes through (the common case for
/// OLTP point queries: no need to hold anything back), counted as such; see
/// [`fanout::cached_pass`].
fn passes_cached(
    fs: &FanoutSession<'_>,
    tracker: &Tracker<'_>,
    candidate: &Candidate,
) -> Option<CachedPass> {
    let pass = fanout::cached_pass(fs.env, &fs.login, tracker.status_now(), candidate)?;
    tracker.metrics.passthrough(pass.label);
    Some(pass)
}

/// True when a verdict the session kept still holds, counted as a pass-through.
fn still_passes(fs: &FanoutSession<'_>, tracker: &Tracker<'_>, pass: &CachedPass) -> bool {
    let holds = pass.holds(fs.env, tracker.status_now());
    if holds {
        tracker.metrics.passthrough(pass.label);
    }
    holds
}

/// Scans server bytes: tracks ReadyForQuery status and ParameterStatus values.
fn scan_backend(
    cursor: &mut MessageCursor,
    buf: &[u8],
    tracker: &mut Tracker<'_>,
    intercept: &mut Intercept,
) -> Result<usize, (usize, protocol::FrameError)> {
    cursor.scan(
        buf,
        |tag| matches!(tag, b'Z' | b'S' | b'C'),
        |header, body| {
            tracker.reply(header.tag);
            match (header.tag, body) {
                (b'C', Some(body)) => tracker.completed(body),
                (b'Z', Some(body)) => {
                    let status = body.first().copied().unwrap_or(b'I');
                    tracker.ready(status);
                    intercept.ready_for_query(status);
                }
                (b'S', Some(body)) => tracker
                    .state
                    .parameters
                    .extend(protocol::parameter_status(body)),
                _ => {}
            }
            Visit::Forward
        },
    )
}
