//! TPC-H differential test (issue 4, "A TPC-H kit").
//!
//! Loads TPC-H at scale factor 0.1 with `scripts/tpch load 0.1` (data from the tpchgen
//! generator, keys and indexes, replicas caught up; skipped when database `tpch_sf0_1`
//! already holds it), then runs each of the 22 queries of `tests/tpch/queries` directly on
//! the primary and through pgfan, in the simple protocol, the extended protocol with text
//! results and the extended protocol with binary results. Two pgfan configurations are
//! compared with the direct run: the primary alone with up to 4 fragments, and the primary
//! plus 2 replicas with up to 6. Every backend message must be identical: RowDescription
//! (column names, type OIDs, typmods, formats), every DataRow byte for byte and in order
//! (every query has a deterministic ORDER BY or returns one row), CommandComplete tags and
//! ReadyForQuery. Each query's route is asserted with `EXPLAIN FANOUT` through pgfan against
//! [`EXPECTED_ROUTES`], so that a silent fall-back to pass-through (or an unexpected
//! fan-out) fails the test.
//!
//! All failures are collected and reported in one assertion at the end; a summary (rows,
//! times, routes) is printed and written to `target/test-logs/tpch.txt`.
//!
//! Run: `cargo test --test tpch -- --nocapture`. With `PGFAN_TEST_PROXY=direct` no pgfan
//! runs (the direct server is compared with itself) and routes are not checked.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::wire::{diff, Mode, Msg, Transcript, WireClient};
use common::{cluster, show, test_logs_dir, Pgfan};

/// Scale factor of the test data and the database `scripts/tpch load` puts it in.
const SF: &str = "0.1";
const DB: &str = "tpch_sf0_1";

/// Fragments get at least this many heap pages. At SF 0.1 lineitem has about 11,000
/// pages, orders about 2,600, partsupp 1,750, part 410, customer 360 and supplier 23: with
/// 128, every table but supplier, nation and region splits, as the big tables do at
/// SF 1 with pgfan's default of 1024.
const MIN_FRAGMENT_PAGES: u64 = 128;

/// The route a query must take through pgfan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// `EXPLAIN FANOUT` says `FanOut: <n> fragments, ...` with n > 1.
    FanOut,
    /// `EXPLAIN FANOUT` says `PassThrough: <reason>`.
    PassThrough,
}

use Route::{FanOut, PassThrough};

/// The route of each query, one line per query, with the split pgfan takes.
const EXPECTED_ROUTES: [(u32, Route); 22] = [
    (1, FanOut),       // lineitem by ctid: aggregate, GROUP BY, ORDER BY
    (2, FanOut),       // partsupp by ps_partkey, part co-ranged; correlated subquery; top-N
    (3, FanOut),       // lineitem by l_orderkey, orders co-ranged
    (4, FanOut),       // orders by o_orderdate; EXISTS correlated with the split table
    (5, FanOut),       // lineitem by l_orderkey, orders co-ranged; 6-way join
    (6, FanOut),       // lineitem by l_shipdate: aggregate
    (7, FanOut),       // lineitem inside a derived table, orders co-ranged
    (8, FanOut),       // lineitem inside a derived table, part co-ranged
    (9, FanOut),       // lineitem inside a derived table, part and partsupp co-ranged
    (10, FanOut),      // lineitem by l_orderkey, orders co-ranged; 4-way join
    (11, FanOut),      // partsupp complete groups on ps_partkey (HAVING with a subquery)
    (12, FanOut),      // lineitem by l_orderkey, orders co-ranged
    (13, FanOut), // customer in a derived table grouped by c_custkey, orders co-ranged in the LEFT JOIN
    (14, FanOut), // lineitem by l_partkey, part co-ranged
    (15, PassThrough), // CTE read twice
    (16, FanOut), // partsupp by ps_partkey, part co-ranged; count(DISTINCT) deduplicated in the combine
    (17, FanOut), // lineitem by l_partkey, part co-ranged; correlated subquery
    (18, FanOut), // lineitem by l_orderkey, orders co-ranged; IN subquery
    (19, FanOut), // lineitem by ctid, part read whole
    (20, PassThrough), // ORDER BY s_name without LIMIT over a scan; supplier is tiny
    (21, FanOut), // lineitem l1 by l_orderkey, orders co-ranged; EXISTS / NOT EXISTS
    (22, FanOut), // customer in a derived table; NOT EXISTS
];

/// Queries that return exactly one row (an aggregate without GROUP BY) and so need no
/// ORDER BY.
const ONE_ROW: [u32; 4] = [6, 14, 17, 19];

struct Query {
    number: u32,
    /// The statement without comment lines and without the final semicolon.
    sql: String,
    route: Route,
}

impl Query {
    fn name(&self) -> String {
        format!("Q{}", self.number)
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The statement of a query file: comment lines dropped, whitespace and the final `;`
/// trimmed.
fn statement(text: &str) -> String {
    let body: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect();
    body.join("\n")
        .trim()
        .trim_end_matches(';')
        .trim_end()
        .to_string()
}

fn load_queries() -> Vec<Query> {
    EXPECTED_ROUTES
        .iter()
        .map(|&(number, route)| {
            let path = repo().join(format!("tests/tpch/queries/q{number:02}.sql"));
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            Query {
                number,
                sql: statement(&text),
                route,
            }
        })
        .collect()
}

/// Whether `sql` has an ORDER BY outside parentheses and string literals.
fn has_top_level_order_by(sql: &str) -> bool {
    let lower = sql.to_lowercase();
    let mut depth = 0i32;
    let mut in_string = false;
    let mut outside = String::new();
    for c in lower.chars() {
        match c {
            '\'' => in_string = !in_string,
            '(' if !in_string => depth += 1,
            ')' if !in_string => depth -= 1,
            _ if !in_string && depth == 0 => outside.push(c),
            _ => {}
        }
    }
    let words: Vec<&str> = outside.split_whitespace().collect();
    words.windows(2).any(|w| w == ["order", "by"])
}

/// Runs `scripts/tpch load 0.1` against the test cluster.
fn load_data() -> String {
    let c = cluster();
    let script = repo().join("scripts/tpch");
    let mut cmd = Command::new(&script);
    cmd.args(["load", SF, "--db", DB])
        .current_dir(repo())
        .stdin(Stdio::null())
        .env("PGFAN_PRIMARY_URL", &c.primary_url)
        .env("PGFAN_REPLICA_URLS", c.replica_urls.join(","))
        .env("PGFAN_PRIMARY_PORT", c.primary_port.to_string())
        .env("PGFAN_PG_BIN", &c.pg_bin);
    for var in [
        "PGOPTIONS",
        "PGDATABASE",
        "PGHOST",
        "PGPORT",
        "PGUSER",
        "PSQLRC",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "scripts/tpch load {SF} failed: {}",
        show(&out)
    );
    // progress lines (stderr) and the timing summary (stdout, only after a load)
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
    .trim()
    .to_string()
}

/// A pgfan configuration: the primary alone, or the primary plus the cluster's replicas.
fn pgfan_config(with_replicas: bool) -> String {
    let c = cluster();
    let mut toml = format!(
        r#"auth = "trust"

[[backends]]
name = "primary"
url = "{}"
role = "primary"
pool_size = 8
"#,
        c.primary_host_port()
    );
    if with_replicas {
        for (i, url) in c.replica_host_ports().iter().take(2).enumerate() {
            toml.push_str(&format!(
                r#"
[[backends]]
name = "replica{}"
url = "{url}"
role = "replica"
pool_size = 8
"#,
                i + 1
            ));
        }
    }
    toml.push_str(&format!(
        "\n[fanout]\nmin_fragment_pages = {MIN_FRAGMENT_PAGES}\nmax_fragments = {}\n",
        if with_replicas { 6 } else { 4 }
    ));
    toml
}

async fn run(client: &mut WireClient, mode: Mode, sql: &str) -> std::io::Result<Transcript> {
    match mode.format() {
        None => client.simple_query(sql).await,
        Some(format) => client.extended_query(sql, &[], format).await,
    }
}

/// The first line of `EXPLAIN FANOUT` and the number of fragments per backend
/// ("primary 2, replica1 2, replica2 2").
async fn explain_fanout(client: &mut WireClient, sql: &str) -> Result<(String, String), String> {
    let t = client
        .simple_query(&format!("EXPLAIN FANOUT {sql}"))
        .await
        .map_err(|e| format!("EXPLAIN FANOUT: {e}"))?;
    if let Some(e) = t.errors().next() {
        return Err(format!("EXPLAIN FANOUT failed: {e:?}"));
    }
    let lines: Vec<String> = t
        .data_rows()
        .iter()
        .filter_map(|r| r.first().cloned().flatten())
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        .collect();
    let first = lines
        .first()
        .cloned()
        .ok_or_else(|| "EXPLAIN FANOUT returned no rows".to_string())?;
    let mut per_backend: Vec<(String, usize)> = Vec::new();
    for l in &lines {
        // "  Fragment 1 on primary: ..."
        let Some(rest) = l.trim_start().strip_prefix("Fragment ") else {
            continue;
        };
        let Some(backend) = rest.split_whitespace().nth(2) else {
            continue;
        };
        let backend = backend.trim_end_matches(':').to_string();
        match per_backend.iter_mut().find(|(b, _)| *b == backend) {
            Some((_, n)) => *n += 1,
            None => per_backend.push((backend, 1)),
        }
    }
    let spread = per_backend
        .iter()
        .map(|(b, n)| format!("{b} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok((first, spread))
}

/// Whether the first line of EXPLAIN FANOUT matches the route.
fn route_ok(route: Route, line: &str) -> bool {
    match route {
        FanOut => line
            .strip_prefix("FanOut: ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n > 1),
        PassThrough => line.starts_with("PassThrough:"),
    }
}

fn data_row_count(t: &Transcript) -> usize {
    t.count(|m| matches!(m, Msg::DataRow(_)))
}

/// A pgfan instance under test.
struct Target {
    name: &'static str,
    pgfan: Pgfan,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpch_sf01_direct_vs_pgfan() {
    let started = Instant::now();
    let queries = load_queries();
    let loaded = tokio::task::spawn_blocking(load_data)
        .await
        .expect("load task");
    let load_time = started.elapsed();
    eprintln!("{loaded}\ntpch: load step took {load_time:.1?}");

    let direct_addr = cluster().primary_addr();
    let mut direct = WireClient::connect(&direct_addr, "postgres", DB)
        .await
        .expect("connect directly to the primary");
    let pages = direct
        .simple_query("SELECT relpages FROM pg_class WHERE relname = 'lineitem'")
        .await
        .expect("lineitem pages");
    let pages = pages
        .data_rows()
        .first()
        .and_then(|r| r[0].clone())
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        .unwrap_or_default();
    eprintln!("tpch: lineitem has {pages} heap pages; min_fragment_pages = {MIN_FRAGMENT_PAGES}");

    let direct_mode = Pgfan::direct_mode();
    assert!(
        cluster().replica_urls.len() >= 2,
        "the test cluster needs 2 replicas, has {:?}",
        cluster().replica_urls
    );
    let targets = vec![
        Target {
            name: "pgfan primary (4 fragments)",
            pgfan: Pgfan::start_with_config(&pgfan_config(false), &[]),
        },
        Target {
            name: "pgfan primary + 2 replicas (6 fragments)",
            pgfan: Pgfan::start_with_config(&pgfan_config(true), &[]),
        },
    ];

    let mut failures: Vec<String> = Vec::new();
    // per query: rows, direct ms (simple protocol), per target: ms and route
    let mut rows = vec![0usize; queries.len()];
    let mut direct_ms = vec![Duration::ZERO; queries.len()];
    let mut target_ms = vec![vec![Duration::ZERO; queries.len()]; targets.len()];
    let mut routes = vec![vec![String::new(); queries.len()]; targets.len()];

    // routes
    for (ti, target) in targets.iter().enumerate() {
        if direct_mode {
            break;
        }
        let mut client = WireClient::connect(&target.pgfan.addr(), "postgres", DB)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", target.name));
        for (qi, q) in queries.iter().enumerate() {
            match explain_fanout(&mut client, &q.sql).await {
                Ok((line, spread)) => {
                    if !route_ok(q.route, &line) {
                        failures.push(format!(
                            "[route] {} via {}: expected {:?}, EXPLAIN FANOUT says {line:?}",
                            q.name(),
                            target.name,
                            q.route
                        ));
                    }
                    routes[ti][qi] = if spread.is_empty() {
                        line
                    } else {
                        format!("{line} ({spread})")
                    };
                }
                Err(e) => {
                    failures.push(format!("[route] {} via {}: {e}", q.name(), target.name));
                    routes[ti][qi] = "ERROR".into();
                    client = WireClient::connect(&target.pgfan.addr(), "postgres", DB)
                        .await
                        .unwrap_or_else(|e| panic!("reconnect to {}: {e}", target.name));
                }
            }
        }
    }

    // results
    for mode in Mode::ALL {
        let mut clients = Vec::new();
        for target in &targets {
            clients.push(
                WireClient::connect(&target.pgfan.addr(), "postgres", DB)
                    .await
                    .unwrap_or_else(|e| panic!("connect to {}: {e}", target.name)),
            );
        }
        for (qi, q) in queries.iter().enumerate() {
            let t0 = Instant::now();
            let d = run(&mut direct, mode, &q.sql)
                .await
                .unwrap_or_else(|e| panic!("{} [{}] direct: {e}", q.name(), mode.tag()));
            let elapsed = t0.elapsed();
            // the direct run must be a real result: no error, at least one row
            if let Some(e) = d.errors().next() {
                panic!("{} [{}] fails directly: {e:?}", q.name(), mode.tag());
            }
            let n = data_row_count(&d);
            assert!(
                n > 0,
                "{} [{}] returns no rows directly",
                q.name(),
                mode.tag()
            );
            if mode == Mode::Simple {
                rows[qi] = n;
                direct_ms[qi] = elapsed;
            } else if n != rows[qi] {
                failures.push(format!(
                    "{} [{}]: {n} rows directly, {} in the simple protocol",
                    q.name(),
                    mode.tag(),
                    rows[qi]
                ));
            }
            for (ti, target) in targets.iter().enumerate() {
                let t0 = Instant::now();
                match run(&mut clients[ti], mode, &q.sql).await {
                    Ok(p) => {
                        if mode == Mode::Simple {
                            target_ms[ti][qi] = t0.elapsed();
                        }
                        if let Some(d) = diff(&d, &p) {
                            failures.push(format!(
                                "{} [{}] via {}: {d}",
                                q.name(),
                                mode.tag(),
                                target.name
                            ));
                        }
                    }
                    Err(e) => {
                        failures.push(format!(
                            "{} [{}] via {}: session failed: {e}",
                            q.name(),
                            mode.tag(),
                            target.name
                        ));
                        clients[ti] = WireClient::connect(&target.pgfan.addr(), "postgres", DB)
                            .await
                            .unwrap_or_else(|e| panic!("reconnect to {}: {e}", target.name));
                    }
                }
            }
        }
    }

    let mut summary = format!(
        "TPC-H SF {SF} ({DB}, lineitem {pages} pages): {} queries x {} modes, direct vs {}\n",
        queries.len(),
        Mode::ALL.len(),
        targets
            .iter()
            .map(|t| t.name)
            .collect::<Vec<_>>()
            .join(" and ")
    );
    for (qi, q) in queries.iter().enumerate() {
        summary.push_str(&format!(
            "{:>4} {:>5} rows  direct {:>7.1} ms",
            q.name(),
            rows[qi],
            direct_ms[qi].as_secs_f64() * 1000.0
        ));
        for (ti, _) in targets.iter().enumerate() {
            summary.push_str(&format!(
                "  pgfan#{} {:>7.1} ms",
                ti + 1,
                target_ms[ti][qi].as_secs_f64() * 1000.0
            ));
        }
        summary.push('\n');
        for (ti, _) in targets.iter().enumerate() {
            if !routes[ti][qi].is_empty() {
                summary.push_str(&format!("       pgfan#{}: {}\n", ti + 1, routes[ti][qi]));
            }
        }
    }
    let fanned: Vec<String> = queries
        .iter()
        .enumerate()
        .filter(|(qi, _)| routes[0][*qi].starts_with("FanOut:"))
        .map(|(_, q)| q.name())
        .collect();
    // the issue's bar, on the routes pgfan actually took
    if !direct_mode && fanned.len() < 16 {
        failures.push(format!(
            "[routes] only {} of 22 queries fan out (at least 16 must)",
            fanned.len()
        ));
    }
    summary.push_str(&format!(
        "fanned out{}: {}\n",
        if direct_mode {
            " (direct mode: routes not checked)"
        } else {
            ""
        },
        if fanned.is_empty() {
            "none".to_string()
        } else {
            fanned.join(", ")
        }
    ));
    for (i, t) in targets.iter().enumerate() {
        summary.push_str(&format!("pgfan#{}: {}\n", i + 1, t.name));
    }
    summary.push_str(&format!(
        "{} failures; load step {load_time:.1?}, whole test {:.1?}\n",
        failures.len(),
        started.elapsed()
    ));
    eprint!("{summary}");
    let logs = test_logs_dir();
    let _ = std::fs::write(logs.join("tpch.txt"), &summary);
    if !failures.is_empty() {
        let mut report = format!("{} failures:\n", failures.len());
        for f in &failures {
            report.push_str(&format!("  {f}\n"));
        }
        let _ = std::fs::write(logs.join("tpch-failures.txt"), &report);
        let logs: Vec<String> = targets
            .iter()
            .map(|t| format!("{} log {}", t.name, t.pgfan.log_path.display()))
            .collect();
        panic!("{report}\n{}", logs.join("\n"));
    }
}

/// The query files and the route table agree with the rules of the kit.
#[test]
fn queries_are_well_formed() {
    let queries = load_queries();
    assert_eq!(queries.len(), 22);
    for (i, q) in queries.iter().enumerate() {
        assert_eq!(q.number, i as u32 + 1, "EXPECTED_ROUTES out of order");
        let lower = q.sql.to_lowercase();
        assert!(
            lower.starts_with("select") || lower.starts_with("with"),
            "{}",
            q.name()
        );
        assert!(
            !q.sql.contains(';'),
            "{}: more than one statement",
            q.name()
        );
        assert!(!lower.contains("limit -1"), "{}", q.name());
        assert_eq!(
            has_top_level_order_by(&q.sql),
            !ONE_ROW.contains(&q.number),
            "{}: a query must have a top-level ORDER BY unless it returns one row",
            q.name()
        );
    }
    assert!(has_top_level_order_by("select a from t order by a"));
    assert!(!has_top_level_order_by(
        "select (select x from t order by x limit 1)"
    ));
    assert!(!has_top_level_order_by("select 'order by' from t"));
    assert_eq!(statement("-- c\nselect 1\nfrom t;\n"), "select 1\nfrom t");
    assert!(route_ok(
        FanOut,
        "FanOut: 4 fragments, split ctid on lineitem"
    ));
    assert!(!route_ok(
        FanOut,
        "FanOut: 1 fragments, split ctid on lineitem"
    ));
    assert!(!route_ok(FanOut, "PassThrough: join"));
    assert!(route_ok(PassThrough, "PassThrough: join"));
    assert!(!route_ok(PassThrough, "FanOut: 4 fragments"));
}
