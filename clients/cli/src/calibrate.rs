//! `teaserve calibrate`: fits TeaCache's coefficients for a model through the controller's
//! `Calibrate` RPC (uncached runs on the denoisers, least-squares fit on the controller),
//! prints them ready to paste into `cache_config`, and writes the samples, the fit and a
//! plot of the samples with the fitted curve.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args as ClapArgs, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use teaserve_proto::v1::{self, calibrate_event};
use tokio_stream::StreamExt as _;

use crate::output::{Output, png_file_detail};
use crate::plot::{Series, line_chart};
use crate::progress::{Cancelled, CtrlC, end_line};
use crate::rpc::{Controller, ControllerArgs};

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
    #[command(flatten)]
    pub controller: ControllerArgs,
    /// Model type to calibrate, e.g. TinyFluxPipeline or FluxPipeline; default: the
    /// controller's.
    #[arg(long, env = "TEASERVE_MODEL_CLASS_NAME", default_value = "")]
    model_class_name: String,
    /// A prompt (text-mode models); repeat for more.
    #[arg(long, env = "TEASERVE_PROMPT")]
    prompt: Vec<String>,
    /// A file of prompts, one per line (blank lines and lines starting with # are skipped).
    #[arg(long, env = "TEASERVE_PROMPTS_FILE")]
    prompts_file: Option<PathBuf>,
    /// Seeds per prompt (0, 1, ...).
    #[arg(
        long,
        env = "TEASERVE_SEEDS_PER_PROMPT",
        default_value_t = 1,
        allow_negative_numbers = true
    )]
    seeds_per_prompt: u32,
    /// Model-native inputs as safetensors files (hidden_states, encoder_hidden_states, ...);
    /// repeat for more generations.
    #[arg(long, env = "TEASERVE_INPUTS")]
    inputs: Vec<PathBuf>,
    /// Only use tensors of --inputs whose name starts with this prefix, and strip it.
    #[arg(long, env = "TEASERVE_INPUTS_PREFIX", default_value = "")]
    inputs_prefix: String,
    /// Steps per generation; default: the controller's (20 for prompts, the model's default
    /// for --inputs).
    #[arg(
        long,
        env = "TEASERVE_STEPS",
        visible_alias = "num-inference-steps",
        allow_negative_numbers = true
    )]
    steps: Option<u32>,
    /// What the polynomial predicts from the modulated input's change.
    #[arg(long, env = "TEASERVE_CALIBRATE_TARGET", value_enum, default_value_t = Target::Residual)]
    target: Target,
    /// Folder for samples.csv, fit.json and fit.png.
    #[arg(
        long,
        env = "TEASERVE_CALIBRATE_OUT_DIR",
        default_value = "calibration"
    )]
    out_dir: PathBuf,
}

/// Runs the calibration.
pub async fn calibrate(
    a: &CalibrateArgs,
    ctl: &ControllerArgs,
    mut ctrl_c: CtrlC,
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
    let steps = a.steps.unwrap_or(0);
    let mut requests = Vec::new();
    for path in &a.inputs {
        requests.push(v1::GenerateRequest {
            inputs: crate::load_inputs(path, &a.inputs_prefix, &[])?,
            num_inference_steps: steps,
            ..Default::default()
        });
    }
    if prompts.is_empty() && requests.is_empty() {
        bail!("give --prompt / --prompts-file (text-mode models) or --inputs files");
    }
    let generations = prompts.len() * a.seeds_per_prompt.max(1) as usize + requests.len();
    let req = v1::CalibrateRequest {
        model_class_name: a.model_class_name.clone(),
        prompts,
        seeds_per_prompt: a.seeds_per_prompt,
        num_inference_steps: steps,
        requests,
        target: match a.target {
            Target::Residual => v1::CalibrationTarget::Residual,
            Target::Output => v1::CalibrationTarget::Output,
        } as i32,
    };
    let mut controller = Controller::connect(ctl).await?;
    let mut stream = match controller.client.calibrate(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => return Err(controller.error("Calibrate", &s).await),
    };
    let bar = ProgressBar::new(generations as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let (mut done, mut total) = (0u32, generations as u32);
    bar.set_message(format!("0/{total} generations"));
    let mut result = None;
    loop {
        let ev = tokio::select! {
            ev = stream.next() => ev,
            () = ctrl_c.pressed() => {
                bar.abandon();
                end_line(&bar);
                drop(stream);
                return Err(Cancelled(format!(
                    "cancelled by Ctrl-C after {done}/{total} generations; the controller stops \
                     the calibration"
                ))
                .into());
            }
        };
        let Some(ev) = ev else { break };
        let ev = match ev {
            Ok(ev) => ev,
            Err(s) => {
                bar.abandon();
                end_line(&bar);
                return Err(controller.error("Calibrate", &s).await);
            }
        };
        match ev.event {
            Some(calibrate_event::Event::Progress(p)) => {
                (done, total) = (p.generation, p.generations);
                bar.set_length(u64::from(total));
                bar.set_message(format!("{done}/{total} generations, {} samples", p.samples));
                bar.set_position(u64::from(done));
            }
            Some(calibrate_event::Event::Result(r)) => result = Some(r),
            None => {}
        }
    }
    bar.finish_and_clear();
    let r = result.context("Calibrate ended without a result")?;
    std::fs::create_dir_all(&a.out_dir)
        .with_context(|| format!("creating {}", a.out_dir.display()))?;
    let mut csv = String::from("step,x_rel_l1_input,y_rel_l1_target\n");
    for ((s, x), y) in r.step.iter().zip(&r.x).zip(&r.y) {
        csv.push_str(&format!("{s},{x},{y}\n"));
    }
    let samples_out = Output::new(a.out_dir.join("samples.csv"));
    samples_out.write(csv.as_bytes())?;
    let fit = serde_json::json!({
        "model_type": r.model_type,
        "coefficients": r.coefficients,
        "r2": r.r2,
        "samples": r.samples,
        "target": format!("{:?}", a.target).to_lowercase(),
        "cache_config": serde_json::from_str::<serde_json::Value>(&r.cache_config_json)
            .context("the controller's cache_config_json is not JSON")?,
    });
    let fit_out = Output::new(a.out_dir.join("fit.json"));
    fit_out.write(serde_json::to_string_pretty(&fit)?.as_bytes())?;
    let lo = r.x.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = r.x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let curve: Vec<(f64, f64)> = (0..=40)
        .map(|i| {
            let x = lo + (hi - lo) * f64::from(i) / 40.0;
            (x, r.coefficients.iter().fold(0.0, |acc, c| acc * x + c))
        })
        .collect();
    let plot_out = Output::new(a.out_dir.join("fit.png"));
    line_chart(
        plot_out.path(),
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
        "{}: {} samples, R^2 {:.4}\ncoefficients (highest power first): {:?}\ncache_config: {}",
        r.model_type, r.samples, r.r2, r.coefficients, r.cache_config_json,
    )?;
    writeln!(
        out,
        "{}",
        samples_out.wrote(&format!("({} samples)", r.samples))
    )?;
    writeln!(out, "{}", fit_out.wrote(&format!("(R^2 {:.4})", r.r2)))?;
    writeln!(out, "{}", plot_out.wrote(&png_file_detail(plot_out.path())))?;
    Ok(())
}
