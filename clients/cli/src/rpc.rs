//! Talking to a cache-controller: the `--controller` flag (scheme-less addresses get
//! `http://`), connecting, and turning gRPC statuses into messages that name the status code,
//! the server's message and, where the server is not a controller at all, what it is instead.

use anyhow::{Context as _, bail};
use clap::Args as ClapArgs;
use teaserve_proto::v1::DescribeRequest;
use teaserve_proto::v1::cache_controller_client::CacheControllerClient;
use teaserve_proto::v1::denoiser_client::DenoiserClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::{Code, Status};

/// Where the cache-controller listens unless told otherwise.
pub const DEFAULT_CONTROLLER: &str = "http://127.0.0.1:50050";

/// How the commands that call a controller (`generate`, `models`, `calibrate`) reach it.
#[derive(Debug, Clone, ClapArgs)]
pub struct ControllerArgs {
    /// Cache-controller address: `http://host:port`, or `host:port` (http is assumed).
    #[arg(
        long,
        env = "TEASERVE_CONTROLLER",
        default_value = DEFAULT_CONTROLLER,
        value_parser = controller_url
    )]
    pub controller: String,
    /// Largest gRPC message sent or received, in bytes.
    #[arg(long, env = "TEASERVE_MAX_MESSAGE_BYTES", default_value_t = 512 << 20)]
    pub max_message_bytes: usize,
    /// Bearer token for a controller started with --auth-tokens(-file).
    #[arg(long, env = "TEASERVE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA that signed the controller's certificate (needed for https:// controllers).
    #[arg(long, env = "TEASERVE_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
}

/// Adds the bearer token, when one is set, to every call.
#[derive(Clone)]
pub struct Token(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

/// The controller client type: a channel with the token interceptor.
pub type Client = CacheControllerClient<InterceptedService<Channel, Token>>;

/// Normalises a controller address: trims it, prefixes `http://` when it has no scheme
/// (`127.0.0.1:50050`, `localhost:50050`), and refuses schemes other than http / https and
/// addresses that are not URLs.
pub fn controller_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty address; give host:port, e.g. 127.0.0.1:50050".into());
    }
    let url = match s.split_once("://") {
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("http") => s.to_string(),
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => s.to_string(),
        Some((scheme, _)) => {
            return Err(format!(
                "unsupported scheme '{scheme}://'; use host:port or http://host:port"
            ));
        }
        None => format!("http://{s}"),
    };
    match url.parse::<tonic::transport::Uri>() {
        Ok(uri) if uri.host().is_some() => Ok(url),
        Ok(_) => Err(format!(
            "'{s}' has no host; give host:port, e.g. 127.0.0.1:50050"
        )),
        Err(e) => Err(format!("'{s}' is not an address ({e}); give host:port")),
    }
}

/// A connected controller client, and the address it talks to (for error messages).
#[derive(Clone)]
pub struct Controller {
    /// The generated client, with the message limits and the token applied.
    pub client: Client,
    channel: Channel,
    /// The normalised address.
    pub url: String,
}

impl Controller {
    /// Connects to the controller named by `args`.
    pub async fn connect(args: &ControllerArgs) -> anyhow::Result<Self> {
        let mut endpoint = Channel::from_shared(args.controller.clone())
            .with_context(|| format!("--controller '{}' is not a valid URL", args.controller))?;
        let https = args.controller.starts_with("https://");
        match (&args.tls_ca, https) {
            (Some(ca), _) => {
                let pem = std::fs::read(ca)
                    .with_context(|| format!("reading --tls-ca {}", ca.display()))?;
                endpoint = endpoint
                    .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
                    .context("--tls-ca")?;
            }
            (None, true) => bail!(
                "--controller {} is https: give the CA that signed its certificate with \
                 --tls-ca (or TEASERVE_TLS_CA)",
                args.controller
            ),
            (None, false) => {}
        }
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to the controller at {}", args.controller))?;
        let token = match args.token.as_deref().map(str::trim) {
            Some(t) if !t.is_empty() => Some(
                format!("Bearer {t}")
                    .parse()
                    .context("--token must be printable ASCII")?,
            ),
            _ => None,
        };
        let client = CacheControllerClient::with_interceptor(channel.clone(), Token(token))
            .max_decoding_message_size(args.max_message_bytes)
            .max_encoding_message_size(args.max_message_bytes);
        Ok(Self {
            client,
            channel,
            url: args.controller.clone(),
        })
    }

    /// `status` of the controller RPC `rpc` as an error: `<rpc> failed: CODE: message`; an
    /// empty UNIMPLEMENTED (the server has no such service) says what the server is instead.
    pub async fn error(&self, rpc: &str, status: &Status) -> anyhow::Error {
        if status.code() == Code::Unimplemented && status.message().is_empty() {
            let what = self.identify().await;
            return anyhow::anyhow!(
                "{rpc} failed: UNIMPLEMENTED: the server at {} does not implement \
                 teaserve.v1.CacheController ({what}); point --controller (or \
                 TEASERVE_CONTROLLER) at the cache-controller, which listens on \
                 127.0.0.1:50050 by default",
                self.url
            );
        }
        status_error(rpc, status)
    }

    /// What the server at the address seems to be, for the UNIMPLEMENTED message.
    async fn identify(&self) -> String {
        let mut denoiser = DenoiserClient::new(self.channel.clone());
        let probe = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            denoiser.describe(DescribeRequest {}),
        )
        .await;
        match probe {
            Ok(Ok(d)) => format!(
                "it is a teaserve denoiser serving {}; denoisers listen on 127.0.0.1:50051 by default",
                d.into_inner().model_type
            ),
            Ok(Err(s)) if s.code() != Code::Unimplemented => {
                "it looks like a teaserve denoiser that is not ready yet".to_string()
            }
            _ => "it looks like a denoiser or another gRPC service".to_string(),
        }
    }
}

/// `status` as `<rpc> failed: CODE: message`.
pub fn status_error(rpc: &str, status: &Status) -> anyhow::Error {
    let message = if status.message().is_empty() {
        "(the server gave no message)"
    } else {
        status.message()
    };
    anyhow::anyhow!("{rpc} failed: {}: {message}", code_name(status.code()))
}

/// The canonical gRPC name of a status code, e.g. `INVALID_ARGUMENT`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_less_addresses_get_http() {
        assert_eq!(
            controller_url("127.0.0.1:50050").as_deref(),
            Ok("http://127.0.0.1:50050")
        );
        assert_eq!(
            controller_url(" localhost:50050 ").as_deref(),
            Ok("http://localhost:50050")
        );
        assert_eq!(
            controller_url("http://10.0.0.2:7000").as_deref(),
            Ok("http://10.0.0.2:7000")
        );
        assert_eq!(
            controller_url("HTTPS://ctl.example:443").as_deref(),
            Ok("HTTPS://ctl.example:443")
        );
    }

    #[test]
    fn bad_addresses_are_refused() {
        assert!(controller_url("").is_err());
        assert!(
            controller_url("grpc://127.0.0.1:50050")
                .err()
                .unwrap_or_default()
                .contains("unsupported scheme")
        );
        assert!(controller_url("http://").is_err());
        assert!(controller_url("a b:1").is_err());
    }

    #[test]
    fn status_messages_name_the_code() {
        let e = status_error("Generate", &Status::invalid_argument("rel_l1_thresh bad"));
        assert_eq!(
            e.to_string(),
            "Generate failed: INVALID_ARGUMENT: rel_l1_thresh bad"
        );
        let e = status_error("ListModels", &Status::unavailable(""));
        assert_eq!(
            e.to_string(),
            "ListModels failed: UNAVAILABLE: (the server gave no message)"
        );
    }
}
