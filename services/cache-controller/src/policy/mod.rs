//! Cache policies: pure decision logic, no I/O, no gRPC. The orchestrator feeds them each
//! step's modulated input and follows their decisions.

pub mod teacache;

pub use teacache::{BranchState, Coefficients, Decision, Forced, TeaCacheParams};
