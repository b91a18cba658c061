//! The two routes to the outbox's schema meet on one database, in either
//! order, with the `outbox` binary as a process: an application's own
//! SeaORM migrator holding `outbox_core::migrations()`, and `outbox
//! migrate` (what `outbox relay` runs at start). Several binaries migrating
//! at once, and a binary told not to migrate, on PostgreSQL, MariaDB and
//! SQLite. (The relay needs NATS only to start: the shared server.)

use std::process::{Command, Output};

use outbox_tests::fixtures::OrderCreated;
use outbox_tests::{Backend, TestDb, emit_one};
use sea_orm::{ConnectionTrait, Statement};
use sea_orm_migration::prelude::*;

fn outbox(url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_outbox"));
    command.args(["--database-url", url]).args(args);
    command.env_remove("OUTBOX_MIGRATE");
    command
}

fn run(mut command: Command) -> Output {
    command.output().expect("run outbox")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// An application's migrator: a table of its own, then the outbox's, kept
/// in SeaORM's default bookkeeping table `seaql_migrations`.
struct AppMigrator;

impl MigratorTrait for AppMigrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut migrations: Vec<Box<dyn MigrationTrait>> = vec![Box::new(CreatePayments)];
        migrations.extend(outbox_core::migrations());
        migrations
    }
}

#[derive(DeriveMigrationName)]
struct CreatePayments;

#[async_trait::async_trait]
impl MigrationTrait for CreatePayments {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("payments")
                    .col(ColumnDef::new("id").big_integer().not_null().primary_key())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table("payments").to_owned())
            .await
    }
}

/// How many migrations `table` records.
async fn recorded(test: &TestDb, table: &str) -> i64 {
    let backend = test.db.get_database_backend();
    let row = (test.db)
        .query_one_raw(Statement::from_string(
            backend,
            format!("SELECT COUNT(*) FROM {table}"),
        ))
        .await
        .expect("count the migrations")
        .expect("a row");
    row.try_get_by_index(0).expect("a count")
}

/// The outbox takes an event, and `outbox status` finds its tables.
async fn outbox_works(test: &TestDb) {
    let order = OrderCreated {
        order_id: 1,
        total_cents: 5,
    };
    emit_one(&test.db, order).await.expect("commit an event");
    let status = run(outbox(&test.url, &["status", "--json"]));
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
}

/// `outbox relay` starts on the database (migrating at start), delivers
/// for a moment, and stops cleanly on SIGTERM.
fn relay_starts(url: &str) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let log = dir.path().join("relay.log");
    let file = std::fs::File::create(&log).expect("log file");
    let mut relay = outbox(
        url,
        &["relay", "--nats-url", &outbox_tests::nats::nats_url()],
    )
    .stdout(file.try_clone().expect("log file"))
    .stderr(file)
    .spawn()
    .expect("start outbox relay");
    let mut text = String::new();
    for _ in 0..200 {
        text = std::fs::read_to_string(&log).expect("read the log");
        if text.contains("relay started") || relay.try_wait().expect("poll").is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(text.contains("relay started"), "{text}");
    let term = Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(term.success());
    assert_eq!(relay.wait().expect("wait").code(), Some(0), "{text}");
}

async fn own_migrator_then_binary(backend: Backend) {
    let test = TestDb::empty(backend).await;
    AppMigrator::up(&test.db, None)
        .await
        .expect("the application's migrator");
    relay_starts(&test.url);
    let migrated = run(outbox(&test.url, &["migrate"]));
    assert_eq!(migrated.status.code(), Some(0), "{}", stderr(&migrated));
    let again = run(outbox(&test.url, &["migrate"]));
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    let count = outbox_core::migrations().len() as i64;
    assert_eq!(recorded(&test, "outbox_migrations").await, count);
    assert_eq!(recorded(&test, "seaql_migrations").await, count + 1);
    outbox_works(&test).await;
    test.finish().await;
}

async fn binary_then_own_migrator(backend: Backend) {
    let test = TestDb::empty(backend).await;
    relay_starts(&test.url);
    AppMigrator::up(&test.db, None)
        .await
        .expect("the application's migrator after the binary's");
    let count = outbox_core::migrations().len() as i64;
    assert_eq!(recorded(&test, "seaql_migrations").await, count + 1);
    outbox_works(&test).await;
    test.finish().await;
}

/// Four binaries migrate an empty database at once: each exits 0, and each
/// migration is recorded once.
async fn binaries_migrate_at_once(backend: Backend) {
    let test = TestDb::empty(backend).await;
    let children: Vec<_> = (0..4)
        .map(|_| {
            let mut command = outbox(&test.url, &["migrate"]);
            command.stderr(std::process::Stdio::piped());
            command.spawn().expect("start outbox migrate")
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().expect("outbox migrate");
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    }
    let count = outbox_core::migrations().len() as i64;
    assert_eq!(recorded(&test, "outbox_migrations").await, count);
    outbox_works(&test).await;
    test.finish().await;
}

/// Told not to migrate, the relay checks the tables and names the fix;
/// `status` on a database without them says so in words, not SQL.
async fn a_binary_that_does_not_migrate_names_the_missing_tables(backend: Backend) {
    let test = TestDb::empty(backend).await;
    let relay = ["relay", "--nats-url", "127.0.0.1:1"];
    let mut told = outbox(&test.url, &relay);
    told.arg("--no-migrate");
    let mut by_env = outbox(&test.url, &relay);
    by_env.env("OUTBOX_MIGRATE", "false");
    for command in [told, by_env, outbox(&test.url, &["status"])] {
        let output = run(command);
        let stderr = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("the outbox tables are missing (outbox_messages, ")
                && stderr.contains("outbox migrate"),
            "{stderr}"
        );
    }
    assert!(
        (test.db)
            .query_one_raw(Statement::from_string(
                test.db.get_database_backend(),
                "SELECT 1 FROM outbox_migrations"
            ))
            .await
            .is_err(),
        "nothing was migrated"
    );
    test.finish().await;
}

macro_rules! on_each_backend {
    ($($test:ident: $($backend:ident),+;)*) => {$(
        mod $test {
            $(
                #[allow(non_snake_case)]
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $backend() {
                    super::$test(outbox_tests::Backend::$backend).await;
                }
            )+
        }
    )*};
}

on_each_backend! {
    own_migrator_then_binary: Postgres, MySql, Sqlite;
    binary_then_own_migrator: Postgres, MySql, Sqlite;
    binaries_migrate_at_once: Postgres, MySql;
    a_binary_that_does_not_migrate_names_the_missing_tables: Postgres, MySql, Sqlite;
}
