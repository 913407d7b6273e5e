#[derive(Debug, Clone, cqrs::ProcessInput)]
struct Input {
    event: cqrs::doc::CounterEvent,
}

fn main() {}
