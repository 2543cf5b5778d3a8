//! Resident mode keeps what a model derives from a session's conditioning alone (the embedded
//! text stream, the pooled text and guidance embeddings, rotary tables) and reuses it at every
//! step: `preprocess_embedded` and `run_blocks_embedded` must give exactly the bits of
//! `preprocess` and `run_blocks`, at the step the embedding was made and at any other.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use candle_core::Tensor;
use teaserve_denoiser::adapters::flux::FluxAdapter;
use teaserve_denoiser::adapters::qwen_image::QwenImageAdapter;
use teaserve_denoiser::registry::{ModelAdapter, Tensors};
use teaserve_proto::v1::DType;
use teaserve_tests::{Fixture, decode, load_flux, load_qwen};

/// Asserts two maps hold the same names and, under each, the same bits.
fn same_maps(what: &str, a: &Tensors, b: &Tensors) {
    let mut names: Vec<_> = a.keys().collect();
    names.sort();
    let mut other: Vec<_> = b.keys().collect();
    other.sort();
    assert_eq!(names, other, "{what}: different names");
    for n in names {
        same(&format!("{what}.{n}"), &a[n], &b[n]);
    }
}

/// Asserts bit-identical tensors (shape, dtype and every value's bits).
fn same(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    assert_eq!(a.dtype(), b.dtype(), "{what}: dtypes differ");
    let bits = |t: &Tensor| -> Vec<u32> {
        t.to_dtype(candle_core::DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect()
    };
    assert!(bits(a) == bits(b), "{what}: values differ");
}

/// The fixture case's inputs as the denoiser decodes them.
fn inputs(fx: &Fixture, prefix: &str) -> Tensors {
    fx.wire_inputs(prefix, DType::F32)
        .iter()
        .map(|(k, v)| (k.clone(), decode(v)))
        .collect::<HashMap<_, _>>()
}

/// The same conditioning at another step: other latents and another sigma.
fn another_step(inputs: &Tensors) -> Tensors {
    let mut other = inputs.clone();
    for (name, factor) in [("hidden_states", -0.7), ("timestep", 0.5)] {
        let t = (&inputs[name] * factor).unwrap();
        other.insert(name.to_string(), t);
    }
    other
}

fn check(model: &str, adapter: &dyn ModelAdapter, inputs: &Tensors) {
    let embedded = adapter.embed_conditioning(inputs).unwrap();
    assert!(
        embedded.contains_key("text_stream") && embedded.contains_key("rope_cos"),
        "{model}: nothing embedded: {:?}",
        embedded.keys().collect::<Vec<_>>()
    );
    for (step, at) in [("first", inputs.clone()), ("another", another_step(inputs))] {
        let what = format!("{model} {step} step");
        let plain = adapter.preprocess(&at).unwrap();
        let kept = adapter.preprocess_embedded(&at, &embedded).unwrap();
        same(
            &format!("{what} modulated_input"),
            &plain.modulated_input,
            &kept.modulated_input,
        );
        same_maps(&format!("{what} streams"), &plain.streams, &kept.streams);
        same_maps(&format!("{what} context"), &plain.context, &kept.context);
        let blocks = 0..adapter.info().num_blocks;
        let out = adapter
            .run_blocks(&plain.streams, &plain.context, blocks.clone())
            .unwrap();
        let out_kept = adapter
            .run_blocks_embedded(&kept.streams, &kept.context, &embedded, blocks)
            .unwrap();
        same_maps(&format!("{what} blocks"), &out, &out_kept);
    }
}

#[test]
fn flux_embedded_conditioning_gives_the_same_bits() {
    for name in ["flux-tiny", "flux-tiny-guidance"] {
        let fx = Fixture::load(name);
        let adapter = FluxAdapter::new(load_flux(&fx), String::new());
        for prefix in ["", "b2."] {
            check(&format!("{name} {prefix}"), &adapter, &inputs(&fx, prefix));
        }
    }
}

#[test]
fn qwen_image_embedded_conditioning_gives_the_same_bits() {
    let fx = Fixture::load("qwen-image-tiny");
    let adapter = QwenImageAdapter::new(load_qwen(&fx), String::new());
    for prefix in ["", "b2."] {
        check(
            &format!("qwen-image-tiny {prefix}"),
            &adapter,
            &inputs(&fx, prefix),
        );
    }
}
