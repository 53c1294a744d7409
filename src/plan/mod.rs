//! Sorts statements into [`Route::PassThrough`] or [`Route::FanOut`] from the sqlparser
//! AST, and writes the fragment SQL and the merge for fanned-out ones.
//!
//! Two steps: [`Candidate::parse`] checks the shape from the SQL text alone (one SELECT over
//! one table, whitelisted functions only); [`plan`] then decides with catalog facts (size,
//! indexes, histograms, collations) how to split it, or passes it through.

pub mod cache;
pub mod catalog;
pub mod from;
pub mod literals;
pub mod rewrite;
pub mod split;

use std::fmt;
use std::ops::ControlFlow;
use std::sync::Arc;

use sqlparser::ast::{
    Distinct, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, Ident,
    LimitClause, ObjectName, ObjectNamePart, OrderByKind, Query, SelectItem, SetExpr, Statement,
    TableFactor, Value, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

pub use catalog::{CatalogCache, ColumnInfo, TableInfo};
pub use from::TableSet;
pub use rewrite::{AggKind, CombineSpec, MergeSpec};
pub use split::{SplitSite, SplitStrategy};

use crate::config::FanoutConfig;

/// Why a statement passes through: a metrics label and a human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassReason {
    /// Low-cardinality label for `pgfan_passthrough_total{reason}`.
    pub label: &'static str,
    /// What exactly, for logs and EXPLAIN FANOUT.
    pub detail: String,
}

impl PassReason {
    /// A reason with a label and detail.
    pub fn new(label: &'static str, detail: impl Into<String>) -> Self {
        PassReason {
            label,
            detail: detail.into(),
        }
    }

    /// True when the reason, found for a shape's template, holds for every statement text
    /// of the shape whatever its literals: a point lookup judged by the most frequent
    /// value, and facts of the tables or of the load.
    pub fn holds_for_any_literal(&self) -> bool {
        matches!(
            self.label,
            "point_lookup"
                | "unknown_table"
                | "view"
                | "not_table"
                | "temporary"
                | "no_slots"
                | "disabled"
        )
    }
}

impl fmt::Display for PassReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

/// A fanned-out statement: fragments and how their results merge.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The split table, schema-qualified.
    pub table: String,
    /// The joined tables read in the same key ranges (`qualifier.column`).
    pub co_ranges: Vec<String>,
    /// How the table is cut.
    pub split: SplitStrategy,
    /// One SQL text per fragment (with the client's `$n` parameters, if any).
    pub fragments: Vec<String>,
    /// Estimated heap pages each fragment reads (the dispatcher runs the largest first).
    pub pages: Vec<u64>,
    /// How fragment results become the client's result.
    pub merge: MergeSpec,
}

/// Where a statement goes.
#[derive(Debug, Clone)]
pub enum Route {
    /// Relayed to the primary unchanged.
    PassThrough(PassReason),
    /// Split into fragments.
    FanOut(Box<Plan>),
}

/// What a statement asks of pgfan before any catalog lookup.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The parsed SELECT.
    pub query: Query,
    /// Every table it names at any depth, as to_regclass() text (`"public"."events"` or
    /// `"events"`), first seen first.
    pub relations: Vec<String>,
    /// `EXPLAIN FANOUT <query>`: describe, do not run.
    pub explain: bool,
    /// It has aggregates that cannot be split into partial and combine steps (DISTINCT,
    /// ORDER BY inside, ordered-set, string_agg/array_agg…): it fans out only when every
    /// group lies within one fragment.
    pub holistic: bool,
    /// A shape's template (see [`literals`]): its `$n` stand for the literals of the
    /// statement texts that share it, so the planner judges a point lookup by the most
    /// frequent value any literal could have.
    pub literal_placeholders: bool,
    /// Its analysis against the last catalog entry it was planned with.
    pub shape: cache::ShapeMemo,
    /// Its last pass-through screening by the relay.
    pub screen: cache::ScreenMemo,
}

/// Functions that are immutable (or depend only on settings pgfan copies to fragments), so
/// every fragment computes them as the primary would.
const SAFE_FUNCTIONS: &[&str] = &[
    "abs",
    "ceil",
    "ceiling",
    "floor",
    "round",
    "trunc",
    "sign",
    "sqrt",
    "cbrt",
    "exp",
    "ln",
    "log",
    "log10",
    "power",
    "pow",
    "mod",
    "div",
    "greatest",
    "least",
    "coalesce",
    "nullif",
    "lower",
    "upper",
    "length",
    "char_length",
    "character_length",
    "octet_length",
    "substr",
    "substring",
    "left",
    "right",
    "btrim",
    "ltrim",
    "rtrim",
    "trim",
    "replace",
    "concat",
    "concat_ws",
    "split_part",
    "strpos",
    "starts_with",
    "md5",
    "date_trunc",
    "date_part",
    "extract",
    "to_char",
    "make_date",
    "width_bucket",
    "isfinite",
    "initcap",
    "reverse",
    "repeat",
    "lpad",
    "rpad",
    "array_length",
    "cardinality",
    "num_nonnulls",
    "num_nulls",
    "float8",
    "int4",
    "int8",
    "numeric",
    "text",
];

/// Aggregates pgfan can split into partial and combine steps.
pub fn aggregate_kind(name: &str) -> Option<AggKind> {
    Some(match name {
        "count" => AggKind::Count,
        "sum" => AggKind::Sum,
        "min" => AggKind::Min,
        "max" => AggKind::Max,
        "avg" => AggKind::Avg,
        "bool_and" | "every" => AggKind::BoolAnd,
        "bool_or" => AggKind::BoolOr,
        "stddev" | "stddev_samp" => AggKind::Var {
            sample: true,
            stddev: true,
        },
        "stddev_pop" => AggKind::Var {
            sample: false,
            stddev: true,
        },
        "variance" | "var_samp" => AggKind::Var {
            sample: true,
            stddev: false,
        },
        "var_pop" => AggKind::Var {
            sample: false,
            stddev: false,
        },
        _ => return None,
    })
}

/// An identifier as PostgreSQL folds it.
pub fn fold(ident: &Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_lowercase()
    }
}

/// Double-quotes an identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The lowercase, unqualified name of a function (`pg_catalog.sum` → `sum`), or `None` for
/// a schema other than pg_catalog.
pub fn function_name(name: &ObjectName) -> Option<String> {
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(i) => Some(fold(i)),
            _ => None,
        })
        .collect::<Option<_>>()?;
    match parts.as_slice() {
        [n] => Some(n.clone()),
        [schema, n] if schema == "pg_catalog" => Some(n.clone()),
        _ => None,
    }
}

/// True if the text can only be a statement pgfan might fan out (cheap pre-filter before
/// parsing): it starts with SELECT or EXPLAIN FANOUT.
pub fn worth_parsing(sql: &str) -> bool {
    let t = skip_space_and_comments(sql);
    starts_with_word(t, "select") || is_explain_fanout(t)
}

/// Case-insensitive prefix test without allocating (runs on every statement).
fn starts_with_word(text: &str, word: &str) -> bool {
    text.as_bytes()
        .get(..word.len())
        .is_some_and(|h| h.eq_ignore_ascii_case(word.as_bytes()))
}

/// True for `EXPLAIN FANOUT …`.
pub fn is_explain_fanout(sql: &str) -> bool {
    starts_with_word(skip_space_and_comments(sql), "explain fanout")
}

/// The statement after `EXPLAIN FANOUT` (the whole text if it is not one).
pub fn explained_statement(sql: &str) -> &str {
    let t = skip_space_and_comments(sql);
    if starts_with_word(t, "explain fanout") {
        &t["explain fanout".len()..]
    } else {
        sql
    }
}

/// The highest `$n` parameter number in `sql` (0 if none), skipping string literals,
/// quoted identifiers and comments. Dollar-quoted bodies are not skipped: a `$n` inside
/// one only makes a stand-in declare one parameter more than needed.
pub fn max_parameter(sql: &str) -> usize {
    let b = sql.as_bytes();
    let (mut i, mut max) = (0, 0usize);
    while i < b.len() {
        match b[i] {
            q @ (b'\'' | b'"') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += 1;
                }
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            b'$' => {
                let start = i + 1;
                i = start;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                if let Ok(n) = sql[start..i].parse::<usize>() {
                    max = max.max(n);
                }
                if i == start {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    max
}

/// True if the statement changes the catalog or its statistics (the catalog cache of the
/// database is dropped).
pub fn changes_catalog(sql: &str) -> bool {
    let t = skip_space_and_comments(sql);
    [
        "create", "alter", "drop", "truncate", "analyze", "vacuum", "cluster", "reindex",
    ]
    .iter()
    .any(|k| starts_with_word(t, k))
}

/// True if the statement opens a savepoint (a subtransaction cannot export a snapshot).
pub fn opens_savepoint(sql: &str) -> bool {
    starts_with_word(skip_space_and_comments(sql), "savepoint")
}

/// The text after leading blanks and comments. The keyword checks above skip them too;
/// given text that starts with neither, their own skip returns at once.
pub fn skip_space_and_comments(mut t: &str) -> &str {
    loop {
        // the blanks of PostgreSQL's lexer, all ASCII (the cut is at a char boundary);
        // anything else, \v (a blank only since 16) or a Unicode space, leaves the text
        // to PostgreSQL
        let blank = t
            .bytes()
            .position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0c'))
            .unwrap_or(t.len());
        t = &t[blank..];
        if let Some(rest) = t.strip_prefix("--") {
            t = rest.split_once('\n').map(|x| x.1).unwrap_or("");
        } else if let Some(rest) = t.strip_prefix("/*") {
            t = rest.split_once("*/").map(|x| x.1).unwrap_or("");
        } else {
            return t;
        }
    }
}

impl Candidate {
    /// Parses `sql` and checks the shape; `Err` says why it passes through.
    pub fn parse(sql: &str) -> Result<Candidate, PassReason> {
        let mut text = skip_space_and_comments(sql);
        let explain = is_explain_fanout(text);
        if explain {
            text = &text["explain fanout".len()..];
        }
        let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, text)
            .map_err(|e| PassReason::new("unparsed", format!("not parsed by pgfan: {e}")))?;
        if statements.len() != 1 {
            return Err(PassReason::new(
                "multiple_statements",
                "more than one statement",
            ));
        }
        let Some(Statement::Query(query)) = statements.pop() else {
            return Err(PassReason::new("not_select", "not a SELECT"));
        };
        let query = *query;
        let (relations, holistic) = check_shape(&query)?;
        Ok(Candidate {
            query,
            relations,
            explain,
            holistic,
            literal_placeholders: false,
            shape: cache::ShapeMemo::default(),
            screen: cache::ScreenMemo::default(),
        })
    }
}

fn unsupported(detail: impl Into<String>) -> PassReason {
    PassReason::new("unsupported_shape", detail)
}

/// Checks the query is one SELECT over tables, joins and subqueries with only safe
/// expressions; returns the tables it names and whether it has holistic aggregates.
fn check_shape(q: &Query) -> Result<(Vec<String>, bool), PassReason> {
    if q.with.is_some() {
        return Err(unsupported("WITH query"));
    }
    if q.fetch.is_some() || !q.locks.is_empty() || q.for_clause.is_some() {
        return Err(unsupported("FETCH, FOR UPDATE/SHARE or FOR clause"));
    }
    if q.settings.is_some() || q.format_clause.is_some() || !q.pipe_operators.is_empty() {
        return Err(unsupported("non-PostgreSQL clause"));
    }
    let SetExpr::Select(s) = q.body.as_ref() else {
        return Err(unsupported("set operation or VALUES"));
    };
    if matches!(s.distinct, Some(Distinct::On(_))) {
        return Err(unsupported("DISTINCT ON"));
    }
    if s.top.is_some()
        || s.into.is_some()
        || !s.lateral_views.is_empty()
        || s.prewhere.is_some()
        || !s.connect_by.is_empty()
        || !s.cluster_by.is_empty()
        || !s.distribute_by.is_empty()
        || !s.sort_by.is_empty()
        || !s.named_window.is_empty()
        || s.qualify.is_some()
        || s.exclude.is_some()
    {
        return Err(unsupported("clause pgfan does not split"));
    }
    if s.from.is_empty() {
        return Err(PassReason::new("no_table", "no FROM clause"));
    }
    if let GroupByExpr::Expressions(_, modifiers) = &s.group_by {
        if !modifiers.is_empty() {
            return Err(unsupported("GROUP BY modifier"));
        }
    } else {
        return Err(unsupported("GROUP BY ALL"));
    }
    if let Some(LimitClause::OffsetCommaLimit { .. }) = &q.limit_clause {
        return Err(unsupported("LIMIT a, b"));
    }
    if let Some(LimitClause::LimitOffset { limit_by, .. }) = &q.limit_clause {
        if !limit_by.is_empty() {
            return Err(unsupported("LIMIT BY"));
        }
    }
    if let Some(ob) = &q.order_by {
        if let OrderByKind::All(_) = ob.kind {
            return Err(unsupported("ORDER BY ALL"));
        }
        if ob.interpolate.is_some() {
            return Err(unsupported("ORDER BY INTERPOLATE"));
        }
    }
    let mut checker = ExprCheck {
        problem: None,
        holistic: false,
        depth: 0,
        relations: Vec::new(),
    };
    let _ = q.visit(&mut checker);
    if let Some(p) = checker.problem {
        return Err(p);
    }
    for item in &s.projection {
        if let SelectItem::ExprWithAliases { .. } = item {
            return Err(unsupported("multiple aliases"));
        }
    }
    Ok((checker.relations, checker.holistic))
}

/// Rejects expressions whose value could differ between fragments (window functions,
/// volatile or unknown functions, a subquery's LIMIT), FROM items other than tables,
/// subqueries and joins; collects the tables named at any depth.
struct ExprCheck {
    problem: Option<PassReason>,
    /// An aggregate of the statement itself (not of a subquery) that only complete groups
    /// compute (see [`Candidate::holistic`]).
    holistic: bool,
    /// 1 in the statement, more inside subqueries.
    depth: usize,
    /// Relation keys of every table named.
    relations: Vec<String>,
}

impl ExprCheck {
    fn fail(&mut self, p: PassReason) -> ControlFlow<()> {
        self.problem.get_or_insert(p);
        ControlFlow::Break(())
    }
}

/// Aggregates computed only over complete groups; the first four must order their input
/// (`ORDER BY` inside), or their result would depend on the scan order.
pub(crate) const HOLISTIC_AGGREGATES: &[&str] = &[
    "string_agg",
    "array_agg",
    "json_agg",
    "jsonb_agg",
    "percentile_cont",
    "percentile_disc",
    "mode",
];

/// Why a holistic aggregate cannot fan out even over complete groups, if it cannot.
fn holistic_problem(f: &sqlparser::ast::Function, name: &str) -> Option<String> {
    let FunctionArguments::List(list) = &f.args else {
        return Some(format!("{name} without argument list"));
    };
    let ordered_input = list
        .clauses
        .iter()
        .any(|c| matches!(c, sqlparser::ast::FunctionArgumentClause::OrderBy(_)));
    match name {
        "percentile_cont" | "percentile_disc" | "mode" if f.within_group.is_empty() => {
            Some(format!("{name} without WITHIN GROUP"))
        }
        "string_agg" | "array_agg" | "json_agg" | "jsonb_agg" if !ordered_input => Some(format!(
            "{name} without ORDER BY (its result depends on the scan order)"
        )),
        _ => None,
    }
}

impl Visitor for ExprCheck {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        self.depth += 1;
        if self.depth > 1 {
            // each fragment evaluates a subquery whole: it must give every fragment the
            // same rows
            if q.with.is_some() {
                return self.fail(unsupported("WITH inside a subquery"));
            }
            if q.limit_clause.is_some() || q.fetch.is_some() {
                return self.fail(unsupported("LIMIT, OFFSET or FETCH inside a subquery"));
            }
            if !q.locks.is_empty() || q.for_clause.is_some() {
                return self.fail(unsupported("FOR UPDATE/SHARE inside a subquery"));
            }
        }
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, name: &ObjectName) -> ControlFlow<()> {
        match from::relation_key(name) {
            Ok(key) => {
                if !self.relations.contains(&key) {
                    self.relations.push(key);
                }
                ControlFlow::Continue(())
            }
            Err(p) => self.fail(p),
        }
    }

    fn pre_visit_table_factor(&mut self, tf: &TableFactor) -> ControlFlow<()> {
        let ok = match tf {
            TableFactor::Table {
                args,
                with_hints,
                version,
                partitions,
                sample,
                with_ordinality,
                json_path,
                alias,
                ..
            } => {
                args.is_none()
                    && with_hints.is_empty()
                    && version.is_none()
                    && partitions.is_empty()
                    && sample.is_none()
                    && !with_ordinality
                    && json_path.is_none()
                    && alias.as_ref().is_none_or(|a| a.columns.is_empty())
            }
            TableFactor::Derived {
                lateral, sample, ..
            } => !lateral && sample.is_none(),
            TableFactor::NestedJoin { alias, .. } => alias.is_none(),
            _ => false,
        };
        if !ok {
            return self.fail(unsupported(
                "FROM item other than a table, subquery or join (function, LATERAL, sample, \
                 hint or column aliases)",
            ));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        let top = self.depth <= 1;
        let problem = match e {
            Expr::GroupingSets(_) | Expr::Cube(_) | Expr::Rollup(_) => {
                Some(unsupported("GROUPING SETS, CUBE or ROLLUP"))
            }
            Expr::Function(f) => {
                let name = function_name(&f.name);
                match name {
                    _ if f.over.is_some() => {
                        Some(PassReason::new("window_function", "window function"))
                    }
                    Some(n) if aggregate_kind(&n).is_some() => match aggregate_problem(f) {
                        None => None,
                        // DISTINCT or ORDER BY inside: exact over complete groups (a
                        // subquery's own aggregates see its whole input in every fragment)
                        Some(_) if f.within_group.is_empty() => {
                            self.holistic |= top;
                            None
                        }
                        Some(d) => Some(PassReason::new("aggregate", d)),
                    },
                    Some(n) if HOLISTIC_AGGREGATES.contains(&n.as_str()) => {
                        match holistic_problem(f, &n) {
                            None => {
                                self.holistic |= top;
                                None
                            }
                            Some(d) => Some(PassReason::new("aggregate", d)),
                        }
                    }
                    Some(n) if SAFE_FUNCTIONS.contains(&n.as_str()) => {
                        if f.filter.is_some() || !f.within_group.is_empty() {
                            Some(unsupported("FILTER on a non-aggregate"))
                        } else {
                            None
                        }
                    }
                    Some(n) => Some(PassReason::new(
                        "function",
                        format!("function {n}() is not known to be immutable"),
                    )),
                    None => Some(PassReason::new("function", "schema-qualified function")),
                }
            }
            Expr::Value(v) => match &v.value {
                Value::Placeholder(p) if !p.starts_with('$') => {
                    Some(unsupported("placeholder other than $n"))
                }
                _ => None,
            },
            Expr::Wildcard(_) | Expr::QualifiedWildcard(..) => None,
            _ => None,
        };
        if let Some(p) = problem {
            self.problem.get_or_insert(p);
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }
}

pub(crate) fn aggregate_problem(f: &sqlparser::ast::Function) -> Option<String> {
    if !f.within_group.is_empty() {
        return Some("ordered-set aggregate".into());
    }
    let FunctionArguments::List(list) = &f.args else {
        return Some("aggregate without argument list".into());
    };
    if list.duplicate_treatment == Some(sqlparser::ast::DuplicateTreatment::Distinct) {
        return Some("DISTINCT aggregate".into());
    }
    if !list.clauses.is_empty() {
        return Some("ORDER BY inside an aggregate".into());
    }
    match list.args.as_slice() {
        [FunctionArg::Unnamed(FunctionArgExpr::Expr(_))] => None,
        [FunctionArg::Unnamed(FunctionArgExpr::Wildcard)]
            if function_name(&f.name).as_deref() == Some("count") =>
        {
            None
        }
        _ => Some("aggregate with other than one argument".into()),
    }
}

/// Decides the route of a candidate with the catalog facts of its tables. `slots` is the
/// number of fragment connections the usable backends have.
pub fn plan(c: &Candidate, tables: &TableSet, cfg: &FanoutConfig, slots: usize) -> Route {
    let shape = || rewrite::analyze(c, tables, cfg).map(Arc::new);
    match plan_inner(tables, cfg, slots, shape) {
        Ok(p) => Route::FanOut(Box::new(p)),
        Err(r) => Route::PassThrough(r),
    }
}

/// [`plan`] with the candidate's analysis kept for the next time it meets the same
/// catalog entries (see [`cache::ShapeMemo`]).
pub fn plan_shared(c: &Candidate, tables: &TableSet, cfg: &FanoutConfig, slots: usize) -> Route {
    let shape = || c.shape.analyze(c, tables, cfg);
    match plan_inner(tables, cfg, slots, shape) {
        Ok(p) => Route::FanOut(Box::new(p)),
        Err(r) => Route::PassThrough(r),
    }
}

fn plan_inner(
    tables: &TableSet,
    cfg: &FanoutConfig,
    slots: usize,
    shape: impl FnOnce() -> Result<Arc<rewrite::Shape>, PassReason>,
) -> Result<Plan, PassReason> {
    for t in tables.tables() {
        match t.kind {
            'r' | 'm' | 'p' => {}
            'v' => {
                return Err(PassReason::new(
                    "view",
                    format!(
                        "{} is a view (pgfan does not see what it reads)",
                        t.qualified
                    ),
                ))
            }
            _ => {
                return Err(PassReason::new(
                    "not_table",
                    format!("{} is not a table", t.qualified),
                ))
            }
        }
        if t.temporary {
            return Err(PassReason::new(
                "temporary",
                format!(
                    "{} is a temporary table (other connections cannot see it)",
                    t.qualified
                ),
            ));
        }
    }
    if slots < 2 {
        return Err(PassReason::new(
            "no_slots",
            "fewer than 2 fragment connections are free",
        ));
    }
    let shape = shape()?;
    // a queue-fed merge gets several fragments per connection, so a fast backend can take
    // more of them; a k-way merge streams every fragment at once, one per connection
    let per_connection = match (&shape.merge, cfg.dispatch) {
        (MergeSpec::Ordered { .. }, _) | (_, crate::config::DispatchMode::Static) => 1,
        _ => cfg.fragments_per_connection.max(1),
    };
    let split = split::choose(
        &shape.site,
        cfg,
        slots.saturating_mul(per_connection),
        shape.split_on.as_deref(),
    )?;
    let fragments = shape.fragment_sqls(&split);
    let pages = split.fragment_pages(&shape.site.table, fragments.len());
    Ok(Plan {
        table: shape.site.table.qualified.clone(),
        co_ranges: shape.co_range_lines(&split),
        split,
        fragments,
        pages,
        merge: shape.merge.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters() {
        assert_eq!(
            max_parameter("select $1 + $12, '$40', \"$41\" -- $42\n/* $43 */"),
            12
        );
        assert_eq!(max_parameter("select 1"), 0);
        assert_eq!(max_parameter("select $$x$$"), 0);
    }

    #[test]
    fn prefilter() {
        assert!(worth_parsing("  /* x */ select 1"));
        assert!(worth_parsing("EXPLAIN FANOUT select 1"));
        assert!(!worth_parsing("insert into t values (1)"));
        assert!(worth_parsing("\t\r\n\x0c-- c\n select 1"));
        assert!(!worth_parsing("\u{a0}select 1"));
        assert!(!worth_parsing("\x0bselect 1"));
        assert!(changes_catalog("ALTER TABLE t ADD c int"));
        assert!(opens_savepoint("SAVEPOINT a"));
    }

    #[test]
    fn shapes() {
        assert!(Candidate::parse("SELECT count(*) FROM t WHERE a > 1").is_ok());
        assert!(Candidate::parse("SELECT random() FROM t").is_err());
        assert!(Candidate::parse("SELECT * FROM t JOIN u ON true").is_ok());
        assert!(Candidate::parse("SELECT * FROM t, LATERAL (SELECT 1) x").is_err());
        assert!(Candidate::parse("SELECT * FROM generate_series(1, 3)").is_err());
        assert!(Candidate::parse("WITH x AS (SELECT 1) SELECT * FROM x").is_err());
        assert!(Candidate::parse("SELECT * FROM t WHERE a IN (SELECT b FROM u LIMIT 1)").is_err());
        // holistic aggregates are candidates that need complete groups
        let holistic = |sql: &str| Candidate::parse(sql).map(|c| c.holistic).ok();
        assert_eq!(holistic("SELECT count(DISTINCT a) FROM t"), Some(true));
        assert_eq!(
            holistic("SELECT a, string_agg(b, ',' ORDER BY c) FROM t GROUP BY a"),
            Some(true)
        );
        assert_eq!(
            holistic("SELECT a, count(*) FROM t GROUP BY a"),
            Some(false)
        );
        assert_eq!(holistic("SELECT string_agg(b, ',') FROM t"), None);
        assert_eq!(
            holistic("SELECT count(*) WITHIN GROUP (ORDER BY a) FROM t"),
            None
        );
        assert!(Candidate::parse("SELECT sum(a) OVER () FROM t").is_err());
        assert!(Candidate::parse("SELECT * FROM t FOR UPDATE").is_err());
        let c = Candidate::parse(
            "SELECT a FROM t WHERE a IN (SELECT 1 FROM u) AND EXISTS (SELECT FROM t x)",
        )
        .unwrap();
        assert_eq!(c.relations, vec!["\"t\"".to_string(), "\"u\"".to_string()]);
        // a subquery's DISTINCT aggregate sees its whole input in every fragment
        assert_eq!(
            holistic("SELECT a FROM t WHERE a > (SELECT count(DISTINCT b) FROM u)"),
            Some(false)
        );
        let c = Candidate::parse("EXPLAIN FANOUT SELECT x FROM public.\"Big\" b").unwrap();
        assert!(c.explain);
        assert_eq!(c.relations, vec!["\"public\".\"Big\"".to_string()]);
    }
}
