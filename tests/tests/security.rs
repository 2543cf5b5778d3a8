//! TLS, mutual TLS and bearer tokens, with certificates made in the test (rcgen): a
//! controller serving TLS with tokens in front of a denoiser that accepts only clients with a
//! certificate from the deployment's CA; a denoiser guarded by a shared token instead; health
//! open for probes throughout.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use teaserve_proto::v1;
use teaserve_proto::v1::cache_controller_client::CacheControllerClient;
use teaserve_proto::v1::denoiser_client::DenoiserClient;
use teaserve_tests::{TestController, TestDenoiser, generate_run, wait_serving};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A CA and what it signed, as PEM files in a folder.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }

    /// `ca.pem`; `server.pem`/`server.key` for localhost and 127.0.0.1; `client.pem` /
    /// `client.key`; and `rogue-client.*` signed by another CA.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        leaf(&ca, &["localhost", "127.0.0.1"], &dir.path().join("server"));
        leaf(&ca, &["teaserve-controller"], &dir.path().join("client"));
        leaf(&self::ca(), &["intruder"], &dir.path().join("rogue-client"));
        Self { dir }
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }

    /// TLS towards `localhost`, trusting the CA, optionally presenting `identity`.
    fn client_tls(&self, identity: Option<&str>) -> ClientTlsConfig {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.read("ca.pem")))
            .domain_name("localhost");
        if let Some(id) = identity {
            tls = tls.identity(Identity::from_pem(
                self.read(&format!("{id}.pem")),
                self.read(&format!("{id}.key")),
            ));
        }
        tls
    }
}

fn ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(ca: &CertifiedIssuer<'static, KeyPair>, names: &[&str], stem: &Path) {
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let cert = CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, ca)
        .unwrap();
    std::fs::write(stem.with_extension("pem"), cert.pem()).unwrap();
    std::fs::write(stem.with_extension("key"), key.serialize_pem()).unwrap();
}

async fn tls_channel(port: u16, tls: ClientTlsConfig) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

/// Health over `channel` until SERVING (30 s at most).
async fn wait_serving_on(channel: Channel, service: &str) {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for _ in 0..600 {
        if let Ok(r) = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            && r.into_inner().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{service} never became SERVING");
}

fn request() -> v1::GenerateRequest {
    v1::GenerateRequest {
        model_class_name: "TinyFluxPipeline".into(),
        prompt: "a red circle on a blue background".into(),
        num_inference_steps: 4,
        ..Default::default()
    }
}

/// `req` carrying `authorization: Bearer <token>`.
fn with_token<T>(req: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(req);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_tokens_and_mutual_tls_between_the_services() {
    let pki = Pki::new();
    // The denoiser: TLS, and only clients with a certificate from the deployment's CA.
    let denoiser = TestDenoiser::start_unchecked(&[
        "--tls-cert",
        &pki.arg("server.pem"),
        "--tls-key",
        &pki.arg("server.key"),
        "--tls-client-ca",
        &pki.arg("ca.pem"),
    ])
    .await;
    let dport = denoiser.addr.port();
    wait_serving_on(
        tls_channel(dport, pki.client_tls(Some("client")))
            .await
            .unwrap(),
        "teaserve.v1.Denoiser",
    )
    .await;
    // Without a client certificate, or with one from another CA, no connection.
    for id in [None, Some("rogue-client")] {
        let refused = match tls_channel(dport, pki.client_tls(id)).await {
            Err(_) => true,
            Ok(ch) => DenoiserClient::new(ch)
                .describe(v1::DescribeRequest {})
                .await
                .is_err(),
        };
        assert!(refused, "the denoiser accepted a client with {id:?}");
    }
    // Plaintext to a TLS server fails too.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{dport}"))
        .unwrap()
        .connect()
        .await;
    let plain_refused = match plain {
        Err(_) => true,
        Ok(ch) => DenoiserClient::new(ch)
            .describe(v1::DescribeRequest {})
            .await
            .is_err(),
    };
    assert!(plain_refused);

    // The controller: TLS with tokens for its clients; mutual TLS towards the denoiser.
    let ctl = TestController::start(&[
        "--denoiser",
        &format!("http://localhost:{dport}"),
        "--denoiser-tls-ca",
        &pki.arg("ca.pem"),
        "--denoiser-tls-cert",
        &pki.arg("client.pem"),
        "--denoiser-tls-key",
        &pki.arg("client.key"),
        "--tls-cert",
        &pki.arg("server.pem"),
        "--tls-key",
        &pki.arg("server.key"),
        "--auth-tokens",
        "alpha-token,beta-token",
    ])
    .await;
    let cport = ctl.addr.port();
    let channel = loop {
        match tls_channel(cport, pki.client_tls(None)).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    // Health stays open for probes (no token).
    wait_serving_on(channel.clone(), "teaserve.v1.CacheController").await;

    let mut anonymous = CacheControllerClient::new(channel.clone());
    let err = generate_run(&mut anonymous, request()).await.err().unwrap();
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
    assert!(err.message().contains("Bearer"), "{}", err.message());
    let err = anonymous
        .list_models(v1::ListModelsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let err = generate_run(&mut anonymous, with_token(request(), "gamma"))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());

    let run = generate_run(&mut anonymous, with_token(request(), "beta-token"))
        .await
        .unwrap();
    assert_eq!(run.steps.len(), 4);
    assert_eq!(&run.result.image_png[1..4], b"PNG");

    // A plaintext client cannot talk to the TLS controller.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{cport}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        let mut c = CacheControllerClient::new(ch);
        let listed = c
            .list_models(with_token(v1::ListModelsRequest {}, "beta-token"))
            .await;
        assert!(listed.is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denoiser_with_a_token_serves_only_controllers_that_send_it() {
    let denoiser = TestDenoiser::start(&["--auth-tokens", "den-secret"]).await;
    // Health stays open (the start above waited on it without a token); model calls do not.
    let err = denoiser
        .client()
        .await
        .encode_prompt(v1::EncodePromptRequest {
            prompts: vec!["a red circle".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let good = TestController::start(&[
        "--denoiser",
        &denoiser.url(),
        "--denoiser-token",
        "den-secret",
    ])
    .await;
    let run = generate_run(&mut good.client().await, request())
        .await
        .unwrap();
    assert_eq!(run.steps.len(), 4);

    let bad =
        TestController::start(&["--denoiser", &denoiser.url(), "--denoiser-token", "not-it"]).await;
    let err = generate_run(&mut bad.client().await, request())
        .await
        .err()
        .unwrap();
    assert_ne!(err.code(), Code::Ok);
    // Its Describe was refused, which the error names.
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains("PermissionDenied")
            && err.message().contains("this bearer token is not allowed"),
        "{}",
        err.message()
    );
    wait_serving(&denoiser.url()).await;
}

#[test]
fn unusable_security_flags_fail_at_start_up() {
    use clap::Parser as _;
    let parse = |flags: &[&str]| {
        let mut argv = vec!["cache-controller", "--denoiser", "http://127.0.0.1:1"];
        argv.extend_from_slice(flags);
        teaserve_controller::config::Args::try_parse_from(argv)
            .unwrap()
            .serve_options()
            .err()
            .map(|e| e.to_string())
    };
    let err = parse(&["--tls-cert", "/nonexistent/cert.pem"]).unwrap();
    assert!(err.contains("go together"), "{err}");
    let err = parse(&[
        "--tls-cert",
        "/nonexistent/c.pem",
        "--tls-key",
        "/nonexistent/k.pem",
    ])
    .unwrap();
    assert!(err.contains("/nonexistent/c.pem"), "{err}");
    let err = parse(&[
        "--denoiser-tls-cert",
        "/x.pem",
        "--denoiser-tls-key",
        "/y.key",
    ])
    .unwrap();
    assert!(err.contains("need --denoiser-tls-ca"), "{err}");
    assert!(parse(&[]).is_none());
}
