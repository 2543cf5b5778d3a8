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

/// A diffusers `FlowMatchEulerDiscreteScheduler` config as a checkpoint ships it
/// (`scheduler/scheduler_config.json`); defaults are the class's own.
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
pub struct SchedulerConfig {
    /// The scheduler class; only `FlowMatchEulerDiscreteScheduler` is supported.
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// Training timesteps (timestep = sigma x this).
    #[serde(default = "default_train_timesteps")]
    pub num_train_timesteps: f64,
    /// Static shift, used only without dynamic shifting.
    #[serde(default = "one")]
    pub shift: f64,
    /// Resolution-dependent shift (`mu` from the image sequence length).
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    /// Sequence length at which `mu` is `base_shift`.
    #[serde(default = "default_base_seq")]
    pub base_image_seq_len: f64,
    /// Sequence length at which `mu` is `max_shift`.
    #[serde(default = "default_max_seq")]
    pub max_image_seq_len: f64,
    /// `mu` at `base_image_seq_len`.
    #[serde(default = "default_base_shift")]
    pub base_shift: f64,
    /// `mu` at `max_image_seq_len`.
    #[serde(default = "default_max_shift")]
    pub max_shift: f64,
    /// Stretch so the last sigma lands here.
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    /// `exponential` or `linear`.
    #[serde(default = "default_time_shift_type")]
    pub time_shift_type: String,
    /// Unsupported variants (refused when on).
    #[serde(default)]
    pub use_karras_sigmas: bool,
    /// Unsupported.
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    /// Unsupported.
    #[serde(default)]
    pub use_beta_sigmas: bool,
    /// Unsupported.
    #[serde(default)]
    pub invert_sigmas: bool,
    /// Unsupported.
    #[serde(default)]
    pub stochastic_sampling: bool,
}

fn default_train_timesteps() -> f64 {
    1000.0
}
fn one() -> f64 {
    1.0
}
fn default_base_seq() -> f64 {
    256.0
}
fn default_max_seq() -> f64 {
    4096.0
}
fn default_base_shift() -> f64 {
    0.5
}
fn default_max_shift() -> f64 {
    1.15
}
fn default_time_shift_type() -> String {
    "exponential".into()
}

/// numpy's `linspace(start, stop, n)` in f64: `i * step + start`, the last value `stop`.
fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    if let Some(last) = v.last_mut() {
        *last = stop;
    }
    v
}

impl SchedulerConfig {
    /// Parses `scheduler_config.json` and refuses what the port does not reproduce.
    pub fn parse(json: &str) -> Result<Self, String> {
        let c: Self = serde_json::from_str(json).map_err(|e| e.to_string())?;
        if let Some(name) = &c.class_name
            && name != "FlowMatchEulerDiscreteScheduler"
        {
            return Err(format!(
                "scheduler '{}' is not supported (only FlowMatchEulerDiscreteScheduler)",
                name.chars().take(60).collect::<String>()
            ));
        }
        let unsupported = [
            ("use_karras_sigmas", c.use_karras_sigmas),
            ("use_exponential_sigmas", c.use_exponential_sigmas),
            ("use_beta_sigmas", c.use_beta_sigmas),
            ("invert_sigmas", c.invert_sigmas),
            ("stochastic_sampling", c.stochastic_sampling),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, on)| *on) {
            return Err(format!("scheduler option {name} is not supported"));
        }
        if c.time_shift_type != "exponential" && c.time_shift_type != "linear" {
            return Err(format!(
                "time_shift_type '{}' is not supported (exponential, linear)",
                c.time_shift_type.chars().take(40).collect::<String>()
            ));
        }
        Ok(c)
    }

    /// `calculate_shift` of diffusers' pipelines (f64, no clamping).
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        let m =
            (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len);
        let b = self.base_shift - m * self.base_image_seq_len;
        image_seq_len as f64 * m + b
    }

    /// The `N + 1` sigmas the pipeline runs for `num_steps` over `image_seq_len` tokens
    /// (`set_timesteps(sigmas=linspace(1, 1/N, N), mu=...)`), in the scheduler's float32
    /// arithmetic, then a final 0.
    pub fn sigmas(&self, num_steps: usize, image_seq_len: usize) -> Vec<f64> {
        let n = num_steps.max(1);
        let s: Vec<f32> = np_linspace(1.0, 1.0 / n as f64, n)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let shifted: Vec<f32> = if self.use_dynamic_shifting {
            let mu = self.mu(image_seq_len);
            let e = if self.time_shift_type == "linear" {
                mu as f32
            } else {
                mu.exp() as f32
            };
            s.iter().map(|&t| e / (e + (1.0 / t - 1.0))).collect()
        } else {
            let shift = self.shift as f32;
            s.iter()
                .map(|&t| shift * t / (1.0 + (shift - 1.0) * t))
                .collect()
        };
        let mut out = match (self.shift_terminal, shifted.last()) {
            (Some(terminal), Some(&last)) => {
                let scale = (1.0 - last) / (1.0 - terminal) as f32;
                shifted.iter().map(|&t| 1.0 - (1.0 - t) / scale).collect()
            }
            _ => shifted,
        };
        out.push(0.0);
        out.into_iter().map(f64::from).collect()
    }
}

/// The timestep the pipelines pass the transformer for `sigma`: `timesteps[i] / 1000` with
/// `timesteps = sigmas * 1000` in float32 (the model multiplies by 1000 again); differs from
/// `sigma` in the last bit for some values.
pub fn transformer_timestep(sigma: f64) -> f32 {
    (sigma as f32 * 1000.0) / 1000.0
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

    #[test]
    fn flux_pipeline_sigmas_and_timesteps_are_the_fixtures_bit_for_bit() {
        pipeline_sigmas_match("flux-pipeline-tiny");
    }

    #[test]
    fn qwen_image_pipeline_sigmas_and_timesteps_are_the_fixtures_bit_for_bit() {
        // Exponential time shift plus the shift_terminal stretch, in float32.
        pipeline_sigmas_match("qwen-image-pipeline-tiny");
    }

    fn pipeline_sigmas_match(fixture: &str) {
        let dir = format!(
            "{}/../../tests/fixtures/{fixture}",
            env!("CARGO_MANIFEST_DIR")
        );
        let config = SchedulerConfig::parse(
            &std::fs::read_to_string(format!("{dir}/scheduler/scheduler_config.json")).unwrap(),
        )
        .unwrap();
        let reference: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{dir}/reference.json")).unwrap(),
        )
        .unwrap();
        let tensors = candle_core::safetensors::load(
            format!("{dir}/reference.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        for (case, meta) in reference["cases"].as_object().unwrap() {
            let steps = meta["num_inference_steps"].as_u64().unwrap() as usize;
            let tokens = meta["image_seq_len"].as_u64().unwrap() as usize;
            assert_eq!(config.mu(tokens), meta["mu"].as_f64().unwrap(), "{case}");
            let sigmas = config.sigmas(steps, tokens);
            let want: Vec<f32> = tensors[&format!("{case}.sigmas")].to_vec1().unwrap();
            let got: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
            assert_eq!(got, want, "{case} sigmas");
            let want: Vec<f32> = tensors[&format!("{case}.transformer_timestep")]
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got: Vec<f32> = sigmas[..steps]
                .iter()
                .map(|&s| transformer_timestep(s))
                .collect();
            assert_eq!(got, want, "{case} timesteps");
        }
    }

    #[test]
    fn unsupported_schedulers_are_named() {
        let err = SchedulerConfig::parse(r#"{"_class_name": "DDIMScheduler"}"#).unwrap_err();
        assert!(err.contains("DDIMScheduler"), "{err}");
        let err = SchedulerConfig::parse(r#"{"use_karras_sigmas": true}"#).unwrap_err();
        assert!(err.contains("use_karras_sigmas"), "{err}");
    }
}
