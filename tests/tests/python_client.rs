//! The Python client (clients/python) against the real services: builds a virtualenv under
//! the target directory, installs the package (its gRPC stubs generated from proto/ by
//! grpcio-tools during the build) with pytest, starts a denoiser serving the embedded model
//! and a controller on loopback, and runs the package's pytest suite against them.
//! Needs python3 with venv and pip, and access to PyPI (or a pip cache / mirror configured
//! through pip's own environment variables).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use teaserve_tests::{TestController, TestDenoiser};

use teaserve_tests::run_command as run;

fn venv(root: &Path) -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    teaserve_tests::python_venv(
        &tmp,
        "python-client-venv",
        &["./clients/python[test]"],
        root,
    )
    .join("python")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_tests_pass_against_real_services() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let python = {
        let root = root.clone();
        tokio::task::spawn_blocking(move || venv(&root))
            .await
            .unwrap()
    };
    let denoiser = TestDenoiser::start(&[]).await;
    let ctl = TestController::start(&["--denoiser", &denoiser.url()]).await;
    let address = format!("127.0.0.1:{}", ctl.addr.port());
    // A second controller requiring a bearer token, for the client's token test.
    let secured =
        TestController::start(&["--denoiser", &denoiser.url(), "--auth-tokens", "py-secret"]).await;
    let secured_address = format!("127.0.0.1:{}", secured.addr.port());
    let suite = std::fs::read_to_string(root.join("clients/python/tests/test_client.py")).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        run(
            Command::new(&python)
                .args([
                    "-m",
                    "pytest",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "clients/python/tests",
                ])
                .current_dir(&root)
                .env("TEASERVE_CONTROLLER", &address)
                .env("TEASERVE_SECURED_CONTROLLER", &secured_address)
                .env("TEASERVE_SECURED_TOKEN", "py-secret")
                .env_remove("TEASERVE_TOKEN")
                .env_remove("TEASERVE_TLS_CA")
                .env("PYTHONDONTWRITEBYTECODE", "1"),
            "pytest clients/python/tests",
        )
    })
    .await
    .unwrap();
    eprintln!("{out}");
    // Every test function in the suite ran and passed: none failed, errored or was skipped.
    let defined = suite
        .lines()
        .filter(|l| l.trim_start().starts_with("def test_"))
        .count();
    let summary = out
        .lines()
        .rev()
        .find(|l| l.contains(" passed") || l.contains(" failed") || l.contains(" error"))
        .unwrap_or_default();
    assert!(
        defined > 0,
        "no tests in clients/python/tests/test_client.py"
    );
    assert_eq!(
        passed(summary),
        Some(defined),
        "expected all {defined} Python tests to pass:\n{out}"
    );
    for bad in ["failed", "error", "skipped", "xfail"] {
        assert!(!summary.contains(bad), "pytest reported {bad}:\n{out}");
    }
}

/// `pip install -e ./clients/python` (the README's development install) works too: the
/// package then imports from the sources, with the stubs generated next to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editable_install_imports_from_the_sources_and_talks_to_a_controller() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let denoiser = TestDenoiser::start(&[]).await;
    let ctl = TestController::start(&["--denoiser", &denoiser.url()]).await;
    let address = format!("127.0.0.1:{}", ctl.addr.port());
    let src = root.join("clients/python/src/teaserve");
    let out = tokio::task::spawn_blocking(move || {
        let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let python = teaserve_tests::python_venv(
            &tmp,
            "python-editable-venv",
            &["-e", "./clients/python"],
            &root,
        )
        .join("python");
        let script = "import pathlib, sys, teaserve\n\
            from teaserve.v1 import controller_pb2\n\
            print('package', pathlib.Path(teaserve.__file__).resolve().parent)\n\
            print('stubs', pathlib.Path(controller_pb2.__file__).resolve().parent)\n\
            models = teaserve.Client(sys.argv[1]).list_models()\n\
            print('models', ' '.join(m.model_type for m in models))\n";
        run(
            Command::new(&python)
                .args(["-c", script, &address])
                .current_dir(std::env::temp_dir())
                .env("PYTHONDONTWRITEBYTECODE", "1"),
            "importing the editable install",
        )
    })
    .await
    .unwrap();
    let src = src.canonicalize().unwrap();
    assert!(out.contains(&format!("package {}", src.display())), "{out}");
    assert!(
        out.contains(&format!("stubs {}", src.join("v1").display())),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("models ") && l.contains("TinyFluxPipeline")),
        "{out}"
    );
}

/// The count in pytest's `-q` summary line (`7 passed in 3.21s`, `5 passed, 1 failed in ...`).
fn passed(summary: &str) -> Option<usize> {
    let words: Vec<&str> = summary.split([' ', ',']).collect();
    let at = words.iter().position(|w| *w == "passed")?;
    words.get(at.checked_sub(1)?)?.parse().ok()
}
