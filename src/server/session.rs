//! One client session: TLS negotiation, startup, authentication, the backend login with the
//! client's startup parameters, and then the relay until the client leaves.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use pgwire::api::auth::{
    protocol_negotiation, save_startup_parameters_to_metadata, AuthDriver, AuthOutcome,
    DefaultServerParameterProvider,
};
use pgwire::api::ClientInfo;
use pgwire::error::{ErrorInfo, PgWireError};
use pgwire::messages::startup::{Authentication, SecretKey, Startup};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use pgwire::tokio::server::{negotiate_tls, MaybeTls, PgWireMessageServerCodec};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use tracing::{debug, warn, Instrument};

use super::ServerContext;
use crate::backends::connect;
use crate::backends::session_pool::{IdleBackend, PoolKey};
use crate::config::TlsMode;
use crate::metrics as m;
use crate::protocol::{self, ErrorFields};
use crate::relay::{self, SessionState};

/// Time a client has to finish TLS, startup and authentication (PostgreSQL's
/// `authentication_timeout` default).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

type ClientFramed = Framed<MaybeTls, PgWireMessageServerCodec<()>>;

/// Decrements the client count when a session ends.
struct ClientSlot<'a>(&'a ServerContext);

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.client_connections.decrement(1.0);
    }
}

/// Runs one client connection to its end. `span` (session id and peer) is entered while
/// the session starts and ends, and by the relay only around its own events (see
/// [`relay::relay`]).
pub async fn run(
    ctx: Arc<ServerContext>,
    socket: TcpStream,
    session_id: u64,
    thread: usize,
    span: tracing::Span,
) {
    ctx.metrics.client_connections_total.increment(1);
    let acceptor = ctx.tls.as_ref().map(|t| t.acceptor.clone());
    // boxed, as are the reset below and a fan-out in the relay: the session task stays
    // small while it relays (it is copied when spawned)
    let startup = tokio::time::timeout(
        STARTUP_TIMEOUT,
        Box::pin(async {
            let framed = negotiate_tls::<()>(socket, acceptor).await.ok()??;
            startup(&ctx, framed, thread).await
        })
        .instrument(span.clone()),
    )
    .await;
    let Ok(Some(ready)) = startup else {
        return;
    };
    let Established {
        framed,
        mut backend,
        pool_key,
        slot,
        login,
    } = ready;
    let _slot = slot;

    let backend_cancel = backend.cancel_target();
    let (client_secret, cancel_signal, _cancel_guard) = ctx.cancel.register(backend_cancel.clone());

    // The rest of the startup comes from the backend: its ParameterStatus values, its PID
    // with our secret, and its ReadyForQuery.
    let mut hello = BytesMut::with_capacity(backend.startup_messages.len() + 32);
    hello.extend_from_slice(&backend.startup_messages);
    protocol::put_backend_key_data(&mut hello, backend.pid, client_secret);
    protocol::put_ready_for_query(&mut hello, backend.status);

    let parts = framed.into_parts();
    let mut client = parts.io;
    if client.write_all(&hello).await.is_err() || client.flush().await.is_err() {
        return;
    }
    let mut state = SessionState {
        status: backend.status,
        parameters: backend.parameters.iter().cloned().collect(),
    };
    span.in_scope(|| debug!(backend_pid = backend.pid, "session started"));
    let (end, reusable) = relay::relay(
        session_id,
        &span,
        client,
        parts.read_buf,
        backend.stream,
        std::mem::take(&mut backend.pending),
        &backend_cancel,
        &mut state,
        ctx.metrics.session.thread(thread),
        ctx.config.fanout.enabled.then_some(relay::FanoutSession {
            env: &ctx.fanout,
            login,
            cancel: cancel_signal,
        }),
    )
    .await;
    span.in_scope(|| debug!(?end, reused = reusable.is_some(), "session ended"));
    if let (Some(stream), true) = (reusable, ctx.config.reuse_backend_connections) {
        // ParameterStatus values as the session left them; DISCARD ALL reports the resets
        let parameters = backend
            .parameters
            .iter()
            .map(|(name, value)| {
                let now = state.parameters.get(name).unwrap_or(value);
                (name.clone(), now.clone())
            })
            .collect();
        let idle = IdleBackend {
            stream,
            addr: backend.addr,
            pid: backend.pid,
            secret: backend.secret,
            parameters,
        };
        Box::pin(ctx.session_pool(thread).reset_and_park(pool_key, idle))
            .instrument(span)
            .await;
        record_parked(&ctx);
    }
}

/// Publishes the number of parked connections.
pub fn record_parked(ctx: &ServerContext) {
    ctx.metrics
        .backends_pooled
        .set(ctx.session_pools.iter().map(|p| p.parked()).sum::<usize>() as f64);
}

/// A client that passed startup and authentication, with its backend logged in.
struct Established<'a> {
    framed: ClientFramed,
    backend: connect::BackendConnection,
    pool_key: PoolKey,
    slot: ClientSlot<'a>,
    /// (user, database) the session logged in as, for fragment connections.
    login: (String, String),
}

async fn send_error(framed: &mut ClientFramed, error: ErrorFields) {
    let _ = framed.get_mut().write_all(&error.to_bytes()).await;
    let _ = framed.get_mut().flush().await;
}

/// Startup message, limits, authentication and backend login.
async fn startup(
    ctx: &ServerContext,
    framed: ClientFramed,
    thread: usize,
) -> Option<Established<'_>> {
    let mut framed = match check_startup_packet(framed).await {
        Ok(f) => f,
        Err((mut framed, error)) => {
            send_error(&mut framed, error).await;
            return None;
        }
    };
    let message = match framed.next().await {
        Some(Ok(m)) => m,
        Some(Err(e)) => {
            debug!(error = %e, "bad startup packet");
            send_error(
                &mut framed,
                ErrorFields::fatal("08P01", "invalid startup packet"),
            )
            .await;
            return None;
        }
        None => return None,
    };
    let startup = match message {
        PgWireFrontendMessage::Startup(s) => s,
        PgWireFrontendMessage::CancelRequest(c) => {
            let secret = match &c.secret_key {
                SecretKey::I32(s) => s.to_be_bytes().to_vec(),
                SecretKey::Bytes(b) => b.to_vec(),
            };
            match ctx.cancel.lookup(c.pid, &secret) {
                Some(session) => {
                    debug!(pid = c.pid, "forwarding cancel request");
                    session.signal.raise();
                    if let Err(e) = session.target.cancel().await {
                        warn!(error = %e, "cancel forward failed");
                    }
                }
                None => debug!(pid = c.pid, "cancel request for unknown key ignored"),
            }
            return None;
        }
        other => {
            debug!(?other, "unexpected first message");
            send_error(
                &mut framed,
                ErrorFields::fatal("08P01", "invalid startup packet"),
            )
            .await;
            return None;
        }
    };

    if ctx.config.tls.mode == TlsMode::Require && !framed.is_secure() {
        metrics::counter!(m::CLIENT_CONNECTIONS_REJECTED, "reason" => "tls").increment(1);
        send_error(
            &mut framed,
            ErrorFields::fatal(
                "28000",
                "SSL connection is required by pgfan (tls.mode = require)",
            ),
        )
        .await;
        return None;
    }

    let slot = {
        let n = ctx.clients.fetch_add(1, Ordering::Relaxed) + 1;
        ctx.metrics.client_connections.increment(1.0);
        let slot = ClientSlot(ctx);
        if n > ctx.config.max_client_connections {
            metrics::counter!(m::CLIENT_CONNECTIONS_REJECTED, "reason" => "limit").increment(1);
            send_error(
                &mut framed,
                ErrorFields::fatal("53300", "sorry, too many clients already"),
            )
            .await;
            return None;
        }
        slot
    };

    if let Err(e) = protocol_negotiation(&mut framed, &startup).await {
        send_error(&mut framed, ErrorFields::fatal("08P01", e.to_string())).await;
        return None;
    }
    save_startup_parameters_to_metadata(&mut framed, &startup);
    let Some(user) = startup.parameters.get("user").cloned() else {
        send_error(
            &mut framed,
            ErrorFields::fatal(
                "28000",
                "no PostgreSQL user name specified in startup packet",
            ),
        )
        .await;
        return None;
    };

    if !authenticate(ctx, &mut framed, &user).await {
        metrics::counter!(m::CLIENT_CONNECTIONS_REJECTED, "reason" => "auth").increment(1);
        return None;
    }

    let (pool_key, params, password) = backend_login_params(ctx, &startup, &user);
    let reused = if ctx.config.reuse_backend_connections {
        ctx.checkout_backend(thread, &pool_key)
    } else {
        None
    };
    if reused.is_some() {
        record_parked(ctx);
    }
    let login = match reused {
        Some(conn) => Ok(conn),
        None => connect::connect(&ctx.config.primary().url, &params, password.as_deref()).await,
    };
    let backend = match login {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, "backend login failed");
            let _ = framed.get_mut().write_all(&e.to_error_response()).await;
            let _ = framed.get_mut().flush().await;
            return None;
        }
    };
    let database = startup
        .parameters
        .get("database")
        .cloned()
        .unwrap_or_else(|| user.clone());
    Some(Established {
        framed,
        backend,
        pool_key,
        slot,
        login: (user, database),
    })
}

/// PostgreSQL's own checks of the raw startup packet that pgwire's decoder does not make:
/// the protocol major version and the terminating NUL of the parameter list. Returns the
/// Framed rebuilt around the bytes read here (a Framed decodes bytes added to its buffer
/// from outside only after `from_parts`).
async fn check_startup_packet(
    mut framed: ClientFramed,
) -> Result<ClientFramed, (ClientFramed, ErrorFields)> {
    let verdict = startup_packet_error(&mut framed).await;
    let framed = Framed::from_parts(framed.into_parts());
    match verdict {
        None => Ok(framed),
        Some(e) => Err((framed, e)),
    }
}

async fn startup_packet_error(framed: &mut ClientFramed) -> Option<ErrorFields> {
    loop {
        let buf = framed.read_buffer();
        if buf.len() >= 8 {
            let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let code = i32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
            if !(8..=10_000).contains(&len) || code == protocol::CANCEL_REQUEST_CODE {
                return None; // pgwire rejects bad lengths and decodes cancels
            }
            let (major, minor) = (code >> 16, code & 0xffff);
            if major != 3 {
                return Some(ErrorFields::fatal(
                    "0A000",
                    format!(
                        "unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"
                    ),
                ));
            }
            if buf.len() >= len as usize {
                if buf[len as usize - 1] != 0 {
                    return Some(ErrorFields::fatal(
                        "08P01",
                        "invalid startup packet layout: expected terminator as last byte",
                    ));
                }
                return None;
            }
        }
        let mut chunk = [0u8; 1024];
        match tokio::io::AsyncReadExt::read(framed.get_mut(), &mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => framed.read_buffer_mut().extend_from_slice(&chunk[..n]),
        }
    }
}

/// Runs the configured authentication exchange and sends AuthenticationOk.
async fn authenticate(ctx: &ServerContext, framed: &mut ClientFramed, user: &str) -> bool {
    let driver: AuthDriver<DefaultServerParameterProvider> =
        AuthDriver::new(DefaultServerParameterProvider::default());
    if let Some(mechanism) = ctx.auth.mechanism(framed.is_secure(), user) {
        let mut outcome = driver.begin_authentication(framed, mechanism).await;
        loop {
            match outcome {
                Ok(AuthOutcome::InProgress) => {}
                Ok(AuthOutcome::Authenticated { final_message, .. }) => {
                    if let Some(msg) = final_message {
                        if framed
                            .send(PgWireBackendMessage::Authentication(msg))
                            .await
                            .is_err()
                        {
                            return false;
                        }
                    }
                    break;
                }
                Err(e) => {
                    debug!(error = %e, method = ?ctx.auth.method(), "authentication failed");
                    send_error(framed, auth_error(e, user)).await;
                    return false;
                }
            }
            let message = match framed.next().await {
                Some(Ok(PgWireFrontendMessage::PasswordMessageFamily(p))) => p,
                // the client hung up (psql does this once to ask for a password)
                None => return false,
                Some(Ok(_)) | Some(Err(_)) => {
                    send_error(
                        framed,
                        ErrorFields::fatal("08P01", "expected a password message"),
                    )
                    .await;
                    return false;
                }
            };
            outcome = driver.advance_authentication(framed, message).await;
        }
    }
    framed
        .send(PgWireBackendMessage::Authentication(Authentication::Ok))
        .await
        .is_ok()
}

/// PostgreSQL's wording for a failed login.
fn auth_error(e: PgWireError, user: &str) -> ErrorFields {
    let info = ErrorInfo::from(e);
    let code = match info.code.as_str() {
        "28P01" => "28P01",
        "08P01" => "08P01",
        _ => "28000",
    };
    let message = if code == "28P01" {
        format!("password authentication failed for user \"{user}\"")
    } else {
        info.message
    };
    ErrorFields::fatal(code, message)
}

/// The startup parameters, pool key and password for the primary login: the client's
/// parameters, with user and database replaced when the backend URL fixes them.
fn backend_login_params(
    ctx: &ServerContext,
    startup: &Startup,
    user: &str,
) -> (PoolKey, Vec<(String, String)>, Option<String>) {
    let primary = ctx.config.primary();
    let url = &primary.url;
    let mut params: Vec<(String, String)> = startup
        .parameters
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(u) = &url.user {
        set_param(&mut params, "user", u);
    }
    if let Some(d) = &url.database {
        set_param(&mut params, "database", d);
    }
    let backend_user = url.user.as_deref().unwrap_or(user);
    let password = url.password.clone().or_else(|| {
        ctx.config
            .user(backend_user)
            .and_then(|u| u.password.clone())
    });
    let mut sorted = params.clone();
    sorted.sort();
    ((primary.name.clone(), sorted), params, password)
}

fn set_param(params: &mut Vec<(String, String)>, key: &str, value: &str) {
    match params.iter_mut().find(|(k, _)| k == key) {
        Some(p) => p.1 = value.to_string(),
        None => params.push((key.to_string(), value.to_string())),
    }
}
