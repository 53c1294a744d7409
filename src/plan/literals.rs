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

/// Appends `$n` (on every simple query, so without the formatting machinery).
fn push_placeholder(key: &mut String, n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    key.push('$');
    key.extend(digits[at..].iter().map(|&d| char::from(d)));
}

/// Replaces the plain number and string literals of `sql` with `$1`, `$2`, …; `None` when
/// the text has parameters or anything the lexer does not handle.
pub fn normalize(sql: &str) -> Option<Normalized> {
    let b = sql.as_bytes();
    let mut key = String::with_capacity(sql.len());
    let mut literals = Vec::new();
    // the last word outside literals, comments and quoted names, lower-cased on demand
    let mut last_word: Option<(usize, usize)> = None;
    let mut copied = 0;
    let mut i = 0;
    let mut put_literal = |key: &mut String, copied: &mut usize, start, end, lit| {
        key.push_str(&sql[*copied..start]);
        literals.push(lit);
        push_placeholder(key, literals.len());
        *copied = end;
    };
    while i < b.len() {
        let c = b[i];
        match c {
            b'$' | b'\\' => return None,
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = b[i..]
                    .iter()
                    .position(|&x| x == b'\n')
                    .map_or(b.len(), |p| i + p + 1);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let end = sql[i + 2..].find("*/")? + i + 2;
                if sql[i + 2..end].contains("/*") {
                    return None; // nested comments
                }
                i = end + 2;
            }
            b'"' => {
                i += 1;
                loop {
                    match b.get(i) {
                        None => return None,
                        Some(b'"') if b.get(i + 1) == Some(&b'"') => i += 2,
                        Some(b'"') => break,
                        Some(_) => i += 1,
                    }
                }
                i += 1;
                last_word = None;
            }
            b'\'' => {
                // E'…', B'…', X'…', N'…', U&'…': prefixed constants are left to the parser
                if i > 0 && (is_word_byte(b[i - 1]) || b[i - 1] == b'&') {
                    return None;
                }
                let start = i;
                let mut value = String::new();
                let mut from = i + 1;
                i += 1;
                loop {
                    match b.get(i) {
                        None => return None,
                        Some(b'\'') if b.get(i + 1) == Some(&b'\'') => {
                            value.push_str(&sql[from..=i]);
                            i += 2;
                            from = i;
                        }
                        Some(b'\'') => break,
                        // standard_conforming_strings may be off: leave it to the parser
                        Some(b'\\') => return None,
                        Some(_) => i += 1,
                    }
                }
                value.push_str(&sql[from..i]);
                i += 1;
                // 'a' 'b' on two lines is one constant in PostgreSQL
                let next = b[i..].iter().find(|x| !x.is_ascii_whitespace());
                if next == Some(&b'\'') {
                    return None;
                }
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
                    put_literal(&mut key, &mut copied, start, i, Literal::Text(value));
                }
                last_word = None;
            }
            b'0'..=b'9' => {
                let start = i;
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
                put_literal(
                    &mut key,
                    &mut copied,
                    start,
                    i,
                    Literal::Number(sql[start..i].to_string()),
                );
                last_word = None;
            }
            b'.' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => return None,
            _ if is_word_byte(c) => {
                let start = i;
                while i < b.len() && (is_word_byte(b[i]) || b[i] == b'$') {
                    i += 1;
                }
                if b[start..i].contains(&b'$') {
                    return None;
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
    key.push_str(&sql[copied..]);
    Some(Normalized { key, literals })
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
