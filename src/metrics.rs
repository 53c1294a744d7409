//! Prometheus exporter and the metric names pgfan records.
//!
//! Names: `pgfan_client_connections` (gauge), `pgfan_client_connections_total` and
//! `pgfan_client_connections_rejected_total` (counters), `pgfan_queries_total{route}`,
//! `pgfan_query_duration_seconds{route}` (histogram) and
//! `pgfan_backend_connections{backend,state}` (gauge, state = active | idle); per backend
//! the fragment statistics `pgfan_backend_fragments_total`, `..._fragment_errors_total`,
//! `..._fragments_in_flight`, `..._throughput_pages_per_second`,
//! `..._fragment_latency_seconds`, `..._healthy`, `..._replica_lag_bytes` and
//! `..._fragment_connections`; `pgfan_fragment_retries_total`, `pgfan_fragment_hedges_total`.

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Connected clients.
pub const CLIENT_CONNECTIONS: &str = "pgfan_client_connections";
/// Accepted client connections since start.
pub const CLIENT_CONNECTIONS_TOTAL: &str = "pgfan_client_connections_total";
/// Client connections refused (limit, TLS, auth).
pub const CLIENT_CONNECTIONS_REJECTED: &str = "pgfan_client_connections_rejected_total";
/// Statements by route.
pub const QUERIES_TOTAL: &str = "pgfan_queries_total";
/// Statement latency by route.
pub const QUERY_DURATION: &str = "pgfan_query_duration_seconds";
/// Backend connections by backend and state.
pub const BACKEND_CONNECTIONS: &str = "pgfan_backend_connections";

/// Fragments completed per backend (the winning attempt).
pub const BACKEND_FRAGMENTS: &str = "pgfan_backend_fragments_total";
/// Fragment attempts that failed per backend.
pub const BACKEND_FRAGMENT_ERRORS: &str = "pgfan_backend_fragment_errors_total";
/// Fragments running now per backend.
pub const BACKEND_IN_FLIGHT: &str = "pgfan_backend_fragments_in_flight";
/// EWMA of one fragment connection's heap pages per second, per backend.
pub const BACKEND_THROUGHPUT: &str = "pgfan_backend_throughput_pages_per_second";
/// EWMA of fragment latency per backend.
pub const BACKEND_LATENCY: &str = "pgfan_backend_fragment_latency_seconds";
/// 1 while a backend takes fragments, 0 while it is banned.
pub const BACKEND_HEALTHY: &str = "pgfan_backend_healthy";
/// A replica's replay lag behind the primary's WAL position, in bytes.
pub const BACKEND_REPLICA_LAG: &str = "pgfan_backend_replica_lag_bytes";
/// Open fragment connections per backend (running and idle).
pub const BACKEND_FRAGMENT_CONNECTIONS: &str = "pgfan_backend_fragment_connections";
/// Fragments run again on another backend after a connection failure.
pub const FRAGMENT_RETRIES: &str = "pgfan_fragment_retries_total";
/// Hedged copies started for slow fragments.
pub const FRAGMENT_HEDGES: &str = "pgfan_fragment_hedges_total";

/// Route label of statements relayed to the primary unchanged.
pub const ROUTE_PASSTHROUGH: &str = "passthrough";
/// Route label of statements split into fragments.
pub const ROUTE_FANOUT: &str = "fanout";
/// Candidate SELECTs that passed through, by reason.
pub const PASSTHROUGH_REASONS: &str = "pgfan_passthrough_total";

/// Installs the global recorder. Its page is served by [`serve`], which publishes the
/// session threads' tallies first.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let buckets = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 30.0, 60.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(QUERY_DURATION.to_string()), &buckets)?
        .install_recorder()?;
    metrics::describe_gauge!(CLIENT_CONNECTIONS, "Client connections open now");
    metrics::describe_counter!(CLIENT_CONNECTIONS_TOTAL, "Client connections accepted");
    metrics::describe_counter!(
        CLIENT_CONNECTIONS_REJECTED,
        "Client connections refused (limit, TLS, authentication)"
    );
    metrics::describe_counter!(QUERIES_TOTAL, "Statements by route");
    metrics::describe_counter!(
        PASSTHROUGH_REASONS,
        "SELECTs pgfan considered and passed through, by reason"
    );
    metrics::describe_histogram!(
        QUERY_DURATION,
        metrics::Unit::Seconds,
        "Statement latency by route, from the request to ReadyForQuery"
    );
    metrics::describe_gauge!(
        BACKEND_CONNECTIONS,
        "Backend connections by backend and state (active = running a request)"
    );
    metrics::describe_counter!(BACKEND_FRAGMENTS, "Fragments completed, by backend");
    metrics::describe_counter!(
        BACKEND_FRAGMENT_ERRORS,
        "Fragment attempts that failed, by backend"
    );
    metrics::describe_gauge!(BACKEND_IN_FLIGHT, "Fragments running now, by backend");
    metrics::describe_gauge!(
        BACKEND_THROUGHPUT,
        "Moving average of one fragment connection's heap pages per second, by backend"
    );
    metrics::describe_gauge!(
        BACKEND_LATENCY,
        metrics::Unit::Seconds,
        "Moving average of fragment latency, by backend"
    );
    metrics::describe_gauge!(BACKEND_HEALTHY, "1: the backend takes fragments; 0: banned");
    metrics::describe_gauge!(
        BACKEND_REPLICA_LAG,
        "Replay lag of a replica behind the primary's WAL position, in bytes"
    );
    metrics::describe_gauge!(
        BACKEND_FRAGMENT_CONNECTIONS,
        "Open fragment connections (running and idle), by backend"
    );
    metrics::describe_counter!(
        FRAGMENT_RETRIES,
        "Fragments run again on another backend after a connection failure"
    );
    metrics::describe_counter!(FRAGMENT_HEDGES, "Hedged copies of slow fragments started");
    Ok(handle)
}

/// How often tallies are published and histograms drained when nobody scrapes.
const UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Publishes the session tallies (`sessions`) and drains the registry's histograms every
/// few seconds, so that neither grows while nobody scrapes.
pub async fn keep_up(handle: PrometheusHandle, sessions: impl Fn()) {
    let mut tick = tokio::time::interval(UPKEEP);
    loop {
        tick.tick().await;
        sessions();
        handle.run_upkeep();
    }
}

/// Serves the Prometheus page over HTTP on `listener` (any path; `/health` answers `OK`),
/// publishing the session tallies (`sessions`) before each render.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    sessions: impl Fn() + Clone + Send + Sync + 'static,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                continue;
            }
        };
        let handle = handle.clone();
        let sessions = sessions.clone();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let page = if req.uri().path() == "/health" {
                    "OK".to_string()
                } else {
                    sessions();
                    handle.render()
                };
                let mut response =
                    hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(page)));
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                std::future::ready(Ok::<_, std::convert::Infallible>(response))
            });
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

/// Counts one candidate SELECT that passed through: `pgfan_passthrough_total{reason}`.
/// Each thread resolves a label's handle once (a registry lookup hashes the labels and
/// takes a lock, on every screened statement otherwise).
pub fn count_passthrough(reason: &'static str) {
    thread_local! {
        static HANDLES: std::cell::RefCell<Vec<(&'static str, Counter)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    HANDLES.with(|handles| {
        let mut handles = handles.borrow_mut();
        if let Some((_, counter)) = handles.iter().find(|(label, _)| *label == reason) {
            counter.increment(1);
            return;
        }
        let counter = metrics::counter!(PASSTHROUGH_REASONS, "reason" => reason);
        counter.increment(1);
        handles.push((reason, counter));
    });
}

/// Metric handles resolved once at start: every connection updates them, and a registry
/// lookup per connection (labels hashed, keys compared) costs more than the update.
pub struct ServerMetrics {
    /// `pgfan_client_connections`.
    pub client_connections: Gauge,
    /// `pgfan_client_connections_total`.
    pub client_connections_total: Counter,
    /// `pgfan_backend_connections{backend, state="pooled"}`.
    pub backends_pooled: Gauge,
    /// The pass-through sessions' handles.
    pub session: SessionMetrics,
}

impl ServerMetrics {
    /// Resolves the handles; `primary` is the primary backend's name, `threads` the number
    /// of session threads.
    pub fn new(primary: &str, threads: usize) -> Self {
        Self {
            client_connections: metrics::gauge!(CLIENT_CONNECTIONS),
            client_connections_total: metrics::counter!(CLIENT_CONNECTIONS_TOTAL),
            backends_pooled: metrics::gauge!(BACKEND_CONNECTIONS, "backend" => primary.to_string(), "state" => "pooled"),
            session: SessionMetrics::new(primary, threads),
        }
    }
}

/// The registry handles of pass-through sessions.
struct SessionHandles {
    queries: Counter,
    duration: Histogram,
    backend_active: Gauge,
    backend_idle: Gauge,
}

/// Durations a thread keeps before it publishes its tally itself (bounds its memory when
/// nobody scrapes).
const TALLY_DURATIONS: usize = 4096;

/// What the sessions of one session thread counted since the last publish.
#[derive(Default)]
struct Tally {
    queries: u64,
    backend_active: i64,
    backend_idle: i64,
    durations: Vec<f64>,
    passthrough: Vec<(&'static str, u64)>,
}

/// The pass-through sessions' metrics, tallied per session thread and published into the
/// registry when `/metrics` is scraped: the registry's counters, gauges and histograms are
/// atomics shared by every thread, and updating them on every statement moved their cache
/// lines between cores several times per transaction.
pub struct SessionMetrics {
    handles: SessionHandles,
    threads: Vec<std::sync::Mutex<Tally>>,
}

impl SessionMetrics {
    /// Resolves the handles for sessions pinned to `backend`, run by `threads` threads.
    pub fn new(backend: &str, threads: usize) -> Self {
        Self {
            handles: SessionHandles {
                queries: metrics::counter!(QUERIES_TOTAL, "route" => ROUTE_PASSTHROUGH),
                duration: metrics::histogram!(QUERY_DURATION, "route" => ROUTE_PASSTHROUGH),
                backend_active: metrics::gauge!(BACKEND_CONNECTIONS, "backend" => backend.to_string(), "state" => "active"),
                backend_idle: metrics::gauge!(BACKEND_CONNECTIONS, "backend" => backend.to_string(), "state" => "idle"),
            },
            threads: (0..threads.max(1)).map(|_| Default::default()).collect(),
        }
    }

    /// The tally of session thread `thread`.
    pub fn thread(&self, thread: usize) -> SessionTally<'_> {
        SessionTally {
            handles: &self.handles,
            tally: &self.threads[thread % self.threads.len()],
        }
    }

    /// Moves every thread's tally into the registry.
    pub fn publish(&self) {
        for thread in 0..self.threads.len() {
            self.thread(thread).publish();
        }
    }
}

/// One session thread's tally. Its lock is only ever contended by a publish.
#[derive(Clone, Copy)]
pub struct SessionTally<'a> {
    handles: &'a SessionHandles,
    tally: &'a std::sync::Mutex<Tally>,
}

impl SessionTally<'_> {
    fn with(&self, f: impl FnOnce(&mut Tally)) {
        if let Ok(mut t) = self.tally.lock() {
            f(&mut t);
        }
    }

    /// A statement was relayed: `pgfan_queries_total{route="passthrough"}`.
    pub fn query(&self) {
        self.with(|t| t.queries += 1);
    }

    /// A backend connection went from idle to running a request.
    pub fn backend_busy(&self) {
        self.with(|t| {
            t.backend_active += 1;
            t.backend_idle -= 1;
        });
    }

    /// A request took `seconds` to its ReadyForQuery; the backend is idle again when
    /// `idle_now`.
    pub fn request_done(&self, seconds: f64, idle_now: bool) {
        let mut full = false;
        self.with(|t| {
            t.durations.push(seconds);
            if idle_now {
                t.backend_active -= 1;
                t.backend_idle += 1;
            }
            full = t.durations.len() >= TALLY_DURATIONS;
        });
        if full {
            self.publish();
        }
    }

    /// A backend connection joins (`+1`) or leaves (`-1`) the idle or active state.
    pub fn backend_state(&self, active: bool, delta: i64) {
        self.with(|t| {
            if active {
                t.backend_active += delta;
            } else {
                t.backend_idle += delta;
            }
        });
    }

    /// A candidate SELECT passed through: `pgfan_passthrough_total{reason}`.
    pub fn passthrough(&self, reason: &'static str) {
        self.with(
            |t| match t.passthrough.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, n)) => *n += 1,
                None => t.passthrough.push((reason, 1)),
            },
        );
    }

    /// Moves this thread's tally into the registry.
    pub fn publish(&self) {
        let taken = match self.tally.lock() {
            Ok(mut t) => Tally {
                queries: std::mem::take(&mut t.queries),
                backend_active: std::mem::take(&mut t.backend_active),
                backend_idle: std::mem::take(&mut t.backend_idle),
                durations: std::mem::take(&mut t.durations),
                passthrough: t
                    .passthrough
                    .iter_mut()
                    .map(|(r, n)| (*r, std::mem::take(n)))
                    .collect(),
            },
            Err(_) => return,
        };
        let h = self.handles;
        if taken.queries > 0 {
            h.queries.increment(taken.queries);
        }
        if taken.backend_active != 0 {
            h.backend_active.increment(taken.backend_active as f64);
        }
        if taken.backend_idle != 0 {
            h.backend_idle.increment(taken.backend_idle as f64);
        }
        for d in taken.durations {
            h.duration.record(d);
        }
        for (reason, n) in taken.passthrough {
            if n > 0 {
                metrics::counter!(PASSTHROUGH_REASONS, "reason" => reason).increment(n);
            }
        }
    }
}
