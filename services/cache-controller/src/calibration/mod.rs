//! Calibration: fitting TeaCache's coefficients for a model from its own uncached runs.
//! [`Trace`] records, per step of the POSITIVE branch, the modulated input, the blocks'
//! residual and the model output; consecutive steps give samples (x = input rel-L1,
//! y = residual or output rel-L1); [`fit::polyfit`] turns them into 5 coefficients. The same
//! residuals give MagCache's magnitude ratios ([`mag_ratio`]), as diffusers calibrates them.

pub mod fit;
pub mod run;

use crate::policy::teacache::rel_l1;

/// What the polynomial predicts from the modulated input's change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The transformer blocks' residual (image stream out minus in): what TeaCache reuses.
    Residual,
    /// The model output (Postprocess's sample).
    Output,
}

/// One pair of consecutive steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Index of the later step.
    pub step: u32,
    /// Relative L1 change of the modulated input.
    pub x: f64,
    /// Relative L1 change of the blocks' residual.
    pub residual: f64,
    /// Relative L1 change of the model output.
    pub output: f64,
}

impl Sample {
    /// The sample's y for `target`.
    pub fn y(&self, target: Target) -> f64 {
        match target {
            Target::Residual => self.residual,
            Target::Output => self.output,
        }
    }
}

/// The previous step's values of one generation, and the samples so far.
#[derive(Debug, Default, Clone)]
pub struct Trace {
    previous: Option<(Vec<f32>, Vec<f32>, Vec<f32>)>,
    /// Samples of this generation.
    pub samples: Vec<Sample>,
    /// MagCache's magnitude ratio of every step of this generation (1.0 at its first).
    pub mag_ratios: Vec<f64>,
}

/// diffusers' MagCache calibration ratio of a residual against the previous step's: the mean
/// over tokens of `||r_t|| / (||r_t-1|| + 1e-8)`, L2 norms over the last (channel) axis of
/// `channels` values, in float32 as diffusers computes them.
pub fn mag_ratio(residual: &[f32], previous: &[f32], channels: usize) -> f64 {
    let norm = |v: &[f32]| -> f32 { v.iter().map(|x| x * x).sum::<f32>().sqrt() };
    let tokens = residual.len() / channels.max(1);
    if tokens == 0 || previous.len() != residual.len() {
        return 1.0;
    }
    let sum: f64 = residual
        .chunks(channels)
        .zip(previous.chunks(channels))
        .map(|(c, p)| f64::from(norm(c) / (norm(p) + 1e-8)))
        .sum();
    sum / tokens as f64
}

impl Trace {
    /// Records step `step`'s modulated input, residual (`channels` values per token) and
    /// output.
    pub fn record(
        &mut self,
        step: u32,
        modulated: Vec<f32>,
        (residual, channels): (Vec<f32>, usize),
        output: Vec<f32>,
    ) {
        self.mag_ratios.push(match &self.previous {
            Some((_, r, _)) => mag_ratio(&residual, r, channels),
            None => 1.0,
        });
        if let Some((m, r, o)) = &self.previous
            && m.len() == modulated.len()
            && r.len() == residual.len()
            && o.len() == output.len()
        {
            self.samples.push(Sample {
                step,
                x: rel_l1(&modulated, m),
                residual: rel_l1(&residual, r),
                output: rel_l1(&output, o),
            });
        }
        self.previous = Some((modulated, residual, output));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_steps_make_samples() {
        let mut t = Trace::default();
        t.record(0, vec![1.0, 1.0], (vec![2.0], 1), vec![4.0]);
        assert!(t.samples.is_empty());
        t.record(1, vec![1.5, 1.5], (vec![3.0], 1), vec![4.0]);
        let s = t.samples[0];
        assert_eq!(s.step, 1);
        assert!((s.x - 0.5).abs() < 1e-6 && (s.residual - 0.5).abs() < 1e-6);
        assert!(s.output.abs() < 1e-12);
        assert_eq!(s.y(Target::Output), s.output);
        assert_eq!(t.mag_ratios[0], 1.0);
        assert!((t.mag_ratios[1] - 1.5).abs() < 1e-6);
    }

    #[test]
    fn mag_ratio_is_the_mean_of_per_token_norm_ratios() {
        // Two tokens of two channels: norms 5 / 1 and 0 / 2.
        let r = mag_ratio(&[3.0, 4.0, 0.0, 0.0], &[1.0, 0.0, 0.0, 2.0], 2);
        assert!((r - 2.5).abs() < 1e-6, "{r}");
    }
}
