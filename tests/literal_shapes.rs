//! Statement texts that differ only in their literals share one parse in pgfan
//! (`src/plan/literals.rs`, `StatementCache`), and a shape whose template passes through
//! for any literal (a point lookup judged by the column's most frequent value) skips the
//! text's own planning. These tests check that sharing never changes an answer or a route.
//!
//! Table `shapes_t` (60k rows): `id` unique, `skew` indexed with 90 % of the rows on 0 and
//! the rest unique, `pad` text. The same shapes are sent with different literals, in the
//! simple protocol (the text path) and the extended protocol (Parse), in both orders: a
//! rare value first (a point lookup that passes through) and the common value first (most
//! of the table, which fans out). Each answer must equal the primary's, and the route
//! counters of pgfan's metrics must move exactly as the literal demands, so a template's
//! verdict that leaked to another literal fails the test.
//!
//! Run: `cargo test --test literal_shapes` (starts the cluster with `scripts/pg-cluster`).

mod common;

use common::{
    connect_pgfan, connect_primary, create_database, fanout_config_toml, samples, scrape,
    text_rows, Pgfan,
};
use tokio_postgres::Client;

const DB: &str = "pgfan_literal_shapes";

async fn setup() {
    create_database(DB).await;
    let c = connect_primary(DB).await;
    c.batch_execute(
        "DROP TABLE IF EXISTS shapes_t;
         CREATE TABLE shapes_t (id int PRIMARY KEY, skew int NOT NULL, pad text NOT NULL);
         INSERT INTO shapes_t
           SELECT g, CASE WHEN g % 10 = 0 THEN g ELSE 0 END, 'p' || (g % 97) || repeat('x', 60)
           FROM generate_series(1, 60000) g;
         CREATE INDEX shapes_t_skew ON shapes_t (skew);
         ANALYZE shapes_t;",
    )
    .await
    .expect("create shapes_t");
}

/// The rows of a simple-protocol query, as text.
async fn simple_rows(c: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    let msgs = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let mut rows = text_rows(&msgs);
    rows.sort();
    rows
}

/// The rows of an extended-protocol query (Parse of the text with its literals), as text.
async fn extended_rows(c: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    let stmt = c
        .prepare(sql)
        .await
        .unwrap_or_else(|e| panic!("prepare {sql}: {e}"));
    let rows = c
        .query(&stmt, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let mut out: Vec<Vec<Option<String>>> = rows
        .iter()
        .map(|r| {
            (0..r.len())
                .map(|i| {
                    r.try_get::<_, Option<i64>>(i)
                        .map(|v| v.map(|v| v.to_string()))
                        .or_else(|_| {
                            r.try_get::<_, Option<i32>>(i)
                                .map(|v| v.map(|v| v.to_string()))
                        })
                        .or_else(|_| r.try_get::<_, Option<String>>(i))
                        .unwrap_or_else(|e| panic!("{sql} column {i}: {e}"))
                })
                .collect()
        })
        .collect();
    out.sort();
    out
}

/// Fan-outs and point-lookup pass-throughs so far.
async fn routes(pgfan: &Pgfan) -> (f64, f64) {
    let s = samples(&scrape(pgfan).await);
    let get = |k: &str| s.get(k).copied().unwrap_or(0.0);
    (
        get("pgfan_queries_total{route=\"fanout\"}"),
        get("pgfan_passthrough_total{reason=\"point_lookup\"}"),
    )
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    FanOut,
    PointLookup,
}

async fn check(
    pgfan: &Pgfan,
    via: &Client,
    direct: &Client,
    sql: &str,
    extended: bool,
    expect: Expect,
) {
    let before = routes(pgfan).await;
    let (got, want) = if extended {
        (
            extended_rows(via, sql).await,
            extended_rows(direct, sql).await,
        )
    } else {
        (simple_rows(via, sql).await, simple_rows(direct, sql).await)
    };
    let after = routes(pgfan).await;
    assert_eq!(got, want, "answer of {sql} (extended: {extended})");
    let fanned = after.0 - before.0;
    let point = after.1 - before.1;
    match expect {
        Expect::FanOut => assert!(
            fanned == 1.0 && point == 0.0,
            "{sql} (extended: {extended}) should fan out: fan-outs +{fanned}, point lookups +{point}\n{}",
            pgfan.log_tail()
        ),
        Expect::PointLookup => assert!(
            fanned == 0.0 && point >= 1.0,
            "{sql} (extended: {extended}) should pass through as a point lookup: fan-outs +{fanned}, point lookups +{point}"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn literals_of_one_shape_keep_their_own_routes() {
    setup().await;
    let pgfan = Pgfan::start_with_config(&fanout_config_toml(), &[]);
    let direct = connect_primary(DB).await;
    let via = connect_pgfan(&pgfan, DB).await;

    let skew = |v: i64| format!("SELECT count(*), sum(id) FROM shapes_t WHERE skew = {v}");
    let by_id = |v: i64| format!("SELECT id, skew, pad FROM shapes_t WHERE id = {v}");
    let by_text = |p: &str| {
        format!("SELECT count(*), min(id) FROM shapes_t WHERE pad = '{p}' || repeat('x', 60)")
    };
    use Expect::{FanOut, PointLookup};
    for extended in [false, true] {
        // rare value first: the shape's template must not make the common value pass through
        let mut steps = vec![
            (skew(770), PointLookup),
            (skew(0), FanOut),
            (skew(1230), PointLookup),
            (skew(0), FanOut),
        ];
        // a unique column: every literal is a point lookup (the template's own verdict)
        steps.extend([1, 4711, 60000, 99999].map(|id| (by_id(id), PointLookup)));
        // string literals, with a quote inside one of them
        steps.extend(["p1", "p42", "it''s"].map(|p| (by_text(p), FanOut)));
        for (sql, expect) in &steps {
            check(&pgfan, &via, &direct, sql, extended, *expect).await;
        }
    }

    // the common value first, in a shape not seen before (a different select list)
    let skew2 = |v: i64| format!("SELECT sum(id) FROM shapes_t WHERE skew = {v}");
    for (sql, expect) in [
        (skew2(0), FanOut),
        (skew2(40), PointLookup),
        (skew2(0), FanOut),
    ] {
        check(&pgfan, &via, &direct, &sql, false, expect).await;
    }

    // a shape whose template does not parse (`varchar($1)`): each text is parsed itself
    for n in [5, 8] {
        let sql =
            format!("SELECT count(*) FROM shapes_t WHERE skew = 0 AND pad::varchar({n}) = 'p1xxx'");
        check(&pgfan, &via, &direct, &sql, false, FanOut).await;
    }

    // A session remembers the shape of its last simple query and the statement of its last
    // Bind that passed through; neither may outlive a catalog change made in the session:
    // without the primary key, the same shape and the same prepared statement fan out.
    let by_id_param = "SELECT id, skew, pad FROM shapes_t WHERE id = $1";
    let via_stmt = via.prepare(by_id_param).await.expect("prepare via pgfan");
    let direct_stmt = direct.prepare(by_id_param).await.expect("prepare direct");
    let bound = |id: i32, expect: Expect| {
        let (pgfan, via, direct) = (&pgfan, &via, &direct);
        let (via_stmt, direct_stmt) = (&via_stmt, &direct_stmt);
        async move {
            let before = routes(pgfan).await;
            let rows = |r: Vec<tokio_postgres::Row>| {
                r.iter()
                    .map(|r| {
                        (
                            r.get::<_, i32>(0),
                            r.get::<_, i32>(1),
                            r.get::<_, String>(2),
                        )
                    })
                    .collect::<Vec<_>>()
            };
            let got = rows(via.query(via_stmt, &[&id]).await.expect("bound via pgfan"));
            let want = rows(
                direct
                    .query(direct_stmt, &[&id])
                    .await
                    .expect("bound direct"),
            );
            assert_eq!(got, want, "{by_id_param} with {id}");
            let after = routes(pgfan).await;
            let fanned = after.0 - before.0;
            match expect {
                FanOut => assert_eq!(fanned, 1.0, "{by_id_param} with {id} should fan out"),
                PointLookup => {
                    assert_eq!(fanned, 0.0, "{by_id_param} with {id} should pass through")
                }
            }
        }
    };
    for id in [2, 3] {
        check(&pgfan, &via, &direct, &by_id(id.into()), false, PointLookup).await;
        bound(id, PointLookup).await;
    }
    via.batch_execute("ALTER TABLE shapes_t DROP CONSTRAINT shapes_t_pkey")
        .await
        .expect("drop the primary key through pgfan");
    check(&pgfan, &via, &direct, &by_id(5), false, FanOut).await;
    bound(6, FanOut).await;

    // EXPLAIN FANOUT answers for the text's own literal, not the shape's
    for (v, want) in [
        (0, "FanOut:"),
        (990, "PassThrough: equality on indexed column skew"),
    ] {
        let rows = simple_rows(&via, &format!("EXPLAIN FANOUT {}", skew(v))).await;
        let first = rows
            .iter()
            .filter_map(|r| r.first().cloned().flatten())
            .find(|l| l.starts_with("FanOut:") || l.starts_with("PassThrough:"))
            .unwrap_or_default();
        assert!(
            first.starts_with(want),
            "EXPLAIN FANOUT skew = {v}: {rows:?}"
        );
    }
}
