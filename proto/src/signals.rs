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

/// TeaCache's rescaling polynomial `c0 x^4 + c1 x^3 + c2 x^2 + c3 x + c4` (highest power
/// first), evaluated by Horner's rule.
pub fn poly(c: &[f64; 5], x: f64) -> f64 {
    c.iter().fold(0.0, |acc, &ci| acc * x + ci)
}

/// TeaCache's accumulation at a step that is not forced: the rescaled distance
/// `|poly(rel)|` and the accumulator after adding it, `(rescaled, accumulated + rescaled)`.
pub fn teacache_accumulate(accumulated: f64, coefficients: &[f64; 5], rel: f64) -> (f64, f64) {
    let rescaled = poly(coefficients, rel).abs();
    (rescaled, accumulated + rescaled)
}

/// TeaCache's decision rule at a step that is not forced, as the controller's policy applies
/// it and as a denoiser evaluates the rule the controller sent (`ReuseRule`): compute when
/// there is no distance (no previous indicator of the same shape) or when the accumulator
/// reaches the threshold (`accumulated == threshold` computes).
pub fn teacache_computes(
    accumulated: f64,
    threshold: f64,
    coefficients: &[f64; 5],
    rel: Option<f64>,
) -> bool {
    rel.is_none_or(|r| teacache_accumulate(accumulated, coefficients, r).1 >= threshold)
}
