//! The OpenAPI document as the service serves it: the same as the stored copy
//! (`service/openapi.json`), and describing every route the router answers.

use std::path::PathBuf;

use cqrs_service::{Config, Database, Service, PROBLEM_JSON};
use reqwest::{Client, Method, StatusCode};
use serde_json::Value;
use tokio::sync::oneshot;
use uuid::Uuid;

/// Set to `1` to write the served document over the stored copy.
const UPDATE_VAR: &str = "UPDATE_OPENAPI";

/// The methods a route could answer (`HEAD` follows `GET` in axum).
const METHODS: [Method; 5] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
];

/// Paths a route could be added at without an operation in the document, probed beside
/// the document's own paths.
const OTHER_PATHS: [&str; 8] = [
    "/",
    "/health",
    "/metrics",
    "/operator",
    "/openapi.yaml",
    "/orders/{id}/events",
    "/events",
    "/dead-letters",
];

/// The service on a temporary SQLite file, served on an ephemeral port.
struct Running {
    base: String,
    client: Client,
    path: PathBuf,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    async fn start() -> Running {
        let path = std::env::temp_dir().join(format!("cqrs-openapi-{}.sqlite", Uuid::new_v4()));
        // With an operator token, so that the operator pages are served (they answer `401`
        // to the probes); without one they are `404`, as a route that does not exist.
        let config =
            Config::new(Database::Sqlite(path.clone())).with_operator_token("openapi-probe");
        let service = Service::start(config).await.expect("start the service");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an ephemeral port");
        let base = format!("http://{}", listener.local_addr().expect("local address"));
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(cqrs_service::serve(listener, service, async {
            let _ = stopped.await;
        }));
        Running {
            base,
            client: Client::new(),
            path,
            stop,
            served,
        }
    }

    async fn document(&self) -> Value {
        let response = self
            .client
            .get(format!("{}/openapi.json", self.base))
            .send()
            .await
            .expect("GET /openapi.json");
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.expect("a JSON document")
    }

    async fn shutdown(self) {
        let _ = self.stop.send(());
        self.served
            .await
            .expect("the server task")
            .expect("the server ends cleanly");
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.path.display()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_document_is_the_stored_copy() {
    let running = Running::start().await;
    let document = running.document().await;
    running.shutdown().await;

    assert_eq!(document["openapi"], "3.1.0");
    let served = serde_json::to_string_pretty(&document).expect("print the document") + "\n";
    let stored_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
    if std::env::var(UPDATE_VAR).as_deref() == Ok("1") {
        std::fs::write(&stored_path, &served).expect("write service/openapi.json");
        println!("wrote {}", stored_path.display());
        return;
    }
    let stored = std::fs::read_to_string(&stored_path).unwrap_or_default();
    if stored != served {
        let line = stored
            .lines()
            .zip(served.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| stored.lines().count().min(served.lines().count()));
        panic!(
            "the served OpenAPI document differs from {} (first at line {}).\n\
             If the API change is meant, regenerate the copy and review its diff:\n\
             \n    {UPDATE_VAR}=1 cargo test -p cqrs-service --test openapi\n",
            stored_path.display(),
            line + 1,
        );
    }
}

/// True when the router answered with its fallback: no route for the path, or none for
/// the method.
async fn unrouted(response: reqwest::Response) -> bool {
    let problem_type = response
        .headers()
        .get("content-type")
        .is_some_and(|value| value == PROBLEM_JSON);
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let slug = body["type"].as_str().and_then(|t| t.rsplit('/').next());
    problem_type
        && matches!(
            (status, slug),
            (StatusCode::NOT_FOUND, Some("not-found"))
                | (StatusCode::METHOD_NOT_ALLOWED, Some("method-not-allowed"))
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_served_route_is_in_the_document() {
    let running = Running::start().await;
    let document = running.document().await;
    let paths = document["paths"].as_object().expect("paths");
    let mut templates: Vec<&str> = paths.keys().map(String::as_str).collect();
    templates.extend(OTHER_PATHS);

    let mut served = Vec::new();
    for template in templates {
        let path = template.replace("{id}", &Uuid::new_v4().to_string());
        for method in METHODS {
            let response = running
                .client
                .request(method.clone(), format!("{}{path}", running.base))
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .expect("send the probe");
            if !unrouted(response).await {
                served.push((method, template));
            }
        }
    }
    running.shutdown().await;

    for (method, template) in &served {
        let operation = &document["paths"][*template][method.as_str().to_ascii_lowercase()];
        assert!(
            operation.is_object(),
            "{method} {template} is served but not in the OpenAPI document"
        );
    }
    for (template, item) in paths {
        for method in item.as_object().expect("a path item").keys() {
            assert!(
                served
                    .iter()
                    .any(|(m, t)| *t == template && m.as_str().eq_ignore_ascii_case(method)),
                "{method} {template} is in the document but not served"
            );
        }
    }
    assert!(served.len() >= 7, "{served:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_describes_headers_and_problems() {
    let running = Running::start().await;
    let document = running.document().await;
    running.shutdown().await;

    let operation = |method: &str, path: &str| document["paths"][path][method].clone();
    let parameters = |op: &Value| -> Vec<String> {
        op["parameters"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| p["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    for path in [
        "/orders/{id}/payment",
        "/orders/{id}/shipment",
        "/orders/{id}/cancellation",
    ] {
        let op = operation("post", path);
        let names = parameters(&op);
        for header in ["id", "If-Match", "Idempotency-Key"] {
            assert!(names.iter().any(|n| n == header), "{path}: {names:?}");
        }
        assert!(op["responses"]["200"]["headers"]["ETag"].is_object());
        assert!(op["responses"]["200"]["headers"]["Consistency-Token"].is_object());
        for status in [
            "400", "404", "409", "412", "413", "415", "422", "500", "503",
        ] {
            let content = &op["responses"][status]["content"];
            assert!(
                content[PROBLEM_JSON].is_object(),
                "{path} {status}: {content}"
            );
        }
    }
    let place = operation("post", "/orders");
    assert!(parameters(&place).iter().any(|n| n == "Idempotency-Key"));
    assert!(place["responses"]["201"]["headers"]["Location"].is_object());
    for path in ["/orders", "/orders/{id}"] {
        let op = operation("get", path);
        assert!(parameters(&op).iter().any(|n| n == "Consistency-Token"));
        assert!(op["responses"]["503"]["headers"]["Retry-After"].is_object());
    }
    let scheme = &document["components"]["securitySchemes"]["operator_token"];
    assert_eq!(scheme["type"], "http", "{scheme}");
    assert_eq!(scheme["scheme"], "bearer", "{scheme}");
    for path in ["/operator", "/operator/orders/{id}"] {
        let op = operation("get", path);
        assert_eq!(
            op["security"],
            serde_json::json!([{ "operator_token": [] }]),
            "{path}"
        );
        assert!(
            op["responses"]["401"]["headers"]["WWW-Authenticate"].is_object(),
            "{path}"
        );
        assert!(op["responses"]["404"]["content"][PROBLEM_JSON].is_object());
    }
    for path in ["/orders", "/metrics", "/openapi.json"] {
        assert!(
            operation("get", path)["security"].is_null(),
            "{path} needs no token"
        );
    }
    let problem = &document["components"]["schemas"]["Problem"]["properties"];
    for field in ["type", "title", "status", "detail"] {
        assert!(problem[field].is_object(), "Problem.{field}: {problem}");
    }
}
