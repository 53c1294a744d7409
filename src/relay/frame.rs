//! Walks a byte stream message by message without copying it: the relay forwards whole
//! reads at once and looks only at the messages it cares about.

use crate::protocol::{self, FrameError, Header};

/// Messages larger than this are streamed even if their type is normally held whole, so a
/// huge message never has to sit in memory.
pub const HOLD_LIMIT: usize = 16 << 20;

/// What the visitor wants done with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visit {
    /// Forward it and go on.
    Forward,
    /// Stop before this message: it is not part of the forwardable prefix.
    Stop,
}

/// Position inside a message stream that arrives in arbitrary chunks.
#[derive(Debug, Default)]
pub struct MessageCursor {
    /// Bytes of the current (streamed) message still to come.
    skip: usize,
}

impl MessageCursor {
    /// True when the stream is between messages.
    pub fn at_boundary(&self) -> bool {
        self.skip == 0
    }

    /// Scans `buf` and returns how many leading bytes may be forwarded; on a framing error,
    /// the error comes with the length of the valid prefix before it.
    ///
    /// `hold(tag)` says which message types the visitor needs whole: those are visited with
    /// their body once complete (and the scan stops at an incomplete one). Every other
    /// message is visited with `None` as soon as its header is seen, and its body is
    /// forwarded as it arrives.
    pub fn scan(
        &mut self,
        buf: &[u8],
        hold: impl Fn(u8) -> bool,
        mut visit: impl FnMut(Header, Option<&[u8]>) -> Visit,
    ) -> Result<usize, (usize, FrameError)> {
        let mut pos = 0;
        loop {
            if self.skip > 0 {
                let n = self.skip.min(buf.len() - pos);
                pos += n;
                self.skip -= n;
                if self.skip > 0 {
                    return Ok(pos);
                }
            }
            let Some(header) = protocol::read_header(&buf[pos..]).map_err(|e| (pos, e))? else {
                return Ok(pos);
            };
            let total = header.total();
            if hold(header.tag) && total <= HOLD_LIMIT {
                if buf.len() - pos < total {
                    return Ok(pos);
                }
                if visit(header, Some(&buf[pos + 5..pos + total])) == Visit::Stop {
                    return Ok(pos);
                }
                pos += total;
            } else {
                if visit(header, None) == Visit::Stop {
                    return Ok(pos);
                }
                let n = total.min(buf.len() - pos);
                pos += n;
                self.skip = total - n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn streams_unheld_and_waits_for_held() {
        let mut stream = msg(b'D', &[7; 100]);
        stream.extend(msg(b'Z', b"I"));
        let mut cur = MessageCursor::default();
        let mut seen = Vec::new();
        // first chunk: header + part of the DataRow
        let n = cur
            .scan(
                &stream[..20],
                |t| t == b'Z',
                |h, b| {
                    seen.push((h.tag, b.map(<[u8]>::to_vec)));
                    Visit::Forward
                },
            )
            .unwrap();
        assert_eq!(n, 20);
        assert!(!cur.at_boundary());
        // rest of the DataRow and half of ReadyForQuery
        let rest = &stream[20..stream.len() - 2];
        let n = cur
            .scan(
                rest,
                |t| t == b'Z',
                |h, b| {
                    seen.push((h.tag, b.map(<[u8]>::to_vec)));
                    Visit::Forward
                },
            )
            .unwrap();
        assert_eq!(n, 105 - 20);
        assert!(cur.at_boundary());
        let tail = &stream[105..];
        let n = cur
            .scan(
                tail,
                |t| t == b'Z',
                |h, b| {
                    seen.push((h.tag, b.map(<[u8]>::to_vec)));
                    Visit::Forward
                },
            )
            .unwrap();
        assert_eq!(n, 6);
        assert_eq!(seen, vec![(b'D', None), (b'Z', Some(b"I".to_vec()))]);
    }

    #[test]
    fn stop_keeps_message() {
        let mut stream = msg(b'Q', b"select 1\0");
        stream.extend(msg(b'X', b""));
        let mut cur = MessageCursor::default();
        let n = cur
            .scan(
                &stream,
                |_| true,
                |h, _| {
                    if h.tag == b'X' {
                        Visit::Stop
                    } else {
                        Visit::Forward
                    }
                },
            )
            .unwrap();
        assert_eq!(n, 14);
    }

    #[test]
    fn bad_length_is_an_error() {
        let mut cur = MessageCursor::default();
        assert!(cur
            .scan(
                &[b'Q', 0x80, 0, 0, 0, 1, 2],
                |_| true,
                |_, _| Visit::Forward
            )
            .is_err());
    }
}
