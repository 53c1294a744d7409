//! Adaptive dispatch (DESIGN.md `dispatch/`: a fragment queue that idle connections pull
//! from, retries, a per-backend budget of fragment connections; invariant 5, "faults stay
//! local") against the real cluster.
//!
//! - `uneven_servers`: the primary may use 1 CPU, replica1 a fifth of one
//!   (`scripts/pg-cluster start --cpu-quota-of primary=1.0 --cpu-quota-of replica1=0.2`).
//!   pgfan has the primary and replica1 with 2 fragment connections each. A CPU-heavy
//!   aggregate (about a second serially) runs five times; each answer must equal the
//!   primary's own, and `pgfan_backend_fragments_total` must show that the primary ran
//!   strictly more of the fragments than replica1. Static dispatch (one fragment per
//!   connection, dealt round-robin) splits them evenly and fails this. EXPLAIN FANOUT must
//!   show more fragments than the 4 fragment connections (over-partitioning).
//! - `replica_dies`: four clients loop over a fan-out aggregate (simple and extended
//!   protocol) through pgfan with the primary and two replicas. Once replica2 runs a
//!   fragment, it is stopped with `pg_ctl -m immediate`. Every query must give the right
//!   answer or one clean error (an ErrorResponse with a SQLSTATE, the connection still
//!   usable), none may hang (60 s each), queries started after the stop must still be
//!   answered, and so must three queries once the load is over. Then replica2 is started
//!   again (`scripts/pg-cluster start`) and must take fragments again within 30 s
//!   (`pgfan_backend_fragments_total{backend="replica2"}` grows, `pgfan_backend_healthy`
//!   is 1).
//! - `load_budget`: pgbench with 64 clients for 60 s through pgfan, mostly point lookups
//!   (pass-through) and 1 in 21 a fan-out GROUP BY over `pgbench_accounts` (scale 10), with
//!   `max_fragment_connections = 4`. Every 200 ms each server's `pg_stat_activity` is read:
//!   the number of `pgfan fragment` connections must never exceed 4 on any server.
//!   pgbench must report 0 failed transactions and pgfan `pgfan_queries_total{route="fanout"}`
//!   > 0.
//!
//! The tests change the shared cluster (CPU quotas, a stopped replica) and load both CPUs,
//! so they take a file-wide lock and run one at a time; guards remove the quotas and start
//! the replica again if a test panics. Only "no hang" limits are timed.
//!
//! Run: `cargo test --test adaptive -- --nocapture` (as root, or as the cluster's owner with
//! writable cgroups, for the CPU quotas).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls};

use common::{
    cluster, connect_pgfan, connect_primary, create_database, drop_database, field, output_within,
    pg_tool, samples, scrape, show, wait_for_replicas, Pgfan,
};

/// The tests of this file run one at a time (see the module comment).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// "No hang" limit of one query.
const QUERY_LIMIT: Duration = Duration::from_secs(60);

type Rows = Vec<Vec<Option<String>>>;

// ---------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------

/// pgfan configuration: `top` keys, the primary and the named replicas (`replica1`, ...)
/// with `pool_size` each, and the `[fanout]` keys.
///
/// Note: `Pgfan::start*` also passes `--primary`, which replaces the file's primary backend
/// by one named `primary` with `pool_size = 8`; `max_fragment_connections` is what limits
/// the primary's fragment connections here.
fn config(top: &str, replicas: &[&str], pool_size: usize, fanout: &str) -> String {
    let c = cluster();
    let mut text = format!(
        "auth = \"trust\"\n{top}\n\n[[backends]]\nname = \"primary\"\nurl = \"{}\"\n\
         role = \"primary\"\npool_size = {pool_size}\n\n",
        c.primary_host_port()
    );
    let urls = c.replica_host_ports();
    for name in replicas {
        let k: usize = name
            .strip_prefix("replica")
            .and_then(|k| k.parse().ok())
            .unwrap_or_else(|| panic!("not a replica name: {name}"));
        let url = urls
            .get(k - 1)
            .unwrap_or_else(|| panic!("the cluster has {} replicas, no {name}", urls.len()));
        text.push_str(&format!(
            "[[backends]]\nname = \"{name}\"\nurl = \"{url}\"\nrole = \"replica\"\n\
             pool_size = {pool_size}\n\n"
        ));
    }
    text.push_str("[fanout]\n");
    text.push_str(fanout);
    text
}

/// A tokio-postgres client for a server URL of the cluster.
async fn connect_url(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Runs `sql` in the simple protocol (text rows) or the extended one (binary values of
/// int4/int8/text columns, printed as PostgreSQL prints them), so both compare to the
/// same text rows.
async fn run(client: &Client, sql: &str, extended: bool) -> Result<Rows, tokio_postgres::Error> {
    if !extended {
        let messages = client.simple_query(sql).await?;
        return Ok(common::text_rows(&messages));
    }
    let rows = client.query(sql, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| {
            r.columns()
                .iter()
                .enumerate()
                .map(|(i, c)| match *c.type_() {
                    Type::INT4 => r.get::<_, Option<i32>>(i).map(|v| v.to_string()),
                    Type::INT8 => r.get::<_, Option<i64>>(i).map(|v| v.to_string()),
                    Type::TEXT => r.get::<_, Option<String>>(i),
                    ref t => panic!(
                        "{sql}: column {} has type {t}, not int4/int8/text",
                        c.name()
                    ),
                })
                .collect()
        })
        .collect())
}

/// The number of fragments EXPLAIN FANOUT announces; fails unless the statement fans out.
async fn fanout_fragments(client: &Client, pgfan: &Pgfan, sql: &str) -> usize {
    let rows = run(client, &format!("EXPLAIN FANOUT {sql}"), false)
        .await
        .unwrap_or_else(|e| panic!("EXPLAIN FANOUT {sql}: {e:?}\n{}", pgfan.log_tail()));
    let lines: Vec<String> = rows
        .into_iter()
        .map(|r| r.into_iter().next().flatten().unwrap_or_default())
        .collect();
    let n = lines
        .first()
        .and_then(|l| l.strip_prefix("FanOut: "))
        .and_then(|rest| rest.split_once(" fragments"))
        .and_then(|(n, _)| n.trim().parse::<usize>().ok());
    match n {
        Some(n) if n > 1 => n,
        _ => panic!(
            "{sql}: expected EXPLAIN FANOUT to say `FanOut: <n> fragments, ...` with n > 1, \
             got:\n{}",
            lines.join("\n")
        ),
    }
}

/// The value of `name` with label `label="value"` (summed over any other labels), or
/// None when the page has no such sample.
fn sample(s: &BTreeMap<String, f64>, name: &str, label: &str, value: &str) -> Option<f64> {
    let prefix = format!("{name}{{");
    let needle = format!("{label}=\"{value}\"");
    let matching: Vec<f64> = s
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix) && k.contains(&needle))
        .map(|(_, v)| *v)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

/// `pgfan_backend_fragments_total{backend}` (0 when absent).
fn fragments_done(s: &BTreeMap<String, f64>, backend: &str) -> f64 {
    sample(s, "pgfan_backend_fragments_total", "backend", backend).unwrap_or(0.0)
}

/// The metric lines about `backends`, for assertion messages.
fn backend_lines(page: &str, backends: &[&str]) -> String {
    page.lines()
        .filter(|l| {
            !l.starts_with('#')
                && (l.starts_with("pgfan_fragment_")
                    || backends
                        .iter()
                        .any(|b| l.contains(&format!("backend=\"{b}\""))))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `scripts/pg-cluster <args>` to completion (blocking).
fn pg_cluster(args: &[&str]) -> Output {
    let script = repo_dir().join("scripts/pg-cluster");
    Command::new(&script)
        .args(args)
        .current_dir(repo_dir())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {} {args:?}: {e}", script.display()))
}

/// `scripts/pg-cluster <args>` from async code; panics unless it succeeds, and unless it
/// manages the cluster the tests use.
async fn pg_cluster_ok(args: &[&str]) -> Output {
    let owned: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = owned.iter().map(String::as_str).collect();
        pg_cluster(&args)
    })
    .await
    .expect("pg-cluster task");
    assert!(
        out.status.success(),
        "scripts/pg-cluster {args:?} failed:\n{}",
        show(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = &cluster().dir;
    if let Some(line) = stdout.lines().find(|l| l.starts_with("PGFAN_CLUSTER_DIR=")) {
        let printed = line["PGFAN_CLUSTER_DIR=".len()..].trim();
        assert!(
            dir.as_os_str().is_empty() || Path::new(printed) == dir.as_path(),
            "scripts/pg-cluster manages {printed}, but the tests use the cluster in {}",
            dir.display()
        );
    }
    out
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `pg_ctl <args>` as the servers' OS user (`postgres` when the tests run as root, as
/// scripts/pg-cluster does).
async fn pg_ctl(args: &[&str]) -> Output {
    let pg_ctl = cluster().pg_bin.join("pg_ctl");
    let mut cmd = if running_as_root() {
        let mut c = tokio::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&pg_ctl);
        c
    } else {
        tokio::process::Command::new(&pg_ctl)
    };
    cmd.args(args).current_dir("/").stdin(Stdio::null());
    output_within(cmd, Duration::from_secs(120), &format!("pg_ctl {args:?}")).await
}

/// The data folder of cluster server `name`, checked against the port the tests use.
fn data_dir(name: &str, url: &str) -> PathBuf {
    let dir = &cluster().dir;
    assert!(
        !dir.as_os_str().is_empty(),
        "PGFAN_CLUSTER_DIR is not known; cannot find the data folder of {name}"
    );
    let port_file = dir.join(format!("{name}.port"));
    let port = std::fs::read_to_string(&port_file)
        .unwrap_or_else(|e| panic!("read {}: {e}", port_file.display()));
    let want = url::Url::parse(url)
        .ok()
        .and_then(|u| u.port())
        .unwrap_or_else(|| panic!("no port in {url}"));
    assert_eq!(
        port.trim(),
        want.to_string(),
        "{} says {name} is on port {}, the tests use {url}",
        port_file.display(),
        port.trim()
    );
    dir.join(name)
}

/// Removes the cluster's CPU quotas when dropped (also on a panic).
struct QuotaGuard {
    active: bool,
}

impl QuotaGuard {
    /// `scripts/pg-cluster start <quota args>`.
    async fn apply(args: &[&str]) -> QuotaGuard {
        let guard = QuotaGuard { active: true };
        let mut all = vec!["start"];
        all.extend_from_slice(args);
        let out = pg_cluster_ok(&all).await;
        eprintln!(
            "pg-cluster start {args:?}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        guard
    }

    async fn remove(mut self) {
        self.active = false;
        pg_cluster_ok(&["start", "--cpu-quota", "none"]).await;
    }
}

impl Drop for QuotaGuard {
    fn drop(&mut self) {
        if self.active {
            let out = pg_cluster(&["start", "--cpu-quota", "none"]);
            if !out.status.success() {
                eprintln!("could not remove the CPU quotas:\n{}", show(&out));
            }
        }
    }
}

/// Starts the cluster's stopped servers again when dropped (also on a panic).
struct RestartGuard {
    stopped: bool,
}

impl Drop for RestartGuard {
    fn drop(&mut self) {
        if self.stopped {
            let out = pg_cluster(&["start"]);
            if !out.status.success() {
                eprintln!("could not start the cluster again:\n{}", show(&out));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// uneven_servers
// ---------------------------------------------------------------------------------------

/// About a second of CPU serially over 300,000 rows; the sum depends on every row once.
const UNEVEN_SQL: &str = "SELECT count(*), sum(strpos(md5(repeat(id::text, 200)), 'a')) FROM work";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uneven_servers() {
    let _serial = SERIAL.lock().await;
    let db = "pgfan_adaptive_uneven";
    create_database(db).await;
    let direct = connect_primary(db).await;
    direct
        .batch_execute(
            "CREATE TABLE work AS SELECT i AS id, i % 100 AS g \
             FROM generate_series(1, 300000) AS i; ANALYZE work",
        )
        .await
        .expect("create table work");
    let expected = run(&direct, UNEVEN_SQL, false)
        .await
        .expect("the query directly on the primary");
    wait_for_replicas(Duration::from_secs(60)).await;

    // 2 fragment connections on each server (the primary's pool_size is 8, see `config`)
    let toml = config(
        "",
        &["replica1"],
        2,
        "max_fragment_connections = 2\nmax_fragments = 16\nmin_fragment_pages = 8\n",
    );
    let pgfan = Pgfan::start_with_config(&toml, &[]);
    let client = connect_pgfan(&pgfan, db).await;
    let fragments = fanout_fragments(&client, &pgfan, UNEVEN_SQL).await;
    assert!(
        fragments > 4,
        "EXPLAIN FANOUT plans {fragments} fragments for 4 fragment connections (2 backends x \
         2): adaptive dispatch should over-partition (fragments_per_connection = 4)"
    );

    let quotas = QuotaGuard::apply(&[
        "--cpu-quota-of",
        "primary=1.0",
        "--cpu-quota-of",
        "replica1=0.2",
    ])
    .await;

    let runs = 5;
    let (mut on_primary, mut on_replica) = (0.0, 0.0);
    let mut last_page = String::new();
    for i in 0..runs {
        let extended = i % 2 == 1;
        let before = samples(&scrape(&pgfan).await);
        let got = tokio::time::timeout(QUERY_LIMIT, run(&client, UNEVEN_SQL, extended))
            .await
            .unwrap_or_else(|_| panic!("run {i}: no answer within {QUERY_LIMIT:?}"))
            .unwrap_or_else(|e| panic!("run {i}: {e:?}\n{}", pgfan.log_tail()));
        assert_eq!(
            got, expected,
            "run {i} (extended: {extended}): wrong answer"
        );
        last_page = scrape(&pgfan).await;
        let after = samples(&last_page);
        let p = fragments_done(&after, "primary") - fragments_done(&before, "primary");
        let r = fragments_done(&after, "replica1") - fragments_done(&before, "replica1");
        eprintln!("run {i}: primary ran {p} fragments, replica1 {r}");
        on_primary += p;
        on_replica += r;
    }
    quotas.remove().await;

    assert!(
        on_primary > on_replica,
        "over {runs} runs of {fragments} planned fragments the primary (1 CPU) ran {on_primary} \
         fragments and replica1 (0.2 CPU) {on_replica}: the faster server should run strictly \
         more\n{}",
        backend_lines(&last_page, &["primary", "replica1"])
    );

    drop(client);
    drop(pgfan);
    drop_database(db).await;
}

// ---------------------------------------------------------------------------------------
// replica_dies
// ---------------------------------------------------------------------------------------

/// Around a second of CPU serially over 400,000 rows; a group answer per g.
const DIES_SQL: &str = "SELECT g, count(*), sum(v) FROM t \
                        WHERE md5(repeat(id::text, 20)) <> 'x' GROUP BY g ORDER BY g";

/// What became of one query of the load.
#[derive(Debug)]
enum Outcome {
    Right,
    /// An ErrorResponse: SQLSTATE and message.
    CleanError(String, String),
    Wrong(Rows),
    /// Any other error (connection lost, protocol error).
    Broken(String),
    Hung,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Right => write!(f, "right answer"),
            Outcome::CleanError(code, message) => write!(f, "ERROR {code}: {message}"),
            Outcome::Wrong(rows) => write!(f, "WRONG ANSWER {rows:?}"),
            Outcome::Broken(e) => write!(f, "not an ErrorResponse: {e}"),
            Outcome::Hung => write!(f, "no answer within {QUERY_LIMIT:?}"),
        }
    }
}

/// One query of a load task.
#[derive(Debug)]
struct Record {
    task: usize,
    extended: bool,
    /// Whether it started after replica2 was stopped.
    after_stop: bool,
    outcome: Outcome,
}

async fn classify(client: &Client, extended: bool, expected: &Rows) -> Outcome {
    match tokio::time::timeout(QUERY_LIMIT, run(client, DIES_SQL, extended)).await {
        Err(_) => Outcome::Hung,
        Ok(Ok(rows)) if rows == *expected => Outcome::Right,
        Ok(Ok(rows)) => Outcome::Wrong(rows),
        Ok(Err(e)) => match e.as_db_error() {
            Some(d) => Outcome::CleanError(d.code().code().to_string(), d.message().to_string()),
            None => Outcome::Broken(format!("{e:?}")),
        },
    }
}

/// Fragment backends of `db` running on the server a monitor is connected to.
async fn active_fragments(monitor: &Client, db: &str) -> i64 {
    monitor
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = 'pgfan fragment' AND state = 'active'",
            &[&db],
        )
        .await
        .expect("read pg_stat_activity")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_dies() {
    let _serial = SERIAL.lock().await;
    let db = "pgfan_adaptive_replica_dies";
    let replica2_url = cluster()
        .replica_urls
        .get(1)
        .cloned()
        .expect("the cluster needs 2 replicas (scripts/pg-cluster start --replicas 2)");
    let replica2_dir = data_dir("replica2", &replica2_url);

    create_database(db).await;
    let direct = connect_primary(db).await;
    direct
        .batch_execute(
            "CREATE TABLE t AS SELECT i AS id, i % 20 AS g, i * 7 % 1000 AS v \
             FROM generate_series(1, 400000) AS i; ANALYZE t",
        )
        .await
        .expect("create table t");
    let expected = run(&direct, DIES_SQL, false)
        .await
        .expect("the query directly on the primary");
    assert_eq!(expected.len(), 20, "20 groups directly");
    wait_for_replicas(Duration::from_secs(60)).await;

    let toml = config(
        "",
        &["replica1", "replica2"],
        4,
        "max_fragment_connections = 4\nmax_fragments = 12\nmin_fragment_pages = 8\n\
         health_check_interval_ms = 500\n",
    );
    let pgfan = Pgfan::start_with_config(&toml, &[]);
    {
        let c = connect_pgfan(&pgfan, db).await;
        fanout_fragments(&c, &pgfan, DIES_SQL).await;
    }

    // the load: 4 clients, simple and extended protocol in turn
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for task in 0..4 {
        let client = connect_pgfan(&pgfan, db).await;
        let (stop, stopped, expected) = (stop.clone(), stopped.clone(), expected.clone());
        tasks.push(tokio::spawn(async move {
            let mut records = Vec::new();
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let extended = (i + task) % 2 == 1;
                let after_stop = stopped.load(Ordering::SeqCst);
                let outcome = classify(&client, extended, &expected).await;
                let fatal = matches!(outcome, Outcome::Hung | Outcome::Broken(_));
                records.push(Record {
                    task,
                    extended,
                    after_stop,
                    outcome,
                });
                if fatal {
                    break;
                }
                i += 1;
            }
            records
        }));
    }

    // stop replica2 while it runs a fragment of the load
    let monitor = connect_url(&replica2_url).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while active_fragments(&monitor, db).await == 0 {
        if Instant::now() > deadline {
            stop.store(true, Ordering::SeqCst);
            panic!(
                "replica2 ran no fragment of the load within 30 s\n{}\n{}",
                backend_lines(&scrape(&pgfan).await, &["primary", "replica1", "replica2"]),
                pgfan.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(monitor);
    let mut restart = RestartGuard { stopped: true };
    let dir = replica2_dir.display().to_string();
    let out = pg_ctl(&["-D", &dir, "-m", "immediate", "-w", "stop"]).await;
    assert!(
        out.status.success(),
        "pg_ctl stop replica2:\n{}",
        show(&out)
    );
    stopped.store(true, Ordering::SeqCst);
    eprintln!("replica2 stopped (-m immediate) mid-fragment");

    // more load with replica2 down
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::SeqCst);
    let mut records = Vec::new();
    for t in tasks {
        let r = tokio::time::timeout(QUERY_LIMIT + Duration::from_secs(10), t)
            .await
            .expect("a load task did not finish")
            .expect("a load task panicked");
        records.extend(r);
    }
    let count = |f: &dyn Fn(&Record) -> bool| records.iter().filter(|r| f(r)).count();
    let right = count(&|r| matches!(r.outcome, Outcome::Right));
    let clean = count(&|r| matches!(r.outcome, Outcome::CleanError(..)));
    let right_after = count(&|r| r.after_stop && matches!(r.outcome, Outcome::Right));
    eprintln!(
        "{} queries: {right} right ({right_after} started after the stop), {clean} clean errors",
        records.len()
    );
    for r in &records {
        if let Outcome::CleanError(code, message) = &r.outcome {
            eprintln!(
                "  task {} (extended: {}, after stop: {}): ERROR {code} {message}",
                r.task, r.extended, r.after_stop
            );
        }
    }
    let bad: Vec<String> = records
        .iter()
        .filter(|r| !matches!(r.outcome, Outcome::Right | Outcome::CleanError(..)))
        .map(|r| {
            format!(
                "task {} (extended: {}, after stop: {}): {}",
                r.task, r.extended, r.after_stop, r.outcome
            )
        })
        .collect();
    assert!(
        bad.is_empty(),
        "queries that hung, broke the connection or gave a wrong answer around the stop of \
         replica2 (expected {expected:?}):\n{}\n{}",
        bad.join("\n"),
        pgfan.log_tail()
    );
    assert!(
        right_after > 0,
        "no query started after replica2 stopped was answered ({} queries, {right} right, \
         {clean} clean errors)\n{}",
        records.len(),
        pgfan.log_tail()
    );

    // pgfan keeps serving once the load is over, replica2 still down
    let client = connect_pgfan(&pgfan, db).await;
    for i in 0..3 {
        let got = tokio::time::timeout(QUERY_LIMIT, run(&client, DIES_SQL, i == 1))
            .await
            .unwrap_or_else(|_| panic!("query {i} with replica2 down hung"))
            .unwrap_or_else(|e| {
                panic!(
                    "query {i} with replica2 down failed: {e:?}\n{}",
                    pgfan.log_tail()
                )
            });
        assert_eq!(got, expected, "query {i} with replica2 down");
    }

    // replica2 comes back and takes fragments again
    pg_cluster_ok(&["start"]).await;
    restart.stopped = false;
    wait_for_replicas(Duration::from_secs(60)).await;
    let base = fragments_done(&samples(&scrape(&pgfan).await), "replica2");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut queries = 0;
    loop {
        match classify(&client, queries % 2 == 1, &expected).await {
            Outcome::Right | Outcome::CleanError(..) => {}
            other => panic!(
                "query {queries} after replica2 came back: {other}\n{}",
                pgfan.log_tail()
            ),
        }
        queries += 1;
        let page = scrape(&pgfan).await;
        let s = samples(&page);
        let done = fragments_done(&s, "replica2");
        let healthy = sample(&s, "pgfan_backend_healthy", "backend", "replica2");
        if done > base && healthy == Some(1.0) {
            eprintln!(
                "replica2 ran {} fragments in {queries} queries after its restart",
                done - base
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica2 took no fragment in {queries} queries over 30 s after its restart \
             (fragments_total {base} -> {done}, healthy {healthy:?}):\n{}",
            backend_lines(&page, &["primary", "replica1", "replica2"])
        );
    }

    drop(client);
    drop(pgfan);
    drop_database(db).await;
}

// ---------------------------------------------------------------------------------------
// load_budget
// ---------------------------------------------------------------------------------------

/// The fan-out part of the pgbench load.
const AGG_SQL: &str = "SELECT bid, count(*), sum(abalance) FROM pgbench_accounts GROUP BY bid";
/// Fragment connections per backend.
const BUDGET: i64 = 4;

/// Polls every server's `pg_stat_activity` every 200 ms until `stop`; returns the most
/// `pgfan fragment` connections of `db` seen at once on each server and the poll count.
async fn poll_fragment_connections(
    servers: Vec<(String, Client)>,
    db: String,
    stop: Arc<AtomicBool>,
) -> (Vec<(String, i64)>, usize) {
    let mut max: Vec<(String, i64)> = servers.iter().map(|(n, _)| (n.clone(), 0)).collect();
    let mut polls = 0;
    while !stop.load(Ordering::SeqCst) {
        for (i, (name, client)) in servers.iter().enumerate() {
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = $1 AND application_name = 'pgfan fragment'",
                    &[&db],
                )
                .await
                .unwrap_or_else(|e| panic!("read pg_stat_activity of {name}: {e}"))
                .get(0);
            max[i].1 = max[i].1.max(n);
        }
        polls += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (max, polls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_budget() {
    let _serial = SERIAL.lock().await;
    let db = "pgfan_adaptive_load_budget";
    let c = cluster();
    create_database(db).await;
    let mut init = pg_tool("pgbench");
    init.args(["-h", &c.primary_host(), "-p", &c.primary_port.to_string()])
        .args(["-U", "postgres", "-i", "-s", "10", "-q", db]);
    let out = output_within(init, Duration::from_secs(300), "pgbench -i -s 10").await;
    assert!(out.status.success(), "pgbench -i -s 10:\n{}", show(&out));
    let direct = connect_primary(db).await;
    direct.batch_execute("ANALYZE").await.expect("ANALYZE");
    let expected = run(&direct, &format!("{AGG_SQL} ORDER BY bid"), false)
        .await
        .expect("the aggregate directly");
    assert_eq!(expected.len(), 10, "10 branches at scale 10");
    wait_for_replicas(Duration::from_secs(120)).await;

    let replicas: Vec<String> = (1..=c.replica_urls.len())
        .map(|k| format!("replica{k}"))
        .collect();
    let replica_names: Vec<&str> = replicas.iter().map(String::as_str).collect();
    let toml = config(
        "max_client_connections = 200",
        &replica_names,
        4,
        &format!("max_fragment_connections = {BUDGET}\nmin_fragment_pages = 64\n"),
    );
    let pgfan = Pgfan::start_with_config(&toml, &[]);
    let client = connect_pgfan(&pgfan, db).await;
    fanout_fragments(&client, &pgfan, AGG_SQL).await;
    let got = run(&client, &format!("{AGG_SQL} ORDER BY bid"), false)
        .await
        .unwrap_or_else(|e| panic!("the aggregate through pgfan: {e:?}\n{}", pgfan.log_tail()));
    assert_eq!(got, expected, "the aggregate through pgfan");
    drop(client);

    let scripts = std::env::temp_dir().join(format!("pgfan-adaptive-{}", std::process::id()));
    std::fs::create_dir_all(&scripts).expect("create the pgbench script folder");
    let oltp = scripts.join("oltp.sql");
    let agg = scripts.join("agg.sql");
    std::fs::write(
        &oltp,
        "\\set aid random(1, 1000000)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n",
    )
    .expect("write oltp.sql");
    std::fs::write(&agg, format!("{AGG_SQL};\n")).expect("write agg.sql");

    let mut servers = vec![("primary".to_string(), connect_primary("postgres").await)];
    for (name, url) in replicas.iter().zip(&c.replica_urls) {
        servers.push((name.clone(), connect_url(url).await));
    }
    let fanouts_before = sample(
        &samples(&scrape(&pgfan).await),
        "pgfan_queries_total",
        "route",
        "fanout",
    )
    .unwrap_or(0.0);
    let stop = Arc::new(AtomicBool::new(false));
    let poller = tokio::spawn(poll_fragment_connections(
        servers,
        db.to_string(),
        stop.clone(),
    ));

    let mut bench = pg_tool("pgbench");
    bench
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pgfan.port.to_string(),
            "-U",
            "postgres",
        ])
        .args(["-n", "-c", "64", "-j", "4", "-T", "60"])
        .arg("-f")
        .arg(format!("{}@20", oltp.display()))
        .arg("-f")
        .arg(format!("{}@1", agg.display()))
        .arg(db);
    let run_out = output_within(bench, Duration::from_secs(180), "pgbench -c 64 -T 60").await;
    stop.store(true, Ordering::SeqCst);
    let (max, polls) = poller.await.expect("the pg_stat_activity poller panicked");
    let _ = std::fs::remove_dir_all(&scripts);

    let stdout = String::from_utf8_lossy(&run_out.stdout);
    let report = format!("{}\npgfan log:\n{}", show(&run_out), pgfan.log_tail());
    eprintln!("most fragment connections at once, over {polls} polls: {max:?}");
    assert!(run_out.status.success(), "pgbench failed:\n{report}");
    let failed = field(&stdout, "number of failed transactions:")
        .unwrap_or_else(|| panic!("no 'number of failed transactions' line:\n{report}"));
    assert_eq!(failed, 0, "failed transactions:\n{report}");
    let processed = field(&stdout, "number of transactions actually processed:")
        .unwrap_or_else(|| panic!("no 'transactions actually processed' line:\n{report}"));
    assert!(processed > 0, "no transactions processed:\n{report}");
    eprintln!("pgbench: {processed} transactions, {failed} failed");
    assert!(polls > 0, "pg_stat_activity was never polled");
    for (name, m) in &max {
        assert!(
            *m <= BUDGET,
            "{name} had {m} `pgfan fragment` connections at once; the budget is {BUDGET} per \
             backend (all polls: {max:?})"
        );
    }
    let page = scrape(&pgfan).await;
    let fanouts = sample(&samples(&page), "pgfan_queries_total", "route", "fanout").unwrap_or(0.0);
    assert!(
        fanouts > fanouts_before,
        "pgfan_queries_total{{route=\"fanout\"}} went from {fanouts_before} to {fanouts} \
         during the load: no aggregate fanned out\n{}",
        page.lines()
            .filter(|l| l.starts_with("pgfan_queries_total") || l.starts_with("pgfan_passthrough"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!(
        "{} aggregates fanned out during the load",
        fanouts - fanouts_before
    );
    assert!(
        max.iter().any(|(_, m)| *m > 0),
        "no `pgfan fragment` connection was ever seen during the load: {max:?}"
    );

    drop(direct);
    drop(pgfan);
    drop_database(db).await;
}

/// `fragment_timeout_secs`: fragments that run longer fail the statement with 57014 (not a
/// fall-back to pass-through, which would run the whole statement again), in the simple
/// and the extended protocol; the fragments' backends are gone, and the session answers
/// the next statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fragment_timeout() {
    let _serial = SERIAL.lock().await;
    let db = "pgfan_adaptive_timeout";
    create_database(db).await;
    let direct = connect_primary(db).await;
    direct
        .batch_execute(
            "CREATE TABLE slow AS SELECT i AS id, i % 10 AS g FROM generate_series(1, 200000) AS i; \
             ANALYZE slow",
        )
        .await
        .expect("create table slow");
    let toml = config(
        "",
        &[],
        4,
        "max_fragment_connections = 4\nmin_fragment_pages = 8\nfragment_timeout_secs = 1\n",
    );
    let pgfan = Pgfan::start_with_config(&toml, &[]);
    let client = connect_pgfan(&pgfan, db).await;
    // seconds of CPU per fragment (an md5 of a long string per row)
    let sql = "SELECT g, count(*) FROM slow WHERE md5(repeat(id::text, 20000)) <> 'x' GROUP BY g";
    fanout_fragments(&client, &pgfan, sql).await;
    for extended in [false, true] {
        let started = Instant::now();
        let result = tokio::time::timeout(QUERY_LIMIT, run(&client, sql, extended))
            .await
            .unwrap_or_else(|_| panic!("{sql}: no answer within {QUERY_LIMIT:?}"));
        let err = match result {
            Ok(rows) => panic!(
                "{sql} (extended: {extended}): answered {} rows after {:?} despite \
                 fragment_timeout_secs = 1\n{}",
                rows.len(),
                started.elapsed(),
                pgfan.log_tail()
            ),
            Err(e) => e,
        };
        let code = err.as_db_error().map(|e| e.code().code().to_string());
        assert_eq!(
            code.as_deref(),
            Some("57014"),
            "{sql} (extended: {extended}): expected 57014, got {err:?}"
        );
        let message = err.as_db_error().map(|e| e.message().to_string());
        assert!(
            message
                .as_deref()
                .is_some_and(|m| m.contains("fragment_timeout")),
            "the error should name fragment_timeout: {message:?}"
        );
        let after = run(&client, "SELECT count(*) FROM slow", extended)
            .await
            .unwrap_or_else(|e| panic!("the session after a fragment timeout: {e}"));
        assert_eq!(after, vec![vec![Some("200000".to_string())]]);
    }
    let monitor = connect_primary("postgres").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = active_fragments(&monitor, db).await;
        if n == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{n} fragment backends still active after the timeouts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(client);
    drop(pgfan);
    drop_database(db).await;
}
