//! The real `cache-controller` binary: starts from flags, serves health, reflection-backed
//! ListModels and ListSessions, exits cleanly on SIGTERM; bad configuration fails fast.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use teaserve_proto::v1::cache_controller_client::CacheControllerClient;
use teaserve_proto::v1::{ListModelsRequest, ListSessionsRequest};

fn controller() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cache-controller"));
    cmd.env_remove("RUST_LOG")
        .env_remove("DIFFUSION_CACHE_ADAPTER")
        .env("NO_COLOR", "1");
    cmd
}

#[tokio::test]
async fn binary_serves_and_stops_on_sigterm() {
    let mut child = controller()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--denoiser",
            "http://127.0.0.1:9",
        ])
        .args(["--log-format", "json", "--shutdown-grace-secs", "60"])
        .args(["--cache-config", r#"{"rel_l1_thresh": 0.4}"#])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("exited before listening").unwrap();
        if line.contains("cache-controller listening") {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            let a = v["fields"]["addr"].as_str().unwrap().to_string();
            break a
                .trim_start_matches("Some(")
                .trim_end_matches(')')
                .to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "teaserve.v1.CacheController".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let mut c = CacheControllerClient::new(channel);
    let models = c
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert!(
        models
            .iter()
            .any(|m| m.model_type == "FluxPipeline" && m.endpoints.is_empty())
    );
    assert!(
        c.list_sessions(ListSessionsRequest {})
            .await
            .unwrap()
            .into_inner()
            .sessions
            .is_empty()
    );

    // A health watch (a load balancer's) hears NOT_SERVING at once and does not hold the
    // process open for the grace (60 s).
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: "teaserve.v1.CacheController".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(
        first.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
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
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    eprintln!(
        "idle controller with a health watch open exited {:?} after SIGTERM (grace 60 s)",
        signalled.elapsed()
    );
}

#[test]
fn diffusion_cache_adapter_env_is_the_default_adapter_flag() {
    let out = controller()
        .env("DIFFUSION_CACHE_ADAPTER", "magcache")
        .args([
            "--listen",
            "127.0.0.1:0",
            "--denoiser",
            "http://127.0.0.1:9",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Unknown cache adapter 'magcache'. Supported: ['none', 'tea_cache', 'first_block_cache', 'mag_cache', 'taylor_seer']"),
        "{err}"
    );
}

#[test]
fn bad_configuration_fails_fast() {
    for (args, needle) in [
        (
            vec![
                "--denoiser",
                "http://127.0.0.1:9",
                "--cache-config",
                r#"{"rel_l1_thresh": -1}"#,
            ],
            "rel_l1_thresh must be a finite number >= 0",
        ),
        (
            vec![
                "--denoiser",
                "http://127.0.0.1:9",
                "--cache-adapter",
                "magcache",
            ],
            "Unknown cache adapter 'magcache'. Supported: ['none', 'tea_cache', 'first_block_cache', 'mag_cache', 'taylor_seer']",
        ),
        (
            vec!["--denoiser", "127.0.0.1:50051"],
            "--denoiser 127.0.0.1:50051: expected a URL such as http://127.0.0.1:50051",
        ),
        (vec![], "--denoiser"),
    ] {
        let out = controller()
            .args(["--listen", "127.0.0.1:0"])
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
