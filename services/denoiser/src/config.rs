//! Command-line flags (each with an environment variable) and turning them into a loader.

use std::net::SocketAddr;
use std::path::PathBuf;

use candle_core::{DType, Device};
use clap::{Parser, ValueEnum};
pub use teaserve_telemetry::LogFormat;

use crate::error::DenoiserError;
use crate::loader::{HubOptions, ModelFiles, resolve};
use crate::registry::{Component, LoadOptions, ModelAdapter, lookup};
use crate::server::{Limits, ServeOptions};

/// Fixes the threads per CPU tensor operation (`given`, else candle's default: the physical
/// cores) in `RAYON_NUM_THREADS`, where candle looks at every matrix product.
/// Unset, candle re-reads `/proc/cpuinfo` on each product (measured: 130 us of a 0.5 ms
/// Preprocess of the bench's synthetic FLUX); set, the lookup is an environment read and the
/// thread count is the same. Call it first thing in `main`, before any other thread starts.
#[allow(unsafe_code)]
pub fn pin_compute_threads(given: Option<usize>) {
    let n = given
        .filter(|n| *n > 0)
        .unwrap_or_else(candle_core::utils::get_num_threads);
    // SAFETY: called before any other thread exists (the caller's contract), so nothing reads
    // or writes the environment concurrently.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
}

/// Compute dtype of the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    /// 32-bit float (default; the CPU's fast path).
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16 (the usual GPU choice).
    Bf16,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

/// `denoiser`: serves one diffusion transformer over gRPC (teaserve.v1.Denoiser).
#[derive(Debug, Clone, Parser)]
#[command(name = "denoiser", version, about)]
pub struct Args {
    /// Model: a local diffusers folder (config.json + *.safetensors, or a pipeline folder with
    /// transformer/) or a Hugging Face Hub repo id such as black-forest-labs/FLUX.1-dev.
    /// Default: the embedded TinyFluxPipeline (a small text-to-image model compiled in).
    #[arg(long, env = "TEASERVE_MODEL")]
    pub model: Option<String>,
    /// Pipeline class name to serve it as (e.g. FluxPipeline); default: inferred from
    /// config.json's _class_name.
    #[arg(long, env = "TEASERVE_MODEL_CLASS_NAME")]
    pub model_class_name: Option<String>,
    /// Subfolder of the model holding the transformer; default: the root, or transformer/ for
    /// pipeline folders.
    #[arg(long, env = "TEASERVE_MODEL_SUBFOLDER")]
    pub subfolder: Option<String>,
    /// Hub revision (branch, tag or commit).
    #[arg(long, env = "TEASERVE_MODEL_REVISION")]
    pub revision: Option<String>,
    /// Compute device: cpu, cuda or cuda:N (cuda needs a build with --features cuda).
    #[arg(long, env = "TEASERVE_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Compute dtype of the weights.
    #[arg(long, env = "TEASERVE_DTYPE", value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// Address to listen on.
    #[arg(long, env = "TEASERVE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Largest gRPC message (and tensor) accepted or sent, in bytes.
    #[arg(long, env = "TEASERVE_MAX_MESSAGE_BYTES", default_value_t = 512 << 20)]
    pub max_message_bytes: usize,
    /// Largest batch per call.
    #[arg(long, env = "TEASERVE_MAX_BATCH", default_value_t = 16)]
    pub max_batch: usize,
    /// Largest number of tokens (image + text) per sample; bounds attention memory.
    #[arg(long, env = "TEASERVE_MAX_TOKENS", default_value_t = 16_896)]
    pub max_tokens: usize,
    /// Threads each CPU tensor operation may use (candle's matrix products and element-wise
    /// pools); default: the physical cores, candle's own default.
    #[arg(long, env = "RAYON_NUM_THREADS")]
    pub compute_threads: Option<usize>,
    /// Calls that may wait for the compute thread; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "TEASERVE_QUEUE_DEPTH", default_value_t = 64)]
    pub queue_depth: usize,
    /// Bytes of resident tensors (ResidentStep: conditioning, streams, indicators, residuals
    /// kept per session branch) this denoiser keeps; least recently used sessions are evicted
    /// past it (and rebuilt by the controller when used again). 0 turns resident mode off.
    #[arg(long, env = "TEASERVE_RESIDENT_BYTES", default_value_t = 4 << 30)]
    pub resident_bytes: u64,
    /// Seconds a session's resident tensors survive without a call.
    #[arg(long, env = "TEASERVE_RESIDENT_TTL_SECS", default_value_t = 600.0)]
    pub resident_ttl_secs: f64,
    /// Stack concurrent RunBlocks requests of different sessions into one batch when their
    /// shapes allow (results are split back; outputs equal unbatched ones).
    #[arg(long, env = "TEASERVE_CROSS_SESSION_BATCHING", default_value_t = true, action = clap::ArgAction::Set)]
    pub cross_session_batching: bool,
    /// Milliseconds a RunBlocks request waits for others to batch with. 0: batch only
    /// requests that queue while the compute thread is busy (no added latency).
    #[arg(long, env = "TEASERVE_BATCH_WINDOW_MS", default_value_t = 0.0, value_parser = parse_window)]
    pub batch_window_ms: f64,
    /// Seconds in-flight calls may take to finish after SIGTERM / Ctrl-C.
    #[arg(long, env = "TEASERVE_SHUTDOWN_GRACE_SECS", default_value_t = 10.0, value_parser = parse_grace)]
    pub shutdown_grace_secs: f64,
    /// Parts of a pipeline folder to load, comma-separated: transformer (Preprocess,
    /// RunBlocks, Postprocess), text_encoders (EncodePrompt), vae (Decode). Default: all, so
    /// one denoiser serves text mode; split them to put large encoders on other GPUs (the
    /// controller routes each call to a denoiser that has the part).
    #[arg(long, env = "TEASERVE_COMPONENTS", value_delimiter = ',', value_parser = Component::parse)]
    pub components: Vec<Component>,
    /// Hub access token for gated or private repos (default: the file $HF_HOME/token).
    #[arg(long, env = "HF_TOKEN", hide_env_values = true)]
    pub hf_token: Option<String>,
    /// Hugging Face home; the Hub cache is $HF_HOME/hub.
    #[arg(long, env = "HF_HOME")]
    pub hf_home: Option<PathBuf>,
    /// Use only files already in the Hub cache (1/true/yes/on).
    #[arg(long, env = "HF_HUB_OFFLINE", value_parser = parse_flag, default_value = "0",
          num_args = 0..=1, default_missing_value = "1")]
    pub hf_hub_offline: bool,
    /// Serve Prometheus metrics on http://ADDR/metrics (off when unset).
    #[arg(long, env = "TEASERVE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Give background calls server spans too: health checks and watches, reflection, and
    /// Describe calls outside a trace (off: they are only counted in the metrics).
    #[arg(long, env = "TEASERVE_TRACE_BACKGROUND_CALLS", default_value_t = false, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub trace_background_calls: bool,
    /// Log format (filter with RUST_LOG, default info).
    #[arg(long, env = "TEASERVE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// TLS, mutual TLS and bearer tokens.
    #[command(flatten)]
    pub security: teaserve_proto::security::ServerSecurityArgs,
}

/// Parses the truthy spellings environment flags use.
pub fn parse_flag(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "" | "0" | "false" | "no" | "off" => Ok(false),
        other => Err(format!(
            "'{other}' is not a boolean; use 1/0, true/false, yes/no, on/off"
        )),
    }
}

/// Parses a grace period in seconds: finite, 0 to 3600.
pub fn parse_grace(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "'{s}' is not a number of seconds between 0 and 3600"
        )),
    }
}

/// Parses `--batch-window-ms`: milliseconds between 0 and 1000.
pub fn parse_window(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=1000.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "'{s}' is not a number of milliseconds between 0 and 1000"
        )),
    }
}

/// Parses `cpu`, `cuda` or `cuda:N` into a candle device.
pub fn parse_device(s: &str) -> Result<Device, DenoiserError> {
    let bad = |why: String| DenoiserError::Config(format!("--device {s}: {why}"));
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => new_cuda(0).map_err(bad),
        _ => match s.strip_prefix("cuda:") {
            Some(n) => {
                let n: usize = n
                    .parse()
                    .map_err(|_| bad("expected cuda:N with N a GPU index".into()))?;
                new_cuda(n).map_err(bad)
            }
            None => Err(bad("accepted: cpu, cuda, cuda:N".into())),
        },
    }
}

fn new_cuda(n: usize) -> Result<Device, String> {
    if !candle_core::utils::cuda_is_available() {
        return Err("this denoiser was built without CUDA; rebuild with --features cuda".into());
    }
    Device::new_cuda(n).map_err(|e| e.to_string())
}

impl Args {
    /// Resolves the model's files (local or Hub) without loading them.
    pub fn model_files(&self) -> Result<ModelFiles, DenoiserError> {
        let hub = HubOptions {
            hf_home: self.hf_home.clone(),
            offline: self.hf_hub_offline,
            revision: self.revision.clone(),
            token: self.hf_token.clone(),
        };
        match &self.model {
            Some(model) => resolve(model, self.subfolder.as_deref(), &hub),
            None => crate::loader::embedded(),
        }
    }

    /// Server options derived from the flags.
    pub fn serve_options(&self, model_source: String) -> ServeOptions {
        ServeOptions {
            limits: Limits {
                max_message_bytes: self.max_message_bytes,
                max_batch: self.max_batch,
                max_tokens: self.max_tokens,
            },
            queue_depth: self.queue_depth,
            resident_bytes: self.resident_bytes,
            resident_ttl: std::time::Duration::from_secs_f64(self.resident_ttl_secs.max(0.0)),
            batch_window: self
                .cross_session_batching
                .then(|| std::time::Duration::from_secs_f64(self.batch_window_ms / 1e3)),
            model_source,
            shutdown_grace: std::time::Duration::from_secs_f64(self.shutdown_grace_secs),
            metrics_listen: self.metrics_listen,
            trace_background_calls: self.trace_background_calls,
            metrics: teaserve_telemetry::Metrics::new(),
            security: self.security.clone(),
        }
    }

    /// A loader for the compute thread: picks the registry entry and builds the model.
    pub fn loader(
        &self,
        files: ModelFiles,
    ) -> Result<
        impl FnOnce() -> Result<Box<dyn ModelAdapter>, DenoiserError> + Send + 'static,
        DenoiserError,
    > {
        let model_type = self
            .model_class_name
            .as_deref()
            .or(files.pipeline_hint.as_deref());
        let entry = lookup(model_type, files.class_name.as_deref())?;
        let opts = LoadOptions {
            device: parse_device(&self.device)?,
            dtype: self.dtype.into(),
            components: self.components.clone(),
        };
        Ok(move || (entry.load)(&files, &opts))
    }
}
