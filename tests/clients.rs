//! Real clients through pgfan (issue 2, "Tests"): tokio-postgres pipelining, cancel,
//! client disconnect mid-query, BackendKeyData, LISTEN/NOTIFY while idle, startup
//! parameters, session clean-up, max_client_connections and `/metrics`.
//!
//! Every test starts its own pgfan and uses its own application_name / object names, so the
//! tests can run in parallel (`--test-threads=4`) on the shared cluster.
//!
//! Run: `cargo test --test clients`.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::wire::{Batch, ConnectError, ConnectOptions, Msg, WireClient};
use common::{cluster, connect_primary, create_database, drop_database, samples, scrape, Pgfan};
use futures::StreamExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, NoTls, SimpleQueryMessage};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// tokio-postgres config of database `postgres` through pgfan (or directly, with the
/// primary's port).
fn config(port: u16, application_name: &str) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .application_name(application_name)
        .connect_timeout(Duration::from_secs(10));
    c
}

async fn connect(c: &tokio_postgres::Config) -> tokio_postgres::Client {
    let (client, conn) = c
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {c:?}: {e:?}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// The text values of the first row of a simple query.
fn first_row(msgs: &[SimpleQueryMessage]) -> Vec<Option<String>> {
    common::text_rows(msgs).into_iter().next().expect("no row")
}

async fn one_text(client: &tokio_postgres::Client, sql: &str) -> Option<String> {
    let msgs = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    first_row(&msgs).remove(0)
}

/// The first column of the single DataRow of a WireClient simple query, as text.
async fn wire_one(c: &mut WireClient, sql: &str) -> Option<String> {
    let t = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    assert!(t.error_code().is_none(), "{sql}: {t:?}");
    let rows = t.data_rows();
    assert_eq!(rows.len(), 1, "{sql}: {t:?}");
    rows[0][0]
        .as_ref()
        .map(|r| String::from_utf8(r.0.to_vec()).expect("utf8 value"))
}

/// Rows of pg_stat_activity (on the primary, directly) with this application_name in
/// state 'active'.
async fn active_count(direct: &tokio_postgres::Client, app: &str) -> i64 {
    direct
        .query_one(
            "select count(*) from pg_stat_activity where application_name = $1 and state = 'active'",
            &[&app],
        )
        .await
        .expect("query pg_stat_activity")
        .get(0)
}

/// pid, state, wait_event and query of the backends with this application_name.
async fn activity(direct: &tokio_postgres::Client, app: &str) -> Vec<String> {
    direct
        .query(
            "select format('pid=%s state=%s wait=%s query=%L', pid, state, wait_event, query) \
             from pg_stat_activity where application_name = $1",
            &[&app],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Waits (up to 10 s) until a backend with this application_name runs `query_like` and
/// sleeps in `pg_sleep` (so the statement is executing, not being parsed).
async fn wait_running(direct: &tokio_postgres::Client, app: &str, query_like: &str) -> i32 {
    wait_running_while::<()>(direct, app, query_like, None)
        .await
        .expect("no task to finish")
}

/// Like [`wait_running`], but returns `None` as soon as `task` (the client side of the
/// query) has finished, so the caller can report how it ended.
async fn wait_running_while<T>(
    direct: &tokio_postgres::Client,
    app: &str,
    query_like: &str,
    task: Option<&tokio::task::JoinHandle<T>>,
) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if task.is_some_and(|t| t.is_finished()) {
            return None;
        }
        let row = direct
            .query_opt(
                "select pid from pg_stat_activity where application_name = $1 \
                 and state = 'active' and query like $2 and wait_event = 'PgSleep' limit 1",
                &[&app, &query_like],
            )
            .await
            .expect("query pg_stat_activity");
        if let Some(row) = row {
            return Some(row.get(0));
        }
        if Instant::now() > deadline {
            panic!(
                "no active backend with application_name {app:?} running {query_like:?} \
                 within 10 s; its backends: {:?}",
                activity(direct, app).await
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls every 50 ms until no backend with this application_name is active; fails after
/// `limit`. Returns how long it took.
async fn wait_not_active(
    direct: &tokio_postgres::Client,
    app: &str,
    limit: Duration,
    pgfan: &Pgfan,
) -> Duration {
    let start = Instant::now();
    loop {
        if active_count(direct, app).await == 0 {
            return start.elapsed();
        }
        if start.elapsed() > limit {
            panic!(
                "backend of {app:?} still active {limit:?} after the client left: {:?}\n\
                 pgfan log:\n{}",
                activity(direct, app).await,
                pgfan.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (up to `limit`) until backend `pid` no longer exists on the primary.
async fn wait_pid_gone(direct: &tokio_postgres::Client, pid: i32, limit: Duration, pgfan: &Pgfan) {
    let start = Instant::now();
    loop {
        let n: i64 = direct
            .query_one(
                "select count(*) from pg_stat_activity where pid = $1",
                &[&pid],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if n == 0 {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "backend pid {pid} still exists {limit:?} after its client left (not closed)\n\
             pgfan log:\n{}",
            pgfan.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelining_several_queries_in_flight() {
    let pgfan = Pgfan::start(&[]);
    let client = connect(&config(pgfan.port, "pgfan_clients_pipeline")).await;

    let double = client
        .prepare("select $1::int8 * 2, $2::text || '!'")
        .await
        .expect("prepare double");
    let slow = client
        .prepare("select pg_sleep(0.2), $1::int4 + 1")
        .await
        .expect("prepare slow");
    let div = client
        .prepare("select 10 / $1::int4")
        .await
        .expect("prepare div");

    // One slow query first, then many more: tokio-postgres writes them all before the
    // first answer arrives, so they are in flight on the one connection at once.
    let slow_fut = client.query(&slow, &[&41i32]);
    let doubles = (0..60i64).map(|i| {
        let s = format!("v{i}");
        let client = &client;
        let double = &double;
        async move { (i, s.clone(), client.query(double, &[&i, &s]).await) }
    });
    let doubles = futures::future::join_all(doubles);
    let simple = client.simple_query("select 'a' as x; select 'b' as y, 2 as z");
    let failing = client.query(&div, &[&0i32]);
    let after_fail = client.query(&div, &[&5i32]);
    let started = Instant::now();
    let (slow_res, doubles, simple, failing, after_fail) =
        futures::join!(slow_fut, doubles, simple, failing, after_fail);
    let elapsed = started.elapsed();

    let slow_rows = slow_res.expect("slow query");
    assert_eq!(slow_rows[0].get::<_, i32>(1), 42);
    for (i, s, res) in doubles {
        let rows = res.unwrap_or_else(|e| panic!("query {i}: {e:?}"));
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].get::<_, i64>(0), i * 2, "row of query {i}");
        assert_eq!(
            rows[0].get::<_, &str>(1),
            format!("{s}!"),
            "row of query {i}"
        );
    }
    let simple = simple.expect("pipelined simple_query");
    let texts = common::text_rows(&simple);
    assert_eq!(
        texts,
        vec![
            vec![Some("a".to_string())],
            vec![Some("b".to_string()), Some("2".to_string())]
        ]
    );
    let tags: Vec<u64> = simple
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .collect();
    assert_eq!(tags, vec![1, 1]);
    let err = failing.expect_err("10 / 0 must fail");
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO), "{err:?}");
    // The error of one pipelined query does not leak into the next one (its own Sync).
    assert_eq!(
        after_fail.expect("query after the failed one")[0].get::<_, i32>(0),
        2
    );
    assert!(
        elapsed < Duration::from_secs(20),
        "pipelined batch took {elapsed:?}"
    );

    // A pipelined transaction: the inserts and the read all see the same transaction.
    client
        .batch_execute("create temp table pipe_t (i int)")
        .await
        .expect("temp table");
    let ins = client
        .prepare("insert into pipe_t values ($1)")
        .await
        .expect("prepare insert");
    client.batch_execute("begin").await.expect("begin");
    let inserts = futures::future::join_all((0..20i32).map(|i| {
        let client = &client;
        let ins = &ins;
        async move { client.execute(ins, &[&i]).await }
    }));
    let count = client.query_one("select count(*), sum(i) from pipe_t", &[]);
    let (inserts, count) = futures::join!(inserts, count);
    for r in inserts {
        assert_eq!(r.expect("pipelined insert"), 1);
    }
    let count = count.expect("count in transaction");
    assert_eq!(count.get::<_, i64>(0), 20);
    assert_eq!(count.get::<_, i64>(1), 190);
    client.batch_execute("rollback").await.expect("rollback");
    assert_eq!(
        one_text(&client, "select count(*) from pipe_t")
            .await
            .as_deref(),
        Some("0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_returns_57014_within_1s() {
    let pgfan = Pgfan::start(&[]);
    let app = "pgfan_clients_cancel";
    let direct = connect_primary("postgres").await;
    let client = std::sync::Arc::new(connect(&config(pgfan.port, app)).await);

    for protocol in ["extended", "simple"] {
        let token = client.cancel_token();
        let c = client.clone();
        let task = tokio::spawn(async move {
            match protocol {
                "extended" => c.query("select pg_sleep(30)", &[]).await.map(|_| ()),
                _ => c.simple_query("select pg_sleep(30)").await.map(|_| ()),
            }
        });
        if wait_running_while(&direct, app, "select pg_sleep(30)%", Some(&task))
            .await
            .is_none()
        {
            panic!(
                "{protocol}: pg_sleep(30) ended before it was cancelled: {:?}\npgfan log:\n{}",
                task.await,
                pgfan.log_tail()
            );
        }
        token
            .cancel_query(NoTls)
            .await
            .unwrap_or_else(|e| panic!("{protocol}: send cancel request: {e:?}"));
        let result = tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{protocol}: pg_sleep(30) still running 1 s after the cancel request\n\
                     pgfan log:\n{}",
                    pgfan.log_tail()
                )
            })
            .expect("query task");
        let err = result.expect_err("cancelled query must fail");
        assert_eq!(
            err.code(),
            Some(&SqlState::QUERY_CANCELED),
            "{protocol}: {err:?}"
        );
        let db = err.as_db_error().expect("a server error");
        assert_eq!(db.message(), "canceling statement due to user request");
        // PostgreSQL's postmaster signals a cancelled backend twice (kill(pid) and
        // kill(-pid), see signal_child()); under load the second SIGINT can land after
        // the first was handled and cancel the *next* statement. Let it arrive while the
        // session is idle, where it is ignored, before running more statements.
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The connection still works.
        assert_eq!(
            one_text(&client, "select 1 + 1").await.as_deref(),
            Some("2")
        );
        let r = client
            .query_one("select $1::text", &[&"still here"])
            .await
            .expect("extended query after cancel");
        assert_eq!(r.get::<_, &str>(0), "still here");
        assert_eq!(active_count(&direct, app).await, 0);
    }

    // A cancel request with a wrong key cancels nothing.
    let c = client.clone();
    let task = tokio::spawn(async move { c.query_one("select pg_sleep(1.5), 7", &[]).await });
    let Some(backend_pid) =
        wait_running_while(&direct, app, "select pg_sleep(1.5)%", Some(&task)).await
    else {
        panic!(
            "pg_sleep(1.5) ended before the wrong-key cancel was sent: {:?}\npgfan log:\n{}",
            task.await,
            pgfan.log_tail()
        );
    };
    {
        let mut s = tokio::net::TcpStream::connect(pgfan.addr())
            .await
            .expect("connect for cancel");
        let mut req = Vec::new();
        req.extend_from_slice(&16i32.to_be_bytes());
        req.extend_from_slice(&80877102i32.to_be_bytes());
        req.extend_from_slice(&backend_pid.to_be_bytes());
        req.extend_from_slice(&0x1234_5678i32.to_be_bytes());
        tokio::io::AsyncWriteExt::write_all(&mut s, &req)
            .await
            .expect("send cancel request");
    }
    let row = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("query finishes")
        .expect("task")
        .expect("a cancel request with a wrong secret must not cancel the query");
    assert_eq!(row.get::<_, i32>(1), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disconnect_mid_query_stops_backend_query_wire() {
    let pgfan = Pgfan::start(&[]);
    let app = "pgfan_clients_disconnect_wire";
    let direct = connect_primary("postgres").await;
    let mut c = WireClient::connect_with(
        &pgfan.addr(),
        &ConnectOptions::new("postgres", "postgres").param("application_name", app),
    )
    .await
    .expect("connect through pgfan");
    let mut b = Batch::new();
    b.query("select pg_sleep(30)");
    c.send(&b).await.expect("send query");
    wait_running(&direct, app, "select pg_sleep(30)%").await;
    drop(c); // socket closed without Terminate
    let took = wait_not_active(&direct, app, Duration::from_secs(1), &pgfan).await;
    eprintln!("backend query gone {took:?} after the client socket was dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disconnect_mid_query_stops_backend_query_tokio_postgres() {
    let pgfan = Pgfan::start(&[]);
    let app = "pgfan_clients_disconnect_tp";
    let direct = connect_primary("postgres").await;
    let (client, conn) = config(pgfan.port, app)
        .connect(NoTls)
        .await
        .expect("connect through pgfan");
    let conn_task = tokio::spawn(conn);
    let query = tokio::spawn(async move { client.simple_query("select pg_sleep(30)").await });
    wait_running(&direct, app, "select pg_sleep(30)%").await;
    conn_task.abort(); // drops the connection: the socket closes
    let _ = conn_task.await;
    let took = wait_not_active(&direct, app, Duration::from_secs(1), &pgfan).await;
    eprintln!("backend query gone {took:?} after the connection task was aborted");
    assert!(query.await.expect("query task").is_err());

    // The proxy still serves new clients.
    let client = connect(&config(pgfan.port, app)).await;
    assert_eq!(one_text(&client, "select 3").await.as_deref(), Some("3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backend_pid_matches_backend_key_data() {
    let pgfan = Pgfan::start(&[]);
    let app = "pgfan_clients_pid";
    let direct = connect_primary("postgres").await;
    let mut pids = Vec::new();
    for _ in 0..3 {
        let mut c = WireClient::connect_with(
            &pgfan.addr(),
            &ConnectOptions::new("postgres", "postgres").param("application_name", app),
        )
        .await
        .expect("connect through pgfan");
        assert_ne!(c.process_id, 0, "no BackendKeyData from pgfan");
        let pid: i32 = wire_one(&mut c, "select pg_backend_pid()")
            .await
            .expect("pid")
            .parse()
            .expect("integer pid");
        assert_eq!(
            pid, c.process_id,
            "pg_backend_pid() through pgfan vs BackendKeyData pid"
        );
        // And it is a real backend of the primary serving this very client.
        let app_of_pid: Option<String> = direct
            .query_opt(
                "select application_name from pg_stat_activity where pid = $1",
                &[&pid],
            )
            .await
            .expect("pg_stat_activity")
            .map(|r| r.get(0));
        assert_eq!(app_of_pid.as_deref(), Some(app));
        pids.push((c.process_id, c.secret_key, c));
    }
    let keys: std::collections::HashSet<i32> = pids.iter().map(|p| p.1).collect();
    assert_eq!(
        keys.len(),
        3,
        "cancel secrets of three sessions must differ"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listen_notify_delivered_while_idle() {
    let pgfan = Pgfan::start(&[]);
    let channel = "pgfan_clients_chan";

    // A1: raw wire client through pgfan.
    let mut a1 = WireClient::connect(&pgfan.addr(), "postgres", "postgres")
        .await
        .expect("connect A1 through pgfan");
    let t = a1
        .simple_query(&format!("LISTEN {channel}"))
        .await
        .expect("LISTEN");
    assert_eq!(t.command_tags(), vec!["LISTEN"], "{t:?}");

    // A2: tokio-postgres through pgfan, whose connection reports the notifier's pid.
    let (a2, mut conn) = config(pgfan.port, "pgfan_clients_listen")
        .connect(NoTls)
        .await
        .expect("connect A2 through pgfan");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = stream.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send(n);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    a2.batch_execute(&format!("LISTEN {channel}"))
        .await
        .expect("LISTEN A2");

    // B: directly on the primary.
    let b = connect_primary("postgres").await;
    let b_pid: i32 = b
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("B pid")
        .get(0);
    // Let A1 and A2 sit idle for a moment first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.batch_execute(&format!("NOTIFY {channel}, 'hello from B'"))
        .await
        .expect("NOTIFY");

    let msg = tokio::time::timeout(Duration::from_secs(5), a1.read_message())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "idle LISTEN client got no NotificationResponse within 5 s\npgfan log:\n{}",
                pgfan.log_tail()
            )
        })
        .expect("read notification");
    assert_eq!(
        msg,
        Msg::Notification {
            channel: channel.to_string(),
            payload: "hello from B".to_string(),
            from_self: false,
        }
    );
    let n = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("A2 got no notification within 5 s")
        .expect("notification channel open");
    assert_eq!(n.channel(), channel);
    assert_eq!(n.payload(), "hello from B");
    assert_eq!(
        n.process_id(),
        b_pid,
        "NotificationResponse carries B's pid"
    );

    // Both sessions still answer queries afterwards, and nothing else is pending on A1.
    assert_eq!(wire_one(&mut a1, "select 5").await.as_deref(), Some("5"));
    assert_eq!(one_text(&a2, "select 6").await.as_deref(), Some("6"));

    // A second notification, sent while A1 is inside an idle transaction, arrives too.
    let t = a1.simple_query("begin").await.expect("begin");
    assert_eq!(t.status(), Some('T'));
    b.batch_execute(&format!("NOTIFY {channel}, 'second'"))
        .await
        .expect("NOTIFY 2");
    let n = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("A2 got no second notification")
        .expect("channel open");
    assert_eq!(n.payload(), "second");
    let t = a1.simple_query("commit").await.expect("commit");
    let got: Vec<&Msg> = t
        .messages
        .iter()
        .filter(|m| matches!(m, Msg::Notification { .. }))
        .collect();
    // PostgreSQL delivers it to A1 at the latest when the transaction ends.
    if got.is_empty() {
        let msg = tokio::time::timeout(Duration::from_secs(5), a1.read_message())
            .await
            .expect("A1 got no second notification")
            .expect("read");
        assert!(
            matches!(&msg, Msg::Notification { payload, .. } if payload == "second"),
            "{msg:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn startup_parameters_forwarded() {
    let pgfan = Pgfan::start(&[]);
    let app = "pgfan_clients_startup_x";
    let options = "-c search_path=foo,public -c work_mem=7MB";
    let mut cfg = config(pgfan.port, app);
    cfg.options(options);
    let through = connect(&cfg).await;
    let mut dcfg = config(cluster().primary_port, app);
    dcfg.options(options);
    let direct = connect(&dcfg).await;

    for (sql, want) in [
        ("show work_mem", "7MB"),
        ("show search_path", "foo,public"),
        ("select current_setting('application_name')", app),
    ] {
        let got = one_text(&through, sql).await;
        assert_eq!(got.as_deref(), Some(want), "{sql} through pgfan");
        assert_eq!(one_text(&direct, sql).await, got, "{sql}: direct vs pgfan");
    }

    // Raw clients: ParameterStatus reported at startup, and a GUC given directly as a
    // startup parameter.
    let opts = ConnectOptions::new("postgres", "postgres")
        .param("application_name", app)
        .param("options", options)
        .param("DateStyle", "SQL, DMY")
        .param("extra_float_digits", "1");
    let mut w = WireClient::connect_with(&pgfan.addr(), &opts)
        .await
        .expect("connect through pgfan");
    let d = WireClient::connect_with(&cluster().primary_addr(), &opts)
        .await
        .expect("connect directly");
    assert_eq!(w.parameter("application_name"), Some(app));
    assert_eq!(w.parameter("DateStyle"), Some("SQL, DMY"));
    assert_eq!(
        wire_one(&mut w, "show datestyle").await.as_deref(),
        Some("SQL, DMY")
    );
    assert_eq!(
        wire_one(&mut w, "show extra_float_digits").await.as_deref(),
        Some("1")
    );
    assert_eq!(
        wire_one(&mut w, "show work_mem").await.as_deref(),
        Some("7MB")
    );

    // The startup ParameterStatus set mirrors the primary's.
    let sorted = WireClient::startup_parameters_sorted;
    assert_eq!(
        sorted(&w),
        sorted(&d),
        "startup ParameterStatus through pgfan vs direct"
    );
    assert!(w.parameter("server_version").is_some());

    // ParameterStatus after SET application_name.
    let t = w
        .simple_query("set application_name = 'renamed_by_set'")
        .await
        .expect("set");
    assert!(
        t.messages.contains(&Msg::ParameterStatus {
            name: "application_name".into(),
            value: "renamed_by_set".into()
        }),
        "{t:?}"
    );
}

/// How the dirty client leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leave {
    /// Terminate, then close.
    Terminate,
    /// Close the socket without Terminate.
    Drop,
}

/// Statements that leave state behind in a session (each must succeed).
fn dirtying_statements(tmp: &str, seq: &str, lock_key: i64) -> Vec<String> {
    vec![
        "SET work_mem = '1MB'".to_string(),
        "SET ROLE pgfan_pw".to_string(),
        "SELECT set_config('pgfan.custom', 'dirty', false)".to_string(),
        format!("CREATE TEMP TABLE {tmp} (x int)"),
        format!("INSERT INTO {tmp} VALUES (1)"),
        "PREPARE dirty_stmt AS SELECT 1".to_string(),
        "BEGIN".to_string(),
        "DECLARE dirty_cur CURSOR WITH HOLD FOR SELECT 1".to_string(),
        "COMMIT".to_string(),
        format!("SELECT pg_advisory_lock({lock_key})"),
        "LISTEN pgfan_dirty_channel".to_string(),
        format!("SELECT nextval('{seq}')"),
    ]
}

/// Asserts that session `b` shows none of the state [`dirtying_statements`] creates.
async fn assert_clean(
    b: &mut WireClient,
    tmp: &str,
    seq: &str,
    lock_key: i64,
    default_work_mem: &Option<String>,
    what: &str,
) {
    assert_eq!(
        b.startup.status(),
        Some('I'),
        "{what}: startup ReadyForQuery"
    );
    let checks: Vec<(String, Option<&str>, &str)> = vec![
        (
            "show work_mem".into(),
            default_work_mem.as_deref(),
            "work_mem leaked",
        ),
        (
            "select current_user::text".into(),
            Some("postgres"),
            "SET ROLE leaked",
        ),
        (
            "select session_user::text".into(),
            Some("postgres"),
            "session user",
        ),
        (
            "select coalesce(current_setting('pgfan.custom', true), '') = 'dirty'".into(),
            Some("f"),
            "custom setting leaked",
        ),
        (
            format!("select to_regclass('pg_temp.{tmp}')::text"),
            None,
            "temp table leaked",
        ),
        (
            format!("select count(*) from pg_class where relname = '{tmp}'"),
            Some("0"),
            "the temp table still exists in some session",
        ),
        (
            "select count(*) from pg_prepared_statements".into(),
            Some("0"),
            "prepared statements leaked",
        ),
        (
            "select count(*) from pg_cursors".into(),
            Some("0"),
            "WITH HOLD cursor leaked",
        ),
        (
            "select count(*) from pg_listening_channels()".into(),
            Some("0"),
            "LISTEN leaked",
        ),
        (
            format!(
                "select count(*) from pg_locks where locktype = 'advisory' and objid = {lock_key}"
            ),
            Some("0"),
            "advisory lock still held",
        ),
        (
            "select current_setting('transaction_isolation')".into(),
            Some("read committed"),
            "transaction state leaked",
        ),
    ];
    for (sql, want, why) in checks {
        assert_eq!(
            wire_one(b, &sql).await.as_deref(),
            want,
            "{what}: {why} ({sql})"
        );
    }
    // currval() is per session: a clean session has not called nextval().
    let t = b
        .simple_query(&format!("select currval('{seq}')"))
        .await
        .expect("currval");
    assert_eq!(
        t.error_code(),
        Some("55000"),
        "{what}: currval of the previous session leaked: {t:?}"
    );
}

/// The per-test set-up of the dirty-session tests: a database with a sequence, pgfan with
/// `config`, and the primary's default work_mem.
struct DirtyEnv {
    pgfan: Pgfan,
    db: String,
    app: String,
    tmp: String,
    seq: String,
    lock_key: i64,
    direct: tokio_postgres::Client,
    default_work_mem: Option<String>,
}

impl DirtyEnv {
    async fn new(name: &str, lock_key: i64, config: &str) -> DirtyEnv {
        let db = format!("pgfan_clients_{name}");
        create_database(&db).await;
        let direct_db = connect_primary(&db).await;
        let seq = "pgfan_dirty_seq".to_string();
        direct_db
            .batch_execute(&format!(
                "create sequence {seq}; create table tx_rows (x int)"
            ))
            .await
            .expect("set up database");
        let direct = connect_primary("postgres").await;
        let default_work_mem = one_text(&direct, "show work_mem").await;
        assert_ne!(default_work_mem.as_deref(), Some("1MB"));
        DirtyEnv {
            pgfan: Pgfan::start_with_config(config, &[]),
            db,
            app: format!("pgfan_clients_{name}"),
            tmp: format!("pgfan_dirty_tmp_{name}"),
            seq,
            lock_key,
            direct,
            default_work_mem,
        }
    }

    async fn client(&self, app: &str) -> WireClient {
        WireClient::connect_with(
            &self.pgfan.addr(),
            &ConnectOptions::new("postgres", &self.db).param("application_name", app),
        )
        .await
        .unwrap_or_else(|e| panic!("connect through pgfan: {e}\n{}", self.pgfan.log_tail()))
    }

    /// A client that dirties its session and leaves; returns its backend pid.
    async fn dirty_and_leave(&self, leave: Leave) -> i32 {
        let mut a = self.client(&self.app).await;
        for sql in dirtying_statements(&self.tmp, &self.seq, self.lock_key) {
            let t = a.simple_query(&sql).await.expect("dirty statement");
            assert!(t.error_code().is_none(), "{sql}: {t:?}");
        }
        // A protocol-level named statement too.
        let mut batch = Batch::new();
        batch.parse("dirty_proto_stmt", "select 2", &[]).sync();
        a.send(&batch).await.expect("send Parse");
        let t = a.read_until_ready().await.expect("ParseComplete");
        assert_eq!(t.error_code(), None, "{t:?}");
        assert_eq!(
            wire_one(&mut a, "show work_mem").await.as_deref(),
            Some("1MB")
        );
        let pid = a.process_id;
        match leave {
            Leave::Terminate => a.terminate().await.expect("terminate"),
            Leave::Drop => drop(a),
        }
        pid
    }

    async fn assert_clean(&self, b: &mut WireClient, what: &str) {
        assert_clean(
            b,
            &self.tmp,
            &self.seq,
            self.lock_key,
            &self.default_work_mem,
            what,
        )
        .await;
    }

    /// Waits (up to 5 s) until backend `pid` is either gone or idle after a reset (its
    /// last statement was not one of the client's).
    async fn wait_gone_or_reset(&self, pid: i32) -> bool {
        let start = Instant::now();
        loop {
            let row = self
                .direct
                .query_opt(
                    "select state, query from pg_stat_activity where pid = $1",
                    &[&pid],
                )
                .await
                .expect("pg_stat_activity");
            match row {
                None => return false,
                Some(r) => {
                    let state: Option<String> = r.get(0);
                    let query: Option<String> = r.get(1);
                    let q = query.unwrap_or_default().to_lowercase();
                    if state.as_deref() == Some("idle") && q.contains("discard") {
                        // Give pgfan a moment to park it after ReadyForQuery.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        return true;
                    }
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "backend {pid} neither closed nor reset 5 s after its client left\n{}",
                self.pgfan.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(self) {
        drop(self.pgfan);
        drop_database(&self.db).await;
    }
}

/// A client that drops its socket: its backend is closed (never reused), and new clients
/// see none of its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backend_closed_after_socket_drop_no_dirty_reuse() {
    let env = DirtyEnv::new("dirty_drop", 424_242, "").await;
    let a_pid = env.dirty_and_leave(Leave::Drop).await;
    wait_pid_gone(&env.direct, a_pid, Duration::from_secs(5), &env.pgfan).await;
    for i in 0..3 {
        let mut b = env.client(&env.app).await;
        assert_ne!(b.process_id, a_pid, "B got A's backend");
        env.assert_clean(&mut b, &format!("client {i} after a dropped socket"))
            .await;
        b.terminate().await.expect("terminate B");
    }
    env.finish().await;
}

/// With `reuse_backend_connections = false`, a client's backend is closed when it leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backend_closed_after_terminate_when_reuse_disabled() {
    let env = DirtyEnv::new(
        "dirty_noreuse",
        424_243,
        "reuse_backend_connections = false\n",
    )
    .await;
    let a_pid = env.dirty_and_leave(Leave::Terminate).await;
    wait_pid_gone(&env.direct, a_pid, Duration::from_secs(5), &env.pgfan).await;
    for i in 0..3 {
        let mut b = env.client(&env.app).await;
        assert_ne!(b.process_id, a_pid, "B got A's backend");
        env.assert_clean(&mut b, &format!("client {i} after Terminate (no reuse)"))
            .await;
        b.terminate().await.expect("terminate B");
    }
    env.finish().await;
}

/// With reuse on, a cleanly terminated session's backend may serve the next client with the
/// same startup parameters, but only after a full reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reused_backend_is_clean_after_terminate() {
    let env = DirtyEnv::new("dirty_reuse", 424_244, "reuse_backend_connections = true\n").await;
    let mut a_pid = env.dirty_and_leave(Leave::Terminate).await;
    let mut reused = 0;
    for i in 0..3 {
        let parked = env.wait_gone_or_reset(a_pid).await;
        let mut b = env.client(&env.app).await;
        if b.process_id == a_pid {
            reused += 1;
        }
        assert!(
            !parked || b.process_id == a_pid,
            "round {i}: backend {a_pid} was reset and idle but the next client with the same \
             startup parameters got a new backend {}",
            b.process_id
        );
        env.assert_clean(
            &mut b,
            &format!("round {i}: client after Terminate (reuse on)"),
        )
        .await;
        assert_eq!(
            b.parameter("application_name"),
            Some(env.app.as_str()),
            "round {i}"
        );
        // Once B's backend is parked again (so that exactly one is idle), a new client
        // dirties a session and leaves: the next round checks it was reset.
        let b_pid = b.process_id;
        b.terminate().await.expect("terminate B");
        env.wait_gone_or_reset(b_pid).await;
        a_pid = env.dirty_and_leave(Leave::Terminate).await;
    }
    eprintln!("{reused} of 3 clients reused the previous backend");
    env.finish().await;
}

/// Leaving inside a transaction (open or failed): nothing is committed, and no later
/// client starts inside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminate_inside_transaction_never_leaks() {
    let env = DirtyEnv::new("dirty_tx", 424_245, "reuse_backend_connections = true\n").await;
    let mut pids = Vec::new();
    for (sqls, status) in [
        (
            vec![
                "BEGIN",
                "INSERT INTO tx_rows VALUES (1)",
                "SET LOCAL work_mem = '1MB'",
            ],
            'T',
        ),
        (
            vec!["BEGIN", "INSERT INTO tx_rows VALUES (2)", "SELECT 1/0"],
            'E',
        ),
        (
            vec![
                "BEGIN ISOLATION LEVEL SERIALIZABLE",
                "INSERT INTO tx_rows VALUES (3)",
            ],
            'T',
        ),
    ] {
        let mut a = env.client(&env.app).await;
        let mut last = None;
        for sql in sqls {
            last = a.simple_query(sql).await.expect("statement").status();
        }
        assert_eq!(last, Some(status));
        pids.push(a.process_id);
        a.terminate().await.expect("terminate");
    }
    for pid in &pids {
        env.wait_gone_or_reset(*pid).await;
    }
    for i in 0..4 {
        let mut b = env.client(&env.app).await;
        env.assert_clean(&mut b, &format!("client {i} after in-transaction exits"))
            .await;
        assert_eq!(
            wire_one(&mut b, "select count(*) from tx_rows")
                .await
                .as_deref(),
            Some("0"),
            "an uncommitted insert of a client that left became visible"
        );
        let t = b.simple_query("select 1").await.expect("query");
        assert_eq!(
            t.status(),
            Some('I'),
            "client {i} starts inside a transaction"
        );
        b.terminate().await.expect("terminate");
    }
    env.finish().await;
}

/// A reset backend is handed only to a client whose startup parameters match: a client
/// with another application_name sees its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reused_backend_matches_startup_parameters() {
    let env = DirtyEnv::new(
        "dirty_params",
        424_246,
        "reuse_backend_connections = true\n",
    )
    .await;
    let a_pid = env.dirty_and_leave(Leave::Terminate).await;
    env.wait_gone_or_reset(a_pid).await;
    for other in ["pgfan_clients_other_app", "pgfan_clients_third_app"] {
        let mut b = env.client(other).await;
        assert_eq!(b.parameter("application_name"), Some(other));
        assert_eq!(
            wire_one(&mut b, "select current_setting('application_name')")
                .await
                .as_deref(),
            Some(other)
        );
        env.assert_clean(&mut b, &format!("client {other}")).await;
        b.terminate().await.expect("terminate");
    }
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_client_connections_gives_53300() {
    let pgfan = Pgfan::start_with_config("max_client_connections = 2\n", &[]);
    let opts = ConnectOptions::new("postgres", "postgres");
    let mut c1 = WireClient::connect_with(&pgfan.addr(), &opts)
        .await
        .expect("client 1");
    let mut c2 = WireClient::connect_with(&pgfan.addr(), &opts)
        .await
        .expect("client 2");

    let refused = |r: Result<WireClient, ConnectError>, what: &str| match r {
        Ok(_) => panic!("{what}: a third concurrent client was accepted (limit 2)"),
        Err(ConnectError::Server(e)) => {
            assert_eq!(e.code, "53300", "{what}: {e:?}");
            assert_eq!(
                e.message, "sorry, too many clients already",
                "{what}: {e:?}"
            );
        }
        Err(e) => panic!("{what}: expected ErrorResponse 53300, got {e}"),
    };
    refused(
        WireClient::connect_with(&pgfan.addr(), &opts).await,
        "third client",
    );
    // tokio-postgres sees the same error.
    let err = config(pgfan.port, "pgfan_clients_limit")
        .connect(NoTls)
        .await
        .err()
        .expect("tokio-postgres third client must be refused");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err:?}");

    // The two admitted clients are unaffected.
    assert_eq!(wire_one(&mut c1, "select 1").await.as_deref(), Some("1"));
    assert_eq!(wire_one(&mut c2, "select 2").await.as_deref(), Some("2"));

    // One leaves: a new client is accepted (the slot is freed asynchronously).
    c1.terminate().await.expect("terminate client 1");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut c3 = loop {
        match WireClient::connect_with(&pgfan.addr(), &opts).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no client accepted within 5 s after one of two left: {e}\npgfan log:\n{}",
                    pgfan.log_tail()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(wire_one(&mut c3, "select 3").await.as_deref(), Some("3"));
    // The limit still holds with the freed slot taken again.
    refused(
        WireClient::connect_with(&pgfan.addr(), &opts).await,
        "client beyond the limit after reuse",
    );
    assert_eq!(wire_one(&mut c2, "select 4").await.as_deref(), Some("4"));

    // A refused client that never finishes its startup does not eat a slot either:
    // after dropping c2 a new client gets in.
    drop(c2);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match WireClient::connect_with(&pgfan.addr(), &opts).await {
            Ok(mut c) => {
                assert_eq!(wire_one(&mut c, "select 5").await.as_deref(), Some("5"));
                break;
            }
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no client accepted within 5 s after a dropped socket: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_endpoint() {
    let pgfan = Pgfan::start(&[]);
    let app = "pgfan_clients_metrics";
    let opts = ConnectOptions::new("postgres", "postgres").param("application_name", app);
    let mut c = WireClient::connect_with(&pgfan.addr(), &opts)
        .await
        .expect("connect");
    assert_eq!(wire_one(&mut c, "select 1").await.as_deref(), Some("1"));

    let page = scrape(&pgfan).await;
    let s = samples(&page);
    let queries_key = "pgfan_queries_total{route=\"passthrough\"}";
    let q1 = *s
        .get(queries_key)
        .unwrap_or_else(|| panic!("no {queries_key} sample in:\n{page}"));
    assert!(q1 >= 1.0, "{queries_key} = {q1} after one query");
    assert_eq!(
        s.get("pgfan_client_connections").copied(),
        Some(1.0),
        "pgfan_client_connections with one client connected:\n{page}"
    );
    assert!(
        s.keys()
            .any(|k| k.starts_with("pgfan_query_duration_seconds_bucket{")
                && k.contains("route=\"passthrough\"")),
        "no pgfan_query_duration_seconds_bucket sample:\n{page}"
    );
    assert!(
        s.keys()
            .any(|k| k.starts_with("pgfan_backend_connections{")),
        "no pgfan_backend_connections sample:\n{page}"
    );
    let count_before = s
        .get("pgfan_query_duration_seconds_count{route=\"passthrough\"}")
        .copied()
        .unwrap_or(0.0);

    for i in 0..3 {
        assert_eq!(
            wire_one(&mut c, &format!("select {i}")).await,
            Some(i.to_string())
        );
    }
    let page = scrape(&pgfan).await;
    let s = samples(&page);
    let q2 = s.get(queries_key).copied().unwrap_or(0.0);
    assert!(
        q2 >= q1 + 3.0,
        "{queries_key} went from {q1} to {q2} after 3 more queries:\n{page}"
    );
    let count_after = s
        .get("pgfan_query_duration_seconds_count{route=\"passthrough\"}")
        .copied()
        .unwrap_or(0.0);
    assert!(
        count_after >= count_before + 3.0,
        "query duration histogram count went from {count_before} to {count_after}:\n{page}"
    );

    // Backend connections (summed over states) must match the primary's view of this
    // pgfan's connections (all made with this test's application_name), and the client
    // gauge the connected clients: with one client, two, and none.
    let backend_total = |s: &BTreeMap<String, f64>| -> f64 {
        s.iter()
            .filter(|(k, _)| k.starts_with("pgfan_backend_connections{"))
            .map(|(_, v)| v)
            .sum()
    };
    let direct = connect_primary("postgres").await;
    let gauges_match = |clients: f64, what: &'static str| {
        let pgfan = &pgfan;
        let direct = &direct;
        async move {
            // Gauges may trail the session's ReadyForQuery by a moment: poll.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let page = scrape(pgfan).await;
                let s = samples(&page);
                let on_primary: i64 = direct
                    .query_one(
                        "select count(*) from pg_stat_activity where application_name = $1",
                        &[&app],
                    )
                    .await
                    .expect("pg_stat_activity")
                    .get(0);
                let got_clients = s.get("pgfan_client_connections").copied();
                let backends = backend_total(&s);
                if got_clients == Some(clients) && backends == on_primary as f64 {
                    return on_primary;
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: expected pgfan_client_connections {clients} and \
                     pgfan_backend_connections (all states) {on_primary} as on the primary, \
                     within 5 s:\n{page}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let n = gauges_match(1.0, "one client").await;
    assert!(n >= 1, "one client: {n} backend connections on the primary");
    let c2 = WireClient::connect_with(&pgfan.addr(), &opts)
        .await
        .expect("connect 2");
    let n = gauges_match(2.0, "two clients").await;
    assert!(
        n >= 2,
        "two clients: {n} backend connections on the primary"
    );
    c.terminate().await.expect("terminate");
    drop(c2);
    gauges_match(0.0, "both clients gone").await;
}
