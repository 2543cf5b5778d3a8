//! `teaserve`: a command-line client of the cache-controller.
//!
//! - `teaserve generate`: runs one generation from a prompt or from model-native inputs in a
//!   safetensors file, shows progress from the streamed step events, writes the final latents
//!   (and the image, where the model decodes one) and prints the computed / reused steps and
//!   wall time.
//! - `teaserve models`: lists the model types the controller knows, their defaults and who
//!   serves them.
//! - `teaserve demo` / `teaserve bench`: start their own denoiser and controller on loopback.
//! - `teaserve calibrate`: fits TeaCache coefficients through the controller.
//!
//! Errors print as `error: outer: inner: cause` and exit with status 1 (never a backtrace);
//! Ctrl-C ends the command with a message and status 130.

mod bench;
mod calibrate;
mod demo;
mod output;
mod plot;
mod progress;
mod rpc;
mod spawn;

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context as _, bail};
use candle_core::{DType as CDType, Device, Tensor};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args as ClapArgs, CommandFactory as _, FromArgMatches as _};
use clap::{Parser, Subcommand, ValueEnum};
use teaserve_proto::v1::{self, DType, generate_event};
use teaserve_proto::{TensorMap, decode_tensor, encode_tensor};
use tokio_stream::StreamExt as _;

use crate::output::{Output, png_detail};
use crate::progress::{Cancelled, CtrlC, StepBar};
use crate::rpc::{Controller, ControllerArgs};

#[derive(Debug, Parser)]
#[command(
    name = "teaserve",
    version,
    about = "Client of the teaserve cache-controller"
)]
struct Cli {
    /// Same as the subcommand's `--controller`; accepted before the subcommand as earlier
    /// versions took it (`teaserve --controller URL models`). No env: TEASERVE_CONTROLLER
    /// belongs to the subcommands' flag, so `demo` and `bench` do not trip over it.
    #[arg(long = "controller", hide = true, value_parser = rpc::controller_url)]
    controller_before: Option<String>,
    /// Same as the subcommand's `--max-message-bytes`, accepted before the subcommand.
    #[arg(long = "max-message-bytes", hide = true)]
    max_message_bytes_before: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one generation and write its final latents (and image).
    Generate(Box<GenerateArgs>),
    /// List model types, their defaults (steps, image size, CFG, TeaCache) and who serves them.
    Models(ModelsArgs),
    /// Start a denoiser and a controller on loopback and generate with TeaCache off and on.
    Demo(demo::DemoArgs),
    /// Fit TeaCache's coefficients for a model from uncached runs (the Calibrate RPC).
    Calibrate(Box<calibrate::CalibrateArgs>),
    /// Measure split overhead, TeaCache speed / quality, wire dtypes and 1 vs 2 denoisers.
    Bench(Box<bench::BenchArgs>),
}

#[derive(Debug, ClapArgs)]
struct ModelsArgs {
    #[command(flatten)]
    controller: ControllerArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum WireDType {
    F32,
    F16,
    Bf16,
}

#[derive(Debug, ClapArgs)]
struct GenerateArgs {
    #[command(flatten)]
    controller: ControllerArgs,
    /// Model-native inputs (hidden_states, encoder_hidden_states, ...) as a safetensors file.
    #[arg(
        long,
        env = "TEASERVE_INPUTS",
        required_unless_present = "prompt",
        conflicts_with = "prompt"
    )]
    inputs: Option<PathBuf>,
    /// Text mode: what to draw (models that ship a text encoder, e.g. TinyFluxPipeline).
    #[arg(long, env = "TEASERVE_PROMPT")]
    prompt: Option<String>,
    /// Text mode: the negative prompt; given (even empty), true CFG runs when the CFG scale is
    /// above 1, as in diffusers.
    #[arg(long, env = "TEASERVE_NEGATIVE_PROMPT", requires = "prompt")]
    negative_prompt: Option<String>,
    /// Text mode: noise seed.
    #[arg(
        long,
        env = "TEASERVE_SEED",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    seed: u64,
    /// Text mode: image height in pixels (0: the model's default).
    #[arg(
        long,
        env = "TEASERVE_HEIGHT",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    height: u32,
    /// Text mode: image width in pixels (0: the model's default).
    #[arg(
        long,
        env = "TEASERVE_WIDTH",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    width: u32,
    /// Embedded guidance of guidance-distilled checkpoints (FLUX.1-dev; unset: the model's
    /// default, 3.5); refused by models without a guidance embedding (FLUX.1-schnell).
    #[arg(long, env = "TEASERVE_GUIDANCE_SCALE", allow_negative_numbers = true)]
    guidance_scale: Option<f64>,
    /// Text mode: the text encoder's length (T5's in FLUX; 0: the model's default, 512).
    #[arg(
        long,
        env = "TEASERVE_MAX_SEQUENCE_LENGTH",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    max_sequence_length: u32,
    /// Text mode: where to write the decoded image.
    #[arg(long, env = "TEASERVE_PNG", default_value = "image.png")]
    png: PathBuf,
    /// Only use tensors whose name starts with this prefix, and strip it (e.g. `in.`).
    #[arg(long, env = "TEASERVE_INPUTS_PREFIX", default_value = "")]
    inputs_prefix: String,
    /// Tensor names (after the prefix) to leave out, comma-separated.
    #[arg(long, env = "TEASERVE_SKIP", value_delimiter = ',')]
    skip: Vec<String>,
    /// Inputs for the NEGATIVE branch (true CFG), same naming; they replace the positive ones.
    #[arg(long, env = "TEASERVE_NEGATIVE_INPUTS")]
    negative_inputs: Option<PathBuf>,
    /// CFG scale: neg + scale * (pos - neg); default: the model's (ListModels).
    #[arg(long, env = "TEASERVE_TRUE_CFG_SCALE", allow_negative_numbers = true)]
    true_cfg_scale: Option<f64>,
    /// Rescale the CFG result to the positive prediction's norm per token (`--cfg-renorm` or
    /// `--cfg-renorm true`; `false` turns it off); default: the model's pipeline behaviour
    /// (on for QwenImagePipeline, off for FluxPipeline).
    #[arg(
        long,
        env = "TEASERVE_CFG_RENORM",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    cfg_renorm: Option<bool>,
    /// Pipeline class name; default: the controller's.
    #[arg(long, env = "TEASERVE_MODEL_CLASS_NAME", default_value = "")]
    model_class_name: String,
    /// Denoising steps; default: the model's (ListModels), or the number of --sigmas.
    #[arg(
        long,
        env = "TEASERVE_STEPS",
        visible_alias = "num-inference-steps",
        allow_negative_numbers = true
    )]
    steps: Option<u32>,
    /// Explicit sigmas, comma-separated (N values; 0 is appended). Overrides the default schedule.
    #[arg(
        long,
        env = "TEASERVE_SIGMAS",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    sigmas: Vec<f64>,
    /// Cache adapter: tea_cache, first_block_cache, mag_cache, taylor_seer or none; default:
    /// tea_cache when a
    /// TeaCache setting (--rel-l1-thresh, --coefficients, ...) is given, else the controller's.
    #[arg(long, env = "TEASERVE_CACHE_ADAPTER")]
    cache_adapter: Option<String>,
    /// The threshold: TeaCache's rel_l1_thresh (default 0.2; turns TeaCache on unless
    /// --cache-adapter says otherwise), or first_block_cache's / mag_cache's threshold.
    #[arg(
        long,
        env = "TEASERVE_REL_L1_THRESH",
        visible_alias = "threshold",
        allow_negative_numbers = true
    )]
    rel_l1_thresh: Option<f64>,
    /// TeaCache: model type whose coefficients apply (default: model_class_name).
    #[arg(long, env = "TEASERVE_MODEL_TYPE", default_value = "")]
    model_type: String,
    /// TeaCache: five polynomial coefficients, highest power first, comma-separated.
    #[arg(
        long,
        env = "TEASERVE_COEFFICIENTS",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    coefficients: Vec<f64>,
    /// TeaCache: the first K steps always compute.
    #[arg(long, env = "TEASERVE_WARMUP_STEPS", allow_negative_numbers = true)]
    warmup_steps: Option<u32>,
    /// TeaCache: the last K steps always compute.
    #[arg(long, env = "TEASERVE_COOLDOWN_STEPS", allow_negative_numbers = true)]
    cooldown_steps: Option<u32>,
    /// TeaCache: compute after this many reuses in a row.
    #[arg(
        long,
        env = "TEASERVE_MAX_CONSECUTIVE_REUSES",
        allow_negative_numbers = true
    )]
    max_consecutive_reuses: Option<u32>,
    /// TeaCache: CFG branches share one decision.
    #[arg(long, env = "TEASERVE_SHARED_CFG_DECISION")]
    shared_cfg_decision: bool,
    /// mag_cache: most steps accumulated before a compute (default 3).
    #[arg(long, env = "TEASERVE_MAX_SKIP_STEPS", allow_negative_numbers = true)]
    max_skip_steps: Option<u32>,
    /// mag_cache: share of the steps that always compute first (default 0.2).
    #[arg(long, env = "TEASERVE_RETENTION_RATIO", allow_negative_numbers = true)]
    retention_ratio: Option<f64>,
    /// mag_cache: calibrated magnitude ratios, comma-separated (default: the model's).
    #[arg(
        long,
        env = "TEASERVE_MAG_RATIOS",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    mag_ratios: Vec<f64>,
    /// taylor_seer: steps between computes (default 5).
    #[arg(long, env = "TEASERVE_CACHE_INTERVAL", allow_negative_numbers = true)]
    cache_interval: Option<u32>,
    /// taylor_seer: the first steps always compute (default 3).
    #[arg(
        long,
        env = "TEASERVE_DISABLE_CACHE_BEFORE_STEP",
        allow_negative_numbers = true
    )]
    disable_cache_before_step: Option<u32>,
    /// taylor_seer: from this step on every step computes (default: never).
    #[arg(
        long,
        env = "TEASERVE_DISABLE_CACHE_AFTER_STEP",
        allow_negative_numbers = true
    )]
    disable_cache_after_step: Option<u32>,
    /// taylor_seer: highest order of the Taylor expansion (default 1).
    #[arg(long, env = "TEASERVE_MAX_ORDER", allow_negative_numbers = true)]
    max_order: Option<u32>,
    /// taylor_seer: precision of the kept factors: bfloat16 (default), float32, float16.
    #[arg(long, env = "TEASERVE_TAYLOR_FACTORS_DTYPE", default_value = "")]
    taylor_factors_dtype: String,
    /// Dtype of latents and streams on the wire.
    #[arg(long, env = "TEASERVE_WIRE_DTYPE", value_enum, default_value = "f32")]
    wire_dtype: WireDType,
    /// Where to write the final latents (safetensors, tensor `latents`).
    #[arg(long, env = "TEASERVE_OUTPUT", default_value = "latents.safetensors")]
    output: PathBuf,
}

impl GenerateArgs {
    /// The TeaCache-only settings given, by flag name.
    fn tea_cache_settings(&self) -> Vec<&'static str> {
        let mut given = Vec::new();
        if self.rel_l1_thresh.is_some() {
            given.push("--rel-l1-thresh");
        }
        if !self.model_type.is_empty() {
            given.push("--model-type");
        }
        if !self.coefficients.is_empty() {
            given.push("--coefficients");
        }
        if self.warmup_steps.is_some() {
            given.push("--warmup-steps");
        }
        if self.cooldown_steps.is_some() {
            given.push("--cooldown-steps");
        }
        if self.max_consecutive_reuses.is_some() {
            given.push("--max-consecutive-reuses");
        }
        if self.shared_cfg_decision {
            given.push("--shared-cfg-decision");
        }
        given
    }
}

/// The `cache_adapter` to send: the one given; else `tea_cache` when TeaCache settings are
/// given (a threshold is never ignored silently); else "" (the controller's default).
/// `none` together with TeaCache settings is refused.
fn cache_adapter(adapter: Option<&str>, tea_cache_settings: &[&str]) -> anyhow::Result<String> {
    let adapter = adapter.map(str::trim).filter(|a| !a.is_empty());
    match adapter {
        Some(a) if a.eq_ignore_ascii_case("none") && !tea_cache_settings.is_empty() => bail!(
            "--cache-adapter none turns TeaCache off, but {} only apply to TeaCache; drop \
             them, or use --cache-adapter tea_cache",
            tea_cache_settings.join(", ")
        ),
        Some(a) => Ok(a.to_string()),
        None if !tea_cache_settings.is_empty() => Ok("tea_cache".to_string()),
        None => Ok(String::new()),
    }
}

/// mimalloc instead of glibc malloc: glibc's per-thread arenas returned freed tensor memory
/// to the OS after every step, so each step page-faulted it back in (measured on the denoiser's
/// compute thread: ~13K faults/s, several per cent of a step). Every teaserve binary uses the
/// same allocator, so `teaserve bench` compares like with like.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Before the runtime starts any thread: the in-process reference of `teaserve bench`
    // computes with the denoiser's thread setting (and its children inherit it).
    teaserve_denoiser::config::pin_compute_threads(None);
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(cli_main()),
        Err(e) => report(Err(
            anyhow::Error::new(e).context("starting the async runtime")
        )),
    }
}

async fn cli_main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let ctrl_c = CtrlC::install();
    let mut pressed = ctrl_c.clone();
    // A command watching Ctrl-C itself (to say how far it got) answers first; this generic
    // answer comes only when it has not within half a second (stuck connecting, say).
    let fallback = async move {
        pressed.pressed().await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    let result = tokio::select! {
        biased;
        r = run(cli, &matches, ctrl_c) => r,
        () = fallback => Err(Cancelled("cancelled by Ctrl-C".into()).into()),
    };
    report(result)
}

/// Prints how the command ended and picks the exit status: 0, 130 (Ctrl-C) or 1 (an error,
/// printed as its chain of messages; never a backtrace, whatever RUST_BACKTRACE says).
fn report(result: anyhow::Result<()>) -> ExitCode {
    let Err(e) = result else {
        return ExitCode::SUCCESS;
    };
    let mut err = std::io::stderr().lock();
    if let Some(c) = e.downcast_ref::<Cancelled>() {
        let _ = writeln!(err, "{c}");
        return ExitCode::from(130);
    }
    let _ = writeln!(err, "error: {}", message_chain(&e));
    ExitCode::FAILURE
}

/// `outer: inner: cause` (anyhow's `{:#}`), with a cause repeated by the next layer down
/// (tonic's `tcp connect error: tcp connect error`) said once.
fn message_chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if parts.last() != Some(&s) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

/// The controller settings of a subcommand, with the pre-subcommand spelling
/// (`teaserve --controller URL models`) filling in where the subcommand's own flag was not
/// given on the command line (it still beats TEASERVE_CONTROLLER and the default).
fn controller_settings(cli: &Cli, sub: &ArgMatches, args: &ControllerArgs) -> ControllerArgs {
    let mut args = args.clone();
    let on_command_line = |id: &str| sub.value_source(id) == Some(ValueSource::CommandLine);
    if let Some(c) = &cli.controller_before
        && !on_command_line("controller")
    {
        args.controller = c.clone();
    }
    if let Some(m) = cli.max_message_bytes_before
        && !on_command_line("max_message_bytes")
    {
        args.max_message_bytes = m;
    }
    args
}

async fn run(cli: Cli, matches: &ArgMatches, ctrl_c: CtrlC) -> anyhow::Result<()> {
    let sub = matches
        .subcommand()
        .map(|(_, m)| m)
        .context("no subcommand")?;
    if let Command::Demo(_) | Command::Bench(_) = &cli.command
        && (cli.controller_before.is_some() || cli.max_message_bytes_before.is_some())
    {
        let name = matches.subcommand_name().unwrap_or("this command");
        bail!(
            "--controller / --max-message-bytes do nothing for `teaserve {name}`: it starts \
             its own denoiser and cache-controller on loopback"
        );
    }
    match &cli.command {
        Command::Demo(args) => demo::demo(args).await,
        Command::Bench(args) => bench::bench(args).await,
        Command::Generate(args) => {
            let ctl = controller_settings(&cli, sub, &args.controller);
            generate(args, &ctl, ctrl_c).await
        }
        Command::Models(args) => {
            let ctl = controller_settings(&cli, sub, &args.controller);
            models(&ctl).await
        }
        Command::Calibrate(args) => {
            let ctl = controller_settings(&cli, sub, &args.controller);
            calibrate::calibrate(args, &ctl, ctrl_c).await
        }
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

/// The steps a request leaving `num_inference_steps` and `sigmas` unset will run, from
/// ListModels: the named model's default, or, with no name, that of the only model type
/// being served (None when that is not clear: the bar then counts without a total).
fn default_steps(models: &[v1::ModelInfo], model_class_name: &str) -> Option<u32> {
    let model = if model_class_name.is_empty() {
        let mut served = models.iter().filter(|m| !m.endpoints.is_empty());
        match (served.next(), served.next()) {
            (Some(only), None) => only,
            _ => return None,
        }
    } else {
        models.iter().find(|m| m.model_type == model_class_name)?
    };
    (model.default_num_inference_steps > 0).then_some(model.default_num_inference_steps)
}

async fn generate(a: &GenerateArgs, ctl: &ControllerArgs, mut ctrl_c: CtrlC) -> anyhow::Result<()> {
    let adapter = cache_adapter(a.cache_adapter.as_deref(), &a.tea_cache_settings())?;
    let inputs = match &a.inputs {
        Some(p) => load_inputs(p, &a.inputs_prefix, &a.skip)?,
        None => HashMap::new(),
    };
    let negative_inputs = match &a.negative_inputs {
        Some(p) => load_inputs(p, &a.inputs_prefix, &a.skip)?,
        None => HashMap::new(),
    };
    let mut controller = Controller::connect(ctl).await?;
    let expected = match (a.steps, a.sigmas.len()) {
        (Some(s), _) => Some(s),
        (None, n) if n > 0 => u32::try_from(n).ok(),
        (None, _) => {
            let models = match controller
                .client
                .list_models(v1::ListModelsRequest {})
                .await
            {
                Ok(r) => r.into_inner().models,
                Err(s) => return Err(controller.error("ListModels", &s).await),
            };
            default_steps(&models, &a.model_class_name)
        }
    };
    // The threshold flag is the threshold of whichever policy runs.
    let policy_threshold = matches!(adapter.as_str(), "mag_cache" | "first_block_cache");
    let req = v1::GenerateRequest {
        model_class_name: a.model_class_name.clone(),
        cache_adapter: adapter,
        cache_config: Some(v1::CacheConfig {
            rel_l1_thresh: a.rel_l1_thresh.filter(|_| !policy_threshold),
            model_type: a.model_type.clone(),
            coefficients: a.coefficients.clone(),
            warmup_steps: a.warmup_steps,
            cooldown_steps: a.cooldown_steps,
            max_consecutive_reuses: a.max_consecutive_reuses,
            shared_cfg_decision: a.shared_cfg_decision.then_some(true),
            threshold: a.rel_l1_thresh.filter(|_| policy_threshold),
            max_skip_steps: a.max_skip_steps,
            retention_ratio: a.retention_ratio,
            mag_ratios: a.mag_ratios.clone(),
            cache_interval: a.cache_interval,
            disable_cache_before_step: a.disable_cache_before_step,
            disable_cache_after_step: a.disable_cache_after_step,
            max_order: a.max_order,
            taylor_factors_dtype: a.taylor_factors_dtype.clone(),
        }),
        // 0: the model's default (or the number of sigmas); the controller checks they agree.
        num_inference_steps: a.steps.unwrap_or(0),
        sigmas: a.sigmas.clone(),
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
        negative_prompt: a.negative_prompt.clone(),
        seed: a.seed,
        height: a.height,
        width: a.width,
        guidance_scale: a.guidance_scale,
        max_sequence_length: a.max_sequence_length,
    };
    let started = Instant::now();
    let mut bar = StepBar::new(expected);
    // Ctrl-C may come before the stream's headers do (the session is already running).
    let opened = tokio::select! {
        r = controller.client.generate(req) => r,
        () = ctrl_c.pressed() => return Err(cancelled(&mut bar)),
    };
    let mut stream = match opened {
        Ok(r) => r.into_inner(),
        Err(s) => return Err(controller.error("Generate", &s).await),
    };
    loop {
        let event = tokio::select! {
            ev = stream.next() => ev,
            // Dropping the stream cancels the call; the controller frees the session.
            () = ctrl_c.pressed() => return Err(cancelled(&mut bar)),
        };
        let event = match event {
            Some(Ok(event)) => event,
            Some(Err(s)) => {
                bar.abandon();
                let e = controller.error("Generate", &s).await;
                return Err(if bar.progress.steps > 0 {
                    e.context(format!("generation stopped after {}", bar.progress.count()))
                } else {
                    e
                });
            }
            None => {
                bar.abandon();
                bail!(
                    "the controller closed the stream after {} without a result",
                    bar.progress.count()
                );
            }
        };
        match event.event {
            Some(generate_event::Event::Step(step)) => bar.record(&step),
            Some(generate_event::Event::Result(result)) => {
                bar.finish();
                let latents = result.latents.context("the result has no latents")?;
                let t: Tensor = decode_tensor(&latents, &Device::Cpu, usize::MAX)?;
                let latents_out = Output::new(&a.output);
                t.save_safetensors("latents", &a.output)
                    .with_context(|| format!("writing {}", a.output.display()))?;
                let png_out = if result.image_png.is_empty() {
                    None
                } else {
                    let out = Output::new(&a.png);
                    out.write(&result.image_png)?;
                    Some(out)
                };
                let total = result.computed_steps + result.reused_steps;
                let default = if a.steps.is_none() && a.sigmas.is_empty() {
                    " (the model's default)"
                } else {
                    ""
                };
                let mut out = std::io::stdout().lock();
                writeln!(out, "session        {}", result.session_id)?;
                writeln!(out, "steps          {}{default}", bar.progress.steps)?;
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
                writeln!(out, "{}", latents_out.wrote(&format!("{:?}", t.dims())))?;
                if let Some(png) = png_out {
                    writeln!(out, "{}", png.wrote(&png_detail(&result.image_png)))?;
                }
                return Ok(());
            }
            None => {}
        }
    }
}

/// The error a generation ends with on Ctrl-C: how far it got, and that the call's end (its
/// stream dropped by the caller) frees the session on the controller.
fn cancelled(bar: &mut StepBar) -> anyhow::Error {
    bar.abandon();
    Cancelled(format!(
        "cancelled by Ctrl-C after {}; the controller frees the session",
        bar.progress.count()
    ))
    .into()
}

/// `-` for an unset (zero) default; floats keep their point (`1.0`, not `1`).
fn or_dash<T: PartialEq + Default + std::fmt::Debug>(v: T) -> String {
    if v == T::default() {
        "-".to_string()
    } else {
        format!("{v:?}")
    }
}

/// The `teaserve models` table.
fn models_table(models: &[v1::ModelInfo]) -> String {
    let mut out = format!(
        "{:<18} {:>5}  {:>14}  {:>4}  {:>8}  {:>9}  {:<70} endpoints\n",
        "model type", "steps", "height x width", "cfg", "guidance", "threshold", "coefficients"
    );
    for m in models {
        let coeffs: Vec<String> = m.coefficients.iter().map(|c| format!("{c:.6e}")).collect();
        let endpoints = if m.endpoints.is_empty() {
            "-".to_string()
        } else {
            m.endpoints.join(", ")
        };
        let size = if m.default_height == 0 && m.default_width == 0 {
            "-".to_string()
        } else {
            format!("{}x{}", m.default_height, m.default_width)
        };
        out.push_str(&format!(
            "{:<18} {:>5}  {:>14}  {:>4}  {:>8}  {:>9}  {:<70} {endpoints}\n",
            m.model_type,
            or_dash(m.default_num_inference_steps),
            size,
            or_dash(m.default_true_cfg_scale),
            m.default_guidance_scale
                .map_or("-".to_string(), |g| format!("{g:?}")),
            format!("{:?}", m.default_rel_l1_thresh),
            format!("[{}]", coeffs.join(", "))
        ));
    }
    if let Some(m) = models.iter().find(|m| !m.cache_adapters.is_empty()) {
        out.push_str(&format!(
            "cache adapters: {}\n",
            m.cache_adapters.join(", ")
        ));
    }
    let with_ratios: Vec<String> = models
        .iter()
        .filter(|m| !m.mag_ratios.is_empty())
        .map(|m| format!("{} ({} values)", m.model_type, m.mag_ratios.len()))
        .collect();
    if !with_ratios.is_empty() {
        out.push_str(&format!(
            "mag_cache default ratios: {}; other models need mag_ratios (teaserve calibrate)\n",
            with_ratios.join(", ")
        ));
    }
    out
}

async fn models(ctl: &ControllerArgs) -> anyhow::Result<()> {
    let mut controller = Controller::connect(ctl).await?;
    let models = match controller
        .client
        .list_models(v1::ListModelsRequest {})
        .await
    {
        Ok(r) => r.into_inner().models,
        Err(s) => return Err(controller.error("ListModels", &s).await),
    };
    let mut out = std::io::stdout().lock();
    write!(out, "{}", models_table(&models))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::panic)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let mut argv = vec!["teaserve"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
    }

    fn generate_args(args: &[&str]) -> GenerateArgs {
        let mut argv = vec!["generate", "--prompt", "a red circle"];
        argv.extend_from_slice(args);
        match parse(&argv) {
            Ok(Cli {
                command: Command::Generate(g),
                ..
            }) => *g,
            other => panic!("not a generate command: {other:?}"),
        }
    }

    #[test]
    fn errors_print_as_one_chain_without_repeats() {
        let e = anyhow::anyhow!("Connection refused")
            .context("tcp connect error")
            .context("tcp connect error")
            .context("connecting to the controller at http://127.0.0.1:1");
        assert_eq!(
            message_chain(&e),
            "connecting to the controller at http://127.0.0.1:1: tcp connect error: Connection refused"
        );
    }

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn negative_numbers_reach_the_server() {
        let g = generate_args(&["--rel-l1-thresh", "-0.5", "--true-cfg-scale", "-2"]);
        assert_eq!(g.rel_l1_thresh, Some(-0.5));
        assert_eq!(g.true_cfg_scale, Some(-2.0));
        let g = generate_args(&["--sigmas", "-0.1,0.5", "--coefficients", "-1,2,-3,4,-5e-1"]);
        assert_eq!(g.sigmas, vec![-0.1, 0.5]);
        assert_eq!(g.coefficients, vec![-1.0, 2.0, -3.0, 4.0, -0.5]);
        let g = generate_args(&["--threshold=-0.25"]);
        assert_eq!(g.rel_l1_thresh, Some(-0.25));
        // Unsigned settings say why a negative value is wrong instead of "unexpected argument".
        for flag in ["--steps", "--seed", "--warmup-steps", "--height"] {
            let err = parse(&["generate", "--prompt", "x", flag, "-3"])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("invalid value '-3'"), "{flag}: {err}");
        }
    }

    #[test]
    fn demo_takes_negative_thresholds_and_the_old_name() {
        for flag in ["--rel-l1-thresh", "--threshold"] {
            match parse(&["demo", flag, "-0.5"]) {
                Ok(Cli {
                    command: Command::Demo(d),
                    ..
                }) => assert_eq!(d.rel_l1_thresh, -0.5),
                other => panic!("{flag}: {other:?}"),
            }
        }
    }

    #[test]
    fn old_names_are_aliases() {
        let g = generate_args(&["--threshold", "0.4", "--num-inference-steps", "7"]);
        assert_eq!((g.rel_l1_thresh, g.steps), (Some(0.4), Some(7)));
        assert!(parse(&["calibrate", "--threshold", "0.3", "--prompt", "x"]).is_err());
        match parse(&["bench", "--prompts", "3", "--num-inference-steps", "5"]) {
            Ok(Cli {
                command: Command::Bench(b),
                ..
            }) => assert_eq!((b.captions, b.steps), (3, 5)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn steps_are_optional() {
        assert_eq!(generate_args(&[]).steps, None);
        assert_eq!(generate_args(&["--steps", "12"]).steps, Some(12));
    }

    #[test]
    fn a_threshold_turns_tea_cache_on() -> anyhow::Result<()> {
        let g = generate_args(&["--rel-l1-thresh", "0.4"]);
        assert_eq!(
            cache_adapter(g.cache_adapter.as_deref(), &g.tea_cache_settings())?,
            "tea_cache"
        );
        let g = generate_args(&["--coefficients", "0,0,0,1,0"]);
        assert_eq!(
            cache_adapter(g.cache_adapter.as_deref(), &g.tea_cache_settings())?,
            "tea_cache"
        );
        let g = generate_args(&[]);
        assert_eq!(
            cache_adapter(g.cache_adapter.as_deref(), &g.tea_cache_settings())?,
            ""
        );
        let g = generate_args(&["--cache-adapter", "none"]);
        assert_eq!(
            cache_adapter(g.cache_adapter.as_deref(), &g.tea_cache_settings())?,
            "none"
        );
        let g = generate_args(&["--cache-adapter", "tea_cache", "--threshold", "0.1"]);
        assert_eq!(
            cache_adapter(g.cache_adapter.as_deref(), &g.tea_cache_settings())?,
            "tea_cache"
        );
        let g = generate_args(&["--cache-adapter", "none", "--rel-l1-thresh", "0.4"]);
        let err = cache_adapter(g.cache_adapter.as_deref(), &g.tea_cache_settings())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("--cache-adapter none") && err.contains("--rel-l1-thresh"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn controller_urls_are_normalised_wherever_given() -> anyhow::Result<()> {
        for argv in [
            vec!["models", "--controller", "127.0.0.1:50050"],
            vec!["--controller", "127.0.0.1:50050", "models"],
        ] {
            let matches = Cli::command()
                .try_get_matches_from(std::iter::once("teaserve").chain(argv.iter().copied()))?;
            let cli = Cli::from_arg_matches(&matches)?;
            let (_, sub) = matches.subcommand().context("subcommand")?;
            let Command::Models(m) = &cli.command else {
                bail!("not models");
            };
            let ctl = controller_settings(&cli, sub, &m.controller);
            assert_eq!(ctl.controller, "http://127.0.0.1:50050", "{argv:?}");
        }
        Ok(())
    }

    #[test]
    fn the_subcommand_flag_beats_the_old_position() -> anyhow::Result<()> {
        let argv = [
            "teaserve",
            "--controller",
            "10.0.0.1:1",
            "generate",
            "--controller",
            "10.0.0.2:2",
            "--prompt",
            "x",
        ];
        let matches = Cli::command().try_get_matches_from(argv)?;
        let cli = Cli::from_arg_matches(&matches)?;
        let (_, sub) = matches.subcommand().context("subcommand")?;
        let Command::Generate(g) = &cli.command else {
            bail!("not generate");
        };
        assert_eq!(
            controller_settings(&cli, sub, &g.controller).controller,
            "http://10.0.0.2:2"
        );
        Ok(())
    }

    #[test]
    fn demo_and_bench_have_no_controller_flag() {
        assert!(parse(&["demo", "--controller", "127.0.0.1:1"]).is_err());
        assert!(parse(&["bench", "--controller", "127.0.0.1:1"]).is_err());
        let demo_help = Cli::command()
            .find_subcommand_mut("demo")
            .map(|c| c.render_long_help().to_string())
            .unwrap_or_default();
        assert!(!demo_help.contains("--controller"), "{demo_help}");
        assert!(demo_help.contains("--rel-l1-thresh"), "{demo_help}");
    }

    #[test]
    fn default_steps_come_from_list_models() {
        let m = |name: &str, steps: u32, served: bool| v1::ModelInfo {
            model_type: name.into(),
            default_num_inference_steps: steps,
            endpoints: if served {
                vec!["http://d".into()]
            } else {
                vec![]
            },
            ..Default::default()
        };
        let one = [
            m("FluxPipeline", 28, false),
            m("TinyFluxPipeline", 20, true),
        ];
        assert_eq!(default_steps(&one, ""), Some(20));
        assert_eq!(default_steps(&one, "FluxPipeline"), Some(28));
        assert_eq!(default_steps(&one, "Nope"), None);
        let two = [m("FluxPipeline", 28, true), m("TinyFluxPipeline", 20, true)];
        assert_eq!(default_steps(&two, ""), None);
    }

    #[test]
    fn the_models_table_shows_the_defaults() {
        let table = models_table(&[v1::ModelInfo {
            model_type: "FluxPipeline".into(),
            coefficients: vec![1.0; 5],
            default_rel_l1_thresh: 0.2,
            endpoints: vec!["http://127.0.0.1:50051".into()],
            default_num_inference_steps: 28,
            default_height: 1024,
            default_width: 768,
            default_true_cfg_scale: 1.0,
            default_guidance_scale: Some(3.5),
            cache_adapters: vec!["none".into(), "tea_cache".into(), "mag_cache".into()],
            mag_ratios: vec![1.0; 28],
            ..Default::default()
        }]);
        assert!(
            table.contains("cache adapters: none, tea_cache, mag_cache"),
            "{table}"
        );
        assert!(
            table.contains("mag_cache default ratios: FluxPipeline (28 values)"),
            "{table}"
        );
        let row = table.lines().nth(1).unwrap_or_default();
        for want in [
            "FluxPipeline",
            " 28 ",
            "1024x768",
            " 3.5 ",
            "0.2",
            "http://127.0.0.1:50051",
        ] {
            assert!(row.contains(want), "{want:?} missing: {table}");
        }
    }
}
