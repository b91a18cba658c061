//! SeaORM entities of the outbox tables, for reading them from application code and tools.

pub mod consumer_member;
pub mod consumer_partition;
pub mod inbox_dead_letter;
pub mod inbox_message;
pub mod outbox_dead_letter;
pub mod outbox_message;
pub mod outbox_scheduled;
