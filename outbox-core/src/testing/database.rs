//! A fresh, migrated database per test, dropped after it: what
//! `#[sqlx::test]` gives sqlx users, for the outbox's tables.

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection};
use uuid::Uuid;

use crate::Error;

/// A database (schema) that only one test uses, with the outbox's tables.
///
/// On PostgreSQL a new schema, set as the pool's search path; on MySQL and
/// MariaDB a new database; on SQLite a new file in the system's temporary
/// directory. [`finish`](Self::finish) drops it; a test that fails before
/// (a panic) drops it when the value is dropped, on a thread of its own.
///
/// ```no_run
/// # async fn run() -> Result<(), outbox_core::Error> {
/// use outbox_core::testing::TestDatabase;
///
/// let test = TestDatabase::from_env().await?; // DATABASE_URL
/// // ... your migrations on test.db(), the code under test ...
/// test.finish().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TestDatabase {
    db: DatabaseConnection,
    url: String,
    name: String,
    /// What to drop; `None` once dropped.
    isolation: Option<Isolation>,
}

#[derive(Debug, Clone)]
enum Isolation {
    /// A schema, dropped through a connection to the server's URL.
    Postgres { server: String, schema: String },
    /// A database, dropped through a connection to the server's URL.
    MySql { server: String, database: String },
    /// A file (and its `-wal` and `-shm` companions).
    Sqlite { path: std::path::PathBuf },
}

impl TestDatabase {
    /// On the server `DATABASE_URL` names.
    pub async fn from_env() -> Result<Self, Error> {
        let url = std::env::var("DATABASE_URL").map_err(|_| {
            Error::Database(sea_orm::DbErr::Custom(
                "DATABASE_URL is not set: the test database's server is unknown".to_owned(),
            ))
        })?;
        Self::new(&url).await
    }

    /// On the server of `url` (`postgres://`, `mysql://`, or `sqlite:`,
    /// whose path is ignored): a new schema, database or file, migrated.
    pub async fn new(url: &str) -> Result<Self, Error> {
        let name = format!("outbox_test_{}", Uuid::now_v7().simple());
        let (isolation, options) = if url.starts_with("postgres") {
            let admin = Database::connect(url).await?;
            admin
                .execute_unprepared(&format!("CREATE SCHEMA {name}"))
                .await?;
            admin.close().await?;
            let mut options = ConnectOptions::new(url);
            options.set_schema_search_path(name.clone());
            let server = url.to_owned();
            let schema = name.clone();
            (Isolation::Postgres { server, schema }, options)
        } else if url.starts_with("mysql") || url.starts_with("mariadb") {
            let admin = Database::connect(url).await?;
            admin
                .execute_unprepared(&format!("CREATE DATABASE {name}"))
                .await?;
            admin.close().await?;
            let options = ConnectOptions::new(with_database(url, &name)?);
            let server = url.to_owned();
            let database = name.clone();
            (Isolation::MySql { server, database }, options)
        } else {
            let path = std::env::temp_dir().join(format!("{name}.sqlite"));
            let options = ConnectOptions::new(format!("sqlite://{}?mode=rwc", path.display()));
            (Isolation::Sqlite { path }, options)
        };
        let url = options.get_url().to_owned();
        let test = Self {
            db: Database::connect(options).await?,
            url,
            name,
            isolation: Some(isolation),
        };
        crate::migrate(&test.db).await?;
        Ok(test)
    }

    /// The connection to give the code under test.
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The schema's, database's or file's name (`outbox_test_<uuid>`; the
    /// file is `<name>.sqlite` in the temporary directory).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL of this database, for another process (on PostgreSQL the
    /// server's, since the schema is the pool's search path: use
    /// [`db`](Self::db) in-process).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Closes the connection and drops the schema, database or file.
    pub async fn finish(mut self) -> Result<(), Error> {
        self.db.clone().close().await?;
        match self.isolation.take() {
            Some(isolation) => isolation.drop_it().await,
            None => Ok(()),
        }
    }
}

impl Drop for TestDatabase {
    /// A test that panicked before [`finish`](Self::finish): drops the
    /// database on a thread with a runtime of its own (a `Drop` cannot
    /// await, and may run inside the test's runtime).
    fn drop(&mut self) {
        let Some(isolation) = self.isolation.take() else {
            return;
        };
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|error| Error::Database(sea_orm::DbErr::Custom(error.to_string())))?;
            runtime.block_on(isolation.drop_it())
        });
        if let Ok(Err(error)) = dropped.join() {
            tracing::warn!(error = %crate::ErrorReport(&error), "could not drop a test database");
        }
    }
}

impl Isolation {
    async fn drop_it(self) -> Result<(), Error> {
        match self {
            Isolation::Postgres { server, schema } => {
                drop_with(&server, &format!("DROP SCHEMA {schema} CASCADE")).await
            }
            Isolation::MySql { server, database } => {
                drop_with(&server, &format!("DROP DATABASE {database}")).await
            }
            Isolation::Sqlite { path } => {
                for suffix in ["", "-wal", "-shm"] {
                    let mut file = path.clone().into_os_string();
                    file.push(suffix);
                    let _ = std::fs::remove_file(file);
                }
                Ok(())
            }
        }
    }
}

async fn drop_with(server: &str, statement: &str) -> Result<(), Error> {
    let admin = Database::connect(server).await?;
    admin.execute_unprepared(statement).await?;
    admin.close().await?;
    Ok(())
}

/// `url` with its path (the database) replaced by `database`.
fn with_database(url: &str, database: &str) -> Result<String, Error> {
    let mut parsed = url::Url::parse(url).map_err(|error| {
        Error::Database(sea_orm::DbErr::Custom(format!("invalid URL: {error}")))
    })?;
    parsed.set_path(database);
    Ok(parsed.to_string())
}
