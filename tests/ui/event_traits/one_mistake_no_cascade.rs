use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event {
    #[event(name = "Opened", verison = "1")]
    Opened,
}

// The stub impl emitted beside the error keeps these uses free of further errors.
fn store<E: cqrs::DomainEvent>(_event: &E) -> &'static str {
    E::EVENT_TYPES.first().map_or("", |t| t.name)
}

fn main() {
    let _ = store(&Event::Opened);
    let _ = cqrs::DomainEvent::persisted_event_name(&Event::Opened);
}
