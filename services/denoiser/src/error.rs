//! The denoiser's error type and its mapping to gRPC status codes, in one place.

use teaserve_proto::CodecError;
use tonic::Status;

use crate::spec::InputError;

/// Everything that can go wrong in the denoiser, from startup to a single call.
#[derive(Debug, thiserror::Error)]
pub enum DenoiserError {
    /// The request breaks the tensor contract (INVALID_ARGUMENT).
    #[error(transparent)]
    Input(Box<InputError>),
    /// Bad configuration: flags, config.json, unknown model type.
    #[error("{0}")]
    Config(String),
    /// Weights could not be found, fetched or read.
    #[error("loading model: {0}")]
    Load(String),
    /// The model computation failed (INTERNAL).
    #[error("model computation failed: {0}")]
    Compute(#[from] candle_core::Error),
    /// A result could not be encoded for the wire (INTERNAL).
    #[error("encoding the result failed: {0}")]
    Encode(#[from] CodecError),
    /// The compute queue is full: UNAVAILABLE marked `teaserve-queue-full` (the call did not
    /// start; another replica can take it).
    #[error("{0}")]
    Busy(String),
    /// The model is not loaded yet, or the worker is shutting down (UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
    /// A resident step found a kept tensor missing: FAILED_PRECONDITION marked
    /// `teaserve-resident-miss` (the caller resends the step with what rebuilds it).
    #[error("resident tensors missing here: {0}; resend the step with rebuild")]
    ResidentMiss(String),
    /// The compute thread caught a panic; the worker keeps serving (INTERNAL).
    #[error("model computation panicked: {0}")]
    Panic(String),
}

impl From<InputError> for DenoiserError {
    fn from(e: InputError) -> Self {
        DenoiserError::Input(Box::new(e))
    }
}

impl From<DenoiserError> for Status {
    fn from(err: DenoiserError) -> Self {
        // Statuses travel in headers: never let one grow past a few KiB, whatever it quotes.
        let msg = teaserve_proto::bounded(&err.to_string(), teaserve_proto::MAX_STATUS_BYTES);
        match err {
            DenoiserError::Input(_) => Status::invalid_argument(msg),
            DenoiserError::Config(_) => Status::failed_precondition(msg),
            DenoiserError::Busy(_) => {
                let mut md = tonic::metadata::MetadataMap::new();
                md.insert(
                    teaserve_proto::serving::QUEUE_FULL_METADATA,
                    tonic::metadata::MetadataValue::from_static("1"),
                );
                Status::with_metadata(tonic::Code::Unavailable, msg, md)
            }
            DenoiserError::Unavailable(_) => Status::unavailable(msg),
            DenoiserError::ResidentMiss(_) => {
                let mut md = tonic::metadata::MetadataMap::new();
                md.insert(
                    teaserve_proto::serving::RESIDENT_MISS_METADATA,
                    tonic::metadata::MetadataValue::from_static("1"),
                );
                Status::with_metadata(tonic::Code::FailedPrecondition, msg, md)
            }
            DenoiserError::Load(_)
            | DenoiserError::Compute(_)
            | DenoiserError::Encode(_)
            | DenoiserError::Panic(_) => {
                tracing::error!(error = %msg, "request failed inside the denoiser");
                Status::internal(msg)
            }
        }
    }
}
