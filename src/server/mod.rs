//! The client side: listener, TLS, startup and authentication (pgwire), cancel keys, and the
//! session loop that hands an authenticated client to the relay.

pub mod auth;
pub mod cancel;
pub mod session;
pub mod threads;
pub mod tls;

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::info;

use crate::backends::session_pool::SessionPool;
use crate::config::{Config, TlsMode};
use auth::ClientAuth;
use cancel::CancelRegistry;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding the listen address failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// TLS files are unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Authentication setup failed.
    #[error("authentication setup: {0}")]
    Auth(String),
    /// A session thread could not start.
    #[error("runtime: {0}")]
    Runtime(String),
}

/// Everything sessions share.
pub struct ServerContext {
    /// The configuration.
    pub config: Arc<Config>,
    /// Client authentication mechanisms.
    pub auth: ClientAuth,
    /// TLS acceptor, when `tls.mode` is not `disable`.
    pub tls: Option<tls::ServerTls>,
    /// Live sessions' cancel keys.
    pub cancel: Arc<CancelRegistry>,
    /// Authenticated-or-authenticating client sessions now.
    pub clients: AtomicUsize,
    /// Reset pass-through connections waiting for their next client, one pool per session
    /// thread (a session takes one from its own thread's pool first, whose event loop the
    /// connection is registered with).
    pub session_pools: Vec<SessionPool>,
    /// Fragment pools, catalog cache and fan-out settings.
    pub fanout: crate::relay::fanout::FanoutEnv,
    /// Metric handles of connections and sessions (the recorder is installed first).
    pub metrics: crate::metrics::ServerMetrics,
    next_session: AtomicU64,
}

impl ServerContext {
    /// Builds the shared state (loads TLS files, prepares authentication).
    pub fn new(config: Arc<Config>) -> Result<Self, ServerError> {
        let tls = match (config.tls.mode, &config.tls.cert, &config.tls.key) {
            (TlsMode::Disable, _, _) => None,
            (_, Some(cert), Some(key)) => Some(tls::load(cert, key)?),
            _ => {
                return Err(ServerError::Tls(tls::TlsError::Pem(
                    "tls.cert and tls.key are required".into(),
                )))
            }
        };
        let auth = ClientAuth::new(&config, tls.as_ref().map(|t| t.cert_pem.as_slice()))
            .map_err(|e| ServerError::Auth(e.to_string()))?;
        Ok(Self {
            config: config.clone(),
            auth,
            tls,
            cancel: Arc::new(CancelRegistry::default()),
            clients: AtomicUsize::new(0),
            metrics: crate::metrics::ServerMetrics::new(
                &config.primary().name,
                config.session_threads.max(1),
            ),
            session_pools: (0..config.session_threads.max(1))
                .map(|_| SessionPool::new(config.backend_idle_timeout, 1000))
                .collect(),
            fanout: crate::relay::fanout::FanoutEnv {
                config: config.clone(),
                pools: Arc::new(crate::backends::pool::FragmentPools::new(&config)),
                catalog: Arc::new(crate::plan::CatalogCache::new(config.fanout.catalog_ttl)),
                statements: Arc::new(crate::plan::cache::StatementCache::default()),
            },
            next_session: AtomicU64::new(1),
        })
    }
}

impl ServerContext {
    /// The pool of reset connections of session thread `thread`.
    pub fn session_pool(&self, thread: usize) -> &SessionPool {
        &self.session_pools[thread % self.session_pools.len()]
    }

    /// A reset connection for `key`: one parked by session thread `thread` if there is
    /// one, else one parked by another thread, moved to this thread's event loop (a TLS
    /// one stays registered with its old thread, whose loop then relays each of its
    /// reads). A new login would cost far more, and a client expects an idle reset
    /// backend to be reused, as with pgbouncer.
    pub fn checkout_backend(
        &self,
        thread: usize,
        key: &crate::backends::session_pool::PoolKey,
    ) -> Option<crate::backends::connect::BackendConnection> {
        let own = thread % self.session_pools.len();
        self.session_pools[own].checkout(key).or_else(|| {
            self.session_pools
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != own)
                .find_map(|(_, pool)| pool.checkout(key))
                .and_then(|conn| conn.rehomed())
        })
    }
}

/// Binds the listen address.
pub async fn bind(config: &Config) -> Result<TcpListener, ServerError> {
    TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })
}

/// Serves clients forever: the session threads accept and run them (see [`threads`]);
/// the shared runtime keeps the pruning, health checks and metrics.
pub async fn serve(listener: TcpListener, ctx: Arc<ServerContext>) -> Result<(), ServerError> {
    let pruner = ctx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            for pool in &pruner.session_pools {
                pool.prune();
            }
            pruner.fanout.pools.prune();
            session::record_parked(&pruner);
        }
    });
    if ctx.config.fanout.enabled {
        crate::backends::health::spawn(
            ctx.fanout.pools.clone(),
            ctx.config.fanout.health_check_interval,
            ctx.config.fanout.ban_after_failures,
        );
    }
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, primary = %ctx.config.primary().url.address(), "pgfan listening");
    }
    let listener = listener
        .into_std()
        .map_err(|e| ServerError::Runtime(e.to_string()))?;
    threads::SessionThreads::start(&ctx, listener)
        .map_err(|e| ServerError::Runtime(e.to_string()))?;
    std::future::pending().await
}
