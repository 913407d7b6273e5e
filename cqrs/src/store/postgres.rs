//! Event, view and snapshot stores on PostgreSQL (feature `postgres`).
