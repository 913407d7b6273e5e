//! `cqrs-service`: the order service over HTTP.
//!
//! ```text
//! cargo run -p cqrs-service -- --sqlite orders.sqlite --listen 127.0.0.1:8080
//! cargo run -p cqrs-service -- --postgres postgres://postgres@127.0.0.1:5432/orders
//! CQRS_SERVICE_OPERATOR_TOKEN=secret cargo run -p cqrs-service  # with the operator pages
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use cqrs_service::{Config, Database, Service};

/// Orders with payment and shipping over HTTP, on cqrs.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The SQLite file to keep events, views and idempotency keys in (created if missing).
    #[arg(long, value_name = "FILE", conflicts_with = "postgres")]
    sqlite: Option<PathBuf>,
    /// A PostgreSQL server to keep them in instead.
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,
    /// The PostgreSQL schema to keep the tables in (created if missing).
    #[arg(long, value_name = "NAME", requires = "postgres", default_value = None)]
    schema: Option<String>,
    /// The address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// How many hours an idempotency key with a stored outcome is kept; a retry after that
    /// is a new request.
    #[arg(long, value_name = "HOURS", default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=24 * 365))]
    idempotency_retention_hours: u64,
    /// The bearer token of the operator pages (`/operator`); without one they answer 404.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "CQRS_SERVICE_OPERATOR_TOKEN",
        hide_env_values = true
    )]
    operator_token: Option<String>,
}

/// mimalloc: a request allocates and frees many small buffers across the runtime's worker
/// threads, where it costs less CPU than the system's allocator (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let database = match (args.sqlite, args.postgres) {
        (_, Some(url)) => Database::Postgres {
            url,
            schema: args.schema,
        },
        (Some(path), None) => Database::Sqlite(path),
        (None, None) => Database::Sqlite("orders.sqlite".into()),
    };
    let mut config = Config::new(database).with_idempotency_retention(Duration::from_secs(
        args.idempotency_retention_hours * 60 * 60,
    ));
    match args.operator_token {
        Some(token) if token.is_empty() => {
            eprintln!("cqrs-service: the operator token is empty");
            return ExitCode::FAILURE;
        }
        Some(token) => {
            config = config.with_operator_token(token);
            tracing::info!("operator pages on, behind the operator token");
        }
        None => tracing::info!(
            "operator pages off (404): start with --operator-token or \
             CQRS_SERVICE_OPERATOR_TOKEN to serve them"
        ),
    }
    match run(config, args.listen).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cqrs-service: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, listen: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let service = Service::start(config).await?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(address = %listener.local_addr()?, "listening");
    cqrs_service::serve(listener, service, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
