//! How a table is cut into fragments: ctid block ranges (TID Range Scan), or ranges of an
//! indexed column cut equal-depth from `pg_stats.histogram_bounds`.

use std::sync::Arc;

use sqlparser::ast::{BinaryOperator, Expr, Value};

use super::{fold, quote_ident, PassReason, TableInfo};
use crate::config::FanoutConfig;
use crate::plan::catalog::quote_literal;

/// The table occurrence a statement is split on.
#[derive(Debug, Clone)]
pub struct SplitSite {
    /// The table.
    pub table: Arc<TableInfo>,
    /// The name its columns are qualified with in the fragment SQL.
    pub qualifier: String,
    /// The WHERE clause of the SELECT it is in: bounds on its columns narrow an index split.
    pub filter: Option<Expr>,
    /// Its columns equi-joined to an indexed column of another large table: an index
    /// split on one of them reads both tables in the same key ranges.
    pub co_keys: Vec<String>,
    /// The WHERE conjuncts on its columns alone, unqualified: repeated inside each branch
    /// of a fragment that reads several partitions, where constraint exclusion sees them.
    pub pushdown: Option<String>,
    /// Its parameters stand for literals that may be any value (the site of a shape's
    /// template, see `plan::literals`): an equality on one is judged by the most frequent
    /// value.
    pub any_literal: bool,
}

/// How the split table is cut.
#[derive(Debug, Clone, PartialEq)]
pub enum SplitStrategy {
    /// Partition-wise: each fragment reads some partitions of a partitioned table directly.
    Partitions {
        /// The partitions of each fragment.
        groups: Vec<Vec<String>>,
        /// The partitioned table's columns (quoted), in order.
        columns: Vec<String>,
    },
    /// Heap block ranges `[starts[i], starts[i+1])`; the last range is open-ended.
    Ctid {
        /// First block of each fragment.
        starts: Vec<u64>,
    },
    /// Ranges of an indexed column between histogram cut points.
    IndexRange {
        /// The column (unquoted).
        column: String,
        /// Its type, for the casts of the cut points.
        type_name: String,
        /// Cut points: fragment i covers `[cuts[i-1], cuts[i])`, open at both ends.
        cuts: Vec<String>,
        /// NULLs can match the query, so the first fragment also takes them.
        nulls: bool,
        /// From `[[fanout.tables]]` rather than from the WHERE clause.
        configured: bool,
    },
}

impl SplitStrategy {
    /// `ctid`, `index range on <col>` or `configured column <col>`, for EXPLAIN FANOUT.
    pub fn describe(&self) -> String {
        match self {
            SplitStrategy::Partitions { .. } => "partitions".into(),
            SplitStrategy::Ctid { .. } => "ctid".into(),
            SplitStrategy::IndexRange {
                column,
                configured: false,
                ..
            } => format!("index range on {column}"),
            SplitStrategy::IndexRange { column, .. } => format!("configured column {column}"),
        }
    }

    /// Estimated heap pages each of `n` fragments reads: partition sizes, block ranges,
    /// or equal shares of an equal-depth index split.
    pub fn fragment_pages(&self, table: &TableInfo, n: usize) -> Vec<u64> {
        match self {
            SplitStrategy::Partitions { groups, .. } => groups
                .iter()
                .map(|g| {
                    g.iter()
                        .filter_map(|name| table.partitions.iter().find(|p| &p.qualified == name))
                        .map(|p| p.blocks)
                        .sum::<u64>()
                        .max(1)
                })
                .collect(),
            SplitStrategy::Ctid { starts } => (0..starts.len())
                .map(|i| {
                    let end = starts.get(i + 1).copied().unwrap_or(table.blocks);
                    end.saturating_sub(starts[i]).max(1)
                })
                .collect(),
            SplitStrategy::IndexRange { .. } => {
                vec![(table.blocks / n.max(1) as u64).max(1); n]
            }
        }
    }

    /// What each fragment reads in place of the split table: the table itself, or its
    /// partitions (always through a column list: a partition's columns may be in another
    /// order than its parent's).
    pub fn relations(&self, table: &TableInfo, pushdown: Option<&str>) -> Vec<String> {
        match self {
            SplitStrategy::Partitions { groups, columns } => {
                let list = columns.join(", ");
                // PostgreSQL excludes a partition by its constraint only when it is named
                // directly, not as a UNION ALL branch: each branch repeats the filter
                let filter = match pushdown {
                    Some(p) if groups.iter().any(|g| g.len() > 1) => format!(" WHERE {p}"),
                    _ => String::new(),
                };
                groups
                    .iter()
                    .map(|g| {
                        let selects: Vec<String> = g
                            .iter()
                            .map(|p| {
                                if g.len() > 1 {
                                    format!("SELECT {list} FROM {p}{filter}")
                                } else {
                                    format!("SELECT {list} FROM {p}")
                                }
                            })
                            .collect();
                        format!("({})", selects.join(" UNION ALL "))
                    })
                    .collect()
            }
            _ => vec![table.qualified.clone(); self.len()],
        }
    }

    /// The number of fragments.
    pub fn len(&self) -> usize {
        match self {
            SplitStrategy::Partitions { groups, .. } => groups.len(),
            SplitStrategy::Ctid { starts } => starts.len(),
            SplitStrategy::IndexRange { cuts, .. } => cuts.len() + 1,
        }
    }

    /// True when there are no fragments (never, for a chosen split).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The predicate of each fragment on the split table, qualified with `qualifier`
    /// (empty: no predicate).
    pub fn predicates(&self, qualifier: &str) -> Vec<String> {
        let q = quote_ident(qualifier);
        match self {
            SplitStrategy::Partitions { groups, .. } => vec![String::new(); groups.len()],
            SplitStrategy::Ctid { starts } => (0..starts.len())
                .map(|i| {
                    let lo = (i > 0).then(|| format!("{q}.ctid >= '({},0)'::tid", starts[i]));
                    let hi = starts
                        .get(i + 1)
                        .map(|b| format!("{q}.ctid < '({b},0)'::tid"));
                    match (lo, hi) {
                        (Some(l), Some(h)) => format!("{l} AND {h}"),
                        (Some(l), None) => l,
                        (None, Some(h)) => h,
                        (None, None) => String::new(),
                    }
                })
                .collect(),
            SplitStrategy::IndexRange {
                column,
                type_name,
                cuts,
                nulls,
                ..
            } => range_predicates(
                &format!("{q}.{}", quote_ident(column)),
                type_name,
                cuts,
                *nulls,
            ),
        }
    }
}

/// `col >= cut[i-1] AND col < cut[i]` for each range (open at both ends); with `nulls` the
/// first range also takes NULLs.
fn range_predicates(col: &str, type_name: &str, cuts: &[String], nulls: bool) -> Vec<String> {
    let v = |s: &str| format!("{}::{type_name}", quote_literal(s));
    (0..=cuts.len())
        .map(|i| {
            let lo = (i > 0).then(|| format!("{col} >= {}", v(&cuts[i - 1])));
            let hi = cuts.get(i).map(|c| format!("{col} < {}", v(c)));
            match (lo, hi) {
                (Some(l), Some(h)) => format!("{l} AND {h}"),
                (Some(l), None) => l,
                (None, Some(h)) if nulls => format!("({h} OR {col} IS NULL)"),
                (None, Some(h)) => h,
                (None, None) => String::new(),
            }
        })
        .collect()
}

impl SplitStrategy {
    /// For an index-range split on `split_column`: the same ranges on `qualifier.column`
    /// of a table equi-joined to it (NULLs never join); `None` for other splits.
    pub fn co_predicates(
        &self,
        split_column: &str,
        qualifier: &str,
        column: &str,
    ) -> Option<Vec<String>> {
        let SplitStrategy::IndexRange {
            column: split,
            type_name,
            cuts,
            ..
        } = self
        else {
            return None;
        };
        if split != split_column {
            return None;
        }
        let col = format!("{}.{}", quote_ident(qualifier), quote_ident(column));
        // NULLs never join: no NULL branch
        Some(range_predicates(&col, type_name, cuts, false))
    }
}

/// Types an index-range split cuts (by their histogram values).
pub fn range_type(oid: u32) -> bool {
    // int2, int4, int8, numeric, date, timestamp, timestamptz
    matches!(oid, 21 | 23 | 20 | 1700 | 1082 | 1114 | 1184)
}

/// A comparable key for histogram positions: numbers as numbers, dates and times as text.
fn sort_key(oid: u32, text: &str) -> Option<(f64, String)> {
    match oid {
        21 | 23 | 20 | 1700 => text.trim().parse::<f64>().ok().map(|f| (f, String::new())),
        _ => Some((0.0, text.trim().to_string())),
    }
}

/// A bound a WHERE conjunct puts on a column: `(column, lower, upper)`, with `None` for an
/// open side; `Err(())` for an equality (a point lookup).
type Bound = (String, Option<String>, Option<String>);

fn literal_text(e: &Expr) -> Option<String> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => Some(n.clone()),
            Value::SingleQuotedString(s) => Some(s.clone()),
            _ => None,
        },
        Expr::UnaryOp {
            op: sqlparser::ast::UnaryOperator::Minus,
            expr,
        } => literal_text(expr).map(|t| format!("-{t}")),
        Expr::Cast { expr, .. } => literal_text(expr),
        Expr::TypedString(t) => match &t.value.value {
            Value::SingleQuotedString(s) => Some(s.clone()),
            _ => None,
        },
        Expr::Nested(e) => literal_text(e),
        _ => None,
    }
}

fn is_param(e: &Expr) -> bool {
    match e {
        Expr::Value(v) => matches!(v.value, Value::Placeholder(_)),
        Expr::Cast { expr, .. } | Expr::Nested(expr) => is_param(expr),
        _ => false,
    }
}

fn column_of(e: &Expr, c: &SplitSite) -> Option<String> {
    match e {
        Expr::Identifier(i) => Some(fold(i)).filter(|n| c.table.column(n).is_some()),
        Expr::CompoundIdentifier(p) if p.len() == 2 && c.qualifier == fold(&p[0]) => {
            Some(fold(&p[1]))
        }
        Expr::Nested(e) => column_of(e, c),
        _ => None,
    }
}

/// Collects the range bound one WHERE conjunct puts on a column, or the column it compares
/// for equality.
fn bound(
    e: &Expr,
    c: &SplitSite,
    out: &mut Vec<Bound>,
    points: &mut Vec<(String, Option<String>)>,
) {
    match e {
        Expr::Between {
            expr,
            negated: false,
            low,
            high,
        } => {
            if let Some(col) = column_of(expr, c) {
                out.push((col, literal_text(low), literal_text(high)));
            }
        }
        Expr::BinaryOp { left, op, right } => {
            let (col, val, op) = match (column_of(left, c), column_of(right, c)) {
                (Some(col), None) => (col, right.as_ref(), op.clone()),
                (None, Some(col)) => (
                    col,
                    left.as_ref(),
                    match op {
                        BinaryOperator::Lt => BinaryOperator::Gt,
                        BinaryOperator::LtEq => BinaryOperator::GtEq,
                        BinaryOperator::Gt => BinaryOperator::Lt,
                        BinaryOperator::GtEq => BinaryOperator::LtEq,
                        o => o.clone(),
                    },
                ),
                _ => return,
            };
            if op == BinaryOperator::Eq && (literal_text(val).is_some() || is_param(val)) {
                points.push((col, literal_text(val)));
                return;
            }
            let v = literal_text(val);
            match op {
                BinaryOperator::Gt | BinaryOperator::GtEq => out.push((col, v, None)),
                BinaryOperator::Lt | BinaryOperator::LtEq => out.push((col, None, v)),
                _ => {}
            }
        }
        _ => {}
    }
}

/// The range bounds the WHERE clause puts on the site's columns, and the columns it
/// compares for equality (with the value, when a literal).
type Bounds = (
    Vec<(String, Option<String>, Option<String>)>,
    Vec<(String, Option<String>)>,
);

fn bounds(c: &SplitSite) -> Bounds {
    let mut found = Vec::new();
    let mut points = Vec::new();
    if let Some(w) = &c.filter {
        for conjunct in super::from::conjuncts(w) {
            bound(conjunct, c, &mut found, &mut points);
        }
    }
    (found, points)
}

/// Why the site is read through an index for a few pages only (equality on an indexed
/// column that matches fewer pages than two fragments' worth), if it is. Such a statement
/// passes through whatever else it asks; the planner checks this before the costlier
/// parts of its analysis, since it is the usual OLTP statement.
pub fn point_lookup(c: &SplitSite, cfg: &FanoutConfig) -> Option<PassReason> {
    let table = c.table.as_ref();
    for (p, value) in &bounds(c).1 {
        let Some(col) = table.column(p).filter(|c| c.indexed) else {
            continue;
        };
        let fraction = match value {
            None if c.any_literal => largest_equality_fraction(col, table),
            v => equality_fraction(col, table, v.as_deref()),
        };
        let pages = (table.blocks as f64 * fraction) as u64;
        if pages / cfg.min_fragment_pages.max(1) < 2 {
            return Some(PassReason::new(
                "point_lookup",
                format!("equality on indexed column {p} matches about {pages} pages"),
            ));
        }
    }
    None
}

/// Chooses the split of a site that is not a point lookup ([`point_lookup`], checked by
/// the analysis), or passes it through (too small, no free slots). `required`: the column
/// the split must be on (a GROUP BY column whose groups must each stay within one
/// fragment), within the WHERE clause's bounds on it. Without
/// one, the order of preference: a co-range key, a column the WHERE bounds, the
/// configured column, heap blocks.
pub fn choose(
    c: &SplitSite,
    cfg: &FanoutConfig,
    slots: usize,
    required: Option<&str>,
) -> Result<SplitStrategy, PassReason> {
    let table = c.table.as_ref();
    let limit = cfg.max_fragments.min(slots);
    let by_size = |pages: u64| (pages / cfg.min_fragment_pages.max(1)) as usize;
    if limit < 2 {
        return Err(PassReason::new(
            "no_slots",
            "fewer than 2 fragment slots are available",
        ));
    }
    // point lookups never get here: the analysis rejects them first (see `point_lookup`)
    let (found, _) = bounds(c);
    if table.kind == 'p' {
        if required.is_some() {
            return Err(PassReason::new(
                "partitioned",
                "complete groups on a partitioned table (split partition-wise only)",
            ));
        }
        return partition_split(table, limit, by_size);
    }
    if let Some(col) = required {
        let info = table
            .column(col)
            .ok_or_else(|| PassReason::new("split", format!("no column {col}")))?;
        let (mut lo, mut hi) = (None, None);
        for (c, l, h) in &found {
            if c == col {
                lo = l.clone().or(lo);
                hi = h.clone().or(hi);
            }
        }
        return index_split(table, info, lo, hi, limit, by_size, false);
    }
    // a co-range key: both tables read in the same key ranges
    for key in &c.co_keys {
        let Some(info) = table.column(key) else {
            continue;
        };
        if !info.indexed || !range_type(info.type_oid) || info.histogram.len() < 3 {
            continue;
        }
        let (mut lo, mut hi) = (None, None);
        for (col, l, h) in &found {
            if col == key {
                lo = l.clone().or(lo);
                hi = h.clone().or(hi);
            }
        }
        if let Ok(split) = index_split(table, info, lo, hi, limit, by_size, false) {
            return Ok(split);
        }
    }
    // merge bounds per indexed column of a range type
    let mut best: Option<(String, Option<String>, Option<String>)> = None;
    for (col, lo, hi) in &found {
        let Some(info) = table.column(col) else {
            continue;
        };
        if !info.indexed || !range_type(info.type_oid) || (lo.is_none() && hi.is_none()) {
            continue;
        }
        match &mut best {
            Some((bc, blo, bhi)) if bc == col => {
                if lo.is_some() {
                    *blo = lo.clone();
                }
                if hi.is_some() {
                    *bhi = hi.clone();
                }
            }
            Some(_) => {}
            None => best = Some((col.clone(), lo.clone(), hi.clone())),
        }
    }
    let configured = cfg
        .split_columns
        .iter()
        .find(|(t, _)| {
            let t = t.to_lowercase();
            t == table.qualified.replace('"', "").to_lowercase()
                || Some(t.as_str())
                    == table
                        .qualified
                        .rsplit('.')
                        .next()
                        .map(|s| s.trim_matches('"'))
                        .map(str::to_lowercase)
                        .as_deref()
        })
        .map(|(_, col)| col.clone());
    if let Some((col, lo, hi)) = best {
        let info = table
            .column(&col)
            .ok_or_else(|| PassReason::new("split", "column"))?;
        return index_split(table, info, lo, hi, limit, by_size, false);
    }
    if let Some(col) = configured {
        let info = table.column(&col).ok_or_else(|| {
            PassReason::new("split", format!("configured split column {col} not found"))
        })?;
        return index_split(table, info, None, None, limit, by_size, true);
    }
    let n = by_size(table.blocks).min(limit);
    if n < 2 {
        return Err(PassReason::new(
            "small_table",
            format!(
                "table has {} pages, below 2 x min_fragment_pages ({})",
                table.blocks, cfg.min_fragment_pages
            ),
        ));
    }
    let per = table.blocks.div_ceil(n as u64);
    Ok(SplitStrategy::Ctid {
        starts: (0..n as u64).map(|i| i * per).collect(),
    })
}

/// Partition-wise: the direct partitions dealt largest first to the emptiest of up to
/// `limit` fragments. PostgreSQL prunes: fragments run with `constraint_exclusion = on`,
/// so a partition the WHERE excludes plans as an empty result.
fn partition_split(
    table: &TableInfo,
    limit: usize,
    by_size: impl Fn(u64) -> usize,
) -> Result<SplitStrategy, PassReason> {
    if let Some(p) = table
        .partitions
        .iter()
        .find(|p| !matches!(p.kind, 'r' | 'p'))
    {
        return Err(PassReason::new(
            "partitioned",
            format!("partition {} is not a table", p.qualified),
        ));
    }
    let n = limit.min(table.partitions.len()).min(by_size(table.blocks));
    if n < 2 {
        return Err(PassReason::new(
            "small_table",
            format!(
                "partitioned table with {} partitions and {} pages: too few to split",
                table.partitions.len(),
                table.blocks
            ),
        ));
    }
    let mut order: Vec<&super::catalog::PartitionInfo> = table.partitions.iter().collect();
    order.sort_by_key(|p| std::cmp::Reverse(p.blocks));
    let mut groups: Vec<(u64, Vec<String>)> = vec![(0, Vec::new()); n];
    for p in order {
        if let Some(g) = groups.iter_mut().min_by_key(|g| g.0) {
            g.0 += p.blocks.max(1);
            g.1.push(p.qualified.clone());
        }
    }
    Ok(SplitStrategy::Partitions {
        groups: groups.into_iter().map(|g| g.1).collect(),
        columns: table.columns.iter().map(|c| quote_ident(&c.name)).collect(),
    })
}

/// The fraction of rows `col = value` matches, from the most common values and n_distinct
/// (`None`: a parameter, whose value is not known when planning).
fn equality_fraction(col: &super::ColumnInfo, table: &TableInfo, value: Option<&str>) -> f64 {
    match value {
        Some(v) => match col.common_values.iter().position(|c| c == v) {
            Some(i) => col.common_freqs.get(i).copied().unwrap_or(1.0),
            None => uncommon_fraction(col, table),
        },
        None => {
            let distinct = distinct_values(col, table);
            if distinct <= 0.0 {
                return 0.0;
            }
            (1.0 / distinct).min(1.0)
        }
    }
}

/// The largest fraction of rows [`equality_fraction`] gives for any value: the most common
/// value's, or that of a value outside the common ones.
fn largest_equality_fraction(col: &super::ColumnInfo, table: &TableInfo) -> f64 {
    col.common_freqs
        .iter()
        .copied()
        .fold(uncommon_fraction(col, table), f64::max)
}

/// The fraction of rows equal to one value outside the most common ones.
fn uncommon_fraction(col: &super::ColumnInfo, table: &TableInfo) -> f64 {
    let distinct = distinct_values(col, table);
    if distinct <= 0.0 {
        // no statistics: assume a point lookup
        return 0.0;
    }
    let common: f64 = col.common_freqs.iter().sum();
    let rest = (distinct - col.common_values.len() as f64).max(1.0);
    ((1.0 - common - col.null_frac).max(0.0) / rest).min(1.0)
}

fn distinct_values(col: &super::ColumnInfo, table: &TableInfo) -> f64 {
    if col.n_distinct < 0.0 {
        -col.n_distinct * table.reltuples.max(1.0)
    } else {
        col.n_distinct
    }
}

fn index_split(
    table: &TableInfo,
    info: &super::ColumnInfo,
    lo: Option<String>,
    hi: Option<String>,
    limit: usize,
    by_size: impl Fn(u64) -> usize,
    configured: bool,
) -> Result<SplitStrategy, PassReason> {
    let hist = &info.histogram;
    if hist.len() < 3 {
        return Err(PassReason::new(
            "no_statistics",
            format!("no histogram for {} (run ANALYZE)", info.name),
        ));
    }
    let key = |s: &str| sort_key(info.type_oid, s);
    let lo_k = lo.as_deref().and_then(key);
    let hi_k = hi.as_deref().and_then(key);
    let inside: Vec<&String> = hist
        .iter()
        .filter(|h| {
            let Some(k) = key(h) else { return false };
            lo_k.as_ref()
                .is_none_or(|l| k.partial_cmp(l) == Some(std::cmp::Ordering::Greater))
                && hi_k
                    .as_ref()
                    .is_none_or(|u| k.partial_cmp(u) == Some(std::cmp::Ordering::Less))
        })
        .collect();
    let buckets = (hist.len() - 1) as f64;
    let fraction = ((inside.len() as f64 + 1.0) / buckets).min(1.0) * (1.0 - info.null_frac);
    let pages = (table.blocks as f64 * fraction) as u64;
    let n = by_size(pages).min(limit).min(inside.len() + 1);
    if n < 2 {
        return Err(PassReason::new(
            "selective",
            format!(
                "the WHERE range on {} covers about {pages} pages, too few to split",
                info.name
            ),
        ));
    }
    // n - 1 cut points spread evenly over the histogram values inside the range
    let mut cuts: Vec<String> = Vec::new();
    for i in 1..n {
        let idx = i * inside.len() / n;
        if let Some(v) = inside.get(idx) {
            if cuts.last() != Some(*v) {
                cuts.push((*v).clone());
            }
        }
    }
    Ok(SplitStrategy::IndexRange {
        column: info.name.clone(),
        type_name: info.type_name.clone(),
        cuts,
        // stale statistics must not lose rows: an unbounded range always takes NULLs
        nulls: lo.is_none() && hi.is_none(),
        configured,
    })
}
