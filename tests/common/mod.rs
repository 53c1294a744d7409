//! Shared harness of the integration tests: the PostgreSQL cluster (`scripts/pg-cluster`),
//! a pgfan child process per test, database set-up and the raw wire client.
//!
//! Environment knobs (for developing the tests themselves):
//! - `PGFAN_TEST_EXTERNAL_CLUSTER=1`: do not run `scripts/pg-cluster start`; read
//!   `PGFAN_PRIMARY_URL`, `PGFAN_REPLICA_URLS`, `PGFAN_PRIMARY_PORT`, `PGFAN_PG_BIN`,
//!   `PGFAN_CLUSTER_DIR` from the environment instead.
//! - `PGFAN_TEST_PROXY=direct`: `Pgfan::start` spawns nothing and points at the primary,
//!   so a differential suite compares the server with itself (a check of the suite).

#![allow(dead_code)]

pub mod diff;
pub mod wire;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where the test cluster is, as printed by `scripts/pg-cluster env`.
#[derive(Clone, Debug)]
pub struct ClusterEnv {
    /// `postgres://postgres@127.0.0.1:<port>/postgres`
    pub primary_url: String,
    pub replica_urls: Vec<String>,
    pub primary_port: u16,
    pub pg_bin: PathBuf,
    pub dir: PathBuf,
}

impl ClusterEnv {
    fn from_lines(text: &str) -> Option<ClusterEnv> {
        let get = |key: &str| {
            text.lines().find_map(|l| {
                let l = l.trim().trim_start_matches("export ");
                l.strip_prefix(key)
                    .and_then(|rest| rest.strip_prefix('='))
                    .map(|v| v.trim().trim_matches('"').trim_matches('\'').to_string())
            })
        };
        let primary_url = get("PGFAN_PRIMARY_URL")?;
        let primary_port = match get("PGFAN_PRIMARY_PORT") {
            Some(p) => p.parse().ok()?,
            None => url::Url::parse(&primary_url).ok()?.port()?,
        };
        let replica_urls = get("PGFAN_REPLICA_URLS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        Some(ClusterEnv {
            primary_url,
            replica_urls,
            primary_port,
            pg_bin: get("PGFAN_PG_BIN").unwrap_or_default().into(),
            dir: get("PGFAN_CLUSTER_DIR").unwrap_or_default().into(),
        })
    }

    /// Host of the primary (normally 127.0.0.1).
    pub fn primary_host(&self) -> String {
        url::Url::parse(&self.primary_url)
            .ok()
            .and_then(|u| u.host_str().map(String::from))
            .unwrap_or_else(|| "127.0.0.1".to_string())
    }

    /// `postgres://127.0.0.1:<port>`: the primary as pgfan's `--primary` takes it (user
    /// and database come from each client's startup packet).
    pub fn primary_host_port(&self) -> String {
        format!("postgres://{}:{}", self.primary_host(), self.primary_port)
    }

    /// `127.0.0.1:<port>` for [`wire::WireClient::connect`].
    pub fn primary_addr(&self) -> String {
        format!("{}:{}", self.primary_host(), self.primary_port)
    }

    /// A tokio-postgres URL of database `db` on the primary.
    pub fn primary_db_url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@{}:{}/{db}",
            self.primary_host(),
            self.primary_port
        )
    }

    /// The replicas as pgfan's `--replica` takes them (host and port only).
    pub fn replica_host_ports(&self) -> Vec<String> {
        self.replica_urls
            .iter()
            .filter_map(|u| {
                let u = url::Url::parse(u).ok()?;
                Some(format!("postgres://{}:{}", u.host_str()?, u.port()?))
            })
            .collect()
    }
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// pgfan configuration for fan-out tests: the primary only (trust), with fragments small
/// enough that test tables of a few hundred pages fan out.
pub fn fanout_config_toml() -> String {
    format!(
        r#"auth = "trust"

[[backends]]
name = "primary"
url = "{}"
role = "primary"
pool_size = 8

[fanout]
min_fragment_pages = 8
max_fragments = 4
"#,
        cluster().primary_host_port()
    )
}

/// [`fanout_config_toml`] with the cluster's replicas as further backends (`replica1`,
/// `replica2`, ...), before its `[fanout]` section (so keys appended to the text still
/// belong to `[fanout]`).
pub fn fanout_config_toml_with_replicas() -> String {
    let base = fanout_config_toml();
    let mut replicas = String::new();
    for (i, url) in cluster().replica_host_ports().iter().enumerate() {
        replicas.push_str(&format!(
            "[[backends]]\nname = \"replica{}\"\nurl = \"{url}\"\nrole = \"replica\"\npool_size = 8\n\n",
            i + 1
        ));
    }
    match base.find("[fanout]") {
        Some(at) => format!("{}{replicas}{}", &base[..at], &base[at..]),
        None => format!("{base}\n{replicas}"),
    }
}

/// Waits until every replica of the cluster has replayed the primary's current WAL
/// position (what was written before the call is then visible on the replicas).
pub async fn wait_for_replicas(limit: Duration) {
    let primary = connect_primary("postgres").await;
    let lsn: String = primary
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("pg_current_wal_lsn()")
        .get(0);
    let deadline = Instant::now() + limit;
    for url in &cluster().replica_urls {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to replica {url}: {e}"));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        loop {
            let row = client
                .query_one(
                    "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false), \
                     pg_last_wal_replay_lsn()::text",
                    &[&lsn],
                )
                .await
                .unwrap_or_else(|e| panic!("replay position of {url}: {e}"));
            if row.get::<_, bool>(0) {
                break;
            }
            if Instant::now() > deadline {
                panic!(
                    "replica {url} has replayed only up to {:?}, not {lsn}, after {limit:?}",
                    row.get::<_, Option<String>>(1)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Starts the test cluster once per test process and returns where it is.
pub fn cluster() -> &'static ClusterEnv {
    static CLUSTER: OnceLock<ClusterEnv> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        if std::env::var_os("PGFAN_TEST_EXTERNAL_CLUSTER").is_some() {
            let text: String = std::env::vars()
                .filter(|(k, _)| k.starts_with("PGFAN_"))
                .map(|(k, v)| format!("{k}={v}\n"))
                .collect();
            return ClusterEnv::from_lines(&text)
                .expect("PGFAN_TEST_EXTERNAL_CLUSTER is set but PGFAN_PRIMARY_URL is not");
        }
        let script = manifest_dir().join("scripts/pg-cluster");
        let run = |arg: &str| {
            let out = Command::new(&script)
                .arg(arg)
                .current_dir(manifest_dir())
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("cannot run {} {arg}: {e}", script.display()));
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            if !out.status.success() {
                panic!(
                    "{} {arg} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
                    script.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            stdout
        };
        let started = run("start");
        ClusterEnv::from_lines(&started)
            .or_else(|| ClusterEnv::from_lines(&run("env")))
            .expect("scripts/pg-cluster env printed no PGFAN_PRIMARY_URL line")
    })
}

/// The rows of a tokio-postgres simple query, as text (`None`: NULL), in the order sent.
pub fn text_rows(messages: &[tokio_postgres::SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}

/// A tokio-postgres connection to database `db` on the primary (the connection task runs
/// on the current runtime).
pub async fn connect_primary(db: &str) -> tokio_postgres::Client {
    let url = cluster().primary_db_url(db);
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// (Re)creates an empty database `name` on the primary.
pub async fn create_database(name: &str) {
    let client = connect_primary("postgres").await;
    let ident = quote_ident(name);
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {ident} WITH (FORCE)"))
        .await
        .unwrap_or_else(|e| panic!("drop database {name}: {e}"));
    client
        .batch_execute(&format!("CREATE DATABASE {ident} TEMPLATE template0"))
        .await
        .unwrap_or_else(|e| panic!("create database {name}: {e}"));
}

/// Drops database `name` if it exists (terminating its sessions).
pub async fn drop_database(name: &str) {
    let client = connect_primary("postgres").await;
    let _ = client
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(name)
        ))
        .await;
}

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A local port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

fn target_dir() -> PathBuf {
    // target/<profile>/pgfan -> target
    let exe = Path::new(env!("CARGO_BIN_EXE_pgfan"));
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest_dir().join("target"))
}

/// `target/test-logs`, created on demand.
pub fn test_logs_dir() -> PathBuf {
    let dir = target_dir().join("test-logs");
    fs::create_dir_all(&dir).expect("create target/test-logs");
    dir
}

fn sanitized_thread_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("test")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The last `max` bytes of a file, lossily decoded.
pub fn file_tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return format!("(no file {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// A running pgfan process, killed on drop.
pub struct Pgfan {
    child: Option<Child>,
    /// Port of the PostgreSQL listener.
    pub port: u16,
    /// Port of the Prometheus metrics listener.
    pub metrics_port: u16,
    pub log_path: PathBuf,
    pub config_path: Option<PathBuf>,
}

impl Pgfan {
    /// Whether `PGFAN_TEST_PROXY=direct` replaces pgfan by the primary itself.
    pub fn direct_mode() -> bool {
        std::env::var("PGFAN_TEST_PROXY").is_ok_and(|v| v == "direct")
    }

    /// Spawns `pgfan --listen .. --metrics-listen .. [--primary ..] [--auth trust] extra..`
    /// (the cluster's primary unless `extra` has `--primary`) and waits until it accepts
    /// TCP connections.
    pub fn start(extra_args: &[&str]) -> Pgfan {
        Self::spawn(None, extra_args)
    }

    /// Like [`Pgfan::start`] with `--config <file>` holding `toml`.
    pub fn start_with_config(toml: &str, extra_args: &[&str]) -> Pgfan {
        Self::spawn(Some(toml), extra_args)
    }

    fn spawn(toml: Option<&str>, extra_args: &[&str]) -> Pgfan {
        // free_port() only finds a port free *now*; another process may take it before
        // pgfan binds it, so a bind failure is retried with fresh ports.
        for attempt in 1.. {
            match Self::spawn_once(toml, extra_args) {
                Ok(p) => return p,
                Err(log) if attempt < 5 && log.contains("Address already in use") => continue,
                Err(log) => panic!("pgfan {extra_args:?} exited before listening:\n{log}"),
            }
        }
        unreachable!()
    }

    fn spawn_once(toml: Option<&str>, extra_args: &[&str]) -> Result<Pgfan, String> {
        let cluster = cluster();
        if Self::direct_mode() {
            return Ok(Pgfan {
                child: None,
                port: cluster.primary_port,
                metrics_port: 0,
                log_path: PathBuf::new(),
                config_path: None,
            });
        }
        let port = free_port();
        let mut metrics_port = free_port();
        while metrics_port == port {
            metrics_port = free_port();
        }
        let name = format!("pgfan-{}-{port}", sanitized_thread_name());
        let logs = test_logs_dir();
        let log_path = logs.join(format!("{name}.log"));
        let config_path = toml.map(|t| {
            let p = logs.join(format!("{name}.toml"));
            fs::write(&p, t).expect("write pgfan config");
            p
        });

        let mut args: Vec<String> = Vec::new();
        if let Some(p) = &config_path {
            args.push("--config".into());
            args.push(p.display().to_string());
        }
        let has_flag = |flag: &str| {
            extra_args
                .iter()
                .any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
        };
        args.extend([
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
            "--metrics-listen".to_string(),
            format!("127.0.0.1:{metrics_port}"),
        ]);
        // the cluster's primary over TCP unless the test names it another way
        if !has_flag("--primary") {
            args.extend(["--primary".to_string(), cluster.primary_host_port()]);
        }
        if config_path.is_none() && !has_flag("--auth") && !has_flag("--config") {
            args.push("--auth".into());
            args.push("trust".into());
        }
        args.extend(extra_args.iter().map(|s| s.to_string()));

        let log = fs::File::create(&log_path).expect("create pgfan log");
        let log_err = log.try_clone().expect("clone log handle");
        let child = Command::new(env!("CARGO_BIN_EXE_pgfan"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn pgfan {args:?}: {e}"));
        let mut pgfan = Pgfan {
            child: Some(child),
            port,
            metrics_port,
            log_path,
            config_path,
        };
        pgfan.wait_ready(&args)?;
        Ok(pgfan)
    }

    /// Ready when the port answers an SSLRequest with `N` or `S`: a plain TCP connect can
    /// succeed against something else (a self-connect on an ephemeral port).
    fn probe(addr: &SocketAddr) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = TcpStream::connect_timeout(addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).is_err() {
            return false;
        }
        let mut answer = [0u8; 1];
        matches!(s.read(&mut answer), Ok(1) if answer[0] == b'N' || answer[0] == b'S')
    }

    fn wait_ready(&mut self, args: &[String]) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr: SocketAddr = self.addr().parse().expect("listen addr");
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "pgfan {args:?} exited with {status} before listening; log {}:\n{}",
                        self.log_path.display(),
                        self.log_tail()
                    ));
                }
            }
            if Self::probe(&addr) {
                return Ok(());
            }
            if Instant::now() > deadline {
                panic!(
                    "pgfan {args:?} did not accept connections on {addr} within 20 s; log {}:\n{}",
                    self.log_path.display(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:<port>`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `postgres://postgres@127.0.0.1:<port>/<db>`
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// `http://127.0.0.1:<metrics_port>/metrics`
    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.metrics_port)
    }

    /// The last 8 KiB of pgfan's log.
    pub fn log_tail(&self) -> String {
        if self.child.is_none() {
            return "(direct mode: no pgfan process)".into();
        }
        file_tail(&self.log_path, 8192)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// Process id of the pgfan child (None in direct mode).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the process now.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Pgfan {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A command for one of the cluster's PostgreSQL client programs (psql, pgbench): the
/// cluster's binaries first on PATH, no pager, no standard input, and none of the libpq
/// environment variables of the developer's shell (so only the arguments decide where it
/// connects and how).
pub fn pg_tool(program: &str) -> tokio::process::Command {
    let cluster = cluster();
    let old_path = std::env::var("PATH").unwrap_or_default();
    let mut cmd = tokio::process::Command::new(cluster.pg_bin.join(program));
    cmd.env("PATH", format!("{}:{old_path}", cluster.pg_bin.display()))
        .env("PAGER", "")
        .env("PSQL_PAGER", "")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for var in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGPASSWORD",
        "PGSSLMODE",
        "PGCHANNELBINDING",
        "PGOPTIONS",
        "PGAPPNAME",
        "PGSERVICE",
        "PSQLRC",
    ] {
        cmd.env_remove(var);
    }
    // a missing passfile keeps ~/.pgpass out of it
    cmd.env("PGPASSFILE", "/nonexistent/pgfan-test-pgpass");
    cmd
}

/// Runs `cmd` to completion, failing the test if it takes longer than `limit`.
pub async fn output_within(
    mut cmd: tokio::process::Command,
    limit: Duration,
    what: &str,
) -> std::process::Output {
    tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
        .unwrap_or_else(|e| panic!("run {what}: {e}"))
}

/// Exit code, stdout and stderr of a finished program, for assertion messages.
pub fn show(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `select count(*) …` (or any single bigint) on a tokio-postgres client.
pub async fn query_i64(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// pgfan's Prometheus page (GET /metrics over a plain TcpStream).
pub async fn scrape(pgfan: &Pgfan) -> String {
    let port = pgfan.metrics_port;
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("connect to metrics port {port}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("set_read_timeout");
        s.write_all(
            b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAccept: */*\r\n\r\n",
        )
        .expect("send HTTP request");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).expect("read HTTP response");
        let text = String::from_utf8(buf).expect("utf8 response");
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP header end in {text:?}"));
        assert!(
            head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
            "metrics status: {head}"
        );
        body.to_string()
    })
    .await
    .expect("scrape task")
}

/// Samples of a Prometheus text page: `name{labels}` -> value.
pub fn samples(page: &str) -> std::collections::BTreeMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// A tokio-postgres client through pgfan (or the primary in direct mode).
pub async fn connect_pgfan(pgfan: &Pgfan, db: &str) -> tokio_postgres::Client {
    let url = pgfan.url(db);
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect through pgfan {url}: {e}\n{}", pgfan.log_tail()));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// The integer after `label` on the line that starts with it.
pub fn field(stdout: &str, label: &str) -> Option<u64> {
    stdout.lines().find_map(|l| {
        l.trim()
            .strip_prefix(label)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
    })
}
