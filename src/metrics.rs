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

use std::net::SocketAddr;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

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

/// Installs the global recorder; serves `/metrics` on `listen` when given.
pub fn install(listen: Option<SocketAddr>) -> Result<(), BuildError> {
    let buckets = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 30.0, 60.0,
    ];
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(QUERY_DURATION.to_string()), &buckets)?;
    match listen {
        Some(addr) => builder.with_http_listener(addr).install()?,
        None => {
            builder.install_recorder()?;
        }
    }
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
    Ok(())
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
    /// Resolves the handles; `primary` is the primary backend's name.
    pub fn new(primary: &str) -> Self {
        Self {
            client_connections: metrics::gauge!(CLIENT_CONNECTIONS),
            client_connections_total: metrics::counter!(CLIENT_CONNECTIONS_TOTAL),
            backends_pooled: metrics::gauge!(BACKEND_CONNECTIONS, "backend" => primary.to_string(), "state" => "pooled"),
            session: SessionMetrics::new(primary),
        }
    }
}

/// Metric handles one pass-through session updates on every statement.
#[derive(Clone)]
pub struct SessionMetrics {
    /// `pgfan_queries_total{route="passthrough"}`.
    pub queries: Counter,
    /// `pgfan_query_duration_seconds{route="passthrough"}`.
    pub duration: Histogram,
    /// `pgfan_backend_connections{backend, state="active"}`.
    pub backend_active: Gauge,
    /// `pgfan_backend_connections{backend, state="idle"}`.
    pub backend_idle: Gauge,
}

impl SessionMetrics {
    /// Resolves the handles for a session pinned to `backend`.
    pub fn new(backend: &str) -> Self {
        Self {
            queries: metrics::counter!(QUERIES_TOTAL, "route" => ROUTE_PASSTHROUGH),
            duration: metrics::histogram!(QUERY_DURATION, "route" => ROUTE_PASSTHROUGH),
            backend_active: metrics::gauge!(BACKEND_CONNECTIONS, "backend" => backend.to_string(), "state" => "active"),
            backend_idle: metrics::gauge!(BACKEND_CONNECTIONS, "backend" => backend.to_string(), "state" => "idle"),
        }
    }
}
