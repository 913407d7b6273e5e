//! The OpenAPI 3.1 document: the service's description and the shapes that only the
//! document names (problem bodies, request and response headers). The operations come from
//! the `#[utoipa::path]` attribute of each handler in `http.rs`, which also registers its
//! route, so a route and its description cannot drift apart.

use std::sync::OnceLock;

use serde::Serialize;
use utoipa::openapi::OpenApi as Document;
use utoipa::{IntoParams, IntoResponses, OpenApi, ToSchema};

/// The document's fixed part; `http::api` adds the operations and the schemas they use.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "cqrs-service",
        description = "Orders with payment and shipping over HTTP, on cqrs. Commands are a \
            `POST` each; errors are `application/problem+json` (RFC 9457) with a stable \
            `type`; `ETag` / `If-Match` carry an order's sequence, `Idempotency-Key` makes a \
            command safe to retry, and `Consistency-Token` lets a query read its own writes."
    ),
    components(schemas(ProblemBody)),
    modifiers(&OperatorSecurity)
)]
pub(crate) struct ApiDoc;

/// The security scheme of the operator pages: `Authorization: Bearer <token>`.
struct OperatorSecurity;

impl utoipa::Modify for OperatorSecurity {
    fn modify(&self, openapi: &mut Document) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.description = Some(
            "The operator token the service was started with (`--operator-token`, \
             `CQRS_SERVICE_OPERATOR_TOKEN`); without one the operator pages answer `404`."
                .to_owned(),
        );
        components.add_security_scheme("operator_token", SecurityScheme::Http(scheme));
    }
}

/// The document, built once.
pub(crate) fn document() -> &'static Document {
    static DOCUMENT: OnceLock<Document> = OnceLock::new();
    DOCUMENT.get_or_init(|| crate::http::api().split_for_parts().1)
}

/// A problem details object (RFC 9457), the body of every error.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Problem)]
pub(crate) struct ProblemBody {
    /// The problem's type: `https://example.invalid/problems/` and a slug, stable per kind
    /// of error.
    #[serde(rename = "type")]
    #[schema(example = "https://example.invalid/problems/order-not-found")]
    pub(crate) kind: String,
    /// The type's title: the same for every occurrence.
    pub(crate) title: String,
    /// The HTTP status.
    #[schema(minimum = 400, maximum = 599)]
    pub(crate) status: u16,
    /// What went wrong this time.
    pub(crate) detail: String,
}

/// The request header of a command: its idempotency key.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // Read by the document only: handlers read the headers themselves.
pub(crate) struct IdempotencyKeyHeader {
    /// A key unique to this request: sent again with the same request, the first outcome is
    /// answered again (`Idempotent-Replayed: true`) and nothing is appended. Kept in the
    /// database, so it holds across a restart, for 24 hours (by default) from the first
    /// request: a retry after that is a new request. 1 to 255 visible ASCII characters.
    #[param(
        rename = "Idempotency-Key",
        required = false,
        pattern = r"^[ \t]*[!-~]{1,255}[ \t]*$"
    )]
    idempotency_key: String,
}

/// The request header of a command on an existing order: the sequence it expects.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // Read by the document only.
pub(crate) struct IfMatchHeader {
    /// The order's `ETag` (a quoted sequence of up to 18 digits, `"2"`): the command runs
    /// only on an order still at that sequence, else answers `412`.
    #[param(
        rename = "If-Match",
        required = false,
        pattern = r#"^[ \t]*"[0-9]{1,18}"[ \t]*$"#
    )]
    if_match: String,
}

/// The request header of a query: the position its answer must include.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // Read by the document only.
pub(crate) struct ConsistencyTokenHeader {
    /// A command's `Consistency-Token` (up to 18 digits): the query waits, bounded, for the
    /// view to reach it, or answers `503` with `Retry-After`.
    #[param(
        rename = "Consistency-Token",
        required = false,
        pattern = r"^[ \t]*[0-9]{1,18}[ \t]*$"
    )]
    consistency_token: String,
}

/// The errors any command can answer.
#[derive(Debug, IntoResponses)]
#[allow(dead_code)] // Read by the document only: handlers answer a `Problem`.
pub(crate) enum CommandProblems {
    /// `malformed-json`, `unreadable-body`, `invalid-if-match` or
    /// `invalid-idempotency-key`.
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(ProblemBody),
    /// `concurrent-modification` (the framework's retries did not win the race; retry),
    /// `idempotency-request-in-progress` (another request holds the key; retry after
    /// `Retry-After`), or the order is in the wrong state for the command (`order-exists`,
    /// `order-already-paid`, `order-not-paid`, `order-already-shipped`, `order-cancelled`).
    #[response(
        status = 409,
        content_type = "application/problem+json",
        headers(("Retry-After" = u64, description = "Seconds to wait before retrying, when a retry may succeed"))
    )]
    Conflict(ProblemBody),
    /// `body-too-large`: the body is over the service's limit.
    #[response(status = 413, content_type = "application/problem+json")]
    TooLarge(ProblemBody),
    /// `unsupported-media-type`: the body is not `application/json`.
    #[response(status = 415, content_type = "application/problem+json")]
    UnsupportedMediaType(ProblemBody),
    /// `invalid-request-body` (a missing or unknown field, a wrong type),
    /// `order-without-lines`, `invalid-order-line`, `wrong-payment-amount`, or
    /// `idempotency-key-reused` (the key was sent with another request).
    #[response(status = 422, content_type = "application/problem+json")]
    Unprocessable(ProblemBody),
    /// `internal-error`: the log has the cause.
    #[response(status = 500, content_type = "application/problem+json")]
    Internal(ProblemBody),
    /// `store-unavailable`: the event store did not answer; retry after `Retry-After`.
    #[response(
        status = 503,
        content_type = "application/problem+json",
        headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))
    )]
    Unavailable(ProblemBody),
}

/// The errors of a command on an existing order, beside [`CommandProblems`].
#[derive(Debug, IntoResponses)]
#[allow(dead_code)] // Read by the document only.
pub(crate) enum OrderProblems {
    /// `order-not-found`: no order has this id.
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(ProblemBody),
    /// `precondition-failed`: the order is not at the sequence in `If-Match`.
    #[response(status = 412, content_type = "application/problem+json")]
    PreconditionFailed(ProblemBody),
}

/// The errors any query can answer.
#[derive(Debug, IntoResponses)]
#[allow(dead_code)] // Read by the document only.
pub(crate) enum QueryProblems {
    /// `invalid-consistency-token` or `invalid-query`.
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(ProblemBody),
    /// `internal-error`: the log has the cause.
    #[response(status = 500, content_type = "application/problem+json")]
    Internal(ProblemBody),
    /// `view-behind` (the view has not reached the `Consistency-Token` within the wait) or
    /// `store-unavailable`; retry after `Retry-After`.
    #[response(
        status = 503,
        content_type = "application/problem+json",
        headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))
    )]
    Unavailable(ProblemBody),
}
