//! Stage parity of the candle Qwen-Image port against diffusers' own outputs (the reference
//! fixture), loaded through the real loading code: batch 1, and batch 2 with padded text.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::Tensor;
use teaserve_denoiser::models::layers::timestep_projection;
use teaserve_denoiser::models::qwen_image::Inputs;
use teaserve_tests::{Fixture, load_qwen, max_abs_diff, qwen_inputs};

const TOL: f32 = 1e-4;

fn check(fx: &Fixture, key: &str, ours: &Tensor, worst: &mut f32) {
    let d = max_abs_diff(ours, fx.get(key));
    eprintln!("qwen-image-tiny {key:<36} max|diff| = {d:.3e}");
    assert!(d <= TOL, "{key}: max abs diff {d} > {TOL}");
    *worst = worst.max(d);
}

#[test]
fn qwen_image_tiny_matches_diffusers() {
    let fx = Fixture::load("qwen-image-tiny");
    let model = load_qwen(&fx);
    let mut worst = 0f32;
    for p in ["", "b2."] {
        let k = |s: &str| format!("{p}{s}");
        let inputs = qwen_inputs(&fx, p);
        let tp = timestep_projection(&inputs.timestep, 1.0, 1000.0).unwrap();
        check(&fx, &k("pre.time_proj"), &tp, &mut worst);
        let pre = model.preprocess(&inputs).unwrap();
        check(&fx, &k("pre.hidden_states"), &pre.hidden_states, &mut worst);
        check(
            &fx,
            &k("pre.encoder_hidden_states"),
            &pre.encoder_hidden_states,
            &mut worst,
        );
        check(&fx, &k("pre.temb"), &pre.temb, &mut worst);
        check(
            &fx,
            &k("pre.modulated_input"),
            &pre.modulated_input,
            &mut worst,
        );

        let (cos, sin) = model.rope((1, 8, 8), 7).unwrap();
        let txt = |t: &Tensor| t.narrow(0, 0, 7).unwrap();
        let img = |t: &Tensor| t.narrow(0, 7, 64).unwrap();
        check(&fx, &k("pre.rope_txt_real"), &txt(&cos), &mut worst);
        check(&fx, &k("pre.rope_txt_imag"), &txt(&sin), &mut worst);
        check(&fx, &k("pre.rope_img_real"), &img(&cos), &mut worst);
        check(&fx, &k("pre.rope_img_imag"), &img(&sin), &mut worst);

        let rope = (cos, sin);
        let (img_out, txt_out) = model
            .run_blocks(
                &pre.hidden_states,
                &pre.encoder_hidden_states,
                &pre.temb,
                &rope,
                inputs.encoder_hidden_states_mask.as_ref(),
                0..model.config().num_layers,
            )
            .unwrap();
        check(&fx, &k("blocks.hidden_states"), &img_out, &mut worst);
        check(
            &fx,
            &k("blocks.encoder_hidden_states"),
            &txt_out,
            &mut worst,
        );
        let residual = (&img_out - &pre.hidden_states).unwrap();
        check(&fx, &k("blocks.residual"), &residual, &mut worst);
        let out = model.postprocess(&img_out, &pre.temb).unwrap();
        check(&fx, &k("out.sample"), &out, &mut worst);

        let mono = model.forward(&inputs).unwrap();
        assert_eq!(max_abs_diff(&mono, &out), 0.0, "composed stages != forward");
        // An all-ones mask is the same as no mask (the pipeline passes None then).
        if p.is_empty() {
            let no_mask = Inputs {
                encoder_hidden_states_mask: None,
                ..inputs.clone()
            };
            assert_eq!(max_abs_diff(&model.forward(&no_mask).unwrap(), &out), 0.0);
        }
    }
    eprintln!("qwen-image-tiny: worst stage max|diff| = {worst:.3e} (tolerance {TOL:.0e})");
}
