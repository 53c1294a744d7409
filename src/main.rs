//! `pgfan` command line: run the proxy, or `pgfan check` a configuration.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use pgfan::config::{self, AuthMethod, Overrides};
use pgfan::server;
use tracing_subscriber::EnvFilter;

/// PostgreSQL proxy that fans analytical SELECTs out over backend pools.
#[derive(Debug, Parser)]
#[command(name = "pgfan", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    flags: Flags,
}

#[derive(Debug, clap::Args)]
struct Flags {
    /// Configuration file (proxy.toml).
    #[arg(long, short = 'c', global = true)]
    config: Option<PathBuf>,
    /// Client listen address, e.g. 127.0.0.1:6432.
    #[arg(long)]
    listen: Option<String>,
    /// Primary backend URL: postgres://[user[:password]@]host[:port][/db][?sslmode=…].
    #[arg(long)]
    primary: Option<String>,
    /// Replica backend URL (repeatable); replaces the file's replicas.
    #[arg(long)]
    replica: Vec<String>,
    /// Prometheus exporter address, e.g. 127.0.0.1:9187.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Client authentication method.
    #[arg(long, value_enum)]
    auth: Option<AuthMethod>,
    /// Allow trust authentication on a non-loopback listen address.
    #[arg(long)]
    force_trust: bool,
    /// Upper bound on fragments per fanned-out query (overrides fanout.max_fragments).
    #[arg(long)]
    max_fragments: Option<usize>,
    /// Tables with fewer heap pages pass through (overrides fanout.min_fragment_pages).
    #[arg(long)]
    min_fragment_pages: Option<u64>,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG wins when set.
    #[arg(long, default_value = "info")]
    log: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the configuration and exit (non-zero with the key and line on error).
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = Overrides {
        listen: cli.flags.listen.clone(),
        primary: cli.flags.primary.clone(),
        replicas: cli.flags.replica.clone(),
        metrics_listen: cli.flags.metrics_listen.clone(),
        auth: cli.flags.auth,
        force_trust: cli.flags.force_trust,
        max_fragments: cli.flags.max_fragments,
        min_fragment_pages: cli.flags.min_fragment_pages,
    };
    let config = match config::load(cli.flags.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgfan: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Check) = cli.command {
        println!(
            "{}: ok ({} backend(s), {} user(s), auth {:?}, tls {:?})",
            cli.flags
                .config
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "<command line>".into()),
            config.backends.len(),
            config.users.len(),
            config.auth,
            config.tls.mode
        );
        return ExitCode::SUCCESS;
    }

    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cli.flags.log));
    tracing_subscriber::fmt().with_env_filter(filter).init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgfan: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let metrics = match pgfan::metrics::install() {
            Ok(handle) => handle,
            Err(e) => {
                eprintln!("pgfan: metrics: {e}");
                return ExitCode::FAILURE;
            }
        };
        let config = Arc::new(config);
        let ctx = match server::ServerContext::new(config.clone()) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                eprintln!("pgfan: {e}");
                return ExitCode::FAILURE;
            }
        };
        let listener = match server::bind(&config).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("pgfan: {e}");
                return ExitCode::FAILURE;
            }
        };
        // the session threads' metric tallies go into the registry before it is read
        let publish = {
            let ctx = ctx.clone();
            move || ctx.metrics.session.publish()
        };
        if let Some(addr) = config.metrics_listen {
            let metrics_listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("pgfan: metrics: cannot listen on {addr}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            tokio::spawn(pgfan::metrics::serve(
                metrics_listener,
                metrics.clone(),
                publish.clone(),
            ));
        }
        tokio::spawn(pgfan::metrics::keep_up(metrics, publish));
        tokio::select! {
            r = server::serve(listener, ctx) => match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pgfan: {e}");
                    ExitCode::FAILURE
                }
            },
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted, shutting down");
                ExitCode::SUCCESS
            }
        }
    })
}
