//! The policy comparison: every cache policy (TeaCache, FirstBlockCache, MagCache,
//! TaylorSeer) at a few
//! settings on the embedded model and on the tiny FLUX / Qwen-Image pipelines, side by side in
//! one run: computed steps, speedup over the uncached generation, ideal speedup, PSNR of the
//! picture against the uncached one. MagCache runs with ratios `Calibrate` produced on the
//! same model and call first.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use teaserve_proto::v1::{self, DType};
use tokio_stream::StreamExt as _;

use super::{BenchArgs, CAPTIONS, Report, Stack, median, psnr_png, stack, text_request, timed};

/// Pairs per repeat: these generations take 0.1-0.3 s, so more of them are needed than for the
/// larger models' sections.
const POLICY_REPEATS: usize = 3;
use crate::rpc::status_error;

/// One model the comparison runs, with its uncached request and the settings tried.
struct Target {
    name: &'static str,
    model_type: &'static str,
    dir: Option<PathBuf>,
    request: v1::GenerateRequest,
    /// (cache_adapter, setting) pairs: the threshold, or TaylorSeer's `cache_interval` (with
    /// `disable_cache_before_step` 2, `max_order` 2, float32 factors).
    settings: Vec<(&'static str, f64)>,
}

/// A policy's measured point: speedup and mean PSNR, for the plot.
pub(super) struct Point {
    /// `cache_adapter`.
    pub policy: &'static str,
    /// Uncached wall time / cached wall time.
    pub speedup: f64,
    /// PSNR against the uncached picture (capped at 99 dB when identical).
    pub psnr: f64,
}

fn pipeline_request(
    model_type: &str,
    prompt: &str,
    negative: Option<&str>,
    max_sequence_length: u32,
) -> v1::GenerateRequest {
    v1::GenerateRequest {
        model_class_name: model_type.into(),
        cache_adapter: "none".into(),
        prompt: prompt.into(),
        negative_prompt: negative.map(str::to_string),
        height: 64,
        width: 64,
        num_inference_steps: 8,
        max_sequence_length,
        seed: 0,
        wire_dtype: DType::F32 as i32,
        ..Default::default()
    }
}

fn targets(a: &BenchArgs, fixtures: &Path) -> Vec<Target> {
    let mut embedded = text_request(CAPTIONS[0], a.steps, "none", 0.2, DType::F32);
    embedded.cache_config = None;
    let mut out = vec![Target {
        name: "embedded TinyFlux (text to image)",
        model_type: "TinyFluxPipeline",
        dir: None,
        request: embedded,
        settings: vec![
            ("tea_cache", 0.2),
            ("tea_cache", 0.4),
            ("first_block_cache", 0.1),
            ("first_block_cache", 0.3),
            ("mag_cache", 0.06),
            ("mag_cache", 0.3),
            ("taylor_seer", 2.0),
            ("taylor_seer", 4.0),
        ],
    }];
    let flux = fixtures.join("flux-pipeline-tiny");
    if flux.is_dir() {
        out.push(Target {
            name: "tiny FLUX pipeline (random weights)",
            model_type: "FluxPipeline",
            dir: Some(flux),
            request: pipeline_request("FluxPipeline", "a red fox in the snow", None, 32),
            settings: vec![
                ("tea_cache", 0.4),
                ("tea_cache", 1.0),
                ("first_block_cache", 0.3),
                ("first_block_cache", 0.7),
                ("mag_cache", 0.1),
                ("mag_cache", 0.3),
                ("taylor_seer", 2.0),
                ("taylor_seer", 3.0),
            ],
        });
    }
    let qwen = fixtures.join("qwen-image-pipeline-tiny");
    if qwen.is_dir() {
        out.push(Target {
            name: "tiny Qwen-Image pipeline (random weights, true CFG)",
            model_type: "QwenImagePipeline",
            dir: Some(qwen),
            request: pipeline_request(
                "QwenImagePipeline",
                "a red fox in the snow",
                Some("blurry, low quality, distorted"),
                0,
            ),
            settings: vec![
                ("tea_cache", 0.4),
                ("tea_cache", 1.0),
                ("first_block_cache", 0.6),
                ("first_block_cache", 1.2),
                ("mag_cache", 0.1),
                ("mag_cache", 0.25),
                ("taylor_seer", 2.0),
                ("taylor_seer", 3.0),
            ],
        });
    }
    out
}

/// MagCache's ratios for `req`'s model and call, from the controller's Calibrate.
async fn calibrate(s: &mut Stack, req: &v1::GenerateRequest) -> anyhow::Result<Vec<f64>> {
    let mut stream = s
        .client
        .calibrate(v1::CalibrateRequest {
            model_class_name: req.model_class_name.clone(),
            requests: vec![req.clone()],
            ..Default::default()
        })
        .await
        .map_err(|e| status_error("Calibrate", &e))?
        .into_inner();
    while let Some(ev) = stream.next().await {
        if let Some(v1::calibrate_event::Event::Result(r)) =
            ev.map_err(|e| status_error("Calibrate", &e))?.event
        {
            return Ok(r.mag_ratios);
        }
    }
    anyhow::bail!("Calibrate ended without a result")
}

fn with_policy(
    base: &v1::GenerateRequest,
    adapter: &'static str,
    threshold: f64,
    mag_ratios: &[f64],
) -> v1::GenerateRequest {
    let mut req = base.clone();
    req.cache_adapter = adapter.into();
    req.cache_config = Some(match adapter {
        "tea_cache" => v1::CacheConfig {
            rel_l1_thresh: Some(threshold),
            ..Default::default()
        },
        "taylor_seer" => v1::CacheConfig {
            cache_interval: Some(threshold as u32),
            disable_cache_before_step: Some(2),
            max_order: Some(2),
            taylor_factors_dtype: "float32".into(),
            ..Default::default()
        },
        _ => v1::CacheConfig {
            threshold: Some(threshold),
            mag_ratios: if adapter == "mag_cache" {
                mag_ratios.to_vec()
            } else {
                Vec::new()
            },
            ..Default::default()
        },
    });
    req
}

/// Runs the comparison into `r`; returns the points of the plot.
pub(super) async fn policies(
    a: &BenchArgs,
    fixtures: &Path,
    r: &mut Report,
) -> anyhow::Result<Vec<Point>> {
    r.line("## Cache policies side by side\n");
    r.line(format!(
        "Each model's uncached generation, then every policy at a few settings; per setting {} \
         pairs of an uncached and a cached generation run back to back, speedup = the median \
         of the pairs' wall-time ratios (client side, prompt encoding and decoding included); ideal = model calls / computed calls; PSNR of the cached picture \
         against the uncached one. MagCache uses ratios from `Calibrate` on the same call; \
         TaylorSeer's setting is its `cache_interval` (`disable_cache_before_step` 2, \
         `max_order` 2, float32 factors). FirstBlockCache and TaylorSeer run in wire mode \
         (resident mode serves the uncached baseline, TeaCache and MagCache). The \
         tiny pipelines have random weights: their thresholds are far above the defaults, as \
         in diffusers' own fixture runs, and the numbers say how each policy's mechanics \
         cost, not how good it is on a trained model.\n",
        a.repeats.max(1) * POLICY_REPEATS
    ));
    r.line("| model | policy | setting | computed / calls | speedup | ideal | efficiency | PSNR |");
    r.line("|---|---|---|---|---|---|---|---|");
    let mut points = Vec::new();
    for t in targets(a, fixtures) {
        let mut s = stack(t.dir.as_deref(), t.model_type, 1, &[]).await?;
        let mag_ratios = calibrate(&mut s, &t.request)
            .await
            .with_context(|| format!("calibrating MagCache on {}", t.name))?;
        // Warm-up, and the uncached picture every setting is compared with.
        let (_, base) = timed(&mut s.client, &t.request, 1).await?;
        let calls = base.computed.max(1);
        r.line(format!(
            "| {} | none | - | {calls} / {calls} | 1.00x | 1.00x | - | - |",
            t.name
        ));
        for &(adapter, threshold) in &t.settings {
            let req = with_policy(&t.request, adapter, threshold, &mag_ratios);
            // Uncached and cached back to back per repeat: the host's drift cancels.
            let (mut ratios, mut last) = (Vec::new(), None);
            for _ in 0..a.repeats.max(1) * POLICY_REPEATS {
                let (off, _) = timed(&mut s.client, &t.request, 1).await?;
                let (on, run) = timed(&mut s.client, &req, 1).await?;
                ratios.push(off / on);
                last = Some(run);
            }
            let run = last.context("no run")?;
            let speedup = median(ratios);
            let ideal = f64::from(calls) / f64::from(run.computed.max(1));
            let psnr = psnr_png(&base.png, &run.png)?.min(99.0);
            r.line(format!(
                "| {} | {adapter} | {threshold} | {} / {calls} | **{speedup:.2}x** | {ideal:.2}x | {:.2} | {psnr:.1} dB |",
                t.name,
                run.computed,
                speedup / ideal
            ));
            r.summary.push(format!(
                "{}: {adapter} {threshold}: {}/{calls} computed, {speedup:.2}x, PSNR {psnr:.1} dB",
                t.name, run.computed
            ));
            // Settings that computed every call (the same picture) stay out of the plot.
            if run.computed < calls {
                points.push(Point {
                    policy: adapter,
                    speedup,
                    psnr,
                });
            }
        }
    }
    r.line("");
    Ok(points)
}
