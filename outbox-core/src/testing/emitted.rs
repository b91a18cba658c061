//! What a transaction emitted, read back from the outbox and the scheduled
//! events' table, decoded through the registry.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder};
use uuid::Uuid;

use crate::entity::{outbox_message, outbox_scheduled};
use crate::{Error, OutboxEvent};

/// An event of type `E` as `emit!` committed it: what the relay will send.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Emitted<E> {
    /// Its id (`Nats-Msg-Id`, the inbox key), as `emit!` returned it.
    pub id: Uuid,
    /// The event, decoded.
    pub event: E,
    /// Its subject (without a publisher's namespace).
    pub subject: String,
    /// Its partition key (`Outbox-Partition-Key`), if keyed.
    pub key: Option<String>,
    /// The headers the message will carry besides the framework's: those
    /// given to `emit!(event, headers = ..)`, and the trace context.
    pub headers: BTreeMap<String, String>,
    /// For an event emitted for later (`at = ..` / `after = ..`), when it is
    /// due; until then it waits in `outbox_scheduled`, not in the outbox.
    pub deliver_at: Option<DateTime<Utc>>,
}

/// The events of type `E` (every event type it carries, at `E::VERSION`)
/// that are in the outbox — committed and not yet delivered — decoded, in
/// emit order. Events scheduled for later are not there until they come
/// due: [`emitted_in_full`] has them too.
///
/// Fails if one does not decode into `E`, or if `E` is not in the registry.
pub async fn emitted<E: OutboxEvent>(db: &impl ConnectionTrait) -> Result<Vec<E>, Error> {
    let events = emitted_in_full::<E>(db).await?;
    Ok((events.into_iter())
        .filter(|emitted| emitted.deliver_at.is_none())
        .map(|emitted| emitted.event)
        .collect())
}

/// The events of type `E` in the outbox (not delivered yet) and those
/// scheduled for later, each with its id, subject, key, headers and due
/// time, in emit order.
///
/// ```no_run
/// # async fn run(db: sea_orm::DatabaseConnection) -> Result<(), outbox_core::Error> {
/// # #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize, outbox_core::OutboxEvent)]
/// # #[outbox(exchange = "orders", routing_key = "created")]
/// # struct OrderCreated { order_id: i64 }
/// let all = outbox_core::testing::emitted_in_full::<OrderCreated>(&db).await?;
/// assert_eq!(all[0].headers["Tenant-Id"], "acme");
/// assert!(all[1].deliver_at.is_some(), "the reminder waits for its time");
/// # Ok(()) }
/// ```
pub async fn emitted_in_full<E: OutboxEvent>(
    db: &impl ConnectionTrait,
) -> Result<Vec<Emitted<E>>, Error> {
    let types = E::EVENT_TYPES.iter().copied();
    let version = i32::from(E::VERSION);
    let now = outbox_message::Entity::find()
        .filter(outbox_message::Column::EventType.is_in(types.clone()))
        .filter(outbox_message::Column::EventVersion.eq(version))
        .filter(outbox_message::Column::DeliveredAt.is_null())
        .all(db)
        .await?;
    let later = outbox_scheduled::Entity::find()
        .filter(outbox_scheduled::Column::EventType.is_in(types))
        .filter(outbox_scheduled::Column::EventVersion.eq(version))
        .order_by_asc(outbox_scheduled::Column::Id)
        .all(db)
        .await?;
    let rows = (now.into_iter())
        .map(|row| Row {
            id: row.id,
            event_type: row.event_type,
            subject: row.subject,
            key: row.partition_key,
            payload: row.payload,
            headers: row.headers,
            deliver_at: None,
        })
        .chain(later.into_iter().map(|row| Row {
            id: row.id,
            event_type: row.event_type,
            subject: row.subject,
            key: row.partition_key,
            payload: row.payload,
            headers: row.headers,
            deliver_at: Some(row.deliver_at),
        }));
    let mut events: Vec<Emitted<E>> = rows.map(Row::decode).collect::<Result<_, _>>()?;
    events.sort_by_key(|emitted| emitted.id);
    Ok(events)
}

/// The columns both tables share that [`Emitted`] is made of.
struct Row {
    id: Uuid,
    event_type: String,
    subject: String,
    key: Option<String>,
    payload: Vec<u8>,
    headers: Option<String>,
    deliver_at: Option<DateTime<Utc>>,
}

impl Row {
    fn decode<E: OutboxEvent>(self) -> Result<Emitted<E>, Error> {
        let not_registered = || Error::NotRegistered(std::any::type_name::<E>());
        let descriptor =
            (crate::registry().get(&self.event_type, E::VERSION)).ok_or_else(not_registered)?;
        let event = (descriptor.decode)(&self.payload)?
            .downcast::<E>()
            .map_err(|_| not_registered())?;
        let headers = match &self.headers {
            Some(json) => serde_json::from_str(json).map_err(|source| Error::Decode {
                event_type: self.event_type.clone(),
                version: E::VERSION,
                source,
            })?,
            None => BTreeMap::new(),
        };
        Ok(Emitted {
            id: self.id,
            event: *event,
            subject: self.subject,
            key: self.key,
            headers,
            deliver_at: self.deliver_at,
        })
    }
}
