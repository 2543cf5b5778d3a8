//! The denoiser pool: the `--denoiser` endpoints, what model each serves (from `Describe`),
//! and round-robin selection among the endpoints serving a model type. Channels connect
//! lazily, so the controller can start before its denoisers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use teaserve_proto::v1::denoiser_client::DenoiserClient;
use teaserve_proto::v1::{DescribeRequest, DescribeResponse};
use teaserve_telemetry::propagation::InjectTraceContext;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::error::ControllerError;

/// A client of one denoiser; every call carries the caller's `traceparent`.
pub type Client = DenoiserClient<InterceptedService<Channel, InjectTraceContext>>;

struct Member {
    url: String,
    client: Client,
    /// `Describe`'s answer, once the endpoint answered.
    described: RwLock<Option<Arc<DescribeResponse>>>,
}

/// A denoiser picked for a call: where it is, a client, and what it serves.
#[derive(Clone)]
pub struct Picked {
    /// Its URL.
    pub endpoint: String,
    /// A client of it.
    pub client: Client,
    /// Its `Describe` answer (model type, tensor contracts, max batch).
    pub describe: Arc<DescribeResponse>,
}

/// The set of denoisers this controller drives.
#[derive(Clone)]
pub struct DenoiserPool {
    members: Arc<Vec<Member>>,
    next: Arc<AtomicUsize>,
}

/// How long a `Describe` probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

impl DenoiserPool {
    /// A pool over `urls` (e.g. `http://127.0.0.1:50051`); message limits apply both ways.
    pub fn new(urls: &[String], max_message_bytes: usize) -> Result<Self, ControllerError> {
        if urls.is_empty() {
            return Err(ControllerError::InvalidArgument(
                "no denoiser endpoints: pass --denoiser URL (repeatable)".into(),
            ));
        }
        let members = urls
            .iter()
            .map(|url| {
                let endpoint = Endpoint::from_shared(url.clone())
                    .map_err(|e| {
                        ControllerError::InvalidArgument(format!("--denoiser {url}: {e}"))
                    })?
                    .tcp_nodelay(true)
                    .connect_timeout(Duration::from_secs(5))
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_timeout(Duration::from_secs(10))
                    .initial_stream_window_size(Some(16 << 20))
                    .initial_connection_window_size(Some(64 << 20));
                let client =
                    DenoiserClient::with_interceptor(endpoint.connect_lazy(), InjectTraceContext)
                        .max_decoding_message_size(max_message_bytes)
                        .max_encoding_message_size(max_message_bytes);
                Ok(Member {
                    url: url.clone(),
                    client,
                    described: RwLock::new(None),
                })
            })
            .collect::<Result<Vec<_>, ControllerError>>()?;
        Ok(Self {
            members: Arc::new(members),
            next: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Asks every endpoint whose model is unknown what it serves.
    pub async fn refresh(&self) {
        let probes = self
            .members
            .iter()
            .filter(|m| self.known(m).is_none())
            .map(|m| async move {
                let mut client = m.client.clone();
                match tokio::time::timeout(PROBE_TIMEOUT, client.describe(DescribeRequest {})).await
                {
                    Ok(Ok(resp)) => {
                        let describe = resp.into_inner();
                        tracing::info!(
                            endpoint = %m.url,
                            model_type = %describe.model_type,
                            "denoiser discovered"
                        );
                        if let Ok(mut slot) = m.described.write() {
                            *slot = Some(Arc::new(describe));
                        }
                    }
                    Ok(Err(status)) => {
                        tracing::debug!(endpoint = %m.url, %status, "denoiser not ready")
                    }
                    Err(_) => tracing::debug!(endpoint = %m.url, "denoiser probe timed out"),
                }
            });
        futures::future::join_all(probes).await;
    }

    fn described(&self, m: &Member) -> Option<Arc<DescribeResponse>> {
        m.described.read().ok().and_then(|s| s.clone())
    }

    fn known(&self, m: &Member) -> Option<String> {
        self.described(m).map(|d| d.model_type.clone())
    }

    /// Whether a reached denoiser of `model_type` accepts prompts (EncodePrompt / Decode).
    pub fn text_mode(&self, model_type: &str) -> bool {
        self.members.iter().any(|m| {
            self.described(m)
                .is_some_and(|d| d.model_type == model_type && d.text_mode)
        })
    }

    /// Endpoints with the model type each serves (`None`: not reached yet).
    pub fn endpoints(&self) -> Vec<(String, Option<String>)> {
        self.members
            .iter()
            .map(|m| (m.url.clone(), self.known(m)))
            .collect()
    }

    /// A client for a denoiser serving `model_type`, round-robin; probes unknown endpoints
    /// once before giving up with UNAVAILABLE.
    pub async fn client_for(&self, model_type: &str) -> Result<Picked, ControllerError> {
        if let Some(found) = self.pick(model_type) {
            return Ok(found);
        }
        self.refresh().await;
        self.pick(model_type).ok_or_else(|| {
            let seen: Vec<String> = self
                .endpoints()
                .into_iter()
                .map(|(url, t)| format!("{url} ({})", t.as_deref().unwrap_or("unreachable")))
                .collect();
            ControllerError::Unavailable(format!(
                "no denoiser serves model type '{model_type}'; endpoints: [{}]",
                seen.join(", ")
            ))
        })
    }

    fn pick(&self, model_type: &str) -> Option<Picked> {
        let serving: Vec<(&Member, Arc<DescribeResponse>)> = self
            .members
            .iter()
            .filter_map(|m| self.described(m).map(|d| (m, d)))
            .filter(|(_, d)| d.model_type == model_type)
            .collect();
        if serving.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % serving.len();
        serving.get(i).map(|(m, d)| Picked {
            endpoint: m.url.clone(),
            client: m.client.clone(),
            describe: d.clone(),
        })
    }

    /// Keeps probing unreached endpoints every `every` until all answered.
    pub fn spawn_discovery(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let pool = self.clone();
        tokio::spawn(async move {
            loop {
                pool.refresh().await;
                if pool.members.iter().all(|m| pool.known(m).is_some()) {
                    return;
                }
                tokio::time::sleep(every).await;
            }
        })
    }
}
