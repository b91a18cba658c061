//! A PostgreSQL server of a test's own, for what the shared server cannot
//! do: restarts (a crash and recovery) and logical replication (the shared
//! one runs `wal_level = replica`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// What starting or stopping a server fails with.
pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A PostgreSQL server of one's own (`initdb` in a temporary directory, a
/// free port, `wal_level = logical`), run as the `postgres` user since the
/// server refuses root; never the shared one. Stopped when dropped.
#[derive(Debug)]
pub struct PrivatePostgres {
    pub port: u16,
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
}

impl PrivatePostgres {
    pub async fn start(dir: &Path) -> Result<Self> {
        let bin = postgres_bin()?;
        let home = dir.join("pg");
        std::fs::create_dir_all(&home)?;
        as_postgres(Command::new("chown").args(["-R", "postgres:"]).arg(dir)).await?;
        let server = Self {
            port: free_port()?,
            data: home.join("data"),
            log: home.join("postgres.log"),
            bin,
        };
        let initdb = server.bin.join("initdb");
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(initdb);
        command
            .arg("-D")
            .arg(&server.data)
            .args(["-A", "trust", "-U", "root"]);
        as_postgres(&mut command).await?;
        server.start_server().await?;
        Ok(server)
    }

    /// Its `postgres` database with the outbox's tables: the URL and a connection.
    pub async fn outbox(&self) -> Result<(String, sea_orm::DatabaseConnection)> {
        let url = self.url("postgres");
        let db = sea_orm::Database::connect(&url).await?;
        outbox_core::migrate(&db).await?;
        Ok((url, db))
    }

    /// The URL of `database` on it.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://root@127.0.0.1:{}/{database}", self.port)
    }

    /// Stops it as a crash would (`pg_ctl stop -m immediate`: no checkpoint,
    /// recovery at start), waits `down`, and starts it again.
    pub async fn restart(&self, down: Duration) -> Result<()> {
        self.pg_ctl(&["stop", "-m", "immediate", "-w"]).await?;
        tokio::time::sleep(down).await;
        self.start_server().await
    }

    async fn start_server(&self) -> Result<()> {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c max_connections=200 -c wal_level=logical",
            self.port,
            self.data.parent().unwrap_or(&self.data).display()
        );
        let log = self.log.display().to_string();
        self.pg_ctl(&["start", "-w", "-l", &log, "-o", &options])
            .await
    }

    async fn pg_ctl(&self, args: &[&str]) -> Result<()> {
        let mut command = Command::new("runuser");
        command
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"));
        command.arg("-D").arg(&self.data).args(args);
        as_postgres(&mut command).await
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["stop", "-m", "immediate", "-w"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

async fn as_postgres(command: &mut Command) -> Result<()> {
    let output = command.stdin(Stdio::null()).output().await?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into())
    }
}

/// `/usr/lib/postgresql/<newest>/bin`.
fn postgres_bin() -> Result<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| format!("no PostgreSQL server binaries in /usr/lib/postgresql: {e}"))?
        .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .ok_or_else(|| "no initdb under /usr/lib/postgresql/*/bin".into())
}
