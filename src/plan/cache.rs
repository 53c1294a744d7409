//! Planning work that repeats: the parse of a statement text seen before, and the
//! analysis (fragment SQL template and merge) of a candidate against the same catalog
//! entry. BI tools and drivers send the same texts again and again; with both cached, a
//! repeated statement costs a hash lookup, the split choice and the predicate splice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::rewrite::{self, Shape};
use super::{Candidate, PassReason, TableInfo};

/// Entries before the statement cache starts over (texts with literals never repeat, so
/// a full cache is mostly such texts).
const MAX_STATEMENTS: usize = 4096;
/// Longer texts are parsed every time rather than kept.
const MAX_TEXT: usize = 16 << 10;

/// Parsed statements by their text, shared by every session.
#[derive(Default)]
pub struct StatementCache {
    entries: Mutex<HashMap<String, Result<Arc<Candidate>, PassReason>>>,
}

impl StatementCache {
    /// The candidate of `sql`, parsed once per distinct text.
    pub fn parse(&self, sql: &str) -> Result<Arc<Candidate>, PassReason> {
        if sql.len() > MAX_TEXT {
            return Candidate::parse(sql).map(Arc::new);
        }
        if let Some(hit) = self.entries.lock().ok().and_then(|e| e.get(sql).cloned()) {
            return hit;
        }
        let parsed = Candidate::parse(sql).map(Arc::new);
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= MAX_STATEMENTS {
                entries.clear();
            }
            entries.insert(sql.to_string(), parsed.clone());
        }
        parsed
    }
}

/// An analysis and the catalog entry it was made against.
type Analysis = (Arc<TableInfo>, Result<Arc<Shape>, PassReason>);

/// The analysis of one candidate, kept with the catalog entry it was made against (a new
/// entry after a TTL refresh or DDL means a new analysis).
#[derive(Default)]
pub struct ShapeMemo {
    last: Mutex<Option<Analysis>>,
}

impl ShapeMemo {
    /// `rewrite::analyze(c, table, min_rows_per_group)`, computed once per catalog entry
    /// (the setting is fixed for the life of the process).
    pub fn analyze(
        &self,
        c: &Candidate,
        table: &Arc<TableInfo>,
        min_rows_per_group: u64,
    ) -> Result<Arc<Shape>, PassReason> {
        if let Ok(last) = self.last.lock() {
            if let Some((t, shape)) = last.as_ref() {
                if Arc::ptr_eq(t, table) {
                    return shape.clone();
                }
            }
        }
        let shape = rewrite::analyze(c, table, min_rows_per_group).map(Arc::new);
        if let Ok(mut last) = self.last.lock() {
            *last = Some((table.clone(), shape.clone()));
        }
        shape
    }
}

impl std::fmt::Debug for ShapeMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShapeMemo")
    }
}

impl Clone for ShapeMemo {
    /// A clone starts empty (it may be planned against other catalog entries).
    fn clone(&self) -> Self {
        ShapeMemo::default()
    }
}
