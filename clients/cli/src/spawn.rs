//! Starting teaserve's own services as child processes (for `demo` and `bench`): the
//! `denoiser` and `cache-controller` binaries next to this one, on loopback ports they pick.

use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use teaserve_proto::v1::{self, cache_controller_client::CacheControllerClient};
use tonic::transport::Channel;

use crate::rpc::status_error;

/// A child service that is killed when dropped.
pub struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `denoiser` and `cache-controller` binaries next to this executable.
pub fn sibling_binaries() -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = std::env::current_exe()?
        .parent()
        .context("locating the teaserve binary's folder")?
        .to_path_buf();
    let (denoiser, controller) = (dir.join("denoiser"), dir.join("cache-controller"));
    for bin in [&denoiser, &controller] {
        if !bin.exists() {
            bail!(
                "{} not found; build all binaries first: cargo build --release --bins",
                bin.display()
            );
        }
    }
    Ok((denoiser, controller))
}

/// Starts `bin` with `args` (plus a loopback listen address and JSON logs) and `envs`, and
/// returns it with the address its `message` log line reports.
pub fn start(
    bin: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
    message: &str,
) -> anyhow::Result<(Service, String)> {
    let mut child = Command::new(bin)
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .env(
            "RUST_LOG",
            "warn,teaserve_denoiser=info,teaserve_controller=info",
        )
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let service = Service(child);
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let Some(line) = lines.next() else {
            bail!("{} exited before listening", bin.display());
        };
        let v: serde_json::Value = serde_json::from_str(&line?).unwrap_or_default();
        if v["fields"]["message"] == message
            && let Some(a) = v["fields"]["addr"].as_str()
        {
            break a
                .trim_start_matches("Some(")
                .trim_end_matches(')')
                .to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Ok((service, addr))
}

/// A controller client for `addr` (host:port), retrying the connection for up to 30 s.
pub async fn connect(addr: &str) -> anyhow::Result<CacheControllerClient<Channel>> {
    let channel = Channel::from_shared(format!("http://{addr}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let channel = loop {
        match channel.connect().await {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    Ok(CacheControllerClient::new(channel)
        .max_decoding_message_size(1 << 30)
        .max_encoding_message_size(1 << 30))
}

/// Waits until `denoisers` denoisers are described as serving `model_type` (ListModels).
pub async fn wait_until_served(
    client: &mut CacheControllerClient<Channel>,
    model_type: &str,
    denoisers: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let models = client
            .list_models(v1::ListModelsRequest {})
            .await
            .map_err(|s| status_error("ListModels", &s))?
            .into_inner()
            .models;
        let serving = models
            .iter()
            .find(|m| m.model_type == model_type)
            .map_or(0, |m| m.endpoints.len());
        if serving >= denoisers {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {serving} of {denoisers} denoisers came up serving {model_type}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A free loopback port (for `--metrics-listen`).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The Prometheus text a service serves on `127.0.0.1:port/metrics`.
pub fn scrape(port: u16) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// The value of the first sample whose line starts with `series` (name and labels).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(sample_value)
}

/// The sum of every sample whose line starts with `prefix` (e.g. a name and the start of its
/// labels, to add up a family over the label values that follow).
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(sample_value)
        .sum()
}

/// A Prometheus text sample line's value (its last field).
fn sample_value(line: &str) -> Option<f64> {
    line.rsplit(' ').next()?.parse().ok()
}
