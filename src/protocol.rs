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

/// Reads the SQLSTATE (`C` field) and message (`M` field) from an ErrorResponse body.
pub fn error_code_and_message(body: &[u8]) -> (Option<String>, Option<String>) {
    let mut code = None;
    let mut message = None;
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match field {
            b'C' => code = Some(value),
            b'M' => message = Some(value),
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    (code, message)
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
