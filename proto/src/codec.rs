//! The tensor codec: wire [`v1::Tensor`] <-> [`candle_core::Tensor`].
//!
//! Decoding validates strictly before touching the payload: a known dtype, non-negative
//! dimensions, no overflow in the element count, a size cap, and
//! `len(data) == numel * itemsize`. Data is little-endian and row-major; decoding copies the
//! payload once, straight into device storage, and encoding hands candle's host buffer to
//! `Bytes` without another copy.

use std::collections::HashMap;

use bytes::Bytes;
use candle_core::{DType as CDType, Device, Tensor};
use half::{bf16, f16};

use crate::v1::{self, DType};

#[cfg(not(target_endian = "little"))]
compile_error!("teaserve's wire format is little-endian; big-endian hosts are not supported");

/// Named tensors as they travel in a request or response map.
pub type TensorMap = HashMap<String, v1::Tensor>;

/// Default cap on one tensor's payload: 2 GiB.
pub const DEFAULT_MAX_TENSOR_BYTES: usize = 2 << 30;

/// Why a wire tensor was rejected or could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The dtype field is DTYPE_UNSPECIFIED.
    #[error("dtype is unspecified; accepted: F32, F16, BF16, I32, I64")]
    UnspecifiedDtype,
    /// The dtype field holds a number outside the enum.
    #[error("unknown dtype value {0}; accepted: F32=1, F16=2, BF16=3, I32=4, I64=5")]
    UnknownDtype(i32),
    /// A dimension is negative.
    #[error("shape {shape:?} has a negative dimension; dimensions must be >= 0")]
    NegativeDim {
        /// The shape as received.
        shape: Vec<i64>,
    },
    /// The shape's byte size overflows or exceeds the cap.
    #[error("shape {shape:?} of {dtype} needs {bytes} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// The shape as received.
        shape: Vec<i64>,
        /// Its dtype name.
        dtype: &'static str,
        /// Bytes it would need (saturated at u128 range).
        bytes: u128,
        /// The cap in force.
        limit: usize,
    },
    /// The payload length does not match the shape and dtype.
    #[error(
        "data is {got} bytes but shape {shape:?} of {dtype} needs {expected} bytes (numel * itemsize)"
    )]
    LengthMismatch {
        /// The shape as received.
        shape: Vec<i64>,
        /// Its dtype name.
        dtype: &'static str,
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// The tensor holds NaN or infinity where only finite numbers are accepted.
    #[error("holds a non-finite value (NaN or infinity) at flat index {index}")]
    NonFinite {
        /// Flat index of the first offending element.
        index: usize,
    },
    /// The candle tensor's dtype has no wire equivalent.
    #[error("candle dtype {0:?} has no wire dtype; wire dtypes: F32, F16, BF16, I32, I64")]
    UnsupportedDtype(CDType),
    /// Tensors cannot be stacked or split along the batch dimension.
    #[error("{0}")]
    BatchMismatch(String),
    /// candle failed while building or reading the tensor.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Size in bytes of one element of a wire dtype.
pub fn itemsize(dtype: DType) -> usize {
    match dtype {
        DType::F32 | DType::I32 => 4,
        DType::F16 | DType::Bf16 => 2,
        DType::I64 => 8,
        DType::DtypeUnspecified => 0,
    }
}

/// Human name of a wire dtype, as used in error messages and docs.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::DtypeUnspecified => "DTYPE_UNSPECIFIED",
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::Bf16 => "BF16",
        DType::I32 => "I32",
        DType::I64 => "I64",
    }
}

/// Whether a wire dtype is a floating-point type.
pub fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::Bf16)
}

/// The candle dtype a wire dtype decodes to.
pub fn to_candle_dtype(dtype: DType) -> Result<CDType, CodecError> {
    Ok(match dtype {
        DType::F32 => CDType::F32,
        DType::F16 => CDType::F16,
        DType::Bf16 => CDType::BF16,
        DType::I32 => CDType::I32,
        DType::I64 => CDType::I64,
        DType::DtypeUnspecified => return Err(CodecError::UnspecifiedDtype),
    })
}

/// The wire dtype of a candle dtype.
pub fn from_candle_dtype(dtype: CDType) -> Result<DType, CodecError> {
    Ok(match dtype {
        CDType::F32 => DType::F32,
        CDType::F16 => DType::F16,
        CDType::BF16 => DType::Bf16,
        CDType::I32 => DType::I32,
        CDType::I64 => DType::I64,
        other => return Err(CodecError::UnsupportedDtype(other)),
    })
}

/// Parses a wire dtype, rejecting DTYPE_UNSPECIFIED and unknown values.
pub fn wire_dtype(t: &v1::Tensor) -> Result<DType, CodecError> {
    match DType::try_from(t.dtype) {
        Ok(DType::DtypeUnspecified) => Err(CodecError::UnspecifiedDtype),
        Ok(d) => Ok(d),
        Err(_) => Err(CodecError::UnknownDtype(t.dtype)),
    }
}

/// Validates a wire tensor's header against its payload and a byte cap; returns its dtype
/// and shape. Nothing is decoded.
pub fn validate(t: &v1::Tensor, max_bytes: usize) -> Result<(DType, Vec<usize>), CodecError> {
    let dtype = wire_dtype(t)?;
    if t.shape.iter().any(|&d| d < 0) {
        return Err(CodecError::NegativeDim {
            shape: t.shape.clone(),
        });
    }
    let size = itemsize(dtype);
    let bytes = t
        .shape
        .iter()
        .try_fold(size as u128, |acc, &d| acc.checked_mul(d as u128))
        .unwrap_or(u128::MAX);
    if bytes > max_bytes as u128 {
        return Err(CodecError::TooLarge {
            shape: t.shape.clone(),
            dtype: dtype_name(dtype),
            bytes,
            limit: max_bytes,
        });
    }
    // bytes <= max_bytes (a usize), so the conversions below cannot truncate.
    let expected = bytes as usize;
    if t.data.len() != expected {
        return Err(CodecError::LengthMismatch {
            shape: t.shape.clone(),
            dtype: dtype_name(dtype),
            expected,
            got: t.data.len(),
        });
    }
    Ok((dtype, t.shape.iter().map(|&d| d as usize).collect()))
}

/// Rejects NaN and infinities in a float wire tensor by scanning its payload (integers pass).
/// Call after [`validate`].
pub fn check_finite(t: &v1::Tensor) -> Result<(), CodecError> {
    let first_bad = match wire_dtype(t)? {
        DType::F32 => t.data.chunks_exact(4).position(|c| {
            (u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000) == 0x7f80_0000
        }),
        // Exponent all ones means NaN or infinity for both 16-bit formats.
        DType::F16 => t
            .data
            .chunks_exact(2)
            .position(|c| (u16::from_le_bytes([c[0], c[1]]) & 0x7c00) == 0x7c00),
        DType::Bf16 => t
            .data
            .chunks_exact(2)
            .position(|c| (u16::from_le_bytes([c[0], c[1]]) & 0x7f80) == 0x7f80),
        _ => None,
    };
    match first_bad {
        Some(index) => Err(CodecError::NonFinite { index }),
        None => Ok(()),
    }
}

/// Decodes a wire tensor onto `device` after [`validate`]-ing it against `max_bytes`.
pub fn decode_tensor(
    t: &v1::Tensor,
    device: &Device,
    max_bytes: usize,
) -> Result<Tensor, CodecError> {
    let (dtype, shape) = validate(t, max_bytes)?;
    Ok(Tensor::from_raw_buffer(
        &t.data,
        to_candle_dtype(dtype)?,
        &shape,
        device,
    )?)
}

/// Owns a host buffer of plain elements and exposes it as bytes, so `Bytes` can wrap it
/// without copying.
struct HostBuffer<T>(Vec<T>);

impl<T: bytemuck::Pod> AsRef<[u8]> for HostBuffer<T> {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

fn host_bytes<T: bytemuck::Pod + candle_core::WithDType + Send + Sync>(
    t: &Tensor,
) -> Result<Bytes, CodecError> {
    let flat: Vec<T> = t.flatten_all()?.to_vec1::<T>()?;
    Ok(Bytes::from_owner(HostBuffer(flat)))
}

/// Encodes a candle tensor as a wire tensor of `dtype` (converting if needed; DTYPE_UNSPECIFIED
/// keeps the tensor's own dtype). Device tensors are copied to the host once.
pub fn encode_tensor(t: &Tensor, dtype: DType) -> Result<v1::Tensor, CodecError> {
    let dtype = match dtype {
        DType::DtypeUnspecified => from_candle_dtype(t.dtype())?,
        d => d,
    };
    let t = t.to_dtype(to_candle_dtype(dtype)?)?;
    let data = match dtype {
        DType::F32 => host_bytes::<f32>(&t)?,
        DType::F16 => host_bytes::<f16>(&t)?,
        DType::Bf16 => host_bytes::<bf16>(&t)?,
        DType::I32 => host_bytes::<i32>(&t)?,
        DType::I64 => host_bytes::<i64>(&t)?,
        DType::DtypeUnspecified => return Err(CodecError::UnspecifiedDtype),
    };
    Ok(v1::Tensor {
        dtype: dtype as i32,
        shape: t.dims().iter().map(|&d| d as i64).collect(),
        data,
    })
}

/// Payload bytes of a tensor map (what travels as tensor data).
pub fn map_bytes(map: &TensorMap) -> u64 {
    map.values().map(|t| t.data.len() as u64).sum()
}

/// Payload bytes of a `ResidentStep` request: its latents and timestep, and every branch's
/// conditioning and rebuild inputs.
pub fn resident_step_bytes(req: &v1::ResidentStepRequest) -> u64 {
    let t = |t: &Option<v1::Tensor>| t.as_ref().map_or(0, |t| t.data.len() as u64);
    let r = |r: &Option<v1::RebuildInputs>| {
        r.as_ref()
            .map_or(0, |r| t(&r.hidden_states) + t(&r.timestep))
    };
    t(&req.hidden_states)
        + t(&req.timestep)
        + req
            .branches
            .iter()
            .map(|b| map_bytes(&b.conditioning) + r(&b.previous) + r(&b.residual))
            .sum::<u64>()
}

/// Stacks wire tensors along their first (batch) dimension without decoding them: same dtype
/// and trailing dimensions required. Row-major layout makes this a byte concatenation.
pub fn concat_batch(parts: &[&v1::Tensor]) -> Result<v1::Tensor, CodecError> {
    let first = parts
        .first()
        .ok_or(CodecError::BatchMismatch("no tensors to stack".into()))?;
    for p in parts {
        if p.dtype != first.dtype || p.shape.is_empty() || p.shape.get(1..) != first.shape.get(1..)
        {
            return Err(CodecError::BatchMismatch(format!(
                "cannot stack dtype {} shape {:?} with dtype {} shape {:?}",
                p.dtype, p.shape, first.dtype, first.shape
            )));
        }
    }
    let rows = parts
        .iter()
        .try_fold(0i64, |acc, p| {
            p.shape
                .first()
                .filter(|&&r| r >= 0)
                .and_then(|&r| acc.checked_add(r))
        })
        .ok_or_else(|| CodecError::BatchMismatch("batch sizes overflow or are negative".into()))?;
    let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
    for p in parts {
        data.extend_from_slice(&p.data);
    }
    let mut shape = first.shape.clone();
    shape[0] = rows;
    Ok(v1::Tensor {
        dtype: first.dtype,
        shape,
        data: Bytes::from(data),
    })
}

/// Splits a wire tensor along its first dimension into pieces of `sizes` rows, sharing its
/// buffer (no copy). The sizes must sum to the first dimension.
pub fn split_batch(t: &v1::Tensor, sizes: &[i64]) -> Result<Vec<v1::Tensor>, CodecError> {
    let rows = *t
        .shape
        .first()
        .ok_or(CodecError::BatchMismatch("cannot split a scalar".into()))?;
    let total = sizes.iter().try_fold(
        0i64,
        |acc, &n| if n < 0 { None } else { acc.checked_add(n) },
    );
    if total != Some(rows) || rows <= 0 {
        return Err(CodecError::BatchMismatch(format!(
            "cannot split {rows} rows into {sizes:?}"
        )));
    }
    let row_bytes = t.data.len() / rows as usize;
    if row_bytes * rows as usize != t.data.len() {
        return Err(CodecError::BatchMismatch(format!(
            "{} bytes do not divide into {rows} rows",
            t.data.len()
        )));
    }
    let mut start = 0usize;
    Ok(sizes
        .iter()
        .map(|&n| {
            let len = n as usize * row_bytes;
            let mut shape = t.shape.clone();
            shape[0] = n;
            let piece = v1::Tensor {
                dtype: t.dtype,
                shape,
                data: t.data.slice(start..start + len),
            };
            start += len;
            piece
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn wire(dtype: DType, shape: &[i64], data: Vec<u8>) -> v1::Tensor {
        v1::Tensor {
            dtype: dtype as i32,
            shape: shape.to_vec(),
            data: Bytes::from(data),
        }
    }

    #[test]
    fn roundtrip_every_dtype() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 24f32, &dev)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        for dtype in [DType::F32, DType::F16, DType::Bf16, DType::I32, DType::I64] {
            let w = encode_tensor(&x, dtype).unwrap();
            assert_eq!(w.shape, vec![2, 3, 4]);
            assert_eq!(w.data.len(), 24 * itemsize(dtype));
            let back = decode_tensor(&w, &dev, 1 << 20).unwrap();
            assert_eq!(back.dtype(), to_candle_dtype(dtype).unwrap());
            let back: Vec<f32> = back
                .to_dtype(CDType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want: Vec<f32> = (0..24).map(|v| v as f32).collect();
            assert_eq!(back, want, "{dtype:?}");
        }
    }

    #[test]
    fn little_endian_row_major_layout() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        let w = encode_tensor(&x.t().unwrap(), DType::F32).unwrap();
        let vals: Vec<f32> = w
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(vals, vec![1.0, 3.0, 2.0, 4.0]);
    }

    #[test]
    fn scalar_and_empty_tensors() {
        let dev = Device::Cpu;
        let s = decode_tensor(
            &wire(DType::F32, &[], 2.5f32.to_le_bytes().to_vec()),
            &dev,
            16,
        )
        .unwrap();
        assert_eq!(s.to_scalar::<f32>().unwrap(), 2.5);
        let e = decode_tensor(&wire(DType::F32, &[0, 3], vec![]), &dev, 16).unwrap();
        assert_eq!(e.dims(), &[0, 3]);
    }

    #[test]
    fn rejects_bad_headers() {
        let dev = Device::Cpu;
        let unspecified = wire(DType::DtypeUnspecified, &[1], vec![0; 4]);
        assert!(matches!(
            decode_tensor(&unspecified, &dev, 64),
            Err(CodecError::UnspecifiedDtype)
        ));
        let mut unknown = wire(DType::F32, &[1], vec![0; 4]);
        unknown.dtype = 42;
        let err = decode_tensor(&unknown, &dev, 64).unwrap_err();
        assert!(matches!(err, CodecError::UnknownDtype(42)));
        assert!(err.to_string().contains("accepted"));
        let neg = wire(DType::F32, &[2, -1], vec![]);
        assert!(matches!(
            decode_tensor(&neg, &dev, 64),
            Err(CodecError::NegativeDim { .. })
        ));
        let short = wire(DType::F32, &[2, 2], vec![0; 15]);
        let err = decode_tensor(&short, &dev, 64).unwrap_err();
        assert!(matches!(
            err,
            CodecError::LengthMismatch {
                expected: 16,
                got: 15,
                ..
            }
        ));
        let big = wire(DType::F32, &[4, 5], vec![0; 80]);
        assert!(matches!(
            decode_tensor(&big, &dev, 64),
            Err(CodecError::TooLarge { bytes: 80, .. })
        ));
        let overflow = wire(DType::I64, &[i64::MAX, i64::MAX, 4], vec![]);
        assert!(matches!(
            decode_tensor(&overflow, &dev, usize::MAX),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn batch_concat_and_split_are_byte_exact() {
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 6.0, &dev)
            .unwrap()
            .reshape((1, 2, 3))
            .unwrap();
        let b = Tensor::arange(6f32, 18.0, &dev)
            .unwrap()
            .reshape((2, 2, 3))
            .unwrap();
        let (wa, wb) = (
            encode_tensor(&a, DType::F32).unwrap(),
            encode_tensor(&b, DType::F32).unwrap(),
        );
        let ab = concat_batch(&[&wa, &wb]).unwrap();
        assert_eq!(ab.shape, vec![3, 2, 3]);
        let want = Tensor::cat(&[&a, &b], 0).unwrap();
        let got = decode_tensor(&ab, &dev, 1 << 20).unwrap();
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let parts = split_batch(&ab, &[1, 2]).unwrap();
        assert_eq!(parts[0], wa);
        assert_eq!(parts[1], wb);
        let c = encode_tensor(
            &Tensor::zeros((1, 3, 3), candle_core::DType::F32, &dev).unwrap(),
            DType::F32,
        )
        .unwrap();
        assert!(concat_batch(&[&wa, &c]).is_err());
        assert!(split_batch(&ab, &[1, 1]).is_err());
    }

    #[test]
    fn finite_check_finds_nan_and_inf() {
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        assert!(check_finite(&wire(DType::F32, &[3], f32s(&[1.0, -0.0, 3e38]))).is_ok());
        let err = check_finite(&wire(DType::F32, &[3], f32s(&[1.0, f32::NAN, 0.0]))).unwrap_err();
        assert!(matches!(err, CodecError::NonFinite { index: 1 }));
        assert!(check_finite(&wire(DType::F32, &[1], f32s(&[f32::NEG_INFINITY]))).is_err());
        let bf = bf16::from_f32(f32::INFINITY)
            .to_bits()
            .to_le_bytes()
            .to_vec();
        assert!(check_finite(&wire(DType::Bf16, &[1], bf)).is_err());
        let hf = f16::from_f32(65504.0).to_bits().to_le_bytes().to_vec();
        assert!(check_finite(&wire(DType::F16, &[1], hf)).is_ok());
        let hnan = f16::NAN.to_bits().to_le_bytes().to_vec();
        assert!(check_finite(&wire(DType::F16, &[1], hnan)).is_err());
        let ints = wire(DType::I32, &[1], (-1i32).to_le_bytes().to_vec());
        assert!(check_finite(&ints).is_ok());
    }
}

/// Random wire tensors (any dtype number, shape, payload) never panic the codec: every path
/// ends in a value or a typed error.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn any_tensor() -> impl Strategy<Value = v1::Tensor> {
        (
            -2i32..16,
            proptest::collection::vec(
                prop_oneof![-3i64..5, 0i64..70, Just(i64::MAX), Just(1 << 40)],
                0..6,
            ),
            proptest::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(dtype, shape, data)| v1::Tensor {
                dtype,
                shape,
                data: data.into(),
            })
    }

    proptest! {
        #[test]
        fn any_wire_tensor_gets_a_value_or_a_typed_error(t in any_tensor()) {
            let device = candle_core::Device::Cpu;
            match validate(&t, 1 << 16) {
                Ok((_, shape)) => {
                    let _ = check_finite(&t);
                    let decoded = decode_tensor(&t, &device, 1 << 16);
                    if let Ok(d) = decoded {
                        prop_assert_eq!(d.dims(), shape.as_slice());
                    }
                }
                Err(e) => {
                    prop_assert!(!e.to_string().is_empty());
                    prop_assert!(decode_tensor(&t, &device, 1 << 16).is_err());
                }
            }
        }

        #[test]
        fn batch_concat_and_split_never_panic(
            parts in proptest::collection::vec(any_tensor(), 1..4),
            sizes in proptest::collection::vec(-2i64..5, 0..5),
        ) {
            let refs: Vec<&v1::Tensor> = parts.iter().collect();
            if let Ok(joined) = concat_batch(&refs) {
                let _ = split_batch(&joined, &sizes);
            }
            let _ = split_batch(&parts[0], &sizes);
        }
    }
}
