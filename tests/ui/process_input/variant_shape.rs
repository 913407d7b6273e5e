use cqrs::doc::{Counter, CounterEvent};

#[derive(Debug, Clone, cqrs::ProcessInput)]
enum Input {
    Counter { event: CounterEvent },
}

fn main() {
    let _ = Counter;
}
