//! The embedded model makes real pictures: text-mode generations through both services are
//! checked from their pixels (object colour, background colour, position), so a broken model
//! or pipeline fails. TeaCache at 0.2 with the model's fitted coefficients must skip steps and
//! stay within 30 dB PSNR of the uncached picture.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use teaserve_proto::v1::{self, generate_event};
use teaserve_tests::{TestController, TestDenoiser};
use tokio_stream::StreamExt as _;

const STEPS: u32 = 20;

fn rgb(name: &str) -> [f64; 3] {
    match name {
        "red" => [220.0, 30.0, 30.0],
        "green" => [30.0, 180.0, 40.0],
        "blue" => [30.0, 60.0, 220.0],
        "yellow" => [240.0, 220.0, 30.0],
        "white" => [245.0, 245.0, 245.0],
        "black" => [15.0, 15.0, 15.0],
        other => panic!("no colour {other}"),
    }
}

fn dist(a: [f64; 3], b: [f64; 3]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

struct Picture {
    png: Vec<u8>,
    computed: u32,
}

async fn generate(ctl: &TestController, prompt: &str, adapter: &str) -> Picture {
    let req = v1::GenerateRequest {
        model_class_name: "TinyFluxPipeline".into(),
        cache_adapter: adapter.into(),
        cache_config: Some(v1::CacheConfig {
            rel_l1_thresh: Some(0.2),
            ..Default::default()
        }),
        num_inference_steps: STEPS,
        prompt: prompt.into(),
        seed: 0,
        ..Default::default()
    };
    let mut stream = ctl.client().await.generate(req).await.unwrap().into_inner();
    while let Some(ev) = stream.next().await {
        if let Some(generate_event::Event::Result(r)) = ev.unwrap().event {
            return Picture {
                png: r.image_png.to_vec(),
                computed: r.computed_steps,
            };
        }
    }
    panic!("no result");
}

fn pixels(png: &[u8]) -> image::RgbImage {
    image::load_from_memory(png).unwrap().to_rgb8()
}

fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    let mse = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum::<f64>()
        / a.as_raw().len() as f64;
    10.0 * (255.0f64.powi(2) / mse.max(1e-12)).log10()
}

/// Checks a picture of `fg` at `position` on `bg`; returns a description for the log.
fn check(img: &image::RgbImage, fg: &str, bg: &str, position: &str) -> String {
    let (fg, bg) = (rgb(fg), rgb(bg));
    let px = |x: u32, y: u32| {
        let p = img.get_pixel(x, y).0;
        [f64::from(p[0]), f64::from(p[1]), f64::from(p[2])]
    };
    // Pixels closer to the object colour than to the background colour.
    let mut object = Vec::new();
    for y in 0..img.height() {
        for x in 0..img.width() {
            if dist(px(x, y), fg) < dist(px(x, y), bg) {
                object.push((f64::from(x) + 0.5, f64::from(y) + 0.5));
            }
        }
    }
    let n = object.len() as f64;
    assert!(
        (40.0..=500.0).contains(&n),
        "object covers {n} of 1024 pixels"
    );
    let cx = object.iter().map(|p| p.0).sum::<f64>() / n;
    let cy = object.iter().map(|p| p.1).sum::<f64>() / n;
    let corners = [(1, 1), (30, 1), (1, 30), (30, 30)];
    let corner_colour: Vec<f64> = corners.iter().map(|&(x, y)| dist(px(x, y), bg)).collect();
    assert!(
        corner_colour.iter().all(|&d| d < 90.0),
        "corners are not the background: {corner_colour:?}"
    );
    // Scenes put "left" at x = 9, "top" at y = 9, the centre at 16 (32 px image).
    let placed = match position {
        "left" => cx < 13.0 && (cy - 16.0).abs() < 5.0,
        "right" => cx > 19.0 && (cy - 16.0).abs() < 5.0,
        "top" => cy < 13.0 && (cx - 16.0).abs() < 5.0,
        "bottom" => cy > 19.0 && (cx - 16.0).abs() < 5.0,
        _ => (cx - 16.0).abs() < 3.0 && (cy - 16.0).abs() < 3.0,
    };
    assert!(
        placed,
        "object centred at ({cx:.1}, {cy:.1}), not {position}"
    );
    let centre = px(cx as u32, cy as u32);
    assert!(
        dist(centre, fg) < 90.0,
        "object colour {centre:?} is not {fg:?}"
    );
    format!("{n} object pixels centred at ({cx:.1}, {cy:.1})")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captions_become_the_pictures_they_describe() {
    let denoiser = TestDenoiser::start(&[]).await;
    let ctl = TestController::start(&["--denoiser", &denoiser.url()]).await;
    for (prompt, fg, bg, position) in [
        ("a red circle on a blue background", "red", "blue", "center"),
        (
            "a green square on the left on a yellow background",
            "green",
            "yellow",
            "left",
        ),
        (
            "a white triangle at the top on a black background",
            "white",
            "black",
            "top",
        ),
    ] {
        let off = generate(&ctl, prompt, "none").await;
        assert_eq!(off.computed, STEPS);
        let img = pixels(&off.png);
        assert_eq!(img.dimensions(), (32, 32));
        let seen = check(&img, fg, bg, position);
        let on = generate(&ctl, prompt, "tea_cache").await;
        let p = psnr(&img, &pixels(&on.png));
        eprintln!(
            "{prompt:?}: {seen}; TeaCache 0.2 computed {}/{STEPS}, PSNR {p:.1} dB",
            on.computed
        );
        assert!(on.computed < STEPS, "TeaCache skipped nothing");
        assert!(
            p >= 30.0,
            "{prompt:?}: TeaCache 0.2 gives PSNR {p:.1} dB against the uncached picture (>= 30 dB wanted)"
        );
    }
    // The prompt vocabulary is enforced with a clear error.
    let err = ctl
        .client()
        .await
        .generate(v1::GenerateRequest {
            model_class_name: "TinyFluxPipeline".into(),
            prompt: "a pink circle".into(),
            num_inference_steps: 4,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("unknown word 'pink'"),
        "{}",
        err.message()
    );
}
