//! `teaserve bench`: measures, side by side in one run and as ratios, what teaserve promises:
//! the cost of the network split (services vs one in-process forward loop), how much of
//! TeaCache's ideal speedup arrives (N / computed steps), the speed / quality table over
//! thresholds next to the reference, F32 vs BF16 on the wire, and throughput with 1 vs 2
//! denoisers. Starts its own services (the sibling binaries) on loopback, writes
//! `report.md` and `threshold.png` under `--out-dir` and prints the report.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, bail};
use candle_core::{DType as CDType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::{Args as ClapArgs, ValueEnum};
use teaserve_denoiser::loader;
use teaserve_denoiser::models::flux::{Config, Flux};
use teaserve_denoiser::registry::LoadOptions;
use teaserve_proto::v1::cache_controller_client::CacheControllerClient;
use teaserve_proto::v1::{self, DType, generate_event};
use teaserve_proto::{TensorMap, decode_tensor, encode_tensor};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

mod policies;

use crate::output::{Output, png_file_detail};
use crate::plot::{Series, line_chart};
use crate::rpc::status_error;
use crate::spawn::{
    Service, connect, free_port, metric, metric_sum, scrape, sibling_binaries, start,
    wait_until_served,
};

/// The parts of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Section {
    /// Services (caching off) vs the in-process monolithic forward loop.
    Overhead,
    /// TeaCache speed / quality over thresholds, and achieved vs ideal speedup.
    Cache,
    /// F32 vs BF16 tensors on the wire.
    Wire,
    /// Throughput of 1 vs 2 denoisers under concurrent generations.
    Scaling,
    /// The split at real widths: bytes per step and overhead of wire vs resident mode on a
    /// synthetic FLUX 3072 wide, the recovery cost of a miss, and the protocol's bytes at
    /// FLUX.1-dev 1024x1024 and Qwen-Image 1328x1328.
    RealWidth,
    /// Every cache policy (TeaCache, FirstBlockCache, MagCache, TaylorSeer) at a few settings on the
    /// embedded model and the tiny FLUX / Qwen-Image pipelines: computed steps, speedup, PSNR.
    Policies,
}

/// Options of `teaserve bench`.
#[derive(Debug, ClapArgs)]
pub struct BenchArgs {
    /// Folder for report.md and threshold.png.
    #[arg(long, env = "TEASERVE_BENCH_OUT_DIR", default_value = "bench-results")]
    out_dir: PathBuf,
    /// Sections to run (comma-separated).
    #[arg(long, env = "TEASERVE_BENCH_SECTIONS", value_enum, value_delimiter = ',', default_values_t = [Section::Overhead, Section::Cache, Section::Wire, Section::Scaling, Section::RealWidth, Section::Policies])]
    sections: Vec<Section>,
    /// Folder holding the tiny pipeline folders the policy comparison runs
    /// (`flux-pipeline-tiny`, `qwen-image-pipeline-tiny`; the repository's test fixtures).
    /// Missing ones are skipped.
    #[arg(
        long,
        env = "TEASERVE_BENCH_FIXTURES",
        default_value = "tests/fixtures"
    )]
    fixtures: PathBuf,
    /// Denoising steps per generation.
    #[arg(
        long,
        env = "TEASERVE_STEPS",
        visible_alias = "num-inference-steps",
        default_value_t = 20,
        allow_negative_numbers = true
    )]
    pub steps: u32,
    /// Captions averaged in the threshold table (at most 8).
    #[arg(
        long,
        env = "TEASERVE_BENCH_CAPTIONS",
        visible_alias = "prompts",
        default_value_t = 8,
        allow_negative_numbers = true
    )]
    pub captions: usize,
    /// Timed repetitions per measurement (the median is reported).
    #[arg(
        long,
        env = "TEASERVE_BENCH_REPEATS",
        default_value_t = 3,
        allow_negative_numbers = true
    )]
    repeats: usize,
    /// Back-to-back pairs behind each target ratio (split overhead, cache efficiency): the
    /// median of the per-pair ratios is reported, the pair order alternating so that drift of
    /// the machine cancels.
    #[arg(
        long,
        env = "TEASERVE_BENCH_PAIRS",
        default_value_t = 9,
        allow_negative_numbers = true
    )]
    pairs: usize,
    /// Concurrent generations in the scaling section.
    #[arg(
        long,
        env = "TEASERVE_BENCH_CONCURRENCY",
        default_value_t = 4,
        allow_negative_numbers = true
    )]
    concurrency: usize,
    /// Generations per scaling run.
    #[arg(
        long,
        env = "TEASERVE_BENCH_SCALING_GENERATIONS",
        default_value_t = 8,
        allow_negative_numbers = true
    )]
    scaling_generations: usize,
}

/// TeaCache4FLUX's published speedups, at the thresholds they were measured at (its table
/// starts at 0.25, which this bench does not run: that row is quoted with its threshold).
const REFERENCE: [(f64, f64); 4] = [(0.25, 1.5), (0.4, 1.8), (0.6, 2.0), (0.8, 2.25)];
/// The reference figure to quote on a row: the published speedup at this threshold, or at the
/// nearest published one with that threshold named (0.2 shows "1.50x (at 0.25)").
fn reference_speedup(t: f64) -> String {
    let nearest = REFERENCE
        .iter()
        .min_by(|a, b| (a.0 - t).abs().total_cmp(&(b.0 - t).abs()));
    match nearest {
        Some((rt, s)) if (rt - t).abs() < 1e-9 => format!("{s:.2}x"),
        Some((rt, s)) if (rt - t).abs() <= 0.05 + 1e-9 => format!("{s:.2}x (at {rt})"),
        _ => "-".to_string(),
    }
}

const THRESHOLDS: [f64; 5] = [0.1, 0.2, 0.4, 0.6, 0.8];
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

/// Fresh service stacks (and in-process copies) the split-overhead pairs are spread over: each
/// process instance computes a little faster or slower than another for its whole life (up to
/// 3% on the bench host), so pairs on one instance share its luck.
const INSTANCES: usize = 3;

/// Architecture of the larger synthetic FLUX (random weights), sized so one step costs
/// tens of milliseconds on a CPU core.
fn synthetic_config() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 2,
        "num_single_layers": 4,
        "attention_head_dim": 64,
        "num_attention_heads": 4,
        "joint_attention_dim": 256,
        "pooled_projection_dim": 256,
        "guidance_embeds": false,
        "axes_dims_rope": [16, 24, 24],
    })
}

/// A model the bench drives: where its files are (None: embedded), its model type, the
/// in-process copy, and model-native inputs.
struct BenchModel {
    name: &'static str,
    dir: Option<PathBuf>,
    model_type: &'static str,
    flux: Flux,
    inputs: TensorMap,
    latents: Tensor,
}

/// The in-process copy of a bench model: the embedded one (`None`) or the one written to `dir`.
fn load_flux(dir: Option<&Path>) -> anyhow::Result<Flux> {
    let Some(dir) = dir else {
        let files = loader::embedded()?;
        let cfg: Config = loader::parse_config(&files, |_| Ok(()))?;
        let opts = LoadOptions {
            device: Device::Cpu,
            dtype: CDType::F32,
            components: Vec::new(),
        };
        return Ok(Flux::new(&cfg, loader::var_builder(&files, &opts)?)?);
    };
    let cfg: Config = serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;
    // The very file the denoiser loads.
    let vb = VarBuilder::from_buffered_safetensors(
        std::fs::read(dir.join("diffusion_pytorch_model.safetensors"))?,
        CDType::F32,
        &Device::Cpu,
    )?;
    Ok(Flux::new(&cfg, vb)?)
}

fn random(seed: u64, shape: &[usize]) -> anyhow::Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(
        teaserve_controller::text_mode::seeded_noise(seed, n),
        shape,
        &Device::Cpu,
    )?)
}

/// Position ids: image tokens (0, row, col) on a `side x side` grid, text tokens zeros.
fn ids(side: usize, text: usize) -> anyhow::Result<(Tensor, Tensor)> {
    let img: Vec<f32> = (0..side * side)
        .flat_map(|i| [0.0, (i / side) as f32, (i % side) as f32])
        .collect();
    Ok((
        Tensor::from_vec(img, (side * side, 3), &Device::Cpu)?,
        Tensor::zeros((text, 3), CDType::F32, &Device::Cpu)?,
    ))
}

fn native_inputs(cfg: &Config, side: usize, text: usize) -> anyhow::Result<(TensorMap, Tensor)> {
    let latents = random(1, &[1, side * side, cfg.in_channels])?;
    let (img_ids, txt_ids) = ids(side, text)?;
    let mut map = TensorMap::new();
    for (name, t) in [
        (
            "encoder_hidden_states",
            random(2, &[1, text, cfg.joint_attention_dim])?,
        ),
        (
            "pooled_projections",
            random(3, &[1, cfg.pooled_projection_dim])?,
        ),
        ("img_ids", img_ids),
        ("txt_ids", txt_ids),
    ] {
        map.insert(name.to_string(), encode_tensor(&t, DType::F32)?);
    }
    Ok((map, latents))
}

impl BenchModel {
    /// The embedded TinyFluxPipeline (8x8 tokens of 48 channels, 12 text tokens).
    fn embedded() -> anyhow::Result<Self> {
        let flux = load_flux(None)?;
        let (inputs, latents) = native_inputs(flux.config(), 8, 12)?;
        Ok(Self {
            name: "embedded TinyFlux (64 tokens, 0.5 M params)",
            dir: None,
            model_type: "TinyFluxPipeline",
            flux,
            inputs,
            latents,
        })
    }

    /// The synthetic FLUX, written to `dir` with random weights (16x16 tokens, 32 text).
    fn synthetic(dir: &Path) -> anyhow::Result<Self> {
        Self::synthetic_with(
            dir,
            synthetic_config(),
            16,
            32,
            "synthetic FLUX (256 tokens, 2+4 blocks, width 256, random weights)",
        )
    }

    /// A FLUX of `json`'s architecture with random weights written to `dir`, on a
    /// `side x side` token grid with `text` text tokens.
    fn synthetic_with(
        dir: &Path,
        json: serde_json::Value,
        side: usize,
        text: usize,
        name: &'static str,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let cfg: Config = serde_json::from_value(json.clone())?;
        let varmap = VarMap::new();
        Flux::new(
            &cfg,
            VarBuilder::from_varmap(&varmap, CDType::F32, &Device::Cpu),
        )?;
        let weights = dir.join("diffusion_pytorch_model.safetensors");
        varmap.save(&weights)?;
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&json)?,
        )?;
        let flux = load_flux(Some(dir))?;
        let (inputs, latents) = native_inputs(&cfg, side, text)?;
        Ok(Self {
            name,
            dir: Some(dir.to_path_buf()),
            model_type: "FluxPipeline",
            flux,
            inputs,
            latents,
        })
    }

    /// The same model and inputs with a fresh in-process copy (its own allocations).
    fn fresh_copy(&self) -> anyhow::Result<Self> {
        Ok(Self {
            name: self.name,
            dir: self.dir.clone(),
            model_type: self.model_type,
            flux: load_flux(self.dir.as_deref())?,
            inputs: self.inputs.clone(),
            latents: self.latents.clone(),
        })
    }

    fn sigmas(steps: u32) -> Vec<f64> {
        (0..steps)
            .map(|i| 1.0 - f64::from(i) / f64::from(steps))
            .collect()
    }

    fn request(
        &self,
        steps: u32,
        adapter: &str,
        thresh: f64,
        wire: DType,
    ) -> anyhow::Result<v1::GenerateRequest> {
        self.request_with(steps, adapter, thresh, Vec::new(), wire)
    }

    fn request_with(
        &self,
        steps: u32,
        adapter: &str,
        thresh: f64,
        coefficients: Vec<f64>,
        wire: DType,
    ) -> anyhow::Result<v1::GenerateRequest> {
        let mut inputs = self.inputs.clone();
        inputs.insert(
            "hidden_states".into(),
            encode_tensor(&self.latents, DType::F32)?,
        );
        Ok(v1::GenerateRequest {
            model_class_name: self.model_type.into(),
            cache_adapter: adapter.into(),
            cache_config: Some(v1::CacheConfig {
                rel_l1_thresh: Some(thresh),
                coefficients,
                ..Default::default()
            }),
            sigmas: Self::sigmas(steps),
            num_inference_steps: steps,
            inputs,
            wire_dtype: wire as i32,
            ..Default::default()
        })
    }

    /// [`BenchModel::in_process`] and its wall time, ms.
    fn timed_in_process(&self, steps: u32) -> anyhow::Result<(Tensor, f64)> {
        let t = Instant::now();
        let latents = self.in_process(steps)?;
        Ok((latents, t.elapsed().as_secs_f64() * 1e3))
    }

    /// The in-process reference: the denoising loop over the model in this process, with
    /// what does not change between steps (the text stream, the pooled text projection, the
    /// rotary tables) computed once, as resident mode keeps it; the same bits as `forward`.
    fn in_process(&self, steps: u32) -> anyhow::Result<Tensor> {
        let dev = Device::Cpu;
        let get = |n: &str| -> anyhow::Result<Tensor> {
            let t = self.inputs.get(n).with_context(|| format!("input {n}"))?;
            Ok(decode_tensor(t, &dev, usize::MAX)?)
        };
        let flux = &self.flux;
        let terms = flux.conditioning_terms(&get("pooled_projections")?, None)?;
        let text = flux.embed_text(&get("encoder_hidden_states")?)?;
        let rope = flux.rope(&get("txt_ids")?, &get("img_ids")?)?;
        let blocks = 0..flux.num_blocks();
        let mut sigmas = Self::sigmas(steps);
        sigmas.push(0.0);
        let mut latents = self.latents.clone();
        for w in sigmas.windows(2) {
            let timestep = Tensor::full(
                teaserve_controller::schedule::transformer_timestep(w[0]),
                1,
                &dev,
            )?;
            let pre = flux.preprocess_embedded(&latents, &timestep, &terms, &text)?;
            let (img, _) = flux.run_blocks(
                &pre.hidden_states,
                &pre.encoder_hidden_states,
                &pre.temb,
                &rope,
                blocks.clone(),
            )?;
            let v = flux.postprocess(&img, &pre.temb)?;
            latents = (&latents + (v * (w[1] - w[0]))?)?;
        }
        Ok(latents)
    }
}

/// One denoiser fleet and a controller over it.
struct Stack {
    _denoisers: Vec<Service>,
    _controller: Service,
    client: CacheControllerClient<Channel>,
    metrics_port: u16,
    /// Each denoiser's `/metrics` port.
    denoiser_metrics_ports: Vec<u16>,
}

impl Stack {
    /// Seconds the denoisers have spent inside `teaserve.v1.Denoiser` calls so far (the sum of
    /// their server-side latency histograms): what is left of a generation's wall time is the
    /// split's own cost (transport, scheduling, the controller).
    fn denoiser_busy_s(&self) -> anyhow::Result<f64> {
        let mut total = 0.0;
        for port in &self.denoiser_metrics_ports {
            total += seconds_in_denoiser_calls(&scrape(*port)?);
        }
        Ok(total)
    }
}

/// The sum of a denoiser's server-side latency histograms over its `teaserve.v1.Denoiser`
/// methods (every status), from its Prometheus text; health and reflection calls are left out.
fn seconds_in_denoiser_calls(metrics: &str) -> f64 {
    metric_sum(
        metrics,
        "teaserve_grpc_server_latency_seconds_sum{method=\"teaserve.v1.Denoiser/",
    )
}

/// How the controller moves tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `--resident-tensors false`: every call carries everything.
    Wire,
    /// The default: large tensors stay on the denoiser.
    Resident,
}

impl Mode {
    const BOTH: [Mode; 2] = [Mode::Wire, Mode::Resident];

    fn name(self) -> &'static str {
        match self {
            Mode::Wire => "wire",
            Mode::Resident => "resident",
        }
    }

    fn controller_args(self) -> &'static [&'static str] {
        match self {
            Mode::Wire => &["--resident-tensors", "false"],
            Mode::Resident => &[],
        }
    }
}

async fn stack(
    model_dir: Option<&Path>,
    model_type: &str,
    denoisers: usize,
    envs: &[(&str, &str)],
) -> anyhow::Result<Stack> {
    stack_with(model_dir, model_type, denoisers, envs, Mode::Resident, &[]).await
}

async fn stack_with(
    model_dir: Option<&Path>,
    model_type: &str,
    denoisers: usize,
    envs: &[(&str, &str)],
    mode: Mode,
    denoiser_args: &[&str],
) -> anyhow::Result<Stack> {
    let (denoiser_bin, controller_bin) = sibling_binaries()?;
    let mut fleet = Vec::new();
    let mut flags: Vec<String> = Vec::new();
    let mut denoiser_metrics_ports = Vec::new();
    for _ in 0..denoisers {
        let dir = model_dir.map(|d| d.to_string_lossy().into_owned());
        let port = free_port()?;
        denoiser_metrics_ports.push(port);
        let listen = format!("127.0.0.1:{port}");
        let mut args: Vec<&str> = denoiser_args.to_vec();
        args.extend(["--metrics-listen", listen.as_str()]);
        if let Some(d) = &dir {
            args.extend(["--model", d.as_str()]);
        }
        let (svc, addr) = start(&denoiser_bin, &args, envs, "denoiser listening")?;
        fleet.push(svc);
        flags.push("--denoiser".into());
        flags.push(format!("http://{addr}"));
    }
    let metrics_port = free_port()?;
    let metrics = format!("127.0.0.1:{metrics_port}");
    flags.extend(["--metrics-listen".into(), metrics]);
    flags.extend(mode.controller_args().iter().map(|a| a.to_string()));
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (controller, addr) = start(&controller_bin, &args, &[], "cache-controller listening")?;
    let mut client = connect(&addr).await?;
    // Ready when every denoiser is described as serving the model.
    wait_until_served(
        &mut client,
        model_type,
        denoisers,
        std::time::Duration::from_secs(120),
    )
    .await?;
    Ok(Stack {
        _denoisers: fleet,
        _controller: controller,
        client,
        metrics_port,
        denoiser_metrics_ports,
    })
}

/// What one generation gave.
struct Run {
    latents: Tensor,
    png: Vec<u8>,
    computed: u32,
    wall_ms: f64,
}

async fn generate(
    client: &mut CacheControllerClient<Channel>,
    req: v1::GenerateRequest,
) -> anyhow::Result<Run> {
    let started = Instant::now();
    let mut stream = client
        .generate(req)
        .await
        .map_err(|s| status_error("Generate", &s))?
        .into_inner();
    while let Some(ev) = stream.next().await {
        if let Some(generate_event::Event::Result(r)) =
            ev.map_err(|s| status_error("Generate", &s))?.event
        {
            let latents = r.latents.context("result without latents")?;
            return Ok(Run {
                latents: decode_tensor(&latents, &Device::Cpu, usize::MAX)?
                    .to_dtype(CDType::F32)?,
                png: r.image_png.to_vec(),
                computed: r.computed_steps,
                wall_ms: started.elapsed().as_secs_f64() * 1e3,
            });
        }
    }
    bail!("Generate ended without a result")
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => 0.5 * (xs[n / 2 - 1] + xs[n / 2]),
    }
}

/// The lower and upper quartiles (nearest rank): the middle half of per-pair ratios, so the
/// report shows how much the host moved between pairs.
fn quartiles(xs: &[f64]) -> (f64, f64) {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let i = (q * (xs.len().max(1) - 1) as f64).round() as usize;
        xs.get(i).copied().unwrap_or(f64::NAN)
    };
    (at(0.25), at(0.75))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// PSNR of two 8-bit images, dB.
pub fn psnr_png(a: &[u8], b: &[u8]) -> anyhow::Result<f64> {
    let a = image::load_from_memory(a)?.to_rgb8().into_raw();
    let b = image::load_from_memory(b)?.to_rgb8().into_raw();
    if a.len() != b.len() {
        bail!("images differ in size");
    }
    let mse = a
        .iter()
        .zip(&b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    Ok(if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64.powi(2) / mse).log10()
    })
}

fn text_request(
    caption: &str,
    steps: u32,
    adapter: &str,
    thresh: f64,
    wire: DType,
) -> v1::GenerateRequest {
    v1::GenerateRequest {
        model_class_name: "TinyFluxPipeline".into(),
        cache_adapter: adapter.into(),
        cache_config: Some(v1::CacheConfig {
            rel_l1_thresh: Some(thresh),
            ..Default::default()
        }),
        num_inference_steps: steps,
        prompt: caption.into(),
        seed: 0,
        wire_dtype: wire as i32,
        ..Default::default()
    }
}

/// One generation, with the milliseconds the denoisers spent inside its calls.
async fn generate_busy(s: &mut Stack, req: &v1::GenerateRequest) -> anyhow::Result<(Run, f64)> {
    let before = s.denoiser_busy_s()?;
    let run = generate(&mut s.client, req.clone()).await?;
    Ok((run, (s.denoiser_busy_s()? - before) * 1e3))
}

/// Times `repeats` runs of `req` and returns the median wall time and the last run.
async fn timed(
    client: &mut CacheControllerClient<Channel>,
    req: &v1::GenerateRequest,
    repeats: usize,
) -> anyhow::Result<(f64, Run)> {
    let mut walls = Vec::new();
    let mut last = None;
    for _ in 0..repeats.max(1) {
        let r = generate(client, req.clone()).await?;
        walls.push(r.wall_ms);
        last = Some(r);
    }
    Ok((median(walls), last.context("no run")?))
}

struct Report {
    md: String,
    summary: Vec<String>,
}

impl Report {
    fn line(&mut self, s: impl AsRef<str>) {
        self.md.push_str(s.as_ref());
        self.md.push('\n');
    }
}

async fn overhead(a: &BenchArgs, models: &[&BenchModel], r: &mut Report) -> anyhow::Result<()> {
    r.line("## Split overhead: services vs one in-process forward loop\n");
    r.line(format!(
        "Caching off, {} steps, same inputs and sigmas; {} pairs, spread over {INSTANCES} \
         fresh service stacks and in-process copies (each process instance computes a little \
         faster or slower than another for its whole life). Wire mode runs \
         Preprocess / RunBlocks / Postprocess over loopback gRPC; resident mode (the default) \
         one ResidentStep call per step with the tensors kept on the denoiser; both with the \
         controller's Euler step. The reference runs the same model's stages back to back in \
         this process, computing what does not change between steps (the text stream, the \
         pooled text projection, the rotary tables) once, as resident mode does; wire mode's \
         stateless stages recompute it every step. Each pair runs the reference and the services back to back, in \
         alternating order; the ratio is the median of the per-pair ratios, with the middle \
         half of them beside it (times are the medians). \"Outside the denoiser's calls\" is \
         the generation's wall time less the time the denoiser spent inside its calls (its \
         server-side latency metric): the split's own cost (transport, waking threads, the \
         controller), which the compute's run-to-run noise does not move.\n",
        a.steps,
        a.pairs.max(1)
    ));
    r.line("| model | mode | in-process | services | ratio (target <= 1.03x) | middle half of pairs | outside the denoiser's calls, per step (% of an in-process step) | max abs diff of latents |");
    r.line("|---|---|---|---|---|---|---|---|");
    for m0 in models {
        for mode in Mode::BOTH {
            let (mut split, mut mono, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            let mut outside = Vec::new();
            let mut diff = 0.0f32;
            let pairs = a.pairs.max(1);
            let per_instance = pairs.div_ceil(INSTANCES);
            let (mut s, mut m) = (None, None);
            for pair in 0..pairs {
                if pair % per_instance == 0 {
                    // A fresh service stack and a fresh in-process copy.
                    drop(s.take());
                    let fresh = m0.fresh_copy()?;
                    let mut stack =
                        stack_with(fresh.dir.as_deref(), fresh.model_type, 1, &[], mode, &[])
                            .await?;
                    let req = fresh.request(a.steps, "none", 0.2, DType::F32)?;
                    generate(&mut stack.client, req).await?; // warm-up
                    fresh.in_process(a.steps)?;
                    (s, m) = (Some(stack), Some(fresh));
                }
                let (Some(s), Some(m)) = (s.as_mut(), m.as_ref()) else {
                    bail!("no stack for pair {pair}");
                };
                let req = m.request(a.steps, "none", 0.2, DType::F32)?;
                let (want, in_process, (run, busy_ms)) = if pair % 2 == 0 {
                    let (want, ms) = m.timed_in_process(a.steps)?;
                    (want, ms, generate_busy(s, &req).await?)
                } else {
                    let run = generate_busy(s, &req).await?;
                    let (want, ms) = m.timed_in_process(a.steps)?;
                    (want, ms, run)
                };
                mono.push(in_process);
                split.push(run.wall_ms);
                ratios.push(run.wall_ms / in_process);
                outside.push((run.wall_ms - busy_ms) / f64::from(a.steps));
                diff = diff.max(max_abs_diff(&run.latents, &want)?);
            }
            let (lo, hi) = quartiles(&ratios);
            let (split, mono, ratio) = (median(split), median(mono), median(ratios));
            let outside = median(outside);
            let step = mono / f64::from(a.steps);
            r.line(format!(
                "| {} | {} | {mono:.1} ms ({step:.2} ms/step) | {split:.1} ms | **{ratio:.3}x** | {lo:.3}-{hi:.3}x | {outside:.2} ms ({:.1}%) | {diff:.1e} |",
                m0.name,
                mode.name(),
                100.0 * outside / step,
            ));
            r.summary.push(format!(
                "split overhead, {}, {}: {ratio:.3}x (middle half of pairs {lo:.3}-{hi:.3}x); \
                 outside the denoiser's calls {outside:.2} ms per step",
                m0.name,
                mode.name(),
            ));
        }
    }
    r.line("");
    Ok(())
}

async fn cache(
    a: &BenchArgs,
    synthetic: &BenchModel,
    r: &mut Report,
) -> anyhow::Result<Vec<(f64, f64, f64)>> {
    let captions = &CAPTIONS[..a.captions.clamp(1, CAPTIONS.len())];
    let mut s = stack(None, "TinyFluxPipeline", 1, &[]).await?;
    generate(
        &mut s.client,
        text_request(captions[0], a.steps, "none", 0.2, DType::F32),
    )
    .await?;
    // Uncached baselines per caption.
    let mut base: Vec<(f64, Run)> = Vec::new();
    for c in captions {
        base.push(
            timed(
                &mut s.client,
                &text_request(c, a.steps, "none", 0.2, DType::F32),
                a.repeats,
            )
            .await?,
        );
    }
    r.line("## TeaCache speed and quality (embedded model, text to image)\n");
    r.line(format!(
        "{} steps, {} captions, seed 0; wall time end to end (prompt encoding, {} steps, \
         decoding) from the client, median of {} runs per caption; speedup = uncached / cached \
         wall time summed over captions; ideal = N / computed steps; efficiency = speedup / \
         ideal; PSNR of the cached picture against the uncached one (mean, min). Reference: \
         TeaCache's published FLUX speedups.\n",
        a.steps,
        captions.len(),
        a.steps,
        a.repeats
    ));
    r.line("| threshold | computed steps (mean) | speedup | ideal | efficiency | PSNR mean | PSNR min | reference speedup |");
    r.line("|---|---|---|---|---|---|---|---|");
    let base_total: f64 = base.iter().map(|(w, _)| w).sum();
    let mut points = Vec::new();
    for &t in &THRESHOLDS {
        let (mut total, mut computed, mut psnrs) = (0.0, 0.0, Vec::new());
        for (c, (_, off)) in captions.iter().zip(&base) {
            let (w, on) = timed(
                &mut s.client,
                &text_request(c, a.steps, "tea_cache", t, DType::F32),
                a.repeats,
            )
            .await?;
            total += w;
            computed += f64::from(on.computed);
            psnrs.push(psnr_png(&off.png, &on.png)?);
        }
        let n = captions.len() as f64;
        let computed = computed / n;
        let speedup = base_total / total;
        let ideal = f64::from(a.steps) / computed;
        let finite: Vec<f64> = psnrs.iter().copied().map(|p| p.min(99.0)).collect();
        let mean = finite.iter().sum::<f64>() / n;
        let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
        let reference = reference_speedup(t);
        r.line(format!(
            "| {t} | {computed:.1} / {} | **{speedup:.2}x** | {ideal:.2}x | {:.2} | {mean:.1} dB | {min:.1} dB | {reference} |",
            a.steps,
            speedup / ideal
        ));
        r.summary.push(format!(
            "TeaCache {t}: {computed:.1}/{} computed, speedup {speedup:.2}x (ideal {ideal:.2}x, efficiency {:.2}), PSNR {mean:.1} dB",
            a.steps,
            speedup / ideal
        ));
        points.push((t, speedup, mean));
    }
    r.line("");

    // Cache efficiency where a step costs tens of milliseconds, in both modes.
    r.line(format!(
        "Cache efficiency on the {}, {} steps; each pair runs uncached and cached back to \
         back, in alternating order, speedup = the median of the {} per-pair ratios. Its weights are random, so \
         TeaCache runs with identity rescaling (coefficients [0, 0, 0, 1, 0]: the raw input \
         rel-L1 is accumulated); the decisions are arbitrary, the point is how much of what a \
         skipped step should save arrives:\n",
        synthetic.name,
        a.steps,
        a.pairs.max(1)
    ));
    r.line("| mode | threshold | computed | speedup | ideal | efficiency (target >= 0.97) | middle half of pairs |");
    r.line("|---|---|---|---|---|---|---|");
    for mode in Mode::BOTH {
        let mut s = stack_with(
            synthetic.dir.as_deref(),
            synthetic.model_type,
            1,
            &[],
            mode,
            &[],
        )
        .await?;
        let off_req = synthetic.request(a.steps, "none", 0.2, DType::F32)?;
        generate(&mut s.client, off_req.clone()).await?;
        for t in [0.2, 0.4, 0.8] {
            let req = synthetic.request_with(
                a.steps,
                "tea_cache",
                t,
                vec![0.0, 0.0, 0.0, 1.0, 0.0],
                DType::F32,
            )?;
            // Cached and uncached back to back per pair: drift of the machine cancels.
            let (mut speedups, mut computed) = (Vec::new(), 0);
            for pair in 0..a.pairs.max(1) {
                let (off, on) = if pair % 2 == 0 {
                    let off = generate(&mut s.client, off_req.clone()).await?;
                    (off, generate(&mut s.client, req.clone()).await?)
                } else {
                    let on = generate(&mut s.client, req.clone()).await?;
                    (generate(&mut s.client, off_req.clone()).await?, on)
                };
                speedups.push(off.wall_ms / on.wall_ms);
                computed = on.computed;
            }
            let ideal = f64::from(a.steps) / f64::from(computed.max(1));
            let (lo, hi) = quartiles(&speedups);
            let (lo, hi) = (lo / ideal, hi / ideal);
            let speedup = median(speedups);
            r.line(format!(
                "| {} | {t} | {computed} / {} | {speedup:.2}x | {ideal:.2}x | **{:.3}** | {lo:.3}-{hi:.3} |",
                mode.name(),
                a.steps,
                speedup / ideal
            ));
            r.summary.push(format!(
                "cache efficiency, synthetic FLUX, {} at {t}: {:.3} ({speedup:.2}x of ideal \
                 {ideal:.2}x; middle half of pairs {lo:.3}-{hi:.3})",
                mode.name(),
                speedup / ideal
            ));
        }
    }
    r.line("");
    Ok(points)
}

async fn wire(a: &BenchArgs, synthetic: &BenchModel, r: &mut Report) -> anyhow::Result<()> {
    r.line("## Wire dtype: F32 vs BF16\n");
    r.line(format!(
        "Wire mode (`--resident-tensors false`), caching off, {} steps; tensor bytes exchanged with the denoiser per step (both \
         directions, from the controller's metrics), median wall time of {} runs, and the \
         quality of the BF16 result against F32.\n",
        a.steps, a.repeats
    ));
    r.line("| model | wire | bytes / step | wall | quality vs F32 |");
    r.line("|---|---|---|---|---|");
    let caption = CAPTIONS[0];
    for (name, dir, model_type) in [
        ("embedded TinyFlux", None, "TinyFluxPipeline"),
        (
            "synthetic FLUX",
            synthetic.dir.as_deref(),
            synthetic.model_type,
        ),
    ] {
        let mut s = stack_with(dir, model_type, 1, &[], Mode::Wire, &[]).await?;
        let mut f32_run: Option<Run> = None;
        for wire in [DType::F32, DType::Bf16] {
            let req = match dir {
                None => text_request(caption, a.steps, "none", 0.2, wire),
                Some(_) => synthetic.request(a.steps, "none", 0.2, wire)?,
            };
            generate(&mut s.client, req.clone()).await?;
            let bytes = |text: &str| {
                metric(
                    text,
                    "teaserve_controller_tensor_bytes_total{direction=\"to_denoiser\"}",
                )
                .unwrap_or(0.0)
                    + metric(
                        text,
                        "teaserve_controller_tensor_bytes_total{direction=\"from_denoiser\"}",
                    )
                    .unwrap_or(0.0)
            };
            let before = bytes(&scrape(s.metrics_port)?);
            let (wall, run) = timed(&mut s.client, &req, a.repeats).await?;
            let after = bytes(&scrape(s.metrics_port)?);
            let per_step = (after - before) / (a.repeats.max(1) as f64 * f64::from(a.steps));
            let quality = match (&f32_run, dir) {
                (None, _) => "-".to_string(),
                (Some(f), None) => format!("PSNR {:.1} dB", psnr_png(&f.png, &run.png)?),
                (Some(f), Some(_)) => format!(
                    "max abs diff of latents {:.2e}",
                    max_abs_diff(&f.latents, &run.latents)?
                ),
            };
            r.line(format!(
                "| {name} | {wire:?} | {:.1} KiB | {wall:.1} ms | {quality} |",
                per_step / 1024.0
            ));
            r.summary.push(format!(
                "wire {wire:?}, {name}: {:.1} KiB/step, {wall:.1} ms, {quality}",
                per_step / 1024.0
            ));
            if wire == DType::F32 {
                f32_run = Some(run);
            }
        }
    }
    r.line("");
    Ok(())
}

async fn scaling(a: &BenchArgs, synthetic: &BenchModel, r: &mut Report) -> anyhow::Result<()> {
    let steps = a.steps.min(10);
    r.line("## Scaling: 1 vs 2 denoisers\n");
    r.line(format!(
        "{} generations of the {} ({steps} steps, caching off), {} at a time; every denoiser \
         computes on one thread (RAYON_NUM_THREADS=1), so a second denoiser is a second \
         worker, not more threads for the first.\n",
        a.scaling_generations, synthetic.name, a.concurrency
    ));
    r.line("| denoisers | wall | generations / s | vs 1 denoiser (target >= 1.8x) |");
    r.line("|---|---|---|---|");
    let mut first = None;
    for n in [1usize, 2] {
        let s = stack(
            synthetic.dir.as_deref(),
            synthetic.model_type,
            n,
            &[("RAYON_NUM_THREADS", "1")],
        )
        .await?;
        let req = synthetic.request(steps, "none", 0.2, DType::F32)?;
        generate(&mut s.client.clone(), req.clone()).await?;
        let started = Instant::now();
        let mut left = a.scaling_generations;
        while left > 0 {
            let wave = left.min(a.concurrency.max(1));
            let runs = (0..wave).map(|_| {
                let mut c = s.client.clone();
                let req = req.clone();
                async move { generate(&mut c, req).await }
            });
            for run in futures::future::join_all(runs).await {
                run?;
            }
            left -= wave;
        }
        let wall = started.elapsed().as_secs_f64();
        let rate = a.scaling_generations as f64 / wall;
        let ratio = first.map_or(1.0, |f: f64| rate / f);
        first.get_or_insert(rate);
        r.line(format!(
            "| {n} | {:.2} s | {rate:.2} | **{ratio:.2}x** |",
            wall
        ));
        if n == 2 {
            r.summary
                .push(format!("scaling, 2 vs 1 denoisers: {ratio:.2}x throughput"));
        }
    }
    r.line("");
    Ok(())
}

/// The synthetic FLUX at real widths (FLUX.1-dev's 3072 hidden, 24 heads of 128, T5's 4096
/// text width, CLIP's 768 pooled width) with one block of each kind.
fn real_width_config() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": false,
        "axes_dims_rope": [16, 56, 56],
    })
}

/// Tensor bytes one step moves per CFG branch, from the shapes: `n` image tokens of `c`
/// latent channels, `t` text tokens of width `text`, `pooled` wide pooled text (0: none),
/// transformer width `d`, `e` bytes per element on the wire (positions and the timestep in
/// f32). Returns (wire mode, resident mode): wire mode's calls are the same whether the blocks
/// run or caching is off (Preprocess returns the indicator either way); resident mode moves
/// the latents in and the prediction out (and scalars), the conditioning once per session.
fn protocol_bytes(n: u64, t: u64, c: u64, text: u64, pooled: u64, d: u64, e: u64) -> (u64, u64) {
    let ids = (n + t) * 3 * 4;
    let latents = n * c * e;
    let inputs = latents + t * text * e + pooled * e + ids + 4;
    let context = d * 4 + ids; // temb (full precision) and the positions
    let streams = (n + t) * d * e;
    let preprocess = inputs + n * d * e + streams + context;
    let run_blocks = 2 * streams + context;
    let postprocess = n * d * e + context + latents;
    let wire = preprocess + run_blocks + postprocess;
    let resident = latents + 4 + latents;
    (wire, resident)
}

/// TeaCache threshold of the real-width section (identity rescaling; the random model's
/// indicator moves a lot per step, so a threshold that skips is high).
const REAL_WIDTH_THRESHOLD: f64 = 1.5;

async fn real_width(a: &BenchArgs, scratch: &Path, r: &mut Report) -> anyhow::Result<()> {
    let steps = 8u32;
    let dir = scratch.join("real-width-flux");
    let m = BenchModel::synthetic_with(
        &dir,
        real_width_config(),
        4,
        16,
        "synthetic FLUX at real widths (3072 wide, 24 heads of 128, 1+1 blocks, 16 image + 16 text tokens, random weights)",
    )?;
    r.line("## The split at real widths: wire vs resident\n");
    r.line(format!(
        "The {}, caching off and TeaCache (identity rescaling, threshold 1.5), {steps} steps, \
         F32 on the wire, median of {} runs. Bytes per step are the tensor payloads the \
         controller exchanged with the denoiser (its metrics), over the whole generation \
         (resident mode's conditioning, sent once, included); overhead is against the \
         in-process forward loop.\n",
        m.name, a.repeats
    ));
    r.line("| mode | caching | bytes / step | resident / wire | wall / step | overhead vs in-process |");
    r.line("|---|---|---|---|---|---|");
    m.in_process(steps)?;
    let mut mono = Vec::new();
    for _ in 0..a.repeats.max(1) {
        let t = Instant::now();
        m.in_process(steps)?;
        mono.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mono = median(mono);
    let mut wire_bytes = [0.0f64; 2];
    for mode in Mode::BOTH {
        let mut s = stack_with(m.dir.as_deref(), m.model_type, 1, &[], mode, &[]).await?;
        for (k, (adapter, label)) in [("none", "off"), ("tea_cache", "TeaCache 1.5")]
            .into_iter()
            .enumerate()
        {
            let req = m.request_with(
                steps,
                adapter,
                REAL_WIDTH_THRESHOLD,
                vec![0.0, 0.0, 0.0, 1.0, 0.0],
                DType::F32,
            )?;
            generate(&mut s.client, req.clone()).await?;
            let before = traffic(s.metrics_port)?;
            let (wall, _) = timed(&mut s.client, &req, a.repeats).await?;
            let per_step =
                (traffic(s.metrics_port)? - before) / (a.repeats.max(1) as f64 * f64::from(steps));
            let ratio = match mode {
                Mode::Wire => {
                    wire_bytes[k] = per_step;
                    "-".to_string()
                }
                Mode::Resident => format!("**{:.2}%**", 100.0 * per_step / wire_bytes[k]),
            };
            r.line(format!(
                "| {} | {label} | {:.1} KiB | {ratio} | {:.1} ms | {:.3}x |",
                mode.name(),
                per_step / 1024.0,
                wall / f64::from(steps),
                wall / mono
            ));
            r.summary.push(format!(
                "real width, {}, caching {label}: {:.1} KiB/step{}, overhead {:.3}x",
                mode.name(),
                per_step / 1024.0,
                if mode == Mode::Resident {
                    format!(" ({ratio} of wire)").replace("**", "")
                } else {
                    String::new()
                },
                wall / mono
            ));
        }
    }
    r.line("");

    // Recovery: every call lands on a replica that has nothing (a 1-byte store evicts all),
    // so every step is a miss and a rebuild.
    let req = m.request_with(
        steps,
        "tea_cache",
        REAL_WIDTH_THRESHOLD,
        vec![0.0, 0.0, 0.0, 1.0, 0.0],
        DType::F32,
    )?;
    let mut walls = Vec::new();
    for (label, args) in [
        ("kept", &[][..]),
        ("missed every step", &["--resident-bytes", "1"][..]),
    ] {
        let mut s =
            stack_with(m.dir.as_deref(), m.model_type, 1, &[], Mode::Resident, args).await?;
        generate(&mut s.client, req.clone()).await?;
        let (wall, run) = timed(&mut s.client, &req, a.repeats).await?;
        walls.push((label, wall, run.computed));
    }
    r.line(
        "Recovery cost: the same TeaCache generation with the session's tensors kept, and on a \
            denoiser whose store keeps nothing (every call misses; the controller resends it with \
            the latents to rebuild, and the denoiser recomputes the previous indicator and, on \
            reused steps, the residual):\n",
    );
    r.line("| resident tensors | computed | wall / step | vs kept |");
    r.line("|---|---|---|---|");
    let kept = walls.first().map_or(f64::NAN, |w| w.1);
    for (label, wall, computed) in &walls {
        r.line(format!(
            "| {label} | {computed} / {steps} | {:.1} ms | {:.2}x |",
            wall / f64::from(steps),
            wall / kept
        ));
    }
    if let Some((_, wall, _)) = walls.get(1) {
        r.summary.push(format!(
            "recovery: a generation missing its resident tensors every step takes {:.2}x the kept one",
            wall / kept
        ));
    }
    r.line("");

    // What the protocol would move at real sizes, per CFG branch and step (BF16 on the wire,
    // as those models compute in BF16).
    r.line(
        "Bytes per step and CFG branch the protocol moves at real sizes, computed from the \
            shapes (BF16 on the wire, the default for BF16 models; positions, the timestep and \
            `temb` in F32; text at its longest, 512 tokens):\n",
    );
    r.line("| model | image tokens | wire mode | resident mode | resident / wire |");
    r.line("|---|---|---|---|---|");
    for (name, n, text, pooled) in [
        ("FLUX.1-dev 1024x1024", 4096u64, 4096u64, 768u64),
        ("Qwen-Image 1328x1328", 83 * 83, 3584, 0),
    ] {
        let (wire, resident) = protocol_bytes(n, 512, 64, text, pooled, 3072, 2);
        r.line(format!(
            "| {name} | {n} | {:.1} MB | {:.2} MB | {:.2}% |",
            wire as f64 / 1e6,
            resident as f64 / 1e6,
            100.0 * resident as f64 / wire as f64
        ));
        r.summary.push(format!(
            "{name}: {:.1} MB/step/branch on the wire vs {:.2} MB resident",
            wire as f64 / 1e6,
            resident as f64 / 1e6
        ));
    }
    r.line("");
    Ok(())
}

/// Tensor bytes the controller exchanged with denoisers so far (both directions).
fn traffic(port: u16) -> anyhow::Result<f64> {
    let text = scrape(port)?;
    Ok(["to_denoiser", "from_denoiser"]
        .iter()
        .map(|d| {
            metric(
                &text,
                &format!("teaserve_controller_tensor_bytes_total{{direction=\"{d}\"}}"),
            )
            .unwrap_or(0.0)
        })
        .sum())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}

/// Runs the benchmark.
pub async fn bench(a: &BenchArgs) -> anyhow::Result<()> {
    sibling_binaries()?;
    std::fs::create_dir_all(&a.out_dir)
        .with_context(|| format!("creating {}", a.out_dir.display()))?;
    let scratch = tempfile_dir()?;
    let embedded = BenchModel::embedded()?;
    let synthetic = BenchModel::synthetic(&scratch.join("synthetic-flux"))?;
    let started = Instant::now();
    let mut r = Report {
        md: String::new(),
        summary: Vec::new(),
    };
    r.line("# teaserve benchmarks\n");
    r.line(format!(
        "Measured by `teaserve bench` on {} (CPU, release build); every ratio below comes \
         from runs taken side by side in one invocation. Reproduce: `cargo build --release \
         --bins && target/release/teaserve bench`.\n",
        machine()
    ));
    let mut points = Vec::new();
    let mut policy_points = Vec::new();
    let mut plot = None;
    for section in &a.sections {
        let mut err = std::io::stderr().lock();
        writeln!(err, "bench: {section:?} ...")?;
        drop(err);
        match section {
            Section::Overhead => overhead(a, &[&embedded, &synthetic], &mut r).await?,
            Section::Cache => points = cache(a, &synthetic, &mut r).await?,
            Section::Wire => wire(a, &synthetic, &mut r).await?,
            Section::Scaling => scaling(a, &synthetic, &mut r).await?,
            Section::RealWidth => real_width(a, &scratch, &mut r).await?,
            Section::Policies => policy_points = policies::policies(a, &a.fixtures, &mut r).await?,
        }
    }
    let policy_plot = policy_chart(a, &policy_points, &mut r)?;
    if !points.is_empty() {
        let png = Output::new(a.out_dir.join("threshold.png"));
        let reference: Vec<(f64, f64)> = REFERENCE.to_vec();
        line_chart(
            png.path(),
            "TeaCache on the embedded model",
            "threshold",
            &[
                Series::left(
                    "speedup (x)",
                    [40, 90, 200],
                    points.iter().map(|p| (p.0, p.1)).collect(),
                ),
                Series::left("reference speedup (x)", [150, 150, 150], reference),
                Series::right(
                    "PSNR (dB)",
                    [200, 50, 40],
                    points.iter().map(|p| (p.0, p.2)).collect(),
                ),
            ],
        )?;
        r.line("![speedup and PSNR against threshold](threshold.png)\n");
        plot = Some(png);
    }
    let mut summary = String::new();
    for s in &r.summary {
        let _ = writeln!(summary, "- {s}");
    }
    r.line(format!(
        "## Summary\n\n{summary}\nTotal bench time: {:.0} s.",
        started.elapsed().as_secs_f64()
    ));
    let report = Output::new(a.out_dir.join("report.md"));
    report.write(r.md.as_bytes())?;
    let _ = std::fs::remove_dir_all(&scratch);
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", r.md)?;
    let sections: Vec<String> = a
        .sections
        .iter()
        .map(|s| format!("{s:?}").to_lowercase())
        .collect();
    writeln!(
        out,
        "{}",
        report.wrote(&format!("(sections: {})", sections.join(", ")))
    )?;
    for png in plot.iter().chain(&policy_plot) {
        writeln!(out, "{}", png.wrote(&png_file_detail(png.path())))?;
    }
    Ok(())
}

/// The policy comparison's plot (speedup against PSNR, one colour per policy), if it ran.
fn policy_chart(
    a: &BenchArgs,
    points: &[policies::Point],
    r: &mut Report,
) -> anyhow::Result<Option<Output>> {
    if points.is_empty() {
        return Ok(None);
    }
    let png = Output::new(a.out_dir.join("policies.png"));
    let series: Vec<Series> = [
        ("tea_cache", "TeaCache", [40, 90, 200]),
        ("first_block_cache", "FirstBlockCache", [200, 50, 40]),
        ("mag_cache", "MagCache", [40, 160, 60]),
        ("taylor_seer", "TaylorSeer", [150, 60, 170]),
    ]
    .into_iter()
    .map(|(policy, label, colour)| {
        Series::scatter(
            label,
            colour,
            points
                .iter()
                .filter(|p| p.policy == policy)
                .map(|p| (p.speedup, p.psnr))
                .collect(),
        )
    })
    .collect();
    line_chart(
        png.path(),
        "Cache policies: PSNR (dB) against speedup",
        "speedup (x)",
        &series,
    )?;
    r.line("![PSNR against speedup per policy](policies.png)\n");
    Ok(Some(png))
}

/// A scratch folder for the synthetic model's files.
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("teaserve-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_figures_name_the_threshold_they_were_measured_at() {
        assert_eq!(reference_speedup(0.2), "1.50x (at 0.25)");
        assert_eq!(reference_speedup(0.4), "1.80x");
        assert_eq!(reference_speedup(0.8), "2.25x");
        assert_eq!(reference_speedup(0.1), "-");
    }

    #[test]
    fn time_in_denoiser_calls_sums_the_denoiser_methods_only() {
        let text = "\
# TYPE teaserve_grpc_server_latency_seconds histogram
teaserve_grpc_server_latency_seconds_sum{method=\"teaserve.v1.Denoiser/ResidentStep\",status=\"Ok\"} 1.25
teaserve_grpc_server_latency_seconds_count{method=\"teaserve.v1.Denoiser/ResidentStep\",status=\"Ok\"} 20
teaserve_grpc_server_latency_seconds_sum{method=\"teaserve.v1.Denoiser/Describe\",status=\"Unavailable\"} 0.5
teaserve_grpc_server_latency_seconds_sum{method=\"grpc.health.v1.Health/Check\",status=\"Ok\"} 9
";
        assert!((seconds_in_denoiser_calls(text) - 1.75).abs() < 1e-12);
        assert_eq!(seconds_in_denoiser_calls(""), 0.0);
    }
}
