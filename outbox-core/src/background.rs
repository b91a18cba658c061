//! A background task that runs until told to stop: what a relay's and a
//! consumer's handles hold.

use tokio::sync::watch;
use tokio::task::{JoinError, JoinHandle};

/// A spawned task and the switch that stops it.
#[derive(Debug)]
pub(crate) struct Background {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Background {
    /// Spawns `run`, which ends when the receiver it is given changes.
    pub(crate) fn spawn<F>(run: impl FnOnce(watch::Receiver<bool>) -> F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(stopped));
        Self { stop, task }
    }

    /// Tells the task to stop and waits for it; fails only if it panicked.
    pub(crate) async fn shutdown(self) -> Result<(), JoinError> {
        let _ = self.stop.send(true);
        self.task.await
    }
}
