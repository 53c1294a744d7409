//! Backends on a Unix-domain socket: `--primary postgres:///?host=<socket dir>&port=<n>`,
//! libpq's way of naming a server on the same machine (pgbouncer's usual setup).
//!
//! The test asserts that the backend connections really use the socket (pg_stat_activity
//! shows `client_port = -1` for them) and that over it:
//! - pass-through statements answer as the primary does directly, in the simple protocol
//!   (text) and the extended one (binary), transactions included;
//! - a client's CancelRequest reaches the backend (57014);
//! - a cleanly left session's backend is reset and serves the next client;
//! - a fanned-out SELECT (EXPLAIN FANOUT says so) runs its fragments over the socket and
//!   returns the primary's answer.

mod common;

use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use common::{
    cluster, connect_pgfan, connect_primary, create_database, drop_database, fanout_config_toml,
    text_rows, Pgfan,
};

const DB: &str = "pgfan_unix_backend";

/// The primary's socket as pgfan's `--primary` takes it: the first directory of its
/// `unix_socket_directories`, as the `host` parameter.
async fn socket_url(direct: &Client) -> String {
    let dirs: String = direct
        .query_one("SHOW unix_socket_directories", &[])
        .await
        .expect("SHOW unix_socket_directories")
        .get(0);
    let dir = dirs
        .split(',')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    assert!(
        dir.starts_with('/'),
        "the primary has no socket directory: {dirs:?}"
    );
    let host: String = url::form_urlencoded::byte_serialize(dir.as_bytes()).collect();
    format!("postgres:///?host={host}&port={}", cluster().primary_port)
}

/// `client_port` of the session's own backend: -1 on a Unix-domain socket.
async fn own_client_port(c: &Client) -> i32 {
    c.query_one(
        "SELECT client_port FROM pg_stat_activity WHERE pid = pg_backend_pid()",
        &[],
    )
    .await
    .expect("own pg_stat_activity row")
    .get::<_, Option<i32>>(0)
    .unwrap_or(0)
}

async fn setup() -> Client {
    create_database(DB).await;
    let direct = connect_primary(DB).await;
    direct
        .batch_execute(
            "CREATE TABLE t AS SELECT i AS id, 'row ' || i AS name, i * 0.5::float8 AS score, \
             i % 7 AS g FROM generate_series(1, 100000) AS i; ANALYZE t",
        )
        .await
        .expect("create table t");
    direct
}

/// Backend connections of database `db` that came in over a Unix-domain socket.
async fn socket_backends_of(direct: &Client, db: &str) -> i64 {
    direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND client_port = -1",
            &[&db],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// Typed rows of the extended protocol (binary results).
async fn binary_rows(c: &Client, sql: &str) -> Vec<(i32, String, f64)> {
    c.query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_cancel_and_reuse_over_unix_socket() {
    let direct = setup().await;
    let url = socket_url(&direct).await;
    let pgfan = Pgfan::start(&["--primary", &url]);
    if Pgfan::direct_mode() {
        return;
    }
    let c = connect_pgfan(&pgfan, DB).await;
    assert_eq!(
        own_client_port(&c).await,
        -1,
        "the pinned backend is not on the Unix-domain socket\n{}",
        pgfan.log_tail()
    );

    for sql in [
        "SELECT id, name, score FROM t WHERE id <= 20 ORDER BY id",
        "SELECT id, name, score FROM t WHERE id % 1000 = 3 ORDER BY score DESC",
    ] {
        let through = c.simple_query(sql).await.expect("simple query via pgfan");
        let own = direct.simple_query(sql).await.expect("simple query direct");
        assert_eq!(text_rows(&through), text_rows(&own), "text rows of {sql}");
        assert_eq!(
            binary_rows(&c, sql).await,
            binary_rows(&direct, sql).await,
            "binary rows of {sql}"
        );
    }
    let err = c
        .simple_query("SELECT 1/0")
        .await
        .expect_err("division by zero");
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO));

    // a transaction and its rollback
    c.batch_execute("BEGIN; DELETE FROM t WHERE id <= 10")
        .await
        .expect("delete in a transaction");
    let n: i64 = c
        .query_one("SELECT count(*) FROM t WHERE id <= 10", &[])
        .await
        .expect("count inside")
        .get(0);
    assert_eq!(n, 0);
    c.batch_execute("ROLLBACK").await.expect("rollback");
    let n: i64 = direct
        .query_one("SELECT count(*) FROM t WHERE id <= 10", &[])
        .await
        .expect("count after")
        .get(0);
    assert_eq!(n, 10, "the rolled-back delete is visible");

    // cancel: pgfan forwards the CancelRequest over the socket
    let sleeping = connect_pgfan(&pgfan, DB).await;
    let sleep_pid: i32 = sleeping
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let sleep_token = sleeping.cancel_token();
    let running = tokio::spawn(async move { sleeping.simple_query("SELECT pg_sleep(30)").await });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let active: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'",
                &[&sleep_pid],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if active == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "pg_sleep never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sleep_token.cancel_query(NoTls).await.expect("cancel_query");
    // a guard against a hang, not a timing assertion
    let outcome = tokio::time::timeout(Duration::from_secs(25), running)
        .await
        .expect("the cancelled pg_sleep(30) did not end")
        .expect("sleeper task");
    let err = outcome.expect_err("pg_sleep was not cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");

    // reuse: the left session's backend is reset, parked, and serves the next client
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    let parked = loop {
        let row = direct
            .query_opt(
                "SELECT state, query FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .expect("pg_stat_activity");
        match row {
            None => break false,
            Some(r) => {
                let state: Option<String> = r.get(0);
                let query: Option<String> = r.get(1);
                if state.as_deref() == Some("idle")
                    && query
                        .unwrap_or_default()
                        .eq_ignore_ascii_case("DISCARD ALL")
                {
                    // pgfan parks it once it has read the ReadyForQuery
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break true;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "backend {pid} neither closed nor reset after its client left\n{}",
            pgfan.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        parked,
        "backend {pid} was closed, not reset\n{}",
        pgfan.log_tail()
    );
    let next = connect_pgfan(&pgfan, DB).await;
    let next_pid: i32 = next
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    assert_eq!(
        next_pid, pid,
        "the reset backend did not serve the next client"
    );
    assert_eq!(own_client_port(&next).await, -1);
    let rows = next
        .simple_query("SELECT count(*) FROM t")
        .await
        .expect("count via reused backend");
    assert_eq!(text_rows(&rows), vec![vec![Some("100000".to_string())]]);
    drop(next);
    drop(pgfan);
    drop_database(DB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_fragments_over_unix_socket() {
    const FAN_DB: &str = "pgfan_unix_fanout";
    create_database(FAN_DB).await;
    let direct = connect_primary(FAN_DB).await;
    direct
        .batch_execute(
            "CREATE TABLE t AS SELECT i AS id, i % 7 AS g, i * 0.5::float8 AS score \
             FROM generate_series(1, 100000) AS i; ANALYZE t",
        )
        .await
        .expect("create table t");
    let url = socket_url(&direct).await;
    let pgfan = Pgfan::start_with_config(&fanout_config_toml(), &["--primary", &url]);
    if Pgfan::direct_mode() {
        return;
    }
    let c = connect_pgfan(&pgfan, FAN_DB).await;
    let sql = "SELECT g, count(*), sum(id), min(score), max(score) FROM t GROUP BY g ORDER BY g";

    let explain = c
        .simple_query(&format!("EXPLAIN FANOUT {sql}"))
        .await
        .expect("EXPLAIN FANOUT");
    let first = text_rows(&explain)
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .unwrap_or_default();
    let fragments = first
        .strip_prefix("FanOut: ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u32>().ok());
    assert!(
        fragments.is_some_and(|n| n > 1),
        "not fanned out: {first:?}"
    );

    let through = c.simple_query(sql).await.expect("fan-out via pgfan");
    let own = direct.simple_query(sql).await.expect("direct");
    assert_eq!(text_rows(&through), text_rows(&own), "text rows");
    let typed = |rows: Vec<tokio_postgres::Row>| {
        rows.iter()
            .map(|r| {
                (
                    r.get::<_, i32>(0),
                    r.get::<_, i64>(1),
                    r.get::<_, i64>(2),
                    r.get::<_, f64>(3),
                    r.get::<_, f64>(4),
                )
            })
            .collect::<Vec<_>>()
    };
    // the extended protocol: sum(int4) is bigint, so every column has a Rust type
    assert_eq!(
        typed(c.query(sql, &[]).await.expect("binary via pgfan")),
        typed(direct.query(sql, &[]).await.expect("binary direct")),
        "binary rows"
    );

    // the pinned session and at least two fragment connections, all on the socket (the
    // fragment connections stay open in their pool)
    let on_socket = socket_backends_of(&direct, FAN_DB).await;
    assert!(
        on_socket >= 3,
        "{on_socket} backends of {FAN_DB} on the socket; expected the session's and the \
         fragments'\n{}",
        pgfan.log_tail()
    );
    drop(c);
    drop(pgfan);
    drop_database(FAN_DB).await;
}

/// A socket directory with no server in it: the client gets 08001 naming the socket's
/// path, and pgfan keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_socket_is_a_clear_error() {
    let url = format!(
        "postgres:///?host=%2Fnonexistent-pgfan-dir&port={}",
        cluster().primary_port
    );
    let pgfan = Pgfan::start(&["--primary", &url]);
    if Pgfan::direct_mode() {
        return;
    }
    for attempt in 0..2 {
        let err = tokio_postgres::connect(&pgfan.url("postgres"), NoTls)
            .await
            .err()
            .unwrap_or_else(|| panic!("attempt {attempt}: connected without a server"));
        let db = err
            .as_db_error()
            .unwrap_or_else(|| panic!("attempt {attempt}: no ErrorResponse: {err}"));
        assert_eq!(
            db.code(),
            &SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION
        );
        let path = format!("/nonexistent-pgfan-dir/.s.PGSQL.{}", cluster().primary_port);
        assert!(db.message().contains(&path), "{}", db.message());
    }
}
