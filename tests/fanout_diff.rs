//! Fan-out differential suite (DESIGN.md "Testing").
//!
//! One database holds `facts` (60k rows: skewed keys, NULLs, NaN/±Infinity, a text column
//! with a non-C collation, timestamps across both 2024 DST changes of Europe/Berlin),
//! `skewed` (30k rows, 85 % on one key), `empty_t` and `one_row`. Every corpus query runs
//! directly on the primary and through pgfan (started with a `[fanout]` section), in the
//! simple protocol, the extended protocol with text results and the extended protocol with
//! binary results. Compared: the message sequence (without DataRows), column names, type
//! OIDs, typmods (the whole RowDescription), data rows byte for byte (as sorted multisets
//! when the query has no top-level ORDER BY), command tags, and errors (severity, SQLSTATE,
//! message). Queries flagged `tol` allow a relative difference of 1e-12 in float4/float8
//! columns, because float sums depend on the order of addition.
//!
//! Each query also says which route it must take; `EXPLAIN FANOUT <query>` through pgfan
//! must start with `FanOut: <n> fragments` (n > 1) or `PassThrough:` accordingly, so that a
//! silent fall-back to pass-through fails the test.
//!
//! All failures are collected and reported in one assertion at the end; the full report is
//! also written to `target/test-logs/fanout-diff.txt`. The running, comparing and reporting
//! machinery is shared with `fanout_joins` in `tests/common/diff.rs`.
//!
//! Run: `cargo test --test fanout_diff -- --nocapture` (starts the cluster with
//! `scripts/pg-cluster start`). With `PGFAN_TEST_PROXY=direct` no pgfan runs: the compared
//! session is a second direct session with forced parallel plans (partial aggregation in
//! parallel workers, rows in another order), and the route assertions are skipped. That
//! checks the suite itself: the corpus annotations, the ORDER BY determinism of the
//! queries and the float tolerance flags.

mod common;

use std::time::Instant;

use common::diff::{
    any, check_corpus_basics, compare, fan, finish, has_top_level_order_by, inline_params, pass,
    pick_collation, route_ok, run_all, summarize, Expect, Query, Route, Suite, FLOAT8_OID,
};
use common::wire::{ErrorInfo, FieldDesc, Msg, Oid, Raw, Transcript, WireClient};
use common::{connect_primary, create_database, fanout_config_toml, Pgfan};

const DB: &str = "pgfan_fanout_diff";

// ---------------------------------------------------------------------------------------
// Corpus
// ---------------------------------------------------------------------------------------

/// Aggregates of the generated part: SQL and whether the result is a float computed by
/// summing floats (order-dependent in the last bits).
const AGGS: &[(&str, bool)] = &[
    ("count(*)", false),
    ("count(i8)", false),
    ("count(t)", false),
    ("sum(i2)", false),
    ("sum(i4)", false),
    ("sum(i8)", false),
    ("sum(n)", false),
    ("sum(f8)", true),
    ("sum(f4::float8)", true),
    ("min(i2)", false),
    ("max(i4)", false),
    ("min(i8)", false),
    ("max(n)", false),
    ("min(f8)", false),
    ("max(f8)", false),
    ("min(f4)", false),
    ("max(t)", false),
    ("min(t)", false),
    ("min(d)", false),
    ("max(ts)", false),
    ("avg(i2)", false),
    ("avg(i4)", false),
    ("avg(i8)", false),
    ("avg(n)", false),
    ("avg(f8)", true),
    ("avg(f4)", true),
    ("bool_and(b)", false),
    ("bool_or(b)", false),
    ("every(b)", false),
    ("stddev(i4)", false),
    ("stddev_samp(n)", false),
    ("stddev_pop(i8)", false),
    ("variance(i2)", false),
    ("var_samp(n)", false),
    ("var_pop(i4)", false),
    ("stddev(f8)", true),
    ("stddev_pop(f4)", true),
    ("variance(f8)", true),
    ("var_samp(f4)", true),
    ("var_pop(f8)", true),
    ("stddev_samp(f8)", true),
    ("sum(i4::numeric / 7)", false),
];

/// WHERE clauses of the generated part (`WHERE g100 < 0` gives empty input; g100 has no
/// index, so the query still fans out: an empty range of an indexed column is a selective
/// query, and those pass through by design, invariant 6).
const WHERES: &[&str] = &[
    "",
    "WHERE k = 1",
    "WHERE k > 1 AND grp IN (3, 6, 9)",
    "WHERE d >= '2024-03-01' AND d < '2024-07-01'",
    "WHERE g100 < 0",
    "WHERE ts >= '2024-03-30 12:00+01' AND ts < '2024-11-01 00:00+01'",
    "WHERE i8 < 0 OR b IS NULL",
];

/// FILTER (WHERE ...) predicates of the generated part.
const FILTERS: &[&str] = &["grp < 5", "b", "k <> 1 AND i4 > 0", "id < 0", "t >= 'b'"];

/// Group keys of the generated part and their number of output columns.
const KEYS: &[(&str, usize)] = &[
    ("grp", 1),
    ("k", 1),
    ("b", 1),
    ("d", 1),
    ("date_trunc('day', ts)", 1),
    ("k % 7", 1),
    ("g100, b", 2),
    ("t", 1),
    ("i8 < 0", 1),
    ("extract(month FROM d)", 1),
    ("i2 / 1000", 1),
];

fn positions(n: usize, suffix: &str) -> String {
    (1..=n)
        .map(|i| format!("{i}{suffix}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn generated() -> Vec<Query> {
    let mut c = Vec::new();
    let na = AGGS.len();

    // Every aggregate alone over the whole table (with a rotating WHERE), and with FILTER.
    for (i, (agg, tol)) in AGGS.iter().enumerate() {
        let w = WHERES[i % WHERES.len()];
        c.push(fan(format!("SELECT {agg} FROM facts {w}")).tol_if(*tol));
        let f = FILTERS[i % FILTERS.len()];
        let w = WHERES[(i + 3) % WHERES.len()];
        c.push(fan(format!("SELECT {agg} FILTER (WHERE {f}) FROM facts {w}")).tol_if(*tol));
    }

    // GROUP BY every key with two bundles of six aggregates (no ORDER BY: multisets).
    let bundles: Vec<&[(&str, bool)]> = AGGS.chunks(6).collect();
    for (j, (key, _)) in KEYS.iter().enumerate() {
        for (b, w) in [
            (j % bundles.len(), ""),
            (
                (j + 3) % bundles.len(),
                WHERES[(j % (WHERES.len() - 1)) + 1],
            ),
        ] {
            let bundle = bundles[b];
            let list: Vec<&str> = bundle.iter().map(|(a, _)| *a).collect();
            let tol = bundle.iter().any(|(_, t)| *t);
            c.push(
                fan(format!(
                    "SELECT {key}, {} FROM facts {w} GROUP BY {key}",
                    list.join(", ")
                ))
                .tol_if(tol),
            );
        }
    }

    // GROUP BY with ORDER BY (position, DESC, NULLS FIRST/LAST, aggregate alias with the
    // key as tiebreaker), LIMIT and OFFSET; and ORDER BY without LIMIT.
    for (j, (key, ncols)) in KEYS.iter().enumerate() {
        let (a1, t1) = AGGS[(j * 5) % na];
        let (a2, t2) = AGGS[(j * 5 + 2) % na];
        let f = FILTERS[j % FILTERS.len()];
        let order = match j % 4 {
            0 => positions(*ncols, " NULLS FIRST"),
            1 => positions(*ncols, " DESC NULLS LAST"),
            2 => format!("c DESC, {}", positions(*ncols, "")),
            _ => positions(*ncols, " DESC"),
        };
        let limit = [5, 10, 3, 20][j % 4];
        let offset = [0, 2, 1, 7][(j / 2) % 4];
        c.push(
            fan(format!(
                "SELECT {key}, count(*) AS c, {a1}, {a2} FILTER (WHERE {f}) FROM facts \
                 GROUP BY {key} ORDER BY {order} LIMIT {limit} OFFSET {offset}"
            ))
            .tol_if(t1 || t2),
        );
        let (a3, t3) = AGGS[(j * 7 + 3) % na];
        c.push(
            fan(format!(
                "SELECT {key}, {a3} AS v FROM facts GROUP BY {key} ORDER BY {}",
                positions(*ncols, "")
            ))
            .tol_if(t3),
        );
    }

    // HAVING, also on aggregates that are not in the select list.
    for (j, (key, _)) in KEYS.iter().enumerate() {
        let (a1, t1) = AGGS[(j * 3 + 1) % na];
        let (a2, t2) = AGGS[(j * 11 + 4) % na];
        let th = [1, 100, 300, 10][j % 4];
        let extra = match j % 3 {
            0 => "",
            1 => " AND max(i4) > 0",
            _ => " OR bool_or(b) IS NULL",
        };
        c.push(
            fan(format!(
                "SELECT {key}, {a1}, {a2} FROM facts GROUP BY {key} \
                 HAVING count(*) > {th}{extra}"
            ))
            .tol_if(t1 || t2),
        );
    }

    // Plain scans, unordered and with ORDER BY ... LIMIT (id as the last key).
    let preds = [
        "k > 1000",
        "grp = 3 AND b",
        "id % 997 = 0",
        "t < 'b' AND g100 = 7",
        // date_trunc() keeps this from being an index range (a selective one would pass through)
        "date_trunc('second', ts) >= '2024-10-27 00:00+02' AND date_trunc('second', ts) < '2024-10-27 06:00+01'",
        "f8 IS NULL OR f8 = 'NaN' OR f8 IN ('Infinity', '-Infinity')",
        "i8 IS NULL",
        "n < -70000",
    ];
    let cols = [
        "id, k, t",
        "*",
        "id, f8, f4, n",
        "id, ts, d, b",
        "id, i2, i4, i8",
        "id * 2 AS twice, upper(t) AS up, i4::numeric / 3 AS third",
    ];
    let orders = [
        ("t", "t"),
        ("t", "t DESC"),
        ("i8", "i8 NULLS FIRST"),
        ("f8", "f8 DESC NULLS LAST"),
        ("ts", "ts"),
        ("n", "n DESC"),
        ("d, k", "d DESC, k"),
        ("i4", "i4"),
    ];
    for (i, p) in preds.iter().enumerate() {
        c.push(fan(format!(
            "SELECT {} FROM facts WHERE {p}",
            cols[i % cols.len()]
        )));
        let (sel, ord) = orders[i % orders.len()];
        c.push(fan(format!(
            "SELECT id, {sel}, grp FROM facts WHERE NOT ({p}) ORDER BY {ord}, id LIMIT 7 OFFSET {}",
            i * 3
        )));
    }

    // Ordered scans without LIMIT: a k-way merge of sorted fragments on keys pgfan
    // compares itself (integers, numeric, floats with NaN/Infinity, dates and times, bool,
    // text under "C"), with id as the last key so the order is total.
    let keys = [
        "i2",
        "i4 DESC",
        "i8 NULLS FIRST",
        "n",
        "n DESC NULLS LAST",
        "f8",
        "f8 DESC",
        "f4 NULLS FIRST",
        "ts",
        "ts DESC",
        "d DESC NULLS LAST",
        "b",
        "b DESC",
        "k",
        "grp NULLS FIRST",
        "t COLLATE \"C\"",
        "t COLLATE \"C\" DESC",
    ];
    let filters = [
        "id % 37 = 0",
        "k % 11 = 3 AND i4 IS NOT NULL",
        "g100 < 4",
        "f8 IS NULL OR n < 0 AND id % 5 = 0",
    ];
    for (i, key) in keys.iter().enumerate() {
        let filter = filters[i % filters.len()];
        let col = key.split_whitespace().next().unwrap_or("id");
        c.push(
            fan(format!(
                "SELECT id, {col}, t FROM facts WHERE {filter} ORDER BY {key}, id"
            ))
            .merge("ordered merge"),
        );
    }
    c.push(
        fan("SELECT * FROM facts WHERE id % 101 = 0 ORDER BY ts DESC, id").merge("ordered merge"),
    );
    c.push(
        fan("SELECT id AS x, n FROM facts WHERE id % 53 = 0 ORDER BY x DESC")
            .merge("ordered merge"),
    );
    c.push(
        fan("SELECT n, id FROM facts WHERE id % 53 = 0 ORDER BY 1, 2 OFFSET 40")
            .merge("ordered merge"),
    );
    c.push(
        fan("SELECT id, f8 FROM facts WHERE id % 7 = 0 ORDER BY f8 DESC NULLS LAST, id LIMIT 50 OFFSET 20")
            .merge("ordered merge"),
    );
    c.push(fan("SELECT id, t FROM facts WHERE id % 7 = 0 ORDER BY t, id LIMIT 30").merge("top-N"));
    // Complete groups: split on an indexed GROUP BY column, so DISTINCT, ordered and
    // ordered-set aggregates (which have no partial form) fan out exactly.
    let complete = "split index range on";
    c.push(
        fan(
            "SELECT k, count(DISTINCT grp), count(DISTINCT t), sum(DISTINCT i2) FROM facts \
             GROUP BY k ORDER BY k",
        )
        .merge(complete),
    );
    c.push(
        fan(
            "SELECT k, string_agg(t, '|' ORDER BY id), array_agg(i4 ORDER BY id DESC) \
             FROM facts WHERE g100 < 30 GROUP BY k",
        )
        .merge(complete),
    );
    c.push(
        fan(
            "SELECT d, percentile_cont(0.5) WITHIN GROUP (ORDER BY i4), \
             percentile_disc(0.9) WITHIN GROUP (ORDER BY n), mode() WITHIN GROUP (ORDER BY grp), \
             count(*) FILTER (WHERE b) FROM facts GROUP BY d ORDER BY d DESC LIMIT 40 OFFSET 5",
        )
        .merge(complete),
    );
    c.push(
        fan(
            "SELECT i4 AS key, count(DISTINCT k) AS kinds, avg(n) FROM facts \
             WHERE i4 > -20000 GROUP BY key HAVING count(*) > 1 ORDER BY kinds DESC, key LIMIT 25",
        )
        .merge(complete),
    );
    c.push(
        fan(
            "SELECT ts, count(DISTINCT grp), min(t) FROM facts GROUP BY ts ORDER BY ts NULLS FIRST",
        )
        .merge(complete),
    );
    c.push(fan("SELECT k, count(*) AS c, jsonb_agg(id ORDER BY id) FROM facts WHERE id % 13 = 0 GROUP BY 1").merge(complete));
    // nothing keeps a group within one fragment: a DISTINCT aggregate's argument becomes
    // one more fragment key and the combine deduplicates
    c.push(fan("SELECT grp, count(DISTINCT k) FROM facts GROUP BY grp").merge("combine"));
    c.push(fan("SELECT count(DISTINCT k) FROM facts").merge("combine"));
    c.push(pass("SELECT k, string_agg(t, ',') FROM facts GROUP BY k"));
    c.push(fan("SELECT DISTINCT k, count(DISTINCT grp) FROM facts GROUP BY k").merge("combine"));
    // text under the database's (non-C) collation: pgfan cannot compare it, no LIMIT
    c.push(pass(
        "SELECT id, t FROM facts WHERE id % 7 = 0 ORDER BY t, id",
    ));
    c.push(pass(
        "SELECT id, k FROM facts WHERE id % 7 = 0 ORDER BY k % 10, id",
    ));
    c
}

fn handwritten() -> Vec<Query> {
    vec![
        // --- empty input ------------------------------------------------------------------
        fan("SELECT count(*), count(i4), sum(i4), sum(i8), sum(n), avg(n), min(t), max(ts), \
             bool_and(b), bool_or(b), stddev(i4), variance(n) FROM facts WHERE g100 < 0"),
        fan("SELECT grp, count(*) FROM facts WHERE g100 < 0 GROUP BY grp"),
        fan("SELECT count(*) FROM facts WHERE g100 < 0 HAVING count(*) > 0"),
        // selective ranges of indexed columns pass through (invariant 6)
        pass("SELECT count(*) FROM facts WHERE id < 0"),
        fan("SELECT count(*) FROM facts HAVING count(*) > 0"),
        pass("SELECT sum(f8), avg(f8), stddev(f8) FROM facts WHERE k < 0").tol(),
        fan("SELECT id, t FROM facts WHERE false"),
        fan("SELECT count(*), sum(i4) FROM facts WHERE i4 IS NULL AND i4 > 0"),
        // --- result types and numeric scales -------------------------------------------------
        fan("SELECT avg(i2), avg(i4), avg(i8), avg(n) FROM facts WHERE grp = 3"),
        fan("SELECT grp, avg(i4::numeric / 7), sum(i4::numeric / 7), avg(n * 3) FROM facts \
             GROUP BY grp"),
        fan("SELECT avg(n)::numeric(20,3), round(avg(i4), 2) FROM facts"),
        pass("SELECT k, avg(i8) FROM facts WHERE k BETWEEN 2 AND 60 GROUP BY k"),
        fan("SELECT sum(i2) AS s2, sum(i4) AS s4, sum(i8) AS s8, sum(n) AS sn FROM facts"),
        pass("SELECT sum(i4) FROM facts WHERE i4 > 2000000000"),
        fan("SELECT sum(i4) FROM facts WHERE i4 + 0 > 2000000000"),
        fan("SELECT sum(i8), avg(i8) FROM facts WHERE i8 > 9000000000000000000"),
        fan("SELECT count(*)::int4, count(*)::numeric FROM facts"),
        // --- overflow -------------------------------------------------------------------------
        fan("SELECT sum(i4)::int2 FROM facts").err("22003"),
        fan("SELECT count(*)::int2 FROM facts").err("22003"),
        fan("SELECT grp, max(i4)::int2 FROM facts GROUP BY grp").err("22003"),
        fan("SELECT sum(i8 * 1000) FROM facts").err("22003"),
        pass("SELECT id, i4 * 1000 FROM facts WHERE i4 > 2000000000").err("22003"),
        fan("SELECT id, i4 * 1000 FROM facts WHERE i4 + 0 > 2000000000").err("22003"),
        fan("SELECT sum(i4 * 2) FROM facts").err("22003"),
        // --- division by zero -------------------------------------------------------------------
        fan("SELECT sum(i4) / (count(*) - count(*)) FROM facts").err("22012"),
        fan("SELECT grp, sum(i4) / (min(g100) - min(g100)) FROM facts GROUP BY grp").err("22012"),
        fan("SELECT id, 1 / (k - k) FROM facts WHERE k = 1").err("22012"),
        fan("SELECT sum(1 / (id - 777)) FROM facts").err("22012"),
        fan("SELECT avg(n) / 0 FROM facts").err("22012"),
        fan("SELECT sum(f8) FILTER (WHERE id > 100) / 0 FROM facts").err("22012"),
        // NaN / 0 is NaN, not an error
        fan("SELECT sum(f8) / 0 FROM facts").tol(),
        fan("SELECT count(*) FILTER (WHERE 1 / (id - 5) > 0) FROM facts").err("22012"),
        fan("SELECT grp, sum(i4) / nullif(count(i4) - count(i4), 0) FROM facts GROUP BY grp"),
        // --- the collated text column -------------------------------------------------------
        fan("SELECT min(t), max(t) FROM facts"),
        fan("SELECT grp, min(t), max(t) FROM facts GROUP BY grp"),
        fan("SELECT min(t COLLATE \"C\"), max(t COLLATE \"C\") FROM facts"),
        fan("SELECT t, count(*) FROM facts GROUP BY t ORDER BY t LIMIT 12"),
        fan("SELECT t, count(*) FROM facts GROUP BY t ORDER BY t DESC NULLS LAST LIMIT 12 OFFSET 5"),
        fan("SELECT id, t FROM facts WHERE t IS NOT NULL ORDER BY t, id LIMIT 20"),
        fan("SELECT id, t COLLATE \"C\" AS tc FROM facts ORDER BY tc DESC, id LIMIT 20"),
        fan("SELECT DISTINCT t FROM facts WHERE g100 < 30 ORDER BY t NULLS FIRST LIMIT 15"),
        fan("SELECT upper(t) AS u, count(*) FROM facts GROUP BY u ORDER BY u NULLS FIRST LIMIT 10"),
        fan("SELECT count(*) FROM facts WHERE t BETWEEN 'apple' AND 'banana'"),
        // --- NaN and infinities ---------------------------------------------------------------
        fan("SELECT min(f8), max(f8), count(f8) FROM facts"),
        fan("SELECT grp, min(f8), max(f8), sum(f8), avg(f8) FROM facts WHERE id < 1000 \
             GROUP BY grp")
        .tol(),
        fan("SELECT sum(f8), avg(f8), stddev(f8), var_pop(f8) FROM facts WHERE id > 100").tol(),
        fan("SELECT sum(f8), avg(f8) FROM facts").tol(),
        fan("SELECT id, f8 FROM facts WHERE f8 = 'NaN' OR f8 = 'Infinity' OR f8 = '-Infinity'"),
        fan("SELECT id, f8 FROM facts ORDER BY f8 DESC NULLS LAST, id LIMIT 6"),
        fan("SELECT id, f8 FROM facts WHERE id < 200 ORDER BY f8 NULLS FIRST, id LIMIT 8"),
        fan("SELECT f8, count(*) FROM facts WHERE id < 100 GROUP BY f8"),
        fan("SELECT g100, sum(f8) AS s FROM facts WHERE g100 IN (11, 12, 13, 42, 50) \
             GROUP BY g100")
        .tol(),
        fan("SELECT grp, sum(f8) AS s FROM facts GROUP BY grp ORDER BY s DESC, grp").tol(),
        // --- NULL group keys ----------------------------------------------------------------------
        fan("SELECT grp, count(*), count(grp) FROM facts GROUP BY grp ORDER BY grp NULLS FIRST"),
        fan("SELECT b, count(*), sum(i4) FROM facts GROUP BY b ORDER BY b DESC NULLS LAST"),
        fan("SELECT grp, b, count(*) FROM facts GROUP BY grp, b \
             ORDER BY grp NULLS LAST, b NULLS FIRST"),
        fan("SELECT i8 IS NULL AS missing, count(*) FROM facts GROUP BY 1 ORDER BY 1"),
        // --- GROUP BY expressions (TimeZone Europe/Berlin: 23- and 25-hour days) -----------
        fan("SELECT date_trunc('day', ts) AS day, count(*), min(ts), max(ts) FROM facts \
             WHERE ts >= '2024-03-30' AND ts < '2024-04-02' GROUP BY day ORDER BY day"),
        fan("SELECT date_trunc('hour', ts) AS h, count(*) FROM facts \
             WHERE date_trunc('second', ts) >= '2024-10-26 22:00+00' \
             AND date_trunc('second', ts) < '2024-10-27 04:00+00' \
             GROUP BY h ORDER BY h"),
        fan("SELECT date_trunc('day', ts) AS day, count(*) FROM facts GROUP BY 1"),
        fan("SELECT k % 7 AS m, count(*), sum(i8) FROM facts GROUP BY m ORDER BY m"),
        fan("SELECT extract(isodow FROM d) AS dow, count(*), avg(i4) FROM facts \
             GROUP BY 1 ORDER BY 1 DESC"),
        fan("SELECT date_trunc('month', d)::date AS month, count(*) FROM facts \
             GROUP BY month ORDER BY month LIMIT 5 OFFSET 2"),
        fan("SELECT id % 20000 AS bucket, count(*), sum(i8), max(t) FROM facts GROUP BY bucket"),
        fan("SELECT (i4 > 0) AND b AS flag, count(*) FROM facts GROUP BY 1"),
        fan("SELECT to_char(ts, 'YYYY-MM') AS ym, count(*) FROM facts \
             GROUP BY ym ORDER BY ym NULLS FIRST"),
        // --- HAVING -----------------------------------------------------------------------------
        fan("SELECT grp, count(*) FROM facts GROUP BY grp HAVING count(*) > 5900"),
        fan("SELECT k, count(*), sum(i4) FROM facts GROUP BY k \
             HAVING sum(i4) > 1000000 AND count(*) > 2"),
        fan("SELECT grp FROM facts GROUP BY grp HAVING bool_or(b) AND max(i4) > 0"),
        fan("SELECT t, count(*) FROM facts GROUP BY t HAVING min(t) < 'b' AND count(*) > 10"),
        fan("SELECT grp, avg(n) FROM facts GROUP BY grp HAVING avg(n) > 0 \
             ORDER BY 2 DESC, 1 LIMIT 3"),
        // --- expressions over aggregates ---------------------------------------------------------
        fan("SELECT sum(i4)::numeric / sum(i2) AS ratio FROM facts"),
        fan("SELECT 100.0 * count(*) FILTER (WHERE b) / count(*) AS pct_true, \
             count(*) FILTER (WHERE b IS NULL) AS nulls FROM facts"),
        fan("SELECT grp, 100.0 * count(*) FILTER (WHERE k = 1) / count(*) AS hot_pct \
             FROM facts GROUP BY grp ORDER BY grp NULLS LAST"),
        fan("SELECT max(i4) - min(i4) AS spread, coalesce(sum(i8), 0) AS s, count(*) + 1 AS c1 \
             FROM facts WHERE k > 5"),
        fan("SELECT grp, sum(f8) / count(f8) AS mean, avg(f8) AS avg FROM facts WHERE id > 100 \
             GROUP BY grp")
        .tol(),
        fan("SELECT stddev(i4) / avg(i4) AS cv, sqrt(var_pop(n)) AS sd FROM facts"),
        fan("SELECT round(avg(n), 3) AS a, trunc(sum(n) / 1000) AS s FROM facts GROUP BY g100 % 4"),
        fan("SELECT count(*) AS \"Count\", sum(i4) AS \"sum of i4\", count(1) FROM facts"),
        fan("SELECT sum(i4) FILTER (WHERE id < 0) AS none, count(*) FILTER (WHERE false) AS zero, \
             bool_and(b) FILTER (WHERE b IS NULL) AS all_null FROM facts"),
        fan("SELECT grp, count(*) * 2 AS dbl, sum(i4) + sum(i2) AS combined, \
             max(d) - min(d) AS days FROM facts GROUP BY grp"),
        // --- ORDER BY / LIMIT / OFFSET ----------------------------------------------------------------
        fan("SELECT k, count(*) AS c FROM facts GROUP BY k ORDER BY c DESC, k LIMIT 10"),
        fan("SELECT k, count(*) AS c FROM facts GROUP BY k ORDER BY c, k DESC LIMIT 10 OFFSET 100"),
        fan("SELECT grp AS g, count(*) FROM facts GROUP BY g ORDER BY g DESC NULLS FIRST LIMIT 4"),
        fan("SELECT grp, sum(i4) AS s FROM facts GROUP BY grp ORDER BY 2 DESC NULLS LAST, 1 OFFSET 3"),
        fan("SELECT grp, count(*) FROM facts GROUP BY grp ORDER BY grp LIMIT 0"),
        fan("SELECT d, count(*) FROM facts GROUP BY d ORDER BY d DESC LIMIT 5 OFFSET 395"),
        fan("SELECT d, count(*) FROM facts GROUP BY d ORDER BY d OFFSET 398"),
        fan("SELECT id, i4 FROM facts WHERE k = 1 ORDER BY i4 DESC NULLS LAST, id LIMIT 15"),
        fan("SELECT id, i8 FROM facts ORDER BY i8 NULLS FIRST, id LIMIT 10"),
        fan("SELECT id, n FROM facts WHERE grp = 4 ORDER BY n DESC, id LIMIT 10 OFFSET 20"),
        fan("SELECT id, ts FROM facts ORDER BY ts DESC NULLS LAST, id LIMIT 10"),
        fan("SELECT id, d, k FROM facts WHERE k > 1 ORDER BY d, k DESC, id LIMIT 30 OFFSET 1000"),
        fan("SELECT id AS ident, t AS label FROM facts WHERE g100 = 7 \
             ORDER BY label DESC NULLS FIRST, ident DESC LIMIT 12"),
        fan("SELECT id FROM facts ORDER BY id DESC LIMIT 3"),
        fan("SELECT id, k FROM facts ORDER BY id LIMIT 5 OFFSET 59990"),
        fan("SELECT k, count(*) FROM facts GROUP BY k ORDER BY k"),
        any("SELECT id, t FROM facts WHERE k = 42 ORDER BY t, id"),
        any("SELECT id FROM facts WHERE i4 > 2000000000 ORDER BY id DESC"),
        any("SELECT id, b FROM facts WHERE b IS NULL ORDER BY id LIMIT ALL"),
        // --- DISTINCT -------------------------------------------------------------------------------
        fan("SELECT DISTINCT grp FROM facts"),
        fan("SELECT DISTINCT k % 7, b FROM facts WHERE k > 1"),
        fan("SELECT DISTINCT d FROM facts ORDER BY d DESC LIMIT 5 OFFSET 3"),
        fan("SELECT DISTINCT t FROM facts"),
        fan("SELECT DISTINCT date_trunc('day', ts) AS day FROM facts WHERE ts < '2024-04-05' \
             ORDER BY day LIMIT 3"),
        any("SELECT DISTINCT b FROM facts ORDER BY b NULLS FIRST"),
        any("SELECT DISTINCT grp, count(*) FROM facts GROUP BY grp, k"),
        // --- plain scans ------------------------------------------------------------------------------
        pass("SELECT id, k, t, grp FROM facts WHERE k BETWEEN 7 AND 56 AND t IS NULL"),
        fan("SELECT id, ts, d FROM facts \
             WHERE date_trunc('second', ts) >= '2024-03-31 00:00+01' \
             AND date_trunc('second', ts) < '2024-03-31 06:00+02'"),
        fan("SELECT id, i8, n FROM facts WHERE i8 IS NULL OR n IS NULL"),
        fan("SELECT id, k FROM facts WHERE id % 2 = 0"),
        fan("SELECT 1 AS one FROM facts WHERE k = 5"),
        fan("SELECT id, f4, f8 FROM facts WHERE f4 > 140"),
        // --- $n parameters (inlined for the simple protocol) ----------------------------------------
        fan("SELECT count(*), sum(i4) FROM facts WHERE k = $1").params(&[Some("1")]),
        fan("SELECT grp, avg(n), count(*) FROM facts WHERE d >= $1 AND d < $2 GROUP BY grp")
            .params(&[Some("2024-03-01"), Some("2024-04-01")]),
        fan("SELECT id, t FROM facts WHERE grp = $1 ORDER BY t, id LIMIT $2")
            .params(&[Some("3"), Some("7")]),
        fan("SELECT sum(i8) FILTER (WHERE i4 > $1), count(*) FILTER (WHERE t < $2) FROM facts")
            .params(&[Some("0"), Some("banana")]),
        fan("SELECT count(*) FROM facts WHERE i8 = $1").params(&[None]),
        fan("SELECT k, count(*) FROM facts WHERE k BETWEEN $1 AND $2 GROUP BY k \
             ORDER BY k DESC LIMIT $3 OFFSET $4")
        .params(&[Some("2"), Some("200"), Some("5"), Some("2")]),
        fan("SELECT id, ts FROM facts \
             WHERE ts >= $1::timestamptz AND ts < $1::timestamptz + interval '2 hours'")
        .params(&[Some("2024-10-27 01:00:00+02")]),
        fan("SELECT date_trunc('day', ts) AS day, sum(i4) FROM facts WHERE ts >= $1 \
             GROUP BY day ORDER BY day LIMIT 3")
        .params(&[Some("2024-10-26 00:00+02")]),
        fan("SELECT sum(i4) * $1::int8 AS scaled, max(t) FROM facts WHERE b = $2")
            .params(&[Some("3"), Some("true")]),
        fan("SELECT count(*) FROM facts WHERE n > $1::numeric").params(&[Some("-12.5")]),
        fan("SELECT count(*), min(i4) FROM facts WHERE i4 > $1").params(&[Some("-5")]),
        fan("SELECT avg(f8), stddev(f4) FROM facts WHERE g100 = $1 AND id > $2")
            .params(&[Some("17"), Some("100")])
            .tol(),
        fan("SELECT grp, sum(i4)::int2 FROM facts WHERE k = $1 GROUP BY grp")
            .params(&[Some("1")])
            .err("22003"),
        // --- the skewed table -------------------------------------------------------------------------
        fan("SELECT key, count(*), sum(val), avg(val) FROM skewed GROUP BY key"),
        fan("SELECT count(*), sum(val), min(note), max(note) FROM skewed WHERE key = 0"),
        fan("SELECT key, count(*) AS c FROM skewed GROUP BY key ORDER BY c DESC, key LIMIT 3"),
        // key 17 is rare (not among the most common values): a point lookup passes through
        pass("SELECT id, val FROM skewed WHERE key = 17"),
        // key 0 is the heavy value: most of the table, so it fans out
        fan("SELECT id, val FROM skewed WHERE key = 0"),
        fan("SELECT id, key, val FROM skewed WHERE key <> 0 ORDER BY val DESC, id LIMIT 10"),
        fan("SELECT DISTINCT key FROM skewed"),
        fan("SELECT count(*) FROM skewed"),
        fan("SELECT key % 3 AS r, stddev(val), var_pop(val), bool_and(val > -500) FROM skewed \
             GROUP BY 1 ORDER BY 1"),
        // --- empty_t (0 pages: the route is not asserted) -----------------------------------------------
        any("SELECT count(*), sum(i4), sum(i8), avg(n), max(t), bool_and(b), stddev(f8) FROM empty_t"),
        any("SELECT grp, count(*) FROM empty_t GROUP BY grp"),
        any("SELECT id, t FROM empty_t WHERE k = 1 ORDER BY t, id LIMIT 5"),
        any("SELECT DISTINCT grp FROM empty_t"),
        any("SELECT count(*) FROM empty_t HAVING count(*) = 0"),
        // --- one_row: below min_fragment_pages ------------------------------------------------------------
        pass("SELECT count(*), sum(i4), avg(n), max(t), min(f8) FROM one_row"),
        pass("SELECT * FROM one_row WHERE id > 0"),
        pass("SELECT grp, count(*) FROM one_row GROUP BY grp"),
        // --- must pass through: windows, volatile functions, row locks, joins, other aggregates ---------
        pass("SELECT id, row_number() OVER (ORDER BY id) FROM facts WHERE id < 100"),
        pass("SELECT grp, sum(i4), rank() OVER (ORDER BY sum(i4) DESC) FROM facts GROUP BY grp"),
        pass("SELECT count(*) FROM facts WHERE random() >= 0"),
        pass("SELECT grp, count(*), random() < 2 AS r FROM facts GROUP BY grp"),
        pass("SELECT id, k FROM facts WHERE id < 20 FOR UPDATE"),
        pass("SELECT id FROM facts WHERE id BETWEEN 100 AND 110 FOR SHARE"),
        // joins: the larger table is split (facts and skewed share their id key range)
        fan("SELECT count(*) FROM facts f JOIN skewed s ON s.id = f.id WHERE s.key = 0"),
        fan("SELECT f.grp, count(*) FROM facts f, one_row o WHERE f.k = o.k GROUP BY f.grp"),
        pass("SELECT string_agg(t, ',' ORDER BY id) FROM facts WHERE id < 30"),
        pass("SELECT array_agg(id ORDER BY id) FROM facts WHERE k > 3050"),
        pass("SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY i4) FROM facts"),
        // --- outside the contract: route open, results compared -----------------------------------------
        any("SELECT count(DISTINCT k), count(DISTINCT b) FROM facts"),
        any("SELECT grp, count(*) FROM facts GROUP BY ROLLUP (grp)"),
        any("SELECT count(*) FROM (SELECT DISTINCT k FROM facts) s"),
        any("WITH hot AS (SELECT * FROM facts WHERE k = 1) SELECT grp, count(*) FROM hot GROUP BY grp"),
        any("SELECT grp FROM facts WHERE k = 1 UNION SELECT grp FROM facts WHERE k = 2"),
        any("SELECT grp FROM facts GROUP BY grp ORDER BY count(*) DESC, grp NULLS FIRST LIMIT 4"),
        any("SELECT count(*) FROM facts WHERE id IN (SELECT id FROM skewed WHERE key = 5)"),
        any("SELECT sum(nosuch) FROM facts").err("42703"),
    ]
}

fn corpus() -> Vec<Query> {
    let mut c = generated();
    c.extend(handwritten());
    c
}

// ---------------------------------------------------------------------------------------
// Database
// ---------------------------------------------------------------------------------------

fn setup_sql(collation: &str) -> String {
    let coll = common::quote_ident(collation);
    format!(
        r#"
CREATE TABLE facts (
    id bigint PRIMARY KEY,
    k int NOT NULL,
    grp int,
    g100 int NOT NULL,
    i2 smallint,
    i4 int,
    i8 bigint,
    n numeric(38,10),
    f8 float8,
    f4 real,
    b bool,
    t text COLLATE {coll},
    d date,
    ts timestamptz
);
INSERT INTO facts
SELECT g,
    CASE WHEN g % 10 < 6 THEN 1
         WHEN g % 10 < 8 THEN 2 + (g / 10) % 5
         WHEN g % 10 = 8 THEN 7 + (g / 10) % 50
         ELSE 100 + (g / 10) % 3000 END,
    CASE WHEN g % 97 = 0 THEN NULL ELSE g % 10 END,
    g % 100,
    CASE WHEN g % 89 = 0 THEN NULL ELSE (g * 31) % 60001 - 30000 END,
    CASE WHEN g % 1000 = 0 THEN 2147483000 + g % 600
         WHEN g % 73 = 0 THEN NULL
         ELSE (g * 7919) % 2000003 - 1000000 END,
    CASE WHEN g % 50 = 0 THEN NULL
         WHEN g % 10007 = 0 THEN 9223372036854775807 - g
         WHEN g % 3 = 0 THEN -(g * 1000000007)
         ELSE g * 999999937 END,
    CASE WHEN g % 40 = 0 THEN NULL
         ELSE ((g * 7907) % 1000003 - 500000)::numeric / 7 END,
    CASE WHEN g = 11 THEN 'NaN'::float8
         WHEN g IN (12, 42) THEN 'Infinity'
         WHEN g = 13 THEN '-Infinity'
         WHEN g % 60 = 7 THEN NULL
         ELSE g * 1.1::float8 / 3 + 0.001 END,
    CASE WHEN g % 333 = 0 THEN NULL ELSE ((g % 1000) / 7.0)::real END,
    CASE WHEN g % 17 = 0 THEN NULL ELSE g % 3 = 0 END,
    CASE WHEN g % 101 = 0 THEN NULL
         ELSE (ARRAY['apple', 'Apple', 'APPLE', 'banana', 'Banana', 'cherry', 'Cherry',
                     'éclair', 'Eclair', 'eclair', 'zebra', 'Zebra', '_under', '-dash',
                     'delta 10', 'delta 9', 'Ñandú', 'nandu', 'straße', 'strasse', '123',
                     'a', 'B', 'c', 'Ä', 'ä', 'z', 'Z', ''])[1 + (g * 7) % 29]
              || CASE WHEN g % 3 = 0 THEN '' ELSE ' ' || (g % 53) END END,
    DATE '2024-01-01' + (g % 400)::int,
    CASE WHEN g % 211 = 0 THEN NULL
         ELSE TIMESTAMPTZ '2024-03-29 00:00:00+01' + g * INTERVAL '7 minutes' END
FROM generate_series(1, 60000::bigint) g;
CREATE INDEX facts_k ON facts (k);
CREATE INDEX facts_d ON facts (d);
CREATE INDEX facts_ts ON facts (ts);
CREATE INDEX facts_i4 ON facts (i4);

CREATE TABLE skewed (id int PRIMARY KEY, key int NOT NULL, val int, note text);
INSERT INTO skewed
SELECT g, CASE WHEN g % 100 < 85 THEN 0 ELSE g % 211 END, (g * 37) % 1001 - 500,
       'note ' || repeat(chr(97 + g % 26), 30 + g % 20)
FROM generate_series(1, 30000) g;
CREATE INDEX skewed_key ON skewed (key);

CREATE TABLE empty_t (LIKE facts INCLUDING ALL);
CREATE TABLE one_row (LIKE facts INCLUDING ALL);
INSERT INTO one_row SELECT * FROM facts WHERE id = 1234;
"#
    )
}

/// Creates the database (TimeZone Europe/Berlin) and its tables; returns the collation
/// of `facts.t`.
async fn setup_database() -> String {
    create_database(DB).await;
    let admin = connect_primary("postgres").await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} SET timezone TO 'Europe/Berlin'",
            common::quote_ident(DB)
        ))
        .await
        .expect("set the database's TimeZone");
    let c = connect_primary(DB).await;
    let collation = pick_collation(&c, "fanout_diff").await;
    c.batch_execute(&setup_sql(&collation))
        .await
        .unwrap_or_else(|e| panic!("create the fan-out tables: {e:?}"));
    c.batch_execute("VACUUM (ANALYZE) facts, skewed, empty_t, one_row")
        .await
        .expect("VACUUM ANALYZE");
    let pages: Vec<(String, i32)> = c
        .query(
            "SELECT relname::text, relpages FROM pg_class \
             WHERE relname IN ('facts', 'skewed', 'empty_t', 'one_row') ORDER BY relname",
            &[],
        )
        .await
        .expect("relpages")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (name, p) in &pages {
        let big = name == "facts" || name == "skewed";
        assert!(
            if big { *p >= 64 } else { *p < 8 },
            "{name} has {p} pages: {pages:?}"
        );
    }
    eprintln!("fanout_diff: collation of facts.t: {collation:?}; pages: {pages:?}");
    collation
}

// ---------------------------------------------------------------------------------------
// Checks of the fan-out rules
// ---------------------------------------------------------------------------------------

/// With the default `min_rows_per_group`, a GROUP BY into about as many groups as rows
/// splits on its indexed key (complete groups) or, without one, passes through (reason
/// many_groups); one into few groups still fans out with a combine.
async fn check_many_groups_rule() -> Vec<String> {
    let pgfan = Pgfan::start_with_config(&fanout_config_toml(), &[]);
    let mut failures = Vec::new();
    let mut client = match WireClient::connect(&pgfan.addr(), "postgres", DB).await {
        Ok(c) => c,
        Err(e) => return vec![format!("[many_groups] connect: {e}")],
    };
    for (sql, want) in [
        // many groups on an indexed column: split on it, fragments return final groups
        (
            "SELECT id, count(*) FROM facts GROUP BY id",
            "FanOut: 4 fragments, split index range on id",
        ),
        (
            "SELECT id AS x, sum(i4) FROM facts GROUP BY x",
            "FanOut: 4 fragments, split index range on id",
        ),
        // many groups on a column without an index: nothing to split on
        (
            "SELECT i8, count(*) FROM facts GROUP BY i8",
            "PassThrough: about",
        ),
        ("SELECT grp, count(*) FROM facts GROUP BY grp", "FanOut:"),
        ("SELECT k % 10, count(*) FROM facts GROUP BY 1", "FanOut:"),
    ] {
        let first = match client.simple_query(&format!("EXPLAIN FANOUT {sql}")).await {
            Ok(t) => summarize(&t)
                .rows
                .first()
                .and_then(|r| r.first().cloned().flatten())
                .map(|v| String::from_utf8_lossy(&v.0).into_owned()),
            Err(e) => {
                failures.push(format!("[many_groups] {sql}: {e}"));
                continue;
            }
        };
        if !first.as_deref().is_some_and(|l| l.starts_with(want)) {
            failures.push(format!(
                "[many_groups] {sql}: expected {want:?}, EXPLAIN FANOUT says {first:?}"
            ));
        }
    }
    failures
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fanout_differential() {
    let started = Instant::now();
    let corpus = corpus();
    setup_database().await;
    // every GROUP BY fans out here, however many groups (the exactness of the combine is
    // what this suite checks); the default's many_groups rule is checked below
    let config = format!("{}min_rows_per_group = 0\n", fanout_config_toml());
    let pgfan = Pgfan::start_with_config(&config, &[]);
    let suite = Suite::new("fanout_diff", DB, &pgfan);
    suite.announce(&corpus, started);

    let runs = run_all(&corpus, &suite).await;
    let mut extra = Vec::new();
    if !suite.direct_mode {
        extra.extend(check_many_groups_rule().await);
    }
    finish(&suite, &corpus, runs, extra, pgfan, started).await;
}

#[test]
fn corpus_is_large_and_well_formed() {
    let corpus = corpus();
    let n = corpus.len();
    check_corpus_basics(&corpus, 200, |sql| {
        sql.contains("FROM facts") || sql.contains("FROM skewed")
    });
    let count = |r: Route| corpus.iter().filter(|q| q.route == r).count();
    eprintln!(
        "corpus: {n} queries ({} fan out, {} pass through, {} either; {} ordered, {} with \
         float tolerance, {} with parameters, {} errors)",
        count(Route::FanOut),
        count(Route::PassThrough),
        count(Route::Any),
        corpus.iter().filter(|q| q.ordered()).count(),
        corpus.iter().filter(|q| q.float_tol).count(),
        corpus.iter().filter(|q| !q.params.is_empty()).count(),
        corpus
            .iter()
            .filter(|q| matches!(q.expect, Expect::Error(_)))
            .count(),
    );
    assert!(count(Route::FanOut) >= 180);
}

#[test]
fn sql_helpers() {
    assert!(has_top_level_order_by("SELECT a FROM t ORDER BY a"));
    assert!(has_top_level_order_by(
        "select a from t order\n by 1 limit 3"
    ));
    assert!(!has_top_level_order_by(
        "SELECT string_agg(t, ',' ORDER BY id) FROM facts"
    ));
    assert!(!has_top_level_order_by(
        "SELECT row_number() OVER (ORDER BY id) FROM facts"
    ));
    assert!(!has_top_level_order_by(
        "SELECT 'ORDER BY' AS \"order by\" FROM t"
    ));
    assert!(!has_top_level_order_by(
        "SELECT a AS border, b AS byline FROM t"
    ));
    assert!(route_ok(
        Route::FanOut,
        "FanOut: 4 fragments, split ctid on facts"
    ));
    assert!(!route_ok(
        Route::FanOut,
        "FanOut: 1 fragments, split ctid on facts"
    ));
    assert!(!route_ok(Route::FanOut, "PassThrough: window function"));
    assert!(route_ok(Route::PassThrough, "PassThrough: window function"));
    assert!(!route_ok(
        Route::PassThrough,
        "FanOut: 4 fragments, split ctid on facts"
    ));
    let p = |v: &[Option<&str>]| v.iter().map(|x| x.map(String::from)).collect::<Vec<_>>();
    assert_eq!(
        inline_params(
            "SELECT $1, $2, $3, $4, x-$5, $10",
            &p(&[
                Some("7"),
                Some("it's"),
                None,
                Some("1.5"),
                Some("-3"),
                None,
                None,
                None,
                None,
                Some("ten"),
            ])
        ),
        "SELECT 7, 'it''s', NULL, '1.5', x-(-3), 'ten'"
    );
}

/// The comparator reports what it must and tolerates only what it may.
#[test]
fn comparator_self_check() {
    use bytes::Bytes;
    let field = |name: &str, oid: u32, format: i16| FieldDesc {
        name: name.into(),
        table_oid: Oid::Sys(0),
        column_id: 0,
        type_oid: Oid::Sys(oid),
        type_size: 8,
        typmod: -1,
        format,
    };
    let cell = |s: &[u8]| Some(Raw(Bytes::copy_from_slice(s)));
    let transcript = |fields: Vec<FieldDesc>, rows: Vec<Vec<Option<Raw>>>| {
        let mut messages = vec![Msg::RowDescription(fields)];
        let n = rows.len();
        messages.extend(rows.into_iter().map(Msg::DataRow));
        messages.push(Msg::CommandComplete(format!("SELECT {n}")));
        messages.push(Msg::ReadyForQuery('I'));
        Transcript { messages }
    };
    let text_fields = || vec![field("k", 23, 0), field("s", FLOAT8_OID, 0)];
    let base = transcript(
        text_fields(),
        vec![
            vec![cell(b"1"), cell(b"0.1")],
            vec![cell(b"2"), cell(b"NaN")],
            vec![None, cell(b"-Infinity")],
        ],
    );
    let reordered = transcript(
        text_fields(),
        vec![
            vec![cell(b"2"), cell(b"NaN")],
            vec![None, cell(b"-Infinity")],
            vec![cell(b"1"), cell(b"0.10000000000000002")],
        ],
    );
    let unordered = fan("SELECT k, sum(f8) FROM facts GROUP BY k");
    let ordered = fan("SELECT k, sum(f8) FROM facts GROUP BY k ORDER BY k");
    assert!(compare(&unordered, &base, &base).is_none());
    // Order and last-bit float differences: only with no ORDER BY and the tol flag.
    assert!(compare(&unordered.clone().tol(), &base, &reordered).is_none());
    assert!(compare(&unordered, &base, &reordered).is_some());
    assert!(compare(&ordered.clone().tol(), &base, &reordered).is_some());
    // A real difference in a float column is reported even with tol.
    let off = transcript(
        text_fields(),
        vec![
            vec![cell(b"1"), cell(b"0.1000001")],
            vec![cell(b"2"), cell(b"NaN")],
            vec![None, cell(b"-Infinity")],
        ],
    );
    let diff = compare(&unordered.clone().tol(), &base, &off).expect("difference");
    assert!(diff.contains("column 1"), "{diff}");
    // Binary float8 with tolerance.
    let bin = |v: f64| {
        transcript(
            vec![field("k", 23, 1), field("s", FLOAT8_OID, 1)],
            vec![vec![cell(&1i32.to_be_bytes()), cell(&v.to_be_bytes())]],
        )
    };
    assert!(compare(
        &unordered.clone().tol(),
        &bin(1e6),
        &bin(1e6 * (1.0 + 1e-14))
    )
    .is_none());
    assert!(compare(
        &unordered.clone().tol(),
        &bin(1e6),
        &bin(1e6 * (1.0 + 1e-9))
    )
    .is_some());
    assert!(compare(&unordered, &bin(1e6), &bin(1e6 * (1.0 + 1e-14))).is_some());
    // Missing row, type OID, typmod, command tag.
    let fewer = transcript(text_fields(), vec![vec![cell(b"1"), cell(b"0.1")]]);
    assert!(compare(&unordered, &base, &fewer).unwrap().contains("rows"));
    let mut other_type = base.clone();
    if let Msg::RowDescription(f) = &mut other_type.messages[0] {
        f[0].type_oid = Oid::Sys(20);
    }
    assert!(compare(&unordered, &base, &other_type)
        .unwrap()
        .contains("RowDescription"));
    let mut other_typmod = base.clone();
    if let Msg::RowDescription(f) = &mut other_typmod.messages[0] {
        f[1].typmod = 5;
    }
    assert!(compare(&unordered, &base, &other_typmod).is_some());
    let mut other_tag = base.clone();
    other_tag.messages[4] = Msg::CommandComplete("SELECT 4".into());
    assert!(compare(&unordered, &base, &other_tag)
        .unwrap()
        .contains("tags"));
    // Errors: code and message must match; other fields (position, context) may differ.
    let error = |code: &str, msg: &str, position: Option<&str>| Transcript {
        messages: vec![
            Msg::RowDescription(text_fields()),
            Msg::Error(ErrorInfo {
                severity: "ERROR".into(),
                code: code.into(),
                message: msg.into(),
                position: position.map(String::from),
                ..ErrorInfo::default()
            }),
            Msg::ReadyForQuery('I'),
        ],
    };
    let e1 = error("22003", "smallint out of range", None);
    let mut e2 = error("22003", "smallint out of range", Some("8"));
    e2.messages.remove(0);
    assert!(compare(&unordered, &e1, &e2).is_none());
    assert!(compare(
        &unordered,
        &e1,
        &error("22003", "integer out of range", None)
    )
    .is_some());
    assert!(compare(
        &unordered,
        &e1,
        &error("22012", "smallint out of range", None)
    )
    .is_some());
    assert!(compare(&unordered, &e1, &base).is_some());
    assert!(compare(&unordered, &base, &e1).is_some());
}
