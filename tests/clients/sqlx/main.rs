//! sqlx (0.8, PostgreSQL, tokio, rustls) through pgfan: the checks of tests/clients/README.md.
//!
//! Run by tests/clients/sqlx/run (`cargo run --example client_sqlx`) with the PGFAN_CLIENT_*
//! variables of tests/clients/run. For each target (pgfan over TLS with SCRAM, pgfan without
//! TLS, the primary directly) it checks, on one `PgConnection`:
//! - typed results: sqlx decodes binary results of the common types, and binds them as
//!   binary parameters;
//! - the fan-out aggregate and scan, with literals and with a `$1` bind, equal to the same
//!   query on a direct reference connection; through pgfan the route is asserted first with
//!   `EXPLAIN FANOUT` and pgfan's `pgfan_queries_total{route="fanout"}` must grow by one per
//!   query (sqlx runs them as named prepared statements);
//! - sqlx's statement cache: one query run ten times with binds is one named statement
//!   (`sqlx_s_N`) in the cache and in the server's `pg_prepared_statements`;
//! - a batch: several statements in one simple query (`sqlx::raw_sql`);
//! - a cursor: sqlx always executes with max_rows 0, so DECLARE CURSOR / FETCH 1000 in a
//!   transaction, count and sums equal to the direct aggregate;
//! - COPY in (`copy_in_raw`, into a temporary table) and out (`copy_out_raw`), and a 200 000
//!   row COPY out byte for byte equal to direct;
//! - a transaction with rollback: a row inserted into client_facts is counted inside the
//!   transaction and gone after the rollback;
//! - `SELECT 1/0` gives a `DatabaseError` with code 22012 (extended and simple protocol, and
//!   inside a transaction), and the connection is usable afterwards.
//!
//! It exits non-zero at the first failed check, saying what differed.

use std::env;
use std::fmt::{Debug, Display};
use std::str::FromStr;
use std::time::Instant;

use futures::TryStreamExt;
use sqlx::postgres::types::PgInterval;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgRow, PgSslMode, Postgres};
use sqlx::query::Query;
use sqlx::types::chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use sqlx::types::{Decimal, JsonValue, Uuid};
use sqlx::{Column, Connection, Either, Row, TypeInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Res<T> = Result<T, String>;

trait Ctx<T> {
    fn ctx(self, what: &str) -> Res<T>;
}

impl<T, E: Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Res<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

fn same<T: PartialEq + Debug>(what: &str, got: T, want: T) -> Res<()> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

/// Equal row lists, or the first difference.
fn same_rows(what: &str, got: &[String], want: &[String]) -> Res<()> {
    if let Some(i) = (0..got.len().min(want.len())).find(|&i| got[i] != want[i]) {
        return Err(format!(
            "{what}: row {i} differs: got {}, want {}",
            got[i], want[i]
        ));
    }
    same(&format!("{what}: row count"), got.len(), want.len())
}

fn get<'r, T>(row: &'r PgRow, i: usize) -> Res<T>
where
    T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    row.try_get(i).ctx(&format!("decode column {i}"))
}

struct Target {
    name: &'static str,
    opts: PgConnectOptions,
    via_pgfan: bool,
}

#[tokio::main]
async fn main() {
    match run().await {
        Ok(()) => println!("sqlx: all checks passed on all targets"),
        Err(e) => {
            eprintln!("sqlx: FAILED: {e}");
            std::process::exit(1);
        }
    }
}

async fn run() -> Res<()> {
    let var = |k: &str| env::var(k).map_err(|_| format!("{k} is not set"));
    let url = |k: &str| -> Res<PgConnectOptions> { var(k)?.parse().ctx(&format!("parse {k}")) };
    let metrics = var("PGFAN_CLIENT_METRICS_URL")?;
    // sslmode=require as the URL says: verify-full fails in rustls/webpki with CaUsedAsEndEntity,
    // as the harness's self-signed certificate is its own CA (basicConstraints CA:TRUE)
    let tls = url("PGFAN_CLIENT_TLS_URL")?;
    if !matches!(tls.get_ssl_mode(), PgSslMode::Require) {
        return Err("PGFAN_CLIENT_TLS_URL: want sslmode=require".into());
    }
    let targets = [
        Target {
            name: "pgfan TLS (sslmode=require) + SCRAM",
            opts: tls,
            via_pgfan: true,
        },
        Target {
            name: "pgfan plain + SCRAM",
            opts: url("PGFAN_CLIENT_PLAIN_URL")?,
            via_pgfan: true,
        },
        Target {
            name: "direct",
            opts: url("PGFAN_CLIENT_DIRECT_URL")?,
            via_pgfan: false,
        },
    ];
    let mut reference = PgConnection::connect_with(&url("PGFAN_CLIENT_DIRECT_URL")?)
        .await
        .ctx("connect the direct reference connection")?;
    for t in &targets {
        println!("== {}", t.name);
        let start = Instant::now();
        let mut conn = PgConnection::connect_with(&t.opts)
            .await
            .ctx(&format!("{}: connect", t.name))?;
        check_all(
            &mut conn,
            &mut reference,
            t.via_pgfan.then_some(metrics.as_str()),
        )
        .await
        .map_err(|e| format!("{}: {e}", t.name))?;
        conn.close().await.ctx("close")?;
        println!("== {}: ok ({:.1} s)", t.name, start.elapsed().as_secs_f64());
    }
    Ok(())
}

async fn check_all(
    conn: &mut PgConnection,
    direct: &mut PgConnection,
    metrics: Option<&str>,
) -> Res<()> {
    typed_results(conn).await?;
    println!("  typed results (binary) and binary parameters: ok");
    fan_out(conn, direct, metrics).await?;
    statement_cache(conn, direct).await?;
    println!("  statement cache (one named statement, 10 executions): ok");
    batch(conn, direct).await?;
    println!("  batch of statements in one simple query: ok");
    cursor(conn, direct).await?;
    copy(conn, direct).await?;
    rollback(conn, direct).await?;
    println!("  transaction rollback: ok");
    errors(conn).await?;
    println!("  SQLSTATE 22012 as DatabaseError, connection usable: ok");
    Ok(())
}

async fn typed_results(conn: &mut PgConnection) -> Res<()> {
    let sql = r#"SELECT true, 12::int2, -123456::int4, 9007199254740993::int8,
        '-12345.6780'::numeric, 1.5::float4, 0.1::float8, 'hé €"\'::text, 'var'::varchar(10),
        '\xdead00beef'::bytea, date '2026-02-03', time '04:05:06.789',
        timestamp '2026-02-03 04:05:06.789', timestamptz '2026-02-03 04:05:06.789+02',
        interval '1 year 2 mons 3 days 04:05:06.5', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid,
        '{"a": [1, 2.5, "x"]}'::json, '{"b": {"c": null}, "a": 1}'::jsonb,
        ARRAY[1, NULL, -3]::int4[], ARRAY['a', 'b,c', NULL, 'd"e']::text[], NULL::int4"#;
    let row = sqlx::query(sql)
        .fetch_one(&mut *conn)
        .await
        .ctx("typed query")?;
    let types: Vec<&str> = row.columns().iter().map(|c| c.type_info().name()).collect();
    same(
        "column types",
        types,
        vec![
            "BOOL",
            "INT2",
            "INT4",
            "INT8",
            "NUMERIC",
            "FLOAT4",
            "FLOAT8",
            "TEXT",
            "VARCHAR",
            "BYTEA",
            "DATE",
            "TIME",
            "TIMESTAMP",
            "TIMESTAMPTZ",
            "INTERVAL",
            "UUID",
            "JSON",
            "JSONB",
            "INT4[]",
            "TEXT[]",
            "INT4",
        ],
    )?;
    same("bool", get::<bool>(&row, 0)?, true)?;
    same("int2", get::<i16>(&row, 1)?, 12)?;
    same("int4", get::<i32>(&row, 2)?, -123456)?;
    same("int8", get::<i64>(&row, 3)?, 9007199254740993)?;
    // as text, so that the scale counts too
    same(
        "numeric",
        get::<Decimal>(&row, 4)?.to_string(),
        "-12345.6780".to_string(),
    )?;
    same("float4", get::<f32>(&row, 5)?, 1.5)?;
    same("float8", get::<f64>(&row, 6)?, 0.1)?;
    same("text", get::<String>(&row, 7)?, r#"hé €"\"#.to_string())?;
    same("varchar", get::<String>(&row, 8)?, "var".to_string())?;
    same(
        "bytea",
        get::<Vec<u8>>(&row, 9)?,
        vec![0xde, 0xad, 0x00, 0xbe, 0xef],
    )?;
    let date = NaiveDate::from_ymd_opt(2026, 2, 3).ok_or("bad date")?;
    let time = NaiveTime::from_hms_milli_opt(4, 5, 6, 789).ok_or("bad time")?;
    same("date", get::<NaiveDate>(&row, 10)?, date)?;
    same("time", get::<NaiveTime>(&row, 11)?, time)?;
    same(
        "timestamp",
        get::<NaiveDateTime>(&row, 12)?,
        date.and_time(time),
    )?;
    let tz: DateTime<Utc> = DateTime::parse_from_rfc3339("2026-02-03T04:05:06.789+02:00")
        .ctx("parse timestamptz")?
        .into();
    same("timestamptz", get::<DateTime<Utc>>(&row, 13)?, tz)?;
    let interval = PgInterval {
        months: 14,
        days: 3,
        microseconds: (4 * 3600 + 5 * 60 + 6) * 1_000_000 + 500_000,
    };
    same("interval", get::<PgInterval>(&row, 14)?, interval)?;
    let uuid = Uuid::parse_str("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").ctx("uuid")?;
    same("uuid", get::<Uuid>(&row, 15)?, uuid)?;
    let json = JsonValue::from_str(r#"{"a": [1, 2.5, "x"]}"#).ctx("json")?;
    same("json", get::<JsonValue>(&row, 16)?, json)?;
    let jsonb = JsonValue::from_str(r#"{"a": 1, "b": {"c": null}}"#).ctx("jsonb")?;
    same("jsonb", get::<JsonValue>(&row, 17)?, jsonb.clone())?;
    same(
        "int4[]",
        get::<Vec<Option<i32>>>(&row, 18)?,
        vec![Some(1), None, Some(-3)],
    )?;
    let texts = vec![
        Some("a".to_string()),
        Some("b,c".to_string()),
        None,
        Some("d\"e".to_string()),
    ];
    same(
        "text[]",
        get::<Vec<Option<String>>>(&row, 19)?,
        texts.clone(),
    )?;
    same("NULL", get::<Option<i32>>(&row, 20)?, None)?;

    // the same values as binary parameters, read back
    let numeric = Decimal::from_str_exact("-12345.6780").ctx("decimal")?;
    let row = sqlx::query("SELECT $1::int8, $2::numeric, $3::text, $4::bytea, $5::timestamptz, $6::uuid, $7::jsonb, $8::text[], $9::float8, $10::bool, $11::int4, $12::interval")
        .bind(-9007199254740993i64)
        .bind(numeric)
        .bind("hé €\"\\")
        .bind(vec![0u8, 1, 255])
        .bind(tz)
        .bind(uuid)
        .bind(&jsonb)
        .bind(&texts)
        .bind(-0.1f64)
        .bind(false)
        .bind(None::<i32>)
        .bind(interval)
        .fetch_one(&mut *conn)
        .await
        .ctx("typed query with parameters")?;
    same("int8 param", get::<i64>(&row, 0)?, -9007199254740993)?;
    same(
        "numeric param",
        get::<Decimal>(&row, 1)?.to_string(),
        numeric.to_string(),
    )?;
    same(
        "text param",
        get::<String>(&row, 2)?,
        "hé €\"\\".to_string(),
    )?;
    same("bytea param", get::<Vec<u8>>(&row, 3)?, vec![0, 1, 255])?;
    same("timestamptz param", get::<DateTime<Utc>>(&row, 4)?, tz)?;
    same("uuid param", get::<Uuid>(&row, 5)?, uuid)?;
    same("jsonb param", get::<JsonValue>(&row, 6)?, jsonb)?;
    same("text[] param", get::<Vec<Option<String>>>(&row, 7)?, texts)?;
    same("float8 param", get::<f64>(&row, 8)?, -0.1)?;
    same("bool param", get::<bool>(&row, 9)?, false)?;
    same("NULL param", get::<Option<i32>>(&row, 10)?, None)?;
    same("interval param", get::<PgInterval>(&row, 11)?, interval)?;
    Ok(())
}

const AGG: &str = "SELECT grp, count(*), sum(amount), min(label), max(created) FROM client_facts";
const AGG_END: &str = "GROUP BY grp ORDER BY grp";
const SCAN: &str = "SELECT id, amount, label FROM client_facts";

/// The aggregate rows as text (numeric as text keeps its scale).
async fn agg_rows(
    conn: &mut PgConnection,
    q: Query<'_, Postgres, PgArguments>,
) -> Res<Vec<String>> {
    let rows = q.fetch_all(conn).await.ctx("fan-out aggregate")?;
    rows.iter()
        .map(|r| {
            Ok(format!(
                "grp={} count={} sum={:?} min={} max={}",
                get::<i32>(r, 0)?,
                get::<i64>(r, 1)?,
                get::<Option<Decimal>>(r, 2)?.map(|d| d.to_string()),
                get::<String>(r, 3)?,
                get::<DateTime<Utc>>(r, 4)?,
            ))
        })
        .collect()
}

/// The scan rows as text, sorted by id (a scan has no order).
async fn scan_rows(
    conn: &mut PgConnection,
    q: Query<'_, Postgres, PgArguments>,
) -> Res<Vec<String>> {
    let rows = q.fetch_all(conn).await.ctx("fan-out scan")?;
    let mut rows = rows
        .iter()
        .map(|r| {
            let amount = get::<Option<Decimal>>(r, 1)?.map(|d| d.to_string());
            Ok((
                get::<i64>(r, 0)?,
                format!("{amount:?} {}", get::<String>(r, 2)?),
            ))
        })
        .collect::<Res<Vec<_>>>()?;
    rows.sort();
    Ok(rows
        .into_iter()
        .map(|(id, rest)| format!("id={id} {rest}"))
        .collect())
}

/// `EXPLAIN FANOUT` (simple protocol: pgfan answers it itself) must start with `FanOut:`.
async fn assert_fanout_route(conn: &mut PgConnection, sql: &str) -> Res<()> {
    let rows = sqlx::raw_sql(&format!("EXPLAIN FANOUT {sql}"))
        .fetch_all(&mut *conn)
        .await
        .ctx(&format!("EXPLAIN FANOUT {sql}"))?;
    let first: String = match rows.first() {
        Some(r) => get(r, 0)?,
        None => return Err(format!("EXPLAIN FANOUT {sql}: no rows")),
    };
    if !first.starts_with("FanOut:") {
        return Err(format!(
            "EXPLAIN FANOUT {sql}: first row is {first:?}, want `FanOut: ...`"
        ));
    }
    Ok(())
}

/// pgfan's `pgfan_queries_total{route="fanout"}` (0 before the first fan-out).
async fn fanout_counter(metrics_url: &str) -> Res<u64> {
    let rest = metrics_url
        .strip_prefix("http://")
        .ok_or("metrics URL is not http://")?;
    let (addr, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .ctx("connect to the metrics endpoint")?;
    let req = format!("GET /{path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ctx("metrics request")?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ctx("metrics response")?;
    let line = body
        .lines()
        .find(|l| l.starts_with("pgfan_queries_total{route=\"fanout\"}"));
    match line.and_then(|l| l.split_whitespace().last()) {
        Some(v) => v.parse().ctx(&format!("metrics value {v:?}")),
        None => Ok(0),
    }
}

async fn fan_out(
    conn: &mut PgConnection,
    direct: &mut PgConnection,
    metrics: Option<&str>,
) -> Res<()> {
    let agg = format!("{AGG} {AGG_END}");
    let agg_p = format!("{AGG} WHERE grp >= $1 {AGG_END}");
    let scan = format!("{SCAN} WHERE qty < 5");
    let scan_p = format!("{SCAN} WHERE qty < $1");
    if metrics.is_some() {
        assert_fanout_route(conn, &agg).await?;
        assert_fanout_route(conn, &agg_p.replace("$1", "3")).await?;
        assert_fanout_route(conn, &scan).await?;
        assert_fanout_route(conn, &scan_p.replace("$1", "7")).await?;
        println!("  EXPLAIN FANOUT says FanOut for the aggregate and the scan: ok");
    }
    let before = match metrics {
        Some(m) => fanout_counter(m).await?,
        None => 0,
    };
    let got = [
        agg_rows(conn, sqlx::query(&agg)).await?,
        agg_rows(conn, sqlx::query(&agg_p).bind(3i32)).await?,
        scan_rows(conn, sqlx::query(&scan)).await?,
        scan_rows(conn, sqlx::query(&scan_p).bind(7i32)).await?,
    ];
    if let Some(m) = metrics {
        let after = fanout_counter(m).await?;
        same(
            "pgfan_queries_total{route=\"fanout\"} growth over the 4 sqlx queries",
            after as i64 - before as i64,
            4,
        )?;
    }
    let want = [
        agg_rows(direct, sqlx::query(&agg)).await?,
        agg_rows(direct, sqlx::query(&agg_p).bind(3i32)).await?,
        scan_rows(direct, sqlx::query(&scan)).await?,
        scan_rows(direct, sqlx::query(&scan_p).bind(7i32)).await?,
    ];
    let names = [agg, agg_p + " ($1 = 3)", scan, scan_p + " ($1 = 7)"];
    for ((name, g), w) in names.iter().zip(&got).zip(&want) {
        if w.is_empty() {
            return Err(format!(
                "{name}: the direct result is empty, nothing to compare"
            ));
        }
        same_rows(name, g, w)?;
    }
    println!(
        "  fan-out aggregate ({} groups) and scan ({} rows), literal and $1, equal to direct: ok",
        got[0].len(),
        got[2].len()
    );
    Ok(())
}

async fn statement_cache(conn: &mut PgConnection, direct: &mut PgConnection) -> Res<()> {
    let sql = "SELECT name, weight, active FROM client_kinds WHERE id = $1";
    let cached = conn.cached_statements_size();
    for id in 0..10i32 {
        let row = |r: Option<PgRow>| -> Res<String> {
            let Some(r) = r else {
                return Ok("no row".into());
            };
            let weight = get::<Option<Decimal>>(&r, 1)?.map(|d| d.to_string());
            Ok(format!(
                "{} {weight:?} {}",
                get::<String>(&r, 0)?,
                get::<bool>(&r, 2)?
            ))
        };
        let got = row(sqlx::query(sql)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await
            .ctx(sql)?)?;
        let want = row(sqlx::query(sql)
            .bind(id)
            .fetch_optional(&mut *direct)
            .await
            .ctx(sql)?)?;
        same(&format!("{sql} with $1 = {id}"), got, want)?;
    }
    same(
        "sqlx cached statements after 10 runs of one query",
        conn.cached_statements_size(),
        cached + 1,
    )?;
    let names: Vec<String> =
        sqlx::query_scalar("SELECT name FROM pg_prepared_statements WHERE statement = $1")
            .bind(sql)
            .fetch_all(&mut *conn)
            .await
            .ctx("pg_prepared_statements")?;
    if names.len() != 1 || !names[0].starts_with("sqlx_s_") {
        return Err(format!(
            "server-side statements for {sql:?}: {names:?}, want one sqlx_s_N"
        ));
    }
    Ok(())
}

async fn batch(conn: &mut PgConnection, direct: &mut PgConnection) -> Res<()> {
    let sql = "CREATE TEMP TABLE sqlx_batch (id int, note text); \
        INSERT INTO sqlx_batch VALUES (1, 'a'), (2, 'b'); \
        INSERT INTO sqlx_batch VALUES (3, 'c'); \
        SELECT count(*), string_agg(note, ',' ORDER BY id) FROM sqlx_batch; \
        SELECT count(*), sum(amount)::text FROM client_facts WHERE grp = 1; \
        DROP TABLE sqlx_batch";
    let mut results = Vec::new();
    for item in sqlx::raw_sql(sql)
        .fetch_many(&mut *conn)
        .try_collect::<Vec<_>>()
        .await
        .ctx("batch")?
    {
        results.push(match item {
            Either::Left(done) => format!("done {}", done.rows_affected()),
            Either::Right(row) => {
                format!("row {} {}", get::<i64>(&row, 0)?, get::<String>(&row, 1)?)
            }
        });
    }
    let (count, sum): (i64, String) =
        sqlx::query_as("SELECT count(*), sum(amount)::text FROM client_facts WHERE grp = 1")
            .fetch_one(&mut *direct)
            .await
            .ctx("direct count")?;
    let want = [
        "done 0".to_string(),
        "done 2".into(),
        "done 1".into(),
        "row 3 a,b,c".into(),
        "done 1".into(),
        format!("row {count} {sum}"),
        "done 1".into(),
        "done 0".into(),
    ];
    same_rows("batch results", &results, &want)
}

async fn cursor(conn: &mut PgConnection, direct: &mut PgConnection) -> Res<()> {
    let (want_count, want_ids, want_amount): (i64, Decimal, Decimal) =
        sqlx::query_as("SELECT count(*), sum(id), sum(amount) FROM client_facts WHERE grp = 7")
            .fetch_one(&mut *direct)
            .await
            .ctx("direct cursor sums")?;
    let mut tx = conn.begin().await.ctx("begin")?;
    sqlx::query(
        "DECLARE sqlx_cur NO SCROLL CURSOR FOR SELECT id, amount FROM client_facts WHERE grp = 7",
    )
    .execute(&mut *tx)
    .await
    .ctx("DECLARE")?;
    let (mut count, mut ids, mut amount, mut fetches) = (0i64, Decimal::ZERO, Decimal::ZERO, 0);
    loop {
        let rows = sqlx::query("FETCH 1000 FROM sqlx_cur")
            .fetch_all(&mut *tx)
            .await
            .ctx("FETCH 1000")?;
        fetches += 1;
        if rows.len() > 1000 {
            return Err(format!("FETCH 1000 returned {} rows", rows.len()));
        }
        if rows.is_empty() {
            break;
        }
        for r in &rows {
            count += 1;
            ids += Decimal::from(get::<i64>(r, 0)?);
            amount += get::<Option<Decimal>>(r, 1)?.unwrap_or_default();
        }
    }
    sqlx::query("CLOSE sqlx_cur")
        .execute(&mut *tx)
        .await
        .ctx("CLOSE")?;
    tx.commit().await.ctx("commit")?;
    same("cursor row count", count, want_count)?;
    same("cursor sum(id)", ids, want_ids)?;
    same(
        "cursor sum(amount)",
        amount.to_string(),
        want_amount.to_string(),
    )?;
    same("FETCH round trips", fetches, (want_count + 999) / 1000 + 1)?;
    println!("  cursor: {count} rows in {fetches} FETCH 1000: ok");
    Ok(())
}

async fn copy_out(conn: &mut PgConnection, sql: &str) -> Res<Vec<u8>> {
    let chunks: Vec<_> = conn
        .copy_out_raw(sql)
        .await
        .ctx(sql)?
        .try_collect()
        .await
        .ctx(sql)?;
    Ok(chunks.concat())
}

async fn copy(conn: &mut PgConnection, direct: &mut PgConnection) -> Res<()> {
    sqlx::raw_sql("CREATE TEMP TABLE sqlx_copy (id int, name text, weight numeric(10,3))")
        .execute(&mut *conn)
        .await
        .ctx("create temp table")?;
    // canonical COPY text, so COPY out must give the same bytes back
    let data = "1\tone\t1.500\n2\ttab\\there\t\\N\n3\tünï €\t-0.001\n";
    let mut copy_in = conn
        .copy_in_raw("COPY sqlx_copy FROM STDIN")
        .await
        .ctx("COPY FROM STDIN")?;
    copy_in
        .send(&data.as_bytes()[..10])
        .await
        .ctx("COPY data")?;
    copy_in
        .send(&data.as_bytes()[10..])
        .await
        .ctx("COPY data")?;
    same(
        "COPY in rows",
        copy_in.finish().await.ctx("COPY finish")?,
        3,
    )?;
    let rows: Vec<(i32, String, Option<Decimal>)> =
        sqlx::query_as("SELECT id, name, weight FROM sqlx_copy ORDER BY id")
            .fetch_all(&mut *conn)
            .await
            .ctx("read copied rows")?;
    let rows: Vec<String> = rows
        .iter()
        .map(|(i, n, w)| format!("{i} {n:?} {:?}", w.map(|w| w.to_string())))
        .collect();
    let want = [
        r#"1 "one" Some("1.500")"#,
        r#"2 "tab\there" None"#,
        r#"3 "ünï €" Some("-0.001")"#,
    ];
    same_rows("copied rows", &rows, &want.map(String::from))?;
    let back = copy_out(conn, "COPY (SELECT * FROM sqlx_copy ORDER BY id) TO STDOUT").await?;
    same(
        "COPY out of the copied rows",
        String::from_utf8_lossy(&back).into_owned(),
        data.to_string(),
    )?;
    sqlx::raw_sql("DROP TABLE sqlx_copy")
        .execute(&mut *conn)
        .await
        .ctx("drop temp table")?;

    let big = "COPY (SELECT * FROM client_facts ORDER BY id) TO STDOUT";
    let got = copy_out(conn, big).await?;
    let want = copy_out(direct, big).await?;
    if got != want {
        let at = got
            .iter()
            .zip(&want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        return Err(format!(
            "{big}: {} bytes, direct {} bytes, first difference at byte {at}",
            got.len(),
            want.len()
        ));
    }
    let lines = got.iter().filter(|&&b| b == b'\n').count();
    println!("  COPY in (3 rows) and out, and COPY out of {lines} rows equal to direct: ok");
    Ok(())
}

async fn rollback(conn: &mut PgConnection, direct: &mut PgConnection) -> Res<()> {
    let count_sql = "SELECT count(*), sum(qty) FROM client_facts";
    let (count, qty): (i64, i64) = sqlx::query_as(count_sql)
        .fetch_one(&mut *direct)
        .await
        .ctx("direct count")?;
    let mut tx = conn.begin().await.ctx("begin")?;
    sqlx::query("INSERT INTO client_facts VALUES ($1, 3, 1.25, $2, 'rolled back', now())")
        .bind(900_000_001i64)
        .bind(5i32)
        .execute(&mut *tx)
        .await
        .ctx("insert in transaction")?;
    let inside: (i64, i64) = sqlx::query_as(count_sql)
        .fetch_one(&mut *tx)
        .await
        .ctx("count in transaction")?;
    same(
        "count(*), sum(qty) inside the transaction",
        inside,
        (count + 1, qty + 5),
    )?;
    tx.rollback().await.ctx("rollback")?;
    let after: (i64, i64) = sqlx::query_as(count_sql)
        .fetch_one(&mut *conn)
        .await
        .ctx("count after rollback")?;
    same("count(*), sum(qty) after rollback", after, (count, qty))?;
    let gone: Option<i64> = sqlx::query_scalar("SELECT id FROM client_facts WHERE id = $1")
        .bind(900_000_001i64)
        .fetch_optional(&mut *direct)
        .await
        .ctx("direct lookup")?;
    same("rolled-back row on the primary", gone, None)
}

fn sqlstate(what: &str, r: Result<impl Debug, sqlx::Error>) -> Res<String> {
    match r {
        Err(sqlx::Error::Database(e)) => Ok(e.code().map(|c| c.into_owned()).unwrap_or_default()),
        other => Err(format!("{what}: want a DatabaseError, got {other:?}")),
    }
}

async fn errors(conn: &mut PgConnection) -> Res<()> {
    let r = sqlx::query("SELECT 1/0").fetch_one(&mut *conn).await;
    same(
        "SQLSTATE of SELECT 1/0 (prepared)",
        sqlstate("SELECT 1/0", r)?,
        "22012".into(),
    )?;
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut *conn)
        .await
        .ctx("SELECT 1 after the error")?;
    same("SELECT 1 after the error", one, 1)?;
    let r = sqlx::raw_sql("SELECT 1/0").execute(&mut *conn).await;
    same(
        "SQLSTATE of SELECT 1/0 (simple)",
        sqlstate("SELECT 1/0", r)?,
        "22012".into(),
    )?;

    let mut tx = conn.begin().await.ctx("begin")?;
    let r = sqlx::query("SELECT 1/0").fetch_one(&mut *tx).await;
    same(
        "SQLSTATE of SELECT 1/0 in a transaction",
        sqlstate("SELECT 1/0", r)?,
        "22012".into(),
    )?;
    let r = sqlx::query("SELECT 1").fetch_one(&mut *tx).await;
    same(
        "SQLSTATE in the failed transaction",
        sqlstate("SELECT 1", r)?,
        "25P02".into(),
    )?;
    tx.rollback().await.ctx("rollback")?;
    let two: i32 = sqlx::query_scalar("SELECT $1 + 1")
        .bind(1i32)
        .fetch_one(&mut *conn)
        .await
        .ctx("after rollback")?;
    same("SELECT $1 + 1 after the failed transaction", two, 2)
}
