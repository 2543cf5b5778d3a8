//! Command-line flags of the `cache-controller` binary (each with an environment variable).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
pub use teaserve_telemetry::LogFormat;

use crate::cache_config::{CacheConfigSpec, CacheDefaults, ConfigError, StageConfig};
use crate::pool::PoolOptions;
use crate::server::ServeOptions;
use crate::session::SessionLimits;

/// `cache-controller`: owns generation sessions and TeaCache state, drives the denoisers.
#[derive(Debug, Clone, Parser)]
#[command(name = "cache-controller", version, about)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "TEASERVE_LISTEN", default_value = "127.0.0.1:50050")]
    pub listen: SocketAddr,
    /// Denoiser endpoint: http://host:port, or dns:///name:port for every address a DNS name
    /// resolves to, re-resolved every --dns-refresh-secs (a Kubernetes headless Service).
    /// Repeat the flag, or comma-separate in the environment variable.
    #[arg(
        long = "denoiser",
        env = "TEASERVE_DENOISERS",
        value_delimiter = ',',
        required = true
    )]
    pub denoisers: Vec<String>,
    /// Stage config YAML: model, model_class_name, cache_adapter, cache_config.
    #[arg(long, env = "TEASERVE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Default cache adapter for requests that name none: none or tea_cache.
    #[arg(long, env = "DIFFUSION_CACHE_ADAPTER")]
    pub cache_adapter: Option<String>,
    /// Default cache config as JSON, e.g. '{"rel_l1_thresh": 0.4}'.
    #[arg(long, env = "TEASERVE_CACHE_CONFIG")]
    pub cache_config: Option<String>,
    /// Stack both CFG branches into one RunBlocks call when both compute and shapes allow.
    #[arg(long, env = "TEASERVE_BATCH_CFG", default_value_t = true, action = clap::ArgAction::Set)]
    pub batch_cfg: bool,
    /// Resident mode: each session's large tensors (conditioning, streams, the previous
    /// modulated input, residuals) stay on the denoiser that computed them; per step only the
    /// latents, the policy's signals and the predictions travel (one call per step with
    /// caching off, two with caching on), and a replica that lacks them is asked to rebuild
    /// them from inputs this controller keeps. `false`: the stateless wire mode, every call
    /// carries everything and denoisers keep nothing between calls.
    #[arg(long, env = "TEASERVE_RESIDENT_TENSORS", default_value_t = true, action = clap::ArgAction::Set)]
    pub resident_tensors: bool,
    /// Seconds one denoiser call may take before it is abandoned and retried elsewhere.
    #[arg(long, env = "TEASERVE_DENOISER_TIMEOUT_SECS", default_value_t = 120.0)]
    pub denoiser_timeout_secs: f64,
    /// Attempts per denoiser call, each on a replica not tried yet (1 disables retries).
    #[arg(long, env = "TEASERVE_RETRY_ATTEMPTS", default_value_t = 3)]
    pub retry_attempts: usize,
    /// Milliseconds before the first retry (doubling per further retry).
    #[arg(long, env = "TEASERVE_RETRY_BACKOFF_MS", default_value_t = 25)]
    pub retry_backoff_ms: u64,
    /// Seconds between re-resolutions of dns:/// denoiser targets.
    #[arg(long, env = "TEASERVE_DNS_REFRESH_SECS", default_value_t = 5.0)]
    pub dns_refresh_secs: f64,
    /// Seconds between HTTP/2 keepalive pings to denoisers (a dead peer is noticed within
    /// this plus --keepalive-timeout-secs).
    #[arg(long, env = "TEASERVE_KEEPALIVE_SECS", default_value_t = 10.0)]
    pub keepalive_secs: f64,
    /// Seconds a keepalive ping may go unanswered before the connection is dropped.
    #[arg(long, env = "TEASERVE_KEEPALIVE_TIMEOUT_SECS", default_value_t = 5.0)]
    pub keepalive_timeout_secs: f64,
    /// Most sessions at once (Generate calls included); more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "TEASERVE_MAX_SESSIONS", default_value_t = 64)]
    pub max_sessions: usize,
    /// Most bytes all sessions may hold together (latents, inputs, cached residuals).
    #[arg(long, env = "TEASERVE_MAX_SESSION_MEMORY_BYTES", default_value_t = 8 << 30)]
    pub max_session_memory_bytes: u64,
    /// Idle sessions are dropped after this many seconds.
    #[arg(long, env = "TEASERVE_SESSION_TTL_SECS", default_value_t = 600)]
    pub session_ttl_secs: u64,
    /// Largest gRPC message accepted or sent, in bytes (to clients and to denoisers).
    #[arg(long, env = "TEASERVE_MAX_MESSAGE_BYTES", default_value_t = 512 << 20)]
    pub max_message_bytes: usize,
    /// Seconds in-flight calls may take to finish after SIGTERM / Ctrl-C.
    #[arg(long, env = "TEASERVE_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,
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
    /// TLS, mutual TLS and bearer tokens of the controller's public API.
    #[command(flatten)]
    pub security: teaserve_proto::security::ServerSecurityArgs,
    /// TLS, client certificate and token towards the denoisers.
    #[command(flatten)]
    pub denoiser_security: teaserve_proto::security::DenoiserClientSecurityArgs,
}

impl Args {
    /// Reads `--config` and `--cache-config` and merges every configuration surface.
    pub fn serve_options(&self) -> Result<ServeOptions, ConfigError> {
        let stage = self.config.as_deref().map(StageConfig::load).transpose()?;
        let json = self
            .cache_config
            .as_deref()
            .map(CacheConfigSpec::from_json)
            .transpose()?;
        let mut defaults =
            CacheDefaults::merge(stage.as_ref(), json.as_ref(), self.cache_adapter.as_deref())?;
        defaults.batch_cfg_branches = self.batch_cfg;
        defaults.resident_tensors = self.resident_tensors;
        for url in &self.denoisers {
            let ok = url.starts_with("dns:")
                || ((url.starts_with("http://") || url.starts_with("https://"))
                    && tonic::transport::Endpoint::from_shared(url.clone()).is_ok());
            if !ok {
                return Err(ConfigError(format!(
                    "--denoiser {url}: expected a URL such as http://127.0.0.1:50051 or \
                     dns:///denoiser.default.svc.cluster.local:50051"
                )));
            }
        }
        let secs = |flag: &str, v: f64| {
            if v.is_finite() && v > 0.0 && v < 1e7 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(ConfigError(format!(
                    "--{flag} must be a positive number of seconds, got {v}"
                )))
            }
        };
        if self.retry_attempts == 0 {
            return Err(ConfigError(
                "--retry-attempts must be at least 1 (1 disables retries)".into(),
            ));
        }
        let pool = PoolOptions {
            max_message_bytes: self.max_message_bytes,
            call_timeout: secs("denoiser-timeout-secs", self.denoiser_timeout_secs)?,
            max_attempts: self.retry_attempts,
            retry_backoff: Duration::from_millis(self.retry_backoff_ms),
            resolve_every: secs("dns-refresh-secs", self.dns_refresh_secs)?,
            keepalive_interval: secs("keepalive-secs", self.keepalive_secs)?,
            keepalive_timeout: secs("keepalive-timeout-secs", self.keepalive_timeout_secs)?,
            security: self
                .denoiser_security
                .resolve()
                .map_err(|e| ConfigError(e.to_string()))?,
            ..PoolOptions::default()
        };
        // Fail at start-up, not at the first call, on unusable TLS or token settings.
        self.security
            .tls()
            .and_then(|_| self.security.tokens())
            .map_err(|e| ConfigError(e.to_string()))?;
        if self.max_sessions == 0 {
            return Err(ConfigError("--max-sessions must be at least 1".into()));
        }
        Ok(ServeOptions {
            denoisers: self.denoisers.clone(),
            defaults,
            limits: SessionLimits {
                max_sessions: self.max_sessions,
                max_memory_bytes: self.max_session_memory_bytes,
                ttl: Duration::from_secs(self.session_ttl_secs.max(1)),
            },
            max_message_bytes: self.max_message_bytes,
            pool,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            metrics_listen: self.metrics_listen,
            trace_background_calls: self.trace_background_calls,
            metrics: teaserve_telemetry::Metrics::new(),
            security: self.security.clone(),
        })
    }
}
