//! Reuse of pass-through connections between client sessions (pgbouncer's session mode).
//!
//! A connection is parked only after a clean end (Terminate, idle, nothing in flight) and a
//! successful `DISCARD ALL`, which drops temp tables, prepared statements, cursors, LISTENs,
//! advisory locks and SET values. It is handed only to a client with exactly the same
//! startup parameters, so its ParameterStatus values are the ones a fresh login would report.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::connect::{BackendConnection, BackendStream, MessageReader};
use crate::protocol;

/// How long a reset may take before the connection is dropped instead.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// Identifies interchangeable connections: backend name plus sorted startup parameters.
pub type PoolKey = (String, Vec<(String, String)>);

/// A reset connection waiting for its next client.
struct Parked {
    conn: IdleBackend,
    since: Instant,
}

/// What is kept of a backend connection between sessions.
pub struct IdleBackend {
    /// The socket.
    pub stream: BackendStream,
    /// Where the server was reached.
    pub addr: super::connect::BackendAddr,
    /// Backend process id.
    pub pid: i32,
    /// Backend cancel secret.
    pub secret: Vec<u8>,
    /// ParameterStatus values in the order of the original login.
    pub parameters: Vec<(String, String)>,
}

impl IdleBackend {
    fn into_connection(self) -> BackendConnection {
        let mut startup_messages = BytesMut::new();
        for (name, value) in &self.parameters {
            protocol::put_parameter_status(&mut startup_messages, name, value);
        }
        BackendConnection {
            stream: self.stream,
            addr: self.addr,
            pid: self.pid,
            secret: self.secret,
            startup_messages,
            parameters: self.parameters,
            status: b'I',
            pending: BytesMut::new(),
        }
    }
}

/// Idle, reset backend connections by [`PoolKey`].
pub struct SessionPool {
    idle: Mutex<HashMap<PoolKey, Vec<Parked>>>,
    idle_timeout: Duration,
    max_idle_per_key: usize,
}

impl SessionPool {
    /// A pool that closes connections idle longer than `idle_timeout`.
    pub fn new(idle_timeout: Duration, max_idle_per_key: usize) -> Self {
        Self {
            idle: Mutex::new(HashMap::new()),
            idle_timeout,
            max_idle_per_key,
        }
    }

    /// Takes a live idle connection for `key`, if any.
    pub fn checkout(&self, key: &PoolKey) -> Option<BackendConnection> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(key)?;
        while let Some(mut parked) = list.pop() {
            if parked.since.elapsed() > self.idle_timeout {
                continue;
            }
            // An idle server sends nothing; readable bytes or EOF mean it went away
            // (restart, pg_terminate_backend, idle timeout on the server).
            let mut probe = [0u8; 1];
            if parked.conn.stream.read(&mut probe).now_or_never().is_some() {
                continue;
            }
            return Some(parked.conn.into_connection());
        }
        None
    }

    /// Resets `conn` with `DISCARD ALL` and parks it; drops it if anything is off.
    pub async fn reset_and_park(&self, key: PoolKey, mut conn: IdleBackend) {
        let reset = tokio::time::timeout(RESET_TIMEOUT, discard_all(&mut conn)).await;
        if !matches!(reset, Ok(Ok(()))) {
            tracing::debug!(pid = conn.pid, "reset failed; closing backend connection");
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let timeout = self.idle_timeout;
        idle.retain(|_, list| {
            list.retain(|p| p.since.elapsed() <= timeout);
            !list.is_empty()
        });
        let list = idle.entry(key).or_default();
        if list.len() < self.max_idle_per_key {
            list.push(Parked {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Closes connections idle longer than the timeout.
    pub fn prune(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let timeout = self.idle_timeout;
        idle.retain(|_, list| {
            list.retain(|p| p.since.elapsed() <= timeout);
            !list.is_empty()
        });
    }

    /// Connections parked now.
    pub fn parked(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }
}

/// Runs `DISCARD ALL` and records the ParameterStatus values it reports back.
async fn discard_all(conn: &mut IdleBackend) -> std::io::Result<()> {
    let mut query = BytesMut::new();
    postgres_protocol::message::frontend::query("DISCARD ALL", &mut query)?;
    conn.stream.write_all(&query).await?;
    conn.stream.flush().await?;
    let mut reader = MessageReader::default();
    let mut ok = false;
    loop {
        let (tag, body) = reader.next(&mut conn.stream).await?;
        match tag {
            b'C' => ok = body.as_ref() == b"DISCARD ALL\0",
            b'S' => {
                if let Some((name, value)) = protocol::parameter_status(&body) {
                    match conn.parameters.iter_mut().find(|(n, _)| *n == name) {
                        Some(p) => p.1 = value,
                        None => conn.parameters.push((name, value)),
                    }
                }
            }
            b'N' | b'A' => {}
            b'Z' => {
                let idle = body.first() == Some(&b'I');
                return if ok && idle && reader.buf.is_empty() {
                    Ok(())
                } else {
                    Err(std::io::Error::other(
                        "DISCARD ALL did not complete cleanly",
                    ))
                };
            }
            _ => return Err(std::io::Error::other("unexpected reply to DISCARD ALL")),
        }
    }
}
