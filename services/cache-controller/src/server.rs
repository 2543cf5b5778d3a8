//! The gRPC face of the controller: `teaserve.v1.CacheController` (Generate, ListModels,
//! explicit sessions), plus `grpc.health.v1` and server reflection.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use teaserve_proto::serving::{
    Drain, OversizeToResourceExhausted, drain_on_shutdown, grpc_server, nodelay_incoming,
    reflection_services,
};
use teaserve_proto::v1::cache_controller_server::{CacheController, CacheControllerServer};
use teaserve_proto::v1::{self, generate_event};
use teaserve_telemetry::{Metrics, ServerLayer, serve_metrics};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::cache_config::CacheDefaults;
use crate::calibration;
use crate::error::ControllerError;
use crate::metrics::ControllerMetrics;
use crate::models;
use crate::orchestrator::{self, CallCounts};
use crate::pool::DenoiserPool;
use crate::session::{Session, SessionLimits, SessionStore};
use crate::text_mode;

/// The `teaserve.v1.CacheController` service.
#[derive(Clone)]
pub struct ControllerService {
    store: SessionStore,
    pool: DenoiserPool,
    defaults: CacheDefaults,
    max_message_bytes: usize,
    metrics: ControllerMetrics,
    /// Calls in flight (Generate and Calibrate streams until they end); refuses new ones
    /// once SIGTERM started the drain.
    drain: Drain,
}

impl ControllerService {
    /// A service over `pool`, with `defaults` for requests that leave settings unset.
    pub fn new(
        pool: DenoiserPool,
        defaults: CacheDefaults,
        limits: SessionLimits,
        max_message_bytes: usize,
        metrics: ControllerMetrics,
    ) -> Self {
        Self {
            store: SessionStore::new(limits, metrics.clone()),
            pool,
            defaults,
            max_message_bytes,
            metrics,
            drain: Drain::default(),
        }
    }

    /// The live sessions.
    pub fn store(&self) -> &SessionStore {
        &self.store
    }

    /// The model a request runs on: the one it names, else the controller's default model
    /// (the stage YAML's `model_class_name`), else the only model type its denoisers serve.
    /// An error when none of them decides; the cache plan's errors (the seed's) come first.
    async fn model_for(&self, req: &v1::GenerateRequest) -> Result<String, ControllerError> {
        if !req.model_class_name.is_empty() {
            // The cache plan's own errors (the seed's) come first.
            crate::cache_config::resolve(
                &self.defaults,
                &req.cache_adapter,
                req.cache_config.as_ref(),
                &req.model_class_name,
            )?;
            self.known_model(&req.model_class_name).await?;
            return Ok(req.model_class_name.clone());
        }
        let served = match self.default_model().await {
            Ok(model) => return Ok(model),
            Err(served) => served,
        };
        crate::cache_config::resolve(
            &self.defaults,
            &req.cache_adapter,
            req.cache_config.as_ref(),
            "",
        )?;
        let why = if served.is_empty() {
            "no denoiser has reported its model type yet".to_string()
        } else {
            format!("the denoisers serve several model types: {served:?}")
        };
        Err(ControllerError::InvalidArgument(format!(
            "model_class_name is required: {why}, and no default model is configured (stage \
             YAML `model_class_name`); one of {}",
            models::supported_list()
        )))
    }

    /// A model type no model table and no denoiser knows is the caller's mistake
    /// (INVALID_ARGUMENT with the supported list), not an outage: UNAVAILABLE stays for a
    /// known type whose denoisers are all down.
    async fn known_model(&self, model_type: &str) -> Result<(), ControllerError> {
        if models::lookup(model_type).is_some()
            || self
                .pool
                .served_model_types()
                .await
                .iter()
                .any(|t| t == model_type)
        {
            return Ok(());
        }
        Err(ControllerError::InvalidArgument(format!(
            "Unknown model type: '{}'. Supported: {}",
            teaserve_proto::quote(model_type),
            models::supported_list()
        )))
    }

    /// The controller's default model: the stage YAML's `model_class_name`, else the only
    /// model type its denoisers serve; else the types served (none or several).
    async fn default_model(&self) -> Result<String, Vec<String>> {
        if let Some(m) = &self.defaults.model_class_name {
            return Ok(m.clone());
        }
        let served = self.pool.served_model_types().await;
        match served.as_slice() {
            [only] => Ok(only.clone()),
            _ => Err(served),
        }
    }

    async fn create(
        &self,
        req: &v1::GenerateRequest,
    ) -> Result<(String, v1::SessionInfo), ControllerError> {
        let model_type = self.model_for(req).await?;
        let mut decode_size = None;
        let prepared;
        let req = if text_mode::requested(req) {
            crate::session::precheck(req, &self.defaults, &model_type)?;
            let (r, size) = text_mode::prepare(req, &model_type, &self.pool).await?;
            decode_size = Some(size);
            prepared = r;
            &prepared
        } else {
            req
        };
        let mut session =
            Session::create(req, &model_type, &self.defaults, self.max_message_bytes)?;
        session.decode_size = decode_size;
        let info = session.info(Duration::ZERO);
        let id = self.store.insert(session)?;
        tracing::info!(
            session_id = %id,
            model_type = %info.model_type,
            steps = i64::from(info.num_inference_steps),
            adapter = %info.cache_adapter,
            threshold = info.rel_l1_thresh,
            cfg = info.cfg,
            "session created"
        );
        Ok((id, info))
    }
}

/// The result of a finished session; in text mode with the decoded PNG.
async fn finish(
    session: &Session,
    pool: &DenoiserPool,
    wall_ms: f64,
) -> Result<v1::GenerateResult, ControllerError> {
    let mut result = orchestrator::result(session, wall_ms)?;
    release_resident(session, pool);
    if let (Some(size), Some(latents)) = (session.decode_size, &result.latents) {
        result.image_png = text_mode::decode(latents, size, &session.model_type, pool)
            .await?
            .into();
    }
    Ok(result)
}

/// Frees a session's resident tensors on the replica holding them when its generation ends
/// (finished, failed or cancelled), in the background (best effort: the replica's time to
/// live frees them otherwise).
fn release_resident(session: &Session, pool: &DenoiserPool) {
    let Some(endpoint) = session.resident.endpoint.clone() else {
        return;
    };
    let (pool, model_type) = (pool.clone(), session.model_type.clone());
    let req = v1::ReleaseSessionRequest {
        session_id: session.id.clone(),
    };
    tokio::spawn(async move {
        let released = pool
            .call_prefer(
                &model_type,
                "ReleaseSession",
                "",
                Some(&endpoint),
                req,
                |mut c, r| async move { c.release_session(r).await },
            )
            .await;
        if let Err(e) = released {
            tracing::debug!(error = %e, "releasing resident tensors failed; their TTL frees them");
        }
    });
}

/// Removes a session from the store when dropped (a Generate that ends in any way).
struct RemoveOnDrop(SessionStore, String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        self.0.remove(&self.1);
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::GenerateEvent, Status>> + Send>>;

async fn drive(
    store: SessionStore,
    pool: DenoiserPool,
    metrics: ControllerMetrics,
    id: String,
    tx: mpsc::Sender<Result<v1::GenerateEvent, Status>>,
) {
    let _remove = RemoveOnDrop(store.clone(), id.clone());
    let started = Instant::now();
    let mut handle = match store.checkout(&id) {
        Ok(h) => h,
        Err(e) => {
            let _ = tx.send(Err(e.into())).await;
            return;
        }
    };
    let mut counts = CallCounts::default();
    while !handle.session.finished() {
        let step = tokio::select! {
            r = orchestrator::run_step(&mut handle.session, &pool, &metrics, &mut counts) => r,
            () = tx.closed() => {
                tracing::info!(session_id = %id, "Generate cancelled by the client; session freed");
                release_resident(&handle.session, &pool);
                return;
            }
        };
        match step {
            Ok(event) => {
                handle.commit();
                let msg = v1::GenerateEvent {
                    event: Some(generate_event::Event::Step(event)),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    tracing::info!(session_id = %id, "Generate cancelled by the client; session freed");
                    release_resident(&handle.session, &pool);
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(session_id = %id, error = %e, "generation failed");
                release_resident(&handle.session, &pool);
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        }
    }
    let wall_ms = started.elapsed().as_secs_f64() * 1e3;
    let msg = finish(&handle.session, &pool, wall_ms)
        .await
        .map(|r| v1::GenerateEvent {
            event: Some(generate_event::Event::Result(v1::GenerateResult {
                trace_id: teaserve_telemetry::current_trace_id(),
                ..r
            })),
        });
    let (computed, reused) = handle.session.counts();
    tracing::info!(session_id = %id, computed, reused, wall_ms, run_blocks_calls = counts.run_blocks, "generation finished");
    let _ = tx.send(msg.map_err(Status::from)).await;
}

#[tonic::async_trait]
impl CacheController for ControllerService {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        req: Request<v1::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let in_flight = self.drain.enter()?;
        let (id, info) = self.create(req.get_ref()).await?;
        let (tx, rx) = mpsc::channel(16);
        // Child of the gRPC server span, which continues the caller's traceparent.
        let span = tracing::info_span!(
            "generate",
            session_id = %id,
            model_type = %info.model_type,
            steps = i64::from(info.num_inference_steps),
            adapter = %info.cache_adapter,
            threshold = info.rel_l1_thresh,
            cfg = info.cfg,
        );
        let (store, pool, metrics) = (self.store.clone(), self.pool.clone(), self.metrics.clone());
        tokio::spawn(
            async move {
                drive(store, pool, metrics, id, tx).await;
                drop(in_flight);
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_models(
        &self,
        _req: Request<v1::ListModelsRequest>,
    ) -> Result<Response<v1::ListModelsResponse>, Status> {
        self.pool.refresh().await;
        let endpoints = self.pool.endpoints();
        let models = models::MODELS
            .iter()
            .map(|m| v1::ModelInfo {
                model_type: m.model_type.to_string(),
                coefficients: m.coefficients.to_vec(),
                default_rel_l1_thresh: m.rel_l1_thresh,
                endpoints: endpoints
                    .iter()
                    .filter(|e| e.model_type.as_deref() == Some(m.model_type))
                    .map(|e| e.url.clone())
                    .collect(),
                text_mode: self.pool.text_mode(m.model_type),
                default_num_inference_steps: m.num_inference_steps,
                default_height: m.image_size.0,
                default_width: m.image_size.1,
                default_true_cfg_scale: m.true_cfg_scale,
                default_guidance_scale: m.guidance_scale,
                default_max_sequence_length: m.max_sequence_length,
                default_cfg_renorm: m.cfg_renorm,
                cache_adapters: crate::cache_config::ADAPTERS
                    .iter()
                    .map(|a| a.to_string())
                    .collect(),
                mag_ratios: m.mag_ratios.to_vec(),
            })
            .collect();
        Ok(Response::new(v1::ListModelsResponse { models }))
    }

    async fn create_session(
        &self,
        req: Request<v1::CreateSessionRequest>,
    ) -> Result<Response<v1::CreateSessionResponse>, Status> {
        let _in_flight = self.drain.enter()?;
        let req = req.into_inner().request.ok_or_else(|| {
            Status::invalid_argument("CreateSession needs `request` (a GenerateRequest)")
        })?;
        let (_, info) = self.create(&req).await?;
        Ok(Response::new(v1::CreateSessionResponse {
            session: Some(info),
        }))
    }

    async fn step(
        &self,
        req: Request<v1::StepRequest>,
    ) -> Result<Response<v1::StepResponse>, Status> {
        let _in_flight = self.drain.enter()?;
        let req = req.into_inner();
        let mut handle = self.store.checkout(&req.session_id)?;
        let started = handle.session.created;
        // The step runs in its own task: if the client goes away mid-step, the step still
        // finishes (or rolls back) as a whole, so the session is never left half-stepped.
        let (pool, metrics) = (self.pool.clone(), self.metrics.clone());
        let span = tracing::Span::current();
        let task = tokio::spawn(
            async move {
                let mut counts = CallCounts::default();
                let event =
                    orchestrator::run_step(&mut handle.session, &pool, &metrics, &mut counts).await;
                let info = handle.commit();
                (handle, event, info)
            }
            .instrument(span),
        );
        let (handle, event, info) = task
            .await
            .map_err(|e| ControllerError::Internal(format!("step task failed: {e}")))?;
        let event = event?;
        let done = handle.session.finished();
        let result = if done {
            let wall_ms = started.elapsed().as_secs_f64() * 1e3;
            Some(finish(&handle.session, &self.pool, wall_ms).await?)
        } else {
            None
        };
        let latents = if req.return_latents || done {
            Some(
                teaserve_proto::encode_tensor(&handle.session.latents, v1::DType::F32)
                    .map_err(ControllerError::from)?,
            )
        } else {
            None
        };
        Ok(Response::new(v1::StepResponse {
            event: Some(event),
            session: Some(info),
            latents,
            result,
        }))
    }

    async fn reset_session(
        &self,
        req: Request<v1::ResetSessionRequest>,
    ) -> Result<Response<v1::ResetSessionResponse>, Status> {
        let req = req.into_inner();
        let mut handle = self.store.checkout(&req.session_id)?;
        handle.session.reset(req.restart);
        Ok(Response::new(v1::ResetSessionResponse {
            session: Some(handle.commit()),
        }))
    }

    async fn close_session(
        &self,
        req: Request<v1::CloseSessionRequest>,
    ) -> Result<Response<v1::CloseSessionResponse>, Status> {
        let id = req.into_inner().session_id;
        // Checking out first refuses to close a session another call is using.
        let handle = self.store.checkout(&id)?;
        release_resident(&handle.session, &self.pool);
        self.store.remove(&id);
        drop(handle);
        tracing::info!(session_id = %id, "session closed");
        Ok(Response::new(v1::CloseSessionResponse {}))
    }

    async fn list_sessions(
        &self,
        _req: Request<v1::ListSessionsRequest>,
    ) -> Result<Response<v1::ListSessionsResponse>, Status> {
        Ok(Response::new(v1::ListSessionsResponse {
            sessions: self.store.list(),
        }))
    }

    type CalibrateStream = CalibrateStream;

    async fn calibrate(
        &self,
        req: Request<v1::CalibrateRequest>,
    ) -> Result<Response<Self::CalibrateStream>, Status> {
        let in_flight = self.drain.enter()?;
        let default_model = if req.get_ref().model_class_name.is_empty() {
            self.default_model().await.ok()
        } else {
            None
        };
        let plan = calibration::run::plan(req.get_ref(), default_model.as_deref())?;
        self.known_model(&plan.model_type).await?;
        let (tx, rx) = mpsc::channel(16);
        let span = tracing::info_span!(
            "calibrate",
            model_type = %plan.model_type,
            generations = plan.generations.len() as i64,
        );
        let me = self.clone();
        tokio::spawn(
            async move {
                me.calibrate_all(plan, tx).await;
                drop(in_flight);
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

type CalibrateStream = Pin<Box<dyn Stream<Item = Result<v1::CalibrateEvent, Status>> + Send>>;

impl ControllerService {
    /// Runs one uncached generation with a recording trace and returns its samples.
    async fn calibration_run(
        &self,
        req: &v1::GenerateRequest,
    ) -> Result<calibration::Trace, ControllerError> {
        let (id, _) = self.create(req).await?;
        let _remove = RemoveOnDrop(self.store.clone(), id.clone());
        let mut handle = self.store.checkout(&id)?;
        handle.session.calibration = Some(calibration::Trace::default());
        let mut counts = CallCounts::default();
        while !handle.session.finished() {
            orchestrator::run_step(&mut handle.session, &self.pool, &self.metrics, &mut counts)
                .await?;
            handle.commit();
        }
        Ok(handle.session.calibration.take().unwrap_or_default())
    }

    /// Runs every generation of `plan`, reporting progress on `tx`, then the fit.
    async fn calibrate_all(
        &self,
        plan: calibration::run::Plan,
        tx: mpsc::Sender<Result<v1::CalibrateEvent, Status>>,
    ) {
        let (mut samples, mut mag_ratios) = (Vec::new(), Vec::new());
        let total = plan.generations.len() as u32;
        for (k, req) in plan.generations.iter().enumerate() {
            let run = tokio::select! {
                r = self.calibration_run(req) => r,
                () = tx.closed() => {
                    tracing::info!("Calibrate cancelled by the client");
                    return;
                }
            };
            match run {
                Ok(trace) => {
                    samples.extend(trace.samples);
                    mag_ratios.push(trace.mag_ratios);
                }
                Err(e) => {
                    tracing::warn!(generation = k as i64, error = %e, "calibration run failed");
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            }
            let progress = v1::CalibrateEvent {
                event: Some(v1::calibrate_event::Event::Progress(
                    v1::CalibrateProgress {
                        generation: k as u32 + 1,
                        generations: total,
                        samples: samples.len() as u32,
                    },
                )),
            };
            if tx.send(Ok(progress)).await.is_err() {
                return;
            }
        }
        let msg = calibration::run::result(&plan, &samples, &mag_ratios).map(|r| {
            tracing::info!(
                samples = i64::from(r.samples),
                r2 = r.r2,
                coefficients = ?r.coefficients,
                "calibration finished"
            );
            v1::CalibrateEvent {
                event: Some(v1::calibrate_event::Event::Result(r)),
            }
        });
        let _ = tx.send(msg.map_err(Status::from)).await;
    }
}

/// Everything [`serve`] needs besides the listener.
pub struct ServeOptions {
    /// Denoiser endpoints.
    pub denoisers: Vec<String>,
    /// Server-wide cache defaults.
    pub defaults: CacheDefaults,
    /// Session bounds.
    pub limits: SessionLimits,
    /// Largest gRPC message accepted or sent (both to clients and to denoisers).
    pub max_message_bytes: usize,
    /// How the denoiser pool connects, balances and retries.
    pub pool: crate::pool::PoolOptions,
    /// After the shutdown signal, how long in-flight calls may take.
    pub shutdown_grace: Duration,
    /// Where to serve `/metrics` (none: not served, still recorded).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The metric registry this server records into.
    pub metrics: Metrics,
    /// Background calls (health, reflection, Describe outside a trace) get spans too.
    pub trace_background_calls: bool,
    /// TLS, mutual TLS and bearer tokens of the public API (all off by default).
    pub security: teaserve_proto::security::ServerSecurityArgs,
}

/// The health service name that reports whether this controller can reach a denoiser.
pub const DENOISERS_HEALTH: &str = "teaserve.v1.CacheController/denoisers";

/// Keeps [`DENOISERS_HEALTH`] SERVING while at least one denoiser is reachable (described
/// and healthy), NOT_SERVING otherwise. `teaserve.v1.CacheController` itself stays SERVING
/// while the controller accepts calls: denoisers restarting must not take the controller out
/// of its load balancer (calls retry and wait for them), but an operator or a readiness probe
/// that wants "can do work now" asks for this name.
fn spawn_denoiser_health(
    pool: DenoiserPool,
    health: tonic_health::server::HealthReporter,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let reachable = pool
                .endpoints()
                .iter()
                .any(|e| e.usable && e.model_type.is_some());
            if last != Some(reachable) {
                let status = if reachable {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                health.set_service_status(DENOISERS_HEALTH, status).await;
                last = Some(reachable);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

/// Serves the controller on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControllerError> {
    let security = |e: teaserve_proto::security::SecurityError| {
        ControllerError::InvalidArgument(e.to_string())
    };
    let tls = opts.security.tls().map_err(security)?;
    let tokens = opts.security.tokens().map_err(security)?;
    let pool = DenoiserPool::new(&opts.denoisers, opts.pool.clone())?;
    let discovery = pool.spawn_upkeep();
    {
        let pool = pool.clone();
        tokio::spawn(async move { pool.warn_unreachable().await });
    }
    let controller_metrics = ControllerMetrics::register(&opts.metrics);
    let service = ControllerService::new(
        pool,
        opts.defaults,
        opts.limits,
        opts.max_message_bytes,
        controller_metrics,
    );
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = opts.metrics_listen {
        serve_metrics(addr, opts.metrics.clone(), async move {
            let _ = metrics_stopped.await;
        })
        .await
        .map_err(|e| ControllerError::InvalidArgument(format!("--metrics-listen {addr}: {e}")))?;
    }
    let reaper = service.store().spawn_reaper();
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CacheControllerServer<ControllerService>>()
        .await;
    // Known from the first call on (NOT_SERVING until the pool has described a denoiser), so a
    // probe never sees it unregistered.
    health_reporter
        .set_service_status(DENOISERS_HEALTH, tonic_health::ServingStatus::NotServing)
        .await;
    let denoiser_health = spawn_denoiser_health(service.pool.clone(), health_reporter.clone());
    let (reflection, reflection_v1alpha) = reflection_services(
        <CacheControllerServer<ControllerService> as tonic::server::NamedService>::NAME,
    )
    .map_err(|e| ControllerError::Internal(format!("building reflection service: {e}")))?;
    let max = opts.max_message_bytes;
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        denoisers = ?opts.denoisers,
        tls = tls.is_some(),
        mutual_tls = opts.security.tls_client_ca.is_some(),
        tokens = tokens.is_some(),
        denoiser_tls = opts.pool.security.tls.is_some(),
        "cache-controller listening"
    );
    // SIGTERM: NOT_SERVING at once, new calls UNAVAILABLE, Generate / Calibrate streams and
    // session calls in flight finish (within the grace), then exit.
    let health = health_reporter.clone();
    let (signal, stopped) = drain_on_shutdown(
        shutdown,
        service.drain.clone(),
        opts.shutdown_grace,
        move || async move {
            health
                .set_not_serving::<CacheControllerServer<ControllerService>>()
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        },
    );
    let mut builder = grpc_server(max);
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| ControllerError::InvalidArgument(format!("TLS configuration: {e}")))?;
    }
    let server = builder
        .layer(
            ServerLayer::new(Some(opts.metrics.rpc.clone()))
                .trace_background(opts.trace_background_calls),
        )
        .layer(teaserve_proto::security::BearerAuth::new(tokens))
        .layer(OversizeToResourceExhausted::new(max))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(
            CacheControllerServer::new(service)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .serve_with_incoming_shutdown(nodelay_incoming(listener), signal);
    let result = tokio::select! {
        r = server => r,
        () = stopped => Ok(()),
    };
    discovery.abort();
    reaper.abort();
    denoiser_health.abort();
    let _ = stop_metrics.send(());
    result.map_err(|e| ControllerError::Unavailable(format!("gRPC server failed: {e}")))
}
