//! The outbox's migrations run from an application's own `sea-orm-migration`
//! migrator: each can be undone, and applied again, on every backend.

use outbox_core::entity::outbox_message;
use outbox_tests::fixtures::OrderCreated;
use outbox_tests::{TestDb, emit_one, on_each_backend};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, PaginatorTrait, Statement,
};
use sea_orm_migration::prelude::*;

/// An application's migrator holding the outbox's migrations only, on the
/// bookkeeping table that `outbox_core::migrate` wrote for the test database.
struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        outbox_core::migrations()
    }

    fn migration_table_name() -> DynIden {
        "outbox_migrations".into_iden()
    }
}

/// All the way down (the tables dropped), up again, and the outbox takes an
/// event: each `down` undoes its `up` well enough for the next `up` to run.
async fn every_migration_goes_down_and_up_again(db: &DatabaseConnection) {
    let count = outbox_core::migrations().len();
    let applied = Migrator::get_applied_migrations(db).await.expect("applied");
    assert_eq!(applied.len(), count, "the test database is migrated");

    Migrator::down(db, None)
        .await
        .expect("every migration undone");
    let pending = Migrator::get_pending_migrations(db).await.expect("pending");
    assert_eq!(pending.len(), count);
    assert!(
        outbox_message::Entity::find().count(db).await.is_err(),
        "the outbox table is gone"
    );

    Migrator::up(db, None).await.expect("applied again");
    let order = OrderCreated {
        order_id: 1,
        total_cents: 10,
    };
    emit_one(db, order).await.expect("commit");
    assert_eq!(
        outbox_message::Entity::find()
            .count(db)
            .await
            .expect("count"),
        1
    );
}

on_each_backend!(every_migration_goes_down_and_up_again);

/// Where `explicit_defaults_for_timestamp` is off (MySQL 5.7, MariaDB before
/// 10.10; set here for the one connection that migrates), the server gives a
/// table's first `TIMESTAMP NOT NULL` column without a default `ON UPDATE
/// CURRENT_TIMESTAMP`. No outbox column may end up so: an event's
/// `created_at` would move at each retry. (Without the defaults of
/// migration 000005, `outbox_messages.created_at` and four more do, and the
/// test fails.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_column_is_set_by_an_older_mysql_on_update() {
    let test =
        TestDb::mysql_migrated_after("SET SESSION explicit_defaults_for_timestamp = OFF").await;
    let updated = (test.db)
        .query_all_raw(Statement::from_string(
            DbBackend::MySql,
            "SELECT CONCAT(table_name, '.', column_name) FROM information_schema.columns \
             WHERE table_schema = DATABASE() AND LOWER(extra) LIKE '%on update%'",
        ))
        .await
        .expect("read the columns");
    let updated: Vec<String> = (updated.iter())
        .map(|row| row.try_get_by_index(0).expect("a name"))
        .collect();
    test.finish().await;
    assert!(
        updated.is_empty(),
        "set by the server on update: {updated:?}"
    );
}
