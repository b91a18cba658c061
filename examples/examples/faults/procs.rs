//! The real processes the suite breaks: relays, the consumer, `nats-server`
//! (alone or as a 3-node cluster) and a private PostgreSQL.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

pub(crate) use outbox_tests::private_postgres::{PrivatePostgres, free_port};

pub(crate) type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A program the suite starts, kills with SIGKILL, stops with SIGTERM and
/// starts again, its output appended to a log file.
#[derive(Debug)]
pub(crate) struct Proc {
    pub(crate) name: String,
    program: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    pub(crate) fn new(name: &str, program: &Path, args: Vec<OsString>, logs: &Path) -> Self {
        Self {
            name: name.to_owned(),
            program: program.to_owned(),
            args,
            log: logs.join(format!("{name}.log")),
            child: None,
        }
    }

    pub(crate) fn start(&mut self) -> Result<()> {
        let log = File::options().create(true).append(true).open(&self.log)?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start {} ({}): {e}",
                    self.name,
                    self.program.display()
                )
            })?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, and wait for it to be gone.
    pub(crate) async fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// SIGTERM, and wait up to `patience` for a clean exit; returns whether
    /// it exited by itself with status 0 (else it is killed).
    pub(crate) async fn terminate(&mut self, patience: Duration) -> Result<bool> {
        let Some(mut child) = self.child.take() else {
            return Ok(true);
        };
        if let Some(pid) = child.id() {
            Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await?;
        }
        match tokio::time::timeout(patience, child.wait()).await {
            Ok(status) => Ok(status?.success()),
            Err(_) => {
                child.kill().await?;
                Ok(false)
            }
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) to it, if it runs.
    pub(crate) async fn signal(&self, signal: &str) -> Result<()> {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(pid.to_string())
                .status()
                .await?;
        }
        Ok(())
    }

    /// Whether it has exited by itself (a crash, or an error it gave up on).
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }
}

/// Waits until something listens on `port`.
pub(crate) async fn listening(port: u16, patience: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + patience;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("nothing listens on port {port} after {patience:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// `nats-server -js` processes on free ports with their own stores: one, or
/// a cluster of three.
#[derive(Debug)]
pub(crate) struct Nats {
    pub(crate) nodes: Vec<(Proc, u16)>,
}

impl Nats {
    /// Configures `size` nodes in `dir`; [`start`](Self::start) starts them.
    pub(crate) fn new(dir: &Path, size: usize) -> Result<Self> {
        let ports: Vec<(u16, u16)> = (0..size)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<_>>()?;
        let mut nodes = Vec::new();
        for (i, (port, cluster_port)) in ports.iter().enumerate() {
            let store = dir.join(format!("nats-{i}"));
            std::fs::create_dir_all(&store)?;
            let mut config = format!(
                "listen: 127.0.0.1:{port}\nserver_name: n{i}\njetstream {{ store_dir: {:?} }}\n",
                store.display().to_string()
            );
            if size > 1 {
                let routes: Vec<String> = (ports.iter())
                    .filter(|(p, _)| p != port)
                    .map(|(_, c)| format!("nats-route://127.0.0.1:{c}"))
                    .collect();
                config.push_str(&format!(
                    "cluster {{ name: faults, listen: 127.0.0.1:{cluster_port}, routes: [{}] }}\n",
                    routes.join(", ")
                ));
            }
            let file = store.join("nats.conf");
            std::fs::write(&file, config)?;
            let args = vec!["-c".into(), file.into_os_string()];
            let node = Proc::new(&format!("nats-{i}"), &binary(), args, dir);
            nodes.push((node, *port));
        }
        Ok(Self { nodes })
    }

    pub(crate) async fn start(&mut self) -> Result<()> {
        for (node, _) in &mut self.nodes {
            node.start()?;
        }
        for (_, port) in &self.nodes {
            listening(*port, Duration::from_secs(10)).await?;
        }
        Ok(())
    }

    /// `nats://127.0.0.1:a,nats://127.0.0.1:b,...`
    pub(crate) fn url(&self) -> String {
        let urls: Vec<String> = (self.nodes.iter())
            .map(|(_, port)| format!("nats://127.0.0.1:{port}"))
            .collect();
        urls.join(",")
    }

    /// Kills node `i` with SIGKILL and starts it again on its port and store.
    pub(crate) async fn restart(&mut self, i: usize, down: Duration) -> Result<()> {
        let (node, port) = &mut self.nodes[i];
        node.kill9().await?;
        tokio::time::sleep(down).await;
        node.start()?;
        listening(*port, Duration::from_secs(10)).await
    }
}

/// `NATS_SERVER` if set (CI points it at the current release), else
/// Debian's, else the one on PATH.
fn binary() -> PathBuf {
    match std::env::var_os("NATS_SERVER") {
        Some(path) => PathBuf::from(path),
        None if Path::new("/usr/sbin/nats-server").exists() => "/usr/sbin/nats-server".into(),
        None => "nats-server".into(),
    }
}
