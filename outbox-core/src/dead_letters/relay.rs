//! The relay's dead letters (`outbox_dead_letters`): events it gave up
//! publishing.
//!
//! A replayed event goes back to the outbox with its original id and its
//! attempts reset. Its id keeps it where it was in its key's order: the
//! relay delivers a key's pending events by id, so it goes out before every
//! event of its key committed after the replay (and before any of its key
//! still pending from before). And JetStream, which deduplicates by that id,
//! drops it if it had stored the event after all.

use chrono::Utc;
use sea_orm::{ActiveValue::Set, DatabaseConnection, EntityTrait, TransactionTrait};
use uuid::Uuid;

use super::table::{self, CHUNK};
use super::{DeadLetterError, Selection};
use crate::entity::{outbox_dead_letter, outbox_message};

/// Moves the selected dead letters back to the outbox, attempts reset, in
/// one transaction; returns their ids in id order.
pub async fn replay(
    db: &DatabaseConnection,
    selection: &Selection,
) -> Result<Vec<Uuid>, DeadLetterError> {
    let txn = db.begin().await?;
    let letters = table::selected::<outbox_dead_letter::Entity>(&txn, selection).await?;
    let now = Utc::now();
    for chunk in letters.chunks(CHUNK) {
        let rows = chunk.iter().map(|letter| outbox_message::ActiveModel {
            id: Set(letter.id),
            event_type: Set(letter.event_type.clone()),
            event_version: Set(letter.event_version),
            exchange: Set(letter.exchange.clone()),
            subject: Set(letter.subject.clone()),
            partition_key: Set(letter.partition_key.clone()),
            payload: Set(letter.payload.clone()),
            headers: Set(letter.headers.clone()),
            content_type: Set(letter.content_type.clone()),
            created_at: Set(letter.created_at),
            attempts: Set(0),
            next_attempt_at: Set(now),
            last_error: Set(None),
            delivered_at: Set(None),
        });
        outbox_message::Entity::insert_many(rows).exec(&txn).await?;
    }
    let ids: Vec<Uuid> = letters.iter().map(|letter| letter.id).collect();
    table::delete::<outbox_dead_letter::Entity>(&txn, &ids).await?;
    txn.commit().await?;
    Ok(ids)
}
