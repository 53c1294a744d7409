//! Planning work that repeats: the parse of a statement text seen before, and the
//! analysis (fragment SQL template and merge) of a candidate against the same catalog
//! entry. BI tools and drivers send the same texts again and again; with both cached, a
//! repeated statement costs a hash lookup, the split choice and the predicate splice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::rewrite::{self, Shape};
use super::{Candidate, PassReason, TableInfo, TableSet};
use crate::config::FanoutConfig;

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

/// An analysis and the catalog entries it was made against.
type Analysis = (Vec<Arc<TableInfo>>, Result<Arc<Shape>, PassReason>);

/// The analysis of one candidate, kept with the catalog entries it was made against (a new
/// entry after a TTL refresh or DDL means a new analysis).
#[derive(Default)]
pub struct ShapeMemo {
    last: Mutex<Option<Analysis>>,
}

impl ShapeMemo {
    /// `rewrite::analyze(c, tables, cfg)`, computed once per set of catalog entries (the
    /// configuration is fixed for the life of the process).
    pub fn analyze(
        &self,
        c: &Candidate,
        tables: &TableSet,
        cfg: &FanoutConfig,
    ) -> Result<Arc<Shape>, PassReason> {
        let same = |seen: &[Arc<TableInfo>]| {
            seen.len() == tables.tables().count()
                && seen
                    .iter()
                    .zip(tables.tables())
                    .all(|(a, b)| Arc::ptr_eq(a, b))
        };
        if let Ok(last) = self.last.lock() {
            if let Some((seen, shape)) = last.as_ref() {
                if same(seen) {
                    return shape.clone();
                }
            }
        }
        let shape = rewrite::analyze(c, tables, cfg).map(Arc::new);
        if let Ok(mut last) = self.last.lock() {
            *last = Some((tables.tables().cloned().collect(), shape.clone()));
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
