//! The replication slot's life, on the relay's ordinary connection: the
//! checks before a start, creating the slot and its publication, the
//! relayed position kept in `outbox_logical_progress`, its status, and
//! dropping it all.

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement, Value};

use super::LogicalError;

/// The oldest PostgreSQL whose `pgoutput` sends logical messages.
const MIN_SERVER_VERSION: i32 = 140_000;

/// What the relay needs of the server, each missing part an error naming
/// its fix: `wal_level = logical`, a role with `REPLICATION`, version 14.
pub(super) async fn preflight(db: &DatabaseConnection) -> Result<(), LogicalError> {
    if db.get_database_backend() != DbBackend::Postgres {
        return Err(LogicalError::NotPostgres);
    }
    let row = one(
        db,
        "SELECT current_setting('wal_level'), current_setting('server_version_num')::int, \
         current_user::text, (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)",
        [],
    )
    .await?;
    let wal_level: String = row.try_get_by_index(0)?;
    let version: i32 = row.try_get_by_index(1)?;
    let role: String = row.try_get_by_index(2)?;
    let replication: bool = row.try_get_by_index(3)?;
    if version < MIN_SERVER_VERSION {
        return Err(LogicalError::ServerTooOld { version });
    }
    if wal_level != "logical" {
        return Err(LogicalError::WalLevel { found: wal_level });
    }
    if !replication {
        return Err(LogicalError::NoReplication { role });
    }
    Ok(())
}

/// The schema of the connection's outbox, whose events the relay reads.
pub(super) async fn schema(db: &DatabaseConnection) -> Result<String, DbErr> {
    one(db, "SELECT current_schema()::text", [])
        .await?
        .try_get_by_index(0)
}

/// The default slot name for an outbox in `schema`: `outbox_<schema>`,
/// within the 63 characters a slot name may have.
pub(super) fn default_name(schema: &str) -> String {
    let mut name: String = format!("outbox_{schema}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    name.truncate(63);
    name
}

/// Creates the slot (`pgoutput`), its publication (of no table: the relay
/// reads only logical messages) and the progress table, each unless it
/// exists; another relay creating the same at once is no error.
pub(super) async fn ensure(db: &DatabaseConnection, slot: &str) -> Result<(), DbErr> {
    db.execute_unprepared(
        "CREATE TABLE IF NOT EXISTS outbox_logical_progress (
             slot_name TEXT PRIMARY KEY,
             relayed_lsn BIGINT NOT NULL,
             relayed_at TIMESTAMPTZ NOT NULL
         )",
    )
    .await?;
    let exists = one(
        db,
        "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
        [slot.into()],
    )
    .await?
    .try_get_by_index::<bool>(0)?;
    if !exists {
        // A publication's name is an identifier; `slot` is checked to be a plain one.
        tolerate_duplicate(
            db.execute_unprepared(&format!("CREATE PUBLICATION {slot}"))
                .await,
        )?;
    }
    let exists = one(
        db,
        "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
        [slot.into()],
    )
    .await?
    .try_get_by_index::<bool>(0)?;
    if !exists {
        let created = db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                [slot.into()],
            ))
            .await;
        tolerate_duplicate(created)?;
        tracing::info!(slot, "created the replication slot");
    }
    // The slot's row, which `slots` lists, from its first session on.
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO outbox_logical_progress (slot_name, relayed_lsn, relayed_at) \
         VALUES ($1, 0, now()) ON CONFLICT (slot_name) DO NOTHING",
        [slot.into()],
    ))
    .await?;
    Ok(())
}

fn tolerate_duplicate<T>(result: Result<T, DbErr>) -> Result<(), DbErr> {
    match result {
        Err(error) if error.to_string().contains("already exists") => Ok(()),
        other => other.map(|_| ()),
    }
}

/// The end of the last transaction whose events JetStream stored, as the
/// relay recorded it: a slot whose own position went back (a PostgreSQL
/// crash forgets what was confirmed since the last checkpoint) resends
/// what lies before it, which the relay then skips.
pub(super) async fn relayed(db: &DatabaseConnection, slot: &str) -> Result<u64, DbErr> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT relayed_lsn FROM outbox_logical_progress WHERE slot_name = $1",
            [slot.into()],
        ))
        .await?;
    let lsn: i64 = match row {
        Some(row) => row.try_get_by_index(0)?,
        None => 0,
    };
    Ok(u64::try_from(lsn).unwrap_or(0))
}

/// Records that everything up to `lsn` is stored.
pub(super) async fn record_relayed(
    db: &DatabaseConnection,
    slot: &str,
    lsn: u64,
) -> Result<(), DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO outbox_logical_progress (slot_name, relayed_lsn, relayed_at) VALUES ($1, $2, now())
         ON CONFLICT (slot_name) DO UPDATE SET relayed_lsn = GREATEST(outbox_logical_progress.relayed_lsn, EXCLUDED.relayed_lsn), relayed_at = EXCLUDED.relayed_at",
        [slot.into(), i64::try_from(lsn).unwrap_or(i64::MAX).into()],
    ))
    .await?;
    Ok(())
}

/// Waits until every transaction open now has ended: one that saw the
/// capture trigger before it was removed may still write its events as a
/// message (`capture::write`), which must be in the slot before its last
/// read.
pub(super) async fn wait_for_open_transactions(db: &DatabaseConnection) -> Result<(), DbErr> {
    let open: String = one(
        db,
        "SELECT coalesce(string_agg(virtualxid, ','), '') FROM pg_locks \
         WHERE locktype = 'virtualxid' AND pid <> pg_backend_pid()",
        [],
    )
    .await?
    .try_get_by_index(0)?;
    let mut waited = 0_u32;
    loop {
        let still: i64 = one(
            db,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'virtualxid' \
             AND virtualxid = ANY(string_to_array($1, ','))",
            [open.clone().into()],
        )
        .await?
        .try_get_by_index(0)?;
        if still == 0 {
            return Ok(());
        }
        waited += 1;
        if waited == 50 {
            tracing::info!(
                transactions = still,
                "waiting for transactions open since the capture stopped"
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Rows of `outbox_messages` not yet delivered (kept deliveries aside).
pub(super) async fn rows_waiting(db: &DatabaseConnection) -> Result<i64, DbErr> {
    one(
        db,
        "SELECT count(*) FROM outbox_messages WHERE delivered_at IS NULL",
        [],
    )
    .await?
    .try_get_by_index(0)
}

/// The prefix of the relay's heartbeats.
pub(super) fn heartbeat_prefix(schema: &str) -> String {
    format!("outbox-heartbeat:{schema}")
}

/// Writes a heartbeat: a message outside any transaction, which moves the
/// slot's stream on when the database is idle, so that the relay can
/// confirm a newer position and the server need not keep the WAL behind it.
pub(super) async fn heartbeat(db: &DatabaseConnection, prefix: &str) -> Result<(), DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT pg_logical_emit_message(false, $1, '')",
        [prefix.into()],
    ))
    .await?;
    Ok(())
}

/// A position past every event committed so far: a transactional
/// heartbeat's, whose commit the stream will reach (a drain before the
/// slot is dropped reads up to it).
pub(super) async fn mark_end(db: &DatabaseConnection, prefix: &str) -> Result<u64, DbErr> {
    let lsn: i64 = one(
        db,
        "SELECT (pg_logical_emit_message(true, $1, '') - '0/0'::pg_lsn)::bigint",
        [prefix.into()],
    )
    .await?
    .try_get_by_index(0)?;
    Ok(u64::try_from(lsn).unwrap_or(0))
}

/// A replication slot of the logical relay, as `outbox status` shows it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SlotStatus {
    /// The slot's name.
    pub slot: String,
    /// Whether a relay is reading it now.
    pub active: bool,
    /// WAL written since the slot's confirmed position, in bytes: how far
    /// the relay is behind (the whole server's WAL, other databases' too).
    pub lag_bytes: i64,
    /// WAL the server keeps for the slot, in bytes.
    pub retained_bytes: i64,
    /// Seconds since the relay last recorded progress (an event stored or
    /// a heartbeat read): a few while it runs, growing when it stalls.
    pub lag_seconds: Option<f64>,
    /// Whether new events are captured into the slot (the capture trigger
    /// is on the connection's `outbox_messages`); after
    /// [`retire`](super::retire), they are rows for a polling relay again.
    pub capturing: bool,
}

/// The status of the slot `slot`, or `None` when it does not exist.
pub async fn slot_status(db: &DatabaseConnection, slot: &str) -> Result<Option<SlotStatus>, DbErr> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT s.active,
                    (pg_current_wal_lsn() - s.confirmed_flush_lsn)::bigint,
                    (pg_current_wal_lsn() - s.restart_lsn)::bigint,
                    (SELECT extract(epoch FROM now() - p.relayed_at)::float8
                       FROM outbox_logical_progress p WHERE p.slot_name = s.slot_name),
                    EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'outbox_capture'
                              AND tgrelid = to_regclass('outbox_messages'))
             FROM pg_replication_slots s WHERE s.slot_name = $1",
            [slot.into()],
        ))
        .await;
    let row = match row {
        // No progress table yet: the relay never ran here.
        Err(error) if error.to_string().contains("outbox_logical_progress") => return Ok(None),
        other => other?,
    };
    let Some(row) = row else { return Ok(None) };
    Ok(Some(SlotStatus {
        slot: slot.to_owned(),
        active: row.try_get_by_index(0)?,
        lag_bytes: row.try_get_by_index::<Option<i64>>(1)?.unwrap_or(0),
        retained_bytes: row.try_get_by_index::<Option<i64>>(2)?.unwrap_or(0),
        lag_seconds: row.try_get_by_index(3)?,
        capturing: row.try_get_by_index(4)?,
    }))
}

/// The status of every slot a logical relay recorded progress of in the
/// connection's schema (none on other databases, or before a relay ran).
pub async fn slots(db: &DatabaseConnection) -> Result<Vec<SlotStatus>, DbErr> {
    if db.get_database_backend() != DbBackend::Postgres {
        return Ok(Vec::new());
    }
    let names = db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT slot_name FROM outbox_logical_progress ORDER BY slot_name",
        ))
        .await;
    let names = match names {
        Err(error) if error.to_string().contains("outbox_logical_progress") => {
            return Ok(Vec::new());
        }
        other => other?,
    };
    let mut slots = Vec::with_capacity(names.len());
    for row in names {
        let name: String = row.try_get_by_index(0)?;
        slots.extend(slot_status(db, &name).await?);
    }
    Ok(slots)
}

/// Drops the slot, its publication and its progress row. The slot must not
/// be in use.
pub(super) async fn drop(db: &DatabaseConnection, slot: &str) -> Result<(), DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
        [slot.into()],
    ))
    .await?;
    db.execute_unprepared(&format!("DROP PUBLICATION IF EXISTS {slot}"))
        .await?;
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "DELETE FROM outbox_logical_progress WHERE slot_name = $1",
        [slot.into()],
    ))
    .await?;
    Ok(())
}

/// Whether `name` can be a slot's name: lower-case letters, digits and
/// underscores, at most 63 of them.
pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

async fn one<const N: usize>(
    db: &DatabaseConnection,
    sql: &str,
    values: [Value; N],
) -> Result<sea_orm::QueryResult, DbErr> {
    db.query_one_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        sql,
        values,
    ))
    .await?
    .ok_or_else(|| DbErr::RecordNotFound(format!("no row from {sql}")))
}

#[cfg(test)]
mod tests {
    use super::{default_name, valid_name};

    #[test]
    fn default_names_are_valid_slot_names() {
        assert_eq!(default_name("public"), "outbox_public");
        assert_eq!(default_name("Shop-EU"), "outbox_shop_eu");
        assert!(valid_name(&default_name(&"x".repeat(100))));
        assert!(!valid_name("Outbox"));
        assert!(!valid_name("a;drop"));
    }
}
