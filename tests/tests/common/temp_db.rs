//! A SQLite database file in the temp dir for one test, removed with its companions on drop.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use cqrs::{Durability, SqliteEventRepository, SqliteOptions};
use uuid::Uuid;

/// A database path in the temp dir; the file and its `-wal`/`-shm`/`-journal` companions are
/// removed on drop.
pub struct TempDb {
    path: PathBuf,
}

impl TempDb {
    /// A fresh path named after `tag` (which suite made it).
    pub fn new(tag: &str) -> Self {
        TempDb {
            path: std::env::temp_dir().join(format!("cqrs-{tag}-{}.sqlite", Uuid::new_v4())),
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as text, as a child process or `connect` takes it.
    pub fn url(&self) -> String {
        self.path.display().to_string()
    }

    /// The store with default options, as `SqliteEventRepository::open` gives it.
    pub async fn open(&self) -> SqliteEventRepository {
        SqliteEventRepository::open(&self.path).await.unwrap()
    }

    /// The store with `options`, migrated.
    pub async fn open_with(&self, options: SqliteOptions) -> SqliteEventRepository {
        open_with(&self.url(), options).await
    }

    /// A store without the fsync per commit, for tests about logic rather than durability.
    pub async fn open_fast(&self) -> SqliteEventRepository {
        self.open_with(SqliteOptions::default().durability(Durability::Normal))
            .await
    }

    /// [`TempDb::open_fast`] that waits up to 30 s for a lock, for tests where other
    /// processes write the same file.
    pub async fn open_shared(&self) -> SqliteEventRepository {
        open_shared(&self.url()).await
    }

    /// A store on a sqlx pool the test made (`from_pool`): its reads go through sqlx rather
    /// than the store's own read-only connections.
    pub async fn open_on_own_pool(&self) -> SqliteEventRepository {
        let options = cqrs::sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&self.path)
            .create_if_missing(true)
            .journal_mode(cqrs::sqlx::sqlite::SqliteJournalMode::Wal);
        let pool = cqrs::sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .unwrap();
        let store = SqliteEventRepository::from_pool(pool, SqliteOptions::default())
            .await
            .unwrap();
        store.migrate().await.unwrap();
        store
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.path.display()));
        }
    }
}

/// The store at `path` with `options`, migrated.
pub async fn open_with(path: &str, options: SqliteOptions) -> SqliteEventRepository {
    let store = SqliteEventRepository::connect(path, options).await.unwrap();
    store.migrate().await.unwrap();
    store
}

/// The store at `path` without the fsync per commit and with a 30 s lock wait, for a file
/// that other processes write too.
pub async fn open_shared(path: &str) -> SqliteEventRepository {
    open_with(
        path,
        SqliteOptions::default()
            .durability(Durability::Normal)
            .busy_timeout(Duration::from_secs(30)),
    )
    .await
}
