//! Which dead letters an action applies to.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, Condition};
use uuid::Uuid;

/// The dead letters an action applies to: one by id, or every one matching
/// all the filters given (event type, failure time, consumer).
///
/// ```
/// use outbox_core::dead_letters::Selection;
///
/// let yesterday = chrono::Utc::now() - chrono::Duration::days(1);
/// let recent_orders = Selection::all().event_type("OrderCreated").failed_after(yesterday);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    id: Option<Uuid>,
    event_type: Option<String>,
    failed_after: Option<DateTime<Utc>>,
    failed_before: Option<DateTime<Utc>>,
    consumer: Option<String>,
}

impl Selection {
    /// Every dead letter; narrow it with the filters.
    pub fn all() -> Self {
        Self::default()
    }

    /// The dead letter with this id (an error if there is none): a dead
    /// letter's own id, or the id of the event it holds. The relay's dead
    /// letters are keyed by their event's id; a consumer's have ids of their
    /// own, new at each failed replay, so the event's id is the one that
    /// lasts (and selects that event's dead letter at every consumer).
    pub fn id(id: Uuid) -> Self {
        Self {
            id: Some(id),
            ..Self::default()
        }
    }

    /// Only events of this type (`Outbox-Event-Type`).
    pub fn event_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }

    /// Only those dead-lettered at or after `at`.
    pub fn failed_after(mut self, at: DateTime<Utc>) -> Self {
        self.failed_after = Some(at);
        self
    }

    /// Only those dead-lettered before `at`.
    pub fn failed_before(mut self, at: DateTime<Utc>) -> Self {
        self.failed_before = Some(at);
        self
    }

    /// Only this consumer's. The relay's table has no consumer: there this
    /// selects nothing.
    pub fn consumer(mut self, consumer: impl Into<String>) -> Self {
        self.consumer = Some(consumer.into());
        self
    }

    /// The selected id, whose absence is an error rather than an empty result.
    pub(super) fn by_id(&self) -> Option<Uuid> {
        self.id
    }

    /// The condition on a dead-letter table with these columns.
    pub(super) fn condition<C: ColumnTrait>(
        &self,
        id: C,
        event_id: Option<C>,
        event_type: C,
        failed_at: C,
        consumer: Option<C>,
    ) -> Condition {
        let mut condition = Condition::all();
        if let Some(value) = self.id {
            condition = condition.add(match event_id {
                Some(event_id) => Condition::any().add(id.eq(value)).add(event_id.eq(value)),
                None => Condition::all().add(id.eq(value)),
            });
        }
        if let Some(value) = &self.event_type {
            condition = condition.add(event_type.eq(value.clone()));
        }
        if let Some(at) = self.failed_after {
            condition = condition.add(failed_at.gte(at));
        }
        if let Some(at) = self.failed_before {
            condition = condition.add(failed_at.lt(at));
        }
        match (consumer, &self.consumer) {
            (Some(column), Some(value)) => condition.add(column.eq(value.clone())),
            // The relay's table has no consumer: such a selection selects nothing.
            (None, Some(_)) => condition.add(Expr::value(false)),
            (_, None) => condition,
        }
    }
}
