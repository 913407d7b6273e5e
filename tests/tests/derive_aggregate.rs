//! `#[cqrs::aggregate]` and `#[cqrs::view]` at run time: the name written once in the
//! attribute is what the framework stores, the associated types read from `handle_command`
//! are the ones it uses, and a view's table and version come from `#[view]`.

use cqrs::{
    Aggregate, CQRSError, CQRSFramework, DomainEvent, EventEnvelope, EventRepository,
    MemoryEventRepository, MemoryViewRepository, Projection, View, ViewRepository,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[serde(tag = "type")]
enum TabEvent {
    #[event(name = "TabOpened")]
    Opened { table: u32 },
    #[event(name = "DrinkServed", version = "2")]
    Served { drink: String, cents: u64 },
}

#[derive(Debug, Clone, PartialEq)]
enum TabCommand {
    Open { table: u32 },
    Serve { drink: String, cents: u64 },
}

#[derive(Debug, thiserror::Error)]
enum TabError {
    #[error("tab not open")]
    NotOpen,
    #[error(transparent)]
    Framework(#[from] CQRSError),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct TabState {
    open: bool,
    owed: u64,
}

#[derive(Debug, Default)]
struct Tab;

/// Everything but the two methods comes from the attribute and the signature.
#[cqrs::aggregate(name = "tab")]
impl Aggregate for Tab {
    async fn handle_command(
        &self,
        _id: Uuid,
        state: &TabState,
        command: TabCommand,
    ) -> Result<Vec<TabEvent>, TabError> {
        match command {
            TabCommand::Open { table } => Ok(vec![TabEvent::Opened { table }]),
            TabCommand::Serve { .. } if !state.open => Err(TabError::NotOpen),
            TabCommand::Serve { drink, cents } => Ok(vec![TabEvent::Served { drink, cents }]),
        }
    }

    fn handle_event(&self, state: &mut TabState, event: &TabEvent) {
        match event {
            TabEvent::Opened { .. } => state.open = true,
            TabEvent::Served { cents, .. } => state.owed += cents,
        }
    }
}

/// Declared types win over the signature; the name defaults to the type's name.
#[derive(Debug, Default)]
struct SecondTab;

type TabResult<T> = Result<T, TabError>;

#[cqrs::aggregate]
impl Aggregate for SecondTab {
    type Events = TabEvent;
    type Errors = TabError;

    async fn handle_command(
        &self,
        _id: Uuid,
        _state: &TabState,
        _command: TabCommand,
    ) -> TabResult<Vec<TabEvent>> {
        Ok(vec![])
    }

    fn handle_event(&self, _state: &mut TabState, _event: &TabEvent) {}
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct TabTotal {
    drinks: u64,
    owed: u64,
}

#[cqrs::view(table = "tab_total", version = 3)]
impl View<Tab> for TabTotal {
    fn handle_event(&mut self, envelope: &EventEnvelope<TabEvent>) -> Result<(), TabError> {
        if let TabEvent::Served { cents, .. } = envelope.event {
            self.drinks += 1;
            self.owed += cents;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct DrinkLogView {
    drinks: Vec<String>,
}

/// Defaults: the table is the type name in snake case, version 1; `view_id` stays
/// overridable.
#[cqrs::view]
impl View<Tab> for DrinkLogView {
    fn view_id(_envelope: &EventEnvelope<TabEvent>) -> Option<String> {
        Some("all".to_owned())
    }

    fn handle_event(&mut self, envelope: &EventEnvelope<TabEvent>) -> Result<(), TabError> {
        if let TabEvent::Served { drink, .. } = &envelope.event {
            self.drinks.push(drink.clone());
        }
        Ok(())
    }
}

#[test]
fn the_attribute_writes_the_name_and_reads_the_types() {
    assert_eq!(Tab::NAME, "tab");
    assert_eq!(SecondTab::NAME, "SecondTab");
    // The inferred associated types are the signature's.
    let _: fn(<Tab as Aggregate>::State) -> TabState = |state| state;
    let _: fn(<Tab as Aggregate>::Commands) -> TabCommand = |command| command;
    let _: fn(<Tab as Aggregate>::Events) -> TabEvent = |event| event;
    let _: fn(<Tab as Aggregate>::Errors) -> TabError = |error| error;
    let _: fn(<SecondTab as Aggregate>::State) -> TabState = |state| state;
    assert_eq!(<Tab as Aggregate>::Events::EVENT_TYPES.len(), 2);
}

#[test]
fn the_view_attribute_writes_table_and_version() {
    assert_eq!(<TabTotal as View<Tab>>::TABLE_NAME, "tab_total");
    assert_eq!(<TabTotal as View<Tab>>::VERSION, 3);
    assert_eq!(<DrinkLogView as View<Tab>>::TABLE_NAME, "drink_log_view");
    assert_eq!(<DrinkLogView as View<Tab>>::VERSION, 1);
}

#[tokio::test]
async fn dispatch_stores_the_names_and_a_projection_reads_them_back() {
    let store = MemoryEventRepository::new();
    let framework = CQRSFramework::<Tab>::new(store.clone());
    let id = Uuid::new_v4();

    assert!(matches!(
        framework
            .dispatch(
                id,
                TabCommand::Serve {
                    drink: "tea".into(),
                    cents: 3
                }
            )
            .await,
        Err(TabError::NotOpen)
    ));
    framework
        .dispatch(id, TabCommand::Open { table: 4 })
        .await
        .unwrap();
    framework
        .dispatch(
            id,
            TabCommand::Serve {
                drink: "tea".into(),
                cents: 250,
            },
        )
        .await
        .unwrap();

    let rows = store.load_events("tab", id, 0).await.unwrap();
    let stored: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|row| {
            (
                row.aggregate_type.as_str(),
                row.event_type.as_str(),
                row.event_version.as_str(),
            )
        })
        .collect();
    assert_eq!(
        stored,
        [("tab", "TabOpened", "1"), ("tab", "DrinkServed", "2")]
    );
    assert_eq!(
        framework.load(id).await.unwrap(),
        TabState {
            open: true,
            owed: 250
        }
    );

    let totals = MemoryViewRepository::<TabTotal>::new();
    Projection::<Tab, TabTotal>::new(store.clone(), totals.clone())
        .catch_up()
        .await
        .unwrap();
    let total = ViewRepository::<Tab, _>::load(&totals, &id.to_string())
        .await
        .unwrap();
    assert_eq!(
        total,
        Some(TabTotal {
            drinks: 1,
            owed: 250
        })
    );

    let logs = MemoryViewRepository::<DrinkLogView>::new();
    Projection::<Tab, DrinkLogView>::new(store, logs.clone())
        .catch_up()
        .await
        .unwrap();
    let log = ViewRepository::<Tab, _>::load(&logs, "all").await.unwrap();
    assert_eq!(log.map(|log| log.drinks), Some(vec!["tea".to_owned()]));
}
