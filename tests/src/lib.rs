//! Shared helpers of the integration tests: an isolated database per test on
//! the real services (`DATABASE_URL`, default `postgres://root@127.0.0.1/test`;
//! `MYSQL_URL`, default `mysql://root@127.0.0.1:3306`), or a fresh SQLite file.

pub mod consumers;
pub mod fixtures;
pub mod nats;
pub mod private_postgres;
mod setup;
pub mod streamed;

pub use setup::{FAST_RETRY, Setup, drained, emit_one, eventually, fast, settled};

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection};

/// The PostgreSQL server tests use.
pub fn postgres_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://root@127.0.0.1/test".to_owned())
}

/// The MariaDB/MySQL server tests use (without a database name).
pub fn mysql_url() -> String {
    std::env::var("MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".to_owned())
}

/// A pool of 16 connections on a PostgreSQL schema, without statement logs.
fn schema_options(schema: &str) -> ConnectOptions {
    let mut options = ConnectOptions::new(postgres_url());
    options
        .set_schema_search_path(schema.to_owned())
        .max_connections(16)
        .sqlx_logging(false);
    options
}

/// The database servers (and SQLite) that tests run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `DATABASE_URL`, a schema per test.
    Postgres,
    /// `MYSQL_URL`, a database per test.
    MySql,
    /// A file in a temporary directory.
    Sqlite,
}

impl Backend {
    /// Every backend, for tests that run on each.
    pub const ALL: [Backend; 3] = [Backend::Postgres, Backend::MySql, Backend::Sqlite];
}

/// A database that only one test uses, migrated unless made by [`TestDb::empty`].
#[derive(Debug)]
pub struct TestDb {
    /// The connection to hand to the code under test.
    pub db: DatabaseConnection,
    /// A URL that opens the same database from another process (the `outbox` binary).
    pub url: String,
    isolation: Isolation,
}

#[derive(Debug)]
enum Isolation {
    Postgres {
        admin: DatabaseConnection,
        schema: String,
    },
    MySql {
        admin: DatabaseConnection,
        database: String,
    },
    /// Deleted with the directory when dropped.
    Sqlite { _dir: tempfile::TempDir },
}

impl TestDb {
    /// A new schema on the PostgreSQL server, set as the connection's search path.
    pub async fn postgres() -> Self {
        Self::empty(Backend::Postgres).await.migrated().await
    }

    /// A new database on the MariaDB/MySQL server.
    pub async fn mysql() -> Self {
        Self::empty(Backend::MySql).await.migrated().await
    }

    /// A new SQLite database file in a temporary directory.
    pub async fn sqlite() -> Self {
        Self::empty(Backend::Sqlite).await.migrated().await
    }

    /// A new, empty database (schema) on `backend`: no outbox tables.
    pub async fn empty(backend: Backend) -> Self {
        match backend {
            Backend::Postgres => Self::postgres_empty().await,
            Backend::MySql => Self::mysql_empty(16, None).await,
            Backend::Sqlite => Self::sqlite_empty().await,
        }
    }

    async fn postgres_empty() -> Self {
        let url = postgres_url();
        let admin = Database::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {url} is required: {e}"));
        let schema = format!("outbox_test_{}", uuid::Uuid::now_v7().simple());
        admin
            .execute_unprepared(&format!("CREATE SCHEMA {schema}"))
            .await
            .expect("create test schema");
        let db = Database::connect(schema_options(&schema))
            .await
            .expect("connect to test schema");
        let separator = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{separator}options=-c%20search_path%3D{schema}");
        let isolation = Isolation::Postgres { admin, schema };
        Self { db, url, isolation }
    }

    /// Another pool on this test's database, configured by `configure`
    /// (for tests of what the relay or a consumer does with a small pool).
    pub async fn pool(&self, configure: impl FnOnce(&mut ConnectOptions)) -> DatabaseConnection {
        let mut options = ConnectOptions::new(&self.url);
        options.sqlx_logging(false);
        configure(&mut options);
        Database::connect(options)
            .await
            .expect("connect to the test database")
    }

    /// A new database on the MariaDB/MySQL server, migrated through a pool of
    /// one connection on which `session` ran first: a `SET SESSION` whose
    /// effect on the migrations a test looks at.
    pub async fn mysql_migrated_after(session: &str) -> Self {
        Self::mysql_empty(1, Some(session)).await.migrated().await
    }

    async fn mysql_empty(connections: u32, session: Option<&str>) -> Self {
        let url = mysql_url();
        let admin = Database::connect(format!("{url}/test"))
            .await
            .unwrap_or_else(|e| panic!("MariaDB/MySQL at {url} is required: {e}"));
        let database = format!("outbox_test_{}", uuid::Uuid::now_v7().simple());
        admin
            .execute_unprepared(&format!("CREATE DATABASE {database}"))
            .await
            .expect("create test database");
        let url = format!("{url}/{database}");
        let mut options = ConnectOptions::new(&url);
        options.max_connections(connections).sqlx_logging(false);
        let db = Database::connect(options)
            .await
            .expect("connect to test database");
        if let Some(session) = session {
            db.execute_unprepared(session)
                .await
                .expect("the session's setting");
        }
        let isolation = Isolation::MySql { admin, database };
        Self { db, url, isolation }
    }

    async fn sqlite_empty() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("test.sqlite");
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let mut options = ConnectOptions::new(&url);
        options.max_connections(4).sqlx_logging(false);
        let db = Database::connect(options).await.expect("open SQLite file");
        db.execute_unprepared("PRAGMA journal_mode = WAL")
            .await
            .expect("WAL mode");
        let isolation = Isolation::Sqlite { _dir: dir };
        Self { db, url, isolation }
    }

    /// This database with the outbox's tables and the tests' `orders` table.
    pub async fn migrated(self) -> Self {
        outbox_core::migrate(&self.db)
            .await
            .expect("outbox migrations");
        self.db
            .execute_unprepared(
                "CREATE TABLE orders (id BIGINT PRIMARY KEY, total_cents BIGINT NOT NULL)",
            )
            .await
            .expect("create the business table");
        self
    }

    /// Drops what the test created (its schema; a SQLite file goes with its directory).
    pub async fn finish(self) {
        self.db.close().await.expect("close the test connection");
        match self.isolation {
            Isolation::Postgres { admin, schema } => {
                admin
                    .execute_unprepared(&format!("DROP SCHEMA {schema} CASCADE"))
                    .await
                    .expect("drop test schema");
            }
            Isolation::MySql { admin, database } => {
                admin
                    .execute_unprepared(&format!("DROP DATABASE {database}"))
                    .await
                    .expect("drop test database");
            }
            Isolation::Sqlite { .. } => {}
        }
    }
}

/// Runs each listed `async fn(&DatabaseConnection)` as three tests, one per backend.
#[macro_export]
macro_rules! on_each_backend {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let test = $crate::TestDb::postgres().await;
                super::$test(&test.db).await;
                test.finish().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mysql() {
                let test = $crate::TestDb::mysql().await;
                super::$test(&test.db).await;
                test.finish().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let test = $crate::TestDb::sqlite().await;
                super::$test(&test.db).await;
                test.finish().await;
            }
        }
    )*};
}

/// Runs each listed `async fn(Setup)` on PostgreSQL and on MariaDB/MySQL.
#[macro_export]
macro_rules! on_postgres_and_mysql {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$test($crate::Setup::postgres().await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mysql() {
                super::$test($crate::Setup::mysql().await).await;
            }
        }
    )*};
}
