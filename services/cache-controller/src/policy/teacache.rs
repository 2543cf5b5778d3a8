//! TeaCache, exactly as the reference implementation decides (design.md §5), per CFG branch.
//!
//! At step `i` of `N`: the first and last step always compute and reset the accumulator;
//! otherwise the relative L1 distance between this step's modulated input and the previous
//! one, rescaled by the model's polynomial, is accumulated, and the blocks are skipped while
//! the accumulator stays below the threshold (`accumulated == thresh` computes). When the
//! blocks run, the residual `out - in` of every stream is kept; when skipped, `in + residual`
//! stands in for the blocks' output.
//!
//! Pure: no I/O. Residuals are candle CPU tensors.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;

/// Coefficients of `poly(x) = c0 x^4 + c1 x^3 + c2 x^2 + c3 x + c4` (highest power first).
pub type Coefficients = [f64; 5];

use teaserve_proto::signals::teacache_accumulate;
pub use teaserve_proto::signals::{REL_EPS, poly, rel_l1};

/// TeaCache settings for one session (shared by its branches).
#[derive(Debug, Clone, PartialEq)]
pub struct TeaCacheParams {
    /// Skip the blocks while the accumulated rescaled distance stays below this.
    pub rel_l1_thresh: f64,
    /// The rescaling polynomial.
    pub coefficients: Coefficients,
    /// Extension: the first `warmup_steps` steps always compute (0 = reference behaviour).
    pub warmup_steps: u32,
    /// Extension: the last `cooldown_steps` steps always compute (0 = reference behaviour).
    pub cooldown_steps: u32,
    /// Extension: compute after this many reuses in a row (`None` = reference behaviour).
    pub max_consecutive_reuses: Option<u32>,
}

/// Why a step computed regardless of the distance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forced {
    /// First step of the run, or no previous indicator (fresh or reset state).
    First,
    /// Last step of the run.
    Last,
    /// The indicator's shape changed since the previous step.
    ShapeChanged,
    /// Within `warmup_steps`.
    Warmup,
    /// Within `cooldown_steps`.
    Cooldown,
    /// `max_consecutive_reuses` reached.
    ReuseCap,
    /// The other CFG branch needed compute and the decision is shared.
    SharedCfg,
}

/// One branch's decision at one step (every policy reports in this shape).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision {
    /// Run the blocks (true) or reuse the cached residual (false).
    pub compute: bool,
    /// Set when the step computed regardless of the distance.
    pub forced: Option<Forced>,
    /// The relative L1 distance, when it was computed.
    pub rel_l1: Option<f64>,
    /// `|poly(rel_l1)|`, when it was computed.
    pub rescaled: Option<f64>,
    /// The accumulator as compared with the threshold (0 on forced steps).
    pub accumulated: f64,
    /// The numbers the policy decided from, named as the reference implementation names
    /// them (MagCache's `accumulated_err`, FirstBlockCache's `rel_diff`, ...); empty for
    /// TeaCache, whose numbers are the fields above.
    pub numbers: Vec<(&'static str, f64)>,
}

/// The previous step's indicator as the policy remembers it.
#[derive(Debug, Clone)]
struct Prev {
    step: usize,
    shape: Vec<usize>,
    values: Option<Arc<[f32]>>,
}

/// Per-branch TeaCache state: {cnt, accumulated, previous modulated input, residual per
/// stream}.
#[derive(Debug, Clone, Default)]
pub struct BranchState {
    /// Decisions taken since the state was created or reset.
    pub cnt: u32,
    /// Accumulated rescaled distance since the last compute.
    pub accumulated: f64,
    /// The previous indicator's shape, and its values (wire mode; resident mode keeps them on
    /// the denoiser). Shared, so snapshotting a state (to roll back a failed step) is cheap.
    prev: Option<Prev>,
    residuals: HashMap<String, Tensor>,
    consecutive_reuses: u32,
    /// Resident mode: the step whose residual the denoiser keeps for this branch.
    resident_residual: Option<usize>,
    /// MagCache's accumulators (its residual is the one above).
    pub mag: super::mag_cache::MagState,
    /// FirstBlockCache's kept residuals.
    pub first_block: super::first_block::FirstBlockState,
    /// TaylorSeer's step counter and factors.
    pub taylor: super::taylor_seer::TaylorState,
}

impl BranchState {
    /// A fresh state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Clears everything (the seed's `adapter.reset`): the next decision computes.
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Decides step `step` of `num_steps` from this step's modulated input `m` (with `shape`),
    /// and records `m` as the previous indicator.
    pub fn decide(
        &mut self,
        params: &TeaCacheParams,
        step: usize,
        num_steps: usize,
        shape: &[usize],
        m: &[f32],
    ) -> Decision {
        // A previous indicator kept only on a denoiser (resident mode) cannot be compared here.
        let prev = self.prev.take().filter(|p| p.values.is_some());
        let same_shape = prev.as_ref().map(|p| p.shape.as_slice() == shape);
        let decision = self.decide_with(params, step, num_steps, same_shape, || {
            prev.as_ref()
                .and_then(|p| p.values.as_ref())
                .map_or(0.0, |v| rel_l1(m, v))
        });
        self.prev = Some(Prev {
            step,
            shape: shape.to_vec(),
            values: Some(Arc::from(m)),
        });
        decision
    }

    /// Resident mode: decides from the signal a denoiser computed against the previous
    /// indicator it keeps (`rel_l1`: `None` when it had none of the same shape), exactly as
    /// [`BranchState::decide`] does from the values.
    pub fn decide_on_signal(
        &mut self,
        params: &TeaCacheParams,
        step: usize,
        num_steps: usize,
        shape: &[usize],
        rel: Option<f64>,
    ) -> Decision {
        let prev = self.prev.take();
        let same_shape = prev
            .as_ref()
            .map(|p| p.shape.as_slice() == shape && rel.is_some());
        let decision = self.decide_with(params, step, num_steps, same_shape, || rel.unwrap_or(0.0));
        self.prev = Some(Prev {
            step,
            shape: shape.to_vec(),
            values: None,
        });
        decision
    }

    /// The step this branch's previous indicator came from (`None` before the first
    /// decision or after a reset).
    pub fn previous_step(&self) -> Option<usize> {
        self.prev.as_ref().map(|p| p.step)
    }

    /// Why step `step` of `num_steps` computes whatever the distance: first, last, warmup or
    /// cooldown (`None`: the distance decides, unless the shape changed).
    fn forced_by_schedule(
        params: &TeaCacheParams,
        step: usize,
        num_steps: usize,
    ) -> Option<Forced> {
        if step == 0 {
            Some(Forced::First)
        } else if step + 1 >= num_steps {
            Some(Forced::Last)
        } else if step < params.warmup_steps as usize {
            Some(Forced::Warmup)
        } else if step + params.cooldown_steps as usize >= num_steps {
            Some(Forced::Cooldown)
        } else {
            None
        }
    }

    /// Resident mode, before the step's signal is known: the rule this branch will decide by
    /// at step `step` (`Some((accumulated, threshold))`, see
    /// [`teaserve_proto::signals::teacache_computes`]), or `None` when the step computes
    /// whatever the signal says (forced, no previous indicator, or the reuse cap reached).
    /// [`BranchState::decide_on_signal`] then takes exactly the decision the rule gives.
    pub fn rule_before_signal(
        &self,
        params: &TeaCacheParams,
        step: usize,
        num_steps: usize,
    ) -> Option<(f64, f64)> {
        let capped = params
            .max_consecutive_reuses
            .is_some_and(|cap| self.consecutive_reuses >= cap);
        let forced = Self::forced_by_schedule(params, step, num_steps).is_some();
        (!forced && !capped && self.prev.is_some())
            .then_some((self.accumulated, params.rel_l1_thresh))
    }

    /// The decision rule: forced steps compute; otherwise `distance()` is rescaled and
    /// accumulated. `same_shape` says whether a previous indicator of this shape exists.
    fn decide_with(
        &mut self,
        params: &TeaCacheParams,
        step: usize,
        num_steps: usize,
        same_shape: Option<bool>,
        distance: impl FnOnce() -> f64,
    ) -> Decision {
        let forced = Self::forced_by_schedule(params, step, num_steps).or(match same_shape {
            None => Some(Forced::First),
            Some(false) => Some(Forced::ShapeChanged),
            Some(true) => None,
        });
        let decision = match forced {
            None => {
                let rel = distance();
                let (rescaled, compared) =
                    teacache_accumulate(self.accumulated, &params.coefficients, rel);
                self.accumulated = compared;
                let capped = params
                    .max_consecutive_reuses
                    .is_some_and(|cap| self.consecutive_reuses >= cap);
                let compute = compared >= params.rel_l1_thresh || capped;
                Decision {
                    compute,
                    forced: (capped && compared < params.rel_l1_thresh).then_some(Forced::ReuseCap),
                    rel_l1: Some(rel),
                    rescaled: Some(rescaled),
                    accumulated: compared,
                    numbers: Vec::new(),
                }
            }
            Some(forced) => Decision {
                compute: true,
                forced: Some(forced),
                ..Decision::default()
            },
        };
        if decision.compute {
            self.accumulated = 0.0;
            self.consecutive_reuses = 0;
        } else {
            self.consecutive_reuses += 1;
        }
        self.cnt += 1;
        decision
    }

    /// Turns a reuse decision into a compute (shared CFG decision): the accumulator resets
    /// as on any compute.
    pub fn force_compute(&mut self, decision: &mut Decision, why: Forced) {
        if !decision.compute {
            decision.compute = true;
            decision.forced = Some(why);
            self.accumulated = 0.0;
            self.consecutive_reuses = 0;
        }
    }

    /// Stores `out - in` for every stream after the blocks ran.
    pub fn store_residuals(
        &mut self,
        inputs: &HashMap<String, Tensor>,
        outputs: &HashMap<String, Tensor>,
    ) -> candle_core::Result<()> {
        self.residuals.clear();
        for (name, out) in outputs {
            if let Some(inp) = inputs.get(name) {
                self.residuals.insert(name.clone(), (out - inp)?);
            }
        }
        Ok(())
    }

    /// `in + residual` for every stream, standing in for the blocks' output. Fails when a
    /// stream has no residual of the same shape (the caller then computes instead).
    pub fn apply_residuals(
        &self,
        inputs: &HashMap<String, Tensor>,
    ) -> Result<HashMap<String, Tensor>, String> {
        inputs
            .iter()
            .map(|(name, inp)| {
                let r = self
                    .residuals
                    .get(name)
                    .ok_or_else(|| format!("no cached residual for stream '{name}'"))?;
                if r.dims() != inp.dims() {
                    return Err(format!(
                        "cached residual for '{name}' has shape {:?}, stream has {:?}",
                        r.dims(),
                        inp.dims()
                    ));
                }
                Ok((name.clone(), (inp + r).map_err(|e| e.to_string())?))
            })
            .collect()
    }

    /// Resident mode: the blocks ran at `step`, so the denoiser now keeps that residual.
    pub fn residual_kept_from(&mut self, step: usize) {
        self.resident_residual = Some(step);
    }

    /// Resident mode: the step of the residual the denoiser keeps (`None`: nothing to reuse).
    pub fn resident_residual(&self) -> Option<usize> {
        self.resident_residual
    }

    /// Bytes held by this state (indicator and residuals).
    pub fn memory_bytes(&self) -> u64 {
        let prev = self
            .prev
            .as_ref()
            .and_then(|p| p.values.as_ref())
            .map_or(0, |v| v.len() * 4);
        let res: usize = self
            .residuals
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        (prev + res) as u64
    }

    /// Whether residuals are cached for exactly these streams.
    pub fn has_residuals_for(&self, inputs: &HashMap<String, Tensor>) -> bool {
        !inputs.is_empty()
            && inputs
                .iter()
                .all(|(k, v)| self.residuals.get(k).is_some_and(|r| r.dims() == v.dims()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::float_cmp)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// poly(x) = x: rescaled distance = rel_l1 itself, easy to compute by hand.
    const IDENTITY: Coefficients = [0.0, 0.0, 0.0, 1.0, 0.0];

    fn params(thresh: f64) -> TeaCacheParams {
        TeaCacheParams {
            rel_l1_thresh: thresh,
            coefficients: IDENTITY,
            warmup_steps: 0,
            cooldown_steps: 0,
            max_consecutive_reuses: None,
        }
    }

    /// Indicators whose successive rel-L1 distances are `rels` (prev has mean |x| = 1).
    fn run(p: &TeaCacheParams, values: &[f32]) -> Vec<Decision> {
        let mut s = BranchState::new();
        let n = values.len();
        values
            .iter()
            .enumerate()
            .map(|(i, v)| s.decide(p, i, n, &[1, 2], &[*v, *v]))
            .collect()
    }

    fn computes(d: &[Decision]) -> Vec<bool> {
        d.iter().map(|d| d.compute).collect()
    }

    #[test]
    fn rel_l1_and_poly_by_hand() {
        assert!((rel_l1(&[1.1, -2.2], &[1.0, -2.0]) - 0.3 / 3.0).abs() < 1e-7);
        let c = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(poly(&c, 2.0), 16.0 + 16.0 + 12.0 + 8.0 + 5.0);
        assert_eq!(rel_l1(&[0.0], &[0.0]), 0.0);
    }

    #[test]
    fn first_and_last_always_compute_and_accumulate_between() {
        // values 1.0, 1.1, 1.2, 1.3, 1.4: rel = 0.1, 0.0909.., 0.0833.., 0.0769..
        let d = run(&params(0.15), &[1.0, 1.1, 1.2, 1.3, 1.4]);
        assert_eq!(computes(&d), vec![true, false, true, false, true]);
        assert_eq!(d[0].forced, Some(Forced::First));
        assert_eq!((d[0].rel_l1, d[0].accumulated), (None, 0.0));
        assert!((d[1].rel_l1.unwrap() - 0.1).abs() < 1e-6);
        assert!((d[1].accumulated - 0.1).abs() < 1e-6);
        // 0.1 + 0.0909 = 0.1909 >= 0.15: compute, and the accumulator resets.
        assert!((d[2].accumulated - (0.1 + 0.1 / 1.1)).abs() < 1e-6);
        assert_eq!(d[2].forced, None);
        assert!((d[3].accumulated - 0.1 / 1.2).abs() < 1e-6);
        assert_eq!(d[4].forced, Some(Forced::Last));
    }

    #[test]
    fn threshold_edge_equal_computes() {
        // 2.0 -> 3.0: rel = 1 / (2 + 1e-8), computed exactly as the policy does.
        let edge = 1.0 / (2.0 + REL_EPS);
        let d = run(&params(edge), &[2.0, 3.0, 3.0, 3.0]);
        assert_eq!(d[1].accumulated, edge);
        assert!(d[1].compute, "accumulated == thresh must compute");
        assert_eq!(d[1].forced, None);
        // The next representable threshold above it: reuse.
        let d = run(&params(edge.next_up()), &[2.0, 3.0, 3.0, 3.0]);
        assert!(!d[1].compute);
    }

    /// The rule sent before the signal (resident STEP) takes the decision the policy takes
    /// on the signal, at every step, whatever the schedule extensions say.
    #[test]
    fn the_rule_before_the_signal_decides_as_the_policy() {
        let settings = [
            params(0.3),
            TeaCacheParams {
                coefficients: [
                    4.98651651e2,
                    -2.83781631e2,
                    5.58554382e1,
                    -3.82021401,
                    2.64230861e-1,
                ],
                warmup_steps: 2,
                cooldown_steps: 1,
                max_consecutive_reuses: Some(2),
                ..params(0.4)
            },
        ];
        let rels = [
            0.05, 0.1, 0.3, 0.02, 0.2, 0.25, 0.01, 0.0, 0.4, 0.15, 0.05, 0.12,
        ];
        let n = rels.len();
        for p in &settings {
            let mut s = BranchState::new();
            let (mut decided_by_rule, mut reused) = (0, 0);
            for (i, &rel) in rels.iter().enumerate() {
                let rule = s.rule_before_signal(p, i, n);
                let signal = (i > 0).then_some(rel);
                let d = s.decide_on_signal(p, i, n, &[1, 4], signal);
                reused += usize::from(!d.compute);
                match rule {
                    Some((acc, thresh)) => {
                        decided_by_rule += 1;
                        let computes = teaserve_proto::signals::teacache_computes(
                            acc,
                            thresh,
                            &p.coefficients,
                            signal,
                        );
                        assert_eq!(computes, d.compute, "step {i}: {d:?}");
                    }
                    None => assert!(d.compute, "step {i}: no rule, yet {d:?}"),
                }
            }
            assert!(decided_by_rule > 3, "{decided_by_rule} steps had a rule");
            assert!(reused > 1, "{reused} reuses");
        }
    }

    #[test]
    fn rescaled_is_absolute_value_of_poly() {
        let p = TeaCacheParams {
            coefficients: [0.0, 0.0, 0.0, -1.0, 0.0],
            ..params(0.15)
        };
        let d = run(&p, &[1.0, 1.1, 1.2, 1.3]);
        assert!((d[1].rescaled.unwrap() - 0.1).abs() < 1e-6);
        assert_eq!(computes(&d), vec![true, false, true, true]);
    }

    #[test]
    fn coefficient_override_changes_decisions() {
        let values = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5];
        let small = TeaCacheParams {
            coefficients: [0.0, 0.0, 0.0, 0.1, 0.0],
            ..params(0.15)
        };
        // rescaled = 0.1 * rel ~ 0.009 per step: never reaches 0.15 between the forced ends.
        assert_eq!(
            computes(&run(&small, &values)),
            vec![true, false, false, false, false, true]
        );
        // constant term 0.2 alone crosses the threshold every step.
        let constant = TeaCacheParams {
            coefficients: [0.0, 0.0, 0.0, 0.0, 0.2],
            ..params(0.15)
        };
        assert_eq!(computes(&run(&constant, &values)), vec![true; 6]);
    }

    #[test]
    fn shape_change_forces_compute_and_resets() {
        let p = params(10.0);
        let mut s = BranchState::new();
        assert!(s.decide(&p, 0, 5, &[1, 2], &[1.0, 1.0]).compute);
        assert!(!s.decide(&p, 1, 5, &[1, 2], &[1.1, 1.1]).compute);
        assert!(s.accumulated > 0.0);
        let d = s.decide(&p, 2, 5, &[1, 3], &[1.0, 1.0, 1.0]);
        assert_eq!((d.compute, d.forced), (true, Some(Forced::ShapeChanged)));
        assert_eq!(s.accumulated, 0.0);
        assert!(!s.decide(&p, 3, 5, &[1, 3], &[1.0, 1.0, 1.1]).compute);
    }

    #[test]
    fn reset_makes_the_next_step_compute() {
        let p = params(10.0);
        let mut s = BranchState::new();
        s.decide(&p, 0, 5, &[1], &[1.0]);
        assert!(!s.decide(&p, 1, 5, &[1], &[1.0]).compute);
        s.reset();
        assert_eq!(s.cnt, 0);
        let d = s.decide(&p, 2, 5, &[1], &[1.0]);
        assert_eq!((d.compute, d.forced), (true, Some(Forced::First)));
    }

    #[test]
    fn warmup_cooldown_and_reuse_cap() {
        let values = [1.0; 8];
        let never = params(1e9);
        assert_eq!(
            computes(&run(&never, &values)),
            vec![true, false, false, false, false, false, false, true]
        );
        let warm = TeaCacheParams {
            warmup_steps: 3,
            ..never.clone()
        };
        let d = run(&warm, &values);
        assert_eq!(
            computes(&d),
            vec![true, true, true, false, false, false, false, true]
        );
        assert_eq!(d[2].forced, Some(Forced::Warmup));
        let cool = TeaCacheParams {
            cooldown_steps: 3,
            ..never.clone()
        };
        let d = run(&cool, &values);
        assert_eq!(
            computes(&d),
            vec![true, false, false, false, false, true, true, true]
        );
        assert_eq!(d[5].forced, Some(Forced::Cooldown));
        assert_eq!(d[7].forced, Some(Forced::Last));
        let capped = TeaCacheParams {
            max_consecutive_reuses: Some(2),
            ..never
        };
        let d = run(&capped, &values);
        assert_eq!(
            computes(&d),
            vec![true, false, false, true, false, false, true, true]
        );
        assert_eq!(d[3].forced, Some(Forced::ReuseCap));
    }

    #[test]
    fn shared_decision_forces_and_resets() {
        let p = params(10.0);
        let mut s = BranchState::new();
        s.decide(&p, 0, 5, &[1], &[1.0]);
        let mut d = s.decide(&p, 1, 5, &[1], &[2.0]);
        assert!(!d.compute && s.accumulated > 0.0);
        s.force_compute(&mut d, Forced::SharedCfg);
        assert_eq!((d.compute, d.forced), (true, Some(Forced::SharedCfg)));
        assert_eq!(s.accumulated, 0.0);
    }

    #[test]
    fn residuals_round_trip() {
        let dev = Device::Cpu;
        let t = |v: &[f32]| Tensor::new(v, &dev).unwrap();
        let mut s = BranchState::new();
        let inp = HashMap::from([
            ("h".to_string(), t(&[1.0, 2.0])),
            ("e".to_string(), t(&[0.0])),
        ]);
        let out = HashMap::from([
            ("h".to_string(), t(&[1.5, 1.0])),
            ("e".to_string(), t(&[3.0])),
        ]);
        assert!(!s.has_residuals_for(&inp));
        s.store_residuals(&inp, &out).unwrap();
        assert!(s.has_residuals_for(&inp));
        let next = HashMap::from([
            ("h".to_string(), t(&[10.0, 10.0])),
            ("e".to_string(), t(&[1.0])),
        ]);
        let r = s.apply_residuals(&next).unwrap();
        assert_eq!(r["h"].to_vec1::<f32>().unwrap(), vec![10.5, 9.0]);
        assert_eq!(r["e"].to_vec1::<f32>().unwrap(), vec![4.0]);
        assert_eq!(s.memory_bytes(), 12);
        let wrong = HashMap::from([("h".to_string(), t(&[1.0]))]);
        assert!(s.apply_residuals(&wrong).is_err());
    }

    /// Resident mode decides from the denoiser's signal exactly as wire mode decides from the
    /// values: same decisions and numbers for the same sequence of indicators.
    #[test]
    fn deciding_on_signals_equals_deciding_on_values() {
        let params = TeaCacheParams {
            rel_l1_thresh: 0.3,
            coefficients: IDENTITY,
            warmup_steps: 0,
            cooldown_steps: 1,
            max_consecutive_reuses: Some(3),
        };
        let n = 12;
        let series: Vec<Vec<f32>> = (0..n)
            .map(|i| (0..8).map(|k| 1.0 + 0.07 * (i * k % 5) as f32).collect())
            .collect();
        let (mut wire, mut resident) = (BranchState::new(), BranchState::new());
        let mut prev: Option<&Vec<f32>> = None;
        for (i, m) in series.iter().enumerate() {
            let a = wire.decide(&params, i, n, &[8], m);
            assert_eq!(resident.previous_step(), i.checked_sub(1));
            let signal = prev.map(|p| rel_l1(m, p));
            let b = resident.decide_on_signal(&params, i, n, &[8], signal);
            assert_eq!(a, b, "step {i}");
            prev = Some(m);
        }
        // A resident-mode state cannot be continued in wire mode: the next step computes.
        let d = resident.decide(&params, 5, n, &[8], &series[5]);
        assert_eq!(d.forced, Some(Forced::First));
    }
}
