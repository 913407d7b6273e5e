//! A schema lock for event types: recorded payloads of every (name, version) a type reads,
//! committed beside the code, and a check that every one of them still decodes.
//!
//! Stored events live forever; their Rust types do not. Changing an event's fields without
//! bumping its version (and declaring an `upcast(..)` step) breaks every row already stored,
//! and nothing notices until production reads one. The lock makes CI notice:
//!
//! 1. **Record.** A test builds a [`SchemaLock`] with one sample value of every current
//!    event and calls [`SchemaLock::assert`]. Run it once with `CQRS_SCHEMA_LOCK=record`:
//!    it writes `<dir>/<name>.v<version>.json` for each sample (and keeps every file already
//!    there, so the payloads of older versions stay).
//! 2. **Review.** `git diff` the fixtures folder. A *new* file is a new event or version. A
//!    *changed* file for an existing version means the shape changed without a new version:
//!    bump the version and add an `upcast(..)` step instead. Recording refuses to overwrite a
//!    payload that no longer decodes, so this cannot be done by accident.
//! 3. **Commit** the files. From then on the same test, run without the variable, checks
//!    that every recorded payload still decodes with [`DomainEvent::decode_all`] (through its
//!    upcast chain for an old version) and that every (name, version) in
//!    [`DomainEvent::EVENT_TYPES`] has a recorded payload. A failure names the event, the
//!    version and the file.
//!
//! ```
//! use cqrs::DomainEvent;
//! use cqrs_testkit::schema_lock::SchemaLock;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
//! enum CounterEvent {
//!     #[event(name = "CounterIncremented")]
//!     Incremented { by: u32 },
//! }
//!
//! # let dir = std::env::temp_dir().join(format!("schema-lock-doc-{}", std::process::id()));
//! let lock = SchemaLock::<CounterEvent>::new(&dir).sample(CounterEvent::Incremented { by: 1 });
//! lock.record()?; // what `CQRS_SCHEMA_LOCK=record` does
//! lock.check()?; // what CI does
//! // In a test: `lock.assert();` records or checks, and panics with every problem.
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`DomainEvent::decode_all`]: cqrs::DomainEvent::decode_all
//! [`DomainEvent::EVENT_TYPES`]: cqrs::DomainEvent::EVENT_TYPES

use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use cqrs::{DomainEvent, Payload};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The environment variable that switches [`SchemaLock::assert`] to recording.
pub const RECORD_VAR: &str = "CQRS_SCHEMA_LOCK";

/// One recorded payload, as it is written to `<name>.v<version>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recorded {
    /// The stored event name.
    pub event_type: String,
    /// The stored event version.
    pub event_version: String,
    /// The payload as the event type wrote it when it was recorded.
    pub payload: Value,
}

/// Recorded payloads of an event type `E` in a folder, and the samples that record them.
#[derive(Debug)]
#[must_use = "a schema lock does nothing until `assert`, `check` or `record` is called"]
pub struct SchemaLock<E> {
    dir: PathBuf,
    samples: Vec<E>,
    _event: PhantomData<fn() -> E>,
}

/// Something wrong with a schema lock: each names the event, the version and the file.
#[derive(Debug)]
#[non_exhaustive]
pub enum SchemaProblem {
    /// A recorded payload no longer decodes: the event's shape changed without a new version
    /// and an upcast step.
    NoLongerDecodes {
        /// The stored event name.
        event_type: String,
        /// The stored event version.
        event_version: String,
        /// The fixture file.
        file: PathBuf,
        /// The decoding error.
        reason: String,
    },
    /// The type reads a (name, version) that has no recorded payload.
    NotRecorded {
        /// The event name.
        event_type: String,
        /// The event version.
        event_version: String,
    },
    /// A sample's payload could not be serialized, or a file could not be read or written.
    Io {
        /// The file concerned.
        file: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

impl fmt::Display for SchemaProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SchemaProblem::NoLongerDecodes {
                event_type,
                event_version,
                file,
                reason,
            } => write!(
                f,
                "event `{event_type}` version {event_version} recorded in {} no longer \
                 decodes: {reason}. Stored events of that version would fail to load: keep \
                 the old shape readable (bump the version and add \
                 `#[event(upcast(from = \"{event_version}\", ..))]`), do not re-record it",
                file.display()
            ),
            SchemaProblem::NotRecorded {
                event_type,
                event_version,
            } => write!(
                f,
                "event `{event_type}` version {event_version} has no recorded payload: add a \
                 sample of it and run the test with {RECORD_VAR}=record, then review and \
                 commit the new file"
            ),
            SchemaProblem::Io { file, reason } => write!(f, "{}: {reason}", file.display()),
        }
    }
}

/// Every problem a [`SchemaLock::check`] or [`SchemaLock::record`] found.
#[derive(Debug)]
pub struct SchemaLockError {
    /// The problems, in the order found.
    pub problems: Vec<SchemaProblem>,
}

impl fmt::Display for SchemaLockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "schema lock failed ({} problem(s)):",
            self.problems.len()
        )?;
        for problem in &self.problems {
            writeln!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SchemaLockError {}

impl<E: DomainEvent> SchemaLock<E> {
    /// A lock whose payloads live in `dir` (usually
    /// `concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/<type>")`).
    pub fn new(dir: impl AsRef<Path>) -> Self {
        SchemaLock {
            dir: dir.as_ref().to_path_buf(),
            samples: Vec::new(),
            _event: PhantomData,
        }
    }

    /// Adds a sample value of a current event; [`SchemaLock::record`] writes its payload.
    pub fn sample(mut self, event: E) -> Self {
        self.samples.push(event);
        self
    }

    /// Adds several samples.
    pub fn samples(mut self, events: impl IntoIterator<Item = E>) -> Self {
        self.samples.extend(events);
        self
    }

    /// The file a (name, version) is recorded in.
    pub fn file_for(&self, event_type: &str, event_version: &str) -> PathBuf {
        self.dir.join(format!("{event_type}.v{event_version}.json"))
    }

    /// Checks every recorded payload in the folder decodes, and that every (name, version)
    /// in `E::EVENT_TYPES` is recorded.
    ///
    /// # Errors
    /// Every problem found, each naming the event and version.
    pub fn check(&self) -> Result<(), SchemaLockError> {
        let mut problems = Vec::new();
        let recorded = self.read_all(&mut problems);
        for (file, record) in &recorded {
            if let Err(error) = E::decode_all(
                &record.event_type,
                &record.event_version,
                &Payload::from_value(&record.payload),
            ) {
                problems.push(SchemaProblem::NoLongerDecodes {
                    event_type: record.event_type.clone(),
                    event_version: record.event_version.clone(),
                    file: file.clone(),
                    reason: error.to_string(),
                });
            }
        }
        for event_type in E::EVENT_TYPES {
            let found = recorded.iter().any(|(_, record)| {
                record.event_type == event_type.name && record.event_version == event_type.version
            });
            if !found {
                problems.push(SchemaProblem::NotRecorded {
                    event_type: event_type.name.to_owned(),
                    event_version: event_type.version.to_owned(),
                });
            }
        }
        finish(problems)
    }

    /// Writes each sample's payload to its file. A file that already exists is rewritten only
    /// if its recorded payload still decodes: a payload that no longer does is the very
    /// change the lock is there to catch, and is reported instead.
    ///
    /// # Errors
    /// Every problem found (files that could not be written, recorded payloads that no longer
    /// decode).
    pub fn record(&self) -> Result<(), SchemaLockError> {
        let mut problems = Vec::new();
        if let Err(error) = std::fs::create_dir_all(&self.dir) {
            problems.push(SchemaProblem::Io {
                file: self.dir.clone(),
                reason: error.to_string(),
            });
            return finish(problems);
        }
        for sample in &self.samples {
            let (name, version) = (
                sample.persisted_event_name(),
                sample.persisted_event_version(),
            );
            let file = self.file_for(name, version);
            if let Some(old) = read_one(&file, &mut problems) {
                if let Err(error) = E::decode_all(name, version, &Payload::from_value(&old.payload))
                {
                    problems.push(SchemaProblem::NoLongerDecodes {
                        event_type: name.to_owned(),
                        event_version: version.to_owned(),
                        file,
                        reason: error.to_string(),
                    });
                    continue;
                }
            }
            let written = sample
                .to_payload()
                .and_then(|payload| payload.to_value())
                .map(|payload| Recorded {
                    event_type: name.to_owned(),
                    event_version: version.to_owned(),
                    payload,
                })
                .and_then(|record| serde_json::to_string_pretty(&record))
                .map_err(|error| error.to_string())
                .and_then(|text| {
                    std::fs::write(&file, text + "\n").map_err(|error| error.to_string())
                });
            if let Err(reason) = written {
                problems.push(SchemaProblem::Io { file, reason });
            }
        }
        finish(problems)
    }

    /// In a test: records when `CQRS_SCHEMA_LOCK=record` is set, checks otherwise, and panics
    /// with every problem found.
    ///
    /// # Panics
    /// When [`SchemaLock::record`] or [`SchemaLock::check`] fails; the message lists every
    /// problem, each naming the event and version.
    #[track_caller]
    pub fn assert(&self) {
        let recording = std::env::var(RECORD_VAR).is_ok_and(|value| value == "record");
        let result = if recording {
            self.record().and_then(|()| self.check())
        } else {
            self.check()
        };
        if let Err(error) = result {
            panic!("{error}");
        }
    }

    /// Every `*.json` in the folder, parsed.
    fn read_all(&self, problems: &mut Vec<SchemaProblem>) -> Vec<(PathBuf, Recorded)> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(error) => {
                problems.push(SchemaProblem::Io {
                    file: self.dir.clone(),
                    reason: format!("{error}; record the payloads first with {RECORD_VAR}=record"),
                });
                return Vec::new();
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
            .collect();
        files.sort();
        files
            .into_iter()
            .filter_map(|file| read_one(&file, problems).map(|record| (file, record)))
            .collect()
    }
}

/// The record in `file`, `None` if there is none; a file that cannot be read or parsed is a
/// problem.
fn read_one(file: &Path, problems: &mut Vec<SchemaProblem>) -> Option<Recorded> {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return None,
        Err(error) => {
            problems.push(SchemaProblem::Io {
                file: file.to_path_buf(),
                reason: error.to_string(),
            });
            return None;
        }
    };
    match serde_json::from_str(&text) {
        Ok(record) => Some(record),
        Err(error) => {
            problems.push(SchemaProblem::Io {
                file: file.to_path_buf(),
                reason: format!("not a recorded payload: {error}"),
            });
            None
        }
    }
}

fn finish(problems: Vec<SchemaProblem>) -> Result<(), SchemaLockError> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(SchemaLockError { problems })
    }
}
