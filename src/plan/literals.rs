//! Statement texts that differ only in their literals share one parse.
//!
//! Clients that do not use parameters (psql scripts, `pgbench -M simple`, many ORMs in
//! "simple" mode, BI tools) send a new text for every value: `… WHERE aid = 4711`. Parsing
//! each with sqlparser costs more than relaying the statement. [`normalize`] lexes the
//! text once, cheaply, and replaces each plain number and string literal with a
//! placeholder (`$1`, `$2`, … in order); texts of one shape get one key. The shape's
//! parse is reused by putting the literals back into a copy of its syntax tree
//! ([`substitute`]), which gives the tree that parsing the text itself would give.
//!
//! The lexer gives up (`None`, the text is parsed as it is) on anything it does not fully
//! understand: dollar quotes and parameters, escape-string prefixes, backslashes, exponents.
//! A literal it is unsure is a value (the string of `DATE '2024-01-01'`) stays in the key.
//! The statement cache still checks each new shape against a real parse once before it
//! trusts it (see `cache::StatementCache`).

use std::ops::ControlFlow;

use sqlparser::ast::{Query, Value, ValueWithSpan, VisitMut, VisitorMut};

/// A literal taken out of a statement text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Literal {
    /// A plain unsigned number, as written (`42`, `0.5`).
    Number(String),
    /// A standard string constant's value (quotes removed, `''` made `'`).
    Text(String),
}

impl Literal {
    /// A string constant (the kind [`has_shape`] compares), not a number.
    pub fn is_text(&self) -> bool {
        matches!(self, Literal::Text(_))
    }

    fn to_value(&self) -> Value {
        match self {
            Literal::Number(n) => Value::Number(n.clone(), false),
            Literal::Text(s) => Value::SingleQuotedString(s.clone()),
        }
    }
}

/// A statement text with its literals replaced by placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    /// The text with `$1`, `$2`, … where the literals were.
    pub key: String,
    /// The literals, in text order: `$k` stood for `literals[k - 1]`.
    pub literals: Vec<Literal>,
}

/// Words after which a string constant is a value, not the string of a typed literal
/// (`DATE '…'`, `INTERVAL '…'`, `int4 '5'`), which stays in the key.
const VALUE_CONTEXT: &[&str] = &[
    "all", "and", "any", "between", "by", "case", "distinct", "else", "escape", "ilike", "in",
    "is", "like", "not", "on", "or", "select", "similar", "some", "then", "to", "values", "when",
    "where", "with",
];

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80
}

/// `$n` written into `buf` (on every simple query, so without the formatting machinery).
fn placeholder(n: usize, buf: &mut [u8; 21]) -> &str {
    let mut at = buf.len();
    let mut rest = n;
    loop {
        at -= 1;
        buf[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    at -= 1;
    buf[at] = b'$';
    std::str::from_utf8(&buf[at..]).unwrap_or("$")
}

/// Appends `$n`.
fn push_placeholder(key: &mut String, n: usize) {
    key.push_str(placeholder(n, &mut [0; 21]));
}

/// Where a literal stands in a statement text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LiteralSpan {
    start: usize,
    end: usize,
    text: bool,
}

/// The index after the quote that closes the quoted text opening at `b[i]` (a doubled
/// quote stands for itself); `None` when it does not close, or, with `backslash`, when it
/// holds a backslash (standard_conforming_strings may be off: left to the parser).
fn quoted_end(b: &[u8], mut i: usize, quote: u8, backslash: bool) -> Option<usize> {
    i += 1;
    loop {
        match b.get(i) {
            None => return None,
            Some(&c) if c == quote && b.get(i + 1) == Some(&quote) => i += 2,
            Some(&c) if c == quote => return Some(i + 1),
            Some(b'\\') if backslash => return None,
            Some(_) => i += 1,
        }
    }
}

/// The end of the standard string constant that opens at `b[i]` (a quote); `None` for
/// what the lexer leaves to the parser.
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let end = quoted_end(b, i, b'\'', true)?;
    // 'a' 'b' on two lines is one constant in PostgreSQL
    match b[end..].iter().find(|x| !x.is_ascii_whitespace()) {
        Some(b'\'') => None,
        _ => Some(end),
    }
}

/// The end of the plain unsigned number that starts at `b[i]` (a digit); `None` for what
/// the lexer leaves to the parser.
fn number_end(b: &[u8], mut i: usize) -> Option<usize> {
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !b.get(i).is_some_and(u8::is_ascii_digit) {
            return None; // `1.` and `1..2`
        }
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
    }
    // exponents, 0x1F, 1_000, 12abc: left to the parser
    if b.get(i).is_some_and(|&x| is_word_byte(x) || x == b'.') {
        return None;
    }
    Some(i)
}

/// Finds the plain number and string literals of `sql`, in order, without allocating;
/// false when the text has parameters or anything the lexer does not handle.
fn literal_spans(sql: &str, mut found: impl FnMut(LiteralSpan)) -> bool {
    let b = sql.as_bytes();
    // the last word outside literals, comments and quoted names
    let mut last_word: Option<(usize, usize)> = None;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'$' | b'\\' => return false,
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = b[i..]
                    .iter()
                    .position(|&x| x == b'\n')
                    .map_or(b.len(), |p| i + p + 1);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let Some(end) = sql[i + 2..].find("*/").map(|e| e + i + 2) else {
                    return false;
                };
                if sql[i + 2..end].contains("/*") {
                    return false; // nested comments
                }
                i = end + 2;
            }
            b'"' => {
                let Some(end) = quoted_end(b, i, b'"', false) else {
                    return false;
                };
                i = end;
                last_word = None;
            }
            b'\'' => {
                // E'…', B'…', X'…', N'…', U&'…': prefixed constants are left to the parser
                if i > 0 && (is_word_byte(b[i - 1]) || b[i - 1] == b'&') {
                    return false;
                }
                let start = i;
                let Some(end) = string_end(b, i) else {
                    return false;
                };
                i = end;
                let is_value = match last_word {
                    None => true,
                    Some((ws, we)) => {
                        let gap = &sql[we..start];
                        !gap.trim().is_empty()
                            || VALUE_CONTEXT
                                .iter()
                                .any(|k| k.eq_ignore_ascii_case(&sql[ws..we]))
                    }
                };
                if is_value {
                    found(LiteralSpan {
                        start,
                        end: i,
                        text: true,
                    });
                }
                last_word = None;
            }
            b'0'..=b'9' => {
                let start = i;
                let Some(end) = number_end(b, i) else {
                    return false;
                };
                i = end;
                found(LiteralSpan {
                    start,
                    end: i,
                    text: false,
                });
                last_word = None;
            }
            b'.' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => return false,
            _ if is_word_byte(c) => {
                let start = i;
                while i < b.len() && (is_word_byte(b[i]) || b[i] == b'$') {
                    i += 1;
                }
                if b[start..i].contains(&b'$') {
                    return false;
                }
                last_word = Some((start, i));
            }
            _ => {
                if !c.is_ascii_whitespace() {
                    last_word = None;
                }
                i += 1;
            }
        }
    }
    true
}

/// Replaces the plain number and string literals of `sql` with `$1`, `$2`, …; `None` when
/// the text has parameters or anything the lexer does not handle.
pub fn normalize(sql: &str) -> Option<Normalized> {
    let mut key = String::with_capacity(sql.len());
    let mut literals = Vec::new();
    let mut copied = 0;
    let lexed = literal_spans(sql, |span| {
        key.push_str(&sql[copied..span.start]);
        literals.push(if span.text {
            Literal::Text(sql[span.start + 1..span.end - 1].replace("''", "'"))
        } else {
            Literal::Number(sql[span.start..span.end].to_string())
        });
        push_placeholder(&mut key, literals.len());
        copied = span.end;
    });
    if !lexed {
        return None;
    }
    key.push_str(&sql[copied..]);
    Some(Normalized { key, literals })
}

/// True when `normalize(sql)` would give `key` and literals of the kinds `texts` (true: a
/// string, false: a number), at least one; the relay asks this of every simple query
/// against the session's last shape. Found in one pass beside the key, without lexing
/// the rest: outside its literals the text must be the key's bytes, and the lexer's
/// decisions there depend only on those bytes and on where each literal ends (a literal
/// of the same kind in the same place is lexed the same way, whatever its value). A key
/// with a `$` of its own (in a comment, a kept string or a quoted name) matches nothing.
pub fn has_shape(sql: &str, key: &str, texts: &[bool]) -> bool {
    let (s, k) = (sql.as_bytes(), key.as_bytes());
    let (mut i, mut j) = (0, 0);
    if texts.is_empty() {
        return false;
    }
    for (n, &text) in texts.iter().enumerate() {
        // the next placeholder; a `$` of the key's own is taken for one here and then
        // fails the placeholder check or the final one
        let Some(at) = memchr::memchr(b'$', &k[j..]) else {
            return false;
        };
        let between = &k[j..j + at];
        if s.get(i..i + between.len()) != Some(between) {
            return false;
        }
        i += between.len();
        j += at;
        let mut buf = [0; 21];
        let mark = placeholder(n + 1, &mut buf).as_bytes();
        if k.get(j..j + mark.len()) != Some(mark)
            || k.get(j + mark.len()).is_some_and(u8::is_ascii_digit)
        {
            return false;
        }
        j += mark.len();
        let end = match (text, s.get(i)) {
            (true, Some(b'\'')) => string_end(s, i),
            (false, Some(b'0'..=b'9')) => number_end(s, i),
            _ => None,
        };
        let Some(end) = end else {
            return false;
        };
        i = end;
    }
    memchr::memchr(b'$', &k[j..]).is_none() && s[i..] == k[j..]
}

/// Puts `literals` back in place of the placeholders `$1`, `$2`, … of `query`; false when
/// a placeholder has no literal.
pub fn substitute(query: &mut Query, literals: &[Literal]) -> bool {
    struct Fill<'a>(&'a [Literal]);
    impl VisitorMut for Fill<'_> {
        type Break = ();
        fn pre_visit_value(&mut self, v: &mut ValueWithSpan) -> ControlFlow<()> {
            if let Value::Placeholder(p) = &v.value {
                let n: usize = p
                    .strip_prefix('$')
                    .and_then(|d| d.parse().ok())
                    .ok_or(())
                    .map_or(ControlFlow::Break(()), ControlFlow::Continue)?;
                let lit = n
                    .checked_sub(1)
                    .and_then(|i| self.0.get(i))
                    .map_or(ControlFlow::Break(()), ControlFlow::Continue)?;
                v.value = lit.to_value();
            }
            ControlFlow::Continue(())
        }
    }
    query.visit(&mut Fill(literals)).is_continue()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sql: &str) -> Option<String> {
        normalize(sql).map(|n| n.key)
    }

    #[test]
    fn placeholders_count_in_decimal() {
        for n in [0, 1, 9, 10, 99, 100, 12345, usize::MAX] {
            let mut key = String::from("x=");
            push_placeholder(&mut key, n);
            assert_eq!(key, format!("x=${n}"));
        }
        let sql = format!(
            "select {}",
            (1..=12)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let want = format!(
            "select {}",
            (1..=12)
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        assert_eq!(key(&sql), Some(want));
    }

    #[test]
    fn numbers_and_strings_become_placeholders() {
        let n = normalize("SELECT abalance FROM pgbench_accounts WHERE aid = 4711;").unwrap();
        assert_eq!(
            n.key,
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
        );
        assert_eq!(n.literals, vec![Literal::Number("4711".into())]);
        let n = normalize("select * from t where s = 'it''s' and x in (1, 2.50) limit 10").unwrap();
        assert_eq!(
            n.key,
            "select * from t where s = $1 and x in ($2, $3) limit $4"
        );
        assert_eq!(
            n.literals,
            vec![
                Literal::Text("it's".into()),
                Literal::Number("1".into()),
                Literal::Number("2.50".into()),
                Literal::Number("10".into()),
            ]
        );
    }

    #[test]
    fn names_comments_and_typed_literals_stay() {
        assert_eq!(
            key("select \"col 1\", t1.x2 -- 5\n/* 'a' 7 */ from t1 where d = date '2024-01-01' and s = 'x'").unwrap(),
            "select \"col 1\", t1.x2 -- 5\n/* 'a' 7 */ from t1 where d = date '2024-01-01' and s = $1"
        );
        assert_eq!(key("select 'a'").unwrap(), "select $1");
        assert_eq!(
            key("select x from t where y = -3").unwrap(),
            "select x from t where y = -$1"
        );
    }

    #[test]
    fn gives_up_on_what_it_does_not_lex() {
        for sql in [
            "select $1",
            "select $$x$$",
            "select E'a\\n'",
            "select 'a\\'",
            "select 1e5",
            "select 0x1F",
            "select 1_000",
            "select .5",
            "select 1.",
            "select 'a'\n'b'",
            "select 'open",
            "select \"open",
            "select /* a /* b */ */ 1",
            "select a$b from t",
        ] {
            assert_eq!(normalize(sql), None, "{sql}");
        }
    }

    fn kinds(literals: &[Literal]) -> Vec<bool> {
        literals
            .iter()
            .map(|l| matches!(l, Literal::Text(_)))
            .collect()
    }

    #[test]
    fn has_shape_agrees_with_normalize() {
        let texts = [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 4711;",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 12;",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 12",
            "SELECT abalance FROM pgbench_accounts WHERE aid = '12';",
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 12 and bid = 3;",
            "select * from t where s = 'it''s' and x in (1, 2.50) limit 10",
            "select * from t where s = 'x' and x in (7, 0.5) limit 1",
            "select * from t where s = 'x' and x in (7, 0.5, 9) limit 1",
            "select * from t where s = date '2024-01-01'",
            "select * from t",
            "select 1e5",
            "select 'a' -- 1\n",
            "select 'b' -- 2\n",
            "select 10",
            "select 1",
        ];
        for a in texts {
            for b in texts {
                // the key of b (or b itself as a key-like text) and its literals' kinds
                let (key, texts) = match normalize(b) {
                    Some(n) => (n.key, kinds(&n.literals)),
                    None => (b.to_string(), vec![false]),
                };
                let want = normalize(a).is_some_and(|n| {
                    n.key == key && kinds(&n.literals) == texts && !texts.is_empty()
                });
                assert_eq!(
                    has_shape(a, &key, &texts),
                    want,
                    "{a} against the key of {b}"
                );
            }
        }
        // a key is only ever equal to a shape with as many placeholders, in order
        assert!(!has_shape("select 1, 2", "select $2, $1", &[false, false]));
        assert!(!has_shape("select 1", "select $1, $2", &[false]));
        assert!(!has_shape("select 1", "select $1, $2", &[false, false]));
        assert!(!has_shape("select 1", "select $11", &[false]));
        assert!(has_shape("select 1", "select $1", &[false]));
        assert!(!has_shape("select 1", "select $1", &[true]));
        assert!(!has_shape("select 1", "select 1", &[]));
    }

    #[test]
    fn has_shape_agrees_with_normalize_on_generated_texts() {
        const PIECES: &[&str] = &[
            "select", " ", "x", "t1", "where", "date", "in", "(", ")", ",", "=", "-", ".", "::",
            "1", "42", "0.5", "7.", "1e3", "'a'", "'it''s'", "''", "'$1'", "E'x'", "\"q 1\"",
            "/* 2 */", "-- 3\n", "\n", "$1", "a$b", "'\\'", "&", ";", "'open", "/* open",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: usize| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize % n
        };
        // each text and a sibling with other values in its literals' places
        let value = |p: &'static str, other: bool| match (p, other) {
            ("1", true) => "42",
            ("42", true) => "1",
            ("0.5", true) => "13.25",
            ("'a'", true) => "'it''s'",
            ("'it''s'", true) => "''",
            ("''", true) => "'a'",
            _ => p,
        };
        let mut texts = Vec::new();
        for _ in 0..3000 {
            let pieces: Vec<&str> = (0..1 + next(12))
                .map(|_| PIECES[next(PIECES.len())])
                .collect();
            texts.push(pieces.iter().map(|p| value(p, false)).collect::<String>());
            texts.push(pieces.iter().map(|p| value(p, true)).collect::<String>());
        }
        let (mut compared, mut matched) = (0, 0);
        for (ai, a) in texts.iter().enumerate() {
            // against its own key, and a few others' (most differ, some collide)
            for b in [a, &texts[ai ^ 1], &texts[next(texts.len())]] {
                let Some(nb) = normalize(b) else { continue };
                let texts_b = kinds(&nb.literals);
                let want = normalize(a).is_some_and(|na| {
                    na.key == nb.key && kinds(&na.literals) == texts_b && !texts_b.is_empty()
                });
                let got = has_shape(a, &nb.key, &texts_b);
                // never a shape it does not have; a key with a `$` of its own (in a
                // comment, string or quoted name) is not matched at all
                let own_dollar = nb.key.matches('$').count() > texts_b.len();
                assert!(
                    got == want || (own_dollar && !got),
                    "{a:?} against {b:?}: {got}"
                );
                compared += 1;
                matched += usize::from(got);
            }
        }
        assert!(
            compared > 4000 && matched > 1000,
            "{compared} compared, {matched} matched"
        );
    }

    #[test]
    fn substitution_gives_the_parse_of_the_text() {
        use sqlparser::dialect::PostgreSqlDialect;
        use sqlparser::parser::Parser;
        let parse = |s: &str| match Parser::parse_sql(&PostgreSqlDialect {}, s).unwrap().pop() {
            Some(sqlparser::ast::Statement::Query(q)) => *q,
            other => panic!("{other:?}"),
        };
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 4711",
            "select a, sum(b) from t where s = 'it''s' and x between 1 and 2.5 group by a order by 1 limit 10 offset 5",
            "select x from t where y = -3 and z in ('a', 'b') and w::text like 'p%'",
        ] {
            let n = normalize(sql).unwrap();
            let mut q = parse(&n.key);
            assert!(substitute(&mut q, &n.literals));
            assert_eq!(q, parse(sql), "{sql}");
            assert_eq!(q.to_string(), parse(sql).to_string());
        }
        let mut q = parse("select $3");
        assert!(!substitute(&mut q, &[Literal::Number("1".into())]));
    }
}
