//! The differential machinery shared by the fan-out suites (`fanout_diff`, `fanout_joins`;
//! DESIGN.md "Testing"): a corpus of [`Query`]s annotated with the route pgfan must take,
//! run directly on the primary and through pgfan in the three [`Mode`]s, compared message
//! by message ([`compare`]), with the routes asserted through `EXPLAIN FANOUT`
//! ([`check_routes`]) and one report at the end ([`finish`]).
//!
//! Compared: the message sequence (without DataRows), the RowDescription (names, type OIDs,
//! typmods), data rows byte for byte (as sorted multisets when the query has no top-level
//! ORDER BY), command tags, and errors (severity, SQLSTATE, message). Queries flagged `tol`
//! allow a relative difference of [`FLOAT_REL_TOL`] in float4/float8 columns.
//!
//! In direct mode (`PGFAN_TEST_PROXY=direct`) the compared session is a second direct
//! session with forced parallel plans ([`PARALLEL_SETTINGS`]) and routes are not checked:
//! that checks a corpus itself (its annotations, ORDER BY determinism, tolerance flags).

use std::cmp::Ordering;
use std::time::Instant;

use super::wire::{ErrorInfo, FieldDesc, Mode, Msg, Oid, Raw, Transcript, WireClient};
use super::{cluster, drop_database, test_logs_dir, Pgfan};

/// Relative tolerance for float4/float8 columns of queries flagged `tol`.
pub const FLOAT_REL_TOL: f64 = 1e-12;
pub const FLOAT4_OID: u32 = 700;
pub const FLOAT8_OID: u32 = 701;

/// Settings of the compared session in direct mode: parallel plans wherever possible.
pub const PARALLEL_SETTINGS: &str = "SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; \
     SET min_parallel_table_scan_size = 0; SET min_parallel_index_scan_size = 0; \
     SET max_parallel_workers_per_gather = 4; SET parallel_leader_participation = off";

/// The line EXPLAIN FANOUT shows when a join of two split tables reads both in key ranges.
pub const CO_RANGE_LINE: &str = "  Co-range:";

/// What the first line of EXPLAIN FANOUT says for partition-wise fragments.
pub const SPLIT_PARTITIONS: &str = "split partitions";

// ---------------------------------------------------------------------------------------
// Corpus
// ---------------------------------------------------------------------------------------

/// The route a query must take through pgfan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `expect_fanout = true`: EXPLAIN FANOUT says `FanOut: <n> fragments` with n > 1.
    FanOut,
    /// `expect_fanout = false`: EXPLAIN FANOUT says `PassThrough: ...`.
    PassThrough,
    /// The contract leaves the route open; only the results are compared.
    Any,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    Ok,
    /// The direct run fails with this SQLSTATE.
    Error(&'static str),
}

#[derive(Clone, Debug)]
pub struct Query {
    /// SQL as sent in the extended protocol (may use `$n`).
    pub sql: String,
    /// Text parameters for `$n`; the simple protocol gets them inlined as literals.
    pub params: Vec<Option<String>>,
    pub route: Route,
    pub expect: Expect,
    /// float4/float8 columns may differ by a relative 1e-12.
    pub float_tol: bool,
    /// Text some line of EXPLAIN FANOUT must contain (the merge it must use).
    pub merge: Option<&'static str>,
    /// Text the first line of EXPLAIN FANOUT must contain (e.g. [`SPLIT_PARTITIONS`]).
    pub first_line: Option<&'static str>,
    /// Prefixes of lines EXPLAIN FANOUT must show (e.g. [`CO_RANGE_LINE`]).
    pub line_prefixes: Vec<&'static str>,
    /// Statements run (simple protocol) on fresh sessions, directly and through pgfan,
    /// before the query runs or is explained on them (e.g. creating a TEMP table); the
    /// sessions are closed afterwards, so the state does not leak into other queries.
    pub setup: Option<String>,
}

pub fn query(sql: impl Into<String>, route: Route) -> Query {
    Query {
        sql: sql.into(),
        params: Vec::new(),
        route,
        expect: Expect::Ok,
        float_tol: false,
        merge: None,
        first_line: None,
        line_prefixes: Vec::new(),
        setup: None,
    }
}

/// Must fan out.
pub fn fan(sql: impl Into<String>) -> Query {
    query(sql, Route::FanOut)
}

/// Must pass through.
pub fn pass(sql: impl Into<String>) -> Query {
    query(sql, Route::PassThrough)
}

/// Either route.
pub fn any(sql: impl Into<String>) -> Query {
    query(sql, Route::Any)
}

impl Query {
    /// EXPLAIN FANOUT must show this merge (a substring of one of its lines).
    pub fn merge(mut self, merge: &'static str) -> Self {
        self.merge = Some(merge);
        self
    }

    /// The first line of EXPLAIN FANOUT must contain `text`.
    pub fn first_line(mut self, text: &'static str) -> Self {
        self.first_line = Some(text);
        self
    }

    /// EXPLAIN FANOUT must have a line starting with `prefix`.
    pub fn line_prefix(mut self, prefix: &'static str) -> Self {
        self.line_prefixes.push(prefix);
        self
    }

    /// A join of two split tables read in matching key ranges: EXPLAIN FANOUT shows a
    /// `  Co-range:` line.
    pub fn co_range(self) -> Self {
        self.line_prefix(CO_RANGE_LINE)
    }

    /// Partition-wise fragments: the first line of EXPLAIN FANOUT says `split partitions`.
    pub fn split_partitions(self) -> Self {
        self.first_line(SPLIT_PARTITIONS)
    }

    /// Runs `sql` first on fresh sessions (see [`Query::setup`]).
    pub fn setup(mut self, sql: impl Into<String>) -> Self {
        self.setup = Some(sql.into());
        self
    }

    pub fn tol(self) -> Self {
        self.tol_if(true)
    }

    pub fn tol_if(mut self, on: bool) -> Self {
        self.float_tol |= on;
        self
    }

    pub fn err(mut self, code: &'static str) -> Self {
        self.expect = Expect::Error(code);
        self
    }

    pub fn params(mut self, params: &[Option<&str>]) -> Self {
        self.params = params.iter().map(|p| p.map(String::from)).collect();
        self
    }

    /// The SQL for the simple protocol and for EXPLAIN FANOUT: parameters inlined.
    pub fn simple_sql(&self) -> String {
        inline_params(&self.sql, &self.params)
    }

    /// Whether rows must come in the same order (top-level ORDER BY).
    pub fn ordered(&self) -> bool {
        has_top_level_order_by(&self.sql)
    }
}

/// Replaces `$n` by the literal of parameter n: bare integers (negative ones in
/// parentheses), quoted strings otherwise, NULL for None.
/// Checks every corpus: at least `min` queries, no duplicates, `$n` exactly when there are
/// parameters, and every query that must fan out reading a table `on_large_table` accepts.
pub fn check_corpus_basics(corpus: &[Query], min: usize, on_large_table: impl Fn(&str) -> bool) {
    let n = corpus.len();
    assert!(n >= min, "corpus has only {n} queries");
    let mut seen = std::collections::HashSet::new();
    for q in corpus {
        assert!(
            seen.insert((q.sql.clone(), q.params.clone())),
            "duplicate query {}",
            q.sql
        );
        let placeholders = q.sql.matches('$').count();
        assert_eq!(
            placeholders > 0,
            !q.params.is_empty(),
            "params and $n disagree: {}",
            q.sql
        );
        if q.route == Route::FanOut {
            assert!(
                on_large_table(&q.sql),
                "fan-out query without a large table: {}",
                q.sql
            );
        }
    }
}

pub fn inline_params(sql: &str, params: &[Option<String>]) -> String {
    let chars: Vec<char> = sql.chars().collect();
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '$' && chars.get(i + 1).is_some_and(|c| c.is_ascii_digit()) {
            let mut j = i + 1;
            while j < chars.len() && chars[j].is_ascii_digit() {
                j += 1;
            }
            let n: usize = chars[i + 1..j].iter().collect::<String>().parse().unwrap();
            let p = params
                .get(n - 1)
                .unwrap_or_else(|| panic!("{sql}: no value for ${n}"));
            out.push_str(&match p {
                None => "NULL".to_string(),
                Some(v) if v.parse::<i64>().is_ok_and(|x| x < 0) => format!("({v})"),
                Some(v) if v.parse::<i64>().is_ok() => v.clone(),
                Some(v) => format!("'{}'", v.replace('\'', "''")),
            });
            i = j;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// `ORDER BY` outside parentheses, string literals and quoted identifiers.
pub fn has_top_level_order_by(sql: &str) -> bool {
    let mut depth = 0i32;
    let mut words: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let flush = |cur: &mut String, words: &mut Vec<String>| {
        if !cur.is_empty() {
            words.push(std::mem::take(cur));
        }
    };
    for c in sql.chars() {
        if let Some(q) = quote {
            if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '\'' | '"' => {
                flush(&mut cur, &mut words);
                quote = Some(c);
            }
            '(' => {
                flush(&mut cur, &mut words);
                depth += 1;
            }
            ')' => {
                flush(&mut cur, &mut words);
                depth -= 1;
            }
            c if c.is_alphanumeric() || c == '_' => {
                if depth == 0 {
                    cur.push(c.to_ascii_uppercase());
                }
            }
            _ => flush(&mut cur, &mut words),
        }
    }
    flush(&mut cur, &mut words);
    words.windows(2).any(|w| w[0] == "ORDER" && w[1] == "BY")
}
// ---------------------------------------------------------------------------------------
// Running and comparing
// ---------------------------------------------------------------------------------------

pub async fn run_query(
    client: &mut WireClient,
    q: &Query,
    mode: Mode,
) -> std::io::Result<Transcript> {
    match mode.format() {
        None => client.simple_query(&q.simple_sql()).await,
        Some(format) => {
            let params: Vec<Option<&str>> = q.params.iter().map(|p| p.as_deref()).collect();
            client.extended_query(&q.sql, &params, format).await
        }
    }
}

/// The parts of a transcript that are compared.
pub struct Summary<'a> {
    /// Message kinds in order, DataRows left out.
    pub shape: Vec<&'static str>,
    pub fields: Option<&'a [FieldDesc]>,
    pub rows: Vec<&'a [Option<Raw>]>,
    pub tags: Vec<&'a str>,
    pub error: Option<&'a ErrorInfo>,
    pub status: Option<char>,
}

pub fn summarize(t: &Transcript) -> Summary<'_> {
    Summary {
        shape: t
            .messages
            .iter()
            .filter(|m| !matches!(m, Msg::DataRow(_)))
            .map(Msg::kind)
            .collect(),
        fields: t.messages.iter().find_map(|m| match m {
            Msg::RowDescription(f) => Some(f.as_slice()),
            _ => None,
        }),
        rows: t.data_rows(),
        tags: t.command_tags(),
        error: t.errors().next(),
        status: t.status(),
    }
}

pub fn show_error(e: &ErrorInfo) -> String {
    format!("{} {} {:?}", e.severity, e.code, e.message)
}

/// A float4/float8 value in text or binary format.
pub fn parse_float(raw: &Raw, format: i16) -> Option<f64> {
    if format == 1 {
        match raw.0.len() {
            8 => Some(f64::from_be_bytes(raw.0[..8].try_into().ok()?)),
            4 => Some(f32::from_be_bytes(raw.0[..4].try_into().ok()?) as f64),
            _ => None,
        }
    } else {
        std::str::from_utf8(&raw.0).ok()?.trim().parse::<f64>().ok()
    }
}

pub fn floats_close(x: f64, y: f64) -> bool {
    (x.is_nan() && y.is_nan())
        || x == y
        || (x.is_finite() && y.is_finite() && (x - y).abs() <= FLOAT_REL_TOL * x.abs().max(y.abs()))
}

/// How each column is compared: `Some(format)` for a float column compared with the
/// tolerance, `None` for exact bytes.
pub fn column_modes(q: &Query, fields: Option<&[FieldDesc]>) -> Vec<Option<i16>> {
    fields
        .unwrap_or_default()
        .iter()
        .map(|f| {
            let float = matches!(f.type_oid, Oid::Sys(FLOAT4_OID) | Oid::Sys(FLOAT8_OID));
            (q.float_tol && float).then_some(f.format)
        })
        .collect()
}

pub fn cell_eq(a: &Option<Raw>, b: &Option<Raw>, mode: Option<i16>) -> bool {
    if a == b {
        return true;
    }
    match (a, b, mode) {
        (Some(x), Some(y), Some(fmt)) => match (parse_float(x, fmt), parse_float(y, fmt)) {
            (Some(x), Some(y)) => floats_close(x, y),
            _ => false,
        },
        _ => false,
    }
}

/// Order for comparing unordered results: exact columns first (bytes), then tolerant
/// float columns (by value), so that near-equal floats do not reorder rows.
pub fn row_cmp(a: &[Option<Raw>], b: &[Option<Raw>], modes: &[Option<i16>]) -> Ordering {
    let bytes = |v: &Option<Raw>| v.as_ref().map(|r| r.0.clone());
    for c in 0..a.len().min(b.len()) {
        if modes.get(c).copied().flatten().is_some() {
            continue;
        }
        let o = bytes(&a[c]).cmp(&bytes(&b[c]));
        if o != Ordering::Equal {
            return o;
        }
    }
    for c in 0..a.len().min(b.len()) {
        let Some(fmt) = modes.get(c).copied().flatten() else {
            continue;
        };
        let val = |v: &Option<Raw>| v.as_ref().map(|r| parse_float(r, fmt));
        let o = match (val(&a[c]), val(&b[c])) {
            (Some(Some(x)), Some(Some(y))) => x.total_cmp(&y),
            (x, y) => x.is_some().cmp(&y.is_some()),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    a.len().cmp(&b.len())
}

pub fn show_cell(v: &Option<Raw>, mode: Option<i16>) -> String {
    match v {
        None => "NULL".into(),
        Some(r) => match mode.and_then(|fmt| parse_float(r, fmt)) {
            Some(f) if mode == Some(1) => format!("{r:?} (= {f:e})"),
            _ => format!("{r:?}"),
        },
    }
}

pub fn show_row(row: &[Option<Raw>]) -> String {
    let cells: Vec<String> = row.iter().map(|v| show_cell(v, None)).collect();
    format!("({})", cells.join(", "))
}

/// `None` when the pgfan transcript `p` matches the direct transcript `d`, otherwise the
/// first difference.
pub fn compare(q: &Query, d: &Transcript, p: &Transcript) -> Option<String> {
    let (ds, ps) = (summarize(d), summarize(p));
    match (ds.error, ps.error) {
        (Some(de), Some(pe)) => {
            if (&de.severity, &de.code, &de.message) != (&pe.severity, &pe.code, &pe.message) {
                return Some(format!(
                    "error differs: direct {} vs pgfan {}",
                    show_error(de),
                    show_error(pe)
                ));
            }
            if ds.status != ps.status {
                return Some(format!(
                    "ReadyForQuery differs: direct {:?} vs pgfan {:?}",
                    ds.status, ps.status
                ));
            }
            return None;
        }
        (Some(de), None) => {
            return Some(format!(
                "direct failed with {} but pgfan succeeded ({} rows, tags {:?})",
                show_error(de),
                ps.rows.len(),
                ps.tags
            ))
        }
        (None, Some(pe)) => {
            return Some(format!(
                "pgfan failed with {} (direct: {} rows)",
                show_error(pe),
                ds.rows.len()
            ))
        }
        (None, None) => {}
    }
    if ds.shape != ps.shape {
        return Some(format!(
            "message sequence (without DataRows) differs: direct {:?} vs pgfan {:?}",
            ds.shape, ps.shape
        ));
    }
    if ds.fields != ps.fields {
        let (df, pf) = (ds.fields.unwrap_or_default(), ps.fields.unwrap_or_default());
        if df.len() != pf.len() {
            return Some(format!(
                "RowDescription has {} columns directly, {} through pgfan: {df:?} vs {pf:?}",
                df.len(),
                pf.len()
            ));
        }
        let c = (0..df.len()).find(|&c| df[c] != pf[c]).unwrap_or(0);
        return Some(format!(
            "RowDescription column {c} differs: direct {:?} vs pgfan {:?}",
            df.get(c),
            pf.get(c)
        ));
    }
    let modes = column_modes(q, ds.fields);
    let ordered = q.ordered();
    let (mut a, mut b) = (ds.rows.clone(), ps.rows.clone());
    if !ordered {
        a.sort_by(|x, y| row_cmp(x, y, &modes));
        b.sort_by(|x, y| row_cmp(x, y, &modes));
    }
    let how = if ordered {
        "in ORDER BY order"
    } else {
        "rows sorted, no top-level ORDER BY"
    };
    let names: Vec<&str> = ds
        .fields
        .unwrap_or_default()
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
        if x.len() != y.len() {
            return Some(format!(
                "row {i} ({how}) has {} values directly, {} through pgfan",
                x.len(),
                y.len()
            ));
        }
        for c in 0..x.len() {
            let mode = modes.get(c).copied().flatten();
            if !cell_eq(&x[c], &y[c], mode) {
                return Some(format!(
                    "row {i} ({how}) column {c} {:?}: direct {} vs pgfan {}{}",
                    names.get(c).copied().unwrap_or("?"),
                    show_cell(&x[c], mode),
                    show_cell(&y[c], mode),
                    if mode.is_some() {
                        format!(" (beyond the relative tolerance {FLOAT_REL_TOL:e})")
                    } else {
                        String::new()
                    }
                ));
            }
        }
    }
    if a.len() != b.len() {
        let n = a.len().min(b.len());
        let extra = if a.len() > b.len() {
            format!("first row missing from pgfan: {}", show_row(a[n]))
        } else {
            format!("first extra row from pgfan: {}", show_row(b[n]))
        };
        return Some(format!(
            "direct returned {} rows, pgfan {} ({how}); {extra}",
            a.len(),
            b.len()
        ));
    }
    if ds.tags != ps.tags {
        return Some(format!(
            "command tags differ: direct {:?} vs pgfan {:?}",
            ds.tags, ps.tags
        ));
    }
    if ds.status != ps.status {
        return Some(format!(
            "ReadyForQuery differs: direct {:?} vs pgfan {:?}",
            ds.status, ps.status
        ));
    }
    None
}

/// Checks the direct transcript against the corpus annotations.
pub fn check_expectation(q: &Query, t: &Transcript) -> Option<String> {
    let mut problems = Vec::new();
    match (&q.expect, t.errors().next()) {
        (Expect::Ok, Some(e)) => problems.push(format!("expected success, got {}", show_error(e))),
        (Expect::Error(want), None) => problems.push(format!("expected error {want}, got none")),
        (Expect::Error(want), Some(e)) if e.code != *want => {
            problems.push(format!("expected error {want}, got {}", show_error(e)))
        }
        _ => {}
    }
    if t.count(|m| matches!(m, Msg::ReadyForQuery(_))) != 1 {
        problems.push("expected exactly one ReadyForQuery".into());
    }
    if q.float_tol && q.expect == Expect::Ok {
        let s = summarize(t);
        if !column_modes(q, s.fields).iter().any(Option::is_some) {
            problems.push("flagged tol but has no float4/float8 column".into());
        }
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

pub fn short_sql(sql: &str) -> String {
    let one_line: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 220 {
        format!("{}…", one_line.chars().take(220).collect::<String>())
    } else {
        one_line
    }
}

pub fn describe_query(i: usize, q: &Query) -> String {
    let mut s = format!("#{i} {}", short_sql(&q.sql));
    if !q.params.is_empty() {
        s.push_str(&format!(" params {:?}", q.params));
    }
    s
}

// ---------------------------------------------------------------------------------------
// Database
// ---------------------------------------------------------------------------------------

/// A collation that exists and sorts differently from "C" ('a' < 'B'); "C" if none
/// (`suite_name` prefixes the message that says so).
pub async fn pick_collation(c: &tokio_postgres::Client, suite_name: &str) -> String {
    for cand in [
        "en-x-icu",
        "und-x-icu",
        "en_US.utf8",
        "en_US.UTF-8",
        "en_US",
        "en_GB.utf8",
        "de_DE.utf8",
    ] {
        let exists = c
            .query_opt(
                "SELECT 1 FROM pg_collation WHERE collname = $1 AND collencoding IN \
                 (-1, (SELECT encoding FROM pg_database WHERE datname = current_database()))",
                &[&cand],
            )
            .await
            .expect("query pg_collation")
            .is_some();
        if !exists {
            continue;
        }
        let sql = format!("SELECT 'a' < ('B' COLLATE {})", super::quote_ident(cand));
        if let Ok(row) = c.query_one(sql.as_str(), &[]).await {
            if row.get::<_, bool>(0) {
                return cand.to_string();
            }
        }
    }
    eprintln!("{suite_name}: no collation that sorts differently from C; using \"C\"");
    "C".to_string()
}

// ---------------------------------------------------------------------------------------
// Running a corpus
// ---------------------------------------------------------------------------------------

/// One differential run: which database, which pgfan, and where the logs go.
pub struct Suite {
    /// Prefix of messages (`fanout_diff: ...`); with `-` for `_`, the name of the log files
    /// in `target/test-logs` (`fanout-diff.txt`, `fanout-diff-routes.txt`, ...).
    pub name: &'static str,
    /// The database every session connects to.
    pub db: &'static str,
    /// pgfan's address (the primary's in direct mode).
    pub addr: String,
    pub direct_mode: bool,
}

impl Suite {
    pub fn new(name: &'static str, db: &'static str, pgfan: &Pgfan) -> Suite {
        Suite {
            name,
            db,
            addr: pgfan.addr(),
            direct_mode: Pgfan::direct_mode(),
        }
    }

    fn log_name(&self) -> String {
        self.name.replace('_', "-")
    }

    /// A session on the primary.
    pub async fn connect_direct(&self) -> std::io::Result<WireClient> {
        WireClient::connect(&cluster().primary_addr(), "postgres", self.db).await
    }

    /// A session through pgfan (in direct mode: on the primary, with parallel plans).
    pub async fn connect_compared(&self) -> std::io::Result<WireClient> {
        let mut c = WireClient::connect(&self.addr, "postgres", self.db).await?;
        if self.direct_mode {
            let t = c.simple_query(PARALLEL_SETTINGS).await?;
            assert_eq!(t.error_code(), None, "parallel settings: {t:?}");
        }
        Ok(c)
    }

    /// A session through pgfan for EXPLAIN FANOUT.
    pub async fn connect_pgfan(&self) -> std::io::Result<WireClient> {
        WireClient::connect(&self.addr, "postgres", self.db).await
    }

    /// Prints `<name>: <n> queries, set-up took ...`.
    pub fn announce(&self, corpus: &[Query], started: Instant) {
        eprintln!(
            "{}: {} queries, set-up took {:.1?}{}",
            self.name,
            corpus.len(),
            started.elapsed(),
            if self.direct_mode {
                " (direct mode: compared against a parallel-plan session, routes not checked)"
            } else {
                ""
            }
        );
    }
}

/// Runs a query's [`Query::setup`] on a fresh session.
async fn run_setup(client: &mut WireClient, setup: &str) -> std::io::Result<Result<(), String>> {
    let t = client.simple_query(setup).await?;
    let failed = t
        .errors()
        .next()
        .map(|e| format!("setup {:?} failed: {}", short_sql(setup), show_error(e)));
    Ok(failed.map_or(Ok(()), Err))
}

/// What one mode found.
#[derive(Default)]
pub struct ModeReport {
    pub ran: usize,
    pub failures: Vec<String>,
    pub corpus_bugs: Vec<String>,
    /// Direct results (first rows), for reviewing the corpus.
    pub dump: String,
}

/// Runs a query that has a [`Query::setup`] on a fresh pair of sessions.
async fn run_with_setup(
    suite: &Suite,
    q: &Query,
    setup: &str,
    mode: Mode,
) -> (Transcript, std::io::Result<Transcript>) {
    let what = short_sql(&q.sql);
    let mut direct = suite
        .connect_direct()
        .await
        .expect("connect directly to the primary");
    match run_setup(&mut direct, setup).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("[{}] {what}: direct {e}", mode.tag()),
        Err(e) => panic!("[{}] {what}: direct session failed: {e}", mode.tag()),
    }
    let d = run_query(&mut direct, q, mode)
        .await
        .unwrap_or_else(|e| panic!("[{}] {what}: direct session failed: {e}", mode.tag()));
    let p = async {
        let mut compared = suite.connect_compared().await?;
        if let Err(e) = run_setup(&mut compared, setup).await? {
            return Err(std::io::Error::other(e));
        }
        run_query(&mut compared, q, mode).await
    }
    .await;
    (d, p)
}

pub async fn run_mode(mode: Mode, corpus: &[Query], suite: &Suite) -> ModeReport {
    let mut out = ModeReport::default();
    let mut direct = suite
        .connect_direct()
        .await
        .expect("connect directly to the primary");
    let mut compared = match suite.connect_compared().await {
        Ok(c) => c,
        Err(e) => {
            out.failures.push(format!(
                "[{}] cannot connect through pgfan: {e}; no query ran",
                mode.tag()
            ));
            return out;
        }
    };
    for (i, q) in corpus.iter().enumerate() {
        let what = describe_query(i, q);
        let (d, p) = match &q.setup {
            Some(setup) => run_with_setup(suite, q, setup, mode).await,
            None => {
                let d = run_query(&mut direct, q, mode).await.unwrap_or_else(|e| {
                    panic!("[{}] {what}: direct session failed: {e}", mode.tag())
                });
                (d, run_query(&mut compared, q, mode).await)
            }
        };
        out.ran += 1;
        if let Some(problem) = check_expectation(q, &d) {
            out.corpus_bugs
                .push(format!("[{}] {what}: {problem}", mode.tag()));
        }
        {
            let s = summarize(&d);
            out.dump.push_str(&format!(
                "{what}\n  {} rows, tags {:?}, error {:?}\n",
                s.rows.len(),
                s.tags,
                s.error.map(show_error)
            ));
            for r in s.rows.iter().take(3) {
                out.dump.push_str(&format!("  {}\n", show_row(r)));
            }
        }
        match p {
            Ok(p) => {
                if let Some(diff) = compare(q, &d, &p) {
                    out.failures
                        .push(format!("[{}] {what}\n      {diff}", mode.tag()));
                }
            }
            Err(e) => {
                out.failures.push(format!(
                    "[{}] {what}\n      pgfan session failed: {e}",
                    mode.tag()
                ));
                if q.setup.is_some() {
                    continue;
                }
                match suite.connect_compared().await {
                    Ok(c) => compared = c,
                    Err(e) => {
                        out.failures.push(format!(
                            "[{}] cannot reconnect through pgfan ({e}); queries after #{i} \
                             did not run",
                            mode.tag()
                        ));
                        break;
                    }
                }
            }
        }
    }
    out
}

/// The lines of `EXPLAIN FANOUT <sql>` (one text column "QUERY PLAN"); `Err` describes
/// an error or a malformed answer.
pub async fn explain_fanout(
    client: &mut WireClient,
    sql: &str,
) -> std::io::Result<Result<Vec<String>, String>> {
    let t = client
        .simple_query(&format!("EXPLAIN FANOUT {sql}"))
        .await?;
    let s = summarize(&t);
    if let Some(e) = s.error {
        return Ok(Err(format!("EXPLAIN FANOUT failed: {}", show_error(e))));
    }
    match s.fields {
        Some([f]) if f.name == "QUERY PLAN" => {}
        other => {
            return Ok(Err(format!(
                "EXPLAIN FANOUT should return one column \"QUERY PLAN\", got {other:?}"
            )))
        }
    }
    let lines: Vec<String> = s
        .rows
        .iter()
        .filter_map(|r| r.first().and_then(|v| v.as_ref()))
        .map(|r| String::from_utf8_lossy(&r.0).into_owned())
        .collect();
    if lines.is_empty() {
        return Ok(Err("EXPLAIN FANOUT returned no rows".into()));
    }
    Ok(Ok(lines))
}

/// The first line of `EXPLAIN FANOUT <query>` through pgfan, checked against the route
/// and the query's other EXPLAIN FANOUT annotations.
pub async fn check_route(
    client: &mut WireClient,
    q: &Query,
) -> std::io::Result<Result<String, String>> {
    let lines = match explain_fanout(client, &q.simple_sql()).await? {
        Ok(lines) => lines,
        Err(problem) => return Ok(Err(problem)),
    };
    let line = lines[0].clone();
    if let Some(m) = q.merge {
        if !lines.iter().any(|l| l.contains(m)) {
            return Ok(Err(format!(
                "EXPLAIN FANOUT shows no {m:?} (first line {line:?})"
            )));
        }
    }
    if !route_ok(q.route, &line) {
        return Ok(Err(format!(
            "expected {:?}, EXPLAIN FANOUT says {line:?}",
            q.route
        )));
    }
    if let Some(text) = q.first_line {
        if !line.contains(text) {
            return Ok(Err(format!(
                "the first line of EXPLAIN FANOUT should contain {text:?}: {line:?}"
            )));
        }
    }
    for prefix in &q.line_prefixes {
        if !lines.iter().any(|l| l.starts_with(prefix)) {
            return Ok(Err(format!(
                "EXPLAIN FANOUT has no line starting with {prefix:?} (first line {line:?})"
            )));
        }
    }
    Ok(Ok(line))
}

/// Whether the first line of EXPLAIN FANOUT matches the route: `FanOut: <n> fragments,
/// ...` with n > 1, or `PassThrough: <reason>`.
pub fn route_ok(route: Route, line: &str) -> bool {
    let fragments = line
        .strip_prefix("FanOut: ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u32>().ok());
    match route {
        Route::FanOut => fragments.is_some_and(|n| n > 1),
        Route::PassThrough => line.starts_with("PassThrough:"),
        Route::Any => true,
    }
}

/// Route assertions for every query with a fixed route (skipped in direct mode).
pub async fn check_routes(corpus: &[Query], suite: &Suite) -> (Vec<String>, String) {
    let mut failures = Vec::new();
    let mut log = String::new();
    if suite.direct_mode {
        return (failures, "direct mode: routes not checked\n".into());
    }
    let mut client = match suite.connect_pgfan().await {
        Ok(c) => c,
        Err(e) => {
            failures.push(format!("[route] cannot connect through pgfan: {e}"));
            return (failures, log);
        }
    };
    for (i, q) in corpus.iter().enumerate() {
        if q.route == Route::Any {
            continue;
        }
        let what = describe_query(i, q);
        let checked = match &q.setup {
            Some(setup) => {
                async {
                    let mut fresh = suite.connect_pgfan().await?;
                    match run_setup(&mut fresh, setup).await? {
                        Ok(()) => check_route(&mut fresh, q).await,
                        Err(e) => Ok(Err(e)),
                    }
                }
                .await
            }
            None => check_route(&mut client, q).await,
        };
        match checked {
            Ok(Ok(line)) => log.push_str(&format!("{what}\n  {line}\n")),
            Ok(Err(problem)) => {
                log.push_str(&format!("{what}\n  FAILED: {problem}\n"));
                failures.push(format!("[route] {what}\n      {problem}"));
            }
            Err(e) => {
                failures.push(format!("[route] {what}\n      pgfan session failed: {e}"));
                if q.setup.is_some() {
                    continue;
                }
                match suite.connect_pgfan().await {
                    Ok(c) => client = c,
                    Err(e) => {
                        failures.push(format!(
                            "[route] cannot reconnect through pgfan ({e}); routes after #{i} \
                             not checked"
                        ));
                        break;
                    }
                }
            }
        }
    }
    (failures, log)
}

/// The route checks and the three modes of one corpus.
pub struct Runs {
    pub route_failures: Vec<String>,
    pub route_log: String,
    pub modes: Vec<(Mode, ModeReport)>,
}

/// Checks the routes and runs the corpus in the three modes, all concurrently; writes the
/// route log and the direct results of each mode to `target/test-logs`.
pub async fn run_all(corpus: &[Query], suite: &Suite) -> Runs {
    let ((route_failures, route_log), simple, ext_text, ext_binary) = tokio::join!(
        check_routes(corpus, suite),
        run_mode(Mode::Simple, corpus, suite),
        run_mode(Mode::ExtendedText, corpus, suite),
        run_mode(Mode::ExtendedBinary, corpus, suite),
    );
    let runs = Runs {
        route_failures,
        route_log,
        modes: vec![
            (Mode::Simple, simple),
            (Mode::ExtendedText, ext_text),
            (Mode::ExtendedBinary, ext_binary),
        ],
    };
    let logs = test_logs_dir();
    let name = suite.log_name();
    let _ = std::fs::write(logs.join(format!("{name}-routes.txt")), &runs.route_log);
    for (mode, r) in &runs.modes {
        let _ = std::fs::write(
            logs.join(format!("{name}-{}-direct.txt", mode.tag())),
            &r.dump,
        );
    }
    runs
}

/// Collects everything that failed (the runs' route checks, `extra` failures of the
/// suite's own checks, the three modes' comparisons and corpus problems) into one report.
/// Clean: stops pgfan and drops the database. Otherwise writes the report to
/// `target/test-logs/<name>.txt` and panics with it and pgfan's log.
pub async fn finish(
    suite: &Suite,
    corpus: &[Query],
    runs: Runs,
    extra: Vec<String>,
    pgfan: Pgfan,
    started: Instant,
) {
    let direct_mode = suite.direct_mode;
    let corpus_bugs: Vec<&String> = runs
        .modes
        .iter()
        .flat_map(|(_, r)| r.corpus_bugs.iter())
        .collect();
    let failures: Vec<&String> = runs
        .route_failures
        .iter()
        .chain(extra.iter())
        .chain(runs.modes.iter().flat_map(|(_, r)| r.failures.iter()))
        .collect();
    let ran: usize = runs.modes.iter().map(|(_, r)| r.ran).sum();
    eprintln!(
        "{}: {ran} query runs in 3 modes, {} failures, {} corpus problems, {:.1?}",
        suite.name,
        failures.len(),
        corpus_bugs.len(),
        started.elapsed()
    );
    if corpus_bugs.is_empty() && failures.is_empty() {
        drop(pgfan);
        drop_database(suite.db).await;
        return;
    }
    let mut report = String::new();
    if !corpus_bugs.is_empty() {
        report.push_str(&format!(
            "{} corpus annotations not met by the direct run:\n",
            corpus_bugs.len()
        ));
        for b in &corpus_bugs {
            report.push_str(&format!("  {b}\n"));
        }
    }
    if !failures.is_empty() {
        report.push_str(&format!(
            "{} failures ({} queries x 3 modes{}):\n",
            failures.len(),
            corpus.len(),
            if direct_mode {
                "; direct mode: differences between a serial and a parallel-plan session \
                 are corpus problems"
            } else {
                ", plus route checks"
            }
        ));
        for f in &failures {
            report.push_str(&format!("  {f}\n"));
        }
    }
    let path = test_logs_dir().join(format!("{}.txt", suite.log_name()));
    let _ = std::fs::write(&path, &report);
    panic!(
        "{report}\nreport: {}\npgfan log {}:\n{}",
        path.display(),
        pgfan.log_path.display(),
        pgfan.log_tail()
    );
}
