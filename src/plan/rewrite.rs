//! From one SELECT to fragment SQL plus a merge: aggregates become partial aggregates in
//! the fragments and a combine query over the partial rows; ORDER BY … LIMIT becomes a
//! per-fragment top-N plus a combine; plain scans are concatenated.
//!
//! The combine query runs on the session's own primary connection over `unnest` of typed
//! arrays of the partial rows, so numeric scales, float output, collation order, NULL rules
//! and overflow errors are PostgreSQL's own.

use std::ops::ControlFlow;

use sqlparser::ast::{
    BinaryOperator, Distinct, Expr, Function, FunctionArg, FunctionArgExpr, FunctionArgumentList,
    FunctionArguments, GroupByExpr, Ident, JoinConstraint, JoinOperator, LimitClause, ObjectName,
    ObjectNamePart, OrderByExpr, OrderByKind, OrderBySort, Query, Select, SelectItem,
    SelectItemQualifiedWildcardKind, SetExpr, TableAlias, TableFactor, TableWithJoins, Value,
    VisitMut, VisitorMut, WildcardAdditionalOptions,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use crate::config::FanoutConfig;
use crate::merge::ordered::{is_c_collation, KeyKind, MergeKey};

use super::from::{self, Place, Scope, Source, TableSet};
use super::split::{self, SplitSite, SplitStrategy};
use super::{aggregate_kind, fold, function_name, Candidate, ColumnInfo, PassReason};

/// An aggregate pgfan splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggKind {
    /// count(*) / count(x)
    Count,
    /// sum(x)
    Sum,
    /// min(x)
    Min,
    /// max(x)
    Max,
    /// avg(x), as sum and count
    Avg,
    /// bool_and / every
    BoolAnd,
    /// bool_or
    BoolOr,
    /// `agg(DISTINCT x)`: fragments group by x as one more key, the combine runs the
    /// aggregate itself over the deduplicated keys
    Distinct,
    /// variance and standard deviation, as count, sum and sum of squares in numeric
    Var {
        /// samp (n - 1) rather than pop (n)
        sample: bool,
        /// the square root of the variance
        stddev: bool,
    },
}

impl AggKind {
    /// How many partial columns the aggregate needs.
    pub fn partial_columns(self) -> usize {
        match self {
            AggKind::Avg => 2,
            AggKind::Var { .. } => 6,
            AggKind::Distinct => 0,
            _ => 1,
        }
    }
}

/// One aggregate of the original query and where its partial columns are.
#[derive(Debug, Clone)]
pub struct AggPartial {
    /// Which aggregate.
    pub kind: AggKind,
    /// Index of its first partial column among the aggregate columns.
    pub first: usize,
    /// Collation of its argument (min/max on text).
    pub collation: Option<String>,
    /// For [`AggKind::Distinct`]: the call over its key column (`count(DISTINCT pgfan_k3)`).
    pub distinct_call: Option<String>,
}

/// A sort key of a top-N merge.
#[derive(Debug, Clone)]
pub struct SortKey {
    /// Collation of the key expression, when it derives one.
    pub collation: Option<String>,
    /// `ASC`/`DESC`/`NULLS …` as written.
    pub options: String,
}

/// How partial rows are combined into the result.
#[derive(Debug, Clone)]
pub enum CombineSpec {
    /// GROUP BY / aggregates / DISTINCT: fragments return groups, the combine regroups.
    Aggregate {
        /// Collation of each group key.
        keys: Vec<Option<String>>,
        /// The aggregates, in partial-column order.
        aggs: Vec<AggPartial>,
        /// Combine SQL with `pgfan_src` for the partial rows and `pgfan_agg_<i>()` markers.
        template: String,
    },
    /// ORDER BY on keys pgfan cannot compare itself: fragments return their (top) rows
    /// plus hidden sort keys, sorted (and cut) in the combine.
    TopN {
        /// The hidden sort-key columns at the end of each fragment row.
        keys: Vec<SortKey>,
        /// LIMIT, if any.
        limit: Option<u64>,
        /// OFFSET.
        offset: u64,
    },
}

/// How fragment results become the client's result.
#[derive(Debug, Clone)]
pub enum MergeSpec {
    /// ORDER BY on keys pgfan can compare: fragments return sorted rows plus one hidden
    /// binary column per key, merged k-way and streamed.
    Ordered {
        /// The sort keys, in ORDER BY order.
        keys: Vec<MergeKey>,
        /// Columns the client sees (the hidden keys follow them).
        visible: usize,
        /// LIMIT, if any.
        limit: Option<u64>,
        /// OFFSET.
        offset: u64,
    },
    /// Rows are streamed as they arrive, up to `limit` after skipping `offset`.
    Concat {
        /// LIMIT, if any.
        limit: Option<u64>,
        /// OFFSET.
        offset: u64,
    },
    /// Partial rows are collected and combined on the session's primary connection.
    Combine(CombineSpec),
}

impl MergeSpec {
    /// One line for EXPLAIN FANOUT.
    pub fn describe(&self) -> String {
        match self {
            MergeSpec::Ordered {
                keys,
                limit,
                offset,
                ..
            } => {
                let bounds = match limit {
                    Some(l) => format!(", limit {l} offset {offset}"),
                    None if *offset > 0 => format!(", offset {offset}"),
                    None => String::new(),
                };
                format!(
                    "Merge: ordered merge on {} key{} (streamed){bounds}",
                    keys.len(),
                    if keys.len() == 1 { "" } else { "s" }
                )
            }
            MergeSpec::Concat { limit, offset } => match limit {
                Some(l) => format!("Merge: concat, limit {l} offset {offset}"),
                None if *offset > 0 => format!("Merge: concat, offset {offset}"),
                None => "Merge: concat (streamed)".into(),
            },
            MergeSpec::Combine(CombineSpec::Aggregate { template, .. }) => {
                format!("Merge: combine on the session connection: {template}")
            }
            MergeSpec::Combine(CombineSpec::TopN {
                limit: Some(limit),
                offset,
                ..
            }) => {
                format!("Merge: top-N combine, limit {limit} offset {offset}")
            }
            MergeSpec::Combine(CombineSpec::TopN { offset, .. }) => {
                format!("Merge: sort combine, offset {offset}")
            }
        }
    }
}

/// The analyzed statement: the fragment query with markers where the split table and the
/// split predicates go, the merge, and the table occurrence to split.
#[derive(Debug, Clone)]
pub struct Shape {
    /// The rendered fragment query with [`RELATION_MARKER`], [`PREDICATE_MARKER`] and one
    /// co-range marker per [`CoRange`].
    template: String,
    /// The merge.
    pub merge: MergeSpec,
    /// The column the split must be on: a GROUP BY column, so that every group lies
    /// within one fragment and fragments compute final groups.
    pub split_on: Option<String>,
    /// The table occurrence to split.
    pub site: SplitSite,
    co_ranges: Vec<CoRange>,
}

/// A table equi-joined to the split table on indexed keys: with an index split on the
/// split side's key, each fragment reads it in the same key range.
#[derive(Debug, Clone)]
struct CoRange {
    split_column: String,
    qualifier: String,
    column: String,
    place: Place,
}

/// Stands for the split table in the rendered fragment query.
const RELATION_MARKER: &str = "pgfan_split_relation_7c1e";
/// Stands for the split predicate.
const PREDICATE_MARKER: &str = "pgfan_split_predicate_7c1e";

fn co_range_marker(i: usize) -> String {
    format!("pgfan_co_range_{i}_7c1e")
}

impl Shape {
    /// The SQL of each fragment: the template with the split table (or the partitions) and
    /// the predicates spliced in. The query is rendered once, at analysis, since rendering
    /// per fragment dominates planning time.
    pub fn fragment_sqls(&self, split: &SplitStrategy) -> Vec<String> {
        let relations = split.relations(&self.site.table, self.site.pushdown.as_deref());
        let predicates = split.predicates(&self.site.qualifier);
        let co: Vec<Option<Vec<String>>> = self
            .co_ranges
            .iter()
            .map(|c| split.co_predicates(&c.split_column, &c.qualifier, &c.column))
            .collect();
        let paren = |p: &str| {
            if p.is_empty() {
                "(TRUE)".to_string()
            } else {
                format!("({p})")
            }
        };
        let mut out = Vec::with_capacity(relations.len());
        for (i, (relation, predicate)) in relations.iter().zip(&predicates).enumerate() {
            let mut sql = self
                .template
                .replacen(RELATION_MARKER, relation, 1)
                .replacen(PREDICATE_MARKER, &paren(predicate), 1);
            for (j, c) in co.iter().enumerate() {
                let p = c.as_ref().and_then(|c| c.get(i)).map(String::as_str);
                sql = sql.replacen(&co_range_marker(j), &paren(p.unwrap_or("")), 1);
            }
            out.push(sql);
        }
        out
    }

    /// `qualifier.column` of each table read in the split's key ranges.
    pub fn co_range_lines(&self, split: &SplitStrategy) -> Vec<String> {
        self.co_ranges
            .iter()
            .filter(|c| {
                split
                    .co_predicates(&c.split_column, &c.qualifier, &c.column)
                    .is_some()
            })
            .map(|c| match c.place {
                Place::InSubquery(_) => format!("{}.{} in an IN subquery", c.qualifier, c.column),
                _ => format!(
                    "{}.{} = {}.{}",
                    c.qualifier, c.column, self.site.qualifier, c.split_column
                ),
            })
            .collect()
    }
}

fn pass(label: &'static str, detail: impl Into<String>) -> PassReason {
    PassReason::new(label, detail)
}

fn ident(name: &str) -> Expr {
    Expr::Identifier(Ident::new(name))
}

fn marker_fn(name: String) -> Expr {
    Expr::Function(Function {
        name: ObjectName(vec![ObjectNamePart::Identifier(Ident::new(name))]),
        uses_odbc_syntax: false,
        parameters: FunctionArguments::None,
        args: FunctionArguments::List(FunctionArgumentList {
            duplicate_treatment: None,
            args: vec![],
            clauses: vec![],
        }),
        filter: None,
        null_treatment: None,
        over: None,
        within_group: vec![],
    })
}

fn literal_u64(e: &Expr) -> Option<u64> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.parse().ok(),
            _ => None,
        },
        _ => None,
    }
}

/// LIMIT and OFFSET as literal numbers; `$n` or expressions pass through.
fn limit_offset(q: &Query) -> Result<(Option<u64>, u64), PassReason> {
    match &q.limit_clause {
        None => Ok((None, 0)),
        Some(LimitClause::LimitOffset { limit, offset, .. }) => {
            let limit = match limit {
                None => None,
                Some(Expr::Value(v)) if matches!(v.value, Value::Null) => None,
                Some(e) => Some(
                    literal_u64(e).ok_or_else(|| pass("limit", "LIMIT is not a literal number"))?,
                ),
            };
            let offset = match offset {
                None => 0,
                Some(o) => literal_u64(&o.value)
                    .ok_or_else(|| pass("limit", "OFFSET is not a literal number"))?,
            };
            Ok((limit, offset))
        }
        Some(_) => Err(pass("limit", "LIMIT form")),
    }
}

/// Resolves column references (outside subqueries, which see their own FROM) against
/// the scope; collects problems.
struct ColumnCheck<'a> {
    scope: &'a Scope,
    problem: Option<PassReason>,
    nondeterministic: bool,
}

impl ColumnCheck<'_> {
    fn check(&mut self, e: &Expr) {
        from::visit_own_level(e, |x| match self.scope.resolve(x) {
            Some(Ok((_, c))) => {
                self.nondeterministic |= !c.deterministic;
                ControlFlow::Continue(())
            }
            None => ControlFlow::Continue(()),
            Some(Err(p)) => {
                self.problem.get_or_insert(p);
                ControlFlow::Break(())
            }
        });
    }
}

fn is_aggregate(f: &Function) -> bool {
    f.over.is_none()
        && function_name(&f.name)
            .and_then(|n| aggregate_kind(&n))
            .is_some()
}

/// True if `e` has an aggregate of its own query level (a subquery's aggregates are the
/// subquery's).
fn contains_aggregate(e: &Expr) -> bool {
    let mut found = false;
    from::visit_own_level(e, |x| match x {
        Expr::Function(f) if is_aggregate(f) => {
            found = true;
            ControlFlow::Break(())
        }
        _ => ControlFlow::Continue(()),
    });
    found
}

/// x of `agg(DISTINCT x)` without FILTER, ORDER BY inside or WITHIN GROUP.
fn distinct_argument(f: &Function) -> Option<Expr> {
    let FunctionArguments::List(l) = &f.args else {
        return None;
    };
    if l.duplicate_treatment != Some(sqlparser::ast::DuplicateTreatment::Distinct)
        || !l.clauses.is_empty()
        || f.filter.is_some()
        || !f.within_group.is_empty()
        || f.over.is_some()
    {
        return None;
    }
    match l.args.as_slice() {
        [FunctionArg::Unnamed(FunctionArgExpr::Expr(x))] => Some(x.clone()),
        _ => None,
    }
}

/// The aggregates of the select list, HAVING and ORDER BY (not of subqueries).
fn top_level_aggregates(s: &Select, order: &[OrderByExpr]) -> Vec<Function> {
    let mut found = Vec::new();
    let exprs = s
        .projection
        .iter()
        .filter_map(item_expr)
        .map(|(e, _)| e)
        .chain(&s.having)
        .chain(order.iter().map(|o| &o.expr));
    for e in exprs {
        from::visit_own_level(e, |x| {
            if let Expr::Function(f) = x {
                let name = function_name(&f.name).unwrap_or_default();
                if f.over.is_none()
                    && (aggregate_kind(&name).is_some()
                        || super::HOLISTIC_AGGREGATES.contains(&name.as_str()))
                {
                    found.push(f.clone());
                }
            }
            ControlFlow::Continue(())
        });
    }
    found
}

/// The arguments of the statement's `agg(DISTINCT x)` aggregates.
fn distinct_arguments(s: &Select, order: &[OrderByExpr]) -> Vec<Expr> {
    top_level_aggregates(s, order)
        .iter()
        .filter(|f| aggregate_kind(&function_name(&f.name).unwrap_or_default()).is_some())
        .filter_map(distinct_argument)
        .collect()
}

/// True if every aggregate without a partial form is a plain `agg(DISTINCT x)` of a
/// splittable aggregate: then the fragments group by x too and the combine deduplicates.
fn only_distinct_holistic(s: &Select, order: &[OrderByExpr]) -> bool {
    top_level_aggregates(s, order).iter().all(|f| {
        let name = function_name(&f.name).unwrap_or_default();
        aggregate_kind(&name).is_some()
            && (super::aggregate_problem(f).is_none() || distinct_argument(f).is_some())
    })
}

fn is_subquery(e: &Expr) -> bool {
    matches!(
        e,
        Expr::Subquery(_) | Expr::Exists { .. } | Expr::InSubquery { .. }
    )
}

/// The (folded) aliases of the select list.
fn output_aliases(s: &Select) -> Vec<String> {
    s.projection
        .iter()
        .filter_map(|i| match i {
            SelectItem::ExprWithAlias { alias, .. } => Some(fold(alias)),
            _ => None,
        })
        .collect()
}

fn item_expr(item: &SelectItem) -> Option<(&Expr, Option<&Ident>)> {
    match item {
        SelectItem::UnnamedExpr(e) => Some((e, None)),
        SelectItem::ExprWithAlias { expr, alias } => Some((expr, Some(alias))),
        _ => None,
    }
}

/// A table occurrence the statement could be split on.
struct SiteChoice {
    /// FROM ordinals from the statement down to the table (through derived tables).
    path: Vec<usize>,
    site: SplitSite,
    /// A derived table around it groups: the split must be on this GROUP BY column.
    required: Option<String>,
    co_ranges: Vec<CoRange>,
}

/// The tables on the preserved side of every outer join of `s`, and inside derived tables
/// whose rows each come from one row (or one complete group) of such a table.
fn split_sites(
    s: &Select,
    scope: &Scope,
    tables: &TableSet,
    cfg: &FanoutConfig,
    path: &[usize],
    out: &mut Vec<SiteChoice>,
) -> Result<(), PassReason> {
    for (i, rel) in scope.relations.iter().enumerate() {
        if !rel.preserved {
            continue;
        }
        let mut here = path.to_vec();
        here.push(i);
        match &rel.source {
            Source::Table(t) => {
                let co_ranges = co_ranges(s, scope, i, tables, cfg);
                let mut co_keys: Vec<String> = Vec::new();
                for c in &co_ranges {
                    if !co_keys.contains(&c.split_column) {
                        co_keys.push(c.split_column.clone());
                    }
                }
                out.push(SiteChoice {
                    path: here,
                    site: SplitSite {
                        table: t.clone(),
                        qualifier: rel.qualifier.clone(),
                        filter: s.selection.clone(),
                        co_keys,
                        pushdown: pushdown(s, scope, i),
                        any_literal: false,
                    },
                    required: None,
                    co_ranges,
                });
            }
            Source::Derived(q, _) => {
                let SetExpr::Select(inner) = q.body.as_ref() else {
                    continue;
                };
                if inner.distinct.is_some() {
                    continue;
                }
                let GroupByExpr::Expressions(group_by, _) = &inner.group_by else {
                    continue;
                };
                let grouped = !group_by.is_empty()
                    || inner.having.is_some()
                    || inner
                        .projection
                        .iter()
                        .filter_map(item_expr)
                        .any(|(e, _)| contains_aggregate(e));
                let inner_scope = Scope::of(inner, tables)?;
                let mut found = Vec::new();
                split_sites(inner, &inner_scope, tables, cfg, &here, &mut found)?;
                for mut f in found {
                    if grouped {
                        // complete groups only: a GROUP BY column of a table of this SELECT
                        if f.path.len() != here.len() + 1 || f.required.is_some() {
                            continue;
                        }
                        let rel = f.path[here.len()];
                        let Some(col) = group_split_column(&inner_scope, rel, inner, group_by)
                        else {
                            continue;
                        };
                        f.required = Some(col);
                    }
                    out.push(f);
                }
            }
        }
    }
    Ok(())
}

/// The AND conjuncts of `s`'s WHERE that read only columns of relation `split` (no
/// subqueries), with the qualifiers removed, AND-ed; rows of a preserved relation they
/// reject cannot reach the result.
fn pushdown(s: &Select, scope: &Scope, split: usize) -> Option<String> {
    let all = from::conjuncts(s.selection.as_ref()?);
    let mut kept = Vec::new();
    for c in all {
        let mut own = true;
        let mut columns = 0;
        let _ = sqlparser::ast::visit_expressions(c, |x| {
            if is_subquery(x) {
                own = false;
                return ControlFlow::Break(());
            }
            match scope.resolve(x) {
                Some(Ok((r, _))) if r == split => columns += 1,
                Some(_) => {
                    own = false;
                    return ControlFlow::Break(());
                }
                None => {}
            }
            ControlFlow::Continue(())
        });
        if own && columns > 0 {
            let mut c = c.clone();
            let _ = sqlparser::ast::visit_expressions_mut(&mut c, |x| {
                if let Expr::CompoundIdentifier(p) = x {
                    if let [_, col] = p.as_slice() {
                        *x = Expr::Identifier(col.clone());
                    }
                }
                ControlFlow::<()>::Continue(())
            });
            kept.push(format!("({c})"));
        }
    }
    (!kept.is_empty()).then(|| kept.join(" AND "))
}

/// Equalities between a column of relation `split` and an indexed column of another large
/// table that every result row satisfies (in WHERE or an inner join's ON, with the other
/// table preserved), or that only the right side of a LEFT JOIN is filtered by (in its ON).
fn co_ranges(
    s: &Select,
    scope: &Scope,
    split: usize,
    tables: &TableSet,
    cfg: &FanoutConfig,
) -> Vec<CoRange> {
    let mut out: Vec<CoRange> = Vec::new();
    for (a, b, place) in scope.equalities(s) {
        let (Some((ra, ca)), Some((rb, cb))) = (scope.column(&a), scope.column(&b)) else {
            continue;
        };
        let (split_col, other, other_col) = if ra == split && rb != split {
            (ca, rb, cb)
        } else if rb == split && ra != split {
            (cb, ra, ca)
        } else {
            continue;
        };
        let rel = &scope.relations[other];
        let Source::Table(t) = &rel.source else {
            continue;
        };
        if !other_col.indexed
            || !split::range_type(other_col.type_oid)
            || !split::range_type(split_col.type_oid)
            || t.kind == 'p'
            || t.blocks < cfg.min_fragment_pages
        {
            continue;
        }
        let valid = match place {
            Place::Where => rel.preserved,
            Place::On(o) => o == other && rel.left_join_on,
            Place::InSubquery(_) => false,
        };
        if valid
            && !out
                .iter()
                .any(|c| c.qualifier == rel.qualifier && c.column == other_col.name)
        {
            out.push(CoRange {
                split_column: split_col.name.clone(),
                qualifier: rel.qualifier.clone(),
                column: other_col.name.clone(),
                place,
            });
        }
    }
    // `x IN (SELECT y FROM t …)` with x in the split's key range (the split column or a
    // co-ranged one): only y values in that range can match, so the subquery reads that
    // range too (rows, or whole groups when it groups by y)
    let mut found = Vec::new();
    let mut n = 0;
    if let Some(mut w) = s.selection.clone() {
        from::in_subqueries(&mut w, &mut |x, sub| {
            let here = n;
            n += 1;
            let Some((r, col)) = scope.column(x) else {
                return;
            };
            let split_column = if r == split {
                col.name.clone()
            } else {
                match out
                    .iter()
                    .find(|c| c.qualifier == scope.relations[r].qualifier && c.column == col.name)
                {
                    Some(c) => c.split_column.clone(),
                    None => return,
                }
            };
            if let Some((qualifier, column)) = ranged_subquery_column(sub, tables) {
                found.push(CoRange {
                    split_column,
                    qualifier,
                    column,
                    place: Place::InSubquery(here),
                });
            }
        });
    }
    out.extend(found);
    out
}

/// For `SELECT y FROM t [WHERE …] [GROUP BY … y …]`: t's qualifier and y, when y is a
/// column of a range type (a filter on y then keeps whole groups).
fn ranged_subquery_column(q: &Query, tables: &TableSet) -> Option<(String, String)> {
    let SetExpr::Select(s) = q.body.as_ref() else {
        return None;
    };
    if s.from.len() != 1 || !s.from[0].joins.is_empty() {
        return None;
    }
    let scope = Scope::of(s, tables).ok()?;
    let [item] = s.projection.as_slice() else {
        return None;
    };
    let (e, _) = item_expr(item)?;
    let (_, col) = scope.column(strip_nested(e))?;
    if !split::range_type(col.type_oid) {
        return None;
    }
    let GroupByExpr::Expressions(keys, _) = &s.group_by else {
        return None;
    };
    let grouped = !keys.is_empty() || s.having.is_some() || contains_aggregate(e);
    if grouped
        && !keys.iter().any(|k| {
            scope
                .column(strip_nested(k))
                .is_some_and(|(_, c)| c.name == col.name)
        })
    {
        return None;
    }
    Some((scope.relations[0].qualifier.clone(), col.name.clone()))
}

fn and(left: Option<Expr>, right: Expr) -> Expr {
    match left {
        None => right,
        Some(l) => Expr::BinaryOp {
            left: Box::new(Expr::Nested(Box::new(l))),
            op: BinaryOperator::And,
            right: Box::new(right),
        },
    }
}

/// The statement with markers: the split table's name, its predicate in the WHERE of its
/// SELECT, and each co-range predicate in that WHERE or in its LEFT JOIN's ON.
fn mark(q: &Query, choice: &SiteChoice) -> Result<Query, PassReason> {
    let broken = || pass("unsupported_shape", "split table not found in FROM");
    let mut m = q.clone();
    let mut sel: &mut Select = match m.body.as_mut() {
        SetExpr::Select(s) => s,
        _ => return Err(broken()),
    };
    let (last, outer) = choice.path.split_last().ok_or_else(broken)?;
    for ordinal in outer {
        let Some((TableFactor::Derived { subquery, .. }, _)) = from::factor_mut(sel, *ordinal)
        else {
            return Err(broken());
        };
        sel = match subquery.body.as_mut() {
            SetExpr::Select(s) => s,
            _ => return Err(broken()),
        };
    }
    match from::factor_mut(sel, *last) {
        Some((TableFactor::Table { name, alias, .. }, _)) => {
            if alias.is_none() {
                *alias = Some(TableAlias {
                    explicit: true,
                    name: Ident::with_quote('"', choice.site.qualifier.clone()),
                    columns: vec![],
                    at: None,
                });
            }
            *name = ObjectName(vec![ObjectNamePart::Identifier(Ident::new(
                RELATION_MARKER,
            ))]);
        }
        _ => return Err(broken()),
    }
    sel.selection = Some(and(sel.selection.take(), ident(PREDICATE_MARKER)));
    for (i, c) in choice.co_ranges.iter().enumerate() {
        let marker = ident(&co_range_marker(i));
        match c.place {
            Place::Where => sel.selection = Some(and(sel.selection.take(), marker)),
            Place::On(o) => {
                let on = match from::factor_mut(sel, o) {
                    Some((
                        _,
                        Some(
                            JoinOperator::Left(JoinConstraint::On(on))
                            | JoinOperator::LeftOuter(JoinConstraint::On(on)),
                        ),
                    )) => on,
                    _ => return Err(broken()),
                };
                *on = and(Some(on.clone()), marker);
            }
            Place::InSubquery(target) => {
                let mut n = 0;
                let mut marker = Some(marker);
                if let Some(w) = sel.selection.as_mut() {
                    from::in_subqueries(w, &mut |_, sub| {
                        if n == target {
                            if let (SetExpr::Select(ss), Some(m)) =
                                (sub.body.as_mut(), marker.take())
                            {
                                ss.selection = Some(and(ss.selection.take(), m));
                            }
                        }
                        n += 1;
                    });
                }
                if marker.is_some() {
                    return Err(broken());
                }
            }
        }
    }
    Ok(m)
}

/// Checks columns, chooses the table to split and builds the fragment query and the merge.
pub fn analyze(c: &Candidate, tables: &TableSet, cfg: &FanoutConfig) -> Result<Shape, PassReason> {
    let q = &c.query;
    let SetExpr::Select(s) = q.body.as_ref() else {
        return Err(pass("unsupported_shape", "not a SELECT"));
    };
    let scope = Scope::of(s, tables)?;
    let mut sites = Vec::new();
    split_sites(s, &scope, tables, cfg, &[], &mut sites)?;
    // the largest table is the one worth splitting (the first of equals)
    let choice = sites.into_iter().reduce(|best, site| {
        if site.site.table.blocks > best.site.table.blocks {
            site
        } else {
            best
        }
    });
    let mut choice = choice.ok_or_else(|| {
        pass(
            "no_split_table",
            "no table on the preserved side of every outer join to split",
        )
    })?;
    choice.site.any_literal = c.literal_placeholders;
    if let Some(reason) = super::split::point_lookup(&choice.site, cfg) {
        return Err(reason);
    }
    let marked = mark(q, &choice)?;
    let mut shape = shape_of(c, &marked, s, &scope, &choice, cfg.min_rows_per_group)?;
    if shape.split_on.is_none() {
        shape.split_on = choice.required.clone();
    }
    let template = shape.fragment.to_string();
    let mut markers = vec![RELATION_MARKER.to_string(), PREDICATE_MARKER.to_string()];
    markers.extend((0..choice.co_ranges.len()).map(co_range_marker));
    if markers
        .iter()
        .any(|m| template.matches(m.as_str()).count() != 1)
    {
        return Err(pass(
            "unsupported_shape",
            "the statement spells a pgfan marker",
        ));
    }
    Ok(Shape {
        template,
        merge: shape.merge,
        split_on: shape.split_on,
        site: choice.site,
        co_ranges: choice.co_ranges,
    })
}

/// A fragment query (with markers) and its merge.
struct FragmentShape {
    fragment: Query,
    merge: MergeSpec,
    split_on: Option<String>,
}

fn shape_of(
    c: &Candidate,
    base: &Query,
    s: &Select,
    scope: &Scope,
    choice: &SiteChoice,
    min_rows_per_group: u64,
) -> Result<FragmentShape, PassReason> {
    let q = &c.query;
    let (limit, offset) = limit_offset(q)?;
    let order: Vec<OrderByExpr> = match &q.order_by {
        Some(ob) => match &ob.kind {
            OrderByKind::Expressions(v) => v.clone(),
            OrderByKind::All(_) => return Err(pass("unsupported_shape", "ORDER BY ALL")),
        },
        None => vec![],
    };
    for o in &order {
        if matches!(o.options.sort, Some(OrderBySort::Using(_))) || o.with_fill.is_some() {
            return Err(pass("unsupported_shape", "ORDER BY USING"));
        }
    }
    let aliases = output_aliases(s);
    let is_output_alias = |e: &Expr| match e {
        Expr::Identifier(i) => aliases.contains(&fold(i)),
        _ => false,
    };
    let is_position = |e: &Expr| literal_u64(e).is_some();

    // every column reference must resolve (else PostgreSQL's own error)
    let mut check = ColumnCheck {
        scope,
        problem: None,
        nondeterministic: false,
    };
    for (e, _) in s.projection.iter().filter_map(item_expr) {
        check.check(e);
    }
    for e in [&s.selection, &s.having].into_iter().flatten() {
        check.check(e);
    }
    if let GroupByExpr::Expressions(g, _) = &s.group_by {
        for e in g {
            if !is_output_alias(e) && !is_position(e) {
                check.check(e);
            }
        }
    }
    for o in &order {
        if !is_output_alias(&o.expr) && !is_position(&o.expr) {
            check.check(&o.expr);
        }
    }
    if let Some(p) = check.problem {
        return Err(p);
    }
    if check.nondeterministic {
        return Err(pass(
            "collation",
            "column with a nondeterministic collation",
        ));
    }

    let group_by: Vec<Expr> = match &s.group_by {
        GroupByExpr::Expressions(v, _) => v.clone(),
        GroupByExpr::All(_) => return Err(pass("unsupported_shape", "GROUP BY ALL")),
    };
    let has_aggs = s
        .projection
        .iter()
        .filter_map(item_expr)
        .any(|(e, _)| contains_aggregate(e))
        || s.having.as_ref().is_some_and(contains_aggregate)
        || order.iter().any(|o| contains_aggregate(&o.expr));
    let distinct = matches!(s.distinct, Some(Distinct::Distinct));
    if s.selection.as_ref().is_some_and(contains_aggregate) {
        return Err(pass("unsupported_shape", "aggregate in WHERE"));
    }

    // Complete groups: when the split is on a GROUP BY column, fragments compute final
    // groups, so any aggregate is exact and nothing is combined. Needed for holistic
    // aggregates (and for subqueries over groups), and cheaper than partial rows when
    // there are many groups.
    let split_rel = (choice.path.len() == 1).then(|| choice.path[0]);
    let groups = match split_rel {
        Some(r) if !group_by.is_empty() => estimated_groups(s, scope, r),
        _ => None,
    };
    let rows = choice.site.table.reltuples;
    let many_groups =
        min_rows_per_group > 0 && groups.is_some_and(|g| g * min_rows_per_group as f64 > rows);
    let grouped = has_aggs || !group_by.is_empty() || distinct || s.having.is_some();
    let subquery_over_groups = grouped && subquery_outside_where(s, &order);
    if c.holistic || many_groups || subquery_over_groups {
        let column = match split_rel {
            Some(r) if !distinct => group_split_column(scope, r, s, &group_by),
            _ => None,
        };
        let dedupe = c.holistic
            && !many_groups
            && !subquery_over_groups
            && only_distinct_holistic(s, &order);
        if column.is_none() && dedupe {
            return aggregate_shape(c, base, scope, s, &group_by, &order, distinct);
        }
        let Some(column) = column else {
            return Err(if c.holistic {
                pass(
                    "holistic_aggregate",
                    "DISTINCT, ordered or ordered-set aggregates fan out only with GROUP BY on \
                     a column of the split table with a btree index and a histogram",
                )
            } else if subquery_over_groups {
                pass(
                    "subquery",
                    "a subquery over groups fans out only with GROUP BY on a column of the \
                     split table with a btree index and a histogram",
                )
            } else {
                pass(
                    "many_groups",
                    format!(
                        "about {:.0} groups in {:.0} rows and no indexed GROUP BY column to \
                         split on: fragments would ship nearly every row to the combine",
                        groups.unwrap_or(0.0),
                        rows
                    ),
                )
            });
        };
        if choice.required.as_ref().is_some_and(|r| *r != column) {
            return Err(pass("unsupported_shape", "two GROUP BY levels to split on"));
        }
        let mut shape = rows_shape(base, scope, s, &order, (limit, offset), true)?;
        shape.split_on = Some(column);
        return Ok(shape);
    }

    if grouped {
        // LIMIT/OFFSET stay in the combine query (groups span fragments)
        return aggregate_shape(c, base, scope, s, &group_by, &order, distinct);
    }
    rows_shape(base, scope, s, &order, (limit, offset), false)
}

/// True if the select list, HAVING or ORDER BY has a subquery: over groups it would run
/// in the combine, outside the fragments' snapshot.
fn subquery_outside_where(s: &Select, order: &[OrderByExpr]) -> bool {
    let mut found = false;
    let mut look = |e: &Expr| {
        let _ = sqlparser::ast::visit_expressions(e, |x| {
            if is_subquery(x) {
                found = true;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        });
    };
    for (e, _) in s.projection.iter().filter_map(item_expr) {
        look(e);
    }
    if let Some(h) = &s.having {
        look(h);
    }
    for o in order {
        look(&o.expr);
    }
    found
}

/// Fragments that return final rows (a scan, or complete groups): concatenated,
/// merged in order, or cut to the top N.
fn rows_shape(
    base: &Query,
    scope: &Scope,
    s: &Select,
    order: &[OrderByExpr],
    (limit, offset): (Option<u64>, u64),
    grouped: bool,
) -> Result<FragmentShape, PassReason> {
    let is_position = |e: &Expr| literal_u64(e).is_some();
    if s.projection.iter().any(|i| {
        matches!(
            i,
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
        )
    }) && order.iter().any(|o| is_position(&o.expr))
    {
        return Err(pass("unsupported_shape", "ORDER BY position with *"));
    }
    if !order.is_empty() {
        if let Some((keys, visible)) = mergeable_keys(scope, s, order)? {
            return ordered_shape(base, s, order, keys, visible, limit, offset);
        }
        if limit.is_none() && !grouped {
            // a sort combine holds every row: only for groups, not for a scan
            return Err(pass(
                "order_key",
                "ORDER BY without LIMIT on a key pgfan cannot compare (not a plain column of \
                 an integer, float, numeric, date/time, bool, uuid or bytea type, or text under \
                 the C collation)",
            ));
        }
        return topn_shape(base, scope, s, order, limit, offset);
    }
    // plain scan: each fragment returns at most limit + offset rows
    let mut fragment = base.clone();
    fragment.limit_clause = fragment_limit(limit, offset);
    Ok(FragmentShape {
        fragment,
        merge: MergeSpec::Concat { limit, offset },
        split_on: None,
    })
}

/// A fragment's LIMIT: the rows the merge may need, limit + offset (the merge skips the
/// offset); none without a LIMIT.
fn fragment_limit(limit: Option<u64>, offset: u64) -> Option<LimitClause> {
    limit.map(|l| LimitClause::LimitOffset {
        limit: Some(Expr::value(Value::Number(
            l.saturating_add(offset).to_string(),
            false,
        ))),
        offset: None,
        limit_by: vec![],
    })
}

/// The merge keys of an ORDER BY whose every key is a plain column of a type
/// [`KeyKind::for_type`] compares, and the number of visible columns; `None` otherwise.
fn mergeable_keys(
    scope: &Scope,
    s: &Select,
    order: &[OrderByExpr],
) -> Result<Option<(Vec<MergeKey>, usize)>, PassReason> {
    let mut visible = 0;
    for item in &s.projection {
        let width = match item {
            SelectItem::Wildcard(o) if plain_wildcard(o) => scope.wildcard_width(None),
            SelectItem::QualifiedWildcard(SelectItemQualifiedWildcardKind::ObjectName(n), o)
                if plain_wildcard(o) =>
            {
                match n.0.as_slice() {
                    [ObjectNamePart::Identifier(i)] => scope.wildcard_width(Some(&fold(i))),
                    _ => None,
                }
            }
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => None,
            _ => Some(1),
        };
        let Some(width) = width else {
            return Ok(None);
        };
        visible += width;
    }
    let mut keys = Vec::with_capacity(order.len());
    for o in order {
        let expr = resolve_output_ref(&o.expr, s)?.unwrap_or_else(|| o.expr.clone());
        let (column, collation) = match strip_nested(&expr) {
            Expr::Collate { expr, collation } => (strip_nested(expr), Some(collation.to_string())),
            e => (e, None),
        };
        let Some((_, column)) = scope.column(column) else {
            return Ok(None);
        };
        let collation = collation.or_else(|| column.collation.clone());
        let c_collation = collation.as_deref().is_some_and(is_c_collation);
        let Some(kind) = KeyKind::for_type(column.type_oid, c_collation) else {
            return Ok(None);
        };
        let descending = matches!(o.options.sort, Some(OrderBySort::Desc));
        keys.push(MergeKey {
            kind,
            descending,
            nulls_first: o.options.nulls_first.unwrap_or(descending),
        });
    }
    Ok(Some((keys, visible)))
}

/// `*` as PostgreSQL spells it, without another dialect's EXCLUDE/REPLACE/… options.
fn plain_wildcard(o: &WildcardAdditionalOptions) -> bool {
    o.opt_ilike.is_none()
        && o.opt_exclude.is_none()
        && o.opt_except.is_none()
        && o.opt_replace.is_none()
        && o.opt_rename.is_none()
        && o.opt_alias.is_none()
}

fn strip_nested(e: &Expr) -> &Expr {
    match e {
        Expr::Nested(inner) => strip_nested(inner),
        e => e,
    }
}

/// Fragments keep the ORDER BY, return at most limit + offset rows, and append each
/// key as a hidden column; the merge interleaves them k-way.
fn ordered_shape(
    base: &Query,
    s: &Select,
    order: &[OrderByExpr],
    keys: Vec<MergeKey>,
    visible: usize,
    limit: Option<u64>,
    offset: u64,
) -> Result<FragmentShape, PassReason> {
    let (fragment, _) = with_hidden_keys(base, s, order, limit, offset)?;
    Ok(FragmentShape {
        fragment,
        merge: MergeSpec::Ordered {
            keys,
            visible,
            limit,
            offset,
        },
        split_on: None,
    })
}

/// The fragment query with each ORDER BY key appended as hidden column `pgfan_h<i>` and
/// at most limit + offset rows; also the key expressions.
fn with_hidden_keys(
    base: &Query,
    s: &Select,
    order: &[OrderByExpr],
    limit: Option<u64>,
    offset: u64,
) -> Result<(Query, Vec<Expr>), PassReason> {
    let mut fragment = base.clone();
    let SetExpr::Select(fs) = fragment.body.as_mut() else {
        return Err(pass("unsupported_shape", "not a SELECT"));
    };
    let mut exprs = Vec::with_capacity(order.len());
    for (i, o) in order.iter().enumerate() {
        let expr = resolve_output_ref(&o.expr, s)?.unwrap_or_else(|| o.expr.clone());
        fs.projection.push(SelectItem::ExprWithAlias {
            expr: expr.clone(),
            alias: Ident::new(format!("pgfan_h{i}")),
        });
        exprs.push(expr);
    }
    fragment.limit_clause = fragment_limit(limit, offset);
    Ok((fragment, exprs))
}

fn topn_shape(
    base: &Query,
    scope: &Scope,
    s: &Select,
    order: &[OrderByExpr],
    limit: Option<u64>,
    offset: u64,
) -> Result<FragmentShape, PassReason> {
    let (fragment, exprs) = with_hidden_keys(base, s, order, limit, offset)?;
    let keys = exprs
        .iter()
        .zip(order)
        .map(|(e, o)| SortKey {
            collation: scope.collation(e),
            options: o.options.to_string(),
        })
        .collect();
    Ok(FragmentShape {
        fragment,
        merge: MergeSpec::Combine(CombineSpec::TopN {
            keys,
            limit,
            offset,
        }),
        split_on: None,
    })
}

/// The first GROUP BY key that is a plain column an index-range split can cut (btree
/// index, histogram, integer/numeric/date/time type): splitting on it keeps every group
/// within one fragment.
fn group_split_column(
    scope: &Scope,
    split: usize,
    s: &Select,
    group_by: &[Expr],
) -> Option<String> {
    group_by.iter().find_map(|k| {
        let col = group_column(scope, split, s, k)?;
        (col.indexed && col.histogram.len() >= 3 && split::range_type(col.type_oid))
            .then(|| col.name.clone())
    })
}

/// The column of relation `split` a GROUP BY key names: an input column first, an output
/// alias or position second (PostgreSQL's order).
fn group_column<'s>(
    scope: &'s Scope,
    split: usize,
    s: &Select,
    key: &Expr,
) -> Option<&'s ColumnInfo> {
    let column = |e: &Expr| match scope.column(strip_nested(e)) {
        Some((r, c)) if r == split => Some(c),
        _ => None,
    };
    match column(key) {
        Some(col) => Some(col),
        None => column(&resolve_output_ref(key, s).ok()??),
    }
}

/// The number of groups a GROUP BY over plain columns of relation `split` makes, estimated
/// from `pg_stats.n_distinct` (a NULL key counts as one more group); `None` without a
/// GROUP BY, for other keys or without statistics.
fn estimated_groups(s: &Select, scope: &Scope, split: usize) -> Option<f64> {
    let GroupByExpr::Expressions(keys, _) = &s.group_by else {
        return None;
    };
    let Source::Table(table) = &scope.relations.get(split)?.source else {
        return None;
    };
    let rows = table.reltuples;
    if keys.is_empty() || rows <= 0.0 {
        return None;
    }
    let mut groups = 1.0f64;
    for k in keys {
        let col = group_column(scope, split, s, k)?;
        let distinct = match col.n_distinct {
            d if d > 0.0 => d,
            d if d < 0.0 => -d * rows,
            _ => return None,
        };
        let nulls = if col.null_frac > 0.0 { 1.0 } else { 0.0 };
        groups *= distinct.max(1.0) + nulls;
    }
    Some(groups.min(rows))
}

/// For an ORDER BY / GROUP BY item that names an output column (position or alias), the
/// output expression.
fn resolve_output_ref(e: &Expr, s: &Select) -> Result<Option<Expr>, PassReason> {
    if let Some(n) = literal_u64(e) {
        let item = s
            .projection
            .get((n as usize).wrapping_sub(1))
            .and_then(item_expr)
            .ok_or_else(|| pass("unsupported_shape", "position out of range or on *"))?;
        return Ok(Some(item.0.clone()));
    }
    if let Expr::Identifier(i) = e {
        for item in &s.projection {
            if let SelectItem::ExprWithAlias { expr, alias } = item {
                if fold(alias) == fold(i) {
                    return Ok(Some(expr.clone()));
                }
            }
        }
    }
    Ok(None)
}

/// Replaces group keys and aggregates in final expressions.
struct FinalRewrite<'a> {
    keys: &'a [Expr],
    /// The first `grouping` keys are GROUP BY keys; the rest are DISTINCT arguments.
    grouping: usize,
    scope: &'a Scope,
    partials: Vec<Expr>,
    aggs: Vec<AggPartial>,
    seen: Vec<(Function, usize)>,
    problem: Option<PassReason>,
}

impl FinalRewrite<'_> {
    fn add_aggregate(&mut self, f: &Function) -> Result<usize, PassReason> {
        if let Some((_, i)) = self.seen.iter().find(|(g, _)| g == f) {
            return Ok(*i);
        }
        let name = function_name(&f.name).unwrap_or_default();
        let kind =
            aggregate_kind(&name).ok_or_else(|| pass("aggregate", format!("aggregate {name}")))?;
        let arg = match &f.args {
            FunctionArguments::List(l) => match l.args.as_slice() {
                [FunctionArg::Unnamed(FunctionArgExpr::Expr(e))] => Some(e.clone()),
                [FunctionArg::Unnamed(FunctionArgExpr::Wildcard)] => None,
                _ => return Err(pass("aggregate", "aggregate arguments")),
            },
            _ => return Err(pass("aggregate", "aggregate arguments")),
        };
        if arg.as_ref().is_some_and(contains_aggregate) {
            return Err(pass("aggregate", "nested aggregate"));
        }
        if let Some(x) = distinct_argument(f) {
            let k = self
                .keys
                .iter()
                .position(|k| *k == x)
                .ok_or_else(|| pass("aggregate", "DISTINCT aggregate"))?;
            let mut g = f.clone();
            if let FunctionArguments::List(l) = &mut g.args {
                l.args = vec![FunctionArg::Unnamed(FunctionArgExpr::Expr(ident(
                    &format!("pgfan_k{k}"),
                )))];
            }
            let i = self.aggs.len();
            self.aggs.push(AggPartial {
                kind: AggKind::Distinct,
                first: self.partials.len(),
                collation: None,
                distinct_call: Some(g.to_string()),
            });
            self.seen.push((f.clone(), i));
            return Ok(i);
        }
        let filter = f.filter.clone();
        let call = |fname: &str, a: Option<Expr>| -> Expr {
            let mut g = f.clone();
            g.name = ObjectName(vec![ObjectNamePart::Identifier(Ident::new(fname))]);
            g.args = FunctionArguments::List(FunctionArgumentList {
                duplicate_treatment: None,
                args: vec![FunctionArg::Unnamed(match a {
                    Some(e) => FunctionArgExpr::Expr(e),
                    None => FunctionArgExpr::Wildcard,
                })],
                clauses: vec![],
            });
            g.filter = filter.clone();
            Expr::Function(g)
        };
        let parse = |sql: String| -> Result<Expr, PassReason> {
            Parser::new(&PostgreSqlDialect {})
                .try_with_sql(&sql)
                .and_then(|mut p| p.parse_expr())
                .map_err(|e| pass("aggregate", format!("rewrite failed: {e}")))
        };
        let a = arg.clone();
        let first = self.partials.len();
        let collation = a.as_ref().and_then(|e| self.scope.collation(e));
        match kind {
            AggKind::Count => self.partials.push(call("count", a)),
            AggKind::Sum => self.partials.push(call("sum", a)),
            AggKind::Min => self.partials.push(call("min", a)),
            AggKind::Max => self.partials.push(call("max", a)),
            AggKind::BoolAnd => self.partials.push(call("bool_and", a)),
            AggKind::BoolOr => self.partials.push(call("bool_or", a)),
            AggKind::Avg => {
                self.partials.push(call("sum", a.clone()));
                self.partials.push(call("count", a));
            }
            AggKind::Distinct => return Err(pass("aggregate", "DISTINCT aggregate")),
            AggKind::Var { .. } => {
                let x = a.ok_or_else(|| pass("aggregate", "variance(*)"))?;
                let xn = parse(format!("({x})::numeric"))?;
                let sq = parse(format!("({x})::numeric * ({x})::numeric"))?;
                self.partials.push(call("count", Some(x.clone())));
                self.partials.push(call("sum", Some(xn)));
                self.partials.push(call("sum", Some(sq)));
                let min = call("min", Some(x.clone()));
                self.partials.push(parse(format!("pg_typeof({min})"))?);
                // float input: PostgreSQL's own per-fragment sum of squared deviations
                let var = call("var_pop", Some(parse(format!("({x})::float8"))?));
                let cnt = call("count", Some(x.clone()));
                self.partials.push(parse(format!("{var} * {cnt}"))?);
                self.partials
                    .push(call("sum", Some(parse(format!("({x})::float8"))?)));
            }
        }
        let i = self.aggs.len();
        self.aggs.push(AggPartial {
            kind,
            first,
            collation,
            distinct_call: None,
        });
        self.seen.push((f.clone(), i));
        Ok(i)
    }
}

impl VisitorMut for FinalRewrite<'_> {
    type Break = ();
    fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        if let Some(i) = self.keys[..self.grouping].iter().position(|k| k == e) {
            *e = ident(&format!("pgfan_k{i}"));
            return ControlFlow::Continue(());
        }
        match e {
            e if is_subquery(e) => {
                self.problem
                    .get_or_insert_with(|| pass("subquery", "subquery over groups"));
                return ControlFlow::Break(());
            }
            Expr::Function(f) if is_aggregate(f) => match self.add_aggregate(f) {
                Ok(i) => *e = marker_fn(format!("pgfan_agg_{i}")),
                Err(p) => {
                    self.problem.get_or_insert(p);
                    return ControlFlow::Break(());
                }
            },
            Expr::Identifier(_) | Expr::CompoundIdentifier(_) => {
                self.problem.get_or_insert_with(|| {
                    pass(
                        "ungrouped_column",
                        format!("column {e} is neither grouped nor aggregated"),
                    )
                });
                return ControlFlow::Break(());
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

fn aggregate_shape(
    c: &Candidate,
    base: &Query,
    scope: &Scope,
    s: &Select,
    group_by: &[Expr],
    order: &[OrderByExpr],
    distinct: bool,
) -> Result<FragmentShape, PassReason> {
    let has_wildcard = s.projection.iter().any(|i| item_expr(i).is_none());
    if has_wildcard {
        return Err(pass("unsupported_shape", "* with GROUP BY or DISTINCT"));
    }
    let mut keys: Vec<Expr> = Vec::new();
    for g in group_by {
        let is_column = matches!(g, Expr::Identifier(_)) && scope.column(g).is_some();
        let k = if is_column {
            g.clone()
        } else {
            resolve_output_ref(g, s)?.unwrap_or_else(|| g.clone())
        };
        if contains_aggregate(&k) {
            return Err(pass("unsupported_shape", "aggregate in GROUP BY"));
        }
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    if group_by.is_empty() && distinct {
        let has_aggs = s
            .projection
            .iter()
            .filter_map(item_expr)
            .any(|(e, _)| contains_aggregate(e));
        if !has_aggs {
            for (e, _) in s.projection.iter().filter_map(item_expr) {
                if !keys.contains(e) {
                    keys.push(e.clone());
                }
            }
        }
    }
    // agg(DISTINCT x): x becomes a fragment key (the combine groups by the others)
    let grouping_keys = keys.len();
    for x in distinct_arguments(s, order) {
        if !keys.contains(&x) {
            keys.push(x);
        }
    }
    let key_collations = keys.iter().map(|k| scope.collation(k)).collect();
    let mut rw = FinalRewrite {
        keys: &keys,
        grouping: grouping_keys,
        scope,
        partials: vec![],
        aggs: vec![],
        seen: vec![],
        problem: None,
    };
    let mut projection = s.projection.clone();
    for item in projection.iter_mut() {
        match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                let _ = VisitMut::visit(e, &mut rw);
            }
            _ => {}
        }
    }
    let mut having = s.having.clone();
    if let Some(h) = having.as_mut() {
        let _ = VisitMut::visit(h, &mut rw);
    }
    let aliases = output_aliases(s);
    let mut final_order = order.to_vec();
    for o in final_order.iter_mut() {
        let is_alias = matches!(&o.expr, Expr::Identifier(i) if aliases.contains(&fold(i)));
        if is_alias || literal_u64(&o.expr).is_some() {
            continue;
        }
        let _ = VisitMut::visit(&mut o.expr, &mut rw);
    }
    if let Some(p) = rw.problem {
        return Err(p);
    }

    // fragment: keys, then partial aggregates, grouped by the keys
    let mut fragment = base.clone();
    fragment.order_by = None;
    fragment.limit_clause = None;
    let SetExpr::Select(fs) = fragment.body.as_mut() else {
        return Err(pass("unsupported_shape", "not a SELECT"));
    };
    fs.distinct = None;
    fs.having = None;
    fs.projection = keys
        .iter()
        .cloned()
        .map(SelectItem::UnnamedExpr)
        .chain(rw.partials.iter().cloned().map(SelectItem::UnnamedExpr))
        .collect();
    fs.group_by = GroupByExpr::Expressions(
        (1..=keys.len())
            .map(|i| Expr::value(Value::Number(i.to_string(), false)))
            .collect(),
        vec![],
    );

    // combine: the original query over the partial rows
    let mut combine = c.query.clone();
    combine.order_by = if final_order.is_empty() {
        None
    } else {
        c.query.order_by.clone().map(|mut ob| {
            ob.kind = OrderByKind::Expressions(final_order);
            ob
        })
    };
    let SetExpr::Select(cs) = combine.body.as_mut() else {
        return Err(pass("unsupported_shape", "not a SELECT"));
    };
    cs.projection = projection;
    cs.having = having;
    cs.selection = None;
    cs.group_by = GroupByExpr::Expressions(
        (0..grouping_keys)
            .map(|i| ident(&format!("pgfan_k{i}")))
            .collect(),
        vec![],
    );
    cs.from = vec![TableWithJoins {
        relation: TableFactor::Table {
            name: ObjectName(vec![ObjectNamePart::Identifier(Ident::new("pgfan_src"))]),
            alias: None,
            args: None,
            with_hints: vec![],
            version: None,
            with_ordinality: false,
            partitions: vec![],
            json_path: None,
            sample: None,
            index_hints: vec![],
        },
        joins: vec![],
    }];
    Ok(FragmentShape {
        fragment,
        merge: MergeSpec::Combine(CombineSpec::Aggregate {
            keys: key_collations,
            aggs: rw.aggs,
            template: combine.to_string(),
        }),
        split_on: None,
    })
}

/// PostgreSQL type names of the OIDs partial columns commonly have.
pub fn type_name(oid: u32) -> Option<&'static str> {
    Some(match oid {
        16 => "boolean",
        17 => "bytea",
        18 => "\"char\"",
        19 => "name",
        20 => "bigint",
        21 => "smallint",
        23 => "integer",
        25 => "text",
        26 => "oid",
        114 => "json",
        700 => "real",
        701 => "double precision",
        790 => "money",
        869 => "inet",
        1042 => "bpchar",
        1043 => "varchar",
        1082 => "date",
        1083 => "time",
        1114 => "timestamp",
        1184 => "timestamptz",
        1186 => "interval",
        1266 => "timetz",
        1700 => "numeric",
        2206 => "regtype",
        2950 => "uuid",
        3802 => "jsonb",
        _ => return None,
    })
}

/// True for the types whose comparisons follow a collation.
pub fn collatable(oid: u32) -> bool {
    matches!(oid, 25 | 1042 | 1043 | 19)
}

impl CombineSpec {
    /// Builds the combine SQL for partial columns of `types`; the partial arrays are the
    /// parameters after the first `first_param - 1` (the client's own). `var_float[i]` says
    /// whether variance aggregate `i` had float input.
    pub fn combine_sql(
        &self,
        types: &[u32],
        first_param: usize,
        var_float: &dyn Fn(usize) -> bool,
    ) -> Result<String, PassReason> {
        let mut names = Vec::with_capacity(types.len());
        for t in types {
            names.push(
                type_name(*t).ok_or_else(|| {
                    pass("partial_type", format!("partial column of type oid {t}"))
                })?,
            );
        }
        let unnest_args = names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("${}::{n}[]", first_param + i))
            .collect::<Vec<_>>()
            .join(", ");
        let cols = (0..types.len())
            .map(|i| format!("c{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let collate = |i: usize, c: &Option<String>| -> String {
            if collatable(types[i]) {
                format!(
                    " COLLATE {}",
                    c.as_deref().unwrap_or("pg_catalog.\"default\"")
                )
            } else {
                String::new()
            }
        };
        match self {
            CombineSpec::TopN {
                keys,
                limit,
                offset,
            } => {
                let visible = types.len().saturating_sub(keys.len());
                let select = (0..visible)
                    .map(|i| format!("u.c{i}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let order = keys
                    .iter()
                    .enumerate()
                    .map(|(j, k)| {
                        let i = visible + j;
                        format!("u.c{i}{}{}", collate(i, &k.collation), k.options)
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                let limit = limit.map_or("ALL".to_string(), |l| l.to_string());
                Ok(format!(
                    "SELECT {select} FROM unnest({unnest_args}) AS u({cols}) ORDER BY {order} LIMIT {limit} OFFSET {offset}"
                ))
            }
            CombineSpec::Aggregate {
                keys,
                aggs,
                template,
            } => {
                let nk = keys.len();
                let mut inner = Vec::new();
                for (i, c) in keys.iter().enumerate() {
                    inner.push(format!("u.c{i}{} AS pgfan_k{i}", collate(i, c)));
                }
                let mut agg_col_collation: Vec<Option<String>> =
                    vec![None; types.len().saturating_sub(nk)];
                for a in aggs {
                    if matches!(a.kind, AggKind::Min | AggKind::Max) {
                        if let Some(slot) = agg_col_collation.get_mut(a.first) {
                            *slot = a.collation.clone();
                        }
                    }
                }
                for (j, c) in agg_col_collation.iter().enumerate() {
                    let i = nk + j;
                    inner.push(format!("u.c{i}{} AS pgfan_a{j}", collate(i, c)));
                }
                let src = format!(
                    "(SELECT {} FROM unnest({unnest_args}) AS u({cols})) AS pgfan_p",
                    inner.join(", ")
                );
                let mut sql = template.replacen("pgfan_src", &src, 1);
                for (i, a) in aggs.iter().enumerate().rev() {
                    let col = |k: usize| format!("pgfan_a{}", a.first + k);
                    let t = names.get(nk + a.first).copied().unwrap_or("numeric");
                    let expr = match a.kind {
                        AggKind::Count => format!("coalesce(sum({}), 0)::bigint", col(0)),
                        AggKind::Sum => format!("sum({})::{t}", col(0)),
                        AggKind::Min => format!("min({})", col(0)),
                        AggKind::Max => format!("max({})", col(0)),
                        AggKind::BoolAnd => format!("bool_and({})", col(0)),
                        AggKind::BoolOr => format!("bool_or({})", col(0)),
                        AggKind::Distinct => a.distinct_call.clone().unwrap_or_default(),
                        AggKind::Avg => match t {
                            "bigint" | "numeric" => format!(
                                "(sum({})::numeric / nullif(sum({}), 0)::numeric)",
                                col(0),
                                col(1)
                            ),
                            "double precision" => format!(
                                "(sum({}) / nullif(sum({}), 0)::double precision)",
                                col(0),
                                col(1)
                            ),
                            other => {
                                return Err(pass("partial_type", format!("avg over {other} input")))
                            }
                        },
                        AggKind::Var { sample, stddev } => {
                            let n = format!("sum({})::numeric", col(0));
                            let s = format!("sum({})", col(1));
                            let q = format!("sum({})", col(2));
                            let num = format!("({n} * {q} - {s} * {s})");
                            let den = if sample {
                                format!("({n} * ({n} - 1))")
                            } else {
                                format!("({n} * {n})")
                            };
                            let var = format!(
                                "(CASE WHEN {num} <= 0 THEN 0::numeric ELSE {num} / {den} END)"
                            );
                            let min_n = if sample { 1 } else { 0 };
                            // float input: combine the fragments' sums of squared
                            // deviations (Chan et al.), as PostgreSQL's parallel plans do
                            let sxx = format!(
                                "(sum({m}::numeric) + sum({s1}::numeric * {s1}::numeric / {c0}) - {sf} * {sf} / {n})",
                                m = col(4),
                                s1 = col(5),
                                c0 = col(0),
                                sf = format_args!("sum({}::numeric)", col(5)),
                            );
                            let den_f = if sample {
                                format!("({n} - 1)")
                            } else {
                                n.clone()
                            };
                            let fvar = format!("({sxx} / {den_f})::double precision");
                            let value = match (stddev, var_float(i)) {
                                (false, false) => var,
                                (false, true) => fvar,
                                (true, false) => format!(
                                    "(CASE WHEN {var} = 'NaN' THEN {var} ELSE round(sqrt({var}), scale({var})) END)"
                                ),
                                (true, true) => format!("sqrt({fvar})"),
                            };
                            format!(
                                "(CASE WHEN coalesce({n}, 0) <= {min_n} THEN NULL ELSE {value} END)"
                            )
                        }
                    };
                    sql = sql.replace(&format!("pgfan_agg_{i}()"), &expr);
                }
                Ok(sql)
            }
        }
    }
}
