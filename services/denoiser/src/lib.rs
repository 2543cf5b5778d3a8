//! teaserve's denoiser: a stateless compute worker that loads a diffusion transformer with
//! candle and serves it over gRPC split into Preprocess / RunBlocks / Postprocess, so a
//! cache-controller can skip the transformer blocks on steps where TeaCache reuses a residual.

pub mod adapters;
pub mod batcher;
pub mod config;
pub mod engine;
pub mod error;
pub mod loader;
pub mod models;
pub mod registry;
pub mod resident;
mod resident_step;
pub mod server;
pub mod spec;
#[cfg(test)]
mod test_util;

pub use error::DenoiserError;
