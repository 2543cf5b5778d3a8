//! Message-size limits reported the way gRPC specifies: a request over the size limit gets
//! RESOURCE_EXHAUSTED. tonic's decoder answers OUT_OF_RANGE for it, before any handler runs,
//! so this server layer rewrites that one status (a trailers-only response) into
//! RESOURCE_EXHAUSTED with a message naming the limit and the flag that sets it.

use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::{Code, Status};
use tower::{Layer, Service};

const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

/// Tower layer that maps tonic's oversize-request status to RESOURCE_EXHAUSTED.
#[derive(Debug, Clone, Copy)]
pub struct OversizeToResourceExhausted {
    limit: usize,
}

impl OversizeToResourceExhausted {
    /// A layer for a server whose decoding limit is `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { limit }
    }
}

impl<S> Layer<S> for OversizeToResourceExhausted {
    type Service = OversizeService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        OversizeService {
            inner,
            limit: self.limit,
        }
    }
}

/// The service produced by [`OversizeToResourceExhausted`].
#[derive(Debug, Clone)]
pub struct OversizeService<S> {
    inner: S,
    limit: usize,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for OversizeService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let fut = self.inner.call(req);
        let limit = self.limit;
        Box::pin(async move {
            let mut resp = fut.await?;
            rewrite(resp.headers_mut(), limit);
            Ok(resp)
        })
    }
}

fn rewrite(headers: &mut http::HeaderMap, limit: usize) {
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    if status.code() != Code::OutOfRange || !status.message().starts_with(TONIC_TOO_LARGE) {
        return;
    }
    let found = status
        .message()
        .split("found ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or("?");
    let replacement = Status::resource_exhausted(format!(
        "request message is {found} bytes, over this server's limit of {limit} bytes \
         (--max-message-bytes / TEASERVE_MAX_MESSAGE_BYTES); send a smaller batch or raise \
         the limit on both sides"
    ));
    headers.remove("grpc-status");
    headers.remove("grpc-message");
    headers.remove("grpc-status-details-bin");
    if let Err(e) = replacement.add_header(headers) {
        tracing::warn!(error = %e, "could not rewrite the oversize status");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_only_the_oversize_status() {
        let mut h = http::HeaderMap::new();
        Status::out_of_range(format!(
            "{TONIC_TOO_LARGE}: found 2000 bytes, the limit is: 1000 bytes"
        ))
        .add_header(&mut h)
        .unwrap();
        rewrite(&mut h, 1000);
        let s = Status::from_header_map(&h).unwrap();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(
            s.message()
                .contains("2000 bytes, over this server's limit of 1000"),
            "{}",
            s.message()
        );

        let mut h = http::HeaderMap::new();
        Status::out_of_range("timestep out of range")
            .add_header(&mut h)
            .unwrap();
        rewrite(&mut h, 1000);
        assert_eq!(
            Status::from_header_map(&h).unwrap().code(),
            Code::OutOfRange
        );
    }
}
