//! The routes: a `POST` per command, `GET` for the view, and the headers that carry
//! idempotency keys, sequences (`ETag` / `If-Match`) and consistency tokens.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use cqrs::{CQRSError, EventRepository, ViewRepository};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tracing::Instrument;
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::db::{Claim, KeyRow};
use crate::openapi::{
    ApiDoc, CommandProblems, ConsistencyTokenHeader, IdempotencyKeyHeader, IfMatchHeader,
    OrderProblems, ProblemBody, QueryProblems,
};
use crate::order::{Order, OrderAction, OrderCommand, OrderEvent, OrderLine, OrderSummary};
use crate::problem::{internal, Problem};
use crate::reply::Reply;
use crate::Shared;

/// The request header that makes a command idempotent.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The header that carries a global position: on a command's response, the position its
/// events reached; on a query, the position the view must have reached before it answers.
pub const CONSISTENCY_TOKEN: &str = "consistency-token";
/// The response header set on a response replayed for an idempotency key.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// The longest idempotency key accepted.
const MAX_KEY_LENGTH: usize = 255;
/// How often a request waits to see whether the request holding its key finished.
const KEY_POLL: Duration = Duration::from_millis(20);

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let body_limit = shared.config.body_limit;
    let (routes, _) = api().split_for_parts();
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(shared)
        // Outermost last: a request gets its `x-request-id`, is traced with it, and the
        // response carries it back.
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// Every route, each registered together with its description in the OpenAPI document.
pub(crate) fn api() -> OpenApiRouter<Arc<Shared>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(place, list))
        .routes(routes!(show))
        .routes(routes!(pay))
        .routes(routes!(ship))
        .routes(routes!(cancel))
        .routes(routes!(openapi_json))
        .routes(routes!(metrics))
        .routes(routes!(crate::operator::overview))
        .routes(routes!(crate::operator::stream))
}

/// The namespace of the correlation ids derived from request ids that are not UUIDs.
const REQUEST_NAMESPACE: Uuid = Uuid::from_u128(0x3f0c_5a9e_8d1b_4e27_b6a4_91c2_7d0e_55aa);

/// The correlation id of the events a request appends: its request id when that is a UUID,
/// else a UUID v5 of the request id's text.
pub fn correlation_uuid(request_id: &str) -> Uuid {
    Uuid::parse_str(request_id)
        .unwrap_or_else(|_| Uuid::new_v5(&REQUEST_NAMESPACE, request_id.as_bytes()))
}

/// The span of one request, carrying its `x-request-id`: the correlation id of the events
/// its command appends.
fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    tracing::info_span!(
        "request",
        method = %request.method(),
        uri = %request.uri(),
        request_id = correlation_id(request.headers()).unwrap_or_default(),
    )
}

/// The request's id (`x-request-id`, set by the router when the client sent none).
fn correlation_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(REQUEST_ID)
        .and_then(|value| value.to_str().ok())
}

/// The header that carries a request's id.
const REQUEST_ID: &str = "x-request-id";

/// The body of `POST /orders`: who orders what.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PlaceOrder {
    /// Who orders.
    customer: String,
    /// What is ordered: at least one line.
    #[schema(min_items = 1)]
    lines: Vec<OrderLine>,
}

/// The body of `POST /orders/{id}/payment`: the order's total, paid.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Pay {
    /// The amount, which must be the order's total, in cents.
    #[schema(format = "uint64", minimum = 0, maximum = 18446744073709551615_u64)]
    amount_cents: u64,
    /// The payment provider's reference.
    payment_reference: String,
}

/// The body of `POST /orders/{id}/shipment`: who carries a paid order.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Ship {
    /// Who carries it.
    carrier: String,
    /// The carrier's tracking number.
    tracking_number: String,
}

/// The body of `POST /orders/{id}/cancellation`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Cancel {
    /// Why.
    reason: String,
}

/// The body of a command's response: the order, its sequence, and the events the command
/// appended.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
struct CommandOutcome {
    /// The order's id.
    order_id: Uuid,
    /// The order's sequence after the command: its `ETag`.
    sequence: i64,
    /// The global position of the command's last event: its `Consistency-Token`.
    position: Option<i64>,
    /// The events the command appended.
    events: Vec<OrderEvent>,
}

/// The body of `GET /orders`: a page of orders in id order.
#[derive(Debug, Serialize, ToSchema)]
struct OrderPage {
    /// The orders, at most `limit`.
    orders: Vec<OrderSummary>,
}

/// `GET /openapi.json`: this document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    responses((status = 200, description = "The service's OpenAPI 3.1 document", body = Object))
)]
async fn openapi_json() -> Response {
    axum::Json(crate::openapi::document()).into_response()
}

/// `GET /metrics`: Prometheus metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "meta",
    responses(
        (status = 200, description = "Commands by outcome, append conflicts, idempotent replays, \
            idempotency keys pruned after their retention, the append latency histogram and the \
            view's lag, in Prometheus's text format",
            body = String, content_type = "text/plain; version=0.0.4; charset=utf-8"),
        (status = 503, description = "`store-unavailable`: the store's head could not be read",
            body = ProblemBody, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
async fn metrics(State(shared): State<Arc<Shared>>) -> Result<Response, Problem> {
    let head = shared
        .stores
        .head()
        .await
        .map_err(|e| Problem::from_framework(&e))?;
    let text = shared.metrics.render(head, shared.projection.position());
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response())
}

/// Places an order.
#[utoipa::path(
    post,
    path = "/orders",
    tag = "orders",
    request_body(content = PlaceOrder, content_type = "application/json"),
    params(IdempotencyKeyHeader),
    responses(
        (status = 201, description = "The order is placed", body = CommandOutcome, headers(
            ("ETag" = String, description = "The order's sequence, quoted: send it as `If-Match`"),
            ("Location" = String, description = "The order's URL"),
            ("Consistency-Token" = String, description = "The global position of the order's event: send it with a query to read this write"),
            ("Idempotent-Replayed" = String, description = "`true` on the first outcome answered again for an `Idempotency-Key`"),
        )),
        CommandProblems,
    )
)]
async fn place(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let body = body_bytes(&headers, body)?;
    let request: PlaceOrder = parse_json(&body)?;
    if headers.contains_key(header::IF_MATCH) {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-if-match",
            "The If-Match header is not valid here",
            "a new order has no sequence to match",
        ));
    }
    let action = OrderAction::Place {
        customer: request.customer,
        lines: request.lines,
    };
    let command = Command {
        request: format!("POST /orders\n{}", String::from_utf8_lossy(&body)),
        correlation_id: correlation_id(&headers).map(str::to_owned),
        new: true,
        order_id: None,
        command: OrderCommand::new(action),
    };
    shared.command(&headers, command).await
}

/// The body of a command on an existing order, and the action it asks for.
trait ActionBody: DeserializeOwned {
    /// The last segment of the command's path (`/orders/{id}/payment`).
    const SEGMENT: &'static str;
    fn into_action(self) -> OrderAction;
}

impl ActionBody for Pay {
    const SEGMENT: &'static str = "payment";
    fn into_action(self) -> OrderAction {
        OrderAction::Pay {
            amount_cents: self.amount_cents,
            payment_reference: self.payment_reference,
        }
    }
}

impl ActionBody for Ship {
    const SEGMENT: &'static str = "shipment";
    fn into_action(self) -> OrderAction {
        OrderAction::Ship {
            carrier: self.carrier,
            tracking_number: self.tracking_number,
        }
    }
}

impl ActionBody for Cancel {
    const SEGMENT: &'static str = "cancellation";
    fn into_action(self) -> OrderAction {
        OrderAction::Cancel {
            reason: self.reason,
        }
    }
}

/// A handler for `POST /orders/{id}/<segment>`, running [`action`] with `$body`, and its
/// description in the OpenAPI document.
macro_rules! action_handler {
    ($(#[doc = $doc:literal])* $name:ident, $path:literal, $body:ty, $done:literal) => {
        $(#[doc = $doc])*
        #[utoipa::path(
            post,
            path = $path,
            tag = "orders",
            request_body(content = $body, content_type = "application/json"),
            params(
                ("id" = Uuid, Path, description = "The order's id"),
                IfMatchHeader,
                IdempotencyKeyHeader,
            ),
            responses(
                (status = 200, description = $done, body = CommandOutcome, headers(
                    ("ETag" = String, description = "The order's sequence, quoted: send it as `If-Match`"),
                    ("Consistency-Token" = String, description = "The global position of the command's event: send it with a query to read this write"),
                    ("Idempotent-Replayed" = String, description = "`true` on the first outcome answered again for an `Idempotency-Key`"),
                )),
                OrderProblems,
                CommandProblems,
            )
        )]
        async fn $name(
            shared: State<Arc<Shared>>,
            id: Path<String>,
            headers: HeaderMap,
            body: Result<Bytes, BytesRejection>,
        ) -> Result<Response, Problem> {
            action::<$body>(shared, id, headers, body).await
        }
    };
}

action_handler!(
    /// Pays an order's total.
    pay, "/orders/{id}/payment", Pay, "The order is paid"
);
action_handler!(
    /// Ships a paid order.
    ship, "/orders/{id}/shipment", Ship, "The order has shipped"
);
action_handler!(
    /// Cancels an order that has not shipped.
    cancel, "/orders/{id}/cancellation", Cancel, "The order is cancelled"
);

/// `POST /orders/{id}/<T::SEGMENT>`: a command on an existing order.
async fn action<T: ActionBody>(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let order_id = order_id(&id)?;
    let body = body_bytes(&headers, body)?;
    let request: T = parse_json(&body)?;
    let command = Command {
        request: format!(
            "POST /orders/{order_id}/{}\n{}",
            T::SEGMENT,
            String::from_utf8_lossy(&body)
        ),
        correlation_id: correlation_id(&headers).map(str::to_owned),
        new: false,
        order_id: Some(order_id),
        command: OrderCommand {
            expected_sequence: if_match(&headers)?,
            action: request.into_action(),
        },
    };
    shared.command(&headers, command).await
}

/// A command as the idempotency logic runs it.
struct Command {
    /// Method, path and body: what a second use of the key must repeat.
    request: String,
    /// The request's id: the events' correlation id (and, when it is not a canonical UUID,
    /// `correlation_id` in their metadata).
    correlation_id: Option<String>,
    /// A create (`dispatch_new` on a fresh id) rather than a command on `order_id`.
    new: bool,
    order_id: Option<Uuid>,
    command: OrderCommand,
}

/// The id of a new order: a time-ordered UUID (version 7). The order view's rows, the
/// events' aggregate index and the idempotency keys' outcomes are keyed by it, so new
/// orders land at the right edge of those B-trees: a commit of a few dozen new orders
/// writes a few pages instead of one per order (docs/benchmarks.md, "The service under
/// load").
fn new_order_id() -> Uuid {
    Uuid::now_v7()
}

impl Shared {
    /// Runs a command, through its idempotency key if it has one.
    async fn command(&self, headers: &HeaderMap, command: Command) -> Result<Response, Problem> {
        let Some(key) = idempotency_key(headers)? else {
            let id = command.order_id.unwrap_or_else(new_order_id);
            return Ok(self.dispatch(id, None, command).await.into_response());
        };
        let started = tokio::time::Instant::now();
        loop {
            let this = &command;
            let fresh_id = this.order_id.unwrap_or_else(new_order_id);
            let now = chrono::Utc::now().timestamp_millis();
            let claim = self
                .stores
                .keys
                .claim(&key, &this.request, &fresh_id.to_string(), now)
                .await
                .map_err(|e| Problem::from_framework(&e))?;
            let row = match claim {
                Claim::Claimed => return self.run_claimed(&key, now, fresh_id, command).await,
                Claim::Taken(row) => row,
            };
            if row.request != this.request {
                return Err(Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency-key-reused",
                    "The idempotency key was used for another request",
                    "send a new key for a new request",
                ));
            }
            if let Some(response) = &row.response {
                self.metrics.idempotent_replay();
                return Ok(replay(response));
            }
            let lease =
                i64::try_from(self.config.idempotency_lease.as_millis()).unwrap_or(i64::MAX);
            if now.saturating_sub(row.claimed_at) >= lease {
                // The request that claimed the key never finished (the process died): its
                // events, if it appended any, carry the key.
                if let Some(reply) = self.recover(&key, &row).await? {
                    self.metrics.idempotent_replay();
                    return Ok(replay_reply(reply));
                }
                if self
                    .stores
                    .keys
                    .take_over(&key, row.claimed_at, now)
                    .await
                    .map_err(|e| Problem::from_framework(&e))?
                {
                    let id = Uuid::parse_str(&row.aggregate_id).map_err(|_| internal())?;
                    return self.run_claimed(&key, now, id, command).await;
                }
            }
            if started.elapsed() >= self.config.idempotency_wait {
                return Err(Problem::new(
                    StatusCode::CONFLICT,
                    "idempotency-request-in-progress",
                    "A request with this idempotency key is in progress",
                    "retry once the first request has finished",
                )
                .retry_after(1));
            }
            tokio::time::sleep(KEY_POLL).await;
        }
    }

    /// Runs a command whose key this request claimed at `claimed_at`, and records its
    /// outcome (or frees the key when the outcome may differ on a retry).
    async fn run_claimed(
        &self,
        key: &str,
        claimed_at: i64,
        id: Uuid,
        command: Command,
    ) -> Result<Response, Problem> {
        let reply = self.dispatch(id, Some(key), command).await;
        let keys = &self.stores.keys;
        let recorded = match &reply {
            Ok(reply) => match serde_json::to_string(reply) {
                Ok(text) => keys.complete(key, claimed_at, &text).await,
                Err(_) => return Err(internal()),
            },
            Err(problem) if problem.is_final() => {
                let text = serde_json::to_string(&problem.to_reply()).map_err(|_| internal())?;
                keys.complete(key, claimed_at, &text).await
            }
            Err(_) => keys.release(key, claimed_at).await,
        };
        if let Err(error) = recorded {
            // The outcome stands; a retry recovers it from the events or runs again.
            tracing::warn!(%error, key, "could not record the outcome of an idempotent request");
        }
        reply.map(IntoResponse::into_response)
    }

    /// Dispatches the command, in a `command` span, and counts its outcome; the request's
    /// id and the key, if any, go into every event's metadata.
    async fn dispatch(
        &self,
        id: Uuid,
        key: Option<&str>,
        command: Command,
    ) -> Result<Reply, Problem> {
        let name = command_name(&command.command.action);
        let span = tracing::info_span!(
            "command",
            command = name,
            order_id = %id,
            correlation_id = command.correlation_id.as_deref().unwrap_or_default(),
        );
        let reply = self
            .dispatch_traced(id, key, command)
            .instrument(span)
            .await;
        let outcome = match &reply {
            Ok(_) => "ok",
            Err(problem) => problem.slug,
        };
        self.metrics.command(name, outcome);
        reply
    }

    async fn dispatch_traced(
        &self,
        id: Uuid,
        key: Option<&str>,
        command: Command,
    ) -> Result<Reply, Problem> {
        // The request id is the workflow's correlation id: the events' own field holds it as a
        // UUID (the id itself when it is one, else a UUID derived from its text). The
        // metadata keeps the text as sent only when that field cannot give it back (an id
        // that is not a UUID in its canonical form), so most events carry no metadata: none
        // to write, none for the view to parse (9 to 23% of a request's CPU under load,
        // docs/benchmarks.md).
        let correlation = command
            .correlation_id
            .as_deref()
            .map(|request_id| (request_id, correlation_uuid(request_id)));
        let mut metadata = serde_json::Map::new();
        if let Some((request_id, uuid)) = correlation {
            let mut buffer = Uuid::encode_buffer();
            if uuid.hyphenated().encode_lower(&mut buffer) != request_id {
                metadata.insert("correlation_id".to_owned(), json!(request_id));
            }
        }
        if let Some(key) = key {
            metadata.insert("idempotency_key".to_owned(), json!(key));
        }
        let metadata = if metadata.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::Value::Object(metadata)
        };
        let mut context = cqrs::CommandContext::new()
            .with_metadata(&metadata)
            .map_err(|e| Problem::from_framework(&e))?;
        if let Some((_, uuid)) = correlation {
            context = context.correlated_with(uuid);
        }
        let framework = &self.framework;
        let receipt = if command.new {
            framework
                .dispatch_new_with_context(id, command.command, &context)
                .await
        } else {
            framework
                .dispatch_with_context(id, command.command, &context)
                .await
        }?;
        Ok(command_reply(
            command.new,
            id,
            receipt.sequence,
            &receipt.positions,
            &receipt.events,
        ))
    }

    /// The outcome of an abandoned request, rebuilt from the events that carry its key, if
    /// it appended any; recorded under the key.
    async fn recover(&self, key: &str, row: &KeyRow) -> Result<Option<Reply>, Problem> {
        let id = Uuid::parse_str(&row.aggregate_id).map_err(|_| internal())?;
        let stored = self
            .stores
            .events
            .load_events(<Order as cqrs::Aggregate>::NAME, id, 0)
            .await
            .map_err(|e| Problem::from_framework(&e))?;
        let mine: Vec<_> = stored
            .iter()
            .filter(|e| e.metadata.get("idempotency_key").and_then(|k| k.as_str()) == Some(key))
            .collect();
        let Some(last) = mine.last() else {
            return Ok(None);
        };
        let mut events = Vec::with_capacity(mine.len());
        for event in &mine {
            let envelope = event
                .decode::<OrderEvent>()
                .map_err(|e| Problem::from_framework(&e))?;
            events.push(envelope.event);
        }
        let positions: Vec<i64> = mine.iter().map(|e| e.position).collect();
        let new = row.request.starts_with("POST /orders\n");
        let reply = command_reply(new, id, last.sequence, &positions, &events);
        if let Ok(text) = serde_json::to_string(&reply) {
            if let Err(error) = self.stores.keys.complete(key, row.claimed_at, &text).await {
                tracing::warn!(%error, key, "could not record a recovered outcome");
            }
        }
        Ok(Some(reply))
    }
}

/// The command's name, as the metrics label it.
fn command_name(action: &OrderAction) -> &'static str {
    match action {
        OrderAction::Place { .. } => "place",
        OrderAction::Pay { .. } => "pay",
        OrderAction::Ship { .. } => "ship",
        OrderAction::Cancel { .. } => "cancel",
    }
}

/// The response to a command that succeeded.
fn command_reply(
    new: bool,
    id: Uuid,
    sequence: i64,
    positions: &[i64],
    events: &[OrderEvent],
) -> Reply {
    let position = positions.last().copied();
    let mut headers = vec![
        (
            header::CONTENT_TYPE.to_string(),
            "application/json".to_owned(),
        ),
        (header::ETAG.to_string(), etag(sequence)),
    ];
    if let Some(position) = position {
        headers.push((CONSISTENCY_TOKEN.to_owned(), position.to_string()));
    }
    if new {
        headers.push((header::LOCATION.to_string(), format!("/orders/{id}")));
    }
    Reply {
        status: if new { 201 } else { 200 },
        headers,
        body: json!(CommandOutcome {
            order_id: id,
            sequence,
            position,
            events: events.to_vec(),
        }),
    }
}

/// A stored response, replayed.
fn replay(stored: &str) -> Response {
    match serde_json::from_str::<Reply>(stored) {
        Ok(reply) => replay_reply(reply),
        Err(error) => {
            tracing::error!(%error, "a stored idempotent response does not decode");
            internal().into_response()
        }
    }
}

fn replay_reply(mut reply: Reply) -> Response {
    reply
        .headers
        .push((IDEMPOTENT_REPLAYED.to_owned(), "true".to_owned()));
    reply.into_response()
}

/// `GET /orders/{id}`: the order's view, once it has reached the request's consistency
/// token.
#[utoipa::path(
    get,
    path = "/orders/{id}",
    tag = "orders",
    params(("id" = Uuid, Path, description = "The order's id"), ConsistencyTokenHeader),
    responses(
        (status = 200, description = "The order", body = OrderSummary, headers(
            ("ETag" = String, description = "The order's sequence, quoted: send it as `If-Match`"),
        )),
        (status = 404, description = "`order-not-found`: no order has this id", body = inline(ProblemBody), content_type = "application/problem+json"),
        QueryProblems,
    )
)]
async fn show(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let order_id = order_id(&id)?;
    shared.wait_for_token(&headers).await?;
    let view = shared
        .stores
        .views
        .load(&order_id.to_string())
        .await
        .map_err(|e| Problem::from_framework(&e))?
        .ok_or_else(|| Problem::from(crate::order::OrderError::NotFound))?;
    let mut response = axum::Json(&view).into_response();
    if let Ok(value) = HeaderValue::try_from(etag(view.sequence)) {
        response.headers_mut().insert(header::ETAG, value);
    }
    Ok(response)
}

/// `GET /orders?after=ID&limit=N`: a page of orders in id order.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct Page {
    /// The id of the last order of the previous page.
    after: Option<String>,
    /// How many orders, at most: 50 when absent, else between 1 and 500 (a value outside is
    /// taken as the nearer bound).
    #[param(value_type = Option<usize>)]
    limit: Option<Limit>,
}

/// The `limit` of a page as the query gives it: digits, however many; a number too large
/// for a `usize` is taken as the largest (the page size is bounded anyway).
#[derive(Debug, Clone, Copy)]
struct Limit(usize);

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(serde::de::Error::custom(format!(
                "limit: `{text}` is not a non-negative integer"
            )));
        }
        Ok(Limit(text.parse().unwrap_or(usize::MAX)))
    }
}

/// Lists orders in id order, a page at a time.
#[utoipa::path(
    get,
    path = "/orders",
    tag = "orders",
    params(Page, ConsistencyTokenHeader),
    responses(
        (status = 200, description = "A page of orders", body = OrderPage),
        QueryProblems,
    )
)]
async fn list(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    page: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Query(page) = page.map_err(|rejection| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-query",
            "The query string is not valid",
            rejection.body_text(),
        )
    })?;
    shared.wait_for_token(&headers).await?;
    let limit = page.limit.map_or(50, |Limit(limit)| limit).clamp(1, 500);
    let orders = shared
        .stores
        .views
        .list(page.after.as_deref(), limit)
        .await
        .map_err(|e| Problem::from_framework(&e))?;
    let orders: Vec<_> = orders.into_iter().map(|(_, view)| view).collect();
    Ok(axum::Json(OrderPage { orders }).into_response())
}

impl Shared {
    /// Waits, at most the configured time, for the view to reach the request's consistency
    /// token.
    async fn wait_for_token(&self, headers: &HeaderMap) -> Result<(), Problem> {
        let Some(value) = headers.get(CONSISTENCY_TOKEN) else {
            return Ok(());
        };
        let position = value
            .to_str()
            .ok()
            .and_then(|text| number(text.trim()))
            .ok_or_else(|| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid-consistency-token",
                    "The Consistency-Token header is not valid",
                    "send back the Consistency-Token of a command's response",
                )
            })?;
        let wait = self.config.consistency_wait;
        let reached = match &self.inline {
            // The running projection may have been frozen with its process: catch up here.
            Some(inline) if self.projection.position() < position => {
                inline.wait_for(position, wait).await
            }
            _ => self.projection.wait_for(position, wait).await,
        };
        match reached {
            Ok(_) => Ok(()),
            Err(CQRSError::Timeout(_) | CQRSError::ProjectionStopped(_)) => Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "view-behind",
                "The view has not reached the consistency token yet",
                format!(
                    "the view is at position {}, not {position} yet",
                    self.projection.position()
                ),
            )
            .retry_after(1)),
            Err(error) => Err(Problem::from_framework(&error)),
        }
    }
}

async fn not_found() -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "No such resource",
        "see the README for the routes",
    )
}

async fn method_not_allowed(method: Method) -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        format!("{method} is not allowed here"),
    )
}

/// `"N"`: the strong entity tag of an order at sequence `N`.
fn etag(sequence: i64) -> String {
    format!("\"{sequence}\"")
}

pub(crate) fn order_id(text: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(text).map_err(|_| {
        Problem::new(
            StatusCode::NOT_FOUND,
            "order-not-found",
            "No such order",
            "an order id is a UUID",
        )
    })
}

/// The sequence in `If-Match: "N"`, if the header is there.
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, Problem> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|text| number(text.trim().strip_prefix('"')?.strip_suffix('"')?))
        .map(Some)
        .ok_or_else(|| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-if-match",
                "The If-Match header is not valid here",
                "send the ETag of the order, a quoted sequence such as \"2\"",
            )
        })
}

/// The most digits a sequence or a position in a header may have: any such number fits an
/// `i64`, and the OpenAPI document's patterns say the same.
const MAX_DIGITS: usize = 18;

/// `text` as a sequence or position: 1 to [`MAX_DIGITS`] ASCII digits, nothing else.
fn number(text: &str) -> Option<i64> {
    if text.is_empty() || text.len() > MAX_DIGITS || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|key| {
            !key.is_empty()
                && key.len() <= MAX_KEY_LENGTH
                && key.bytes().all(|b| b.is_ascii_graphic())
        })
        .map(|key| Some(key.to_owned()))
        .ok_or_else(|| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-idempotency-key",
                "The Idempotency-Key header is not valid",
                format!("a key is 1 to {MAX_KEY_LENGTH} visible ASCII characters"),
            )
        })
}

/// The body of a JSON request, or the problem with its content type or size.
fn body_bytes(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Bytes, Problem> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .map(|media| {
            let media = media.trim().to_ascii_lowercase();
            media == "application/json"
                || (media.starts_with("application/") && media.ends_with("+json"))
        })
        .unwrap_or(false);
    if !json {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "The request body must be JSON",
            "send Content-Type: application/json",
        ));
    }
    body.map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::new(
                status,
                "body-too-large",
                "The request body is too large",
                rejection.body_text(),
            )
        } else {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "unreadable-body",
                "The request body could not be read",
                rejection.body_text(),
            )
        }
    })
}

/// The body as `T`: malformed JSON is `400`, JSON of the wrong shape (a missing or unknown
/// field, a wrong type) `422`.
fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    serde_json::from_slice(body).map_err(|error| {
        use serde_json::error::Category;
        match error.classify() {
            Category::Data => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-request-body",
                "The request body does not fit the command",
                error.to_string(),
            ),
            Category::Syntax | Category::Eof | Category::Io => Problem::new(
                StatusCode::BAD_REQUEST,
                "malformed-json",
                "The request body is not JSON",
                error.to_string(),
            ),
        }
    })
}
