//! Runs fragments concurrently on the backend pools and streams their results back as
//! [`FragmentEvent`]s over a bounded channel (so a slow client slows the fragments down
//! instead of filling memory). Dropping the receiver cancels every fragment still running.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tracing::debug;

use crate::backends::pool::{BackendPool, LoginKey, PooledConnection};
use crate::protocol::{self, BindParams};

/// Events per channel slot: bounded, so memory does not grow with the result.
const CHANNEL_DEPTH: usize = 256;
/// Events per fragment in an ordered merge.
const ORDERED_CHANNEL_DEPTH: usize = 64;
/// How long an ordered merge waits for all its pool slots before passing through.
pub const RESERVE_WAIT: Duration = Duration::from_secs(2);

/// One fragment to run.
#[derive(Clone)]
pub struct FragmentJob {
    /// Index of the fragment in the plan.
    pub index: usize,
    /// The backend pool to run it on.
    pub backend: Arc<BackendPool>,
    /// Statements run first, in one simple query (BEGIN, snapshot import, settings).
    pub setup: String,
    /// The fragment SQL.
    pub sql: String,
    /// Parameter types as the client declared them.
    pub param_types: Vec<u32>,
    /// The client's parameters and the wanted result formats.
    pub params: BindParams,
}

/// What a fragment reports.
#[derive(Debug)]
pub enum FragmentEvent {
    /// The fragment's RowDescription body.
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
    /// The fragment failed; `error` is the ErrorResponse body, or `None` for a lost
    /// connection.
    Failed {
        /// Fragment index.
        index: usize,
        /// The server's ErrorResponse body.
        error: Option<BytesMut>,
        /// Human-readable cause, for logs.
        cause: String,
    },
}

/// Starts every job and returns the stream of their events.
pub fn run(
    jobs: Vec<FragmentJob>,
    login: LoginKey,
    query_id: u64,
) -> mpsc::Receiver<FragmentEvent> {
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    for job in jobs {
        spawn_job(job, None, login.clone(), query_id, tx.clone());
    }
    rx
}

/// Starts every job with a stream of events of its own, for a merge that must wait for
/// one particular fragment: each stream is bounded on its own, so a fragment the merge
/// is not reading yet waits instead of filling memory.
///
/// Such a merge stalls if one fragment waits for a pool slot while the others hold theirs,
/// so every slot is reserved first, backend by backend in index order (no two queries
/// wait on each other in a cycle). `None` when the slots are not free within
/// [`RESERVE_WAIT`]: nothing has run, and the caller passes the statement through.
pub async fn run_each(
    jobs: Vec<FragmentJob>,
    login: LoginKey,
    query_id: u64,
) -> Option<Vec<mpsc::Receiver<FragmentEvent>>> {
    let mut backends: Vec<(Arc<BackendPool>, usize)> = Vec::new();
    for job in &jobs {
        match backends
            .iter_mut()
            .find(|(b, _)| b.index == job.backend.index)
        {
            Some((_, n)) => *n += 1,
            None => backends.push((job.backend.clone(), 1)),
        }
    }
    backends.sort_by_key(|(b, _)| b.index);
    let mut reserved: Vec<(usize, OwnedSemaphorePermit)> = Vec::new();
    for (backend, n) in &backends {
        let permit = backend.reserve(*n, RESERVE_WAIT).await?;
        reserved.push((backend.index, permit));
    }
    let mut streams = Vec::with_capacity(jobs.len());
    for job in jobs {
        let permit = reserved
            .iter_mut()
            .find(|(i, _)| *i == job.backend.index)
            .and_then(|(_, p)| p.split(1))?;
        let (tx, rx) = mpsc::channel(ORDERED_CHANNEL_DEPTH);
        spawn_job(job, Some(permit), login.clone(), query_id, tx);
        streams.push(rx);
    }
    Some(streams)
}

fn spawn_job(
    job: FragmentJob,
    permit: Option<OwnedSemaphorePermit>,
    login: LoginKey,
    query_id: u64,
    tx: mpsc::Sender<FragmentEvent>,
) {
    tokio::spawn(async move {
        let index = job.index;
        let backend = job.backend.config.name.clone();
        let acquired = match permit {
            Some(p) => job.backend.acquire_reserved(&login, p).await,
            None => job.backend.acquire(&login).await,
        };
        let mut conn = match acquired {
            Ok(c) => c,
            Err(e) => {
                let _ = tx
                    .send(FragmentEvent::Failed {
                        index,
                        error: None,
                        cause: e.to_string(),
                    })
                    .await;
                return;
            }
        };
        debug!(query = query_id, fragment = index, backend = %backend, "fragment start");
        if let Err(cause) = run_one(&mut conn, &job, &tx).await {
            // the receiver is gone or the connection failed: stop the backend's work
            conn.broken = true;
            if let Some(target) = conn.cancel_target() {
                tokio::spawn(async move {
                    let _ = target.cancel().await;
                });
            }
            let _ = tx
                .send(FragmentEvent::Failed {
                    index,
                    error: None,
                    cause,
                })
                .await;
        }
        debug!(query = query_id, fragment = index, "fragment end");
    });
}

async fn run_one(
    conn: &mut PooledConnection,
    job: &FragmentJob,
    tx: &mpsc::Sender<FragmentEvent>,
) -> Result<(), String> {
    let index = job.index;
    let mut out = BytesMut::new();
    protocol::put_query(&mut out, &job.setup);
    protocol::put_parse(&mut out, "", &job.sql, &job.param_types);
    protocol::put_bind(
        &mut out,
        "",
        "",
        &job.params,
        &[],
        &job.params.result_formats,
    );
    protocol::put_describe_or_close(&mut out, b'D', b'P', "");
    protocol::put_execute(&mut out, "");
    protocol::put_empty(&mut out, b'S');
    protocol::put_query(&mut out, "COMMIT");
    conn.send(&out).await.map_err(|e| e.to_string())?;
    let mut error: Option<BytesMut> = None;
    let mut ready = 0;
    while ready < 3 {
        // a merge that stops (cancel, LIMIT reached, client gone) drops its receiver:
        // stop waiting for the backend at once, so the caller cancels its work
        let (tag, body) = tokio::select! {
            m = conn.next() => m.map_err(|e| e.to_string())?,
            _ = tx.closed() => return Err("merge stopped".to_string()),
        };
        match tag {
            // ready == 1: past the setup query, inside the fragment's own reply
            b'T' if error.is_none() && ready == 1 => {
                tx.send(FragmentEvent::Described {
                    index,
                    body: body.freeze(),
                })
                .await
                .map_err(|_| "merge stopped".to_string())?;
            }
            b'D' if error.is_none() && ready == 1 => {
                let mut message = BytesMut::with_capacity(body.len() + 5);
                protocol::put_message(&mut message, b'D', &body);
                tx.send(FragmentEvent::Row {
                    index,
                    message: message.freeze(),
                })
                .await
                .map_err(|_| "merge stopped".to_string())?;
            }
            b'E' => {
                error.get_or_insert(body);
            }
            b'Z' => ready += 1,
            _ => {}
        }
    }
    let event = match error {
        Some(e) => FragmentEvent::Failed {
            index,
            cause: {
                let (code, msg) = protocol::error_code_and_message(&e);
                format!("{}: {}", code.unwrap_or_default(), msg.unwrap_or_default())
            },
            error: Some(e),
        },
        None => FragmentEvent::Done { index },
    };
    let _ = tx.send(event).await;
    Ok(())
}
