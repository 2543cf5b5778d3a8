//! Cache configuration from every surface, resolved into one plan per request.
//!
//! Surfaces, highest precedence first: the request's `cache_adapter` / `cache_config`; the
//! flags `--cache-adapter` (environment `DIFFUSION_CACHE_ADAPTER`) and
//! `--cache-config '<json>'`; the `--config stage.yaml` file (`model`, `model_class_name`,
//! `cache_adapter`, `cache_config`); built-in defaults (adapter `none`, the model table's
//! coefficients, threshold 0.2). All express the same settings, so any of them yields
//! the same decisions. Error messages are the seed's, verbatim.

use std::path::Path;

use serde::Deserialize;
use teaserve_proto::v1;

use crate::models::{self, supported_list};
use crate::policy::{
    FactorDType, FirstBlockParams, MagCacheParams, TaylorSeerParams, TeaCacheParams,
};

/// Adapter names accepted by `cache_adapter`.
pub const ADAPTERS: [&str; 5] = [
    "none",
    "tea_cache",
    "first_block_cache",
    "mag_cache",
    "taylor_seer",
];

/// Highest `max_order` accepted.
pub const MAX_TAYLOR_ORDER: u32 = 8;

/// diffusers' `FirstBlockCacheConfig.threshold` default.
pub const FIRST_BLOCK_THRESHOLD: f64 = 0.05;
/// diffusers' `MagCacheConfig` defaults: threshold, max_skip_steps, retention_ratio.
pub const MAG_DEFAULTS: (f64, u32, f64) = (0.06, 3, 0.2);

/// A configuration mistake, reported as INVALID_ARGUMENT (or at startup).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// `cache_config` as JSON / YAML spell it (same field names as the proto).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfigSpec {
    /// Threshold on the accumulated rescaled distance.
    pub rel_l1_thresh: Option<f64>,
    /// Model type whose coefficients apply.
    pub model_type: Option<String>,
    /// Exactly 5 coefficients, highest power first.
    pub coefficients: Option<Vec<f64>>,
    /// Extension: the first K steps always compute.
    pub warmup_steps: Option<u32>,
    /// Extension: the last K steps always compute.
    pub cooldown_steps: Option<u32>,
    /// Extension: compute after this many reuses in a row.
    pub max_consecutive_reuses: Option<u32>,
    /// Extension: CFG branches share one decision.
    pub shared_cfg_decision: Option<bool>,
    /// first_block_cache / mag_cache: the threshold.
    pub threshold: Option<f64>,
    /// mag_cache: most steps accumulated before a compute.
    pub max_skip_steps: Option<u32>,
    /// mag_cache: share of the steps that always compute first.
    pub retention_ratio: Option<f64>,
    /// mag_cache: calibrated magnitude ratios.
    pub mag_ratios: Option<Vec<f64>>,
    /// taylor_seer: steps between computes.
    pub cache_interval: Option<u32>,
    /// taylor_seer: the first steps always compute.
    pub disable_cache_before_step: Option<u32>,
    /// taylor_seer: from this step on every step computes.
    pub disable_cache_after_step: Option<u32>,
    /// taylor_seer: highest order of the expansion.
    pub max_order: Option<u32>,
    /// taylor_seer: precision of the kept factors.
    pub taylor_factors_dtype: Option<String>,
}

impl CacheConfigSpec {
    /// Parses `--cache-config` JSON and validates its numbers.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let spec: Self = serde_json::from_str(json)
            .map_err(|e| ConfigError(format!("--cache-config is not valid: {e}")))?;
        spec.validate()?;
        Ok(spec)
    }

    /// The request's `cache_config` in the same shape.
    pub fn from_proto(c: &v1::CacheConfig) -> Self {
        Self {
            rel_l1_thresh: c.rel_l1_thresh,
            model_type: (!c.model_type.is_empty()).then(|| c.model_type.clone()),
            coefficients: (!c.coefficients.is_empty()).then(|| c.coefficients.clone()),
            warmup_steps: c.warmup_steps,
            cooldown_steps: c.cooldown_steps,
            max_consecutive_reuses: c.max_consecutive_reuses,
            shared_cfg_decision: c.shared_cfg_decision,
            threshold: c.threshold,
            max_skip_steps: c.max_skip_steps,
            retention_ratio: c.retention_ratio,
            mag_ratios: (!c.mag_ratios.is_empty()).then(|| c.mag_ratios.clone()),
            cache_interval: c.cache_interval,
            disable_cache_before_step: c.disable_cache_before_step,
            disable_cache_after_step: c.disable_cache_after_step,
            max_order: c.max_order,
            taylor_factors_dtype: (!c.taylor_factors_dtype.is_empty())
                .then(|| c.taylor_factors_dtype.clone()),
        }
    }

    /// Fields set here win over `base`'s.
    pub fn over(&self, base: &Self) -> Self {
        Self {
            rel_l1_thresh: self.rel_l1_thresh.or(base.rel_l1_thresh),
            model_type: self.model_type.clone().or_else(|| base.model_type.clone()),
            coefficients: self
                .coefficients
                .clone()
                .or_else(|| base.coefficients.clone()),
            warmup_steps: self.warmup_steps.or(base.warmup_steps),
            cooldown_steps: self.cooldown_steps.or(base.cooldown_steps),
            max_consecutive_reuses: self.max_consecutive_reuses.or(base.max_consecutive_reuses),
            shared_cfg_decision: self.shared_cfg_decision.or(base.shared_cfg_decision),
            threshold: self.threshold.or(base.threshold),
            max_skip_steps: self.max_skip_steps.or(base.max_skip_steps),
            retention_ratio: self.retention_ratio.or(base.retention_ratio),
            mag_ratios: self.mag_ratios.clone().or_else(|| base.mag_ratios.clone()),
            cache_interval: self.cache_interval.or(base.cache_interval),
            disable_cache_before_step: self
                .disable_cache_before_step
                .or(base.disable_cache_before_step),
            disable_cache_after_step: self
                .disable_cache_after_step
                .or(base.disable_cache_after_step),
            max_order: self.max_order.or(base.max_order),
            taylor_factors_dtype: self
                .taylor_factors_dtype
                .clone()
                .or_else(|| base.taylor_factors_dtype.clone()),
        }
    }

    /// Checks the threshold and coefficients.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(t) = self.rel_l1_thresh
            && !(t.is_finite() && t >= 0.0)
        {
            return Err(ConfigError(format!(
                "rel_l1_thresh must be a finite number >= 0, got {t}"
            )));
        }
        if let Some(c) = &self.coefficients
            && (c.len() != 5 || c.iter().any(|x| !x.is_finite()))
        {
            return Err(ConfigError(format!(
                "coefficients must be exactly 5 finite numbers (highest power first), got {c:?}"
            )));
        }
        if let Some(t) = self.threshold
            && !(t.is_finite() && t >= 0.0)
        {
            return Err(ConfigError(format!(
                "threshold must be a finite number >= 0 (first_block_cache: largest relative \
                 change that reuses; mag_cache: largest accumulated error that skips), got {t}"
            )));
        }
        if let Some(r) = self.retention_ratio
            && !(0.0..=1.0).contains(&r)
        {
            return Err(ConfigError(format!(
                "retention_ratio must be a number in [0, 1] (the share of steps that always \
                 compute first), got {r}"
            )));
        }
        if let Some(m) = &self.mag_ratios
            && (m.is_empty()
                || m.len() > MAX_MAG_RATIOS
                || m.iter().any(|x| !(x.is_finite() && *x > 0.0)))
        {
            let shown: Vec<f64> = m.iter().take(8).copied().collect();
            return Err(ConfigError(format!(
                "mag_ratios must be 1 to {MAX_MAG_RATIOS} finite numbers > 0 (e.g. Calibrate's \
                 mag_ratios), got {} values starting {shown:?}",
                m.len()
            )));
        }
        if self.cache_interval == Some(0) {
            return Err(ConfigError(
                "cache_interval must be >= 1 (steps between computes), got 0".into(),
            ));
        }
        if let Some(o) = self.max_order
            && o > MAX_TAYLOR_ORDER
        {
            return Err(ConfigError(format!(
                "max_order must be 0 to {MAX_TAYLOR_ORDER} (the Taylor expansion's order), got {o}"
            )));
        }
        if let Some(d) = &self.taylor_factors_dtype
            && FactorDType::parse(d).is_none()
        {
            return Err(ConfigError(format!(
                "taylor_factors_dtype must be 'bfloat16', 'float32' or 'float16', got '{}'",
                teaserve_proto::quote(d)
            )));
        }
        Ok(())
    }
}

/// Most `mag_ratios` values accepted.
pub const MAX_MAG_RATIOS: usize = 1000;

/// `--config stage.yaml`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// The model the stage serves (informational for the controller; denoisers load it).
    pub model: Option<String>,
    /// Default `model_class_name` for requests that name none.
    pub model_class_name: Option<String>,
    /// Default adapter.
    pub cache_adapter: Option<String>,
    /// Default cache config.
    pub cache_config: Option<CacheConfigSpec>,
}

impl StageConfig {
    /// Reads and validates a stage YAML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("reading --config {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| ConfigError(format!("--config {}: {}", path.display(), e.0)))
    }

    /// Parses and validates stage YAML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self =
            yaml_serde::from_str(text).map_err(|e| ConfigError(format!("not valid: {e}")))?;
        if let Some(a) = &cfg.cache_adapter {
            check_adapter(a)?;
        }
        if let Some(c) = &cfg.cache_config {
            c.validate()?;
        }
        Ok(cfg)
    }
}

/// Server-wide defaults merged from `--config`, `--cache-config` and the environment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CacheDefaults {
    /// Adapter for requests that name none.
    pub adapter: Option<String>,
    /// Cache config fields for requests that leave them unset.
    pub cache_config: CacheConfigSpec,
    /// `model_class_name` for requests that name none.
    pub model_class_name: Option<String>,
    /// Stack CFG branches into one RunBlocks call when both compute (`--batch-cfg`).
    pub batch_cfg_branches: bool,
    /// Keep sessions' large tensors on the denoisers (`--resident-tensors`); off: every call
    /// carries everything (the stateless wire mode).
    pub resident_tensors: bool,
}

impl CacheDefaults {
    /// Merges the surfaces: `--cache-config` over the stage file's `cache_config`, and
    /// `--cache-adapter` / `DIFFUSION_CACHE_ADAPTER` over the stage file's `cache_adapter`.
    pub fn merge(
        stage: Option<&StageConfig>,
        cache_config_json: Option<&CacheConfigSpec>,
        env_adapter: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let env_adapter = env_adapter.filter(|a| !a.is_empty());
        if let Some(a) = env_adapter {
            check_adapter(a)?;
        }
        let stage_cfg = stage
            .and_then(|s| s.cache_config.clone())
            .unwrap_or_default();
        let cache_config = match cache_config_json {
            Some(j) => j.over(&stage_cfg),
            None => stage_cfg,
        };
        Ok(Self {
            adapter: env_adapter
                .map(str::to_string)
                .or_else(|| stage.and_then(|s| s.cache_adapter.clone())),
            cache_config,
            model_class_name: stage.and_then(|s| s.model_class_name.clone()),
            batch_cfg_branches: true,
            resident_tensors: true,
        })
    }
}

fn check_adapter(a: &str) -> Result<(), ConfigError> {
    if ADAPTERS.contains(&a) {
        Ok(())
    } else {
        Err(ConfigError(format!(
            "Unknown cache adapter '{}'. Supported: ['none', 'tea_cache', \
             'first_block_cache', 'mag_cache', 'taylor_seer']",
            teaserve_proto::quote(a)
        )))
    }
}

/// What caching a request gets.
#[derive(Debug, Clone, PartialEq)]
pub enum CachePlan {
    /// Every step computes.
    None,
    /// TeaCache with these settings.
    TeaCache {
        /// The model type whose coefficients are used.
        model_type: String,
        /// Resolved parameters.
        params: TeaCacheParams,
        /// CFG branches share one decision.
        shared_cfg_decision: bool,
    },
    /// diffusers' FirstBlockCache.
    FirstBlockCache(FirstBlockParams),
    /// diffusers' MagCache.
    MagCache(MagCacheParams),
    /// diffusers' TaylorSeer.
    TaylorSeer(TaylorSeerParams),
}

impl CachePlan {
    /// The `cache_adapter` name: `"none"`, `"tea_cache"`, `"first_block_cache"`, `"mag_cache"`.
    pub fn adapter(&self) -> &'static str {
        match self {
            CachePlan::None => "none",
            CachePlan::TeaCache { .. } => "tea_cache",
            CachePlan::FirstBlockCache(_) => "first_block_cache",
            CachePlan::MagCache(_) => "mag_cache",
            CachePlan::TaylorSeer(_) => "taylor_seer",
        }
    }

    /// The threshold in force (0 without caching).
    pub fn threshold(&self) -> f64 {
        match self {
            CachePlan::None => 0.0,
            CachePlan::TeaCache { params, .. } => params.rel_l1_thresh,
            CachePlan::FirstBlockCache(p) => p.threshold,
            CachePlan::MagCache(p) => p.threshold,
            CachePlan::TaylorSeer(_) => 0.0,
        }
    }
}

/// Resolves one request's cache plan. `model_class_name` is the request's (already defaulted
/// from the stage file by the caller if empty).
pub fn resolve(
    defaults: &CacheDefaults,
    request_adapter: &str,
    request_config: Option<&v1::CacheConfig>,
    model_class_name: &str,
) -> Result<CachePlan, ConfigError> {
    let adapter = if request_adapter.is_empty() {
        defaults.adapter.as_deref().unwrap_or("none")
    } else {
        request_adapter
    };
    check_adapter(adapter)?;
    let spec = request_config
        .map(CacheConfigSpec::from_proto)
        .unwrap_or_default()
        .over(&defaults.cache_config);
    spec.validate()?;
    match adapter {
        "none" => return Ok(CachePlan::None),
        "first_block_cache" => {
            return Ok(CachePlan::FirstBlockCache(FirstBlockParams {
                threshold: spec.threshold.unwrap_or(FIRST_BLOCK_THRESHOLD),
            }));
        }
        "mag_cache" => return mag_cache_plan(&spec, model_class_name),
        "taylor_seer" => {
            return Ok(CachePlan::TaylorSeer(TaylorSeerParams {
                cache_interval: spec.cache_interval.unwrap_or(5),
                disable_cache_before_step: spec.disable_cache_before_step.unwrap_or(3),
                disable_cache_after_step: spec.disable_cache_after_step,
                max_order: spec.max_order.unwrap_or(1),
                taylor_factors_dtype: spec
                    .taylor_factors_dtype
                    .as_deref()
                    .and_then(FactorDType::parse)
                    .unwrap_or(FactorDType::Bf16),
            }));
        }
        _ => {}
    }
    let model_type = match spec.model_type.as_deref() {
        Some(t) => t.to_string(),
        None if !model_class_name.is_empty() => model_class_name.to_string(),
        None => {
            return Err(ConfigError(
                "model_type must be provided in cache_config".into(),
            ));
        }
    };
    let model = models::lookup(&model_type).ok_or_else(|| {
        ConfigError(format!(
            "Unknown model type: '{}'. Supported: {}",
            teaserve_proto::quote(&model_type),
            supported_list()
        ))
    })?;
    let coefficients = match &spec.coefficients {
        Some(c) => c.as_slice().try_into().map_err(|_| {
            ConfigError(format!(
                "coefficients must be exactly 5 finite numbers (highest power first), got {c:?}"
            ))
        })?,
        None => model.coefficients,
    };
    Ok(CachePlan::TeaCache {
        model_type,
        params: TeaCacheParams {
            rel_l1_thresh: spec.rel_l1_thresh.unwrap_or(model.rel_l1_thresh),
            coefficients,
            warmup_steps: spec.warmup_steps.unwrap_or(0),
            cooldown_steps: spec.cooldown_steps.unwrap_or(0),
            max_consecutive_reuses: spec.max_consecutive_reuses,
        },
        shared_cfg_decision: spec.shared_cfg_decision.unwrap_or(false),
    })
}

/// MagCache's plan: the request's ratios, or the model's defaults.
fn mag_cache_plan(
    spec: &CacheConfigSpec,
    model_class_name: &str,
) -> Result<CachePlan, ConfigError> {
    let (threshold, max_skip_steps, retention_ratio) = MAG_DEFAULTS;
    let mag_ratios = match &spec.mag_ratios {
        Some(r) => r.clone(),
        None => models::lookup(model_class_name)
            .map(|m| m.mag_ratios.to_vec())
            .filter(|r| !r.is_empty())
            .ok_or_else(|| {
                ConfigError(format!(
                    "mag_cache needs mag_ratios for model '{}': it has no default ratios; run \
                     Calibrate on it and pass the result's mag_ratios in cache_config",
                    teaserve_proto::quote(model_class_name)
                ))
            })?,
    };
    Ok(CachePlan::MagCache(MagCacheParams {
        threshold: spec.threshold.unwrap_or(threshold),
        max_skip_steps: spec.max_skip_steps.unwrap_or(max_skip_steps),
        retention_ratio: spec.retention_ratio.unwrap_or(retention_ratio),
        mag_ratios,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::float_cmp, clippy::panic)]
mod tests {
    use super::*;

    fn cfg(thresh: Option<f64>, model_type: &str, coefficients: Vec<f64>) -> v1::CacheConfig {
        v1::CacheConfig {
            rel_l1_thresh: thresh,
            model_type: model_type.into(),
            coefficients,
            ..Default::default()
        }
    }

    fn err(r: Result<CachePlan, ConfigError>) -> String {
        r.unwrap_err().0
    }

    #[test]
    fn seed_errors_verbatim() {
        let d = CacheDefaults::default();
        assert_eq!(
            err(resolve(&d, "tea_cache", None, "")),
            "model_type must be provided in cache_config"
        );
        assert_eq!(
            err(resolve(
                &d,
                "tea_cache",
                Some(&cfg(None, "SD3Pipeline", vec![])),
                ""
            )),
            "Unknown model type: 'SD3Pipeline'. Supported: ['FluxPipeline', 'TinyFluxPipeline', 'QwenImagePipeline']"
        );
        assert_eq!(
            err(resolve(&d, "fb_cache", None, "FluxPipeline")),
            "Unknown cache adapter 'fb_cache'. Supported: ['none', 'tea_cache', 'first_block_cache', 'mag_cache', 'taylor_seer']"
        );
        assert!(
            err(resolve(
                &d,
                "tea_cache",
                Some(&cfg(Some(-0.1), "", vec![])),
                "FluxPipeline"
            ))
            .contains("rel_l1_thresh must be a finite number >= 0, got -0.1")
        );
        assert!(
            err(resolve(
                &d,
                "tea_cache",
                Some(&cfg(Some(f64::NAN), "", vec![])),
                "FluxPipeline"
            ))
            .contains("got NaN")
        );
        assert!(
            err(resolve(
                &d,
                "tea_cache",
                Some(&cfg(None, "", vec![1.0; 4])),
                "FluxPipeline"
            ))
            .contains("coefficients must be exactly 5 finite numbers")
        );
        let inf = vec![1.0, 1.0, f64::INFINITY, 1.0, 1.0];
        assert!(
            err(resolve(
                &d,
                "tea_cache",
                Some(&cfg(None, "", inf)),
                "FluxPipeline"
            ))
            .contains("exactly 5 finite")
        );
    }

    #[test]
    fn model_type_injected_from_model_class_name_with_defaults() {
        let plan = resolve(&CacheDefaults::default(), "tea_cache", None, "FluxPipeline").unwrap();
        let CachePlan::TeaCache {
            model_type,
            params,
            shared_cfg_decision,
        } = plan
        else {
            panic!("expected TeaCache")
        };
        assert_eq!(model_type, "FluxPipeline");
        assert_eq!(params.rel_l1_thresh, 0.2);
        assert_eq!(
            params.coefficients,
            models::lookup("FluxPipeline").unwrap().coefficients
        );
        assert!(!shared_cfg_decision);
        assert_eq!(params.max_consecutive_reuses, None);
    }

    #[test]
    fn default_adapter_is_none_and_env_stage_flag_request_precedence() {
        assert_eq!(
            resolve(&CacheDefaults::default(), "", None, "FluxPipeline").unwrap(),
            CachePlan::None
        );
        let env = CacheDefaults::merge(None, None, Some("tea_cache")).unwrap();
        assert_eq!(
            resolve(&env, "", None, "FluxPipeline").unwrap().adapter(),
            "tea_cache"
        );
        assert_eq!(
            resolve(&env, "none", None, "FluxPipeline").unwrap(),
            CachePlan::None
        );
        let stage = StageConfig {
            cache_adapter: Some("none".into()),
            cache_config: Some(CacheConfigSpec {
                rel_l1_thresh: Some(0.4),
                ..Default::default()
            }),
            ..Default::default()
        };
        let flag =
            CacheConfigSpec::from_json(r#"{"rel_l1_thresh": 0.6, "warmup_steps": 2}"#).unwrap();
        let d = CacheDefaults::merge(Some(&stage), Some(&flag), None).unwrap();
        assert_eq!(
            d.adapter.as_deref(),
            Some("none"),
            "stage file sets the adapter"
        );
        let d = CacheDefaults::merge(Some(&stage), Some(&flag), Some("tea_cache")).unwrap();
        assert_eq!(
            d.adapter.as_deref(),
            Some("tea_cache"),
            "env / flag beats the stage file"
        );
        let plan = resolve(&d, "tea_cache", None, "FluxPipeline").unwrap();
        assert_eq!(plan.threshold(), 0.6, "flag beats stage file");
        let plan = resolve(
            &d,
            "tea_cache",
            Some(&cfg(Some(0.8), "", vec![])),
            "FluxPipeline",
        )
        .unwrap();
        assert_eq!(plan.threshold(), 0.8, "request beats flag");
        let CachePlan::TeaCache { params, .. } = plan else {
            panic!()
        };
        assert_eq!(params.warmup_steps, 2, "unset request fields fall through");
    }

    #[test]
    fn bad_surfaces_fail_at_startup() {
        assert!(
            CacheConfigSpec::from_json(r#"{"rel_l1_thresh": -1}"#)
                .unwrap_err()
                .0
                .contains(">= 0")
        );
        assert!(
            CacheConfigSpec::from_json(r#"{"rel_l1_threshold": 0.2}"#)
                .unwrap_err()
                .0
                .contains("unknown field")
        );
        assert!(
            CacheDefaults::merge(None, None, Some("magcache"))
                .unwrap_err()
                .0
                .contains("Unknown cache adapter 'magcache'")
        );
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("stage.yaml");
        std::fs::write(
            &p,
            "model: acme/flux\nmodel_class_name: FluxPipeline\ncache_adapter: tea_cache\ncache_config:\n  rel_l1_thresh: 0.3\n  coefficients: [0, 0, 0, 1, 0]\n",
        )
        .unwrap();
        let stage = StageConfig::load(&p).unwrap();
        assert_eq!(stage.model_class_name.as_deref(), Some("FluxPipeline"));
        assert_eq!(
            stage.cache_config.unwrap().coefficients,
            Some(vec![0.0, 0.0, 0.0, 1.0, 0.0])
        );
        std::fs::write(&p, "cache_adapter: teacache\n").unwrap();
        assert!(
            StageConfig::load(&p)
                .unwrap_err()
                .0
                .contains("Unknown cache adapter 'teacache'")
        );
    }

    #[test]
    fn every_surface_configures_every_policy() {
        // Stage YAML: MagCache with its settings; the request only names the model.
        let stage = StageConfig::parse(
            "cache_adapter: mag_cache\ncache_config:\n  threshold: 0.1\n  max_skip_steps: 2\n  retention_ratio: 0.25\n  mag_ratios: [1.0, 0.9, 1.1]\n",
        )
        .unwrap();
        let d = CacheDefaults::merge(Some(&stage), None, None).unwrap();
        assert_eq!(
            resolve(&d, "", None, "QwenImagePipeline").unwrap(),
            CachePlan::MagCache(MagCacheParams {
                threshold: 0.1,
                max_skip_steps: 2,
                retention_ratio: 0.25,
                mag_ratios: vec![1.0, 0.9, 1.1],
            })
        );
        // --cache-config JSON and the environment's adapter: TaylorSeer.
        let json = CacheConfigSpec::from_json(
            r#"{"cache_interval": 3, "disable_cache_before_step": 2, "max_order": 2, "taylor_factors_dtype": "float32"}"#,
        )
        .unwrap();
        let d = CacheDefaults::merge(None, Some(&json), Some("taylor_seer")).unwrap();
        assert_eq!(
            resolve(&d, "", None, "FluxPipeline").unwrap(),
            CachePlan::TaylorSeer(TaylorSeerParams {
                cache_interval: 3,
                disable_cache_before_step: 2,
                disable_cache_after_step: None,
                max_order: 2,
                taylor_factors_dtype: FactorDType::F32,
            })
        );
        // The request wins: FirstBlockCache at its own threshold over the defaults.
        let req = v1::CacheConfig {
            threshold: Some(0.7),
            ..Default::default()
        };
        assert_eq!(
            resolve(&d, "first_block_cache", Some(&req), "FluxPipeline").unwrap(),
            CachePlan::FirstBlockCache(FirstBlockParams { threshold: 0.7 })
        );
        // Defaults: diffusers' (FLUX's MagCache ratios; TaylorSeer's bfloat16 factors).
        let plain = CacheDefaults::default();
        match resolve(&plain, "mag_cache", None, "FluxPipeline").unwrap() {
            CachePlan::MagCache(p) => {
                assert_eq!(
                    (p.threshold, p.max_skip_steps, p.retention_ratio),
                    (0.06, 3, 0.2)
                );
                assert_eq!(p.mag_ratios.len(), 28);
            }
            other => panic!("{other:?}"),
        }
        match resolve(&plain, "taylor_seer", None, "FluxPipeline").unwrap() {
            CachePlan::TaylorSeer(p) => {
                assert_eq!(
                    (p.cache_interval, p.disable_cache_before_step, p.max_order),
                    (5, 3, 1)
                );
                assert_eq!(p.taylor_factors_dtype, FactorDType::Bf16);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            resolve(&plain, "first_block_cache", None, "").unwrap(),
            CachePlan::FirstBlockCache(FirstBlockParams { threshold: 0.05 })
        );
        // Bad settings in the stage file fail at startup, naming the setting.
        assert!(
            StageConfig::parse("cache_adapter: taylor_seer\ncache_config:\n  cache_interval: 0\n")
                .unwrap_err()
                .0
                .contains("cache_interval must be >= 1")
        );
    }
}

/// Every cache configuration surface a client or operator writes (request fields, JSON,
/// stage YAML) gives a plan or a typed error for any input, never a panic, and its errors
/// quote client strings boundedly.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn number() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<f64>(),
            Just(f64::NAN),
            Just(f64::INFINITY),
            -2.0f64..2.0,
            Just(0.0)
        ]
    }

    fn word() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            Just("tea_cache".to_string()),
            Just("none".to_string()),
            Just("FluxPipeline".to_string()),
            Just("TinyFluxPipeline".to_string()),
            ".{0,400}",
        ]
    }

    fn request_config() -> impl Strategy<Value = Option<v1::CacheConfig>> {
        proptest::option::of(
            (
                proptest::option::of(number()),
                word(),
                proptest::collection::vec(number(), 0..7),
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<bool>()),
            )
                .prop_map(|(t, model_type, coefficients, w, c, m, shared)| {
                    v1::CacheConfig {
                        rel_l1_thresh: t,
                        model_type,
                        coefficients,
                        warmup_steps: w,
                        cooldown_steps: c,
                        max_consecutive_reuses: m,
                        shared_cfg_decision: shared,
                        ..Default::default()
                    }
                }),
        )
    }

    proptest! {
        #[test]
        fn any_request_gets_a_plan_or_a_bounded_error(
            adapter in word(),
            config in request_config(),
            model in word(),
        ) {
            let defaults = CacheDefaults::default();
            if let Err(e) = resolve(&defaults, &adapter, config.as_ref(), &model) {
                prop_assert!(e.to_string().len() < 1024, "{} bytes", e.to_string().len());
            }
        }

        #[test]
        fn any_json_or_yaml_text_parses_or_is_refused(text in ".{0,200}", key in word(), value in number()) {
            let _ = CacheConfigSpec::from_json(&text);
            let _ = StageConfig::parse(&text);
            let json = format!("{{\"{}\": {value}}}", key.replace(['"', '\\'], ""));
            let _ = CacheConfigSpec::from_json(&json);
            let yaml = format!("cache_config:\n  {}: {value}\ncache_adapter: {}\n", key.replace([':', '\n', '#'], ""), key.replace([':', '\n', '#'], ""));
            let _ = StageConfig::parse(&yaml);
        }
    }
}
