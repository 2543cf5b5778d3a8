//! The denoiser pool: which denoisers exist (a static `--denoiser` list, or `dns:///name:port`
//! re-resolved periodically, as a Kubernetes headless Service publishes its pods), what model
//! each serves (from `Describe`), whether each is healthy (a `grpc.health.v1` watch per
//! endpoint), and which one takes the next call: power of two choices on in-flight calls among
//! the healthy endpoints of the model type. A call that fails because its denoiser is gone
//! (UNAVAILABLE, connection loss, deadline) is retried on another replica with backoff, within
//! a bounded number of attempts; every denoiser RPC is idempotent, so a retry cannot change a
//! result. Channels connect lazily, so the controller can start before its denoisers.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use teaserve_proto::serving::is_queue_full;
use teaserve_proto::v1::denoiser_client::DenoiserClient;
use teaserve_proto::v1::{DescribeRequest, DescribeResponse};
use teaserve_telemetry::propagation::InjectTraceContext;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tracing::Instrument as _;

use crate::error::ControllerError;

/// A client of one denoiser; every call carries the caller's `traceparent`.
pub type Client = DenoiserClient<InterceptedService<Channel, DenoiserMetadata>>;

/// What every call to a denoiser carries: the W3C trace context and, when configured, the
/// bearer token denoisers require.
#[derive(Clone)]
pub struct DenoiserMetadata {
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for DenoiserMetadata {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let mut req = InjectTraceContext.call(req)?;
        if let Some(a) = &self.authorization {
            req.metadata_mut().insert("authorization", a.clone());
        }
        Ok(req)
    }
}

/// The health service name denoisers report.
const HEALTH_SERVICE: &str = "teaserve.v1.Denoiser";
/// How long a `Describe` probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// How the pool connects, balances and retries.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Largest message sent to or accepted from a denoiser.
    pub max_message_bytes: usize,
    /// Deadline of one attempt of one denoiser RPC.
    pub call_timeout: Duration,
    /// Attempts per denoiser RPC, each on a replica not tried yet (1: no retries).
    pub max_attempts: usize,
    /// Pause before the first retry; doubles per further retry.
    pub retry_backoff: Duration,
    /// How long an endpoint whose call failed for transport reasons is passed over.
    pub eject_for: Duration,
    /// How often `dns:///` endpoints are re-resolved.
    pub resolve_every: Duration,
    /// HTTP/2 keepalive ping interval (a dead peer is noticed within this plus the timeout).
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is dropped.
    pub keepalive_timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// TLS towards denoisers and the token they require (both off by default).
    pub security: teaserve_proto::security::ClientSecurity,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            max_message_bytes: 512 << 20,
            call_timeout: Duration::from_secs(120),
            max_attempts: 3,
            retry_backoff: Duration::from_millis(25),
            eject_for: Duration::from_secs(5),
            resolve_every: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            security: Default::default(),
        }
    }
}

/// Where endpoints come from.
#[derive(Debug, Clone)]
enum Source {
    /// A fixed URL (its member is created up front and never removed).
    Static,
    /// A DNS name whose A/AAAA records are the endpoints (`http://ip:port` each).
    Dns { target: String, host_port: String },
}

/// Health as last reported by the endpoint's watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Health {
    Unknown = 0,
    Serving = 1,
    NotServing = 2,
}

struct Member {
    url: String,
    /// The DNS target it came from (`None`: static).
    from: Option<String>,
    client: Client,
    channel: Channel,
    described: RwLock<Option<Arc<DescribeResponse>>>,
    /// Why the last Describe failed, for "no denoiser" messages.
    last_error: Mutex<Option<String>>,
    in_flight: AtomicUsize,
    health: AtomicU8,
    ejected_until: Mutex<Option<Instant>>,
    watcher: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Ok(mut w) = self.watcher.lock()
            && let Some(h) = w.take()
        {
            h.abort();
        }
    }
}

impl Member {
    fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            1 => Health::Serving,
            2 => Health::NotServing,
            _ => Health::Unknown,
        }
    }

    fn set_health(&self, h: Health) {
        self.health.store(h as u8, Ordering::Relaxed);
    }

    fn described(&self) -> Option<Arc<DescribeResponse>> {
        self.described.read().ok().and_then(|s| s.clone())
    }

    fn ejected(&self) -> bool {
        self.ejected_until
            .lock()
            .ok()
            .and_then(|u| *u)
            .is_some_and(|until| Instant::now() < until)
    }

    fn eject(&self, for_: Duration) {
        if let Ok(mut u) = self.ejected_until.lock() {
            *u = Some(Instant::now() + for_);
        }
    }

    fn usable(&self) -> bool {
        self.health() != Health::NotServing && !self.ejected()
    }

    async fn describe_once(&self, timeout: Duration) -> Result<Arc<DescribeResponse>, String> {
        let mut client = self.client.clone();
        match tokio::time::timeout(timeout, client.describe(DescribeRequest {})).await {
            Ok(Ok(resp)) => {
                let describe = Arc::new(resp.into_inner());
                let first = self.described().is_none();
                if let Ok(mut slot) = self.described.write() {
                    *slot = Some(describe.clone());
                }
                if first {
                    tracing::info!(
                        endpoint = %self.url,
                        model_type = %describe.model_type,
                        "denoiser discovered"
                    );
                }
                Ok(describe)
            }
            Ok(Err(status)) => Err(format!(
                "{}: {}",
                code_name(status.code()),
                status.message()
            )),
            Err(_) => Err("Describe timed out".into()),
        }
    }

    async fn describe(&self, timeout: Duration) -> Result<Arc<DescribeResponse>, String> {
        let result = self.describe_once(timeout).await;
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = result.as_ref().err().cloned();
        }
        result
    }
}

/// Decrements a member's in-flight count when a call ends, however it ends.
struct InFlight(Arc<Member>);

impl InFlight {
    fn new(m: &Arc<Member>) -> Self {
        m.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(m.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Inner {
    sources: Vec<Source>,
    members: RwLock<Vec<Arc<Member>>>,
    opts: PoolOptions,
    rng: AtomicU64,
}

/// One endpoint as the pool sees it (for ListModels, logs and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointState {
    /// Its URL.
    pub url: String,
    /// The model type it serves (`None`: not reached yet).
    pub model_type: Option<String>,
    /// Its last health report is SERVING (or none came yet) and it is not ejected.
    pub usable: bool,
    /// Calls to it in flight.
    pub in_flight: usize,
    /// Why it could not be described, when it could not.
    pub last_error: Option<String>,
}

/// The pipeline component a denoiser must have loaded to answer `method` (Describe's
/// `components`; a denoiser listing none has them all).
pub fn component(method: &str) -> &'static str {
    match method {
        "EncodePrompt" => "text_encoders",
        "Decode" => "vae",
        _ => "transformer",
    }
}

/// The set of denoisers this controller drives; cheap to clone.
#[derive(Clone)]
pub struct DenoiserPool {
    inner: Arc<Inner>,
}

/// A denoiser RPC's response and the endpoint that gave it.
#[derive(Debug)]
pub struct Called<T> {
    /// The response message.
    pub response: T,
    /// Who answered.
    pub endpoint: String,
}

/// Whether a failed call may succeed on another replica: the denoiser is gone, restarting,
/// overloaded at the transport level, or too slow. Input errors and bugs are not retried.
pub fn retryable(status: &tonic::Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => true,
        // Connection-level failures (h2 resets, broken pipes) surface as INTERNAL from the
        // transport; a denoiser's own INTERNAL (a bug) is deterministic and not retried.
        Code::Internal => {
            let m = status.message();
            m.contains("h2 protocol error")
                || m.contains("transport error")
                || m.contains("connection")
                || m.contains("broken pipe")
        }
        _ => false,
    }
}

fn code_name(code: Code) -> String {
    format!("{code:?}")
}

/// Parses `dns:///host:port` or `dns://host:port` into `host:port`.
fn dns_target(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("dns:")?;
    let rest = rest.trim_start_matches('/');
    (!rest.is_empty()).then_some(rest)
}

impl DenoiserPool {
    /// A pool over `urls`: `http://host:port` (fixed) or `dns:///host:port` (every address
    /// the name resolves to, re-resolved every `resolve_every`).
    pub fn new(urls: &[String], opts: PoolOptions) -> Result<Self, ControllerError> {
        if urls.is_empty() {
            return Err(ControllerError::InvalidArgument(
                "no denoiser endpoints: pass --denoiser URL (repeatable), e.g. \
                 http://127.0.0.1:50051 or dns:///denoiser.default.svc:50051"
                    .into(),
            ));
        }
        let mut sources = Vec::with_capacity(urls.len());
        let mut members = Vec::new();
        for url in urls {
            if let Some(host_port) = dns_target(url) {
                if !host_port.contains(':') {
                    return Err(ControllerError::InvalidArgument(format!(
                        "--denoiser {url}: a dns target needs a port, e.g. dns:///{host_port}:50051"
                    )));
                }
                sources.push(Source::Dns {
                    target: url.clone(),
                    host_port: host_port.to_string(),
                });
            } else {
                members.push(Arc::new(Self::member(url, None, &opts)?));
                sources.push(Source::Static);
            }
        }
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x5EED, |d| d.as_nanos() as u64);
        Ok(Self {
            inner: Arc::new(Inner {
                sources,
                members: RwLock::new(members),
                opts,
                rng: AtomicU64::new(seed),
            }),
        })
    }

    fn member(
        url: &str,
        from: Option<String>,
        opts: &PoolOptions,
    ) -> Result<Member, ControllerError> {
        // With TLS configured every denoiser is dialled over TLS, whatever scheme was given.
        let dial = match (&opts.security.tls, url.strip_prefix("http://")) {
            (Some(_), Some(rest)) => format!("https://{rest}"),
            _ => url.to_string(),
        };
        let mut endpoint = Endpoint::from_shared(dial)
            .map_err(|e| ControllerError::InvalidArgument(format!("--denoiser {url}: {e}")))?;
        if let Some(tls) = &opts.security.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(|e| {
                ControllerError::InvalidArgument(format!("--denoiser {url}: TLS: {e}"))
            })?;
        }
        let endpoint = endpoint
            .tcp_nodelay(true)
            .connect_timeout(opts.connect_timeout)
            .http2_keep_alive_interval(opts.keepalive_interval)
            .keep_alive_timeout(opts.keepalive_timeout)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(Some(16 << 20))
            .initial_connection_window_size(Some(64 << 20))
            .max_frame_size(teaserve_proto::serving::MAX_FRAME_SIZE);
        let channel = endpoint.connect_lazy();
        let metadata = DenoiserMetadata {
            authorization: opts.security.authorization.clone(),
        };
        let client = DenoiserClient::with_interceptor(channel.clone(), metadata)
            .max_decoding_message_size(opts.max_message_bytes)
            .max_encoding_message_size(opts.max_message_bytes);
        Ok(Member {
            url: url.to_string(),
            from,
            client,
            channel,
            described: RwLock::new(None),
            last_error: Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            health: AtomicU8::new(Health::Unknown as u8),
            ejected_until: Mutex::new(None),
            watcher: Mutex::new(None),
        })
    }

    fn members(&self) -> Vec<Arc<Member>> {
        self.inner
            .members
            .read()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    /// Asks every endpoint whose model is unknown what it serves (one quick probe each).
    pub async fn refresh(&self) {
        self.probe_unknown(PROBE_TIMEOUT, 1).await;
    }

    /// Before a call gives up for want of a known endpoint: asks every endpoint whose model
    /// is unknown (its health unknown or its last check failed) with the call's own deadline,
    /// a few attempts each, so a controller that has just started never refuses work a
    /// reachable denoiser can do. A refused connection fails each attempt at once, so a
    /// denoiser that is really down costs only the short backoffs.
    async fn refresh_for_call(&self) {
        self.probe_unknown(self.inner.opts.call_timeout, 3).await;
    }

    async fn probe_unknown(&self, timeout: Duration, attempts: u32) {
        let members = self.members();
        let probes = members
            .iter()
            .filter(|m| m.described().is_none())
            .map(|m| async move {
                for attempt in 0..attempts {
                    if attempt > 0 {
                        tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                    }
                    match m.describe(timeout).await {
                        Ok(_) => return,
                        Err(e) => {
                            tracing::debug!(endpoint = %m.url, error = %e, attempt, "denoiser not reached");
                        }
                    }
                }
            });
        futures::future::join_all(probes).await;
    }

    /// Whether a reached denoiser of `model_type` accepts prompts (EncodePrompt / Decode).
    pub fn text_mode(&self, model_type: &str) -> bool {
        self.members().iter().any(|m| {
            m.described()
                .is_some_and(|d| d.model_type == model_type && d.text_mode)
        })
    }

    /// Whether every described denoiser with the transformer of `model_type` keeps resident
    /// tensors (`ResidentStep`); one that does not (`--resident-bytes 0`, or an older
    /// version during a rolling update) keeps the model's sessions in wire mode.
    pub fn resident_capable(&self, model_type: &str) -> bool {
        self.every_transformer(model_type, |d| d.resident_budget_bytes > 0)
    }

    /// Whether every described denoiser with the transformer of `model_type` runs blocks by
    /// range and exposes its attention modules (`Describe.num_blocks` set: FirstBlockCache's
    /// and TaylorSeer's RunBlocks fields; an older version would ignore them).
    pub fn blocks_by_range(&self, model_type: &str) -> bool {
        self.every_transformer(model_type, |d| d.num_blocks > 0)
    }

    /// Whether `ok` holds for every described denoiser serving `model_type`'s transformer
    /// (and there is one).
    fn every_transformer(&self, model_type: &str, ok: impl Fn(&DescribeResponse) -> bool) -> bool {
        let mut any = false;
        for m in self.members() {
            if let Some(d) = m.described()
                && d.model_type == model_type
                && (d.components.is_empty() || d.components.iter().any(|c| c == "transformer"))
            {
                if !ok(&d) {
                    return false;
                }
                any = true;
            }
        }
        any
    }

    /// The model types the reached denoiser endpoints serve, sorted and deduplicated; probes
    /// the endpoints whose model is not known yet first.
    pub async fn served_model_types(&self) -> Vec<String> {
        self.refresh_for_call().await;
        let mut types: Vec<String> = self
            .endpoints()
            .into_iter()
            .filter_map(|e| e.model_type)
            .collect();
        types.sort();
        types.dedup();
        types
    }

    /// Probes every endpoint once and warns about each one that does not answer, so an
    /// operator sees a wrong `--denoiser` address at start-up rather than at the first call.
    pub async fn warn_unreachable(&self) {
        self.refresh().await;
        let endpoints = self.endpoints();
        if endpoints.is_empty() {
            tracing::warn!(
                "no denoiser endpoint resolved yet (dns targets re-resolve every --dns-refresh-secs)"
            );
        }
        for e in endpoints.iter().filter(|e| e.model_type.is_none()) {
            tracing::warn!(
                endpoint = %e.url,
                "denoiser unreachable at start-up (Describe failed); calls go to the other \
                 endpoints until it answers"
            );
        }
    }

    /// Every endpoint with what the pool knows about it.
    pub fn endpoints(&self) -> Vec<EndpointState> {
        self.members()
            .iter()
            .map(|m| EndpointState {
                url: m.url.clone(),
                model_type: m.described().map(|d| d.model_type.clone()),
                usable: m.usable(),
                in_flight: m.in_flight.load(Ordering::Relaxed),
                last_error: m.last_error.lock().ok().and_then(|e| e.clone()),
            })
            .collect()
    }

    /// `Describe` of a denoiser serving `model_type` (replicas of a type agree); probes
    /// unknown endpoints with the call deadline before giving up with UNAVAILABLE.
    pub async fn describe_for(
        &self,
        model_type: &str,
    ) -> Result<Arc<DescribeResponse>, ControllerError> {
        let find = || {
            let members = self.members();
            let of_type: Vec<_> = members
                .iter()
                .filter_map(|m| m.described().map(|d| (m.usable(), d)))
                .filter(|(_, d)| d.model_type == model_type)
                .collect();
            of_type
                .iter()
                .find(|(usable, _)| *usable)
                .or(of_type.first())
                .map(|(_, d)| d.clone())
        };
        if let Some(d) = find() {
            return Ok(d);
        }
        self.refresh_for_call().await;
        find().ok_or_else(|| self.no_denoiser(model_type))
    }

    fn no_denoiser(&self, model_type: &str) -> ControllerError {
        let seen: Vec<String> = self
            .endpoints()
            .into_iter()
            .map(|e| match (&e.model_type, &e.last_error) {
                (Some(t), _) => format!("{} ({t})", e.url),
                (None, Some(err)) => {
                    format!("{} (unreachable: {})", e.url, teaserve_proto::quote(err))
                }
                (None, None) => format!("{} (unreachable)", e.url),
            })
            .collect();
        let sources: Vec<&str> = self
            .inner
            .sources
            .iter()
            .filter_map(|s| match s {
                Source::Dns { target, .. } => Some(target.as_str()),
                Source::Static => None,
            })
            .collect();
        let dns = if sources.is_empty() {
            String::new()
        } else {
            format!("; dns targets: [{}]", sources.join(", "))
        };
        ControllerError::Unavailable(format!(
            "no denoiser serves model type '{model_type}'; endpoints: [{}]{dns}",
            seen.join(", ")
        ))
    }

    fn random(&self) -> u64 {
        let mut z = self
            .inner
            .rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Power of two choices: two random candidates of `model_type` that loaded the component
    /// `method` needs (see [`component`]), not in `tried`, the one
    /// with fewer calls in flight. Usable (healthy, not ejected) endpoints are preferred; when
    /// none is left the others are tried too, since health reports can lag.
    fn pick(&self, model_type: &str, method: &str, tried: &[String]) -> Option<Arc<Member>> {
        let members = self.members();
        let part = component(method);
        let of_type: Vec<&Arc<Member>> = members
            .iter()
            .filter(|m| {
                m.described().is_some_and(|d| {
                    d.model_type == model_type
                        && (d.components.is_empty() || d.components.iter().any(|c| c == part))
                }) && !tried.contains(&m.url)
            })
            .collect();
        let usable: Vec<&Arc<Member>> = of_type.iter().copied().filter(|m| m.usable()).collect();
        let candidates = if usable.is_empty() { of_type } else { usable };
        match candidates.len() {
            0 => None,
            1 => candidates.first().map(|m| (*m).clone()),
            n => {
                let a = (self.random() % n as u64) as usize;
                let b = (a + 1 + (self.random() % (n as u64 - 1)) as usize) % n;
                let (ma, mb) = (candidates.get(a)?, candidates.get(b)?);
                let load = |m: &Arc<Member>| m.in_flight.load(Ordering::Relaxed);
                Some(if load(mb) < load(ma) {
                    (*mb).clone()
                } else {
                    (*ma).clone()
                })
            }
        }
    }

    /// Calls `method` on a denoiser serving `model_type`, chosen by power of two choices;
    /// a transport-level failure is retried on another replica (at most
    /// [`PoolOptions::max_attempts`] attempts, exponential backoff), every attempt a client
    /// span `Denoiser/<method>` labelled with `branches`. Fails with UNAVAILABLE naming every
    /// endpoint tried when no replica could serve; a denoiser's own error (bad input) is
    /// returned at once.
    pub async fn call<Req, Resp, F, Fut>(
        &self,
        model_type: &str,
        method: &'static str,
        branches: &str,
        req: Req,
        f: F,
    ) -> Result<Called<Resp>, ControllerError>
    where
        Req: Clone,
        F: Fn(Client, Req) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        self.call_prefer(model_type, method, branches, None, req, f)
            .await
    }

    /// [`DenoiserPool::call`] with affinity: the first attempt goes to `prefer` (the replica
    /// holding a session's resident tensors) while it is usable; otherwise, and on retries,
    /// any replica. A resident miss comes back as [`ControllerError::ResidentMiss`].
    pub async fn call_prefer<Req, Resp, F, Fut>(
        &self,
        model_type: &str,
        method: &'static str,
        branches: &str,
        prefer: Option<&str>,
        req: Req,
        f: F,
    ) -> Result<Called<Resp>, ControllerError>
    where
        Req: Clone,
        F: Fn(Client, Req) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let opts = &self.inner.opts;
        let mut tried: Vec<String> = Vec::new();
        let mut failures: Vec<String> = Vec::new();
        // Replicas whose queue was full: tried again (after the backoff) only once every
        // other replica has been tried.
        let mut full: Vec<String> = Vec::new();
        let mut refreshed = false;
        for attempt in 0..opts.max_attempts.max(1) {
            let preferred = prefer.filter(|_| attempt == 0).and_then(|url| {
                self.members()
                    .into_iter()
                    .find(|m| m.url == url && m.usable())
            });
            let mut member = preferred.or_else(|| self.pick(model_type, method, &tried));
            if member.is_none() && !refreshed {
                refreshed = true;
                self.refresh_for_call().await;
                member = self.pick(model_type, method, &tried);
            }
            if member.is_none() && !full.is_empty() {
                tried.retain(|u| !full.contains(u));
                full.clear();
                member = self.pick(model_type, method, &tried);
            }
            let Some(member) = member else { break };
            if attempt > 0 {
                let pause = opts.retry_backoff * 2u32.saturating_pow(attempt as u32 - 1);
                tokio::time::sleep(pause).await;
            }
            tried.push(member.url.clone());
            let span = tracing::info_span!(
                "denoiser.call",
                otel.name = %format!("Denoiser/{method}"),
                otel.kind = "client",
                rpc.system = "grpc",
                rpc.method = method,
                endpoint = %member.url,
                branches = %branches,
                attempt = attempt as i64,
                otel.status_code = tracing::field::Empty,
            );
            let outcome = {
                let _guard = InFlight::new(&member);
                tokio::time::timeout(opts.call_timeout, f(member.client.clone(), req.clone()))
                    .instrument(span.clone())
                    .await
            };
            let status = match outcome {
                Ok(Ok(resp)) => {
                    return Ok(Called {
                        response: resp.into_inner(),
                        endpoint: member.url.clone(),
                    });
                }
                Ok(Err(status)) => status,
                Err(_) => tonic::Status::deadline_exceeded(format!(
                    "no answer within {:?} (--denoiser-timeout-secs)",
                    opts.call_timeout
                )),
            };
            span.record("otel.status_code", "ERROR");
            if teaserve_proto::serving::is_resident_miss(&status) {
                return Err(ControllerError::ResidentMiss {
                    endpoint: member.url.clone(),
                    message: status.message().to_string(),
                });
            }
            if !retryable(&status) {
                return Err(ControllerError::Denoiser {
                    endpoint: member.url.clone(),
                    method,
                    code: status.code(),
                    message: status.message().to_string(),
                });
            }
            if is_queue_full(&status) {
                // Overloaded, not broken: the call never started there; no ejection.
                full.push(member.url.clone());
            } else {
                member.eject(opts.eject_for);
            }
            tracing::warn!(
                parent: &span,
                endpoint = %member.url,
                method,
                code = ?status.code(),
                error = %status.message(),
                "denoiser call failed; trying another replica"
            );
            failures.push(format!(
                "{} ({}: {})",
                member.url,
                code_name(status.code()),
                status.message()
            ));
        }
        if failures.is_empty() {
            return Err(self.no_denoiser(model_type));
        }
        Err(ControllerError::Unavailable(format!(
            "{method} failed on every denoiser tried for model type '{model_type}' ({} of at \
             most {} attempts): {}",
            failures.len(),
            opts.max_attempts,
            failures.join("; ")
        )))
    }

    /// Starts the background upkeep: re-resolves `dns:///` targets, and keeps one
    /// `grpc.health.v1` watch per endpoint (which also describes endpoints as they come up).
    /// Abort the returned task to stop it.
    pub fn spawn_upkeep(&self) -> tokio::task::JoinHandle<()> {
        let pool = self.clone();
        tokio::spawn(async move {
            loop {
                pool.resolve().await;
                pool.ensure_watchers();
                tokio::time::sleep(pool.inner.opts.resolve_every).await;
            }
        })
    }

    /// Re-resolves every DNS source: new addresses join, vanished ones leave.
    async fn resolve(&self) {
        for source in &self.inner.sources {
            let Source::Dns { target, host_port } = source else {
                continue;
            };
            let addrs: Vec<SocketAddr> = match tokio::net::lookup_host(host_port.as_str()).await {
                Ok(a) => a.collect(),
                Err(e) => {
                    // Keep the last known endpoints: a DNS hiccup must not empty the pool.
                    tracing::warn!(%target, error = %e, "resolving denoisers failed");
                    continue;
                }
            };
            let urls: Vec<String> = addrs.iter().map(|a| format!("http://{a}")).collect();
            let Ok(mut members) = self.inner.members.write() else {
                continue;
            };
            let before = members.len();
            members.retain(|m| m.from.as_deref() != Some(target) || urls.contains(&m.url));
            let removed = before - members.len();
            let mut added = 0;
            for url in &urls {
                if members.iter().any(|m| &m.url == url) {
                    continue;
                }
                match Self::member(url, Some(target.clone()), &self.inner.opts) {
                    Ok(m) => {
                        members.push(Arc::new(m));
                        added += 1;
                    }
                    Err(e) => tracing::warn!(%url, error = %e, "bad resolved endpoint"),
                }
            }
            if added + removed > 0 {
                tracing::info!(%target, added, removed, total = urls.len(), "denoiser endpoints changed");
            }
        }
    }

    fn ensure_watchers(&self) {
        for m in self.members() {
            let Ok(mut slot) = m.watcher.lock() else {
                continue;
            };
            if slot.as_ref().is_some_and(|h| !h.is_finished()) {
                continue;
            }
            let weak = Arc::downgrade(&m);
            *slot = Some(tokio::spawn(watch_health(weak)).abort_handle());
        }
    }
}

/// Follows one endpoint's `grpc.health.v1.Health/Watch` for as long as the endpoint is in
/// the pool, reconnecting with backoff; describes the endpoint whenever it turns SERVING.
async fn watch_health(member: Weak<Member>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(m) = member.upgrade() else {
            return;
        };
        let mut health = HealthClient::new(m.channel.clone());
        let url = m.url.clone();
        drop(m);
        let watch = health
            .watch(tonic_health::pb::HealthCheckRequest {
                service: HEALTH_SERVICE.into(),
            })
            .await;
        match watch {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    let msg = stream.message().await;
                    let Some(m) = member.upgrade() else {
                        return;
                    };
                    match msg {
                        Ok(Some(resp)) => {
                            let serving = resp.status == ServingStatus::Serving as i32;
                            let was = m.health();
                            m.set_health(if serving {
                                Health::Serving
                            } else {
                                Health::NotServing
                            });
                            if serving {
                                backoff = Duration::from_millis(100);
                                if let Ok(mut u) = m.ejected_until.lock() {
                                    *u = None;
                                }
                                if was != Health::Serving
                                    && let Err(e) = m.describe(PROBE_TIMEOUT).await
                                {
                                    tracing::debug!(endpoint = %url, error = %e, "describe failed");
                                }
                            }
                            if was != m.health() {
                                tracing::info!(endpoint = %url, serving, "denoiser health changed");
                            }
                        }
                        Ok(None) | Err(_) => {
                            if m.health() != Health::NotServing {
                                tracing::warn!(endpoint = %url, "denoiser health watch lost");
                            }
                            m.set_health(Health::NotServing);
                            break;
                        }
                    }
                }
            }
            Err(status) if status.code() == Code::Unimplemented => {
                // No health service there: health stays unknown, calls decide.
                tracing::debug!(endpoint = %url, "denoiser serves no health checks");
                return;
            }
            Err(status) => {
                if let Some(m) = member.upgrade() {
                    if m.health() != Health::NotServing {
                        tracing::debug!(endpoint = %url, %status, "denoiser health unreachable");
                    }
                    m.set_health(Health::NotServing);
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dns_targets_parse() {
        assert_eq!(dns_target("dns:///denoiser:50051"), Some("denoiser:50051"));
        assert_eq!(dns_target("dns://denoiser:50051"), Some("denoiser:50051"));
        assert_eq!(dns_target("http://denoiser:50051"), None);
        assert_eq!(dns_target("dns:///"), None);
    }

    #[test]
    fn retryable_codes() {
        assert!(retryable(&tonic::Status::unavailable("connection refused")));
        assert!(retryable(&tonic::Status::deadline_exceeded("slow")));
        assert!(retryable(&tonic::Status::unknown("transport error")));
        assert!(retryable(&tonic::Status::internal(
            "h2 protocol error: reset"
        )));
        assert!(!retryable(&tonic::Status::internal("a bug")));
        assert!(!retryable(&tonic::Status::invalid_argument("bad shape")));
        assert!(!retryable(&tonic::Status::resource_exhausted("too big")));
    }

    #[tokio::test]
    async fn dns_without_port_is_refused_and_empty_pool_is_refused() {
        let e = DenoiserPool::new(&["dns:///denoiser".into()], PoolOptions::default())
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("needs a port")));
        assert!(DenoiserPool::new(&[], PoolOptions::default()).is_err());
    }

    #[tokio::test]
    async fn dns_sources_resolve_to_endpoints() {
        let pool =
            DenoiserPool::new(&["dns:///localhost:50999".into()], PoolOptions::default()).unwrap();
        assert!(pool.endpoints().is_empty());
        pool.resolve().await;
        let urls: Vec<String> = pool.endpoints().into_iter().map(|e| e.url).collect();
        assert!(!urls.is_empty(), "localhost resolved to nothing");
        assert!(
            urls.iter()
                .all(|u| u.starts_with("http://") && u.ends_with(":50999")),
            "{urls:?}"
        );
        // Re-resolving keeps the same members.
        pool.resolve().await;
        assert_eq!(pool.endpoints().len(), urls.len());
    }

    #[tokio::test]
    async fn nothing_reachable_is_unavailable_naming_endpoints() {
        let pool =
            DenoiserPool::new(&["http://127.0.0.1:9".into()], PoolOptions::default()).unwrap();
        let err = pool
            .call(
                "FluxPipeline",
                "RunBlocks",
                "positive",
                (),
                |mut c, ()| async move { c.describe(DescribeRequest {}).await },
            )
            .await
            .unwrap_err();
        assert!(matches!(err, ControllerError::Unavailable(_)));
        assert!(err.to_string().contains("127.0.0.1:9"), "{err}");
    }
}
