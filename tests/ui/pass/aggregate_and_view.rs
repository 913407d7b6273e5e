// An aggregate and a view written with the attribute macros, run through the in-memory store.
use cqrs::{Aggregate, CQRSError, CQRSFramework, EventEnvelope, MemoryEventRepository, View};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, cqrs::DomainEvent)]
enum CounterEvent {
    #[event(name = "CounterIncremented")]
    Incremented { by: u32 },
}

#[derive(Debug, Clone)]
enum CounterCommand {
    Increment { by: u32 },
}

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct CounterError(#[from] CQRSError);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CounterState {
    value: u32,
}

#[derive(Default)]
struct Counter;

#[cqrs::aggregate(name = "counter")]
impl Aggregate for Counter {
    async fn handle_command(
        &self,
        _id: Uuid,
        _state: &CounterState,
        command: CounterCommand,
    ) -> Result<Vec<CounterEvent>, CounterError> {
        let CounterCommand::Increment { by } = command;
        Ok(vec![CounterEvent::Incremented { by }])
    }

    fn handle_event(&self, state: &mut CounterState, event: &CounterEvent) {
        let CounterEvent::Incremented { by } = event;
        state.value += by;
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CounterTotal {
    total: u64,
}

#[cqrs::view(table = "counter_total", version = 2)]
impl View<Counter> for CounterTotal {
    fn handle_event(&mut self, envelope: &EventEnvelope<CounterEvent>) -> Result<(), CounterError> {
        let CounterEvent::Incremented { by } = envelope.event;
        self.total += u64::from(by);
        Ok(())
    }
}

fn main() {
    assert_eq!(Counter::NAME, "counter");
    assert_eq!(<CounterTotal as View<Counter>>::TABLE_NAME, "counter_total");
    assert_eq!(<CounterTotal as View<Counter>>::VERSION, 2);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = MemoryEventRepository::new();
        let framework = CQRSFramework::<Counter>::new(store.clone());
        let id = Uuid::new_v4();
        framework
            .dispatch(id, CounterCommand::Increment { by: 2 })
            .await
            .unwrap();
        framework
            .dispatch(id, CounterCommand::Increment { by: 3 })
            .await
            .unwrap();
        assert_eq!(framework.load(id).await.unwrap().value, 5);
        let rows = cqrs::EventRepository::load_events(&store, "counter", id, 0)
            .await
            .unwrap();
        assert_eq!(rows.len(), 2);
        assert!(rows
            .iter()
            .all(|row| row.event_type == "CounterIncremented" && row.event_version == "1"));
    });
}
