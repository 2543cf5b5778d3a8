//! Helpers the unit tests of the pipeline components share: the FLUX and Qwen-Image pipeline
//! fixtures (`tests/fixtures/*-pipeline-tiny`, diffusers' own runs) and tensor comparison.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// The FLUX pipeline fixture folder.
pub(crate) fn flux_pipeline_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/flux-pipeline-tiny"
    ))
}

/// Its `reference.safetensors` (keys `<case>.<name>`).
pub(crate) fn flux_pipeline_reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        flux_pipeline_dir().join("reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

/// The Qwen-Image pipeline fixture folder.
pub(crate) fn qwen_pipeline_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/qwen-image-pipeline-tiny"
    ))
}

/// Its `reference.safetensors` (keys `<case>.<name>`).
pub(crate) fn qwen_pipeline_reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        qwen_pipeline_dir().join("reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

/// Largest absolute difference of two equally shaped tensors, in f32.
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts `ours` is within 1e-4 of the reference and prints the difference.
pub(crate) fn check(what: &str, ours: &Tensor, theirs: &Tensor) {
    let diff = max_abs_diff(ours, theirs);
    eprintln!("{what}: max abs diff {diff:e}");
    assert!(diff < 1e-4, "{what}: max abs diff {diff}");
}
