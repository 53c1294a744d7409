//! `proxy.toml` → typed [`Config`]. Parse errors and validation errors name the key and its
//! line, so `pgfan check` can point at the mistake.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TOML syntax or type error, or an unknown key (toml's message names key and line).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// toml's message, with line and column.
        message: String,
    },
    /// A value that parses but is not acceptable.
    #[error("{path}: line {line}: key `{key}`: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// 1-based line of the value, 0 when it came from the command line.
        line: usize,
        /// Dotted key, e.g. `backends[1].url`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// Client authentication method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    /// No password; allowed only on loopback listen addresses unless forced.
    Trust,
    /// SCRAM-SHA-256 (and SCRAM-SHA-256-PLUS over TLS).
    #[serde(rename = "scram-sha-256")]
    #[value(name = "scram-sha-256")]
    ScramSha256,
    /// MD5 password hash.
    Md5,
    /// Cleartext password.
    Password,
}

/// Linux scheduling policy of the session threads (`session_scheduling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SessionScheduling {
    /// `SCHED_BATCH`: a session thread woken by a socket does not preempt the task
    /// running on its CPU; it runs when that task blocks or its slice ends, and finds
    /// more events per wakeup.
    #[default]
    Batch,
    /// `SCHED_OTHER`, the kernel's default for every thread.
    Normal,
}

/// Role of a backend server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendRole {
    /// The writable primary: every pass-through statement goes here.
    Primary,
    /// A streaming replica: only read-only fragments go here.
    Replica,
}

/// Client-side TLS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// No TLS: SSLRequest is answered with `N`.
    #[default]
    Disable,
    /// TLS when the client asks for it.
    Allow,
    /// Plaintext clients are refused.
    Require,
}

/// TLS toward backends, from the URL's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendSslMode {
    /// Plain TCP.
    #[default]
    Disable,
    /// TLS if the server offers it, plain otherwise.
    Prefer,
    /// TLS or fail (the certificate is not verified, as libpq's `require`).
    Require,
}

/// A backend server address parsed from a `postgres://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendUrl {
    /// Host name or IP; as in libpq, a host that starts with `/` is the directory of the
    /// server's Unix-domain socket.
    pub host: String,
    /// TCP port, or the number in the Unix-domain socket's name (`.s.PGSQL.<port>`).
    pub port: u16,
    /// Fixed login user; `None` means the client's user.
    pub user: Option<String>,
    /// Password for the backend login.
    pub password: Option<String>,
    /// Fixed database; `None` means the client's database.
    pub database: Option<String>,
    /// TLS toward the backend (not used on a Unix-domain socket, as in libpq).
    pub sslmode: BackendSslMode,
}

impl BackendUrl {
    /// Parses `postgres://[user[:password]@]host[:port][/database][?param=…]`, the libpq
    /// URI form. Parameters: `sslmode`, and `host` and `port`, which override the ones
    /// before the path. A Unix-domain socket is named by its directory, as a
    /// percent-encoded host (`postgres://%2Fvar%2Frun%2Fpostgresql/app`) or as
    /// `host=` (`postgres:///app?host=/var/run/postgresql`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let url = url::Url::parse(text).map_err(|e| format!("invalid URL {text:?}: {e}"))?;
        if url.scheme() != "postgres" && url.scheme() != "postgresql" {
            return Err(format!(
                "URL scheme must be postgres:// or postgresql://, got {:?}",
                url.scheme()
            ));
        }
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let mut host = url
            .host_str()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .map(|h| {
                // a socket directory, percent-encoded because `/` ends the authority
                if h.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("%2f")) {
                    decode(h)
                } else {
                    h.to_string()
                }
            })
            .unwrap_or_default();
        let user = Some(url.username()).filter(|u| !u.is_empty()).map(&decode);
        let password = url.password().map(&decode);
        let database = Some(url.path().trim_start_matches('/'))
            .filter(|d| !d.is_empty())
            .map(&decode);
        let mut port = url.port().unwrap_or(5432);
        let mut sslmode = BackendSslMode::Disable;
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "sslmode" => {
                    sslmode = match v.as_ref() {
                        "disable" => BackendSslMode::Disable,
                        "allow" | "prefer" => BackendSslMode::Prefer,
                        "require" | "verify-ca" | "verify-full" => BackendSslMode::Require,
                        other => return Err(format!("unknown sslmode {other:?}")),
                    }
                }
                "host" => host = v.into_owned(),
                "port" => {
                    port = v
                        .parse()
                        .map_err(|_| format!("port {v:?} is not a port number"))?
                }
                other => return Err(format!("unknown URL parameter {other:?}")),
            }
        }
        if host.is_empty() {
            return Err(format!("URL {text:?} has no host"));
        }
        Ok(Self {
            host,
            port,
            user,
            password,
            database,
            sslmode,
        })
    }

    /// The path of the server's Unix-domain socket, when the host is a socket directory.
    pub fn unix_socket(&self) -> Option<PathBuf> {
        self.host
            .starts_with('/')
            .then(|| Path::new(&self.host).join(format!(".s.PGSQL.{}", self.port)))
    }

    /// `host:port` (`[v6]:port`), or the socket's path: where the server is, for messages.
    pub fn address(&self) -> String {
        if let Some(path) = self.unix_socket() {
            path.display().to_string()
        } else if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// One backend server.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// Name used in logs, metrics and the admin console.
    pub name: String,
    /// Where it is.
    pub url: BackendUrl,
    /// Primary or replica.
    pub role: BackendRole,
    /// Connections for fragments and control queries (pass-through sessions pin their own).
    pub pool_size: usize,
}

/// A known user: client authentication and backend login.
#[derive(Debug, Clone)]
pub struct UserConfig {
    /// Role name.
    pub name: String,
    /// Cleartext password, usable for every auth method and for the backend login.
    pub password: Option<String>,
    /// PostgreSQL-style `SCRAM-SHA-256$<iter>:<salt>$<stored>:<server>` verifier.
    pub scram_verifier: Option<String>,
}

/// Client-side TLS settings.
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    /// disable, allow or require.
    pub mode: TlsMode,
    /// PEM certificate chain.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Client listen address.
    pub listen: SocketAddr,
    /// Prometheus `/metrics` address; `None` disables the HTTP exporter.
    pub metrics_listen: Option<SocketAddr>,
    /// Client authentication method.
    pub auth: AuthMethod,
    /// Allow `trust` on a non-loopback listen address.
    pub force_trust: bool,
    /// Client connections beyond this get SQLSTATE 53300.
    pub max_client_connections: usize,
    /// Threads that run client sessions, each its own single-threaded event loop.
    pub session_threads: usize,
    /// Scheduling policy of the session threads (Linux only; elsewhere ignored).
    pub session_scheduling: SessionScheduling,
    /// Backend servers; exactly one primary.
    pub backends: Vec<BackendConfig>,
    /// Known users.
    pub users: Vec<UserConfig>,
    /// Client TLS.
    pub tls: TlsConfig,
    /// Reset (`DISCARD ALL`) and reuse pass-through connections after a clean client exit.
    pub reuse_backend_connections: bool,
    /// Idle reset connections are closed after this long.
    pub backend_idle_timeout: std::time::Duration,
    /// Fan-out settings.
    pub fanout: FanoutConfig,
}

/// How analytical SELECTs are split (the `[fanout]` section).
#[derive(Debug, Clone)]
pub struct FanoutConfig {
    /// False: every statement passes through.
    pub enabled: bool,
    /// Tables (or bounded index ranges) with fewer heap pages pass through, and no fragment
    /// gets fewer pages than this.
    pub min_fragment_pages: u64,
    /// Upper bound on fragments per query.
    pub max_fragments: usize,
    /// Replicas whose replay position is more than this many WAL bytes behind the
    /// primary's current position are left out of a query.
    pub max_replica_lag_bytes: u64,
    /// How long catalog facts (sizes, columns, indexes, histograms) are cached.
    pub catalog_ttl: std::time::Duration,
    /// Configured split columns, by table name as written in queries (`events` or
    /// `public.events`).
    pub split_columns: Vec<(String, String)>,
    /// A GROUP BY whose estimated groups are more than the table's rows divided by this
    /// passes through: every fragment would ship nearly all its rows to the combine.
    /// 0: never pass through for this reason.
    pub min_rows_per_group: u64,
    /// How fragments meet backends: adaptive (a queue that idle connections pull from) or
    /// static (dealt round-robin, one per connection, as a baseline for benchmarks).
    pub dispatch: DispatchMode,
    /// Fragment connections per backend, all sessions together (the backend's
    /// `pool_size` also caps it).
    pub max_fragment_connections: usize,
    /// Fragments per fragment connection a query may use (over-partitioning, so a fast
    /// backend takes more of them); merges that stream every fragment at once use 1.
    pub fragments_per_connection: usize,
    /// A fragment running longer than this many times the median of its finished
    /// siblings is run again on an idle connection of another backend; 0: never.
    pub hedge_after: f64,
    /// How long a fragment may run; `None`: no limit.
    pub fragment_timeout: Option<std::time::Duration>,
    /// How often backends are checked (a query on an idle connection, replay lag).
    pub health_check_interval: std::time::Duration,
    /// Consecutive connection failures after which a backend is left out until a health
    /// check succeeds.
    pub ban_after_failures: u32,
    /// New fragment connections of one query open at most this often (doubling each
    /// step), so a short query does not open connections it will not use.
    pub slow_start: std::time::Duration,
}

/// How fragments are given to backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DispatchMode {
    /// A largest-first queue pulled by idle connections, sized by live backend statistics,
    /// with hedging and retries.
    Adaptive,
    /// Round-robin over the backends, one fragment per connection.
    Static,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        FanoutConfig {
            enabled: true,
            min_fragment_pages: 1024,
            max_fragments: 16,
            max_replica_lag_bytes: 0,
            catalog_ttl: std::time::Duration::from_secs(60),
            split_columns: Vec::new(),
            min_rows_per_group: 100,
            dispatch: DispatchMode::Adaptive,
            max_fragment_connections: 8,
            fragments_per_connection: 4,
            hedge_after: 3.0,
            fragment_timeout: None,
            health_check_interval: std::time::Duration::from_millis(1000),
            ban_after_failures: 3,
            slow_start: std::time::Duration::from_millis(10),
        }
    }
}

impl Config {
    /// The primary backend.
    pub fn primary(&self) -> &BackendConfig {
        // validate() guarantees exactly one primary
        self.backends
            .iter()
            .find(|b| b.role == BackendRole::Primary)
            .unwrap_or(&self.backends[0])
    }

    /// The configured user with this name.
    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Spanned<String>>,
    metrics_listen: Option<Spanned<String>>,
    auth: Option<Spanned<AuthMethod>>,
    force_trust: Option<bool>,
    max_client_connections: Option<Spanned<i64>>,
    session_threads: Option<Spanned<i64>>,
    session_scheduling: Option<SessionScheduling>,
    #[serde(default)]
    backends: Vec<RawBackend>,
    #[serde(default)]
    users: Vec<RawUser>,
    tls: Option<RawTls>,
    reuse_backend_connections: Option<bool>,
    backend_idle_timeout_secs: Option<Spanned<i64>>,
    fanout: Option<RawFanout>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFanout {
    enabled: Option<bool>,
    min_fragment_pages: Option<Spanned<i64>>,
    max_fragments: Option<Spanned<i64>>,
    max_replica_lag_bytes: Option<Spanned<i64>>,
    catalog_ttl_secs: Option<Spanned<i64>>,
    min_rows_per_group: Option<Spanned<i64>>,
    dispatch: Option<DispatchMode>,
    max_fragment_connections: Option<Spanned<i64>>,
    fragments_per_connection: Option<Spanned<i64>>,
    hedge_after: Option<Spanned<f64>>,
    fragment_timeout_secs: Option<Spanned<f64>>,
    health_check_interval_ms: Option<Spanned<i64>>,
    ban_after_failures: Option<Spanned<i64>>,
    slow_start_ms: Option<Spanned<i64>>,
    #[serde(default)]
    tables: Vec<RawSplitTable>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplitTable {
    name: String,
    split_column: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: Option<String>,
    url: Spanned<String>,
    role: Option<BackendRole>,
    pool_size: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: String,
    password: Option<String>,
    scram_verifier: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    mode: Option<TlsMode>,
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
}

/// Command-line values that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`
    pub listen: Option<String>,
    /// `--primary`
    pub primary: Option<String>,
    /// `--replica` (repeatable); replaces the file's replicas when given.
    pub replicas: Vec<String>,
    /// `--metrics-listen`
    pub metrics_listen: Option<String>,
    /// `--auth`
    pub auth: Option<AuthMethod>,
    /// `--force-trust`
    pub force_trust: bool,
    /// `--max-fragments`
    pub max_fragments: Option<usize>,
    /// `--min-fragment-pages`
    pub min_fragment_pages: Option<u64>,
}

struct Source<'a> {
    path: &'a str,
    text: &'a str,
}

impl Source<'_> {
    fn line(&self, span: Range<usize>) -> usize {
        self.text[..span.start.min(self.text.len())]
            .bytes()
            .filter(|b| *b == b'\n')
            .count()
            + 1
    }

    fn invalid(&self, span: Option<Range<usize>>, key: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_string(),
            line: span.map(|s| self.line(s)).unwrap_or(0),
            key: key.to_string(),
            message,
        }
    }
}

/// Loads and validates a config file, then applies command-line overrides.
pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
    let (name, text) = match path {
        Some(p) => (
            p.display().to_string(),
            std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?,
        ),
        None => ("<command line>".to_string(), String::new()),
    };
    parse(&name, &text, overrides)
}

/// Parses and validates config text (`name` is used in messages).
pub fn parse(name: &str, text: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
    let src = Source { path: name, text };
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: name.to_string(),
        message: e.to_string().trim_end().to_string(),
    })?;

    let addr = |value: &str, span: Option<Range<usize>>, key: &str| {
        value.parse::<SocketAddr>().map_err(|e| {
            src.invalid(
                span,
                key,
                format!("{value:?} is not an IP:port address: {e}"),
            )
        })
    };

    let listen = match (&overrides.listen, &raw.listen) {
        (Some(v), _) => addr(v, None, "listen")?,
        (None, Some(v)) => addr(v.get_ref(), Some(v.span()), "listen")?,
        (None, None) => addr("127.0.0.1:6432", None, "listen")?,
    };
    let metrics_listen = match (&overrides.metrics_listen, &raw.metrics_listen) {
        (Some(v), _) => Some(addr(v, None, "metrics_listen")?),
        (None, Some(v)) => Some(addr(v.get_ref(), Some(v.span()), "metrics_listen")?),
        (None, None) => None,
    };
    let (auth, auth_span) = match (overrides.auth, &raw.auth) {
        (Some(a), _) => (a, None),
        (None, Some(a)) => (*a.get_ref(), Some(a.span())),
        (None, None) => (AuthMethod::Trust, None),
    };
    let force_trust = overrides.force_trust || raw.force_trust.unwrap_or(false);
    if auth == AuthMethod::Trust && !listen.ip().is_loopback() && !force_trust {
        return Err(src.invalid(
            auth_span,
            "auth",
            format!(
                "trust authentication on non-loopback address {listen} needs force_trust = true"
            ),
        ));
    }
    let max_client_connections = match &raw.max_client_connections {
        Some(v) if *v.get_ref() < 1 => {
            return Err(src.invalid(
                Some(v.span()),
                "max_client_connections",
                "must be at least 1".into(),
            ))
        }
        Some(v) => *v.get_ref() as usize,
        None => 1000,
    };
    let session_threads = match &raw.session_threads {
        Some(v) if !(0..=1024).contains(v.get_ref()) => {
            return Err(src.invalid(
                Some(v.span()),
                "session_threads",
                "must be between 0 (one per CPU) and 1024".into(),
            ))
        }
        Some(v) if *v.get_ref() > 0 => *v.get_ref() as usize,
        _ => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };

    let mut backends = Vec::new();
    for (i, b) in raw.backends.iter().enumerate() {
        let key = format!("backends[{i}].url");
        let url = BackendUrl::parse(b.url.get_ref())
            .map_err(|m| src.invalid(Some(b.url.span()), &key, m))?;
        let pool_size = match &b.pool_size {
            Some(p) if *p.get_ref() < 1 => {
                return Err(src.invalid(
                    Some(p.span()),
                    &format!("backends[{i}].pool_size"),
                    "must be at least 1".into(),
                ))
            }
            Some(p) => *p.get_ref() as usize,
            None => 8,
        };
        backends.push(BackendConfig {
            name: b.name.clone().unwrap_or_else(|| format!("backend{i}")),
            url,
            role: b.role.unwrap_or(if i == 0 {
                BackendRole::Primary
            } else {
                BackendRole::Replica
            }),
            pool_size,
        });
    }
    if let Some(p) = &overrides.primary {
        let url = BackendUrl::parse(p).map_err(|m| src.invalid(None, "--primary", m))?;
        backends.retain(|b| b.role != BackendRole::Primary);
        backends.insert(
            0,
            BackendConfig {
                name: "primary".into(),
                url,
                role: BackendRole::Primary,
                pool_size: 8,
            },
        );
    }
    if !overrides.replicas.is_empty() {
        backends.retain(|b| b.role != BackendRole::Replica);
        for (i, r) in overrides.replicas.iter().enumerate() {
            let url = BackendUrl::parse(r).map_err(|m| src.invalid(None, "--replica", m))?;
            backends.push(BackendConfig {
                name: format!("replica{}", i + 1),
                url,
                role: BackendRole::Replica,
                pool_size: 8,
            });
        }
    }
    let primaries = backends
        .iter()
        .filter(|b| b.role == BackendRole::Primary)
        .count();
    if primaries != 1 {
        let span = raw.backends.first().map(|b| b.url.span());
        return Err(src.invalid(
            span,
            "backends",
            format!(
                "exactly one backend with role = \"primary\" is needed (or --primary), found {primaries}"
            ),
        ));
    }
    let mut names = std::collections::HashSet::new();
    for b in &backends {
        if !names.insert(b.name.clone()) {
            return Err(src.invalid(
                None,
                "backends.name",
                format!("duplicate name {:?}", b.name),
            ));
        }
    }

    let mut users = Vec::new();
    for (i, u) in raw.users.iter().enumerate() {
        if let Some(v) = &u.scram_verifier {
            if crate::server::auth::parse_scram_verifier(v.get_ref()).is_none() {
                return Err(src.invalid(
                    Some(v.span()),
                    &format!("users[{i}].scram_verifier"),
                    "expected SCRAM-SHA-256$<iterations>:<salt>$<stored key>:<server key>".into(),
                ));
            }
        }
        if u.password.is_none() && u.scram_verifier.is_none() {
            return Err(src.invalid(
                None,
                &format!("users[{i}]"),
                format!("user {:?} needs password or scram_verifier", u.name),
            ));
        }
        users.push(UserConfig {
            name: u.name.clone(),
            password: u.password.clone(),
            scram_verifier: u.scram_verifier.as_ref().map(|v| v.get_ref().clone()),
        });
    }

    let mut tls = TlsConfig::default();
    if let Some(t) = &raw.tls {
        tls.mode = t.mode.unwrap_or_default();
        tls.cert = t.cert.as_ref().map(|c| PathBuf::from(c.get_ref()));
        tls.key = t.key.as_ref().map(|c| PathBuf::from(c.get_ref()));
        if tls.mode != TlsMode::Disable {
            for (field, value) in [("cert", &t.cert), ("key", &t.key)] {
                match value {
                    None => {
                        return Err(src.invalid(
                            None,
                            &format!("tls.{field}"),
                            format!("tls.mode = {:?} needs tls.{field}", tls.mode),
                        ))
                    }
                    Some(v) if !Path::new(v.get_ref()).is_file() => {
                        return Err(src.invalid(
                            Some(v.span()),
                            &format!("tls.{field}"),
                            format!("no such file {:?}", v.get_ref()),
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
    }

    let backend_idle_timeout = match &raw.backend_idle_timeout_secs {
        Some(v) if *v.get_ref() < 0 => {
            return Err(src.invalid(
                Some(v.span()),
                "backend_idle_timeout_secs",
                "must not be negative".into(),
            ))
        }
        Some(v) => std::time::Duration::from_secs(*v.get_ref() as u64),
        None => std::time::Duration::from_secs(60),
    };

    let mut fanout = FanoutConfig::default();
    if let Some(f) = &raw.fanout {
        let non_negative = |v: &Option<Spanned<i64>>, key: &str, min: i64| match v {
            Some(v) if *v.get_ref() < min => Err(src.invalid(
                Some(v.span()),
                &format!("fanout.{key}"),
                format!("must be at least {min}"),
            )),
            Some(v) => Ok(Some(*v.get_ref() as u64)),
            None => Ok(None),
        };
        fanout.enabled = f.enabled.unwrap_or(true);
        if let Some(v) = non_negative(&f.min_fragment_pages, "min_fragment_pages", 1)? {
            fanout.min_fragment_pages = v;
        }
        if let Some(v) = non_negative(&f.max_fragments, "max_fragments", 1)? {
            fanout.max_fragments = v as usize;
        }
        if let Some(v) = non_negative(&f.max_replica_lag_bytes, "max_replica_lag_bytes", 0)? {
            fanout.max_replica_lag_bytes = v;
        }
        if let Some(v) = non_negative(&f.catalog_ttl_secs, "catalog_ttl_secs", 0)? {
            fanout.catalog_ttl = std::time::Duration::from_secs(v);
        }
        if let Some(v) = non_negative(&f.min_rows_per_group, "min_rows_per_group", 0)? {
            fanout.min_rows_per_group = v;
        }
        if let Some(d) = f.dispatch {
            fanout.dispatch = d;
        }
        if let Some(v) = non_negative(&f.max_fragment_connections, "max_fragment_connections", 1)? {
            fanout.max_fragment_connections = v as usize;
        }
        if let Some(v) = non_negative(&f.fragments_per_connection, "fragments_per_connection", 1)? {
            fanout.fragments_per_connection = v as usize;
        }
        let non_negative_f64 = |v: &Option<Spanned<f64>>, key: &str| match v {
            Some(v) if !(*v.get_ref() >= 0.0 && v.get_ref().is_finite()) => Err(src.invalid(
                Some(v.span()),
                &format!("fanout.{key}"),
                "must be a number of at least 0".into(),
            )),
            Some(v) => Ok(Some(*v.get_ref())),
            None => Ok(None),
        };
        if let Some(v) = non_negative_f64(&f.hedge_after, "hedge_after")? {
            fanout.hedge_after = v;
        }
        if let Some(v) = non_negative_f64(&f.fragment_timeout_secs, "fragment_timeout_secs")? {
            fanout.fragment_timeout = (v > 0.0).then(|| std::time::Duration::from_secs_f64(v));
        }
        if let Some(v) = non_negative(&f.health_check_interval_ms, "health_check_interval_ms", 10)?
        {
            fanout.health_check_interval = std::time::Duration::from_millis(v);
        }
        if let Some(v) = non_negative(&f.ban_after_failures, "ban_after_failures", 1)? {
            fanout.ban_after_failures = u32::try_from(v).unwrap_or(u32::MAX);
        }
        if let Some(v) = non_negative(&f.slow_start_ms, "slow_start_ms", 0)? {
            fanout.slow_start = std::time::Duration::from_millis(v);
        }
        fanout.split_columns = f
            .tables
            .iter()
            .map(|t| (t.name.clone(), t.split_column.clone()))
            .collect();
    }
    if let Some(n) = overrides.max_fragments {
        fanout.max_fragments = n.max(1);
    }
    if let Some(n) = overrides.min_fragment_pages {
        fanout.min_fragment_pages = n.max(1);
    }

    Ok(Config {
        fanout,
        reuse_backend_connections: raw.reuse_backend_connections.unwrap_or(true),
        backend_idle_timeout,
        listen,
        metrics_listen,
        auth,
        force_trust,
        max_client_connections,
        session_threads,
        session_scheduling: raw.session_scheduling.unwrap_or_default(),
        backends,
        users,
        tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_primary() -> Overrides {
        Overrides {
            primary: Some("postgres://127.0.0.1:5432".into()),
            ..Default::default()
        }
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = parse(
            "p.toml",
            "listen = \"127.0.0.1:1\"\nbogus = 1\n",
            &with_primary(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("bogus"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn session_scheduling_defaults_to_batch_and_rejects_unknown_policies() {
        let c = parse("p.toml", "", &with_primary()).unwrap();
        assert_eq!(c.session_scheduling, SessionScheduling::Batch);
        let c = parse(
            "p.toml",
            "session_scheduling = \"normal\"\n",
            &with_primary(),
        )
        .unwrap();
        assert_eq!(c.session_scheduling, SessionScheduling::Normal);
        let err = parse(
            "p.toml",
            "listen = \"127.0.0.1:1\"\nsession_scheduling = \"fifo\"\n",
            &with_primary(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("line 2") && err.contains("session_scheduling") && err.contains("fifo"),
            "{err}"
        );
    }

    #[test]
    fn bad_url_names_line() {
        let text = "[[backends]]\nname = \"p\"\nurl = \"mysql://x\"\n";
        let err = parse("p.toml", text, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 3") && err.contains("backends[0].url"),
            "{err}"
        );
    }

    #[test]
    fn trust_needs_loopback() {
        let o = Overrides {
            listen: Some("0.0.0.0:6432".into()),
            ..with_primary()
        };
        assert!(parse("x", "", &o).is_err());
        let o = Overrides {
            force_trust: true,
            ..o
        };
        assert!(parse("x", "", &o).is_ok());
    }

    #[test]
    fn url_fields() {
        let u =
            BackendUrl::parse("postgres://bob:p%40ss@db.local:5433/app?sslmode=require").unwrap();
        assert_eq!(u.user.as_deref(), Some("bob"));
        assert_eq!(u.password.as_deref(), Some("p@ss"));
        assert_eq!(u.database.as_deref(), Some("app"));
        assert_eq!(u.port, 5433);
        assert_eq!(u.sslmode, BackendSslMode::Require);
        let u = BackendUrl::parse("postgres://127.0.0.1").unwrap();
        assert_eq!(u.unix_socket(), None);
        assert_eq!((u.user, u.database, u.port), (None, None, 5432));
        assert!(BackendUrl::parse("postgres:///app").is_err());
        assert!(BackendUrl::parse("postgres://h/?port=x").is_err());
    }

    #[test]
    fn unix_socket_urls() {
        let sock = Some(PathBuf::from("/var/run/postgresql/.s.PGSQL.5433"));
        let u = BackendUrl::parse("postgres://%2Fvar%2Frun%2Fpostgresql:5433/app").unwrap();
        assert_eq!(
            (u.host.as_str(), u.database.as_deref()),
            ("/var/run/postgresql", Some("app"))
        );
        assert_eq!(u.unix_socket(), sock);
        let u = BackendUrl::parse("postgresql:///app?host=/var/run/postgresql&port=5433").unwrap();
        assert_eq!(u.unix_socket(), sock);
        assert_eq!(u.address(), "/var/run/postgresql/.s.PGSQL.5433");
        // host= overrides the authority's host, as in libpq
        let u = BackendUrl::parse("postgres://db.local?host=%2Ftmp").unwrap();
        assert_eq!(u.unix_socket(), Some(PathBuf::from("/tmp/.s.PGSQL.5432")));
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../proxy.toml");
        let cfg = parse("proxy.toml", text, &Overrides::default()).unwrap();
        assert_eq!(cfg.primary().role, BackendRole::Primary);
    }
}
