//! Least-squares polynomial fitting (no Python, no linear-algebra crate): TeaCache's
//! rescaling polynomial is fitted from pairs (relative L1 change of the modulated input,
//! relative L1 change of the blocks' residual or of the model output) between consecutive
//! steps of uncached runs, with a 4th-degree polynomial, as its authors do with np.polyfit.

/// Least-squares polynomial of `degree` through `(x, y)`; coefficients highest power first,
/// and the fit's R^2. Solves the normal equations in f64 (Gaussian elimination with partial
/// pivoting); `None` when the system is singular.
#[allow(clippy::needless_range_loop)] // dense matrix code reads best with indices
pub fn polyfit(xs: &[f64], ys: &[f64], degree: usize) -> Option<(Vec<f64>, f64)> {
    let n = degree + 1;
    if xs.len() != ys.len() || xs.len() < n {
        return None;
    }
    // A^T A and A^T y with A[i][j] = x_i^j (lowest power first while solving).
    let mut m = vec![vec![0f64; n + 1]; n];
    for (&x, &y) in xs.iter().zip(ys) {
        let powers: Vec<f64> = (0..2 * n).map(|k| x.powi(k as i32)).collect();
        for r in 0..n {
            for c in 0..n {
                m[r][c] += powers[r + c];
            }
            m[r][n] += powers[r] * y;
        }
    }
    for col in 0..n {
        let pivot = (col..n).max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))?;
        if m[pivot][col].abs() < 1e-300 {
            return None;
        }
        m.swap(col, pivot);
        for r in 0..n {
            if r != col {
                let f = m[r][col] / m[col][col];
                for c in col..=n {
                    m[r][c] -= f * m[col][c];
                }
            }
        }
    }
    let low_first: Vec<f64> = (0..n).map(|r| m[r][n] / m[r][r]).collect();
    let eval = |x: f64| low_first.iter().rev().fold(0.0, |acc, c| acc * x + c);
    let mean = ys.iter().sum::<f64>() / ys.len() as f64;
    let ss_tot: f64 = ys.iter().map(|y| (y - mean).powi(2)).sum();
    let ss_res: f64 = xs
        .iter()
        .zip(ys)
        .map(|(&x, &y)| (y - eval(x)).powi(2))
        .sum();
    let r2 = if ss_tot > 0.0 {
        1.0 - ss_res / ss_tot
    } else {
        1.0
    };
    Some((low_first.into_iter().rev().collect(), r2))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn recovers_known_coefficients() {
        let want = [3.0, -2.0, 0.5, 0.25, -0.125];
        let xs: Vec<f64> = (0..50).map(|i| i as f64 / 40.0).collect();
        let ys: Vec<f64> = xs
            .iter()
            .map(|&x| want.iter().fold(0.0, |acc, c| acc * x + c))
            .collect();
        let (got, r2) = polyfit(&xs, &ys, 4).unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        assert!(r2 > 0.999_999);
        assert!(polyfit(&[1.0, 1.0], &[1.0, 2.0], 4).is_none());
    }
}
