//! `train`: trains teaserve's embedded model, a tiny FLUX (the serving `FluxPipeline` code)
//! in 32x32 RGB pixel space with 4x4 pixel patches and its own word-embedding text encoder, on
//! procedural scenes with the rectified-flow objective, using candle's autograd and AdamW.
//! Deterministic from `--seed`. Writes `config.json`, `model.safetensors` and `train_log.csv`.

mod scenes;

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer as _, VarBuilder, VarMap};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use teaserve_denoiser::models::flux::{Config, Flux, Inputs};
use teaserve_denoiser::models::layers::set_differentiable;
use teaserve_denoiser::models::tiny_text::{TinyTextEncoder, pack, position_ids, tokenize};

use teaserve_controller::calibration::fit::polyfit;
use teaserve_controller::policy::teacache::rel_l1;

use crate::scenes::{Rng, random_scene};

#[derive(Debug, Parser)]
#[command(
    name = "train",
    about = "Train the embedded tiny FLUX model on procedural scenes"
)]
struct Args {
    /// Output folder (config.json, model.safetensors, train_log.csv).
    #[arg(long, default_value = "models/tiny-flux")]
    out: PathBuf,
    /// Optimisation steps.
    #[arg(long, default_value_t = 3000)]
    steps: usize,
    /// Scenes per step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// AdamW learning rate (cosine-decayed to 10% over the run).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Seed of the scenes, noise and timesteps (weights are initialised by candle from it
    /// too, through the same generator).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image side in pixels.
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// Pixels per token side (tokens are `patch x patch` RGB patches).
    #[arg(long, default_value_t = 4)]
    patch: usize,
    /// Start from these weights (a model.safetensors of the same architecture) instead of a
    /// random initialisation, e.g. to continue a run with a fresh learning-rate schedule.
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// Skip training: load `--out`'s model and only fit the TeaCache coefficients.
    #[arg(long)]
    fit_only: bool,
    /// Uncached generations used for the coefficient fit.
    #[arg(long, default_value_t = 48)]
    fit_prompts: usize,
    /// Steps per fitting generation.
    #[arg(long, default_value_t = 20)]
    fit_steps: usize,
    /// What the polynomial predicts from the modulated input's rel-L1: the change of the
    /// transformer blocks' residual (what TeaCache caches and reuses), or of the model output.
    #[arg(long, value_enum, default_value_t = FitTarget::Residual)]
    fit_target: FitTarget,
}

/// The quantity whose consecutive-step rel-L1 the TeaCache polynomial estimates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FitTarget {
    /// The blocks' residual (image stream after the blocks minus before): the cached value.
    Residual,
    /// The final model output (the predicted velocity).
    Output,
}

/// The embedded model's architecture.
fn config(size: usize, patch: usize) -> serde_json::Value {
    serde_json::json!({
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": 3 * patch * patch,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 4,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "guidance_embeds": false,
        "axes_dims_rope": [4, 6, 6],
        "teaserve": { "pipeline": "TinyFluxPipeline", "image_size": size, "pixel_patch": patch, "text_encoder": "word embeddings" }
    })
}

fn normal_tensor(rng: &mut Rng, shape: &[usize], dev: &Device) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    Tensor::from_vec(
        (0..n).map(|_| rng.normal()).collect::<Vec<f32>>(),
        shape,
        dev,
    )
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.fit_only {
        train(&args)?;
    }
    fit_teacache(&args)
}

/// Uncached generations with the trained model (serving kernels); fits TeaCache's polynomial
/// from consecutive-step relative L1 changes of the modulated input (x) and of the model
/// output (y), and writes `teacache.json`.
fn fit_teacache(args: &Args) -> anyhow::Result<()> {
    set_differentiable(false);
    let dev = Device::Cpu;
    let cfg: Config =
        serde_json::from_str(&std::fs::read_to_string(args.out.join("config.json"))?)?;
    let vb = VarBuilder::from_buffered_safetensors(
        std::fs::read(args.out.join("model.safetensors"))?,
        DType::F32,
        &dev,
    )?;
    let flux = Flux::new(&cfg, vb.clone())?;
    let text = TinyTextEncoder::new(cfg.joint_attention_dim, vb.pp("text_encoder"))?;
    let grid = args.size / args.patch;
    let (img_ids, txt_ids) = position_ids(grid, grid, &dev)?;
    let mut rng = Rng::new(args.seed ^ 0xF17);
    let n = args.fit_steps.max(2);
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    let mut samples = std::fs::File::create(args.out.join("fit_samples.csv"))?;
    writeln!(
        samples,
        "generation,step,x_modulated_input,y_output,y_residual"
    )?;
    for g in 0..args.fit_prompts {
        let scene = random_scene(&mut rng, args.size);
        let (states, pooled) = text.encode(&[tokenize(&scene.caption)?], &dev)?;
        let mut latents = normal_tensor(
            &mut rng,
            &[1, grid * grid, 3 * args.patch * args.patch],
            &dev,
        )?;
        let (mut prev_m, mut prev_o): (Option<Vec<f32>>, Option<Vec<f32>>) = (None, None);
        let mut prev_r: Option<Vec<f32>> = None;
        for i in 0..n {
            let sigma = 1.0 - i as f64 / n as f64;
            let next = 1.0 - (i + 1) as f64 / n as f64;
            let inputs = Inputs {
                hidden_states: latents.clone(),
                encoder_hidden_states: states.clone(),
                pooled_projections: pooled.clone(),
                timestep: Tensor::new(&[sigma as f32], &dev)?,
                img_ids: img_ids.clone(),
                txt_ids: txt_ids.clone(),
                guidance: None,
            };
            let pre = flux.preprocess(&inputs)?;
            let rope = flux.rope(&txt_ids, &img_ids)?;
            let (img, _) = flux.run_blocks(
                &pre.hidden_states,
                &pre.encoder_hidden_states,
                &pre.temb,
                &rope,
                0..flux.num_blocks(),
            )?;
            let out = flux.postprocess(&img, &pre.temb)?;
            let m: Vec<f32> = pre.modulated_input.flatten_all()?.to_vec1()?;
            let r: Vec<f32> = (&img - &pre.hidden_states)?.flatten_all()?.to_vec1()?;
            let o: Vec<f32> = out.flatten_all()?.to_vec1()?;
            if let (Some(pm), Some(po), Some(pr)) = (&prev_m, &prev_o, &prev_r) {
                let (x, y_out, y_res) = (rel_l1(&m, pm), rel_l1(&o, po), rel_l1(&r, pr));
                writeln!(samples, "{g},{i},{x},{y_out},{y_res}")?;
                xs.push(x);
                ys.push(match args.fit_target {
                    FitTarget::Residual => y_res,
                    FitTarget::Output => y_out,
                });
            }
            prev_m = Some(m);
            prev_r = Some(r);
            prev_o = Some(o);
            latents = (&latents + (out * (next - sigma))?)?;
        }
    }
    let (coefficients, r2) = polyfit(&xs, &ys, 4)
        .ok_or_else(|| anyhow::anyhow!("the fit is singular ({} samples)", xs.len()))?;
    let report = serde_json::json!({
        "model_type": "TinyFluxPipeline",
        "coefficients": coefficients,
        "r2": r2,
        "samples": xs.len(),
        "generations": args.fit_prompts,
        "steps": n,
        "x": "rel-L1 change of the modulated input between consecutive steps",
        "y": match args.fit_target {
            FitTarget::Residual => "rel-L1 change of the transformer blocks' residual (image stream out minus in) between consecutive steps",
            FitTarget::Output => "rel-L1 change of the model output between consecutive steps",
        },
    });
    std::fs::write(
        args.out.join("teacache.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "TeaCache fit over {} pairs: coefficients {coefficients:?}, R^2 {r2:.4}",
        xs.len()
    )?;
    Ok(())
}

fn train(args: &Args) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    set_differentiable(true);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let config_json = config(args.size, args.patch);
    let cfg: Config = serde_json::from_value(config_json.clone())?;

    // Deterministic initialisation: every variable drawn from our generator.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let flux = Flux::new(&cfg, vb.clone())?;
    let text = TinyTextEncoder::new(cfg.joint_attention_dim, vb.pp("text_encoder"))?;
    let mut rng = Rng::new(args.seed);
    {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("varmap lock"))?;
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let var = &data[name];
            let dims = var.dims().to_vec();
            let fan_in = *dims.last().unwrap_or(&1) as f32;
            let init = if name.ends_with("norm_q.weight")
                || name.ends_with("norm_k.weight")
                || name.ends_with("norm_added_q.weight")
                || name.ends_with("norm_added_k.weight")
            {
                Tensor::ones(dims.as_slice(), DType::F32, &dev)?
            } else if name.ends_with(".bias") {
                Tensor::zeros(dims.as_slice(), DType::F32, &dev)?
            } else if name.contains("embedding") {
                normal_tensor(&mut rng, &dims, &dev)?
            } else {
                (normal_tensor(&mut rng, &dims, &dev)? * f64::from(1.0 / fan_in.sqrt()))?
            };
            var.set(&init)?;
        }
    }
    let mut varmap = varmap;
    if let Some(init) = &args.init_from {
        varmap
            .load(init)
            .with_context(|| format!("loading --init-from {}", init.display()))?;
    }
    let grid = args.size / args.patch;
    let (img_ids, txt_ids) = position_ids(grid, grid, &dev)?;
    let mut opt = candle_nn::AdamW::new(
        varmap.all_vars(),
        candle_nn::ParamsAdamW {
            lr: args.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut log = std::fs::File::create(args.out.join("train_log.csv"))?;
    writeln!(log, "step,loss,elapsed_s")?;
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let mut ema = None::<f32>;
    for step in 0..args.steps {
        let scenes: Vec<_> = (0..args.batch)
            .map(|_| random_scene(&mut rng, args.size))
            .collect();
        let pixels: Vec<f32> = scenes
            .iter()
            .flat_map(|s| s.pixels.iter().copied())
            .collect();
        let images = Tensor::from_vec(pixels, (args.batch, 3, args.size, args.size), &dev)?;
        let x0 = pack(&images, args.patch)?;
        let tokens = scenes
            .iter()
            .map(|s| tokenize(&s.caption))
            .collect::<Result<Vec<_>, _>>()?;
        let (states, pooled) = text.encode(&tokens, &dev)?;
        let noise = normal_tensor(&mut rng, x0.dims(), &dev)?;
        // Logit-normal timesteps (SD3 / FLUX training): more weight mid-trajectory.
        let t: Vec<f32> = (0..args.batch)
            .map(|_| 1.0 / (1.0 + (-rng.normal()).exp()))
            .collect();
        let t = Tensor::from_vec(t, args.batch, &dev)?;
        let tb = t.reshape((args.batch, 1, 1))?;
        let xt = (x0.broadcast_mul(&(1.0 - &tb)?)? + noise.broadcast_mul(&tb)?)?;
        let target = (&noise - &x0)?;
        let pred = flux.forward(&Inputs {
            hidden_states: xt,
            encoder_hidden_states: states,
            pooled_projections: pooled,
            timestep: t,
            img_ids: img_ids.clone(),
            txt_ids: txt_ids.clone(),
            guidance: None,
        })?;
        let loss = (pred - target)?.sqr()?.mean_all()?;
        let progress = step as f64 / args.steps.max(1) as f64;
        opt.set_learning_rate(
            args.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())),
        );
        opt.backward_step(&loss)?;
        let l = loss.to_scalar::<f32>()?;
        let smooth = ema.map_or(l, |e| 0.98 * e + 0.02 * l);
        ema = Some(smooth);
        writeln!(log, "{step},{l},{:.1}", started.elapsed().as_secs_f64())?;
        bar.set_message(format!("loss {smooth:.4}"));
        bar.inc(1);
    }
    bar.finish();
    varmap.save(args.out.join("model.safetensors"))?;
    std::fs::write(
        args.out.join("config.json"),
        serde_json::to_string_pretty(&config_json)?,
    )?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "trained {} steps in {:.0} s; final smoothed loss {:.4}; wrote {}",
        args.steps,
        started.elapsed().as_secs_f64(),
        ema.unwrap_or(f32::NAN),
        args.out.display()
    )?;
    Ok(())
}
