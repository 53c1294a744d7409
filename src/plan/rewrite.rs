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
    FunctionArguments, GroupByExpr, Ident, LimitClause, ObjectName, ObjectNamePart, OrderByExpr,
    OrderByKind, OrderBySort, Query, Select, SelectItem, SelectItemQualifiedWildcardKind, SetExpr,
    TableFactor, Value, VisitMut, VisitorMut, WildcardAdditionalOptions,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use crate::merge::ordered::{is_c_collation, KeyKind, MergeKey};

use super::{aggregate_kind, fold, function_name, Candidate, ColumnInfo, PassReason, TableInfo};

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
    /// ORDER BY … LIMIT: fragments return their top rows plus hidden sort keys.
    TopN {
        /// The hidden sort-key columns at the end of each fragment row.
        keys: Vec<SortKey>,
        /// LIMIT.
        limit: u64,
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
            MergeSpec::Combine(CombineSpec::TopN { limit, offset, .. }) => {
                format!("Merge: top-N combine, limit {limit} offset {offset}")
            }
        }
    }
}

/// The analyzed statement: the fragment query (without its split predicate) and the merge.
#[derive(Debug, Clone)]
pub struct Shape {
    fragment: Query,
    filter: Option<Expr>,
    /// The merge.
    pub merge: MergeSpec,
    /// The column the split must be on: a GROUP BY column, so that every group lies
    /// within one fragment and fragments compute final groups.
    pub split_on: Option<String>,
}

/// Stands for the split predicate while the fragment query is rendered once; each
/// fragment's SQL is then the rendered text with its predicate spliced in.
const PREDICATE_MARKER: &str = "pgfan_split_predicate_7c1e";

impl Shape {
    /// The SQL of each fragment: the fragment query with its predicate AND-ed to the
    /// original WHERE. Renders the query once and splices each predicate into the text,
    /// since rendering (and re-parsing predicates) per fragment dominates planning time.
    pub fn fragment_sqls(&self, predicates: &[String]) -> Vec<String> {
        let rendered = self.render(Some(Expr::Identifier(Ident::new(PREDICATE_MARKER))));
        match rendered.split_once(PREDICATE_MARKER) {
            Some((head, tail)) if !tail.contains(PREDICATE_MARKER) => predicates
                .iter()
                .map(|p| {
                    let p = if p.is_empty() { "TRUE" } else { p };
                    let mut sql = String::with_capacity(head.len() + p.len() + tail.len() + 2);
                    sql.push_str(head);
                    sql.push('(');
                    sql.push_str(p);
                    sql.push(')');
                    sql.push_str(tail);
                    sql
                })
                .collect(),
            // The statement itself spells the marker: render each fragment the slow way.
            _ => predicates.iter().map(|p| self.fragment_sql(p)).collect(),
        }
    }

    /// The fragment SQL with `predicate` AND-ed to the original WHERE.
    fn fragment_sql(&self, predicate: &str) -> String {
        let pred = if predicate.is_empty() {
            None
        } else {
            Parser::new(&PostgreSqlDialect {})
                .try_with_sql(predicate)
                .and_then(|mut p| p.parse_expr())
                .ok()
        };
        self.render(pred)
    }

    fn render(&self, pred: Option<Expr>) -> String {
        let mut q = self.fragment.clone();
        let selection = match (&self.filter, pred) {
            (Some(w), Some(p)) => Some(Expr::BinaryOp {
                left: Box::new(Expr::Nested(Box::new(w.clone()))),
                op: BinaryOperator::And,
                right: Box::new(p),
            }),
            (Some(w), None) => Some(w.clone()),
            (None, p) => p,
        };
        if let SetExpr::Select(s) = q.body.as_mut() {
            s.selection = selection;
        }
        q.to_string()
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

/// Resolves column references against the table; collects problems.
struct ColumnCheck<'a> {
    table: &'a TableInfo,
    qualifiers: &'a [String],
    problem: Option<PassReason>,
    nondeterministic: bool,
}

impl ColumnCheck<'_> {
    fn column(&self, e: &Expr) -> Option<Option<&super::ColumnInfo>> {
        match e {
            Expr::Identifier(i) => Some(self.table.column(&fold(i))),
            Expr::CompoundIdentifier(parts) if parts.len() == 2 => {
                if self.qualifiers.contains(&fold(&parts[0])) {
                    Some(self.table.column(&fold(&parts[1])))
                } else {
                    Some(None)
                }
            }
            Expr::CompoundIdentifier(_) => Some(None),
            _ => None,
        }
    }
}

impl VisitorMut for ColumnCheck<'_> {
    type Break = ();
    fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        match self.column(e) {
            Some(Some(c)) if !c.deterministic => self.nondeterministic = true,
            Some(Some(_)) => {}
            Some(None) => {
                self.problem
                    .get_or_insert_with(|| pass("unknown_column", format!("unknown column {e}")));
                return ControlFlow::Break(());
            }
            None => {}
        }
        ControlFlow::Continue(())
    }
}

/// The collation an expression derives: an explicit COLLATE, else the first collatable
/// column it uses.
fn derive_collation(e: &Expr, table: &TableInfo, qualifiers: &[String]) -> Option<String> {
    struct Find<'a> {
        table: &'a TableInfo,
        qualifiers: &'a [String],
        found: Option<String>,
    }
    impl VisitorMut for Find<'_> {
        type Break = ();
        fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
            let found = match e {
                Expr::Collate { collation, .. } => Some(collation.to_string()),
                Expr::Identifier(i) => self
                    .table
                    .column(&fold(i))
                    .and_then(|c| c.collation.clone()),
                Expr::CompoundIdentifier(p)
                    if p.len() == 2 && self.qualifiers.contains(&fold(&p[0])) =>
                {
                    self.table
                        .column(&fold(&p[1]))
                        .and_then(|c| c.collation.clone())
                }
                _ => None,
            };
            if found.is_some() {
                self.found = found;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
    }
    let mut f = Find {
        table,
        qualifiers,
        found: None,
    };
    let mut e = e.clone();
    let _ = e.visit(&mut f);
    f.found
}

fn is_aggregate(f: &Function) -> bool {
    f.over.is_none()
        && function_name(&f.name)
            .and_then(|n| aggregate_kind(&n))
            .is_some()
}

fn contains_aggregate(e: &Expr) -> bool {
    let mut found = false;
    let _ = sqlparser::ast::visit_expressions(e, |x| {
        if let Expr::Function(f) = x {
            if is_aggregate(f) {
                found = true;
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    });
    found
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

/// Checks columns and builds the fragment query and the merge.
pub fn analyze(
    c: &Candidate,
    table: &TableInfo,
    min_rows_per_group: u64,
) -> Result<Shape, PassReason> {
    let q = &c.query;
    let SetExpr::Select(s) = q.body.as_ref() else {
        return Err(pass("unsupported_shape", "not a SELECT"));
    };
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

    // every column reference must be a column of the table (else PostgreSQL's own error)
    let mut check = ColumnCheck {
        table,
        qualifiers: &c.qualifiers,
        problem: None,
        nondeterministic: false,
    };
    let mut probe = s.as_ref().clone();
    probe.projection.iter_mut().for_each(|i| {
        if let Some((e, _)) = item_expr(i) {
            let mut e = e.clone();
            let _ = e.visit(&mut check);
        }
    });
    for e in [&mut probe.selection, &mut probe.having]
        .into_iter()
        .flatten()
    {
        let _ = e.visit(&mut check);
    }
    if let GroupByExpr::Expressions(g, _) = &probe.group_by {
        for e in g {
            if !is_output_alias(e) && !is_position(e) {
                let mut e = e.clone();
                let _ = e.visit(&mut check);
            }
        }
    }
    for o in &order {
        if !is_output_alias(&o.expr) && !is_position(&o.expr) {
            let mut e = o.expr.clone();
            let _ = e.visit(&mut check);
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
    // aggregates, and cheaper than partial rows when there are many groups.
    let groups = (!group_by.is_empty())
        .then(|| estimated_groups(c, table))
        .flatten();
    let many_groups = min_rows_per_group > 0
        && groups.is_some_and(|g| g * min_rows_per_group as f64 > table.reltuples);
    if c.holistic || many_groups {
        let column = if distinct {
            None
        } else {
            group_split_column(c, table, s, &group_by)
        };
        let Some(column) = column else {
            return Err(if c.holistic {
                pass(
                    "holistic_aggregate",
                    "DISTINCT, ordered or ordered-set aggregates fan out only with GROUP BY on \
                     a column with a btree index and a histogram",
                )
            } else {
                pass(
                    "many_groups",
                    format!(
                        "about {:.0} groups in {:.0} rows and no indexed GROUP BY column to \
                         split on: fragments would ship nearly every row to the combine",
                        groups.unwrap_or(0.0),
                        table.reltuples
                    ),
                )
            });
        };
        let mut shape = rows_shape(c, table, s, &order, limit, offset)?;
        shape.split_on = Some(column);
        return Ok(shape);
    }

    if has_aggs || !group_by.is_empty() || distinct || s.having.is_some() {
        // LIMIT/OFFSET stay in the combine query (groups span fragments)
        return aggregate_shape(c, table, s, &group_by, &order, distinct);
    }
    rows_shape(c, table, s, &order, limit, offset)
}

/// Fragments that return final rows (a scan, or complete groups): concatenated,
/// merged in order, or cut to the top N.
fn rows_shape(
    c: &Candidate,
    table: &TableInfo,
    s: &Select,
    order: &[OrderByExpr],
    limit: Option<u64>,
    offset: u64,
) -> Result<Shape, PassReason> {
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
        if let Some((keys, visible)) = mergeable_keys(c, table, s, order)? {
            return ordered_shape(c, s, order, keys, visible, limit, offset);
        }
        let Some(limit) = limit else {
            return Err(pass(
                "order_key",
                "ORDER BY without LIMIT on a key pgfan cannot compare (not a plain column of \
                 an integer, float, numeric, date/time, bool, uuid or bytea type, or text under \
                 the C collation)",
            ));
        };
        return topn_shape(c, table, s, order, limit, offset);
    }
    // plain scan: each fragment returns at most limit + offset rows
    let mut fragment = c.query.clone();
    fragment.limit_clause = fragment_limit(limit, offset);
    Ok(Shape {
        fragment,
        filter: s.selection.clone(),
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
    c: &Candidate,
    table: &TableInfo,
    s: &Select,
    order: &[OrderByExpr],
) -> Result<Option<(Vec<MergeKey>, usize)>, PassReason> {
    let mut visible = 0;
    for item in &s.projection {
        visible += match item {
            SelectItem::Wildcard(o)
            | SelectItem::QualifiedWildcard(SelectItemQualifiedWildcardKind::ObjectName(_), o)
                if plain_wildcard(o) =>
            {
                table.columns.len()
            }
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => return Ok(None),
            _ => 1,
        };
    }
    let mut keys = Vec::with_capacity(order.len());
    for o in order {
        let expr = resolve_output_ref(&o.expr, s)?.unwrap_or_else(|| o.expr.clone());
        let (column, collation) = match strip_nested(&expr) {
            Expr::Collate { expr, collation } => (strip_nested(expr), Some(collation.to_string())),
            e => (e, None),
        };
        let column = match column {
            Expr::Identifier(i) => table.column(&fold(i)),
            Expr::CompoundIdentifier(p) if p.len() == 2 && c.qualifiers.contains(&fold(&p[0])) => {
                table.column(&fold(&p[1]))
            }
            _ => None,
        };
        let Some(column) = column else {
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
    c: &Candidate,
    s: &Select,
    order: &[OrderByExpr],
    keys: Vec<MergeKey>,
    visible: usize,
    limit: Option<u64>,
    offset: u64,
) -> Result<Shape, PassReason> {
    let mut fragment = c.query.clone();
    let SetExpr::Select(fs) = fragment.body.as_mut() else {
        return Err(pass("unsupported_shape", "not a SELECT"));
    };
    for (i, o) in order.iter().enumerate() {
        let expr = resolve_output_ref(&o.expr, s)?.unwrap_or_else(|| o.expr.clone());
        fs.projection.push(SelectItem::ExprWithAlias {
            expr,
            alias: Ident::new(format!("pgfan_h{i}")),
        });
    }
    fragment.limit_clause = fragment_limit(limit, offset);
    Ok(Shape {
        fragment,
        filter: s.selection.clone(),
        merge: MergeSpec::Ordered {
            keys,
            visible,
            limit,
            offset,
        },
        split_on: None,
    })
}

fn topn_shape(
    c: &Candidate,
    table: &TableInfo,
    s: &Select,
    order: &[OrderByExpr],
    limit: u64,
    offset: u64,
) -> Result<Shape, PassReason> {
    let mut fragment = c.query.clone();
    let mut keys = Vec::new();
    let SetExpr::Select(fs) = fragment.body.as_mut() else {
        return Err(pass("unsupported_shape", "not a SELECT"));
    };
    for (i, o) in order.iter().enumerate() {
        let expr = resolve_output_ref(&o.expr, s)?.unwrap_or_else(|| o.expr.clone());
        keys.push(SortKey {
            collation: derive_collation(&expr, table, &c.qualifiers),
            options: o.options.to_string(),
        });
        fs.projection.push(SelectItem::ExprWithAlias {
            expr,
            alias: Ident::new(format!("pgfan_h{i}")),
        });
    }
    fragment.limit_clause = fragment_limit(Some(limit), offset);
    Ok(Shape {
        fragment,
        filter: s.selection.clone(),
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
    c: &Candidate,
    table: &TableInfo,
    s: &Select,
    group_by: &[Expr],
) -> Option<String> {
    group_by.iter().find_map(|k| {
        let col = group_column(c, table, s, k)?;
        (col.indexed && col.histogram.len() >= 3 && super::split::range_type(col.type_oid))
            .then(|| col.name.clone())
    })
}

/// The table column a GROUP BY key names: an input column first, an output alias or
/// position second (PostgreSQL's order).
fn group_column<'t>(
    c: &Candidate,
    table: &'t TableInfo,
    s: &Select,
    key: &Expr,
) -> Option<&'t ColumnInfo> {
    let column = |e: &Expr| match strip_nested(e) {
        Expr::Identifier(i) => table.column(&fold(i)),
        Expr::CompoundIdentifier(p) if p.len() == 2 && c.qualifiers.contains(&fold(&p[0])) => {
            table.column(&fold(&p[1]))
        }
        _ => None,
    };
    match column(key) {
        Some(col) => Some(col),
        None => column(&resolve_output_ref(key, s).ok()??),
    }
}

/// The number of groups a GROUP BY over plain columns makes, estimated from
/// `pg_stats.n_distinct` (a NULL key counts as one more group); `None` without a GROUP
/// BY, for expression keys or without statistics.
pub fn estimated_groups(c: &Candidate, table: &TableInfo) -> Option<f64> {
    let SetExpr::Select(s) = c.query.body.as_ref() else {
        return None;
    };
    let GroupByExpr::Expressions(keys, _) = &s.group_by else {
        return None;
    };
    let rows = table.reltuples;
    if keys.is_empty() || rows <= 0.0 {
        return None;
    }
    let mut groups = 1.0f64;
    for k in keys {
        let col = group_column(c, table, s, k)?;
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
    table: &'a TableInfo,
    qualifiers: &'a [String],
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
        let collation = a
            .as_ref()
            .and_then(|e| derive_collation(e, self.table, self.qualifiers));
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
        });
        self.seen.push((f.clone(), i));
        Ok(i)
    }
}

impl VisitorMut for FinalRewrite<'_> {
    type Break = ();
    fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        if let Some(i) = self.keys.iter().position(|k| k == e) {
            *e = ident(&format!("pgfan_k{i}"));
            return ControlFlow::Continue(());
        }
        match e {
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
    table: &TableInfo,
    s: &Select,
    group_by: &[Expr],
    order: &[OrderByExpr],
    distinct: bool,
) -> Result<Shape, PassReason> {
    let has_wildcard = s.projection.iter().any(|i| item_expr(i).is_none());
    if has_wildcard {
        return Err(pass("unsupported_shape", "* with GROUP BY or DISTINCT"));
    }
    let mut keys: Vec<Expr> = Vec::new();
    for g in group_by {
        let is_column = matches!(g, Expr::Identifier(i) if table.column(&fold(i)).is_some());
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
    let key_collations = keys
        .iter()
        .map(|k| derive_collation(k, table, &c.qualifiers))
        .collect();
    let mut rw = FinalRewrite {
        keys: &keys,
        table,
        qualifiers: &c.qualifiers,
        partials: vec![],
        aggs: vec![],
        seen: vec![],
        problem: None,
    };
    let mut projection = s.projection.clone();
    for item in projection.iter_mut() {
        match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                let _ = e.visit(&mut rw);
            }
            _ => {}
        }
    }
    let mut having = s.having.clone();
    if let Some(h) = having.as_mut() {
        let _ = h.visit(&mut rw);
    }
    let aliases = output_aliases(s);
    let mut final_order = order.to_vec();
    for o in final_order.iter_mut() {
        let is_alias = matches!(&o.expr, Expr::Identifier(i) if aliases.contains(&fold(i)));
        if is_alias || literal_u64(&o.expr).is_some() {
            continue;
        }
        let _ = o.expr.visit(&mut rw);
    }
    if let Some(p) = rw.problem {
        return Err(p);
    }

    // fragment: keys, then partial aggregates, grouped by the keys
    let mut fragment = c.query.clone();
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
        (0..keys.len())
            .map(|i| ident(&format!("pgfan_k{i}")))
            .collect(),
        vec![],
    );
    if let Some(twj) = cs.from.first_mut() {
        twj.relation = TableFactor::Table {
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
        };
    }
    Ok(Shape {
        fragment,
        filter: s.selection.clone(),
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
