//! The STEP phase: SIGNAL and ADVANCE in one call, the controller's decision sent with it.
//!
//! Per branch: Preprocess, the signal against the kept indicator, then the decision the
//! controller sent, fixed (`compute`) or its TeaCache rule on this signal
//! ([`teaserve_proto::signals::teacache_computes`], the function its policy decides with),
//! shared across branches when the request says so; then the blocks or the kept residual,
//! then Postprocess. The stages run back to back on tensors, each receiving exactly what the
//! stage RPCs would ([`crate::server::as_received`]), and the indicator and residual are the f32 values the
//! controller would decode, so a STEP gives the same bits as SIGNAL then ADVANCE, and as wire
//! mode.

use std::sync::Arc;

use candle_core::{DType as CDType, Tensor};
use teaserve_proto::TensorMap;
use teaserve_proto::codec::to_candle_dtype;
use teaserve_proto::v1;

use super::{Step, invalid, miss};
use crate::error::DenoiserError;
use crate::registry::Tensors;
use crate::resident::{Conditioned, Entry};
use crate::server::output_dtype;

/// One branch after Preprocess and its signal, before the blocks.
struct Prepared {
    entry: Entry,
    /// The branch's conditioning (sent or kept), for recomputing a missing residual.
    cond: Arc<TensorMap>,
    /// The same, checked, decoded and embedded.
    conditioned: Arc<Conditioned>,
    /// Preprocess's streams and context as they came out (cast for a stage only when it runs).
    streams: Tensors,
    context: Tensors,
    /// The image stream after the wire round trip, in f32 (what residuals are taken from).
    hidden_in: Tensor,
    signal: v1::BranchSignal,
}

/// `t` as the controller decodes it after the wire: cast to the wire dtype, then to f32.
fn wire_f32(t: &Tensor, wire: v1::DType) -> Result<Tensor, DenoiserError> {
    Ok(t.to_dtype(to_candle_dtype(wire)?)?.to_dtype(CDType::F32)?)
}

fn hidden<'a>(map: &'a Tensors, stage: &str) -> Result<&'a Tensor, DenoiserError> {
    map.get("hidden_states")
        .ok_or_else(|| DenoiserError::Config(format!("{stage} returned no hidden_states")))
}

/// The branch's own decision: the rule on its signal, or the fixed `compute`.
fn own_decision(b: &v1::ResidentBranch, rel_l1: Option<f64>) -> Result<bool, DenoiserError> {
    let Some(rule) = &b.reuse_rule else {
        return Ok(b.compute);
    };
    let coefficients: [f64; 5] = rule.coefficients.as_slice().try_into().map_err(|_| {
        invalid(format!(
            "branch '{}': reuse_rule.coefficients must hold 5 numbers (highest power first), \
             got {}",
            teaserve_proto::quote(&b.branch),
            rule.coefficients.len()
        ))
    })?;
    let mut numbers = [rule.accumulated, rule.threshold]
        .into_iter()
        .chain(coefficients);
    if numbers.any(|x| !x.is_finite()) {
        return Err(invalid(format!(
            "branch '{}': reuse_rule numbers must be finite",
            teaserve_proto::quote(&b.branch)
        )));
    }
    Ok(teaserve_proto::signals::teacache_computes(
        rule.accumulated,
        rule.threshold,
        &coefficients,
        rel_l1,
    ))
}

impl Step<'_> {
    /// The whole STEP call: every branch prepared and decided, then advanced.
    pub(super) fn decided(&mut self) -> Result<v1::ResidentStepResponse, DenoiserError> {
        let req = self.req;
        let mut prepared = Vec::with_capacity(req.branches.len());
        for b in &req.branches {
            let mut p = self.prepare(b)?;
            p.signal.computed = own_decision(b, p.signal.rel_l1)?;
            prepared.push(p);
        }
        if req.shared_decision && prepared.iter().any(|p| p.signal.computed) {
            for p in &mut prepared {
                p.signal.computed = true;
            }
        }
        let mut out = v1::ResidentStepResponse::default();
        let mut entries = Vec::with_capacity(prepared.len());
        for (b, p) in req.branches.iter().zip(prepared) {
            let (sample, entry, signal) = self.advance_prepared(b, p)?;
            out.samples.push(sample);
            out.signals.push(signal);
            entries.push((self.key(b), entry));
        }
        // Kept only once every branch went through: a miss leaves the entries as they were.
        for (key, entry) in entries {
            self.store.put(key, entry);
        }
        Ok(out)
    }

    /// Preprocess of the branch at this step's latents, and its signal against the kept
    /// indicator of `previous_step` (kept, or recomputed with `rebuild`).
    fn prepare(&mut self, b: &v1::ResidentBranch) -> Result<Prepared, DenoiserError> {
        let mut entry = self.store.get(&self.key(b), self.req.generation);
        let cond = self.conditioning(b, &mut entry)?;
        let conditioned = self.conditioned(&mut entry, &cond, "STEP")?;
        let wire = output_dtype(self.wire())?;
        let pre = self.preprocess_conditioned(&conditioned, "STEP")?;
        let m = wire_f32(&pre.modulated_input, wire)?;
        let shape = m.dims().to_vec();
        let values: Arc<[f32]> = Arc::from(m.flatten_all()?.to_vec1::<f32>()?);
        let signal = self.measure(b, &shape, &values, &entry, &cond)?;
        entry.indicator = Some((self.req.step, shape, values));
        // STEP keeps no streams between calls.
        entry.current = None;
        Ok(Prepared {
            hidden_in: wire_f32(hidden(&pre.streams, "Preprocess")?, wire)?,
            streams: pre.streams,
            context: pre.context,
            entry,
            cond,
            conditioned,
            signal,
        })
    }

    /// The blocks (keeping the residual) or the kept residual, then Postprocess.
    fn advance_prepared(
        &mut self,
        b: &v1::ResidentBranch,
        mut p: Prepared,
    ) -> Result<(v1::Tensor, Entry, v1::BranchSignal), DenoiserError> {
        let wire = output_dtype(self.wire())?;
        let hidden_out = if p.signal.computed {
            let out = self.blocks_on(&p.streams, &p.context, &p.conditioned.embedded)?;
            let out = hidden(&out, "RunBlocks")?;
            let residual = (wire_f32(out, wire)? - &p.hidden_in)?;
            p.entry.residual = Some((self.req.step, Arc::new(residual)));
            out.clone()
        } else {
            let r = self.residual(b, &p.entry, &p.cond)?;
            if p.hidden_in.dims() != r.dims() {
                return Err(miss(format!(
                    "the kept residual of branch '{}' has shape {:?}, the stream {:?}",
                    b.branch,
                    r.dims(),
                    p.hidden_in.dims()
                )));
            }
            (&p.hidden_in + r.to_device(p.hidden_in.device())?)?
        };
        let sample = self.postprocess_on(hidden_out, &p.context)?;
        Ok((sample, p.entry, p.signal))
    }
}
