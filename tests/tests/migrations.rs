//! The outbox's migrations run from an application's own `sea-orm-migration`
//! migrator: each can be undone, and applied again, on every backend.

use outbox_core::entity::outbox_message;
use outbox_tests::fixtures::OrderCreated;
use outbox_tests::{emit_one, on_each_backend};
use sea_orm::{DatabaseConnection, EntityTrait, PaginatorTrait};
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
