//! The service over real HTTP: a reqwest client against the router served on an ephemeral
//! port, on SQLite (a temporary file), on PostgreSQL (`CQRS_POSTGRES_URL`, each test in a
//! schema of its own; skipped with a note when the variable is unset) and, with the feature
//! `dynamodb`, on DynamoDB (`CQRS_DYNAMODB_ENDPOINT`, an emulator, each test on tables of its
//! own; skipped with a note when the variable is unset).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use cqrs::sqlx::{self, Connection};
use cqrs::EventRepository;
use cqrs_service::{Config, Database, Service, PROBLEM_JSON, PROBLEM_TYPE_BASE};
use reqwest::{header, Client, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use uuid::Uuid;

const POSTGRES_VAR: &str = "CQRS_POSTGRES_URL";
#[cfg(feature = "dynamodb")]
const DYNAMODB_VAR: &str = "CQRS_DYNAMODB_ENDPOINT";

/// Where a test's service keeps its data.
#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Postgres,
    #[cfg(feature = "dynamodb")]
    DynamoDb,
}

/// A database for one test: a temporary SQLite file or a fresh PostgreSQL schema, removed
/// when the test ends.
struct TestDb {
    database: Database,
    cleanup: Cleanup,
}

enum Cleanup {
    File(PathBuf),
    Schema {
        url: String,
        schema: String,
    },
    #[cfg(feature = "dynamodb")]
    Tables {
        endpoint: String,
        tables: [String; 2],
    },
}

impl TestDb {
    /// `None` (after a note) when the backend's server is not configured.
    fn new(backend: Backend) -> Option<TestDb> {
        match backend {
            Backend::Sqlite => {
                let path =
                    std::env::temp_dir().join(format!("cqrs-service-{}.sqlite", Uuid::new_v4()));
                Some(TestDb {
                    database: Database::Sqlite(path.clone()),
                    cleanup: Cleanup::File(path),
                })
            }
            Backend::Postgres => {
                let url = cqrs_tests::server_url(
                    POSTGRES_VAR,
                    "service on postgres",
                    "postgres://postgres@127.0.0.1:5432/test",
                )?;
                let schema = format!("t_{}", Uuid::new_v4().simple());
                Some(TestDb {
                    database: Database::Postgres {
                        url: url.clone(),
                        schema: Some(schema.clone()),
                    },
                    cleanup: Cleanup::Schema { url, schema },
                })
            }
            #[cfg(feature = "dynamodb")]
            Backend::DynamoDb => {
                let endpoint = cqrs_tests::server_url(
                    DYNAMODB_VAR,
                    "service on dynamodb",
                    "http://127.0.0.1:5000 (python3 .ci/moto-single.py 5000)",
                )?;
                let test = Uuid::new_v4().simple();
                let tables = [format!("svc-events-{test}"), format!("svc-views-{test}")];
                Some(TestDb {
                    database: Database::DynamoDb {
                        endpoint: Some(endpoint.clone()),
                        events_table: tables[0].clone(),
                        views_table: tables[1].clone(),
                    },
                    cleanup: Cleanup::Tables { endpoint, tables },
                })
            }
        }
    }

    async fn remove(self) {
        match self.cleanup {
            Cleanup::File(path) => {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
            Cleanup::Schema { url, schema } => {
                let mut connection = sqlx::PgConnection::connect(&url)
                    .await
                    .expect("connect to drop the test schema");
                // A test that ends without `shutdown` (a failed one) may leave its
                // projection committing in the schema: the drop can then lose a deadlock to
                // it, and is tried again.
                let mut attempts = 0;
                loop {
                    let dropped = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .execute(&mut connection)
                        .await;
                    match dropped {
                        Ok(_) => break,
                        Err(sqlx::Error::Database(error))
                            if error.code().as_deref() == Some("40P01") && attempts < 10 =>
                        {
                            attempts += 1;
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                        Err(error) => panic!("drop the test schema: {error}"),
                    }
                }
            }
            #[cfg(feature = "dynamodb")]
            Cleanup::Tables { endpoint, tables } => {
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
        }
    }
}

/// The service served on an ephemeral port, with a client for it.
struct Running {
    base: String,
    client: Client,
    service: Service,
    stop: Option<oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    async fn start(config: Config) -> Running {
        let service = Service::start(config).await.expect("start the service");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an ephemeral port");
        let base = format!("http://{}", listener.local_addr().expect("local address"));
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(cqrs_service::serve(listener, service.clone(), async {
            let _ = stopped.await;
        }));
        Running {
            base,
            client: Client::new(),
            service,
            stop: Some(stop),
            served,
        }
    }

    /// Stops serving, waits for requests in flight, and stops the projection.
    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.served
            .await
            .expect("the server task")
            .expect("the server ends cleanly");
        // `serve` has shut the service down: its projection has ended.
        assert!(
            self.service.view_finished(),
            "the projection is still running"
        );
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> Response {
        let mut request = self.client.post(self.url(path)).json(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("send the request")
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        let mut request = self.client.get(self.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("send the request")
    }

    /// Places an order of one line at `cents`; returns its id and the response's ETag.
    async fn place(&self, cents: u64) -> (String, String) {
        let response = self.post("/orders", &place_body(cents), &[]).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let etag = header_text(&response, "etag");
        let body: Value = response.json().await.expect("JSON body");
        (text(&body["order_id"]), etag)
    }

    /// How many events the store holds, in all.
    async fn event_count(&self, db: &Database) -> usize {
        event_store(db)
            .await
            .read_all(0, 100_000)
            .await
            .expect("read all")
            .len()
    }
}

/// The event store of `db`, opened beside the service's.
async fn event_store(db: &Database) -> Box<dyn EventRepository> {
    match db {
        Database::Sqlite(path) => Box::new(
            cqrs::SqliteEventRepository::open(path)
                .await
                .expect("open the store"),
        ),
        Database::Postgres { url, schema } => Box::new(
            cqrs::PostgresEventRepository::connect(url)
                .await
                .expect("connect")
                .with_schema(schema.as_deref().unwrap_or("public"))
                .expect("schema"),
        ),
        #[cfg(feature = "dynamodb")]
        Database::DynamoDb {
            endpoint,
            events_table,
            ..
        } => Box::new(cqrs_aws::DynamoDbEventRepository::new(
            cqrs_aws::local_client(endpoint.as_deref().expect("an emulator")),
            events_table,
        )),
    }
}

fn place_body(cents: u64) -> Value {
    json!({
        "customer": "ada",
        "lines": [{ "sku": "book-1", "quantity": 1, "unit_price_cents": cents }],
    })
}

fn text(value: &Value) -> String {
    value.as_str().expect("a string").to_owned()
}

fn header_text(response: &Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .expect("a text header")
        .to_owned()
}

/// Asserts a problem response of `status` and type slug `slug`; returns its body.
async fn assert_problem(response: Response, status: StatusCode, slug: &str) -> Value {
    assert_eq!(response.status(), status, "status of a {slug} problem");
    assert_eq!(
        header_text(&response, "content-type"),
        PROBLEM_JSON,
        "content type of a {slug} problem"
    );
    let body: Value = response.json().await.expect("a JSON problem");
    assert_eq!(body["type"], format!("{PROBLEM_TYPE_BASE}{slug}"), "{body}");
    assert_eq!(body["status"], status.as_u16());
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
    body
}

/// A module `$module` with one test per `$test`, each running it on a fresh database of
/// `Backend::$backend` with the default configuration.
macro_rules! backend_tests {
    ($module:ident, $backend:ident, $($test:ident),* $(,)?) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::run(super::Backend::$backend, super::$test).await;
                }
            )*
        }
    };
}

/// The tests of `every` on SQLite, PostgreSQL and (with the feature) DynamoDB; those of
/// `sql_only` on SQLite and PostgreSQL.
macro_rules! on_backends {
    (every: $($test:ident),* $(,)?; sql_only: $($sql:ident),* $(,)?;) => {
        backend_tests!(sqlite, Sqlite, $($test,)* $($sql,)*);
        backend_tests!(postgres, Postgres, $($test,)* $($sql,)*);
        #[cfg(feature = "dynamodb")]
        backend_tests!(dynamodb, DynamoDb, $($test,)*);
    };
}

async fn run<F, Fut>(backend: Backend, test: F)
where
    F: FnOnce(Database) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let Some(db) = TestDb::new(backend) else {
        return;
    };
    test(db.database.clone()).await;
    db.remove().await;
}

on_backends! {
    every:
    order_lifecycle,
    domain_errors_are_problems,
    bad_input_is_a_4xx_problem_and_stores_nothing,
    stale_if_match_is_412,
    racing_if_match_one_wins,
    idempotent_retry_returns_the_first_outcome,
    ten_concurrent_requests_with_one_key_append_once,
    concurrent_requests_on_many_keys_append_once_per_key,
    idempotency_survives_a_restart,
    abandoned_claim_is_recovered_from_the_events,
    key_held_by_a_running_request_is_409,
    abandoned_claim_without_events_runs_once,
    read_your_writes,
    query_behind_the_token_is_503,
    metrics_count_what_requests_did,
    request_id_is_the_events_correlation_id,
    operator_page_shows_aggregates_streams_and_dead_letters,
    operator_pages_are_off_without_a_token,
    operator_pages_need_the_token,
    completed_keys_past_the_retention_are_pruned,
    a_retry_with_a_pruned_key_is_a_new_request,
    a_query_catches_up_inline_when_the_projection_is_frozen,
    ;
    // The bounded prune writes 10,500 keys: one at a time through an emulator that serves one
    // request at a time, too slow for a test. The bound is the same code on every database
    // (`prune_keys`), and the DynamoDB prune's own query is limited per batch.
    sql_only:
    a_prune_deletes_a_bounded_number_of_keys,
    ;
}

async fn order_lifecycle(db: Database) {
    let running = Running::start(Config::new(db)).await;
    let (id, etag) = running.place(2500).await;
    assert_eq!(etag, "\"1\"");

    let paid = running
        .post(
            &format!("/orders/{id}/payment"),
            &json!({ "amount_cents": 2500, "payment_reference": "pay-1" }),
            &[],
        )
        .await;
    assert_eq!(paid.status(), StatusCode::OK);
    assert_eq!(header_text(&paid, "etag"), "\"2\"");
    let body: Value = paid.json().await.expect("JSON");
    assert_eq!(body["sequence"], 2);
    assert_eq!(body["events"][0]["type"], "Paid");

    let shipped = running
        .post(
            &format!("/orders/{id}/shipment"),
            &json!({ "carrier": "post", "tracking_number": "T-1" }),
            &[],
        )
        .await;
    assert_eq!(shipped.status(), StatusCode::OK);
    let token = header_text(&shipped, "consistency-token");

    let view = running
        .get(&format!("/orders/{id}"), &[("consistency-token", &token)])
        .await;
    assert_eq!(view.status(), StatusCode::OK);
    assert_eq!(header_text(&view, "etag"), "\"3\"");
    let view: Value = view.json().await.expect("JSON");
    assert_eq!(view["status"], "shipped");
    assert_eq!(view["total_cents"], 2500);
    assert_eq!(view["payment_reference"], "pay-1");
    assert_eq!(view["shipment"]["tracking_number"], "T-1");

    let list = running
        .get("/orders", &[("consistency-token", &token)])
        .await;
    assert_eq!(list.status(), StatusCode::OK);
    let list: Value = list.json().await.expect("JSON");
    assert_eq!(list["orders"].as_array().map(Vec::len), Some(1));
    running.shutdown().await;
}

async fn domain_errors_are_problems(db: Database) {
    let running = Running::start(Config::new(db)).await;
    let (id, _) = running.place(1000).await;
    let ship = json!({ "carrier": "post", "tracking_number": "T-1" });
    let pay = |cents: u64| json!({ "amount_cents": cents, "payment_reference": "p" });

    let early = running
        .post(&format!("/orders/{id}/shipment"), &ship, &[])
        .await;
    assert_problem(early, StatusCode::CONFLICT, "order-not-paid").await;
    let wrong = running
        .post(&format!("/orders/{id}/payment"), &pay(999), &[])
        .await;
    let body = assert_problem(
        wrong,
        StatusCode::UNPROCESSABLE_ENTITY,
        "wrong-payment-amount",
    )
    .await;
    assert!(text(&body["detail"]).contains("1000"), "{body}");
    let missing = running
        .post(&format!("/orders/{}/payment", Uuid::new_v4()), &pay(1), &[])
        .await;
    assert_problem(missing, StatusCode::NOT_FOUND, "order-not-found").await;
    let empty = running
        .post("/orders", &json!({ "customer": "ada", "lines": [] }), &[])
        .await;
    assert_problem(
        empty,
        StatusCode::UNPROCESSABLE_ENTITY,
        "order-without-lines",
    )
    .await;

    let cancelled = running
        .post(
            &format!("/orders/{id}/cancellation"),
            &json!({ "reason": "changed my mind" }),
            &[],
        )
        .await;
    assert_eq!(cancelled.status(), StatusCode::OK);
    let late = running
        .post(&format!("/orders/{id}/payment"), &pay(1000), &[])
        .await;
    assert_problem(late, StatusCode::CONFLICT, "order-cancelled").await;

    let unknown = running
        .get(&format!("/orders/{}", Uuid::new_v4()), &[])
        .await;
    assert_problem(unknown, StatusCode::NOT_FOUND, "order-not-found").await;
    let nowhere = running.get("/nowhere", &[]).await;
    assert_problem(nowhere, StatusCode::NOT_FOUND, "not-found").await;
    let method = running
        .client
        .delete(running.url("/orders"))
        .send()
        .await
        .expect("send");
    assert_problem(method, StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed").await;
    running.shutdown().await;
}

async fn bad_input_is_a_4xx_problem_and_stores_nothing(db: Database) {
    let running = Running::start(Config::new(db.clone()).with_body_limit(4096)).await;
    let (id, _) = running.place(100).await;
    let before = running.event_count(&db).await;
    let raw = |path: &str, content_type: &str, body: Vec<u8>| {
        running
            .client
            .post(running.url(path))
            .header(header::CONTENT_TYPE, content_type)
            .body(body)
            .send()
    };
    let pay_path = format!("/orders/{id}/payment");

    let malformed = raw("/orders", "application/json", b"{\"customer\": ".to_vec())
        .await
        .expect("send");
    assert_problem(malformed, StatusCode::BAD_REQUEST, "malformed-json").await;
    let not_json = raw(&pay_path, "application/json", b"amount=100".to_vec())
        .await
        .expect("send");
    assert_problem(not_json, StatusCode::BAD_REQUEST, "malformed-json").await;
    let form = raw(
        &pay_path,
        "application/x-www-form-urlencoded",
        b"amount_cents=100&payment_reference=p".to_vec(),
    )
    .await
    .expect("send");
    assert_problem(
        form,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
    )
    .await;
    let no_type = running
        .client
        .post(running.url(&pay_path))
        .body(r#"{"amount_cents":100,"payment_reference":"p"}"#)
        .send()
        .await
        .expect("send");
    assert_problem(
        no_type,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
    )
    .await;
    let unknown_field = running
        .post(
            &pay_path,
            &json!({ "amount_cents": 100, "payment_reference": "p", "discount": 50 }),
            &[],
        )
        .await;
    let body = assert_problem(
        unknown_field,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-request-body",
    )
    .await;
    assert!(text(&body["detail"]).contains("discount"), "{body}");
    let unknown_line_field = running
        .post(
            "/orders",
            &json!({ "customer": "a", "lines": [{ "sku": "x", "quantity": 1, "unit_price_cents": 1, "colour": "red" }] }),
            &[],
        )
        .await;
    assert_problem(
        unknown_line_field,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-request-body",
    )
    .await;
    let wrong_type = running
        .post(
            &pay_path,
            &json!({ "amount_cents": "100", "payment_reference": "p" }),
            &[],
        )
        .await;
    assert_problem(
        wrong_type,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-request-body",
    )
    .await;
    let negative = running
        .post(
            &pay_path,
            &json!({ "amount_cents": -1, "payment_reference": "p" }),
            &[],
        )
        .await;
    assert_problem(
        negative,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-request-body",
    )
    .await;
    let huge_reference = "x".repeat(10_000);
    let huge = running
        .post(
            &pay_path,
            &json!({ "amount_cents": 100, "payment_reference": huge_reference }),
            &[],
        )
        .await;
    assert_problem(huge, StatusCode::PAYLOAD_TOO_LARGE, "body-too-large").await;
    // A body past the limit without a length (chunked): the limit applies to what is
    // streamed. Small enough to sit in the socket's buffers when the server answers early.
    let chunks =
        futures_util::stream::iter((0..5).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1024])));
    let streamed = running
        .client
        .post(running.url(&pay_path))
        .header(header::CONTENT_TYPE, "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("send");
    assert_problem(streamed, StatusCode::PAYLOAD_TOO_LARGE, "body-too-large").await;
    let bad_if_match = running
        .post(
            &pay_path,
            &json!({ "amount_cents": 100, "payment_reference": "p" }),
            &[("if-match", "one")],
        )
        .await;
    assert_problem(bad_if_match, StatusCode::BAD_REQUEST, "invalid-if-match").await;
    let bad_key = running
        .post(
            &pay_path,
            &json!({ "amount_cents": 100, "payment_reference": "p" }),
            &[("idempotency-key", &"k".repeat(300))],
        )
        .await;
    assert_problem(bad_key, StatusCode::BAD_REQUEST, "invalid-idempotency-key").await;
    // The headers take exactly what the OpenAPI document's patterns describe: a key of
    // visible ASCII characters (no space inside), a sequence or position of 1 to 18 digits.
    for (name, value, slug) in [
        ("idempotency-key", "two words", "invalid-idempotency-key"),
        ("if-match", "\"1234567890123456789\"", "invalid-if-match"),
        ("if-match", "\"+1\"", "invalid-if-match"),
        ("if-match", "0", "invalid-if-match"),
    ] {
        let refused = running
            .post(
                &pay_path,
                &json!({ "amount_cents": 100, "payment_reference": "p" }),
                &[(name, value)],
            )
            .await;
        assert_problem(refused, StatusCode::BAD_REQUEST, slug).await;
    }
    let bad_id = running
        .post(
            "/orders/not-a-uuid/payment",
            &json!({ "amount_cents": 100, "payment_reference": "p" }),
            &[],
        )
        .await;
    assert_problem(bad_id, StatusCode::NOT_FOUND, "order-not-found").await;
    let bad_token = running
        .get(&format!("/orders/{id}"), &[("consistency-token", "soon")])
        .await;
    assert_problem(
        bad_token,
        StatusCode::BAD_REQUEST,
        "invalid-consistency-token",
    )
    .await;
    let long_token = running
        .get(
            &format!("/orders/{id}"),
            &[("consistency-token", "1234567890123456789")],
        )
        .await;
    assert_problem(
        long_token,
        StatusCode::BAD_REQUEST,
        "invalid-consistency-token",
    )
    .await;
    // A limit past any integer type is the largest page, as the document says; a limit
    // that is not a non-negative integer is refused.
    let huge_limit = running
        .get("/orders?limit=123456789012345678901234567890", &[])
        .await;
    assert_eq!(huge_limit.status(), StatusCode::OK);
    let body: Value = huge_limit.json().await.expect("JSON");
    assert!(body["orders"].is_array(), "{body}");
    for query in ["limit=-1", "limit=1.5", "limit=", "limit=%2B1", "page=2"] {
        let refused = running.get(&format!("/orders?{query}"), &[]).await;
        assert_problem(refused, StatusCode::BAD_REQUEST, "invalid-query").await;
    }

    assert_eq!(
        running.event_count(&db).await,
        before,
        "bad input stored nothing"
    );
    // The order is still unpaid: none of the above paid it.
    let paid = running
        .post(
            &pay_path,
            &json!({ "amount_cents": 100, "payment_reference": "p" }),
            &[],
        )
        .await;
    assert_eq!(paid.status(), StatusCode::OK);
    running.shutdown().await;
}

async fn stale_if_match_is_412(db: Database) {
    let running = Running::start(Config::new(db.clone())).await;
    let (id, etag) = running.place(700).await;
    let pay = json!({ "amount_cents": 700, "payment_reference": "p" });
    let stale = running
        .post(
            &format!("/orders/{id}/payment"),
            &pay,
            &[("if-match", "\"0\"")],
        )
        .await;
    let body = assert_problem(
        stale,
        StatusCode::PRECONDITION_FAILED,
        "precondition-failed",
    )
    .await;
    assert!(text(&body["detail"]).contains("sequence 1"), "{body}");
    let before = running.event_count(&db).await;
    let fresh = running
        .post(
            &format!("/orders/{id}/payment"),
            &pay,
            &[("if-match", &etag)],
        )
        .await;
    assert_eq!(fresh.status(), StatusCode::OK);
    assert_eq!(header_text(&fresh, "etag"), "\"2\"");
    assert_eq!(running.event_count(&db).await, before + 1);
    // The same If-Match again is stale now.
    let again = running
        .post(
            &format!("/orders/{id}/cancellation"),
            &json!({ "reason": "r" }),
            &[("if-match", &etag)],
        )
        .await;
    assert_problem(
        again,
        StatusCode::PRECONDITION_FAILED,
        "precondition-failed",
    )
    .await;
    running.shutdown().await;
}

/// Two tabs cancel the same order with the same ETag at once: one wins, the other is 412.
async fn racing_if_match_one_wins(db: Database) {
    let running = Running::start(Config::new(db.clone())).await;
    for _ in 0..5 {
        let (id, etag) = running.place(300).await;
        let path = format!("/orders/{id}/cancellation");
        let body = json!({ "reason": "tab" });
        let headers = [("if-match", etag.as_str())];
        let requests = (0..8).map(|_| running.post(&path, &body, &headers));
        let statuses: Vec<StatusCode> = futures_util::future::join_all(requests)
            .await
            .iter()
            .map(Response::status)
            .collect();
        let won = statuses.iter().filter(|s| **s == StatusCode::OK).count();
        let refused = statuses
            .iter()
            .filter(|s| **s == StatusCode::PRECONDITION_FAILED)
            .count();
        assert_eq!((won, refused), (1, 7), "{statuses:?}");
    }
    running.shutdown().await;
}

async fn idempotent_retry_returns_the_first_outcome(db: Database) {
    let running = Running::start(Config::new(db.clone())).await;
    let key = Uuid::new_v4().to_string();
    let first = running
        .post("/orders", &place_body(42), &[("idempotency-key", &key)])
        .await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_location = header_text(&first, "location");
    let first_body: Value = first.json().await.expect("JSON");
    let count = running.event_count(&db).await;

    let retry = running
        .post("/orders", &place_body(42), &[("idempotency-key", &key)])
        .await;
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(header_text(&retry, "idempotent-replayed"), "true");
    assert_eq!(header_text(&retry, "location"), first_location);
    let retry_body: Value = retry.json().await.expect("JSON");
    assert_eq!(retry_body, first_body);
    assert_eq!(
        running.event_count(&db).await,
        count,
        "the retry appended nothing"
    );

    // The same key with another request is refused, and stores nothing.
    let other = running
        .post("/orders", &place_body(43), &[("idempotency-key", &key)])
        .await;
    assert_problem(
        other,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
    )
    .await;

    // A domain error is an outcome too: the retry gets it back even though the order
    // could now be paid.
    let id = text(&first_body["order_id"]);
    let pay_key = Uuid::new_v4().to_string();
    let path = format!("/orders/{id}/payment");
    let short = json!({ "amount_cents": 41, "payment_reference": "p" });
    let refused = running
        .post(&path, &short, &[("idempotency-key", &pay_key)])
        .await;
    assert_problem(
        refused,
        StatusCode::UNPROCESSABLE_ENTITY,
        "wrong-payment-amount",
    )
    .await;
    let again = running
        .post(&path, &short, &[("idempotency-key", &pay_key)])
        .await;
    assert_eq!(header_text(&again, "idempotent-replayed"), "true");
    assert_problem(
        again,
        StatusCode::UNPROCESSABLE_ENTITY,
        "wrong-payment-amount",
    )
    .await;
    assert_eq!(running.event_count(&db).await, count);
    running.shutdown().await;
}

async fn ten_concurrent_requests_with_one_key_append_once(db: Database) {
    let running = Running::start(Config::new(db.clone())).await;
    let (id, _) = running.place(900).await;
    let before = running.event_count(&db).await;
    let path = format!("/orders/{id}/payment");
    let body = json!({ "amount_cents": 900, "payment_reference": "p" });
    let key = Uuid::new_v4().to_string();
    let headers = [("idempotency-key", key.as_str())];
    let requests = (0..10).map(|_| running.post(&path, &body, &headers));
    let responses = futures_util::future::join_all(requests).await;
    let mut bodies = Vec::new();
    let mut replayed = 0;
    for response in responses {
        assert_eq!(response.status(), StatusCode::OK);
        replayed += usize::from(response.headers().contains_key("idempotent-replayed"));
        bodies.push(response.json::<Value>().await.expect("JSON"));
    }
    assert_eq!(replayed, 9, "one request ran, nine were replayed");
    assert!(
        bodies.windows(2).all(|pair| pair[0] == pair[1]),
        "{bodies:?}"
    );
    assert_eq!(running.event_count(&db).await, before + 1, "one append");
    running.shutdown().await;
}

/// Many keyed requests at once, several on each key: each key's command runs once (one
/// append, carrying the key) and every request under it is answered with that outcome.
async fn concurrent_requests_on_many_keys_append_once_per_key(db: Database) {
    let running = Running::start(Config::new(db.clone())).await;
    let mut orders = Vec::new();
    for cents in 1..=6 {
        orders.push(running.place(100 * cents).await.0);
    }
    let before = running.event_count(&db).await;
    // Each order paid under a key of its own by four requests; twelve creates with a key
    // each; eight creates under one key. (key, path, body, status)
    let mut requests = Vec::new();
    for (i, id) in (1_u64..).zip(&orders) {
        let key = format!("pay-{i}-{}", Uuid::new_v4());
        let body = json!({ "amount_cents": 100 * i, "payment_reference": "p" });
        for _ in 0..4 {
            let path = format!("/orders/{id}/payment");
            requests.push((key.clone(), path, body.clone(), StatusCode::OK));
        }
    }
    for i in 0..12 {
        let key = format!("create-{i}-{}", Uuid::new_v4());
        let created = StatusCode::CREATED;
        requests.push((key, "/orders".to_owned(), place_body(10 + i), created));
    }
    let shared = format!("create-shared-{}", Uuid::new_v4());
    for _ in 0..8 {
        let created = StatusCode::CREATED;
        requests.push((shared.clone(), "/orders".to_owned(), place_body(7), created));
    }
    let headers: Vec<[(&str, &str); 1]> = requests
        .iter()
        .map(|(key, ..)| [("idempotency-key", key.as_str())])
        .collect();
    let sent = requests
        .iter()
        .zip(&headers)
        .map(|((_, path, body, _), headers)| running.post(path, body, headers));
    let responses = futures_util::future::join_all(sent).await;
    let mut runs: HashMap<&str, usize> = HashMap::new();
    let mut bodies: HashMap<&str, Vec<Value>> = HashMap::new();
    for ((key, path, _, status), response) in requests.iter().zip(responses) {
        assert_eq!(response.status(), *status, "{path} under {key}");
        let ran = !response.headers().contains_key("idempotent-replayed");
        *runs.entry(key).or_default() += usize::from(ran);
        let body = response.json::<Value>().await.expect("JSON");
        bodies.entry(key).or_default().push(body);
    }
    let mut keys: Vec<&str> = runs.keys().copied().collect();
    keys.sort_unstable();
    assert_eq!(keys.len(), 6 + 12 + 1);
    for key in &keys {
        assert_eq!(runs[key], 1, "one request under {key} ran");
        let answers = &bodies[key];
        assert!(
            answers.windows(2).all(|pair| pair[0] == pair[1]),
            "{answers:?}"
        );
    }
    let metadata = metadata(&db).await;
    let mut appended: Vec<&str> = metadata[before..]
        .iter()
        .map(|metadata| metadata["idempotency_key"].as_str().expect("the key"))
        .collect();
    appended.sort_unstable();
    assert_eq!(appended, keys, "one append per key");
    running.shutdown().await;
}

async fn idempotency_survives_a_restart(db: Database) {
    let key = Uuid::new_v4().to_string();
    let running = Running::start(Config::new(db.clone())).await;
    let first = running
        .post("/orders", &place_body(5), &[("idempotency-key", &key)])
        .await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first_body: Value = first.json().await.expect("JSON");
    running.shutdown().await;
    let count = {
        let running = Running::start(Config::new(db.clone())).await;
        let count = running.event_count(&db).await;
        running.shutdown().await;
        count
    };

    let running = Running::start(Config::new(db.clone())).await;
    let retry = running
        .post("/orders", &place_body(5), &[("idempotency-key", &key)])
        .await;
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(header_text(&retry, "idempotent-replayed"), "true");
    let retry_body: Value = retry.json().await.expect("JSON");
    assert_eq!(retry_body, first_body);
    assert_eq!(running.event_count(&db).await, count);
    running.shutdown().await;
}

/// A process that appended and died before recording the outcome: after the lease, a retry
/// finds the events that carry the key and answers with them, appending nothing.
async fn abandoned_claim_is_recovered_from_the_events(db: Database) {
    let lease = Duration::from_millis(200);
    let running = Running::start(Config::new(db.clone()).with_idempotency_lease(lease)).await;
    let key = Uuid::new_v4().to_string();
    let first = running
        .post("/orders", &place_body(8), &[("idempotency-key", &key)])
        .await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first_body: Value = first.json().await.expect("JSON");
    // Forget the recorded outcome, as if the process had died right after the append.
    forget_response(&db, &key).await;
    let count = running.event_count(&db).await;
    tokio::time::sleep(lease * 2).await;

    let retry = running
        .post("/orders", &place_body(8), &[("idempotency-key", &key)])
        .await;
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(header_text(&retry, "idempotent-replayed"), "true");
    let retry_body: Value = retry.json().await.expect("JSON");
    assert_eq!(retry_body, first_body);
    assert_eq!(
        running.event_count(&db).await,
        count,
        "recovered, not run again"
    );
    running.shutdown().await;
}

/// Sets the key's response back to NULL: a claim whose request never finished.
async fn forget_response(db: &Database, key: &str) {
    #[cfg(feature = "dynamodb")]
    if let Some(keys) = dynamo::KeyItems::of(db) {
        keys.forget_response(key).await;
        return;
    }
    let sql = "UPDATE {table} SET response = NULL WHERE idempotency_key = $1";
    execute(db, sql, &[key]).await;
}

/// Claims `key` for `request` at `claimed_at` (ms since the epoch), as a request that is
/// running, or that died before it appended.
async fn claim(db: &Database, key: &str, request: &str, claimed_at: i64) {
    #[cfg(feature = "dynamodb")]
    if let Some(keys) = dynamo::KeyItems::of(db) {
        keys.claim(key, request, claimed_at, None).await;
        return;
    }
    let sql = "INSERT INTO {table} (idempotency_key, request, aggregate_id, claimed_at) \
               VALUES ($1, $2, $3, CAST($4 AS BIGINT))";
    let id = Uuid::new_v4().to_string();
    execute(db, sql, &[key, request, &id, &claimed_at.to_string()]).await;
}

/// Runs `sql` on the idempotency table (`{table}`) with text parameters `$1`, `$2`, ...
async fn execute(db: &Database, sql: &str, params: &[&str]) {
    match db {
        Database::Sqlite(path) => {
            let sql = sql.replace("{table}", "http_idempotency");
            let url = format!("sqlite://{}", path.display());
            let mut connection = sqlx::SqliteConnection::connect(&url)
                .await
                .expect("connect");
            let mut query = sqlx::query(&sql);
            for param in params {
                query = query.bind(*param);
            }
            query.execute(&mut connection).await.expect("execute");
        }
        Database::Postgres { url, schema } => {
            let schema = schema.as_deref().unwrap_or("public");
            let sql = sql.replace("{table}", &format!("{schema}.http_idempotency"));
            let mut connection = sqlx::PgConnection::connect(url).await.expect("connect");
            let mut query = sqlx::query(&sql);
            for param in params {
                query = query.bind(*param);
            }
            query.execute(&mut connection).await.expect("execute");
        }
        #[cfg(feature = "dynamodb")]
        Database::DynamoDb { .. } => unreachable!("no SQL on DynamoDB: {sql}"),
    }
}

/// The idempotency keys' items on DynamoDB, written and read as the service's ADR 0018
/// describes them (the SQL tests' statements, for the DynamoDB backend).
#[cfg(feature = "dynamodb")]
mod dynamo {
    use cqrs_aws::aws_sdk_dynamodb::types::AttributeValue;
    use cqrs_aws::aws_sdk_dynamodb::Client;
    use cqrs_service::Database;

    pub(super) struct KeyItems {
        client: Client,
        table: String,
    }

    fn s(text: &str) -> AttributeValue {
        AttributeValue::S(text.to_owned())
    }

    fn pk(key: &str) -> AttributeValue {
        s(&format!("$idempotency#{key}"))
    }

    impl KeyItems {
        /// The key items of `db`, when it is DynamoDB.
        pub(super) fn of(db: &Database) -> Option<KeyItems> {
            match db {
                Database::DynamoDb {
                    endpoint,
                    views_table,
                    ..
                } => Some(KeyItems {
                    client: cqrs_aws::local_client(endpoint.as_deref().expect("an emulator")),
                    table: views_table.clone(),
                }),
                _ => None,
            }
        }

        /// Writes `key`'s item, claimed at `claimed_at`, with `response` if given (then in
        /// the list index, as a completed key).
        pub(super) async fn claim(
            &self,
            key: &str,
            request: &str,
            claimed_at: i64,
            response: Option<&str>,
        ) {
            let mut put = self
                .client
                .put_item()
                .table_name(&self.table)
                .item("pk", pk(key))
                .item("sk", AttributeValue::N("0".into()))
                .item("kind", s("idempotency_key"))
                .item("idempotency_key", s(key))
                .item("request", s(request))
                .item("aggregate_id", s(&uuid::Uuid::new_v4().to_string()))
                .item("claimed_at", AttributeValue::N(claimed_at.to_string()));
            if let Some(response) = response {
                put = put
                    .item("response", s(response))
                    .item("view_list", s("$idempotency"))
                    .item("view_order", s(&format!("{claimed_at:020}#{key}")));
            }
            put.send().await.expect("put a key item");
        }

        /// Removes `key`'s response: a claim whose request never finished.
        pub(super) async fn forget_response(&self, key: &str) {
            self.client
                .update_item()
                .table_name(&self.table)
                .key("pk", pk(key))
                .key("sk", AttributeValue::N("0".into()))
                .update_expression("REMOVE #response, view_list, view_order")
                .expression_attribute_names("#response", "response")
                .send()
                .await
                .expect("remove the response");
        }

        /// Every key stored.
        pub(super) async fn keys(&self) -> Vec<String> {
            let mut keys = Vec::new();
            let mut start = None;
            loop {
                let page = self
                    .client
                    .scan()
                    .table_name(&self.table)
                    .filter_expression("begins_with(pk, :prefix)")
                    .expression_attribute_values(":prefix", s("$idempotency#"))
                    .set_exclusive_start_key(start.take())
                    .consistent_read(true)
                    .send()
                    .await
                    .expect("scan the keys");
                for item in page.items() {
                    let key = item["idempotency_key"].as_s().expect("a key");
                    keys.push(key.clone());
                }
                match page.last_evaluated_key() {
                    Some(last) if !last.is_empty() => start = Some(last.clone()),
                    _ => return keys,
                }
            }
        }
    }
}

/// A key held by a request still running: the retry waits, then answers `409` with
/// `Retry-After`, and runs nothing.
async fn key_held_by_a_running_request_is_409(db: Database) {
    let config = Config::new(db.clone()).with_idempotency_wait(Duration::from_millis(200));
    let running = Running::start(config).await;
    let key = Uuid::new_v4().to_string();
    let body = place_body(3);
    let request = format!(
        "POST /orders\n{}",
        serde_json::to_string(&body).expect("JSON")
    );
    claim(&db, &key, &request, now_millis()).await;
    let before = running.event_count(&db).await;
    let response = running
        .post("/orders", &body, &[("idempotency-key", &key)])
        .await;
    assert_eq!(header_text(&response, "retry-after"), "1");
    assert_problem(
        response,
        StatusCode::CONFLICT,
        "idempotency-request-in-progress",
    )
    .await;
    assert_eq!(running.event_count(&db).await, before);
    running.shutdown().await;
}

/// A key whose request died before it appended: after the lease, a retry takes the claim
/// over and runs the command, once, under the id the claim chose.
async fn abandoned_claim_without_events_runs_once(db: Database) {
    let lease = Duration::from_millis(200);
    let running = Running::start(Config::new(db.clone()).with_idempotency_lease(lease)).await;
    let key = Uuid::new_v4().to_string();
    let body = place_body(4);
    let request = format!(
        "POST /orders\n{}",
        serde_json::to_string(&body).expect("JSON")
    );
    claim(&db, &key, &request, now_millis() - 60_000).await;
    let before = running.event_count(&db).await;
    let headers = [("idempotency-key", key.as_str())];
    let retries = (0..4).map(|_| running.post("/orders", &body, &headers));
    let responses = futures_util::future::join_all(retries).await;
    let mut bodies = Vec::new();
    for response in responses {
        assert_eq!(response.status(), StatusCode::CREATED);
        bodies.push(response.json::<Value>().await.expect("JSON"));
    }
    assert!(
        bodies.windows(2).all(|pair| pair[0] == pair[1]),
        "{bodies:?}"
    );
    assert_eq!(running.event_count(&db).await, before + 1, "one append");
    running.shutdown().await;
}

fn now_millis() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970");
    i64::try_from(since.as_millis()).expect("milliseconds fit")
}

/// Under a stream of writes, a query that sends the command's token back never shows the
/// order as it was before that command.
async fn read_your_writes(db: Database) {
    let running = Running::start(Config::new(db)).await;
    let workers = (0..8).map(|_| async {
        for _ in 0..5 {
            let placed = running.post("/orders", &place_body(10), &[]).await;
            assert_eq!(placed.status(), StatusCode::CREATED);
            let token = header_text(&placed, "consistency-token");
            let body: Value = placed.json().await.expect("JSON");
            let id = text(&body["order_id"]);
            let view = running
                .get(&format!("/orders/{id}"), &[("consistency-token", &token)])
                .await;
            assert_eq!(view.status(), StatusCode::OK, "the placed order is visible");
            let paid = running
                .post(
                    &format!("/orders/{id}/payment"),
                    &json!({ "amount_cents": 10, "payment_reference": "p" }),
                    &[],
                )
                .await;
            let token = header_text(&paid, "consistency-token");
            let view: Value = running
                .get(&format!("/orders/{id}"), &[("consistency-token", &token)])
                .await
                .json()
                .await
                .expect("JSON");
            assert_eq!(view["status"], "paid", "{view}");
            assert_eq!(view["sequence"], 2);
        }
    });
    futures_util::future::join_all(workers).await;
    running.shutdown().await;
}

/// With inline catch-up (as on Lambda), a query with a token is answered from the store even
/// when the running projection is stopped (a frozen process): the query catches the view up
/// itself. Without it, the same query would be `503` (`query_behind_the_token_is_503`).
async fn a_query_catches_up_inline_when_the_projection_is_frozen(db: Database) {
    let config = Config::new(db)
        .with_inline_catch_up(true)
        .with_consistency_wait(Duration::from_secs(5));
    let running = Running::start(config).await;
    running.service.stop();
    let (id, _) = running.place(12).await;
    let paid = running
        .post(
            &format!("/orders/{id}/payment"),
            &json!({ "amount_cents": 12, "payment_reference": "p" }),
            &[],
        )
        .await;
    assert_eq!(paid.status(), StatusCode::OK);
    let token = header_text(&paid, "consistency-token");
    let view = running
        .get(&format!("/orders/{id}"), &[("consistency-token", &token)])
        .await;
    assert_eq!(view.status(), StatusCode::OK);
    let view: Value = view.json().await.expect("JSON");
    assert_eq!(view["status"], "paid", "{view}");
    assert_eq!(view["sequence"], 2);
    // The running projection did not move: the query did the work.
    assert!(running.service.view_position() < token.parse::<i64>().expect("a number"));
    running.shutdown().await;
}

/// A token the view cannot reach in time: `503` with `Retry-After`.
async fn query_behind_the_token_is_503(db: Database) {
    let config = Config::new(db).with_consistency_wait(Duration::from_millis(100));
    let running = Running::start(config).await;
    let (id, _) = running.place(1).await;
    let response = running
        .get(
            &format!("/orders/{id}"),
            &[("consistency-token", "1000000000")],
        )
        .await;
    assert_eq!(header_text(&response, "retry-after"), "1");
    assert_problem(response, StatusCode::SERVICE_UNAVAILABLE, "view-behind").await;
    running.shutdown().await;
}

/// Shutting down while commands are in flight: every command the server answered is
/// stored, none is answered with a server error, and none is stored unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_finishes_requests_in_flight() {
    let Some(db) = TestDb::new(Backend::Sqlite) else {
        return;
    };
    let running = Running::start(Config::new(db.database.clone())).await;
    running.place(1).await;
    let client = running.client.clone();
    let base = running.base.clone();
    let requests: Vec<_> = (0..16)
        .map(|i| {
            let client = client.clone();
            let url = format!("{base}/orders");
            tokio::spawn(async move {
                client
                    .post(url)
                    .json(&place_body(i + 1))
                    .send()
                    .await
                    .map(|response| response.status())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(5)).await;
    running.shutdown().await;
    let mut created = 0;
    for request in requests {
        match request.await.expect("the request task") {
            Ok(status) => {
                assert_eq!(status, StatusCode::CREATED);
                created += 1;
            }
            // Not accepted before the listener closed: nothing was stored for it.
            Err(error) => assert!(error.is_connect() || error.is_request(), "{error}"),
        }
    }
    let restarted = Running::start(Config::new(db.database.clone())).await;
    assert_eq!(restarted.event_count(&db.database).await, 1 + created);
    restarted.shutdown().await;
    db.remove().await;
}

/// The value of the sample `series` (name and labels, as written) in a Prometheus text page;
/// 0 when absent.
fn sample(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.trim().parse().expect("a number"))
        .unwrap_or(0.0)
}

impl Running {
    async fn metrics(&self) -> String {
        let response = self.get("/metrics", &[]).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(header_text(&response, "content-type").starts_with("text/plain; version=0.0.4"));
        response.text().await.expect("a text page")
    }
}

fn commands(command: &str, outcome: &str) -> String {
    format!("cqrs_service_commands_total{{command=\"{command}\",outcome=\"{outcome}\"}}")
}

async fn metrics_count_what_requests_did(db: Database) {
    // The DynamoDB emulator serves one request at a time (as the tests run it), so racing
    // commands there may each see the one before them and never conflict.
    #[cfg(feature = "dynamodb")]
    let races_conflict = !matches!(db, Database::DynamoDb { .. });
    #[cfg(not(feature = "dynamodb"))]
    let races_conflict = true;
    let running = Running::start(Config::new(db)).await;
    let page = running.metrics().await;
    assert_eq!(
        sample(&page, "cqrs_service_append_seconds_count"),
        0.0,
        "{page}"
    );
    assert!(
        page.contains("# TYPE cqrs_service_append_seconds histogram"),
        "{page}"
    );

    let (a, _) = running.place(1000).await;
    let key = [("idempotency-key", "metrics-key-1")];
    let first = running.post("/orders", &place_body(400), &key).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let again = running.post("/orders", &place_body(400), &key).await;
    assert_eq!(header_text(&again, "idempotent-replayed"), "true");
    let wrong = json!({ "amount_cents": 999, "payment_reference": "p" });
    let refused = running
        .post(&format!("/orders/{a}/payment"), &wrong, &[])
        .await;
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let stale = running
        .post(
            &format!("/orders/{a}/cancellation"),
            &json!({ "reason": "r" }),
            &[("if-match", "\"0\"")],
        )
        .await;
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);

    // Ten payments of each of five orders at once: one each is paid, the others lose the
    // race (a conflict, retried on the fresh state) or see it paid.
    let pay = json!({ "amount_cents": 300, "payment_reference": "p" });
    let mut token = String::new();
    for _ in 0..5 {
        let (id, _) = running.place(300).await;
        let path = format!("/orders/{id}/payment");
        let requests = (0..10).map(|_| running.post(&path, &pay, &[]));
        let responses = futures_util::future::join_all(requests).await;
        for response in &responses {
            if response.status() == StatusCode::OK {
                token = header_text(response, "consistency-token");
            }
        }
        let paid = responses.iter().filter(|r| r.status() == StatusCode::OK);
        assert_eq!(paid.count(), 1);
    }
    // Read our writes, so the view has reached the last payment.
    let read = running
        .get("/orders", &[("consistency-token", &token)])
        .await;
    assert_eq!(read.status(), StatusCode::OK);

    let page = running.metrics().await;
    assert_eq!(sample(&page, &commands("place", "ok")), 7.0, "{page}");
    assert_eq!(sample(&page, &commands("pay", "ok")), 5.0, "{page}");
    assert_eq!(
        sample(&page, &commands("pay", "order-already-paid")),
        45.0,
        "{page}"
    );
    assert_eq!(
        sample(&page, &commands("pay", "wrong-payment-amount")),
        1.0,
        "{page}"
    );
    assert_eq!(
        sample(&page, &commands("cancel", "precondition-failed")),
        1.0,
        "{page}"
    );
    assert_eq!(
        sample(&page, "cqrs_service_idempotent_replays_total"),
        1.0,
        "{page}"
    );
    let conflicts = sample(&page, "cqrs_service_append_conflicts_total");
    assert!(
        conflicts >= 1.0 || !races_conflict,
        "fifty racing payments made no conflict: {page}"
    );
    // Every append is timed: the twelve that landed and the ones refused as conflicts.
    assert_eq!(
        sample(&page, "cqrs_service_append_seconds_count"),
        12.0 + conflicts,
        "{page}"
    );
    assert_eq!(
        sample(&page, "cqrs_service_append_seconds_bucket{le=\"+Inf\"}"),
        12.0 + conflicts
    );
    assert!(sample(&page, "cqrs_service_append_seconds_sum") > 0.0);
    let head = sample(&page, "cqrs_service_store_head_position");
    assert_eq!(
        sample(&page, "cqrs_service_projection_position"),
        head,
        "{page}"
    );
    assert_eq!(sample(&page, "cqrs_service_projection_lag"), 0.0, "{page}");
    assert!(head >= 12.0, "{page}");
    running.shutdown().await;
}

/// The metadata of every event in the store, in position order.
async fn metadata(db: &Database) -> Vec<Value> {
    let events = event_store(db).await.read_all(0, 1000).await;
    let events = events.expect("read all");
    events.into_iter().map(|event| event.metadata).collect()
}

async fn request_id_is_the_events_correlation_id(db: Database) {
    let running = Running::start(Config::new(db.clone())).await;
    let sent = running
        .post(
            "/orders",
            &place_body(100),
            &[
                ("x-request-id", "req-from-client"),
                ("idempotency-key", "k-1"),
            ],
        )
        .await;
    assert_eq!(sent.status(), StatusCode::CREATED);
    assert_eq!(header_text(&sent, "x-request-id"), "req-from-client");
    let generated = running.post("/orders", &place_body(200), &[]).await;
    assert_eq!(generated.status(), StatusCode::CREATED);
    let request_id = header_text(&generated, "x-request-id");
    assert!(Uuid::parse_str(&request_id).is_ok(), "{request_id}");
    let upper = "6F9619FF-8B86-D011-B42D-00C04FC964FF";
    let shouted = running
        .post("/orders", &place_body(300), &[("x-request-id", upper)])
        .await;
    assert_eq!(shouted.status(), StatusCode::CREATED);
    running.shutdown().await;

    // The metadata keeps the request id's text only when the events' own field cannot give
    // it back: not for a generated (canonical) UUID.
    let metadata = metadata(&db).await;
    assert_eq!(
        metadata,
        vec![
            json!({ "correlation_id": "req-from-client", "idempotency_key": "k-1" }),
            Value::Null,
            json!({ "correlation_id": upper }),
        ]
    );
    // The events' own correlation field: the request id when it is a UUID, else a UUID
    // derived from it.
    let stored = event_store(&db)
        .await
        .read_all(0, 1000)
        .await
        .expect("read all");
    let correlations: Vec<_> = stored.iter().map(|event| event.correlation_id).collect();
    assert_eq!(
        correlations,
        vec![
            Some(cqrs_service::correlation_uuid("req-from-client")),
            Some(Uuid::parse_str(&request_id).expect("a UUID")),
            Some(Uuid::parse_str(upper).expect("a UUID")),
        ]
    );
    assert_eq!(
        stored[1].correlation_id.map(|id| id.to_string()),
        Some(request_id)
    );
    assert_ne!(stored[0].causation_id, stored[1].causation_id);
}

/// An event of a kind the order view does not know: a poison event for its projection.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, cqrs::DomainEvent)]
enum Rogue {
    #[event(name = "OrderRefunded")]
    Refunded { cents: u64 },
}

/// Appends one `Rogue` event to a fresh order stream, behind the service's back.
async fn append_rogue(db: &Database) -> Uuid {
    let id = Uuid::new_v4();
    let event = cqrs::PersistableDomainEvent::new(
        "order",
        id,
        1,
        &Rogue::Refunded { cents: 5 },
        Value::Null,
    )
    .expect("an event");
    event_store(db)
        .await
        .append(vec![event])
        .await
        .expect("append");
    id
}

/// The `<tr>` of `page`'s table `table` that mentions `needle`.
fn table_row<'a>(page: &'a str, table: &str, needle: &str) -> &'a str {
    let start = page
        .find(&format!("<table id=\"{table}\">"))
        .unwrap_or_else(|| panic!("no table {table}: {page}"));
    let table_html = &page[start..];
    let table_html = &table_html[..table_html.find("</table>").expect("a closed table")];
    table_html
        .split("<tr>")
        .find(|row| row.contains(needle))
        .unwrap_or_else(|| panic!("no row with {needle} in {table}: {table_html}"))
}

/// The operator token of the tests that serve the operator pages.
const OPERATOR_TOKEN: &str = "operator-secret-1";

impl Running {
    /// The operator page at `path`, asked for with the operator token.
    async fn html(&self, path: &str) -> String {
        let bearer = format!("Bearer {OPERATOR_TOKEN}");
        let response = self.get(path, &[("authorization", &bearer)]).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(
            header_text(&response, "content-type"),
            "text/html; charset=utf-8"
        );
        response.text().await.expect("an HTML page")
    }
}

async fn operator_page_shows_aggregates_streams_and_dead_letters(db: Database) {
    let config = Config::new(db.clone()).with_operator_token(OPERATOR_TOKEN);
    let running = Running::start(config).await;
    let placed = running
        .post(
            "/orders",
            &json!({
                "customer": "<script>alert(1)</script>",
                "lines": [{ "sku": "book-1", "quantity": 1, "unit_price_cents": 900 }],
            }),
            &[("x-request-id", "req-operator")],
        )
        .await;
    assert_eq!(placed.status(), StatusCode::CREATED);
    let placed: Value = placed.json().await.expect("JSON");
    let id = text(&placed["order_id"]);
    let pay = json!({ "amount_cents": 900, "payment_reference": "pay-operator" });
    let paid = running
        .post(&format!("/orders/{id}/payment"), &pay, &[])
        .await;
    assert_eq!(paid.status(), StatusCode::OK);
    let (other, _) = running.place(100).await;
    let rogue = append_rogue(&db).await;

    // The projection tries the rogue event, gives up, records it and moves past it (the
    // dead letter is written before the checkpoint moves).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let page = loop {
        let page = running.html("/operator").await;
        if page.contains("OrderRefunded") && page.contains("<td class=\"checkpoint\">4</td>") {
            break page;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no dead letter: {page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(table_row(&page, "aggregates", &id).contains("<td class=\"events\">2</td>"));
    assert!(table_row(&page, "aggregates", &other).contains("<td class=\"events\">1</td>"));
    assert!(table_row(&page, "aggregates", &rogue.to_string()).contains(">1</td>"));
    assert!(page.contains(&format!("<a href=\"/operator/orders/{id}\">")));
    let letter = table_row(&page, "dead-letters", &rogue.to_string());
    assert!(letter.contains("OrderRefunded"), "{letter}");
    assert!(letter.contains("<td class=\"reason\">"), "{letter}");
    assert!(
        !letter.contains("<td class=\"reason\"></td>"),
        "an empty reason: {letter}"
    );
    // The rogue event is the store's last: the checkpoint is past it, so the lag is 0.
    let projection = table_row(&page, "projection", "checkpoint\"");
    assert!(
        projection.contains("<td class=\"checkpoint\">4</td>"),
        "{projection}"
    );
    assert!(
        projection.contains("<td class=\"head\">4</td>"),
        "{projection}"
    );
    assert!(
        projection.contains("<td class=\"lag\">0</td>"),
        "{projection}"
    );

    let stream = running.html(&format!("/operator/orders/{id}")).await;
    let placed_row = table_row(&stream, "events", "OrderPlaced");
    assert!(
        placed_row.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{placed_row}"
    );
    assert!(
        !stream.contains("<script>"),
        "markup from a payload is escaped"
    );
    assert!(placed_row.contains("&quot;correlation_id&quot;: &quot;req-operator&quot;"));
    assert!(
        placed_row.contains(&format!(
            "<td class=\"correlation\">{}</td>",
            cqrs_service::correlation_uuid("req-operator")
        )),
        "the correlation column: {placed_row}"
    );
    assert!(
        placed_row.contains("+00:00</td>"),
        "an RFC 3339 timestamp: {placed_row}"
    );
    let paid_row = table_row(&stream, "events", "OrderPaid");
    assert!(paid_row.contains("pay-operator"), "{paid_row}");
    assert!(paid_row.contains("<td>2</td>"), "sequence 2: {paid_row}");

    let bearer = format!("Bearer {OPERATOR_TOKEN}");
    let unknown = running
        .get("/operator/orders/not-a-uuid", &[("authorization", &bearer)])
        .await;
    assert_problem(unknown, StatusCode::NOT_FOUND, "order-not-found").await;
    running.shutdown().await;
}

/// Without a configured token the operator pages do not exist: `404`, with or without an
/// `Authorization` header.
async fn operator_pages_are_off_without_a_token(db: Database) {
    let running = Running::start(Config::new(db)).await;
    let (id, _) = running.place(100).await;
    for path in ["/operator".to_owned(), format!("/operator/orders/{id}")] {
        for headers in [&[][..], &[("authorization", "Bearer anything")][..]] {
            let response = running.get(&path, headers).await;
            assert!(response.headers().get("www-authenticate").is_none());
            assert_problem(response, StatusCode::NOT_FOUND, "not-found").await;
        }
    }
    running.shutdown().await;
}

/// With a token, the operator pages answer `401` with `WWW-Authenticate: Bearer` to a
/// request without it, with another token, or with another scheme; `200` with it.
async fn operator_pages_need_the_token(db: Database) {
    let config = Config::new(db).with_operator_token(OPERATOR_TOKEN);
    let running = Running::start(config).await;
    let (id, _) = running.place(100).await;
    let wrong = format!("Bearer {OPERATOR_TOKEN}x");
    let prefix = format!("Bearer {}", &OPERATOR_TOKEN[..OPERATOR_TOKEN.len() - 1]);
    let basic = format!("Basic {OPERATOR_TOKEN}");
    let refused: [&[(&str, &str)]; 6] = [
        &[],
        &[("authorization", "Bearer")],
        &[("authorization", "Bearer ")],
        &[("authorization", &wrong)],
        &[("authorization", &prefix)],
        &[("authorization", &basic)],
    ];
    for path in ["/operator".to_owned(), format!("/operator/orders/{id}")] {
        for headers in refused {
            let response = running.get(&path, headers).await;
            let challenge = header_text(&response, "www-authenticate");
            assert!(challenge.starts_with("Bearer"), "{challenge}");
            let body =
                assert_problem(response, StatusCode::UNAUTHORIZED, "operator-unauthorized").await;
            assert!(
                !body.to_string().contains(OPERATOR_TOKEN),
                "the problem does not show the token: {body}"
            );
        }
        let lowercase = format!("bearer {OPERATOR_TOKEN}");
        let response = running
            .get(&path, &[("authorization", lowercase.as_str())])
            .await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "the scheme is case-insensitive"
        );
        let page = running.html(&path).await;
        assert!(page.contains(&id), "{path} shows the order");
    }
    running.shutdown().await;
}

/// The keys of the idempotency table, sorted.
async fn stored_keys(db: &Database) -> Vec<String> {
    let mut keys: Vec<String> = match db {
        #[cfg(feature = "dynamodb")]
        Database::DynamoDb { .. } => dynamo::KeyItems::of(db).expect("DynamoDB").keys().await,
        Database::Sqlite(path) => {
            let url = format!("sqlite://{}", path.display());
            let mut connection = sqlx::SqliteConnection::connect(&url)
                .await
                .expect("connect");
            sqlx::query_scalar("SELECT idempotency_key FROM http_idempotency")
                .fetch_all(&mut connection)
                .await
                .expect("select the keys")
        }
        Database::Postgres { url, schema } => {
            let schema = schema.as_deref().unwrap_or("public");
            let mut connection = sqlx::PgConnection::connect(url).await.expect("connect");
            sqlx::query_scalar(&format!(
                "SELECT idempotency_key FROM {schema}.http_idempotency"
            ))
            .fetch_all(&mut connection)
            .await
            .expect("select the keys")
        }
    };
    keys.sort();
    keys
}

/// Claims `key` at `claimed_at` and stores a response for it: a request that finished.
async fn completed(db: &Database, key: &str, claimed_at: i64) {
    let response = r#"{"status":201,"headers":[],"body":{}}"#;
    #[cfg(feature = "dynamodb")]
    if let Some(keys) = dynamo::KeyItems::of(db) {
        keys.claim(key, "POST /orders\n{}", claimed_at, Some(response))
            .await;
        return;
    }
    claim(db, key, "POST /orders\n{}", claimed_at).await;
    let sql = "UPDATE {table} SET response = $1 WHERE idempotency_key = $2";
    execute(db, sql, &[response, key]).await;
}

const HOUR_MS: i64 = 60 * 60 * 1000;

/// The prune deletes exactly the keys with a response claimed before the retention; claims
/// still running, however old, and recent keys stay. The metrics count the deleted keys.
async fn completed_keys_past_the_retention_are_pruned(db: Database) {
    let config = Config::new(db.clone()).with_idempotency_retention(Duration::from_secs(3600));
    let running = Running::start(config).await;
    let now = now_millis();
    for key in ["old-done-1", "old-done-2", "old-done-3"] {
        completed(&db, key, now - 2 * HOUR_MS).await;
    }
    completed(&db, "recent-done", now - HOUR_MS / 2).await;
    claim(&db, "old-running", "POST /orders\n{}", now - 48 * HOUR_MS).await;
    claim(&db, "recent-running", "POST /orders\n{}", now).await;
    let pruned = running
        .service
        .prune_idempotency_keys(std::time::SystemTime::now())
        .await
        .expect("prune");
    assert_eq!(pruned, 3);
    assert_eq!(
        stored_keys(&db).await,
        ["old-running", "recent-done", "recent-running"]
    );
    let again = running
        .service
        .prune_idempotency_keys(std::time::SystemTime::now())
        .await
        .expect("prune again");
    assert_eq!(again, 0, "nothing left to prune");
    // An hour on, the recent completed key is past the retention too; the claims are not.
    let later = std::time::SystemTime::now() + Duration::from_secs(3600);
    let pruned = running
        .service
        .prune_idempotency_keys(later)
        .await
        .expect("prune later");
    assert_eq!(pruned, 1);
    assert_eq!(stored_keys(&db).await, ["old-running", "recent-running"]);
    let page = running.metrics().await;
    assert_eq!(
        sample(&page, "cqrs_service_idempotency_keys_pruned_total"),
        4.0,
        "{page}"
    );
    running.shutdown().await;
}

/// A key is kept for the retention only: once pruned, the same request with the same key is
/// a new request (a new order), not a replay.
async fn a_retry_with_a_pruned_key_is_a_new_request(db: Database) {
    let running = Running::start(Config::new(db.clone())).await;
    let key = Uuid::new_v4().to_string();
    let headers = [("idempotency-key", key.as_str())];
    let first = running.post("/orders", &place_body(7), &headers).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.expect("JSON");
    let replayed = running.post("/orders", &place_body(7), &headers).await;
    assert_eq!(header_text(&replayed, "idempotent-replayed"), "true");
    // A day and a bit later, the key is past the default retention of 24 h.
    let later = std::time::SystemTime::now() + Duration::from_secs(25 * 3600);
    let pruned = running
        .service
        .prune_idempotency_keys(later)
        .await
        .expect("prune");
    assert_eq!(pruned, 1);
    let again = running.post("/orders", &place_body(7), &headers).await;
    assert_eq!(again.status(), StatusCode::CREATED);
    assert!(again.headers().get("idempotent-replayed").is_none());
    let again: Value = again.json().await.expect("JSON");
    assert_ne!(again["order_id"], first["order_id"], "a new order");
    assert_eq!(running.event_count(&db).await, 2);
    running.shutdown().await;
}

/// One prune deletes at most 10 batches of 1,000 keys; the next one goes on with the rest.
async fn a_prune_deletes_a_bounded_number_of_keys(db: Database) {
    let running = Running::start(Config::new(db.clone())).await;
    let old = now_millis() - 48 * HOUR_MS;
    let sql = "INSERT INTO {table} (idempotency_key, request, aggregate_id, claimed_at, response) \
               WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 10500) \
               SELECT 'bulk-' || i, 'POST /orders', 'x', CAST($1 AS BIGINT), '{}' FROM n";
    execute(&db, sql, &[&old.to_string()]).await;
    claim(&db, "old-running", "POST /orders\n{}", old).await;
    let now = std::time::SystemTime::now();
    let first = running
        .service
        .prune_idempotency_keys(now)
        .await
        .expect("prune");
    assert_eq!(first, 10_000);
    assert_eq!(stored_keys(&db).await.len(), 501);
    let second = running
        .service
        .prune_idempotency_keys(now)
        .await
        .expect("prune");
    assert_eq!(second, 500);
    assert_eq!(stored_keys(&db).await, ["old-running"]);
    running.shutdown().await;
}
