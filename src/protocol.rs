//! PostgreSQL v3 wire-protocol framing shared by the client side, the relay and the backend
//! connector: message headers, the few messages pgfan builds itself, and ErrorResponse fields.
//!
//! pgfan relays messages as raw bytes; it decodes only what it must look at (message type,
//! length, ReadyForQuery status, ParameterStatus, BackendKeyData, ErrorResponse fields).

use bytes::{BufMut, BytesMut};

/// Largest message body PostgreSQL itself accepts (`PQ_LARGE_MESSAGE_LIMIT`, 1 GB - 1).
pub const MAX_MESSAGE_LEN: usize = 0x3fff_ffff;

/// Protocol version 3.0 as sent in a StartupMessage.
pub const PROTOCOL_3_0: i32 = 196_608;

/// Request code of a CancelRequest packet.
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;

/// A message header: type byte and total length (type byte excluded, length field included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The message type byte, e.g. `b'Q'`.
    pub tag: u8,
    /// The length field: body length plus the 4 bytes of the field itself.
    pub len: usize,
}

impl Header {
    /// Size of the whole message on the wire (type byte + length field + body).
    pub fn total(&self) -> usize {
        1 + self.len
    }
}

/// Framing errors: a peer sent bytes that are not a valid message stream.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length field is below 4 or above [`MAX_MESSAGE_LEN`].
    #[error("invalid message length {len} for message type \"{}\"", *.tag as char)]
    InvalidLength {
        /// Message type byte.
        tag: u8,
        /// Length field as sent.
        len: u64,
    },
}

/// Reads the header at the start of `buf`, if 5 bytes are there.
pub fn read_header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as u64;
    if !(4..=MAX_MESSAGE_LEN as u64).contains(&len) {
        return Err(FrameError::InvalidLength { tag: buf[0], len });
    }
    Ok(Some(Header {
        tag: buf[0],
        len: len as usize,
    }))
}

/// Severity, SQLSTATE and message of an ErrorResponse/NoticeResponse pgfan builds itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFields {
    /// `ERROR` or `FATAL`.
    pub severity: &'static str,
    /// Five-character SQLSTATE.
    pub code: &'static str,
    /// Primary human-readable message.
    pub message: String,
}

impl ErrorFields {
    /// An `ERROR` with the given SQLSTATE.
    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            severity: "ERROR",
            code,
            message: message.into(),
        }
    }

    /// A `FATAL` with the given SQLSTATE: the connection ends after it.
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            severity: "FATAL",
            code,
            message: message.into(),
        }
    }

    /// Appends the ErrorResponse message to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u8(b'E');
        out.put_i32(0);
        for (field, value) in [
            (b'S', self.severity),
            (b'V', self.severity),
            (b'C', self.code),
            (b'M', self.message.as_str()),
        ] {
            out.put_u8(field);
            put_cstr(out, value);
        }
        out.put_u8(0);
        patch_len(out, start);
    }

    /// The ErrorResponse message as bytes.
    pub fn to_bytes(&self) -> BytesMut {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out
    }
}

/// Appends a ReadyForQuery message with the given status byte (`I`, `T` or `E`).
pub fn put_ready_for_query(out: &mut BytesMut, status: u8) {
    out.put_u8(b'Z');
    out.put_i32(5);
    out.put_u8(status);
}

/// Appends a BackendKeyData message.
pub fn put_backend_key_data(out: &mut BytesMut, pid: i32, secret: i32) {
    out.put_u8(b'K');
    out.put_i32(12);
    out.put_i32(pid);
    out.put_i32(secret);
}

/// A CancelRequest packet for the given backend.
pub fn cancel_request(pid: i32, secret: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(12 + secret.len());
    out.put_i32(12 + secret.len() as i32);
    out.put_i32(CANCEL_REQUEST_CODE);
    out.put_i32(pid);
    out.put_slice(secret);
    out
}

/// Appends a null-terminated string.
pub fn put_cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

/// Writes the length field of the message that starts at `start` (its type byte).
pub fn patch_len(out: &mut BytesMut, start: usize) {
    let len = (out.len() - start - 1) as i32;
    out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
}

/// Appends a message with the given type and body.
pub fn put_message(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_i32((body.len() + 4) as i32);
    out.put_slice(body);
}

/// Appends a ParameterStatus message.
pub fn put_parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    let start = out.len();
    out.put_u8(b'S');
    out.put_i32(0);
    put_cstr(out, name);
    put_cstr(out, value);
    patch_len(out, start);
}

/// Name and value of a ParameterStatus body.
pub fn parameter_status(body: &[u8]) -> Option<(String, String)> {
    let mut parts = cstrings(body);
    let name = parts.next()?;
    let value = parts.next().unwrap_or_default();
    Some((
        String::from_utf8_lossy(name).into_owned(),
        String::from_utf8_lossy(value).into_owned(),
    ))
}

/// Splits a message body made of null-terminated strings (SASL mechanism lists).
pub fn cstrings(body: &[u8]) -> impl Iterator<Item = &[u8]> {
    body.split(|b| *b == 0).filter(|s| !s.is_empty())
}

/// The fields of an ErrorResponse or NoticeResponse body, as (type byte, value).
pub fn error_fields(body: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = body;
    std::iter::from_fn(move || {
        let (&field, tail) = rest.split_first()?;
        if field == 0 {
            return None;
        }
        let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
        rest = tail.get(end + 1..).unwrap_or(&[]);
        Some((field, &tail[..end]))
    })
}

/// Reads the SQLSTATE (`C` field) and message (`M` field) from an ErrorResponse body.
pub fn error_code_and_message(body: &[u8]) -> (Option<String>, Option<String>) {
    let mut code = None;
    let mut message = None;
    for (field, value) in error_fields(body) {
        let value = String::from_utf8_lossy(value).into_owned();
        match field {
            b'C' => code = Some(value),
            b'M' => message = Some(value),
            _ => {}
        }
    }
    (code, message)
}

/// Appends a simple Query message.
pub fn put_query(out: &mut BytesMut, sql: &str) {
    let start = out.len();
    out.put_u8(b'Q');
    out.put_i32(0);
    put_cstr(out, sql);
    patch_len(out, start);
}

/// Appends a Parse message.
pub fn put_parse(out: &mut BytesMut, statement: &str, sql: &str, param_types: &[u32]) {
    let start = out.len();
    out.put_u8(b'P');
    out.put_i32(0);
    put_cstr(out, statement);
    put_cstr(out, sql);
    out.put_i16(param_types.len() as i16);
    for t in param_types {
        out.put_u32(*t);
    }
    patch_len(out, start);
}

/// Parameters of a Bind message, kept raw so they reach fragments exactly as sent.
#[derive(Debug, Clone, Default)]
pub struct BindParams {
    /// Parameter format codes as sent (0, 1 or one per parameter).
    pub formats: Vec<i16>,
    /// Parameter values (`None` is SQL NULL).
    pub values: Vec<Option<bytes::Bytes>>,
    /// Result-column format codes as sent (0, 1 or one per column).
    pub result_formats: Vec<i16>,
}

impl BindParams {
    /// The format code of result column `i` (PostgreSQL's rules: none = text, one = all).
    pub fn result_format(&self, i: usize) -> i16 {
        match self.result_formats.len() {
            0 => 0,
            1 => self.result_formats[0],
            _ => self.result_formats.get(i).copied().unwrap_or(0),
        }
    }

    /// Parses a Bind body into portal name, statement name and parameters.
    pub fn parse(body: &[u8]) -> Option<(String, String, BindParams)> {
        let mut r = Reader(body);
        let portal = r.cstr()?.into_owned();
        let statement = r.cstr()?.into_owned();
        let nf = r.i16()?;
        let formats = (0..nf).map(|_| r.i16()).collect::<Option<Vec<_>>>()?;
        let nv = r.i16()?;
        let mut values = Vec::with_capacity(nv.max(0) as usize);
        for _ in 0..nv {
            let len = r.i32()?;
            values.push(if len < 0 {
                None
            } else {
                Some(bytes::Bytes::copy_from_slice(r.take(len as usize)?))
            });
        }
        let nr = r.i16()?;
        let result_formats = (0..nr).map(|_| r.i16()).collect::<Option<Vec<_>>>()?;
        Some((
            portal,
            statement,
            BindParams {
                formats,
                values,
                result_formats,
            },
        ))
    }
}

/// Appends a Bind message; `extra` values (binary) follow the client's parameters.
pub fn put_bind(
    out: &mut BytesMut,
    portal: &str,
    statement: &str,
    params: &BindParams,
    extra: &[Option<bytes::Bytes>],
    result_formats: &[i16],
) {
    let start = out.len();
    out.put_u8(b'B');
    out.put_i32(0);
    put_cstr(out, portal);
    put_cstr(out, statement);
    let n = params.values.len();
    if extra.is_empty() {
        out.put_i16(params.formats.len() as i16);
        for f in &params.formats {
            out.put_i16(*f);
        }
    } else {
        // one code per parameter: the client's, then binary for the extra ones
        out.put_i16((n + extra.len()) as i16);
        for i in 0..n {
            let f = match params.formats.len() {
                0 => 0,
                1 => params.formats[0],
                _ => params.formats.get(i).copied().unwrap_or(0),
            };
            out.put_i16(f);
        }
        for _ in extra {
            out.put_i16(1);
        }
    }
    out.put_i16((n + extra.len()) as i16);
    for v in params.values.iter().chain(extra) {
        match v {
            None => out.put_i32(-1),
            Some(b) => {
                out.put_i32(b.len() as i32);
                out.put_slice(b);
            }
        }
    }
    out.put_i16(result_formats.len() as i16);
    for f in result_formats {
        out.put_i16(*f);
    }
    patch_len(out, start);
}

/// Appends Describe (`kind` `S` or `P`) or Close of a statement/portal.
pub fn put_describe_or_close(out: &mut BytesMut, tag: u8, kind: u8, name: &str) {
    let start = out.len();
    out.put_u8(tag);
    out.put_i32(0);
    out.put_u8(kind);
    put_cstr(out, name);
    patch_len(out, start);
}

/// Appends an Execute of `portal` with no row limit.
pub fn put_execute(out: &mut BytesMut, portal: &str) {
    let start = out.len();
    out.put_u8(b'E');
    out.put_i32(0);
    put_cstr(out, portal);
    out.put_i32(0);
    patch_len(out, start);
}

/// Appends a bodyless message (Sync `S`, Flush `H`, Terminate `X`).
pub fn put_empty(out: &mut BytesMut, tag: u8) {
    out.put_u8(tag);
    out.put_i32(4);
}

/// Appends a CommandComplete message.
pub fn put_command_complete(out: &mut BytesMut, tag: &str) {
    let start = out.len();
    out.put_u8(b'C');
    out.put_i32(0);
    put_cstr(out, tag);
    patch_len(out, start);
}

/// A cursor over a message body.
pub struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    /// Next `n` bytes.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    /// A big-endian i16.
    pub fn i16(&mut self) -> Option<i16> {
        self.take(2).map(|b| i16::from_be_bytes([b[0], b[1]]))
    }

    /// A big-endian i32.
    pub fn i32(&mut self) -> Option<i32> {
        self.take(4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A big-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.i32().map(|v| v as u32)
    }

    /// A null-terminated string (lossy UTF-8), borrowed from the body when it is valid
    /// UTF-8 (the relay reads one or two per statement; most are only looked up).
    pub fn cstr(&mut self) -> Option<std::borrow::Cow<'a, str>> {
        let end = memchr::memchr(0, self.0)?;
        let bytes = &self.0[..end];
        self.0 = &self.0[end + 1..];
        // `from_utf8` first: its ASCII path is faster than the lossy decoder's
        Some(match std::str::from_utf8(bytes) {
            Ok(s) => std::borrow::Cow::Borrowed(s),
            Err(_) => String::from_utf8_lossy(bytes),
        })
    }
}

/// Reads one whole message (type byte and body) from `rd`, buffering in `buf`.
pub async fn read_message<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> std::io::Result<(u8, BytesMut)> {
    use bytes::Buf;
    use tokio::io::AsyncReadExt;
    loop {
        match read_header(buf) {
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Ok(Some(h)) if buf.len() >= h.total() => {
                let mut msg = buf.split_to(h.total());
                msg.advance(5);
                return Ok((h.tag, msg));
            }
            _ => {}
        }
        buf.reserve(32 << 10);
        if rd.read_buf(buf).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "backend closed the connection",
            ));
        }
    }
}

/// Rebuilds an ErrorResponse/NoticeResponse body without its `P` (position) field, which
/// would point into SQL the client never sent.
pub fn strip_error_position(body: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(b'E');
    out.put_i32(0);
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
        if field != b'P' {
            out.put_u8(field);
            out.put_slice(&tail[..end]);
            out.put_u8(0);
        }
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    out.put_u8(0);
    patch_len(&mut out, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_rejects_bad_lengths() {
        assert_eq!(read_header(b"Q\0\0"), Ok(None));
        assert!(read_header(&[b'Q', 0, 0, 0, 3]).is_err());
        assert!(read_header(&[b'Q', 0x80, 0, 0, 0]).is_err());
        let h = read_header(&[b'Q', 0, 0, 0, 9, 1]).unwrap().unwrap();
        assert_eq!(h.total(), 10);
    }

    #[test]
    fn error_roundtrip() {
        let bytes = ErrorFields::fatal("53300", "sorry, too many clients already").to_bytes();
        let h = read_header(&bytes).unwrap().unwrap();
        assert_eq!(h.total(), bytes.len());
        let (code, msg) = error_code_and_message(&bytes[5..]);
        assert_eq!(code.as_deref(), Some("53300"));
        assert_eq!(msg.as_deref(), Some("sorry, too many clients already"));
    }
}
