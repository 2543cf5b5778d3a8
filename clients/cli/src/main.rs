//! `teaserve`: a command-line client of the cache-controller.
//!
//! - `teaserve generate`: runs one generation from model-native inputs in a safetensors file,
//!   shows progress from the streamed step events, writes the final latents and prints the
//!   computed / reused steps and wall time.
//! - `teaserve models`: lists the model types the controller knows and who serves them.

mod bench;
mod calibrate;
mod demo;
mod plot;
mod spawn;

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, bail};
use candle_core::{DType as CDType, Device, Tensor};
use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use teaserve_proto::v1::cache_controller_client::CacheControllerClient;
use teaserve_proto::v1::{self, DType, generate_event};
use teaserve_proto::{TensorMap, decode_tensor, encode_tensor};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(
    name = "teaserve",
    version,
    about = "Client of the teaserve cache-controller"
)]
struct Cli {
    /// Cache-controller address.
    #[arg(
        long,
        env = "TEASERVE_CONTROLLER",
        default_value = "http://127.0.0.1:50050",
        global = true
    )]
    controller: String,
    /// Largest gRPC message sent or received, in bytes.
    #[arg(long, env = "TEASERVE_MAX_MESSAGE_BYTES", default_value_t = 512 << 20, global = true)]
    max_message_bytes: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one generation and write its final latents.
    Generate(Box<GenerateArgs>),
    /// List model types, their default TeaCache settings and the denoisers serving them.
    Models,
    /// Start a denoiser and a controller on loopback and generate with TeaCache off and on.
    Demo(demo::DemoArgs),
    /// Fit TeaCache's coefficients for a model from uncached runs (the Calibrate RPC).
    Calibrate(Box<calibrate::CalibrateArgs>),
    /// Measure split overhead, TeaCache speed / quality, wire dtypes and 1 vs 2 denoisers.
    Bench(Box<bench::BenchArgs>),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum WireDType {
    F32,
    F16,
    Bf16,
}

#[derive(Debug, ClapArgs)]
struct GenerateArgs {
    /// Model-native inputs (hidden_states, encoder_hidden_states, ...) as a safetensors file.
    #[arg(long, required_unless_present = "prompt", conflicts_with = "prompt")]
    inputs: Option<PathBuf>,
    /// Text mode: what to draw (models that ship a text encoder, e.g. TinyFluxPipeline).
    #[arg(long)]
    prompt: Option<String>,
    /// Text mode: the negative prompt (true CFG).
    #[arg(long, requires = "prompt")]
    negative_prompt: Option<String>,
    /// Text mode: noise seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Text mode: image height in pixels (0: the model's default).
    #[arg(long, default_value_t = 0)]
    height: u32,
    /// Text mode: image width in pixels (0: the model's default).
    #[arg(long, default_value_t = 0)]
    width: u32,
    /// Text mode: where to write the decoded image.
    #[arg(long, default_value = "image.png")]
    png: PathBuf,
    /// Only use tensors whose name starts with this prefix, and strip it (e.g. `in.`).
    #[arg(long, default_value = "")]
    inputs_prefix: String,
    /// Tensor names (after the prefix) to leave out, comma-separated.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Inputs for the NEGATIVE branch (true CFG), same naming; they replace the positive ones.
    #[arg(long)]
    negative_inputs: Option<PathBuf>,
    /// CFG scale: neg + scale * (pos - neg); default: the model's (ListModels).
    #[arg(long, allow_negative_numbers = true)]
    true_cfg_scale: Option<f64>,
    /// Rescale the CFG result to the positive prediction's norm (Qwen-Image).
    #[arg(long)]
    cfg_renorm: bool,
    /// Pipeline class name; default: the controller's.
    #[arg(long, default_value = "")]
    model_class_name: String,
    /// Denoising steps.
    #[arg(long, default_value_t = 28)]
    steps: u32,
    /// Explicit sigmas, comma-separated (N values; 0 is appended). Overrides the default schedule.
    #[arg(long, value_delimiter = ',')]
    sigmas: Vec<f64>,
    /// Cache adapter: tea_cache or none; default: the controller's.
    #[arg(long, default_value = "")]
    cache_adapter: String,
    /// TeaCache threshold (default 0.2).
    #[arg(long)]
    rel_l1_thresh: Option<f64>,
    /// Model type whose coefficients apply (default: model_class_name).
    #[arg(long, default_value = "")]
    model_type: String,
    /// Five polynomial coefficients, highest power first, comma-separated.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    coefficients: Vec<f64>,
    /// The first K steps always compute.
    #[arg(long)]
    warmup_steps: Option<u32>,
    /// The last K steps always compute.
    #[arg(long)]
    cooldown_steps: Option<u32>,
    /// Compute after this many reuses in a row.
    #[arg(long)]
    max_consecutive_reuses: Option<u32>,
    /// CFG branches share one decision.
    #[arg(long)]
    shared_cfg_decision: bool,
    /// Dtype of latents and streams on the wire.
    #[arg(long, value_enum, default_value = "f32")]
    wire_dtype: WireDType,
    /// Where to write the final latents (safetensors, tensor `latents`).
    #[arg(long, default_value = "latents.safetensors")]
    output: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let command = match cli.command {
        Command::Demo(args) => return demo::demo(args).await,
        Command::Bench(args) => return bench::bench(*args).await,
        other => other,
    };
    let channel = Channel::from_shared(cli.controller.clone())
        .context("--controller is not a valid URL")?
        .connect()
        .await
        .with_context(|| format!("connecting to the controller at {}", cli.controller))?;
    let client = CacheControllerClient::new(channel)
        .max_decoding_message_size(cli.max_message_bytes)
        .max_encoding_message_size(cli.max_message_bytes);
    match command {
        Command::Generate(args) => generate(client, *args).await,
        Command::Models => models(client).await,
        Command::Calibrate(args) => calibrate::calibrate(client, *args).await,
        Command::Demo(_) | Command::Bench(_) => Ok(()),
    }
}

/// Loads named tensors from a safetensors file as wire tensors (F64 becomes F32).
pub(crate) fn load_inputs(
    path: &PathBuf,
    prefix: &str,
    skip: &[String],
) -> anyhow::Result<TensorMap> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))?;
    let mut out = TensorMap::new();
    for (name, t) in tensors {
        let Some(short) = name.strip_prefix(prefix) else {
            continue;
        };
        if skip.iter().any(|s| s == short) {
            continue;
        }
        let t = if t.dtype() == CDType::F64 {
            t.to_dtype(CDType::F32)?
        } else {
            t
        };
        let wire = encode_tensor(&t, DType::DtypeUnspecified)
            .with_context(|| format!("{}: tensor '{name}'", path.display()))?;
        out.insert(short.to_string(), wire);
    }
    if out.is_empty() {
        bail!("{} has no tensors named '{prefix}*'", path.display());
    }
    Ok(out)
}

async fn generate(
    mut client: CacheControllerClient<Channel>,
    a: GenerateArgs,
) -> anyhow::Result<()> {
    let inputs = match &a.inputs {
        Some(p) => load_inputs(p, &a.inputs_prefix, &a.skip)?,
        None => HashMap::new(),
    };
    let negative_inputs = match &a.negative_inputs {
        Some(p) => load_inputs(p, &a.inputs_prefix, &a.skip)?,
        None => HashMap::new(),
    };
    let steps = if a.sigmas.is_empty() {
        a.steps
    } else {
        a.sigmas.len() as u32
    };
    let req = v1::GenerateRequest {
        model_class_name: a.model_class_name,
        cache_adapter: a.cache_adapter,
        cache_config: Some(v1::CacheConfig {
            rel_l1_thresh: a.rel_l1_thresh,
            model_type: a.model_type,
            coefficients: a.coefficients,
            warmup_steps: a.warmup_steps,
            cooldown_steps: a.cooldown_steps,
            max_consecutive_reuses: a.max_consecutive_reuses,
            shared_cfg_decision: a.shared_cfg_decision.then_some(true),
        }),
        num_inference_steps: steps,
        sigmas: a.sigmas,
        inputs,
        negative_inputs,
        true_cfg_scale: a.true_cfg_scale,
        wire_dtype: match a.wire_dtype {
            WireDType::F32 => DType::F32,
            WireDType::F16 => DType::F16,
            WireDType::Bf16 => DType::Bf16,
        } as i32,
        cfg_renorm: a.cfg_renorm,
        prompt: a.prompt.clone().unwrap_or_default(),
        negative_prompt: a.negative_prompt.clone().unwrap_or_default(),
        seed: a.seed,
        height: a.height,
        width: a.width,
    };
    let started = Instant::now();
    let mut stream = client
        .generate(req)
        .await
        .map_err(|s| anyhow::anyhow!("Generate refused ({:?}): {}", s.code(), s.message()))?
        .into_inner();
    let bar = ProgressBar::new(u64::from(steps));
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let (mut computed, mut reused) = (0u32, 0u32);
    while let Some(event) = stream.next().await {
        let event = event
            .map_err(|s| anyhow::anyhow!("generation failed ({:?}): {}", s.code(), s.message()))?;
        match event.event {
            Some(generate_event::Event::Step(step)) => {
                for b in &step.branches {
                    if b.computed {
                        computed += 1;
                    } else {
                        reused += 1;
                    }
                }
                bar.set_message(format!(
                    "computed {computed} reused {reused} (sigma {:.3})",
                    step.sigma
                ));
                bar.inc(1);
            }
            Some(generate_event::Event::Result(result)) => {
                bar.finish();
                let latents = result.latents.context("result without latents")?;
                let t: Tensor = decode_tensor(&latents, &Device::Cpu, usize::MAX)?;
                t.save_safetensors("latents", &a.output)
                    .with_context(|| format!("writing {}", a.output.display()))?;
                if !result.image_png.is_empty() {
                    std::fs::write(&a.png, &result.image_png)
                        .with_context(|| format!("writing {}", a.png.display()))?;
                }
                let total = result.computed_steps + result.reused_steps;
                let mut out = std::io::stdout().lock();
                writeln!(out, "session        {}", result.session_id)?;
                writeln!(
                    out,
                    "computed steps {} of {total} (summed over branches)",
                    result.computed_steps
                )?;
                writeln!(out, "reused steps   {}", result.reused_steps)?;
                writeln!(
                    out,
                    "wall time      {:.1} ms (controller), {:.1} ms (client)",
                    result.wall_ms,
                    started.elapsed().as_secs_f64() * 1e3
                )?;
                writeln!(
                    out,
                    "latents        {:?} -> {}",
                    t.dims(),
                    a.output.display()
                )?;
                return Ok(());
            }
            None => {}
        }
    }
    bail!("the controller closed the stream before the result")
}

async fn models(mut client: CacheControllerClient<Channel>) -> anyhow::Result<()> {
    let models = client
        .list_models(v1::ListModelsRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("ListModels failed ({:?}): {}", s.code(), s.message()))?
        .into_inner()
        .models;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<22} {:>9}  {:<70} endpoints",
        "model type", "threshold", "coefficients"
    )?;
    for m in models {
        let coeffs: Vec<String> = m.coefficients.iter().map(|c| format!("{c:.6e}")).collect();
        let endpoints = if m.endpoints.is_empty() {
            "-".to_string()
        } else {
            m.endpoints.join(", ")
        };
        writeln!(
            out,
            "{:<22} {:>9}  {:<70} {endpoints}",
            m.model_type,
            m.default_rel_l1_thresh,
            format!("[{}]", coeffs.join(", "))
        )?;
    }
    Ok(())
}
