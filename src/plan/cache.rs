//! Planning work that repeats: the parse of a statement text seen before, and the
//! analysis (fragment SQL template and merge) of a candidate against the same catalog
//! entry. BI tools and drivers send the same texts again and again; with both cached, a
//! repeated statement costs a hash lookup, the split choice and the predicate splice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::literals;
use super::rewrite::{self, Shape};
use super::{Candidate, PassReason, TableInfo, TableSet};
use crate::config::FanoutConfig;

/// Entries of each statement map before it starts over (a full map is mostly texts that
/// never repeat).
const MAX_STATEMENTS: usize = 4096;
/// Longer texts are parsed every time rather than kept.
const MAX_TEXT: usize = 16 << 10;

type Parsed = Result<Arc<Candidate>, PassReason>;

/// What is known of one literal-normalized shape.
#[derive(Clone)]
enum Template {
    /// Its parse, with placeholders; putting a text's literals back gives that text's parse.
    Trusted(Parsed),
    /// Substitution did not reproduce the text's own parse: parse each text.
    Untrusted,
}

/// A map keyed by statement text: looked up for every screened statement, so hashed with
/// a fast hasher rather than SipHash (the keys are client texts, but a map is capped at
/// [`MAX_STATEMENTS`] entries and the hasher is seeded per process).
type TextMap<V> = HashMap<String, V, foldhash::fast::RandomState>;

/// Parsed statements, shared by every session: by text, and by literal-normalized shape
/// for texts that carry their values as literals (see [`literals`]).
#[derive(Default)]
pub struct StatementCache {
    exact: Mutex<TextMap<Parsed>>,
    shapes: Mutex<TextMap<Template>>,
}

fn remember<V>(map: &Mutex<TextMap<V>>, key: String, value: V) {
    if let Ok(mut m) = map.lock() {
        if m.len() >= MAX_STATEMENTS {
            m.clear();
        }
        m.insert(key, value);
    }
}

/// What the cache knows of one statement text.
pub enum Lookup {
    /// The text's candidate, or why it is none.
    Parsed(Parsed),
    /// The trusted template of the text's shape, the text's literals and the shape's key
    /// ([`literals::Normalized::key`]); [`Lookup::candidate`] puts them together.
    Template(Arc<Candidate>, Vec<literals::Literal>, String),
}

impl Lookup {
    /// The shape's template, when the text has one (its route, for reasons that hold for
    /// any literal, is the text's route without building the text's candidate).
    pub fn template(&self) -> Option<&Arc<Candidate>> {
        match self {
            Lookup::Template(t, _, _) => Some(t),
            Lookup::Parsed(_) => None,
        }
    }

    /// The key of the text's shape and its literals' kinds (true: a string), when the
    /// shape has a trusted template (see [`literals::has_shape`]).
    pub fn shape(&self) -> Option<(&str, Vec<bool>)> {
        match self {
            Lookup::Template(_, literals, key) => Some((
                key,
                literals.iter().map(literals::Literal::is_text).collect(),
            )),
            Lookup::Parsed(_) => None,
        }
    }

    /// The candidate of `sql`, the text this lookup was made for.
    pub fn candidate(self, sql: &str) -> Parsed {
        match self {
            Lookup::Parsed(p) => p,
            Lookup::Template(t, literals, _) => match fill(&t, &literals) {
                Some(c) => Ok(Arc::new(c)),
                None => Candidate::parse(sql).map(Arc::new),
            },
        }
    }
}

impl StatementCache {
    /// The candidate of `sql`: parsed once per distinct text, or once per shape when the
    /// text differs from others only in its literals.
    pub fn parse(&self, sql: &str) -> Parsed {
        self.lookup(sql).candidate(sql)
    }

    /// What is known of `sql`, parsing it (and its shape) when it is new.
    pub fn lookup(&self, sql: &str) -> Lookup {
        if sql.len() > MAX_TEXT {
            return Lookup::Parsed(Candidate::parse(sql).map(Arc::new));
        }
        match literals::normalize(sql) {
            Some(n) if !n.literals.is_empty() => self.lookup_shape(sql, n),
            _ => Lookup::Parsed(self.parse_exact(sql)),
        }
    }

    fn parse_exact(&self, sql: &str) -> Parsed {
        if let Some(hit) = self.exact.lock().ok().and_then(|e| e.get(sql).cloned()) {
            return hit;
        }
        let parsed = Candidate::parse(sql).map(Arc::new);
        remember(&self.exact, sql.to_string(), parsed.clone());
        parsed
    }

    fn lookup_shape(&self, sql: &str, n: literals::Normalized) -> Lookup {
        let known = self.shapes.lock().ok().and_then(|m| m.get(&n.key).cloned());
        match known {
            Some(Template::Trusted(Ok(template))) => Lookup::Template(template, n.literals, n.key),
            Some(Template::Trusted(Err(reason))) => Lookup::Parsed(Err(reason)),
            Some(Template::Untrusted) => Lookup::Parsed(Candidate::parse(sql).map(Arc::new)),
            None => {
                // a new shape: trusted only if it reproduces this text's own parse
                let own = Candidate::parse(sql);
                let template = Candidate::parse(&n.key).map(|mut t| {
                    t.literal_placeholders = true;
                    t
                });
                let same = match (&template, &own) {
                    (Ok(t), Ok(o)) => fill(t, &n.literals).is_some_and(|c| {
                        c.query == o.query
                            && c.relations == o.relations
                            && c.explain == o.explain
                            && c.holistic == o.holistic
                    }),
                    (Err(t), Err(o)) => t == o,
                    _ => false,
                };
                let entry = if same {
                    Template::Trusted(template.map(Arc::new))
                } else {
                    Template::Untrusted
                };
                remember(&self.shapes, n.key, entry);
                Lookup::Parsed(own.map(Arc::new))
            }
        }
    }
}

/// `template` with its placeholders replaced by `literals` (a clone starts with empty
/// memos, see [`Last`]).
fn fill(template: &Candidate, literals: &[literals::Literal]) -> Option<Candidate> {
    let mut c = template.clone();
    c.literal_placeholders = false;
    literals::substitute(&mut c.query, literals).then_some(c)
}

/// The last value a memo computed. A copy starts empty: a cloned candidate may be planned
/// against other catalog entries, or filled with other literals.
struct Last<T>(Mutex<Option<T>>);

impl<T> Default for Last<T> {
    fn default() -> Self {
        Last(Mutex::new(None))
    }
}

impl<T> Clone for Last<T> {
    fn clone(&self) -> Self {
        Last::default()
    }
}

impl<T> std::fmt::Debug for Last<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Last")
    }
}

/// An analysis and the catalog entries it was made against.
type Analysis = (Vec<Arc<TableInfo>>, Result<Arc<Shape>, PassReason>);

/// The analysis of one candidate, kept with the catalog entries it was made against (a new
/// entry after a TTL refresh or DDL means a new analysis).
#[derive(Default, Clone, Debug)]
pub struct ShapeMemo {
    last: Last<Analysis>,
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
        if let Ok(last) = self.last.0.lock() {
            if let Some((seen, shape)) = last.as_ref() {
                if same(seen) {
                    return shape.clone();
                }
            }
        }
        let shape = rewrite::analyze(c, tables, cfg).map(Arc::new);
        if let Ok(mut last) = self.last.0.lock() {
            *last = Some((tables.tables().cloned().collect(), shape.clone()));
        }
        shape
    }
}

/// The last pass-through screening of one candidate: the relay screens every statement of
/// an OLTP workload, mostly texts of a few shapes, against cached catalog facts.
#[derive(Default, Clone, Debug)]
pub struct ScreenMemo {
    last: Last<Screening>,
}

/// One screening and what it was judged under.
struct Screening {
    database: String,
    facts: ScreenFacts,
    verdict: Option<&'static str>,
}

/// What a screening verdict was judged under: the catalog epoch, the fragment slots, and
/// until when the catalog entries it read stay fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScreenFacts {
    /// The catalog's epoch at the screening.
    pub catalog_epoch: u64,
    /// The fragment slots the statement could use.
    pub slots: usize,
    /// When the catalog entries it read go stale.
    pub fresh_until: Instant,
}

impl ScreenFacts {
    /// The verdict still holds under `catalog_epoch` with `slots` fragment slots.
    pub fn hold(&self, catalog_epoch: u64, slots: usize) -> bool {
        self.catalog_epoch == catalog_epoch
            && self.slots == slots
            && Instant::now() < self.fresh_until
    }
}

impl ScreenMemo {
    /// The verdict judged in `database` under `catalog_epoch` with `slots` fragment slots,
    /// if its catalog entries are still fresh, and what it was judged under:
    /// `Some(Some(label))` passes through for that reason, `Some(None)` may fan out.
    pub fn get(
        &self,
        database: &str,
        catalog_epoch: u64,
        slots: usize,
    ) -> Option<(Option<&'static str>, ScreenFacts)> {
        let last = self.last.0.lock().ok()?;
        let s = last.as_ref()?;
        (s.database == database && s.facts.hold(catalog_epoch, slots))
            .then_some((s.verdict, s.facts))
    }

    /// Keeps a verdict (see [`ScreenMemo::get`]).
    pub fn put(&self, database: &str, facts: ScreenFacts, verdict: Option<&'static str>) {
        if let Ok(mut last) = self.last.0.lock() {
            *last = Some(Screening {
                database: database.to_string(),
                facts,
                verdict,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(a: &Parsed, b: &Result<Candidate, PassReason>) -> bool {
        match (a, b) {
            (Ok(a), Ok(b)) => {
                a.query == b.query
                    && a.query.to_string() == b.query.to_string()
                    && a.relations == b.relations
                    && a.holistic == b.holistic
                    && a.explain == b.explain
            }
            (Err(a), Err(b)) => a == b,
            _ => false,
        }
    }

    #[test]
    fn texts_of_one_shape_get_their_own_parse() {
        let cache = StatementCache::default();
        for round in 0..3 {
            for sql in [
                format!("SELECT abalance FROM pgbench_accounts WHERE aid = {round}"),
                format!(
                    "select g, count(*) from t where s = 'v{round}' group by g order by 1 limit {}",
                    round + 1
                ),
                // the template `varchar($1)` does not parse: each text is parsed itself
                format!("select x::varchar({}) from t where y = {round}", round + 5),
                // no FROM: passes through whatever the literal
                format!("select {round}"),
                format!("explain fanout select sum(x) from t where y > {round}"),
            ] {
                assert!(same(&cache.parse(&sql), &Candidate::parse(&sql)), "{sql}");
            }
        }
        let shapes = cache.shapes.lock().unwrap();
        assert!(matches!(
            shapes.get("SELECT abalance FROM pgbench_accounts WHERE aid = $1"),
            Some(Template::Trusted(Ok(_)))
        ));
        assert!(matches!(
            shapes.get("select $1"),
            Some(Template::Trusted(Err(_)))
        ));
        assert!(matches!(
            shapes.get("select x::varchar($1) from t where y = $2"),
            Some(Template::Untrusted)
        ));
    }

    #[test]
    fn a_screening_holds_only_under_what_it_was_judged_with() {
        let memo = ScreenMemo::default();
        let later = Instant::now() + std::time::Duration::from_secs(60);
        let facts = |fresh_until| ScreenFacts {
            catalog_epoch: 1,
            slots: 4,
            fresh_until,
        };
        assert_eq!(memo.get("bench", 1, 4), None);
        memo.put("bench", facts(later), Some("point_lookup"));
        assert_eq!(
            memo.get("bench", 1, 4),
            Some((Some("point_lookup"), facts(later)))
        );
        // another database, a newer catalog epoch, other free slots: judge again
        assert_eq!(memo.get("other", 1, 4), None);
        assert_eq!(memo.get("bench", 2, 4), None);
        assert_eq!(memo.get("bench", 1, 1), None);
        // a stale catalog entry: judge again (the relay then refreshes the catalog)
        memo.put("bench", facts(Instant::now()), None);
        assert_eq!(memo.get("bench", 1, 4), None);
        // a clone is a new candidate: it starts empty
        memo.put("bench", facts(later), None);
        assert_eq!(memo.get("bench", 1, 4), Some((None, facts(later))));
        assert_eq!(memo.clone().get("bench", 1, 4), None);
    }

    #[test]
    fn catalog_changes_move_the_epoch() {
        let catalog = super::super::catalog::CatalogCache::new(std::time::Duration::from_secs(60));
        let start = catalog.epoch();
        catalog.put("bench", "t", None);
        assert!(catalog.epoch() > start);
        assert!(matches!(catalog.get_fresh("bench", "t"), Some((None, _))));
        let before = catalog.epoch();
        catalog.invalidate("bench");
        assert!(catalog.epoch() > before);
        assert!(catalog.get_fresh("bench", "t").is_none());
    }
}
