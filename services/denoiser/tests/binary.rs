//! The real `denoiser` binary: starts from flags, reports its address, serves health and
//! Describe over TCP, and exits cleanly on SIGTERM; bad flags fail fast with a clear message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use teaserve_proto::v1::denoiser_client::DenoiserClient;
use tonic_health::pb::health_check_response::ServingStatus;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn denoiser() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_denoiser"));
    cmd.env_remove("RUST_LOG").env("NO_COLOR", "1");
    cmd
}

#[tokio::test]
async fn binary_serves_and_stops_on_sigterm() {
    let mut child = denoiser()
        .args([
            "--model",
            fixture("flux-tiny").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--log-format", "json", "--shutdown-grace-secs", "60"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .stderr(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The JSON log line "denoiser listening" carries the bound address.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("denoiser exited before listening")
            .unwrap();
        if line.contains("denoiser listening") {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            let a = v["fields"]["addr"].as_str().unwrap().to_string();
            break a
                .trim_start_matches("Some(")
                .trim_end_matches(')')
                .to_string();
        }
    };
    // Keep draining logs so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});

    let url = format!("http://{addr}");
    let channel = tonic::transport::Channel::from_shared(url).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let channel = loop {
        match channel.connect().await {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => panic!("cannot connect: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    loop {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "teaserve.v1.Denoiser".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if status == ServingStatus::Serving as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "never became SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let info = DenoiserClient::new(channel)
        .describe(teaserve_proto::v1::DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.model_type, "FluxPipeline");
    assert!(
        info.model_source.ends_with("flux-tiny"),
        "{}",
        info.model_source
    );

    // A health watch, as the controller keeps one: it must hear NOT_SERVING at once and must
    // not hold the process open for the grace (60 s).
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: "teaserve.v1.Denoiser".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    // The channel stays open across the signal: shutdown must not wait on an idle client.
    let pid = child.id().to_string();
    let signalled = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("no health update after SIGTERM");
    assert_eq!(
        next.unwrap().unwrap().status,
        ServingStatus::NotServing as i32,
        "SIGTERM must report NOT_SERVING on the watch"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "denoiser did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status after SIGTERM: {status}");
    eprintln!(
        "idle denoiser with a health watch open exited {:?} after SIGTERM (grace 60 s)",
        signalled.elapsed()
    );
}

#[test]
fn bad_flags_fail_fast_with_a_clear_message() {
    let out = denoiser()
        .args(["--model", "/definitely/not/here"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("neither an existing directory nor a Hub repo id"),
        "{err}"
    );

    let out = denoiser()
        .args(["--model", fixture("flux-tiny").to_str().unwrap()])
        .args(["--model-class-name", "NopePipeline"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "Unknown model type: 'NopePipeline'. Supported: ['FluxPipeline', 'TinyFluxPipeline', 'QwenImagePipeline']"
        ),
        "{err}"
    );

    let out = denoiser()
        .args([
            "--model",
            fixture("flux-tiny").to_str().unwrap(),
            "--device",
            "cuda:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--device cuda:0"), "{err}");
}
