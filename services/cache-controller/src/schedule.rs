//! Sigma schedules for flow-matching models, as diffusers' pipelines build them.

use crate::models::ShiftedSchedule;

/// Explicit sigmas (diffusers convention): the `N` given values with a final 0 appended.
pub fn from_explicit(sigmas: &[f64]) -> Vec<f64> {
    let mut s = sigmas.to_vec();
    s.push(0.0);
    s
}

/// The model's default schedule for `num_steps` steps over `image_seq_len` tokens:
/// `linspace(1, 1/N, N)`, time-shifted by `mu = calculate_shift(image_seq_len)`
/// (`exp(mu) / (exp(mu) + (1/sigma - 1))`), optionally stretched to `shift_terminal`, then
/// a final 0.
pub fn default_sigmas(
    schedule: &ShiftedSchedule,
    num_steps: usize,
    image_seq_len: usize,
) -> Vec<f64> {
    let n = num_steps.max(1);
    let last = 1.0 / n as f64;
    let linspace = (0..n).map(|i| {
        if n == 1 {
            1.0
        } else {
            1.0 + (last - 1.0) * i as f64 / (n - 1) as f64
        }
    });
    let slope = (schedule.max_shift - schedule.base_shift)
        / (schedule.max_image_seq_len - schedule.base_image_seq_len);
    let mu =
        image_seq_len as f64 * slope + (schedule.base_shift - slope * schedule.base_image_seq_len);
    let e = mu.exp();
    let mut sigmas: Vec<f64> = linspace.map(|t| e / (e + (1.0 / t - 1.0))).collect();
    if let (Some(terminal), Some(&last)) = (schedule.shift_terminal, sigmas.last()) {
        let scale = (1.0 - last) / (1.0 - terminal);
        if scale > 0.0 {
            sigmas = sigmas.iter().map(|s| 1.0 - (1.0 - s) / scale).collect();
        }
    }
    sigmas.push(0.0);
    sigmas
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::models::lookup;

    #[test]
    fn flux_default_matches_diffusers_formula() {
        let flux = lookup("FluxPipeline").unwrap().schedule;
        // 64 tokens, 4 steps: mu = 64 * (0.65 / 3840) + (0.5 - 256 * 0.65 / 3840)
        let s = default_sigmas(&flux, 4, 64);
        let mu: f64 = 64.0 * (0.65 / 3840.0) + (0.5 - 256.0 * 0.65 / 3840.0);
        let want: Vec<f64> = [1.0, 0.75, 0.5, 0.25]
            .iter()
            .map(|t: &f64| mu.exp() / (mu.exp() + (1.0 / t - 1.0)))
            .chain([0.0])
            .collect();
        assert_eq!(s.len(), 5);
        for (a, b) in s.iter().zip(&want) {
            assert!((a - b).abs() < 1e-12, "{s:?} vs {want:?}");
        }
        assert_eq!(s[0], 1.0);
        assert!(s.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn terminal_stretch_lands_on_terminal() {
        let qwen = lookup("QwenImagePipeline").unwrap().schedule;
        let s = default_sigmas(&qwen, 10, 1024);
        assert!((s[9] - 0.02).abs() < 1e-12, "{s:?}");
        assert_eq!(s[0], 1.0);
        assert_eq!(s[10], 0.0);
    }

    #[test]
    fn explicit_sigmas_get_a_final_zero() {
        assert_eq!(from_explicit(&[1.0, 0.5]), vec![1.0, 0.5, 0.0]);
    }
}
