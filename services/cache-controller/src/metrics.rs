//! The controller's Prometheus metrics (registered next to the shared RPC metrics).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use teaserve_telemetry::Metrics;

/// Labels of the step counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    /// Model type of the session.
    pub model_type: String,
    /// `positive` or `negative`.
    pub branch: &'static str,
    /// `computed` or `reused`.
    pub decision: &'static str,
}

/// Labels of the tensor byte counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `to_denoiser` or `from_denoiser`.
    pub direction: &'static str,
}

/// Labels of the step-path counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    /// `wire`, `resident` (every kept tensor found) or `rebuild` (a miss, then a rebuild).
    pub path: &'static str,
}

/// Counters and gauges of the controller.
#[derive(Clone, Default)]
pub struct ControllerMetrics {
    steps: Family<StepLabels, Counter>,
    paths: Family<PathLabels, Counter>,
    active_sessions: Gauge,
    session_memory: Gauge,
    tensor_bytes: Family<DirectionLabels, Counter>,
}

impl ControllerMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Metrics) -> Self {
        let m = Self::default();
        registry.register(
            "controller_steps",
            "branch steps by model type, CFG branch and decision (computed: RunBlocks ran; reused: cached residual)",
            m.steps.clone(),
        );
        registry.register(
            "controller_step_paths",
            "steps by how their tensors travelled: wire (stateless), resident (kept on the \
             denoiser, found), rebuild (a denoiser lacked them and recomputed them)",
            m.paths.clone(),
        );
        registry.register(
            "controller_active_sessions",
            "live sessions",
            m.active_sessions.clone(),
        );
        registry.register(
            "controller_session_memory_bytes",
            "bytes held by all sessions (latents, inputs, cached residuals)",
            m.session_memory.clone(),
        );
        registry.register(
            "controller_tensor_bytes",
            "tensor payload bytes sent to and received from denoisers",
            m.tensor_bytes.clone(),
        );
        m
    }

    /// Counts one branch's step.
    pub fn step(&self, model_type: &str, branch: &'static str, computed: bool) {
        self.steps
            .get_or_create(&StepLabels {
                model_type: model_type.to_string(),
                branch,
                decision: if computed { "computed" } else { "reused" },
            })
            .inc();
    }

    /// Counts one step's path (`wire`, `resident`, `rebuild`).
    pub fn path(&self, path: &'static str) {
        self.paths.get_or_create(&PathLabels { path }).inc();
    }

    /// Counts tensor traffic with the denoisers.
    pub fn tensors(&self, direction: &'static str, bytes: u64) {
        self.tensor_bytes
            .get_or_create(&DirectionLabels { direction })
            .inc_by(bytes);
    }

    /// Publishes the session gauges.
    pub fn sessions(&self, count: usize, memory_bytes: u64) {
        self.active_sessions
            .set(i64::try_from(count).unwrap_or(i64::MAX));
        self.session_memory
            .set(i64::try_from(memory_bytes).unwrap_or(i64::MAX));
    }
}
