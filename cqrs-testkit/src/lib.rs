//! Given/when/then fixtures for `cqrs`.
