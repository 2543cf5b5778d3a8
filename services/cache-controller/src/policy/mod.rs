//! Cache policies: pure decision logic, no I/O, no gRPC. Every policy decides per session
//! and CFG branch, from the step, the schedule and this step's signals, and reports a
//! [`Decision`]; the orchestrator follows it.
//!
//! - [`teacache`]: TeaCache (the modulated input's accumulated rescaled rel-L1).
//! - [`mag_cache`]: MagCache (calibrated magnitude ratios; no signal needed).
//! - [`first_block`]: FirstBlockCache (the first block's output residual).
//! - [`taylor_seer`]: TaylorSeer (a schedule; forecasts every attention output).

pub mod first_block;
pub mod mag_cache;
pub mod taylor_seer;
pub mod teacache;

pub use first_block::{FirstBlockParams, FirstBlockState};
pub use mag_cache::{MagCacheParams, MagState};
pub use taylor_seer::{FactorDType, TaylorSeerParams, TaylorState};
pub use teacache::{BranchState, Coefficients, Decision, Forced, TeaCacheParams};
