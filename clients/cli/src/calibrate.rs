//! `teaserve calibrate`: fits TeaCache's coefficients for a model through the controller's
//! `Calibrate` RPC (uncached runs on the denoisers, least-squares fit on the controller),
//! prints them ready to paste into `cache_config`, and writes the samples, the fit and a
//! plot of the samples with the fitted curve.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args as ClapArgs, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use teaserve_proto::v1::cache_controller_client::CacheControllerClient;
use teaserve_proto::v1::{self, calibrate_event};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

use crate::plot::{Series, line_chart};

/// What the polynomial predicts.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Target {
    /// The transformer blocks' residual (what TeaCache reuses).
    Residual,
    /// The model output.
    Output,
}

/// Options of `teaserve calibrate`.
#[derive(Debug, ClapArgs)]
pub struct CalibrateArgs {
    /// Model type to calibrate, e.g. TinyFluxPipeline or FluxPipeline.
    #[arg(long)]
    model_class_name: String,
    /// A prompt (text-mode models); repeat for more.
    #[arg(long)]
    prompt: Vec<String>,
    /// A file of prompts, one per line (blank lines and lines starting with # are skipped).
    #[arg(long)]
    prompts_file: Option<PathBuf>,
    /// Seeds per prompt (0, 1, ...).
    #[arg(long, default_value_t = 1)]
    seeds_per_prompt: u32,
    /// Model-native inputs as safetensors files (hidden_states, encoder_hidden_states, ...);
    /// repeat for more generations.
    #[arg(long)]
    inputs: Vec<PathBuf>,
    /// Only use tensors of --inputs whose name starts with this prefix, and strip it.
    #[arg(long, default_value = "")]
    inputs_prefix: String,
    /// Steps per generation.
    #[arg(long, default_value_t = 20)]
    steps: u32,
    /// What the polynomial predicts from the modulated input's change.
    #[arg(long, value_enum, default_value_t = Target::Residual)]
    target: Target,
    /// Folder for samples.csv, fit.json and fit.png.
    #[arg(long, default_value = "calibration")]
    out_dir: PathBuf,
}

/// Runs the calibration.
pub async fn calibrate(
    mut client: CacheControllerClient<Channel>,
    a: CalibrateArgs,
) -> anyhow::Result<()> {
    let mut prompts = a.prompt.clone();
    if let Some(path) = &a.prompts_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        prompts.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string),
        );
    }
    let mut requests = Vec::new();
    for path in &a.inputs {
        requests.push(v1::GenerateRequest {
            inputs: crate::load_inputs(path, &a.inputs_prefix, &[])?,
            num_inference_steps: a.steps,
            ..Default::default()
        });
    }
    if prompts.is_empty() && requests.is_empty() {
        bail!("give --prompt / --prompts-file (text-mode models) or --inputs files");
    }
    let req = v1::CalibrateRequest {
        model_class_name: a.model_class_name.clone(),
        prompts,
        seeds_per_prompt: a.seeds_per_prompt,
        num_inference_steps: a.steps,
        requests,
        target: match a.target {
            Target::Residual => v1::CalibrationTarget::Residual,
            Target::Output => v1::CalibrationTarget::Output,
        } as i32,
    };
    let mut stream = client
        .calibrate(req)
        .await
        .map_err(|s| anyhow::anyhow!("Calibrate: {}", s.message()))?
        .into_inner();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} generations {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut result = None;
    while let Some(ev) = stream.next().await {
        match ev
            .map_err(|s| anyhow::anyhow!("Calibrate: {}", s.message()))?
            .event
        {
            Some(calibrate_event::Event::Progress(p)) => {
                bar.set_length(u64::from(p.generations));
                bar.set_position(u64::from(p.generation));
                bar.set_message(format!("{} samples", p.samples));
            }
            Some(calibrate_event::Event::Result(r)) => result = Some(r),
            None => {}
        }
    }
    bar.finish_and_clear();
    let r = result.context("Calibrate ended without a result")?;
    std::fs::create_dir_all(&a.out_dir)?;
    let mut csv = String::from("step,x_rel_l1_input,y_rel_l1_target\n");
    for ((s, x), y) in r.step.iter().zip(&r.x).zip(&r.y) {
        csv.push_str(&format!("{s},{x},{y}\n"));
    }
    std::fs::write(a.out_dir.join("samples.csv"), csv)?;
    let fit = serde_json::json!({
        "model_type": r.model_type,
        "coefficients": r.coefficients,
        "r2": r.r2,
        "samples": r.samples,
        "target": format!("{:?}", a.target).to_lowercase(),
        "cache_config": serde_json::from_str::<serde_json::Value>(&r.cache_config_json)?,
    });
    std::fs::write(
        a.out_dir.join("fit.json"),
        serde_json::to_string_pretty(&fit)?,
    )?;
    let lo = r.x.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = r.x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let curve: Vec<(f64, f64)> = (0..=40)
        .map(|i| {
            let x = lo + (hi - lo) * f64::from(i) / 40.0;
            (x, r.coefficients.iter().fold(0.0, |acc, c| acc * x + c))
        })
        .collect();
    line_chart(
        &a.out_dir.join("fit.png"),
        "TeaCache calibration",
        "input rel-L1",
        &[
            Series::scatter(
                "samples",
                [120, 140, 200],
                r.x.iter().copied().zip(r.y.iter().copied()).collect(),
            ),
            Series::left("fitted polynomial", [200, 50, 40], curve),
        ],
    )?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}: {} samples, R^2 {:.4}\ncoefficients (highest power first): {:?}\ncache_config: {}\nwrote {}/{{samples.csv, fit.json, fit.png}}",
        r.model_type,
        r.samples,
        r.r2,
        r.coefficients,
        r.cache_config_json,
        a.out_dir.display()
    )?;
    Ok(())
}
