//! A raw PostgreSQL wire-protocol client for the integration tests.
//!
//! Built on `postgres_protocol`'s frontend encoders and backend decoder rather than
//! tokio-postgres, because the tests must see everything a client sees: command tags,
//! typmods, every ErrorResponse field, ParameterStatus, NotificationResponse and the
//! ReadyForQuery status byte.
//!
//! Every backend message is turned into a [`Msg`]; the messages of one request up to and
//! including ReadyForQuery form a [`Transcript`]. OIDs of user objects (>= 16384) are
//! replaced by their order of first appearance in the session (see [`OidMap`]), so two
//! sessions that run the same script in different databases produce equal transcripts.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::{backend, frontend};
use postgres_protocol::IsNull;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The first OID that PostgreSQL assigns to user-created objects.
pub const FIRST_NORMAL_OID: u32 = 16384;

/// Default bound on how long one read from the server may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Result (or parameter) format code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Binary,
}

/// The three ways the differential suites run each statement: a simple Query, and the
/// extended protocol with text and with binary results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Simple,
    ExtendedText,
    ExtendedBinary,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Simple, Mode::ExtendedText, Mode::ExtendedBinary];

    /// A short name for logs and database names.
    pub fn tag(self) -> &'static str {
        match self {
            Mode::Simple => "simple",
            Mode::ExtendedText => "ext_text",
            Mode::ExtendedBinary => "ext_binary",
        }
    }

    /// The result format of an extended-protocol run; `None` for a simple Query.
    pub fn format(self) -> Option<Format> {
        match self {
            Mode::Simple => None,
            Mode::ExtendedText => Some(Format::Text),
            Mode::ExtendedBinary => Some(Format::Binary),
        }
    }
}

impl Format {
    pub fn code(self) -> i16 {
        match self {
            Format::Text => 0,
            Format::Binary => 1,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Normalized messages
// ---------------------------------------------------------------------------------------

/// An OID as recorded in a transcript: system OIDs verbatim, user OIDs by order of first
/// appearance (`User(0)` is the first user OID the session saw).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum Oid {
    Sys(u32),
    User(u32),
}

impl Oid {
    /// A stable 32-bit encoding, used where an OID is embedded in binary values.
    fn encoded(self) -> u32 {
        match self {
            Oid::Sys(o) => o,
            Oid::User(i) => 0x8000_0000 | i,
        }
    }
}

impl fmt::Debug for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Oid::Sys(o) => write!(f, "{o}"),
            Oid::User(i) => write!(f, "user#{i}"),
        }
    }
}

/// Maps user OIDs (>= 16384) to their order of first appearance.
#[derive(Clone, Debug, Default)]
pub struct OidMap {
    map: HashMap<u32, u32>,
}

impl OidMap {
    pub fn map(&mut self, oid: u32) -> Oid {
        if oid < FIRST_NORMAL_OID {
            return Oid::Sys(oid);
        }
        let next = self.map.len() as u32;
        Oid::User(*self.map.entry(oid).or_insert(next))
    }
}

/// A column value or a COPY chunk: raw bytes with a readable Debug form.
#[derive(Clone, PartialEq, Eq)]
pub struct Raw(pub Bytes);

impl fmt::Debug for Raw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_bytes(&self.0, f)
    }
}

fn fmt_bytes(b: &[u8], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    const MAX_TEXT: usize = 200;
    const MAX_HEX: usize = 64;
    match std::str::from_utf8(b) {
        Ok(s) if !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') => {
            if s.chars().count() > MAX_TEXT {
                let head: String = s.chars().take(MAX_TEXT).collect();
                write!(f, "{head:?}…({} bytes)", b.len())
            } else {
                write!(f, "{s:?}")
            }
        }
        _ => {
            write!(f, "x'")?;
            for byte in b.iter().take(MAX_HEX) {
                write!(f, "{byte:02x}")?;
            }
            if b.len() > MAX_HEX {
                write!(f, "…'({} bytes)", b.len())
            } else {
                write!(f, "'")
            }
        }
    }
}

/// Debug-formats a string like `{:?}`, cut after 300 characters.
struct Short<'a>(&'a str);

impl fmt::Debug for Short<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX: usize = 300;
        if self.0.chars().count() > MAX {
            let head: String = self.0.chars().take(MAX).collect();
            write!(f, "{head:?}…({} bytes)", self.0.len())
        } else {
            write!(f, "{:?}", self.0)
        }
    }
}

/// One column of a RowDescription.
#[derive(Clone, PartialEq, Eq)]
pub struct FieldDesc {
    pub name: String,
    pub table_oid: Oid,
    pub column_id: i16,
    pub type_oid: Oid,
    pub type_size: i16,
    pub typmod: i32,
    pub format: i16,
}

impl fmt::Debug for FieldDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?}(table={:?} col={} type={:?} size={} typmod={} fmt={})",
            self.name,
            self.table_oid,
            self.column_id,
            self.type_oid,
            self.type_size,
            self.typmod,
            self.format
        )
    }
}

/// The fields of an ErrorResponse or NoticeResponse.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ErrorInfo {
    /// `S`: localized severity.
    pub severity: String,
    /// `C`: SQLSTATE.
    pub code: String,
    /// `M`
    pub message: String,
    /// `D`
    pub detail: Option<String>,
    /// `H`
    pub hint: Option<String>,
    /// `P`: cursor position in the query text.
    pub position: Option<String>,
    /// Every other field (V, W context, s/t/c/d/n names, F/L/R source location, p/q
    /// internal query, ...) in the order received.
    pub other: Vec<(char, String)>,
}

impl ErrorInfo {
    fn from_fields(mut fields: backend::ErrorFields<'_>) -> io::Result<ErrorInfo> {
        let mut info = ErrorInfo::default();
        while let Some(field) = fields.next()? {
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'S' => info.severity = value,
                b'C' => info.code = value,
                b'M' => info.message = value,
                b'D' => info.detail = Some(value),
                b'H' => info.hint = Some(value),
                b'P' => info.position = Some(value),
                t => info.other.push((t as char, value)),
            }
        }
        Ok(info)
    }

    /// The value of a field not stored in a named member, e.g. `'W'` (context).
    pub fn field(&self, code: char) -> Option<&str> {
        self.other
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_str())
    }
}

impl fmt::Debug for ErrorInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {:?}",
            self.severity,
            self.code,
            Short(&self.message)
        )?;
        if let Some(d) = &self.detail {
            write!(f, " detail={:?}", Short(d))?;
        }
        if let Some(h) = &self.hint {
            write!(f, " hint={:?}", Short(h))?;
        }
        if let Some(p) = &self.position {
            write!(f, " position={p}")?;
        }
        for (c, v) in &self.other {
            write!(f, " {c}={:?}", Short(v))?;
        }
        Ok(())
    }
}

/// A backend message, normalized for comparison.
#[derive(Clone, PartialEq, Eq)]
pub enum Msg {
    RowDescription(Vec<FieldDesc>),
    DataRow(Vec<Option<Raw>>),
    CommandComplete(String),
    EmptyQueryResponse,
    Error(ErrorInfo),
    Notice(ErrorInfo),
    ParameterStatus {
        name: String,
        value: String,
    },
    Notification {
        channel: String,
        payload: String,
        /// The notifying backend's pid equals this session's BackendKeyData pid.
        from_self: bool,
    },
    CopyInResponse {
        format: u8,
        columns: Vec<u16>,
    },
    CopyOutResponse {
        format: u8,
        columns: Vec<u16>,
    },
    CopyData(Raw),
    CopyDone,
    PortalSuspended,
    ParseComplete,
    BindComplete,
    CloseComplete,
    NoData,
    ParameterDescription(Vec<Oid>),
    ReadyForQuery(char),
    /// Result of a FunctionCall ('V').
    FunctionCallResponse(Option<Raw>),
    /// A message type the decoder does not know (CopyBothResponse,
    /// NegotiateProtocolVersion, ...).
    Unknown {
        tag: char,
        body: Raw,
    },
    /// Anything unexpected after startup (authentication requests, BackendKeyData).
    Other(String),
}

impl fmt::Debug for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Msg::RowDescription(fields) => {
                write!(f, "RowDescription[")?;
                for (i, fd) in fields.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{fd:?}")?;
                }
                write!(f, "]")
            }
            Msg::DataRow(values) => {
                write!(f, "DataRow(")?;
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    match v {
                        None => write!(f, "NULL")?,
                        Some(r) => write!(f, "{r:?}")?,
                    }
                }
                write!(f, ")")
            }
            Msg::CommandComplete(tag) => write!(f, "CommandComplete({tag:?})"),
            Msg::EmptyQueryResponse => write!(f, "EmptyQueryResponse"),
            Msg::Error(e) => write!(f, "ErrorResponse({e:?})"),
            Msg::Notice(e) => write!(f, "NoticeResponse({e:?})"),
            Msg::ParameterStatus { name, value } => {
                write!(f, "ParameterStatus({name}={:?})", Short(value))
            }
            Msg::Notification {
                channel,
                payload,
                from_self,
            } => write!(
                f,
                "Notification(channel={channel:?} payload={:?} from_self={from_self})",
                Short(payload)
            ),
            Msg::CopyInResponse { format, columns } => {
                write!(f, "CopyInResponse(format={format} columns={columns:?})")
            }
            Msg::CopyOutResponse { format, columns } => {
                write!(f, "CopyOutResponse(format={format} columns={columns:?})")
            }
            Msg::CopyData(r) => write!(f, "CopyData({r:?})"),
            Msg::CopyDone => write!(f, "CopyDone"),
            Msg::PortalSuspended => write!(f, "PortalSuspended"),
            Msg::ParseComplete => write!(f, "ParseComplete"),
            Msg::BindComplete => write!(f, "BindComplete"),
            Msg::CloseComplete => write!(f, "CloseComplete"),
            Msg::NoData => write!(f, "NoData"),
            Msg::ParameterDescription(oids) => write!(f, "ParameterDescription({oids:?})"),
            Msg::ReadyForQuery(s) => write!(f, "ReadyForQuery({s})"),
            Msg::FunctionCallResponse(None) => write!(f, "FunctionCallResponse(NULL)"),
            Msg::FunctionCallResponse(Some(r)) => write!(f, "FunctionCallResponse({r:?})"),
            Msg::Unknown { tag, body } => write!(f, "Unknown(tag={tag:?} body={body:?})"),
            Msg::Other(s) => write!(f, "Other({s})"),
        }
    }
}

/// The ordered backend messages of one request, normally ending with ReadyForQuery.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Transcript {
    pub messages: Vec<Msg>,
}

impl Msg {
    /// The message's type name.
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::RowDescription(_) => "RowDescription",
            Msg::DataRow(_) => "DataRow",
            Msg::CommandComplete(_) => "CommandComplete",
            Msg::EmptyQueryResponse => "EmptyQueryResponse",
            Msg::Error(_) => "Error",
            Msg::Notice(_) => "Notice",
            Msg::ParameterStatus { .. } => "ParameterStatus",
            Msg::Notification { .. } => "Notification",
            Msg::CopyInResponse { .. } => "CopyInResponse",
            Msg::CopyOutResponse { .. } => "CopyOutResponse",
            Msg::CopyData(_) => "CopyData",
            Msg::CopyDone => "CopyDone",
            Msg::PortalSuspended => "PortalSuspended",
            Msg::ParseComplete => "ParseComplete",
            Msg::BindComplete => "BindComplete",
            Msg::CloseComplete => "CloseComplete",
            Msg::NoData => "NoData",
            Msg::ParameterDescription(_) => "ParameterDescription",
            Msg::ReadyForQuery(_) => "ReadyForQuery",
            Msg::FunctionCallResponse(_) => "FunctionCallResponse",
            Msg::Unknown { .. } => "Unknown",
            Msg::Other(_) => "Other",
        }
    }
}

impl Transcript {
    /// The status byte of the last ReadyForQuery ('I', 'T' or 'E').
    pub fn status(&self) -> Option<char> {
        self.messages.iter().rev().find_map(|m| match m {
            Msg::ReadyForQuery(s) => Some(*s),
            _ => None,
        })
    }

    pub fn errors(&self) -> impl Iterator<Item = &ErrorInfo> {
        self.messages.iter().filter_map(|m| match m {
            Msg::Error(e) => Some(e),
            _ => None,
        })
    }

    /// SQLSTATE of the first ErrorResponse.
    pub fn error_code(&self) -> Option<&str> {
        self.errors().next().map(|e| e.code.as_str())
    }

    pub fn notices(&self) -> impl Iterator<Item = &ErrorInfo> {
        self.messages.iter().filter_map(|m| match m {
            Msg::Notice(e) => Some(e),
            _ => None,
        })
    }

    pub fn command_tags(&self) -> Vec<&str> {
        self.messages
            .iter()
            .filter_map(|m| match m {
                Msg::CommandComplete(t) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    pub fn data_rows(&self) -> Vec<&[Option<Raw>]> {
        self.messages
            .iter()
            .filter_map(|m| match m {
                Msg::DataRow(v) => Some(v.as_slice()),
                _ => None,
            })
            .collect()
    }

    pub fn count(&self, pred: impl Fn(&Msg) -> bool) -> usize {
        self.messages.iter().filter(|m| pred(m)).count()
    }

    /// Renders messages `range` with their indexes, one per line.
    pub fn render_range(&self, from: usize, to: usize) -> String {
        let mut out = String::new();
        let to = to.min(self.messages.len());
        for i in from..to {
            out.push_str(&format!("  {i:>6}: {:?}\n", self.messages[i]));
        }
        out
    }
}

impl fmt::Debug for Transcript {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const HEAD: usize = 40;
        const TAIL: usize = 10;
        let n = self.messages.len();
        writeln!(f, "Transcript ({n} messages)")?;
        if n <= HEAD + TAIL + 5 {
            write!(f, "{}", self.render_range(0, n))
        } else {
            write!(f, "{}", self.render_range(0, HEAD))?;
            writeln!(f, "  … {} messages elided …", n - HEAD - TAIL)?;
            write!(f, "{}", self.render_range(n - TAIL, n))
        }
    }
}

/// `None` when equal, otherwise a readable account of the first difference with both
/// transcripts around it (whole when short).
pub fn diff(expected: &Transcript, got: &Transcript) -> Option<String> {
    if expected == got {
        return None;
    }
    let (a, b) = (&expected.messages, &got.messages);
    let first = a
        .iter()
        .zip(b.iter())
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    let mut out = format!(
        "first difference at message {first} (direct has {} messages, pgfan has {})\n",
        a.len(),
        b.len()
    );
    if let (Some(x), Some(y)) = (a.get(first), b.get(first)) {
        out.push_str(&format!("  direct: {x:?}\n  pgfan:  {y:?}\n"));
        if let (Msg::DataRow(xv), Msg::DataRow(yv)) = (x, y) {
            for (col, (p, q)) in xv.iter().zip(yv.iter()).enumerate() {
                if p != q {
                    let describe = |v: &Option<Raw>| match v {
                        None => "NULL".to_string(),
                        Some(r) => format!("{} bytes", r.0.len()),
                    };
                    let at = match (p, q) {
                        (Some(p), Some(q)) => {
                            p.0.iter()
                                .zip(q.0.iter())
                                .position(|(u, v)| u != v)
                                .map(|i| format!(", first differing byte at {i}"))
                                .unwrap_or_default()
                        }
                        _ => String::new(),
                    };
                    out.push_str(&format!(
                        "  column {col} differs: direct {} vs pgfan {}{at}\n",
                        describe(p),
                        describe(q)
                    ));
                }
            }
        }
    }
    let short = a.len().max(b.len()) <= 60;
    let (from, to) = if short {
        (0, usize::MAX)
    } else {
        (first.saturating_sub(5), first + 15)
    };
    out.push_str("--- direct\n");
    out.push_str(&expected.render_range(from, to));
    if !short {
        out.push_str(&format!("  … (of {})\n", a.len()));
    }
    out.push_str("+++ pgfan\n");
    out.push_str(&got.render_range(from, to));
    if !short {
        out.push_str(&format!("  … (of {})\n", b.len()));
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------
// Frontend message batches
// ---------------------------------------------------------------------------------------

/// A buffer of frontend messages to send in one write.
#[derive(Default)]
pub struct Batch {
    buf: BytesMut,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn query(&mut self, sql: &str) -> &mut Self {
        frontend::query(sql, &mut self.buf).expect("encode Query");
        self
    }

    pub fn parse(&mut self, name: &str, sql: &str, param_types: &[u32]) -> &mut Self {
        frontend::parse(name, sql, param_types.iter().copied(), &mut self.buf)
            .expect("encode Parse");
        self
    }

    /// Bind with text parameters and one result format code for all columns.
    pub fn bind(
        &mut self,
        portal: &str,
        statement: &str,
        params: &[Option<&str>],
        result_format: Format,
    ) -> &mut Self {
        let values: Vec<Option<&[u8]>> = params.iter().map(|p| p.map(str::as_bytes)).collect();
        self.bind_raw(portal, statement, &[0], &values, &[result_format.code()])
    }

    /// Bind with explicit parameter format codes, raw parameter bytes and result format
    /// codes.
    pub fn bind_raw(
        &mut self,
        portal: &str,
        statement: &str,
        param_formats: &[i16],
        params: &[Option<&[u8]>],
        result_formats: &[i16],
    ) -> &mut Self {
        let r = frontend::bind(
            portal,
            statement,
            param_formats.iter().copied(),
            params.iter(),
            |v, buf: &mut BytesMut| match v {
                None => Ok(IsNull::Yes),
                Some(b) => {
                    buf.put_slice(b);
                    Ok(IsNull::No)
                }
            },
            result_formats.iter().copied(),
            &mut self.buf,
        );
        if r.is_err() {
            panic!("encode Bind failed");
        }
        self
    }

    pub fn describe_statement(&mut self, name: &str) -> &mut Self {
        frontend::describe(b'S', name, &mut self.buf).expect("encode Describe");
        self
    }

    pub fn describe_portal(&mut self, name: &str) -> &mut Self {
        frontend::describe(b'P', name, &mut self.buf).expect("encode Describe");
        self
    }

    pub fn execute(&mut self, portal: &str, max_rows: i32) -> &mut Self {
        frontend::execute(portal, max_rows, &mut self.buf).expect("encode Execute");
        self
    }

    pub fn close_statement(&mut self, name: &str) -> &mut Self {
        frontend::close(b'S', name, &mut self.buf).expect("encode Close");
        self
    }

    pub fn close_portal(&mut self, name: &str) -> &mut Self {
        frontend::close(b'P', name, &mut self.buf).expect("encode Close");
        self
    }

    pub fn sync(&mut self) -> &mut Self {
        frontend::sync(&mut self.buf);
        self
    }

    pub fn flush(&mut self) -> &mut Self {
        frontend::flush(&mut self.buf);
        self
    }

    pub fn copy_data(&mut self, data: &[u8]) -> &mut Self {
        frontend::CopyData::new(data)
            .expect("encode CopyData")
            .write(&mut self.buf);
        self
    }

    pub fn copy_done(&mut self) -> &mut Self {
        frontend::copy_done(&mut self.buf);
        self
    }

    pub fn copy_fail(&mut self, message: &str) -> &mut Self {
        frontend::copy_fail(message, &mut self.buf).expect("encode CopyFail");
        self
    }

    pub fn terminate(&mut self) -> &mut Self {
        frontend::terminate(&mut self.buf);
        self
    }

    /// FunctionCall ('F', the fast-path interface libpq uses for large objects).
    pub fn function_call(
        &mut self,
        function_oid: u32,
        arg_formats: &[i16],
        args: &[Option<&[u8]>],
        result_format: i16,
    ) -> &mut Self {
        let mut body = BytesMut::new();
        body.put_u32(function_oid);
        body.put_i16(arg_formats.len() as i16);
        for f in arg_formats {
            body.put_i16(*f);
        }
        body.put_i16(args.len() as i16);
        for a in args {
            match a {
                None => body.put_i32(-1),
                Some(v) => {
                    body.put_i32(v.len() as i32);
                    body.put_slice(v);
                }
            }
        }
        body.put_i16(result_format);
        self.message(b'F', &body)
    }

    /// Any message: tag, then length and body.
    pub fn message(&mut self, tag: u8, body: &[u8]) -> &mut Self {
        self.buf.put_u8(tag);
        self.buf.put_i32(body.len() as i32 + 4);
        self.buf.put_slice(body);
        self
    }

    /// Bytes as they are (malformed input on purpose, for example).
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.put_slice(bytes);
        self
    }
}

// ---------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------

/// Startup parameters and credentials.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    pub user: String,
    pub database: String,
    pub password: Option<String>,
    /// Extra startup parameters (application_name, options, DateStyle, ...).
    pub params: Vec<(String, String)>,
    pub timeout: Duration,
}

impl ConnectOptions {
    pub fn new(user: &str, database: &str) -> ConnectOptions {
        ConnectOptions {
            user: user.to_string(),
            database: database.to_string(),
            password: None,
            params: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn password(mut self, password: &str) -> Self {
        self.password = Some(password.to_string());
        self
    }

    pub fn param(mut self, name: &str, value: &str) -> Self {
        self.params.push((name.to_string(), value.to_string()));
        self
    }
}

/// The authentication exchange the server asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    Trust,
    Cleartext,
    Md5,
    ScramSha256,
}

#[derive(Debug)]
pub enum ConnectError {
    Io(io::Error),
    /// The server refused the connection with an ErrorResponse.
    Server(Box<ErrorInfo>),
    /// Authentication was requested but no password was given, or the method is not
    /// supported.
    Auth(String),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Io(e) => write!(f, "io error: {e}"),
            ConnectError::Server(e) => write!(f, "server error: {e:?}"),
            ConnectError::Auth(s) => write!(f, "authentication: {s}"),
        }
    }
}

impl std::error::Error for ConnectError {}

impl From<io::Error> for ConnectError {
    fn from(e: io::Error) -> Self {
        ConnectError::Io(e)
    }
}

impl ConnectError {
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ConnectError::Server(e) => Some(&e.code),
            _ => None,
        }
    }
}

pub struct WireClient {
    stream: TcpStream,
    rbuf: BytesMut,
    /// ParameterStatus values received so far (startup and later), latest value wins.
    pub parameters: Vec<(String, String)>,
    /// Messages after authentication up to the first ReadyForQuery, without
    /// BackendKeyData (ParameterStatus, NoticeResponse).
    pub startup: Transcript,
    pub process_id: i32,
    pub secret_key: i32,
    pub auth_method: AuthMethod,
    /// User OID normalization state for this session.
    pub oids: OidMap,
    /// Bound on every single read from the server.
    pub timeout: Duration,
    /// Raw type OID and format of each column of the current result, for normalizing
    /// OIDs embedded in binary values.
    row_types: Vec<(u32, i16)>,
}

impl WireClient {
    /// The startup ParameterStatus values, sorted (the order is not part of the contract).
    pub fn startup_parameters_sorted(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .startup
            .messages
            .iter()
            .filter_map(|m| match m {
                Msg::ParameterStatus { name, value } => Some((name.clone(), value.clone())),
                _ => None,
            })
            .collect();
        v.sort();
        v
    }

    /// Connects to `addr` ("127.0.0.1:5432") with trust authentication.
    pub async fn connect(addr: &str, user: &str, database: &str) -> io::Result<WireClient> {
        Self::connect_with(addr, &ConnectOptions::new(user, database))
            .await
            .map_err(|e| match e {
                ConnectError::Io(e) => e,
                other => io::Error::other(other.to_string()),
            })
    }

    pub async fn connect_with(
        addr: &str,
        opts: &ConnectOptions,
    ) -> Result<WireClient, ConnectError> {
        let stream = tokio::time::timeout(opts.timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        let mut client = WireClient {
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
            parameters: Vec::new(),
            startup: Transcript::default(),
            process_id: 0,
            secret_key: 0,
            auth_method: AuthMethod::Trust,
            oids: OidMap::default(),
            timeout: opts.timeout,
            row_types: Vec::new(),
        };
        client.startup(opts).await?;
        Ok(client)
    }

    async fn startup(&mut self, opts: &ConnectOptions) -> Result<(), ConnectError> {
        let mut params: Vec<(&str, &str)> =
            vec![("user", &opts.user), ("database", &opts.database)];
        for (k, v) in &opts.params {
            params.push((k, v));
        }
        let mut buf = BytesMut::new();
        frontend::startup_message(params, &mut buf)?;
        self.send_raw(&buf).await?;

        let password = || {
            opts.password
                .as_deref()
                .ok_or_else(|| ConnectError::Auth("server asked for a password".into()))
        };
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            let msg = match self.read_backend().await? {
                Incoming::Known(m) => m,
                Incoming::Raw(tag, body) => {
                    self.startup.messages.push(convert_raw(tag, body));
                    continue;
                }
            };
            let mut out = BytesMut::new();
            match msg {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => {
                    self.auth_method = AuthMethod::Cleartext;
                    frontend::password_message(password()?.as_bytes(), &mut out)?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    self.auth_method = AuthMethod::Md5;
                    let hash = md5_hash(opts.user.as_bytes(), password()?.as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut out)?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    self.auth_method = AuthMethod::ScramSha256;
                    let mechanisms: Vec<String> =
                        body.mechanisms().map(|m| Ok(m.to_string())).collect()?;
                    if !mechanisms.iter().any(|m| m == sasl::SCRAM_SHA_256) {
                        return Err(ConnectError::Auth(format!(
                            "no supported SASL mechanism in {mechanisms:?}"
                        )));
                    }
                    let s = sasl::ScramSha256::new(
                        password()?.as_bytes(),
                        sasl::ChannelBinding::unsupported(),
                    );
                    frontend::sasl_initial_response(sasl::SCRAM_SHA_256, s.message(), &mut out)?;
                    scram = Some(s);
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| ConnectError::Auth("unexpected SASL continue".into()))?;
                    s.update(body.data())?;
                    frontend::sasl_response(s.message(), &mut out)?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| ConnectError::Auth("unexpected SASL final".into()))?;
                    s.finish(body.data())?;
                }
                backend::Message::ErrorResponse(body) => {
                    return Err(ConnectError::Server(Box::new(ErrorInfo::from_fields(
                        body.fields(),
                    )?)));
                }
                backend::Message::BackendKeyData(body) => {
                    self.process_id = body.process_id();
                    self.secret_key = body.secret_key();
                }
                backend::Message::AuthenticationKerberosV5
                | backend::Message::AuthenticationScmCredential
                | backend::Message::AuthenticationGss
                | backend::Message::AuthenticationGssContinue(_)
                | backend::Message::AuthenticationSspi => {
                    return Err(ConnectError::Auth(
                        "unsupported authentication method".into(),
                    ));
                }
                other => {
                    let m = self.convert(other)?;
                    let done = matches!(m, Msg::ReadyForQuery(_));
                    self.startup.messages.push(m);
                    if done {
                        return Ok(());
                    }
                }
            }
            if !out.is_empty() {
                self.send_raw(&out).await?;
            }
        }
    }

    /// The latest value of a ParameterStatus parameter.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sends bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        tokio::time::timeout(self.timeout, self.stream.write_all(bytes))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "write timed out"))??;
        Ok(())
    }

    pub async fn send(&mut self, batch: &Batch) -> io::Result<()> {
        self.send_raw(batch.bytes()).await
    }

    /// Sends Terminate and closes the socket.
    pub async fn terminate(mut self) -> io::Result<()> {
        let mut b = Batch::new();
        b.terminate();
        self.send(&b).await?;
        self.stream.shutdown().await
    }

    async fn read_backend(&mut self) -> io::Result<Incoming> {
        loop {
            if self.rbuf.len() >= 5 && !KNOWN_TAGS.contains(&self.rbuf[0]) {
                // A message postgres_protocol does not decode (FunctionCallResponse,
                // CopyBothResponse, NegotiateProtocolVersion, or garbage).
                let len =
                    u32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]])
                        as usize;
                if len < 4 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("invalid length {len} of message {:?}", self.rbuf[0] as char),
                    ));
                }
                if self.rbuf.len() > len {
                    let msg = self.rbuf.split_to(len + 1).freeze();
                    return Ok(Incoming::Raw(msg[0], msg.slice(5..)));
                }
            } else if let Some(m) = backend::Message::parse(&mut self.rbuf)? {
                return Ok(Incoming::Known(m));
            }
            let n = tokio::time::timeout(self.timeout, self.stream.read_buf(&mut self.rbuf))
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no message from server within {:?}", self.timeout),
                    )
                })??;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                ));
            }
        }
    }

    /// Reads and normalizes one message.
    pub async fn read_message(&mut self) -> io::Result<Msg> {
        match self.read_backend().await? {
            Incoming::Known(m) => self.convert(m),
            Incoming::Raw(tag, body) => Ok(convert_raw(tag, body)),
        }
    }

    /// Reads messages up to and including ReadyForQuery.
    pub async fn read_until_ready(&mut self) -> io::Result<Transcript> {
        self.read_until_ready_copy(None, false).await
    }

    /// Reads messages up to and including the first one that matches `stop`.
    pub async fn read_until(&mut self, stop: impl Fn(&Msg) -> bool) -> io::Result<Transcript> {
        let mut t = Transcript::default();
        loop {
            match self.read_message().await {
                Ok(m) => {
                    let done = stop(&m);
                    t.messages.push(m);
                    if done {
                        return Ok(t);
                    }
                }
                Err(e) => return Err(with_partial(e, &t)),
            }
        }
    }

    /// Reads up to ReadyForQuery, answering a CopyInResponse with `copy_in` (CopyData per
    /// chunk, then CopyDone; CopyFail if `None`), followed by Sync when `sync_after_copy`
    /// (the extended protocol: the Sync sent with the batch is ignored in copy-in mode).
    pub async fn read_until_ready_copy(
        &mut self,
        copy_in: Option<&[Bytes]>,
        sync_after_copy: bool,
    ) -> io::Result<Transcript> {
        let mut t = Transcript::default();
        loop {
            let m = match self.read_message().await {
                Ok(m) => m,
                Err(e) => return Err(with_partial(e, &t)),
            };
            let is_copy_in = matches!(m, Msg::CopyInResponse { .. });
            let done = matches!(m, Msg::ReadyForQuery(_));
            t.messages.push(m);
            if is_copy_in {
                let mut b = Batch::new();
                match copy_in {
                    Some(chunks) => {
                        for c in chunks {
                            b.copy_data(c);
                        }
                        b.copy_done();
                    }
                    None => {
                        b.copy_fail("test sent no COPY data");
                    }
                }
                if sync_after_copy {
                    b.sync();
                }
                if let Err(e) = self.send(&b).await {
                    return Err(with_partial(e, &t));
                }
            }
            if done {
                return Ok(t);
            }
        }
    }

    /// Simple-protocol Query.
    pub async fn simple_query(&mut self, sql: &str) -> io::Result<Transcript> {
        self.simple_query_copy(sql, None).await
    }

    /// Simple-protocol Query whose COPY FROM STDIN (if any) is fed `copy_in`.
    pub async fn simple_query_copy(
        &mut self,
        sql: &str,
        copy_in: Option<&[Bytes]>,
    ) -> io::Result<Transcript> {
        let mut b = Batch::new();
        b.query(sql);
        self.send(&b).await?;
        self.read_until_ready_copy(copy_in, false).await
    }

    /// Unnamed Parse, Bind (text params, one result format), Describe portal, Execute 0,
    /// Sync.
    pub async fn extended_query(
        &mut self,
        sql: &str,
        params: &[Option<&str>],
        result_format: Format,
    ) -> io::Result<Transcript> {
        self.extended_query_copy(sql, params, result_format, None)
            .await
    }

    pub async fn extended_query_copy(
        &mut self,
        sql: &str,
        params: &[Option<&str>],
        result_format: Format,
        copy_in: Option<&[Bytes]>,
    ) -> io::Result<Transcript> {
        let mut b = Batch::new();
        b.parse("", sql, &[])
            .bind("", "", params, result_format)
            .describe_portal("")
            .execute("", 0)
            .sync();
        self.send(&b).await?;
        self.read_until_ready_copy(copy_in, true).await
    }

    fn convert(&mut self, m: backend::Message) -> io::Result<Msg> {
        use backend::Message as B;
        Ok(match m {
            B::RowDescription(body) => {
                let mut fields = Vec::new();
                let mut it = body.fields();
                self.row_types.clear();
                while let Some(fd) = it.next()? {
                    self.row_types.push((fd.type_oid(), fd.format()));
                    fields.push(FieldDesc {
                        name: fd.name().to_string(),
                        table_oid: self.oids.map(fd.table_oid()),
                        column_id: fd.column_id(),
                        type_oid: self.oids.map(fd.type_oid()),
                        type_size: fd.type_size(),
                        typmod: fd.type_modifier(),
                        format: fd.format(),
                    });
                }
                Msg::RowDescription(fields)
            }
            B::DataRow(body) => {
                let buf = body.buffer_bytes().clone();
                let mut values = Vec::new();
                let mut ranges = body.ranges();
                let mut col = 0;
                while let Some(r) = ranges.next()? {
                    let v = r.map(|r| {
                        let raw = buf.slice(r);
                        match self.row_types.get(col) {
                            Some(&(ty, 1)) if needs_oid_normalization(ty) => {
                                match normalize_binary(&mut self.oids, &raw) {
                                    Some(v) => Raw(Bytes::from(v)),
                                    None => Raw(raw),
                                }
                            }
                            _ => Raw(raw),
                        }
                    });
                    values.push(v);
                    col += 1;
                }
                Msg::DataRow(values)
            }
            B::CommandComplete(body) => Msg::CommandComplete(body.tag()?.to_string()),
            B::EmptyQueryResponse => Msg::EmptyQueryResponse,
            B::ErrorResponse(body) => Msg::Error(ErrorInfo::from_fields(body.fields())?),
            B::NoticeResponse(body) => Msg::Notice(ErrorInfo::from_fields(body.fields())?),
            B::ParameterStatus(body) => {
                let name = body.name()?.to_string();
                let value = body.value()?.to_string();
                self.parameters.push((name.clone(), value.clone()));
                Msg::ParameterStatus { name, value }
            }
            B::NotificationResponse(body) => Msg::Notification {
                channel: body.channel()?.to_string(),
                payload: body.message()?.to_string(),
                from_self: body.process_id() == self.process_id,
            },
            B::CopyInResponse(body) => Msg::CopyInResponse {
                format: body.format(),
                columns: body.column_formats().collect()?,
            },
            B::CopyOutResponse(body) => Msg::CopyOutResponse {
                format: body.format(),
                columns: body.column_formats().collect()?,
            },
            B::CopyData(body) => Msg::CopyData(Raw(body.into_bytes())),
            B::CopyDone => Msg::CopyDone,
            B::PortalSuspended => Msg::PortalSuspended,
            B::ParseComplete => Msg::ParseComplete,
            B::BindComplete => Msg::BindComplete,
            B::CloseComplete => Msg::CloseComplete,
            B::NoData => Msg::NoData,
            B::ParameterDescription(body) => {
                let oids: Vec<u32> = body.parameters().collect()?;
                Msg::ParameterDescription(oids.into_iter().map(|o| self.oids.map(o)).collect())
            }
            B::ReadyForQuery(body) => Msg::ReadyForQuery(body.status() as char),
            B::BackendKeyData(body) => Msg::Other(format!(
                "BackendKeyData(pid={} key={})",
                body.process_id(),
                body.secret_key()
            )),
            B::AuthenticationOk => Msg::Other("AuthenticationOk".into()),
            _ => Msg::Other("unexpected authentication message".into()),
        })
    }
}

/// Tags that `backend::Message::parse` decodes.
const KNOWN_TAGS: &[u8] = b"123AcCdDEGHIKnNRsStTZ";

enum Incoming {
    Known(backend::Message),
    /// Tag and body of a message `backend::Message` does not know.
    Raw(u8, Bytes),
}

fn convert_raw(tag: u8, body: Bytes) -> Msg {
    if tag == b'V' && body.len() >= 4 {
        let len = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        if len == -1 && body.len() == 4 {
            return Msg::FunctionCallResponse(None);
        }
        if len >= 0 && body.len() == 4 + len as usize {
            return Msg::FunctionCallResponse(Some(Raw(body.slice(4..))));
        }
    }
    Msg::Unknown {
        tag: tag as char,
        body: Raw(body),
    }
}

fn with_partial(e: io::Error, t: &Transcript) -> io::Error {
    io::Error::new(e.kind(), format!("{e}; received so far: {t:?}"))
}

// ---------------------------------------------------------------------------------------
// OIDs inside binary values
// ---------------------------------------------------------------------------------------

const RECORD_OID: u32 = 2249;
const RECORD_ARRAY_OID: u32 = 2287;

/// Binary values of user types (arrays of user types, composites) and of anonymous
/// records carry type OIDs inside the value.
fn needs_oid_normalization(type_oid: u32) -> bool {
    type_oid >= FIRST_NORMAL_OID || type_oid == RECORD_OID || type_oid == RECORD_ARRAY_OID
}

/// Rewrites the OIDs embedded in a binary array or composite value. Returns `None` when
/// the value has neither shape (enums, ranges, domains over scalars) or nothing changed.
fn normalize_binary(oids: &mut OidMap, data: &[u8]) -> Option<Vec<u8>> {
    let out = normalize_array(oids, data).or_else(|| normalize_composite(oids, data))?;
    (out != data).then_some(out)
}

fn be_i32(b: &[u8], at: usize) -> Option<i32> {
    b.get(at..at + 4)
        .map(|s| i32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Appends one element (array item or composite field) of type `elem_type`, normalized.
fn normalize_element(oids: &mut OidMap, elem_type: u32, data: &[u8], out: &mut Vec<u8>) {
    if needs_oid_normalization(elem_type) {
        if let Some(v) = normalize_binary(oids, data) {
            out.extend_from_slice(&v);
            return;
        }
    }
    out.extend_from_slice(data);
}

fn normalize_array(oids: &mut OidMap, data: &[u8]) -> Option<Vec<u8>> {
    let ndim = be_i32(data, 0)?;
    let flags = be_i32(data, 4)?;
    let elem = be_i32(data, 8)? as u32;
    if !(0..=6).contains(&ndim) || !(flags == 0 || flags == 1) || elem == 0 {
        return None;
    }
    let mut at = 12;
    let mut count: i64 = if ndim == 0 { 0 } else { 1 };
    for _ in 0..ndim {
        let len = be_i32(data, at)?;
        be_i32(data, at + 4)?;
        if len < 0 {
            return None;
        }
        count = count.checked_mul(len as i64)?;
        at += 8;
    }
    // Validate the element layout before rewriting anything.
    let mut items = Vec::new();
    let mut pos = at;
    for _ in 0..count {
        let len = be_i32(data, pos)?;
        pos += 4;
        if len == -1 {
            items.push(None);
        } else if len < 0 {
            return None;
        } else {
            let end = pos.checked_add(len as usize)?;
            if end > data.len() {
                return None;
            }
            items.push(Some((pos, end)));
            pos = end;
        }
    }
    if pos != data.len() {
        return None;
    }
    let mut out = Vec::with_capacity(data.len());
    out.extend_from_slice(&data[..8]);
    out.extend_from_slice(&oids.map(elem).encoded().to_be_bytes());
    out.extend_from_slice(&data[12..at]);
    for item in items {
        match item {
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            Some((s, e)) => {
                let mut v = Vec::new();
                normalize_element(oids, elem, &data[s..e], &mut v);
                out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                out.extend_from_slice(&v);
            }
        }
    }
    Some(out)
}

fn normalize_composite(oids: &mut OidMap, data: &[u8]) -> Option<Vec<u8>> {
    let count = be_i32(data, 0)?;
    if !(0..=1664).contains(&count) {
        return None;
    }
    let mut items = Vec::new();
    let mut pos = 4;
    for _ in 0..count {
        let oid = be_i32(data, pos)? as u32;
        let len = be_i32(data, pos + 4)?;
        pos += 8;
        if oid == 0 {
            return None;
        }
        if len == -1 {
            items.push((oid, None));
        } else if len < 0 {
            return None;
        } else {
            let end = pos.checked_add(len as usize)?;
            if end > data.len() {
                return None;
            }
            items.push((oid, Some((pos, end))));
            pos = end;
        }
    }
    if pos != data.len() {
        return None;
    }
    let mut out = Vec::with_capacity(data.len());
    out.extend_from_slice(&data[..4]);
    for (oid, item) in items {
        out.extend_from_slice(&oids.map(oid).encoded().to_be_bytes());
        match item {
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            Some((s, e)) => {
                let mut v = Vec::new();
                normalize_element(oids, oid, &data[s..e], &mut v);
                out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                out.extend_from_slice(&v);
            }
        }
    }
    Some(out)
}
