//! Tensor contracts: what each RPC accepts and returns, and the validation that turns a bad
//! request into a message naming the tensor, what was expected and what was received.
//!
//! A [`TensorSpec`] names its dimensions either as fixed sizes (from the model config) or as
//! symbols (`B`, `N`, `T`) bound by the first tensor that uses them, so a batch mismatch
//! between streams is reported against the tensor that set the batch.

use std::collections::BTreeMap;
use std::fmt;

use teaserve_proto::TensorMap;
use teaserve_proto::codec::{self, CodecError};
use teaserve_proto::v1::{self, DType};

/// One dimension of a [`TensorSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    /// A size fixed by the model, with the config field it comes from.
    Fixed(usize, &'static str),
    /// A size bound per call (`B`, `N`, `T`, ...), equal wherever the symbol appears.
    Sym(&'static str),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n, "") => write!(f, "{n}"),
            Dim::Fixed(n, why) => write!(f, "{n} ({why})"),
            Dim::Sym(s) => write!(f, "{s}"),
        }
    }
}

/// Which element types a tensor accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// F32, F16 or BF16; converted to the model dtype.
    Float,
    /// Any wire dtype (position ids may be float or integer).
    Numeric,
}

impl Kind {
    /// The wire dtypes this kind accepts.
    pub fn dtypes(self) -> &'static [DType] {
        match self {
            Kind::Float => &[DType::F32, DType::F16, DType::Bf16],
            Kind::Numeric => &[DType::F32, DType::F16, DType::Bf16, DType::I32, DType::I64],
        }
    }
}

/// The contract of one named tensor.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    /// Name in the request or response map.
    pub name: &'static str,
    /// Expected shape.
    pub dims: Vec<Dim>,
    /// Accepted element types.
    pub kind: Kind,
    /// Whether the tensor may be absent.
    pub optional: bool,
    /// What the tensor is.
    pub description: &'static str,
}

impl TensorSpec {
    /// Whether the first dimension is the batch `B` (so requests can be stacked along it).
    pub fn batch_major(&self) -> bool {
        matches!(self.dims.first(), Some(Dim::Sym("B")))
    }

    /// A required tensor.
    pub fn new(name: &'static str, dims: Vec<Dim>, kind: Kind, description: &'static str) -> Self {
        Self {
            name,
            dims,
            kind,
            optional: false,
            description,
        }
    }

    /// Marks the tensor optional.
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }

    /// The shape as text, e.g. `[B, N, 64 (in_channels)]`.
    pub fn shape_text(&self) -> String {
        let dims: Vec<String> = self.dims.iter().map(ToString::to_string).collect();
        format!("[{}]", dims.join(", "))
    }

    /// The spec as its wire description (for `Describe`).
    pub fn to_proto(&self) -> v1::TensorSpec {
        v1::TensorSpec {
            name: self.name.to_string(),
            dims: self
                .dims
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n, _) => n.to_string(),
                    Dim::Sym(s) => (*s).to_string(),
                })
                .collect(),
            dtypes: self.kind.dtypes().iter().map(|d| *d as i32).collect(),
            optional: self.optional,
            description: self.description.to_string(),
        }
    }
}

/// Values of the symbolic dimensions bound so far, with the tensor that bound each.
#[derive(Debug, Default, Clone)]
pub struct Bindings(BTreeMap<&'static str, (usize, String)>);

impl Bindings {
    /// The value bound to a symbol, if any.
    pub fn get(&self, sym: &str) -> Option<usize> {
        self.0.get(sym).map(|(v, _)| *v)
    }

    /// The same bindings with the symbols `from` bound said to be bound by `to` (how a later
    /// error names them).
    pub fn renamed(mut self, from: &str, to: &str) -> Self {
        for (_, by) in self.0.values_mut() {
            if by == from {
                *by = to.to_string();
            }
        }
        self
    }
}

/// A request that does not meet the contract.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// A required tensor is absent.
    #[error("{stage}: missing {field} tensor '{name}' ({description}), expected shape {shape}")]
    Missing {
        /// RPC name.
        stage: &'static str,
        /// Request field (`inputs`, `streams`, `context`).
        field: &'static str,
        /// Tensor name.
        name: &'static str,
        /// What it is.
        description: &'static str,
        /// Expected shape.
        shape: String,
    },
    /// A tensor the RPC does not accept.
    #[error("{stage}: unknown {field} tensor '{}'; accepted: [{accepted}]", teaserve_proto::quote(.name))]
    Unknown {
        /// RPC name.
        stage: &'static str,
        /// Request field.
        field: &'static str,
        /// Tensor name.
        name: String,
        /// Accepted names.
        accepted: String,
    },
    /// The wire tensor itself is malformed (dtype, shape, length, size, non-finite values).
    #[error("{stage}: {field} tensor '{}': {source}", teaserve_proto::quote(.name))]
    Codec {
        /// RPC name.
        stage: &'static str,
        /// Request field.
        field: &'static str,
        /// Tensor name.
        name: String,
        /// What the codec found.
        source: Box<CodecError>,
    },
    /// A dtype outside the accepted set.
    #[error("{stage}: {field} tensor '{name}': dtype {got} is not accepted; accepted: {accepted}")]
    Dtype {
        /// RPC name.
        stage: &'static str,
        /// Request field.
        field: &'static str,
        /// Tensor name.
        name: &'static str,
        /// Dtype received.
        got: &'static str,
        /// Accepted dtypes.
        accepted: String,
    },
    /// A shape that does not match the spec.
    #[error("{stage}: {field} tensor '{name}': expected shape {expected}, got {got:?}{detail}")]
    Shape {
        /// RPC name.
        stage: &'static str,
        /// Request field.
        field: &'static str,
        /// Tensor name.
        name: &'static str,
        /// Expected shape.
        expected: String,
        /// Shape received.
        got: Vec<usize>,
        /// Which dimension disagreed and why.
        detail: String,
    },
    /// A limit of this server (batch size, token count) is exceeded.
    #[error("{0}")]
    Limit(String),
    /// A model-specific rule.
    #[error("{0}")]
    Invalid(String),
}

/// Checks one request map against its specs, binding symbolic dimensions in `bindings`.
/// Headers are checked (dtype, shape, byte length, size cap), then float payloads are scanned
/// for NaN and infinities.
pub fn check_map(
    stage: &'static str,
    field: &'static str,
    specs: &[TensorSpec],
    map: &TensorMap,
    max_bytes: usize,
    bindings: &mut Bindings,
) -> Result<(), InputError> {
    let mut unknown: Vec<&String> = map
        .keys()
        .filter(|k| !specs.iter().any(|s| s.name == k.as_str()))
        .collect();
    unknown.sort();
    if let Some(name) = unknown.first() {
        return Err(InputError::Unknown {
            stage,
            field,
            name: (*name).clone(),
            accepted: specs.iter().map(|s| s.name).collect::<Vec<_>>().join(", "),
        });
    }
    for spec in specs {
        match map.get(spec.name) {
            Some(t) => check_tensor(stage, field, spec, t, max_bytes, bindings)?,
            None if spec.optional => {}
            None => {
                return Err(InputError::Missing {
                    stage,
                    field,
                    name: spec.name,
                    description: spec.description,
                    shape: spec.shape_text(),
                });
            }
        }
    }
    Ok(())
}

/// Checks one tensor against its spec, binding symbolic dimensions in `bindings`.
pub fn check_tensor(
    stage: &'static str,
    field: &'static str,
    spec: &TensorSpec,
    t: &v1::Tensor,
    max_bytes: usize,
    bindings: &mut Bindings,
) -> Result<(), InputError> {
    let codec_err = |source| InputError::Codec {
        stage,
        field,
        name: spec.name.to_string(),
        source: Box::new(source),
    };
    let (dtype, shape) = codec::validate(t, max_bytes).map_err(codec_err)?;
    if !spec.kind.dtypes().contains(&dtype) {
        return Err(InputError::Dtype {
            stage,
            field,
            name: spec.name,
            got: codec::dtype_name(dtype),
            accepted: spec
                .kind
                .dtypes()
                .iter()
                .map(|d| codec::dtype_name(*d))
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let shape_err = |detail: String| InputError::Shape {
        stage,
        field,
        name: spec.name,
        expected: spec.shape_text(),
        got: shape.clone(),
        detail,
    };
    if shape.len() != spec.dims.len() {
        return Err(shape_err(format!(
            ": expected {} dimensions, got {}",
            spec.dims.len(),
            shape.len()
        )));
    }
    let mut new_bindings = Vec::new();
    for (axis, (dim, &got)) in spec.dims.iter().zip(&shape).enumerate() {
        match dim {
            Dim::Fixed(n, why) if *n != got => {
                let why = if why.is_empty() {
                    String::new()
                } else {
                    format!(" ({why})")
                };
                return Err(shape_err(format!(
                    ": dimension {axis} must be {n}{why}, got {got}"
                )));
            }
            Dim::Fixed(..) => {}
            Dim::Sym(sym) if got == 0 => {
                return Err(shape_err(format!(
                    ": dimension {axis} ({sym}) is 0; it must be at least 1"
                )));
            }
            Dim::Sym(sym) => match bindings.0.get(sym) {
                Some((bound, by)) if *bound != got => {
                    return Err(shape_err(format!(
                        ": dimension {axis} ({sym}) is {got} but '{by}' set {sym} = {bound}"
                    )));
                }
                Some(_) => {}
                None => new_bindings.push((*sym, got)),
            },
        }
    }
    for (sym, got) in new_bindings {
        bindings.0.insert(sym, (got, spec.name.to_string()));
    }
    // A linear scan, cheap next to the compute; catches NaN timesteps and corrupt latents.
    codec::check_finite(t).map_err(codec_err)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn f32_tensor(shape: &[i64], fill: f32) -> v1::Tensor {
        let n: i64 = shape.iter().product();
        v1::Tensor {
            dtype: DType::F32 as i32,
            shape: shape.to_vec(),
            data: Bytes::from(
                std::iter::repeat_n(fill.to_le_bytes(), n as usize)
                    .flatten()
                    .collect::<Vec<u8>>(),
            ),
        }
    }

    fn specs() -> Vec<TensorSpec> {
        vec![
            TensorSpec::new(
                "x",
                vec![Dim::Sym("B"), Dim::Sym("N"), Dim::Fixed(4, "in_channels")],
                Kind::Float,
                "latents",
            ),
            TensorSpec::new("y", vec![Dim::Sym("B"), Dim::Sym("T")], Kind::Float, "text"),
            TensorSpec::new(
                "ids",
                vec![Dim::Sym("N"), Dim::Fixed(3, "")],
                Kind::Numeric,
                "ids",
            )
            .optional(),
        ]
    }

    fn check(map: &[(&str, v1::Tensor)]) -> Result<Bindings, InputError> {
        let map: TensorMap = map
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let mut b = Bindings::default();
        check_map("Test", "inputs", &specs(), &map, 1 << 20, &mut b)?;
        Ok(b)
    }

    #[test]
    fn binds_symbols_across_tensors() {
        let b = check(&[
            ("x", f32_tensor(&[2, 5, 4], 0.0)),
            ("y", f32_tensor(&[2, 3], 0.0)),
        ])
        .unwrap();
        assert_eq!(b.get("B"), Some(2));
        assert_eq!(b.get("N"), Some(5));
        assert_eq!(b.get("T"), Some(3));
    }

    #[test]
    fn batch_mismatch_names_the_binding_tensor() {
        let err = check(&[
            ("x", f32_tensor(&[2, 5, 4], 0.0)),
            ("y", f32_tensor(&[1, 3], 0.0)),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("'y'"), "{err}");
        assert!(err.contains("(B) is 1 but 'x' set B = 2"), "{err}");
    }

    #[test]
    fn fixed_dim_mismatch_says_which_config_field() {
        let err = check(&[
            ("x", f32_tensor(&[1, 5, 3], 0.0)),
            ("y", f32_tensor(&[1, 3], 0.0)),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("expected shape [B, N, 4 (in_channels)], got [1, 5, 3]"),
            "{err}"
        );
        assert!(
            err.contains("dimension 2 must be 4 (in_channels), got 3"),
            "{err}"
        );
    }

    #[test]
    fn missing_unknown_rank_dtype_nan() {
        let err = check(&[("x", f32_tensor(&[1, 5, 4], 0.0))]).unwrap_err();
        assert!(
            matches!(err, InputError::Missing { name: "y", .. }),
            "{err}"
        );
        let err = check(&[
            ("x", f32_tensor(&[1, 5, 4], 0.0)),
            ("y", f32_tensor(&[1, 3], 0.0)),
            ("zz", f32_tensor(&[1], 0.0)),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("unknown inputs tensor 'zz'; accepted: [x, y, ids]"),
            "{err}"
        );
        let err = check(&[
            ("x", f32_tensor(&[5, 4], 0.0)),
            ("y", f32_tensor(&[1, 3], 0.0)),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("expected 3 dimensions, got 2"), "{err}");
        let mut ints = f32_tensor(&[1, 3], 0.0);
        ints.dtype = DType::I32 as i32;
        let err = check(&[("x", f32_tensor(&[1, 5, 4], 0.0)), ("y", ints)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dtype I32 is not accepted; accepted: F32, F16, BF16"),
            "{err}"
        );
        let err = check(&[
            ("x", f32_tensor(&[1, 5, 4], 0.0)),
            ("y", f32_tensor(&[1, 3], f32::NAN)),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("'y'") && err.contains("non-finite"), "{err}");
    }

    #[test]
    fn empty_symbolic_dimension_is_rejected() {
        let err = check(&[
            ("x", f32_tensor(&[1, 0, 4], 0.0)),
            ("y", f32_tensor(&[1, 3], 0.0)),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("dimension 1 (N) is 0; it must be at least 1"),
            "{err}"
        );
    }

    #[test]
    fn optional_tensor_checked_when_present() {
        let err = check(&[
            ("x", f32_tensor(&[1, 5, 4], 0.0)),
            ("y", f32_tensor(&[1, 3], 0.0)),
            ("ids", f32_tensor(&[6, 3], 0.0)),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("(N) is 6 but 'x' set N = 5"), "{err}");
    }
}

/// Random request maps against a real model's contract never panic the checks: every map is
/// accepted or refused with a typed error whose message quotes client names boundedly.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use teaserve_proto::v1::DType as W;

    fn flux_specs() -> Vec<TensorSpec> {
        let json = include_str!("../../../tests/fixtures/flux-tiny-guidance/config.json");
        let config: crate::models::flux::Config = serde_json::from_str(json).unwrap_or_else(|e| {
            panic!("fixture config: {e}");
        });
        let info = crate::adapters::flux::FluxAdapter::contract(
            &config,
            json.to_string(),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        );
        info.preprocess.inputs
    }

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("hidden_states".to_string()),
            Just("encoder_hidden_states".to_string()),
            Just("pooled_projections".to_string()),
            Just("timestep".to_string()),
            Just("img_ids".to_string()),
            Just("txt_ids".to_string()),
            Just("guidance".to_string()),
            ".{0,300}",
        ]
    }

    fn tensor() -> impl Strategy<Value = v1::Tensor> {
        (
            prop_oneof![
                Just(W::F32 as i32),
                Just(W::Bf16 as i32),
                Just(W::I64 as i32),
                -1i32..14
            ],
            proptest::collection::vec(prop_oneof![0i64..70, Just(-1), Just(1 << 33)], 0..4),
            0usize..4,
        )
            .prop_map(|(dtype, shape, fill)| {
                // Payloads that fit the header about half the time.
                let n: usize = shape
                    .iter()
                    .map(|&d| d.clamp(0, 70) as usize)
                    .product::<usize>()
                    * 4;
                let len = if fill == 0 { n / 2 } else { n.min(1 << 16) };
                v1::Tensor {
                    dtype,
                    shape,
                    data: vec![0u8; len].into(),
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn any_request_map_is_accepted_or_refused_with_a_typed_error(
            entries in proptest::collection::vec((name(), tensor()), 0..8)
        ) {
            let specs = flux_specs();
            let map: TensorMap = entries.into_iter().collect();
            let mut bindings = Bindings::default();
            if let Err(e) = check_map("Preprocess", "inputs", &specs, &map, 1 << 20, &mut bindings) {
                let msg = e.to_string();
                prop_assert!(!msg.is_empty());
                // Client names are quoted by a bounded prefix.
                prop_assert!(msg.len() < 4096, "{} bytes", msg.len());
            }
        }
    }
}
