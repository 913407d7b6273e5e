//! Reading `read_all` pages without skipping a position that may still commit: holes in
//! the positions, the wait for transactions in flight, and the gap timeout.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::copy::{self, CopyPage};
use super::PostgresEventRepository;
use crate::error::CQRSError;
use crate::event::PersistableDomainEvent;

impl PostgresEventRepository {
    async fn fetch_after(&self, after_position: i64, limit: i64) -> Result<CopyPage, CQRSError> {
        let sql = self.inner.sql.read_all_copy(after_position, limit);
        copy::read_page(
            &self.inner.pool,
            &sql,
            usize::try_from(limit).unwrap_or(usize::MAX),
        )
        .await
    }

    /// The result of a `read_all` page: its events, or [`CQRSError::DamagedRow`] when a
    /// damaged row is its first row (see [`EventRepository::read_all`]). Every position in
    /// it is committed, the damaged row's too, which tells a reader whose page came back
    /// short that more follows.
    fn finish_page(&self, page: CopyPage) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        if let Some(last) = page_positions(&page).last() {
            self.note_committed(last);
        }
        match page.damage {
            Some(damage) if page.events.is_empty() => Err(CQRSError::from(damage)),
            _ => Ok(page.events),
        }
    }

    /// Waits until every transaction in progress now has ended, for at most the gap timeout.
    /// Returns false on timeout.
    async fn wait_for_in_flight(&self) -> Result<bool, CQRSError> {
        let mut in_flight: Vec<String> =
            sqlx::query_scalar("SELECT x::text FROM pg_snapshot_xip(pg_current_snapshot()) AS x")
                .fetch_all(&self.inner.pool)
                .await
                .map_err(CQRSError::persistence)?;
        let deadline = Instant::now() + self.inner.settings.gap_timeout;
        let mut pause = Duration::from_micros(250);
        while !in_flight.is_empty() {
            if Instant::now() >= deadline {
                tracing::debug!(
                    schema = %self.inner.settings.schema,
                    in_flight = in_flight.len(),
                    "read_all: transactions still in flight after the gap timeout"
                );
                return Ok(false);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
            in_flight = sqlx::query_scalar(
                "SELECT x FROM unnest($1::text[]) AS t(x) \
                 WHERE pg_xact_status(x::xid8) = 'in progress'",
            )
            .bind(&in_flight)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(CQRSError::persistence)?;
        }
        Ok(true)
    }

    /// The gap-safe page read behind [`EventRepository::read_all`].
    pub(super) async fn read_page(
        &self,
        after_position: i64,
        limit: usize,
    ) -> Result<Vec<PersistableDomainEvent>, CQRSError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let page = self.fetch_after(after_position, limit).await?;
        let settled = self.inner.settled.load(Ordering::Acquire);
        let Some(hole) = first_open_hole(after_position, &page, settled) else {
            return self.finish_page(page);
        };
        // A hole below a visible position: its transaction got its id before this read.
        let highest_seen = page_positions(&page).last().unwrap_or(after_position);
        if !self.wait_for_in_flight().await? {
            return self.finish_page(truncated(page, hole));
        }
        // Every transaction that drew a position below `highest_seen` has ended.
        self.inner.settled.fetch_max(highest_seen, Ordering::AcqRel);
        let settled = self.inner.settled.load(Ordering::Acquire);
        let mut page = self.fetch_after(after_position, limit).await?;
        if let Some(hole) = first_open_hole(after_position, &page, settled) {
            page = truncated(page, hole);
        }
        self.finish_page(page)
    }
}

/// The positions of a page's rows: its events, then the damaged row that ended it.
fn page_positions(page: &CopyPage) -> impl Iterator<Item = i64> + '_ {
    page.events
        .iter()
        .map(|event| event.position)
        .chain(page.damage.as_ref().map(|damage| damage.position))
}

/// The index (in [`page_positions`]) of the first row that follows a hole which is not
/// known to be final, if any.
///
/// The positions `after + 1 ..` should follow one another; a missing one at or below
/// `settled` is a position that will never be stored (its transaction rolled back).
fn first_open_hole(after: i64, page: &CopyPage, settled: i64) -> Option<usize> {
    let mut expected = after + 1;
    for (i, position) in page_positions(page).enumerate() {
        if position != expected && position - 1 > settled {
            return Some(i);
        }
        expected = position + 1;
    }
    None
}

/// The rows of `page` before index `hole` (of [`page_positions`]): the damaged row, last
/// of the positions, is always after it.
fn truncated(mut page: CopyPage, hole: usize) -> CopyPage {
    page.events.truncate(hole);
    page.damage = None;
    page
}
