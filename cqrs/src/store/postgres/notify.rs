//! Announcing appends to other processes (`pg_notify` from a background task, coalesced)
//! and hearing theirs (`LISTEN`), feeding the handle's position watch.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::{watch, Notify};

use super::{Inner, PostgresEventRepository};

impl PostgresEventRepository {
    pub(super) fn note_committed(&self, position: i64) {
        self.inner.note_committed(position);
    }

    /// Wakes the notifier task (starting it on first use) so other processes hear of an
    /// append.
    pub(super) fn announce(&self) {
        if !self.inner.settings.notify {
            return;
        }
        if !self.inner.notifier_started.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(notifier(Notifier {
                        pool: self.inner.pool.clone(),
                        channel: self.inner.channel.clone(),
                        interval: self.inner.settings.notify_interval,
                        position: self.inner.position.subscribe(),
                        wake: Arc::clone(&self.inner.wake),
                        shutdown: self.inner.shutdown.subscribe(),
                    }));
                }
                Err(_) => {
                    self.inner.notifier_started.store(false, Ordering::Release);
                    return;
                }
            }
        }
        self.inner.wake.notify_one();
    }

    /// Starts the `LISTEN` task once, if there is a Tokio runtime.
    pub(super) fn start_listener(&self) {
        if self.inner.listener_started.swap(true, Ordering::AcqRel) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(listener(
                    Arc::downgrade(&self.inner),
                    self.inner.pool.clone(),
                    self.inner.channel.clone(),
                    self.inner.shutdown.subscribe(),
                ));
            }
            Err(_) => self.inner.listener_started.store(false, Ordering::Release),
        }
    }
}

impl Inner {
    pub(super) fn note_committed(&self, position: i64) {
        self.position.send_if_modified(|known| {
            if position > *known {
                *known = position;
                true
            } else {
                false
            }
        });
    }
}

/// The channel name for a schema: `cqrs_<schema>`, or, when that would exceed PostgreSQL's
/// 63-byte identifier limit, a prefix of it with a stable hash of the whole name.
pub(super) fn channel_name(schema: &str) -> String {
    let full = format!("cqrs_{schema}");
    if full.len() <= 63 {
        return full;
    }
    // FNV-1a: stable across processes and Rust versions, unlike `DefaultHasher`.
    let hash = schema.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{}_{hash:016x}", &full[..46])
}

/// What the notifier task needs; it holds no strong reference to the handle.
struct Notifier {
    pool: PgPool,
    channel: String,
    interval: Duration,
    /// The handle's highest committed position.
    position: watch::Receiver<i64>,
    wake: Arc<Notify>,
    shutdown: watch::Receiver<bool>,
}

/// The notification: one statement, its own transaction, committed without waiting for the
/// WAL flush. (`pg_notify` gives the transaction an id, so with the server's default
/// `synchronous_commit` it would wait for a disk flush holding PostgreSQL's database-wide
/// notify lock.) `set_config(.., true)` is local to this transaction: the pooled connection
/// keeps its settings.
const NOTIFY_SQL: &str = "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, $2)";

/// Sends `pg_notify(channel, position)` after appends, at most one per interval: appends that
/// commit while a notification is due or being sent are covered by the next one. After the
/// last handle is dropped it sends what is still due, then ends.
async fn notifier(mut task: Notifier) {
    let mut last_sent: Option<(tokio::time::Instant, i64)> = None;
    loop {
        let mut closing = tokio::select! {
            () = task.wake.notified() => false,
            _ = task.shutdown.wait_for(|closed| *closed) => true,
        };
        if let (Some((sent_at, _)), false) = (last_sent, closing) {
            tokio::select! {
                () = tokio::time::sleep_until(sent_at + task.interval) => {}
                _ = task.shutdown.wait_for(|closed| *closed) => closing = true,
            }
        }
        // Read after the pause: it covers every append that committed during it.
        let position = *task.position.borrow_and_update();
        if last_sent.is_none_or(|(_, sent)| position > sent) {
            let sent = sqlx::query(NOTIFY_SQL)
                .bind(&task.channel)
                .bind(position.to_string())
                .execute(&task.pool)
                .await;
            match sent {
                Ok(_) => last_sent = Some((tokio::time::Instant::now(), position)),
                // Listeners fall back to polling; the next append notifies again.
                Err(error) => {
                    tracing::debug!(channel = %task.channel, %error, "could not send the append notification");
                }
            }
        }
        if closing {
            return;
        }
    }
}

/// Listens on the schema's channel and feeds the positions announced by other processes
/// into the handle's watch channel, until the last handle is dropped.
async fn listener(
    inner: Weak<Inner>,
    pool: PgPool,
    channel: String,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(&channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            connected = connected => connected,
            _ = shutdown.wait_for(|closed| *closed) => return,
        };
        match &mut listener {
            Ok(listener) => loop {
                let received = tokio::select! {
                    received = listener.try_recv() => received,
                    _ = shutdown.wait_for(|closed| *closed) => return,
                };
                let Some(strong) = inner.upgrade() else {
                    return;
                };
                match received {
                    Ok(Some(notification)) => {
                        if let Ok(position) = notification.payload().parse::<i64>() {
                            strong.note_committed(position);
                        }
                    }
                    // Reconnected: notifications may have been lost, wake the readers.
                    Ok(None) => strong.position.send_modify(|_| {}),
                    Err(error) => {
                        tracing::debug!(%channel, %error, "LISTEN connection failed; retrying");
                        break;
                    }
                }
            },
            Err(sqlx::Error::PoolClosed) => return,
            Err(error) => {
                tracing::debug!(%channel, %error, "could not LISTEN; retrying");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.wait_for(|closed| *closed) => return,
        }
    }
}
