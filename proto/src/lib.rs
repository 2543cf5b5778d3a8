//! teaserve's wire protocol: the generated `teaserve.v1` messages and gRPC services, the file
//! descriptor set for server reflection, the tensor codec between the wire `Tensor` and
//! candle tensors, and the server plumbing both services share.

pub mod batch;
pub mod codec;
pub mod quote;
pub mod security;
pub mod serving;
pub mod signals;

/// Generated protobuf messages and tonic services of package `teaserve.v1`.
#[allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used)]
pub mod v1 {
    tonic::include_proto!("teaserve.v1");
}

/// Encoded `FileDescriptorSet` of every teaserve proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("teaserve_descriptor");

pub use codec::{CodecError, TensorMap, decode_tensor, encode_tensor};
pub use quote::{MAX_STATUS_BYTES, bounded, quote};
