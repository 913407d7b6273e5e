//! Problem details (RFC 9457): every error the service answers is `application/problem+json`
//! with a stable `type` per kind of error.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use cqrs::CQRSError;
use serde_json::json;

use crate::openapi::ProblemBody;
use crate::order::OrderError;
use crate::reply::Reply;

/// The prefix of every problem `type`: the rest is the problem's slug
/// (`https://example.invalid/problems/order-not-found`).
pub const PROBLEM_TYPE_BASE: &str = "https://example.invalid/problems/";

/// The media type of a problem response.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An error response: status, a stable type, a title per type, and this occurrence's detail.
///
/// ```
/// use cqrs_service::{OrderError, Problem};
///
/// let problem = Problem::from(OrderError::NotPaid);
/// assert_eq!(problem.status, 409);
/// assert_eq!(problem.type_uri(), "https://example.invalid/problems/order-not-paid");
/// assert!(problem.is_final(), "a retry meets the same refusal");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The HTTP status.
    pub status: StatusCode,
    /// The type's slug, appended to [`PROBLEM_TYPE_BASE`].
    pub slug: &'static str,
    /// The type's title: the same for every occurrence.
    pub title: &'static str,
    /// What went wrong this time.
    pub detail: String,
    /// Seconds to wait before retrying (`Retry-After`), when a retry may succeed.
    pub retry_after: Option<u64>,
}

impl Problem {
    /// A problem of a type, with this occurrence's detail.
    pub fn new(
        status: StatusCode,
        slug: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Problem {
            status,
            slug,
            title,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// The same problem, telling the client to retry after `seconds`.
    #[must_use]
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The problem's `type` URI.
    pub fn type_uri(&self) -> String {
        format!("{PROBLEM_TYPE_BASE}{}", self.slug)
    }

    /// True when the same request can only meet the same answer: the outcome an
    /// idempotency key keeps. A server error, or a race the client may win on a retry, is
    /// not kept.
    pub fn is_final(&self) -> bool {
        self.status.is_client_error() && self.slug != "concurrent-modification"
    }

    /// The problem as a response to store and replay.
    pub(crate) fn to_reply(&self) -> Reply {
        let mut headers = vec![(header::CONTENT_TYPE.to_string(), PROBLEM_JSON.to_owned())];
        if let Some(seconds) = self.retry_after {
            headers.push((header::RETRY_AFTER.to_string(), seconds.to_string()));
        }
        Reply {
            status: self.status.as_u16(),
            headers,
            body: json!(ProblemBody {
                kind: self.type_uri(),
                title: self.title.to_owned(),
                status: self.status.as_u16(),
                detail: self.detail.clone(),
            }),
        }
    }

    /// A failure of the framework or the store, logged, as the client sees it.
    pub fn from_framework(error: &CQRSError) -> Self {
        match error {
            CQRSError::Conflict { .. } => Problem::new(
                StatusCode::CONFLICT,
                "concurrent-modification",
                "The order changed while the command ran",
                format!("{error}; retry the request"),
            ),
            CQRSError::PersistenceError(_) | CQRSError::Timeout(_) => {
                tracing::error!(%error, "the store failed");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store-unavailable",
                    "The store is unavailable",
                    "the event store did not answer; retry the request",
                )
                .retry_after(1)
            }
            _ => {
                tracing::error!(%error, "a request failed");
                internal()
            }
        }
    }
}

/// An error with nothing the client can do about it; the log has the cause.
pub(crate) fn internal() -> Problem {
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal-error",
        "Internal error",
        "the service failed; the log has the cause",
    )
}

impl From<OrderError> for Problem {
    fn from(error: OrderError) -> Self {
        use StatusCode as S;
        let detail = error.to_string();
        let (status, slug, title) = match &error {
            OrderError::SequenceMismatch { .. } => (
                S::PRECONDITION_FAILED,
                "precondition-failed",
                "The order is not at the sequence in If-Match",
            ),
            OrderError::NotFound => (S::NOT_FOUND, "order-not-found", "No such order"),
            OrderError::AlreadyPlaced => (S::CONFLICT, "order-exists", "The order exists"),
            OrderError::NoLines => (
                S::UNPROCESSABLE_ENTITY,
                "order-without-lines",
                "An order needs at least one line",
            ),
            OrderError::InvalidLine(_) => (
                S::UNPROCESSABLE_ENTITY,
                "invalid-order-line",
                "An order line is not valid",
            ),
            OrderError::WrongAmount { .. } => (
                S::UNPROCESSABLE_ENTITY,
                "wrong-payment-amount",
                "The payment is not the order's total",
            ),
            OrderError::AlreadyPaid => (S::CONFLICT, "order-already-paid", "The order is paid"),
            OrderError::NotPaid => (S::CONFLICT, "order-not-paid", "The order is not paid"),
            OrderError::AlreadyShipped => (
                S::CONFLICT,
                "order-already-shipped",
                "The order has shipped",
            ),
            OrderError::Cancelled => (S::CONFLICT, "order-cancelled", "The order is cancelled"),
            OrderError::Framework(error) => return Problem::from_framework(error),
        };
        Problem::new(status, slug, title, detail)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.to_reply().body)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
