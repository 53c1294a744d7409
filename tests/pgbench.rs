//! pgbench through pgfan (issue 2, "Tests"): `pgbench -i -s 5` into a fresh database, then
//! `pgbench -M simple|extended|prepared -c 8 -j 2 -T 10` must finish with 0 failed
//! transactions and a non-zero number of processed transactions.
//!
//! Each protocol mode is its own test with its own database and pgfan instance, so the three
//! run in parallel under `--test-threads=4`.
//!
//! Run: `cargo test --test pgbench`.

mod common;

use std::process::Output;
use std::time::Duration;

use common::{
    connect_primary, create_database, drop_database, field, output_within, pg_tool, query_i64,
    show, Pgfan,
};

/// Runs pgbench against pgfan on `port`, database `db`, bounded by `limit`.
async fn pgbench(port: u16, db: &str, args: &[&str], limit: Duration) -> Output {
    let mut cmd = pg_tool("pgbench");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .arg(db);
    output_within(cmd, limit, &format!("pgbench {args:?}")).await
}

async fn run_mode(mode: &str) {
    let db = format!("pgfan_pgbench_{mode}");
    create_database(&db).await;
    let pgfan = Pgfan::start(&[]);

    let init = pgbench(
        pgfan.port,
        &db,
        &["-i", "-s", "5"],
        Duration::from_secs(300),
    )
    .await;
    assert!(
        init.status.success(),
        "pgbench -i -s 5 through pgfan failed:\n{}\npgfan log:\n{}",
        show(&init),
        pgfan.log_tail()
    );
    // The initialisation really landed in the database.
    let direct = connect_primary(&db).await;
    let accounts = query_i64(&direct, "select count(*) from pgbench_accounts").await;
    assert_eq!(accounts, 500_000, "pgbench_accounts rows after -i -s 5");
    let branches = query_i64(&direct, "select count(*) from pgbench_branches").await;
    assert_eq!(branches, 5, "pgbench_branches rows after -i -s 5");
    let history_before = query_i64(&direct, "select count(*) from pgbench_history").await;
    assert_eq!(history_before, 0);

    let run = pgbench(
        pgfan.port,
        &db,
        &["-M", mode, "-c", "8", "-j", "2", "-T", "10"],
        Duration::from_secs(120),
    )
    .await;
    let stdout = String::from_utf8_lossy(&run.stdout);
    let report = format!("{}\npgfan log:\n{}", show(&run), pgfan.log_tail());
    assert!(run.status.success(), "pgbench -M {mode} failed:\n{report}");
    assert!(
        stdout.contains(&format!("query mode: {mode}")),
        "pgbench did not run in mode {mode}:\n{report}"
    );
    let processed = field(&stdout, "number of transactions actually processed:")
        .unwrap_or_else(|| panic!("no 'transactions actually processed' line:\n{report}"));
    let failed = field(&stdout, "number of failed transactions:")
        .unwrap_or_else(|| panic!("no 'number of failed transactions' line:\n{report}"));
    assert_eq!(failed, 0, "failed transactions in -M {mode}:\n{report}");
    assert!(
        processed > 0,
        "no transactions processed in -M {mode}:\n{report}"
    );
    assert!(
        !String::from_utf8_lossy(&run.stderr).contains("error"),
        "pgbench -M {mode} reported errors:\n{report}"
    );

    // Every processed transaction inserted one history row through pgfan. A transaction
    // in flight when the 10 s ran out may have committed without being counted: at most
    // one per client.
    let history = query_i64(&direct, "select count(*) from pgbench_history").await as u64;
    assert!(
        (processed..=processed + 8).contains(&history),
        "pgbench_history has {history} rows but pgbench processed {processed} transactions \
         in -M {mode}"
    );
    drop(direct);
    drop(pgfan);
    drop_database(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_simple() {
    run_mode("simple").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_extended() {
    run_mode("extended").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared() {
    run_mode("prepared").await;
}
