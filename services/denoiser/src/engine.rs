//! The compute engine: one dedicated OS thread that owns the model and runs every tensor
//! computation, fed by a bounded queue. Tokio workers never compute; they enqueue a job and
//! await its oneshot reply. Each job carries the caller's tracing span, and a panic inside a
//! job is caught and reported as an error while the thread keeps serving.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::time::Instant;

use tokio::sync::oneshot;
use tracing::Instrument as _;

use crate::error::DenoiserError;
use crate::registry::{ModelAdapter, ModelInfo};

type Job = Box<dyn FnOnce(&dyn ModelAdapter) + Send>;

/// Handle to the compute thread; cheap to clone, the thread ends when every handle is gone.
#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<Job>,
    info: std::sync::Arc<ModelInfo>,
    queue_depth: usize,
}

impl Engine {
    /// Spawns the compute thread, loads the model on it with `load`, and returns once the
    /// model is ready (or failed to load). `queue_depth` jobs may wait; more are refused.
    pub async fn start<F>(load: F, queue_depth: usize) -> Result<Self, DenoiserError>
    where
        F: FnOnce() -> Result<Box<dyn ModelAdapter>, DenoiserError> + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel::<Job>(queue_depth.max(1));
        let (ready_tx, ready_rx) = oneshot::channel();
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("teaserve-compute".into())
            .spawn(move || {
                let _entered = span.enter();
                let adapter = match std::panic::catch_unwind(AssertUnwindSafe(load)) {
                    Ok(Ok(adapter)) => adapter,
                    Ok(Err(e)) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                    Err(panic) => {
                        let _ = ready_tx.send(Err(DenoiserError::Panic(panic_message(&panic))));
                        return;
                    }
                };
                if ready_tx.send(Ok(adapter.info().clone())).is_err() {
                    return;
                }
                drop(_entered);
                for job in rx {
                    job(adapter.as_ref());
                }
                tracing::debug!("compute thread stopped: no more handles");
            })
            .map_err(|e| DenoiserError::Load(format!("spawning the compute thread: {e}")))?;
        let info = ready_rx.await.map_err(|_| {
            DenoiserError::Load("the compute thread exited while loading the model".into())
        })??;
        Ok(Self {
            tx,
            info: std::sync::Arc::new(info),
            queue_depth,
        })
    }

    /// The loaded model's description.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Runs `f` on the compute thread and awaits its result. Refuses with
    /// [`DenoiserError::Busy`] when `queue_depth` jobs are already waiting.
    pub async fn run<R, F>(&self, name: &'static str, f: F) -> Result<R, DenoiserError>
    where
        R: Send + 'static,
        F: FnOnce(&dyn ModelAdapter) -> Result<R, DenoiserError> + Send + 'static,
    {
        let (reply_tx, reply_rx) = oneshot::channel();
        let parent = tracing::Span::current();
        let enqueued = Instant::now();
        let job: Job = Box::new(move |model| {
            let queue_wait_ms = enqueued.elapsed().as_secs_f64() * 1e3;
            let span = tracing::info_span!(
                parent: &parent,
                "compute",
                stage = name,
                queue_wait_ms,
                compute_ms = tracing::field::Empty
            );
            let _entered = span.enter();
            let started = Instant::now();
            let result = match std::panic::catch_unwind(AssertUnwindSafe(|| f(model))) {
                Ok(r) => r,
                Err(panic) => Err(DenoiserError::Panic(panic_message(&panic))),
            };
            let compute_ms = started.elapsed().as_secs_f64() * 1e3;
            span.record("compute_ms", compute_ms);
            tracing::debug!(stage = name, compute_ms, queue_wait_ms, "compute done");
            // The caller may have gone (cancelled RPC); nothing to do then.
            let _ = reply_tx.send(result);
        });
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(DenoiserError::Busy(format!(
                    "compute queue full ({} requests waiting); retry later or on another replica",
                    self.queue_depth
                )));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(DenoiserError::Unavailable(
                    "the compute thread has stopped".into(),
                ));
            }
        }
        reply_rx
            .instrument(tracing::Span::current())
            .await
            .map_err(|_| {
                DenoiserError::Unavailable("the compute thread dropped the request".into())
            })?
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".into()
    }
}
