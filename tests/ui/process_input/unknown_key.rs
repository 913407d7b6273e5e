use cqrs::doc::{Counter, CounterEvent};

#[derive(Debug, Clone, cqrs::ProcessInput)]
enum Input {
    #[input(aggregat = Counter)]
    Counting(CounterEvent),
}

fn main() {
    let _ = Counter;
}
