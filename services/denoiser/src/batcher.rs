//! Cross-session batching of `RunBlocks`: requests of different sessions that wait for the
//! compute thread at the same time (or arrive within `--batch-window-ms` of each other) and
//! have stackable shapes run as one batch, and each caller gets its own rows back. With a
//! window of 0 nothing waits on purpose: requests queue only while the compute thread is busy,
//! so an idle worker answers as fast as without batching and a loaded one batches for free.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use teaserve_proto::v1;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;

use crate::engine::Engine;
use crate::error::DenoiserError;
use crate::server::{Limits, run_blocks_group};

/// Labels of the batch counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BatchLabels {
    /// Requests that were handed to the compute thread together.
    pub requests: u32,
}

struct Pending {
    req: v1::RunBlocksRequest,
    reply: oneshot::Sender<Result<v1::RunBlocksResponse, DenoiserError>>,
    span: tracing::Span,
}

/// Collects `RunBlocks` requests and hands them to the engine in groups.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Pending>,
    queue_depth: usize,
}

impl Batcher {
    /// Starts the batching task in front of `engine`; at most `queue_depth` requests wait.
    pub fn start(
        engine: Engine,
        limits: Limits,
        window: Duration,
        queue_depth: usize,
        batches: Family<BatchLabels, Counter>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(queue_depth.max(1));
        tokio::spawn(run(rx, engine, limits, window, batches));
        Self { tx, queue_depth }
    }

    /// Runs one request, possibly batched with others; RESOURCE_EXHAUSTED when the queue is
    /// full.
    pub async fn submit(
        &self,
        req: v1::RunBlocksRequest,
    ) -> Result<v1::RunBlocksResponse, DenoiserError> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            req,
            reply,
            span: tracing::Span::current(),
        };
        self.tx.try_send(pending).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => DenoiserError::Busy(format!(
                "RunBlocks queue full ({} requests waiting); retry later or on another replica",
                self.queue_depth
            )),
            mpsc::error::TrySendError::Closed(_) => {
                DenoiserError::Unavailable("the batcher has stopped".into())
            }
        })?;
        answer
            .await
            .map_err(|_| DenoiserError::Unavailable("the batcher dropped the request".into()))?
    }
}

/// Rows of a request's `hidden_states` (1 when it has none; validation reports that).
pub(crate) fn batch_rows(req: &v1::RunBlocksRequest) -> usize {
    req.streams
        .get("hidden_states")
        .and_then(|t| t.shape.first())
        .map_or(1, |&d| usize::try_from(d).unwrap_or(1).max(1))
}

/// The same failure for every member of a group whose job never ran.
fn for_each(e: &DenoiserError) -> DenoiserError {
    match e {
        DenoiserError::Busy(m) => DenoiserError::Busy(m.clone()),
        DenoiserError::Panic(m) => DenoiserError::Panic(m.clone()),
        other => DenoiserError::Unavailable(other.to_string()),
    }
}

async fn run(
    mut rx: mpsc::Receiver<Pending>,
    engine: Engine,
    limits: Limits,
    window: Duration,
    batches: Family<BatchLabels, Counter>,
) {
    while let Some(first) = rx.recv().await {
        let deadline = tokio::time::Instant::now() + window;
        let mut total = batch_rows(&first.req);
        let mut group = vec![first];
        // Whatever is waiting already, then (with a window) whatever arrives in time.
        while total < limits.max_batch {
            let next = match rx.try_recv() {
                Ok(p) => Some(p),
                Err(_) if window.is_zero() => None,
                Err(_) => tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .ok()
                    .flatten(),
            };
            let Some(p) = next else { break };
            total += batch_rows(&p.req);
            group.push(p);
        }
        let n = group.len();
        batches
            .get_or_create(&BatchLabels {
                requests: u32::try_from(n).unwrap_or(u32::MAX),
            })
            .inc();
        let span = group
            .first()
            .map_or_else(tracing::Span::none, |p| p.span.clone());
        for p in group.iter().skip(1) {
            tracing::debug!(parent: &p.span, requests = n as i64, "RunBlocks batched with other sessions");
        }
        let (reqs, replies): (Vec<_>, Vec<_>) = group.into_iter().map(|p| (p.req, p.reply)).unzip();
        let results = engine
            .run("run_blocks", move |m| Ok(run_blocks_group(m, reqs, limits)))
            .instrument(span)
            .await;
        match results {
            Ok(results) => {
                for (reply, r) in replies.into_iter().zip(results) {
                    let _ = reply.send(r);
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(for_each(&e)));
                }
            }
        }
    }
}
