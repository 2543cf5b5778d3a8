//! The server-side gRPC layer of every teaserve service: continues the caller's trace from
//! `traceparent` in a server span named after the RPC, and records request counts and
//! latency per method and status.

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
}

impl ServerLayer {
    /// A layer recording into `metrics` (or only tracing when `None`).
    pub fn new(metrics: Option<RpcMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for ServerLayer {
    type Service = ServerService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ServerService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service produced by [`ServerLayer`].
#[derive(Clone)]
pub struct ServerService<S> {
    inner: S,
    metrics: Option<RpcMetrics>,
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
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = %method,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        let _ = span.set_parent(crate::propagation::extract(req.headers()));
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
