//! Wake-ups across processes on PostgreSQL (feature `postgres`): a statement
//! trigger `NOTIFY`s on each insert into the outbox, and relays built with
//! [`wake_on_notify`](super::RelayBuilder::wake_on_notify) `LISTEN`.
//!
//! Optional because `NOTIFY` serialises committing transactions on the
//! server: enable it where the latency across processes is worth that.
//! Polling stays on as the fallback either way.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend};
use sqlx::postgres::PgListener;
use tokio::sync::Notify;

use crate::Error;

/// The channel the trigger notifies and relays listen on.
pub const CHANNEL: &str = "outbox_messages";

/// Installs the trigger that notifies relays of new events (idempotent).
pub async fn enable(db: &DatabaseConnection) -> Result<(), Error> {
    db.execute_unprepared(&format!(
        "CREATE OR REPLACE FUNCTION outbox_messages_notify() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_notify('{CHANNEL}', ''); RETURN NULL; END $$;
         DROP TRIGGER IF EXISTS outbox_messages_notify ON outbox_messages;
         CREATE TRIGGER outbox_messages_notify AFTER INSERT ON outbox_messages
             FOR EACH STATEMENT EXECUTE FUNCTION outbox_messages_notify();"
    ))
    .await?;
    Ok(())
}

/// Removes the trigger; relays go back to waking in-process and polling.
pub async fn disable(db: &DatabaseConnection) -> Result<(), Error> {
    db.execute_unprepared(
        "DROP TRIGGER IF EXISTS outbox_messages_notify ON outbox_messages;
         DROP FUNCTION IF EXISTS outbox_messages_notify();",
    )
    .await?;
    Ok(())
}

/// Listens in the background and wakes `wake` on each notification; `None`
/// when `db` is not PostgreSQL.
pub(super) fn listen(
    db: &DatabaseConnection,
    wake: Arc<Notify>,
) -> Option<tokio::task::JoinHandle<()>> {
    if db.get_database_backend() != DbBackend::Postgres {
        tracing::warn!("wake_on_notify needs PostgreSQL; this relay polls");
        return None;
    }
    let pool = db.get_postgres_connection_pool().clone();
    Some(tokio::spawn(async move {
        let mut failures = 0_u32;
        loop {
            let listening = async {
                let mut listener = PgListener::connect_with(&pool).await?;
                listener.listen(CHANNEL).await?;
                if failures > 0 {
                    tracing::info!("listening for outbox notifications again");
                }
                failures = 0;
                loop {
                    listener.recv().await?;
                    wake.notify_one();
                }
            };
            let result: Result<(), sqlx::Error> = listening.await;
            if let Err(error) = result {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(error = %crate::ErrorReport(&error), "outbox notifications lost; polling until they are back");
                }
                tokio::time::sleep(
                    Duration::from_secs(1).min(Duration::from_millis(100) * failures),
                )
                .await;
            }
        }
    }))
}
