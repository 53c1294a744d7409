//! Opening one backend connection: TCP (optionally TLS) or a Unix-domain socket, StartupMessage with the client's
//! parameters, password/md5/SCRAM login, and the server's ParameterStatus and
//! BackendKeyData up to the first ReadyForQuery.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use pgwire::tokio::tokio_rustls::rustls;
use pgwire::tokio::tokio_rustls::{client::TlsStream, TlsConnector};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::config::{BackendSslMode, BackendUrl};
use crate::protocol::{self, ErrorFields};

/// How long opening a backend connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a backend connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP, the Unix-domain socket or TLS failed.
    #[error("could not connect to backend {addr}: {source}")]
    Io {
        /// `host:port` or the socket's path.
        addr: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The server answered with an ErrorResponse (kept raw so it can be relayed as is).
    #[error("backend refused the connection: {message}")]
    Server {
        /// The raw ErrorResponse message.
        raw: BytesMut,
        /// Its message text, for logs.
        message: String,
    },
    /// The server asked for something pgfan cannot provide.
    #[error("{0}")]
    Auth(String),
    /// The server sent something that is not the protocol.
    #[error("protocol violation from backend: {0}")]
    Protocol(String),
}

impl BackendConnection {
    /// The CancelRequest target of this connection.
    pub fn cancel_target(&self) -> CancelTarget {
        CancelTarget {
            addr: self.addr.clone(),
            pid: self.pid,
            secret: self.secret.clone(),
        }
    }
}

impl ConnectError {
    /// The ErrorResponse a client should see for this failure.
    pub fn to_error_response(&self) -> BytesMut {
        match self {
            ConnectError::Server { raw, .. } => raw.clone(),
            ConnectError::Io { .. } => ErrorFields::fatal("08001", self.to_string()).to_bytes(),
            ConnectError::Auth(m) => ErrorFields::fatal("28000", m.clone()).to_bytes(),
            ConnectError::Protocol(_) => ErrorFields::fatal("08P01", self.to_string()).to_bytes(),
        }
    }
}

/// A backend socket: TCP, TLS over TCP, or a Unix-domain socket.
pub enum BackendStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
    /// A Unix-domain socket (a server on the same machine).
    Unix(UnixStream),
}

/// Where a backend server was reached: its CancelRequests go to the same place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// The path of a Unix-domain socket.
    Unix(PathBuf),
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendAddr::Tcp(a) => a.fmt(f),
            BackendAddr::Unix(p) => p.display().fmt(f),
        }
    }
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            BackendStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            BackendStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_flush(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            BackendStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            BackendStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Where a CancelRequest for one backend connection goes.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    /// Where the server was reached.
    pub addr: BackendAddr,
    /// Backend process id.
    pub pid: i32,
    /// The backend's own cancel secret.
    pub secret: Vec<u8>,
}

impl CancelTarget {
    /// Sends the CancelRequest (best effort: the server answers nothing).
    pub async fn cancel(&self) -> io::Result<()> {
        send_cancel(&self.addr, self.pid, &self.secret).await
    }
}

/// A logged-in backend connection, ready for queries.
pub struct BackendConnection {
    /// The socket.
    pub stream: BackendStream,
    /// Where the server was reached, for CancelRequests.
    pub addr: BackendAddr,
    /// The backend's process id.
    pub pid: i32,
    /// The backend's cancel secret.
    pub secret: Vec<u8>,
    /// ParameterStatus (and NoticeResponse) messages of the startup, raw, in order.
    pub startup_messages: BytesMut,
    /// ParameterStatus values of the startup.
    pub parameters: Vec<(String, String)>,
    /// ReadyForQuery status of the first ReadyForQuery.
    pub status: u8,
    /// Bytes read past the first ReadyForQuery (normally none).
    pub pending: BytesMut,
}

impl BackendConnection {
    /// The same connection with its socket registered with the current thread's runtime,
    /// so that its reads wake this thread's event loop and not the one of the thread that
    /// parked it (a wakeup of another thread on every reply otherwise). A TLS stream keeps
    /// its registration; `None` when the socket cannot be moved (it is closed).
    pub fn rehomed(self) -> Option<Self> {
        let stream = match self.stream {
            BackendStream::Plain(s) => {
                BackendStream::Plain(TcpStream::from_std(s.into_std().ok()?).ok()?)
            }
            BackendStream::Unix(s) => {
                BackendStream::Unix(UnixStream::from_std(s.into_std().ok()?).ok()?)
            }
            tls => tls,
        };
        Some(BackendConnection { stream, ..self })
    }
}

/// Opens a connection and logs in with `params` (user, database, options, …).
pub async fn connect(
    url: &BackendUrl,
    params: &[(String, String)],
    password: Option<&str>,
) -> Result<BackendConnection, ConnectError> {
    tokio::time::timeout(CONNECT_TIMEOUT, connect_inner(url, params, password))
        .await
        .unwrap_or_else(|_| {
            Err(ConnectError::Io {
                addr: url.address(),
                source: io::Error::new(io::ErrorKind::TimedOut, "timeout"),
            })
        })
}

async fn connect_inner(
    url: &BackendUrl,
    params: &[(String, String)],
    password: Option<&str>,
) -> Result<BackendConnection, ConnectError> {
    let io_err = |source| ConnectError::Io {
        addr: url.address(),
        source,
    };
    let (addr, mut stream) = if let Some(path) = url.unix_socket() {
        // libpq does not negotiate TLS on a Unix-domain socket either, whatever sslmode
        let unix = UnixStream::connect(&path).await.map_err(io_err)?;
        (BackendAddr::Unix(path), BackendStream::Unix(unix))
    } else {
        let tcp = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(io_err)?;
        tcp.set_nodelay(true).map_err(io_err)?;
        let addr = BackendAddr::Tcp(tcp.peer_addr().map_err(io_err)?);
        let stream = match url.sslmode {
            BackendSslMode::Disable => BackendStream::Plain(tcp),
            mode => negotiate_tls(tcp, &url.host, mode == BackendSslMode::Require)
                .await
                .map_err(io_err)?,
        };
        (addr, stream)
    };

    let mut out = BytesMut::new();
    let pairs = params.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    frontend::startup_message(pairs, &mut out).map_err(io_err)?;
    stream.write_all(&out).await.map_err(io_err)?;

    let user = params
        .iter()
        .find(|(k, _)| k == "user")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    let mut reader = MessageReader::default();
    let mut scram: Option<ScramSha256> = None;
    let need_password = || {
        password.ok_or_else(|| {
            ConnectError::Auth(format!(
                "backend {} asks a password for user \"{user}\", but pgfan has none (set it in [[users]] or the backend URL)",
                url.address()
            ))
        })
    };
    let mut conn = BackendConnection {
        stream,
        addr,
        pid: 0,
        secret: Vec::new(),
        startup_messages: BytesMut::new(),
        parameters: Vec::new(),
        status: b'I',
        pending: BytesMut::new(),
    };
    loop {
        let (tag, mut body) = reader.next(&mut conn.stream).await.map_err(io_err)?;
        match tag {
            b'R' => {
                if body.len() < 4 {
                    return Err(ConnectError::Protocol(
                        "short authentication request".into(),
                    ));
                }
                let code = body.get_i32();
                let mut reply = BytesMut::new();
                match code {
                    0 => continue,
                    3 => {
                        let p = need_password()?;
                        frontend::password_message(p.as_bytes(), &mut reply).map_err(io_err)?;
                    }
                    5 => {
                        let p = need_password()?;
                        if body.len() < 4 {
                            return Err(ConnectError::Protocol("short md5 salt".into()));
                        }
                        let salt = [body[0], body[1], body[2], body[3]];
                        let hash = postgres_protocol::authentication::md5_hash(
                            user.as_bytes(),
                            p.as_bytes(),
                            salt,
                        );
                        frontend::password_message(hash.as_bytes(), &mut reply)
                            .map_err(io_err)?;
                    }
                    10 => {
                        let p = need_password()?;
                        let offers_scram = protocol::cstrings(&body).any(|m| m == b"SCRAM-SHA-256");
                        if !offers_scram {
                            return Err(ConnectError::Auth(
                                "backend offers no SASL mechanism pgfan supports".into(),
                            ));
                        }
                        let s = ScramSha256::new(p.as_bytes(), ChannelBinding::unsupported());
                        frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut reply)
                            .map_err(io_err)?;
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram.as_mut().ok_or_else(|| {
                            ConnectError::Protocol("SASL continue without SASL".into())
                        })?;
                        s.update(&body).map_err(|e| ConnectError::Auth(e.to_string()))?;
                        frontend::sasl_response(s.message(), &mut reply).map_err(io_err)?;
                    }
                    12 => {
                        let mut s = scram.take().ok_or_else(|| {
                            ConnectError::Protocol("SASL final without SASL".into())
                        })?;
                        s.finish(&body)
                            .map_err(|e| ConnectError::Auth(format!("backend SCRAM: {e}")))?;
                        continue;
                    }
                    other => {
                        return Err(ConnectError::Auth(format!(
                            "backend asks for authentication method {other}, which pgfan does not support"
                        )))
                    }
                }
                conn.stream.write_all(&reply).await.map_err(io_err)?;
            }
            b'S' => {
                conn.parameters.extend(protocol::parameter_status(&body));
                protocol::put_message(&mut conn.startup_messages, tag, &body);
            }
            b'N' => protocol::put_message(&mut conn.startup_messages, tag, &body),
            b'K' => {
                if body.len() < 8 {
                    return Err(ConnectError::Protocol("short BackendKeyData".into()));
                }
                conn.pid = body.get_i32();
                conn.secret = body.to_vec();
            }
            b'E' => {
                let mut raw = BytesMut::new();
                protocol::put_message(&mut raw, tag, &body);
                let (_, message) = protocol::error_code_and_message(&body);
                return Err(ConnectError::Server {
                    raw,
                    message: message.unwrap_or_default(),
                });
            }
            b'Z' => {
                conn.status = body.first().copied().unwrap_or(b'I');
                conn.pending = reader.buf;
                return Ok(conn);
            }
            b'v' => {} // NegotiateProtocolVersion: we asked 3.0, which every server speaks
            other => {
                return Err(ConnectError::Protocol(format!(
                    "unexpected message \"{}\" during startup",
                    other as char
                )))
            }
        }
    }
}

/// Reads whole messages during startup (small ones only).
#[derive(Default)]
pub(crate) struct MessageReader {
    pub(crate) buf: BytesMut,
}

impl MessageReader {
    /// Reads the next whole message: type byte and body.
    pub(crate) async fn next(&mut self, stream: &mut BackendStream) -> io::Result<(u8, BytesMut)> {
        protocol::read_message(stream, &mut self.buf).await
    }
}

async fn negotiate_tls(
    mut tcp: TcpStream,
    host: &str,
    required: bool,
) -> io::Result<BackendStream> {
    // SSLRequest: length 8, code 80877103
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        if required {
            return Err(io::Error::other(
                "server does not support SSL, but sslmode=require",
            ));
        }
        return Ok(BackendStream::Plain(tcp));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert::default()))
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    Ok(BackendStream::Tls(Box::new(tls)))
}

/// libpq's `sslmode=require`: encrypt, but do not verify the certificate.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl Default for AcceptAnyCert {
    fn default() -> Self {
        Self(Arc::new(rustls::crypto::ring::default_provider()))
    }
}

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Sends a CancelRequest for backend `pid` to `addr` (best effort).
async fn send_cancel(addr: &BackendAddr, pid: i32, secret: &[u8]) -> io::Result<()> {
    let timed_out = |_| io::Error::new(io::ErrorKind::TimedOut, "cancel connect timeout");
    let mut stream = match addr {
        BackendAddr::Tcp(a) => BackendStream::Plain(
            tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(a))
                .await
                .map_err(timed_out)??,
        ),
        BackendAddr::Unix(p) => BackendStream::Unix(
            tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(p))
                .await
                .map_err(timed_out)??,
        ),
    };
    stream
        .write_all(&protocol::cancel_request(pid, secret))
        .await?;
    // the server closes the socket when it has processed the request
    let mut sink = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut sink)).await;
    Ok(())
}
