//! Stopping a fan-out: a client's CancelRequest, and a client that disconnects.
//!
//! The fragments are made slow (an md5 of a long string per row, seconds of CPU), and the
//! cancel or the disconnect comes once pg_stat_activity shows them running. (A lock would
//! be more certain, but the session's own probe parses the statement and would wait on
//! it first.) The test then asserts:
//! - the client gets SQLSTATE 57014, as from PostgreSQL, for the concat, ordered-merge
//!   and combine paths, in the simple and the extended protocol;
//! - no fragment backend is left running or waiting (polled in pg_stat_activity);
//! - the session stays usable, and inside a transaction block the transaction is
//!   aborted (25P02 next), as PostgreSQL leaves it after a cancelled statement;
//! - after a disconnect mid-query the fragments are gone too.

mod common;

use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use common::{connect_primary, create_database, drop_database, fanout_config_toml, Pgfan};

const DB: &str = "pgfan_fanout_cancel";

/// The queries cancelled: one per merge path, each seconds of CPU per fragment.
const QUERIES: &[(&str, &str)] = &[
    (
        "concat",
        "SELECT id, v FROM big WHERE md5(repeat(v::text, 20000)) = 'x'",
    ),
    (
        "ordered",
        "SELECT id, v FROM big WHERE md5(repeat(v::text, 20000)) <> 'x' ORDER BY v DESC, id",
    ),
    (
        "combine",
        "SELECT g, count(*), sum(v) FROM big WHERE md5(repeat(v::text, 20000)) <> 'x' GROUP BY g",
    ),
];

async fn setup(db: &str) {
    create_database(db).await;
    let c = connect_primary(db).await;
    c.batch_execute(
        "CREATE TABLE big AS SELECT i AS id, i % 10 AS g, (i * 7 % 1000)::numeric AS v \
         FROM generate_series(1, 200000) AS i; ANALYZE big",
    )
    .await
    .expect("create table big");
}

async fn connect(pgfan: &Pgfan) -> (Client, tokio::task::JoinHandle<()>) {
    let url = pgfan.url(DB);
    let (client, conn) = tokio_postgres::connect(&url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect through pgfan {url}: {e}\n{}", pgfan.log_tail()));
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (client, task)
}

/// Fragment backends of database `db` that are not idle, as (state, wait_event_type).
async fn fragments(monitor: &Client, db: &str) -> Vec<(String, String)> {
    monitor
        .query(
            "SELECT coalesce(state, ''), coalesce(wait_event_type, '') FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = 'pgfan fragment' AND state <> 'idle'",
            &[&db],
        )
        .await
        .expect("read pg_stat_activity")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Waits until `n` fragments of `db` run; panics with what it saw after 30 s.
async fn wait_for_running_fragments(monitor: &Client, db: &str, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let f = fragments(monitor, db).await;
        if f.iter().filter(|(state, _)| state == "active").count() >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: fragments never ran; pg_stat_activity shows {f:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until no fragment backend of the database is running; panics after 10 s (the
/// cancel itself is immediate: this only bounds a hang).
async fn assert_fragments_gone(monitor: &Client, db: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let f = fragments(monitor, db).await;
        if f.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: fragment backends still running after the cancel: {f:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sqlstate(e: &tokio_postgres::Error) -> Option<&SqlState> {
    e.as_db_error().map(|d| d.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_request_stops_every_fragment() {
    setup(DB).await;
    let pgfan = Pgfan::start_with_config(&fanout_config_toml(), &[]);
    let monitor = connect_primary("postgres").await;
    let (client, _task) = connect(&pgfan).await;

    for (name, sql) in QUERIES {
        for extended in [false, true] {
            for in_transaction in [false, true] {
                let what = format!(
                    "{name} ({}{})",
                    if extended { "extended" } else { "simple" },
                    if in_transaction {
                        ", in a transaction"
                    } else {
                        ""
                    }
                );
                // EXPLAIN FANOUT also loads the catalog facts before the table is locked
                let plan = client
                    .simple_query(&format!("EXPLAIN FANOUT {sql}"))
                    .await
                    .unwrap_or_else(|e| panic!("{what}: EXPLAIN FANOUT: {e}"));
                let first = plan.iter().find_map(|m| match m {
                    SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                    _ => None,
                });
                assert!(
                    first.as_deref().is_some_and(|l| l.starts_with("FanOut:")),
                    "{what}: expected a fan-out, EXPLAIN FANOUT says {first:?}"
                );
                if in_transaction {
                    client.batch_execute("BEGIN").await.expect("BEGIN");
                }
                let token = client.cancel_token();
                let run = async {
                    if extended {
                        client.query(*sql, &[]).await.map(|_| ())
                    } else {
                        client.simple_query(sql).await.map(|_| ())
                    }
                };
                let cancel = async {
                    wait_for_running_fragments(&monitor, DB, 2, &what).await;
                    token.cancel_query(NoTls).await.expect("send CancelRequest");
                };
                let (result, ()) = tokio::time::timeout(Duration::from_secs(60), async {
                    tokio::join!(run, cancel)
                })
                .await
                .unwrap_or_else(|_| panic!("{what}: the cancelled query never returned"));
                let err = match result {
                    Ok(()) => panic!("{what}: the cancelled query succeeded"),
                    Err(e) => e,
                };
                assert_eq!(
                    sqlstate(&err),
                    Some(&SqlState::QUERY_CANCELED),
                    "{what}: expected 57014, got {err:?}\n{}",
                    pgfan.log_tail()
                );
                assert_fragments_gone(&monitor, DB, &what).await;
                if in_transaction {
                    let next = client.simple_query("SELECT 1").await;
                    let code = next.as_ref().err().and_then(sqlstate);
                    assert_eq!(
                        code,
                        Some(&SqlState::IN_FAILED_SQL_TRANSACTION),
                        "{what}: the transaction should be aborted after the cancel, got {next:?}"
                    );
                    client.batch_execute("ROLLBACK").await.expect("ROLLBACK");
                }
                // the session is usable, fan-out included
                let rows = client
                    .simple_query("SELECT g, count(*) FROM big GROUP BY g")
                    .await
                    .unwrap_or_else(|e| panic!("{what}: session unusable after cancel: {e}"));
                assert!(
                    rows.iter().any(|m| matches!(m, SimpleQueryMessage::Row(_))),
                    "{what}: no answer after the cancel"
                );
            }
        }
    }
    drop(client);
    drop(pgfan);
    drop_database(DB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disconnect_stops_every_fragment() {
    // its own database: the tests of this file run concurrently
    let db = "pgfan_fanout_disconnect";
    setup(db).await;
    let pgfan = Pgfan::start_with_config(&fanout_config_toml(), &[]);
    let monitor = connect_primary("postgres").await;
    for (name, sql) in QUERIES {
        let url = pgfan.url(db);
        let (client, conn) = tokio_postgres::connect(&url, NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect through pgfan: {e}"));
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        client
            .simple_query(&format!("EXPLAIN FANOUT {sql}"))
            .await
            .expect("EXPLAIN FANOUT");
        let query = tokio::spawn(async move {
            let _ = client.simple_query(sql).await;
        });
        // once the fragments run, drop the client's connection mid-query
        wait_for_running_fragments(&monitor, db, 2, name).await;
        task.abort();
        query.abort();
        assert_fragments_gone(&monitor, db, name).await;
    }
    drop(pgfan);
    drop_database(db).await;
}
