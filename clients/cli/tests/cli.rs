//! The `teaserve` binary against a real controller + denoiser pair on loopback, with the
//! README's invocations, and its error, output and Ctrl-C behaviour as a user sees it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use teaserve_proto::v1;
use teaserve_tests::{Fixture, TestController, TestDenoiser, fixtures_dir};

/// Runs the `teaserve` binary with `args` (off the async runtime) and returns its output.
async fn teaserve(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_teaserve"))
            .args(&args)
            .env_remove("TEASERVE_CONTROLLER")
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The number after `label` on its line of `stdout`, e.g. `reused steps   7`.
fn number_after(stdout: &str, label: &str) -> u32 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no '{label}' line in:\n{stdout}"));
    line[label.len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after '{label}' in '{line}'"))
}

/// An error exit as the user sees it: status 1, `error: ` first, no backtrace (the tests run
/// the binary with RUST_BACKTRACE=1).
fn assert_clean_error(out: &Output) -> String {
    let (stdout, stderr) = text(out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        !stderr.contains("backtrace") && !stderr.contains("Backtrace"),
        "{stderr}"
    );
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_and_models_against_a_running_pair() {
    let fx = Fixture::load("flux-tiny");
    let denoiser = TestDenoiser::start(&["--model", fx.dir.to_str().unwrap()]).await;
    let controller = TestController::start(&["--denoiser", &denoiser.url()]).await;
    let url = format!("http://{}", controller.addr);
    let out_dir = tempfile::tempdir().unwrap();
    let out_path = out_dir.path().join("latents.safetensors");
    let stages = fixtures_dir().join("flux-tiny/stages.safetensors");
    let generate = |controller: Vec<String>| {
        let mut a = controller;
        a.extend(args(&[
            "generate",
            "--model-class-name",
            "FluxPipeline",
            "--inputs",
            stages.to_str().unwrap(),
            "--inputs-prefix",
            "in.",
            "--skip",
            "timestep,latents_unpacked",
            "--steps",
            "12",
            "--cache-adapter",
            "tea_cache",
            "--rel-l1-thresh",
            "0.6",
            "--output",
            out_path.to_str().unwrap(),
        ]));
        a
    };

    // The README's invocation, with --controller before the subcommand as earlier versions
    // took it.
    let out = teaserve(generate(args(&["--controller", &url]))).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("computed steps 5 of 12"), "{stdout}");
    assert!(stdout.contains("reused steps   7"), "{stdout}");
    assert_eq!(number_after(&stdout, "steps"), 12, "{stdout}");
    let wrote = format!("wrote {} [1, 64, 64]\n", out_path.display());
    assert!(stdout.contains(&wrote), "{stdout}");
    // Inputs mode: the model has no decoder, so no image is written.
    assert!(!stdout.contains(".png"), "{stdout}");
    let latents = candle_core::safetensors::load(&out_path, &candle_core::Device::Cpu).unwrap();
    assert_eq!(latents["latents"].dims(), &[1, 64, 64]);

    // Again, after the subcommand and without a scheme: the earlier file is named as replaced.
    let mut again = generate(Vec::new());
    again.extend(args(&["--controller", &controller.addr.to_string()]));
    let out = teaserve(again).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let replaced = format!(
        "wrote {} [1, 64, 64], replacing the earlier file",
        out_path.display()
    );
    assert!(stdout.contains(&replaced), "{stdout}");

    let models = teaserve(args(&["models", "--controller", &url])).await;
    let (stdout, stderr) = text(&models);
    assert!(models.status.success(), "{stderr}");
    let header = stdout.lines().next().unwrap();
    for column in ["steps", "height x width", "cfg", "guidance", "threshold"] {
        assert!(header.contains(column), "{header}");
    }
    let flux = stdout
        .lines()
        .find(|l| l.starts_with("FluxPipeline"))
        .unwrap();
    assert!(flux.contains(&denoiser.url()), "{stdout}");
    // FluxPipeline's defaults: 28 steps, 1024x1024, CFG 1.0, guidance 3.5, threshold 0.2.
    let cells: Vec<&str> = flux.split_whitespace().collect();
    assert_eq!(
        &cells[1..6],
        ["28", "1024x1024", "1.0", "3.5", "0.2"],
        "{flux}"
    );
    assert!(stdout.contains("QwenImagePipeline"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_mode_uses_the_default_steps_a_threshold_turns_tea_cache_on_and_outputs_are_named() {
    let denoiser = TestDenoiser::start(&[]).await;
    let controller = TestController::start(&["--denoiser", &denoiser.url()]).await;
    let dir = tempfile::tempdir().unwrap();
    let (png, latents) = (
        dir.path().join("square.png"),
        dir.path().join("latents.safetensors"),
    );
    // No --steps (the model's default, 20), no --cache-adapter: the threshold turns TeaCache
    // on; the old flag name still works.
    let out = teaserve(args(&[
        "generate",
        "--controller",
        &controller.addr.to_string(),
        "--model-class-name",
        "TinyFluxPipeline",
        "--prompt",
        "a green square on the left on a yellow background",
        "--seed",
        "3",
        "--threshold",
        "0.4",
        "--png",
        png.to_str().unwrap(),
        "--output",
        latents.to_str().unwrap(),
    ]))
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("steps          20 (the model's default)\n"),
        "{stdout}"
    );
    assert!(stdout.contains("computed steps "), "{stdout}");
    let reused = number_after(&stdout, "reused steps");
    assert!(reused > 0, "TeaCache did not run: {stdout}");
    assert_eq!(
        number_after(&stdout, "computed steps") + reused,
        20,
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("wrote {} [1, 64, 48]\n", latents.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("wrote {} (32x32)\n", png.display())),
        "{stdout}"
    );
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flux_pipeline_folder_turns_a_prompt_into_a_png() {
    let folder = fixtures_dir().join("flux-pipeline-tiny");
    let denoiser = TestDenoiser::start(&["--model", folder.to_str().unwrap()]).await;
    let controller = TestController::start(&["--denoiser", &denoiser.url()]).await;
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("fox.png");
    let out = teaserve(args(&[
        "generate",
        "--controller",
        &controller.addr.to_string(),
        "--model-class-name",
        "FluxPipeline",
        "--prompt",
        "a red fox in the snow",
        "--height",
        "64",
        "--width",
        "96",
        "--steps",
        "4",
        "--guidance-scale",
        "3.5",
        "--max-sequence-length",
        "32",
        "--png",
        png.to_str().unwrap(),
        "--output",
        dir.path().join("l.safetensors").to_str().unwrap(),
    ]))
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("wrote {} (96x64)\n", png.display())),
        "{stdout}"
    );
    assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");
    // A size FLUX cannot take is the server's clear error.
    let out = teaserve(args(&[
        "generate",
        "--controller",
        &controller.addr.to_string(),
        "--model-class-name",
        "FluxPipeline",
        "--prompt",
        "a red fox",
        "--height",
        "72",
        "--steps",
        "2",
        "--png",
        png.to_str().unwrap(),
    ]))
    .await;
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}");
    assert!(stderr.contains("INVALID_ARGUMENT"), "{stderr}");
    assert!(stderr.contains("multiple of 16"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qwen_image_pipeline_folder_turns_a_prompt_and_negative_prompt_into_a_png() {
    let folder = fixtures_dir().join("qwen-image-pipeline-tiny");
    let denoiser = TestDenoiser::start(&["--model", folder.to_str().unwrap()]).await;
    let controller = TestController::start(&["--denoiser", &denoiser.url()]).await;
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("fox.png");
    let generate = |extra: &[&str]| {
        let mut a = vec![
            "generate".to_string(),
            "--controller".into(),
            controller.addr.to_string(),
            "--model-class-name".into(),
            "QwenImagePipeline".into(),
            "--prompt".into(),
            "a red fox in the snow".into(),
            "--height".into(),
            "96".into(),
            "--width".into(),
            "64".into(),
            "--steps".into(),
            "3".into(),
            "--png".into(),
            png.to_str().unwrap().into(),
            "--output".into(),
            dir.path().join("l.safetensors").to_str().unwrap().into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let owned = generate(&["--negative-prompt", "blurry", "--true-cfg-scale", "4"]);
    let out = teaserve(owned).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("wrote {} (64x96)\n", png.display())),
        "{stdout}"
    );
    // Two CFG branches computed every step.
    assert!(stdout.contains("computed steps 6 of 6"), "{stdout}");
    assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");
    // An empty negative prompt still turns CFG on, as in diffusers.
    let owned = generate(&["--negative-prompt", ""]);
    let out = teaserve(owned).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("computed steps 6 of 6"), "{stdout}");
    // A NaN CFG scale is the server's clear error.
    let owned = generate(&["--negative-prompt", "blurry", "--true-cfg-scale", "NaN"]);
    let out = teaserve(owned).await;
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}");
    assert!(stderr.contains("INVALID_ARGUMENT"), "{stderr}");
    assert!(stderr.contains("true_cfg_scale"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_numbers_reach_the_server_and_its_error_is_shown() {
    let denoiser = TestDenoiser::start(&[]).await;
    let controller = TestController::start(&["--denoiser", &denoiser.url()]).await;
    let out = teaserve(args(&[
        "generate",
        "--controller",
        &controller.addr.to_string(),
        "--model-class-name",
        "TinyFluxPipeline",
        "--prompt",
        "a red circle on a blue background",
        "--rel-l1-thresh",
        "-0.5",
    ]))
    .await;
    let stderr = assert_clean_error(&out);
    assert!(
        stderr.contains(
            "Generate failed: INVALID_ARGUMENT: rel_l1_thresh must be a finite number >= 0, got -0.5"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("unexpected argument"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pointing_at_a_denoiser_says_so_for_every_command() {
    let denoiser = TestDenoiser::start(&[]).await;
    let addr = denoiser.addr.to_string();
    for command in [
        args(&["models", "--controller", &addr]),
        args(&[
            "generate",
            "--controller",
            &addr,
            "--prompt",
            "a red circle",
        ]),
        args(&[
            "generate",
            "--controller",
            &addr,
            "--prompt",
            "a red circle",
            "--steps",
            "4",
        ]),
        args(&[
            "calibrate",
            "--controller",
            &addr,
            "--prompt",
            "a red circle",
        ]),
    ] {
        let out = teaserve(command.clone()).await;
        let stderr = assert_clean_error(&out);
        for want in [
            "UNIMPLEMENTED",
            &format!("the server at http://{addr} does not implement teaserve.v1.CacheController"),
            "it is a teaserve denoiser serving TinyFluxPipeline",
            "listens on 127.0.0.1:50050 by default",
        ] {
            assert!(
                stderr.contains(want),
                "{command:?}: {want:?} missing in {stderr}"
            );
        }
    }
}

#[tokio::test]
async fn mistakes_are_a_message_chain_without_a_backtrace() {
    // Refused before any call: TeaCache off and a TeaCache threshold together.
    let out = teaserve(args(&[
        "generate",
        "--controller",
        "127.0.0.1:1",
        "--prompt",
        "a red circle",
        "--cache-adapter",
        "none",
        "--rel-l1-thresh",
        "0.4",
    ]))
    .await;
    let stderr = assert_clean_error(&out);
    assert!(
        stderr.contains("--cache-adapter none turns TeaCache off, but --rel-l1-thresh"),
        "{stderr}"
    );

    // Nothing listening: the outer context and the transport's cause, on one line.
    let out = teaserve(args(&["models", "--controller", "127.0.0.1:1"])).await;
    let stderr = assert_clean_error(&out);
    assert!(
        stderr.starts_with("error: connecting to the controller at http://127.0.0.1:1: "),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");

    // Commands that start their own services take no --controller.
    let out = teaserve(args(&["--controller", "127.0.0.1:1", "demo"])).await;
    let stderr = assert_clean_error(&out);
    assert!(
        stderr.contains("do nothing for `teaserve demo`"),
        "{stderr}"
    );
    let out = teaserve(args(&["bench", "--controller", "127.0.0.1:1"])).await;
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("unexpected argument '--controller'"),
        "{}",
        text(&out).1
    );
}

async fn sessions(
    client: &mut v1::cache_controller_client::CacheControllerClient<tonic::transport::Channel>,
) -> Vec<v1::SessionInfo> {
    client
        .list_sessions(v1::ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .sessions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_ends_generate_with_130_and_the_controller_frees_the_session() {
    let denoiser = TestDenoiser::start(&[]).await;
    let controller = TestController::start(&["--denoiser", &denoiser.url()]).await;
    let mut client = controller.client().await;
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_teaserve"))
        .args([
            "generate",
            "--controller",
            &controller.addr.to_string(),
            "--model-class-name",
            "TinyFluxPipeline",
            "--prompt",
            "a red circle on a blue background",
            "--steps",
            "1000",
            "--output",
            dir.path().join("l.safetensors").to_str().unwrap(),
            "--png",
            dir.path().join("i.png").to_str().unwrap(),
        ])
        .env_remove("TEASERVE_CONTROLLER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the generation is under way, then press Ctrl-C (SIGINT).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if sessions(&mut client).await.iter().any(|s| s.next_step > 2) {
            break;
        }
        assert!(Instant::now() < deadline, "the generation never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = child.id().to_string();
    let kill = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(kill.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(130), "{stdout}\n{stderr}");
    assert!(stderr.contains("cancelled by Ctrl-C after "), "{stderr}");
    assert!(
        stderr.contains("/1000 steps; the controller frees the session"),
        "{stderr}"
    );
    assert!(!dir.path().join("i.png").exists());
    // Dropping the stream cancelled the call: the session goes away.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sessions(&mut client).await.is_empty() {
        assert!(Instant::now() < deadline, "the session was not freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_with_tokens_needs_the_token_flag() {
    let denoiser = TestDenoiser::start(&[]).await;
    let controller =
        TestController::start(&["--denoiser", &denoiser.url(), "--auth-tokens", "cli-secret"])
            .await;
    let addr = controller.addr.to_string();
    let out = teaserve(args(&["models", "--controller", &addr])).await;
    let stderr = assert_clean_error(&out);
    assert!(stderr.contains("UNAUTHENTICATED"), "{stderr}");
    assert!(stderr.contains("Bearer"), "{stderr}");
    let out = teaserve(args(&["models", "--controller", &addr, "--token", "wrong"])).await;
    let stderr = assert_clean_error(&out);
    assert!(stderr.contains("PERMISSION_DENIED"), "{stderr}");
    let out = teaserve(args(&[
        "models",
        "--controller",
        &addr,
        "--token",
        "cli-secret",
    ]))
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("TinyFluxPipeline"), "{stdout}");
    // An https controller needs the CA that signed it.
    let out = teaserve(args(&["models", "--controller", "https://localhost:1"])).await;
    let stderr = assert_clean_error(&out);
    assert!(stderr.contains("--tls-ca"), "{stderr}");
}
