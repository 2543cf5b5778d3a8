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
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("python-client-venv");
    let python = dir.join("bin").join("python");
    if !python.exists() {
        run(
            Command::new("python3").args(["-m", "venv"]).arg(&dir),
            "creating a virtualenv (python3 -m venv)",
        );
    }
    run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "./clients/python[test]",
            ])
            .current_dir(root)
            .env("PYTHONDONTWRITEBYTECODE", "1"),
        "installing clients/python",
    );
    python
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
                .env("PYTHONDONTWRITEBYTECODE", "1"),
            "pytest clients/python/tests",
        )
    })
    .await
    .unwrap();
    eprintln!("{out}");
    assert!(
        out.contains("4 passed"),
        "expected 4 passing Python tests:\n{out}"
    );
}
