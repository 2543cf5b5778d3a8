//! Hostile and mistaken input against both services, while another session generates on the
//! same controller and denoiser (so on the same controller-to-denoiser connection): every bad
//! call gets a clear, bounded error and the other generation is bit-identical to a run
//! without them. Also: unknown model types, unusable schedules, a controller started right
//! after its denoiser, the session gauges, a full queue on one replica.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::time::Duration;

use candle_core::{Device, Tensor};
use teaserve_proto::encode_tensor;
use teaserve_proto::v1::{self, DType};
use teaserve_tests::{
    RecordingProxy, TestController, TestDenoiser, decode, generate_run, max_abs_diff,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;

const PROMPT: &str = "a red circle on a blue background";
/// Every status message of these tests fits in this many bytes.
const MAX_MESSAGE: usize = 1024;

fn text_request(steps: u32) -> v1::GenerateRequest {
    v1::GenerateRequest {
        model_class_name: "TinyFluxPipeline".into(),
        prompt: PROMPT.into(),
        seed: 7,
        num_inference_steps: steps,
        cache_adapter: "none".into(),
        ..Default::default()
    }
}

fn assert_bounded(what: &str, status: &tonic::Status, code: Code) {
    eprintln!(
        "{what:<40} {:?} ({} bytes): {}",
        status.code(),
        status.message().len(),
        status.message().chars().take(160).collect::<String>()
    );
    assert_eq!(status.code(), code, "{what}: {}", status.message());
    assert!(
        status.message().len() < MAX_MESSAGE,
        "{what}: {} bytes",
        status.message().len()
    );
}

/// Model-native inputs of the embedded model for PROMPT, from its own EncodePrompt.
async fn native_inputs(d: &TestDenoiser) -> HashMap<String, v1::Tensor> {
    let resp = d
        .client()
        .await
        .encode_prompt(v1::EncodePromptRequest {
            prompts: vec![PROMPT.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let shape: Vec<usize> = resp.latent_shape.iter().map(|&d| d as usize).collect();
    let noise = Tensor::zeros(shape.as_slice(), candle_core::DType::F32, &Device::Cpu).unwrap();
    let mut inputs = resp.inputs;
    inputs.insert(
        "hidden_states".into(),
        encode_tensor(&noise, DType::F32).unwrap(),
    );
    inputs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_calls_get_bounded_errors_and_another_session_is_untouched() {
    let d = TestDenoiser::start(&[]).await;
    let ctl = TestController::start(&["--denoiser", &d.url()]).await;
    let mut c = ctl.client().await;
    let clean = generate_run(&mut c, text_request(40)).await.unwrap();
    let clean = decode(clean.result.latents.as_ref().unwrap());

    // The same generation again, while the hostile calls run.
    let mut other = ctl.client().await;
    let running = tokio::spawn(async move { generate_run(&mut other, text_request(40)).await });

    let mega = "x".repeat(1 << 20);
    let long_id = "s".repeat(10 << 10);
    let mut req = text_request(4);
    req.prompt = mega.clone();
    let err = generate_run(&mut c, req).await.err().unwrap();
    assert_bounded("Generate: 1 MB prompt", &err, Code::InvalidArgument);
    assert!(
        err.message().contains("(1048576 bytes)"),
        "{}",
        err.message()
    );

    let mut req = text_request(4);
    req.model_class_name = mega.clone();
    let err = generate_run(&mut c, req).await.err().unwrap();
    assert_bounded(
        "Generate: 1 MB model_class_name",
        &err,
        Code::InvalidArgument,
    );
    assert!(err.message().starts_with("Unknown model type: 'xxx"));

    let mut req = text_request(4);
    req.cache_adapter = mega.clone();
    let err = generate_run(&mut c, req).await.err().unwrap();
    assert_bounded("Generate: 1 MB cache_adapter", &err, Code::InvalidArgument);

    // A tensor with a 1 MB name reaches the denoiser (the controller forwards model-native
    // inputs it does not interpret), whose error comes back over the shared connection.
    let mut inputs = native_inputs(&d).await;
    let small = encode_tensor(
        &Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap(),
        DType::F32,
    )
    .unwrap();
    inputs.insert(mega.clone(), small);
    let req = v1::GenerateRequest {
        model_class_name: "TinyFluxPipeline".into(),
        num_inference_steps: 4,
        cache_adapter: "none".into(),
        inputs,
        ..Default::default()
    };
    let err = generate_run(&mut c, req).await.err().unwrap();
    assert_bounded(
        "Generate: tensor with a 1 MB name",
        &err,
        Code::InvalidArgument,
    );

    for (what, status) in [
        (
            "Step: 10 KB session id",
            c.step(v1::StepRequest {
                session_id: long_id.clone(),
                ..Default::default()
            })
            .await
            .err()
            .unwrap(),
        ),
        (
            "ResetSession: 10 KB session id",
            c.reset_session(v1::ResetSessionRequest {
                session_id: long_id.clone(),
                ..Default::default()
            })
            .await
            .err()
            .unwrap(),
        ),
        (
            "CloseSession: 10 KB session id",
            c.close_session(v1::CloseSessionRequest {
                session_id: long_id.clone(),
            })
            .await
            .err()
            .unwrap(),
        ),
    ] {
        assert_bounded(what, &status, Code::NotFound);
        assert!(
            status.message().contains("(10240 bytes)"),
            "{}",
            status.message()
        );
    }

    // Straight at the denoiser too.
    let mut dc = d.client().await;
    let err = dc
        .encode_prompt(v1::EncodePromptRequest {
            prompts: vec![mega.clone()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bounded("EncodePrompt: 1 MB prompt", &err, Code::InvalidArgument);
    let err = dc
        .preprocess(v1::PreprocessRequest {
            inputs: HashMap::from([(
                mega.clone(),
                encode_tensor(
                    &Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap(),
                    DType::F32,
                )
                .unwrap(),
            )]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bounded(
        "Preprocess: tensor with a 1 MB name",
        &err,
        Code::InvalidArgument,
    );

    let run = running.await.unwrap().unwrap();
    let got = decode(run.result.latents.as_ref().unwrap());
    assert_eq!(max_abs_diff(&got, &clean), 0.0, "the other session changed");
    assert_eq!(run.steps.len(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_types_and_unusable_schedules_are_the_callers_mistake() {
    let d = TestDenoiser::start(&[]).await;
    let ctl = TestController::start(&["--denoiser", &d.url()]).await;
    let mut c = ctl.client().await;
    let supported = "Supported: ['FluxPipeline', 'TinyFluxPipeline', 'QwenImagePipeline']";
    let mut req = text_request(4);
    req.model_class_name = "NoSuchPipeline".into();
    let err = generate_run(&mut c, req).await.err().unwrap();
    assert_bounded("Generate: unknown model type", &err, Code::InvalidArgument);
    assert_eq!(
        err.message(),
        format!("Unknown model type: 'NoSuchPipeline'. {supported}")
    );
    let err = c
        .calibrate(v1::CalibrateRequest {
            model_class_name: "NoSuchPipeline".into(),
            prompts: vec![PROMPT.into()],
            ..Default::default()
        })
        .await
        .err()
        .unwrap();
    assert_bounded("Calibrate: unknown model type", &err, Code::InvalidArgument);
    assert!(err.message().contains(supported), "{}", err.message());
    // A known type nobody serves is an outage, not a mistake.
    let mut req = text_request(4);
    req.model_class_name = "QwenImagePipeline".into();
    req.prompt.clear();
    req.seed = 0;
    req.inputs = HashMap::from([(
        "hidden_states".to_string(),
        encode_tensor(
            &Tensor::zeros((1, 4, 64), candle_core::DType::F32, &Device::Cpu).unwrap(),
            DType::F32,
        )
        .unwrap(),
    )]);
    let err = generate_run(&mut c, req).await.err().unwrap();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());

    let mut req = text_request(0);
    req.sigmas = vec![1.0, 0.5, 0.75, 0.25];
    let err = generate_run(&mut c, req).await.err().unwrap();
    assert_bounded("Generate: increasing sigmas", &err, Code::InvalidArgument);
    assert!(
        err.message().contains("non-increasing"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("sigmas[2] = 0.75 > sigmas[1] = 0.5"));
    // Equal neighbours are allowed (diffusers' schedules can repeat a value).
    let mut req = text_request(0);
    req.sigmas = vec![1.0, 0.5, 0.5, 0.25];
    generate_run(&mut c, req).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_started_right_after_its_denoiser_never_refuses_work() {
    let d = TestDenoiser::start(&[]).await;
    for i in 0..12 {
        let ctl = TestController::start(&["--denoiser", &d.url()]).await;
        let mut c = ctl.client().await;
        let run = generate_run(&mut c, text_request(2)).await;
        assert!(run.is_ok(), "round {i}: {:?}", run.err());
        // And with no model named: the only type served is found just as fast.
        let ctl = TestController::start(&["--denoiser", &d.url()]).await;
        let mut c = ctl.client().await;
        let mut req = text_request(2);
        req.model_class_name.clear();
        let run = generate_run(&mut c, req).await;
        assert!(run.is_ok(), "round {i} (default model): {:?}", run.err());
    }
}

async fn http_get(addr: &str, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_gauges_return_to_zero_when_no_session_is_live() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let d = TestDenoiser::start(&[]).await;
    let ctl = TestController::start(&["--denoiser", &d.url(), "--metrics-listen", &metrics]).await;
    let mut c = ctl.client().await;
    // A Generate, and an explicit session that is stepped and closed.
    generate_run(&mut c, text_request(3)).await.unwrap();
    let session = c
        .create_session(v1::CreateSessionRequest {
            request: Some(text_request(2)),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let live = http_get(&metrics, "/metrics").await;
    assert_eq!(gauge(&live, "teaserve_controller_active_sessions"), 1.0);
    assert!(gauge(&live, "teaserve_controller_session_memory_bytes") > 0.0);
    c.step(v1::StepRequest {
        session_id: session.session_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.close_session(v1::CloseSessionRequest {
        session_id: session.session_id,
    })
    .await
    .unwrap();
    // Generate's session goes when its stream ends; give the drop a moment.
    let mut text = String::new();
    for _ in 0..50 {
        text = http_get(&metrics, "/metrics").await;
        if gauge(&text, "teaserve_controller_active_sessions") == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gauge(&text, "teaserve_controller_active_sessions"), 0.0);
    assert_eq!(
        gauge(&text, "teaserve_controller_session_memory_bytes"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_on_one_replica_sends_the_call_to_another() {
    let healthy = TestDenoiser::start(&[]).await;
    let behind = TestDenoiser::start(&[]).await;
    let (full_url, full) = RecordingProxy::start(&behind).await;
    full.queue_full_run_blocks
        .store(usize::MAX, std::sync::atomic::Ordering::SeqCst);
    let reference = TestController::start(&["--denoiser", &healthy.url()]).await;
    let want = generate_run(&mut reference.client().await, text_request(20))
        .await
        .unwrap();
    // Wire mode: every step's calls are balanced anew (resident mode would stay on the
    // replica that holds the session once the full one refused).
    let ctl = TestController::start(&[
        "--denoiser",
        &full_url,
        "--denoiser",
        &healthy.url(),
        "--resident-tensors",
        "false",
    ])
    .await;
    let run = generate_run(&mut ctl.client().await, text_request(20))
        .await
        .unwrap();
    let (a, b) = (
        decode(want.result.latents.as_ref().unwrap()),
        decode(run.result.latents.as_ref().unwrap()),
    );
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let refused = full.log.lock().unwrap().queue_full_refusals;
    eprintln!("RunBlocks refused as queue-full by one replica: {refused} of 20 steps");
    // Not ejected: a full queue is overload, not a fault, so the replica is asked again.
    assert!(refused >= 2, "the full replica was asked {refused} times");

    // With only the full replica: UNAVAILABLE saying so.
    let only = TestController::start(&["--denoiser", &full_url]).await;
    let err = generate_run(&mut only.client().await, text_request(2))
        .await
        .err()
        .unwrap();
    assert_bounded(
        "Generate: every replica's queue full",
        &err,
        Code::Unavailable,
    );
    assert!(err.message().contains("queue full"), "{}", err.message());
}

/// Health of `service` on the controller at `addr`.
async fn controller_health(addr: std::net::SocketAddr, service: &str) -> i32 {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_reports_whether_it_can_reach_a_denoiser() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let name = teaserve_controller::server::DENOISERS_HEALTH;
    let d = TestDenoiser::start(&[]).await;
    let up = TestController::start(&["--denoiser", &d.url()]).await;
    let down = TestController::start(&["--denoiser", "http://127.0.0.1:9"]).await;
    let mut seen = (0, 0);
    for _ in 0..100 {
        seen = (
            controller_health(up.addr, name).await,
            controller_health(down.addr, name).await,
        );
        if seen
            == (
                ServingStatus::Serving as i32,
                ServingStatus::NotServing as i32,
            )
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        seen,
        (
            ServingStatus::Serving as i32,
            ServingStatus::NotServing as i32
        )
    );
    // The controller itself accepts calls either way.
    for ctl in [&up, &down] {
        assert_eq!(
            controller_health(ctl.addr, "teaserve.v1.CacheController").await,
            ServingStatus::Serving as i32
        );
    }
}
