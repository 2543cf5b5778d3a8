//! MagCache, exactly as diffusers' `MagCacheConfig` hooks decide (diffusers 0.42.1,
//! `hooks/mag_cache.py`), per CFG branch.
//!
//! The decision never looks at the data: from the step
//! `retention_step = int(retention_ratio * N + 0.5)` on, every call multiplies the accumulated ratio by the calibrated magnitude
//! ratio of its step, counts one more step and adds `|1 - ratio|` to the accumulated error
//! (all float32, as diffusers' tensors are); the blocks are skipped while a residual is kept,
//! the error is within `threshold` and at most `max_skip_steps` steps accumulated; a compute
//! resets the three accumulators. A skipped step adds the residual kept at the last computed
//! step (image stream out minus in) to this step's input, which is TeaCache's reuse.
//!
//! Pure: no I/O.

use super::Decision;

/// diffusers' `FLUX_MAG_RATIOS`: FLUX.1-dev's magnitude ratios over 28 steps (the default of
/// FLUX model types; resampled to the step count).
pub const FLUX_MAG_RATIOS: [f64; 28] = [
    1.0, 1.21094, 1.11719, 1.07812, 1.0625, 1.03906, 1.03125, 1.03906, 1.02344, 1.03125, 1.02344,
    0.98047, 1.01562, 1.00781, 1.0, 1.00781, 1.0, 1.00781, 1.0, 1.0, 0.99609, 0.99609, 0.98047,
    0.98828, 0.96484, 0.95703, 0.93359, 0.89062,
];

/// MagCache settings for one session, named as diffusers' `MagCacheConfig` names them.
#[derive(Debug, Clone, PartialEq)]
pub struct MagCacheParams {
    /// Largest accumulated error that still skips.
    pub threshold: f64,
    /// Most steps accumulated before a compute is forced.
    pub max_skip_steps: u32,
    /// The first `int(retention_ratio * N + 0.5)` steps always compute.
    pub retention_ratio: f64,
    /// Calibrated magnitude ratios (any length; resampled to the step count).
    pub mag_ratios: Vec<f64>,
}

impl MagCacheParams {
    /// `mag_ratios` resampled to `n` steps as diffusers' `nearest_interp` does (float32 grid,
    /// round half to even), as float32.
    pub fn ratios_for(&self, n: usize) -> Vec<f32> {
        let src: Vec<f32> = self.mag_ratios.iter().map(|&r| r as f32).collect();
        if src.len() == n || src.is_empty() || n == 0 {
            return if n == 0 { Vec::new() } else { src };
        }
        if n == 1 {
            return src[src.len() - 1..].to_vec();
        }
        let scale = ((src.len() - 1) as f64 / (n - 1) as f64) as f32;
        (0..n)
            .map(|k| {
                let idx = ((k as f32) * scale).round_ties_even() as usize;
                src[idx.min(src.len() - 1)]
            })
            .collect()
    }

    /// diffusers' `retention_step` for `n` steps.
    pub fn retention_step(&self, n: usize) -> usize {
        (self.retention_ratio * n as f64 + 0.5) as usize
    }
}

/// One branch's MagCache accumulators (diffusers' `MagCacheState` less the tensors, which the
/// branch's residual store keeps).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MagState {
    /// Calls of this branch so far (diffusers' `step_index`).
    pub step_index: usize,
    /// Product of the ratios since the last compute (float32; 1 when reset).
    pub ratio: Option<f32>,
    /// Steps accumulated since the last compute.
    pub steps: u32,
    /// Accumulated `|1 - ratio|` (float32).
    pub err: f32,
}

impl MagState {
    /// Decides this call of `n` steps; `has_residual`: a residual of an earlier compute is
    /// kept. Advances the step index (and resets after the last step, as diffusers does).
    pub fn decide(&mut self, p: &MagCacheParams, n: usize, has_residual: bool) -> Decision {
        let k = self.step_index;
        let ratios = p.ratios_for(n);
        let mut d = Decision {
            compute: true,
            ..Decision::default()
        };
        let mag_ratio = ratios.get(k).copied().unwrap_or(1.0);
        d.numbers.push(("mag_ratio", f64::from(mag_ratio)));
        if k >= p.retention_step(n) {
            let ratio = self.ratio.unwrap_or(1.0) * mag_ratio;
            self.ratio = Some(ratio);
            self.steps += 1;
            self.err += (1.0 - ratio).abs();
            d.numbers.push(("accumulated_ratio", f64::from(ratio)));
            d.numbers.push(("accumulated_steps", f64::from(self.steps)));
            d.numbers.push(("accumulated_err", f64::from(self.err)));
            d.accumulated = f64::from(self.err);
            if has_residual && self.err <= p.threshold as f32 && self.steps <= p.max_skip_steps {
                d.compute = false;
            } else {
                self.ratio = None;
                self.steps = 0;
                self.err = 0.0;
            }
        } else {
            d.forced = Some(super::Forced::Warmup);
        }
        self.step_index += 1;
        if self.step_index >= n {
            *self = Self::default();
        }
        d
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::float_cmp)]
mod tests {
    use super::*;

    fn params(threshold: f64, ratios: Vec<f64>) -> MagCacheParams {
        MagCacheParams {
            threshold,
            max_skip_steps: 3,
            retention_ratio: 0.2,
            mag_ratios: ratios,
        }
    }

    #[test]
    fn flux_ratios_resample_to_8_steps_as_diffusers() {
        // diffusers: indices 0, 4, 8, 12, 15, 19, 23, 27.
        let p = params(0.06, FLUX_MAG_RATIOS.to_vec());
        let want: Vec<f32> = [0, 4, 8, 12, 15, 19, 23, 27]
            .iter()
            .map(|&i| FLUX_MAG_RATIOS[i] as f32)
            .collect();
        assert_eq!(p.ratios_for(8), want);
        assert_eq!(p.ratios_for(1), vec![0.89062]);
        assert!(p.ratios_for(0).is_empty());
        assert_eq!(p.retention_step(8), 2);
        assert_eq!(p.retention_step(28), 6);
    }

    #[test]
    fn accumulates_skips_and_resets_as_diffusers() {
        let p = params(0.1, vec![1.0, 1.0, 0.95, 0.97, 1.2, 1.0, 1.0, 1.0]);
        let mut s = MagState::default();
        let computes: Vec<bool> = (0..8).map(|k| s.decide(&p, 8, k > 0).compute).collect();
        // 0, 1 retained; 2: err 0.05 skip; 3: ratio 0.9215, err 0.1285 > 0.1 compute (reset);
        // 4: ratio 1.2, err 0.2 compute; 5..7: ratio 1, err 0, skip up to max_skip_steps 3.
        assert_eq!(
            computes,
            vec![true, true, false, true, true, false, false, false]
        );
        // The state starts over after the last step.
        assert_eq!(s, MagState::default());
    }

    #[test]
    fn no_residual_means_compute() {
        let p = params(10.0, vec![1.0; 4]);
        let mut s = MagState::default();
        assert!(s.decide(&p, 4, false).compute);
        assert!(s.decide(&p, 4, false).compute);
        assert!(!s.decide(&p, 4, true).compute);
    }
}
