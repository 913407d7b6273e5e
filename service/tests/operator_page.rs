//! The operator page as a person sees it: headless Chromium loads `/operator` and
//! `/operator/orders/{id}` from the service on SQLite, after orders were placed and paid
//! over HTTP and a poison event was skipped, and the test reads what the browser rendered:
//! the text of each table cell (`innerText`), the page's title, the scripts it runs.
//!
//! Chromium is `CQRS_CHROMIUM` or `chromium` on the `PATH` (Debian: `apt-get install -y
//! chromium`). Without it the test says it skipped and how to enable it; in CI (`CI=true`) a
//! missing Chromium fails the test.
//!
//! Chromium runs with `--dump-dom`, which prints the DOM once the page has loaded. The page
//! it loads is a harness the test adds to the service's router on the same origin: it
//! fetches the operator page with `Authorization: Bearer <token>` (a navigation cannot carry
//! that header; the fetch is synchronous, so the harness's load waits for it), shows the HTML it got in an iframe (`srcdoc`) and, when that has loaded,
//! writes what the iframe shows as JSON into its own DOM, where `--dump-dom` prints it.
//! Asked to, the harness navigates the iframe to the page instead, without the header: the
//! browser then shows the service's refusal.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axum::extract::Query;
use axum::response::Html;
use cqrs::EventRepository;
use cqrs_service::{Config, Database, Service};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use uuid::Uuid;

const CHROMIUM_VAR: &str = "CQRS_CHROMIUM";
/// The longest a page load by Chromium may take before the test gives up on it.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(60);

/// The Chromium binary to drive, or `None` (after a note) when there is none; in CI a
/// missing Chromium is a failure.
fn chromium() -> Option<PathBuf> {
    let configured = std::env::var_os(CHROMIUM_VAR)
        .filter(|value| !value.is_empty())
        .map(PathBuf::from);
    let found = configured.or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("chromium"))
                .find(|candidate| candidate.is_file())
        })
    });
    if found.is_none() {
        let ci = std::env::var("CI").is_ok_and(|value| value == "true" || value == "1");
        assert!(
            !ci,
            "CI=true but Chromium is missing: install it (apt-get install -y chromium) or set \
             {CHROMIUM_VAR}=/path/to/chromium"
        );
        // `eprintln!` is captured by libtest; a direct write is not.
        let _ = writeln!(
            std::io::stderr().lock(),
            "note: skipping the operator page browser suite: install Chromium \
             (apt-get install -y chromium) or set {CHROMIUM_VAR}=/usr/bin/chromium to run it"
        );
    }
    found
}

/// The operator token the test's service is started with.
const OPERATOR_TOKEN: &str = "operator-secret-browser";

/// The harness page: fetches `page` with the operator token and shows it in an iframe (or,
/// with `navigate=1`, opens `page` in the iframe without the token) and, once it has loaded,
/// writes into `<pre id="seen">` what it shows, as JSON: the status of the fetch, its title,
/// the text of its body, each table's cells as text (by table id), and how many scripts it
/// has.
async fn harness(Query(query): Query<std::collections::HashMap<String, String>>) -> Html<String> {
    let page = query.get("page").cloned().unwrap_or_default();
    let page = serde_json::to_string(&page).unwrap_or_default();
    let navigate = query.get("navigate").is_some_and(|value| value == "1");
    let token = serde_json::to_string(OPERATOR_TOKEN).unwrap_or_default();
    Html(format!(
        r#"<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>harness</title></head>
<body><pre id="seen"></pre>
<script>
const frame = document.createElement("iframe");
frame.style.width = "1600px";
frame.style.height = "3000px";
frame.addEventListener("load", () => {{
  const doc = frame.contentDocument;
  const tables = {{}};
  for (const table of doc.querySelectorAll("table[id]")) {{
    tables[table.id] = Array.from(table.rows, (row) => Array.from(row.cells, (cell) => cell.innerText));
  }}
  document.getElementById("seen").textContent = JSON.stringify({{
    status: status,
    title: doc.title,
    text: doc.body ? doc.body.innerText : "",
    tables: tables,
    scripts: doc.scripts.length,
  }});
}});
let status = null;
if ({navigate}) {{
  frame.src = {page};
}} else {{
  // Synchronous, so that the page's load (which ends --dump-dom) waits for it.
  const request = new XMLHttpRequest();
  request.open("GET", {page}, false);
  request.setRequestHeader("Authorization", "Bearer " + {token});
  request.send();
  status = request.status;
  frame.srcdoc = request.responseText;
}}
document.body.appendChild(frame);
</script>
</body></html>"#
    ))
}

/// The service and the harness, served on an ephemeral port.
struct Running {
    base: String,
    service: Service,
    client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    async fn start(path: &Path) -> Running {
        let config =
            Config::new(Database::Sqlite(path.to_owned())).with_operator_token(OPERATOR_TOKEN);
        let service = Service::start(config).await.expect("start the service");
        let router = service
            .router()
            .route("/__harness", axum::routing::get(harness));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an ephemeral port");
        let base = format!("http://{}", listener.local_addr().expect("local address"));
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        Running {
            base,
            service,
            client: reqwest::Client::new(),
            stop: Some(stop),
            served,
        }
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.served
            .await
            .expect("the server task")
            .expect("the server ends cleanly");
        self.service.stop();
    }

    /// `POST`s `body` to `path`; answers the status and the JSON body.
    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .expect("send the request");
        let status = response.status().as_u16();
        (status, response.json().await.expect("a JSON body"))
    }

    /// Places an order of `lines` for `customer`; answers its id.
    async fn place(&self, customer: &str, lines: Value) -> String {
        let (status, body) = self
            .post("/orders", &json!({ "customer": customer, "lines": lines }))
            .await;
        assert_eq!(status, 201, "{body}");
        body["order_id"].as_str().expect("an order id").to_owned()
    }

    /// What Chromium shows at `path`, fetched with the operator token: see [`harness`].
    async fn seen(&self, chromium: &Path, path: &str) -> Seen {
        let seen = self.harness(chromium, path, false).await;
        assert_eq!(seen.0["status"], 200, "{path} with the token: {}", seen.0);
        seen
    }

    /// What Chromium shows when it opens `path` without the token.
    async fn navigated(&self, chromium: &Path, path: &str) -> Seen {
        self.harness(chromium, path, true).await
    }

    async fn harness(&self, chromium: &Path, path: &str, navigate: bool) -> Seen {
        let url = format!(
            "{}/__harness?page={}&navigate={}",
            self.base,
            encode(path),
            u8::from(navigate)
        );
        let chromium = chromium.to_owned();
        let dom = tokio::task::spawn_blocking(move || dump_dom(&chromium, &url))
            .await
            .expect("the browser task");
        let start = dom
            .find("<pre id=\"seen\">")
            .unwrap_or_else(|| panic!("no harness output in {dom}"))
            + "<pre id=\"seen\">".len();
        let end = start + dom[start..].find("</pre>").expect("a closed <pre>");
        let json = unescape(&dom[start..end]);
        let seen: Value = serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("the page was not read ({e}): {dom}"));
        Seen(seen)
    }
}

/// Runs Chromium headless on `url` and answers the DOM it printed.
fn dump_dom(chromium: &Path, url: &str) -> String {
    let profile = std::env::temp_dir().join(format!("cqrs-chromium-{}", Uuid::new_v4()));
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", chromium.display()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for Chromium") {
            break status;
        }
        if started.elapsed() > BROWSER_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("Chromium did not finish loading {url} in {BROWSER_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().expect("Chromium's output");
    let _ = std::fs::remove_dir_all(&profile);
    let dom = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        status.success() && !dom.is_empty(),
        "Chromium failed on {url} ({status}): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    dom
}

/// `text` as a query value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The text of an element as the DOM serializes it.
fn unescape(html: &str) -> String {
    html.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

/// What the browser showed of a page.
struct Seen(Value);

impl Seen {
    fn title(&self) -> &str {
        self.0["title"].as_str().unwrap_or_default()
    }

    fn text(&self) -> &str {
        self.0["text"].as_str().unwrap_or_default()
    }

    /// The rows of table `id`, each a list of its cells' text; the header row first.
    fn table(&self, id: &str) -> Vec<Vec<String>> {
        let rows = self.0["tables"][id]
            .as_array()
            .unwrap_or_else(|| panic!("no table {id} on the page: {}", self.0));
        rows.iter()
            .map(|row| {
                row.as_array()
                    .expect("a row")
                    .iter()
                    .map(|cell| cell.as_str().unwrap_or_default().trim().to_owned())
                    .collect()
            })
            .collect()
    }

    /// The row of table `id` whose cell under `column` is `value`, as a map from the header
    /// row's names to the cells.
    fn row(
        &self,
        id: &str,
        column: &str,
        value: &str,
    ) -> std::collections::HashMap<String, String> {
        let rows = self.table(id);
        let (header, body) = rows.split_first().expect("a header row");
        let at = header
            .iter()
            .position(|name| name == column)
            .unwrap_or_else(|| panic!("no column {column} in table {id}: {header:?}"));
        let row = body
            .iter()
            .find(|row| row.get(at).is_some_and(|cell| cell == value))
            .unwrap_or_else(|| panic!("no row with {column} = {value} in table {id}: {rows:?}"));
        header.iter().cloned().zip(row.iter().cloned()).collect()
    }
}

/// An event of a kind the order view does not know: a poison event for its projection.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, cqrs::DomainEvent)]
enum Rogue {
    #[event(name = "OrderRefunded")]
    Refunded { cents: u64 },
}

/// Appends one `Rogue` event to a fresh order stream of the SQLite file, behind the
/// service's back.
async fn append_rogue(path: &Path) -> Uuid {
    let id = Uuid::new_v4();
    let event = cqrs::PersistableDomainEvent::new(
        "order",
        id,
        1,
        &Rogue::Refunded { cents: 5 },
        Value::Null,
    )
    .expect("an event");
    cqrs::SqliteEventRepository::open(path)
        .await
        .expect("open the store")
        .append(vec![event])
        .await
        .expect("append");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_pages_show_the_projection_the_aggregates_the_streams_and_dead_letters() {
    let Some(chromium) = chromium() else {
        return;
    };
    let path = std::env::temp_dir().join(format!("cqrs-operator-{}.sqlite", Uuid::new_v4()));
    let running = Running::start(&path).await;
    let before = chrono::Utc::now();

    // Two orders, one of them paid: positions 1 to 3; a poison event at position 4.
    let paid = running
        .place(
            "<script>document.title='pwned'</script>",
            json!([{ "sku": "book-1", "quantity": 2, "unit_price_cents": 1250 }]),
        )
        .await;
    let (status, body) = running
        .post(
            &format!("/orders/{paid}/payment"),
            &json!({ "amount_cents": 2500, "payment_reference": "pay-42" }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let placed = running
        .place(
            "grace",
            json!([{ "sku": "pen", "quantity": 1, "unit_price_cents": 300 }]),
        )
        .await;
    let rogue = append_rogue(&path).await;
    // The projection tries the poison event, records it as a dead letter and moves past it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while running.service.view_position() < 4 {
        assert!(
            Instant::now() < deadline,
            "the view did not reach position 4"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = chrono::Utc::now();

    // A browser that opens the page without the token is refused: it shows the problem.
    let refused = running.navigated(&chromium, "/operator").await;
    assert!(
        refused.text().contains("operator-unauthorized"),
        "{}",
        refused.text()
    );
    assert!(refused.0["tables"]["aggregates"].is_null(), "{}", refused.0);

    let overview = running.seen(&chromium, "/operator").await;
    assert_eq!(overview.title(), "Operator · cqrs-service");
    assert_eq!(overview.0["scripts"], 0, "the operator page runs no script");
    let projection = overview.row("projection", "state", "live");
    assert_eq!(projection["checkpoint"], "4", "{projection:?}");
    assert_eq!(projection["store head"], "4", "{projection:?}");
    assert_eq!(projection["lag"], "0", "{projection:?}");
    assert_eq!(projection["last error"], "", "{projection:?}");

    let aggregates = overview.table("aggregates");
    assert_eq!(
        aggregates.len(),
        4,
        "a header and three aggregates: {aggregates:?}"
    );
    let row = overview.row("aggregates", "id", &paid);
    assert_eq!(
        (
            row["type"].as_str(),
            row["events"].as_str(),
            row["last position"].as_str()
        ),
        ("order", "2", "2"),
        "{row:?}"
    );
    let row = overview.row("aggregates", "id", &placed);
    assert_eq!(
        (row["events"].as_str(), row["last position"].as_str()),
        ("1", "3")
    );
    let row = overview.row("aggregates", "id", &rogue.to_string());
    assert_eq!(
        (row["events"].as_str(), row["last position"].as_str()),
        ("1", "4")
    );
    assert!(
        overview.text().contains("1 events the projection skipped."),
        "{}",
        overview.text()
    );
    let letter = overview.row("dead-letters", "position", "4");
    assert_eq!(letter["aggregate"], format!("order {rogue}"));
    assert_eq!(letter["sequence"], "1");
    assert_eq!(letter["event"], "OrderRefunded 1");
    assert!(
        letter["reason"].contains("OrderRefunded"),
        "the reason names what could not be read: {letter:?}"
    );
    let recorded = chrono::DateTime::parse_from_rfc3339(&letter["recorded"])
        .unwrap_or_else(|e| panic!("recorded is not RFC 3339 ({e}): {letter:?}"));
    assert!(
        recorded >= before && recorded <= after,
        "{recorded} not during the test"
    );

    // One order's stream: each event with its payload (readable JSON), metadata and time.
    let stream = running
        .seen(&chromium, &format!("/operator/orders/{paid}"))
        .await;
    assert_eq!(stream.title(), format!("Order {paid} · cqrs-service"));
    assert_eq!(
        stream.0["scripts"], 0,
        "a payload's markup is text, not a script"
    );
    assert!(
        stream.text().contains(&format!("order {paid}: 2 events.")),
        "{}",
        stream.text()
    );
    let events = stream.table("events");
    assert_eq!(events.len(), 3, "a header and two events: {events:?}");
    let first = stream.row("events", "sequence", "1");
    assert_eq!(first["position"], "1");
    assert_eq!(first["event"], "OrderPlaced 1");
    let payload: Value = serde_json::from_str(&first["payload"])
        .unwrap_or_else(|e| panic!("the payload does not read as JSON ({e}): {first:?}"));
    assert_eq!(
        payload,
        json!({
            "type": "Placed",
            "customer": "<script>document.title='pwned'</script>",
            "lines": [{ "sku": "book-1", "quantity": 2, "unit_price_cents": 1250 }],
            "total_cents": 2500,
        })
    );
    // The request's generated id is the event's correlation id, shown in its own column;
    // the metadata repeats only an id that column cannot give back.
    let placed_by = Uuid::parse_str(&first["correlation"])
        .unwrap_or_else(|e| panic!("the correlation is not a UUID ({e}): {first:?}"));
    let metadata: Value = serde_json::from_str(&first["metadata"]).expect("metadata as JSON");
    assert_eq!(metadata, Value::Null, "{first:?}");
    let second = stream.row("events", "sequence", "2");
    assert_eq!(second["event"], "OrderPaid 1");
    let payload: Value = serde_json::from_str(&second["payload"]).expect("payload as JSON");
    assert_eq!(
        payload,
        json!({ "type": "Paid", "amount_cents": 2500, "payment_reference": "pay-42" })
    );
    let paid_by = Uuid::parse_str(&second["correlation"])
        .unwrap_or_else(|e| panic!("the correlation is not a UUID ({e}): {second:?}"));
    assert_ne!(placed_by, paid_by, "two requests, two correlation ids");
    for event in [&first, &second] {
        let at = chrono::DateTime::parse_from_rfc3339(&event["timestamp"])
            .unwrap_or_else(|e| panic!("the timestamp is not RFC 3339 ({e}): {event:?}"));
        assert!(at >= before && at <= after, "{at} not during the test");
    }

    // With the projection stopped, a new order is in the store but not in the view: the
    // page shows the lag.
    running.service.stop();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stopped = running.seen(&chromium, "/operator").await;
        if stopped.table("projection")[1][4] == "stopped" {
            break;
        }
        assert!(Instant::now() < deadline, "the projection did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let late = running
        .place(
            "ada",
            json!([{ "sku": "pen", "quantity": 3, "unit_price_cents": 300 }]),
        )
        .await;
    let lagging = running.seen(&chromium, "/operator").await;
    let projection = lagging.row("projection", "state", "stopped");
    assert_eq!(
        (
            projection["checkpoint"].as_str(),
            projection["store head"].as_str(),
            projection["lag"].as_str()
        ),
        ("4", "5", "1"),
        "{projection:?}"
    );
    let row = lagging.row("aggregates", "id", &late);
    assert_eq!(
        (row["events"].as_str(), row["last position"].as_str()),
        ("1", "5")
    );

    running.shutdown().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
