//! Runs fragments concurrently on the backend pools and streams their results back as
//! [`FragmentEvent`]s over a bounded channel (so a slow client slows the fragments down
//! instead of filling memory). Dropping the receiver cancels every fragment still running.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tracing::debug;

use crate::backends::pool::{BackendPool, LoginKey, PooledConnection};
use crate::protocol::{self, BindParams};

/// Events per channel slot: bounded, so memory does not grow with the result.
const CHANNEL_DEPTH: usize = 256;

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
        let tx = tx.clone();
        let login = login.clone();
        tokio::spawn(async move {
            let index = job.index;
            let backend = job.backend.config.name.clone();
            let mut conn = match job.backend.acquire(&login).await {
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
    rx
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
        let (tag, body) = conn.next().await.map_err(|e| e.to_string())?;
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
