//! Catch-up reads against the machine's own limit for them, in the same run.
//!
//! A projection catching up calls `read_all` page after page. What that can cost at best is
//! what the database takes to hand over the same rows, undecoded:
//!
//! * SQLite: the same `SELECT`, in the same pages, stepped with `rusqlite` (the SQLite
//!   library our store reads with) on one connection kept open, as the store keeps its
//!   readers', every column's bytes touched and nothing decoded;
//! * PostgreSQL: the same `COPY (SELECT ..) TO STDOUT (FORMAT binary)` pages our store
//!   sends, drained through sqlx with the bytes counted and nothing parsed.
//!
//! Both run alternately with ours on the same 10,000 events, so the ratio holds on any
//! machine, where the events/s figures do not. A read takes about 10 ms (SQLite) to 40 ms
//! (PostgreSQL), short enough for one scheduler hiccup on two shared cores to move it by a
//! third: each figure is [`PAIRS_PER_RUN`] pairs per run, the ratio is the median of the
//! pairs' own ratios, and each store's part starts once the machine has gone quiet
//! ([`settle`]), so the database server's work after the parts before it (a checkpoint, a
//! vacuum) does not land on one side.

use std::time::{Duration, Instant};

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
/// Alternating pairs (ours, then the baseline) per run asked for.
pub const PAIRS_PER_RUN: usize = 7;
/// The longest a store's part waits for the machine to go quiet.
const SETTLE_LIMIT: Duration = Duration::from_secs(5);

/// Catch-up figures of one store: events/s, medians over the pairs.
pub struct CatchUp {
    /// `read_all` in pages of [`PAGE`].
    pub ours: f64,
    /// The same pages, undecoded.
    pub raw: f64,
    /// The median of each pair's `ours / raw`.
    pub ratio: f64,
    /// The lowest and highest of the pairs' ratios.
    pub ratio_range: (f64, f64),
    /// PostgreSQL only: all events in one `COPY`, unparsed (what paging costs the server).
    pub raw_one: Option<f64>,
}

impl CatchUp {
    /// The medians of alternating measurements, pair by pair.
    fn of(mut ours: Vec<f64>, mut raw: Vec<f64>, raw_one: Option<Vec<f64>>) -> CatchUp {
        let mut ratios: Vec<f64> = ours.iter().zip(&raw).map(|(o, r)| o / r).collect();
        let ratio = median(&mut ratios);
        CatchUp {
            ratio,
            ratio_range: (
                ratios.first().copied().unwrap_or(f64::NAN),
                ratios.last().copied().unwrap_or(f64::NAN),
            ),
            ours: median(&mut ours),
            raw: median(&mut raw),
            raw_one: raw_one.map(|mut one| median(&mut one)),
        }
    }
}

/// The machine's busy and total CPU ticks since boot (the first line of `/proc/stat`);
/// `None` where that cannot be read.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .filter_map(|field| field.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let all: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4)?;
    Some((all.saturating_sub(idle), all))
}

/// Waits, at most [`SETTLE_LIMIT`], until the machine was under 30% busy for 100 ms, and
/// says so when it did not get there (another process's load).
async fn settle(part: &str) {
    let started = Instant::now();
    let Some(mut before) = cpu_ticks() else {
        return;
    };
    while started.elapsed() < SETTLE_LIMIT {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(now) = cpu_ticks() else {
            return;
        };
        let (busy, all) = (now.0 - before.0, now.1 - before.1);
        if all > 0 && busy * 10 < all * 3 {
            return;
        }
        before = now;
    }
    report!("  ({part}: the machine stayed over 30% busy for {SETTLE_LIMIT:?}; measured anyway)");
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

/// A read-only rusqlite connection to the store's file, kept across measurements as the
/// store keeps its readers' connections (and their page caches).
struct RawScan {
    connection: rusqlite::Connection,
}

impl RawScan {
    fn open(path: &std::path::Path) -> BoxResult<RawScan> {
        let connection = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        Ok(RawScan { connection })
    }

    /// The store's page query (`?1` the position after which, `?2` the page size), cached
    /// on this connection.
    fn page_statement(&self) -> rusqlite::Result<rusqlite::CachedStatement<'_>> {
        self.connection.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM cqrs_events WHERE position > ?1 ORDER BY position LIMIT ?2"
        ))
    }

    /// The SQLite pages stepped on this connection, every column's bytes touched; events/s.
    fn rate(&self) -> BoxResult<f64> {
        use rusqlite::types::ValueRef;
        let mut statement = self.page_statement()?;
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

    /// The same pages copied into one buffer per page, each row's text columns as offsets
    /// into it (what a read API whose rows borrow their page would do); with `checked`, also
    /// the checks the store makes of each row today (the two UUIDs, UTF-8 of the names and
    /// the payload, JSON of non-`null` metadata, the timestamp's range, the optional ids).
    /// For callgrind only: the floor of such a reader, with and without its checks.
    fn page_rate(&self, checked: bool) -> BoxResult<f64> {
        use rusqlite::types::ValueRef;
        let mut statement = self.page_statement()?;
        let start = Instant::now();
        let mut buffer: Vec<u8> = Vec::with_capacity(512 * PAGE);
        let mut rows: Vec<([u32; 10], i64, i64, i64)> = Vec::with_capacity(PAGE);
        let (mut after, mut read, mut bytes) = (0i64, 0usize, 0usize);
        const TEXT: [usize; 9] = [1, 2, 3, 5, 6, 7, 8, 10, 11];
        loop {
            buffer.clear();
            rows.clear();
            let mut query = statement.query((after, PAGE as i64))?;
            while let Some(row) = query.next()? {
                let position: i64 = row.get(0)?;
                let sequence: i64 = row.get(4)?;
                let micros: i64 = row.get(9)?;
                let mut offsets = [0u32; 10];
                offsets[0] = buffer.len() as u32;
                for (slot, column) in TEXT.iter().enumerate() {
                    match row.get_ref(*column)? {
                        ValueRef::Text(text) => buffer.extend_from_slice(text),
                        ValueRef::Null => {}
                        _ => return Err("not text".into()),
                    }
                    offsets[slot + 1] = buffer.len() as u32;
                }
                if checked {
                    let field =
                        |slot: usize| &buffer[offsets[slot] as usize..offsets[slot + 1] as usize];
                    Uuid::try_parse_ascii(field(0))?;
                    std::str::from_utf8(field(1))?;
                    Uuid::try_parse_ascii(field(2))?;
                    std::str::from_utf8(field(3))?;
                    std::str::from_utf8(field(4))?;
                    std::str::from_utf8(field(5))?;
                    if field(6) != b"null" {
                        serde_json::from_slice::<serde::de::IgnoredAny>(field(6))?;
                    }
                    if chrono::DateTime::from_timestamp_micros(micros).is_none() {
                        return Err("timestamp".into());
                    }
                    for slot in [7, 8] {
                        if !field(slot).is_empty() {
                            Uuid::try_parse_ascii(field(slot))?;
                        }
                    }
                }
                rows.push((offsets, position, sequence, micros));
            }
            drop(query);
            let Some(last) = rows.last() else {
                break;
            };
            after = last.1;
            read += rows.len();
            for (offsets, ..) in &rows {
                bytes += (offsets[6] - offsets[5]) as usize;
            }
        }
        let rate = read as f64 / start.elapsed().as_secs_f64();
        if read != EVENTS || bytes == 0 {
            return Err(format!("page scan read {read} of {EVENTS} rows").into());
        }
        Ok(rate)
    }

    /// [`rate`](Self::rate) on a blocking thread, as the store's reads leave the runtime's
    /// worker; the connection comes back with the figure.
    async fn rate_blocking(self) -> BoxResult<(RawScan, f64)> {
        let (scan, rate) = tokio::task::spawn_blocking(move || {
            let rate = self.rate().map_err(|e| e.to_string());
            (self, rate)
        })
        .await?;
        Ok((scan, rate?))
    }
}

/// What [`sqlite_one_side`] reads with.
#[derive(Clone, Copy, PartialEq)]
pub enum Side {
    /// `read_all`, as the comparison's `ours`.
    Ours,
    /// The raw scan, as the comparison's baseline.
    Raw,
    /// The raw scan copying each page into one buffer ([`RawScan::page_rate`]).
    Page,
    /// The same with the store's checks of each row.
    PageChecked,
}

/// One side of the SQLite catch-up alone, `runs` times, for callgrind
/// (`BENCH_PROFILE=cg_catch_up_ours|cg_catch_up_raw|cg_catch_up_page|cg_catch_up_page_checked`):
/// instructions per row are (Ir at `runs` R2 − Ir at R1) / ((R2 − R1) × [`EVENTS`]), which
/// cancels the fill.
pub async fn sqlite_one_side(side: Side, runs: usize) -> BoxResult<()> {
    let path = crate::limits::temp_file("cg-catch-up");
    let store = SqliteEventRepository::open(&path).await?;
    fill(&store).await?;
    let mut scan = RawScan::open(&path)?;
    for _ in 0..runs {
        match side {
            Side::Ours => {
                read_all_rate(&store, PAGE).await?;
            }
            Side::Raw => scan = scan.rate_blocking().await?.0,
            Side::Page | Side::PageChecked => {
                scan.page_rate(side == Side::PageChecked)?;
            }
        }
    }
    drop(scan);
    drop(store);
    crate::limits::remove_sqlite(&path);
    Ok(())
}

/// SQLite: ours against the raw scan, `pairs` of each, alternating.
pub async fn sqlite(pairs: usize) -> BoxResult<CatchUp> {
    let path = crate::limits::temp_file("catch-up");
    let store = SqliteEventRepository::open(&path).await?;
    fill(&store).await?;
    settle("sqlite catch-up").await;
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    let mut scan = RawScan::open(&path)?;
    for _ in 0..pairs {
        ours.push(read_all_rate(&store, PAGE).await?);
        let (kept, rate) = scan.rate_blocking().await?;
        raw.push(rate);
        scan = kept;
    }
    drop(scan);
    drop(store);
    crate::limits::remove_sqlite(&path);
    Ok(CatchUp::of(ours, raw, None))
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

/// PostgreSQL: ours against the raw COPY, `pairs` of each, alternating.
pub async fn postgres(url: &str, pairs: usize) -> BoxResult<CatchUp> {
    let schema = format!("bench_catchup_{}", Uuid::new_v4().simple());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(url)
        .await?;
    let store = PostgresEventRepository::from_pool(pool.clone()).with_schema(&schema)?;
    store.migrate().await?;
    fill(&store).await?;
    settle("postgres catch-up").await;
    let (mut ours, mut raw, mut raw_one) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..pairs {
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
    Ok(CatchUp::of(ours, raw, Some(raw_one)))
}

/// Prints both stores' figures and pushes their ratios: [`PAIRS_PER_RUN`] pairs per run.
pub async fn run(runs: usize, ratios: &mut Vec<String>) -> BoxResult<()> {
    let pairs = runs * PAIRS_PER_RUN;
    report!(
        "\ncatch-up: {EVENTS} events in pages of {PAGE}, events/s (medians of {pairs} alternating pairs; ratios: the median of the pairs' ratios):"
    );
    let sqlite = sqlite(pairs).await?;
    report!(
        "  sqlite: ours read_all {:>10.0}   raw rusqlite scan, undecoded {:>10.0}   pairs' ratios {:.2}–{:.2}",
        sqlite.ours,
        sqlite.raw,
        sqlite.ratio_range.0,
        sqlite.ratio_range.1
    );
    ratios.push(format!(
        "ratio sqlite_catch_up_vs_raw_scan {:.2}   (higher is better; 1.0 = the cost of SQLite alone; goal >= 0.9)",
        sqlite.ratio
    ));
    match std::env::var("CQRS_POSTGRES_URL") {
        Ok(url) => {
            let pg = postgres(&url, pairs).await?;
            report!(
                "  postgres: ours read_all {:>10.0}   raw COPY pages, unparsed {:>10.0}   raw, one COPY of all {:>10.0}   pairs' ratios {:.2}–{:.2}",
                pg.ours,
                pg.raw,
                pg.raw_one.unwrap_or(f64::NAN),
                pg.ratio_range.0,
                pg.ratio_range.1
            );
            ratios.push(format!(
                "ratio postgres_catch_up_vs_raw_copy {:.2}   (higher is better; 1.0 = the cost of the COPY alone; goal >= 0.9)",
                pg.ratio
            ));
        }
        Err(_) => report!("  skipping postgres catch-up: set CQRS_POSTGRES_URL to run it"),
    }
    Ok(())
}
