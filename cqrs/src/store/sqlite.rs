//! Event, view and snapshot stores on SQLite (feature `sqlite`).
