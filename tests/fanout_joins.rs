//! Fan-out differential suite for joins, subqueries, derived tables and partitioned tables
//! (DESIGN.md "What fans out", "Testing").
//!
//! One database holds a star schema: the fact table `sales` (60k rows; NULL and dangling
//! `store_id`/`product_id`/`order_id` values), `orders_f` (20k rows; `sales.order_id =
//! orders_f.id` joins two large tables on indexed keys), and the small dimensions `stores`
//! (50 rows, names under a non-C collation), `products` (200) and `regions` (5); and three
//! partitioned tables of about 40k rows each: `ev_list` (LIST on region, with a DEFAULT
//! partition), `ev_range` (RANGE on day, monthly, March sub-partitioned by HASH) and
//! `ev_hash` (HASH on id, 4 partitions).
//!
//! Every corpus query runs directly on the primary and through pgfan (primary plus both
//! replicas) in the simple protocol and the extended protocol with text and binary results,
//! compared with the machinery of `tests/common/diff.rs` (exactly; as sorted multisets when
//! there is no top-level ORDER BY). Each query's route is asserted through `EXPLAIN FANOUT`;
//! joins of `sales` and `orders_f` must also show a `  Co-range:` line and queries on the
//! partitioned tables must say `split partitions`.
//!
//! A second test checks that fragments reading partitions directly let PostgreSQL skip the
//! partitions a WHERE clause excludes: every fragment of a pruning query (taken from EXPLAIN
//! FANOUT) is planned directly on the primary with `constraint_exclusion = on`.
//!
//! Run: `cargo test --test fanout_joins -- --nocapture`. With `PGFAN_TEST_PROXY=direct` no
//! pgfan runs: results are compared with a parallel-plan session of the primary, routes are
//! not checked, and the pruning test checks fragments it writes itself (one per partition).
//! Reports go to `target/test-logs/fanout-joins*.txt`.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::diff::{
    any, check_corpus_basics, fan, finish, pass, pick_collation, run_all, summarize, Expect, Query,
    Route, Suite,
};
use common::wire::WireClient;
use common::{
    cluster, connect_primary, create_database, drop_database, fanout_config_toml_with_replicas,
    test_logs_dir, wait_for_replicas, Pgfan,
};

const DB: &str = "pgfan_fanout_joins";
/// The pruning test's own database (only the partitioned tables).
const PRUNE_DB: &str = "pgfan_fanout_joins_pruning";

/// How long the replicas may take to replay the set-up.
const REPLAY_LIMIT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------
// Corpus
// ---------------------------------------------------------------------------------------

/// `sales` joined to small dimensions: star joins in WHERE and JOIN ... ON forms, inner and
/// with `sales` on the preserved side of LEFT JOINs.
fn star_joins() -> Vec<Query> {
    vec![
        // --- aggregates grouped by dimension columns ----------------------------------------
        fan("SELECT st.region, count(*), sum(s.qty), avg(s.price), min(s.day), max(s.price) \
             FROM sales s JOIN stores st ON st.id = s.store_id GROUP BY st.region"),
        fan("SELECT st.region, count(*), sum(s.qty) FROM sales s, stores st \
             WHERE st.id = s.store_id GROUP BY st.region ORDER BY st.region NULLS FIRST"),
        fan("SELECT st.name, p.category, count(*), sum(s.qty * s.price) \
             FROM sales s JOIN stores st ON st.id = s.store_id \
             JOIN products p ON p.id = s.product_id GROUP BY st.name, p.category"),
        fan("SELECT st.region, p.name, count(*), avg(s.qty) FROM sales s, stores st, products p \
             WHERE st.id = s.store_id AND p.id = s.product_id AND p.category = 'toys' \
             AND st.region IN ('eu', 'us') GROUP BY st.region, p.name HAVING count(*) > 5"),
        fan("SELECT r.name, r.zone, count(*), sum(s.price) FROM sales s \
             JOIN stores st ON st.id = s.store_id JOIN regions r ON r.id = st.region_id \
             GROUP BY r.name, r.zone ORDER BY r.name"),
        fan("SELECT p.category, sum(s.qty) AS units FROM sales s \
             JOIN products p ON p.id = s.product_id GROUP BY p.category \
             HAVING sum(s.qty) > 1000 ORDER BY 2 DESC, 1 NULLS FIRST"),
        fan("SELECT st.name, sum(s.price) AS revenue FROM sales s \
             JOIN stores st ON st.id = s.store_id GROUP BY st.name \
             ORDER BY revenue DESC NULLS LAST, st.name LIMIT 10"),
        fan("SELECT st.name, count(*) AS n FROM stores st JOIN sales s ON s.store_id = st.id \
             GROUP BY st.name ORDER BY st.name DESC LIMIT 7 OFFSET 3"),
        fan("SELECT p.category, count(*), max(p.id) AS top FROM products p, sales s \
             WHERE p.id = s.product_id AND s.qty > 10 GROUP BY p.category"),
        fan("SELECT st.region, date_trunc('month', s.day)::date AS month, count(*), \
             sum(s.qty) FILTER (WHERE s.price > 500) FROM sales s \
             JOIN stores st ON st.id = s.store_id GROUP BY 1, 2 ORDER BY 1 NULLS LAST, 2"),
        fan("SELECT extract(isodow FROM s.day) AS dow, st.region, min(s.price), max(s.note) \
             FROM sales s JOIN stores st ON st.id = s.store_id WHERE st.region <> 'africa' \
             GROUP BY 1, 2"),
        fan("SELECT count(*), sum(s.qty), avg(s.price) FROM sales s \
             JOIN stores st ON st.id = s.store_id WHERE st.region = 'apac'"),
        fan("SELECT count(*), sum(s.qty) FROM sales s \
             JOIN products p ON p.id = s.product_id AND p.category IS NULL"),
        fan("SELECT st.region, count(*) FROM sales s JOIN stores st \
             ON st.id = s.store_id AND s.qty > st.id % 10 GROUP BY st.region"),
        fan("SELECT a.region, b.region AS other, count(*) FROM sales s \
             JOIN stores a ON a.id = s.store_id JOIN stores b ON b.id = s.product_id % 50 + 1 \
             GROUP BY a.region, b.region"),
        fan("SELECT st.region, p.category, sum(s.qty) FROM sales s \
             JOIN stores st ON st.id = s.store_id JOIN products p ON p.id = s.product_id \
             WHERE s.day >= '2024-03-01' AND s.day < '2024-05-01' \
             GROUP BY st.region, p.category ORDER BY 3 DESC, 1, 2 LIMIT 12"),
        fan("SELECT st.region, 100.0 * sum(s.qty) FILTER (WHERE p.category = 'food') / sum(s.qty) \
             AS food_pct FROM sales s JOIN stores st ON st.id = s.store_id \
             JOIN products p ON p.id = s.product_id GROUP BY st.region"),
        fan("SELECT DISTINCT st.region, p.category FROM sales s \
             JOIN stores st ON st.id = s.store_id JOIN products p ON p.id = s.product_id"),
        fan("SELECT st.region, count(*) FROM sales s JOIN stores st ON st.id = s.store_id \
             GROUP BY st.region HAVING avg(s.price) > 400 AND count(*) > 100"),
        fan("SELECT sum(s.qty) FILTER (WHERE st.region = 'eu') AS eu, \
             sum(s.qty) FILTER (WHERE st.region = 'us') AS us, count(*) \
             FROM sales s, stores st WHERE s.store_id = st.id"),
        fan("SELECT st.region, count(*) FROM sales s JOIN stores st ON st.id = s.store_id \
             WHERE s.price IS NULL OR s.note IS NULL GROUP BY st.region"),
        // functional dependency on the dimension's key (columns grouped through the primary
        // key): pgfan does not see the dependency and passes through; a join that
        // multiplies rows
        pass("SELECT st.id, st.name, st.region, count(*), sum(s.qty) FROM sales s \
             JOIN stores st ON st.id = s.store_id GROUP BY st.id ORDER BY st.id"),
        fan("SELECT st.region, count(*), sum(s.qty) FROM sales s \
             JOIN stores st ON st.region_id = s.store_id % 5 + 1 WHERE s.id % 3 = 0 \
             GROUP BY st.region"),
        fan("SELECT r.name, count(*) FROM sales s CROSS JOIN regions r WHERE s.qty = 20 \
             GROUP BY r.name"),
        // --- plain join scans ---------------------------------------------------------------
        fan("SELECT s.id, s.qty, st.name FROM sales s JOIN stores st ON st.id = s.store_id \
             WHERE s.qty = 7 AND st.region = 'eu'"),
        fan("SELECT s.id, s.price, p.name FROM sales s JOIN products p ON p.id = s.product_id \
             WHERE p.category = 'books' ORDER BY s.price DESC NULLS LAST, s.id LIMIT 25"),
        fan("SELECT s.id, s.day, st.region FROM sales s JOIN stores st ON st.id = s.store_id \
             WHERE s.id % 97 = 0 ORDER BY s.day, s.id"),
        fan("SELECT s.*, st.name, p.category FROM sales s, stores st, products p \
             WHERE st.id = s.store_id AND p.id = s.product_id AND s.id % 211 = 5"),
        fan("SELECT s.id, st.name FROM sales s JOIN stores st ON st.id = s.store_id \
             ORDER BY s.id DESC LIMIT 15 OFFSET 5"),
        fan("SELECT st.name, s.id, s.qty FROM sales s JOIN stores st ON st.id = s.store_id \
             WHERE s.qty > 18 ORDER BY st.name, s.id LIMIT 30"),
        // --- LEFT JOIN with sales preserved -------------------------------------------------
        fan("SELECT st.region, count(*), count(st.id), sum(s.qty) FROM sales s \
             LEFT JOIN stores st ON st.id = s.store_id GROUP BY st.region"),
        fan("SELECT s.id, s.store_id, st.name FROM sales s \
             LEFT JOIN stores st ON st.id = s.store_id WHERE s.id % 113 = 0"),
        fan("SELECT p.category, count(*) FROM sales s \
             LEFT JOIN products p ON p.id = s.product_id AND p.category = 'toys' \
             GROUP BY p.category"),
        fan("SELECT count(*), sum(s.qty) FROM sales s \
             LEFT JOIN stores st ON st.id = s.store_id WHERE st.id IS NULL"),
        fan("SELECT r.name, count(*) FROM sales s LEFT JOIN stores st ON st.id = s.store_id \
             LEFT JOIN regions r ON r.id = st.region_id GROUP BY r.name ORDER BY r.name NULLS FIRST"),
        fan("SELECT st.region, p.category, count(*) FROM sales s \
             JOIN products p ON p.id = s.product_id LEFT JOIN stores st ON st.id = s.store_id \
             GROUP BY 1, 2"),
        fan("SELECT s.id, st.name FROM sales s LEFT JOIN stores st ON st.id = s.store_id \
             WHERE s.qty = 3 ORDER BY st.name NULLS FIRST, s.id LIMIT 20"),
    ]
}

/// `sales JOIN orders_f ON sales.order_id = orders_f.id`: two large tables, both read in
/// matching key ranges.
fn big_joins() -> Vec<Query> {
    vec![
        fan(
            "SELECT o.status, count(*), sum(s.qty), avg(s.price) FROM sales s \
             JOIN orders_f o ON s.order_id = o.id GROUP BY o.status",
        )
        .co_range(),
        fan("SELECT count(*) FROM sales s JOIN orders_f o ON o.id = s.order_id").co_range(),
        fan(
            "SELECT o.customer_id % 10 AS bucket, sum(s.price) FROM sales s \
             JOIN orders_f o ON s.order_id = o.id WHERE o.status <> 'cancelled' \
             GROUP BY 1 ORDER BY 1",
        )
        .co_range(),
        fan(
            "SELECT st.region, o.status, count(*), max(s.price) FROM sales s \
             JOIN orders_f o ON s.order_id = o.id JOIN stores st ON st.id = s.store_id \
             GROUP BY st.region, o.status",
        ),
        fan("SELECT count(*), sum(s.qty) FROM sales s, orders_f o \
             WHERE s.order_id = o.id AND s.day <> o.placed")
        .co_range(),
        fan(
            "SELECT date_trunc('month', o.placed)::date AS m, count(*), min(s.day) FROM sales s \
             JOIN orders_f o ON s.order_id = o.id GROUP BY m ORDER BY m NULLS LAST",
        ),
        fan(
            "SELECT s.id, s.order_id, o.placed FROM sales s JOIN orders_f o ON o.id = s.order_id \
             WHERE o.customer_id = 42",
        ),
        fan(
            "SELECT s.id, o.status, s.price FROM sales s JOIN orders_f o ON o.id = s.order_id \
             WHERE o.status = 'returned' ORDER BY s.price DESC NULLS LAST, s.id LIMIT 20",
        ),
        fan(
            "SELECT o.status, count(*) FROM sales s JOIN orders_f o ON o.id = s.order_id \
             GROUP BY o.status HAVING sum(s.qty) > 10000 ORDER BY o.status",
        ),
        // sales preserved: rows without an order (NULL or dangling order_id) count once
        fan(
            "SELECT o.status, count(*), count(o.id), sum(s.qty) FROM sales s \
             LEFT JOIN orders_f o ON o.id = s.order_id GROUP BY o.status",
        )
        .co_range(),
        fan("SELECT s.id, s.order_id, o.status FROM sales s \
             LEFT JOIN orders_f o ON o.id = s.order_id WHERE s.id % 211 < 2"),
        fan(
            "SELECT o.status, count(*) FROM orders_f o JOIN sales s ON s.order_id = o.id \
             WHERE s.order_id BETWEEN 5000 AND 15000 GROUP BY o.status",
        ),
        fan(
            "SELECT o.id, o.placed, s.id FROM sales s JOIN orders_f o ON o.id = s.order_id \
             ORDER BY o.id DESC, s.id LIMIT 25",
        ),
        fan(
            "SELECT o.status, avg(t.n), sum(t.total) FROM (SELECT order_id, count(*) AS n, \
             sum(price) AS total FROM sales GROUP BY order_id) t \
             JOIN orders_f o ON o.id = t.order_id GROUP BY o.status",
        ),
        // orders_f preserved, sales on the nullable side: route open
        any("SELECT o.status, count(*), count(s.id) FROM orders_f o \
             LEFT JOIN sales s ON s.order_id = o.id GROUP BY o.status"),
    ]
}

/// Subqueries in WHERE, correlated scalar subqueries in the select list of non-aggregate
/// queries, derived tables.
fn subqueries() -> Vec<Query> {
    vec![
        // --- IN / NOT IN -----------------------------------------------------------------
        fan("SELECT count(*), sum(qty) FROM sales \
             WHERE store_id IN (SELECT id FROM stores WHERE region = 'eu')"),
        fan("SELECT product_id, count(*) FROM sales \
             WHERE product_id IN (SELECT id FROM products WHERE category IN ('toys', 'books')) \
             GROUP BY product_id"),
        fan("SELECT count(*) FROM sales \
             WHERE store_id NOT IN (SELECT id FROM stores WHERE region = 'us')"),
        // stores.region_id has a NULL: NOT IN is never true
        fan("SELECT count(*) FROM sales WHERE store_id NOT IN (SELECT region_id FROM stores)"),
        fan("SELECT id, qty FROM sales WHERE order_id IN \
             (SELECT id FROM orders_f WHERE status = 'returned' AND customer_id < 40)"),
        fan("SELECT qty, count(*) FROM sales WHERE (store_id, product_id % 6) IN \
             (SELECT id, id % 6 FROM stores WHERE region = 'latam') GROUP BY qty ORDER BY qty"),
        // --- EXISTS / NOT EXISTS, correlated with sales columns ----------------------------
        fan("SELECT count(*) FROM sales s WHERE EXISTS \
             (SELECT 1 FROM stores st WHERE st.id = s.store_id AND st.region = 'apac')"),
        fan("SELECT s.store_id, count(*) FROM sales s WHERE NOT EXISTS \
             (SELECT 1 FROM products p WHERE p.id = s.product_id) GROUP BY s.store_id"),
        fan("SELECT s.id, s.order_id FROM sales s WHERE NOT EXISTS \
             (SELECT 1 FROM orders_f o WHERE o.id = s.order_id) ORDER BY s.id LIMIT 40"),
        fan("SELECT count(*), sum(s.price) FROM sales s WHERE EXISTS \
             (SELECT 1 FROM orders_f o WHERE o.id = s.order_id AND o.status = 'open')"),
        fan("SELECT s.day, count(*) FROM sales s WHERE s.qty > 15 AND NOT EXISTS \
             (SELECT 1 FROM stores st WHERE st.id = s.store_id AND st.region IS NOT NULL) \
             GROUP BY s.day ORDER BY s.day DESC LIMIT 10"),
        // --- scalar subqueries compared with a column -------------------------------------
        fan("SELECT count(*) FROM sales WHERE qty > (SELECT avg(qty) FROM sales)"),
        fan("SELECT id, price FROM sales WHERE price > (SELECT max(price) - 10 FROM sales) \
             ORDER BY price DESC, id"),
        fan("SELECT st.region, count(*) FROM sales s JOIN stores st ON st.id = s.store_id \
             WHERE s.qty >= (SELECT avg(qty) FROM sales) GROUP BY st.region"),
        fan("SELECT count(*) FROM sales \
             WHERE store_id = (SELECT min(id) FROM stores WHERE region = 'latam')"),
        // --- correlated scalar subqueries in the select list (no aggregate) ----------------
        fan("SELECT s.id, s.qty, (SELECT st.name FROM stores st WHERE st.id = s.store_id) AS store \
             FROM sales s WHERE s.id % 101 = 0"),
        fan("SELECT s.id, (SELECT p.category FROM products p WHERE p.id = s.product_id) AS cat \
             FROM sales s ORDER BY s.id DESC LIMIT 20"),
        fan("SELECT s.id, (SELECT count(*) FROM stores st WHERE st.region = 'eu' \
             AND st.id < s.store_id) AS lower_eu FROM sales s WHERE s.qty = 3 AND s.id % 7 = 0"),
        // --- derived tables ---------------------------------------------------------------
        fan("SELECT d.region, count(*), sum(d.amount) FROM \
             (SELECT st.region, s.qty * s.price AS amount FROM sales s \
              JOIN stores st ON st.id = s.store_id WHERE s.qty > 2) AS d GROUP BY d.region"),
        fan("SELECT d.category, avg(d.qty), count(*) FROM \
             (SELECT p.category, s.qty FROM sales s JOIN products p ON p.id = s.product_id) d \
             GROUP BY d.category ORDER BY d.category NULLS FIRST"),
        fan("SELECT count(*), sum(n), max(total), min(total) FROM \
             (SELECT order_id, count(*) AS n, sum(price) AS total FROM sales GROUP BY order_id) \
             AS per_order"),
        fan("SELECT n, count(*) FROM (SELECT order_id, count(*) AS n FROM sales \
             WHERE order_id IS NOT NULL GROUP BY order_id) t GROUP BY n ORDER BY n"),
        fan("SELECT * FROM (SELECT id, qty FROM sales WHERE qty > 18) d WHERE d.id % 7 = 0"),
        fan("SELECT d.id, d.price FROM (SELECT s.id, s.price FROM sales s \
             JOIN stores st ON st.id = s.store_id WHERE st.region = 'eu') d \
             ORDER BY d.price DESC NULLS LAST, d.id LIMIT 10"),
        fan("SELECT big, count(*) FROM (SELECT id, price > 900 AS big FROM sales) x \
             GROUP BY big ORDER BY big NULLS FIRST"),
        any("SELECT st.region, count(*) FROM sales s JOIN \
             (SELECT id AS store_id, region FROM stores WHERE region <> 'us') st \
             USING (store_id) GROUP BY st.region"),
        any("SELECT id, name FROM stores WHERE id IN (SELECT store_id FROM sales WHERE qty = 20)"),
    ]
}

/// `$n` parameters (inlined for the simple protocol and EXPLAIN FANOUT).
fn with_params() -> Vec<Query> {
    vec![
        fan("SELECT st.region, count(*) FROM sales s JOIN stores st ON st.id = s.store_id \
             WHERE s.qty > $1 GROUP BY st.region")
        .params(&[Some("10")]),
        fan("SELECT count(*) FROM sales WHERE store_id IN (SELECT id FROM stores WHERE region = $1)")
            .params(&[Some("eu")]),
        fan("SELECT o.status, sum(s.price) FROM sales s JOIN orders_f o ON o.id = s.order_id \
             WHERE o.placed >= $1 GROUP BY o.status")
        .params(&[Some("2024-04-01")])
        .co_range(),
        fan("SELECT s.id, p.name FROM sales s JOIN products p ON p.id = s.product_id \
             WHERE p.category = $1 ORDER BY s.id LIMIT $2")
        .params(&[Some("garden"), Some("17")]),
        fan("SELECT s.id, s.qty FROM sales s WHERE EXISTS (SELECT 1 FROM stores st \
             WHERE st.id = s.store_id AND st.region = $1) AND s.qty = $2")
        .params(&[Some("latam"), Some("19")]),
    ]
}

/// Shapes that must pass through.
fn pass_through() -> Vec<Query> {
    let temp = "CREATE TEMP TABLE tmp_hot AS SELECT id, name FROM stores WHERE id % 4 = 0";
    vec![
        // FULL JOIN with sales
        pass(
            "SELECT st.region, count(*), count(s.id) FROM sales s \
              FULL JOIN stores st ON st.id = s.store_id GROUP BY st.region",
        ),
        pass(
            "SELECT s.id, st.id FROM sales s FULL JOIN stores st ON st.id = s.store_id \
              WHERE s.id IS NULL OR s.id % 500 = 0",
        ),
        // stores preserved, sales on the nullable side
        pass(
            "SELECT st.id, count(s.id) FROM stores st LEFT JOIN sales s ON s.store_id = st.id \
              GROUP BY st.id",
        ),
        pass(
            "SELECT st.name, sum(s.qty) FROM stores st \
              LEFT JOIN sales s ON s.store_id = st.id AND s.qty > 15 GROUP BY st.name",
        ),
        // WITH
        pass(
            "WITH eu AS (SELECT id FROM stores WHERE region = 'eu') \
              SELECT count(*) FROM sales s JOIN eu ON eu.id = s.store_id",
        ),
        pass(
            "WITH big AS (SELECT * FROM sales WHERE qty > 15) \
              SELECT store_id, count(*) FROM big GROUP BY store_id",
        ),
        // window functions
        pass(
            "SELECT st.region, sum(s.qty), rank() OVER (ORDER BY sum(s.qty) DESC) \
              FROM sales s JOIN stores st ON st.id = s.store_id GROUP BY st.region",
        ),
        pass(
            "SELECT s.id, row_number() OVER (PARTITION BY s.store_id ORDER BY s.id) \
              FROM sales s JOIN stores st ON st.id = s.store_id WHERE s.id % 59 = 0",
        ),
        // LATERAL
        pass(
            "SELECT st.id, x.total FROM stores st, \
              LATERAL (SELECT sum(qty) AS total FROM sales s WHERE s.store_id = st.id) x",
        ),
        pass(
            "SELECT s.id, x.name FROM sales s, \
              LATERAL (SELECT name FROM stores st WHERE st.id = s.store_id) x \
              WHERE s.id % 300 = 0",
        ),
        // row locks and volatile functions
        pass(
            "SELECT s.id FROM sales s JOIN stores st ON st.id = s.store_id \
              WHERE s.id < 20 FOR UPDATE OF s",
        ),
        pass(
            "SELECT st.region, count(*) FROM sales s JOIN stores st ON st.id = s.store_id \
              WHERE random() >= 0 GROUP BY st.region",
        ),
        // a TEMP table (only the session's own connection sees it)
        pass("SELECT count(*) FROM sales s JOIN tmp_hot t ON t.id = s.store_id").setup(temp),
        pass(
            "SELECT t.name, sum(s.qty) FROM sales s JOIN tmp_hot t ON t.id = s.store_id \
              GROUP BY t.name ORDER BY t.name",
        )
        .setup(temp),
    ]
}

/// Outside the contract (route open): subqueries in the select list or HAVING of
/// aggregate queries, RIGHT JOINs.
fn open_routes() -> Vec<Query> {
    vec![
        any(
            "SELECT st.region, count(*), (SELECT count(*) FROM stores) AS n_stores \
             FROM sales s JOIN stores st ON st.id = s.store_id GROUP BY st.region",
        ),
        any("SELECT count(*), (SELECT max(placed) FROM orders_f) FROM sales"),
        any("SELECT store_id, count(*) FROM sales GROUP BY store_id \
             HAVING count(*) > (SELECT count(*) / 60 FROM sales)"),
        any(
            "SELECT p.category, sum(s.qty) FROM sales s JOIN products p ON p.id = s.product_id \
             GROUP BY p.category HAVING sum(s.qty) > (SELECT avg(qty) * 1000 FROM sales)",
        ),
        any("SELECT st.region, count(*) FROM stores st \
             RIGHT JOIN sales s ON s.store_id = st.id GROUP BY st.region"),
        any("SELECT st.id, count(s.id) FROM sales s \
             RIGHT JOIN stores st ON st.id = s.store_id GROUP BY st.id"),
        any(
            "SELECT s.id, st.name FROM stores st RIGHT JOIN sales s ON s.store_id = st.id \
             WHERE s.id % 157 = 0",
        ),
    ]
}

/// Join queries that fail in PostgreSQL: the same error through pgfan.
fn errors() -> Vec<Query> {
    vec![
        any("SELECT st.region, sum(s.qty / (st.id - 25)) FROM sales s \
             JOIN stores st ON st.id = s.store_id GROUP BY st.region")
        .err("22012"),
        any("SELECT s.id, s.qty / (p.id - 100) FROM sales s JOIN products p ON p.id = s.product_id")
            .err("22012"),
        any("SELECT o.status, sum(s.qty / (o.customer_id - 43)) FROM sales s \
             JOIN orders_f o ON o.id = s.order_id GROUP BY o.status")
        .err("22012"),
        any("SELECT id FROM sales s JOIN stores st ON st.id = s.store_id WHERE s.qty = 1")
            .err("42702"),
        any("SELECT count(*) FROM sales s JOIN products p ON p.id = s.product_id GROUP BY id")
            .err("42702"),
        any("SELECT st.nosuch, count(*) FROM sales s JOIN stores st ON st.id = s.store_id \
             GROUP BY 1")
        .err("42703"),
        any("SELECT count(*) FROM sales s JOIN stores st ON st.id = s.store_id \
             WHERE s.nosuch > 0")
        .err("42703"),
        any("SELECT x.id FROM sales s JOIN stores st ON st.id = s.store_id").err("42P01"),
        any("SELECT count(*) FROM sales WHERE store_id = (SELECT id FROM stores WHERE region = 'eu')")
            .err("21000"),
        any("SELECT region, sum(qty / (qty - 5)) FROM ev_list GROUP BY region").err("22012"),
    ]
}

/// The partitioned tables: partition-wise fragments.
fn partitioned() -> Vec<Query> {
    let p = |sql: &str| fan(sql).split_partitions();
    vec![
        // --- ev_list: LIST (region) with a DEFAULT partition --------------------------------
        p("SELECT count(*), sum(amount), avg(amount), min(day), max(qty) FROM ev_list"),
        p("SELECT region, count(*), sum(qty), avg(amount) FROM ev_list GROUP BY region"),
        p("SELECT region, count(*) FROM ev_list GROUP BY region ORDER BY region NULLS FIRST"),
        p(
            "SELECT date_trunc('month', day)::date AS m, count(*), max(amount) FROM ev_list \
           GROUP BY m ORDER BY m",
        ),
        p("SELECT id, region, amount FROM ev_list WHERE qty = 3"),
        p("SELECT id, amount FROM ev_list ORDER BY amount DESC NULLS LAST, id LIMIT 15"),
        p("SELECT id, region, day FROM ev_list WHERE id % 499 = 0 ORDER BY day, id"),
        p("SELECT count(*), sum(amount) FROM ev_list WHERE region = 'eu'"),
        p("SELECT region, count(*) FROM ev_list WHERE region IN ('eu', 'us') GROUP BY region"),
        p("SELECT region, count(*), min(id) FROM ev_list \
           WHERE region NOT IN ('eu', 'us', 'apac', 'jp', 'latam') OR region IS NULL \
           GROUP BY region"),
        p("SELECT id, amount FROM ev_list WHERE region = 'apac' AND qty > 17"),
        p("SELECT st.name, sum(e.amount), count(*) FROM ev_list e \
           JOIN stores st ON st.id = e.store_id WHERE e.region = 'eu' GROUP BY st.name"),
        p("SELECT count(*), sum(qty) FROM ev_list WHERE region = $1").params(&[Some("us")]),
        p("SELECT id, qty FROM ev_list WHERE region = $1 AND qty = $2 ORDER BY id LIMIT 25")
            .params(&[Some("latam"), Some("4")]),
        p("SELECT DISTINCT region FROM ev_list"),
        p("SELECT count(*), sum(qty) FROM ev_list WHERE region IS NULL"),
        p("SELECT count(*) FROM ev_list \
           WHERE store_id IN (SELECT id FROM stores WHERE region = 'apac')"),
        // --- ev_range: RANGE (day), monthly, March sub-partitioned by HASH (id) --------------
        p("SELECT count(*), sum(amount), avg(qty), min(amount), max(day) FROM ev_range"),
        p(
            "SELECT date_trunc('month', day)::date AS m, count(*), sum(amount) FROM ev_range \
           GROUP BY m ORDER BY m",
        ),
        p("SELECT day, count(*), sum(qty) FROM ev_range GROUP BY day"),
        p("SELECT count(*), avg(amount) FROM ev_range \
           WHERE day >= '2024-02-01' AND day < '2024-03-01'"),
        p("SELECT region, count(*) FROM ev_range \
           WHERE day >= '2024-03-10' AND day < '2024-04-20' GROUP BY region"),
        p("SELECT count(*), sum(amount) FROM ev_range \
           WHERE day >= '2024-03-01' AND day < '2024-04-01'"),
        p("SELECT id, day, amount FROM ev_range WHERE qty > 18 AND id % 3 = 0"),
        p("SELECT id, day FROM ev_range ORDER BY day DESC, id DESC LIMIT 12"),
        p("SELECT count(*), max(id) FROM ev_range WHERE day >= $1 AND day < $2")
            .params(&[Some("2024-05-01"), Some("2024-06-15")]),
        p(
            "SELECT r.name, r.zone, count(*), sum(e.amount) FROM ev_range e \
           JOIN regions r ON r.name = e.region GROUP BY r.name, r.zone",
        ),
        p(
            "SELECT st.region, count(*) FROM ev_range e JOIN stores st ON st.id = e.store_id \
           WHERE e.day < '2024-02-15' GROUP BY st.region ORDER BY st.region NULLS LAST",
        ),
        p("SELECT id, day FROM ev_range WHERE qty = 1 ORDER BY day, id LIMIT 50 OFFSET 100"),
        p(
            "SELECT region, count(*), sum(amount) FROM ev_range WHERE day = '2024-03-15' \
           GROUP BY region",
        ),
        // --- ev_hash: HASH (id), 4 partitions -----------------------------------------------
        p("SELECT count(*), sum(amount), min(id), max(id), avg(qty) FROM ev_hash"),
        p("SELECT id % 10 AS r, count(*), sum(qty) FROM ev_hash GROUP BY 1"),
        p("SELECT id, count(*), sum(qty) FROM ev_hash WHERE id % 97 = 0 GROUP BY id"),
        p("SELECT id, qty FROM ev_hash WHERE qty = 5 ORDER BY id LIMIT 30"),
        p("SELECT id, amount, day FROM ev_hash WHERE amount > 895"),
        p("SELECT p.category, sum(e.qty), count(*) FROM ev_hash e \
           JOIN products p ON p.id = e.product_id GROUP BY p.category"),
        p("SELECT e.day, count(*) FROM ev_hash e WHERE EXISTS \
           (SELECT 1 FROM products p WHERE p.id = e.product_id AND p.category = 'music') \
           GROUP BY e.day ORDER BY e.day LIMIT 20"),
        p("SELECT count(*), sum(amount) FROM ev_hash \
           WHERE product_id IN (SELECT id FROM products WHERE category = 'food')"),
        any("SELECT count(*), sum(l.qty + h.qty) FROM ev_list l JOIN ev_hash h ON h.id = l.id"),
        // point lookups on the hash key: route open
        any("SELECT * FROM ev_hash WHERE id = 42"),
        any("SELECT id, amount FROM ev_hash WHERE id IN (42, 4242, 40000)"),
        any("SELECT count(*) FROM ev_hash WHERE id = $1").params(&[Some("4242")]),
    ]
}

fn corpus() -> Vec<Query> {
    let mut c = star_joins();
    c.extend(big_joins());
    c.extend(subqueries());
    c.extend(with_params());
    c.extend(pass_through());
    c.extend(open_routes());
    c.extend(errors());
    c.extend(partitioned());
    c
}

// ---------------------------------------------------------------------------------------
// Database
// ---------------------------------------------------------------------------------------

/// The star schema; `collation` is that of `stores.name`.
fn star_sql(collation: &str) -> String {
    let coll = common::quote_ident(collation);
    format!(
        r#"
CREATE TABLE regions (id int PRIMARY KEY, name text NOT NULL, zone text);
INSERT INTO regions VALUES (1, 'eu', 'emea'), (2, 'us', 'amer'), (3, 'apac', 'apac'),
    (4, 'latam', 'amer'), (5, 'africa', 'emea');

CREATE TABLE stores (id int PRIMARY KEY, name text COLLATE {coll} NOT NULL, region text,
    region_id int);
INSERT INTO stores
SELECT g, (ARRAY['Berlin', 'austin', 'Zürich', 'osaka', 'Lima', 'accra', 'Ñuñoa', 'boston',
                 'Cork', 'éclair'])[1 + g % 10] || ' ' || g,
       CASE WHEN g = 50 THEN NULL
            ELSE (ARRAY['eu', 'us', 'apac', 'latam', 'africa'])[1 + g % 5] END,
       CASE WHEN g = 50 THEN NULL ELSE 1 + g % 5 END
FROM generate_series(1, 50) g;

CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL, category text);
INSERT INTO products
SELECT g, 'product ' || g,
       CASE WHEN g % 23 = 0 THEN NULL
            ELSE (ARRAY['food', 'tools', 'toys', 'books', 'garden', 'music'])[1 + g % 6] END
FROM generate_series(1, 200) g;

CREATE TABLE orders_f (id bigint PRIMARY KEY, customer_id int NOT NULL, placed date,
    status text);
INSERT INTO orders_f
SELECT g, 1 + (g * 7) % 3000,
       CASE WHEN g % 401 = 0 THEN NULL ELSE DATE '2024-01-01' + (g % 182)::int END,
       (ARRAY['open', 'shipped', 'returned', 'cancelled'])[1 + g % 4]
FROM generate_series(1, 20000::bigint) g;

-- store_id: NULLs and ids 51..55 without a store; product_id: NULLs and 201..210 without
-- a product; order_id: NULLs and ids above 20000 without an order
CREATE TABLE sales (
    id bigint PRIMARY KEY,
    order_id bigint,
    store_id int,
    product_id int,
    day date NOT NULL,
    qty int NOT NULL,
    price numeric(12,2),
    note text
);
INSERT INTO sales
SELECT g,
       CASE WHEN g % 211 = 0 THEN NULL
            WHEN g % 97 = 0 THEN 20000 + g
            ELSE 1 + (g * 7) % 20000 END,
       CASE WHEN g % 53 = 0 THEN NULL
            WHEN g % 41 = 0 THEN 51 + g % 5
            ELSE 1 + (g * 3) % 50 END,
       CASE WHEN g % 61 = 0 THEN NULL ELSE 1 + (g * 13) % 210 END,
       DATE '2024-01-01' + (g % 182)::int,
       1 + (g * 17) % 20,
       CASE WHEN g % 89 = 0 THEN NULL ELSE ((g * 7919) % 100000)::numeric / 100 END,
       CASE WHEN g % 7 = 0 THEN NULL
            ELSE 'note ' || repeat(chr(97 + (g % 26)::int), 10 + (g % 30)::int) END
FROM generate_series(1, 60000::bigint) g;
CREATE INDEX sales_order_id ON sales (order_id);
"#
    )
}

/// The partitioned tables.
const PARTITIONED_SQL: &str = r#"
CREATE TABLE ev_list (
    id bigint NOT NULL,
    region text,
    day date NOT NULL,
    store_id int,
    qty int NOT NULL,
    amount numeric(12,2),
    note text
) PARTITION BY LIST (region);
CREATE TABLE ev_list_eu PARTITION OF ev_list FOR VALUES IN ('eu');
CREATE TABLE ev_list_us PARTITION OF ev_list FOR VALUES IN ('us');
CREATE TABLE ev_list_apac PARTITION OF ev_list FOR VALUES IN ('apac', 'jp');
CREATE TABLE ev_list_latam PARTITION OF ev_list FOR VALUES IN ('latam');
CREATE TABLE ev_list_other PARTITION OF ev_list DEFAULT;
INSERT INTO ev_list
SELECT g,
       CASE WHEN g % 101 = 0 THEN NULL
            ELSE (ARRAY['eu', 'us', 'apac', 'jp', 'latam', 'africa', 'eu', 'us', 'mena'])[1 + g % 9]
       END,
       DATE '2024-01-01' + (g % 182)::int,
       CASE WHEN g % 37 = 0 THEN NULL ELSE 1 + g % 55 END,
       1 + (g * 13) % 20,
       CASE WHEN g % 67 = 0 THEN NULL ELSE ((g * 6007) % 50000)::numeric / 100 END,
       'event ' || repeat(chr(97 + (g % 26)::int), 10 + (g % 20)::int)
FROM generate_series(1, 48000::bigint) g;
CREATE INDEX ev_list_id ON ev_list (id);

CREATE TABLE ev_range (
    id bigint NOT NULL,
    day date NOT NULL,
    region text,
    store_id int,
    qty int NOT NULL,
    amount numeric(12,2),
    note text,
    PRIMARY KEY (id, day)
) PARTITION BY RANGE (day);
CREATE TABLE ev_range_2024_01 PARTITION OF ev_range
    FOR VALUES FROM ('2024-01-01') TO ('2024-02-01');
CREATE TABLE ev_range_2024_02 PARTITION OF ev_range
    FOR VALUES FROM ('2024-02-01') TO ('2024-03-01');
CREATE TABLE ev_range_2024_03 PARTITION OF ev_range
    FOR VALUES FROM ('2024-03-01') TO ('2024-04-01') PARTITION BY HASH (id);
CREATE TABLE ev_range_2024_03_h0 PARTITION OF ev_range_2024_03
    FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE ev_range_2024_03_h1 PARTITION OF ev_range_2024_03
    FOR VALUES WITH (MODULUS 2, REMAINDER 1);
CREATE TABLE ev_range_2024_04 PARTITION OF ev_range
    FOR VALUES FROM ('2024-04-01') TO ('2024-05-01');
CREATE TABLE ev_range_2024_05 PARTITION OF ev_range
    FOR VALUES FROM ('2024-05-01') TO ('2024-06-01');
CREATE TABLE ev_range_2024_06 PARTITION OF ev_range
    FOR VALUES FROM ('2024-06-01') TO ('2024-07-01');
INSERT INTO ev_range
SELECT g,
       DATE '2024-01-01' + (g % 182)::int,
       CASE WHEN g % 43 = 0 THEN NULL
            ELSE (ARRAY['eu', 'us', 'apac', 'latam', 'africa'])[1 + g % 5] END,
       CASE WHEN g % 29 = 0 THEN NULL ELSE 1 + g % 50 END,
       1 + (g * 11) % 20,
       CASE WHEN g % 71 = 0 THEN NULL ELSE ((g * 4001) % 80000)::numeric / 100 END,
       'range ' || repeat(chr(97 + (g % 26)::int), 10 + (g % 20)::int)
FROM generate_series(1, 48000::bigint) g;

CREATE TABLE ev_hash (
    id bigint PRIMARY KEY,
    product_id int,
    day date NOT NULL,
    qty int NOT NULL,
    amount numeric(12,2),
    note text
) PARTITION BY HASH (id);
CREATE TABLE ev_hash_0 PARTITION OF ev_hash FOR VALUES WITH (MODULUS 4, REMAINDER 0);
CREATE TABLE ev_hash_1 PARTITION OF ev_hash FOR VALUES WITH (MODULUS 4, REMAINDER 1);
CREATE TABLE ev_hash_2 PARTITION OF ev_hash FOR VALUES WITH (MODULUS 4, REMAINDER 2);
CREATE TABLE ev_hash_3 PARTITION OF ev_hash FOR VALUES WITH (MODULUS 4, REMAINDER 3);
INSERT INTO ev_hash
SELECT g,
       CASE WHEN g % 59 = 0 THEN NULL ELSE 1 + (g * 7) % 200 END,
       DATE '2024-01-01' + (g % 182)::int,
       1 + (g * 7) % 20,
       CASE WHEN g % 83 = 0 THEN NULL ELSE ((g * 3001) % 90000)::numeric / 100 END,
       'hash ' || repeat(chr(97 + (g % 26)::int), 10 + (g % 20)::int)
FROM generate_series(1, 40000::bigint) g;
"#;

/// The partitioned tables and their leaf partitions.
const PARTITIONED: &[&str] = &["ev_list", "ev_range", "ev_hash"];

/// ANALYZE every table (partitioned parents and partitions), check the sizes the suite
/// relies on, and wait for the replicas to replay it all.
async fn analyze_and_check(c: &tokio_postgres::Client, db: &str) {
    c.batch_execute("VACUUM (ANALYZE)")
        .await
        .expect("VACUUM ANALYZE");
    // VACUUM skips partitioned parents' statistics only before PostgreSQL 14; be explicit
    for parent in PARTITIONED {
        let exists: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_class WHERE relname = $1 AND relkind = 'p'",
                &[parent],
            )
            .await
            .expect("pg_class")
            .get(0);
        if exists > 0 {
            c.batch_execute(&format!("ANALYZE {parent}"))
                .await
                .unwrap_or_else(|e| panic!("ANALYZE {parent}: {e}"));
        }
    }
    let pages: Vec<(String, i32)> = c
        .query(
            "SELECT relname::text, relpages FROM pg_class \
             WHERE relnamespace = 'public'::regnamespace AND relkind = 'r' ORDER BY relname",
            &[],
        )
        .await
        .expect("relpages")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (name, p) in &pages {
        let small = matches!(name.as_str(), "stores" | "products" | "regions");
        let ok = match name.as_str() {
            "sales" | "orders_f" => *p >= 64,
            _ if small => *p < 8,
            // partitions: each one splits on its own
            _ => *p >= 16,
        };
        assert!(ok, "{db}: {name} has {p} pages: {pages:?}");
    }
    eprintln!("{db}: pages: {pages:?}");
    wait_for_replicas(REPLAY_LIMIT).await;
}

/// Creates the suite's database: the star schema and the partitioned tables.
async fn setup_database() {
    create_database(DB).await;
    let c = connect_primary(DB).await;
    let collation = pick_collation(&c, "fanout_joins").await;
    c.batch_execute(&star_sql(&collation))
        .await
        .unwrap_or_else(|e| panic!("create the star schema: {e:?}"));
    c.batch_execute(PARTITIONED_SQL)
        .await
        .unwrap_or_else(|e| panic!("create the partitioned tables: {e:?}"));
    eprintln!("fanout_joins: collation of stores.name: {collation:?}");
    analyze_and_check(&c, DB).await;
}

/// The pgfan configuration: the primary and both replicas, small fragments, every GROUP BY
/// fans out (as in fanout_diff).
fn pgfan_config() -> String {
    assert!(
        cluster().replica_urls.len() >= 2,
        "the test cluster needs 2 replicas, has {:?}",
        cluster().replica_urls
    );
    format!(
        "{}min_rows_per_group = 0\n",
        fanout_config_toml_with_replicas()
    )
}

// ---------------------------------------------------------------------------------------
// Partition pruning
// ---------------------------------------------------------------------------------------

/// A query whose WHERE clause excludes partitions: only `survivors` (partitions at any
/// level of the tree) can hold matching rows.
struct PruneCase {
    sql: &'static str,
    parent: &'static str,
    where_clause: &'static str,
    survivors: &'static [&'static str],
}

const PRUNE_CASES: &[PruneCase] = &[
    PruneCase {
        sql: "SELECT id, amount FROM ev_list WHERE region = 'eu'",
        parent: "ev_list",
        where_clause: "region = 'eu'",
        survivors: &["ev_list_eu"],
    },
    PruneCase {
        sql: "SELECT region, count(*) FROM ev_list WHERE region IN ('eu', 'us') GROUP BY region",
        parent: "ev_list",
        where_clause: "region IN ('eu', 'us')",
        survivors: &["ev_list_eu", "ev_list_us"],
    },
    PruneCase {
        sql: "SELECT count(*), sum(amount) FROM ev_list WHERE region = 'africa'",
        parent: "ev_list",
        where_clause: "region = 'africa'",
        survivors: &["ev_list_other"],
    },
    PruneCase {
        sql: "SELECT count(*), sum(amount) FROM ev_range \
              WHERE day >= '2024-02-01' AND day < '2024-03-01'",
        parent: "ev_range",
        where_clause: "day >= '2024-02-01' AND day < '2024-03-01'",
        survivors: &["ev_range_2024_02"],
    },
    PruneCase {
        sql: "SELECT id, day FROM ev_range WHERE day >= '2024-03-10' AND day < '2024-04-20'",
        parent: "ev_range",
        where_clause: "day >= '2024-03-10' AND day < '2024-04-20'",
        survivors: &[
            "ev_range_2024_03",
            "ev_range_2024_03_h0",
            "ev_range_2024_03_h1",
            "ev_range_2024_04",
        ],
    },
    PruneCase {
        sql: "SELECT day, count(*) FROM ev_range WHERE day = '2024-06-30' GROUP BY day",
        parent: "ev_range",
        where_clause: "day = '2024-06-30'",
        survivors: &["ev_range_2024_06"],
    },
];

/// `(backend, sql)` of every `  Fragment <i> on <backend>: <sql>` line.
fn fragment_lines(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .filter_map(|l| {
            let rest = l.trim_start().strip_prefix("Fragment ")?;
            let (_, rest) = rest.split_once(" on ")?;
            let (backend, sql) = rest.split_once(": ")?;
            Some((backend.to_string(), sql.to_string()))
        })
        .collect()
}

/// The names of `partitions` that `text` mentions as identifiers (quoted or not,
/// schema-qualified or not), in order of first mention.
fn partitions_named(text: &str, partitions: &BTreeSet<String>) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if partitions.contains(word) && !found.iter().any(|f| f == word) {
            found.push(word.to_string());
        }
    }
    found
}

/// What `EXPLAIN (COSTS OFF)` of a fragment says about the partitions it reads.
#[derive(Debug, PartialEq, Eq)]
enum Planned {
    /// `Result` with `One-Time Filter: false` and no scan: PostgreSQL skips the fragment.
    Excluded,
    /// Some relation is scanned.
    Scans,
}

fn classify_plan(plan: &[String]) -> Planned {
    let scans = plan
        .iter()
        .any(|l| l.contains("Scan on ") || l.contains("Scan using "));
    let false_filter = plan.iter().any(|l| l.trim() == "One-Time Filter: false");
    let result = plan.iter().any(|l| {
        let t = l.trim_start().trim_start_matches("->").trim_start();
        t == "Result" || t.starts_with("Result ")
    });
    if !scans && false_filter && result {
        Planned::Excluded
    } else {
        Planned::Scans
    }
}

/// The relations a plan scans (`... Scan on <rel>`, `... Scan using <index> on <rel>`).
fn scanned_relations(plan: &[String]) -> Vec<String> {
    plan.iter()
        .filter(|l| l.contains("Scan"))
        .filter_map(|l| l.split(" on ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(|rel| {
            let rel = rel.trim_matches('"');
            rel.rsplit('.').next().unwrap_or(rel).to_string()
        })
        .collect()
}

/// `SET constraint_exclusion = on; EXPLAIN (COSTS OFF) <sql>` directly on the primary.
async fn explain_directly(direct: &mut WireClient, sql: &str) -> Result<Vec<String>, String> {
    let t = direct
        .simple_query(&format!(
            "SET constraint_exclusion = on; EXPLAIN (COSTS OFF) {sql}"
        ))
        .await
        .map_err(|e| format!("direct session failed: {e}"))?;
    if let Some(e) = t.errors().next() {
        return Err(format!("EXPLAIN failed: {} {}", e.code, e.message));
    }
    Ok(summarize(&t)
        .rows
        .iter()
        .filter_map(|r| r.first().cloned().flatten())
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        .collect())
}

/// The partitions of `parent` at every level below it (leaves and sub-partitioned ones).
async fn partitions_of(c: &tokio_postgres::Client, parent: &str) -> BTreeSet<String> {
    c.query(
        "SELECT relid::regclass::text FROM pg_partition_tree($1::text::regclass) \
         WHERE level > 0",
        &[&parent],
    )
    .await
    .unwrap_or_else(|e| panic!("partitions of {parent}: {e}"))
    .iter()
    .map(|r| r.get::<_, String>(0))
    .collect()
}

/// What the check of one pruning case found.
#[derive(Default)]
struct PruneReport {
    /// Violations of the contract.
    problems: Vec<String>,
    /// Excluded partitions that are scanned anyway inside a fragment that also reads a
    /// surviving partition (work PostgreSQL could skip; not a contract violation).
    wasted: Vec<String>,
    log: String,
}

/// Checks one pruning case against its fragments.
async fn check_prune_case(
    case: &PruneCase,
    fragments: &[(String, String)],
    partitions: &BTreeSet<String>,
    direct: &mut WireClient,
) -> PruneReport {
    let mut out = PruneReport {
        log: format!("{}\n", case.sql),
        ..PruneReport::default()
    };
    for s in case.survivors {
        assert!(
            partitions.contains(*s),
            "{s} is not a partition of {}",
            case.parent
        );
    }
    if fragments.len() < 2 {
        out.problems
            .push(format!("{} fragment lines", fragments.len()));
    }
    let mut scanning_survivors = 0;
    for (i, (backend, sql)) in fragments.iter().enumerate() {
        let n = i + 1;
        let named = partitions_named(sql, partitions);
        let plan = match explain_directly(direct, sql).await {
            Ok(plan) => plan,
            Err(e) => {
                out.problems
                    .push(format!("fragment {n} on {backend}: {e}: {sql}"));
                continue;
            }
        };
        let planned = classify_plan(&plan);
        out.log.push_str(&format!(
            "  fragment {n} on {backend} reads {named:?}: {planned:?}\n    {sql}\n"
        ));
        for l in &plan {
            out.log.push_str(&format!("      | {l}\n"));
        }
        let shown = plan.join(" | ");
        if named.is_empty() {
            out.problems.push(format!(
                "fragment {n} names no partition of {}: {sql}",
                case.parent
            ));
        } else if named.iter().any(|p| case.survivors.contains(&p.as_str())) {
            if planned == Planned::Excluded {
                out.problems.push(format!(
                    "fragment {n} reads {named:?} (some rows may match) but plans as \
                     excluded: {shown}"
                ));
            } else {
                scanning_survivors += 1;
            }
            let wasted: Vec<String> = scanned_relations(&plan)
                .into_iter()
                .filter(|r| partitions.contains(r) && !case.survivors.contains(&r.as_str()))
                .collect();
            if !wasted.is_empty() {
                out.wasted.push(format!(
                    "fragment {n} scans {wasted:?}, which `{}` excludes: {shown}",
                    case.where_clause
                ));
            }
        } else if planned != Planned::Excluded {
            out.problems.push(format!(
                "fragment {n} reads only {named:?}, which `{}` excludes, but PostgreSQL \
                 does not skip it with constraint_exclusion = on: {shown}\n        {sql}",
                case.where_clause
            ));
        }
    }
    if scanning_survivors == 0 {
        out.problems.push(format!(
            "no fragment reads a partition among {:?}",
            case.survivors
        ));
    }
    out
}

/// Fragments written by the test (direct mode): one per partition at every level, the
/// WHERE applied to it; and one UNION ALL of all leaves with the WHERE in every branch.
fn own_fragments(case: &PruneCase, partitions: &BTreeSet<String>) -> Vec<(String, String)> {
    let mut own: Vec<(String, String)> = partitions
        .iter()
        .map(|p| {
            (
                "primary".to_string(),
                format!(
                    "SELECT * FROM \"public\".\"{p}\" AS {} WHERE ({})",
                    case.parent, case.where_clause
                ),
            )
        })
        .collect();
    let excluded: Vec<String> = partitions
        .iter()
        .filter(|p| !case.survivors.contains(&p.as_str()))
        .map(|p| format!("SELECT * FROM public.{p} WHERE ({})", case.where_clause))
        .collect();
    if excluded.len() >= 2 {
        own.push((
            "primary".to_string(),
            format!(
                "SELECT count(*) FROM ({}) AS {}",
                excluded.join(" UNION ALL "),
                case.parent
            ),
        ));
    }
    own
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fanout_joins_differential() {
    let started = Instant::now();
    let corpus = corpus();
    setup_database().await;
    let pgfan = Pgfan::start_with_config(&pgfan_config(), &[]);
    let suite = Suite::new("fanout_joins", DB, &pgfan);
    suite.announce(&corpus, started);
    let runs = run_all(&corpus, &suite).await;
    finish(&suite, &corpus, runs, Vec::new(), pgfan, started).await;
}

/// Fragments that read excluded partitions directly cost (almost) nothing: with
/// `constraint_exclusion = on` PostgreSQL plans them as a one-time `false` filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fanout_joins_partition_pruning() {
    create_database(PRUNE_DB).await;
    let c = connect_primary(PRUNE_DB).await;
    c.batch_execute(PARTITIONED_SQL)
        .await
        .unwrap_or_else(|e| panic!("create the partitioned tables: {e:?}"));
    analyze_and_check(&c, PRUNE_DB).await;
    let pgfan = Pgfan::start_with_config(&pgfan_config(), &[]);
    let direct_mode = Pgfan::direct_mode();
    let mut direct = WireClient::connect(&cluster().primary_addr(), "postgres", PRUNE_DB)
        .await
        .expect("connect directly to the primary");
    let mut through = WireClient::connect(&pgfan.addr(), "postgres", PRUNE_DB)
        .await
        .expect("connect through pgfan");

    let mut failures = Vec::new();
    let mut wasted = Vec::new();
    let mut log = String::new();
    for case in PRUNE_CASES {
        let partitions = partitions_of(&c, case.parent).await;
        let fragments = if direct_mode {
            own_fragments(case, &partitions)
        } else {
            match common::diff::explain_fanout(&mut through, case.sql).await {
                Ok(Ok(lines)) => {
                    if !lines[0].starts_with("FanOut:") {
                        failures.push(format!(
                            "{}\n      not fanned out: EXPLAIN FANOUT says {:?}",
                            case.sql, lines[0]
                        ));
                        continue;
                    }
                    fragment_lines(&lines)
                }
                Ok(Err(problem)) => {
                    failures.push(format!("{}\n      {problem}", case.sql));
                    continue;
                }
                Err(e) => panic!("pgfan session failed: {e}"),
            }
        };
        let report = check_prune_case(case, &fragments, &partitions, &mut direct).await;
        log.push_str(&report.log);
        for p in report.problems {
            failures.push(format!("{}\n      {p}", case.sql));
        }
        for w in report.wasted {
            wasted.push(format!("{}\n      {w}", case.sql));
        }
    }
    if !wasted.is_empty() {
        log.push_str(&format!(
            "\n{} fragments scan partitions the WHERE excludes next to ones it keeps \
             (allowed, but PostgreSQL could skip them):\n  {}\n",
            wasted.len(),
            wasted.join("\n  ")
        ));
    }
    let path = test_logs_dir().join("fanout-joins-pruning.txt");
    let _ = std::fs::write(&path, &log);
    eprintln!(
        "fanout_joins pruning: {} cases, {} failures, {} fragments scanning excluded \
         partitions next to kept ones{}; log {}",
        PRUNE_CASES.len(),
        failures.len(),
        wasted.len(),
        if direct_mode {
            " (direct mode: fragments written by the test)"
        } else {
            ""
        },
        path.display()
    );
    if failures.is_empty() {
        drop(pgfan);
        drop_database(PRUNE_DB).await;
        return;
    }
    panic!(
        "{} pruning failures:\n  {}\nlog: {}\npgfan log {}:\n{}",
        failures.len(),
        failures.join("\n  "),
        path.display(),
        pgfan.log_path.display(),
        pgfan.log_tail()
    );
}

#[test]
fn corpus_is_large_and_well_formed() {
    let corpus = corpus();
    let n = corpus.len();
    check_corpus_basics(&corpus, 80, |sql| {
        ["sales", "ev_list", "ev_range", "ev_hash"].iter().any(|t| {
            sql.contains(&format!("FROM {t}"))
                || sql.contains(&format!("JOIN {t}"))
                || sql.contains(&format!(", {t} "))
        })
    });
    for q in &corpus {
        let partitioned = PARTITIONED.iter().any(|t| q.sql.contains(t));
        if q.route == Route::FanOut && partitioned {
            assert!(
                q.first_line == Some(common::diff::SPLIT_PARTITIONS),
                "a fan-out query on a partitioned table must split partitions: {}",
                q.sql
            );
        }
        if !q.line_prefixes.is_empty() {
            assert_eq!(q.route, Route::FanOut, "{}", q.sql);
        }
        if q.setup.is_some() {
            assert!(q.params.is_empty(), "{}", q.sql);
        }
    }
    let count = |r: Route| corpus.iter().filter(|q| q.route == r).count();
    eprintln!(
        "corpus: {n} queries ({} fan out, {} pass through, {} either; {} ordered, {} co-range, \
         {} partition-wise, {} with parameters, {} with a session set-up, {} errors)",
        count(Route::FanOut),
        count(Route::PassThrough),
        count(Route::Any),
        corpus.iter().filter(|q| q.ordered()).count(),
        corpus
            .iter()
            .filter(|q| !q.line_prefixes.is_empty())
            .count(),
        corpus.iter().filter(|q| q.first_line.is_some()).count(),
        corpus.iter().filter(|q| !q.params.is_empty()).count(),
        corpus.iter().filter(|q| q.setup.is_some()).count(),
        corpus
            .iter()
            .filter(|q| matches!(q.expect, Expect::Error(_)))
            .count(),
    );
    assert!(count(Route::FanOut) >= 60);
    assert!(count(Route::PassThrough) >= 10);
}

#[test]
fn pruning_helpers() {
    let leaves: BTreeSet<String> = ["ev_list_eu", "ev_list_us", "ev_list_other"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let lines: Vec<String> = [
        "FanOut: 2 fragments, split partitions on ev_list",
        "  Fragment 1 on primary: SELECT id FROM \"public\".\"ev_list_eu\" AS ev_list WHERE (region = 'eu')",
        "  Fragment 2 on replica1: SELECT id FROM (SELECT id, region FROM \"public\".\"ev_list_us\" \
         UNION ALL SELECT id, region FROM public.ev_list_other) AS ev_list WHERE (region = 'eu')",
        "  concat",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let f = fragment_lines(&lines);
    assert_eq!(f.len(), 2);
    assert_eq!(f[1].0, "replica1");
    assert!(f[0]
        .1
        .starts_with("SELECT id FROM \"public\".\"ev_list_eu\""));
    assert_eq!(partitions_named(&f[0].1, &leaves), vec!["ev_list_eu"]);
    assert_eq!(
        partitions_named(&f[1].1, &leaves),
        vec!["ev_list_us", "ev_list_other"]
    );
    let plan = |s: &[&str]| s.iter().map(|l| l.to_string()).collect::<Vec<_>>();
    assert_eq!(
        classify_plan(&plan(&["Result", "  One-Time Filter: false"])),
        Planned::Excluded
    );
    assert_eq!(
        classify_plan(&plan(&[
            "Aggregate",
            "  ->  Result",
            "        One-Time Filter: false"
        ])),
        Planned::Excluded
    );
    assert_eq!(
        classify_plan(&plan(&[
            "Aggregate",
            "  ->  Append",
            "        ->  Seq Scan on ev_list_us",
            "              Filter: (region = 'eu'::text)"
        ])),
        Planned::Scans
    );
    assert_eq!(
        classify_plan(&plan(&[
            "Seq Scan on ev_list_eu ev_list",
            "  Filter: (region = 'eu'::text)"
        ])),
        Planned::Scans
    );
    let mixed = plan(&[
        "Aggregate",
        "  ->  Append",
        "        ->  Seq Scan on ev_list_us",
        "        ->  Index Scan using ev_list_eu_id_idx on public.ev_list_eu ev_list_1",
        "        ->  Subquery Scan on \"*SELECT* 2\"",
    ]);
    assert_eq!(classify_plan(&mixed), Planned::Scans);
    assert_eq!(
        scanned_relations(&mixed),
        vec!["ev_list_us", "ev_list_eu", "*SELECT*"]
    );
    assert_eq!(
        classify_plan(&plan(&[
            "Index Only Scan using ev_hash_0_pkey on ev_hash_0",
            "  Index Cond: (id = 42)"
        ])),
        Planned::Scans
    );
}
