//! The controller's model table (the gRPC face of the seed's `EXTRACTOR_REGISTRY`): for each
//! model type, its default TeaCache coefficients and threshold, its default sigma schedule, and
//! what a request that leaves a field unset gets (steps, image size, CFG scale, guidance), as
//! the diffusers pipeline's `__call__` signature defaults them.

use crate::policy::Coefficients;

/// Default TeaCache threshold when a request sets none.
pub const DEFAULT_REL_L1_THRESH: f64 = 0.2;

/// A flow-matching schedule with diffusers' resolution-dependent ("dynamic") shift.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShiftedSchedule {
    /// Sequence length at which the shift is `base_shift`.
    pub base_image_seq_len: f64,
    /// Sequence length at which the shift is `max_shift`.
    pub max_image_seq_len: f64,
    /// mu at `base_image_seq_len`.
    pub base_shift: f64,
    /// mu at `max_image_seq_len`.
    pub max_shift: f64,
    /// Stretch so the last sigma lands here (Qwen-Image: 0.02); `None` for FLUX.
    pub shift_terminal: Option<f64>,
}

/// One model type the controller knows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelDefaults {
    /// Pipeline class name, e.g. `FluxPipeline`.
    pub model_type: &'static str,
    /// Default TeaCache coefficients, highest power first.
    pub coefficients: Coefficients,
    /// Default threshold.
    pub rel_l1_thresh: f64,
    /// Default sigma schedule.
    pub schedule: ShiftedSchedule,
    /// `num_inference_steps` when a request sets neither it nor `sigmas`.
    pub num_inference_steps: u32,
    /// Text-mode image (height, width) in pixels when a request sets none.
    pub image_size: (u32, u32),
    /// `true_cfg_scale` when a request with a NEGATIVE branch sets none.
    pub true_cfg_scale: f64,
    /// Embedded guidance of guidance-distilled checkpoints; `None` where the model takes none.
    pub guidance_scale: Option<f64>,
    /// Text mode: default `max_sequence_length`; 0 where there is none.
    pub max_sequence_length: u32,
    /// Whether the pipeline rescales the CFG result to the positive prediction's norm per
    /// token (`cfg_renorm` when a request leaves it unset).
    pub cfg_renorm: bool,
    /// MagCache's default magnitude ratios (empty: requests must pass their own).
    pub mag_ratios: &'static [f64],
}

/// TeaCache coefficients of the embedded TinyFluxPipeline, highest power first.
pub const TINY_FLUX_COEFFICIENTS: Coefficients = [
    -12919.485529173744,
    4345.257064325771,
    -505.9467792156062,
    25.557707164910525,
    -0.41821599760542666,
];

/// Every model type with TeaCache coefficients, in the order error messages list them.
pub static MODELS: &[ModelDefaults] = &[
    ModelDefaults {
        model_type: "FluxPipeline",
        coefficients: [
            4.98651651e+02,
            -2.83781631e+02,
            5.58554382e+01,
            -3.82021401e+00,
            2.64230861e-01,
        ],
        rel_l1_thresh: DEFAULT_REL_L1_THRESH,
        schedule: ShiftedSchedule {
            base_image_seq_len: 256.0,
            max_image_seq_len: 4096.0,
            base_shift: 0.5,
            max_shift: 1.15,
            shift_terminal: None,
        },
        // FluxPipeline.__call__: 28 steps, 1024x1024 (default_sample_size 128 x VAE factor
        // 8), true_cfg_scale 1.0, guidance_scale 3.5.
        num_inference_steps: 28,
        image_size: (1024, 1024),
        true_cfg_scale: 1.0,
        guidance_scale: Some(3.5),
        // FluxPipeline.__call__: max_sequence_length 512 (T5's positions).
        max_sequence_length: 512,
        // FluxPipeline's true CFG is the plain combination.
        cfg_renorm: false,
        // diffusers' FLUX_MAG_RATIOS (FLUX.1-dev, 28 steps).
        mag_ratios: &crate::policy::mag_cache::FLUX_MAG_RATIOS,
    },
    ModelDefaults {
        model_type: "TinyFluxPipeline",
        // Fitted by `train --fit` on the embedded model (models/tiny-flux/teacache.json).
        coefficients: TINY_FLUX_COEFFICIENTS,
        rel_l1_thresh: DEFAULT_REL_L1_THRESH,
        // Trained on uniform-in-logit timesteps over 64 tokens: plain linspace (mu = 0).
        schedule: ShiftedSchedule {
            base_image_seq_len: 256.0,
            max_image_seq_len: 4096.0,
            base_shift: 0.0,
            max_shift: 0.0,
            shift_terminal: None,
        },
        // The embedded model draws 32x32 pixels; 20 steps is what it was evaluated at.
        num_inference_steps: 20,
        image_size: (32, 32),
        true_cfg_scale: 4.0,
        guidance_scale: None,
        // Its word-embedding encoder has a fixed length.
        max_sequence_length: 0,
        cfg_renorm: false,
        mag_ratios: &[],
    },
    ModelDefaults {
        model_type: "QwenImagePipeline",
        coefficients: [-4.5e+02, 2.8e+02, -4.5e+01, 3.2e+00, -2.0e-02],
        rel_l1_thresh: DEFAULT_REL_L1_THRESH,
        schedule: ShiftedSchedule {
            base_image_seq_len: 256.0,
            max_image_seq_len: 8192.0,
            base_shift: 0.5,
            max_shift: 0.9,
            shift_terminal: Some(0.02),
        },
        // QwenImagePipeline.__call__: 50 steps, 1024x1024, true_cfg_scale 4.0, no guidance.
        num_inference_steps: 50,
        image_size: (1024, 1024),
        true_cfg_scale: 4.0,
        guidance_scale: None,
        // QwenImagePipeline.__call__: max_sequence_length 512 (check_inputs allows 1024).
        max_sequence_length: 512,
        // QwenImagePipeline.__call__: comb * (||pos|| / ||comb||) per token.
        cfg_renorm: true,
        mag_ratios: &[],
    },
];

/// Looks up a model type.
pub fn lookup(model_type: &str) -> Option<&'static ModelDefaults> {
    MODELS.iter().find(|m| m.model_type == model_type)
}

/// The supported model types as Python writes a list of strings: `['A', 'B']`.
pub fn supported_list() -> String {
    let names: Vec<String> = MODELS
        .iter()
        .map(|m| format!("'{}'", m.model_type))
        .collect();
    format!("[{}]", names.join(", "))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tiny_flux_coefficients_are_the_fitted_ones() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../models/tiny-flux/teacache.json"
        );
        let fit: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let fitted: Vec<f64> = fit["coefficients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        // serde_json's default float parser may differ from Rust's literal parser in the
        // last ulp, so compare to 1e-12 relative rather than bit for bit.
        assert_eq!(fitted.len(), TINY_FLUX_COEFFICIENTS.len());
        for (f, c) in fitted.iter().zip(TINY_FLUX_COEFFICIENTS) {
            assert!(
                (f - c).abs() <= 1e-12 * c.abs(),
                "{fitted:?} != {TINY_FLUX_COEFFICIENTS:?}"
            );
        }
        assert_eq!(
            lookup("TinyFluxPipeline").unwrap().coefficients,
            TINY_FLUX_COEFFICIENTS
        );
    }
}
