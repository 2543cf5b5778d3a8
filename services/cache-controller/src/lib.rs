//! teaserve's cache-controller: owns each generation session (latents, sigma schedule, per
//! CFG-branch TeaCache state) and drives stateless denoisers step by step, deciding every
//! timestep whether the transformer blocks run or a cached residual is reused.

mod branch_calls;
pub mod cache_config;
pub mod calibration;
pub mod config;
pub mod error;
mod first_block_step;
pub mod metrics;
pub mod models;
pub mod orchestrator;
pub mod policy;
pub mod pool;
mod resident;
pub mod schedule;
pub mod server;
pub mod session;
mod taylor_step;
pub mod text_mode;
mod wire_step;

pub use error::ControllerError;
