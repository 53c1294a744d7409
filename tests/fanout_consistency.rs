//! Fan-out consistency under concurrent writes (DESIGN.md invariant 4, "one snapshot") and
//! streaming of concatenated scans (invariant 3, "rows reach the client while fragments
//! still run").
//!
//! - `sums_stay_constant_under_writes`: writers on the primary move money between accounts
//!   and replace balance-0 rows (insert one, delete another, in one transaction), so
//!   `sum(balance)` and `count(*)` never change in any snapshot. A reader asks pgfan for
//!   both 200 times (simple and extended protocol alternately) while the writers run, then
//!   inside explicit transactions (REPEATABLE READ and READ COMMITTED). A fragment that
//!   used its own snapshot would count a moved row twice or not at all.
//! - `scan_streams_before_fragments_finish`: a concatenated scan of 1,000,000 rows through
//!   pgfan, read by a raw protocol client; when the first DataRow arrives (the client then
//!   stops reading), a direct connection looks for active `pgfan fragment` backends in
//!   `pg_stat_activity`. A proxy that buffered whole fragments would only send the first
//!   row once every fragment is done. Only the order of events is asserted, never timings.
//!
//! Run: `cargo test --test fanout_consistency -- --nocapture`. With
//! `PGFAN_TEST_PROXY=direct` the queries go to the primary itself and the assertions that
//! only make sense through pgfan (EXPLAIN FANOUT, fragment backends) are skipped.

mod common;

use std::error::Error;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::message::frontend;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::Client;

use common::{
    connect_pgfan, connect_primary, create_database, drop_database, fanout_config_toml, query_i64,
    Pgfan,
};

// ---------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------

/// The text rows of a simple query.
async fn simple_rows(client: &Client, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    let messages = client
        .simple_query(sql)
        .await
        .map_err(|e| format!("{sql}: {e:?}"))?;
    Ok(common::text_rows(&messages))
}

/// Runs `EXPLAIN FANOUT <sql>` through pgfan and returns the number of fragments; fails
/// unless the statement fans out into more than one fragment.
async fn assert_fans_out(client: &Client, pgfan: &Pgfan, sql: &str) -> usize {
    let explain = format!("EXPLAIN FANOUT {sql}");
    let rows = simple_rows(client, &explain)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pgfan.log_tail()));
    let lines: Vec<String> = rows
        .into_iter()
        .map(|r| r.into_iter().next().flatten().unwrap_or_default())
        .collect();
    let first = lines.first().cloned().unwrap_or_default();
    let n = first
        .strip_prefix("FanOut: ")
        .and_then(|rest| rest.split_once(" fragments, split "))
        .and_then(|(n, _)| n.parse::<usize>().ok());
    match n {
        Some(n) if n > 1 => n,
        _ => panic!(
            "{sql}: expected EXPLAIN FANOUT to say `FanOut: <n> fragments, split ...` with \
             n > 1, got:\n{}",
            lines.join("\n")
        ),
    }
}

/// A `numeric` holding an integer (`sum(bigint)`), decoded from the binary format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IntNumeric(i128);

impl<'a> FromSql<'a> for IntNumeric {
    fn from_sql(_ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        let mut b = raw;
        if b.len() < 8 {
            return Err(format!("numeric value too short: {raw:?}").into());
        }
        let ndigits = b.get_i16();
        let weight = b.get_i16() as i32;
        let sign = b.get_u16();
        let _dscale = b.get_u16();
        if b.len() != 2 * ndigits.max(0) as usize {
            return Err(format!("numeric value with a bad digit count: {raw:?}").into());
        }
        let mut value: i128 = 0;
        for i in 0..ndigits as i32 {
            let digit = b.get_i16() as i128;
            let exp = weight - i;
            if exp < 0 {
                if digit != 0 {
                    return Err(format!("numeric value is not an integer: {raw:?}").into());
                }
                continue;
            }
            value += digit * 10_000i128.pow(exp as u32);
        }
        match sign {
            0x0000 => Ok(IntNumeric(value)),
            0x4000 => Ok(IntNumeric(-value)),
            _ => Err(format!("numeric NaN/infinity (sign {sign:#x}): {raw:?}").into()),
        }
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }
}

// ---------------------------------------------------------------------------------------
// sums_stay_constant_under_writes
// ---------------------------------------------------------------------------------------

/// Accounts with balance 100 each.
const ACCOUNTS: i64 = 100_000;
/// Concurrent writers; each owns one balance-0 "spare" row that it keeps replacing.
const WRITERS: i64 = 2;
/// `sum(balance)` in every snapshot.
const EXPECTED_SUM: i128 = 100 * ACCOUNTS as i128;
/// `count(*)` in every snapshot: the accounts plus one spare row per writer.
const EXPECTED_COUNT: i64 = ACCOUNTS + WRITERS;
/// First id of the rows the writers insert.
const FIRST_NEW_ID: i64 = 10_000_000;

const SUM_SQL: &str = "SELECT sum(balance), count(*) FROM accounts";
/// Grows as the writers commit transfers: a snapshot-sensitive answer.
const CHANGED_SQL: &str = "SELECT count(*) FROM accounts WHERE balance <> 100";

/// One writer: alternately a transfer between two random accounts (one transaction, two
/// UPDATEs in id order so two writers cannot deadlock) and the replacement of its spare
/// balance-0 row (INSERT a new one, DELETE the old one, one transaction). Returns the
/// number of committed transactions.
async fn writer(
    db: String,
    index: i64,
    stop: Arc<AtomicBool>,
    next_id: Arc<AtomicI64>,
    committed: Arc<AtomicU64>,
) -> u64 {
    let mut client = connect_primary(&db).await;
    let seed = 0x5eed_0000 + index as u64;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut spare = ACCOUNTS + 1 + index;
    let mut mine = 0u64;
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let tx = client.transaction().await.expect("writer: BEGIN");
        if round % 2 == 1 {
            let a = rng.gen_range(1..=ACCOUNTS);
            let mut b = rng.gen_range(1..=ACCOUNTS);
            while b == a {
                b = rng.gen_range(1..=ACCOUNTS);
            }
            let amount = rng.gen_range(1..=50i64);
            // a pays b, updated in id order
            let mut updates = [(a, -amount), (b, amount)];
            updates.sort();
            for (id, delta) in updates {
                let n = tx
                    .execute(
                        "UPDATE accounts SET balance = balance + $2 WHERE id = $1",
                        &[&id, &delta],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("writer {index}: transfer: {e:?}"));
                assert_eq!(n, 1, "writer {index}: UPDATE of account {id}");
            }
        } else {
            let new = next_id.fetch_add(1, Ordering::Relaxed);
            let n = tx
                .execute("INSERT INTO accounts (id, balance) VALUES ($1, 0)", &[&new])
                .await
                .unwrap_or_else(|e| panic!("writer {index}: insert: {e:?}"));
            assert_eq!(n, 1, "writer {index}: INSERT of {new}");
            let n = tx
                .execute(
                    "DELETE FROM accounts WHERE id = $1 AND balance = 0",
                    &[&spare],
                )
                .await
                .unwrap_or_else(|e| panic!("writer {index}: delete: {e:?}"));
            assert_eq!(n, 1, "writer {index}: DELETE of spare row {spare}");
            spare = new;
        }
        tx.commit()
            .await
            .unwrap_or_else(|e| panic!("writer {index}: COMMIT: {e:?}"));
        mine += 1;
        committed.fetch_add(1, Ordering::Relaxed);
    }
    mine
}

/// `(sum, count)` of [`SUM_SQL`] in the simple protocol.
async fn sum_count_simple(client: &Client) -> Result<(i128, i64), String> {
    let rows = simple_rows(client, SUM_SQL).await?;
    let [row] = rows.as_slice() else {
        return Err(format!("{SUM_SQL}: expected one row, got {rows:?}"));
    };
    let parse = |i: usize| -> Option<&str> { row.get(i).and_then(|v| v.as_deref()) };
    match (
        parse(0).and_then(|s| s.parse::<i128>().ok()),
        parse(1).and_then(|s| s.parse::<i64>().ok()),
    ) {
        (Some(s), Some(c)) => Ok((s, c)),
        _ => Err(format!("{SUM_SQL}: unexpected row {row:?}")),
    }
}

/// `(sum, count)` of [`SUM_SQL`] in the extended protocol (binary results).
async fn sum_count_extended(client: &Client) -> Result<(i128, i64), String> {
    let rows = client
        .query(SUM_SQL, &[])
        .await
        .map_err(|e| format!("{SUM_SQL} (extended): {e:?}"))?;
    let [row] = rows.as_slice() else {
        return Err(format!(
            "{SUM_SQL} (extended): expected one row, got {}",
            rows.len()
        ));
    };
    let sum: IntNumeric = row
        .try_get(0)
        .map_err(|e| format!("{SUM_SQL} (extended): sum: {e:?}"))?;
    let count: i64 = row
        .try_get(1)
        .map_err(|e| format!("{SUM_SQL} (extended): count: {e:?}"))?;
    Ok((sum.0, count))
}

/// Waits until the writers committed `more` transactions after `from` (bounded, so a
/// stuck writer fails the test instead of hanging it).
async fn wait_for_commits(committed: &AtomicU64, from: u64, more: u64) {
    let mut waited = 0;
    while committed.load(Ordering::Relaxed) < from + more {
        assert!(
            waited < 3000,
            "the writers committed only {} transactions in 30 s",
            committed.load(Ordering::Relaxed) - from
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sums_stay_constant_under_writes() {
    const DB: &str = "pgfan_fanout_consistency_sums";
    let direct_mode = Pgfan::direct_mode();
    create_database(DB).await;
    let admin = connect_primary(DB).await;
    admin
        .batch_execute(&format!(
            "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);
             INSERT INTO accounts SELECT g, 100 FROM generate_series(1, {ACCOUNTS}) g;
             INSERT INTO accounts SELECT {ACCOUNTS} + g, 0 FROM generate_series(1, {WRITERS}) g;
             ANALYZE accounts;"
        ))
        .await
        .expect("set up accounts");
    let pages = query_i64(
        &admin,
        "SELECT (pg_relation_size('accounts') / current_setting('block_size')::int)::bigint",
    )
    .await;
    assert!(pages >= 16, "accounts has only {pages} heap pages");

    let pgfan = Pgfan::start_with_config(&fanout_config_toml(), &[]);
    let client = connect_pgfan(&pgfan, DB).await;
    if !direct_mode {
        let n = assert_fans_out(&client, &pgfan, SUM_SQL).await;
        eprintln!("fanout_consistency: {SUM_SQL} fans out into {n} fragments ({pages} pages)");
        assert_fans_out(&client, &pgfan, CHANGED_SQL).await;
    }
    // Before any write: the invariant holds, in both protocols.
    let before_simple = sum_count_simple(&client).await.expect("first sum");
    let before_extended = sum_count_extended(&client).await.expect("first sum");
    assert_eq!(
        before_simple,
        (EXPECTED_SUM, EXPECTED_COUNT),
        "before writes (simple)"
    );
    assert_eq!(
        before_extended,
        (EXPECTED_SUM, EXPECTED_COUNT),
        "before writes (extended)"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let next_id = Arc::new(AtomicI64::new(FIRST_NEW_ID));
    let committed = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|i| {
            tokio::spawn(writer(
                DB.to_string(),
                i,
                stop.clone(),
                next_id.clone(),
                committed.clone(),
            ))
        })
        .collect();
    // Let the writers get going before the first read.
    wait_for_commits(&committed, 0, 10).await;

    // (b) 200 autocommit reads, simple and extended alternately.
    let mut failures = Vec::new();
    let commits_at_start = committed.load(Ordering::Relaxed);
    for i in 0..200 {
        let (protocol, got) = if i % 2 == 0 {
            ("simple", sum_count_simple(&client).await)
        } else {
            ("extended", sum_count_extended(&client).await)
        };
        match got {
            Ok(v) if v == (EXPECTED_SUM, EXPECTED_COUNT) => {}
            Ok((sum, count)) => failures.push(format!(
                "read {i} ({protocol}): {SUM_SQL} gave sum={sum} count={count}, expected \
                 sum={EXPECTED_SUM} count={EXPECTED_COUNT}"
            )),
            Err(e) => failures.push(format!("read {i} ({protocol}): error {e}")),
        }
    }
    let commits_during_reads = committed.load(Ordering::Relaxed) - commits_at_start;

    // Explicit transactions: every answer holds the invariant; under REPEATABLE READ the
    // snapshot-sensitive count stays the same across writer commits.
    for round in 0..4 {
        for isolation in ["REPEATABLE READ", "READ COMMITTED"] {
            let what = format!("round {round}, BEGIN ISOLATION LEVEL {isolation}");
            client
                .batch_execute(&format!("BEGIN ISOLATION LEVEL {isolation}"))
                .await
                .unwrap_or_else(|e| panic!("{what}: {e:?}"));
            if round == 0 && !direct_mode {
                // inside a transaction block that has not written, the reads still fan out
                assert_fans_out(&client, &pgfan, SUM_SQL).await;
                assert_fans_out(&client, &pgfan, CHANGED_SQL).await;
            }
            let first = sum_count_simple(&client).await;
            let changed_first = simple_rows(&client, CHANGED_SQL).await;
            let before = committed.load(Ordering::Relaxed);
            wait_for_commits(&committed, before, 10).await;
            let second = sum_count_extended(&client).await;
            let changed_second = simple_rows(&client, CHANGED_SQL).await;
            client
                .batch_execute("COMMIT")
                .await
                .unwrap_or_else(|e| panic!("{what}: COMMIT: {e:?}"));
            for (label, got) in [("first", first), ("second", second)] {
                match got {
                    Ok(v) if v == (EXPECTED_SUM, EXPECTED_COUNT) => {}
                    Ok((sum, count)) => failures.push(format!(
                        "{what}: {label} {SUM_SQL} gave sum={sum} count={count}, expected \
                         sum={EXPECTED_SUM} count={EXPECTED_COUNT}"
                    )),
                    Err(e) => failures.push(format!("{what}: {label} read: error {e}")),
                }
            }
            let one = |r: Result<Vec<Vec<Option<String>>>, String>| -> Result<String, String> {
                let rows = r?;
                rows.first()
                    .and_then(|row| row.first().cloned().flatten())
                    .ok_or_else(|| format!("no value in {rows:?}"))
            };
            let (changed_first, changed_second) = match (one(changed_first), one(changed_second)) {
                (Ok(a), Ok(b)) => (a, b),
                (a, b) => {
                    failures.push(format!("{what}: {CHANGED_SQL} failed: {a:?} {b:?}"));
                    continue;
                }
            };
            if isolation != "REPEATABLE READ" {
                continue;
            }
            if changed_first != changed_second {
                failures.push(format!(
                    "{what}: {CHANGED_SQL} changed inside the transaction: {changed_first} \
                     then {changed_second} (writers committed in between)"
                ));
            }
        }
    }

    // Snapshot reference check: the count that pgfan computes inside a REPEATABLE READ
    // transaction equals the count a direct session computes in the same snapshot
    // (exported by the pgfan session with a pass-through statement).
    let reference = connect_primary(DB).await;
    for round in 0..3 {
        let what = format!("snapshot reference round {round}");
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            .await
            .unwrap_or_else(|e| panic!("{what}: BEGIN: {e:?}"));
        let snapshot = simple_rows(&client, "SELECT pg_export_snapshot()")
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"))[0][0]
            .clone()
            .expect("snapshot name");
        reference
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
                 SET TRANSACTION SNAPSHOT '{snapshot}'"
            ))
            .await
            .unwrap_or_else(|e| panic!("{what}: import {snapshot} directly: {e:?}"));
        let before = committed.load(Ordering::Relaxed);
        wait_for_commits(&committed, before, 10).await;
        let through = simple_rows(&client, CHANGED_SQL).await;
        let direct = simple_rows(&reference, CHANGED_SQL).await;
        let direct_sum = sum_count_simple(&reference).await;
        reference
            .batch_execute("COMMIT")
            .await
            .expect("reference COMMIT");
        client
            .batch_execute("COMMIT")
            .await
            .unwrap_or_else(|e| panic!("{what}: COMMIT: {e:?}"));
        match (&through, &direct) {
            (Ok(t), Ok(d)) if t == d => {}
            _ => failures.push(format!(
                "{what}: {CHANGED_SQL} through pgfan gave {through:?}, a direct session in the \
                 same snapshot gave {direct:?}"
            )),
        }
        assert_eq!(
            direct_sum,
            Ok((EXPECTED_SUM, EXPECTED_COUNT)),
            "{what}: direct reference"
        );
    }

    stop.store(true, Ordering::Relaxed);
    let mut per_writer = Vec::new();
    for w in writers {
        per_writer.push(w.await.expect("writer task panicked"));
    }
    let total: u64 = per_writer.iter().sum();
    eprintln!(
        "fanout_consistency: writers committed {per_writer:?} transactions \
         ({commits_during_reads} during the 200 autocommit reads)"
    );
    assert!(
        per_writer.iter().all(|&n| n > 0),
        "a writer made no progress: {per_writer:?}"
    );
    assert!(
        commits_during_reads > 0,
        "no writer transaction committed during the 200 reads: the test proved nothing"
    );
    // After the writers stopped: still the invariant, directly and through pgfan.
    assert_eq!(
        sum_count_simple(&admin).await,
        Ok((EXPECTED_SUM, EXPECTED_COUNT)),
        "direct, after {total} writer transactions"
    );
    assert_eq!(
        sum_count_simple(&client).await,
        Ok((EXPECTED_SUM, EXPECTED_COUNT)),
        "through pgfan, after {total} writer transactions"
    );
    assert!(
        failures.is_empty(),
        "{} wrong answers under concurrent writes:\n{}\npgfan log:\n{}",
        failures.len(),
        failures.join("\n"),
        pgfan.log_tail()
    );
    drop(client);
    drop(pgfan);
    drop_database(DB).await;
}

// ---------------------------------------------------------------------------------------
// scan_streams_before_fragments_finish
// ---------------------------------------------------------------------------------------

/// A minimal raw protocol client with a small receive buffer, so that a client that stops
/// reading makes the proxy (and a streaming proxy's fragments) wait.
struct RawConn {
    stream: TcpStream,
    buf: BytesMut,
}

impl RawConn {
    async fn connect(addr: &str, db: &str) -> RawConn {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(64 * 1024).expect("SO_RCVBUF");
        let stream = socket
            .connect(addr.parse().expect("address"))
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        let mut conn = RawConn {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
        };
        let mut out = BytesMut::new();
        frontend::startup_message(
            [
                ("user", "postgres"),
                ("database", db),
                ("application_name", "fanout_consistency scan"),
            ],
            &mut out,
        )
        .expect("startup message");
        conn.stream.write_all(&out).await.expect("send startup");
        loop {
            let (tag, body) = conn.read().await;
            match tag {
                b'R' => assert_eq!(
                    &body[..],
                    &[0, 0, 0, 0],
                    "the test expects trust authentication (AuthenticationOk)"
                ),
                b'E' => panic!("startup failed: {}", String::from_utf8_lossy(&body)),
                b'Z' => break,
                _ => {}
            }
        }
        conn
    }

    async fn query(&mut self, sql: &str) {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).expect("query message");
        self.stream.write_all(&out).await.expect("send Query");
    }

    /// The next message: type byte and body.
    async fn read(&mut self) -> (u8, Bytes) {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                assert!(len >= 4, "bad message length {len}");
                let total = 1 + len as usize;
                if self.buf.len() >= total {
                    let mut m = self.buf.split_to(total).freeze();
                    let tag = m[0];
                    m.advance(5);
                    return (tag, m);
                }
            }
            let n =
                tokio::time::timeout(Duration::from_secs(60), self.stream.read_buf(&mut self.buf))
                    .await
                    .expect("no message from the server within 60 s")
                    .expect("read from the server");
            assert!(n > 0, "the server closed the connection");
        }
    }
}

/// The first column of a DataRow body as text.
fn first_column(body: &Bytes) -> Option<&[u8]> {
    let mut b = &body[..];
    if b.len() < 6 {
        return None;
    }
    let _ncols = b.get_i16();
    let len = b.get_i32();
    if len < 0 || b.len() < len as usize {
        return None;
    }
    Some(&b[..len as usize])
}

/// Active fragment backends reading `big` in the current database.
async fn active_fragments(monitor: &Client) -> Vec<String> {
    simple_rows(
        monitor,
        "SELECT pid::text || ' ' || coalesce(wait_event_type, '-') || '/' || \
         coalesce(wait_event, '-') || ' ' || left(query, 120) \
         FROM pg_stat_activity \
         WHERE application_name = 'pgfan fragment' AND state = 'active' \
           AND datname = current_database() AND query ILIKE '%big%' \
           AND pid <> pg_backend_pid() \
         ORDER BY pid",
    )
    .await
    .expect("pg_stat_activity")
    .into_iter()
    .map(|r| r.into_iter().next().flatten().unwrap_or_default())
    .collect()
}

/// Every fragment backend of the current database with its state, for messages.
async fn all_fragments(monitor: &Client) -> Vec<String> {
    simple_rows(
        monitor,
        "SELECT pid::text || ' ' || coalesce(state, '-') || ' ' || \
         coalesce(wait_event_type, '-') || '/' || coalesce(wait_event, '-') || ' ' || \
         left(query, 100) \
         FROM pg_stat_activity \
         WHERE application_name = 'pgfan fragment' AND datname = current_database() \
         ORDER BY pid",
    )
    .await
    .expect("pg_stat_activity")
    .into_iter()
    .map(|r| r.into_iter().next().flatten().unwrap_or_default())
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scan_streams_before_fragments_finish() {
    const DB: &str = "pgfan_fanout_consistency_scan";
    const ROWS: i64 = 2_000_000;
    const SCAN_SQL: &str = "SELECT id, pad FROM big WHERE id % 2 = 0";
    let direct_mode = Pgfan::direct_mode();
    create_database(DB).await;
    let admin = connect_primary(DB).await;
    // md5 pads: ~54 bytes per result row, 13 MB per fragment, so fragments cannot finish
    // into socket buffers while the client is not reading.
    admin
        .batch_execute(&format!(
            "CREATE UNLOGGED TABLE big AS \
               SELECT g::bigint AS id, md5(g::text) AS pad FROM generate_series(1, {ROWS}) g;
             ANALYZE big;"
        ))
        .await
        .expect("set up big");

    let pgfan = Pgfan::start_with_config(&fanout_config_toml(), &[]);
    let monitor = connect_primary(DB).await;
    if !direct_mode {
        let client = connect_pgfan(&pgfan, DB).await;
        let n = assert_fans_out(&client, &pgfan, SCAN_SQL).await;
        eprintln!("fanout_consistency: {SCAN_SQL} fans out into {n} fragments");
        assert!(
            active_fragments(&monitor).await.is_empty(),
            "fragment backends are active on big before the query was sent"
        );
    }

    let mut conn = RawConn::connect(&pgfan.addr(), DB).await;
    conn.query(SCAN_SQL).await;

    // Events in the order the client saw them.
    let mut events: Vec<String> = Vec::new();
    let mut active_at_first_row: Option<Vec<String>> = None;
    let mut all_at_first_row: Vec<String> = Vec::new();
    let mut seen = vec![false; ROWS as usize + 1];
    let mut rows: u64 = 0;
    let mut duplicates: u64 = 0;
    let mut unexpected: Vec<String> = Vec::new();
    let mut tag = None;
    let mut errors = Vec::new();
    loop {
        let (t, body) = conn.read().await;
        match t {
            b'T' => events.push("RowDescription".into()),
            b'D' => {
                if rows == 0 {
                    events.push("first DataRow".into());
                    // the client stops reading here; a streaming proxy's fragments are
                    // still running (or blocked sending the rest of their rows)
                    if !direct_mode {
                        let active = active_fragments(&monitor).await;
                        events.push(format!(
                            "pg_stat_activity: {} active fragments on big",
                            active.len()
                        ));
                        active_at_first_row = Some(active);
                        all_at_first_row = all_fragments(&monitor).await;
                    }
                }
                rows += 1;
                let id = first_column(&body)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|s| s.parse::<i64>().ok());
                let valid = id.filter(|id| (1..=ROWS).contains(id) && id % 2 == 0);
                match valid {
                    Some(id) if std::mem::replace(&mut seen[id as usize], true) => duplicates += 1,
                    Some(_) => {}
                    None if unexpected.len() < 5 => unexpected.push(format!("{body:?}")),
                    None => {}
                }
            }
            b'C' => {
                let t =
                    String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(&body)).into_owned();
                events.push(format!("CommandComplete({t})"));
                tag = Some(t);
            }
            b'E' => {
                events.push("ErrorResponse".into());
                errors.push(String::from_utf8_lossy(&body).into_owned());
            }
            b'Z' => {
                events.push("ReadyForQuery".into());
                break;
            }
            b'N' | b'S' => {}
            other => events.push(format!("message {:?}", other as char)),
        }
    }
    let missing = (2..=ROWS)
        .step_by(2)
        .filter(|&id| !seen[id as usize])
        .count();
    let active_after = if direct_mode {
        Vec::new()
    } else {
        active_fragments(&monitor).await
    };
    eprintln!("fanout_consistency: scan events: {events:?}");
    if !direct_mode {
        eprintln!(
            "fanout_consistency: fragment backends at the first DataRow:\n  {}",
            all_at_first_row.join("\n  ")
        );
    }

    assert!(
        errors.is_empty(),
        "{SCAN_SQL}: errors {errors:?}\n{}",
        pgfan.log_tail()
    );
    assert_eq!(
        rows,
        (ROWS / 2) as u64,
        "{SCAN_SQL}: row count (events {events:?})"
    );
    assert_eq!(
        (duplicates, missing, unexpected.len()),
        (0, 0, 0),
        "{SCAN_SQL}: duplicate ids, missing ids, unexpected rows {unexpected:?}"
    );
    assert_eq!(
        tag.as_deref(),
        Some("SELECT 1000000"),
        "{SCAN_SQL}: command tag"
    );
    assert_eq!(
        events.first().map(String::as_str),
        Some("RowDescription"),
        "events {events:?}"
    );
    if !direct_mode {
        let active = active_at_first_row.expect("a first DataRow");
        assert!(
            !active.is_empty(),
            "{SCAN_SQL}: when the first DataRow reached the client no fragment was active any \
             more, i.e. pgfan sent rows only after every fragment had finished (invariant 3 \
             wants rows to stream while fragments run); events {events:?}; fragment \
             backends then: {all_at_first_row:#?}\n{}",
            pgfan.log_tail()
        );
        assert!(
            active_after.is_empty(),
            "{SCAN_SQL}: fragments still active after ReadyForQuery: {active_after:?}"
        );
    }
    conn.stream.shutdown().await.ok();
    drop(pgfan);
    drop_database(DB).await;
}
