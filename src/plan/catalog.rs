//! Catalog facts the planner decides from: relation size, columns with types and
//! collations, btree-indexed columns and `pg_stats` histograms. Cached per database with a
//! TTL, dropped early when pass-through DDL is seen.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backends::pool::PooledConnection;

/// One column of a table.
#[derive(Debug, Clone, Default)]
pub struct ColumnInfo {
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// `format_type(atttypid, atttypmod)`.
    pub type_name: String,
    /// Quoted collation name (`"pg_catalog"."default"`); `None` for non-collatable types.
    pub collation: Option<String>,
    /// False for a nondeterministic (ICU, case-insensitive …) collation.
    pub deterministic: bool,
    /// The leading column of a valid, non-partial btree index.
    pub indexed: bool,
    /// `pg_stats.histogram_bounds` as text values, when analyzed.
    pub histogram: Vec<String>,
    /// `pg_stats.null_frac`.
    pub null_frac: f64,
    /// `pg_stats.most_common_vals` as text values.
    pub common_values: Vec<String>,
    /// `pg_stats.most_common_freqs`.
    pub common_freqs: Vec<f64>,
    /// `pg_stats.n_distinct` (negative: a fraction of the rows).
    pub n_distinct: f64,
}

/// What the planner knows about one table.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// `pg_class.oid`.
    pub oid: u32,
    /// Schema-qualified, quoted name.
    pub qualified: String,
    /// `relkind`: `r` table, `m` materialized view, `p` partitioned, `v` view, …
    pub kind: char,
    /// `relpersistence = 't'`: visible only to its own session.
    pub temporary: bool,
    /// Heap blocks (`pg_relation_size / block_size`).
    pub blocks: u64,
    /// Estimated rows.
    pub reltuples: f64,
    /// Columns in attnum order.
    pub columns: Vec<ColumnInfo>,
    /// For a partitioned table: its direct partitions.
    pub partitions: Vec<PartitionInfo>,
}

/// One direct partition of a partitioned table.
#[derive(Debug, Clone)]
pub struct PartitionInfo {
    /// Schema-qualified, quoted name.
    pub qualified: String,
    /// `relkind` (`r`, or `p` for a partition that is partitioned itself).
    pub kind: char,
    /// Heap blocks of all its leaf partitions.
    pub blocks: u64,
}

impl TableInfo {
    /// The column with this (case-folded) name.
    pub fn column(&self, name: &str) -> Option<&ColumnInfo> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// A cached lookup: when it was made and what it found (`None`: no such table).
type CacheEntry = (Instant, Option<Arc<TableInfo>>);

/// Cache of [`TableInfo`] per (database, name as written).
pub struct CatalogCache {
    ttl: Duration,
    /// Bumped by every `put` and `invalidate`: a judgement made from the entries read
    /// under one epoch holds while the epoch and the entries' freshness do.
    epoch: AtomicU64,
    /// Database, then name: nested so a lookup by `&str` allocates nothing (it runs for
    /// every screened statement).
    entries: Mutex<HashMap<String, HashMap<String, CacheEntry>>>,
}

impl CatalogCache {
    /// An empty cache whose entries live `ttl`.
    pub fn new(ttl: Duration) -> Self {
        CatalogCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
        }
    }

    /// The current epoch (see the field).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Like [`CatalogCache::get`], with the instant the entry stops being fresh.
    pub fn get_fresh(
        &self,
        database: &str,
        name: &str,
    ) -> Option<(Option<Arc<TableInfo>>, Instant)> {
        let entries = self.entries.lock().ok()?;
        let (at, info) = entries.get(database)?.get(name)?;
        let until = *at + self.ttl;
        (Instant::now() < until).then(|| (info.clone(), until))
    }

    /// The cached entry, if fresh: `Some(None)` caches "no such table".
    pub fn get(&self, database: &str, name: &str) -> Option<Option<Arc<TableInfo>>> {
        self.get_fresh(database, name).map(|(info, _)| info)
    }

    /// Stores an entry.
    pub fn put(&self, database: &str, name: &str, info: Option<Arc<TableInfo>>) {
        if let Ok(mut entries) = self.entries.lock() {
            entries
                .entry(database.to_string())
                .or_default()
                .insert(name.to_string(), (Instant::now(), info));
            self.epoch.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Forgets every entry of `database` (after DDL, ANALYZE, VACUUM, TRUNCATE).
    pub fn invalidate(&self, database: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(database);
            self.epoch.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// Quotes a string as an SQL literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Loads a table's facts with the default search path; `Ok(None)` when no such relation.
pub async fn load_table(
    conn: &mut PooledConnection,
    name: &str,
) -> Result<Option<TableInfo>, String> {
    let lit = quote_literal(name);
    let rows = conn
        .simple_query(&format!(
            "SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname), c.relkind, \
             c.relpersistence, pg_relation_size(c.oid) / current_setting('block_size')::int, \
             c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = to_regclass({lit})"
        ))
        .await?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let text = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    let oid: u32 = text(0).parse().map_err(|_| "bad oid".to_string())?;
    let mut info = TableInfo {
        oid,
        qualified: text(1),
        kind: text(2).chars().next().unwrap_or('r'),
        temporary: text(3) == "t",
        blocks: text(4).parse().unwrap_or(0),
        reltuples: text(5).parse().unwrap_or(0.0),
        columns: Vec::new(),
        partitions: Vec::new(),
    };
    if info.kind == 'p' {
        // a partitioned table has no heap: its size and rows are its leaves'
        let parts = conn
            .simple_query(&format!(
                "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), c.relkind, \
                 ((SELECT coalesce(sum(pg_relation_size(t.relid)), 0) FROM pg_partition_tree(c.oid) t) \
                 / current_setting('block_size')::int)::bigint, \
                 (SELECT coalesce(sum(greatest(x.reltuples, 0)), 0) FROM pg_partition_tree(c.oid) t \
                 JOIN pg_class x ON x.oid = t.relid WHERE t.isleaf) \
                 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE i.inhparent = {oid} ORDER BY c.oid"
            ))
            .await?;
        let (mut blocks, mut rows) = (0u64, 0f64);
        for p in parts {
            let text = |i: usize| p.get(i).cloned().flatten().unwrap_or_default();
            let part = PartitionInfo {
                qualified: text(0),
                kind: text(1).chars().next().unwrap_or('r'),
                blocks: text(2).parse().unwrap_or(0),
            };
            blocks += part.blocks;
            rows += text(3).parse::<f64>().unwrap_or(0.0);
            info.partitions.push(part);
        }
        info.blocks = blocks;
        info.reltuples = rows;
    }
    let cols = conn
        .simple_query(&format!(
            "SELECT a.attname, a.atttypid, format_type(a.atttypid, a.atttypmod), \
             CASE WHEN a.attcollation = 0 THEN NULL ELSE quote_ident(cn.nspname) || '.' || quote_ident(co.collname) END, \
             coalesce(co.collisdeterministic, true), \
             EXISTS (SELECT 1 FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_am am ON am.oid = ic.relam \
                     WHERE i.indrelid = a.attrelid AND i.indkey[0] = a.attnum AND i.indisvalid \
                     AND am.amname = 'btree' AND i.indpred IS NULL AND i.indexprs IS NULL), \
             s.histogram_bounds::text, coalesce(s.null_frac, 0), s.most_common_vals::text, \
             s.most_common_freqs::text, coalesce(s.n_distinct, 0) \
             FROM pg_attribute a \
             LEFT JOIN pg_collation co ON co.oid = a.attcollation \
             LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace \
             LEFT JOIN pg_class c ON c.oid = a.attrelid \
             LEFT JOIN pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_stats s ON s.schemaname = n.nspname AND s.tablename = c.relname AND s.attname = a.attname AND s.inherited = (c.relkind = 'p') \
             WHERE a.attrelid = {oid} AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
        ))
        .await?;
    for c in cols {
        let text = |i: usize| c.get(i).cloned().flatten();
        info.columns.push(ColumnInfo {
            name: text(0).unwrap_or_default(),
            type_oid: text(1).and_then(|s| s.parse().ok()).unwrap_or(0),
            type_name: text(2).unwrap_or_default(),
            collation: text(3),
            deterministic: text(4).as_deref() != Some("f"),
            indexed: text(5).as_deref() == Some("t"),
            histogram: text(6).map(|h| parse_array_text(&h)).unwrap_or_default(),
            null_frac: text(7).and_then(|s| s.parse().ok()).unwrap_or(0.0),
            common_values: text(8).map(|h| parse_array_text(&h)).unwrap_or_default(),
            common_freqs: text(9)
                .map(|h| parse_array_text(&h))
                .unwrap_or_default()
                .iter()
                .filter_map(|f| f.parse().ok())
                .collect(),
            n_distinct: text(10).and_then(|s| s.parse().ok()).unwrap_or(0.0),
        });
    }
    Ok(Some(info))
}

/// Splits a one-dimensional array literal (`{1,"a b",NULL}`) into its element texts.
pub fn parse_array_text(text: &str) -> Vec<String> {
    let inner = text
        .trim()
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .unwrap_or("");
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut in_quotes = false;
    let mut chars = inner.chars();
    while let Some(ch) = chars.next() {
        match ch {
            '"' => {
                in_quotes = !in_quotes;
                quoted = true;
            }
            '\\' if in_quotes => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ',' if !in_quotes => {
                if quoted || cur != "NULL" {
                    out.push(std::mem::take(&mut cur));
                }
                cur.clear();
                quoted = false;
            }
            c => cur.push(c),
        }
    }
    if !inner.is_empty() && (quoted || cur != "NULL") {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_text() {
        assert_eq!(parse_array_text("{1,5,9}"), vec!["1", "5", "9"]);
        assert_eq!(
            parse_array_text(r#"{"2024-01-01 00:00:00+01","a\"b"}"#),
            vec!["2024-01-01 00:00:00+01", "a\"b"]
        );
        assert!(parse_array_text("{}").is_empty());
    }
}
