//! The Lambda entry point's path: API Gateway HTTP API (payload 2.0) events, deserialized by
//! `lambda_http`, through the adapter `lambda_http::run` wraps the router in, into the
//! service on DynamoDB; the answers as the function returns them to API Gateway. Needs the
//! emulator in `CQRS_DYNAMODB_ENDPOINT` (skipped with a note when unset).
#![cfg(feature = "lambda")]

use cqrs_service::{Config, Database, Service};
use lambda_http::request::LambdaRequest;
use lambda_http::tower::ServiceExt as _;
use lambda_http::{Context, LambdaEvent};
use serde_json::{json, Value};
use uuid::Uuid;

/// An API Gateway HTTP API event (payload format 2.0) for `method` on `path`, as API
/// Gateway sends it to the function.
fn apigw_v2(method: &str, path: &str, headers: Value, body: Option<&Value>) -> Value {
    json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": "",
        "headers": headers,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "orders",
            "domainName": "orders.execute-api.eu-west-1.amazonaws.com",
            "domainPrefix": "orders",
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "192.0.2.10",
                "userAgent": "lambda-test"
            },
            "requestId": Uuid::new_v4().to_string(),
            "routeKey": "$default",
            "stage": "$default",
            "time": "03/Dec/2026:13:00:00 +0000",
            "timeEpoch": 1_796_302_800_000_i64
        },
        "body": body.map(Value::to_string),
        "isBase64Encoded": false
    })
}

/// The function's answer to `event`: what `lambda_http::run` returns to the runtime,
/// serialized as the runtime sends it.
async fn invoke(router: &axum::Router, event: Value) -> Value {
    let request: LambdaRequest = serde_json::from_value(event).expect("an HTTP API event");
    let adapter = lambda_http::Adapter::from(router.clone());
    let response = adapter
        .oneshot(LambdaEvent::new(request, Context::default()))
        .await
        .expect("the router does not fail");
    serde_json::to_value(response).expect("a response that serializes")
}

/// A response header's value.
fn header<'a>(response: &'a Value, name: &str) -> &'a str {
    response["headers"][name]
        .as_str()
        .unwrap_or_else(|| panic!("no header {name}: {response}"))
}

/// The body of a JSON response.
fn body(response: &Value) -> Value {
    assert_eq!(response["isBase64Encoded"], false, "{response}");
    let text = response["body"].as_str().expect("a text body");
    serde_json::from_str(text).expect("a JSON body")
}

/// POST an order and GET it back with its consistency token, through the Lambda adapter,
/// with the projection's background task stopped (a frozen function): the query catches
/// the view up itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_api_event_places_an_order_and_reads_it_back() {
    let Some(endpoint) = cqrs_tests::server_url(
        "CQRS_DYNAMODB_ENDPOINT",
        "service on lambda",
        "http://127.0.0.1:5000 (python3 .ci/moto-single.py 5000)",
    ) else {
        return;
    };
    let test = Uuid::new_v4().simple();
    let tables = [format!("svc-events-{test}"), format!("svc-views-{test}")];
    let database = Database::DynamoDb {
        endpoint: Some(endpoint.clone()),
        events_table: tables[0].clone(),
        views_table: tables[1].clone(),
    };
    let service = Service::start(Config::new(database).with_inline_catch_up(true))
        .await
        .expect("start the service");
    service.stop();
    let router = service.router();

    let order = json!({
        "customer": "ada",
        "lines": [{ "sku": "book-1", "quantity": 2, "unit_price_cents": 1250 }],
    });
    let headers = json!({
        "content-type": "application/json",
        "idempotency-key": "lambda-key-1",
        "x-request-id": "lambda-request-1",
    });
    let placed = invoke(&router, apigw_v2("POST", "/orders", headers, Some(&order))).await;
    assert_eq!(placed["statusCode"], 201, "{placed}");
    assert_eq!(header(&placed, "content-type"), "application/json");
    assert_eq!(header(&placed, "etag"), "\"1\"");
    assert_eq!(header(&placed, "x-request-id"), "lambda-request-1");
    let token = header(&placed, "consistency-token").to_owned();
    let outcome = body(&placed);
    let id = outcome["order_id"]
        .as_str()
        .expect("an order id")
        .to_owned();
    assert_eq!(header(&placed, "location"), format!("/orders/{id}"));
    assert_eq!(outcome["sequence"], 1);
    assert_eq!(outcome["events"][0]["type"], "Placed", "{outcome}");

    // The same request again, as API Gateway would retry it: the first outcome, replayed.
    let headers = json!({
        "content-type": "application/json",
        "idempotency-key": "lambda-key-1",
    });
    let again = invoke(&router, apigw_v2("POST", "/orders", headers, Some(&order))).await;
    assert_eq!(again["statusCode"], 201, "{again}");
    assert_eq!(header(&again, "idempotent-replayed"), "true");
    assert_eq!(body(&again), outcome);

    let path = format!("/orders/{id}");
    let headers = json!({ "consistency-token": token });
    let shown = invoke(&router, apigw_v2("GET", &path, headers, None)).await;
    assert_eq!(shown["statusCode"], 200, "{shown}");
    assert_eq!(header(&shown, "etag"), "\"1\"");
    let view = body(&shown);
    assert_eq!(view["order_id"], id, "{view}");
    assert_eq!(view["status"], "placed", "{view}");
    assert_eq!(view["total_cents"], 2500, "{view}");

    // An unknown order is a problem, with its media type, through the adapter too.
    let missing = format!("/orders/{}", Uuid::new_v4());
    let unknown = invoke(&router, apigw_v2("GET", &missing, json!({}), None)).await;
    assert_eq!(unknown["statusCode"], 404, "{unknown}");
    assert_eq!(header(&unknown, "content-type"), cqrs_service::PROBLEM_JSON);
    assert_eq!(body(&unknown)["status"], 404);

    drop(router);
    drop(service);
    let client = cqrs_aws::local_client(&endpoint);
    for table in tables {
        client
            .delete_table()
            .table_name(table)
            .send()
            .await
            .expect("delete the test table");
    }
}
