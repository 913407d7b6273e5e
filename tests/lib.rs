//! Support shared by the cross-crate integration tests in `tests/`.

use std::collections::HashSet;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// What the fixtures fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The value of the environment variable `var` naming a server for a test suite, or `None`
/// when it is unset or empty.
///
/// When it is unset, says once per suite and process, on the real standard error (past the
/// test harness's output capture, so a plain `cargo test` shows it), which suite is skipped
/// and how to enable it.
///
/// ```
/// let url = cqrs_tests::server_url("CQRS_DOC_EXAMPLE_UNSET", "example", "x://y");
/// assert!(url.is_none());
/// ```
pub fn server_url(var: &str, suite: &str, example: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(value) if !value.trim().is_empty() => Some(value),
        _ => {
            static SAID: Mutex<Option<HashSet<String>>> = Mutex::new(None);
            let mut said = SAID.lock().unwrap_or_else(PoisonError::into_inner);
            if said
                .get_or_insert_with(HashSet::new)
                .insert(suite.to_owned())
            {
                // `eprintln!` is captured by libtest; a direct write is not.
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "note: skipping the {suite} suite: set {var}={example} to run it"
                );
            }
            None
        }
    }
}

/// JSON that a text-based store path could get wrong: escapes, non-ASCII, numbers at the
/// edges of their types, deep nesting, a payload large enough to be stored out of line, and
/// values that are not objects. The SQL stores' round-trip tests append these as payloads.
pub fn awkward_payloads() -> Vec<serde_json::Value> {
    use serde_json::json;
    vec![
        json!({ "Added": { "by": 1 } }),
        json!({ "quote": "say \"hi\"\n\ttab \\ backslash", "unicode": "Zürich 東京 🚀" }),
        json!({ "big": u64::MAX, "negative": i64::MIN, "float": 0.1, "exp": 1e21, "small": -0.25 }),
        json!([[[[[[[[1, [2, [3, { "deep": null }]]]]]]]]]]),
        json!({ "long": "x".repeat(200_000) }),
        json!("just a string"),
        json!(null),
    ]
}

/// Appends one event per [`awkward_payloads`] entry to `store`, on the aggregate of
/// `template` (sequences from 1, fresh ids, each with its own metadata), and checks that
/// `read_all` and `load_events` give every one back with the same payload and metadata as
/// JSON, the same ids and key, and the timestamp to the microsecond. Returns what
/// `read_all` read.
///
/// # Panics
/// When the store loses or changes anything: it is a test's assertion.
pub async fn check_awkward_payloads(
    store: &dyn cqrs::EventRepository,
    template: &cqrs::PersistableDomainEvent,
) -> Vec<cqrs::PersistableDomainEvent> {
    let payloads = awkward_payloads();
    let events: Vec<cqrs::PersistableDomainEvent> = payloads
        .iter()
        .enumerate()
        .map(|(i, payload)| {
            let mut event = template.clone();
            event.event_id = uuid::Uuid::new_v4();
            event.sequence = i as i64 + 1;
            event.payload = payload.into();
            event.metadata = serde_json::json!({ "n": i, "who": "tëst \"x\"" });
            event
        })
        .collect();
    store.append(events.clone()).await.unwrap();
    let read = store.read_all(0, 100).await.unwrap();
    let loaded = store
        .load_events(&template.aggregate_type, template.aggregate_id, 0)
        .await
        .unwrap();
    for stored in [&read, &loaded] {
        assert_eq!(stored.len(), payloads.len());
        for ((got, sent), payload) in stored.iter().zip(&events).zip(&payloads) {
            assert_eq!(
                got.payload, *payload,
                "payload of sequence {}",
                got.sequence
            );
            assert_eq!(got.metadata, sent.metadata);
            assert_eq!(got.event_id, sent.event_id);
            assert_eq!(got.aggregate_type_id, sent.aggregate_type_id);
            assert_eq!(
                got.timestamp.timestamp_micros(),
                sent.timestamp.timestamp_micros()
            );
        }
    }
    read
}

/// A JetStream server of a test's or benchmark's own: a `nats-server` child process on a
/// free local port, with its store in a temporary directory, which can be killed and
/// started again on the same store. Dropping it kills the process and removes the
/// directory.
#[derive(Debug)]
pub struct JetStreamServer {
    binary: PathBuf,
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl JetStreamServer {
    /// The `nats-server` binary: `CQRS_NATS_SERVER`, or `nats-server` on the `PATH`.
    pub fn binary() -> PathBuf {
        std::env::var_os("CQRS_NATS_SERVER")
            .filter(|path| !path.is_empty())
            .map_or_else(|| PathBuf::from("nats-server"), PathBuf::from)
    }

    /// Starts `binary` with JetStream; `sync_always` sets `sync_interval: always` (every
    /// write is on disk before it is acknowledged; servers from 2.10 on know it), otherwise
    /// the server's default (every two minutes) is kept. Waits up to 10 s for the server to
    /// accept connections.
    ///
    /// # Errors
    /// When the binary cannot start, or the server exits or does not listen in time (the
    /// error quotes what it said).
    pub fn start(binary: &Path, sync_always: bool) -> Result<Self, BoxError> {
        let dir = std::env::temp_dir().join(format!("cqrs-nats-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir)?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let sync = if sync_always {
            "sync_interval: always"
        } else {
            ""
        };
        std::fs::write(
            dir.join("server.conf"),
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: \"{}\"\n  {sync}\n}}\n",
                dir.join("store").display()
            ),
        )?;
        let child = match Self::spawn(binary, &dir) {
            Ok(child) => child,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(error);
            }
        };
        let mut server = JetStreamServer {
            binary: binary.to_owned(),
            child,
            dir,
            port,
        };
        server.wait_listening()?;
        Ok(server)
    }

    fn spawn(binary: &Path, dir: &Path) -> Result<Child, BoxError> {
        Ok(Command::new(binary)
            .arg("-c")
            .arg(dir.join("server.conf"))
            .stdout(std::fs::File::create(dir.join("server.log"))?)
            .stderr(std::fs::File::create(dir.join("server.err"))?)
            .spawn()
            .map_err(|error| format!("{} cannot start: {error}", binary.display()))?)
    }

    fn wait_listening(&mut self) -> Result<(), BoxError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if self.child.try_wait()?.is_some() || Instant::now() > deadline {
                let read = |name| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
                let said = read("server.err") + &read("server.log");
                return Err(
                    format!("{} did not start: {}", self.binary.display(), said.trim()).into(),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and store, as after
    /// a crash; waits until it listens.
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub fn restart(&mut self) -> Result<(), BoxError> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.binary, &self.dir)?;
        self.wait_listening()
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for JetStreamServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
