//! Calibrate over real gRPC: fitting the embedded model's coefficients from its own uncached
//! runs reproduces the shipped coefficients' behaviour (computed steps within +-1 at every
//! threshold of the table), and bad calibration requests get clear errors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use teaserve_proto::v1::{self, calibrate_event, generate_event};
use teaserve_tests::{TestController, TestDenoiser};
use tokio_stream::StreamExt as _;
use tonic::Code;

const CAPTIONS: [&str; 8] = [
    "a red circle on a blue background",
    "a green square on the left on a yellow background",
    "a white triangle at the top on a black background",
    "a yellow square at the bottom on a purple background",
    "an orange circle on the right on a green background",
    "a blue triangle in the center on a white background",
    "a purple circle on the left on an orange background",
    "a black square on the right on a red background",
];

async fn calibrate(
    ctl: &TestController,
    req: v1::CalibrateRequest,
) -> Result<(v1::CalibrateResult, u32), tonic::Status> {
    let mut stream = ctl.client().await.calibrate(req).await?.into_inner();
    let mut progress = 0;
    while let Some(ev) = stream.next().await {
        match ev?.event {
            Some(calibrate_event::Event::Progress(p)) => progress = p.generation,
            Some(calibrate_event::Event::Result(r)) => return Ok((r, progress)),
            None => {}
        }
    }
    panic!("no result");
}

async fn computed(ctl: &TestController, caption: &str, thresh: f64, coefficients: Vec<f64>) -> u32 {
    let req = v1::GenerateRequest {
        model_class_name: "TinyFluxPipeline".into(),
        cache_adapter: "tea_cache".into(),
        cache_config: Some(v1::CacheConfig {
            rel_l1_thresh: Some(thresh),
            coefficients,
            ..Default::default()
        }),
        num_inference_steps: 20,
        prompt: caption.into(),
        seed: 1000,
        ..Default::default()
    };
    let mut stream = ctl.client().await.generate(req).await.unwrap().into_inner();
    while let Some(ev) = stream.next().await {
        if let Some(generate_event::Event::Result(r)) = ev.unwrap().event {
            return r.computed_steps;
        }
    }
    panic!("no result");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calibrating_the_embedded_model_reproduces_its_shipped_behaviour() {
    let denoiser = TestDenoiser::start(&[]).await;
    let ctl = TestController::start(&["--denoiser", &denoiser.url()]).await;
    let (fit, progress) = calibrate(
        &ctl,
        v1::CalibrateRequest {
            model_class_name: "TinyFluxPipeline".into(),
            prompts: CAPTIONS.iter().map(|c| c.to_string()).collect(),
            seeds_per_prompt: 4,
            num_inference_steps: 20,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(progress, 32);
    assert_eq!(fit.samples, 32 * 19);
    assert_eq!(fit.coefficients.len(), 5);
    assert_eq!(fit.x.len(), fit.samples as usize);
    eprintln!(
        "calibrated: {:?}, R^2 {:.3}; shipped: {:?}",
        fit.coefficients,
        fit.r2,
        teaserve_controller::models::TINY_FLUX_COEFFICIENTS
    );
    let config: serde_json::Value = serde_json::from_str(&fit.cache_config_json).unwrap();
    assert_eq!(config["model_type"], "TinyFluxPipeline");
    for t in [0.1, 0.2, 0.4, 0.6, 0.8] {
        for caption in [CAPTIONS[0], CAPTIONS[2], CAPTIONS[4]] {
            let shipped = computed(&ctl, caption, t, Vec::new()).await;
            let ours = computed(&ctl, caption, t, fit.coefficients.clone()).await;
            eprintln!("threshold {t} {caption:?}: shipped {shipped}, calibrated {ours}");
            assert!(
                shipped.abs_diff(ours) <= 1,
                "threshold {t}, {caption:?}: shipped coefficients compute {shipped} steps, calibrated {ours}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_calibration_requests_get_clear_errors() {
    let denoiser = TestDenoiser::start(&[]).await;
    let ctl = TestController::start(&["--denoiser", &denoiser.url()]).await;
    let base = v1::CalibrateRequest {
        model_class_name: "TinyFluxPipeline".into(),
        prompts: vec![CAPTIONS[0].into()],
        ..Default::default()
    };
    for (req, code, needle) in [
        (
            v1::CalibrateRequest {
                prompts: vec![],
                ..base.clone()
            },
            Code::InvalidArgument,
            "nothing to calibrate",
        ),
        (
            v1::CalibrateRequest {
                num_inference_steps: 2,
                ..base.clone()
            },
            Code::InvalidArgument,
            "between 3 and 1000",
        ),
        (
            v1::CalibrateRequest {
                prompts: vec!["a pink circle".into()],
                ..base.clone()
            },
            Code::InvalidArgument,
            "pink",
        ),
        (
            v1::CalibrateRequest {
                model_class_name: "QwenImagePipeline".into(),
                ..base.clone()
            },
            Code::Unavailable,
            "QwenImagePipeline",
        ),
    ] {
        let err = calibrate(&ctl, req).await.unwrap_err();
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(err.message().contains(needle), "{}", err.message());
    }
    // Still serving.
    let (ok, _) = calibrate(
        &ctl,
        v1::CalibrateRequest {
            num_inference_steps: 6,
            ..base
        },
    )
    .await
    .unwrap();
    assert_eq!(ok.samples, 5);
}
