//! K-way ordered merge of fragment streams that each arrive sorted on the same keys.
//!
//! Fragments append their sort keys as hidden binary columns; this module compares those
//! values the way PostgreSQL's default btree operators do, for the types where that order
//! follows from the binary value alone (integers, floats with NaN last, numeric, dates and
//! times, bool, uuid, bytea, and text under the C collation). Other keys never reach
//! here: the planner sends them to the top-N combine or through to the primary.

use std::cmp::Ordering;

use bytes::Bytes;

use crate::backends::pool::row_values;

/// How a key's binary values compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// `bool`: false < true.
    Bool,
    /// `int2`, `int4`, `int8`, `date`, `time`, `timestamp`, `timestamptz`: big-endian
    /// signed integers (dates and times are counts since an epoch; ±infinity are the
    /// extreme values).
    SignedInt,
    /// `oid`: unsigned 32-bit.
    Unsigned,
    /// `float4`: NaN sorts after every other value and equals itself; -0 = 0.
    Float4,
    /// `float8`: as `Float4`.
    Float8,
    /// `numeric`: sign, weight and base-10000 digits; NaN last, ±Infinity at the ends.
    Numeric,
    /// `bytea`, `uuid`, and `text`/`varchar`/`name` under the C collation: bytewise,
    /// shorter first on a common prefix.
    Bytes,
}

impl KeyKind {
    /// The comparison for a column of type `oid`, or `None` when pgfan cannot compare it
    /// exactly. `c_collation` tells whether a text key sorts under the C (or POSIX)
    /// collation.
    pub fn for_type(oid: u32, c_collation: bool) -> Option<KeyKind> {
        Some(match oid {
            16 => KeyKind::Bool,
            20 | 21 | 23 | 1082 | 1083 | 1114 | 1184 => KeyKind::SignedInt,
            26 => KeyKind::Unsigned,
            700 => KeyKind::Float4,
            701 => KeyKind::Float8,
            1700 => KeyKind::Numeric,
            17 | 2950 => KeyKind::Bytes,
            19 | 25 | 1043 if c_collation => KeyKind::Bytes,
            _ => return None,
        })
    }
}

/// Whether a quoted collation name (as the catalog or a COLLATE clause spells it) is
/// PostgreSQL's C or POSIX collation, whose order is bytewise.
pub fn is_c_collation(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    matches!(last.trim_matches('"'), "C" | "POSIX")
}

/// One sort key: its comparison and direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeKey {
    /// How values compare.
    pub kind: KeyKind,
    /// `DESC`.
    pub descending: bool,
    /// `NULLS FIRST` (PostgreSQL's default for DESC).
    pub nulls_first: bool,
}

impl MergeKey {
    /// Orders two values of this key as the fragments' ORDER BY did.
    pub fn compare(&self, a: Option<&[u8]>, b: Option<&[u8]>) -> Ordering {
        match (a, b) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) if self.nulls_first => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) if self.nulls_first => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(a), Some(b)) => {
                let o = compare_values(self.kind, a, b);
                if self.descending {
                    o.reverse()
                } else {
                    o
                }
            }
        }
    }
}

fn compare_values(kind: KeyKind, a: &[u8], b: &[u8]) -> Ordering {
    match kind {
        KeyKind::Bool | KeyKind::Bytes | KeyKind::Unsigned => a.cmp(b),
        KeyKind::SignedInt => signed(a).cmp(&signed(b)),
        KeyKind::Float4 => float_order(f4(a), f4(b)),
        KeyKind::Float8 => float_order(f8(a), f8(b)),
        KeyKind::Numeric => compare_numeric(a, b),
    }
}

fn signed(v: &[u8]) -> i64 {
    match v.len() {
        2 => i16::from_be_bytes([v[0], v[1]]) as i64,
        4 => i32::from_be_bytes([v[0], v[1], v[2], v[3]]) as i64,
        8 => i64::from_be_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]]),
        _ => 0,
    }
}

fn f4(v: &[u8]) -> f64 {
    match v {
        [a, b, c, d] => f32::from_be_bytes([*a, *b, *c, *d]) as f64,
        _ => 0.0,
    }
}

fn f8(v: &[u8]) -> f64 {
    match <[u8; 8]>::try_from(v) {
        Ok(b) => f64::from_be_bytes(b),
        Err(_) => 0.0,
    }
}

/// PostgreSQL's float order: NaN equals NaN and sorts after everything else.
fn float_order(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

/// A numeric in its binary form: class (for NaN/±Infinity/sign), weight and digits.
struct Numeric<'a> {
    /// -2 -Infinity, -1 negative, 0 zero, 1 positive, 2 +Infinity, 3 NaN.
    class: i8,
    weight: i16,
    digits: &'a [u8],
}

fn numeric(v: &[u8]) -> Numeric<'_> {
    let ndigits = v
        .get(0..2)
        .map(|b| i16::from_be_bytes([b[0], b[1]]))
        .unwrap_or(0)
        .max(0) as usize;
    let weight = v
        .get(2..4)
        .map(|b| i16::from_be_bytes([b[0], b[1]]))
        .unwrap_or(0);
    let sign = v
        .get(4..6)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .unwrap_or(0);
    let digits = v.get(8..8 + 2 * ndigits).unwrap_or(&[]);
    // trailing and leading zero digits do not change the value
    let mut d = digits;
    while d.len() >= 2 && d[d.len() - 2..] == [0, 0] {
        d = &d[..d.len() - 2];
    }
    let mut weight = weight;
    while d.len() >= 2 && d[..2] == [0, 0] {
        d = &d[2..];
        weight = weight.saturating_sub(1);
    }
    let class = match sign {
        0xC000 => 3,
        0xD000 => 2,
        0xF000 => -2,
        _ if d.is_empty() => 0,
        0x4000 => -1,
        _ => 1,
    };
    Numeric {
        class,
        weight,
        digits: d,
    }
}

fn compare_numeric(a: &[u8], b: &[u8]) -> Ordering {
    let (a, b) = (numeric(a), numeric(b));
    if a.class != b.class || !matches!(a.class, -1 | 1) {
        return a.class.cmp(&b.class);
    }
    // same sign, both nonzero: the larger weight has the larger magnitude; then digits
    let magnitude = a.weight.cmp(&b.weight).then_with(|| a.digits.cmp(b.digits));
    if a.class < 0 {
        magnitude.reverse()
    } else {
        magnitude
    }
}

/// The k-way merge state: the head row of each fragment and its decoded keys.
#[derive(Debug)]
pub struct OrderedMerge {
    keys: Vec<MergeKey>,
    /// Columns the client sees; the hidden keys follow them.
    visible: usize,
    heads: Vec<Option<Bytes>>,
    finished: Vec<bool>,
}

impl OrderedMerge {
    /// A merge of `fragments` streams with `visible` client columns followed by one
    /// hidden binary column per key.
    pub fn new(keys: Vec<MergeKey>, visible: usize, fragments: usize) -> Self {
        OrderedMerge {
            keys,
            visible,
            heads: vec![None; fragments],
            finished: vec![false; fragments],
        }
    }

    /// Whether fragment rows of these column types fit the plan: the visible columns,
    /// then one hidden key of the planned kind each.
    pub fn accepts(&self, types: &[u32]) -> bool {
        types.len() == self.visible + self.keys.len()
            && self
                .keys
                .iter()
                .zip(&types[self.visible..])
                .all(|(k, t)| KeyKind::for_type(*t, true) == Some(k.kind))
    }

    /// The first fragment whose next row (or end) the merge is waiting for.
    pub fn waiting_for(&self) -> Option<usize> {
        (0..self.heads.len()).find(|&i| self.heads[i].is_none() && !self.finished[i])
    }

    /// Takes fragment `i`'s next DataRow message.
    pub fn push(&mut self, i: usize, message: Bytes) {
        if let Some(h) = self.heads.get_mut(i) {
            *h = Some(message);
        }
    }

    /// Marks fragment `i` as having no more rows.
    pub fn finish(&mut self, i: usize) {
        if let Some(f) = self.finished.get_mut(i) {
            *f = true;
        }
    }

    /// Whether every fragment has finished and every row was taken.
    pub fn is_done(&self) -> bool {
        self.heads.iter().all(Option::is_none) && self.finished.iter().all(|f| *f)
    }

    /// Once no fragment is awaited: the smallest head row, with its hidden key columns
    /// cut off, as a DataRow message for the client. `None` when a fragment's next row
    /// is still awaited or all are done. Ties go to the lowest fragment index.
    pub fn pop(&mut self) -> Option<Bytes> {
        if self.waiting_for().is_some() {
            return None;
        }
        let mut best: Option<(usize, Vec<Option<&[u8]>>)> = None;
        for (i, head) in self.heads.iter().enumerate() {
            let Some(row) = head else { continue };
            let values = hidden_values(row, self.visible);
            let better = match &best {
                None => true,
                Some((_, b)) => self.compare(&values, b) == Ordering::Less,
            };
            if better {
                best = Some((i, values));
            }
        }
        let i = best?.0;
        let row = self.heads[i].take()?;
        Some(strip_hidden(&row, self.visible))
    }

    fn compare(&self, a: &[Option<&[u8]>], b: &[Option<&[u8]>]) -> Ordering {
        for (k, key) in self.keys.iter().enumerate() {
            let o = key.compare(a.get(k).copied().flatten(), b.get(k).copied().flatten());
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    }
}

/// The hidden columns (after `visible`) of a whole DataRow message.
fn hidden_values(message: &[u8], visible: usize) -> Vec<Option<&[u8]>> {
    let body = message.get(5..).unwrap_or(&[]);
    row_values(body).into_iter().skip(visible).collect()
}

/// The DataRow message without its columns after `visible`: the visible values are a
/// prefix of the body, so only the count and the length change.
pub fn strip_hidden(message: &[u8], visible: usize) -> Bytes {
    let body = message.get(5..).unwrap_or(&[]);
    let mut end = 2;
    for _ in 0..visible {
        let Some(len) = body.get(end..end + 4) else {
            break;
        };
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        end += 4 + len.max(0) as usize;
    }
    let end = end.min(body.len());
    let mut out = Vec::with_capacity(end + 5);
    out.push(b'D');
    out.extend_from_slice(&((end + 4) as i32).to_be_bytes());
    out.extend_from_slice(&(visible as i16).to_be_bytes());
    out.extend_from_slice(body.get(2..end).unwrap_or(&[]));
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric_bytes(ndigits: i16, weight: i16, sign: u16, digits: &[i16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&ndigits.to_be_bytes());
        v.extend_from_slice(&weight.to_be_bytes());
        v.extend_from_slice(&sign.to_be_bytes());
        v.extend_from_slice(&0u16.to_be_bytes());
        for d in digits {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v
    }

    #[test]
    fn numeric_order() {
        let neg_big = numeric_bytes(1, 1, 0x4000, &[5]); // -50000
        let neg_small = numeric_bytes(1, 0, 0x4000, &[5]); // -5
        let zero = numeric_bytes(0, 0, 0, &[]);
        let half = numeric_bytes(1, -1, 0, &[5000]); // 0.5
        let five = numeric_bytes(1, 0, 0, &[5]);
        let five_again = numeric_bytes(2, 0, 0, &[5, 0]); // 5.0000
        let big = numeric_bytes(2, 1, 0, &[1, 2]); // 10002
        let inf = numeric_bytes(0, 0, 0xD000, &[]);
        let ninf = numeric_bytes(0, 0, 0xF000, &[]);
        let nan = numeric_bytes(0, 0, 0xC000, &[]);
        let ordered = [
            &ninf, &neg_big, &neg_small, &zero, &half, &five, &big, &inf, &nan,
        ];
        for (i, a) in ordered.iter().enumerate() {
            for (j, b) in ordered.iter().enumerate() {
                assert_eq!(compare_numeric(a, b), i.cmp(&j), "{i} vs {j}");
            }
        }
        assert_eq!(compare_numeric(&five, &five_again), Ordering::Equal);
    }

    #[test]
    fn floats_and_nulls() {
        let k = MergeKey {
            kind: KeyKind::Float8,
            descending: false,
            nulls_first: false,
        };
        let v = |f: f64| f.to_be_bytes().to_vec();
        let (nan, inf, one, nzero, zero) = (v(f64::NAN), v(f64::INFINITY), v(1.0), v(-0.0), v(0.0));
        assert_eq!(k.compare(Some(&nan), Some(&inf)), Ordering::Greater);
        assert_eq!(k.compare(Some(&nan), Some(&nan)), Ordering::Equal);
        assert_eq!(k.compare(Some(&nzero), Some(&zero)), Ordering::Equal);
        assert_eq!(k.compare(Some(&one), None), Ordering::Less);
        let d = MergeKey {
            descending: true,
            nulls_first: true,
            ..k
        };
        assert_eq!(d.compare(None, Some(&one)), Ordering::Less);
        assert_eq!(d.compare(Some(&inf), Some(&one)), Ordering::Less);
    }

    fn row(values: &[Option<&[u8]>]) -> Bytes {
        let mut body = Vec::new();
        body.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for v in values {
            match v {
                Some(v) => {
                    body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    body.extend_from_slice(v);
                }
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        let mut m = vec![b'D'];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(&body);
        Bytes::from(m)
    }

    #[test]
    fn merges_and_strips() {
        let key = MergeKey {
            kind: KeyKind::SignedInt,
            descending: false,
            nulls_first: false,
        };
        let mut m = OrderedMerge::new(vec![key], 1, 2);
        let r = |label: &[u8], k: i32| row(&[Some(label), Some(&k.to_be_bytes())]);
        assert_eq!(m.waiting_for(), Some(0));
        m.push(0, r(b"a", 3));
        assert_eq!(m.pop(), None);
        m.push(1, r(b"b", 1));
        assert_eq!(m.pop(), Some(row(&[Some(b"b")])));
        assert_eq!(m.waiting_for(), Some(1));
        m.finish(1);
        assert_eq!(m.pop(), Some(row(&[Some(b"a")])));
        m.finish(0);
        assert!(m.is_done());
        assert_eq!(strip_hidden(&row(&[None, Some(b"x")]), 1), row(&[None]));
    }
}
