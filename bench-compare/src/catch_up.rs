//! Catch-up reads against the machine's own limit for them, in the same run.
//!
//! A projection catching up calls `read_all` page after page. What that can cost at best is
//! what the database takes to hand over the same rows, undecoded:
//!
//! * SQLite: the same `SELECT`, in the same pages, stepped with `rusqlite` (the SQLite
//!   library our store reads with), every column's bytes touched and nothing decoded;
//! * PostgreSQL: the same `COPY (SELECT ..) TO STDOUT (FORMAT binary)` pages our store
//!   sends, drained through sqlx with the bytes counted and nothing parsed.
//!
//! Both run alternately with ours on the same 10,000 events, so the ratio holds on any
//! machine, where the events/s figures do not.

use std::time::Instant;

use cqrs::{
    EventRepository, PersistableDomainEvent, PostgresEventRepository, SqliteEventRepository,
};
use cqrs_examples::bank::BankEvent;
use futures_util::TryStreamExt;
use sqlx::postgres::PgPoolCopyExt;
use uuid::Uuid;

use crate::{median, report, BoxResult};

/// Accounts written before a catch-up measurement.
const ACCOUNTS: usize = 1_000;
/// Events per account (one append each account).
const PER_ACCOUNT: i64 = 10;
/// Events read per measurement.
pub const EVENTS: usize = ACCOUNTS * PER_ACCOUNT as usize;
/// Page size: the projection's default batch.
pub const PAGE: usize = 500;
/// The columns our stores select, in their order: the baselines hand over the same ones.
const COLUMNS: &str = "position, event_id, aggregate_type, aggregate_id, sequence, event_type, \
                       event_version, payload, metadata, \"timestamp\", correlation_id, causation_id";
/// How many [`COLUMNS`] there are.
const COLUMN_COUNT: usize = 12;

/// Catch-up figures of one store, events/s.
pub struct CatchUp {
    /// `read_all` in pages of [`PAGE`].
    pub ours: f64,
    /// The same pages, undecoded.
    pub raw: f64,
    /// PostgreSQL only: all events in one `COPY`, unparsed (what paging costs the server).
    pub raw_one: Option<f64>,
}

/// Writes [`EVENTS`] bank events: [`ACCOUNTS`] accounts, one append of [`PER_ACCOUNT`] each.
pub async fn fill(store: &dyn EventRepository) -> BoxResult<()> {
    for _ in 0..ACCOUNTS {
        let id = Uuid::new_v4();
        let mut events = Vec::with_capacity(PER_ACCOUNT as usize);
        for sequence in 1..=PER_ACCOUNT {
            let event = if sequence == 1 {
                BankEvent::Opened {
                    owner: "alice".to_owned(),
                }
            } else {
                BankEvent::deposited(100)
            };
            events.push(PersistableDomainEvent::new(
                "bank_account",
                id,
                sequence,
                &event,
                serde_json::Value::Null,
            )?);
        }
        store.append(events).await?;
    }
    Ok(())
}

/// Reads the whole store in pages of `page`, as a projection does; events/s.
pub async fn read_all_rate(store: &dyn EventRepository, page: usize) -> BoxResult<f64> {
    let start = Instant::now();
    let (mut after, mut read) = (0, 0);
    loop {
        let events = store.read_all(after, page).await?;
        let Some(last) = events.last() else {
            break;
        };
        after = last.position;
        read += events.len();
    }
    let rate = read as f64 / start.elapsed().as_secs_f64();
    if read != EVENTS {
        return Err(format!("catch-up read {read} of {EVENTS} events").into());
    }
    Ok(rate)
}

/// The SQLite pages stepped with rusqlite on a read-only connection; events/s.
fn sqlite_raw(path: &std::path::Path) -> BoxResult<f64> {
    use rusqlite::types::ValueRef;
    let connection = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let mut statement = connection.prepare(&format!(
        "SELECT {COLUMNS} FROM cqrs_events WHERE position > ?1 ORDER BY position LIMIT ?2"
    ))?;
    let start = Instant::now();
    let (mut after, mut read, mut bytes) = (0i64, 0usize, 0usize);
    loop {
        let mut rows = statement.query((after, PAGE as i64))?;
        let mut in_page = 0;
        while let Some(row) = rows.next()? {
            for column in 0..COLUMN_COUNT {
                bytes += match row.get_ref(column)? {
                    ValueRef::Text(text) | ValueRef::Blob(text) => text.len(),
                    ValueRef::Integer(value) => value as usize & 1,
                    ValueRef::Real(_) | ValueRef::Null => 0,
                };
            }
            after = row.get(0)?;
            in_page += 1;
        }
        if in_page == 0 {
            break;
        }
        read += in_page;
    }
    let rate = read as f64 / start.elapsed().as_secs_f64();
    if read != EVENTS || bytes == 0 {
        return Err(format!("raw SQLite scan read {read} of {EVENTS} rows").into());
    }
    Ok(rate)
}

/// One side of the SQLite catch-up alone, `runs` times, for callgrind
/// (`BENCH_PROFILE=cg_catch_up_ours|cg_catch_up_raw`): instructions per row are
/// (Ir at `runs` R2 − Ir at R1) / ((R2 − R1) × [`EVENTS`]), which cancels the fill.
pub async fn sqlite_one_side(ours: bool, runs: usize) -> BoxResult<()> {
    let path = crate::limits::temp_file("cg-catch-up");
    let store = SqliteEventRepository::open(&path).await?;
    fill(&store).await?;
    for _ in 0..runs {
        if ours {
            read_all_rate(&store, PAGE).await?;
        } else {
            let file = path.clone();
            tokio::task::spawn_blocking(move || sqlite_raw(&file).map_err(|e| e.to_string()))
                .await??;
        }
    }
    drop(store);
    crate::limits::remove_sqlite(&path);
    Ok(())
}

/// SQLite: ours against the raw scan, `runs` of each, alternating.
pub async fn sqlite(runs: usize) -> BoxResult<CatchUp> {
    let path = crate::limits::temp_file("catch-up");
    let store = SqliteEventRepository::open(&path).await?;
    fill(&store).await?;
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        ours.push(read_all_rate(&store, PAGE).await?);
        let file = path.clone();
        raw.push(
            tokio::task::spawn_blocking(move || sqlite_raw(&file).map_err(|e| e.to_string()))
                .await??,
        );
    }
    drop(store);
    crate::limits::remove_sqlite(&path);
    Ok(CatchUp {
        ours: median(&mut ours),
        raw: median(&mut raw),
        raw_one: None,
    })
}

/// The PostgreSQL pages our store sends (of `page` rows), drained through sqlx and not
/// parsed; events/s.
async fn postgres_raw(pool: &sqlx::PgPool, schema: &str, page: usize) -> BoxResult<f64> {
    let start = Instant::now();
    let (mut after, mut read) = (0i64, 0usize);
    loop {
        let sql = format!(
            "COPY (SELECT {COLUMNS} FROM \"{schema}\".cqrs_events WHERE position > {after} \
             ORDER BY position LIMIT {page}) TO STDOUT (FORMAT binary)"
        );
        let mut chunks = pool.copy_out_raw(&sql).await?;
        let mut last = None;
        let mut in_page = 0;
        while let Some(chunk) = chunks.try_next().await? {
            // The first row comes after the 19-byte header (signature, flags, no extension).
            let row = chunk
                .strip_prefix(b"PGCOPY\n\xff\r\n\0")
                .map_or(&chunk[..], |rest| rest.get(8..).unwrap_or_default());
            // A row's message starts with its field count (12), then the position's length
            // (8) and the position: the one value the next page needs.
            if let [0, 12, 0, 0, 0, 8, rest @ ..] = row {
                if let Some(position) = rest.get(..8) {
                    last = Some(i64::from_be_bytes(position.try_into()?));
                    in_page += 1;
                }
            }
        }
        match last {
            Some(position) => after = position,
            None => break,
        }
        read += in_page;
    }
    let rate = read as f64 / start.elapsed().as_secs_f64();
    if read != EVENTS {
        return Err(format!("raw COPY read {read} of {EVENTS} rows").into());
    }
    Ok(rate)
}

/// PostgreSQL: ours against the raw COPY, `runs` of each, alternating.
pub async fn postgres(url: &str, runs: usize) -> BoxResult<CatchUp> {
    let schema = format!("bench_catchup_{}", Uuid::new_v4().simple());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(url)
        .await?;
    let store = PostgresEventRepository::from_pool(pool.clone()).with_schema(&schema)?;
    store.migrate().await?;
    fill(&store).await?;
    let (mut ours, mut raw, mut raw_one) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        // A fresh handle each time: no settled watermark carried over.
        let reader = PostgresEventRepository::from_pool(pool.clone()).with_schema(&schema)?;
        ours.push(read_all_rate(&reader, PAGE).await?);
        raw.push(postgres_raw(&pool, &schema, PAGE).await?);
        raw_one.push(postgres_raw(&pool, &schema, EVENTS).await?);
    }
    drop(store);
    sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(CatchUp {
        ours: median(&mut ours),
        raw: median(&mut raw),
        raw_one: Some(median(&mut raw_one)),
    })
}

/// Prints both stores' figures and pushes their ratios.
pub async fn run(runs: usize, ratios: &mut Vec<String>) -> BoxResult<()> {
    report!(
        "\ncatch-up: {EVENTS} events in pages of {PAGE}, events/s (median of {runs}, alternating):"
    );
    let sqlite = sqlite(runs).await?;
    report!(
        "  sqlite: ours read_all {:>10.0}   raw rusqlite scan, undecoded {:>10.0}",
        sqlite.ours,
        sqlite.raw
    );
    ratios.push(format!(
        "ratio sqlite_catch_up_vs_raw_scan {:.2}   (higher is better; 1.0 = the cost of SQLite alone)",
        sqlite.ours / sqlite.raw
    ));
    match std::env::var("CQRS_POSTGRES_URL") {
        Ok(url) => {
            let pg = postgres(&url, runs).await?;
            report!(
                "  postgres: ours read_all {:>10.0}   raw COPY pages, unparsed {:>10.0}   raw, one COPY of all {:>10.0}",
                pg.ours,
                pg.raw,
                pg.raw_one.unwrap_or(f64::NAN)
            );
            ratios.push(format!(
                "ratio postgres_catch_up_vs_raw_copy {:.2}   (higher is better; 1.0 = the cost of the COPY alone)",
                pg.ours / pg.raw
            ));
        }
        Err(_) => report!("  skipping postgres catch-up: set CQRS_POSTGRES_URL to run it"),
    }
    Ok(())
}
