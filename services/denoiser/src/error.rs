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
    /// The compute queue is full (RESOURCE_EXHAUSTED; retry or go to another replica).
    #[error("{0}")]
    Busy(String),
    /// The model is not loaded yet, or the worker is shutting down (UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
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
        let msg = err.to_string();
        match err {
            DenoiserError::Input(_) => Status::invalid_argument(msg),
            DenoiserError::Config(_) => Status::failed_precondition(msg),
            DenoiserError::Busy(_) => Status::resource_exhausted(msg),
            DenoiserError::Unavailable(_) => Status::unavailable(msg),
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
