//! Fragment pools: per backend server, a bounded set of connections that run fragments and
//! control queries, logged in as the client's user to the client's database (so privileges
//! and row-level security are the client's own).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::connect::{self, BackendConnection, ConnectError};
use super::stats::BackendStats;
use crate::config::{BackendConfig, BackendRole, Config};
use crate::protocol;

/// Who a fragment connection logs in as: (user, database).
pub type LoginKey = (String, String);

/// Idle connections of one login, with the time each was returned.
type IdleList = Vec<(Instant, BackendConnection, BytesMut)>;

/// One backend server's fragment connections.
pub struct BackendPool {
    /// The configured backend.
    pub config: BackendConfig,
    /// Index in [`FragmentPools::backends`].
    pub index: usize,
    /// Live statistics of the backend's fragments.
    pub stats: BackendStats,
    /// Fragment connections this backend may have open, all sessions together.
    budget: usize,
    permits: Arc<Semaphore>,
    idle: Mutex<HashMap<LoginKey, IdleList>>,
    /// Open connections, running and idle (never above `budget`).
    open: AtomicUsize,
    /// The login of the latest checkout, for health checks.
    last_login: Mutex<Option<LoginKey>>,
    passwords: HashMap<String, String>,
    idle_timeout: Duration,
}

/// A fragment connection checked out of its pool; returned on drop unless marked broken.
pub struct PooledConnection {
    /// The connection (always `Some` until drop).
    conn: Option<BackendConnection>,
    /// Bytes read past the last message handled.
    pub buf: BytesMut,
    /// Set when the connection is in an unknown state: it is closed instead of returned.
    pub broken: bool,
    key: LoginKey,
    pool: Arc<BackendPool>,
    _permit: OwnedSemaphorePermit,
}

impl PooledConnection {
    /// The connection (`None` only while it is being returned to the pool).
    fn stream(&mut self) -> std::io::Result<&mut BackendConnection> {
        self.conn
            .as_mut()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotConnected, "returned"))
    }

    /// Where a CancelRequest for this connection goes.
    pub fn cancel_target(&self) -> Option<super::connect::CancelTarget> {
        self.conn.as_ref().map(BackendConnection::cancel_target)
    }

    /// The backend this connection belongs to.
    pub fn backend(&self) -> &BackendPool {
        &self.pool
    }

    /// Writes `bytes` to the backend.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let stream = &mut self.stream()?.stream;
        stream.write_all(bytes).await?;
        stream.flush().await
    }

    /// Reads the next whole message.
    pub async fn next(&mut self) -> std::io::Result<(u8, BytesMut)> {
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotConnected, "returned"))?;
        protocol::read_message(&mut conn.stream, &mut self.buf).await
    }

    /// Runs a simple query and returns its rows as text (NULL as `None`); an error comes
    /// back as the server's message.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
        let mut out = BytesMut::new();
        protocol::put_query(&mut out, sql);
        if let Err(e) = self.send(&out).await {
            self.broken = true;
            return Err(e.to_string());
        }
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (tag, body) = match self.next().await {
                Ok(m) => m,
                Err(e) => {
                    self.broken = true;
                    return Err(e.to_string());
                }
            };
            match tag {
                b'D' => rows.push(decode_text_row(&body)),
                b'E' => {
                    let (code, msg) = protocol::error_code_and_message(&body);
                    error = Some(format!(
                        "{}: {}",
                        code.unwrap_or_default(),
                        msg.unwrap_or_default()
                    ));
                }
                b'Z' => {
                    if body.first() != Some(&b'I') {
                        self.broken = true;
                    }
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    };
                }
                _ => {}
            }
        }
    }
}

/// Splits a DataRow body into its values as text.
pub fn decode_text_row(body: &[u8]) -> Vec<Option<String>> {
    row_values(body)
        .into_iter()
        .map(|v| v.map(|b| String::from_utf8_lossy(b).into_owned()))
        .collect()
}

/// Splits a DataRow body into its raw values.
pub fn row_values(body: &[u8]) -> Vec<Option<&[u8]>> {
    let mut r = protocol::Reader(body);
    let n = r.i16().unwrap_or(0).max(0) as usize;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        match r.i32() {
            Some(len) if len >= 0 => out.push(r.take(len as usize)),
            _ => out.push(None),
        }
    }
    out
}

impl Drop for PooledConnection {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if !self.broken && self.buf.is_empty() {
                if let Ok(mut idle) = self.pool.idle.lock() {
                    idle.entry(self.key.clone()).or_default().push((
                        Instant::now(),
                        conn,
                        BytesMut::new(),
                    ));
                    return;
                }
            }
            self.pool.closed(1);
        }
    }
}

impl BackendPool {
    /// Fragment connections this backend may run at once, all sessions together.
    pub fn capacity(&self) -> usize {
        self.budget
    }

    /// Checks out a connection logged in as `key`, opening one if none is idle; waits while
    /// the pool is at its budget.
    pub async fn acquire(
        self: &Arc<Self>,
        key: &LoginKey,
    ) -> Result<PooledConnection, ConnectError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ConnectError::Protocol("pool closed".into()))?;
        self.acquire_reserved(key, permit).await
    }

    /// Reserves `n` slots at once, waiting at most `wait`; `None` when they did not free
    /// up in time. A merge that needs all its fragments running together reserves first,
    /// so it never holds some slots while waiting for others forever.
    pub async fn reserve(&self, n: usize, wait: Duration) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(n).ok()?;
        tokio::time::timeout(wait, self.permits.clone().acquire_many_owned(n))
            .await
            .ok()?
            .ok()
    }

    /// One slot if one is free now.
    pub fn try_reserve(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Checks out a connection logged in as `key` on a slot reserved with
    /// [`BackendPool::reserve`] (one permit).
    pub async fn acquire_reserved(
        self: &Arc<Self>,
        key: &LoginKey,
        permit: OwnedSemaphorePermit,
    ) -> Result<PooledConnection, ConnectError> {
        match self.acquire_idle(key, permit) {
            Ok(c) => Ok(c),
            Err(permit) => self.acquire_new(key, permit).await,
        }
    }

    /// An idle connection logged in as `key` on a reserved slot; the slot back when there
    /// is none.
    pub fn acquire_idle(
        self: &Arc<Self>,
        key: &LoginKey,
        permit: OwnedSemaphorePermit,
    ) -> Result<PooledConnection, OwnedSemaphorePermit> {
        self.remember_login(key);
        let mut expired = 0;
        let reused = self.idle.lock().ok().and_then(|mut idle| {
            let list = idle.get_mut(key)?;
            while let Some((since, conn, buf)) = list.pop() {
                if since.elapsed() < self.idle_timeout {
                    return Some((conn, buf));
                }
                expired += 1;
            }
            None
        });
        self.closed(expired);
        match reused {
            Some((conn, buf)) => Ok(self.checked_out(conn, buf, key, permit)),
            None => Err(permit),
        }
    }

    fn checked_out(
        self: &Arc<Self>,
        conn: BackendConnection,
        buf: BytesMut,
        key: &LoginKey,
        permit: OwnedSemaphorePermit,
    ) -> PooledConnection {
        PooledConnection {
            conn: Some(conn),
            buf,
            broken: false,
            key: key.clone(),
            pool: self.clone(),
            _permit: permit,
        }
    }

    /// Opens a new connection logged in as `key` on a reserved slot. An idle connection
    /// of another login is closed first when the backend is at its budget.
    pub async fn acquire_new(
        self: &Arc<Self>,
        key: &LoginKey,
        permit: OwnedSemaphorePermit,
    ) -> Result<PooledConnection, ConnectError> {
        self.remember_login(key);
        if self.open.load(Ordering::Relaxed) >= self.budget {
            self.evict_idle();
        }
        let url = &self.config.url;
        let user = url.user.clone().unwrap_or_else(|| key.0.clone());
        let database = url.database.clone().unwrap_or_else(|| key.1.clone());
        let params = vec![
            ("user".to_string(), user.clone()),
            ("database".to_string(), database),
            ("application_name".to_string(), "pgfan fragment".to_string()),
            ("client_encoding".to_string(), "UTF8".to_string()),
        ];
        let password = url
            .password
            .clone()
            .or_else(|| self.passwords.get(&user).cloned());
        let conn = connect::connect(url, &params, password.as_deref()).await?;
        let n = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(crate::metrics::BACKEND_FRAGMENT_CONNECTIONS, "backend" => self.config.name.clone())
            .set(n as f64);
        let buf = conn.pending.clone();
        Ok(self.checked_out(conn, buf, key, permit))
    }

    /// The login of the latest checkout (health checks log in as it).
    pub fn last_login(&self) -> Option<LoginKey> {
        self.last_login.lock().ok().and_then(|l| l.clone())
    }

    fn remember_login(&self, key: &LoginKey) {
        if let Ok(mut l) = self.last_login.lock() {
            if l.as_ref() != Some(key) {
                *l = Some(key.clone());
            }
        }
    }

    /// Closes the oldest idle connection, of any login.
    fn evict_idle(&self) {
        let evicted = self.idle.lock().ok().and_then(|mut idle| {
            let (key, at) = idle
                .iter()
                .flat_map(|(k, list)| list.iter().enumerate().map(move |(i, e)| (k, i, e.0)))
                .min_by_key(|(_, _, since)| *since)
                .map(|(k, i, _)| (k.clone(), i))?;
            idle.get_mut(&key).map(|list| list.remove(at))
        });
        if evicted.is_some() {
            self.closed(1);
        }
    }

    /// `n` connections were closed.
    fn closed(&self, n: usize) {
        if n == 0 {
            return;
        }
        let left = self.open.fetch_sub(n, Ordering::Relaxed).saturating_sub(n);
        metrics::gauge!(crate::metrics::BACKEND_FRAGMENT_CONNECTIONS, "backend" => self.config.name.clone())
            .set(left as f64);
    }

    /// Slots not in use right now.
    pub fn free_slots(&self) -> usize {
        self.permits.available_permits()
    }

    /// Closes idle connections older than the idle timeout.
    pub fn prune(&self) {
        let mut pruned = 0;
        if let Ok(mut idle) = self.idle.lock() {
            for list in idle.values_mut() {
                let before = list.len();
                list.retain(|(since, _, _)| since.elapsed() < self.idle_timeout);
                pruned += before - list.len();
            }
        }
        self.closed(pruned);
    }
}

/// All backends' fragment pools, primary first.
pub struct FragmentPools {
    /// One pool per configured backend; index 0 is the primary.
    pub backends: Vec<Arc<BackendPool>>,
}

impl FragmentPools {
    /// Builds empty pools for the configured backends.
    pub fn new(config: &Config) -> Self {
        let passwords: HashMap<String, String> = config
            .users
            .iter()
            .filter_map(|u| Some((u.name.clone(), u.password.clone()?)))
            .collect();
        let mut ordered: Vec<&BackendConfig> = config
            .backends
            .iter()
            .filter(|b| b.role == BackendRole::Primary)
            .collect();
        ordered.extend(
            config
                .backends
                .iter()
                .filter(|b| b.role != BackendRole::Primary),
        );
        let backends = ordered
            .into_iter()
            .enumerate()
            .map(|(index, b)| {
                let budget = b
                    .pool_size
                    .min(config.fanout.max_fragment_connections)
                    .max(1);
                Arc::new(BackendPool {
                    config: b.clone(),
                    index,
                    stats: BackendStats::new(&b.name),
                    budget,
                    permits: Arc::new(Semaphore::new(budget)),
                    idle: Mutex::new(HashMap::new()),
                    open: AtomicUsize::new(0),
                    last_login: Mutex::new(None),
                    passwords: passwords.clone(),
                    idle_timeout: config.backend_idle_timeout,
                })
            })
            .collect();
        FragmentPools { backends }
    }

    /// The primary's pool.
    pub fn primary(&self) -> &Arc<BackendPool> {
        &self.backends[0]
    }

    /// Closes idle connections past their timeout.
    pub fn prune(&self) {
        for b in &self.backends {
            b.prune();
        }
    }
}
