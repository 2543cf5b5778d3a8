//! FirstBlockCache, exactly as diffusers' `FirstBlockCacheConfig` hooks decide (diffusers
//! 0.42.1, `hooks/first_block_cache.py`), per CFG branch.
//!
//! Every step runs the first block (the head). Its output residual `r = head_out - head_in`
//! (image stream) is compared with the one kept at the branch's last computed step:
//! `diff = mean(|r - r_prev|) / mean(|r_prev|)` (float32); the remaining blocks run iff
//! `diff > threshold` (or nothing is kept yet). A computed step keeps `r` and the tail's
//! residuals `tail_out - head_out` of both streams; a reused step's output is
//! `head_out + tail residual`. A reuse keeps the older `r_prev`.
//!
//! Pure: no I/O. Tensors are candle CPU f32 tensors.

use candle_core::Tensor;

use super::Decision;

/// FirstBlockCache settings, named as diffusers' `FirstBlockCacheConfig` names them.
#[derive(Debug, Clone, PartialEq)]
pub struct FirstBlockParams {
    /// Largest relative change of the head residual that still reuses.
    pub threshold: f64,
}

/// One branch's FirstBlockCache state.
#[derive(Debug, Clone, Default)]
pub struct FirstBlockState {
    /// The head's image residual at the last computed step.
    head_residual: Option<Tensor>,
    /// `tail_out - head_out` per stream at the last computed step.
    tail_residuals: Vec<(String, Tensor)>,
}

impl FirstBlockState {
    /// Decides from this step's head residual `r` (image stream).
    pub fn decide(&self, p: &FirstBlockParams, r: &Tensor) -> candle_core::Result<Decision> {
        let Some(prev) = self
            .head_residual
            .as_ref()
            .filter(|prev| prev.dims() == r.dims() && !self.tail_residuals.is_empty())
        else {
            return Ok(Decision {
                compute: true,
                forced: Some(super::Forced::First),
                ..Decision::default()
            });
        };
        let num = (r - prev)?.abs()?.mean_all()?;
        let den = prev.abs()?.mean_all()?;
        let diff = f64::from((num / den)?.to_scalar::<f32>()?);
        Ok(Decision {
            compute: diff > p.threshold,
            rel_l1: Some(diff),
            accumulated: diff,
            numbers: vec![("rel_diff", diff)],
            ..Decision::default()
        })
    }

    /// After a computed step: keeps the head residual and the tail's residuals
    /// (`tail_out - head_out` for every stream the tail returned).
    pub fn store(
        &mut self,
        head_residual: Tensor,
        head_out: &[(String, Tensor)],
        tail_out: &[(String, Tensor)],
    ) -> candle_core::Result<()> {
        let mut tail = Vec::with_capacity(tail_out.len());
        for (name, out) in tail_out {
            if let Some((_, head)) = head_out.iter().find(|(n, _)| n == name) {
                tail.push((name.clone(), (out - head)?));
            }
        }
        self.head_residual = Some(head_residual);
        self.tail_residuals = tail;
        Ok(())
    }

    /// A reused step's output of `stream`: the head's output plus the kept tail residual.
    pub fn reuse(&self, stream: &str, head_out: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.tail_residuals
            .iter()
            .find(|(n, _)| n == stream)
            .map(|(_, r)| head_out + r)
            .transpose()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v, (1, v.len(), 1), &Device::Cpu).unwrap()
    }

    #[test]
    fn first_call_computes_then_compares_with_the_last_computed_residual() {
        let p = FirstBlockParams { threshold: 0.3 };
        let mut s = FirstBlockState::default();
        assert!(s.decide(&p, &t(&[1.0, 1.0])).unwrap().compute);
        let head = vec![("hidden_states".to_string(), t(&[2.0, 2.0]))];
        let tail = vec![("hidden_states".to_string(), t(&[5.0, 7.0]))];
        s.store(t(&[1.0, 1.0]), &head, &tail).unwrap();
        // mean|r - prev| / mean|prev| = 0.25 <= 0.3: reuse.
        let d = s.decide(&p, &t(&[1.25, 0.75])).unwrap();
        assert!(!d.compute);
        assert!((d.rel_l1.unwrap() - 0.25).abs() < 1e-6);
        let out = s.reuse("hidden_states", &t(&[0.0, 1.0])).unwrap().unwrap();
        assert_eq!(
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![3.0, 6.0]
        );
        // Still measured against the residual of the computed step.
        assert!(s.decide(&p, &t(&[1.5, 1.5])).unwrap().compute);
    }
}
