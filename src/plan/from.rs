//! The FROM clause of a SELECT: the relations it reads, which of them sit on the preserved
//! side of every outer join (only those may be split: a fragment that reads a slice of a
//! nullable relation would invent null-extended rows), and how column references resolve.

use std::ops::ControlFlow;
use std::sync::Arc;

use sqlparser::ast::{
    BinaryOperator, Expr, Join, JoinConstraint, JoinOperator, ObjectName, ObjectNamePart, Query,
    Select, SelectItem, SelectItemQualifiedWildcardKind, SetExpr, TableFactor, TableWithJoins,
    Visit, Visitor,
};

use super::{fold, quote_ident, ColumnInfo, PassReason, TableInfo};

fn unsupported(detail: impl Into<String>) -> PassReason {
    PassReason::new("unsupported_shape", detail)
}

/// The key of a table name: its case-folded parts, quoted and dot-joined, as
/// `to_regclass()` takes it (`"public"."events"` or `"events"`).
pub fn relation_key(name: &ObjectName) -> Result<String, PassReason> {
    let mut parts = Vec::new();
    for p in &name.0 {
        match p {
            ObjectNamePart::Identifier(i) => parts.push(quote_ident(&fold(i))),
            _ => return Err(unsupported("table name")),
        }
    }
    if parts.is_empty() || parts.len() > 2 {
        return Err(unsupported("table name with a database part"));
    }
    Ok(parts.join("."))
}

/// The catalog facts of every table a statement names, by relation key.
#[derive(Debug, Default)]
pub struct TableSet {
    entries: Vec<(String, Arc<TableInfo>)>,
}

impl TableSet {
    /// Pairs relation keys with their catalog entries.
    pub fn new(entries: Vec<(String, Arc<TableInfo>)>) -> Self {
        TableSet { entries }
    }

    /// The entry of a relation key.
    pub fn get(&self, key: &str) -> Option<&Arc<TableInfo>> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, t)| t)
    }

    /// Every entry.
    pub fn tables(&self) -> impl Iterator<Item = &Arc<TableInfo>> {
        self.entries.iter().map(|(_, t)| t)
    }
}

/// What a FROM item reads.
#[derive(Debug, Clone)]
pub enum Source {
    /// A table (or materialized view, or partitioned table).
    Table(Arc<TableInfo>),
    /// A subquery in FROM, with its output columns (typed when they are plain columns of
    /// a table inside).
    Derived(Box<Query>, Vec<ColumnInfo>),
}

impl ScopeRelation {
    /// Its columns: the table's (not copied: a scope is built for every planned
    /// statement), or the derived table's output columns.
    pub fn columns(&self) -> &[ColumnInfo] {
        match &self.source {
            Source::Table(t) => &t.columns,
            Source::Derived(_, columns) => columns,
        }
    }
}

/// One relation of a FROM clause as column references see it.
#[derive(Debug, Clone)]
pub struct ScopeRelation {
    /// The name columns are qualified with: the alias, or the table's last name part.
    pub qualifier: String,
    /// What it reads.
    pub source: Source,
    /// Not on the nullable side of any outer join.
    pub preserved: bool,
    /// The ON condition of the LEFT JOIN whose right side this relation is directly.
    pub left_join_on: bool,
}

/// The relations of one SELECT's FROM, in the order [`factor_mut`] walks them.
#[derive(Debug, Clone)]
pub struct Scope {
    /// The relations.
    pub relations: Vec<ScopeRelation>,
    /// The equalities among the top-level AND conjuncts of inner joins' ON conditions
    /// ([`Place::Where`]: they hold for every result row) and of LEFT JOINs' ON.
    join_equalities: Vec<(Expr, Expr, Place)>,
}

/// Where an ON condition belongs: the join whose right side is relation `ordinal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The SELECT's WHERE.
    Where,
    /// The ON of the join whose right side is the relation with this ordinal.
    On(usize),
    /// The WHERE of the subquery of the n-th `x IN (subquery)` conjunct of the WHERE.
    InSubquery(usize),
}

/// Calls `f` on `e` and its subexpressions of the same query level: not inside subqueries,
/// which see their own FROM and aggregate their own rows. `f` breaks to stop.
pub fn visit_own_level(e: &Expr, f: impl FnMut(&Expr) -> ControlFlow<()>) {
    struct Own<F> {
        depth: usize,
        f: F,
    }
    impl<F: FnMut(&Expr) -> ControlFlow<()>> Visitor for Own<F> {
        type Break = ();
        fn pre_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
            self.depth += 1;
            ControlFlow::Continue(())
        }
        fn post_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
            self.depth -= 1;
            ControlFlow::Continue(())
        }
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            if self.depth == 0 {
                (self.f)(e)
            } else {
                ControlFlow::Continue(())
            }
        }
    }
    let _ = e.visit(&mut Own { depth: 0, f });
}

/// Calls `f` with the left side and the subquery of each top-level AND conjunct of `e`
/// that is `x IN (subquery)` (not negated: NOT IN sees NULLs a filter would remove), in
/// order.
pub fn in_subqueries(e: &mut Expr, f: &mut impl FnMut(&Expr, &mut Query)) {
    match e {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            in_subqueries(left, f);
            in_subqueries(right, f);
        }
        Expr::Nested(inner) => in_subqueries(inner, f),
        Expr::InSubquery {
            expr,
            subquery,
            negated: false,
        } => f(expr, subquery),
        _ => {}
    }
}

impl Scope {
    /// The relations of `select`'s FROM with their columns.
    pub fn of(select: &Select, tables: &TableSet) -> Result<Scope, PassReason> {
        let mut scope = Scope {
            relations: Vec::new(),
            join_equalities: Vec::new(),
        };
        for twj in &select.from {
            walk(twj, false, tables, &mut scope)?;
        }
        Ok(scope)
    }

    /// The equalities `a = b` among the top-level AND conjuncts of `select`'s WHERE clause
    /// (this scope's SELECT) and of the ON conditions of its inner and left joins, with
    /// where each one is.
    pub fn equalities(&self, select: &Select) -> Vec<(Expr, Expr, Place)> {
        let mut out = Vec::new();
        if let Some(w) = &select.selection {
            push_equalities(w, Place::Where, &mut out);
        }
        out.extend(self.join_equalities.iter().cloned());
        out
    }

    /// For a column reference: the relation index and the column, or why it does not
    /// resolve (unknown or ambiguous: PostgreSQL then reports its own error); `None` when
    /// `e` is not a column reference.
    pub fn resolve(&self, e: &Expr) -> Option<Result<(usize, &ColumnInfo), PassReason>> {
        let unknown = || PassReason::new("unknown_column", format!("unknown column {e}"));
        match e {
            Expr::Identifier(i) => {
                let name = fold(i);
                let mut found = None;
                for (r, rel) in self.relations.iter().enumerate() {
                    if let Some(c) = rel.columns().iter().find(|c| c.name == name) {
                        if found.is_some() {
                            return Some(Err(PassReason::new(
                                "ambiguous_column",
                                format!("column {e} is ambiguous"),
                            )));
                        }
                        found = Some((r, c));
                    }
                }
                Some(found.ok_or_else(unknown))
            }
            Expr::CompoundIdentifier(parts) if parts.len() == 2 => {
                let q = fold(&parts[0]);
                let name = fold(&parts[1]);
                let mut rels = self
                    .relations
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.qualifier == q);
                let (r, rel) = match (rels.next(), rels.next()) {
                    (Some(one), None) => one,
                    _ => return Some(Err(unknown())),
                };
                Some(
                    rel.columns()
                        .iter()
                        .find(|c| c.name == name)
                        .map(|c| (r, c))
                        .ok_or_else(unknown),
                )
            }
            Expr::CompoundIdentifier(_) => Some(Err(unknown())),
            _ => None,
        }
    }

    /// The column a plain column reference names, if it resolves.
    pub fn column(&self, e: &Expr) -> Option<(usize, &ColumnInfo)> {
        self.resolve(e).and_then(Result::ok)
    }

    /// The collation an expression derives: an explicit COLLATE, else that of the first
    /// collatable column it uses (outside subqueries).
    pub fn collation(&self, e: &Expr) -> Option<String> {
        let mut found = None;
        visit_own_level(e, |x| {
            found = match x {
                Expr::Collate { collation, .. } => Some(collation.to_string()),
                x => self.column(x).and_then(|(_, c)| c.collation.clone()),
            };
            if found.is_some() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        found
    }

    /// The number of columns `*` (or `q.*`) stands for.
    pub fn wildcard_width(&self, qualifier: Option<&str>) -> Option<usize> {
        match qualifier {
            None => Some(self.relations.iter().map(|r| r.columns().len()).sum()),
            Some(q) => {
                let mut rels = self.relations.iter().filter(|r| r.qualifier == q);
                match (rels.next(), rels.next()) {
                    (Some(r), None) => Some(r.columns().len()),
                    _ => None,
                }
            }
        }
    }
}

fn walk(
    twj: &TableWithJoins,
    nullable: bool,
    tables: &TableSet,
    scope: &mut Scope,
) -> Result<(), PassReason> {
    let start = scope.relations.len();
    factor(&twj.relation, nullable, tables, scope)?;
    for j in &twj.joins {
        let before = scope.relations.len();
        let constraint = match &j.join_operator {
            JoinOperator::Join(c)
            | JoinOperator::Inner(c)
            | JoinOperator::CrossJoin(c)
            | JoinOperator::Left(c)
            | JoinOperator::LeftOuter(c)
            | JoinOperator::Right(c)
            | JoinOperator::RightOuter(c)
            | JoinOperator::FullOuter(c) => c,
            _ => return Err(unsupported("join type")),
        };
        let on = match constraint {
            JoinConstraint::Using(_) | JoinConstraint::Natural => {
                return Err(unsupported("USING or NATURAL join"))
            }
            JoinConstraint::On(e) => Some(e),
            JoinConstraint::None => None,
        };
        match &j.join_operator {
            JoinOperator::Left(_) | JoinOperator::LeftOuter(_) => {
                factor(&j.relation, true, tables, scope)?;
                // one relation on the right: its ON can take a co-range predicate
                if let (Some(e), true) = (on, scope.relations.len() == before + 1) {
                    scope.relations[before].left_join_on = true;
                    push_equalities(e, Place::On(before), &mut scope.join_equalities);
                }
            }
            JoinOperator::Right(_) | JoinOperator::RightOuter(_) => {
                scope.relations[start..before]
                    .iter_mut()
                    .for_each(|r| r.preserved = false);
                factor(&j.relation, nullable, tables, scope)?;
            }
            JoinOperator::FullOuter(_) => {
                scope.relations[start..before]
                    .iter_mut()
                    .for_each(|r| r.preserved = false);
                factor(&j.relation, true, tables, scope)?;
            }
            JoinOperator::Join(_) | JoinOperator::Inner(_) => {
                factor(&j.relation, nullable, tables, scope)?;
                if let Some(e) = on {
                    push_equalities(e, Place::Where, &mut scope.join_equalities);
                }
            }
            _ => factor(&j.relation, nullable, tables, scope)?,
        }
    }
    Ok(())
}

/// Pushes the equalities among the top-level AND conjuncts of `e`.
fn push_equalities(e: &Expr, place: Place, out: &mut Vec<(Expr, Expr, Place)>) {
    for c in conjuncts(e) {
        if let Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } = c
        {
            out.push((left.as_ref().clone(), right.as_ref().clone(), place));
        }
    }
}

/// The top-level AND conjuncts of `e` (through parentheses).
pub fn conjuncts(e: &Expr) -> Vec<&Expr> {
    fn collect<'e>(e: &'e Expr, out: &mut Vec<&'e Expr>) {
        match e {
            Expr::BinaryOp {
                left,
                op: BinaryOperator::And,
                right,
            } => {
                collect(left, out);
                collect(right, out);
            }
            Expr::Nested(inner) => collect(inner, out),
            e => out.push(e),
        }
    }
    let mut out = Vec::new();
    collect(e, &mut out);
    out
}

fn factor(
    tf: &TableFactor,
    nullable: bool,
    tables: &TableSet,
    scope: &mut Scope,
) -> Result<(), PassReason> {
    match tf {
        TableFactor::Table {
            name,
            alias,
            args: None,
            with_hints,
            version: None,
            partitions,
            sample: None,
            with_ordinality: false,
            json_path: None,
            ..
        } if with_hints.is_empty() && partitions.is_empty() => {
            if alias.as_ref().is_some_and(|a| !a.columns.is_empty()) {
                return Err(unsupported("table alias with column names"));
            }
            let key = relation_key(name)?;
            let table = tables
                .get(&key)
                .ok_or_else(|| PassReason::new("unknown_table", format!("no table {key}")))?;
            let qualifier = match alias {
                Some(a) => fold(&a.name),
                None => name
                    .0
                    .last()
                    .and_then(|p| match p {
                        ObjectNamePart::Identifier(i) => Some(fold(i)),
                        _ => None,
                    })
                    .unwrap_or_default(),
            };
            scope.relations.push(ScopeRelation {
                qualifier,
                source: Source::Table(table.clone()),
                preserved: !nullable,
                left_join_on: false,
            });
            Ok(())
        }
        TableFactor::Derived {
            lateral: false,
            subquery,
            alias,
            sample: None,
        } => {
            let SetExpr::Select(inner) = subquery.body.as_ref() else {
                return Err(unsupported("set operation in FROM"));
            };
            let inner_scope = Scope::of(inner, tables)?;
            let mut columns = output_columns(inner, &inner_scope)?;
            if let Some(a) = alias {
                if a.columns.len() > columns.len() {
                    return Err(unsupported("more column aliases than columns"));
                }
                for (c, name) in columns.iter_mut().zip(&a.columns) {
                    c.name = fold(&name.name);
                }
            }
            scope.relations.push(ScopeRelation {
                qualifier: alias.as_ref().map(|a| fold(&a.name)).unwrap_or_default(),
                source: Source::Derived(subquery.clone(), columns),
                preserved: !nullable,
                left_join_on: false,
            });
            Ok(())
        }
        TableFactor::NestedJoin {
            table_with_joins,
            alias: None,
        } => walk(table_with_joins, nullable, tables, scope),
        _ => Err(unsupported(
            "FROM item other than a table, subquery or join",
        )),
    }
}

/// The output columns of a SELECT: names as PostgreSQL gives them, and the column facts
/// of plain column references (other expressions only carry their collation).
fn output_columns(s: &Select, scope: &Scope) -> Result<Vec<ColumnInfo>, PassReason> {
    let mut out = Vec::new();
    for item in &s.projection {
        match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                let name = match item {
                    SelectItem::ExprWithAlias { alias, .. } => fold(alias),
                    _ => output_name(e),
                };
                let info = match scope.column(e) {
                    Some((_, c)) => ColumnInfo { name, ..c.clone() },
                    None => ColumnInfo {
                        name,
                        collation: scope.collation(e),
                        deterministic: true,
                        ..ColumnInfo::default()
                    },
                };
                out.push(info);
            }
            SelectItem::Wildcard(_) => {
                out.extend(scope.relations.iter().flat_map(|r| r.columns().to_vec()));
            }
            SelectItem::QualifiedWildcard(SelectItemQualifiedWildcardKind::ObjectName(n), _) => {
                let q = match n.0.as_slice() {
                    [ObjectNamePart::Identifier(i)] => fold(i),
                    _ => return Err(unsupported("qualified wildcard")),
                };
                let rel = scope
                    .relations
                    .iter()
                    .find(|r| r.qualifier == q)
                    .ok_or_else(|| PassReason::new("unknown_column", format!("no {q}.*")))?;
                out.extend(rel.columns().to_vec());
            }
            _ => return Err(unsupported("select item")),
        }
    }
    Ok(out)
}

/// The name PostgreSQL gives an unaliased output column (enough for column references:
/// a column's name, a function's name, else `?column?`).
fn output_name(e: &Expr) -> String {
    match e {
        Expr::Identifier(i) => fold(i),
        Expr::CompoundIdentifier(p) => p.last().map(fold).unwrap_or_default(),
        Expr::Function(f) => f
            .name
            .0
            .last()
            .and_then(|p| match p {
                ObjectNamePart::Identifier(i) => Some(fold(i)),
                _ => None,
            })
            .unwrap_or_default(),
        Expr::Nested(inner) => output_name(inner),
        Expr::Cast { expr, .. } => output_name(expr),
        _ => "?column?".into(),
    }
}

/// The FROM item of `select` with this walk ordinal (the order of [`Scope::relations`]),
/// with the operator of the join whose right side it is directly, if any.
pub fn factor_mut(
    select: &mut Select,
    ordinal: usize,
) -> Option<(&mut TableFactor, Option<&mut JoinOperator>)> {
    type Found<'a> = Option<(&'a mut TableFactor, Option<&'a mut JoinOperator>)>;
    fn in_twj<'a>(twj: &'a mut TableWithJoins, ordinal: usize, n: &mut usize) -> Found<'a> {
        if let Some(hit) = in_factor(&mut twj.relation, None, ordinal, n) {
            return Some(hit);
        }
        for j in twj.joins.iter_mut() {
            let Join {
                relation,
                join_operator,
                ..
            } = j;
            if let Some(hit) = in_factor(relation, Some(join_operator), ordinal, n) {
                return Some(hit);
            }
        }
        None
    }
    fn in_factor<'a>(
        tf: &'a mut TableFactor,
        op: Option<&'a mut JoinOperator>,
        ordinal: usize,
        n: &mut usize,
    ) -> Found<'a> {
        if let TableFactor::NestedJoin {
            table_with_joins, ..
        } = tf
        {
            return in_twj(table_with_joins, ordinal, n);
        }
        let here = *n == ordinal;
        *n += 1;
        here.then_some((tf, op))
    }
    let mut n = 0;
    for twj in select.from.iter_mut() {
        if let Some(hit) = in_twj(twj, ordinal, &mut n) {
            return Some(hit);
        }
    }
    None
}
