//! The controller's error type and its mapping to gRPC status codes, in one place.

use tonic::{Code, Status};

use crate::cache_config::ConfigError;

/// Everything that can go wrong in the controller.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ControllerError {
    /// The request is malformed or its configuration is wrong (INVALID_ARGUMENT).
    #[error("{0}")]
    InvalidArgument(String),
    /// No such session (NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// A session limit is reached (RESOURCE_EXHAUSTED).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The session cannot take this call in its state (FAILED_PRECONDITION).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The session is busy with another call (ABORTED; retry).
    #[error("{0}")]
    Aborted(String),
    /// No denoiser can serve the call (UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
    /// A denoiser answered with an error.
    #[error("denoiser {endpoint} {method}: {message}")]
    Denoiser {
        /// Which denoiser.
        endpoint: String,
        /// Which RPC.
        method: &'static str,
        /// Its status code.
        code: Code,
        /// Its message.
        message: String,
    },
    /// A denoiser lacked a session's resident tensors; the orchestrator rebuilds them and
    /// never lets this reach a client (INTERNAL if it ever did).
    #[error("denoiser {endpoint} lacked resident tensors: {message}")]
    ResidentMiss {
        /// Which denoiser.
        endpoint: String,
        /// What it lacked.
        message: String,
    },
    /// A bug or an unexpected failure inside the controller (INTERNAL).
    #[error("{0}")]
    Internal(String),
}

impl From<ConfigError> for ControllerError {
    fn from(e: ConfigError) -> Self {
        ControllerError::InvalidArgument(e.0)
    }
}

impl From<candle_core::Error> for ControllerError {
    fn from(e: candle_core::Error) -> Self {
        ControllerError::Internal(format!("tensor operation failed: {e}"))
    }
}

impl From<teaserve_proto::CodecError> for ControllerError {
    fn from(e: teaserve_proto::CodecError) -> Self {
        ControllerError::Internal(format!("tensor codec: {e}"))
    }
}

impl From<ControllerError> for Status {
    fn from(err: ControllerError) -> Self {
        // Statuses travel in headers: never let one grow past a few KiB, whatever it quotes.
        let msg = teaserve_proto::bounded(&err.to_string(), teaserve_proto::MAX_STATUS_BYTES);
        match err {
            ControllerError::InvalidArgument(_) => Status::invalid_argument(msg),
            ControllerError::NotFound(_) => Status::not_found(msg),
            ControllerError::ResourceExhausted(_) => Status::resource_exhausted(msg),
            ControllerError::FailedPrecondition(_) => Status::failed_precondition(msg),
            ControllerError::Aborted(_) => Status::aborted(msg),
            ControllerError::Unavailable(_) => Status::unavailable(msg),
            // A denoiser rejecting the inputs is the caller's problem; its being down or
            // overloaded is reported as such; anything else is ours.
            ControllerError::Denoiser { code, .. } => match code {
                Code::InvalidArgument => Status::invalid_argument(msg),
                Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded => {
                    Status::new(code, msg)
                }
                _ => {
                    tracing::error!(error = %msg, "denoiser call failed");
                    Status::internal(msg)
                }
            },
            ControllerError::Internal(_) | ControllerError::ResidentMiss { .. } => {
                tracing::error!(error = %msg, "internal error");
                Status::internal(msg)
            }
        }
    }
}
