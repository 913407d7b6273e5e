//! The operator page: server-rendered HTML (no script, no build step) showing the
//! aggregates and their event counts, one stream's events, the projection's checkpoint and
//! lag, and the events it skipped as dead letters.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use cqrs::EventRepository;

use crate::order::Order;
use crate::problem::Problem;
use crate::Shared;

/// Why a request may not see the operator pages, as its response: `404` when no token is
/// configured (the pages are off), `401` with `WWW-Authenticate: Bearer` when the request
/// does not carry `Authorization: Bearer <token>`; `None` when it does.
fn refusal(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = &shared.config.operator_token else {
        return Some(
            Problem::new(
                StatusCode::NOT_FOUND,
                "not-found",
                "No such resource",
                "the operator pages are off: the service has no operator token",
            )
            .into_response(),
        );
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, credentials) = value.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| credentials.trim())
        });
    if presented.is_some_and(|candidate| token.matches(candidate)) {
        return None;
    }
    let mut response = Problem::new(
        StatusCode::UNAUTHORIZED,
        "operator-unauthorized",
        "The operator pages need the operator token",
        "send Authorization: Bearer <token>",
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"operator\""),
    );
    Some(response)
}

/// How many aggregates the overview lists.
const AGGREGATES_SHOWN: i64 = 100;

/// `GET /operator`: the overview.
#[utoipa::path(
    get,
    path = "/operator",
    tag = "operator",
    security(("operator_token" = [])),
    responses(
        (status = 200, description = "The operator page: the projection's checkpoint and lag, \
            the aggregates with their event counts, and the dead letters",
            body = String, content_type = "text/html; charset=utf-8"),
        (status = 401, description = "`operator-unauthorized`: the request does not carry \
            `Authorization: Bearer` with the operator token",
            body = crate::openapi::ProblemBody, content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "`Bearer`, the scheme the pages ask for"))),
        (status = 404, description = "`not-found`: the operator pages are off (the service \
            has no operator token)",
            body = crate::openapi::ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "`store-unavailable`: the store did not answer",
            body = crate::openapi::ProblemBody, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub(crate) async fn overview(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    if let Some(refused) = refusal(&shared, &headers) {
        return Ok(refused);
    }
    let failed = |e: cqrs::CQRSError| Problem::from_framework(&e);
    let head = shared.stores.head().await.map_err(failed)?;
    let aggregates = shared
        .stores
        .aggregates(AGGREGATES_SHOWN)
        .await
        .map_err(failed)?;
    let letters = shared.projection.dead_letters().await.map_err(failed)?;
    let projection = &shared.projection;
    let position = projection.position();

    let mut body = String::new();
    body.push_str("<h2>Projection</h2>\n<table id=\"projection\">\n");
    body.push_str("<tr><th>name</th><th>checkpoint</th><th>store head</th><th>lag</th><th>state</th><th>last error</th></tr>\n");
    // A runner that has ended is stopped even if it was live when it ended.
    let state = if projection.is_finished() {
        "stopped"
    } else if projection.is_live() {
        "live"
    } else {
        "catching up"
    };
    let _ = writeln!(
        body,
        "<tr><td>{}</td><td class=\"checkpoint\">{position}</td><td class=\"head\">{head}</td>\
         <td class=\"lag\">{}</td><td>{state}</td><td>{}</td></tr>",
        escape(projection.name()),
        head.saturating_sub(position).max(0),
        escape(&projection.last_error().unwrap_or_default()),
    );
    body.push_str("</table>\n");

    let _ = writeln!(
        body,
        "<h2>Aggregates</h2>\n<p>The {} most recently changed{}.</p>\n<table id=\"aggregates\">",
        aggregates.len(),
        shared.stores.aggregates_scope(),
    );
    body.push_str("<tr><th>type</th><th>id</th><th>events</th><th>last position</th></tr>\n");
    for row in &aggregates {
        let id = escape(&row.aggregate_id);
        let link = if row.aggregate_type == <Order as cqrs::Aggregate>::NAME {
            format!("<a href=\"/operator/orders/{id}\">{id}</a>")
        } else {
            id
        };
        let _ = writeln!(
            body,
            "<tr><td>{}</td><td>{link}</td><td class=\"events\">{}</td><td>{}</td></tr>",
            escape(&row.aggregate_type),
            row.events,
            row.last_position,
        );
    }
    body.push_str("</table>\n");

    let _ = writeln!(
        body,
        "<h2>Dead letters</h2>\n<p>{} events the projection skipped.</p>\n<table id=\"dead-letters\">",
        letters.len()
    );
    body.push_str("<tr><th>position</th><th>aggregate</th><th>sequence</th><th>event</th><th>attempts</th><th>reason</th><th>recorded</th></tr>\n");
    for letter in &letters {
        let _ = writeln!(
            body,
            "<tr><td>{}</td><td>{} {}</td><td>{}</td><td>{} {}</td><td>{}</td>\
             <td class=\"reason\">{}</td><td>{}</td></tr>",
            letter.position,
            escape(&letter.aggregate_type),
            letter.aggregate_id,
            letter.sequence,
            escape(&letter.event_type),
            escape(&letter.event_version),
            letter.attempts,
            escape(&letter.error),
            letter.recorded_at.to_rfc3339(),
        );
    }
    body.push_str("</table>\n");
    Ok(page("Operator", &body))
}

/// `GET /operator/orders/{id}`: one order's events.
#[utoipa::path(
    get,
    path = "/operator/orders/{id}",
    tag = "operator",
    security(("operator_token" = [])),
    params(("id" = uuid::Uuid, Path, description = "The order's id")),
    responses(
        (status = 200, description = "The order's events with their payload, metadata and \
            timestamp", body = String, content_type = "text/html; charset=utf-8"),
        (status = 401, description = "`operator-unauthorized`: the request does not carry \
            `Authorization: Bearer` with the operator token",
            body = crate::openapi::ProblemBody, content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "`Bearer`, the scheme the pages ask for"))),
        (status = 404, description = "`order-not-found` (the id is not a UUID) or `not-found` \
            (the operator pages are off: the service has no operator token)",
            body = crate::openapi::ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "`store-unavailable`: the store did not answer",
            body = crate::openapi::ProblemBody, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub(crate) async fn stream(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    if let Some(refused) = refusal(&shared, &headers) {
        return Ok(refused);
    }
    let id = crate::http::order_id(&id)?;
    let events = shared
        .stores
        .events
        .load_events(<Order as cqrs::Aggregate>::NAME, id, 0)
        .await
        .map_err(|e| Problem::from_framework(&e))?;
    let mut body = String::new();
    let _ = writeln!(
        body,
        "<p><a href=\"/operator\">Operator</a> / order {id}: {} events.</p>\n<table id=\"events\">",
        events.len()
    );
    body.push_str("<tr><th>sequence</th><th>position</th><th>event</th><th>timestamp</th><th>correlation</th><th>payload</th><th>metadata</th></tr>\n");
    for event in &events {
        let metadata =
            serde_json::to_string_pretty(&event.metadata).unwrap_or_else(|_| "null".to_owned());
        let _ = writeln!(
            body,
            "<tr><td>{}</td><td>{}</td><td class=\"event-type\">{} {}</td><td>{}</td>\
             <td class=\"correlation\">{}</td><td><pre class=\"payload\">{}</pre></td>\
             <td><pre class=\"metadata\">{}</pre></td></tr>",
            event.sequence,
            event.position,
            escape(&event.event_type),
            escape(&event.event_version),
            event.timestamp.to_rfc3339(),
            event
                .correlation_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
            escape(&pretty(event.payload.as_str())),
            escape(&metadata),
        );
    }
    body.push_str("</table>\n");
    Ok(page(&format!("Order {id}"), &body))
}

/// Stored JSON, indented when it parses, else as stored.
fn pretty(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|value| serde_json::to_string_pretty(&value).ok())
        .unwrap_or_else(|| json.to_owned())
}

/// A whole HTML page around `body`.
fn page(title: &str, body: &str) -> Response {
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>{title} · cqrs-service</title>\n<style>\n\
         body {{ font-family: sans-serif; margin: 2em; }}\n\
         table {{ border-collapse: collapse; margin-bottom: 2em; }}\n\
         th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }}\n\
         pre {{ margin: 0; }}\n\
         </style>\n</head>\n<body>\n<h1>{title}</h1>\n{body}</body>\n</html>\n",
        title = escape(title),
    );
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        html,
    )
        .into_response()
}

/// `text` with the characters that mean something in HTML escaped.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escape_neutralises_markup() {
        assert_eq!(
            escape("<script>alert('x & \"y\"')</script>"),
            "&lt;script&gt;alert(&#39;x &amp; &quot;y&quot;&#39;)&lt;/script&gt;"
        );
    }
}
