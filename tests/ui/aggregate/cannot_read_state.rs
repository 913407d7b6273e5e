use cqrs::{Aggregate, CQRSError};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, cqrs::DomainEvent)]
enum Event {
    Happened,
}

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct Error(#[from] CQRSError);

#[derive(Debug, Default)]
struct Thing;

#[cqrs::aggregate(name = "thing")]
impl Aggregate for Thing {
    type Commands = ();

    async fn handle_command(
        &self,
        _id: Uuid,
        _state: &Self::State,
        _command: (),
    ) -> Result<Vec<Event>, Error> {
        Ok(vec![Event::Happened])
    }

    fn handle_event(&self, _state: &mut Self::State, _event: &Event) {}
}

fn main() {}
