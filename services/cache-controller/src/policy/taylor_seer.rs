//! TaylorSeer, exactly as diffusers' `TaylorSeerCacheConfig` hooks forecast (diffusers 0.42.1,
//! `hooks/taylorseer_cache.py`, the default non-lite mode), per CFG branch.
//!
//! A schedule decides: step `s` computes iff `s < disable_cache_before_step`, or
//! `(s - disable_cache_before_step - 1) % cache_interval == 0` (Python's modulo), or
//! `s >= disable_cache_after_step` when set; other steps forecast. Every attention module of
//! every block is hooked: a computed step keeps its outputs as Taylor factors (divided
//! differences over the steps between updates, up to `max_order`, stored in
//! `taylor_factors_dtype`); a forecast step replaces each attention output by
//! `sum_k F_k * offset^k / k!` (offset = steps since the last update) while the rest of every
//! block (modulation, MLPs, gated residuals) still runs.
//!
//! Pure: no I/O. Tensors are candle CPU f32 tensors, keyed as the denoiser keys attention
//! outputs (`<block>.<output>`).

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use super::Decision;

/// Precision the factors are kept in (`taylor_factors_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactorDType {
    /// `torch.float32`.
    F32,
    /// `torch.bfloat16` (diffusers' default).
    Bf16,
    /// `torch.float16`.
    F16,
}

impl FactorDType {
    /// Parses diffusers' names (`bfloat16`, `float32`, `float16`, with or without `torch.`).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().trim_start_matches("torch.") {
            "float32" => Some(Self::F32),
            "bfloat16" => Some(Self::Bf16),
            "float16" => Some(Self::F16),
            _ => None,
        }
    }

    fn round(self, t: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::F32 => Ok(t.clone()),
            Self::Bf16 => t.to_dtype(DType::BF16)?.to_dtype(DType::F32),
            Self::F16 => t.to_dtype(DType::F16)?.to_dtype(DType::F32),
        }
    }
}

/// TaylorSeer settings, named as diffusers' `TaylorSeerCacheConfig` names them.
#[derive(Debug, Clone, PartialEq)]
pub struct TaylorSeerParams {
    /// Steps between computes after the warm-up.
    pub cache_interval: u32,
    /// The first steps always compute.
    pub disable_cache_before_step: u32,
    /// From this step on every step computes (`None`: never).
    pub disable_cache_after_step: Option<u32>,
    /// Highest order of the Taylor expansion.
    pub max_order: u32,
    /// Precision of the kept factors.
    pub taylor_factors_dtype: FactorDType,
}

/// One branch's TaylorSeer state: the step counter and the factors of every hooked output.
#[derive(Debug, Clone, Default)]
pub struct TaylorState {
    /// Calls so far (diffusers' `current_step` + 1).
    calls: u64,
    last_update_step: Option<u64>,
    factors: BTreeMap<String, Vec<Tensor>>,
}

impl TaylorState {
    /// Decides this call: compute (and then [`Self::update`]) or forecast ([`Self::predict`]).
    pub fn decide(&mut self, p: &TaylorSeerParams) -> Decision {
        let step = self.calls;
        self.calls += 1;
        let before = u64::from(p.disable_cache_before_step);
        let warmup = step < before;
        // Python's modulo of (step - before - 1) by a positive interval.
        let interval = i128::from(p.cache_interval.max(1));
        let on_interval = (i128::from(step) - i128::from(before) - 1).rem_euclid(interval) == 0;
        let cooldown = p
            .disable_cache_after_step
            .is_some_and(|a| step >= u64::from(a));
        let compute = warmup || on_interval || cooldown || self.factors.is_empty();
        let mut d = Decision {
            compute,
            forced: (warmup || cooldown).then_some(super::Forced::Warmup),
            ..Decision::default()
        };
        d.numbers.push(("step", step as f64));
        if !compute {
            let last = self.last_update_step.unwrap_or(0);
            d.numbers.push(("last_update_step", last as f64));
            d.numbers.push(("step_offset", (step - last) as f64));
            d.numbers
                .push(("order", self.orders().saturating_sub(1) as f64));
        }
        d
    }

    fn orders(&self) -> usize {
        self.factors.values().next().map_or(0, Vec::len)
    }

    /// After a computed call: this call's attention outputs become the new factors (divided
    /// differences against the kept ones, up to `max_order`, in the factor dtype).
    pub fn update(
        &mut self,
        p: &TaylorSeerParams,
        outputs: &BTreeMap<String, Tensor>,
    ) -> candle_core::Result<()> {
        let step = self.calls.saturating_sub(1);
        let delta = self.last_update_step.map(|last| (step - last) as f32);
        let mut factors = BTreeMap::new();
        for (key, out) in outputs {
            let mut new = vec![out.clone()];
            if let (Some(delta), Some(prev)) = (delta, self.factors.get(key)) {
                let delta = Tensor::new(delta, out.device())?;
                for j in 0..p.max_order as usize {
                    match prev.get(j) {
                        Some(pj) if pj.dims() == new[j].dims() => {
                            let next = (&new[j] - pj)?.broadcast_div(&delta)?;
                            new.push(next);
                        }
                        _ => break,
                    }
                }
            }
            let rounded = new
                .iter()
                .map(|f| p.taylor_factors_dtype.round(f))
                .collect::<candle_core::Result<Vec<_>>>()?;
            factors.insert(key.clone(), rounded);
        }
        self.factors = factors;
        self.last_update_step = Some(step);
        Ok(())
    }

    /// A forecast call's attention outputs: `sum_k F_k * offset^k / k!` per kept output.
    pub fn predict(&self) -> candle_core::Result<BTreeMap<String, Tensor>> {
        let step = self.calls.saturating_sub(1);
        let offset = step - self.last_update_step.unwrap_or(step);
        let mut out = BTreeMap::new();
        for (key, factors) in &self.factors {
            let Some(first) = factors.first() else {
                continue;
            };
            let mut acc = first.zeros_like()?;
            let mut factorial = 1.0f64;
            for (k, f) in factors.iter().enumerate() {
                if k > 0 {
                    factorial *= k as f64;
                }
                let coeff = (offset as f64).powi(k as i32) / factorial;
                acc = (acc + f.broadcast_mul(&Tensor::new(coeff as f32, f.device())?)?)?;
            }
            out.insert(key.clone(), acc);
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::float_cmp)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn params(max_order: u32) -> TaylorSeerParams {
        TaylorSeerParams {
            cache_interval: 3,
            disable_cache_before_step: 2,
            disable_cache_after_step: None,
            max_order,
            taylor_factors_dtype: FactorDType::F32,
        }
    }

    fn one(v: f32) -> BTreeMap<String, Tensor> {
        BTreeMap::from([("0.0".to_string(), Tensor::new(&[v], &Device::Cpu).unwrap())])
    }

    /// Which of `n` calls compute (each computed call updating with a constant output).
    fn computes(p: &TaylorSeerParams, n: usize) -> Vec<bool> {
        let mut s = TaylorState::default();
        (0..n)
            .map(|_| {
                let d = s.decide(p);
                if d.compute {
                    s.update(p, &one(1.0)).unwrap();
                }
                d.compute
            })
            .collect()
    }

    #[test]
    fn schedule_is_diffusers() {
        // cache_interval 3, disable_cache_before_step 2: compute 0, 1, 3, 6.
        let p = params(2);
        let got = computes(&p, 8);
        assert_eq!(
            got,
            vec![true, true, false, true, false, false, true, false]
        );
        // Defaults (interval 5, before 3) over 8 steps: compute 0, 1, 2, 4.
        let p = TaylorSeerParams {
            cache_interval: 5,
            disable_cache_before_step: 3,
            ..params(1)
        };
        let got = computes(&p, 8);
        assert_eq!(
            got,
            vec![true, true, true, false, true, false, false, false]
        );
    }

    #[test]
    fn forecasts_with_diffusers_divided_differences() {
        // f(s) = s^2 computed at steps 0, 1, 3: F0 = 9, F1 = (9 - 1) / 2 = 4,
        // F2 = (4 - 1) / 2 = 1.5 (diffusers divides by the gap, not by k!).
        let p = params(2);
        let mut s = TaylorState::default();
        let mut forecasts = Vec::new();
        for step in 0..6u32 {
            let d = s.decide(&p);
            if d.compute {
                s.update(&p, &one((step * step) as f32)).unwrap();
            } else if step >= 4 {
                forecasts.push(s.predict().unwrap()["0.0"].to_vec1::<f32>().unwrap()[0]);
            }
        }
        // Offset 1: 9 + 4 + 1.5 / 2; offset 2: 9 + 8 + 1.5 * 4 / 2.
        assert_eq!(forecasts, vec![13.75, 20.0]);
    }
}
