//! `ResidentStep`: one step of a session whose large tensors stay here ([`ResidentStore`]).
//!
//! FUSED (caching off) and STEP (a cached step with the controller's decision, [`decided`])
//! run the stages back to back on tensors, each receiving exactly what the stage RPCs would;
//! SIGNAL and ADVANCE (the two-call form, for controllers that predate STEP) run this
//! service's own Preprocess / RunBlocks / Postprocess handlers on the same wire-encoded
//! tensors, with the indicator and residuals decoded to f32 on the CPU as the controller
//! decodes them. TeaCache's signal is [`teaserve_proto::signals::rel_l1`], the function the
//! controller's policy uses. So a resident generation gives the same bits as a wire one.

use std::sync::Arc;

use candle_core::{DType as CDType, Device, Tensor};
use teaserve_proto::TensorMap;
use teaserve_proto::codec::{decode_tensor, encode_tensor};
use teaserve_proto::v1::{self, ResidentPhase};

use crate::error::DenoiserError;
use crate::registry::{ModelAdapter, Tensors};
use crate::resident::{Conditioned, Entry, ResidentStore};
use crate::server::{Limits, as_received, output_dtype, postprocess, preprocess, run_blocks};
use crate::spec::InputError;

mod conditioned;
mod decided;

/// Longest session id accepted.
const MAX_SESSION_ID: usize = 128;
/// Longest branch name accepted.
const MAX_BRANCH: usize = 32;

fn invalid(msg: String) -> DenoiserError {
    InputError::Invalid(msg).into()
}

/// What a call lacked; answered as FAILED_PRECONDITION marked `teaserve-resident-miss`.
fn miss(what: String) -> DenoiserError {
    DenoiserError::ResidentMiss(what)
}

/// A wire tensor decoded to f32 on the CPU, as the controller decodes what it receives.
fn decode_f32(t: &v1::Tensor) -> Result<Tensor, DenoiserError> {
    Ok(decode_tensor(t, &Device::Cpu, usize::MAX)
        .map_err(|e| DenoiserError::Config(format!("re-decoding a kept tensor: {e}")))?
        .to_dtype(CDType::F32)?)
}

/// The image stream of a stage's streams.
fn hidden_states<'a>(streams: &'a TensorMap, stage: &str) -> Result<&'a v1::Tensor, DenoiserError> {
    streams
        .get("hidden_states")
        .ok_or_else(|| DenoiserError::Config(format!("{stage} returned no hidden_states")))
}

/// Checks what the request names (ids, branches, phase) before anything runs.
fn check(req: &v1::ResidentStepRequest, limits: &Limits) -> Result<ResidentPhase, DenoiserError> {
    if req.session_id.is_empty() || req.session_id.len() > MAX_SESSION_ID {
        return Err(invalid(format!(
            "session_id must be 1 to {MAX_SESSION_ID} bytes, got {}",
            req.session_id.len()
        )));
    }
    if req.branches.is_empty() || req.branches.len() > limits.max_batch {
        return Err(invalid(format!(
            "ResidentStep needs 1 to {} branches, got {}",
            limits.max_batch,
            req.branches.len()
        )));
    }
    for (i, b) in req.branches.iter().enumerate() {
        if b.branch.is_empty() || b.branch.len() > MAX_BRANCH {
            return Err(invalid(format!(
                "branches[{i}].branch must be 1 to {MAX_BRANCH} bytes, got '{}'",
                teaserve_proto::quote(&b.branch)
            )));
        }
        if req.branches[..i].iter().any(|o| o.branch == b.branch) {
            return Err(invalid(format!(
                "branch '{}' appears twice",
                teaserve_proto::quote(&b.branch)
            )));
        }
        if let Some(k) = b
            .conditioning
            .keys()
            .find(|k| *k == "hidden_states" || *k == "timestep")
        {
            return Err(invalid(format!(
                "branches[{i}].conditioning must not hold '{k}': the latents and timestep are \
                 the request's own"
            )));
        }
    }
    output_dtype(req.wire_dtype)?;
    match ResidentPhase::try_from(req.phase) {
        Ok(
            p @ (ResidentPhase::Signal
            | ResidentPhase::Advance
            | ResidentPhase::Fused
            | ResidentPhase::Step),
        ) => Ok(p),
        _ => Err(invalid(format!(
            "phase {} is not accepted; use SIGNAL, ADVANCE, FUSED or STEP",
            req.phase
        ))),
    }
}

/// One resident step; the store is updated as the step goes.
pub(crate) fn resident_step(
    model: &dyn ModelAdapter,
    store: &ResidentStore,
    req: v1::ResidentStepRequest,
    limits: Limits,
) -> Result<v1::ResidentStepResponse, DenoiserError> {
    let phase = check(&req, &limits)?;
    let mut step = Step {
        model,
        store,
        req: &req,
        limits,
        hits: 0,
        rebuilt: 0,
    };
    let mut out = match phase {
        ResidentPhase::Step => step.decided()?,
        _ => step.branch_by_branch(phase)?,
    };
    out.resident_hits = step.hits;
    out.rebuilt = step.rebuilt;
    if step.rebuilt == 0 {
        store.metrics.hits.inc();
    } else {
        store.metrics.rebuilds.inc_by(u64::from(step.rebuilt));
    }
    Ok(out)
}

/// One call's view of the request and the store.
struct Step<'a> {
    model: &'a dyn ModelAdapter,
    store: &'a ResidentStore,
    req: &'a v1::ResidentStepRequest,
    limits: Limits,
    hits: u32,
    rebuilt: u32,
}

impl Step<'_> {
    /// SIGNAL, ADVANCE or FUSED: each branch on its own, in request order.
    fn branch_by_branch(
        &mut self,
        phase: ResidentPhase,
    ) -> Result<v1::ResidentStepResponse, DenoiserError> {
        let mut out = v1::ResidentStepResponse::default();
        for b in &self.req.branches {
            match phase {
                ResidentPhase::Signal => out.signals.push(self.signal(b)?),
                ResidentPhase::Advance => out.samples.push(self.advance(b)?),
                _ => out.samples.push(self.fused(b)?),
            }
        }
        Ok(out)
    }

    fn key(&self, b: &v1::ResidentBranch) -> (String, String) {
        (self.req.session_id.clone(), b.branch.clone())
    }

    fn wire(&self) -> i32 {
        self.req.wire_dtype
    }

    /// The branch's conditioning: sent with the request (then kept) or kept from before.
    fn conditioning(
        &mut self,
        b: &v1::ResidentBranch,
        entry: &mut Entry,
    ) -> Result<Arc<TensorMap>, DenoiserError> {
        if !b.conditioning.is_empty() {
            let c = Arc::new(b.conditioning.clone());
            entry.conditioning = Some(c.clone());
            entry.conditioned = None;
            return Ok(c);
        }
        match &entry.conditioning {
            Some(c) => Ok(c.clone()),
            None => Err(self.missing(format!("the conditioning of branch '{}'", b.branch))),
        }
    }

    /// The branch's conditioning checked, decoded and embedded: kept, or made now (with this
    /// step's latents and timestep) and kept in `entry`.
    fn conditioned(
        &self,
        entry: &mut Entry,
        cond: &TensorMap,
        what: &str,
    ) -> Result<Arc<Conditioned>, DenoiserError> {
        if let Some(c) = &entry.conditioned {
            return Ok(c.clone());
        }
        let (h, t) = self.step_inputs(what)?;
        let c = Arc::new(conditioned::condition(self.model, cond, h, t, self.limits)?);
        entry.conditioned = Some(c.clone());
        Ok(c)
    }

    /// This step's latents and timestep, which FUSED and STEP require.
    fn step_inputs(&self, what: &str) -> Result<(&v1::Tensor, &v1::Tensor), DenoiserError> {
        match (&self.req.hidden_states, &self.req.timestep) {
            (Some(h), Some(t)) => Ok((h, t)),
            _ => Err(invalid(format!(
                "{what}: hidden_states and timestep are required"
            ))),
        }
    }

    /// Preprocess of the conditioned branch at this step's latents and timestep.
    fn preprocess_conditioned(
        &self,
        c: &Conditioned,
        what: &str,
    ) -> Result<crate::registry::PreprocessOutput, DenoiserError> {
        let (h, t) = self.step_inputs(what)?;
        conditioned::preprocess(self.model, c, h, t, self.limits)
    }

    fn missing(&self, what: String) -> DenoiserError {
        self.store.metrics.misses.inc();
        miss(what)
    }

    /// Preprocess of the branch at the given latents and timestep (the wire handler).
    fn preprocess(
        &self,
        conditioning: &TensorMap,
        hidden_states: Option<&v1::Tensor>,
        timestep: Option<&v1::Tensor>,
        what: &str,
    ) -> Result<v1::PreprocessResponse, DenoiserError> {
        preprocess(
            self.model,
            v1::PreprocessRequest {
                inputs: Self::inputs(conditioning, hidden_states, timestep, what)?,
                wire_dtype: self.wire(),
            },
            self.limits,
        )
    }

    /// Preprocess's inputs: the conditioning with the latents and timestep (wire tensors;
    /// their payloads are shared, not copied).
    fn inputs(
        conditioning: &TensorMap,
        hidden_states: Option<&v1::Tensor>,
        timestep: Option<&v1::Tensor>,
        what: &str,
    ) -> Result<TensorMap, DenoiserError> {
        let (Some(h), Some(t)) = (hidden_states, timestep) else {
            return Err(invalid(format!(
                "{what}: hidden_states and timestep are required"
            )));
        };
        let mut inputs = conditioning.clone();
        inputs.insert("hidden_states".into(), h.clone());
        inputs.insert("timestep".into(), t.clone());
        Ok(inputs)
    }

    /// The indicator of a Preprocess result as the controller's policy sees it.
    fn indicator(pre: &v1::PreprocessResponse) -> Result<(Vec<usize>, Arc<[f32]>), DenoiserError> {
        let m = pre
            .modulated_input
            .as_ref()
            .ok_or_else(|| DenoiserError::Config("Preprocess returned no indicator".into()))?;
        let m = decode_f32(m)?;
        Ok((
            m.dims().to_vec(),
            Arc::from(m.flatten_all()?.to_vec1::<f32>()?),
        ))
    }

    fn signal(&mut self, b: &v1::ResidentBranch) -> Result<v1::BranchSignal, DenoiserError> {
        let key = self.key(b);
        let mut entry = self.store.get(&key, self.req.generation);
        let cond = self.conditioning(b, &mut entry)?;
        let step = self.req.step;
        let pre = self.preprocess(
            &cond,
            self.req.hidden_states.as_ref(),
            self.req.timestep.as_ref(),
            "SIGNAL",
        )?;
        let (shape, values) = Self::indicator(&pre)?;
        let signal = self.measure(b, &shape, &values, &entry, &cond)?;
        entry.indicator = Some((step, shape, values));
        entry.current = Some((step, Arc::new(pre)));
        self.store.put(key, entry);
        Ok(signal)
    }

    /// The branch's signal for this step's indicator (`shape`, `values`): TeaCache's relative
    /// L1 distance to the kept indicator of `previous_step` (none without a previous step or
    /// when the shapes differ).
    fn measure(
        &mut self,
        b: &v1::ResidentBranch,
        shape: &[usize],
        values: &[f32],
        entry: &Entry,
        cond: &TensorMap,
    ) -> Result<v1::BranchSignal, DenoiserError> {
        let rel_l1 = match b.previous_step {
            None => None,
            Some(p) => {
                let (s, prev) = self.previous(b, p, entry, cond)?;
                (s == shape).then(|| teaserve_proto::signals::rel_l1(values, &prev))
            }
        };
        Ok(v1::BranchSignal {
            branch: b.branch.clone(),
            rel_l1,
            indicator_shape: shape.iter().map(|&d| d as i64).collect(),
            computed: false,
        })
    }

    /// The indicator of step `p`: kept, or recomputed from `previous` with `rebuild`.
    fn previous(
        &mut self,
        b: &v1::ResidentBranch,
        p: u32,
        entry: &Entry,
        cond: &TensorMap,
    ) -> Result<(Vec<usize>, Arc<[f32]>), DenoiserError> {
        if let Some((s, shape, v)) = &entry.indicator
            && *s == p
        {
            self.hits += 1;
            return Ok((shape.clone(), v.clone()));
        }
        let Some(r) = b.previous.as_ref().filter(|_| self.req.rebuild) else {
            return Err(self.missing(format!(
                "the modulated input of step {p} (branch '{}')",
                b.branch
            )));
        };
        self.rebuilt += 1;
        let pre = self.preprocess(
            cond,
            r.hidden_states.as_ref(),
            r.timestep.as_ref(),
            "previous",
        )?;
        Self::indicator(&pre)
    }

    /// This step's Preprocess result: kept from SIGNAL, or recomputed with `rebuild`.
    fn current(
        &mut self,
        b: &v1::ResidentBranch,
        entry: &Entry,
        cond: &TensorMap,
    ) -> Result<Arc<v1::PreprocessResponse>, DenoiserError> {
        let step = self.req.step;
        if let Some((s, pre)) = &entry.current
            && *s == step
        {
            self.hits += 1;
            return Ok(pre.clone());
        }
        if !self.req.rebuild {
            return Err(self.missing(format!(
                "the streams of step {step} (branch '{}')",
                b.branch
            )));
        }
        self.rebuilt += 1;
        Ok(Arc::new(self.preprocess(
            cond,
            self.req.hidden_states.as_ref(),
            self.req.timestep.as_ref(),
            "ADVANCE with rebuild",
        )?))
    }

    /// RunBlocks (the wire handler) over a Preprocess result.
    fn run_blocks(
        &self,
        pre: &v1::PreprocessResponse,
    ) -> Result<v1::RunBlocksResponse, DenoiserError> {
        run_blocks(
            self.model,
            v1::RunBlocksRequest {
                streams: pre.streams.clone(),
                context: pre.context.clone(),
                wire_dtype: self.wire(),
                ..Default::default()
            },
            self.limits,
        )
    }

    /// The blocks over a Preprocess result, and the image stream's residual `out - in` (f32;
    /// the only stream a reused step needs).
    fn blocks(
        &self,
        pre: &v1::PreprocessResponse,
    ) -> Result<(v1::RunBlocksResponse, Tensor), DenoiserError> {
        let out = self.run_blocks(pre)?;
        let residual = (decode_f32(hidden_states(&out.streams, "RunBlocks")?)?
            - decode_f32(hidden_states(&pre.streams, "Preprocess")?)?)?;
        Ok((out, residual))
    }

    /// The residual kept from `residual_step`, or recomputed from `residual` with `rebuild`.
    fn residual(
        &mut self,
        b: &v1::ResidentBranch,
        entry: &Entry,
        cond: &TensorMap,
    ) -> Result<Arc<Tensor>, DenoiserError> {
        let Some(want) = b.residual_step else {
            return Err(invalid(format!(
                "branch '{}' reuses a residual but names no residual_step",
                b.branch
            )));
        };
        if let Some((s, r)) = &entry.residual
            && *s == want
        {
            self.hits += 1;
            return Ok(r.clone());
        }
        let Some(inputs) = b.residual.as_ref().filter(|_| self.req.rebuild) else {
            return Err(self.missing(format!(
                "the residual of step {want} (branch '{}')",
                b.branch
            )));
        };
        self.rebuilt += 1;
        let pre = self.preprocess(
            cond,
            inputs.hidden_states.as_ref(),
            inputs.timestep.as_ref(),
            "residual",
        )?;
        Ok(Arc::new(self.blocks(&pre)?.1))
    }

    fn postprocess(
        &self,
        hidden: v1::Tensor,
        pre: &v1::PreprocessResponse,
    ) -> Result<v1::Tensor, DenoiserError> {
        postprocess(
            self.model,
            v1::PostprocessRequest {
                hidden_states: Some(hidden),
                context: pre.context.clone(),
                wire_dtype: self.wire(),
            },
            self.limits,
        )?
        .sample
        .ok_or_else(|| DenoiserError::Config("Postprocess returned no sample".into()))
    }

    fn advance(&mut self, b: &v1::ResidentBranch) -> Result<v1::Tensor, DenoiserError> {
        let key = self.key(b);
        let mut entry = self.store.get(&key, self.req.generation);
        let cond = self.conditioning(b, &mut entry)?;
        let pre = self.current(b, &entry, &cond)?;
        let hidden = if b.compute {
            let (out, residual) = self.blocks(&pre)?;
            entry.residual = Some((self.req.step, Arc::new(residual)));
            hidden_states(&out.streams, "RunBlocks")?.clone()
        } else {
            let r = self.residual(b, &entry, &cond)?;
            let i = decode_f32(hidden_states(&pre.streams, "Preprocess")?)?;
            if i.dims() != r.dims() {
                return Err(miss(format!(
                    "the kept residual of branch '{}' has shape {:?}, the stream {:?}",
                    b.branch,
                    r.dims(),
                    i.dims()
                )));
            }
            encode_tensor(&(i + r.as_ref())?, output_dtype(self.wire())?)?
        };
        let sample = self.postprocess(hidden, &pre)?;
        self.store.put(key, entry);
        Ok(sample)
    }

    fn fused(&mut self, b: &v1::ResidentBranch) -> Result<v1::Tensor, DenoiserError> {
        let key = self.key(b);
        let mut entry = self.store.get(&key, self.req.generation);
        let cond = self.conditioning(b, &mut entry)?;
        let made = entry.conditioned.is_none();
        let conditioned = self.conditioned(&mut entry, &cond, "FUSED")?;
        if made {
            // Only newly made conditioning changes the entry (`get` already marked it used).
            self.store.put(key, entry);
        }
        self.forward(&conditioned)
    }

    /// The three stages back to back on tensors, each receiving exactly what the stage RPCs
    /// would ([`as_received`]: the streams rounded to the wire dtype), without encoding
    /// anything but the prediction.
    fn forward(&self, c: &Conditioned) -> Result<v1::Tensor, DenoiserError> {
        let pre = self.preprocess_conditioned(c, "FUSED")?;
        let out = self.blocks_on(&pre.streams, &pre.context, &c.embedded)?;
        let hidden = out
            .get("hidden_states")
            .ok_or_else(|| DenoiserError::Config("RunBlocks returned no hidden_states".into()))?;
        self.postprocess_on(hidden.clone(), &pre.context)
    }

    /// Every block over Preprocess's `streams` and `context`, received as the RunBlocks RPC
    /// would receive them, with the branch's `embedded` conditioning.
    fn blocks_on(
        &self,
        streams: &Tensors,
        context: &Tensors,
        embedded: &Tensors,
    ) -> Result<Tensors, DenoiserError> {
        let (model, info) = (self.model, self.model.info());
        let wire = output_dtype(self.wire())?;
        let stage = &info.run_blocks;
        let streams = as_received(streams, Some(wire), &stage.inputs, info)?;
        let context = as_received(context, None, &stage.context, info)?;
        model.run_blocks_embedded(&streams, &context, embedded, 0..info.num_blocks)
    }

    /// Postprocess of the image stream `hidden` with Preprocess's `context`, both received as
    /// the Postprocess RPC would receive them; the prediction in the wire dtype.
    fn postprocess_on(
        &self,
        hidden: Tensor,
        context: &Tensors,
    ) -> Result<v1::Tensor, DenoiserError> {
        let (model, info) = (self.model, self.model.info());
        let wire = output_dtype(self.wire())?;
        let stage = &info.postprocess;
        let spec = stage
            .inputs
            .first()
            .ok_or_else(|| DenoiserError::Config("model declares no Postprocess input".into()))?;
        let hidden = Tensors::from([(spec.name.to_string(), hidden)]);
        let hidden = as_received(&hidden, Some(wire), &stage.inputs, info)?
            .remove(spec.name)
            .ok_or_else(|| DenoiserError::Config("the hidden states vanished".into()))?;
        let context = as_received(context, None, &stage.context, info)?;
        Ok(encode_tensor(&model.postprocess(&hidden, &context)?, wire)?)
    }
}
