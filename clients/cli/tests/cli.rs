//! The `teaserve` binary against a real controller + denoiser pair on loopback, with the
//! README's invocation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use teaserve_tests::{Fixture, TestController, TestDenoiser, fixtures_dir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_and_models_against_a_running_pair() {
    let fx = Fixture::load("flux-tiny");
    let denoiser = TestDenoiser::start(&["--model", fx.dir.to_str().unwrap()]).await;
    let controller = TestController::start(&["--denoiser", &denoiser.url()]).await;
    let url = format!("http://{}", controller.addr);
    let out_dir = tempfile::tempdir().unwrap();
    let out_path = out_dir.path().join("latents.safetensors");
    let stages = fixtures_dir().join("flux-tiny/stages.safetensors");

    let cmd = {
        let (url, out_path, stages) = (url.clone(), out_path.clone(), stages.clone());
        move || {
            Command::new(env!("CARGO_BIN_EXE_teaserve"))
                .args([
                    "--controller",
                    &url,
                    "generate",
                    "--model-class-name",
                    "FluxPipeline",
                ])
                .args([
                    "--inputs",
                    stages.to_str().unwrap(),
                    "--inputs-prefix",
                    "in.",
                ])
                .args(["--skip", "timestep,latents_unpacked", "--steps", "12"])
                .args(["--cache-adapter", "tea_cache", "--rel-l1-thresh", "0.6"])
                .args(["--output", out_path.to_str().unwrap()])
                .output()
                .unwrap()
        }
    };
    let out = tokio::task::spawn_blocking(cmd).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("computed steps 5 of 12"), "{stdout}");
    assert!(stdout.contains("reused steps   7"), "{stdout}");
    let latents = candle_core::safetensors::load(&out_path, &candle_core::Device::Cpu).unwrap();
    assert_eq!(latents["latents"].dims(), &[1, 64, 64]);

    let models = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_teaserve"))
            .args(["--controller", &url, "models"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&models.stdout);
    assert!(models.status.success());
    let flux = stdout
        .lines()
        .find(|l| l.starts_with("FluxPipeline"))
        .unwrap();
    assert!(flux.contains(&denoiser.url()), "{stdout}");
    assert!(stdout.contains("QwenImagePipeline"), "{stdout}");
}

#[test]
fn unreachable_controller_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_teaserve"))
        .args(["--controller", "http://127.0.0.1:1", "models"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("connecting to the controller"));
}
