//! Finding a model's files: a local diffusers folder or a Hugging Face Hub repo id, with the
//! transformer's `config.json` and its `*.safetensors` weights (sharded via
//! `*.safetensors.index.json` too). Pipeline folders (with `model_index.json`) resolve to
//! their `transformer/` subfolder.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_nn::VarBuilder;

use crate::error::DenoiserError;
use crate::registry::LoadOptions;

/// Where the Hub cache lives and whether the network may be used.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// `HF_HOME`; the cache is `$HF_HOME/hub` (default `~/.cache/huggingface/hub`).
    pub hf_home: Option<PathBuf>,
    /// `HF_HUB_OFFLINE`: only files already in the cache are used.
    pub offline: bool,
    /// Branch, tag or commit; default `main`.
    pub revision: Option<String>,
    /// `HF_TOKEN`: the Hub access token for gated or private repos; unset: the token file
    /// `$HF_HOME/token`, if any.
    pub token: Option<String>,
}

/// The resolved files of one transformer checkpoint.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// Path of `config.json`.
    pub config_path: PathBuf,
    /// Its contents.
    pub config_json: String,
    /// Its `_class_name`, if any.
    pub class_name: Option<String>,
    /// Weight files, in shard order.
    pub weights: Vec<PathBuf>,
    /// Where the files came from, for logs and Describe.
    pub source: String,
    /// Weights compiled into the binary (the embedded model) instead of `weights` files.
    pub embedded: Option<&'static [u8]>,
    /// `teaserve.pipeline` from config.json: the model type to serve it as by default.
    pub pipeline_hint: Option<String>,
    /// The whole pipeline folder (text encoders, tokenizers, VAE, scheduler) when the model
    /// was given as one (it has `model_index.json`); `None` for a bare transformer.
    pub pipeline: Option<PipelineSource>,
}

/// Where a diffusers pipeline's component files come from: a local folder or a Hub repo.
#[derive(Debug, Clone)]
pub enum PipelineSource {
    /// A local folder holding `model_index.json`.
    Local(PathBuf),
    /// A Hub repo holding `model_index.json` (fetched through the Hub cache).
    Hub {
        /// `owner/name`.
        repo_id: String,
        /// Cache, token, revision and offline mode.
        hub: HubOptions,
    },
}

impl PipelineSource {
    /// The local path of `rel` (e.g. `tokenizer/vocab.json`), downloading it from the Hub
    /// first when needed.
    pub fn file(&self, rel: &str) -> Result<PathBuf, DenoiserError> {
        match self {
            Self::Local(root) => {
                let p = root.join(rel);
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(load_err(format!("{} not found", p.display())))
                }
            }
            Self::Hub { repo_id, hub } => hub_fetcher(repo_id, hub)?(rel),
        }
    }

    /// Whether `rel` exists (for optional files).
    pub fn has(&self, rel: &str) -> bool {
        self.file(rel).is_ok()
    }

    /// The safetensors weights of component `sub` (single file or sharded index).
    pub fn weights(&self, sub: &str) -> Result<Vec<PathBuf>, DenoiserError> {
        let sub = sub.trim_end_matches('/');
        if let Some(index) = INDEX_NAMES
            .iter()
            .find_map(|n| self.file(&format!("{sub}/{n}")).ok())
        {
            return shards(&index, |f| self.file(&format!("{sub}/{f}")));
        }
        SINGLE_NAMES
            .iter()
            .find_map(|n| self.file(&format!("{sub}/{n}")).ok())
            .map(|w| vec![w])
            .ok_or_else(|| {
                load_err(format!(
                    "{}: no {sub}/ weights: looked for {} (or a sharded {})",
                    self.describe(),
                    SINGLE_NAMES.join(" / "),
                    INDEX_NAMES.join(" / ")
                ))
            })
    }

    /// Reads a JSON file of the pipeline.
    pub fn json(&self, rel: &str) -> Result<serde_json::Value, DenoiserError> {
        let path = self.file(rel)?;
        let text = std::fs::read_to_string(&path)
            .map_err(|e| load_err(format!("reading {}: {e}", path.display())))?;
        serde_json::from_str(&text).map_err(|e| {
            DenoiserError::Config(format!("{} is not valid JSON: {e}", path.display()))
        })
    }

    /// The folder or `hf://` repo, for messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Local(root) => root.display().to_string(),
            Self::Hub { repo_id, .. } => format!("hf://{repo_id}"),
        }
    }
}

/// config.json of the embedded model (`models/tiny-flux`, trained by `tools/train`).
const EMBEDDED_CONFIG: &str = include_str!("../../../models/tiny-flux/config.json");
/// Weights of the embedded model, compiled in so the denoiser runs with no files at all.
const EMBEDDED_WEIGHTS: &[u8] = include_bytes!("../../../models/tiny-flux/model.safetensors");

/// The embedded default model (`TinyFluxPipeline`).
pub fn embedded() -> Result<ModelFiles, DenoiserError> {
    let value: serde_json::Value = serde_json::from_str(EMBEDDED_CONFIG)
        .map_err(|e| DenoiserError::Config(format!("embedded config.json: {e}")))?;
    Ok(ModelFiles {
        config_path: PathBuf::from("<embedded>/config.json"),
        config_json: EMBEDDED_CONFIG.to_string(),
        class_name: value["_class_name"].as_str().map(str::to_string),
        weights: Vec::new(),
        source: "embedded:tiny-flux".into(),
        embedded: Some(EMBEDDED_WEIGHTS),
        pipeline_hint: value["teaserve"]["pipeline"].as_str().map(str::to_string),
        pipeline: None,
    })
}

const INDEX_NAMES: [&str; 2] = [
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
];
const SINGLE_NAMES: [&str; 2] = ["diffusion_pytorch_model.safetensors", "model.safetensors"];

fn load_err(msg: impl Into<String>) -> DenoiserError {
    DenoiserError::Load(msg.into())
}

/// Resolves `model` (a local directory or a Hub repo id) to its transformer files.
pub fn resolve(
    model: &str,
    subfolder: Option<&str>,
    hub: &HubOptions,
) -> Result<ModelFiles, DenoiserError> {
    let path = Path::new(model);
    if path.exists() {
        return resolve_local(path, subfolder);
    }
    if model.starts_with('.') || model.starts_with('/') || model.split('/').count() != 2 {
        return Err(load_err(format!(
            "'{model}' is neither an existing directory nor a Hub repo id of the form \
             'owner/name'"
        )));
    }
    resolve_hub(model, subfolder, hub).map_err(|e| {
        load_err(format!(
            "'{model}' is not a local folder (no such path) and not a usable Hub repo: {e}"
        ))
    })
}

fn resolve_local(path: &Path, subfolder: Option<&str>) -> Result<ModelFiles, DenoiserError> {
    if !path.is_dir() {
        return Err(load_err(format!(
            "{} is not a directory; pass the folder holding config.json and *.safetensors",
            path.display()
        )));
    }
    let is_pipeline = path.join("model_index.json").is_file();
    let dir = match subfolder {
        Some(s) => path.join(s),
        None if is_pipeline => path.join("transformer"),
        None => path.to_path_buf(),
    };
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(load_err(format!("{} not found", config_path.display())));
    }
    let index = INDEX_NAMES
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file());
    let weights = match index {
        Some(index) => shards(&index, |f| Ok(dir.join(f)))?,
        None => SINGLE_NAMES
            .iter()
            .map(|n| dir.join(n))
            .filter(|p| p.is_file())
            .take(1)
            .collect(),
    };
    if weights.is_empty() {
        return Err(load_err(format!(
            "no transformer weights in {}: looked for {} (or a sharded {}); other \
             *.safetensors files there are not loaded",
            dir.display(),
            SINGLE_NAMES.join(" / "),
            INDEX_NAMES.join(" / "),
        )));
    }
    let mut f = files(config_path, weights, dir.display().to_string())?;
    f.pipeline = is_pipeline.then(|| PipelineSource::Local(path.to_path_buf()));
    Ok(f)
}

fn files(
    config_path: PathBuf,
    weights: Vec<PathBuf>,
    source: String,
) -> Result<ModelFiles, DenoiserError> {
    let config_json = std::fs::read_to_string(&config_path)
        .map_err(|e| load_err(format!("reading {}: {e}", config_path.display())))?;
    let value: serde_json::Value = serde_json::from_str(&config_json).map_err(|e| {
        DenoiserError::Config(format!("{} is not valid JSON: {e}", config_path.display()))
    })?;
    let class_name = value
        .get("_class_name")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let pipeline_hint = value["teaserve"]["pipeline"].as_str().map(str::to_string);
    for w in &weights {
        if !w.is_file() {
            return Err(load_err(format!("weight file {} not found", w.display())));
        }
    }
    Ok(ModelFiles {
        config_path,
        config_json,
        class_name,
        weights,
        source,
        embedded: None,
        pipeline_hint,
        pipeline: None,
    })
}

/// Reads a sharded checkpoint index and maps its shard names through `fetch`.
fn shards(
    index: &Path,
    mut fetch: impl FnMut(&str) -> Result<PathBuf, DenoiserError>,
) -> Result<Vec<PathBuf>, DenoiserError> {
    let text = std::fs::read_to_string(index)
        .map_err(|e| load_err(format!("reading {}: {e}", index.display())))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| load_err(format!("{} is not valid JSON: {e}", index.display())))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| load_err(format!("{} has no weight_map", index.display())))?;
    let names: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    names.into_iter().map(&mut fetch).collect()
}

fn resolve_hub(
    repo_id: &str,
    subfolder: Option<&str>,
    hub: &HubOptions,
) -> Result<ModelFiles, DenoiserError> {
    let fetch = hub_fetcher(repo_id, hub)?;
    let prefixes: Vec<String> = match subfolder {
        Some(s) => vec![format!("{}/", s.trim_end_matches('/'))],
        None => vec![String::new(), "transformer/".to_string()],
    };
    let mut last_err = None;
    for prefix in &prefixes {
        let config_path = match fetch(&format!("{prefix}config.json")) {
            Ok(p) => p,
            Err(e) => {
                last_err = Some(e);
                continue;
            }
        };
        // A pipeline's root config.json does not exist (model_index.json does); a
        // transformer's does. Accept the first config that names weights we can fetch.
        let index = INDEX_NAMES
            .iter()
            .find_map(|n| fetch(&format!("{prefix}{n}")).ok());
        let weights = match index {
            Some(index) => shards(&index, |f| fetch(&format!("{prefix}{f}")))?,
            None => match SINGLE_NAMES
                .iter()
                .find_map(|n| fetch(&format!("{prefix}{n}")).ok())
            {
                Some(w) => vec![w],
                None => {
                    last_err = Some(load_err(format!(
                        "{repo_id}: no {prefix}*.safetensors weights found"
                    )));
                    continue;
                }
            },
        };
        let mut f = files(config_path, weights, format!("hf://{repo_id}/{prefix}"))?;
        f.pipeline = fetch("model_index.json").ok().map(|_| PipelineSource::Hub {
            repo_id: repo_id.to_string(),
            hub: hub.clone(),
        });
        return Ok(f);
    }
    Err(last_err.unwrap_or_else(|| load_err(format!("{repo_id}: no config.json found"))))
}

/// A function fetching `repo_id`'s files into the Hub cache (or, offline, finding them
/// there) and returning their local paths.
fn hub_fetcher(
    repo_id: &str,
    hub: &HubOptions,
) -> Result<impl Fn(&str) -> Result<PathBuf, DenoiserError>, DenoiserError> {
    let cache = match &hub.hf_home {
        Some(home) => hf_hub::Cache::new(home.join("hub")),
        None => hf_hub::Cache::from_env(),
    };
    let revision = hub.revision.clone().unwrap_or_else(|| "main".to_string());
    let repo = hf_hub::Repo::with_revision(repo_id.to_string(), hf_hub::RepoType::Model, revision);
    let api = if hub.offline {
        None
    } else {
        Some(
            hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
                .with_progress(false)
                .with_token(hub.token.clone().or_else(|| cache.token()))
                .build()
                .map_err(|e| load_err(format!("Hub client: {e}")))?,
        )
    };
    let repo_id = repo_id.to_string();
    Ok(move |name: &str| -> Result<PathBuf, DenoiserError> {
        match &api {
            Some(api) => api
                .repo(repo.clone())
                .get(name)
                .map_err(|e| load_err(format!("{repo_id}/{name}: {e}"))),
            None => cache.repo(repo.clone()).get(name).ok_or_else(|| {
                load_err(format!(
                    "{repo_id}/{name} is not in the Hub cache at {} and HF_HUB_OFFLINE is set; \
                     download it first or unset HF_HUB_OFFLINE",
                    cache.path().display()
                ))
            }),
        }
    })
}

/// Parses `config.json` into a model's config type and runs its consistency check; errors
/// name the file.
pub fn parse_config<C: serde::de::DeserializeOwned>(
    files: &ModelFiles,
    validate: impl FnOnce(&C) -> Result<(), String>,
) -> Result<C, DenoiserError> {
    let at = |e: String| DenoiserError::Config(format!("{}: {e}", files.config_path.display()));
    let config: C = serde_json::from_str(&files.config_json).map_err(|e| at(e.to_string()))?;
    validate(&config).map_err(at)?;
    Ok(config)
}

/// Memory-maps the weights (or reads the embedded ones) into a candle `VarBuilder` at
/// `opts.dtype` on `opts.device`.
#[allow(unsafe_code)]
pub fn var_builder(
    files: &ModelFiles,
    opts: &LoadOptions,
) -> Result<VarBuilder<'static>, DenoiserError> {
    if let Some(bytes) = files.embedded {
        return VarBuilder::from_buffered_safetensors(bytes.to_vec(), opts.dtype, &opts.device)
            .map_err(|e| load_err(format!("reading the embedded weights: {e}")));
    }
    // SAFETY: the weight files are mapped read-only for the life of the process; like every
    // mmap-based loader we rely on nobody truncating them while the denoiser runs.
    unsafe { VarBuilder::from_mmaped_safetensors(&files.weights, opts.dtype, &opts.device) }
        .map_err(|e| load_err(format!("reading weights {:?}: {e}", files.weights)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn write(p: &Path, s: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    }

    #[test]
    fn local_single_sharded_and_pipeline_layouts() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(
            &d.join("single/config.json"),
            r#"{"_class_name":"FluxTransformer2DModel"}"#,
        );
        write(&d.join("single/diffusion_pytorch_model.safetensors"), "");
        let f = resolve(
            d.join("single").to_str().unwrap(),
            None,
            &HubOptions::default(),
        )
        .unwrap();
        assert_eq!(f.class_name.as_deref(), Some("FluxTransformer2DModel"));
        assert_eq!(f.weights.len(), 1);

        write(&d.join("pipe/model_index.json"), "{}");
        write(&d.join("pipe/transformer/config.json"), "{}");
        write(
            &d.join("pipe/transformer/diffusion_pytorch_model.safetensors.index.json"),
            r#"{"weight_map":{"a":"s-2.safetensors","b":"s-1.safetensors","c":"s-1.safetensors"}}"#,
        );
        write(&d.join("pipe/transformer/s-1.safetensors"), "");
        write(&d.join("pipe/transformer/s-2.safetensors"), "");
        let f = resolve(
            d.join("pipe").to_str().unwrap(),
            None,
            &HubOptions::default(),
        )
        .unwrap();
        let names: Vec<_> = f
            .weights
            .iter()
            .map(|p| p.file_name().unwrap().to_owned())
            .collect();
        assert_eq!(names, vec!["s-1.safetensors", "s-2.safetensors"]);
        assert_eq!(f.class_name, None);

        write(&d.join("empty/config.json"), "{}");
        let err = resolve(
            d.join("empty").to_str().unwrap(),
            None,
            &HubOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no transformer weights"), "{err}");
        // Other safetensors beside the config (e.g. recorded stages) are never loaded.
        write(&d.join("stray/config.json"), "{}");
        write(&d.join("stray/stages.safetensors"), "");
        let err = resolve(
            d.join("stray").to_str().unwrap(),
            None,
            &HubOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no transformer weights"), "{err}");
        let err = resolve("not/a/repo/id", None, &HubOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("neither an existing directory"), "{err}");
    }

    #[test]
    fn offline_hub_cache_is_used_without_network() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("hub/models--acme--tiny-flux");
        write(&repo.join("refs/main"), "abc123");
        let snap = repo.join("snapshots/abc123/transformer");
        write(
            &snap.join("config.json"),
            r#"{"_class_name":"FluxTransformer2DModel"}"#,
        );
        write(&snap.join("diffusion_pytorch_model.safetensors"), "");
        let hub = HubOptions {
            hf_home: Some(tmp.path().to_path_buf()),
            offline: true,
            revision: None,
            token: None,
        };
        let f = resolve("acme/tiny-flux", None, &hub).unwrap();
        assert_eq!(f.source, "hf://acme/tiny-flux/transformer/");
        assert!(f.weights[0].ends_with("transformer/diffusion_pytorch_model.safetensors"));

        assert!(
            f.pipeline.is_none(),
            "no model_index.json: a bare transformer"
        );
        // With model_index.json the repo is a pipeline: its other components resolve
        // through the same cache.
        write(&repo.join("snapshots/abc123/model_index.json"), "{}");
        write(&repo.join("snapshots/abc123/tokenizer/vocab.json"), "{}");
        write(&repo.join("snapshots/abc123/vae/config.json"), "{}");
        write(
            &repo.join("snapshots/abc123/vae/diffusion_pytorch_model.safetensors"),
            "",
        );
        let f = resolve("acme/tiny-flux", None, &hub).unwrap();
        let pipeline = f.pipeline.expect("a pipeline");
        assert_eq!(pipeline.describe(), "hf://acme/tiny-flux");
        assert!(
            pipeline
                .file("tokenizer/vocab.json")
                .unwrap()
                .ends_with("tokenizer/vocab.json")
        );
        assert_eq!(pipeline.weights("vae").unwrap().len(), 1);
        let err = pipeline
            .file("tokenizer/merges.txt")
            .unwrap_err()
            .to_string();
        assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
        let err = resolve("acme/missing", None, &hub).unwrap_err().to_string();
        assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
        assert!(err.contains("not a local folder"), "{err}");
    }

    #[test]
    fn a_config_missing_a_key_that_sizes_the_network_names_it() {
        let files = |json: &str| ModelFiles {
            config_path: PathBuf::from("m/config.json"),
            config_json: json.to_string(),
            class_name: None,
            weights: Vec::new(),
            source: "test".into(),
            embedded: None,
            pipeline_hint: None,
            pipeline: None,
        };
        let mut config: serde_json::Value = serde_json::from_str(EMBEDDED_CONFIG).unwrap();
        let full = config.to_string();
        parse_config::<crate::models::flux::Config>(&files(&full), |_| Ok(())).unwrap();
        config.as_object_mut().unwrap().remove("num_layers");
        let err =
            parse_config::<crate::models::flux::Config>(&files(&config.to_string()), |_| Ok(()))
                .unwrap_err()
                .to_string();
        assert!(err.contains("m/config.json"), "{err}");
        assert!(err.contains("missing field `num_layers`"), "{err}");
        // Flags keep diffusers' defaults (the embedded config has no out_channels).
        let c = parse_config::<crate::models::flux::Config>(&files(&full), |_| Ok(())).unwrap();
        assert_eq!(c.out_channels, None);
    }
}
