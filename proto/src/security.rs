//! Transport security and authentication both servers share: TLS (rustls) with optional
//! client-certificate verification (mutual TLS), and bearer tokens checked in constant time
//! by a tower layer. Health and reflection stay open so probes and tools keep working; every
//! other call needs a token when tokens are configured.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tower::{Layer, Service};

/// A security setting that cannot be used (unreadable file, half a key pair, empty tokens).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SecurityError(pub String);

fn read(path: &Path, what: &str) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|e| SecurityError(format!("{what} {}: {e}", path.display())))
}

/// TLS and token flags of a server (flattened into each service's flags).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServerSecurityArgs {
    /// PEM certificate chain to serve TLS with (with --tls-key); unset: plaintext h2c.
    #[arg(long, env = "TEASERVE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "TEASERVE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: require every client to present a certificate it signed (mutual TLS,
    /// e.g. so a denoiser accepts only its controllers). Needs --tls-cert.
    #[arg(long, env = "TEASERVE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// File of accepted bearer tokens, one per line (blank lines and `#` comments
    /// ignored). Set: every call except health and reflection needs
    /// `authorization: Bearer <token>`.
    #[arg(long, env = "TEASERVE_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,
    /// Accepted bearer tokens, comma-separated (added to --auth-tokens-file's).
    #[arg(
        long,
        env = "TEASERVE_AUTH_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub auth_tokens: Vec<String>,
}

impl ServerSecurityArgs {
    /// The TLS configuration, if TLS is on.
    pub fn tls(&self) -> Result<Option<ServerTlsConfig>, SecurityError> {
        let (cert, key) = match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => (c, k),
            (None, None) if self.tls_client_ca.is_some() => {
                return Err(SecurityError(
                    "--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)".into(),
                ));
            }
            (None, None) => return Ok(None),
            _ => {
                return Err(SecurityError(
                    "--tls-cert and --tls-key go together: give both or neither".into(),
                ));
            }
        };
        let identity = Identity::from_pem(read(cert, "--tls-cert")?, read(key, "--tls-key")?);
        let mut tls = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.tls_client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(read(ca, "--tls-client-ca")?));
        }
        Ok(Some(tls))
    }

    /// The accepted tokens, if token authentication is on.
    pub fn tokens(&self) -> Result<Option<Tokens>, SecurityError> {
        let mut tokens: Vec<String> = self
            .auth_tokens
            .iter()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        if let Some(path) = &self.auth_tokens_file {
            let text = String::from_utf8(read(path, "--auth-tokens-file")?).map_err(|_| {
                SecurityError(format!("--auth-tokens-file {}: not UTF-8", path.display()))
            })?;
            let listed: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect();
            if listed.is_empty() {
                return Err(SecurityError(format!(
                    "--auth-tokens-file {} lists no token",
                    path.display()
                )));
            }
            tokens.extend(listed);
        }
        Ok((!tokens.is_empty()).then(|| Tokens::new(tokens)))
    }
}

/// Accepted bearer tokens.
#[derive(Clone)]
pub struct Tokens(Arc<Vec<Vec<u8>>>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} accepted)", self.0.len())
    }
}

/// Equality whose time does not depend on where the inputs differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

impl Tokens {
    /// Accepts exactly `tokens`.
    pub fn new(tokens: Vec<String>) -> Self {
        Self(Arc::new(
            tokens.into_iter().map(String::into_bytes).collect(),
        ))
    }

    /// Whether `token` is accepted; every accepted token is compared, in constant time.
    pub fn accepts(&self, token: &[u8]) -> bool {
        self.0
            .iter()
            .fold(false, |found, t| found | ct_eq(t, token))
    }

    /// What a request's `authorization` header earns: `Ok` for an accepted bearer token,
    /// UNAUTHENTICATED without one, PERMISSION_DENIED for a token that is not accepted.
    #[allow(clippy::result_large_err)]
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<(), Status> {
        let Some(value) = authorization else {
            return Err(Status::unauthenticated(
                "this server needs a bearer token: send metadata `authorization: Bearer <token>`",
            ));
        };
        let token = value
            .strip_prefix(b"Bearer ")
            .or_else(|| value.strip_prefix(b"bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("the authorization metadata must be `Bearer <token>`")
            })?;
        if self.accepts(token) {
            Ok(())
        } else {
            Err(Status::permission_denied(
                "this bearer token is not allowed on this server",
            ))
        }
    }
}

/// Paths that stay open when tokens are required: health (probes) and reflection (tools).
fn open_path(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

/// Tower layer requiring an accepted bearer token on every call but health and reflection;
/// `None` lets everything through.
#[derive(Debug, Clone)]
pub struct BearerAuth(Option<Tokens>);

impl BearerAuth {
    /// A layer for `tokens` (`None`: authentication off).
    pub fn new(tokens: Option<Tokens>) -> Self {
        Self(tokens)
    }
}

impl<S> Layer<S> for BearerAuth {
    type Service = BearerAuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BearerAuthService {
            inner,
            tokens: self.0.clone(),
        }
    }
}

/// The service produced by [`BearerAuth`].
#[derive(Debug, Clone)]
pub struct BearerAuthService<S> {
    inner: S,
    tokens: Option<Tokens>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for BearerAuthService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        if let Some(tokens) = &self.tokens
            && !open_path(req.uri().path())
        {
            let header = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            if let Err(status) = tokens.check(header) {
                let resp = status.into_http::<ResBody>();
                return Box::pin(async move { Ok(resp) });
            }
        }
        Box::pin(self.inner.call(req))
    }
}

/// How the controller reaches its denoisers securely (flattened into the controller's flags).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DenoiserClientSecurityArgs {
    /// PEM CA bundle that signed the denoisers' certificates. Set: the controller talks TLS
    /// to every denoiser (`http://` endpoints and `dns:///` addresses are dialled as
    /// `https://`) and verifies them against it.
    #[arg(long, env = "TEASERVE_DENOISER_TLS_CA")]
    pub denoiser_tls_ca: Option<PathBuf>,
    /// PEM client certificate the controller presents to denoisers (mutual TLS; with
    /// --denoiser-tls-key).
    #[arg(long, env = "TEASERVE_DENOISER_TLS_CERT")]
    pub denoiser_tls_cert: Option<PathBuf>,
    /// PEM private key of --denoiser-tls-cert.
    #[arg(long, env = "TEASERVE_DENOISER_TLS_KEY")]
    pub denoiser_tls_key: Option<PathBuf>,
    /// Name to verify in the denoisers' certificates (default: the endpoint's host; set it
    /// when dialling addresses, e.g. `dns:///` targets resolve to IPs).
    #[arg(long, env = "TEASERVE_DENOISER_TLS_DOMAIN")]
    pub denoiser_tls_domain: Option<String>,
    /// Bearer token sent to denoisers that require one (their --auth-tokens-file).
    #[arg(long, env = "TEASERVE_DENOISER_TOKEN", hide_env_values = true)]
    pub denoiser_token: Option<String>,
}

/// What [`DenoiserClientSecurityArgs`] resolve to.
#[derive(Debug, Clone, Default)]
pub struct ClientSecurity {
    /// TLS towards denoisers, if on.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// `authorization` metadata value, if a token is set.
    pub authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl DenoiserClientSecurityArgs {
    /// Reads the files and checks the combination.
    pub fn resolve(&self) -> Result<ClientSecurity, SecurityError> {
        let client_side = self.denoiser_tls_cert.is_some()
            || self.denoiser_tls_key.is_some()
            || self.denoiser_tls_domain.is_some();
        if self.denoiser_tls_ca.is_none() && client_side {
            return Err(SecurityError(
                "--denoiser-tls-cert / --denoiser-tls-domain need --denoiser-tls-ca (the CA \
                 that signed the denoisers' certificates)"
                    .into(),
            ));
        }
        let identity = match (&self.denoiser_tls_cert, &self.denoiser_tls_key) {
            (Some(c), Some(k)) => Some(Identity::from_pem(
                read(c, "--denoiser-tls-cert")?,
                read(k, "--denoiser-tls-key")?,
            )),
            (None, None) => None,
            _ => {
                return Err(SecurityError(
                    "--denoiser-tls-cert and --denoiser-tls-key go together".into(),
                ));
            }
        };
        let tls = match &self.denoiser_tls_ca {
            Some(ca) => {
                let mut tls = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(read(ca, "--denoiser-tls-ca")?));
                if let Some(id) = identity {
                    tls = tls.identity(id);
                }
                if let Some(d) = &self.denoiser_tls_domain {
                    tls = tls.domain_name(d.clone());
                }
                Some(tls)
            }
            None => None,
        };
        let authorization = match &self.denoiser_token {
            Some(t) if !t.trim().is_empty() => Some(
                format!("Bearer {}", t.trim())
                    .parse()
                    .map_err(|_| SecurityError("--denoiser-token is not valid ASCII".into()))?,
            ),
            _ => None,
        };
        Ok(ClientSecurity { tls, authorization })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_as_bearer_metadata() {
        let t = Tokens::new(vec!["s3cret".into(), "other".into()]);
        assert!(t.check(Some(b"Bearer s3cret")).is_ok());
        assert!(t.check(Some(b"Bearer other")).is_ok());
        assert_eq!(
            t.check(None).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            t.check(Some(b"s3cret")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            t.check(Some(b"Bearer s3cre")).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert!(!ct_eq(b"abc", b"abd") && ct_eq(b"abc", b"abc") && !ct_eq(b"ab", b"abc"));
        assert!(open_path("/grpc.health.v1.Health/Check"));
        assert!(open_path(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!open_path("/teaserve.v1.CacheController/Generate"));
    }

    #[test]
    fn half_configured_tls_and_empty_token_files_are_refused() {
        let a = ServerSecurityArgs {
            tls_cert: Some("c.pem".into()),
            ..Default::default()
        };
        assert!(a.tls().unwrap_err().to_string().contains("go together"));
        let a = ServerSecurityArgs {
            tls_client_ca: Some("ca.pem".into()),
            ..Default::default()
        };
        assert!(
            a.tls()
                .unwrap_err()
                .to_string()
                .contains("needs --tls-cert")
        );
        let dir = std::env::temp_dir().join(format!("teaserve-tokens-{}", std::process::id()));
        std::fs::write(&dir, "# only a comment\n\n").unwrap();
        let a = ServerSecurityArgs {
            auth_tokens_file: Some(dir.clone()),
            ..Default::default()
        };
        assert!(
            a.tokens()
                .unwrap_err()
                .to_string()
                .contains("lists no token")
        );
        std::fs::write(&dir, "# ops\nalpha\n  beta  \n").unwrap();
        let t = a.tokens().unwrap().unwrap();
        assert!(t.accepts(b"alpha") && t.accepts(b"beta") && !t.accepts(b"gamma"));
        let _ = std::fs::remove_file(dir);
        assert!(ServerSecurityArgs::default().tokens().unwrap().is_none());
    }
}
