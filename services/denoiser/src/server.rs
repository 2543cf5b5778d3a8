//! The gRPC face of the denoiser: `teaserve.v1.Denoiser` handlers (validate, decode, call the
//! model on the compute thread, encode), plus `grpc.health.v1` and server reflection.
//!
//! Handlers are stateless: every request carries all it needs. Validation, decoding and
//! encoding run inside the compute job, so tokio workers only move bytes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use candle_core::Tensor;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use teaserve_proto::TensorMap;
use teaserve_proto::batch::{split_map, stack_run_blocks};
use teaserve_proto::codec::map_bytes;
use teaserve_proto::codec::{self, encode_tensor};
use teaserve_proto::security::{BearerAuth, ServerSecurityArgs};
use teaserve_proto::serving::{
    Drain, OversizeToResourceExhausted, drain_on_shutdown, grpc_server, nodelay_incoming,
    reflection_services,
};
use teaserve_proto::v1::denoiser_server::{Denoiser, DenoiserServer};
use teaserve_proto::v1::{self, DType};
use teaserve_telemetry::{Metrics, ServerLayer, serve_metrics};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::batcher::{BatchLabels, Batcher, batch_rows};
use crate::engine::Engine;
use crate::error::DenoiserError;
use crate::registry::{ModelAdapter, ModelInfo, Tensors, TextMode};
use crate::resident::ResidentStore;
use crate::spec::{Bindings, InputError, TensorSpec, check_map, check_tensor};

/// Per-call limits of this worker.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest gRPC message accepted or sent, and largest single tensor.
    pub max_message_bytes: usize,
    /// Largest batch per call.
    pub max_batch: usize,
    /// Largest number of tokens (image + text) per sample.
    pub max_tokens: usize,
}

/// The `teaserve.v1.Denoiser` service; answers UNAVAILABLE until the model is loaded.
#[derive(Clone)]
pub struct DenoiserService {
    engine: Arc<OnceLock<Engine>>,
    batcher: Arc<OnceLock<Batcher>>,
    /// Cross-session RunBlocks batching: `None` off, else the collection window.
    batch_window: Option<Duration>,
    queue_depth: usize,
    batches: Family<BatchLabels, Counter>,
    limits: Limits,
    model_source: Arc<String>,
    tensor_bytes: Family<TensorLabels, Counter>,
    /// Calls in flight; refuses new ones once SIGTERM started the drain.
    drain: Drain,
    /// Tensors kept between ResidentStep calls.
    resident: ResidentStore,
}

/// Registers the resident store's counters and gauge.
fn register_resident_metrics(metrics: &Metrics, r: &crate::resident::ResidentMetrics) {
    metrics.register(
        "denoiser_resident_hits",
        "ResidentStep calls that found every kept tensor they needed",
        r.hits.clone(),
    );
    metrics.register(
        "denoiser_resident_misses",
        "ResidentStep calls answered with a resident miss (the controller rebuilds)",
        r.misses.clone(),
    );
    metrics.register(
        "denoiser_resident_rebuilds",
        "kept tensors recomputed from a rebuild request",
        r.rebuilds.clone(),
    );
    metrics.register(
        "denoiser_resident_evictions",
        "session branches evicted from the resident store (budget or time to live)",
        r.evictions.clone(),
    );
    metrics.register(
        "denoiser_resident_bytes",
        "bytes of tensors kept in the resident store",
        r.bytes.clone(),
    );
}

/// Labels of the tensor byte counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TensorLabels {
    /// RPC, e.g. `run_blocks`.
    pub method: &'static str,
    /// `in` (request) or `out` (response).
    pub direction: &'static str,
}

/// Tensor payload bytes of a request or response.
trait Payload {
    fn payload_bytes(&self) -> u64;
}

impl Payload for v1::PreprocessRequest {
    fn payload_bytes(&self) -> u64 {
        map_bytes(&self.inputs)
    }
}
impl Payload for v1::PreprocessResponse {
    fn payload_bytes(&self) -> u64 {
        map_bytes(&self.streams)
            + map_bytes(&self.context)
            + self
                .modulated_input
                .as_ref()
                .map_or(0, |t| t.data.len() as u64)
    }
}
impl Payload for v1::RunBlocksRequest {
    fn payload_bytes(&self) -> u64 {
        map_bytes(&self.streams) + map_bytes(&self.context)
    }
}
impl Payload for v1::RunBlocksResponse {
    fn payload_bytes(&self) -> u64 {
        map_bytes(&self.streams)
    }
}
impl Payload for v1::PostprocessRequest {
    fn payload_bytes(&self) -> u64 {
        map_bytes(&self.context)
            + self
                .hidden_states
                .as_ref()
                .map_or(0, |t| t.data.len() as u64)
    }
}
impl Payload for v1::EncodePromptRequest {
    fn payload_bytes(&self) -> u64 {
        0
    }
}
impl Payload for v1::EncodePromptResponse {
    fn payload_bytes(&self) -> u64 {
        map_bytes(&self.inputs)
    }
}
impl Payload for v1::DecodeRequest {
    fn payload_bytes(&self) -> u64 {
        self.latents.as_ref().map_or(0, |t| t.data.len() as u64)
    }
}
impl Payload for v1::DecodeResponse {
    fn payload_bytes(&self) -> u64 {
        self.png.iter().map(|p| p.len() as u64).sum()
    }
}
impl Payload for v1::ResidentStepRequest {
    fn payload_bytes(&self) -> u64 {
        codec::resident_step_bytes(self)
    }
}
impl Payload for v1::ResidentStepResponse {
    fn payload_bytes(&self) -> u64 {
        self.samples.iter().map(|t| t.data.len() as u64).sum()
    }
}
impl Payload for v1::PostprocessResponse {
    fn payload_bytes(&self) -> u64 {
        self.sample.as_ref().map_or(0, |t| t.data.len() as u64)
    }
}

impl DenoiserService {
    /// A service whose engine is installed later with [`DenoiserService::set_engine`];
    /// tensor traffic is counted in `tensor_bytes`.
    pub fn new(
        limits: Limits,
        model_source: String,
        tensor_bytes: Family<TensorLabels, Counter>,
    ) -> Self {
        Self {
            engine: Arc::new(OnceLock::new()),
            batcher: Arc::new(OnceLock::new()),
            batch_window: None,
            queue_depth: 64,
            batches: Family::default(),
            limits,
            model_source: Arc::new(model_source),
            tensor_bytes,
            drain: Drain::default(),
            resident: ResidentStore::new(0, Duration::from_secs(600)),
        }
    }

    /// Keeps resident tensors in `store` (its budget 0: resident mode off).
    pub fn with_resident(mut self, store: ResidentStore) -> Self {
        self.resident = store;
        self
    }

    fn count(&self, method: &'static str, direction: &'static str, bytes: u64) {
        self.tensor_bytes
            .get_or_create(&TensorLabels { method, direction })
            .inc_by(bytes);
    }

    /// Batches concurrent RunBlocks requests of different sessions (collected for up to
    /// `window`), with at most `queue_depth` waiting; batch sizes are counted in `batches`.
    pub fn with_batching(
        mut self,
        window: Duration,
        queue_depth: usize,
        batches: Family<BatchLabels, Counter>,
    ) -> Self {
        self.batch_window = Some(window);
        self.queue_depth = queue_depth;
        self.batches = batches;
        self
    }

    /// Installs the loaded model; from now on RPCs are served.
    pub fn set_engine(&self, engine: Engine) {
        if let Some(window) = self.batch_window {
            let _ = self.batcher.set(Batcher::start(
                engine.clone(),
                self.limits,
                window,
                self.queue_depth,
                self.batches.clone(),
            ));
        }
        let _ = self.engine.set(engine);
    }

    /// Runs one stage on the compute thread and wraps its result.
    async fn dispatch<Req, Resp>(
        &self,
        stage: &'static str,
        req: Request<Req>,
        f: fn(&dyn ModelAdapter, Req, Limits) -> Result<Resp, DenoiserError>,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Payload + Send + 'static,
        Resp: Payload + Send + 'static,
    {
        let _in_flight = self.drain.enter()?;
        let limits = self.limits;
        let req = req.into_inner();
        self.count(stage, "in", req.payload_bytes());
        let out = self
            .engine()?
            .run(stage, move |m| f(m, req, limits))
            .await?;
        self.count(stage, "out", out.payload_bytes());
        Ok(Response::new(out))
    }

    fn engine(&self) -> Result<&Engine, Status> {
        self.engine
            .get()
            .ok_or_else(|| Status::unavailable("the model is still loading; retry shortly"))
    }
}

/// The wire dtype for results: F32 when unset; only float dtypes are accepted.
pub(crate) fn output_dtype(value: i32) -> Result<DType, DenoiserError> {
    match DType::try_from(value) {
        Ok(DType::DtypeUnspecified) => Ok(DType::F32),
        Ok(d) if codec::is_float(d) => Ok(d),
        _ => Err(InputError::Invalid(format!(
            "wire_dtype {value} is not accepted for results; accepted: F32 (default), F16, BF16"
        ))
        .into()),
    }
}

/// Enforces this worker's per-call limits on the bound dimensions: the batch `B` at most
/// `--max-batch`, and the tokens per sample (image `N` + text `T`) at most `--max-tokens`, which
/// bounds the attention matrix.
fn check_limits(bindings: &Bindings, limits: &Limits) -> Result<(), DenoiserError> {
    if let Some(b) = bindings.get("B")
        && b > limits.max_batch
    {
        return Err(InputError::Limit(format!(
            "batch size B = {b} exceeds this denoiser's maximum of {} (--max-batch); split the \
             batch",
            limits.max_batch
        ))
        .into());
    }
    let n = bindings.get("N").unwrap_or(0);
    let t = bindings.get("T").unwrap_or(0);
    if n + t > limits.max_tokens {
        return Err(InputError::Limit(format!(
            "{n} image + {t} text tokens per sample exceed this denoiser's maximum of {} \
             (--max-tokens)",
            limits.max_tokens
        ))
        .into());
    }
    Ok(())
}

/// Decodes checked wire tensors onto the model's device; float tensors take the model dtype.
pub(crate) fn decode_map(
    map: &TensorMap,
    specs: &[TensorSpec],
    info: &ModelInfo,
    max_bytes: usize,
) -> Result<Tensors, DenoiserError> {
    map.iter()
        .map(|(name, t)| {
            let mut x = codec::decode_tensor(t, &info.device, max_bytes).map_err(|source| {
                InputError::Codec {
                    stage: "decode",
                    field: "tensor",
                    name: name.clone(),
                    source: Box::new(source),
                }
            })?;
            if takes_model_dtype(specs, name) {
                x = x.to_dtype(info.dtype)?;
            }
            Ok((name.clone(), x))
        })
        .collect()
}

/// Whether the stage decodes tensor `name` to the model dtype (its spec says float).
fn takes_model_dtype(specs: &[TensorSpec], name: &str) -> bool {
    specs
        .iter()
        .any(|s| s.name == name && s.kind == crate::spec::Kind::Float)
}

/// What a stage call would receive if `map`, a stage's results, travelled to it: each tensor
/// cast to `wire` (None: its own dtype, as context travels), then to the model dtype where
/// the receiving stage's `specs` say float, contiguous. The same values as [`encode_map`]
/// then [`decode_map`], without the bytes: stages run back to back in one call use it, so
/// their results equal the stage RPCs' bit for bit.
pub(crate) fn as_received(
    map: &Tensors,
    wire: Option<DType>,
    specs: &[TensorSpec],
    info: &ModelInfo,
) -> Result<Tensors, DenoiserError> {
    map.iter()
        .map(|(name, t)| {
            let mut x = match wire {
                Some(d) => t.to_dtype(codec::to_candle_dtype(d)?)?,
                None => t.clone(),
            };
            if takes_model_dtype(specs, name) {
                x = x.to_dtype(info.dtype)?;
            }
            Ok((name.clone(), x.contiguous()?))
        })
        .collect()
}

/// Encodes result tensors as `dtype` (DTYPE_UNSPECIFIED keeps each tensor's own dtype).
fn encode_map(map: &Tensors, dtype: DType) -> Result<TensorMap, DenoiserError> {
    map.iter()
        .map(|(k, v)| Ok((k.clone(), encode_tensor(v, dtype)?)))
        .collect()
}

fn describe(
    info: &ModelInfo,
    limits: &Limits,
    source: &str,
    resident_budget_bytes: u64,
) -> v1::DescribeResponse {
    let stage = |s: &crate::registry::StageSpec| v1::StageSpec {
        inputs: s
            .inputs
            .iter()
            .chain(&s.context)
            .map(TensorSpec::to_proto)
            .collect(),
        outputs: s.outputs.iter().map(TensorSpec::to_proto).collect(),
    };
    v1::DescribeResponse {
        model_type: info.model_type.to_string(),
        architecture: info.architecture.to_string(),
        config_json: info.config_json.clone(),
        dtype: codec::from_candle_dtype(info.dtype).unwrap_or(DType::DtypeUnspecified) as i32,
        device: device_name(&info.device),
        preprocess: Some(stage(&info.preprocess)),
        run_blocks: Some(stage(&info.run_blocks)),
        postprocess: Some(stage(&info.postprocess)),
        max_batch: u32::try_from(limits.max_batch).unwrap_or(u32::MAX),
        max_message_bytes: limits.max_message_bytes as u64,
        model_source: source.to_string(),
        text_mode: info.text_mode.is_some(),
        default_height: info.text_mode.map_or(0, |(h, _)| h as u32),
        default_width: info.text_mode.map_or(0, |(_, w)| w as u32),
        components: info
            .components
            .iter()
            .map(|c| c.name().to_string())
            .collect(),
        scheduler_config_json: info.scheduler_config_json.clone(),
        guidance_embeds: info.guidance_embeds,
        max_sequence_length: u32::try_from(info.max_sequence_length).unwrap_or(u32::MAX),
        resident_budget_bytes,
        num_blocks: u32::try_from(info.num_blocks).unwrap_or(u32::MAX),
    }
}

/// `cpu` or `cuda:N`.
pub fn device_name(device: &candle_core::Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Preprocess on wire inputs, checked against the model's contract and this worker's limits;
/// the results stay tensors.
pub(crate) fn preprocess_tensors(
    model: &dyn ModelAdapter,
    inputs: &TensorMap,
    limits: Limits,
) -> Result<crate::registry::PreprocessOutput, DenoiserError> {
    let (inputs, _) = preprocess_inputs(model, inputs, limits)?;
    model.preprocess(&inputs)
}

/// Preprocess's wire inputs checked against the model's contract and this worker's limits,
/// then decoded; with the sizes they bound (`B`, `N`, `T`, ...).
pub(crate) fn preprocess_inputs(
    model: &dyn ModelAdapter,
    inputs: &TensorMap,
    limits: Limits,
) -> Result<(Tensors, Bindings), DenoiserError> {
    let info = model.info();
    let specs = &info.preprocess.inputs;
    let mut bindings = Bindings::default();
    check_map(
        "Preprocess",
        "inputs",
        specs,
        inputs,
        limits.max_message_bytes,
        &mut bindings,
    )?;
    check_limits(&bindings, &limits)?;
    let decoded = decode_map(inputs, specs, info, limits.max_message_bytes)?;
    Ok((decoded, bindings))
}

pub(crate) fn preprocess(
    model: &dyn ModelAdapter,
    req: v1::PreprocessRequest,
    limits: Limits,
) -> Result<v1::PreprocessResponse, DenoiserError> {
    let out_dtype = output_dtype(req.wire_dtype)?;
    let out = preprocess_tensors(model, &req.inputs, limits)?;
    Ok(v1::PreprocessResponse {
        modulated_input: Some(encode_tensor(&out.modulated_input, out_dtype)?),
        streams: encode_map(&out.streams, out_dtype)?,
        // Context keeps full precision whatever the wire dtype: it is small and every later
        // stage depends on it.
        context: encode_map(&out.context, DType::DtypeUnspecified)?,
    })
}

/// Checks a RunBlocks request against the model's contract and this worker's limits.
fn check_run_blocks(
    info: &ModelInfo,
    req: &v1::RunBlocksRequest,
    limits: &Limits,
) -> Result<(), DenoiserError> {
    let stage = &info.run_blocks;
    output_dtype(req.wire_dtype)?;
    let mut bindings = Bindings::default();
    let max = limits.max_message_bytes;
    check_map(
        "RunBlocks",
        "streams",
        &stage.inputs,
        &req.streams,
        max,
        &mut bindings,
    )?;
    check_map(
        "RunBlocks",
        "context",
        &stage.context,
        &req.context,
        max,
        &mut bindings,
    )?;
    check_limits(&bindings, limits)?;
    block_range(info, req).map(|_| ())
}

/// Most attention tensors one RunBlocks call may carry.
const MAX_ATTENTION_TENSORS: usize = 4096;

/// Decodes the attention tensors of a RunBlocks request (floating point, within the size
/// limit; their shapes are checked by the model).
fn decode_attention(
    map: &TensorMap,
    info: &ModelInfo,
    max: usize,
) -> Result<crate::registry::Tensors, DenoiserError> {
    if map.len() > MAX_ATTENTION_TENSORS {
        return Err(InputError::Invalid(format!(
            "RunBlocks attention has {} tensors; at most {MAX_ATTENTION_TENSORS}",
            map.len()
        ))
        .into());
    }
    map.iter()
        .map(|(k, t)| {
            let bad = |why: String| -> DenoiserError {
                InputError::Invalid(format!(
                    "RunBlocks attention '{}': {why}",
                    teaserve_proto::quote(k)
                ))
                .into()
            };
            let x = teaserve_proto::codec::decode_tensor(t, &info.device, max)
                .map_err(|e| bad(e.to_string()))?;
            if !x.dtype().is_float() {
                return Err(bad(format!(
                    "dtype {:?} is not accepted; use F32, BF16 or F16",
                    x.dtype()
                )));
            }
            Ok((k.clone(), x.to_dtype(info.dtype)?))
        })
        .collect()
}

/// The blocks a RunBlocks request names (unset ends: every block), checked against the model.
fn block_range(
    info: &ModelInfo,
    req: &v1::RunBlocksRequest,
) -> Result<std::ops::Range<usize>, DenoiserError> {
    let n = info.num_blocks;
    let start = req.first_block.map_or(0, |b| b as usize);
    let end = req.end_block.map_or(n, |b| b as usize);
    if start >= end || end > n {
        return Err(InputError::Invalid(format!(
            "RunBlocks blocks {start}..{end} (first_block..end_block, end excluded) are not \
             accepted: this model has {n} blocks, so 0 <= first_block < end_block <= {n}"
        ))
        .into());
    }
    Ok(start..end)
}

pub(crate) fn run_blocks(
    model: &dyn ModelAdapter,
    req: v1::RunBlocksRequest,
    limits: Limits,
) -> Result<v1::RunBlocksResponse, DenoiserError> {
    let info = model.info();
    check_run_blocks(info, &req, &limits)?;
    let stage = &info.run_blocks;
    let out_dtype = output_dtype(req.wire_dtype)?;
    let max = limits.max_message_bytes;
    let streams = decode_map(&req.streams, &stage.inputs, info, max)?;
    let context = decode_map(&req.context, &stage.context, info, max)?;
    let blocks = block_range(info, &req)?;
    if req.attention.is_empty() && !req.return_attention {
        let out = model.run_blocks(&streams, &context, blocks)?;
        return Ok(v1::RunBlocksResponse {
            streams: encode_map(&out, out_dtype)?,
            attention: TensorMap::new(),
        });
    }
    let given = (!req.attention.is_empty())
        .then(|| decode_attention(&req.attention, info, max))
        .transpose()?;
    let (out, used) = model.run_blocks_attention(&streams, &context, blocks, given.as_ref())?;
    Ok(v1::RunBlocksResponse {
        streams: encode_map(&out, out_dtype)?,
        attention: if req.return_attention {
            encode_map(&used, out_dtype)?
        } else {
            TensorMap::new()
        },
    })
}

/// Runs RunBlocks requests of different callers, stacking those whose shapes allow into one
/// batch of at most `--max-batch` rows; each request is validated on its own first, so a bad
/// one fails alone. Results come back in request order, each exactly the rows of its request.
pub(crate) fn run_blocks_group(
    model: &dyn ModelAdapter,
    reqs: Vec<v1::RunBlocksRequest>,
    limits: Limits,
) -> Vec<Result<v1::RunBlocksResponse, DenoiserError>> {
    let info = model.info();
    let mut results: Vec<Option<Result<v1::RunBlocksResponse, DenoiserError>>> =
        reqs.iter().map(|_| None).collect();
    let mut valid: Vec<usize> = Vec::new();
    for (i, req) in reqs.iter().enumerate() {
        match check_run_blocks(info, req, &limits) {
            Ok(()) => valid.push(i),
            Err(e) => results[i] = Some(Err(e)),
        }
    }
    let batched = |name: &str| {
        let specs = info
            .run_blocks
            .inputs
            .iter()
            .chain(&info.run_blocks.context);
        specs
            .into_iter()
            .find(|s| s.name == name)
            .map(|s| s.batch_major())
    };
    // Greedy groups: each takes every later request it can stack with, within max_batch.
    let mut left = valid;
    while let Some(&head) = left.first() {
        let mut members = vec![head];
        let mut rows = batch_rows(&reqs[head]);
        for &j in left.iter().skip(1) {
            let r = batch_rows(&reqs[j]);
            if rows + r <= limits.max_batch
                && stack_run_blocks(&[&reqs[head], &reqs[j]], &batched).is_some()
            {
                members.push(j);
                rows += r;
            }
        }
        left.retain(|k| !members.contains(k));
        let stacked = (members.len() > 1)
            .then(|| {
                stack_run_blocks(
                    &members.iter().map(|&k| &reqs[k]).collect::<Vec<_>>(),
                    &batched,
                )
            })
            .flatten();
        match stacked {
            Some((all, sizes)) => match run_blocks(model, all, limits)
                .and_then(|out| Ok(split_map(&out.streams, &sizes)?))
            {
                Ok(parts) => {
                    for (&k, streams) in members.iter().zip(parts) {
                        results[k] = Some(Ok(v1::RunBlocksResponse {
                            streams,
                            ..Default::default()
                        }));
                    }
                }
                // A failure of the stacked call is reported per request, as if unbatched.
                Err(_) => {
                    for &k in &members {
                        results[k] = Some(run_blocks(model, reqs[k].clone(), limits));
                    }
                }
            },
            None => {
                for &k in &members {
                    results[k] = Some(run_blocks(model, reqs[k].clone(), limits));
                }
            }
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(DenoiserError::Unavailable("request was not run".into()))))
        .collect()
}

pub(crate) fn postprocess(
    model: &dyn ModelAdapter,
    req: v1::PostprocessRequest,
    limits: Limits,
) -> Result<v1::PostprocessResponse, DenoiserError> {
    let info = model.info();
    let stage = &info.postprocess;
    let out_dtype = output_dtype(req.wire_dtype)?;
    let max = limits.max_message_bytes;
    let spec = stage
        .inputs
        .first()
        .ok_or_else(|| DenoiserError::Config("model declares no Postprocess input".into()))?;
    let hidden = req.hidden_states.ok_or_else(|| InputError::Missing {
        stage: "Postprocess",
        field: "hidden_states",
        name: spec.name,
        description: spec.description,
        shape: spec.shape_text(),
    })?;
    let mut bindings = Bindings::default();
    check_tensor(
        "Postprocess",
        "hidden_states",
        spec,
        &hidden,
        max,
        &mut bindings,
    )?;
    check_map(
        "Postprocess",
        "context",
        &stage.context,
        &req.context,
        max,
        &mut bindings,
    )?;
    check_limits(&bindings, &limits)?;
    let hidden_map = TensorMap::from([(spec.name.to_string(), hidden)]);
    let hidden: Tensor = decode_map(&hidden_map, &stage.inputs, info, max)?
        .remove(spec.name)
        .ok_or_else(|| DenoiserError::Config("decoded hidden_states vanished".into()))?;
    let context = decode_map(&req.context, &stage.context, info, max)?;
    let sample = model.postprocess(&hidden, &context)?;
    Ok(v1::PostprocessResponse {
        sample: Some(encode_tensor(&sample, out_dtype)?),
    })
}

fn text_mode(model: &dyn ModelAdapter) -> Result<&dyn TextMode, DenoiserError> {
    model.text_mode().ok_or_else(|| {
        InputError::Invalid(format!(
            "model type '{}' ships no text encoder or decoder; send model-native inputs",
            model.info().model_type
        ))
        .into()
    })
}

fn encode_prompt(
    model: &dyn ModelAdapter,
    req: v1::EncodePromptRequest,
    limits: Limits,
) -> Result<v1::EncodePromptResponse, DenoiserError> {
    let tm = text_mode(model)?;
    if req.prompts.len() > limits.max_batch {
        return Err(InputError::Limit(format!(
            "{} prompts exceed this denoiser's maximum batch of {} (--max-batch)",
            req.prompts.len(),
            limits.max_batch
        ))
        .into());
    }
    let out_dtype = output_dtype(req.wire_dtype)?;
    let p = tm.encode_prompts(
        &req.prompts,
        req.height as usize,
        req.width as usize,
        req.max_sequence_length as usize,
    )?;
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Ok(v1::EncodePromptResponse {
        inputs: encode_map(&p.inputs, out_dtype)?,
        latent_shape: p.latent_shape.iter().map(|&d| d as i64).collect(),
        height: p.height as u32,
        width: p.width as u32,
        max_sequence_length: count(p.max_sequence_length),
        prompt_tokens: p
            .prompt_lengths
            .iter()
            .map(|encoders| v1::PromptTokens {
                untruncated: encoders
                    .iter()
                    .map(|l| (l.encoder.to_string(), count(l.untruncated)))
                    .collect(),
                kept: encoders
                    .iter()
                    .map(|l| (l.encoder.to_string(), count(l.kept)))
                    .collect(),
            })
            .collect(),
    })
}

fn decode(
    model: &dyn ModelAdapter,
    req: v1::DecodeRequest,
    limits: Limits,
) -> Result<v1::DecodeResponse, DenoiserError> {
    let tm = text_mode(model)?;
    let wire = req
        .latents
        .ok_or_else(|| InputError::Invalid("Decode needs `latents`".into()))?;
    let codec_err = |source| InputError::Codec {
        stage: "Decode",
        field: "latents",
        name: "latents".into(),
        source: Box::new(source),
    };
    codec::check_finite(&wire).map_err(codec_err)?;
    let latents = codec::decode_tensor(&wire, &model.info().device, limits.max_message_bytes)
        .map_err(codec_err)?;
    if latents.rank() != 3 || latents.dim(0)? > limits.max_batch {
        return Err(InputError::Invalid(format!(
            "Decode: latents must be [B <= {}, N, C], got {:?}",
            limits.max_batch,
            latents.dims()
        ))
        .into());
    }
    Ok(v1::DecodeResponse {
        png: tm
            .decode(&latents, req.height as usize, req.width as usize)?
            .into_iter()
            .map(bytes::Bytes::from)
            .collect(),
    })
}

#[tonic::async_trait]
impl Denoiser for DenoiserService {
    async fn encode_prompt(
        &self,
        req: Request<v1::EncodePromptRequest>,
    ) -> Result<Response<v1::EncodePromptResponse>, Status> {
        self.dispatch("encode_prompt", req, encode_prompt).await
    }

    async fn decode(
        &self,
        req: Request<v1::DecodeRequest>,
    ) -> Result<Response<v1::DecodeResponse>, Status> {
        self.dispatch("decode", req, decode).await
    }

    async fn describe(
        &self,
        _req: Request<v1::DescribeRequest>,
    ) -> Result<Response<v1::DescribeResponse>, Status> {
        let engine = self.engine()?;
        Ok(Response::new(describe(
            engine.info(),
            &self.limits,
            &self.model_source,
            self.resident.budget(),
        )))
    }

    async fn preprocess(
        &self,
        req: Request<v1::PreprocessRequest>,
    ) -> Result<Response<v1::PreprocessResponse>, Status> {
        self.dispatch("preprocess", req, preprocess).await
    }

    async fn run_blocks(
        &self,
        req: Request<v1::RunBlocksRequest>,
    ) -> Result<Response<v1::RunBlocksResponse>, Status> {
        self.engine()?;
        let Some(batcher) = self.batcher.get() else {
            return self.dispatch("run_blocks", req, run_blocks).await;
        };
        let _in_flight = self.drain.enter()?;
        let req = req.into_inner();
        self.count("run_blocks", "in", req.payload_bytes());
        let out = batcher.submit(req).await?;
        self.count("run_blocks", "out", out.payload_bytes());
        Ok(Response::new(out))
    }

    async fn postprocess(
        &self,
        req: Request<v1::PostprocessRequest>,
    ) -> Result<Response<v1::PostprocessResponse>, Status> {
        self.dispatch("postprocess", req, postprocess).await
    }

    async fn resident_step(
        &self,
        req: Request<v1::ResidentStepRequest>,
    ) -> Result<Response<v1::ResidentStepResponse>, Status> {
        if self.resident.budget() == 0 {
            return Err(Status::failed_precondition(
                "resident mode is off on this denoiser (--resident-bytes 0); use the stage RPCs",
            ));
        }
        let _in_flight = self.drain.enter()?;
        let limits = self.limits;
        let req = req.into_inner();
        self.count("resident_step", "in", req.payload_bytes());
        let store = self.resident.clone();
        let out = self
            .engine()?
            .run("resident_step", move |m| {
                crate::resident_step::resident_step(m, &store, req, limits)
            })
            .await?;
        self.count("resident_step", "out", out.payload_bytes());
        Ok(Response::new(out))
    }

    async fn release_session(
        &self,
        req: Request<v1::ReleaseSessionRequest>,
    ) -> Result<Response<v1::ReleaseSessionResponse>, Status> {
        let id = req.into_inner().session_id;
        Ok(Response::new(v1::ReleaseSessionResponse {
            released_bytes: self.resident.release(&id),
        }))
    }
}

/// Everything [`serve`] needs besides the listener.
pub struct ServeOptions {
    /// Per-call limits.
    pub limits: Limits,
    /// Jobs that may wait for the compute thread before calls are refused.
    pub queue_depth: usize,
    /// Byte budget of the resident tensor store (0: resident mode off).
    pub resident_bytes: u64,
    /// How long an idle session's resident tensors are kept.
    pub resident_ttl: Duration,
    /// Cross-session RunBlocks batching: `None` off, else how long to collect requests
    /// (zero: batch only what waits while the compute thread is busy).
    pub batch_window: Option<Duration>,
    /// Where the weights come from (reported by Describe).
    pub model_source: String,
    /// After the shutdown signal, how long in-flight calls may take before the remaining
    /// connections are closed.
    pub shutdown_grace: Duration,
    /// Where to serve `/metrics` (none: not served, still recorded).
    pub metrics_listen: Option<SocketAddr>,
    /// The metric registry this server records into.
    pub metrics: Metrics,
    /// Background calls (health, reflection, Describe outside a trace) get spans too.
    pub trace_background_calls: bool,
    /// TLS, mutual TLS and bearer tokens (all off by default).
    pub security: ServerSecurityArgs,
}

/// Serves the denoiser on `listener` until `shutdown` resolves. The listener accepts
/// immediately (health NOT_SERVING, RPCs UNAVAILABLE) while `load` builds the model on the
/// compute thread; health turns SERVING once it is loaded. A failed load stops the server
/// and is returned.
pub async fn serve<F>(
    listener: TcpListener,
    load: F,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DenoiserError>
where
    F: FnOnce() -> Result<Box<dyn ModelAdapter>, DenoiserError> + Send + 'static,
{
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let security =
        |e: teaserve_proto::security::SecurityError| DenoiserError::Config(e.to_string());
    let tls = opts.security.tls().map_err(security)?;
    let tokens = opts.security.tokens().map_err(security)?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_not_serving::<DenoiserServer<DenoiserService>>()
        .await;
    let (reflection, reflection_v1alpha) =
        reflection_services(<DenoiserServer<DenoiserService> as tonic::server::NamedService>::NAME)
            .map_err(|e| DenoiserError::Config(format!("building reflection service: {e}")))?;

    let tensor_bytes = Family::<TensorLabels, Counter>::default();
    opts.metrics.register(
        "denoiser_tensor_bytes",
        "tensor payload bytes received (in) and sent (out), by method",
        tensor_bytes.clone(),
    );
    let mut service = DenoiserService::new(opts.limits, opts.model_source.clone(), tensor_bytes)
        .with_resident(ResidentStore::new(opts.resident_bytes, opts.resident_ttl));
    register_resident_metrics(&opts.metrics, &service.resident.metrics);
    let drain = service.drain.clone();
    if let Some(window) = opts.batch_window {
        let batches = Family::<BatchLabels, Counter>::default();
        opts.metrics.register(
            "denoiser_run_blocks_batches",
            "RunBlocks computations by how many requests (of any sessions) they served together",
            batches.clone(),
        );
        service = service.with_batching(window, opts.queue_depth, batches);
    }
    let max = opts.limits.max_message_bytes;
    let grpc = DenoiserServer::new(service.clone())
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);

    let (load_failed_tx, load_failed_rx) = tokio::sync::oneshot::channel::<DenoiserError>();
    let loader = {
        let health = health_reporter.clone();
        let queue_depth = opts.queue_depth;
        let source = opts.model_source.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            match Engine::start(load, queue_depth).await {
                Ok(engine) => {
                    let info = engine.info();
                    tracing::info!(
                        model_type = info.model_type,
                        source = %source,
                        device = %device_name(&info.device),
                        dtype = ?info.dtype,
                        load_ms = started.elapsed().as_millis() as u64,
                        "model loaded; serving"
                    );
                    service.set_engine(engine);
                    health
                        .set_serving::<DenoiserServer<DenoiserService>>()
                        .await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "model failed to load");
                    let _ = load_failed_tx.send(e);
                }
            }
        })
    };

    // Stop on the caller's shutdown signal, or when the model fails to load (reported below):
    // NOT_SERVING at once, new calls UNAVAILABLE, the calls in flight finish, then exit.
    let (reason_tx, reason_rx) = tokio::sync::oneshot::channel::<Option<DenoiserError>>();
    let health = health_reporter.clone();
    let (signal, stopped) = drain_on_shutdown(
        async move {
            let reason = tokio::select! {
                () = shutdown => None,
                Ok(e) = load_failed_rx => Some(e),
            };
            let _ = reason_tx.send(reason);
        },
        drain,
        opts.shutdown_grace,
        move || async move {
            health
                .set_not_serving::<DenoiserServer<DenoiserService>>()
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        },
    );

    tracing::info!(
        addr = ?addr,
        max_message_bytes = max,
        tls = tls.is_some(),
        mutual_tls = opts.security.tls_client_ca.is_some(),
        tokens = tokens.is_some(),
        "denoiser listening"
    );
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = opts.metrics_listen {
        serve_metrics(addr, opts.metrics.clone(), async move {
            let _ = metrics_stopped.await;
        })
        .await
        .map_err(|e| DenoiserError::Config(format!("--metrics-listen {addr}: {e}")))?;
    }
    let mut builder = grpc_server(max);
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| DenoiserError::Config(format!("TLS configuration: {e}")))?;
    }
    let server = builder
        .layer(
            ServerLayer::new(Some(opts.metrics.rpc.clone()))
                .trace_background(opts.trace_background_calls),
        )
        .layer(BearerAuth::new(tokens))
        .layer(OversizeToResourceExhausted::new(max))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(grpc)
        .serve_with_incoming_shutdown(nodelay_incoming(listener), signal);
    let served = tokio::select! {
        r = server => r,
        () = stopped => Ok(()),
    };
    loader.abort();
    let _ = stop_metrics.send(());
    served.map_err(|e| DenoiserError::Unavailable(format!("gRPC server failed: {e}")))?;
    match reason_rx.await {
        Ok(Some(err)) => Err(err),
        _ => {
            tracing::info!("denoiser stopped");
            Ok(())
        }
    }
}
