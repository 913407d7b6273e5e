use cqrs::doc::Counter;

#[derive(Debug, Clone, cqrs::ProcessInput)]
enum Input {
    Counter(String),
}

fn main() {
    let _ = Counter;
}
