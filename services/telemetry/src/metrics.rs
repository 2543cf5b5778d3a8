//! Prometheus metrics: a registry each service adds its own metrics to, the RPC metrics every
//! service shares, and the `/metrics` HTTP endpoint.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of per-RPC metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// `package.Service/Method`.
    pub method: String,
    /// gRPC status code name, e.g. `Ok`, `InvalidArgument`.
    pub status: String,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~2 min.
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

/// Request count and latency per method and status.
#[derive(Clone)]
pub struct RpcMetrics {
    requests: Family<RpcLabels, Counter>,
    latency: Family<RpcLabels, Histogram, fn() -> Histogram>,
}

impl RpcMetrics {
    /// Records one finished call.
    pub fn observe(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        let labels = RpcLabels {
            method: method.to_string(),
            status: format!("{code:?}"),
        };
        self.requests.get_or_create(&labels).inc();
        self.latency
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }
}

/// A service's metric registry (prefix `teaserve`).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    /// The shared per-RPC metrics.
    pub rpc: RpcMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with the RPC metrics registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("teaserve");
        let rpc = RpcMetrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
        };
        registry.register(
            "grpc_server_requests",
            "gRPC calls served, by method and status",
            rpc.requests.clone(),
        );
        registry.register(
            "grpc_server_latency_seconds",
            "gRPC call latency until the response headers, by method and status",
            rpc.latency.clone(),
        );
        Self {
            registry: Arc::new(Mutex::new(registry)),
            rpc,
        }
    }

    /// Adds a service-specific metric.
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        if let Ok(mut r) = self.registry.lock() {
            r.register(name, help, metric);
        }
    }

    /// The registry in the Prometheus / OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock()
            && let Err(e) = prometheus_client::encoding::text::encode(&mut out, &r)
        {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// Serves `GET /metrics` on `addr` until `shutdown`; returns the bound address once listening.
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "metrics server failed");
        }
    });
    tracing::info!(addr = %bound, "metrics listening on /metrics");
    Ok(bound)
}
