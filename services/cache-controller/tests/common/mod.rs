//! What the tracing tests share: an in-process OTLP trace collector, the spans it received,
//! the real controller binary started with OTLP export, and `/metrics` readers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// An OTLP trace collector: what was exported to it.
#[derive(Clone, Default)]
pub struct Collector(pub Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// One received span, flattened.
#[derive(Debug, Clone)]
pub struct Span {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub id: Vec<u8>,
    pub parent: Vec<u8>,
    pub attrs: HashMap<String, Value>,
}

impl Span {
    pub fn str(&self, k: &str) -> Option<&str> {
        match self.attrs.get(k)? {
            Value::StringValue(s) => Some(s),
            _ => None,
        }
    }
    pub fn f64(&self, k: &str) -> Option<f64> {
        match self.attrs.get(k)? {
            Value::DoubleValue(v) => Some(*v),
            Value::IntValue(v) => Some(*v as f64),
            _ => None,
        }
    }
    pub fn bool(&self, k: &str) -> Option<bool> {
        match self.attrs.get(k)? {
            Value::BoolValue(v) => Some(*v),
            _ => None,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn spans(c: &Collector) -> Vec<Span> {
    let mut out = Vec::new();
    for req in c.0.lock().unwrap().iter() {
        for rs in &req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| kv.value.as_ref()?.value.clone())
                .map(|v| match v {
                    Value::StringValue(s) => s,
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    out.push(Span {
                        service: service.clone(),
                        name: s.name.clone(),
                        trace_id: hex(&s.trace_id),
                        id: s.span_id.clone(),
                        parent: s.parent_span_id.clone(),
                        attrs: s
                            .attributes
                            .iter()
                            .filter_map(|kv| {
                                Some((kv.key.clone(), kv.value.as_ref()?.value.clone()?))
                            })
                            .collect(),
                    });
                }
            }
        }
    }
    out
}

pub async fn http_get(addr: &str, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}

/// Sums the samples of a counter whose labels contain every `label="value"` given.
pub fn counter(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Serves a collector on loopback; returns it and its OTLP endpoint URL.
pub async fn start_collector() -> (Collector, String) {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (collector, otlp)
}

/// The real controller binary exporting to `otlp`, with `/metrics`; returns the child and
/// its gRPC and metrics addresses.
pub fn start_controller(denoiser: &str, otlp: &str, extra: &[&str]) -> (Child, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cache-controller"))
        .args(["--listen", "127.0.0.1:0", "--denoiser", denoiser])
        .args(["--metrics-listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--shutdown-grace-secs", "1"])
        .args(extra)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
        .env("OTEL_SERVICE_NAME", "cache-controller")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut grpc, mut metrics) = (None, None);
    while grpc.is_none() || metrics.is_none() {
        let line = lines.next().expect("controller exited early").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        let addr = v["fields"]["addr"].as_str().map(|a| {
            a.trim_start_matches("Some(")
                .trim_end_matches(')')
                .to_string()
        });
        match v["fields"]["message"].as_str() {
            Some("cache-controller listening") => grpc = addr,
            Some("metrics listening on /metrics") => metrics = addr,
            _ => {}
        }
    }
    std::thread::spawn(move || for _ in lines {});
    (child, grpc.unwrap(), metrics.unwrap())
}

/// Stops the controller with SIGTERM (its exporter flushes on shutdown) and waits up to 20 s
/// for it to exit.
pub async fn stop_controller(child: &mut Child) {
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "controller did not exit"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Telemetry for this process, which plays the denoiser: it exports to `otlp` through the same
/// telemetry code the binaries use.
pub fn init_denoiser_telemetry(otlp: &str) -> teaserve_telemetry::Telemetry {
    teaserve_telemetry::init(
        teaserve_telemetry::LogFormat::Text,
        &teaserve_telemetry::OtelConfig {
            endpoint: Some(otlp.to_string()),
            service_name: "denoiser".into(),
        },
    )
    .unwrap()
}

/// Runs `req` on the controller at `grpc` inside the client trace `trace_id` (a W3C
/// `traceparent`); returns its step events and result.
pub async fn generate_in_trace(
    grpc: &str,
    req: teaserve_proto::v1::GenerateRequest,
    trace_id: &str,
) -> (
    Vec<teaserve_proto::v1::StepEvent>,
    teaserve_proto::v1::GenerateResult,
) {
    use teaserve_proto::v1::cache_controller_client::CacheControllerClient;
    use teaserve_proto::v1::generate_event::Event;
    use tokio_stream::StreamExt as _;
    let mut request = tonic::Request::new(req);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    let mut c = CacheControllerClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let mut stream = c.generate(request).await.unwrap().into_inner();
    let (mut events, mut result) = (Vec::new(), None);
    while let Some(ev) = stream.next().await {
        match ev.unwrap().event.unwrap() {
            Event::Step(s) => events.push(s),
            Event::Result(r) => result = Some(r),
        }
    }
    (events, result.unwrap())
}

/// Every span the collector holds once `ready` accepts them; `ready` says what is still
/// missing, and after 20 s that is the failure.
pub async fn wait_for_spans(
    collector: &Collector,
    ready: impl Fn(&[Span]) -> Result<(), String>,
) -> Vec<Span> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let all = spans(collector);
        match ready(&all) {
            Ok(()) => return all,
            Err(missing) => assert!(
                std::time::Instant::now() < deadline,
                "spans never arrived: {missing}"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
