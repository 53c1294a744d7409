//! Planner and merge micro-benchmarks.
//!
//! `cargo bench --bench plan` measures, per statement, what pgfan spends before the first
//! fragment is sent: `Candidate::parse` (sqlparser + shape check) plus `plan::plan`
//! (aggregate rewrite, split choice, fragment SQL), against a synthetic catalog entry, for
//! TPC-H Q1 (fans out) and a pgbench point query (passes through as a point lookup). It
//! also measures `merge::PartialRows`: pushing 10,000 partial DataRows and building the
//! binary arrays the combine step sends to PostgreSQL.

use std::hint::black_box;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use pgfan::config::FanoutConfig;
use pgfan::merge::PartialRows;
use pgfan::plan::{self, Candidate, ColumnInfo, Route, TableInfo, TableSet};

/// TPC-H Q1 as the TPC-H test and benchmark run it.
const TPCH_Q1: &str = include_str!("../tests/tpch/queries/q01.sql");

const POINT_QUERY: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 42";

/// Fragment slots the backends offer (primary + 2 replicas, 8 connections each).
const SLOTS: usize = 24;

fn column(name: &str, type_oid: u32, type_name: &str) -> ColumnInfo {
    let collatable = matches!(type_oid, 25 | 1042 | 1043);
    ColumnInfo {
        name: name.to_string(),
        type_oid,
        type_name: type_name.to_string(),
        collation: collatable.then(|| "\"pg_catalog\".\"default\"".to_string()),
        deterministic: true,
        indexed: false,
        histogram: Vec::new(),
        null_frac: 0.0,
        common_values: Vec::new(),
        common_freqs: Vec::new(),
        n_distinct: -1.0,
    }
}

/// 101 equal-depth bounds over 1..=max, as `pg_stats.histogram_bounds` would give.
fn int_histogram(max: u64) -> Vec<String> {
    (0..=100u64)
        .map(|i| (1 + i * (max - 1) / 100).to_string())
        .collect()
}

fn date_histogram() -> Vec<String> {
    // the first of every month, 1992-01-01 .. 1998-12-01 (85 sorted bounds)
    (0..85)
        .map(|m| format!("{}-{:02}-01", 1992 + m / 12, 1 + m % 12))
        .collect()
}

fn lineitem() -> TableInfo {
    let mut columns = vec![
        column("l_orderkey", 20, "bigint"),
        column("l_partkey", 20, "bigint"),
        column("l_suppkey", 20, "bigint"),
        column("l_linenumber", 23, "integer"),
        column("l_quantity", 1700, "numeric(15,2)"),
        column("l_extendedprice", 1700, "numeric(15,2)"),
        column("l_discount", 1700, "numeric(15,2)"),
        column("l_tax", 1700, "numeric(15,2)"),
        column("l_returnflag", 1042, "character(1)"),
        column("l_linestatus", 1042, "character(1)"),
        column("l_shipdate", 1082, "date"),
        column("l_commitdate", 1082, "date"),
        column("l_receiptdate", 1082, "date"),
        column("l_shipinstruct", 1042, "character(25)"),
        column("l_shipmode", 1042, "character(10)"),
        column("l_comment", 1043, "character varying(44)"),
    ];
    columns[0].indexed = true;
    columns[0].histogram = int_histogram(6_000_000);
    columns[10].indexed = true;
    columns[10].histogram = date_histogram();
    // pg_stats at SF 1: Q1 groups into 3 x 2 groups (without these, every column looks
    // unique and Q1 would plan as a many-groups pass-through)
    columns[8].n_distinct = 3.0;
    columns[9].n_distinct = 2.0;
    TableInfo {
        oid: 16_384,
        qualified: "\"public\".\"lineitem\"".into(),
        kind: 'r',
        temporary: false,
        blocks: 100_000,
        reltuples: 6_000_000.0,
        columns,
        partitions: vec![],
    }
}

fn pgbench_accounts() -> TableInfo {
    let mut columns = vec![
        column("aid", 23, "integer"),
        column("bid", 23, "integer"),
        column("abalance", 23, "integer"),
        column("filler", 1042, "character(84)"),
    ];
    columns[0].indexed = true;
    columns[0].histogram = int_histogram(10_000_000);
    TableInfo {
        oid: 16_400,
        qualified: "\"public\".\"pgbench_accounts\"".into(),
        kind: 'r',
        temporary: false,
        blocks: 100_000,
        reltuples: 10_000_000.0,
        columns,
        partitions: vec![],
    }
}

/// The catalog of a one-table statement: `table` under the name the statement uses.
fn tables_of(name: &str, table: &TableInfo) -> TableSet {
    TableSet::new(vec![(format!("\"{name}\""), Arc::new(table.clone()))])
}

fn parse_and_plan(sql: &str, tables: &TableSet, cfg: &FanoutConfig) -> Route {
    match Candidate::parse(sql) {
        Ok(c) => plan::plan(&c, tables, cfg, SLOTS),
        Err(reason) => Route::PassThrough(reason),
    }
}

fn describe(route: &Route) -> String {
    match route {
        Route::FanOut(p) => format!(
            "fan-out, {} fragments by {}",
            p.fragments.len(),
            p.split.describe()
        ),
        Route::PassThrough(r) => format!("pass-through ({}: {})", r.label, r.detail),
    }
}

fn bench_plan(c: &mut Criterion) {
    let cfg = FanoutConfig::default();
    let lineitem = tables_of("lineitem", &lineitem());
    let accounts = tables_of("pgbench_accounts", &pgbench_accounts());
    // Say once which route each statement takes, so a silent change shows in the output.
    eprintln!(
        "route of tpch_q1: {}",
        describe(&parse_and_plan(TPCH_Q1, &lineitem, &cfg))
    );
    eprintln!(
        "route of oltp_point: {}",
        describe(&parse_and_plan(POINT_QUERY, &accounts, &cfg))
    );

    let mut g = c.benchmark_group("plan");
    g.bench_function("tpch_q1/parse", |b| {
        b.iter(|| Candidate::parse(black_box(TPCH_Q1)))
    });
    g.bench_function("tpch_q1/parse+plan", |b| {
        b.iter(|| parse_and_plan(black_box(TPCH_Q1), &lineitem, &cfg))
    });
    let q1 = Candidate::parse(TPCH_Q1).expect("TPC-H Q1 parses");
    g.bench_function("tpch_q1/analyze", |b| {
        b.iter(|| plan::rewrite::analyze(black_box(&q1), &lineitem, &cfg))
    });
    let shape = plan::rewrite::analyze(&q1, &lineitem, &cfg).expect("TPC-H Q1 analyzes");
    g.bench_function("tpch_q1/split", |b| {
        b.iter(|| plan::split::choose(black_box(&shape.site), &cfg, SLOTS, None))
    });
    // A statement text seen before: the parse and the analysis come from the caches, so
    // planning is the lookup, the split choice and the predicate splice.
    let statements = plan::cache::StatementCache::default();
    g.bench_function("tpch_q1/parse+plan, repeated text", |b| {
        b.iter(|| match statements.parse(black_box(TPCH_Q1)) {
            Ok(c) => plan::plan_shared(&c, &lineitem, &cfg, SLOTS),
            Err(reason) => Route::PassThrough(reason),
        })
    });
    g.bench_function("oltp_point/parse", |b| {
        b.iter(|| Candidate::parse(black_box(POINT_QUERY)))
    });
    g.bench_function("oltp_point/parse+plan", |b| {
        b.iter(|| parse_and_plan(black_box(POINT_QUERY), &accounts, &cfg))
    });
    // `pgbench -M simple`: the same statement with a new literal each time. The cache
    // parses the shape once; a point lookup is decided on the shape's template ("screen"),
    // anything else fills the literals into a copy of the template's tree and plans that
    // ("fill+plan"), which is also what every text cost before the cache knew shapes.
    let shapes = plan::cache::StatementCache::default();
    let texts: Vec<String> = (0..1024)
        .map(|i| {
            format!(
                "SELECT abalance FROM pgbench_accounts WHERE aid = {};",
                i * 7919 + 1
            )
        })
        .collect();
    // the first text parses the shape; from the second on the template is known
    let _ = shapes.lookup(&texts[0]);
    let template = shapes.lookup(&texts[1]);
    eprintln!(
        "route of oltp_point's template: {}",
        describe(&match template.template() {
            Some(t) => plan::plan_shared(t, &accounts, &cfg, SLOTS),
            None => Route::PassThrough(plan::PassReason::new("none", "no template")),
        })
    );
    let mut next = texts.iter().cycle();
    g.bench_function("oltp_point/screen, new literal", |b| {
        b.iter(|| {
            let lookup = shapes.lookup(black_box(next.next().map_or("", String::as_str)));
            lookup
                .template()
                .map(|t| plan::plan_shared(t, &accounts, &cfg, SLOTS))
        })
    });
    g.bench_function("oltp_point/lookup, new literal", |b| {
        b.iter(|| {
            let lookup = shapes.lookup(black_box(next.next().map_or("", String::as_str)));
            lookup.template().is_some()
        })
    });
    g.bench_function("oltp_point/fill+plan, new literal", |b| {
        b.iter(|| {
            let sql = next.next().map_or("", String::as_str);
            match shapes.lookup(black_box(sql)).candidate(sql) {
                Ok(c) => plan::plan_shared(&c, &accounts, &cfg, SLOTS),
                Err(reason) => Route::PassThrough(reason),
            }
        })
    });
    g.bench_function("oltp_point/worth_parsing", |b| {
        b.iter(|| plan::worth_parsing(black_box(POINT_QUERY)))
    });
    g.finish();
}

/// 10,000 binary partial rows as a Q1 fragment would send them: two bpchar keys, numeric
/// sums (as text-sized blobs), a bigint count, with a NULL now and then.
fn partial_datarows(n: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| {
            let values: [Option<Vec<u8>>; 5] = [
                Some(vec![b"ANR"[i % 3]]),
                Some(vec![b"FO"[i % 2]]),
                Some((i as i64 * 1234).to_be_bytes().to_vec()),
                (i % 97 != 0).then(|| vec![0, 2, 0, 1, 0, 0, 0, 2, 0x04, 0xd2, 0x16, 0x2e]),
                Some((i as i64).to_be_bytes().to_vec()),
            ];
            let mut body = BytesMut::new();
            body.put_i16(values.len() as i16);
            for v in &values {
                match v {
                    None => body.put_i32(-1),
                    Some(v) => {
                        body.put_i32(v.len() as i32);
                        body.put_slice(v);
                    }
                }
            }
            let mut msg = BytesMut::with_capacity(body.len() + 5);
            msg.put_u8(b'D');
            msg.put_i32(body.len() as i32 + 4);
            msg.put_slice(&body);
            msg.freeze()
        })
        .collect()
}

fn bench_merge(c: &mut Criterion) {
    const N: usize = 10_000;
    let rows = partial_datarows(N);
    let types = vec![1042, 1042, 20, 1700, 20];
    let mut g = c.benchmark_group("merge");
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("partial_rows/push_10k", |b| {
        b.iter_batched(
            || {
                let mut p = PartialRows::default();
                p.describe(types.clone());
                p
            },
            |mut p| {
                for r in &rows {
                    assert!(p.push(r));
                }
                p
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("partial_rows/push+arrays_10k", |b| {
        b.iter(|| {
            let mut p = PartialRows::default();
            p.describe(types.clone());
            for r in &rows {
                assert!(p.push(r));
            }
            (0..types.len()).map(|i| p.array(i)).collect::<Vec<_>>()
        })
    });
    g.finish();
}

criterion_group!(benches, bench_plan, bench_merge);
criterion_main!(benches);
