//! Streaming merges of fragment results: concat with LIMIT/OFFSET, and the partial rows a
//! combine step regroups (kept as binary values and handed to PostgreSQL as typed arrays).

pub mod ordered;

use bytes::{BufMut, Bytes, BytesMut};

use crate::backends::pool::row_values;
use crate::protocol::Reader;

/// What to do with the next concatenated row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConcatStep {
    /// Inside OFFSET: drop it.
    Skip,
    /// Send it.
    Send,
    /// LIMIT reached: stop all fragments.
    Stop,
}

/// LIMIT/OFFSET over rows concatenated in arrival order.
#[derive(Debug, Clone)]
pub struct Concat {
    limit: Option<u64>,
    offset: u64,
    seen: u64,
    /// Rows sent to the client.
    pub sent: u64,
}

impl Concat {
    /// A concat with the query's LIMIT and OFFSET.
    pub fn new(limit: Option<u64>, offset: u64) -> Self {
        Concat {
            limit,
            offset,
            seen: 0,
            sent: 0,
        }
    }

    /// True once LIMIT rows were sent.
    pub fn full(&self) -> bool {
        self.limit.is_some_and(|l| self.sent >= l)
    }

    /// Decides about the next row.
    pub fn step(&mut self) -> ConcatStep {
        if self.full() {
            return ConcatStep::Stop;
        }
        self.seen += 1;
        if self.seen <= self.offset {
            return ConcatStep::Skip;
        }
        self.sent += 1;
        ConcatStep::Send
    }
}

/// Type OIDs of the columns of a RowDescription body.
pub fn row_description_types(body: &[u8]) -> Option<Vec<u32>> {
    let mut r = Reader(body);
    let n = r.i16()?;
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        r.cstr()?;
        r.take(6)?; // table oid, attnum
        out.push(r.u32()?);
        r.take(8)?; // typlen, typmod, format
    }
    Some(out)
}

/// Partial rows of a combine, column by column, as binary values.
#[derive(Debug, Default)]
pub struct PartialRows {
    /// Column type OIDs (from the first RowDescription).
    pub types: Vec<u32>,
    /// Values per column.
    pub columns: Vec<Vec<Option<Bytes>>>,
    /// Bytes held, for the memory bound.
    pub bytes: usize,
}

impl PartialRows {
    /// Sets the column types (once).
    pub fn describe(&mut self, types: Vec<u32>) {
        if self.types.is_empty() {
            self.columns = vec![Vec::new(); types.len()];
            self.types = types;
        }
    }

    /// Adds one DataRow message (type byte and length included); `false` if it does not
    /// match the described columns.
    pub fn push(&mut self, message: &Bytes) -> bool {
        let body = message.slice(5..);
        let values = row_values(&body);
        if values.len() != self.columns.len() {
            return false;
        }
        for (col, v) in self.columns.iter_mut().zip(values) {
            let value = v.map(|s| {
                // slice the shared buffer instead of copying
                let start = s.as_ptr() as usize - body.as_ptr() as usize;
                body.slice(start..start + s.len())
            });
            self.bytes += value.as_ref().map_or(4, |b| b.len() + 4);
            col.push(value);
        }
        true
    }

    /// Column `i` as a binary one-dimensional array of its type (array_recv's format).
    pub fn array(&self, i: usize) -> Bytes {
        let values = &self.columns[i];
        let mut out = BytesMut::with_capacity(20 + values.len() * 12);
        out.put_i32(1); // dimensions
        out.put_i32(values.iter().any(Option::is_none) as i32);
        out.put_u32(self.types[i]);
        out.put_i32(values.len() as i32);
        out.put_i32(1); // lower bound
        for v in values {
            match v {
                None => out.put_i32(-1),
                Some(b) => {
                    out.put_i32(b.len() as i32);
                    out.put_slice(b);
                }
            }
        }
        out.freeze()
    }

    /// The first non-NULL value of column `i`.
    pub fn first_value(&self, i: usize) -> Option<&Bytes> {
        self.columns.get(i)?.iter().flatten().next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concat_limit_offset() {
        let mut c = Concat::new(Some(2), 1);
        assert_eq!(c.step(), ConcatStep::Skip);
        assert_eq!(c.step(), ConcatStep::Send);
        assert_eq!(c.step(), ConcatStep::Send);
        assert_eq!(c.step(), ConcatStep::Stop);
    }

    #[test]
    fn partial_rows_to_array() {
        let mut p = PartialRows::default();
        p.describe(vec![20]);
        let mut msg = BytesMut::new();
        msg.put_u8(b'D');
        msg.put_i32(4 + 2 + 4 + 8);
        msg.put_i16(1);
        msg.put_i32(8);
        msg.put_i64(42);
        assert!(p.push(&msg.freeze()));
        let a = p.array(0);
        assert_eq!(a.len(), 20 + 12);
        assert_eq!(&a[8..12], &20u32.to_be_bytes());
    }
}
