//! The server-side gRPC layer of every teaserve service: continues the caller's trace from
//! `traceparent` in a server span named after the RPC, and records request counts and
//! latency per method and status.
//!
//! Background calls are not traced by default, so that Kubernetes probes and the
//! controller's pool upkeep do not bury the useful traces: health checks and watches
//! (`grpc.health.v1`), server reflection, and `Describe` calls that arrive without a
//! `traceparent` (the controller's pool probing its denoisers; a Describe made inside a
//! generation carries the generation's trace and is traced). They are still counted in the
//! metrics. [`ServerLayer::trace_background`] turns their spans on.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tower::{Layer, Service};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::metrics::RpcMetrics;

/// Tower layer: server span with the remote parent, plus RPC metrics.
#[derive(Clone)]
pub struct ServerLayer {
    metrics: Option<RpcMetrics>,
    trace_background: bool,
}

impl ServerLayer {
    /// A layer recording into `metrics` (or only tracing when `None`); background calls
    /// (health, reflection, untraced Describe) get no span.
    pub fn new(metrics: Option<RpcMetrics>) -> Self {
        Self {
            metrics,
            trace_background: false,
        }
    }

    /// Whether background calls get server spans too (`--trace-background-calls`).
    pub fn trace_background(mut self, on: bool) -> Self {
        self.trace_background = on;
        self
    }
}

/// Whether a call to `method` (`package.Service/Method`) is background work: health checks,
/// reflection, or a `Describe` that is not part of a caller's trace.
pub fn is_background(method: &str, headers: &http::HeaderMap) -> bool {
    let service = method.split('/').next().unwrap_or_default();
    match service {
        "grpc.health.v1.Health"
        | "grpc.reflection.v1.ServerReflection"
        | "grpc.reflection.v1alpha.ServerReflection" => true,
        _ => method.ends_with("/Describe") && !headers.contains_key("traceparent"),
    }
}

impl<S> Layer<S> for ServerLayer {
    type Service = ServerService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ServerService {
            inner,
            metrics: self.metrics.clone(),
            trace_background: self.trace_background,
        }
    }
}

/// The service produced by [`ServerLayer`].
#[derive(Clone)]
pub struct ServerService<S> {
    inner: S,
    metrics: Option<RpcMetrics>,
    trace_background: bool,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for ServerService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let method = req.uri().path().trim_start_matches('/').to_string();
        let span = if !self.trace_background && is_background(&method, req.headers()) {
            tracing::Span::none()
        } else {
            let span = tracing::info_span!(
                "grpc.server",
                otel.name = %method,
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.method = %method,
                rpc.grpc.status_code = tracing::field::Empty,
            );
            let _ = span.set_parent(crate::propagation::extract(req.headers()));
            span
        };
        let fut = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        let metrics = self.metrics.clone();
        let started = Instant::now();
        Box::pin(
            async move {
                let resp = fut.await?;
                // Unary errors travel as trailers-only responses (status in the headers);
                // success and streamed outcomes are in trailers, reported as OK here.
                let code = resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .unwrap_or(0);
                tracing::Span::current().record("rpc.grpc.status_code", code);
                if let Some(m) = metrics {
                    m.observe(&method, tonic::Code::from_i32(code), started.elapsed());
                }
                Ok(resp)
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_calls_are_health_reflection_and_untraced_describe() {
        let none = http::HeaderMap::new();
        let mut traced = http::HeaderMap::new();
        traced.insert(
            "traceparent",
            http::HeaderValue::from_static(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        );
        for m in [
            "grpc.health.v1.Health/Check",
            "grpc.health.v1.Health/Watch",
            "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(is_background(m, &none), "{m}");
            assert!(is_background(m, &traced), "{m}");
        }
        assert!(is_background("teaserve.v1.Denoiser/Describe", &none));
        assert!(!is_background("teaserve.v1.Denoiser/Describe", &traced));
        assert!(!is_background("teaserve.v1.Denoiser/RunBlocks", &none));
        assert!(!is_background(
            "teaserve.v1.CacheController/Generate",
            &none
        ));
    }
}
