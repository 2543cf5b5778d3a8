//! `cache-controller`: teaserve's session owner and TeaCache decision maker.

use anyhow::Context as _;
use clap::Parser;
use teaserve_controller::config::Args;

/// mimalloc instead of glibc malloc: glibc's per-thread arenas returned freed tensor memory
/// to the OS after every step, so each step page-faulted it back in (measured on the denoiser's
/// compute thread: ~13K faults/s, several per cent of a step). Every teaserve binary uses the
/// same allocator, so `teaserve bench` compares like with like.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = teaserve_telemetry::init(
        args.log_format,
        &teaserve_telemetry::OtelConfig::from_env("cache-controller"),
    )?;
    let opts = args.serve_options().context("configuration")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding --listen {}", args.listen))?;
    let result = teaserve_controller::server::serve(
        listener,
        opts,
        teaserve_proto::serving::shutdown_signal(),
    )
    .await
    .context("cache-controller stopped with an error");
    telemetry.shutdown().await;
    result
}
