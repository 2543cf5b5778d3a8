//! Observability shared by teaserve's services: logs (`tracing` with `RUST_LOG`, text or
//! JSON), OpenTelemetry traces exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is
//! set, W3C `traceparent` carried in gRPC metadata, and Prometheus metrics on `/metrics`.

pub mod layer;
pub mod metrics;
pub mod propagation;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

pub use layer::ServerLayer;
pub use metrics::{Metrics, serve_metrics};

/// Log line format of the services (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where traces go.
#[derive(Debug, Clone, PartialEq)]
pub struct OtelConfig {
    /// OTLP/gRPC collector, e.g. `http://localhost:4317`; `None` disables export.
    pub endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
}

impl OtelConfig {
    /// From the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` and `OTEL_SERVICE_NAME`
    /// (default `default_service`). The sampler follows `OTEL_TRACES_SAMPLER` /
    /// `OTEL_TRACES_SAMPLER_ARG`, read by the SDK itself.
    pub fn from_env(default_service: &str) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        Self {
            endpoint: var("OTEL_EXPORTER_OTLP_ENDPOINT"),
            service_name: var("OTEL_SERVICE_NAME").unwrap_or_else(|| default_service.to_string()),
        }
    }
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built.
    #[error("OTLP exporter for {endpoint}: {message}")]
    Exporter {
        /// The endpoint.
        endpoint: String,
        /// What failed.
        message: String,
    },
    /// A global subscriber was already installed.
    #[error("logging is already initialised: {0}")]
    AlreadyInit(String),
}

/// Keeps the trace pipeline alive; [`Telemetry::shutdown`] flushes it.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Installs the global subscriber: `RUST_LOG` filter (default `info`), text or JSON lines on
/// stdout, and, when `otel.endpoint` is set, an OpenTelemetry layer with a batch OTLP/gRPC
/// exporter and the W3C trace-context propagator. Call inside a tokio runtime.
pub fn init(format: LogFormat, otel: &OtelConfig) -> Result<Telemetry, TelemetryError> {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = match format {
        // Colours only on a terminal: piped or collected logs stay plain text.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .with_filter(filter())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_filter(filter())
            .boxed(),
    };
    let provider = match &otel.endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .with_timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| TelemetryError::Exporter {
                    endpoint: endpoint.clone(),
                    message: e.to_string(),
                })?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        Resource::builder()
                            .with_service_name(otel.service_name.clone())
                            .build(),
                    )
                    .build(),
            )
        }
        None => None,
    };
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let otel_layer = provider.as_ref().map(|p| {
        // Every span is exported (the `info` filter of the logs does not apply here), but
        // the SDK's sampler (OTEL_TRACES_SAMPLER) still decides.
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("teaserve"))
            .with_filter(EnvFilter::new("info"))
    });
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel_layer)
        .try_init()
        .map_err(|e| TelemetryError::AlreadyInit(e.to_string()))?;
    if let Some(endpoint) = &otel.endpoint {
        tracing::info!(%endpoint, service = %otel.service_name, "exporting traces over OTLP/gRPC");
    }
    Ok(Telemetry { provider })
}

impl Telemetry {
    /// Flushes buffered spans to the collector (blocking work runs off the async threads).
    pub async fn flush(&self) {
        if let Some(p) = self.provider.clone() {
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = p.force_flush() {
                    tracing::warn!(error = %e, "flushing traces failed");
                }
            })
            .await;
        }
    }

    /// Flushes and stops the exporter.
    pub async fn shutdown(self) {
        if let Some(p) = self.provider {
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = p.shutdown() {
                    tracing::warn!(error = %e, "shutting down the trace exporter failed");
                }
            })
            .await;
        }
    }
}

/// The current span's trace id as 32 hex digits, or empty when it is not traced.
pub fn current_trace_id() -> String {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let cx = tracing::Span::current().context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        sc.trace_id().to_string()
    } else {
        String::new()
    }
}
