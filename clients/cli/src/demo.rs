//! `teaserve demo`: the whole system on loopback in one command. Starts the `denoiser` (on
//! its embedded model) and the `cache-controller` next to this binary as child processes,
//! generates the same prompt and seed without caching and with TeaCache, writes both PNGs and
//! prints computed steps, wall time, speedup and PSNR.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::spawn::{connect, sibling_binaries, start};
use clap::Args as ClapArgs;
use teaserve_proto::v1::cache_controller_client::CacheControllerClient;
use teaserve_proto::v1::{self, generate_event};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

/// Options of `teaserve demo`.
#[derive(Debug, ClapArgs)]
pub struct DemoArgs {
    /// What to draw (the embedded model knows 8 colours, 3 shapes, 5 positions).
    #[arg(long, default_value = "a red circle on a blue background")]
    prompt: String,
    /// Noise seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Denoising steps.
    #[arg(long, default_value_t = 20)]
    steps: u32,
    /// TeaCache threshold of the cached run.
    #[arg(long, default_value_t = 0.2)]
    threshold: f64,
    /// Folder for demo-uncached.png and demo-teacache.png.
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
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
            rel_l1_thresh: Some(a.threshold),
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
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    while let Some(ev) = stream.next().await {
        if let Some(generate_event::Event::Result(r)) =
            ev.map_err(|s| anyhow::anyhow!("{}", s.message()))?.event
        {
            return Ok(Outcome {
                png: r.image_png.to_vec(),
                computed: r.computed_steps,
                total: r.computed_steps + r.reused_steps,
                wall_ms: started.elapsed().as_secs_f64() * 1e3,
            });
        }
    }
    bail!("no result")
}

/// Runs the demo.
pub async fn demo(a: DemoArgs) -> anyhow::Result<()> {
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
    let deadline = Instant::now() + Duration::from_secs(30);
    // The denoiser answers UNAVAILABLE while its weights load; retry the first call briefly.
    let uncached = loop {
        match run(&mut client, &a, "none").await {
            Ok(o) => break o,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let cached = run(&mut client, &a, "tea_cache").await?;
    std::fs::create_dir_all(&a.out_dir)?;
    let (p_off, p_on) = (
        a.out_dir.join("demo-uncached.png"),
        a.out_dir.join("demo-teacache.png"),
    );
    std::fs::write(&p_off, &uncached.png)?;
    std::fs::write(&p_on, &cached.png)?;
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
        a.threshold,
        cached.computed,
        cached.total,
        cached.wall_ms,
        uncached.wall_ms / cached.wall_ms
    )?;
    writeln!(out, "\nwrote {} and {}", p_off.display(), p_on.display())?;
    Ok(())
}
