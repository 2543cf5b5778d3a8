//! `teaserve demo`: the whole system on loopback in one command. Starts the `denoiser` (on
//! its embedded model) and the `cache-controller` next to this binary as child processes,
//! generates the same prompt and seed without caching and with TeaCache, writes both PNGs and
//! prints computed steps, wall time, speedup and PSNR.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::output::{Output, png_detail};
use crate::rpc::status_error;
use crate::spawn::{connect, sibling_binaries, start, wait_until_served};
use clap::Args as ClapArgs;
use teaserve_proto::v1::cache_controller_client::CacheControllerClient;
use teaserve_proto::v1::{self, generate_event};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

/// Options of `teaserve demo`.
#[derive(Debug, ClapArgs)]
pub struct DemoArgs {
    /// What to draw (the embedded model knows 8 colours, 3 shapes, 5 positions).
    #[arg(
        long,
        env = "TEASERVE_PROMPT",
        default_value = "a red circle on a blue background"
    )]
    pub prompt: String,
    /// Noise seed.
    #[arg(
        long,
        env = "TEASERVE_SEED",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub seed: u64,
    /// Denoising steps.
    #[arg(
        long,
        env = "TEASERVE_STEPS",
        visible_alias = "num-inference-steps",
        default_value_t = 20,
        allow_negative_numbers = true
    )]
    pub steps: u32,
    /// TeaCache threshold of the cached run.
    #[arg(
        long,
        env = "TEASERVE_REL_L1_THRESH",
        visible_alias = "threshold",
        default_value_t = 0.2,
        allow_negative_numbers = true
    )]
    pub rel_l1_thresh: f64,
    /// Folder for demo-uncached.png and demo-teacache.png.
    #[arg(long, env = "TEASERVE_DEMO_OUT_DIR", default_value = ".")]
    pub out_dir: PathBuf,
}

struct Outcome {
    png: Vec<u8>,
    computed: u32,
    total: u32,
    wall_ms: f64,
}

async fn run(
    client: &mut CacheControllerClient<Channel>,
    a: &DemoArgs,
    adapter: &str,
) -> anyhow::Result<Outcome> {
    let req = v1::GenerateRequest {
        model_class_name: "TinyFluxPipeline".into(),
        cache_adapter: adapter.into(),
        cache_config: Some(v1::CacheConfig {
            rel_l1_thresh: Some(a.rel_l1_thresh),
            ..Default::default()
        }),
        num_inference_steps: a.steps,
        prompt: a.prompt.clone(),
        seed: a.seed,
        ..Default::default()
    };
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
            return Ok(Outcome {
                png: r.image_png.to_vec(),
                computed: r.computed_steps,
                total: r.computed_steps + r.reused_steps,
                wall_ms: started.elapsed().as_secs_f64() * 1e3,
            });
        }
    }
    bail!("the controller ended the stream without a result")
}

/// Runs the demo.
pub async fn demo(a: &DemoArgs) -> anyhow::Result<()> {
    let (denoiser, controller_bin) = sibling_binaries()?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "starting the denoiser (embedded TinyFluxPipeline) and the cache-controller on loopback ..."
    )?;
    let (_d, d_addr) = start(&denoiser, &[], &[], "denoiser listening")?;
    let d_url = format!("http://{d_addr}");
    let (_c, c_addr) = start(
        &controller_bin,
        &["--denoiser", &d_url],
        &[],
        "cache-controller listening",
    )?;
    let mut client = connect(&c_addr).await?;
    // The controller discovers the denoiser's model shortly after both listen.
    wait_until_served(&mut client, "TinyFluxPipeline", 1, Duration::from_secs(30)).await?;
    let uncached = run(&mut client, a, "none").await?;
    let cached = run(&mut client, a, "tea_cache").await?;
    std::fs::create_dir_all(&a.out_dir)
        .with_context(|| format!("creating {}", a.out_dir.display()))?;
    let (p_off, p_on) = (
        Output::new(a.out_dir.join("demo-uncached.png")),
        Output::new(a.out_dir.join("demo-teacache.png")),
    );
    p_off.write(&uncached.png)?;
    p_on.write(&cached.png)?;
    let psnr = crate::bench::psnr_png(&uncached.png, &cached.png)?;
    writeln!(
        out,
        "\nprompt: {:?}, seed {}, {} steps\n",
        a.prompt, a.seed, a.steps
    )?;
    writeln!(
        out,
        "| run | computed steps | wall time | speedup | PSNR vs uncached |"
    )?;
    writeln!(out, "|---|---|---|---|---|")?;
    writeln!(
        out,
        "| uncached | {}/{} | {:.0} ms | 1.00x | - |",
        uncached.computed, uncached.total, uncached.wall_ms
    )?;
    writeln!(
        out,
        "| TeaCache {} | {}/{} | {:.0} ms | {:.2}x | {psnr:.1} dB |",
        a.rel_l1_thresh,
        cached.computed,
        cached.total,
        cached.wall_ms,
        uncached.wall_ms / cached.wall_ms
    )?;
    writeln!(out)?;
    writeln!(out, "{}", p_off.wrote(&png_detail(&uncached.png)))?;
    writeln!(out, "{}", p_on.wrote(&png_detail(&cached.png)))?;
    Ok(())
}
