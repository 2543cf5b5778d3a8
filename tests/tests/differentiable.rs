//! The model ports can be trained with candle's autograd: the differentiable layer path
//! (composite ops instead of fused kernels without a backward pass) gives the same outputs as
//! the serving path, and gradients reach every parameter. Its own test binary, because the
//! switch is process-wide.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer as _, VarBuilder, VarMap};
use teaserve_denoiser::models::flux::{Config, Flux, Inputs};
use teaserve_denoiser::models::layers::set_differentiable;
use teaserve_tests::{Fixture, flux_inputs, load_flux, load_qwen, max_abs_diff, qwen_inputs};

#[test]
fn differentiable_path_matches_and_trains() {
    // 1. Same outputs as the fused kernels (FLUX with guidance, Qwen-Image with padded text).
    let fx = Fixture::load("flux-tiny-guidance");
    let flux = load_flux(&fx);
    let fq = Fixture::load("qwen-image-tiny");
    let qwen = load_qwen(&fq);
    set_differentiable(false);
    let fused_f = flux.forward(&flux_inputs(&fx, "b2.")).unwrap();
    let fused_q = qwen.forward(&qwen_inputs(&fq, "b2.")).unwrap();
    set_differentiable(true);
    let d_f = max_abs_diff(&flux.forward(&flux_inputs(&fx, "b2.")).unwrap(), &fused_f);
    let d_q = max_abs_diff(&qwen.forward(&qwen_inputs(&fq, "b2.")).unwrap(), &fused_q);
    eprintln!("differentiable vs fused: flux {d_f:.2e}, qwen {d_q:.2e}");
    assert!(d_f <= 1e-5 && d_q <= 1e-5, "{d_f} {d_q}");

    // 2. Gradients reach every parameter of a freshly initialised model, and AdamW fits.
    let dev = Device::Cpu;
    let config: Config =
        serde_json::from_str(&std::fs::read_to_string(fx.dir.join("config.json")).unwrap())
            .unwrap();
    let varmap = VarMap::new();
    let model = Flux::new(&config, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
    let mut inputs: Inputs = flux_inputs(&fx, "b2.");
    let target = fx.get("b2.out.sample").clone();
    let loss_of = |m: &Flux, i: &Inputs| {
        (m.forward(i).unwrap() - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let loss = loss_of(&model, &inputs);
    let grads = loss.backward().unwrap();
    let vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert!(vars.len() > 50, "{}", vars.len());
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient norm {norm}"
        );
    }
    let mut opt = candle_nn::AdamW::new(
        varmap.all_vars(),
        candle_nn::ParamsAdamW {
            lr: 3e-3,
            ..Default::default()
        },
    )
    .unwrap();
    let first = loss.to_scalar::<f32>().unwrap();
    let mut last = first;
    for _ in 0..40 {
        let loss = loss_of(&model, &inputs);
        opt.backward_step(&loss).unwrap();
        last = loss.to_scalar::<f32>().unwrap();
    }
    eprintln!("fit: loss {first:.4} -> {last:.4}");
    assert!(last < 0.5 * first, "{first} -> {last}");
    inputs.timestep = Tensor::new(&[0.1f32, 0.9], &dev).unwrap();
    assert!(
        loss_of(&model, &inputs)
            .to_scalar::<f32>()
            .unwrap()
            .is_finite()
    );
    set_differentiable(false);
}
