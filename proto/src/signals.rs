//! The cache policies' signals, computed the same way wherever they are computed: on the
//! controller from tensors that came over the wire, or on a denoiser from the tensors it keeps
//! resident. One function, so both paths give the same bits.

/// Added to the denominator of the relative L1 distance.
pub const REL_EPS: f64 = 1e-8;

/// TeaCache's relative L1 distance `mean(|m - prev|) / (mean(|prev|) + 1e-8)` over whole
/// tensors, accumulated in f64 in element order. `m` and `prev` must have the same length.
pub fn rel_l1(m: &[f32], prev: &[f32]) -> f64 {
    let n = m.len().max(1) as f64;
    let (diff, base) = m
        .iter()
        .zip(prev)
        .fold((0.0f64, 0.0f64), |(d, b), (&x, &p)| {
            (
                d + (f64::from(x) - f64::from(p)).abs(),
                b + f64::from(p).abs(),
            )
        });
    (diff / n) / (base / n + REL_EPS)
}
