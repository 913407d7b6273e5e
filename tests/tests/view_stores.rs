//! Reading views on every view store: one call by id, pages in id order, and a view whose
//! rows are keyed by something else than the aggregate, updated several rows per event.
//! The PostgreSQL cases need `CQRS_POSTGRES_URL` and skip themselves without it.

mod common;

use std::time::Duration;

use common::ledger::{Ledger, LedgerError, LedgerEvent};
use cqrs::sqlx::postgres::PgPoolOptions;
use cqrs::sqlx::Executor;
use cqrs::{
    CQRSFramework, EventEnvelope, EventRepository, MemoryEventRepository, MemoryViewRepository,
    PostgresEventRepository, Projection, SqliteEventRepository, View, ViewRepository,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Rows keyed by the parity of each deposit, plus one row for all of them: every deposit
/// updates two rows, and each row records the id it was applied under.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct ByParity {
    deposits: u64,
    total: u64,
    key: String,
}

impl View<Ledger> for ByParity {
    const TABLE_NAME: &'static str = "by_parity";
    const VERSION: u64 = 1;

    fn view_ids(envelope: &EventEnvelope<LedgerEvent>) -> impl IntoIterator<Item = String> {
        let LedgerEvent::Deposited { amount } = envelope.event;
        let parity = if amount % 2 == 0 { "even" } else { "odd" };
        [parity.to_owned(), "all".to_owned()]
    }

    fn handle_event_for(
        &mut self,
        view_id: &str,
        envelope: &EventEnvelope<LedgerEvent>,
    ) -> Result<(), LedgerError> {
        let LedgerEvent::Deposited { amount } = envelope.event;
        self.key = view_id.to_owned();
        self.deposits += 1;
        self.total += amount;
        Ok(())
    }

    fn handle_event(&mut self, _: &EventEnvelope<LedgerEvent>) -> Result<(), LedgerError> {
        unreachable!("every event goes through handle_event_for")
    }
}

/// One row per ledger, holding its sum.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Sum {
    sum: u64,
}

impl View<Ledger> for Sum {
    const TABLE_NAME: &'static str = "ledger_sum";
    const VERSION: u64 = 1;

    fn handle_event(&mut self, envelope: &EventEnvelope<LedgerEvent>) -> Result<(), LedgerError> {
        let LedgerEvent::Deposited { amount } = envelope.event;
        self.sum += amount;
        Ok(())
    }
}

const LEDGERS: usize = 7;

/// Deposits 1, 2, 3 on one ledger and then 10 on each of `LEDGERS` more; returns those ids.
async fn fill(store: impl EventRepository + 'static) -> Vec<Uuid> {
    let framework = CQRSFramework::<Ledger>::new(store);
    framework
        .dispatch(Uuid::new_v4(), vec![1, 2, 3])
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..LEDGERS {
        let id = Uuid::new_v4();
        framework.dispatch(id, vec![10]).await.unwrap();
        ids.push(id);
    }
    ids
}

/// Every row of `views`, read in pages of 3, checking each page's size and order.
async fn list_all<R: ViewRepository<Ledger, Sum>>(views: &R) -> Vec<(String, Sum)> {
    let mut listed: Vec<(String, Sum)> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = views.list(after.as_deref(), 3).await.unwrap();
        if page.is_empty() {
            return listed;
        }
        assert!(
            page.len() <= 3,
            "a page of {} rows with limit 3",
            page.len()
        );
        for window in page.windows(2) {
            assert!(window[0].0 < window[1].0, "page out of order: {page:?}");
        }
        if let (Some(last), Some(first)) = (listed.last(), page.first()) {
            assert!(
                last.0 < first.0,
                "page starts at {} after {}",
                first.0,
                last.0
            );
        }
        after = page.last().map(|(id, _)| id.clone());
        listed.extend(page);
    }
}

/// What every view store must show after [`fill`] and both projections caught up.
async fn check_reads<S, P>(parity: &P, sums: &S, ledgers: &[Uuid])
where
    P: ViewRepository<Ledger, ByParity>,
    S: ViewRepository<Ledger, Sum>,
{
    let row = |key: &str, deposits, total| ByParity {
        deposits,
        total,
        key: key.to_owned(),
    };
    let ten = 10 * LEDGERS as u64;
    assert_eq!(parity.load("odd").await.unwrap(), Some(row("odd", 2, 4)));
    assert_eq!(
        parity.load("even").await.unwrap(),
        Some(row("even", 1 + LEDGERS as u64, 2 + ten))
    );
    assert_eq!(
        parity.load("all").await.unwrap(),
        Some(row("all", 3 + LEDGERS as u64, 6 + ten))
    );
    assert_eq!(parity.load("none").await.unwrap(), None);

    let listed = list_all(sums).await;
    assert_eq!(listed.len(), LEDGERS + 1);
    let mut expected: Vec<String> = ledgers.iter().map(Uuid::to_string).collect();
    expected.sort();
    let tens: Vec<String> = listed
        .iter()
        .filter(|(_, sum)| sum.sum == 10)
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(
        tens, expected,
        "the rows of sum 10 are the ledgers of one deposit"
    );
    assert!(listed.iter().any(|(_, sum)| sum.sum == 6));
    assert!(
        sums.list(Some("~"), 10).await.unwrap().is_empty(),
        "nothing after every id"
    );
}

#[tokio::test]
async fn memory_view_store_reads() {
    let store = MemoryEventRepository::new();
    let ledgers = fill(store.clone()).await;
    let parity = MemoryViewRepository::<ByParity>::new();
    let sums = MemoryViewRepository::<Sum>::new();
    Projection::<Ledger, ByParity>::new(store.clone(), parity.clone())
        .catch_up()
        .await
        .unwrap();
    Projection::<Ledger, Sum>::new(store, sums.clone())
        .catch_up()
        .await
        .unwrap();
    check_reads(&parity, &sums, &ledgers).await;
    // The store's own methods, with no trait in scope and no aggregate named.
    let id = ledgers[0].to_string();
    assert_eq!(sums.load(&id).await.unwrap(), Some(Sum { sum: 10 }));
    assert_eq!(sums.list(None, 100).await.unwrap().len(), LEDGERS + 1);
}

#[tokio::test]
async fn sqlite_view_store_reads() {
    let dir = std::env::temp_dir().join(format!("cqrs-views-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let store = SqliteEventRepository::open(dir.join("views.sqlite"))
        .await
        .unwrap();
    let ledgers = fill(store.clone()).await;
    Projection::<Ledger, ByParity>::new(store.clone(), store.views())
        .catch_up()
        .await
        .unwrap();
    Projection::<Ledger, Sum>::new(store.clone(), store.views())
        .catch_up()
        .await
        .unwrap();
    check_reads(&store.views::<ByParity>(), &store.views::<Sum>(), &ledgers).await;
    let sums = store.views::<Sum>();
    let id = ledgers[0].to_string();
    assert_eq!(sums.load(&id).await.unwrap(), Some(Sum { sum: 10 }));
    assert_eq!(sums.list(None, 100).await.unwrap().len(), LEDGERS + 1);
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn postgres_view_store_reads() {
    let Some(url) = cqrs_tests::server_url(
        "CQRS_POSTGRES_URL",
        "postgres view store",
        "postgres://postgres@127.0.0.1:5432/test",
    ) else {
        return;
    };
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(30))
        .connect(&url)
        .await
        .unwrap_or_else(|e| panic!("CQRS_POSTGRES_URL is set but the server is unreachable: {e}"));
    let schema = format!("t_{}", Uuid::new_v4().simple());
    let store = PostgresEventRepository::from_pool(pool)
        .with_schema(&schema)
        .unwrap();
    store.migrate().await.unwrap();

    let ledgers = fill(store.clone()).await;
    Projection::<Ledger, ByParity>::new(store.clone(), store.views())
        .catch_up()
        .await
        .unwrap();
    Projection::<Ledger, Sum>::new(store.clone(), store.views())
        .catch_up()
        .await
        .unwrap();
    check_reads(&store.views::<ByParity>(), &store.views::<Sum>(), &ledgers).await;
    let sums = store.views::<Sum>();
    let id = ledgers[0].to_string();
    assert_eq!(sums.load(&id).await.unwrap(), Some(Sum { sum: 10 }));
    assert_eq!(sums.list(None, 100).await.unwrap().len(), LEDGERS + 1);

    let drop = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
    store.pool().execute(drop.as_str()).await.unwrap();
}
