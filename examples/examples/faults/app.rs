//! The application under test: orders that step through states, one
//! `#[transactional]` call per step, and a consumer that applies step `seq`
//! only on top of `seq - 1` (recording every time it finds anything else).

use std::sync::OnceLock;
use std::time::Duration;

use outbox_core::consumer::group::{GroupConfig, partition_of};
use outbox_core::inbox::Metadata;
use outbox_core::uuid::Uuid;
use outbox_core::{OutboxEvent, emit, transactional};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, Statement, Value,
};

/// Step `seq` of an order; the order's steps must take effect in order.
#[derive(Debug, serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "faults", routing_key = "order.{order_id}.step", key = order_id)]
pub(crate) struct OrderStep {
    pub(crate) order_id: i64,
    pub(crate) seq: i32,
}

/// An unkeyed event: no order, but once each.
#[derive(Debug, serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(exchange = "faults", routing_key = "audit")]
pub(crate) struct Audit {
    pub(crate) order_id: i64,
    pub(crate) seq: i32,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum AppError {
    #[error(transparent)]
    Outbox(#[from] outbox_core::Error),
    #[error("rolled back on purpose")]
    RolledBack(Uuid),
    #[error("injected handler failure")]
    Injected,
}

impl From<DbErr> for AppError {
    fn from(error: DbErr) -> Self {
        Self::Outbox(error.into())
    }
}

/// A statement written with `?` placeholders, numbered for PostgreSQL.
pub(crate) fn sql(backend: DbBackend, text: &str, values: Vec<Value>) -> Statement {
    let text = match backend {
        DbBackend::Postgres => {
            let mut numbered = String::with_capacity(text.len() + 8);
            let mut n = 0;
            for c in text.chars() {
                if c == '?' {
                    n += 1;
                    numbered.push_str(&format!("${n}"));
                } else {
                    numbered.push(c);
                }
            }
            numbered
        }
        _ => text.to_owned(),
    };
    Statement::from_sql_and_values(backend, text, values)
}

/// The application's tables: what the producer committed (and rolled back),
/// and what the consumer applied.
pub(crate) async fn create_tables(db: &DatabaseConnection) -> Result<(), DbErr> {
    // Event ids as text, bound the same way on every database.
    let uuid = "VARCHAR(36)";
    let id = match db.get_database_backend() {
        DbBackend::Postgres => "BIGSERIAL PRIMARY KEY",
        _ => "BIGINT AUTO_INCREMENT PRIMARY KEY",
    };
    for table in [
        format!(
            "CREATE TABLE produced (event_id {uuid} PRIMARY KEY, keyed BOOLEAN NOT NULL, order_id BIGINT NOT NULL, seq INT NOT NULL)"
        ),
        format!("CREATE TABLE ghosts (event_id {uuid} PRIMARY KEY)"),
        "CREATE TABLE order_state (order_id BIGINT PRIMARY KEY, step INT NOT NULL)".to_owned(),
        // A group's effects: their partition, and its owner when the effect
        // committed (`owner_seen`, written by `EFFECT_OWNER`).
        format!(
            "CREATE TABLE effects (id {id}, event_id {uuid} NOT NULL, order_id BIGINT NOT NULL, seq INT NOT NULL, applied_by VARCHAR(64) NOT NULL, partition_index INT, owner_seen VARCHAR(255))"
        ),
        // The consumer processes' lives, for the group's shares.
        "CREATE TABLE lives (applied_by VARCHAR(64) PRIMARY KEY, started_ms BIGINT NOT NULL, last_seen_ms BIGINT NOT NULL)".to_owned(),
        format!(
            "CREATE TABLE violations (id {id}, event_id {uuid} NOT NULL, order_id BIGINT NOT NULL, seq INT NOT NULL, found INT NOT NULL)"
        ),
    ] {
        db.execute_unprepared(&table).await?;
    }
    if db.get_database_backend() == DbBackend::Postgres {
        for statement in EFFECT_OWNER {
            db.execute_unprepared(statement).await?;
        }
    }
    Ok(())
}

/// Records each group effect's partition owner at its transaction's commit
/// (a deferred trigger runs as the commit starts, after the consumer's
/// fence), so that an effect committed by a member that lost the
/// partition shows. Only on PostgreSQL, where the group scenarios run;
/// an observer of the test, not part of the consumer.
const EFFECT_OWNER: [&str; 2] = [
    "CREATE FUNCTION effect_owner() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
     UPDATE effects SET owner_seen = (SELECT owner FROM outbox_consumer_partitions \
     WHERE consumer = 'faults' AND partition_index = NEW.partition_index) WHERE id = NEW.id; \
     RETURN NULL; END $$",
    "CREATE CONSTRAINT TRIGGER effect_owner AFTER INSERT ON effects \
     DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.partition_index IS NOT NULL) \
     EXECUTE FUNCTION effect_owner()",
];

/// How long after its step a scheduled audit event is due.
const SCHEDULED_AFTER: Duration = Duration::from_millis(700);

/// Step `seq` of `order_id`: the event, its record and (sometimes) an unkeyed
/// audit event, delivered at once or scheduled, commit together; with
/// `roll_back`, none of them does.
#[transactional]
pub(crate) async fn advance(
    db: &DatabaseConnection,
    order_id: i64,
    seq: i32,
    audit: bool,
    roll_back: bool,
) -> Result<(), AppError> {
    let backend = db.get_database_backend();
    let id = emit!(OrderStep { order_id, seq });
    if roll_back {
        return Err(AppError::RolledBack(id));
    }
    let record = "INSERT INTO produced (event_id, keyed, order_id, seq) VALUES (?, ?, ?, ?)";
    db.execute_raw(sql(
        backend,
        record,
        vec![uuid(id), true.into(), order_id.into(), seq.into()],
    ))
    .await?;
    if audit {
        // Every other audit event is scheduled: it waits out the faults in
        // `outbox_scheduled` and must still arrive once.
        let id = if seq % 2 == 0 {
            emit!(Audit { order_id, seq }, after = SCHEDULED_AFTER)
        } else {
            emit!(Audit { order_id, seq })
        };
        db.execute_raw(sql(
            backend,
            record,
            vec![uuid(id), false.into(), order_id.into(), seq.into()],
        ))
        .await?;
    }
    Ok(())
}

/// Whether step `seq` of `order_id` committed (asked after a failed commit,
/// whose outcome the client cannot know).
pub(crate) async fn committed(
    db: &DatabaseConnection,
    order_id: i64,
    seq: i32,
) -> Result<bool, DbErr> {
    let backend = db.get_database_backend();
    let query = "SELECT event_id FROM produced WHERE keyed = ? AND order_id = ? AND seq = ?";
    let row = db
        .query_one_raw(sql(
            backend,
            query,
            vec![true.into(), order_id.into(), seq.into()],
        ))
        .await?;
    Ok(row.is_some())
}

/// Records an event whose transaction was rolled back: it must never reach the stream.
/// Idempotent, since it is retried when the outcome of a commit is unknown
/// (the database restarting while it answered).
pub(crate) async fn ghost(db: &DatabaseConnection, id: Uuid) -> Result<(), DbErr> {
    let backend = db.get_database_backend();
    let insert = match backend {
        DbBackend::Postgres => "INSERT INTO ghosts (event_id) VALUES (?) ON CONFLICT DO NOTHING",
        _ => "INSERT IGNORE INTO ghosts (event_id) VALUES (?)",
    };
    db.execute_raw(sql(backend, insert, vec![uuid(id)])).await?;
    Ok(())
}

pub(crate) fn uuid(id: Uuid) -> Value {
    id.to_string().into()
}

/// One event in 33 fails its first delivery; one in 97 its first three.
fn fails(meta: &Metadata) -> bool {
    let id = meta.id.as_u128();
    (meta.delivery_count == 1 && id.is_multiple_of(33))
        || (meta.delivery_count <= 3 && id.is_multiple_of(97))
}

/// The consumer's handler of steps: applies `seq` on top of `seq - 1`, and
/// records a violation whenever the order is anywhere else.
pub(crate) async fn apply_step(
    event: OrderStep,
    meta: Metadata,
    db: &DatabaseTransaction,
) -> Result<(), AppError> {
    if fails(&meta) {
        return Err(AppError::Injected);
    }
    let backend = db.get_database_backend();
    let order = vec![event.order_id.into()];
    let found = db
        .query_one_raw(sql(
            backend,
            "SELECT step FROM order_state WHERE order_id = ?",
            order,
        ))
        .await?
        .map(|row| row.try_get_by_index::<i32>(0))
        .transpose()?
        .unwrap_or(0);
    if found != event.seq - 1 {
        let violation =
            "INSERT INTO violations (event_id, order_id, seq, found) VALUES (?, ?, ?, ?)";
        let values = vec![
            uuid(meta.id),
            event.order_id.into(),
            event.seq.into(),
            found.into(),
        ];
        db.execute_raw(sql(backend, violation, values)).await?;
    }
    let upsert = match backend {
        DbBackend::Postgres => {
            "INSERT INTO order_state (order_id, step) VALUES (?, ?) ON CONFLICT (order_id) DO UPDATE SET step = EXCLUDED.step"
        }
        _ => {
            "INSERT INTO order_state (order_id, step) VALUES (?, ?) ON DUPLICATE KEY UPDATE step = VALUES(step)"
        }
    };
    db.execute_raw(sql(
        backend,
        upsert,
        vec![event.order_id.into(), event.seq.into()],
    ))
    .await?;
    effect(db, &meta, event.order_id.into(), event.seq.into()).await
}

/// The consumer's handler of audits: one effect row each.
pub(crate) async fn apply_audit(
    event: Audit,
    meta: Metadata,
    db: &DatabaseTransaction,
) -> Result<(), AppError> {
    if fails(&meta) {
        return Err(AppError::Injected);
    }
    effect(db, &meta, event.order_id.into(), event.seq.into()).await
}

async fn effect(
    db: &DatabaseTransaction,
    meta: &Metadata,
    order_id: Value,
    seq: Value,
) -> Result<(), AppError> {
    let backend = db.get_database_backend();
    let by = applied_by().await;
    let partition = (GROUP.get()).map(|group| {
        let key = (meta.key.as_deref()).map_or(meta.id.as_bytes().as_slice(), str::as_bytes);
        i32::try_from(partition_of(key, group.partitions)).unwrap_or(i32::MAX)
    });
    let insert = "INSERT INTO effects (event_id, order_id, seq, applied_by, partition_index) VALUES (?, ?, ?, ?, ?)";
    let values = vec![uuid(meta.id), order_id, seq, by.into(), partition.into()];
    db.execute_raw(sql(backend, insert, values)).await?;
    Ok(())
}

/// The consumer's name, in every process.
pub(crate) const CONSUMER: &str = "faults";

/// The group this process is a member of, if it is one.
pub(crate) static GROUP: OnceLock<GroupConfig> = OnceLock::new();

/// Who applies effects in this process: its group member id, or its pid.
static APPLIED_BY: OnceLock<String> = OnceLock::new();

/// Records who this process applies effects as, once its consumer started.
pub(crate) fn started_as(who: String) -> &'static str {
    APPLIED_BY.get_or_init(|| who)
}

/// Who applies effects in this process; a handler that runs before
/// [`started_as`] (the consumer starts handling as it is spawned) waits.
async fn applied_by() -> String {
    loop {
        if let Some(who) = APPLIED_BY.get() {
            return who.clone();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Records that `who` is alive now (inserted at its first call).
pub(crate) async fn alive(
    db: &DatabaseConnection,
    who: &str,
    started_ms: i64,
) -> Result<(), DbErr> {
    let backend = db.get_database_backend();
    let now = chrono::Utc::now().timestamp_millis();
    let upsert = match backend {
        DbBackend::Postgres => {
            "INSERT INTO lives (applied_by, started_ms, last_seen_ms) VALUES (?, ?, ?) ON CONFLICT (applied_by) DO UPDATE SET last_seen_ms = EXCLUDED.last_seen_ms"
        }
        _ => {
            "INSERT INTO lives (applied_by, started_ms, last_seen_ms) VALUES (?, ?, ?) ON DUPLICATE KEY UPDATE last_seen_ms = VALUES(last_seen_ms)"
        }
    };
    db.execute_raw(sql(
        backend,
        upsert,
        vec![who.into(), started_ms.into(), now.into()],
    ))
    .await?;
    Ok(())
}

/// The consumer's retry delays: short, so that a run is not spent waiting.
pub(crate) const RETRY: outbox_core::Backoff = outbox_core::Backoff {
    initial: Duration::from_millis(100),
    max: Duration::from_secs(2),
};
