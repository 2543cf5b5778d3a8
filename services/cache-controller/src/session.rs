//! Generation sessions: one per `Generate` call or explicit `CreateSession`, holding the
//! latents, the sigma schedule and every CFG branch's inputs and TeaCache state; and the
//! store that bounds them (count, memory, idle TTL).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType as CDType, Device, Tensor};
use teaserve_proto::codec::{self, dtype_name, is_float};
use teaserve_proto::v1::{self, Branch, DType};
use teaserve_proto::{TensorMap, quote};

use crate::cache_config::{self, CacheDefaults, CachePlan};
use crate::error::ControllerError;
use crate::metrics::ControllerMetrics;
use crate::models;
use crate::policy::BranchState;
use crate::schedule;

/// Most steps one session may run.
pub const MAX_STEPS: u32 = 1000;

/// Inputs the controller sets itself each step; requests must not carry them.
pub const RESERVED_INPUTS: [&str; 1] = ["timestep"];

/// One CFG branch: its model inputs (without the latents) and its TeaCache state.
#[derive(Debug)]
pub struct BranchRun {
    /// POSITIVE or NEGATIVE.
    pub branch: Branch,
    /// Model inputs for this branch, minus `hidden_states` and `timestep`.
    pub inputs: TensorMap,
    /// TeaCache state.
    pub state: BranchState,
    /// Steps whose blocks ran / were skipped.
    pub computed: u32,
    /// Steps that reused the cached residual.
    pub reused: u32,
}

/// A generation in progress.
#[derive(Debug)]
pub struct Session {
    /// Opaque id.
    pub id: String,
    /// The denoiser model (`model_class_name`).
    pub model_type: String,
    /// The caching in force.
    pub plan: CachePlan,
    /// `N + 1` sigmas, the last 0.
    pub sigmas: Vec<f64>,
    /// Index of the next step.
    pub step: usize,
    /// Latents at step 0 (f32, CPU), for `ResetSession { restart }`.
    pub initial_latents: Tensor,
    /// Current latents (f32, CPU), shape of `inputs["hidden_states"]`.
    pub latents: Tensor,
    /// POSITIVE, then NEGATIVE when CFG is on.
    pub branches: Vec<BranchRun>,
    /// `pred = neg + scale * (pos - neg)`.
    pub true_cfg_scale: f64,
    /// Rescale the CFG result to the positive prediction's norm (Qwen-Image).
    pub cfg_renorm: bool,
    /// Wire dtype for latents and streams.
    pub wire_dtype: DType,
    /// The request set `wire_dtype`; unset, it follows the model's dtype where that is BF16 /
    /// F16 (F32 otherwise).
    pub wire_dtype_given: bool,
    /// Stack the CFG branches into one RunBlocks call when both compute and shapes allow.
    pub batch_branches: bool,
    /// When the session was created.
    pub created: Instant,
    /// Text mode: the image size to decode the final latents at (a PNG in the result).
    pub decode_size: Option<(u32, u32)>,
    /// Calibration: per-step rel-L1 samples of the POSITIVE branch (caching must be off).
    pub calibration: Option<crate::calibration::Trace>,
    /// Resident mode (`--resident-tensors`), where the denoisers serving it support it.
    pub resident: Resident,
}

/// What a session in resident mode keeps to find and rebuild its tensors on the denoisers.
#[derive(Debug, Default, Clone)]
pub struct Resident {
    /// Use resident mode for this session.
    pub on: bool,
    /// Bumped by every reset: tensors a denoiser kept for an older one are stale.
    pub generation: u64,
    /// The replica that holds the session's tensors (affinity).
    pub endpoint: Option<String>,
    /// The replica that was sent the branches' conditioning in this generation.
    pub conditioned: Option<String>,
    /// The latents (wire) of earlier steps that a kept tensor came from: the previous step's
    /// and each branch's residual step, to rebuild them on a miss.
    pub history: std::collections::BTreeMap<usize, v1::Tensor>,
    /// A replica answered that it does not know the one-call STEP phase (an older version):
    /// this session's cached steps take two calls, SIGNAL then ADVANCE.
    pub two_calls: bool,
}

fn invalid(msg: impl Into<String>) -> ControllerError {
    ControllerError::InvalidArgument(msg.into())
}

/// Checks a request map's tensors (dtype, shape, length, size cap, finite values).
fn check_tensors(field: &str, map: &TensorMap, max_bytes: usize) -> Result<(), ControllerError> {
    let mut names: Vec<&String> = map.keys().collect();
    names.sort();
    for name in names {
        if let Some(t) = map.get(name) {
            codec::validate(t, max_bytes)
                .and_then(|_| codec::check_finite(t))
                .map_err(|e| invalid(format!("{field}['{}']: {e}", quote(name))))?;
        }
        if RESERVED_INPUTS.contains(&name.as_str()) {
            return Err(invalid(format!(
                "{field}['{name}'] is set by the controller from the sigma schedule; remove it"
            )));
        }
    }
    Ok(())
}

/// The wire dtype a request asks for (F32 when unset, until the model's dtype is known);
/// INVALID_ARGUMENT for non-float ones.
fn wire_dtype(req: &v1::GenerateRequest) -> Result<DType, ControllerError> {
    match DType::try_from(req.wire_dtype) {
        Ok(DType::DtypeUnspecified) => Ok(DType::F32),
        Ok(d) if is_float(d) => Ok(d),
        _ => Err(invalid(format!(
            "wire_dtype {} is not accepted; accepted: F32 (default), F16, BF16",
            req.wire_dtype
        ))),
    }
}

/// The number of steps a request asks for, from `num_inference_steps` and / or `sigmas`
/// (which must agree, be finite and lie in [0, 1]); neither set: the model's default.
pub(crate) fn step_count(
    req: &v1::GenerateRequest,
    model_type: &str,
) -> Result<u32, ControllerError> {
    if let Some(bad) = req
        .sigmas
        .iter()
        .find(|s| !(s.is_finite() && (0.0..=1.0).contains(*s)))
    {
        return Err(invalid(format!(
            "sigmas must be finite numbers in [0, 1], got {bad}"
        )));
    }
    if let Some(i) = req.sigmas.windows(2).position(|w| w[1] > w[0]) {
        return Err(invalid(format!(
            "sigmas must be non-increasing (the sampler walks from noise to data), but \
             sigmas[{}] = {} > sigmas[{i}] = {}",
            i + 1,
            req.sigmas[i + 1],
            req.sigmas[i]
        )));
    }
    let num_steps = match (req.num_inference_steps, req.sigmas.len()) {
        (0, 0) => match models::lookup(model_type) {
            Some(m) => m.num_inference_steps,
            None => {
                return Err(invalid(format!(
                    "model type '{model_type}' has no default num_inference_steps; set \
                     num_inference_steps (1 to {MAX_STEPS}) or sigmas"
                )));
            }
        },
        (0, n) => n as u32,
        (s, 0) => s,
        (s, n) if s as usize == n => s,
        (s, n) => {
            return Err(invalid(format!(
                "num_inference_steps is {s} but {n} sigmas were given; they must agree"
            )));
        }
    };
    if num_steps > MAX_STEPS {
        return Err(invalid(format!(
            "num_inference_steps must be between 1 and {MAX_STEPS}, got {num_steps}"
        )));
    }
    Ok(num_steps)
}

/// Checks everything about a request that needs no tensors (cache plan, steps, sigmas, wire
/// dtype, CFG scale), so text-mode requests fail fast before any denoiser is called.
pub fn precheck(
    req: &v1::GenerateRequest,
    defaults: &CacheDefaults,
    model_class_name: &str,
) -> Result<(), ControllerError> {
    cache_config::resolve(
        defaults,
        &req.cache_adapter,
        req.cache_config.as_ref(),
        model_class_name,
    )?;
    wire_dtype(req)?;
    step_count(req, model_class_name)?;
    if req.negative_prompt.is_some() {
        cfg_scale(req, model_class_name)?;
    }
    Ok(())
}

/// `inputs["guidance"]` for `guidance_scale`: the value for every sample, f32 (as
/// FluxPipeline makes it); refused next to an explicit `inputs["guidance"]`.
fn guidance(scale: f64, batch: usize, inputs: &TensorMap) -> Result<v1::Tensor, ControllerError> {
    if inputs.contains_key("guidance") {
        return Err(invalid(
            "set either guidance_scale or inputs['guidance'], not both",
        ));
    }
    if !scale.is_finite() {
        return Err(invalid(format!(
            "guidance_scale must be a finite number, got {scale}"
        )));
    }
    let t = Tensor::full(scale as f32, batch, &Device::Cpu)?;
    Ok(codec::encode_tensor(&t, DType::F32)?)
}

/// The CFG scale of a request with a NEGATIVE branch: its `true_cfg_scale`, or the model's
/// default when unset; it must be finite and not negative.
pub(crate) fn cfg_scale(
    req: &v1::GenerateRequest,
    model_type: &str,
) -> Result<f64, ControllerError> {
    let scale = match (req.true_cfg_scale, models::lookup(model_type)) {
        (Some(s), _) => s,
        (None, Some(m)) => m.true_cfg_scale,
        (None, None) => {
            return Err(invalid(format!(
                "model type '{model_type}' has no default true_cfg_scale; set true_cfg_scale"
            )));
        }
    };
    if !(scale.is_finite() && scale >= 0.0) {
        return Err(invalid(format!(
            "true_cfg_scale must be a finite number >= 0 (CFG runs above 1; unset: the \
             model's default), got {scale}"
        )));
    }
    Ok(scale)
}

impl Session {
    /// Validates a request and builds its session (nothing runs yet). `model_class_name` is
    /// the model the request runs on: its own, or the controller's default (see
    /// [`crate::server`]); empty when neither decides, which is an error after the cache
    /// plan's own checks.
    pub fn create(
        req: &v1::GenerateRequest,
        model_class_name: &str,
        defaults: &CacheDefaults,
        max_message_bytes: usize,
    ) -> Result<Self, ControllerError> {
        // The cache plan first: its errors (the seed's) take precedence, and it injects
        // model_class_name as the model type.
        let plan = cache_config::resolve(
            defaults,
            &req.cache_adapter,
            req.cache_config.as_ref(),
            model_class_name,
        )?;
        if model_class_name.is_empty() {
            return Err(invalid(format!(
                "model_class_name is required (one of {})",
                models::supported_list()
            )));
        }
        let model_type = model_class_name.to_string();
        if !req.prompt.is_empty()
            || req.negative_prompt.is_some()
            || req.height != 0
            || req.width != 0
            || req.seed != 0
            || req.max_sequence_length != 0
        {
            return Err(invalid(format!(
                "prompt / negative_prompt / seed / height / width / max_sequence_length need a \
                 model that ships a text encoder; model type '{model_type}' takes model-native inputs (hidden_states, \
                 encoder_hidden_states, ...)"
            )));
        }
        let wire_dtype = wire_dtype(req)?;

        check_tensors("inputs", &req.inputs, max_message_bytes)?;
        check_tensors("negative_inputs", &req.negative_inputs, max_message_bytes)?;
        let hidden = req.inputs.get("hidden_states").ok_or_else(|| {
            invalid("inputs['hidden_states'] (the initial packed latents [B, N, C]) is required")
        })?;
        let (hdtype, hshape) = codec::validate(hidden, max_message_bytes)
            .map_err(|e| invalid(format!("inputs['hidden_states']: {e}")))?;
        if !is_float(hdtype) || hshape.len() < 2 || hshape.contains(&0) {
            return Err(invalid(format!(
                "inputs['hidden_states'] must be a non-empty float tensor [B, N, C], got {} {:?}",
                dtype_name(hdtype),
                hshape
            )));
        }
        if req.negative_inputs.contains_key("hidden_states") {
            return Err(invalid(
                "negative_inputs['hidden_states'] is not accepted: both branches share the latents",
            ));
        }
        let cfg = !req.negative_inputs.is_empty();
        let true_cfg_scale = if cfg {
            cfg_scale(req, &model_type)?
        } else {
            1.0
        };

        let num_steps = step_count(req, &model_type)?;
        let sigmas = if req.sigmas.is_empty() {
            let m = models::lookup(&model_type).ok_or_else(|| {
                invalid(format!(
                    "model type '{model_type}' has no default schedule; pass sigmas, or use one of {}",
                    models::supported_list()
                ))
            })?;
            schedule::default_sigmas(&m.schedule, num_steps as usize, hshape[1])
        } else {
            schedule::from_explicit(&req.sigmas)
        };

        let latents = codec::decode_tensor(hidden, &Device::Cpu, max_message_bytes)
            .map_err(|e| invalid(format!("inputs['hidden_states']: {e}")))?
            .to_dtype(CDType::F32)?;
        let mut positive = req.inputs.clone();
        positive.remove("hidden_states");
        if let Some(g) = req.guidance_scale {
            positive.insert("guidance".into(), guidance(g, hshape[0], &positive)?);
        }
        let mut branches = vec![BranchRun {
            branch: Branch::Positive,
            inputs: positive.clone(),
            state: BranchState::new(),
            computed: 0,
            reused: 0,
        }];
        if cfg {
            let mut negative = positive;
            negative.extend(req.negative_inputs.clone());
            branches.push(BranchRun {
                branch: Branch::Negative,
                inputs: negative,
                state: BranchState::new(),
                computed: 0,
                reused: 0,
            });
        }
        Ok(Self {
            id: uuid::Uuid::new_v4().to_string(),
            model_type,
            plan,
            sigmas,
            step: 0,
            initial_latents: latents.clone(),
            latents,
            branches,
            true_cfg_scale,
            cfg_renorm: req
                .cfg_renorm
                .unwrap_or_else(|| models::lookup(model_class_name).is_some_and(|m| m.cfg_renorm)),
            wire_dtype,
            wire_dtype_given: req.wire_dtype != DType::DtypeUnspecified as i32,
            batch_branches: defaults.batch_cfg_branches,
            created: Instant::now(),
            decode_size: None,
            calibration: None,
            resident: Resident {
                on: defaults.resident_tensors,
                ..Resident::default()
            },
        })
    }

    /// Number of denoising steps.
    pub fn num_steps(&self) -> usize {
        self.sigmas.len().saturating_sub(1)
    }

    /// Whether every step has run.
    pub fn finished(&self) -> bool {
        self.step >= self.num_steps()
    }

    /// Computed and reused steps, summed over branches.
    pub fn counts(&self) -> (u32, u32) {
        self.branches
            .iter()
            .fold((0, 0), |(c, r), b| (c + b.computed, r + b.reused))
    }

    /// Clears every branch's TeaCache state; with `restart`, also rewinds to step 0.
    pub fn reset(&mut self, restart: bool) {
        for b in &mut self.branches {
            b.state.reset();
            if restart {
                b.computed = 0;
                b.reused = 0;
            }
        }
        if restart {
            self.step = 0;
            self.latents = self.initial_latents.clone();
            self.resident.history.clear();
        }
        self.resident.generation += 1;
        self.resident.conditioned = None;
    }

    /// Bytes held: latents (current and initial), branch inputs and cache state.
    pub fn memory_bytes(&self) -> u64 {
        let tensor = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let inputs: u64 = self
            .branches
            .iter()
            .map(|b| {
                b.inputs.values().map(|t| t.data.len() as u64).sum::<u64>() + b.state.memory_bytes()
            })
            .sum();
        tensor(&self.latents) + tensor(&self.initial_latents) + inputs
    }

    /// The session's public description.
    pub fn info(&self, idle: Duration) -> v1::SessionInfo {
        let (computed, reused) = self.counts();
        v1::SessionInfo {
            session_id: self.id.clone(),
            model_type: self.model_type.clone(),
            cache_adapter: self.plan.adapter().to_string(),
            rel_l1_thresh: self.plan.threshold(),
            num_inference_steps: self.num_steps() as u32,
            next_step: self.step as u32,
            sigmas: self.sigmas.clone(),
            computed_steps: computed,
            reused_steps: reused,
            memory_bytes: self.memory_bytes(),
            idle_ms: idle.as_secs_f64() * 1e3,
            cfg: self.branches.len() > 1,
            finished: self.finished(),
        }
    }
}

/// Limits on the sessions one controller holds.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// Most sessions at once (Generate calls included).
    pub max_sessions: usize,
    /// Most bytes all sessions may hold together.
    pub max_memory_bytes: u64,
    /// Idle sessions are dropped after this.
    pub ttl: Duration,
}

struct Entry {
    session: Arc<tokio::sync::Mutex<Session>>,
    memory: Arc<AtomicU64>,
    last_used: Arc<Mutex<Instant>>,
    info: Arc<Mutex<v1::SessionInfo>>,
}

/// A session checked out of the store for one call.
pub struct Handle {
    /// The session, locked for the call.
    pub session: tokio::sync::OwnedMutexGuard<Session>,
    memory: Arc<AtomicU64>,
    last_used: Arc<Mutex<Instant>>,
    info: Arc<Mutex<v1::SessionInfo>>,
    store: SessionStore,
}

impl Handle {
    /// Records the session's new size and description after a call changed it.
    pub fn commit(&mut self) -> v1::SessionInfo {
        self.memory
            .store(self.session.memory_bytes(), Ordering::Relaxed);
        let info = self.session.info(Duration::ZERO);
        if let Ok(mut last) = self.last_used.lock() {
            *last = Instant::now();
        }
        if let Ok(mut slot) = self.info.lock() {
            *slot = info.clone();
        }
        self.store.publish();
        info
    }
}

/// All live sessions, bounded by [`SessionLimits`].
#[derive(Clone)]
pub struct SessionStore {
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    limits: SessionLimits,
    metrics: ControllerMetrics,
}

impl SessionStore {
    /// An empty store publishing its gauges to `metrics`.
    pub fn new(limits: SessionLimits, metrics: ControllerMetrics) -> Self {
        Self {
            entries: Arc::new(Mutex::new(HashMap::new())),
            limits,
            metrics,
        }
    }

    /// Publishes the session count and memory gauges.
    pub fn publish(&self) {
        if let Ok(entries) = self.entries.lock() {
            let memory = entries
                .values()
                .map(|e| e.memory.load(Ordering::Relaxed))
                .sum();
            self.metrics.sessions(entries.len(), memory);
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, Entry>>, ControllerError> {
        self.entries
            .lock()
            .map_err(|_| ControllerError::Internal("session store lock poisoned".into()))
    }

    /// Admits a new session, or refuses with RESOURCE_EXHAUSTED when the count or memory
    /// budget would be exceeded; existing sessions are never touched.
    pub fn insert(&self, session: Session) -> Result<String, ControllerError> {
        let mut entries = self.lock()?;
        if entries.len() >= self.limits.max_sessions {
            return Err(ControllerError::ResourceExhausted(format!(
                "{} sessions are open, the maximum (--max-sessions); close one or retry later",
                entries.len()
            )));
        }
        let used: u64 = entries
            .values()
            .map(|e| e.memory.load(Ordering::Relaxed))
            .sum();
        let need = session.memory_bytes();
        if used + need > self.limits.max_memory_bytes {
            return Err(ControllerError::ResourceExhausted(format!(
                "session needs {need} bytes but {used} of {} are in use (--max-session-memory-bytes)",
                self.limits.max_memory_bytes
            )));
        }
        let id = session.id.clone();
        let info = session.info(Duration::ZERO);
        entries.insert(
            id.clone(),
            Entry {
                session: Arc::new(tokio::sync::Mutex::new(session)),
                memory: Arc::new(AtomicU64::new(need)),
                last_used: Arc::new(Mutex::new(Instant::now())),
                info: Arc::new(Mutex::new(info)),
            },
        );
        drop(entries);
        self.publish();
        Ok(id)
    }

    /// Checks a session out for one call; ABORTED if another call holds it.
    pub fn checkout(&self, id: &str) -> Result<Handle, ControllerError> {
        let entries = self.lock()?;
        let e = entries.get(id).ok_or_else(|| {
            ControllerError::NotFound(format!(
                "no session '{}' (closed, expired, or never created)",
                quote(id)
            ))
        })?;
        let session = e.session.clone().try_lock_owned().map_err(|_| {
            ControllerError::Aborted(format!(
                "session '{}' is busy with another call; retry",
                quote(id)
            ))
        })?;
        if let Ok(mut last) = e.last_used.lock() {
            *last = Instant::now();
        }
        Ok(Handle {
            session,
            memory: e.memory.clone(),
            last_used: e.last_used.clone(),
            info: e.info.clone(),
            store: self.clone(),
        })
    }

    /// Removes a session; false if it was not there.
    pub fn remove(&self, id: &str) -> bool {
        let removed = self
            .lock()
            .map(|mut m| m.remove(id).is_some())
            .unwrap_or(false);
        if removed {
            // The gauges follow: back to 0 when no session is live.
            self.publish();
        }
        removed
    }

    /// Descriptions of every session (as of their last call).
    pub fn list(&self) -> Vec<v1::SessionInfo> {
        let Ok(entries) = self.lock() else {
            return Vec::new();
        };
        let mut out: Vec<v1::SessionInfo> = entries
            .values()
            .filter_map(|e| {
                let idle = e.last_used.lock().map(|t| t.elapsed()).unwrap_or_default();
                e.info.lock().ok().map(|i| v1::SessionInfo {
                    idle_ms: idle.as_secs_f64() * 1e3,
                    memory_bytes: e.memory.load(Ordering::Relaxed),
                    ..i.clone()
                })
            })
            .collect();
        out.sort_by(|a, b| a.session_id.cmp(&b.session_id));
        out
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops sessions idle longer than the TTL (a session busy in a call is never idle).
    pub fn expire(&self) -> usize {
        let ttl = self.limits.ttl;
        let Ok(mut entries) = self.lock() else {
            return 0;
        };
        let before = entries.len();
        entries.retain(|id, e| {
            let busy = e.session.try_lock().is_err();
            let idle = e.last_used.lock().map(|t| t.elapsed()).unwrap_or_default();
            let keep = busy || idle < ttl;
            if !keep {
                tracing::info!(session_id = %id, idle_s = idle.as_secs_f64(), "session expired");
            }
            keep
        });
        let expired = before - entries.len();
        drop(entries);
        if expired > 0 {
            self.publish();
        }
        expired
    }

    /// Expires idle sessions periodically.
    pub fn spawn_reaper(&self) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        let every = (self.limits.ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                store.expire();
            }
        })
    }
}

/// Any session id a client sends (random bytes of any length) is NOT_FOUND with a bounded
/// message, and Generate-shaped requests with random steps and sigmas are accepted or refused
/// with a typed error, never a panic.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_session_id_is_not_found_with_a_bounded_message(id in ".{0,300}", n in 1usize..40) {
            let store = SessionStore::new(
                SessionLimits {
                    max_sessions: 4,
                    max_memory_bytes: 1 << 20,
                    ttl: Duration::from_secs(60),
                },
                ControllerMetrics::default(),
            );
            let id = id.repeat(n);
            match store.checkout(&id) {
                Err(ControllerError::NotFound(m)) => prop_assert!(m.len() < 1024, "{}", m.len()),
                Err(e) => prop_assert!(false, "unexpected {e}"),
                Ok(_) => prop_assert!(false, "found a session that was never created"),
            }
            prop_assert!(!store.remove(&id));
        }

        #[test]
        fn any_steps_and_sigmas_are_counted_or_refused(
            steps in prop_oneof![Just(0u32), 1u32..30, any::<u32>()],
            sigmas in proptest::collection::vec(
                prop_oneof![any::<f64>(), 0.0f64..1.0, Just(f64::NAN)],
                0..12,
            ),
        ) {
            let req = v1::GenerateRequest {
                num_inference_steps: steps,
                sigmas,
                ..Default::default()
            };
            if let Err(e) = step_count(&req, "FluxPipeline") {
                prop_assert!(matches!(e, ControllerError::InvalidArgument(_)));
                prop_assert!(e.to_string().len() < 1024);
            }
        }
    }
}
