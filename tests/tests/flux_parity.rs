//! Stage parity of the candle FLUX port against diffusers' own outputs (the reference
//! fixtures), loaded through the real loading code, for batch 1 and 2, with and without the
//! guidance embedding.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::Tensor;
use teaserve_denoiser::models::flux::timestep_projection;
use teaserve_tests::{Fixture, flux_inputs, load_flux, max_abs_diff};

const TOL: f32 = 1e-4;

/// Asserts `ours` matches fixture key `key` within TOL and reports the difference.
fn check(fx: &Fixture, key: &str, ours: &Tensor, worst: &mut f32) {
    let d = max_abs_diff(ours, fx.get(key));
    eprintln!(
        "{:>22} {key:<40} max|diff| = {d:.3e}",
        fx.meta["name"].as_str().unwrap()
    );
    assert!(d <= TOL, "{key}: max abs diff {d} > {TOL}");
    *worst = worst.max(d);
}

fn parity(name: &str) {
    let fx = Fixture::load(name);
    let model = load_flux(&fx);
    let mut worst = 0f32;
    for p in ["", "b2."] {
        let inp = flux_inputs(&fx, p);
        let k = |s: &str| format!("{p}{s}");

        let tp = timestep_projection(&inp.timestep, 1000.0, 1.0).unwrap();
        check(&fx, &k("pre.time_proj"), &tp, &mut worst);
        if let Some(g) = &inp.guidance {
            let gp = timestep_projection(g, 1000.0, 1.0).unwrap();
            check(&fx, &k("pre.guidance_proj"), &gp, &mut worst);
        }

        let pre = model.preprocess(&inp).unwrap();
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

        // Rotary tables: the fixture repeats each frequency twice; ours holds one per pair.
        let (cos, sin) = model.rope(&inp.txt_ids, &inp.img_ids).unwrap();
        let every_other = |t: &Tensor| {
            let (s, d) = t.dims2().unwrap();
            t.reshape((s, d / 2, 2))
                .unwrap()
                .narrow(2, 0, 1)
                .unwrap()
                .squeeze(2)
                .unwrap()
        };
        for (key, ours) in [("pre.rope_cos", &cos), ("pre.rope_sin", &sin)] {
            let d = max_abs_diff(ours, &every_other(fx.get(&k(key))));
            eprintln!("{name:>22} {:<40} max|diff| = {d:.3e}", k(key));
            assert!(d <= TOL, "{key}: max abs diff {d}");
        }

        let rope = (cos, sin);
        let (img, txt) = model
            .run_double_blocks(
                &pre.hidden_states,
                &pre.encoder_hidden_states,
                &pre.temb,
                &rope,
            )
            .unwrap();
        check(&fx, &k("blocks.double.hidden_states"), &img, &mut worst);
        check(
            &fx,
            &k("blocks.double.encoder_hidden_states"),
            &txt,
            &mut worst,
        );
        let (img, txt) = model
            .run_single_blocks(&img, &txt, &pre.temb, &rope)
            .unwrap();
        check(&fx, &k("blocks.hidden_states"), &img, &mut worst);
        check(&fx, &k("blocks.encoder_hidden_states"), &txt, &mut worst);
        let residual = (&img - &pre.hidden_states).unwrap();
        check(&fx, &k("blocks.residual"), &residual, &mut worst);

        let out = model.postprocess(&img, &pre.temb).unwrap();
        check(&fx, &k("out.sample"), &out, &mut worst);

        // The split is exact: composed stages equal the monolithic forward bit for bit.
        let mono = model.forward(&inp).unwrap();
        assert_eq!(max_abs_diff(&mono, &out), 0.0, "composed stages != forward");
    }
    eprintln!("{name}: worst stage max|diff| = {worst:.3e} (tolerance {TOL:.0e})");
}

#[test]
fn flux_tiny_matches_diffusers() {
    parity("flux-tiny");
}

#[test]
fn flux_tiny_guidance_matches_diffusers() {
    parity("flux-tiny-guidance");
}
