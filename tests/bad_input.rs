//! Malformed client input (DESIGN.md invariant 5; issue 2, "Tests", "Bad input").
//!
//! Raw TCP clients send garbage, absurd lengths and truncated messages. Each must get an
//! ErrorResponse (SQLSTATE 08P01 where one is sent) followed by a closed socket, or just a
//! closed socket, within a bounded time: no hang. A witness client connected before the
//! abuse runs a query before and after every case, a brand-new client must still be
//! served, and the pgfan process must still be alive.
//!
//! Run: `cargo test --test bad_input`.

mod common;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::wire::{Msg, WireClient};
use common::Pgfan;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long pgfan may take to answer or close after the abuse.
const LIMIT: Duration = Duration::from_secs(5);

const PROTOCOL_3_0: i32 = 196_608;
const SSL_REQUEST_CODE: i32 = 80_877_103;

/// Deterministic pseudo-random bytes (xorshift64*), so a failure reproduces.
fn garbage(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// A well-formed startup packet for user/database postgres.
fn startup_packet() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
    for s in ["user", "postgres", "database", "postgres", ""] {
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    let mut p = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    p
}

/// What pgfan did after the abuse.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The socket was closed without an ErrorResponse.
    Closed,
    /// An ErrorResponse with this SQLSTATE and message, then the socket was closed.
    Error { code: String, message: String },
}

fn error_fields(body: &backend::ErrorResponseBody) -> (String, String) {
    let mut code = String::new();
    let mut message = String::new();
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        match f.type_() {
            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            _ => {}
        }
    }
    (code, message)
}

/// Reads what pgfan sends on `s` until it closes the socket, within [`LIMIT`]. `buf` may
/// hold bytes already read.
async fn outcome(s: &mut TcpStream, mut buf: BytesMut, what: &str, pgfan: &Pgfan) -> Outcome {
    let deadline = Instant::now() + LIMIT;
    let mut error: Option<(String, String)> = None;
    loop {
        // Decode whatever complete messages we have.
        loop {
            match backend::Message::parse(&mut buf) {
                Ok(Some(backend::Message::ErrorResponse(body))) => {
                    if error.is_none() {
                        error = Some(error_fields(&body));
                    }
                }
                Ok(Some(backend::Message::NoticeResponse(_))) => {}
                Ok(Some(_)) => panic!("{what}: pgfan answered with a non-error message"),
                Ok(None) => break,
                Err(e) => panic!("{what}: pgfan sent undecodable bytes: {e}"),
            }
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let read = tokio::time::timeout(remaining, s.read_buf(&mut buf)).await;
        let closed = match read {
            Err(_) => panic!(
                "{what}: pgfan neither closed the socket nor finished within {LIMIT:?} \
                 (error so far: {error:?}, undecoded bytes: {:?})\npgfan log:\n{}",
                &buf[..],
                pgfan.log_tail()
            ),
            Ok(Ok(0)) => true,
            Ok(Ok(_)) => false,
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                true
            }
            Ok(Err(e)) => panic!("{what}: read error {e}"),
        };
        if closed {
            if !buf.is_empty() {
                if let Ok(Some(backend::Message::ErrorResponse(body))) =
                    backend::Message::parse(&mut buf)
                {
                    error.get_or_insert_with(|| error_fields(&body));
                }
            }
            return match error {
                Some((code, message)) => Outcome::Error { code, message },
                None => Outcome::Closed,
            };
        }
    }
}

/// Asserts the outcome is a closed socket, or an ErrorResponse with one of `codes` (then
/// closed).
fn assert_rejected(o: &Outcome, codes: &[&str], what: &str) {
    match o {
        Outcome::Closed => {}
        Outcome::Error { code, message } => assert!(
            codes.contains(&code.as_str()),
            "{what}: ErrorResponse with SQLSTATE {code} ({message:?}), expected one of {codes:?}"
        ),
    }
    eprintln!("{what}: {o:?}");
}

async fn raw_connect(pgfan: &Pgfan) -> TcpStream {
    let s = TcpStream::connect(pgfan.addr())
        .await
        .expect("connect to pgfan");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// Sends `bytes` on a fresh raw connection and returns the outcome.
async fn send_raw(pgfan: &Pgfan, bytes: &[u8], half_close: bool, what: &str) -> Outcome {
    let mut s = raw_connect(pgfan).await;
    // pgfan may close (and reset) while we are still writing: that is a valid answer.
    let _ = s.write_all(bytes).await;
    if half_close {
        let _ = s.shutdown().await;
    }
    outcome(&mut s, BytesMut::new(), what, pgfan).await
}

/// Asserts that the witness, a new client and the process are all fine.
async fn assert_healthy(pgfan: &mut Pgfan, witness: &mut WireClient, what: &str) {
    assert!(
        pgfan.is_running(),
        "{what}: pgfan exited; log:\n{}",
        pgfan.log_tail()
    );
    let t = witness
        .simple_query("select 'witness ok'")
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{what}: the witness session broke: {e}\npgfan log:\n{}",
                pgfan.log_tail()
            )
        });
    assert_eq!(t.error_code(), None, "{what}: {t:?}");
    assert_eq!(t.data_rows().len(), 1, "{what}: {t:?}");
    assert_eq!(t.status(), Some('I'));
    let mut fresh = WireClient::connect(&pgfan.addr(), "postgres", "postgres")
        .await
        .unwrap_or_else(|e| panic!("{what}: a new client cannot connect: {e}"));
    let t = fresh
        .simple_query("select 2")
        .await
        .expect("new client query");
    assert_eq!(t.error_code(), None, "{what}: {t:?}");
    fresh.terminate().await.expect("terminate");
}

/// Starts pgfan and a witness that has run one query.
async fn setup() -> (Pgfan, WireClient) {
    let mut pgfan = Pgfan::start(&[]);
    let mut witness = WireClient::connect(&pgfan.addr(), "postgres", "postgres")
        .await
        .expect("witness connects");
    witness.timeout = Duration::from_secs(10);
    assert_healthy(&mut pgfan, &mut witness, "before any abuse").await;
    (pgfan, witness)
}

// ---------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------

/// (a) garbage as a startup packet.
async fn case_garbage_startup(pgfan: &mut Pgfan, witness: &mut WireClient) {
    for seed in [1u64, 2, 3, 42, 1234] {
        // Pure garbage: the length word is random too.
        let mut g = garbage(seed, 256);
        g[0] |= 0x10; // the length word is > 10000 (an over-long startup packet)
        let what = format!("(a) 256 random bytes, seed {seed}");
        let o = send_raw(pgfan, &g, false, &what).await;
        assert_rejected(&o, &["08P01"], &what);
        assert_healthy(pgfan, witness, &what).await;

        // A correctly framed packet whose body (protocol code, parameters) is garbage.
        // PostgreSQL answers an unknown protocol version with 0A000.
        let mut p = 200i32.to_be_bytes().to_vec();
        let mut body = garbage(seed ^ 0xdead, 196);
        body[0] = 0x7f; // never a special request code or protocol 3.x
        p.extend_from_slice(&body);
        let what = format!("(a) framed startup packet with a random body, seed {seed}");
        let o = send_raw(pgfan, &p, false, &what).await;
        assert_rejected(&o, &["08P01", "0A000"], &what);
        assert_healthy(pgfan, witness, &what).await;
    }
}

/// (a) protocol 3.0 with garbage parameters (no NUL terminators). PostgreSQL answers
/// 08P01 "invalid startup packet layout: expected terminator as last byte".
async fn case_unterminated_startup_parameters(pgfan: &mut Pgfan, witness: &mut WireClient) {
    let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
    body.extend(garbage(77, 120).into_iter().map(|b| b | 1));
    let mut p = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    let what = "(a) protocol 3.0 startup with unterminated garbage parameters";
    let o = send_raw(pgfan, &p, false, what).await;
    assert_rejected(&o, &["08P01"], what);
    assert_healthy(pgfan, witness, what).await;
}

/// (b) a startup packet whose length is 2^31 (and neighbours).
async fn case_huge_startup_length(pgfan: &mut Pgfan, witness: &mut WireClient) {
    for len in [0x8000_0000u32, 0x7fff_ffff, 0xffff_ffff, 0x0001_0000, 0, 3] {
        let mut p = len.to_be_bytes().to_vec();
        p.extend_from_slice(&startup_packet()[4..]);
        let what = format!("(b) startup packet with length {len:#x}");
        let o = send_raw(pgfan, &p, false, &what).await;
        assert_rejected(&o, &["08P01"], &what);
        assert_healthy(pgfan, witness, &what).await;
    }
}

/// (c) a truncated startup packet, then the client closes.
async fn case_truncated_startup(pgfan: &mut Pgfan, witness: &mut WireClient) {
    let full = startup_packet();
    for cut in [2usize, 4, 9, full.len() - 1] {
        let what = format!("(c) first {cut} of {} startup bytes, then FIN", full.len());
        let o = send_raw(pgfan, &full[..cut], true, &what).await;
        assert_rejected(&o, &["08P01"], &what);
        assert_healthy(pgfan, witness, &what).await;

        // The same, closing the whole socket at once (nothing to observe but health).
        let mut s = raw_connect(pgfan).await;
        s.write_all(&full[..cut]).await.expect("write");
        drop(s);
        assert_healthy(pgfan, witness, &format!("{what} (dropped)")).await;
    }
}

/// After a valid startup, sends `bytes` and expects rejection.
async fn after_startup(pgfan: &mut Pgfan, witness: &mut WireClient, bytes: &[u8], what: &str) {
    let mut c = WireClient::connect(&pgfan.addr(), "postgres", "postgres")
        .await
        .expect("connect");
    c.timeout = LIMIT;
    let t = c
        .simple_query("select 1")
        .await
        .expect("query before abuse");
    assert_eq!(t.error_code(), None);
    // The write may fail if pgfan already closed: fine.
    let _ = c.send_raw(bytes).await;
    let mut error = None;
    let start = Instant::now();
    loop {
        match c.read_message().await {
            Ok(Msg::Error(e)) => {
                if error.is_none() {
                    error = Some(e);
                }
            }
            Ok(Msg::Notice(_)) => {}
            Ok(m) => panic!("{what}: unexpected answer {m:?}"),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => panic!(
                "{what}: pgfan neither answered nor closed within {LIMIT:?} (error so far: \
                 {error:?})\npgfan log:\n{}",
                pgfan.log_tail()
            ),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                break
            }
            Err(e) => panic!("{what}: read error {e}"),
        }
        assert!(start.elapsed() < LIMIT * 2, "{what}: no end");
    }
    let o = match error {
        Some(e) => Outcome::Error {
            code: e.code,
            message: e.message,
        },
        None => Outcome::Closed,
    };
    assert_rejected(&o, &["08P01"], what);
    assert_healthy(pgfan, witness, what).await;
}

/// (d) after a valid startup, a message with length 2^31.
async fn case_huge_message_length(pgfan: &mut Pgfan, witness: &mut WireClient) {
    for (tag, len) in [
        (b'Q', 0x8000_0000u32),
        (b'P', 0x8000_0000),
        (b'Q', 0xffff_ffff),
        (b'Q', 0x7fff_ffff),
    ] {
        let mut m = vec![tag];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(b"select 1\0");
        let what = format!("(d) message '{}' with length {len:#x}", tag as char);
        after_startup(pgfan, witness, &m, &what).await;
    }
}

/// (e) a message with length 3 (below the 4 bytes of the length field itself), and an
/// unknown message type.
async fn case_short_message_length(pgfan: &mut Pgfan, witness: &mut WireClient) {
    for tag in [b'Q', b'S', b'X'] {
        let mut m = vec![tag];
        m.extend_from_slice(&3u32.to_be_bytes());
        m.extend_from_slice(b"abc");
        let what = format!("(e) message '{}' with length 3", tag as char);
        after_startup(pgfan, witness, &m, &what).await;
    }
    let mut m = vec![b'z'];
    m.extend_from_slice(&4u32.to_be_bytes());
    after_startup(pgfan, witness, &m, "(e) unknown message type 'z'").await;
}

/// (f) an SSLRequest to a pgfan without TLS, then garbage.
async fn case_ssl_request_then_garbage(pgfan: &mut Pgfan, witness: &mut WireClient) {
    let mut ssl_request = 8i32.to_be_bytes().to_vec();
    ssl_request.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
    // What a confused client sends: a TLS ClientHello record despite the 'N'.
    let mut client_hello = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03];
    client_hello.extend(garbage(9, 300));
    let mut framed = 120i32.to_be_bytes().to_vec();
    framed.extend(garbage(11, 116));
    framed[4] = 0x7f;
    for (label, tail) in [
        ("TLS ClientHello", client_hello),
        ("random bytes", garbage(5, 64)),
        ("framed random packet", framed),
    ] {
        let what = format!("(f) SSLRequest then {label}");
        let mut s = raw_connect(pgfan).await;
        s.write_all(&ssl_request).await.expect("send SSLRequest");
        let mut answer = [0u8; 1];
        tokio::time::timeout(LIMIT, s.read_exact(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer to SSLRequest within {LIMIT:?}"))
            .unwrap_or_else(|e| panic!("{what}: reading the SSLRequest answer: {e}"));
        assert_eq!(
            answer[0], b'N',
            "{what}: a pgfan without TLS must answer SSLRequest with 'N'"
        );
        let _ = s.write_all(&tail).await;
        let o = outcome(&mut s, BytesMut::new(), &what, pgfan).await;
        let codes: &[&str] = if label == "framed random packet" {
            &["08P01", "0A000"]
        } else {
            &["08P01"]
        };
        assert_rejected(&o, codes, &what);
        assert_healthy(pgfan, witness, &what).await;
    }

    // After 'N' a normal startup still works on the same socket (what libpq does with
    // sslmode=prefer against a server without TLS).
    let mut s = raw_connect(pgfan).await;
    s.write_all(&ssl_request).await.expect("send SSLRequest");
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.expect("SSLRequest answer");
    assert_eq!(answer[0], b'N');
    s.write_all(&startup_packet()).await.expect("startup");
    let mut buf = BytesMut::new();
    let deadline = Instant::now() + LIMIT;
    'outer: loop {
        while let Some(m) = backend::Message::parse(&mut buf).expect("decode") {
            match m {
                backend::Message::ReadyForQuery(_) => break 'outer,
                backend::Message::ErrorResponse(body) => {
                    panic!("startup after 'N' failed: {:?}", error_fields(&body))
                }
                _ => {}
            }
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(remaining, s.read_buf(&mut buf))
            .await
            .expect("startup after SSLRequest 'N' did not finish")
            .expect("read");
        assert!(n > 0, "pgfan closed the socket during startup after 'N'");
    }
    assert_healthy(pgfan, witness, "(f) startup after 'N'").await;
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_startup_packet() {
    let (mut pgfan, mut witness) = setup().await;
    case_garbage_startup(&mut pgfan, &mut witness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_startup_with_unterminated_parameters() {
    let (mut pgfan, mut witness) = setup().await;
    case_unterminated_startup_parameters(&mut pgfan, &mut witness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_startup_length_2_pow_31() {
    let (mut pgfan, mut witness) = setup().await;
    case_huge_startup_length(&mut pgfan, &mut witness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_truncated_startup_then_close() {
    let (mut pgfan, mut witness) = setup().await;
    case_truncated_startup(&mut pgfan, &mut witness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_message_length_2_pow_31_after_startup() {
    let (mut pgfan, mut witness) = setup().await;
    case_huge_message_length(&mut pgfan, &mut witness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_message_length_3_after_startup() {
    let (mut pgfan, mut witness) = setup().await;
    case_short_message_length(&mut pgfan, &mut witness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_ssl_request_without_tls_then_garbage() {
    let (mut pgfan, mut witness) = setup().await;
    case_ssl_request_then_garbage(&mut pgfan, &mut witness).await;
}

/// Many abusive connections at once while a witness keeps querying: it is served
/// throughout, with no query slower than a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn abuse_storm_while_witness_queries() {
    let (mut pgfan, mut witness) = setup().await;
    let addr = pgfan.addr();
    let mut tasks = Vec::new();
    for i in 0..400u64 {
        let addr = addr.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(&addr).await.expect("connect");
            let bytes = match i % 4 {
                0 => {
                    let mut g = garbage(i + 100, 512);
                    g[0] |= 0x10; // an over-long length: rejected at once
                    g
                }
                1 => {
                    let mut p = 0x8000_0000u32.to_be_bytes().to_vec();
                    p.extend_from_slice(&startup_packet()[4..]);
                    p
                }
                2 => startup_packet()[..7].to_vec(),
                _ => {
                    let mut p = 8i32.to_be_bytes().to_vec();
                    p.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
                    p.extend(garbage(i, 100));
                    p
                }
            };
            let _ = s.write_all(&bytes).await;
            if i % 4 == 2 {
                let _ = s.shutdown().await;
            }
            let mut sink = Vec::new();
            tokio::time::timeout(LIMIT, s.read_to_end(&mut sink))
                .await
                .map(|_| ())
                .map_err(|_| format!("abusive connection {i} (kind {}) not closed", i % 4))
        }));
    }
    let mut slowest = Duration::ZERO;
    let mut queries = 0;
    while tasks.iter().any(|t| !t.is_finished()) {
        let start = Instant::now();
        let t = witness
            .simple_query("select 'witness'")
            .await
            .expect("witness query during the storm");
        assert_eq!(t.error_code(), None);
        slowest = slowest.max(start.elapsed());
        queries += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for t in tasks {
        t.await
            .expect("task")
            .unwrap_or_else(|e| panic!("{e} within {LIMIT:?}\npgfan log:\n{}", pgfan.log_tail()));
    }
    assert!(
        slowest < LIMIT,
        "a witness query took {slowest:?} during the storm"
    );
    eprintln!("witness ran {queries} queries during the storm, slowest {slowest:?}");
    assert_healthy(&mut pgfan, &mut witness, "after the storm").await;
}
