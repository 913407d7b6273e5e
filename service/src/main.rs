//! `cqrs-service`: the order service over HTTP.
//!
//! ```text
//! cargo run -p cqrs-service -- --sqlite orders.sqlite --listen 127.0.0.1:8080
//! cargo run -p cqrs-service -- --postgres postgres://postgres@127.0.0.1:5432/orders
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

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
}

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
    match run(database, args.listen).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cqrs-service: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(database: Database, listen: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let service = Service::start(Config::new(database)).await?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(address = %listener.local_addr()?, "listening");
    cqrs_service::serve(listener, service, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
