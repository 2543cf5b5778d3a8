//! `denoiser`: teaserve's compute worker binary.

use anyhow::Context as _;
use clap::Parser;
use teaserve_denoiser::config::Args;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
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
