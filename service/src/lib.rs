//! An HTTP service on `cqrs`: orders that are placed, paid, shipped or cancelled, served by
//! axum on the embedded SQLite store or on PostgreSQL, or, with the feature `dynamodb`, on
//! DynamoDB (with `lambda`, the binary `cqrs-service-lambda` serves the same router on AWS
//! Lambda through `lambda_http`: `docs/adr/0018-service-on-lambda.md`).
//!
//! * **Commands** are a `POST` each (`/orders`, `/orders/{id}/payment`, `/orders/{id}/shipment`,
//!   `/orders/{id}/cancellation`) with a JSON body. Every error is
//!   `application/problem+json` (RFC 9457) with a stable `type` ([`Problem`]); a body that is
//!   not JSON, is too large, has an unknown field or the wrong content type is a `4xx` problem
//!   and stores nothing.
//! * **`ETag` / `If-Match`.** A command's response, and an order's `GET`, carry the order's
//!   sequence as its `ETag` (`"3"`). A command sent with `If-Match: "3"` runs only on an order
//!   still at sequence 3, else answers `412 Precondition Failed`; the framework's optimistic
//!   append makes the check and the write one decision.
//! * **`Idempotency-Key`.** A command sent again with the same key (and the same request)
//!   gets the first outcome back, with `Idempotent-Replayed: true`, and appends nothing:
//!   the outcome is kept in a table of the same database, so it survives a restart, for
//!   [`Config::idempotency_retention`] (24 h) from the first request: a retry after that is a
//!   new request.
//! * **Read your writes.** A command's response carries `Consistency-Token`: the global
//!   position of its last event. A `GET` that sends it back waits (up to
//!   [`Config::consistency_wait`]) for the view to reach it, or answers `503` with
//!   `Retry-After`.
//! * **`GET /openapi.json`** is the API's OpenAPI 3.1 document, generated from the handlers
//!   (utoipa); `service/openapi.json` is its reviewed copy.
//! * **Observability.** Each request's `x-request-id` names its `tracing` span and is the
//!   `correlation_id` of the events its command appends (their field; an id that is not a
//!   UUID also as sent, in their metadata); spans nest request →
//!   command → dispatch → append. **`GET /metrics`** is Prometheus's text format: commands by
//!   outcome, append conflicts, idempotent replays, append latency, the view's lag.
//! * **`GET /operator`** is a server-rendered page for operators: the projection's checkpoint
//!   and lag, the aggregates with their event counts (each order's events at
//!   `/operator/orders/{id}`), and the events the projection skipped as dead letters. The
//!   pages answer `404` unless [`Config::operator_token`] is set, and `401` to a request
//!   without `Authorization: Bearer <token>`.
//!
//! The design and its reasons are in `docs/adr/0015-http-service.md`.
//!
//! ```no_run
//! use cqrs_service::{Config, Database, Service};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let service = Service::start(Config::new(Database::Sqlite("orders.sqlite".into()))).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! cqrs_service::serve(listener, service, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![warn(unreachable_pub)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cqrs::{CQRSError, CQRSFramework, PoisonPolicy, Projection, ProjectionHandle, RetryPolicy};

mod db;
mod http;
mod metrics;
mod openapi;
mod operator;
mod order;
mod problem;
mod reply;

pub use crate::db::Database;
pub use crate::http::{correlation_uuid, CONSISTENCY_TOKEN, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED};
pub use crate::order::{
    Order, OrderAction, OrderCommand, OrderError, OrderEvent, OrderLine, OrderState, OrderStatus,
    OrderSummary, Shipment,
};
pub use crate::problem::{Problem, PROBLEM_JSON, PROBLEM_TYPE_BASE};

/// How the service runs: its database and its limits.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// Where events, views and idempotency keys are kept.
    pub database: Database,
    /// How long a query with a `Consistency-Token` waits for the view before it answers
    /// `503` (default 2 s).
    pub consistency_wait: Duration,
    /// How long a request with an idempotency key waits for another request holding the
    /// same key before it answers `409` (default 10 s).
    pub idempotency_wait: Duration,
    /// How long a claimed idempotency key stays with its request before another request
    /// may take it over: the request's process is then taken to have died (default 30 s).
    pub idempotency_lease: Duration,
    /// The largest request body accepted, in bytes (default 64 KiB); larger is `413`.
    pub body_limit: usize,
    /// How many times a command that lost a race is run again on the fresh state before
    /// the service answers `409` (default 5 attempts).
    pub retry_attempts: u32,
    /// How long an idempotency key with a stored outcome is kept, counted from the first
    /// request that used it (default 24 h). A background task deletes older ones; a retry
    /// with a deleted key is a new request, so clients retry within this time.
    pub idempotency_retention: Duration,
    /// The bearer token the operator pages ask for; without one (the default) they answer
    /// `404`.
    pub operator_token: Option<OperatorToken>,
    /// A query whose `Consistency-Token` the running projection has not reached catches the
    /// view up itself before it waits (default off). For a process that is frozen between
    /// requests, as on AWS Lambda, where the projection's background task runs only while a
    /// request does: see `docs/adr/0018-service-on-lambda.md`.
    pub inline_catch_up: bool,
}

/// The bearer token of the operator pages. Its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct OperatorToken(String);

impl OperatorToken {
    /// The token, or `None` when `token` is empty (an empty token would let an empty
    /// `Authorization: Bearer` in).
    pub fn new(token: impl Into<String>) -> Option<OperatorToken> {
        let token = token.into();
        (!token.is_empty()).then_some(OperatorToken(token))
    }

    /// True when `candidate` is the token, compared in time that does not depend on where
    /// they differ.
    pub(crate) fn matches(&self, candidate: &str) -> bool {
        use subtle::ConstantTimeEq as _;
        bool::from(self.0.as_bytes().ct_eq(candidate.as_bytes()))
    }
}

impl std::fmt::Debug for OperatorToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OperatorToken(..)")
    }
}

impl Config {
    /// The defaults, on `database`.
    pub fn new(database: Database) -> Self {
        Config {
            database,
            consistency_wait: Duration::from_secs(2),
            idempotency_wait: Duration::from_secs(10),
            idempotency_lease: Duration::from_secs(30),
            body_limit: 64 * 1024,
            retry_attempts: 5,
            idempotency_retention: Duration::from_secs(24 * 60 * 60),
            operator_token: None,
            inline_catch_up: false,
        }
    }

    /// The same configuration with queries that catch the view up themselves when it is
    /// behind their `Consistency-Token` (see [`Config::inline_catch_up`]).
    #[must_use]
    pub fn with_inline_catch_up(mut self, inline: bool) -> Self {
        self.inline_catch_up = inline;
        self
    }

    /// The same configuration with another retention for completed idempotency keys.
    #[must_use]
    pub fn with_idempotency_retention(mut self, retention: Duration) -> Self {
        self.idempotency_retention = retention;
        self
    }

    /// The same configuration with the operator pages behind `token` (`Authorization:
    /// Bearer <token>`); an empty `token` leaves them off.
    #[must_use]
    pub fn with_operator_token(mut self, token: impl Into<String>) -> Self {
        self.operator_token = OperatorToken::new(token);
        self
    }

    /// The same configuration with another consistency wait.
    #[must_use]
    pub fn with_consistency_wait(mut self, wait: Duration) -> Self {
        self.consistency_wait = wait;
        self
    }

    /// The same configuration with another idempotency lease.
    #[must_use]
    pub fn with_idempotency_lease(mut self, lease: Duration) -> Self {
        self.idempotency_lease = lease;
        self
    }

    /// The same configuration with another wait for a request holding the same idempotency
    /// key.
    #[must_use]
    pub fn with_idempotency_wait(mut self, wait: Duration) -> Self {
        self.idempotency_wait = wait;
        self
    }

    /// The same configuration with another number of attempts for a command that lost a
    /// race.
    #[must_use]
    pub fn with_retry_attempts(mut self, attempts: u32) -> Self {
        self.retry_attempts = attempts;
        self
    }

    /// The same configuration with another body limit.
    #[must_use]
    pub fn with_body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }
}

/// What the routes share.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) framework: CQRSFramework<Order>,
    pub(crate) stores: db::Stores,
    pub(crate) projection: ProjectionHandle,
    /// The projection a query runs itself under [`Config::inline_catch_up`]: the same view
    /// and checkpoint as the running one (their commits are conditional on the checkpoint,
    /// so the two never apply an event twice).
    pub(crate) inline: Option<Projection<Order, OrderSummary>>,
    pub(crate) metrics: Arc<metrics::Metrics>,
    /// The task that deletes expired idempotency keys.
    pruner: tokio::task::AbortHandle,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.pruner.abort();
    }
}

/// How often the background task deletes expired idempotency keys.
const PRUNE_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// The most keys one statement of the prune deletes.
const PRUNE_BATCH: i64 = 1000;
/// The most statements one prune runs: a run deletes at most this many batches, and the
/// next run goes on.
const PRUNE_BATCHES: u32 = 10;

/// Deletes the idempotency keys with a stored outcome claimed more than `retention` before
/// `now`, a batch at a time, at most [`PRUNE_BATCHES`] batches; counts them in `metrics`.
async fn prune_keys(
    keys: &db::KeyTable,
    metrics: &metrics::Metrics,
    retention: Duration,
    now: std::time::SystemTime,
) -> Result<u64, CQRSError> {
    let cutoff = now.checked_sub(retention).unwrap_or(std::time::UNIX_EPOCH);
    let before = cutoff
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        });
    let mut pruned = 0;
    for _ in 0..PRUNE_BATCHES {
        let deleted = keys.prune(before, PRUNE_BATCH).await?;
        metrics.keys_pruned(deleted);
        pruned += deleted;
        if deleted < PRUNE_BATCH.unsigned_abs() {
            break;
        }
    }
    Ok(pruned)
}

/// The projection of the order view on `stores`.
fn order_projection(stores: &db::Stores, database: &Database) -> Projection<Order, OrderSummary> {
    // A poison event is skipped and recorded (the operator page lists it), so one bad
    // row does not stop the view for every order.
    let mut projection = Projection::<Order, OrderSummary>::new(
        Arc::clone(&stores.events),
        Arc::clone(&stores.views),
    )
    .with_poison_policy(PoisonPolicy::SkipAndRecord)
    .with_dead_letters(Arc::clone(&stores.dead_letters));
    match database {
        Database::Sqlite(_) => {
            // A view load on SQLite is a local read on the store's pool: loading a batch's
            // rows in parallel only wakes more of its worker threads, on the cores the
            // requests need (measured in docs/benchmarks.md, "The service under load").
            // With one load, a batch reads all its rows with one query.
            projection = projection.with_load_concurrency(1);
        }
        Database::Postgres { .. } => {}
        #[cfg(feature = "dynamodb")]
        Database::DynamoDb { .. } => {
            // A batch's rows and checkpoint are one transaction of at most 100 items.
            projection = projection.with_batch_size(cqrs_aws::MAX_VIEW_ROWS_PER_COMMIT);
        }
    }
    projection
}

/// The running service: the framework, the projection that keeps the order view, and the
/// router over them.
#[derive(Clone)]
pub struct Service {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("config", &self.shared.config)
            .field("projection", &self.shared.projection)
            .finish()
    }
}

impl Service {
    /// Opens the database (creating its tables) and starts the projection of the order
    /// view.
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] when the database cannot be opened or migrated.
    pub async fn start(config: Config) -> Result<Service, CQRSError> {
        let mut stores = db::Stores::open(&config.database).await?;
        let metrics = Arc::new(metrics::Metrics::default());
        stores.events = Arc::new(metrics::MeteredEvents {
            inner: Arc::clone(&stores.events),
            metrics: Arc::clone(&metrics),
        });
        let framework = CQRSFramework::<Order>::new(Arc::clone(&stores.events))
            .with_retry(RetryPolicy::attempts(config.retry_attempts));
        let projection = order_projection(&stores, &config.database).start();
        let inline = config
            .inline_catch_up
            .then(|| order_projection(&stores, &config.database));
        let pruner = {
            let keys = stores.keys.clone();
            let metrics = Arc::clone(&metrics);
            let retention = config.idempotency_retention;
            tokio::spawn(async move {
                // The first run is one interval after the start, not at it.
                let start = tokio::time::Instant::now() + PRUNE_INTERVAL;
                let mut ticks = tokio::time::interval_at(start, PRUNE_INTERVAL);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    let now = std::time::SystemTime::now();
                    match prune_keys(&keys, &metrics, retention, now).await {
                        Ok(0) => {}
                        Ok(pruned) => tracing::info!(pruned, "expired idempotency keys deleted"),
                        Err(error) => {
                            tracing::warn!(%error, "could not delete expired idempotency keys");
                        }
                    }
                }
            })
            .abort_handle()
        };
        Ok(Service {
            shared: Arc::new(Shared {
                config,
                framework,
                stores,
                projection,
                inline,
                metrics,
                pruner,
            }),
        })
    }

    /// Deletes the idempotency keys with a stored outcome that were first used more than
    /// [`Config::idempotency_retention`] before `now`: what the background task does every
    /// few minutes, in bounded batches. Keys whose request is still running are kept.
    /// Returns how many keys were deleted (at most 10,000 per call; call again for more).
    ///
    /// # Errors
    /// [`CQRSError::PersistenceError`] when the database fails.
    pub async fn prune_idempotency_keys(
        &self,
        now: std::time::SystemTime,
    ) -> Result<u64, CQRSError> {
        let shared = &self.shared;
        prune_keys(
            &shared.stores.keys,
            &shared.metrics,
            shared.config.idempotency_retention,
            now,
        )
        .await
    }

    /// The routes, to serve with axum (see [`serve`]) or to call in a test.
    pub fn router(&self) -> axum::Router {
        http::router(Arc::clone(&self.shared))
    }

    /// The position the order view has reached.
    pub fn view_position(&self) -> i64 {
        self.shared.projection.position()
    }

    /// True once the order view's projection has ended: after [`shutdown`](Self::shutdown),
    /// or on an error it does not retry (the operator page shows it).
    pub fn view_finished(&self) -> bool {
        self.shared.projection.is_finished()
    }

    /// Stops the projection (the view stays where it is; the next start resumes from its
    /// checkpoint). It may still be committing a batch when this returns; see
    /// [`shutdown`](Self::shutdown).
    pub fn stop(&self) {
        self.shared.pruner.abort();
        self.shared.projection.stop();
    }

    /// [`stop`](Self::stop), then waits until the projection has ended: its last batch is
    /// committed (or rolled back) and nothing of the service writes to the database any more.
    pub async fn shutdown(&self) {
        self.stop();
        self.shared.projection.finished().await;
    }
}

/// Serves `service` on `listener` until `shutdown` completes; requests in flight then
/// finish, and the projection commits its last batch and stops, before it returns.
///
/// # Errors
/// The listener's I/O error.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: Service,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let served = axum::serve(listener, service.router())
        .with_graceful_shutdown(shutdown)
        .await;
    service.shutdown().await;
    served
}
