//! Shared helpers for teaserve's end-to-end tests: the reference fixtures (tiny diffusers
//! models with every stage's output computed by diffusers) and real services started on
//! loopback sockets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::clap_free_args::denoiser_args;
use candle_core::{DType, Device, Tensor};
use std::sync::{Arc, Mutex};
use teaserve_controller::policy::{BranchState, TeaCacheParams};
use teaserve_denoiser::loader::{HubOptions, resolve, var_builder};
use teaserve_denoiser::models::flux::{Config, Flux, Inputs};
use teaserve_denoiser::models::qwen_image::{
    Config as QwenConfig, Inputs as QwenInputs, QwenImage,
};
use teaserve_denoiser::registry::LoadOptions;

use teaserve_proto::v1;
use teaserve_proto::v1::cache_controller_client::CacheControllerClient;
use teaserve_proto::v1::denoiser_client::DenoiserClient;
use teaserve_proto::v1::denoiser_server::{Denoiser, DenoiserServer};
use teaserve_proto::{TensorMap, encode_tensor};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Folder of the reference fixtures copied into the repository.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// One reference fixture: a diffusers checkpoint plus its stage outputs.
pub struct Fixture {
    /// The fixture's folder (config.json + diffusion_pytorch_model.safetensors).
    pub dir: PathBuf,
    /// meta.json.
    pub meta: serde_json::Value,
    /// stages.safetensors: every input and stage output, by key.
    pub stages: HashMap<String, Tensor>,
}

impl Fixture {
    /// Loads `tests/fixtures/<name>`.
    pub fn load(name: &str) -> Self {
        let dir = fixtures_dir().join(name);
        let meta =
            serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
        let stages =
            candle_core::safetensors::load(dir.join("stages.safetensors"), &Device::Cpu).unwrap();
        Self { dir, meta, stages }
    }

    /// A stage tensor by key, e.g. `b2.out.sample`.
    pub fn get(&self, key: &str) -> &Tensor {
        self.stages
            .get(key)
            .unwrap_or_else(|| panic!("fixture has no tensor '{key}'"))
    }

    /// The model inputs of a case (`prefix` "" for batch 1, "b2." for batch 2) as a wire map,
    /// named as the model's forward() arguments: every `in.*` tensor except the unpacked
    /// latents, floats in `dtype` except the per-sample scalars (`timestep`, `guidance`) and
    /// position ids, which stay F32 as the controller sends them (bf16 would turn sigma 0.6
    /// into 0.6016), integer masks as they are, plus Qwen-Image's `img_shapes` `[B, 3]`.
    pub fn wire_inputs(&self, prefix: &str, dtype: teaserve_proto::v1::DType) -> TensorMap {
        use teaserve_proto::v1::DType as W;
        let head = format!("{prefix}in.");
        let mut map: TensorMap = self
            .stages
            .iter()
            .filter_map(|(k, t)| k.strip_prefix(&head).map(|n| (n, t)))
            .filter(|(n, _)| !n.contains('.') && *n != "latents_unpacked")
            .map(|(n, t)| {
                let d = if n.ends_with("_ids") || n == "timestep" || n == "guidance" {
                    W::F32
                } else if t.dtype().is_float() {
                    dtype
                } else {
                    W::DtypeUnspecified
                };
                (n.to_string(), encode_tensor(t, d).unwrap())
            })
            .collect();
        let case = if prefix.is_empty() { "b1" } else { "b2" };
        if let Some(shapes) = self.meta["cases"][case]["img_shapes"].as_array() {
            let rows: Vec<i64> = shapes
                .iter()
                .flat_map(|s| s[0].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()))
                .collect();
            let t = Tensor::from_vec(rows, (shapes.len(), 3), &Device::Cpu).unwrap();
            map.insert("img_shapes".into(), encode_tensor(&t, W::I64).unwrap());
        }
        map
    }
}

/// Builds the fixture's Qwen-Image model in-process through the real loading code.
pub fn load_qwen(fx: &Fixture) -> QwenImage {
    let files = resolve(fx.dir.to_str().unwrap(), None, &HubOptions::default()).unwrap();
    let config: QwenConfig = serde_json::from_str(&files.config_json).unwrap();
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype: DType::F32,
        components: Vec::new(),
    };
    QwenImage::new(&config, var_builder(&files, &opts).unwrap()).unwrap()
}

/// The typed Qwen-Image inputs of a fixture case (8x8 latent grid, mask as given).
pub fn qwen_inputs(fx: &Fixture, prefix: &str) -> QwenInputs {
    let g = |n: &str| fx.get(&format!("{prefix}in.{n}")).clone();
    QwenInputs {
        hidden_states: g("hidden_states"),
        encoder_hidden_states: g("encoder_hidden_states"),
        encoder_hidden_states_mask: Some(g("encoder_hidden_states_mask")),
        timestep: g("timestep"),
        img_shape: (1, 8, 8),
    }
}

/// How [`qwen_cfg_reference`] treats residuals.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Residuals {
    /// Each branch keeps its own (what teaserve must do).
    PerBranch,
    /// The counterfactual bug: the negative branch reuses the positive branch's residual.
    Shared,
}

/// How [`qwen_cfg_reference`] combines the branches: `neg + scale * (pos - neg)`, then
/// optionally rescaled per token to `|pos|`.
#[derive(Clone, Copy, Debug)]
pub struct CfgCombine {
    /// `true_cfg_scale`.
    pub scale: f64,
    /// Qwen-Image's per-token norm rescale.
    pub renorm: bool,
}

/// In-process true-CFG reference loop over the candle Qwen-Image model: per step, per branch
/// (positive, negative), the model's stages with TeaCache (or every step computed when
/// `params` is None), CFG combine, Euler step. The latents start from the positive branch's
/// `hidden_states`; returns the final latents (f32) and each step's two decisions.
pub fn qwen_cfg_reference(
    model: &QwenImage,
    [pos, neg]: [&QwenInputs; 2],
    sigmas: &[f64],
    params: Option<&TeaCacheParams>,
    cfg: CfgCombine,
    residuals: Residuals,
) -> (Tensor, Vec<[bool; 2]>) {
    let (scale, renorm) = (cfg.scale, cfg.renorm);
    let mut latents = pos.hidden_states.clone();
    let mut states = [BranchState::new(), BranchState::new()];
    let mut cached: [Option<Tensor>; 2] = [None, None];
    let mut decisions = Vec::new();
    let n = sigmas.len() - 1;
    for (i, w) in sigmas.windows(2).enumerate() {
        let mut preds = Vec::new();
        let mut step = [true; 2];
        for (k, base) in [pos, neg].into_iter().enumerate() {
            let inputs = QwenInputs {
                hidden_states: latents.clone(),
                timestep: Tensor::full(
                    teaserve_controller::schedule::transformer_timestep(w[0]),
                    1,
                    &Device::Cpu,
                )
                .unwrap(),
                ..base.clone()
            };
            let pre = model.preprocess(&inputs).unwrap();
            let compute = match params {
                None => true,
                Some(p) => {
                    let m = &pre.modulated_input;
                    let values: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
                    states[k].decide(p, i, n, m.dims(), &values).compute
                }
            };
            step[k] = compute;
            let slot = if residuals == Residuals::Shared { 0 } else { k };
            let img = if compute {
                let rope = model
                    .rope(
                        inputs.img_shape,
                        inputs.encoder_hidden_states.dim(1).unwrap(),
                    )
                    .unwrap();
                let (img, _) = model
                    .run_blocks(
                        &pre.hidden_states,
                        &pre.encoder_hidden_states,
                        &pre.temb,
                        &rope,
                        inputs.encoder_hidden_states_mask.as_ref(),
                        0..model.config().num_layers,
                    )
                    .unwrap();
                if residuals == Residuals::PerBranch || k == 0 {
                    cached[slot] = Some((&img - &pre.hidden_states).unwrap());
                }
                img
            } else {
                (&pre.hidden_states + cached[slot].as_ref().unwrap()).unwrap()
            };
            preds.push(model.postprocess(&img, &pre.temb).unwrap());
        }
        decisions.push(step);
        let (p, ng) = (&preds[0], &preds[1]);
        let mut comb = (ng + ((p - ng).unwrap() * scale).unwrap()).unwrap();
        if renorm {
            let norm = |t: &Tensor| {
                t.sqr()
                    .unwrap()
                    .sum_keepdim(candle_core::D::Minus1)
                    .unwrap()
                    .sqrt()
                    .unwrap()
            };
            comb = comb
                .broadcast_mul(&(norm(p) / norm(&comb)).unwrap())
                .unwrap();
        }
        latents = (&latents + (comb * (w[1] - w[0])).unwrap()).unwrap();
    }
    (latents.to_dtype(DType::F32).unwrap(), decisions)
}

/// Builds the fixture's FLUX model in-process through the real loading code (f32, CPU).
pub fn load_flux(fx: &Fixture) -> Flux {
    let files = resolve(fx.dir.to_str().unwrap(), None, &HubOptions::default()).unwrap();
    let config: Config = serde_json::from_str(&files.config_json).unwrap();
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype: DType::F32,
        components: Vec::new(),
    };
    Flux::new(&config, var_builder(&files, &opts).unwrap()).unwrap()
}

/// The typed FLUX inputs of a fixture case (`prefix` "" or "b2.").
pub fn flux_inputs(fx: &Fixture, prefix: &str) -> Inputs {
    let g = |n: &str| fx.get(&format!("{prefix}in.{n}")).clone();
    Inputs {
        hidden_states: g("hidden_states"),
        encoder_hidden_states: g("encoder_hidden_states"),
        pooled_projections: g("pooled_projections"),
        timestep: g("timestep"),
        img_ids: g("img_ids"),
        txt_ids: g("txt_ids"),
        guidance: fx.stages.get(&format!("{prefix}in.guidance")).cloned(),
    }
}

/// Largest absolute difference between two tensors of equal shape, in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Arguments for constructing the denoiser's flags without a process.
mod clap_free_args {
    use clap::Parser as _;
    use teaserve_denoiser::config::Args;

    /// Parses denoiser flags as the binary would.
    pub fn denoiser_args(extra: &[&str]) -> Args {
        let mut argv = vec!["denoiser"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }
}

/// A denoiser served in this process on a real loopback TCP socket.
pub struct TestDenoiser {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), teaserve_denoiser::DenoiserError>>>,
}

impl TestDenoiser {
    /// Starts a denoiser with the binary's flags (e.g. `["--model", dir]`) on 127.0.0.1:0 and
    /// waits until its health check says SERVING.
    pub async fn start(flags: &[&str]) -> Self {
        let me = Self::start_unchecked(flags).await;
        me.wait_serving().await;
        me
    }

    /// Starts a denoiser without waiting for it (for servers this harness cannot reach over
    /// plaintext, e.g. with TLS on: the caller checks health its own way).
    pub async fn start_unchecked(flags: &[&str]) -> Self {
        let args = denoiser_args(flags);
        let files = args.model_files().unwrap();
        let source = files.source.clone();
        let load = args.loader(files).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(teaserve_denoiser::server::serve(
            listener,
            load,
            args.serve_options(source),
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A plain channel to the server.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// A Denoiser client with large message limits.
    pub async fn client(&self) -> DenoiserClient<Channel> {
        DenoiserClient::new(self.channel().await)
            .max_decoding_message_size(1 << 30)
            .max_encoding_message_size(1 << 30)
    }

    async fn wait_serving(&self) {
        wait_serving(&self.url()).await;
    }

    /// Stops the server gracefully and returns how it ended.
    pub async fn stop(mut self) -> Result<(), teaserve_denoiser::DenoiserError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(task) => task.await.unwrap(),
            None => Ok(()),
        }
    }
}

impl Drop for TestDenoiser {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A denoiser on a Tokio runtime of its own, so it can die like a process: [`kill`] shuts
/// the runtime down, which drops its listener, every connection and every call in flight at
/// once (peers see connection resets, not a graceful goodbye).
///
/// [`kill`]: KillableDenoiser::kill
pub struct KillableDenoiser {
    /// Where it listens.
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    /// Fires the graceful shutdown (what SIGTERM does to the binary).
    term: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<Result<(), teaserve_denoiser::DenoiserError>>>,
}

impl KillableDenoiser {
    /// Starts a denoiser with the binary's flags on `addr` (`127.0.0.1:0` for any port) and
    /// waits until it is SERVING.
    pub async fn start(flags: &[&str], addr: &str) -> Self {
        let args = denoiser_args(flags);
        let files = args.model_files().unwrap();
        let source = files.source.clone();
        let load = args.loader(files).unwrap();
        let listener = std::net::TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let opts = args.serve_options(source);
        let (term, termed) = tokio::sync::oneshot::channel::<()>();
        let served = runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let shutdown = async move {
                let _ = termed.await;
            };
            teaserve_denoiser::server::serve(listener, load, opts, shutdown).await
        });
        let me = Self {
            addr,
            runtime: Some(runtime),
            term: Some(term),
            served: Some(served),
        };
        wait_serving(&me.url()).await;
        me
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Terminates it as SIGTERM terminates the binary (NOT_SERVING, drain, exit), waits
    /// until its server has returned, then drops whatever the process would have left
    /// behind; returns how long the shutdown took.
    pub async fn terminate(&mut self) -> Duration {
        let started = std::time::Instant::now();
        if let Some(term) = self.term.take() {
            let _ = term.send(());
        }
        if let Some(served) = self.served.take() {
            served.await.unwrap().unwrap();
        }
        let took = started.elapsed();
        self.kill();
        took
    }

    /// Kills it: listener, connections and in-flight calls vanish at once.
    pub fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for KillableDenoiser {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until the denoiser at `url` reports SERVING (panics after 30 s).
pub async fn wait_serving(url: &str) {
    for _ in 0..600 {
        if let Ok(channel) = Channel::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
        {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let resp = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "teaserve.v1.Denoiser".into(),
                })
                .await;
            if let Ok(r) = resp
                && r.into_inner().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("denoiser at {url} never became SERVING");
}

/// A cache-controller served in this process on a real loopback TCP socket.
pub struct TestController {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestController {
    /// Starts a controller with the binary's flags (e.g. `["--denoiser", url]`) on 127.0.0.1:0.
    pub async fn start(flags: &[&str]) -> Self {
        use clap::Parser as _;
        let mut argv = vec!["cache-controller"];
        argv.extend_from_slice(flags);
        let args = teaserve_controller::config::Args::try_parse_from(argv).unwrap();
        let opts = args.serve_options().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(teaserve_controller::server::serve(
            listener,
            opts,
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            addr,
            shutdown: Some(tx),
        }
    }

    /// A CacheController client with large message limits.
    pub async fn client(&self) -> CacheControllerClient<Channel> {
        let url = format!("http://{}", self.addr);
        let channel = loop {
            match Channel::from_shared(url.clone()).unwrap().connect().await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        CacheControllerClient::new(channel)
            .max_decoding_message_size(1 << 30)
            .max_encoding_message_size(1 << 30)
    }
}

impl Drop for TestController {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// What a [`RecordingProxy`] saw.
#[derive(Debug, Default)]
pub struct Recorded {
    /// Preprocess calls.
    pub preprocess: usize,
    /// RunBlocks calls.
    pub run_blocks: usize,
    /// Postprocess calls.
    pub postprocess: usize,
    /// RunBlocks calls refused as a full queue (see [`RecordingProxy::queue_full_run_blocks`]).
    pub queue_full_refusals: usize,
    /// ResidentStep calls (resident mode), rebuilds included.
    pub resident_steps: usize,
    /// ResidentStep calls sent with `rebuild` (after a resident miss).
    pub resident_rebuilds: usize,
    /// The phase of every ResidentStep call, in order (`v1::ResidentPhase` values).
    pub resident_phases: Vec<i32>,
    /// Sessions whose resident tensors were released (ReleaseSession), in order.
    pub released: Vec<String>,
    /// Every Preprocess call in arrival order: its timestep, its `encoder_hidden_states`
    /// (which tells CFG branches apart) and the modulated input it returned.
    pub modulated: Vec<(f32, v1::Tensor, Tensor)>,
}

/// A real gRPC denoiser endpoint that forwards every call to an upstream denoiser and records
/// what passes, so tests can count RunBlocks calls and see the modulated inputs the
/// controller decided on.
#[derive(Clone)]
pub struct RecordingProxy {
    upstream: DenoiserClient<Channel>,
    /// What was seen so far.
    pub log: Arc<Mutex<Recorded>>,
    /// The next this-many compute calls (RunBlocks, ResidentStep) fail with UNAVAILABLE (a
    /// lost connection, as the caller sees it) without reaching the denoiser.
    pub fail_run_blocks: Arc<std::sync::atomic::AtomicUsize>,
    /// ResidentStep answers UNIMPLEMENTED, as a denoiser from before resident mode does
    /// (while Describe still reports the upstream's resident store).
    pub resident_unimplemented: Arc<std::sync::atomic::AtomicBool>,
    /// The next this-many compute calls (RunBlocks, ResidentStep) are refused exactly as a
    /// denoiser whose compute queue is full refuses them (its own error mapping's status).
    pub queue_full_run_blocks: Arc<std::sync::atomic::AtomicUsize>,
    /// Describe reports no `num_blocks`, as a denoiser from before block ranges does.
    pub hide_num_blocks: Arc<std::sync::atomic::AtomicBool>,
    /// ResidentStep refuses the STEP phase exactly as a denoiser from before STEP does.
    pub step_phase_unknown: Arc<std::sync::atomic::AtomicBool>,
}

impl RecordingProxy {
    /// Serves a proxy to `upstream` on 127.0.0.1:0; returns its URL and the proxy.
    pub async fn start(upstream: &TestDenoiser) -> (String, Self) {
        let proxy = Self {
            upstream: upstream.client().await,
            log: Arc::new(Mutex::new(Recorded::default())),
            fail_run_blocks: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            queue_full_run_blocks: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            resident_unimplemented: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            hide_num_blocks: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            step_phase_unknown: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = DenoiserServer::new(proxy.clone())
            .max_decoding_message_size(1 << 30)
            .max_encoding_message_size(1 << 30);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (format!("http://{addr}"), proxy)
    }

    /// Forgets what was recorded.
    pub fn clear(&self) {
        *self.log.lock().unwrap() = Recorded::default();
    }

    /// The fault injected into the next compute call (RunBlocks or ResidentStep), if any.
    fn injected_fault(&self) -> Result<(), Status> {
        use std::sync::atomic::Ordering;
        let take = |n: &std::sync::atomic::AtomicUsize| {
            n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        };
        if take(&self.fail_run_blocks) {
            return Err(Status::unavailable("injected failure: connection lost"));
        }
        if take(&self.queue_full_run_blocks) {
            self.log.lock().unwrap().queue_full_refusals += 1;
            return Err(teaserve_denoiser::DenoiserError::Busy(
                "compute queue full (64 requests waiting); retry later or on another replica"
                    .into(),
            )
            .into());
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Denoiser for RecordingProxy {
    async fn encode_prompt(
        &self,
        req: Request<v1::EncodePromptRequest>,
    ) -> Result<Response<v1::EncodePromptResponse>, Status> {
        self.upstream.clone().encode_prompt(req.into_inner()).await
    }

    async fn decode(
        &self,
        req: Request<v1::DecodeRequest>,
    ) -> Result<Response<v1::DecodeResponse>, Status> {
        self.upstream.clone().decode(req.into_inner()).await
    }

    async fn describe(
        &self,
        req: Request<v1::DescribeRequest>,
    ) -> Result<Response<v1::DescribeResponse>, Status> {
        let mut resp = self.upstream.clone().describe(req.into_inner()).await?;
        if self
            .hide_num_blocks
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            resp.get_mut().num_blocks = 0;
        }
        Ok(resp)
    }

    async fn preprocess(
        &self,
        req: Request<v1::PreprocessRequest>,
    ) -> Result<Response<v1::PreprocessResponse>, Status> {
        let req = req.into_inner();
        let t = req
            .inputs
            .get("timestep")
            .map(|t| decode(t).flatten_all().unwrap().to_vec1::<f32>().unwrap()[0])
            .unwrap_or(f32::NAN);
        let text = req
            .inputs
            .get("encoder_hidden_states")
            .cloned()
            .unwrap_or_default();
        let resp = self.upstream.clone().preprocess(req).await?;
        let mut log = self.log.lock().unwrap();
        log.preprocess += 1;
        if let Some(m) = &resp.get_ref().modulated_input {
            log.modulated.push((t, text, decode(m)));
        }
        Ok(resp)
    }

    async fn run_blocks(
        &self,
        req: Request<v1::RunBlocksRequest>,
    ) -> Result<Response<v1::RunBlocksResponse>, Status> {
        self.injected_fault()?;
        self.log.lock().unwrap().run_blocks += 1;
        self.upstream.clone().run_blocks(req.into_inner()).await
    }

    async fn postprocess(
        &self,
        req: Request<v1::PostprocessRequest>,
    ) -> Result<Response<v1::PostprocessResponse>, Status> {
        self.log.lock().unwrap().postprocess += 1;
        self.upstream.clone().postprocess(req.into_inner()).await
    }

    async fn resident_step(
        &self,
        req: Request<v1::ResidentStepRequest>,
    ) -> Result<Response<v1::ResidentStepResponse>, Status> {
        if self
            .resident_unimplemented
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(Status::unimplemented(
                "Method not found: teaserve.v1.Denoiser/ResidentStep",
            ));
        }
        self.injected_fault()?;
        let req = req.into_inner();
        let step = v1::ResidentPhase::Step as i32;
        if req.phase == step
            && self
                .step_phase_unknown
                .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(Status::invalid_argument(format!(
                "phase {step} is not accepted; use SIGNAL, ADVANCE or FUSED"
            )));
        }
        {
            let mut log = self.log.lock().unwrap();
            log.resident_steps += 1;
            log.resident_rebuilds += usize::from(req.rebuild);
            log.resident_phases.push(req.phase);
        }
        self.upstream.clone().resident_step(req).await
    }

    async fn release_session(
        &self,
        req: Request<v1::ReleaseSessionRequest>,
    ) -> Result<Response<v1::ReleaseSessionResponse>, Status> {
        let req = req.into_inner();
        self.log
            .lock()
            .unwrap()
            .released
            .push(req.session_id.clone());
        self.upstream.clone().release_session(req).await
    }
}

/// Decodes a wire tensor to f32 on the CPU.
pub fn decode(t: &v1::Tensor) -> Tensor {
    teaserve_proto::decode_tensor(t, &Device::Cpu, usize::MAX)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// Runs a command to completion and returns its stdout and stderr; panics, naming `what` and
/// showing the output, when it cannot start or exits unsuccessfully.
#[allow(clippy::panic)]
pub fn run_command(cmd: &mut std::process::Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: could not start {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

/// What a Generate stream delivered: every step event, then the result.
pub struct GenerateRun {
    /// The step events, in order.
    pub steps: Vec<v1::StepEvent>,
    /// The final result.
    pub result: v1::GenerateResult,
}

/// Runs one Generate call to its end.
pub async fn generate_run(
    client: &mut CacheControllerClient<Channel>,
    req: impl tonic::IntoRequest<v1::GenerateRequest>,
) -> Result<GenerateRun, Status> {
    use tokio_stream::StreamExt as _;
    let mut stream = client.generate(req).await?.into_inner();
    let mut steps = Vec::new();
    while let Some(ev) = stream.next().await {
        match ev?.event {
            Some(v1::generate_event::Event::Step(s)) => steps.push(s),
            Some(v1::generate_event::Event::Result(result)) => {
                return Ok(GenerateRun { steps, result });
            }
            None => {}
        }
    }
    Err(Status::internal(
        "the Generate stream ended without a result",
    ))
}

/// A virtualenv `CARGO_TARGET_TMPDIR/<name>` (created on first use) with `packages` installed
/// by pip from `cwd` (PyPI, or whatever pip's own environment variables configure); returns
/// its `bin` folder.
pub fn python_venv(tmp: &Path, name: &str, packages: &[&str], cwd: &Path) -> PathBuf {
    let dir = tmp.join(name);
    let bin = dir.join("bin");
    if !bin.join("python").exists() {
        run_command(
            std::process::Command::new("python3")
                .args(["-m", "venv"])
                .arg(&dir),
            "creating a virtualenv (python3 -m venv)",
        );
    }
    run_command(
        std::process::Command::new(bin.join("python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(packages)
            .current_dir(cwd)
            .env("PYTHONDONTWRITEBYTECODE", "1"),
        &format!("pip install {}", packages.join(" ")),
    );
    bin
}

/// A diffusers pipeline fixture's own recorded run: `tests/fixtures/<name>/reference.json`
/// (the cases and their settings) and `reference.safetensors` (keys `<case>.<name>`).
pub struct PipelineReference {
    /// `reference.json`'s `cases`.
    pub cases: serde_json::Map<String, serde_json::Value>,
    /// Every recorded tensor.
    pub tensors: HashMap<String, Tensor>,
}

impl PipelineReference {
    /// Loads the fixture folder `name`.
    pub fn load(name: &str) -> Self {
        let dir = fixtures_dir().join(name);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        let tensors =
            candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
                .unwrap();
        Self {
            cases: json["cases"].as_object().unwrap().clone(),
            tensors,
        }
    }

    /// The tensor `<case>.<key>`.
    pub fn get(&self, case: &str, key: &str) -> &Tensor {
        self.tensors
            .get(&format!("{case}.{key}"))
            .unwrap_or_else(|| panic!("no {case}.{key}"))
    }

    /// A case's integer setting.
    pub fn u32(&self, case: &str, key: &str) -> u32 {
        self.cases[case][key].as_u64().unwrap() as u32
    }

    /// A case's string setting.
    pub fn str(&self, case: &str, key: &str) -> String {
        self.cases[case][key].as_str().unwrap().to_string()
    }

    /// A case's `image_uint8` as f32 `[H, W, 3]`, to compare with [`png_pixels`].
    pub fn image_uint8(&self, case: &str) -> Tensor {
        self.get(case, "image_uint8").to_dtype(DType::F32).unwrap()
    }
}

/// Decoded RGB pixels of a PNG, `[H, W, 3]` u8 as f32.
pub fn png_pixels(png: &[u8]) -> Tensor {
    let img = image::load_from_memory(png).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    Tensor::from_vec(img.into_raw(), (h as usize, w as usize, 3), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// Asserts `ours` is within `tol` of `want` (max abs difference) and prints the difference.
pub fn check_within(what: &str, ours: &Tensor, want: &Tensor, tol: f32) {
    let d = max_abs_diff(ours, want);
    eprintln!("{what:<48} max|diff| = {d:.3e}");
    assert!(d <= tol, "{what}: max abs diff {d} > {tol}");
}
