//! Group commit: appends that arrive together while another append of the same handle is
//! in flight are written together by one statement in one transaction, each keeping its own
//! outcome. Why it is built this way is in `docs/adr/0004-postgres-store.md`
//! ("Group commit").

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use sqlx::Row;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::PostgresEventRepository;
use crate::error::CQRSError;
use crate::event::PersistableDomainEvent;
use crate::store::validate_batch;

/// The most events one group statement carries; a larger group is split.
const MAX_GROUP_EVENTS: usize = 1024;

/// How often the leader of a forming group yields to the runtime before it sends the group:
/// the callers that one commit answered come back at about the same moment, and these
/// yields let those whose next append is ready (a cached dispatch reads nothing) join.
const GATHER_YIELDS: usize = 2;

/// The appends of one handle in flight, and the group being formed.
#[derive(Default)]
pub(super) struct Groups {
    state: Mutex<GroupState>,
    /// Appends committed by a statement shared with at least one other append.
    grouped_appends: AtomicU64,
    /// Group statements sent (each carrying two or more appends).
    group_statements: AtomicU64,
}

#[derive(Default)]
struct GroupState {
    /// Lone appends and groups in flight (or forming).
    in_flight: usize,
    /// The group being formed, whose leader has not sent it yet.
    forming: Option<Vec<Job>>,
}

/// One append waiting for its group.
struct Job {
    events: Vec<PersistableDomainEvent>,
    /// The sequence the writer believes is the aggregate's last (from `validate_batch`).
    expected: i64,
    answer: oneshot::Sender<Result<Vec<i64>, CQRSError>>,
}

impl Job {
    fn key(&self) -> (&str, Uuid) {
        let first = &self.events[0];
        (first.aggregate_type.as_str(), first.aggregate_id)
    }
}

impl Groups {
    fn state(&self) -> MutexGuard<'_, GroupState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// (appends committed in shared statements, shared statements sent).
    pub(super) fn counts(&self) -> (u64, u64) {
        (
            self.grouped_appends.load(Ordering::Relaxed),
            self.group_statements.load(Ordering::Relaxed),
        )
    }
}

/// One place in flight, given back when the append or group ends (or its future is
/// dropped).
struct InFlight<'a>(&'a Groups);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.state().in_flight -= 1;
    }
}

/// Sends the forming group of a leader whose caller stopped waiting before it took the
/// group, so that the followers in it are answered.
struct Gathering<'a> {
    store: &'a PostgresEventRepository,
    taken: bool,
}

impl Drop for Gathering<'_> {
    fn drop(&mut self) {
        if self.taken {
            return;
        }
        let jobs = self.store.inner.groups.state().forming.take();
        if let (Some(jobs), Ok(runtime)) = (jobs, tokio::runtime::Handle::try_current()) {
            let store = self.store.clone();
            runtime.spawn(async move { store.commit_group(jobs).await });
        }
    }
}

/// What an append does, decided under the lock.
enum Role {
    /// Nothing in flight: sent at once, alone.
    Alone(Vec<PersistableDomainEvent>),
    /// Joined a forming group: waits for its answer.
    Follower(oneshot::Receiver<Result<Vec<i64>, CQRSError>>),
    /// Opened a group (its own append is in it): gathers, then sends it.
    Leader(oneshot::Receiver<Result<Vec<i64>, CQRSError>>),
}

/// The answer of an append whose group ended without answering it.
fn unanswered() -> CQRSError {
    CQRSError::persistence(
        "the group commit ended without answering this append; its outcome is unknown, and \
         sending the same append again is safe",
    )
}

impl PostgresEventRepository {
    /// Appends one batch through the group commit (see
    /// [`with_group_commit`](Self::with_group_commit)): alone at once when nothing else is in
    /// flight, otherwise with the appends that arrive while its group forms.
    pub(super) async fn append_grouped(
        &self,
        events: Vec<PersistableDomainEvent>,
    ) -> Result<Vec<i64>, CQRSError> {
        let expected = validate_batch(&events)?;
        let groups = &self.inner.groups;
        let role = {
            let mut state = groups.state();
            if state.in_flight == 0 {
                state.in_flight += 1;
                Role::Alone(events)
            } else {
                let (answer, waiting) = oneshot::channel();
                let job = Job {
                    events,
                    expected,
                    answer,
                };
                match &mut state.forming {
                    Some(forming) => {
                        forming.push(job);
                        Role::Follower(waiting)
                    }
                    None => {
                        state.forming = Some(vec![job]);
                        state.in_flight += 1;
                        Role::Leader(waiting)
                    }
                }
            }
        };
        match role {
            Role::Alone(events) => {
                let _place = InFlight(groups);
                self.append_validated(events, expected).await
            }
            Role::Follower(waiting) => waiting.await.unwrap_or_else(|_| Err(unanswered())),
            Role::Leader(waiting) => {
                let _place = InFlight(groups);
                let mut gathering = Gathering {
                    store: self,
                    taken: false,
                };
                for _ in 0..GATHER_YIELDS {
                    tokio::task::yield_now().await;
                }
                let jobs = groups.state().forming.take().unwrap_or_default();
                gathering.taken = true;
                if jobs.len() == 1 {
                    self.commit_group(jobs).await;
                } else {
                    // In a task of its own, so that the followers are answered even when the
                    // leader's caller stops waiting.
                    let store = self.clone();
                    let _ = tokio::spawn(async move { store.commit_group(jobs).await }).await;
                }
                waiting.await.unwrap_or_else(|_| Err(unanswered()))
            }
        }
    }

    /// Writes `jobs`, in statements of at most [`MAX_GROUP_EVENTS`] events, and answers
    /// each.
    async fn commit_group(&self, mut jobs: Vec<Job>) {
        jobs.retain(|job| !job.answer.is_closed());
        while !jobs.is_empty() {
            let rest = split_group(&mut jobs);
            self.commit_statement(jobs).await;
            jobs = rest;
        }
    }

    /// Writes `jobs` (one statement when they are two or more) and answers each.
    async fn commit_statement(&self, mut jobs: Vec<Job>) {
        if jobs.len() == 1 {
            if let Some(job) = jobs.pop() {
                let result = self.append_validated(job.events, job.expected).await;
                let _ = job.answer.send(result);
            }
            return;
        }
        // One append per aggregate in the statement: a second one for the same aggregate
        // cannot both commit with the first, and goes alone after it. Sorted by aggregate, so
        // that two groups (of two handles) meeting on the same keys wait for each other in
        // one order and never deadlock.
        jobs.sort_by(|a, b| a.key().cmp(&b.key()));
        let mut shared = Vec::with_capacity(jobs.len());
        let mut alone = Vec::new();
        for job in jobs {
            match shared.last() {
                Some(previous) if Job::key(previous) == job.key() => alone.push(job),
                _ => shared.push(job),
            }
        }
        if shared.len() == 1 {
            alone.extend(shared);
        } else {
            match self.insert_group(&shared).await {
                Ok(mut stored) => {
                    let mut last = None;
                    for job in shared {
                        let positions: Option<Vec<i64>> = job
                            .events
                            .iter()
                            .map(|event| stored.remove(&event.event_id))
                            .collect();
                        match positions {
                            Some(positions) => {
                                last = last.max(positions.last().copied());
                                self.inner
                                    .groups
                                    .grouped_appends
                                    .fetch_add(1, Ordering::Relaxed);
                                let _ = job.answer.send(Ok(positions));
                            }
                            // Left out by the statement (a stale expected sequence, an
                            // earlier attempt of the same append, a skip ahead): it goes
                            // alone, which gives its own answer.
                            None => alone.push(job),
                        }
                    }
                    if let Some(last) = last {
                        self.note_committed(last);
                        self.announce();
                    }
                }
                Err(error) => {
                    // Nothing of the group is stored (or, on a lost connection, perhaps
                    // everything): every append goes alone, which tells each its outcome
                    // and recognises an append the group did store as a retry.
                    tracing::debug!(
                        schema = %self.inner.settings.schema,
                        appends = shared.len(),
                        %error,
                        "group append refused; its appends go one by one"
                    );
                    alone.extend(shared);
                }
            }
        }
        let alone = alone.into_iter().map(|job| async move {
            let result = self.append_validated(job.events, job.expected).await;
            let _ = job.answer.send(result);
        });
        join_all(alone).await;
    }

    /// The statement of a group: every append whose previous sequence is stored and whose
    /// first sequence is not, in one transaction. Returns the positions by event id.
    async fn insert_group(&self, jobs: &[Job]) -> Result<HashMap<Uuid, i64>, sqlx::Error> {
        let n: usize = jobs.iter().map(|job| job.events.len()).sum();
        let mut event_ids = Vec::with_capacity(n);
        let mut aggregate_types = Vec::with_capacity(n);
        let mut aggregate_ids = Vec::with_capacity(n);
        let mut sequences = Vec::with_capacity(n);
        let mut event_types = Vec::with_capacity(n);
        let mut event_versions = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut metadata = Vec::with_capacity(n);
        let mut timestamps: Vec<DateTime<Utc>> = Vec::with_capacity(n);
        let mut expected = Vec::with_capacity(n);
        let mut correlation_ids: Vec<Option<Uuid>> = Vec::with_capacity(n);
        let mut causation_ids: Vec<Option<Uuid>> = Vec::with_capacity(n);
        for job in jobs {
            for event in &job.events {
                event_ids.push(event.event_id);
                aggregate_types.push(event.aggregate_type.as_str());
                aggregate_ids.push(event.aggregate_id);
                sequences.push(event.sequence);
                event_types.push(event.event_type.as_str());
                event_versions.push(event.event_version.as_str());
                payloads.push(&event.payload);
                metadata.push(&event.metadata);
                timestamps.push(event.timestamp);
                expected.push(job.expected);
                correlation_ids.push(event.correlation_id);
                causation_ids.push(event.causation_id);
            }
        }
        self.inner
            .groups
            .group_statements
            .fetch_add(1, Ordering::Relaxed);
        let rows = sqlx::query(&self.inner.sql.append_group)
            .bind(&event_ids)
            .bind(&aggregate_types)
            .bind(&aggregate_ids)
            .bind(&sequences)
            .bind(&event_types)
            .bind(&event_versions)
            .bind(&payloads)
            .bind(&metadata)
            .bind(&timestamps)
            .bind(&expected)
            .bind(&correlation_ids)
            .bind(&causation_ids)
            .fetch_all(&self.inner.pool)
            .await?;
        let mut stored = HashMap::with_capacity(rows.len());
        for row in &rows {
            stored.insert(row.try_get(0)?, row.try_get(1)?);
        }
        Ok(stored)
    }
}

/// Splits `jobs` after the appends that fit in one statement (at least one), and returns
/// the rest.
fn split_group(jobs: &mut Vec<Job>) -> Vec<Job> {
    let mut events = 0;
    let mut count = 0;
    for job in jobs.iter() {
        if count > 0 && events + job.events.len() > MAX_GROUP_EVENTS {
            break;
        }
        events += job.events.len();
        count += 1;
    }
    jobs.split_off(count)
}
