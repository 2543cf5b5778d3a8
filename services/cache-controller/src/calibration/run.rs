//! The `Calibrate` RPC's work: validates the request into uncached generations, runs each as
//! an ordinary session through the denoisers while recording the POSITIVE branch's per-step
//! changes, and fits the 4th-degree polynomial over all samples.

use teaserve_proto::v1;

use super::fit::polyfit;
use super::{Sample, Target};
use crate::error::ControllerError;

/// Most generations one Calibrate call may run.
pub const MAX_GENERATIONS: usize = 1000;
/// Most seeds per prompt.
pub const MAX_SEEDS: u32 = 100;

fn invalid(msg: impl Into<String>) -> ControllerError {
    ControllerError::InvalidArgument(msg.into())
}

/// A validated calibration: the generations to run uncached and what to fit.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The model type.
    pub model_type: String,
    /// Generations, each with caching off.
    pub generations: Vec<v1::GenerateRequest>,
    /// What y is.
    pub target: Target,
}

/// Checks a CalibrateRequest and expands it into generations (`default_model`: the server's
/// default model_class_name).
pub fn plan(
    req: &v1::CalibrateRequest,
    default_model: Option<&str>,
) -> Result<Plan, ControllerError> {
    let model_type = if req.model_class_name.is_empty() {
        default_model.unwrap_or_default().to_string()
    } else {
        req.model_class_name.clone()
    };
    if model_type.is_empty() {
        return Err(invalid(
            "model_class_name is required: the model type to calibrate",
        ));
    }
    let target = match v1::CalibrationTarget::try_from(req.target) {
        Ok(v1::CalibrationTarget::Residual) => Target::Residual,
        Ok(v1::CalibrationTarget::Output) => Target::Output,
        Err(_) => {
            return Err(invalid(format!(
                "target {} is unknown; accepted: RESIDUAL (0, default) or OUTPUT (1)",
                req.target
            )));
        }
    };
    if req.prompts.is_empty() && req.requests.is_empty() {
        return Err(invalid(
            "nothing to calibrate on: give prompts (text-mode models) or requests (model-native inputs)",
        ));
    }
    let seeds = if req.seeds_per_prompt == 0 {
        1
    } else {
        req.seeds_per_prompt
    };
    if seeds > MAX_SEEDS {
        return Err(invalid(format!(
            "seeds_per_prompt must be at most {MAX_SEEDS}, got {seeds}"
        )));
    }
    let steps = if req.num_inference_steps == 0 {
        20
    } else {
        req.num_inference_steps
    };
    if !(3..=1000).contains(&steps) {
        return Err(invalid(format!(
            "num_inference_steps must be between 3 and 1000 for calibration, got {steps}"
        )));
    }
    let total = req.prompts.len() * seeds as usize + req.requests.len();
    if total > MAX_GENERATIONS {
        return Err(ControllerError::ResourceExhausted(format!(
            "{total} generations requested; at most {MAX_GENERATIONS} per Calibrate call"
        )));
    }
    let uncached = |r: v1::GenerateRequest| v1::GenerateRequest {
        model_class_name: model_type.clone(),
        cache_adapter: "none".into(),
        cache_config: None,
        ..r
    };
    let mut generations = Vec::with_capacity(total);
    for (i, prompt) in req.prompts.iter().enumerate() {
        if prompt.trim().is_empty() {
            return Err(invalid(format!("prompts[{i}] is empty")));
        }
        for seed in 0..u64::from(seeds) {
            generations.push(uncached(v1::GenerateRequest {
                prompt: prompt.clone(),
                seed,
                num_inference_steps: steps,
                ..Default::default()
            }));
        }
    }
    for (i, r) in req.requests.iter().enumerate() {
        if !r.model_class_name.is_empty() && r.model_class_name != model_type {
            return Err(invalid(format!(
                "requests[{i}] names model '{}' but the calibration is for '{}'",
                teaserve_proto::quote(&r.model_class_name),
                teaserve_proto::quote(&model_type)
            )));
        }
        // With true CFG the POSITIVE branch is recorded, on the CFG trajectory (diffusers'
        // MagCache calibration's 'cond' list).
        generations.push(uncached(r.clone()));
    }
    Ok(Plan {
        model_type,
        generations,
        target,
    })
}

/// Fits the polynomial over `samples` and packs the result.
/// MagCache's ratios: per step index, the mean over the generations that have that step.
pub fn mean_mag_ratios(runs: &[Vec<f64>]) -> Vec<f64> {
    let steps = runs.iter().map(Vec::len).max().unwrap_or(0);
    (0..steps)
        .map(|k| {
            let at: Vec<f64> = runs.iter().filter_map(|r| r.get(k).copied()).collect();
            at.iter().sum::<f64>() / at.len().max(1) as f64
        })
        .collect()
}

/// The fit over all samples, and MagCache's ratios (`mag_ratios`: one list per generation).
pub fn result(
    plan: &Plan,
    samples: &[Sample],
    mag_ratios: &[Vec<f64>],
) -> Result<v1::CalibrateResult, ControllerError> {
    let xs: Vec<f64> = samples.iter().map(|s| s.x).collect();
    let ys: Vec<f64> = samples.iter().map(|s| s.y(plan.target)).collect();
    if xs.iter().chain(&ys).any(|v| !v.is_finite()) {
        return Err(ControllerError::Internal(
            "calibration produced non-finite rel-L1 values".into(),
        ));
    }
    let (coefficients, r2) = polyfit(&xs, &ys, 4).ok_or_else(|| {
        ControllerError::FailedPrecondition(format!(
            "cannot fit 5 coefficients from {} samples (the inputs may not change between \
             steps); run more generations or more steps",
            xs.len()
        ))
    })?;
    let cache_config_json = serde_json::json!({
        "model_type": plan.model_type,
        "coefficients": coefficients,
    })
    .to_string();
    Ok(v1::CalibrateResult {
        model_type: plan.model_type.clone(),
        coefficients,
        r2,
        samples: xs.len() as u32,
        x: xs,
        y: ys,
        step: samples.iter().map(|s| s.step).collect(),
        target: match plan.target {
            Target::Residual => v1::CalibrationTarget::Residual,
            Target::Output => v1::CalibrationTarget::Output,
        } as i32,
        cache_config_json,
        mag_ratios: mean_mag_ratios(mag_ratios),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn plans_expand_and_validate() {
        let req = v1::CalibrateRequest {
            model_class_name: "TinyFluxPipeline".into(),
            prompts: vec!["a red circle".into(), "a blue square".into()],
            seeds_per_prompt: 3,
            ..Default::default()
        };
        let p = plan(&req, None).unwrap();
        assert_eq!(p.generations.len(), 6);
        assert!(
            p.generations
                .iter()
                .all(|g| g.cache_adapter == "none" && g.num_inference_steps == 20)
        );
        assert_eq!(p.target, Target::Residual);
        let bad = |r: v1::CalibrateRequest| plan(&r, None).unwrap_err().to_string();
        assert!(
            bad(v1::CalibrateRequest {
                prompts: vec![],
                ..req.clone()
            })
            .contains("nothing to calibrate")
        );
        assert!(
            bad(v1::CalibrateRequest {
                num_inference_steps: 2,
                ..req.clone()
            })
            .contains("between 3 and 1000")
        );
        assert!(
            bad(v1::CalibrateRequest {
                target: 7,
                ..req.clone()
            })
            .contains("RESIDUAL")
        );
        assert!(
            bad(v1::CalibrateRequest {
                prompts: vec![" ".into()],
                ..req.clone()
            })
            .contains("prompts[0]")
        );
        assert!(
            bad(v1::CalibrateRequest {
                model_class_name: String::new(),
                ..req.clone()
            })
            .contains("model_class_name")
        );
        assert!(matches!(
            plan(
                &v1::CalibrateRequest {
                    seeds_per_prompt: 100,
                    prompts: vec!["a".into(); 11],
                    ..req
                },
                None
            ),
            Err(ControllerError::ResourceExhausted(_))
        ));
    }

    #[test]
    fn fits_samples_with_known_coefficients() {
        // Samples on y = 2x^2 + 0.1 with a little deterministic noise.
        let samples: Vec<Sample> = (0..200)
            .map(|i| {
                let x = 0.01 + f64::from(i) * 0.002;
                let noise = ((i * 7919) % 13) as f64 * 1e-6 - 6e-6;
                Sample {
                    step: 1,
                    x,
                    residual: 2.0 * x * x + 0.1 + noise,
                    output: 0.0,
                }
            })
            .collect();
        let p = Plan {
            model_type: "M".into(),
            generations: vec![],
            target: Target::Residual,
        };
        let r = result(&p, &samples, &[vec![1.0, 2.0, 4.0], vec![1.0, 4.0]]).unwrap();
        assert_eq!(r.mag_ratios, vec![1.0, 3.0, 4.0]);
        let want = [0.0, 0.0, 2.0, 0.0, 0.1];
        for (g, w) in r.coefficients.iter().zip(want) {
            assert!((g - w).abs() < 0.05, "{:?}", r.coefficients);
        }
        assert!(r.r2 > 0.9999, "{}", r.r2);
        assert!(r.cache_config_json.contains("\"model_type\":\"M\""));
        // Too few samples to fit.
        assert!(matches!(
            result(&p, &samples[..3], &[]),
            Err(ControllerError::FailedPrecondition(_))
        ));
    }
}
