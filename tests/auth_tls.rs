//! Client authentication, client TLS, backend login and `pgfan check` (issue 2, "Tests",
//! "Auth"; "Deliver" 1 and 2).
//!
//! psql is the client wherever the behaviour a user sees matters (its stderr, exit code and
//! `\conninfo`); the raw [`WireClient`] checks the SQLSTATE and the method pgfan asked for.
//! TLS uses a self-signed certificate made with the `openssl` CLI per test.
//!
//! Run: `cargo test --test auth_tls`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::wire::{AuthMethod, ConnectError, ConnectOptions, WireClient};
use common::{connect_primary, output_within, pg_tool, show, Pgfan};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A per-test scratch directory (removed on drop).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("pgfan-auth-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs psql with connection string `conninfo` (host/port added) and `args`; `password`
/// goes into PGPASSWORD.
async fn psql(port: u16, conninfo: &str, password: Option<&str>, args: &[&str]) -> Output {
    let conn = format!("host=127.0.0.1 port={port} connect_timeout=10 {conninfo}");
    let mut cmd = pg_tool("psql");
    cmd.arg("-X")
        .arg("-w") // never prompt for a password
        .arg(&conn)
        .args(args)
        // No root CA: sslmode=require must not turn into certificate verification.
        .env("PGSSLROOTCERT", "/nonexistent/pgfan-test-root.crt");
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    output_within(
        cmd,
        Duration::from_secs(60),
        &format!("psql {conn:?} {args:?}"),
    )
    .await
}

/// psql must connect, and print exactly `want` for `-Atc sql`.
async fn psql_ok(
    pgfan: &Pgfan,
    conninfo: &str,
    password: Option<&str>,
    sql: &str,
    want: &str,
) -> Output {
    let o = psql(pgfan.port, conninfo, password, &["-Atc", sql]).await;
    assert!(
        o.status.success(),
        "psql {conninfo:?} through pgfan failed:\n{}\npgfan log:\n{}",
        show(&o),
        pgfan.log_tail()
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        want,
        "{conninfo:?}: {sql}"
    );
    o
}

/// psql must fail to connect (exit code 2) with `needle` in its stderr.
async fn psql_refused(pgfan: &Pgfan, conninfo: &str, password: Option<&str>, needle: &str) {
    let o = psql(pgfan.port, conninfo, password, &["-Atc", "select 1"]).await;
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(2),
        "psql {conninfo:?} should fail to connect:\n{}",
        show(&o)
    );
    assert!(
        stderr.contains(needle),
        "psql {conninfo:?}: stderr lacks {needle:?}:\n{}\npgfan log:\n{}",
        show(&o),
        pgfan.log_tail()
    );
}

/// Makes `server.crt` / `server.key` (self-signed, CN=localhost) in `dir`.
fn make_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let cert = dir.join("server.crt");
    let key = dir.join("server.key");
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes"])
        .args(["-subj", "/CN=localhost", "-days", "1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

fn users_toml(users: &[(&str, &str, &str)]) -> String {
    users
        .iter()
        .map(|(name, key, value)| format!("[[users]]\nname = \"{name}\"\n{key} = \"{value}\"\n"))
        .collect()
}

fn tls_toml(mode: &str, cert: &Path, key: &Path) -> String {
    format!(
        "[tls]\nmode = \"{mode}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    )
}

/// A WireClient login through pgfan (plaintext).
async fn wire_login(
    pgfan: &Pgfan,
    user: &str,
    password: Option<&str>,
) -> Result<WireClient, ConnectError> {
    let mut opts = ConnectOptions::new(user, "postgres");
    opts.timeout = Duration::from_secs(15);
    if let Some(p) = password {
        opts = opts.password(p);
    }
    WireClient::connect_with(&pgfan.addr(), &opts).await
}

fn expect_server_error(r: Result<WireClient, ConnectError>, what: &str) -> (String, String) {
    match r {
        Ok(_) => panic!("{what}: login succeeded"),
        Err(ConnectError::Server(e)) => (e.code.clone(), e.message.clone()),
        Err(e) => panic!("{what}: expected an ErrorResponse, got {e}"),
    }
}

async fn verifier_of_pgfan_pw() -> String {
    let direct = connect_primary("postgres").await;
    direct
        .query_one(
            "select rolpassword from pg_authid where rolname = 'pgfan_pw'",
            &[],
        )
        .await
        .expect("read pgfan_pw's verifier")
        .get(0)
}

// ---------------------------------------------------------------------------------------
// Password methods
// ---------------------------------------------------------------------------------------

async fn password_method(method: &str, expected: AuthMethod) {
    let config = format!(
        "auth = \"{method}\"\n{}",
        users_toml(&[("postgres", "password", "pw1")])
    );
    let pgfan = Pgfan::start_with_config(&config, &[]);

    psql_ok(
        &pgfan,
        "user=postgres dbname=postgres sslmode=disable",
        Some("pw1"),
        "select current_user, 40 + 2",
        "postgres|42\n",
    )
    .await;

    let mut c = wire_login(&pgfan, "postgres", Some("pw1"))
        .await
        .unwrap_or_else(|e| panic!("{method}: WireClient login: {e}"));
    assert_eq!(
        c.auth_method, expected,
        "method pgfan asked for with auth = {method}"
    );
    let t = c.simple_query("select 1").await.expect("query");
    assert_eq!(t.error_code(), None, "{t:?}");

    // Wrong password.
    psql_refused(
        &pgfan,
        "user=postgres dbname=postgres sslmode=disable",
        Some("wrong"),
        "password authentication failed for user \"postgres\"",
    )
    .await;
    let (code, message) = expect_server_error(
        wire_login(&pgfan, "postgres", Some("wrong")).await,
        &format!("{method}: wrong password"),
    );
    assert_eq!(code, "28P01", "{method}: wrong password: {message}");
    assert_eq!(
        message, "password authentication failed for user \"postgres\"",
        "{method}"
    );

    // A user pgfan does not know gets the same answer (no user enumeration), as from
    // PostgreSQL.
    let (code, message) = expect_server_error(
        wire_login(&pgfan, "nosuchuser", Some("pw1")).await,
        &format!("{method}: unknown user"),
    );
    assert_eq!(code, "28P01", "{method}: unknown user: {message}");
    assert_eq!(
        message, "password authentication failed for user \"nosuchuser\"",
        "{method}"
    );

    // No password at all: psql gives up without prompting.
    psql_refused(
        &pgfan,
        "user=postgres dbname=postgres sslmode=disable",
        None,
        "password",
    )
    .await;

    // pgfan still serves the good password afterwards.
    psql_ok(
        &pgfan,
        "user=postgres dbname=postgres sslmode=disable",
        Some("pw1"),
        "select 'again'",
        "again\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_scram_sha_256() {
    password_method("scram-sha-256", AuthMethod::ScramSha256).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_md5() {
    password_method("md5", AuthMethod::Md5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_cleartext_password() {
    password_method("password", AuthMethod::Cleartext).await;
}

// ---------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_require() {
    let dir = TempDir::new("tls_require");
    let (cert, key) = make_cert(dir.path());
    let config = format!(
        "auth = \"scram-sha-256\"\n{}{}",
        tls_toml("require", &cert, &key),
        users_toml(&[("postgres", "password", "pw1")])
    );
    let pgfan = Pgfan::start_with_config(&config, &[]);

    // Plaintext is refused, with an ErrorResponse.
    let o = psql(
        pgfan.port,
        "user=postgres dbname=postgres sslmode=disable",
        Some("pw1"),
        &["-Atc", "select 1"],
    )
    .await;
    assert_eq!(
        o.status.code(),
        Some(2),
        "plaintext psql must be refused with tls.mode = require:\n{}",
        show(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("FATAL:"),
        "the refusal reaches psql as a server error:\n{}",
        show(&o)
    );
    let (code, message) = expect_server_error(
        wire_login(&pgfan, "postgres", Some("pw1")).await,
        "plaintext WireClient with tls.mode = require",
    );
    assert!(
        code.starts_with("28") || code.starts_with("08"),
        "SQLSTATE {code} ({message}) for a refused plaintext client"
    );

    // SCRAM over TLS.
    let o = psql(
        pgfan.port,
        "user=postgres dbname=postgres sslmode=require",
        Some("pw1"),
        &["-c", "\\conninfo", "-Atc", "select current_user"],
    )
    .await;
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "psql sslmode=require:\n{}\npgfan log:\n{}",
        show(&o),
        pgfan.log_tail()
    );
    assert!(
        stdout.contains("SSL connection (protocol: TLS"),
        "\\conninfo over sslmode=require:\n{}",
        show(&o)
    );
    assert!(stdout.ends_with("postgres\n"), "{}", show(&o));

    // SCRAM-SHA-256-PLUS: channel binding to the TLS certificate.
    let o = psql(
        pgfan.port,
        "user=postgres dbname=postgres sslmode=require channel_binding=require",
        Some("pw1"),
        &["-c", "\\conninfo", "-Atc", "select 'plus'"],
    )
    .await;
    assert!(
        o.status.success(),
        "psql channel_binding=require:\n{}\npgfan log:\n{}",
        show(&o),
        pgfan.log_tail()
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("SSL connection"), "{}", show(&o));
    assert!(stdout.ends_with("plus\n"), "{}", show(&o));

    // The default sslmode (prefer) ends up on TLS.
    let o = psql(
        pgfan.port,
        "user=postgres dbname=postgres",
        Some("pw1"),
        &["-c", "\\conninfo"],
    )
    .await;
    assert!(o.status.success(), "psql sslmode=prefer:\n{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("SSL connection"),
        "{}",
        show(&o)
    );

    // A wrong password over TLS is still 28P01 (with and without channel binding).
    psql_refused(
        &pgfan,
        "user=postgres dbname=postgres sslmode=require",
        Some("wrong"),
        "password authentication failed for user \"postgres\"",
    )
    .await;
    psql_refused(
        &pgfan,
        "user=postgres dbname=postgres sslmode=require channel_binding=require",
        Some("wrong"),
        "password authentication failed for user \"postgres\"",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_allow() {
    let dir = TempDir::new("tls_allow");
    let (cert, key) = make_cert(dir.path());
    let config = format!(
        "auth = \"scram-sha-256\"\n{}{}",
        tls_toml("allow", &cert, &key),
        users_toml(&[("postgres", "password", "pw1")])
    );
    let pgfan = Pgfan::start_with_config(&config, &[]);

    let o = psql(
        pgfan.port,
        "user=postgres dbname=postgres sslmode=disable",
        Some("pw1"),
        &["-c", "\\conninfo", "-Atc", "select 'plain'"],
    )
    .await;
    assert!(
        o.status.success(),
        "plaintext psql with tls.mode = allow:\n{}\npgfan log:\n{}",
        show(&o),
        pgfan.log_tail()
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(!stdout.contains("SSL"), "plaintext \\conninfo: {stdout}");
    assert!(stdout.ends_with("plain\n"), "{stdout}");
    let mut c = wire_login(&pgfan, "postgres", Some("pw1"))
        .await
        .expect("plaintext WireClient with tls.mode = allow");
    assert_eq!(c.auth_method, AuthMethod::ScramSha256);
    assert_eq!(
        c.simple_query("select 1").await.expect("q").error_code(),
        None
    );

    let o = psql(
        pgfan.port,
        "user=postgres dbname=postgres sslmode=require",
        Some("pw1"),
        &["-c", "\\conninfo", "-Atc", "select 'tls'"],
    )
    .await;
    assert!(
        o.status.success(),
        "TLS psql with tls.mode = allow:\n{}",
        show(&o)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("SSL connection (protocol: TLS"), "{stdout}");
    assert!(stdout.ends_with("tls\n"), "{stdout}");

    psql_ok(
        &pgfan,
        "user=postgres dbname=postgres sslmode=require channel_binding=require",
        Some("pw1"),
        "select 'plus'",
        "plus\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_disable_refuses_sslmode_require() {
    let config = format!(
        "auth = \"scram-sha-256\"\n[tls]\nmode = \"disable\"\n{}",
        users_toml(&[("postgres", "password", "pw1")])
    );
    let pgfan = Pgfan::start_with_config(&config, &[]);
    // libpq reports that the server does not support SSL.
    psql_refused(
        &pgfan,
        "user=postgres dbname=postgres sslmode=require",
        Some("pw1"),
        "server does not support SSL",
    )
    .await;
    psql_ok(
        &pgfan,
        "user=postgres dbname=postgres sslmode=prefer",
        Some("pw1"),
        "select 'fallback'",
        "fallback\n",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// SCRAM verifiers and backend login
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_verifier_user() {
    let verifier = verifier_of_pgfan_pw().await;
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    // The verifier belongs to pgfan_pw (password pgfan_pw_secret); SCRAM verifiers do not
    // depend on the user name, so it can authenticate "postgres", whose backend login is
    // trust.
    let config = format!(
        "auth = \"scram-sha-256\"\n{}",
        users_toml(&[("postgres", "scram_verifier", &verifier)])
    );
    let pgfan = Pgfan::start_with_config(&config, &[]);
    psql_ok(
        &pgfan,
        "user=postgres dbname=postgres sslmode=disable",
        Some("pgfan_pw_secret"),
        "select current_user",
        "postgres\n",
    )
    .await;
    let c = wire_login(&pgfan, "postgres", Some("pgfan_pw_secret"))
        .await
        .expect("SCRAM login against a configured verifier");
    assert_eq!(c.auth_method, AuthMethod::ScramSha256);
    let (code, message) = expect_server_error(
        wire_login(&pgfan, "postgres", Some("pw1")).await,
        "wrong password against a verifier",
    );
    assert_eq!(code, "28P01", "{message}");
    psql_refused(
        &pgfan,
        "user=postgres dbname=postgres sslmode=disable",
        Some("not-the-secret"),
        "password authentication failed for user \"postgres\"",
    )
    .await;
}

/// pgfan_pw with its verifier only: pgfan cannot log in to the backend, which demands
/// SCRAM for pgfan_pw, so the client must get a clear error (and never a hang).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_verifier_only_user_cannot_reach_scram_backend() {
    let verifier = verifier_of_pgfan_pw().await;
    let config = format!(
        "auth = \"scram-sha-256\"\n{}",
        users_toml(&[("pgfan_pw", "scram_verifier", &verifier)])
    );
    let pgfan = Pgfan::start_with_config(&config, &[]);
    let r = wire_login(&pgfan, "pgfan_pw", Some("pgfan_pw_secret")).await;
    match r {
        // pgbouncer-style reuse of the client's SCRAM keys would be fine too.
        Ok(mut c) => {
            let t = c.simple_query("select current_user").await.expect("query");
            assert_eq!(t.error_code(), None, "{t:?}");
        }
        Err(ConnectError::Server(e)) => {
            assert!(
                e.code.starts_with("28") || e.code.starts_with("08"),
                "backend login failure: {e:?}"
            );
            assert!(
                e.message.to_lowercase().contains("password"),
                "an unclear error for a backend that needs a password: {e:?}"
            );
        }
        Err(e) => panic!("expected an ErrorResponse or a session, got {e}"),
    }
}

/// PostgreSQL and pgbouncer use SCRAM when md5 is configured but only a SCRAM secret is
/// known; pgfan must not lock such a user out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_with_scram_verifier_only_user_uses_scram() {
    let verifier = verifier_of_pgfan_pw().await;
    let config = format!(
        "auth = \"md5\"\n{}",
        users_toml(&[("postgres", "scram_verifier", &verifier)])
    );
    let pgfan = Pgfan::start_with_config(&config, &[]);
    psql_ok(
        &pgfan,
        "user=postgres dbname=postgres sslmode=disable",
        Some("pgfan_pw_secret"),
        "select 'md5 via scram'",
        "md5 via scram\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_with_scram_verifier_only_user() {
    let verifier = verifier_of_pgfan_pw().await;
    let config = format!(
        "auth = \"password\"\n{}",
        users_toml(&[("postgres", "scram_verifier", &verifier)])
    );
    let pgfan = Pgfan::start_with_config(&config, &[]);
    let c = wire_login(&pgfan, "postgres", Some("pgfan_pw_secret"))
        .await
        .expect("cleartext password checked against a SCRAM verifier");
    assert_eq!(c.auth_method, AuthMethod::Cleartext);
    let (code, _) = expect_server_error(
        wire_login(&pgfan, "postgres", Some("nope")).await,
        "wrong cleartext password against a verifier",
    );
    assert_eq!(code, "28P01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_login_with_scram() {
    let config = format!(
        "auth = \"scram-sha-256\"\n{}",
        users_toml(&[("pgfan_pw", "password", "pgfan_pw_secret")])
    );
    let pgfan = Pgfan::start_with_config(&config, &[]);
    // The primary's pg_hba demands scram-sha-256 for pgfan_pw over TCP: pgfan logs in
    // with the configured password.
    let o = psql_ok(
        &pgfan,
        "user=pgfan_pw dbname=postgres sslmode=disable",
        Some("pgfan_pw_secret"),
        "select current_user, session_user",
        "pgfan_pw|pgfan_pw\n",
    )
    .await;
    drop(o);
    // The backend session really belongs to pgfan_pw.
    let mut c = wire_login(&pgfan, "pgfan_pw", Some("pgfan_pw_secret"))
        .await
        .expect("WireClient as pgfan_pw");
    let t = c
        .simple_query("select usename from pg_stat_activity where pid = pg_backend_pid()")
        .await
        .expect("query");
    let rows = t.data_rows();
    assert_eq!(rows.len(), 1, "{t:?}");
    assert_eq!(
        rows[0][0].as_ref().map(|r| &r.0[..]),
        Some(&b"pgfan_pw"[..])
    );

    // The wrong client password never reaches the backend: 28P01 from pgfan.
    psql_refused(
        &pgfan,
        "user=pgfan_pw dbname=postgres sslmode=disable",
        Some("wrong"),
        "password authentication failed for user \"pgfan_pw\"",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_login_without_password_trust_gives_clear_error() {
    // auth trust, no [[users]]: pgfan has no password for pgfan_pw's backend login.
    let pgfan = Pgfan::start_with_config("auth = \"trust\"\n", &[]);
    let o = psql(
        pgfan.port,
        "user=pgfan_pw dbname=postgres sslmode=disable",
        None,
        &["-Atc", "select 1"],
    )
    .await;
    assert_eq!(
        o.status.code(),
        Some(2),
        "psql as pgfan_pw without a configured password:\n{}",
        show(&o)
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("FATAL:") && stderr.to_lowercase().contains("password"),
        "the error should say a password is needed:\n{}\npgfan log:\n{}",
        show(&o),
        pgfan.log_tail()
    );
    let (code, message) = expect_server_error(
        wire_login(&pgfan, "pgfan_pw", None).await,
        "WireClient as pgfan_pw without a configured password",
    );
    assert!(
        code.starts_with("28") || code.starts_with("08"),
        "SQLSTATE {code}: {message}"
    );
    assert!(message.to_lowercase().contains("password"), "{message}");

    // Other users (trust on the backend) are unaffected.
    psql_ok(
        &pgfan,
        "user=postgres dbname=postgres sslmode=disable",
        None,
        "select 'trust ok'",
        "trust ok\n",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// pgfan check
// ---------------------------------------------------------------------------------------

async fn pgfan_check(config: &Path) -> Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgfan"))
        .arg("check")
        .arg("--config")
        .arg(config)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("pgfan check did not finish in 30 s")
        .expect("run pgfan check")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_rejects_unknown_keys_and_accepts_example() {
    let dir = TempDir::new("check");
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "top.toml",
            "listen = \"127.0.0.1:6432\"\nauth = \"trust\"\nbogus_key = 1\n\n[[backends]]\nurl = \"postgres://127.0.0.1:5432\"\n",
            "bogus_key",
            "line 3",
        ),
        (
            "backend.toml",
            "listen = \"127.0.0.1:6432\"\n\n[[backends]]\nname = \"p\"\nurl = \"postgres://127.0.0.1:5432\"\nrole = \"primary\"\npoolsize = 4\n",
            "poolsize",
            "line 7",
        ),
        (
            "tls.toml",
            "[[backends]]\nurl = \"postgres://127.0.0.1:5432\"\n\n[tls]\nmode = \"disable\"\ncertificate = \"x.pem\"\n",
            "certificate",
            "line 6",
        ),
        (
            "users.toml",
            "[[backends]]\nurl = \"postgres://127.0.0.1:5432\"\n\n[[users]]\nname = \"a\"\npassword = \"b\"\n\n[[users]]\nname = \"c\"\npasswd = \"d\"\n",
            "passwd",
            "line 10",
        ),
        (
            "value.toml",
            "[[backends]]\nurl = \"postgres://127.0.0.1:5432\"\n\nmax_client_connections = 5\n",
            // After a [[backends]] header this key belongs to the backend table.
            "max_client_connections",
            "line 4",
        ),
        (
            "invalid_value.toml",
            "max_client_connections = 0\n\n[[backends]]\nurl = \"postgres://127.0.0.1:5432\"\n",
            "max_client_connections",
            "line 1",
        ),
    ];
    for (file, text, key, line) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, text).expect("write config");
        let o = pgfan_check(&path).await;
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            !o.status.success(),
            "pgfan check {file} must fail:\n{}",
            show(&o)
        );
        assert!(
            all.contains(key),
            "{file}: the message must name {key:?}:\n{all}"
        );
        assert!(
            all.contains(line),
            "{file}: the message must name {line:?}:\n{all}"
        );
    }

    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
    let o = pgfan_check(&example).await;
    assert!(o.status.success(), "pgfan check proxy.toml:\n{}", show(&o));
}
