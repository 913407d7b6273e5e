//! `cargo bench -p cqrs-benches --bench memory`: what the state cache holds per aggregate,
//! and that catching up keeps its memory flat as the store grows.
//!
//! A counting global allocator (a wrapper around `System`) keeps the live bytes of the Rust
//! heap and their peak. It counts the sizes the program asks for, not what `malloc` rounds
//! them up to, and nothing SQLite allocates itself (its page cache is C memory, bounded by
//! its `cache_size`); the peak resident set is printed beside the catch-up figures for that.
//!
//! * **State cache.** The same commands (each account opened, then 4 deposits) go through a
//!   framework on a fresh `MemoryEventRepository`, once with the cache and once without.
//!   After the last command the framework is dropped while a clone of the store keeps every
//!   event: the bytes freed by that drop are the framework's own. The cache's bytes are the
//!   cached framework's minus the uncached one's. The default framework (capacity 10,000)
//!   over 10,000 and 100,000 accounts, and `with_state_cache(100_000)` over 100,000.
//! * **Catch-up.** A SQLite file holds 1,000 accounts of 100 events (100,000 events), then,
//!   after 900 more events per account, 1,000,000. After each size, from the same baseline,
//!   a `read_all` loop in pages of 500 and a `Projection` of the bank example's
//!   `BalanceView` into memory views (1,000 rows either way) catch up over the whole store;
//!   the figure is the peak of live bytes above the baseline.
//!
//! The program exits non-zero when a bound fails: the default cache over 100,000 accounts
//! holds more than 2.2 times what it holds over 10,000 (it keeps at most twice its
//! capacity), or a catch-up's peak over 1,000,000 events exceeds twice its peak over
//! 100,000 plus 1 MiB. Figures and how to read them: `docs/benchmarks.md`, "Memory".
//! Run without `--bench` (as `cargo test --all-targets` does), it only says how to run it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use cqrs::{
    Aggregate, CQRSFramework, Durability, EventRepository, MemoryEventRepository,
    MemoryViewRepository, PersistableDomainEvent, Projection, SqliteEventRepository, SqliteOptions,
    DEFAULT_STATE_CACHE_CAPACITY,
};
use cqrs_benches::{bank_command, bank_event, remove_sqlite, runtime, temp_sqlite, BoxError};
use cqrs_examples::bank::{BalanceView, BankAccount};
use uuid::Uuid;

/// Live bytes of the Rust heap.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// The highest value of [`LIVE`] since the last [`reset_peak`].
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// `System`, counting the bytes it hands out and takes back.
struct Counting;

fn grew(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

fn shrank(bytes: usize) {
    LIVE.fetch_sub(bytes, Ordering::Relaxed);
}

// SAFETY: every call is passed on to `System` unchanged; the wrapper only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is `System.alloc`'s.
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            grew(layout.size());
        }
        pointer
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        let pointer = unsafe { System.alloc_zeroed(layout) };
        if !pointer.is_null() {
            grew(layout.size());
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: `pointer` came from this allocator, that is from `System`, with `layout`.
        unsafe { System.dealloc(pointer, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as `dealloc`, and `new_size` is the caller's, valid for `System` too.
        let moved = unsafe { System.realloc(pointer, layout, new_size) };
        if !moved.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Starts a new peak from the live bytes now; returns them.
fn reset_peak() -> usize {
    let now = live();
    PEAK.store(now, Ordering::Relaxed);
    now
}

fn peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Commands per account in the cache measurement: the open, then deposits.
const COMMANDS_PER_ACCOUNT: usize = 5;
/// Accounts in the catch-up store.
const ACCOUNTS: usize = 1_000;
/// Events per account at the two sizes of the catch-up store.
const SIZES: [usize; 2] = [100, 1_000];
/// Page size of the `read_all` loop (the projection's default batch).
const PAGE: usize = 500;
/// Appends in flight while the catch-up store is written.
const WRITERS: usize = 8;
/// Slack of the catch-up bound, bytes.
const SLACK: usize = 1 << 20;

fn mib(bytes: usize) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// Bytes that dropping a framework frees after `accounts` accounts went through it, with a
/// state cache of `capacity` (`None`: without the cache). The store outlives the framework.
async fn framework_bytes(accounts: usize, capacity: Option<usize>) -> Result<usize, BoxError> {
    let store = MemoryEventRepository::new();
    let framework = CQRSFramework::<BankAccount>::new(store.clone());
    let framework = match capacity {
        None => framework.without_state_cache(),
        Some(DEFAULT_STATE_CACHE_CAPACITY) => framework,
        Some(capacity) => framework.with_state_cache(capacity),
    };
    for _ in 0..accounts {
        let id = Uuid::new_v4();
        for done in 0..COMMANDS_PER_ACCOUNT {
            framework.dispatch(id, bank_command(done)).await?;
        }
    }
    let held = live();
    drop(framework);
    let freed = held.saturating_sub(live());
    drop(store);
    Ok(freed)
}

/// The state cache's bytes after `accounts` accounts, with `capacity`: the cached
/// framework's bytes minus the uncached one's, over the same commands.
async fn cache_bytes(accounts: usize, capacity: usize) -> Result<usize, BoxError> {
    let cached = framework_bytes(accounts, Some(capacity)).await?;
    let plain = framework_bytes(accounts, None).await?;
    Ok(cached.saturating_sub(plain))
}

/// Appends events `from + 1 ..= to` of every account in `ids`, one append per account, with
/// [`WRITERS`] appends in flight so that the store's writer commits them in groups.
async fn write(
    store: &SqliteEventRepository,
    ids: &[Uuid],
    from: usize,
    to: usize,
) -> Result<(), BoxError> {
    let mut tasks = tokio::task::JoinSet::new();
    for &id in ids {
        let mut events = Vec::with_capacity(to - from);
        for sequence in from as i64 + 1..=to as i64 {
            events.push(PersistableDomainEvent::new(
                BankAccount::NAME,
                id,
                sequence,
                &bank_event(sequence),
                serde_json::Value::Null,
            )?);
        }
        if tasks.len() >= WRITERS {
            if let Some(done) = tasks.join_next().await {
                done??;
            }
        }
        let store = store.clone();
        tasks.spawn(async move { store.append(events).await.map(drop) });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// Peak resident set (`VmHWM`) and resident set (`VmRSS`) in bytes, from `/proc/self/status`.
fn resident() -> Option<(usize, usize)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<usize> {
        let line = status.lines().find(|line| line.starts_with(name))?;
        let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

/// Resets the peak resident set to the current one (Linux: `5` into `clear_refs`).
fn reset_resident_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// What one catch-up held above its baseline.
struct CatchUp {
    /// Peak live Rust heap bytes above the baseline.
    peak: usize,
    /// Live bytes above the baseline once the catch-up returned.
    retained: isize,
    /// Peak resident set above the resident set at the start, when the kernel tells it.
    resident: Option<usize>,
    /// Events read.
    events: usize,
    /// Seconds it took.
    seconds: f64,
}

impl CatchUp {
    fn print(&self, what: &str, total: usize) {
        let resident = self.resident.map_or_else(
            || "n/a".to_owned(),
            |bytes| format!("{:.1} MiB", mib(bytes)),
        );
        println!(
            "catch_up {what} {total} events: peak {:.2} MiB above baseline, retained {:.2} MiB, \
             peak RSS +{resident}, {:.1} s ({:.0} K events/s)",
            mib(self.peak),
            self.retained as f64 / f64::from(1 << 20),
            self.seconds,
            self.events as f64 / self.seconds / 1000.0,
        );
    }
}

/// Runs `catch_up` from a fresh baseline and measures it.
async fn measured<F, Fut>(catch_up: F) -> Result<CatchUp, BoxError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<usize, BoxError>>,
{
    let resident_start = if reset_resident_peak() {
        resident().map(|(_, rss)| rss)
    } else {
        None
    };
    let baseline = reset_peak();
    let start = Instant::now();
    let events = catch_up().await?;
    let seconds = start.elapsed().as_secs_f64();
    let peak = peak().saturating_sub(baseline);
    let retained = live() as isize - baseline as isize;
    let resident =
        resident_start.and_then(|start| resident().map(|(hwm, _)| hwm.saturating_sub(start)));
    Ok(CatchUp {
        peak,
        retained,
        resident,
        events,
        seconds,
    })
}

/// Every event of `store` through `read_all` in pages of [`PAGE`], each page dropped before
/// the next is read; returns how many.
async fn read_everything(store: &SqliteEventRepository) -> Result<usize, BoxError> {
    let mut after = 0;
    let mut count = 0;
    loop {
        let page = store.read_all(after, PAGE).await?;
        let Some(last) = page.last() else {
            return Ok(count);
        };
        after = last.position;
        count += page.len();
    }
}

/// A fresh `BalanceView` projection into memory views, caught up over `store`; returns the
/// position it reached.
async fn project(store: &SqliteEventRepository) -> Result<usize, BoxError> {
    let projection = Projection::<BankAccount, BalanceView>::new(
        store.clone(),
        MemoryViewRepository::<BalanceView>::new(),
    );
    let position = projection.catch_up().await?;
    Ok(usize::try_from(position)?)
}

/// Whether `large` is within the catch-up bound of `small`; prints the verdict.
fn within(what: &str, small: &CatchUp, large: &CatchUp) -> bool {
    let bound = 2 * small.peak + SLACK;
    let ok = large.peak <= bound;
    println!(
        "bound catch_up {what}: peak at {} events {:.2} MiB <= 2 x {:.2} MiB + 1 MiB = {:.2} MiB: {}",
        large.events,
        mib(large.peak),
        mib(small.peak),
        mib(bound),
        if ok { "met" } else { "FAILED" },
    );
    ok
}

async fn run() -> Result<bool, BoxError> {
    let mut ok = true;

    // The state cache.
    let default = DEFAULT_STATE_CACHE_CAPACITY;
    let mut default_bytes = Vec::new();
    for (accounts, capacity) in [(10_000, default), (100_000, 100_000), (100_000, default)] {
        let bytes = cache_bytes(accounts, capacity).await?;
        let cached = accounts.min(2 * capacity);
        println!(
            "state_cache accounts {accounts} capacity {capacity}: {:.2} MiB, {:.0} bytes per \
             cached aggregate (at most {cached} cached)",
            mib(bytes),
            bytes as f64 / cached as f64,
        );
        if capacity == default {
            default_bytes.push(bytes);
        }
    }
    if let [at_capacity, beyond] = default_bytes[..] {
        let bound = at_capacity * 22 / 10;
        let met = beyond <= bound;
        println!(
            "bound state_cache default: {:.2} MiB over 100,000 accounts <= 2.2 x {:.2} MiB over \
             10,000 = {:.2} MiB: {}",
            mib(beyond),
            mib(at_capacity),
            mib(bound),
            if met { "met" } else { "FAILED" },
        );
        ok &= met;
    }

    // Catch-up as the store grows.
    let path = temp_sqlite("memory");
    let result = catch_up_figures(&path).await;
    remove_sqlite(&path);
    Ok(ok && result?)
}

async fn catch_up_figures(path: &Path) -> Result<bool, BoxError> {
    // `synchronous=NORMAL`: the file is written once, before anything is measured; how it
    // was synced does not change how it is read.
    let options = SqliteOptions::default().durability(Durability::Normal);
    let store = SqliteEventRepository::connect(&path.display().to_string(), options).await?;
    store.migrate().await?;
    let ids: Vec<Uuid> = (0..ACCOUNTS).map(|_| Uuid::new_v4()).collect();
    let mut written = 0;
    let mut figures = Vec::new();
    for per_account in SIZES {
        let start = Instant::now();
        write(&store, &ids, written, per_account).await?;
        println!(
            "wrote {} events in {:.1} s ({} per account)",
            (per_account - written) * ACCOUNTS,
            start.elapsed().as_secs_f64(),
            per_account,
        );
        written = per_account;
        let total = per_account * ACCOUNTS;
        let read = measured(|| read_everything(&store)).await?;
        read.print("read_all", total);
        let projected = measured(|| project(&store)).await?;
        projected.print("projection", total);
        if read.events != total || projected.events != total {
            return Err(format!(
                "caught up over {} and {} events of {total}",
                read.events, projected.events
            )
            .into());
        }
        figures.push((read, projected));
    }
    let [(read_small, projected_small), (read_large, projected_large)] = &figures[..] else {
        return Err("two store sizes expected".into());
    };
    let read_ok = within("read_all", read_small, read_large);
    let projected_ok = within("projection", projected_small, projected_large);
    drop(store);
    Ok(read_ok && projected_ok)
}

fn main() -> ExitCode {
    if !std::env::args().any(|argument| argument == "--bench") {
        println!("memory: run with `cargo bench -p cqrs-benches --bench memory`");
        return ExitCode::SUCCESS;
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("memory: no Tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("memory: a bound failed");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("memory: {error}");
            ExitCode::FAILURE
        }
    }
}
