//! `denoiser`: teaserve's compute worker binary.

use anyhow::Context as _;
use clap::Parser;
use teaserve_denoiser::config::Args;

/// mimalloc instead of glibc malloc: glibc's per-thread arenas returned freed tensor memory
/// to the OS after every step, so each step page-faulted it back in (measured on the denoiser's
/// compute thread: ~13K faults/s, several per cent of a step). Every teaserve binary uses the
/// same allocator, so `teaserve bench` compares like with like.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Before the runtime starts any thread.
    teaserve_denoiser::config::pin_compute_threads(args.compute_threads);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let telemetry = teaserve_telemetry::init(
        args.log_format,
        &teaserve_telemetry::OtelConfig::from_env("denoiser"),
    )?;
    let files = args.model_files().context("resolving --model")?;
    let source = files.source.clone();
    let load = args.loader(files).context("configuring the model")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding --listen {}", args.listen))?;
    let result = teaserve_denoiser::server::serve(
        listener,
        load,
        args.serve_options(source),
        teaserve_proto::serving::shutdown_signal(),
    )
    .await
    .context("denoiser stopped with an error");
    telemetry.shutdown().await;
    result
}
